//! diffusers' timestep spacings (Lin et al. 2023, table 2): which training timesteps the
//! inference steps visit. The scheduler families compute them in three slightly different
//! ways, each kept here as diffusers has it. numpy rounds half to even, so we do too.

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
        "leading" => leading(t, n, steps_offset),
        "trailing" => trailing(t, t, n),
        other => {
            check_spacing(other)?;
            unreachable!("check_spacing accepts only the spacings above")
        }
    })
}

/// The inference timesteps of the sigma schedulers (Euler, Euler ancestral, LMS, Heun),
/// descending, as the float32 numpy arrays of their `set_timesteps`: `linspace` is not rounded
/// (so fractional), and there may be more steps than training timesteps.
pub fn float32_timesteps(
    spacing: &str,
    num_train_timesteps: usize,
    num_inference_steps: usize,
    steps_offset: usize,
) -> Result<Vec<f32>> {
    check_at_least_one_step(num_inference_steps)?;
    let t = num_train_timesteps;
    let n = num_inference_steps;
    Ok(match spacing {
        "linspace" => np_linspace(0.0, (t - 1) as f64, n).into_iter().rev().map(|x| x as f32).collect(),
        "leading" => leading(t, n, steps_offset).into_iter().map(|x| x as f32).collect(),
        "trailing" => trailing(t, t, n).into_iter().map(|x| x as f32).collect(),
        other => {
            check_spacing(other)?;
            unreachable!("check_spacing accepts only the spacings above")
        }
    })
}

/// The integer timesteps (descending) of the multistep schedulers (DPM-Solver, UniPC), whose
/// `linspace` and `leading` space `num_inference_steps + 1` points and drop the last.
/// `last_timestep` is `num_train_timesteps` unless DPM-Solver's `lambda_min_clipped` cut the
/// end of the schedule off.
pub fn multistep_timesteps(
    spacing: &str,
    last_timestep: usize,
    num_train_timesteps: usize,
    num_inference_steps: usize,
    steps_offset: usize,
) -> Result<Vec<i64>> {
    check_at_least_one_step(num_inference_steps)?;
    let n = num_inference_steps;
    Ok(match spacing {
        // np.linspace(0, last - 1, n + 1).round()[::-1][:-1]
        "linspace" => {
            let mut values: Vec<i64> = np_linspace(0.0, last_timestep as f64 - 1.0, n + 1)
                .into_iter()
                .map(|x| x.round_ties_even() as i64)
                .collect();
            values.reverse();
            values.truncate(n);
            values
        }
        // (np.arange(0, n + 1) * (last // (n + 1))).round()[::-1][:-1] + steps_offset
        "leading" => {
            let step_ratio = last_timestep / (n + 1);
            (1..=n).rev().map(|i| (i * step_ratio + steps_offset) as i64).collect()
        }
        "trailing" => trailing(last_timestep, num_train_timesteps, n),
        other => {
            check_spacing(other)?;
            unreachable!("check_spacing accepts only the spacings above")
        }
    })
}

/// `leading`: (np.arange(0, n) * (num_train_timesteps // n))[::-1] + steps_offset.
fn leading(num_train_timesteps: usize, num_inference_steps: usize, steps_offset: usize) -> Vec<i64> {
    let step_ratio = num_train_timesteps / num_inference_steps;
    (0..num_inference_steps).rev().map(|i| (i * step_ratio + steps_offset) as i64).collect()
}

/// `trailing`: np.arange(start, 0, -num_train_timesteps / n).round() - 1.
fn trailing(start: usize, num_train_timesteps: usize, num_inference_steps: usize) -> Vec<i64> {
    let step_ratio = num_train_timesteps as f64 / num_inference_steps as f64;
    np_arange(start as f64, 0.0, -step_ratio).into_iter().map(|x| x.round_ties_even() as i64 - 1).collect()
}

/// `np.arange(start, stop, step)` for floats, filled as numpy fills it: the second value is
/// `start + step` and the others `start + i * delta` with `delta = (start + step) - start`,
/// which rounds differently from `start + i * step` at ties (trailing spacing with 48 steps).
pub fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil().max(0.0) as usize;
    let delta = (start + step) - start;
    (0..len).map(|i| if i == 1 { start + step } else { start + i as f64 * delta }).collect()
}

fn check_at_least_one_step(num_inference_steps: usize) -> Result<()> {
    if num_inference_steps == 0 {
        return Err(Error::invalid("the number of inference steps must be at least 1"));
    }
    Ok(())
}

/// At least one inference step, and no more than there are training timesteps.
pub fn check_inference_steps(num_train_timesteps: usize, num_inference_steps: usize) -> Result<()> {
    check_at_least_one_step(num_inference_steps)?;
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

    #[test]
    fn float32_spacings() {
        assert_eq!(float32_timesteps("leading", 1000, 4, 1).unwrap(), vec![751.0, 501.0, 251.0, 1.0]);
        assert_eq!(float32_timesteps("linspace", 1000, 4, 0).unwrap(), vec![999.0, 666.0, 333.0, 0.0]);
        assert!(float32_timesteps("sideways", 1000, 4, 0).is_err());
        assert!(float32_timesteps("linspace", 1000, 0, 0).is_err());
    }

    #[test]
    fn trailing_arange_matches_numpy_at_rounding_ties() {
        // np.arange(1000, 0, -1000/48).round() - 1 has 936 fourth: numpy's 1000 + 3 * delta is
        // 937.4999999999999, where 1000 - 3 * (1000/48) would be 937.5000000000001 (so 937).
        let t = float32_timesteps("trailing", 1000, 48, 0).unwrap();
        assert_eq!(&t[..4], &[999.0, 978.0, 957.0, 936.0]);
        assert_eq!(t.len(), 48);
    }

    #[test]
    fn multistep_spacings_match_numpy() {
        // Values from diffusers 0.42.1 DPMSolverMultistepScheduler.set_timesteps(8), 1000 steps.
        assert_eq!(
            multistep_timesteps("linspace", 1000, 1000, 8, 0).unwrap(),
            vec![999, 874, 749, 624, 500, 375, 250, 125]
        );
        assert_eq!(
            multistep_timesteps("leading", 1000, 1000, 8, 1).unwrap(),
            vec![889, 778, 667, 556, 445, 334, 223, 112]
        );
        assert_eq!(
            multistep_timesteps("trailing", 1000, 1000, 8, 0).unwrap(),
            vec![999, 874, 749, 624, 499, 374, 249, 124]
        );
        assert_eq!(multistep_timesteps("trailing", 1000, 1000, 7, 0).unwrap(), vec![999, 856, 713, 570, 428, 285, 142]);
    }
}
