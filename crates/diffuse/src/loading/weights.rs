//! Finding and memory-mapping a component's safetensors weights, as diffusers names them:
//! `diffusion_pytorch_model.safetensors` (or `model.safetensors`), the `.fp16.safetensors`
//! variant, and sharded files listed by a `.safetensors.index.json`.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::{bail, Error, Result};

/// The weight files of one component folder (`unet/`, `vae/`, ...), in load order.
pub fn find_weight_files(folder: &Path, stem: &str, variant: Option<&str>) -> Result<Vec<PathBuf>> {
    let suffix = match variant {
        Some(v) => format!(".{v}.safetensors"),
        None => ".safetensors".to_string(),
    };
    let single = folder.join(format!("{stem}{suffix}"));
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = folder.join(format!("{stem}{suffix}.index.json"));
    if index.is_file() {
        return shards_from_index(&index);
    }
    let mut message = format!("no weights: expected {} or {}", file_name(&single), file_name(&index));
    for pickle in ["bin", "ckpt", "pt", "pth"] {
        let p = folder.join(format!("{stem}.{pickle}"));
        if p.is_file() {
            message.push_str(&format!(
                "; found {}, a pickle file, which diffuse never loads (convert it to safetensors, e.g. with diffusers' `save_pretrained(..., safe_serialization=True)`)",
                file_name(&p)
            ));
        }
    }
    if let Some(v) = variant {
        message.push_str(&format!(" (variant `{v}`; drop the variant to use the full-precision files)"));
    }
    Err(Error::weights(folder, message))
}

fn file_name(p: &Path) -> String {
    p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Reads a sharded checkpoint's index: `{"weight_map": {"tensor": "file-0001-of-0002.safetensors", ...}}`.
fn shards_from_index(index: &Path) -> Result<Vec<PathBuf>> {
    let map = super::config::read_json_object(index)?;
    let weight_map = map
        .get("weight_map")
        .and_then(|v| v.as_object())
        .ok_or_else(|| Error::config(index, "key `weight_map`: missing or not an object"))?;
    let mut files: Vec<String> = weight_map.values().filter_map(|v| v.as_str().map(str::to_string)).collect();
    files.sort();
    files.dedup();
    if files.is_empty() {
        return Err(Error::config(index, "key `weight_map`: lists no files"));
    }
    let folder = index.parent().unwrap_or(Path::new("."));
    files
        .into_iter()
        .map(|f| {
            let p = folder.join(&f);
            if p.is_file() {
                Ok(p)
            } else {
                Err(Error::weights(index, format!("lists shard {f}, which is missing")))
            }
        })
        .collect()
}

/// Memory-maps safetensors files into a `VarBuilder` that converts tensors to `dtype` as they
/// are read ([`super::mapped`]). Each file's header and offsets are checked when it is opened,
/// so a truncated or corrupt file is reported by name rather than deep inside model
/// construction.
pub fn var_builder(files: &[PathBuf], dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
    let tensors = super::mapped::MappedTensors::open(files)?;
    Ok(VarBuilder::from_backend(Box::new(super::mapped::MappedBackend(std::sync::Arc::new(tensors))), dtype, device.clone()))
}

/// Validates a safetensors file's header, that every tensor lies inside the file, and that
/// every shape is one candle can hold ([`check_shape`]).
pub fn check_safetensors(path: &Path) -> Result<()> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: read-only mapping of a file we do not modify.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let tensors = safetensors::SafeTensors::deserialize(&mmap).map_err(|e| {
        Error::weights(path, format!("not a valid safetensors file (truncated or corrupt?): {e}"))
    })?;
    for (name, view) in tensors.iter() {
        check_shape(path, name, view.shape())?;
    }
    Ok(())
}

/// Refuses a tensor shape whose dimensions multiply past `usize`: safetensors accepts one such
/// as `[0, 2^63, 2^63]` (no elements, so no data to check), and candle's stride arithmetic
/// overflows on it (a panic, or in release builds wrong strides).
pub fn check_shape(path: &Path, name: &str, shape: &[usize]) -> Result<()> {
    // Strides are products from the last dimension on, each one computed.
    if shape.iter().rev().try_fold(1usize, |product, &dim| product.checked_mul(dim)).is_none() {
        return Err(Error::weights(path, format!("tensor `{name}` has the shape {shape:?}, whose size overflows")));
    }
    Ok(())
}

/// Every tensor of a safetensors file, read whole after the checks of [`check_safetensors`].
pub fn load_safetensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    check_safetensors(path)?;
    candle_core::safetensors::load(path, device).map_err(|e| Error::weights(path, e.to_string()))
}

/// A tensor's bytes as safetensors stores them (little-endian), for the safetensors crate.
struct HostTensor {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl safetensors::View for &HostTensor {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Serialises named f32 / f64 / f16 / bf16 / u32 / i64 tensors as a safetensors file's bytes, with
/// `{"format": "pt"}` metadata as PyTorch writers add.
pub fn safetensors_bytes(tensors: &HashMap<String, Tensor>) -> Result<Vec<u8>> {
    safetensors_bytes_with_metadata(tensors, HashMap::new())
}

/// [`safetensors_bytes`] with more header metadata (e.g. a LoRA's adapter configs).
pub fn safetensors_bytes_with_metadata(tensors: &HashMap<String, Tensor>, mut metadata: HashMap<String, String>) -> Result<Vec<u8>> {
    let mut host = Vec::with_capacity(tensors.len());
    for (name, tensor) in tensors {
        let flat = tensor.flatten_all()?;
        let (dtype, bytes): (safetensors::Dtype, Vec<u8>) = match tensor.dtype() {
            DType::F32 => (safetensors::Dtype::F32, flat.to_vec1::<f32>()?.iter().flat_map(|v| v.to_le_bytes()).collect()),
            DType::F64 => (safetensors::Dtype::F64, flat.to_vec1::<f64>()?.iter().flat_map(|v| v.to_le_bytes()).collect()),
            DType::F16 => (safetensors::Dtype::F16, flat.to_vec1::<half::f16>()?.iter().flat_map(|v| v.to_le_bytes()).collect()),
            DType::BF16 => (safetensors::Dtype::BF16, flat.to_vec1::<half::bf16>()?.iter().flat_map(|v| v.to_le_bytes()).collect()),
            DType::U32 => (safetensors::Dtype::U32, flat.to_vec1::<u32>()?.iter().flat_map(|v| v.to_le_bytes()).collect()),
            DType::I64 => (safetensors::Dtype::I64, flat.to_vec1::<i64>()?.iter().flat_map(|v| v.to_le_bytes()).collect()),
            other => bail!("cannot write tensor {name} of type {other:?}"),
        };
        host.push((name.clone(), HostTensor { dtype, shape: tensor.dims().to_vec(), bytes }));
    }
    metadata.insert("format".to_string(), "pt".to_string());
    let bytes = safetensors::serialize(host.iter().map(|(name, tensor)| (name.as_str(), tensor)), Some(metadata))
        .map_err(|e| Error::invalid(format!("cannot serialise tensors: {e}")))?;
    sorted_header(bytes)
}

/// The same file with its JSON header's keys sorted: safetensors writes the metadata map in
/// hash order, and the same weights should make the same bytes (checkpoints and exports are
/// compared byte for byte). Data offsets are relative to the data, so only the header moves.
fn sorted_header(bytes: Vec<u8>) -> Result<Vec<u8>> {
    let invalid = || Error::invalid("cannot serialise tensors: malformed header");
    let length = u64::from_le_bytes(bytes.get(..8).and_then(|b| b.try_into().ok()).ok_or_else(invalid)?) as usize;
    let header = bytes.get(8..8 + length).ok_or_else(invalid)?;
    let mut entries: std::collections::BTreeMap<String, serde_json::Value> = serde_json::from_slice(header).map_err(|_| invalid())?;
    if let Some(serde_json::Value::Object(metadata)) = entries.get("__metadata__") {
        let sorted: std::collections::BTreeMap<&String, &serde_json::Value> = metadata.iter().collect();
        let value = serde_json::to_value(sorted).map_err(|_| invalid())?;
        entries.insert("__metadata__".into(), value);
    }
    let mut text = serde_json::to_vec(&entries).map_err(|_| invalid())?;
    text.resize(text.len().next_multiple_of(8), b' ');
    let mut out = Vec::with_capacity(8 + text.len() + bytes.len() - 8 - length);
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[8 + length..]);
    Ok(out)
}
