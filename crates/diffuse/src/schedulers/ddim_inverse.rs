//! Port of diffusers/schedulers/scheduling_ddim_inverse.py (`DDIMInverseScheduler`): the
//! deterministic DDIM step run backwards, from an image towards noise (DDIM inversion).

use std::path::Path;

use candle_core::Tensor;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::betas::{alphas_cumprod, make_betas};
use super::spacing::integer_timesteps;
use super::{predict_epsilon, predict_original_sample, timesteps_as_indices, PredictionType, Scheduler};
use crate::loading::config::parse_config;
use crate::rng::TorchGenerator;
use crate::{Error, Result};

/// `DDIMInverseScheduler`'s `scheduler_config.json`, with diffusers' names and defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct DdimInverseSchedulerConfig {
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
    /// Clip the predicted x0 to [-`clip_sample_range`, `clip_sample_range`]. Default: `true`.
    pub clip_sample: bool,
    /// Take alpha_bar = 1 for the step after the last (else the first training alpha_bar). Default:
    /// `true`.
    pub set_alpha_to_one: bool,
    /// Deprecated spelling of `set_alpha_to_one`; when present it wins, as in diffusers.
    pub set_alpha_to_zero: Option<bool>,
    /// Added to every inference timestep (1 in SD 1.x configs). Default: `0`.
    pub steps_offset: usize,
    /// What the model predicts: `epsilon` (the noise), `sample` (x0) or `v_prediction`. Default:
    /// `epsilon`.
    pub prediction_type: PredictionType,
    /// The bound `clip_sample` clips to. Default: `1.0`.
    pub clip_sample_range: f64,
    /// How inference timesteps are picked from the training ones: `leading`, `trailing` or
    /// `linspace` (Lin et al. 2023, table 2). Default: `leading`.
    pub timestep_spacing: String,
    /// Rescale the betas to zero terminal SNR (Lin et al. 2023); meant for `v_prediction` models.
    /// Default: `false`.
    pub rescale_betas_zero_snr: bool,
}

impl Default for DdimInverseSchedulerConfig {
    fn default() -> Self {
        DdimInverseSchedulerConfig {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: "linear".into(),
            trained_betas: None,
            clip_sample: true,
            set_alpha_to_one: true,
            set_alpha_to_zero: None,
            steps_offset: 0,
            prediction_type: PredictionType::Epsilon,
            clip_sample_range: 1.0,
            timestep_spacing: "leading".into(),
            rescale_betas_zero_snr: false,
        }
    }
}

/// diffusers' `DDIMInverseScheduler`, built from a [`DdimInverseSchedulerConfig`].
pub struct DdimInverseScheduler {
    config: DdimInverseSchedulerConfig,
    alphas_cumprod: Vec<f32>,
    /// alpha_bar "before" timestep 0, used by the first step: 1, or alpha_bar_0.
    initial_alpha_cumprod: f32,
    timesteps: Vec<f64>,
    num_inference_steps: Option<usize>,
}

impl DdimInverseScheduler {
    /// Builds the scheduler; errors on config values it does not support.
    pub fn new(config: DdimInverseSchedulerConfig) -> Result<Self> {
        match config.timestep_spacing.as_str() {
            "leading" | "trailing" => {}
            other => {
                return Err(Error::invalid(format!(
                    "timestep_spacing `{other}` is not one of leading, trailing (DDIMInverseScheduler)"
                )))
            }
        }
        let betas = make_betas(
            &config.beta_schedule,
            config.beta_start,
            config.beta_end,
            config.num_train_timesteps,
            config.trained_betas.as_deref(),
            &[],
        )?;
        let alphas_cumprod = alphas_cumprod(&betas, config.rescale_betas_zero_snr);
        // The first step starts below timestep 0: either from alpha_bar = 1 (so the step just
        // returns the predicted noise direction) or from alpha_bar_0.
        let set_alpha_to_one = config.set_alpha_to_zero.unwrap_or(config.set_alpha_to_one);
        let initial_alpha_cumprod = if set_alpha_to_one { 1.0 } else { alphas_cumprod[0] };
        let timesteps = (0..config.num_train_timesteps).map(|t| t as f64).collect();
        Ok(DdimInverseScheduler { config, alphas_cumprod, initial_alpha_cumprod, timesteps, num_inference_steps: None })
    }

    /// Builds the scheduler from `scheduler_config.json`'s keys (unknown keys ignored, as diffusers
    /// does); `origin` names the file in errors.
    pub fn from_config(map: &Map<String, Value>, origin: &Path) -> Result<Self> {
        Self::new(parse_config(map, origin)?).map_err(|e| e.in_config_file(origin))
    }

    /// The config the scheduler was built from.
    pub fn config(&self) -> &DdimInverseSchedulerConfig {
        &self.config
    }

    /// alpha_bar_t for every training timestep.
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }
}

impl Scheduler for DdimInverseScheduler {
    /// The forward schedule's timesteps, ascending.
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let timesteps = integer_timesteps(
            &self.config.timestep_spacing,
            self.config.num_train_timesteps,
            num_inference_steps,
            self.config.steps_offset,
        )?;
        self.timesteps = timesteps.into_iter().rev().map(|t| t as f64).collect();
        self.num_inference_steps = Some(num_inference_steps);
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// From x at one stride below `timestep` to x at `timestep` (deterministic: eta and the
    /// generator are unused).
    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        _eta: f64,
        _generator: &mut TorchGenerator,
    ) -> Result<Tensor> {
        let num_inference_steps = self
            .num_inference_steps
            .ok_or_else(|| Error::invalid("DDIMInverseScheduler: call set_timesteps before step"))?;
        let num_train_timesteps = self.config.num_train_timesteps;

        // 1. The step goes from `timestep` minus one stride (the current noise level) up to
        //    `timestep` (called "prev" as in the forward scheduler).
        let prev_timestep = timesteps_as_indices(&[timestep], num_train_timesteps)?[0];
        let timestep = (prev_timestep as i64 - (num_train_timesteps / num_inference_steps) as i64)
            .min(num_train_timesteps as i64 - 1);

        // 2. alphas; the current noise level matches the forward process exactly.
        let alpha_prod_t =
            if timestep >= 0 { self.alphas_cumprod[timestep as usize] } else { self.initial_alpha_cumprod };
        let alpha_prod_t_prev = self.alphas_cumprod[prev_timestep];

        // 3. The predicted x_0 and noise (DDIM eq. 12).
        let prediction_type = self.config.prediction_type;
        let pred_original_sample = predict_original_sample(prediction_type, model_output, sample, alpha_prod_t)?;
        let pred_epsilon = predict_epsilon(prediction_type, model_output, sample, alpha_prod_t)?;

        // 4. Clip the predicted x_0 (this scheduler has no thresholding).
        let pred_original_sample = if self.config.clip_sample {
            let range = self.config.clip_sample_range;
            pred_original_sample.clamp(-range, range)?
        } else {
            pred_original_sample
        };

        // 5-6. x at the next noise level (DDIM eq. 12 with sigma = 0).
        let pred_sample_direction = pred_epsilon.affine((1.0 - alpha_prod_t_prev).sqrt() as f64, 0.0)?;
        Ok((pred_original_sample.affine(alpha_prod_t_prev.sqrt() as f64, 0.0)? + pred_sample_direction)?)
    }

    /// diffusers' `DDIMInverseScheduler` has no `add_noise`: inversion produces the noise.
    fn add_noise(&self, _original_samples: &Tensor, _noise: &Tensor, _timesteps: &[f64]) -> Result<Tensor> {
        Err(Error::invalid("DDIMInverseScheduler has no add_noise (as in diffusers)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scheduler(json: serde_json::Value) -> Result<DdimInverseScheduler> {
        DdimInverseScheduler::from_config(json.as_object().unwrap(), Path::new("scheduler_config.json"))
    }

    #[test]
    fn steps_offset_timesteps() {
        // diffusers tests/schedulers/test_scheduler_ddim_inverse.py::test_steps_offset.
        let mut s = scheduler(serde_json::json!({"steps_offset": 1})).unwrap();
        s.set_timesteps(5).unwrap();
        assert_eq!(s.timesteps(), &[1.0, 201.0, 401.0, 601.0, 801.0]);
    }

    #[test]
    fn trailing_timesteps_ascend() {
        let mut s = scheduler(serde_json::json!({"timestep_spacing": "trailing"})).unwrap();
        s.set_timesteps(4).unwrap();
        assert_eq!(s.timesteps(), &[249.0, 499.0, 749.0, 999.0]);
    }

    #[test]
    fn deprecated_set_alpha_to_zero_wins() {
        let s = scheduler(serde_json::json!({"set_alpha_to_one": true, "set_alpha_to_zero": false})).unwrap();
        assert_eq!(s.initial_alpha_cumprod, s.alphas_cumprod[0]);
        let s = scheduler(serde_json::json!({"set_alpha_to_one": true})).unwrap();
        assert_eq!(s.initial_alpha_cumprod, 1.0);
    }

    #[test]
    fn linspace_is_rejected() {
        let err = scheduler(serde_json::json!({"timestep_spacing": "linspace"})).err().unwrap().to_string();
        assert!(err.contains("linspace"), "{err}");
    }

    #[test]
    fn timestep_past_training_range_is_an_error() {
        // 1000 steps with steps_offset 1 reach timestep 1000, which diffusers would index out of range.
        let mut s = scheduler(serde_json::json!({"steps_offset": 1})).unwrap();
        s.set_timesteps(1000).unwrap();
        let sample = Tensor::zeros((1, 1, 2, 2), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        let last = *s.timesteps().last().unwrap();
        assert!(s.step(&sample, last, &sample, 0.0, &mut TorchGenerator::new(0)).is_err());
    }
}
