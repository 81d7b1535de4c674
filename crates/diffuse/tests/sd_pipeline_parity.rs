//! Stable Diffusion text-to-image against diffusers' StableDiffusionPipeline (fixtures:
//! tools/fixtures/sd_pipelines.py): tiny seeded random SD 1.x- and 2.x-like pipelines in the
//! real folder layout with the real CLIP vocabulary, every named scheduler, guidance on and
//! off, negative prompts, several images per prompt, non-square sizes, clip skip, guidance
//! rescale, and prompts past 77 tokens. Images must reach PSNR ≥ 40 dB (the project's bar)
//! and the float images must agree to 2e-3 (several UNet, VAE and text-encoder passes in f32).

mod common;

use candle_core::{DType, Device};
use common::*;
use diffuse::loading::config::parse_override;
use diffuse::pipelines::stable_diffusion::{PhaseTimes, StableDiffusionPipeline, TextToImageOptions};
use diffuse::pipelines::to_uint8_images;
use diffuse::rng::TorchGenerator;


fn run_case(case: &str) {
    let dir = fixtures_dir().join("sd");
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
        StableDiffusionPipeline::load(&model_dir, meta["scheduler"].as_str(), &overrides, None, &Device::Cpu, DType::F32)
            .unwrap_or_else(|e| panic!("{case}: {e}"));
    assert_eq!(pipeline.scheduler.class_name, meta["scheduler_class"].as_str().unwrap(), "{case}: scheduler class");
    if let Some(vae) = meta.get("vae").and_then(|v| v.as_str()) {
        pipeline.replace_vae(&fixtures_dir().join(vae), None).unwrap_or_else(|e| panic!("{case}: {e}"));
    }
    if meta.get("vae_tiling").and_then(|v| v.as_bool()) == Some(true) {
        pipeline.enable_vae_tiling();
    }
    if meta.get("vae_slicing").and_then(|v| v.as_bool()) == Some(true) {
        pipeline.enable_vae_slicing();
    }
    let options = TextToImageOptions {
        prompt: meta["prompt"].as_str().unwrap().to_string(),
        negative_prompt: meta.get("negative_prompt").and_then(|v| v.as_str()).map(str::to_string),
        num_inference_steps: meta["steps"].as_u64().unwrap() as usize,
        guidance_scale: meta["guidance_scale"].as_f64().unwrap(),
        guidance_rescale: meta.get("guidance_rescale").and_then(|v| v.as_f64()).unwrap_or(0.0),
        num_images_per_prompt: meta.get("num_images").and_then(|v| v.as_u64()).unwrap_or(1) as usize,
        height: meta.get("height").and_then(|v| v.as_u64()).map(|v| v as usize),
        width: meta.get("width").and_then(|v| v.as_u64()).map(|v| v as usize),
        eta: meta.get("eta").and_then(|v| v.as_f64()).unwrap_or(0.0),
        clip_skip: meta.get("clip_skip").and_then(|v| v.as_u64()).map(|v| v as usize),
        ..Default::default()
    };
    let mut generator = TorchGenerator::new(meta["seed"].as_u64().unwrap());
    let mut warnings = Vec::new();
    let images = pipeline
        .generate(&options, &mut generator, &mut |_, _| {}, &mut |w| warnings.push(w), &mut PhaseTimes::default())
        .unwrap_or_else(|e| panic!("{case}: {e}"));
    if case.contains("long_prompt") {
        assert!(warnings.iter().any(|w| w.contains("truncated")), "{case}: expected a truncation warning");
    }
    assert_images_match(&images, &expected, case);
}

fn cases_with_prefix(prefix: &str) -> Vec<String> {
    case_names(&fixtures_dir().join("sd").join("cases"), prefix)
}

#[test]
fn sd1_guidance_negative_batch_sizes_and_prompts() {
    for case in cases_with_prefix("sd1_").into_iter().filter(|c| !c.starts_with("sd1_sched_")) {
        run_case(&case);
    }
}

#[test]
fn sd1_every_scheduler() {
    for case in cases_with_prefix("sd1_sched_") {
        run_case(&case);
    }
}

/// `vae=` an AutoencoderTiny (TAESD, tools/fixtures/vae_taesd_tiling.py), with guidance and
/// with the few-step LCM recipe (a batch of 2).
#[test]
fn vae_replaced_by_taesd() {
    for case in cases_with_prefix("vae_taesd_") {
        run_case(&case);
    }
}

/// The VAE's tiling (sd1's VAE has sample_size 64: 96- to 136-pixel images decode from
/// overlapping 8-latent tiles, blended; the fixture script checks that the images differ from
/// untiled ones) and slicing (a batch decoded one image at a time).
#[test]
fn vae_tiling_and_slicing() {
    for case in cases_with_prefix("vae_tiling_").into_iter().chain(cases_with_prefix("vae_slicing_")) {
        run_case(&case);
    }
}

/// The memory check counts the VAE's largest pass: a tile's with tiling, one image's with slicing.
#[test]
fn the_memory_check_accounts_for_tiling_and_slicing() {
    let model_dir = fixtures_dir().join("sd").join("sd1");
    let mut pipeline = StableDiffusionPipeline::load(&model_dir, None, &[], None, &Device::Cpu, DType::F32).unwrap();
    let untiled = pipeline.vae_pass_bytes(4096, 4096, 4);
    assert_eq!(untiled, 3.0 * 4.0 * 4.0 * 8.0 * 4096.0 * 4096.0);
    pipeline.enable_vae_slicing();
    assert_eq!(pipeline.vae_pass_bytes(4096, 4096, 4), untiled / 4.0);
    pipeline.enable_vae_tiling();
    assert_eq!(pipeline.vae_pass_bytes(4096, 4096, 4), 3.0 * 4.0 * 8.0 * 64.0 * 64.0);
    assert_eq!(pipeline.vae_pass_bytes(48, 4096, 4), 3.0 * 4.0 * 8.0 * 48.0 * 64.0);
}

/// An LCM-distilled UNet (`time_cond_proj_dim`) in a LatentConsistencyModelPipeline folder
/// (tools/fixtures/lcm_unet.py): the guidance scale embedded through `time_embedding.cond_proj`,
/// one UNet pass per step, against LatentConsistencyModelPipeline.
#[test]
fn lcm_distilled_unet_matches_latent_consistency_model_pipeline() {
    for case in cases_with_prefix("lcm_unet_") {
        run_case(&case);
    }
}

/// With an LCM-distilled UNet a negative prompt is ignored, with a warning, and the image is
/// the one without it (lcm_unet_4_steps).
#[test]
fn lcm_distilled_unet_ignores_the_negative_prompt() {
    let dir = fixtures_dir().join("sd");
    let mut pipeline = StableDiffusionPipeline::load(&dir.join("lcm"), None, &[], None, &Device::Cpu, DType::F32).unwrap();
    assert!(!pipeline.do_classifier_free_guidance(&TextToImageOptions { guidance_scale: 8.5, ..Default::default() }));
    let options = TextToImageOptions {
        prompt: "a photo of a cat".to_string(),
        negative_prompt: Some("blurry".to_string()),
        num_inference_steps: 4,
        guidance_scale: 8.5,
        ..Default::default()
    };
    let mut warnings = Vec::new();
    let images = pipeline
        .generate(&options, &mut TorchGenerator::new(51), &mut |_, _| {}, &mut |w| warnings.push(w), &mut PhaseTimes::default())
        .unwrap();
    assert!(warnings.iter().any(|w| w.contains("negative prompt is ignored")), "{warnings:?}");
    let expected = load_tensors(&dir.join("cases").join("lcm_unet_4_steps.safetensors"));
    let bytes = to_uint8_images(&images).unwrap();
    let reference = expected["images"].flatten_all().unwrap().to_vec1::<u8>().unwrap();
    let psnr = psnr_u8(&bytes[0].3, &reference);
    assert!(psnr >= MIN_PSNR_DB, "PSNR {psnr:.1} dB");
}

#[test]
fn sd2_v_prediction_linear_projection_upcast() {
    for case in cases_with_prefix("sd2_") {
        run_case(&case);
    }
}

/// Live previews: after every step the sink gets the x₀ the model predicts, decoded (here by a
/// TAESD and by the pipeline's own VAE). With DDIM the last step's x₀ is almost the final
/// image (DDIM's last step only adds √(1 - ᾱ_final) of the predicted noise).
#[test]
fn previews_decode_each_steps_predicted_original() {
    use std::sync::{Arc, Mutex};
    let dir = fixtures_dir().join("sd");
    for preview_vae in [None, Some(fixtures_dir().join("vae").join("taesd"))] {
        let mut pipeline = StableDiffusionPipeline::load(&dir.join("sd1"), Some("ddim"), &[], None, &Device::Cpu, DType::F32).unwrap();
        let seen: Arc<Mutex<Vec<(usize, candle_core::Tensor)>>> = Arc::default();
        let sink_seen = seen.clone();
        let vae = preview_vae.as_ref().map(|dir| pipeline.load_vae(dir, None).unwrap());
        pipeline.preview = Some(diffuse::pipelines::stable_diffusion::StepPreview {
            vae,
            sink: Box::new(move |step, images| {
                sink_seen.lock().unwrap().push((step, images.clone()));
                Ok(())
            }),
        });
        let options = TextToImageOptions {
            prompt: "a photo of a cat".to_string(),
            num_inference_steps: 5,
            num_images_per_prompt: 2,
            ..Default::default()
        };
        let images = pipeline
            .generate(&options, &mut TorchGenerator::new(3), &mut |_, _| {}, &mut |_| {}, &mut PhaseTimes::default())
            .unwrap();
        let seen = seen.lock().unwrap();
        assert_eq!(seen.iter().map(|(step, _)| *step).collect::<Vec<_>>(), [1, 2, 3, 4, 5]);
        assert!(seen.iter().all(|(_, preview)| preview.dims() == [2, 3, 64, 64]));
        if preview_vae.is_none() {
            let last = to_uint8_images(&seen[4].1).unwrap();
            let last: Vec<u8> = last.iter().flat_map(|(_, _, _, p)| p.iter().copied()).collect();
            let fin: Vec<u8> = to_uint8_images(&images).unwrap().iter().flat_map(|(_, _, _, p)| p.iter().copied()).collect();
            let first: Vec<u8> = to_uint8_images(&seen[0].1).unwrap().iter().flat_map(|(_, _, _, p)| p.iter().copied()).collect();
            let (psnr_last, psnr_first) = (psnr_u8(&last, &fin), psnr_u8(&first, &fin));
            eprintln!("preview PSNR: last {psnr_last:.1} dB, first {psnr_first:.1} dB");
            assert!(psnr_last > 30.0 && psnr_last > psnr_first, "last preview {psnr_last:.1} dB, first {psnr_first:.1} dB");
        }
    }
}

/// The interrupt flag: set before a run, the run ends with `Error::Interrupted` before its first
/// step; set from the step callback, it ends at the next step; cleared, the pipeline runs as
/// before (the same image as a pipeline that never had a flag).
#[test]
fn interrupt_flag_stops_a_run_within_a_step() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let model = fixtures_dir().join("sd").join("sd1");
    let mut pipeline = StableDiffusionPipeline::load(&model, Some("ddim"), &[], None, &Device::Cpu, DType::F32).unwrap();
    let options = TextToImageOptions { prompt: "a cat".into(), num_inference_steps: 6, ..TextToImageOptions::default() };
    let run = |pipeline: &mut StableDiffusionPipeline, stop_at: Option<usize>, flag: &Arc<AtomicBool>| {
        let mut steps = 0;
        let result = pipeline.generate(
            &options,
            &mut TorchGenerator::new(0),
            &mut |step, _| {
                steps = step;
                if Some(step) == stop_at {
                    flag.store(true, Ordering::Relaxed);
                }
            },
            &mut |_| {},
            &mut PhaseTimes::default(),
        );
        (result, steps)
    };
    let flag = Arc::new(AtomicBool::new(false));
    let (plain, _) = run(&mut pipeline, None, &flag);
    let plain = to_uint8_images(&plain.unwrap()).unwrap();

    pipeline.interrupt = Some(flag.clone());
    flag.store(true, Ordering::Relaxed);
    let (result, steps) = run(&mut pipeline, None, &flag);
    assert!(matches!(result, Err(diffuse::Error::Interrupted)), "{:?}", result.err());
    assert_eq!(steps, 0);

    flag.store(false, Ordering::Relaxed);
    let (result, steps) = run(&mut pipeline, Some(2), &flag);
    assert!(matches!(result, Err(diffuse::Error::Interrupted)));
    assert_eq!(steps, 2, "the run stops at the step after the flag is set");

    flag.store(false, Ordering::Relaxed);
    let (again, steps) = run(&mut pipeline, None, &flag);
    assert_eq!(steps, 6);
    assert_eq!(to_uint8_images(&again.unwrap()).unwrap(), plain);
}

/// The one-call API: `from_pretrained` + `run` give the same image as the parity case, report
/// every step, and a callback's `Flow::Stop` ends the run with `Error::Interrupted` at once.
#[test]
fn run_gives_the_image_and_stops_when_asked() {
    use diffuse::pipelines::generation::{Flow, GenerationRequest, LoadOptions, StartFrom};
    let model = fixtures_dir().join("sd").join("sd1");
    let load = LoadOptions { scheduler: Some("euler".into()), ..LoadOptions::default() };
    let mut pipeline = StableDiffusionPipeline::from_pretrained(&model.to_string_lossy(), &load).unwrap();
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures_dir().join("sd/cases/sd1_negative.json")).unwrap()).unwrap();
    let request = GenerationRequest {
        options: TextToImageOptions {
            prompt: meta["prompt"].as_str().unwrap().into(),
            negative_prompt: meta["negative_prompt"].as_str().map(str::to_string),
            num_inference_steps: meta["steps"].as_u64().unwrap() as usize,
            guidance_scale: meta["guidance_scale"].as_f64().unwrap(),
            ..Default::default()
        },
        seed: meta["seed"].as_u64().unwrap(),
        start: StartFrom::Noise,
    };
    let mut steps_seen = Vec::new();
    let generated = pipeline.run(&request, &mut |step, _| { steps_seen.push(step); Flow::Continue }, &mut |_| {}).unwrap();
    assert_eq!(steps_seen, (1..=request.options.num_inference_steps).collect::<Vec<_>>());
    let expected = load_tensors(&fixtures_dir().join("sd/cases/sd1_negative.safetensors"));
    let actual: Vec<u8> = generated.images.iter().flat_map(|image| image.as_raw().iter().copied()).collect();
    let psnr = psnr_u8(&actual, &expected["images"].flatten_all().unwrap().to_vec1::<u8>().unwrap());
    assert!(psnr >= MIN_PSNR_DB, "PSNR {psnr:.1} dB");

    let mut calls = 0;
    let stopped = pipeline.run(&request, &mut |_, _| { calls += 1; if calls == 2 { Flow::Stop } else { Flow::Continue } }, &mut |_| {});
    assert!(matches!(stopped, Err(diffuse::Error::Interrupted)), "{:?}", stopped.err());
    assert_eq!(calls, 2, "no step after Stop");
    assert!(pipeline.interrupt.is_none(), "the run's own flag is gone afterwards");
}
