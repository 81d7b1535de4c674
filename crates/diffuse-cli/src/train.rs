//! `diffuse train`: train from scratch on IDX files or an image folder, and write the model as a
//! diffusers folder: a pixel-space UNet2DModel (unconditional or class-conditional) as a
//! DDPMPipeline, an AutoencoderKL, or a text-to-image UNet2DConditionModel (with its CLIP text
//! encoder) in a trained autoencoder's latents as a StableDiffusionPipeline.

use std::io::IsTerminal;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use diffuse::schedulers::PredictionType;
use diffuse::training::data::{guess_idx_labels_path, prepare, Captions, DataLoader, Dataset, IdxDataset, ImageFit, ImageFolderDataset, ImageSpec};
use diffuse::training::ema::EmaConfig;
use diffuse::training::objectives::LossKind;
use diffuse::training::optimizer::{AdamWConfig, LrSchedule};
use diffuse::training::autoencoder::{self, resolve_vae_config, AutoencoderTask, AutoencoderTrainingConfig, ReconstructionLoss};
use diffuse::training::pixel::{
    resolve_unet_config, NoiseSchedule, PixelTask, PixelTrainingConfig, SampleSettings, TimestepSampling, UNetRequest, PRESETS,
};
use diffuse::lora::adapters::{self as lora_adapters, AdapterConfig};
use diffuse::training::text_to_image::{
    self, frozen_text_encoder, resolve_text_encoder_config, ClassPrompts, FrozenVae, LoraTraining, TextSampleSettings,
    TextToImageTask, TextToImageTrainingConfig, SecondTextEncoder, DEFAULT_TEMPLATES,
};
use diffuse::training::{train, Hooks, TrainConfig, TrainingTask};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// What `diffuse train` trains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// A pixel-space UNet2DModel, written as a DDPMPipeline folder.
    Pixel,
    /// An AutoencoderKL (reconstruction + KL loss), written as an AutoencoderKL folder.
    Autoencoder,
    /// A UNet2DConditionModel in a trained autoencoder's latents (--vae), conditioned on a CLIP
    /// text encoder, written as a StableDiffusionPipeline folder.
    TextToImage,
}

#[derive(clap::Args)]
#[command(after_help = presets_help())]
pub struct TrainArgs {
    /// What to train (default: pixel; text-to-image with --base or --lora-rank).
    #[arg(long, value_enum)]
    kind: Option<Kind>,
    /// Text-to-image: start from this StableDiffusionPipeline (a diffusers folder, a repo id in
    /// the Hugging Face cache, or `builtin` for the built-in Fashion-MNIST model) instead of from
    /// scratch: its UNet and text encoder are fine-tuned, or, with --lora-rank, frozen under LoRA
    /// adapters. Its vae/, unet/config.json and text_encoder/ are the defaults of --vae,
    /// --model-config and the text encoder.
    #[arg(long)]
    base: Option<String>,
    /// Train LoRA adapters of this rank on --base (peft's `r`) instead of its weights; the result
    /// is pytorch_lora_weights.safetensors (diffusers' format) and NAME.safetensors (kohya's,
    /// for AUTOMATIC1111 and ComfyUI) in --output, for `diffuse generate --lora`.
    #[arg(long)]
    lora_rank: Option<usize>,
    /// The adapters' alpha: they are scaled by alpha / rank (default: the rank, scale 1).
    #[arg(long)]
    lora_alpha: Option<f64>,
    /// peft's lora_dropout: the probability of zeroing each element of an adapter's input
    /// while training.
    #[arg(long, default_value_t = 0.0)]
    lora_dropout: f64,
    /// The layers that get adapters, comma-separated: `attention` (the UNet's to_q, to_k, to_v,
    /// to_out.0), `cross-attention` (only the attn2 ones), `feed-forward` (the transformer
    /// blocks' ff.net.0.proj, ff.net.2), `resnets` (their 3×3 conv1, conv2 and time_emb_proj, as
    /// kohya's LoCon), `text-encoder` (the text encoder's q_proj, k_proj, v_proj, out_proj), or
    /// module names matched as peft's target_modules (`to_k`, `attn2.to_v`, `proj_in`; `te:NAME`
    /// for the text encoder's, e.g. `te:mlp.fc1`).
    #[arg(long, default_value = "attention")]
    lora_targets: String,
    /// The kohya-format LoRA's file name, without .safetensors (default: the --output folder's
    /// name), as AUTOMATIC1111's <lora:NAME:WEIGHT> finds it.
    #[arg(long)]
    lora_name: Option<String>,
    /// The training images: an IDX images file (MNIST / Fashion-MNIST format, gzipped or not),
    /// or a folder of PNG/JPEG/BMP images (searched recursively).
    #[arg(long)]
    data: PathBuf,
    /// The folder to write into: checkpoints/, samples/, loss.csv, loss.png, data-cache/ (a
    /// decompressed copy of gzipped IDX data) and, at the end, the trained model as a diffusers
    /// folder: a DDPMPipeline (pixel), an AutoencoderKL (autoencoder), a
    /// StableDiffusionPipeline (text-to-image), or the LoRA files (--lora-rank).
    #[arg(long)]
    output: PathBuf,
    /// With IDX data: the labels file (default: the *-labels-idx1-ubyte[.gz] file beside --data).
    #[arg(long)]
    labels: Option<PathBuf>,
    /// The model's architecture: a preset name (see below) or a diffusers config.json. Channels,
    /// sample size and class embeddings follow the data unless the file states them. Default:
    /// small (pixel), vae-small (autoencoder), unet-small (text-to-image).
    #[arg(long)]
    model_config: Option<String>,
    /// Convert the images to this many channels (1 gray, 3 RGB) instead of the data's own.
    #[arg(long)]
    channels: Option<usize>,
    /// Autoencoder: how reconstructions are scored, l1 (latent diffusion's) or mse.
    #[arg(long, default_value = "l1")]
    reconstruction_loss: String,
    /// Autoencoder: the weight of the KL term against the reconstruction term.
    #[arg(long, default_value_t = 1e-6)]
    kl_weight: f64,
    /// Text-to-image: the trained autoencoder folder (`diffuse train --kind autoencoder`'s
    /// output, or a pipeline folder with vae/), frozen.
    #[arg(long)]
    vae: Option<PathBuf>,
    /// Text-to-image: a CLIPTextModel folder to use frozen, instead of training one.
    #[arg(long)]
    text_encoder: Option<PathBuf>,
    /// Text-to-image: the architecture of the text encoder trained with the UNet (a preset,
    /// see below, or a transformers config.json).
    #[arg(long, default_value = "clip-small")]
    text_encoder_config: String,
    /// Text-to-image: the probability of training on the empty prompt instead of the caption
    /// (so that classifier-free guidance works).
    #[arg(long, default_value_t = 0.1)]
    caption_dropout: f64,
    /// Text-to-image on labelled data: the class names in label order, comma-separated, synonyms
    /// joined by `|` ("sneaker|running shoe"), or `fashion-mnist`.
    #[arg(long)]
    class_names: Option<String>,
    /// Text-to-image: a file of prompt templates, one a line, for captions made from class names
    /// (`{a}`: the name with its article, `{}`: the bare name). Default: a built-in list.
    #[arg(long)]
    prompt_templates: Option<PathBuf>,
    /// Text-to-image: a prompt of the sample grids (repeatable; default: "a photo of a NAME" for
    /// each class, or the first captions of the data).
    #[arg(long = "sample-prompt")]
    sample_prompts: Vec<String>,
    /// Text-to-image: the sample grids' guidance scale.
    #[arg(long, default_value_t = 4.0)]
    sample_guidance_scale: f64,
    /// The exported weights' type: f32 or f16 (autoencoder and text-to-image).
    #[arg(long, default_value = "f32")]
    export_dtype: String,
    /// Condition on class labels (IDX labels, or an image folder's sub-folder names).
    #[arg(long)]
    class_conditional: bool,
    /// Probability of replacing a label by an extra null class during training, so that
    /// classifier-free guidance can be used (class-conditional only).
    #[arg(long, default_value_t = 0.0)]
    class_dropout: f64,
    /// What the UNet predicts: epsilon (the noise), sample (the clean image) or v_prediction.
    #[arg(long, default_value = "epsilon")]
    prediction_type: String,
    /// mse: the simple loss; hybrid: improved-diffusion's L_simple + λ·L_vlb with a learned
    /// (learned_range) variance, the UNet then predicting twice the channels.
    #[arg(long, default_value = "mse")]
    loss: String,
    /// λ of the hybrid loss.
    #[arg(long, default_value_t = 0.001)]
    vlb_weight: f64,
    /// How timesteps are drawn: uniform, or loss-aware (importance sampling by each timestep's
    /// recent loss, improved-diffusion's loss-second-moment sampler).
    #[arg(long, default_value = "uniform")]
    timestep_sampling: String,
    /// Weight the MSE by min(SNR, γ) (Min-SNR weighting; 5 is the paper's choice).
    #[arg(long)]
    snr_gamma: Option<f64>,
    /// Timesteps of the noise schedule.
    #[arg(long, default_value_t = 1000)]
    num_train_timesteps: usize,
    /// The noise schedule: linear, scaled_linear, squaredcos_cap_v2, sigmoid. Default: linear
    /// from 0.0001 to 0.02 (DDPM's) for pixel, scaled_linear from 0.00085 to 0.012 (Stable
    /// Diffusion's) for text-to-image.
    #[arg(long)]
    beta_schedule: Option<String>,
    /// The first beta of the schedule (see --beta-schedule for the defaults).
    #[arg(long)]
    beta_start: Option<f64>,
    /// The last beta of the schedule.
    #[arg(long)]
    beta_end: Option<f64>,
    /// Train at this square size instead of the data's (see --image-fit).
    #[arg(long)]
    resolution: Option<usize>,
    /// Images of another size than the model's: exact (refuse them), pad (centre them on black)
    /// or resize (shorter side, then centre crop).
    #[arg(long, default_value = "exact")]
    image_fit: String,
    /// Mirror each image left to right with probability ½.
    #[arg(long)]
    random_flip: bool,
    /// Optimizer steps to train for (a resumed run counts the steps already done).
    #[arg(long, default_value_t = 10000)]
    steps: usize,
    /// Images per micro-batch.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Micro-batches whose gradients are summed into one optimizer step.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// The peak learning rate (AdamW).
    #[arg(long, default_value_t = 1e-4)]
    lr: f64,
    /// Steps of linear learning-rate warm-up from 0.
    #[arg(long, default_value_t = 500)]
    warmup: usize,
    /// After the warm-up: cosine (down to 0 at the last step) or constant.
    #[arg(long, default_value = "cosine")]
    lr_schedule: String,
    /// AdamW's β1.
    #[arg(long, default_value_t = 0.95)]
    adam_beta1: f64,
    /// AdamW's β2.
    #[arg(long, default_value_t = 0.999)]
    adam_beta2: f64,
    /// AdamW's ε.
    #[arg(long, default_value_t = 1e-8)]
    adam_eps: f64,
    /// AdamW's decoupled weight decay.
    #[arg(long, default_value_t = 1e-6)]
    weight_decay: f64,
    /// Clip the global gradient norm to this (0 turns clipping off).
    #[arg(long, default_value_t = 1.0)]
    grad_clip: f64,
    /// The largest decay of the EMA of the weights that is exported (0 turns the EMA off and
    /// exports the raw weights). The decay grows as (1 + step) / (10 + step) up to this.
    #[arg(long, default_value_t = 0.9999)]
    ema_decay: f64,
    /// The EMA's smallest decay.
    #[arg(long, default_value_t = 0.0)]
    ema_min_decay: f64,
    /// Steps before the EMA starts averaging.
    #[arg(long, default_value_t = 0)]
    ema_update_after_step: u64,
    /// Use the warm-up decay 1 - (1 + step / inv_gamma)^-power instead of (1 + step) / (10 + step).
    #[arg(long)]
    ema_warmup: bool,
    /// inv_gamma of --ema-warmup.
    #[arg(long, default_value_t = 1.0)]
    ema_inv_gamma: f64,
    /// power of --ema-warmup.
    #[arg(long, default_value_t = 0.75)]
    ema_power: f64,
    /// Write a checkpoint every N steps (and always at the end).
    #[arg(long, default_value_t = 1000)]
    checkpoint_every: usize,
    /// How many checkpoints to keep.
    #[arg(long, default_value_t = 3)]
    keep_checkpoints: usize,
    /// Write a grid of samples every N steps (and at the end).
    #[arg(long)]
    sample_every: Option<usize>,
    /// Images in a sample grid: per class row (class-conditional), per prompt row
    /// (text-to-image), or the images reconstructed (autoencoder).
    #[arg(long, default_value_t = 16)]
    sample_count: usize,
    /// Denoising steps of the sample grids.
    #[arg(long, default_value_t = 50)]
    sample_steps: usize,
    /// Scheduler of the sample grids (see `diffuse schedulers`).
    #[arg(long, default_value = "ddim")]
    sample_scheduler: String,
    /// Continue the run in --output from its latest checkpoint (pass the same options).
    #[arg(long)]
    resume: bool,
    /// Seeds the initial weights, the data order and flips, and the training noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// No progress bar or notices on stderr.
    #[arg(long)]
    quiet: bool,
    /// At the end, print where the time went, per operation (convolution and its backward
    /// passes, linear, attention, norms; the rest is element-wise work and the optimizer).
    #[arg(long)]
    profile: bool,
}

/// `1h02m`, `3m05s`, `42s`.
fn format_duration(seconds: f64) -> String {
    let seconds = seconds.max(0.0).round() as u64;
    match (seconds / 3600, seconds % 3600 / 60, seconds % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s:02}s"),
        (h, m, _) => format!("{h}h{m:02}m"),
    }
}

fn presets_help() -> String {
    let mut text = String::new();
    let groups: [(&str, &[(&str, &str, &str)]); 4] = [
        ("Model presets, --kind pixel (--model-config)", PRESETS),
        ("Model presets, --kind autoencoder (--model-config)", autoencoder::PRESETS),
        ("Model presets, --kind text-to-image (--model-config)", text_to_image::UNET_PRESETS),
        ("Text encoder presets, --kind text-to-image (--text-encoder-config)", text_to_image::TEXT_ENCODER_PRESETS),
    ];
    for (title, presets) in groups {
        text.push_str(&format!("{title}:\n"));
        for (name, description, _) in presets {
            text.push_str(&format!("  {name:<14} {description}\n"));
        }
    }
    text
}

/// Fashion-MNIST's classes in label order, as prompt words (the first of each is its main name).
pub const FASHION_MNIST_CLASS_NAMES: &str = "t-shirt|top|tee|t-shirt top,trouser|trousers|pants,pullover|sweater|jumper,\
dress,coat|jacket,sandal|sandals,shirt|button-up shirt,sneaker|sneakers|running shoe,bag|handbag,ankle boot|boot|boots";

/// `--kind`, or what --base and --lora-rank imply.
fn effective_kind(args: &TrainArgs) -> Result<Kind> {
    let wants_base = args.base.is_some() || args.lora_rank.is_some();
    match args.kind {
        Some(kind) if wants_base && kind != Kind::TextToImage => {
            bail!("--base and --lora-rank are for --kind text-to-image, not {kind:?}")
        }
        Some(kind) => Ok(kind),
        None if wants_base => Ok(Kind::TextToImage),
        None => Ok(Kind::Pixel),
    }
}

/// `--base`: `builtin` (the built-in model), a pipeline folder, or a repo id in the cache.
fn resolve_base(spec: &str) -> Result<PathBuf> {
    let dir = if spec == "builtin" || (spec == diffuse::default_model::NAME && !Path::new(spec).exists()) {
        diffuse::default_model::materialize(&diffuse::default_model::cache_root())?
    } else {
        diffuse::loading::hub::resolve_model(spec, None, None).with_context(|| format!("--base {spec}"))?
    };
    for component in ["unet", "vae", "text_encoder"] {
        if !dir.join(component).is_dir() {
            bail!("--base {spec}: {} is not a StableDiffusionPipeline folder (no {component}/)", dir.display());
        }
    }
    Ok(dir)
}

/// The LoRA settings from --lora-rank, --lora-alpha, --lora-targets and --lora-name.
fn lora_training(args: &TrainArgs) -> Result<Option<LoraTraining>> {
    let Some(rank) = args.lora_rank else {
        if args.lora_alpha.is_some() || args.lora_name.is_some() || args.lora_dropout != 0.0 {
            bail!("--lora-alpha, --lora-dropout and --lora-name need --lora-rank");
        }
        return Ok(None);
    };
    if args.base.is_none() {
        bail!("--lora-rank needs --base, the model the adapters are trained on");
    }
    let alpha = args.lora_alpha.unwrap_or(rank as f64);
    let (mut unet, mut text_encoder) = (Vec::new(), Vec::new());
    for item in args.lora_targets.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        match item {
            "attention" => unet.extend(lora_adapters::UNET_ATTENTION.iter().map(|t| t.to_string())),
            "cross-attention" => unet.extend(lora_adapters::UNET_CROSS_ATTENTION.iter().map(|t| t.to_string())),
            "feed-forward" => unet.extend(lora_adapters::UNET_FEED_FORWARD.iter().map(|t| t.to_string())),
            "resnets" => unet.extend(lora_adapters::UNET_RESNETS.iter().map(|t| t.to_string())),
            "text-encoder" => text_encoder.extend(lora_adapters::TEXT_ENCODER_ATTENTION.iter().map(|t| t.to_string())),
            other => match other.strip_prefix("te:") {
                Some(name) => text_encoder.push(name.to_string()),
                None => unet.push(other.to_string()),
            },
        }
    }
    if unet.is_empty() {
        bail!("--lora-targets {}: no UNet layers (add `attention` or module names)", args.lora_targets);
    }
    let unet = AdapterConfig { rank, alpha, target_modules: unet };
    unet.validate()?;
    let text_encoder = (!text_encoder.is_empty()).then(|| AdapterConfig { rank, alpha, target_modules: text_encoder });
    let name = match &args.lora_name {
        Some(name) => name.clone(),
        None => args.output.file_name().map(|n| n.to_string_lossy().into_owned()).filter(|n| !n.is_empty()).unwrap_or_else(|| "lora".into()),
    };
    if name.contains(['/', '\\']) || name.is_empty() {
        bail!("--lora-name {name}: a file name without folders");
    }
    if !(0.0..1.0).contains(&args.lora_dropout) {
        bail!("--lora-dropout must be in [0, 1), got {}", args.lora_dropout);
    }
    Ok(Some(LoraTraining { unet, text_encoder, kohya_file_name: format!("{name}.safetensors"), dropout: args.lora_dropout }))
}

/// Opens `--data`: an image folder, or an IDX images file with its labels.
fn open_dataset(args: &TrainArgs, cache_dir: &Path) -> Result<Box<dyn Dataset>> {
    // Text-to-image needs captions, or labels that --class-names turns into captions.
    let kind = effective_kind(args)?;
    let wants_labels = args.class_conditional || (kind == Kind::TextToImage && args.class_names.is_some());
    if args.data.is_dir() {
        if args.labels.is_some() {
            bail!("--labels is for IDX data; an image folder's labels are its sub-folder names");
        }
        let captions = if kind == Kind::TextToImage && args.class_names.is_none() { Captions::Required } else { Captions::Ignore };
        return Ok(Box::new(ImageFolderDataset::open(&args.data, captions, wants_labels)?));
    }
    if !args.data.is_file() {
        bail!("--data {}: no such file or folder", args.data.display());
    }
    let labels = match (&args.labels, wants_labels) {
        (Some(labels), _) => Some(labels.clone()),
        (None, true) => Some(guess_idx_labels_path(&args.data).with_context(|| {
            format!("no labels file found beside {} (pass --labels)", args.data.display())
        })?),
        (None, false) => None,
    };
    Ok(Box::new(IdxDataset::open(&args.data, labels.as_deref(), cache_dir)?))
}

fn parse_dtype(name: &str) -> Result<DType> {
    match name {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        other => bail!("--export-dtype {other} is not one of f32, f16"),
    }
}

/// The first `count` examples of the dataset, prepared as the model sees them: `[N, C, H, W]`.
fn first_images(dataset: &mut dyn Dataset, spec: &ImageSpec, count: usize, device: &Device) -> Result<Tensor> {
    let count = count.min(dataset.len()).max(1);
    let mut values = Vec::with_capacity(count * spec.channels * spec.height * spec.width);
    for index in 0..count {
        values.extend(prepare(&dataset.get(index)?, spec, false)?);
    }
    Ok(Tensor::from_vec(values, (count, spec.channels, spec.height, spec.width), device)?)
}

/// The noise schedule: the flags, else the kind's defaults.
fn noise_schedule(args: &TrainArgs) -> NoiseSchedule {
    let (schedule, start, end) = match effective_kind(args).unwrap_or(Kind::Pixel) {
        Kind::TextToImage => ("scaled_linear", 0.00085, 0.012),
        _ => ("linear", 0.0001, 0.02),
    };
    NoiseSchedule {
        num_train_timesteps: args.num_train_timesteps,
        beta_schedule: args.beta_schedule.clone().unwrap_or_else(|| schedule.to_string()),
        beta_start: args.beta_start.unwrap_or(start),
        beta_end: args.beta_end.unwrap_or(end),
    }
}

/// Builds the model kind's task and the image spec its data is prepared to.
fn build_task(args: &TrainArgs, dataset: &mut dyn Dataset, device: &Device) -> Result<(Box<dyn TrainingTask>, ImageSpec, String)> {
    let prediction_type = PredictionType::parse(&args.prediction_type).context("--prediction-type")?;
    let timestep_sampling = TimestepSampling::parse(&args.timestep_sampling)?;
    let image_fit = ImageFit::parse(&args.image_fit)?;
    let first = dataset.get(0)?;
    let data_channels = args.channels.unwrap_or(if first.image.channels <= 2 { 1 } else { 3 });
    if data_channels != 1 && data_channels != 3 {
        bail!("--channels {data_channels}: must be 1 (gray) or 3 (RGB)");
    }
    // Every kind but pixel trains at a square size: --resolution, or the data's (square) size.
    let square_size = || -> Result<usize> {
        match args.resolution {
            Some(size) => Ok(size),
            None if first.image.width == first.image.height => Ok(first.image.width),
            None => bail!("the images are {}×{}: pass --resolution (and --image-fit)", first.image.width, first.image.height),
        }
    };
    let check_scheduler = |name: &str| -> Result<()> {
        diffuse::pipelines::SCHEDULER_NAMES
            .iter()
            .find(|(known, ..)| *known == name)
            .map(|_| ())
            .with_context(|| format!("--sample-scheduler {name}: not a scheduler name (see `diffuse schedulers`)"))
    };
    match effective_kind(args)? {
        Kind::Pixel => {
            let loss = match args.loss.as_str() {
                "mse" => LossKind::Mse,
                "hybrid" => LossKind::Hybrid { vlb_weight: args.vlb_weight },
                other => bail!("--loss {other} is not one of mse, hybrid"),
            };
            let num_classes = match (args.class_conditional, dataset.num_classes()) {
                (true, Some(n)) => Some(n),
                (true, None) => bail!("--class-conditional: {} has no labels", dataset.describe()),
                (false, _) => None,
            };
            let request = UNetRequest {
                data_channels,
                data_size: (first.image.height, first.image.width),
                resolution: args.resolution,
                num_classes,
                class_dropout: args.class_dropout,
                learned_variance: matches!(loss, LossKind::Hybrid { .. }),
            };
            let unet = resolve_unet_config(args.model_config.as_deref().unwrap_or("small"), &request)?;
            let (height, width) = unet.sample_size.map(|s| s.height_width()).unwrap_or((first.image.height, first.image.width));
            let spec = ImageSpec { channels: unet.in_channels, height, width, fit: image_fit };
            check_scheduler(&args.sample_scheduler)?;
            let pixel = PixelTrainingConfig {
                unet,
                noise: noise_schedule(args),
                prediction_type,
                loss,
                timestep_sampling,
                snr_gamma: args.snr_gamma,
                num_classes,
                class_dropout: args.class_dropout,
                sampling: SampleSettings { count: args.sample_count, steps: args.sample_steps, scheduler: args.sample_scheduler.clone(), seed: args.seed },
            };
            let task = PixelTask::new(pixel, args.seed, device)?;
            let description = format!(
                "UNet2DModel, {} parameters, {}×{}×{}{}",
                task.parameters().num_values(),
                spec.channels,
                spec.height,
                spec.width,
                num_classes.map(|n| format!(", {n} classes")).unwrap_or_default()
            );
            Ok((Box::new(task), spec, description))
        }
        Kind::Autoencoder => {
            let size = square_size()?;
            let (vae_json, vae) = resolve_vae_config(args.model_config.as_deref().unwrap_or("vae-small"), data_channels, size)?;
            let spec = ImageSpec { channels: data_channels, height: size, width: size, fit: image_fit };
            let reference = first_images(dataset, &spec, args.sample_count, device)?;
            let latent_size = size >> vae.block_out_channels.len().saturating_sub(1);
            let latent_channels = vae.latent_channels;
            let config = AutoencoderTrainingConfig {
                vae_json,
                vae,
                reconstruction: ReconstructionLoss::parse(&args.reconstruction_loss)?,
                kl_weight: args.kl_weight,
                export_dtype: parse_dtype(&args.export_dtype)?,
            };
            let task = AutoencoderTask::new(config, reference, args.seed, device)?;
            let description = format!(
                "AutoencoderKL, {} parameters, {data_channels}×{size}×{size} → {latent_channels}×{latent_size}×{latent_size}",
                task.parameters().num_values(),
            );
            Ok((Box::new(task), spec, description))
        }
        Kind::TextToImage => {
            let base = args.base.as_deref().map(resolve_base).transpose()?;
            let lora = lora_training(args)?;
            let vae_dir = match (&args.vae, &base) {
                (Some(dir), _) => dir.clone(),
                (None, Some(base)) => base.join("vae"),
                (None, None) => bail!("--kind text-to-image needs --vae (a trained autoencoder folder) or --base (a pipeline)"),
            };
            let vae = FrozenVae::open(&vae_dir)?;
            let size = square_size()?;
            let spec = ImageSpec { channels: vae.config.in_channels, height: size, width: size, fit: image_fit };
            if let Some(channels) = args.channels {
                if channels != vae.config.in_channels {
                    bail!("--channels {channels}, but the autoencoder takes {} channels", vae.config.in_channels);
                }
            }
            let text_encoder = match (&args.text_encoder, &base, &lora) {
                (Some(dir), _, _) => frozen_text_encoder(dir)?,
                (None, Some(base), Some(_)) => frozen_text_encoder(&base.join("text_encoder"))?,
                (None, Some(base), None) => resolve_text_encoder_config(&base.join("text_encoder/config.json").display().to_string())?,
                (None, None, _) => resolve_text_encoder_config(&args.text_encoder_config)?,
            };
            // An SDXL base: its second text encoder, frozen (LoRA training only).
            let text_encoder_2 = base.as_deref().map(SecondTextEncoder::of_base).transpose()?.flatten();
            if text_encoder_2.is_some() && lora.is_none() {
                bail!("--base {}: an SDXL base is trained with LoRA adapters only: give --lora-rank", args.base.as_deref().unwrap_or_default());
            }
            let text_width = text_encoder.config().hidden_size + text_encoder_2.as_ref().map_or(0, |te| te.config.hidden_size);
            let base_unet_config = base.as_ref().map(|b| b.join("unet/config.json").display().to_string());
            let (unet_json, unet) = match (&base, &lora, &args.model_config) {
                // Adapters train at the data's size, whatever size the base makes by default.
                (Some(base), Some(_), None) => text_to_image::base_unet_config_for_lora(base, &vae, size, text_width)?,
                _ => text_to_image::resolve_unet_config(
                    args.model_config.as_deref().or(base_unet_config.as_deref()).unwrap_or("unet-small"),
                    &vae,
                    size,
                    text_width,
                )?,
            };
            let class_prompts = match &args.class_names {
                Some(names) => {
                    let list = if names == "fashion-mnist" { FASHION_MNIST_CLASS_NAMES } else { names.as_str() };
                    let names: Vec<String> = list.split(',').map(str::to_string).collect();
                    if let Some(n) = dataset.num_classes() {
                        if n > names.len() {
                            bail!("--class-names gives {} names, the data has {n} classes", names.len());
                        }
                    }
                    let templates = match &args.prompt_templates {
                        Some(path) => std::fs::read_to_string(path)
                            .with_context(|| format!("--prompt-templates {}", path.display()))?
                            .lines()
                            .map(str::trim)
                            .filter(|l| !l.is_empty())
                            .map(str::to_string)
                            .collect(),
                        None => DEFAULT_TEMPLATES.iter().map(|t| t.to_string()).collect(),
                    };
                    Some(ClassPrompts::new(&names, templates).context("--class-names / --prompt-templates")?)
                }
                None => None,
            };
            let prompts = if !args.sample_prompts.is_empty() {
                args.sample_prompts.clone()
            } else if let Some(class_prompts) = &class_prompts {
                class_prompts.main_prompts()
            } else {
                (0..dataset.len().min(4)).map(|i| Ok(dataset.get(i)?.caption.unwrap_or_default())).collect::<Result<Vec<_>>>()?
            };
            check_scheduler(&args.sample_scheduler)?;
            let config = TextToImageTrainingConfig {
                unet_json,
                unet,
                text_encoder,
                text_encoder_2,
                vae,
                noise: noise_schedule(args),
                prediction_type,
                timestep_sampling,
                snr_gamma: args.snr_gamma,
                caption_dropout: args.caption_dropout,
                class_prompts,
                sampling: TextSampleSettings {
                    prompts,
                    count: args.sample_count,
                    steps: args.sample_steps,
                    guidance_scale: args.sample_guidance_scale,
                    scheduler: args.sample_scheduler.clone(),
                    seed: args.seed,
                },
                export_dtype: parse_dtype(&args.export_dtype)?,
                base: base.clone(),
                lora,
            };
            let task = TextToImageTask::new(config, args.seed, device)?;
            let what = match (&base, args.lora_rank) {
                (Some(base), Some(rank)) => format!("LoRA (rank {rank}) on {}", base.display()),
                (Some(base), None) => format!("UNet2DConditionModel + CLIPTextModel fine-tuned from {}", base.display()),
                (None, _) => "UNet2DConditionModel + CLIPTextModel".to_string(),
            };
            let description = format!("{what}, {} trained parameters, images {size}×{size}", task.parameters().num_values());
            Ok((Box::new(task), spec, description))
        }
    }
}

/// The library's names, in its error messages, for the settings these flags set; longer
/// phrases first.
const FLAGS: &[(&str, &str)] = &[
    ("`steps`", "--steps"),
    ("`batch_size`", "--batch-size"),
    ("`grad_accum`", "--grad-accum"),
    ("`grad_clip`", "--grad-clip"),
    ("`sample_every`", "--sample-every"),
    ("`resume`", "--resume"),
    ("`output_dir`", "--output"),
    ("drop the `ema` config", "drop the EMA options"),
    ("has no `ema` config", "has none (--ema-decay 0?)"),
    ("`model_config`", "--model-config"),
    ("`text_encoder_config`", "--text-encoder-config"),
    ("`caption_dropout`", "--caption-dropout"),
    ("(`base`)", "(--base)"),
    ("the LoRA `dropout`", "--lora-dropout"),
    ("(`class_prompts`)", "(--class-names)"),
    ("`kl_weight`", "--kl-weight"),
    ("`class_dropout`", "--class-dropout"),
    ("set `num_classes` (and use data", "pass --class-conditional (and data"),
    ("(`num_classes`)", "(--class-conditional)"),
    ("`ImageFit::Pad` or `ImageFit::Resize`", "--image-fit pad or resize"),
    ("`ImageFit::Resize`", "--image-fit resize"),
    ("to such a size with `ImageFit::Pad`", "with --resolution and --image-fit pad"),
    ("`rank`", "--lora-rank"),
    ("`alpha`", "--lora-alpha"),
    ("`target_modules`", "--lora-targets"),
];

pub fn run(args: TrainArgs) -> Result<()> {
    run_training(args).map_err(|e| crate::name_flags(e, FLAGS))
}

fn run_training(args: TrainArgs) -> Result<()> {
    let device = crate::device();
    let lr_schedule = LrSchedule::parse(&args.lr_schedule)?;
    let ema = (args.ema_decay > 0.0).then_some(EmaConfig {
        decay: args.ema_decay,
        min_decay: args.ema_min_decay,
        update_after_step: args.ema_update_after_step,
        use_ema_warmup: args.ema_warmup,
        inv_gamma: args.ema_inv_gamma,
        power: args.ema_power,
    });
    let config = TrainConfig {
        output_dir: args.output.clone(),
        steps: args.steps,
        batch_size: args.batch_size,
        grad_accum: args.grad_accum,
        learning_rate: args.lr,
        warmup_steps: args.warmup,
        lr_schedule,
        adamw: AdamWConfig { beta1: args.adam_beta1, beta2: args.adam_beta2, eps: args.adam_eps, weight_decay: args.weight_decay },
        grad_clip: (args.grad_clip != 0.0).then_some(args.grad_clip),
        ema,
        checkpoint_every: args.checkpoint_every,
        keep_checkpoints: args.keep_checkpoints,
        sample_every: args.sample_every,
        // A run from a base model shows the base first (the "before" of a LoRA).
        sample_at_start: args.base.is_some(),
        seed: args.seed.wrapping_add(1),
        resume: args.resume,
    };
    // Everything that can be checked without the data is checked before reading it.
    config.validate()?;
    effective_kind(&args)?;
    lora_training(&args)?;
    PredictionType::parse(&args.prediction_type).context("--prediction-type")?;
    parse_dtype(&args.export_dtype)?;
    if args.output.exists() && !args.output.is_dir() {
        bail!("--output {}: exists and is not a folder", args.output.display());
    }
    std::fs::create_dir_all(&args.output).with_context(|| format!("--output {}", args.output.display()))?;

    let mut dataset = open_dataset(&args, &args.output.join("data-cache"))?;
    if dataset.is_empty() {
        bail!("{}: the dataset is empty", dataset.describe());
    }
    let description = dataset.describe();
    let (mut task, spec, model_description) = build_task(&args, dataset.as_mut(), &device)?;
    let mut loader = DataLoader::new(dataset, spec, args.seed, args.random_flip)?;

    let quiet = args.quiet;
    let bar = ProgressBar::new(args.steps as u64);
    bar.set_draw_target(if quiet || !std::io::stderr().is_terminal() { ProgressDrawTarget::hidden() } else { ProgressDrawTarget::stderr() });
    bar.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} steps {msg}").unwrap_or_else(|_| ProgressStyle::default_bar()));
    let notice = |text: &str| {
        if !quiet {
            bar.suspend(|| eprintln!("{text}"));
        }
    };
    notice(&format!("data: {description}"));
    notice(&format!("model: {model_description}"));
    let mut hooks = Hooks {
        on_progress: Box::new(|progress| {
            bar.set_position(progress.step as u64);
            // Rate and ETA from the loop (a resumed run starts its count at the checkpoint).
            bar.set_message(format!(
                "loss {:.4}, lr {:.2e}, {:.2} it/s, ETA {}",
                progress.loss,
                progress.learning_rate,
                progress.steps_per_second,
                format_duration(progress.eta_seconds)
            ));
            ControlFlow::Continue(())
        }),
        on_message: Box::new(|text| notice(text)),
        ..Hooks::default()
    };
    if args.profile {
        diffuse::ops::profile::enable();
    }
    let started = std::time::Instant::now();
    let summary = train(task.as_mut(), &mut loader, &config, &mut hooks)?;
    drop(hooks);
    bar.finish_and_clear();
    if args.profile {
        let total = started.elapsed().as_secs_f64();
        let mut accounted = 0.0;
        eprintln!("time per operation over {total:.1}s ({} steps):", summary.losses.len());
        for (name, time, calls) in diffuse::ops::profile::totals() {
            accounted += time.as_secs_f64();
            eprintln!("  {name:<30} {:>8.2}s {:>5.1}%  ({calls} calls)", time.as_secs_f64(), 100.0 * time.as_secs_f64() / total);
        }
        eprintln!("  {:<30} {:>8.2}s {:>5.1}%", "other", total - accounted, 100.0 * (total - accounted) / total);
    }
    if let Some(dir) = summary.exported {
        outln!("{}", dir.display());
    }
    Ok(())
}
