//! The optimizer side of training, matching PyTorch and diffusers: `torch.optim.AdamW`
//! (torch/optim/adam.py, `_single_tensor_adam` with decoupled weight decay, as it runs on the
//! CPU), `torch.nn.utils.clip_grad_norm_`, diffusers' learning-rate schedules
//! (diffusers/optimization.py) and gradient accumulation.
//!
//! Everything works in place on host `f32` vectors, one per parameter, threaded and
//! vectorised, with the element-wise arithmetic in the order (and with the fused multiply-adds)
//! of ATen's CPU kernels, so that an update is bit for bit what PyTorch computes.

use rayon::prelude::*;

use crate::ops::vector::{self, AdamWScalars};
use crate::{bail, Result};

/// `torch.optim.AdamW`'s hyper-parameters, with its defaults.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    /// The first moment's decay. Default: 0.9.
    pub beta1: f64,
    /// The second moment's decay. Default: 0.999.
    pub beta2: f64,
    /// Added to the denominator. Default: 1e-8.
    pub eps: f64,
    /// Decoupled weight decay. Default: 1e-2.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 1e-2 }
    }
}

impl AdamWConfig {
    /// Errors on betas outside [0, 1) or a negative or non-finite `eps` or `weight_decay`.
    pub fn validate(&self) -> Result<()> {
        for (name, beta) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&beta) {
                bail!("AdamW {name} must be in [0, 1), got {beta}");
            }
        }
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            bail!("AdamW eps must be a finite number ≥ 0, got {}", self.eps);
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            bail!("weight decay must be a finite number ≥ 0, got {}", self.weight_decay);
        }
        Ok(())
    }
}

/// AdamW's state: the step count and both moment estimates of every parameter.
pub struct AdamW {
    /// The hyper-parameters.
    pub config: AdamWConfig,
    /// The number of updates made (torch's `state["step"]`, the same for every parameter).
    pub step: u64,
    /// The first moments (`exp_avg`), one vector per parameter.
    pub exp_avg: Vec<Vec<f32>>,
    /// The second moments (`exp_avg_sq`), one vector per parameter.
    pub exp_avg_sq: Vec<Vec<f32>>,
}

impl AdamW {
    /// Zero moments for parameters of the given sizes.
    pub fn new(config: AdamWConfig, sizes: &[usize]) -> Self {
        Self {
            config,
            step: 0,
            exp_avg: sizes.iter().map(|&n| vec![0.0; n]).collect(),
            exp_avg_sq: sizes.iter().map(|&n| vec![0.0; n]).collect(),
        }
    }

    /// One update of every parameter with its gradient at learning rate `lr`:
    ///
    /// ```text
    /// param      *= 1 - lr * weight_decay
    /// exp_avg     = lerp(exp_avg, grad, 1 - beta1)
    /// exp_avg_sq  = exp_avg_sq * beta2 + (1 - beta2) * grad * grad
    /// param      += -lr / (1 - beta1^step) * exp_avg / (sqrt(exp_avg_sq) / sqrt(1 - beta2^step) + eps)
    /// ```
    ///
    /// The scalar factors are computed in f64 (Python floats) and rounded to f32 where ATen
    /// multiplies a float32 tensor by them; the element-wise work is float32.
    pub fn update(&mut self, params: &mut [Vec<f32>], grads: &[Vec<f32>], lr: f64) -> Result<()> {
        if params.len() != self.exp_avg.len() || grads.len() != params.len() {
            bail!("AdamW: {} parameters and {} gradients for a state of {}", params.len(), grads.len(), self.exp_avg.len());
        }
        if self.exp_avg_sq.len() != self.exp_avg.len() {
            bail!("AdamW: {} first and {} second moments", self.exp_avg.len(), self.exp_avg_sq.len());
        }
        // Checked up front: the threaded pass below zips the slices, which would stop short.
        for (index, ((param, grad), (exp_avg, exp_avg_sq))) in params.iter().zip(grads).zip(self.exp_avg.iter().zip(&self.exp_avg_sq)).enumerate() {
            if param.len() != grad.len() || param.len() != exp_avg.len() || param.len() != exp_avg_sq.len() {
                bail!(
                    "AdamW: parameter {index} has {} values, its gradient {}, its state {} and {}",
                    param.len(),
                    grad.len(),
                    exp_avg.len(),
                    exp_avg_sq.len()
                );
            }
        }
        self.step += 1;
        let AdamWConfig { beta1, beta2, eps, weight_decay } = self.config;
        // torch keeps the step in a float32 tensor and reads it back as a Python float.
        let step = self.step as f32 as f64;
        let bias_correction1 = 1.0 - beta1.powf(step);
        let bias_correction2 = 1.0 - beta2.powf(step);
        let scalars = AdamWScalars {
            decay_factor: (1.0 - lr * weight_decay) as f32,
            decay: weight_decay != 0.0,
            lerp_weight: (1.0 - beta1) as f32,
            beta2: beta2 as f32,
            one_minus_beta2: (1.0 - beta2) as f32,
            bias_correction2_sqrt: bias_correction2.powf(0.5) as f32,
            eps: eps as f32,
            negative_step_size: (-(lr / bias_correction1)) as f32,
        };
        // Element-wise: every parameter's chunks over all threads, the same bits whatever the split.
        let isa = crate::ops::gemm::isa();
        params.par_iter_mut().zip(grads).zip(self.exp_avg.par_iter_mut().zip(self.exp_avg_sq.par_iter_mut())).for_each(|((p, g), (m, v))| {
            p.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK)).zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK))).for_each(|((p, g), (m, v))| {
                vector::adamw_in_place(isa, scalars, p, g, m, v)
            })
        });
        Ok(())
    }
}

/// Elements per task of the optimizer's element-wise passes.
const CHUNK: usize = 1 << 15;

/// `torch.nn.utils.clip_grad_norm_(parameters, max_norm)` (L2): the norm of all gradients
/// together is returned; if it exceeds `max_norm`, every gradient is scaled by
/// `max_norm / (total_norm + 1e-6)` (in float32, as torch does). Each parameter's norm is
/// summed in f64 and rounded to f32, as torch's float32 result is.
pub fn clip_grad_norm(grads: &mut [Vec<f32>], max_norm: f64) -> f32 {
    let total_norm = global_grad_norm(grads);
    let clip_coef = (max_norm as f32 / (total_norm + 1e-6)).min(1.0);
    grads.par_iter_mut().for_each(|grad| grad.par_chunks_mut(CHUNK).for_each(|chunk| chunk.iter_mut().for_each(|g| *g *= clip_coef)));
    total_norm
}

/// The L2 norm of all gradients together: the norm of the per-parameter norms.
pub fn global_grad_norm(grads: &[Vec<f32>]) -> f32 {
    let norms: Vec<f32> = grads.par_iter().map(|g| squared_sum(g).sqrt() as f32).collect();
    norms.iter().map(|&n| (n as f64) * (n as f64)).sum::<f64>().sqrt() as f32
}

/// Σ v² in f64, chunk by chunk in a fixed order (the same sum whatever the threads), eight
/// independent sums per chunk so that the adds do not wait on each other.
fn squared_sum(values: &[f32]) -> f64 {
    let partial: Vec<f64> = values
        .par_chunks(CHUNK)
        .map(|chunk| {
            let mut lanes = [0f64; 8];
            let (groups, rest) = chunk.as_chunks::<8>();
            for group in groups {
                for (lane, &v) in lanes.iter_mut().zip(group) {
                    *lane += (v as f64) * (v as f64);
                }
            }
            lanes.iter().sum::<f64>() + rest.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>()
        })
        .collect();
    partial.iter().sum()
}

/// The shape of the learning rate over optimizer steps after the warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    /// diffusers' `constant_with_warmup`.
    Constant,
    /// diffusers' `cosine`: a half cosine from the base rate to 0 at the last step.
    Cosine,
}

impl LrSchedule {
    /// Parses `constant` (or `constant_with_warmup`) or `cosine`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "constant" | "constant_with_warmup" => Ok(Self::Constant),
            "cosine" => Ok(Self::Cosine),
            other => bail!("learning-rate schedule `{other}` is not one of constant, cosine"),
        }
    }
}

/// The learning rate of each optimizer step: `LambdaLR` over diffusers' schedule functions,
/// `base × lambda(step)` with `step` counted from 0 (so with a warm-up the first update has
/// learning rate 0, as in diffusers' training scripts).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LearningRate {
    /// The peak learning rate.
    pub base: f64,
    /// Steps of linear warm-up from 0.
    pub warmup_steps: usize,
    /// The run's optimizer steps (where the cosine reaches 0).
    pub total_steps: usize,
    /// The shape after the warm-up.
    pub schedule: LrSchedule,
}

impl LearningRate {
    /// Errors unless `base` is finite and above 0.
    pub fn new(base: f64, warmup_steps: usize, total_steps: usize, schedule: LrSchedule) -> Result<Self> {
        if base.is_nan() || base <= 0.0 || base.is_infinite() {
            bail!("the learning rate must be a finite number above 0, got {base}");
        }
        Ok(Self { base, warmup_steps, total_steps, schedule })
    }

    /// The learning rate of the update at 0-based optimizer step `step`.
    pub fn at(&self, step: usize) -> f64 {
        self.base * self.lambda(step)
    }

    fn lambda(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return step as f64 / self.warmup_steps.max(1) as f64;
        }
        match self.schedule {
            LrSchedule::Constant => 1.0,
            LrSchedule::Cosine => {
                let num_cycles = 0.5;
                let progress = (step - self.warmup_steps) as f64 / self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
                (0.5 * (1.0 + (std::f64::consts::PI * num_cycles * 2.0 * progress).cos())).max(0.0)
            }
        }
    }
}

/// Gradients summed over the micro-batches of one optimizer step (each micro-batch's loss
/// divided by their number, as accelerate's gradient accumulation does).
pub struct GradAccumulator {
    /// The summed gradients, one vector per parameter.
    pub grads: Vec<Vec<f32>>,
    /// Micro-batches added so far.
    pub micro_batches: usize,
}

impl GradAccumulator {
    /// Zeroed gradients for parameters of `sizes` values.
    pub fn new(sizes: &[usize]) -> Self {
        Self { grads: sizes.iter().map(|&n| vec![0.0; n]).collect(), micro_batches: 0 }
    }

    /// Adds one micro-batch's gradients (`None` for a parameter the loss does not reach).
    pub fn add(&mut self, grads: &[Option<Vec<f32>>]) -> Result<()> {
        if grads.len() != self.grads.len() {
            bail!("{} gradients for {} parameters", grads.len(), self.grads.len());
        }
        for (sum, grad) in self.grads.iter().zip(grads) {
            if let Some(grad) = grad.as_ref().filter(|g| g.len() != sum.len()) {
                bail!("a gradient of {} values for a parameter of {}", grad.len(), sum.len());
            }
        }
        self.grads.par_iter_mut().zip(grads).for_each(|(sum, grad)| {
            if let Some(grad) = grad {
                sum.par_chunks_mut(CHUNK).zip(grad.par_chunks(CHUNK)).for_each(|(sum, grad)| sum.iter_mut().zip(grad).for_each(|(s, &g)| *s += g));
            }
        });
        self.micro_batches += 1;
        Ok(())
    }

    /// Clears the sums for the next optimizer step.
    pub fn reset(&mut self) {
        self.grads.par_iter_mut().for_each(|grad| grad.fill(0.0));
        self.micro_batches = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A state that does not fit the parameters is refused before anything is updated.
    #[test]
    fn mismatched_state_is_refused() {
        let mut optimizer = AdamW::new(AdamWConfig::default(), &[3, 2]);
        optimizer.exp_avg_sq[1].pop();
        let mut params = vec![vec![1.0; 3], vec![1.0; 2]];
        let error = optimizer.update(&mut params, &[vec![0.5; 3], vec![0.5; 2]], 1e-3).unwrap_err().to_string();
        assert!(error.contains("parameter 1 has 2 values, its gradient 2, its state 2 and 1"), "{error}");
        assert_eq!(params, vec![vec![1.0; 3], vec![1.0; 2]]);
        assert_eq!(optimizer.step, 0, "no step was counted");
    }
}
