//! CLIPTextModel against transformers (fixtures: tools/fixtures/clip_text.py): every hidden
//! state, the final layer norm output and the clip-skip embeddings, for quick_gelu (SD 1.x)
//! and gelu (SD 2.x) encoders, with and without the `text_model.` key prefix. Tolerance 1e-4
//! of each tensor's scale.

mod common;

use candle_core::{DType, Device};
use common::*;
use diffuse::loading::config::{parse_config, read_json_object};
use diffuse::loading::weights::var_builder;
use diffuse::models::clip_text::{ClipTextConfig, ClipTextModel};

const TOLERANCE: f64 = 1e-4;

fn check(case: &str) {
    let dir = fixtures_dir().join("clip_text").join(case);
    let config_path = dir.join("config.json");
    let config: ClipTextConfig = parse_config(&read_json_object(&config_path).unwrap(), &config_path).unwrap();
    let vb = var_builder(&[dir.join("model.safetensors")], DType::F32, &Device::Cpu).unwrap();
    let model = ClipTextModel::new(vb, &config).unwrap();
    let io = load_tensors(&dir.join("io.safetensors"));
    let ids = io["input_ids"].to_dtype(DType::U32).unwrap();
    let output = model.forward(&ids).unwrap();
    assert_eq!(output.hidden_states.len(), config.num_hidden_layers + 1);
    for (i, hidden) in output.hidden_states.iter().enumerate() {
        assert_close(hidden, &io[&format!("hidden_state_{i}")], TOLERANCE, &format!("{case}: hidden state {i}"));
    }
    assert_close(&output.last_hidden_state, &io["last_hidden_state"], TOLERANCE, &format!("{case}: last hidden state"));
    assert_close(&model.encode(&ids, None).unwrap(), &io["last_hidden_state"], TOLERANCE, &format!("{case}: encode"));
    for skip in [1, 2] {
        let embeds = model.encode(&ids, Some(skip)).unwrap();
        assert_close(&embeds, &io[&format!("clip_skip_{skip}")], TOLERANCE, &format!("{case}: clip skip {skip}"));
    }
    assert!(model.encode(&ids, Some(config.num_hidden_layers)).is_err(), "{case}: clip skip past the first layer");
}

#[test]
fn quick_gelu_without_prefix() {
    check("quick_gelu");
}

#[test]
fn gelu_with_text_model_prefix() {
    check("gelu");
}
