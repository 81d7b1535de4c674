//! What the multistep DPM-Solver and UniPC schedulers share beyond sigmas.rs.

use crate::{Error, Result};

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
