//! bf16 on the CPU against f32: diffuse's bf16 image must be at least as close to its own f32
//! image as PyTorch's bf16 image is to PyTorch's f32 one, on the Stable Diffusion fixture
//! pipelines (the bar: tools/fixtures/bf16_psnr.py). Also checks that bf16 really runs the bf16
//! kernels (the image differs from f32) and that f16 is computed as the faster of bf16 and f32 on
//! the CPU.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use diffuse::pipelines::stable_diffusion::{PhaseTimes, StableDiffusionPipeline, TextToImageOptions};
use diffuse::pipelines::to_uint8_images;
use diffuse::rng::TorchGenerator;

fn image(case: &serde_json::Value, dtype: DType) -> (Vec<u8>, Tensor) {
    let model_dir = fixtures_dir().join("sd").join(case["model"].as_str().unwrap());
    let mut pipeline = StableDiffusionPipeline::load(&model_dir, None, &[], None, &Device::Cpu, dtype).unwrap();
    let size = case["size"].as_u64().unwrap() as usize;
    let options = TextToImageOptions {
        prompt: case["prompt"].as_str().unwrap().to_string(),
        negative_prompt: case.get("negative_prompt").and_then(|v| v.as_str()).map(str::to_string),
        num_inference_steps: case["steps"].as_u64().unwrap() as usize,
        guidance_scale: case["guidance_scale"].as_f64().unwrap(),
        height: Some(size),
        width: Some(size),
        ..Default::default()
    };
    let mut generator = TorchGenerator::new(case["seed"].as_u64().unwrap());
    let images = pipeline.generate(&options, &mut generator, &mut |_, _| {}, &mut |_| {}, &mut PhaseTimes::default()).unwrap();
    let bytes = to_uint8_images(&images).unwrap().into_iter().flat_map(|(_, _, _, p)| p).collect();
    (bytes, images)
}

#[test]
fn bf16_is_as_close_to_f32_as_pytorch_bf16_is() {
    let fixture: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixtures_dir().join("sd/bf16_psnr.json")).unwrap()).unwrap();
    for case in fixture["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let (f32_bytes, f32_images) = image(case, DType::F32);
        let (bf16_bytes, bf16_images) = image(case, DType::BF16);
        let ours = psnr_u8(&bf16_bytes, &f32_bytes);
        let pytorch = case["pytorch_psnr_db"].as_f64().unwrap();
        println!("{name}: bf16 vs f32 PSNR: diffuse {ours:.2} dB, PyTorch {pytorch:.2} dB");
        assert!(ours >= pytorch, "{name}: diffuse's bf16 image is {ours:.2} dB from its f32 image, PyTorch's {pytorch:.2} dB");
        // The bf16 kernels really ran: the float images differ.
        let difference = (f32_images - bf16_images).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(difference > 0.0, "{name}: bf16 gave exactly the f32 image");
    }
}

/// f16 runs as the faster of bf16 and f32 on this CPU (and at the level `DIFFUSE_ISA` forces):
/// bf16 where the CPU has AVX512-BF16's dot product, f32 elsewhere.
#[test]
fn f16_runs_as_the_faster_of_bf16_and_f32_on_the_cpu() {
    use diffuse::ops::gemm::{isa, kernels_enabled, Isa};
    let fixture: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixtures_dir().join("sd/bf16_psnr.json")).unwrap()).unwrap();
    let case = &fixture["cases"][0];
    let expected = match (kernels_enabled(), isa() >= Isa::Avx512Bf16) {
        (false, _) => DType::F16, // candle's tensor path, as on other devices
        (true, true) => DType::BF16,
        (true, false) => DType::F32,
    };
    let (f16_bytes, _) = image(case, DType::F16);
    if expected != DType::F16 {
        assert_eq!(f16_bytes, image(case, expected).0, "f16 should run as {expected:?} at the level {}", isa().name());
    }
    let model_dir = fixtures_dir().join("sd").join(case["model"].as_str().unwrap());
    let pipeline = StableDiffusionPipeline::load(&model_dir, None, &[], None, &Device::Cpu, DType::F16).unwrap();
    assert_eq!(pipeline.dtype, expected);
}
