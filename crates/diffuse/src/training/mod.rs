//! Training from scratch on candle's autograd: the loop every model kind shares.
//!
//! A model kind (a [`TrainingTask`]: so far the pixel-space UNet of [`pixel`]) owns its
//! parameters and computes a batch's loss; the loop here does the rest, as diffusers' training
//! scripts and improved-diffusion's `TrainLoop` do: gradient accumulation, clipping, AdamW with
//! a warmed-up learning-rate schedule, the EMA of the weights, checkpoints every N steps
//! (resumable exactly), the loss per step in `loss.csv` and as `loss.png`, sample grids every
//! N steps, and at the end the (EMA) model exported as a diffusers pipeline folder.
//!
//! Layout of the output folder: `model_index.json` and the components (the exported
//! pipeline), `checkpoints/`, `samples/step-NNNNNNN.png`, `loss.csv`, `loss.png`.

pub mod autoencoder;
pub mod checkpoint;
pub mod data;
pub mod ema;
pub mod export;
pub mod objectives;
pub mod optimizer;
pub mod params;
pub mod pixel;
pub mod plot;
pub mod recipe;
pub mod text_to_image;

use std::collections::HashMap;
use std::io::Write;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use serde_json::{Map, Value};

use self::checkpoint::{Checkpoint, CheckpointState, EmaState, OptimizerState, WriteFile};
use self::data::{Batch, DataLoader};
use self::ema::{Ema, EmaConfig};
use self::optimizer::{clip_grad_norm, global_grad_norm, AdamW, AdamWConfig, GradAccumulator, LearningRate, LrSchedule};
use self::params::Parameters;
use crate::ops::checkpoint::GradientCheckpointing;
use crate::ops::Precision;
use crate::rng::TorchGenerator;
use crate::{bail, Error, Result};

/// An 8-bit image: width, height, channels and the interleaved bytes.
pub type Image8 = (usize, usize, usize, Vec<u8>);

/// A model kind being trained.
pub trait TrainingTask {
    /// The trainable parameters (the model reads them through its `VarBuilder`).
    fn parameters(&self) -> &Parameters;

    /// The settings that define the model and its objective; resuming a checkpoint whose
    /// identity differs is refused, naming the difference.
    fn identity(&self) -> Map<String, Value>;

    /// One micro-batch's loss (a scalar with gradients to the parameters), drawing whatever
    /// randomness it needs from `generator`.
    fn loss(&mut self, batch: &Batch, generator: &mut TorchGenerator) -> Result<Tensor>;

    /// The task's own state for checkpoints (e.g. loss-aware timestep sampling's history).
    fn state(&self) -> Result<(Value, HashMap<String, Tensor>)> {
        Ok((Value::Null, HashMap::new()))
    }

    /// Restores what [`TrainingTask::state`] saved.
    fn load_state(&mut self, _state: &Value, _tensors: &HashMap<String, Tensor>) -> Result<()> {
        Ok(())
    }

    /// Sample images (as 8-bit `(width, height, channels, bytes)`) from the model with the
    /// given weights, always from the same seeds, and how many columns the grid has.
    fn samples(&mut self, weights: &HashMap<String, Tensor>) -> Result<(Vec<Image8>, usize)>;

    /// Writes the model with the given weights as a diffusers pipeline folder at `dir`.
    fn export(&self, weights: &HashMap<String, Tensor>, dir: &Path) -> Result<()>;
}

/// The loop's settings.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    /// The run's folder: checkpoints, samples, the loss log and the export.
    pub output_dir: PathBuf,
    /// Optimizer steps to reach (counting those of a resumed run).
    pub steps: usize,
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// The peak learning rate.
    pub learning_rate: f64,
    /// Steps of linear warm-up from 0.
    pub warmup_steps: usize,
    /// The learning rate after the warm-up.
    pub lr_schedule: LrSchedule,
    /// The optimizer's hyper-parameters.
    pub adamw: AdamWConfig,
    /// Clip the global gradient norm to this.
    pub grad_clip: Option<f64>,
    /// Keep (and export) an EMA of the weights.
    pub ema: Option<EmaConfig>,
    /// Write a checkpoint every this many steps (0: only at the end).
    pub checkpoint_every: usize,
    /// How many checkpoints to keep.
    pub keep_checkpoints: usize,
    /// Write a sample grid every this many steps (and at the end).
    pub sample_every: Option<usize>,
    /// With `sample_every`, also write one before the first step (a base model's samples).
    pub sample_at_start: bool,
    /// Seeds the training draws (the task's: timesteps, noise, label dropout). The data order
    /// has the loader's seed and the initial weights the task's.
    pub seed: u64,
    /// Continue from the output folder's latest checkpoint.
    pub resume: bool,
    /// The products of the forward and backward passes: f32, or bf16 mixed precision
    /// (accelerate's `mixed_precision="bf16"`: bf16 operands, f32 sums; the weights, their
    /// gradients, the optimizer and the checkpoints stay f32, the export is in the task's
    /// export type). See [`crate::ops::with_training_precision`].
    pub mixed_precision: Precision,
    /// Keep only the inputs of the model's resnets and attention blocks for the backward pass,
    /// which runs each block again (diffusers' `--gradient_checkpointing`): less memory, about a
    /// third more time, the same gradients up to rounding. See [`crate::ops::checkpoint`].
    pub gradient_checkpointing: bool,
}

impl TrainConfig {
    /// `diffuse train`'s defaults, writing into `output_dir`: 10,000 steps of batch 16, AdamW
    /// (β 0.95, 0.999, ε 1e-8, weight decay 1e-6) at 1e-4 after 500 warm-up steps with a cosine
    /// decay, gradients clipped to norm 1, an EMA up to 0.9999, a checkpoint every 1,000 steps
    /// (3 kept), no sample grids before the end, seed 1 (`diffuse train --seed 0`'s).
    pub fn new(output_dir: impl Into<PathBuf>) -> Self {
        Self {
            output_dir: output_dir.into(),
            steps: 10_000,
            batch_size: 16,
            grad_accum: 1,
            learning_rate: 1e-4,
            warmup_steps: 500,
            lr_schedule: LrSchedule::Cosine,
            adamw: AdamWConfig { beta1: 0.95, beta2: 0.999, eps: 1e-8, weight_decay: 1e-6 },
            grad_clip: Some(1.0),
            ema: Some(EmaConfig { power: 0.75, ..EmaConfig::default() }),
            checkpoint_every: 1000,
            keep_checkpoints: 3,
            sample_every: None,
            sample_at_start: false,
            seed: 1,
            resume: false,
            mixed_precision: Precision::F32,
            gradient_checkpointing: false,
        }
    }

    /// Checks every setting before any work is done.
    pub fn validate(&self) -> Result<()> {
        if self.steps == 0 {
            bail!("`steps` must be at least 1");
        }
        if self.batch_size == 0 {
            bail!("`batch_size` must be at least 1");
        }
        if self.grad_accum == 0 {
            bail!("`grad_accum` must be at least 1");
        }
        LearningRate::new(self.learning_rate, self.warmup_steps, self.steps, self.lr_schedule)?;
        self.adamw.validate()?;
        if let Some(clip) = self.grad_clip {
            if !(clip.is_finite() && clip > 0.0) {
                bail!("`grad_clip` must be a finite number above 0, got {clip}");
            }
        }
        if let Some(ema) = &self.ema {
            ema.validate()?;
        }
        if self.sample_every == Some(0) {
            bail!("`sample_every` must be at least 1");
        }
        Ok(())
    }

    fn checkpoints_dir(&self) -> PathBuf {
        self.output_dir.join("checkpoints")
    }
}

/// What the progress callback sees after each optimizer step.
#[derive(Debug, Clone)]
pub struct Progress {
    /// Optimizer steps done.
    pub step: usize,
    /// The step the run ends at.
    pub total_steps: usize,
    /// This step's loss (mean over its micro-batches).
    pub loss: f32,
    /// The learning rate this step used.
    pub learning_rate: f64,
    /// The global gradient norm before clipping.
    pub grad_norm: f32,
    /// Optimizer steps per second in this run so far.
    pub steps_per_second: f64,
    /// Seconds to the last step at that rate.
    pub eta_seconds: f64,
}

/// Called after each step; `Break` stops the run there (without a final checkpoint), as a
/// kill would.
pub type OnProgress<'a> = dyn FnMut(&Progress) -> ControlFlow<()> + 'a;

/// Callbacks and the file writer the loop uses; the defaults do nothing and write to disk.
pub struct Hooks<'a> {
    /// After each optimizer step.
    pub on_progress: Box<OnProgress<'a>>,
    /// Notices: checkpoints and sample grids written, resuming, and the like.
    pub on_message: Box<dyn FnMut(&str) + 'a>,
    /// How checkpoint files are written (tests inject failures here).
    pub write_file: Box<WriteFile<'a>>,
}

impl Default for Hooks<'_> {
    fn default() -> Self {
        Self {
            on_progress: Box::new(|_| ControlFlow::Continue(())),
            on_message: Box::new(|_| {}),
            write_file: Box::new(checkpoint::write_and_sync),
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    /// The optimizer steps done (including those of the run resumed).
    pub step: usize,
    /// True when `on_progress` stopped the run before the last step.
    pub stopped: bool,
    /// The loss of each step this run made, `(step, loss)`.
    pub losses: Vec<(u64, f32)>,
    /// The exported pipeline folder (the output folder), after a complete run.
    pub exported: Option<PathBuf>,
}

const LOSS_CSV: &str = "loss.csv";
const LOSS_CSV_HEADER: &str = "step,loss,learning_rate,grad_norm";

/// Reads `loss.csv`'s `(step, loss)` rows up to `last_step`, and rewrites the file with only
/// those (a run killed after its last checkpoint logged steps that will be redone).
fn truncate_loss_log(path: &Path, last_step: u64) -> Result<Vec<(u64, f32)>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(Error::io(path, e)),
    };
    let mut kept = vec![LOSS_CSV_HEADER.to_string()];
    let mut losses = Vec::new();
    for line in text.lines().skip(1) {
        let mut fields = line.split(',');
        let (Some(step), Some(loss)) = (fields.next().and_then(|s| s.parse::<u64>().ok()), fields.next().and_then(|s| s.parse::<f32>().ok())) else {
            continue;
        };
        if step <= last_step {
            kept.push(line.to_string());
            losses.push((step, loss));
        }
    }
    let mut contents = kept.join("\n");
    contents.push('\n');
    crate::files::write_atomically(path, contents.as_bytes())?;
    Ok(losses)
}

/// Writes `loss.png` from the losses logged so far.
fn write_loss_chart(output_dir: &Path, losses: &[(u64, f32)]) -> Result<()> {
    let chart = plot::loss_chart(losses, 800, 400);
    let (width, height) = (chart.width() as usize, chart.height() as usize);
    crate::pipelines::write_png(&output_dir.join("loss.png"), width, height, 3, chart.as_raw(), &[])
}

/// Everything the loop updates, in memory.
struct RunState {
    values: Vec<Vec<f32>>,
    optimizer: AdamW,
    ema: Option<Ema>,
    generator: TorchGenerator,
    step: usize,
}

/// Trains `task` on `loader`'s data until `config.steps` optimizer steps are done, then
/// exports the (EMA) model into the output folder.
pub fn train(task: &mut dyn TrainingTask, loader: &mut DataLoader, config: &TrainConfig, hooks: &mut Hooks) -> Result<TrainSummary> {
    config.validate()?;
    let learning_rate = LearningRate::new(config.learning_rate, config.warmup_steps, config.steps, config.lr_schedule)?;
    let checkpoints_dir = config.checkpoints_dir();
    std::fs::create_dir_all(&checkpoints_dir).map_err(|e| Error::io(&checkpoints_dir, e))?;
    checkpoint::remove_stale_temporaries(&checkpoints_dir);
    let csv_path = config.output_dir.join(LOSS_CSV);
    let device = task.parameters().vars().first().map(|v| v.device().clone()).unwrap_or(Device::Cpu);
    let sizes = task.parameters().sizes();

    let mut all_losses: Vec<(u64, f32)>;
    let mut run = if config.resume {
        let Some(dir) = checkpoint::latest(&checkpoints_dir)? else {
            bail!("`resume`: {} holds no checkpoint to resume", config.output_dir.display());
        };
        let saved = checkpoint::load(&dir)?;
        let state = resume_state(task, loader, config, &saved, &dir)?;
        if saved.state.learning_rate != learning_rate {
            (hooks.on_message)(&format!(
                "note: the learning-rate schedule differs from the checkpoint's ({:?}); continuing with {:?}",
                saved.state.learning_rate, learning_rate
            ));
        }
        all_losses = truncate_loss_log(&csv_path, state.step as u64)?;
        (hooks.on_message)(&format!("resuming from {} (step {})", dir.display(), state.step));
        state
    } else {
        if let Some(dir) = checkpoint::latest(&checkpoints_dir)? {
            bail!(
                "{} already holds a run's checkpoints ({}): set `resume` to continue it, or choose another `output_dir`",
                config.output_dir.display(),
                dir.display()
            );
        }
        all_losses = truncate_loss_log(&csv_path, 0)?;
        let values = task.parameters().values()?;
        RunState {
            optimizer: AdamW::new(config.adamw, &sizes),
            ema: config.ema.map(|c| Ema::new(c, &values)),
            values,
            generator: TorchGenerator::new(config.seed),
            step: 0,
        }
    };
    if run.step >= config.steps {
        (hooks.on_message)(&format!("the checkpoint is at step {}, `steps` is {}: nothing to train", run.step, config.steps));
    }

    let mut csv = std::fs::OpenOptions::new().append(true).open(&csv_path).map_err(|e| Error::io(&csv_path, e))?;
    let mut accumulator = GradAccumulator::new(&sizes);
    let mut run_losses = Vec::new();
    let started = Instant::now();
    let first_step = run.step;
    let divisor = Tensor::new(config.grad_accum as f32, &device)?;
    if config.sample_at_start && config.sample_every.is_some() && run.step == 0 {
        write_samples(task, config, &run, hooks)?;
    }
    while run.step < config.steps {
        let step_number = run.step + 1;
        accumulator.reset();
        let mut loss_sum = 0f64;
        for _ in 0..config.grad_accum {
            let batch = loader.next_batch(config.batch_size, &device)?;
            let checkpointing = config.gradient_checkpointing.then(|| GradientCheckpointing::start(task.parameters().vars()));
            let loss = crate::ops::with_training_precision(config.mixed_precision, || task.loss(&batch, &mut run.generator))?;
            let value = loss.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?;
            if !value.is_finite() {
                return Err(diverged(&checkpoints_dir, step_number, &format!("the loss is {value}"))?);
            }
            loss_sum += value as f64;
            let scaled = if config.grad_accum > 1 { loss.broadcast_div(&divisor)? } else { loss };
            let mut grads = scaled.backward()?;
            if let Some(checkpointing) = &checkpointing {
                checkpointing.add_gradients(&mut grads)?;
            }
            let host: Vec<Option<Vec<f32>>> = task
                .parameters()
                .vars()
                .iter()
                .map(|var| grads.get(var.as_tensor()).map(|g| g.flatten_all()?.to_vec1::<f32>()).transpose())
                .collect::<candle_core::Result<_>>()?;
            accumulator.add(&host)?;
        }
        let loss = (loss_sum / config.grad_accum as f64) as f32;
        let grad_norm = match config.grad_clip {
            Some(max_norm) => clip_grad_norm(&mut accumulator.grads, max_norm),
            None => global_grad_norm(&accumulator.grads),
        };
        if !grad_norm.is_finite() {
            return Err(diverged(&checkpoints_dir, step_number, &format!("the gradient norm is {grad_norm}"))?);
        }
        let lr = learning_rate.at(run.step);
        run.optimizer.update(&mut run.values, &accumulator.grads, lr)?;
        task.parameters().set_values(&run.values)?;
        if let Some(ema) = &mut run.ema {
            ema.step(&run.values)?;
        }
        run.step = step_number;
        writeln!(csv, "{step_number},{loss},{lr},{grad_norm}").map_err(|e| Error::io(&csv_path, e))?;
        all_losses.push((step_number as u64, loss));
        run_losses.push((step_number as u64, loss));

        let elapsed = started.elapsed().as_secs_f64().max(1e-9);
        let steps_per_second = (step_number - first_step) as f64 / elapsed;
        let progress = Progress {
            step: step_number,
            total_steps: config.steps,
            loss,
            learning_rate: lr,
            grad_norm,
            steps_per_second,
            eta_seconds: (config.steps - step_number) as f64 / steps_per_second.max(1e-9),
        };
        let last = step_number == config.steps;
        if !last && config.checkpoint_every > 0 && step_number.is_multiple_of(config.checkpoint_every) {
            let dir = save_checkpoint(task, loader, config, &learning_rate, &run, hooks)?;
            write_loss_chart(&config.output_dir, &all_losses)?;
            (hooks.on_message)(&format!("step {step_number}: checkpoint {}", dir.display()));
        }
        if !last && config.sample_every.is_some_and(|every| step_number.is_multiple_of(every)) {
            write_samples(task, config, &run, hooks)?;
        }
        if (hooks.on_progress)(&progress).is_break() && !last {
            csv.flush().map_err(|e| Error::io(&csv_path, e))?;
            return Ok(TrainSummary { step: step_number, stopped: true, losses: run_losses, exported: None });
        }
    }
    csv.flush().map_err(|e| Error::io(&csv_path, e))?;

    let dir = save_checkpoint(task, loader, config, &learning_rate, &run, hooks)?;
    (hooks.on_message)(&format!("step {}: checkpoint {}", run.step, dir.display()));
    write_loss_chart(&config.output_dir, &all_losses)?;
    if config.sample_every.is_some() {
        write_samples(task, config, &run, hooks)?;
    }
    let weights = task.parameters().to_named_tensors(export_values(&run))?;
    task.export(&weights, &config.output_dir)?;
    (hooks.on_message)(&format!(
        "exported the {}model to {}",
        if run.ema.is_some() { "EMA " } else { "" },
        config.output_dir.display()
    ));
    Ok(TrainSummary { step: run.step, stopped: false, losses: run_losses, exported: Some(config.output_dir.clone()) })
}

/// The weights that samples and the export use: the EMA's when there is one.
fn export_values(run: &RunState) -> &[Vec<f32>] {
    match &run.ema {
        Some(ema) => &ema.shadow,
        None => &run.values,
    }
}

/// The error for a loss or gradient that stopped being finite: the step, and the last good
/// checkpoint (which is left as it is).
fn diverged(checkpoints_dir: &Path, step: usize, what: &str) -> Result<Error> {
    let last_good = match checkpoint::latest(checkpoints_dir)? {
        Some(dir) => format!("the last good checkpoint, {}, is kept (resume from it with a lower learning rate)", dir.display()),
        None => "no checkpoint had been written yet".to_string(),
    };
    Ok(Error::invalid(format!("training diverged at step {step}: {what}; stopped, {last_good}")))
}

fn save_checkpoint(
    task: &dyn TrainingTask,
    loader: &DataLoader,
    config: &TrainConfig,
    learning_rate: &LearningRate,
    run: &RunState,
    hooks: &mut Hooks,
) -> Result<PathBuf> {
    let parameters = task.parameters();
    let (task_state, task_tensors) = task.state()?;
    let mut optimizer_tensors = HashMap::new();
    for ((name, var), (exp_avg, exp_avg_sq)) in
        parameters.names().iter().zip(parameters.vars()).zip(run.optimizer.exp_avg.iter().zip(&run.optimizer.exp_avg_sq))
    {
        optimizer_tensors.insert(format!("exp_avg.{name}"), Tensor::from_slice(exp_avg, var.shape(), &Device::Cpu)?);
        optimizer_tensors.insert(format!("exp_avg_sq.{name}"), Tensor::from_slice(exp_avg_sq, var.shape(), &Device::Cpu)?);
    }
    let mut tensors = vec![
        ("model".to_string(), parameters.to_named_tensors(&run.values)?),
        ("optimizer".to_string(), optimizer_tensors),
    ];
    if let Some(ema) = &run.ema {
        tensors.push(("ema".to_string(), parameters.to_named_tensors(&ema.shadow)?));
    }
    if !task_tensors.is_empty() {
        tensors.push(("task".to_string(), task_tensors));
    }
    let state = CheckpointState {
        step: run.step as u64,
        identity: task.identity(),
        generator: run.generator.state(),
        data_position: loader.position(),
        dataset_len: loader.len(),
        learning_rate: *learning_rate,
        optimizer: OptimizerState { step: run.optimizer.step, config: run.optimizer.config },
        ema: run.ema.as_ref().map(|e| EmaState { optimization_step: e.optimization_step, config: e.config }),
        task: task_state,
    };
    let root = config.checkpoints_dir();
    let dir = checkpoint::save(&root, &Checkpoint { state, tensors }, hooks.write_file.as_mut())?;
    checkpoint::prune(&root, config.keep_checkpoints)?;
    Ok(dir)
}

/// Restores a run from a checkpoint, refusing one of another model, objective or dataset.
fn resume_state(
    task: &mut dyn TrainingTask,
    loader: &mut DataLoader,
    config: &TrainConfig,
    saved: &Checkpoint,
    dir: &Path,
) -> Result<RunState> {
    let differences = checkpoint::identity_differences(&saved.state.identity, &task.identity());
    if !differences.is_empty() {
        bail!(
            "`resume`: {} was trained with different settings; refusing to continue ({})",
            dir.display(),
            differences.join("; ")
        );
    }
    if saved.state.dataset_len != loader.len() {
        bail!(
            "`resume`: {} was trained on {} examples, the data now has {}; refusing to continue",
            dir.display(),
            saved.state.dataset_len,
            loader.len()
        );
    }
    let origin = |name: &str| dir.join(format!("{name}.safetensors")).display().to_string();
    let required = |name: &str| saved.tensors(name).ok_or_else(|| Error::invalid(format!("{}: missing", origin(name))));
    let parameters = task.parameters();
    let values = parameters.values_from_named_tensors(required("model")?, &origin("model"))?;
    parameters.set_values(&values)?;
    let optimizer_tensors = required("optimizer")?;
    let moments = |prefix: &str| -> Result<Vec<Vec<f32>>> {
        let renamed: HashMap<String, Tensor> = optimizer_tensors
            .iter()
            .filter_map(|(k, v)| k.strip_prefix(prefix).map(|name| (name.to_string(), v.clone())))
            .collect();
        parameters.values_from_named_tensors(&renamed, &origin("optimizer"))
    };
    let optimizer = AdamW {
        config: config.adamw,
        step: saved.state.optimizer.step,
        exp_avg: moments("exp_avg.")?,
        exp_avg_sq: moments("exp_avg_sq.")?,
    };
    let ema = match (&config.ema, &saved.state.ema) {
        (Some(ema_config), Some(saved_ema)) => Some(Ema {
            config: *ema_config,
            optimization_step: saved_ema.optimization_step,
            shadow: parameters.values_from_named_tensors(required("ema")?, &origin("ema"))?,
        }),
        (None, None) => None,
        (Some(_), None) => bail!("`resume`: {} was trained without an EMA; drop the `ema` config or start a new run", dir.display()),
        (None, Some(_)) => bail!("`resume`: {} keeps an EMA of the weights; this run has no `ema` config", dir.display()),
    };
    let empty = HashMap::new();
    task.load_state(&saved.state.task, saved.tensors("task").unwrap_or(&empty))?;
    loader.set_position(saved.state.data_position)?;
    Ok(RunState {
        values,
        optimizer,
        ema,
        generator: TorchGenerator::from_state(&saved.state.generator)?,
        step: saved.state.step as usize,
    })
}

/// Writes `samples/step-NNNNNNN.png`: the task's samples from the (EMA) weights, tiled.
fn write_samples(task: &mut dyn TrainingTask, config: &TrainConfig, run: &RunState, hooks: &mut Hooks) -> Result<()> {
    let weights = task.parameters().to_named_tensors(export_values(run))?;
    let (images, columns) = task.samples(&weights)?;
    let Some((width, height, channels, pixels)) = plot::tile(&images, columns) else {
        return Ok(());
    };
    let dir = config.output_dir.join("samples");
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let path = dir.join(format!("step-{:07}.png", run.step));
    crate::pipelines::write_png(&path, width, height, channels, &pixels, &[])?;
    (hooks.on_message)(&format!("step {}: samples {}", run.step, path.display()));
    Ok(())
}
