//! DDIM inversion as diffusers' StableDiffusionPix2PixZeroPipeline.invert does it
//! (diffusers/pipelines/deprecated/stable_diffusion_variants/pipeline_stable_diffusion_pix2pix_zero.py),
//! without its optional noise regularisation (`num_reg_steps=0`): the image's VAE latent
//! sample (from the generator, as `prepare_image_latents` draws it) × scaling_factor is run
//! up the schedule by DDIMInverseScheduler (configured from the pipeline's scheduler config),
//! with the prompt's embeddings and guidance 1 by default. Text-to-image with DDIM (eta 0)
//! and the same prompt, steps and guidance started from the result (diffusers' `latents=`)
//! gives the image back, up to the inversion's first-order error.
//!
//! Also the file format `diffuse invert` writes: a safetensors file with one `latents`
//! tensor and string metadata saying how it was made.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::pipelines::image_processor::{Image8, VaeImageProcessor};
use crate::pipelines::stable_diffusion::{DenoiseLoop, StableDiffusionPipeline, TextToImageOptions, TimeIdsFor};
use crate::rng::TorchGenerator;
use crate::schedulers;
use crate::{Error, Result};

/// The `format` metadata value of an inverted-latents file.
pub const LATENTS_FORMAT: &str = "diffuse-ddim-inverted-latents";

impl StableDiffusionPipeline {
    /// Inverts `image` (resized to `options.height`/`width` if given, else its own size
    /// rounded down to a multiple of 8) into DDIM latents `[1, 4, H/8, W/8]` over
    /// `options.num_inference_steps` steps, guided by `options.prompt` (and, with guidance
    /// above 1, the negative prompt). `num_images_per_prompt` must be 1.
    pub fn invert(
        &mut self,
        options: &TextToImageOptions,
        image: &Image8,
        generator: &mut TorchGenerator,
        on_step: &mut dyn FnMut(usize, usize),
        warn: &mut dyn FnMut(String),
    ) -> Result<Tensor> {
        if options.num_images_per_prompt != 1 {
            return Err(Error::invalid("inversion takes one image: `num_images_per_prompt` must be 1"));
        }
        let processor = VaeImageProcessor::new(self.vae_scale_factor());
        let (height, width) = processor.default_height_width(image, options.height, options.width)?;
        let options = TextToImageOptions { height: Some(height), width: Some(width), ..options.clone() };
        self.validate(&options)?;
        self.check_text_to_image_unet()?;
        let pixels = processor.preprocess(image, Some(height), Some(width), &self.device)?;
        let latents = self.encode_image_latents(&pixels, generator)?;
        let embeddings = self.encode_prompt(&options, warn)?;

        let config_path = self.model_dir.join("scheduler").join("scheduler_config.json");
        let mut inverse = schedulers::from_config("DDIMInverseScheduler", &self.scheduler.config, &config_path)?;
        inverse.set_timesteps(options.num_inference_steps)?;
        let timesteps = inverse.timesteps().to_vec();
        // Run the shared loop with the inverse scheduler in place of the pipeline's own.
        let forward = std::mem::replace(&mut self.scheduler.scheduler, inverse);
        let run = DenoiseLoop {
            latents,
            timesteps,
            embeddings: &embeddings,
            extra_channels: None,
            time_ids_for: TimeIdsFor::TextToImage,
        };
        let result = self.denoise_loop(run, &options, &mut |_, latents, _| Ok(latents), generator, on_step);
        self.scheduler.scheduler = forward;
        result
    }
}

/// Writes `latents` (as float32) and `metadata` to a safetensors file, first under a
/// temporary name beside it and then renamed, so that a failure leaves no partial file.
pub fn save_latents(path: &Path, latents: &Tensor, metadata: &[(&str, String)]) -> Result<()> {
    let latents = latents.to_dtype(DType::F32)?.contiguous()?;
    let values = latents.flatten_all()?.to_vec1::<f32>()?;
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, latents.dims().to_vec(), &bytes)
        .map_err(|e| Error::invalid(format!("{}: {e}", path.display())))?;
    let mut info: HashMap<String, String> = metadata.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
    info.insert("format".into(), LATENTS_FORMAT.into());
    let data = safetensors::serialize([("latents", view)], Some(info))
        .map_err(|e| Error::invalid(format!("{}: {e}", path.display())))?;
    crate::files::write_atomically(path, &data)
}

/// Reads a file `save_latents` wrote: the latents `[N, C, h, w]` (float32) and the metadata.
pub fn load_latents(path: &Path, device: &Device) -> Result<(Tensor, HashMap<String, String>)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let not_latents = |reason: String| Error::invalid(format!("{}: not a latents file from `diffuse invert`: {reason}", path.display()));
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| not_latents(e.to_string()))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| not_latents(e.to_string()))?;
    let view = tensors.tensor("latents").map_err(|_| not_latents("it has no `latents` tensor".into()))?;
    crate::loading::weights::check_shape(path, "latents", view.shape())?;
    if view.dtype() != safetensors::Dtype::F32 || view.shape().len() != 4 {
        return Err(not_latents(format!("`latents` is {:?} {:?}, expected float32 [N, C, h, w]", view.dtype(), view.shape())));
    }
    let values: Vec<f32> = view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    if values.iter().any(|v| !v.is_finite()) {
        return Err(not_latents("`latents` holds values that are not finite".into()));
    }
    Ok((Tensor::from_vec(values, view.shape(), device)?, metadata))
}
