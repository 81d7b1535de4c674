//! The CLIP tokenizers of Stable Diffusion 1.x and 2.x, built into the library so that a
//! single-file checkpoint (which holds no tokenizer) runs without a network.
//!
//! Both families use OpenAI CLIP's BPE vocabulary; they differ only in their configs: SD 1.x pads
//! with `<|endoftext|>`, SD 2.x with `!` (the hub's `tokenizer_config.json` and
//! `special_tokens_map.json` of stable-diffusion-v1-5 and stable-diffusion-2 are under
//! `configs/{sd15,sd21}/tokenizer/`).
//!
//! Only `merges.txt` is embedded, gzipped (`configs/clip/merges.txt.gz`, 208 KB: `gzip -9n` of
//! the hub's file, the same as tests/fixtures/tokenizer/sd15/merges.txt). `vocab.json` follows
//! from it as CLIP's own tokenizer builds it (clip/simple_tokenizer.py): the 256 byte symbols in
//! GPT-2's `bytes_to_unicode` order, the same with `</w>`, each merge joined, then
//! `<|startoftext|>` and `<|endoftext|>` — 49,408 ids, equal to the hub's vocab.json (tested).

use std::io::Read;
use std::path::Path;

use ::tokenizers::models::bpe::Vocab;

use crate::loading::single_file::Family;
use crate::tokenizers::clip::{parse_merges, ClipTokenizer};
use crate::{Error, Result};

static MERGES_GZ: &[u8] = include_bytes!("../../configs/clip/merges.txt.gz");

const SD15_TOKENIZER_CONFIG: &str = include_str!("../../configs/sd15/tokenizer/tokenizer_config.json");
const SD15_SPECIAL_TOKENS_MAP: &str = include_str!("../../configs/sd15/tokenizer/special_tokens_map.json");
const SD21_TOKENIZER_CONFIG: &str = include_str!("../../configs/sd21/tokenizer/tokenizer_config.json");
const SD21_SPECIAL_TOKENS_MAP: &str = include_str!("../../configs/sd21/tokenizer/special_tokens_map.json");

/// The tokenizer of a family's (first) text encoder as its hub repository has it
/// (stable-diffusion-v1-5, stable-diffusion-2-1; SDXL base's `tokenizer/` is SD 1.5's, padding
/// with `<|endoftext|>`, and the refiner's `tokenizer_2/`, like the base's, SD 2.1's, padding
/// with `!`).
pub fn builtin_clip_tokenizer(family: Family) -> Result<ClipTokenizer> {
    let (name, config, special_tokens_map) = match family {
        Family::StableDiffusion1 | Family::StableDiffusionXL => {
            ("sd15", SD15_TOKENIZER_CONFIG, SD15_SPECIAL_TOKENS_MAP)
        }
        Family::StableDiffusion2 | Family::StableDiffusionXLRefiner => {
            ("sd21", SD21_TOKENIZER_CONFIG, SD21_SPECIAL_TOKENS_MAP)
        }
    };
    let origin = Path::new("<built-in>").join(name).join("tokenizer");
    let merges_text = builtin_merges_text()?;
    let vocab = clip_vocab(&merges_text);
    let merges = parse_merges(&merges_text, &vocab, &origin.join("merges.txt"))?;
    ClipTokenizer::from_parts(vocab, merges, config, special_tokens_map, &origin)
}

/// The files of Stable Diffusion 1.x's `tokenizer/` folder as the hub has them (`vocab.json`,
/// `merges.txt`, `tokenizer_config.json`, `special_tokens_map.json`), for pipelines this
/// library writes: `(file name, contents)`.
pub fn sd15_tokenizer_files() -> Result<Vec<(&'static str, Vec<u8>)>> {
    let merges_text = builtin_merges_text()?;
    let mut by_id: Vec<(String, u32)> = clip_vocab(&merges_text).into_iter().collect();
    by_id.sort_by_key(|(_, id)| *id);
    // In id order, as the hub's file is.
    let entries: Vec<String> = by_id
        .into_iter()
        .map(|(token, id)| format!("{}:{id}", serde_json::Value::String(token)))
        .collect();
    let vocab_json = format!("{{{}}}", entries.join(",")).into_bytes();
    Ok(vec![
        ("vocab.json", vocab_json),
        ("merges.txt", merges_text.into_bytes()),
        ("tokenizer_config.json", SD15_TOKENIZER_CONFIG.as_bytes().to_vec()),
        ("special_tokens_map.json", SD15_SPECIAL_TOKENS_MAP.as_bytes().to_vec()),
    ])
}

/// The embedded `merges.txt`, decompressed.
pub fn builtin_merges_text() -> Result<String> {
    let mut text = String::new();
    flate2::read::GzDecoder::new(MERGES_GZ)
        .read_to_string(&mut text)
        .map_err(|e| Error::invalid(format!("the built-in CLIP merges.txt.gz cannot be read: {e}")))?;
    Ok(text)
}

/// CLIP's vocabulary from the text of its merges.txt (after the `#version` line, one merge a line).
pub fn clip_vocab(merges_text: &str) -> Vocab {
    let symbols = bytes_to_unicode();
    let merged = merges_text
        .lines()
        .filter(|line| !line.starts_with("#version") && !line.is_empty())
        .map(|line| line.split(' ').collect::<String>());
    symbols
        .iter()
        .map(char::to_string)
        .chain(symbols.iter().map(|c| format!("{c}</w>")))
        .chain(merged)
        .chain(["<|startoftext|>".to_string(), "<|endoftext|>".to_string()])
        .enumerate()
        .map(|(id, token)| (token, id as u32))
        .collect()
}

/// GPT-2's printable stand-ins for the 256 byte values, in its order: the bytes that are
/// printable Latin-1 (`!`..=`~`, `¡`..=`¬`, `®`..=`ÿ`) as themselves, then the others, in byte
/// order, as U+0100 onwards.
fn bytes_to_unicode() -> Vec<char> {
    let printable = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
    let mut symbols: Vec<char> = (0..256).filter(|&b| printable(b)).filter_map(char::from_u32).collect();
    let others = (0..256).filter(|&b| !printable(b));
    symbols.extend(others.enumerate().filter_map(|(n, _)| char::from_u32(256 + n as u32)));
    symbols
}
