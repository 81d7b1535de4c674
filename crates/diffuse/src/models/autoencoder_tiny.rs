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
    /// Image channels of the input. Default: `3`.
    pub in_channels: usize,
    /// Image channels of the output. Default: `3`.
    pub out_channels: usize,
    /// Channels of each encoder level.
    pub encoder_block_out_channels: Vec<usize>,
    /// Channels of each decoder level.
    pub decoder_block_out_channels: Vec<usize>,
    /// The activation (diffusers' `get_activation` name). Default: `relu`.
    pub act_fn: String,
    /// The decoder's upsampling mode (`nearest`). Default: `nearest`.
    pub upsample_fn: String,
    /// Channels of the latents. Default: `4`.
    pub latent_channels: usize,
    /// The decoder's upsampling factor per level. Default: `2`.
    pub upsampling_scaling_factor: usize,
    /// Blocks per encoder level.
    pub num_encoder_blocks: Vec<usize>,
    /// Blocks per decoder level.
    pub num_decoder_blocks: Vec<usize>,
    /// `scale_latents` / `unscale_latents` (latents ↔ [0, 1] bytes); no pipeline uses them.
    pub latent_magnitude: f64,
    /// The shift of `scale_latents` / `unscale_latents`. Default: `0.5`.
    pub latent_shift: f64,
    /// Whether pipelines must run this VAE in f32 even when the rest is half precision. Default:
    /// `false`.
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

    /// Encodes images `[B, C, H, W]` in [-1, 1] to latents `[B, latent_channels, H / 8, W / 8]`.
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

    /// Decodes latents `[B, latent_channels, h, w]` to images `[B, C, 8h, 8w]` in [-1, 1].
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

/// diffusers' `AutoencoderTiny` (TAESD): a small, fast stand-in for the KL VAE, used for previews.
#[derive(Debug, Clone)]
pub struct AutoencoderTiny {
    config: AutoencoderTinyConfig,
    encoder: EncoderTiny,
    decoder: DecoderTiny,
    /// `enable_slicing()`: batches go through the encoder and decoder one image at a time.
    pub use_slicing: bool,
    /// `enable_tiling()`: every encode and decode runs in overlapping tiles (whatever the size).
    pub use_tiling: bool,
    /// `2 ** out_channels` (8), diffusers' stand-in for the encoder's downscaling.
    pub spatial_scale_factor: usize,
    /// The fraction of a tile that overlaps its neighbour and is blended (0.25).
    pub tile_overlap_factor: f64,
    /// 512 pixels.
    pub tile_sample_min_size: usize,
    /// `tile_sample_min_size // spatial_scale_factor`.
    pub tile_latent_min_size: usize,
}

impl AutoencoderTiny {
    /// Loads the weights under `vb` (diffusers' parameter names); errors name a missing tensor or a
    /// wrong shape. Errors on config values it does not support.
    pub fn new(vb: VarBuilder, config: &AutoencoderTinyConfig) -> Result<Self> {
        check_config(config).map_err(config_error)?;
        let act_fn = Activation::from_name(&config.act_fn)
            .map_err(|e| config_error(Error::invalid(format!("key `act_fn`: {e}"))))?;
        let encoder = EncoderTiny::new(vb.pp("encoder"), config, act_fn)?;
        let decoder = DecoderTiny::new(vb.pp("decoder"), config, act_fn)?;
        // diffusers' `2**out_channels`: 8 for RGB, which is TAESD's downscaling (3 levels).
        let spatial_scale_factor = 1usize << config.out_channels.min(16);
        Ok(Self {
            config: config.clone(),
            encoder,
            decoder,
            use_slicing: false,
            use_tiling: false,
            spatial_scale_factor,
            tile_overlap_factor: 0.125,
            tile_sample_min_size: 512,
            tile_latent_min_size: 512 / spatial_scale_factor,
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
        self.sliced(x, |x| if self.use_tiling { self.tiled_encode(x) } else { self.encoder.forward(x) })
    }

    /// Latents `[B, latent_channels, h, w]` to images `[B, out_channels, h × f, w × f]` in
    /// about [-1, 1] (`decode(z).sample`).
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        check_input("decode", "latents", z, self.config.latent_channels)?;
        self.sliced(z, |z| if self.use_tiling { self.tiled_decode(z) } else { self.decoder.forward(z) })
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

    /// `_tiled_encode`: `tile_sample_min_size` tiles every `tile_size - blend_size` pixels,
    /// each encoded alone and written over the output through a mask that ramps from 0 to 1
    /// across the overlap with the tiles above and to the left.
    fn tiled_encode(&self, x: &Tensor) -> Result<Tensor> {
        let sf = self.spatial_scale_factor;
        let (batch, _, height, width) = x.dims4()?;
        let shape = (batch, self.config.latent_channels, height / sf, width / sf);
        let tile_size = self.tile_sample_min_size;
        let blend_size = (tile_size as f64 * self.tile_overlap_factor) as usize;
        // torch.arange(tile_size / sf) / (blend_size / sf - 1)
        let ramp = blend_ramp((tile_size as f64 / sf as f64).ceil() as usize, blend_size as f64 / sf as f64 - 1.0);
        let region = |start: usize| (start / sf, (start + tile_size) / sf);
        tiled(x, shape, tile_size, tile_size - blend_size, &ramp, region, |tile| self.encoder.forward(tile))
    }

    /// `_tiled_decode`: `tile_latent_min_size` latent tiles, as [`Self::tiled_encode`].
    fn tiled_decode(&self, z: &Tensor) -> Result<Tensor> {
        let sf = self.spatial_scale_factor;
        let (batch, _, height, width) = z.dims4()?;
        let shape = (batch, self.config.out_channels, height * sf, width * sf);
        let tile_size = self.tile_latent_min_size;
        let blend_size = (tile_size as f64 * self.tile_overlap_factor) as usize;
        let ramp = blend_ramp(tile_size * sf, (blend_size * sf) as f64 - 1.0);
        let region = |start: usize| (start * sf, (start + tile_size) * sf);
        tiled(z, shape, tile_size, tile_size - blend_size, &ramp, region, |tile| self.decoder.forward(tile))
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

/// `(torch.arange(n) / divisor).clamp(0, 1)` in f32.
fn blend_ramp(n: usize, divisor: f64) -> Vec<f32> {
    let divisor = divisor as f32;
    (0..n).map(|i| (i as f32 / divisor).clamp(0.0, 1.0)).collect()
}

/// The loop of `_tiled_encode` / `_tiled_decode`: tiles of `tile_size` of `input` every
/// `traverse`, each through `f` and blended into the output (`shape`, starting from zeros) at
/// `region(start)`, as `mask · tile + (1 - mask) · output`, the mask `ramp[row] · ramp[col]`
/// (its row factor 1 on the first row of tiles, its column factor 1 on the first column).
fn tiled(
    input: &Tensor,
    shape: (usize, usize, usize, usize),
    tile_size: usize,
    traverse: usize,
    ramp: &[f32],
    region: impl Fn(usize) -> (usize, usize),
    f: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let (_, _, height, width) = input.dims4()?;
    let device = input.device();
    let mut out = Tensor::zeros(shape, input.dtype(), device)?;
    let traverse = traverse.max(1);
    for i in (0..height).step_by(traverse) {
        for j in (0..width).step_by(traverse) {
            let piece = input.narrow(2, i, tile_size.min(height - i))?.narrow(3, j, tile_size.min(width - j))?;
            let tile = f(&piece.contiguous()?)?;
            let (_, _, h, w) = tile.dims4()?;
            let ((r0, r1), (c0, c1)) = (region(i), region(j));
            let (r1, c1) = (r1.min(shape.2), c1.min(shape.3));
            if (r1 - r0, c1 - c0) != (h, w) {
                bail!(
                    "AutoencoderTiny tiling: a {h}x{w} tile does not fit its {}x{} place (image sizes must be multiples of the scale factor)",
                    r1 - r0,
                    c1 - c0
                );
            }
            let factor = |first: bool, k: usize| if first { 1.0 } else { ramp.get(k).copied().unwrap_or(1.0) };
            let rows: Vec<f32> = (0..h).map(|k| factor(i == 0, k)).collect();
            let cols: Vec<f32> = (0..w).map(|k| factor(j == 0, k)).collect();
            let rows = Tensor::from_vec(rows, (1, 1, h, 1), device)?;
            let cols = Tensor::from_vec(cols, (1, 1, 1, w), device)?;
            let mask = rows.broadcast_mul(&cols)?.to_dtype(tile.dtype())?;
            let current = out.narrow(2, r0, h)?.narrow(3, c0, w)?;
            let blended = (tile.broadcast_mul(&mask)? + current.broadcast_mul(&mask.affine(-1.0, 1.0)?)?)?;
            out = out.slice_assign(&[0..shape.0, 0..shape.1, r0..r1, c0..c1], &blended)?;
        }
    }
    Ok(out)
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
