//! Port of diffusers/schedulers/scheduling_euler_discrete.py (`EulerDiscreteScheduler`):
//! Euler's method on the probability-flow ODE in sigma (Karras et al. 2022, algorithm 2).

use std::path::Path;

use candle_core::Tensor;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::sigmas::{self, divide, scale, to_f32, Schedule, SigmaSchedule};
use super::{betas, spacing, PredictionType, Scheduler};
use crate::loading::config::parse_config;
use crate::rng::TorchGenerator;
use crate::{Error, Result};

/// `EulerDiscreteScheduler`'s `scheduler_config.json`, with diffusers' names and defaults.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct EulerDiscreteSchedulerConfig {
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
    /// `linear` (interpolate sigma at the spaced timesteps) or `log_linear`.
    pub interpolation_type: String,
    /// Karras et al. 2022 sigmas (rho = 7) in place of the training ones. Default: `false`.
    pub use_karras_sigmas: Option<bool>,
    /// Sigmas evenly spaced in log sigma. Default: `false`.
    pub use_exponential_sigmas: Option<bool>,
    /// Sigmas at the quantiles of Beta(0.6, 0.6) (Lee et al. 2024); refused here.
    pub use_beta_sigmas: Option<bool>,
    /// Bounds of the Karras/exponential sigmas; by default the ends of the interpolated ones.
    pub sigma_min: Option<f64>,
    /// The largest sigma of Karras, exponential and beta sigmas (default: the training schedule's).
    /// Default: none.
    pub sigma_max: Option<f64>,
    /// How inference timesteps are picked from the training ones: `leading`, `trailing` or
    /// `linspace` (Lin et al. 2023, table 2). Default: `linspace`.
    pub timestep_spacing: String,
    /// `discrete`, or `continuous`, which with v-prediction gives the model 0.25 * ln(sigma).
    pub timestep_type: String,
    /// Added to every inference timestep (1 in SD 1.x configs). Default: `0`.
    pub steps_offset: usize,
    /// Rescale the betas to zero terminal SNR (Lin et al. 2023); meant for `v_prediction` models.
    /// Default: `false`.
    pub rescale_betas_zero_snr: bool,
    /// The sigma after the last step: `zero`, or `sigma_min` (the first training sigma).
    pub final_sigmas_type: String,
}

impl Default for EulerDiscreteSchedulerConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: "linear".into(),
            trained_betas: None,
            prediction_type: "epsilon".into(),
            interpolation_type: "linear".into(),
            use_karras_sigmas: Some(false),
            use_exponential_sigmas: Some(false),
            use_beta_sigmas: Some(false),
            sigma_min: None,
            sigma_max: None,
            timestep_spacing: "linspace".into(),
            timestep_type: "discrete".into(),
            steps_offset: 0,
            rescale_betas_zero_snr: false,
            final_sigmas_type: "zero".into(),
        }
    }
}

/// The stochastic "churn" of Karras et al. 2022 (algorithm 2): at sigmas in
/// [`s_tmin`, `s_tmax`] the sample is first noised up to sigma * (1 + gamma), with
/// gamma = min(`s_churn` / steps, sqrt(2) - 1) and noise scaled by `s_noise`. The default
/// (no churn) is the deterministic sampler; no noise is drawn then.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Churn {
    /// The churn amount, spread over the steps; 0 (the default) turns churn off.
    pub s_churn: f64,
    /// The smallest sigma that is churned.
    pub s_tmin: f64,
    /// The largest sigma that is churned.
    pub s_tmax: f64,
    /// The scale of the added noise (1 by default).
    pub s_noise: f64,
}

impl Default for Churn {
    fn default() -> Self {
        Churn { s_churn: 0.0, s_tmin: 0.0, s_tmax: f64::INFINITY, s_noise: 1.0 }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Interpolation {
    Linear,
    LogLinear,
}

/// diffusers' `EulerDiscreteScheduler`, built from a [`EulerDiscreteSchedulerConfig`].
pub struct EulerDiscreteScheduler {
    config: EulerDiscreteSchedulerConfig,
    prediction_type: PredictionType,
    interpolation: Interpolation,
    sigma_schedule: SigmaSchedule,
    final_sigma_is_min: bool,
    /// `timestep_type = continuous` with v-prediction: timesteps are 0.25 * ln(sigma).
    continuous_timesteps: bool,
    alphas_cumprod: Vec<f32>,
    /// sqrt((1 - alpha_bar) / alpha_bar) per training timestep, ascending in t.
    training_sigmas: Vec<f32>,
    /// The inference timesteps, and their sigmas (descending) with the final one appended.
    schedule: Schedule,
}

impl EulerDiscreteScheduler {
    /// Builds the scheduler; errors on config values it does not support.
    pub fn new(config: EulerDiscreteSchedulerConfig) -> Result<Self> {
        // diffusers still accepts the old name of `sample` here.
        let prediction_type = match config.prediction_type.as_str() {
            "original_sample" => PredictionType::Sample,
            other => PredictionType::parse(other)?,
        };
        let interpolation = match config.interpolation_type.as_str() {
            "linear" => Interpolation::Linear,
            "log_linear" => Interpolation::LogLinear,
            other => {
                return Err(Error::invalid(format!("interpolation_type `{other}` is not one of linear, log_linear")))
            }
        };
        let sigma_schedule = SigmaSchedule::from_flags(
            config.use_karras_sigmas.unwrap_or(false),
            config.use_exponential_sigmas.unwrap_or(false),
            config.use_beta_sigmas.unwrap_or(false),
        )?;
        let final_sigma_is_min = match config.final_sigmas_type.as_str() {
            "zero" => false,
            "sigma_min" => true,
            other => return Err(Error::invalid(format!("final_sigmas_type `{other}` is not one of zero, sigma_min"))),
        };
        let continuous_timesteps = match config.timestep_type.as_str() {
            "discrete" => false,
            "continuous" => prediction_type == PredictionType::VPrediction,
            other => return Err(Error::invalid(format!("timestep_type `{other}` is not one of discrete, continuous"))),
        };
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
        let mut sigmas: Vec<f32> = training_sigmas.iter().rev().copied().collect();
        let timesteps = if continuous_timesteps {
            sigmas.iter().map(|s| (0.25 * s.ln()) as f64).collect()
        } else {
            (0..config.num_train_timesteps).rev().map(|t| t as f64).collect()
        };
        sigmas.push(0.0);
        let schedule = Schedule::new(timesteps, sigmas);
        Ok(Self {
            config,
            prediction_type,
            interpolation,
            sigma_schedule,
            final_sigma_is_min,
            continuous_timesteps,
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
    pub fn config(&self) -> &EulerDiscreteSchedulerConfig {
        &self.config
    }

    /// The inference sigmas, with the final one (after the last step) appended.
    pub fn sigmas(&self) -> &[f32] {
        &self.schedule.sigmas
    }

    /// alpha_bar_t of every training timestep, in float32 (diffusers' `alphas_cumprod`).
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    /// One Euler step, optionally with churn (diffusers' `step` with `s_churn`, `s_tmin`,
    /// `s_tmax`, `s_noise`); noise is drawn from `generator` only when gamma > 0.
    pub fn step_with_churn(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        churn: Churn,
        generator: &mut TorchGenerator,
    ) -> Result<Tensor> {
        let i = self.schedule.step_index(timestep)?;
        let mut sample = to_f32(sample)?;
        let sigma = self.schedule.sigma(i)?;
        let sigma_next = self.schedule.sigma(i + 1)?;

        let gamma = if churn.s_tmin as f32 <= sigma && sigma <= churn.s_tmax as f32 {
            (churn.s_churn / (self.schedule.sigmas.len() - 1) as f64).min(2f64.sqrt() - 1.0)
        } else {
            0.0
        };
        let sigma_hat = sigma * (gamma + 1.0) as f32;
        if gamma > 0.0 {
            let noise =
                generator.randn_tensor(model_output.dims(), model_output.device())?.to_dtype(model_output.dtype())?;
            let eps = scale(&noise, churn.s_noise as f32)?;
            sample = (sample + scale(&eps, (sigma_hat * sigma_hat - sigma * sigma).sqrt())?)?;
        }

        // 1. x_0 from the model output (epsilon at the churned-up sigma_hat).
        let sigma_for_prediction = if self.prediction_type == PredictionType::Epsilon { sigma_hat } else { sigma };
        let pred_original_sample =
            sigmas::denoised(self.prediction_type, model_output, &sample, sigma_for_prediction)?;

        // 2. The ODE derivative dx/dsigma, and one Euler step to the next sigma.
        let derivative = divide(&(&sample - &pred_original_sample)?, sigma_hat)?;
        let dt = sigma_next - sigma_hat;
        let prev_sample = (sample + scale(&derivative, dt)?)?;

        self.schedule.advance();
        Ok(prev_sample.to_dtype(model_output.dtype())?)
    }
}

impl Scheduler for EulerDiscreteScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let config = &self.config;
        let timesteps = spacing::float32_timesteps(
            &config.timestep_spacing,
            config.num_train_timesteps,
            num_inference_steps,
            config.steps_offset,
        )?;
        let sigmas = match self.interpolation {
            Interpolation::Linear => sigmas::interp(&timesteps, &self.training_sigmas),
            // torch.linspace in float32 from the last log sigma to the first, n + 1 values.
            Interpolation::LogLinear => {
                let first = self.training_sigmas[0].ln();
                let last = self.training_sigmas[self.training_sigmas.len() - 1].ln();
                betas::linspace_f32(last, first, num_inference_steps + 1).into_iter().map(|l| l.exp() as f64).collect()
            }
        };
        let (timesteps, sigmas) = self.sigma_schedule.respace(
            timesteps,
            sigmas,
            &self.training_sigmas,
            num_inference_steps,
            config.sigma_min,
            config.sigma_max,
        );
        let sigma_last = if self.final_sigma_is_min { self.training_sigmas[0] } else { 0.0 };
        let mut sigmas: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();
        sigmas.push(sigma_last);

        let timesteps = if self.continuous_timesteps {
            sigmas[..sigmas.len() - 1].iter().map(|s| (0.25 * s.ln()) as f64).collect()
        } else {
            timesteps.into_iter().map(f64::from).collect()
        };
        self.schedule.set(timesteps, sigmas);
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
        self.step_with_churn(model_output, timestep, sample, Churn::default(), generator)
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
    fn bad_values_name_the_key() {
        let mut map = Map::new();
        map.insert("final_sigmas_type".into(), "one".into());
        let error = EulerDiscreteScheduler::from_config(&map, Path::new("scheduler_config.json")).err().unwrap();
        assert!(error.to_string().contains("scheduler_config.json: final_sigmas_type `one`"), "{error}");
        map.insert("final_sigmas_type".into(), 3.into());
        let error = EulerDiscreteScheduler::from_config(&map, Path::new("scheduler_config.json")).err().unwrap();
        assert!(error.to_string().contains("final_sigmas_type"), "{error}");
        let mut map = Map::new();
        map.insert("use_karras_sigmas".into(), true.into());
        map.insert("use_exponential_sigmas".into(), true.into());
        assert!(EulerDiscreteScheduler::from_config(&map, Path::new("x")).is_err());
    }
}
