//! `AutoencoderTiny` (TAESD), a small distilled autoencoder with Stable Diffusion's latent
//! interface; port of diffusers/models/autoencoders/autoencoder_tiny.py with its `EncoderTiny`
//! and `DecoderTiny` (diffusers/models/autoencoders/vae.py) and `AutoencoderTinyBlock`
//! (diffusers/models/unets/unet_2d_blocks.py).

use candle_core::Tensor;
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::{Activation, Conv2d};
use crate::{bail, ops, Error, Result};

/// The arguments of `AutoencoderTiny.__init__`, as `config.json` stores them, with its
/// defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct AutoencoderTinyConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub encoder_block_out_channels: Vec<usize>,
    pub decoder_block_out_channels: Vec<usize>,
    pub act_fn: String,
    pub upsample_fn: String,
    pub latent_channels: usize,
    pub upsampling_scaling_factor: usize,
    pub num_encoder_blocks: Vec<usize>,
    pub num_decoder_blocks: Vec<usize>,
    /// `scale_latents` / `unscale_latents` (latents ↔ [0, 1] bytes); no pipeline uses them.
    pub latent_magnitude: f64,
    pub latent_shift: f64,
    pub force_upcast: bool,
    /// 1: TAESD's latents are already the denoiser's (the KL VAE's × 0.18215).
    pub scaling_factor: f64,
    /// Stored in the config but never applied by the Stable Diffusion pipelines.
    pub shift_factor: f64,
}

impl Default for AutoencoderTinyConfig {
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            encoder_block_out_channels: vec![64; 4],
            decoder_block_out_channels: vec![64; 4],
            act_fn: "relu".to_string(),
            upsample_fn: "nearest".to_string(),
            latent_channels: 4,
            upsampling_scaling_factor: 2,
            num_encoder_blocks: vec![1, 3, 3, 3],
            num_decoder_blocks: vec![3, 3, 3, 1],
            latent_magnitude: 3.0,
            latent_shift: 0.5,
            force_upcast: false,
            scaling_factor: 1.0,
            shift_factor: 0.0,
        }
    }
}

/// `AutoencoderTinyBlock`: three 3×3 convolutions with the activation between them, plus a
/// skip (1×1 when the width changes), through a ReLU.
#[derive(Debug, Clone)]
struct AutoencoderTinyBlock {
    convs: [Conv2d; 3],
    skip: Option<Conv2d>,
    act_fn: Activation,
}

impl AutoencoderTinyBlock {
    fn new(vb: VarBuilder, in_channels: usize, out_channels: usize, act_fn: Activation) -> Result<Self> {
        let conv = vb.pp("conv");
        let convs = [
            Conv2d::new(conv.pp(0), in_channels, out_channels, 3, 1, 1, true)?,
            Conv2d::new(conv.pp(2), out_channels, out_channels, 3, 1, 1, true)?,
            Conv2d::new(conv.pp(4), out_channels, out_channels, 3, 1, 1, true)?,
        ];
        let skip = if in_channels != out_channels {
            Some(Conv2d::new(vb.pp("skip"), in_channels, out_channels, 1, 1, 0, false)?)
        } else {
            None
        };
        Ok(Self { convs, skip, act_fn })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.convs[0].forward(x)?;
        h = self.convs[1].forward(&self.act_fn.forward(&h)?)?;
        h = self.convs[2].forward(&self.act_fn.forward(&h)?)?;
        let skip = match &self.skip {
            Some(skip) => skip.forward(x)?,
            None => x.clone(),
        };
        Ok((h + skip)?.relu()?)
    }
}

/// One entry of the `nn.Sequential` the tiny encoder and decoder are.
#[derive(Debug, Clone)]
enum Layer {
    Conv(Conv2d),
    Block(AutoencoderTinyBlock),
    Activation(Activation),
    /// `nn.Upsample(scale_factor, mode="nearest")`.
    Upsample(usize),
}

impl Layer {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Layer::Conv(conv) => conv.forward(x),
            Layer::Block(block) => block.forward(x),
            Layer::Activation(act) => act.forward(x),
            Layer::Upsample(factor) => {
                let (_, _, h, w) = x.dims4()?;
                ops::upsample_nearest2d(x, h * factor, w * factor)
            }
        }
    }
}

fn run_layers(layers: &[Layer], mut x: Tensor) -> Result<Tensor> {
    for layer in layers {
        x = layer.forward(&x)?;
    }
    Ok(x)
}

/// `EncoderTiny`: per level a convolution (stride 2 after the first) and `num_blocks[i]`
/// blocks, then a convolution to the latent channels. Images in [-1, 1] are mapped to [0, 1]
/// first, as TAESD was trained.
#[derive(Debug, Clone)]
pub struct EncoderTiny {
    layers: Vec<Layer>,
}

impl EncoderTiny {
    fn new(vb: VarBuilder, config: &AutoencoderTinyConfig, act_fn: Activation) -> Result<Self> {
        let vb = vb.pp("layers");
        let channels = &config.encoder_block_out_channels;
        let mut layers = Vec::new();
        for (i, &num_block) in config.num_encoder_blocks.iter().enumerate() {
            let n = channels[i];
            let conv = if i == 0 {
                Conv2d::new(vb.pp(layers.len()), config.in_channels, n, 3, 1, 1, true)?
            } else {
                Conv2d::new(vb.pp(layers.len()), n, n, 3, 2, 1, false)?
            };
            layers.push(Layer::Conv(conv));
            for _ in 0..num_block {
                layers.push(Layer::Block(AutoencoderTinyBlock::new(vb.pp(layers.len()), n, n, act_fn)?));
            }
        }
        let last = *channels.last().unwrap_or(&0);
        layers.push(Layer::Conv(Conv2d::new(vb.pp(layers.len()), last, config.latent_channels, 3, 1, 1, true)?));
        Ok(Self { layers })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        run_layers(&self.layers, ((x + 1.0)? / 2.0)?)
    }
}

/// `DecoderTiny`: latents soft-clamped to ±3 (`tanh(x / 3) · 3`), a convolution and the
/// activation, then per level `num_blocks[i]` blocks, an upsampling (all but the last level)
/// and a convolution (to the image channels, with bias, at the last); output mapped from
/// [0, 1] to [-1, 1].
#[derive(Debug, Clone)]
pub struct DecoderTiny {
    layers: Vec<Layer>,
}

impl DecoderTiny {
    fn new(vb: VarBuilder, config: &AutoencoderTinyConfig, act_fn: Activation) -> Result<Self> {
        let vb = vb.pp("layers");
        let channels = &config.decoder_block_out_channels;
        let mut layers = vec![
            Layer::Conv(Conv2d::new(vb.pp(0), config.latent_channels, channels[0], 3, 1, 1, true)?),
            Layer::Activation(act_fn),
        ];
        let levels = config.num_decoder_blocks.len();
        for (i, &num_block) in config.num_decoder_blocks.iter().enumerate() {
            let is_final_block = i == levels - 1;
            let n = channels[i];
            for _ in 0..num_block {
                layers.push(Layer::Block(AutoencoderTinyBlock::new(vb.pp(layers.len()), n, n, act_fn)?));
            }
            if !is_final_block {
                layers.push(Layer::Upsample(config.upsampling_scaling_factor));
            }
            let out = if is_final_block { config.out_channels } else { n };
            layers.push(Layer::Conv(Conv2d::new(vb.pp(layers.len()), n, out, 3, 1, 1, is_final_block)?));
        }
        Ok(Self { layers })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = ((x / 3.0)?.tanh()? * 3.0)?;
        let x = run_layers(&self.layers, x)?;
        Ok(x.affine(2.0, -1.0)?)
    }
}

/// Names the model in configuration errors (which already name the key).
fn config_error(error: Error) -> Error {
    match error {
        Error::InvalidInput(message) => Error::invalid(format!("AutoencoderTiny config: {message}")),
        other => other,
    }
}

#[derive(Debug, Clone)]
pub struct AutoencoderTiny {
    config: AutoencoderTinyConfig,
    encoder: EncoderTiny,
    decoder: DecoderTiny,
}

impl AutoencoderTiny {
    pub fn new(vb: VarBuilder, config: &AutoencoderTinyConfig) -> Result<Self> {
        check_config(config).map_err(config_error)?;
        let act_fn = Activation::from_name(&config.act_fn)
            .map_err(|e| config_error(Error::invalid(format!("key `act_fn`: {e}"))))?;
        let encoder = EncoderTiny::new(vb.pp("encoder"), config, act_fn)?;
        let decoder = DecoderTiny::new(vb.pp("decoder"), config, act_fn)?;
        Ok(Self { config: config.clone(), encoder, decoder })
    }

    pub fn config(&self) -> &AutoencoderTinyConfig {
        &self.config
    }

    /// How many pixels one latent element spans: pipelines take 2^(len(block_out_channels) - 1),
    /// and AutoencoderTiny registers `block_out_channels = decoder_block_out_channels`.
    pub fn scale_factor(&self) -> usize {
        1 << self.config.decoder_block_out_channels.len().saturating_sub(1)
    }

    /// Images `[B, in_channels, H, W]` in [-1, 1] to latents `[B, latent_channels, H / f, W / f]`
    /// (`encode(x).latents`: deterministic, no distribution to sample).
    pub fn encode(&self, x: &Tensor) -> Result<Tensor> {
        check_input("encode", "images", x, self.config.in_channels)?;
        self.encoder.forward(x)
    }

    /// Latents `[B, latent_channels, h, w]` to images `[B, out_channels, h × f, w × f]` in
    /// about [-1, 1] (`decode(z).sample`).
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        check_input("decode", "latents", z, self.config.latent_channels)?;
        self.decoder.forward(z)
    }

    /// `scale_latents`: raw latents to [0, 1] (TAESD's 8-bit latent images).
    pub fn scale_latents(&self, x: &Tensor) -> Result<Tensor> {
        let x = ((x / (2.0 * self.config.latent_magnitude))? + self.config.latent_shift)?;
        Ok(x.clamp(0f32, 1f32)?)
    }

    /// `unscale_latents`: [0, 1] back to raw latents.
    pub fn unscale_latents(&self, x: &Tensor) -> Result<Tensor> {
        Ok(((x - self.config.latent_shift)? * (2.0 * self.config.latent_magnitude))?)
    }
}

/// What `__init__` checks, plus what the layer loops index without checking.
fn check_config(config: &AutoencoderTinyConfig) -> Result<()> {
    for (channels_key, channels, blocks_key, blocks) in [
        ("encoder_block_out_channels", &config.encoder_block_out_channels, "num_encoder_blocks", &config.num_encoder_blocks),
        ("decoder_block_out_channels", &config.decoder_block_out_channels, "num_decoder_blocks", &config.num_decoder_blocks),
    ] {
        if channels.is_empty() {
            bail!("key `{channels_key}`: must not be empty");
        }
        if channels.len() != blocks.len() {
            bail!("key `{channels_key}`: should have the same length as `{blocks_key}` ({channels:?} vs {blocks:?})");
        }
        // Each level's convolution keeps its input's width, so only equal widths fit together.
        if channels.iter().any(|&c| c != channels[0] || c == 0) {
            bail!("key `{channels_key}`: the widths must all be equal and positive (each level's convolution keeps its input's width), got {channels:?}");
        }
    }
    if config.upsample_fn != "nearest" {
        bail!("key `upsample_fn`: `{}` is not supported (supported: nearest)", config.upsample_fn);
    }
    if config.upsampling_scaling_factor == 0 {
        bail!("key `upsampling_scaling_factor`: must be at least 1");
    }
    Ok(())
}

/// Refuses inputs that are not `[B, channels, H, W]` with a message saying what was expected.
fn check_input(method: &str, what: &str, input: &Tensor, channels: usize) -> Result<()> {
    let dims = input.dims();
    if dims.len() != 4 || dims[1] != channels || dims.contains(&0) {
        bail!("AutoencoderTiny.{method}: expected {what} of shape [B, {channels}, H, W], got {dims:?}");
    }
    Ok(())
}
