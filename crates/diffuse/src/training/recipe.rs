//! What to train, as one typed value with `diffuse train`'s defaults: the model kind, the data,
//! the architecture and objective, and for text-to-image the base model and LoRA adapters.
//!
//! [`run`] goes from a [`TrainingRecipe`] and the loop's [`TrainConfig`] to the exported model;
//! [`TrainingRecipe::open_dataset`] and [`TrainingRecipe::build`] are its two halves, for a
//! caller that brings its own [`Dataset`] or drives [`super::train`] itself.
//!
//! ```no_run
//! use diffuse::training::{recipe::{run, ModelKind, TrainingRecipe}, Hooks, TrainConfig};
//! # fn main() -> diffuse::Result<()> {
//! let recipe = TrainingRecipe::new(ModelKind::Pixel, "train-images-idx3-ubyte.gz");
//! let config = TrainConfig { steps: 2000, ..TrainConfig::new("my-ddpm") };
//! let summary = run(&recipe, &config, &mut Hooks::default(), &candle_core::Device::Cpu)?;
//! println!("{:?}", summary.exported); // a DDPMPipeline folder
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::autoencoder::{resolve_vae_config, AutoencoderTask, AutoencoderTrainingConfig, ReconstructionLoss};
use super::data::{guess_idx_labels_path, prepare, Captions, DataLoader, Dataset, IdxDataset, ImageFit, ImageFolderDataset, ImageSpec};
use super::objectives::LossKind;
use super::pixel::{resolve_unet_config, NoiseSchedule, PixelTask, PixelTrainingConfig, SampleSettings, TimestepSampling, UNetRequest};
use super::text_to_image::{
    self, frozen_text_encoder, resolve_text_encoder_config, ClassPrompts, FrozenVae, LoraTraining, SecondTextEncoder, TextSampleSettings,
    TextToImageTask, TextToImageTrainingConfig, DEFAULT_TEMPLATES,
};
use super::{train, Hooks, TrainConfig, TrainSummary, TrainingTask};
use crate::lora::adapters::{self, AdapterConfig};
use crate::schedulers::PredictionType;
use crate::{bail, Error, Result};

/// What is trained.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelKind {
    /// A pixel-space `UNet2DModel`, exported as a `DDPMPipeline` folder.
    Pixel,
    /// An `AutoencoderKL` (reconstruction + KL loss), exported as an `AutoencoderKL` folder.
    Autoencoder,
    /// A `UNet2DConditionModel` in a trained autoencoder's latents, conditioned on a CLIP text
    /// encoder, exported as a `StableDiffusionPipeline` folder; or LoRA adapters on a base
    /// pipeline.
    TextToImage,
}

/// Pixel-space settings.
#[derive(Clone, Debug, PartialEq)]
pub struct PixelRecipe {
    /// The loss. Default: [`LossKind::Mse`].
    pub loss: LossKind,
    /// Condition on the data's class labels.
    pub class_conditional: bool,
    /// The probability of replacing a label by a null class, for classifier-free guidance.
    pub class_dropout: f64,
}

impl Default for PixelRecipe {
    fn default() -> Self {
        Self { loss: LossKind::Mse, class_conditional: false, class_dropout: 0.0 }
    }
}

/// Autoencoder settings.
#[derive(Clone, Debug, PartialEq)]
pub struct AutoencoderRecipe {
    /// How reconstructions are scored. Default: L1 (latent diffusion's).
    pub reconstruction: ReconstructionLoss,
    /// The KL term's weight against the reconstruction's. Default: 1e-6.
    pub kl_weight: f64,
}

impl Default for AutoencoderRecipe {
    fn default() -> Self {
        Self { reconstruction: ReconstructionLoss::L1, kl_weight: 1e-6 }
    }
}

/// LoRA adapters trained on a base pipeline instead of its weights.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraRecipe {
    /// peft's `r`.
    pub rank: usize,
    /// The adapters are scaled by alpha / rank. Default (`None`): the rank, scale 1.
    pub alpha: Option<f64>,
    /// peft's `lora_dropout`.
    pub dropout: f64,
    /// Groups (`attention`, `cross-attention`, `feed-forward`, `resnets`, `text-encoder`; see
    /// [`adapter_targets`]) or module names. Default: `attention`.
    pub targets: Vec<String>,
    /// The kohya-format file's name, without `.safetensors`. Default: `lora`.
    pub name: String,
}

impl LoraRecipe {
    /// Rank `rank` on the UNet's attention projections, with the other defaults.
    pub fn new(rank: usize) -> Self {
        Self { rank, alpha: None, dropout: 0.0, targets: vec!["attention".into()], name: "lora".into() }
    }

    /// The adapters' configs, checked.
    pub fn resolve(&self) -> Result<LoraTraining> {
        let alpha = self.alpha.unwrap_or(self.rank as f64);
        let (unet, text_encoder) = adapter_targets(&self.targets);
        if unet.is_empty() {
            bail!("LoRA `targets` {}: no UNet layers (add `attention` or module names)", self.targets.join(","));
        }
        let unet = AdapterConfig { rank: self.rank, alpha, target_modules: unet };
        unet.validate()?;
        let text_encoder = (!text_encoder.is_empty()).then(|| AdapterConfig { rank: self.rank, alpha, target_modules: text_encoder });
        if self.name.is_empty() || self.name.contains(['/', '\\']) || self.name == "." || self.name == ".." {
            bail!("LoRA `name` {}: a file name without folders", self.name);
        }
        if !(0.0..1.0).contains(&self.dropout) {
            bail!("the LoRA `dropout` must be in [0, 1), got {}", self.dropout);
        }
        Ok(LoraTraining { unet, text_encoder, kohya_file_name: format!("{}.safetensors", self.name), dropout: self.dropout })
    }
}

/// The UNet's and the text encoder's target modules for LoRA target groups and names:
/// `attention` (to_q, to_k, to_v, to_out.0), `cross-attention` (only attn2's),
/// `feed-forward` (ff.net.0.proj, ff.net.2), `resnets` (conv1, conv2, time_emb_proj, as kohya's
/// LoCon), `text-encoder` (q_proj, k_proj, v_proj, out_proj); any other item is a UNet module
/// name matched as peft's target_modules, or with `te:` a text encoder's.
pub fn adapter_targets(items: &[String]) -> (Vec<String>, Vec<String>) {
    let (mut unet, mut text_encoder) = (Vec::new(), Vec::new());
    let names = |list: &[&str]| list.iter().map(|t| t.to_string()).collect::<Vec<_>>();
    for item in items.iter().map(|t| t.trim()).filter(|t| !t.is_empty()) {
        match item {
            "attention" => unet.extend(names(adapters::UNET_ATTENTION)),
            "cross-attention" => unet.extend(names(adapters::UNET_CROSS_ATTENTION)),
            "feed-forward" => unet.extend(names(adapters::UNET_FEED_FORWARD)),
            "resnets" => unet.extend(names(adapters::UNET_RESNETS)),
            "text-encoder" => text_encoder.extend(names(adapters::TEXT_ENCODER_ATTENTION)),
            other => match other.strip_prefix("te:") {
                Some(name) => text_encoder.push(name.to_string()),
                None => unet.push(other.to_string()),
            },
        }
    }
    (unet, text_encoder)
}

/// Text-to-image settings.
#[derive(Clone, Debug, PartialEq)]
pub struct TextToImageRecipe {
    /// Start from this `StableDiffusionPipeline` (a folder, a repo id in the Hugging Face
    /// cache, or `builtin`) instead of from scratch: fine-tuned, or frozen under `lora`.
    pub base: Option<String>,
    /// Train LoRA adapters on `base` instead of its weights.
    pub lora: Option<LoraRecipe>,
    /// The frozen autoencoder folder. Default: the base's `vae/`.
    pub vae: Option<PathBuf>,
    /// A `CLIPTextModel` folder used frozen instead of training one.
    pub text_encoder: Option<PathBuf>,
    /// The trained text encoder's architecture: a preset or a transformers `config.json`.
    /// Default: `clip-small`.
    pub text_encoder_config: String,
    /// The probability of training on the empty prompt. Default: 0.1.
    pub caption_dropout: f64,
    /// For labelled data: the class names in label order, synonyms joined by `|` (see
    /// [`text_to_image::class_names`]).
    pub class_names: Option<Vec<String>>,
    /// Templates for captions made from class names (`{a}`, `{}`). Default: a built-in list.
    pub prompt_templates: Option<Vec<String>>,
    /// The sample grids' prompts. Default: one per class, or the data's first captions.
    pub sample_prompts: Vec<String>,
    /// The sample grids' guidance scale. Default: 4.
    pub sample_guidance_scale: f64,
}

impl Default for TextToImageRecipe {
    fn default() -> Self {
        Self {
            base: None,
            lora: None,
            vae: None,
            text_encoder: None,
            text_encoder_config: "clip-small".into(),
            caption_dropout: 0.1,
            class_names: None,
            prompt_templates: None,
            sample_prompts: Vec::new(),
            sample_guidance_scale: 4.0,
        }
    }
}

/// Everything about what is trained (the loop's settings are a [`TrainConfig`]).
#[derive(Clone, Debug, PartialEq)]
pub struct TrainingRecipe {
    /// The model kind.
    pub kind: ModelKind,
    /// An IDX images file (gzipped or not) or a folder of images (searched recursively).
    pub data: PathBuf,
    /// With IDX data: the labels file. Default: the `*-labels-idx1-ubyte[.gz]` beside `data`.
    pub labels: Option<PathBuf>,
    /// A preset name or a diffusers `config.json`. Default: `small` (pixel), `vae-small`
    /// (autoencoder), `unet-small` (text-to-image from scratch), the base's (fine-tuning).
    pub model_config: Option<String>,
    /// Convert images to 1 (gray) or 3 (RGB) channels. Default: the data's.
    pub channels: Option<usize>,
    /// Train at this square size instead of the data's.
    pub resolution: Option<usize>,
    /// What to do with images of another size. Default: refuse them.
    pub image_fit: ImageFit,
    /// Mirror each image left to right with probability ½.
    pub random_flip: bool,
    /// The noise schedule. Default: DDPM's for pixel, Stable Diffusion's for text-to-image.
    pub noise: NoiseSchedule,
    /// What the UNet predicts. Default: epsilon.
    pub prediction_type: PredictionType,
    /// How timesteps are drawn. Default: uniformly.
    pub timestep_sampling: TimestepSampling,
    /// Min-SNR weighting with this gamma.
    pub snr_gamma: Option<f64>,
    /// The sample grids (count, steps, scheduler; their seed is `seed`). Default: 16 images,
    /// 50 DDIM steps.
    pub sampling: SampleSettings,
    /// The exported weights' type, f32, f16 or bf16 (autoencoder and text-to-image). Default: f32.
    pub export_dtype: DType,
    /// Seeds the initial weights, the data order and flips (the loop's draws have
    /// [`TrainConfig::seed`]).
    pub seed: u64,
    /// Pixel-space settings.
    pub pixel: PixelRecipe,
    /// Autoencoder settings.
    pub autoencoder: AutoencoderRecipe,
    /// Text-to-image settings.
    pub text_to_image: TextToImageRecipe,
}

impl TrainingRecipe {
    /// A recipe for `kind` on `data` with `diffuse train`'s defaults.
    pub fn new(kind: ModelKind, data: impl Into<PathBuf>) -> Self {
        Self {
            kind,
            data: data.into(),
            labels: None,
            model_config: None,
            channels: None,
            resolution: None,
            image_fit: ImageFit::Exact,
            random_flip: false,
            noise: match kind {
                ModelKind::TextToImage => NoiseSchedule::stable_diffusion(),
                _ => NoiseSchedule::default(),
            },
            prediction_type: PredictionType::Epsilon,
            timestep_sampling: TimestepSampling::Uniform,
            snr_gamma: None,
            sampling: SampleSettings::default(),
            export_dtype: DType::F32,
            seed: 0,
            pixel: PixelRecipe::default(),
            autoencoder: AutoencoderRecipe::default(),
            text_to_image: TextToImageRecipe::default(),
        }
    }

    /// Checks what can be checked without reading the data or any model.
    pub fn validate(&self) -> Result<()> {
        let t2i = &self.text_to_image;
        if self.kind != ModelKind::TextToImage && (t2i.base.is_some() || t2i.lora.is_some()) {
            bail!("`base` and `lora` are for text-to-image training, not {:?}", self.kind);
        }
        if let Some(lora) = &t2i.lora {
            if t2i.base.is_none() {
                bail!("`lora` needs `base`, the model the adapters are trained on");
            }
            lora.resolve()?;
        }
        if !matches!(self.export_dtype, DType::F32 | DType::F16 | DType::BF16) {
            bail!("`export_dtype` {:?} is not one of f32, f16, bf16", self.export_dtype);
        }
        if let Some(channels) = self.channels {
            if channels != 1 && channels != 3 {
                bail!("`channels` {channels}: must be 1 (gray) or 3 (RGB)");
            }
        }
        // The autoencoder's samples are reconstructions: no scheduler.
        match self.kind {
            ModelKind::Autoencoder => Ok(()),
            _ => check_scheduler(&self.sampling.scheduler),
        }
    }

    /// Opens `data`: an image folder, or an IDX images file (decompressed into `cache_dir` when
    /// gzipped) with its labels when the recipe needs them.
    pub fn open_dataset(&self, cache_dir: &Path) -> Result<Box<dyn Dataset>> {
        let t2i = self.kind == ModelKind::TextToImage;
        // Text-to-image needs captions, or labels that class names turn into captions.
        let wants_labels = (self.kind == ModelKind::Pixel && self.pixel.class_conditional) || (t2i && self.text_to_image.class_names.is_some());
        if self.data.is_dir() {
            if self.labels.is_some() {
                bail!("`labels` is for IDX data; an image folder's labels are its sub-folder names");
            }
            let captions = if t2i && self.text_to_image.class_names.is_none() { Captions::Required } else { Captions::Ignore };
            return Ok(Box::new(ImageFolderDataset::open(&self.data, captions, wants_labels)?));
        }
        if !self.data.is_file() {
            bail!("`data` {}: no such file or folder", self.data.display());
        }
        let labels = match (&self.labels, wants_labels) {
            (Some(labels), _) => Some(labels.clone()),
            (None, true) => match guess_idx_labels_path(&self.data) {
                Some(path) => Some(path),
                None => bail!("no labels file found beside {} (set `labels`)", self.data.display()),
            },
            (None, false) => None,
        };
        Ok(Box::new(IdxDataset::open(&self.data, labels.as_deref(), cache_dir)?))
    }

    /// Builds the model kind's task for `dataset`, with the image spec its examples are
    /// prepared to and a one-line description.
    pub fn build(&self, dataset: &mut dyn Dataset, device: &Device) -> Result<PreparedTask> {
        self.validate()?;
        let first = dataset.get(0)?;
        let data_channels = self.channels.unwrap_or(if first.image.channels <= 2 { 1 } else { 3 });
        // Every kind but pixel trains at a square size: `resolution`, or the data's (square) size.
        let square_size = || -> Result<usize> {
            match self.resolution {
                Some(size) => Ok(size),
                None if first.image.width == first.image.height => Ok(first.image.width),
                None => bail!("the images are {}×{}: set `resolution` (and `image_fit`)", first.image.width, first.image.height),
            }
        };
        match self.kind {
            ModelKind::Pixel => {
                let num_classes = match (self.pixel.class_conditional, dataset.num_classes()) {
                    (true, Some(n)) => Some(n),
                    (true, None) => bail!("`class_conditional`: {} has no labels", dataset.describe()),
                    (false, _) => None,
                };
                let request = UNetRequest {
                    data_channels,
                    data_size: (first.image.height, first.image.width),
                    resolution: self.resolution,
                    num_classes,
                    class_dropout: self.pixel.class_dropout,
                    learned_variance: matches!(self.pixel.loss, LossKind::Hybrid { .. }),
                };
                let unet = resolve_unet_config(self.model_config.as_deref().unwrap_or("small"), &request)?;
                let (height, width) = unet.sample_size.map(|s| s.height_width()).unwrap_or((first.image.height, first.image.width));
                let spec = ImageSpec { channels: unet.in_channels, height, width, fit: self.image_fit };
                let config = PixelTrainingConfig {
                    unet,
                    noise: self.noise.clone(),
                    prediction_type: self.prediction_type,
                    loss: self.pixel.loss,
                    timestep_sampling: self.timestep_sampling,
                    snr_gamma: self.snr_gamma,
                    num_classes,
                    class_dropout: self.pixel.class_dropout,
                    sampling: SampleSettings { seed: self.seed, ..self.sampling.clone() },
                };
                let task = PixelTask::new(config, self.seed, device)?;
                let description = format!(
                    "UNet2DModel, {} parameters, {}×{}×{}{}",
                    task.parameters().num_values(),
                    spec.channels,
                    spec.height,
                    spec.width,
                    num_classes.map(|n| format!(", {n} classes")).unwrap_or_default()
                );
                Ok(PreparedTask { task: Box::new(task), spec, description })
            }
            ModelKind::Autoencoder => {
                let size = square_size()?;
                let (vae_json, vae) = resolve_vae_config(self.model_config.as_deref().unwrap_or("vae-small"), data_channels, size)?;
                let spec = ImageSpec { channels: data_channels, height: size, width: size, fit: self.image_fit };
                let reference = first_images(dataset, &spec, self.sampling.count, device)?;
                let latent_size = size >> vae.block_out_channels.len().saturating_sub(1);
                let latent_channels = vae.latent_channels;
                let config = AutoencoderTrainingConfig {
                    vae_json,
                    vae,
                    reconstruction: self.autoencoder.reconstruction,
                    kl_weight: self.autoencoder.kl_weight,
                    export_dtype: self.export_dtype,
                };
                let task = AutoencoderTask::new(config, reference, self.seed, device)?;
                let description = format!(
                    "AutoencoderKL, {} parameters, {data_channels}×{size}×{size} → {latent_channels}×{latent_size}×{latent_size}",
                    task.parameters().num_values(),
                );
                Ok(PreparedTask { task: Box::new(task), spec, description })
            }
            ModelKind::TextToImage => self.build_text_to_image(dataset, square_size()?, device),
        }
    }

    fn build_text_to_image(&self, dataset: &mut dyn Dataset, size: usize, device: &Device) -> Result<PreparedTask> {
        let t2i = &self.text_to_image;
        let base = t2i.base.as_deref().map(resolve_base).transpose()?;
        let lora = t2i.lora.as_ref().map(LoraRecipe::resolve).transpose()?;
        let vae_dir = match (&t2i.vae, &base) {
            (Some(dir), _) => dir.clone(),
            (None, Some(base)) => base.join("vae"),
            (None, None) => bail!("text-to-image training needs `vae` (a trained autoencoder folder) or `base` (a pipeline)"),
        };
        let vae = FrozenVae::open(&vae_dir)?;
        let spec = ImageSpec { channels: vae.config.in_channels, height: size, width: size, fit: self.image_fit };
        if let Some(channels) = self.channels {
            if channels != vae.config.in_channels {
                bail!("`channels` {channels}, but the autoencoder takes {} channels", vae.config.in_channels);
            }
        }
        let text_encoder = match (&t2i.text_encoder, &base, &lora) {
            (Some(dir), _, _) => frozen_text_encoder(dir)?,
            (None, Some(base), Some(_)) => frozen_text_encoder(&base.join("text_encoder"))?,
            (None, Some(base), None) => resolve_text_encoder_config(&base.join("text_encoder/config.json").display().to_string())?,
            (None, None, _) => resolve_text_encoder_config(&t2i.text_encoder_config)?,
        };
        // An SDXL base: its second text encoder, frozen (LoRA training only).
        let text_encoder_2 = base.as_deref().map(SecondTextEncoder::of_base).transpose()?.flatten();
        if text_encoder_2.is_some() && lora.is_none() {
            bail!("`base` {}: an SDXL base is trained with LoRA adapters only: set `lora`", t2i.base.as_deref().unwrap_or_default());
        }
        let text_width = text_encoder.config().hidden_size + text_encoder_2.as_ref().map_or(0, |te| te.config.hidden_size);
        let base_unet_config = base.as_ref().map(|b| b.join("unet/config.json").display().to_string());
        let (unet_json, unet) = match (&base, &lora, &self.model_config) {
            // Adapters train at the data's size, whatever size the base makes by default.
            (Some(base), Some(_), None) => text_to_image::base_unet_config_for_lora(base, &vae, size, text_width)?,
            _ => text_to_image::resolve_unet_config(
                self.model_config.as_deref().or(base_unet_config.as_deref()).unwrap_or("unet-small"),
                &vae,
                size,
                text_width,
            )?,
        };
        let class_prompts = match &t2i.class_names {
            Some(names) => {
                if let Some(n) = dataset.num_classes() {
                    if n > names.len() {
                        bail!("`class_names` gives {} names, the data has {n} classes", names.len());
                    }
                }
                let templates = t2i.prompt_templates.clone().unwrap_or_else(|| DEFAULT_TEMPLATES.iter().map(|t| t.to_string()).collect());
                let prompts = ClassPrompts::new(names, templates).map_err(|e| Error::invalid(format!("`class_names` / `prompt_templates`: {e}")))?;
                Some(prompts)
            }
            None => None,
        };
        let prompts = if !t2i.sample_prompts.is_empty() {
            t2i.sample_prompts.clone()
        } else if let Some(class_prompts) = &class_prompts {
            class_prompts.main_prompts()
        } else {
            (0..dataset.len().min(4)).map(|i| Ok(dataset.get(i)?.caption.unwrap_or_default())).collect::<Result<Vec<_>>>()?
        };
        let config = TextToImageTrainingConfig {
            unet_json,
            unet,
            text_encoder,
            text_encoder_2,
            vae,
            noise: self.noise.clone(),
            prediction_type: self.prediction_type,
            timestep_sampling: self.timestep_sampling,
            snr_gamma: self.snr_gamma,
            caption_dropout: t2i.caption_dropout,
            class_prompts,
            sampling: TextSampleSettings {
                prompts,
                count: self.sampling.count,
                steps: self.sampling.steps,
                guidance_scale: t2i.sample_guidance_scale,
                scheduler: self.sampling.scheduler.clone(),
                seed: self.seed,
            },
            export_dtype: self.export_dtype,
            base: base.clone(),
            lora,
        };
        let task = TextToImageTask::new(config, self.seed, device)?;
        let what = match (&base, &t2i.lora) {
            (Some(base), Some(lora)) => format!("LoRA (rank {}) on {}", lora.rank, base.display()),
            (Some(base), None) => format!("UNet2DConditionModel + CLIPTextModel fine-tuned from {}", base.display()),
            (None, _) => "UNet2DConditionModel + CLIPTextModel".to_string(),
        };
        let description = format!("{what}, {} trained parameters, images {size}×{size}", task.parameters().num_values());
        Ok(PreparedTask { task: Box::new(task), spec, description })
    }
}

/// A model kind's task, ready for [`super::train`].
pub struct PreparedTask {
    /// The task.
    pub task: Box<dyn TrainingTask>,
    /// The size and channels the data is prepared to.
    pub spec: ImageSpec,
    /// One line about the model: its kind, parameters and sizes.
    pub description: String,
}

/// Trains what `recipe` describes with the loop's `config`: opens the data (a gzipped IDX file
/// is decompressed into `data-cache/` in the output folder), builds the model (or resumes it),
/// trains and exports it into `config.output_dir`. Notices (the data, the model, checkpoints)
/// go to `hooks.on_message`, progress to `hooks.on_progress`.
pub fn run(recipe: &TrainingRecipe, config: &TrainConfig, hooks: &mut Hooks, device: &Device) -> Result<TrainSummary> {
    // Everything that can be checked without the data is checked before reading it.
    config.validate()?;
    recipe.validate()?;
    let output = &config.output_dir;
    if output.exists() && !output.is_dir() {
        bail!("`output_dir` {}: exists and is not a folder", output.display());
    }
    std::fs::create_dir_all(output).map_err(|e| Error::io(output, e))?;
    let mut dataset = recipe.open_dataset(&output.join("data-cache"))?;
    if dataset.is_empty() {
        bail!("{}: the dataset is empty", dataset.describe());
    }
    (hooks.on_message)(&format!("data: {}", dataset.describe()));
    let PreparedTask { mut task, spec, description } = recipe.build(dataset.as_mut(), device)?;
    (hooks.on_message)(&format!("model: {description}"));
    let mut loader = DataLoader::new(dataset, spec, recipe.seed, recipe.random_flip)?;
    train(task.as_mut(), &mut loader, config, hooks)
}

/// `base`: `builtin` (the built-in model), a pipeline folder, or a repo id in the cache.
fn resolve_base(spec: &str) -> Result<PathBuf> {
    let dir = if spec == "builtin" || (spec == crate::default_model::NAME && !Path::new(spec).exists()) {
        crate::default_model::materialize(&crate::default_model::cache_root())?
    } else {
        crate::loading::hub::resolve_model(spec, None, None).map_err(|e| Error::invalid(format!("`base` {spec}: {e}")))?
    };
    for component in ["unet", "vae", "text_encoder"] {
        if !dir.join(component).is_dir() {
            bail!("`base` {spec}: {} is not a StableDiffusionPipeline folder (no {component}/)", dir.display());
        }
    }
    Ok(dir)
}

/// Errors unless `name` is a `diffuse schedulers` name.
fn check_scheduler(name: &str) -> Result<()> {
    match crate::pipelines::SCHEDULER_NAMES.iter().any(|(known, ..)| *known == name) {
        true => Ok(()),
        false => bail!("the samples' `scheduler` {name}: not a scheduler name (see `diffuse schedulers`)"),
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
