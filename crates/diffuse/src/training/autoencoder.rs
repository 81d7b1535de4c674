//! The autoencoder kind: an `AutoencoderKL` trained as latent diffusion's first stage, with
//! a reconstruction loss plus a weighted KL term to the standard normal (the loss of
//! latent-diffusion's ldm/modules/losses/contperceptual.py without its perceptual and
//! adversarial terms), exported as a diffusers AutoencoderKL folder with the latents'
//! `scaling_factor` measured as Stable Diffusion's was (1 / the latents' standard deviation).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::data::Batch;
use super::export::{preset_or_file, require_key, write_model_folder};
use super::params::Parameters;
use super::{Image8, TrainingTask};
use crate::loading::config::parse_config;
use crate::models::autoencoder_kl::{AutoencoderKL, AutoencoderKLConfig};
use crate::pipelines::to_uint8_images;
use crate::rng::TorchGenerator;
use crate::{bail, Error, Result};

/// Named AutoencoderKL architectures for `--model-config` (diffusers config keys; the data
/// sets the channels and the sample size).
pub const PRESETS: &[(&str, &str, &str)] = &[
    (
        "vae-tiny",
        "2 levels of 16 and 32 channels, 4 latent channels at 1/2 the size: tests",
        r#"{"block_out_channels": [16, 32], "layers_per_block": 1, "norm_num_groups": 8, "latent_channels": 4,
            "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"]}"#,
    ),
    (
        "vae-small",
        "3 levels of 16, 32, 64 channels, 4 latent channels at 1/4 the size (32×32 → 8×8): the built-in Fashion-MNIST model",
        r#"{"block_out_channels": [16, 32, 64], "layers_per_block": 1, "norm_num_groups": 8, "latent_channels": 4,
            "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]}"#,
    ),
];

/// How reconstructions are compared with the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReconstructionLoss {
    /// Latent diffusion's choice.
    L1,
    /// The mean squared error.
    Mse,
}

impl ReconstructionLoss {
    /// Parses `l1` or `mse`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "l1" => Ok(Self::L1),
            "mse" => Ok(Self::Mse),
            other => bail!("reconstruction loss `{other}` is not one of l1, mse"),
        }
    }
}

/// Everything the autoencoder kind needs besides the loop's settings.
#[derive(Debug, Clone)]
pub struct AutoencoderTrainingConfig {
    /// The config as diffusers keys (what is exported), and parsed.
    pub vae_json: Map<String, Value>,
    /// The parsed `vae_json`.
    pub vae: AutoencoderKLConfig,
    /// How reconstructions are scored.
    pub reconstruction: ReconstructionLoss,
    /// The KL term's weight relative to the reconstruction term, both summed over an image's
    /// values as latent diffusion does (its configs use 1e-6).
    pub kl_weight: f64,
    /// The weights' type in the exported folder.
    pub export_dtype: DType,
}

/// The AutoencoderKL config for training from a preset or a file, with the data's channels and
/// size filled in (a stated value that contradicts the data is refused, naming the key).
pub fn resolve_vae_config(model_config: &str, channels: usize, size: usize) -> Result<(Map<String, Value>, AutoencoderKLConfig)> {
    let (mut map, origin) = preset_or_file(model_config, PRESETS, "`model_config`")?;
    require_key(&mut map, &origin, "in_channels", json!(channels), "the data")?;
    require_key(&mut map, &origin, "out_channels", json!(channels), "the data")?;
    require_key(&mut map, &origin, "sample_size", json!(size), "the data")?;
    let config: AutoencoderKLConfig = parse_config(&map, Path::new(&origin))?;
    let factor = 1usize << config.block_out_channels.len().saturating_sub(1);
    if size == 0 || !size.is_multiple_of(factor) {
        bail!("{origin}: the image size {size} must be a multiple of {factor} for {} levels", config.block_out_channels.len());
    }
    Ok((map, config))
}

/// An AutoencoderKL being trained.
pub struct AutoencoderTask {
    config: AutoencoderTrainingConfig,
    parameters: Parameters,
    vae: AutoencoderKL,
    /// Fixed images `[N, C, H, W]` in [-1, 1]: the sample grids reconstruct them, and the
    /// export measures the latents' scale on them.
    reference_images: Tensor,
    device: Device,
    _varmap: VarMap,
}

impl AutoencoderTask {
    /// A fresh `AutoencoderKL` on trainable variables (initialised from `init_seed`);
    /// `reference_images` `[N, C, H, W]` in [-1, 1] are what export measures the latents' scale on.
    /// Errors on a negative or non-finite `kl_weight`.
    pub fn new(config: AutoencoderTrainingConfig, reference_images: Tensor, init_seed: u64, device: &Device) -> Result<Self> {
        if !(config.kl_weight.is_finite() && config.kl_weight >= 0.0) {
            bail!("`kl_weight` must be a finite number ≥ 0, got {}", config.kl_weight);
        }
        let varmap = VarMap::new();
        let vae = AutoencoderKL::new(VarBuilder::from_varmap(&varmap, DType::F32, device), &config.vae)?;
        let parameters = Parameters::from_varmap(&varmap)?;
        parameters.init_torch_default(init_seed)?;
        Ok(Self { config, parameters, vae, reference_images, device: device.clone(), _varmap: varmap })
    }

    fn model(&self, weights: &HashMap<String, Tensor>) -> Result<AutoencoderKL> {
        AutoencoderKL::new(VarBuilder::from_tensors(weights.clone(), DType::F32, &self.device), &self.config.vae)
    }

    /// 1 / the standard deviation of the latents sampled (from a fixed seed) for the
    /// reference images: what the diffusion model's inputs are multiplied by.
    pub fn scaling_factor(vae: &AutoencoderKL, images: &Tensor) -> Result<f64> {
        let latents = vae.encode(images)?.sample(&mut TorchGenerator::new(0))?;
        let values = latents.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        let mean = values.iter().sum::<f64>() / values.len() as f64;
        let variance = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (values.len().max(2) - 1) as f64;
        if !(variance.is_finite() && variance > 0.0) {
            bail!("the latents of the reference images have no spread (variance {variance}); the autoencoder has not learned");
        }
        Ok(1.0 / variance.sqrt())
    }
}

/// Each image's reconstruction error and KL divergence to N(0, 1), summed over its values.
pub fn autoencoder_loss(
    vae: &AutoencoderKL,
    images: &Tensor,
    reconstruction: ReconstructionLoss,
    kl_weight: f64,
    generator: &mut TorchGenerator,
) -> Result<Tensor> {
    let posterior = vae.encode(images)?;
    let latents = posterior.sample(generator)?;
    let decoded = vae.decode(&latents)?;
    let difference = (decoded - images)?;
    let error = match reconstruction {
        ReconstructionLoss::L1 => difference.abs()?,
        ReconstructionLoss::Mse => difference.sqr()?,
    };
    // KL(N(mean, var) || N(0, 1)) = ½ Σ (mean² + var - 1 - log var).
    let kl = ((posterior.mean().sqr()? + posterior.logvar().exp()?)? - 1.0)?.sub(posterior.logvar())?.affine(0.5, 0.0)?;
    // Both sums per image, averaged over the batch, then divided by the values per image so
    // that the loss reads as a per-value error.
    let total = (error.sum_all()? + kl.sum_all()?.affine(kl_weight, 0.0)?)?;
    Ok(total.affine(1.0 / images.elem_count() as f64, 0.0)?)
}

impl TrainingTask for AutoencoderTask {
    fn parameters(&self) -> &Parameters {
        &self.parameters
    }

    fn identity(&self) -> Map<String, Value> {
        let mut map = Map::new();
        map.insert("kind".into(), json!("AutoencoderKL"));
        map.insert("vae".into(), Value::Object(self.config.vae_json.clone()));
        map.insert("reconstruction".into(), serde_json::to_value(self.config.reconstruction).unwrap_or(Value::Null));
        map.insert("kl_weight".into(), json!(self.config.kl_weight));
        map
    }

    /// Draws the latents' noise.
    fn loss(&mut self, batch: &Batch, generator: &mut TorchGenerator) -> Result<Tensor> {
        autoencoder_loss(&self.vae, &batch.images, self.config.reconstruction, self.config.kl_weight, generator)
    }

    /// The reference images in the first row, their reconstructions (the posterior's mode,
    /// decoded) in the second.
    fn samples(&mut self, weights: &HashMap<String, Tensor>) -> Result<(Vec<Image8>, usize)> {
        let vae = self.model(weights)?;
        let decoded = vae.decode(&vae.encode(&self.reference_images)?.mode())?;
        let mut images = to_uint8_images(&self.reference_images)?;
        images.extend(to_uint8_images(&decoded)?);
        Ok((images, self.reference_images.dim(0)?))
    }

    /// The AutoencoderKL folder (`config.json`, `diffusion_pytorch_model.safetensors`) at `dir`.
    fn export(&self, weights: &HashMap<String, Tensor>, dir: &Path) -> Result<()> {
        let scaling_factor = Self::scaling_factor(&self.model(weights)?, &self.reference_images)?;
        let mut config = self.config.vae_json.clone();
        config.insert("scaling_factor".into(), json!(scaling_factor));
        write_model_folder(dir, Some("AutoencoderKL"), &config, weights, "", "diffusion_pytorch_model.safetensors", self.config.export_dtype)
            .map_err(|e| match e {
                Error::InvalidInput(message) => Error::invalid(format!("exporting the autoencoder: {message}")),
                other => other,
            })
    }
}
