//! diffusers' timestep spacings (Lin et al. 2023, table 2): which training timesteps the
//! inference steps visit. numpy rounds half to even, so we do too.

use crate::{Error, Result};

/// `timestep_spacing` as the configs spell it.
pub fn check_spacing(spacing: &str) -> Result<()> {
    match spacing {
        "linspace" | "leading" | "trailing" => Ok(()),
        other => Err(Error::invalid(format!(
            "timestep_spacing `{other}` is not one of linspace, leading, trailing"
        ))),
    }
}

/// `np.linspace(start, stop, num)` in f64: `start + i * step`, with the last value exactly `stop`.
pub fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 0 {
        return vec![];
    }
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut values: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    values[num - 1] = stop;
    values
}

/// Integer timesteps, descending, as DDPM/DDIM/PNDM `set_timesteps` computes them.
pub fn integer_timesteps(
    spacing: &str,
    num_train_timesteps: usize,
    num_inference_steps: usize,
    steps_offset: usize,
) -> Result<Vec<i64>> {
    check_inference_steps(num_train_timesteps, num_inference_steps)?;
    let t = num_train_timesteps;
    let n = num_inference_steps;
    Ok(match spacing {
        "linspace" => np_linspace(0.0, (t - 1) as f64, n)
            .into_iter()
            .rev()
            .map(|x| x.round_ties_even() as i64)
            .collect(),
        "leading" => {
            let step_ratio = t / n;
            (0..n).rev().map(|i| (i * step_ratio + steps_offset) as i64).collect()
        }
        "trailing" => {
            let step_ratio = t as f64 / n as f64;
            np_arange(t as f64, 0.0, -step_ratio)
                .into_iter()
                .map(|x| x.round_ties_even() as i64 - 1)
                .collect()
        }
        other => {
            check_spacing(other)?;
            unreachable!()
        }
    })
}

/// `np.arange(start, stop, step)` for floats, filled as numpy fills it: the second value is
/// `start + step` and the others `start + i * delta` with `delta = (start + step) - start`,
/// which rounds differently from `start + i * step` at ties (trailing spacing with 48 steps).
pub fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil().max(0.0) as usize;
    let delta = (start + step) - start;
    (0..len).map(|i| if i == 1 { start + step } else { start + i as f64 * delta }).collect()
}

pub fn check_inference_steps(num_train_timesteps: usize, num_inference_steps: usize) -> Result<()> {
    if num_inference_steps == 0 {
        return Err(Error::invalid("the number of inference steps must be at least 1"));
    }
    if num_inference_steps > num_train_timesteps {
        return Err(Error::invalid(format!(
            "{num_inference_steps} inference steps cannot be more than the {num_train_timesteps} training timesteps"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spacings_match_diffusers_table() {
        // Values from diffusers' DDIMScheduler.set_timesteps with 1000 training steps.
        assert_eq!(integer_timesteps("leading", 1000, 10, 1).unwrap(), vec![901, 801, 701, 601, 501, 401, 301, 201, 101, 1]);
        assert_eq!(integer_timesteps("trailing", 1000, 10, 0).unwrap(), vec![999, 899, 799, 699, 599, 499, 399, 299, 199, 99]);
        assert_eq!(integer_timesteps("linspace", 1000, 10, 0).unwrap(), vec![999, 888, 777, 666, 555, 444, 333, 222, 111, 0]);
    }
}
