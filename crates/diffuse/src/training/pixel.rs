//! The pixel-space model kind: a `UNet2DModel`, unconditional or class-conditional, trained
//! as a DDPM (as diffusers' examples/unconditional_image_generation/train_unconditional.py and
//! improved-diffusion's image_train.py do), and exported in diffusers' DDPMPipeline layout.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use super::data::Batch;
use super::export::{preset_or_file, require_key, stated, write_json, write_model_folder};
use super::objectives::{drop_labels, DiffusionObjective, LossKind, LossSecondMomentResampler, TimestepSampler};
use super::params::Parameters;
use super::{Image8, TrainingTask};
use crate::loading::config::parse_config;
use crate::models::unet_2d::{SampleSize, UNet2DModel, UNet2DModelConfig};
use crate::pipelines::pixel::{PixelOptions, PixelPipeline};
use crate::pipelines::{scheduler_from_config, to_uint8_images};
use crate::rng::TorchGenerator;
use crate::schedulers::betas::{alphas_cumprod, make_betas};
use crate::schedulers::ddpm::DdpmScheduler;
use crate::schedulers::PredictionType;
use crate::{bail, Error, Result};

pub use super::export::DIFFUSERS_VERSION;

/// Named UNet architectures for `--model-config` (diffusers config keys; the data sets the
/// channels and the sample size unless the config states them).
pub const PRESETS: &[(&str, &str, &str)] = &[
    (
        "tiny",
        "2 levels of 32 and 64 channels, attention at the lower one (≈0.7M parameters): tests and quick checks",
        r#"{"block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 8, "attention_head_dim": 8,
            "down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D", "UpBlock2D"]}"#,
    ),
    (
        "small",
        "3 levels of 64, 128, 128 channels, attention at the middle one (≈6.5M parameters): 28–32 px datasets such as Fashion-MNIST",
        r#"{"block_out_channels": [64, 128, 128], "layers_per_block": 2, "norm_num_groups": 32, "attention_head_dim": 32,
            "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]}"#,
    ),
    (
        "ddpm-cifar10",
        "the architecture of google/ddpm-cifar10-32 (Ho et al. 2020's CIFAR-10 model, 35.7M parameters)",
        r#"{"block_out_channels": [128, 256, 256, 256], "layers_per_block": 2, "norm_num_groups": 32, "norm_eps": 1e-6,
            "attention_head_dim": null, "downsample_padding": 0, "flip_sin_to_cos": false, "freq_shift": 1,
            "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]}"#,
    ),
];

/// The training noise schedule, as `DDPMScheduler`'s config keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NoiseSchedule {
    /// Timesteps of the schedule. Default: 1000.
    pub num_train_timesteps: usize,
    /// `linear`, `scaled_linear` or `squaredcos_cap_v2`. Default: `linear`.
    pub beta_schedule: String,
    /// The first beta. Default: 0.0001.
    pub beta_start: f64,
    /// The last beta. Default: 0.02.
    pub beta_end: f64,
}

impl Default for NoiseSchedule {
    fn default() -> Self {
        Self { num_train_timesteps: 1000, beta_schedule: "linear".into(), beta_start: 0.0001, beta_end: 0.02 }
    }
}

impl NoiseSchedule {
    /// Stable Diffusion's: `scaled_linear` from 0.00085 to 0.012 over 1000 timesteps.
    pub fn stable_diffusion() -> Self {
        Self { num_train_timesteps: 1000, beta_schedule: "scaled_linear".into(), beta_start: 0.00085, beta_end: 0.012 }
    }
}

/// How training timesteps are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSampling {
    /// Every timestep equally often (diffusers' training scripts).
    Uniform,
    /// improved-diffusion's `loss-second-moment` sampler.
    LossAware,
}

impl TimestepSampling {
    /// Parses `uniform` or `loss-aware` (also `loss-second-moment`).
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "uniform" => Ok(Self::Uniform),
            "loss-aware" | "loss-second-moment" => Ok(Self::LossAware),
            other => bail!("timestep sampling `{other}` is not one of uniform, loss-aware"),
        }
    }
}

/// The sample grids written during training.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleSettings {
    /// Images per grid (unconditional), or per class row (class-conditional, at most 10 rows).
    pub count: usize,
    /// Inference steps per grid.
    pub steps: usize,
    /// A `diffuse schedulers` name.
    pub scheduler: String,
    /// Seeds the grids' noise, the same at every write.
    pub seed: u64,
}

impl Default for SampleSettings {
    fn default() -> Self {
        Self { count: 16, steps: 50, scheduler: "ddim".into(), seed: 0 }
    }
}

/// Everything the pixel-space kind needs besides the loop's settings.
#[derive(Debug, Clone)]
pub struct PixelTrainingConfig {
    /// The UNet's architecture.
    pub unet: UNet2DModelConfig,
    /// The training noise schedule.
    pub noise: NoiseSchedule,
    /// What the UNet predicts.
    pub prediction_type: PredictionType,
    /// The loss.
    pub loss: LossKind,
    /// How timesteps are drawn.
    pub timestep_sampling: TimestepSampling,
    /// Min-SNR weighting with this gamma; `None` weighs timesteps equally.
    pub snr_gamma: Option<f64>,
    /// Class-conditional training: the number of classes (labels 0..n).
    pub num_classes: Option<usize>,
    /// The probability of replacing a label by the null class `num_classes` (which the UNet
    /// then has an embedding for), for classifier-free guidance.
    pub class_dropout: f64,
    /// The sample grids.
    pub sampling: SampleSettings,
}

/// What the data says about the model's input, and what the command line asks for.
#[derive(Debug, Clone, Default)]
pub struct UNetRequest {
    /// The data's channels (1 gray, 3 colour) and size (height, width).
    pub data_channels: usize,
    /// The data's (height, width).
    pub data_size: (usize, usize),
    /// `--resolution`: a square sample size that overrides the data's.
    pub resolution: Option<usize>,
    /// Class-conditional with this many classes.
    pub num_classes: Option<usize>,
    /// The label-dropout probability, which adds a null class.
    pub class_dropout: f64,
    /// The hybrid loss: the UNet predicts a variance too.
    pub learned_variance: bool,
}

/// The UNet config for training: `model_config` is a preset name (see [`PRESETS`]) or a
/// diffusers `config.json`; the data and request fill in `in_channels`, `out_channels`,
/// `sample_size` and `num_class_embeds` where the config does not state them, and a stated
/// value that contradicts them is refused naming the key.
pub fn resolve_unet_config(model_config: &str, request: &UNetRequest) -> Result<UNet2DModelConfig> {
    let (mut map, origin) = preset_or_file(model_config, PRESETS, "`model_config`")?;
    let refuse = |key: &str, stated: &Value, wanted: &Value, why: &str| -> Error {
        Error::invalid(format!("{origin}: `{key}` is {stated}, but {why} needs {wanted}"))
    };

    let in_channels = match stated(&map, "in_channels") {
        Some(value) => value.as_u64().ok_or_else(|| Error::invalid(format!("{origin}: `in_channels` must be a number")))? as usize,
        None => request.data_channels,
    };
    map.insert("in_channels".into(), json!(in_channels));
    let out_channels = if request.learned_variance { 2 * in_channels } else { in_channels };
    let why = if request.learned_variance { "the hybrid loss (a variance channel per input channel)" } else { "the MSE loss" };
    require_key(&mut map, &origin, "out_channels", json!(out_channels), why)?;
    let sample_size = match (request.resolution, stated(&map, "sample_size")) {
        (Some(side), _) => json!(side),
        (None, Some(value)) => value,
        (None, None) if request.data_size.0 == request.data_size.1 => json!(request.data_size.0),
        (None, None) => json!([request.data_size.0, request.data_size.1]),
    };
    map.insert("sample_size".into(), sample_size);
    let num_class_embeds = request.num_classes.map(|n| n + usize::from(request.class_dropout > 0.0));
    match (stated(&map, "num_class_embeds"), num_class_embeds) {
        (Some(value), Some(wanted)) if value != json!(wanted) => {
            return Err(refuse("num_class_embeds", &value, &json!(wanted), "class-conditional training on this data (its classes, plus a null class with `class_dropout`)"));
        }
        (Some(value), None) => {
            bail!("{origin}: `num_class_embeds` is {value}: the model is class-conditional; set `num_classes` (and use data with labels)")
        }
        (_, wanted) => {
            map.insert("num_class_embeds".into(), json!(wanted));
        }
    }
    let config: UNet2DModelConfig = parse_config(&map, Path::new(&origin))?;
    check_trainable(&config).map_err(|e| Error::invalid(format!("{origin}: {e}")))?;
    Ok(config)
}

/// Refuses configs the training path does not support or whose sizes cannot work.
fn check_trainable(config: &UNet2DModelConfig) -> Result<()> {
    if config.time_embedding_type != "positional" {
        bail!("`time_embedding_type` {} is not trainable here (DDPM training uses positional timestep embeddings)", config.time_embedding_type);
    }
    if config.dropout != 0.0 {
        bail!("`dropout` {} is not supported in training (the model code has no dropout layers); use 0", config.dropout);
    }
    if config.class_embed_type.is_some() {
        bail!("`class_embed_type` is not supported in training; class labels use `num_class_embeds`");
    }
    let Some(size) = config.sample_size else { bail!("`sample_size` is missing") };
    let (height, width) = size.height_width();
    let factor = 1usize << config.down_block_types.len().saturating_sub(1);
    if height == 0 || width == 0 || !height.is_multiple_of(factor) || !width.is_multiple_of(factor) {
        bail!(
            "`sample_size` {height}×{width} must be a multiple of {factor} for {} resolution levels (pad the data to such a size with `ImageFit::Pad`)",
            config.down_block_types.len()
        );
    }
    Ok(())
}

/// The exported `DDPMScheduler` config: the training noise schedule, the prediction type, and
/// the variance the model learns (`learned_range` for the hybrid loss).
pub fn ddpm_scheduler_config(noise: &NoiseSchedule, prediction_type: PredictionType, learned_variance: bool) -> Map<String, Value> {
    let prediction_type = prediction_type.name();
    let Value::Object(map) = json!({
        "_class_name": "DDPMScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": noise.num_train_timesteps,
        "beta_start": noise.beta_start,
        "beta_end": noise.beta_end,
        "beta_schedule": noise.beta_schedule,
        "trained_betas": null,
        "variance_type": if learned_variance { "learned_range" } else { "fixed_small" },
        "clip_sample": true,
        "clip_sample_range": 1.0,
        "prediction_type": prediction_type,
        "thresholding": false,
        "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0,
        "timestep_spacing": "leading",
        "steps_offset": 0,
        "rescale_betas_zero_snr": false,
    }) else {
        unreachable!("a JSON object literal")
    };
    map
}

/// The objective a kind trains with: the noise schedule's betas and alpha_bar, the loss, and
/// the timestep sampler.
pub fn training_objective(
    noise: &NoiseSchedule,
    prediction_type: PredictionType,
    loss: LossKind,
    snr_gamma: Option<f64>,
    timestep_sampling: TimestepSampling,
) -> Result<DiffusionObjective> {
    let betas = make_betas(&noise.beta_schedule, noise.beta_start, noise.beta_end, noise.num_train_timesteps, None, &["sigmoid", "laplace"])?;
    let timestep_sampler = match timestep_sampling {
        TimestepSampling::Uniform => TimestepSampler::Uniform { num_timesteps: noise.num_train_timesteps },
        TimestepSampling::LossAware => TimestepSampler::LossSecondMoment(LossSecondMomentResampler::new(noise.num_train_timesteps, 10, 0.001)),
    };
    DiffusionObjective::new(prediction_type, loss, snr_gamma, &betas, alphas_cumprod(&betas, false), timestep_sampler)
}

/// The loss-aware timestep sampler's history, for checkpoints (nothing for uniform sampling).
pub fn sampler_state(objective: &DiffusionObjective) -> Result<(Value, HashMap<String, Tensor>)> {
    match &objective.timestep_sampler {
        TimestepSampler::LossSecondMoment(resampler) => {
            let history = Tensor::from_slice(&resampler.loss_history, (resampler.num_timesteps, resampler.history_per_term), &Device::Cpu)?;
            Ok((json!({ "loss_counts": resampler.loss_counts }), HashMap::from([("loss_history".to_string(), history)])))
        }
        TimestepSampler::Uniform { .. } => Ok((Value::Null, HashMap::new())),
    }
}

/// Restores what [`sampler_state`] saved.
pub fn load_sampler_state(objective: &mut DiffusionObjective, state: &Value, tensors: &HashMap<String, Tensor>) -> Result<()> {
    if let TimestepSampler::LossSecondMoment(resampler) = &mut objective.timestep_sampler {
        let counts: Vec<usize> = serde_json::from_value(state.get("loss_counts").cloned().unwrap_or(Value::Null))
            .map_err(|e| Error::invalid(format!("checkpoint: loss-aware sampler counts: {e}")))?;
        let Some(history) = tensors.get("loss_history") else {
            bail!("checkpoint: the loss-aware sampler's history is missing");
        };
        let history = history.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
        if counts.len() != resampler.num_timesteps || history.len() != resampler.loss_history.len() {
            bail!("checkpoint: the loss-aware sampler's state does not match {} timesteps", resampler.num_timesteps);
        }
        resampler.loss_counts = counts;
        resampler.loss_history = history;
    }
    Ok(())
}

/// A UNet2DModel being trained.
pub struct PixelTask {
    config: PixelTrainingConfig,
    parameters: Parameters,
    unet: UNet2DModel,
    objective: DiffusionObjective,
    scheduler_config: Map<String, Value>,
    device: Device,
    /// Keeps the variables alive (the model holds them too).
    _varmap: VarMap,
}

impl PixelTask {
    /// Builds the UNet on trainable variables initialised as PyTorch initialises its modules
    /// (from `init_seed`), and the objective.
    pub fn new(config: PixelTrainingConfig, init_seed: u64, device: &Device) -> Result<Self> {
        check_trainable(&config.unet)?;
        let learned_variance = matches!(config.loss, LossKind::Hybrid { .. });
        let expected_out = if learned_variance { 2 * config.unet.in_channels } else { config.unet.in_channels };
        if config.unet.out_channels != expected_out {
            bail!("the UNet's out_channels is {}, the objective needs {expected_out}", config.unet.out_channels);
        }
        if !(0.0..1.0).contains(&config.class_dropout) {
            bail!("`class_dropout` must be in [0, 1), got {}", config.class_dropout);
        }
        if config.class_dropout > 0.0 && config.num_classes.is_none() {
            bail!("`class_dropout` needs class-conditional training (`num_classes`)");
        }
        let wanted_embeds = config.num_classes.map(|n| n + usize::from(config.class_dropout > 0.0));
        if config.unet.num_class_embeds != wanted_embeds {
            bail!("the UNet's num_class_embeds is {:?}, class-conditional training here needs {wanted_embeds:?}", config.unet.num_class_embeds);
        }
        if config.sampling.count == 0 || config.sampling.steps == 0 {
            bail!("sample grids need at least one image and one step");
        }
        let scheduler_config = ddpm_scheduler_config(&config.noise, config.prediction_type, learned_variance);
        let origin = Path::new("the training noise schedule");
        // Validates the schedule as the exported scheduler will read it.
        DdpmScheduler::from_config(&scheduler_config, origin)?;
        let objective = training_objective(&config.noise, config.prediction_type, config.loss, config.snr_gamma, config.timestep_sampling)?;
        let varmap = VarMap::new();
        let unet = UNet2DModel::new(VarBuilder::from_varmap(&varmap, DType::F32, device), &config.unet)?;
        let parameters = Parameters::from_varmap(&varmap)?;
        parameters.init_torch_default(init_seed)?;
        Ok(Self { config, parameters, unet, objective, scheduler_config, device: device.clone(), _varmap: varmap })
    }

    /// The task's settings.
    pub fn config(&self) -> &PixelTrainingConfig {
        &self.config
    }

    /// The UNet being trained.
    pub fn unet(&self) -> &UNet2DModel {
        &self.unet
    }

    /// The objective the loss comes from.
    pub fn objective(&self) -> &DiffusionObjective {
        &self.objective
    }

    /// The exported `scheduler_config.json`.
    pub fn scheduler_config(&self) -> &Map<String, Value> {
        &self.scheduler_config
    }

    /// A pipeline over the given weights, sampling with the named scheduler.
    fn pipeline(&self, weights: &HashMap<String, Tensor>) -> Result<PixelPipeline> {
        let vb = VarBuilder::from_tensors(weights.clone(), DType::F32, &self.device);
        let unet = UNet2DModel::new(vb, &self.config.unet)?;
        let scheduler = scheduler_from_config(
            self.scheduler_config.clone(),
            Path::new("the training noise schedule"),
            Some(&self.config.sampling.scheduler),
            &[],
        )?;
        Ok(PixelPipeline {
            unet,
            unet_config: self.config.unet.clone(),
            scheduler,
            model_dir: Path::new("(training)").to_path_buf(),
            device: self.device.clone(),
        })
    }
}

impl TrainingTask for PixelTask {
    fn parameters(&self) -> &Parameters {
        &self.parameters
    }

    fn identity(&self) -> Map<String, Value> {
        let value = |v: Result<Value, serde_json::Error>| v.unwrap_or(Value::Null);
        let mut map = Map::new();
        map.insert("kind".into(), json!("pixel UNet2DModel"));
        map.insert("unet".into(), value(serde_json::to_value(&self.config.unet)));
        map.insert("noise".into(), value(serde_json::to_value(&self.config.noise)));
        map.insert("prediction_type".into(), self.scheduler_config["prediction_type"].clone());
        map.insert("loss".into(), value(serde_json::to_value(self.config.loss)));
        map.insert("timestep_sampling".into(), value(serde_json::to_value(self.config.timestep_sampling)));
        map.insert("snr_gamma".into(), json!(self.config.snr_gamma));
        map.insert("num_classes".into(), json!(self.config.num_classes));
        map.insert("class_dropout".into(), json!(self.config.class_dropout));
        map
    }

    /// Draws (in order) the label dropout, the timesteps and the noise.
    fn loss(&mut self, batch: &Batch, generator: &mut TorchGenerator) -> Result<Tensor> {
        let labels = match (self.config.num_classes, &batch.labels) {
            (Some(num_classes), Some(labels)) => {
                if let Some(&bad) = labels.iter().find(|&&l| l as usize >= num_classes) {
                    bail!("label {bad} is out of range for {num_classes} classes");
                }
                let labels = drop_labels(labels, self.config.class_dropout, num_classes as u32, generator);
                Some(Tensor::from_vec(labels, batch.images.dim(0)?, &self.device)?)
            }
            (Some(_), None) => bail!("class-conditional training needs labels, and the data has none"),
            (None, _) => None,
        };
        let unet = &self.unet;
        let output = self.objective.loss(&batch.images, generator, &mut |x_t, t| unet.forward(x_t, t, labels.as_ref()))?;
        self.objective.record(&output);
        Ok(output.loss)
    }

    fn state(&self) -> Result<(Value, HashMap<String, Tensor>)> {
        sampler_state(&self.objective)
    }

    fn load_state(&mut self, state: &Value, tensors: &HashMap<String, Tensor>) -> Result<()> {
        load_sampler_state(&mut self.objective, state, tensors)
    }

    /// Unconditional: `count` images from one seed. Class-conditional: a row of `count`
    /// images per class (the first ten), every row from the same seed.
    fn samples(&mut self, weights: &HashMap<String, Tensor>) -> Result<(Vec<Image8>, usize)> {
        let mut pipeline = self.pipeline(weights)?;
        let settings = &self.config.sampling;
        let rows: Vec<Option<i64>> = match self.config.num_classes {
            Some(n) => (0..n.min(10) as i64).map(Some).collect(),
            None => vec![None],
        };
        let mut images = Vec::new();
        for class_label in rows.iter().copied() {
            let options = PixelOptions { num_inference_steps: settings.steps, num_images: settings.count, eta: 0.0, class_label };
            let mut generator = TorchGenerator::new(settings.seed);
            let samples = pipeline.generate(&options, &mut generator, &mut |_, _| {})?;
            images.extend(to_uint8_images(&samples)?);
        }
        let columns = if self.config.num_classes.is_some() { settings.count } else { (settings.count as f64).sqrt().ceil() as usize };
        Ok((images, columns))
    }

    fn export(&self, weights: &HashMap<String, Tensor>, dir: &Path) -> Result<()> {
        let mut unet_config = match serde_json::to_value(&self.config.unet).map_err(|e| Error::invalid(e.to_string()))? {
            Value::Object(fields) => fields,
            _ => Map::new(),
        };
        if let Some(SampleSize::HeightWidth([h, w])) = self.config.unet.sample_size {
            unet_config.insert("sample_size".into(), json!([h, w]));
        }
        write_model_folder(&dir.join("unet"), Some("UNet2DModel"), &unet_config, weights, "", "diffusion_pytorch_model.safetensors", DType::F32)?;
        write_json(&dir.join("scheduler/scheduler_config.json"), &Value::Object(self.scheduler_config.clone()))?;
        write_json(
            &dir.join("model_index.json"),
            &json!({
                "_class_name": "DDPMPipeline",
                "_diffusers_version": DIFFUSERS_VERSION,
                "scheduler": ["diffusers", "DDPMScheduler"],
                "unet": ["diffusers", "UNet2DModel"],
            }),
        )
    }
}
