//! Residual blocks and the resampling layers inside UNets and autoencoders; port of
//! diffusers/models/resnet.py (`ResnetBlock2D`), upsampling.py (`Upsample2D`,
//! `FirUpsample2D`, `upsample_2d`, `upfirdn2d_native`) and downsampling.py (`Downsample2D`,
//! `FirDownsample2D`, `downsample_2d`).

use candle_core::{Tensor, D};
use candle_nn::VarBuilder;

use super::{Activation, Conv2d, GroupNorm, Linear, LoraDropout};
use crate::{bail, ops, Error, Result};

/// How a resnet block is conditioned on the time embedding (`time_embedding_norm`, the
/// models' `resnet_time_scale_shift`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeEmbeddingNorm {
    /// Add the projected embedding before the second normalisation.
    Default,
    /// Project to a scale and a shift applied after the second normalisation.
    ScaleShift,
}

impl TimeEmbeddingNorm {
    /// Parses `resnet_time_scale_shift`: `default` or `scale_shift`.
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "default" => Ok(TimeEmbeddingNorm::Default),
            "scale_shift" => Ok(TimeEmbeddingNorm::ScaleShift),
            other => Err(Error::invalid(format!(
                "resnet_time_scale_shift `{other}` is not supported (supported: default, scale_shift)"
            ))),
        }
    }
}

/// The resampling filter of a resnet that changes resolution (`kernel` in diffusers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResampleKernel {
    /// Nearest-neighbour ×2 up, 2×2 average pooling down (diffusers' default and `sde_vp`).
    Nearest,
    /// The FIR filter (1, 3, 3, 1) of score-SDE models (`fir`).
    Fir,
}

/// `ResnetBlock2D`'s arguments, with diffusers' defaults from [`ResnetBlock2DConfig::new`].
#[derive(Debug, Clone)]
pub struct ResnetBlock2DConfig {
    /// Channels of the input.
    pub in_channels: usize,
    /// Defaults to `in_channels`.
    pub out_channels: Option<usize>,
    /// `None` for blocks without time conditioning (autoencoders).
    pub temb_channels: Option<usize>,
    /// Groups of the first group norm.
    pub groups: usize,
    /// Defaults to `groups`.
    pub groups_out: Option<usize>,
    /// The group norms' epsilon.
    pub eps: f64,
    /// The activation.
    pub non_linearity: Activation,
    /// Skip the activation before the time projection.
    pub skip_time_act: bool,
    /// How the time embedding is applied.
    pub time_embedding_norm: TimeEmbeddingNorm,
    /// The resampling filter for `up` / `down`.
    pub kernel: ResampleKernel,
    /// The output is divided by this.
    pub output_scale_factor: f64,
    /// Defaults to "the block changes the channel count".
    pub use_in_shortcut: Option<bool>,
    /// Upsample ×2 inside the block.
    pub up: bool,
    /// Downsample ×2 inside the block.
    pub down: bool,
    /// Bias on the 1×1 shortcut convolution.
    pub conv_shortcut_bias: bool,
    /// Defaults to `out_channels`.
    pub conv_2d_out_channels: Option<usize>,
}

impl ResnetBlock2DConfig {
    /// diffusers' defaults: 512 time channels, 32 groups, eps 1e-6, SiLU ("swish").
    pub fn new(in_channels: usize, out_channels: usize) -> Self {
        Self {
            in_channels,
            out_channels: Some(out_channels),
            temb_channels: Some(512),
            groups: 32,
            groups_out: None,
            eps: 1e-6,
            non_linearity: Activation::Silu,
            skip_time_act: false,
            time_embedding_norm: TimeEmbeddingNorm::Default,
            kernel: ResampleKernel::Nearest,
            output_scale_factor: 1.0,
            use_in_shortcut: None,
            up: false,
            down: false,
            conv_shortcut_bias: true,
            conv_2d_out_channels: None,
        }
    }
}

/// How a resnet block changes resolution, applied to both its input and its residual branch.
#[derive(Debug, Clone)]
enum Resample {
    Up(ResampleKernel),
    Down(ResampleKernel),
}

impl Resample {
    fn forward(&self, input: &Tensor) -> Result<Tensor> {
        match self {
            Resample::Up(ResampleKernel::Nearest) => upsample_nearest(input, None),
            Resample::Up(ResampleKernel::Fir) => upsample_2d(input, &FIR_KERNEL, 2, 1.0),
            Resample::Down(ResampleKernel::Nearest) => Ok(input.avg_pool2d(2)?),
            Resample::Down(ResampleKernel::Fir) => downsample_2d(input, &FIR_KERNEL, 2, 1.0),
        }
    }
}

/// `ResnetBlock2D`: `norm1 -> act -> [resample] -> conv1 -> (+ time) -> norm2 -> act -> conv2`,
/// added to the (resampled, possibly 1×1-projected) input and divided by
/// `output_scale_factor`.
#[derive(Debug, Clone)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    nonlinearity: Activation,
    resample: Option<Resample>,
    conv_shortcut: Option<Conv2d>,
    time_embedding_norm: TimeEmbeddingNorm,
    skip_time_act: bool,
    output_scale_factor: f64,
}

impl ResnetBlock2D {
    /// Loads the weights under `vb` (diffusers' parameter names); errors name a missing tensor or a
    /// wrong shape.
    pub fn new(vb: VarBuilder, config: &ResnetBlock2DConfig) -> Result<Self> {
        let in_channels = config.in_channels;
        let out_channels = config.out_channels.unwrap_or(in_channels);
        let groups_out = config.groups_out.unwrap_or(config.groups);
        let norm1 = GroupNorm::new(vb.pp("norm1"), config.groups, in_channels, config.eps)?;
        let conv1 = Conv2d::new(vb.pp("conv1"), in_channels, out_channels, 3, 1, 1, true)?;
        let time_emb_proj = match config.temb_channels {
            Some(temb_channels) => {
                let projected = match config.time_embedding_norm {
                    TimeEmbeddingNorm::Default => out_channels,
                    TimeEmbeddingNorm::ScaleShift => 2 * out_channels,
                };
                Some(Linear::new(vb.pp("time_emb_proj"), temb_channels, projected, true)?)
            }
            None => None,
        };
        let norm2 = GroupNorm::new(vb.pp("norm2"), groups_out, out_channels, config.eps)?;
        let conv_2d_out_channels = config.conv_2d_out_channels.unwrap_or(out_channels);
        let conv2 = Conv2d::new(vb.pp("conv2"), out_channels, conv_2d_out_channels, 3, 1, 1, true)?;
        let resample = if config.up {
            Some(Resample::Up(config.kernel))
        } else if config.down {
            Some(Resample::Down(config.kernel))
        } else {
            None
        };
        let use_in_shortcut = config.use_in_shortcut.unwrap_or(in_channels != conv_2d_out_channels);
        let conv_shortcut = if use_in_shortcut {
            Some(Conv2d::new(vb.pp("conv_shortcut"), in_channels, conv_2d_out_channels, 1, 1, 0, config.conv_shortcut_bias)?)
        } else {
            None
        };
        Ok(Self {
            norm1,
            conv1,
            time_emb_proj,
            norm2,
            conv2,
            nonlinearity: config.non_linearity,
            resample,
            conv_shortcut,
            time_embedding_norm: config.time_embedding_norm,
            skip_time_act: config.skip_time_act,
            output_scale_factor: config.output_scale_factor,
        })
    }

    /// Runs the block on `input_tensor` `[B, C_in, H, W]`, conditioned on the time embedding `temb`
    /// `[B, temb_channels]`: `[B, C_out, H', W']`.
    pub fn forward(&self, input_tensor: &Tensor, temb: Option<&Tensor>, lora_dropout: Option<&LoraDropout>) -> Result<Tensor> {
        super::checkpointed(self, input_tensor, temb, lora_dropout, Self::forward_block)
    }

    /// [`Self::forward`] without gradient checkpointing.
    fn forward_block(&self, input_tensor: &Tensor, temb: Option<&Tensor>, lora_dropout: Option<&LoraDropout>) -> Result<Tensor> {
        // Intermediates are reassigned, not rebound with `let` (which would keep each alive
        // to the end): in a 512×512 VAE decoder they are hundreds of MB each.
        let mut hidden_states = self.norm1.forward_then(input_tensor, self.nonlinearity)?;
        let mut input_tensor = match &self.resample {
            Some(resample) => {
                hidden_states = resample.forward(&hidden_states)?;
                resample.forward(input_tensor)?
            }
            None => input_tensor.clone(),
        };
        // `[B, C]` (or `[B, 2C]` for scale and shift).
        let temb = match (&self.time_emb_proj, temb) {
            (Some(time_emb_proj), Some(temb)) => {
                let temb = if self.skip_time_act { temb.clone() } else { self.nonlinearity.forward(temb)? };
                Some(time_emb_proj.forward_with_lora_dropout(&temb, lora_dropout)?)
            }
            (Some(_), None) => bail!("this resnet block is conditioned on a time embedding, but none was given"),
            (None, _) => None,
        };

        hidden_states = match self.time_embedding_norm {
            TimeEmbeddingNorm::Default => {
                hidden_states = match &temb {
                    // Added with conv1's bias, in the same pass.
                    Some(temb) => self.conv1.forward_plus_image_bias(&hidden_states, temb, lora_dropout)?,
                    None => self.conv1.forward_with_lora_dropout(&hidden_states, lora_dropout)?,
                };
                self.norm2.forward_then(&hidden_states, self.nonlinearity)?
            }
            TimeEmbeddingNorm::ScaleShift => {
                hidden_states = self.conv1.forward_with_lora_dropout(&hidden_states, lora_dropout)?;
                let Some(temb) = &temb else {
                    bail!("`temb` should not be None when `time_embedding_norm` is scale_shift");
                };
                let temb = temb.unsqueeze(2)?.unsqueeze(3)?;
                let chunks = temb.chunk(2, 1)?;
                let hidden_states = self.norm2.forward(&hidden_states)?;
                let hidden_states = hidden_states.broadcast_mul(&(&chunks[0] + 1.0)?)?.broadcast_add(&chunks[1])?;
                self.nonlinearity.forward(&hidden_states)?
            }
        };
        hidden_states = self.conv2.forward_with_lora_dropout(&hidden_states, lora_dropout)?;

        if let Some(conv_shortcut) = &self.conv_shortcut {
            input_tensor = conv_shortcut.forward_with_lora_dropout(&input_tensor, lora_dropout)?;
        }
        let output = (input_tensor + hidden_states)?;
        Ok(if self.output_scale_factor != 1.0 { (output / self.output_scale_factor)? } else { output })
    }
}

/// `F.interpolate(mode="nearest")`: ×2, or to `output_size` (height, width).
fn upsample_nearest(input: &Tensor, output_size: Option<(usize, usize)>) -> Result<Tensor> {
    let (_, _, height, width) = input.dims4()?;
    let (target_height, target_width) = output_size.unwrap_or((2 * height, 2 * width));
    ops::upsample_nearest2d(input, target_height, target_width)
}

/// `Upsample2D` without transposed convolution or normalisation: nearest ×2, then
/// (if `use_conv`) a 3×3 convolution named `conv`.
#[derive(Debug, Clone)]
pub struct Upsample2D {
    conv: Option<Conv2d>,
}

impl Upsample2D {
    /// Loads `conv` under `vb` when `use_conv`.
    pub fn new(vb: VarBuilder, channels: usize, use_conv: bool, out_channels: Option<usize>) -> Result<Self> {
        let out_channels = out_channels.unwrap_or(channels);
        let conv = if use_conv { Some(Conv2d::new(vb.pp("conv"), channels, out_channels, 3, 1, 1, true)?) } else { None };
        Ok(Self { conv })
    }

    /// Doubles `[B, C, H, W]` to `[B, C_out, 2H, 2W]`, or to `output_size` when given (to match a
    /// skip connection of odd size).
    pub fn forward(&self, hidden_states: &Tensor, output_size: Option<(usize, usize)>, lora_dropout: Option<&LoraDropout>) -> Result<Tensor> {
        let hidden_states = upsample_nearest(hidden_states, output_size)?;
        match &self.conv {
            Some(conv) => conv.forward_with_lora_dropout(&hidden_states, lora_dropout),
            None => Ok(hidden_states),
        }
    }
}

/// `Downsample2D` without normalisation: a stride-2 3×3 convolution named `conv` (with
/// `padding` 0 meaning "pad right and bottom by one"), or 2×2 average pooling.
#[derive(Debug, Clone)]
pub struct Downsample2D {
    conv: Option<Conv2d>,
    padding: usize,
}

impl Downsample2D {
    /// Loads `conv` under `vb` when `use_conv`; pooling cannot change the channel count.
    pub fn new(vb: VarBuilder, channels: usize, use_conv: bool, out_channels: Option<usize>, padding: usize) -> Result<Self> {
        let out_channels = out_channels.unwrap_or(channels);
        let conv = if use_conv {
            Some(Conv2d::new(vb.pp("conv"), channels, out_channels, 3, 2, padding, true)?)
        } else {
            if out_channels != channels {
                bail!("Downsample2D by pooling cannot change {channels} channels into {out_channels}");
            }
            None
        };
        Ok(Self { conv, padding })
    }

    /// Halves `[B, C, H, W]` to `[B, C_out, H / 2, W / 2]`.
    pub fn forward(&self, hidden_states: &Tensor, lora_dropout: Option<&LoraDropout>) -> Result<Tensor> {
        match &self.conv {
            Some(conv) => {
                let hidden_states = if self.padding == 0 {
                    hidden_states.pad_with_zeros(D::Minus1, 0, 1)?.pad_with_zeros(D::Minus2, 0, 1)?
                } else {
                    hidden_states.clone()
                };
                conv.forward_with_lora_dropout(&hidden_states, lora_dropout)
            }
            None => Ok(hidden_states.avg_pool2d(2)?),
        }
    }
}

/// The separable FIR filter of score-SDE models, before normalisation.
pub const FIR_KERNEL: [f32; 4] = [1.0, 3.0, 3.0, 1.0];

/// The 2-D filter `outer(kernel, kernel) / sum * gain`, flipped for use as a convolution
/// weight `[1, 1, k, k]` (as `upfirdn2d_native` flips it).
fn fir_filter(kernel: &[f32], gain: f32, device: &candle_core::Device) -> Result<Tensor> {
    let size = kernel.len();
    let mut filter = Vec::with_capacity(size * size);
    for a in kernel {
        for b in kernel {
            filter.push(a * b);
        }
    }
    let total: f32 = filter.iter().sum();
    let mut flipped: Vec<f32> = filter.iter().map(|v| v / total * gain).collect();
    flipped.reverse();
    Ok(Tensor::from_vec(flipped, (1, 1, size, size), device)?)
}

/// `upfirdn2d_native`: zero-insertion upsampling by `up`, zero padding (`pad.0` before,
/// `pad.1` after, in both directions), filtering with `filter` (already flipped), and
/// keeping every `down`-th sample. Each channel is filtered separately.
fn upfirdn2d(input: &Tensor, filter: &Tensor, up: usize, down: usize, pad: (usize, usize)) -> Result<Tensor> {
    let (batch, channels, height, width) = input.dims4()?;
    let mut x = input.reshape((batch * channels, 1, height, 1, width, 1))?;
    if up > 1 {
        x = x.pad_with_zeros(5, 0, up - 1)?.pad_with_zeros(3, 0, up - 1)?;
    }
    let x = x.reshape((batch * channels, 1, height * up, width * up))?;
    let x = x.pad_with_zeros(2, pad.0, pad.1)?.pad_with_zeros(3, pad.0, pad.1)?;
    let x = ops::conv2d(&x, filter, None, down, 0)?;
    let (_, _, out_height, out_width) = x.dims4()?;
    Ok(x.reshape((batch, channels, out_height, out_width))?)
}

/// `upsample_2d`: FIR-filtered upsampling by `factor`.
pub fn upsample_2d(input: &Tensor, kernel: &[f32], factor: usize, gain: f32) -> Result<Tensor> {
    let filter = fir_filter(kernel, gain * (factor * factor) as f32, input.device())?.to_dtype(input.dtype())?;
    let pad_value = kernel.len() as isize - factor as isize;
    let pad = ((pad_value + 1).div_euclid(2) + factor as isize - 1, pad_value.div_euclid(2));
    if pad.0 < 0 || pad.1 < 0 {
        bail!("upsample_2d: a FIR kernel of {} taps is too short for factor {factor}", kernel.len());
    }
    upfirdn2d(input, &filter, factor, 1, (pad.0 as usize, pad.1 as usize))
}

/// `downsample_2d`: FIR-filtered downsampling by `factor`.
pub fn downsample_2d(input: &Tensor, kernel: &[f32], factor: usize, gain: f32) -> Result<Tensor> {
    let filter = fir_filter(kernel, gain, input.device())?.to_dtype(input.dtype())?;
    let pad_value = kernel.len() as isize - factor as isize;
    let pad = ((pad_value + 1).div_euclid(2), pad_value.div_euclid(2));
    if pad.0 < 0 || pad.1 < 0 {
        bail!("downsample_2d: a FIR kernel of {} taps is too short for factor {factor}", kernel.len());
    }
    upfirdn2d(input, &filter, 1, factor, (pad.0 as usize, pad.1 as usize))
}

/// `FirUpsample2D` without its optional convolution (as the skip blocks use it).
#[derive(Debug, Clone, Default)]
pub struct FirUpsample2D;

impl FirUpsample2D {
    /// Doubles `[B, C, H, W]` to `[B, C, 2H, 2W]` with the FIR kernel.
    pub fn forward(&self, hidden_states: &Tensor) -> Result<Tensor> {
        upsample_2d(hidden_states, &FIR_KERNEL, 2, 1.0)
    }
}

/// `FirDownsample2D` without its optional convolution (as the skip blocks use it).
#[derive(Debug, Clone, Default)]
pub struct FirDownsample2D;

impl FirDownsample2D {
    /// Halves `[B, C, H, W]` to `[B, C, H / 2, W / 2]` with the FIR kernel.
    pub fn forward(&self, hidden_states: &Tensor) -> Result<Tensor> {
        downsample_2d(hidden_states, &FIR_KERNEL, 2, 1.0)
    }
}
