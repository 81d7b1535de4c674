//! The component configs of the Stable Diffusion families diffuse knows without a model folder
//! (stable-diffusion-v1-5 and stable-diffusion-2-1, as their hub repositories have them): for
//! single-file checkpoints, whose weights do not say everything, and for benchmarks.

use serde_json::{Map, Value};

use crate::{Error, Result};

/// A family's `config.json` texts.
pub struct FamilyConfigs {
    pub name: &'static str,
    pub unet: &'static str,
    pub vae: &'static str,
    pub text_encoder: &'static str,
    pub scheduler: &'static str,
}

pub const SD15: FamilyConfigs = FamilyConfigs {
    name: "sd15",
    unet: include_str!("../configs/sd15/unet/config.json"),
    vae: include_str!("../configs/sd15/vae/config.json"),
    text_encoder: include_str!("../configs/sd15/text_encoder/config.json"),
    scheduler: include_str!("../configs/sd15/scheduler/scheduler_config.json"),
};

pub const SD21: FamilyConfigs = FamilyConfigs {
    name: "sd21",
    unet: include_str!("../configs/sd21/unet/config.json"),
    vae: include_str!("../configs/sd21/vae/config.json"),
    text_encoder: include_str!("../configs/sd21/text_encoder/config.json"),
    scheduler: include_str!("../configs/sd21/scheduler/scheduler_config.json"),
};

/// The family named `name` (`sd15`, `sd21`).
pub fn family(name: &str) -> Result<&'static FamilyConfigs> {
    match name {
        "sd15" => Ok(&SD15),
        "sd21" => Ok(&SD21),
        other => Err(Error::invalid(format!("unknown model family `{other}`: known are sd15, sd21"))),
    }
}

/// Parses one of the embedded config texts.
pub fn parse(text: &str) -> Map<String, Value> {
    match serde_json::from_str(text) {
        Ok(Value::Object(map)) => map,
        _ => unreachable!("the embedded configs are JSON objects"),
    }
}
