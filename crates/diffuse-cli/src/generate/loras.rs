//! `diffuse generate`'s LoRAs: `--lora FILE[:WEIGHT]` (repeatable, stacked in order), and with
//! `--prompt-syntax a1111` the prompt's `<lora:NAME:WEIGHT>` tags, found as
//! `--lora-dir/NAME.safetensors` (the library cuts the tags out of the prompt before the
//! tokenizer, as AUTOMATIC1111 does).
//!
//! Metadata: every LoRA is recorded as AUTOMATIC1111 records it, `Lora hashes: "name: hash"`
//! (kohya's 12-digit hash of the tensor data); the `--lora` ones, which the prompt does not
//! carry, also as `Diffuse loras: "name: weight"`. `--from` takes those back from
//! `--lora-dir/NAME.safetensors` unless `--lora` is given, and warns when a LoRA's hash is not
//! the recorded one.

use std::path::Path;

use anyhow::{bail, Context, Result};
use diffuse::lora::{lora_hash, path_in_dir, AppliedLora, LoraSpec};
use diffuse::pipelines::metadata::GenerationParameters;
use diffuse::prompts::extra_networks::parse_prompt;
use diffuse::prompts::PromptSyntax;

use super::GenerateArgs;

/// AUTOMATIC1111's infotext key.
pub(crate) const HASHES_KEY: &str = "Lora hashes";
/// diffuse's record of `--lora` LoRAs and their weights.
pub(crate) const WEIGHTS_KEY: &str = "Diffuse loras";

/// The LoRAs of a run: `--lora` flags first, then the prompt's tags.
pub(crate) struct Loras {
    pub specs: Vec<LoraSpec>,
    /// How many of `specs` come from `--lora` (the rest from the prompt).
    pub from_flags: usize,
}

/// The run's LoRAs; tags of other extra networks, or tags the prompt syntax does not read, are
/// named in warnings.
pub(crate) fn resolve(args: &GenerateArgs, warn: &mut dyn FnMut(String)) -> Result<Loras> {
    let mut specs = args.lora.iter().map(|arg| LoraSpec::parse(arg)).collect::<diffuse::Result<Vec<_>>>().context("--lora")?;
    let from_flags = specs.len();
    let (_, tags) = parse_prompt(args.prompt.as_deref().unwrap_or_default());
    let syntax: PromptSyntax = args.prompt_syntax.parse()?;
    if syntax == PromptSyntax::Diffusers {
        if let Some(tag) = tags.first() {
            warn(format!(
                "the prompt's {} is read as text: only --prompt-syntax a1111 reads <lora:NAME:WEIGHT> tags",
                tag.text
            ));
        }
        return Ok(Loras { specs, from_flags });
    }
    for tag in &tags {
        if tag.is_lora() {
            specs.push(LoraSpec::from_tag(tag, args.lora_dir.as_deref()).map_err(|e| crate::name_flags_in(e, &[("`lora_dir`", "--lora-dir")]))?);
        } else {
            warn(format!("the prompt's {} is cut out and ignored: diffuse applies LoRAs only", tag.text));
        }
    }
    Ok(Loras { specs, from_flags })
}

/// What was fused, one line per LoRA, and the layers that were not.
pub(crate) fn report(applied: &[AppliedLora], quiet: bool) {
    if quiet {
        return;
    }
    for lora in applied {
        eprintln!("{}", lora.summary());
    }
}

/// The infotext entries of a run's LoRAs (`Lora hashes` names a LoRA whose hash cannot be
/// computed without one, with a warning).
pub(crate) fn infotext_entries(loras: &Loras, quiet: bool) -> Vec<(String, String)> {
    let mut hashes = Vec::new();
    for spec in &loras.specs {
        match lora_hash(&spec.path) {
            Ok(hash) => hashes.push(format!("{}: {hash}", a1111_alias(&spec.name))),
            Err(e) if !quiet => eprintln!("warning: no hash for LoRA {} in the metadata: {e}", spec.name),
            Err(_) => {}
        }
    }
    let weights: Vec<String> =
        loras.specs[..loras.from_flags].iter().map(|spec| format!("{}: {}", a1111_alias(&spec.name), spec.unet_weight)).collect();
    let mut entries = Vec::new();
    if !hashes.is_empty() {
        entries.push((HASHES_KEY.to_string(), hashes.join(", ")));
    }
    if !weights.is_empty() {
        entries.push((WEIGHTS_KEY.to_string(), weights.join(", ")));
    }
    entries
}

/// AUTOMATIC1111 writes a LoRA's name without `:` and `,`, which separate the entries.
fn a1111_alias(name: &str) -> String {
    name.replace([':', ','], "")
}

/// `name: value, name: value` as `Lora hashes` and `Diffuse loras` write them.
fn entries(value: &str) -> Vec<(String, String)> {
    value
        .split(", ")
        .filter_map(|entry| entry.rsplit_once(": ").map(|(name, value)| (name.trim().to_string(), value.trim().to_string())))
        .collect()
}

/// `--from`: the recorded `--lora` LoRAs as `--lora-dir/NAME.safetensors:WEIGHT` (when
/// `--lora` is not given).
pub(crate) fn recall(args: &mut GenerateArgs, params: &GenerationParameters, lora_given: bool, image: &Path) -> Result<()> {
    let Some((_, recorded)) = params.extra.iter().find(|(key, _)| key == WEIGHTS_KEY) else { return Ok(()) };
    if lora_given {
        return Ok(());
    }
    let Some(dir) = args.lora_dir.clone() else {
        bail!(
            "--from {}: the image was made with the LoRAs {recorded}; give --lora-dir (where NAME.safetensors are) or --lora FILE:WEIGHT",
            image.display()
        );
    };
    for (name, weight) in entries(recorded) {
        if weight.parse::<f64>().is_err() {
            bail!("--from {}: `{WEIGHTS_KEY}` gives the LoRA {name} the weight `{weight}`, which is not a number", image.display());
        }
        let path = path_in_dir(&dir, &name).with_context(|| format!("--from {}: `{WEIGHTS_KEY}`", image.display()))?;
        args.lora.push(format!("{}:{weight}", path.display()));
    }
    Ok(())
}

/// `--from`: warnings for LoRAs whose hash is not the one the image records, and whether
/// every recorded hash belongs to a LoRA of this run (else `Lora hashes` stays among the
/// settings `--from` ignores).
pub(crate) fn check_hashes(recorded: &GenerationParameters, loras: &Loras, quiet: bool) -> bool {
    let Some((_, value)) = recorded.extra.iter().find(|(key, _)| key == HASHES_KEY) else { return true };
    let mut all_found = true;
    for (name, hash) in entries(value) {
        let Some(spec) = loras.specs.iter().find(|spec| a1111_alias(&spec.name) == name) else {
            all_found = false;
            continue;
        };
        if let Ok(actual) = lora_hash(&spec.path) {
            if actual != hash && !quiet {
                eprintln!(
                    "warning: --from: the image was made with the LoRA {name} of hash {hash}, {} has {actual}; expect a different image",
                    spec.path.display()
                );
            }
        }
    }
    all_found
}
