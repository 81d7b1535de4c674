//! How good a Fashion-MNIST text-to-image model is, measured with a classifier trained here
//! on the Fashion-MNIST training set (see [`classifier`]):
//!
//! - prompted with "a photo of {a}" ("a photo of an ankle boot") for each class, does the model draw that class? The
//!   fraction of generated images the classifier assigns to their prompted class, beside the
//!   fraction of real test images it classifies correctly; the model passes when the ratio is
//!   at least [`PASS_RATIO`];
//! - does it draw images like the real ones? The Fréchet distance ([`frechet`]) between the
//!   classifier's features of the generated images and of the test set, beside the distance
//!   between an equally large, class-balanced subset of the training set and the test set.
//!
//! Image `i` of class `c` is drawn from seed `c · per_class + i` (its initial latents are what
//! `diffuse generate --seed S` draws); images are converted to gray as PIL's `convert("L")`
//! and, when the model's size is not the classifier's 32×32, resized (shorter side, bilinear)
//! and centre-cropped.

pub mod classifier;
pub mod frechet;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::Serialize;

use self::classifier::{
    classifier_from_weights, classify_dataset, CLASSIFY_BATCH, save_classifier, train_classifier, Accuracy, Classifier, ClassifierConfig, ClassifierTraining,
    TrainingProgress,
};
use self::frechet::{frechet_distance, FeatureStatistics};
use crate::pipelines::stable_diffusion::{PhaseTimes, StableDiffusionPipeline, TextToImageOptions};
use crate::pipelines::to_uint8_images;
use crate::rng::TorchGenerator;
use crate::training::data::{prepare, read_idx_labels, Dataset, Example, IdxDataset, ImageFit, RawImage};
use crate::training::Image8;
use crate::{bail, Error, Result};

/// Fashion-MNIST's classes, in label order.
pub const CLASS_NAMES: [&str; 10] =
    ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"];

/// The word for each class in prompts, in label order.
pub const PROMPT_WORDS: [&str; 10] =
    ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"];

/// The prompt of each class: `{a}` is replaced by its word with its article ("an ankle boot"),
/// `{name}` by the bare word.
pub const DEFAULT_PROMPT_TEMPLATE: &str = "a photo of {a}";

/// Where Debian-style systems keep the dataset.
pub const DEFAULT_DATA_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// Where the project keeps its trained classifier (relative to the repository root).
pub const DEFAULT_CLASSIFIER_DIR: &str = "models/fashion-mnist-classifier";

/// A model passes when it draws its prompted class at least this often relative to how often
/// the classifier is right on real test images.
pub const PASS_RATIO: f64 = 0.9;

/// The prompt for a class: `template` with `{a}` replaced by `word` with its article and
/// `{name}` by `word`.
pub fn class_prompt(template: &str, word: &str) -> Result<String> {
    if !template.contains("{name}") && !template.contains("{a}") {
        bail!("the prompt template `{template}` has neither `{{a}}` nor `{{name}}` for the class name");
    }
    Ok(template.replace("{a}", &crate::training::text_to_image::with_article(word)).replace("{name}", word))
}

/// The four IDX files of Fashion-MNIST (each gzipped or not).
#[derive(Debug, Clone)]
pub struct FashionMnist {
    /// The training images (`train-images-idx3-ubyte[.gz]`).
    pub train_images: PathBuf,
    /// The training labels (`train-labels-idx1-ubyte[.gz]`).
    pub train_labels: PathBuf,
    /// The test images (`t10k-images-idx3-ubyte[.gz]`).
    pub test_images: PathBuf,
    /// The test labels (`t10k-labels-idx1-ubyte[.gz]`).
    pub test_labels: PathBuf,
}

impl FashionMnist {
    /// Finds the files in `dir` under their usual names (`train-images-idx3-ubyte.gz`, ...);
    /// a missing one is an error that names it.
    pub fn locate(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            bail!("{}: the Fashion-MNIST folder does not exist", dir.display());
        }
        let find = |stem: &str| -> Result<PathBuf> {
            let gzipped = dir.join(format!("{stem}.gz"));
            let plain = dir.join(stem);
            if gzipped.is_file() {
                return Ok(gzipped);
            }
            if plain.is_file() {
                return Ok(plain);
            }
            Err(Error::invalid(format!(
                "{}: missing (nor is {stem} there); Fashion-MNIST's IDX files are expected in {}",
                gzipped.display(),
                dir.display()
            )))
        };
        Ok(Self {
            train_images: find("train-images-idx3-ubyte")?,
            train_labels: find("train-labels-idx1-ubyte")?,
            test_images: find("t10k-images-idx3-ubyte")?,
            test_labels: find("t10k-labels-idx1-ubyte")?,
        })
    }

    /// The 60,000 training images with their labels.
    pub fn train(&self) -> Result<IdxDataset> {
        IdxDataset::open(&self.train_images, Some(&self.train_labels), &idx_cache_dir())
    }

    /// The 10,000 test images with their labels.
    pub fn test(&self) -> Result<IdxDataset> {
        IdxDataset::open(&self.test_images, Some(&self.test_labels), &idx_cache_dir())
    }
}

/// Where gzipped IDX files are decompressed to (once; the copies are checked before reuse).
pub fn idx_cache_dir() -> PathBuf {
    std::env::temp_dir().join("diffuse-idx-cache")
}

/// How the images are generated.
#[derive(Debug, Clone)]
pub struct GenerationSettings {
    /// Images generated per class.
    pub per_class: usize,
    /// Images per pipeline run (the last one of a class may be smaller).
    pub batch_size: usize,
    /// The prompt with `{name}` (the class word) or `{a}` (it with its article).
    pub prompt_template: String,
    /// One word per class, in label order.
    pub prompt_words: Vec<String>,
    /// Denoising steps per image.
    pub num_inference_steps: usize,
    /// The classifier-free guidance scale.
    pub guidance_scale: f64,
}

impl Default for GenerationSettings {
    fn default() -> Self {
        let defaults = TextToImageOptions::default();
        Self {
            per_class: 100,
            batch_size: 20,
            prompt_template: DEFAULT_PROMPT_TEMPLATE.to_string(),
            prompt_words: PROMPT_WORDS.iter().map(|w| w.to_string()).collect(),
            num_inference_steps: defaults.num_inference_steps,
            guidance_scale: defaults.guidance_scale,
        }
    }
}

/// The seed of image `index` of class `class`.
pub fn image_seed(class: usize, index: usize, per_class: usize) -> u64 {
    (class * per_class + index) as u64
}

/// Generates `per_class` images for each class's prompt with the pipeline's own scheduler:
/// one 8-bit image list per class. `on_image(done, total)` after each batch.
pub fn generate_class_images(
    pipeline: &mut StableDiffusionPipeline,
    settings: &GenerationSettings,
    on_image: &mut dyn FnMut(usize, usize),
    warn: &mut dyn FnMut(String),
) -> Result<Vec<Vec<Image8>>> {
    if settings.per_class == 0 || settings.batch_size == 0 {
        bail!("the images per class and the batch size must be at least 1");
    }
    let total = settings
        .per_class
        .checked_mul(settings.prompt_words.len())
        .ok_or_else(|| crate::Error::invalid(format!("{} images per class is too many", settings.per_class)))?;
    let mut done = 0;
    let mut all = Vec::with_capacity(settings.prompt_words.len());
    for (class, word) in settings.prompt_words.iter().enumerate() {
        let options = TextToImageOptions {
            prompt: class_prompt(&settings.prompt_template, word)?,
            num_inference_steps: settings.num_inference_steps,
            guidance_scale: settings.guidance_scale,
            ..TextToImageOptions::default()
        };
        let (height, width) = pipeline.validate(&options)?;
        let factor = pipeline.vae_scale_factor();
        let shape = [1, pipeline.unet_config.in_channels, height / factor, width / factor];
        // Grown as images are made: a capacity from the caller's number could be any size.
        let mut images = Vec::new();
        for start in (0..settings.per_class).step_by(settings.batch_size) {
            let count = settings.batch_size.min(settings.per_class - start);
            // Each image's latents from its own seed; the batch's first generator then goes on
            // to draw any noise the scheduler needs, so a batch of one is exactly
            // `diffuse generate --seed S`.
            let mut generator = TorchGenerator::new(image_seed(class, start, settings.per_class));
            let mut latents = vec![generator.randn_tensor(&shape, &pipeline.device)?];
            for index in start + 1..start + count {
                latents.push(TorchGenerator::new(image_seed(class, index, settings.per_class)).randn_tensor(&shape, &pipeline.device)?);
            }
            let latents = Tensor::cat(&latents, 0)?;
            let options = TextToImageOptions { num_images_per_prompt: count, ..options.clone() };
            let output = pipeline.generate_from(&options, Some(&latents), &mut generator, &mut |_, _| {}, warn, &mut PhaseTimes::default())?;
            images.extend(to_uint8_images(&output)?);
            done += count;
            on_image(done, total);
        }
        all.push(images);
    }
    Ok(all)
}

/// One class's results.
#[derive(Debug, Clone, Serialize)]
pub struct ClassReport {
    /// The class's name.
    pub name: String,
    /// The prompt its images were generated from.
    pub prompt: String,
    /// The classifier's accuracy on this class's real test images.
    pub test_accuracy: f64,
    /// The fraction of this prompt's images classified as this class.
    pub generated_accuracy: f64,
    /// The class the wrongly classified images were most often taken for, and how many.
    pub most_confused_with: Option<(String, usize)>,
}

/// The evaluation's results.
#[derive(Debug, Clone, Serialize)]
pub struct EvaluationReport {
    /// The model evaluated, as given.
    pub model: String,
    /// The scheduler used.
    pub scheduler: String,
    /// Denoising steps per image.
    pub num_inference_steps: usize,
    /// The classifier-free guidance scale.
    pub guidance_scale: f64,
    /// The prompt template.
    pub prompt_template: String,
    /// Images generated per class.
    pub per_class: usize,
    /// The generated images' size, and whether it had to be resized to the classifier's.
    pub generated_size: (usize, usize),
    /// Whether the generated images were resized to the classifier's size.
    pub resized: bool,
    /// The classifier's accuracy on the real test images.
    pub classifier_test_accuracy: f64,
    /// The fraction of generated images classified as their prompted class.
    pub generated_accuracy: f64,
    /// `generated_accuracy / classifier_test_accuracy`.
    pub ratio: f64,
    /// The `ratio` needed to pass ([`PASS_RATIO`]).
    pub pass_ratio: f64,
    /// Whether `ratio` reaches `pass_ratio`.
    pub passed: bool,
    /// Each class's results, in label order.
    pub classes: Vec<ClassReport>,
    /// Rows: prompted class; columns: the class the classifier saw.
    pub generated_confusion: Vec<Vec<usize>>,
    /// The Fréchet distance in the classifier's feature space between the generated images
    /// and the test set.
    pub frechet_generated_test: f64,
    /// The same between a class-balanced training subset of as many images and the test set:
    /// the distance a model that drew real images would get.
    pub frechet_train_test: f64,
    /// Images generated.
    pub num_generated: usize,
    /// Real test images classified.
    pub num_test: usize,
    /// Training images in the Fréchet reference subset.
    pub num_train_subset: usize,
}

/// What the evaluation is busy with, for progress display.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Classifying the real test images.
    ClassifyingTest,
    /// Classifying the training subset.
    ClassifyingTrain,
    /// Generating the images.
    Generating,
    /// Classifying the generated images.
    ClassifyingGenerated,
}

impl Stage {
    /// The stage in words, for progress lines.
    pub fn describe(&self) -> &'static str {
        match self {
            Stage::ClassifyingTest => "classifying the test set",
            Stage::ClassifyingTrain => "classifying the training subset",
            Stage::Generating => "generating",
            Stage::ClassifyingGenerated => "classifying the generated images",
        }
    }
}

/// The first `per_class` examples of each class in a labels file, by class.
fn class_balanced_indices(labels: &[u8], num_classes: usize, per_class: usize) -> Vec<usize> {
    let mut taken = vec![0usize; num_classes];
    let mut indices = Vec::with_capacity(per_class.saturating_mul(num_classes).min(labels.len()));
    for (index, &label) in labels.iter().enumerate() {
        if let Some(count) = taken.get_mut(label as usize).filter(|c| **c < per_class) {
            *count += 1;
            indices.push(index);
        }
    }
    indices
}

fn statistics(features: &[f32], dim: usize) -> Result<FeatureStatistics> {
    let features: Vec<f64> = features.iter().map(|&v| v as f64).collect();
    FeatureStatistics::from_features(&features, dim)
}

/// Classifies generated 8-bit images (any size, gray or RGB) as the classifier's input: gray
/// (PIL's luma), resized and centre-cropped to its size when they differ.
pub fn classify_images(classifier: &Classifier, images: &[Image8], device: &Device) -> Result<(Vec<f32>, Vec<usize>)> {
    let spec = classifier.config.image_spec(ImageFit::Resize);
    let mut features = Vec::new();
    let mut predictions = Vec::new();
    for (chunk_index, chunk) in images.chunks(CLASSIFY_BATCH).enumerate() {
        let mut values = Vec::with_capacity(chunk.len() * spec.channels * spec.height * spec.width);
        for (offset, (width, height, channels, pixels)) in chunk.iter().enumerate() {
            let example = Example {
                image: RawImage { width: *width, height: *height, channels: *channels, pixels: pixels.clone() },
                label: None,
                caption: None,
                name: format!("generated image {}", chunk_index * CLASSIFY_BATCH + offset),
            };
            values.extend(prepare(&example, &spec, false)?);
        }
        let batch = Tensor::from_vec(values, (chunk.len(), spec.channels, spec.height, spec.width), device)?;
        let (chunk_features, chunk_predictions) = classifier.classify(&batch)?;
        features.extend(chunk_features);
        predictions.extend(chunk_predictions);
    }
    Ok((features, predictions))
}

/// Runs the whole evaluation: the classifier on the test set and on a training subset, then
/// `settings.per_class` images per class from the pipeline, classified and compared. Returns
/// the report and the generated images (one list per class).
pub fn evaluate(
    pipeline: &mut StableDiffusionPipeline,
    classifier: &Classifier,
    data: &FashionMnist,
    settings: &GenerationSettings,
    on_progress: &mut dyn FnMut(Stage, usize, usize),
    warn: &mut dyn FnMut(String),
) -> Result<(EvaluationReport, Vec<Vec<Image8>>)> {
    let num_classes = classifier.config.num_classes;
    if settings.prompt_words.len() != num_classes {
        bail!("{} class words for a classifier of {num_classes} classes", settings.prompt_words.len());
    }
    let names: Vec<String> = (0..num_classes).map(|c| CLASS_NAMES.get(c).map_or_else(|| format!("class {c}"), |n| n.to_string())).collect();
    let prompts = settings.prompt_words.iter().map(|w| class_prompt(&settings.prompt_template, w)).collect::<Result<Vec<_>>>()?;
    let device = pipeline.device.clone();
    let dim = classifier.config.feature_dim;

    // Real images, both fitted to the classifier's size as in its training (padded).
    let mut test = data.test()?;
    let test_indices: Vec<usize> = (0..test.len()).collect();
    let test_result =
        classify_dataset(classifier, &mut test, &test_indices, ImageFit::Pad, &device, &mut |d, t| on_progress(Stage::ClassifyingTest, d, t))?;
    if let Some(&label) = test_result.labels.iter().find(|&&l| l >= num_classes) {
        bail!("{}: holds label {label}; the classifier has {num_classes} classes", data.test_labels.display());
    }
    let test_accuracy = test_result.accuracy(num_classes);
    let test_statistics = statistics(&test_result.features, dim)?;

    let train_labels = read_idx_labels(&data.train_labels)?;
    let train_indices = class_balanced_indices(&train_labels, num_classes, settings.per_class);
    let mut train = data.train()?;
    let train_result =
        classify_dataset(classifier, &mut train, &train_indices, ImageFit::Pad, &device, &mut |d, t| on_progress(Stage::ClassifyingTrain, d, t))?;
    let frechet_train_test = frechet_distance(&statistics(&train_result.features, dim)?, &test_statistics)?;

    let images = generate_class_images(pipeline, settings, &mut |d, t| on_progress(Stage::Generating, d, t), warn)?;
    let flat: Vec<Image8> = images.iter().flatten().cloned().collect();
    let Some(&(width, height, _, _)) = flat.first() else {
        bail!("no images were generated");
    };
    on_progress(Stage::ClassifyingGenerated, 0, flat.len());
    let (generated_features, predictions) = classify_images(classifier, &flat, &device)?;
    on_progress(Stage::ClassifyingGenerated, flat.len(), flat.len());
    let frechet_generated_test = frechet_distance(&statistics(&generated_features, dim)?, &test_statistics)?;

    let mut generated_accuracy = Accuracy::new(num_classes);
    let mut confusion = vec![vec![0usize; num_classes]; num_classes];
    let prompted = images.iter().enumerate().flat_map(|(class, list)| std::iter::repeat_n(class, list.len()));
    for (class, &predicted) in prompted.zip(&predictions) {
        generated_accuracy.add(class, predicted);
        confusion[class][predicted.min(num_classes - 1)] += 1;
    }
    let classes = (0..num_classes)
        .map(|class| {
            let wrong = confusion[class].iter().enumerate().filter(|&(c, &n)| c != class && n > 0).max_by_key(|&(c, &n)| (n, std::cmp::Reverse(c)));
            ClassReport {
                name: names[class].clone(),
                prompt: prompts[class].clone(),
                test_accuracy: test_accuracy.per_class()[class],
                generated_accuracy: generated_accuracy.per_class()[class],
                most_confused_with: wrong.map(|(c, &n)| (names[c].clone(), n)),
            }
        })
        .collect();
    let ratio = generated_accuracy.overall() / test_accuracy.overall().max(f64::MIN_POSITIVE);
    let report = EvaluationReport {
        model: pipeline.model_dir.display().to_string(),
        scheduler: pipeline.scheduler.class_name.clone(),
        num_inference_steps: settings.num_inference_steps,
        guidance_scale: settings.guidance_scale,
        prompt_template: settings.prompt_template.clone(),
        per_class: settings.per_class,
        generated_size: (width, height),
        resized: (width, height) != (classifier.config.image_size, classifier.config.image_size),
        classifier_test_accuracy: test_accuracy.overall(),
        generated_accuracy: generated_accuracy.overall(),
        ratio,
        pass_ratio: PASS_RATIO,
        passed: ratio >= PASS_RATIO,
        classes,
        generated_confusion: confusion,
        frechet_generated_test,
        frechet_train_test,
        num_generated: flat.len(),
        num_test: test_indices.len(),
        num_train_subset: train_indices.len(),
    };
    Ok((report, images))
}

/// Trains the default classifier on the Fashion-MNIST training set, measures it on the test
/// set and writes it to `dir`; returns its test accuracy.
pub fn train_fashion_mnist_classifier(
    dir: &Path,
    data: &FashionMnist,
    training: &ClassifierTraining,
    device: &Device,
    on_step: &mut dyn FnMut(&TrainingProgress),
    on_test_progress: &mut dyn FnMut(usize, usize),
) -> Result<Accuracy> {
    let config = ClassifierConfig::default();
    let weights = train_classifier(&config, training, Box::new(data.train()?), ImageFit::Pad, device, on_step)?;
    let classifier = classifier_from_weights(&weights, &config, device)?;
    let mut test = data.test()?;
    let indices: Vec<usize> = (0..test.len()).collect();
    let accuracy = classify_dataset(&classifier, &mut test, &indices, ImageFit::Pad, device, on_test_progress)?.accuracy(config.num_classes);
    save_classifier(dir, &weights, &config, training, &accuracy)?;
    Ok(accuracy)
}
