//! `diffuse invert`: DDIM inversion of an image into the latents that text-to-image with DDIM
//! (eta 0, the same prompt, steps and guidance) turns back into it; written as a safetensors
//! file for `diffuse generate --latents`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use diffuse::loading::config::parse_override;
use diffuse::pipelines::image_processor::Image8;
use diffuse::pipelines::inversion::save_latents;
use diffuse::pipelines::stable_diffusion::{is_stable_diffusion_folder, StableDiffusionPipeline, TextToImageOptions};
use diffuse::rng::TorchGenerator;

use crate::generate::{parse_dtype, progress_bar};

#[derive(clap::Args)]
pub struct InvertArgs {
    /// The Stable Diffusion model: a diffusers pipeline folder, a single-file checkpoint or a
    /// Hugging Face repo id in the local cache (as for `generate`).
    #[arg(long)]
    model: String,
    /// For a single-file checkpoint: what the model predicts (as for `generate`).
    #[arg(long)]
    prediction_type: Option<String>,
    /// With a repo id: the branch, tag or commit to use.
    #[arg(long)]
    revision: Option<String>,
    /// The image to invert (PNG or JPEG). Its size, rounded down to a multiple of 8, is kept
    /// unless --width/--height resize it.
    #[arg(long, value_name = "FILE")]
    image: PathBuf,
    /// A prompt describing the image (the empty prompt is valid).
    #[arg(long, default_value = "")]
    prompt: String,
    /// The negative prompt, used when guidance is above 1.
    #[arg(long)]
    negative_prompt: Option<String>,
    /// Guidance scale; 1 (no guidance) inverts most faithfully.
    #[arg(long, default_value_t = 1.0)]
    guidance_scale: f64,
    /// Number of DDIM steps; regenerate with the same number.
    #[arg(long, default_value_t = 50)]
    steps: usize,
    /// Seed of the generator the VAE's latent sample is drawn from.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Resize the image to this width first (a multiple of 8).
    #[arg(long)]
    width: Option<usize>,
    /// Resize the image to this height first (a multiple of 8).
    #[arg(long)]
    height: Option<usize>,
    /// Override a key of the model's scheduler config, which configures DDIMInverseScheduler
    /// (KEY=VALUE, repeatable; e.g. timestep_spacing=trailing).
    #[arg(long = "scheduler-config", value_name = "KEY=VALUE")]
    scheduler_config: Vec<String>,
    /// Weight precision: f32, f16 or bf16 (as `diffuse generate --dtype`).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Load the `.VARIANT.safetensors` weight files (e.g. fp16).
    #[arg(long)]
    variant: Option<String>,
    /// No progress bar or summary on stderr.
    #[arg(long)]
    quiet: bool,
    /// Where to write the latents (.safetensors).
    #[arg(long)]
    output: PathBuf,
}

pub fn run(args: InvertArgs) -> Result<()> {
    invert(args).map_err(|e| crate::name_flags(e, crate::generate::FLAGS))
}

fn invert(args: InvertArgs) -> Result<()> {
    let output = &args.output;
    if output.extension().and_then(|e| e.to_str()).map(|e| e.eq_ignore_ascii_case("safetensors")) != Some(true) {
        bail!("--output {} must end in .safetensors", output.display());
    }
    let parent = output.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !parent.is_dir() {
        bail!("--output {}: the folder {} does not exist", output.display(), parent.display());
    }
    if args.steps == 0 {
        bail!("--steps must be at least 1");
    }
    let mut overrides = args
        .scheduler_config
        .iter()
        .map(|s| parse_override(s).with_context(|| "--scheduler-config".to_string()))
        .collect::<Result<Vec<_>>>()?;
    let image = Image8::load_rgb(&args.image)?;
    let device = crate::device();
    let dtype = parse_dtype(&args.dtype, &device)?;
    let model_path = diffuse::loading::hub::resolve_model(&args.model, args.revision.as_deref(), args.variant.as_deref())?;
    let start = Instant::now();
    let mut pipeline = if model_path.is_file() {
        StableDiffusionPipeline::load_single_file(&model_path, args.prediction_type.as_deref(), None, &overrides, &device, dtype)?
    } else if model_path.is_dir() && is_stable_diffusion_folder(&model_path) {
        if let Some(prediction_type) = &args.prediction_type {
            overrides.push(("prediction_type".to_string(), serde_json::Value::from(prediction_type.as_str())));
        }
        StableDiffusionPipeline::load(&model_path, None, &overrides, args.variant.as_deref(), &device, dtype)?
    } else {
        bail!("--model {}: not a Stable Diffusion model (a folder with text_encoder/, unet/, vae/, or a checkpoint file)", args.model);
    };
    let options = TextToImageOptions {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative_prompt.clone(),
        num_inference_steps: args.steps,
        guidance_scale: args.guidance_scale,
        height: args.height,
        width: args.width,
        ..TextToImageOptions::default()
    };
    let bar = progress_bar(args.steps, args.quiet);
    bar.set_message("inverting");
    let quiet = args.quiet;
    let latents = pipeline.invert(
        &options,
        &image,
        &mut TorchGenerator::new(args.seed),
        &mut |i, n| {
            bar.set_length(n as u64);
            bar.set_position(i as u64);
        },
        &mut |warning| {
            if !quiet {
                bar.suspend(|| eprintln!("warning: {warning}"));
            }
        },
    )?;
    bar.finish_and_clear();
    let (_, _, h, w) = latents.dims4()?;
    let factor = pipeline.vae_scale_factor();
    let image_name = args.image.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut metadata = vec![
        ("model", args.model.clone()),
        ("image", image_name),
        ("prompt", args.prompt.clone()),
        ("steps", args.steps.to_string()),
        ("guidance_scale", args.guidance_scale.to_string()),
        ("seed", args.seed.to_string()),
        ("width", (w * factor).to_string()),
        ("height", (h * factor).to_string()),
        ("scheduler", "DDIMInverseScheduler".to_string()),
        ("scheduler_config", serde_json::Value::Object(pipeline.scheduler.config.clone()).to_string()),
    ];
    if let Some(negative) = &args.negative_prompt {
        metadata.push(("negative_prompt", negative.clone()));
    }
    save_latents(output, &latents, &metadata)?;
    outln!("{}", output.display());
    if !args.quiet {
        let overrides: String = args.scheduler_config.iter().map(|o| format!(" --scheduler-config {o}")).collect();
        eprintln!(
            "inverted {}x{} in {} steps, {:.2}s; regenerate with: diffuse generate --model {} --latents {} --scheduler ddim{overrides} --steps {} --guidance-scale {} --output OUT.png",
            w * factor,
            h * factor,
            args.steps,
            start.elapsed().as_secs_f64(),
            args.model,
            output.display(),
            args.steps,
            args.guidance_scale
        );
    }
    Ok(())
}
