//! Timestep and class embeddings; port of diffusers/models/embeddings.py.

use candle_core::{DType, Tensor, D};
use candle_nn::VarBuilder;

use super::{Activation, Linear, LoraDropout};
use crate::{bail, Result};

/// `get_timestep_embedding`: sinusoidal embeddings `[N, embedding_dim]` of `timesteps` (`[N]`,
/// possibly fractional), as in DDPM.
///
/// Frequencies are `exp(-ln(max_period) * i / (half_dim - downscale_freq_shift))`, computed in
/// f32 exactly as diffusers does (the scalar products in f32, then the division); the output
/// is `[sin, cos]`, or `[cos, sin]` with `flip_sin_to_cos`, zero-padded for an odd dimension.
pub fn get_timestep_embedding(
    timesteps: &Tensor,
    embedding_dim: usize,
    flip_sin_to_cos: bool,
    downscale_freq_shift: f64,
    scale: f64,
    max_period: f64,
) -> Result<Tensor> {
    if timesteps.rank() != 1 {
        bail!("timesteps should be a 1-d tensor, got shape {:?}", timesteps.dims());
    }
    let half_dim = embedding_dim / 2;
    let log_max_period = -(max_period.ln() as f32);
    let denominator = (half_dim as f64 - downscale_freq_shift) as f32;
    let frequencies: Vec<f32> = (0..half_dim).map(|i| (log_max_period * i as f32 / denominator).exp()).collect();
    let frequencies = Tensor::from_vec(frequencies, (1, half_dim), timesteps.device())?;

    let timesteps = timesteps.to_dtype(DType::F32)?.unsqueeze(1)?;
    let mut emb = timesteps.broadcast_mul(&frequencies)?;
    if scale != 1.0 {
        emb = (emb * scale)?;
    }
    let (sin, cos) = (emb.sin()?, emb.cos()?);
    let emb = if flip_sin_to_cos { Tensor::cat(&[cos, sin], D::Minus1)? } else { Tensor::cat(&[sin, cos], D::Minus1)? };
    Ok(if embedding_dim % 2 == 1 { emb.pad_with_zeros(D::Minus1, 0, 1)? } else { emb })
}

/// `Timesteps`: [`get_timestep_embedding`] with fixed settings (max_period 10000).
#[derive(Debug, Clone)]
pub struct Timesteps {
    /// Width of the embedding.
    pub num_channels: usize,
    /// Cosines before sines.
    pub flip_sin_to_cos: bool,
    /// Shifts the frequency exponent's denominator (1 or 0).
    pub downscale_freq_shift: f64,
    /// Multiplies the embedding.
    pub scale: f64,
}

impl Timesteps {
    /// The projection with `scale` 1.
    pub fn new(num_channels: usize, flip_sin_to_cos: bool, downscale_freq_shift: f64) -> Self {
        Self { num_channels, flip_sin_to_cos, downscale_freq_shift, scale: 1.0 }
    }

    /// Embeds `timesteps` `[B]` as `[B, num_channels]`.
    pub fn forward(&self, timesteps: &Tensor) -> Result<Tensor> {
        get_timestep_embedding(
            timesteps,
            self.num_channels,
            self.flip_sin_to_cos,
            self.downscale_freq_shift,
            self.scale,
            10000.0,
        )
    }
}

/// `GaussianFourierProjection`: random Fourier features of (by default) `log(sigma)`, for
/// noise-level-conditioned (score SDE) models. The frequencies are the `weight` parameter.
#[derive(Debug, Clone)]
pub struct GaussianFourierProjection {
    weight: Tensor,
    log: bool,
    flip_sin_to_cos: bool,
}

impl GaussianFourierProjection {
    /// Loads the frequencies `weight` `[embedding_size]`; `log` embeds log(sigma) rather than
    /// sigma.
    pub fn new(vb: VarBuilder, embedding_size: usize, log: bool, flip_sin_to_cos: bool) -> Result<Self> {
        Ok(Self { weight: vb.get(embedding_size, "weight")?, log, flip_sin_to_cos })
    }

    /// `x` is `[N]`; returns `[N, 2 * embedding_size]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.to_dtype(DType::F32)?;
        let x = if self.log { x.log()? } else { x };
        // x[:, None] * weight[None, :] * 2 * pi, multiplied left to right as diffusers does.
        let x_proj = x.unsqueeze(1)?.broadcast_mul(&self.weight.to_dtype(DType::F32)?.unsqueeze(0)?)?;
        let x_proj = ((x_proj * 2.0)? * (std::f32::consts::PI as f64))?;
        let (sin, cos) = (x_proj.sin()?, x_proj.cos()?);
        Ok(if self.flip_sin_to_cos { Tensor::cat(&[cos, sin], D::Minus1)? } else { Tensor::cat(&[sin, cos], D::Minus1)? })
    }
}

/// `TimestepEmbedding`'s options beyond its input and output sizes, with diffusers' defaults.
#[derive(Debug, Clone)]
pub struct TimestepEmbeddingConfig {
    /// The activation between the two linears.
    pub act_fn: Activation,
    /// Width of the output (default: the hidden width).
    pub out_dim: Option<usize>,
    /// An activation after the second linear.
    pub post_act_fn: Option<Activation>,
    /// Width of an extra condition projected and added to the input (LCM's guidance embedding).
    pub cond_proj_dim: Option<usize>,
    /// Bias on both linears.
    pub sample_proj_bias: bool,
}

impl Default for TimestepEmbeddingConfig {
    fn default() -> Self {
        Self { act_fn: Activation::Silu, out_dim: None, post_act_fn: None, cond_proj_dim: None, sample_proj_bias: true }
    }
}

/// `TimestepEmbedding`: the MLP `linear_1 -> act -> linear_2 [-> post_act]` that turns a
/// projected timestep into the embedding the resnets are conditioned on.
#[derive(Debug, Clone)]
pub struct TimestepEmbedding {
    linear_1: Linear,
    cond_proj: Option<Linear>,
    act: Activation,
    linear_2: Linear,
    post_act: Option<Activation>,
}

impl TimestepEmbedding {
    /// Loads `linear_1` (`in_channels` to `time_embed_dim`) and `linear_2` under `vb`.
    pub fn new(vb: VarBuilder, in_channels: usize, time_embed_dim: usize, config: &TimestepEmbeddingConfig) -> Result<Self> {
        let linear_1 = Linear::new(vb.pp("linear_1"), in_channels, time_embed_dim, config.sample_proj_bias)?;
        let cond_proj = match config.cond_proj_dim {
            Some(dim) => Some(Linear::new(vb.pp("cond_proj"), dim, in_channels, false)?),
            None => None,
        };
        let out_dim = config.out_dim.unwrap_or(time_embed_dim);
        let linear_2 = Linear::new(vb.pp("linear_2"), time_embed_dim, out_dim, config.sample_proj_bias)?;
        Ok(Self { linear_1, cond_proj, act: config.act_fn, linear_2, post_act: config.post_act_fn })
    }

    /// Maps the projected timesteps `sample` `[B, in_channels]` (plus the projected `condition`,
    /// when the model has `cond_proj`) to `[B, out_dim]`.
    pub fn forward(&self, sample: &Tensor, condition: Option<&Tensor>, lora_dropout: Option<&LoraDropout>) -> Result<Tensor> {
        let sample = match (condition, &self.cond_proj) {
            (Some(condition), Some(cond_proj)) => (sample + cond_proj.forward_with_lora_dropout(condition, lora_dropout)?)?,
            _ => sample.clone(),
        };
        let sample = self.act.forward(&self.linear_1.forward_with_lora_dropout(&sample, lora_dropout)?)?;
        let sample = self.linear_2.forward_with_lora_dropout(&sample, lora_dropout)?;
        match &self.post_act {
            Some(post_act) => post_act.forward(&sample),
            None => Ok(sample),
        }
    }
}
