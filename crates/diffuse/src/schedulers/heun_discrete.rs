//! Port of diffusers/schedulers/scheduling_heun_discrete.py (`HeunDiscreteScheduler`): Heun's
//! second-order method on the probability-flow ODE in sigma (Karras et al. 2022, algorithm 1).
//! Each step takes two model evaluations, so every timestep but the first is listed twice:
//! the first visit makes an Euler step and remembers it, the second corrects it with the
//! average of the two derivatives.

use std::path::Path;

use candle_core::Tensor;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::sigmas::{self, divide, scale, Schedule, SigmaSchedule};
use super::{betas, spacing, PredictionType, Scheduler};
use crate::loading::config::parse_config;
use crate::rng::TorchGenerator;
use crate::Result;

/// `HeunDiscreteScheduler`'s `scheduler_config.json`, with diffusers' names and defaults.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct HeunDiscreteSchedulerConfig {
    /// Timesteps of the training noise schedule. Default: `1000`.
    pub num_train_timesteps: usize,
    /// The noise schedule's first beta. Default: `0.00085`.
    pub beta_start: f64,
    /// The noise schedule's last beta. Default: `0.012`.
    pub beta_end: f64,
    /// `linear`, `scaled_linear`, `squaredcos_cap_v2` or `exp`.
    pub beta_schedule: String,
    /// Betas given outright, in place of the schedule. Default: none.
    pub trained_betas: Option<Vec<f64>>,
    /// What the model predicts: `epsilon` (the noise), `sample` (x0) or `v_prediction`. Default:
    /// `epsilon`.
    pub prediction_type: String,
    /// Karras et al. 2022 sigmas (rho = 7) in place of the training ones. Default: `false`.
    pub use_karras_sigmas: Option<bool>,
    /// Sigmas evenly spaced in log sigma. Default: `false`.
    pub use_exponential_sigmas: Option<bool>,
    /// Sigmas at the quantiles of Beta(0.6, 0.6) (Lee et al. 2024); refused here.
    pub use_beta_sigmas: Option<bool>,
    /// Clip the predicted x0 to [-`clip_sample_range`, `clip_sample_range`]. Default: `false`.
    pub clip_sample: bool,
    /// The bound `clip_sample` clips to. Default: `1.0`.
    pub clip_sample_range: f64,
    /// How inference timesteps are picked from the training ones: `leading`, `trailing` or
    /// `linspace` (Lin et al. 2023, table 2). Default: `linspace`.
    pub timestep_spacing: String,
    /// Added to every inference timestep (1 in SD 1.x configs). Default: `0`.
    pub steps_offset: usize,
    /// Not Heun's own keys: diffusers keeps those of another scheduler's config
    /// (EulerDiscrete's) and its Karras/exponential sigmas use them as bounds when set.
    pub sigma_min: Option<f64>,
    /// The largest sigma of Karras, exponential and beta sigmas (default: the training schedule's).
    /// Default: none.
    pub sigma_max: Option<f64>,
}

impl Default for HeunDiscreteSchedulerConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: "linear".into(),
            trained_betas: None,
            prediction_type: "epsilon".into(),
            use_karras_sigmas: Some(false),
            use_exponential_sigmas: Some(false),
            use_beta_sigmas: Some(false),
            clip_sample: false,
            clip_sample_range: 1.0,
            timestep_spacing: "linspace".into(),
            steps_offset: 0,
            sigma_min: None,
            sigma_max: None,
        }
    }
}

/// What the first (Euler) half of a step leaves for the second.
struct FirstOrderState {
    derivative: Tensor,
    dt: f32,
    sample: Tensor,
}

/// diffusers' `HeunDiscreteScheduler`, built from a [`HeunDiscreteSchedulerConfig`].
pub struct HeunDiscreteScheduler {
    config: HeunDiscreteSchedulerConfig,
    prediction_type: PredictionType,
    sigma_schedule: SigmaSchedule,
    alphas_cumprod: Vec<f32>,
    training_sigmas: Vec<f32>,
    /// Timesteps [t_0, t_1, t_1, ..., t_{n-1}, t_{n-1}] and sigmas
    /// [s_0, s_1, s_1, s_2, s_2, ..., s_{n-1}, s_{n-1}, 0].
    schedule: Schedule,
    /// Set between the two halves of a step.
    first_order: Option<FirstOrderState>,
}

impl HeunDiscreteScheduler {
    /// Builds the scheduler; errors on config values it does not support.
    pub fn new(config: HeunDiscreteSchedulerConfig) -> Result<Self> {
        let prediction_type = PredictionType::parse(&config.prediction_type)?;
        let sigma_schedule = SigmaSchedule::from_flags(
            config.use_karras_sigmas.unwrap_or(false),
            config.use_exponential_sigmas.unwrap_or(false),
            config.use_beta_sigmas.unwrap_or(false),
        )?;
        spacing::check_spacing(&config.timestep_spacing)?;
        let betas = betas::make_betas(
            &config.beta_schedule,
            config.beta_start,
            config.beta_end,
            config.num_train_timesteps,
            config.trained_betas.as_deref(),
            &["exp"],
        )?;
        let alphas_cumprod = sigmas::alphas_cumprod(&betas, false);
        let training_sigmas = sigmas::training_sigmas(&alphas_cumprod);
        let mut scheduler = Self {
            config,
            prediction_type,
            sigma_schedule,
            alphas_cumprod,
            training_sigmas,
            schedule: Schedule::default(),
            first_order: None,
        };
        // As diffusers' constructor: a schedule over every training timestep.
        scheduler.set_timesteps(scheduler.config.num_train_timesteps)?;
        Ok(scheduler)
    }

    /// Builds the scheduler from `scheduler_config.json`'s keys (unknown keys ignored, as diffusers
    /// does); `origin` names the file in errors.
    pub fn from_config(map: &Map<String, Value>, origin: &Path) -> Result<Self> {
        Self::new(parse_config(map, origin)?).map_err(|e| e.in_config_file(origin))
    }

    /// The config the scheduler was built from.
    pub fn config(&self) -> &HeunDiscreteSchedulerConfig {
        &self.config
    }

    /// The (duplicated) inference sigmas, with the final 0 appended.
    pub fn sigmas(&self) -> &[f32] {
        &self.schedule.sigmas
    }

    /// alpha_bar_t of every training timestep, in float32 (diffusers' `alphas_cumprod`).
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    /// True before the first half of a step (the next `step` makes an Euler step).
    pub fn state_in_first_order(&self) -> bool {
        self.first_order.is_none()
    }
}

impl Scheduler for HeunDiscreteScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let config = &self.config;
        let timesteps = spacing::float32_timesteps(
            &config.timestep_spacing,
            config.num_train_timesteps,
            num_inference_steps,
            config.steps_offset,
        )?;
        let sigmas = sigmas::interp(&timesteps, &self.training_sigmas);
        let (timesteps, sigmas) = self.sigma_schedule.respace(
            timesteps,
            sigmas,
            &self.training_sigmas,
            num_inference_steps,
            config.sigma_min,
            config.sigma_max,
        );
        let sigmas: Vec<f32> = sigmas.into_iter().map(|s| s as f32).chain([0.0]).collect();

        // Every sigma but the first and the final 0 twice; every timestep but the first twice.
        let last = sigmas.len() - 1;
        self.schedule.set(
            std::iter::once(timesteps[0]).chain(timesteps[1..].iter().flat_map(|&t| [t, t])).map(f64::from).collect(),
            std::iter::once(sigmas[0])
                .chain(sigmas[1..last].iter().flat_map(|&s| [s, s]))
                .chain(std::iter::once(sigmas[last]))
                .collect(),
        );
        self.first_order = None;
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
        _generator: &mut TorchGenerator,
    ) -> Result<Tensor> {
        let i = self.schedule.step_index(timestep)?;
        let first_order = self.first_order.is_none();
        let (sigma, sigma_next) = if first_order {
            (self.schedule.sigma(i)?, self.schedule.sigma(i + 1)?)
        } else {
            (self.schedule.sigma(i.wrapping_sub(1))?, self.schedule.sigma(i)?)
        };
        // No churn in diffusers' Heun: gamma = 0, so sigma_hat = sigma.
        let sigma_hat = sigma;

        // 1. x_0 from the model output, evaluated at sigma_hat (first half) or sigma_next.
        let sigma_input = if first_order { sigma_hat } else { sigma_next };
        let mut pred_original_sample = sigmas::denoised(self.prediction_type, model_output, sample, sigma_input)?;
        if self.config.clip_sample {
            let range = self.config.clip_sample_range as f32;
            pred_original_sample = pred_original_sample.clamp(-range, range)?;
        }

        let prev_sample = match self.first_order.take() {
            // 2a. Euler step to sigma_next, remembered for the correction.
            None => {
                let derivative = divide(&(sample - &pred_original_sample)?, sigma_hat)?;
                let dt = sigma_next - sigma_hat;
                let prev_sample = (sample + scale(&derivative, dt)?)?;
                self.first_order = Some(FirstOrderState { derivative, dt, sample: sample.clone() });
                prev_sample
            }
            // 2b. Redo the step from the remembered sample with the mean of both derivatives.
            Some(state) => {
                let derivative = divide(&(sample - &pred_original_sample)?, sigma_next)?;
                let derivative = divide(&(state.derivative + derivative)?, 2.0)?;
                (state.sample + scale(&derivative, state.dt)?)?
            }
        };
        self.schedule.advance();
        Ok(prev_sample)
    }

    fn add_noise(&self, original_samples: &Tensor, noise: &Tensor, timesteps: &[f64]) -> Result<Tensor> {
        self.schedule.add_noise(original_samples, noise, timesteps)
    }

    fn order(&self) -> usize {
        2
    }

    fn set_begin_index(&mut self, begin_index: usize) {
        self.schedule.set_begin_index(begin_index);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timesteps_and_sigmas_are_duplicated() {
        let mut heun = HeunDiscreteScheduler::new(HeunDiscreteSchedulerConfig::default()).unwrap();
        heun.set_timesteps(3).unwrap();
        let t = heun.timesteps().to_vec();
        assert_eq!(t.len(), 5);
        assert_eq!((t[1], t[3]), (t[2], t[4]));
        let s = heun.sigmas();
        assert_eq!(s.len(), 6);
        assert_eq!((s[1], s[3], s[5]), (s[2], s[4], 0.0));
    }
}
