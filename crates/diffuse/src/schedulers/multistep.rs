//! What the multistep DPM-Solver and UniPC schedulers share (diffusers/schedulers/
//! scheduling_dpmsolver_multistep.py, scheduling_unipc_multistep.py): the variance-preserving
//! schedule in sigma form, the timestep grids, Karras/exponential sigmas, sigma-to-timestep
//! interpolation, the step-index lookup and `add_noise`.
//!
//! diffusers does the per-step scalar arithmetic on float32 0-d tensors, so the scalars here
//! are `f32` computed in the same order; set-up arithmetic that numpy does in float64 is `f64`.

use candle_core::Tensor;

use super::per_item;
use super::sigmas::alpha_sigma_t;
use crate::{Error, Result};

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
