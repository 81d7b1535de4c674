//! UNet2DConditionModel against diffusers (fixtures: tools/fixtures/unet2d_condition.py).
//!
//! Each case is a small random conditional UNet saved by diffusers' `save_pretrained`
//! (config.json and float16 safetensors weights, which diffusers and we load into float32)
//! with a latent sample, timesteps, text-like context and diffusers' output. Outputs must
//! agree to 1e-4 of the output's largest magnitude (f32 arithmetic in a different order:
//! convolutions, normalisation statistics, softmax).

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use common::*;
use diffuse::loading::config::{parse_config, read_json_object};
use diffuse::models::unet_2d::SampleSize;
use diffuse::models::unet_2d_condition::{PerBlock, UNet2DConditionModel, UNet2DConditionModelConfig};

const TOLERANCE: f64 = 1e-4;

fn case_dir(name: &str) -> PathBuf {
    fixtures_dir().join("unet2d_condition").join(name)
}

fn load_config(path: &Path) -> UNet2DConditionModelConfig {
    let map = read_json_object(path).unwrap_or_else(|e| panic!("{e}"));
    parse_config(&map, path).unwrap_or_else(|e| panic!("{e}"))
}

fn load_model(dir: &Path, config: &UNet2DConditionModelConfig) -> diffuse::Result<UNet2DConditionModel> {
    let weights = dir.join("diffusion_pytorch_model.safetensors");
    // SAFETY: the fixture files are not modified while mapped.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, &Device::Cpu)? };
    UNet2DConditionModel::new(vb, config)
}

fn run_case(name: &str) {
    let dir = case_dir(name);
    let config = load_config(&dir.join("config.json"));
    let model = load_model(&dir, &config).unwrap_or_else(|e| panic!("{name}: {e}"));
    let io = load_tensors(&dir.join("io.safetensors"));
    let output = model
        .forward_with_class_labels(&io["sample"], &io["timesteps"], &io["encoder_hidden_states"], io.get("class_labels"))
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_close(&output, &io["output"], TOLERANCE, name);
}

#[test]
fn sd15_like() {
    run_case("sd15_like");
}

#[test]
fn sd21_like() {
    run_case("sd21_like");
}

#[test]
fn three_levels_non_square() {
    run_case("three_levels_non_square");
}

#[test]
fn inpainting() {
    run_case("inpainting");
}

#[test]
fn only_cross_attention() {
    run_case("only_cross_attention");
}

#[test]
fn transformer_layers_2() {
    run_case("transformer_layers_2");
}

#[test]
fn time_options() {
    run_case("time_options");
}

#[test]
fn sd15_structure() {
    run_case("sd15_structure");
}

/// The config fields and defaults match diffusers' `UNet2DConditionModel.__init__`.
#[test]
fn config_defaults() {
    let config: UNet2DConditionModelConfig = parse_config(&serde_json::Map::new(), Path::new("config.json")).unwrap();
    assert_eq!(config.block_out_channels, vec![320, 640, 1280, 1280]);
    assert_eq!(
        config.down_block_types,
        ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
    );
    assert_eq!(config.up_block_types, ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]);
    assert_eq!(config.mid_block_type.as_deref(), Some("UNetMidBlock2DCrossAttn"));
    assert_eq!(config.attention_head_dim, PerBlock::One(8));
    assert_eq!(config.cross_attention_dim, 1280);
    assert_eq!(config.layers_per_block, PerBlock::One(2));
    assert_eq!(config.transformer_layers_per_block, PerBlock::One(1));
    assert_eq!(config.only_cross_attention, PerBlock::One(false));
    assert_eq!(config.norm_num_groups, Some(32));
    assert_eq!(config.norm_eps, 1e-5);
    assert_eq!((config.in_channels, config.out_channels), (4, 4));
    assert!(config.flip_sin_to_cos && !config.use_linear_projection && !config.upcast_attention);
    assert_eq!((config.conv_in_kernel, config.conv_out_kernel), (3, 3));
    assert_eq!(config.sample_size, None);
    assert_eq!(config.sample_size_hw(), (64, 64));
}

/// The Stable Diffusion configs parse into what they say.
#[test]
fn sd_configs_parse() {
    let configs = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let sd15 = load_config(&configs.join("sd15/unet/config.json"));
    assert_eq!(sd15.cross_attention_dim, 768);
    assert_eq!(sd15.attention_head_dim, PerBlock::One(8));
    assert_eq!(sd15.sample_size_hw(), (64, 64));
    let sd21 = load_config(&configs.join("sd21/unet/config.json"));
    assert_eq!(sd21.cross_attention_dim, 1024);
    assert_eq!(sd21.attention_head_dim, PerBlock::List(vec![5, 10, 20, 20]));
    assert!(sd21.use_linear_projection && sd21.upcast_attention);
    assert_eq!(sd21.sample_size_hw(), (96, 96));

    let non_square = load_config(&case_dir("three_levels_non_square").join("config.json"));
    assert_eq!(non_square.sample_size, Some(SampleSize::HeightWidth([10, 6])));
    assert_eq!(non_square.sample_size_hw(), (10, 6));
}

fn parse_with(key: &str, value: serde_json::Value) -> diffuse::Result<UNet2DConditionModelConfig> {
    let mut map = serde_json::Map::new();
    map.insert(key.to_string(), value);
    parse_config(&map, Path::new("config.json"))
}

/// `cross_attention_dim` is one number; a list of equal widths means the same, a list of
/// different widths is refused naming the key. Wrongly typed keys are named too.
#[test]
fn config_types_are_checked() {
    assert_eq!(parse_with("cross_attention_dim", serde_json::json!([768, 768])).unwrap().cross_attention_dim, 768);
    let error = parse_with("cross_attention_dim", serde_json::json!([768, 1024])).unwrap_err().to_string();
    assert!(error.contains("cross_attention_dim") && error.contains("not supported"), "{error}");
    let error = parse_with("attention_head_dim", serde_json::json!("eight")).unwrap_err().to_string();
    assert!(error.contains("attention_head_dim"), "{error}");
    assert_eq!(
        parse_with("only_cross_attention", serde_json::json!([true, false])).unwrap().only_cross_attention,
        PerBlock::List(vec![true, false])
    );
}

/// Settings of other model families are refused with an error naming the key, never a panic
/// or a silently different model.
#[test]
fn unsupported_settings_are_named() {
    let dir = case_dir("sd15_like");
    let base = load_config(&dir.join("config.json"));
    let refused = |edit: &dyn Fn(&mut UNet2DConditionModelConfig), key: &str| {
        let mut config = base.clone();
        edit(&mut config);
        let error = load_model(&dir, &config).expect_err(key).to_string();
        assert!(error.contains(key), "{key}: {error}");
    };
    refused(&|c| c.addition_embed_type = Some("text_time".into()), "addition_embed_type");
    refused(&|c| c.encoder_hid_dim = Some(32), "encoder_hid_dim");
    refused(&|c| c.encoder_hid_dim_type = Some("image_proj".into()), "encoder_hid_dim_type");
    refused(&|c| c.class_embed_type = Some("projection".into()), "class_embed_type");
    // LCM-distilled UNets load, but only with their guidance projection's weights.
    refused(&|c| c.time_cond_proj_dim = Some(256), "time_embedding.cond_proj");
    refused(&|c| c.num_attention_heads = Some(PerBlock::One(8)), "num_attention_heads");
    refused(&|c| c.dual_cross_attention = true, "dual_cross_attention");
    refused(&|c| c.attention_type = "gated".into(), "attention_type");
    refused(&|c| c.class_embeddings_concat = true, "class_embeddings_concat");
    refused(&|c| c.norm_num_groups = None, "norm_num_groups");
    refused(&|c| c.time_embedding_type = "learned".into(), "time_embedding_type");
    refused(&|c| c.mid_block_type = Some("UNetMidBlock2DSimpleCrossAttn".into()), "mid_block_type");
    refused(&|c| c.down_block_types[1] = "SimpleCrossAttnDownBlock2D".into(), "down_block_types[1]");
    refused(&|c| c.up_block_types[0] = "AttnUpBlock2D".into(), "up_block_types[0]");
    refused(&|c| c.attention_head_dim = PerBlock::List(vec![4, 4, 4]), "attention_head_dim");
    refused(&|c| c.layers_per_block = PerBlock::List(vec![1]), "layers_per_block");
    refused(&|c| c.act_fn = "tanh".into(), "act_fn");
    refused(&|c| c.conv_in_kernel = 2, "conv_in_kernel");
    // More heads than channels leaves no channels per head.
    refused(&|c| c.attention_head_dim = PerBlock::One(64), "down_block_types[0]");
}

/// Inputs of the wrong shape are errors, not panics; class labels only where there is a table.
#[test]
fn inputs_are_checked() {
    let dir = case_dir("sd15_like");
    let model = load_model(&dir, &load_config(&dir.join("config.json"))).unwrap();
    let io = load_tensors(&dir.join("io.safetensors"));
    let (sample, timesteps, context) = (&io["sample"], &io["timesteps"], &io["encoder_hidden_states"]);
    let wrong_width = Tensor::zeros((2, 7, 5), DType::F32, &Device::Cpu).unwrap();
    let error = model.forward(sample, timesteps, &wrong_width).unwrap_err().to_string();
    assert!(error.contains("encoder_hidden_states"), "{error}");
    let wrong_channels = Tensor::zeros((2, 9, 8, 8), DType::F32, &Device::Cpu).unwrap();
    assert!(model.forward(&wrong_channels, timesteps, context).is_err());
    // A guidance embedding for a UNet that has no time_cond_proj_dim.
    let cond = Tensor::zeros((2, 16), DType::F32, &Device::Cpu).unwrap();
    let error = model.forward_with_conditions(sample, timesteps, context, None, Some(&cond)).unwrap_err().to_string();
    assert!(error.contains("time_cond_proj_dim"), "{error}");
    let three_timesteps = Tensor::new(&[1f32, 2., 3.], &Device::Cpu).unwrap();
    assert!(model.forward(sample, &three_timesteps, context).is_err());
    let labels = Tensor::new(&[1u32, 2], &Device::Cpu).unwrap();
    assert!(model.forward_with_class_labels(sample, timesteps, context, Some(&labels)).is_err());

    // One timestep for the whole batch is broadcast, as in diffusers.
    let single = model.forward(sample, &Tensor::new(&[981f32], &Device::Cpu).unwrap(), context).unwrap();
    let both = model.forward(sample, &Tensor::new(&[981f32, 981.], &Device::Cpu).unwrap(), context).unwrap();
    assert_close(&single, &both, 0.0, "broadcast timestep");

    let dir = case_dir("time_options");
    let model = load_model(&dir, &load_config(&dir.join("config.json"))).unwrap();
    let io = load_tensors(&dir.join("io.safetensors"));
    let error = model.forward(&io["sample"], &io["timesteps"], &io["encoder_hidden_states"]).unwrap_err().to_string();
    assert!(error.contains("class_labels"), "{error}");
}

/// Builds the full Stable Diffusion UNet of `config_path` with zero weights and runs one
/// 16×16 latent through it, checking the output shape (and that the channel plumbing, head
/// splits and weight shapes of the real configs are consistent).
fn full_size_shape(config_path: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(config_path);
    let config = load_config(&path);
    let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
    let model = UNet2DConditionModel::new(vb, &config).unwrap_or_else(|e| panic!("{config_path}: {e}"));
    let sample = Tensor::randn(0f32, 1., (1, 4, 16, 16), &Device::Cpu).unwrap();
    let context = Tensor::randn(0f32, 1., (1, 77, config.cross_attention_dim), &Device::Cpu).unwrap();
    let timesteps = Tensor::new(&[999f32], &Device::Cpu).unwrap();
    let output = model.forward(&sample, &timesteps, &context).unwrap();
    assert_eq!(output.dims(), &[1, 4, 16, 16]);
}

#[test]
fn sd15_full_size_shape() {
    full_size_shape("configs/sd15/unet/config.json");
}

#[test]
fn sd21_full_size_shape() {
    full_size_shape("configs/sd21/unet/config.json");
}
