//! The sigma form of the noise schedule, shared by diffusers' sigma-parameterised schedulers:
//! the "Karras-style" Euler family (diffusers/schedulers/scheduling_euler_discrete.py and its
//! copies in scheduling_lms_discrete.py, scheduling_euler_ancestral_discrete.py,
//! scheduling_heun_discrete.py) and the multistep DPM-Solver and UniPC
//! (scheduling_dpmsolver_multistep.py, scheduling_unipc_multistep.py).
//!
//! These schedulers work with sigma = sqrt((1 - alpha_bar) / alpha_bar): the Euler family with
//! x_t = x_0 + sigma * noise (variance exploding), the multistep ones with the variance
//! preserving x_t = alpha_t * x_0 + sigma_t * noise, where alpha_t = 1 / sqrt(sigma^2 + 1) and
//! sigma_t = sigma * alpha_t. diffusers computes the training sigmas in float32 with torch,
//! interpolates them with numpy in float64 and stores the result as float32, and does the
//! per-step scalar arithmetic on float32 0-d tensors; we keep each of those choices.

use candle_core::{DType, Tensor};

use super::{betas, per_item, spacing, PredictionType};
use crate::{Error, Result};

// ---- The training schedule in sigma form ----

/// `torch.cumprod(1 - betas)` (betas rescaled to zero terminal SNR when asked). The last value
/// is then 2^-24 instead of 0 (the smallest positive f16 subnormal), so that the first sigma
/// is finite (4096) rather than infinite.
pub fn alphas_cumprod(betas: &[f32], rescale_betas_zero_snr: bool) -> Vec<f32> {
    let mut alphas_cumprod = betas::alphas_cumprod(betas, rescale_betas_zero_snr);
    if rescale_betas_zero_snr {
        if let Some(last) = alphas_cumprod.last_mut() {
            *last = 2f32.powi(-24);
        }
    }
    alphas_cumprod
}

/// sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) for every training timestep, ascending in t,
/// in f32 as torch computes it.
pub fn training_sigmas(alphas_cumprod: &[f32]) -> Vec<f32> {
    alphas_cumprod.iter().map(|&a| ((1.0 - a) / a).sqrt()).collect()
}

/// diffusers' `_sigma_to_alpha_sigma_t` for the variance-preserving schedule:
/// alpha_t = 1 / sqrt(sigma^2 + 1), sigma_t = sigma * alpha_t.
pub fn alpha_sigma_t(sigma: f32) -> (f32, f32) {
    let alpha_t = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha_t, sigma * alpha_t)
}

/// The half log-SNR lambda_t = log(alpha_t) - log(sigma_t) (+inf when sigma_t is 0).
pub fn lambda(alpha_t: f32, sigma_t: f32) -> f32 {
    alpha_t.ln() - sigma_t.ln()
}

// ---- The inference sigmas and their timesteps ----

/// `np.interp(x, np.arange(len(fp)), fp)`: piecewise-linear in f64, clamped to the ends.
pub fn interp(x: &[f32], fp: &[f32]) -> Vec<f64> {
    let last = fp.len().saturating_sub(1);
    x.iter()
        .map(|&x| {
            let x = x as f64;
            if fp.is_empty() || x.is_nan() {
                return f64::NAN;
            }
            if x <= 0.0 {
                return fp[0] as f64;
            }
            if x >= last as f64 {
                return fp[last] as f64;
            }
            let j = x.floor() as usize;
            if j as f64 == x {
                return fp[j] as f64;
            }
            // The grid is 0, 1, 2, ...: the slope is the difference of neighbours.
            let slope = fp[j + 1] as f64 - fp[j] as f64;
            slope * (x - j as f64) + fp[j] as f64
        })
        .collect()
}

/// diffusers' `_sigma_to_t`: the fractional timestep whose log sigma is `sigma`'s, by linear
/// interpolation between the neighbouring training log sigmas (float32 `log_sigmas`, with the
/// same mix of f32 and f64 arithmetic as numpy).
pub fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    if log_sigmas.len() < 2 {
        return 0.0;
    }
    let log_sigma = sigma.max(1e-10).ln();
    // low_idx = cumsum(log_sigma >= log_sigmas).argmax(), clipped: the last index whose log
    // sigma is not above ours (0 if none), at most len - 2.
    let low_idx = log_sigmas
        .iter()
        .rposition(|&l| log_sigma - l as f64 >= 0.0)
        .unwrap_or(0)
        .min(log_sigmas.len() - 2);
    let high_idx = low_idx + 1;
    let low = log_sigmas[low_idx];
    let high = log_sigmas[high_idx];
    let w = ((low as f64 - log_sigma) / (low - high) as f64).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

/// Karras et al. 2022, eq. 5: sigmas evenly spaced in sigma^(1/rho), rho = 7, from
/// `sigma_max` down to `sigma_min` (float64, as in k-diffusion).
pub fn karras_sigmas(sigma_min: f64, sigma_max: f64, num_inference_steps: usize) -> Vec<f64> {
    let rho = 7.0;
    let min_inv_rho = sigma_min.powf(1.0 / rho);
    let max_inv_rho = sigma_max.powf(1.0 / rho);
    spacing::np_linspace(0.0, 1.0, num_inference_steps)
        .into_iter()
        .map(|ramp| (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)).powf(rho))
        .collect()
}

/// Sigmas evenly spaced in log sigma, from `sigma_max` down to `sigma_min`.
pub fn exponential_sigmas(sigma_min: f64, sigma_max: f64, num_inference_steps: usize) -> Vec<f64> {
    spacing::np_linspace(sigma_max.ln(), sigma_min.ln(), num_inference_steps).into_iter().map(f64::exp).collect()
}

/// Which sigmas replace the interpolated ones (`use_karras_sigmas`, `use_exponential_sigmas`,
/// `use_beta_sigmas`; at most one may be set).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SigmaSchedule {
    /// The training sigmas interpolated at the spaced timesteps.
    Interpolated,
    /// Karras et al. 2022 (EDM), eq. 5 with rho = 7.
    Karras,
    /// Evenly spaced in log sigma.
    Exponential,
}

impl SigmaSchedule {
    /// The schedule that diffusers' `use_karras_sigmas`, `use_exponential_sigmas` and
    /// `use_beta_sigmas` select; more than one set, or `use_beta_sigmas` (not ported), is an error.
    pub fn from_flags(use_karras_sigmas: bool, use_exponential_sigmas: bool, use_beta_sigmas: bool) -> Result<Self> {
        if [use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas].iter().filter(|&&b| b).count() > 1 {
            return Err(Error::invalid(
                "only one of use_beta_sigmas, use_exponential_sigmas, use_karras_sigmas can be true",
            ));
        }
        if use_beta_sigmas {
            // diffusers inverts the beta distribution's CDF with scipy; we have no port of it.
            return Err(Error::invalid("use_beta_sigmas = true is not supported"));
        }
        Ok(if use_karras_sigmas {
            Self::Karras
        } else if use_exponential_sigmas {
            Self::Exponential
        } else {
            Self::Interpolated
        })
    }

    /// Replaces `sigmas` (float64, descending) by this schedule between `sigma_min` and
    /// `sigma_max` (by default the ends of `sigmas`), and maps each new sigma back to a
    /// fractional timestep of the `training_sigmas`; returns the (float32) timesteps and the
    /// sigmas, without the final one.
    pub fn respace(
        self,
        timesteps: Vec<f32>,
        sigmas: Vec<f64>,
        training_sigmas: &[f32],
        num_inference_steps: usize,
        sigma_min: Option<f64>,
        sigma_max: Option<f64>,
    ) -> (Vec<f32>, Vec<f64>) {
        let (Some(&last), Some(&first)) = (sigmas.last(), sigmas.first()) else {
            return (timesteps, sigmas);
        };
        let sigma_min = sigma_min.unwrap_or(last);
        let sigma_max = sigma_max.unwrap_or(first);
        let sigmas = match self {
            Self::Interpolated => return (timesteps, sigmas),
            Self::Karras => karras_sigmas(sigma_min, sigma_max, num_inference_steps),
            Self::Exponential => exponential_sigmas(sigma_min, sigma_max, num_inference_steps),
        };
        let log_sigmas: Vec<f32> = training_sigmas.iter().map(|s| s.ln()).collect();
        let timesteps = sigmas.iter().map(|&s| sigma_to_t(s, &log_sigmas) as f32).collect();
        (timesteps, sigmas)
    }
}

/// The multistep schedulers' Karras/exponential range: the config's `sigma_min` and `sigma_max`
/// when it has them, else the ends of the training sigmas.
pub fn multistep_sigma_range(sigma_min: Option<f64>, sigma_max: Option<f64>, training_sigmas: &[f32]) -> (f64, f64) {
    let sigma_min = sigma_min.unwrap_or(training_sigmas[0] as f64);
    let sigma_max = sigma_max.unwrap_or(*training_sigmas.last().unwrap_or(&0.0) as f64);
    (sigma_min, sigma_max)
}

/// The multistep schedulers' integer timesteps for Karras/exponential sigmas: each sigma's
/// fractional timestep (`sigma_to_t`), rounded when `round`, then truncated.
pub fn integer_timesteps_of(sigmas: &[f64], log_sigmas: &[f32], round: bool) -> Vec<i64> {
    sigmas
        .iter()
        .map(|&s| {
            let t = sigma_to_t(s, log_sigmas);
            (if round { t.round_ties_even() } else { t }) as i64
        })
        .collect()
}

// ---- Stepping through the schedule ----

/// diffusers' `index_for_timestep`: where `timestep` is in `schedule` (compared in float32, as
/// torch compares a float32 schedule, or an integer one with a float timestep). When it occurs
/// more than once (Heun's duplicated timesteps) the second occurrence, so that starting
/// mid-schedule (image-to-image) does not skip a sigma.
pub fn index_for_timestep(timestep: f64, schedule: &[f64]) -> Option<usize> {
    let mut found = schedule.iter().enumerate().filter(|(_, &t)| t as f32 == timestep as f32).map(|(i, _)| i);
    let first = found.next()?;
    Some(found.next().unwrap_or(first))
}

/// What `set_timesteps` leaves a sigma scheduler, and where the sampling loop is in it:
/// diffusers' `timesteps`, `sigmas`, `_step_index` and `_begin_index`.
#[derive(Clone, Debug, Default)]
pub struct Schedule {
    /// The timesteps the pipeline visits, in order.
    pub timesteps: Vec<f64>,
    /// One sigma per timestep, then the one after the last step.
    pub sigmas: Vec<f32>,
    /// `None` until the first `scale_model_input`/`step`, which sets it from `begin_index`
    /// (image-to-image) or from the timestep's place.
    step_index: Option<usize>,
    begin_index: Option<usize>,
    /// The multistep schedulers take a timestep the schedule does not hold for the last step;
    /// for the others it is an error (diffusers' lookup fails).
    unknown_timestep_is_last: bool,
}

impl Schedule {
    /// The schedule of an Euler-family scheduler.
    pub fn new(timesteps: Vec<f64>, sigmas: Vec<f32>) -> Self {
        Self { timesteps, sigmas, ..Self::default() }
    }

    /// The schedule of a multistep scheduler (DPM-Solver, UniPC).
    pub fn multistep(timesteps: Vec<f64>, sigmas: Vec<f32>) -> Self {
        Self { unknown_timestep_is_last: true, ..Self::new(timesteps, sigmas) }
    }

    /// A new schedule from `set_timesteps`: forgets both indices.
    pub fn set(&mut self, timesteps: Vec<f64>, sigmas: Vec<f32>) {
        *self = Self { unknown_timestep_is_last: self.unknown_timestep_is_last, ..Self::new(timesteps, sigmas) };
    }

    /// For image-to-image: the index of the first timestep the pipeline will use.
    pub fn set_begin_index(&mut self, begin_index: usize) {
        self.begin_index = Some(begin_index);
    }

    fn index_for_timestep(&self, timestep: f64) -> Result<usize> {
        match index_for_timestep(timestep, &self.timesteps) {
            Some(index) => Ok(index),
            None if self.unknown_timestep_is_last => Ok(self.timesteps.len().saturating_sub(1)),
            None => Err(Error::invalid(format!("timestep {timestep} is not one of the scheduler's timesteps"))),
        }
    }

    /// The current step index, initialised from `timestep` on first use.
    pub fn step_index(&mut self, timestep: f64) -> Result<usize> {
        if let Some(index) = self.step_index {
            return Ok(index);
        }
        let index = match self.begin_index {
            Some(begin) => begin,
            None => self.index_for_timestep(timestep)?,
        };
        self.step_index = Some(index);
        Ok(index)
    }

    /// Moves to the next step (end of `step`).
    pub fn advance(&mut self) {
        self.step_index = self.step_index.map(|i| i + 1);
    }

    /// The sigma at `index`, or an error saying the schedule has run out (more steps than timesteps).
    pub fn sigma(&self, index: usize) -> Result<f32> {
        self.sigmas.get(index).copied().ok_or_else(|| {
            Error::invalid(format!("step index {index} is past the end of the schedule ({} sigmas)", self.sigmas.len()))
        })
    }

    /// The standard deviation of the initial noise for the Euler family: the largest sigma, or
    /// for `leading` spacing (whose first timestep is below the last training one)
    /// sqrt(sigma_max^2 + 1), in f32.
    pub fn init_noise_sigma(&self, timestep_spacing: &str) -> f64 {
        let max = self.sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        match timestep_spacing {
            "linspace" | "trailing" => max as f64,
            _ => (max * max + 1.0).sqrt() as f64,
        }
    }

    /// The Euler family's `scale_model_input`: `sample / sqrt(sigma^2 + 1)` at the current
    /// step, so that the model sees inputs of unit variance.
    pub fn scale_model_input(&mut self, sample: &Tensor, timestep: f64) -> Result<Tensor> {
        let index = self.step_index(timestep)?;
        let sigma = self.sigma(index)?;
        divide(sample, (sigma * sigma + 1.0).sqrt())
    }

    /// The Euler family's `add_noise`: `original + sigma * noise`, one sigma per batch item
    /// (or one for all).
    pub fn add_noise(&self, original_samples: &Tensor, noise: &Tensor, timesteps: &[f64]) -> Result<Tensor> {
        let sigma = per_item(&self.add_noise_sigmas(timesteps)?, original_samples)?;
        Ok((original_samples + noise.broadcast_mul(&sigma)?)?)
    }

    /// The multistep schedulers' `add_noise`: `alpha_t * original + sigma_t * noise`.
    pub fn add_noise_vp(&self, original_samples: &Tensor, noise: &Tensor, timesteps: &[f64]) -> Result<Tensor> {
        let (alphas_t, sigmas_t): (Vec<f32>, Vec<f32>) =
            self.add_noise_sigmas(timesteps)?.into_iter().map(alpha_sigma_t).unzip();
        let alpha_t = per_item(&alphas_t, original_samples)?;
        let sigma_t = per_item(&sigmas_t, original_samples)?;
        Ok((original_samples.broadcast_mul(&alpha_t)? + noise.broadcast_mul(&sigma_t)?)?)
    }

    /// The sigmas `add_noise` uses: at each timestep's place when no begin index is set
    /// (training, or pipelines without `set_begin_index`), else at the current step
    /// (inpainting, after the first step) or the begin index (image-to-image, before it).
    fn add_noise_sigmas(&self, timesteps: &[f64]) -> Result<Vec<f32>> {
        let indices = match (self.begin_index, self.step_index) {
            (None, _) => timesteps.iter().map(|&t| self.index_for_timestep(t)).collect::<Result<Vec<usize>>>()?,
            (Some(_), Some(step)) => vec![step; timesteps.len()],
            (Some(begin), None) => vec![begin; timesteps.len()],
        };
        indices.into_iter().map(|index| self.sigma(index)).collect()
    }
}

// ---- The model output: x_0 (or the noise) from what the model predicts ----

/// The Euler family's x_0 from the model output at noise level `sigma` (f32 as torch does it).
pub fn denoised(prediction_type: PredictionType, model_output: &Tensor, sample: &Tensor, sigma: f32) -> Result<Tensor> {
    Ok(match prediction_type {
        PredictionType::Epsilon => (sample - scale(model_output, sigma)?)?,
        PredictionType::Sample => model_output.clone(),
        // denoised = model_output * c_out + sample * c_skip for the variance-exploding
        // form of v: c_out = -sigma / sqrt(sigma^2 + 1), c_skip = 1 / (sigma^2 + 1).
        PredictionType::VPrediction => {
            let c_out = -sigma / (sigma * sigma + 1.0).sqrt();
            (scale(model_output, c_out)? + divide(sample, sigma * sigma + 1.0)?)?
        }
    })
}

/// The multistep schedulers' data prediction x_0 from the model output at `sigma` (diffusers'
/// `convert_model_output` for DPM-Solver++ and UniPC's `predict_x0`); `prediction_type` is
/// epsilon, sample, v_prediction or flow_prediction.
pub fn data_prediction(prediction_type: &str, model_output: &Tensor, sample: &Tensor, sigma: f32) -> Result<Tensor> {
    let (alpha_t, sigma_t) = alpha_sigma_t(sigma);
    Ok(match prediction_type {
        "epsilon" => divide(&(sample - scale(model_output, sigma_t)?)?, alpha_t)?,
        "sample" => model_output.clone(),
        "v_prediction" => (scale(sample, alpha_t)? - scale(model_output, sigma_t)?)?,
        // Flow matching: x0 = x_t - sigma * v.
        _ => (sample - scale(model_output, sigma)?)?,
    })
}

/// The multistep schedulers' noise prediction from the model output at `sigma` (diffusers'
/// `convert_model_output` for DPM-Solver and UniPC without `predict_x0`); `prediction_type` is
/// epsilon, sample or v_prediction.
pub fn noise_prediction(prediction_type: &str, model_output: &Tensor, sample: &Tensor, sigma: f32) -> Result<Tensor> {
    let (alpha_t, sigma_t) = alpha_sigma_t(sigma);
    Ok(match prediction_type {
        "epsilon" => model_output.clone(),
        "sample" => divide(&(sample - scale(model_output, alpha_t)?)?, sigma_t)?,
        _ => (scale(model_output, alpha_t)? + scale(sample, sigma_t)?)?,
    })
}

// ---- Scalar arithmetic as torch does it ----

/// `tensor * s` with `s` a float32 scalar, as torch multiplies by a 0-d float32 tensor.
pub fn scale(tensor: &Tensor, s: f32) -> Result<Tensor> {
    Ok(tensor.affine(s as f64, 0.0)?)
}

/// `tensor / s` with a true division (not a multiplication by 1/s), as torch divides.
pub fn divide(tensor: &Tensor, s: f32) -> Result<Tensor> {
    let divisor = Tensor::new(s, tensor.device())?.to_dtype(tensor.dtype())?;
    Ok(tensor.broadcast_div(&divisor)?)
}

/// Upcasts to f32 (diffusers computes the step in float32 whatever the model's dtype).
pub fn to_f32(tensor: &Tensor) -> Result<Tensor> {
    Ok(tensor.to_dtype(DType::F32)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cumprod_accumulates_like_torch() {
        // torch.cumprod(1 - betas)[-1] for SD's scaled_linear betas: torch keeps the running
        // product in f64 on the CPU; an f32 product ends at 0.004660091.
        let betas = betas::make_betas("scaled_linear", 0.00085, 0.012, 1000, None, &[]).unwrap();
        assert_eq!(alphas_cumprod(&betas, false)[999], 0.004_660_095_088_183_88_f32);
    }

    #[test]
    fn sigma_to_t_inverts_interpolation() {
        let alphas_cumprod =
            alphas_cumprod(&betas::make_betas("scaled_linear", 0.00085, 0.012, 1000, None, &[]).unwrap(), false);
        let sigmas = training_sigmas(&alphas_cumprod);
        let log_sigmas: Vec<f32> = sigmas.iter().map(|s| s.ln()).collect();
        for &t in &[0.0f32, 1.0, 123.0, 500.5, 998.25, 999.0] {
            let sigma = interp(&[t], &sigmas)[0];
            let back = sigma_to_t(sigma, &log_sigmas);
            // Linear in sigma one way, linear in log sigma the other: close, not equal.
            assert!((back - t as f64).abs() < 0.01, "{t} -> {sigma} -> {back}");
        }
        // Outside the table: clamped to the ends.
        assert_eq!(sigma_to_t(1e-6, &log_sigmas), 0.0);
        assert_eq!(sigma_to_t(1e6, &log_sigmas), 999.0);
    }

    #[test]
    fn index_prefers_second_occurrence() {
        let schedule = [999.0, 500.0, 500.0, 0.0, 0.0];
        assert_eq!(index_for_timestep(999.0, &schedule), Some(0));
        assert_eq!(index_for_timestep(500.0, &schedule), Some(2));
        assert_eq!(index_for_timestep(0.0, &schedule), Some(4));
        assert_eq!(index_for_timestep(1.0, &schedule), None);
    }

    #[test]
    fn unknown_timestep_is_an_error_except_for_multistep() {
        assert!(Schedule::new(vec![5.0, 3.0, 1.0], vec![3.0, 2.0, 1.0, 0.0]).step_index(4.0).is_err());
        let mut multistep = Schedule::multistep(vec![5.0, 3.0, 1.0], vec![3.0, 2.0, 1.0, 0.0]);
        assert_eq!(multistep.step_index(4.0).unwrap(), 2);
        multistep.set(vec![5.0, 3.0, 3.0, 1.0], vec![4.0, 3.0, 2.0, 1.0, 0.0]);
        assert_eq!(multistep.step_index(3.0).unwrap(), 2, "the step index is forgotten by `set`");
        multistep.set(vec![5.0, 3.0, 1.0], vec![3.0, 2.0, 1.0, 0.0]);
        assert_eq!(multistep.step_index(4.0).unwrap(), 2, "`set` keeps the lookup rule");
    }
}
