//! Port of diffusers/schedulers/scheduling_ddpm.py (`DDPMScheduler`): ancestral sampling of
//! Ho et al. 2020, "Denoising Diffusion Probabilistic Models".

use std::path::Path;

use candle_core::Tensor;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::betas::{alphas_cumprod, make_betas};
use super::spacing::{check_spacing, integer_timesteps};
use super::{
    add_noise_alphas_cumprod, check_thresholding, clip_or_threshold, predict_original_sample, timesteps_as_indices,
    PredictionType, Scheduler,
};
use crate::loading::config::parse_config;
use crate::rng::TorchGenerator;
use crate::{Error, Result};

/// How the reverse step's variance is chosen (`variance_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VarianceType {
    /// beta_tilde, the posterior variance (DDPM eq. 7).
    FixedSmall,
    /// beta_tilde, applied as exp(0.5 * log(beta_tilde)) (rl-diffuser).
    FixedSmallLog,
    /// beta_t.
    FixedLarge,
    /// log(beta_t) (Glide's max_log), used as if it were a variance, as diffusers does.
    FixedLargeLog,
    /// The model's second half of channels is the variance itself.
    Learned,
    /// The model's second half of channels interpolates between log beta_tilde and log beta_t
    /// (Nichol & Dhariwal 2021, eq. 15).
    LearnedRange,
}

/// `DDPMScheduler`'s `scheduler_config.json`, with diffusers' names and defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct DdpmSchedulerConfig {
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
    /// The variance of each reverse step. Default: `fixed_small`.
    pub variance_type: VarianceType,
    /// Clip the predicted x0 to [-`clip_sample_range`, `clip_sample_range`]. Default: `true`.
    pub clip_sample: bool,
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
    /// Added to every inference timestep (1 in SD 1.x configs). Default: `0`.
    pub steps_offset: usize,
    /// Rescale the betas to zero terminal SNR (Lin et al. 2023); meant for `v_prediction` models.
    /// Default: `false`.
    pub rescale_betas_zero_snr: bool,
}

impl Default for DdpmSchedulerConfig {
    fn default() -> Self {
        DdpmSchedulerConfig {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: "linear".into(),
            trained_betas: None,
            variance_type: VarianceType::FixedSmall,
            clip_sample: true,
            prediction_type: PredictionType::Epsilon,
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            clip_sample_range: 1.0,
            sample_max_value: 1.0,
            timestep_spacing: "leading".into(),
            steps_offset: 0,
            rescale_betas_zero_snr: false,
        }
    }
}

/// diffusers' `DDPMScheduler`, built from a [`DdpmSchedulerConfig`].
pub struct DdpmScheduler {
    config: DdpmSchedulerConfig,
    alphas_cumprod: Vec<f32>,
    timesteps: Vec<f64>,
    num_inference_steps: Option<usize>,
    /// Whether `timesteps` came from `set_custom_timesteps`.
    custom_timesteps: bool,
}

impl DdpmScheduler {
    /// Builds the scheduler; errors on config values it does not support.
    pub fn new(config: DdpmSchedulerConfig) -> Result<Self> {
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
            &["sigmoid", "laplace"],
        )?;
        let alphas_cumprod = alphas_cumprod(&betas, config.rescale_betas_zero_snr);
        // Before `set_timesteps`, every training timestep, descending.
        let timesteps = (0..config.num_train_timesteps).rev().map(|t| t as f64).collect();
        Ok(DdpmScheduler { config, alphas_cumprod, timesteps, num_inference_steps: None, custom_timesteps: false })
    }

    /// Builds the scheduler from `scheduler_config.json`'s keys (unknown keys ignored, as diffusers
    /// does); `origin` names the file in errors.
    pub fn from_config(map: &Map<String, Value>, origin: &Path) -> Result<Self> {
        Self::new(parse_config(map, origin)?).map_err(|e| e.in_config_file(origin))
    }

    /// The config the scheduler was built from.
    pub fn config(&self) -> &DdpmSchedulerConfig {
        &self.config
    }

    /// alpha_bar_t for every training timestep (for training: noising and v targets).
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    /// Uses the given training timesteps (strictly descending, below `num_train_timesteps`)
    /// instead of an evenly spaced schedule: diffusers' `set_timesteps(timesteps=...)`.
    pub fn set_custom_timesteps(&mut self, timesteps: &[i64]) -> Result<()> {
        if timesteps.windows(2).any(|pair| pair[1] >= pair[0]) {
            return Err(Error::invalid("custom timesteps must be in descending order"));
        }
        let num_train_timesteps = self.config.num_train_timesteps as i64;
        if let Some(&first) = timesteps.first() {
            if first >= num_train_timesteps {
                return Err(Error::invalid(format!(
                    "custom timesteps must start below num_train_timesteps ({num_train_timesteps}), got {first}"
                )));
            }
        }
        if let Some(&last) = timesteps.last() {
            if last < 0 {
                return Err(Error::invalid(format!("custom timesteps cannot be negative, got {last}")));
            }
        }
        self.timesteps = timesteps.iter().map(|&t| t as f64).collect();
        self.custom_timesteps = true;
        Ok(())
    }

    /// The timestep the step from `timestep` lands on: the next one in the schedule (-1 after
    /// the last), or `timestep - 1` before any schedule was set.
    pub fn previous_timestep(&self, timestep: usize) -> Result<i64> {
        if self.custom_timesteps || self.num_inference_steps.is_some() {
            let index =
                self.timesteps.iter().position(|&t| t == timestep as f64).ok_or_else(|| {
                    Error::invalid(format!("timestep {timestep} is not in the scheduler's timesteps"))
                })?;
            Ok(self.timesteps.get(index + 1).map_or(-1, |&t| t as i64))
        } else {
            Ok(timestep as i64 - 1)
        }
    }

    /// alpha_bar at `timestep`, and at the previous timestep (1 past the end of the chain).
    fn alpha_prods(&self, timestep: usize) -> Result<(f32, f32)> {
        let prev_timestep = self.previous_timestep(timestep)?;
        let alpha_prod_t = self.alphas_cumprod[timestep];
        let alpha_prod_t_prev = if prev_timestep >= 0 { self.alphas_cumprod[prev_timestep as usize] } else { 1.0 };
        Ok((alpha_prod_t, alpha_prod_t_prev))
    }

    /// The posterior variance beta_tilde_t = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta_t
    /// (DDPM eqs. 6-7), clamped away from 0 because some variance types take its log.
    /// diffusers' `_get_variance` without the learned types, which `step` handles.
    pub fn posterior_variance(&self, timestep: usize) -> Result<f32> {
        let (alpha_prod_t, alpha_prod_t_prev) = self.alpha_prods(timestep)?;
        let current_beta_t = 1.0 - alpha_prod_t / alpha_prod_t_prev;
        let variance = (1.0 - alpha_prod_t_prev) / (1.0 - alpha_prod_t) * current_beta_t;
        Ok(variance.max(1e-20))
    }
}

impl Scheduler for DdpmScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let timesteps = integer_timesteps(
            &self.config.timestep_spacing,
            self.config.num_train_timesteps,
            num_inference_steps,
            self.config.steps_offset,
        )?;
        self.timesteps = timesteps.into_iter().map(|t| t as f64).collect();
        self.num_inference_steps = Some(num_inference_steps);
        self.custom_timesteps = false;
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
        _eta: f64,
        generator: &mut TorchGenerator,
    ) -> Result<Tensor> {
        let t = timesteps_as_indices(&[timestep], self.config.num_train_timesteps)?[0];
        let channels = sample.dim(1)?;
        let learned = matches!(self.config.variance_type, VarianceType::Learned | VarianceType::LearnedRange);
        // A learned-variance model returns [noise prediction, variance] along the channels.
        let (model_output, predicted_variance) = if learned && model_output.dim(1)? == 2 * channels {
            (model_output.narrow(1, 0, channels)?, Some(model_output.narrow(1, channels, channels)?))
        } else {
            (model_output.clone(), None)
        };

        // 1. alphas, betas
        let (alpha_prod_t, alpha_prod_t_prev) = self.alpha_prods(t)?;
        let beta_prod_t = 1.0 - alpha_prod_t;
        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;
        let current_alpha_t = alpha_prod_t / alpha_prod_t_prev;
        let current_beta_t = 1.0 - current_alpha_t;

        // 2. The predicted x_0 (DDPM eq. 15).
        let pred_original_sample =
            predict_original_sample(self.config.prediction_type, &model_output, sample, alpha_prod_t)?;

        // 3. Clip or threshold the predicted x_0.
        let c = &self.config;
        let pred_original_sample = clip_or_threshold(
            pred_original_sample,
            c.thresholding,
            c.dynamic_thresholding_ratio,
            c.sample_max_value,
            c.clip_sample,
            c.clip_sample_range,
        )?;

        // 4-5. The posterior mean mu_t(x_t, x_0) (DDPM eq. 7).
        let pred_original_sample_coeff = alpha_prod_t_prev.sqrt() * current_beta_t / beta_prod_t;
        let current_sample_coeff = current_alpha_t.sqrt() * beta_prod_t_prev / beta_prod_t;
        let pred_prev_sample = (pred_original_sample.affine(pred_original_sample_coeff as f64, 0.0)?
            + sample.affine(current_sample_coeff as f64, 0.0)?)?;

        // 6. Add noise, except on the last step; the generator is only drawn from for t > 0.
        if t == 0 {
            return Ok(pred_prev_sample);
        }
        let variance_noise =
            generator.randn_tensor(model_output.dims(), model_output.device())?.to_dtype(model_output.dtype())?;
        let posterior_variance = self.posterior_variance(t)?;
        let needs_predicted = || {
            predicted_variance.as_ref().ok_or_else(|| {
                Error::invalid(format!(
                    "variance_type {:?} needs a model output with twice the sample's {channels} channels, got shape {:?}",
                    self.config.variance_type,
                    model_output.dims()
                ))
            })
        };
        let noise = match self.config.variance_type {
            VarianceType::FixedSmall => variance_noise.affine(posterior_variance.sqrt() as f64, 0.0)?,
            VarianceType::FixedSmallLog => variance_noise.affine((0.5 * posterior_variance.ln()).exp() as f64, 0.0)?,
            VarianceType::FixedLarge => variance_noise.affine(current_beta_t.sqrt() as f64, 0.0)?,
            // sqrt of a log variance: NaN for beta_t < 1, exactly as diffusers computes it.
            VarianceType::FixedLargeLog => variance_noise.affine(current_beta_t.ln().sqrt() as f64, 0.0)?,
            VarianceType::Learned => needs_predicted()?.sqrt()?.mul(&variance_noise)?,
            VarianceType::LearnedRange => {
                let min_log = posterior_variance.ln() as f64;
                let max_log = current_beta_t.ln() as f64;
                let frac = needs_predicted()?.affine(0.5, 0.5)?;
                let log_variance = (frac.affine(max_log, 0.0)? + frac.affine(-1.0, 1.0)?.affine(min_log, 0.0)?)?;
                log_variance.affine(0.5, 0.0)?.exp()?.mul(&variance_noise)?
            }
        };
        Ok((pred_prev_sample + noise)?)
    }

    fn add_noise(&self, original_samples: &Tensor, noise: &Tensor, timesteps: &[f64]) -> Result<Tensor> {
        add_noise_alphas_cumprod(&self.alphas_cumprod, original_samples, noise, timesteps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scheduler(json: serde_json::Value) -> Result<DdpmScheduler> {
        DdpmScheduler::from_config(json.as_object().unwrap(), Path::new("scheduler_config.json"))
    }

    #[test]
    fn posterior_variance_matches_diffusers() {
        // diffusers tests/schedulers/test_scheduler_ddpm.py::test_variance.
        let s = scheduler(serde_json::json!({})).unwrap();
        assert!((s.posterior_variance(0).unwrap() - 0.0).abs() < 1e-5);
        assert!((s.posterior_variance(487).unwrap() - 0.00979).abs() < 1e-5);
        assert!((s.posterior_variance(999).unwrap() - 0.02).abs() < 1e-5);
    }

    #[test]
    fn custom_timesteps() {
        // diffusers test_custom_timesteps and its invalid cases.
        let mut s = scheduler(serde_json::json!({})).unwrap();
        s.set_custom_timesteps(&[100, 87, 50, 1, 0]).unwrap();
        let prev: Vec<i64> = [100, 87, 50, 1, 0].iter().map(|&t| s.previous_timestep(t).unwrap()).collect();
        assert_eq!(prev, vec![87, 50, 1, 0, -1]);
        assert!(s.previous_timestep(2).is_err());
        assert!(s.set_custom_timesteps(&[100, 87, 50, 51, 0]).is_err());
        assert!(s.set_custom_timesteps(&[1000]).is_err());
    }

    #[test]
    fn bad_config_values_name_the_key() {
        let err = scheduler(serde_json::json!({"prediction_type": "noise"})).err().unwrap().to_string();
        assert!(err.contains("prediction_type") && err.contains("noise"), "{err}");
        let err = scheduler(serde_json::json!({"variance_type": "wide"})).err().unwrap().to_string();
        assert!(err.contains("variance_type") && err.contains("wide"), "{err}");
        let err = scheduler(serde_json::json!({"timestep_spacing": "even"})).err().unwrap().to_string();
        assert!(err.contains("scheduler_config.json") && err.contains("even"), "{err}");
        let err = scheduler(serde_json::json!({"num_train_timesteps": "many"})).err().unwrap().to_string();
        assert!(err.contains("num_train_timesteps"), "{err}");
    }

    #[test]
    fn step_rejects_timesteps_outside_training_range() {
        let mut s = scheduler(serde_json::json!({})).unwrap();
        let sample = Tensor::zeros((1, 3, 2, 2), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        let mut generator = TorchGenerator::new(0);
        assert!(s.step(&sample, 1000.0, &sample, 0.0, &mut generator).is_err());
        assert!(s.step(&sample, 2.5, &sample, 0.0, &mut generator).is_err());
    }

    #[test]
    fn velocity_from_alphas_cumprod_matches_diffusers() {
        // diffusers' `get_velocity`, recorded by tools/fixtures/schedulers.py.
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/schedulers");
        let tensors =
            candle_core::safetensors::load(dir.join("ddpm_v_prediction_noclip.safetensors"), &candle_core::Device::Cpu)
                .unwrap();
        let config: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("ddpm_v_prediction_noclip.json")).unwrap()).unwrap();
        let s = scheduler(config["config"].clone()).unwrap();
        let t: Vec<f64> = tensors["add_noise_timesteps"].to_vec1().unwrap();
        let velocity = super::super::get_velocity(
            s.alphas_cumprod(),
            &tensors["add_noise_original"],
            &tensors["add_noise_noise"],
            &t,
        )
        .unwrap();
        let diff = (velocity - &tensors["velocity"]).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
    }
}
