//! Text to image, as diffusers' `StableDiffusionPipeline.from_pretrained(...)(prompt)`:
//!
//! ```sh
//! cargo run --release -p diffuse --example text_to_image -- [OUTPUT.png] [MODEL_FOLDER] [PROMPT]
//! ```
//!
//! Without a model folder it uses the built-in model (a small Fashion-MNIST text-to-image model,
//! 32×32, compiled into the library). A folder is any diffusers Stable Diffusion 1.x/2.x folder.

use std::path::PathBuf;

use candle_core::{DType, Device};
use diffuse::pipelines::stable_diffusion::{PhaseTimes, StableDiffusionPipeline, TextToImageOptions};
use diffuse::pipelines::to_rgb_images;
use diffuse::rng::TorchGenerator;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let output = PathBuf::from(args.next().unwrap_or_else(|| "text_to_image.png".into()));
    let model = match args.next() {
        Some(folder) => PathBuf::from(folder),
        // The built-in model's files are written to a cache folder once, then loaded from there.
        None => diffuse::default_model::materialize(&diffuse::default_model::cache_root())?,
    };
    let prompt = args.next().unwrap_or_else(|| "a photo of a sneaker".into());

    // The folder's own scheduler (None), no scheduler overrides, no weight variant.
    let mut pipeline = StableDiffusionPipeline::load(&model, None, &[], None, &Device::Cpu, DType::F32)?;
    let options = TextToImageOptions { prompt, num_inference_steps: 25, guidance_scale: 7.5, ..Default::default() };
    // The same seed gives the same image as diffusers with torch.Generator("cpu").manual_seed(42).
    let mut generator = TorchGenerator::new(42);
    let images = pipeline.generate(
        &options,
        &mut generator,
        &mut |step, steps| eprint!("\rstep {step}/{steps}"),
        &mut |warning| eprintln!("warning: {warning}"),
        &mut PhaseTimes::default(),
    )?;
    eprintln!();
    to_rgb_images(&images)?[0].save(&output)?;
    println!("{}", output.display());
    Ok(())
}
