//! Image-to-image and inpainting against diffusers' StableDiffusionImg2ImgPipeline and
//! StableDiffusionInpaintPipeline (fixtures: tools/fixtures/sd_img2img.py), and the image
//! preprocessing against PIL and VaeImageProcessor. The tiny SD 1.x / 2.x pipelines of
//! sd_pipeline_parity.rs, plus one whose UNet has 9 input channels; several schedulers,
//! strengths 0.3 to 1, guidance on and off, batches of 2, non-square and resized images and
//! masks. Resizing and grayscale conversion must be byte-exact (they are integer arithmetic in
//! Pillow); images must reach PSNR ≥ 40 dB and the float images agree to 2e-3, as for
//! text-to-image.

mod common;

use candle_core::{DType, Device};
use common::*;
use diffuse::pipelines::image_processor::{Image8, VaeImageProcessor};
use diffuse::pipelines::img2img::ImageCondition;
use diffuse::pipelines::stable_diffusion::{PhaseTimes, StableDiffusionPipeline, TextToImageOptions};
use diffuse::rng::TorchGenerator;


fn dir() -> std::path::PathBuf {
    fixtures_dir().join("img2img")
}

fn input(name: &str) -> Image8 {
    Image8::load_rgb(&dir().join("inputs").join(format!("{name}.png"))).unwrap()
}

fn u8_tensor(image: &Image8) -> Vec<u8> {
    image.pixels.clone()
}

#[test]
fn lanczos_resize_and_grayscale_match_pillow_byte_for_byte() {
    let expected = load_tensors(&dir().join("preprocess.safetensors"));
    let mut checked = 0;
    for (key, tensor) in &expected {
        if let Some(rest) = key.strip_prefix("resize_") {
            let (name, size) = rest.rsplit_once('_').unwrap();
            let (w, h) = size.split_once('x').unwrap();
            let (w, h): (usize, usize) = (w.parse().unwrap(), h.parse().unwrap());
            let resized = input(name).resize_lanczos(w, h);
            assert_eq!(tensor.dims(), &[h, w, 3], "{key}");
            let reference = tensor.flatten_all().unwrap().to_vec1::<u8>().unwrap();
            let differing = u8_tensor(&resized).iter().zip(&reference).filter(|(a, b)| a != b).count();
            assert_eq!(differing, 0, "{key}: {differing} bytes differ from PIL");
            checked += 1;
        } else if let Some(name) = key.strip_prefix("gray_") {
            let gray = input(name).to_grayscale();
            assert_eq!(gray.pixels, tensor.flatten_all().unwrap().to_vec1::<u8>().unwrap(), "{key}");
            checked += 1;
        }
    }
    assert!(checked >= 10, "only {checked} resize/grayscale references");
}

#[test]
fn preprocessing_matches_vae_image_processor() {
    let expected = load_tensors(&dir().join("preprocess.safetensors"));
    let processor = VaeImageProcessor::new(8);
    let mut checked = 0;
    for (key, tensor) in &expected {
        let (kind, rest) = key.split_once('_').unwrap();
        if kind != "image" && kind != "mask" {
            continue;
        }
        let (name, size) = rest.rsplit_once('_').unwrap();
        let (h, w) = match size.split_once('x') {
            Some((w, h)) => (Some(h.parse().unwrap()), Some(w.parse().unwrap())),
            None => (None, None),
        };
        let actual = if kind == "image" {
            processor.preprocess(&input(name), h, w, &Device::Cpu).unwrap()
        } else {
            processor.preprocess_mask(&input(name), h, w, &Device::Cpu).unwrap()
        };
        assert_eq!(actual.dims(), tensor.dims(), "{key}");
        let err = max_relative_error(&to_vec_f32(&actual), &to_vec_f32(tensor));
        assert!(err == 0.0, "{key}: differs from diffusers by {err:e}");
        checked += 1;
    }
    assert_eq!(checked, 8);
}

#[test]
fn images_smaller_than_the_latent_grid_are_refused() {
    let tiny = Image8 { width: 7, height: 30, channels: 3, pixels: vec![0; 7 * 30 * 3] };
    let err = VaeImageProcessor::new(8).preprocess(&tiny, None, None, &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("7x30"), "{err}");
}

fn meta(case: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir().join("cases").join(format!("{case}.json"))).unwrap()).unwrap()
}

fn options(meta: &serde_json::Value) -> TextToImageOptions {
    TextToImageOptions {
        prompt: meta["prompt"].as_str().unwrap().to_string(),
        negative_prompt: meta.get("negative_prompt").and_then(|v| v.as_str()).map(str::to_string),
        num_inference_steps: meta["steps"].as_u64().unwrap() as usize,
        guidance_scale: meta["guidance_scale"].as_f64().unwrap_or(1.0),
        num_images_per_prompt: meta.get("num_images").and_then(|v| v.as_u64()).unwrap_or(1) as usize,
        height: meta.get("height").and_then(|v| v.as_u64()).map(|v| v as usize),
        width: meta.get("width").and_then(|v| v.as_u64()).map(|v| v as usize),
        ..TextToImageOptions::default()
    }
}

fn load(meta: &serde_json::Value) -> StableDiffusionPipeline {
    let model_dir = fixtures_dir().join("sd").join(meta["model"].as_str().unwrap());
    StableDiffusionPipeline::load(&model_dir, meta["scheduler"].as_str(), &[], None, &Device::Cpu, DType::F32).unwrap()
}

fn run_case(case: &str) {
    let meta = meta(case);
    let expected = load_tensors(&dir().join("cases").join(format!("{case}.safetensors")));
    let mut pipeline = load(&meta);
    assert_eq!(pipeline.scheduler.class_name, meta["scheduler_class"].as_str().unwrap(), "{case}: scheduler class");
    // An LCM folder run through StableDiffusionImg2ImgPipeline rather than its own
    // LatentConsistencyModelImg2ImgPipeline.
    if meta.get("pipeline").and_then(|p| p.as_str()) == Some("StableDiffusionImg2ImgPipeline") {
        pipeline.pipeline_class = "StableDiffusionPipeline".to_string();
    }
    if let Some(vae) = meta.get("vae").and_then(|v| v.as_str()) {
        pipeline.replace_vae(&fixtures_dir().join(vae), None).unwrap_or_else(|e| panic!("{case}: {e}"));
    }
    if meta.get("vae_tiling").and_then(|v| v.as_bool()) == Some(true) {
        pipeline.enable_vae_tiling();
    }
    if meta.get("vae_slicing").and_then(|v| v.as_bool()) == Some(true) {
        pipeline.enable_vae_slicing();
    }
    let image = input(meta["image"].as_str().unwrap());
    let mask = meta.get("mask").and_then(|m| m.as_str()).map(input);
    let condition = ImageCondition { image: &image, mask: mask.as_ref(), strength: meta["strength"].as_f64().unwrap() };
    let mut generator = TorchGenerator::new(meta["seed"].as_u64().unwrap());
    let images = pipeline
        .generate_from_image(&options(&meta), &condition, &mut generator, &mut |_, _| {}, &mut |_| {}, &mut PhaseTimes::default())
        .unwrap_or_else(|e| panic!("{case}: {e}"));
    let psnr = assert_images_match(&images, &expected, case);
    eprintln!("{case}: PSNR {psnr:.1} dB");
}

fn cases_with_prefix(prefix: &str) -> Vec<String> {
    case_names(&dir().join("cases"), prefix)
}

#[test]
fn image_to_image_matches_diffusers() {
    for case in cases_with_prefix("img2img_") {
        run_case(&case);
    }
}

#[test]
fn inpainting_with_4_channel_unets_matches_diffusers() {
    for case in cases_with_prefix("inpaint4_") {
        run_case(&case);
    }
}

#[test]
fn inpainting_with_9_channel_unets_matches_diffusers() {
    for case in cases_with_prefix("inpaint9_") {
        run_case(&case);
    }
}

/// `vae=` an AutoencoderTiny (TAESD, tools/fixtures/vae_taesd_tiling.py): its encoder's latents
/// are taken as they are (no posterior sample drawn from the generator).
#[test]
fn image_to_image_and_inpainting_with_taesd_match_diffusers() {
    for case in cases_with_prefix("vae_taesd_") {
        run_case(&case);
    }
}

/// Tiled encoding and decoding (sd1's VAE has sample_size 64): a 112×96 init image encoded in
/// 64-pixel tiles, and 4-channel inpainting at 160×96.
#[test]
fn image_to_image_and_inpainting_with_vae_tiling_match_diffusers() {
    for case in cases_with_prefix("vae_tiling_") {
        run_case(&case);
    }
}

/// An LCM-distilled UNet (tools/fixtures/lcm_unet.py) through LatentConsistencyModelImg2ImgPipeline
/// (strength applied by LCMScheduler.set_timesteps; 4 steps at strength 0.2 run) and through
/// StableDiffusionImg2ImgPipeline: the guidance embedding passed as timestep_cond, no
/// classifier-free guidance.
#[test]
fn image_to_image_with_an_lcm_distilled_unet_matches_diffusers() {
    let cases = cases_with_prefix("lcm_unet_");
    assert_eq!(cases.len(), 3);
    for case in cases {
        run_case(&case);
    }
    // Strength 0.2 with 4 steps is refused by StableDiffusionImg2ImgPipeline's rule only.
    let pipeline = load(&meta("lcm_unet_lcm_img2img_s02_batch"));
    assert!(pipeline.lcm_image_to_image());
    let image = input("init_80x48");
    let condition = ImageCondition { image: &image, mask: None, strength: 0.2 };
    let opts = TextToImageOptions { num_inference_steps: 4, ..options(&meta("lcm_unet_lcm_img2img_s02_batch")) };
    assert!(pipeline.validate_image_request(&opts, &condition).is_ok());
}

#[test]
fn bad_image_requests_are_refused_before_any_work() {
    let meta = meta("img2img_default");
    let pipeline = load(&meta);
    let image = input("init_64x64");
    let opts = TextToImageOptions { num_inference_steps: 8, ..options(&meta) };
    let check = |strength: f64, mask: Option<&Image8>, needle: &str| {
        let condition = ImageCondition { image: &image, mask, strength };
        let err = pipeline.validate_image_request(&opts, &condition).unwrap_err().to_string();
        assert!(err.contains(needle), "strength {strength}: {err}");
    };
    check(1.5, None, "strength must be in [0, 1], got 1.5");
    check(-0.1, None, "strength must be in [0, 1]");
    check(f64::NAN, None, "strength must be in [0, 1]");
    check(0.1, None, "strength 0.1 with 8 steps runs no denoising step");
    check(0.0, None, "runs no denoising step");
    let odd_size = TextToImageOptions { width: Some(60), ..opts.clone() };
    let condition = ImageCondition { image: &image, mask: None, strength: 0.5 };
    let err = pipeline.validate_image_request(&odd_size, &condition).unwrap_err().to_string();
    assert!(err.contains("multiples of 8, got 60x(image)"), "{err}");
    // 0.125 × 8 = 1 step: valid.
    let condition = ImageCondition { image: &image, mask: None, strength: 0.125 };
    assert_eq!(pipeline.validate_image_request(&opts, &condition).unwrap(), (64, 64));

    // Image-to-image with an inpainting UNet.
    let inpaint_meta = meta_for_model("sd1_inpaint");
    let inpainting = load(&inpaint_meta);
    let condition = ImageCondition { image: &image, mask: None, strength: 0.5 };
    let err = inpainting.validate_image_request(&opts, &condition).unwrap_err().to_string();
    assert!(err.contains("needs a mask"), "{err}");
}

fn meta_for_model(model: &str) -> serde_json::Value {
    serde_json::json!({ "model": model, "scheduler": null })
}
