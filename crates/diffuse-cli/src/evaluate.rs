//! `diffuse evaluate`: the quality of a Fashion-MNIST text-to-image model, judged by a small
//! classifier trained on the Fashion-MNIST training set (diffuse::evaluation): how often the
//! generated images show the prompted class, relative to the classifier's accuracy on real
//! test images, and the Fréchet distance to the test set in the classifier's feature space.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use diffuse::evaluation::classifier::{Classifier, ClassifierTraining, CONFIG_FILE, WEIGHTS_FILE};
use diffuse::evaluation::{
    evaluate, train_fashion_mnist_classifier, EvaluationReport, FashionMnist, GenerationSettings, Stage, CLASS_NAMES,
    DEFAULT_CLASSIFIER_DIR, DEFAULT_DATA_DIR, DEFAULT_PROMPT_TEMPLATE, PROMPT_WORDS,
};
use diffuse::pipelines::stable_diffusion::{StableDiffusionPipeline, TextToImageOptions};
use diffuse::pipelines::write_png;
use diffuse::training::plot;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

#[derive(clap::Args)]
#[command(after_help = "\
Examples:
  diffuse evaluate --model models/fashion-mnist
  diffuse evaluate --model models/fashion-mnist --per-class 20 --json report.json --save-images grids/
  diffuse evaluate --train-classifier --classifier models/fashion-mnist-classifier

The classifier is a small CNN (3 conv blocks, 128-d features) trained on the 60,000 training
images padded to 32×32. Image i of class c is drawn from seed c·per_class + i; with a
deterministic sampler it is the image `diffuse generate --seed S` makes with the same prompt,
steps and guidance scale. Generated images are converted to gray (and resized to 32×32 when the
model draws another size). The model passes when the fraction of its images classified as
their prompted class is at least 0.9 × the classifier's accuracy on the test set.")]
pub struct EvaluateArgs {
    /// The text-to-image model to evaluate: a Stable Diffusion pipeline folder.
    #[arg(long, required_unless_present = "train_classifier")]
    model: Option<PathBuf>,
    /// The classifier folder (config.json, model.safetensors). When it holds none, one is
    /// trained into it first (about 50 minutes on 2 CPU cores). Default:
    /// models/fashion-mnist-classifier if it is there (in the repository), else the same
    /// classifier built into diffuse; --train-classifier trains into
    /// models/fashion-mnist-classifier.
    #[arg(long, value_name = "DIR")]
    classifier: Option<PathBuf>,
    /// Train the classifier (again) into --classifier, replacing what is there; with --model,
    /// then evaluate with it.
    #[arg(long)]
    train_classifier: bool,
    /// The folder with Fashion-MNIST's IDX files (train-images-idx3-ubyte.gz,
    /// train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz).
    #[arg(long, default_value = DEFAULT_DATA_DIR)]
    data: PathBuf,
    /// Images generated per class.
    #[arg(long, default_value_t = 100)]
    per_class: usize,
    /// Images per pipeline run.
    #[arg(long, default_value_t = 20)]
    batch_size: usize,
    /// Denoising steps (default: the pipeline's default, 50).
    #[arg(long)]
    steps: Option<usize>,
    /// Classifier-free guidance scale (default: the pipeline's default, 7.5).
    #[arg(long)]
    guidance_scale: Option<f64>,
    /// Sampler to use instead of the model folder's own (see `diffuse schedulers`).
    #[arg(long)]
    scheduler: Option<String>,
    /// The prompt of each class; `{a}` is replaced by the class's word with its article ("an
    /// ankle boot"), `{name}` by the bare word.
    #[arg(long, default_value = DEFAULT_PROMPT_TEMPLATE)]
    prompt_template: String,
    /// The ten class words, comma-separated, in label order (T-shirt/top, Trouser, Pullover,
    /// Dress, Coat, Sandal, Shirt, Sneaker, Bag, Ankle boot). Default:
    /// t-shirt,trouser,pullover,dress,coat,sandal,shirt,sneaker,bag,ankle boot.
    #[arg(long, value_delimiter = ',', default_values_t = PROMPT_WORDS.map(String::from), hide_default_value = true)]
    class_words: Vec<String>,
    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Write the generated images into this folder, one grid per class (CLASS-WORD.png, 10
    /// per row, in seed order).
    #[arg(long, value_name = "DIR")]
    save_images: Option<PathBuf>,
    /// Classifier training: epochs over the training set.
    #[arg(long, default_value_t = ClassifierTraining::default().epochs)]
    epochs: usize,
    /// Classifier training: the seed of the initial weights and the data order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// No progress bars on stderr.
    #[arg(long)]
    quiet: bool,
}

fn progress_bar(total: usize, quiet: bool, message: &str) -> ProgressBar {
    let bar = ProgressBar::new(total as u64);
    if quiet || !std::io::stderr().is_terminal() {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    } else {
        bar.set_draw_target(ProgressDrawTarget::stderr());
    }
    bar.set_style(
        ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(message.to_string());
    bar
}

fn has_classifier(dir: &Path) -> bool {
    dir.join(CONFIG_FILE).is_file() || dir.join(WEIGHTS_FILE).is_file()
}

pub fn run(args: EvaluateArgs) -> Result<()> {
    if args.per_class == 0 || args.batch_size == 0 {
        bail!("--per-class and --batch-size must be at least 1");
    }
    if args.class_words.len() != CLASS_NAMES.len() {
        bail!("--class-words needs {} comma-separated words, got {}", CLASS_NAMES.len(), args.class_words.len());
    }
    diffuse::evaluation::class_prompt(&args.prompt_template, "x").context("--prompt-template")?;
    // Check the output folders before hours of work.
    for path in args.json.iter() {
        let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        if !parent.is_dir() {
            bail!("--json {}: the folder {} does not exist", path.display(), parent.display());
        }
    }
    if let Some(dir) = &args.save_images {
        std::fs::create_dir_all(dir).with_context(|| format!("--save-images {}", dir.display()))?;
    }
    let data = FashionMnist::locate(&args.data).context("--data")?;
    let device = crate::device();

    // The model is loaded first, so that a wrong path is told before any training.
    let pipeline = match &args.model {
        Some(model) => Some(
            StableDiffusionPipeline::load(model, args.scheduler.as_deref(), &[], None, &device, DType::F32)
                .with_context(|| format!("--model {}", model.display()))?,
        ),
        None => None,
    };
    let classifier_dir = classifier_dir(&args)?;
    if args.train_classifier || (pipeline.is_some() && !has_classifier(&classifier_dir)) {
        if !args.train_classifier {
            eprintln!("no classifier in {}: training one (use --classifier DIR to use another)", classifier_dir.display());
        }
        train(&args, &classifier_dir, &data, &device)?;
    }
    let Some(mut pipeline) = pipeline else {
        return Ok(());
    };
    let classifier = Classifier::load(&classifier_dir, &device)
        .with_context(|| format!("--classifier {} (train one with --train-classifier)", classifier_dir.display()))?;
    let defaults = TextToImageOptions::default();
    let settings = GenerationSettings {
        per_class: args.per_class,
        batch_size: args.batch_size,
        prompt_template: args.prompt_template.clone(),
        prompt_words: args.class_words.clone(),
        num_inference_steps: args.steps.unwrap_or(defaults.num_inference_steps),
        guidance_scale: args.guidance_scale.unwrap_or(defaults.guidance_scale),
    };

    let quiet = args.quiet;
    let mut bar: Option<(Stage, ProgressBar)> = None;
    let mut on_progress = |stage: Stage, done: usize, total: usize| {
        if bar.as_ref().map(|(s, _)| *s) != Some(stage) {
            if let Some((_, old)) = bar.take() {
                old.finish_and_clear();
            }
            bar = Some((stage, progress_bar(total, quiet, stage.describe())));
        }
        if let Some((_, bar)) = &bar {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        }
    };
    let mut warnings = Vec::new();
    let mut warn = |warning: String| {
        if !warnings.contains(&warning) {
            warnings.push(warning);
        }
    };
    let (report, images) = evaluate(&mut pipeline, &classifier, &data, &settings, &mut on_progress, &mut warn)?;
    drop(on_progress);
    if let Some((_, bar)) = bar.take() {
        bar.finish_and_clear();
    }
    if !quiet {
        for warning in &warnings {
            eprintln!("warning: {warning}");
        }
    }
    print_report(&report);
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text + "\n").with_context(|| format!("--json {}", path.display()))?;
        outln!("wrote {}", path.display());
    }
    if let Some(dir) = &args.save_images {
        for (word, class_images) in args.class_words.iter().zip(&images) {
            if let Some((width, height, channels, pixels)) = plot::tile(class_images, 10) {
                let path = dir.join(format!("{}.png", word.replace(['/', ' '], "-")));
                write_png(&path, width, height, channels, &pixels, &[])?;
            }
        }
        outln!("wrote the generated images to {}", dir.display());
    }
    Ok(())
}

/// `--classifier`, or the repository's classifier where it is, or the built-in one (written
/// to the cache on first use).
fn classifier_dir(args: &EvaluateArgs) -> Result<PathBuf> {
    let repository = PathBuf::from(DEFAULT_CLASSIFIER_DIR);
    Ok(match &args.classifier {
        Some(dir) => dir.clone(),
        None if args.train_classifier || has_classifier(&repository) => repository,
        None => diffuse::default_model::materialize_classifier(&diffuse::default_model::cache_root()).context("the built-in classifier")?,
    })
}

fn train(args: &EvaluateArgs, classifier_dir: &Path, data: &FashionMnist, device: &Device) -> Result<()> {
    let training = ClassifierTraining { epochs: args.epochs, seed: args.seed, ..ClassifierTraining::default() };
    let bar = progress_bar(0, args.quiet, "training the classifier");
    bar.set_style(
        ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} steps [{elapsed_precise}<{eta_precise}, {per_sec}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut average_loss = None::<f32>;
    let mut on_step = |progress: &diffuse::evaluation::classifier::TrainingProgress| {
        let average = average_loss.map_or(progress.loss, |a| 0.98 * a + 0.02 * progress.loss);
        average_loss = Some(average);
        bar.set_length(progress.total_steps as u64);
        bar.set_position(progress.step as u64);
        bar.set_message(format!("training the classifier: epoch {}, loss {average:.4}", progress.epoch));
    };
    let test_bar = progress_bar(0, args.quiet, "classifying the test set");
    let accuracy = train_fashion_mnist_classifier(classifier_dir, data, &training, device, &mut on_step, &mut |done, total| {
        bar.finish_and_clear();
        test_bar.set_length(total as u64);
        test_bar.set_position(done as u64);
    })?;
    test_bar.finish_and_clear();
    outln!("classifier written to {}", classifier_dir.display());
    outln!("test accuracy: {:.2}%", 100.0 * accuracy.overall());
    for (name, value) in CLASS_NAMES.iter().zip(accuracy.per_class()) {
        outln!("  {name:<12} {:>6.2}%", 100.0 * value);
    }
    Ok(())
}

fn print_report(report: &EvaluationReport) {
    outln!(
        "model {} ({}, {} steps, guidance {}), {} images per class{}",
        report.model,
        report.scheduler,
        report.num_inference_steps,
        report.guidance_scale,
        report.per_class,
        if report.resized {
            format!(" ({}×{}, resized to the classifier's size)", report.generated_size.0, report.generated_size.1)
        } else {
            String::new()
        }
    );
    outln!();
    outln!("{:<12} {:<26} {:>10} {:>10}  most often mistaken for", "class", "prompt", "test acc.", "generated");
    for class in &report.classes {
        let confused = match &class.most_confused_with {
            Some((name, count)) => format!("{name} ({count})"),
            None => String::new(),
        };
        outln!(
            "{:<12} {:<26} {:>9.1}% {:>9.1}%  {confused}",
            class.name,
            class.prompt,
            100.0 * class.test_accuracy,
            100.0 * class.generated_accuracy
        );
    }
    outln!();
    let rows = [
        (format!("classifier accuracy on the {} real test images", report.num_test), report.classifier_test_accuracy),
        (format!("generated images classified as their prompted class ({})", report.num_generated), report.generated_accuracy),
    ];
    let width = rows.iter().map(|(label, _)| label.chars().count()).max().unwrap_or(0);
    for (label, value) in rows {
        outln!("{label:<width$} {:>7.2}%", 100.0 * value);
    }
    outln!(
        "ratio generated / test: {:.3} (passes at {} or more): {}",
        report.ratio,
        report.pass_ratio,
        if report.passed { "PASS" } else { "FAIL" }
    );
    outln!("Fréchet distance in the classifier's feature space:");
    let rows = [
        (format!("generated ({}) vs test ({})", report.num_generated, report.num_test), report.frechet_generated_test),
        (format!("training subset ({}) vs test ({})", report.num_train_subset, report.num_test), report.frechet_train_test),
    ];
    let width = rows.iter().map(|(label, _)| label.chars().count()).max().unwrap_or(0);
    for (label, value) in rows {
        outln!("  {label:<width$} {value:>10.3}");
    }
}
