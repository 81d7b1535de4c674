//! `diffuse`: the command line over the diffuse library.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::{Parser, Subcommand};
use diffuse::loading::config::parse_override;
use diffuse::pipelines::pixel::{PixelOptions, PixelPipeline};
use diffuse::pipelines::{to_uint8_images, write_png, SCHEDULER_NAMES};
use diffuse::rng::TorchGenerator;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

#[derive(Parser)]
#[command(name = "diffuse", version, about = "Diffusion models in Rust: sample DDPM/DDIM and Stable Diffusion checkpoints, matching diffusers")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate images from a diffusers model folder.
    Generate(GenerateArgs),
    /// List the scheduler names that --scheduler accepts.
    Schedulers,
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// A diffusers pipeline folder (model_index.json, unet/, scheduler/).
    #[arg(long)]
    model: PathBuf,
    /// Sampler to use instead of the folder's own (see `diffuse schedulers`).
    #[arg(long)]
    scheduler: Option<String>,
    /// Override a scheduler config key, as KEY=VALUE with VALUE a JSON literal or a bare
    /// string (e.g. timestep_spacing=trailing, rescale_betas_zero_snr=true). Repeatable.
    #[arg(long = "scheduler-config", value_name = "KEY=VALUE")]
    scheduler_config: Vec<String>,
    /// Number of denoising steps.
    #[arg(long, default_value_t = 50)]
    steps: usize,
    /// Random seed (as torch.manual_seed); chosen at random and printed when omitted.
    #[arg(long)]
    seed: Option<u64>,
    /// DDIM's eta: 0 is deterministic, 1 is DDPM-like (other schedulers ignore it).
    #[arg(long, default_value_t = 0.0)]
    eta: f64,
    /// Class to generate, for class-conditional models.
    #[arg(long)]
    class_label: Option<i64>,
    /// Number of images, drawn as one batch from one generator as diffusers draws them.
    /// With more than one, files are named FILE-0.png, FILE-1.png, ...
    #[arg(long, default_value_t = 1)]
    num_images: usize,
    /// Load the `.VARIANT.safetensors` weight files (e.g. fp16).
    #[arg(long)]
    variant: Option<String>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// Output PNG path.
    #[arg(long)]
    output: PathBuf,
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => generate(args),
        Command::Schedulers => {
            for (name, class, _, description) in SCHEDULER_NAMES {
                println!("{name:<16} {description} [{class}]");
            }
            Ok(())
        }
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn output_paths(output: &Path, count: usize) -> Result<Vec<PathBuf>> {
    if output.extension().and_then(|e| e.to_str()).map(|e| e.eq_ignore_ascii_case("png")) != Some(true) {
        bail!("--output {} must end in .png", output.display());
    }
    let parent = output.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !parent.is_dir() {
        bail!("--output {}: the folder {} does not exist", output.display(), parent.display());
    }
    if count == 1 {
        return Ok(vec![output.to_path_buf()]);
    }
    let stem = output.file_stem().unwrap_or_default().to_string_lossy();
    Ok((0..count).map(|i| output.with_file_name(format!("{stem}-{i}.png"))).collect())
}

fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    hasher.finish() & 0xffff_ffff
}

fn progress_bar(total: usize, quiet: bool) -> ProgressBar {
    let bar = ProgressBar::new(total as u64);
    if quiet || !std::io::stderr().is_terminal() {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    } else {
        bar.set_draw_target(ProgressDrawTarget::stderr());
    }
    bar.set_style(
        ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} steps [{elapsed_precise}<{eta_precise}, {per_sec}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message("denoising");
    bar
}

fn generate(args: GenerateArgs) -> Result<()> {
    let paths = output_paths(&args.output, args.num_images)?;
    if args.steps == 0 {
        bail!("--steps must be at least 1");
    }
    let overrides = args
        .scheduler_config
        .iter()
        .map(|s| parse_override(s).with_context(|| "--scheduler-config".to_string()))
        .collect::<Result<Vec<_>>>()?;
    let device = Device::Cpu;
    let mut pipeline = PixelPipeline::load(&args.model, args.scheduler.as_deref(), &overrides, args.variant.as_deref(), &device)?;
    let options = PixelOptions {
        num_inference_steps: args.steps,
        num_images: args.num_images,
        eta: args.eta,
        class_label: args.class_label,
    };
    pipeline.validate(&options)?;
    let seed = args.seed.unwrap_or_else(random_seed);
    if !args.quiet {
        eprintln!("seed: {seed}");
    }
    let mut generator = TorchGenerator::new(seed);
    let bar = progress_bar(args.steps, args.quiet);
    let start = Instant::now();
    let samples = pipeline.generate(&options, &mut generator, &mut |i, n| {
        bar.set_length(n as u64);
        bar.set_position(i as u64);
    })?;
    bar.finish_and_clear();
    let images = to_uint8_images(&samples)?;
    let parameters = format!(
        "Steps: {}, Sampler: {}, Seed: {seed}, Size: {}x{}, Model: {}{}{}",
        args.steps,
        args.scheduler.as_deref().unwrap_or(&pipeline.scheduler.class_name),
        images[0].0,
        images[0].1,
        args.model.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        if args.eta != 0.0 { format!(", Eta: {}", args.eta) } else { String::new() },
        args.class_label.map(|l| format!(", Class label: {l}")).unwrap_or_default(),
    );
    for (path, (width, height, channels, pixels)) in paths.iter().zip(&images) {
        write_png(path, *width, *height, *channels, pixels, &[("parameters", parameters.clone())])?;
        println!("{}", path.display());
    }
    if !args.quiet {
        eprintln!("seed {seed}, {} steps in {:.2}s", args.steps, start.elapsed().as_secs_f64());
    }
    Ok(())
}
