//! `diffuse generate`'s metadata: the AUTOMATIC1111 infotext written into every PNG (built
//! from the flags and what the run used), and `--from FILE.png`, which fills the flags from a
//! PNG's infotext so that the same model makes the same image again.
//!
//! `--from` rules:
//! - Every flag given on the command line wins over the PNG's value; flags replace, they do
//!   not merge (`--scheduler-config` replaces the PNG's overrides as a whole).
//! - The model: `--model`, or else the PNG's `Model` when it is a Hugging Face repo id
//!   (`ORG/NAME`, which diffuse records for models given by repo id). A local folder is
//!   recorded by its name only, not its path, so it must be given again with `--model`.
//! - The scheduler: the recorded `Diffuse scheduler` and its config overrides, or, for images
//!   from A1111, its sampler and schedule type mapped to the nearest diffuse scheduler.
//! - The prompt syntax: the recorded `Prompt syntax`, else diffusers' for images diffuse made
//!   and A1111's (weights, long prompts) for images from anywhere else.
//! - An image that was number k of a batch of N is made again by drawing the batch (diffusers
//!   draws a batch from one generator) and writing image k alone to `--output`.
//! - LoRAs: tags in the prompt are read again; `--lora` ones come back from `--lora-dir`
//!   (generate/loras.rs), and a LoRA whose hash is not the recorded one is warned about.
//! - A1111 settings diffuse has no equivalent for (hires fix, hashes of LoRAs the run does not
//!   load, ...) are named in a warning and ignored. An image-to-image or inpainting result
//!   (`Denoising strength`) needs its init image (and mask) given again with `--init-image`
//!   (`--mask`).

use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use anyhow::{anyhow, bail, Context, Result};
use clap::parser::ValueSource;
use clap::ArgMatches;
use diffuse::pipelines::metadata::{
    a1111_sampler, diffuse_scheduler_name, model_hash, parse_infotext, read_png_parameters, GenerationParameters,
};
use serde_json::{Map, Value};

use super::{loras, GenerateArgs};

/// What a run used beyond its flags, for the infotext.
pub(crate) struct Made {
    pub seed: u64,
    pub scheduler_class: String,
    pub scheduler_config: Map<String, Value>,
    pub scheduler_overrides: Vec<(String, Value)>,
    /// The eta the scheduler used, and its default (what a run without --eta uses).
    pub eta: f64,
    pub default_eta: f64,
    /// Stable Diffusion (prompt, guidance, dtype) rather than a pixel-space model.
    pub text_conditioned: bool,
    pub width: usize,
    pub height: usize,
    pub batch_size: usize,
    pub model_hash: Option<String>,
    /// `Lora hashes` and `Diffuse loras` (generate/loras.rs).
    pub loras: Vec<(String, String)>,
}

/// The infotext key of `--prompt-syntax` (written when it is not diffusers').
const PROMPT_SYNTAX_KEY: &str = "Prompt syntax";
/// A1111's key for a VAE other than the checkpoint's own (its folder's name here).
const VAE_KEY: &str = "VAE";
/// Tiled VAE encoding and decoding change the pixels: recorded so that `--from` tiles again.
const VAE_TILING_KEY: &str = "VAE tiling";

/// The infotext of image `index` of a run.
pub(crate) fn infotext(args: &GenerateArgs, made: &Made, index: usize) -> String {
    let (sampler, schedule_type) = a1111_sampler(&made.scheduler_class, &made.scheduler_config);
    let scheduler = args
        .scheduler
        .clone()
        .or_else(|| diffuse_scheduler_name(&made.scheduler_class, &made.scheduler_config).map(str::to_string));
    let batched = made.batch_size > 1;
    let dtype = made.text_conditioned.then(|| canonical_dtype(&args.dtype)).flatten().filter(|d| d != "f32");
    GenerationParameters {
        prompt: args.prompt.clone().unwrap_or_default(),
        negative_prompt: args.negative_prompt.clone().unwrap_or_default(),
        steps: Some(args.steps),
        sampler: Some(sampler),
        schedule_type,
        cfg_scale: made.text_conditioned.then_some(args.guidance_scale),
        seed: Some(made.seed),
        width: Some(made.width),
        height: Some(made.height),
        model_hash: made.model_hash.clone(),
        model: args.model.as_deref().map(model_name),
        denoising_strength: args.start.effective_strength(),
        clip_skip: args.clip_skip,
        // Recorded when it is not what the scheduler would use without --eta.
        eta: (made.eta != made.default_eta).then_some(made.eta),
        guidance_rescale: (made.text_conditioned && args.guidance_rescale != 0.0).then_some(args.guidance_rescale),
        class_label: args.class_label,
        batch_size: batched.then_some(made.batch_size),
        batch_position: batched.then_some(index),
        scheduler,
        scheduler_config: made.scheduler_overrides.clone(),
        variant: args.variant.clone(),
        dtype,
        version: Some(format!("diffuse {}", env!("CARGO_PKG_VERSION"))),
        extra: match args.prompt_syntax.as_str() {
            "diffusers" => Vec::new(),
            syntax => vec![(PROMPT_SYNTAX_KEY.to_string(), syntax.to_string())],
        }
        .into_iter()
        .chain(args.vae.as_deref().map(|vae| (VAE_KEY.to_string(), model_name(&vae.display().to_string()))))
        .chain(args.vae_tiling.then(|| (VAE_TILING_KEY.to_string(), "true".to_string())))
        .chain(made.loras.iter().cloned())
        .chain(args.xl.infotext_entries())
        .collect(),
    }
    .to_infotext()
}

fn canonical_dtype(name: &str) -> Option<String> {
    match name {
        "f32" | "fp32" | "float32" => Some("f32".into()),
        "f16" | "fp16" | "float16" => Some("f16".into()),
        "bf16" | "bfloat16" => Some("bf16".into()),
        _ => None,
    }
}

/// The `Model` name: a local checkpoint's file stem or folder name (as A1111 names its
/// checkpoints; never the path), or the Hugging Face repo id as given.
pub(crate) fn model_name(spec: &str) -> String {
    let path = Path::new(spec);
    if !path.exists() {
        return spec.to_string();
    }
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let name = if path.is_file() { path.file_stem() } else { path.file_name() };
    name.map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| spec.to_string())
}

/// Where model hashes are cached: `$DIFFUSE_CACHE_DIR`, else `$XDG_CACHE_HOME/diffuse`, else
/// `~/.cache/diffuse`.
fn hash_cache() -> Option<PathBuf> {
    let dir = std::env::var_os("DIFFUSE_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("diffuse")))
        .or_else(|| std::env::var_os("HOME").map(|d| PathBuf::from(d).join(".cache/diffuse")))?;
    Some(dir.join("model-hashes.json"))
}

/// Hashes the model on another thread while the pipeline loads and runs (gigabytes of UNet
/// weights take seconds the first time; the result is cached).
pub(crate) fn hash_in_background(model: &Path, variant: Option<String>) -> JoinHandle<Result<String>> {
    let model = model.to_path_buf();
    std::thread::spawn(move || Ok(model_hash(&model, variant.as_deref(), hash_cache().as_deref())?))
}

/// The model hash, or `None` with a warning when it could not be computed (the image is still
/// written, without `Model hash`). Warns too when `--from`'s image was made with another model.
pub(crate) fn finish_hash(job: JoinHandle<Result<String>>, recalled: Option<&Recalled>, quiet: bool) -> Option<String> {
    let hash = match job.join() {
        Ok(Ok(hash)) => Some(hash),
        Ok(Err(e)) => {
            if !quiet {
                eprintln!("warning: no model hash in the metadata: {e:#}");
            }
            None
        }
        Err(_) => None,
    };
    if let (Some(hash), Some(recorded)) = (&hash, recalled.and_then(|r| r.params.model_hash.as_ref())) {
        if hash != recorded && !quiet {
            eprintln!("warning: --from: the image was made with model hash {recorded}, this model's is {hash}; expect a different image");
        }
    }
    hash
}

/// What `--from` read.
pub(crate) struct Recalled {
    pub params: GenerationParameters,
    /// The image's position in the batch it was drawn in: only that image is written.
    pub keep: Option<usize>,
    /// The model is the repo id the image names (`--model` was not given).
    pub model_from_image: bool,
}

/// Fills `args` from the `--from` PNG's infotext (flags given on the command line win).
pub(crate) fn recall(args: &mut GenerateArgs, matches: Option<&ArgMatches>) -> Result<Option<Recalled>> {
    let Some(path) = args.from.clone() else {
        return Ok(None);
    };
    let context = || format!("--from {}", path.display());
    let text = read_png_parameters(&path)
        .with_context(context)?
        .ok_or_else(|| anyhow!("--from {}: the PNG has no generation parameters (no `parameters` text chunk)", path.display()))?;
    let params = parse_infotext(&text).with_context(context)?;
    let given = |id: &str| matches.and_then(|m| m.value_source(id)) == Some(ValueSource::CommandLine);

    if let Some(strength) = params.denoising_strength {
        if args.start.init_image.is_none() {
            bail!(
                "--from {}: the image was made from an init image (Denoising strength {strength}), which the PNG does not hold: give it again with --init-image (and --mask)",
                path.display()
            );
        }
        args.start.strength = args.start.strength.or(Some(strength));
    }
    let mut model_from_image = false;
    if args.model.is_none() {
        match &params.model {
            Some(model) if is_repo_id(model) => {
                args.model = Some(model.clone());
                model_from_image = true;
            }
            // The built-in model (used when --model stays unset).
            Some(model) if model == diffuse::default_model::NAME => {}
            Some(model) => bail!(
                "--from {}: the image was made with the model `{model}`, which is not a Hugging Face repo id; give its folder or file with --model",
                path.display()
            ),
            None => bail!("--from {}: the image does not name its model; give it with --model", path.display()),
        }
    }
    if !given("prompt") && !params.prompt.is_empty() {
        args.prompt = Some(params.prompt.clone());
    }
    if !given("negative_prompt") && !params.negative_prompt.is_empty() {
        args.negative_prompt = Some(params.negative_prompt.clone());
    }
    macro_rules! fill {
        ($id:literal, $field:ident, $value:expr) => {
            if !given($id) {
                if let Some(value) = $value {
                    args.$field = value;
                }
            }
        };
    }
    fill!("steps", steps, params.steps);
    fill!("guidance_scale", guidance_scale, params.cfg_scale);
    fill!("guidance_rescale", guidance_rescale, params.guidance_rescale);
    fill!("eta", eta, params.eta.map(Some));
    fill!("seed", seed, params.seed.map(Some));
    fill!("width", width, params.width.map(Some));
    fill!("height", height, params.height.map(Some));
    fill!("class_label", class_label, params.class_label.map(Some));
    fill!("variant", variant, params.variant.clone().map(Some));
    fill!("dtype", dtype, params.dtype.clone());
    if !given("clip_skip") {
        args.clip_skip = params.clip_skip;
    }

    // The scheduler: diffuse's own record, else A1111's sampler mapped; a recorded diffusers
    // class name (a folder scheduler diffuse has no name for) means the folder's own.
    let folder_scheduler = params.scheduler.is_none() && params.sampler.as_deref().is_some_and(|s| s.ends_with("Scheduler"));
    let overrides = if given("scheduler") || folder_scheduler {
        params.scheduler_config.clone()
    } else {
        match params.diffuse_scheduler().with_context(context)? {
            Some((name, overrides)) => {
                args.scheduler = Some(name);
                overrides
            }
            None => params.scheduler_config.clone(),
        }
    };
    if !given("scheduler_config") {
        args.scheduler_config = overrides.iter().map(|(key, value)| format!("{key}={value}")).collect();
    }

    let mut keep = None;
    if !given("num_images") {
        if let Some(size) = params.batch_size.filter(|&n| n > 1) {
            let position = params.batch_position.unwrap_or(0);
            if position >= size {
                bail!("--from {}: Batch pos {position} is outside its batch of {size}", path.display());
            }
            args.num_images = size;
            keep = Some(position);
        } else {
            args.num_images = 1;
        }
    }

    // The prompt syntax diffuse recorded; an image from elsewhere has its prompt in A1111's.
    let recorded_syntax = params.extra.iter().find(|(key, _)| key == PROMPT_SYNTAX_KEY).map(|(_, value)| value.clone());
    if !given("prompt_syntax") {
        let by_diffuse = params.version.as_deref().is_some_and(|v| v.starts_with("diffuse"));
        args.prompt_syntax = recorded_syntax.unwrap_or_else(|| if by_diffuse { "diffusers" } else { "a1111" }.to_string());
    }

    // The VAE: tiling as recorded; another VAE only from --vae (the PNG holds its name only).
    let recorded = |key: &str| params.extra.iter().find(|(k, _)| k == key).map(|(_, value)| value.clone());
    if !given("vae_tiling") && recorded(VAE_TILING_KEY).as_deref() == Some("true") {
        args.vae_tiling = true;
    }
    if let Some(vae) = recorded(VAE_KEY).filter(|_| args.vae.is_none() && !args.quiet) {
        eprintln!("warning: --from: the image was decoded by the VAE `{vae}`; give its folder with --vae to decode as it was");
    }

    args.xl.recall(&params, &given, &path)?;

    // The LoRAs: `--lora` ones from --lora-dir, tags from the prompt; their hashes checked.
    loras::recall(args, &params, given("lora"), &path)?;
    let loras_found = loras::resolve(args, &mut |_| {}).is_ok_and(|loras| loras::check_hashes(&params, &loras, args.quiet));
    let ignored: Vec<&str> = params
        .extra
        .iter()
        .map(|(key, _)| key.as_str())
        .filter(|&key| {
            let known = [PROMPT_SYNTAX_KEY, VAE_KEY, VAE_TILING_KEY, loras::WEIGHTS_KEY].contains(&key) || super::xl::KEYS.contains(&key);
            !(known || (key == loras::HASHES_KEY && loras_found))
        })
        .collect();
    if !ignored.is_empty() && !args.quiet {
        eprintln!("warning: --from: diffuse has no equivalent for these settings, which are ignored: {}", ignored.join(", "));
    }
    Ok(Some(Recalled { params, keep, model_from_image }))
}

/// `ORG/NAME` as Hugging Face repo ids are written, and not a path that exists here.
fn is_repo_id(name: &str) -> bool {
    let mut parts = name.split('/');
    let (Some(org), Some(repo), None) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let valid = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    valid(org) && valid(repo) && !Path::new(name).exists()
}
