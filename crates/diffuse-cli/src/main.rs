//! `diffuse`: the command line over the diffuse library. Each subcommand lives in its own
//! module; this file only parses and dispatches.

/// `println!` for a command's output. When stdout is closed (`diffuse info FILE | head`) the
/// process ends quietly, as a Unix tool stopped by SIGPIPE does, rather than panicking (Rust
/// ignores SIGPIPE, so `println!` panics on the write error).
macro_rules! outln {
    () => {
        $crate::print_line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::print_line(format_args!($($arg)*))
    };
}

fn print_line(line: std::fmt::Arguments) {
    use std::io::Write;
    let written = {
        let mut stdout = std::io::stdout().lock();
        stdout.write_fmt(line).and_then(|()| stdout.write_all(b"\n"))
    };
    if let Err(e) = written {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: cannot write to stdout: {e}");
        std::process::exit(1);
    }
}

mod bench;
mod evaluate;
mod generate;
mod info;
mod invert;
mod serve;
mod start;
mod train;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use diffuse::pipelines::SCHEDULER_NAMES;

#[derive(Parser)]
#[command(
    name = "diffuse",
    version,
    about = "Diffusion models in Rust: run DDPM/DDIM and Stable Diffusion checkpoints, matching diffusers image for image"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Threads for every kernel, in one pool (default: one per core).
    #[arg(long, global = true, value_parser = parse_threads)]
    threads: Option<usize>,
    /// Where models run: cpu (the project's own kernels), cuda, cuda:N, metal or metal:N (a
    /// build with the `cuda` or `metal` feature; candle's tensor operations).
    #[arg(long, global = true, default_value = "cpu")]
    device: String,
}

/// The device `--device` named (set once, before the subcommand runs).
static DEVICE: std::sync::OnceLock<candle_core::Device> = std::sync::OnceLock::new();

/// A library error whose mentions of the library's own arguments (`` `steps` ``) are replaced
/// by the flags that set them (`--steps`), so that the message names what the user typed.
pub(crate) fn name_flags(error: anyhow::Error, flags: &[(&str, &str)]) -> anyhow::Error {
    let mut message = format!("{error:#}");
    for (name, flag) in flags {
        message = message.replace(name, flag);
    }
    anyhow::anyhow!(message)
}

/// [`name_flags`] for an error that must stay a [`diffuse::Error`] of its kind (`serve` answers
/// an invalid input differently from a failure).
pub(crate) fn name_flags_in(error: diffuse::Error, flags: &[(&str, &str)]) -> diffuse::Error {
    match error {
        diffuse::Error::InvalidInput(message) => {
            diffuse::Error::InvalidInput(flags.iter().fold(message, |message, (name, flag)| message.replace(name, flag)))
        }
        other => other,
    }
}

/// The device every subcommand runs its models on.
pub(crate) fn device() -> candle_core::Device {
    DEVICE.get().cloned().unwrap_or(candle_core::Device::Cpu)
}

fn parse_threads(value: &str) -> Result<usize, String> {
    match value.parse::<usize>() {
        Ok(threads) if threads > 0 => Ok(threads),
        _ => Err(format!("`{value}` is not a whole number of threads of at least 1")),
    }
}

#[derive(Subcommand)]
enum Command {
    /// Generate images: text-to-image, image-to-image (--init-image) and inpainting (--mask)
    /// with a Stable Diffusion model (a diffusers folder, a single checkpoint file, a repo id or
    /// the built-in model; LoRAs with --lora), or unconditional / class-conditional sampling
    /// with a pixel-space DDPM folder; --from makes a PNG's image again.
    Generate(Box<generate::GenerateArgs>),
    /// DDIM inversion: the latents from which `generate --latents FILE --scheduler ddim`
    /// (same prompt, steps and guidance) gives the image back.
    Invert(Box<invert::InvertArgs>),
    /// List the scheduler names that --scheduler accepts.
    Schedulers,
    /// Print the generation parameters stored in a PNG (by diffuse or the AUTOMATIC1111 web UI).
    Info(info::InfoArgs),
    /// Time the text encoder, one UNet step and one VAE decode (random weights for a named
    /// standard config, or a real model folder), or with --train one training step.
    Bench(bench::BenchArgs),
    /// Train on IDX files or an image folder and write a diffusers folder: a pixel-space
    /// UNet2DModel (--kind pixel, a DDPMPipeline), an AutoencoderKL (--kind autoencoder), or a
    /// text-to-image model in a trained autoencoder's latents (--kind text-to-image, a
    /// StableDiffusionPipeline); or fine-tune a Stable Diffusion pipeline (--base), or train
    /// LoRA adapters on it (--lora-rank).
    Train(Box<train::TrainArgs>),
    /// Judge a Fashion-MNIST text-to-image model with a classifier trained on Fashion-MNIST:
    /// how often it draws the prompted class, and the Fréchet distance to the test set
    /// (--train-classifier trains that classifier first).
    Evaluate(Box<evaluate::EvaluateArgs>),
    /// Serve models over HTTP: the AUTOMATIC1111 and OpenAI image APIs, a job API with
    /// progress events and cancellation, and a web page at `/`.
    Serve(Box<serve::ServeArgs>),
    /// Run jobs from a `diffuse serve --queue redis://...` job queue: loads its models once and
    /// runs their jobs until SIGTERM (the job it runs is finished first).
    Worker(Box<serve::WorkerArgs>),
}

/// glibc hands blocks of 32 MB and more straight back to the kernel when they are freed, so
/// every large activation (hundreds of MB in a VAE decoder) is new memory that the kernel
/// must fault in and zero page by page: about a second per UNet step. Keeping freed memory
/// in the heap for reuse removes that; peak memory is unchanged (the same blocks are reused).
fn keep_freed_memory_for_reuse() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; it is called before any other thread
    // exists, and the values are valid for these options.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

fn main() {
    keep_freed_memory_for_reuse();
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if let Err(e) = diffuse::ops::init_threads(cli.threads) {
        eprintln!("error: --threads: {e}");
        std::process::exit(1);
    }
    match diffuse::device::parse(&cli.device) {
        Ok(device) => {
            let _ = DEVICE.set(device);
        }
        Err(e) => {
            eprintln!("error: --device: {e}");
            std::process::exit(1);
        }
    }
    let result = match cli.command {
        Command::Generate(args) => generate::run(*args, matches.subcommand_matches("generate")),
        Command::Info(args) => info::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Invert(args) => invert::run(*args),
        Command::Train(args) => train::run(*args),
        Command::Evaluate(args) => evaluate::run(*args),
        Command::Serve(args) => serve::run(*args),
        Command::Worker(args) => serve::run_worker(*args),
        Command::Schedulers => {
            for (name, class, _, description) in SCHEDULER_NAMES {
                outln!("{name:<16} {description} [{class}]");
            }
            Ok(())
        }
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

