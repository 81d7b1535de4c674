//! Checkpoints that survive a crash: each one a folder `checkpoints/checkpoint-NNNNNNN/`
//! holding the weights, the EMA weights, the optimizer's moments, the task's own tensors and
//! `state.json` (step, learning-rate schedule, generator state, data position, settings).
//!
//! A checkpoint is written into a temporary folder, every file synced, and then renamed into
//! place; only then is the `latest` pointer replaced (written to a temporary name and renamed).
//! A run killed, or a disk that fills, at any point leaves `latest` naming a complete
//! checkpoint.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::data::DataPosition;
use super::ema::EmaConfig;
use super::optimizer::{AdamWConfig, LearningRate};
use crate::rng::TorchGeneratorState;
use crate::{bail, Error, Result};

/// The file that names the latest complete checkpoint.
pub const LATEST: &str = "latest";
const STATE_FILE: &str = "state.json";

// Checkpoints are written through the hooks' `WriteFile` (tests inject failures).
pub use crate::files::{write_and_sync, WriteFile};
pub use crate::loading::weights::safetensors_bytes;
use crate::files::{sync_dir, write_atomically_with};

/// Optimizer state beyond the moments (which are tensors).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OptimizerState {
    /// Updates made (torch's `state["step"]`).
    pub step: u64,
    /// The hyper-parameters the moments were built with.
    pub config: AdamWConfig,
}

/// EMA state beyond the shadow weights.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EmaState {
    /// The `step` calls made (`EMAModel.optimization_step`).
    pub optimization_step: u64,
    /// The settings the average was built with.
    pub config: EmaConfig,
}

/// `state.json`: everything but the tensors.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointState {
    /// The optimizer steps done.
    pub step: u64,
    /// The settings a resumed run must share (model config, objective, noise schedule).
    pub identity: Map<String, Value>,
    /// The training generator's state, for the next draws.
    pub generator: TorchGeneratorState,
    /// Where the data loader was.
    pub data_position: DataPosition,
    /// The dataset's size, which a resumed run must match.
    pub dataset_len: usize,
    /// The learning-rate schedule of the run.
    pub learning_rate: LearningRate,
    /// AdamW's step count and settings.
    pub optimizer: OptimizerState,
    /// The EMA's state, when the run keeps one.
    pub ema: Option<EmaState>,
    /// The task's own small state.
    pub task: Value,
}

/// A checkpoint in memory: its state and named tensor sets (`model`, `ema`, `optimizer`,
/// `task`), each one safetensors file.
pub struct Checkpoint {
    /// Everything but the tensors (`state.json`).
    pub state: CheckpointState,
    /// The tensor sets by name, each from its own safetensors file.
    pub tensors: Vec<(String, HashMap<String, Tensor>)>,
}

impl Checkpoint {
    /// The tensor set called `name`, if the checkpoint has one.
    pub fn tensors(&self, name: &str) -> Option<&HashMap<String, Tensor>> {
        self.tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }
}

/// The folder name of the checkpoint at `step`.
pub fn checkpoint_name(step: u64) -> String {
    format!("checkpoint-{step:07}")
}

fn step_of(name: &str) -> Option<u64> {
    name.strip_prefix("checkpoint-")?.parse().ok()
}

/// Writes `checkpoint` as `root/checkpoint-NNNNNNN/` and points `root/latest` at it. On any
/// failure the temporary folder is removed and the previous checkpoint and pointer are
/// untouched.
pub fn save(root: &Path, checkpoint: &Checkpoint, write_file: &mut WriteFile) -> Result<PathBuf> {
    std::fs::create_dir_all(root).map_err(|e| Error::io(root, e))?;
    let name = checkpoint_name(checkpoint.state.step);
    let target = root.join(&name);
    let temporary = root.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&temporary);
    let result = (|| -> Result<()> {
        std::fs::create_dir_all(&temporary).map_err(|e| Error::io(&temporary, e))?;
        for (stem, tensors) in &checkpoint.tensors {
            let path = temporary.join(format!("{stem}.safetensors"));
            write_file(&path, &safetensors_bytes(tensors)?).map_err(|e| Error::io(target.join(format!("{stem}.safetensors")), e))?;
        }
        // state.json last: a folder without it is never taken for a checkpoint.
        let state = serde_json::to_vec_pretty(&checkpoint.state).map_err(|e| Error::invalid(format!("checkpoint state: {e}")))?;
        write_file(&temporary.join(STATE_FILE), &state).map_err(|e| Error::io(target.join(STATE_FILE), e))?;
        sync_dir(&temporary);
        // A checkpoint of the same step from a run that died before updating `latest` is replaced.
        if target.exists() {
            let stale = root.join(format!(".{name}.old-{}", std::process::id()));
            std::fs::rename(&target, &stale).map_err(|e| Error::io(&target, e))?;
            let _ = std::fs::remove_dir_all(&stale);
        }
        std::fs::rename(&temporary, &target).map_err(|e| Error::io(&target, e))?;
        sync_dir(root);
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&temporary);
        return Err(e);
    }
    write_atomically_with(&root.join(LATEST), format!("{name}\n").as_bytes(), write_file)?;
    sync_dir(root);
    Ok(target)
}

/// The checkpoint `root/latest` names, if there is one; without the pointer (a run killed
/// between its first checkpoint's rename and the pointer's), the newest complete checkpoint.
/// A pointer to a missing or incomplete folder is an error (it cannot happen through [`save`]).
pub fn latest(root: &Path) -> Result<Option<PathBuf>> {
    let pointer = root.join(LATEST);
    let name = match std::fs::read_to_string(&pointer) {
        Ok(name) => name.trim().to_string(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(list(root)?.pop().map(|(_, path)| path)),
        Err(e) => return Err(Error::io(&pointer, e)),
    };
    if step_of(&name).is_none() || name.contains(['/', '\\']) {
        bail!("{}: does not name a checkpoint (`{name}`)", pointer.display());
    }
    let dir = root.join(&name);
    if !dir.join(STATE_FILE).is_file() {
        bail!("{}: names {name}, which is missing or incomplete", pointer.display());
    }
    Ok(Some(dir))
}

/// The complete checkpoints under `root`, by step.
pub fn list(root: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut found = Vec::new();
    let entries = match std::fs::read_dir(root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(Error::io(root, e)),
    };
    for entry in entries {
        let path = entry.map_err(|e| Error::io(root, e))?.path();
        let Some(step) = path.file_name().and_then(|n| n.to_str()).and_then(step_of) else { continue };
        if path.join(STATE_FILE).is_file() {
            found.push((step, path));
        }
    }
    found.sort();
    Ok(found)
}

/// Removes what dead runs left behind: temporary checkpoint folders and files.
pub fn remove_stale_temporaries(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && (name.contains(".tmp-") || name.contains(".old-")) {
            let path = entry.path();
            if path.is_dir() {
                let _ = std::fs::remove_dir_all(&path);
            } else {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
}

/// Keeps the newest `keep` checkpoints (and always the one `latest` names); removes the rest.
pub fn prune(root: &Path, keep: usize) -> Result<()> {
    let latest = latest(root)?;
    let all = list(root)?;
    let remove = all.len().saturating_sub(keep.max(1));
    for (_, path) in all.into_iter().take(remove) {
        if Some(&path) != latest.as_ref() {
            std::fs::remove_dir_all(&path).map_err(|e| Error::io(&path, e))?;
        }
    }
    Ok(())
}

/// Reads a checkpoint folder: `state.json` and every `*.safetensors` file in it.
pub fn load(dir: &Path) -> Result<Checkpoint> {
    let state_path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&state_path).map_err(|e| Error::io(&state_path, e))?;
    let state: CheckpointState =
        serde_json::from_str(&text).map_err(|e| Error::config(&state_path, format!("not a valid checkpoint state: {e}")))?;
    let mut tensors = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("safetensors"))
        .collect();
    files.sort();
    for path in files {
        let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let loaded = crate::loading::weights::load_safetensors(&path, &Device::Cpu)
            .map_err(|e| Error::weights(&path, format!("cannot read the checkpoint tensors: {e}")))?;
        tensors.push((stem, loaded));
    }
    Ok(Checkpoint { state, tensors })
}

/// The settings that differ between a checkpoint's identity and the current run's, one
/// `key: checkpoint value, now value` line each (nested objects by dotted keys).
pub fn identity_differences(saved: &Map<String, Value>, current: &Map<String, Value>) -> Vec<String> {
    fn flatten(prefix: &str, map: &Map<String, Value>, out: &mut Vec<(String, Value)>) {
        for (key, value) in map {
            let path = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
            match value {
                Value::Object(inner) => flatten(&path, inner, out),
                other => out.push((path, other.clone())),
            }
        }
    }
    let (mut before, mut now) = (Vec::new(), Vec::new());
    flatten("", saved, &mut before);
    flatten("", current, &mut now);
    let before: std::collections::BTreeMap<_, _> = before.into_iter().collect();
    let now: std::collections::BTreeMap<_, _> = now.into_iter().collect();
    let mut keys: Vec<&String> = before.keys().chain(now.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter_map(|key| {
            let (a, b) = (before.get(key), now.get(key));
            (a != b).then(|| {
                let show = |v: Option<&Value>| v.map(|v| v.to_string()).unwrap_or_else(|| "(absent)".to_string());
                format!("{key}: {} in the checkpoint, {} now", show(a), show(b))
            })
        })
        .collect()
}
