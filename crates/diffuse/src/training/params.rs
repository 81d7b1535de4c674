//! The trainable parameters of a model: candle `Var`s (which the model code receives through
//! `VarBuilder::from_varmap`), in a fixed order (sorted by name), with PyTorch's default
//! initialisation and host copies for the optimizer, the EMA and checkpoints.

use std::collections::HashMap;

use candle_core::{DType, Tensor, Var};
use candle_nn::VarMap;

use crate::rng::TorchGenerator;
use crate::{bail, Result};

/// Named trainable tensors, sorted by name.
pub struct Parameters {
    names: Vec<String>,
    vars: Vec<Var>,
}

impl Parameters {
    /// The variables a model created in `varmap`, sorted by name.
    pub fn from_varmap(varmap: &VarMap) -> Result<Self> {
        let data = varmap.data().lock().map_err(|_| crate::Error::invalid("parameter map lock poisoned"))?;
        let mut entries: Vec<(String, Var)> = data.iter().map(|(name, var)| (name.clone(), var.clone())).collect();
        drop(data);
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, var) in &entries {
            if var.dtype() != DType::F32 {
                bail!("parameter {name} is {:?}; training keeps parameters in f32", var.dtype());
            }
        }
        let (names, vars) = entries.into_iter().unzip();
        Ok(Self { names, vars })
    }

    /// The parameters' names, in order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The parameters, in the order of `names`.
    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// The number of parameters (tensors).
    pub fn len(&self) -> usize {
        self.vars.len()
    }

    /// Whether there are no parameters.
    pub fn is_empty(&self) -> bool {
        self.vars.is_empty()
    }

    /// The number of each parameter's elements, in order.
    pub fn sizes(&self) -> Vec<usize> {
        self.vars.iter().map(|v| v.elem_count()).collect()
    }

    /// The total number of trainable values.
    pub fn num_values(&self) -> usize {
        self.sizes().iter().sum()
    }

    /// Each parameter's values, flattened.
    pub fn values(&self) -> Result<Vec<Vec<f32>>> {
        self.vars.iter().map(|v| Ok(v.as_tensor().flatten_all()?.to_vec1::<f32>()?)).collect()
    }

    /// Sets every parameter from flattened values (as [`Parameters::values`] returns them).
    pub fn set_values(&self, values: &[Vec<f32>]) -> Result<()> {
        if values.len() != self.vars.len() {
            bail!("{} parameter values for {} parameters", values.len(), self.vars.len());
        }
        for ((var, name), values) in self.vars.iter().zip(&self.names).zip(values) {
            if values.len() != var.elem_count() {
                bail!("parameter {name}: {} values for {} elements", values.len(), var.elem_count());
            }
            var.set(&Tensor::from_slice(values, var.shape(), var.device())?)?;
        }
        Ok(())
    }

    /// Flattened values as named tensors of the parameters' shapes (for safetensors files and
    /// for building a model from them).
    pub fn to_named_tensors(&self, values: &[Vec<f32>]) -> Result<HashMap<String, Tensor>> {
        let mut tensors = HashMap::with_capacity(self.vars.len());
        for ((name, var), values) in self.names.iter().zip(&self.vars).zip(values) {
            tensors.insert(name.clone(), Tensor::from_slice(values, var.shape(), &candle_core::Device::Cpu)?);
        }
        Ok(tensors)
    }

    /// Flattened values from named tensors, checking that every parameter is there with its
    /// shape; `origin` names the file in errors.
    pub fn values_from_named_tensors(&self, tensors: &HashMap<String, Tensor>, origin: &str) -> Result<Vec<Vec<f32>>> {
        let mut values = Vec::with_capacity(self.vars.len());
        for (name, var) in self.names.iter().zip(&self.vars) {
            let Some(tensor) = tensors.get(name) else {
                bail!("{origin}: parameter {name} is missing");
            };
            if tensor.dims() != var.dims() {
                bail!("{origin}: parameter {name} has shape {:?}, the model has {:?}", tensor.dims(), var.dims());
            }
            values.push(tensor.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
        }
        if tensors.len() != self.vars.len() {
            let extra: Vec<&String> = tensors.keys().filter(|k| !self.names.contains(k)).collect();
            bail!("{origin}: holds tensors the model does not have: {extra:?}");
        }
        Ok(values)
    }

    /// PyTorch's default initialisation of the modules diffusers builds models from, drawn
    /// from a generator seeded with `seed`, parameter by parameter in name order:
    /// - `Conv2d` and `Linear` weights and biases: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (the
    ///   bound `kaiming_uniform_(a=sqrt(5))` gives, and the bias rule of `reset_parameters`);
    /// - normalisation layers (`GroupNorm`, `LayerNorm`): weight 1, bias 0;
    /// - embedding tables (`nn.Embedding`: `*embedding.weight` of rank 2, a learned
    ///   `time_proj`): N(0, 1);
    /// - `GaussianFourierProjection.weight` (`time_proj.weight` of rank 1): N(0, 1) × 16, the
    ///   scale `UNet2DModel` gives it.
    pub fn init_torch_default(&self, seed: u64) -> Result<()> {
        let mut generator = TorchGenerator::new(seed);
        let shapes: HashMap<&str, &[usize]> = self.names.iter().map(String::as_str).zip(self.vars.iter().map(|v| v.dims())).collect();
        let mut values = Vec::with_capacity(self.vars.len());
        for (name, var) in self.names.iter().zip(&self.vars) {
            let dims = var.dims();
            let count = var.elem_count();
            let (module, leaf) = name.rsplit_once('.').unwrap_or(("", name.as_str()));
            let module_leaf = module.rsplit('.').next().unwrap_or(module);
            let is_embedding_table = dims.len() == 2 && (module_leaf.ends_with("embedding") || module_leaf == "time_proj");
            let uniform = |generator: &mut TorchGenerator, fan_in: usize| -> Vec<f32> {
                let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
                generator.rand(count).into_iter().map(|u| ((u as f64 * 2.0 - 1.0) * bound) as f32).collect()
            };
            let value = match (leaf, dims.len()) {
                ("weight", _) if is_embedding_table => generator.randn(count),
                ("weight", 1) if module_leaf == "time_proj" => generator.randn(count).into_iter().map(|v| v * 16.0).collect(),
                ("weight", 1) => vec![1.0; count],
                ("weight", _) => uniform(&mut generator, dims[1..].iter().product()),
                ("bias", _) => match shapes.get(format!("{module}.weight").as_str()) {
                    Some(weight) if weight.len() >= 2 && !is_embedding_table => uniform(&mut generator, weight[1..].iter().product()),
                    _ => vec![0.0; count],
                },
                // Parameters of other kinds (none in the supported models) start at zero.
                _ => vec![0.0; count],
            };
            values.push(value);
        }
        self.set_values(&values)
    }
}
