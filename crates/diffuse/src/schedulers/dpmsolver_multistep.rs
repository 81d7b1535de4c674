// Port of diffusers/schedulers/scheduling_dpmsolver_multistep.py (diffusers 0.42.1).
//! Multistep DPM-Solver (Lu et al. 2022, <https://arxiv.org/abs/2206.00927>) and DPM-Solver++
//! (Lu et al. 2022, <https://arxiv.org/abs/2211.01095>), ODE and SDE variants, orders 1 to 3.
//!
//! DPM-Solver++ integrates the data prediction x0(x_t); DPM-Solver the noise prediction. Each
//! step converts the model output to that quantity, keeps the last `solver_order` of them and
//! extrapolates in lambda = log(alpha_t / sigma_t).

use std::path::Path;

use candle_core::{DType, Tensor};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::sigmas::{
    self, alpha_sigma_t, data_prediction, divide, exponential_sigmas, integer_timesteps_of, interp, karras_sigmas,
    lambda, multistep_sigma_range, noise_prediction, scale, training_sigmas, Schedule, SigmaSchedule,
};
use super::spacing::{check_spacing, multistep_timesteps, np_linspace};
use super::{betas, check_one_of, check_solver_order, check_thresholding, threshold_sample, Scheduler};
use crate::loading::config::parse_config;
use crate::rng::TorchGenerator;
use crate::{Error, Result};

/// `DPMSolverMultistepScheduler`'s config, with diffusers' names and defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct DpmSolverMultistepSchedulerConfig {
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
    /// The algorithm: `dpmsolver++` (on x0), `dpmsolver` (on the noise), `sde-dpmsolver++` or
    /// `sde-dpmsolver` (stochastic); `deis` runs as `dpmsolver++`. Default: `dpmsolver++`.
    pub algorithm_type: String,
    /// The second-order update: `midpoint` or `heun` (`logrho`, `bh1`, `bh2` run as `midpoint`).
    /// Default: `midpoint`.
    pub solver_type: String,
    /// Use lower orders for the last steps (stabler below about 15 steps). Default: `true`.
    pub lower_order_final: bool,
    /// Make the last step first-order (Euler). Default: `false`.
    pub euler_at_final: bool,
    /// Karras et al. 2022 sigmas (rho = 7) in place of the training ones. Default: `false`.
    pub use_karras_sigmas: bool,
    /// Sigmas evenly spaced in log sigma. Default: `false`.
    pub use_exponential_sigmas: bool,
    /// Sigmas at the quantiles of Beta(0.6, 0.6) (Lee et al. 2024); refused here.
    pub use_beta_sigmas: bool,
    /// Timesteps evenly spaced in log-SNR lambda (Lu et al., DPM-Solver++). Default: `false`.
    pub use_lu_lambdas: bool,
    /// Flow-matching sigmas; refused here.
    pub use_flow_sigmas: bool,
    /// The shift of flow-matching sigmas. Default: `1.0`.
    pub flow_shift: f64,
    /// The sigma after the last step: `zero`, or `sigma_min` (the smallest training sigma).
    /// Default: `zero`.
    pub final_sigmas_type: String,
    /// Timesteps whose log-SNR lambda is below this are skipped (-5.1 for cosine schedules).
    /// Default: `f64::NEG_INFINITY`.
    pub lambda_min_clipped: f64,
    /// `learned`/`learned_range` models output the variance too (the channels after the
    /// first 3); any other value (a DDPM config's `fixed_small`) means no variance output.
    pub variance_type: Option<String>,
    /// How inference timesteps are picked from the training ones: `leading`, `trailing` or
    /// `linspace` (Lin et al. 2023, table 2). Default: `linspace`.
    pub timestep_spacing: String,
    /// Added to every inference timestep (1 in SD 1.x configs). Default: `0`.
    pub steps_offset: usize,
    /// Rescale the betas to zero terminal SNR (Lin et al. 2023); meant for `v_prediction` models.
    /// Default: `false`.
    pub rescale_betas_zero_snr: bool,
    /// Resolution-dependent shifting (flow models); refused here.
    pub use_dynamic_shifting: bool,
    /// How dynamic shifting shifts: `exponential` or `linear`. Default: `exponential`.
    pub time_shift_type: String,
    /// Not parameters of this class, but diffusers keeps them when the config comes from a
    /// scheduler that has them (Euler, UniPC), and its Karras/exponential sigmas then use them.
    pub sigma_min: Option<f64>,
    /// The largest sigma of Karras, exponential and beta sigmas (default: the training schedule's).
    /// Default: none.
    pub sigma_max: Option<f64>,
}

impl Default for DpmSolverMultistepSchedulerConfig {
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
            algorithm_type: "dpmsolver++".into(),
            solver_type: "midpoint".into(),
            lower_order_final: true,
            euler_at_final: false,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            use_lu_lambdas: false,
            use_flow_sigmas: false,
            flow_shift: 1.0,
            final_sigmas_type: "zero".into(),
            lambda_min_clipped: f64::NEG_INFINITY,
            variance_type: None,
            timestep_spacing: "linspace".into(),
            steps_offset: 0,
            rescale_betas_zero_snr: false,
            use_dynamic_shifting: false,
            time_shift_type: "exponential".into(),
            sigma_min: None,
            sigma_max: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Algorithm {
    DpmSolver,
    DpmSolverPlusPlus,
    SdeDpmSolver,
    SdeDpmSolverPlusPlus,
}

impl Algorithm {
    /// The ++ variants work with the data prediction x0, the others with the noise.
    fn predicts_data(self) -> bool {
        matches!(self, Algorithm::DpmSolverPlusPlus | Algorithm::SdeDpmSolverPlusPlus)
    }
    fn is_sde(self) -> bool {
        matches!(self, Algorithm::SdeDpmSolver | Algorithm::SdeDpmSolverPlusPlus)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SolverType {
    Midpoint,
    Heun,
}

/// diffusers' `DPMSolverMultistepScheduler`, built from a [`DpmSolverMultistepSchedulerConfig`].
pub struct DpmSolverMultistepScheduler {
    config: DpmSolverMultistepSchedulerConfig,
    algorithm: Algorithm,
    solver_type: SolverType,
    sigma_schedule: SigmaSchedule,
    alphas_cumprod: Vec<f32>,
    /// lambda_t of every training timestep (float32), for `lambda_min_clipped`.
    lambdas: Vec<f32>,
    /// The timesteps, and one sigma per timestep plus the final one (float32, as diffusers
    /// stores them).
    schedule: Schedule,
    num_inference_steps: Option<usize>,
    /// The converted outputs of the last `solver_order` steps, oldest first.
    model_outputs: Vec<Option<Tensor>>,
    lower_order_nums: usize,
}

impl DpmSolverMultistepScheduler {
    /// Builds the scheduler; errors on config values it does not support.
    pub fn new(config: DpmSolverMultistepSchedulerConfig) -> Result<Self> {
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
                return Err(Error::invalid(format!(
                    "`{key}` true is not supported by DPMSolverMultistepScheduler here"
                )));
            }
        }
        let algorithm = match config.algorithm_type.as_str() {
            "dpmsolver" => Algorithm::DpmSolver,
            // diffusers switches a DEIS config to DPM-Solver++.
            "dpmsolver++" | "deis" => Algorithm::DpmSolverPlusPlus,
            "sde-dpmsolver" => Algorithm::SdeDpmSolver,
            "sde-dpmsolver++" => Algorithm::SdeDpmSolverPlusPlus,
            other => {
                return Err(Error::invalid(format!(
                    "`algorithm_type` `{other}` is not one of dpmsolver, dpmsolver++, sde-dpmsolver, sde-dpmsolver++"
                )))
            }
        };
        let solver_type = match config.solver_type.as_str() {
            "midpoint" => SolverType::Midpoint,
            "heun" => SolverType::Heun,
            // Other multistep schedulers' solver types: diffusers falls back to midpoint.
            "logrho" | "bh1" | "bh2" => SolverType::Midpoint,
            other => return Err(Error::invalid(format!("`solver_type` `{other}` is not one of midpoint, heun"))),
        };
        check_one_of("final_sigmas_type", &config.final_sigmas_type, &["zero", "sigma_min"])?;
        if !algorithm.predicts_data() && config.final_sigmas_type == "zero" {
            return Err(Error::invalid(format!(
                "`final_sigmas_type` zero is not supported for `algorithm_type` {}; use sigma_min",
                config.algorithm_type
            )));
        }
        let predictions: &[&str] = if algorithm.predicts_data() {
            &["epsilon", "sample", "v_prediction", "flow_prediction"]
        } else {
            &["epsilon", "sample", "v_prediction"]
        };
        check_one_of("prediction_type", &config.prediction_type, predictions)?;
        check_spacing(&config.timestep_spacing)?;
        check_solver_order(config.solver_order)?;
        // diffusers has no third-order update for sde-dpmsolver (it fails on the third step).
        if algorithm == Algorithm::SdeDpmSolver && config.solver_order >= 3 {
            return Err(Error::invalid("`solver_order` 3 is not available for `algorithm_type` sde-dpmsolver"));
        }

        let betas = betas::make_betas(
            &config.beta_schedule,
            config.beta_start,
            config.beta_end,
            config.num_train_timesteps,
            config.trained_betas.as_deref(),
            &[],
        )?;
        let alphas_cumprod = sigmas::alphas_cumprod(&betas, config.rescale_betas_zero_snr);
        let lambdas = alphas_cumprod.iter().map(|a| lambda(a.sqrt(), (1.0 - a).sqrt())).collect();
        // Before `set_timesteps`: every training timestep, as diffusers initialises them.
        let timesteps = (0..config.num_train_timesteps).rev().map(|t| t as f64).collect();
        let schedule = Schedule::multistep(timesteps, training_sigmas(&alphas_cumprod));
        Ok(Self {
            model_outputs: vec![None; config.solver_order],
            config,
            algorithm,
            solver_type,
            sigma_schedule,
            alphas_cumprod,
            lambdas,
            schedule,
            num_inference_steps: None,
            lower_order_nums: 0,
        })
    }

    /// Builds the scheduler from `scheduler_config.json`'s keys (unknown keys ignored, as diffusers
    /// does); `origin` names the file in errors.
    pub fn from_config(map: &Map<String, Value>, origin: &Path) -> Result<Self> {
        Self::new(parse_config(map, origin)?).map_err(|e| e.in_config_file(origin))
    }

    /// The config the scheduler was built from.
    pub fn config(&self) -> &DpmSolverMultistepSchedulerConfig {
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

    /// Converts the model output to what the algorithm integrates: x0 for DPM-Solver++,
    /// the noise for DPM-Solver (diffusers' `convert_model_output`).
    fn convert_model_output(&self, model_output: &Tensor, sample: &Tensor, step_index: usize) -> Result<Tensor> {
        let sigma = self.schedule.sigmas[step_index];
        let prediction_type = self.config.prediction_type.as_str();
        // A learned-variance model's channels after the first 3 (the mean) are the variance,
        // which diffusers drops from a noise prediction.
        let learned_variance = matches!(self.config.variance_type.as_deref(), Some("learned" | "learned_range"));
        let model_output = if learned_variance && prediction_type == "epsilon" {
            model_output.narrow(1, 0, 3.min(model_output.dim(1)?))?
        } else {
            model_output.clone()
        };
        let threshold = |x0: Tensor| -> Result<Tensor> {
            if self.config.thresholding {
                threshold_sample(&x0, self.config.dynamic_thresholding_ratio, self.config.sample_max_value)
            } else {
                Ok(x0)
            }
        };
        if self.algorithm.predicts_data() {
            threshold(data_prediction(prediction_type, &model_output, sample, sigma)?)
        } else {
            let epsilon = noise_prediction(prediction_type, &model_output, sample, sigma)?;
            if self.config.thresholding {
                let (alpha_t, sigma_t) = alpha_sigma_t(sigma);
                let x0_pred = divide(&(sample - scale(&epsilon, sigma_t)?)?, alpha_t)?;
                let x0_pred = threshold(x0_pred)?;
                Ok(divide(&(sample - scale(&x0_pred, alpha_t)?)?, sigma_t)?)
            } else {
                Ok(epsilon)
            }
        }
    }

    /// (alpha, sigma, lambda) at position `index` of the sigma schedule.
    fn alpha_sigma_lambda(&self, index: usize) -> (f32, f32, f32) {
        let (alpha, sigma) = alpha_sigma_t(self.schedule.sigmas[index]);
        (alpha, sigma, lambda(alpha, sigma))
    }

    /// The most recent converted model output `back` steps ago (0 = this step), in float32.
    fn past_output(&self, back: usize) -> Result<Tensor> {
        let index = self.model_outputs.len() - 1 - back;
        match &self.model_outputs[index] {
            Some(output) => Ok(output.to_dtype(DType::F32)?),
            None => Err(Error::invalid("multistep history is missing a model output")),
        }
    }

    /// First-order step (DDIM for the ODE variants).
    fn first_order_update(&self, step_index: usize, sample: &Tensor, noise: Option<&Tensor>) -> Result<Tensor> {
        let m0 = self.past_output(0)?;
        let (alpha_t, sigma_t, lambda_t) = self.alpha_sigma_lambda(step_index + 1);
        let (alpha_s, sigma_s, lambda_s) = self.alpha_sigma_lambda(step_index);
        let h = lambda_t - lambda_s;
        Ok(match self.algorithm {
            Algorithm::DpmSolverPlusPlus => {
                (scale(sample, sigma_t / sigma_s)? - scale(&m0, alpha_t * ((-h).exp() - 1.0))?)?
            }
            Algorithm::DpmSolver => (scale(sample, alpha_t / alpha_s)? - scale(&m0, sigma_t * (h.exp() - 1.0))?)?,
            Algorithm::SdeDpmSolverPlusPlus => {
                let noise = noise.ok_or_else(|| Error::invalid("the SDE solver needs noise"))?;
                ((scale(sample, sigma_t / sigma_s * (-h).exp())? + scale(&m0, alpha_t * (1.0 - (-2.0 * h).exp()))?)?
                    + scale(noise, sigma_t * (1.0 - (-2.0 * h).exp()).sqrt())?)?
            }
            Algorithm::SdeDpmSolver => {
                let noise = noise.ok_or_else(|| Error::invalid("the SDE solver needs noise"))?;
                ((scale(sample, alpha_t / alpha_s)? - scale(&m0, 2.0 * (sigma_t * (h.exp() - 1.0)))?)?
                    + scale(noise, sigma_t * ((2.0 * h).exp() - 1.0).sqrt())?)?
            }
        })
    }

    /// Second-order multistep step from the last two model outputs.
    fn second_order_update(&self, step_index: usize, sample: &Tensor, noise: Option<&Tensor>) -> Result<Tensor> {
        let (m0, m1) = (self.past_output(0)?, self.past_output(1)?);
        let (alpha_t, sigma_t, lambda_t) = self.alpha_sigma_lambda(step_index + 1);
        let (alpha_s0, sigma_s0, lambda_s0) = self.alpha_sigma_lambda(step_index);
        let (_, _, lambda_s1) = self.alpha_sigma_lambda(step_index - 1);
        let (h, h_0) = (lambda_t - lambda_s0, lambda_s0 - lambda_s1);
        let r0 = h_0 / h;
        let d0 = &m0;
        let d1 = scale(&(&m0 - &m1)?, 1.0 / r0)?;
        let midpoint = self.solver_type == SolverType::Midpoint;
        Ok(match self.algorithm {
            Algorithm::DpmSolverPlusPlus => {
                let first = (scale(sample, sigma_t / sigma_s0)? - scale(d0, alpha_t * ((-h).exp() - 1.0))?)?;
                if midpoint {
                    (first - scale(&d1, 0.5 * (alpha_t * ((-h).exp() - 1.0)))?)?
                } else {
                    (first + scale(&d1, alpha_t * (((-h).exp() - 1.0) / h + 1.0))?)?
                }
            }
            Algorithm::DpmSolver => {
                let first = (scale(sample, alpha_t / alpha_s0)? - scale(d0, sigma_t * (h.exp() - 1.0))?)?;
                if midpoint {
                    (first - scale(&d1, 0.5 * (sigma_t * (h.exp() - 1.0)))?)?
                } else {
                    (first - scale(&d1, sigma_t * ((h.exp() - 1.0) / h - 1.0))?)?
                }
            }
            Algorithm::SdeDpmSolverPlusPlus => {
                let noise = noise.ok_or_else(|| Error::invalid("the SDE solver needs noise"))?;
                let decay = 1.0 - (-2.0 * h).exp();
                let first = (scale(sample, sigma_t / sigma_s0 * (-h).exp())? + scale(d0, alpha_t * decay)?)?;
                let second = if midpoint {
                    (first + scale(&d1, 0.5 * (alpha_t * decay))?)?
                } else {
                    (first + scale(&d1, alpha_t * (decay / (-2.0 * h) + 1.0))?)?
                };
                (second + scale(noise, sigma_t * decay.sqrt())?)?
            }
            Algorithm::SdeDpmSolver => {
                let noise = noise.ok_or_else(|| Error::invalid("the SDE solver needs noise"))?;
                let first = (scale(sample, alpha_t / alpha_s0)? - scale(d0, 2.0 * (sigma_t * (h.exp() - 1.0)))?)?;
                let second = if midpoint {
                    (first - scale(&d1, sigma_t * (h.exp() - 1.0))?)?
                } else {
                    (first - scale(&d1, 2.0 * (sigma_t * ((h.exp() - 1.0) / h - 1.0)))?)?
                };
                (second + scale(noise, sigma_t * ((2.0 * h).exp() - 1.0).sqrt())?)?
            }
        })
    }

    /// Third-order multistep step from the last three model outputs.
    fn third_order_update(&self, step_index: usize, sample: &Tensor, noise: Option<&Tensor>) -> Result<Tensor> {
        let (m0, m1, m2) = (self.past_output(0)?, self.past_output(1)?, self.past_output(2)?);
        let (alpha_t, sigma_t, lambda_t) = self.alpha_sigma_lambda(step_index + 1);
        let (alpha_s0, sigma_s0, lambda_s0) = self.alpha_sigma_lambda(step_index);
        let (_, _, lambda_s1) = self.alpha_sigma_lambda(step_index - 1);
        let (_, _, lambda_s2) = self.alpha_sigma_lambda(step_index - 2);
        let (h, h_0, h_1) = (lambda_t - lambda_s0, lambda_s0 - lambda_s1, lambda_s1 - lambda_s2);
        let (r0, r1) = (h_0 / h, h_1 / h);
        let d0 = &m0;
        let d1_0 = scale(&(&m0 - &m1)?, 1.0 / r0)?;
        let d1_1 = scale(&(&m1 - &m2)?, 1.0 / r1)?;
        let d1_difference = (&d1_0 - &d1_1)?;
        let d1 = (&d1_0 + scale(&d1_difference, r0 / (r0 + r1))?)?;
        let d2 = scale(&d1_difference, 1.0 / (r0 + r1))?;
        Ok(match self.algorithm {
            Algorithm::DpmSolverPlusPlus => {
                let e = (-h).exp();
                (((scale(sample, sigma_t / sigma_s0)? - scale(d0, alpha_t * (e - 1.0))?)?
                    + scale(&d1, alpha_t * ((e - 1.0) / h + 1.0))?)?
                    - scale(&d2, alpha_t * ((e - 1.0 + h) / (h * h) - 0.5))?)?
            }
            Algorithm::DpmSolver => {
                let e = h.exp();
                (((scale(sample, alpha_t / alpha_s0)? - scale(d0, sigma_t * (e - 1.0))?)?
                    - scale(&d1, sigma_t * ((e - 1.0) / h - 1.0))?)?
                    - scale(&d2, sigma_t * ((e - 1.0 - h) / (h * h) - 0.5))?)?
            }
            Algorithm::SdeDpmSolverPlusPlus => {
                let noise = noise.ok_or_else(|| Error::invalid("the SDE solver needs noise"))?;
                let decay = 1.0 - (-2.0 * h).exp();
                ((((scale(sample, sigma_t / sigma_s0 * (-h).exp())? + scale(d0, alpha_t * decay)?)?
                    + scale(&d1, alpha_t * (decay / (-2.0 * h) + 1.0))?)?
                    + scale(&d2, alpha_t * ((decay - 2.0 * h) / ((2.0 * h) * (2.0 * h)) - 0.5))?)?
                    + scale(noise, sigma_t * decay.sqrt())?)?
            }
            Algorithm::SdeDpmSolver => {
                return Err(Error::invalid("sde-dpmsolver has no third-order update"));
            }
        })
    }
}

impl Scheduler for DpmSolverMultistepScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let config = &self.config;
        let num_train = config.num_train_timesteps;
        // Clipping the minimum lambda(t) for numerical stability (critical for the cosine
        // schedule): the timesteps whose lambda is below `lambda_min_clipped` are cut off.
        let clipped_index = self.lambdas.iter().filter(|&&l| (l as f64) < config.lambda_min_clipped).count();
        let last_timestep = num_train - clipped_index;
        let timesteps = multistep_timesteps(
            &config.timestep_spacing,
            last_timestep,
            num_train,
            num_inference_steps,
            config.steps_offset,
        )?;

        let training_sigmas = training_sigmas(&self.alphas_cumprod);
        let log_sigmas: Vec<f32> = training_sigmas.iter().map(|s| s.ln()).collect();
        // Timesteps found from the sigmas are rounded, except for the cosine schedule (as
        // diffusers does), then truncated to integers.
        let round = config.beta_schedule != "squaredcos_cap_v2";
        let (sigma_min, sigma_max) = multistep_sigma_range(config.sigma_min, config.sigma_max, &training_sigmas);
        let (timesteps, sigmas): (Vec<i64>, Vec<f64>) = match self.sigma_schedule {
            SigmaSchedule::Karras => {
                let sigmas = karras_sigmas(sigma_min, sigma_max, num_inference_steps);
                (integer_timesteps_of(&sigmas, &log_sigmas, round), sigmas)
            }
            _ if config.use_lu_lambdas => {
                // Uniform steps in log sigma (diffusers calls these lambdas) between its extremes.
                let lambda_min = log_sigmas[0] as f64;
                let lambda_max = *log_sigmas.last().unwrap_or(&0.0) as f64;
                let sigmas: Vec<f64> = np_linspace(0.0, 1.0, num_inference_steps)
                    .into_iter()
                    .map(|ramp| (lambda_max + ramp * (lambda_min - lambda_max)).exp())
                    .collect();
                (integer_timesteps_of(&sigmas, &log_sigmas, round), sigmas)
            }
            SigmaSchedule::Exponential => {
                let sigmas = exponential_sigmas(sigma_min, sigma_max, num_inference_steps);
                (integer_timesteps_of(&sigmas, &log_sigmas, false), sigmas)
            }
            SigmaSchedule::Interpolated => {
                let at: Vec<f32> = timesteps.iter().map(|&t| t as f32).collect();
                (timesteps, interp(&at, &training_sigmas))
            }
        };

        let sigma_last = match config.final_sigmas_type.as_str() {
            "sigma_min" => training_sigmas[0],
            _ => 0.0,
        };
        let mut sigmas: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();
        sigmas.push(sigma_last);

        self.num_inference_steps = Some(timesteps.len());
        self.schedule.set(timesteps.into_iter().map(|t| t as f64).collect(), sigmas);
        self.model_outputs = vec![None; self.config.solver_order];
        self.lower_order_nums = 0;
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
        generator: &mut TorchGenerator,
    ) -> Result<Tensor> {
        if self.num_inference_steps.is_none() {
            return Err(Error::invalid("call set_timesteps before step"));
        }
        let step_index = self.schedule.step_index(timestep)?;
        let num_timesteps = self.schedule.timesteps.len();
        if step_index >= num_timesteps {
            return Err(Error::invalid(format!("step {step_index} is past the {num_timesteps} timesteps")));
        }

        // Lower orders at the end improve numerical stability for few steps.
        let lower_order_final = step_index == num_timesteps - 1
            && (self.config.euler_at_final
                || (self.config.lower_order_final && num_timesteps < 15)
                || self.config.final_sigmas_type == "zero");
        let lower_order_second = step_index + 2 == num_timesteps && self.config.lower_order_final && num_timesteps < 15;

        let model_output = self.convert_model_output(model_output, sample, step_index)?;
        self.model_outputs.rotate_left(1);
        if let Some(last) = self.model_outputs.last_mut() {
            *last = Some(model_output.clone());
        }

        // The update runs in float32 whatever the sample's dtype.
        let sample = sample.to_dtype(DType::F32)?;
        // The SDE variants draw fresh noise every step.
        let noise = if self.algorithm.is_sde() {
            Some(generator.randn_tensor(model_output.dims(), model_output.device())?)
        } else {
            None
        };

        let order = self.config.solver_order;
        let prev_sample = if order == 1 || self.lower_order_nums < 1 || lower_order_final {
            self.first_order_update(step_index, &sample, noise.as_ref())?
        } else if order == 2 || self.lower_order_nums < 2 || lower_order_second {
            self.second_order_update(step_index, &sample, noise.as_ref())?
        } else {
            self.third_order_update(step_index, &sample, noise.as_ref())?
        };

        if self.lower_order_nums < order {
            self.lower_order_nums += 1;
        }
        self.schedule.advance();
        Ok(prev_sample.to_dtype(model_output.dtype())?)
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

    fn from_json(config: Value) -> Result<DpmSolverMultistepScheduler> {
        DpmSolverMultistepScheduler::from_config(config.as_object().unwrap(), Path::new("scheduler_config.json"))
    }

    #[test]
    fn duplicated_timesteps() {
        let mut scheduler = from_json(json!({})).unwrap();
        scheduler.set_timesteps(1000).unwrap();
        assert_eq!(scheduler.timesteps().len(), scheduler.num_inference_steps.unwrap());
        assert_eq!(scheduler.timesteps().len(), 1000);
    }

    #[test]
    fn invalid_values_are_errors_naming_the_key() {
        for (config, key) in [
            (json!({"algorithm_type": "ddim"}), "algorithm_type"),
            (json!({"solver_type": "rk4"}), "solver_type"),
            (json!({"prediction_type": "noise"}), "prediction_type"),
            (json!({"timestep_spacing": "uniform"}), "timestep_spacing"),
            (json!({"algorithm_type": "dpmsolver", "final_sigmas_type": "zero"}), "final_sigmas_type"),
            (json!({"solver_order": "two"}), "solver_order"),
        ] {
            let error = from_json(config).err().expect("invalid config accepted").to_string();
            assert!(error.contains(key) && error.contains("scheduler_config.json"), "{error}");
        }
        // A DDPM config's variance type is not a learned one, and is accepted as such.
        assert!(from_json(json!({"variance_type": "fixed_small"})).is_ok());
    }
}
