//! `diffuse serve`: an HTTP server over the library, for the tools that drive image generation
//! (AUTOMATIC1111 clients, OpenAI Images API clients, scripts, the built-in web page). Models
//! are loaded once at start and each runs on its own worker thread, one job at a time, fed by
//! one bounded queue (jobs.rs); every route is a thin skin over that queue:
//!
//! - native.rs: `/v1/jobs`, jobs with ids, progress, server-sent events and cancellation;
//! - a1111.rs: AUTOMATIC1111's `/sdapi/v1/*`;
//! - openai.rs: OpenAI's `/v1/images/*` and `/v1/models`;
//! - page.rs: the web page at `/`;
//! - http.rs: errors as JSON, request bodies, base64 images, the API key.
//! - redis_queue.rs: `--queue redis://...` and `diffuse worker`: the queue in Redis, for
//!   workers on any number of machines.
//!
//! An image made here is the image `diffuse generate` makes with the same parameters: the
//! worker runs generate.rs's own functions on a loaded pipeline.

mod a1111;
mod http;
mod jobs;
mod native;
mod openai;
mod page;
mod redis_queue;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;

use jobs::{Limits, Mode, ServeOptions, Shared};
use redis_queue::WorkerConfig;

#[derive(clap::Args)]
pub struct ServeArgs {
    /// A model to keep loaded (a diffusers folder, a single checkpoint file, a Hugging Face repo
    /// id, or `builtin` for the built-in model); repeatable. The first is the default; requests
    /// name the others by folder name, file stem or repo id. Default: the built-in model.
    #[arg(long = "model", value_name = "M")]
    pub models: Vec<String>,
    /// The address to listen on. Anything but loopback without --api-key prints a warning.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// The port (0: any free port; the address is printed as `listening on http://...`).
    #[arg(long, default_value_t = 7860)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` (or HTTP Basic auth with KEY as the password) on
    /// every API route; the page at `/` loads without it (`/?api_key=KEY` hands it the key).
    #[arg(long, value_name = "KEY")]
    pub api_key: Option<String>,
    /// How many jobs may wait behind the running ones; more are refused with 429.
    #[arg(long, default_value_t = 16)]
    pub max_queue: usize,
    /// Where `<lora:NAME:WEIGHT>` prompt tags find NAME.safetensors (and what
    /// /sdapi/v1/loras lists).
    #[arg(long, value_name = "DIR")]
    pub lora_dir: Option<PathBuf>,
    /// Weight precision of the loaded models: f32, f16 or bf16 (as `generate --dtype`).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// The largest width or height a request may ask for, in pixels.
    #[arg(long, default_value_t = 1024)]
    pub max_size: usize,
    /// The most denoising steps a request may ask for.
    #[arg(long, default_value_t = 150)]
    pub max_steps: usize,
    /// The most images one request may ask for (batch size × iterations).
    #[arg(long, default_value_t = 8)]
    pub max_images: usize,
    /// The largest request body, in megabytes (init images are sent as base64).
    #[arg(long, default_value_t = 50)]
    pub max_body_mb: usize,
    /// Decode a live preview after every step for every job (a job may say otherwise with
    /// `preview`): `preview` events, A1111's `current_image`. Costs a VAE decode per step.
    #[arg(long)]
    pub preview: bool,
    /// The autoencoder folder that decodes previews (a TAESD costs little per step); default:
    /// the model's VAE.
    #[arg(long, value_name = "DIR")]
    pub preview_vae: Option<PathBuf>,
    /// Keep the job queue in Redis (redis://HOST[:PORT]/) for `diffuse worker` processes on
    /// any machine to run. The server then runs no model itself unless --model is also given
    /// (it then works for that queue too), and serves the models the workers registered
    /// (waiting at start until one has).
    #[arg(long, value_name = "URL")]
    pub queue: Option<String>,
    #[command(flatten)]
    pub redis: RedisArgs,
}

/// Settings of the job queue in Redis.
#[derive(clap::Args, Clone)]
pub struct RedisArgs {
    /// With --queue: a job whose worker has not been heard of for this long (it died) is taken
    /// over by another worker and run again.
    #[arg(long, default_value_t = 30.0, value_name = "SECONDS")]
    pub claim_after_secs: f64,
    /// With --queue: how long a job's events and images stay in Redis.
    #[arg(long, default_value_t = 86400, value_name = "SECONDS")]
    pub result_ttl_secs: u64,
}

impl RedisArgs {
    fn config(&self, url: &str) -> Result<Arc<WorkerConfig>> {
        if !(self.claim_after_secs > 0.0 && self.claim_after_secs.is_finite()) || self.result_ttl_secs == 0 {
            bail!("--claim-after-secs and --result-ttl-secs must be more than 0");
        }
        Ok(Arc::new(WorkerConfig {
            url: url.to_string(),
            claim_after: std::time::Duration::from_secs_f64(self.claim_after_secs),
            ttl_secs: self.result_ttl_secs,
        }))
    }
}

#[derive(clap::Args)]
pub struct WorkerArgs {
    /// The Redis job queue of a `diffuse serve --queue` (redis://HOST[:PORT]/).
    #[arg(long, value_name = "URL")]
    pub queue: String,
    /// A model to load and run jobs for (as `serve --model`); repeatable. Default: the
    /// built-in model.
    #[arg(long = "model", value_name = "M")]
    pub models: Vec<String>,
    /// Where `<lora:NAME:WEIGHT>` prompt tags find NAME.safetensors.
    #[arg(long, value_name = "DIR")]
    pub lora_dir: Option<PathBuf>,
    /// Weight precision of the loaded models: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// The autoencoder folder that decodes previews for jobs that ask for them.
    #[arg(long, value_name = "DIR")]
    pub preview_vae: Option<PathBuf>,
    #[command(flatten)]
    pub redis: RedisArgs,
}

/// `diffuse worker`: loads its models once, runs their jobs from Redis until SIGTERM or
/// Ctrl-C, then finishes the job it runs (at most a minute; past that the job is left to
/// another worker) and exits.
pub fn run_worker(args: WorkerArgs) -> Result<()> {
    let specs = if args.models.is_empty() { vec!["builtin".to_string()] } else { args.models.clone() };
    let config = args.redis.config(&args.queue)?;
    redis_queue::connect(&args.queue)?;
    let options = ServeOptions {
        limits: Limits { max_queue: 0, max_size: usize::MAX, max_steps: usize::MAX, max_images: usize::MAX, max_body: 0 },
        api_key: None,
        lora_dir: args.lora_dir.clone(),
        dtype: args.dtype.clone(),
        preview: false,
        preview_vae: args.preview_vae.clone(),
    };
    let shared = Shared::start_with(&specs, options, Mode::Redis(config))?;
    redis_queue::register(&args.queue, &shared)?;
    let names: Vec<String> = shared.models().into_iter().map(|(_, m)| m.name.clone()).collect();
    outln!("worker ready: {} from {}", names.join(", "), args.queue);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(wait_for_signal());
    eprintln!("stopping: finishing the running jobs");
    redis_queue::STOP.store(true, std::sync::atomic::Ordering::SeqCst);
    let started = std::time::Instant::now();
    while redis_queue::RUNNING.load(std::sync::atomic::Ordering::SeqCst) > 0 {
        if started.elapsed() > std::time::Duration::from_secs(60) {
            eprintln!("a job still runs after 60 s; leaving it to another worker");
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Ok(())
}

pub fn run(args: ServeArgs) -> Result<()> {
    if args.max_body_mb == 0 || args.max_steps == 0 || args.max_images == 0 || args.max_size < 8 {
        bail!("--max-body-mb, --max-steps and --max-images must be at least 1, --max-size at least 8");
    }
    let specs = if args.models.is_empty() { vec!["builtin".to_string()] } else { args.models.clone() };
    let limits = Limits {
        max_queue: args.max_queue,
        max_size: args.max_size,
        max_steps: args.max_steps,
        max_images: args.max_images,
        max_body: args.max_body_mb.saturating_mul(1 << 20),
    };
    let host: std::net::IpAddr = match args.host.as_str() {
        "localhost" => std::net::Ipv4Addr::LOCALHOST.into(),
        host => host.parse().with_context(|| format!("--host {host}: not an IP address"))?,
    };
    let options = ServeOptions {
        limits,
        api_key: args.api_key.clone(),
        lora_dir: args.lora_dir.clone(),
        dtype: args.dtype.clone(),
        preview: args.preview,
        preview_vae: args.preview_vae.clone(),
    };
    let shared = match &args.queue {
        None => Shared::start(&specs, options)?,
        Some(url) => {
            let config = args.redis.config(url)?;
            redis_queue::connect(url)?;
            if !args.models.is_empty() {
                let limits = options.limits.clone();
                let local = Shared::start_with(&specs, options, Mode::Redis(config.clone()))?;
                redis_queue::register(url, &local)?;
                // Its threads hold it; it lives as long as the process.
                std::mem::forget(local);
                let options = ServeOptions { limits, api_key: args.api_key.clone(), lora_dir: args.lora_dir.clone(), dtype: args.dtype.clone(), preview: args.preview, preview_vae: None };
                front_end(url, options, &config)?
            } else {
                front_end(url, options, &config)?
            }
        }
    };
    if !host.is_loopback() && args.api_key.is_none() {
        eprintln!("warning: listening on {host} without --api-key: anyone who can reach this address can use the server");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(serve(shared, SocketAddr::new(host, args.port)))
}

/// The shared state over the models registered in Redis, whose jobs go there.
fn front_end(url: &str, options: ServeOptions, config: &WorkerConfig) -> Result<Arc<Shared>> {
    let models = redis_queue::registered_models(url)?;
    let shared = Shared::new(models, options.limits, options.api_key, options.lora_dir, options.dtype, options.preview);
    redis_queue::start_front_end(shared.clone(), url.to_string(), config.ttl_secs)?;
    Ok(shared)
}

/// Ctrl-C, or SIGTERM on Unix.
async fn wait_for_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
}

/// Every route, over the shared state.
pub(crate) fn router(shared: Arc<Shared>) -> Router {
    let api = Router::new()
        .route("/v1/jobs", post(native::submit).get(native::list))
        .route("/v1/jobs/{id}", get(native::status).delete(native::cancel))
        .route("/v1/jobs/{id}/events", get(native::events))
        .route("/v1/models", get(openai::models))
        .route("/v1/images/generations", post(openai::generations))
        .route("/v1/images/edits", post(openai::edits))
        .route("/sdapi/v1/txt2img", post(a1111::txt2img))
        .route("/sdapi/v1/img2img", post(a1111::img2img))
        .route("/sdapi/v1/progress", get(a1111::progress))
        .route("/sdapi/v1/interrupt", post(a1111::interrupt))
        .route("/sdapi/v1/skip", post(a1111::skip))
        .route("/sdapi/v1/samplers", get(a1111::samplers))
        .route("/sdapi/v1/schedulers", get(a1111::schedulers))
        .route("/sdapi/v1/sd-models", get(a1111::sd_models))
        .route("/sdapi/v1/loras", get(a1111::loras))
        .route("/sdapi/v1/scripts", get(a1111::scripts))
        .route("/sdapi/v1/options", get(a1111::options).post(a1111::set_options))
        .route("/sdapi/v1/png-info", post(a1111::png_info))
        .layer(axum::middleware::from_fn_with_state(shared.clone(), http::require_key))
        .layer(DefaultBodyLimit::max(shared.limits.max_body));
    Router::new().route("/", get(page::index)).merge(api).fallback(http::not_found).with_state(shared)
}

async fn serve(shared: Arc<Shared>, address: SocketAddr) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(address).await.with_context(|| format!("cannot listen on {address}"))?;
    let local = listener.local_addr()?;
    let names: Vec<String> = shared.models().into_iter().map(|(_, m)| m.name.clone()).collect();
    eprintln!("models loaded: {}", names.join(", "));
    outln!("listening on http://{local}");
    let app = router(shared.clone());
    axum::serve(listener, app).with_graceful_shutdown(shutdown_signal(shared)).await?;
    Ok(())
}

/// Ctrl-C or SIGTERM: every job is cancelled (each named on stderr), open requests end, and
/// the process exits (after at most a few seconds, whatever clients do).
async fn shutdown_signal(shared: Arc<Shared>) {
    wait_for_signal().await;
    eprintln!("shutting down");
    redis_queue::STOP.store(true, std::sync::atomic::Ordering::SeqCst);
    for line in shared.shut_down() {
        eprintln!("{line}");
    }
    std::thread::spawn(|| {
        std::thread::sleep(std::time::Duration::from_secs(5));
        eprintln!("open connections did not close in 5 s; exiting");
        std::process::exit(0);
    });
}
