//! LoRA adapters to train: peft's `inject_adapter_in_model` for a
//! `LoraConfig(r, lora_alpha, target_modules)`, done as a frozen model reads its weights.
//!
//! [`Adapters::wrap`] gives a model's `VarBuilder` a backend under which every targeted
//! `Linear` (or `Conv2d`) finds trainable `lora_A.weight` (`[r, in]`; `[r, in, k, k]`) and
//! `lora_B.weight` (`[out, r]`; `[out, r, 1, 1]`) matrices and its `lora_scale` (alpha / r);
//! [`crate::models::Linear`] and [`crate::models::Conv2d`] add the branch `scale · B(A x)`
//! beside the frozen weight. The matrices are candle `Var`s in one `VarMap`,
//! initialised as peft does (A kaiming-uniform, B zero: training starts from the base model
//! exactly), and named as diffusers' `save_lora_weights` names them
//! (`unet.<module>.lora_A.weight`, `text_encoder.<module>.lora_B.weight`), so that the trained
//! values are a LoRA file's tensors as they are (lora/save.rs).
//!
//! A module is targeted as peft matches `target_modules`: its name equals a target, or ends
//! with `.` + a target (`to_q` takes every `...attn1.to_q` and `...attn2.to_q`; `attn2.to_q`
//! only the cross-attention ones).

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{VarBuilder, VarMap};

use super::keys::Target;
use crate::rng::TorchGenerator;
use crate::{bail, Error, Result};

/// The UNet's attention projections, diffusers' LoRA training scripts' default targets.
pub const UNET_ATTENTION: &[&str] = &["to_q", "to_k", "to_v", "to_out.0"];
/// Only the cross-attention projections (the text's keys and values, and the queries on them).
pub const UNET_CROSS_ATTENTION: &[&str] = &["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"];
/// The transformer blocks' feed-forward layers (GEGLU's projection and the output).
pub const UNET_FEED_FORWARD: &[&str] = &["ff.net.0.proj", "ff.net.2"];
/// The resnets' 3×3 convolutions and time-embedding projections (kohya's LoCon adds these).
pub const UNET_RESNETS: &[&str] = &["conv1", "conv2", "time_emb_proj"];
/// The CLIP text encoder's attention projections (diffusers' `text_encoder_lora_config`).
pub const TEXT_ENCODER_ATTENTION: &[&str] = &["q_proj", "k_proj", "v_proj", "out_proj"];

/// One model's adapter settings (peft `LoraConfig` fields).
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterConfig {
    /// `r`: the adapters' rank.
    pub rank: usize,
    /// `lora_alpha`: the branch is scaled by alpha / r.
    pub alpha: f64,
    /// `target_modules`, matched as peft matches them.
    pub target_modules: Vec<String>,
}

impl AdapterConfig {
    /// A config with these target module names.
    pub fn new(rank: usize, alpha: f64, target_modules: &[&str]) -> Self {
        Self { rank, alpha, target_modules: target_modules.iter().map(|t| t.to_string()).collect() }
    }

    /// Errors on a rank of 0, a non-positive or non-finite alpha, or no target modules.
    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            bail!("`rank` must be at least 1");
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            bail!("`alpha` must be a finite number above 0, got {}", self.alpha);
        }
        if self.target_modules.is_empty() {
            bail!("no LoRA target modules");
        }
        Ok(())
    }

    /// alpha / r.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// peft's rule (`check_target_module_exists` for a list): the module name is a target or
    /// ends with `.` + a target.
    pub fn targets(&self, module: &str) -> bool {
        self.target_modules.iter().any(|t| module == t || (module.ends_with(t.as_str()) && module[..module.len() - t.len()].ends_with('.')))
    }
}

/// A layer that got an adapter.
#[derive(Clone, Debug, PartialEq)]
pub struct AdaptedLayer {
    /// The model the layer is in.
    pub target: Target,
    /// The module path as diffusers names it in LoRA files (the text encoder's without
    /// `text_model.`, as transformers 5 and diffusers' `save_lora_weights` write it).
    pub module: String,
    /// The input side: `in`, or `in · k · k` for a convolution.
    pub in_features: usize,
    /// The output side: the layer's output features (channels for a convolution).
    pub out_features: usize,
}

struct Inner {
    varmap: VarMap,
    /// Draws the A matrices, in the order the models ask for them.
    generator: Mutex<TorchGenerator>,
    layers: Mutex<Vec<AdaptedLayer>>,
}

/// The adapters of a training run: one `VarMap` for every wrapped model.
#[derive(Clone)]
pub struct Adapters {
    inner: Arc<Inner>,
}

impl Adapters {
    /// No adapters yet; A matrices are drawn from a generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Adapters {
            inner: Arc::new(Inner { varmap: VarMap::new(), generator: Mutex::new(TorchGenerator::new(seed)), layers: Mutex::new(Vec::new()) }),
        }
    }

    /// `base` (a frozen model's weights, f32) with adapters for `config`'s target modules;
    /// build the model from the result.
    pub fn wrap(&self, target: Target, config: &AdapterConfig, base: VarBuilder<'static>) -> Result<VarBuilder<'static>> {
        config.validate()?;
        if base.dtype() != DType::F32 {
            bail!("LoRA training keeps the adapters and the base model in f32, not {:?}", base.dtype());
        }
        let device = base.device().clone();
        let backend = AdapterBackend { base, target, config: config.clone(), inner: self.inner.clone() };
        Ok(VarBuilder::from_backend(Box::new(backend), DType::F32, device))
    }

    /// The trainable matrices (for `Parameters::from_varmap`).
    pub fn varmap(&self) -> &VarMap {
        &self.inner.varmap
    }

    /// The layers adapted so far, in the order the models built them.
    pub fn layers(&self) -> Vec<AdaptedLayer> {
        self.inner.layers.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// How many layers of `target` were adapted.
    pub fn count(&self, target: Target) -> usize {
        self.layers().iter().filter(|l| l.target == target).count()
    }
}

/// The parameter name of a LoRA matrix: diffusers' key (`unet.<module>.lora_A.weight`).
pub fn parameter_name(target: Target, module: &str, matrix: &str) -> String {
    format!("{}.{module}.{matrix}.weight", target.diffusers_prefix())
}

/// The `SimpleBackend` behind [`Adapters::wrap`].
struct AdapterBackend {
    base: VarBuilder<'static>,
    target: Target,
    config: AdapterConfig,
    inner: Arc<Inner>,
}

#[derive(Clone, Copy, PartialEq)]
enum Piece {
    Down,
    Up,
    Scale,
}

impl AdapterBackend {
    /// The module and piece of a LoRA tensor name of a targeted layer that the base has.
    fn adapted<'n>(&self, name: &'n str) -> Option<(&'n str, Piece)> {
        let (module, piece) = if let Some(module) = name.strip_suffix(".lora_A.weight") {
            (module, Piece::Down)
        } else if let Some(module) = name.strip_suffix(".lora_B.weight") {
            (module, Piece::Up)
        } else {
            (name.strip_suffix(".lora_scale")?, Piece::Scale)
        };
        let matched = self.config.targets(self.file_module(module)) && self.base.contains_tensor(&format!("{module}.weight"));
        matched.then_some((module, piece))
    }

    /// The module as LoRA files name it: CLIP's without `text_model.` (the hub's checkpoints
    /// have the prefix, transformers 5 writes none; diffusers' LoRA keys follow the latter).
    fn file_module<'n>(&self, module: &'n str) -> &'n str {
        match self.target {
            Target::TextEncoder | Target::TextEncoder2 => module.strip_prefix("text_model.").unwrap_or(module),
            Target::Unet => module,
        }
    }

    fn lora_tensor(&self, module: &str, piece: Piece) -> candle_core::Result<Tensor> {
        let device = self.base.device();
        if piece == Piece::Scale {
            return Tensor::new(self.config.scale() as f32, device);
        }
        let file_module = self.file_module(module);
        let down_name = parameter_name(self.target, file_module, "lora_A");
        let up_name = parameter_name(self.target, file_module, "lora_B");
        let mut vars = self.inner.varmap.data().lock().map_err(|_| candle_core::Error::Msg("LoRA parameters lock poisoned".into()))?;
        if !vars.contains_key(&down_name) {
            let weight = self.base.get_unchecked_dtype(&format!("{module}.weight"), DType::F32)?;
            // A linear layer's [out, in], or a convolution's [out, in, k, k]: A takes the
            // input side ([r, in] or [r, in, k, k]), B is [out, r] (or a 1×1 [out, r, 1, 1]).
            let dims = weight.dims();
            if dims.len() != 2 && dims.len() != 4 {
                candle_core::bail!("{module}.weight has shape {dims:?}: LoRA adapters are trained on linear and 2-D convolution layers");
            }
            let (out_features, rank) = (dims[0], self.config.rank);
            let in_features: usize = dims[1..].iter().product();
            let down_shape = [&[rank], &dims[1..]].concat();
            let up_shape = if dims.len() == 2 { vec![out_features, rank] } else { vec![out_features, rank, 1, 1] };
            // peft's `reset_lora_parameters(init_lora_weights=True)`: A by
            // kaiming_uniform_(a=√5), i.e. U(±1/√fan_in); B zero.
            let bound = 1.0 / (in_features as f64).sqrt();
            let draws = self.inner.generator.lock().map_err(|_| candle_core::Error::Msg("LoRA generator lock poisoned".into()))?.rand(rank * in_features);
            let down: Vec<f32> = draws.iter().map(|&u| ((u as f64 * 2.0 - 1.0) * bound) as f32).collect();
            vars.insert(down_name.clone(), Var::from_tensor(&Tensor::from_vec(down, down_shape, device)?)?);
            vars.insert(up_name.clone(), Var::from_tensor(&Tensor::zeros(up_shape, DType::F32, device)?)?);
            if let Ok(mut layers) = self.inner.layers.lock() {
                layers.push(AdaptedLayer { target: self.target, module: file_module.to_string(), in_features, out_features });
            }
        }
        let name = if piece == Piece::Down { &down_name } else { &up_name };
        Ok(vars[name].as_tensor().clone())
    }
}

impl SimpleBackend for AdapterBackend {
    fn get(&self, shape: Shape, name: &str, hints: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        match self.adapted(name) {
            None => self.base.get_with_hints_dtype(shape, name, hints, dtype),
            Some((_, piece)) => {
                let tensor = self.get_unchecked(name, dtype, dev)?;
                if tensor.shape() != &shape && piece != Piece::Scale {
                    candle_core::bail!("{name}: the LoRA matrix is {:?}, {:?} was asked for", tensor.dims(), shape.dims());
                }
                Ok(tensor)
            }
        }
    }

    fn get_unchecked(&self, name: &str, dtype: DType, _: &Device) -> candle_core::Result<Tensor> {
        match self.adapted(name) {
            None => self.base.get_unchecked_dtype(name, dtype),
            // The Var's own tensor (same id) when f32, so that gradients reach it.
            Some((module, piece)) => {
                let tensor = self.lora_tensor(module, piece)?;
                if tensor.dtype() == dtype {
                    Ok(tensor)
                } else {
                    tensor.to_dtype(dtype)
                }
            }
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.adapted(name).is_some() || self.base.contains_tensor(name)
    }
}

/// Refuses a set of adapters that adapted nothing (targets that name no linear layer).
pub fn check_adapted(adapters: &Adapters, target: Target, config: &AdapterConfig) -> Result<usize> {
    let count = adapters.count(target);
    if count == 0 {
        return Err(Error::invalid(format!(
            "`target_modules` {}: no linear or convolution layer of the {} has such a name (e.g. to_q, to_k, to_v, to_out.0, \
             conv1 in the UNet, q_proj, k_proj, v_proj, out_proj in the text encoder)",
            config.target_modules.join(","),
            target.label()
        )));
    }
    Ok(count)
}
