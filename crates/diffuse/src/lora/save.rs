//! Writing trained LoRAs in the formats people share:
//! - diffusers' (`save_lora_weights` of a peft adapter, `pytorch_lora_weights.safetensors`):
//!   `unet.<module>.lora_A.weight` / `.lora_B.weight` and `text_encoder.<module>...`, the
//!   adapter configs (r, lora_alpha, target_modules, ...) in the header's
//!   `lora_adapter_metadata`, as diffusers/loaders/lora_base.py `_save_lora_weights` writes them;
//! - kohya's (AUTOMATIC1111, ComfyUI): `lora_unet_<flat module>.lora_down.weight` /
//!   `.lora_up.weight` / `.alpha` and `lora_te_text_model_<flat module>...`, the alpha a scalar
//!   tensor beside each layer (kohya-ss/sd-scripts networks/lora.py).
//!
//! Both hold the same adapter: loaded by diffusers or by diffuse (lora/file.rs), either gives
//! the same `W + alpha/r · up @ down`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde_json::{json, Map, Value};

use super::adapters::{parameter_name, AdaptedLayer, AdapterConfig};
use super::file::LoraFile;
use super::keys::{kohya_name, Target};
use crate::files::write_atomically;
use crate::loading::weights::safetensors_bytes_with_metadata;
use crate::{bail, Result};

/// diffusers' file name for a pipeline's LoRA (`LORA_WEIGHT_NAME_SAFE`).
pub const DIFFUSERS_FILE_NAME: &str = "pytorch_lora_weights.safetensors";

/// One trained layer: `W += alpha/r · up @ down`.
#[derive(Clone, Debug)]
pub struct TrainedLayer {
    /// The model the layer is in.
    pub target: Target,
    /// diffusers' module path (the text encoder's without `text_model.`).
    pub module: String,
    /// `[r, in]`.
    pub down: Tensor,
    /// `[out, r]`.
    pub up: Tensor,
}

/// A trained LoRA: its layers and each model's adapter config.
#[derive(Clone, Debug)]
pub struct TrainedLora {
    /// The layers, in the order they are written.
    pub layers: Vec<TrainedLayer>,
    /// Each adapted model's `r`, `lora_alpha` and target modules.
    pub configs: BTreeMap<Target, AdapterConfig>,
    /// peft's `lora_dropout` it was trained with (recorded, not applied at inference).
    pub dropout: f64,
}

impl TrainedLora {
    /// The adapted layers' matrices from named tensors (the training parameters' names,
    /// adapters.rs's `parameter_name`).
    pub fn from_tensors(layers: &[AdaptedLayer], configs: BTreeMap<Target, AdapterConfig>, tensors: &HashMap<String, Tensor>) -> Result<Self> {
        let mut trained = Vec::with_capacity(layers.len());
        for layer in layers {
            let get = |matrix: &str| {
                let name = parameter_name(layer.target, &layer.module, matrix);
                match tensors.get(&name) {
                    Some(tensor) => Ok(tensor.to_device(&Device::Cpu)?.to_dtype(DType::F32)?),
                    None => bail!("the trained LoRA has no {name}"),
                }
            };
            trained.push(TrainedLayer { target: layer.target, module: layer.module.clone(), down: get("lora_A")?, up: get("lora_B")? });
        }
        if trained.is_empty() {
            bail!("the LoRA has no layers");
        }
        Ok(Self { layers: trained, configs, dropout: 0.0 })
    }

    /// diffusers' tensors and header metadata.
    pub fn diffusers_format(&self) -> Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
        let mut tensors = HashMap::new();
        for layer in &self.layers {
            tensors.insert(parameter_name(layer.target, &layer.module, "lora_A"), layer.down.clone());
            tensors.insert(parameter_name(layer.target, &layer.module, "lora_B"), layer.up.clone());
        }
        // The peft LoraConfig fields that matter for loading, flattened with the component's
        // prefix as `_save_lora_weights` does (`unet.r`, `text_encoder.lora_alpha`, ...).
        let mut metadata = Map::new();
        for (target, config) in &self.configs {
            let prefix = target.diffusers_prefix();
            let mut targets = config.target_modules.clone();
            targets.sort();
            let fields = [
                ("r", json!(config.rank)),
                ("lora_alpha", json!(config.alpha)),
                ("target_modules", json!(targets)),
                ("lora_dropout", json!(self.dropout)),
                ("bias", json!("none")),
                ("init_lora_weights", json!(true)),
                ("use_rslora", json!(false)),
                ("use_dora", json!(false)),
                ("lora_bias", json!(false)),
                ("fan_in_fan_out", json!(false)),
                ("rank_pattern", json!({})),
                ("alpha_pattern", json!({})),
                ("peft_type", json!("LORA")),
            ];
            for (name, value) in fields {
                metadata.insert(format!("{prefix}.{name}"), value);
            }
        }
        let text = serde_json::to_string_pretty(&Value::Object(metadata)).map_err(|e| crate::Error::invalid(e.to_string()))?;
        Ok((tensors, HashMap::from([("lora_adapter_metadata".to_string(), text)])))
    }

    /// kohya's tensors: down, up and alpha per layer.
    pub fn kohya_format(&self) -> Result<HashMap<String, Tensor>> {
        let mut tensors = HashMap::new();
        for layer in &self.layers {
            let Some(config) = self.configs.get(&layer.target) else {
                bail!("no adapter config for the {}", layer.target.label());
            };
            let name = kohya_name(layer.target, &layer.module);
            tensors.insert(format!("{name}.lora_down.weight"), layer.down.clone());
            tensors.insert(format!("{name}.lora_up.weight"), layer.up.clone());
            tensors.insert(format!("{name}.alpha"), Tensor::new(config.alpha as f32, &Device::Cpu)?);
        }
        Ok(tensors)
    }

    /// The LoRA as diffuse reads a file of it (for sampling with it before it is written).
    pub fn as_lora_file(&self, path: &Path) -> Result<LoraFile> {
        let (tensors, metadata) = self.diffusers_format()?;
        LoraFile::from_tensors(path, tensors, &metadata)
    }

    /// Writes `path` in diffusers' format, the matrices as `dtype` (to a temporary name, then
    /// renamed).
    pub fn write_diffusers(&self, path: &Path, dtype: DType) -> Result<()> {
        let (tensors, metadata) = self.diffusers_format()?;
        write_tensors(path, &tensors, metadata, dtype)
    }

    /// Writes `path` in kohya's format (alphas stay f32).
    pub fn write_kohya(&self, path: &Path, dtype: DType) -> Result<()> {
        let tensors = self.kohya_format()?;
        let mut metadata = HashMap::new();
        // What kohya's trainer records, for tools that show it.
        if let Some((_, config)) = self.configs.iter().next() {
            metadata.insert("ss_network_module".to_string(), "networks.lora".to_string());
            metadata.insert("ss_network_dim".to_string(), config.rank.to_string());
            metadata.insert("ss_network_alpha".to_string(), config.alpha.to_string());
        }
        write_tensors(path, &tensors, metadata, dtype)
    }
}

fn write_tensors(path: &Path, tensors: &HashMap<String, Tensor>, metadata: HashMap<String, String>, dtype: DType) -> Result<()> {
    let converted: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(name, t)| Ok((name.clone(), if name.ends_with(".alpha") { t.clone() } else { t.to_dtype(dtype)? })))
        .collect::<Result<_>>()?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| crate::Error::io(parent, e))?;
    }
    write_atomically(path, &safetensors_bytes_with_metadata(&converted, metadata)?)
}
