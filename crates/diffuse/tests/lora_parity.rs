//! LoRAs fused into Stable Diffusion against diffusers' `load_lora_weights` + `set_adapters` +
//! `fuse_lora` (fixtures: tools/fixtures/lora.py): peft adapters on the tiny SD 1.x pipeline
//! saved by diffusers (`save_lora_weights`, alpha in the adapter config), the same adapters in
//! kohya's format (diffusers' names and LDM block names, with and without alphas) and in
//! diffusers' old attention-processor format; linear, 1x1- and 3x3-conv layers; weights,
//! per-model weights and two stacked LoRAs; a single-file checkpoint. Images must reach PSNR ≥
//! 40 dB and the float images agree to 2e-3, as tests/sd_pipeline_parity.rs; then bad input.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::*;
use diffuse::lora::{lora_hash, LoraFile, LoraSpec};
use diffuse::pipelines::stable_diffusion::{PhaseTimes, StableDiffusionPipeline, TextToImageOptions};
use diffuse::prompts::PromptSyntax;
use diffuse::rng::TorchGenerator;
use serde_json::Value;


fn lora_dir() -> PathBuf {
    fixtures_dir().join("lora")
}

fn lora(name: &str) -> PathBuf {
    lora_dir().join(format!("{name}.safetensors"))
}

fn sd1() -> PathBuf {
    fixtures_dir().join("sd").join("sd1")
}

fn case(name: &str) -> (Value, HashMap<String, Tensor>) {
    let dir = lora_dir().join("cases");
    let meta = serde_json::from_str(&std::fs::read_to_string(dir.join(format!("{name}.json"))).unwrap()).unwrap();
    (meta, load_tensors(&dir.join(format!("{name}.safetensors"))))
}

/// The case's LoRAs as given in its JSON: `[file, weight]` or `[file, {"unet": w, "text_encoder": w}]`.
fn specs(meta: &Value) -> Vec<LoraSpec> {
    meta["loras"]
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| {
            let mut spec = LoraSpec::new(lora(entry[0].as_str().unwrap()), 1.0);
            match &entry[1] {
                Value::Object(weights) => {
                    spec.unet_weight = weights["unet"].as_f64().unwrap();
                    spec.text_encoder_weight = weights["text_encoder"].as_f64().unwrap();
                }
                weight => {
                    spec.unet_weight = weight.as_f64().unwrap();
                    spec.text_encoder_weight = spec.unet_weight;
                }
            }
            spec
        })
        .collect()
}

fn load(meta: &Value, loras: &[LoraSpec]) -> StableDiffusionPipeline {
    let device = Device::Cpu;
    if meta.get("model").and_then(Value::as_str) == Some("single_file") {
        let file = fixtures_dir().join("single_file").join("sd1_pipeline").join("model.safetensors");
        StableDiffusionPipeline::load_single_file_with_loras(&file, None, None, &[], loras, &device, DType::F32).unwrap()
    } else {
        StableDiffusionPipeline::load_with_loras(&sd1(), None, &[], None, loras, &device, DType::F32).unwrap()
    }
}

fn generate(pipeline: &mut StableDiffusionPipeline, meta: &Value, syntax: PromptSyntax, prompt: Option<&str>) -> Tensor {
    let options = TextToImageOptions {
        prompt: prompt.unwrap_or(meta["prompt"].as_str().unwrap()).to_string(),
        num_inference_steps: meta["steps"].as_u64().unwrap() as usize,
        guidance_scale: meta["guidance_scale"].as_f64().unwrap(),
        height: meta.get("height").and_then(Value::as_u64).map(|v| v as usize),
        width: meta.get("width").and_then(Value::as_u64).map(|v| v as usize),
        prompt_syntax: syntax,
        ..Default::default()
    };
    let mut generator = TorchGenerator::new(meta["seed"].as_u64().unwrap());
    pipeline.generate(&options, &mut generator, &mut |_, _| {}, &mut |_| {}, &mut PhaseTimes::default()).unwrap()
}

fn check(images: &Tensor, expected: &HashMap<String, Tensor>, what: &str) {
    assert_images_match(images, expected, what);
}

/// Runs a case with its own LoRAs, then with each `same_as` file in place of the first LoRA.
fn run_case(name: &str) -> Vec<StableDiffusionPipeline> {
    let (meta, expected) = case(name);
    let mut variants = vec![specs(&meta)];
    for other in meta.get("same_as").and_then(Value::as_array).into_iter().flatten() {
        let mut specs = specs(&meta);
        let (unet, text) = (specs[0].unet_weight, specs[0].text_encoder_weight);
        specs[0] = LoraSpec { unet_weight: unet, text_encoder_weight: text, ..LoraSpec::new(lora(other.as_str().unwrap()), 1.0) };
        variants.push(specs);
    }
    let mut pipelines = Vec::new();
    for loras in variants {
        let what = format!("{name} with {:?}", loras.iter().map(|l| l.name.as_str()).collect::<Vec<_>>());
        let mut pipeline = load(&meta, &loras);
        let images = generate(&mut pipeline, &meta, PromptSyntax::Diffusers, None);
        check(&images, &expected, &what);
        // The image must be the LoRA's, not the base model's.
        if !loras.is_empty() && meta.get("model").is_none() {
            let psnr = images_psnr(&images, &case("base").1);
            assert!(psnr < 30.0, "{what}: the image is the base model's ({psnr:.1} dB)");
        }
        pipelines.push(pipeline);
    }
    pipelines
}

#[test]
fn no_lora_is_the_base_image() {
    let pipelines = run_case("base");
    assert!(pipelines[0].loras.is_empty());
}

/// peft_a in three formats: alpha from the adapter config (diffusers), from `.alpha` tensors
/// (kohya) and folded into the weights (old attention processors, which have no alpha).
#[test]
fn attention_lora_in_every_format() {
    let pipelines = run_case("a");
    let formats: Vec<String> = pipelines.iter().map(|p| p.loras[0].formats.iter().map(|f| f.label()).collect::<Vec<_>>().join("+")).collect();
    assert_eq!(formats, ["diffusers/PEFT", "kohya", "diffusers attention-processor"]);
    for pipeline in &pipelines {
        let applied = &pipeline.loras[0];
        // 4 projections of 8 attention blocks (2 per transformer) and of 3 CLIP layers.
        assert_eq!((applied.unet_layers, applied.text_encoder_layers), (32, 12), "{}", applied.summary());
        assert!(applied.unused_keys.is_empty(), "{}", applied.summary());
        assert_eq!(applied.key_count, if applied.spec.name == "kohya_a" { 132 } else { 88 });
    }
    assert!(pipelines[1].loras[0].summary().starts_with("LoRA kohya_a (kohya, weight 1): fused 44 layers (UNet 32, text encoder 12) from 132 keys"));
}

/// A LoRA trained by `diffuse train --lora-rank` and written in both of its formats
/// (tools/fixtures/lora_trained.py): diffusers' `load_lora_weights` takes every layer of either
/// file and makes this image.
#[test]
fn a_lora_trained_by_diffuse_matches_diffusers() {
    for pipeline in run_case("trained") {
        let applied = &pipeline.loras[0];
        assert_eq!((applied.unet_layers, applied.text_encoder_layers), (32, 12), "{}", applied.summary());
        assert!(applied.unused_keys.is_empty(), "{}", applied.summary());
    }
}

#[test]
fn weight_scales_the_lora() {
    run_case("a_scaled");
}

/// AUTOMATIC1111's `<lora:name:te:unet>` and diffusers' per-component `set_adapters` weights.
#[test]
fn separate_unet_and_text_encoder_weights() {
    run_case("a_split");
}

/// 1x1-conv proj_in/proj_out, 3x3 resnet convolutions and time_emb_proj, rank 2, no alpha
/// (scale 1); the kohya file names them by LDM block (`input_blocks_1_0_in_layers_2`).
#[test]
fn conv_lora_with_ldm_block_names_and_no_alpha() {
    let pipelines = run_case("b");
    for pipeline in &pipelines {
        // conv1, conv2 and time_emb_proj of 8 resnets; proj_in and proj_out of 4 transformers.
        assert_eq!((pipeline.loras[0].unet_layers, pipeline.loras[0].text_encoder_layers), (32, 0));
    }
}

#[test]
fn two_loras_stack_with_their_weights() {
    run_case("stack");
    // The same LoRAs from other formats.
    let (meta, expected) = case("stack");
    let loras = [LoraSpec::new(lora("kohya_a"), 0.8), LoraSpec::new(lora("kohya_b_ldm"), -0.5)];
    let mut pipeline = load(&meta, &loras);
    check(&generate(&mut pipeline, &meta, PromptSyntax::Diffusers, None), &expected, "stack from kohya files");
}

/// A single-file checkpoint (CLIP under `text_model.`, weights renamed from LDM on the fly).
#[test]
fn lora_on_a_single_file_checkpoint() {
    let pipelines = run_case("single_file");
    assert_eq!((pipelines[0].loras[0].unet_layers, pipelines[0].loras[0].text_encoder_layers), (32, 8));
}

/// `<lora:kohya_a:1.5:0.5>` in an AUTOMATIC1111 prompt: the tag is cut out before the
/// tokenizer, and its weights are the text encoder's and the UNet's.
#[test]
fn a1111_prompt_tags_are_not_encoded() {
    let (meta, expected) = case("a_split");
    let prompt = format!("{}<lora:kohya_a:1.5:0.5>", meta["prompt"].as_str().unwrap());
    let (text, tags) = diffuse::prompts::extra_networks::parse_prompt(&prompt);
    assert_eq!(text, meta["prompt"].as_str().unwrap());
    let spec = LoraSpec::from_tag(&tags[0], Some(&lora_dir())).unwrap();
    assert_eq!((spec.name.as_str(), spec.text_encoder_weight, spec.unet_weight), ("kohya_a", 1.5, 0.5));
    let mut pipeline = load(&meta, &[spec]);
    let images = generate(&mut pipeline, &meta, PromptSyntax::A1111, Some(&prompt));
    check(&images, &expected, "a1111 tag");
}

#[test]
fn lora_hash_is_automatic1111s() {
    // hashlib.sha256(file[8 + header length:]).hexdigest()[:12], kohya's addnet hash.
    assert_eq!(lora_hash(&lora("peft_a")).unwrap(), "f0294f38d3c0");
    assert_eq!(lora_hash(&lora("kohya_a")).unwrap(), "77a1cd10da3b");
}

// ---------------------------------------------------------------------------------------------
// Bad input.

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("diffuse-lora-{name}"));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write(dir: &Path, name: &str, tensors: &[(&str, Tensor)]) -> PathBuf {
    let path = dir.join(format!("{name}.safetensors"));
    let map: HashMap<String, Tensor> = tensors.iter().map(|(k, t)| (k.to_string(), t.clone())).collect();
    candle_core::safetensors::save(&map, &path).unwrap();
    path
}

fn randn(shape: &[usize]) -> Tensor {
    Tensor::randn(0f32, 0.1, shape, &Device::Cpu).unwrap()
}

fn load_error(loras: &[LoraSpec]) -> String {
    match StableDiffusionPipeline::load_with_loras(&sd1(), None, &[], None, loras, &Device::Cpu, DType::F32) {
        Ok(_) => panic!("loading with {loras:?} succeeded"),
        Err(e) => e.to_string(),
    }
}

fn file_error(path: &Path) -> String {
    match LoraFile::open(path) {
        Ok(_) => panic!("{} was accepted", path.display()),
        Err(e) => e.to_string(),
    }
}

fn assert_contains(message: &str, needles: &[&str]) {
    for needle in needles {
        assert!(message.contains(needle), "`{needle}` not in: {message}");
    }
}

const TO_K: &str = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k";
const TO_Q: &str = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q";

#[test]
fn a_lora_for_another_architecture_says_how_much_matched() {
    let dir = scratch("architecture");
    // Cross-attention from 24-wide text embeddings; the model's are 16 wide. to_q fits.
    let wider = write(
        &dir,
        "wider",
        &[
            (&format!("{TO_K}.lora_down.weight"), randn(&[2, 24])),
            (&format!("{TO_K}.lora_up.weight"), randn(&[32, 2])),
            (&format!("{TO_Q}.lora_down.weight"), randn(&[2, 32])),
            (&format!("{TO_Q}.lora_up.weight"), randn(&[32, 2])),
        ],
    );
    let message = load_error(&[LoraSpec::new(&wider, 1.0)]);
    assert_contains(&message, &["wider.safetensors", "1 of its 2 LoRA layers", "another shape", "[32, 24]", "[32, 16]", "1 layers fit", "another architecture"]);

    // SDXL-like names: a second transformer block and a second text encoder.
    let sdxl = write(
        &dir,
        "sdxl",
        &[
            ("lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q.lora_down.weight", randn(&[2, 64])),
            ("lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q.lora_up.weight", randn(&[64, 2])),
            ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn1_to_q.lora_down.weight", randn(&[2, 64])),
            ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn1_to_q.lora_up.weight", randn(&[64, 2])),
            ("lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight", randn(&[2, 16])),
            ("lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight", randn(&[16, 2])),
        ],
    );
    let message = load_error(&[LoraSpec::new(&sdxl, 1.0)]);
    assert_contains(&message, &["sdxl.safetensors", "none of its 3 LoRA layers matches", "another architecture", "SDXL's second text encoder"]);

    // Nothing is applied half-way: a good LoRA beside a bad one fails the whole load.
    let message = load_error(&[LoraSpec::new(lora("peft_a"), 1.0), LoraSpec::new(&sdxl, 1.0)]);
    assert_contains(&message, &["sdxl.safetensors"]);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn partly_matching_lora_reports_unused_keys() {
    let dir = scratch("partly");
    let path = write(
        &dir,
        "partly",
        &[
            (&format!("{TO_Q}.lora_down.weight"), randn(&[2, 32])),
            (&format!("{TO_Q}.lora_up.weight"), randn(&[32, 2])),
            (&format!("{TO_Q}.alpha"), Tensor::new(1f32, &Device::Cpu).unwrap()),
            ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_7_attn1_to_q.lora_down.weight", randn(&[2, 32])),
            ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_7_attn1_to_q.lora_up.weight", randn(&[32, 2])),
            (&format!("{TO_Q}.dora_scale"), randn(&[32, 1])),
        ],
    );
    let pipeline = StableDiffusionPipeline::load_with_loras(&sd1(), None, &[], None, &[LoraSpec::new(&path, 0.5)], &Device::Cpu, DType::F32).unwrap();
    let applied = &pipeline.loras[0];
    assert_eq!((applied.unet_layers, applied.text_encoder_layers, applied.unused_keys.len()), (1, 0, 3));
    assert_contains(&applied.summary(), &["weight 0.5", "fused 1 layers", "3 keys unused", "1 layers match no layer", "transformer_blocks_7", "DoRA"]);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_lora_files_are_refused_with_the_key() {
    let dir = scratch("bad");
    let rank = write(&dir, "rank", &[(&format!("{TO_Q}.lora_down.weight"), randn(&[4, 32])), (&format!("{TO_Q}.lora_up.weight"), randn(&[32, 2]))]);
    assert_contains(&file_error(&rank), &["rank mismatch", "has rank 4 (shape [4, 32])", "has rank 2 (shape [32, 2])"]);

    let nan = Tensor::new(f32::NAN, &Device::Cpu).unwrap();
    let alpha = write(
        &dir,
        "alpha",
        &[(&format!("{TO_Q}.lora_down.weight"), randn(&[2, 32])), (&format!("{TO_Q}.lora_up.weight"), randn(&[32, 2])), (&format!("{TO_Q}.alpha"), nan)],
    );
    assert_contains(&file_error(&alpha), &[&format!("`{TO_Q}.alpha` is NaN, not a finite number")]);

    let lonely = write(&dir, "lonely", &[(&format!("{TO_Q}.lora_down.weight"), randn(&[2, 32]))]);
    assert_contains(&file_error(&lonely), &["has no up matrix"]);

    let infinite = (randn(&[32, 2]) / 0.0).unwrap();
    let inf = write(&dir, "inf", &[(&format!("{TO_Q}.lora_down.weight"), randn(&[2, 32])), (&format!("{TO_Q}.lora_up.weight"), infinite)]);
    assert_contains(&file_error(&inf), &["NaN or infinite"]);

    let loha = write(&dir, "loha", &[(&format!("{TO_Q}.hada_w1_a"), randn(&[2, 32])), (&format!("{TO_Q}.hada_w1_b"), randn(&[2, 32]))]);
    assert_contains(&file_error(&loha), &["no LoRA layer diffuse can apply", "2 keys are LyCORIS"]);

    let bytes = std::fs::read(lora("peft_a")).unwrap();
    let truncated = dir.join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    assert_contains(&file_error(&truncated), &["truncated.safetensors", "not a valid safetensors file"]);

    let pickle = dir.join("pickle.pt");
    std::fs::write(&pickle, b"PK\x03\x04 a torch.save archive").unwrap();
    assert_contains(&file_error(&pickle), &["pickle", "never loads"]);

    assert_contains(&file_error(&dir.join("missing.safetensors")), &["missing.safetensors"]);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn lora_arguments() {
    let spec = LoraSpec::parse("style.safetensors:0.75").unwrap();
    assert_eq!((spec.path.to_str().unwrap(), spec.name.as_str(), spec.unet_weight, spec.text_encoder_weight), ("style.safetensors", "style", 0.75, 0.75));
    assert_eq!(LoraSpec::parse("style.safetensors").unwrap().unet_weight, 1.0);
    assert_eq!(LoraSpec::parse("style.safetensors:-1").unwrap().unet_weight, -1.0);
    assert_contains(&LoraSpec::parse("style.safetensors:strong").unwrap_err().to_string(), &["the weight `strong` is not a number"]);
    assert_contains(&LoraSpec::parse("style.safetensors:inf").unwrap_err().to_string(), &["not a finite number"]);

    let (_, tags) = diffuse::prompts::extra_networks::parse_prompt("<lora:kohya_a:x> <lora:nowhere> <lora:kohya_a:1:dyn=4> <lora:kohya_a:te=0.3>");
    assert_contains(&LoraSpec::from_tag(&tags[0], Some(&lora_dir())).unwrap_err().to_string(), &["<lora:kohya_a:x>", "`x` is not a number"]);
    assert_contains(&LoraSpec::from_tag(&tags[1], Some(&lora_dir())).unwrap_err().to_string(), &["nowhere.safetensors does not exist"]);
    assert_contains(&LoraSpec::from_tag(&tags[1], None).unwrap_err().to_string(), &["`lora_dir`"]);
    assert_contains(&LoraSpec::from_tag(&tags[2], Some(&lora_dir())).unwrap_err().to_string(), &["dyn_dim"]);
    let named = LoraSpec::from_tag(&tags[3], Some(&lora_dir())).unwrap();
    assert_eq!((named.text_encoder_weight, named.unet_weight), (0.3, 0.3));
}
