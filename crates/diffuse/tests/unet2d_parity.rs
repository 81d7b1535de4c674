//! UNet2DModel against diffusers (fixtures: tools/fixtures/unet2d.py).
//!
//! Each case is a small random UNet saved by diffusers' `save_pretrained` (config.json and
//! safetensors weights) with an input, timesteps, optional class labels and diffusers'
//! output. Outputs must agree to 1e-4 of the output's largest magnitude (f32 arithmetic in
//! a different order: convolutions, group-norm statistics, softmax).

mod common;

use std::path::PathBuf;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use common::*;
use diffuse::loading::config::{parse_config, read_json_object};
use diffuse::models::unet_2d::{UNet2DModel, UNet2DModelConfig};

const TOLERANCE: f64 = 1e-4;

fn case_dir(name: &str) -> PathBuf {
    fixtures_dir().join("unet2d").join(name)
}

fn load_config(dir: &std::path::Path) -> UNet2DModelConfig {
    let path = dir.join("config.json");
    let map = read_json_object(&path).unwrap_or_else(|e| panic!("{e}"));
    parse_config(&map, &path).unwrap_or_else(|e| panic!("{e}"))
}

fn load_model(dir: &std::path::Path, config: &UNet2DModelConfig) -> diffuse::Result<UNet2DModel> {
    let weights = dir.join("diffusion_pytorch_model.safetensors");
    // SAFETY: the fixture files are not modified while mapped.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, &Device::Cpu)? };
    UNet2DModel::new(vb, config)
}

fn run_case(name: &str) {
    let dir = case_dir(name);
    let config = load_config(&dir);
    let model = load_model(&dir, &config).unwrap_or_else(|e| panic!("{name}: {e}"));
    let io = load_tensors(&dir.join("io.safetensors"));
    let output = model
        .forward(&io["sample"], &io["timesteps"], io.get("class_labels"))
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_close(&output, &io["output"], TOLERANCE, name);
}

#[test]
fn ddpm_cifar10_like() {
    run_case("ddpm_cifar10_like");
}

#[test]
fn deprecated_attention_names() {
    run_case("deprecated_attention_names");
}

#[test]
fn heads_three_levels() {
    run_case("heads_three_levels");
}

#[test]
fn class_conditional() {
    run_case("class_conditional");
}

#[test]
fn class_embed_timestep() {
    run_case("class_embed_timestep");
}

#[test]
fn learned_variance_scale_shift() {
    run_case("learned_variance_scale_shift");
}

#[test]
fn no_mid_attention() {
    run_case("no_mid_attention");
}

#[test]
fn fourier() {
    run_case("fourier");
}

#[test]
fn learned_time_embedding() {
    run_case("learned_time_embedding");
}

#[test]
fn ncsnpp_like_skip_blocks() {
    run_case("ncsnpp_like_skip_blocks");
}

/// The config fields and defaults match diffusers' `UNet2DModel.__init__`: every key the
/// fixture's config.json holds parses, and an empty config gives diffusers' defaults.
#[test]
fn config_defaults() {
    let config: UNet2DModelConfig =
        parse_config(&serde_json::Map::new(), std::path::Path::new("config.json")).unwrap();
    assert_eq!(config.block_out_channels, vec![224, 448, 672, 896]);
    assert_eq!(config.down_block_types, ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"]);
    assert_eq!(config.up_block_types, ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"]);
    assert_eq!(config.attention_head_dim, Some(8));
    assert_eq!(config.norm_num_groups, 32);
    assert_eq!(config.norm_eps, 1e-5);
    assert!(config.flip_sin_to_cos);
    assert_eq!(config.mid_block_type.as_deref(), Some("UNetMidBlock2D"));

    // An explicit null is None, not the default.
    let config = load_config(&case_dir("ddpm_cifar10_like"));
    assert_eq!(config.attention_head_dim, None);
    assert!(!config.flip_sin_to_cos);
    assert_eq!(config.freq_shift, 1.0);
}

/// A block type we do not implement is an error that names it (never a panic).
#[test]
fn unsupported_block_type_is_named() {
    let dir = case_dir("ddpm_cifar10_like");
    let mut config = load_config(&dir);
    config.down_block_types[1] = "CrossAttnDownBlock2D".to_string();
    let error = load_model(&dir, &config).expect_err("an unsupported down block must be refused").to_string();
    assert!(error.contains("CrossAttnDownBlock2D") && error.contains("down_block_types[1]"), "{error}");

    let mut config = load_config(&dir);
    config.up_block_types[0] = "KUpBlock2D".to_string();
    let error = load_model(&dir, &config).expect_err("an unsupported up block must be refused").to_string();
    assert!(error.contains("KUpBlock2D") && error.contains("up_block_types[0]"), "{error}");
}

/// A config value diffusers does not know, or a wrongly typed key, is an error naming the key.
#[test]
fn invalid_config_values_are_named() {
    let dir = case_dir("ddpm_cifar10_like");
    let mut config = load_config(&dir);
    config.time_embedding_type = "rotary".to_string();
    let error = load_model(&dir, &config).unwrap_err().to_string();
    assert!(error.contains("time_embedding_type") && error.contains("rotary"), "{error}");

    let mut config = load_config(&dir);
    config.resnet_time_scale_shift = "spatial".to_string();
    let error = load_model(&dir, &config).unwrap_err().to_string();
    assert!(error.contains("resnet_time_scale_shift") && error.contains("spatial"), "{error}");

    let path = dir.join("config.json");
    let mut map = read_json_object(&path).unwrap();
    map.insert("block_out_channels".to_string(), serde_json::json!("wide"));
    let error = parse_config::<UNet2DModelConfig>(&map, &path).unwrap_err().to_string();
    assert!(error.contains("block_out_channels"), "{error}");
}

/// Class-conditional models need labels; unconditional ones refuse them.
#[test]
fn class_labels_are_checked() {
    let dir = case_dir("class_conditional");
    let model = load_model(&dir, &load_config(&dir)).unwrap();
    let io = load_tensors(&dir.join("io.safetensors"));
    let error = model.forward(&io["sample"], &io["timesteps"], None).unwrap_err().to_string();
    assert!(error.contains("class_labels"), "{error}");

    let dir = case_dir("no_mid_attention");
    let model = load_model(&dir, &load_config(&dir)).unwrap();
    let io = load_tensors(&dir.join("io.safetensors"));
    let labels = candle_core::Tensor::new(&[1u32, 2], &Device::Cpu).unwrap();
    assert!(model.forward(&io["sample"], &io["timesteps"], Some(&labels)).is_err());
}

/// Weights of the wrong shape for the config are an error naming the tensor.
#[test]
fn mismatched_weights_are_named() {
    let dir = case_dir("ddpm_cifar10_like");
    let mut config = load_config(&dir);
    config.block_out_channels = vec![8, 32];
    let error = load_model(&dir, &config).unwrap_err().to_string();
    assert!(error.contains("down_blocks.1"), "{error}");
}
