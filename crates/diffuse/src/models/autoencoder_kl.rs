//! `AutoencoderKL`, the variational autoencoder of Stable Diffusion that maps images to
//! latents and back; port of diffusers/models/autoencoders/autoencoder_kl.py, with its slicing
//! (one image at a time) and tiling (overlapping tiles, linearly blended).

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
    /// Image channels of the input. Default: `3`.
    pub in_channels: usize,
    /// Image channels of the output. Default: `3`.
    pub out_channels: usize,
    /// The down blocks' class names, one per resolution level.
    pub down_block_types: Vec<String>,
    /// The up blocks' class names, one per resolution level.
    pub up_block_types: Vec<String>,
    /// Channels of each resolution level.
    pub block_out_channels: Vec<usize>,
    /// Resnets per down block (up blocks have one more). Default: `1`.
    pub layers_per_block: usize,
    /// The activation (diffusers' `get_activation` name). Default: `silu`.
    pub act_fn: String,
    /// Channels of the latents. Default: `4`.
    pub latent_channels: usize,
    /// Groups of the group norms. Default: `32`.
    pub norm_num_groups: usize,
    /// The size, in pixels (latents for a UNet), the model was trained at.
    pub sample_size: SampleSize,
    /// Latents are multiplied by this before the denoiser sees them (pipelines divide by it
    /// before decoding).
    pub scaling_factor: f64,
    /// Subtracted from latents before scaling (SD3, Flux); `None` for Stable Diffusion 1/2.
    pub shift_factor: Option<f64>,
    /// Per-channel latent means (SDXL-style normalisation); unused by Stable Diffusion 1/2.
    pub latents_mean: Option<Vec<f64>>,
    /// Per-channel latent standard deviations, beside `latents_mean`.
    pub latents_std: Option<Vec<f64>>,
    /// Whether pipelines must run this VAE in f32 even when the rest is half precision.
    pub force_upcast: bool,
    /// Whether there is a `quant_conv` (1×1) after the encoder. Default: `true`.
    pub use_quant_conv: bool,
    /// Whether there is a `post_quant_conv` (1×1) before the decoder. Default: `true`.
    pub use_post_quant_conv: bool,
    /// Whether the mid block has its attention layer. Default: `true`.
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

/// diffusers' `AutoencoderKL`: the VAE that maps images `[B, 3, H, W]` in [-1, 1] to latents `[B,
/// latent_channels, H / 8, W / 8]` (for SD's four levels) and back.
#[derive(Debug, Clone)]
pub struct AutoencoderKL {
    config: AutoencoderKLConfig,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    /// `enable_slicing()`: batches go through the encoder and decoder one image at a time.
    pub use_slicing: bool,
    /// `enable_tiling()`: images larger than `tile_sample_min_size` (latents larger than
    /// `tile_latent_min_size`) are encoded (decoded) in overlapping tiles.
    pub use_tiling: bool,
    /// The config's `sample_size` (its first entry when it is a pair).
    pub tile_sample_min_size: usize,
    /// `int(sample_size / 2 ** (len(block_out_channels) - 1))`.
    pub tile_latent_min_size: usize,
    /// The fraction of a tile that overlaps its neighbour and is blended (0.25).
    pub tile_overlap_factor: f64,
}

impl AutoencoderKL {
    /// Loads the weights under `vb` (diffusers' parameter names); errors name a missing tensor or a
    /// wrong shape. Errors on config values it does not support.
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
        let tile_sample_min_size = config.sample_size.height_width().0;
        let tile_latent_min_size = tile_sample_min_size >> config.block_out_channels.len().saturating_sub(1);
        Ok(Self {
            config: config.clone(),
            encoder,
            decoder,
            quant_conv,
            post_quant_conv,
            use_slicing: false,
            use_tiling: false,
            tile_sample_min_size,
            tile_latent_min_size,
            tile_overlap_factor: 0.25,
        })
    }

    /// `enable_tiling()`.
    pub fn enable_tiling(&mut self) {
        self.use_tiling = true;
    }

    /// `enable_slicing()`.
    pub fn enable_slicing(&mut self) {
        self.use_slicing = true;
    }

    /// The config the model was built from.
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
        let parameters = self.sliced(x, |x| self.encode_moments(x))?;
        DiagonalGaussianDistribution::new(&parameters)
    }

    /// `_encode`: the posterior's parameters, tiled when tiling is on and the image is larger
    /// than a tile.
    fn encode_moments(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, height, width) = x.dims4()?;
        if self.use_tiling && (width > self.tile_sample_min_size || height > self.tile_sample_min_size) {
            return self.tiled_encode(x);
        }
        self.encode_tile(x)
    }

    fn encode_tile(&self, x: &Tensor) -> Result<Tensor> {
        let parameters = self.encoder.forward(x)?;
        match &self.quant_conv {
            Some(quant_conv) => quant_conv.forward(&parameters),
            None => Ok(parameters),
        }
    }

    /// Decodes latents `[B, latent_channels, h, w]` (unscaled) into images
    /// `[B, out_channels, h × f, w × f]` (`decode(z).sample`, values nominally in [-1, 1]).
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        check_input("decode", "latents", z, self.config.latent_channels)?;
        self.sliced(z, |z| {
            let (_, _, height, width) = z.dims4()?;
            if self.use_tiling && (width > self.tile_latent_min_size || height > self.tile_latent_min_size) {
                return self.tiled_decode(z);
            }
            self.decode_tile(z)
        })
    }

    fn decode_tile(&self, z: &Tensor) -> Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(post_quant_conv) => post_quant_conv.forward(z)?,
            None => z.clone(),
        };
        self.decoder.forward(&z)
    }

    /// With slicing, `f` of each batch item, concatenated; else `f` of the whole batch.
    fn sliced(&self, x: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let batch = x.dim(0)?;
        if !self.use_slicing || batch == 1 {
            return f(x);
        }
        let slices = (0..batch).map(|i| f(&x.narrow(0, i, 1)?)).collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&slices, 0)?)
    }

    /// Tiles must hold at least one latent element (diffusers would loop forever).
    fn check_tiles(&self) -> Result<()> {
        if self.tile_latent_min_size == 0 || self.tile_sample_min_size == 0 {
            bail!(
                "AutoencoderKL tiling: sample_size {} is smaller than one latent element ({} pixels)",
                self.tile_sample_min_size,
                self.scale_factor()
            );
        }
        Ok(())
    }

    /// `_tiled_encode`: `tile_sample_min_size` tiles every `tile_sample_min_size × (1 - overlap)`
    /// pixels, each encoded alone; their latents blended with the tile above and to the left
    /// over `tile_latent_min_size × overlap` rows and columns, and cropped.
    fn tiled_encode(&self, x: &Tensor) -> Result<Tensor> {
        self.check_tiles()?;
        let overlap_size = (self.tile_sample_min_size as f64 * (1.0 - self.tile_overlap_factor)) as usize;
        let blend_extent = (self.tile_latent_min_size as f64 * self.tile_overlap_factor) as usize;
        let row_limit = self.tile_latent_min_size - blend_extent;
        let tile = self.tile_sample_min_size;
        tiled(x, overlap_size, tile, blend_extent, row_limit, |tile| self.encode_tile(tile))
    }

    /// `tiled_decode`: `tile_latent_min_size` latent tiles every `tile_latent_min_size × (1 -
    /// overlap)` latents, each decoded alone; the images blended over `tile_sample_min_size ×
    /// overlap` pixels and cropped.
    fn tiled_decode(&self, z: &Tensor) -> Result<Tensor> {
        self.check_tiles()?;
        let overlap_size = (self.tile_latent_min_size as f64 * (1.0 - self.tile_overlap_factor)) as usize;
        let blend_extent = (self.tile_sample_min_size as f64 * self.tile_overlap_factor) as usize;
        let row_limit = self.tile_sample_min_size - blend_extent;
        let tile = self.tile_latent_min_size;
        tiled(z, overlap_size, tile, blend_extent, row_limit, |tile| self.decode_tile(tile))
    }
}

/// The tile loop both `_tiled_encode` and `tiled_decode` run: tiles of `tile` rows and columns
/// of `input` every `step`, each through `f`; each output blended (in the order diffusers
/// blends them in place: a tile's neighbours above and to the left are already blended) and
/// cropped to `row_limit`, then all concatenated.
fn tiled(
    input: &Tensor,
    step: usize,
    tile: usize,
    blend_extent: usize,
    row_limit: usize,
    f: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let (_, _, height, width) = input.dims4()?;
    let step = step.max(1);
    let mut rows: Vec<Vec<Tensor>> = Vec::new();
    for i in (0..height).step_by(step) {
        let mut row: Vec<Tensor> = Vec::new();
        for j in (0..width).step_by(step) {
            let piece = input.narrow(2, i, tile.min(height - i))?.narrow(3, j, tile.min(width - j))?;
            let mut out = f(&piece.contiguous()?)?;
            if let Some(above) = rows.last() {
                out = blend(&above[row.len()], &out, blend_extent, 2)?;
            }
            if let Some(left) = row.last() {
                out = blend(left, &out, blend_extent, 3)?;
            }
            row.push(out);
        }
        rows.push(row);
    }
    let rows = rows
        .iter()
        .map(|row| {
            let cropped = row.iter().map(|t| crop(t, row_limit)).collect::<Result<Vec<_>>>()?;
            Ok(Tensor::cat(&cropped, 3)?)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&rows, 2)?)
}

/// `tile[:, :, :limit, :limit]`.
fn crop(tile: &Tensor, limit: usize) -> Result<Tensor> {
    let (_, _, height, width) = tile.dims4()?;
    Ok(tile.narrow(2, 0, limit.min(height))?.narrow(3, 0, limit.min(width))?)
}

/// `blend_v` (`dim` 2) / `blend_h` (`dim` 3): the first `extent` rows (columns) of `b` become
/// `a`'s last ones × (1 - y / extent) + their own × y / extent.
pub fn blend(a: &Tensor, b: &Tensor, extent: usize, dim: usize) -> Result<Tensor> {
    let extent = extent.min(a.dim(dim)?).min(b.dim(dim)?);
    if extent == 0 {
        return Ok(b.clone());
    }
    let mut shape = [1usize; 4];
    shape[dim] = extent;
    let ramp: Vec<f32> = (0..extent).map(|y| (y as f64 / extent as f64) as f32).collect();
    let keep: Vec<f32> = (0..extent).map(|y| (1.0 - y as f64 / extent as f64) as f32).collect();
    let ramp = Tensor::from_vec(ramp, &shape, b.device())?.to_dtype(b.dtype())?;
    let keep = Tensor::from_vec(keep, &shape, b.device())?.to_dtype(b.dtype())?;
    let a_end = a.narrow(dim, a.dim(dim)? - extent, extent)?;
    let b_start = b.narrow(dim, 0, extent)?;
    let blended = (a_end.broadcast_mul(&keep)? + b_start.broadcast_mul(&ramp)?)?;
    let rest = b.narrow(dim, extent, b.dim(dim)? - extent)?;
    Ok(Tensor::cat(&[&blended, &rest], dim)?)
}

/// Refuses inputs that are not `[B, channels, H, W]` with a message saying what was expected.
fn check_input(method: &str, what: &str, input: &Tensor, channels: usize) -> Result<()> {
    let dims = input.dims();
    if dims.len() != 4 || dims[1] != channels || dims.contains(&0) {
        bail!("AutoencoderKL.{method}: expected {what} of shape [B, {channels}, H, W], got {dims:?}");
    }
    Ok(())
}
