//! AutoencoderKL against diffusers (fixtures: tools/fixtures/autoencoder_kl.py).
//!
//! Each case is a small random VAE saved by diffusers' `save_pretrained` (config.json and
//! safetensors weights) with an input image, the posterior diffusers' encoder gave (mean,
//! clamped log-variance), a sample drawn from it with a seeded `torch.Generator`, its mode,
//! and the decoding of a random latent. Everything must agree to 1e-4 of the reference's
//! largest magnitude (f32 arithmetic in a different order: convolutions, group-norm
//! statistics, softmax); latent tensors are compared channel by channel, so that a channel
//! with a huge clamped variance does not hide the others.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use common::*;
use diffuse::loading::config::{parse_config, read_json_object};
use diffuse::models::autoencoder_kl::{AutoencoderKL, AutoencoderKLConfig};
use diffuse::models::unet_2d::SampleSize;
use diffuse::models::vae::DiagonalGaussianDistribution;
use diffuse::rng::TorchGenerator;

const TOLERANCE: f64 = 1e-4;

fn case_dir(name: &str) -> PathBuf {
    fixtures_dir().join("autoencoder_kl").join(name)
}

fn load_config(dir: &Path) -> AutoencoderKLConfig {
    let path = dir.join("config.json");
    let map = read_json_object(&path).unwrap_or_else(|e| panic!("{e}"));
    parse_config(&map, &path).unwrap_or_else(|e| panic!("{e}"))
}

fn load_model(dir: &Path, config: &AutoencoderKLConfig) -> diffuse::Result<AutoencoderKL> {
    let weights = dir.join("diffusion_pytorch_model.safetensors");
    // SAFETY: the fixture files are not modified while mapped.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, &Device::Cpu)? };
    AutoencoderKL::new(vb, config)
}

/// Compares `[B, C, h, w]` latents one channel at a time.
fn assert_close_per_channel(actual: &Tensor, expected: &Tensor, what: &str) {
    assert_eq!(actual.dims(), expected.dims(), "{what}: shape");
    for channel in 0..expected.dim(1).unwrap() {
        let actual = actual.narrow(1, channel, 1).unwrap();
        let expected = expected.narrow(1, channel, 1).unwrap();
        assert_close(&actual, &expected, TOLERANCE, &format!("{what}, channel {channel}"));
    }
}

fn run_case(name: &str) {
    let dir = case_dir(name);
    let config = load_config(&dir);
    let model = load_model(&dir, &config).unwrap_or_else(|e| panic!("{name}: {e}"));
    let io = load_tensors(&dir.join("io.safetensors"));

    let posterior = model.encode(&io["image"]).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_close_per_channel(posterior.mean(), &io["mean"], &format!("{name}: mean"));
    assert_close_per_channel(posterior.logvar(), &io["logvar"], &format!("{name}: logvar"));
    assert_close_per_channel(&posterior.mode(), &io["mode"], &format!("{name}: mode"));

    let seed = io["sample_seed"].to_scalar::<i64>().unwrap();
    let mut generator = TorchGenerator::new(seed as u64);
    let sample = posterior.sample(&mut generator).unwrap();
    assert_close_per_channel(&sample, &io["sample"], &format!("{name}: sample"));

    let decoded = model.decode(&io["latent"]).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_close(&decoded, &io["decoded"], TOLERANCE, &format!("{name}: decoded"));
}

#[test]
fn sd_like() {
    run_case("sd_like");
}

#[test]
fn no_quant_conv_non_square() {
    run_case("no_quant_conv_non_square");
}

#[test]
fn no_mid_attention_clamped() {
    run_case("no_mid_attention_clamped");
    // The fixture pushes one log-variance channel under the clamp and one above it.
    let io = load_tensors(&case_dir("no_mid_attention_clamped").join("io.safetensors"));
    let logvar = &io["logvar"];
    let low = to_vec_f32(&logvar.narrow(1, 0, 1).unwrap());
    let high = to_vec_f32(&logvar.narrow(1, 1, 1).unwrap());
    assert!(low.contains(&-30.0) && high.contains(&20.0), "the fixture no longer reaches the clamp");
}

#[test]
fn deprecated_attention_names() {
    run_case("deprecated_attention_names");
}

/// The config fields and defaults match diffusers' `AutoencoderKL.__init__`.
#[test]
fn config_defaults_and_fields() {
    let config: AutoencoderKLConfig = parse_config(&serde_json::Map::new(), Path::new("config.json")).unwrap();
    assert_eq!(config, AutoencoderKLConfig::default());
    assert_eq!(config.in_channels, 3);
    assert_eq!(config.out_channels, 3);
    assert_eq!(config.down_block_types, ["DownEncoderBlock2D"]);
    assert_eq!(config.up_block_types, ["UpDecoderBlock2D"]);
    assert_eq!(config.block_out_channels, [64]);
    assert_eq!(config.layers_per_block, 1);
    assert_eq!(config.act_fn, "silu");
    assert_eq!(config.latent_channels, 4);
    assert_eq!(config.norm_num_groups, 32);
    assert_eq!(config.sample_size, SampleSize::Square(32));
    assert_eq!(config.scaling_factor, 0.18215);
    assert_eq!(config.shift_factor, None);
    assert_eq!(config.latents_mean, None);
    assert_eq!(config.latents_std, None);
    assert!(config.force_upcast && config.use_quant_conv && config.use_post_quant_conv && config.mid_block_add_attention);

    let config = load_config(&case_dir("no_quant_conv_non_square"));
    assert_eq!(config.sample_size, SampleSize::HeightWidth([32, 24]));
    assert_eq!(config.scaling_factor, 1.5305);
    assert_eq!(config.shift_factor, Some(0.0609));
    assert_eq!(config.latents_mean, Some(vec![0.1, -0.2, 0.3]));
    assert_eq!(config.latents_std, Some(vec![1.5, 2.5, 3.5]));
    assert!(!config.force_upcast && !config.use_quant_conv && !config.use_post_quant_conv);

    let config = load_config(&case_dir("no_mid_attention_clamped"));
    assert!(!config.mid_block_add_attention);
    assert_eq!(config.act_fn, "mish");
}

#[test]
fn scale_factor() {
    let dir = case_dir("sd_like");
    assert_eq!(load_model(&dir, &load_config(&dir)).unwrap().scale_factor(), 8);
    let dir = case_dir("no_mid_attention_clamped");
    assert_eq!(load_model(&dir, &load_config(&dir)).unwrap().scale_factor(), 4);
}

/// A block type we do not implement, or a block list that does not match the widths, is an
/// error that names the key (never a panic).
#[test]
fn invalid_configs_are_named() {
    let dir = case_dir("sd_like");
    let mut config = load_config(&dir);
    config.down_block_types[2] = "AttnDownEncoderBlock2D".to_string();
    let error = load_model(&dir, &config).expect_err("an unsupported down block must be refused").to_string();
    assert!(error.contains("AttnDownEncoderBlock2D") && error.contains("down_block_types[2]"), "{error}");

    let mut config = load_config(&dir);
    config.up_block_types[0] = "AttnUpDecoderBlock2D".to_string();
    let error = load_model(&dir, &config).expect_err("an unsupported up block must be refused").to_string();
    assert!(error.contains("AttnUpDecoderBlock2D") && error.contains("up_block_types[0]"), "{error}");

    let mut config = load_config(&dir);
    config.up_block_types.pop();
    let error = load_model(&dir, &config).unwrap_err().to_string();
    assert!(error.contains("up_block_types"), "{error}");

    let mut config = load_config(&dir);
    config.block_out_channels.clear();
    let error = load_model(&dir, &config).unwrap_err().to_string();
    assert!(error.contains("block_out_channels"), "{error}");

    let mut config = load_config(&dir);
    config.act_fn = "tanhshrink".to_string();
    let error = load_model(&dir, &config).unwrap_err().to_string();
    assert!(error.contains("act_fn") && error.contains("tanhshrink"), "{error}");

    let path = dir.join("config.json");
    let mut map = read_json_object(&path).unwrap();
    map.insert("scaling_factor".to_string(), serde_json::json!("small"));
    let error = parse_config::<AutoencoderKLConfig>(&map, &path).unwrap_err().to_string();
    assert!(error.contains("scaling_factor"), "{error}");
}

/// Weights of the wrong shape for the config are an error naming the tensor.
#[test]
fn mismatched_weights_are_named() {
    let dir = case_dir("sd_like");
    let mut config = load_config(&dir);
    config.latent_channels = 8;
    let error = load_model(&dir, &config).unwrap_err().to_string();
    assert!(error.contains("encoder.conv_out"), "{error}");
}

/// Inputs of the wrong shape are refused with a message, not a panic.
#[test]
fn wrong_inputs_are_refused() {
    let dir = case_dir("sd_like");
    let model = load_model(&dir, &load_config(&dir)).unwrap();
    let latents = Tensor::zeros((1, 4, 4, 4), DType::F32, &Device::Cpu).unwrap();
    let error = model.encode(&latents).unwrap_err().to_string();
    assert!(error.contains("[B, 3, H, W]"), "{error}");
    let image = Tensor::zeros((1, 3, 32, 32), DType::F32, &Device::Cpu).unwrap();
    let error = model.decode(&image).unwrap_err().to_string();
    assert!(error.contains("[B, 4, H, W]"), "{error}");

    let odd = Tensor::zeros((1, 3, 2, 2), DType::F32, &Device::Cpu).unwrap();
    assert!(DiagonalGaussianDistribution::new(&odd).is_err());
}

/// Stable Diffusion 1.5's full VAE builds from its config and decodes a latent to 8× its
/// size (zero weights: this checks the architecture's shapes, not its values).
#[test]
fn sd15_vae_shapes() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/sd15/vae/config.json");
    let map = read_json_object(&path).unwrap();
    let config: AutoencoderKLConfig = parse_config(&map, &path).unwrap();
    let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
    let model = AutoencoderKL::new(vb, &config).unwrap();
    assert_eq!(model.scale_factor(), 8);
    let latents = Tensor::zeros((1, 4, 8, 8), DType::F32, &Device::Cpu).unwrap();
    let decoded = model.decode(&latents).unwrap();
    assert_eq!(decoded.dims(), [1, 3, 64, 64]);
}
