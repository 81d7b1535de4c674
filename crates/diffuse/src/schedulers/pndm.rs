//! Port of diffusers/schedulers/scheduling_pndm.py (`PNDMScheduler`): pseudo numerical methods
//! for diffusion models (Liu et al. 2022), F-PNDM: Runge-Kutta warm-up steps (PRK), then
//! linear multistep steps (PLMS) over the history of model outputs.

use std::path::Path;

use candle_core::Tensor;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::betas::{alphas_cumprod, make_betas};
use super::spacing::integer_timesteps;
use super::{add_noise_alphas_cumprod, predict_epsilon, timesteps_as_indices, PredictionType, Scheduler};
use crate::loading::config::parse_config;
use crate::rng::TorchGenerator;
use crate::{Error, Result};

/// The order of the linear multistep method (and the number of Runge-Kutta warm-up steps).
const PNDM_ORDER: usize = 4;

/// `PNDMScheduler`'s `scheduler_config.json`, with diffusers' names and defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct PndmSchedulerConfig {
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
    /// Skip PNDM's Runge-Kutta warm-up, as PLMS and Stable Diffusion's configs do. Default:
    /// `false`.
    pub skip_prk_steps: bool,
    /// Take alpha_bar = 1 for the step after the last (else the first training alpha_bar). Default:
    /// `false`.
    pub set_alpha_to_one: bool,
    /// What the model predicts: `epsilon` (the noise), `sample` (x0) or `v_prediction`. Default:
    /// `epsilon`.
    pub prediction_type: PredictionType,
    /// How inference timesteps are picked from the training ones: `leading`, `trailing` or
    /// `linspace` (Lin et al. 2023, table 2). Default: `leading`.
    pub timestep_spacing: String,
    /// Added to every inference timestep (1 in SD 1.x configs). Default: `0`.
    pub steps_offset: usize,
}

impl Default for PndmSchedulerConfig {
    fn default() -> Self {
        PndmSchedulerConfig {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: "linear".into(),
            trained_betas: None,
            skip_prk_steps: false,
            set_alpha_to_one: false,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: "leading".into(),
            steps_offset: 0,
        }
    }
}

/// diffusers' `PNDMScheduler`, built from a [`PndmSchedulerConfig`].
pub struct PndmScheduler {
    config: PndmSchedulerConfig,
    alphas_cumprod: Vec<f32>,
    /// alpha_bar "before" timestep 0, used by the last step: 1, or alpha_bar_0.
    final_alpha_cumprod: f32,
    num_inference_steps: Option<usize>,
    prk_timesteps: Vec<i64>,
    plms_timesteps: Vec<i64>,
    /// `prk_timesteps` then `plms_timesteps`, as the pipeline visits them.
    timesteps: Vec<f64>,
    /// Running Runge-Kutta combination of the model outputs within one PRK step.
    cur_model_output: Option<Tensor>,
    /// The sample each PRK step (or the first PLMS step) starts from.
    cur_sample: Option<Tensor>,
    /// History of model outputs (at most the last 4) for the multistep formula.
    ets: Vec<Tensor>,
    /// Model evaluations so far.
    counter: usize,
}

impl PndmScheduler {
    /// Builds the scheduler; errors on config values it does not support.
    pub fn new(config: PndmSchedulerConfig) -> Result<Self> {
        super::spacing::check_spacing(&config.timestep_spacing)?;
        if config.prediction_type == PredictionType::Sample {
            return Err(Error::invalid(
                "prediction_type `sample` is not supported by PNDMScheduler (use epsilon or v_prediction)",
            ));
        }
        let betas = make_betas(
            &config.beta_schedule,
            config.beta_start,
            config.beta_end,
            config.num_train_timesteps,
            config.trained_betas.as_deref(),
            &[],
        )?;
        let alphas_cumprod = alphas_cumprod(&betas, false);
        let final_alpha_cumprod = if config.set_alpha_to_one { 1.0 } else { alphas_cumprod[0] };
        Ok(PndmScheduler {
            config,
            alphas_cumprod,
            final_alpha_cumprod,
            num_inference_steps: None,
            prk_timesteps: vec![],
            plms_timesteps: vec![],
            timesteps: vec![],
            cur_model_output: None,
            cur_sample: None,
            ets: vec![],
            counter: 0,
        })
    }

    /// Builds the scheduler from `scheduler_config.json`'s keys (unknown keys ignored, as diffusers
    /// does); `origin` names the file in errors.
    pub fn from_config(map: &Map<String, Value>, origin: &Path) -> Result<Self> {
        Self::new(parse_config(map, origin)?).map_err(|e| e.in_config_file(origin))
    }

    /// The config the scheduler was built from.
    pub fn config(&self) -> &PndmSchedulerConfig {
        &self.config
    }

    /// alpha_bar_t for every training timestep.
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    /// The Runge-Kutta warm-up timesteps (empty with `skip_prk_steps`).
    pub fn prk_timesteps(&self) -> &[i64] {
        &self.prk_timesteps
    }

    /// The linear multistep timesteps.
    pub fn plms_timesteps(&self) -> &[i64] {
        &self.plms_timesteps
    }

    fn num_inference_steps(&self) -> Result<usize> {
        self.num_inference_steps.ok_or_else(|| Error::invalid("PNDMScheduler: call set_timesteps before step"))
    }

    /// One evaluation of the 4th-order Runge-Kutta warm-up: four calls make one step, the
    /// model outputs weighted 1/6, 1/3, 1/3, 1/6; the two middle calls are at the half step.
    pub fn step_prk(&mut self, model_output: &Tensor, timestep: i64, sample: &Tensor) -> Result<Tensor> {
        let num_inference_steps = self.num_inference_steps()?;
        let diff_to_prev =
            if self.counter % 2 == 1 { 0 } else { (self.config.num_train_timesteps / num_inference_steps / 2) as i64 };
        let prev_timestep = timestep - diff_to_prev;
        // Every evaluation of one step starts from the step's first timestep and sample.
        let timestep = *self.prk_timesteps.get(self.counter / 4 * 4).ok_or_else(|| {
            Error::invalid(format!(
                "PNDMScheduler: PRK step {} is past the {} PRK timesteps",
                self.counter,
                self.prk_timesteps.len()
            ))
        })?;

        let model_output = match self.counter % 4 {
            0 => {
                self.accumulate(model_output, 1.0 / 6.0)?;
                self.ets.push(model_output.clone());
                self.cur_sample = Some(sample.clone());
                model_output.clone()
            }
            1 | 2 => {
                self.accumulate(model_output, 1.0 / 3.0)?;
                model_output.clone()
            }
            _ => {
                let last = model_output.affine(1.0 / 6.0, 0.0)?;
                match self.cur_model_output.take() {
                    Some(sum) => (sum + last)?,
                    None => last,
                }
            }
        };

        let cur_sample = self.cur_sample.clone().unwrap_or_else(|| sample.clone());
        let prev_sample = self.get_prev_sample(&cur_sample, timestep, prev_timestep, &model_output)?;
        self.counter += 1;
        Ok(prev_sample)
    }

    /// `cur_model_output += weight * model_output`.
    fn accumulate(&mut self, model_output: &Tensor, weight: f64) -> Result<()> {
        let weighted = model_output.affine(weight, 0.0)?;
        self.cur_model_output = Some(match self.cur_model_output.take() {
            Some(sum) => (sum + weighted)?,
            None => weighted,
        });
        Ok(())
    }

    /// One linear multistep step (Adams-Bashforth over the last 4 model outputs). Without the
    /// PRK warm-up (`skip_prk_steps`), the first step is a second-order Heun-like step that
    /// takes two model evaluations at the same timestep (crowsonkb's PLMS).
    pub fn step_plms(&mut self, model_output: &Tensor, timestep: i64, sample: &Tensor) -> Result<Tensor> {
        let num_inference_steps = self.num_inference_steps()?;
        if !self.config.skip_prk_steps && self.ets.len() < 3 {
            return Err(Error::invalid(
                "PNDMScheduler: the PLMS steps can only run after at least 12 PRK steps (or with skip_prk_steps)",
            ));
        }
        let stride = (self.config.num_train_timesteps / num_inference_steps) as i64;
        let mut timestep = timestep;
        let mut prev_timestep = timestep - stride;
        if self.counter != 1 {
            let keep_from = self.ets.len().saturating_sub(3);
            self.ets.drain(..keep_from);
            self.ets.push(model_output.clone());
        } else {
            // The second evaluation of the first step (made at its end): redo the step from
            // its start with the average of the two model outputs.
            prev_timestep = timestep;
            timestep += stride;
        }

        let mut sample = sample.clone();
        let ets = &self.ets;
        let n = ets.len();
        let model_output = if n == 1 && self.counter == 0 {
            self.cur_sample = Some(sample.clone());
            model_output.clone()
        } else if n == 1 && self.counter == 1 {
            sample =
                self.cur_sample.take().ok_or_else(|| Error::invalid("PNDMScheduler: no sample from the first step"))?;
            (model_output + &ets[0])?.affine(0.5, 0.0)?
        } else if n == 2 {
            (ets[1].affine(3.0, 0.0)? - &ets[0])?.affine(0.5, 0.0)?
        } else if n == 3 {
            ((ets[2].affine(23.0, 0.0)? - ets[1].affine(16.0, 0.0)?)? + ets[0].affine(5.0, 0.0)?)?
                .affine(1.0 / 12.0, 0.0)?
        } else if n == 4 {
            (((ets[3].affine(55.0, 0.0)? - ets[2].affine(59.0, 0.0)?)? + ets[1].affine(37.0, 0.0)?)?
                - ets[0].affine(9.0, 0.0)?)?
            .affine(1.0 / 24.0, 0.0)?
        } else {
            return Err(Error::invalid(format!(
                "PNDMScheduler: unexpected PLMS state (step {} with {n} past model outputs)",
                self.counter
            )));
        };

        let prev_sample = self.get_prev_sample(&sample, timestep, prev_timestep, &model_output)?;
        self.counter += 1;
        Ok(prev_sample)
    }

    /// x_{t-delta} from x_t and the (combined) noise prediction: PNDM eq. 9.
    fn get_prev_sample(
        &self,
        sample: &Tensor,
        timestep: i64,
        prev_timestep: i64,
        model_output: &Tensor,
    ) -> Result<Tensor> {
        let num_train_timesteps = self.config.num_train_timesteps;
        let timestep = timesteps_as_indices(&[timestep as f64], num_train_timesteps)?[0];
        let alpha_prod_t = self.alphas_cumprod[timestep];
        let alpha_prod_t_prev = if prev_timestep >= 0 {
            self.alphas_cumprod[timesteps_as_indices(&[prev_timestep as f64], num_train_timesteps)?[0]]
        } else {
            self.final_alpha_cumprod
        };
        let beta_prod_t = 1.0 - alpha_prod_t;
        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;

        // The noise prediction (`sample` is refused by `new`).
        let model_output = predict_epsilon(self.config.prediction_type, model_output, sample, alpha_prod_t)?;

        // (alpha_prev - alpha_t) / (sqrt(alpha_t) (sqrt(alpha_prev) + sqrt(alpha_t))) + 1
        // simplifies to sqrt(alpha_prev / alpha_t).
        let sample_coeff = (alpha_prod_t_prev / alpha_prod_t).sqrt();
        // The denominator of e_theta(x_t, t) in eq. 9.
        let model_output_denom_coeff =
            alpha_prod_t * beta_prod_t_prev.sqrt() + (alpha_prod_t * beta_prod_t * alpha_prod_t_prev).sqrt();
        let model_output_coeff = (alpha_prod_t_prev - alpha_prod_t) / model_output_denom_coeff;
        Ok((sample.affine(sample_coeff as f64, 0.0)? - model_output.affine(model_output_coeff as f64, 0.0)?)?)
    }
}

impl Scheduler for PndmScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let num_train_timesteps = self.config.num_train_timesteps;
        if !self.config.skip_prk_steps && num_inference_steps < PNDM_ORDER {
            return Err(Error::invalid(format!(
                "`num_inference_steps` must be >= {PNDM_ORDER} for PNDMScheduler's Runge-Kutta steps (or set skip_prk_steps), got {num_inference_steps}"
            )));
        }
        // The training timesteps visited, ascending.
        let mut ascending = integer_timesteps(
            &self.config.timestep_spacing,
            num_train_timesteps,
            num_inference_steps,
            self.config.steps_offset,
        )?;
        ascending.reverse();
        let n = ascending.len();

        if self.config.skip_prk_steps {
            // The first timestep twice (for the two-evaluation first step), then the rest:
            // [t_{n-1}, t_{n-2}, t_{n-2}, t_{n-3}, ..., t_0].
            self.prk_timesteps = vec![];
            let mut plms = ascending[..n - 1].to_vec();
            if n >= 2 {
                plms.push(ascending[n - 2]);
            }
            plms.push(ascending[n - 1]);
            plms.reverse();
            self.plms_timesteps = plms;
        } else {
            // Each of the last `PNDM_ORDER` intervals is a Runge-Kutta step visiting its start,
            // its midpoint twice and its end: [t, t-h, t-h, t-2h] with h half a stride.
            let half_step = (num_train_timesteps / num_inference_steps / 2) as i64;
            let with_midpoints: Vec<i64> =
                ascending[n - PNDM_ORDER..].iter().flat_map(|&t| [t, t + half_step]).collect();
            let doubled: Vec<i64> = with_midpoints[..with_midpoints.len() - 1].iter().flat_map(|&t| [t, t]).collect();
            let mut prk = doubled[1..doubled.len() - 1].to_vec();
            prk.reverse();
            self.prk_timesteps = prk;
            self.plms_timesteps = ascending[..n - 3].iter().rev().copied().collect();
        }
        self.timesteps = self.prk_timesteps.iter().chain(&self.plms_timesteps).map(|&t| t as f64).collect();
        self.num_inference_steps = Some(num_inference_steps);
        self.ets.clear();
        self.counter = 0;
        self.cur_model_output = None;
        self.cur_sample = None;
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        _eta: f64,
        _generator: &mut TorchGenerator,
    ) -> Result<Tensor> {
        let timestep = timesteps_as_indices(&[timestep], self.config.num_train_timesteps)?[0] as i64;
        if self.counter < self.prk_timesteps.len() && !self.config.skip_prk_steps {
            self.step_prk(model_output, timestep, sample)
        } else {
            self.step_plms(model_output, timestep, sample)
        }
    }

    fn add_noise(&self, original_samples: &Tensor, noise: &Tensor, timesteps: &[f64]) -> Result<Tensor> {
        add_noise_alphas_cumprod(&self.alphas_cumprod, original_samples, noise, timesteps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scheduler(json: serde_json::Value) -> PndmScheduler {
        PndmScheduler::from_config(json.as_object().unwrap(), Path::new("scheduler_config.json")).unwrap()
    }

    #[test]
    fn steps_offset_timesteps() {
        // diffusers tests/schedulers/test_scheduler_pndm.py::test_steps_offset.
        let mut s = scheduler(serde_json::json!({"steps_offset": 1}));
        s.set_timesteps(10).unwrap();
        let expected = [901, 851, 851, 801, 801, 751, 751, 701, 701, 651, 651, 601, 601, 501, 401, 301, 201, 101, 1];
        assert_eq!(s.timesteps(), expected.map(|t| t as f64));
    }

    #[test]
    fn skip_prk_timesteps_repeat_the_second() {
        let mut s = scheduler(serde_json::json!({"skip_prk_steps": true, "steps_offset": 1}));
        s.set_timesteps(4).unwrap();
        assert_eq!(s.timesteps(), &[751.0, 501.0, 501.0, 251.0, 1.0]);
        s.set_timesteps(1).unwrap();
        assert_eq!(s.timesteps(), &[1.0]);
    }

    #[test]
    fn prk_needs_four_steps() {
        // diffusers test_pndm_low_inference_steps_prk_validation.
        let mut s = scheduler(serde_json::json!({}));
        for n in 1..4 {
            let err = s.set_timesteps(n).unwrap_err().to_string();
            assert!(err.contains("must be >= 4"), "{err}");
        }
        s.set_timesteps(4).unwrap();
        let mut s = scheduler(serde_json::json!({"skip_prk_steps": true}));
        for n in 1..=4 {
            s.set_timesteps(n).unwrap();
        }
    }

    #[test]
    fn plms_without_past_residuals_is_an_error() {
        // diffusers test_inference_plms_no_past_residuals.
        let mut s = scheduler(serde_json::json!({}));
        let sample = Tensor::zeros((1, 1, 2, 2), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        assert!(s.step_plms(&sample, 1, &sample).is_err());
        s.set_timesteps(10).unwrap();
        assert!(s.step_plms(&sample, 1, &sample).is_err());
    }

    #[test]
    fn sample_prediction_is_rejected() {
        let err = PndmScheduler::from_config(
            serde_json::json!({"prediction_type": "sample"}).as_object().unwrap(),
            Path::new("scheduler_config.json"),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("prediction_type") && err.contains("sample"), "{err}");
    }
}
