//! diffusers' `Attention` layer with its default processor (`AttnProcessor2_0`); port of
//! diffusers/models/attention_processor.py.
//!
//! Covers self-attention over feature maps as the UNet blocks use it (optional group norm,
//! residual connection, output rescaling) and attention over a separate context
//! (`cross_attention_dim`). Old checkpoints (google/ddpm-*) name the projections
//! `query`/`key`/`value`/`proj_attn`; diffusers renames them on load, and so do we.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::{GroupNorm, Linear, LoraDropout};
use crate::{bail, ops, Result};

/// `Attention.__init__`'s arguments that we support, with diffusers' defaults from
/// [`AttentionConfig::new`].
#[derive(Debug, Clone)]
pub struct AttentionConfig {
    /// Width of the queries' input (the features).
    pub query_dim: usize,
    /// The width of the context attended to; `None` for self-attention (`query_dim`).
    pub cross_attention_dim: Option<usize>,
    /// Attention heads.
    pub heads: usize,
    /// Width of each head.
    pub dim_head: usize,
    /// Bias on the query/key/value projections.
    pub bias: bool,
    /// Softmax in f32 (our attention always does this; kept for fidelity with configs).
    pub upcast_softmax: bool,
    /// Query-key products in f32 (SD 2.1). Our attention always computes scores in f32, and
    /// diffusers' default processor (`AttnProcessor2_0`) ignores the flag; kept for fidelity.
    pub upcast_attention: bool,
    /// Groups of the group norm applied to the input first, if any.
    pub norm_num_groups: Option<usize>,
    /// Bias on `to_out.0`.
    pub out_bias: bool,
    /// Scale scores by 1/sqrt(`dim_head`).
    pub scale_qk: bool,
    /// The group norm's epsilon.
    pub eps: f64,
    /// The output is divided by this.
    pub rescale_output_factor: f64,
    /// Add the input to the output.
    pub residual_connection: bool,
    /// Output width; defaults to `query_dim` (and then `heads * dim_head` is the inner width).
    pub out_dim: Option<usize>,
}

impl AttentionConfig {
    /// diffusers' defaults: 8 heads of 64, no projection bias, eps 1e-5.
    pub fn new(query_dim: usize) -> Self {
        Self {
            query_dim,
            cross_attention_dim: None,
            heads: 8,
            dim_head: 64,
            bias: false,
            upcast_softmax: false,
            upcast_attention: false,
            norm_num_groups: None,
            out_bias: true,
            scale_qk: true,
            eps: 1e-5,
            rescale_output_factor: 1.0,
            residual_connection: false,
            out_dim: None,
        }
    }
}

/// diffusers' `Attention` (models/attention_processor.py) with `AttnProcessor2_0`: multi-head
/// scaled dot-product attention over the features or a context.
#[derive(Debug, Clone)]
pub struct Attention {
    group_norm: Option<GroupNorm>,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    scale: Option<f64>,
    rescale_output_factor: f64,
    residual_connection: bool,
}

impl Attention {
    /// Loads the weights under `vb` (diffusers' parameter names); errors name a missing tensor or a
    /// wrong shape.
    pub fn new(vb: VarBuilder, config: &AttentionConfig) -> Result<Self> {
        if config.heads == 0 {
            bail!("{}: attention with 0 heads (is attention_head_dim larger than the channel count?)", vb.prefix());
        }
        let inner_dim = match config.out_dim {
            Some(out_dim) => out_dim,
            None => config.dim_head * config.heads,
        };
        let heads = match config.out_dim {
            Some(out_dim) => out_dim / config.dim_head.max(1),
            None => config.heads,
        };
        let out_dim = config.out_dim.unwrap_or(config.query_dim);
        let cross_attention_dim = config.cross_attention_dim.unwrap_or(config.query_dim);
        // AttnProcessor2_0 leaves the scale to SDPA (1/sqrt of the actual head width); without
        // `scale_qk`, diffusers uses AttnProcessor with scale 1.
        let scale = if config.scale_qk { None } else { Some(1.0) };

        let group_norm = match config.norm_num_groups {
            Some(groups) => Some(GroupNorm::new(vb.pp("group_norm"), groups, config.query_dim, config.eps)?),
            None => None,
        };

        // Checkpoints converted before diffusers 0.15 use the names of the old AttentionBlock.
        let deprecated = !vb.contains_tensor("to_q.weight") && vb.contains_tensor("query.weight");
        let (q_name, k_name, v_name, out_vb) = if deprecated {
            ("query", "key", "value", vb.pp("proj_attn"))
        } else {
            ("to_q", "to_k", "to_v", vb.pp("to_out").pp("0"))
        };
        let to_q = Linear::new(vb.pp(q_name), config.query_dim, inner_dim, config.bias)?;
        let to_k = Linear::new(vb.pp(k_name), cross_attention_dim, inner_dim, config.bias)?;
        let to_v = Linear::new(vb.pp(v_name), cross_attention_dim, inner_dim, config.bias)?;
        let to_out = Linear::new(out_vb, inner_dim, out_dim, config.out_bias)?;
        Ok(Self {
            group_norm,
            to_q,
            to_k,
            to_v,
            to_out,
            heads,
            scale,
            rescale_output_factor: config.rescale_output_factor,
            residual_connection: config.residual_connection,
        })
    }

    /// `hidden_states` is a feature map `[B, C, H, W]` or a sequence `[B, L, C]`;
    /// `encoder_hidden_states` (`[B, S, cross_attention_dim]`) is the context for
    /// cross-attention, or `None` for self-attention. The output has the input's shape.
    pub fn forward(&self, hidden_states: &Tensor, encoder_hidden_states: Option<&Tensor>, lora_dropout: Option<&LoraDropout>) -> Result<Tensor> {
        super::checkpointed(self, hidden_states, encoder_hidden_states, lora_dropout, Self::forward_block)
    }

    /// [`Self::forward`] without gradient checkpointing.
    fn forward_block(&self, hidden_states: &Tensor, encoder_hidden_states: Option<&Tensor>, lora_dropout: Option<&LoraDropout>) -> Result<Tensor> {
        let residual = hidden_states;
        let input_dims = hidden_states.dims().to_vec();
        // The group norm acts per channel, so it can be applied before flattening.
        let normed = match &self.group_norm {
            Some(group_norm) if input_dims.len() == 4 => group_norm.forward(hidden_states)?,
            _ => hidden_states.clone(),
        };
        let sequence = match input_dims.len() {
            4 => {
                let (batch, channels, height, width) = normed.dims4()?;
                // Contiguous once here, not in each of the three projections.
                normed.reshape((batch, channels, height * width))?.transpose(1, 2)?.contiguous()?
            }
            3 => match &self.group_norm {
                Some(group_norm) => group_norm.forward(&normed.transpose(1, 2)?)?.transpose(1, 2)?,
                None => normed,
            },
            _ => bail!("attention input must be [B, C, H, W] or [B, L, C], got {input_dims:?}"),
        };
        let batch = sequence.dim(0)?;

        let query = self.to_q.forward_with_lora_dropout(&sequence, lora_dropout)?;
        let context = encoder_hidden_states.unwrap_or(&sequence);
        let key = self.to_k.forward_with_lora_dropout(context, lora_dropout)?;
        let value = self.to_v.forward_with_lora_dropout(context, lora_dropout)?;

        let inner_dim = key.dim(2)?;
        let head_dim = inner_dim / self.heads;
        let split_heads = |t: &Tensor| -> Result<Tensor> {
            Ok(t.reshape((batch, (), self.heads, head_dim))?.transpose(1, 2)?)
        };
        let precision = ops::Precision::of_weights(self.to_q.weight_dtype());
        let attended = ops::scaled_dot_product_attention_in(&split_heads(&query)?, &split_heads(&key)?, &split_heads(&value)?, self.scale, precision)?;
        let attended = attended.transpose(1, 2)?.reshape((batch, (), self.heads * head_dim))?;
        let mut output = self.to_out.forward_with_lora_dropout(&attended, lora_dropout)?;

        if input_dims.len() == 4 {
            output = output.transpose(1, 2)?.reshape(input_dims.as_slice())?;
        }
        if self.residual_connection {
            output = (output + residual)?;
        }
        Ok(if self.rescale_output_factor != 1.0 { (output / self.rescale_output_factor)? } else { output })
    }
}
