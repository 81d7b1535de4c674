// Port of diffusers/schedulers/scheduling_unipc_multistep.py (diffusers 0.42.1).
//! UniPC (Zhao et al. 2023, <https://arxiv.org/abs/2302.04867>): a multistep predictor (UniP)
//! and corrector (UniC) sharing one model evaluation per step, with the B(h) variants bh1/bh2.
//!
//! Each step first corrects the sample the previous predictor produced, using the model
//! output at that sample, then predicts the next sample from the last `order` outputs.

use std::path::Path;

use candle_core::Tensor;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::sigmas::{
    self, alpha_sigma_t, data_prediction, divide, exponential_sigmas, integer_timesteps_of, interp, karras_sigmas,
    lambda, multistep_sigma_range, noise_prediction, scale, training_sigmas, Schedule, SigmaSchedule,
};
use super::spacing::{check_spacing, multistep_timesteps};
use super::{betas, check_one_of, check_solver_order, check_thresholding, threshold_sample, Scheduler};
use crate::loading::config::parse_config;
use crate::rng::TorchGenerator;
use crate::{Error, Result};

/// `UniPCMultistepScheduler`'s config, with diffusers' names and defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct UniPcMultistepSchedulerConfig {
    /// Timesteps of the training noise schedule. Default: `1000`.
    pub num_train_timesteps: usize,
    /// The noise schedule's first beta. Default: `0.0001`.
    pub beta_start: f64,
    /// The noise schedule's last beta. Default: `0.02`.
    pub beta_end: f64,
    /// How the betas go from `beta_start` to `beta_end`: `linear`, `scaled_linear` (linear in
    /// sqrt(beta), Stable Diffusion's) or `squaredcos_cap_v2` (the cosine schedule). Default:
    /// `linear`.
    pub beta_schedule: String,
    /// Betas given outright, in place of the schedule. Default: none.
    pub trained_betas: Option<Vec<f64>>,
    /// The order of the multistep solver (2 for guided sampling, 3 for unguided). Default: `2`.
    pub solver_order: usize,
    /// What the model predicts: `epsilon` (the noise), `sample` (x0) or `v_prediction`. Default:
    /// `epsilon`.
    pub prediction_type: String,
    /// Imagen's dynamic thresholding of the predicted x0 (pixel-space models only). Default:
    /// `false`.
    pub thresholding: bool,
    /// The quantile of |x0| at which dynamic thresholding clips. Default: `0.995`.
    pub dynamic_thresholding_ratio: f64,
    /// The largest threshold of dynamic thresholding. Default: `1.0`.
    pub sample_max_value: f64,
    /// Work with the data prediction x0 (UniPC's default) rather than the noise. Default: `true`.
    pub predict_x0: bool,
    /// UniPC's B(h): `bh1` (for few steps, unguided) or `bh2` (guided). Default: `bh2`.
    pub solver_type: String,
    /// Use lower orders for the last steps (stabler below about 15 steps). Default: `true`.
    pub lower_order_final: bool,
    /// Steps (0-based) after which the corrector is skipped.
    pub disable_corrector: Vec<i64>,
    /// Karras et al. 2022 sigmas (rho = 7) in place of the training ones. Default: `false`.
    pub use_karras_sigmas: bool,
    /// Sigmas evenly spaced in log sigma. Default: `false`.
    pub use_exponential_sigmas: bool,
    /// Sigmas at the quantiles of Beta(0.6, 0.6) (Lee et al. 2024); refused here.
    pub use_beta_sigmas: bool,
    /// Flow-matching sigmas; refused here.
    pub use_flow_sigmas: bool,
    /// The shift of flow-matching sigmas. Default: `1.0`.
    pub flow_shift: f64,
    /// How inference timesteps are picked from the training ones: `leading`, `trailing` or
    /// `linspace` (Lin et al. 2023, table 2). Default: `linspace`.
    pub timestep_spacing: String,
    /// Added to every inference timestep (1 in SD 1.x configs). Default: `0`.
    pub steps_offset: usize,
    /// The sigma after the last step: `zero`, or `sigma_min` (the smallest training sigma).
    /// Default: `zero`.
    pub final_sigmas_type: String,
    /// Rescale the betas to zero terminal SNR (Lin et al. 2023); meant for `v_prediction` models.
    /// Default: `false`.
    pub rescale_betas_zero_snr: bool,
    /// Resolution-dependent shifting (flow models); refused here.
    pub use_dynamic_shifting: bool,
    /// How dynamic shifting shifts: `exponential` or `linear`. Default: `exponential`.
    pub time_shift_type: String,
    /// The smallest sigma of Karras, exponential and beta sigmas (default: the training
    /// schedule's). Default: none.
    pub sigma_min: Option<f64>,
    /// The largest sigma of Karras, exponential and beta sigmas (default: the training schedule's).
    /// Default: none.
    pub sigma_max: Option<f64>,
    /// Stretches shifted sigmas so that the last one is this value. Default: none.
    pub shift_terminal: Option<f64>,
}

impl Default for UniPcMultistepSchedulerConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: "linear".into(),
            trained_betas: None,
            solver_order: 2,
            prediction_type: "epsilon".into(),
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            sample_max_value: 1.0,
            predict_x0: true,
            solver_type: "bh2".into(),
            lower_order_final: true,
            disable_corrector: vec![],
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            use_flow_sigmas: false,
            flow_shift: 1.0,
            timestep_spacing: "linspace".into(),
            steps_offset: 0,
            final_sigmas_type: "zero".into(),
            rescale_betas_zero_snr: false,
            use_dynamic_shifting: false,
            time_shift_type: "exponential".into(),
            sigma_min: None,
            sigma_max: None,
            shift_terminal: None,
        }
    }
}

/// The B(h) of the UniPC update: bh1 = h, bh2 = e^h - 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SolverType {
    Bh1,
    Bh2,
}

/// diffusers' `UniPCMultistepScheduler`, built from a [`UniPcMultistepSchedulerConfig`].
pub struct UniPcMultistepScheduler {
    config: UniPcMultistepSchedulerConfig,
    solver_type: SolverType,
    sigma_schedule: SigmaSchedule,
    alphas_cumprod: Vec<f32>,
    /// The timesteps, and one sigma per timestep plus the final one (float32, as diffusers
    /// stores them).
    schedule: Schedule,
    num_inference_steps: Option<usize>,
    /// The converted outputs of the last `solver_order` steps, oldest first.
    model_outputs: Vec<Option<Tensor>>,
    lower_order_nums: usize,
    /// The order of the last predictor, which the next corrector repeats.
    this_order: usize,
    /// The sample the last predictor started from.
    last_sample: Option<Tensor>,
}

impl UniPcMultistepScheduler {
    /// Builds the scheduler; errors on config values it does not support.
    pub fn new(config: UniPcMultistepSchedulerConfig) -> Result<Self> {
        if config.thresholding {
            check_thresholding(config.dynamic_thresholding_ratio, config.sample_max_value)?;
        }
        let sigma_schedule =
            SigmaSchedule::from_flags(config.use_karras_sigmas, config.use_exponential_sigmas, config.use_beta_sigmas)?;
        for (key, set) in [
            ("use_flow_sigmas", config.use_flow_sigmas),
            ("use_dynamic_shifting", config.use_dynamic_shifting),
        ] {
            if set {
                return Err(Error::invalid(format!("`{key}` true is not supported by UniPCMultistepScheduler here")));
            }
        }
        if config.shift_terminal.is_some() {
            return Err(Error::invalid("`shift_terminal` is only supported with `use_flow_sigmas`"));
        }
        let solver_type = match config.solver_type.as_str() {
            "bh1" => SolverType::Bh1,
            // Other multistep schedulers' solver types: diffusers falls back to bh2.
            "bh2" | "midpoint" | "heun" | "logrho" => SolverType::Bh2,
            other => return Err(Error::invalid(format!("`solver_type` `{other}` is not one of bh1, bh2"))),
        };
        let predictions: &[&str] = if config.predict_x0 {
            &["epsilon", "sample", "v_prediction", "flow_prediction"]
        } else {
            &["epsilon", "sample", "v_prediction"]
        };
        check_one_of("prediction_type", &config.prediction_type, predictions)?;
        check_spacing(&config.timestep_spacing)?;
        check_one_of("final_sigmas_type", &config.final_sigmas_type, &["zero", "sigma_min"])?;
        check_solver_order(config.solver_order)?;

        let betas = betas::make_betas(
            &config.beta_schedule,
            config.beta_start,
            config.beta_end,
            config.num_train_timesteps,
            config.trained_betas.as_deref(),
            &[],
        )?;
        let alphas_cumprod = sigmas::alphas_cumprod(&betas, config.rescale_betas_zero_snr);
        let timesteps = (0..config.num_train_timesteps).rev().map(|t| t as f64).collect();
        let schedule = Schedule::multistep(timesteps, training_sigmas(&alphas_cumprod));
        Ok(Self {
            model_outputs: vec![None; config.solver_order],
            config,
            solver_type,
            sigma_schedule,
            alphas_cumprod,
            schedule,
            num_inference_steps: None,
            lower_order_nums: 0,
            this_order: 0,
            last_sample: None,
        })
    }

    /// Builds the scheduler from `scheduler_config.json`'s keys (unknown keys ignored, as diffusers
    /// does); `origin` names the file in errors.
    pub fn from_config(map: &Map<String, Value>, origin: &Path) -> Result<Self> {
        Self::new(parse_config(map, origin)?).map_err(|e| e.in_config_file(origin))
    }

    /// The config the scheduler was built from.
    pub fn config(&self) -> &UniPcMultistepSchedulerConfig {
        &self.config
    }

    /// The sigmas of the current schedule (one per timestep plus the final one).
    pub fn sigmas(&self) -> &[f32] {
        &self.schedule.sigmas
    }

    /// alpha_bar_t of every training timestep, in float32 (diffusers' `alphas_cumprod`).
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    /// Converts the model output to x0 (`predict_x0`) or to the noise (diffusers'
    /// `convert_model_output`).
    fn convert_model_output(&self, model_output: &Tensor, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        let sigma = self.schedule.sigmas[step_index];
        let prediction_type = self.config.prediction_type.as_str();
        if self.config.predict_x0 {
            let x0_pred = data_prediction(prediction_type, model_output, sample, sigma)?;
            if self.config.thresholding {
                threshold_sample(&x0_pred, self.config.dynamic_thresholding_ratio, self.config.sample_max_value)
            } else {
                Ok(x0_pred)
            }
        } else {
            noise_prediction(prediction_type, model_output, sample, sigma)
        }
    }

    /// The converted model output `back` steps before the newest one stored.
    fn past_output(&self, back: usize) -> Result<&Tensor> {
        self.model_outputs
            .len()
            .checked_sub(back + 1)
            .and_then(|index| self.model_outputs[index].as_ref())
            .ok_or_else(|| Error::invalid("multistep history is missing a model output"))
    }

    fn alpha_sigma_lambda(&self, index: usize) -> (f32, f32, f32) {
        let (alpha, sigma) = alpha_sigma_t(self.schedule.sigmas[index]);
        (alpha, sigma, lambda(alpha, sigma))
    }

    /// The pieces UniP and UniC share, for a step from sigma index `s0` to `t` of the given
    /// order, where the k-th older model output sits at sigma index `older(k)`: the ratios
    /// r_k of the older steps in lambda, the scaled differences D1_k = (m_k - m0) / r_k, and
    /// the system R rho = b with R[p][k] = r_k^p and b[p] = p! h phi_{p+1}(h) / B(h).
    fn bh_terms(&self, s0: usize, t: usize, order: usize, older: impl Fn(usize) -> usize) -> Result<BhTerms> {
        let (alpha_t, sigma_t, lambda_t) = self.alpha_sigma_lambda(t);
        let (alpha_s0, sigma_s0, lambda_s0) = self.alpha_sigma_lambda(s0);
        let h = lambda_t - lambda_s0;
        let m0 = self.past_output(0)?;
        let mut rks = Vec::with_capacity(order);
        let mut d1s = Vec::with_capacity(order);
        for k in 1..order {
            let (_, _, lambda_sk) = self.alpha_sigma_lambda(older(k));
            let rk = (lambda_sk - lambda_s0) / h;
            rks.push(rk);
            d1s.push(divide(&(self.past_output(k)? - m0)?, rk)?);
        }
        rks.push(1.0);

        let hh = if self.config.predict_x0 { -h } else { h };
        let h_phi_1 = hh.exp_m1(); // h * phi_1(h) = e^h - 1
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let b_h = match self.solver_type {
            SolverType::Bh1 => hh,
            SolverType::Bh2 => hh.exp_m1(),
        };
        let mut factorial_i = 1f64;
        let mut r = Vec::with_capacity(order);
        let mut b = Vec::with_capacity(order);
        for i in 1..=order {
            r.push(rks.iter().map(|&rk| powi_like_torch(rk, i - 1)).collect::<Vec<f32>>());
            b.push(h_phi_k * factorial_i as f32 / b_h);
            factorial_i *= (i + 1) as f64;
            h_phi_k = h_phi_k / hh - (1.0 / factorial_i) as f32;
        }
        Ok(BhTerms { alpha_t, sigma_t, alpha_s0, sigma_s0, h_phi_1, b_h, d1s, r, b })
    }

    /// The start of both updates: the first-order (DDIM-like) step from `x` with m0.
    fn first_order_part(&self, terms: &BhTerms, x: &Tensor, m0: &Tensor) -> Result<Tensor> {
        Ok(if self.config.predict_x0 {
            (scale(x, terms.sigma_t / terms.sigma_s0)? - scale(m0, terms.alpha_t * terms.h_phi_1)?)?
        } else {
            (scale(x, terms.alpha_t / terms.alpha_s0)? - scale(m0, terms.sigma_t * terms.h_phi_1)?)?
        })
    }

    /// The coefficient of the higher-order residual: alpha_t B(h) (or sigma_t B(h)).
    fn residual_scale(&self, terms: &BhTerms) -> f32 {
        if self.config.predict_x0 {
            terms.alpha_t * terms.b_h
        } else {
            terms.sigma_t * terms.b_h
        }
    }

    /// UniP: the predictor from the current sample to the next timestep (diffusers'
    /// `multistep_uni_p_bh_update`).
    fn uni_p_update(&self, step_index: usize, sample: &Tensor, order: usize) -> Result<Tensor> {
        let terms = self.bh_terms(step_index, step_index + 1, order, |k| step_index - k)?;
        let x_t_ = self.first_order_part(&terms, sample, self.past_output(0)?)?;
        if terms.d1s.is_empty() {
            // diffusers still subtracts alpha_t * B(h) * 0, which is NaN when B(h) is infinite:
            // bh1 (B(h) = h) stepping to a final sigma of 0 gives NaN there, and so do we.
            let zero_residual = self.residual_scale(&terms) * 0.0;
            return Ok(x_t_.affine(1.0, -zero_residual as f64)?);
        }
        // Order 2 has the closed form rho = 0.5.
        let rhos_p = if order == 2 {
            vec![0.5]
        } else {
            let k = order - 1;
            let r: Vec<Vec<f32>> = terms.r[..k].iter().map(|row| row[..k].to_vec()).collect();
            solve(&r, &terms.b[..k])?
        };
        let pred_res = weighted_sum(&rhos_p, &terms.d1s)?;
        Ok((x_t_ - scale(&pred_res, self.residual_scale(&terms))?)?)
    }

    /// UniC: corrects the last predictor's result by redoing that step from `last_sample`
    /// with the model output at the predicted sample included (diffusers'
    /// `multistep_uni_c_bh_update`). Runs before the new output joins the history.
    fn uni_c_update(
        &self,
        step_index: usize,
        this_model_output: &Tensor,
        last_sample: &Tensor,
        order: usize,
    ) -> Result<Tensor> {
        let terms = self.bh_terms(step_index - 1, step_index, order, |k| step_index - (k + 1))?;
        let m0 = self.past_output(0)?;
        let x_t_ = self.first_order_part(&terms, last_sample, m0)?;
        // Order 1 has the closed form rho = 0.5.
        let rhos_c = if order == 1 { vec![0.5] } else { solve(&terms.r, &terms.b)? };
        let (rho_t, rhos_older) = rhos_c.split_last().ok_or_else(|| Error::invalid("empty UniC system"))?;
        let d1_t = (this_model_output - m0)?;
        let correction = if terms.d1s.is_empty() {
            scale(&d1_t, *rho_t)?
        } else {
            (weighted_sum(rhos_older, &terms.d1s)? + scale(&d1_t, *rho_t)?)?
        };
        Ok((x_t_ - scale(&correction, self.residual_scale(&terms))?)?)
    }
}

struct BhTerms {
    alpha_t: f32,
    sigma_t: f32,
    alpha_s0: f32,
    sigma_s0: f32,
    h_phi_1: f32,
    b_h: f32,
    d1s: Vec<Tensor>,
    r: Vec<Vec<f32>>,
    b: Vec<f32>,
}

/// `torch.pow(x, n)` for a small integer n, which torch computes as 1, x, x*x, x*x*x.
fn powi_like_torch(x: f32, n: usize) -> f32 {
    match n {
        0 => 1.0,
        1 => x,
        2 => x * x,
        3 => x * x * x,
        _ => x.powf(n as f32),
    }
}

/// sum_k weights[k] * tensors[k] (diffusers' `einsum("k,bkc...->bc...")`).
fn weighted_sum(weights: &[f32], tensors: &[Tensor]) -> Result<Tensor> {
    let mut terms = weights.iter().zip(tensors);
    let (w0, t0) = terms.next().ok_or_else(|| Error::invalid("empty weighted sum"))?;
    let mut sum = scale(t0, *w0)?;
    for (w, t) in terms {
        sum = (sum + scale(t, *w)?)?;
    }
    Ok(sum)
}

/// Solves the small system `a x = b` (torch.linalg.solve) by Gaussian elimination with partial
/// pivoting in f64 on the float32 inputs, rounded back to float32.
fn solve(a: &[Vec<f32>], b: &[f32]) -> Result<Vec<f32>> {
    let n = b.len();
    let mut m: Vec<Vec<f64>> = a
        .iter()
        .zip(b)
        .map(|(row, &bi)| row.iter().map(|&v| v as f64).chain(std::iter::once(bi as f64)).collect())
        .collect();
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|&i, &j| m[i][col].abs().total_cmp(&m[j][col].abs()))
            .ok_or_else(|| Error::invalid("empty linear system"))?;
        if m[pivot][col] == 0.0 || !m[pivot][col].is_finite() {
            return Err(Error::invalid("UniPC's linear system is singular"));
        }
        m.swap(col, pivot);
        let (done, below) = m.split_at_mut(col + 1);
        let pivot_row = &done[col];
        for row in below {
            let factor = row[col] / pivot_row[col];
            for (value, pivot_value) in row[col..].iter_mut().zip(&pivot_row[col..]) {
                *value -= factor * pivot_value;
            }
        }
    }
    let mut x = vec![0f64; n];
    for row in (0..n).rev() {
        let tail: f64 = (row + 1..n).map(|k| m[row][k] * x[k]).sum();
        x[row] = (m[row][n] - tail) / m[row][row];
    }
    Ok(x.into_iter().map(|v| v as f32).collect())
}

impl Scheduler for UniPcMultistepScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let config = &self.config;
        let num_train = config.num_train_timesteps;
        let timesteps = multistep_timesteps(
            &config.timestep_spacing,
            num_train,
            num_train,
            num_inference_steps,
            config.steps_offset,
        )?;
        let training_sigmas = training_sigmas(&self.alphas_cumprod);
        let log_sigmas: Vec<f32> = training_sigmas.iter().map(|s| s.ln()).collect();
        let (sigma_min, sigma_max) = multistep_sigma_range(config.sigma_min, config.sigma_max, &training_sigmas);
        let zero_final = config.final_sigmas_type == "zero";
        let (timesteps, sigmas, sigma_last): (Vec<i64>, Vec<f64>, f32) = match self.sigma_schedule {
            SigmaSchedule::Karras => {
                let sigmas = karras_sigmas(sigma_min, sigma_max, num_inference_steps);
                let last = if zero_final { 0.0 } else { *sigmas.last().unwrap_or(&0.0) as f32 };
                (integer_timesteps_of(&sigmas, &log_sigmas, true), sigmas, last)
            }
            SigmaSchedule::Exponential => {
                let sigmas = exponential_sigmas(sigma_min, sigma_max, num_inference_steps);
                let last = if zero_final { 0.0 } else { *sigmas.last().unwrap_or(&0.0) as f32 };
                (integer_timesteps_of(&sigmas, &log_sigmas, false), sigmas, last)
            }
            SigmaSchedule::Interpolated => {
                let at: Vec<f32> = timesteps.iter().map(|&t| t as f32).collect();
                let last = if zero_final { 0.0 } else { training_sigmas[0] };
                (timesteps, interp(&at, &training_sigmas), last)
            }
        };
        let mut sigmas: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();
        sigmas.push(sigma_last);

        self.num_inference_steps = Some(timesteps.len());
        self.schedule.set(timesteps.into_iter().map(|t| t as f64).collect(), sigmas);
        self.model_outputs = vec![None; self.config.solver_order];
        self.lower_order_nums = 0;
        self.last_sample = None;
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.schedule.timesteps
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        _eta: f64,
        _generator: &mut TorchGenerator,
    ) -> Result<Tensor> {
        if self.num_inference_steps.is_none() {
            return Err(Error::invalid("call set_timesteps before step"));
        }
        let step_index = self.schedule.step_index(timestep)?;
        let num_timesteps = self.schedule.timesteps.len();
        if step_index >= num_timesteps {
            return Err(Error::invalid(format!("step {step_index} is past the {num_timesteps} timesteps")));
        }

        let use_corrector = step_index > 0
            && !self.config.disable_corrector.contains(&(step_index as i64 - 1))
            && self.last_sample.is_some();
        let model_output_convert = self.convert_model_output(model_output, sample, step_index)?;
        let sample = match (&self.last_sample, use_corrector) {
            (Some(last_sample), true) => {
                self.uni_c_update(step_index, &model_output_convert, last_sample, self.this_order)?
            }
            _ => sample.clone(),
        };

        self.model_outputs.rotate_left(1);
        if let Some(last) = self.model_outputs.last_mut() {
            *last = Some(model_output_convert);
        }

        let order = self.config.solver_order;
        let this_order = if self.config.lower_order_final { order.min(num_timesteps - step_index) } else { order };
        // Warm-up: the order grows with the available history.
        self.this_order = this_order.min(self.lower_order_nums + 1);
        self.last_sample = Some(sample.clone());
        let prev_sample = self.uni_p_update(step_index, &sample, self.this_order)?;

        if self.lower_order_nums < order {
            self.lower_order_nums += 1;
        }
        self.schedule.advance();
        Ok(prev_sample)
    }

    fn add_noise(&self, original_samples: &Tensor, noise: &Tensor, timesteps: &[f64]) -> Result<Tensor> {
        self.schedule.add_noise_vp(original_samples, noise, timesteps)
    }

    fn set_begin_index(&mut self, begin_index: usize) {
        self.schedule.set_begin_index(begin_index);
    }
}

#[cfg(test)]
mod tests {
    //! diffusers' full loops for this scheduler are in tests/scheduler_full_loop.rs.

    use serde_json::json;

    use super::*;

    #[test]
    fn linear_solve_matches_closed_form() {
        // [[2, 1], [1, 3]] x = [3, 5] has x = [0.8, 1.4]; a zero pivot needs the row swap.
        let x = solve(&[vec![2.0, 1.0], vec![1.0, 3.0]], &[3.0, 5.0]).unwrap();
        assert!((x[0] - 0.8).abs() < 1e-6 && (x[1] - 1.4).abs() < 1e-6, "{x:?}");
        let x = solve(&[vec![0.0, 1.0], vec![1.0, 0.0]], &[2.0, 3.0]).unwrap();
        assert_eq!(x, vec![3.0, 2.0]);
        assert!(solve(&[vec![1.0, 2.0], vec![2.0, 4.0]], &[1.0, 1.0]).is_err());
    }

    #[test]
    fn invalid_values_are_errors_naming_the_key() {
        for (config, key) in [
            (json!({"solver_type": "rk4"}), "solver_type"),
            (json!({"prediction_type": "noise"}), "prediction_type"),
            (json!({"predict_x0": false, "prediction_type": "flow_prediction"}), "prediction_type"),
            (json!({"final_sigmas_type": "one"}), "final_sigmas_type"),
            (json!({"disable_corrector": "all"}), "disable_corrector"),
        ] {
            let origin = Path::new("scheduler_config.json");
            let error = UniPcMultistepScheduler::from_config(config.as_object().unwrap(), origin)
                .err()
                .expect("invalid config accepted")
                .to_string();
            assert!(error.contains(key) && error.contains("scheduler_config.json"), "{error}");
        }
    }
}
