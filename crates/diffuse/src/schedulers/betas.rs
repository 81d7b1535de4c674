//! Beta schedules and the quantities derived from them, computed in f32 as diffusers does
//! with torch (diffusers/schedulers/scheduling_ddpm.py: the schedules of `__init__`,
//! `betas_for_alpha_bar`, `rescale_zero_terminal_snr`).

use crate::{Error, Result};

/// `torch.linspace(start, end, steps, dtype=torch.float32)`: torch fills the first half
/// forward from `start` and the second half backward from `end`, each value one fused
/// multiply-add (as GCC compiles ATen's `start + step * idx`).
pub fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 0 {
        return vec![];
    }
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| if i < halfway { step.mul_add(i as f32, start) } else { (-step).mul_add((steps - i - 1) as f32, end) })
        .collect()
}

/// The largest `num_train_timesteps` a scheduler config may state.
pub const MAX_TRAIN_TIMESTEPS: usize = 100_000;

/// The betas of a named schedule, or the config's `trained_betas` when it has them. Every
/// scheduler offers `linear`, `scaled_linear` and `squaredcos_cap_v2`; `also` names the
/// schedules only this one offers (DDPM: `sigmoid`, `laplace`; Heun: `exp`).
pub fn make_betas(
    beta_schedule: &str,
    beta_start: f64,
    beta_end: f64,
    num_train_timesteps: usize,
    trained_betas: Option<&[f64]>,
    also: &[&str],
) -> Result<Vec<f32>> {
    // A config's number sizes every table the scheduler keeps: refused before anything is
    // allocated (diffusion models are trained with 1000, a few with 4000).
    if num_train_timesteps > MAX_TRAIN_TIMESTEPS {
        return Err(Error::invalid(format!(
            "num_train_timesteps {num_train_timesteps} is more than diffuse supports ({MAX_TRAIN_TIMESTEPS})"
        )));
    }
    if let Some(trained) = trained_betas {
        if trained.len() != num_train_timesteps {
            return Err(Error::invalid(format!(
                "trained_betas has {} values but num_train_timesteps is {num_train_timesteps}",
                trained.len()
            )));
        }
        return Ok(trained.iter().map(|&b| b as f32).collect());
    }
    if num_train_timesteps == 0 {
        return Err(Error::invalid("num_train_timesteps must be at least 1"));
    }
    let offers = |name: &str| also.contains(&name);
    Ok(match beta_schedule {
        "linear" => linspace_f32(beta_start as f32, beta_end as f32, num_train_timesteps),
        // Specific to latent diffusion: linear in sqrt(beta).
        "scaled_linear" => linspace_f32(beta_start.sqrt() as f32, beta_end.sqrt() as f32, num_train_timesteps)
            .into_iter()
            .map(|b| b * b)
            .collect(),
        // Glide cosine schedule.
        "squaredcos_cap_v2" => betas_for_alpha_bar(num_train_timesteps, 0.999, AlphaTransform::Cosine),
        // GeoDiff's sigmoid schedule: sigmoid(linspace(-6, 6)) scaled to [beta_start, beta_end], in f32.
        "sigmoid" if offers("sigmoid") => {
            let scale = (beta_end - beta_start) as f32;
            linspace_f32(-6.0, 6.0, num_train_timesteps)
                .into_iter()
                .map(|x| 1.0 / (1.0 + (-x).exp()) * scale + beta_start as f32)
                .collect()
        }
        "laplace" if offers("laplace") => betas_for_alpha_bar(num_train_timesteps, 0.999, AlphaTransform::Laplace),
        "exp" if offers("exp") => betas_for_alpha_bar(num_train_timesteps, 0.999, AlphaTransform::Exp),
        other => {
            let common = ["linear", "scaled_linear", "squaredcos_cap_v2"];
            let offered: Vec<&str> = common.iter().chain(also).copied().collect();
            return Err(Error::invalid(format!("beta_schedule `{other}` is not one of {}", offered.join(", "))));
        }
    })
}

/// The alpha_bar(t), t in [0, 1], of `betas_for_alpha_bar` (`alpha_transform_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AlphaTransform {
    /// Improved DDPM's cosine schedule (Nichol & Dhariwal 2021, eq. 17).
    Cosine,
    /// alpha_bar from a Laplace-shaped log-SNR.
    Laplace,
    /// exp(-12 t).
    Exp,
}

/// diffusers' `betas_for_alpha_bar`: betas from the ratio of consecutive alpha_bar values,
/// capped at `max_beta`, computed in f64 as Python floats, then stored as f32.
pub fn betas_for_alpha_bar(num_diffusion_timesteps: usize, max_beta: f64, alpha_transform: AlphaTransform) -> Vec<f32> {
    let alpha_bar = |t: f64| match alpha_transform {
        AlphaTransform::Cosine => ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos().powi(2),
        AlphaTransform::Laplace => {
            let lmb = -0.5 * (0.5 - t).signum() * (1.0 - 2.0 * (0.5 - t).abs() + 1e-6).ln();
            let snr = lmb.exp();
            (snr / (1.0 + snr)).sqrt()
        }
        AlphaTransform::Exp => (t * -12.0).exp(),
    };
    let n = num_diffusion_timesteps as f64;
    (0..num_diffusion_timesteps)
        .map(|i| {
            let t1 = i as f64 / n;
            let t2 = (i + 1) as f64 / n;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(max_beta) as f32
        })
        .collect()
}

/// Rescales betas to zero terminal SNR (Lin et al. 2023, "Common Diffusion Noise Schedules
/// and Sample Steps are Flawed", algorithm 1).
pub fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas_cumprod = alphas_cumprod(betas, false);
    let mut alphas_bar_sqrt: Vec<f32> = alphas_cumprod.iter().map(|a| a.sqrt()).collect();
    let first = alphas_bar_sqrt[0];
    let last = *alphas_bar_sqrt.last().unwrap();
    let scale = first / (first - last);
    for a in alphas_bar_sqrt.iter_mut() {
        *a -= last;
        *a *= scale;
    }
    let alphas_bar: Vec<f32> = alphas_bar_sqrt.iter().map(|a| a * a).collect();
    let mut rescaled = Vec::with_capacity(betas.len());
    rescaled.push(1.0 - alphas_bar[0]);
    for i in 1..alphas_bar.len() {
        rescaled.push(1.0 - alphas_bar[i] / alphas_bar[i - 1]);
    }
    rescaled
}

/// `torch.cumprod(1 - betas)`, with the betas first rescaled to zero terminal SNR when asked.
pub fn alphas_cumprod(betas: &[f32], rescale_betas_zero_snr: bool) -> Vec<f32> {
    let betas = if rescale_betas_zero_snr { rescale_zero_terminal_snr(betas) } else { betas.to_vec() };
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    cumprod(&alphas)
}

/// Running product as `torch.cumprod` on the CPU computes it for f32: the product is kept in
/// f64 and each value rounded to f32 (an f32 product drifts: SD's last alphas_cumprod would be
/// 0.004660091 instead of torch's 0.004660095).
pub fn cumprod(values: &[f32]) -> Vec<f32> {
    let mut product = 1.0f64;
    values
        .iter()
        .map(|&v| {
            product *= v as f64;
            product as f32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_schedule_is_not_degenerate() {
        // Integer division in t/n makes every beta 0 or max_beta; the real schedule rises.
        let betas = betas_for_alpha_bar(1000, 0.999, AlphaTransform::Cosine);
        assert!(betas[0] > 0.0 && betas[0] < 1e-4, "{}", betas[0]);
        assert!(betas[500] > betas[0] && betas[500] < 0.01, "{}", betas[500]);
        assert_eq!(betas[999], 0.999);
    }

    #[test]
    fn zero_snr_ends_at_zero() {
        let betas = make_betas("scaled_linear", 0.00085, 0.012, 1000, None, &[]).unwrap();
        assert_eq!(*alphas_cumprod(&betas, true).last().unwrap(), 0.0);
    }

    #[test]
    fn scheduler_specific_schedules_are_opt_in() {
        // diffusers' DDIM raises NotImplementedError for `sigmoid`; DDPM offers it.
        let error = make_betas("sigmoid", 0.0001, 0.02, 10, None, &[]).unwrap_err().to_string();
        assert!(error.contains("beta_schedule `sigmoid`"), "{error}");
        let betas = make_betas("sigmoid", 0.0001, 0.02, 10, None, &["sigmoid", "laplace"]).unwrap();
        assert!(betas[0] > 0.0001 && betas[9] < 0.02 && betas[0] < betas[9], "{betas:?}");
        assert!(make_betas("exp", 0.0001, 0.02, 10, None, &["sigmoid", "laplace"]).is_err());
    }
}
