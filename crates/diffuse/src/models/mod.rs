//! Denoising and autoencoder networks, each a port of a diffusers model file, loaded from a
//! folder's `config.json` and safetensors weights through a candle-nn `VarBuilder`.
//!
//! This module also holds the weight-carrying layers the models share (the `torch.nn`
//! modules diffusers builds on); their arithmetic goes through [`crate::ops`].

pub mod attention_processor;
pub mod autoencoder_kl;
pub mod autoencoder_tiny;
pub mod clip_text;
pub mod embeddings;
pub mod resnet;
pub mod transformer_2d;
pub mod unet_2d;
pub mod unet_2d_blocks;
pub mod unet_2d_condition;
pub mod vae;

use std::cell::RefCell;

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

use crate::rng::TorchGenerator;
use crate::{ops, Error, Result};

/// `torch.nn.Conv2d` with square kernels, stride and symmetric zero padding, with a LoRA
/// branch beside it when its weights carry one.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    padding: usize,
    lora: Option<LoraBranch>,
}

impl Conv2d {
    /// Loads `weight` (`[out, in, k, k]`) and, if `bias`, `bias` (`[out]`) under `vb`.
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        kernel_size: usize,
        stride: usize,
        padding: usize,
        bias: bool,
    ) -> Result<Self> {
        let weight = vb.get((out_channels, in_channels, kernel_size, kernel_size), "weight")?;
        let bias = if bias { Some(vb.get(out_channels, "bias")?) } else { None };
        let lora = LoraBranch::new(&vb, &[in_channels, kernel_size, kernel_size], &[out_channels, 1, 1])?;
        Ok(Self { weight, bias, stride, padding, lora })
    }

    /// `input` `[B, C_in, H, W]` to `[B, C_out, H', W']`.
    pub fn forward(&self, input: &Tensor) -> Result<Tensor> {
        self.forward_with_lora_dropout(input, None)
    }

    /// [`Self::forward`], with `lora_dropout` on the LoRA branch's input (training).
    pub fn forward_with_lora_dropout(&self, input: &Tensor, lora_dropout: Option<&LoraDropout>) -> Result<Tensor> {
        let output = ops::conv2d(input, &self.weight, self.bias.as_ref(), self.stride, self.padding)?;
        self.plus_lora(input, output, lora_dropout)
    }

    /// [`Self::forward_with_lora_dropout`] plus `image_bias[n, c]` (`[B, C_out]`) on every
    /// position of image `n`'s channel `c` (a ResNet block's time embedding), added with the
    /// layer's bias.
    pub fn forward_plus_image_bias(&self, input: &Tensor, image_bias: &Tensor, lora_dropout: Option<&LoraDropout>) -> Result<Tensor> {
        let output = ops::conv2d_plus_image_bias(input, &self.weight, self.bias.as_ref(), image_bias, self.stride, self.padding)?;
        self.plus_lora(input, output, lora_dropout)
    }

    /// `output` plus the LoRA branch's update of `input`, if the layer has one.
    fn plus_lora(&self, input: &Tensor, output: Tensor, lora_dropout: Option<&LoraDropout>) -> Result<Tensor> {
        match &self.lora {
            None => Ok(output),
            // peft's lora.Conv2d: A has the layer's kernel, stride and padding, B is 1×1.
            Some(lora) => {
                let input = LoraDropout::apply(lora_dropout, input)?;
                // The scale goes on the small up matrix, not on the layer's whole output.
                let update = ops::conv2d(&ops::conv2d(&input, &lora.down, None, self.stride, self.padding)?, &(&lora.up * lora.scale)?, None, 1, 0)?;
                Ok((output + update)?)
            }
        }
    }
}

/// `torch.nn.Linear`, with a LoRA branch beside it when its weights carry one.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
    lora: Option<LoraBranch>,
}

/// A linear layer's weight: the tensor (training's variables, other devices), or for
/// inference on the CPU only the panels the kernels read, packed once when the model loads.
#[derive(Debug, Clone)]
enum LinearWeight {
    Tensor(Tensor),
    Packed(std::sync::Arc<ops::PackedLinearWeight>),
}

/// A LoRA adapter beside a frozen layer, unmerged (peft's `lora.Linear` and `lora.Conv2d`):
/// the output gains `scale · up(down(x))`. Present when the layer's weights have
/// `lora_A.weight` (`[r, in]`, or `[r, in, k, k]`), `lora_B.weight` (`[out, r]`, or
/// `[out, r, 1, 1]`) and `lora_scale` (alpha / r), as the LoRA training backend
/// (lora/adapters.rs) gives the layers it adapts; LoRA files at inference are fused instead.
#[derive(Debug, Clone)]
struct LoraBranch {
    down: Tensor,
    up: Tensor,
    scale: f64,
}

impl LoraBranch {
    /// `down_dims` and `up_dims` are the matrices' shapes after and before the rank.
    fn new(vb: &VarBuilder, down_dims: &[usize], up_dims: &[usize]) -> Result<Option<Self>> {
        if !vb.contains_tensor("lora_A.weight") {
            return Ok(None);
        }
        // Backends that make every weight up from its shape (zeros, random: shape checks and
        // benchmarks) claim this name too, but cannot give it without a shape: no LoRA there.
        let Ok(down) = vb.get_unchecked("lora_A.weight") else {
            return Ok(None);
        };
        let up = vb.get_unchecked("lora_B.weight")?;
        let scale = vb.get_unchecked_dtype("lora_scale", DType::F32)?.to_scalar::<f32>()? as f64;
        let rank = down.dim(0)?;
        let (expected_down, expected_up) = ([&[rank], down_dims].concat(), [&up_dims[..1], &[rank], &up_dims[1..]].concat());
        if down.dims() != expected_down || up.dims() != expected_up {
            return Err(Error::invalid(format!(
                "{}: LoRA matrices {:?} and {:?} do not fit the layer (expected {expected_down:?} and {expected_up:?})",
                vb.prefix(),
                down.dims(),
                up.dims()
            )));
        }
        Ok(Some(Self { down, up, scale }))
    }
}

impl Linear {
    /// Loads `weight` (`[out, in]`) and, if `bias`, `bias` (`[out]`) under `vb`.
    pub fn new(vb: VarBuilder, in_features: usize, out_features: usize, bias: bool) -> Result<Self> {
        let weight = vb.get((out_features, in_features), "weight")?;
        let bias = if bias { Some(vb.get(out_features, "bias")?) } else { None };
        let lora = LoraBranch::new(&vb, &[in_features], &[out_features])?;
        // A trained LoRA branch needs the plain weight; so does every device but the CPU.
        let weight = match ops::PackedLinearWeight::new(&weight)? {
            Some(packed) if lora.is_none() => LinearWeight::Packed(std::sync::Arc::new(packed)),
            _ => LinearWeight::Tensor(weight),
        };
        Ok(Self { weight, bias, lora })
    }

    /// The type the weight is kept in.
    pub fn weight_dtype(&self) -> DType {
        match &self.weight {
            LinearWeight::Tensor(weight) => weight.dtype(),
            LinearWeight::Packed(packed) => packed.dtype(),
        }
    }

    /// `input` `[..., in_features]` to `[..., out_features]`.
    pub fn forward(&self, input: &Tensor) -> Result<Tensor> {
        self.forward_with_lora_dropout(input, None)
    }

    /// [`Self::forward`], with `lora_dropout` on the LoRA branch's input (training).
    pub fn forward_with_lora_dropout(&self, input: &Tensor, lora_dropout: Option<&LoraDropout>) -> Result<Tensor> {
        if let (Some(lora), LinearWeight::Tensor(weight), None) = (&self.lora, &self.weight, lora_dropout) {
            if let Some(output) = ops::linear_with_lora(input, weight, self.bias.as_ref(), &lora.down, &lora.up, lora.scale)? {
                return Ok(output);
            }
        }
        let output = match &self.weight {
            LinearWeight::Tensor(weight) => ops::linear(input, weight, self.bias.as_ref())?,
            LinearWeight::Packed(packed) => ops::linear_packed(input, packed, self.bias.as_ref())?,
        };
        match &self.lora {
            None => Ok(output),
            Some(lora) => {
                let input = LoraDropout::apply(lora_dropout, input)?;
                // The scale goes on the small up matrix, not on the layer's whole output.
                let update = ops::linear(&ops::linear(&input, &lora.down, None)?, &(&lora.up * lora.scale)?, None)?;
                Ok((output + update)?)
            }
        }
    }
}

/// A block's forward pass from its input and optional context, what the UNet's resnets
/// (context: the time embedding) and attention blocks (context: the text) share.
type BlockForward<B> = fn(&B, &Tensor, Option<&Tensor>, Option<&LoraDropout>) -> Result<Tensor>;

/// `forward(block, input, context, lora_dropout)`, checkpointed under gradient checkpointing
/// (`ops::checkpoint`: only the inputs kept, the block run again in the backward pass), except
/// with LoRA dropout, whose masks would be drawn again when the block runs a second time.
fn checkpointed<B: Clone + Send + Sync + 'static>(
    block: &B,
    input: &Tensor,
    context: Option<&Tensor>,
    lora_dropout: Option<&LoraDropout>,
    forward: BlockForward<B>,
) -> Result<Tensor> {
    if lora_dropout.is_none() && ops::checkpoint::is_active() {
        let block = block.clone();
        let inputs: Vec<&Tensor> = std::iter::once(input).chain(context).collect();
        return ops::checkpoint::checkpoint(&inputs, std::sync::Arc::new(move |x: &[Tensor]| forward(&block, &x[0], x.get(1), None)));
    }
    forward(block, input, context, lora_dropout)
}

/// peft's `lora_dropout` for one training forward pass, handed down explicitly to every layer
/// that may carry a LoRA branch: each element of a branch's input is zeroed with probability
/// `p` and the rest scaled by 1/(1 − p), the masks drawn from `generator` in the order the
/// layers run (the training task owns the generator and checkpoints its state, so a resumed
/// run draws the same masks). Inference passes `None`: branches see their input unchanged.
pub struct LoraDropout<'g> {
    p: f32,
    // A forward pass takes `&self` everywhere, and each branch draws in turn.
    generator: RefCell<&'g mut TorchGenerator>,
}

impl<'g> LoraDropout<'g> {
    /// `None` for `p` = 0 (no dropout, no draws), else dropout with probability `p`.
    pub fn new(p: f64, generator: &'g mut TorchGenerator) -> Option<Self> {
        (p > 0.0).then(|| LoraDropout { p: p as f32, generator: RefCell::new(generator) })
    }

    fn apply(dropout: Option<&Self>, input: &Tensor) -> Result<Tensor> {
        let Some(dropout) = dropout else {
            return Ok(input.clone());
        };
        let keep = 1.0 / (1.0 - dropout.p);
        let draws = dropout.generator.borrow_mut().rand(input.elem_count());
        let mask: Vec<f32> = draws.into_iter().map(|u| if u < dropout.p { 0.0 } else { keep }).collect();
        Ok((input * Tensor::from_vec(mask, input.shape(), input.device())?.to_dtype(input.dtype())?)?)
    }
}

/// `torch.nn.GroupNorm` with affine parameters.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    num_groups: usize,
    eps: f64,
}

impl GroupNorm {
    /// Loads `weight` and `bias` `[num_channels]`; errors unless `num_groups` divides
    /// `num_channels`.
    pub fn new(vb: VarBuilder, num_groups: usize, num_channels: usize, eps: f64) -> Result<Self> {
        if num_groups == 0 || !num_channels.is_multiple_of(num_groups) {
            return Err(Error::invalid(format!(
                "{}: GroupNorm with {num_groups} groups cannot split {num_channels} channels \
                 (the number of groups must divide the number of channels)",
                vb.prefix()
            )));
        }
        let weight = vb.get(num_channels, "weight")?;
        let bias = vb.get(num_channels, "bias")?;
        Ok(Self { weight, bias, num_groups, eps })
    }

    /// Normalises `input` `[B, C, ...]` over each group of channels.
    pub fn forward(&self, input: &Tensor) -> Result<Tensor> {
        ops::group_norm(input, self.num_groups, &self.weight, &self.bias, self.eps)
    }

    /// `activation(self.forward(input))`, fused where the activation is SiLU.
    pub fn forward_then(&self, input: &Tensor, activation: Activation) -> Result<Tensor> {
        match activation {
            Activation::Silu => ops::group_norm_silu(input, self.num_groups, &self.weight, &self.bias, self.eps),
            other => other.forward(&self.forward(input)?),
        }
    }
}

/// `torch.nn.LayerNorm` over the last dimension, with affine parameters.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// Loads `weight` and `bias` `[normalized_shape]`.
    pub fn new(vb: VarBuilder, normalized_shape: usize, eps: f64) -> Result<Self> {
        Ok(Self { weight: vb.get(normalized_shape, "weight")?, bias: vb.get(normalized_shape, "bias")?, eps })
    }

    /// Normalises `input` over its last dimension.
    pub fn forward(&self, input: &Tensor) -> Result<Tensor> {
        ops::layer_norm(input, &self.weight, &self.bias, self.eps)
    }
}

/// `torch.nn.Embedding`: a lookup table indexed by integer ids.
#[derive(Debug, Clone)]
pub struct Embedding {
    weight: Tensor,
}

impl Embedding {
    /// Loads `weight` `[num_embeddings, embedding_dim]`.
    pub fn new(vb: VarBuilder, num_embeddings: usize, embedding_dim: usize) -> Result<Self> {
        Ok(Self { weight: vb.get((num_embeddings, embedding_dim), "weight")? })
    }

    /// Looks up `ids` (`[N]`, any integer or whole-valued float type) and returns `[N, dim]`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let num_embeddings = self.weight.dim(0)?;
        let values = ids.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
        let mut indices = Vec::with_capacity(values.len());
        for value in values {
            if value.fract() != 0.0 || value < 0.0 || value >= num_embeddings as f64 {
                return Err(Error::invalid(format!(
                    "embedding index {value} is not a whole number in 0..{num_embeddings}"
                )));
            }
            indices.push(value as u32);
        }
        let indices = Tensor::from_vec(indices, ids.elem_count(), ids.device())?;
        let rows = self.weight.index_select(&indices, 0)?;
        // A half-precision table on the CPU gives f32 rows: the activations' type there.
        Ok(rows.to_dtype(ops::activation_dtype(rows.dtype(), rows.device()))?)
    }
}

/// diffusers' `get_activation` (models/activations.py): the activation named by `act_fn`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// x · sigmoid(x) (`silu`, `swish`).
    Silu,
    /// x · tanh(softplus(x)).
    Mish,
    /// The exact (erf) GELU.
    Gelu,
    /// max(x, 0).
    Relu,
}

impl Activation {
    /// Parses a diffusers activation name (`silu`/`swish`, `mish`, `gelu`, `relu`; any case).
    pub fn from_name(name: &str) -> Result<Self> {
        Ok(match name.to_lowercase().as_str() {
            "silu" | "swish" => Activation::Silu,
            "mish" => Activation::Mish,
            "gelu" => Activation::Gelu,
            "relu" => Activation::Relu,
            _ => {
                return Err(Error::invalid(format!(
                    "activation function `{name}` is not supported (supported: silu, swish, mish, gelu, relu)"
                )))
            }
        })
    }

    /// Applies the activation elementwise.
    pub fn forward(&self, input: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Activation::Silu => ops::silu(input)?,
            // mish(x) = x * tanh(softplus(x)); for large x, exp overflows to inf and the
            // product correctly tends to x.
            Activation::Mish => (input * input.exp()?.affine(1.0, 1.0)?.log()?.tanh()?)?,
            // torch.nn.GELU() is the exact, erf-based GELU.
            Activation::Gelu => input.gelu_erf()?,
            Activation::Relu => input.relu()?,
        })
    }
}
