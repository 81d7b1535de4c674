//! Pipelines: the denoising loops of diffusers' pipelines, and turning their output into images.

pub mod autoencoder;
pub mod generation;
pub mod image_processor;
pub mod img2img;
pub mod inpaint;
pub mod inversion;
pub mod metadata;
pub mod pixel;
pub mod stable_diffusion;

use std::path::Path;

use candle_core::{DType, Tensor};
use serde_json::{Map, Value};

use crate::loading::config::read_json_object;
use crate::schedulers::{self, Scheduler};
use crate::{Error, Result};

/// The scheduler names the CLI offers: (name, diffusers class, config overrides, description).
pub const SCHEDULER_NAMES: &[(&str, &str, &[(&str, &str)], &str)] = &[
    ("ddpm", "DDPMScheduler", &[], "DDPM ancestral sampling (Ho et al. 2020)"),
    ("ddim", "DDIMScheduler", &[], "DDIM, deterministic at eta 0 (Song et al. 2020)"),
    ("pndm", "PNDMScheduler", &[], "Pseudo numerical methods, PRK then PLMS (Liu et al. 2022)"),
    ("lms", "LMSDiscreteScheduler", &[], "Linear multistep on Karras sigmas (k-diffusion's LMS)"),
    ("euler", "EulerDiscreteScheduler", &[], "Euler on Karras sigmas (Karras et al. 2022)"),
    ("euler-ancestral", "EulerAncestralDiscreteScheduler", &[], "Euler with ancestral noise each step"),
    ("heun", "HeunDiscreteScheduler", &[], "Heun's second-order method (2 model calls per step)"),
    ("dpm++2m", "DPMSolverMultistepScheduler", &[], "DPM-Solver++ 2M (Lu et al. 2022)"),
    (
        "dpm++2m-karras",
        "DPMSolverMultistepScheduler",
        &[("use_karras_sigmas", "true")],
        "DPM-Solver++ 2M with Karras sigmas",
    ),
    (
        "dpm++2m-sde",
        "DPMSolverMultistepScheduler",
        &[("algorithm_type", "\"sde-dpmsolver++\"")],
        "DPM-Solver++ 2M SDE (stochastic)",
    ),
    ("unipc", "UniPCMultistepScheduler", &[], "UniPC predictor-corrector (Zhao et al. 2023)"),
    ("lcm", "LCMScheduler", &[], "Latent consistency sampling in 1-8 steps, for LCM models and LCM-LoRA (Luo et al. 2023)"),
    ("tcd", "TCDScheduler", &[], "Trajectory consistency sampling; gamma is eta, 0.3 by default (Zheng et al. 2024)"),
];

/// A scheduler resolved from a model folder, an optional name and `KEY=VALUE` overrides.
pub struct ResolvedScheduler {
    /// The scheduler, configured and ready for `set_timesteps`.
    pub scheduler: Box<dyn Scheduler>,
    /// Its diffusers class name (`EulerDiscreteScheduler`, ...).
    pub class_name: String,
    /// The config it was built from, overrides applied (as its `scheduler_config.json` would hold
    /// it).
    pub config: Map<String, Value>,
}

/// Builds the scheduler a pipeline runs: the folder's own `scheduler_config.json`, or the
/// named scheduler configured from it as diffusers' `from_config` does, with overrides applied.
pub fn resolve_scheduler(
    scheduler_dir: &Path,
    name: Option<&str>,
    overrides: &[(String, Value)],
) -> Result<ResolvedScheduler> {
    let config_path = scheduler_dir.join("scheduler_config.json");
    scheduler_from_config(read_json_object(&config_path)?, &config_path, name, overrides)
}

/// [`resolve_scheduler`] for a config already in memory (a single-file checkpoint's built-in
/// one); `config_path` names it in errors.
pub fn scheduler_from_config(
    mut config: Map<String, Value>,
    config_path: &Path,
    name: Option<&str>,
    overrides: &[(String, Value)],
) -> Result<ResolvedScheduler> {
    let class_name = match name {
        None => config
            .get("_class_name")
            .and_then(|v| v.as_str())
            .ok_or_else(|| Error::config(config_path, "key `_class_name`: missing"))?
            .to_string(),
        Some(name) => {
            let (_, class, named_overrides, _) = SCHEDULER_NAMES.iter().find(|(n, ..)| *n == name).ok_or_else(|| {
                let names: Vec<&str> = SCHEDULER_NAMES.iter().map(|(n, ..)| *n).collect();
                Error::invalid(format!("unknown scheduler `{name}`; valid names: {}", names.join(", ")))
            })?;
            for (key, value) in named_overrides.iter() {
                config.insert(key.to_string(), serde_json::from_str(value).expect("built-in override is JSON"));
            }
            class.to_string()
        }
    };
    for (key, value) in overrides {
        config.insert(key.clone(), value.clone());
    }
    config.insert("_class_name".into(), Value::String(class_name.clone()));
    let scheduler = schedulers::from_config(&class_name, &config, config_path)?;
    Ok(ResolvedScheduler { scheduler, class_name, config })
}

/// diffusers' output conversion: `(x / 2 + 0.5).clamp(0, 1)`, then `(x * 255).round()` as
/// uint8 (numpy rounds half to even). Returns one `[H, W, C]` byte buffer per batch item.
pub fn to_uint8_images(images: &Tensor) -> Result<Vec<(usize, usize, usize, Vec<u8>)>> {
    let images = ((images.to_dtype(DType::F32)? / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
    let (batch, channels, height, width) = images.dims4()?;
    let data = images.permute((0, 2, 3, 1))?.flatten_all()?.to_vec1::<f32>()?;
    let per_image = height * width * channels;
    Ok((0..batch)
        .map(|b| {
            let bytes = data[b * per_image..(b + 1) * per_image]
                .iter()
                .map(|v| (v * 255.0).round_ties_even() as u8)
                .collect();
            (width, height, channels, bytes)
        })
        .collect())
}

/// The pipelines' images (`[N, C, H, W]` in about [-1, 1]) as `image` crate RGB images, rounded
/// as [`to_uint8_images`] rounds (a gray image's one channel is repeated).
pub fn to_rgb_images(images: &Tensor) -> Result<Vec<image::RgbImage>> {
    to_uint8_images(images)?
        .into_iter()
        .map(|(width, height, channels, pixels)| {
            let rgb = match channels {
                3 => pixels,
                1 => pixels.iter().flat_map(|&v| [v; 3]).collect(),
                c => return Err(Error::invalid(format!("a {c}-channel image is not RGB or gray"))),
            };
            // The buffer is exactly width × height × 3 bytes by construction.
            image::RgbImage::from_raw(width as u32, height as u32, rgb)
                .ok_or_else(|| Error::invalid(format!("a {width}×{height} image does not fit its buffer")))
        })
        .collect()
}

/// Writes an 8-bit PNG (gray, RGB or RGBA by channel count) with text chunks (`tEXt`, or `iTXt`
/// for text that is not Latin-1, as Pillow and so AUTOMATIC1111 write them), first to a
/// temporary name beside the target and then renamed, so a failure never leaves a partial file.
pub fn write_png(path: &Path, width: usize, height: usize, channels: usize, pixels: &[u8], text: &[(&str, String)]) -> Result<()> {
    let color = match channels {
        1 => png_color::Grayscale,
        3 => png_color::Rgb,
        4 => png_color::Rgba,
        c => return Err(Error::invalid(format!("cannot write a {c}-channel image as PNG"))),
    };
    crate::files::write_streamed_atomically(path, |file| encode_png_to(file, path, width, height, color, pixels, text))
}

/// [`write_png`]'s file, in memory: the PNG's bytes.
pub fn encode_png(width: usize, height: usize, channels: usize, pixels: &[u8], text: &[(&str, String)]) -> Result<Vec<u8>> {
    let color = match channels {
        1 => png_color::Grayscale,
        3 => png_color::Rgb,
        4 => png_color::Rgba,
        c => return Err(Error::invalid(format!("cannot write a {c}-channel image as PNG"))),
    };
    let mut bytes = Vec::new();
    encode_png_to(&mut bytes, Path::new("(in memory)"), width, height, color, pixels, text)?;
    Ok(bytes)
}

fn encode_png_to<W: std::io::Write>(
    out: W,
    path: &Path,
    width: usize,
    height: usize,
    color: png_color,
    pixels: &[u8],
    text: &[(&str, String)],
) -> Result<()> {
    let failed = |e: png::EncodingError| Error::io(path, std::io::Error::other(e));
    {
        let mut encoder = png::Encoder::new(out, width as u32, height as u32);
        encoder.set_color(color);
        encoder.set_depth(png::BitDepth::Eight);
        for (key, value) in text {
            if metadata::is_latin1(value) {
                encoder.add_text_chunk(key.to_string(), value.clone()).map_err(failed)?;
            } else {
                encoder.add_itxt_chunk(key.to_string(), value.clone()).map_err(failed)?;
            }
        }
        let mut writer = encoder.write_header().map_err(failed)?;
        writer.write_image_data(pixels).map_err(failed)?;
        writer.finish().map_err(failed)
    }
}

use png::ColorType as png_color;


#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// RGB images keep their bytes; a gray one is repeated over three channels.
    #[test]
    fn rgb_images_are_the_uint8_images() {
        let device = Device::Cpu;
        let rgb = Tensor::arange(0f32, 24f32, &device).unwrap().affine(1.0 / 12.0, -1.0).unwrap().reshape((2, 3, 2, 2)).unwrap();
        let bytes = to_uint8_images(&rgb).unwrap();
        for (image, (width, height, _, pixels)) in to_rgb_images(&rgb).unwrap().iter().zip(&bytes) {
            assert_eq!((image.width() as usize, image.height() as usize), (*width, *height));
            assert_eq!(image.as_raw(), pixels);
        }
        let gray = rgb.narrow(1, 0, 1).unwrap();
        let gray_bytes = &to_uint8_images(&gray).unwrap()[0].3;
        let image = &to_rgb_images(&gray).unwrap()[0];
        assert!(image.pixels().zip(gray_bytes).all(|(p, &v)| p.0 == [v, v, v]));
        assert!(to_rgb_images(&Tensor::zeros((1, 2, 2, 2), DType::F32, &device).unwrap()).is_err());
    }
}
