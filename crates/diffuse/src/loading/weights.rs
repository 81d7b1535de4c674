//! Finding and memory-mapping a component's safetensors weights, as diffusers names them:
//! `diffusion_pytorch_model.safetensors` (or `model.safetensors`), the `.fp16.safetensors`
//! variant, and sharded files listed by a `.safetensors.index.json`.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use crate::{Error, Result};

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
        message.push_str(&format!(" (variant `{v}`; drop --variant to use the full-precision files)"));
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

/// Validates a safetensors file's header and that every tensor lies inside the file.
pub fn check_safetensors(path: &Path) -> Result<()> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: read-only mapping of a file we do not modify.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    safetensors::SafeTensors::deserialize(&mmap).map_err(|e| {
        Error::weights(path, format!("not a valid safetensors file (truncated or corrupt?): {e}"))
    })?;
    Ok(())
}
