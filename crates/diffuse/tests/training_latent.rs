//! Training in latent space: the autoencoder kind (the loss falls, the export loads with its
//! scaling factor) and the text-to-image kind in that autoencoder's latents (captions from
//! class names, the loss falls, resume is exact, the export is a StableDiffusionPipeline
//! folder that loads and generates).

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use diffuse::pipelines::stable_diffusion::{PhaseTimes, StableDiffusionPipeline, TextToImageOptions};
use diffuse::rng::TorchGenerator;
use diffuse::schedulers::PredictionType;
use diffuse::training::autoencoder::{resolve_vae_config, AutoencoderTask, AutoencoderTrainingConfig, ReconstructionLoss};
use diffuse::training::data::{DataLoader, Dataset, Example, ImageFit, ImageSpec, RawImage};
use diffuse::training::ema::EmaConfig;
use diffuse::training::optimizer::{AdamWConfig, LrSchedule};
use diffuse::training::pixel::{NoiseSchedule, TimestepSampling};
use diffuse::training::text_to_image::{
    resolve_text_encoder_config, resolve_unet_config, ClassPrompts, FrozenVae, TextSampleSettings, TextToImageTask,
    TextToImageTrainingConfig, DEFAULT_TEMPLATES,
};
use diffuse::training::{train, Hooks, TrainConfig, TrainSummary, TrainingTask};

const SIZE: usize = 8;

/// Three classes of 8×8 gray images: horizontal stripes, vertical stripes, a centred square,
/// each with a random brightness.
struct Shapes {
    len: usize,
}

impl Dataset for Shapes {
    fn len(&self) -> usize {
        self.len
    }
    fn get(&mut self, index: usize) -> diffuse::Result<Example> {
        let class = index % 3;
        let level = 128 + ((index * 37) % 128) as u8;
        let pixels = (0..SIZE * SIZE)
            .map(|i| {
                let (y, x) = (i / SIZE, i % SIZE);
                let on = match class {
                    0 => y % 2 == 0,
                    1 => x % 2 == 0,
                    _ => (2..6).contains(&y) && (2..6).contains(&x),
                };
                if on { level } else { 0 }
            })
            .collect();
        Ok(Example { image: RawImage { width: SIZE, height: SIZE, channels: 1, pixels }, label: Some(class), caption: None, name: format!("shape {index}") })
    }
    fn num_classes(&self) -> Option<usize> {
        Some(3)
    }
    fn describe(&self) -> String {
        format!("{} shapes", self.len)
    }
}

fn loader(channels: usize) -> DataLoader {
    let spec = ImageSpec { channels, height: SIZE, width: SIZE, fit: ImageFit::Exact };
    DataLoader::new(Box::new(Shapes { len: 48 }), spec, 3, false).unwrap()
}

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("diffuse-training-latent-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn train_config(output_dir: &Path, steps: usize, learning_rate: f64) -> TrainConfig {
    TrainConfig {
        output_dir: output_dir.to_path_buf(),
        steps,
        batch_size: 8,
        grad_accum: 1,
        learning_rate,
        warmup_steps: 2,
        lr_schedule: LrSchedule::Constant,
        adamw: AdamWConfig::default(),
        grad_clip: Some(1.0),
        ema: Some(EmaConfig { decay: 0.9, ..EmaConfig::default() }),
        checkpoint_every: 0,
        keep_checkpoints: 2,
        sample_every: None,
        sample_at_start: false,
        seed: 1,
        resume: false,
        mixed_precision: diffuse::ops::Precision::F32,
        gradient_checkpointing: false,
    }
}

fn run(task: &mut dyn TrainingTask, loader: &mut DataLoader, config: &TrainConfig, stop_after: Option<usize>) -> TrainSummary {
    let mut hooks = Hooks {
        on_progress: Box::new(move |p| if Some(p.step) == stop_after { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }),
        ..Hooks::default()
    };
    train(task, loader, config, &mut hooks).unwrap()
}

fn mean(values: &[(u64, f32)]) -> f32 {
    values.iter().map(|(_, l)| l).sum::<f32>() / values.len() as f32
}

/// Trains the tiny autoencoder (3 channels, 8×8 → 4×4×4) into `dir`.
fn train_autoencoder(dir: &Path) -> TrainSummary {
    let (vae_json, vae) = resolve_vae_config("vae-tiny", 3, SIZE).unwrap();
    let config = AutoencoderTrainingConfig { vae_json, vae, reconstruction: ReconstructionLoss::L1, kl_weight: 1e-4, export_dtype: DType::F32 };
    let mut data = loader(3);
    let reference = data.next_batch(4, &Device::Cpu).unwrap().images;
    let mut data = loader(3);
    let mut task = AutoencoderTask::new(config, reference, 0, &Device::Cpu).unwrap();
    run(&mut task, &mut data, &TrainConfig { sample_every: Some(30), ..train_config(dir, 30, 3e-3) }, None)
}

#[test]
fn the_autoencoder_learns_and_exports_its_scaling_factor() {
    let dir = scratch("vae");
    let summary = train_autoencoder(&dir);
    let (first, last) = (mean(&summary.losses[..5]), mean(&summary.losses[25..]));
    assert!(last < 0.7 * first, "loss {first} -> {last}");
    assert!(image::open(dir.join("samples/step-0000030.png")).unwrap().width() >= 4 * SIZE as u32);
    let vae = FrozenVae::open(&dir).unwrap();
    assert_eq!((vae.config.in_channels, vae.config.latent_channels, vae.scale_factor()), (3, 4, 2));
    let scaling_factor = vae.json["scaling_factor"].as_f64().unwrap();
    assert!(scaling_factor.is_finite() && scaling_factor > 0.0 && scaling_factor != 0.18215, "{scaling_factor}");
    // A pipeline folder's vae/ is found too.
    std::fs::create_dir_all(dir.join("pipeline/vae")).unwrap();
    for file in ["config.json", "diffusion_pytorch_model.safetensors"] {
        std::fs::copy(dir.join(file), dir.join("pipeline/vae").join(file)).unwrap();
    }
    assert_eq!(FrozenVae::open(&dir.join("pipeline")).unwrap().config, vae.config);
    let _ = std::fs::remove_dir_all(&dir);
}

fn text_to_image_config(vae_dir: &Path) -> TextToImageTrainingConfig {
    let vae = FrozenVae::open(vae_dir).unwrap();
    let text_encoder = resolve_text_encoder_config("clip-tiny").unwrap();
    let (unet_json, unet) = resolve_unet_config("unet-tiny", &vae, SIZE, text_encoder.config().hidden_size).unwrap();
    let names: Vec<String> = ["horizontal stripes|stripes", "vertical stripes", "square|box"].iter().map(|s| s.to_string()).collect();
    let class_prompts = ClassPrompts::new(&names, DEFAULT_TEMPLATES.iter().map(|t| t.to_string()).collect()).unwrap();
    TextToImageTrainingConfig {
        unet_json,
        unet,
        text_encoder,
        text_encoder_2: None,
        vae,
        noise: NoiseSchedule { num_train_timesteps: 1000, beta_schedule: "scaled_linear".into(), beta_start: 0.00085, beta_end: 0.012 },
        prediction_type: PredictionType::Epsilon,
        // Loss-aware sampling: its history goes into checkpoints, which resuming must restore.
        timestep_sampling: TimestepSampling::LossAware,
        snr_gamma: None,
        caption_dropout: 0.2,
        sampling: TextSampleSettings { prompts: class_prompts.main_prompts(), count: 2, steps: 2, guidance_scale: 3.0, scheduler: "ddim".into(), seed: 0 },
        class_prompts: Some(class_prompts),
        export_dtype: DType::F32,
        base: None,
        lora: None,
    }
}

#[test]
fn text_to_image_learns_resumes_exactly_and_exports_a_pipeline() {
    let dir = scratch("t2i");
    train_autoencoder(&dir.join("vae"));
    let config = text_to_image_config(&dir.join("vae"));
    assert_eq!(config.sampling.prompts, ["a photo of a horizontal stripes", "a photo of a vertical stripes", "a photo of a square"]);

    // The loss falls over 40 steps.
    let whole = dir.join("whole");
    let mut task = TextToImageTask::new(config.clone(), 0, &Device::Cpu).unwrap();
    let settings = TrainConfig { checkpoint_every: 4, sample_every: Some(40), ..train_config(&whole, 40, 2e-3) };
    let summary = run(&mut task, &mut loader(3), &settings, None);
    let (first, last) = (mean(&summary.losses[..5]), mean(&summary.losses[30..]));
    assert!(last < 0.8 * first, "loss {first} -> {last}");
    assert!(image::open(whole.join("samples/step-0000040.png")).is_ok());

    // Stopped after step 7 (its last checkpoint at 4) and resumed: the same losses and weights.
    let parts = dir.join("parts");
    let settings = TrainConfig { output_dir: parts.clone(), ..settings };
    let mut task = TextToImageTask::new(config.clone(), 0, &Device::Cpu).unwrap();
    let stopped = run(&mut task, &mut loader(3), &settings, Some(7));
    assert!(stopped.stopped);
    let mut task = TextToImageTask::new(config.clone(), 0, &Device::Cpu).unwrap();
    let resumed = run(&mut task, &mut loader(3), &TrainConfig { resume: true, ..settings }, None);
    assert_eq!(resumed.losses, summary.losses[4..]);
    for file in ["loss.csv", "unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors", "model_index.json"] {
        assert_eq!(std::fs::read(whole.join(file)).unwrap(), std::fs::read(parts.join(file)).unwrap(), "{file}");
    }

    // The export is a StableDiffusionPipeline folder: it loads (tokenizer files included) and
    // generates at the trained size by default.
    for file in ["model_index.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json", "tokenizer/merges.txt", "text_encoder/config.json", "vae/config.json"] {
        assert!(whole.join(file).is_file(), "{file}");
    }
    let mut pipeline = StableDiffusionPipeline::load(&whole, None, &[], None, &Device::Cpu, DType::F32).unwrap();
    assert_eq!(pipeline.default_size(), (SIZE, SIZE));
    assert_eq!(pipeline.scheduler.class_name, "PNDMScheduler");
    let options = TextToImageOptions { prompt: "a photo of a square".into(), num_inference_steps: 3, ..TextToImageOptions::default() };
    let images = pipeline.generate(&options, &mut TorchGenerator::new(0), &mut |_, _| {}, &mut |_| {}, &mut PhaseTimes::default()).unwrap();
    assert_eq!(images.dims(), [1, 3, SIZE, SIZE]);
    assert!(images.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().all(|v| v.is_finite()));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn captions_from_class_names() {
    let names: Vec<String> = ["ankle boot|boot", "sneaker"].iter().map(|s| s.to_string()).collect();
    let prompts = ClassPrompts::new(&names, vec!["a photo of {a}".into(), "{}".into()]).unwrap();
    assert_eq!(prompts.caption(0, 0.0, 0.0).unwrap(), "a photo of an ankle boot");
    assert_eq!(prompts.caption(0, 0.99, 0.99).unwrap(), "boot");
    assert_eq!(prompts.caption(1, 0.2, 0.7).unwrap(), "a photo of a sneaker");
    assert_eq!(prompts.main_prompts(), ["a photo of an ankle boot", "a photo of a sneaker"]);
    assert!(prompts.caption(2, 0.0, 0.0).unwrap_err().to_string().contains("label 2"));
    assert!(ClassPrompts::new(&names, vec!["no placeholder".into()]).unwrap_err().to_string().contains("no placeholder"));
    assert!(ClassPrompts::new(&names, vec![]).is_err());
}

#[test]
fn mismatched_configs_are_refused_naming_the_key() {
    let dir = scratch("refuse");
    std::fs::write(dir.join("unet.json"), r#"{"block_out_channels": [32, 64], "in_channels": 3, "norm_num_groups": 8}"#).unwrap();
    train_autoencoder(&dir.join("vae"));
    let vae = FrozenVae::open(&dir.join("vae")).unwrap();
    let error = resolve_unet_config(dir.join("unet.json").to_str().unwrap(), &vae, SIZE, 32).unwrap_err().to_string();
    assert!(error.contains("`in_channels` is 3") && error.contains("latent_channels"), "{error}");
    let error = resolve_unet_config("unet-tiny", &vae, 7, 32).unwrap_err().to_string();
    assert!(error.contains("not a multiple"), "{error}");
    let error = resolve_vae_config("vae-tiny", 3, 7).unwrap_err().to_string();
    assert!(error.contains("multiple of 2"), "{error}");
    let error = resolve_text_encoder_config("clip-huge").unwrap_err().to_string();
    assert!(error.contains("neither a preset"), "{error}");
    let _ = std::fs::remove_dir_all(&dir);
}
