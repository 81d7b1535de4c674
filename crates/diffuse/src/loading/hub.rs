//! Models named by Hugging Face repo id (`ORG/NAME`), found where huggingface_hub caches them
//! (huggingface_hub/constants.py, file_download.py, _snapshot_download.py) and, when missing,
//! downloaded as diffusers' `DiffusionPipeline.download` would (diffusers/pipelines/
//! pipeline_utils.py, pipeline_loading_utils.py), but safetensors only.
//!
//! The cache layout: `{cache}/models--{org}--{name}/refs/{revision}` holds a commit hash,
//! `snapshots/{hash}/` holds the repo's files (relative symlinks into `blobs/`), and
//! huggingface_hub 1.x and later list each commit's files in `trees/{hash}.json`.

use std::collections::{BTreeSet, HashMap};
use std::path::{Component, Path, PathBuf};

use serde_json::{Map, Value};

use crate::loading::config::read_json_object;
use crate::{Error, Result};

const DEFAULT_REVISION: &str = "main";
const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
const MODEL_INDEX: &str = "model_index.json";

/// Resolves `--model`: an existing path as is, else a repo id through the cache of the process
/// environment's huggingface_hub settings, downloading missing files unless `HF_HUB_OFFLINE`.
pub fn resolve_model(spec: &str, revision: Option<&str>, variant: Option<&str>) -> Result<PathBuf> {
    if Path::new(spec).exists() {
        return Ok(PathBuf::from(spec));
    }
    let env = HubEnv::from_process();
    #[cfg(feature = "download")]
    {
        let fetch = HfHubFetch::new(&env)?;
        resolve_model_with(spec, revision, variant, &env, Some(&fetch))
    }
    #[cfg(not(feature = "download"))]
    resolve_model_with(spec, revision, variant, &env, None)
}

/// Resolves `spec` as [`resolve_model`] does, from the cache only: never downloads (for model
/// names that come from files rather than from the user).
pub fn resolve_model_in_cache(spec: &str, revision: Option<&str>, variant: Option<&str>) -> Result<PathBuf> {
    resolve_model_with(spec, revision, variant, &HubEnv::from_process(), None)
}

/// The huggingface_hub cache folder of the process environment.
pub fn cache_dir() -> Result<PathBuf> {
    HubEnv::from_process().cache_dir()
}

/// The snapshot folder of `revision` (a branch, a tag or a commit hash) of `repo_id` in `cache`,
/// if the cache has one.
pub fn resolve_in_cache(cache: &Path, repo_id: &str, revision: &str) -> Result<Option<PathBuf>> {
    Ok(match lookup_in_cache(cache, repo_id, revision)? {
        CacheLookup::Found { snapshot, .. } => Some(snapshot),
        CacheLookup::NoRef { .. } | CacheLookup::NoSnapshot { .. } => None,
    })
}

// ---------------------------------------------------------------------------------------------
// Settings from the environment

/// The environment variables huggingface_hub reads. Tests build one from a list so that they
/// never touch the process environment (they run in parallel).
pub struct HubEnv {
    vars: Box<dyn Fn(&str) -> Option<String> + Send + Sync>,
    /// `~` when `HOME` is unset (the password database, for the process).
    home_fallback: Option<PathBuf>,
}

impl HubEnv {
    /// The environment of this process (`std::env::var`), `~` falling back to the password
    /// database's home when `HOME` is unset.
    pub fn from_process() -> Self {
        HubEnv { vars: Box::new(|name| std::env::var(name).ok()), home_fallback: std::env::home_dir() }
    }

    /// An environment holding only `vars` (`~` expands to their `HOME`, if any).
    pub fn from_vars<K: Into<String>, V: Into<String>>(vars: impl IntoIterator<Item = (K, V)>) -> Self {
        let vars: HashMap<String, String> = vars.into_iter().map(|(k, v)| (k.into(), v.into())).collect();
        HubEnv { vars: Box::new(move |name| vars.get(name).cloned()), home_fallback: None }
    }

    fn var(&self, name: &str) -> Option<String> {
        (self.vars)(name)
    }

    /// A set, non-empty variable (Python's `os.environ.get(A) or os.environ.get(B)` skips empty ones).
    fn non_empty_var(&self, name: &str) -> Option<String> {
        self.var(name).filter(|value| !value.is_empty())
    }

    /// `HF_HUB_CACHE`, else the older `HUGGINGFACE_HUB_CACHE`, else `{HF_HOME}/hub`, where
    /// `HF_HOME` defaults to `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`. As in
    /// huggingface_hub, `~` and `$VAR` are expanded and a set-but-empty variable counts as set.
    pub fn cache_dir(&self) -> Result<PathBuf> {
        Ok(self.cache_dir_and_origin()?.0)
    }

    /// The cache folder and the variable that decided it, for messages.
    fn cache_dir_and_origin(&self) -> Result<(PathBuf, &'static str)> {
        let (raw, origin) = if let Some(cache) = self.var("HF_HUB_CACHE") {
            (cache, "HF_HUB_CACHE")
        } else if let Some(cache) = self.var("HUGGINGFACE_HUB_CACHE") {
            (cache, "HUGGINGFACE_HUB_CACHE")
        } else {
            let (home, origin) = self.hf_home_and_origin()?;
            (join(&home, "hub"), origin)
        };
        Ok((PathBuf::from(self.expand(&raw)), origin))
    }

    /// huggingface_hub's `HF_HOME` (already expanded), and where it came from.
    fn hf_home_and_origin(&self) -> Result<(String, &'static str)> {
        let (raw, origin) = if let Some(home) = self.var("HF_HOME") {
            (home, "HF_HOME")
        } else if let Some(xdg) = self.var("XDG_CACHE_HOME") {
            (join(&xdg, "huggingface"), "XDG_CACHE_HOME")
        } else {
            let Some(home) = self.home() else {
                return Err(Error::invalid(
                    "cannot find the home directory for the Hugging Face cache: set HF_HOME or HF_HUB_CACHE",
                ));
            };
            (join(&join(&home, ".cache"), "huggingface"), "the default ~/.cache/huggingface/hub")
        };
        Ok((self.expand(&raw), origin))
    }

    /// `HF_TOKEN_PATH`, else `{HF_HOME}/token` (what `hf auth login` writes).
    pub fn token_path(&self) -> Result<PathBuf> {
        let raw = match self.var("HF_TOKEN_PATH") {
            Some(path) => path,
            None => join(&self.hf_home_and_origin()?.0, "token"),
        };
        Ok(PathBuf::from(self.expand(&raw)))
    }

    /// `HF_TOKEN`, else the older `HUGGING_FACE_HUB_TOKEN`, else the token file; blank is none.
    pub fn token(&self) -> Option<String> {
        let from_env = self.non_empty_var("HF_TOKEN").or_else(|| self.non_empty_var("HUGGING_FACE_HUB_TOKEN"));
        if let Some(token) = from_env {
            return clean_token(&token);
        }
        let path = self.token_path().ok()?;
        clean_token(&std::fs::read_to_string(path).ok()?)
    }

    /// `HF_HUB_OFFLINE` (else the older `TRANSFORMERS_OFFLINE`) is 1, ON, YES or TRUE.
    pub fn offline(&self) -> bool {
        let value = self.non_empty_var("HF_HUB_OFFLINE").or_else(|| self.var("TRANSFORMERS_OFFLINE"));
        value.is_some_and(|value| ["1", "ON", "YES", "TRUE"].contains(&value.to_uppercase().as_str()))
    }

    /// `HF_ENDPOINT` (a mirror) or huggingface.co.
    pub fn endpoint(&self) -> String {
        self.var("HF_ENDPOINT").unwrap_or_else(|| DEFAULT_ENDPOINT.to_string()).trim_end_matches('/').to_string()
    }

    fn home(&self) -> Option<String> {
        self.var("HOME").or_else(|| self.home_fallback.as_ref().map(|home| home.to_string_lossy().into_owned()))
    }

    /// Python's `os.path.expandvars(os.path.expanduser(path))`.
    fn expand(&self, path: &str) -> String {
        self.expand_vars(&self.expand_user(path))
    }

    /// `~` and `~/...` become the home folder; `~user` is left alone (no password database here).
    fn expand_user(&self, path: &str) -> String {
        let Some(rest) = path.strip_prefix('~') else { return path.to_string() };
        if !(rest.is_empty() || rest.starts_with('/')) {
            return path.to_string();
        }
        let Some(home) = self.home() else { return path.to_string() };
        let expanded = format!("{}{rest}", home.trim_end_matches('/'));
        if expanded.is_empty() {
            "/".to_string()
        } else {
            expanded
        }
    }

    /// `$NAME` and `${NAME}` of set variables are replaced, others left as they are
    /// (posixpath's `expandvars`: NAME is ASCII letters, digits and `_`, or anything in braces).
    fn expand_vars(&self, path: &str) -> String {
        let mut out = String::new();
        let mut rest = path;
        while let Some(dollar) = rest.find('$') {
            out.push_str(&rest[..dollar]);
            let after = &rest[dollar + 1..];
            let reference = if let Some(braced) = after.strip_prefix('{') {
                braced.find('}').map(|end| (&braced[..end], end + 2))
            } else {
                let end = after.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(after.len());
                (end > 0).then(|| (&after[..end], end))
            };
            match reference {
                Some((name, len)) => {
                    match self.var(name) {
                        Some(value) => out.push_str(&value),
                        None => out.push_str(&rest[dollar..dollar + 1 + len]),
                    }
                    rest = &after[len..];
                }
                None => {
                    out.push('$');
                    rest = after;
                }
            }
        }
        out.push_str(rest);
        out
    }
}

/// Python's `os.path.join(base, name)` for a relative `name`.
fn join(base: &str, name: &str) -> String {
    if base.is_empty() || base.ends_with('/') {
        format!("{base}{name}")
    } else {
        format!("{base}/{name}")
    }
}

fn clean_token(token: &str) -> Option<String> {
    let token = token.replace(['\r', '\n'], "");
    let token = token.trim();
    (!token.is_empty()).then(|| token.to_string())
}

// ---------------------------------------------------------------------------------------------
// Names

/// Why `repo_id` is not a Hub repo id (huggingface_hub's `validate_repo_id`), if it is not.
fn repo_id_problem(repo_id: &str) -> Option<&'static str> {
    let is_word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let part_ok = |part: &str| {
        (1..=96).contains(&part.len())
            && part.chars().all(|c| is_word(c) || c == '-' || c == '.')
            && part.starts_with(is_word)
            && part.ends_with(is_word)
    };
    let parts: Vec<&str> = repo_id.split('/').collect();
    if parts.len() > 2 {
        Some("a repo id is NAME or ORG/NAME, with at most one `/`")
    } else if !parts.iter().all(|part| part_ok(part)) {
        Some(
            "a repo id uses letters, digits, `-`, `_` and `.`, does not start or end with `-` or `.`, \
             and each part is at most 96 characters",
        )
    } else if repo_id.contains("--") || repo_id.contains("..") {
        Some("a repo id cannot contain `--` or `..`")
    } else if repo_id.ends_with(".git") {
        Some("a repo id cannot end with `.git`")
    } else {
        None
    }
}

/// A revision is a path under `refs/` (`main`, `v1.0`, `refs/pr/1`): nothing that leaves it.
fn revision_problem(revision: &str) -> Option<&'static str> {
    let escapes = Path::new(revision).components().any(|c| !matches!(c, Component::Normal(_)));
    if revision.is_empty() || revision.contains(['\\', '\0']) || escapes {
        Some("a revision is a branch, a tag or a commit hash, not a path with `..`, `.`, `\\` or a leading `/`")
    } else {
        None
    }
}

/// A relative path inside a repo, as the Hub lists them (huggingface_hub's
/// `_validate_relative_filename`): never absolute, never `..`.
fn is_safe_repo_path(path: &str) -> bool {
    !path.is_empty()
        && !path.contains(['\\', '\0'])
        && Path::new(path).components().all(|c| matches!(c, Component::Normal(_)))
}

/// Whether `revision` is a full commit hash: 40 lowercase hex digits (huggingface_hub's
/// `REGEX_COMMIT_HASH`), used as the snapshot folder's name with no ref to read.
pub fn is_commit_hash(revision: &str) -> bool {
    revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// `models--{org}--{name}`, huggingface_hub's `repo_folder_name` for a model repo.
pub fn repo_folder_name(repo_id: &str) -> String {
    format!("models--{}", repo_id.replace('/', "--"))
}

// ---------------------------------------------------------------------------------------------
// Reading the cache

/// Where a revision of a repo is in the cache, or which step of the lookup found nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheLookup {
    /// The revision's snapshot folder exists.
    Found {
        /// The full commit hash the revision resolves to.
        commit: String,
        /// `snapshots/{commit}` in the repo's cache folder.
        snapshot: PathBuf,
    },
    /// `revision` is a name and `refs/{revision}` does not exist (nor, maybe, the repo folder).
    NoRef {
        /// The `refs/{revision}` file that was looked for.
        ref_path: PathBuf,
    },
    /// The commit is known but `snapshots/{commit}` does not exist.
    NoSnapshot {
        /// The commit the ref (or the revision itself) names.
        commit: String,
        /// The `snapshots/{commit}` folder that was looked for.
        snapshot: PathBuf,
    },
}

/// Looks `revision` of `repo_id` up in `cache` as huggingface_hub's `try_to_load_from_cache`
/// does: a commit hash is used as is, a name is read from `refs/`.
pub fn lookup_in_cache(cache: &Path, repo_id: &str, revision: &str) -> Result<CacheLookup> {
    if let Some(problem) = repo_id_problem(repo_id) {
        return Err(Error::invalid(format!("`{repo_id}` is not a Hugging Face repo id: {problem}")));
    }
    if let Some(problem) = revision_problem(revision) {
        return Err(Error::invalid(format!("revision `{revision}`: {problem}")));
    }
    let repo_dir = cache.join(repo_folder_name(repo_id));
    let commit = if is_commit_hash(revision) {
        revision.to_string()
    } else {
        let ref_path = repo_dir.join("refs").join(revision);
        if !ref_path.is_file() {
            return Ok(CacheLookup::NoRef { ref_path });
        }
        let text = std::fs::read_to_string(&ref_path).map_err(|e| Error::io(&ref_path, e))?;
        let commit = text.trim();
        if !is_commit_hash(commit) {
            return Err(Error::config(&ref_path, format!("holds `{commit}`, not a commit hash")));
        }
        commit.to_string()
    };
    let snapshot = repo_dir.join("snapshots").join(&commit);
    Ok(if snapshot.is_dir() {
        CacheLookup::Found { commit, snapshot }
    } else {
        CacheLookup::NoSnapshot { commit, snapshot }
    })
}

/// The files of `commit` from the listing huggingface_hub keeps in `trees/{commit}.json`, when it
/// is there and readable (huggingface_hub ignores a listing it cannot read, and so do we).
pub fn cached_tree_listing(repo_dir: &Path, commit: &str) -> Option<Vec<String>> {
    let path = repo_dir.join("trees").join(format!("{commit}.json"));
    let tree = read_json_object(&path).ok()?;
    if tree.get("format_version").and_then(Value::as_u64) != Some(1) {
        return None;
    }
    Some(tree.get("files")?.as_object()?.keys().cloned().collect())
}

// ---------------------------------------------------------------------------------------------
// Which files a pipeline needs

/// The weight file names diffusers and transformers save, without extension
/// (`diffusion_pytorch_model`, `model`, ONNX's external `weights`, `pytorch_model`).
const WEIGHT_PREFIXES: [&str; 4] = ["diffusion_pytorch_model", "model", "weights", "pytorch_model"];
/// What marks a component folder as holding a model (diffusers' `filter_model_files`, plus the
/// pickle and Flax formats that we never fetch from any folder).
const WEIGHT_EXTENSIONS: [&str; 10] =
    [".safetensors", ".bin", ".onnx", ".pb", ".flashpack", ".msgpack", ".ckpt", ".pt", ".pth", ".h5"];
const SAFETENSORS: &str = ".safetensors";

/// The files of a repo that a diffusers pipeline needs, given its `model_index.json` and the
/// list of the repo's files: `model_index.json`; for each model component folder its
/// `config.json` and safetensors weights (the `variant` ones where that component has them,
/// sharded or not, with their index); every file of the other component folders (scheduler,
/// tokenizer, ...) except weights. Never `.bin`, `.ckpt` or other pickles.
pub fn pipeline_files(
    repo_id: &str,
    model_index: &Map<String, Value>,
    repo_files: &[String],
    variant: Option<&str>,
) -> Result<Vec<String>> {
    // diffusers drops `_ignore_files` from the listing before anything else.
    let ignored: BTreeSet<&str> = match model_index.get("_ignore_files") {
        Some(Value::Array(names)) => names.iter().filter_map(Value::as_str).collect(),
        _ => BTreeSet::new(),
    };
    let files: Vec<&str> = repo_files.iter().map(String::as_str).filter(|f| !ignored.contains(f)).collect();

    let mut needed = BTreeSet::from([MODEL_INDEX.to_string()]);
    let mut found_variant = false;
    for (folder, _) in component_folders(model_index) {
        let prefix = format!("{folder}/");
        let in_folder: Vec<&str> = files.iter().filter_map(|f| f.strip_prefix(&prefix)).collect();
        // Only the folder's own files count as its weights (diffusers' `model_folder_names`).
        let direct: Vec<&str> = in_folder.iter().copied().filter(|f| !f.contains('/')).collect();
        if direct.iter().any(|f| has_weight_extension(f)) {
            let weights = select_safetensors(&direct, variant);
            if weights.names.is_empty() {
                return Err(Error::invalid(format!(
                    "component `{folder}` of {repo_id} has no safetensors weights{} (its files: {}); \
                     diffuse reads only .safetensors",
                    variant.map(|v| format!(" (variant `{v}` or plain)")).unwrap_or_default(),
                    direct.join(", ")
                )));
            }
            found_variant |= weights.is_variant;
            if direct.contains(&"config.json") {
                needed.insert(format!("{prefix}config.json"));
            }
            needed.extend(weights.names.into_iter().map(|name| format!("{prefix}{name}")));
        } else {
            needed.extend(in_folder.iter().filter(|f| !has_weight_extension(f)).map(|f| format!("{prefix}{f}")));
        }
    }
    if let Some(variant) = variant {
        if !found_variant {
            return Err(Error::invalid(format!(
                "{repo_id} has no `{variant}` variant weights (files like \
                 unet/diffusion_pytorch_model.{variant}.safetensors); leave out the variant to load the plain ones"
            )));
        }
    }
    Ok(needed.into_iter().collect())
}

/// The component folders a `model_index.json` names: every key whose value is a list
/// (`"unet": ["diffusers", "UNet2DConditionModel"]`), skipping `_class_name` and other `_` keys.
fn component_folders(model_index: &Map<String, Value>) -> impl Iterator<Item = (&str, &Value)> {
    model_index
        .iter()
        .filter(|(key, value)| !key.starts_with('_') && value.is_array())
        .map(|(key, value)| (key.as_str(), value))
}

fn has_weight_extension(name: &str) -> bool {
    WEIGHT_EXTENSIONS.iter().any(|ext| name.ends_with(ext))
}

struct SelectedWeights {
    names: Vec<String>,
    is_variant: bool,
}

/// diffusers' `variant_compatible_siblings` for one component folder, restricted to safetensors:
/// with a variant, its files (`model.fp16.safetensors`, `model.fp16-00001-of-00002.safetensors`
/// and their `model.safetensors.index.fp16.json`) if the folder has any, else the legacy variant
/// layout (`model-00001-of-00002.fp16.safetensors`, `model.safetensors.fp16.index.json`), else
/// the plain files (`model.safetensors`, `model-00001-of-00002.safetensors`,
/// `model.safetensors.index.json`).
fn select_safetensors(names: &[&str], variant: Option<&str>) -> SelectedWeights {
    let pick = |keep: &dyn Fn(&str) -> bool| -> Vec<String> {
        names.iter().copied().filter(|name| keep(name)).map(str::to_string).collect()
    };
    let index_named =
        |pattern: &dyn Fn(&str) -> String| pick(&|name| WEIGHT_PREFIXES.iter().any(|p| name == pattern(p)));
    if let Some(variant) = variant {
        // `{prefix}.{variant}.safetensors`, `{prefix}.{variant}-00001-of-00002.safetensors`
        let files = pick(&|name| {
            let Some(stem) = name.strip_suffix(SAFETENSORS) else { return false };
            WEIGHT_PREFIXES.iter().any(|prefix| {
                let tail =
                    stem.strip_prefix(prefix).and_then(|s| s.strip_prefix('.')).and_then(|s| s.strip_prefix(variant));
                tail.is_some_and(is_empty_or_shard_tag)
            })
        });
        if !files.is_empty() {
            let index = index_named(&|prefix| format!("{prefix}.safetensors.index.{variant}.json"));
            return SelectedWeights { names: [files, index].concat(), is_variant: true };
        }
        // The legacy `anything-00001-of-00002.{variant}.safetensors`.
        let legacy_suffix = format!(".{variant}{SAFETENSORS}");
        let files = pick(&|name| name.strip_suffix(&legacy_suffix).is_some_and(ends_with_shard_tag));
        if !files.is_empty() {
            let index = index_named(&|prefix| format!("{prefix}.safetensors.{variant}.index.json"));
            return SelectedWeights { names: [files, index].concat(), is_variant: true };
        }
    }
    // `{prefix}.safetensors`, `{prefix}-00001-of-00002.safetensors`
    let files = pick(&|name| {
        let Some(stem) = name.strip_suffix(SAFETENSORS) else { return false };
        WEIGHT_PREFIXES.iter().any(|prefix| stem.strip_prefix(prefix).is_some_and(is_empty_or_shard_tag))
    });
    let index = index_named(&|prefix| format!("{prefix}.safetensors.index.json"));
    SelectedWeights { names: [files, index].concat(), is_variant: false }
}

/// `00001-of-00002`: five digits, `-of-`, five digits.
fn is_shard_tag(tag: &str) -> bool {
    let digits = |s: &str| s.len() == 5 && s.bytes().all(|b| b.is_ascii_digit());
    tag.len() == 14
        && tag.is_char_boundary(5)
        && tag.is_char_boundary(9)
        && digits(&tag[..5])
        && &tag[5..9] == "-of-"
        && digits(&tag[9..])
}

/// Nothing, or `-00001-of-00002`.
fn is_empty_or_shard_tag(tail: &str) -> bool {
    tail.is_empty() || tail.strip_prefix('-').is_some_and(is_shard_tag)
}

/// `...-00001-of-00002`.
fn ends_with_shard_tag(stem: &str) -> bool {
    stem.len() >= 15 && stem.is_char_boundary(stem.len() - 15) && {
        let tail = &stem[stem.len() - 15..];
        tail.strip_prefix('-').is_some_and(is_shard_tag)
    }
}

/// What a snapshot misses for a pipeline when the repo's file list is not known: judged from
/// the snapshot itself (each component folder there, none of its files a symlink to a deleted
/// blob; model folders, those with a `config.json` or weights, with loadable safetensors and
/// every shard their index names).
fn missing_from_snapshot(snapshot: &Path, variant: Option<&str>) -> Result<Vec<String>> {
    let index_path = snapshot.join(MODEL_INDEX);
    if !index_path.is_file() {
        return Ok(vec![MODEL_INDEX.to_string()]);
    }
    let model_index = read_json_object(&index_path)?;
    let mut missing = Vec::new();
    let mut found_variant = false;
    for (folder, class) in component_folders(&model_index) {
        // `[null, null]` is a component the pipeline was saved without.
        if !class.get(0).is_some_and(Value::is_string) {
            continue;
        }
        let dir = snapshot.join(folder);
        let (mut names, mut dangling) = (Vec::new(), Vec::new());
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let Ok(name) = entry.file_name().into_string() else { continue };
            if entry.path().is_file() {
                names.push(name);
            } else if entry.file_type().is_ok_and(|kind| kind.is_symlink()) {
                // Its blob is gone.
                dangling.push(format!("{folder}/{name}"));
            }
        }
        missing.extend(dangling);
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        if names.is_empty() {
            missing.push(format!("{folder}/"));
        } else if names.contains(&"config.json") || names.iter().any(|name| has_weight_extension(name)) {
            if !names.contains(&"config.json") {
                missing.push(format!("{folder}/config.json"));
            }
            let weights = select_safetensors(&names, variant);
            found_variant |= weights.is_variant;
            if weights.names.is_empty() {
                missing.push(format!("{folder}/*.safetensors"));
            }
            for index in weights.names.iter().filter(|name| name.ends_with(".json")) {
                for shard in shards_named_in_index(&dir.join(index))? {
                    if !dir.join(&shard).is_file() {
                        missing.push(format!("{folder}/{shard}"));
                    }
                }
            }
        }
    }
    if let Some(variant) = variant {
        if !found_variant {
            missing.push(format!("*/*.{variant}.safetensors"));
        }
    }
    Ok(missing)
}

/// The shard files a `*.safetensors.index.json` maps tensors to.
fn shards_named_in_index(path: &Path) -> Result<BTreeSet<String>> {
    let index = read_json_object(path)?;
    let Some(Value::Object(weight_map)) = index.get("weight_map") else {
        return Err(Error::config(path, "no `weight_map` object"));
    };
    let shards: BTreeSet<String> = weight_map.values().filter_map(Value::as_str).map(str::to_string).collect();
    if let Some(bad) = shards.iter().find(|shard| !is_safe_repo_path(shard) || shard.contains('/')) {
        return Err(Error::config(path, format!("`weight_map` names `{bad}`, not a file beside the index")));
    }
    Ok(shards)
}

// ---------------------------------------------------------------------------------------------
// Downloading

/// A repo's files at one commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoListing {
    /// The full commit hash the revision resolved to (the Hub's `sha`).
    pub commit: String,
    /// Every file's path in the repo, relative to its root (the Hub's `siblings[].rfilename`).
    pub files: Vec<String>,
}

/// What resolving needs from the Hub. The real one is [`HfHubFetch`]; tests pass a fake.
pub trait Fetch {
    /// The commit `revision` points at, and the repo's files there.
    fn list_files(&self, repo_id: &str, revision: &str) -> Result<RepoListing>;
    /// Puts `filename` of `commit` into the cache at `snapshots/{commit}/{filename}`.
    fn download(&self, repo_id: &str, commit: &str, filename: &str) -> Result<()>;
}

/// Resolves `spec` as [`resolve_model`] does, with the given settings and Hub access (`None`:
/// this build cannot download).
///
/// An existing path is returned as is. A repo id is looked up in the cache; a snapshot that
/// holds what the pipeline needs is used without touching the network (judged from
/// huggingface_hub's `trees/` listing when there is one, else from the snapshot's own folders).
/// Otherwise, unless offline, the missing files are downloaded into the cache, pinned to the
/// commit the revision points at, and `refs/{revision}` is updated as huggingface_hub does.
/// Offline, or when the Hub cannot be reached, a snapshot is used as it is unless its listing
/// shows files missing (as huggingface_hub's `snapshot_download` does).
pub fn resolve_model_with(
    spec: &str,
    revision: Option<&str>,
    variant: Option<&str>,
    env: &HubEnv,
    fetch: Option<&dyn Fetch>,
) -> Result<PathBuf> {
    if Path::new(spec).exists() {
        return Ok(PathBuf::from(spec));
    }
    if let Some(problem) = repo_id_problem(spec) {
        return Err(Error::invalid(format!(
            "`{spec}` is neither an existing path nor a Hugging Face repo id like \
             stable-diffusion-v1-5/stable-diffusion-v1-5 ({problem})"
        )));
    }
    let repo_id = spec;
    let revision = revision.unwrap_or(DEFAULT_REVISION);
    let (cache, cache_origin) = env.cache_dir_and_origin()?;
    let repo_dir = cache.join(repo_folder_name(repo_id));
    let lookup = lookup_in_cache(&cache, repo_id, revision)?;

    let offline = env.offline();
    let fetch = fetch.filter(|_| !offline);
    let advice = || cannot_download_advice(repo_id, revision, offline);
    // The snapshot to fall back on if the Hub cannot be reached.
    let mut fallback = None;
    if let CacheLookup::Found { commit, snapshot } = &lookup {
        let tree_listing = cached_tree_listing(&repo_dir, commit);
        if tree_listing.is_none() {
            fallback = Some(snapshot.clone());
        }
        let missing = match tree_listing {
            Some(files) if snapshot.join(MODEL_INDEX).is_file() => {
                let model_index = read_json_object(&snapshot.join(MODEL_INDEX))?;
                let needed = pipeline_files(repo_id, &model_index, &files, variant)?;
                needed.into_iter().filter(|name| !snapshot.join(name).is_file()).collect()
            }
            Some(_) => vec![MODEL_INDEX.to_string()],
            // Without a listing, offline takes the snapshot as it is, as huggingface_hub does.
            None if fetch.is_none() => Vec::new(),
            None => missing_from_snapshot(snapshot, variant)?,
        };
        if missing.is_empty() {
            return Ok(snapshot.clone());
        }
        if fetch.is_none() {
            return Err(Error::invalid(format!(
                "the cached snapshot of {repo_id} (revision `{revision}`, commit {commit}) at {} lacks {} file(s) \
                 the pipeline needs: {}. {}",
                snapshot.display(),
                missing.len(),
                sample(&missing),
                advice()
            )));
        }
    }
    let Some(fetch) = fetch else {
        let absent = match &lookup {
            CacheLookup::NoRef { .. } if !repo_dir.exists() => repo_dir.clone(),
            CacheLookup::NoRef { ref_path } => ref_path.clone(),
            CacheLookup::NoSnapshot { snapshot, .. } | CacheLookup::Found { snapshot, .. } => snapshot.clone(),
        };
        return Err(Error::invalid(format!(
            "`{repo_id}` is not a local path, and revision `{revision}` of the Hugging Face repo {repo_id} \
             is not in the cache at {} (from {cache_origin}): there is no {}. {}",
            cache.display(),
            absent.display(),
            advice()
        )));
    };
    download_pipeline(fetch, &repo_dir, repo_id, revision, variant, fallback)
}

/// Lists the repo at `revision`, then fetches what the pipeline needs and the snapshot lacks.
fn download_pipeline(
    fetch: &dyn Fetch,
    repo_dir: &Path,
    repo_id: &str,
    revision: &str,
    variant: Option<&str>,
    fallback: Option<PathBuf>,
) -> Result<PathBuf> {
    let context = |e: Error| {
        Error::invalid(format!(
            "{repo_id} (revision `{revision}`) is missing or incomplete in the Hugging Face cache at {}, and \
             downloading it failed: {e}. If the repo is private or gated, set HF_TOKEN or log in with `hf auth login`; \
             to use only the cache, set HF_HUB_OFFLINE=1.",
            repo_dir.parent().unwrap_or(repo_dir).display()
        ))
    };
    let listing = match (fetch.list_files(repo_id, revision), fallback) {
        (Ok(listing), _) => listing,
        // As huggingface_hub does when the Hub is unreachable: the cached snapshot, as it is.
        (Err(_), Some(snapshot)) => return Ok(snapshot),
        (Err(e), None) => return Err(context(e)),
    };
    if !is_commit_hash(&listing.commit) {
        return Err(Error::invalid(format!(
            "the Hub gave `{}` as the commit of {repo_id}, not a commit hash",
            listing.commit
        )));
    }
    if !listing.files.iter().any(|f| f == MODEL_INDEX) {
        return Err(Error::invalid(format!(
            "{repo_id} (revision `{revision}`) has no {MODEL_INDEX}: it is not a diffusers pipeline"
        )));
    }
    let snapshot = repo_dir.join("snapshots").join(&listing.commit);
    let fetch_missing = |name: &str| -> Result<()> {
        if !is_safe_repo_path(name) {
            return Err(Error::invalid(format!("the Hub listed `{name}` in {repo_id}, not a relative path")));
        }
        let path = snapshot.join(name);
        if !path.is_file() {
            // A symlink whose blob was deleted would stop the new one being made.
            if path.symlink_metadata().is_ok_and(|meta| meta.is_symlink()) {
                std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
            }
            fetch.download(repo_id, &listing.commit, name).map_err(context)?;
            if !snapshot.join(name).is_file() {
                return Err(Error::invalid(format!(
                    "downloaded {name} of {repo_id} but it is not at {}",
                    snapshot.join(name).display()
                )));
            }
        }
        Ok(())
    };
    fetch_missing(MODEL_INDEX)?;
    let model_index = read_json_object(&snapshot.join(MODEL_INDEX))?;
    for name in pipeline_files(repo_id, &model_index, &listing.files, variant)? {
        fetch_missing(&name)?;
    }
    if revision != listing.commit {
        cache_ref(repo_dir, revision, &listing.commit)?;
    }
    Ok(snapshot)
}

/// Points `refs/{revision}` at `commit`, writing only when it changes (huggingface_hub's
/// `_cache_commit_hash_for_specific_revision`); written beside and renamed so that readers
/// never see a half-written ref.
fn cache_ref(repo_dir: &Path, revision: &str, commit: &str) -> Result<()> {
    let ref_path = repo_dir.join("refs").join(revision);
    if std::fs::read_to_string(&ref_path).is_ok_and(|current| current.trim() == commit) {
        return Ok(());
    }
    let parent = ref_path.parent().unwrap_or(repo_dir);
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    crate::files::write_atomically(&ref_path, commit.as_bytes())
}

fn sample(names: &[String]) -> String {
    let mut text = names.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
    if names.len() > 5 {
        text.push_str(&format!(", ... ({} more)", names.len() - 5));
    }
    text
}

/// How to get a repo into the cache when diffuse may not download it.
fn cannot_download_advice(repo_id: &str, revision: &str, offline: bool) -> String {
    let revision_flag = if revision == DEFAULT_REVISION { String::new() } else { format!(" --revision {revision}") };
    let command = format!(
        "`hf download {repo_id}{revision_flag} --include \"*.json\" \"*.txt\" \"*/*.safetensors\"` \
         (`huggingface-cli download` in huggingface_hub before 1.0)"
    );
    if !offline {
        format!(
            "This diffuse was built without the `download` feature, so it cannot download; \
             download it with {command}, or give a local folder instead of the repo id."
        )
    } else {
        format!(
            "Nothing was downloaded because HF_HUB_OFFLINE is set. To fix, unset HF_HUB_OFFLINE so that \
             diffuse downloads it, or download it with {command}."
        )
    }
}

/// Downloads with the hf-hub crate (blocking ureq over rustls), into the same cache layout.
#[cfg(feature = "download")]
pub struct HfHubFetch {
    cache: PathBuf,
    endpoint: String,
    token: Option<String>,
    api: std::cell::OnceCell<hf_hub::api::sync::Api>,
}

#[cfg(feature = "download")]
impl HfHubFetch {
    /// Settings from `env`; nothing touches the network until a file is asked for.
    pub fn new(env: &HubEnv) -> Result<Self> {
        Ok(HfHubFetch {
            cache: env.cache_dir()?,
            endpoint: env.endpoint(),
            token: env.token(),
            api: Default::default(),
        })
    }

    fn repo(&self, repo_id: &str, revision: &str) -> Result<hf_hub::api::sync::ApiRepo> {
        use hf_hub::api::sync::ApiBuilder;
        let api = match self.api.get() {
            Some(api) => api,
            None => {
                let api = ApiBuilder::from_cache(hf_hub::Cache::new(self.cache.clone()))
                    .with_endpoint(self.endpoint.clone())
                    .with_token(self.token.clone())
                    .with_progress(true)
                    .with_retries(2)
                    .build()
                    .map_err(|e| Error::invalid(format!("cannot set up downloads: {e}")))?;
                self.api.get_or_init(|| api)
            }
        };
        let repo = hf_hub::Repo::with_revision(repo_id.to_string(), hf_hub::RepoType::Model, revision.to_string());
        Ok(api.repo(repo))
    }
}

#[cfg(feature = "download")]
impl Fetch for HfHubFetch {
    fn list_files(&self, repo_id: &str, revision: &str) -> Result<RepoListing> {
        let info = self.repo(repo_id, revision)?.info().map_err(|e| {
            Error::invalid(format!("listing {repo_id} at revision `{revision}` on {}: {e}", self.endpoint))
        })?;
        Ok(RepoListing { commit: info.sha, files: info.siblings.into_iter().map(|s| s.rfilename).collect() })
    }

    fn download(&self, repo_id: &str, commit: &str, filename: &str) -> Result<()> {
        // hf-hub also writes `refs/{commit}` when asked for a commit; huggingface_hub never does.
        let stray_ref = self.cache.join(repo_folder_name(repo_id)).join("refs").join(commit);
        let had_ref = stray_ref.exists();
        let result = self.repo(repo_id, commit)?.download(filename);
        if !had_ref {
            let _ = std::fs::remove_file(&stray_ref);
        }
        let pointer = result.map_err(|e| {
            Error::invalid(format!("downloading {filename} of {repo_id} (commit {commit}) from {}: {e}", self.endpoint))
        })?;
        // hf-hub leaves its lock file beside the blob; huggingface_hub keeps locks out of the repo
        // folder (in `.locks/`), so `hf cache` would take it for a stray blob.
        if let Ok(blob) = std::fs::canonicalize(&pointer) {
            let _ = std::fs::remove_file(blob.with_extension("lock"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> HubEnv {
        HubEnv::from_vars(vars.iter().copied())
    }

    #[test]
    fn expands_like_python_expandvars_and_expanduser() {
        let env = env(&[("HOME", "/home/u/"), ("A", "x"), ("B_2", "y")]);
        assert_eq!(env.expand("~"), "/home/u");
        assert_eq!(env.expand("~/c"), "/home/u/c");
        assert_eq!(env.expand("~other/c"), "~other/c");
        assert_eq!(env.expand("a~/c"), "a~/c");
        assert_eq!(env.expand("$A/${B_2}/$A$A"), "x/y/xx");
        assert_eq!(env.expand("$UNSET/${UNSET}/$"), "$UNSET/${UNSET}/$");
        assert_eq!(env.expand("${A/$A"), "${A/x");
        assert_eq!(env.expand("$A-z.$B_2"), "x-z.y");
        assert_eq!(env.expand("~/$A"), "/home/u/x");
        assert_eq!(HubEnv::from_vars([("HOME", "/")]).expand("~"), "/");
    }

    #[test]
    fn repo_ids_as_huggingface_hub_validates_them() {
        for good in ["google/ddpm-cat-256", "stable-diffusion-v1-5/stable-diffusion-v1-5", "gpt2", "a_b/c.d-e", "x/1"] {
            assert_eq!(repo_id_problem(good), None, "{good}");
        }
        for bad in
            ["", "a/b/c", "/abs", "a/", "-a/b", "a/b-", "a/.b", "a--b/c", "a/b..c", "a/b.git", "a b/c", "é/x", "./x"]
        {
            assert!(repo_id_problem(bad).is_some(), "{bad}");
        }
        assert!(repo_id_problem(&"a".repeat(97)).is_some());
        assert!(repo_id_problem(&format!("{}/{}", "a".repeat(96), "b".repeat(96))).is_none());
    }

    #[test]
    fn revisions_stay_under_refs() {
        for good in ["main", "v1.0", "refs/pr/1", "fp16"] {
            assert_eq!(revision_problem(good), None, "{good}");
        }
        for bad in ["", "../x", "a/../../b", "/etc/passwd", "./main", "a\\b"] {
            assert!(revision_problem(bad).is_some(), "{bad}");
        }
        assert!(is_commit_hash("0123456789abcdef0123456789abcdef01234567"));
        assert!(!is_commit_hash("0123456789ABCDEF0123456789abcdef01234567"));
        assert!(!is_commit_hash("main"));
    }

    #[test]
    fn tokens_from_env_then_file() {
        let dir = std::env::temp_dir().join(format!("diffuse-hub-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("token"), "  hf_file\r\n").unwrap();
        let home = dir.to_str().unwrap();
        assert_eq!(env(&[("HF_HOME", home)]).token().as_deref(), Some("hf_file"));
        assert_eq!(env(&[("HF_HOME", home), ("HF_TOKEN", "hf_env\n")]).token().as_deref(), Some("hf_env"));
        assert_eq!(env(&[("HF_HOME", home), ("HUGGING_FACE_HUB_TOKEN", "hf_old")]).token().as_deref(), Some("hf_old"));
        // An empty HF_TOKEN falls through, as Python's `or` does.
        assert_eq!(
            env(&[("HF_HOME", home), ("HF_TOKEN", ""), ("HUGGING_FACE_HUB_TOKEN", "hf_old")]).token().as_deref(),
            Some("hf_old")
        );
        let elsewhere = dir.join("elsewhere");
        std::fs::write(&elsewhere, "hf_path").unwrap();
        let elsewhere = elsewhere.to_str().unwrap();
        assert_eq!(env(&[("HF_HOME", home), ("HF_TOKEN_PATH", elsewhere)]).token().as_deref(), Some("hf_path"));
        assert_eq!(env(&[("HF_HOME", "/nonexistent-diffuse")]).token(), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn offline_flag_as_huggingface_hub_reads_it() {
        for on in ["1", "ON", "yes", "True"] {
            assert!(env(&[("HF_HUB_OFFLINE", on)]).offline(), "{on}");
        }
        for off in ["0", "false", "", "2"] {
            assert!(!env(&[("HF_HUB_OFFLINE", off)]).offline(), "{off}");
        }
        assert!(!env(&[]).offline());
        assert!(env(&[("TRANSFORMERS_OFFLINE", "1")]).offline());
        assert!(env(&[("HF_HUB_OFFLINE", ""), ("TRANSFORMERS_OFFLINE", "1")]).offline());
        // A set HF_HUB_OFFLINE decides, even when it says no.
        assert!(!env(&[("HF_HUB_OFFLINE", "0"), ("TRANSFORMERS_OFFLINE", "1")]).offline());
    }

    #[test]
    fn shard_tags() {
        assert!(is_shard_tag("00001-of-00002"));
        assert!(!is_shard_tag("0001-of-00002"));
        assert!(!is_shard_tag("00001-of-0002x"));
        assert!(!is_shard_tag("00001_of_00002"));
    }
}
