//! Port of diffusers/schedulers/scheduling_ddim.py (`DDIMScheduler`): Song et al. 2020,
//! "Denoising Diffusion Implicit Models", with eta interpolating to DDPM.

use std::path::Path;

use candle_core::Tensor;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::betas::{alphas_cumprod, make_betas};
use super::spacing::{check_spacing, integer_timesteps};
use super::{
    add_noise_alphas_cumprod, check_thresholding, clip_or_threshold, epsilon_from_original, predict_epsilon,
    predict_original_sample, timesteps_as_indices, PredictionType, Scheduler,
};
use crate::loading::config::parse_config;
use crate::rng::TorchGenerator;
use crate::{Error, Result};

/// `DDIMScheduler`'s `scheduler_config.json`, with diffusers' names and defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct DdimSchedulerConfig {
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
    /// Added to every inference timestep (1 in SD 1.x configs). Default: `0`.
    pub steps_offset: usize,
    /// What the model predicts: `epsilon` (the noise), `sample` (x0) or `v_prediction`. Default:
    /// `epsilon`.
    pub prediction_type: PredictionType,
    /// Imagen's dynamic thresholding of the predicted x0 (pixel-space models only). Default:
    /// `false`.
    pub thresholding: bool,
    /// The quantile of |x0| at which dynamic thresholding clips. Default: `0.995`.
    pub dynamic_thresholding_ratio: f64,
    /// The bound `clip_sample` clips to. Default: `1.0`.
    pub clip_sample_range: f64,
    /// The largest threshold of dynamic thresholding. Default: `1.0`.
    pub sample_max_value: f64,
    /// How inference timesteps are picked from the training ones: `leading`, `trailing` or
    /// `linspace` (Lin et al. 2023, table 2). Default: `leading`.
    pub timestep_spacing: String,
    /// Rescale the betas to zero terminal SNR (Lin et al. 2023); meant for `v_prediction` models.
    /// Default: `false`.
    pub rescale_betas_zero_snr: bool,
}

impl Default for DdimSchedulerConfig {
    fn default() -> Self {
        DdimSchedulerConfig {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: "linear".into(),
            trained_betas: None,
            clip_sample: true,
            set_alpha_to_one: true,
            steps_offset: 0,
            prediction_type: PredictionType::Epsilon,
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            clip_sample_range: 1.0,
            sample_max_value: 1.0,
            timestep_spacing: "leading".into(),
            rescale_betas_zero_snr: false,
        }
    }
}

/// diffusers' `DDIMScheduler`, built from a [`DdimSchedulerConfig`].
pub struct DdimScheduler {
    config: DdimSchedulerConfig,
    alphas_cumprod: Vec<f32>,
    /// alpha_bar "before" timestep 0, used by the last step: 1, or alpha_bar_0.
    final_alpha_cumprod: f32,
    timesteps: Vec<f64>,
    num_inference_steps: Option<usize>,
}

impl DdimScheduler {
    /// Builds the scheduler; errors on config values it does not support.
    pub fn new(config: DdimSchedulerConfig) -> Result<Self> {
        check_spacing(&config.timestep_spacing)?;
        if config.thresholding {
            check_thresholding(config.dynamic_thresholding_ratio, config.sample_max_value)?;
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
        // The last step has no previous alpha_bar: either 1 (a clean sample) or alpha_bar_0.
        let final_alpha_cumprod = if config.set_alpha_to_one { 1.0 } else { alphas_cumprod[0] };
        let timesteps = (0..config.num_train_timesteps).rev().map(|t| t as f64).collect();
        Ok(DdimScheduler { config, alphas_cumprod, final_alpha_cumprod, timesteps, num_inference_steps: None })
    }

    /// Builds the scheduler from `scheduler_config.json`'s keys (unknown keys ignored, as diffusers
    /// does); `origin` names the file in errors.
    pub fn from_config(map: &Map<String, Value>, origin: &Path) -> Result<Self> {
        Self::new(parse_config(map, origin)?).map_err(|e| e.in_config_file(origin))
    }

    /// The config the scheduler was built from.
    pub fn config(&self) -> &DdimSchedulerConfig {
        &self.config
    }

    /// alpha_bar_t for every training timestep (for training: noising and v targets).
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    fn alpha_prod_at(&self, timestep: i64) -> f32 {
        if timestep >= 0 {
            self.alphas_cumprod[timestep as usize]
        } else {
            self.final_alpha_cumprod
        }
    }

    /// sigma_t^2 / eta^2 (DDIM eq. 16): (1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev).
    fn variance(&self, timestep: usize, prev_timestep: i64) -> f32 {
        let alpha_prod_t = self.alphas_cumprod[timestep];
        let alpha_prod_t_prev = self.alpha_prod_at(prev_timestep);
        let beta_prod_t = 1.0 - alpha_prod_t;
        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;
        (beta_prod_t_prev / beta_prod_t) * (1.0 - alpha_prod_t / alpha_prod_t_prev)
    }

    /// diffusers' `step` with all its options. `use_clipped_model_output` re-derives the noise
    /// prediction from the clipped x_0 (as Glide does); `variance_noise`, when given, is used
    /// instead of drawing from `generator` (CycleDiffusion). Noise is only added when eta > 0.
    #[allow(clippy::too_many_arguments)] // diffusers' `step` signature
    pub fn step_with_options(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        eta: f64,
        use_clipped_model_output: bool,
        variance_noise: Option<&Tensor>,
        generator: &mut TorchGenerator,
    ) -> Result<Tensor> {
        let num_inference_steps =
            self.num_inference_steps.ok_or_else(|| Error::invalid("DDIMScheduler: call set_timesteps before step"))?;
        let timestep = timesteps_as_indices(&[timestep], self.config.num_train_timesteps)?[0];

        // 1. The previous timestep, one stride down (whatever the spacing).
        let prev_timestep = timestep as i64 - (self.config.num_train_timesteps / num_inference_steps) as i64;

        // 2. alphas
        let alpha_prod_t = self.alphas_cumprod[timestep];
        let alpha_prod_t_prev = self.alpha_prod_at(prev_timestep);

        // 3. The predicted x_0 (DDIM eq. 12) and the predicted noise.
        let prediction_type = self.config.prediction_type;
        let pred_original_sample = predict_original_sample(prediction_type, model_output, sample, alpha_prod_t)?;
        let mut pred_epsilon = predict_epsilon(prediction_type, model_output, sample, alpha_prod_t)?;

        // 4. Clip or threshold the predicted x_0.
        let c = &self.config;
        let pred_original_sample = clip_or_threshold(
            pred_original_sample,
            c.thresholding,
            c.dynamic_thresholding_ratio,
            c.sample_max_value,
            c.clip_sample,
            c.clip_sample_range,
        )?;

        // 5. sigma_t(eta) (DDIM eq. 16).
        let variance = self.variance(timestep, prev_timestep);
        let std_dev_t = eta as f32 * variance.sqrt();

        if use_clipped_model_output {
            pred_epsilon = epsilon_from_original(sample, &pred_original_sample, alpha_prod_t)?;
        }

        // 6. The "direction pointing to x_t" (DDIM eq. 12).
        let direction_coeff = (1.0 - alpha_prod_t_prev - std_dev_t * std_dev_t).sqrt();
        let pred_sample_direction = pred_epsilon.affine(direction_coeff as f64, 0.0)?;

        // 7. x_{t-1} without the random noise (DDIM eq. 12).
        let prev_sample = (pred_original_sample.affine(alpha_prod_t_prev.sqrt() as f64, 0.0)? + pred_sample_direction)?;

        if eta > 0.0 {
            let noise = match variance_noise {
                Some(noise) => noise.clone(),
                None => generator
                    .randn_tensor(model_output.dims(), model_output.device())?
                    .to_dtype(model_output.dtype())?,
            };
            return Ok((prev_sample + noise.affine(std_dev_t as f64, 0.0)?)?);
        }
        Ok(prev_sample)
    }
}

impl Scheduler for DdimScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let timesteps = integer_timesteps(
            &self.config.timestep_spacing,
            self.config.num_train_timesteps,
            num_inference_steps,
            self.config.steps_offset,
        )?;
        self.timesteps = timesteps.into_iter().map(|t| t as f64).collect();
        self.num_inference_steps = Some(num_inference_steps);
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        eta: f64,
        generator: &mut TorchGenerator,
    ) -> Result<Tensor> {
        self.step_with_options(model_output, timestep, sample, eta, false, None, generator)
    }

    fn add_noise(&self, original_samples: &Tensor, noise: &Tensor, timesteps: &[f64]) -> Result<Tensor> {
        add_noise_alphas_cumprod(&self.alphas_cumprod, original_samples, noise, timesteps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scheduler(json: serde_json::Value) -> DdimScheduler {
        DdimScheduler::from_config(json.as_object().unwrap(), Path::new("scheduler_config.json")).unwrap()
    }

    #[test]
    fn variance_matches_diffusers() {
        // diffusers tests/schedulers/test_scheduler_ddim.py::test_variance.
        let s = scheduler(serde_json::json!({"clip_sample": true}));
        for (t, prev, expected) in
            [(0, 0, 0.0), (420, 400, 0.14771), (980, 960, 0.32460), (487, 486, 0.00979), (999, 998, 0.02)]
        {
            assert!((s.variance(t, prev) - expected).abs() < 1e-5, "t={t}: {}", s.variance(t, prev));
        }
    }

    #[test]
    fn steps_offset_timesteps() {
        // diffusers test_steps_offset.
        let mut s = scheduler(serde_json::json!({"steps_offset": 1}));
        s.set_timesteps(5).unwrap();
        assert_eq!(s.timesteps(), &[801.0, 601.0, 401.0, 201.0, 1.0]);
        // test_num_inference_steps_zero_raises
        assert!(s.set_timesteps(0).is_err());
    }

    #[test]
    fn step_before_set_timesteps_is_an_error() {
        let mut s = scheduler(serde_json::json!({}));
        let sample = Tensor::zeros((1, 1, 2, 2), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        assert!(s.step(&sample, 10.0, &sample, 0.0, &mut TorchGenerator::new(0)).is_err());
    }
}
