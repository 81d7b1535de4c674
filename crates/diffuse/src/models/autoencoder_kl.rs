//! `AutoencoderKL`, the variational autoencoder of Stable Diffusion that maps images to
//! latents and back; port of diffusers/models/autoencoders/autoencoder_kl.py (without
//! slicing and tiling).

use candle_core::Tensor;
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::unet_2d::SampleSize;
use super::vae::{Decoder, DecoderConfig, DiagonalGaussianDistribution, Encoder, EncoderConfig};
use super::{Activation, Conv2d};
use crate::{bail, Error, Result};

/// The arguments of `AutoencoderKL.__init__`, as `config.json` stores them, with its
/// defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct AutoencoderKLConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub act_fn: String,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    pub sample_size: SampleSize,
    /// Latents are multiplied by this before the denoiser sees them (pipelines divide by it
    /// before decoding).
    pub scaling_factor: f64,
    /// Subtracted from latents before scaling (SD3, Flux); `None` for Stable Diffusion 1/2.
    pub shift_factor: Option<f64>,
    pub latents_mean: Option<Vec<f64>>,
    pub latents_std: Option<Vec<f64>>,
    /// Whether pipelines must run this VAE in f32 even when the rest is half precision.
    pub force_upcast: bool,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    pub mid_block_add_attention: bool,
}

impl Default for AutoencoderKLConfig {
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".to_string()],
            up_block_types: vec!["UpDecoderBlock2D".to_string()],
            block_out_channels: vec![64],
            layers_per_block: 1,
            act_fn: "silu".to_string(),
            latent_channels: 4,
            norm_num_groups: 32,
            sample_size: SampleSize::Square(32),
            scaling_factor: 0.18215,
            shift_factor: None,
            latents_mean: None,
            latents_std: None,
            force_upcast: true,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
        }
    }
}

/// Names the model in configuration errors (which already name the key).
fn config_error(error: Error) -> Error {
    match error {
        Error::InvalidInput(message) => Error::invalid(format!("AutoencoderKL config: {message}")),
        other => other,
    }
}

#[derive(Debug, Clone)]
pub struct AutoencoderKL {
    config: AutoencoderKLConfig,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
}

impl AutoencoderKL {
    pub fn new(vb: VarBuilder, config: &AutoencoderKLConfig) -> Result<Self> {
        let act_fn = Activation::from_name(&config.act_fn)
            .map_err(|e| config_error(Error::invalid(format!("key `act_fn`: {e}"))))?;
        let encoder = Encoder::new(
            vb.pp("encoder"),
            &EncoderConfig {
                in_channels: config.in_channels,
                out_channels: config.latent_channels,
                down_block_types: config.down_block_types.clone(),
                block_out_channels: config.block_out_channels.clone(),
                layers_per_block: config.layers_per_block,
                norm_num_groups: config.norm_num_groups,
                act_fn,
                double_z: true,
                mid_block_add_attention: config.mid_block_add_attention,
            },
        )
        .map_err(config_error)?;
        let decoder = Decoder::new(
            vb.pp("decoder"),
            &DecoderConfig {
                in_channels: config.latent_channels,
                out_channels: config.out_channels,
                up_block_types: config.up_block_types.clone(),
                block_out_channels: config.block_out_channels.clone(),
                layers_per_block: config.layers_per_block,
                norm_num_groups: config.norm_num_groups,
                act_fn,
                mid_block_add_attention: config.mid_block_add_attention,
            },
        )
        .map_err(config_error)?;
        let latent_channels = config.latent_channels;
        let quant_conv = if config.use_quant_conv {
            Some(Conv2d::new(vb.pp("quant_conv"), 2 * latent_channels, 2 * latent_channels, 1, 1, 0, true)?)
        } else {
            None
        };
        let post_quant_conv = if config.use_post_quant_conv {
            Some(Conv2d::new(vb.pp("post_quant_conv"), latent_channels, latent_channels, 1, 1, 0, true)?)
        } else {
            None
        };
        Ok(Self { config: config.clone(), encoder, decoder, quant_conv, post_quant_conv })
    }

    pub fn config(&self) -> &AutoencoderKLConfig {
        &self.config
    }

    /// How many pixels one latent element spans in each direction: 2^(levels - 1) (8 for
    /// Stable Diffusion), as pipelines compute `vae_scale_factor`.
    pub fn scale_factor(&self) -> usize {
        1 << self.config.block_out_channels.len().saturating_sub(1)
    }

    /// Encodes images `[B, in_channels, H, W]` (values in [-1, 1]) into the posterior over
    /// latents `[B, latent_channels, H / f, W / f]` (`encode(x).latent_dist`). Latents are
    /// not scaled: pipelines multiply them by `scaling_factor` themselves.
    pub fn encode(&self, x: &Tensor) -> Result<DiagonalGaussianDistribution> {
        check_input("encode", "images", x, self.config.in_channels)?;
        let mut parameters = self.encoder.forward(x)?;
        if let Some(quant_conv) = &self.quant_conv {
            parameters = quant_conv.forward(&parameters)?;
        }
        DiagonalGaussianDistribution::new(&parameters)
    }

    /// Decodes latents `[B, latent_channels, h, w]` (unscaled) into images
    /// `[B, out_channels, h × f, w × f]` (`decode(z).sample`, values nominally in [-1, 1]).
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        check_input("decode", "latents", z, self.config.latent_channels)?;
        let z = match &self.post_quant_conv {
            Some(post_quant_conv) => post_quant_conv.forward(z)?,
            None => z.clone(),
        };
        self.decoder.forward(&z)
    }
}

/// Refuses inputs that are not `[B, channels, H, W]` with a message saying what was expected.
fn check_input(method: &str, what: &str, input: &Tensor, channels: usize) -> Result<()> {
    let dims = input.dims();
    if dims.len() != 4 || dims[1] != channels || dims.contains(&0) {
        bail!("AutoencoderKL.{method}: expected {what} of shape [B, {channels}, H, W], got {dims:?}");
    }
    Ok(())
}
