//! Port of diffusers/schedulers/scheduling_tcd.py (`TCDScheduler`, diffusers 0.42.1): strategic
//! stochastic sampling (Zheng et al. 2024, "Trajectory Consistency Distillation", section 4.3),
//! whose gamma (`eta`) sets how far back each step jumps and how much noise it adds again.

use std::path::Path;

use candle_core::Tensor;
use serde_json::{Map, Value};

use super::lcm::{
    check_num_inference_steps, distillation_timesteps, draw_noise, not_set, select_inference_timesteps, strength_part,
    training_timesteps, ConsistencyStepOutput, LcmSchedulerConfig,
};
use super::sigmas::Schedule;
use super::{add_noise_alphas_cumprod, predict_epsilon, predict_original_sample, timesteps_as_indices, Scheduler};
use crate::loading::config::parse_config;
use crate::rng::TorchGenerator;
use crate::{Error, Result};

/// `TCDScheduler`'s `scheduler_config.json`: the same keys and defaults as `LCMScheduler`'s
/// (TCD ignores the clipping and thresholding keys too).
pub type TcdSchedulerConfig = LcmSchedulerConfig;

/// TCDScheduler.step's own default gamma, used when none is given.
pub const DEFAULT_ETA: f64 = 0.3;

/// diffusers' `TCDScheduler`, built from a [`TcdSchedulerConfig`].
pub struct TcdScheduler {
    config: TcdSchedulerConfig,
    alphas_cumprod: Vec<f32>,
    schedule: Schedule,
    num_inference_steps: Option<usize>,
}

impl TcdScheduler {
    /// Builds the scheduler; errors on config values it does not support.
    pub fn new(config: TcdSchedulerConfig) -> Result<Self> {
        let alphas_cumprod = config.alphas_cumprod()?;
        let schedule = Schedule::new(training_timesteps(config.num_train_timesteps), Vec::new());
        Ok(TcdScheduler { config, alphas_cumprod, schedule, num_inference_steps: None })
    }

    /// Builds the scheduler from `scheduler_config.json`'s keys (unknown keys ignored, as diffusers
    /// does); `origin` names the file in errors.
    pub fn from_config(map: &Map<String, Value>, origin: &Path) -> Result<Self> {
        Self::new(parse_config(map, origin)?).map_err(|e| e.in_config_file(origin))
    }

    /// The config the scheduler was built from.
    pub fn config(&self) -> &TcdSchedulerConfig {
        &self.config
    }

    /// alpha_bar_t of every training timestep, in float32 (diffusers' `alphas_cumprod`).
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    /// diffusers' `set_timesteps(num_inference_steps, original_inference_steps=, strength=)`.
    /// Without `original_inference_steps` the steps are drawn from LCM's distillation schedule
    /// (of the config's `original_inference_steps`); given one, from every training timestep
    /// (the value then only bounds the number of steps).
    pub fn set_timesteps_with_options(
        &mut self,
        num_inference_steps: usize,
        original_inference_steps: Option<usize>,
        strength: f64,
    ) -> Result<()> {
        let num_train_timesteps = self.config.num_train_timesteps;
        let (origin, original_steps) = match original_inference_steps {
            None => {
                let original_steps = self.config.original_inference_steps;
                (distillation_timesteps(num_train_timesteps, original_steps, strength)?, original_steps)
            }
            Some(original_steps) => {
                let kept = strength_part(num_train_timesteps, strength)?;
                ((0..kept as i64).collect(), original_steps)
            }
        };
        check_num_inference_steps(num_inference_steps, num_train_timesteps, origin.len(), original_steps, strength)?;
        if num_inference_steps > original_steps {
            return Err(Error::invalid(format!(
                "{num_inference_steps} inference steps cannot be more than original_inference_steps ({original_steps})"
            )));
        }
        let timesteps = select_inference_timesteps(&origin, num_inference_steps);
        self.schedule.set(timesteps, Vec::new());
        self.num_inference_steps = Some(num_inference_steps);
        Ok(())
    }

    /// diffusers' `step` with gamma `eta` in [0, 1], returning `pred_noised_sample` as `denoised`.
    pub fn step_with_output(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        eta: f64,
        generator: &mut TorchGenerator,
    ) -> Result<ConsistencyStepOutput> {
        let num_inference_steps = self.num_inference_steps.ok_or_else(|| not_set("TCDScheduler"))?;
        self.check_eta(eta)?;
        let num_train_timesteps = self.config.num_train_timesteps;
        let t = timesteps_as_indices(&[timestep], num_train_timesteps)?[0];
        let step_index = self.schedule.step_index(timestep)?;

        // 1. The next timestep (0 after the last step), and s, the earlier one the step jumps
        //    to before noising back up to it.
        let prev_timestep = match self.schedule.timesteps.get(step_index + 1) {
            Some(&prev) => timesteps_as_indices(&[prev], num_train_timesteps)?[0],
            None => 0,
        };
        let timestep_s = jump_timestep(eta, prev_timestep);

        // 2. alphas
        let alpha_prod_t = self.alphas_cumprod[t];
        let alpha_prod_t_prev = self.alphas_cumprod[prev_timestep];
        let alpha_prod_s = self.alphas_cumprod[timestep_s];
        let beta_prod_s = 1.0 - alpha_prod_s;

        // 3. The predicted noised sample x_s, from the predicted x_0 and noise.
        let prediction_type = self.config.prediction_type;
        let pred_original_sample = predict_original_sample(prediction_type, model_output, sample, alpha_prod_t)?;
        let pred_epsilon = predict_epsilon(prediction_type, model_output, sample, alpha_prod_t)?;
        let pred_noised_sample = (pred_original_sample.affine(alpha_prod_s.sqrt() as f64, 0.0)?
            + pred_epsilon.affine(beta_prod_s.sqrt() as f64, 0.0)?)?;

        // 4. Forward from s to prev with fresh noise, except after the last step (so gamma 0
        //    and one-step sampling draw none).
        let prev_sample = if eta > 0.0 && step_index + 1 != num_inference_steps {
            let noise = draw_noise(generator, model_output, &pred_noised_sample)?;
            let ratio = alpha_prod_t_prev / alpha_prod_s;
            (pred_noised_sample.affine(ratio.sqrt() as f64, 0.0)? + noise.affine((1.0 - ratio).sqrt() as f64, 0.0)?)?
        } else {
            pred_noised_sample.clone()
        };

        self.schedule.advance();
        Ok(ConsistencyStepOutput { prev_sample, denoised: pred_noised_sample })
    }
}

/// s = floor((1 - gamma) * prev), in f32 as torch multiplies the integer timestep tensor by a
/// Python float (in f64, floor(0.7 * 90) would be 62, not 63).
fn jump_timestep(eta: f64, prev_timestep: usize) -> usize {
    ((1.0 - eta) as f32 * prev_timestep as f32).floor() as usize
}

impl Scheduler for TcdScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        self.set_timesteps_with_options(num_inference_steps, None, 1.0)
    }

    fn set_timesteps_with_strength(&mut self, num_inference_steps: usize, strength: f64) -> Result<()> {
        self.set_timesteps_with_options(num_inference_steps, None, strength)
    }

    fn timesteps(&self) -> &[f64] {
        &self.schedule.timesteps
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        eta: f64,
        generator: &mut TorchGenerator,
    ) -> Result<Tensor> {
        Ok(self.step_with_output(model_output, timestep, sample, eta, generator)?.prev_sample)
    }

    fn default_eta(&self) -> f64 {
        DEFAULT_ETA
    }

    /// diffusers asserts 0 <= gamma <= 1.
    fn check_eta(&self, eta: f64) -> Result<()> {
        if !(0.0..=1.0).contains(&eta) {
            return Err(Error::invalid(format!("TCDScheduler: eta (gamma) must be between 0 and 1, got {eta}")));
        }
        Ok(())
    }

    fn add_noise(&self, original_samples: &Tensor, noise: &Tensor, timesteps: &[f64]) -> Result<Tensor> {
        add_noise_alphas_cumprod(&self.alphas_cumprod, original_samples, noise, timesteps)
    }

    fn set_begin_index(&mut self, begin_index: usize) {
        self.schedule.set_begin_index(begin_index);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scheduler(json: Value) -> TcdScheduler {
        TcdScheduler::from_config(json.as_object().unwrap(), Path::new("scheduler_config.json")).unwrap()
    }

    #[test]
    fn schedules() {
        let mut s = scheduler(serde_json::json!({}));
        s.set_timesteps(4).unwrap();
        assert_eq!(s.timesteps(), &[999.0, 759.0, 499.0, 259.0]);
        // With original_inference_steps given, every training timestep is a candidate.
        s.set_timesteps_with_options(4, Some(50), 1.0).unwrap();
        assert_eq!(s.timesteps(), &[999.0, 749.0, 499.0, 249.0]);
        assert!(s.set_timesteps_with_options(51, Some(50), 1.0).is_err());
        assert!(s.set_timesteps(51).is_err());
    }

    #[test]
    fn jump_timestep_is_computed_in_f32() {
        // torch.floor((1 - eta) * torch.tensor(prev)) in torch 2.15.
        for (eta, prev, expected) in [(0.3, 90, 63), (0.3, 350, 245), (0.3, 500, 350), (0.1, 10, 9), (1.0, 759, 0), (0.0, 759, 759)] {
            assert_eq!(jump_timestep(eta, prev), expected, "eta {eta}, prev {prev}");
        }
    }

    #[test]
    fn gamma_outside_unit_interval_is_refused() {
        let mut s = scheduler(serde_json::json!({}));
        s.set_timesteps(2).unwrap();
        let sample = Tensor::zeros((1, 1, 2, 2), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        let error = s.step(&sample, 999.0, &sample, 1.5, &mut TorchGenerator::new(0)).unwrap_err().to_string();
        assert!(error.contains("eta (gamma)") && error.contains("1.5"), "{error}");
        assert_eq!(s.default_eta(), 0.3);
    }
}
