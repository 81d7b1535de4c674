//! diffuse: diffusion models in Rust on candle, numerically matching diffusers.
//!
//! Layers only look down (`tests/layers.rs` checks): [`ops`] (the CPU kernels behind tensor
//! functions) ← [`models`] (one file per diffusers model) ← [`prompts`], [`lora`] ←
//! [`pipelines`] (text-to-image, image-to-image, inpainting, inversion, pixel-space sampling) ←
//! [`training`] ← [`evaluation`], with [`schedulers`], [`loading`] (folders, the Hugging Face
//! cache, single-file checkpoints) and [`tokenizers`] beside the models, and [`error`],
//! [`files`], [`rng`] (PyTorch's CPU generator, bit for bit) and [`configs`] under everything.
//!
//! Text to image with the built-in model, as diffusers'
//! `StableDiffusionPipeline.from_pretrained(folder)(prompt)` (more in `examples/`):
//!
//! ```no_run
//! use candle_core::{DType, Device};
//! use diffuse::pipelines::stable_diffusion::{PhaseTimes, StableDiffusionPipeline, TextToImageOptions};
//! use diffuse::rng::TorchGenerator;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let folder = diffuse::default_model::materialize(&diffuse::default_model::cache_root())?;
//! let mut pipeline = StableDiffusionPipeline::load(&folder, None, &[], None, &Device::Cpu, DType::F32)?;
//! let options = TextToImageOptions { prompt: "a photo of a sneaker".into(), ..Default::default() };
//! let images = pipeline.generate(
//!     &options,
//!     &mut TorchGenerator::new(42),
//!     &mut |step, steps| eprintln!("step {step}/{steps}"),
//!     &mut |warning| eprintln!("warning: {warning}"),
//!     &mut PhaseTimes::default(),
//! )?;
//! diffuse::pipelines::to_rgb_images(&images)?[0].save("sneaker.png")?;
//! # Ok(())
//! # }
//! ```

pub mod configs;
pub mod default_model;
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
