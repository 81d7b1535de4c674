//! The job queue: one bounded FIFO of waiting jobs, and one worker thread per loaded model
//! that takes that model's jobs in order and runs them one at a time, off the async runtime.
//! Each job keeps its own state and its event log (replayed to late subscribers); cancelling a
//! job sets its own interrupt flag, which the pipeline checks before every step.

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Result};
use diffuse::pipelines::encode_png;
use diffuse::pipelines::image_processor::Image8;
use diffuse::lora::LoraSpec;
use diffuse::pipelines::autoencoder::Autoencoder;
use diffuse::pipelines::stable_diffusion::{is_stable_diffusion_folder, StableDiffusionPipeline, StepPreview, LCM_PIPELINE_DEFAULTS};
use diffuse::pipelines::to_uint8_images;
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::generate::{self, loras, parameters};
use crate::start::Start;

/// `diffuse serve`'s settings besides its models.
pub struct ServeOptions {
    pub limits: Limits,
    pub api_key: Option<String>,
    pub lora_dir: Option<PathBuf>,
    pub dtype: String,
    pub preview: bool,
    pub preview_vae: Option<PathBuf>,
}

/// The server's limits on what one request may ask for.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_queue: usize,
    pub max_size: usize,
    pub max_steps: usize,
    pub max_images: usize,
    pub max_body: usize,
}

/// A loaded model, as requests name it.
pub struct ModelInfo {
    /// The folder name, file stem, repo id, or `builtin`.
    pub name: String,
    /// What `--model` said.
    pub spec: String,
    pub path: PathBuf,
    pub single_file: bool,
    /// AUTOMATIC1111's short model hash (10 hex digits), when it could be computed.
    pub hash: Option<String>,
    /// (height, width) a request without a size gets.
    pub default_size: (usize, usize),
    /// The name the infotext records (`Model:`).
    pub infotext_name: String,
    /// A LatentConsistencyModelPipeline folder: 4 steps and guidance 8.5 unless asked otherwise.
    pub lcm: bool,
}

impl ModelInfo {
    /// A1111's checkpoint title: `name [hash]`.
    pub fn title(&self) -> String {
        match &self.hash {
            Some(hash) => format!("{} [{hash}]", self.name),
            None => self.name.clone(),
        }
    }
}

/// Which API a job came through (A1111's interrupt and skip reach only A1111 jobs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    Native,
    A1111,
    OpenAi,
}

/// An init image (and mask) for image-to-image or inpainting.
#[derive(Clone)]
pub struct InitImage {
    pub image: Image8,
    pub mask: Option<Image8>,
    pub strength: f64,
}

/// One request, whichever API it came through, in `diffuse generate`'s terms.
#[derive(Clone)]
pub struct GenerateRequest {
    pub model: usize,
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub steps: usize,
    pub guidance_scale: f64,
    pub guidance_rescale: f64,
    pub width: Option<usize>,
    pub height: Option<usize>,
    /// The first iteration's seed (iteration k uses seed + k × batch_size, as A1111 numbers them).
    pub seed: u64,
    /// A diffuse scheduler name (`diffuse schedulers`), or the model's own.
    pub scheduler: Option<String>,
    pub scheduler_config: Vec<(String, Value)>,
    pub eta: Option<f64>,
    pub clip_skip: Option<usize>,
    /// `diffusers` or `a1111`.
    pub prompt_syntax: String,
    /// Images drawn together from one generator (`--num-images`).
    pub batch_size: usize,
    /// Batches made one after another (A1111's n_iter).
    pub iterations: usize,
    pub init: Option<InitImage>,
    /// What the request asked for that the server does not do, said back to the client.
    pub notes: Vec<String>,
    /// Fields the request sent that diffuse ignores.
    pub ignored_fields: Vec<String>,
    /// Decode a preview after every step (`preview` events, A1111's `current_image`).
    pub preview: bool,
}

impl GenerateRequest {
    /// A request with `diffuse generate`'s defaults for this model (an LCM pipeline folder's
    /// own steps and guidance, as generate gives it).
    pub fn new(shared: &Shared, model: usize) -> Self {
        let defaults = generate::default_args();
        let lcm = shared.model(model).lcm;
        GenerateRequest {
            model,
            prompt: String::new(),
            negative_prompt: None,
            steps: if lcm { LCM_PIPELINE_DEFAULTS.0 } else { defaults.steps },
            guidance_scale: if lcm { LCM_PIPELINE_DEFAULTS.1 } else { defaults.guidance_scale },
            guidance_rescale: defaults.guidance_rescale,
            width: None,
            height: None,
            seed: generate::random_seed(),
            scheduler: None,
            scheduler_config: Vec::new(),
            eta: None,
            clip_skip: None,
            prompt_syntax: defaults.prompt_syntax,
            batch_size: 1,
            iterations: 1,
            init: None,
            notes: Vec::new(),
            ignored_fields: Vec::new(),
            preview: shared.preview,
        }
    }

    /// The seed of iteration `k`.
    pub fn seed_of(&self, iteration: usize) -> u64 {
        self.seed.wrapping_add((iteration * self.batch_size) as u64)
    }

    /// The `diffuse generate` arguments of iteration `k` (the init image is given apart).
    pub fn args(&self, model: &ModelInfo, lora_dir: Option<&Path>, dtype: &str, iteration: usize) -> generate::GenerateArgs {
        let mut args = generate::default_args();
        args.model = Some(model.infotext_name.clone());
        args.prompt = Some(self.prompt.clone());
        args.negative_prompt = self.negative_prompt.clone();
        args.steps = self.steps;
        args.guidance_scale = self.guidance_scale;
        args.guidance_rescale = self.guidance_rescale;
        args.width = self.width;
        args.height = self.height;
        args.seed = Some(self.seed_of(iteration));
        args.scheduler = self.scheduler.clone();
        args.scheduler_config = self.scheduler_config.iter().map(|(key, value)| format!("{key}={value}")).collect();
        args.eta = self.eta;
        args.clip_skip = self.clip_skip;
        args.prompt_syntax = self.prompt_syntax.clone();
        args.num_images = self.batch_size;
        args.lora_dir = lora_dir.map(Path::to_path_buf);
        args.dtype = dtype.to_string();
        args.quiet = true;
        if let Some(init) = &self.init {
            // Only what the infotext reads (the strength, and whether there is a mask).
            args.start.init_image = Some(PathBuf::from("init image"));
            args.start.mask = init.mask.as_ref().map(|_| PathBuf::from("mask"));
            args.start.strength = Some(init.strength);
        }
        args
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Queued,
    Running,
    Done,
    Failed,
    Cancelled,
}

impl Status {
    pub fn name(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Running => "running",
            Status::Done => "done",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
        }
    }
    pub fn finished(self) -> bool {
        matches!(self, Status::Done | Status::Failed | Status::Cancelled)
    }
}

/// One image a job made: its PNG (with the infotext in its `parameters` chunk).
#[derive(Clone)]
pub struct ImageOut {
    pub png: Vec<u8>,
    pub infotext: String,
    pub seed: u64,
    pub width: usize,
    pub height: usize,
}

impl ImageOut {
    pub fn base64(&self) -> String {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(&self.png)
    }
}

pub struct JobState {
    pub status: Status,
    pub step: usize,
    pub steps: usize,
    /// The iteration running (from 0).
    pub iteration: usize,
    pub it_per_s: f64,
    pub started: Option<Instant>,
    pub finished: Option<Instant>,
    pub images: Vec<ImageOut>,
    pub error: Option<String>,
    /// The failure was the request's fault (an invalid value the pipeline refused).
    pub invalid: bool,
    pub warnings: Vec<String>,
    /// Every event so far, in order: (name, data).
    pub events: Vec<(&'static str, Value)>,
    /// Iterations skipped (A1111's skip).
    pub skipped: usize,
    /// The latest live preview (a PNG), while the job runs.
    pub preview: Option<Vec<u8>>,
    /// The event that carries the latest preview's image (older ones keep only their step).
    preview_event: Option<usize>,
    /// The images were handed to a client that waited for them (A1111, OpenAI) and dropped.
    pub delivered: bool,
}

pub struct Job {
    pub id: String,
    pub origin: Origin,
    pub request: GenerateRequest,
    pub created: SystemTime,
    /// Set by DELETE (and shutdown): the job ends as cancelled.
    pub cancelled: AtomicBool,
    /// Set by A1111's skip: the running iteration ends, the next one starts.
    pub skip: AtomicBool,
    /// The pipeline's interrupt flag while this job runs.
    pub interrupt: Arc<AtomicBool>,
    state: Mutex<JobState>,
    /// The number of events, bumped after each one (subscribers wait on it).
    pub events: watch::Sender<usize>,
    /// Where a Redis worker sends each event on (redis_queue.rs); it answers whether the job
    /// was cancelled or skipped meanwhile.
    pub sink: Option<Sink>,
}

/// What a job's onward path answers to an event: stop the job, or skip its iteration
/// `skip_iteration` (from 1; a skip meant for an earlier iteration is stale).
#[derive(Default)]
pub struct Control {
    pub cancel: bool,
    pub skip_iteration: Option<usize>,
}

/// An event's onward path: (name, data) → what the job is to do.
pub type Sink = Box<dyn Fn(&str, &Value) -> Control + Send + Sync>;

/// How a model's worker thread takes its jobs.
#[derive(Clone)]
pub enum Mode {
    /// From this process's own queue.
    Local,
    /// From a Redis stream (`diffuse worker`, `diffuse serve --queue ... --model M`).
    Redis(Arc<super::redis_queue::WorkerConfig>),
}

impl Job {
    pub fn state(&self) -> MutexGuard<'_, JobState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn push_event(&self, state: &mut JobState, name: &'static str, data: Value) {
        if let Some(sink) = &self.sink {
            let control = sink(name, &data);
            if control.cancel {
                self.cancelled.store(true, Ordering::SeqCst);
                self.interrupt.store(true, Ordering::SeqCst);
            }
            if control.skip_iteration == Some(state.iteration + 1) {
                self.skip.store(true, Ordering::SeqCst);
                self.interrupt.store(true, Ordering::SeqCst);
            }
        }
        state.events.push((name, data));
        self.events.send_replace(state.events.len());
    }

    pub fn status(&self) -> Status {
        self.state().status
    }

    /// A watcher that wakes on each new event.
    pub fn subscribe(&self) -> watch::Receiver<usize> {
        self.events.subscribe()
    }

    /// A new live preview: the latest keeps its image, the one before drops it.
    pub(super) fn set_preview(&self, step: usize, png: Vec<u8>) {
        use base64::Engine;
        let mut state = self.state();
        self.drop_preview_image(&mut state);
        let data = json!({ "step": step, "png": base64::engine::general_purpose::STANDARD.encode(&png) });
        state.preview = Some(png);
        state.preview_event = Some(state.events.len());
        self.push_event(&mut state, "preview", data);
    }

    pub(super) fn drop_preview_image(&self, state: &mut JobState) {
        if let Some(index) = state.preview_event.take() {
            if let Some(map) = state.events.get_mut(index).and_then(|(_, data)| data.as_object_mut()) {
                map.remove("png");
            }
        }
        state.preview = None;
    }

    /// After a waiting client got the images: the job keeps its record, not its images.
    pub fn forget_images(&self) {
        let mut state = self.state();
        state.images = Vec::new();
        state.delivered = true;
        for (name, data) in state.events.iter_mut() {
            if *name == "done" {
                *data = json!({ "images": [], "delivered": true });
            }
        }
    }

    /// Waits until the job has finished.
    pub async fn finished(&self) {
        let mut events = self.subscribe();
        while !self.status().finished() {
            if events.changed().await.is_err() {
                return;
            }
        }
    }

    /// The fraction done, over all iterations.
    pub fn progress(&self, state: &JobState) -> f64 {
        if state.status.finished() {
            return 1.0;
        }
        let iterations = self.request.iterations.max(1);
        let within = if state.steps > 0 { state.step as f64 / state.steps as f64 } else { 0.0 };
        ((state.iteration as f64 + within) / iterations as f64).clamp(0.0, 1.0)
    }
}


impl Job {
    /// A job not yet queued (`sink`: where a Redis worker sends its events).
    pub(super) fn new(id: String, request: GenerateRequest, origin: Origin, sink: Option<Sink>) -> Job {
        let (events, _) = watch::channel(0);
        Job {
            id,
            origin,
            request,
            created: SystemTime::now(),
            cancelled: AtomicBool::new(false),
            skip: AtomicBool::new(false),
            interrupt: Arc::new(AtomicBool::new(false)),
            state: Mutex::new(JobState {
                status: Status::Queued,
                step: 0,
                steps: 0,
                iteration: 0,
                it_per_s: 0.0,
                started: None,
                finished: None,
                images: Vec::new(),
                error: None,
                invalid: false,
                warnings: Vec::new(),
                events: Vec::new(),
                skipped: 0,
                preview: None,
                preview_event: None,
                delivered: false,
            }),
            events,
            sink,
        }
    }
}

struct Queue {
    waiting: VecDeque<Arc<Job>>,
    /// Per model: whether its worker is running a job.
    busy: Vec<bool>,
    shutting_down: bool,
}

/// What every request handler and worker shares.
pub struct Shared {
    /// Every model this server has served, by index (only added to: a job keeps its index);
    /// with `--queue`, models workers register later are added, and those no worker serves
    /// any longer are not live.
    models: std::sync::RwLock<Models>,
    /// The model requests get when they name none (A1111's `sd_model_checkpoint`).
    pub default_model: AtomicUsize,
    pub limits: Limits,
    pub api_key: Option<String>,
    pub lora_dir: Option<PathBuf>,
    pub dtype: String,
    /// Jobs decode a live preview after every step unless they say otherwise.
    pub preview: bool,
    queue: Mutex<Queue>,
    wake: Condvar,
    jobs: Mutex<HashMap<String, Arc<Job>>>,
    /// Finished jobs in the order they finished (the oldest are forgotten past a bound).
    finished: Mutex<VecDeque<String>>,
    counter: AtomicU64,
    /// With `serve --queue`: the Redis URL and the result TTL. The jobs then run elsewhere
    /// (waiting means not started by any worker yet), and jobs other front ends queued are
    /// looked up there.
    pub(super) redis: std::sync::OnceLock<(String, u64)>,
}

struct Models {
    list: Vec<Arc<ModelInfo>>,
    live: Vec<bool>,
}

/// How many finished jobs are kept for GET /v1/jobs/{id}.
const KEEP_FINISHED: usize = 64;

impl Shared {
    /// Loads every model on its own worker thread (which then runs its jobs) and returns once
    /// all are loaded, or with the first that failed.
    pub fn start(specs: &[String], options: ServeOptions) -> Result<Arc<Self>> {
        Self::start_with(specs, options, Mode::Local)
    }

    /// As `start`, each model's thread taking its jobs as `mode` says.
    pub fn start_with(specs: &[String], options: ServeOptions, mode: Mode) -> Result<Arc<Self>> {
        let ServeOptions { limits, api_key, lora_dir, dtype, preview, preview_vae } = options;
        generate::parse_dtype(&dtype, &crate::device()).map_err(|e| anyhow!("{}", e.to_string().replace("--dtype", "serve --dtype")))?;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (shared_tx, shared_rx) = std::sync::mpsc::channel::<Arc<Shared>>();
        let shared_rx = Arc::new(Mutex::new(shared_rx));
        let mut handles = Vec::new();
        for (index, spec) in specs.iter().enumerate() {
            let (spec, dtype, ready, shared_rx) = (spec.clone(), dtype.clone(), ready_tx.clone(), shared_rx.clone());
            let preview_vae = preview_vae.clone();
            let mode = mode.clone();
            let handle = std::thread::Builder::new().name(format!("model-{index}")).spawn(move || {
                let loaded = load_model(&spec, &dtype).and_then(|(info, pipeline)| {
                    let vae = match &preview_vae {
                        Some(dir) => Some(pipeline.load_vae(dir, None).map_err(|e| anyhow!("--preview-vae {}: {e}", dir.display()))?),
                        None => None,
                    };
                    Ok((info, Worker { pipeline, preview_vae: vae, with_loras: None }))
                });
                let pipeline = match loaded {
                    Ok((info, worker)) => {
                        let _ = ready.send((index, Ok(info)));
                        worker
                    }
                    Err(e) => {
                        let _ = ready.send((index, Err(e)));
                        return;
                    }
                };
                // Wait for the shared state (built once every model is loaded).
                let shared = match shared_rx.lock().unwrap_or_else(|e| e.into_inner()).recv() {
                    Ok(shared) => shared,
                    Err(_) => return,
                };
                match mode {
                    Mode::Local => worker(index, pipeline, shared),
                    Mode::Redis(config) => super::redis_queue::work(index, pipeline, shared, config),
                }
            })?;
            handles.push(handle);
        }
        drop(ready_tx);
        let mut infos: Vec<Option<ModelInfo>> = specs.iter().map(|_| None).collect();
        for _ in specs {
            let (index, loaded) = ready_rx.recv().map_err(|_| anyhow!("a model worker ended before loading its model"))?;
            infos[index] = Some(loaded.map_err(|e| anyhow!("--model {}: {e:#}", specs[index]))?);
        }
        let models: Vec<ModelInfo> = infos.into_iter().map(|i| i.expect("every model reported")).collect();
        for (i, model) in models.iter().enumerate() {
            if models[..i].iter().any(|m| m.name == model.name) {
                bail!("two --model arguments have the name `{}`: requests could not tell them apart", model.name);
            }
        }
        let shared = Self::new(models, limits, api_key, lora_dir, dtype, preview);
        for _ in 0..shared.model_count() {
            shared_tx.send(shared.clone())?;
        }
        Ok(shared)
    }

    /// The shared state over models that run elsewhere (or are about to run here).
    pub(super) fn new(models: Vec<ModelInfo>, limits: Limits, api_key: Option<String>, lora_dir: Option<PathBuf>, dtype: String, preview: bool) -> Arc<Self> {
        let count = models.len();
        Arc::new(Shared {
            models: std::sync::RwLock::new(Models { live: vec![true; count], list: models.into_iter().map(Arc::new).collect() }),
            default_model: AtomicUsize::new(0),
            limits,
            api_key,
            lora_dir,
            dtype,
            preview,
            queue: Mutex::new(Queue { waiting: VecDeque::new(), busy: vec![false; count], shutting_down: false }),
            wake: Condvar::new(),
            jobs: Mutex::new(HashMap::new()),
            finished: Mutex::new(VecDeque::new()),
            counter: AtomicU64::new(0),
            redis: std::sync::OnceLock::new(),
        })
    }

    fn registry(&self) -> std::sync::RwLockReadGuard<'_, Models> {
        self.models.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The model of index `index` (a job's, or one `find_model` gave).
    pub fn model(&self, index: usize) -> Arc<ModelInfo> {
        self.registry().list[index].clone()
    }

    /// How many models the server has had (live or not).
    pub fn model_count(&self) -> usize {
        self.registry().list.len()
    }

    /// The models served now, with their index.
    pub fn models(&self) -> Vec<(usize, Arc<ModelInfo>)> {
        let registry = self.registry();
        registry.list.iter().enumerate().filter(|(i, _)| registry.live[*i]).map(|(i, m)| (i, m.clone())).collect()
    }

    /// The models served now, as they are (with `--queue`: those a live worker registered).
    /// New ones are added (their index returned); the others are live or not as `served` says.
    pub(super) fn set_models(&self, served: Vec<ModelInfo>) -> Vec<usize> {
        let mut added = Vec::new();
        let mut registry = self.models.write().unwrap_or_else(|e| e.into_inner());
        let live: Vec<bool> = registry.list.iter().map(|m| served.iter().any(|s| s.name == m.name)).collect();
        registry.live = live;
        for info in served {
            if !registry.list.iter().any(|m| m.name == info.name) {
                registry.list.push(Arc::new(info));
                registry.live.push(true);
                added.push(registry.list.len() - 1);
            }
        }
        if !added.is_empty() {
            let count = registry.list.len();
            self.queue().busy.resize(count, false);
        }
        added
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The model a request names: by name, `--model` spec, A1111 title (`name [hash]`) or
    /// hash; `None` for the default one.
    pub fn find_model(&self, name: Option<&str>) -> Option<usize> {
        let models = self.models();
        let Some(name) = name.map(str::trim).filter(|n| !n.is_empty()) else {
            // The default, or (no worker serving it any longer) the first model served.
            let default = self.default_model.load(Ordering::Relaxed);
            return models.iter().map(|(i, _)| *i).find(|i| *i == default).or_else(|| models.first().map(|(i, _)| *i));
        };
        let bare = name.split(" [").next().unwrap_or(name);
        models
            .iter()
            .find(|(_, m)| m.name == name || m.spec == name || m.title() == name || m.name == bare || m.hash.as_deref() == Some(name))
            .map(|(i, _)| *i)
    }

    pub fn job(&self, id: &str) -> Option<Arc<Job>> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner()).get(id).cloned()
    }

    /// Every job the server remembers, oldest first.
    pub fn all_jobs(&self) -> Vec<Arc<Job>> {
        let mut jobs: Vec<Arc<Job>> = self.jobs.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
        jobs.sort_by_key(|j| j.created);
        jobs
    }

    /// Queues a job; `Err(retry_after_seconds)` when the queue is full.
    pub fn submit(&self, request: GenerateRequest, origin: Origin) -> std::result::Result<Arc<Job>, u64> {
        let mut queue = self.queue();
        let model = request.model;
        let (idle, waiting) = if self.redis.get().is_some() {
            // Jobs in Redis: those no worker has started wait.
            let statuses: Vec<(usize, Status)> = self.all_jobs().iter().map(|j| (j.request.model, j.status())).collect();
            let idle = !statuses.iter().any(|(m, s)| *m == model && !s.finished());
            (idle, statuses.iter().filter(|(_, s)| *s == Status::Queued).count())
        } else {
            (!queue.busy[model] && !queue.waiting.iter().any(|j| j.request.model == model), queue.waiting.len())
        };
        if queue.shutting_down || (!idle && waiting >= self.limits.max_queue) {
            return Err(self.retry_after(&queue));
        }
        let id = self.new_id();
        let job = Arc::new(Job::new(id.clone(), request, origin, None));
        let position = queue.waiting.iter().filter(|j| j.request.model == model).count();
        {
            let mut state = job.state();
            job.push_event(&mut state, "queued", json!({ "id": id, "position": position }));
        }
        self.jobs.lock().unwrap_or_else(|e| e.into_inner()).insert(id, job.clone());
        queue.waiting.push_back(job.clone());
        drop(queue);
        self.wake.notify_all();
        Ok(job)
    }


    /// A guess at when a place frees up: the running jobs' remaining steps at their speed.
    fn retry_after(&self, _queue: &Queue) -> u64 {
        let jobs = self.all_jobs();
        let remaining = jobs
            .iter()
            .filter_map(|job| {
                let state = job.state();
                (state.status == Status::Running && state.it_per_s > 0.0).then(|| {
                    let left = (job.request.iterations - state.iteration) * state.steps.max(1) - state.step.min(state.steps);
                    left as f64 / state.it_per_s
                })
            })
            .fold(f64::INFINITY, f64::min);
        if remaining.is_finite() {
            (remaining.ceil() as u64).clamp(1, 3600)
        } else {
            5
        }
    }

    pub(super) fn new_id(&self) -> String {
        use std::hash::{BuildHasher, Hasher};
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u64(self.counter.fetch_add(1, Ordering::Relaxed));
        hasher.write_u128(SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos());
        format!("{:016x}", hasher.finish())
    }

    /// How many jobs wait ahead of this one for the same model (None when it does not wait).
    pub fn position(&self, job: &Job) -> Option<usize> {
        let queue = self.queue();
        let mut ahead = 0;
        for waiting in &queue.waiting {
            if waiting.id == job.id {
                return Some(ahead);
            }
            if waiting.request.model == job.request.model {
                ahead += 1;
            }
        }
        None
    }

    /// Whether shutdown has begun.
    pub(super) fn shutting_down(&self) -> bool {
        self.queue().shutting_down
    }

    /// Cancels one job: a waiting one leaves the queue, a running one stops within a step.
    /// Returns the status it had.
    pub fn cancel(&self, job: &Arc<Job>) -> Status {
        let removed = {
            let mut queue = self.queue();
            let before = queue.waiting.len();
            queue.waiting.retain(|j| j.id != job.id);
            queue.waiting.len() != before
        };
        job.cancelled.store(true, Ordering::SeqCst);
        job.interrupt.store(true, Ordering::SeqCst);
        let mut state = job.state();
        let status = state.status;
        if removed && status == Status::Queued {
            state.status = Status::Cancelled;
            state.finished = Some(Instant::now());
            job.push_event(&mut state, "cancelled", json!({ "images": 0 }));
            drop(state);
            self.remember_finished(&job.id);
        }
        status
    }

    /// A1111's skip: the job's running iteration stops within a step and the next one starts
    /// (a job on a Redis worker is told through Redis, redis_queue.rs).
    pub fn skip(&self, job: &Job) {
        job.skip.store(true, Ordering::SeqCst);
        job.interrupt.store(true, Ordering::SeqCst);
    }

    /// Records a job queued elsewhere (another front end's, read from Redis); the one
    /// already recorded under its id if another request was first.
    pub(super) fn adopt(&self, job: Arc<Job>) -> (Arc<Job>, bool) {
        let mut jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        match jobs.get(&job.id) {
            Some(known) => (known.clone(), false),
            None => {
                jobs.insert(job.id.clone(), job.clone());
                (job, true)
            }
        }
    }

    /// Shutdown: no new jobs; every job cancelled. Returns a line per job that was cut short.
    pub fn shut_down(&self) -> Vec<String> {
        self.queue().shutting_down = true;
        self.wake.notify_all();
        let mut lines = Vec::new();
        for job in self.all_jobs() {
            let (status, step, steps) = {
                let state = job.state();
                (state.status, state.step, state.steps)
            };
            if status.finished() {
                continue;
            }
            self.cancel(&job);
            lines.push(match status {
                Status::Running => format!("cancelled job {} (running, step {step}/{steps})", job.id),
                _ => format!("cancelled job {} (queued)", job.id),
            });
        }
        lines
    }

    pub(super) fn remember_finished(&self, id: &str) {
        let mut finished = self.finished.lock().unwrap_or_else(|e| e.into_inner());
        finished.push_back(id.to_string());
        while finished.len() > KEEP_FINISHED {
            if let Some(old) = finished.pop_front() {
                self.jobs.lock().unwrap_or_else(|e| e.into_inner()).remove(&old);
            }
        }
    }

    /// The next job for `model`, waiting for one; `None` at shutdown.
    pub(super) fn next_job(&self, model: usize) -> Option<Arc<Job>> {
        let mut queue = self.queue();
        queue.busy[model] = false;
        loop {
            if queue.shutting_down {
                return None;
            }
            if let Some(position) = queue.waiting.iter().position(|j| j.request.model == model) {
                let job = queue.waiting.remove(position).expect("position is in the queue");
                queue.busy[model] = true;
                return Some(job);
            }
            queue = self.wake.wait(queue).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// Resolves and loads one `--model` (`builtin`: the built-in model), with its hash.
fn load_model(spec: &str, dtype: &str) -> Result<(ModelInfo, StableDiffusionPipeline)> {
    let builtin = spec == "builtin" || spec == diffuse::default_model::NAME;
    let path = if builtin {
        diffuse::default_model::materialize(&diffuse::default_model::cache_root())?
    } else {
        diffuse::loading::hub::resolve_model(spec, None, None)?
    };
    let single_file = path.is_file();
    if !single_file && !path.is_dir() {
        bail!("neither a model folder nor a checkpoint file");
    }
    if !single_file && !is_stable_diffusion_folder(&path) {
        bail!("diffuse serve runs Stable Diffusion models; {} is a pixel-space model", path.display());
    }
    let name = if builtin {
        "builtin".to_string()
    } else if Path::new(spec).exists() {
        parameters::model_name(spec)
    } else {
        spec.to_string()
    };
    // What `diffuse generate` puts in args.model: the materialized folder for the built-in model.
    let infotext_name = if builtin { path.display().to_string() } else { spec.to_string() };
    let hashing = parameters::hash_in_background(&path, None);
    let mut args = generate::default_args();
    args.model = Some(infotext_name.clone());
    args.dtype = dtype.to_string();
    let no_loras = loras::Loras { specs: Vec::new(), from_flags: 0 };
    let pipeline = generate::load_pipeline(&args, &path, single_file, &[], &no_loras, &crate::device())?;
    let hash = parameters::finish_hash(hashing, None, false);
    let default_size = pipeline.default_size();
    // As `diffuse generate` decides it (a folder's model_index.json, a single file's UNet).
    let lcm = diffuse::pipelines::stable_diffusion::pipeline_class_name(&path).as_deref() == Some("LatentConsistencyModelPipeline");
    Ok((ModelInfo { name, spec: spec.to_string(), path, single_file, hash, default_size, infotext_name, lcm }, pipeline))
}

/// What a model's worker thread holds: its pipeline, the autoencoder that decodes previews,
/// and the last pipeline loaded with a request's LoRAs (kept for the next request that asks
/// for the same ones).
pub(super) struct Worker {
    pub(super) pipeline: StableDiffusionPipeline,
    pub(super) preview_vae: Option<Autoencoder>,
    pub(super) with_loras: Option<(Vec<String>, StableDiffusionPipeline)>,
}

/// What makes two LoRA lists the same: their files (and when these last changed) and weights.
fn lora_key(specs: &[LoraSpec]) -> Vec<String> {
    specs
        .iter()
        .map(|s| {
            let modified = std::fs::metadata(&s.path).and_then(|m| m.modified()).ok();
            format!("{}|{:?}|{}|{}", s.path.display(), modified, s.unet_weight, s.text_encoder_weight)
        })
        .collect()
}

/// A model's worker: runs its jobs one at a time until shutdown.
fn worker(model: usize, mut worker: Worker, shared: Arc<Shared>) {
    while let Some(job) = shared.next_job(model) {
        run_job(&mut worker, &shared, &job);
        worker.pipeline.interrupt = None;
        if let Some((_, pipeline)) = &mut worker.with_loras {
            pipeline.interrupt = None;
        }
        shared.remember_finished(&job.id);
    }
}

pub(super) fn run_job(pipeline: &mut Worker, shared: &Shared, job: &Arc<Job>) {
    let info = shared.model(job.request.model);
    {
        let mut state = job.state();
        if state.status != Status::Queued {
            return;
        }
        state.status = Status::Running;
        state.started = Some(Instant::now());
        job.push_event(&mut state, "started", json!({ "model": info.name }));
    }
    let mut failure: Option<(String, bool)> = None;
    for iteration in 0..job.request.iterations {
        if job.cancelled.load(Ordering::SeqCst) {
            break;
        }
        job.skip.store(false, Ordering::SeqCst);
        job.interrupt.store(job.cancelled.load(Ordering::SeqCst), Ordering::SeqCst);
        {
            let mut state = job.state();
            state.iteration = iteration;
            state.step = 0;
        }
        let ran = std::panic::catch_unwind(AssertUnwindSafe(|| run_iteration(pipeline, shared, job, iteration)));
        if ran.is_err() {
            // A panic may have left the LoRA pipeline half-made; the preview hook is reset.
            pipeline.with_loras = None;
            pipeline.pipeline.preview = None;
        }
        let interrupted = job.interrupt.load(Ordering::SeqCst);
        match ran {
            Ok(Ok(images)) => job.state().images.extend(images),
            Ok(Err(_)) if interrupted && job.cancelled.load(Ordering::SeqCst) => break,
            Ok(Err(_)) if interrupted && job.skip.load(Ordering::SeqCst) => {
                let mut state = job.state();
                state.skipped += 1;
                job.push_event(&mut state, "skipped", json!({ "iteration": iteration + 1 }));
            }
            Ok(Err(e)) => {
                let invalid = e.chain().any(|c| matches!(c.downcast_ref::<diffuse::Error>(), Some(diffuse::Error::InvalidInput(_))));
                failure = Some((format!("{e:#}"), invalid));
                break;
            }
            Err(panic) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".to_string());
                failure = Some((format!("the generation panicked: {message}"), false));
                break;
            }
        }
    }
    let mut state = job.state();
    state.finished = Some(Instant::now());
    job.drop_preview_image(&mut state);
    if let Some((error, invalid)) = failure {
        state.status = Status::Failed;
        state.error = Some(error.clone());
        state.invalid = invalid;
        job.push_event(&mut state, "failed", json!({ "error": error }));
    } else if job.cancelled.load(Ordering::SeqCst) {
        state.status = Status::Cancelled;
        let images = state.images.len();
        job.push_event(&mut state, "cancelled", json!({ "images": images }));
    } else {
        state.status = Status::Done;
        let images: Vec<Value> = state.images.iter().map(image_json).collect();
        job.push_event(&mut state, "done", json!({ "images": images }));
    }
}

/// An image as the APIs give it.
pub fn image_json(image: &ImageOut) -> Value {
    json!({ "png": image.base64(), "infotext": image.infotext, "seed": image.seed, "width": image.width, "height": image.height })
}

/// One iteration: `diffuse generate`'s own functions on the loaded pipeline (with a fresh
/// scheduler, as loading gives), or on one loaded with the prompt's LoRAs.
fn run_iteration(worker: &mut Worker, shared: &Shared, job: &Arc<Job>, iteration: usize) -> Result<Vec<ImageOut>> {
    let request = &job.request;
    let info = shared.model(request.model);
    let mut args = request.args(&info, shared.lora_dir.as_deref(), &shared.dtype, iteration);
    let seed = request.seed_of(iteration);
    let overrides = request.scheduler_config.clone();
    let mut warnings = Vec::new();
    let mut warn = |warning: String| warnings.push(warning);
    let start = match &request.init {
        Some(init) => Start::image(init.image.clone(), init.mask.clone(), init.strength),
        None => Start::noise(),
    };
    let loras = loras::resolve(&args, &mut warn)?;
    let pipeline = if loras.specs.is_empty() {
        &mut worker.pipeline
    } else {
        let key = lora_key(&loras.specs);
        if worker.with_loras.as_ref().map(|(k, _)| k) != Some(&key) {
            // One LoRA pipeline at a time: the old one goes before the new one loads.
            worker.with_loras = None;
            let pipeline = generate::load_pipeline(&args, &info.path, info.single_file, &overrides, &loras, &crate::device())?;
            worker.with_loras = Some((key, pipeline));
        }
        &mut worker.with_loras.as_mut().expect("just loaded").1
    };
    // A new scheduler for every run, as a pipeline loaded for these arguments has.
    pipeline.scheduler = generate::fresh_scheduler(&args, &info.path, info.single_file, &overrides)?;
    pipeline.interrupt = Some(job.interrupt.clone());
    if request.preview {
        let job = job.clone();
        let sink = Box::new(move |step: usize, images: &candle_core::Tensor| -> diffuse::Result<()> {
            let row = candle_core::Tensor::cat(&images.chunk(images.dim(0)?, 0)?, 3)?;
            let (width, height, channels, pixels) = to_uint8_images(&row)?.swap_remove(0);
            job.set_preview(step, encode_png(width, height, channels, &pixels, &[])?);
            Ok(())
        });
        pipeline.preview = Some(StepPreview { vae: worker.preview_vae.take(), sink });
    }
    let lora_entries = loras::infotext_entries(&loras, true);
    let started = Instant::now();
    let mut on_step = |step: usize, steps: usize| {
        let mut state = job.state();
        state.step = step;
        state.steps = steps;
        state.it_per_s = step as f64 / started.elapsed().as_secs_f64().max(1e-9);
        let data = json!({
            "step": step,
            "steps": steps,
            "iteration": iteration + 1,
            "iterations": request.iterations,
            "it_per_s": (state.it_per_s * 100.0).round() / 100.0,
        });
        job.push_event(&mut state, "step", data);
    };
    let ran = generate::run_pipeline(&mut args, pipeline, &start, seed, &mut on_step, &mut warn);
    if let Some(preview) = pipeline.preview.take() {
        worker.preview_vae = preview.vae;
    }
    job.state().warnings.append(&mut warnings);
    let ran = ran?;
    let labelled = generate::label(&args, &ran.samples, seed, ran.scheduler, overrides, ran.default_eta, true, info.hash.clone(), lora_entries)?;
    labelled
        .into_iter()
        .map(|((width, height, channels, pixels), infotext)| {
            let png = encode_png(width, height, channels, &pixels, &[("parameters", infotext.clone())])?;
            Ok(ImageOut { png, infotext, seed, width, height })
        })
        .collect()
}
