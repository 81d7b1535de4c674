//! Text to image, as diffusers' `StableDiffusionPipeline.from_pretrained(...)(prompt)`:
//!
//! ```sh
//! cargo run --release -p diffuse --example text_to_image -- [OUTPUT.png] [MODEL_FOLDER] [PROMPT]
//! ```
//!
//! Without a model folder it uses the built-in model (a small Fashion-MNIST text-to-image model,
//! 32×32, compiled into the library). A model is any Stable Diffusion 1.x/2.x/XL folder, single file or cached repo id.

use diffuse::pipelines::generation::{Flow, GenerationRequest, LoadOptions, StartFrom};
use diffuse::pipelines::stable_diffusion::{StableDiffusionPipeline, TextToImageOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let output = args.next().unwrap_or_else(|| "text_to_image.png".into());
    let model = match args.next() {
        Some(model) => model,
        // The built-in model's files are written to a cache folder once, then loaded from there.
        None => diffuse::default_model::materialize(&diffuse::default_model::cache_root())?.display().to_string(),
    };
    let prompt = args.next().unwrap_or_else(|| "a photo of a sneaker".into());

    // A folder, a single .safetensors file or a repo id in the Hugging Face cache; on the CPU in
    // f32 with the model's own scheduler (LoadOptions has the device, dtype, LoRAs, ...).
    let mut pipeline = StableDiffusionPipeline::from_pretrained(&model, &LoadOptions::default())?;
    let request = GenerationRequest {
        options: TextToImageOptions { prompt, num_inference_steps: 25, guidance_scale: 7.5, ..Default::default() },
        // The same seed gives the same image as diffusers with torch.Generator("cpu").manual_seed(42).
        seed: 42,
        start: StartFrom::Noise,
    };
    // Called after every step; returning Flow::Stop would end the run with Error::Interrupted.
    let mut on_step = |step, steps| {
        eprint!("\rstep {step}/{steps}");
        Flow::Continue
    };
    let generated = pipeline.run(&request, &mut on_step, &mut |warning| eprintln!("warning: {warning}"))?;
    eprintln!();
    generated.images[0].save(&output)?;
    println!("{output}");
    Ok(())
}
