//! LoRA adapters at inference: the files people share (diffusers/PEFT, kohya, diffusers'
//! older attention-processor format), fused into Stable Diffusion's UNet and text encoder as
//! diffusers' `load_lora_weights` + `set_adapters` + `fuse_lora` do, so that sampling costs
//! nothing extra.
//!
//! - [`keys`]: what each key of a file names, and the names writers use ([`keys::kohya_name`],
//!   [`keys::peft_key`]). Layers are matched by their flat name (`.` -> `_`), the form kohya
//!   names them in, so one rule serves every format and reverses for saving.
//! - [`file`](mod@file): one file read and checked (pairs, ranks, alphas, adapter configs, scales).
//! - [`fuse`]: [`LoraSet`], a `VarBuilder` wrapper that adds each LoRA's delta to a weight when
//!   the model reads it, and the report of what was applied.
//!
//! How a pipeline uses them: `StableDiffusionPipeline::load_with_loras` (and
//! `load_single_file_with_loras`) read every file first, wrap the text encoder's and the UNet's
//! weights, build the models, then call [`LoraSet::finish`], which refuses a LoRA that adapted
//! nothing (or that names the model's layers with other shapes) before the pipeline is returned.

pub mod adapters;
pub mod file;
pub mod fuse;
pub mod keys;
pub mod save;

use std::io::Read;
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};

pub use file::{LoraFile, LoraLayer};
pub use fuse::{AppliedLora, LoraSet};
pub use keys::{Format, Target};

use crate::prompts::extra_networks::ExtraNetworkTag;
use crate::{Error, Result};

/// One LoRA to apply and how strongly: diffusers' `set_adapters` weight (a number, or one per
/// component), AUTOMATIC1111's `<lora:name:te_multiplier:unet_multiplier>`.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraSpec {
    /// The LoRA file (`.safetensors`).
    pub path: PathBuf,
    /// The name the LoRA goes by in metadata (AUTOMATIC1111's `Lora hashes`): the prompt tag's
    /// name, else the file's stem.
    pub name: String,
    /// The multiplier on the UNet's layers.
    pub unet_weight: f64,
    /// The multiplier on the text encoders' layers.
    pub text_encoder_weight: f64,
}

impl LoraSpec {
    /// A LoRA at one weight for both models.
    pub fn new(path: impl Into<PathBuf>, weight: f64) -> Self {
        let path = path.into();
        let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        LoraSpec { path, name, unet_weight: weight, text_encoder_weight: weight }
    }

    /// The multiplier for `target`'s layers.
    pub fn weight(&self, target: Target) -> f64 {
        match target {
            Target::Unet => self.unet_weight,
            Target::TextEncoder | Target::TextEncoder2 => self.text_encoder_weight,
        }
    }

    /// `FILE[:WEIGHT]` as `--lora` takes it (weight 1 when absent; a file whose name has a
    /// colon is taken whole when it exists).
    pub fn parse(arg: &str) -> Result<Self> {
        if Path::new(arg).is_file() {
            return Ok(LoraSpec::new(arg, 1.0));
        }
        let Some((file, weight)) = arg.rsplit_once(':') else { return Ok(LoraSpec::new(arg, 1.0)) };
        if file.is_empty() {
            return Err(Error::invalid(format!("`{arg}`: no file before the weight")));
        }
        let weight = parse_weight(weight).map_err(|why| Error::invalid(format!("`{arg}`: the weight `{weight}` {why}")))?;
        Ok(LoraSpec::new(file, weight))
    }

    /// An AUTOMATIC1111 `<lora:NAME[:TE[:UNET]]>` tag (also `te=`, `unet=`; `lyco` is the
    /// same network) as `DIR/NAME.safetensors`: the text-encoder multiplier defaults to 1, the
    /// UNet's to the text encoder's (extensions-builtin/Lora/extra_networks_lora.py).
    pub fn from_tag(tag: &ExtraNetworkTag, lora_dir: Option<&Path>) -> Result<Self> {
        let text = &tag.text;
        let bad = |why: String| Error::invalid(format!("the prompt's {text}: {why}"));
        let name = tag.positional.first().map(|s| s.trim()).filter(|s| !s.is_empty()).ok_or_else(|| bad("no LoRA name".into()))?;
        let number = |value: &str| parse_weight(value).map_err(|why| bad(format!("`{value}` {why}")));
        let mut te = match tag.positional.get(1) {
            Some(value) => number(value)?,
            None => 1.0,
        };
        if let Some(value) = tag.named.get("te") {
            te = number(value)?;
        }
        let mut unet = match tag.positional.get(2) {
            Some(value) => number(value)?,
            None => te,
        };
        if let Some(value) = tag.named.get("unet") {
            unet = number(value)?;
        }
        if tag.positional.len() > 3 || tag.named.contains_key("dyn") {
            return Err(bad("dyn_dim (rank truncation) is not supported by diffuse".into()));
        }
        let dir = lora_dir.ok_or_else(|| bad("LoRAs named in the prompt are looked up in `lora_dir`, which is not given".into()))?;
        let path = path_in_dir(dir, name).map_err(|e| bad(e.to_string()))?;
        if !path.is_file() {
            return Err(bad(format!("{} does not exist", path.display())));
        }
        Ok(LoraSpec { path, name: name.to_string(), unet_weight: unet, text_encoder_weight: te })
    }
}

/// `DIR/NAME.safetensors` for a LoRA known by name (a prompt's `<lora:NAME>` tag, an image's
/// `Diffuse loras`). Such names come from text anyone may have written, so only names of files
/// inside `dir` are accepted: no `..`, no absolute path.
pub fn path_in_dir(dir: &Path, name: &str) -> Result<PathBuf> {
    let inside = !name.is_empty() && Path::new(name).components().all(|c| matches!(c, Component::Normal(_)));
    if !inside {
        return Err(Error::invalid(format!("the LoRA name `{name}` is not the name of a file inside {}", dir.display())));
    }
    Ok(dir.join(format!("{name}.safetensors")))
}

fn parse_weight(text: &str) -> std::result::Result<f64, &'static str> {
    match text.trim().parse::<f64>() {
        Ok(value) if value.is_finite() => Ok(value),
        Ok(_) => Err("is not a finite number"),
        Err(_) => Err("is not a number"),
    }
}

/// A LoRA's short hash as AUTOMATIC1111 records it in `Lora hashes`: the first 12 hex digits
/// of the SHA-256 of a `.safetensors` file's tensor data (the bytes after its header; kohya's
/// `addnet_hash_safetensors`, which AUTOMATIC1111 uses so that editing the metadata keeps the
/// hash). A file's own `sshs_model_hash` metadata, which AUTOMATIC1111 trusts, is not read.
pub fn lora_hash(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut length = [0u8; 8];
    file.read_exact(&mut length).map_err(|e| Error::io(path, e))?;
    std::io::copy(&mut (&mut file).take(u64::from_le_bytes(length)), &mut std::io::sink()).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut HashWriter(&mut hasher)).map_err(|e| Error::io(path, e))?;
    Ok(hasher.finalize().iter().take(6).map(|b| format!("{b:02x}")).collect())
}

struct HashWriter<'a>(&'a mut Sha256);

impl std::io::Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
