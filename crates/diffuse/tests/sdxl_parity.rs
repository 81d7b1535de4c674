//! Stable Diffusion XL against diffusers' StableDiffusionXL{,Img2Img,Inpaint}Pipeline (fixtures:
//! tools/fixtures/sdxl.py): a tiny seeded random base (two text encoders, CLIP-L padding with
//! `<|endoftext|>` and a bigG-like CLIPTextModelWithProjection padding with `!`, a `text_time`
//! UNet with per-block transformer depths, a VAE with SDXL's scaling factor) and refiner (the
//! second encoder only, aesthetic-score time ids), in the real folder layout with the real CLIP
//! vocabulary. Every scheduler, guidance on and off, negative and second prompts, the empty
//! prompt (zeroed negative embeddings), micro-conditioning, clip skip, batches, image-to-image,
//! inpainting, the refiner, and the base + refiner ensemble: PSNR ≥ 40 dB. The prompt
//! embeddings, time ids and one UNet pass are also compared alone. The base and refiner as
//! single files in the SGM layout (tools/fixtures/sdxl_single_file_lora.py) give the folders'
//! weights and images.

mod common;


use candle_core::{DType, Device, Tensor};
use common::*;
use diffuse::loading::config::parse_override;
use diffuse::loading::single_file::{recognise, Component, Family, SingleFile};
use diffuse::pipelines::image_processor::Image8;
use diffuse::pipelines::img2img::{generate_with_refiner, ImageCondition};
use diffuse::lora::LoraSpec;
use diffuse::pipelines::stable_diffusion::{
    pipeline_class_name, PhaseTimes, StableDiffusionPipeline, TextToImageOptions, TimeIdsFor,
};
use diffuse::rng::TorchGenerator;
use serde_json::Value;


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

fn load(model: &str, config: Option<&str>, scheduler: Option<&str>, overrides: &[(String, Value)]) -> StableDiffusionPipeline {
    load_with_loras(model, config, scheduler, overrides, &[])
}

/// A folder, or a single file with the configs of the folder `config` (diffusers'
/// `from_single_file(file, config=folder)`: the tiny models' heads and norm groups are not SDXL's).
fn load_with_loras(
    model: &str,
    config: Option<&str>,
    scheduler: Option<&str>,
    overrides: &[(String, Value)],
    loras: &[LoraSpec],
) -> StableDiffusionPipeline {
    let path = dir().join(model);
    let (device, dtype) = (&Device::Cpu, DType::F32);
    let loaded = if path.is_file() {
        let file = SingleFile::open(&path).unwrap_or_else(|e| panic!("{model}: {e}"));
        let file = match config {
            Some(config) => file.with_folder_configs(&dir().join(config)).unwrap_or_else(|e| panic!("{model}: {e}")),
            None => file,
        };
        StableDiffusionPipeline::from_single_file(file, None, scheduler, overrides, loras, device, dtype)
    } else {
        StableDiffusionPipeline::load_with_loras(&path, scheduler, overrides, None, loras, device, dtype)
    };
    loaded.unwrap_or_else(|e| panic!("{model}: {e}"))
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

fn run_case(case: &str) {
    let meta = meta(case);
    let expected = load_tensors(&dir().join("cases").join(format!("{case}.safetensors")));
    let overrides = overrides(&meta);
    let model = meta["model"].as_str().unwrap();
    let mut pipeline = load_with_loras(model, meta["config"].as_str(), meta["scheduler"].as_str(), &overrides, &loras(&meta));
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
            let mut refiner =
                load(meta["refiner"].as_str().unwrap(), None, meta["refiner_scheduler"].as_str(), &overrides);
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
    case_names(&dir().join("cases"), prefix)
}

/// encode_prompt's four outputs, the time ids, and one UNet pass on a fixed input.
#[test]
fn prompt_embeddings_time_ids_and_unet_match_diffusers() {
    let expected = load_tensors(&dir().join("intermediates.safetensors"));
    let all: Value = serde_json::from_str(&std::fs::read_to_string(dir().join("intermediates.json")).unwrap()).unwrap();
    for (name, info) in all.as_object().unwrap() {
        let meta = meta(info["case"].as_str().unwrap());
        let pipeline = load(info["model"].as_str().unwrap(), None, None, &[]);
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

// ---------------------------------------------------------------------------------------------
// Single files
// ---------------------------------------------------------------------------------------------

fn single_file(name: &str) -> std::path::PathBuf {
    dir().join("single_file").join(format!("{name}.safetensors"))
}

/// The base and refiner files render their folders' images (diffusers' from_single_file with
/// config=folder), as the pipeline classes diffusers gives them.
#[test]
fn single_file_base_and_refiner() {
    for (case, class, force_zeros, aesthetics) in [
        ("single_file_base", "StableDiffusionXLPipeline", true, false),
        ("single_file_refiner", "StableDiffusionXLImg2ImgPipeline", false, true),
    ] {
        let meta = meta(case);
        assert_eq!(meta["pipeline_class"], class);
        let pipeline = load(meta["model"].as_str().unwrap(), meta["config"].as_str(), None, &[]);
        assert_eq!(pipeline.pipeline_class, class, "{case}");
        assert_eq!(
            (pipeline.force_zeros_for_empty_prompt, pipeline.requires_aesthetics_score),
            (force_zeros, aesthetics),
            "{case}"
        );
        assert_eq!(pipeline_class_name(&dir().join(meta["model"].as_str().unwrap())).as_deref(), Some(class));
        run_case(case);
    }
}

/// Every tensor of the folders comes out of the single files under its diffusers name with the
/// same values (the refiner's only text encoder is the folder's text_encoder_2).
#[test]
fn single_files_hold_the_folders_weights() {
    for (name, folder, family) in
        [("base", "base", Family::StableDiffusionXL), ("refiner", "refiner", Family::StableDiffusionXLRefiner)]
    {
        let file = SingleFile::open(single_file(name)).unwrap();
        assert_eq!(file.family(), family);
        let components = [Component::Unet, Component::Vae, Component::TextEncoder, Component::TextEncoder2];
        for component in components.into_iter().filter(|&c| file.recognised().has(c)) {
            let sub = file.recognised().folder(component);
            let stem = if sub.starts_with("text_encoder") { "model" } else { "diffusion_pytorch_model" };
            let expected = load_tensors(&dir().join(folder).join(sub).join(format!("{stem}.safetensors")));
            let actual = file.load(component, &Device::Cpu).unwrap();
            let mut missing: Vec<&String> = expected.keys().filter(|k| !actual.contains_key(*k)).collect();
            let mut extra: Vec<&String> = actual.keys().filter(|k| !expected.contains_key(*k)).collect();
            missing.sort();
            extra.sort();
            assert!(missing.is_empty() && extra.is_empty(), "{name} {sub}: missing {missing:?}, extra {extra:?}");
            for (key, tensor) in &expected {
                assert_eq!(actual[key].dims(), tensor.dims(), "{name} {sub}: {key} shape");
                assert_close(&actual[key], tensor, 0.0, &format!("{name} {sub}: {key}"));
            }
        }
    }
}

/// From the tensors alone (no config folder), every value the shapes show is the folder's; the
/// rest is SDXL's (heads of 64 channels, 32 norm groups...).
#[test]
fn single_file_configs_from_shapes() {
    const CLIP_KEYS: &[&str] =
        &["vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "max_position_embeddings", "hidden_act"];
    let keys: [(Component, Vec<&str>); 4] = [
        (
            Component::Unet,
            vec![
                "in_channels",
                "out_channels",
                "block_out_channels",
                "layers_per_block",
                "down_block_types",
                "up_block_types",
                "cross_attention_dim",
                "transformer_layers_per_block",
                "projection_class_embeddings_input_dim",
                "addition_time_embed_dim",
                "addition_embed_type",
                "use_linear_projection",
                "class_embed_type",
            ],
        ),
        (
            Component::Vae,
            vec![
                "in_channels",
                "out_channels",
                "latent_channels",
                "block_out_channels",
                "layers_per_block",
                "scaling_factor",
                "force_upcast",
            ],
        ),
        (Component::TextEncoder, CLIP_KEYS.to_vec()),
        (Component::TextEncoder2, [CLIP_KEYS, &["projection_dim"]].concat()),
    ];
    for name in ["base", "refiner"] {
        let file = SingleFile::open(single_file(name)).unwrap();
        for (component, keys) in &keys {
            if !file.recognised().has(*component) {
                continue;
            }
            let sub = file.recognised().folder(*component);
            let folder: Value =
                serde_json::from_str(&std::fs::read_to_string(dir().join(name).join(sub).join("config.json")).unwrap())
                    .unwrap();
            for key in keys {
                let derived = file.config(*component).get(*key).cloned().unwrap_or(Value::Null);
                assert_eq!(derived, folder[*key], "{name} {sub}: {key}");
            }
        }
        let scheduler = file.scheduler_config(None).unwrap();
        assert_eq!(scheduler["_class_name"], "EulerDiscreteScheduler");
        assert_eq!(scheduler["prediction_type"], "epsilon");
    }
}

fn shapes(name: &str) -> std::collections::BTreeMap<String, Vec<usize>> {
    load_tensors(&single_file(name)).into_iter().map(|(k, t)| (k, t.dims().to_vec())).collect()
}

/// A malformed SDXL file is refused naming the file and the tensor, without a panic.
#[test]
fn malformed_single_files_are_refused() {
    let origin = std::path::Path::new("broken.safetensors");
    let refused = |shapes: &std::collections::BTreeMap<String, Vec<usize>>, expected: &[&str]| {
        let message = recognise(shapes, origin).unwrap_err().to_string();
        assert!(message.contains("broken.safetensors"), "{message}");
        for part in expected {
            assert!(message.contains(part), "expected {part:?} in: {message}");
        }
    };
    // The base without its CLIP ViT-L.
    let mut base = shapes("base");
    base.retain(|k, _| !k.starts_with("conditioner.embedders.0."));
    refused(&base, &["conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"]);
    // An added embedding whose width is not the pooled embedding and 6 time ids.
    let mut base = shapes("base");
    base.get_mut("model.diffusion_model.label_emb.0.0.weight").unwrap()[1] += 1;
    refused(&base, &["model.diffusion_model.label_emb.0.0.weight", "6 time ids"]);
    // A refiner without its added embedding.
    let mut refiner = shapes("refiner");
    refiner.retain(|k, _| !k.starts_with("model.diffusion_model.label_emb."));
    refused(&refiner, &["model.diffusion_model.label_emb.0.0.weight"]);
    // bigG's projection of the wrong shape.
    let mut refiner = shapes("refiner");
    refiner.get_mut("conditioner.embedders.0.model.text_projection").unwrap()[0] += 1;
    refused(&refiner, &["conditioner.embedders.0.model.text_projection"]);
    // One attention deeper than its level.
    let mut base = shapes("base");
    let extra: Vec<(String, Vec<usize>)> = base
        .iter()
        .filter_map(|(k, v)| {
            let rest = k.strip_prefix("model.diffusion_model.output_blocks.0.1.transformer_blocks.0.")?;
            Some((format!("model.diffusion_model.output_blocks.0.1.transformer_blocks.7.{rest}"), v.clone()))
        })
        .collect();
    base.extend(extra);
    refused(&base, &["model.diffusion_model.output_blocks.0.1", "8 transformer blocks"]);
}

/// diffusers/PEFT and kohya LoRAs (`unet`, `text_encoder`, `text_encoder_2`; kohya's UNet layers
/// under SGM block names, `lora_te1_`, `lora_te2_`), fused as `fuse_lora` fuses them.
#[test]
fn peft_and_kohya_loras() {
    for case in cases_with_prefix("lora_") {
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
    let pipeline = load("base", None, None, &[]);
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
