//! The text-to-image kind: a `UNet2DConditionModel` trained in the latents of a trained,
//! frozen AutoencoderKL, conditioned by cross-attention on a `CLIPTextModel` (trained jointly,
//! or loaded and frozen) fed by the real CLIP BPE tokenizer, as diffusers'
//! examples/text_to_image/train_text_to_image.py trains Stable Diffusion; exported in the
//! StableDiffusionPipeline layout.
//!
//! Captions come from the data (metadata.jsonl or sidecar .txt files), or from class labels
//! through prompt templates ("a photo of {a}" → "a photo of a sneaker"), a template and a
//! synonym drawn for each example. A caption is replaced by the empty prompt with
//! probability `caption_dropout`, so that classifier-free guidance works.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use serde_json::{json, Map, Value};

use super::data::Batch;
use super::export::{preset_or_file, require_key, write_json, write_model_folder, DIFFUSERS_VERSION};
use super::objectives::{DiffusionObjective, LossKind, ObjectiveOutput};
use super::params::Parameters;
use super::pixel::{load_sampler_state, sampler_state, training_objective, NoiseSchedule, TimestepSampling};
use super::{Image8, TrainingTask};
use crate::loading::config::{parse_config, read_json_object};
use crate::loading::weights::{find_weight_files, var_builder};
use crate::models::autoencoder_kl::{AutoencoderKL, AutoencoderKLConfig};
use crate::models::clip_text::{ClipTextConfig, ClipTextModel};
use crate::models::unet_2d_condition::{AddedConditions, UNet2DConditionModel, UNet2DConditionModelConfig};
use crate::models::LoraDropout;
use crate::pipelines::autoencoder::AutoencoderConfig;
use crate::pipelines::stable_diffusion::{Components, PhaseTimes, StableDiffusionPipeline, TextToImageOptions};
use crate::pipelines::{scheduler_from_config, to_uint8_images};
use crate::rng::TorchGenerator;
use crate::schedulers::PredictionType;
use crate::tokenizers::builtin::{builtin_clip_tokenizer, sd15_tokenizer_files};
use crate::tokenizers::clip::{input_ids_tensor, ClipTokenizer};
use crate::loading::single_file::Family;
use crate::lora::adapters::{check_adapted, AdapterConfig, Adapters};
use crate::lora::save::{TrainedLora, DIFFUSERS_FILE_NAME};
use crate::lora::{LoraSet, LoraSpec, Target};
use crate::{bail, Error, Result};

/// Named UNet2DConditionModel architectures for `--model-config` (the VAE sets the channels
/// and the sample size, the text encoder the cross-attention width).
pub const UNET_PRESETS: &[(&str, &str, &str)] = &[
    (
        "unet-tiny",
        "2 levels of 32 and 64 channels, cross-attention at the first: tests",
        r#"{"block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 8, "attention_head_dim": 8,
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]}"#,
    ),
    (
        "unet-small",
        "2 levels of 64 and 128 channels, cross-attention at both and in the middle: the built-in Fashion-MNIST model (8×8 latents)",
        r#"{"block_out_channels": [64, 128], "layers_per_block": 2, "norm_num_groups": 32, "attention_head_dim": 8,
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]}"#,
    ),
];

/// Named CLIPTextModel architectures for `--text-encoder-config` (the real CLIP vocabulary and
/// 77 positions, as the tokenizer needs).
pub const TEXT_ENCODER_PRESETS: &[(&str, &str, &str)] = &[
    (
        "clip-tiny",
        "width 32, 2 layers: tests",
        r#"{"hidden_size": 32, "intermediate_size": 64, "projection_dim": 32, "num_hidden_layers": 2, "num_attention_heads": 4}"#,
    ),
    (
        "clip-small",
        "width 64, 3 layers: the built-in Fashion-MNIST model",
        r#"{"hidden_size": 64, "intermediate_size": 256, "projection_dim": 64, "num_hidden_layers": 3, "num_attention_heads": 4}"#,
    ),
];

/// Fashion-MNIST's classes in label order, as prompt words, synonyms joined by `|` (the first
/// of each is its main name).
pub const FASHION_MNIST_CLASS_NAMES: &str = "t-shirt|top|tee|t-shirt top,trouser|trousers|pants,pullover|sweater|jumper,\
dress,coat|jacket,sandal|sandals,shirt|button-up shirt,sneaker|sneakers|running shoe,bag|handbag,ankle boot|boot|boots";

/// Class names from a comma-separated list (synonyms joined by `|`), or `fashion-mnist` for
/// [`FASHION_MNIST_CLASS_NAMES`].
pub fn class_names(list: &str) -> Vec<String> {
    let list = if list == "fashion-mnist" { FASHION_MNIST_CLASS_NAMES } else { list };
    list.split(',').map(str::to_string).collect()
}

/// Prompt templates for captions made from class names: `{a}` is the name with its article
/// ("an ankle boot"), `{}` the bare name.
pub const DEFAULT_TEMPLATES: &[&str] = &[
    "a photo of {a}",
    "{}",
    "{a}",
    "a picture of {a}",
    "an image of {a}",
    "a photo of the {}",
    "a black and white photo of {a}",
    "a grayscale image of {a}",
    "{a} on a black background",
    "a product photo of {a}",
    "a small photo of {a}",
    "a low resolution photo of {a}",
];

/// "an ankle boot", "a sneaker".
pub fn with_article(name: &str) -> String {
    let article = if name.starts_with(['a', 'e', 'i', 'o', 'u']) { "an" } else { "a" };
    format!("{article} {name}")
}

/// Captions for labelled data: each class's names (the first is its main name, the others
/// synonyms drawn as often) and the templates they are put into.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassPrompts {
    /// Per class, its names; the first is the main one.
    pub names: Vec<Vec<String>>,
    /// Caption templates: `{a}` is the name with its article, `{}` the bare name.
    pub templates: Vec<String>,
}

impl ClassPrompts {
    /// `names` has one entry per class, synonyms separated by `|` ("sneaker|running shoe").
    pub fn new(names: &[String], templates: Vec<String>) -> Result<Self> {
        if templates.is_empty() {
            bail!("no prompt templates");
        }
        if let Some(bad) = templates.iter().find(|t| !t.contains("{}") && !t.contains("{a}")) {
            bail!("prompt template `{bad}` has neither {{}} nor {{a}} for the class name");
        }
        let names: Vec<Vec<String>> =
            names.iter().map(|n| n.split('|').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect()).collect();
        if let Some(index) = names.iter().position(Vec::is_empty) {
            bail!("class {index} has an empty name");
        }
        Ok(Self { names, templates })
    }

    /// The caption of an example of `label` from two uniform draws in [0, 1).
    pub fn caption(&self, label: usize, template_draw: f32, name_draw: f32) -> Result<String> {
        let Some(names) = self.names.get(label) else {
            bail!("label {label} is out of range for {} class names", self.names.len());
        };
        let pick = |len: usize, draw: f32| ((draw as f64 * len as f64) as usize).min(len - 1);
        let name = &names[pick(names.len(), name_draw)];
        let template = &self.templates[pick(self.templates.len(), template_draw)];
        Ok(template.replace("{a}", &with_article(name)).replace("{}", name))
    }

    /// "a photo of a {main name}" for each class: the sample grids' prompts.
    pub fn main_prompts(&self) -> Vec<String> {
        self.names.iter().map(|names| format!("a photo of {}", with_article(&names[0]))).collect()
    }
}

/// The text encoder: trained with the UNet, or loaded from a folder and frozen.
#[derive(Debug, Clone)]
pub enum TextEncoderSource {
    /// A fresh `CLIPTextModel` trained with the UNet.
    Train {
        /// Its config as transformers keys (what is exported).
        json: Map<String, Value>,
        /// The parsed `json`.
        config: ClipTextConfig,
    },
    /// A trained `CLIPTextModel` loaded from `dir` and kept frozen.
    Frozen {
        /// The folder with `config.json` and `model.safetensors`.
        dir: PathBuf,
        /// Its config.
        config: ClipTextConfig,
    },
}

impl TextEncoderSource {
    /// The text encoder's architecture.
    pub fn config(&self) -> &ClipTextConfig {
        match self {
            Self::Train { config, .. } | Self::Frozen { config, .. } => config,
        }
    }
}

/// A trained text encoder's config from a preset or a file, over SD 1.5's (so that the
/// exported config.json is complete for transformers).
pub fn resolve_text_encoder_config(text_encoder_config: &str) -> Result<TextEncoderSource> {
    let (stated, origin) = preset_or_file(text_encoder_config, TEXT_ENCODER_PRESETS, "`text_encoder_config`")?;
    let mut json = crate::configs::parse(crate::configs::SD15.text_encoder);
    json.extend(stated);
    let config: ClipTextConfig = parse_config(&json, Path::new(&origin))?;
    if config.vocab_size != 49408 || config.max_position_embeddings < 77 {
        bail!("{origin}: the CLIP tokenizer needs vocab_size 49408 and max_position_embeddings ≥ 77");
    }
    Ok(TextEncoderSource::Train { json, config })
}

/// SDXL's second text encoder (OpenCLIP bigG with its projection), frozen: the base's
/// `text_encoder_2/` and the tokenizer that pads with `!` from `tokenizer_2/`.
#[derive(Debug, Clone)]
pub struct SecondTextEncoder {
    /// The base model's `text_encoder_2/` folder.
    pub dir: PathBuf,
    /// The `tokenizer_2/` folder.
    pub tokenizer_dir: PathBuf,
    /// The encoder's config (`text_encoder_2/config.json`).
    pub config: ClipTextConfig,
}

impl SecondTextEncoder {
    /// The base folder's second text encoder, when it has one (an SDXL base).
    pub fn of_base(base: &Path) -> Result<Option<Self>> {
        let dir = base.join("text_encoder_2");
        if !dir.is_dir() {
            return Ok(None);
        }
        let path = dir.join("config.json");
        let config: ClipTextConfig = parse_config(&read_json_object(&path)?, &path)?;
        Ok(Some(Self { dir, tokenizer_dir: base.join("tokenizer_2"), config }))
    }
}

/// A frozen text encoder folder (`config.json`, `model.safetensors`).
pub fn frozen_text_encoder(dir: &Path) -> Result<TextEncoderSource> {
    let path = dir.join("config.json");
    let config: ClipTextConfig = parse_config(&read_json_object(&path)?, &path)?;
    Ok(TextEncoderSource::Frozen { dir: dir.to_path_buf(), config })
}

/// The trained autoencoder the diffusion runs in: a folder with `config.json` and
/// `diffusion_pytorch_model.safetensors` (or a pipeline folder's `vae/`).
#[derive(Debug, Clone)]
pub struct FrozenVae {
    /// The folder with `config.json` and the weights.
    pub dir: PathBuf,
    /// The config as diffusers keys.
    pub json: Map<String, Value>,
    /// The parsed config.
    pub config: AutoencoderKLConfig,
}

impl FrozenVae {
    /// Reads the autoencoder's config from `dir` (or `dir/vae`).
    pub fn open(dir: &Path) -> Result<Self> {
        let dir = if !dir.join("config.json").is_file() && dir.join("vae/config.json").is_file() { dir.join("vae") } else { dir.to_path_buf() };
        let path = dir.join("config.json");
        let json = read_json_object(&path)?;
        let config: AutoencoderKLConfig = parse_config(&json, &path)?;
        Ok(Self { dir, json, config })
    }

    fn files(&self) -> Result<Vec<PathBuf>> {
        find_weight_files(&self.dir, "diffusion_pytorch_model", None)
    }

    fn model(&self, device: &Device) -> Result<AutoencoderKL> {
        let files = self.files()?;
        AutoencoderKL::new(var_builder(&files, DType::F32, device)?, &self.config).map_err(|e| e.in_weights_file(&files[0]))
    }

    /// 2^(levels - 1).
    pub fn scale_factor(&self) -> usize {
        1 << self.config.block_out_channels.len().saturating_sub(1)
    }
}

/// The UNet config from a preset or a file, with the VAE's latent channels and size and the
/// text encoder's width filled in (a contradicting stated value is refused, naming the key).
pub fn resolve_unet_config(
    model_config: &str,
    vae: &FrozenVae,
    image_size: usize,
    cross_attention_dim: usize,
) -> Result<(Map<String, Value>, UNet2DConditionModelConfig)> {
    let (map, origin) = preset_or_file(model_config, UNET_PRESETS, "`model_config`")?;
    check_unet_config(map, &origin, vae, image_size, cross_attention_dim)
}

/// The frozen base UNet's config for LoRA training at `image_size`: as [`resolve_unet_config`],
/// but the base's `sample_size` (the size it makes by default) need not be the training size:
/// adapters are trained at whatever size the data has (an SDXL base at 512², say).
pub fn base_unet_config_for_lora(
    base: &Path,
    vae: &FrozenVae,
    image_size: usize,
    cross_attention_dim: usize,
) -> Result<(Map<String, Value>, UNet2DConditionModelConfig)> {
    let path = base.join("unet").join("config.json");
    let mut map = read_json_object(&path)?;
    map.remove("sample_size");
    check_unet_config(map, &path.display().to_string(), vae, image_size, cross_attention_dim)
}

/// Fills in and checks the keys the VAE, the data and the text encoder decide.
fn check_unet_config(
    mut map: Map<String, Value>,
    origin: &str,
    vae: &FrozenVae,
    image_size: usize,
    cross_attention_dim: usize,
) -> Result<(Map<String, Value>, UNet2DConditionModelConfig)> {
    let origin = origin.to_string();
    let factor = vae.scale_factor();
    if image_size == 0 || !image_size.is_multiple_of(factor) {
        bail!("the image size {image_size} is not a multiple of the autoencoder's scale factor {factor}");
    }
    let latent_channels = json!(vae.config.latent_channels);
    require_key(&mut map, &origin, "in_channels", latent_channels.clone(), "the autoencoder's latent_channels")?;
    require_key(&mut map, &origin, "out_channels", latent_channels, "the autoencoder's latent_channels")?;
    require_key(&mut map, &origin, "sample_size", json!(image_size / factor), "the latent size of the data")?;
    require_key(&mut map, &origin, "cross_attention_dim", json!(cross_attention_dim), "the text encoder's hidden_size")?;
    let config: UNet2DConditionModelConfig = parse_config(&map, Path::new(&origin))?;
    if config.dropout != 0.0 {
        bail!("{origin}: `dropout` {} is not supported in training; use 0", config.dropout);
    }
    let levels = 1usize << config.down_block_types.len().saturating_sub(1);
    if !(image_size / factor).is_multiple_of(levels) {
        bail!("{origin}: the latent size {} must be a multiple of {levels} for {} levels", image_size / factor, config.down_block_types.len());
    }
    Ok((map, config))
}

/// The sample grids written during training.
#[derive(Debug, Clone, PartialEq)]
pub struct TextSampleSettings {
    /// One grid row per prompt.
    pub prompts: Vec<String>,
    /// Images per prompt.
    pub count: usize,
    /// Inference steps per grid.
    pub steps: usize,
    /// The guidance scale of classifier-free guidance.
    pub guidance_scale: f64,
    /// A `diffuse schedulers` name.
    pub scheduler: String,
    /// Seeds the grids' noise, the same at every write.
    pub seed: u64,
}

/// Everything the text-to-image kind needs besides the loop's settings.
#[derive(Debug, Clone)]
pub struct TextToImageTrainingConfig {
    /// The UNet's config as diffusers keys (what is exported).
    pub unet_json: Map<String, Value>,
    /// The parsed `unet_json`.
    pub unet: UNet2DConditionModelConfig,
    /// The text encoder, trained or frozen.
    pub text_encoder: TextEncoderSource,
    /// An SDXL base's second text encoder (LoRA training only).
    pub text_encoder_2: Option<SecondTextEncoder>,
    /// The frozen autoencoder the latents come from.
    pub vae: FrozenVae,
    /// The training noise schedule.
    pub noise: NoiseSchedule,
    /// What the UNet predicts.
    pub prediction_type: PredictionType,
    /// How timesteps are drawn.
    pub timestep_sampling: TimestepSampling,
    /// Min-SNR weighting with this gamma; `None` weighs timesteps equally.
    pub snr_gamma: Option<f64>,
    /// The probability of training on the empty prompt instead of the caption.
    pub caption_dropout: f64,
    /// Captions for labelled data without captions.
    pub class_prompts: Option<ClassPrompts>,
    /// The sample grids.
    pub sampling: TextSampleSettings,
    /// The weights' type in the exported pipeline.
    pub export_dtype: DType,
    /// A StableDiffusionPipeline folder whose UNet (and trained text encoder) the training
    /// starts from instead of from scratch (fine-tuning), or, with `lora`, that stays frozen
    /// under the adapters.
    pub base: Option<PathBuf>,
    /// Train LoRA adapters beside the base's layers instead of the weights themselves.
    pub lora: Option<LoraTraining>,
}

/// What LoRA training adapts, and how the result is written.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraTraining {
    /// Adapters on the UNet.
    pub unet: AdapterConfig,
    /// Adapters on the (frozen) text encoder too.
    pub text_encoder: Option<AdapterConfig>,
    /// The kohya-format file's name, written beside diffusers' `pytorch_lora_weights.safetensors`.
    pub kohya_file_name: String,
    /// peft's `lora_dropout`: the probability of dropping each element of a branch's input.
    pub dropout: f64,
}

impl LoraTraining {
    /// The adapters per model; an SDXL base's text-encoder adapters go on both encoders.
    fn configs(&self, xl: bool) -> BTreeMap<Target, AdapterConfig> {
        let mut configs = BTreeMap::from([(Target::Unet, self.unet.clone())]);
        if let Some(te) = &self.text_encoder {
            configs.insert(Target::TextEncoder, te.clone());
            if xl {
                configs.insert(Target::TextEncoder2, te.clone());
            }
        }
        configs
    }
}

/// The exported scheduler: Stable Diffusion 1.5's PNDM configuration over the training
/// noise schedule and prediction type.
pub fn pndm_scheduler_config(noise: &NoiseSchedule, prediction_type: PredictionType) -> Map<String, Value> {
    let mut map = crate::configs::parse(crate::configs::SD15.scheduler);
    map.insert("_diffusers_version".into(), json!(DIFFUSERS_VERSION));
    map.insert("num_train_timesteps".into(), json!(noise.num_train_timesteps));
    map.insert("beta_schedule".into(), json!(noise.beta_schedule));
    map.insert("beta_start".into(), json!(noise.beta_start));
    map.insert("beta_end".into(), json!(noise.beta_end));
    map.insert("prediction_type".into(), json!(prediction_type.name()));
    map
}

/// A UNet2DConditionModel (and perhaps its text encoder) being trained.
pub struct TextToImageTask {
    config: TextToImageTrainingConfig,
    parameters: Parameters,
    tokenizer: ClipTokenizer,
    unet: UNet2DConditionModel,
    text_encoder: ClipTextModel,
    /// An SDXL base's second encoder and its tokenizer.
    text_encoder_2: Option<(ClipTokenizer, ClipTextModel)>,
    vae: AutoencoderKL,
    objective: DiffusionObjective,
    scheduler_config: Map<String, Value>,
    device: Device,
    /// The adapters (LoRA training) whose matrices are the parameters.
    adapters: Option<Adapters>,
    /// Draws the LoRA dropout masks (checkpointed with the task's state).
    dropout_generator: TorchGenerator,
    _varmap: VarMap,
}

impl TextToImageTask {
    /// Builds the UNet (and a trained text encoder) on trainable variables initialised as
    /// PyTorch does (from `init_seed`; the text encoder's embeddings as transformers' CLIP
    /// initialises them, N(0, 0.02²) and N(0, 0.01²)) or from the base's weights; or, for
    /// LoRA training, the base's frozen models with adapters (A drawn from `init_seed`).
    /// Loads the frozen models.
    pub fn new(config: TextToImageTrainingConfig, init_seed: u64, device: &Device) -> Result<Self> {
        if !(0.0..1.0).contains(&config.caption_dropout) {
            bail!("`caption_dropout` must be in [0, 1), got {}", config.caption_dropout);
        }
        // SDXL's UNet attends to both encoders' hidden states side by side.
        let text_width = config.text_encoder.config().hidden_size + config.text_encoder_2.as_ref().map_or(0, |te| te.config.hidden_size);
        if config.unet.cross_attention_dim != text_width {
            bail!(
                "the UNet's cross_attention_dim ({}) does not match the text encoders' hidden_size ({text_width})",
                config.unet.cross_attention_dim,
            );
        }
        if config.text_encoder_2.is_some() && config.lora.is_none() {
            bail!("an SDXL base is trained with LoRA adapters only (give a LoRA rank)");
        }
        if config.sampling.prompts.is_empty() || config.sampling.count == 0 || config.sampling.steps == 0 {
            bail!("sample grids need at least one prompt, one image and one step");
        }
        let scheduler_config = pndm_scheduler_config(&config.noise, config.prediction_type);
        let objective = training_objective(&config.noise, config.prediction_type, LossKind::Mse, config.snr_gamma, config.timestep_sampling)?;
        let vae = config.vae.model(device)?;
        let tokenizer = builtin_clip_tokenizer(Family::StableDiffusion1)?;
        let (unet, text_encoder, text_encoder_2, varmap, adapters) = match &config.lora {
            Some(lora) => {
                let (unet, text_encoder, text_encoder_2, adapters) = Self::adapted_models(&config, lora, init_seed, device)?;
                (unet, text_encoder, text_encoder_2, adapters.varmap().clone(), Some(adapters))
            }
            None => {
                let (unet, text_encoder, varmap) = Self::trained_models(&config, device)?;
                (unet, text_encoder, None, varmap, None)
            }
        };
        let parameters = Parameters::from_varmap(&varmap)?;
        if adapters.is_none() {
            parameters.init_torch_default(init_seed)?;
            // transformers' CLIPTextEmbeddings initialisation (std 0.02 for tokens, 0.01 for
            // positions) rather than nn.Embedding's N(0, 1).
            for (name, var) in parameters.names().iter().zip(parameters.vars()) {
                let scale = match name.rsplit('.').nth(1) {
                    Some("token_embedding") if name.starts_with("text_encoder.") => 0.02,
                    Some("position_embedding") if name.starts_with("text_encoder.") => 0.01,
                    _ => continue,
                };
                var.set(&var.as_tensor().affine(scale, 0.0)?)?;
            }
            if let Some(base) = &config.base {
                load_base_weights(&parameters, base, matches!(config.text_encoder, TextEncoderSource::Train { .. }))?;
            }
        }
        Ok(Self {
            config,
            parameters,
            tokenizer,
            unet,
            text_encoder,
            text_encoder_2,
            vae,
            objective,
            scheduler_config,
            device: device.clone(),
            adapters,
            dropout_generator: TorchGenerator::new(init_seed.wrapping_add(7)),
            _varmap: varmap,
        })
    }

    /// The UNet (and a trained text encoder) on trainable variables; a frozen text encoder
    /// from its folder.
    fn trained_models(config: &TextToImageTrainingConfig, device: &Device) -> Result<(UNet2DConditionModel, ClipTextModel, VarMap)> {
        let varmap = VarMap::new();
        let trainable = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let unet = UNet2DConditionModel::new(trainable.pp("unet"), &config.unet)?;
        let text_encoder = match &config.text_encoder {
            TextEncoderSource::Train { config: te_config, .. } => ClipTextModel::new(trainable.pp("text_encoder"), te_config)?,
            TextEncoderSource::Frozen { dir, config: te_config } => {
                let files = find_weight_files(dir, "model", None)?;
                ClipTextModel::new(var_builder(&files, DType::F32, device)?, te_config).map_err(|e| e.in_weights_file(&files[0]))?
            }
        };
        Ok((unet, text_encoder, varmap))
    }

    /// The base's frozen UNet and text encoder with LoRA adapters on `lora`'s targets.
    fn adapted_models(
        config: &TextToImageTrainingConfig,
        lora: &LoraTraining,
        init_seed: u64,
        device: &Device,
    ) -> Result<(UNet2DConditionModel, ClipTextModel, Option<(ClipTokenizer, ClipTextModel)>, Adapters)> {
        let base = config.base.as_deref().ok_or_else(|| Error::invalid("LoRA training needs a base model (`base`)"))?;
        if !(0.0..1.0).contains(&lora.dropout) {
            bail!("the LoRA `dropout` must be in [0, 1), got {}", lora.dropout);
        }
        let adapters = Adapters::new(init_seed);
        let unet_files = find_weight_files(&base.join("unet"), "diffusion_pytorch_model", None)?;
        let unet_weights = adapters.wrap(Target::Unet, &lora.unet, var_builder(&unet_files, DType::F32, device)?)?;
        let unet = UNet2DConditionModel::new(unet_weights, &config.unet).map_err(|e| e.in_weights_file(&unet_files[0]))?;
        check_adapted(&adapters, Target::Unet, &lora.unet)?;
        let TextEncoderSource::Frozen { dir, config: te_config } = &config.text_encoder else {
            bail!("LoRA training keeps the base's text encoder frozen; it cannot train a new one");
        };
        let te_files = find_weight_files(dir, "model", None)?;
        let mut te_weights = var_builder(&te_files, DType::F32, device)?;
        if let Some(te_lora) = &lora.text_encoder {
            te_weights = adapters.wrap(Target::TextEncoder, te_lora, te_weights)?;
        }
        let text_encoder = ClipTextModel::new(te_weights, te_config).map_err(|e| e.in_weights_file(&te_files[0]))?;
        if let Some(te_lora) = &lora.text_encoder {
            check_adapted(&adapters, Target::TextEncoder, te_lora)?;
        }
        let text_encoder_2 = match &config.text_encoder_2 {
            Some(second) => {
                let files = find_weight_files(&second.dir, "model", None)?;
                let mut weights = var_builder(&files, DType::F32, device)?;
                if let Some(te_lora) = &lora.text_encoder {
                    weights = adapters.wrap(Target::TextEncoder2, te_lora, weights)?;
                }
                let model = ClipTextModel::new(weights, &second.config).map_err(|e| e.in_weights_file(&files[0]))?;
                if let Some(te_lora) = &lora.text_encoder {
                    check_adapted(&adapters, Target::TextEncoder2, te_lora)?;
                }
                Some((ClipTokenizer::from_folder(&second.tokenizer_dir)?, model))
            }
            None => None,
        };
        Ok((unet, text_encoder, text_encoder_2, adapters))
    }

    /// The LoRA that `weights` (the adapters' matrices by parameter name) make.
    pub fn trained_lora(&self, weights: &HashMap<String, Tensor>) -> Result<Option<TrainedLora>> {
        match (&self.config.lora, &self.adapters) {
            (Some(lora), Some(adapters)) => {
                let mut trained = TrainedLora::from_tensors(&adapters.layers(), lora.configs(self.text_encoder_2.is_some()), weights)?;
                trained.dropout = lora.dropout;
                Ok(Some(trained))
            }
            _ => Ok(None),
        }
    }

    /// The base pipeline's frozen components with the LoRA of `weights` fused in, as
    /// `diffuse generate --lora` would load it.
    fn lora_pipeline(&self, base: &Path, lora: TrainedLora) -> Result<StableDiffusionPipeline> {
        let origin = PathBuf::from("(training)");
        let file = lora.as_lora_file(&origin)?;
        let loras = LoraSet::from_files(vec![(LoraSpec::new(&origin, 1.0), file)]);
        let model = |folder: &str, stem: &str| -> Result<(VarBuilder<'static>, PathBuf)> {
            let files = find_weight_files(&base.join(folder), stem, None)?;
            Ok((var_builder(&files, DType::F32, &self.device)?, files[0].clone()))
        };
        let (te_weights, te_file) = model("text_encoder", "model")?;
        let (unet_weights, unet_file) = model("unet", "diffusion_pytorch_model")?;
        let (vae_weights, vae_file) = model("vae", "diffusion_pytorch_model")?;
        let text_encoder_2 = match (&self.config.text_encoder_2, &self.text_encoder_2) {
            (Some(second), Some((tokenizer, _))) => {
                let (weights, file) = model("text_encoder_2", "model")?;
                Some((tokenizer.clone(), (second.config.clone(), weights, file)))
            }
            _ => None,
        };
        let components = Components {
            tokenizer: self.tokenizer.clone(),
            text_encoder: (self.config.text_encoder.config().clone(), te_weights, te_file),
            text_encoder_2,
            unet: (self.config.unet.clone(), unet_weights, unet_file),
            vae: (AutoencoderConfig::Kl(self.config.vae.config.clone()), vae_weights, vae_file),
            scheduler: self.sample_scheduler()?,
        };
        let mut pipeline = StableDiffusionPipeline::from_components(components.with_loras(&loras)?, base, &self.device, DType::F32)?;
        pipeline.apply_model_index(base);
        loras.finish()?;
        Ok(pipeline)
    }

    fn sample_scheduler(&self) -> Result<crate::pipelines::ResolvedScheduler> {
        scheduler_from_config(self.scheduler_config.clone(), Path::new("the training noise schedule"), Some(&self.config.sampling.scheduler), &[])
    }

    /// Each example's caption (from the data, or made from its label), the empty prompt with
    /// probability `caption_dropout`. Draws, per example: the dropout, then (for labels) the
    /// template and the name.
    fn captions(&self, batch: &Batch, generator: &mut TorchGenerator) -> Result<Vec<String>> {
        let size = batch.images.dim(0)?;
        let mut captions = Vec::with_capacity(size);
        for index in 0..size {
            let draws = generator.rand(3);
            let caption = match (&batch.captions, &batch.labels, &self.config.class_prompts) {
                (Some(captions), _, _) => captions[index].clone(),
                (None, Some(labels), Some(prompts)) => prompts.caption(labels[index] as usize, draws[1], draws[2])?,
                (None, Some(_), None) => bail!("the data has labels but no captions: give the class names (`class_prompts`)"),
                (None, None, _) => bail!("text-to-image training needs captions (metadata.jsonl or .txt files) or labels with class names"),
            };
            captions.push(if (draws[0] as f64) < self.config.caption_dropout { String::new() } else { caption });
        }
        Ok(captions)
    }

    /// The prompt embeddings `[B, 77, hidden]` (the text encoder's last layer, as Stable
    /// Diffusion conditions on it); for an SDXL base both encoders' penultimate layers side
    /// by side and the second one's pooled projection `[B, projection_dim]`, as diffusers'
    /// train_text_to_image_lora_sdxl.py encodes them.
    fn encode(&self, captions: &[String], lora_dropout: Option<&LoraDropout>) -> Result<(Tensor, Option<Tensor>)> {
        // A frozen encoder needs no gradient, unless it carries adapters being trained.
        let trained = matches!(self.config.text_encoder, TextEncoderSource::Train { .. })
            || self.config.lora.as_ref().is_some_and(|lora| lora.text_encoder.is_some());
        let detach = |t: Tensor| if trained { t } else { t.detach() };
        let ids = |tokenizer: &ClipTokenizer| input_ids_tensor(&tokenizer.encode_batch(captions)?, &self.device);
        let Some((tokenizer_2, text_encoder_2)) = &self.text_encoder_2 else {
            let hidden = self.text_encoder.forward_with_lora_dropout(&ids(&self.tokenizer)?, lora_dropout)?.last_hidden_state;
            return Ok((detach(hidden), None));
        };
        let (first, _) = self.text_encoder.encode_penultimate_with_lora_dropout(&ids(&self.tokenizer)?, lora_dropout)?;
        let (second, pooled) = text_encoder_2.encode_penultimate_with_lora_dropout(&ids(tokenizer_2)?, lora_dropout)?;
        let pooled = pooled.ok_or_else(|| Error::invalid("the second text encoder has no text_projection"))?;
        Ok((detach(Tensor::cat(&[first, second], 2)?), Some(detach(pooled))))
    }

    /// SDXL's time ids for a batch: each example's original size and crop, and the training
    /// size, as diffusers' `compute_time_ids`.
    fn time_ids(&self, batch: &Batch) -> Result<Tensor> {
        let (_, _, height, width) = batch.images.dims4()?;
        let rows: Vec<f32> = batch
            .original_sizes
            .iter()
            .zip(&batch.crops_top_left)
            .flat_map(|(&(oh, ow), &(top, left))| [oh, ow, top, left, height, width].map(|v| v as f32))
            .collect();
        Ok(Tensor::from_vec(rows, (batch.original_sizes.len(), 6), &self.device)?)
    }

    /// The batch's loss, LoRA dropout (if any) drawn from `masks`.
    fn loss_with_masks(&mut self, batch: &Batch, generator: &mut TorchGenerator, masks: &mut TorchGenerator) -> Result<ObjectiveOutput> {
        let captions = self.captions(batch, generator)?;
        let dropout = self.config.lora.as_ref().map_or(0.0, |lora| lora.dropout);
        let (embeddings, pooled) = self.encode(&captions, LoraDropout::new(dropout, masks).as_ref())?;
        let added = match pooled {
            Some(text_embeds) => Some(AddedConditions { text_embeds, time_ids: self.time_ids(batch)? }),
            None => None,
        };
        let vae_config = &self.config.vae.config;
        let mut latents = self.vae.encode(&batch.images)?.sample(generator)?.detach();
        if let Some(shift) = vae_config.shift_factor {
            latents = (latents - shift)?;
        }
        let latents = (latents * vae_config.scaling_factor)?;
        let unet = &self.unet;
        let lora_dropout = LoraDropout::new(dropout, masks);
        self.objective.loss(&latents, generator, &mut |x_t, t| {
            unet.forward_with_lora_dropout(x_t, t, &embeddings, added.as_ref(), lora_dropout.as_ref())
        })
    }

    /// A pipeline over the given weights, sampling with the sample grids' scheduler.
    pub fn pipeline(&self, weights: &HashMap<String, Tensor>) -> Result<StableDiffusionPipeline> {
        if let (Some(lora), Some(base)) = (self.trained_lora(weights)?, &self.config.base) {
            return self.lora_pipeline(base, lora);
        }
        let trained = VarBuilder::from_tensors(weights.clone(), DType::F32, &self.device);
        let origin = PathBuf::from("(training)");
        let text_encoder = match &self.config.text_encoder {
            TextEncoderSource::Train { config, .. } => (config.clone(), trained.pp("text_encoder"), origin.clone()),
            TextEncoderSource::Frozen { dir, config } => {
                let files = find_weight_files(dir, "model", None)?;
                (config.clone(), var_builder(&files, DType::F32, &self.device)?, files[0].clone())
            }
        };
        let vae_files = self.config.vae.files()?;
        let components = Components {
            tokenizer: self.tokenizer.clone(),
            text_encoder,
            text_encoder_2: None,
            unet: (self.config.unet.clone(), trained.pp("unet"), origin.clone()),
            vae: (AutoencoderConfig::Kl(self.config.vae.config.clone()), var_builder(&vae_files, DType::F32, &self.device)?, vae_files[0].clone()),
            scheduler: self.sample_scheduler()?,
        };
        StableDiffusionPipeline::from_components(components, &origin, &self.device, DType::F32)
    }
}

impl TrainingTask for TextToImageTask {
    fn parameters(&self) -> &Parameters {
        &self.parameters
    }

    fn identity(&self) -> Map<String, Value> {
        let mut map = Map::new();
        map.insert("kind".into(), json!("text-to-image UNet2DConditionModel"));
        map.insert("unet".into(), Value::Object(self.config.unet_json.clone()));
        map.insert(
            "text_encoder".into(),
            match &self.config.text_encoder {
                TextEncoderSource::Train { json, .. } => Value::Object(json.clone()),
                TextEncoderSource::Frozen { dir, .. } => json!(format!("frozen: {}", dir.display())),
            },
        );
        map.insert("vae".into(), Value::Object(self.config.vae.json.clone()));
        map.insert("noise".into(), serde_json::to_value(&self.config.noise).unwrap_or(Value::Null));
        map.insert("prediction_type".into(), json!(self.config.prediction_type.name()));
        map.insert("timestep_sampling".into(), serde_json::to_value(self.config.timestep_sampling).unwrap_or(Value::Null));
        map.insert("snr_gamma".into(), json!(self.config.snr_gamma));
        map.insert("caption_dropout".into(), json!(self.config.caption_dropout));
        if let Some(base) = &self.config.base {
            map.insert("base".into(), json!(base.display().to_string()));
        }
        if let Some(second) = &self.config.text_encoder_2 {
            map.insert("text_encoder_2".into(), json!(format!("frozen: {}", second.dir.display())));
        }
        if let Some(lora) = &self.config.lora {
            let adapter = |c: &AdapterConfig| json!({"r": c.rank, "lora_alpha": c.alpha, "target_modules": c.target_modules});
            map.insert("lora_unet".into(), adapter(&lora.unet));
            map.insert("lora_text_encoder".into(), lora.text_encoder.as_ref().map(adapter).unwrap_or(Value::Null));
            map.insert("lora_dropout".into(), json!(lora.dropout));
        }
        map
    }

    /// Draws (in order) the captions' dropout and templates, the latents' noise, the
    /// timesteps and the diffusion noise.
    fn loss(&mut self, batch: &Batch, generator: &mut TorchGenerator) -> Result<Tensor> {
        // The LoRA dropout masks come from the task's own generator, lent out for the pass.
        let mut masks = std::mem::replace(&mut self.dropout_generator, TorchGenerator::new(0));
        let output = self.loss_with_masks(batch, generator, &mut masks);
        self.dropout_generator = masks;
        let output = output?;
        self.objective.record(&output);
        Ok(output.loss)
    }

    fn state(&self) -> Result<(Value, HashMap<String, Tensor>)> {
        let (mut state, tensors) = sampler_state(&self.objective)?;
        if self.config.lora.as_ref().is_some_and(|lora| lora.dropout > 0.0) {
            let generator = serde_json::to_value(self.dropout_generator.state()).map_err(|e| Error::invalid(e.to_string()))?;
            if !state.is_object() {
                state = json!({});
            }
            state["lora_dropout_generator"] = generator;
        }
        Ok((state, tensors))
    }

    fn load_state(&mut self, state: &Value, tensors: &HashMap<String, Tensor>) -> Result<()> {
        if let Some(saved) = state.get("lora_dropout_generator") {
            let saved = serde_json::from_value(saved.clone()).map_err(|e| Error::invalid(format!("checkpoint: the LoRA dropout generator: {e}")))?;
            self.dropout_generator = TorchGenerator::from_state(&saved)?;
        }
        load_sampler_state(&mut self.objective, state, tensors)
    }

    /// A row per prompt, each from the same seed.
    fn samples(&mut self, weights: &HashMap<String, Tensor>) -> Result<(Vec<Image8>, usize)> {
        let mut pipeline = self.pipeline(weights)?;
        let settings = self.config.sampling.clone();
        let mut images = Vec::new();
        for prompt in &settings.prompts {
            let options = TextToImageOptions {
                prompt: prompt.clone(),
                num_inference_steps: settings.steps,
                guidance_scale: settings.guidance_scale,
                num_images_per_prompt: settings.count,
                ..TextToImageOptions::default()
            };
            let mut generator = TorchGenerator::new(settings.seed);
            let samples = pipeline.generate(&options, &mut generator, &mut |_, _| {}, &mut |_| {}, &mut PhaseTimes::default())?;
            images.extend(to_uint8_images(&samples)?);
        }
        Ok((images, settings.count))
    }

    /// The StableDiffusionPipeline folder: model_index.json, scheduler/, text_encoder/,
    /// tokenizer/, unet/ and vae/ (the frozen autoencoder, in the export type).
    fn export(&self, weights: &HashMap<String, Tensor>, dir: &Path) -> Result<()> {
        let dtype = self.config.export_dtype;
        if let (Some(trained), Some(lora)) = (self.trained_lora(weights)?, &self.config.lora) {
            trained.write_diffusers(&dir.join(DIFFUSERS_FILE_NAME), dtype)?;
            return trained.write_kohya(&dir.join(&lora.kohya_file_name), dtype);
        }
        write_model_folder(&dir.join("unet"), Some("UNet2DConditionModel"), &self.config.unet_json, weights, "unet.", "diffusion_pytorch_model.safetensors", dtype)?;
        // transformers' config.json has no `_class_name`; the weights carry the `text_model.`
        // prefix, as every Stable Diffusion checkpoint on the hub does (and transformers 5
        // reads).
        let te_dir = dir.join("text_encoder");
        let (te_json, te_weights) = match &self.config.text_encoder {
            TextEncoderSource::Train { json, .. } => {
                let renamed: HashMap<String, Tensor> = weights
                    .iter()
                    .filter_map(|(name, t)| name.strip_prefix("text_encoder.").map(|rest| (format!("text_model.{rest}"), t.clone())))
                    .collect();
                (json.clone(), renamed)
            }
            TextEncoderSource::Frozen { dir: source, .. } => {
                let files = find_weight_files(source, "model", None)?;
                let mut tensors = HashMap::new();
                for file in &files {
                    tensors.extend(crate::loading::weights::load_safetensors(file, &Device::Cpu)?);
                }
                (read_json_object(&source.join("config.json"))?, tensors)
            }
        };
        let mut te_config = te_json.clone();
        te_config.insert("torch_dtype".into(), json!(if dtype == DType::F16 { "float16" } else { "float32" }));
        write_model_folder(&te_dir, None, &te_config, &te_weights, "", "model.safetensors", dtype)?;

        let mut vae_tensors = HashMap::new();
        for file in self.config.vae.files()? {
            vae_tensors.extend(crate::loading::weights::load_safetensors(&file, &Device::Cpu)?);
        }
        write_model_folder(&dir.join("vae"), Some("AutoencoderKL"), &self.config.vae.json, &vae_tensors, "", "diffusion_pytorch_model.safetensors", dtype)?;

        let tokenizer_dir = dir.join("tokenizer");
        std::fs::create_dir_all(&tokenizer_dir).map_err(|e| Error::io(&tokenizer_dir, e))?;
        for (name, bytes) in sd15_tokenizer_files()? {
            crate::files::write_atomically(&tokenizer_dir.join(name), &bytes)?;
        }
        write_json(&dir.join("scheduler/scheduler_config.json"), &Value::Object(self.scheduler_config.clone()))?;
        write_json(
            &dir.join("model_index.json"),
            &json!({
                "_class_name": "StableDiffusionPipeline",
                "_diffusers_version": DIFFUSERS_VERSION,
                "feature_extractor": [null, null],
                "image_encoder": [null, null],
                "requires_safety_checker": false,
                "safety_checker": [null, null],
                "scheduler": ["diffusers", "PNDMScheduler"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
            }),
        )
    }
}

/// Sets the trained parameters (`unet.*`, and `text_encoder.*` when the text encoder is
/// trained) from a pipeline folder's weights: fine-tuning starts where that model ended.
fn load_base_weights(parameters: &Parameters, base: &Path, text_encoder: bool) -> Result<()> {
    let mut named = HashMap::new();
    let mut components = vec![("unet", "diffusion_pytorch_model", "unet.")];
    if text_encoder {
        components.push(("text_encoder", "model", "text_encoder."));
    }
    for (folder, stem, prefix) in components {
        for file in find_weight_files(&base.join(folder), stem, None)? {
            for (name, tensor) in crate::loading::weights::load_safetensors(&file, &Device::Cpu)? {
                // CLIP's weights with or without `text_model.` (as the model reads them);
                // `position_ids` is a buffer some transformers versions saved.
                let name = name.strip_prefix("text_model.").unwrap_or(&name).to_string();
                if name.ends_with("position_ids") {
                    continue;
                }
                named.insert(format!("{prefix}{name}"), tensor);
            }
        }
    }
    let values = parameters.values_from_named_tensors(&named, &base.display().to_string())?;
    parameters.set_values(&values)
}
