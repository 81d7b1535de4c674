//! Generation metadata in the AUTOMATIC1111 web UI's "infotext" format, written into every
//! PNG's `parameters` text chunk and read back (A1111's modules/processing.py
//! `create_infotext` and modules/infotext_utils.py `quote` / `parse_generation_parameters`).
//!
//! The format is the prompt (any number of lines), then `Negative prompt: ...` (only when
//! there is one), then one line of `Key: value` pairs joined by ", ":
//!
//! ```text
//! a photo of a cat
//! Negative prompt: blurry, low quality
//! Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 42, Size: 512x512, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Version: diffuse 0.1.0
//! ```
//!
//! Conventions diffuse chose where A1111 leaves a choice:
//! - **Sampler and schedule** are written as A1111 1.9+ writes them: the sampler without its
//!   schedule (`DPM++ 2M`) and a separate `Schedule type` (`Karras`, `Exponential`, `Beta`,
//!   `Uniform`, or `Automatic` for the sampler's own default). Both that and the older combined
//!   names (`DPM++ 2M Karras`) are read.
//! - **Clip skip** is A1111's numbering: diffusers' `clip_skip = 1` (the penultimate CLIP
//!   layer) is `Clip skip: 2`; no skip writes nothing. [`GenerationParameters::clip_skip`]
//!   holds the diffusers number.
//! - **Quoting** is A1111's `quote()`: a value holding `,`, `:` or a newline is written as a
//!   JSON string. diffuse also quotes values holding `"`, so that a value which starts and ends
//!   with a quote survives (A1111 reads the quoted form back to the same text).
//! - **Keys only diffuse reads** make an image reproducible exactly: `Diffuse scheduler` (the
//!   `--scheduler` name), `Diffuse scheduler config` (the `--scheduler-config` overrides as a
//!   JSON object), `Eta DDIM` (A1111's key for DDIM's eta), `Guidance rescale`, `Class label`,
//!   `Batch size` / `Batch pos` (diffusers draws a batch from one generator, so image k of a
//!   batch needs the whole batch again), `Variant` and `Dtype`.
//! - **Model hash** is A1111's for a single checkpoint file (the first 10 hex digits of the
//!   file's SHA-256). A diffusers folder has no single file: diffuse hashes the UNet's weight
//!   files (`unet/diffusion_pytorch_model[.VARIANT].safetensors`, or its shards in file-name
//!   order) as one stream. See [`model_hash`].

use std::collections::hash_map::{Entry, HashMap};
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use serde::{Serialize, Serializer};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::loading::weights::find_weight_files;
use crate::pipelines::SCHEDULER_NAMES;
use crate::{Error, Result};

/// Everything needed to make an image again, as the infotext records it. Absent values are
/// `None` (or empty): the CLI's defaults apply to them.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct GenerationParameters {
    /// The prompt (possibly several lines).
    pub prompt: String,
    /// Empty when there is none (A1111 writes no `Negative prompt:` line then).
    pub negative_prompt: String,
    /// Denoising steps (`Steps`; diffusers' `num_inference_steps`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps: Option<usize>,
    /// A1111's sampler name (`Euler a`, `DPM++ 2M`; older files: `DPM++ 2M Karras`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sampler: Option<String>,
    /// A1111's `Schedule type` (`Automatic`, `Karras`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schedule_type: Option<String>,
    /// Classifier-free guidance scale.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cfg_scale: Option<f64>,
    /// The seed (`Seed`) of the generator the image was drawn from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Image width in pixels (`Size: WxH`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub width: Option<usize>,
    /// Image height in pixels (`Size: WxH`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub height: Option<usize>,
    /// `Model hash`: the first 10 hex digits of the SHA-256 of the checkpoint file (or of a
    /// folder's UNet weights; see [`model_hash`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_hash: Option<String>,
    /// `Model`: the model's name (a checkpoint's file stem, a folder's name, or a repo id).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Image-to-image strength.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub denoising_strength: Option<f64>,
    /// diffusers' numbering (1 = the penultimate layer), written as A1111's (`Clip skip: 2`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clip_skip: Option<usize>,
    /// DDIM's eta (`Eta DDIM`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eta: Option<f64>,
    /// diffusers' `guidance_rescale` (`Guidance rescale`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guidance_rescale: Option<f64>,
    /// The class a class-conditional pixel model was asked for (`Class label`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class_label: Option<i64>,
    /// How many images were drawn together, and which of them this is (0-based).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
    /// Which image of the batch this is, 0-based (`Batch pos`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_position: Option<usize>,
    /// diffuse's scheduler name (`dpm++2m-karras`; see `SCHEDULER_NAMES`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<String>,
    /// Scheduler config overrides (`--scheduler-config KEY=VALUE`), in the order given.
    #[serde(skip_serializing_if = "Vec::is_empty", serialize_with = "as_map")]
    pub scheduler_config: Vec<(String, Value)>,
    /// The weight files' variant (`fp16`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// The compute dtype when it is not f32.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dtype: Option<String>,
    /// The program that wrote the image (`Version`, e.g. `diffuse 0.1.0`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Every other `Key: value` pair, in order (A1111 settings diffuse has no use for, or keys
    /// other parts of diffuse add).
    #[serde(skip_serializing_if = "Vec::is_empty", serialize_with = "as_map")]
    pub extra: Vec<(String, String)>,
}

fn as_map<S: Serializer, V: Serialize>(pairs: &[(String, V)], serializer: S) -> std::result::Result<S::Ok, S::Error> {
    serializer.collect_map(pairs.iter().map(|(k, v)| (k, v)))
}

impl GenerationParameters {
    /// The infotext, byte for byte as A1111's `create_infotext` lays it out.
    pub fn to_infotext(&self) -> String {
        let mut pairs: Vec<(&str, String)> = Vec::new();
        let mut push = |key: &'static str, value: Option<String>| {
            if let Some(value) = value {
                pairs.push((key, value));
            }
        };
        push("Steps", self.steps.map(|v| v.to_string()));
        push("Sampler", self.sampler.clone());
        push("Schedule type", self.schedule_type.clone());
        push("CFG scale", self.cfg_scale.map(|v| v.to_string()));
        push("Seed", self.seed.map(|v| v.to_string()));
        push("Size", self.width.zip(self.height).map(|(w, h)| format!("{w}x{h}")));
        push("Model hash", self.model_hash.clone());
        push("Model", self.model.clone());
        push("Batch size", self.batch_size.map(|v| v.to_string()));
        push("Batch pos", self.batch_position.map(|v| v.to_string()));
        push("Denoising strength", self.denoising_strength.map(|v| v.to_string()));
        push("Clip skip", self.clip_skip.filter(|&skip| skip >= 1).map(|skip| (skip + 1).to_string()));
        push("Eta DDIM", self.eta.map(|v| v.to_string()));
        push("Guidance rescale", self.guidance_rescale.map(|v| v.to_string()));
        push("Class label", self.class_label.map(|v| v.to_string()));
        push("Diffuse scheduler", self.scheduler.clone());
        push("Diffuse scheduler config", (!self.scheduler_config.is_empty()).then(|| overrides_json(&self.scheduler_config)));
        push("Variant", self.variant.clone());
        push("Dtype", self.dtype.clone());
        let version = self.version.clone();
        let mut line: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}: {}", quote(v))).collect();
        line.extend(self.extra.iter().map(|(k, v)| format!("{k}: {}", quote(v))));
        if let Some(version) = version {
            line.push(format!("Version: {}", quote(&version)));
        }

        let mut text = self.prompt.clone();
        if !self.negative_prompt.is_empty() {
            text.push_str("\nNegative prompt: ");
            text.push_str(&self.negative_prompt);
        }
        text.push('\n');
        text.push_str(&line.join(", "));
        python_strip(&text).to_string()
    }

    /// The diffuse scheduler to run and its config overrides: the recorded `Diffuse scheduler`
    /// (and `Diffuse scheduler config`) when present, else the A1111 sampler and schedule type
    /// mapped by [`scheduler_from_a1111`]; `None` when neither is recorded.
    pub fn diffuse_scheduler(&self) -> Result<Option<SchedulerChoice>> {
        if let Some(name) = &self.scheduler {
            if !SCHEDULER_NAMES.iter().any(|(n, ..)| n == name) {
                let names: Vec<&str> = SCHEDULER_NAMES.iter().map(|(n, ..)| *n).collect();
                return Err(Error::invalid(format!(
                    "`Diffuse scheduler: {name}` is not a scheduler this diffuse knows ({})",
                    names.join(", ")
                )));
            }
            return Ok(Some((name.clone(), self.scheduler_config.clone())));
        }
        match &self.sampler {
            Some(sampler) => {
                let (name, mut overrides) = scheduler_from_a1111(sampler, self.schedule_type.as_deref())?;
                overrides.extend(self.scheduler_config.iter().cloned());
                Ok(Some((name, overrides)))
            }
            None => Ok(None),
        }
    }
}

/// A diffuse scheduler name (`SCHEDULER_NAMES`) and the config overrides to apply to it.
pub type SchedulerChoice = (String, Vec<(String, Value)>);

/// `{"key":value,...}` in the given order; a key given twice keeps its last value, as the
/// overrides are applied in order.
fn overrides_json(overrides: &[(String, Value)]) -> String {
    let mut unique: Vec<(&String, &Value)> = Vec::new();
    for (key, value) in overrides {
        match unique.iter_mut().find(|(k, _)| *k == key) {
            Some(entry) => entry.1 = value,
            None => unique.push((key, value)),
        }
    }
    let body: Vec<String> = unique.iter().map(|(k, v)| format!("{}:{}", Value::String((*k).clone()), v)).collect();
    format!("{{{}}}", body.join(","))
}

/// A1111's `quote()`: values holding `,`, `:` or a newline (and, for diffuse, `"`) become a
/// JSON string as Python's `json.dumps(text, ensure_ascii=False)` writes it (serde_json escapes
/// the same characters the same way).
pub fn quote(value: &str) -> String {
    if value.contains([',', ':', '\n', '"']) {
        Value::String(value.to_string()).to_string()
    } else {
        value.to_string()
    }
}

/// Python's `str.strip()`: Unicode white space plus the four separators U+001C..U+001F.
fn python_strip(text: &str) -> &str {
    text.trim_matches(is_python_space)
}

fn is_python_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `\w` in a str pattern.
fn is_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Reads an infotext back, as A1111's `parse_generation_parameters` does (see
/// [`split_infotext`]). Known keys are typed (a value of the wrong type is an error naming the
/// key); the others are kept in `extra`, in order.
pub fn parse_infotext(text: &str) -> Result<GenerationParameters> {
    let parts = split_infotext(text);
    let mut params = GenerationParameters { prompt: parts.prompt, negative_prompt: parts.negative_prompt, ..Default::default() };
    // Where each `extra` key is: a search of the list per pair would be quadratic in a long line.
    let mut extra_index: HashMap<String, usize> = HashMap::new();
    for (key, value) in parts.pairs {
        if !set_parameter(&mut params, &key, value.clone())? {
            // A key given twice keeps its first place and its last value, as a Python dict does.
            match extra_index.entry(key) {
                Entry::Occupied(entry) => params.extra[*entry.get()].1 = value,
                Entry::Vacant(entry) => {
                    params.extra.push((entry.key().clone(), value));
                    entry.insert(params.extra.len() - 1);
                }
            }
        }
    }
    Ok(params)
}

/// An infotext taken apart, before any value is interpreted.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct InfotextParts {
    /// The prompt: the lines before the `Negative prompt:` line and the parameters.
    pub prompt: String,
    /// The text after `Negative prompt:` (empty when there is none).
    pub negative_prompt: String,
    /// The `Key: value` pairs in order, unquoted.
    pub pairs: Vec<(String, String)>,
}

/// A1111's reading of an infotext: the last line is the parameters when it holds at least three
/// `Key: value` pairs (else it belongs to the prompt); every line is stripped; lines from the one
/// starting `Negative prompt:` on are the negative prompt; a value that starts and ends with `"`
/// is decoded as a JSON string when it is one; a pair with an empty value is dropped (A1111's
/// `v[0]` raises on it and the pair is skipped).
pub fn split_infotext(text: &str) -> InfotextParts {
    let text = python_strip(text);
    let mut lines: Vec<&str> = text.split('\n').collect();
    let mut last_line = lines.pop().unwrap_or_default();
    if find_params(last_line).len() < 3 {
        lines.push(last_line);
        last_line = "";
    }

    let mut parts = InfotextParts::default();
    let mut in_negative = false;
    for line in lines {
        let mut line = python_strip(line);
        if let Some(rest) = line.strip_prefix("Negative prompt:") {
            in_negative = true;
            line = python_strip(rest);
        }
        let target = if in_negative { &mut parts.negative_prompt } else { &mut parts.prompt };
        if !target.is_empty() {
            target.push('\n');
        }
        target.push_str(line);
    }

    for (key, value) in find_params(last_line) {
        if value.is_empty() {
            continue;
        }
        let value = if value.len() >= 2 && value.starts_with('"') && value.ends_with('"') {
            serde_json::from_str::<String>(&value).unwrap_or(value)
        } else {
            value
        };
        parts.pairs.push((key, value));
    }
    parts
}

/// Sets a known key's field; false for a key diffuse does not know.
fn set_parameter(params: &mut GenerationParameters, key: &str, value: String) -> Result<bool> {
    fn number<T: std::str::FromStr>(key: &str, value: &str, what: &str) -> Result<T> {
        value
            .trim()
            .parse()
            .map_err(|_| Error::invalid(format!("infotext `{key}: {value}`: expected {what}")))
    }
    let whole = "a whole number";
    let real = "a number";
    match key {
        "Steps" => params.steps = Some(number(key, &value, whole)?),
        "Sampler" => params.sampler = Some(value),
        "Schedule type" => params.schedule_type = Some(value),
        "CFG scale" => params.cfg_scale = Some(number(key, &value, real)?),
        "Seed" => params.seed = Some(number(key, &value, whole)?),
        "Size" => {
            let (w, h) = value
                .split_once('x')
                .and_then(|(w, h)| Some((digits(w)?, digits(h)?)))
                .ok_or_else(|| Error::invalid(format!("infotext `Size: {value}`: expected WIDTHxHEIGHT")))?;
            params.width = Some(w);
            params.height = Some(h);
        }
        "Model hash" => params.model_hash = Some(value),
        "Model" => params.model = Some(value),
        "Batch size" => params.batch_size = Some(number(key, &value, whole)?),
        "Batch pos" => params.batch_position = Some(number(key, &value, whole)?),
        "Denoising strength" => params.denoising_strength = Some(number(key, &value, real)?),
        // A1111's 1 (or less) is no skip; its 2 is diffusers' 1.
        "Clip skip" => params.clip_skip = Some(number::<usize>(key, &value, whole)?).filter(|&n| n >= 2).map(|n| n - 1),
        "Eta DDIM" => params.eta = Some(number(key, &value, real)?),
        "Guidance rescale" => params.guidance_rescale = Some(number(key, &value, real)?),
        "Class label" => params.class_label = Some(number(key, &value, "an integer")?),
        "Diffuse scheduler" => params.scheduler = Some(value),
        "Diffuse scheduler config" => match serde_json::from_str::<OrderedObject>(&value) {
            Ok(OrderedObject(pairs)) => params.scheduler_config = pairs,
            Err(_) => return Err(Error::invalid(format!("infotext `Diffuse scheduler config: {value}`: expected a JSON object"))),
        },
        "Variant" => params.variant = Some(value),
        "Dtype" => params.dtype = Some(value),
        "Version" => params.version = Some(value),
        _ => return Ok(false),
    }
    Ok(true)
}

/// A JSON object's entries in the order written (serde_json's `Map` sorts them).
struct OrderedObject(Vec<(String, Value)>);

impl<'de> serde::Deserialize<'de> for OrderedObject {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = OrderedObject;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> std::result::Result<OrderedObject, A::Error> {
                let mut pairs = Vec::new();
                while let Some(entry) = map.next_entry::<String, Value>()? {
                    pairs.push(entry);
                }
                Ok(OrderedObject(pairs))
            }
        }
        deserializer.deserialize_map(Visitor)
    }
}

/// `\d+` as A1111's size pattern `^(\d+)x(\d+)$` takes it.
fn digits(text: &str) -> Option<usize> {
    if text.is_empty() || !text.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// Every match of A1111's `re_param`, `\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)`,
/// scanned as Python's `findall` scans (left to right, resuming after each match). The
/// pattern never needs to backtrack in a way that changes its match: the key is the longest
/// run of key characters (which must be followed by `:`), a quoted value ends at the first
/// unescaped `"` (and must be followed by `,` or the end of the line), and otherwise the value
/// runs to the next comma.
///
/// A failed match says where the next possible match starts: retrying from each character of a
/// long run of key characters would make a line without `:` quadratic in its length.
fn find_params(line: &str) -> Vec<(String, String)> {
    let chars: Vec<(usize, char)> = line.char_indices().collect();
    let mut found = Vec::new();
    let mut start = 0;
    while start < chars.len() {
        match match_param(line, &chars, start) {
            Ok((key, value, end)) => {
                found.push((key, value));
                start = end.max(start + 1);
            }
            Err(next) => start = next.max(start + 1),
        }
    }
    found
}

/// The match at `start` and where the scan resumes after it, or the first start after `start`
/// that can match: every start in between fails at the same character.
fn match_param(line: &str, chars: &[(usize, char)], start: usize) -> Result<(String, String, usize), usize> {
    let n = chars.len();
    let at = |i: usize| chars.get(i).map(|&(_, c)| c);
    let byte = |i: usize| chars.get(i).map(|&(b, _)| b).unwrap_or(line.len());
    let mut i = start;
    while at(i).is_some_and(is_python_space) {
        i += 1;
    }
    let key_start = i;
    if !at(i).is_some_and(is_word) {
        return Err(i + 1);
    }
    i += 1;
    let run_start = i;
    while at(i).is_some_and(|c| is_word(c) || c == ' ' || c == '-' || c == '/') {
        i += 1;
    }
    if i == run_start || at(i) != Some(':') {
        return Err(i);
    }
    let key = line[byte(key_start)..byte(i)].to_string();
    i += 1;
    while at(i).is_some_and(is_python_space) {
        i += 1;
    }
    let value_start = i;

    if at(i) == Some('"') {
        let mut j = i + 1;
        let mut closed = None;
        while j < n {
            match chars[j].1 {
                // `\\.`: a backslash and any character but a newline.
                '\\' if at(j + 1).is_some_and(|c| c != '\n') => j += 2,
                '\\' => break,
                '"' => {
                    if j > i + 1 {
                        closed = Some(j);
                    }
                    break;
                }
                _ => j += 1,
            }
        }
        if let Some(close) = closed {
            match at(close + 1) {
                None => return Ok((key, line[byte(value_start)..].to_string(), n)),
                Some(',') => return Ok((key, line[byte(value_start)..byte(close + 1)].to_string(), close + 2)),
                Some(_) => {}
            }
        }
    }

    let mut j = value_start;
    while at(j).is_some_and(|c| c != ',') {
        j += 1;
    }
    let value = line[byte(value_start)..byte(j)].to_string();
    Ok((key, value, if j < n { j + 1 } else { j }))
}

// ---------------------------------------------------------------------------------------------
// Samplers: diffuse's scheduler names and A1111's sampler names and schedule types.

/// One diffuse scheduler name and the A1111 sampler it corresponds to. `automatic` is the
/// schedule A1111 1.9+ means by `Schedule type: Automatic` for that sampler; `sigma_flags`
/// says whether the diffusers scheduler has `use_karras_sigmas` / `use_exponential_sigmas` /
/// `use_beta_sigmas`, which A1111's schedule types select.
struct A1111Sampler {
    diffuse: &'static str,
    a1111: &'static str,
    automatic: &'static str,
    sigma_flags: bool,
}

const A1111_SAMPLERS: &[A1111Sampler] = &[
    A1111Sampler { diffuse: "ddpm", a1111: "DDPM", automatic: "Uniform", sigma_flags: false },
    A1111Sampler { diffuse: "ddim", a1111: "DDIM", automatic: "Uniform", sigma_flags: false },
    A1111Sampler { diffuse: "pndm", a1111: "PLMS", automatic: "Uniform", sigma_flags: false },
    A1111Sampler { diffuse: "lms", a1111: "LMS", automatic: "Uniform", sigma_flags: true },
    A1111Sampler { diffuse: "euler", a1111: "Euler", automatic: "Uniform", sigma_flags: true },
    A1111Sampler { diffuse: "euler-ancestral", a1111: "Euler a", automatic: "Uniform", sigma_flags: false },
    A1111Sampler { diffuse: "heun", a1111: "Heun", automatic: "Uniform", sigma_flags: true },
    A1111Sampler { diffuse: "dpm++2m", a1111: "DPM++ 2M", automatic: "Karras", sigma_flags: true },
    A1111Sampler { diffuse: "dpm++2m-sde", a1111: "DPM++ 2M SDE", automatic: "Exponential", sigma_flags: true },
    A1111Sampler { diffuse: "unipc", a1111: "UniPC", automatic: "Uniform", sigma_flags: true },
    A1111Sampler { diffuse: "lcm", a1111: "LCM", automatic: "Uniform", sigma_flags: false },
];

/// A1111's schedule types (labels; its lowercase names are accepted too). Only Automatic,
/// Uniform, Karras, Exponential and Beta have a diffusers equivalent; the rest are listed so
/// that a combined name like `Euler SGM Uniform` splits into sampler and schedule.
const A1111_SCHEDULES: &[&str] = &[
    "Automatic",
    "SGM Uniform",
    "SGMUniform",
    "Uniform",
    "Karras",
    "Exponential",
    "Beta",
    "Polyexponential",
    "KL Optimal",
    "Align Your Steps",
    "Simple",
    "Normal",
    "DDIM",
    "Turbo",
];

/// The AUTOMATIC1111 sampler names [`scheduler_from_a1111`] maps, with the diffuse scheduler
/// each one runs.
pub fn a1111_sampler_names() -> Vec<(&'static str, &'static str)> {
    A1111_SAMPLERS.iter().map(|s| (s.a1111, s.diffuse)).collect()
}

/// The AUTOMATIC1111 schedule types that have a diffusers equivalent (for the samplers that
/// take one): the ones [`scheduler_from_a1111`] can map.
pub const A1111_MAPPED_SCHEDULES: &[&str] = &["Automatic", "Uniform", "Karras", "Exponential", "Beta"];

/// The config flag that selects a schedule type, for schedulers with `sigma_flags`.
fn schedule_flag(schedule: &str) -> Option<&'static str> {
    match schedule.to_ascii_lowercase().as_str() {
        "karras" => Some("use_karras_sigmas"),
        "exponential" => Some("use_exponential_sigmas"),
        "beta" => Some("use_beta_sigmas"),
        _ => None,
    }
}

/// The diffuse scheduler name (`SCHEDULER_NAMES`) that runs a diffusers class with a config as
/// it stands: the plain name of the class (the DPM-Solver++ SDE variant by its algorithm).
pub fn diffuse_scheduler_name(class_name: &str, config: &Map<String, Value>) -> Option<&'static str> {
    if class_name == "DPMSolverMultistepScheduler" {
        return match config.get("algorithm_type").and_then(Value::as_str).unwrap_or("dpmsolver++") {
            "dpmsolver++" => Some("dpm++2m"),
            "sde-dpmsolver++" => Some("dpm++2m-sde"),
            _ => None,
        };
    }
    SCHEDULER_NAMES.iter().find(|(_, class, overrides, _)| *class == class_name && overrides.is_empty()).map(|(name, ..)| *name)
}

/// A1111's sampler name and schedule type for a diffusers scheduler class and its effective
/// config (what `resolve_scheduler` built). A class without an A1111 counterpart is written by
/// its class name, with no schedule type.
pub fn a1111_sampler(class_name: &str, config: &Map<String, Value>) -> (String, Option<String>) {
    let entry = diffuse_scheduler_name(class_name, config).and_then(|name| A1111_SAMPLERS.iter().find(|s| s.diffuse == name));
    let Some(entry) = entry else {
        return (class_name.to_string(), None);
    };
    let flag = |key: &str| config.get(key).and_then(Value::as_bool).unwrap_or(false);
    let schedule = if entry.sigma_flags && flag("use_karras_sigmas") {
        "Karras"
    } else if entry.sigma_flags && flag("use_exponential_sigmas") {
        "Exponential"
    } else if entry.sigma_flags && flag("use_beta_sigmas") {
        "Beta"
    } else if entry.automatic != "Uniform" {
        // "Automatic" would mean Karras (or Exponential) for this sampler in A1111.
        "Uniform"
    } else {
        "Automatic"
    };
    (entry.a1111.to_string(), Some(schedule.to_string()))
}

/// The diffuse scheduler and config overrides for an A1111 sampler and schedule type, read as
/// A1111 1.9+ reads them: a schedule suffix on the sampler name (`DPM++ 2M Karras`, as A1111
/// wrote before 1.9) wins over `Schedule type`; `Automatic` is the sampler's default schedule;
/// no schedule at all (files from before 1.9) is the uniform one.
///
/// A1111's samplers are k-diffusion's and diffuse's are diffusers': the same method, but not
/// the same sigma grid or noise, so an A1111 image is made again in kind, not pixel for pixel.
pub fn scheduler_from_a1111(sampler: &str, schedule_type: Option<&str>) -> Result<SchedulerChoice> {
    let mut base = sampler.trim();
    let mut schedule = schedule_type.map(str::trim).unwrap_or("Uniform").to_string();
    for label in A1111_SCHEDULES {
        let lower = label.to_ascii_lowercase().replace(' ', "_");
        if let Some(stripped) = [*label, lower.as_str()].iter().find_map(|l| base.strip_suffix(l).and_then(|b| b.strip_suffix(' '))) {
            base = stripped;
            schedule = label.to_string();
            break;
        }
    }
    let entry = A1111_SAMPLERS.iter().find(|s| s.a1111.eq_ignore_ascii_case(base)).ok_or_else(|| {
        let known: Vec<&str> = A1111_SAMPLERS.iter().map(|s| s.a1111).collect();
        Error::invalid(format!(
            "the AUTOMATIC1111 sampler `{sampler}` has no diffuse equivalent (diffuse maps {}); choose a diffuse scheduler instead",
            known.join(", ")
        ))
    })?;
    if schedule.eq_ignore_ascii_case("automatic") {
        schedule = entry.automatic.to_string();
    }
    if schedule.eq_ignore_ascii_case("uniform") {
        return Ok((entry.diffuse.to_string(), Vec::new()));
    }
    if entry.diffuse == "dpm++2m" && schedule.eq_ignore_ascii_case("karras") {
        return Ok(("dpm++2m-karras".to_string(), Vec::new()));
    }
    match schedule_flag(&schedule) {
        Some(flag) if entry.sigma_flags => Ok((entry.diffuse.to_string(), vec![(flag.to_string(), Value::Bool(true))])),
        _ => Err(Error::invalid(format!(
            "the AUTOMATIC1111 sampler `{}` with the `{schedule}` schedule has no diffuse equivalent; choose a diffuse scheduler instead",
            entry.a1111
        ))),
    }
}

// ---------------------------------------------------------------------------------------------
// PNG text chunks.

/// The `parameters` text of a PNG, from a `tEXt`, `zTXt` or `iTXt` chunk (A1111 writes `iTXt`
/// when the text is not Latin-1), before or after the image data; `None` when there is none.
pub fn read_png_parameters(path: &Path) -> Result<Option<String>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    png_parameters_from(BufReader::new(file), &path.display().to_string())
}

/// [`read_png_parameters`] for a PNG's bytes held in memory; `name` names it in errors.
pub fn png_parameters(bytes: &[u8], name: &str) -> Result<Option<String>> {
    png_parameters_from(std::io::Cursor::new(bytes), name)
}

fn png_parameters_from<R: std::io::BufRead + std::io::Seek>(input: R, name: &str) -> Result<Option<String>> {
    let not_png = |e: png::DecodingError| Error::invalid(format!("{name}: not a readable PNG file ({e})"));
    let mut reader = png::Decoder::new(input).read_info().map_err(not_png)?;
    if let Some(text) = parameters_chunk(reader.info()).map_err(not_png)? {
        return Ok(Some(text));
    }
    // Text after the image data is only read at the end of the file.
    reader.finish().map_err(not_png)?;
    parameters_chunk(reader.info()).map_err(not_png)
}

fn parameters_chunk(info: &png::Info) -> std::result::Result<Option<String>, png::DecodingError> {
    const KEY: &str = "parameters";
    if let Some(chunk) = info.uncompressed_latin1_text.iter().find(|c| c.keyword == KEY) {
        return Ok(Some(chunk.text.clone()));
    }
    if let Some(chunk) = info.utf8_text.iter().find(|c| c.keyword == KEY) {
        return chunk.get_text().map(Some);
    }
    if let Some(chunk) = info.compressed_latin1_text.iter().find(|c| c.keyword == KEY) {
        return chunk.get_text().map(Some);
    }
    Ok(None)
}

/// Whether a text can go in a `tEXt` chunk (ISO 8859-1), as Pillow decides between `tEXt` and
/// `iTXt`.
pub fn is_latin1(text: &str) -> bool {
    text.chars().all(|c| (c as u32) <= 0xff)
}

// ---------------------------------------------------------------------------------------------
// Model hash.

/// The files whose bytes make a model's hash: the file itself for a single checkpoint; for a
/// diffusers folder, the UNet's weight files (of `variant`) in file-name order.
pub fn model_hash_files(model: &Path, variant: Option<&str>) -> Result<Vec<PathBuf>> {
    if model.is_file() {
        return Ok(vec![model.to_path_buf()]);
    }
    let unet = model.join("unet");
    if !unet.is_dir() {
        return Err(Error::invalid(format!("{}: no `unet/` folder to hash", model.display())));
    }
    let mut files = find_weight_files(&unet, "diffusion_pytorch_model", variant)?;
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    Ok(files)
}

/// The "Model hash": the first 10 hex digits of the SHA-256 of [`model_hash_files`] read as one
/// stream (for a single file, exactly A1111's hash). The files are memory-mapped and hashed in
/// blocks. With `cache`, a JSON file mapping each file set (paths, sizes, modification times)
/// to its full SHA-256 spares hashing gigabytes again; the cache is best effort (a cache that
/// cannot be read or written is ignored).
pub fn model_hash(model: &Path, variant: Option<&str>, cache: Option<&Path>) -> Result<String> {
    let files = model_hash_files(model, variant)?;
    let key = cache_key(&files)?;
    let mut cached: Map<String, Value> = cache
        .and_then(|path| std::fs::read_to_string(path).ok())
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or_default();
    if let Some(Value::String(hex)) = cached.get(&key) {
        if hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return Ok(hex[..10].to_string());
        }
    }
    let hex = sha256_hex(&files)?;
    if let Some(path) = cache {
        cached.insert(key, Value::String(hex.clone()));
        let _ = write_atomically(path, Value::Object(cached).to_string().as_bytes());
    }
    Ok(hex[..10].to_string())
}

/// The full SHA-256 (64 hex digits) of files read one after another.
pub fn sha256_hex(files: &[PathBuf]) -> Result<String> {
    const BLOCK: usize = 16 << 20;
    let mut hasher = Sha256::new();
    for path in files {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        if len == 0 {
            continue;
        }
        // SAFETY: the mapping is read-only and only read while the file is open; a file
        // truncated meanwhile by another process is the caller's race, as with any mmap reader.
        match unsafe { memmap2::Mmap::map(&file) } {
            Ok(map) => {
                #[cfg(unix)]
                let _ = map.advise(memmap2::Advice::Sequential);
                for block in map.chunks(BLOCK) {
                    hasher.update(block);
                }
            }
            // Where mapping is refused (some network file systems), stream the file instead.
            Err(_) => {
                let mut reader = BufReader::with_capacity(1 << 20, file);
                let mut buffer = vec![0u8; 1 << 20];
                loop {
                    let read = reader.read(&mut buffer).map_err(|e| Error::io(path, e))?;
                    if read == 0 {
                        break;
                    }
                    hasher.update(&buffer[..read]);
                }
            }
        }
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn cache_key(files: &[PathBuf]) -> Result<String> {
    let mut parts = Vec::new();
    for path in files {
        let canonical = std::fs::canonicalize(path).map_err(|e| Error::io(path, e))?;
        let meta = std::fs::metadata(&canonical).map_err(|e| Error::io(path, e))?;
        let modified = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        parts.push(format!("{}|{}|{}", canonical.display(), meta.len(), modified));
    }
    Ok(parts.join("\n"))
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    crate::files::write_atomically(path, bytes)
}
