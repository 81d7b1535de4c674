//! What a diffusion model is trained to minimise, as improved-diffusion
//! (openai/improved-diffusion: improved_diffusion/gaussian_diffusion.py `training_losses`,
//! losses.py, resample.py) and diffusers' training scripts (examples/*/train_*.py,
//! diffusers/training_utils.py `compute_snr`) define it:
//!
//! - the noised sample `x_t` from the scheduler's `add_noise`, the target by prediction type
//!   (epsilon: the noise; sample: `x_0`; v_prediction: `get_velocity`), and the mean squared
//!   error per example;
//! - the hybrid loss of learned-variance (`learned_range`) models: `L_simple + λ·L_vlb`, the
//!   VLB term computed with the predicted mean's gradient stopped, so that it trains only the
//!   variance (Nichol & Dhariwal 2021, section 3.1);
//! - timesteps drawn uniformly or by loss-aware importance sampling
//!   (`LossSecondMomentResampler`), optional min-SNR-γ weighting, and condition dropout.

use candle_core::{DType, Tensor, D};

use crate::rng::TorchGenerator;
use crate::schedulers::{add_noise_alphas_cumprod, get_velocity, PredictionType};
use crate::{bail, Result};

// ---- improved-diffusion's losses.py ----

/// `normal_kl`: KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) element-wise, in nats.
pub fn normal_kl(mean1: &Tensor, logvar1: &Tensor, mean2: &Tensor, logvar2: &Tensor) -> Result<Tensor> {
    // Summed in improved-diffusion's order: -1 + logvar2 - logvar1 + ratio + squares.
    let variance_ratio = (logvar1 - logvar2)?.exp()?;
    let squared_difference_term = (mean1 - mean2)?.sqr()?.mul(&logvar2.neg()?.exp()?)?;
    let sum = (((logvar2 + -1.0)? - logvar1)? + variance_ratio)?;
    Ok((sum + squared_difference_term)?.affine(0.5, 0.0)?)
}

/// `approx_standard_normal_cdf`: the tanh approximation of the standard normal CDF.
pub fn approx_standard_normal_cdf(x: &Tensor) -> Result<Tensor> {
    let cubic = x.sqr()?.mul(x)?;
    let inner = (x + cubic.affine(0.044715, 0.0)?)?.affine((2.0 / std::f64::consts::PI).sqrt() as f32 as f64, 0.0)?;
    Ok(inner.tanh()?.affine(1.0, 1.0)?.affine(0.5, 0.0)?)
}

/// `discretized_gaussian_log_likelihood`: the log-likelihood of `x` (images in [-1, 1]
/// quantised to 256 levels) under a Gaussian discretised to those bins, the outer bins
/// extended to ±infinity. Element-wise, in nats.
pub fn discretized_gaussian_log_likelihood(x: &Tensor, means: &Tensor, log_scales: &Tensor) -> Result<Tensor> {
    if x.dims() != means.dims() || x.dims() != log_scales.dims() {
        bail!("discretized_gaussian_log_likelihood: shapes {:?}, {:?}, {:?} differ", x.dims(), means.dims(), log_scales.dims());
    }
    let centered_x = (x - means)?;
    let inv_stdv = log_scales.neg()?.exp()?;
    let half_bin = (1.0f64 / 255.0) as f32 as f64;
    let cdf_plus = approx_standard_normal_cdf(&inv_stdv.mul(&(&centered_x + half_bin)?)?)?;
    let cdf_min = approx_standard_normal_cdf(&inv_stdv.mul(&(&centered_x - half_bin)?)?)?;
    let log_cdf_plus = cdf_plus.maximum(1e-12)?.log()?;
    let log_one_minus_cdf_min = cdf_min.affine(-1.0, 1.0)?.maximum(1e-12)?.log()?;
    let log_cdf_delta = (&cdf_plus - &cdf_min)?.maximum(1e-12)?.log()?;
    let upper_edge = x.gt(0.999)?;
    let lower_edge = x.lt(-0.999)?;
    Ok(lower_edge.where_cond(&log_cdf_plus, &upper_edge.where_cond(&log_one_minus_cdf_min, &log_cdf_delta)?)?)
}

/// `mean_flat`: the mean over all dimensions but the first.
pub fn mean_flat(tensor: &Tensor) -> Result<Tensor> {
    let batch = tensor.dim(0)?;
    Ok(tensor.reshape((batch, ()))?.mean(D::Minus1)?)
}

// ---- improved-diffusion's GaussianDiffusion, the parts the hybrid loss needs ----

/// The per-timestep coefficients of the true posterior q(x_{t-1} | x_t, x_0) and of the
/// learned-range variance, computed in f64 from the betas (as `GaussianDiffusion.__init__`
/// does with numpy) and looked up as f32 (`_extract_into_tensor`).
#[derive(Debug, Clone)]
pub struct PosteriorCoefficients {
    /// T, the number of training timesteps.
    pub num_timesteps: usize,
    log_betas: Vec<f64>,
    sqrt_alphas_cumprod: Vec<f64>,
    sqrt_one_minus_alphas_cumprod: Vec<f64>,
    sqrt_recip_alphas_cumprod: Vec<f64>,
    sqrt_recipm1_alphas_cumprod: Vec<f64>,
    posterior_log_variance_clipped: Vec<f64>,
    posterior_mean_coef1: Vec<f64>,
    posterior_mean_coef2: Vec<f64>,
}

impl PosteriorCoefficients {
    /// The coefficients of a schedule of `betas`; errors on fewer than two.
    pub fn new(betas: &[f32]) -> Result<Self> {
        if betas.len() < 2 {
            bail!("the VLB needs at least 2 timesteps, got {}", betas.len());
        }
        let betas: Vec<f64> = betas.iter().map(|&b| b as f64).collect();
        let mut alphas_cumprod = Vec::with_capacity(betas.len());
        let mut product = 1.0f64;
        for beta in &betas {
            product *= 1.0 - beta;
            alphas_cumprod.push(product);
        }
        let alphas_cumprod_prev: Vec<f64> = std::iter::once(1.0).chain(alphas_cumprod[..betas.len() - 1].iter().copied()).collect();
        let posterior_variance: Vec<f64> =
            (0..betas.len()).map(|t| betas[t] * (1.0 - alphas_cumprod_prev[t]) / (1.0 - alphas_cumprod[t])).collect();
        // The variance at t = 0 is 0; its log is replaced by the next one's.
        let posterior_log_variance_clipped =
            (0..betas.len()).map(|t| posterior_variance[if t == 0 { 1 } else { t }].ln()).collect();
        Ok(Self {
            num_timesteps: betas.len(),
            log_betas: betas.iter().map(|b| b.ln()).collect(),
            sqrt_alphas_cumprod: alphas_cumprod.iter().map(|a| a.sqrt()).collect(),
            sqrt_one_minus_alphas_cumprod: alphas_cumprod.iter().map(|a| (1.0 - a).sqrt()).collect(),
            sqrt_recip_alphas_cumprod: alphas_cumprod.iter().map(|a| (1.0 / a).sqrt()).collect(),
            sqrt_recipm1_alphas_cumprod: alphas_cumprod.iter().map(|a| (1.0 / a - 1.0).sqrt()).collect(),
            posterior_log_variance_clipped,
            posterior_mean_coef1: (0..betas.len())
                .map(|t| betas[t] * alphas_cumprod_prev[t].sqrt() / (1.0 - alphas_cumprod[t]))
                .collect(),
            posterior_mean_coef2: (0..betas.len())
                .map(|t| (1.0 - alphas_cumprod_prev[t]) * (1.0 - betas[t]).sqrt() / (1.0 - alphas_cumprod[t]))
                .collect(),
        })
    }

    /// `_extract_into_tensor`: `array[t]` as f32, shaped `[B, 1, 1, ...]` to broadcast over `like`.
    fn extract(array: &[f64], timesteps: &[usize], like: &Tensor) -> Result<Tensor> {
        let values: Vec<f32> = timesteps.iter().map(|&t| array[t] as f32).collect();
        let mut shape = vec![values.len()];
        shape.extend(std::iter::repeat_n(1, like.rank().saturating_sub(1)));
        Ok(Tensor::from_vec(values, shape, like.device())?)
    }

    /// `q_posterior_mean_variance`: the mean and clipped log-variance of q(x_{t-1} | x_t, x_0).
    pub fn q_posterior(&self, x_start: &Tensor, x_t: &Tensor, timesteps: &[usize]) -> Result<(Tensor, Tensor)> {
        let coef1 = Self::extract(&self.posterior_mean_coef1, timesteps, x_t)?;
        let coef2 = Self::extract(&self.posterior_mean_coef2, timesteps, x_t)?;
        let mean = (x_start.broadcast_mul(&coef1)? + x_t.broadcast_mul(&coef2)?)?;
        let log_variance = Self::extract(&self.posterior_log_variance_clipped, timesteps, x_t)?.broadcast_as(x_t.shape())?;
        Ok((mean, log_variance))
    }

    /// `p_mean_variance` for a learned-range model without clipping: from the mean output
    /// (by `prediction_type`) and the variance output (in [-1, 1] between log β̃_t and log β_t),
    /// the model's mean and log-variance of p(x_{t-1} | x_t).
    pub fn p_mean_variance(
        &self,
        prediction_type: PredictionType,
        mean_output: &Tensor,
        variance_output: &Tensor,
        x_t: &Tensor,
        timesteps: &[usize],
    ) -> Result<(Tensor, Tensor)> {
        let min_log = Self::extract(&self.posterior_log_variance_clipped, timesteps, x_t)?;
        let max_log = Self::extract(&self.log_betas, timesteps, x_t)?;
        let frac = variance_output.affine(1.0, 1.0)?.affine(0.5, 0.0)?;
        let log_variance = (frac.broadcast_mul(&max_log)? + frac.affine(-1.0, 1.0)?.broadcast_mul(&min_log)?)?;
        let pred_xstart = match prediction_type {
            // _predict_xstart_from_eps
            PredictionType::Epsilon => (x_t.broadcast_mul(&Self::extract(&self.sqrt_recip_alphas_cumprod, timesteps, x_t)?)?
                - mean_output.broadcast_mul(&Self::extract(&self.sqrt_recipm1_alphas_cumprod, timesteps, x_t)?)?)?,
            PredictionType::Sample => mean_output.clone(),
            // x_0 = sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v (not in improved-diffusion).
            PredictionType::VPrediction => (x_t.broadcast_mul(&Self::extract(&self.sqrt_alphas_cumprod, timesteps, x_t)?)?
                - mean_output.broadcast_mul(&Self::extract(&self.sqrt_one_minus_alphas_cumprod, timesteps, x_t)?)?)?,
        };
        let (mean, _) = self.q_posterior(&pred_xstart, x_t, timesteps)?;
        Ok((mean, log_variance))
    }

    /// `_vb_terms_bpd`: per example, in bits per dimension, the KL between the true posterior
    /// and the model's p(x_{t-1} | x_t) (t > 0), or the decoder's negative log-likelihood of
    /// x_0 (t = 0). Returns (the term, the KL, the decoder NLL).
    pub fn vb_terms_bpd(
        &self,
        prediction_type: PredictionType,
        mean_output: &Tensor,
        variance_output: &Tensor,
        x_start: &Tensor,
        x_t: &Tensor,
        timesteps: &[usize],
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (true_mean, true_log_variance) = self.q_posterior(x_start, x_t, timesteps)?;
        let (mean, log_variance) = self.p_mean_variance(prediction_type, mean_output, variance_output, x_t, timesteps)?;
        // In bits: divided by ln 2 (a true division, as torch does, not a multiplication).
        let ln2 = Tensor::new(std::f64::consts::LN_2 as f32, x_t.device())?;
        let kl = mean_flat(&normal_kl(&true_mean, &true_log_variance, &mean, &log_variance)?)?.broadcast_div(&ln2)?;
        let log_likelihood = discretized_gaussian_log_likelihood(x_start, &mean, &log_variance.affine(0.5, 0.0)?)?;
        let decoder_nll = mean_flat(&log_likelihood.neg()?)?.broadcast_div(&ln2)?;
        let is_first: Vec<u8> = timesteps.iter().map(|&t| (t == 0) as u8).collect();
        let is_first = Tensor::from_vec(is_first, timesteps.len(), x_t.device())?;
        let output = is_first.where_cond(&decoder_nll, &kl)?;
        Ok((output, kl, decoder_nll))
    }
}

// ---- Timestep sampling (improved-diffusion's resample.py) ----

/// How training timesteps are drawn.
#[derive(Debug, Clone)]
pub enum TimestepSampler {
    /// `torch.randint(0, T, (B,))`, as diffusers' training scripts draw them.
    Uniform {
        /// T, the number of training timesteps.
        num_timesteps: usize,
    },
    /// Importance sampling by the root mean square of recent losses per timestep.
    LossSecondMoment(LossSecondMomentResampler),
}

impl TimestepSampler {
    /// Timesteps for a batch and their importance weights (1 for uniform sampling).
    pub fn sample(&self, batch_size: usize, generator: &mut TorchGenerator) -> Result<(Vec<usize>, Vec<f32>)> {
        match self {
            TimestepSampler::Uniform { num_timesteps } => {
                let timesteps = generator.randint(0, *num_timesteps as i64, batch_size)?;
                Ok((timesteps.into_iter().map(|t| t as usize).collect(), vec![1.0; batch_size]))
            }
            TimestepSampler::LossSecondMoment(resampler) => Ok(resampler.sample(batch_size, generator)),
        }
    }

    /// Records the per-example losses of the timesteps drawn (loss-aware sampling only).
    pub fn update(&mut self, timesteps: &[usize], losses: &[f64]) {
        if let TimestepSampler::LossSecondMoment(resampler) = self {
            resampler.update_with_all_losses(timesteps, losses);
        }
    }
}

/// `LossSecondMomentResampler`: the last `history_per_term` losses of every timestep; once
/// every timestep has that many, timesteps are drawn with probability proportional to the
/// root mean square of their losses, mixed with `uniform_prob` of the uniform distribution.
#[derive(Debug, Clone, PartialEq)]
pub struct LossSecondMomentResampler {
    /// T, the number of training timesteps.
    pub num_timesteps: usize,
    /// Losses kept per timestep.
    pub history_per_term: usize,
    /// The share of the uniform distribution in the mix.
    pub uniform_prob: f64,
    /// `[num_timesteps × history_per_term]`, row-major.
    pub loss_history: Vec<f64>,
    /// Losses recorded per timestep (up to `history_per_term`).
    pub loss_counts: Vec<usize>,
}

impl LossSecondMomentResampler {
    /// A sampler with no losses recorded yet (it samples uniformly until every timestep has its
    /// history).
    pub fn new(num_timesteps: usize, history_per_term: usize, uniform_prob: f64) -> Self {
        Self {
            num_timesteps,
            history_per_term,
            uniform_prob,
            loss_history: vec![0.0; num_timesteps * history_per_term],
            loss_counts: vec![0; num_timesteps],
        }
    }

    fn warmed_up(&self) -> bool {
        self.loss_counts.iter().all(|&c| c == self.history_per_term)
    }

    /// `weights()`: uniform until warmed up, then the RMS loss per timestep, normalised and
    /// mixed with the uniform distribution.
    pub fn weights(&self) -> Vec<f64> {
        if !self.warmed_up() {
            return vec![1.0; self.num_timesteps];
        }
        let mut weights: Vec<f64> = self
            .loss_history
            .chunks_exact(self.history_per_term)
            .map(|row| (row.iter().map(|l| l * l).sum::<f64>() / self.history_per_term as f64).sqrt())
            .collect();
        let total: f64 = weights.iter().sum();
        let len = weights.len() as f64;
        for w in &mut weights {
            *w /= total;
            *w *= 1.0 - self.uniform_prob;
            *w += self.uniform_prob / len;
        }
        weights
    }

    /// `ScheduleSampler.sample`: timesteps drawn with probabilities p = weights / Σ weights
    /// (by inverse CDF on `torch.rand` draws), each with importance weight 1 / (T · p_t).
    pub fn sample(&self, batch_size: usize, generator: &mut TorchGenerator) -> (Vec<usize>, Vec<f32>) {
        let weights = self.weights();
        let total: f64 = weights.iter().sum();
        let probabilities: Vec<f64> = weights.iter().map(|w| w / total).collect();
        let mut cumulative = Vec::with_capacity(probabilities.len());
        let mut sum = 0.0;
        for p in &probabilities {
            sum += p;
            cumulative.push(sum);
        }
        let uniforms = generator.rand(batch_size);
        let timesteps: Vec<usize> = uniforms
            .iter()
            .map(|&u| {
                let target = u as f64 * sum;
                cumulative.partition_point(|&c| c <= target).min(probabilities.len() - 1)
            })
            .collect();
        let importance =
            timesteps.iter().map(|&t| (1.0 / (probabilities.len() as f64 * probabilities[t])) as f32).collect();
        (timesteps, importance)
    }

    /// `update_with_all_losses`: appends each loss to its timestep's history, dropping the
    /// oldest once full.
    pub fn update_with_all_losses(&mut self, timesteps: &[usize], losses: &[f64]) {
        let history = self.history_per_term;
        for (&t, &loss) in timesteps.iter().zip(losses) {
            let row = &mut self.loss_history[t * history..(t + 1) * history];
            if self.loss_counts[t] == history {
                row.copy_within(1.., 0);
                row[history - 1] = loss;
            } else {
                row[self.loss_counts[t]] = loss;
                self.loss_counts[t] += 1;
            }
        }
    }
}

// ---- min-SNR-γ and condition dropout (diffusers' training scripts) ----

/// `compute_snr`: alpha_bar_t / (1 - alpha_bar_t), from the square roots in f32 as diffusers
/// computes it.
pub fn compute_snr(alphas_cumprod: &[f32], timesteps: &[usize]) -> Vec<f32> {
    timesteps
        .iter()
        .map(|&t| {
            let alpha = alphas_cumprod[t].powf(0.5);
            let sigma = (1.0 - alphas_cumprod[t]).powf(0.5);
            (alpha / sigma).powi(2)
        })
        .collect()
}

/// The min-SNR-γ loss weights (Hang et al. 2023) as diffusers' scripts compute them:
/// min(SNR, γ), divided by SNR for epsilon targets and by SNR + 1 for v targets.
pub fn min_snr_weights(alphas_cumprod: &[f32], timesteps: &[usize], gamma: f64, prediction_type: PredictionType) -> Vec<f32> {
    let gamma = gamma as f32;
    compute_snr(alphas_cumprod, timesteps)
        .into_iter()
        .map(|snr| {
            let clipped = snr.min(gamma);
            match prediction_type {
                PredictionType::Epsilon => clipped / snr,
                PredictionType::VPrediction => clipped / (snr + 1.0),
                PredictionType::Sample => clipped,
            }
        })
        .collect()
}

/// Replaces each label by `null_label` with probability `probability` (one `torch.rand` draw
/// per example), so that the model also learns the unconditional prediction that
/// classifier-free guidance needs.
pub fn drop_labels(labels: &[u32], probability: f64, null_label: u32, generator: &mut TorchGenerator) -> Vec<u32> {
    if probability <= 0.0 {
        return labels.to_vec();
    }
    let draws = generator.rand(labels.len());
    labels.iter().zip(draws).map(|(&label, u)| if (u as f64) < probability { null_label } else { label }).collect()
}

// ---- The diffusion objective ----

/// The loss function.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum LossKind {
    /// The mean squared error to the target (L_simple).
    Mse,
    /// L_simple + vlb_weight · T · L_t (improved-diffusion's `RESCALED_MSE` with learned
    /// variance is vlb_weight = 0.001), for models predicting a learned-range variance in
    /// their second half of channels.
    Hybrid {
        /// The VLB term's weight.
        vlb_weight: f64,
    },
}

/// Everything that turns clean samples and a model into a loss.
pub struct DiffusionObjective {
    /// What the model predicts, hence the regression target.
    pub prediction_type: PredictionType,
    /// The loss on that target.
    pub loss: LossKind,
    /// Min-SNR weighting (Hang et al. 2023) with this gamma; `None` weighs timesteps equally.
    pub snr_gamma: Option<f64>,
    /// The scheduler's alpha_bar (f32, as `add_noise` uses it).
    pub alphas_cumprod: Vec<f32>,
    /// For the hybrid loss's VLB term.
    pub posterior: PosteriorCoefficients,
    /// How timesteps are drawn.
    pub timestep_sampler: TimestepSampler,
}

/// One batch's loss.
pub struct ObjectiveOutput {
    /// The scalar to minimise (with gradients to the model's parameters).
    pub loss: Tensor,
    /// Each example's loss before importance weighting (what loss-aware sampling records).
    pub per_example: Vec<f64>,
    /// The timestep of each example.
    pub timesteps: Vec<usize>,
}

impl DiffusionObjective {
    /// Errors on a non-positive or non-finite `snr_gamma`, on `snr_gamma` with the hybrid loss,
    /// on a negative VLB weight, or on fewer than two betas.
    pub fn new(
        prediction_type: PredictionType,
        loss: LossKind,
        snr_gamma: Option<f64>,
        betas: &[f32],
        alphas_cumprod: Vec<f32>,
        timestep_sampler: TimestepSampler,
    ) -> Result<Self> {
        if let Some(gamma) = snr_gamma {
            if !(gamma.is_finite() && gamma > 0.0) {
                bail!("the min-SNR gamma must be a finite number above 0, got {gamma}");
            }
            if matches!(loss, LossKind::Hybrid { .. }) {
                bail!("min-SNR weighting applies to the MSE loss, not the hybrid loss");
            }
        }
        if let LossKind::Hybrid { vlb_weight } = loss {
            if !(vlb_weight.is_finite() && vlb_weight >= 0.0) {
                bail!("the VLB weight must be a finite number ≥ 0, got {vlb_weight}");
            }
        }
        Ok(Self { prediction_type, loss, snr_gamma, alphas_cumprod, posterior: PosteriorCoefficients::new(betas)?, timestep_sampler })
    }

    /// Does the model predict a variance too (twice the channels)?
    pub fn learns_variance(&self) -> bool {
        matches!(self.loss, LossKind::Hybrid { .. })
    }

    /// Noises `x_start` at sampled timesteps, runs `model(x_t, timesteps)` and returns the
    /// loss. Draws from `generator`, in order: the timesteps, then the noise.
    pub fn loss(
        &mut self,
        x_start: &Tensor,
        generator: &mut TorchGenerator,
        model: &mut dyn FnMut(&Tensor, &Tensor) -> Result<Tensor>,
    ) -> Result<ObjectiveOutput> {
        let (batch, channels) = (x_start.dim(0)?, x_start.dim(1)?);
        let (timesteps, importance) = self.timestep_sampler.sample(batch, generator)?;
        let noise = generator.randn_tensor(x_start.dims(), x_start.device())?.to_dtype(x_start.dtype())?;
        let timesteps_f64: Vec<f64> = timesteps.iter().map(|&t| t as f64).collect();
        let x_t = add_noise_alphas_cumprod(&self.alphas_cumprod, x_start, &noise, &timesteps_f64)?;
        let timestep_input = Tensor::from_vec(timesteps.iter().map(|&t| t as f32).collect::<Vec<f32>>(), batch, x_start.device())?;
        let output = model(&x_t, &timestep_input)?;
        let expected_channels = if self.learns_variance() { 2 * channels } else { channels };
        if output.dim(1)? != expected_channels {
            bail!(
                "the model predicts {} channels; this objective needs {expected_channels} (out_channels must be {})",
                output.dim(1)?,
                if self.learns_variance() { "twice in_channels for the hybrid loss" } else { "in_channels" }
            );
        }
        let mean_output = output.narrow(1, 0, channels)?;
        let target = match self.prediction_type {
            PredictionType::Epsilon => noise,
            PredictionType::Sample => x_start.clone(),
            PredictionType::VPrediction => get_velocity(&self.alphas_cumprod, x_start, &noise, &timesteps_f64)?,
        };
        let mut per_example = mean_flat(&(&mean_output.to_dtype(DType::F32)? - target.to_dtype(DType::F32)?)?.sqr()?)?;
        if let Some(gamma) = self.snr_gamma {
            let weights = min_snr_weights(&self.alphas_cumprod, &timesteps, gamma, self.prediction_type);
            per_example = (per_example * Tensor::from_vec(weights, batch, x_start.device())?)?;
        }
        if let LossKind::Hybrid { vlb_weight } = self.loss {
            // The VLB term sees the mean output detached: it trains the variance only.
            let variance_output = output.narrow(1, channels, channels)?.to_dtype(DType::F32)?;
            let (vb, _, _) = self.posterior.vb_terms_bpd(
                self.prediction_type,
                &mean_output.detach().to_dtype(DType::F32)?,
                &variance_output,
                &x_start.to_dtype(DType::F32)?,
                &x_t.to_dtype(DType::F32)?,
                &timesteps,
            )?;
            let scale = vlb_weight * self.posterior.num_timesteps as f64;
            per_example = (per_example + vb.affine(scale as f32 as f64, 0.0)?)?;
        }
        let per_example_values: Vec<f64> = per_example.to_vec1::<f32>()?.into_iter().map(|v| v as f64).collect();
        let weighted = if importance.iter().all(|&w| w == 1.0) {
            per_example
        } else {
            (per_example * Tensor::from_vec(importance, batch, x_start.device())?)?
        };
        let loss = weighted.mean_all()?;
        Ok(ObjectiveOutput { loss, per_example: per_example_values, timesteps })
    }

    /// Records the last batch's losses for loss-aware timestep sampling.
    pub fn record(&mut self, output: &ObjectiveOutput) {
        self.timestep_sampler.update(&output.timesteps, &output.per_example);
    }
}
