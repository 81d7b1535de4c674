//! Writing trained models as diffusers folders (each file written to a temporary name and
//! renamed), and reading the model configs a run starts from (a named preset or a file).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor};
use serde_json::{json, Map, Value};

use crate::files::write_atomically;
use crate::loading::weights::safetensors_bytes;
use crate::loading::config::read_json_object;
use crate::{bail, Error, Result};

/// The diffusers version whose file layout and config keys the exports follow.
pub const DIFFUSERS_VERSION: &str = "0.42.1";

/// Writes `value` as pretty JSON with a final newline (creating the folder).
pub fn write_json(path: &Path, value: &Value) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let mut text = serde_json::to_string_pretty(value).map_err(|e| Error::invalid(e.to_string()))?;
    text.push('\n');
    write_atomically(path, text.as_bytes())
}

/// Writes one model folder: `config.json` (for a diffusers model `_class_name` and
/// `_diffusers_version`, then `config`; for a transformers model, `None`, `config` as it is)
/// and its weights as `weights_file`, the tensors named with `prefix` stripped (only those
/// that have it) and stored as `dtype`.
pub fn write_model_folder(
    dir: &Path,
    class_name: Option<&str>,
    config: &Map<String, Value>,
    weights: &HashMap<String, Tensor>,
    prefix: &str,
    weights_file: &str,
    dtype: DType,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let file_config = match class_name {
        Some(class_name) => {
            let mut map = Map::new();
            map.insert("_class_name".into(), json!(class_name));
            map.insert("_diffusers_version".into(), json!(DIFFUSERS_VERSION));
            map.extend(config.iter().filter(|(key, _)| !key.starts_with('_')).map(|(k, v)| (k.clone(), v.clone())));
            map
        }
        None => config.clone(),
    };
    write_json(&dir.join("config.json"), &Value::Object(file_config))?;
    let mut tensors = HashMap::new();
    for (name, tensor) in weights {
        if let Some(stripped) = name.strip_prefix(prefix) {
            tensors.insert(stripped.to_string(), tensor.to_dtype(dtype)?);
        }
    }
    if tensors.is_empty() {
        bail!("no weights named {prefix}* to write into {}", dir.display());
    }
    write_atomically(&dir.join(weights_file), &safetensors_bytes(&tensors)?)
}

/// A model config for training: `name` is one of `presets` (name, description, JSON) or a
/// diffusers `config.json`. Returns the keys and where they came from (for messages); `what`
/// names the argument `name` came from in the error when it is neither.
pub fn preset_or_file(name: &str, presets: &[(&str, &str, &str)], what: &str) -> Result<(Map<String, Value>, String)> {
    match presets.iter().find(|(preset, ..)| *preset == name) {
        Some((preset, _, text)) => match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(map)) => Ok((map, format!("preset {preset}"))),
            _ => bail!("preset {preset} is not a JSON object"),
        },
        None => {
            let path = Path::new(name);
            if !path.is_file() {
                let names: Vec<&str> = presets.iter().map(|(n, ..)| *n).collect();
                bail!("{what} {name}: neither a preset ({}) nor a JSON file", names.join(", "));
            }
            Ok((read_json_object(path)?, path.display().to_string()))
        }
    }
}

/// The value of `key` in `map` unless it is absent or null.
pub fn stated(map: &Map<String, Value>, key: &str) -> Option<Value> {
    map.get(key).filter(|v| !v.is_null()).cloned()
}

/// Sets `key` to `wanted` unless the config states another value, which is refused (`why`
/// says what needs `wanted`).
pub fn require_key(map: &mut Map<String, Value>, origin: &str, key: &str, wanted: Value, why: &str) -> Result<()> {
    match stated(map, key) {
        Some(value) if value != wanted => {
            bail!("{origin}: `{key}` is {value}, but {why} needs {wanted}")
        }
        _ => {
            map.insert(key.into(), wanted);
            Ok(())
        }
    }
}
