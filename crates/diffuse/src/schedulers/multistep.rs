//! What the multistep DPM-Solver and UniPC schedulers share (diffusers/schedulers/
//! scheduling_dpmsolver_multistep.py, scheduling_unipc_multistep.py): the variance-preserving
//! schedule in sigma form, the timestep grids, Karras/exponential sigmas, sigma-to-timestep
//! interpolation, the step-index lookup and `add_noise`.
//!
//! diffusers does the per-step scalar arithmetic on float32 0-d tensors, so the scalars here
//! are `f32` computed in the same order; set-up arithmetic that numpy does in float64 is `f64`.

use candle_core::Tensor;

use super::betas::make_betas;
use super::per_item;
use super::spacing::np_linspace;
use crate::{Error, Result};

/// `alphas_cumprod` as both schedulers build it (float32), with the zero-terminal-SNR fix-up:
/// the last value is set to 2^-24 (the smallest positive float16 subnormal) so that the first
/// sigma is large but finite.
pub(crate) fn alphas_cumprod(
    beta_schedule: &str,
    beta_start: f64,
    beta_end: f64,
    num_train_timesteps: usize,
    trained_betas: Option<&[f64]>,
    rescale_betas_zero_snr: bool,
) -> Result<Vec<f32>> {
    let betas = make_betas(beta_schedule, beta_start, beta_end, num_train_timesteps, trained_betas, &[])?;
    let mut alphas_cumprod = super::betas::alphas_cumprod(&betas, rescale_betas_zero_snr);
    if rescale_betas_zero_snr {
        if let Some(last) = alphas_cumprod.last_mut() {
            *last = 2f32.powi(-24);
        }
    }
    Ok(alphas_cumprod)
}

/// The training sigmas `((1 - alpha_bar) / alpha_bar) ** 0.5`, in float32 as torch computes them.
pub(crate) fn training_sigmas(alphas_cumprod: &[f32]) -> Vec<f32> {
    alphas_cumprod.iter().map(|a| ((1.0 - a) / a).sqrt()).collect()
}

/// diffusers' `_sigma_to_alpha_sigma_t` for a VP schedule: alpha_t = 1 / sqrt(sigma^2 + 1),
/// sigma_t = sigma * alpha_t.
pub(crate) fn alpha_sigma_t(sigma: f32) -> (f32, f32) {
    let alpha_t = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha_t, sigma * alpha_t)
}

/// The half log-SNR lambda_t = log(alpha_t) - log(sigma_t) (+inf when sigma_t is 0).
pub(crate) fn lambda(alpha_t: f32, sigma_t: f32) -> f32 {
    alpha_t.ln() - sigma_t.ln()
}

/// `np.interp(timesteps, np.arange(len(sigmas)), sigmas)` at integer timesteps: the training
/// sigma itself, clamped at both ends as numpy clamps.
pub(crate) fn sigmas_at_timesteps(timesteps: &[i64], training_sigmas: &[f32]) -> Vec<f64> {
    let last = training_sigmas.len() as i64 - 1;
    timesteps.iter().map(|&t| training_sigmas[t.clamp(0, last) as usize] as f64).collect()
}

/// The Karras et al. (2022) noise schedule, eq. 5 with rho = 7: `num_inference_steps` sigmas
/// from `sigma_max` down to `sigma_min`, evenly spaced in sigma^(1/rho).
pub(crate) fn karras_sigmas(sigma_min: f64, sigma_max: f64, num_inference_steps: usize) -> Vec<f64> {
    let rho = 7.0;
    let min_inv_rho = sigma_min.powf(1.0 / rho);
    let max_inv_rho = sigma_max.powf(1.0 / rho);
    np_linspace(0.0, 1.0, num_inference_steps)
        .into_iter()
        .map(|ramp| (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)).powf(rho))
        .collect()
}

/// Sigmas evenly spaced in log(sigma), from `sigma_max` down to `sigma_min`.
pub(crate) fn exponential_sigmas(sigma_min: f64, sigma_max: f64, num_inference_steps: usize) -> Vec<f64> {
    np_linspace(sigma_max.ln(), sigma_min.ln(), num_inference_steps).into_iter().map(f64::exp).collect()
}

/// diffusers' `_sigma_to_t`: the fractional training timestep whose (log) sigma is `sigma`,
/// by linear interpolation in log sigma between the two neighbouring training sigmas.
/// `log_sigmas` is numpy's float32 `np.log(sigmas)`; the arithmetic follows numpy's dtypes
/// (float64 against the scalar, float32 between two table entries).
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    // The last index whose log sigma is <= log_sigma (0 if none), at most len - 2.
    let low_idx = log_sigmas
        .iter()
        .rposition(|&l| log_sigma - l as f64 >= 0.0)
        .unwrap_or(0)
        .min(log_sigmas.len().saturating_sub(2));
    let high_idx = low_idx + 1;
    let low = log_sigmas[low_idx];
    let high = log_sigmas[high_idx];
    let w = ((low as f64 - log_sigma) / (low - high) as f64).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

/// diffusers' `index_for_timestep`: the position of `timestep` in the schedule; if it occurs
/// more than once, the second occurrence (so that a pipeline starting in the middle of the
/// schedule does not skip a sigma); if it does not occur, the last position.
pub(crate) fn index_for_timestep(schedule_timesteps: &[f64], timestep: f64) -> usize {
    let mut candidates = schedule_timesteps.iter().enumerate().filter(|(_, &t)| t == timestep).map(|(i, _)| i);
    match (candidates.next(), candidates.next()) {
        (None, _) => schedule_timesteps.len().saturating_sub(1),
        (Some(_), Some(second)) => second,
        (Some(first), None) => first,
    }
}

/// The step index a multistep scheduler starts from: `begin_index` when the pipeline set it,
/// else the position of the first timestep it is given.
pub(crate) fn initial_step_index(begin_index: Option<usize>, schedule_timesteps: &[f64], timestep: f64) -> usize {
    begin_index.unwrap_or_else(|| index_for_timestep(schedule_timesteps, timestep))
}

/// `alpha_t * x0 + sigma_t * noise` with the sigma of each timestep's step, diffusers'
/// sigma-based `add_noise`: by lookup when no begin index is set (training), else at the
/// current step (inpainting) or the begin index (image-to-image).
pub(crate) fn add_noise_sigmas(
    sigmas: &[f32],
    schedule_timesteps: &[f64],
    step_index: Option<usize>,
    begin_index: Option<usize>,
    original_samples: &Tensor,
    noise: &Tensor,
    timesteps: &[f64],
) -> Result<Tensor> {
    let step_indices: Vec<usize> = match (begin_index, step_index) {
        (None, _) => timesteps.iter().map(|&t| index_for_timestep(schedule_timesteps, t)).collect(),
        (Some(_), Some(step)) => vec![step; timesteps.len()],
        (Some(begin), None) => vec![begin; timesteps.len()],
    };
    let mut alphas = Vec::with_capacity(step_indices.len());
    let mut sigmas_t = Vec::with_capacity(step_indices.len());
    for index in step_indices {
        let sigma = *sigmas
            .get(index)
            .ok_or_else(|| Error::invalid(format!("step index {index} is past the {} sigmas", sigmas.len())))?;
        let (alpha_t, sigma_t) = alpha_sigma_t(sigma);
        alphas.push(alpha_t);
        sigmas_t.push(sigma_t);
    }
    let alpha_t = per_item(&alphas, original_samples)?;
    let sigma_t = per_item(&sigmas_t, original_samples)?;
    Ok((original_samples.broadcast_mul(&alpha_t)? + noise.broadcast_mul(&sigma_t)?)?)
}

/// `scalar * tensor` with a float32 scalar, as torch multiplies by a 0-d tensor.
pub(crate) fn scale(tensor: &Tensor, scalar: f32) -> Result<Tensor> {
    Ok(tensor.affine(scalar as f64, 0.0)?)
}

/// `tensor / scalar` as a true division (torch does not multiply by the reciprocal).
pub(crate) fn divide(tensor: &Tensor, scalar: f32) -> Result<Tensor> {
    let divisor = Tensor::new(scalar, tensor.device())?.to_dtype(tensor.dtype())?;
    Ok(tensor.broadcast_div(&divisor)?)
}

/// Checks that a string config value is one of `allowed`, naming the key otherwise.
pub(crate) fn check_one_of(key: &str, value: &str, allowed: &[&str]) -> Result<()> {
    if allowed.contains(&value) {
        Ok(())
    } else {
        Err(Error::invalid(format!("`{key}` `{value}` is not one of {}", allowed.join(", "))))
    }
}

#[cfg(test)]
pub(crate) mod full_loop_support {
    //! diffusers' scheduler test fixtures (tests/schedulers/test_schedulers.py,
    //! `SchedulerCommonTest`): the deterministic sample and noise and the closed-form model.

    use candle_core::{DType, Device, Tensor};

    /// `torch.arange(n)` (flipped for the noise) laid out as (rest..., batch), divided by n in
    /// float32 and permuted to (batch, rest...): `dummy_sample_deter` / `dummy_noise_deter`.
    pub fn deterministic(shape: &[usize], flipped: bool) -> Tensor {
        let n: usize = shape.iter().product();
        let batch = shape[0];
        let mut values = vec![0f32; n];
        for (position, value) in values.iter_mut().enumerate() {
            // position = b * rest + r in (batch, rest...) order; arange index = r * batch + b.
            let (b, r) = (position / (n / batch), position % (n / batch));
            let index = r * batch + b;
            let index = if flipped { n - 1 - index } else { index };
            *value = index as f32 / n as f32;
        }
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    /// The dummy model `sample * t / (t + 1)`, with t cast to the sample's dtype.
    pub fn dummy_model(sample: &Tensor, t: f64) -> Tensor {
        let t_plus_one = Tensor::new(t as f32 + 1.0, &Device::Cpu).unwrap().to_dtype(sample.dtype()).unwrap();
        sample.affine(t, 0.0).unwrap().broadcast_div(&t_plus_one).unwrap()
    }

    /// mean(|x|) and sum(|x|) in float64.
    pub fn abs_mean_and_sum(sample: &Tensor) -> (f64, f64) {
        let values = sample.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let sum: f64 = values.iter().map(|v| v.abs()).sum();
        (sum / values.len() as f64, sum)
    }

    pub fn config(pairs: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
        pairs.as_object().unwrap().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicated_timesteps_use_the_second_occurrence() {
        assert_eq!(index_for_timestep(&[5.0, 3.0, 3.0, 1.0], 3.0), 2);
        assert_eq!(index_for_timestep(&[5.0, 3.0, 1.0], 3.0), 1);
        assert_eq!(index_for_timestep(&[5.0, 3.0, 1.0], 4.0), 2);
    }

    #[test]
    fn deterministic_sample_layout() {
        // torch.arange(24).reshape(3, 2, 4) / 24, permuted (2, 0, 1): element [1, 2, 1] is
        // arange index (2 * 2 + 1) * 4 + 1 = 21.
        let sample = full_loop_support::deterministic(&[4, 3, 2], false);
        let value = sample.get(1).unwrap().get(2).unwrap().get(1).unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(value, 21.0 / 24.0);
        let noise = full_loop_support::deterministic(&[4, 3, 2], true);
        let value = noise.get(1).unwrap().get(2).unwrap().get(1).unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(value, 2.0 / 24.0);
    }
}
