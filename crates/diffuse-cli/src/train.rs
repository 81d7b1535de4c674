//! `diffuse train`: train from scratch on IDX files or an image folder, and write the model as a
//! diffusers folder: a pixel-space UNet2DModel (unconditional or class-conditional) as a
//! DDPMPipeline, an AutoencoderKL, or a text-to-image UNet2DConditionModel (with its CLIP text
//! encoder) in a trained autoencoder's latents as a StableDiffusionPipeline.

use std::io::IsTerminal;
use std::ops::ControlFlow;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::DType;
use diffuse::schedulers::PredictionType;
use diffuse::ops::Precision;
use diffuse::training::autoencoder::{self, ReconstructionLoss};
use diffuse::training::data::ImageFit;
use diffuse::training::ema::EmaConfig;
use diffuse::training::objectives::LossKind;
use diffuse::training::optimizer::{AdamWConfig, LrSchedule};
use diffuse::training::pixel::{SampleSettings, TimestepSampling, PRESETS};
use diffuse::training::recipe::{AutoencoderRecipe, LoraRecipe, ModelKind, PixelRecipe, TextToImageRecipe, TrainingRecipe};
use diffuse::training::text_to_image;
use diffuse::training::{Hooks, TrainConfig};
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
    /// The exported weights' type: f32, f16 or bf16 (autoencoder and text-to-image; the
    /// checkpoints stay f32).
    #[arg(long, default_value = "f32")]
    export_dtype: String,
    /// `no`, or `bf16`: mixed precision as accelerate's `--mixed_precision bf16`. The
    /// convolutions', linear layers' and attention's products (forward and backward) take
    /// bf16 operands with f32 sums; weights, gradients, norms, the optimizer and checkpoints
    /// stay f32, and so does the export unless --export-dtype says otherwise. Faster on CPUs with
    /// AVX512-BF16; slower than f32 without it (AVX2 widens bf16 values for f32 arithmetic);
    /// results differ slightly from f32's; resuming is exact either way.
    #[arg(long, default_value = "no")]
    mixed_precision: String,
    /// Keep only the inputs of the UNet's resnets and attention blocks for the backward pass,
    /// which runs each block again (diffusers' --gradient_checkpointing): activation memory of
    /// about one block, a third more time per step, the same gradients up to rounding. Not with
    /// --lora-dropout (its masks would be drawn twice): those blocks run as usual.
    #[arg(long)]
    gradient_checkpointing: bool,
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

/// `--mixed-precision`: `no` (f32) or `bf16`.
pub fn parse_mixed_precision(value: &str) -> Result<Precision> {
    match value {
        "no" | "fp32" | "f32" => Ok(Precision::F32),
        "bf16" => Ok(Precision::Bf16),
        "fp16" | "f16" => bail!("--mixed-precision {value}: the CPU kernels compute in bf16, not f16; use --mixed-precision bf16"),
        other => bail!("--mixed-precision {other} is not one of no, bf16"),
    }
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

/// `--kind`, or what --base and --lora-rank imply.
fn effective_kind(args: &TrainArgs) -> Result<ModelKind> {
    let wants_base = args.base.is_some() || args.lora_rank.is_some();
    let kind = match args.kind {
        Some(kind) if wants_base && kind != Kind::TextToImage => {
            bail!("--base and --lora-rank are for --kind text-to-image, not {kind:?}")
        }
        Some(kind) => kind,
        None if wants_base => Kind::TextToImage,
        None => Kind::Pixel,
    };
    Ok(match kind {
        Kind::Pixel => ModelKind::Pixel,
        Kind::Autoencoder => ModelKind::Autoencoder,
        Kind::TextToImage => ModelKind::TextToImage,
    })
}

/// The LoRA settings from --lora-rank, --lora-alpha, --lora-dropout, --lora-targets and
/// --lora-name.
fn lora_recipe(args: &TrainArgs) -> Result<Option<LoraRecipe>> {
    let Some(rank) = args.lora_rank else {
        if args.lora_alpha.is_some() || args.lora_name.is_some() || args.lora_dropout != 0.0 {
            bail!("--lora-alpha, --lora-dropout and --lora-name need --lora-rank");
        }
        return Ok(None);
    };
    let name = match &args.lora_name {
        Some(name) => name.clone(),
        None => args.output.file_name().map(|n| n.to_string_lossy().into_owned()).filter(|n| !n.is_empty()).unwrap_or_else(|| "lora".into()),
    };
    Ok(Some(LoraRecipe {
        rank,
        alpha: args.lora_alpha,
        dropout: args.lora_dropout,
        targets: args.lora_targets.split(',').map(str::to_string).collect(),
        name,
    }))
}

fn parse_dtype(name: &str) -> Result<DType> {
    match name {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::BF16),
        other => bail!("--export-dtype {other} is not one of f32, f16, bf16"),
    }
}

/// The library's recipe from the flags.
fn recipe(args: &TrainArgs) -> Result<TrainingRecipe> {
    let kind = effective_kind(args)?;
    let mut recipe = TrainingRecipe::new(kind, &args.data);
    recipe.labels = args.labels.clone();
    recipe.model_config = args.model_config.clone();
    recipe.channels = args.channels;
    recipe.resolution = args.resolution;
    recipe.image_fit = ImageFit::parse(&args.image_fit)?;
    recipe.random_flip = args.random_flip;
    recipe.noise.num_train_timesteps = args.num_train_timesteps;
    if let Some(schedule) = &args.beta_schedule {
        recipe.noise.beta_schedule = schedule.clone();
    }
    recipe.noise.beta_start = args.beta_start.unwrap_or(recipe.noise.beta_start);
    recipe.noise.beta_end = args.beta_end.unwrap_or(recipe.noise.beta_end);
    recipe.prediction_type = PredictionType::parse(&args.prediction_type).context("--prediction-type")?;
    recipe.timestep_sampling = TimestepSampling::parse(&args.timestep_sampling)?;
    recipe.snr_gamma = args.snr_gamma;
    recipe.sampling = SampleSettings { count: args.sample_count, steps: args.sample_steps, scheduler: args.sample_scheduler.clone(), seed: args.seed };
    recipe.export_dtype = parse_dtype(&args.export_dtype)?;
    recipe.seed = args.seed;
    recipe.pixel = PixelRecipe {
        loss: match args.loss.as_str() {
            "mse" => LossKind::Mse,
            "hybrid" => LossKind::Hybrid { vlb_weight: args.vlb_weight },
            other => bail!("--loss {other} is not one of mse, hybrid"),
        },
        class_conditional: args.class_conditional,
        class_dropout: args.class_dropout,
    };
    recipe.autoencoder =
        AutoencoderRecipe { reconstruction: ReconstructionLoss::parse(&args.reconstruction_loss)?, kl_weight: args.kl_weight };
    let prompt_templates = match &args.prompt_templates {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("--prompt-templates {}", path.display()))?
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect(),
        ),
        None => None,
    };
    recipe.text_to_image = TextToImageRecipe {
        base: args.base.clone(),
        lora: lora_recipe(args)?,
        vae: args.vae.clone(),
        text_encoder: args.text_encoder.clone(),
        text_encoder_config: args.text_encoder_config.clone(),
        caption_dropout: args.caption_dropout,
        class_names: args.class_names.as_deref().map(text_to_image::class_names),
        prompt_templates,
        sample_prompts: args.sample_prompts.clone(),
        sample_guidance_scale: args.sample_guidance_scale,
    };
    Ok(recipe)
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
    ("the LoRA `dropout`", "--lora-dropout"),
    ("(`class_prompts`)", "(--class-names)"),
    ("`kl_weight`", "--kl-weight"),
    ("`class_dropout`", "--class-dropout"),
    ("set `num_classes` (and use data", "pass --class-conditional (and data"),
    ("(`num_classes`)", "(--class-conditional)"),
    ("`ImageFit::Pad` or `ImageFit::Resize`", "--image-fit pad or resize"),
    ("`ImageFit::Resize`", "--image-fit resize"),
    ("to such a size with `ImageFit::Pad`", "with --resolution and --image-fit pad"),
    ("`lora` needs `base`", "--lora-rank needs --base"),
    ("set `lora`", "give --lora-rank"),
    ("(`base`)", "(--base)"),
    ("`base`", "--base"),
    ("LoRA `targets`", "--lora-targets"),
    ("LoRA `name`", "--lora-name"),
    ("the samples' `scheduler`", "--sample-scheduler"),
    ("`class_conditional`", "--class-conditional"),
    ("`class_names` / `prompt_templates`", "--class-names / --prompt-templates"),
    ("`class_names`", "--class-names"),
    ("set `resolution` (and `image_fit`)", "pass --resolution (and --image-fit)"),
    ("set `labels`", "pass --labels"),
    ("`labels`", "--labels"),
    ("`data`", "--data"),
    ("`vae`", "--vae"),
    ("`channels`", "--channels"),
    ("text-to-image training needs", "--kind text-to-image needs"),
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
        mixed_precision: parse_mixed_precision(&args.mixed_precision)?,
        gradient_checkpointing: args.gradient_checkpointing,
    };
    let recipe = recipe(&args)?;
    let quiet = args.quiet;
    let bar = ProgressBar::new(args.steps as u64);
    bar.set_draw_target(if quiet || !std::io::stderr().is_terminal() { ProgressDrawTarget::hidden() } else { ProgressDrawTarget::stderr() });
    bar.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} steps {msg}").unwrap_or_else(|_| ProgressStyle::default_bar()));
    let notice = |text: &str| {
        if !quiet {
            bar.suspend(|| eprintln!("{text}"));
        }
    };
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
    let summary = diffuse::training::recipe::run(&recipe, &config, &mut hooks, &device)?;
    drop(hooks);
    bar.finish_and_clear();
    if args.profile {
        let total = started.elapsed().as_secs_f64();
        let mut accounted = 0.0;
        eprintln!("time per operation over {total:.1}s ({} steps):", summary.losses.len());
        for diffuse::ops::profile::Total { name, time, calls, flops } in diffuse::ops::profile::totals() {
            let seconds = time.as_secs_f64();
            accounted += seconds;
            let rate = if flops > 0.0 { format!(", {:.0} GFLOP/s", flops / seconds.max(1e-9) / 1e9) } else { String::new() };
            eprintln!("  {name:<30} {seconds:>8.2}s {:>5.1}%  ({calls} calls{rate})", 100.0 * seconds / total);
        }
        eprintln!("  {:<30} {:>8.2}s {:>5.1}%", "other", total - accounted, 100.0 * (total - accounted) / total);
        let choices = diffuse::ops::profile::choices();
        if !choices.is_empty() {
            let listed: Vec<String> = choices.iter().map(|(name, calls)| format!("{name} {calls}")).collect();
            eprintln!("  kernels chosen (calls): {}", listed.join(", "));
        }
    }
    if let Some(dir) = summary.exported {
        outln!("{}", dir.display());
    }
    Ok(())
}
