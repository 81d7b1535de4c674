//! `diffuse train`: train a pixel-space UNet2DModel (unconditional or class-conditional) from
//! scratch on IDX files or an image folder, and write it as a diffusers DDPMPipeline folder.

use std::io::IsTerminal;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Device;
use diffuse::schedulers::PredictionType;
use diffuse::training::data::{guess_idx_labels_path, Captions, DataLoader, Dataset, IdxDataset, ImageFit, ImageFolderDataset, ImageSpec};
use diffuse::training::ema::EmaConfig;
use diffuse::training::objectives::LossKind;
use diffuse::training::optimizer::{AdamWConfig, LrSchedule};
use diffuse::training::pixel::{
    resolve_unet_config, NoiseSchedule, PixelTask, PixelTrainingConfig, SampleSettings, TimestepSampling, UNetRequest, PRESETS,
};
use diffuse::training::{train, Hooks, TrainConfig, TrainingTask};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

#[derive(clap::Args)]
#[command(after_help = presets_help())]
pub struct TrainArgs {
    /// The training images: an IDX images file (MNIST / Fashion-MNIST format, gzipped or not),
    /// or a folder of PNG/JPEG/BMP images (searched recursively).
    #[arg(long)]
    data: PathBuf,
    /// The folder to write into: checkpoints/, samples/, loss.csv, loss.png, data-cache/ (a
    /// decompressed copy of gzipped IDX data) and, at the end, the trained model as a diffusers
    /// DDPMPipeline (model_index.json, unet/, scheduler/).
    #[arg(long)]
    output: PathBuf,
    /// With IDX data: the labels file (default: the *-labels-idx1-ubyte[.gz] file beside --data).
    #[arg(long)]
    labels: Option<PathBuf>,
    /// The UNet architecture: a preset name (see below) or a diffusers UNet2DModel config.json.
    /// Channels, sample size and class embeddings follow the data unless the file states them.
    #[arg(long, default_value = "small")]
    model_config: String,
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
    /// The noise schedule: linear, scaled_linear, squaredcos_cap_v2, sigmoid.
    #[arg(long, default_value = "linear")]
    beta_schedule: String,
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
    /// Images in a sample grid (per class row for class-conditional models).
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
    let mut text = String::from("Model presets (--model-config):\n");
    for (name, description, _) in PRESETS {
        text.push_str(&format!("  {name:<14} {description}\n"));
    }
    text
}

/// Opens `--data`: an image folder, or an IDX images file with its labels.
fn open_dataset(args: &TrainArgs, cache_dir: &Path) -> Result<Box<dyn Dataset>> {
    if args.data.is_dir() {
        if args.labels.is_some() {
            bail!("--labels is for IDX data; an image folder's labels are its sub-folder names");
        }
        return Ok(Box::new(ImageFolderDataset::open(&args.data, Captions::Ignore, args.class_conditional)?));
    }
    if !args.data.is_file() {
        bail!("--data {}: no such file or folder", args.data.display());
    }
    let labels = match (&args.labels, args.class_conditional) {
        (Some(labels), _) => Some(labels.clone()),
        (None, true) => Some(guess_idx_labels_path(&args.data).with_context(|| {
            format!("--class-conditional: no labels file found beside {} (pass --labels)", args.data.display())
        })?),
        (None, false) => None,
    };
    Ok(Box::new(IdxDataset::open(&args.data, labels.as_deref(), cache_dir)?))
}

pub fn run(args: TrainArgs) -> Result<()> {
    let device = Device::Cpu;
    let prediction_type = PredictionType::parse(&args.prediction_type).context("--prediction-type")?;
    let loss = match args.loss.as_str() {
        "mse" => LossKind::Mse,
        "hybrid" => LossKind::Hybrid { vlb_weight: args.vlb_weight },
        other => bail!("--loss {other} is not one of mse, hybrid"),
    };
    let timestep_sampling = TimestepSampling::parse(&args.timestep_sampling)?;
    let lr_schedule = LrSchedule::parse(&args.lr_schedule)?;
    let image_fit = ImageFit::parse(&args.image_fit)?;
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
        seed: args.seed.wrapping_add(1),
        resume: args.resume,
    };
    // Everything that can be checked without the data is checked before reading it.
    config.validate()?;
    if args.output.exists() && !args.output.is_dir() {
        bail!("--output {}: exists and is not a folder", args.output.display());
    }
    std::fs::create_dir_all(&args.output).with_context(|| format!("--output {}", args.output.display()))?;

    let mut dataset = open_dataset(&args, &args.output.join("data-cache"))?;
    if dataset.is_empty() {
        bail!("{}: the dataset is empty", dataset.describe());
    }
    let first = dataset.get(0)?;
    let data_channels = if first.image.channels <= 2 { 1 } else { 3 };
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
    let unet = resolve_unet_config(&args.model_config, &request)?;
    let (height, width) = unet.sample_size.map(|s| s.height_width()).unwrap_or((first.image.height, first.image.width));
    let spec = ImageSpec { channels: unet.in_channels, height, width, fit: image_fit };
    let pixel = PixelTrainingConfig {
        unet,
        noise: NoiseSchedule { num_train_timesteps: args.num_train_timesteps, beta_schedule: args.beta_schedule.clone(), ..NoiseSchedule::default() },
        prediction_type,
        loss,
        timestep_sampling,
        snr_gamma: args.snr_gamma,
        num_classes,
        class_dropout: args.class_dropout,
        sampling: SampleSettings { count: args.sample_count, steps: args.sample_steps, scheduler: args.sample_scheduler.clone(), seed: args.seed },
    };
    // The sample scheduler is resolved now so that a wrong name fails before training.
    diffuse::pipelines::SCHEDULER_NAMES
        .iter()
        .find(|(name, ..)| *name == args.sample_scheduler)
        .with_context(|| format!("--sample-scheduler {}: not a scheduler name (see `diffuse schedulers`)", args.sample_scheduler))?;
    let description = dataset.describe();
    let mut task = PixelTask::new(pixel, args.seed, &device)?;
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
    notice(&format!(
        "model: UNet2DModel, {} parameters, {}×{}×{}{}",
        task.parameters().num_values(),
        spec.channels,
        spec.height,
        spec.width,
        num_classes.map(|n| format!(", {n} classes")).unwrap_or_default()
    ));
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
    let summary = train(&mut task, &mut loader, &config, &mut hooks)?;
    drop(hooks);
    bar.finish_and_clear();
    if let Some(dir) = summary.exported {
        println!("{}", dir.display());
    }
    Ok(())
}
