//! What `diffuse generate` starts from besides noise: an init image (image-to-image, or
//! inpainting with a mask) or latents from `diffuse invert`. The flags, their checks, and
//! loading the files, all before any model is loaded.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use diffuse::pipelines::generation::StartFrom;
use diffuse::pipelines::image_processor::Image8;
use diffuse::pipelines::inversion::load_latents;
use diffuse::pipelines::stable_diffusion::StableDiffusionPipeline;

#[derive(clap::Args, Default)]
pub struct StartArgs {
    /// Start from this image (PNG or JPEG) instead of noise, as diffusers'
    /// StableDiffusionImg2ImgPipeline (Stable Diffusion models). Its size, rounded down to a
    /// multiple of 8, is the output size unless --width/--height resize it.
    #[arg(long, value_name = "FILE")]
    pub init_image: Option<PathBuf>,
    /// With --init-image: how much to change it, from 0 to 1 (the share of the steps that
    /// run). Default 0.8, or 1 with --mask, as in diffusers.
    #[arg(long)]
    pub strength: Option<f64>,
    /// With --init-image: inpaint, as StableDiffusionInpaintPipeline: white pixels are
    /// repainted, black ones kept. The image and mask are resized to --width x --height,
    /// by default the model's own size (512x512 for SD 1.5), as diffusers does.
    #[arg(long, value_name = "FILE")]
    pub mask: Option<PathBuf>,
    /// Start from these latents (a file from `diffuse invert`) instead of noise, as diffusers'
    /// `latents=` argument. Without --prompt, the prompt they were inverted with is used.
    #[arg(long, value_name = "FILE")]
    pub latents: Option<PathBuf>,
}

/// Where the sampling loop starts (the library's [`StartFrom`]), and for latents from `diffuse
/// invert` what the inversion recorded with them.
pub struct Start {
    pub from: StartFrom,
    pub inversion: HashMap<String, String>,
}

impl StartArgs {
    /// Whether any of these flags was given.
    pub fn any(&self) -> bool {
        self.init_image.is_some() || self.strength.is_some() || self.mask.is_some() || self.latents.is_some()
    }

    /// The strength a run with these flags uses (diffusers' defaults), if it has an init image.
    pub fn effective_strength(&self) -> Option<f64> {
        self.init_image.as_ref()?;
        Some(self.strength.unwrap_or(if self.mask.is_some() { 1.0 } else { 0.8 }))
    }

    /// Checks the combination and reads the files (the image, mask or latents), naming the
    /// file that cannot be read.
    pub fn load(&self, device: &Device) -> Result<Start> {
        if self.mask.is_some() && self.init_image.is_none() {
            bail!("--mask needs --init-image: the image to inpaint");
        }
        if self.strength.is_some() && self.init_image.is_none() {
            bail!("--strength needs --init-image");
        }
        if let Some(path) = &self.latents {
            if self.init_image.is_some() {
                bail!("--latents and --init-image are two different starting points: give one");
            }
            let (latents, inversion) = load_latents(path, device)?;
            return Ok(Start { from: StartFrom::Latents(latents), inversion });
        }
        let Some(image_path) = &self.init_image else {
            return Ok(Start::noise());
        };
        let strength = self.effective_strength().unwrap_or(0.8);
        if !(0.0..=1.0).contains(&strength) {
            bail!("--strength must be in [0, 1], got {strength}");
        }
        let image = Image8::load_rgb(image_path)?;
        let mask = match &self.mask {
            Some(path) => Some(Image8::load_rgb(path)?),
            None => None,
        };
        Ok(Start::image(image, mask, strength))
    }
}

impl Start {
    /// Text-to-image from noise.
    pub fn noise() -> Start {
        Start { from: StartFrom::Noise, inversion: HashMap::new() }
    }

    /// Image-to-image (or inpainting, with a mask) from images already decoded.
    pub fn image(image: Image8, mask: Option<Image8>, strength: f64) -> Start {
        Start { from: StartFrom::Image { image, mask, strength }, inversion: HashMap::new() }
    }
}

/// The image size that latents `[N, C, h, w]` make, checked against --height/--width and
/// --num-images.
pub fn latents_size(
    latents: &Tensor,
    pipeline: &StableDiffusionPipeline,
    height: Option<usize>,
    width: Option<usize>,
    num_images: usize,
) -> Result<(usize, usize)> {
    let (n, _, h, w) = latents.dims4()?;
    if n != num_images {
        bail!("--latents holds latents for {n} image(s); --num-images must be {n}");
    }
    let (latents_height, latents_width) = (h * pipeline.vae_scale_factor(), w * pipeline.vae_scale_factor());
    if height.is_some_and(|v| v != latents_height) || width.is_some_and(|v| v != latents_width) {
        bail!("--latents holds latents for {latents_width}x{latents_height} images; drop --width/--height or give those");
    }
    Ok((latents_height, latents_width))
}

/// How a run from inverted latents differs from the inversion (steps, sampler, guidance),
/// when it does: then it will not give the inverted image back.
pub fn inversion_mismatch(metadata: &HashMap<String, String>, steps: usize, guidance_scale: f64, scheduler: &str) -> Option<String> {
    let mut differences = Vec::new();
    if let Some(inverted) = metadata.get("steps").filter(|s| **s != steps.to_string()) {
        differences.push(format!("{steps} steps, inverted with {inverted}"));
    }
    if scheduler != "DDIMScheduler" {
        differences.push(format!("{scheduler}, not DDIM (--scheduler ddim)"));
    }
    if let Some(inverted) = metadata.get("guidance_scale").filter(|g| g.parse::<f64>().ok() != Some(guidance_scale)) {
        differences.push(format!("guidance {guidance_scale}, inverted with {inverted}"));
    }
    (!differences.is_empty())
        .then(|| format!("this run differs from the inversion ({}): it will not reconstruct the image", differences.join("; ")))
}
