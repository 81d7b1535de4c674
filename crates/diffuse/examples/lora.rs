//! A LoRA fused into the model as it loads, as diffusers' `load_lora_weights` + `fuse_lora`:
//! the digit LoRA this project trained on the built-in model (models/digit-lora/) turns its
//! clothes into handwritten digits. Files in diffusers/PEFT, kohya and the older attention-
//! processor formats all load the same way; a negative weight subtracts.
//!
//! ```sh
//! cargo run --release -p diffuse --example lora -- [OUTPUT.png] [LORA.safetensors] [WEIGHT]
//! ```

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use diffuse::lora::LoraSpec;
use diffuse::pipelines::stable_diffusion::{PhaseTimes, StableDiffusionPipeline, TextToImageOptions};
use diffuse::pipelines::to_rgb_images;
use diffuse::rng::TorchGenerator;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let output = PathBuf::from(args.next().unwrap_or_else(|| "lora.png".into()));
    let lora = args.next().map(PathBuf::from).unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/digit-lora/pytorch_lora_weights.safetensors")
    });
    let weight: f64 = args.next().map(|w| w.parse()).transpose()?.unwrap_or(1.0);

    let model = diffuse::default_model::materialize(&diffuse::default_model::cache_root())?;
    let spec = LoraSpec { path: lora, name: "digits".into(), unet_weight: weight, text_encoder_weight: weight };
    let mut pipeline = StableDiffusionPipeline::load_with_loras(&model, None, &[], None, &[spec], &Device::Cpu, DType::F32)?;
    for applied in &pipeline.loras {
        eprintln!("{}: {} UNet and {} text encoder layers fused", applied.spec.name, applied.unet_layers, applied.text_encoder_layers);
    }
    let options = TextToImageOptions { prompt: "a handwritten digit 3".into(), num_inference_steps: 30, ..Default::default() };
    let images = pipeline.generate(
        &options,
        &mut TorchGenerator::new(3),
        &mut |_, _| {},
        &mut |warning| eprintln!("warning: {warning}"),
        &mut PhaseTimes::default(),
    )?;
    to_rgb_images(&images)?[0].save(&output)?;
    println!("{}", output.display());
    Ok(())
}
