//! Fusing LoRAs into a model's weights as the model reads them: diffusers' `fuse_lora`
//! (peft's `LoraLayer.merge`: `W += scaling · B @ A`, one adapter after another, with
//! `scaling = weight · alpha / r` as `set_adapters` and `fuse_lora(lora_scale=)` leave it).
//!
//! A [`LoraSet`] holds every LoRA file, read and checked before any model is built. Its
//! [`LoraSet::fuse_into`] wraps a component's `VarBuilder` in a backend that, when the model
//! asks for a weight some LoRA adapts, reads the weight in f32, adds each LoRA's delta (in f32,
//! reshaped for convolutions), and converts to the model's dtype: nothing is rewritten on disk
//! or held twice, and sampling runs the plain model. After the models are built,
//! [`LoraSet::finish`] says what was applied, and refuses a LoRA that matched nothing or whose
//! layers have other shapes than the model's (a LoRA for another architecture); the pipeline
//! that was being built is then dropped, so nothing is ever applied half-way.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use super::file::LoraFile;
use super::keys::{lookup_name, model_lookup_name, Format, Target};
use super::LoraSpec;
use crate::{Error, Result};

/// What became of one LoRA layer.
#[derive(Clone, Debug, PartialEq)]
enum Usage {
    /// No weight of the model has its name.
    Unused,
    /// An LDM block name that is no layer of this UNet's block layout.
    Unmapped,
    /// Added to the model's weight of this name.
    Applied(String),
    /// The model's weight of this name has another shape.
    Mismatch { weight: String, model_shape: Vec<usize> },
    /// Two different model weights asked for it (their names flatten alike).
    Ambiguous(String, String),
}

struct Shared {
    loras: Vec<(LoraSpec, LoraFile)>,
    /// `usage[lora][layer]`.
    usage: Mutex<Vec<Vec<Usage>>>,
}

/// LoRA files with their weights, read and checked, ready to fuse into models.
#[derive(Clone)]
pub struct LoraSet {
    shared: Arc<Shared>,
}

/// What one LoRA did to a pipeline.
#[derive(Clone, Debug)]
pub struct AppliedLora {
    /// The LoRA and its weights.
    pub spec: LoraSpec,
    /// The key formats the file uses.
    pub formats: Vec<Format>,
    /// Layers fused into the UNet and into the text encoder.
    pub unet_layers: usize,
    /// Layers fused into the text encoder(s).
    pub text_encoder_layers: usize,
    /// LoRA layers (the file's names) that match no layer of this model.
    pub unused_layers: Vec<String>,
    /// Keys that are no LoRA tensor diffuse applies, grouped by why.
    pub skipped: BTreeMap<&'static str, Vec<String>>,
    /// Every key of the file, and those of the unused layers.
    pub key_count: usize,
    /// The keys of the unused layers.
    pub unused_keys: Vec<String>,
}

impl AppliedLora {
    /// One line for the user: what was fused and what was not.
    pub fn summary(&self) -> String {
        let formats: Vec<&str> = self.formats.iter().map(|f| f.label()).collect();
        let weight = if self.spec.unet_weight == self.spec.text_encoder_weight {
            format!("weight {}", self.spec.unet_weight)
        } else {
            format!("UNet weight {}, text encoder weight {}", self.spec.unet_weight, self.spec.text_encoder_weight)
        };
        let mut line = format!(
            "LoRA {} ({}, {weight}): fused {} layers (UNet {}, text encoder {}) from {} keys",
            self.spec.name,
            formats.join(" + "),
            self.unet_layers + self.text_encoder_layers,
            self.unet_layers,
            self.text_encoder_layers,
            self.key_count
        );
        let mut unused = Vec::new();
        if let Some(first) = self.unused_layers.first() {
            unused.push(format!("{} layers match no layer of this model (e.g. `{first}`)", self.unused_layers.len()));
        }
        for (reason, keys) in &self.skipped {
            unused.push(format!("{} keys are {reason} (e.g. `{}`)", keys.len(), keys[0]));
        }
        if !unused.is_empty() {
            line.push_str(&format!("; {} keys unused: {}", self.unused_keys.len(), unused.join("; ")));
        }
        line
    }
}

impl LoraSet {
    /// Reads and checks every LoRA file (nothing is applied if any one is refused).
    pub fn open(specs: &[LoraSpec]) -> Result<Self> {
        let mut loras = Vec::new();
        for spec in specs {
            for (what, weight) in [("weight", spec.unet_weight), ("text encoder weight", spec.text_encoder_weight)] {
                if !weight.is_finite() {
                    return Err(Error::invalid(format!("LoRA {}: the {what} {weight} is not a finite number", spec.path.display())));
                }
            }
            loras.push((spec.clone(), LoraFile::open(&spec.path)?));
        }
        Ok(Self::from_files(loras))
    }

    /// LoRAs already read (e.g. made in memory).
    pub fn from_files(loras: Vec<(LoraSpec, LoraFile)>) -> Self {
        let usage = loras.iter().map(|(_, file)| vec![Usage::Unused; file.layers.len()]).collect();
        LoraSet { shared: Arc::new(Shared { loras, usage: Mutex::new(usage) }) }
    }

    /// Whether the set holds no LoRA.
    pub fn is_empty(&self) -> bool {
        self.shared.loras.is_empty()
    }

    /// `weights` (a model's) with every LoRA layer for `target` added as the model reads them.
    /// `layers_per_block` is the UNet's, for LoRAs named by LDM blocks (`None` for the text
    /// encoder, or a UNet whose levels differ).
    pub fn fuse_into(&self, target: Target, weights: VarBuilder<'static>, layers_per_block: Option<usize>) -> Result<VarBuilder<'static>> {
        if self.is_empty() {
            return Ok(weights);
        }
        let mut index: HashMap<String, Vec<(usize, usize)>> = HashMap::new();
        let mut usage = self.lock()?;
        for (i, (_, file)) in self.shared.loras.iter().enumerate() {
            for (j, layer) in file.layers.iter().enumerate().filter(|(_, layer)| layer.target == target) {
                let Some(name) = lookup_name(target, &layer.module, layers_per_block) else {
                    usage[i][j] = Usage::Unmapped;
                    continue;
                };
                let entries = index.entry(name).or_default();
                if let Some(&(_, other)) = entries.iter().find(|(lora, _)| *lora == i) {
                    return Err(Error::weights(
                        &file.path,
                        format!(
                            "`{}` and `{}` adapt the same {} layer",
                            file.layers[other].module,
                            layer.module,
                            target.label()
                        ),
                    ));
                }
                entries.push((i, j));
            }
        }
        drop(usage);
        let dtype = weights.dtype();
        let device = weights.device().clone();
        let backend = FusedWeights { base: weights, target, index, shared: self.shared.clone() };
        Ok(VarBuilder::from_backend(Box::new(backend), dtype, device))
    }

    /// What each LoRA did, once the models are built. A LoRA that matched no layer, or whose
    /// layers name the model's but have other shapes, is an error about its file.
    pub fn finish(&self) -> Result<Vec<AppliedLora>> {
        let usage = self.lock()?;
        let mut applied = Vec::new();
        for ((spec, file), usage) in self.shared.loras.iter().zip(usage.iter()) {
            let fail = |message: String| Error::weights(&file.path, message);
            let layers = file.layers.len();
            let count = |target: Target| {
                file.layers.iter().zip(usage).filter(|(l, u)| l.target == target && matches!(u, Usage::Applied(_))).count()
            };
            let (unet_layers, text_encoder_layers) = (count(Target::Unet), count(Target::TextEncoder) + count(Target::TextEncoder2));
            if let Some((layer, Usage::Ambiguous(a, b))) =
                file.layers.iter().zip(usage).find(|(_, u)| matches!(u, Usage::Ambiguous(..)))
            {
                return Err(fail(format!("its layer `{}` matches two weights of the model, `{a}` and `{b}`", layer.module)));
            }
            let mismatched: Vec<_> = file
                .layers
                .iter()
                .zip(usage)
                .filter_map(|(layer, u)| match u {
                    Usage::Mismatch { weight, model_shape } => Some((layer, weight, model_shape)),
                    _ => None,
                })
                .collect();
            if let Some((layer, weight, model_shape)) = mismatched.first() {
                let (out, inner) = layer.delta_shape();
                return Err(fail(format!(
                    "{} of its {layers} LoRA layers name a layer of this model but have another shape (e.g. `{}` changes \
                     `{weight}` as a [{out}, {inner}] matrix, the model's is {model_shape:?}); {} layers fit: this is a LoRA \
                     for another architecture",
                    mismatched.len(),
                    layer.module,
                    unet_layers + text_encoder_layers
                )));
            }
            if unet_layers + text_encoder_layers == 0 {
                let sdxl = match file.layers.iter().any(|layer| layer.target == Target::TextEncoder2) {
                    true => " (it has SDXL's second text encoder)",
                    false => "",
                };
                return Err(fail(format!(
                    "none of its {layers} LoRA layers matches a layer of this model's UNet or text encoder (e.g. `{}`): \
                     this is a LoRA for another architecture{sdxl}",
                    file.layers[0].module
                )));
            }
            let unused: Vec<_> =
                file.layers.iter().zip(usage).filter(|(_, u)| matches!(u, Usage::Unused | Usage::Unmapped)).map(|(l, _)| l).collect();
            let mut unused_keys: Vec<String> = unused.iter().flat_map(|l| l.keys.iter().cloned()).collect();
            unused_keys.extend(file.skipped.values().flatten().cloned());
            applied.push(AppliedLora {
                spec: spec.clone(),
                formats: file.formats.iter().copied().collect(),
                unet_layers,
                text_encoder_layers,
                unused_layers: unused.iter().map(|l| l.module.clone()).collect(),
                skipped: file.skipped.clone(),
                key_count: file.key_count,
                unused_keys,
            });
        }
        Ok(applied)
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Vec<Vec<Usage>>>> {
        self.shared.usage.lock().map_err(|_| Error::invalid("a LoRA fusion failed part-way in another thread"))
    }
}

/// The `SimpleBackend` behind [`LoraSet::fuse_into`].
struct FusedWeights {
    base: VarBuilder<'static>,
    target: Target,
    /// Flat layer name -> (lora, layer) in the order the LoRAs were given.
    index: HashMap<String, Vec<(usize, usize)>>,
    shared: Arc<Shared>,
}

impl FusedWeights {
    fn layers_for(&self, name: &str) -> Option<&Vec<(usize, usize)>> {
        let module = name.strip_suffix(".weight")?;
        self.index.get(&model_lookup_name(self.target, module))
    }

    /// `weight` (f32) plus each LoRA's delta, in the order they were given, as peft merges
    /// adapters one after another.
    fn fuse(&self, name: &str, mut weight: Tensor, layers: &[(usize, usize)]) -> candle_core::Result<Tensor> {
        let mut usage = self.shared.usage.lock().map_err(|_| candle_core::Error::Msg("LoRA usage lock poisoned".into()))?;
        let dims = weight.dims().to_vec();
        for &(i, j) in layers {
            let (spec, file) = &self.shared.loras[i];
            let layer = &file.layers[j];
            let (out, inner) = layer.delta_shape();
            if dims.first() != Some(&out) || dims[1..].iter().product::<usize>() != inner {
                usage[i][j] = Usage::Mismatch { weight: name.to_string(), model_shape: dims.clone() };
                continue;
            }
            usage[i][j] = match &usage[i][j] {
                Usage::Applied(other) if other != name => Usage::Ambiguous(other.clone(), name.to_string()),
                _ => Usage::Applied(name.to_string()),
            };
            let factor = spec.weight(self.target);
            if factor == 0.0 {
                continue;
            }
            let delta = layer.delta(factor).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            let delta = delta.reshape(dims.as_slice())?.to_device(weight.device())?;
            weight = (weight + delta)?;
        }
        Ok(weight)
    }
}

impl SimpleBackend for FusedWeights {
    fn get(&self, shape: Shape, name: &str, hints: candle_nn::Init, dtype: DType, _: &Device) -> candle_core::Result<Tensor> {
        match self.layers_for(name) {
            None => self.base.get_with_hints_dtype(shape, name, hints, dtype),
            Some(layers) => {
                let weight = self.base.get_with_hints_dtype(shape, name, hints, DType::F32)?;
                self.fuse(name, weight, layers)?.to_dtype(dtype)
            }
        }
    }

    fn get_unchecked(&self, name: &str, dtype: DType, _: &Device) -> candle_core::Result<Tensor> {
        match self.layers_for(name) {
            None => self.base.get_unchecked_dtype(name, dtype),
            Some(layers) => {
                let weight = self.base.get_unchecked_dtype(name, DType::F32)?;
                self.fuse(name, weight, layers)?.to_dtype(dtype)
            }
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.base.contains_tensor(name)
    }
}
