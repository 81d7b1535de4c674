//! The down, mid and up blocks of pixel-space UNets and of Stable Diffusion's conditional
//! UNet; port of diffusers/models/unets/unet_2d_blocks.py (`get_down_block`, `get_up_block`,
//! `UNetMidBlock2D`, `DownBlock2D`, `AttnDownBlock2D`, `ResnetDownsampleBlock2D`,
//! `SkipDownBlock2D`, `AttnSkipDownBlock2D`, `UpBlock2D`, `AttnUpBlock2D`,
//! `ResnetUpsampleBlock2D`, `SkipUpBlock2D`, `AttnSkipUpBlock2D`; and the cross-attention
//! blocks `CrossAttnDownBlock2D`, `UNetMidBlock2DCrossAttn`, `CrossAttnUpBlock2D`).

use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::attention_processor::{Attention, AttentionConfig};
use super::resnet::{
    Downsample2D, FirDownsample2D, FirUpsample2D, ResampleKernel, ResnetBlock2D, ResnetBlock2DConfig, TimeEmbeddingNorm,
    Upsample2D,
};
use super::transformer_2d::{Transformer2DModel, Transformer2DModelConfig};
use super::{Activation, Conv2d, GroupNorm, LoraDropout};
use crate::{ops, Error, Result};

/// How an attention block changes resolution (`downsample_type` / `upsample_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResampleType {
    /// A (strided or after-upsampling) 3×3 convolution.
    Conv,
    /// A resnet block that resamples inside.
    Resnet,
}

impl ResampleType {
    /// Parses `downsample_type` / `upsample_type` (`key` names which, for the error).
    pub fn from_name(key: &str, name: &str) -> Result<Self> {
        match name {
            "conv" => Ok(ResampleType::Conv),
            "resnet" => Ok(ResampleType::Resnet),
            other => Err(Error::invalid(format!("{key} `{other}` is not supported (supported: conv, resnet)"))),
        }
    }
}

/// The arguments `get_down_block` / `get_up_block` take (the up-only ones are ignored for
/// down blocks and vice versa).
#[derive(Debug, Clone)]
pub struct BlockArgs {
    /// Resnets (and attentions) in the block.
    pub num_layers: usize,
    /// Channels of the input.
    pub in_channels: usize,
    /// Channels of the output.
    pub out_channels: usize,
    /// Up blocks only: the channels coming from the block below.
    pub prev_output_channel: usize,
    /// Width of the time embedding (`None`: no time conditioning).
    pub temb_channels: Option<usize>,
    /// `add_downsample` for down blocks, `add_upsample` for up blocks.
    pub add_resample: bool,
    /// The resnets' group-norm epsilon.
    pub resnet_eps: f64,
    /// The resnets' activation.
    pub resnet_act_fn: Activation,
    /// The resnets' group-norm groups.
    pub resnet_groups: usize,
    /// Width of each attention head (`None`: one head).
    pub attention_head_dim: Option<usize>,
    /// Padding of the downsampling convolution.
    pub downsample_padding: usize,
    /// How the resnets take the time embedding.
    pub resnet_time_scale_shift: TimeEmbeddingNorm,
    /// Skip the activation before the time projection.
    pub resnet_skip_time_act: bool,
    /// The resnets' `output_scale_factor`.
    pub resnet_out_scale_factor: f64,
    /// `downsample_type` for down blocks, `upsample_type` for up blocks.
    pub resample_type: ResampleType,
}

/// The block types [`get_down_block`] builds.
pub const SUPPORTED_DOWN_BLOCKS: &[&str] =
    &["DownBlock2D", "AttnDownBlock2D", "ResnetDownsampleBlock2D", "SkipDownBlock2D", "AttnSkipDownBlock2D"];

/// The block types [`get_up_block`] builds.
pub const SUPPORTED_UP_BLOCKS: &[&str] =
    &["UpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D", "SkipUpBlock2D", "AttnSkipUpBlock2D"];

/// A resnet block in a UNet block, from the block's arguments.
fn resnet_config(args: &BlockArgs, in_channels: usize, out_channels: usize, output_scale_factor: f64) -> ResnetBlock2DConfig {
    ResnetBlock2DConfig {
        temb_channels: args.temb_channels,
        groups: args.resnet_groups,
        eps: args.resnet_eps,
        non_linearity: args.resnet_act_fn,
        time_embedding_norm: args.resnet_time_scale_shift,
        output_scale_factor,
        ..ResnetBlock2DConfig::new(in_channels, out_channels)
    }
}

/// The self-attention of the UNet blocks (`_from_deprecated_attn_block=True`): group norm,
/// projection biases, residual connection, one head per `attention_head_dim` channels.
fn block_attention(
    vb: VarBuilder,
    channels: usize,
    attention_head_dim: Option<usize>,
    norm_num_groups: Option<usize>,
    eps: f64,
    rescale_output_factor: f64,
) -> Result<Attention> {
    // `attention_head_dim=None` means one head over all channels.
    let dim_head = attention_head_dim.unwrap_or(channels);
    if dim_head == 0 {
        return Err(Error::invalid(format!("{}: attention_head_dim must not be 0", vb.prefix())));
    }
    let config = AttentionConfig {
        heads: channels / dim_head,
        dim_head,
        rescale_output_factor,
        eps,
        norm_num_groups,
        residual_connection: true,
        bias: true,
        upcast_softmax: true,
        ..AttentionConfig::new(channels)
    };
    Attention::new(vb, &config)
}

fn resnets_forward(
    resnets: &[ResnetBlock2D],
    hidden_states: &Tensor,
    temb: Option<&Tensor>,
    output_states: &mut Vec<Tensor>,
    lora_dropout: Option<&LoraDropout>,
) -> Result<Tensor> {
    let mut hidden_states = hidden_states.clone();
    for resnet in resnets {
        hidden_states = resnet.forward(&hidden_states, temb, lora_dropout)?;
        output_states.push(hidden_states.clone());
    }
    Ok(hidden_states)
}

/// `get_down_block`: builds the down block named `block_type` (a `UNetRes` prefix is ignored,
/// as in diffusers).
pub fn get_down_block(vb: VarBuilder, block_type: &str, args: &BlockArgs) -> Result<DownBlock> {
    let name = block_type.strip_prefix("UNetRes").unwrap_or(block_type);
    Ok(match name {
        "DownBlock2D" => DownBlock::Down(DownBlock2D::new(vb, args)?),
        "AttnDownBlock2D" => DownBlock::AttnDown(AttnDownBlock2D::new(vb, args)?),
        "ResnetDownsampleBlock2D" => DownBlock::ResnetDownsample(ResnetDownsampleBlock2D::new(vb, args)?),
        "SkipDownBlock2D" => DownBlock::Skip(SkipDownBlock2D::new(vb, args, false)?),
        "AttnSkipDownBlock2D" => DownBlock::Skip(SkipDownBlock2D::new(vb, args, true)?),
        _ => {
            return Err(Error::invalid(format!(
                "down block type `{block_type}` is not supported (supported: {})",
                SUPPORTED_DOWN_BLOCKS.join(", ")
            )))
        }
    })
}

/// `get_up_block`: builds the up block named `block_type`.
pub fn get_up_block(vb: VarBuilder, block_type: &str, args: &BlockArgs) -> Result<UpBlock> {
    let name = block_type.strip_prefix("UNetRes").unwrap_or(block_type);
    Ok(match name {
        "UpBlock2D" => UpBlock::Up(UpBlock2D::new(vb, args)?),
        "AttnUpBlock2D" => UpBlock::AttnUp(AttnUpBlock2D::new(vb, args)?),
        "ResnetUpsampleBlock2D" => UpBlock::ResnetUpsample(ResnetUpsampleBlock2D::new(vb, args)?),
        "SkipUpBlock2D" => UpBlock::Skip(SkipUpBlock2D::new(vb, args, false)?),
        "AttnSkipUpBlock2D" => UpBlock::Skip(SkipUpBlock2D::new(vb, args, true)?),
        _ => {
            return Err(Error::invalid(format!(
                "up block type `{block_type}` is not supported (supported: {})",
                SUPPORTED_UP_BLOCKS.join(", ")
            )))
        }
    })
}

/// A down block of any supported type.
#[derive(Debug, Clone)]
pub enum DownBlock {
    /// `DownBlock2D`.
    Down(DownBlock2D),
    /// `AttnDownBlock2D`.
    AttnDown(AttnDownBlock2D),
    /// `ResnetDownsampleBlock2D`.
    ResnetDownsample(ResnetDownsampleBlock2D),
    /// `SkipDownBlock2D`.
    Skip(SkipDownBlock2D),
}

impl DownBlock {
    /// Returns the new hidden states, the states the up path will take as skip connections,
    /// and the skip sample (the image-space path of score-SDE models; passed through
    /// unchanged by blocks that do not have one).
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        temb: Option<&Tensor>,
        skip_sample: Option<Tensor>,
    ) -> Result<(Tensor, Vec<Tensor>, Option<Tensor>)> {
        let (hidden_states, output_states) = match self {
            DownBlock::Down(block) => block.forward(hidden_states, temb, None)?,
            DownBlock::AttnDown(block) => block.forward(hidden_states, temb)?,
            DownBlock::ResnetDownsample(block) => block.forward(hidden_states, temb)?,
            DownBlock::Skip(block) => return block.forward(hidden_states, temb, skip_sample),
        };
        Ok((hidden_states, output_states, skip_sample))
    }
}

/// An up block of any supported type.
#[derive(Debug, Clone)]
pub enum UpBlock {
    /// `UpBlock2D`.
    Up(UpBlock2D),
    /// `AttnUpBlock2D`.
    AttnUp(AttnUpBlock2D),
    /// `ResnetUpsampleBlock2D`.
    ResnetUpsample(ResnetUpsampleBlock2D),
    /// `SkipUpBlock2D`.
    Skip(SkipUpBlock2D),
}

impl UpBlock {
    /// How many skip connections the block consumes (one per resnet).
    pub fn num_resnets(&self) -> usize {
        match self {
            UpBlock::Up(block) => block.resnets.len(),
            UpBlock::AttnUp(block) => block.resnets.len(),
            UpBlock::ResnetUpsample(block) => block.resnets.len(),
            UpBlock::Skip(block) => block.resnets.len(),
        }
    }

    /// `res_hidden_states` are the skip connections, consumed from the last; the skip sample
    /// is passed through unchanged by blocks that do not have one.
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        res_hidden_states: &[Tensor],
        temb: Option<&Tensor>,
        skip_sample: Option<Tensor>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let hidden_states = match self {
            UpBlock::Up(block) => block.forward(hidden_states, res_hidden_states, temb, None, None)?,
            UpBlock::AttnUp(block) => block.forward(hidden_states, res_hidden_states, temb)?,
            UpBlock::ResnetUpsample(block) => block.forward(hidden_states, res_hidden_states, temb)?,
            UpBlock::Skip(block) => return block.forward(hidden_states, res_hidden_states, temb, skip_sample),
        };
        Ok((hidden_states, skip_sample))
    }
}

/// `UNetMidBlock2D`'s arguments, as `UNet2DModel` passes them.
#[derive(Debug, Clone)]
pub struct MidBlockArgs {
    /// Channels of the input.
    pub in_channels: usize,
    /// Width of the time embedding (`None`: no time conditioning).
    pub temb_channels: Option<usize>,
    /// Resnets (and attentions) in the block.
    pub num_layers: usize,
    /// The resnets' group-norm epsilon.
    pub resnet_eps: f64,
    /// How the resnets take the time embedding.
    pub resnet_time_scale_shift: TimeEmbeddingNorm,
    /// The resnets' activation.
    pub resnet_act_fn: Activation,
    /// `None` means `min(in_channels / 4, 32)`.
    pub resnet_groups: Option<usize>,
    /// `None` means `resnet_groups` with the default time conditioning, and no group norm in
    /// the attention with `scale_shift`.
    pub attn_groups: Option<usize>,
    /// Whether the block has attention between its resnets.
    pub add_attention: bool,
    /// `None` means one head over all channels.
    pub attention_head_dim: Option<usize>,
    /// The output is divided by this.
    pub output_scale_factor: f64,
}

/// `UNetMidBlock2D`: resnet, then (attention, resnet) `num_layers` times.
#[derive(Debug, Clone)]
pub struct UNetMidBlock2D {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Option<Attention>>,
}

impl UNetMidBlock2D {
    /// diffusers' `UNetMidBlock2D` from `args`, loading the weights under `vb`.
    pub fn new(vb: VarBuilder, args: &MidBlockArgs) -> Result<Self> {
        let channels = args.in_channels;
        let resnet_groups = args.resnet_groups.unwrap_or_else(|| (channels / 4).min(32));
        let attn_groups = match args.attn_groups {
            Some(groups) => Some(groups),
            None if args.resnet_time_scale_shift == TimeEmbeddingNorm::Default => Some(resnet_groups),
            None => None,
        };
        let resnet_config = ResnetBlock2DConfig {
            temb_channels: args.temb_channels,
            groups: resnet_groups,
            eps: args.resnet_eps,
            non_linearity: args.resnet_act_fn,
            time_embedding_norm: args.resnet_time_scale_shift,
            output_scale_factor: args.output_scale_factor,
            ..ResnetBlock2DConfig::new(channels, channels)
        };
        let mut resnets = vec![ResnetBlock2D::new(vb.pp("resnets").pp(0), &resnet_config)?];
        let mut attentions = Vec::with_capacity(args.num_layers);
        for i in 0..args.num_layers {
            attentions.push(if args.add_attention {
                Some(block_attention(
                    vb.pp("attentions").pp(i),
                    channels,
                    args.attention_head_dim,
                    attn_groups,
                    args.resnet_eps,
                    args.output_scale_factor,
                )?)
            } else {
                None
            });
            resnets.push(ResnetBlock2D::new(vb.pp("resnets").pp(i + 1), &resnet_config)?);
        }
        Ok(Self { resnets, attentions })
    }

    /// Runs the block on `hidden_states` `[B, C, H, W]` with the time embedding `temb` `[B, T]`;
    /// the shape is kept.
    pub fn forward(&self, hidden_states: &Tensor, temb: Option<&Tensor>, lora_dropout: Option<&LoraDropout>) -> Result<Tensor> {
        let mut hidden_states = self.resnets[0].forward(hidden_states, temb, lora_dropout)?;
        for (attention, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            if let Some(attention) = attention {
                hidden_states = attention.forward(&hidden_states, None, lora_dropout)?;
            }
            hidden_states = resnet.forward(&hidden_states, temb, lora_dropout)?;
        }
        Ok(hidden_states)
    }
}

/// `DownBlock2D`: resnets, then a strided-convolution downsampler.
#[derive(Debug, Clone)]
pub struct DownBlock2D {
    resnets: Vec<ResnetBlock2D>,
    downsampler: Option<Downsample2D>,
}

impl DownBlock2D {
    /// diffusers' `DownBlock2D` from `args`, loading the weights under `vb`.
    pub fn new(vb: VarBuilder, args: &BlockArgs) -> Result<Self> {
        let mut resnets = Vec::with_capacity(args.num_layers);
        for i in 0..args.num_layers {
            let in_channels = if i == 0 { args.in_channels } else { args.out_channels };
            let config = resnet_config(args, in_channels, args.out_channels, 1.0);
            resnets.push(ResnetBlock2D::new(vb.pp("resnets").pp(i), &config)?);
        }
        let downsampler = if args.add_resample {
            let vb = vb.pp("downsamplers").pp(0);
            Some(Downsample2D::new(vb, args.out_channels, true, Some(args.out_channels), args.downsample_padding)?)
        } else {
            None
        };
        Ok(Self { resnets, downsampler })
    }

    /// Runs the block on `hidden_states` `[B, C, H, W]` with the time embedding `temb` `[B, T]`:
    /// the output and the skip states the matching up block takes.
    pub fn forward(&self, hidden_states: &Tensor, temb: Option<&Tensor>, lora_dropout: Option<&LoraDropout>) -> Result<(Tensor, Vec<Tensor>)> {
        let mut output_states = Vec::with_capacity(self.resnets.len() + 1);
        let mut hidden_states = resnets_forward(&self.resnets, hidden_states, temb, &mut output_states, lora_dropout)?;
        if let Some(downsampler) = &self.downsampler {
            hidden_states = downsampler.forward(&hidden_states, lora_dropout)?;
            output_states.push(hidden_states.clone());
        }
        Ok((hidden_states, output_states))
    }
}

/// The downsampler of an attention down block (`downsample_type`).
#[derive(Debug, Clone)]
enum Downsampler {
    Conv(Downsample2D),
    Resnet(ResnetBlock2D),
}

/// `AttnDownBlock2D`: (resnet, attention) pairs, then a convolution or resnet downsampler.
#[derive(Debug, Clone)]
pub struct AttnDownBlock2D {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Attention>,
    downsampler: Option<Downsampler>,
}

impl AttnDownBlock2D {
    /// diffusers' `AttnDownBlock2D` from `args`, loading the weights under `vb`.
    pub fn new(vb: VarBuilder, args: &BlockArgs) -> Result<Self> {
        let mut resnets = Vec::with_capacity(args.num_layers);
        let mut attentions = Vec::with_capacity(args.num_layers);
        for i in 0..args.num_layers {
            let in_channels = if i == 0 { args.in_channels } else { args.out_channels };
            let config = resnet_config(args, in_channels, args.out_channels, 1.0);
            resnets.push(ResnetBlock2D::new(vb.pp("resnets").pp(i), &config)?);
            attentions.push(block_attention(
                vb.pp("attentions").pp(i),
                args.out_channels,
                args.attention_head_dim,
                Some(args.resnet_groups),
                args.resnet_eps,
                1.0,
            )?);
        }
        let downsampler = if !args.add_resample {
            None
        } else {
            let vb = vb.pp("downsamplers").pp(0);
            Some(match args.resample_type {
                ResampleType::Conv => Downsampler::Conv(Downsample2D::new(
                    vb,
                    args.out_channels,
                    true,
                    Some(args.out_channels),
                    args.downsample_padding,
                )?),
                ResampleType::Resnet => {
                    let config = ResnetBlock2DConfig { down: true, ..resnet_config(args, args.out_channels, args.out_channels, 1.0) };
                    Downsampler::Resnet(ResnetBlock2D::new(vb, &config)?)
                }
            })
        };
        Ok(Self { resnets, attentions, downsampler })
    }

    /// Runs the block on `hidden_states` `[B, C, H, W]` with the time embedding `temb` `[B, T]`:
    /// the output and the skip states the matching up block takes.
    pub fn forward(&self, hidden_states: &Tensor, temb: Option<&Tensor>) -> Result<(Tensor, Vec<Tensor>)> {
        let mut output_states = Vec::with_capacity(self.resnets.len() + 1);
        let mut hidden_states = hidden_states.clone();
        for (resnet, attention) in self.resnets.iter().zip(&self.attentions) {
            hidden_states = resnet.forward(&hidden_states, temb, None)?;
            hidden_states = attention.forward(&hidden_states, None, None)?;
            output_states.push(hidden_states.clone());
        }
        if let Some(downsampler) = &self.downsampler {
            hidden_states = match downsampler {
                Downsampler::Conv(downsample) => downsample.forward(&hidden_states, None)?,
                Downsampler::Resnet(resnet) => resnet.forward(&hidden_states, temb, None)?,
            };
            output_states.push(hidden_states.clone());
        }
        Ok((hidden_states, output_states))
    }
}

/// `ResnetDownsampleBlock2D`: resnets, then a resnet that downsamples (BigGAN-style).
#[derive(Debug, Clone)]
pub struct ResnetDownsampleBlock2D {
    resnets: Vec<ResnetBlock2D>,
    downsampler: Option<ResnetBlock2D>,
}

impl ResnetDownsampleBlock2D {
    /// diffusers' `ResnetDownsampleBlock2D` from `args`, loading the weights under `vb`.
    pub fn new(vb: VarBuilder, args: &BlockArgs) -> Result<Self> {
        let output_scale_factor = args.resnet_out_scale_factor;
        let mut resnets = Vec::with_capacity(args.num_layers);
        for i in 0..args.num_layers {
            let in_channels = if i == 0 { args.in_channels } else { args.out_channels };
            let config = ResnetBlock2DConfig {
                skip_time_act: args.resnet_skip_time_act,
                ..resnet_config(args, in_channels, args.out_channels, output_scale_factor)
            };
            resnets.push(ResnetBlock2D::new(vb.pp("resnets").pp(i), &config)?);
        }
        let downsampler = if args.add_resample {
            let config = ResnetBlock2DConfig {
                skip_time_act: args.resnet_skip_time_act,
                down: true,
                ..resnet_config(args, args.out_channels, args.out_channels, output_scale_factor)
            };
            Some(ResnetBlock2D::new(vb.pp("downsamplers").pp(0), &config)?)
        } else {
            None
        };
        Ok(Self { resnets, downsampler })
    }

    /// Runs the block on `hidden_states` `[B, C, H, W]` with the time embedding `temb` `[B, T]`:
    /// the output and the skip states the matching up block takes.
    pub fn forward(&self, hidden_states: &Tensor, temb: Option<&Tensor>) -> Result<(Tensor, Vec<Tensor>)> {
        let mut output_states = Vec::with_capacity(self.resnets.len() + 1);
        let mut hidden_states = resnets_forward(&self.resnets, hidden_states, temb, &mut output_states, None)?;
        if let Some(downsampler) = &self.downsampler {
            hidden_states = downsampler.forward(&hidden_states, temb, None)?;
            output_states.push(hidden_states.clone());
        }
        Ok((hidden_states, output_states))
    }
}

/// `SkipDownBlock2D` and `AttnSkipDownBlock2D` (score-SDE / NCSN++): resnets (each followed
/// by attention in the `Attn` variant), then a FIR-downsampling resnet, with the image-space
/// skip sample FIR-downsampled alongside and projected in by a 1×1 convolution.
///
/// Group counts are fixed by the channel counts (`min(channels / 4, 32)`; 32 in the
/// attention), not by `norm_num_groups`, and the output is scaled by 1/√2.
#[derive(Debug, Clone)]
pub struct SkipDownBlock2D {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Attention>,
    resnet_down: Option<ResnetBlock2D>,
    downsampler: FirDownsample2D,
    skip_conv: Option<Conv2d>,
}

impl SkipDownBlock2D {
    /// diffusers' `SkipDownBlock2D` from `args`, loading the weights under `vb`. `with_attention`
    /// makes it `AttnSkipDownBlock2D`.
    pub fn new(vb: VarBuilder, args: &BlockArgs, with_attention: bool) -> Result<Self> {
        let output_scale_factor = std::f64::consts::SQRT_2;
        let out_channels = args.out_channels;
        let mut resnets = Vec::with_capacity(args.num_layers);
        let mut attentions = Vec::new();
        for i in 0..args.num_layers {
            let in_channels = if i == 0 { args.in_channels } else { out_channels };
            let config = ResnetBlock2DConfig {
                groups: (in_channels / 4).min(32),
                groups_out: Some((out_channels / 4).min(32)),
                ..resnet_config(args, in_channels, out_channels, output_scale_factor)
            };
            resnets.push(ResnetBlock2D::new(vb.pp("resnets").pp(i), &config)?);
            if with_attention {
                attentions.push(block_attention(
                    vb.pp("attentions").pp(i),
                    out_channels,
                    args.attention_head_dim,
                    Some(32),
                    args.resnet_eps,
                    output_scale_factor,
                )?);
            }
        }
        let (resnet_down, skip_conv) = if args.add_resample {
            let config = ResnetBlock2DConfig {
                groups: (out_channels / 4).min(32),
                use_in_shortcut: Some(true),
                down: true,
                kernel: ResampleKernel::Fir,
                ..resnet_config(args, out_channels, out_channels, output_scale_factor)
            };
            (
                Some(ResnetBlock2D::new(vb.pp("resnet_down"), &config)?),
                Some(Conv2d::new(vb.pp("skip_conv"), 3, out_channels, 1, 1, 0, true)?),
            )
        } else {
            (None, None)
        };
        Ok(Self { resnets, attentions, resnet_down, downsampler: FirDownsample2D, skip_conv })
    }

    /// Runs the block on `hidden_states` `[B, C, H, W]` with the time embedding `temb` `[B, T]`:
    /// the output and the skip states the matching up block takes. `skip_sample` is the
    /// image-resolution skip path, downsampled and returned.
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        temb: Option<&Tensor>,
        skip_sample: Option<Tensor>,
    ) -> Result<(Tensor, Vec<Tensor>, Option<Tensor>)> {
        let mut output_states = Vec::with_capacity(self.resnets.len() + 1);
        let mut hidden_states = hidden_states.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            hidden_states = resnet.forward(&hidden_states, temb, None)?;
            if let Some(attention) = self.attentions.get(i) {
                hidden_states = attention.forward(&hidden_states, None, None)?;
            }
            output_states.push(hidden_states.clone());
        }
        let mut skip_sample = skip_sample;
        if let (Some(resnet_down), Some(skip_conv)) = (&self.resnet_down, &self.skip_conv) {
            hidden_states = resnet_down.forward(&hidden_states, temb, None)?;
            let Some(skip) = skip_sample else {
                return Err(Error::invalid("a skip down block needs the skip sample"));
            };
            let skip = self.downsampler.forward(&skip)?;
            hidden_states = (skip_conv.forward(&skip)? + hidden_states)?;
            skip_sample = Some(skip);
            output_states.push(hidden_states.clone());
        }
        Ok((hidden_states, output_states, skip_sample))
    }
}

/// Concatenates the next skip connection (taken from the end) onto `hidden_states` along
/// the channels, for each resnet of an up block in turn.
fn up_resnets_forward(
    resnets: &[ResnetBlock2D],
    hidden_states: &Tensor,
    res_hidden_states: &[Tensor],
    temb: Option<&Tensor>,
    lora_dropout: Option<&LoraDropout>,
    mut after_each: impl FnMut(usize, Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    if res_hidden_states.len() < resnets.len() {
        return Err(Error::invalid(format!(
            "an up block with {} resnets got {} skip connections",
            resnets.len(),
            res_hidden_states.len()
        )));
    }
    let mut hidden_states = hidden_states.clone();
    for (i, resnet) in resnets.iter().enumerate() {
        let res = &res_hidden_states[res_hidden_states.len() - 1 - i];
        hidden_states = Tensor::cat(&[&hidden_states, res], 1)?;
        hidden_states = resnet.forward(&hidden_states, temb, lora_dropout)?;
        hidden_states = after_each(i, hidden_states)?;
    }
    Ok(hidden_states)
}

/// The input widths of an up block's resnets: the first takes the block below's output,
/// the last takes the down block's input-side skip connection.
fn up_resnet_in_channels(args: &BlockArgs, i: usize) -> (usize, usize) {
    let res_skip_channels = if i == args.num_layers - 1 { args.in_channels } else { args.out_channels };
    let resnet_in_channels = if i == 0 { args.prev_output_channel } else { args.out_channels };
    (resnet_in_channels, res_skip_channels)
}

/// `UpBlock2D`: resnets over concatenated skip connections, then nearest ×2 and a 3×3
/// convolution.
#[derive(Debug, Clone)]
pub struct UpBlock2D {
    resnets: Vec<ResnetBlock2D>,
    upsampler: Option<Upsample2D>,
}

impl UpBlock2D {
    /// diffusers' `UpBlock2D` from `args`, loading the weights under `vb`.
    pub fn new(vb: VarBuilder, args: &BlockArgs) -> Result<Self> {
        let mut resnets = Vec::with_capacity(args.num_layers);
        for i in 0..args.num_layers {
            let (resnet_in, res_skip) = up_resnet_in_channels(args, i);
            let config = resnet_config(args, resnet_in + res_skip, args.out_channels, 1.0);
            resnets.push(ResnetBlock2D::new(vb.pp("resnets").pp(i), &config)?);
        }
        let upsampler = if args.add_resample {
            Some(Upsample2D::new(vb.pp("upsamplers").pp(0), args.out_channels, true, Some(args.out_channels))?)
        } else {
            None
        };
        Ok(Self { resnets, upsampler })
    }

    /// `upsample_size` forces the upsampled (height, width).
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        res_hidden_states: &[Tensor],
        temb: Option<&Tensor>,
        upsample_size: Option<(usize, usize)>,
        lora_dropout: Option<&LoraDropout>,
    ) -> Result<Tensor> {
        let hidden_states = up_resnets_forward(&self.resnets, hidden_states, res_hidden_states, temb, lora_dropout, |_, h| Ok(h))?;
        match &self.upsampler {
            Some(upsampler) => upsampler.forward(&hidden_states, upsample_size, lora_dropout),
            None => Ok(hidden_states),
        }
    }
}

/// The upsampler of an attention up block (`upsample_type`).
#[derive(Debug, Clone)]
enum Upsampler {
    Conv(Upsample2D),
    Resnet(ResnetBlock2D),
}

/// `AttnUpBlock2D`: (resnet, attention) pairs over concatenated skip connections, then a
/// convolution or resnet upsampler.
#[derive(Debug, Clone)]
pub struct AttnUpBlock2D {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Attention>,
    upsampler: Option<Upsampler>,
}

impl AttnUpBlock2D {
    /// diffusers' `AttnUpBlock2D` from `args`, loading the weights under `vb`.
    pub fn new(vb: VarBuilder, args: &BlockArgs) -> Result<Self> {
        let mut resnets = Vec::with_capacity(args.num_layers);
        let mut attentions = Vec::with_capacity(args.num_layers);
        for i in 0..args.num_layers {
            let (resnet_in, res_skip) = up_resnet_in_channels(args, i);
            let config = resnet_config(args, resnet_in + res_skip, args.out_channels, 1.0);
            resnets.push(ResnetBlock2D::new(vb.pp("resnets").pp(i), &config)?);
            attentions.push(block_attention(
                vb.pp("attentions").pp(i),
                args.out_channels,
                args.attention_head_dim,
                Some(args.resnet_groups),
                args.resnet_eps,
                1.0,
            )?);
        }
        let upsampler = if !args.add_resample {
            None
        } else {
            let vb = vb.pp("upsamplers").pp(0);
            Some(match args.resample_type {
                ResampleType::Conv => Upsampler::Conv(Upsample2D::new(vb, args.out_channels, true, Some(args.out_channels))?),
                ResampleType::Resnet => {
                    let config = ResnetBlock2DConfig { up: true, ..resnet_config(args, args.out_channels, args.out_channels, 1.0) };
                    Upsampler::Resnet(ResnetBlock2D::new(vb, &config)?)
                }
            })
        };
        Ok(Self { resnets, attentions, upsampler })
    }

    /// Runs the block on `hidden_states` `[B, C, H, W]`, concatenating the down blocks' skip states
    /// `res_hidden_states` (last first) before each resnet.
    pub fn forward(&self, hidden_states: &Tensor, res_hidden_states: &[Tensor], temb: Option<&Tensor>) -> Result<Tensor> {
        let hidden_states = up_resnets_forward(&self.resnets, hidden_states, res_hidden_states, temb, None, |i, h| {
            self.attentions[i].forward(&h, None, None)
        })?;
        match &self.upsampler {
            Some(Upsampler::Conv(upsample)) => upsample.forward(&hidden_states, None, None),
            Some(Upsampler::Resnet(resnet)) => resnet.forward(&hidden_states, temb, None),
            None => Ok(hidden_states),
        }
    }
}

/// `ResnetUpsampleBlock2D`: resnets over concatenated skip connections, then a resnet that
/// upsamples (BigGAN-style).
#[derive(Debug, Clone)]
pub struct ResnetUpsampleBlock2D {
    resnets: Vec<ResnetBlock2D>,
    upsampler: Option<ResnetBlock2D>,
}

impl ResnetUpsampleBlock2D {
    /// diffusers' `ResnetUpsampleBlock2D` from `args`, loading the weights under `vb`.
    pub fn new(vb: VarBuilder, args: &BlockArgs) -> Result<Self> {
        let output_scale_factor = args.resnet_out_scale_factor;
        let mut resnets = Vec::with_capacity(args.num_layers);
        for i in 0..args.num_layers {
            let (resnet_in, res_skip) = up_resnet_in_channels(args, i);
            let config = ResnetBlock2DConfig {
                skip_time_act: args.resnet_skip_time_act,
                ..resnet_config(args, resnet_in + res_skip, args.out_channels, output_scale_factor)
            };
            resnets.push(ResnetBlock2D::new(vb.pp("resnets").pp(i), &config)?);
        }
        let upsampler = if args.add_resample {
            let config = ResnetBlock2DConfig {
                skip_time_act: args.resnet_skip_time_act,
                up: true,
                ..resnet_config(args, args.out_channels, args.out_channels, output_scale_factor)
            };
            Some(ResnetBlock2D::new(vb.pp("upsamplers").pp(0), &config)?)
        } else {
            None
        };
        Ok(Self { resnets, upsampler })
    }

    /// Runs the block on `hidden_states` `[B, C, H, W]`, concatenating the down blocks' skip states
    /// `res_hidden_states` (last first) before each resnet.
    pub fn forward(&self, hidden_states: &Tensor, res_hidden_states: &[Tensor], temb: Option<&Tensor>) -> Result<Tensor> {
        let hidden_states = up_resnets_forward(&self.resnets, hidden_states, res_hidden_states, temb, None, |_, h| Ok(h))?;
        match &self.upsampler {
            Some(upsampler) => upsampler.forward(&hidden_states, temb, None),
            None => Ok(hidden_states),
        }
    }
}

/// `SkipUpBlock2D` and `AttnSkipUpBlock2D` (score-SDE / NCSN++): resnets over concatenated
/// skip connections (then one attention in the `Attn` variant); the image-space skip sample
/// is FIR-upsampled and gains a projection of the hidden states (group norm, SiLU, 3×3 conv
/// to 3 channels); then a FIR-upsampling resnet.
#[derive(Debug, Clone)]
pub struct SkipUpBlock2D {
    resnets: Vec<ResnetBlock2D>,
    attention: Option<Attention>,
    upsampler: FirUpsample2D,
    resnet_up: Option<ResnetBlock2D>,
    skip_norm: Option<GroupNorm>,
    skip_conv: Option<Conv2d>,
}

impl SkipUpBlock2D {
    /// diffusers' `SkipUpBlock2D` from `args`, loading the weights under `vb`. `with_attention`
    /// makes it `AttnSkipUpBlock2D`.
    pub fn new(vb: VarBuilder, args: &BlockArgs, with_attention: bool) -> Result<Self> {
        let output_scale_factor = std::f64::consts::SQRT_2;
        let out_channels = args.out_channels;
        let groups_out = (out_channels / 4).min(32);
        let mut resnets = Vec::with_capacity(args.num_layers);
        for i in 0..args.num_layers {
            let (resnet_in, res_skip) = up_resnet_in_channels(args, i);
            // AttnSkipUpBlock2D computes `min(resnet_in_channels + res_skip_channels // 4, 32)`
            // (the division binds first); we reproduce that so its checkpoints load.
            let groups = if with_attention { (resnet_in + res_skip / 4).min(32) } else { ((resnet_in + res_skip) / 4).min(32) };
            let config = ResnetBlock2DConfig {
                groups,
                groups_out: Some(groups_out),
                ..resnet_config(args, resnet_in + res_skip, out_channels, output_scale_factor)
            };
            resnets.push(ResnetBlock2D::new(vb.pp("resnets").pp(i), &config)?);
        }
        let attention = if with_attention {
            Some(block_attention(
                vb.pp("attentions").pp(0),
                out_channels,
                args.attention_head_dim,
                Some(32),
                args.resnet_eps,
                output_scale_factor,
            )?)
        } else {
            None
        };
        let (resnet_up, skip_norm, skip_conv) = if args.add_resample {
            let config = ResnetBlock2DConfig {
                groups: groups_out,
                groups_out: Some(groups_out),
                use_in_shortcut: Some(true),
                up: true,
                kernel: ResampleKernel::Fir,
                ..resnet_config(args, out_channels, out_channels, output_scale_factor)
            };
            (
                Some(ResnetBlock2D::new(vb.pp("resnet_up"), &config)?),
                Some(GroupNorm::new(vb.pp("skip_norm"), groups_out, out_channels, args.resnet_eps)?),
                Some(Conv2d::new(vb.pp("skip_conv"), out_channels, 3, 3, 1, 1, true)?),
            )
        } else {
            (None, None, None)
        };
        Ok(Self { resnets, attention, upsampler: FirUpsample2D, resnet_up, skip_norm, skip_conv })
    }

    /// Runs the block on `hidden_states` `[B, C, H, W]`, concatenating the down blocks' skip states
    /// `res_hidden_states` (last first) before each resnet. `skip_sample` is the image-resolution
    /// skip path, upsampled and returned with this block's contribution added.
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        res_hidden_states: &[Tensor],
        temb: Option<&Tensor>,
        skip_sample: Option<Tensor>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let mut hidden_states = up_resnets_forward(&self.resnets, hidden_states, res_hidden_states, temb, None, |_, h| Ok(h))?;
        if let Some(attention) = &self.attention {
            hidden_states = attention.forward(&hidden_states, None, None)?;
        }
        // diffusers starts from 0 when there is no skip sample yet; `None` stands for that 0.
        let mut skip_sample = match skip_sample {
            Some(skip) => Some(self.upsampler.forward(&skip)?),
            None => None,
        };
        if let (Some(resnet_up), Some(skip_norm), Some(skip_conv)) = (&self.resnet_up, &self.skip_norm, &self.skip_conv) {
            let states = skip_conv.forward(&ops::silu(&skip_norm.forward(&hidden_states)?)?)?;
            skip_sample = Some(match skip_sample {
                Some(skip) => (skip + states)?,
                None => states,
            });
            hidden_states = resnet_up.forward(&hidden_states, temb, None)?;
        }
        Ok((hidden_states, skip_sample))
    }
}

/// The transformer settings of the cross-attention blocks, as `UNet2DConditionModel` passes
/// them to `get_down_block`, `get_mid_block` and `get_up_block`.
#[derive(Debug, Clone)]
pub struct CrossAttnArgs {
    /// `BasicTransformerBlock`s in each `Transformer2DModel`.
    pub transformer_layers_per_block: usize,
    /// Heads per attention; each head has `out_channels / num_attention_heads` channels.
    pub num_attention_heads: usize,
    /// The width of the context (text embeddings).
    pub cross_attention_dim: usize,
    /// Linear layers instead of 1×1 convolutions around the transformers (SD 2.x).
    pub use_linear_projection: bool,
    /// The transformers' first attention attends to the context only.
    pub only_cross_attention: bool,
    /// Compute attention scores in f32.
    pub upcast_attention: bool,
}

/// The `Transformer2DModel` after each resnet of a cross-attention block.
fn block_transformer(
    vb: VarBuilder,
    channels: usize,
    norm_num_groups: usize,
    cross: &CrossAttnArgs,
    only_cross_attention: bool,
) -> Result<Transformer2DModel> {
    if cross.num_attention_heads == 0 {
        return Err(Error::invalid(format!("{}: the number of attention heads must not be 0", vb.prefix())));
    }
    let config = Transformer2DModelConfig {
        num_layers: cross.transformer_layers_per_block,
        cross_attention_dim: Some(cross.cross_attention_dim),
        norm_num_groups,
        use_linear_projection: cross.use_linear_projection,
        only_cross_attention,
        upcast_attention: cross.upcast_attention,
        ..Transformer2DModelConfig::new(cross.num_attention_heads, channels / cross.num_attention_heads, channels)
    };
    Transformer2DModel::new(vb, &config)
}

/// `CrossAttnDownBlock2D`: (resnet, transformer) pairs, then a strided-convolution
/// downsampler.
#[derive(Debug, Clone)]
pub struct CrossAttnDownBlock2D {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    downsampler: Option<Downsample2D>,
}

impl CrossAttnDownBlock2D {
    /// diffusers' `CrossAttnDownBlock2D` from `args`, loading the weights under `vb`.
    pub fn new(vb: VarBuilder, args: &BlockArgs, cross: &CrossAttnArgs) -> Result<Self> {
        let mut resnets = Vec::with_capacity(args.num_layers);
        let mut attentions = Vec::with_capacity(args.num_layers);
        for i in 0..args.num_layers {
            let in_channels = if i == 0 { args.in_channels } else { args.out_channels };
            let config = resnet_config(args, in_channels, args.out_channels, 1.0);
            resnets.push(ResnetBlock2D::new(vb.pp("resnets").pp(i), &config)?);
            attentions.push(block_transformer(
                vb.pp("attentions").pp(i),
                args.out_channels,
                args.resnet_groups,
                cross,
                cross.only_cross_attention,
            )?);
        }
        let downsampler = if args.add_resample {
            let vb = vb.pp("downsamplers").pp(0);
            Some(Downsample2D::new(vb, args.out_channels, true, Some(args.out_channels), args.downsample_padding)?)
        } else {
            None
        };
        Ok(Self { resnets, attentions, downsampler })
    }

    /// Returns the new hidden states and the states the up path takes as skip connections.
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        temb: Option<&Tensor>,
        encoder_hidden_states: Option<&Tensor>,
        lora_dropout: Option<&LoraDropout>,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut output_states = Vec::with_capacity(self.resnets.len() + 1);
        let mut hidden_states = hidden_states.clone();
        for (resnet, attention) in self.resnets.iter().zip(&self.attentions) {
            hidden_states = resnet.forward(&hidden_states, temb, lora_dropout)?;
            hidden_states = attention.forward(&hidden_states, encoder_hidden_states, lora_dropout)?;
            output_states.push(hidden_states.clone());
        }
        if let Some(downsampler) = &self.downsampler {
            hidden_states = downsampler.forward(&hidden_states, lora_dropout)?;
            output_states.push(hidden_states.clone());
        }
        Ok((hidden_states, output_states))
    }
}

/// `UNetMidBlock2DCrossAttn`: resnet, then (transformer, resnet) `num_layers` times.
///
/// As in diffusers, the mid block's transformers never use `only_cross_attention`; the
/// attention fields of [`MidBlockArgs`] are not used (the heads come from `cross`).
#[derive(Debug, Clone)]
pub struct UNetMidBlock2DCrossAttn {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
}

impl UNetMidBlock2DCrossAttn {
    /// diffusers' `UNetMidBlock2DCrossAttn` from `args`, loading the weights under `vb`.
    pub fn new(vb: VarBuilder, args: &MidBlockArgs, cross: &CrossAttnArgs) -> Result<Self> {
        let channels = args.in_channels;
        let resnet_groups = args.resnet_groups.unwrap_or_else(|| (channels / 4).min(32));
        let resnet_config = ResnetBlock2DConfig {
            temb_channels: args.temb_channels,
            groups: resnet_groups,
            eps: args.resnet_eps,
            non_linearity: args.resnet_act_fn,
            time_embedding_norm: args.resnet_time_scale_shift,
            output_scale_factor: args.output_scale_factor,
            ..ResnetBlock2DConfig::new(channels, channels)
        };
        let mut resnets = vec![ResnetBlock2D::new(vb.pp("resnets").pp(0), &resnet_config)?];
        let mut attentions = Vec::with_capacity(args.num_layers);
        for i in 0..args.num_layers {
            attentions.push(block_transformer(vb.pp("attentions").pp(i), channels, resnet_groups, cross, false)?);
            resnets.push(ResnetBlock2D::new(vb.pp("resnets").pp(i + 1), &resnet_config)?);
        }
        Ok(Self { resnets, attentions })
    }

    /// Runs the block on `hidden_states` `[B, C, H, W]` with the time embedding `temb` and the
    /// context `encoder_hidden_states` `[B, N, cross_attention_dim]`; the shape is kept.
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        temb: Option<&Tensor>,
        encoder_hidden_states: Option<&Tensor>,
        lora_dropout: Option<&LoraDropout>,
    ) -> Result<Tensor> {
        let mut hidden_states = self.resnets[0].forward(hidden_states, temb, lora_dropout)?;
        for (attention, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            hidden_states = attention.forward(&hidden_states, encoder_hidden_states, lora_dropout)?;
            hidden_states = resnet.forward(&hidden_states, temb, lora_dropout)?;
        }
        Ok(hidden_states)
    }
}

impl UpBlock2D {
    /// How many skip connections the block consumes (one per resnet).
    pub fn num_resnets(&self) -> usize {
        self.resnets.len()
    }
}

/// `CrossAttnUpBlock2D`: (resnet, transformer) pairs over concatenated skip connections,
/// then nearest upsampling (×2, or to a given size) and a 3×3 convolution.
#[derive(Debug, Clone)]
pub struct CrossAttnUpBlock2D {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    upsampler: Option<Upsample2D>,
}

impl CrossAttnUpBlock2D {
    /// diffusers' `CrossAttnUpBlock2D` from `args`, loading the weights under `vb`.
    pub fn new(vb: VarBuilder, args: &BlockArgs, cross: &CrossAttnArgs) -> Result<Self> {
        let mut resnets = Vec::with_capacity(args.num_layers);
        let mut attentions = Vec::with_capacity(args.num_layers);
        for i in 0..args.num_layers {
            let (resnet_in, res_skip) = up_resnet_in_channels(args, i);
            let config = resnet_config(args, resnet_in + res_skip, args.out_channels, 1.0);
            resnets.push(ResnetBlock2D::new(vb.pp("resnets").pp(i), &config)?);
            attentions.push(block_transformer(
                vb.pp("attentions").pp(i),
                args.out_channels,
                args.resnet_groups,
                cross,
                cross.only_cross_attention,
            )?);
        }
        let upsampler = if args.add_resample {
            Some(Upsample2D::new(vb.pp("upsamplers").pp(0), args.out_channels, true, Some(args.out_channels))?)
        } else {
            None
        };
        Ok(Self { resnets, attentions, upsampler })
    }

    /// How many skip connections the block consumes (one per resnet).
    pub fn num_resnets(&self) -> usize {
        self.resnets.len()
    }

    /// `res_hidden_states` are the skip connections, consumed from the last;
    /// `upsample_size` forces the upsampled (height, width).
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        res_hidden_states: &[Tensor],
        temb: Option<&Tensor>,
        encoder_hidden_states: Option<&Tensor>,
        upsample_size: Option<(usize, usize)>,
        lora_dropout: Option<&LoraDropout>,
    ) -> Result<Tensor> {
        let hidden_states = up_resnets_forward(&self.resnets, hidden_states, res_hidden_states, temb, lora_dropout, |i, h| {
            self.attentions[i].forward(&h, encoder_hidden_states, lora_dropout)
        })?;
        match &self.upsampler {
            Some(upsampler) => upsampler.forward(&hidden_states, upsample_size, lora_dropout),
            None => Ok(hidden_states),
        }
    }
}
