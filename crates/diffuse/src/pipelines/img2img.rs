//! Image-to-image: diffusers' StableDiffusionImg2ImgPipeline
//! (diffusers/pipelines/stable_diffusion/pipeline_stable_diffusion_img2img.py), and for LCM
//! folders LatentConsistencyModelImg2ImgPipeline
//! (diffusers/pipelines/latent_consistency_models/pipeline_latent_consistency_img2img.py), which
//! differs only in letting LCMScheduler apply `strength` in `set_timesteps`. The init image is
//! encoded by the VAE (a latent sample drawn from the generator), noised to the timestep that
//! `strength` chooses, and denoised from there by the text-to-image loop.

use candle_core::{DType, Tensor};

use crate::pipelines::image_processor::{Image8, VaeImageProcessor};
use crate::pipelines::stable_diffusion::{
    DenoiseLoop, PhaseTimes, PromptEmbeddings, StableDiffusionPipeline, TextToImageOptions, TimeIdsFor,
};
use crate::rng::TorchGenerator;
use crate::schedulers::Scheduler;
use crate::{Error, Result};

/// What an image-to-image or inpainting request adds to text-to-image's options.
#[derive(Clone, Copy, Debug)]
pub struct ImageCondition<'a> {
    /// The init image (RGB).
    pub image: &'a Image8,
    /// Inpainting: white (≥ 0.5 after grayscale conversion) is repainted, black is kept.
    pub mask: Option<&'a Image8>,
    /// How much of the schedule runs, in [0, 1]: 1 starts from (almost) pure noise, 0 from
    /// the image itself (diffusers' default: 0.8 for image-to-image, 1.0 for inpainting).
    pub strength: f64,
}

/// diffusers' `get_timesteps`: `strength` keeps the last `min(int(steps × strength), steps)`
/// steps of the schedule (× the scheduler's order), and tells the scheduler where it starts.
pub fn strength_timesteps(scheduler: &mut dyn Scheduler, num_inference_steps: usize, strength: f64) -> Vec<f64> {
    let init_timestep = denoising_steps(num_inference_steps, strength);
    let t_start = num_inference_steps - init_timestep;
    let begin = (t_start * scheduler.order()).min(scheduler.timesteps().len());
    scheduler.set_begin_index(begin);
    scheduler.timesteps()[begin..].to_vec()
}

/// SDXL's `get_timesteps` with `denoising_start`: the steps below the cutoff timestep (one
/// more for a second-order scheduler when that count is even, so that no step is cut between
/// its two model calls), and the scheduler told where it starts.
pub fn denoising_start_timesteps(scheduler: &mut dyn Scheduler, cutoff: f64) -> Vec<f64> {
    let all = scheduler.timesteps().len();
    let mut count = scheduler.timesteps().iter().filter(|&&t| t < cutoff).count();
    if scheduler.order() == 2 && count.is_multiple_of(2) {
        count += 1;
    }
    let begin = all.saturating_sub(count);
    scheduler.set_begin_index(begin);
    scheduler.timesteps()[begin..].to_vec()
}

/// `min(int(steps × strength), steps)`: how many denoising steps `strength` leaves.
pub fn denoising_steps(num_inference_steps: usize, strength: f64) -> usize {
    ((num_inference_steps as f64 * strength) as usize).min(num_inference_steps)
}

impl StableDiffusionPipeline {
    /// Checks an image-to-image or inpainting request before any work is done: strength in
    /// [0, 1] and leaving at least one step, a UNet of the right kind, and a valid size.
    /// Returns (height, width): for image-to-image the requested size or the image's own,
    /// rounded down to a multiple of 8 (VaeImageProcessor); for inpainting the requested size
    /// or the UNet's default, as diffusers' StableDiffusionInpaintPipeline does.
    pub fn validate_image_request(&self, options: &TextToImageOptions, condition: &ImageCondition) -> Result<(usize, usize)> {
        let strength = condition.strength;
        if !(0.0..=1.0).contains(&strength) {
            return Err(Error::invalid(format!("strength must be in [0, 1], got {strength}")));
        }
        let steps = options.num_inference_steps;
        // (LCM's image-to-image lets its scheduler refuse what it cannot schedule.)
        if steps > 0 && denoising_steps(steps, strength) == 0 && !(condition.mask.is_none() && self.lcm_image_to_image()) {
            return Err(Error::invalid(format!("strength {strength} with {steps} steps runs no denoising step")));
        }
        // Given sizes must be multiples of 8, as for text-to-image (VaeImageProcessor would
        // round them down silently; inpainting's check_inputs refuses them).
        if [options.height, options.width].into_iter().flatten().any(|size| size == 0 || size % 8 != 0) {
            let show = |size: Option<usize>| size.map_or("(image)".to_string(), |v| v.to_string());
            return Err(Error::invalid(format!(
                "width and height must be positive multiples of 8, got {}x{}",
                show(options.width),
                show(options.height)
            )));
        }
        let latent_channels = self.vae.latent_channels();
        let in_channels = self.unet_config.in_channels;
        let (height, width) = match condition.mask {
            None => {
                if in_channels != latent_channels {
                    return Err(Error::invalid(format!(
                        "this UNet takes {in_channels} input channels (an inpainting model): image-to-image needs a mask"
                    )));
                }
                VaeImageProcessor::new(self.vae_scale_factor()).default_height_width(condition.image, options.height, options.width)?
            }
            Some(_) => {
                if in_channels != latent_channels && in_channels != 2 * latent_channels + 1 {
                    return Err(Error::invalid(format!(
                        "the UNet should have either {latent_channels} or {} input channels for inpainting, not {in_channels}",
                        2 * latent_channels + 1
                    )));
                }
                let (default_h, default_w) = self.default_size();
                (options.height.unwrap_or(default_h), options.width.unwrap_or(default_w))
            }
        };
        self.validate(&TextToImageOptions { height: Some(height), width: Some(width), ..options.clone() })
    }

    /// Whether image-to-image runs as LatentConsistencyModelImg2ImgPipeline (an LCM folder with
    /// its LCMScheduler: the scheduler applies `strength` in `set_timesteps`) rather than as
    /// StableDiffusionImg2ImgPipeline (the full schedule with its start skipped).
    pub fn lcm_image_to_image(&self) -> bool {
        self.pipeline_class == "LatentConsistencyModelPipeline" && self.scheduler.class_name == "LCMScheduler"
    }

    /// `retrieve_latents(vae.encode(image), generator) × scaling_factor` (a KL VAE's posterior
    /// sampled from the generator, a tiny one's latents as they are), for one image
    /// `[1, 3, H, W]`; float32 latents.
    pub fn encode_image_latents(&self, image: &Tensor, generator: &mut TorchGenerator) -> Result<Tensor> {
        let latents = self.vae.encode_latents(&image.to_dtype(self.vae_dtype())?, generator)?.to_dtype(DType::F32)?;
        Ok((latents * self.vae.scaling_factor())?)
    }

    /// Image-to-image (mask `None`) or inpainting: images `[N, 3, H, W]` in about [-1, 1].
    pub fn generate_from_image(
        &mut self,
        options: &TextToImageOptions,
        condition: &ImageCondition,
        generator: &mut TorchGenerator,
        on_step: &mut dyn FnMut(usize, usize),
        warn: &mut dyn FnMut(String),
        times: &mut PhaseTimes,
    ) -> Result<Tensor> {
        let (height, width) = self.validate_image_request(options, condition)?;
        let options = TextToImageOptions { height: Some(height), width: Some(width), ..options.clone() };
        let start = std::time::Instant::now();
        let embeddings = self.encode_prompt(&options, warn)?;
        times.text_encoding = start.elapsed().as_secs_f64();
        let start = std::time::Instant::now();
        let latents = match condition.mask {
            None => self.image_to_image_latents(&options, condition, &embeddings, generator, on_step)?,
            Some(mask) => self.inpaint_latents(&options, condition, mask, &embeddings, generator, on_step)?,
        };
        times.denoising = start.elapsed().as_secs_f64();
        let start = std::time::Instant::now();
        let images = self.decode_latents(&latents)?;
        times.decoding = start.elapsed().as_secs_f64();
        Ok(images)
    }

    /// StableDiffusionImg2ImgPipeline's steps after the prompt encoding: preprocess, timesteps
    /// from strength, `prepare_latents` (the VAE sample is drawn first, then the noise, from
    /// the one generator), and the loop. `options` carries the final height and width.
    fn image_to_image_latents(
        &mut self,
        options: &TextToImageOptions,
        condition: &ImageCondition,
        embeddings: &PromptEmbeddings,
        generator: &mut TorchGenerator,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<Tensor> {
        let processor = VaeImageProcessor::new(self.vae_scale_factor());
        let image = processor.preprocess(condition.image, options.height, options.width, &self.device)?;
        let timesteps = self.image_to_image_timesteps(options, condition.strength)?;
        let batch = options.num_images_per_prompt;
        let init_latents = self.encode_image_latents(&image, generator)?.repeat((batch, 1, 1, 1))?;
        self.denoise_init_latents(options, init_latents, timesteps, embeddings, generator, on_step)
    }

    /// The timesteps image-to-image runs: LCM's scheduler applies `strength` itself; SDXL's
    /// `denoising_start` starts at a fraction of the schedule; otherwise `strength` keeps the
    /// schedule's tail.
    fn image_to_image_timesteps(&mut self, options: &TextToImageOptions, strength: f64) -> Result<Vec<f64>> {
        let cutoff = options.denoising_start.map(|start| self.timestep_cutoff(start)).transpose()?;
        let lcm = self.lcm_image_to_image();
        let scheduler = &mut self.scheduler.scheduler;
        let timesteps = if lcm {
            scheduler.set_timesteps_with_strength(options.num_inference_steps, strength)?;
            scheduler.timesteps().to_vec()
        } else {
            scheduler.set_timesteps(options.num_inference_steps)?;
            match cutoff {
                Some(cutoff) => denoising_start_timesteps(scheduler.as_mut(), cutoff),
                None => strength_timesteps(scheduler.as_mut(), options.num_inference_steps, strength),
            }
        };
        if timesteps.is_empty() {
            return Err(Error::invalid(match options.denoising_start {
                Some(start) => format!("denoising start {start} leaves no timestep to denoise"),
                None => format!("strength {strength} leaves no timestep to denoise"),
            }));
        }
        Ok(timesteps)
    }

    /// `prepare_latents` after the VAE (noise drawn and added at the first timestep, unless
    /// `denoising_start` says the latents are already partly denoised), then the loop with
    /// SDXL's `denoising_end`.
    fn denoise_init_latents(
        &mut self,
        options: &TextToImageOptions,
        init_latents: Tensor,
        mut timesteps: Vec<f64>,
        embeddings: &PromptEmbeddings,
        generator: &mut TorchGenerator,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<Tensor> {
        let latents = match options.denoising_start {
            Some(_) => init_latents,
            None => {
                let noise = generator.randn_tensor(init_latents.dims(), &self.device)?;
                let latent_timestep = vec![timesteps[0]; init_latents.dim(0)?];
                self.scheduler.scheduler.add_noise(&init_latents, &noise, &latent_timestep)?
            }
        };
        if let Some(end) = options.denoising_end {
            if options.denoising_start.is_some_and(|start| start >= end) {
                return Err(Error::invalid(format!(
                    "the denoising start ({}) must be below the denoising end ({end})",
                    options.denoising_start.unwrap_or_default()
                )));
            }
            let cutoff = self.timestep_cutoff(end)?;
            timesteps.retain(|&t| t >= cutoff);
        }
        let run = DenoiseLoop { latents, timesteps, embeddings, extra_channels: None, time_ids_for: TimeIdsFor::Image };
        self.denoise_loop(run, options, &mut |_, latents, _| Ok(latents), generator, on_step)
    }

    /// The refiner's half of an SDXL base + refiner ensemble: image-to-image from the base's
    /// final latents `[N, 4, h, w]` (which it takes as they are: no VAE, no noise), starting at
    /// `options.denoising_start`; images `[N, 3, H, W]` in about [-1, 1].
    pub fn refine_latents(
        &mut self,
        options: &TextToImageOptions,
        latents: &Tensor,
        generator: &mut TorchGenerator,
        on_step: &mut dyn FnMut(usize, usize),
        warn: &mut dyn FnMut(String),
        times: &mut PhaseTimes,
    ) -> Result<Tensor> {
        if options.denoising_start.is_none() {
            return Err(Error::invalid("refining latents needs a denoising start (the fraction of the schedule the base ran)"));
        }
        let (batch, channels, height, width) = latents.dims4()?;
        if channels != self.unet_config.in_channels || batch != options.num_images_per_prompt {
            return Err(Error::invalid(format!(
                "the latents to refine have shape {:?}; this refiner takes [{}, {}, h, w]",
                latents.dims(),
                options.num_images_per_prompt,
                self.unet_config.in_channels
            )));
        }
        let factor = self.vae_scale_factor();
        let options = TextToImageOptions { height: Some(height * factor), width: Some(width * factor), ..options.clone() };
        self.validate(&options)?;
        let start = std::time::Instant::now();
        let embeddings = self.encode_prompt(&options, warn)?;
        times.text_encoding = start.elapsed().as_secs_f64();
        let start = std::time::Instant::now();
        let timesteps = self.image_to_image_timesteps(&options, 1.0)?;
        let latents = self.denoise_init_latents(&options, latents.to_dtype(DType::F32)?, timesteps, &embeddings, generator, on_step)?;
        times.denoising = start.elapsed().as_secs_f64();
        let start = std::time::Instant::now();
        let images = self.decode_latents(&latents)?;
        times.decoding = start.elapsed().as_secs_f64();
        Ok(images)
    }
}

/// SDXL's base + refiner ensemble (diffusers' "ensemble of expert denoisers"): the base runs
/// text-to-image for the first `switch` of the schedule (`denoising_end`), and the refiner
/// takes its latents from there (`denoising_start`), with the one generator; images `[N, 3, H,
/// W]` in about [-1, 1], decoded by the refiner's VAE.
pub fn generate_with_refiner(
    base: &mut StableDiffusionPipeline,
    refiner: &mut StableDiffusionPipeline,
    options: &TextToImageOptions,
    switch: f64,
    generator: &mut TorchGenerator,
    on_step: &mut dyn FnMut(usize, usize),
    warn: &mut dyn FnMut(String),
    times: &mut PhaseTimes,
) -> Result<Tensor> {
    if !base.is_xl() || !refiner.is_xl() {
        return Err(Error::invalid("a refiner works with an SDXL base and an SDXL refiner (UNets with addition_embed_type `text_time`)"));
    }
    let base_options = TextToImageOptions { denoising_end: Some(switch), denoising_start: None, ..options.clone() };
    base.validate(&base_options)?;
    let start = std::time::Instant::now();
    let embeddings = base.encode_prompt(&base_options, warn)?;
    let base_encoding = start.elapsed().as_secs_f64();
    let start = std::time::Instant::now();
    let latents = base.denoise(&base_options, &embeddings, generator, on_step)?;
    let base_denoising = start.elapsed().as_secs_f64();
    let refiner_options = TextToImageOptions { denoising_end: None, denoising_start: Some(switch), ..options.clone() };
    let images = refiner.refine_latents(&refiner_options, &latents, generator, on_step, warn, times)?;
    times.text_encoding += base_encoding;
    times.denoising += base_denoising;
    Ok(images)
}
