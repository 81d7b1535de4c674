//! AutoencoderTiny (TAESD) against diffusers (fixtures: tools/fixtures/vae_taesd_tiling.py): a
//! small seeded random AutoencoderTiny in diffusers' folder layout, its encoder's latents and
//! its decoder's images (from latents past the ±3 tanh clamp) to 1e-4 of the reference's
//! scale; the config's fields and defaults; and what `--vae` refuses. The pipelines that use it
//! as their VAE are in sd_pipeline_parity.rs and img2img_parity.rs.

mod common;

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use common::*;
use diffuse::loading::config::{parse_config, read_json_object};
use diffuse::models::autoencoder_tiny::{AutoencoderTiny, AutoencoderTinyConfig};
use diffuse::pipelines::autoencoder::{Autoencoder, AutoencoderConfig};
use diffuse::pipelines::stable_diffusion::StableDiffusionPipeline;

const TOLERANCE: f64 = 1e-4;

fn taesd_dir() -> PathBuf {
    fixtures_dir().join("vae").join("taesd")
}

fn load() -> AutoencoderTiny {
    match Autoencoder::load(&taesd_dir(), None, DType::F32, &Device::Cpu).unwrap() {
        Autoencoder::Tiny(model) => model,
        other => panic!("loaded as {}", other.class_name()),
    }
}

#[test]
fn encode_decode_and_latent_scaling_match_diffusers() {
    let model = load();
    let io = load_tensors(&fixtures_dir().join("vae").join("taesd_io.safetensors"));
    assert_close(&model.encode(&io["image"]).unwrap(), &io["latents"], TOLERANCE, "encode");
    assert_close(&model.decode(&io["z"]).unwrap(), &io["decoded"], TOLERANCE, "decode");
    assert_close(&model.scale_latents(&io["z"]).unwrap(), &io["scaled"], 1e-6, "scale_latents");
    assert_close(&model.unscale_latents(&io["scaled"]).unwrap(), &io["unscaled"], 1e-6, "unscale_latents");
    assert_eq!(model.scale_factor(), 8);
}

/// AutoencoderTiny's own tiling (`_tiled_encode`, `_tiled_decode`: a blend mask ramping over
/// the overlap), with the tile sizes set small on both sides (128 pixels, 16 latents) so that a
/// 144-pixel image tiles.
#[test]
fn tiled_encode_and_decode_match_diffusers() {
    let mut model = load();
    let io = load_tensors(&fixtures_dir().join("vae").join("taesd_tiled_io.safetensors"));
    let image = ((io["pixels"].to_dtype(DType::F32).unwrap() / 127.5).unwrap() - 1.0).unwrap();
    let plain = model.decode(&io["z"]).unwrap();
    model.enable_tiling();
    (model.tile_sample_min_size, model.tile_latent_min_size) = (128, 16);
    assert_close(&model.encode(&image).unwrap(), &io["latents"], TOLERANCE, "tiled encode");
    let decoded = model.decode(&io["z"]).unwrap();
    assert_close(&decoded, &io["decoded"], TOLERANCE, "tiled decode");
    assert!(max_relative_error(&to_vec_f32(&plain), &to_vec_f32(&decoded)) > 0.05, "tiling changed nothing");
    // Slicing a batch gives each image as alone.
    model.enable_slicing();
    let batch = Tensor::cat(&[&io["z"], &io["z"]], 0).unwrap();
    let decoded_batch = model.decode(&batch).unwrap();
    assert_close(&decoded_batch.narrow(0, 1, 1).unwrap(), &io["decoded"], TOLERANCE, "sliced tiled decode");
}

/// The decoder's soft clamp and [0, 1] → [-1, 1] mapping, and the encoder's [-1, 1] → [0, 1]
/// mapping, are each needed: without them the outputs are far off.
#[test]
fn the_fixture_is_sensitive_to_the_clamp() {
    let model = load();
    let io = load_tensors(&fixtures_dir().join("vae").join("taesd_io.safetensors"));
    // Latents inside ±3 everywhere decode differently from the originals: the clamp is active.
    let inside = (io["z"].clamp(-2.9f32, 2.9f32).unwrap()).contiguous().unwrap();
    let err = max_relative_error(&to_vec_f32(&model.decode(&inside).unwrap()), &to_vec_f32(&io["decoded"]));
    assert!(err > 1e-2, "clamped latents decode the same ({err:e}): the fixture does not exercise the clamp");
}

#[test]
fn config_fields_and_defaults_match_diffusers() {
    let config: AutoencoderTinyConfig = parse_config(&serde_json::Map::new(), std::path::Path::new("config.json")).unwrap();
    assert_eq!(config, AutoencoderTinyConfig::default());
    assert_eq!(config.num_encoder_blocks, [1, 3, 3, 3]);
    assert_eq!(config.num_decoder_blocks, [3, 3, 3, 1]);
    assert_eq!((config.scaling_factor, config.latent_magnitude, config.latent_shift), (1.0, 3.0, 0.5));
    // madebyollin/taesd's config.json (an integer latent_magnitude, as diffusers writes it).
    let taesd = serde_json::json!({
        "_class_name": "AutoencoderTiny", "_diffusers_version": "0.20.0.dev0", "act_fn": "relu",
        "decoder_block_out_channels": [64, 64, 64, 64], "encoder_block_out_channels": [64, 64, 64, 64],
        "force_upcast": false, "in_channels": 3, "latent_channels": 4, "latent_magnitude": 3,
        "latent_shift": 0.5, "num_decoder_blocks": [3, 3, 3, 1], "num_encoder_blocks": [1, 3, 3, 3],
        "out_channels": 3, "scaling_factor": 1.0, "upsampling_scaling_factor": 2
    });
    let map = taesd.as_object().unwrap().clone();
    let config = match AutoencoderConfig::from_json(&map, std::path::Path::new("taesd/config.json")).unwrap() {
        AutoencoderConfig::Tiny(config) => config,
        other => panic!("{other:?}"),
    };
    assert_eq!(config, AutoencoderTinyConfig::default());
    // The full-size architecture builds and maps 8×8 latents to 64×64 images.
    let model = AutoencoderTiny::new(VarBuilder::zeros(DType::F32, &Device::Cpu), &config).unwrap();
    let image = model.decode(&Tensor::zeros((1, 4, 8, 8), DType::F32, &Device::Cpu).unwrap()).unwrap();
    assert_eq!(image.dims(), [1, 3, 64, 64]);
    let latents = model.encode(&image).unwrap();
    assert_eq!(latents.dims(), [1, 4, 8, 8]);
}

#[test]
fn bad_configs_and_inputs_are_refused() {
    let path = taesd_dir().join("config.json");
    let map = read_json_object(&path).unwrap();
    let check = |key: &str, value: serde_json::Value, needle: &str| {
        let mut map = map.clone();
        map.insert(key.to_string(), value);
        let error = match AutoencoderConfig::from_json(&map, &path) {
            Err(e) => e.to_string(),
            Ok(config) => Autoencoder::new(VarBuilder::zeros(DType::F32, &Device::Cpu), &config).unwrap_err().to_string(),
        };
        assert!(error.contains(needle), "{key}: {error}");
    };
    check("num_encoder_blocks", serde_json::json!([1, 1]), "same length as `num_encoder_blocks`");
    check("decoder_block_out_channels", serde_json::json!([8, 16, 16, 16]), "must all be equal");
    check("upsample_fn", serde_json::json!("bicubic"), "upsample_fn");
    check("act_fn", serde_json::json!("tanhshrink"), "tanhshrink");
    check("latent_magnitude", serde_json::json!("big"), "latent_magnitude");
    check("_class_name", serde_json::json!("UNet2DConditionModel"), "`UNet2DConditionModel` (supported: AutoencoderKL, AutoencoderTiny)");

    let model = load();
    let error = model.decode(&Tensor::zeros((1, 3, 8, 8), DType::F32, &Device::Cpu).unwrap()).unwrap_err().to_string();
    assert!(error.contains("[B, 4, H, W]"), "{error}");
}

/// `--vae` with something that is not an autoencoder, or whose latents are not the UNet's input.
#[test]
fn replacing_the_vae_refuses_what_does_not_fit() {
    let sd1 = fixtures_dir().join("sd").join("sd1");
    let mut pipeline = StableDiffusionPipeline::load(&sd1, None, &[], None, &Device::Cpu, DType::F32).unwrap();
    // A UNet folder.
    let error = pipeline.replace_vae(&sd1.join("unet"), None).unwrap_err().to_string();
    assert!(error.contains("not an autoencoder") && error.contains("UNet2DConditionModel"), "{error}");
    // A pipeline folder.
    let error = pipeline.replace_vae(&sd1, None).unwrap_err().to_string();
    assert!(error.contains("not an autoencoder folder") && error.contains("vae/"), "{error}");
    // A file, and a missing path.
    let error = pipeline.replace_vae(&taesd_dir().join("config.json"), None).unwrap_err().to_string();
    assert!(error.contains("not an autoencoder folder"), "{error}");
    // Other latent channels: both named.
    let tmp = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("diffuse-taesd-16");
    std::fs::create_dir_all(&tmp).unwrap();
    let mut map = read_json_object(&taesd_dir().join("config.json")).unwrap();
    map.insert("latent_channels".into(), serde_json::json!(16));
    std::fs::write(tmp.join("config.json"), serde_json::to_string(&map).unwrap()).unwrap();
    let weights = candle_core::safetensors::load(taesd_dir().join("diffusion_pytorch_model.safetensors"), &Device::Cpu).unwrap();
    let mut weights: std::collections::HashMap<String, Tensor> = weights;
    weights.insert("encoder.layers.9.weight".into(), Tensor::zeros((16, 8, 3, 3), DType::F32, &Device::Cpu).unwrap());
    weights.insert("encoder.layers.9.bias".into(), Tensor::zeros(16, DType::F32, &Device::Cpu).unwrap());
    weights.insert("decoder.layers.0.weight".into(), Tensor::zeros((12, 16, 3, 3), DType::F32, &Device::Cpu).unwrap());
    candle_core::safetensors::save(&weights, tmp.join("diffusion_pytorch_model.safetensors")).unwrap();
    let error = pipeline.replace_vae(&tmp, None).unwrap_err().to_string();
    std::fs::remove_dir_all(&tmp).unwrap();
    assert!(
        error.contains("16 latent channels") && error.contains("takes 4 input channels") && error.contains("sd1"),
        "{error}"
    );
    // The pipeline still has its own VAE, and takes TAESD.
    assert_eq!(pipeline.vae.class_name(), "AutoencoderKL");
    pipeline.replace_vae(&taesd_dir(), None).unwrap();
    assert_eq!(pipeline.vae.class_name(), "AutoencoderTiny");
}
