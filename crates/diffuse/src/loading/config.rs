//! JSON configs as diffusers writes them (`config.json`, `scheduler_config.json`).
//!
//! Unknown keys are ignored, as diffusers ignores them; a known key with a wrong type is an
//! error that names the file and the key.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::{Error, Result};

/// Reads a JSON file whose top level is an object.
pub fn read_json_object(path: &Path) -> Result<Map<String, Value>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(Error::config(path, "expected a JSON object at the top level")),
        Err(e) => Err(Error::config(path, format!("not valid JSON: {e}"))),
    }
}

/// Deserialises a typed config from a JSON object; `origin` names where it came from in errors.
pub fn parse_config<T: DeserializeOwned>(map: &Map<String, Value>, origin: &Path) -> Result<T> {
    let value = Value::Object(map.clone());
    serde_path_to_error::deserialize(value).map_err(|e| {
        let key = e.path().to_string();
        Error::config(origin, format!("key `{key}`: {}", e.inner()))
    })
}

/// Parses a `KEY=VALUE` override: VALUE is a JSON literal (`true`, `1`, `0.5`, `null`,
/// `"x"`, `[1,2]`) or else a bare string (`trailing`).
pub fn parse_override(text: &str) -> Result<(String, Value)> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| Error::invalid(format!("expected KEY=VALUE, got `{text}`")))?;
    let key = key.trim();
    if key.is_empty() {
        return Err(Error::invalid(format!("empty key in `{text}`")));
    }
    let value = value.trim();
    let value = serde_json::from_str::<Value>(value).unwrap_or_else(|_| Value::String(value.to_string()));
    Ok((key.to_string(), value))
}
