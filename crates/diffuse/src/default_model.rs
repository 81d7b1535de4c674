//! The built-in default model: a small text-to-image pipeline in Stable Diffusion's layout that
//! this project trained with `diffuse train` on Fashion-MNIST (32×32 images; the recipe is
//! `models/fashion-mnist/train.sh`). Its files (`models/fashion-mnist/`, f16 weights) are
//! compiled into the library, so that `diffuse generate --prompt ...` works with no model
//! folder and no network: on first use they are written, each to a temporary name and
//! renamed, into a cache folder named after their hash, and loaded from there like any
//! diffusers folder.
//!
//! The files (21 MB) come with the default-on `builtin-model` feature; a library user who does
//! not need the model can leave them out (`default-features = false`), and [`materialize`]
//! then says so.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// The model's name (its folder's name, as the PNG metadata records it).
pub const NAME: &str = "fashion-mnist";

#[cfg(feature = "builtin-model")]
macro_rules! model_file {
    ($path:literal) => {
        ($path, include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/fashion-mnist/", $path)) as &[u8])
    };
}

/// Every file of the pipeline folder, by its path in the folder.
#[cfg(feature = "builtin-model")]
static FILES: &[(&str, &[u8])] = &[
    model_file!("model_index.json"),
    model_file!("scheduler/scheduler_config.json"),
    model_file!("text_encoder/config.json"),
    model_file!("text_encoder/model.safetensors"),
    model_file!("tokenizer/merges.txt"),
    model_file!("tokenizer/special_tokens_map.json"),
    model_file!("tokenizer/tokenizer_config.json"),
    model_file!("tokenizer/vocab.json"),
    model_file!("unet/config.json"),
    model_file!("unet/diffusion_pytorch_model.safetensors"),
    model_file!("vae/config.json"),
    model_file!("vae/diffusion_pytorch_model.safetensors"),
];

/// Where the files go: `$DIFFUSE_CACHE_DIR`, else `$XDG_CACHE_HOME/diffuse`, else
/// `~/.cache/diffuse`, else the system's temporary folder.
pub fn cache_root() -> PathBuf {
    std::env::var_os("DIFFUSE_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("diffuse")))
        .or_else(|| std::env::var_os("HOME").map(|d| PathBuf::from(d).join(".cache/diffuse")))
        .unwrap_or_else(|| std::env::temp_dir().join("diffuse"))
}

/// Without the `builtin-model` feature there are no files to write.
#[cfg(not(feature = "builtin-model"))]
static FILES: &[(&str, &[u8])] = &[];

/// The Fashion-MNIST classifier behind `diffuse evaluate` (`models/fashion-mnist-classifier/`,
/// 1.4 MB), built in with the model, so that an evaluation finds it from any folder.
pub const CLASSIFIER_NAME: &str = "fashion-mnist-classifier";

#[cfg(feature = "builtin-model")]
static CLASSIFIER_FILES: &[(&str, &[u8])] = &[
    ("config.json", include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/fashion-mnist-classifier/config.json"))),
    ("model.safetensors", include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/fashion-mnist-classifier/model.safetensors"))),
];

#[cfg(not(feature = "builtin-model"))]
static CLASSIFIER_FILES: &[(&str, &[u8])] = &[];

/// The pipeline folder under `root` (`builtin/HASH/fashion-mnist/`), written if it is not
/// there complete.
pub fn materialize(root: &Path) -> Result<PathBuf> {
    if FILES.is_empty() {
        return Err(Error::invalid(
            "this build of diffuse has no built-in model (its `builtin-model` feature is off): give a model folder",
        ));
    }
    write_files(root, NAME, FILES)
}

/// The classifier's folder under `root` (`builtin/HASH/fashion-mnist-classifier/`), written
/// if it is not there complete.
pub fn materialize_classifier(root: &Path) -> Result<PathBuf> {
    if CLASSIFIER_FILES.is_empty() {
        return Err(Error::invalid(
            "this build of diffuse has no built-in classifier (its `builtin-model` feature is off): give a classifier folder",
        ));
    }
    write_files(root, CLASSIFIER_NAME, CLASSIFIER_FILES)
}

/// `files` in `root/builtin/HASH/name/` (the hash of their paths and bytes), each written to
/// a temporary name and renamed unless it is there with its size.
fn write_files(root: &Path, name: &str, files: &[(&str, &[u8])]) -> Result<PathBuf> {
    let mut hasher = Sha256::new();
    for (path, bytes) in files {
        hasher.update(path.as_bytes());
        hasher.update((bytes.len() as u64).to_le_bytes());
        hasher.update(bytes);
    }
    let hash: String = hasher.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect();
    let dir = root.join("builtin").join(hash).join(name);
    for (path, bytes) in files {
        let target = dir.join(path);
        if std::fs::metadata(&target).is_ok_and(|m| m.len() == bytes.len() as u64) {
            continue;
        }
        let parent = target.parent().unwrap_or(&dir);
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        crate::files::write_atomically(&target, bytes)?;
    }
    Ok(dir)
}
