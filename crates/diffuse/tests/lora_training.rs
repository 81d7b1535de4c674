//! LoRA training on the tiny SD 1.x pipeline (fixtures/sd/sd1): adapters injected into the
//! attention projections start as the base model exactly; the unmerged branch computes what
//! the fused LoRA file computes, in both written formats; training changes only the adapters,
//! lowers the loss, resumes exactly and exports files that `diffuse generate --lora` loads.

use std::collections::{BTreeMap, HashMap};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use diffuse::ops::Precision;
use diffuse::loading::config::{parse_config, read_json_object};
use diffuse::loading::weights::{find_weight_files, var_builder};
use diffuse::lora::adapters::{AdapterConfig, Adapters, TEXT_ENCODER_ATTENTION, UNET_ATTENTION, UNET_CROSS_ATTENTION, UNET_RESNETS};
use diffuse::lora::save::{TrainedLora, DIFFUSERS_FILE_NAME};
use diffuse::lora::{LoraFile, LoraSet, LoraSpec, Target};
use diffuse::models::clip_text::{ClipTextConfig, ClipTextModel};
use diffuse::models::unet_2d_condition::{UNet2DConditionModel, UNet2DConditionModelConfig};
use diffuse::pipelines::stable_diffusion::{PhaseTimes, StableDiffusionPipeline, TextToImageOptions};
use diffuse::rng::TorchGenerator;
use diffuse::schedulers::PredictionType;
use diffuse::training::data::{DataLoader, Dataset, Example, ImageFit, ImageSpec, RawImage};
use diffuse::training::optimizer::{AdamWConfig, LrSchedule};
use diffuse::training::pixel::{NoiseSchedule, TimestepSampling};
use diffuse::training::text_to_image::{
    frozen_text_encoder, resolve_unet_config, FrozenVae, LoraTraining, TextSampleSettings, TextToImageTask, TextToImageTrainingConfig,
};
use diffuse::training::{train, Hooks, TrainConfig, TrainSummary, TrainingTask};

const SIZE: usize = 64;

fn sd1() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sd/sd1")
}

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("diffuse-lora-training-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn unet_config() -> UNet2DConditionModelConfig {
    let path = sd1().join("unet/config.json");
    parse_config(&read_json_object(&path).unwrap(), &path).unwrap()
}

fn text_encoder_config() -> ClipTextConfig {
    let path = sd1().join("text_encoder/config.json");
    parse_config(&read_json_object(&path).unwrap(), &path).unwrap()
}

fn weights(folder: &str, stem: &str) -> candle_nn::VarBuilder<'static> {
    var_builder(&find_weight_files(&sd1().join(folder), stem, None).unwrap(), DType::F32, &Device::Cpu).unwrap()
}

fn max_relative_difference(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// The UNet's and text encoder's outputs on fixed inputs.
fn outputs(unet: &UNet2DConditionModel, text_encoder: &ClipTextModel) -> (Tensor, Tensor) {
    let mut generator = TorchGenerator::new(3);
    let sample = generator.randn_tensor(&[2, 4, 8, 8], &Device::Cpu).unwrap();
    let ids = Tensor::new(&[[49406u32, 320, 1125, 539, 320, 2368, 49407], [49406, 2368, 49407, 49407, 49407, 49407, 49407]], &Device::Cpu).unwrap();
    let hidden = text_encoder.forward(&ids).unwrap().last_hidden_state;
    let timestep = Tensor::new(&[500f32, 20.0], &Device::Cpu).unwrap();
    (unet.forward(&sample, &timestep, &hidden).unwrap(), hidden)
}

fn base_models() -> (UNet2DConditionModel, ClipTextModel) {
    (
        UNet2DConditionModel::new(weights("unet", "diffusion_pytorch_model"), &unet_config()).unwrap(),
        ClipTextModel::new(weights("text_encoder", "model"), &text_encoder_config()).unwrap(),
    )
}

fn adapted_models(adapters: &Adapters, unet: &AdapterConfig, te: &AdapterConfig) -> (UNet2DConditionModel, ClipTextModel) {
    let unet_weights = adapters.wrap(Target::Unet, unet, weights("unet", "diffusion_pytorch_model")).unwrap();
    let te_weights = adapters.wrap(Target::TextEncoder, te, weights("text_encoder", "model")).unwrap();
    (UNet2DConditionModel::new(unet_weights, &unet_config()).unwrap(), ClipTextModel::new(te_weights, &text_encoder_config()).unwrap())
}

/// The base models with `files` fused in, as `diffuse generate --lora` builds them.
fn fused_models(files: Vec<LoraFile>) -> (UNet2DConditionModel, ClipTextModel) {
    let set = LoraSet::from_files(files.into_iter().map(|f| (LoraSpec::new(&f.path, 1.0), f)).collect());
    let unet = set.fuse_into(Target::Unet, weights("unet", "diffusion_pytorch_model"), Some(1)).unwrap();
    let te = set.fuse_into(Target::TextEncoder, weights("text_encoder", "model"), None).unwrap();
    let models = (UNet2DConditionModel::new(unet, &unet_config()).unwrap(), ClipTextModel::new(te, &text_encoder_config()).unwrap());
    let applied = set.finish().unwrap();
    assert!(applied.iter().all(|a| a.unused_keys.is_empty()), "{:?}", applied[0].unused_keys);
    models
}

/// A safetensors file's JSON header.
fn header_text(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap();
    let length = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    String::from_utf8(bytes[8..8 + length].to_vec()).unwrap()
}

#[test]
fn adapters_start_as_the_base_and_compute_what_the_saved_files_fuse() {
    let (base_unet, base_te) = base_models();
    let (base_out, base_hidden) = outputs(&base_unet, &base_te);

    let unet_config = AdapterConfig::new(4, 8.0, UNET_ATTENTION);
    let te_config = AdapterConfig::new(4, 8.0, TEXT_ENCODER_ATTENTION);
    let adapters = Adapters::new(0);
    let (unet, te) = adapted_models(&adapters, &unet_config, &te_config);
    // 4 transformer blocks (down, mid, 2 up) × 2 attentions × 4 projections; 3 CLIP layers × 4.
    assert_eq!((adapters.count(Target::Unet), adapters.count(Target::TextEncoder)), (32, 12));
    let layers = adapters.layers();
    assert!(layers.iter().any(|l| l.module == "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k" && l.in_features == 16));
    assert!(layers.iter().any(|l| l.module == "encoder.layers.2.self_attn.out_proj"), "the text encoder's modules are named without text_model.");

    // B starts at zero: the base model (the branch adds exact zeros; the sum's new memory
    // layout can change later matmuls' summation order by an ulp).
    let (out, hidden) = outputs(&unet, &te);
    assert!(max_relative_difference(&out, &base_out) < 5e-6, "{}", max_relative_difference(&out, &base_out));
    assert!(max_relative_difference(&hidden, &base_hidden) < 5e-6);

    // Random B (and A moved): the unmerged branch against the fused file, in both formats.
    let mut generator = TorchGenerator::new(11);
    for (name, var) in adapters.varmap().data().lock().unwrap().iter() {
        let noise = generator.randn_tensor(var.dims(), &Device::Cpu).unwrap();
        let scale = if name.contains("lora_B") { 0.3 } else { 0.05 };
        var.set(&(var.as_tensor() + (noise * scale).unwrap()).unwrap()).unwrap();
    }
    let (out, hidden) = outputs(&unet, &te);
    assert!(max_relative_difference(&out, &base_out) > 0.05, "the adapters change the output");

    let tensors: HashMap<String, Tensor> =
        adapters.varmap().data().lock().unwrap().iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
    let configs = BTreeMap::from([(Target::Unet, unet_config.clone()), (Target::TextEncoder, te_config.clone())]);
    let trained = TrainedLora::from_tensors(&layers, configs, &tensors).unwrap();
    let dir = scratch("formats");
    trained.write_diffusers(&dir.join(DIFFUSERS_FILE_NAME), DType::F32).unwrap();
    trained.write_kohya(&dir.join("kohya.safetensors"), DType::F32).unwrap();
    for file in [DIFFUSERS_FILE_NAME, "kohya.safetensors"] {
        let lora = LoraFile::open(dir.join(file)).unwrap();
        assert_eq!(lora.layers.len(), 44, "{file}");
        assert!(lora.layers.iter().all(|l| l.rank == 4 && (l.scale - 2.0).abs() < 1e-12), "{file}: alpha/r = 2");
        let (fused_unet, fused_te) = fused_models(vec![lora]);
        let (fused_out, fused_hidden) = outputs(&fused_unet, &fused_te);
        // f32: the branch and the merged weight round differently, by ~1e-7 of the scale.
        let (d_out, d_hidden) = (max_relative_difference(&out, &fused_out), max_relative_difference(&hidden, &fused_hidden));
        assert!(d_out < 1e-5 && d_hidden < 1e-5, "{file}: unmerged vs fused {d_out} {d_hidden}");
    }
    let text = header_text(&dir.join(DIFFUSERS_FILE_NAME));
    assert!(text.contains("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"));
    assert!(text.contains("lora_adapter_metadata") && text.contains("unet.lora_alpha") && text.contains("text_encoder.target_modules"));
    let kohya = header_text(&dir.join("kohya.safetensors"));
    assert!(kohya.contains("lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"), "kohya writes the hub's CLIP names");
    assert!(kohya.contains("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_v.alpha"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn targets_match_as_peft_matches_them() {
    let cross = AdapterConfig::new(2, 2.0, UNET_CROSS_ATTENTION);
    assert!(cross.targets("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"));
    assert!(!cross.targets("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"));
    let plain = AdapterConfig::new(2, 2.0, &["to_k"]);
    assert!(plain.targets("to_k") && plain.targets("a.to_k") && !plain.targets("a.xto_k") && !plain.targets("a.to_k.b"));

    // Only the cross-attention: 4 blocks × 4 projections.
    let adapters = Adapters::new(0);
    let unet = adapters.wrap(Target::Unet, &cross, weights("unet", "diffusion_pytorch_model")).unwrap();
    UNet2DConditionModel::new(unet, &unet_config()).unwrap();
    assert_eq!(adapters.count(Target::Unet), 16);
    assert!(adapters.layers().iter().all(|l| l.module.contains(".attn2.")));
    // Convolutions (3×3 conv1/conv2 and the 1×1 proj_in/proj_out) and other linear layers:
    // 8 resnets' conv1, conv2 and time_emb_proj, 4 transformers' proj_in and proj_out.
    let adapters = Adapters::new(0);
    let convs = AdapterConfig::new(2, 4.0, &[UNET_RESNETS, &["proj_in", "proj_out"]].concat());
    let unet = adapters.wrap(Target::Unet, &convs, weights("unet", "diffusion_pytorch_model")).unwrap();
    let unet = UNet2DConditionModel::new(unet, &unet_config()).unwrap();
    assert_eq!(adapters.count(Target::Unet), 32);
    let te = ClipTextModel::new(weights("text_encoder", "model"), &text_encoder_config()).unwrap();
    let (base_out, _) = outputs(&base_models().0, &te);
    let mut generator = TorchGenerator::new(5);
    for (_, var) in adapters.varmap().data().lock().unwrap().iter() {
        let noise = generator.randn_tensor(var.dims(), &Device::Cpu).unwrap();
        var.set(&(var.as_tensor() + (noise * 0.2).unwrap()).unwrap()).unwrap();
    }
    let (out, _) = outputs(&unet, &te);
    assert!(max_relative_difference(&out, &base_out) > 0.05);
    let tensors: HashMap<String, Tensor> =
        adapters.varmap().data().lock().unwrap().iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
    let trained = TrainedLora::from_tensors(&adapters.layers(), BTreeMap::from([(Target::Unet, convs)]), &tensors).unwrap();
    let kohya = Path::new(env!("CARGO_TARGET_TMPDIR")).join("diffuse-lora-training-conv.safetensors");
    trained.write_kohya(&kohya, DType::F32).unwrap();
    let (fused, _) = fused_models(vec![LoraFile::open(&kohya).unwrap()]);
    let difference = max_relative_difference(&outputs(&fused, &te).0, &out);
    assert!(difference < 1e-5, "unmerged vs fused convolutions: {difference}");
    let _ = std::fs::remove_file(&kohya);

    // A rank of 0 or a bad alpha is refused.
    assert!(Adapters::new(0).wrap(Target::Unet, &AdapterConfig::new(0, 1.0, UNET_ATTENTION), weights("unet", "diffusion_pytorch_model")).is_err());
    let error = AdapterConfig::new(4, f64::NAN, UNET_ATTENTION).validate().unwrap_err().to_string();
    assert!(error.contains("`alpha`"), "{error}");
}

/// 64×64 RGB images of two kinds with captions: a bright square on the left or on the right.
struct Squares;

impl Dataset for Squares {
    fn len(&self) -> usize {
        16
    }
    fn get(&mut self, index: usize) -> diffuse::Result<Example> {
        let left = index % 2 == 0;
        let level = 160 + ((index * 29) % 96) as u8;
        let pixels = (0..SIZE * SIZE * 3)
            .map(|i| {
                let (y, x) = (i / 3 / SIZE, i / 3 % SIZE);
                let x0 = if left { 8 } else { 36 };
                if (20..44).contains(&y) && (x0..x0 + 20).contains(&x) { level } else { 10 }
            })
            .collect();
        let caption = if left { "a square on the left" } else { "a square on the right" };
        Ok(Example { image: RawImage { width: SIZE, height: SIZE, channels: 3, pixels }, label: None, caption: Some(caption.into()), name: format!("square {index}") })
    }
    fn num_classes(&self) -> Option<usize> {
        None
    }
    fn describe(&self) -> String {
        "squares".into()
    }
}

fn loader() -> DataLoader {
    DataLoader::new(Box::new(Squares), ImageSpec { channels: 3, height: SIZE, width: SIZE, fit: ImageFit::Exact }, 5, false).unwrap()
}

fn lora_config(text_encoder: bool) -> TextToImageTrainingConfig {
    let vae = FrozenVae::open(&sd1().join("vae")).unwrap();
    let (unet_json, unet) = resolve_unet_config(sd1().join("unet/config.json").to_str().unwrap(), &vae, SIZE, 16).unwrap();
    TextToImageTrainingConfig {
        unet_json,
        unet,
        text_encoder: frozen_text_encoder(&sd1().join("text_encoder")).unwrap(),
        text_encoder_2: None,
        vae,
        noise: NoiseSchedule { num_train_timesteps: 1000, beta_schedule: "scaled_linear".into(), beta_start: 0.00085, beta_end: 0.012 },
        prediction_type: PredictionType::Epsilon,
        timestep_sampling: TimestepSampling::Uniform,
        snr_gamma: None,
        caption_dropout: 0.1,
        class_prompts: None,
        sampling: TextSampleSettings { prompts: vec!["a square on the left".into()], count: 2, steps: 2, guidance_scale: 3.0, scheduler: "ddim".into(), seed: 0 },
        export_dtype: DType::F32,
        base: Some(sd1()),
        lora: Some(LoraTraining {
            unet: AdapterConfig::new(4, 4.0, UNET_ATTENTION),
            text_encoder: text_encoder.then(|| AdapterConfig::new(4, 4.0, TEXT_ENCODER_ATTENTION)),
            kohya_file_name: "squares.safetensors".into(),
            dropout: 0.0,
        }),
    }
}

fn train_config(output_dir: &Path, steps: usize) -> TrainConfig {
    TrainConfig {
        output_dir: output_dir.to_path_buf(),
        steps,
        batch_size: 4,
        grad_accum: 1,
        learning_rate: 1e-2,
        warmup_steps: 2,
        lr_schedule: LrSchedule::Constant,
        adamw: AdamWConfig::default(),
        grad_clip: Some(1.0),
        ema: None,
        checkpoint_every: 4,
        keep_checkpoints: 2,
        sample_every: Some(100),
        sample_at_start: true,
        seed: 1,
        resume: false,
        mixed_precision: Precision::F32,
        gradient_checkpointing: false,
    }
}

fn run(task: &mut dyn TrainingTask, config: &TrainConfig, stop_after: Option<usize>) -> TrainSummary {
    let mut hooks = Hooks {
        on_progress: Box::new(move |p| if Some(p.step) == stop_after { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }),
        ..Hooks::default()
    };
    train(task, &mut loader(), config, &mut hooks).unwrap()
}

fn mean(values: &[(u64, f32)]) -> f32 {
    values.iter().map(|(_, l)| l).sum::<f32>() / values.len() as f32
}

#[test]
fn lora_training_learns_resumes_exactly_and_exports_both_formats() {
    let dir = scratch("train");
    let whole = dir.join("whole");
    let mut task = TextToImageTask::new(lora_config(true), 0, &Device::Cpu).unwrap();
    // Only the adapters are trained: rank × (in + out) per adapted layer.
    let names = task.parameters().names().to_vec();
    assert!(names.iter().all(|n| n.ends_with(".lora_A.weight") || n.ends_with(".lora_B.weight")), "{names:?}");
    assert_eq!(names.len(), 2 * (32 + 12));
    let base_before = std::fs::read(sd1().join("unet/diffusion_pytorch_model.safetensors")).unwrap();

    let summary = run(&mut task, &train_config(&whole, 24), None);
    let (first, last) = (mean(&summary.losses[..6]), mean(&summary.losses[18..]));
    assert!(last < 0.9 * first, "loss {first} -> {last}");
    assert_eq!(std::fs::read(sd1().join("unet/diffusion_pytorch_model.safetensors")).unwrap(), base_before);
    assert!(whole.join("samples/step-0000000.png").is_file(), "the base model's samples come first");
    assert!(whole.join("samples/step-0000024.png").is_file());
    assert!(!whole.join("unet").exists(), "a LoRA run exports the LoRA, not a pipeline");

    // Stopped after step 6 (its last checkpoint at 4) and resumed: the same losses and files.
    let parts = dir.join("parts");
    let mut task = TextToImageTask::new(lora_config(true), 0, &Device::Cpu).unwrap();
    assert!(run(&mut task, &train_config(&parts, 24), Some(6)).stopped);
    let mut task = TextToImageTask::new(lora_config(true), 0, &Device::Cpu).unwrap();
    let resumed = run(&mut task, &TrainConfig { resume: true, ..train_config(&parts, 24) }, None);
    assert_eq!(resumed.losses, summary.losses[4..]);
    for file in ["loss.csv", DIFFUSERS_FILE_NAME, "squares.safetensors"] {
        assert!(std::fs::read(whole.join(file)).unwrap() == std::fs::read(parts.join(file)).unwrap(), "{file} differs");
    }
    // Resuming with other LoRA settings is refused, naming them.
    let mut other = lora_config(false);
    other.lora.as_mut().unwrap().unet.rank = 2;
    let mut task = TextToImageTask::new(other, 0, &Device::Cpu).unwrap();
    let mut hooks = Hooks::default();
    let error = train(&mut task, &mut loader(), &TrainConfig { resume: true, steps: 30, ..train_config(&parts, 30) }, &mut hooks).unwrap_err().to_string();
    assert!(error.contains("lora_unet") && error.contains("refusing"), "{error}");

    // Both files load into the base pipeline and make the same image, which the LoRA changed.
    let image = |loras: &[LoraSpec]| {
        let mut pipeline = StableDiffusionPipeline::load_with_loras(&sd1(), None, &[], None, loras, &Device::Cpu, DType::F32).unwrap();
        let options = TextToImageOptions { prompt: "a square on the left".into(), num_inference_steps: 4, ..TextToImageOptions::default() };
        pipeline.generate(&options, &mut TorchGenerator::new(0), &mut |_, _| {}, &mut |_| {}, &mut PhaseTimes::default()).unwrap()
    };
    let base = image(&[]);
    let diffusers_format = image(&[LoraSpec::new(whole.join(DIFFUSERS_FILE_NAME), 1.0)]);
    let kohya_format = image(&[LoraSpec::new(whole.join("squares.safetensors"), 1.0)]);
    assert!(max_relative_difference(&diffusers_format, &kohya_format) < 1e-6);
    assert!(max_relative_difference(&diffusers_format, &base) > 1e-3, "the LoRA changes the image");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Gradient checkpointing on a LoRA run (adapters in the UNet's attention and the text
/// encoder, the base frozen: blocks whose inputs track no gradient run as usual): the same
/// run as without it, up to the order in which gradient contributions are summed.
#[test]
fn gradient_checkpointing_gives_the_same_lora_run() {
    let dir = scratch("checkpointing");
    let settings = |name: &str, gradient_checkpointing| TrainConfig { sample_every: None, gradient_checkpointing, ..train_config(&dir.join(name), 4) };
    let plain = run(&mut TextToImageTask::new(lora_config(true), 0, &Device::Cpu).unwrap(), &settings("plain", false), None);
    let checkpointed = run(&mut TextToImageTask::new(lora_config(true), 0, &Device::Cpu).unwrap(), &settings("checkpointed", true), None);
    assert_eq!(plain.losses[0], checkpointed.losses[0]);
    for ((_, a), (_, b)) in plain.losses.iter().zip(&checkpointed.losses) {
        assert!((a - b).abs() <= 1e-5 * a.abs(), "losses {a} and {b}");
    }
    let weights = |name: &str| candle_core::safetensors::load(dir.join(name).join(DIFFUSERS_FILE_NAME), &Device::Cpu).unwrap();
    let values = |t: &Tensor| t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let (first, second) = (weights("plain"), weights("checkpointed"));
    for (name, tensor) in &first {
        for (x, y) in values(tensor).iter().zip(values(&second[name])) {
            assert!((x - y).abs() <= 1e-5, "{name} is {x} and {y}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// peft's lora_dropout: the masks come from the task's generator, so a resumed run is exact
/// with dropout too; the losses differ from a run without it; it is recorded in the file.
#[test]
fn lora_dropout_resumes_exactly() {
    let dir = scratch("dropout");
    let mut config = lora_config(true);
    config.lora.as_mut().unwrap().dropout = 0.25;
    let settings = |name: &str| TrainConfig { sample_every: None, ..train_config(&dir.join(name), 10) };
    let whole = run(&mut TextToImageTask::new(config.clone(), 0, &Device::Cpu).unwrap(), &settings("whole"), None);
    assert!(run(&mut TextToImageTask::new(config.clone(), 0, &Device::Cpu).unwrap(), &settings("parts"), Some(6)).stopped);
    let resumed = run(&mut TextToImageTask::new(config.clone(), 0, &Device::Cpu).unwrap(), &TrainConfig { resume: true, ..settings("parts") }, None);
    assert_eq!(resumed.losses, whole.losses[4..]);
    let plain = run(&mut TextToImageTask::new(lora_config(true), 0, &Device::Cpu).unwrap(), &settings("plain"), None);
    assert_eq!(plain.losses[0], whole.losses[0], "B starts at zero: the first loss is the base model's either way");
    assert_ne!(plain.losses[1..], whole.losses[1..]);
    assert!(header_text(&dir.join("whole").join(DIFFUSERS_FILE_NAME)).contains(r#"\"unet.lora_dropout\": 0.25"#));
    let mut bad = lora_config(false);
    bad.lora.as_mut().unwrap().dropout = 1.0;
    assert!(TextToImageTask::new(bad, 0, &Device::Cpu).err().unwrap().to_string().contains("`dropout`"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn lora_training_refuses_what_it_cannot_do() {
    // Targets that name no layer.
    let mut config = lora_config(false);
    config.lora.as_mut().unwrap().unet.target_modules = vec!["to_nothing".into()];
    let error = TextToImageTask::new(config, 0, &Device::Cpu).err().unwrap().to_string();
    assert!(error.contains("to_nothing") && error.contains("no linear or convolution layer"), "{error}");
    // No base.
    let mut config = lora_config(false);
    config.base = None;
    let error = TextToImageTask::new(config, 0, &Device::Cpu).err().unwrap().to_string();
    assert!(error.contains("base"), "{error}");
}
