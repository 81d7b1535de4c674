//! Port of diffusers/schedulers/scheduling_lms_discrete.py (`LMSDiscreteScheduler`): a linear
//! multistep (Adams–Bashforth-like) method on the probability-flow ODE in sigma, as in
//! k-diffusion's `sample_lms`.

use std::collections::VecDeque;
use std::path::Path;

use candle_core::Tensor;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::sigmas::{self, divide, scale, Schedule, SigmaSchedule};
use super::{betas, spacing, PredictionType, Scheduler};
use crate::loading::config::parse_config;
use crate::rng::TorchGenerator;
use crate::{Error, Result};

/// diffusers' default order of the multistep method (`step(..., order=4)`).
pub const DEFAULT_ORDER: usize = 4;

/// `LMSDiscreteScheduler`'s `scheduler_config.json`, with diffusers' names and defaults.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct LMSDiscreteSchedulerConfig {
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
    /// Karras et al. 2022 sigmas (rho = 7) in place of the training ones. Default: `false`.
    pub use_karras_sigmas: Option<bool>,
    /// Sigmas evenly spaced in log sigma. Default: `false`.
    pub use_exponential_sigmas: Option<bool>,
    /// Sigmas at the quantiles of Beta(0.6, 0.6) (Lee et al. 2024); refused here.
    pub use_beta_sigmas: Option<bool>,
    /// What the model predicts: `epsilon` (the noise), `sample` (x0) or `v_prediction`. Default:
    /// `epsilon`.
    pub prediction_type: String,
    /// How inference timesteps are picked from the training ones: `leading`, `trailing` or
    /// `linspace` (Lin et al. 2023, table 2). Default: `linspace`.
    pub timestep_spacing: String,
    /// Added to every inference timestep (1 in SD 1.x configs). Default: `0`.
    pub steps_offset: usize,
    /// Not LMS's own keys: diffusers keeps those of another scheduler's config (EulerDiscrete's)
    /// and its exponential sigmas use them as bounds when set. Its Karras sigmas do not.
    pub sigma_min: Option<f64>,
    /// The largest sigma of Karras, exponential and beta sigmas (default: the training schedule's).
    /// Default: none.
    pub sigma_max: Option<f64>,
}

impl Default for LMSDiscreteSchedulerConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: "linear".into(),
            trained_betas: None,
            use_karras_sigmas: Some(false),
            use_exponential_sigmas: Some(false),
            use_beta_sigmas: Some(false),
            prediction_type: "epsilon".into(),
            timestep_spacing: "linspace".into(),
            steps_offset: 0,
            sigma_min: None,
            sigma_max: None,
        }
    }
}

/// diffusers' `LMSDiscreteScheduler`, built from a [`LMSDiscreteSchedulerConfig`].
pub struct LMSDiscreteScheduler {
    config: LMSDiscreteSchedulerConfig,
    prediction_type: PredictionType,
    sigma_schedule: SigmaSchedule,
    alphas_cumprod: Vec<f32>,
    training_sigmas: Vec<f32>,
    /// The inference timesteps, and their sigmas (descending) with a final 0.
    schedule: Schedule,
    /// The last `order` derivatives dx/dsigma, oldest first.
    derivatives: VecDeque<Tensor>,
}

impl LMSDiscreteScheduler {
    /// Builds the scheduler; errors on config values it does not support.
    pub fn new(config: LMSDiscreteSchedulerConfig) -> Result<Self> {
        let prediction_type = PredictionType::parse(&config.prediction_type)?;
        let sigma_schedule = SigmaSchedule::from_flags(
            config.use_karras_sigmas.unwrap_or(false),
            config.use_exponential_sigmas.unwrap_or(false),
            config.use_beta_sigmas.unwrap_or(false),
        )?;
        spacing::check_spacing(&config.timestep_spacing)?;
        let betas = betas::make_betas(
            &config.beta_schedule,
            config.beta_start,
            config.beta_end,
            config.num_train_timesteps,
            config.trained_betas.as_deref(),
            &[],
        )?;
        let alphas_cumprod = sigmas::alphas_cumprod(&betas, false);
        let training_sigmas = sigmas::training_sigmas(&alphas_cumprod);
        let mut scheduler = Self {
            config,
            prediction_type,
            sigma_schedule,
            alphas_cumprod,
            training_sigmas,
            schedule: Schedule::default(),
            derivatives: VecDeque::new(),
        };
        // As diffusers' constructor: a schedule over every training timestep.
        scheduler.set_timesteps(scheduler.config.num_train_timesteps)?;
        Ok(scheduler)
    }

    /// Builds the scheduler from `scheduler_config.json`'s keys (unknown keys ignored, as diffusers
    /// does); `origin` names the file in errors.
    pub fn from_config(map: &Map<String, Value>, origin: &Path) -> Result<Self> {
        Self::new(parse_config(map, origin)?).map_err(|e| e.in_config_file(origin))
    }

    /// The config the scheduler was built from.
    pub fn config(&self) -> &LMSDiscreteSchedulerConfig {
        &self.config
    }

    /// The inference sigmas, with the final 0 appended.
    pub fn sigmas(&self) -> &[f32] {
        &self.schedule.sigmas
    }

    /// alpha_bar_t of every training timestep, in float32 (diffusers' `alphas_cumprod`).
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    /// The weight of the derivative from `current_order` steps back in the step from
    /// sigma_t to sigma_{t+1}: the integral over that interval of its Lagrange basis polynomial
    /// through the last `order` sigmas. diffusers integrates it with `scipy.integrate.quad`;
    /// the integrand is a polynomial, so we integrate it exactly.
    pub fn lms_coefficient(&self, order: usize, t: usize, current_order: usize) -> Result<f64> {
        let sigmas = &self.schedule.sigmas;
        if order > t + 1 || current_order >= order || t + 1 >= sigmas.len() {
            return Err(Error::invalid(format!(
                "no LMS coefficient of order {order} for derivative {current_order} at step {t}"
            )));
        }
        let sigma = |k: usize| sigmas[t - k] as f64;
        let start = sigmas[t] as f64;
        let end = sigmas[t + 1] as f64;
        // The basis polynomial in u = tau - start, as coefficients of u^0, u^1, ...
        let mut polynomial = vec![1.0f64];
        for k in (0..order).filter(|&k| k != current_order) {
            let denominator = sigma(current_order) - sigma(k);
            // (u + start - sigma_{t-k}) / denominator
            let constant = (start - sigma(k)) / denominator;
            let linear = 1.0 / denominator;
            let mut next = vec![0.0; polynomial.len() + 1];
            for (power, &c) in polynomial.iter().enumerate() {
                next[power] += c * constant;
                next[power + 1] += c * linear;
            }
            polynomial = next;
        }
        let width = end - start;
        Ok(polynomial.iter().enumerate().map(|(power, &c)| c * width.powi(power as i32 + 1) / (power + 1) as f64).sum())
    }

    /// One step of the linear multistep method of the given `order` (diffusers' default 4;
    /// the first steps use as many past derivatives as there are).
    pub fn step_with_order(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        order: usize,
    ) -> Result<Tensor> {
        if order == 0 {
            return Err(Error::invalid("the LMS order must be at least 1"));
        }
        let i = self.schedule.step_index(timestep)?;
        let sigma = self.schedule.sigma(i)?;
        self.schedule.sigma(i + 1)?;

        // 1. x_0 from the model output.
        let pred_original_sample = sigmas::denoised(self.prediction_type, model_output, sample, sigma)?;

        // 2. The ODE derivative dx/dsigma, kept for the next steps.
        let derivative = divide(&(sample - &pred_original_sample)?, sigma)?;
        self.derivatives.push_back(derivative);
        if self.derivatives.len() > order {
            self.derivatives.pop_front();
        }

        // 3. The multistep update: sample + sum of coefficient * derivative, newest first.
        let order = order.min(i + 1);
        let coefficients = (0..order).map(|k| self.lms_coefficient(order, i, k)).collect::<Result<Vec<f64>>>()?;
        let mut update: Option<Tensor> = None;
        for (coefficient, derivative) in coefficients.iter().zip(self.derivatives.iter().rev()) {
            let term = scale(derivative, *coefficient as f32)?;
            update = Some(match update {
                None => term,
                Some(sum) => (sum + term)?,
            });
        }
        let prev_sample = match update {
            Some(update) => (sample + update)?,
            None => sample.clone(),
        };
        self.schedule.advance();
        Ok(prev_sample)
    }
}

impl Scheduler for LMSDiscreteScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let config = &self.config;
        let timesteps = spacing::float32_timesteps(
            &config.timestep_spacing,
            config.num_train_timesteps,
            num_inference_steps,
            config.steps_offset,
        )?;
        let sigmas = sigmas::interp(&timesteps, &self.training_sigmas);
        // LMS's own `_convert_to_karras` always spans the interpolated sigmas.
        let (sigma_min, sigma_max) = match self.sigma_schedule {
            SigmaSchedule::Karras => (None, None),
            _ => (config.sigma_min, config.sigma_max),
        };
        let (timesteps, sigmas) = self.sigma_schedule.respace(
            timesteps,
            sigmas,
            &self.training_sigmas,
            num_inference_steps,
            sigma_min,
            sigma_max,
        );
        self.schedule.set(
            timesteps.into_iter().map(f64::from).collect(),
            sigmas.into_iter().map(|s| s as f32).chain([0.0]).collect(),
        );
        self.derivatives.clear();
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.schedule.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.schedule.init_noise_sigma(&self.config.timestep_spacing)
    }

    fn scale_model_input(&mut self, sample: &Tensor, timestep: f64) -> Result<Tensor> {
        self.schedule.scale_model_input(sample, timestep)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        _eta: f64,
        _generator: &mut TorchGenerator,
    ) -> Result<Tensor> {
        self.step_with_order(model_output, timestep, sample, DEFAULT_ORDER)
    }

    fn add_noise(&self, original_samples: &Tensor, noise: &Tensor, timesteps: &[f64]) -> Result<Tensor> {
        self.schedule.add_noise(original_samples, noise, timesteps)
    }

    fn set_begin_index(&mut self, begin_index: usize) {
        self.schedule.set_begin_index(begin_index);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coefficients_match_scipy_quad() {
        // diffusers' get_lms_coefficient (scipy.integrate.quad of a float32 integrand) for
        // its test config (tests/schedulers/test_scheduler_lms.py) with 10 steps.
        let mut lms = LMSDiscreteScheduler::new(LMSDiscreteSchedulerConfig {
            num_train_timesteps: 1100,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: "linear".into(),
            ..Default::default()
        })
        .unwrap();
        lms.set_timesteps(10).unwrap();
        let cases: [(usize, usize, [f64; 4]); 2] = [
            (4, 3, [-8.031874161406426, 1.8213698241186533, -0.16934410026630078, 0.00310241838208578]),
            (3, 5, [-1.702899472417904, 0.47471220458604313, -0.04987061335604611, 0.0]),
        ];
        for (order, t, expected) in cases {
            for (k, &e) in expected.iter().enumerate().take(order) {
                let c = lms.lms_coefficient(order, t, k).unwrap();
                assert!((c - e).abs() <= 1e-6 * e.abs(), "order {order}, step {t}, k {k}: {c} != {e}");
            }
        }

        // The coefficients of one step sum to the step's width (the basis polynomials sum to
        // 1), and order 1 is Euler's dt.
        let sigmas = lms.sigmas().to_vec();
        let width = sigmas[4] as f64 - sigmas[3] as f64;
        let sum: f64 = (0..4).map(|k| lms.lms_coefficient(4, 3, k).unwrap()).sum();
        assert!((sum - width).abs() < 1e-12 * width.abs(), "{sum} != {width}");
        assert!((lms.lms_coefficient(1, 3, 0).unwrap() - width).abs() < 1e-15);
        assert!(lms.lms_coefficient(4, 2, 0).is_err());
    }
}
