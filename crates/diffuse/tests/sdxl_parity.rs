//! Stable Diffusion XL against diffusers' StableDiffusionXL{,Img2Img,Inpaint}Pipeline (fixtures:
//! tools/fixtures/sdxl.py): a tiny seeded random base (two text encoders, CLIP-L padding with
//! `<|endoftext|>` and a bigG-like CLIPTextModelWithProjection padding with `!`, a `text_time`
//! UNet with per-block transformer depths, a VAE with SDXL's scaling factor) and refiner (the
//! second encoder only, aesthetic-score time ids), in the real folder layout with the real CLIP
//! vocabulary. Every scheduler, guidance on and off, negative and second prompts, the empty
//! prompt (zeroed negative embeddings), micro-conditioning, clip skip, batches, image-to-image,
//! inpainting, the refiner, and the base + refiner ensemble: PSNR ≥ 40 dB. The prompt
//! embeddings, time ids and one UNet pass are also compared alone.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use common::*;
use diffuse::loading::config::parse_override;
use diffuse::pipelines::image_processor::Image8;
use diffuse::pipelines::img2img::{generate_with_refiner, ImageCondition};
use diffuse::pipelines::stable_diffusion::{PhaseTimes, StableDiffusionPipeline, TextToImageOptions, TimeIdsFor};
use diffuse::lora::LoraSpec;
use diffuse::pipelines::to_uint8_images;
use diffuse::rng::TorchGenerator;
use serde_json::Value;

const MIN_PSNR_DB: f64 = 40.0;
const FLOAT_TOLERANCE: f64 = 2e-3;

fn dir() -> std::path::PathBuf {
    fixtures_dir().join("sdxl")
}

fn meta(case: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir().join("cases").join(format!("{case}.json"))).unwrap()).unwrap()
}

fn overrides(meta: &Value) -> Vec<(String, Value)> {
    meta.get("overrides")
        .and_then(|o| o.as_object())
        .map(|o| o.iter().map(|(k, v)| parse_override(&format!("{k}={v}")).unwrap()).collect())
        .unwrap_or_default()
}

fn load(model: &str, scheduler: Option<&str>, overrides: &[(String, Value)]) -> StableDiffusionPipeline {
    load_with_loras(model, scheduler, overrides, &[])
}

fn load_with_loras(model: &str, scheduler: Option<&str>, overrides: &[(String, Value)], loras: &[LoraSpec]) -> StableDiffusionPipeline {
    StableDiffusionPipeline::load_with_loras(&dir().join(model), scheduler, overrides, None, loras, &Device::Cpu, DType::F32)
        .unwrap_or_else(|e| panic!("{model}: {e}"))
}

/// The case's `loras`: [[path, scale], ...], relative to fixtures/sdxl.
fn loras(meta: &Value) -> Vec<LoraSpec> {
    let Some(list) = meta.get("loras").and_then(Value::as_array) else { return Vec::new() };
    list.iter().map(|entry| LoraSpec::new(dir().join(entry[0].as_str().unwrap()), entry[1].as_f64().unwrap())).collect()
}

/// (height, width) or (top, left) from a JSON pair.
fn pair(meta: &Value, key: &str) -> Option<(usize, usize)> {
    let values = meta.get(key)?.as_array()?;
    Some((values[0].as_u64()? as usize, values[1].as_u64()? as usize))
}

fn options(meta: &Value) -> TextToImageOptions {
    let text = |key: &str| meta.get(key).and_then(|v| v.as_str()).map(str::to_string);
    let number = |key: &str| meta.get(key).and_then(|v| v.as_f64());
    let defaults = TextToImageOptions::default();
    TextToImageOptions {
        prompt: text("prompt").unwrap(),
        negative_prompt: text("negative_prompt"),
        prompt_2: text("prompt_2"),
        negative_prompt_2: text("negative_prompt_2"),
        num_inference_steps: meta["steps"].as_u64().unwrap() as usize,
        guidance_scale: meta["guidance_scale"].as_f64().unwrap(),
        guidance_rescale: number("guidance_rescale").unwrap_or(0.0),
        num_images_per_prompt: meta.get("num_images").and_then(|v| v.as_u64()).unwrap_or(1) as usize,
        height: meta.get("height").and_then(|v| v.as_u64()).map(|v| v as usize),
        width: meta.get("width").and_then(|v| v.as_u64()).map(|v| v as usize),
        clip_skip: meta.get("clip_skip").and_then(|v| v.as_u64()).map(|v| v as usize),
        original_size: pair(meta, "original_size"),
        crops_coords_top_left: pair(meta, "crops_coords_top_left").unwrap_or_default(),
        target_size: pair(meta, "target_size"),
        negative_original_size: pair(meta, "negative_original_size"),
        negative_crops_coords_top_left: pair(meta, "negative_crops_coords_top_left").unwrap_or_default(),
        negative_target_size: pair(meta, "negative_target_size"),
        aesthetic_score: number("aesthetic_score").unwrap_or(defaults.aesthetic_score),
        negative_aesthetic_score: number("negative_aesthetic_score").unwrap_or(defaults.negative_aesthetic_score),
        ..defaults
    }
}

/// diffusers' float output is (x / 2 + 0.5).clamp(0, 1) as [N, H, W, C]; the uint8 output
/// rounds it. Checks both against the reference.
fn assert_images_match(images: &Tensor, expected: &HashMap<String, Tensor>, what: &str) -> f64 {
    let float = ((images.clone() / 2.0).unwrap() + 0.5).unwrap().clamp(0f32, 1f32).unwrap().permute((0, 2, 3, 1)).unwrap();
    let bytes = to_uint8_images(images).unwrap();
    let actual: Vec<u8> = bytes.iter().flat_map(|(_, _, _, p)| p.iter().copied()).collect();
    let reference = expected["images"].flatten_all().unwrap().to_vec1::<u8>().unwrap();
    let psnr = psnr_u8(&actual, &reference);
    assert!(psnr >= MIN_PSNR_DB, "{what}: PSNR {psnr:.1} dB < {MIN_PSNR_DB} dB");
    assert_close(&float, &expected["images_float"], FLOAT_TOLERANCE, &format!("{what}: float images"));
    psnr
}

fn run_case(case: &str) {
    let meta = meta(case);
    let expected = load_tensors(&dir().join("cases").join(format!("{case}.safetensors")));
    let overrides = overrides(&meta);
    let mut pipeline = load_with_loras(meta["model"].as_str().unwrap(), meta["scheduler"].as_str(), &overrides, &loras(&meta));
    assert_eq!(pipeline.scheduler.class_name, meta["scheduler_class"].as_str().unwrap(), "{case}: scheduler class");
    let options = options(&meta);
    let mut generator = TorchGenerator::new(meta["seed"].as_u64().unwrap());
    let (mut on_step, mut warn, mut times) = (|_, _| {}, |_| {}, PhaseTimes::default());
    let images = match meta["kind"].as_str().unwrap() {
        "txt2img" => pipeline.generate(&options, &mut generator, &mut on_step, &mut warn, &mut times),
        "img2img" | "inpaint" => {
            let image = Image8::load_rgb(&dir().join(meta["image"].as_str().unwrap())).unwrap();
            let mask = meta.get("mask").and_then(|m| m.as_str()).map(|m| Image8::load_rgb(&dir().join(m)).unwrap());
            let condition = ImageCondition { image: &image, mask: mask.as_ref(), strength: meta["strength"].as_f64().unwrap() };
            pipeline.generate_from_image(&options, &condition, &mut generator, &mut on_step, &mut warn, &mut times)
        }
        "ensemble" => {
            let mut refiner = load(meta["refiner"].as_str().unwrap(), meta["refiner_scheduler"].as_str(), &overrides);
            let switch = meta["denoising_end"].as_f64().unwrap();
            assert_eq!(meta["denoising_start"].as_f64(), Some(switch));
            generate_with_refiner(&mut pipeline, &mut refiner, &options, switch, &mut generator, &mut on_step, &mut warn, &mut times)
        }
        other => panic!("{case}: unknown kind {other}"),
    }
    .unwrap_or_else(|e| panic!("{case}: {e}"));
    let psnr = assert_images_match(&images, &expected, case);
    eprintln!("{case}: PSNR {psnr:.1} dB");
}

fn cases_with_prefix(prefix: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir().join("cases"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|f| f.strip_suffix(".json").map(str::to_string))
        .filter(|n| n.starts_with(prefix))
        .collect();
    names.sort();
    assert!(!names.is_empty(), "no cases start with {prefix}");
    names
}

/// encode_prompt's four outputs, the time ids, and one UNet pass on a fixed input.
#[test]
fn prompt_embeddings_time_ids_and_unet_match_diffusers() {
    let expected = load_tensors(&dir().join("intermediates.safetensors"));
    let all: Value = serde_json::from_str(&std::fs::read_to_string(dir().join("intermediates.json")).unwrap()).unwrap();
    for (name, info) in all.as_object().unwrap() {
        let meta = meta(info["case"].as_str().unwrap());
        let pipeline = load(info["model"].as_str().unwrap(), None, &[]);
        let options = TextToImageOptions {
            height: info["height"].as_u64().map(|v| v as usize),
            width: info["width"].as_u64().map(|v| v as usize),
            ..options(&meta)
        };
        let get = |key: &str| &expected[&format!("{name}.{key}")];
        let embeddings = pipeline.encode_prompt(&options, &mut |_| {}).unwrap();
        let hidden = Tensor::cat(&[get("negative_prompt_embeds"), get("prompt_embeds")], 0).unwrap();
        assert_close(&embeddings.hidden, &hidden, 1e-4, &format!("{name}: prompt embeddings"));
        let pooled = Tensor::cat(&[get("negative_pooled_prompt_embeds"), get("pooled_prompt_embeds")], 0).unwrap();
        assert_close(embeddings.pooled.as_ref().unwrap(), &pooled, 1e-4, &format!("{name}: pooled embeddings"));
        let size = (options.height.unwrap(), options.width.unwrap());
        let kind = if meta["kind"] == "txt2img" { TimeIdsFor::TextToImage } else { TimeIdsFor::Image };
        let added = pipeline.added_conditions(&options, &embeddings, size, 1, kind).unwrap().unwrap();
        assert_close(&added.time_ids, get("unet_time_ids"), 0.0, &format!("{name}: time ids"));
        let output = pipeline
            .unet
            .forward_with_added_conditions(
                get("unet_sample"),
                get("unet_timestep"),
                get("unet_encoder_hidden_states"),
                None,
                Some(&diffuse::models::unet_2d_condition::AddedConditions {
                    text_embeds: get("unet_text_embeds").clone(),
                    time_ids: get("unet_time_ids").clone(),
                }),
            )
            .unwrap();
        assert_close(&output, get("unet_output"), 1e-4, &format!("{name}: UNet output"));
    }
}

#[test]
fn base_guidance_prompts_and_micro_conditioning() {
    for case in cases_with_prefix("base_").into_iter().filter(|c| !c.starts_with("base_sched_")) {
        run_case(&case);
    }
}

#[test]
fn base_every_scheduler() {
    for case in cases_with_prefix("base_sched_") {
        run_case(&case);
    }
}

#[test]
fn image_to_image_and_inpainting_with_the_base() {
    for case in cases_with_prefix("img2img_").into_iter().chain(cases_with_prefix("inpaint_")) {
        run_case(&case);
    }
}

#[test]
fn refiner_image_to_image() {
    for case in cases_with_prefix("refiner_") {
        run_case(&case);
    }
}

#[test]
fn base_and_refiner_ensemble() {
    for case in cases_with_prefix("ensemble_") {
        run_case(&case);
    }
}

/// diffusers/PEFT and kohya LoRAs (`unet`, `text_encoder`, `text_encoder_2`; kohya's UNet layers
/// under SGM block names, `lora_te1_`, `lora_te2_`), fused as `fuse_lora` fuses them.
#[test]
fn peft_and_kohya_loras() {
    for case in cases_with_prefix("lora_").into_iter().filter(|c| !c.ends_with("_single_file")) {
        run_case(&case);
    }
}

/// An SD 1.x LoRA on SDXL is refused, naming the layer whose shape does not fit.
#[test]
fn an_sd1_lora_is_refused_on_sdxl() {
    for file in ["peft_a", "kohya_a"] {
        let spec = LoraSpec::new(fixtures_dir().join("lora").join(format!("{file}.safetensors")), 1.0);
        let result = StableDiffusionPipeline::load_with_loras(&dir().join("base"), None, &[], None, &[spec], &Device::Cpu, DType::F32);
        let message = result.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(message.contains("another shape") && message.contains("another architecture"), "{file}: {message}");
    }
}

/// AUTOMATIC1111's prompt syntax on SDXL: a plain prompt of one chunk gives exactly diffusers'
/// embeddings (both encoders, pooled too); a long prompt is encoded in 77-token chunks by
/// both encoders, side by side; weights change the embeddings but not the pooled one (A1111
/// pools the first chunk as encoded, before the emphasis).
#[test]
fn a1111_prompt_syntax_on_sdxl() {
    use diffuse::prompts::PromptSyntax;
    let pipeline = load("base", None, &[]);
    let encode = |prompt: &str, syntax| {
        let options = TextToImageOptions {
            prompt: prompt.to_string(),
            negative_prompt: Some("blurry".to_string()),
            prompt_syntax: syntax,
            guidance_scale: 5.0,
            ..TextToImageOptions::default()
        };
        pipeline.encode_prompt(&options, &mut |_| {}).unwrap()
    };
    let diffusers = encode("a photo of a cat", PromptSyntax::Diffusers);
    let a1111 = encode("a photo of a cat", PromptSyntax::A1111);
    assert_close(&a1111.hidden, &diffusers.hidden, 1e-5, "plain prompt, hidden states");
    assert_close(a1111.pooled.as_ref().unwrap(), diffusers.pooled.as_ref().unwrap(), 1e-6, "plain prompt, pooled");

    let weighted = encode("a photo of a (cat:1.4)", PromptSyntax::A1111);
    assert!(max_relative_error(&to_vec_f32(&weighted.hidden), &to_vec_f32(&a1111.hidden)) > 1e-3, "weights change the embeddings");
    assert_close(weighted.pooled.as_ref().unwrap(), a1111.pooled.as_ref().unwrap(), 1e-6, "weights leave the pooled embedding");

    let long = vec!["a very detailed painting of a cat"; 20].join(", ");
    let long = encode(&long, PromptSyntax::A1111);
    let (batch, tokens, width) = long.hidden.dims3().unwrap();
    assert!((batch, width) == (2, 40) && tokens > 77 && tokens % 77 == 0, "chunks of 77, both encoders' widths: {:?}", long.hidden.dims());
}
