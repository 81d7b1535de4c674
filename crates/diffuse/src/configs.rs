//! The component configs of the Stable Diffusion families diffuse knows without a model folder
//! (stable-diffusion-v1-5, stable-diffusion-2-1, stable-diffusion-xl-base-1.0 and
//! stable-diffusion-xl-refiner-1.0, as their hub repositories have them): for single-file
//! checkpoints, whose weights do not say everything, and for benchmarks.

use serde_json::{Map, Value};

use crate::{Error, Result};

/// A family's `config.json` texts.
pub struct FamilyConfigs {
    /// The family's short name (`sd15`, `sd21`, `sdxl`, `sdxl-refiner`).
    pub name: &'static str,
    /// The UNet's `config.json`.
    pub unet: &'static str,
    /// The VAE's `config.json`.
    pub vae: &'static str,
    /// The first text encoder (the SDXL refiner's only one, OpenCLIP bigG, is this).
    pub text_encoder: &'static str,
    /// SDXL base's second text encoder (OpenCLIP bigG with its projection).
    pub text_encoder_2: Option<&'static str>,
    /// The scheduler's `scheduler_config.json`.
    pub scheduler: &'static str,
}

/// Stable Diffusion 1.5 (`stable-diffusion-v1-5`).
pub const SD15: FamilyConfigs = FamilyConfigs {
    name: "sd15",
    unet: include_str!("../configs/sd15/unet/config.json"),
    vae: include_str!("../configs/sd15/vae/config.json"),
    text_encoder: include_str!("../configs/sd15/text_encoder/config.json"),
    text_encoder_2: None,
    scheduler: include_str!("../configs/sd15/scheduler/scheduler_config.json"),
};

/// Stable Diffusion 2.1 (`stabilityai/stable-diffusion-2-1`, 768 px, v-prediction).
pub const SD21: FamilyConfigs = FamilyConfigs {
    name: "sd21",
    unet: include_str!("../configs/sd21/unet/config.json"),
    vae: include_str!("../configs/sd21/vae/config.json"),
    text_encoder: include_str!("../configs/sd21/text_encoder/config.json"),
    text_encoder_2: None,
    scheduler: include_str!("../configs/sd21/scheduler/scheduler_config.json"),
};

/// Stable Diffusion XL base 1.0.
pub const SDXL: FamilyConfigs = FamilyConfigs {
    name: "sdxl",
    unet: include_str!("../configs/sdxl/unet/config.json"),
    vae: include_str!("../configs/sdxl/vae/config.json"),
    text_encoder: include_str!("../configs/sdxl/text_encoder/config.json"),
    text_encoder_2: Some(include_str!("../configs/sdxl/text_encoder_2/config.json")),
    scheduler: include_str!("../configs/sdxl/scheduler/scheduler_config.json"),
};

/// Stable Diffusion XL refiner 1.0.
pub const SDXL_REFINER: FamilyConfigs = FamilyConfigs {
    name: "sdxl-refiner",
    unet: include_str!("../configs/sdxl_refiner/unet/config.json"),
    vae: include_str!("../configs/sdxl_refiner/vae/config.json"),
    text_encoder: include_str!("../configs/sdxl_refiner/text_encoder_2/config.json"),
    text_encoder_2: None,
    scheduler: include_str!("../configs/sdxl_refiner/scheduler/scheduler_config.json"),
};

/// The family named `name` (`sd15`, `sd21`, `sdxl`, `sdxl-refiner`).
pub fn family(name: &str) -> Result<&'static FamilyConfigs> {
    match name {
        "sd15" => Ok(&SD15),
        "sd21" => Ok(&SD21),
        "sdxl" => Ok(&SDXL),
        "sdxl-refiner" => Ok(&SDXL_REFINER),
        other => Err(Error::invalid(format!("unknown model family `{other}`: known are sd15, sd21, sdxl, sdxl-refiner"))),
    }
}

/// Parses one of the embedded config texts.
pub fn parse(text: &str) -> Map<String, Value> {
    match serde_json::from_str(text) {
        Ok(Value::Object(map)) => map,
        _ => unreachable!("the embedded configs are JSON objects"),
    }
}
