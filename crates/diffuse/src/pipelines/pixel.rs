//! Pixel-space sampling with a `UNet2DModel`: diffusers' DDPMPipeline and DDIMPipeline
//! (diffusers/pipelines/ddpm/pipeline_ddpm.py), written as the generic denoising loop so
//! that every scheduler runs: noise × init_noise_sigma, then per step scale_model_input →
//! model → step. Unconditional, or class-conditional when the UNet has class embeddings.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::{Map, Value};

use crate::loading::config::{parse_config, read_json_object};
use crate::loading::weights::{find_weight_files, var_builder};
use crate::models::unet_2d::{UNet2DModel, UNet2DModelConfig};
use crate::pipelines::{resolve_scheduler, ResolvedScheduler};
use crate::rng::TorchGenerator;
use crate::{Error, Result};

/// A pixel-space pipeline (diffusers' DDPMPipeline / DDIMPipeline): a `UNet2DModel` and a
/// scheduler, sampling images directly without a VAE.
pub struct PixelPipeline {
    /// The denoising UNet (`unet/`).
    pub unet: UNet2DModel,
    /// The UNet's config (`unet/config.json`).
    pub unet_config: UNet2DModelConfig,
    /// The scheduler (`scheduler/`, or the one named at load).
    pub scheduler: ResolvedScheduler,
    /// The folder the pipeline was loaded from.
    pub model_dir: PathBuf,
    /// The device the UNet runs on.
    pub device: Device,
}

/// What one call generates.
#[derive(Clone, Debug)]
pub struct PixelOptions {
    /// Denoising steps (diffusers' `num_inference_steps`).
    pub num_inference_steps: usize,
    /// Images generated at once (diffusers' `batch_size`).
    pub num_images: usize,
    /// DDIM's eta (diffusers' `eta`): 0 is deterministic DDIM, 1 DDPM-like noise (TCD's gamma);
    /// schedulers without one ignore it.
    pub eta: f64,
    /// The class to generate, for a UNet with class embeddings (`class_labels`); `None` for an
    /// unconditional one.
    pub class_label: Option<i64>,
}

impl PixelPipeline {
    /// Loads a DDPMPipeline-layout folder: `model_index.json` (optional), `unet/`, `scheduler/`.
    pub fn load(
        model_dir: &Path,
        scheduler_name: Option<&str>,
        scheduler_overrides: &[(String, Value)],
        variant: Option<&str>,
        device: &Device,
    ) -> Result<Self> {
        let unet_dir = model_dir.join("unet");
        let scheduler_dir = model_dir.join("scheduler");
        for (dir, what) in [(&unet_dir, "unet"), (&scheduler_dir, "scheduler")] {
            if !dir.is_dir() {
                return Err(Error::invalid(format!(
                    "{}: not a diffusers pixel pipeline folder: the `{what}/` component is missing",
                    model_dir.display()
                )));
            }
        }
        let config_path = unet_dir.join("config.json");
        let unet_config: UNet2DModelConfig = parse_config(&read_json_object(&config_path)?, &config_path)?;
        let files = find_weight_files(&unet_dir, "diffusion_pytorch_model", variant)?;
        let vb = var_builder(&files, DType::F32, device)?;
        let unet = UNet2DModel::new(vb, &unet_config).map_err(|e| e.in_weights_file(&files[0]))?;
        let scheduler = resolve_scheduler(&scheduler_dir, scheduler_name, scheduler_overrides)?;
        Ok(PixelPipeline { unet, unet_config, scheduler, model_dir: model_dir.to_path_buf(), device: device.clone() })
    }

    /// Checks options before any work is done, so bad input fails fast.
    pub fn validate(&self, options: &PixelOptions) -> Result<()> {
        if options.num_inference_steps == 0 {
            return Err(Error::invalid("`num_inference_steps` must be at least 1"));
        }
        if options.num_images == 0 {
            return Err(Error::invalid("`num_images` must be at least 1"));
        }
        // The batch's samples, counted without overflow before anything is allocated.
        let (height, width) = self.unet_config.sample_size.map(|s| s.height_width()).unwrap_or((1, 1));
        let bytes = [self.unet_config.in_channels, height, width, 4]
            .iter()
            .try_fold(options.num_images, |product, &n| product.checked_mul(n));
        if bytes.is_none_or(|bytes| bytes as u64 > 16 << 30) {
            return Err(Error::invalid(format!(
                "`num_images` {} is too large for this machine's memory ({}x{width}x{height} samples)",
                options.num_images, self.unet_config.in_channels
            )));
        }
        if !options.eta.is_finite() || options.eta < 0.0 {
            return Err(Error::invalid(format!("`eta` must be a finite number ≥ 0, got {}", options.eta)));
        }
        self.scheduler.scheduler.check_eta(options.eta)?;
        match (options.class_label, self.unet_config.num_class_embeds) {
            (Some(label), Some(n)) if label < 0 || label as usize >= n => Err(Error::invalid(format!(
                "`class_label` {label} is out of range: this model has {n} classes (0..{})",
                n - 1
            ))),
            (Some(_), None) if self.unet_config.class_embed_type.is_none() => Err(Error::invalid(
                "`class_label` given, but this model is unconditional (its UNet has no num_class_embeds)",
            )),
            _ => Ok(()),
        }
    }

    /// Runs the denoising loop and returns the final samples `[K, C, H, W]` in the model's
    /// range (about [-1, 1]). `on_step(i, n)` is called after each step.
    pub fn generate(
        &mut self,
        options: &PixelOptions,
        generator: &mut TorchGenerator,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<Tensor> {
        self.validate(options)?;
        let scheduler = &mut self.scheduler.scheduler;
        scheduler.set_timesteps(options.num_inference_steps)?;
        let size = self.unet_config.sample_size.map(|s| s.height_width()).ok_or_else(|| {
            Error::config(self.model_dir.join("unet/config.json"), "key `sample_size`: missing, so the image size is unknown")
        })?;
        let channels = self.unet_config.in_channels;
        let shape = [options.num_images, channels, size.0, size.1];
        let mut sample = (generator.randn_tensor(&shape, &self.device)? * scheduler.init_noise_sigma())?;
        let class_labels = match options.class_label {
            Some(label) => Some(Tensor::from_vec(vec![label; options.num_images], options.num_images, &self.device)?),
            None => None,
        };
        let split_variance = !scheduler_uses_learned_variance(&self.scheduler.class_name, &self.scheduler.config);
        let timesteps = scheduler.timesteps().to_vec();
        for (i, &t) in timesteps.iter().enumerate() {
            let model_input = scheduler.scale_model_input(&sample, t)?;
            let t_batch = Tensor::from_vec(vec![t as f32; options.num_images], options.num_images, &self.device)?;
            let mut model_output = self.unet.forward(&model_input, &t_batch, class_labels.as_ref())?;
            // A learned-variance model predicts 2C channels; only DDPM's learned variance
            // types read the second half (as diffusers' IF/DiT pipelines split it off).
            if split_variance && model_output.dim(1)? == 2 * channels {
                model_output = model_output.narrow(1, 0, channels)?;
            }
            sample = scheduler.step(&model_output, t, &sample, options.eta, generator)?;
            on_step(i + 1, timesteps.len());
        }
        Ok(sample)
    }
}

fn scheduler_uses_learned_variance(class_name: &str, config: &Map<String, Value>) -> bool {
    class_name == "DDPMScheduler"
        && matches!(config.get("variance_type").and_then(|v| v.as_str()), Some("learned" | "learned_range"))
}
