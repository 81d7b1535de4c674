//! Training a tiny class-conditional pixel-space model from scratch, as diffusers'
//! `train_unconditional.py` does for a UNet2DModel, then sampling it as a DDPMPipeline.
//!
//! The data is made here: 16×16 gray images of two classes in sub-folders (the folder names
//! are the labels), bars across and bars down. Two hundred steps of the `tiny` preset take
//! about a minute in a release build and are enough to see the two classes apart.
//!
//! ```sh
//! cargo run --release -p diffuse --example train_tiny -- [OUTPUT_FOLDER] [STEPS]
//! ```

use std::ops::ControlFlow;
use std::path::PathBuf;

use candle_core::Device;
use diffuse::pipelines::pixel::{PixelOptions, PixelPipeline};
use diffuse::pipelines::to_rgb_images;
use diffuse::rng::TorchGenerator;
use diffuse::training::recipe::{run, ModelKind, TrainingRecipe};
use diffuse::training::{Hooks, TrainConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let output = PathBuf::from(args.next().unwrap_or_else(|| "train_tiny".into()));
    let steps: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(200);

    // 32 images per class, the bars at every offset.
    let data = output.join("data");
    for (class, across) in [("across", true), ("down", false)] {
        std::fs::create_dir_all(data.join(class))?;
        for i in 0..32u32 {
            let image = image::GrayImage::from_fn(16, 16, |x, y| {
                let along = if across { y } else { x };
                image::Luma([if (along + i) % 4 < 2 { 230 } else { 20 }])
            });
            image.save(data.join(class).join(format!("{i:02}.png")))?;
        }
    }

    // What to train: a class-conditional UNet2DModel, the `tiny` preset, at the data's size.
    let mut recipe = TrainingRecipe::new(ModelKind::Pixel, &data);
    recipe.model_config = Some("tiny".into());
    recipe.pixel.class_conditional = true;
    // The loop: a short run, so a quick warm-up and no EMA (it would average in the first,
    // untrained weights).
    let model = output.join("model");
    let config = TrainConfig { steps, batch_size: 16, learning_rate: 1e-3, warmup_steps: 20, ema: None, ..TrainConfig::new(&model) };
    let mut hooks = Hooks {
        on_progress: Box::new(|p| {
            if p.step % 20 == 0 || p.step == p.total_steps {
                eprintln!("step {}/{}: loss {:.4}", p.step, p.total_steps, p.loss);
            }
            ControlFlow::Continue(()) // ControlFlow::Break(()) would stop here
        }),
        on_message: Box::new(|text| eprintln!("{text}")),
        ..Hooks::default()
    };
    run(&recipe, &config, &mut hooks, &Device::Cpu)?;

    // The export is a DDPMPipeline folder: four samples of each class in 25 DDIM steps.
    let mut pipeline = PixelPipeline::load(&model, Some("ddim"), &[], None, &Device::Cpu)?;
    let mut row = image::RgbImage::new(16 * 4, 16 * 2);
    for label in 0..2u32 {
        let options = PixelOptions { num_inference_steps: 25, num_images: 4, eta: 0.0, class_label: Some(label as i64) };
        let samples = pipeline.generate(&options, &mut TorchGenerator::new(label as u64), &mut |_, _| {})?;
        for (i, tile) in to_rgb_images(&samples)?.iter().enumerate() {
            image::imageops::replace(&mut row, tile, 16 * i as i64, 16 * label as i64);
        }
    }
    let grid = output.join("samples.png");
    row.save(&grid)?;
    println!("{}", grid.display());
    Ok(())
}
