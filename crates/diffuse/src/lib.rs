//! diffuse: diffusion models in Rust on candle, numerically matching diffusers.
//!
//! Layers only look down (`tests/layers.rs` checks): [`ops`] (the CPU kernels behind tensor
//! functions) ← [`models`] (one file per diffusers model) ← [`prompts`], [`lora`] ←
//! [`pipelines`] (text-to-image, image-to-image, inpainting, inversion, pixel-space sampling) ←
//! [`training`] ← [`evaluation`], with [`schedulers`], [`loading`] (folders, the Hugging Face
//! cache, single-file checkpoints) and [`tokenizers`] beside the models, and [`error`],
//! [`files`], [`rng`] (PyTorch's CPU generator, bit for bit), [`configs`] and [`device`]
//! (devices by name: `cpu`, `cuda:N`, `metal`) under everything.
//!
//! Text to image with the built-in model, as diffusers'
//! `StableDiffusionPipeline.from_pretrained(folder)(prompt)` ([`pipelines::generation`]; more in
//! `examples/`):
//!
//! ```no_run
//! use diffuse::pipelines::generation::{Flow, GenerationRequest, LoadOptions, StartFrom};
//! use diffuse::pipelines::stable_diffusion::{StableDiffusionPipeline, TextToImageOptions};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // A folder, a single .safetensors file or a repo id in the Hugging Face cache.
//! let folder = diffuse::default_model::materialize(&diffuse::default_model::cache_root())?;
//! let mut pipeline = StableDiffusionPipeline::from_pretrained(&folder.to_string_lossy(), &LoadOptions::default())?;
//! let request = GenerationRequest {
//!     options: TextToImageOptions { prompt: "a photo of a sneaker".into(), ..Default::default() },
//!     seed: 42, // torch.Generator("cpu").manual_seed(42)
//!     start: StartFrom::Noise, // or an init image (and mask), or latents
//! };
//! // After every step; Flow::Stop ends the run with Error::Interrupted.
//! let mut on_step = |step, steps| { eprintln!("step {step}/{steps}"); Flow::Continue };
//! let generated = pipeline.run(&request, &mut on_step, &mut |warning| eprintln!("warning: {warning}"))?;
//! generated.images[0].save("sneaker.png")?; // image::RgbImage
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

pub mod configs;
pub mod default_model;
pub mod device;
pub mod error;
pub mod evaluation;
pub mod files;
pub mod loading;
pub mod lora;
pub mod models;
pub mod ops;
pub mod pipelines;
pub mod prompts;
pub mod rng;
pub mod schedulers;
pub mod tokenizers;
pub mod training;

pub use error::{Error, Result};
