//! The noise process: beta schedules, forward noising and the reverse samplers, each a
//! port of one diffusers scheduler file, configured from `scheduler_config.json`.

pub mod betas;
pub mod ddim;
pub mod ddim_inverse;
pub mod ddpm;
pub mod dpmsolver_multistep;
pub mod euler_ancestral_discrete;
pub mod euler_discrete;
pub mod heun_discrete;
pub mod lcm;
pub mod lms_discrete;
pub mod pndm;
pub mod sigmas;
pub mod spacing;
pub mod tcd;
pub mod unipc_multistep;

use std::path::Path;

use candle_core::Tensor;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::rng::TorchGenerator;
use crate::{Error, Result};

/// The diffusers scheduler classes we implement, by `_class_name`.
pub const SUPPORTED_CLASSES: &[&str] = &[
    "DDPMScheduler",
    "DDIMScheduler",
    "DDIMInverseScheduler",
    "PNDMScheduler",
    "LMSDiscreteScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "UniPCMultistepScheduler",
    "LCMScheduler",
    "TCDScheduler",
];

/// Builds a scheduler of diffusers class `class_name` from a config object (a
/// `scheduler_config.json`, possibly another scheduler's: keys it states are kept, the
/// rest take this scheduler's defaults, as diffusers' `from_config` does).
pub fn from_config(class_name: &str, config: &Map<String, Value>, origin: &Path) -> Result<Box<dyn Scheduler>> {
    Ok(match class_name {
        "DDPMScheduler" => Box::new(ddpm::DdpmScheduler::from_config(config, origin)?),
        "DDIMScheduler" => Box::new(ddim::DdimScheduler::from_config(config, origin)?),
        "DDIMInverseScheduler" => Box::new(ddim_inverse::DdimInverseScheduler::from_config(config, origin)?),
        "PNDMScheduler" => Box::new(pndm::PndmScheduler::from_config(config, origin)?),
        "LMSDiscreteScheduler" => Box::new(lms_discrete::LMSDiscreteScheduler::from_config(config, origin)?),
        "EulerDiscreteScheduler" => Box::new(euler_discrete::EulerDiscreteScheduler::from_config(config, origin)?),
        "EulerAncestralDiscreteScheduler" => {
            Box::new(euler_ancestral_discrete::EulerAncestralDiscreteScheduler::from_config(config, origin)?)
        }
        "HeunDiscreteScheduler" => Box::new(heun_discrete::HeunDiscreteScheduler::from_config(config, origin)?),
        "DPMSolverMultistepScheduler" => Box::new(dpmsolver_multistep::DpmSolverMultistepScheduler::from_config(config, origin)?),
        "UniPCMultistepScheduler" => Box::new(unipc_multistep::UniPcMultistepScheduler::from_config(config, origin)?),
        "LCMScheduler" => Box::new(lcm::LcmScheduler::from_config(config, origin)?),
        "TCDScheduler" => Box::new(tcd::TcdScheduler::from_config(config, origin)?),
        other => {
            return Err(Error::config(
                origin,
                format!("scheduler class `{other}` is not supported (supported: {})", SUPPORTED_CLASSES.join(", ")),
            ))
        }
    })
}

/// The contract every sampler shares, as diffusers' `SchedulerMixin` defines it.
///
/// Timesteps are `f64` because some schedulers (Euler, LMS, Heun) hand the model fractional
/// float32 timesteps; integer schedulers (DDPM, DDIM, PNDM) hold whole numbers.
pub trait Scheduler: Send {
    /// Chooses the inference timesteps (and sigmas) for `num_inference_steps` steps, and
    /// resets any multistep state.
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()>;

    /// The timesteps the pipeline visits, in order (after `set_timesteps`).
    fn timesteps(&self) -> &[f64];

    /// The standard deviation of the initial noise: 1 for DDPM-style schedulers (the
    /// default), the largest sigma for sigma-parameterised ones.
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    /// Scales the denoising model input: the identity (the default) except for
    /// sigma-parameterised schedulers.
    fn scale_model_input(&mut self, sample: &Tensor, _timestep: f64) -> Result<Tensor> {
        Ok(sample.clone())
    }

    /// One reverse step: from the model output at `timestep` and the current sample, the
    /// previous sample. `eta` is DDIM's stochasticity and TCD's gamma (ignored by the others); noise, when a
    /// scheduler needs it, is drawn from `generator` with the shape of `model_output`.
    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        eta: f64,
        generator: &mut TorchGenerator,
    ) -> Result<Tensor>;

    /// Forward noising q(x_t | x_0) at one timestep per batch item (or one for all).
    fn add_noise(&self, original_samples: &Tensor, noise: &Tensor, timesteps: &[f64]) -> Result<Tensor>;

    /// The `eta` that diffusers' `step` defaults to when none is passed (TCD's gamma 0.3; 0
    /// for the others, where it means deterministic or is ignored).
    fn default_eta(&self) -> f64 {
        0.0
    }

    /// Refuses an `eta` this scheduler's `step` would refuse, so pipelines can check it up front.
    fn check_eta(&self, _eta: f64) -> Result<()> {
        Ok(())
    }

    /// `set_timesteps` for image-to-image with the scheduler applying `strength` itself, as
    /// diffusers' LCM and TCD do (`set_timesteps(..., strength=)`); the others are given the
    /// full schedule and the pipeline skips its start (`get_timesteps`).
    fn set_timesteps_with_strength(&mut self, _num_inference_steps: usize, _strength: f64) -> Result<()> {
        Err(Error::invalid("this scheduler does not apply strength in set_timesteps; skip the first timesteps instead"))
    }

    /// How many model evaluations make one step of the method (2 for Heun, 1 otherwise).
    fn order(&self) -> usize {
        1
    }

    /// For image-to-image: the index of the first timestep the pipeline will use.
    fn set_begin_index(&mut self, _begin_index: usize) {}
}

/// What the denoising model predicts (`prediction_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    /// The noise that was added.
    Epsilon,
    /// The clean sample x_0.
    Sample,
    /// v = sqrt(alpha_bar) * noise - sqrt(1 - alpha_bar) * x_0 (Salimans & Ho 2022; Imagen
    /// Video, section 2.4).
    VPrediction,
}

impl PredictionType {
    /// Parses `prediction_type` for the configs that keep it as a string.
    pub fn parse(value: &str) -> Result<Self> {
        match value {
            "epsilon" => Ok(Self::Epsilon),
            "sample" => Ok(Self::Sample),
            "v_prediction" => Ok(Self::VPrediction),
            other => Err(Error::invalid(format!(
                "prediction_type `{other}` is not one of epsilon, sample, v_prediction"
            ))),
        }
    }

    /// The config's spelling.
    pub fn name(self) -> &'static str {
        match self {
            Self::Epsilon => "epsilon",
            Self::Sample => "sample",
            Self::VPrediction => "v_prediction",
        }
    }
}

/// Checks that a string config value is one of `allowed`, naming the key otherwise.
pub(crate) fn check_one_of(key: &str, value: &str, allowed: &[&str]) -> Result<()> {
    if allowed.contains(&value) {
        Ok(())
    } else {
        Err(Error::invalid(format!("`{key}` `{value}` is not one of {}", allowed.join(", "))))
    }
}

/// The multistep solvers keep `solver_order` past outputs: a config's order is checked before
/// that history is allocated (the configs in use have 1 to 3; 16 leaves room).
pub(crate) fn check_solver_order(order: usize) -> Result<()> {
    const MAX_SOLVER_ORDER: usize = 16;
    match order {
        0 => Err(Error::invalid("`solver_order` must be at least 1")),
        1..=MAX_SOLVER_ORDER => Ok(()),
        _ => Err(Error::invalid(format!("`solver_order` {order} is more than diffuse supports ({MAX_SOLVER_ORDER})"))),
    }
}

/// Per-batch-item coefficients as a `[B, 1, 1, ...]` tensor that broadcasts over `like`.
pub(crate) fn per_item(values: &[f32], like: &Tensor) -> Result<Tensor> {
    let mut shape = vec![values.len()];
    shape.extend(std::iter::repeat(1).take(like.rank().saturating_sub(1)));
    Ok(Tensor::from_slice(values, shape, like.device())?.to_dtype(like.dtype())?)
}

// ---- What the DDPM family (DDPM, DDIM, DDIM inverse, PNDM) shares: the alpha_bar form ----

/// `sqrt(alpha_bar_t) * x0 + sqrt(1 - alpha_bar_t) * noise` for integer-timestep schedulers
/// (diffusers' `DDPMScheduler.add_noise`).
pub(crate) fn add_noise_alphas_cumprod(
    alphas_cumprod: &[f32],
    original_samples: &Tensor,
    noise: &Tensor,
    timesteps: &[f64],
) -> Result<Tensor> {
    let (sqrt_alpha_prod, sqrt_one_minus_alpha_prod) = sqrt_alpha_prods(alphas_cumprod, timesteps, original_samples)?;
    Ok((original_samples.broadcast_mul(&sqrt_alpha_prod)? + noise.broadcast_mul(&sqrt_one_minus_alpha_prod)?)?)
}

/// `sqrt(alpha_bar_t) * noise - sqrt(1 - alpha_bar_t) * x0`: the v-prediction target
/// (Salimans & Ho 2022), diffusers' `get_velocity`.
pub fn get_velocity(alphas_cumprod: &[f32], sample: &Tensor, noise: &Tensor, timesteps: &[f64]) -> Result<Tensor> {
    let (sqrt_alpha_prod, sqrt_one_minus_alpha_prod) = sqrt_alpha_prods(alphas_cumprod, timesteps, sample)?;
    Ok((noise.broadcast_mul(&sqrt_alpha_prod)? - sample.broadcast_mul(&sqrt_one_minus_alpha_prod)?)?)
}

/// sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t) per batch item, shaped to broadcast over `like`.
fn sqrt_alpha_prods(alphas_cumprod: &[f32], timesteps: &[f64], like: &Tensor) -> Result<(Tensor, Tensor)> {
    let t = timesteps_as_indices(timesteps, alphas_cumprod.len())?;
    let sqrt_alpha: Vec<f32> = t.iter().map(|&t| alphas_cumprod[t].sqrt()).collect();
    let sqrt_one_minus: Vec<f32> = t.iter().map(|&t| (1.0 - alphas_cumprod[t]).sqrt()).collect();
    Ok((per_item(&sqrt_alpha, like)?, per_item(&sqrt_one_minus, like)?))
}

fn timesteps_as_indices(timesteps: &[f64], num_train_timesteps: usize) -> Result<Vec<usize>> {
    timesteps
        .iter()
        .map(|&t| {
            if t < 0.0 || t.fract() != 0.0 || t as usize >= num_train_timesteps {
                Err(Error::invalid(format!(
                    "timestep {t} is not an integer in 0..{num_train_timesteps}"
                )))
            } else {
                Ok(t as usize)
            }
        })
        .collect()
}

/// x_0 from the model output at alpha_bar_t (DDPM eq. 15 for epsilon), as the DDPM family
/// (DDPM, DDIM, DDIM inverse) computes it.
pub(crate) fn predict_original_sample(
    prediction_type: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    alpha_prod_t: f32,
) -> Result<Tensor> {
    let beta_prod_t = 1.0 - alpha_prod_t;
    Ok(match prediction_type {
        PredictionType::Epsilon => (sample - model_output.affine(beta_prod_t.sqrt() as f64, 0.0)?)?
            .affine(1.0 / alpha_prod_t.sqrt() as f64, 0.0)?,
        PredictionType::Sample => model_output.clone(),
        PredictionType::VPrediction => {
            (sample.affine(alpha_prod_t.sqrt() as f64, 0.0)? - model_output.affine(beta_prod_t.sqrt() as f64, 0.0)?)?
        }
    })
}

/// The noise from the model output at alpha_bar_t (DDIM's `pred_epsilon`, PNDM's v conversion).
pub(crate) fn predict_epsilon(
    prediction_type: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    alpha_prod_t: f32,
) -> Result<Tensor> {
    let beta_prod_t = 1.0 - alpha_prod_t;
    Ok(match prediction_type {
        PredictionType::Epsilon => model_output.clone(),
        PredictionType::Sample => epsilon_from_original(sample, model_output, alpha_prod_t)?,
        PredictionType::VPrediction => {
            (model_output.affine(alpha_prod_t.sqrt() as f64, 0.0)? + sample.affine(beta_prod_t.sqrt() as f64, 0.0)?)?
        }
    })
}

/// The noise implied by x_0 at alpha_bar_t: (x_t - sqrt(alpha_bar_t) x_0) / sqrt(1 - alpha_bar_t).
pub(crate) fn epsilon_from_original(
    sample: &Tensor,
    pred_original_sample: &Tensor,
    alpha_prod_t: f32,
) -> Result<Tensor> {
    let beta_prod_t = 1.0 - alpha_prod_t;
    Ok((sample - pred_original_sample.affine(alpha_prod_t.sqrt() as f64, 0.0)?)?
        .affine(1.0 / beta_prod_t.sqrt() as f64, 0.0)?)
}

/// Step 3 of DDPM's and DDIM's `step`: the predicted x_0 dynamically thresholded
/// (`thresholding`), or else clipped to +-`clip_sample_range` (`clip_sample`).
pub(crate) fn clip_or_threshold(
    pred_original_sample: Tensor,
    thresholding: bool,
    dynamic_thresholding_ratio: f64,
    sample_max_value: f64,
    clip_sample: bool,
    clip_sample_range: f64,
) -> Result<Tensor> {
    if thresholding {
        threshold_sample(&pred_original_sample, dynamic_thresholding_ratio, sample_max_value)
    } else if clip_sample {
        Ok(pred_original_sample.clamp(-clip_sample_range, clip_sample_range)?)
    } else {
        Ok(pred_original_sample)
    }
}

// ---- Dynamic thresholding (DDPM, DDIM, DPM-Solver, UniPC) ----

/// Dynamic thresholding takes a quantile (the ratio must be in [0, 1]) and divides by a
/// positive bound.
pub(crate) fn check_thresholding(dynamic_thresholding_ratio: f64, sample_max_value: f64) -> Result<()> {
    if !(0.0..=1.0).contains(&dynamic_thresholding_ratio) {
        return Err(Error::invalid(format!(
            "dynamic_thresholding_ratio must be in [0, 1], got {dynamic_thresholding_ratio}"
        )));
    }
    if sample_max_value.is_nan() || sample_max_value <= 0.0 {
        return Err(Error::invalid(format!("sample_max_value must be positive, got {sample_max_value}")));
    }
    Ok(())
}

/// Dynamic thresholding (Saharia et al. 2022, Imagen, section 2.3), diffusers'
/// `_threshold_sample`: per batch item, s = the `ratio` quantile of |x0| clamped to
/// [1, max_value]; x0 is clamped to [-s, s] and divided by s.
pub(crate) fn threshold_sample(sample: &Tensor, ratio: f64, max_value: f64) -> Result<Tensor> {
    let dims = sample.dims().to_vec();
    let batch = dims[0];
    let flat = sample.to_dtype(candle_core::DType::F32)?.reshape((batch, ()))?;
    let rows = flat.to_vec2::<f32>()?;
    let mut out = Vec::with_capacity(flat.elem_count());
    for row in rows {
        if row.is_empty() {
            continue;
        }
        let mut sorted: Vec<f32> = row.iter().map(|v| v.abs()).collect();
        sorted.sort_by(|a, b| a.total_cmp(b));
        // torch.quantile's default linear interpolation.
        let pos = ratio * (sorted.len() - 1) as f64;
        let lower = pos.floor() as usize;
        let upper = (lower + 1).min(sorted.len() - 1);
        let frac = (pos - lower as f64) as f32;
        let q = sorted[lower] + (sorted[upper] - sorted[lower]) * frac;
        // torch.clamp(q, min=1, max=max_value) is min(max(q, 1), max_value), even when max_value < 1.
        let s = q.max(1.0).min(max_value as f32);
        out.extend(row.iter().map(|v| v.max(-s).min(s) / s));
    }
    Ok(Tensor::from_vec(out, dims, sample.device())?.to_dtype(sample.dtype())?)
}
