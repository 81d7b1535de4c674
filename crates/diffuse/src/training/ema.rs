//! The exponential moving average of the weights that training exports; port of diffusers'
//! `EMAModel` (diffusers/training_utils.py): its decay schedule and its update.

use rayon::prelude::*;

use crate::{bail, Result};

/// Elements per task of the update.
const CHUNK: usize = 1 << 15;

/// `EMAModel`'s options, with its defaults.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EmaConfig {
    /// The largest decay (`decay`).
    pub decay: f64,
    /// The smallest decay (`min_decay`).
    pub min_decay: f64,
    /// Optimization steps before the average starts moving (until then it copies the weights).
    pub update_after_step: u64,
    /// crowsonkb's warm-up `1 - (1 + step / inv_gamma)^-power` instead of `(1 + step) / (10 + step)`.
    pub use_ema_warmup: bool,
    /// The warm-up's `inv_gamma`.
    pub inv_gamma: f64,
    /// The warm-up's `power`.
    pub power: f64,
}

impl Default for EmaConfig {
    fn default() -> Self {
        Self { decay: 0.9999, min_decay: 0.0, update_after_step: 0, use_ema_warmup: false, inv_gamma: 1.0, power: 2.0 / 3.0 }
    }
}

impl EmaConfig {
    /// Errors on a decay outside [0, 1] or a non-positive `inv_gamma` or `power`.
    pub fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.decay) {
            bail!("the EMA decay must be in [0, 1], got {}", self.decay);
        }
        if !(0.0..=1.0).contains(&self.min_decay) {
            bail!("the EMA minimum decay must be in [0, 1], got {}", self.min_decay);
        }
        if !(self.inv_gamma.is_finite() && self.inv_gamma > 0.0) {
            bail!("the EMA inv_gamma must be a finite number above 0, got {}", self.inv_gamma);
        }
        if !(self.power.is_finite() && self.power > 0.0) {
            bail!("the EMA power must be a finite number above 0, got {}", self.power);
        }
        Ok(())
    }

    /// `EMAModel.get_decay(optimization_step)`.
    pub fn decay_at(&self, optimization_step: u64) -> f64 {
        let step = optimization_step.saturating_sub(self.update_after_step + 1);
        if step == 0 {
            return 0.0;
        }
        let step = step as f64;
        let decay = if self.use_ema_warmup {
            1.0 - (1.0 + step / self.inv_gamma).powf(-self.power)
        } else {
            (1.0 + step) / (10.0 + step)
        };
        decay.min(self.decay).max(self.min_decay)
    }
}

/// The shadow weights and the count of `step` calls.
pub struct Ema {
    /// The average's settings.
    pub config: EmaConfig,
    /// The `step` calls made.
    pub optimization_step: u64,
    /// The averaged weights, one vector per parameter.
    pub shadow: Vec<Vec<f32>>,
}

impl Ema {
    /// Starts the average at the current weights.
    pub fn new(config: EmaConfig, params: &[Vec<f32>]) -> Self {
        Self { config, optimization_step: 0, shadow: params.to_vec() }
    }

    /// `EMAModel.step`: `shadow -= (1 - decay) * (shadow - param)`, in float32.
    pub fn step(&mut self, params: &[Vec<f32>]) -> Result<()> {
        if params.len() != self.shadow.len() {
            bail!("EMA: {} parameters for {} shadow tensors", params.len(), self.shadow.len());
        }
        for (shadow, param) in self.shadow.iter().zip(params) {
            if shadow.len() != param.len() {
                bail!("EMA: a parameter of {} values for a shadow of {}", param.len(), shadow.len());
            }
        }
        self.optimization_step += 1;
        let one_minus_decay = (1.0 - self.config.decay_at(self.optimization_step)) as f32;
        // In place, every parameter's chunks over all threads.
        let isa = crate::ops::gemm::isa();
        self.shadow.par_iter_mut().zip(params).for_each(|(shadow, param)| {
            shadow.par_chunks_mut(CHUNK).zip(param.par_chunks(CHUNK)).for_each(|(s, p)| crate::ops::vector::ema_in_place(isa, one_minus_decay, s, p))
        });
        Ok(())
    }
}
