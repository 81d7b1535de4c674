//! Port of diffusers/schedulers/scheduling_lcm.py (`LCMScheduler`, diffusers 0.42.1): multistep
//! consistency sampling (Luo et al. 2023, "Latent Consistency Models", algorithm 3).

use std::path::Path;

use candle_core::Tensor;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::betas::{alphas_cumprod, make_betas};
use super::sigmas::Schedule;
use super::{
    add_noise_alphas_cumprod, check_thresholding, clip_or_threshold, predict_original_sample, timesteps_as_indices,
    PredictionType, Scheduler,
};
use crate::loading::config::parse_config;
use crate::rng::TorchGenerator;
use crate::{Error, Result};

/// `LCMScheduler`'s `scheduler_config.json`, with diffusers' names and defaults.
/// `TCDScheduler` has the same keys and defaults. `timestep_spacing` and `steps_offset` are
/// accepted but unused, as in diffusers (the schedule is always LCM's own).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct LcmSchedulerConfig {
    /// Timesteps of the training noise schedule. Default: `1000`.
    pub num_train_timesteps: usize,
    /// The noise schedule's first beta. Default: `0.00085`.
    pub beta_start: f64,
    /// The noise schedule's last beta. Default: `0.012`.
    pub beta_end: f64,
    /// How the betas go from `beta_start` to `beta_end`: `linear`, `scaled_linear` (linear in
    /// sqrt(beta), Stable Diffusion's) or `squaredcos_cap_v2` (the cosine schedule). Default:
    /// `scaled_linear`.
    pub beta_schedule: String,
    /// Betas given outright, in place of the schedule. Default: none.
    pub trained_betas: Option<Vec<f64>>,
    /// Steps of the distillation schedule from which inference timesteps are drawn. Default: `50`.
    pub original_inference_steps: usize,
    /// Clip the predicted x0 to [-`clip_sample_range`, `clip_sample_range`]. Default: `false`.
    pub clip_sample: bool,
    /// The bound `clip_sample` clips to. Default: `1.0`.
    pub clip_sample_range: f64,
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
    /// The largest threshold of dynamic thresholding. Default: `1.0`.
    pub sample_max_value: f64,
    /// How inference timesteps are picked from the training ones: `leading`, `trailing` or
    /// `linspace` (Lin et al. 2023, table 2). Default: `leading`.
    pub timestep_spacing: String,
    /// Scales t in the boundary-condition scalings c_skip and c_out. Default: `10.0`.
    pub timestep_scaling: f64,
    /// Rescale the betas to zero terminal SNR (Lin et al. 2023); meant for `v_prediction` models.
    /// Default: `false`.
    pub rescale_betas_zero_snr: bool,
}

impl Default for LcmSchedulerConfig {
    fn default() -> Self {
        LcmSchedulerConfig {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: "scaled_linear".into(),
            trained_betas: None,
            original_inference_steps: 50,
            clip_sample: false,
            clip_sample_range: 1.0,
            set_alpha_to_one: true,
            steps_offset: 0,
            prediction_type: PredictionType::Epsilon,
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            sample_max_value: 1.0,
            timestep_spacing: "leading".into(),
            timestep_scaling: 10.0,
            rescale_betas_zero_snr: false,
        }
    }
}

impl LcmSchedulerConfig {
    /// The checks and alpha_bar schedule both `__init__`s share.
    pub(crate) fn alphas_cumprod(&self) -> Result<Vec<f32>> {
        if self.thresholding {
            check_thresholding(self.dynamic_thresholding_ratio, self.sample_max_value)?;
        }
        if !self.timestep_scaling.is_finite() {
            return Err(Error::invalid(format!("timestep_scaling must be a finite number, got {}", self.timestep_scaling)));
        }
        let betas = make_betas(
            &self.beta_schedule,
            self.beta_start,
            self.beta_end,
            self.num_train_timesteps,
            self.trained_betas.as_deref(),
            &[],
        )?;
        Ok(alphas_cumprod(&betas, self.rescale_betas_zero_snr))
    }
}

/// One step's results: the next sample, and the model's x_0 estimate after the boundary
/// condition (`denoised`; TCD's `pred_noised_sample`), for previews.
pub struct ConsistencyStepOutput {
    /// The sample for the next step.
    pub prev_sample: Tensor,
    /// The consistency function's estimate of x0 at this step.
    pub denoised: Tensor,
}

/// diffusers' `LCMScheduler`, built from a [`LcmSchedulerConfig`].
pub struct LcmScheduler {
    config: LcmSchedulerConfig,
    alphas_cumprod: Vec<f32>,
    schedule: Schedule,
    num_inference_steps: Option<usize>,
}

impl LcmScheduler {
    /// Builds the scheduler; errors on config values it does not support.
    pub fn new(config: LcmSchedulerConfig) -> Result<Self> {
        let alphas_cumprod = config.alphas_cumprod()?;
        let schedule = Schedule::new(training_timesteps(config.num_train_timesteps), Vec::new());
        Ok(LcmScheduler { config, alphas_cumprod, schedule, num_inference_steps: None })
    }

    /// Builds the scheduler from `scheduler_config.json`'s keys (unknown keys ignored, as diffusers
    /// does); `origin` names the file in errors.
    pub fn from_config(map: &Map<String, Value>, origin: &Path) -> Result<Self> {
        Self::new(parse_config(map, origin)?).map_err(|e| e.in_config_file(origin))
    }

    /// The config the scheduler was built from.
    pub fn config(&self) -> &LcmSchedulerConfig {
        &self.config
    }

    /// alpha_bar_t of every training timestep, in float32 (diffusers' `alphas_cumprod`).
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    /// diffusers' `set_timesteps(num_inference_steps, original_inference_steps=, strength=)`:
    /// `num_inference_steps` evenly spaced (by index) from the `original_inference_steps`
    /// timesteps of the distillation schedule, of which only the first `strength` part is
    /// used (image-to-image).
    pub fn set_timesteps_with_options(
        &mut self,
        num_inference_steps: usize,
        original_inference_steps: Option<usize>,
        strength: f64,
    ) -> Result<()> {
        let num_train_timesteps = self.config.num_train_timesteps;
        let original_steps = original_inference_steps.unwrap_or(self.config.original_inference_steps);
        let origin = distillation_timesteps(num_train_timesteps, original_steps, strength)?;
        check_num_inference_steps(num_inference_steps, num_train_timesteps, origin.len(), original_steps, strength)?;
        let timesteps = select_inference_timesteps(&origin, num_inference_steps);
        self.schedule.set(timesteps, Vec::new());
        self.num_inference_steps = Some(num_inference_steps);
        Ok(())
    }

    /// diffusers' `get_scalings_for_boundary_condition_discrete`: c_skip and c_out of the
    /// consistency function f(x, t) = c_skip(t) x + c_out(t) x_0(x, t) (LCM eq. 9), with
    /// sigma_data 0.5 and t scaled by `timestep_scaling` (so that both are near 0 and 1 for all
    /// but the smallest t). In f32, as torch computes them from the integer timestep tensor
    /// (`0.25 / x` is `x.reciprocal() * 0.25` in torch).
    pub fn boundary_condition_scalings(&self, timestep: usize) -> (f32, f32) {
        let sigma_data_squared = 0.25f32;
        let scaled_timestep = timestep as f32 * self.config.timestep_scaling as f32;
        let denominator = scaled_timestep * scaled_timestep + sigma_data_squared;
        let c_skip = denominator.recip() * sigma_data_squared;
        let c_out = scaled_timestep / denominator.sqrt();
        (c_skip, c_out)
    }

    /// diffusers' `step`, returning `denoised` as well.
    pub fn step_with_output(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        generator: &mut TorchGenerator,
    ) -> Result<ConsistencyStepOutput> {
        let num_inference_steps = self.num_inference_steps.ok_or_else(|| not_set("LCMScheduler"))?;
        let t = timesteps_as_indices(&[timestep], self.config.num_train_timesteps)?[0];
        let step_index = self.schedule.step_index(timestep)?;

        // 1. The next timestep; the last step has none and uses its own.
        let prev_timestep = match self.schedule.timesteps.get(step_index + 1) {
            Some(&prev) => timesteps_as_indices(&[prev], self.config.num_train_timesteps)?[0],
            None => t,
        };

        // 2. alphas
        let alpha_prod_t = self.alphas_cumprod[t];
        let alpha_prod_t_prev = self.alphas_cumprod[prev_timestep];

        // 3. Boundary-condition scalings.
        let (c_skip, c_out) = self.boundary_condition_scalings(t);

        // 4-5. The predicted x_0, clipped or thresholded.
        let c = &self.config;
        let pred_original_sample = predict_original_sample(c.prediction_type, model_output, sample, alpha_prod_t)?;
        let pred_original_sample = clip_or_threshold(
            pred_original_sample,
            c.thresholding,
            c.dynamic_thresholding_ratio,
            c.sample_max_value,
            c.clip_sample,
            c.clip_sample_range,
        )?;

        // 6. The consistency function's output.
        let denoised = (pred_original_sample.affine(c_out as f64, 0.0)? + sample.affine(c_skip as f64, 0.0)?)?;

        // 7. Noise it again to the next timestep (LCM's multistep sampling); not after the
        //    last step, so one-step sampling draws no noise.
        let prev_sample = if step_index + 1 != num_inference_steps {
            let noise = draw_noise(generator, model_output, &denoised)?;
            (denoised.affine(alpha_prod_t_prev.sqrt() as f64, 0.0)?
                + noise.affine((1.0 - alpha_prod_t_prev).sqrt() as f64, 0.0)?)?
        } else {
            denoised.clone()
        };

        self.schedule.advance();
        Ok(ConsistencyStepOutput { prev_sample, denoised })
    }
}

impl Scheduler for LcmScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        self.set_timesteps_with_options(num_inference_steps, None, 1.0)
    }

    fn set_timesteps_with_strength(&mut self, num_inference_steps: usize, strength: f64) -> Result<()> {
        self.set_timesteps_with_options(num_inference_steps, None, strength)
    }

    fn timesteps(&self) -> &[f64] {
        &self.schedule.timesteps
    }

    /// LCM's step has no eta: the noise between steps is always full.
    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        _eta: f64,
        generator: &mut TorchGenerator,
    ) -> Result<Tensor> {
        Ok(self.step_with_output(model_output, timestep, sample, generator)?.prev_sample)
    }

    fn add_noise(&self, original_samples: &Tensor, noise: &Tensor, timesteps: &[f64]) -> Result<Tensor> {
        add_noise_alphas_cumprod(&self.alphas_cumprod, original_samples, noise, timesteps)
    }

    fn set_begin_index(&mut self, begin_index: usize) {
        self.schedule.set_begin_index(begin_index);
    }
}

// ---- What LCM and TCD share: the schedule of `set_timesteps` ----

/// `np.arange(0, num_train_timesteps)[::-1]`, the timesteps before `set_timesteps`.
pub(crate) fn training_timesteps(num_train_timesteps: usize) -> Vec<f64> {
    (0..num_train_timesteps).rev().map(|t| t as f64).collect()
}

pub(crate) fn not_set(class_name: &str) -> Error {
    Error::invalid(format!("{class_name}: call set_timesteps before step"))
}

/// `strength` must be a fraction of the schedule; `int(steps * strength)` is how many of
/// `steps` it keeps (Python truncates toward zero).
pub(crate) fn strength_part(steps: usize, strength: f64) -> Result<usize> {
    if !(strength.is_finite() && (0.0..=1.0).contains(&strength)) {
        return Err(Error::invalid(format!("strength must be between 0 and 1, got {strength}")));
    }
    Ok((steps as f64 * strength) as usize)
}

/// LCM's distillation schedule, ascending: the first `strength` part of
/// `np.arange(1, original_steps + 1) * k - 1` with skipping step k = T // original_steps.
pub(crate) fn distillation_timesteps(num_train_timesteps: usize, original_steps: usize, strength: f64) -> Result<Vec<i64>> {
    if original_steps == 0 {
        return Err(Error::invalid("original_inference_steps must be at least 1"));
    }
    if original_steps > num_train_timesteps {
        return Err(Error::invalid(format!(
            "original_inference_steps {original_steps} cannot be larger than num_train_timesteps {num_train_timesteps}"
        )));
    }
    let k = num_train_timesteps / original_steps;
    let kept = strength_part(original_steps, strength)?;
    // i * k <= original_steps * k <= num_train_timesteps, so nothing overflows.
    Ok((1..=kept).map(|i| (i * k) as i64 - 1).collect())
}

/// The checks of diffusers' `set_timesteps` on `num_inference_steps`, in its order; `available`
/// is the length of the distillation schedule the steps are drawn from.
pub(crate) fn check_num_inference_steps(
    num_inference_steps: usize,
    num_train_timesteps: usize,
    available: usize,
    original_steps: usize,
    strength: f64,
) -> Result<()> {
    if num_inference_steps == 0 {
        return Err(Error::invalid("the number of inference steps must be at least 1"));
    }
    if num_inference_steps > num_train_timesteps {
        return Err(Error::invalid(format!(
            "{num_inference_steps} inference steps cannot be more than num_train_timesteps {num_train_timesteps}"
        )));
    }
    // Every step must be a distinct timestep of the distillation schedule (diffusers raises
    // the same ValueError when the steps exceed original_inference_steps x strength).
    if num_inference_steps > available {
        let limit = if strength == 1.0 {
            format!("original_inference_steps ({original_steps})")
        } else {
            format!("original_inference_steps x strength ({original_steps} x {strength} = {available})")
        };
        return Err(Error::invalid(format!(
            "{num_inference_steps} inference steps cannot be more than {limit}: the steps are taken from that schedule; \
             use at most {available} steps{}",
            if strength == 1.0 { " or raise original_inference_steps" } else { " or raise the strength" }
        )));
    }
    Ok(())
}

/// `num_inference_steps` timesteps from the (ascending) distillation schedule, descending, at
/// the indices `floor(np.linspace(0, len, num_inference_steps, endpoint=False))` of its reverse.
pub(crate) fn select_inference_timesteps(origin: &[i64], num_inference_steps: usize) -> Vec<f64> {
    let reversed: Vec<i64> = origin.iter().rev().copied().collect();
    // numpy's linspace without endpoint: i * (len / num), computed in f64.
    let step = reversed.len() as f64 / num_inference_steps as f64;
    (0..num_inference_steps).map(|i| reversed[(i as f64 * step).floor() as usize] as f64).collect()
}

/// `randn_tensor(model_output.shape, generator, dtype=like.dtype)`.
pub(crate) fn draw_noise(generator: &mut TorchGenerator, model_output: &Tensor, like: &Tensor) -> Result<Tensor> {
    Ok(generator.randn_tensor(model_output.dims(), model_output.device())?.to_dtype(like.dtype())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scheduler(json: Value) -> LcmScheduler {
        LcmScheduler::from_config(json.as_object().unwrap(), Path::new("scheduler_config.json")).unwrap()
    }

    #[test]
    fn default_schedule() {
        // LCMScheduler().set_timesteps(4) in diffusers 0.42.1.
        let mut s = scheduler(serde_json::json!({}));
        s.set_timesteps(4).unwrap();
        assert_eq!(s.timesteps(), &[999.0, 759.0, 499.0, 259.0]);
        s.set_timesteps(1).unwrap();
        assert_eq!(s.timesteps(), &[999.0]);
    }

    #[test]
    fn more_steps_than_original_inference_steps_is_refused() {
        let mut s = scheduler(serde_json::json!({"original_inference_steps": 20}));
        let error = s.set_timesteps(21).unwrap_err().to_string();
        assert!(error.contains("original_inference_steps (20)"), "{error}");
        assert!(s.set_timesteps(20).is_ok());
        let error = s.set_timesteps_with_options(12, None, 0.5).unwrap_err().to_string();
        assert!(error.contains("20 x 0.5 = 10"), "{error}");
        assert!(s.set_timesteps(0).is_err());
        assert!(s.set_timesteps_with_options(4, None, 1.5).is_err());
        assert!(s.set_timesteps_with_options(4, Some(0), 1.0).is_err());
        assert!(s.set_timesteps_with_options(4, Some(1001), 1.0).is_err());
    }

    #[test]
    fn step_before_set_timesteps_is_an_error() {
        let mut s = scheduler(serde_json::json!({}));
        let sample = Tensor::zeros((1, 1, 2, 2), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        assert!(s.step(&sample, 999.0, &sample, 0.0, &mut TorchGenerator::new(0)).is_err());
    }
}
