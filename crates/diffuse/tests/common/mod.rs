//! Helpers shared by the parity tests: fixtures and tolerant comparison.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("fixtures")
}

/// The names of the cases in `cases_dir` (their `.json` files' stems) that start with
/// `prefix`, sorted; there must be one at least.
pub fn case_names(cases_dir: &Path, prefix: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(cases_dir)
        .unwrap_or_else(|e| panic!("{}: {e}", cases_dir.display()))
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|f| f.strip_suffix(".json").map(str::to_string))
        .filter(|n| n.starts_with(prefix))
        .collect();
    names.sort();
    assert!(!names.is_empty(), "no cases start with {prefix} in {}", cases_dir.display());
    names
}

pub fn load_tensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn to_vec_f32(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

pub fn to_vec_f64(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap()
}

/// The largest |a - b| / max(scale, |b|) over all elements, with `scale` the
/// reference's largest magnitude: a relative error measured against the data's size, so
/// elements near zero do not blow it up.
pub fn max_relative_error(actual: &[f32], expected: &[f32]) -> f64 {
    assert_eq!(actual.len(), expected.len(), "length mismatch");
    let scale = expected.iter().fold(0f64, |m, &v| m.max((v as f64).abs())).max(1e-12);
    actual
        .iter()
        .zip(expected)
        .map(|(&a, &e)| {
            if a.is_nan() || e.is_nan() {
                if a.is_nan() && e.is_nan() { 0.0 } else { f64::INFINITY }
            } else {
                (a as f64 - e as f64).abs() / scale
            }
        })
        .fold(0f64, f64::max)
}

/// Asserts that two tensors agree to `tolerance` (relative to the reference's scale), with a
/// message that says what was compared.
pub fn assert_close(actual: &Tensor, expected: &Tensor, tolerance: f64, what: &str) {
    assert_eq!(actual.dims(), expected.dims(), "{what}: shape");
    let err = max_relative_error(&to_vec_f32(actual), &to_vec_f32(expected));
    assert!(err <= tolerance, "{what}: relative error {err:.3e} > {tolerance:.1e}");
}

/// The project's bar for whole pipelines against diffusers: PSNR on the 8-bit images.
pub const MIN_PSNR_DB: f64 = 40.0;
/// ... and the float images' agreement (several UNet, VAE and text-encoder passes in f32).
pub const FLOAT_TOLERANCE: f64 = 2e-3;

/// A pipeline's images `[N, 3, H, W]` in about [-1, 1] against a case's `images` (diffusers'
/// uint8 output, `[N, H, W, 3]`) and `images_float` (its float output, (x / 2 + 0.5).clamp(0,
/// 1)): PSNR ≥ [`MIN_PSNR_DB`] and floats within [`FLOAT_TOLERANCE`]. Returns the PSNR.
pub fn assert_images_match(images: &Tensor, expected: &HashMap<String, Tensor>, what: &str) -> f64 {
    let psnr = images_psnr(images, expected);
    assert!(psnr >= MIN_PSNR_DB, "{what}: PSNR {psnr:.1} dB < {MIN_PSNR_DB} dB");
    let float = ((images.clone() / 2.0).unwrap() + 0.5).unwrap().clamp(0f32, 1f32).unwrap().permute((0, 2, 3, 1)).unwrap();
    assert_close(&float, &expected["images_float"], FLOAT_TOLERANCE, &format!("{what}: float images"));
    psnr
}

/// The PSNR of a pipeline's images against a case's uint8 `images`.
pub fn images_psnr(images: &Tensor, expected: &HashMap<String, Tensor>) -> f64 {
    let actual: Vec<u8> = diffuse::pipelines::to_uint8_images(images).unwrap().into_iter().flat_map(|(_, _, _, p)| p).collect();
    psnr_u8(&actual, &expected["images"].flatten_all().unwrap().to_vec1::<u8>().unwrap())
}

/// PSNR in dB between two 8-bit images given as bytes.
pub fn psnr_u8(a: &[u8], b: &[u8]) -> f64 {
    assert_eq!(a.len(), b.len());
    let mse = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum::<f64>() / a.len() as f64;
    if mse == 0.0 { f64::INFINITY } else { 10.0 * (255.0f64 * 255.0 / mse).log10() }
}
