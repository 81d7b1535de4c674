//! `diffuse generate`: text-to-image with Stable Diffusion folders, and unconditional or
//! class-conditional sampling with pixel-space DDPM folders. Every PNG carries its parameters
//! (AUTOMATIC1111's infotext; see generate/parameters.rs, which also implements `--from`).
//! LoRAs (`--lora`, `<lora:...>` prompt tags): generate/loras.rs.

pub(crate) mod loras;
pub(crate) mod parameters;
pub(crate) mod xl;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::ArgMatches;
use diffuse::loading::config::parse_override;
use diffuse::pipelines::pixel::{PixelOptions, PixelPipeline};
use diffuse::pipelines::stable_diffusion::{
    is_stable_diffusion_folder, is_xl_pipeline_class, pipeline_class_name, PhaseTimes, PreviewSink, StableDiffusionPipeline,
    StepPreview, TextToImageOptions, LCM_PIPELINE_DEFAULTS, SDXL_PIPELINE_DEFAULTS,
};
use diffuse::pipelines::{to_uint8_images, write_png};
use diffuse::prompts::PromptSyntax;
use diffuse::rng::TorchGenerator;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::start::{self, Start, StartArgs};
use diffuse::pipelines::generation::{Flow, GenerationRequest, StartFrom};
use diffuse::pipelines::img2img::generate_with_refiner;

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// The model: a diffusers pipeline folder (Stable Diffusion: tokenizer/, text_encoder/,
    /// unet/, vae/, scheduler/; pixel-space DDPM: unet/, scheduler/), a single-file SD 1.x/2.x
    /// checkpoint (FILE.safetensors, original layout), or a Hugging Face repo id (ORG/NAME)
    /// found in the local Hugging Face cache (downloaded when missing, unless HF_HUB_OFFLINE=1).
    /// With --from, defaults to the image's model when that is a repo id (taken from the cache
    /// only, unless --allow-download). Without --model, the
    /// built-in default model: a small text-to-image model trained by this project on
    /// Fashion-MNIST (32×32; prompts such as "a photo of a sneaker", "an ankle boot", "a bag").
    #[arg(long)]
    pub(crate) model: Option<String>,
    /// What the model predicts: epsilon, v_prediction (SD 2.x 768-px models) or sample. A
    /// single file does not say; its default is diffusers' (v_prediction for SD 2.x but
    /// inpainting, else epsilon). With a folder, it overrides the scheduler config.
    #[arg(long)]
    pub(crate) prediction_type: Option<String>,
    /// With a repo id: the branch, tag or commit to use.
    #[arg(long)]
    pub(crate) revision: Option<String>,
    /// The text prompt (Stable Diffusion models). An empty prompt is valid.
    #[arg(long)]
    pub(crate) prompt: Option<String>,
    /// What the image should not look like (used when guidance is on).
    #[arg(long)]
    pub(crate) negative_prompt: Option<String>,
    /// Classifier-free guidance scale; 1 or less turns guidance off (one UNet pass per step).
    /// LCM-distilled UNets embed it instead (one pass per step always; default 8.5 for a
    /// LatentConsistencyModelPipeline folder, as diffusers). Default 5 for SDXL folders.
    #[arg(long, default_value_t = 7.5)]
    pub(crate) guidance_scale: f64,
    /// Guidance rescale (Lin et al. 2023), 0 to 1; helps zero-terminal-SNR models.
    #[arg(long, default_value_t = 0.0)]
    pub(crate) guidance_rescale: f64,
    /// Image width in pixels, a multiple of 8 (default: the UNet's sample_size × 8).
    #[arg(long)]
    pub(crate) width: Option<usize>,
    /// Image height in pixels, a multiple of 8 (default: the UNet's sample_size × 8).
    #[arg(long)]
    pub(crate) height: Option<usize>,
    /// Use an earlier CLIP layer as diffusers' clip_skip does (1 = the penultimate layer,
    /// which AUTOMATIC1111 calls "Clip skip: 2").
    #[arg(long)]
    pub(crate) clip_skip: Option<usize>,
    /// How prompts are read: `diffusers` (truncated to CLIP's 77 tokens, with a warning) or
    /// `a1111`, the AUTOMATIC1111 web UI's: weights ((word) ×1.1, [word] ÷1.1, (word:1.3)),
    /// BREAK, and prompts of any length in 75-token chunks.
    #[arg(long, default_value = "diffusers", value_parser = PromptSyntax::NAMES)]
    pub(crate) prompt_syntax: String,
    /// A LoRA to fuse into the UNet and text encoder: a .safetensors file in the diffusers/PEFT,
    /// kohya or diffusers attention-processor format, with an optional weight (default 1;
    /// negative weights subtract). Repeatable: LoRAs stack, in order.
    #[arg(long = "lora", value_name = "FILE[:WEIGHT]")]
    pub(crate) lora: Vec<String>,
    /// Where `<lora:NAME:WEIGHT>` tags in the prompt (--prompt-syntax a1111; also
    /// `<lora:NAME:TE_WEIGHT:UNET_WEIGHT>`) find NAME.safetensors.
    #[arg(long, value_name = "DIR")]
    pub(crate) lora_dir: Option<PathBuf>,
    /// Replace the model's VAE with this autoencoder folder: an AutoencoderKL (e.g. an fp16-fixed
    /// or fine-tuned VAE) or an AutoencoderTiny (TAESD: a fraction of the decode time), as
    /// diffusers' `vae=`; or a repo id (madebyollin/taesd) already in the Hugging Face cache.
    /// Its latent channels must match the UNet's.
    #[arg(long, value_name = "DIR")]
    pub(crate) vae: Option<PathBuf>,
    /// Encode and decode in overlapping tiles, blended (diffusers' `enable_tiling()`: tiles of
    /// the VAE's sample_size, 1/4 overlap; TAESD: 512-pixel tiles): large images in bounded
    /// memory, at the cost of slightly different pixels.
    #[arg(long)]
    pub(crate) vae_tiling: bool,
    /// Decode a batch one image at a time (diffusers' `enable_slicing()`): less memory for
    /// --num-images, the same images.
    #[arg(long)]
    pub(crate) vae_slicing: bool,
    /// Weight precision: f32, f16 or bf16. On the CPU, bf16 halves the weights' memory (bf16
    /// products, f32 sums; activations, norms and softmax stay f32) and, on a CPU with
    /// AVX512-BF16, runs the matrix products about twice as fast as f32; without it the bf16
    /// values are widened for f32 arithmetic, slower than f32. f16 is computed as whichever is
    /// faster on this CPU: bf16 with AVX512-BF16, f32 otherwise.
    #[arg(long, default_value = "f32")]
    pub(crate) dtype: String,
    /// Sampler to use instead of the folder's own (see `diffuse schedulers`).
    #[arg(long)]
    pub(crate) scheduler: Option<String>,
    /// Override a scheduler config key, as KEY=VALUE with VALUE a JSON literal or a bare
    /// string (e.g. timestep_spacing=trailing, rescale_betas_zero_snr=true). Repeatable.
    #[arg(long = "scheduler-config", value_name = "KEY=VALUE")]
    pub(crate) scheduler_config: Vec<String>,
    /// Number of denoising steps (default 4 for a LatentConsistencyModelPipeline folder or an
    /// LCM-distilled single file).
    #[arg(long, default_value_t = 50)]
    pub(crate) steps: usize,
    /// Random seed (as torch.manual_seed); chosen at random and printed when omitted.
    #[arg(long)]
    pub(crate) seed: Option<u64>,
    /// DDIM's eta (0 is deterministic, 1 is DDPM-like) and TCD's gamma (default 0.3,
    /// TCDScheduler.step's own; 0 otherwise). Other schedulers ignore it.
    #[arg(long)]
    pub(crate) eta: Option<f64>,
    /// Class to generate, for class-conditional pixel-space models.
    #[arg(long)]
    pub(crate) class_label: Option<i64>,
    /// Number of images, drawn as one batch from one generator as diffusers draws them.
    /// With more than one, files are named FILE-0.png, FILE-1.png, ...
    #[arg(long, default_value_t = 1)]
    pub(crate) num_images: usize,
    #[command(flatten)]
    pub(crate) start: StartArgs,
    #[command(flatten)]
    pub(crate) xl: xl::XlArgs,
    /// Load the `.VARIANT.safetensors` weight files (e.g. fp16).
    #[arg(long)]
    pub(crate) variant: Option<String>,
    /// No progress bar or summary on stderr.
    #[arg(long)]
    pub(crate) quiet: bool,
    /// Output PNG path.
    #[arg(long)]
    pub(crate) output: PathBuf,
    /// Write a live preview to this PNG after every denoising step (replaced atomically): the
    /// x₀ the model predicts at that step, decoded by --preview-vae (or the model's own VAE);
    /// the batch side by side.
    #[arg(long, value_name = "FILE.png")]
    pub(crate) preview: Option<PathBuf>,
    /// The autoencoder folder that decodes previews: a TAESD (AutoencoderTiny) costs little per
    /// step. Default: the model's VAE (or --vae).
    #[arg(long, value_name = "DIR", requires = "preview")]
    pub(crate) preview_vae: Option<PathBuf>,
    /// Make an image again from the parameters in its PNG (written by diffuse or the
    /// AUTOMATIC1111 web UI), with the same model; flags given here win over the PNG's.
    #[arg(long, value_name = "FILE.png")]
    pub(crate) from: Option<PathBuf>,
    /// With --from, download the image's model when it is missing from the Hugging Face cache
    /// (without it, a picture never starts a download; a --model given here always may).
    #[arg(long)]
    pub(crate) allow_download: bool,
}

fn check_output(output: &Path) -> Result<()> {
    check_png_path("--output", output)
}

/// A PNG path the run will write (`flag` names it in errors): a .png in an existing folder.
fn check_png_path(flag: &str, output: &Path) -> Result<()> {
    if output.extension().and_then(|e| e.to_str()).map(|e| e.eq_ignore_ascii_case("png")) != Some(true) {
        bail!("{flag} {} must end in .png", output.display());
    }
    let parent = output.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !parent.is_dir() {
        bail!("{flag} {}: the folder {} does not exist", output.display(), parent.display());
    }
    Ok(())
}

/// An autoencoder given as a folder, or as a Hugging Face repo id (`madebyollin/taesd`) found
/// in the local cache (`--revision`'s branch is the model's: a VAE repo is looked up at `main`).
/// Single-model repos are not downloaded: the error says how to get one.
fn resolve_autoencoder(flag: &str, spec: &Path) -> Result<PathBuf> {
    let text = spec.to_string_lossy();
    let mut parts = text.split('/');
    let is_repo_id = matches!((parts.next(), parts.next(), parts.next()), (Some(org), Some(repo), None)
        if [org, repo].iter().all(|s| !s.is_empty() && !s.starts_with('.') && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))));
    if spec.exists() || !is_repo_id {
        return Ok(spec.to_path_buf());
    }
    let cache = diffuse::loading::hub::cache_dir()?;
    match diffuse::loading::hub::resolve_in_cache(&cache, &text, "main")? {
        Some(snapshot) => Ok(snapshot),
        None => bail!(
            "{flag} {text}: no such folder, and the repo {text} is not in the Hugging Face cache ({}); \
             download it first (`huggingface-cli download {text}`) or give its folder",
            cache.display()
        ),
    }
}

/// The `--preview` sink: the batch's images side by side, written through a temporary file
/// and renamed, so a reader never sees a partial PNG.
fn preview_sink(path: PathBuf) -> PreviewSink {
    Box::new(move |step, images| {
        let row = Tensor::cat(&images.chunk(images.dim(0)?, 0)?, 3)?;
        let (width, height, channels, pixels) = to_uint8_images(&row)?.swap_remove(0);
        write_png(&path, width, height, channels, &pixels, &[("preview step", step.to_string())])
    })
}

/// The path of image `index` of the `count` a run writes (named when written, so that no list
/// is sized by a number the user gave).
fn output_path(output: &Path, count: usize, index: usize) -> PathBuf {
    if count == 1 {
        return output.to_path_buf();
    }
    let stem = output.file_stem().unwrap_or_default().to_string_lossy();
    output.with_file_name(format!("{stem}-{index}.png"))
}

pub(crate) fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    hasher.finish() & 0xffff_ffff
}

pub(crate) fn progress_bar(total: usize, quiet: bool) -> ProgressBar {
    let bar = ProgressBar::new(total as u64);
    if quiet || !std::io::stderr().is_terminal() {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    } else {
        bar.set_draw_target(ProgressDrawTarget::stderr());
    }
    bar.set_style(
        ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} steps [{elapsed_precise}<{eta_precise}, {per_sec}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message("denoising");
    bar
}

/// The weights' dtype, refused up front when this device cannot run it. The CPU runs all
/// three: f32, and bf16 on its own kernels with f32 activations; f16 is kept as the faster
/// of the two (`ops::weight_dtype`).
pub(crate) fn parse_dtype(name: &str, device: &Device) -> Result<DType> {
    let dtype = match name {
        "f32" | "fp32" | "float32" => DType::F32,
        "f16" | "fp16" | "float16" => DType::F16,
        "bf16" | "bfloat16" => DType::BF16,
        other => bail!("--dtype {other} is not one of f32, f16, bf16"),
    };
    if device.is_cpu() {
        return Ok(dtype);
    }
    // A matmul and a convolution: what every model needs.
    let probe = || -> candle_core::Result<()> {
        let a = Tensor::ones((2, 2), dtype, device)?;
        a.matmul(&a)?;
        let x = Tensor::ones((1, 1, 2, 2), dtype, device)?;
        x.conv2d(&x, 0, 1, 1, 1)?;
        Ok(())
    };
    if let Err(e) = probe() {
        bail!("--dtype {name} cannot run on this device ({}): use --dtype f32", e.to_string().lines().next().unwrap_or_default());
    }
    Ok(dtype)
}

/// The library's names, in its error messages, for the settings these flags set.
pub(crate) const FLAGS: &[(&str, &str)] = &[
    ("`num_images_per_prompt`", "--num-images"),
    ("`num_images`", "--num-images"),
    ("`num_inference_steps`", "--steps"),
    ("`eta`", "--eta"),
    ("`class_label`", "--class-label"),
    ("choose a diffuse scheduler instead", "choose one with --scheduler"),
    ("drop the variant", "drop --variant"),
    ("give a local folder instead of the repo id", "give --model a local folder"),
];

/// `matches` (the subcommand's parsed arguments) tells `--from` which flags were given.
pub fn run(args: GenerateArgs, matches: Option<&ArgMatches>) -> Result<()> {
    generate(args, matches).map_err(|e| crate::name_flags(e, FLAGS))
}

fn generate(mut args: GenerateArgs, matches: Option<&ArgMatches>) -> Result<()> {
    let recalled = parameters::recall(&mut args, matches)?;
    let keep = recalled.as_ref().and_then(|r| r.keep);
    // The numbers first (--from may have set them): the pipeline checks that the batch fits.
    if args.num_images == 0 {
        bail!("--num-images must be at least 1");
    }
    check_output(&args.output)?;
    if let Some(preview) = &args.preview {
        check_png_path("--preview", preview)?;
    }
    let written = if keep.is_some() { 1 } else { args.num_images };
    if args.steps == 0 {
        bail!("--steps must be at least 1");
    }
    let mut overrides = args
        .scheduler_config
        .iter()
        .map(|s| parse_override(s).with_context(|| "--scheduler-config".to_string()))
        .collect::<Result<Vec<_>>>()?;
    let device = crate::device();
    if args.model.is_none() {
        let dir = diffuse::default_model::materialize(&diffuse::default_model::cache_root())?;
        args.model = Some(dir.display().to_string());
    }
    let model = args.model.clone().unwrap_or_default();
    let model_path = if recalled.as_ref().is_some_and(|r| r.model_from_image) && !args.allow_download {
        // The repo id comes from a picture, which may come from anywhere: gigabytes are
        // downloaded only when the user asks.
        diffuse::loading::hub::resolve_model_in_cache(&model, args.revision.as_deref(), args.variant.as_deref()).map_err(|_| {
            anyhow!(
                "--from {}: the image names the model {model}, which is not ready in the Hugging Face cache; \
                 a PNG never starts a download: give --model {model} or --allow-download to download it",
                args.from.as_deref().unwrap_or(Path::new("")).display()
            )
        })?
    } else {
        diffuse::loading::hub::resolve_model(&model, args.revision.as_deref(), args.variant.as_deref())?
    };
    // A single file is a checkpoint to load whole; a folder is a diffusers pipeline.
    let single_file = model_path.is_file();
    if !single_file && !model_path.is_dir() {
        bail!("--model {model}: neither a model folder nor a checkpoint file");
    }
    if single_file && args.variant.is_some() {
        bail!("--variant selects weight files in a diffusers folder; {model} is a single checkpoint file");
    }
    // LatentConsistencyModelPipeline folders (and single files of an LCM-distilled UNet) run
    // with that pipeline's defaults where neither the command line nor --from says otherwise.
    let class = pipeline_class_name(&model_path);
    let given = |id: &str| matches.and_then(|m| m.value_source(id)) == Some(clap::parser::ValueSource::CommandLine);
    if recalled.is_none() && class.as_deref() == Some("LatentConsistencyModelPipeline") {
        if !given("steps") {
            args.steps = LCM_PIPELINE_DEFAULTS.0;
        }
        if !given("guidance_scale") {
            args.guidance_scale = LCM_PIPELINE_DEFAULTS.1;
        }
    }
    // The SDXL pipelines' defaults: guidance 5, strength 0.3 (image-to-image) or 0.9999
    // (inpainting).
    if recalled.is_none() && class.as_deref().is_some_and(is_xl_pipeline_class) {
        if !given("guidance_scale") {
            args.guidance_scale = SDXL_PIPELINE_DEFAULTS.1;
        }
        if args.start.init_image.is_some() && args.start.strength.is_none() {
            args.start.strength = Some(if args.start.mask.is_some() { 0.9999 } else { 0.3 });
        }
    }
    // A scheduler override for every model (so that the image's metadata records it); a single
    // file is also told directly, which checks the value up front.
    if let Some(prediction_type) = &args.prediction_type {
        overrides.push(("prediction_type".to_string(), serde_json::Value::from(prediction_type.as_str())));
    }
    let hashing = parameters::hash_in_background(&model_path, args.variant.clone());
    let seed = args.seed.unwrap_or_else(random_seed);
    let mut generator = TorchGenerator::new(seed);
    let start = Instant::now();
    let text_conditioned = single_file || is_stable_diffusion_folder(&model_path);
    let mut lora_entries = Vec::new();
    // Without --eta, the scheduler's own default (0, or TCD's gamma 0.3).
    let default_eta: f64;
    let (samples, scheduler, summary) = if text_conditioned {
        if args.class_label.is_some() {
            bail!("--class-label is for class-conditional pixel-space models; this is a Stable Diffusion model");
        }
        let quiet = args.quiet;
        let start_from = args.start.load(&device)?;
        let loras = loras::resolve(&args, &mut |warning| if !quiet { eprintln!("warning: {warning}") })?;
        let mut pipeline = load_pipeline(&args, &model_path, single_file, &overrides, &loras, &device)?;
        loras::report(&pipeline.loras, args.quiet);
        lora_entries = loras::infotext_entries(&loras, args.quiet);
        let bar = progress_bar(args.steps, args.quiet);
        let mut on_step = |i: usize, n: usize| {
            bar.set_length(n as u64);
            bar.set_position(i as u64);
        };
        let mut warn = |warning: String| {
            if !quiet {
                bar.suspend(|| eprintln!("warning: {warning}"));
            }
        };
        let ran = run_pipeline(&mut args, &mut pipeline, &start_from, seed, &mut on_step, &mut warn)?;
        bar.finish_and_clear();
        default_eta = ran.default_eta;
        (ran.samples, ran.scheduler, ran.summary)
    } else {
        if args.prompt.is_some() || args.negative_prompt.is_some() {
            bail!("--prompt needs a Stable Diffusion folder (text_encoder/, vae/); {model} is a pixel-space model");
        }
        if args.preview.is_some() {
            bail!("--preview needs a Stable Diffusion model (it decodes latents); {model} is a pixel-space model");
        }
        if args.vae.is_some() || args.vae_tiling || args.vae_slicing {
            bail!("--vae, --vae-tiling and --vae-slicing need a Stable Diffusion model (a latent-space pipeline); {model} is a pixel-space model");
        }
        if !args.lora.is_empty() {
            bail!("--lora needs a Stable Diffusion model (a UNet and text encoder to adapt); {model} is a pixel-space model");
        }
        if args.start.any() {
            bail!("--init-image, --mask, --strength and --latents need a Stable Diffusion model; {model} is a pixel-space model");
        }
        let mut pipeline = PixelPipeline::load(&model_path, args.scheduler.as_deref(), &overrides, args.variant.as_deref(), &device)?;
        default_eta = pipeline.scheduler.scheduler.default_eta();
        let eta = args.eta.unwrap_or(default_eta);
        let options = PixelOptions { num_inference_steps: args.steps, num_images: args.num_images, eta, class_label: args.class_label };
        pipeline.validate(&options)?;
        if !args.quiet {
            eprintln!("seed: {seed}");
        }
        let bar = progress_bar(args.steps, args.quiet);
        let samples = pipeline.generate(&options, &mut generator, &mut |i, n| {
            bar.set_length(n as u64);
            bar.set_position(i as u64);
        })?;
        bar.finish_and_clear();
        (samples, (pipeline.scheduler.class_name.clone(), pipeline.scheduler.config.clone()), String::new())
    };
    let model_hash = parameters::finish_hash(hashing, recalled.as_ref(), args.quiet);
    let labelled = label(&args, &samples, seed, scheduler, overrides, default_eta, text_conditioned, model_hash, lora_entries)?;
    let indices: Vec<usize> = match keep {
        Some(index) => vec![index],
        None => (0..labelled.len()).collect(),
    };
    for (i, index) in indices.into_iter().enumerate() {
        let ((width, height, channels, pixels), text) = &labelled[index];
        let path = output_path(&args.output, written, i);
        write_png(&path, *width, *height, *channels, pixels, &[("parameters", text.clone())])?;
        outln!("{}", path.display());
    }
    if !args.quiet {
        let total = start.elapsed().as_secs_f64();
        if summary.is_empty() {
            eprintln!("seed {seed}, {} steps in {total:.2}s", args.steps);
        } else {
            eprintln!("seed {seed}, {total:.2}s: {summary}");
        }
    }
    Ok(())
}

/// Loads the Stable Diffusion pipeline a run asks for: the model (folder or single file) with
/// its scheduler, overrides and LoRAs, `--vae`, `--preview` and the VAE options.
pub(crate) fn load_pipeline(
    args: &GenerateArgs,
    model_path: &Path,
    single_file: bool,
    overrides: &[(String, serde_json::Value)],
    loras: &loras::Loras,
    device: &Device,
) -> Result<StableDiffusionPipeline> {
    let dtype = parse_dtype(&args.dtype, device)?;
    let scheduler_name = args.scheduler.as_deref();
    let mut pipeline = if single_file {
        let prediction_type = args.prediction_type.as_deref();
        StableDiffusionPipeline::load_single_file_with_loras(model_path, prediction_type, scheduler_name, overrides, &loras.specs, device, dtype)?
    } else {
        let variant = args.variant.as_deref();
        StableDiffusionPipeline::load_with_loras(model_path, scheduler_name, overrides, variant, &loras.specs, device, dtype)?
    };
    if let Some(vae) = &args.vae {
        let dir = resolve_autoencoder("--vae", vae)?;
        pipeline.replace_vae(&dir, None).with_context(|| format!("--vae {}", vae.display()))?;
    }
    if let Some(preview) = &args.preview {
        let vae = match &args.preview_vae {
            Some(spec) => {
                let dir = resolve_autoencoder("--preview-vae", spec)?;
                Some(pipeline.load_vae(&dir, None).with_context(|| format!("--preview-vae {}", spec.display()))?)
            }
            None => None,
        };
        pipeline.preview = Some(StepPreview { vae, sink: preview_sink(preview.clone()) });
    }
    if args.vae_tiling {
        pipeline.enable_vae_tiling();
    }
    if args.vae_slicing {
        pipeline.enable_vae_slicing();
    }
    Ok(pipeline)
}

/// The scheduler [`load_pipeline`] would build for `args` (its `--scheduler` and `overrides`),
/// new and unused: a loaded pipeline given it runs as one loaded for these arguments.
pub(crate) fn fresh_scheduler(
    args: &GenerateArgs,
    model_path: &Path,
    single_file: bool,
    overrides: &[(String, serde_json::Value)],
) -> Result<diffuse::pipelines::ResolvedScheduler> {
    let name = args.scheduler.as_deref();
    Ok(if single_file {
        let file = diffuse::loading::single_file::SingleFile::open(model_path)?;
        diffuse::pipelines::stable_diffusion::single_file_scheduler(&file, args.prediction_type.as_deref(), name, overrides)?
    } else {
        diffuse::pipelines::resolve_scheduler(&model_path.join("scheduler"), name, overrides)?
    })
}

/// What one run of a Stable Diffusion pipeline made.
pub(crate) struct Ran {
    /// Images `[N, 3, H, W]` in about [-1, 1].
    pub samples: Tensor,
    /// The scheduler's class and effective config.
    pub scheduler: (String, serde_json::Map<String, serde_json::Value>),
    pub default_eta: f64,
    pub summary: String,
}

/// One text-to-image, image-to-image or inpainting run on a loaded pipeline, as `diffuse
/// generate` and `diffuse serve` both run it (`args` may be completed from `--latents`).
pub(crate) fn run_pipeline(
    args: &mut GenerateArgs,
    pipeline: &mut StableDiffusionPipeline,
    start_from: &Start,
    seed: u64,
    on_step: &mut dyn FnMut(usize, usize),
    warn: &mut dyn FnMut(String),
) -> Result<Ran> {
    let quiet = args.quiet;
    if let StartFrom::Latents(latents) = &start_from.from {
        let metadata = &start_from.inversion;
        let (height, width) = start::latents_size(latents, pipeline, args.height, args.width, args.num_images)?;
        (args.height, args.width) = (Some(height), Some(width));
        args.prompt = args.prompt.take().or_else(|| metadata.get("prompt").cloned());
        let note = start::inversion_mismatch(metadata, args.steps, args.guidance_scale, &pipeline.scheduler.class_name);
        if let Some(note) = note.filter(|_| !quiet) {
            eprintln!("warning: {note}");
        }
    }
    // Without --eta, the scheduler's own default (0, or TCD's gamma 0.3).
    let default_eta = pipeline.scheduler.scheduler.default_eta();
    let options = TextToImageOptions {
        prompt: args.prompt.clone().unwrap_or_default(),
        negative_prompt: args.negative_prompt.clone(),
        num_inference_steps: args.steps,
        guidance_scale: args.guidance_scale,
        guidance_rescale: args.guidance_rescale,
        num_images_per_prompt: args.num_images,
        height: args.height,
        width: args.width,
        eta: args.eta.unwrap_or(default_eta),
        clip_skip: args.clip_skip,
        prompt_syntax: args.prompt_syntax.parse()?,
        ..Default::default()
    };
    args.xl.check(pipeline)?;
    let mut options = options;
    args.xl.apply(&mut options)?;
    let request = GenerationRequest { options, seed, start: start_from.from.clone() };
    // Checked before a refiner is loaded; its warnings come once, from `run` (which checks again).
    pipeline.validate_request(&request, &mut |_| {})?;
    let mut refiner = match &args.xl.refiner {
        Some(_) if !matches!(request.start, StartFrom::Noise) => {
            bail!("--refiner finishes a text-to-image run; to refine an image, give the refiner as --model with --init-image")
        }
        Some(spec) => Some(load_refiner(args, spec, &pipeline.device).with_context(|| format!("--refiner {spec}"))?),
        None => None,
    };
    if !quiet {
        eprintln!("seed: {seed}");
    }
    let (samples, times) = match refiner.as_mut() {
        Some(refiner) => {
            let mut generator = TorchGenerator::new(seed);
            let mut times = PhaseTimes::default();
            let switch = args.xl.refiner_switch;
            let samples = generate_with_refiner(pipeline, refiner, &request.options, switch, &mut generator, on_step, warn, &mut times)?;
            (samples, times)
        }
        None => {
            let generated = pipeline.run(&request, &mut |i, n| {
                on_step(i, n);
                Flow::Continue
            }, warn)?;
            (generated.samples, generated.times)
        }
    };
    let summary = format!(
        "text encoding {:.2}s, denoising {:.2}s ({:.2} it/s), decoding {:.2}s",
        times.text_encoding,
        times.denoising,
        args.steps as f64 / times.denoising.max(1e-9),
        times.decoding
    );
    Ok(Ran { samples, scheduler: (pipeline.scheduler.class_name.clone(), pipeline.scheduler.config.clone()), default_eta, summary })
}

/// The SDXL refiner `--refiner` names (a folder, single file or repo id), with the run's
/// dtype, variant, scheduler and overrides.
fn load_refiner(args: &GenerateArgs, spec: &str, device: &Device) -> Result<StableDiffusionPipeline> {
    let path = diffuse::loading::hub::resolve_model(spec, None, args.variant.as_deref())?;
    let dtype = parse_dtype(&args.dtype, device)?;
    let overrides = args.scheduler_config.iter().map(|s| parse_override(s)).collect::<diffuse::Result<Vec<_>>>()?;
    let scheduler = args.scheduler.as_deref();
    let refiner = if path.is_file() {
        StableDiffusionPipeline::load_single_file(&path, args.prediction_type.as_deref(), scheduler, &overrides, device, dtype)?
    } else {
        StableDiffusionPipeline::load(&path, scheduler, &overrides, args.variant.as_deref(), device, dtype)?
    };
    if !refiner.is_xl() {
        bail!("{spec} is not an SDXL model (its UNet has no addition_embed_type `text_time`)");
    }
    Ok(refiner)
}

/// One image as 8-bit pixels: (width, height, channels, bytes).
pub(crate) type Pixels = (usize, usize, usize, Vec<u8>);

/// A run's images as 8-bit pixels, each with the infotext its PNG carries.
#[allow(clippy::too_many_arguments)]
pub(crate) fn label(
    args: &GenerateArgs,
    samples: &Tensor,
    seed: u64,
    scheduler: (String, serde_json::Map<String, serde_json::Value>),
    overrides: Vec<(String, serde_json::Value)>,
    default_eta: f64,
    text_conditioned: bool,
    model_hash: Option<String>,
    loras: Vec<(String, String)>,
) -> Result<Vec<(Pixels, String)>> {
    let images = to_uint8_images(samples)?;
    let made = parameters::Made {
        seed,
        scheduler_class: scheduler.0,
        scheduler_config: scheduler.1,
        scheduler_overrides: overrides,
        eta: args.eta.unwrap_or(default_eta),
        default_eta,
        text_conditioned,
        width: images[0].0,
        height: images[0].1,
        batch_size: images.len(),
        model_hash,
        loras,
    };
    Ok(images.into_iter().enumerate().map(|(index, image)| (image, parameters::infotext(args, &made, index))).collect())
}

/// The arguments `diffuse generate --output out.png` runs with (every default as the command
/// line's), for callers that fill them in themselves.
pub(crate) fn default_args() -> GenerateArgs {
    #[derive(clap::Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: GenerateArgs,
    }
    <Wrapper as clap::Parser>::parse_from(["diffuse", "--output", "out.png"]).args
}
