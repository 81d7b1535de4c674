//! `diffuse bench`: times the text encoder, one UNet step and one VAE decode, for a named
//! standard config with random weights or for a real model folder; or, with `--train`, one
//! training step (forward, backward, AdamW) of the built-in model's UNet or of a
//! class-conditional pixel-space UNet, in images per second. Prints median, min and max of N
//! runs after one warm-up, and the process's peak resident memory.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use diffuse::ops::checkpoint::GradientCheckpointing;
use diffuse::ops::Precision;
use diffuse::loading::config::{parse_config, read_json_object};
use diffuse::loading::weights::{find_weight_files, var_builder};
use diffuse::models::autoencoder_kl::{AutoencoderKL, AutoencoderKLConfig};
use diffuse::models::clip_text::{ClipTextConfig, ClipTextModel};
use diffuse::models::unet_2d::UNet2DModel;
use diffuse::models::unet_2d_condition::{UNet2DConditionModel, UNet2DConditionModelConfig};
use diffuse::training::export::preset_or_file;
use diffuse::training::optimizer::{AdamW, AdamWConfig};
use diffuse::training::params::Parameters;
use diffuse::training::pixel::{resolve_unet_config, UNetRequest};
use diffuse::training::text_to_image;
use serde_json::{Map, Value};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// A standard config with random weights: sd15, sd21, sdxl (base) or sdxl-refiner.
    #[arg(long, default_value = "sd15", conflicts_with = "model")]
    config: String,
    /// A Stable Diffusion folder to benchmark instead of a standard config.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Image side in pixels (latents are side/8).
    #[arg(long, default_value_t = 512)]
    size: usize,
    /// Batch of the text encoder and UNet (2 = one guided step for one image).
    #[arg(long, default_value_t = 2)]
    batch: usize,
    /// Weight precision: f32, f16 or bf16 (as `diffuse generate --dtype`).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Timed runs per component (after one warm-up).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Which components: all, text, unet, vae.
    #[arg(long, default_value = "all")]
    component: String,
    /// Also print where the time goes, per operation (convolution, linear, attention, norms).
    #[arg(long)]
    profile: bool,
    /// Time training steps instead: `text-to-image` (the built-in model's UNet2DConditionModel,
    /// preset unet-small, on 8×8×4 latents with 77×64 text embeddings) or `pixel` (a
    /// class-conditional UNet2DModel, preset small, on 1×32×32 images with 10 classes). --batch
    /// is the training batch.
    #[arg(long)]
    train: Option<String>,
    /// With --train: write the UNet's diffusers config.json here (the PyTorch side builds the
    /// same model from it).
    #[arg(long)]
    save_config: Option<PathBuf>,
    /// With --train: `no`, or `bf16` for mixed precision as `diffuse train --mixed-precision`.
    #[arg(long, default_value = "no")]
    mixed_precision: String,
    /// With --train: checkpoint the UNet's blocks, as `diffuse train --gradient-checkpointing`.
    #[arg(long)]
    gradient_checkpointing: bool,
    /// Measure the kernels instead: the CPU's peak multiply-add rate for the instruction set
    /// in use, and the GFLOP/s of the matrix product, convolution and attention kernels on SD
    /// 1.5's shapes at 512×512 (best of --runs).
    #[arg(long, conflicts_with = "train")]
    kernels: bool,
}

/// Where a component's config and weights come from.
enum Source {
    Family(&'static diffuse::configs::FamilyConfigs),
    Folder(PathBuf),
}

impl Source {
    fn config(&self, component: &str) -> Result<(Map<String, Value>, PathBuf)> {
        match self {
            Source::Family(family) => {
                let text = match component {
                    "unet" => family.unet,
                    "vae" => family.vae,
                    "text_encoder_2" => family
                        .text_encoder_2
                        .ok_or_else(|| anyhow::anyhow!("{} has no second text encoder", family.name))?,
                    _ => family.text_encoder,
                };
                Ok((diffuse::configs::parse(text), PathBuf::from(format!("{}/{component}/config.json", family.name))))
            }
            Source::Folder(dir) => {
                let path = dir.join(component).join("config.json");
                Ok((read_json_object(&path)?, path))
            }
        }
    }

    /// Random stand-in weights (allocated and touched, so memory is measured as with real
    /// weights) or the folder's real weights, memory-mapped.
    fn weights(&self, component: &str, stem: &str, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        match self {
            Source::Family(_) => Ok(VarBuilder::from_backend(Box::new(RandomWeights), dtype, device.clone())),
            Source::Folder(dir) => Ok(var_builder(&find_weight_files(&dir.join(component), stem, None)?, dtype, device)?),
        }
    }
}

/// Every requested tensor drawn from N(0, 0.02²), like a freshly initialised model.
struct RandomWeights;

impl candle_nn::var_builder::SimpleBackend for RandomWeights {
    fn get(&self, shape: candle_core::Shape, _: &str, _: candle_nn::Init, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        Tensor::randn(0f32, 0.02, shape, device)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights need a shape for {name}")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

fn peak_rss_gb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok()))
        .map(|kb| kb / 1024.0 / 1024.0)
        .unwrap_or(f64::NAN)
}

/// Times `runs` calls after one warm-up; returns the sorted times and the warm-up's.
fn time(runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<(Vec<f64>, f64)> {
    let start = Instant::now();
    f()?;
    let warm_up = start.elapsed().as_secs_f64();
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        f()?;
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok((times, warm_up))
}

fn report(what: &str, (times, warm_up): &(Vec<f64>, f64), profile: bool) {
    let median = times[times.len() / 2];
    outln!(
        "{what}: median {median:.3}s min {:.3}s max {:.3}s (n={}) peak RSS {:.2} GB",
        times[0],
        times[times.len() - 1],
        times.len(),
        peak_rss_gb()
    );
    if profile {
        // The profile covers the warm-up and every timed run: shares of the total are what matter.
        let runs = times.len() as f64 + 1.0;
        let total: f64 = times.iter().sum::<f64>() + warm_up;
        let mut accounted = 0.0;
        for diffuse::ops::profile::Total { name, time, calls, flops } in diffuse::ops::profile::totals() {
            let seconds = time.as_secs_f64();
            accounted += seconds;
            let rate = if flops > 0.0 { format!(", {:.0} GFLOP/s", flops / seconds.max(1e-9) / 1e9) } else { String::new() };
            outln!("  {name:<30} {:>8.3}s per run {:>5.1}%  ({} calls per run{rate})", seconds / runs, 100.0 * seconds / total, calls as f64 / runs);
        }
        outln!("  {:<30} {:>8.3}s per run {:>5.1}%", "other (element-wise, copies)", (total - accounted).max(0.0) / runs, 100.0 * (total - accounted).max(0.0) / total);
        let choices = diffuse::ops::profile::choices();
        if !choices.is_empty() {
            let listed: Vec<String> = choices.iter().map(|(name, calls)| format!("{name} {:.0}", *calls as f64 / runs)).collect();
            outln!("  kernels chosen (calls per run): {}", listed.join(", "));
        }
        diffuse::ops::profile::reset();
    }
}

/// One training step's model: its trainable variables, and its loss on a random batch.
struct TrainingBench {
    parameters: Parameters,
    loss: Box<dyn Fn() -> diffuse::Result<Tensor>>,
    config: Map<String, Value>,
    _varmap: VarMap,
}

fn training_bench(kind: &str, batch: usize, device: &Device) -> Result<TrainingBench> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
    let timesteps = Tensor::from_vec((0..batch).map(|i| ((i * 397) % 1000) as f32).collect::<Vec<_>>(), batch, device)?;
    let (loss, config): (Box<dyn Fn() -> diffuse::Result<Tensor>>, Map<String, Value>) = match kind {
        "text-to-image" => {
            let (mut map, origin) = preset_or_file("unet-small", text_to_image::UNET_PRESETS, "preset")?;
            for (key, value) in [("in_channels", 4), ("out_channels", 4), ("sample_size", 8), ("cross_attention_dim", 64)] {
                map.insert(key.into(), value.into());
            }
            let config: UNet2DConditionModelConfig = parse_config(&map, std::path::Path::new(&origin))?;
            let unet = UNet2DConditionModel::new(vb, &config)?;
            let latents = Tensor::randn(0f32, 1f32, (batch, 4, 8, 8), device)?;
            let noise = Tensor::randn(0f32, 1f32, (batch, 4, 8, 8), device)?;
            let text = Tensor::randn(0f32, 1f32, (batch, 77, 64), device)?;
            (Box::new(move || Ok(unet.forward(&latents, &timesteps, &text)?.sub(&noise)?.sqr()?.mean_all()?)), map)
        }
        "pixel" => {
            let request = UNetRequest { data_channels: 1, data_size: (32, 32), num_classes: Some(10), ..UNetRequest::default() };
            let config = resolve_unet_config("small", &request)?;
            let map = match serde_json::to_value(&config)? {
                Value::Object(map) => map,
                _ => Map::new(),
            };
            let unet = UNet2DModel::new(vb, &config)?;
            let images = Tensor::randn(0f32, 1f32, (batch, 1, 32, 32), device)?;
            let noise = Tensor::randn(0f32, 1f32, (batch, 1, 32, 32), device)?;
            let labels = Tensor::from_vec((0..batch as u32).map(|i| i % 10).collect::<Vec<_>>(), batch, device)?;
            (Box::new(move || Ok(unet.forward(&images, &timesteps, Some(&labels))?.sub(&noise)?.sqr()?.mean_all()?)), map)
        }
        other => bail!("--train {other} is not one of text-to-image, pixel"),
    };
    let parameters = Parameters::from_varmap(&varmap)?;
    parameters.init_torch_default(0)?;
    Ok(TrainingBench { parameters, loss, config, _varmap: varmap })
}

/// Times training steps: the loss, its gradients, and an AdamW update of every parameter (on
/// the host, as `diffuse train` does).
fn run_training(args: &BenchArgs, kind: &str, device: &Device) -> Result<()> {
    let precision = crate::train::parse_mixed_precision(&args.mixed_precision)?;
    let bench = training_bench(kind, args.batch, device)?;
    if let Some(path) = &args.save_config {
        std::fs::write(path, serde_json::to_string_pretty(&Value::Object(bench.config.clone()))?)?;
    }
    let threads = candle_core::utils::get_num_threads();
    outln!(
        "diffuse {} train {kind}: {} parameters, batch {}, {}, threads {threads}",
        env!("CARGO_PKG_VERSION"),
        bench.parameters.num_values(),
        args.batch,
        if precision == Precision::Bf16 { "bf16 mixed" } else { "f32" }
    );
    if args.gradient_checkpointing {
        outln!("gradient checkpointing");
    }
    let mut optimizer = AdamW::new(AdamWConfig::default(), &bench.parameters.sizes());
    let mut values = bench.parameters.values()?;
    let times = time(args.runs, || {
        let checkpointing = args.gradient_checkpointing.then(|| GradientCheckpointing::start(bench.parameters.vars()));
        let mut grads = diffuse::ops::with_training_precision(precision, || (bench.loss)())?.backward()?;
        if let Some(checkpointing) = &checkpointing {
            checkpointing.add_gradients(&mut grads)?;
        }
        let grads = bench
            .parameters
            .vars()
            .iter()
            .map(|var| match grads.get(var.as_tensor()) {
                Some(g) => Ok(g.flatten_all()?.to_vec1::<f32>()?),
                None => Ok(vec![0f32; var.elem_count()]),
            })
            .collect::<Result<Vec<_>>>()?;
        optimizer.update(&mut values, &grads, 1e-4)?;
        bench.parameters.set_values(&values)?;
        Ok(())
    })?;
    let median = times.0[times.0.len() / 2];
    report(&format!("training step, batch {} ({:.1} images/s)", args.batch, args.batch as f64 / median), &times, args.profile);
    Ok(())
}

pub fn run(args: BenchArgs) -> Result<()> {
    let device = crate::device();
    if args.profile {
        diffuse::ops::profile::enable();
    }
    if let Some(kind) = &args.train {
        if args.runs == 0 || args.batch == 0 {
            bail!("--runs and --batch must be at least 1");
        }
        return run_training(&args, kind, &device);
    }
    if args.mixed_precision != "no" || args.gradient_checkpointing {
        bail!("--mixed-precision and --gradient-checkpointing are training options: add --train text-to-image|pixel");
    }
    if args.kernels {
        let threads = candle_core::utils::get_num_threads();
        outln!("diffuse {} kernels {} threads {threads}", env!("CARGO_PKG_VERSION"), diffuse::ops::gemm::isa().name());
        let rates = diffuse::ops::probe::rates(args.runs.max(1));
        for rate in &rates {
            outln!("{:<48} {:>8.1} GFLOP/s {:>5.1}% of its peak", rate.name, rate.gflops, 100.0 * rate.gflops / rate.peak_gflops);
        }
        return Ok(());
    }
    let dtype = diffuse::ops::weight_dtype(crate::generate::parse_dtype(&args.dtype, &device)?, &device);
    let activations = diffuse::ops::activation_dtype(dtype, &device);
    if args.size == 0 || args.size % 8 != 0 || args.runs == 0 || args.batch == 0 {
        bail!("--size must be a positive multiple of 8, and --runs and --batch at least 1");
    }
    let source = match &args.model {
        Some(dir) => Source::Folder(dir.clone()),
        None => Source::Family(diffuse::configs::family(&args.config)?),
    };
    let label = args.model.as_ref().map(|d| d.display().to_string()).unwrap_or_else(|| args.config.clone());
    let threads = candle_core::utils::get_num_threads();
    outln!(
        "diffuse {} {label} {}x{} {} threads {threads} kernels {}",
        env!("CARGO_PKG_VERSION"),
        args.size,
        args.size,
        args.dtype,
        diffuse::ops::gemm::isa().name()
    );
    let wanted = |c: &str| args.component == "all" || args.component == c;
    if !["all", "text", "unet", "vae"].contains(&args.component.as_str()) {
        bail!("--component {} is not one of all, text, unet, vae", args.component);
    }
    let latent = args.size / 8;
    if args.profile {
        diffuse::ops::profile::enable();
    }

    if wanted("text") {
        // SDXL has two encoders (a refiner folder only the second).
        let encoders = match &source {
            Source::Family(family) => {
                if family.text_encoder_2.is_some() { vec!["text_encoder", "text_encoder_2"] } else { vec!["text_encoder"] }
            }
            Source::Folder(dir) => ["text_encoder", "text_encoder_2"].into_iter().filter(|c| dir.join(c).is_dir()).collect(),
        };
        for component in encoders {
            let (map, origin) = source.config(component)?;
            let config: ClipTextConfig = parse_config(&map, &origin)?;
            let model = ClipTextModel::new(source.weights(component, "model", dtype, &device)?, &config)?;
            let ids = Tensor::zeros((args.batch, config.max_position_embeddings), DType::U32, &device)?;
            let times = time(args.runs, || {
                model.forward(&ids)?;
                Ok(())
            })?;
            report(&format!("{}, batch {}", component.replace('_', " "), args.batch), &times, args.profile);
        }
    }
    if wanted("unet") {
        let (map, origin) = source.config("unet")?;
        let config: UNet2DConditionModelConfig = parse_config(&map, &origin)?;
        let model = UNet2DConditionModel::new(source.weights("unet", "diffusion_pytorch_model", dtype, &device)?, &config)?;
        let sample = Tensor::randn(0f32, 1f32, (args.batch, config.in_channels, latent, latent), &device)?.to_dtype(activations)?;
        let text = Tensor::randn(0f32, 1f32, (args.batch, 77, config.cross_attention_dim), &device)?.to_dtype(activations)?;
        let t = Tensor::full(500f32, args.batch, &device)?;
        // SDXL's pooled embedding and time ids: only their total width matters for the time,
        // so two ids and the rest as the text embedding.
        let added = match (config.addition_time_embed_dim, config.projection_class_embeddings_input_dim) {
            (Some(time_dim), Some(input_dim)) if config.takes_text_time() => {
                let text_dim = input_dim.checked_sub(2 * time_dim).filter(|&d| d > 0).ok_or_else(|| {
                    anyhow::anyhow!("projection_class_embeddings_input_dim {input_dim} is too small for addition_time_embed_dim {time_dim}")
                })?;
                Some(diffuse::models::unet_2d_condition::AddedConditions {
                    text_embeds: Tensor::randn(0f32, 1f32, (args.batch, text_dim), &device)?,
                    time_ids: Tensor::full(1024f32, (args.batch, 2), &device)?,
                })
            }
            _ => None,
        };
        let times = time(args.runs, || {
            model.forward_with_added_conditions(&sample, &t, &text, None, added.as_ref())?;
            Ok(())
        })?;
        report(&format!("UNet step, batch {}, latents {latent}x{latent}", args.batch), &times, args.profile);
    }
    if wanted("vae") {
        let (map, origin) = source.config("vae")?;
        let config: AutoencoderKLConfig = parse_config(&map, &origin)?;
        let model = AutoencoderKL::new(source.weights("vae", "diffusion_pytorch_model", dtype, &device)?, &config)?;
        let z = Tensor::randn(0f32, 1f32, (1, config.latent_channels, latent, latent), &device)?.to_dtype(activations)?;
        let times = time(args.runs, || {
            model.decode(&z)?;
            Ok(())
        })?;
        report(&format!("VAE decode, 1 image {}x{}", args.size, args.size), &times, args.profile);
    }
    Ok(())
}
