//! Inpainting: diffusers' StableDiffusionInpaintPipeline
//! (diffusers/pipelines/stable_diffusion/pipeline_stable_diffusion_inpaint.py), without
//! `padding_mask_crop`. Two kinds of UNet: inpainting models with 9 input channels see the
//! latents, the mask and the masked image's latents side by side; ordinary 4-channel models
//! repaint everything and, after each step, the kept region is put back from the init
//! image's latents noised to the next timestep.

use candle_core::{DType, Tensor};

use crate::pipelines::image_processor::{Image8, VaeImageProcessor};
use crate::pipelines::img2img::{strength_timesteps, ImageCondition};
use crate::pipelines::stable_diffusion::{DenoiseLoop, PromptEmbeddings, StableDiffusionPipeline, TextToImageOptions, TimeIdsFor};
use crate::rng::TorchGenerator;
use crate::schedulers::Scheduler;
use crate::Result;

impl StableDiffusionPipeline {
    /// StableDiffusionInpaintPipeline's steps after the prompt encoding. The generator is drawn
    /// from in diffusers' order: the init image's VAE sample (4-channel UNets, or strength
    /// below 1), the noise, then the masked image's VAE sample. `options` carries the final
    /// height and width.
    pub(crate) fn inpaint_latents(
        &mut self,
        options: &TextToImageOptions,
        condition: &ImageCondition,
        mask: &Image8,
        embeddings: &PromptEmbeddings,
        generator: &mut TorchGenerator,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<Tensor> {
        let (height, width) = (options.height, options.width);
        let factor = self.vae_scale_factor();
        let scheduler = &mut self.scheduler.scheduler;
        scheduler.set_timesteps(options.num_inference_steps)?;
        let timesteps = strength_timesteps(scheduler.as_mut(), options.num_inference_steps, condition.strength);
        let batch = options.num_images_per_prompt;
        let latent_timestep = vec![timesteps[0]; batch];
        let is_strength_max = condition.strength == 1.0;

        let processor = VaeImageProcessor::new(factor);
        let init_image = processor.preprocess(condition.image, height, width, &self.device)?;

        // prepare_latents
        let latent_channels = self.vae.latent_channels();
        let blend_each_step = self.unet_config.in_channels == latent_channels;
        let image_latents = if blend_each_step || !is_strength_max {
            Some(self.encode_image_latents(&init_image, generator)?.repeat((batch, 1, 1, 1))?)
        } else {
            None
        };
        let (_, _, image_height, image_width) = init_image.dims4()?;
        let shape = [batch, latent_channels, image_height / factor, image_width / factor];
        let noise = generator.randn_tensor(&shape, &self.device)?;
        let scheduler = &self.scheduler.scheduler;
        // Strength 1 starts from pure noise, scaled as text-to-image scales it (below 1 the
        // init image was encoded above).
        let latents = match image_latents.as_ref().filter(|_| !is_strength_max) {
            Some(image_latents) => scheduler.add_noise(image_latents, &noise, &latent_timestep)?,
            None => (&noise * scheduler.init_noise_sigma())?,
        };

        // prepare_mask_latents: the mask at the latent grid (nearest), the masked image's
        // latents (always encoded, so the generator advances even for 4-channel UNets).
        let mask_condition = processor.preprocess_mask(mask, height, width, &self.device)?;
        let masked_image = init_image.broadcast_mul(&mask_condition.lt(0.5f32)?.to_dtype(DType::F32)?)?;
        let mask = interpolate_nearest(&mask_condition, image_height / factor, image_width / factor)?.repeat((batch, 1, 1, 1))?;
        let masked_image_latents = self.encode_image_latents(&masked_image, generator)?.repeat((batch, 1, 1, 1))?;

        let do_guidance = self.do_classifier_free_guidance(options);
        let doubled = |t: &Tensor| -> Result<Tensor> {
            Ok(if do_guidance { Tensor::cat(&[t, t], 0)? } else { t.clone() })
        };
        let extra_channels =
            if blend_each_step { None } else { Some(Tensor::cat(&[doubled(&mask)?, doubled(&masked_image_latents)?], 1)?) };

        // The 4-channel blend: keep the unmasked region from the init image, noised to the
        // level of the next timestep (or clean after the last).
        let next_timesteps = timesteps.clone();
        let mut blend = |i: usize, latents: Tensor, scheduler: &dyn Scheduler| -> Result<Tensor> {
            let Some(image_latents) = image_latents.as_ref().filter(|_| blend_each_step) else {
                return Ok(latents);
            };
            let init_latents_proper = match next_timesteps.get(i + 1) {
                Some(&next) => scheduler.add_noise(image_latents, &noise, &[next])?,
                None => image_latents.clone(),
            };
            let kept = init_latents_proper.broadcast_mul(&mask.affine(-1.0, 1.0)?)?;
            Ok((kept + latents.broadcast_mul(&mask)?)?)
        };
        let run = DenoiseLoop { latents, timesteps, embeddings, extra_channels, time_ids_for: TimeIdsFor::Image };
        self.denoise_loop(run, options, &mut blend, generator, on_step)
    }
}

/// `torch.nn.functional.interpolate(x, size=(height, width))` (mode "nearest") of `[N, C, H, W]`:
/// output pixel i reads input pixel floor(i × in / out) (the scale in float32, as torch).
fn interpolate_nearest(x: &Tensor, height: usize, width: usize) -> Result<Tensor> {
    let (_, _, in_height, in_width) = x.dims4()?;
    let indices = |input: usize, output: usize| -> Result<Tensor> {
        let scale = input as f32 / output as f32;
        let index: Vec<u32> = (0..output).map(|i| ((i as f32 * scale).floor() as usize).min(input - 1) as u32).collect();
        Ok(Tensor::from_vec(index, output, x.device())?)
    };
    let rows = x.index_select(&indices(in_height, height)?, 2)?;
    Ok(rows.index_select(&indices(in_width, width)?, 3)?)
}
