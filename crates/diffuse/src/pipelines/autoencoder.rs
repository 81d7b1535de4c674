//! The VAE of a Stable Diffusion pipeline: an AutoencoderKL or an AutoencoderTiny (TAESD), used
//! as diffusers' pipelines use whichever `vae=` they were built with: `retrieve_latents`
//! samples the KL posterior but takes the tiny encoder's latents as they are, and both are
//! scaled by their own config's `scaling_factor` (1 for TAESD).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde_json::{Map, Value};

use crate::loading::config::{parse_config, read_json_object};
use crate::loading::weights::{find_weight_files, var_builder};
use crate::models::autoencoder_kl::{AutoencoderKL, AutoencoderKLConfig};
use crate::models::autoencoder_tiny::{AutoencoderTiny, AutoencoderTinyConfig};
use crate::rng::TorchGenerator;
use crate::{Error, Result};

/// The autoencoder classes a pipeline can decode with.
pub const SUPPORTED_AUTOENCODERS: &[&str] = &["AutoencoderKL", "AutoencoderTiny"];

/// An autoencoder's config, of whichever class its `config.json` names.
#[derive(Debug, Clone, PartialEq)]
pub enum AutoencoderConfig {
    /// An `AutoencoderKL` config (the Stable Diffusion VAEs).
    Kl(AutoencoderKLConfig),
    /// An `AutoencoderTiny` config (TAESD).
    Tiny(AutoencoderTinyConfig),
}

/// Keys only AutoencoderTiny's config has (for configs written without `_class_name`).
const TINY_KEYS: &[&str] = &["encoder_block_out_channels", "num_encoder_blocks", "latent_magnitude"];

impl AutoencoderConfig {
    /// The class named by `_class_name`, or recognised by its keys (a config without
    /// `_class_name` and without AutoencoderTiny's keys is read as AutoencoderKL's, as before
    /// there were two); a config naming another class is refused, naming it. `path` names the
    /// file in errors.
    pub fn from_json(map: &Map<String, Value>, path: &Path) -> Result<Self> {
        match map.get("_class_name").and_then(Value::as_str) {
            Some("AutoencoderKL") => Ok(Self::Kl(parse_config(map, path)?)),
            Some("AutoencoderTiny") => Ok(Self::Tiny(parse_config(map, path)?)),
            Some(other) => Err(Error::config(
                path,
                format!("not an autoencoder this pipeline can use: the config names `{other}` (supported: {})", SUPPORTED_AUTOENCODERS.join(", ")),
            )),
            None if TINY_KEYS.iter().any(|key| map.contains_key(*key)) => Ok(Self::Tiny(parse_config(map, path)?)),
            None => Ok(Self::Kl(parse_config(map, path)?)),
        }
    }

    /// The diffusers class name: `AutoencoderKL` or `AutoencoderTiny`.
    pub fn class_name(&self) -> &'static str {
        match self {
            Self::Kl(_) => "AutoencoderKL",
            Self::Tiny(_) => "AutoencoderTiny",
        }
    }


    /// The type an autoencoder of this config runs in for a pipeline in `dtype`: f32 when its
    /// config says `force_upcast` and the pipeline is in f16, which such VAEs overflow (SDXL's),
    /// as diffusers' SDXL pipelines upcast them; else `dtype`.
    pub fn runs_in(&self, dtype: DType) -> DType {
        match self {
            Self::Kl(config) => kl_runs_in(config, dtype),
            Self::Tiny(_) => dtype,
        }
    }

    /// Channels of the latents `[N, C, h, w]` the autoencoder encodes to (`latent_channels`: 4 for
    /// SD 1.x/2.x and SDXL).
    pub fn latent_channels(&self) -> usize {
        match self {
            Self::Kl(config) => config.latent_channels,
            Self::Tiny(config) => config.latent_channels,
        }
    }
}

/// f32 for a `force_upcast` AutoencoderKL in an f16 pipeline, else `dtype`.
fn kl_runs_in(config: &AutoencoderKLConfig, dtype: DType) -> DType {
    if config.force_upcast && dtype == DType::F16 {
        DType::F32
    } else {
        dtype
    }
}

/// A pipeline's VAE.
// One or two per pipeline, so the KL variant's size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Autoencoder {
    /// diffusers' `AutoencoderKL`.
    Kl(AutoencoderKL),
    /// diffusers' `AutoencoderTiny` (TAESD).
    Tiny(AutoencoderTiny),
}

impl Autoencoder {
    /// Builds the autoencoder of `config`'s class from the weights in `vb` (diffusers' names).
    pub fn new(vb: VarBuilder, config: &AutoencoderConfig) -> Result<Self> {
        Ok(match config {
            AutoencoderConfig::Kl(config) => Self::Kl(AutoencoderKL::new(vb, config)?),
            AutoencoderConfig::Tiny(config) => Self::Tiny(AutoencoderTiny::new(vb, config)?),
        })
    }

    /// An autoencoder folder (`config.json`, `diffusion_pytorch_model[.VARIANT].safetensors`),
    /// as `AutoencoderKL.from_pretrained` / `AutoencoderTiny.from_pretrained` read it. A
    /// folder whose config has neither `_class_name` nor `latent_channels` is not taken for one.
    pub fn load(dir: &Path, variant: Option<&str>, dtype: DType, device: &Device) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::invalid(format!(
                "{}: not an autoencoder folder (a folder with config.json and diffusion_pytorch_model.safetensors)",
                dir.display()
            )));
        }
        let config_path = dir.join("config.json");
        if !config_path.is_file() {
            let hint = if dir.join("model_index.json").is_file() { " (a pipeline folder: its VAE is in vae/)" } else { "" };
            return Err(Error::invalid(format!("{}: not an autoencoder folder: it has no config.json{hint}", dir.display())));
        }
        let map = read_json_object(&config_path)?;
        if !map.contains_key("_class_name") && !map.contains_key("latent_channels") {
            return Err(Error::config(&config_path, "not an autoencoder config: it has neither `_class_name` nor `latent_channels`"));
        }
        let config = AutoencoderConfig::from_json(&map, &config_path)?;
        let files = find_weight_files(dir, "diffusion_pytorch_model", variant)?;
        let file: PathBuf = files[0].clone();
        Self::new(var_builder(&files, config.runs_in(dtype), device)?, &config).map_err(|e| e.in_weights_file(&file))
    }

    /// The diffusers class name: `AutoencoderKL` or `AutoencoderTiny`.
    pub fn class_name(&self) -> &'static str {
        match self {
            Self::Kl(_) => "AutoencoderKL",
            Self::Tiny(_) => "AutoencoderTiny",
        }
    }

    /// The type this autoencoder runs in for a pipeline in `dtype` ([`AutoencoderConfig::runs_in`]).
    pub fn runs_in(&self, dtype: DType) -> DType {
        match self {
            Self::Kl(model) => kl_runs_in(model.config(), dtype),
            Self::Tiny(_) => dtype,
        }
    }


    /// Channels of the latents `[N, C, h, w]` the autoencoder encodes to (its config's
    /// `latent_channels`).
    pub fn latent_channels(&self) -> usize {
        match self {
            Self::Kl(vae) => vae.config().latent_channels,
            Self::Tiny(vae) => vae.config().latent_channels,
        }
    }

    /// Pixels per latent element: `2 ** (len(vae.config.block_out_channels) - 1)`, as pipelines
    /// compute `vae_scale_factor` (8 for SD's VAE and TAESD).
    pub fn scale_factor(&self) -> usize {
        match self {
            Self::Kl(vae) => vae.scale_factor(),
            Self::Tiny(vae) => vae.scale_factor(),
        }
    }

    /// `vae.config.scaling_factor`: latents × this are the denoiser's.
    pub fn scaling_factor(&self) -> f64 {
        match self {
            Self::Kl(vae) => vae.config().scaling_factor,
            Self::Tiny(vae) => vae.config().scaling_factor,
        }
    }

    /// Added to latents after unscaling, before decoding (the KL VAEs that have one).
    pub fn shift_factor(&self) -> Option<f64> {
        match self {
            Self::Kl(vae) => vae.config().shift_factor,
            // AutoencoderTiny stores one (0) but the SD pipelines never apply it.
            Self::Tiny(_) => None,
        }
    }

    /// `retrieve_latents(vae.encode(image), generator)`, unscaled: a sample of the KL posterior
    /// (drawn from `generator`), or the tiny encoder's latents (the generator untouched).
    pub fn encode_latents(&self, image: &Tensor, generator: &mut TorchGenerator) -> Result<Tensor> {
        match self {
            Self::Kl(vae) => vae.encode(image)?.sample(generator),
            Self::Tiny(vae) => vae.encode(image),
        }
    }

    /// `enable_tiling()`: encode and decode in overlapping tiles (AutoencoderKL above its
    /// `sample_size`, AutoencoderTiny always, in 512-pixel tiles).
    pub fn enable_tiling(&mut self) {
        match self {
            Self::Kl(vae) => vae.enable_tiling(),
            Self::Tiny(vae) => vae.enable_tiling(),
        }
    }

    /// `enable_slicing()`: batches through the VAE one image at a time.
    pub fn enable_slicing(&mut self) {
        match self {
            Self::Kl(vae) => vae.enable_slicing(),
            Self::Tiny(vae) => vae.enable_slicing(),
        }
    }

    /// The largest image side (in pixels) that one encoder or decoder pass sees: a tile's with
    /// tiling, else the whole image's.
    pub fn pass_size(&self, height: usize, width: usize) -> (usize, usize) {
        let tile = match self {
            Self::Kl(vae) if vae.use_tiling => Some(vae.tile_sample_min_size),
            Self::Tiny(vae) if vae.use_tiling => Some(vae.tile_sample_min_size),
            _ => None,
        };
        match tile {
            Some(tile) => (height.min(tile), width.min(tile)),
            None => (height, width),
        }
    }

    /// Whether batches go through the VAE one image at a time.
    pub fn slicing(&self) -> bool {
        match self {
            Self::Kl(vae) => vae.use_slicing,
            Self::Tiny(vae) => vae.use_slicing,
        }
    }

    /// The widest activation at full resolution, in channels (the first block's).
    pub fn full_resolution_channels(&self) -> usize {
        match self {
            Self::Kl(vae) => vae.config().block_out_channels.first().copied().unwrap_or(0),
            Self::Tiny(vae) => {
                let config = vae.config();
                config.encoder_block_out_channels.iter().chain(&config.decoder_block_out_channels).copied().max().unwrap_or(0)
            }
        }
    }

    /// `vae.decode(z).sample`.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        match self {
            Self::Kl(vae) => vae.decode(z),
            Self::Tiny(vae) => vae.decode(z),
        }
    }
}

#[cfg(test)]
mod upcast_tests {
    use super::*;

    /// SDXL's VAE (force_upcast) runs in f32 under an f16 pipeline, as diffusers upcasts it;
    /// bf16 and f32 pipelines, and VAEs without the flag (the fp16-fix VAE), keep their type.
    #[test]
    fn force_upcast_vaes_run_in_f32_under_f16() {
        let kl = |force_upcast| AutoencoderConfig::Kl(AutoencoderKLConfig { force_upcast, ..AutoencoderKLConfig::default() });
        assert_eq!(kl(true).runs_in(DType::F16), DType::F32);
        assert_eq!(kl(true).runs_in(DType::BF16), DType::BF16);
        assert_eq!(kl(true).runs_in(DType::F32), DType::F32);
        assert_eq!(kl(false).runs_in(DType::F16), DType::F16);
    }
}
