//! A single-file checkpoint converted from a diffusers folder gives the folder's image
//! (fixtures from tools/fixtures/single_file_pipeline.py: tiny SD 1.x and 2.x pipelines whose
//! every config value the weights cannot show is the family's, saved by diffusers and converted
//! to the LDM layout; reference images from diffusers' `from_pretrained(folder)`, and for SD 1.x
//! also `from_single_file(file, config=folder)`, which agrees exactly).
//!
//! From the file, everything but the weights is worked out or built in: the configs from the
//! tensor shapes, the tokenizer and the scheduler config of SD 1.5. So the single file must give
//! exactly the folder's pixels here (same weights, same configs, same code), and both must match
//! diffusers at the project's bar (PSNR ≥ 40 dB, float images within 2e-3).

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::*;
use diffuse::loading::single_file::{Component, SingleFile};
use diffuse::pipelines::stable_diffusion::{pipeline_class_name, PhaseTimes, StableDiffusionPipeline, TextToImageOptions};
use diffuse::pipelines::to_uint8_images;
use diffuse::rng::TorchGenerator;
use serde_json::Value;

const MIN_PSNR_DB: f64 = 40.0;
const FLOAT_TOLERANCE: f64 = 2e-3;

fn fixtures() -> PathBuf {
    fixtures_dir().join("single_file")
}

fn folder() -> PathBuf {
    fixtures().join("sd1_pipeline")
}

fn checkpoint() -> PathBuf {
    folder().join("model.safetensors")
}

fn read_json(path: &std::path::Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

/// The configs worked out from the file are the folder's, key for key.
#[test]
fn derived_configs_are_the_folders() {
    let file = SingleFile::open(checkpoint()).unwrap();
    for component in Component::ALL {
        let folder_config = read_json(&folder().join(component.folder()).join("config.json"));
        for (key, value) in file.config(component) {
            assert_eq!(Some(value), folder_config.get(key), "{component:?}: config key {key}");
        }
    }
    let scheduler = read_json(&folder().join("scheduler/scheduler_config.json"));
    for (key, value) in file.scheduler_config(None).unwrap() {
        match scheduler.get(&key) {
            Some(folder_value) => assert_eq!(&value, folder_value, "scheduler config key {key}"),
            // Not stated by SD 1.5's file; diffusers' default for PNDM.
            None => assert_eq!((key.as_str(), value), ("prediction_type", Value::from("epsilon"))),
        }
    }
}

fn generate(pipeline: &mut StableDiffusionPipeline, case: &Value) -> Tensor {
    let options = TextToImageOptions {
        prompt: case["prompt"].as_str().unwrap().to_string(),
        negative_prompt: case.get("negative_prompt").and_then(Value::as_str).map(str::to_string),
        num_inference_steps: case["steps"].as_u64().unwrap() as usize,
        guidance_scale: case["guidance_scale"].as_f64().unwrap(),
        height: case["height"].as_u64().map(|v| v as usize),
        width: case["width"].as_u64().map(|v| v as usize),
        ..Default::default()
    };
    let mut generator = TorchGenerator::new(case["seed"].as_u64().unwrap());
    pipeline
        .generate(&options, &mut generator, &mut |_, _| {}, &mut |_| {}, &mut PhaseTimes::default())
        .unwrap()
}

fn scheduler_name(class: &str) -> Option<&'static str> {
    match class {
        "PNDMScheduler" => None,
        "EulerDiscreteScheduler" => Some("euler"),
        other => panic!("no CLI name for {other}"),
    }
}

/// The single file's image against diffusers' and, when its folder is committed, against the
/// folder's (which must be the same pixels).
fn check_case(name: &str) {
    let case = read_json(&fixtures().join("cases").join(format!("{name}.json")));
    let pipeline_name = case["pipeline"].as_str().unwrap();
    let folder = fixtures().join(pipeline_name);
    let file = if folder.is_dir() { folder.join("model.safetensors") } else { fixtures().join(format!("{pipeline_name}.safetensors")) };
    let file_images = check_file_against_diffusers(name, &file);
    if folder.is_dir() {
        let scheduler = case["scheduler"].as_str().and_then(scheduler_name);
        let mut from_folder = StableDiffusionPipeline::load(&folder, scheduler, &[], None, &Device::Cpu, DType::F32).unwrap();
        let folder_images = generate(&mut from_folder, &case);
        let difference = (&folder_images - &file_images).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(difference, 0.0, "{name}: the single file's image differs from the folder's");
    }
}

/// Case `name` generated from the single file `file` (with the scheduler it chooses itself
/// unless the case names one) against diffusers' image; returns the image.
fn check_file_against_diffusers(name: &str, file: &Path) -> Tensor {
    let case = read_json(&fixtures().join("cases").join(format!("{name}.json")));
    let expected = load_tensors(&fixtures().join("cases").join(format!("{name}.safetensors")));
    let scheduler = case.get("scheduler").and_then(Value::as_str).and_then(scheduler_name);
    let mut from_file = StableDiffusionPipeline::load_single_file(file, None, scheduler, &[], &Device::Cpu, DType::F32).unwrap();
    assert_eq!(from_file.scheduler.class_name, case["scheduler_class"].as_str().unwrap());
    let file_images = generate(&mut from_file, &case);
    let float = ((file_images.clone() / 2.0).unwrap() + 0.5).unwrap().clamp(0f32, 1f32).unwrap().permute((0, 2, 3, 1)).unwrap();
    assert_close(&float, &expected["images_float"], FLOAT_TOLERANCE, &format!("{name}: float images"));
    let actual: Vec<u8> = to_uint8_images(&file_images).unwrap().into_iter().flat_map(|(_, _, _, p)| p).collect();
    let reference = expected["images"].flatten_all().unwrap().to_vec1::<u8>().unwrap();
    let psnr = psnr_u8(&actual, &reference);
    assert!(psnr >= MIN_PSNR_DB, "{name}: PSNR {psnr:.1} dB < {MIN_PSNR_DB} dB");
    file_images
}

/// An LCM-distilled UNet in a single file (tools/fixtures/single_file_lcm.py: sd1_pipeline's
/// file plus `time_embedding.cond_proj`, the name diffusers' conversion script keeps for the
/// layer LDM never had) runs as diffusers' LatentConsistencyModelPipeline: LCMScheduler unless
/// told otherwise, the guidance scale embedded, one UNet pass per step.
#[test]
fn lcm_single_file_runs_as_latent_consistency_model_pipeline() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("diffuse-lcm-single-file");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("lcm.safetensors");
    let mut tensors = candle_core::safetensors::load(checkpoint(), &Device::Cpu).unwrap();
    tensors.extend(candle_core::safetensors::load(fixtures().join("lcm_cond_proj.safetensors"), &Device::Cpu).unwrap());
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let file = SingleFile::open(&path).unwrap();
    assert_eq!(file.config(Component::Unet)["time_cond_proj_dim"], 32);
    assert_eq!(pipeline_class_name(&path).as_deref(), Some("LatentConsistencyModelPipeline"));
    assert_eq!(pipeline_class_name(&checkpoint()).as_deref(), Some("StableDiffusionPipeline"));
    let pipeline = StableDiffusionPipeline::load_single_file(&path, None, None, &[], &Device::Cpu, DType::F32).unwrap();
    assert_eq!(pipeline.pipeline_class, "LatentConsistencyModelPipeline");
    for name in ["sd1_lcm_single_file_4_steps", "sd1_lcm_single_file_3_steps_guidance_2"] {
        check_file_against_diffusers(name, &path);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn single_file_gives_the_folders_image_and_diffusers() {
    check_case("sd1_single_file_default");
}

#[test]
fn single_file_with_another_scheduler_and_a_negative_prompt() {
    check_case("sd1_single_file_euler_negative");
}

/// SD 2.x: OpenCLIP (q/k/v fused, one layer more than used), the tokenizer that pads with `!`,
/// DDIM with v-prediction by default, linear projections and upcast attention.
#[test]
fn sd2_single_file_gives_diffusers_image() {
    check_case("sd2_single_file_default");
    let file = SingleFile::open(fixtures().join("sd2_pipeline.safetensors")).unwrap();
    assert_eq!(file.scheduler_config(None).unwrap()["prediction_type"], "v_prediction");
}

#[test]
fn prediction_type_reaches_the_scheduler() {
    let device = Device::Cpu;
    let pipeline =
        StableDiffusionPipeline::load_single_file(&checkpoint(), Some("v_prediction"), Some("ddim"), &[], &device, DType::F32)
            .unwrap();
    assert_eq!(pipeline.scheduler.config["prediction_type"], "v_prediction");
    assert_eq!(pipeline.scheduler.class_name, "DDIMScheduler");
    let err = StableDiffusionPipeline::load_single_file(&checkpoint(), Some("x0"), None, &[], &device, DType::F32)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("prediction_type `x0`"), "{err}");
}

#[test]
fn pickle_checkpoints_are_refused() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("diffuse-single-file-pipeline");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.ckpt");
    std::fs::write(&path, b"PK\x03\x04 not really a zip").unwrap();
    let err = StableDiffusionPipeline::load_single_file(&path, None, None, &[], &Device::Cpu, DType::F32)
        .err()
        .unwrap()
        .to_string();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(err.contains("pickle") && err.contains("safetensors"), "{err}");
}

/// sd1_tiny (tools/fixtures/single_file.py) has 8-channel levels with 4 norm groups, which its
/// weights cannot show: built with SD 1.5's 32 groups, it is refused, about the file.
#[test]
fn configs_the_weights_cannot_show_are_reported_about_the_file() {
    let path = fixtures().join("sd1_tiny/model.safetensors");
    let err = StableDiffusionPipeline::load_single_file(&path, None, None, &[], &Device::Cpu, DType::F32)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("sd1_tiny/model.safetensors") && err.contains("Stable Diffusion 1.5"), "{err}");
    assert!(err.contains("32 groups cannot split 8 channels"), "{err}");
}
