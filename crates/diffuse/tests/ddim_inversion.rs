//! DDIM inversion against diffusers (fixtures: tools/fixtures/sd_img2img.py, which runs
//! StableDiffusionPix2PixZeroPipeline.invert's loop without regularisation, then
//! StableDiffusionPipeline with DDIM from the inverted `latents=`), the latents file format,
//! and the reconstruction image → invert → regenerate.
//!
//! Reconstruction is measured against the VAE decode of the very latent sample the inversion
//! started from, so that only the inversion's error counts. The random tiny UNet's noise
//! prediction moves 2-3× as much as its input does (a trained UNet's is far smoother), which
//! makes the DDIM ODE unstable: its images do not come back at any step count (≈ 14 dB in
//! diffusers too). With its output layer scaled by 0.1 the error behaves as DDIM inversion's
//! should: first order in the step size (diffusers: 17.4 dB at 25 steps, 25.7 dB at 100).

mod common;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::*;
use diffuse::pipelines::image_processor::{Image8, VaeImageProcessor};
use diffuse::pipelines::inversion::{load_latents, save_latents, LATENTS_FORMAT};
use diffuse::pipelines::stable_diffusion::{PhaseTimes, StableDiffusionPipeline, TextToImageOptions};
use diffuse::pipelines::to_uint8_images;
use diffuse::rng::TorchGenerator;

const LATENT_TOLERANCE: f64 = 1e-3;

fn input(name: &str) -> Image8 {
    Image8::load_rgb(&fixtures_dir().join("img2img").join("inputs").join(format!("{name}.png"))).unwrap()
}

fn options(prompt: &str, steps: usize, guidance_scale: f64) -> TextToImageOptions {
    TextToImageOptions { prompt: prompt.into(), num_inference_steps: steps, guidance_scale, ..TextToImageOptions::default() }
}

fn bytes(images: &Tensor) -> Vec<u8> {
    to_uint8_images(images).unwrap().into_iter().flat_map(|(_, _, _, p)| p).collect()
}

#[test]
fn inversion_and_regeneration_match_diffusers() {
    for case in ["invert_sd1", "invert_sd1_guided"] {
        let dir = fixtures_dir().join("img2img").join("cases");
        let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join(format!("{case}.json"))).unwrap()).unwrap();
        let expected = load_tensors(&dir.join(format!("{case}.safetensors")));
        let model = fixtures_dir().join("sd").join(meta["model"].as_str().unwrap());
        let mut pipeline = StableDiffusionPipeline::load(&model, Some("ddim"), &[], None, &Device::Cpu, DType::F32).unwrap();
        let guidance = meta.get("guidance_scale").and_then(|v| v.as_f64()).unwrap_or(1.0);
        let opts = options(meta["prompt"].as_str().unwrap(), meta["steps"].as_u64().unwrap() as usize, guidance);
        let mut generator = TorchGenerator::new(meta["seed"].as_u64().unwrap());
        let image = input(meta["image"].as_str().unwrap());
        let latents = pipeline.invert(&opts, &image, &mut generator, &mut |_, _| {}, &mut |_| {}).unwrap();
        assert_close(&latents, &expected["latents"], LATENT_TOLERANCE, &format!("{case}: inverted latents"));
        eprintln!("{case}: inverted latents within {:.1e}", max_relative_error(&to_vec_f32(&latents), &to_vec_f32(&expected["latents"])));

        // Regenerate from diffusers' latents: the random UNet's sampling ODE amplifies the
        // inversion's last-digit differences (see the module comment), so this checks the
        // `latents=` path on its own.
        let (_, _, h, w) = latents.dims4().unwrap();
        let regen_opts = TextToImageOptions { height: Some(h * 8), width: Some(w * 8), ..opts };
        let images = pipeline
            .generate_from(&regen_opts, Some(&expected["latents"]), &mut TorchGenerator::new(0), &mut |_, _| {}, &mut |_| {}, &mut PhaseTimes::default())
            .unwrap();
        let float = ((images.clone() / 2.0).unwrap() + 0.5).unwrap().clamp(0f32, 1f32).unwrap().permute((0, 2, 3, 1)).unwrap();
        assert_close(&float, &expected["images_float"], 2e-3, &format!("{case}: regenerated float images"));
        let psnr = psnr_u8(&bytes(&images), &expected["images"].flatten_all().unwrap().to_vec1::<u8>().unwrap());
        assert!(psnr >= 40.0, "{case}: regenerated image PSNR {psnr:.1} dB");
    }
}

/// A copy of the sd1 pipeline whose UNet output layer is scaled by `factor`.
fn scaled_output_copy(factor: f64, to: &Path) {
    fn copy_following_links(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let path = entry.unwrap().path();
            let target = to.join(path.file_name().unwrap());
            if std::fs::metadata(&path).unwrap().is_dir() {
                copy_following_links(&path, &target);
            } else {
                std::fs::copy(&path, &target).unwrap();
            }
        }
    }
    copy_following_links(&fixtures_dir().join("sd").join("sd1"), to);
    let weights = to.join("unet").join("diffusion_pytorch_model.safetensors");
    let mut tensors = load_tensors(&weights);
    for name in ["conv_out.weight", "conv_out.bias"] {
        let scaled = (&tensors[name] * factor).unwrap();
        tensors.insert(name.to_string(), scaled);
    }
    candle_core::safetensors::save(&tensors, &weights).unwrap();
}

/// Image → invert → regenerate with `steps` DDIM steps, guidance 1, against the VAE decode of
/// the latent sample the inversion started from. Returns (image PSNR in dB, relative latent
/// error).
fn reconstruct(pipeline: &mut StableDiffusionPipeline, image: &Image8, steps: usize) -> (f64, f64) {
    let opts = options("a photo of a cat", steps, 1.0);
    let seed = 30;
    let processor = VaeImageProcessor::new(8);
    let pixels = processor.preprocess(image, None, None, &Device::Cpu).unwrap();
    let start = pipeline.encode_image_latents(&pixels, &mut TorchGenerator::new(seed)).unwrap();
    let reference = bytes(&pipeline.decode_latents(&start).unwrap());

    let inverted = pipeline.invert(&opts, image, &mut TorchGenerator::new(seed), &mut |_, _| {}, &mut |_| {}).unwrap();
    let regen_opts = TextToImageOptions { height: Some(image.height), width: Some(image.width), ..opts.clone() };
    let embeddings = pipeline.encode_prompt(&regen_opts, &mut |_| {}).unwrap();
    let latents = pipeline
        .denoise_from(&regen_opts, &embeddings, Some(&inverted), &mut TorchGenerator::new(0), &mut |_, _| {})
        .unwrap();
    let regenerated = bytes(&pipeline.decode_latents(&latents).unwrap());
    let error = (&latents - &start).unwrap().sqr().unwrap().sum_all().unwrap().sqrt().unwrap().to_scalar::<f32>().unwrap()
        / start.sqr().unwrap().sum_all().unwrap().sqrt().unwrap().to_scalar::<f32>().unwrap();
    (psnr_u8(&regenerated, &reference), error as f64)
}

#[test]
fn reconstruction_error_is_first_order_in_the_step_size() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("diffuse-inversion");
    let _ = std::fs::remove_dir_all(&dir);
    scaled_output_copy(0.1, &dir);
    let mut pipeline = StableDiffusionPipeline::load(&dir, Some("ddim"), &[], None, &Device::Cpu, DType::F32).unwrap();
    let image = input("init_64x64");
    let (psnr_25, error_25) = reconstruct(&mut pipeline, &image, 25);
    let (psnr_100, error_100) = reconstruct(&mut pipeline, &image, 100);
    eprintln!("reconstruction: 25 steps {psnr_25:.1} dB (latent error {error_25:.4}), 100 steps {psnr_100:.1} dB ({error_100:.4})");
    let _ = std::fs::remove_dir_all(&dir);
    // Four times the steps: about a quarter of the error (first order), and the image back
    // to within what diffusers reaches.
    assert!(error_100 < error_25 / 3.0, "latent error {error_25:.4} -> {error_100:.4}");
    assert!(error_100 < 0.12, "latent error {error_100:.4} at 100 steps");
    assert!(psnr_100 >= 25.0 && psnr_100 > psnr_25 + 6.0, "PSNR {psnr_25:.1} -> {psnr_100:.1} dB");
}

#[test]
fn latents_files_round_trip_and_bad_ones_are_refused() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("diffuse-latents");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("x.safetensors");
    let latents = Tensor::arange(0f32, 2.0 * 4.0 * 3.0 * 5.0, &Device::Cpu).unwrap().reshape((2, 4, 3, 5)).unwrap();
    save_latents(&path, &latents, &[("prompt", "a cat".into()), ("steps", "10".into())]).unwrap();
    let (loaded, metadata) = load_latents(&path, &Device::Cpu).unwrap();
    assert_eq!(to_vec_f32(&loaded), to_vec_f32(&latents));
    assert_eq!(loaded.dims(), &[2, 4, 3, 5]);
    assert_eq!(metadata["prompt"], "a cat");
    assert_eq!(metadata["steps"], "10");
    assert_eq!(metadata["format"], LATENTS_FORMAT);
    let leftovers = std::fs::read_dir(&dir).unwrap().count();
    assert_eq!(leftovers, 1, "only the file itself");

    // A safetensors file without `latents`, a non-safetensors file, a missing file.
    let other = dir.join("other.safetensors");
    candle_core::safetensors::save(&[("x".to_string(), latents.clone())].into_iter().collect(), &other).unwrap();
    let err = load_latents(&other, &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("no `latents` tensor"), "{err}");
    let text = dir.join("text.safetensors");
    std::fs::write(&text, "hello").unwrap();
    let err = load_latents(&text, &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("not a latents file"), "{err}");
    assert!(load_latents(&dir.join("missing.safetensors"), &Device::Cpu).is_err());
    // Writing into a folder that does not exist fails without leaving anything behind.
    assert!(save_latents(&dir.join("no/such/x.safetensors"), &latents, &[]).is_err());
    let _ = std::fs::remove_dir_all(&dir);
}
