//! The encoder, decoder and latent distribution of the KL autoencoder; port of
//! diffusers/models/autoencoders/vae.py (`Encoder`, `Decoder`, `DiagonalGaussianDistribution`)
//! and of the two blocks they are built from, `DownEncoderBlock2D` and `UpDecoderBlock2D`
//! (diffusers/models/unets/unet_2d_blocks.py).

use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::resnet::{Downsample2D, ResnetBlock2D, ResnetBlock2DConfig, TimeEmbeddingNorm, Upsample2D};
use super::unet_2d_blocks::{MidBlockArgs, UNetMidBlock2D};
use super::{Activation, Conv2d, GroupNorm};
use crate::rng::TorchGenerator;
use crate::{bail, Error, Result};

/// The normalisation epsilon diffusers hard-codes throughout the encoder and decoder.
const EPS: f64 = 1e-6;

/// The down block types [`Encoder`] builds.
pub const SUPPORTED_ENCODER_BLOCKS: &[&str] = &["DownEncoderBlock2D"];

/// The up block types [`Decoder`] builds.
pub const SUPPORTED_DECODER_BLOCKS: &[&str] = &["UpDecoderBlock2D"];

/// The arguments `get_down_block` / `get_up_block` pass to the autoencoder blocks.
#[derive(Debug, Clone)]
struct BlockArgs {
    num_layers: usize,
    in_channels: usize,
    out_channels: usize,
    /// `add_downsample` / `add_upsample`.
    add_resample: bool,
    resnet_act_fn: Activation,
    resnet_groups: usize,
}

/// The resnets of the autoencoder blocks: no time embedding.
fn block_resnets(vb: VarBuilder, args: &BlockArgs) -> Result<Vec<ResnetBlock2D>> {
    (0..args.num_layers)
        .map(|i| {
            let in_channels = if i == 0 { args.in_channels } else { args.out_channels };
            let config = ResnetBlock2DConfig {
                temb_channels: None,
                groups: args.resnet_groups,
                eps: EPS,
                non_linearity: args.resnet_act_fn,
                ..ResnetBlock2DConfig::new(in_channels, args.out_channels)
            };
            ResnetBlock2D::new(vb.pp("resnets").pp(i), &config)
        })
        .collect()
}

/// `DownEncoderBlock2D`: resnets, then a stride-2 convolution with the input padded on the
/// right and bottom only (`downsample_padding=0`, as the encoder asks).
#[derive(Debug, Clone)]
pub struct DownEncoderBlock2D {
    resnets: Vec<ResnetBlock2D>,
    downsampler: Option<Downsample2D>,
}

impl DownEncoderBlock2D {
    fn new(vb: VarBuilder, args: &BlockArgs) -> Result<Self> {
        let resnets = block_resnets(vb.clone(), args)?;
        let downsampler = if args.add_resample {
            let vb = vb.pp("downsamplers").pp(0);
            Some(Downsample2D::new(vb, args.out_channels, true, Some(args.out_channels), 0)?)
        } else {
            None
        };
        Ok(Self { resnets, downsampler })
    }

    /// Takes the input by value so that it is freed as soon as the first resnet is done
    /// with it (at 512×512 each activation is hundreds of MB).
    pub fn forward(&self, mut hidden_states: Tensor) -> Result<Tensor> {
        for resnet in &self.resnets {
            hidden_states = resnet.forward(&hidden_states, None, None)?;
        }
        match &self.downsampler {
            Some(downsampler) => downsampler.forward(&hidden_states, None),
            None => Ok(hidden_states),
        }
    }
}

/// `UpDecoderBlock2D`: resnets, then nearest ×2 and a 3×3 convolution.
#[derive(Debug, Clone)]
pub struct UpDecoderBlock2D {
    resnets: Vec<ResnetBlock2D>,
    upsampler: Option<Upsample2D>,
}

impl UpDecoderBlock2D {
    fn new(vb: VarBuilder, args: &BlockArgs) -> Result<Self> {
        let resnets = block_resnets(vb.clone(), args)?;
        let upsampler = if args.add_resample {
            Some(Upsample2D::new(vb.pp("upsamplers").pp(0), args.out_channels, true, Some(args.out_channels))?)
        } else {
            None
        };
        Ok(Self { resnets, upsampler })
    }

    /// Takes the input by value so that it is freed as soon as the first resnet is done
    /// with it (at 512×512 each activation is hundreds of MB).
    pub fn forward(&self, mut hidden_states: Tensor) -> Result<Tensor> {
        for resnet in &self.resnets {
            hidden_states = resnet.forward(&hidden_states, None, None)?;
        }
        match &self.upsampler {
            Some(upsampler) => upsampler.forward(&hidden_states, None, None),
            None => Ok(hidden_states),
        }
    }
}

/// The mid block of both halves: resnet, self-attention over all positions (one head over
/// all channels, group norm, residual), resnet; no time embedding.
fn mid_block(vb: VarBuilder, channels: usize, act_fn: Activation, norm_num_groups: usize, add_attention: bool) -> Result<UNetMidBlock2D> {
    UNetMidBlock2D::new(
        vb,
        &MidBlockArgs {
            in_channels: channels,
            temb_channels: None,
            num_layers: 1,
            resnet_eps: EPS,
            resnet_time_scale_shift: TimeEmbeddingNorm::Default,
            resnet_act_fn: act_fn,
            resnet_groups: Some(norm_num_groups),
            attn_groups: None,
            add_attention,
            attention_head_dim: Some(channels),
            output_scale_factor: 1.0,
        },
    )
}

/// Checks that there is one block type per entry of `block_out_channels` (both non-empty)
/// and returns the last width.
fn check_blocks(types_key: &str, block_types: &[String], block_out_channels: &[usize]) -> Result<usize> {
    let Some(&last) = block_out_channels.last() else {
        bail!("key `block_out_channels`: must not be empty");
    };
    if block_types.len() != block_out_channels.len() {
        bail!(
            "key `{types_key}`: must have one entry per entry of `block_out_channels` ({block_types:?} vs {block_out_channels:?})"
        );
    }
    Ok(last)
}

/// `Encoder`'s arguments.
#[derive(Debug, Clone)]
pub struct EncoderConfig {
    /// Image channels.
    pub in_channels: usize,
    /// Latent channels; the convolution produces twice as many with `double_z` (mean and
    /// log-variance).
    pub out_channels: usize,
    /// The down blocks' class names, one per resolution level.
    pub down_block_types: Vec<String>,
    /// Channels of each resolution level.
    pub block_out_channels: Vec<usize>,
    /// Resnets per down block (up blocks have one more).
    pub layers_per_block: usize,
    /// Groups of the group norms.
    pub norm_num_groups: usize,
    /// The activation (diffusers' `get_activation` name).
    pub act_fn: Activation,
    /// Output mean and log-variance (twice `out_channels`).
    pub double_z: bool,
    /// Whether the mid block has its attention layer.
    pub mid_block_add_attention: bool,
}

/// `Encoder`: `conv_in`, down blocks (all but the last halving the resolution), the mid
/// block, then group norm, SiLU and `conv_out`.
#[derive(Debug, Clone)]
pub struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<DownEncoderBlock2D>,
    mid_block: UNetMidBlock2D,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    /// Errors about the configuration name the key at fault (`down_block_types[1]`, ...).
    pub fn new(vb: VarBuilder, config: &EncoderConfig) -> Result<Self> {
        let block_out_channels = &config.block_out_channels;
        let last_channels = check_blocks("down_block_types", &config.down_block_types, block_out_channels)?;
        let conv_in = Conv2d::new(vb.pp("conv_in"), config.in_channels, block_out_channels[0], 3, 1, 1, true)?;

        let mut down_blocks = Vec::with_capacity(block_out_channels.len());
        let mut output_channel = block_out_channels[0];
        for (i, block_type) in config.down_block_types.iter().enumerate() {
            let input_channel = output_channel;
            output_channel = block_out_channels[i];
            if block_type != "DownEncoderBlock2D" {
                bail!(
                    "key `down_block_types[{i}]`: block type `{block_type}` is not supported by the autoencoder's encoder (supported: {})",
                    SUPPORTED_ENCODER_BLOCKS.join(", ")
                );
            }
            let args = BlockArgs {
                num_layers: config.layers_per_block,
                in_channels: input_channel,
                out_channels: output_channel,
                add_resample: i != block_out_channels.len() - 1,
                resnet_act_fn: config.act_fn,
                resnet_groups: config.norm_num_groups,
            };
            down_blocks.push(DownEncoderBlock2D::new(vb.pp("down_blocks").pp(i), &args)?);
        }

        let mid_block = mid_block(
            vb.pp("mid_block"),
            last_channels,
            config.act_fn,
            config.norm_num_groups,
            config.mid_block_add_attention,
        )?;
        let conv_norm_out = GroupNorm::new(vb.pp("conv_norm_out"), config.norm_num_groups, last_channels, EPS)?;
        let conv_out_channels = if config.double_z { 2 * config.out_channels } else { config.out_channels };
        let conv_out = Conv2d::new(vb.pp("conv_out"), last_channels, conv_out_channels, 3, 1, 1, true)?;
        Ok(Self { conv_in, down_blocks, mid_block, conv_norm_out, conv_out })
    }

    /// `[B, in_channels, H, W]` images to `[B, (2×) out_channels, H / f, W / f]`.
    pub fn forward(&self, sample: &Tensor) -> Result<Tensor> {
        let mut sample = self.conv_in.forward(sample)?;
        for down_block in &self.down_blocks {
            sample = down_block.forward(sample)?;
        }
        sample = self.mid_block.forward(&sample, None, None)?;
        // The final activation is always SiLU, whatever `act_fn` the resnets use.
        sample = self.conv_norm_out.forward_then(&sample, Activation::Silu)?;
        self.conv_out.forward(&sample)
    }
}

/// `Decoder`'s arguments (group normalisation only; `norm_type="spatial"` is not
/// supported).
#[derive(Debug, Clone)]
pub struct DecoderConfig {
    /// Latent channels.
    pub in_channels: usize,
    /// Image channels.
    pub out_channels: usize,
    /// The up blocks' class names, one per resolution level.
    pub up_block_types: Vec<String>,
    /// Channels of each resolution level.
    pub block_out_channels: Vec<usize>,
    /// Each up block has one resnet more than this.
    pub layers_per_block: usize,
    /// Groups of the group norms.
    pub norm_num_groups: usize,
    /// The activation (diffusers' `get_activation` name).
    pub act_fn: Activation,
    /// Whether the mid block has its attention layer.
    pub mid_block_add_attention: bool,
}

/// `Decoder`: `conv_in`, the mid block, up blocks in reversed channel order (all but the
/// last doubling the resolution), then group norm, SiLU and `conv_out`.
#[derive(Debug, Clone)]
pub struct Decoder {
    conv_in: Conv2d,
    mid_block: UNetMidBlock2D,
    up_blocks: Vec<UpDecoderBlock2D>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    /// Errors about the configuration name the key at fault (`up_block_types[0]`, ...).
    pub fn new(vb: VarBuilder, config: &DecoderConfig) -> Result<Self> {
        let block_out_channels = &config.block_out_channels;
        let last_channels = check_blocks("up_block_types", &config.up_block_types, block_out_channels)?;
        let conv_in = Conv2d::new(vb.pp("conv_in"), config.in_channels, last_channels, 3, 1, 1, true)?;
        let mid_block = mid_block(
            vb.pp("mid_block"),
            last_channels,
            config.act_fn,
            config.norm_num_groups,
            config.mid_block_add_attention,
        )?;

        let reversed: Vec<usize> = block_out_channels.iter().rev().copied().collect();
        let mut up_blocks = Vec::with_capacity(reversed.len());
        let mut output_channel = reversed[0];
        for (i, block_type) in config.up_block_types.iter().enumerate() {
            let prev_output_channel = output_channel;
            output_channel = reversed[i];
            if block_type != "UpDecoderBlock2D" {
                bail!(
                    "key `up_block_types[{i}]`: block type `{block_type}` is not supported by the autoencoder's decoder (supported: {})",
                    SUPPORTED_DECODER_BLOCKS.join(", ")
                );
            }
            let args = BlockArgs {
                num_layers: config.layers_per_block + 1,
                in_channels: prev_output_channel,
                out_channels: output_channel,
                add_resample: i != block_out_channels.len() - 1,
                resnet_act_fn: config.act_fn,
                resnet_groups: config.norm_num_groups,
            };
            up_blocks.push(UpDecoderBlock2D::new(vb.pp("up_blocks").pp(i), &args)?);
        }

        let first_channels = block_out_channels[0];
        let conv_norm_out = GroupNorm::new(vb.pp("conv_norm_out"), config.norm_num_groups, first_channels, EPS)?;
        let conv_out = Conv2d::new(vb.pp("conv_out"), first_channels, config.out_channels, 3, 1, 1, true)?;
        Ok(Self { conv_in, mid_block, up_blocks, conv_norm_out, conv_out })
    }

    /// `[B, in_channels, h, w]` latents to `[B, out_channels, h × f, w × f]` images.
    pub fn forward(&self, sample: &Tensor) -> Result<Tensor> {
        let mut sample = self.conv_in.forward(sample)?;
        sample = self.mid_block.forward(&sample, None, None)?;
        for up_block in &self.up_blocks {
            sample = up_block.forward(sample)?;
        }
        sample = self.conv_norm_out.forward_then(&sample, Activation::Silu)?;
        self.conv_out.forward(&sample)
    }
}

/// `DiagonalGaussianDistribution`: the posterior the encoder predicts, a normal
/// distribution per latent element with the mean and log-variance taken from the two halves
/// of the channels.
#[derive(Debug, Clone)]
pub struct DiagonalGaussianDistribution {
    mean: Tensor,
    /// Clamped to [-30, 20].
    logvar: Tensor,
    std: Tensor,
}

impl DiagonalGaussianDistribution {
    /// `parameters` is `[B, 2C, h, w]`: the means, then the log-variances.
    pub fn new(parameters: &Tensor) -> Result<Self> {
        let channels = parameters.dim(1)?;
        if !channels.is_multiple_of(2) {
            return Err(Error::invalid(format!(
                "a diagonal Gaussian needs an even number of parameter channels (means and log-variances), got {channels}"
            )));
        }
        let mean = parameters.narrow(1, 0, channels / 2)?.contiguous()?;
        let logvar = parameters.narrow(1, channels / 2, channels / 2)?.clamp(-30f32, 20f32)?;
        let std = (&logvar * 0.5)?.exp()?;
        Ok(Self { mean, logvar, std })
    }

    /// The mean `[B, C, h, w]`: the latents diffusers' `latent_dist.mode()` gives.
    pub fn mean(&self) -> &Tensor {
        &self.mean
    }

    /// The log-variance, clamped to [-30, 20].
    pub fn logvar(&self) -> &Tensor {
        &self.logvar
    }

    /// `exp(logvar / 2)`.
    pub fn std(&self) -> &Tensor {
        &self.std
    }

    /// `mean + std * noise`, with the noise drawn as diffusers' `randn_tensor(mean.shape,
    /// generator)` draws it (bit for bit for f32 models; other types get the f32 draw
    /// converted).
    pub fn sample(&self, generator: &mut TorchGenerator) -> Result<Tensor> {
        let noise = generator.randn_tensor(self.mean.dims(), self.mean.device())?.to_dtype(self.mean.dtype())?;
        Ok((&self.mean + (&self.std * noise)?)?)
    }

    /// The most likely latent: the mean.
    pub fn mode(&self) -> Tensor {
        self.mean.clone()
    }
}
