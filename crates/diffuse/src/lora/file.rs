//! Reading one LoRA file: every key classified (lora/keys.rs), the layers' down/up/alpha
//! grouped and checked, and each layer's scale worked out as diffusers' `load_lora_weights`
//! does (diffusers/loaders/peft.py `load_lora_adapter`, utils/peft_utils.py `get_peft_kwargs` /
//! `_create_lora_config`, peft's `LoraLayer.update_layer`):
//!
//! - A file written by `save_lora_weights` with adapter configs (`lora_adapter_metadata` in the
//!   safetensors header, keys `unet.r`, `unet.lora_alpha`, `unet.rank_pattern`, ...) uses them:
//!   scale = lora_alpha / r (lora_alpha / sqrt(r) with `use_rslora`), per-module values from
//!   the patterns, peft's defaults (r 8, lora_alpha 8) for what the config leaves out.
//! - Otherwise each layer's `alpha` (kohya) gives scale = alpha / rank; a layer without one
//!   has scale 1 (alpha = rank), as kohya, AUTOMATIC1111 and diffusers define it. Where a file
//!   gives alphas to some layers only, diffusers gives the others the most common alpha; we
//!   keep kohya's definition (rank), which is what the trainer used. An alpha of 0 also means
//!   rank (kohya's and AUTOMATIC1111's reading; diffusers would scale the layer by 0).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::{Map, Value};

use super::keys::{parse_key, Format, KeyMeaning, Part, Target};
use crate::{Error, Result};

/// One adapted layer: `W += scale · weight · up @ down` (reshaped to W's shape).
#[derive(Clone, Debug)]
pub struct LoraLayer {
    /// The model the layer is in.
    pub target: Target,
    /// The layer as the file names it: a diffusers module path, or kohya's flat name.
    pub module: String,
    /// `[rank, in]`, or `[rank, in, kh, kw]` for a convolution; f32 on the CPU.
    pub down: Tensor,
    /// `[out, rank]` or `[out, rank, 1, 1]`; f32 on the CPU.
    pub up: Tensor,
    /// r, the adapter's rank.
    pub rank: usize,
    /// alpha / rank (or what the adapter config says), before the user's weight.
    pub scale: f64,
    /// The file's keys for this layer.
    pub keys: Vec<String>,
}

impl LoraLayer {
    /// The shape of the weight this layer changes, as `(out, in · kh · kw)`.
    pub fn delta_shape(&self) -> (usize, usize) {
        (self.up.dims()[0], self.down.elem_count() / self.rank)
    }

    /// `factor · scale · up @ down` as a `[out, in · kh · kw]` matrix (peft's `get_delta_weight`:
    /// the product first, then the scale).
    pub fn delta(&self, factor: f64) -> Result<Tensor> {
        let (out, inner) = self.delta_shape();
        let up = self.up.reshape((out, self.rank))?;
        let down = self.down.reshape((self.rank, inner))?;
        Ok((up.matmul(&down)? * (factor * self.scale))?)
    }
}

/// A LoRA file, read and checked.
#[derive(Clone, Debug)]
pub struct LoraFile {
    /// The file read.
    pub path: PathBuf,
    /// The naming conventions its keys follow.
    pub formats: BTreeSet<Format>,
    /// The adapted layers.
    pub layers: Vec<LoraLayer>,
    /// Keys that are no LoRA tensor of an SD 1.x/2.x model, grouped by why.
    pub skipped: BTreeMap<&'static str, Vec<String>>,
    /// Every key of the file.
    pub key_count: usize,
}

/// One layer's tensors while the keys are gathered.
#[derive(Default)]
struct Pieces {
    down: Option<(String, Tensor)>,
    up: Option<(String, Tensor)>,
    alpha: Option<(String, Tensor)>,
}

/// What `save_lora_weights` records of a peft adapter config (`LoraConfig` field names).
#[derive(Debug)]
struct AdapterConfig {
    r: usize,
    lora_alpha: f64,
    rank_pattern: Map<String, Value>,
    alpha_pattern: Map<String, Value>,
    use_rslora: bool,
}


impl LoraFile {
    /// Reads and checks a LoRA `.safetensors` file: a corrupt or truncated file, a layer with
    /// a down matrix but no up matrix (or the reverse), down and up of different ranks, an
    /// alpha that is not one finite number, and non-finite weights are errors naming the key.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // Mapped, not read: only the tensors are copied out (as f32), one at a time.
        // SAFETY: a read-only mapping of a file diffuse does not modify; as with every mmap, the
        // file must not be truncated by another process while it is read.
        let bytes = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let invalid = |message: String| Error::weights(path, message);
        // torch.save writes a zip archive; a safetensors file has its JSON header at byte 8.
        if bytes.starts_with(b"PK\x03\x04") && bytes.get(8) != Some(&b'{') {
            return Err(invalid(
                "a pickle (torch.save) file, which diffuse never loads; convert it to .safetensors (e.g. \
                 `safetensors.torch.save_file(torch.load(f, weights_only=True), out)`)"
                    .into(),
            ));
        }
        // The header is parsed once; it has checked that every tensor lies inside the file.
        let (header_len, metadata) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| invalid(format!("not a valid safetensors file (truncated or corrupt?): {e}")))?;
        let data = &bytes[8 + header_len..];
        let mut tensors = HashMap::new();
        for (name, info) in metadata.tensors() {
            crate::loading::weights::check_shape(path, &name, &info.shape)?;
            let (start, end) = info.data_offsets;
            let tensor = candle_dtype(info.dtype)
                .ok_or_else(|| format!("its dtype {:?} is not one a LoRA is stored in", info.dtype))
                .and_then(|dtype| Tensor::from_raw_buffer(&data[start..end], dtype, &info.shape, &Device::Cpu).map_err(|e| e.to_string()))
                .map_err(|e| invalid(format!("cannot read the tensor `{name}`: {e}")))?;
            tensors.insert(name, tensor);
        }
        let header = metadata.metadata().clone().unwrap_or_default();
        Self::from_tensors(path, tensors, &header)
    }

    /// Builds a LoRA from named tensors and the safetensors header's metadata.
    pub fn from_tensors(path: &Path, tensors: HashMap<String, Tensor>, header: &HashMap<String, String>) -> Result<Self> {
        let invalid = |message: String| Error::weights(path, message);
        if tensors.is_empty() {
            return Err(invalid("holds no tensors".into()));
        }
        let configs = adapter_configs(header).map_err(invalid)?;
        let key_count = tensors.len();
        let mut names: Vec<String> = tensors.keys().cloned().collect();
        names.sort();
        let mut tensors = tensors;

        let mut formats = BTreeSet::new();
        let mut skipped: BTreeMap<&'static str, Vec<String>> = BTreeMap::new();
        let mut pieces: BTreeMap<(Target, String), Pieces> = BTreeMap::new();
        for key in names {
            let (target, module, part) = match parse_key(&key) {
                KeyMeaning::Tensor { owner: target, module, part, format } => {
                    formats.insert(format);
                    (target, module, part)
                }
                KeyMeaning::Skipped(reason) => {
                    skipped.entry(reason).or_default().push(key);
                    continue;
                }
            };
            let Some(tensor) = tensors.remove(&key) else { continue };
            let slot = pieces.entry((target, module.clone())).or_default();
            let place = match part {
                Part::Down => &mut slot.down,
                Part::Up => &mut slot.up,
                Part::Alpha => &mut slot.alpha,
            };
            if let Some((other, _)) = place {
                return Err(invalid(format!("`{other}` and `{key}` are the same tensor of the layer `{module}`")));
            }
            *place = Some((key, tensor));
        }

        let mut layers = Vec::new();
        for ((target, module), piece) in pieces {
            let (down_key, down) = match (piece.down, &piece.up) {
                (Some(down), _) => down,
                (None, Some((up_key, _))) => return Err(invalid(format!("`{up_key}` has no down matrix beside it"))),
                (None, None) => {
                    // An alpha alone adapts nothing.
                    if let Some((alpha_key, _)) = piece.alpha {
                        skipped.entry("alphas of layers the file has no matrices for").or_default().push(alpha_key);
                    }
                    continue;
                }
            };
            let Some((up_key, up)) = piece.up else {
                return Err(invalid(format!("`{down_key}` has no up matrix beside it")));
            };
            let layer = check_layer(target, module, (down_key, down), (up_key, up), piece.alpha, configs.get(&target))
                .map_err(invalid)?;
            layers.push(layer);
        }
        if layers.is_empty() {
            let reasons: Vec<String> =
                skipped.iter().map(|(reason, keys)| format!("{} keys are {reason} (e.g. `{}`)", keys.len(), keys[0])).collect();
            return Err(invalid(format!("holds no LoRA layer diffuse can apply: {}", reasons.join("; "))));
        }
        Ok(LoraFile { path: path.to_path_buf(), formats, layers, skipped, key_count })
    }
}

/// The candle dtype of a safetensors one (the numeric types candle reads).
fn candle_dtype(dtype: safetensors::Dtype) -> Option<DType> {
    use safetensors::Dtype as St;
    Some(match dtype {
        St::U8 => DType::U8,
        St::U32 => DType::U32,
        St::I16 => DType::I16,
        St::I32 => DType::I32,
        St::I64 => DType::I64,
        St::F16 => DType::F16,
        St::BF16 => DType::BF16,
        St::F32 => DType::F32,
        St::F64 => DType::F64,
        _ => return None,
    })
}

/// Checks one layer's tensors and works out its scale.
fn check_layer(
    target: Target,
    module: String,
    (down_key, down): (String, Tensor),
    (up_key, up): (String, Tensor),
    alpha: Option<(String, Tensor)>,
    config: Option<&AdapterConfig>,
) -> std::result::Result<LoraLayer, String> {
    let float = |key: &str, t: Tensor| t.to_dtype(DType::F32).map_err(|e| format!("`{key}`: {e}"));
    let (down, up) = (float(&down_key, down)?, float(&up_key, up)?);
    if !matches!(down.rank(), 2 | 4) {
        return Err(format!("`{down_key}` has shape {:?}; a LoRA down matrix is [rank, in] or [rank, in, kh, kw]", down.dims()));
    }
    let up_is_matrix = up.rank() == 2 || (up.rank() == 4 && up.dims()[2] == 1 && up.dims()[3] == 1);
    if !up_is_matrix {
        return Err(format!("`{up_key}` has shape {:?}; a LoRA up matrix is [out, rank] or [out, rank, 1, 1]", up.dims()));
    }
    let rank = down.dims()[0];
    if rank == 0 || up.dims()[1] != rank {
        return Err(format!(
            "rank mismatch: `{down_key}` has rank {rank} (shape {:?}) but `{up_key}` has rank {} (shape {:?})",
            down.dims(),
            up.dims()[1],
            up.dims()
        ));
    }
    for (key, tensor) in [(&down_key, &down), (&up_key, &up)] {
        if !all_finite(tensor).map_err(|e| format!("`{key}`: {e}"))? {
            return Err(format!("`{key}` holds NaN or infinite values"));
        }
    }
    let mut keys = vec![down_key, up_key];
    let file_alpha = match alpha {
        Some((key, tensor)) => {
            let values = tensor.to_dtype(DType::F64).and_then(|t| t.flatten_all()?.to_vec1::<f64>()).map_err(|e| format!("`{key}`: {e}"))?;
            match values.as_slice() {
                [value] if value.is_finite() => {
                    keys.push(key);
                    Some(*value)
                }
                [value] => return Err(format!("`{key}` is {value}, not a finite number")),
                _ => return Err(format!("`{key}` holds {} values; an alpha is one number", values.len())),
            }
        }
        None => None,
    };
    let scale = match config {
        Some(config) => {
            let r = pattern_value(&config.rank_pattern, &module).map(|v| v as usize).unwrap_or(config.r);
            if r != rank {
                return Err(format!(
                    "the adapter config (lora_adapter_metadata) gives the layer `{module}` rank {r}, but its matrices have rank {rank}"
                ));
            }
            let alpha = pattern_value(&config.alpha_pattern, &module).unwrap_or(config.lora_alpha);
            if config.use_rslora {
                alpha / (r as f64).sqrt()
            } else {
                alpha / r as f64
            }
        }
        None => match file_alpha {
            Some(alpha) if alpha != 0.0 => alpha / rank as f64,
            _ => 1.0,
        },
    };
    Ok(LoraLayer { target, module, down, up, rank, scale, keys })
}

fn all_finite(tensor: &Tensor) -> candle_core::Result<bool> {
    // NaN and ±inf are the values whose absolute value is not below the largest float.
    let finite = tensor.abs()?.le(f32::MAX as f64)?.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
    Ok(finite as usize == tensor.elem_count())
}

/// peft's `get_pattern_key`: a pattern names a module by its whole path or a `.`-separated
/// tail of it (`^` anchors it at the start). Text encoder modules are tried with and without
/// the `text_model.` that transformers 5 leaves out.
fn pattern_value(patterns: &Map<String, Value>, module: &str) -> Option<f64> {
    let bare = module.strip_prefix("text_model.").unwrap_or(module);
    let prefixed = format!("text_model.{bare}");
    patterns.iter().find_map(|(pattern, value)| {
        let matches = |name: &str| match pattern.strip_prefix('^') {
            Some(anchored) => name == anchored,
            None => name == pattern || name.ends_with(&format!(".{pattern}")),
        };
        (matches(bare) || matches(&prefixed)).then(|| value.as_f64()).flatten()
    })
}

/// The adapter configs diffusers' `save_lora_weights` stores in the safetensors header
/// (`lora_adapter_metadata`: a JSON object with keys `unet.r`, `text_encoder.lora_alpha`, ...).
fn adapter_configs(header: &HashMap<String, String>) -> std::result::Result<HashMap<Target, AdapterConfig>, String> {
    let Some(text) = header.get("lora_adapter_metadata") else { return Ok(HashMap::new()) };
    let metadata: Map<String, Value> =
        serde_json::from_str(text).map_err(|e| format!("its lora_adapter_metadata is not a JSON object: {e}"))?;
    let mut configs = HashMap::new();
    for target in Target::ALL {
        let prefix = target.diffusers_prefix();
        let field = |name: &str| metadata.get(&format!("{prefix}.{name}")).filter(|v| !v.is_null());
        if !metadata.keys().any(|k| k.strip_prefix(prefix).is_some_and(|rest| rest.starts_with('.'))) {
            continue;
        }
        let wrong = |name: &str, what: &str| format!("lora_adapter_metadata: `{prefix}.{name}` is not {what}");
        let number = |name: &str, default: f64| match field(name) {
            None => Ok(default),
            Some(v) => v.as_f64().filter(|x| x.is_finite()).ok_or_else(|| wrong(name, "a finite number")),
        };
        let flag = |name: &str| match field(name) {
            None => Ok(false),
            Some(v) => v.as_bool().ok_or_else(|| wrong(name, "true or false")),
        };
        let patterns = |name: &str| match field(name) {
            None => Ok(Map::new()),
            Some(Value::Object(map)) if map.values().all(|v| v.as_f64().is_some_and(f64::is_finite)) => Ok(map.clone()),
            Some(_) => Err(wrong(name, "an object of numbers")),
        };
        if flag("use_dora")? {
            return Err(format!("the {} adapter is DoRA (`{prefix}.use_dora`), which diffuse does not apply", target.label()));
        }
        if flag("lora_bias")? {
            return Err(format!("the {} adapter has LoRA biases (`{prefix}.lora_bias`), which diffuse does not apply", target.label()));
        }
        let r = number("r", 8.0)?;
        if r < 1.0 || r.fract() != 0.0 {
            return Err(wrong("r", "a positive whole number"));
        }
        configs.insert(
            target,
            AdapterConfig {
                r: r as usize,
                lora_alpha: number("lora_alpha", 8.0)?,
                rank_pattern: patterns("rank_pattern")?,
                alpha_pattern: patterns("alpha_pattern")?,
                use_rslora: flag("use_rslora")?,
            },
        );
    }
    Ok(configs)
}
