//! One call from a request to images, as diffusers' `Pipeline.from_pretrained(...)` and
//! `pipe(prompt, ...)`: [`StableDiffusionPipeline::from_pretrained`] loads a folder, a single
//! file or a repo id in the Hugging Face cache with [`LoadOptions`]; [`StableDiffusionPipeline::run`]
//! takes a [`GenerationRequest`] (the options, the seed and where sampling starts: noise, an
//! init image with or without a mask, or latents) and returns RGB images, calling back after
//! every step with the progress; the callback's [`Flow::Stop`] ends the run with
//! [`Error::Interrupted`] within that step. The CLI and the server run every Stable Diffusion
//! request through it.
//!
//! ```no_run
//! use diffuse::pipelines::generation::{Flow, GenerationRequest, LoadOptions, StartFrom};
//! use diffuse::pipelines::stable_diffusion::{StableDiffusionPipeline, TextToImageOptions};
//!
//! let mut pipeline = StableDiffusionPipeline::from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5", &LoadOptions::default())?;
//! let request = GenerationRequest {
//!     options: TextToImageOptions { prompt: "a watercolor fox".into(), num_inference_steps: 25, ..Default::default() },
//!     seed: 42,
//!     start: StartFrom::Noise,
//! };
//! let generated = pipeline.run(&request, &mut |step, steps| { eprintln!("{step}/{steps}"); Flow::Continue }, &mut |_| {})?;
//! generated.images[0].save("fox.png")?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use crate::lora::LoraSpec;
use crate::pipelines::image_processor::Image8;
use crate::pipelines::img2img::{denoising_steps, ImageCondition};
use crate::pipelines::stable_diffusion::{PhaseTimes, StableDiffusionPipeline, TextToImageOptions};
use crate::pipelines::to_rgb_images;
use crate::rng::TorchGenerator;
use crate::{Error, Result};

/// How [`StableDiffusionPipeline::from_pretrained`] loads a model (diffusers' `from_pretrained`
/// arguments).
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// The device the models are loaded on and run on (diffusers' `.to(device)`).
    pub device: Device,
    /// The weights' type (f16 on the CPU is kept as bf16 or f32, whichever is faster there;
    /// activations stay f32 there).
    pub dtype: DType,
    /// `.VARIANT.safetensors` weight files (`fp16`) of a folder.
    pub variant: Option<String>,
    /// A repo id's branch, tag or commit.
    pub revision: Option<String>,
    /// A scheduler name (`crate::pipelines::SCHEDULER_NAMES`) instead of the model's own.
    pub scheduler: Option<String>,
    /// Scheduler config overrides, `(key, value)`.
    pub scheduler_overrides: Vec<(String, Value)>,
    /// What a single file's model predicts (`epsilon`, `v_prediction`), which its weights do
    /// not say; `None` is diffusers' default for its family.
    pub prediction_type: Option<String>,
    /// LoRAs fused into the weights as they load.
    pub loras: Vec<LoraSpec>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            device: Device::Cpu,
            dtype: DType::F32,
            variant: None,
            revision: None,
            scheduler: None,
            scheduler_overrides: Vec::new(),
            prediction_type: None,
            loras: Vec::new(),
        }
    }
}

/// Where the sampling loop starts.
#[derive(Clone, Debug)]
pub enum StartFrom {
    /// Text-to-image, from the generator's noise.
    Noise,
    /// Image-to-image, or inpainting with a mask (white is repainted); `strength` in [0, 1].
    Image {
        /// The init image (diffusers' `image`); the output has its size unless the options give
        /// one.
        image: Image8,
        /// The inpainting mask (diffusers' `mask_image`): white is repainted, black kept.
        mask: Option<Image8>,
        /// How much of the schedule is run (diffusers' `strength`): 0 keeps the image, 1
        /// repaints it from noise.
        strength: f64,
    },
    /// Given latents `[N, C, h, w]` (e.g. DDIM-inverted ones), as diffusers' `latents=`.
    Latents(Tensor),
}

impl StartFrom {
    fn condition(&self) -> Option<ImageCondition<'_>> {
        match self {
            StartFrom::Image { image, mask, strength } => Some(ImageCondition { image, mask: mask.as_ref(), strength: *strength }),
            _ => None,
        }
    }
}

/// One generation: the options (prompt, size, steps, guidance, ...), the seed of the one
/// `torch.Generator("cpu").manual_seed(seed)` the run draws from, and where it starts.
#[derive(Clone, Debug)]
pub struct GenerationRequest {
    /// The prompt, size, steps, guidance and the rest of diffusers' `__call__` arguments.
    pub options: TextToImageOptions,
    /// The seed of the generator (diffusers' `generator=torch.Generator("cpu").manual_seed(seed)`).
    pub seed: u64,
    /// What the sampling loop starts from: noise, an init image (and mask), or latents.
    pub start: StartFrom,
}

/// What a step callback tells the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    /// Go on to the next step.
    Continue,
    /// End the run now: it returns [`Error::Interrupted`] without finishing the step loop.
    Stop,
}

/// A finished run.
pub struct Generated {
    /// One RGB image per generated image.
    pub images: Vec<image::RgbImage>,
    /// The same images as a tensor `[N, 3, H, W]` in about [-1, 1].
    pub samples: Tensor,
    /// Seconds spent encoding the prompts, denoising and decoding.
    pub times: PhaseTimes,
}

impl StableDiffusionPipeline {
    /// Loads `model`: a diffusers folder, a single `.safetensors` checkpoint, or a Hugging Face
    /// repo id (found in the local cache; downloaded when missing with the `download` feature,
    /// unless `HF_HUB_OFFLINE=1`).
    pub fn from_pretrained(model: &str, options: &LoadOptions) -> Result<Self> {
        let path = crate::loading::hub::resolve_model(model, options.revision.as_deref(), options.variant.as_deref())?;
        let scheduler = options.scheduler.as_deref();
        let overrides = &options.scheduler_overrides;
        if path.is_file() {
            if options.variant.is_some() {
                return Err(Error::invalid(format!("a variant selects weight files in a folder; {model} is a single checkpoint file")));
            }
            let prediction = options.prediction_type.as_deref();
            return Self::load_single_file_with_loras(&path, prediction, scheduler, overrides, &options.loras, &options.device, options.dtype);
        }
        let mut overrides = overrides.clone();
        if let Some(prediction_type) = &options.prediction_type {
            overrides.push(("prediction_type".to_string(), Value::from(prediction_type.as_str())));
        }
        Self::load_with_loras(&path, scheduler, &overrides, options.variant.as_deref(), &options.loras, &options.device, options.dtype)
    }

    /// Checks `request` against this pipeline before any work is done; `warn` hears about
    /// what diffusers would do silently (inpainting at the model's size, a mask of another
    /// size than the image).
    pub fn validate_request(&self, request: &GenerationRequest, warn: &mut dyn FnMut(String)) -> Result<()> {
        let options = &request.options;
        match &request.start {
            StartFrom::Noise => {
                self.validate(options)?;
                self.check_text_to_image_unet()
            }
            StartFrom::Latents(latents) => {
                let (n, _, h, w) = latents.dims4()?;
                let factor = self.vae_scale_factor();
                let (height, width) = (h * factor, w * factor);
                if n != options.num_images_per_prompt {
                    return Err(Error::invalid(format!(
                        "the latents are for {n} image(s); the request asks for {}",
                        options.num_images_per_prompt
                    )));
                }
                if options.height.is_some_and(|v| v != height) || options.width.is_some_and(|v| v != width) {
                    return Err(Error::invalid(format!("the latents are for {width}x{height} images; the request asks for another size")));
                }
                self.validate(options)?;
                self.check_text_to_image_unet()
            }
            StartFrom::Image { image, mask, strength } => {
                let condition = ImageCondition { image, mask: mask.as_ref(), strength: *strength };
                let steps = options.num_inference_steps;
                // LCM's image-to-image schedules strength itself (its scheduler refuses what it cannot).
                let lcm = mask.is_none() && self.lcm_image_to_image();
                if !lcm && steps > 0 && options.denoising_start.is_none() && denoising_steps(steps, *strength) == 0 {
                    return Err(Error::invalid(format!(
                        "strength {strength} with {steps} steps runs no denoising step (it runs int(steps × strength) steps)"
                    )));
                }
                let (height, width) = self.validate_image_request(options, &condition)?;
                if let Some(mask) = mask {
                    if (mask.width, mask.height) != (image.width, image.height) {
                        warn(format!(
                            "the mask is {}x{} and the image {}x{}: both are resized to the output size, as diffusers does",
                            mask.width, mask.height, image.width, image.height
                        ));
                    }
                    let image_size = (image.height - image.height % 8, image.width - image.width % 8);
                    if options.height.is_none() && options.width.is_none() && image_size != (height, width) {
                        warn(format!(
                            "inpainting at the model's {width}x{height}, as diffusers does; the image is {}x{} (give a width and \
                             height to keep its shape)",
                            image.width, image.height
                        ));
                    }
                }
                Ok(())
            }
        }
    }

    /// Runs `request`: text-to-image, image-to-image, inpainting or from latents, as the
    /// matching diffusers pipeline. `on_step(step, steps)` is called after each denoising
    /// step; returning [`Flow::Stop`] ends the run with [`Error::Interrupted`].
    pub fn run(
        &mut self,
        request: &GenerationRequest,
        on_step: &mut dyn FnMut(usize, usize) -> Flow,
        warn: &mut dyn FnMut(String),
    ) -> Result<Generated> {
        self.validate_request(request, warn)?;
        // The callback's Stop is the pipeline's interrupt flag, set for this run (and an
        // interrupt flag the caller set keeps working).
        let outer = self.interrupt.take();
        let stop = Arc::new(AtomicBool::new(outer.as_ref().is_some_and(|flag| flag.load(Ordering::Relaxed))));
        self.interrupt = Some(stop.clone());
        let mut step = |i: usize, n: usize| {
            let outer_set = outer.as_ref().is_some_and(|flag| flag.load(Ordering::Relaxed));
            if on_step(i, n) == Flow::Stop || outer_set {
                stop.store(true, Ordering::Relaxed);
            }
        };
        let mut generator = TorchGenerator::new(request.seed);
        let mut times = PhaseTimes::default();
        let options = &request.options;
        let result = match &request.start {
            StartFrom::Image { .. } => {
                let condition = request.start.condition().ok_or_else(|| Error::invalid("an image start has an image"))?;
                self.generate_from_image(options, &condition, &mut generator, &mut step, warn, &mut times)
            }
            StartFrom::Latents(latents) => self.generate_from(options, Some(latents), &mut generator, &mut step, warn, &mut times),
            StartFrom::Noise => self.generate_from(options, None, &mut generator, &mut step, warn, &mut times),
        };
        self.interrupt = outer;
        let samples = result?;
        Ok(Generated { images: to_rgb_images(&samples)?, samples, times })
    }
}
