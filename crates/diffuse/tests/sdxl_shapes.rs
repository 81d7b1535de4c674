//! The full SDXL base and refiner configs (crates/diffuse/configs/sdxl*, as the hub repos have
//! them) build every model with the tensor names and shapes the real weights have: each
//! model asks for exactly as many parameters as diffusers' and transformers' models of those
//! configs hold (counted in PyTorch on the meta device). No weights are allocated: every
//! tensor is a zero broadcast to its shape.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use diffuse::configs::{parse, FamilyConfigs, SDXL, SDXL_REFINER};
use diffuse::loading::config::parse_config;
use diffuse::models::autoencoder_kl::{AutoencoderKL, AutoencoderKLConfig};
use diffuse::models::clip_text::{ClipTextConfig, ClipTextModel};
use diffuse::models::unet_2d_condition::{UNet2DConditionModel, UNet2DConditionModelConfig};

/// Hands out zero-sized stand-ins and counts what was asked for; `absent` names tensors the
/// checkpoint does not have (CLIP-L has no `text_projection`), and no LoRA weights exist.
struct ShapeOnly {
    absent: Vec<&'static str>,
    requested: Arc<Mutex<Vec<(String, usize)>>>,
}

impl SimpleBackend for ShapeOnly {
    fn get(&self, shape: Shape, name: &str, _: candle_nn::Init, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        self.requested.lock().unwrap().push((name.to_string(), shape.elem_count()));
        Tensor::zeros((), dtype, device)?.broadcast_as(shape)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("no shape for {name}")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        !name.contains("lora") && !self.absent.iter().any(|absent| name.ends_with(absent))
    }
}

/// Builds a model from `config` with shape-only weights; returns the number of parameters and
/// of distinct tensors it asked for.
fn count<C: serde::de::DeserializeOwned>(
    config: &str,
    absent: Vec<&'static str>,
    build: impl FnOnce(VarBuilder<'static>, &C) -> diffuse::Result<()>,
) -> (usize, usize) {
    let requested = Arc::new(Mutex::new(Vec::new()));
    let backend = ShapeOnly { absent, requested: requested.clone() };
    let vb = VarBuilder::from_backend(Box::new(backend), DType::F32, Device::Cpu);
    let config: C = parse_config(&parse(config), std::path::Path::new("config.json")).unwrap();
    build(vb, &config).unwrap();
    let mut requested = requested.lock().unwrap().clone();
    requested.sort();
    requested.dedup();
    (requested.iter().map(|(_, n)| n).sum(), requested.len())
}

fn unet(family: &FamilyConfigs) -> (usize, usize) {
    count::<UNet2DConditionModelConfig>(family.unet, vec![], |vb, c| UNet2DConditionModel::new(vb, c).map(|_| ()))
}

fn text_encoder(config: &str, absent: Vec<&'static str>) -> usize {
    count::<ClipTextConfig>(config, absent, |vb, c| ClipTextModel::new(vb, c).map(|_| ())).0
}

#[test]
fn sdxl_base_unet_has_diffusers_parameters() {
    // 1680 tensors in diffusers' state dict.
    assert_eq!(unet(&SDXL), (2_567_463_684, 1680));
}

#[test]
fn sdxl_refiner_unet_has_diffusers_parameters() {
    assert_eq!(unet(&SDXL_REFINER), (2_259_526_660, 1220));
}

#[test]
fn sdxl_text_encoders_and_vae_have_the_reference_parameters() {
    // transformers' CLIPTextModel (CLIP ViT-L/14's text tower) and CLIPTextModelWithProjection
    // (OpenCLIP bigG's, with its 1280×1280 projection).
    assert_eq!(text_encoder(SDXL.text_encoder, vec!["text_projection.weight"]), 123_060_480);
    assert_eq!(text_encoder(SDXL.text_encoder_2.unwrap(), vec![]), 694_659_840);
    assert_eq!(text_encoder(SDXL_REFINER.text_encoder, vec![]), 694_659_840);
    let vae = count::<AutoencoderKLConfig>(SDXL.vae, vec![], |vb, c| AutoencoderKL::new(vb, c).map(|_| ())).0;
    assert_eq!(vae, 83_653_863);
}
