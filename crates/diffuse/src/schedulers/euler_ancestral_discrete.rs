//! Port of diffusers/schedulers/scheduling_euler_ancestral_discrete.py
//! (`EulerAncestralDiscreteScheduler`): an Euler step down to sigma_down, then fresh noise
//! of scale sigma_up, so that sigma_down^2 + sigma_up^2 = sigma_next^2 (k-diffusion's
//! `sample_euler_ancestral` with eta = 1).

use std::path::Path;

use candle_core::Tensor;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::sigmas::{self, divide, scale, to_f32, Schedule};
use super::{betas, spacing, PredictionType, Scheduler};
use crate::loading::config::parse_config;
use crate::rng::TorchGenerator;
use crate::{Error, Result};

/// `EulerAncestralDiscreteScheduler`'s `scheduler_config.json`, with diffusers' names and defaults.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct EulerAncestralDiscreteSchedulerConfig {
    /// Timesteps of the training noise schedule. Default: `1000`.
    pub num_train_timesteps: usize,
    /// The noise schedule's first beta. Default: `0.0001`.
    pub beta_start: f64,
    /// The noise schedule's last beta. Default: `0.02`.
    pub beta_end: f64,
    /// How the betas go from `beta_start` to `beta_end`: `linear`, `scaled_linear` (linear in
    /// sqrt(beta), Stable Diffusion's) or `squaredcos_cap_v2` (the cosine schedule). Default:
    /// `linear`.
    pub beta_schedule: String,
    /// Betas given outright, in place of the schedule. Default: none.
    pub trained_betas: Option<Vec<f64>>,
    /// What the model predicts: `epsilon` (the noise), `sample` (x0) or `v_prediction`. Default:
    /// `epsilon`.
    pub prediction_type: String,
    /// How inference timesteps are picked from the training ones: `leading`, `trailing` or
    /// `linspace` (Lin et al. 2023, table 2). Default: `linspace`.
    pub timestep_spacing: String,
    /// Added to every inference timestep (1 in SD 1.x configs). Default: `0`.
    pub steps_offset: usize,
    /// Rescale the betas to zero terminal SNR (Lin et al. 2023); meant for `v_prediction` models.
    /// Default: `false`.
    pub rescale_betas_zero_snr: bool,
}

impl Default for EulerAncestralDiscreteSchedulerConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: "linear".into(),
            trained_betas: None,
            prediction_type: "epsilon".into(),
            timestep_spacing: "linspace".into(),
            steps_offset: 0,
            rescale_betas_zero_snr: false,
        }
    }
}

/// diffusers' `EulerAncestralDiscreteScheduler`, built from a
/// [`EulerAncestralDiscreteSchedulerConfig`].
pub struct EulerAncestralDiscreteScheduler {
    config: EulerAncestralDiscreteSchedulerConfig,
    prediction_type: PredictionType,
    alphas_cumprod: Vec<f32>,
    training_sigmas: Vec<f32>,
    /// The inference timesteps, and their sigmas (descending) with a final 0.
    schedule: Schedule,
}

impl EulerAncestralDiscreteScheduler {
    /// Builds the scheduler; errors on config values it does not support.
    pub fn new(config: EulerAncestralDiscreteSchedulerConfig) -> Result<Self> {
        let prediction_type = PredictionType::parse(&config.prediction_type)?;
        if prediction_type == PredictionType::Sample {
            // diffusers raises NotImplementedError for it in `step`.
            return Err(Error::invalid(
                "prediction_type `sample` is not implemented by EulerAncestralDiscreteScheduler",
            ));
        }
        spacing::check_spacing(&config.timestep_spacing)?;
        let betas = betas::make_betas(
            &config.beta_schedule,
            config.beta_start,
            config.beta_end,
            config.num_train_timesteps,
            config.trained_betas.as_deref(),
            &[],
        )?;
        let alphas_cumprod = sigmas::alphas_cumprod(&betas, config.rescale_betas_zero_snr);
        let training_sigmas = sigmas::training_sigmas(&alphas_cumprod);
        // Before `set_timesteps`: every training timestep, as diffusers' constructor sets it.
        let sigmas = training_sigmas.iter().rev().copied().chain([0.0]).collect();
        let timesteps = (0..config.num_train_timesteps).rev().map(|t| t as f64).collect();
        let schedule = Schedule::new(timesteps, sigmas);
        Ok(Self {
            config,
            prediction_type,
            alphas_cumprod,
            training_sigmas,
            schedule,
        })
    }

    /// Builds the scheduler from `scheduler_config.json`'s keys (unknown keys ignored, as diffusers
    /// does); `origin` names the file in errors.
    pub fn from_config(map: &Map<String, Value>, origin: &Path) -> Result<Self> {
        Self::new(parse_config(map, origin)?).map_err(|e| e.in_config_file(origin))
    }

    /// The config the scheduler was built from.
    pub fn config(&self) -> &EulerAncestralDiscreteSchedulerConfig {
        &self.config
    }

    /// The inference sigmas, with the final 0 appended.
    pub fn sigmas(&self) -> &[f32] {
        &self.schedule.sigmas
    }

    /// alpha_bar_t of every training timestep, in float32 (diffusers' `alphas_cumprod`).
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }
}

impl Scheduler for EulerAncestralDiscreteScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let config = &self.config;
        let timesteps = spacing::float32_timesteps(
            &config.timestep_spacing,
            config.num_train_timesteps,
            num_inference_steps,
            config.steps_offset,
        )?;
        let sigmas = sigmas::interp(&timesteps, &self.training_sigmas);
        self.schedule.set(
            timesteps.into_iter().map(f64::from).collect(),
            sigmas.into_iter().map(|s| s as f32).chain([0.0]).collect(),
        );
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.schedule.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.schedule.init_noise_sigma(&self.config.timestep_spacing)
    }

    fn scale_model_input(&mut self, sample: &Tensor, timestep: f64) -> Result<Tensor> {
        self.schedule.scale_model_input(sample, timestep)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        _eta: f64,
        generator: &mut TorchGenerator,
    ) -> Result<Tensor> {
        let i = self.schedule.step_index(timestep)?;
        let sigma = self.schedule.sigma(i)?;
        let sample = to_f32(sample)?;

        // 1. x_0 from the model output.
        let pred_original_sample = sigmas::denoised(self.prediction_type, model_output, &sample, sigma)?;

        // 2. Split the next noise level into a deterministic part (sigma_down) and fresh
        //    noise (sigma_up).
        let sigma_from = sigma;
        let sigma_to = self.schedule.sigma(i + 1)?;
        let sigma_up =
            (sigma_to * sigma_to * (sigma_from * sigma_from - sigma_to * sigma_to) / (sigma_from * sigma_from)).sqrt();
        let sigma_down = (sigma_to * sigma_to - sigma_up * sigma_up).sqrt();

        // 3. An Euler step to sigma_down.
        let derivative = divide(&(&sample - &pred_original_sample)?, sigma)?;
        let dt = sigma_down - sigma;
        let prev_sample = (&sample + scale(&derivative, dt)?)?;

        // 4. Noise back up to sigma_to (drawn at every step, even the last where sigma_up = 0).
        let noise =
            generator.randn_tensor(model_output.dims(), model_output.device())?.to_dtype(model_output.dtype())?;
        let prev_sample = (prev_sample + scale(&noise, sigma_up)?)?;

        self.schedule.advance();
        Ok(prev_sample.to_dtype(model_output.dtype())?)
    }

    fn add_noise(&self, original_samples: &Tensor, noise: &Tensor, timesteps: &[f64]) -> Result<Tensor> {
        self.schedule.add_noise(original_samples, noise, timesteps)
    }

    fn set_begin_index(&mut self, begin_index: usize) {
        self.schedule.set_begin_index(begin_index);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_prediction_is_refused() {
        let config = EulerAncestralDiscreteSchedulerConfig { prediction_type: "sample".into(), ..Default::default() };
        assert!(EulerAncestralDiscreteScheduler::new(config).is_err());
    }
}
