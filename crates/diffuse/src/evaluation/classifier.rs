//! The small CNN the quality evaluation judges generated images with: trained here on the
//! Fashion-MNIST training set, it names the class of a 32×32 grayscale image and gives a
//! 128-dimensional feature vector per image for the Fréchet distance.
//!
//! Layout: `block_channels.len()` blocks of 3×3 convolution (padding 1), ReLU and 2×2 max
//! pooling (1 → 32 → 64 → 128 channels by default, 32×32 → 4×4), the result flattened, a
//! linear layer to the features, ReLU, and a linear layer to the class logits. The features
//! are the first linear layer's output before its ReLU (so they are not mostly zeros).
//!
//! A trained classifier is a folder: `config.json` (the layout below, plus its test accuracy
//! and the training settings, for reference) and `model.safetensors`, both written atomically.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::loading::config::{parse_config, read_json_object};
use crate::loading::weights::{check_safetensors, var_builder};
use crate::models::{Conv2d, Linear};
use crate::files::write_atomically;
use crate::loading::weights::safetensors_bytes;
use crate::training::data::{DataLoader, Dataset, ImageFit, ImageSpec};
use crate::training::optimizer::{AdamW, AdamWConfig, LearningRate, LrSchedule};
use crate::training::params::Parameters;
use crate::{bail, Error, Result};

/// The classifier folder's config file.
pub const CONFIG_FILE: &str = "config.json";
/// The classifier folder's weights file.
pub const WEIGHTS_FILE: &str = "model.safetensors";

/// The classifier's layout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClassifierConfig {
    /// Images are `image_size × image_size`.
    pub image_size: usize,
    /// Image channels (1: grayscale).
    pub in_channels: usize,
    /// The output channels of each convolution block (each halves the image size).
    pub block_channels: Vec<usize>,
    /// Width of the feature vector.
    pub feature_dim: usize,
    /// Classes of the logits.
    pub num_classes: usize,
}

impl Default for ClassifierConfig {
    fn default() -> Self {
        Self { image_size: 32, in_channels: 1, block_channels: vec![32, 64, 128], feature_dim: 128, num_classes: 10 }
    }
}

impl ClassifierConfig {
    /// Refuses layouts the network cannot be built with; `origin` names the config file.
    pub fn validate(&self, origin: &Path) -> Result<()> {
        let positive = [
            ("image_size", self.image_size),
            ("in_channels", self.in_channels),
            ("feature_dim", self.feature_dim),
            ("num_classes", self.num_classes),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(Error::config(origin, format!("key `{key}`: must be at least 1")));
            }
        }
        if self.block_channels.is_empty() || self.block_channels.contains(&0) {
            return Err(Error::config(origin, format!("key `block_channels`: {:?} must be a non-empty list of positive numbers", self.block_channels)));
        }
        let reduction = 1usize.checked_shl(self.block_channels.len() as u32).unwrap_or(0);
        if reduction == 0 || !self.image_size.is_multiple_of(reduction) {
            return Err(Error::config(
                origin,
                format!("key `image_size`: {} is not divisible by 2^{} (one halving per block)", self.image_size, self.block_channels.len()),
            ));
        }
        Ok(())
    }

    /// The size of the flattened output of the last block.
    fn flattened_dim(&self) -> usize {
        let side = self.image_size >> self.block_channels.len();
        self.block_channels.last().copied().unwrap_or(0) * side * side
    }

    /// What the network takes: grayscale (or `in_channels`) images of `image_size`, fitted
    /// with `fit`.
    pub fn image_spec(&self, fit: ImageFit) -> ImageSpec {
        ImageSpec { channels: self.in_channels, height: self.image_size, width: self.image_size, fit }
    }
}

/// The classifier's layers (see the module docs).
pub struct Classifier {
    /// Its layout.
    pub config: ClassifierConfig,
    blocks: Vec<Conv2d>,
    features: Linear,
    head: Linear,
}

impl Classifier {
    /// Builds the network from the tensors under `vb` (`blocks.N.weight`/`bias`,
    /// `features.*`, `head.*`).
    pub fn new(vb: VarBuilder, config: &ClassifierConfig) -> Result<Self> {
        let mut blocks = Vec::with_capacity(config.block_channels.len());
        let mut in_channels = config.in_channels;
        for (index, &out_channels) in config.block_channels.iter().enumerate() {
            blocks.push(Conv2d::new(vb.pp(format!("blocks.{index}")), in_channels, out_channels, 3, 1, 1, true)?);
            in_channels = out_channels;
        }
        let features = Linear::new(vb.pp("features"), config.flattened_dim(), config.feature_dim, true)?;
        let head = Linear::new(vb.pp("head"), config.feature_dim, config.num_classes, true)?;
        Ok(Self { config: config.clone(), blocks, features, head })
    }

    /// Loads a trained classifier folder (`config.json`, `model.safetensors`).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let config_path = dir.join(CONFIG_FILE);
        let config: ClassifierConfig = parse_config(&read_json_object(&config_path)?, &config_path)?;
        config.validate(&config_path)?;
        let weights = dir.join(WEIGHTS_FILE);
        if !weights.is_file() {
            return Err(Error::weights(&weights, "missing"));
        }
        check_safetensors(&weights)?;
        let vb = var_builder(std::slice::from_ref(&weights), DType::F32, device)?;
        Self::new(vb, &config).map_err(|e| e.in_weights_file(&weights))
    }

    /// `[B, C, S, S]` images in [-1, 1] → (`[B, feature_dim]` features, `[B, num_classes]` logits).
    pub fn forward(&self, images: &Tensor) -> Result<(Tensor, Tensor)> {
        let mut x = images.clone();
        for block in &self.blocks {
            x = block.forward(&x)?.relu()?.max_pool2d(2)?;
        }
        let features = self.features.forward(&x.flatten_from(1)?)?;
        let logits = self.head.forward(&features.relu()?)?;
        Ok((features, logits))
    }

    /// Classifies `[B, C, S, S]` images: the features (row-major, `B × feature_dim`) and the
    /// most likely class of each image.
    pub fn classify(&self, images: &Tensor) -> Result<(Vec<f32>, Vec<usize>)> {
        let (features, logits) = self.forward(images)?;
        let predictions = logits.argmax(D::Minus1)?.to_vec1::<u32>()?.into_iter().map(|c| c as usize).collect();
        Ok((features.flatten_all()?.to_vec1::<f32>()?, predictions))
    }
}

/// How many images of each class were classified correctly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Accuracy {
    /// Per class, the images classified correctly.
    pub correct: Vec<usize>,
    /// Per class, the images seen.
    pub total: Vec<usize>,
}

impl Accuracy {
    /// Zero counts for `num_classes` classes.
    pub fn new(num_classes: usize) -> Self {
        Self { correct: vec![0; num_classes], total: vec![0; num_classes] }
    }

    /// Counts one image of class `label` classified as `predicted`.
    pub fn add(&mut self, label: usize, predicted: usize) {
        if let (Some(total), Some(correct)) = (self.total.get_mut(label), self.correct.get_mut(label)) {
            *total += 1;
            *correct += usize::from(predicted == label);
        }
    }

    /// The fraction of all images classified correctly.
    pub fn overall(&self) -> f64 {
        self.correct.iter().sum::<usize>() as f64 / self.total.iter().sum::<usize>().max(1) as f64
    }

    /// Each class's fraction (0 for a class without images).
    pub fn per_class(&self) -> Vec<f64> {
        self.correct.iter().zip(&self.total).map(|(&c, &t)| c as f64 / t.max(1) as f64).collect()
    }
}

/// What classifying a set of labelled images gives.
pub struct Classified {
    /// `count × feature_dim`, row-major.
    pub features: Vec<f32>,
    /// The predicted class of each image.
    pub predictions: Vec<usize>,
    /// The true class of each image.
    pub labels: Vec<usize>,
}

impl Classified {
    /// The per-class counts of correct predictions.
    pub fn accuracy(&self, num_classes: usize) -> Accuracy {
        let mut accuracy = Accuracy::new(num_classes);
        for (&label, &predicted) in self.labels.iter().zip(&self.predictions) {
            accuracy.add(label, predicted);
        }
        accuracy
    }
}

/// Images per forward pass when classifying a dataset.
pub const CLASSIFY_BATCH: usize = 250;

/// Classifies the examples `indices` of a labelled dataset, fitted to the classifier's size
/// with `fit`; `on_progress(done, total)` after each batch.
pub fn classify_dataset(
    classifier: &Classifier,
    dataset: &mut dyn Dataset,
    indices: &[usize],
    fit: ImageFit,
    device: &Device,
    on_progress: &mut dyn FnMut(usize, usize),
) -> Result<Classified> {
    let spec = classifier.config.image_spec(fit);
    let mut classified = Classified { features: Vec::new(), predictions: Vec::new(), labels: Vec::new() };
    for chunk in indices.chunks(CLASSIFY_BATCH) {
        let mut values = Vec::with_capacity(chunk.len() * spec.channels * spec.height * spec.width);
        for &index in chunk {
            let example = dataset.get(index)?;
            let Some(label) = example.label else {
                bail!("{}: has no label (the classifier is trained and tested on labelled data)", example.name);
            };
            values.extend(crate::training::data::prepare(&example, &spec, false)?);
            classified.labels.push(label);
        }
        let images = Tensor::from_vec(values, (chunk.len(), spec.channels, spec.height, spec.width), device)?;
        let (features, predictions) = classifier.classify(&images)?;
        classified.features.extend(features);
        classified.predictions.extend(predictions);
        on_progress(classified.labels.len(), indices.len());
    }
    Ok(classified)
}

/// How the classifier is trained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassifierTraining {
    /// Passes over the training set. Default: 6.
    pub epochs: usize,
    /// Images per optimizer step. Default: 64.
    pub batch_size: usize,
    /// AdamW's peak learning rate, reached after `warmup_steps` and then decayed to 0 along a
    /// half cosine.
    pub learning_rate: f64,
    /// Steps of linear warm-up. Default: 100.
    pub warmup_steps: usize,
    /// AdamW's weight decay. Default: 1e-2.
    pub weight_decay: f64,
    /// Seeds the initial weights (PyTorch's default initialisation) and the data order.
    pub seed: u64,
}

impl Default for ClassifierTraining {
    fn default() -> Self {
        Self { epochs: 6, batch_size: 64, learning_rate: 1e-3, warmup_steps: 100, weight_decay: 1e-2, seed: 0 }
    }
}

/// What the progress callback sees after each optimizer step.
#[derive(Debug, Clone, Copy)]
pub struct TrainingProgress {
    /// Optimizer steps done.
    pub step: usize,
    /// The run's optimizer steps.
    pub total_steps: usize,
    /// The current epoch, from 0.
    pub epoch: usize,
    /// This step's loss (cross-entropy).
    pub loss: f32,
}

/// Trains a classifier of layout `config` on `train_data` (labelled; images fitted with
/// `fit`) with cross-entropy and AdamW, and returns its weights.
pub fn train_classifier(
    config: &ClassifierConfig,
    training: &ClassifierTraining,
    train_data: Box<dyn Dataset>,
    fit: ImageFit,
    device: &Device,
    on_step: &mut dyn FnMut(&TrainingProgress),
) -> Result<HashMap<String, Tensor>> {
    config.validate(Path::new("the classifier config"))?;
    if training.epochs == 0 || training.batch_size == 0 {
        bail!("the classifier needs at least 1 epoch and a batch size of at least 1");
    }
    let num_classes = train_data.num_classes().unwrap_or(0);
    if num_classes == 0 {
        bail!("{}: the classifier needs labelled training data", train_data.describe());
    }
    if num_classes > config.num_classes {
        bail!("{}: has labels up to {}, the classifier has {} classes", train_data.describe(), num_classes - 1, config.num_classes);
    }
    let examples = train_data.len();
    let mut loader = DataLoader::new(train_data, config.image_spec(fit), training.seed, false)?;
    let varmap = VarMap::new();
    let model = Classifier::new(VarBuilder::from_varmap(&varmap, DType::F32, device), config)?;
    let parameters = Parameters::from_varmap(&varmap)?;
    parameters.init_torch_default(training.seed)?;

    let steps_per_epoch = examples.div_ceil(training.batch_size);
    let total_steps = steps_per_epoch * training.epochs;
    let learning_rate = LearningRate::new(training.learning_rate, training.warmup_steps, total_steps, LrSchedule::Cosine)?;
    let adamw = AdamWConfig { weight_decay: training.weight_decay, ..AdamWConfig::default() };
    adamw.validate()?;
    let mut optimizer = AdamW::new(adamw, &parameters.sizes());
    let mut values = parameters.values()?;
    for step in 0..total_steps {
        let batch = loader.next_batch(training.batch_size, device)?;
        let Some(labels) = batch.labels else {
            bail!("a training batch came without labels");
        };
        let labels = Tensor::from_vec(labels, training.batch_size, device)?;
        let (_, logits) = model.forward(&batch.images)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &labels)?;
        let loss_value = loss.to_scalar::<f32>()?;
        if !loss_value.is_finite() {
            bail!("classifier training diverged at step {}: the loss is {loss_value}", step + 1);
        }
        let grads = loss.backward()?;
        let host: Vec<Vec<f32>> = parameters
            .vars()
            .iter()
            .map(|var| match grads.get(var.as_tensor()) {
                Some(grad) => Ok(grad.flatten_all()?.to_vec1::<f32>()?),
                None => Ok(vec![0.0; var.elem_count()]),
            })
            .collect::<Result<_>>()?;
        optimizer.update(&mut values, &host, learning_rate.at(step))?;
        parameters.set_values(&values)?;
        on_step(&TrainingProgress { step: step + 1, total_steps, epoch: step / steps_per_epoch + 1, loss: loss_value });
    }
    parameters.to_named_tensors(&values)
}

/// A classifier built from weights in memory (e.g. just trained), without gradients.
pub fn classifier_from_weights(weights: &HashMap<String, Tensor>, config: &ClassifierConfig, device: &Device) -> Result<Classifier> {
    Classifier::new(VarBuilder::from_tensors(weights.clone(), DType::F32, device), config)
}

/// Writes a trained classifier folder: `model.safetensors`, then `config.json` (the layout,
/// the test accuracy overall and per class, and the training settings), each atomically.
pub fn save_classifier(
    dir: &Path,
    weights: &HashMap<String, Tensor>,
    config: &ClassifierConfig,
    training: &ClassifierTraining,
    test_accuracy: &Accuracy,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let bytes = safetensors_bytes(weights)?;
    write_atomically(&dir.join(WEIGHTS_FILE), &bytes)?;
    let mut json = match serde_json::to_value(config) {
        Ok(Value::Object(map)) => map,
        _ => Map::new(),
    };
    json.insert("_class_name".into(), Value::from("FashionMnistClassifier"));
    json.insert("test_accuracy".into(), Value::from(test_accuracy.overall()));
    json.insert("test_class_accuracy".into(), Value::from(test_accuracy.per_class()));
    json.insert("training".into(), serde_json::to_value(training).unwrap_or(Value::Null));
    let mut text = serde_json::to_string_pretty(&Value::Object(json)).map_err(|e| Error::invalid(e.to_string()))?;
    text.push('\n');
    write_atomically(&dir.join(CONFIG_FILE), text.as_bytes())
}
