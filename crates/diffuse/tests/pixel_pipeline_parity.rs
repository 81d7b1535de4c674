//! Whole pixel-space pipelines against diffusers (fixtures: tools/fixtures/pixel_pipelines.py):
//! the same seeded random UNet2DModel folders, schedulers switched as diffusers' `from_config`
//! does, the same seed. The images must reach PSNR ≥ 40 dB (the project's bar) and the raw
//! final samples must agree to 1e-3 of their scale (ten UNet evaluations in f32 with a
//! different summation order; random models amplify differences at high noise levels).

mod common;

use candle_core::Device;
use common::*;
use diffuse::loading::config::parse_override;
use diffuse::pipelines::pixel::{PixelOptions, PixelPipeline};
use diffuse::pipelines::to_uint8_images;
use diffuse::rng::TorchGenerator;

const MIN_PSNR_DB: f64 = 40.0;
const SAMPLE_TOLERANCE: f64 = 1e-3;

fn run_case(case: &str) {
    let dir = fixtures_dir().join("pixel");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases").join(format!("{case}.json"))).unwrap()).unwrap();
    let expected = load_tensors(&dir.join("cases").join(format!("{case}.safetensors")));
    let overrides: Vec<(String, serde_json::Value)> = meta
        .get("overrides")
        .and_then(|o| o.as_object())
        .map(|o| o.iter().map(|(k, v)| parse_override(&format!("{k}={v}")).unwrap()).collect())
        .unwrap_or_default();
    let model_dir = dir.join(meta["model"].as_str().unwrap());
    let mut pipeline =
        PixelPipeline::load(&model_dir, meta["scheduler"].as_str(), &overrides, meta["variant"].as_str(), &Device::Cpu)
            .unwrap();
    assert_eq!(pipeline.scheduler.class_name, meta["scheduler_class"].as_str().unwrap(), "{case}: scheduler class");
    let options = PixelOptions {
        num_inference_steps: meta["steps"].as_u64().unwrap() as usize,
        num_images: meta.get("num_images").and_then(|v| v.as_u64()).unwrap_or(1) as usize,
        eta: meta.get("eta").and_then(|v| v.as_f64()).unwrap_or(0.0),
        class_label: meta.get("class_label").and_then(|v| v.as_i64()),
    };
    let mut generator = TorchGenerator::new(meta["seed"].as_u64().unwrap());
    let samples = pipeline.generate(&options, &mut generator, &mut |_, _| {}).unwrap();
    assert_close(&samples, &expected["samples"], SAMPLE_TOLERANCE, &format!("{case}: final samples"));
    let images = to_uint8_images(&samples).unwrap();
    let actual: Vec<u8> = images.iter().flat_map(|(_, _, _, p)| p.iter().copied()).collect();
    let reference = expected["images"].flatten_all().unwrap().to_vec1::<u8>().unwrap();
    let psnr = psnr_u8(&actual, &reference);
    assert!(psnr >= MIN_PSNR_DB, "{case}: PSNR {psnr:.1} dB < {MIN_PSNR_DB} dB");
}

fn cases_with_prefix(prefix: &str) -> Vec<String> {
    case_names(&fixtures_dir().join("pixel").join("cases"), prefix)
}

#[test]
fn unconditional_every_scheduler() {
    for case in cases_with_prefix("uncond_") {
        run_case(&case);
    }
}

#[test]
fn class_conditional() {
    for case in cases_with_prefix("classcond_") {
        run_case(&case);
    }
}

#[test]
fn learned_variance_cosine_schedule() {
    for case in cases_with_prefix("learned_") {
        run_case(&case);
    }
}

#[test]
fn v_prediction_trailing_zero_snr() {
    for case in cases_with_prefix("vpred_") {
        run_case(&case);
    }
}

#[test]
fn grayscale() {
    for case in cases_with_prefix("gray_") {
        run_case(&case);
    }
}

#[test]
fn fp16_variant_and_sharded_weights() {
    for case in cases_with_prefix("variant_") {
        run_case(&case);
    }
}
