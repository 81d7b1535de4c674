//! Text-to-image latent diffusion: diffusers' StableDiffusionPipeline
//! (diffusers/pipelines/stable_diffusion/pipeline_stable_diffusion.py), and for SDXL folders
//! StableDiffusionXLPipeline (diffusers/pipelines/stable_diffusion_xl/pipeline_stable_diffusion_xl.py).
//! The prompt (and the negative prompt) go through the CLIP tokenizer and text encoder (SDXL:
//! both encoders' penultimate layers, concatenated, and the second one's pooled projection);
//! classifier-free guidance batches [unconditional, conditional] into one UNet pass; the
//! scheduler loop runs in the VAE's latent space (SDXL's UNet also takes the pooled embedding
//! and the size/crop ids); the VAE decodes the result.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde_json::Value;

use crate::loading::config::{parse_config, read_json_object};
use crate::loading::single_file::{Component, Family, SingleFile};
use crate::loading::weights::{find_weight_files, var_builder};
use crate::lora::{AppliedLora, LoraSet, LoraSpec, Target};
use crate::models::autoencoder_kl::AutoencoderKLConfig;
use crate::models::clip_text::{ClipTextConfig, ClipTextModel};
use crate::models::unet_2d_condition::{AddedConditions, PerBlock, UNet2DConditionModel, UNet2DConditionModelConfig};
use crate::pipelines::autoencoder::{Autoencoder, AutoencoderConfig};
use crate::pipelines::{resolve_scheduler, scheduler_from_config, ResolvedScheduler};
use crate::prompts::{a1111, extra_networks, PromptSyntax};
use crate::rng::TorchGenerator;
use crate::schedulers::{PredictionType, Scheduler};
use crate::tokenizers::builtin::builtin_clip_tokenizer;
use crate::tokenizers::clip::ClipTokenizer;
use crate::{ops, Error, Result};

/// A latent text-to-image pipeline: diffusers' StableDiffusionPipeline (SD 1.x/2.x),
/// StableDiffusionXLPipeline (base and refiner) and LatentConsistencyModelPipeline; image-to-image
/// and inpainting run on the same components.
pub struct StableDiffusionPipeline {
    /// The first (for SD 1.x/2.x the only) text encoder and its tokenizer. An SDXL refiner has
    /// only OpenCLIP bigG, diffusers' `text_encoder_2`: it is kept here.
    pub tokenizer: ClipTokenizer,
    /// The first text encoder (CLIP ViT-L for SD 1.x and SDXL base, OpenCLIP ViT-H for SD 2.x; for
    /// the SDXL refiner, OpenCLIP bigG).
    pub text_encoder: ClipTextModel,
    /// SDXL base's second text encoder (`CLIPTextModelWithProjection`) and its tokenizer.
    pub text_encoder_2: Option<(ClipTokenizer, ClipTextModel)>,
    /// SDXL's `model_index.json` settings (false for other pipelines): no negative prompt
    /// means zero negative embeddings (`force_zeros_for_empty_prompt`), and the time ids end
    /// with the aesthetic score rather than the target size (`requires_aesthetics_score`).
    pub force_zeros_for_empty_prompt: bool,
    /// SDXL refiner: condition on aesthetic scores instead of the target size (see
    /// `force_zeros_for_empty_prompt`).
    pub requires_aesthetics_score: bool,
    /// The denoising UNet (`UNet2DConditionModel`).
    pub unet: UNet2DConditionModel,
    /// The UNet's config (`unet/config.json`, or the single file's).
    pub unet_config: UNet2DConditionModelConfig,
    /// The folder's AutoencoderKL, or the autoencoder `replace_vae` put in its place.
    pub vae: Autoencoder,
    /// The scheduler, resolved from `scheduler/` or the name given at load.
    pub scheduler: ResolvedScheduler,
    /// Where the pipeline was loaded from: the diffusers folder or the single checkpoint file.
    pub model_dir: PathBuf,
    /// The device the models run on.
    pub device: Device,
    /// The type the weights are kept in (f16 requested on the CPU is kept as bf16 or f32,
    /// the faster there: [`ops::weight_dtype`]); activations are in [`Self::activation_dtype`].
    pub dtype: DType,
    /// The LoRAs fused into the weights (`load_with_loras`), in the order given.
    pub loras: Vec<AppliedLora>,
    /// Live previews: after each denoising step, the current x₀ prediction decoded.
    pub preview: Option<StepPreview>,
    /// The pipeline class the folder's `model_index.json` names (StableDiffusionPipeline when
    /// it names none; for a single file, what its UNet makes it): a
    /// LatentConsistencyModelPipeline runs image-to-image as
    /// LatentConsistencyModelImg2ImgPipeline does.
    pub pipeline_class: String,
    /// A flag another thread may set to stop a run: checked before each denoising step and
    /// before decoding, so a run ends with [`Error::Interrupted`] within one step.
    pub interrupt: Option<Arc<AtomicBool>>,
}

/// What the sampling loop does for a live preview after each step: the x₀ the model predicts
/// at that step (from its output, as the scheduler's noising `add_noise` relates sample, x₀ and
/// noise at that timestep), decoded by `vae` (a TAESD is cheap enough to run every step; `None`
/// is the pipeline's own VAE), handed to `sink` with the step number as images `[N, 3, H, W]`
/// in about [-1, 1].
pub struct StepPreview {
    /// The autoencoder that decodes the previews (a TAESD, say); `None` uses the pipeline's VAE.
    pub vae: Option<Autoencoder>,
    /// Called after each step with the step number and the decoded preview.
    pub sink: PreviewSink,
}

/// Where previews go: called with the step number (from 1) and the decoded images.
pub type PreviewSink = Box<dyn FnMut(usize, &Tensor) -> Result<()>>;

/// One text-to-image request, with diffusers' defaults where it has them.
#[derive(Clone, Debug)]
pub struct TextToImageOptions {
    /// The prompt (diffusers' `prompt`).
    pub prompt: String,
    /// What to steer away from (diffusers' `negative_prompt`); `None` is the empty prompt (zeros
    /// for SDXL with `force_zeros_for_empty_prompt`).
    pub negative_prompt: Option<String>,
    /// Denoising steps (diffusers' `num_inference_steps`, default 50).
    pub num_inference_steps: usize,
    /// Classifier-free guidance scale (diffusers' `guidance_scale`, default 7.5); guidance is used
    /// when it is above 1 (and the UNet is not guidance-distilled).
    pub guidance_scale: f64,
    /// diffusers' `guidance_rescale` (Lin et al. 2023, section 3.4), in [0, 1]: 0 (default) is
    /// plain guidance.
    pub guidance_rescale: f64,
    /// Images per prompt (diffusers' `num_images_per_prompt`).
    pub num_images_per_prompt: usize,
    /// Output height in pixels, a multiple of 8 (default: the UNet's `sample_size` × the VAE scale
    /// factor).
    pub height: Option<usize>,
    /// Output width in pixels, a multiple of 8 (default: as for `height`).
    pub width: Option<usize>,
    /// DDIM's eta and TCD's gamma. diffusers' pipelines pass theirs (default 0) to TCD as
    /// well; `Scheduler::default_eta` is TCD's own default (0.3), which the CLI uses.
    pub eta: f64,
    /// diffusers' `clip_skip`: the number of final CLIP layers skipped (1 = the penultimate layer's
    /// output); `None` skips none.
    pub clip_skip: Option<usize>,
    /// How the prompts are read: diffusers' (truncated to 77 tokens) or AUTOMATIC1111's.
    pub prompt_syntax: PromptSyntax,
    /// SDXL: the prompts for the second text encoder (default: `prompt`, `negative_prompt`).
    pub prompt_2: Option<String>,
    /// SDXL: the negative prompt for the second text encoder (diffusers' `negative_prompt_2`).
    pub negative_prompt_2: Option<String>,
    /// SDXL's micro-conditioning, each (height, width) or (top, left): the size the training
    /// image had (default: the output size), where it was cropped, the size aimed at (default:
    /// the output size), and their negative counterparts.
    pub original_size: Option<(usize, usize)>,
    /// SDXL's `crops_coords_top_left`, (top, left) in pixels (default (0, 0)).
    pub crops_coords_top_left: (usize, usize),
    /// SDXL's `target_size`, (height, width) in pixels (default: the output size).
    pub target_size: Option<(usize, usize)>,
    /// SDXL's `negative_original_size`, (height, width) in pixels.
    pub negative_original_size: Option<(usize, usize)>,
    /// SDXL's `negative_crops_coords_top_left`, (top, left) in pixels (default (0, 0)).
    pub negative_crops_coords_top_left: (usize, usize),
    /// SDXL's `negative_target_size`, (height, width) in pixels.
    pub negative_target_size: Option<(usize, usize)>,
    /// The SDXL refiner's aesthetic conditioning (`requires_aesthetics_score`): 6.0 and 2.5.
    pub aesthetic_score: f64,
    /// The SDXL refiner's `negative_aesthetic_score` (default 2.5); `aesthetic_score` is the
    /// positive one.
    pub negative_aesthetic_score: f64,
    /// Stop after this fraction of the schedule, in (0, 1) (the SDXL base of a base + refiner
    /// ensemble, whose latents the refiner then takes with `denoising_start`).
    pub denoising_end: Option<f64>,
    /// Image-to-image: start at this fraction of the schedule instead of where `strength`
    /// says, and add no noise to the init latents (the refiner of an ensemble).
    pub denoising_start: Option<f64>,
}

impl Default for TextToImageOptions {
    fn default() -> Self {
        TextToImageOptions {
            prompt: String::new(),
            negative_prompt: None,
            num_inference_steps: 50,
            guidance_scale: 7.5,
            guidance_rescale: 0.0,
            num_images_per_prompt: 1,
            height: None,
            width: None,
            eta: 0.0,
            clip_skip: None,
            prompt_syntax: PromptSyntax::Diffusers,
            prompt_2: None,
            negative_prompt_2: None,
            original_size: None,
            crops_coords_top_left: (0, 0),
            target_size: None,
            negative_original_size: None,
            negative_crops_coords_top_left: (0, 0),
            negative_target_size: None,
            aesthetic_score: 6.0,
            negative_aesthetic_score: 2.5,
            denoising_end: None,
            denoising_start: None,
        }
    }
}

/// A prompt's conditioning: the text encoder's hidden states `[N, T, cross_attention_dim]`
/// and, for SDXL, the pooled projected embedding `[N, projection_dim]`; with guidance, the
/// negative rows first (`[negative; positive]`).
#[derive(Clone, Debug)]
pub struct PromptEmbeddings {
    /// The text encoder's hidden states `[N, T, cross_attention_dim]` (diffusers' `prompt_embeds`).
    pub hidden: Tensor,
    /// SDXL: the pooled projected embedding `[N, projection_dim]` (diffusers'
    /// `pooled_prompt_embeds`).
    pub pooled: Option<Tensor>,
}

/// Which of diffusers' SDXL pipelines the time ids follow: text-to-image's negative ids are the
/// positive ones unless both negative sizes are given; image-to-image's and inpainting's
/// default each negative size to the positive one (and, with `requires_aesthetics_score`, end
/// with the aesthetic scores).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeIdsFor {
    /// StableDiffusionXLPipeline's.
    TextToImage,
    /// StableDiffusionXLImg2ImgPipeline's and StableDiffusionXLInpaintPipeline's.
    Image,
}

/// Time spent in each phase of one generation, for the CLI's summary line.
#[derive(Clone, Debug, Default)]
pub struct PhaseTimes {
    /// Seconds encoding the prompts.
    pub text_encoding: f64,
    /// Seconds in the denoising loop.
    pub denoising: f64,
    /// Seconds decoding the latents with the VAE.
    pub decoding: f64,
}

/// Where a sampling loop starts and what it visits: the initial latents, the timesteps (all of
/// the scheduler's, or the tail that image-to-image's strength leaves), the prompt
/// embeddings, and extra UNet input channels (9-channel inpainting: mask and masked-image
/// latents, already doubled for guidance).
pub struct DenoiseLoop<'a> {
    /// The initial latents `[N, C, h, w]` (h, w: the image size over the VAE scale factor).
    pub latents: Tensor,
    /// The timesteps to visit, in order.
    pub timesteps: Vec<f64>,
    /// The prompt embeddings the UNet is conditioned on.
    pub embeddings: &'a PromptEmbeddings,
    /// Extra UNet input channels, concatenated after the latents (9-channel inpainting: mask and
    /// masked-image latents, `[N, 5, h, w]`, doubled to `2N` rows with guidance), or `None`.
    pub extra_channels: Option<Tensor>,
    /// Which pipeline's SDXL time ids the loop conditions on (ignored for other UNets).
    pub time_ids_for: TimeIdsFor,
}

/// Whether a folder looks like a Stable Diffusion pipeline rather than a pixel-space one.
pub fn is_stable_diffusion_folder(model_dir: &Path) -> bool {
    model_dir.join("text_encoder").is_dir() || model_dir.join("vae").is_dir()
}

/// The pipeline class a folder's `model_index.json` names (`StableDiffusionPipeline`,
/// `LatentConsistencyModelPipeline`, ...), if it has a readable one; for a single-file
/// checkpoint, the class its tensors make it (an LCM-distilled SD UNet:
/// LatentConsistencyModelPipeline; SDXL: StableDiffusionXLPipeline, the refiner
/// StableDiffusionXLImg2ImgPipeline).
pub fn pipeline_class_name(model_dir: &Path) -> Option<String> {
    if model_dir.is_file() {
        return Some(single_file_pipeline_class(&SingleFile::open(model_dir).ok()?).to_string());
    }
    let index = read_json_object(&model_dir.join("model_index.json")).ok()?;
    index.get("_class_name")?.as_str().map(str::to_string)
}

/// Whether a single file's UNet is LCM-distilled (it has `time_embedding.cond_proj`).
fn is_lcm_single_file(file: &SingleFile) -> bool {
    file.config(Component::Unet).get("time_cond_proj_dim").is_some_and(|v| !v.is_null())
}

/// The pipeline class a single file runs as: its family's, but LatentConsistencyModelPipeline
/// for an LCM-distilled SD 1.x/2.x UNet (an LCM SDXL UNet stays in the SDXL pipeline, with the
/// LCM scheduler).
fn single_file_pipeline_class(file: &SingleFile) -> &'static str {
    match file.family() {
        Family::StableDiffusion1 | Family::StableDiffusion2 if is_lcm_single_file(file) => {
            "LatentConsistencyModelPipeline"
        }
        family => family.pipeline_class(),
    }
}

/// The scheduler a single file's pipeline samples with: `scheduler_name` (or, by default, the
/// family's own; LCMScheduler for an LCM-distilled UNet, as a LatentConsistencyModelPipeline
/// folder's config says, since the file has none of its own), configured from the family's
/// scheduler config with `prediction_type` and the overrides.
pub fn single_file_scheduler(
    file: &SingleFile,
    prediction_type: Option<&str>,
    scheduler_name: Option<&str>,
    overrides: &[(String, Value)],
) -> Result<ResolvedScheduler> {
    let name = scheduler_name.or(is_lcm_single_file(file).then_some("lcm"));
    scheduler_from_config(file.scheduler_config(prediction_type)?, &file.path().join("scheduler"), name, overrides)
}

/// LatentConsistencyModelPipeline's `__call__` defaults: (num_inference_steps, guidance_scale).
pub const LCM_PIPELINE_DEFAULTS: (usize, f64) = (4, 8.5);

/// The SDXL pipelines' `__call__` defaults: (num_inference_steps, guidance_scale).
pub const SDXL_PIPELINE_DEFAULTS: (usize, f64) = (50, 5.0);

/// Whether a pipeline class is one of diffusers' SDXL pipelines.
pub fn is_xl_pipeline_class(class: &str) -> bool {
    class.starts_with("StableDiffusionXL")
}

fn load_component_config<T: serde::de::DeserializeOwned>(dir: &Path) -> Result<T> {
    let path = dir.join("config.json");
    parse_config(&read_json_object(&path)?, &path)
}

/// What a pipeline is built from, wherever it comes from (a diffusers folder, a single file):
/// each model's config, its weights, and the file that errors about those weights name.
pub struct Components {
    /// The first text encoder's tokenizer.
    pub tokenizer: ClipTokenizer,
    /// The first text encoder: config, weights, and the file errors about them name.
    pub text_encoder: (ClipTextConfig, VarBuilder<'static>, PathBuf),
    /// SDXL base's second text encoder, with its tokenizer.
    pub text_encoder_2: Option<(ClipTokenizer, (ClipTextConfig, VarBuilder<'static>, PathBuf))>,
    /// The UNet: config, weights, and the file errors about them name.
    pub unet: (UNet2DConditionModelConfig, VarBuilder<'static>, PathBuf),
    /// The autoencoder: config, weights, and the file errors about them name.
    pub vae: (AutoencoderConfig, VarBuilder<'static>, PathBuf),
    /// The scheduler the pipeline samples with.
    pub scheduler: ResolvedScheduler,
}

impl Components {
    /// The components with `loras` fused into the text encoder's and the UNet's weights as the
    /// models read them (lora/fuse.rs); call [`LoraSet::finish`] once the models are built.
    pub fn with_loras(mut self, loras: &LoraSet) -> Result<Self> {
        let layers_per_block = match &self.unet.0.layers_per_block {
            PerBlock::One(n) => Some(*n),
            PerBlock::List(list) => list.first().copied().filter(|first| list.iter().all(|n| n == first)),
        };
        // An SDXL refiner's only text encoder is diffusers' `text_encoder_2`.
        let xl = self.unet.0.takes_text_time();
        let first = if xl && self.text_encoder_2.is_none() { Target::TextEncoder2 } else { Target::TextEncoder };
        self.unet.1 = loras.fuse_into(Target::Unet, self.unet.1, layers_per_block)?;
        self.text_encoder.1 = loras.fuse_into(first, self.text_encoder.1, None)?;
        if let Some((_, (_, weights, _))) = self.text_encoder_2.as_mut() {
            *weights = loras.fuse_into(Target::TextEncoder2, weights.clone(), None)?;
        }
        Ok(self)
    }
}

impl StableDiffusionPipeline {
    /// Loads a StableDiffusionPipeline folder (`model_index.json`, `tokenizer/`,
    /// `text_encoder/`, `unet/`, `vae/`, `scheduler/`); components text-to-image does not
    /// need (safety_checker, feature_extractor, image_encoder) are never opened.
    pub fn load(
        model_dir: &Path,
        scheduler_name: Option<&str>,
        scheduler_overrides: &[(String, Value)],
        variant: Option<&str>,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        Self::load_with_loras(model_dir, scheduler_name, scheduler_overrides, variant, &[], device, dtype)
    }

    /// [`Self::load`] with LoRAs fused into the UNet and the text encoder (every LoRA file is
    /// read and checked before any model is built; `pipeline.loras` says what was applied).
    pub fn load_with_loras(
        model_dir: &Path,
        scheduler_name: Option<&str>,
        scheduler_overrides: &[(String, Value)],
        variant: Option<&str>,
        loras: &[LoraSpec],
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let dtype = ops::weight_dtype(dtype, device);
        let loras = LoraSet::open(loras)?;
        // An SDXL refiner has only the second text encoder; it is then the first one here.
        let has = |component: &str| model_dir.join(component).is_dir();
        let second_only = !has("text_encoder") && has("text_encoder_2");
        let (first_tokenizer, first_encoder) =
            if second_only { ("tokenizer_2", "text_encoder_2") } else { ("tokenizer", "text_encoder") };
        for component in [first_tokenizer, first_encoder, "unet", "vae", "scheduler"] {
            if !has(component) {
                return Err(Error::invalid(format!(
                    "{}: not a Stable Diffusion pipeline folder: the `{component}/` component is missing",
                    model_dir.display()
                )));
            }
        }
        if !second_only && has("text_encoder_2") != has("tokenizer_2") {
            let missing = if has("text_encoder_2") { "tokenizer_2" } else { "text_encoder_2" };
            return Err(Error::invalid(format!(
                "{}: an SDXL pipeline folder needs both `text_encoder_2/` and `tokenizer_2/`; `{missing}/` is missing",
                model_dir.display()
            )));
        }
        // Each model: its folder's config.json and weight files (the first one named in errors).
        let model = |folder: &str, stem: &str| {
            let dir = model_dir.join(folder);
            let files = find_weight_files(&dir, stem, variant)?;
            Ok::<_, Error>((dir, files[0].clone(), var_builder(&files, dtype, device)?))
        };
        let (te_dir, te_file, te_weights) = model(first_encoder, "model")?;
        let (unet_dir, unet_file, unet_weights) = model("unet", "diffusion_pytorch_model")?;
        let (vae_dir, vae_file, vae_weights) = model("vae", "diffusion_pytorch_model")?;
        let vae_config = vae_dir.join("config.json");
        let text_encoder_2 = match !second_only && has("text_encoder_2") {
            true => {
                let (dir, file, weights) = model("text_encoder_2", "model")?;
                let tokenizer = ClipTokenizer::from_folder(model_dir.join("tokenizer_2"))?;
                Some((tokenizer, (load_component_config(&dir)?, weights, file)))
            }
            false => None,
        };
        let components = Components {
            tokenizer: ClipTokenizer::from_folder(model_dir.join(first_tokenizer))?,
            text_encoder: (load_component_config(&te_dir)?, te_weights, te_file),
            text_encoder_2,
            unet: (load_component_config(&unet_dir)?, unet_weights, unet_file),
            // An AutoencoderKL, or whichever autoencoder the config names (a folder may ship TAESD).
            vae: (AutoencoderConfig::from_json(&read_json_object(&vae_config)?, &vae_config)?, vae_weights, vae_file),
            scheduler: resolve_scheduler(&model_dir.join("scheduler"), scheduler_name, scheduler_overrides)?,
        };
        let mut pipeline = Self::from_components(components.with_loras(&loras)?, model_dir, device, dtype)?;
        pipeline.loras = loras.finish()?;
        if let Some(class) = pipeline_class_name(model_dir) {
            pipeline.pipeline_class = class;
        }
        pipeline.apply_model_index(model_dir);
        Ok(pipeline)
    }

    /// Loads a single-file SD 1.x / 2.x checkpoint (`.safetensors`, original LDM key names), as
    /// diffusers' `StableDiffusionPipeline.from_single_file` does: the configs worked out from
    /// the tensors (loading/single_file.rs), the family's tokenizer and scheduler built in.
    /// `prediction_type` is the one thing the weights cannot show (`v_prediction` for SD 2.x
    /// 768-px models); `None` takes diffusers' default for the family.
    pub fn load_single_file(
        path: &Path,
        prediction_type: Option<&str>,
        scheduler_name: Option<&str>,
        scheduler_overrides: &[(String, Value)],
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        Self::load_single_file_with_loras(path, prediction_type, scheduler_name, scheduler_overrides, &[], device, dtype)
    }

    /// [`Self::load_single_file`] with LoRAs, as [`Self::load_with_loras`].
    pub fn load_single_file_with_loras(
        path: &Path,
        prediction_type: Option<&str>,
        scheduler_name: Option<&str>,
        scheduler_overrides: &[(String, Value)],
        loras: &[LoraSpec],
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let file = SingleFile::open(path)?;
        Self::from_single_file(file, prediction_type, scheduler_name, scheduler_overrides, loras, device, dtype)
    }

    /// The pipeline of an opened single file (its configs the family's, or a folder's:
    /// [`SingleFile::with_folder_configs`]), with the family's built-in tokenizers (CLIP-L's
    /// padding with `<|endoftext|>`, OpenCLIP's with `!`) and its diffusers pipeline class; for
    /// SDXL, `force_zeros_for_empty_prompt` and `requires_aesthetics_score` as the family's hub
    /// model_index.json (or the config folder's) registers them, which `from_single_file` reads.
    pub fn from_single_file(
        file: SingleFile,
        prediction_type: Option<&str>,
        scheduler_name: Option<&str>,
        scheduler_overrides: &[(String, Value)],
        loras: &[LoraSpec],
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let dtype = ops::weight_dtype(dtype, device);
        let loras = LoraSet::open(loras)?;
        let path = file.path().to_path_buf();
        let path = path.as_path();
        let family = file.family();
        // Each model: its derived config (errors name it as the file's `unet`, ...), and its weights.
        fn model<C: serde::de::DeserializeOwned>(
            file: &SingleFile,
            component: Component,
            dtype: DType,
            device: &Device,
        ) -> Result<(C, VarBuilder<'static>, PathBuf)> {
            let folder = file.recognised().folder(component);
            let origin = match &file.recognised().config_folder {
                Some(config_folder) => config_folder.join(folder).join("config.json"),
                None => file.path().join(folder),
            };
            let config = parse_config(file.config(component), &origin)?;
            Ok((config, file.var_builder(component, dtype, device), file.path().to_path_buf()))
        }
        let class = single_file_pipeline_class(&file);
        let text_encoder_2 = match file.recognised().has(Component::TextEncoder2) {
            // OpenCLIP bigG: the SD 2.x tokenizer (padding with `!`), as SDXL's tokenizer_2.
            true => Some((
                builtin_clip_tokenizer(Family::StableDiffusion2)?,
                model(&file, Component::TextEncoder2, dtype, device)?,
            )),
            false => None,
        };
        let components = Components {
            tokenizer: builtin_clip_tokenizer(family)?,
            text_encoder: model(&file, Component::TextEncoder, dtype, device)?,
            text_encoder_2,
            unet: model(&file, Component::Unet, dtype, device)?,
            vae: {
                let (config, weights, file) = model::<AutoencoderKLConfig>(&file, Component::Vae, dtype, device)?;
                (AutoencoderConfig::Kl(config), weights, file)
            },
            scheduler: single_file_scheduler(&file, prediction_type, scheduler_name, scheduler_overrides)?,
        };
        // A config the models refuse can only be one whose shapes were read from the file and
        // whose other values are the family's (or the config folder's): say so, about the file.
        let configs = match &file.recognised().config_folder {
            Some(folder) => format!("its configs are those of {}", folder.display()),
            None => format!("its configs are those of {} but for what the tensor shapes show", family.model_name()),
        };
        let mut pipeline =
            Self::from_components(components.with_loras(&loras)?, path, device, dtype).map_err(|e| match e {
                Error::Config { message, .. } | Error::InvalidInput(message) => Error::weights(
                    path,
                    format!("the models worked out from this checkpoint cannot be built ({configs}): {message}"),
                ),
                other => other,
            })?;
        pipeline.loras = loras.finish()?;
        pipeline.pipeline_class = class.to_string();
        // The SDXL pipelines' registered config, as the family's hub model_index.json (or the
        // config folder's) has it: from_single_file reads it from the config repository.
        if family.is_xl() {
            let index =
                file.recognised().config_folder.as_ref().map(|f| f.join("model_index.json")).unwrap_or_default();
            let refiner = family == Family::StableDiffusionXLRefiner;
            pipeline.set_xl_flags(&index, (!refiner, refiner));
        }
        Ok(pipeline)
    }

    /// Sets `force_zeros_for_empty_prompt` and `requires_aesthetics_score` from a
    /// `model_index.json`, each `default` where it does not say.
    fn set_xl_flags(&mut self, model_index: &Path, default: (bool, bool)) {
        let index = read_json_object(model_index).unwrap_or_default();
        let flag = |key: &str, default: bool| index.get(key).and_then(Value::as_bool).unwrap_or(default);
        self.force_zeros_for_empty_prompt = flag("force_zeros_for_empty_prompt", default.0);
        self.requires_aesthetics_score = flag("requires_aesthetics_score", default.1);
    }

    /// Builds the models from their configs and weights and checks that they fit together;
    /// `origin` (the folder or the file) is kept as `model_dir`.
    pub fn from_components(components: Components, origin: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let Components { tokenizer, text_encoder, text_encoder_2, unet, vae, scheduler } = components;
        let (te_config, te_weights, te_file) = text_encoder;
        let text_encoder = ClipTextModel::new(te_weights, &te_config).map_err(|e| e.in_weights_file(&te_file))?;
        let text_encoder_2 = match text_encoder_2 {
            Some((tokenizer, (config, weights, file))) => {
                Some((tokenizer, ClipTextModel::new(weights, &config).map_err(|e| e.in_weights_file(&file))?))
            }
            None => None,
        };
        let (unet_config, unet_weights, unet_file) = unet;
        let unet = UNet2DConditionModel::new(unet_weights, &unet_config).map_err(|e| e.in_weights_file(&unet_file))?;
        let (vae_config, vae_weights, vae_file) = vae;
        let vae_weights = vae_weights.set_dtype(vae_config.runs_in(dtype));
        let vae = Autoencoder::new(vae_weights, &vae_config).map_err(|e| e.in_weights_file(&vae_file))?;

        // SDXL concatenates both encoders' hidden states.
        let text_width = te_config.hidden_size + text_encoder_2.as_ref().map_or(0, |(_, model)| model.config.hidden_size);
        if unet_config.cross_attention_dim != text_width {
            return Err(Error::invalid(format!(
                "{}: the UNet's cross_attention_dim ({}) does not match the text encoders' hidden_size ({text_width})",
                origin.display(),
                unet_config.cross_attention_dim,
            )));
        }
        let pooled_encoder = text_encoder_2.as_ref().map_or(&text_encoder, |(_, model)| model);
        if unet_config.takes_text_time() && !pooled_encoder.has_projection() {
            return Err(Error::invalid(format!(
                "{}: this SDXL UNet needs a pooled text embedding, but the (last) text encoder has no `text_projection` \
                 (it must be a CLIPTextModelWithProjection)",
                origin.display()
            )));
        }
        Ok(StableDiffusionPipeline {
            tokenizer,
            text_encoder,
            text_encoder_2,
            force_zeros_for_empty_prompt: false,
            requires_aesthetics_score: false,
            unet,
            unet_config,
            vae,
            scheduler,
            model_dir: origin.to_path_buf(),
            device: device.clone(),
            dtype,
            loras: Vec::new(),
            preview: None,
            pipeline_class: "StableDiffusionPipeline".to_string(),
            interrupt: None,
        })
    }

    /// Replaces the VAE with the autoencoder folder `vae_dir` (an AutoencoderKL such as an
    /// fp16-fixed one, or an AutoencoderTiny such as TAESD), as building the pipeline with
    /// `vae=` does. Its latents must be the UNet's input: an autoencoder with other latent
    /// channels is refused, naming both.
    pub fn replace_vae(&mut self, vae_dir: &Path, variant: Option<&str>) -> Result<()> {
        self.vae = self.load_vae(vae_dir, variant)?;
        Ok(())
    }

    /// An autoencoder folder loaded for this pipeline (as [`Self::replace_vae`] checks it), e.g.
    /// a TAESD to decode previews with.
    pub fn load_vae(&self, vae_dir: &Path, variant: Option<&str>) -> Result<Autoencoder> {
        let vae = Autoencoder::load(vae_dir, variant, self.dtype, &self.device)?;
        let (latent_channels, in_channels) = (vae.latent_channels(), self.unet_config.in_channels);
        // 9-channel inpainting UNets take latents, a mask and the masked image's latents.
        if in_channels != latent_channels && in_channels != 2 * latent_channels + 1 {
            return Err(Error::invalid(format!(
                "the {} in {} has {latent_channels} latent channels, but the UNet of {} takes {in_channels} input channels \
                 (it was trained on a VAE with {} latent channels)",
                vae.class_name(),
                vae_dir.display(),
                self.model_dir.display(),
                self.vae.latent_channels()
            )));
        }
        Ok(vae)
    }

    /// Takes an SDXL folder's registered pipeline settings from its `model_index.json`
    /// (`force_zeros_for_empty_prompt`, default true; `requires_aesthetics_score`, default
    /// false); other pipelines have none.
    pub fn apply_model_index(&mut self, model_dir: &Path) {
        if self.is_xl() {
            self.set_xl_flags(&model_dir.join("model_index.json"), (true, false));
        }
    }

    /// Whether this is an SDXL pipeline: its UNet takes the pooled text embedding and the
    /// size/crop time ids (`addition_embed_type = "text_time"`).
    pub fn is_xl(&self) -> bool {
        self.unet_config.takes_text_time()
    }

    /// Whether the UNet runs twice per step (unconditional and conditional, batched): guidance
    /// above 1, and a UNet that does not embed the guidance scale itself (LCM-distilled UNets,
    /// `time_cond_proj_dim`, run once per step), as diffusers' `do_classifier_free_guidance`.
    pub fn do_classifier_free_guidance(&self, options: &TextToImageOptions) -> bool {
        options.guidance_scale > 1.0 && self.unet_config.time_cond_proj_dim.is_none()
    }

    /// `enable_vae_tiling()`: the VAE encodes and decodes large images in overlapping tiles.
    pub fn enable_vae_tiling(&mut self) {
        self.vae.enable_tiling();
    }

    /// `enable_vae_slicing()`: the VAE decodes a batch one image at a time.
    pub fn enable_vae_slicing(&mut self) {
        self.vae.enable_slicing();
    }

    /// A rough size (in bytes, f32) of the VAE's largest pass over `images` images of
    /// `height`×`width`: three full-resolution activations of its widest full-resolution
    /// block, for the images one pass sees (one with slicing) at the size one pass sees (a
    /// tile's with tiling).
    pub fn vae_pass_bytes(&self, height: usize, width: usize, images: usize) -> f64 {
        let (pass_height, pass_width) = self.vae.pass_size(height, width);
        let images = if self.vae.slicing() { 1 } else { images };
        3.0 * 4.0 * images as f64 * self.vae.full_resolution_channels() as f64 * pass_height as f64 * pass_width as f64
    }

    /// The type the models' activations are in: f32 on the CPU whatever the weights are kept
    /// in (see [`ops::activation_dtype`]), else the weights' type.
    pub fn activation_dtype(&self) -> DType {
        ops::activation_dtype(self.dtype, &self.device)
    }

    /// 2^(number of VAE blocks - 1): 8 for every Stable Diffusion VAE.
    pub fn vae_scale_factor(&self) -> usize {
        self.vae.scale_factor()
    }

    /// The image size used when none is given: the UNet's sample_size × the VAE scale factor.
    pub fn default_size(&self) -> (usize, usize) {
        let (h, w) = self.unet_config.sample_size_hw();
        (h * self.vae_scale_factor(), w * self.vae_scale_factor())
    }

    /// Checks a request before any work is done: sizes that are multiples of 8 and not absurd
    /// for the memory, steps ≥ 1, finite numbers. Returns (height, width).
    pub fn validate(&self, options: &TextToImageOptions) -> Result<(usize, usize)> {
        let (default_h, default_w) = self.default_size();
        let height = options.height.unwrap_or(default_h);
        let width = options.width.unwrap_or(default_w);
        if height == 0 || width == 0 || height % 8 != 0 || width % 8 != 0 {
            return Err(Error::invalid(format!("width and height must be positive multiples of 8, got {width}x{height}")));
        }
        if options.num_images_per_prompt == 0 {
            return Err(Error::invalid("`num_images_per_prompt` must be at least 1"));
        }
        // Self-attention scores grow with the square of the latent pixel count: refuse sizes
        // whose largest score matrix alone could not fit in memory, before allocating anything.
        // (In floats: the caller's numbers must not overflow on the way to being refused.)
        let factor = self.vae_scale_factor();
        let latent_pixels = (height / factor) as f64 * (width / factor) as f64;
        let per_pass = options.num_images_per_prompt as f64 * if self.do_classifier_free_guidance(options) { 2.0 } else { 1.0 };
        let score_bytes = latent_pixels * latent_pixels * per_pass * 4.0;
        // The prompt embeddings are repeated per image too (the larger for small images).
        let text = &self.text_encoder.config;
        let embedding_bytes = per_pass * (text.max_position_embeddings * text.hidden_size) as f64 * 4.0;
        let vae_bytes = self.vae_pass_bytes(height, width, options.num_images_per_prompt);
        if width > 16384 || height > 16384 || score_bytes.max(embedding_bytes).max(vae_bytes) > 64.0 * (1u64 << 30) as f64 {
            return Err(Error::invalid(format!(
                "{width}x{height} with {per_pass} images per UNet pass is too large for this machine's memory"
            )));
        }
        if options.num_inference_steps == 0 {
            return Err(Error::invalid("`num_inference_steps` must be at least 1"));
        }
        let layers = self.text_encoder.config.num_hidden_layers;
        if let Some(skip) = options.clip_skip.filter(|&skip| skip >= layers) {
            return Err(Error::invalid(format!(
                "clip skip {skip} is too large for a text encoder with {layers} layers (at most {})",
                layers.saturating_sub(1)
            )));
        }
        if options.prompt_syntax == PromptSyntax::A1111 {
            for prompt in std::iter::once(&options.prompt).chain(&options.negative_prompt) {
                a1111::parse_prompt_attention(prompt)?;
            }
        }
        for (name, value) in
            [("guidance scale", options.guidance_scale), ("guidance rescale", options.guidance_rescale), ("eta", options.eta)]
        {
            if !value.is_finite() {
                return Err(Error::invalid(format!("{name} must be a finite number, got {value}")));
            }
        }
        self.scheduler.scheduler.check_eta(options.eta)?;
        for (name, fraction) in [("denoising end", options.denoising_end), ("denoising start", options.denoising_start)] {
            if let Some(fraction) = fraction.filter(|f| !(*f > 0.0 && *f < 1.0)) {
                return Err(Error::invalid(format!("the {name} must be between 0 and 1 (exclusive), got {fraction}")));
            }
        }
        if self.is_xl() {
            self.check_time_ids_width()?;
        }
        Ok((height, width))
    }

    /// SDXL: the pooled embedding and the time ids this pipeline makes must fill the UNet's
    /// `add_embedding` input (`projection_class_embeddings_input_dim`), as diffusers'
    /// `_get_add_time_ids` checks; a refiner's UNet takes 5 ids (the aesthetic score in place
    /// of the target size), a base's 6.
    fn check_time_ids_width(&self) -> Result<()> {
        let config = &self.unet_config;
        let encoder = self.text_encoder_2.as_ref().map_or(&self.text_encoder, |(_, model)| model);
        let (Some(time_dim), Some(expected), Some(projection_dim)) =
            (config.addition_time_embed_dim, config.projection_class_embeddings_input_dim, encoder.config.projection_dim)
        else {
            return Ok(());
        };
        let ids = if self.requires_aesthetics_score { 5 } else { 6 };
        let passed = projection_dim + ids * time_dim;
        if passed == expected {
            return Ok(());
        }
        let hint = match (expected.checked_sub(passed), passed.checked_sub(expected)) {
            (Some(more), _) if more == time_dim => " (the UNet takes one more id: set `requires_aesthetics_score` in model_index.json?)",
            (_, Some(fewer)) if fewer == time_dim => " (the UNet takes one id fewer: unset `requires_aesthetics_score`?)",
            _ => "",
        };
        Err(Error::invalid(format!(
            "{}: the UNet's projection_class_embeddings_input_dim is {expected}, but the text encoder's projection_dim \
             {projection_dim} + {ids} time ids × addition_time_embed_dim {time_dim} = {passed}{hint}",
            self.model_dir.display()
        )))
    }

    /// The text encoders and their tokenizers, in diffusers' order (SDXL base: CLIP-L, then
    /// OpenCLIP bigG).
    fn text_encoders(&self) -> Vec<(&ClipTokenizer, &ClipTextModel)> {
        let mut encoders = vec![(&self.tokenizer, &self.text_encoder)];
        encoders.extend(self.text_encoder_2.as_ref().map(|(tokenizer, model)| (tokenizer, model)));
        encoders
    }

    /// Encodes one prompt (`prompt_2` for the second SDXL encoder) to `[1, 77, hidden]`
    /// (A1111's syntax: `[1, 77 · chunks, hidden]`) and, for SDXL, the pooled projection; also
    /// says whether it was truncated. SD 1.x/2.x: the last layer (or clip skip's, through the
    /// final norm); SDXL: each encoder's `hidden_states[-(clip_skip + 2)]`, concatenated.
    fn encode_text(
        &self,
        prompt: &str,
        prompt_2: &str,
        clip_skip: Option<usize>,
        syntax: PromptSyntax,
    ) -> Result<(Tensor, Option<Tensor>, bool)> {
        if !self.is_xl() {
            if syntax == PromptSyntax::A1111 {
                return Ok((a1111::encode_prompt(&self.tokenizer, &self.text_encoder, prompt, clip_skip)?, None, false));
            }
            let encoding = self.tokenizer.encode(prompt)?;
            let ids = Tensor::from_vec(encoding.input_ids.clone(), (1, encoding.input_ids.len()), &self.device)?;
            return Ok((self.text_encoder.encode(&ids, clip_skip)?, None, encoding.was_truncated()));
        }
        // diffusers zips [prompt, prompt_2] with the encoders: a refiner's one encoder gets `prompt`.
        let encoders = self.text_encoders();
        if syntax == PromptSyntax::A1111 {
            if prompt != prompt_2 && encoders.len() > 1 {
                let (first, _) = a1111::encode_prompt_xl(&encoders[..1], prompt, clip_skip)?;
                let (second, pooled) = a1111::encode_prompt_xl(&encoders[1..], prompt_2, clip_skip)?;
                if first.dim(1)? != second.dim(1)? {
                    return Err(Error::invalid(format!(
                        "with AUTOMATIC1111 prompt syntax, the prompt and the second prompt must fill as many 75-token \
                         chunks ({} and {} tokens' worth)",
                        first.dim(1)?,
                        second.dim(1)?
                    )));
                }
                return Ok((Tensor::cat(&[first, second], 2)?, pooled, false));
            }
            let (hidden, pooled) = a1111::encode_prompt_xl(&encoders, prompt, clip_skip)?;
            return Ok((hidden, pooled, false));
        }
        let (mut hidden, mut pooled, mut truncated) = (Vec::new(), None, false);
        for ((tokenizer, text_encoder), text) in encoders.into_iter().zip([prompt, prompt_2]) {
            let encoding = tokenizer.encode(text)?;
            truncated |= encoding.was_truncated();
            let ids = Tensor::from_vec(encoding.input_ids.clone(), (1, encoding.input_ids.len()), &self.device)?;
            let (states, projected) = text_encoder.encode_penultimate(&ids, clip_skip)?;
            hidden.push(states);
            // The first encoder with a projection gives the pooled embedding, as in diffusers.
            pooled = pooled.or(projected);
        }
        Ok((Tensor::cat(&hidden, 2)?, pooled, truncated))
    }

    /// diffusers' `encode_prompt`: the prompt's embeddings (with clip skip) and, with guidance,
    /// the negative (or empty) prompt's (SD: the last layer; SDXL: the penultimate, or zeros when
    /// there is no negative prompt and the folder says `force_zeros_for_empty_prompt`), each
    /// repeated per image; stacked as `[negative; positive]` when guidance is on.
    pub fn encode_prompt(&self, options: &TextToImageOptions, warn: &mut dyn FnMut(String)) -> Result<PromptEmbeddings> {
        let syntax = options.prompt_syntax;
        // AUTOMATIC1111 cuts `<lora:...>` tags out of the prompt (the caller loads the LoRAs).
        let strip = |prompt: &str| match syntax {
            PromptSyntax::A1111 => extra_networks::parse_prompt(prompt).0,
            PromptSyntax::Diffusers => prompt.to_string(),
        };
        // Python's `prompt_2 or prompt`: an empty second prompt is no second prompt.
        let or_first = |second: &Option<String>, first: &str| second.as_deref().filter(|s| !s.is_empty()).map_or(first.to_string(), strip);
        let prompt = strip(&options.prompt);
        let prompt_2 = or_first(&options.prompt_2, &prompt);
        let (prompt_embeds, pooled, truncated) = self.encode_text(&prompt, &prompt_2, options.clip_skip, syntax)?;
        if truncated {
            warn(format!(
                "the prompt was truncated to CLIP's {} tokens, as diffusers does",
                self.tokenizer.model_max_length()
            ));
        }
        let n = options.num_images_per_prompt;
        let repeat = |hidden: Tensor, pooled: Option<Tensor>| -> Result<(Tensor, Option<Tensor>)> {
            Ok((hidden.repeat((n, 1, 1))?, pooled.map(|p| p.repeat((n, 1))).transpose()?))
        };
        if !self.do_classifier_free_guidance(options) {
            if options.negative_prompt.is_some() && self.unet_config.time_cond_proj_dim.is_some() {
                warn("the negative prompt is ignored: this LCM-distilled UNet embeds the guidance scale and runs without classifier-free guidance".to_string());
            }
            let (hidden, pooled) = repeat(prompt_embeds, pooled)?;
            return Ok(PromptEmbeddings { hidden, pooled });
        }
        let (negative_embeds, negative_pooled) = if self.is_xl() && options.negative_prompt.is_none() && self.force_zeros_for_empty_prompt {
            (prompt_embeds.zeros_like()?, pooled.as_ref().map(Tensor::zeros_like).transpose()?)
        } else {
            let negative = options.negative_prompt.as_deref().map(strip).unwrap_or_default();
            let negative_2 = or_first(&options.negative_prompt_2, &negative);
            let (embeds, pooled, truncated) = self.encode_text(&negative, &negative_2, None, syntax)?;
            if truncated {
                warn("the negative prompt was truncated to CLIP's token limit".to_string());
            }
            (embeds, pooled)
        };
        // A1111 prompts of different lengths: the shorter gets the empty prompt's chunks.
        let (prompt_embeds, negative_embeds) = a1111::pad_to_same_length(
            prompt_embeds,
            negative_embeds,
            || Ok(self.encode_text("", "", options.clip_skip, syntax)?.0),
            || Ok(self.encode_text("", "", None, syntax)?.0),
        )?;
        let (negative, negative_pooled) = repeat(negative_embeds, negative_pooled)?;
        let (positive, pooled) = repeat(prompt_embeds, pooled)?;
        let pooled = match (negative_pooled, pooled) {
            (Some(negative), Some(positive)) => Some(Tensor::cat(&[negative, positive], 0)?),
            _ => None,
        };
        Ok(PromptEmbeddings { hidden: Tensor::cat(&[negative, positive], 0)?, pooled })
    }

    /// SDXL's `added_cond_kwargs` for a loop over `batch` latents of an image `height`×`width`
    /// (`None` for other UNets): the pooled embeddings and the time ids, original size + crop
    /// top-left + target size (or + aesthetic score for a refiner), the negative ones first
    /// with guidance, as `kind`'s pipeline builds them.
    pub fn added_conditions(
        &self,
        options: &TextToImageOptions,
        embeddings: &PromptEmbeddings,
        (height, width): (usize, usize),
        batch: usize,
        kind: TimeIdsFor,
    ) -> Result<Option<AddedConditions>> {
        if !self.is_xl() {
            return Ok(None);
        }
        let Some(text_embeds) = embeddings.pooled.clone() else {
            return Err(Error::invalid("this SDXL UNet needs the pooled text embedding, and none was computed"));
        };
        let pair = |(a, b): (usize, usize)| [a as f32, b as f32];
        let original = options.original_size.unwrap_or((height, width));
        let target = options.target_size.unwrap_or((height, width));
        let crops = options.crops_coords_top_left;
        let ids = |original, crops, last: &[f32]| -> Vec<f32> { [&pair(original)[..], &pair(crops)[..], last].concat() };
        let (positive, negative) = match (kind, self.requires_aesthetics_score) {
            (TimeIdsFor::Image, true) => (
                ids(original, crops, &[options.aesthetic_score as f32]),
                ids(
                    options.negative_original_size.unwrap_or(original),
                    options.negative_crops_coords_top_left,
                    &[options.negative_aesthetic_score as f32],
                ),
            ),
            // (Image-to-image's negative ids take the positive crop: diffusers' own choice.)
            (TimeIdsFor::Image, false) => (
                ids(original, crops, &pair(target)),
                ids(
                    options.negative_original_size.unwrap_or(original),
                    crops,
                    &pair(options.negative_target_size.unwrap_or(target)),
                ),
            ),
            (TimeIdsFor::TextToImage, _) => {
                let positive = ids(original, crops, &pair(target));
                let negative = match (options.negative_original_size, options.negative_target_size) {
                    (Some(negative_original), Some(negative_target)) => {
                        ids(negative_original, options.negative_crops_coords_top_left, &pair(negative_target))
                    }
                    _ => positive.clone(),
                };
                (positive, negative)
            }
        };
        let row = |values: &[f32]| Tensor::from_vec(values.to_vec(), (1, values.len()), &self.device);
        let do_guidance = self.do_classifier_free_guidance(options);
        let time_ids = match (do_guidance, kind) {
            (false, _) => row(&positive)?.repeat((batch, 1))?,
            // Text-to-image concatenates [negative, positive] and then repeats the pair per
            // image, so with several images the rows alternate (unlike the embeddings): as diffusers.
            (true, TimeIdsFor::TextToImage) => Tensor::cat(&[row(&negative)?, row(&positive)?], 0)?.repeat((batch, 1))?,
            (true, TimeIdsFor::Image) => Tensor::cat(&[row(&negative)?.repeat((batch, 1))?, row(&positive)?.repeat((batch, 1))?], 0)?,
        };
        Ok(Some(AddedConditions { text_embeds, time_ids }))
    }

    /// Runs text-to-image; returns the final latents `[N, 4, H/8, W/8]`.
    pub fn denoise(
        &mut self,
        options: &TextToImageOptions,
        embeddings: &PromptEmbeddings,
        generator: &mut TorchGenerator,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<Tensor> {
        self.denoise_from(options, embeddings, None, generator, on_step)
    }

    /// Text-to-image from noise, or from given latents as diffusers' `latents=` argument
    /// (e.g. DDIM-inverted ones): either is scaled by the scheduler's `init_noise_sigma`.
    pub fn denoise_from(
        &mut self,
        options: &TextToImageOptions,
        embeddings: &PromptEmbeddings,
        initial_latents: Option<&Tensor>,
        generator: &mut TorchGenerator,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<Tensor> {
        let (height, width) = self.validate(options)?;
        self.check_text_to_image_unet()?;
        let factor = self.vae_scale_factor();
        let scheduler = &mut self.scheduler.scheduler;
        scheduler.set_timesteps(options.num_inference_steps)?;
        let shape = [options.num_images_per_prompt, self.unet_config.in_channels, height / factor, width / factor];
        let latents = match initial_latents {
            Some(latents) if latents.dims() != shape => {
                return Err(Error::invalid(format!("the initial latents have shape {:?}; this request needs {shape:?}", latents.dims())))
            }
            Some(latents) => latents.to_dtype(DType::F32)?,
            None => generator.randn_tensor(&shape, &self.device)?,
        };
        let latents = (latents * scheduler.init_noise_sigma())?;
        let mut timesteps = scheduler.timesteps().to_vec();
        if let Some(end) = options.denoising_end {
            let cutoff = self.timestep_cutoff(end)?;
            timesteps.retain(|&t| t >= cutoff);
        }
        let run = DenoiseLoop { latents, timesteps, embeddings, extra_channels: None, time_ids_for: TimeIdsFor::TextToImage };
        self.denoise_loop(run, options, &mut |_, latents, _| Ok(latents), generator, on_step)
    }

    /// diffusers' `discrete_timestep_cutoff` for `denoising_end` / `denoising_start` = `fraction`
    /// of the schedule: `int(round(T − fraction × T))` with T the training timesteps.
    pub fn timestep_cutoff(&self, fraction: f64) -> Result<f64> {
        if !(fraction > 0.0 && fraction < 1.0) {
            return Err(Error::invalid(format!("the denoising start or end must be between 0 and 1 (exclusive), got {fraction}")));
        }
        let train_steps = self.scheduler.config.get("num_train_timesteps").and_then(Value::as_f64).unwrap_or(1000.0);
        // Python's round() rounds halves to even.
        Ok((train_steps - fraction * train_steps).round_ties_even())
    }

    /// Text-to-image needs a UNet that takes the latents alone (an inpainting UNet also takes a
    /// mask and the masked image's latents), and a pipeline that starts from noise (an SDXL
    /// refiner refines an image).
    pub fn check_text_to_image_unet(&self) -> Result<()> {
        if self.requires_aesthetics_score || self.pipeline_class == "StableDiffusionXLImg2ImgPipeline" {
            return Err(Error::invalid(format!(
                "{} is an SDXL refiner ({}): it refines an image rather than making one from noise; give it an init \
                 image, or use it as the refiner of an SDXL base",
                self.model_dir.display(),
                self.pipeline_class
            )));
        }
        let (in_channels, latent_channels) = (self.unet_config.in_channels, self.vae.latent_channels());
        if in_channels != latent_channels {
            return Err(Error::invalid(format!(
                "this UNet takes {in_channels} input channels, not the VAE's {latent_channels} (an inpainting model): give an init image and a mask"
            )));
        }
        Ok(())
    }

    /// The guided sampling loop every Stable Diffusion pipeline shares: for each timestep,
    /// the (doubled, for guidance) latents scaled by the scheduler, any extra input channels
    /// appended, one UNet pass, guidance (and its rescale), one scheduler step, then
    /// `after_step(i, latents, scheduler)` (inpainting's blend; identity otherwise).
    pub fn denoise_loop(
        &mut self,
        run: DenoiseLoop,
        options: &TextToImageOptions,
        after_step: &mut dyn FnMut(usize, Tensor, &dyn Scheduler) -> Result<Tensor>,
        generator: &mut TorchGenerator,
        on_step: &mut dyn FnMut(usize, usize),
    ) -> Result<Tensor> {
        let DenoiseLoop { mut latents, timesteps, embeddings, extra_channels, time_ids_for } = run;
        let do_guidance = self.do_classifier_free_guidance(options);
        let activation_dtype = self.activation_dtype();
        let (batch, _, latent_height, latent_width) = latents.dims4()?;
        let factor = self.vae_scale_factor();
        let image_size = (latent_height * factor, latent_width * factor);
        let added = self.added_conditions(options, embeddings, image_size, batch, time_ids_for)?;
        let timestep_cond = match self.unet_config.time_cond_proj_dim {
            Some(dim) => Some(get_guidance_scale_embedding(options.guidance_scale - 1.0, batch, dim, &self.device)?),
            None => None,
        };
        let embeddings = embeddings.hidden.to_dtype(activation_dtype)?;
        for (i, &t) in timesteps.iter().enumerate() {
            self.check_interrupt()?;
            let scheduler = &mut self.scheduler.scheduler;
            let model_input = if do_guidance { Tensor::cat(&[&latents, &latents], 0)? } else { latents.clone() };
            let model_input = scheduler.scale_model_input(&model_input, t)?;
            let model_input = match &extra_channels {
                Some(extra) => Tensor::cat(&[&model_input, extra], 1)?,
                None => model_input,
            };
            let n = model_input.dim(0)?;
            let t_batch = Tensor::from_vec(vec![t as f32; n], n, &self.device)?;
            let noise_pred = self
                .unet
                .forward_with_added_conditions(
                    &model_input.to_dtype(activation_dtype)?,
                    &t_batch,
                    &embeddings,
                    timestep_cond.as_ref(),
                    added.as_ref(),
                )?
                .to_dtype(DType::F32)?;
            let noise_pred = if do_guidance {
                let uncond = noise_pred.narrow(0, 0, batch)?;
                let text = noise_pred.narrow(0, batch, batch)?;
                let guided = (&uncond + ((&text - &uncond)? * options.guidance_scale)?)?;
                if options.guidance_rescale > 0.0 {
                    rescale_noise_cfg(&guided, &text, options.guidance_rescale)?
                } else {
                    guided
                }
            } else {
                noise_pred
            };
            let predicted_original = match &self.preview {
                Some(_) => Some(predict_original(scheduler.as_ref(), &self.scheduler.config, &noise_pred, &latents, t)?),
                None => None,
            };
            latents = scheduler.step(&noise_pred, t, &latents, options.eta, generator)?;
            latents = after_step(i, latents, scheduler.as_ref())?;
            if let (Some(preview), Some(x0)) = (self.preview.as_mut(), predicted_original) {
                let vae = preview.vae.as_ref().unwrap_or(&self.vae);
                let images = decode_with(vae, &x0, vae.runs_in(activation_dtype))?;
                (preview.sink)(i + 1, &images)?;
            }
            on_step(i + 1, timesteps.len());
        }
        self.check_interrupt()?;
        Ok(latents)
    }

    /// `Err(Error::Interrupted)` when the [`Self::interrupt`] flag is set.
    pub fn check_interrupt(&self) -> Result<()> {
        match &self.interrupt {
            Some(flag) if flag.load(Ordering::Relaxed) => Err(Error::Interrupted),
            _ => Ok(()),
        }
    }

    /// The whole text-to-image run: images `[N, 3, H, W]` in about [-1, 1].
    pub fn generate(
        &mut self,
        options: &TextToImageOptions,
        generator: &mut TorchGenerator,
        on_step: &mut dyn FnMut(usize, usize),
        warn: &mut dyn FnMut(String),
        times: &mut PhaseTimes,
    ) -> Result<Tensor> {
        self.generate_from(options, None, generator, on_step, warn, times)
    }

    /// Text-to-image starting from given latents (see `denoise_from`) or from noise.
    pub fn generate_from(
        &mut self,
        options: &TextToImageOptions,
        initial_latents: Option<&Tensor>,
        generator: &mut TorchGenerator,
        on_step: &mut dyn FnMut(usize, usize),
        warn: &mut dyn FnMut(String),
        times: &mut PhaseTimes,
    ) -> Result<Tensor> {
        self.validate(options)?;
        let start = std::time::Instant::now();
        let embeddings = self.encode_prompt(options, warn)?;
        times.text_encoding = start.elapsed().as_secs_f64();
        let start = std::time::Instant::now();
        let latents = self.denoise_from(options, &embeddings, initial_latents, generator, on_step)?;
        times.denoising = start.elapsed().as_secs_f64();
        let start = std::time::Instant::now();
        let images = self.decode_latents(&latents)?;
        times.decoding = start.elapsed().as_secs_f64();
        Ok(images)
    }

    /// `vae.decode(latents / scaling_factor + shift_factor)`, as diffusers' pipelines do.
    pub fn decode_latents(&self, latents: &Tensor) -> Result<Tensor> {
        decode_with(&self.vae, latents, self.vae_dtype())
    }

    /// The type the VAE runs in: the activations' type, or f32 for a `force_upcast` VAE in an
    /// f16 pipeline.
    pub fn vae_dtype(&self) -> DType {
        self.vae.runs_in(self.activation_dtype())
    }
}

/// `vae.decode(latents / scaling_factor + shift_factor)` with activations in `dtype`, as f32
/// images.
fn decode_with(vae: &Autoencoder, latents: &Tensor, dtype: DType) -> Result<Tensor> {
    let mut z = (latents / vae.scaling_factor())?;
    if let Some(shift) = vae.shift_factor() {
        z = (z + shift)?;
    }
    Ok(vae.decode(&z.to_dtype(dtype)?)?.to_dtype(DType::F32)?)
}

/// The x₀ a model output predicts at timestep `t`, for any scheduler: its `add_noise` says how
/// the sample mixes x₀ and noise there (sample = a·x₀ + b·ε: a = √ᾱ, b = √(1-ᾱ) for the DDPM
/// family, a = 1, b = σ for the sigma schedulers), and the config's `prediction_type` what the
/// output is. A preview's estimate: the schedulers' own (clipped, boundary-scaled) x₀ can differ.
fn predict_original(
    scheduler: &dyn Scheduler,
    config: &serde_json::Map<String, Value>,
    model_output: &Tensor,
    sample: &Tensor,
    t: f64,
) -> Result<Tensor> {
    let one = Tensor::ones(1, DType::F32, sample.device())?;
    let zero = Tensor::zeros(1, DType::F32, sample.device())?;
    let a = scheduler.add_noise(&one, &zero, &[t])?.to_vec1::<f32>()?[0] as f64;
    let b = scheduler.add_noise(&zero, &one, &[t])?.to_vec1::<f32>()?[0] as f64;
    let prediction_type = config.get("prediction_type").and_then(Value::as_str).unwrap_or("epsilon");
    Ok(match PredictionType::parse(prediction_type)? {
        PredictionType::Epsilon => ((sample - (model_output * b)?)? / a)?,
        PredictionType::Sample => model_output.clone(),
        // In the variance-preserving scale x̂ = x / √(a² + b²): x₀ = a'·x̂ - b'·v.
        PredictionType::VPrediction => {
            let norm = (a * a + b * b).sqrt();
            ((sample * (a / (norm * norm)))? - (model_output * (b / norm))?)?
        }
    })
}

/// `get_guidance_scale_embedding` of the Stable Diffusion and LCM pipelines (VDM's sinusoidal
/// embedding): `w × 1000` for `batch` items, `[sin, cos]` over `embedding_dim / 2` frequencies
/// `exp(-ln(10000) · i / (half - 1))`, zero-padded to an odd width; in f32 as diffusers computes it.
pub fn get_guidance_scale_embedding(w: f64, batch: usize, embedding_dim: usize, device: &Device) -> Result<Tensor> {
    let half_dim = embedding_dim / 2;
    let w = w as f32 * 1000.0;
    let step = 10000f32.ln() / (half_dim as f32 - 1.0);
    let mut row: Vec<f32> = Vec::with_capacity(embedding_dim);
    let args: Vec<f32> = (0..half_dim).map(|i| w * (i as f32 * -step).exp()).collect();
    row.extend(args.iter().map(|a| a.sin()));
    row.extend(args.iter().map(|a| a.cos()));
    row.resize(embedding_dim, 0.0);
    Ok(Tensor::from_vec(row, (1, embedding_dim), device)?.repeat((batch, 1))?)
}

/// Guidance rescale (Lin et al. 2023, section 3.4), diffusers' `rescale_noise_cfg`: rescale the
/// guided prediction to the conditional prediction's standard deviation (per item, unbiased as
/// torch.std), then mix by `guidance_rescale`.
pub fn rescale_noise_cfg(noise_cfg: &Tensor, noise_pred_text: &Tensor, guidance_rescale: f64) -> Result<Tensor> {
    let std = |t: &Tensor| -> Result<Tensor> {
        let flat = t.flatten_from(1)?;
        let n = flat.dim(1)? as f64;
        let mean = flat.mean_keepdim(1)?;
        let var = (flat.broadcast_sub(&mean)?.sqr()?.sum_keepdim(1)? / (n - 1.0))?;
        let mut shape = vec![t.dim(0)?];
        shape.extend(std::iter::repeat(1).take(t.rank() - 1));
        Ok(var.sqrt()?.reshape(shape)?)
    };
    let ratio = (std(noise_pred_text)? / std(noise_cfg)?)?;
    let rescaled = noise_cfg.broadcast_mul(&ratio)?;
    Ok(((rescaled * guidance_rescale)? + (noise_cfg * (1.0 - guidance_rescale))?)?)
}
