//! CLIP tokenizer parity with transformers 5.23's `CLIPTokenizer.from_pretrained`, on the real
//! CLIP BPE vocabulary (fixtures from tools/fixtures/clip_tokenizer.py). Ids must be equal.

mod common;

use std::path::{Path, PathBuf};

use candle_core::Device;
use diffuse::tokenizers::clip::{attention_mask_tensor, input_ids_tensor};
use diffuse::tokenizers::{ClipEncoding, ClipTokenizer};
use serde_json::Value;

fn tokenizer_fixtures() -> PathBuf {
    common::fixtures_dir().join("tokenizer")
}

fn expected() -> Value {
    let path = tokenizer_fixtures().join("expected.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn ids(value: &Value) -> Vec<u32> {
    value.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect()
}

/// A scratch folder under the system temp dir, removed when dropped.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new(name: &str) -> Self {
        let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("diffuse-clip-tokenizer-{name}"));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        ScratchDir(path)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A folder with sd15's vocab.json and merges.txt (shared by every layout) and nothing else.
fn folder_with_sd15_vocab(name: &str) -> ScratchDir {
    let dir = ScratchDir::new(name);
    for file in ["vocab.json", "merges.txt"] {
        std::fs::copy(tokenizer_fixtures().join("sd15").join(file), dir.0.join(file)).unwrap();
    }
    dir
}

/// SD 2.x's folder as users have it: its two config files plus the shared vocabulary.
fn sd2_folder() -> ScratchDir {
    let dir = folder_with_sd15_vocab("sd2");
    for file in ["tokenizer_config.json", "special_tokens_map.json"] {
        std::fs::copy(tokenizer_fixtures().join("sd2").join(file), dir.0.join(file)).unwrap();
    }
    dir
}

fn write_json(path: &Path, value: &Value) {
    std::fs::write(path, serde_json::to_string_pretty(value).unwrap()).unwrap();
}

fn check_encoding(actual: &ClipEncoding, expected: &Value, what: &str, failures: &mut Vec<String>) {
    let expected_ids = ids(&expected["input_ids"]);
    let expected_mask = ids(&expected["attention_mask"]);
    if actual.input_ids != expected_ids {
        failures.push(format!("{what}: input_ids\n  got      {:?}\n  expected {expected_ids:?}", actual.input_ids));
    }
    if actual.attention_mask != expected_mask {
        failures.push(format!("{what}: attention_mask\n  got      {:?}\n  expected {expected_mask:?}", actual.attention_mask));
    }
}

fn check_eq<T: PartialEq + std::fmt::Debug>(actual: T, expected: T, what: String, failures: &mut Vec<String>) {
    if actual != expected {
        failures.push(format!("{what}\n  got      {actual:?}\n  expected {expected:?}"));
    }
}

fn assert_no_failures(failures: Vec<String>) {
    assert!(failures.is_empty(), "{} mismatches:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn the_documented_example() {
    let tokenizer = ClipTokenizer::from_folder(tokenizer_fixtures().join("sd15")).unwrap();
    assert_eq!(tokenizer.encode_untruncated("a photo of a cat").unwrap(), [49406, 320, 1125, 539, 320, 2368, 49407]);
    assert_eq!(
        (tokenizer.bos_token_id(), tokenizer.eos_token_id(), tokenizer.pad_token_id(), tokenizer.model_max_length()),
        (49406, 49407, 49407, 77)
    );
}

#[test]
fn sd15_matches_transformers_on_every_prompt() {
    let expected = expected();
    let tokenizer = ClipTokenizer::from_folder(tokenizer_fixtures().join("sd15")).unwrap();
    assert_eq!(tokenizer.pad_token_id() as u64, expected["sd15_pad_token_id"].as_u64().unwrap());
    let cases = expected["prompts"].as_array().unwrap();
    assert!(cases.len() >= 60);
    let mut failures = Vec::new();
    for case in cases {
        let prompt = case["prompt"].as_str().unwrap();
        let untruncated = ids(&case["untruncated_ids"]);
        let encoding = tokenizer.encode(prompt).unwrap();
        check_encoding(&encoding, &case["sd15"], &format!("{prompt:?}"), &mut failures);
        check_eq(tokenizer.encode_untruncated(prompt).unwrap(), untruncated.clone(), format!("{prompt:?}: untruncated ids"), &mut failures);

        // diffusers' warning shows untruncated_ids[model_max_length - 1 : -1].
        let dropped = untruncated.len().saturating_sub(tokenizer.model_max_length());
        check_eq(encoding.truncated_ids.len(), dropped, format!("{prompt:?}: number of truncated tokens"), &mut failures);
        check_eq(encoding.was_truncated(), dropped > 0, format!("{prompt:?}: was_truncated"), &mut failures);
        let removed_text = tokenizer.decode(&encoding.truncated_ids, false).unwrap();
        check_eq(removed_text.as_str(), case["removed_text"].as_str().unwrap(), format!("{prompt:?}: removed text"), &mut failures);

        let decoded = tokenizer.decode(&untruncated, false).unwrap();
        check_eq(decoded.as_str(), case["decoded"].as_str().unwrap(), format!("{prompt:?}: decode"), &mut failures);
        let decoded = tokenizer.decode(&untruncated, true).unwrap();
        check_eq(decoded.as_str(), case["decoded_skip_special"].as_str().unwrap(), format!("{prompt:?}: decode skipping special tokens"), &mut failures);
    }
    assert_no_failures(failures);
}

#[test]
fn sd2_matches_transformers_on_every_prompt() {
    let expected = expected();
    let folder = sd2_folder();
    let tokenizer = ClipTokenizer::from_folder(&folder.0).unwrap();
    assert_eq!(tokenizer.pad_token_id() as u64, expected["sd2_pad_token_id"].as_u64().unwrap());
    let mut failures = Vec::new();
    for case in expected["prompts"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let encoding = tokenizer.encode(prompt).unwrap();
        check_encoding(&encoding, &case["sd2"], &format!("sd2 {prompt:?}"), &mut failures);
        let decoded = tokenizer.decode(&tokenizer.encode_untruncated(prompt).unwrap(), true).unwrap();
        check_eq(decoded.as_str(), case["sd2_decoded_skip_special"].as_str().unwrap(), format!("sd2 {prompt:?}: decode"), &mut failures);
    }
    assert_no_failures(failures);
}

#[test]
fn a_batch_equals_its_prompts_one_by_one() {
    let expected = expected();
    let tokenizer = ClipTokenizer::from_folder(tokenizer_fixtures().join("sd15")).unwrap();
    let cases = expected["prompts"].as_array().unwrap();
    let prompts: Vec<&str> = cases.iter().map(|case| case["prompt"].as_str().unwrap()).collect();
    let batch = tokenizer.encode_batch(&prompts).unwrap();
    assert_eq!(batch.len(), prompts.len());
    let mut failures = Vec::new();
    for (encoding, case) in batch.iter().zip(cases) {
        check_encoding(encoding, &case["sd15"], &format!("batch {:?}", case["prompt"]), &mut failures);
    }
    assert_no_failures(failures);

    let input_ids = input_ids_tensor(&batch, &Device::Cpu).unwrap();
    let mask = attention_mask_tensor(&batch, &Device::Cpu).unwrap();
    assert_eq!(input_ids.dims(), [prompts.len(), 77]);
    assert_eq!(mask.dims(), [prompts.len(), 77]);
    let rows = input_ids.to_vec2::<u32>().unwrap();
    assert_eq!(rows[0], batch[0].input_ids);
    assert_eq!(rows[prompts.len() - 1], batch[prompts.len() - 1].input_ids);
}

/// sd15 as transformers 5.x saves it (tokenizer.json + tokenizer_config.json only), with the
/// merges in tokenizers' current form (pairs) and in its older one ("a b" strings).
#[test]
fn sd15_saved_by_transformers_5_as_tokenizer_json_gives_the_same_ids() {
    let expected = expected();
    let sd15 = tokenizer_fixtures().join("sd15");
    let skeleton_dir = tokenizer_fixtures().join("sd15_tokenizer_json");
    let mut tokenizer_json: Value =
        serde_json::from_str(&std::fs::read_to_string(skeleton_dir.join("tokenizer.json")).unwrap()).unwrap();
    let vocab: Value = serde_json::from_str(&std::fs::read_to_string(sd15.join("vocab.json")).unwrap()).unwrap();
    let merges_txt = std::fs::read_to_string(sd15.join("merges.txt")).unwrap();
    let merge_lines: Vec<&str> = merges_txt.lines().skip(1).collect();
    tokenizer_json["model"]["vocab"] = vocab;

    let mut failures = Vec::new();
    for joined in [false, true] {
        tokenizer_json["model"]["merges"] = if joined {
            Value::from(merge_lines.clone())
        } else {
            Value::from(merge_lines.iter().map(|line| Value::from(line.split(' ').collect::<Vec<_>>())).collect::<Vec<_>>())
        };
        let folder = ScratchDir::new(if joined { "tokenizer-json-joined" } else { "tokenizer-json" });
        write_json(&folder.0.join("tokenizer.json"), &tokenizer_json);
        std::fs::copy(skeleton_dir.join("tokenizer_config.json"), folder.0.join("tokenizer_config.json")).unwrap();
        let tokenizer = ClipTokenizer::from_folder(&folder.0).unwrap();
        for case in expected["prompts"].as_array().unwrap() {
            let prompt = case["prompt"].as_str().unwrap();
            check_encoding(&tokenizer.encode(prompt).unwrap(), &case["sd15"], &format!("tokenizer.json {prompt:?}"), &mut failures);
        }
    }
    assert_no_failures(failures);
}

/// Which file wins, the flags of each special token, added tokens and model_max_length, as
/// transformers resolves them from the files of a folder.
#[test]
fn config_variants_match_transformers() {
    let expected = expected();
    let mut failures = Vec::new();
    for variant in expected["variants"].as_array().unwrap() {
        let name = variant["name"].as_str().unwrap();
        let folder = folder_with_sd15_vocab(name);
        write_json(&folder.0.join("tokenizer_config.json"), &variant["tokenizer_config"]);
        if let Some(map) = variant.get("special_tokens_map") {
            write_json(&folder.0.join("special_tokens_map.json"), map);
        }
        if let Some(added) = variant.get("added_tokens") {
            write_json(&folder.0.join("added_tokens.json"), added);
        }
        let tokenizer = match ClipTokenizer::from_folder(&folder.0) {
            Ok(tokenizer) => tokenizer,
            Err(e) => {
                failures.push(format!("{name}: {e}"));
                continue;
            }
        };
        check_eq(tokenizer.pad_token_id() as u64, variant["pad_token_id"].as_u64().unwrap(), format!("{name}: pad id"), &mut failures);
        check_eq(tokenizer.model_max_length() as u64, variant["model_max_length"].as_u64().unwrap(), format!("{name}: model_max_length"), &mut failures);
        for probe in variant["probes"].as_array().unwrap() {
            let prompt = probe["prompt"].as_str().unwrap();
            let encoding = tokenizer.encode(prompt).unwrap();
            check_encoding(&encoding, probe, &format!("{name} {prompt:?}"), &mut failures);
            let decoded = tokenizer.decode(&encoding.input_ids, true).unwrap();
            check_eq(decoded.as_str(), probe["decoded_skip_special"].as_str().unwrap(), format!("{name} {prompt:?}: decode"), &mut failures);
        }
    }
    assert_no_failures(failures);
}

fn load_error(folder: &Path) -> String {
    match ClipTokenizer::from_folder(folder) {
        Ok(_) => panic!("{} loaded", folder.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_folders_give_errors_that_name_the_file() {
    let missing = ScratchDir::new("missing");
    assert!(load_error(&missing.0).contains("vocab.json"));

    let no_merges = ScratchDir::new("no-merges");
    std::fs::copy(tokenizer_fixtures().join("sd15/vocab.json"), no_merges.0.join("vocab.json")).unwrap();
    assert!(load_error(&no_merges.0).contains("merges.txt"));

    let folder = folder_with_sd15_vocab("bad-vocab");
    std::fs::write(folder.0.join("vocab.json"), "{\"a\": 0, \"b\": ").unwrap();
    let message = load_error(&folder.0);
    assert!(message.contains("vocab.json") && message.contains("JSON"), "{message}");
    std::fs::write(folder.0.join("vocab.json"), "[\"a\", \"b\"]").unwrap();
    assert!(load_error(&folder.0).contains("vocab.json"));

    let folder = folder_with_sd15_vocab("bad-merges");
    std::fs::write(folder.0.join("merges.txt"), "#version: 0.2\ni n\nt h e\n").unwrap();
    let message = load_error(&folder.0);
    assert!(message.contains("merges.txt") && message.contains("line 3"), "{message}");
    std::fs::write(folder.0.join("merges.txt"), "#version: 0.2\ni n\nq \u{1F600}\n").unwrap();
    let message = load_error(&folder.0);
    assert!(message.contains("merges.txt") && message.contains("not in the vocabulary"), "{message}");

    let folder = folder_with_sd15_vocab("bad-config");
    std::fs::write(folder.0.join("tokenizer_config.json"), "{\"model_max_length\": \"77\"}").unwrap();
    let message = load_error(&folder.0);
    assert!(message.contains("tokenizer_config.json") && message.contains("model_max_length"), "{message}");
    std::fs::write(folder.0.join("tokenizer_config.json"), "{\"model_max_length\": 1000000000000000019884624838656}").unwrap();
    assert!(load_error(&folder.0).contains("model_max_length"));
    std::fs::write(folder.0.join("tokenizer_config.json"), "{\"model_max_length\": 1}").unwrap();
    assert!(load_error(&folder.0).contains("model_max_length"));
    std::fs::write(folder.0.join("tokenizer_config.json"), "{\"padding_side\": \"left\"}").unwrap();
    assert!(load_error(&folder.0).contains("padding_side"));
    std::fs::write(folder.0.join("tokenizer_config.json"), "{\"pad_token\": 7}").unwrap();
    let message = load_error(&folder.0);
    assert!(message.contains("tokenizer_config.json") && message.contains("pad_token"), "{message}");
    std::fs::write(folder.0.join("tokenizer_config.json"), "not json").unwrap();
    assert!(load_error(&folder.0).contains("tokenizer_config.json"));

    let folder = ScratchDir::new("bad-tokenizer-json");
    std::fs::write(folder.0.join("tokenizer.json"), r#"{"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": [["a", "b"], ["b", "c"]]}}"#).unwrap();
    let message = load_error(&folder.0);
    assert!(message.contains("tokenizer.json") && message.contains("model.merges[1]"), "{message}");
    std::fs::write(folder.0.join("tokenizer.json"), r#"{"model": {"type": "WordPiece", "vocab": {}, "merges": []}}"#).unwrap();
    assert!(load_error(&folder.0).contains("model.type"));

    let folder = folder_with_sd15_vocab("bad-special-tokens-map");
    std::fs::write(folder.0.join("tokenizer_config.json"), "{}").unwrap();
    std::fs::write(folder.0.join("special_tokens_map.json"), "{\"pad_token\": [\"!\"]}").unwrap();
    let message = load_error(&folder.0);
    assert!(message.contains("special_tokens_map.json") && message.contains("pad_token"), "{message}");
}

#[test]
fn a_folder_with_only_vocab_and_merges_uses_clip_defaults() {
    let folder = folder_with_sd15_vocab("defaults");
    let tokenizer = ClipTokenizer::from_folder(&folder.0).unwrap();
    assert_eq!((tokenizer.pad_token_id(), tokenizer.model_max_length()), (49407, 77));
    let encoding = tokenizer.encode("a photo of a cat").unwrap();
    assert_eq!(&encoding.input_ids[..8], [49406, 320, 1125, 539, 320, 2368, 49407, 49407]);
    assert_eq!(encoding.attention_mask.iter().sum::<u32>(), 7);
}
