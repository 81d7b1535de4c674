//! Image to image and inpainting, as diffusers' StableDiffusionImg2ImgPipeline and
//! StableDiffusionInpaintPipeline: an image is made from a prompt, then redrawn from another
//! prompt (strength 0.6: the last 60 % of the schedule), then its right half repainted.
//!
//! ```sh
//! cargo run --release -p diffuse --example image_to_image -- [OUTPUT_FOLDER]
//! ```
//!
//! Runs on the built-in model (32×32); any Stable Diffusion folder works the same way.

use std::path::PathBuf;

use candle_core::{DType, Device};
use diffuse::pipelines::image_processor::Image8;
use diffuse::pipelines::img2img::ImageCondition;
use diffuse::pipelines::stable_diffusion::{PhaseTimes, StableDiffusionPipeline, TextToImageOptions};
use diffuse::pipelines::{to_rgb_images, to_uint8_images};
use diffuse::rng::TorchGenerator;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| ".".into()));
    let model = diffuse::default_model::materialize(&diffuse::default_model::cache_root())?;
    let mut pipeline = StableDiffusionPipeline::load(&model, None, &[], None, &Device::Cpu, DType::F32)?;
    let mut generator = TorchGenerator::new(7);
    let mut on_step = |_step: usize, _steps: usize| {};
    let mut warn = |warning: String| eprintln!("warning: {warning}");
    let options = |prompt: &str| TextToImageOptions { prompt: prompt.into(), num_inference_steps: 30, ..Default::default() };

    let first = pipeline.generate(&options("a photo of a sneaker"), &mut generator, &mut on_step, &mut warn, &mut PhaseTimes::default())?;
    let (width, height, _, pixels) = to_uint8_images(&first)?.swap_remove(0);
    let sneaker = Image8 { width, height, channels: 3, pixels };

    // Image to image: the sneaker redrawn as a boot.
    let condition = ImageCondition { image: &sneaker, mask: None, strength: 0.6 };
    let boot = pipeline.generate_from_image(&options("an ankle boot"), &condition, &mut generator, &mut on_step, &mut warn, &mut PhaseTimes::default())?;

    // Inpainting: white in the mask is repainted, black kept.
    let mask = Image8 {
        width,
        height,
        channels: 1,
        pixels: (0..width * height).map(|i| if i % width >= width / 2 { 255 } else { 0 }).collect(),
    };
    let condition = ImageCondition { image: &sneaker, mask: Some(&mask), strength: 1.0 };
    let repainted = pipeline.generate_from_image(&options("a bag"), &condition, &mut generator, &mut on_step, &mut warn, &mut PhaseTimes::default())?;

    for (name, images) in [("sneaker", &first), ("boot", &boot), ("repainted", &repainted)] {
        let path = out.join(format!("{name}.png"));
        to_rgb_images(images)?[0].save(&path)?;
        println!("{}", path.display());
    }
    Ok(())
}
