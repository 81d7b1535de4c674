//! `Transformer2DModel` on continuous (feature-map) input, as Stable Diffusion's UNet uses it;
//! port of diffusers/models/transformers/transformer_2d.py, with `BasicTransformerBlock` and
//! `FeedForward` from diffusers/models/attention.py and `GEGLU` from activations.py.
//!
//! Only what SD's blocks build is supported: layer norms (not the adaptive norms of DiT or
//! PixArt), the GEGLU feed-forward, no positional embeddings, no GLIGEN fuser.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::attention_processor::{Attention, AttentionConfig};
use super::{Conv2d, GroupNorm, LayerNorm, Linear, LoraDropout};
use crate::{bail, Result};

/// `GEGLU`: a linear projection to twice the width, split into a value half and a gate half;
/// the output is `value * gelu(gate)` with the exact (erf) GELU.
#[derive(Debug, Clone)]
struct Geglu {
    proj: Linear,
}

impl Geglu {
    fn new(vb: VarBuilder, dim_in: usize, dim_out: usize, bias: bool) -> Result<Self> {
        Ok(Self { proj: Linear::new(vb.pp("proj"), dim_in, dim_out * 2, bias)? })
    }

    fn forward(&self, hidden_states: &Tensor, lora_dropout: Option<&LoraDropout>) -> Result<Tensor> {
        crate::ops::geglu(&self.proj.forward_with_lora_dropout(hidden_states, lora_dropout)?)
    }
}

/// `FeedForward` with `activation_fn="geglu"`: `net.0` is the GEGLU projection (to
/// `mult * dim`, 4 by default), `net.1` a dropout (nothing at inference), `net.2` the
/// projection back.
#[derive(Debug, Clone)]
pub struct FeedForward {
    geglu: Geglu,
    proj_out: Linear,
}

impl FeedForward {
    /// Loads `net.0` (to `mult * dim`) and `net.2` (to `dim_out`, default `dim`) under `vb`.
    pub fn new(vb: VarBuilder, dim: usize, dim_out: Option<usize>, mult: usize, bias: bool) -> Result<Self> {
        let inner_dim = dim * mult;
        let vb = vb.pp("net");
        let geglu = Geglu::new(vb.pp("0"), dim, inner_dim, bias)?;
        let proj_out = Linear::new(vb.pp("2"), inner_dim, dim_out.unwrap_or(dim), bias)?;
        Ok(Self { geglu, proj_out })
    }

    /// `[B, N, dim]` to `[B, N, dim_out]`.
    pub fn forward(&self, hidden_states: &Tensor, lora_dropout: Option<&LoraDropout>) -> Result<Tensor> {
        self.proj_out.forward_with_lora_dropout(&self.geglu.forward(hidden_states, lora_dropout)?, lora_dropout)
    }
}

/// The arguments of `Transformer2DModel.__init__` (continuous input) that SD's UNet blocks
/// set, with diffusers' defaults from [`Transformer2DModelConfig::new`].
#[derive(Debug, Clone)]
pub struct Transformer2DModelConfig {
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Width of each head.
    pub attention_head_dim: usize,
    /// Channels of the input feature map.
    pub in_channels: usize,
    /// Defaults to `in_channels`.
    pub out_channels: Option<usize>,
    /// The number of `BasicTransformerBlock`s.
    pub num_layers: usize,
    /// Groups of the input group norm.
    pub norm_num_groups: usize,
    /// The width of the context (text embeddings); `None` means no cross-attention.
    pub cross_attention_dim: Option<usize>,
    /// Bias on the attention's query/key/value projections.
    pub attention_bias: bool,
    /// Project in and out with linear layers (SD 2.x) instead of 1×1 convolutions (SD 1.x).
    pub use_linear_projection: bool,
    /// The first attention also attends to the context instead of to the features.
    pub only_cross_attention: bool,
    /// The second attention is self-attention too.
    pub double_self_attention: bool,
    /// Compute attention scores in f32.
    pub upcast_attention: bool,
    /// The layer norms' epsilon.
    pub norm_eps: f64,
}

impl Transformer2DModelConfig {
    /// diffusers' defaults for the rest: one layer, 32 groups, no cross-attention, no
    /// attention bias, convolution projections, layer-norm eps 1e-5.
    pub fn new(num_attention_heads: usize, attention_head_dim: usize, in_channels: usize) -> Self {
        Self {
            num_attention_heads,
            attention_head_dim,
            in_channels,
            out_channels: None,
            num_layers: 1,
            norm_num_groups: 32,
            cross_attention_dim: None,
            attention_bias: false,
            use_linear_projection: false,
            only_cross_attention: false,
            double_self_attention: false,
            upcast_attention: false,
            norm_eps: 1e-5,
        }
    }
}

/// `BasicTransformerBlock` with layer norms: self-attention (or cross-attention with
/// `only_cross_attention`), then cross-attention to the context, then the GEGLU
/// feed-forward, each on layer-normed input and added to its input.
#[derive(Debug, Clone)]
pub struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    /// `norm2` and `attn2`, present when there is a context or `double_self_attention`.
    cross: Option<(LayerNorm, Attention)>,
    norm3: LayerNorm,
    ff: FeedForward,
    only_cross_attention: bool,
}

impl BasicTransformerBlock {
    /// Loads a block of width `dim` under `vb`.
    pub fn new(vb: VarBuilder, dim: usize, config: &Transformer2DModelConfig) -> Result<Self> {
        let attention = |cross_attention_dim: Option<usize>| AttentionConfig {
            heads: config.num_attention_heads,
            dim_head: config.attention_head_dim,
            bias: config.attention_bias,
            cross_attention_dim,
            upcast_attention: config.upcast_attention,
            out_bias: true,
            ..AttentionConfig::new(dim)
        };
        let norm1 = LayerNorm::new(vb.pp("norm1"), dim, config.norm_eps)?;
        let attn1_context = if config.only_cross_attention { config.cross_attention_dim } else { None };
        let attn1 = Attention::new(vb.pp("attn1"), &attention(attn1_context))?;
        let cross = if config.cross_attention_dim.is_some() || config.double_self_attention {
            let context = if config.double_self_attention { None } else { config.cross_attention_dim };
            Some((
                LayerNorm::new(vb.pp("norm2"), dim, config.norm_eps)?,
                Attention::new(vb.pp("attn2"), &attention(context))?,
            ))
        } else {
            None
        };
        let norm3 = LayerNorm::new(vb.pp("norm3"), dim, config.norm_eps)?;
        let ff = FeedForward::new(vb.pp("ff"), dim, None, 4, true)?;
        Ok(Self { norm1, attn1, cross, norm3, ff, only_cross_attention: config.only_cross_attention })
    }

    /// `hidden_states` is `[B, L, dim]`; `encoder_hidden_states` is the context `[B, S, D]`
    /// (without one, the cross-attention attends to the features themselves, as in diffusers).
    pub fn forward(&self, hidden_states: &Tensor, encoder_hidden_states: Option<&Tensor>, lora_dropout: Option<&LoraDropout>) -> Result<Tensor> {
        super::checkpointed(self, hidden_states, encoder_hidden_states, lora_dropout, Self::forward_block)
    }

    /// [`Self::forward`] without gradient checkpointing.
    fn forward_block(&self, hidden_states: &Tensor, encoder_hidden_states: Option<&Tensor>, lora_dropout: Option<&LoraDropout>) -> Result<Tensor> {
        let norm_hidden_states = self.norm1.forward(hidden_states)?;
        let attn1_context = if self.only_cross_attention { encoder_hidden_states } else { None };
        let mut hidden_states = (self.attn1.forward(&norm_hidden_states, attn1_context, lora_dropout)? + hidden_states)?;

        if let Some((norm2, attn2)) = &self.cross {
            let norm_hidden_states = norm2.forward(&hidden_states)?;
            hidden_states = (attn2.forward(&norm_hidden_states, encoder_hidden_states, lora_dropout)? + hidden_states)?;
        }

        let norm_hidden_states = self.norm3.forward(&hidden_states)?;
        Ok((self.ff.forward(&norm_hidden_states, lora_dropout)? + hidden_states)?)
    }
}

/// How features enter and leave the transformer blocks.
#[derive(Debug, Clone)]
enum Projection {
    /// 1×1 convolution on the feature map (SD 1.x).
    Conv(Conv2d),
    /// Linear layer on the flattened sequence (SD 2.x).
    Linear(Linear),
}

/// `Transformer2DModel` on a feature map: group norm (eps 1e-6), projection in, the
/// transformer blocks over the `H·W` positions, projection out, plus the input.
#[derive(Debug, Clone)]
pub struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: Projection,
    transformer_blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

impl Transformer2DModel {
    /// Loads the weights under `vb` (diffusers' parameter names); errors name a missing tensor or a
    /// wrong shape. Errors on zero heads or head width.
    pub fn new(vb: VarBuilder, config: &Transformer2DModelConfig) -> Result<Self> {
        if config.num_attention_heads == 0 || config.attention_head_dim == 0 {
            bail!(
                "{}: a transformer with {} heads of {} channels (are there more attention heads than channels?)",
                vb.prefix(),
                config.num_attention_heads,
                config.attention_head_dim
            );
        }
        let in_channels = config.in_channels;
        let out_channels = config.out_channels.unwrap_or(in_channels);
        let inner_dim = config.num_attention_heads * config.attention_head_dim;
        let norm = GroupNorm::new(vb.pp("norm"), config.norm_num_groups, in_channels, 1e-6)?;
        let (proj_in, proj_out) = if config.use_linear_projection {
            (
                Projection::Linear(Linear::new(vb.pp("proj_in"), in_channels, inner_dim, true)?),
                Projection::Linear(Linear::new(vb.pp("proj_out"), inner_dim, out_channels, true)?),
            )
        } else {
            (
                Projection::Conv(Conv2d::new(vb.pp("proj_in"), in_channels, inner_dim, 1, 1, 0, true)?),
                Projection::Conv(Conv2d::new(vb.pp("proj_out"), inner_dim, out_channels, 1, 1, 0, true)?),
            )
        };
        let mut transformer_blocks = Vec::with_capacity(config.num_layers);
        for i in 0..config.num_layers {
            transformer_blocks.push(BasicTransformerBlock::new(vb.pp("transformer_blocks").pp(i), inner_dim, config)?);
        }
        Ok(Self { norm, proj_in, transformer_blocks, proj_out })
    }

    /// `hidden_states` is `[B, C, H, W]`, `encoder_hidden_states` the context `[B, S, D]`.
    pub fn forward(&self, hidden_states: &Tensor, encoder_hidden_states: Option<&Tensor>, lora_dropout: Option<&LoraDropout>) -> Result<Tensor> {
        let (batch, _, height, width) = hidden_states.dims4()?;
        let residual = hidden_states;
        let normed = self.norm.forward(hidden_states)?;

        // [B, C, H, W] -> [B, H·W, C]
        let to_sequence = |t: &Tensor| -> Result<Tensor> {
            let channels = t.dim(1)?;
            Ok(t.permute((0, 2, 3, 1))?.reshape((batch, height * width, channels))?)
        };
        // [B, H·W, C] -> [B, C, H, W]
        let to_feature_map = |t: &Tensor| -> Result<Tensor> {
            let channels = t.dim(2)?;
            Ok(t.reshape((batch, height, width, channels))?.permute((0, 3, 1, 2))?.contiguous()?)
        };

        let mut hidden_states = match &self.proj_in {
            Projection::Conv(conv) => to_sequence(&conv.forward_with_lora_dropout(&normed, lora_dropout)?)?,
            Projection::Linear(linear) => linear.forward_with_lora_dropout(&to_sequence(&normed)?, lora_dropout)?,
        };
        for block in &self.transformer_blocks {
            hidden_states = block.forward(&hidden_states, encoder_hidden_states, lora_dropout)?;
        }
        let output = match &self.proj_out {
            Projection::Conv(conv) => conv.forward_with_lora_dropout(&to_feature_map(&hidden_states)?, lora_dropout)?,
            Projection::Linear(linear) => to_feature_map(&linear.forward_with_lora_dropout(&hidden_states, lora_dropout)?)?,
        };
        Ok((output + residual)?)
    }
}
