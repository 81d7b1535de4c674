//! The CLIP tokenizers built into the library (for single-file checkpoints) are the hub's SD 1.x
//! and SD 2.x tokenizers: the embedded merges are the hub's merges.txt, the vocabulary derived
//! from them is the hub's vocab.json, and both families give transformers' ids on every fixture
//! prompt (tests/fixtures/tokenizer, from tools/fixtures/clip_tokenizer.py).

mod common;

use std::collections::HashMap;

use diffuse::loading::single_file::Family;
use diffuse::tokenizers::builtin::{builtin_clip_tokenizer, builtin_merges_text, clip_vocab};
use serde_json::Value;

fn tokenizer_fixtures() -> std::path::PathBuf {
    common::fixtures_dir().join("tokenizer")
}

fn ids(value: &Value) -> Vec<u32> {
    value.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect()
}

#[test]
fn embedded_merges_and_derived_vocab_are_the_hub_files() {
    let merges = builtin_merges_text().unwrap();
    let hub_merges = std::fs::read_to_string(tokenizer_fixtures().join("sd15/merges.txt")).unwrap();
    assert!(merges == hub_merges, "the embedded merges.txt differs from the hub's");

    let hub_vocab: HashMap<String, u32> =
        serde_json::from_str(&std::fs::read_to_string(tokenizer_fixtures().join("sd15/vocab.json")).unwrap()).unwrap();
    let vocab = clip_vocab(&merges);
    assert_eq!(vocab.len(), 49408);
    let mut differences: Vec<String> = hub_vocab
        .iter()
        .filter(|(token, id)| vocab.get(*token) != Some(id))
        .map(|(token, id)| format!("{token:?}: hub {id}, derived {:?}", vocab.get(token)))
        .collect();
    differences.sort();
    assert!(differences.is_empty(), "{} tokens differ, e.g. {:?}", differences.len(), &differences[..differences.len().min(5)]);
}

#[test]
fn builtin_tokenizers_give_transformers_ids_on_every_prompt() {
    let path = tokenizer_fixtures().join("expected.json");
    let expected: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    for (family, key, pad) in [(Family::StableDiffusion1, "sd15", 49407), (Family::StableDiffusion2, "sd2", 0)] {
        let tokenizer = builtin_clip_tokenizer(family).unwrap();
        assert_eq!(
            (tokenizer.bos_token_id(), tokenizer.eos_token_id(), tokenizer.pad_token_id(), tokenizer.model_max_length()),
            (49406, 49407, pad, 77),
            "{key}"
        );
        let prompts = expected["prompts"].as_array().unwrap();
        assert!(prompts.len() >= 60);
        let mut failures = Vec::new();
        for case in prompts {
            let prompt = case["prompt"].as_str().unwrap();
            let encoding = tokenizer.encode(prompt).unwrap();
            if encoding.input_ids != ids(&case[key]["input_ids"]) {
                failures.push(format!("{key} {prompt:?}: {:?}", encoding.input_ids));
            }
        }
        assert!(failures.is_empty(), "{} prompts differ:\n{}", failures.len(), failures.join("\n"));
    }
}
