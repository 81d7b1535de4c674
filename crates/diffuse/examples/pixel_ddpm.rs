//! Unconditional (or class-conditional) sampling in pixel space, as diffusers' DDPMPipeline:
//! a UNet2DModel folder with its scheduler, here the tiny random one the parity tests use, with
//! DDIM in 20 steps instead of the folder's DDPM.
//!
//! ```sh
//! cargo run --release -p diffuse --example pixel_ddpm -- [OUTPUT.png] [MODEL_FOLDER]
//! ```

use std::path::{Path, PathBuf};

use candle_core::Device;
use diffuse::pipelines::pixel::{PixelOptions, PixelPipeline};
use diffuse::pipelines::to_rgb_images;
use diffuse::rng::TorchGenerator;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let output = PathBuf::from(args.next().unwrap_or_else(|| "pixel_ddpm.png".into()));
    let model = args.next().map(PathBuf::from).unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pixel/uncond"));

    let mut pipeline = PixelPipeline::load(&model, Some("ddim"), &[], None, &Device::Cpu)?;
    let options = PixelOptions { num_inference_steps: 20, num_images: 4, eta: 0.0, class_label: None };
    let samples = pipeline.generate(&options, &mut TorchGenerator::new(0), &mut |step, steps| eprint!("\rstep {step}/{steps}"))?;
    eprintln!();
    // The batch side by side in one image.
    let images = to_rgb_images(&samples)?;
    let (width, height) = images[0].dimensions();
    let mut row = image::RgbImage::new(width * images.len() as u32, height);
    for (i, tile) in images.iter().enumerate() {
        image::imageops::replace(&mut row, tile, i as i64 * width as i64, 0);
    }
    row.save(&output)?;
    println!("{}", output.display());
    Ok(())
}
