//! The native job API: `POST /v1/jobs` queues a job and answers 202 with its id at once;
//! `GET /v1/jobs/{id}` says where it is (queued with its position, running with its step,
//! done with its images, failed with the error, cancelled); `GET /v1/jobs/{id}/events`
//! streams its events as server-sent events, from the first (a late subscriber misses
//! nothing); `DELETE /v1/jobs/{id}` cancels that job and no other.
//!
//! Also the checks every API's requests go through (`check`).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::IntoResponse;
use axum::Json;
use diffuse::pipelines::metadata::scheduler_from_a1111;
use diffuse::pipelines::SCHEDULER_NAMES;
use diffuse::prompts::PromptSyntax;
use futures_util::Stream;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::http::{decode_image, parse_json, ApiError};
use super::jobs::{image_json, GenerateRequest, InitImage, Job, Origin, Shared, Status};
use crate::generate::{self, loras};

/// A job as `diffuse generate`'s flags name its settings.
#[derive(Deserialize)]
pub struct JobRequest {
    model: Option<String>,
    prompt: Option<String>,
    negative_prompt: Option<String>,
    steps: Option<i64>,
    guidance_scale: Option<f64>,
    guidance_rescale: Option<f64>,
    width: Option<i64>,
    height: Option<i64>,
    seed: Option<Value>,
    /// A diffuse scheduler name (`diffuse schedulers`).
    scheduler: Option<String>,
    /// Or an AUTOMATIC1111 sampler name, with its schedule type.
    sampler: Option<String>,
    schedule_type: Option<String>,
    scheduler_config: Option<Map<String, Value>>,
    eta: Option<f64>,
    clip_skip: Option<i64>,
    prompt_syntax: Option<String>,
    num_images: Option<i64>,
    iterations: Option<i64>,
    init_image: Option<String>,
    mask: Option<String>,
    strength: Option<f64>,
    /// Live previews after every step (default: the server's --preview).
    preview: Option<bool>,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

/// A whole number field: at least `min`.
pub fn whole(param: &str, value: Option<i64>, default: usize, min: usize) -> Result<usize, ApiError> {
    match value {
        None => Ok(default),
        Some(v) if v >= min as i64 => Ok(v as usize),
        Some(v) => Err(ApiError::invalid(param, format!("{param} must be at least {min}, got {v}"))),
    }
}

/// A seed: a whole number from 0 to 2⁶⁴-1; -1 or null is a random one.
pub fn seed(param: &str, value: Option<&Value>) -> Result<Option<u64>, ApiError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) if n.as_i64() == Some(-1) => Ok(None),
        Some(Value::Number(n)) if n.as_u64().is_some() => Ok(n.as_u64()),
        Some(Value::Number(n)) if n.as_f64().is_some_and(|f| f >= 0.0 && f.fract() == 0.0 && f < 1.8e19) => Ok(n.as_f64().map(|f| f as u64)),
        Some(other) => Err(ApiError::invalid(param, format!("{param} must be a whole number from 0 to 2^64-1, or -1 for a random one; got {other}"))),
    }
}

/// An A1111 sampler and schedule type as a diffuse scheduler and overrides.
pub fn map_sampler(request: &mut GenerateRequest, sampler: &str, schedule: Option<&str>, sampler_param: &str, schedule_param: &str) -> Result<(), ApiError> {
    let (name, overrides) = match scheduler_from_a1111(sampler, Some(schedule.unwrap_or("Automatic"))) {
        Ok(choice) => choice,
        Err(e) => {
            // The sampler alone maps: the schedule type is what has no equivalent.
            let param = if schedule.is_some() && scheduler_from_a1111(sampler, Some("Automatic")).is_ok() { schedule_param } else { sampler_param };
            return Err(ApiError::invalid(param, e.to_string()));
        }
    };
    request.scheduler = Some(name);
    request.scheduler_config.extend(overrides);
    Ok(())
}

/// The checks every request goes through before it is queued: the server's limits, names
/// that must exist, numbers in range. `param` gives the API's name of each field.
pub fn check(shared: &Shared, request: &GenerateRequest, param: &dyn Fn(&'static str) -> &'static str) -> Result<(), ApiError> {
    let limits = &shared.limits;
    if request.steps == 0 || request.steps > limits.max_steps {
        return Err(ApiError::invalid(param("steps"), format!("{} must be from 1 to {} (the server's --max-steps), got {}", param("steps"), limits.max_steps, request.steps)));
    }
    for (name, value) in [("width", request.width), ("height", request.height)] {
        if let Some(value) = value {
            if value == 0 || value % 8 != 0 {
                return Err(ApiError::invalid(param(name), format!("{} must be a positive multiple of 8, got {value}", param(name))));
            }
            if value > limits.max_size {
                return Err(ApiError::invalid(param(name), format!("{} must be at most {} (the server's --max-size), got {value}", param(name), limits.max_size)));
            }
        }
    }
    let images = request.batch_size.saturating_mul(request.iterations);
    if request.batch_size == 0 || request.iterations == 0 || images > limits.max_images {
        return Err(ApiError::invalid(
            param("batch_size"),
            format!("a request may ask for 1 to {} images (the server's --max-images), got {images}", limits.max_images),
        ));
    }
    for (name, value) in [("guidance_scale", request.guidance_scale), ("guidance_rescale", request.guidance_rescale)] {
        if !value.is_finite() {
            return Err(ApiError::invalid(param(name), format!("{} must be a finite number", param(name))));
        }
    }
    if let Some(eta) = request.eta.filter(|eta| !eta.is_finite() || *eta < 0.0) {
        return Err(ApiError::invalid(param("eta"), format!("eta must be a number of at least 0, got {eta}")));
    }
    if let Some(init) = &request.init {
        if !(0.0..=1.0).contains(&init.strength) {
            return Err(ApiError::invalid(param("strength"), format!("{} must be from 0 to 1, got {}", param("strength"), init.strength)));
        }
    }
    if let Some(name) = &request.scheduler {
        if !SCHEDULER_NAMES.iter().any(|(n, ..)| n == name) {
            let names: Vec<&str> = SCHEDULER_NAMES.iter().map(|(n, ..)| *n).collect();
            return Err(ApiError::invalid(param("scheduler"), format!("unknown scheduler `{name}`; valid names: {}", names.join(", "))));
        }
    }
    // Scheduler overrides are config values: plain flags, names and modest numbers (a huge
    // `num_train_timesteps` or a `trained_betas` list would size the scheduler's tables).
    for (key, value) in &request.scheduler_config {
        let plain = match value {
            Value::Bool(_) | Value::String(_) | Value::Null => true,
            Value::Number(n) => n.as_f64().is_some_and(|v| v.abs() <= 1e4),
            Value::Array(_) | Value::Object(_) => false,
        };
        if !plain || key == "trained_betas" {
            return Err(ApiError::invalid(
                "scheduler_config",
                format!("scheduler_config.{key}: the server takes flags, names and numbers up to 10^4 here, not {value}"),
            ));
        }
    }
    check_schedule(shared, request, param)?;
    let syntax: PromptSyntax =
        request.prompt_syntax.parse().map_err(|e: diffuse::Error| ApiError::invalid(param("prompt_syntax"), e.to_string()))?;
    if syntax == PromptSyntax::A1111 {
        for (name, prompt) in [("prompt", Some(&request.prompt)), ("negative_prompt", request.negative_prompt.as_ref())] {
            if let Some(prompt) = prompt {
                diffuse::prompts::a1111::parse_prompt_attention(prompt).map_err(|e| ApiError::invalid(param(name), e.to_string()))?;
            }
        }
    }
    // `<lora:...>` tags name files that must exist.
    let args = request.args(&shared.model(request.model), shared.lora_dir.as_deref(), &shared.dtype, 0);
    loras::resolve(&args, &mut |_| {}).map_err(|e| ApiError::invalid(param("prompt"), format!("{e:#}")))?;
    Ok(())
}

/// Whether the scheduler the job would run can schedule its steps: the library's own checks
/// (`set_timesteps`: at least one step, no more than the training timesteps, LCM's distillation
/// schedule), run on the scheduler the worker would build for this request, before it is
/// queued. A model whose files are not on this machine (a Redis worker's elsewhere) is left to
/// its worker, whose failure the job then reports.
fn check_schedule(shared: &Shared, request: &GenerateRequest, param: &dyn Fn(&'static str) -> &'static str) -> Result<(), ApiError> {
    let info = shared.model(request.model);
    if !info.path.exists() {
        return Ok(());
    }
    let args = request.args(&info, shared.lora_dir.as_deref(), &shared.dtype, 0);
    let field = if request.scheduler_config.is_empty() { param("scheduler") } else { "scheduler_config" };
    let refused = |e: anyhow::Error, field: &str| {
        let invalid = e.chain().any(|c| matches!(c.downcast_ref::<diffuse::Error>(), Some(diffuse::Error::InvalidInput(_) | diffuse::Error::Config { .. })));
        if invalid {
            ApiError::invalid(field, format!("{e:#}"))
        } else {
            ApiError::internal(format!("cannot build the scheduler to check the request: {e:#}"))
        }
    };
    let mut resolved = generate::fresh_scheduler(&args, &info.path, info.single_file, &request.scheduler_config).map_err(|e| refused(e, field))?;
    // LCM's image-to-image applies strength in set_timesteps (as its pipeline runs it).
    let lcm_image_to_image = info.lcm && resolved.class_name == "LCMScheduler" && request.init.as_ref().is_some_and(|init| init.mask.is_none());
    let scheduled = match &request.init {
        Some(init) if lcm_image_to_image => resolved.scheduler.set_timesteps_with_strength(request.steps, init.strength),
        _ => resolved.scheduler.set_timesteps(request.steps),
    };
    scheduled.map_err(|e| {
        let steps = param("steps");
        ApiError::invalid(steps, format!("{steps}: {e}"))
    })
}

fn same_name(name: &'static str) -> &'static str {
    match name {
        "batch_size" => "num_images",
        other => other,
    }
}

/// Queues a checked request: 429 (with Retry-After) when the queue is full.
pub fn enqueue(shared: &Shared, request: GenerateRequest, origin: Origin) -> Result<Arc<Job>, ApiError> {
    shared.submit(request, origin).map_err(ApiError::queue_full)
}

/// The model a request names (`model` field), or the default.
pub fn model_index(shared: &Shared, name: Option<&str>, param: &str) -> Result<usize, ApiError> {
    shared.find_model(name).ok_or_else(|| {
        let names: Vec<String> = shared.models().into_iter().map(|(_, m)| m.name.clone()).collect();
        ApiError::invalid(param, format!("no model `{}` is loaded; loaded: {}", name.unwrap_or_default(), names.join(", ")))
    })
}

impl JobRequest {
    fn into_request(self, shared: &Shared) -> Result<GenerateRequest, ApiError> {
        let model = model_index(shared, self.model.as_deref(), "model")?;
        let mut request = GenerateRequest::new(shared, model);
        request.prompt = self.prompt.unwrap_or_default();
        request.negative_prompt = self.negative_prompt;
        request.steps = whole("steps", self.steps, request.steps, 0)?;
        request.guidance_scale = self.guidance_scale.unwrap_or(request.guidance_scale);
        request.guidance_rescale = self.guidance_rescale.unwrap_or(request.guidance_rescale);
        request.width = self.width.map(|w| whole("width", Some(w), 0, 0)).transpose()?;
        request.height = self.height.map(|h| whole("height", Some(h), 0, 0)).transpose()?;
        if let Some(seed) = seed("seed", self.seed.as_ref())? {
            request.seed = seed;
        }
        match (self.scheduler, self.sampler) {
            (Some(_), Some(_)) => return Err(ApiError::invalid("sampler", "give scheduler (a diffuse name) or sampler (an AUTOMATIC1111 name), not both")),
            (Some(name), None) => request.scheduler = Some(name),
            (None, Some(sampler)) => map_sampler(&mut request, &sampler, self.schedule_type.as_deref(), "sampler", "schedule_type")?,
            (None, None) => {}
        }
        request.scheduler_config.extend(self.scheduler_config.unwrap_or_default());
        request.eta = self.eta;
        request.clip_skip = self.clip_skip.map(|c| whole("clip_skip", Some(c), 0, 0)).transpose()?;
        if let Some(syntax) = self.prompt_syntax {
            request.prompt_syntax = syntax;
        }
        request.batch_size = whole("num_images", self.num_images, 1, 1)?;
        request.iterations = whole("iterations", self.iterations, 1, 1)?;
        match (self.init_image, self.mask) {
            (Some(image), mask) => {
                let image = decode_image("init_image", &image)?;
                let mask = mask.map(|m| decode_image("mask", &m)).transpose()?;
                let strength = self.strength.unwrap_or(if mask.is_some() { 1.0 } else { 0.8 });
                request.init = Some(InitImage { image, mask, strength });
            }
            (None, Some(_)) => return Err(ApiError::invalid("mask", "a mask needs an init_image to inpaint")),
            (None, None) if self.strength.is_some() => return Err(ApiError::invalid("strength", "strength needs an init_image")),
            (None, None) => {}
        }
        request.preview = self.preview.unwrap_or(request.preview);
        request.ignored_fields = self.extra.keys().cloned().collect();
        check(shared, &request, &|name| match name {
            "batch_size" => "num_images",
            other => same_name(other),
        })?;
        Ok(request)
    }
}

/// POST /v1/jobs → 202 `{"id", "status", "position"}`.
pub async fn submit(State(shared): State<Arc<Shared>>, body: Result<Bytes, BytesRejection>) -> Result<impl IntoResponse, ApiError> {
    let request: JobRequest = parse_json(body)?;
    // Decoding images is work for a blocking thread, not the async runtime's.
    let checking = shared.clone();
    let request = tokio::task::spawn_blocking(move || request.into_request(&checking))
        .await
        .map_err(|e| ApiError::internal(format!("the request check failed: {e}")))??;
    let job = enqueue(&shared, request, Origin::Native)?;
    let position = shared.position(&job);
    let mut body = json!({ "id": job.id, "status": job.status().name(), "url": format!("/v1/jobs/{}", job.id) });
    if let Some(position) = position {
        body["position"] = json!(position);
    }
    if !job.request.ignored_fields.is_empty() {
        body["ignored_fields"] = json!(job.request.ignored_fields);
    }
    Ok((StatusCode::ACCEPTED, Json(body)))
}

/// A job as GET /v1/jobs/{id} answers.
pub fn job_json(shared: &Shared, job: &Job) -> Value {
    let state = job.state();
    let model = shared.model(job.request.model);
    let mut body = json!({
        "id": job.id,
        "status": state.status.name(),
        "model": model.name,
        "created": job.created.duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or_default(),
        "progress": job.progress(&state),
        "seed": job.request.seed,
        "iterations": job.request.iterations,
        "num_images": job.request.batch_size,
    });
    match state.status {
        Status::Queued => {
            drop(state);
            body["position"] = json!(shared.position(job));
            return body;
        }
        Status::Running => {
            body["step"] = json!(state.step);
            body["steps"] = json!(state.steps);
            body["iteration"] = json!(state.iteration + 1);
            body["it_per_s"] = json!((state.it_per_s * 100.0).round() / 100.0);
        }
        Status::Done | Status::Cancelled => {
            body["images"] = state.images.iter().map(image_json).collect();
            if state.delivered {
                body["images_delivered"] = json!(true);
            }
        }
        Status::Failed => {
            body["error"] = json!(state.error);
        }
    }
    if !state.warnings.is_empty() {
        body["warnings"] = json!(state.warnings);
    }
    if !job.request.ignored_fields.is_empty() {
        body["ignored_fields"] = json!(job.request.ignored_fields);
    }
    body
}

/// The job `id`: one this server knows, or (with --queue) one another front end queued,
/// looked up in Redis.
async fn find(shared: &Arc<Shared>, id: &str) -> Result<Arc<Job>, ApiError> {
    if let Some(job) = shared.job(id) {
        return Ok(job);
    }
    let not_found = || ApiError::not_found(format!("no job `{id}` (finished jobs are kept for a while, then forgotten)"));
    if shared.redis.get().is_none() {
        return Err(not_found());
    }
    let (looking, wanted) = (shared.clone(), id.to_string());
    let found = tokio::task::spawn_blocking(move || super::redis_queue::attach(&looking, &wanted))
        .await
        .map_err(|e| ApiError::internal(format!("the job lookup failed: {e}")))?
        .map_err(|e| ApiError::internal(format!("cannot look job {id} up in Redis: {e:#}")))?;
    found.ok_or_else(not_found)
}

/// GET /v1/jobs/{id}.
pub async fn status(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let job = find(&shared, &id).await?;
    Ok(Json(job_json(&shared, &job)))
}

/// GET /v1/jobs: every job the server remembers, without images.
pub async fn list(State(shared): State<Arc<Shared>>) -> Json<Value> {
    let jobs: Vec<Value> = shared
        .all_jobs()
        .iter()
        .map(|job| {
            let mut body = job_json(&shared, job);
            if let Some(map) = body.as_object_mut() {
                map.remove("images");
            }
            body
        })
        .collect();
    Json(json!({ "jobs": jobs }))
}

/// DELETE /v1/jobs/{id}: cancels that job (a running one within one step).
pub async fn cancel(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let job = find(&shared, &id).await?;
    let before = job.status();
    if matches!(before, Status::Done | Status::Failed) {
        return Err(ApiError::new(StatusCode::CONFLICT, "conflict", format!("job {id} has already finished ({})", before.name())));
    }
    shared.cancel(&job);
    Ok(Json(json!({ "id": id, "status": job.status().name(), "was": before.name() })))
}

/// GET /v1/jobs/{id}/events: every event of the job as server-sent events, from the first;
/// the stream ends after `done`, `failed` or `cancelled`.
pub async fn events(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let job = find(&shared, &id).await?;
    let watcher = job.subscribe();
    let stream = futures_util::stream::unfold((job, watcher, 0usize, false), |(job, mut watcher, next, ended)| async move {
        if ended {
            return None;
        }
        loop {
            let event = job.state().events.get(next).cloned();
            if let Some((name, data)) = event {
                let last = matches!(name, "done" | "failed" | "cancelled");
                let event = Event::default().event(name).data(data.to_string());
                return Some((Ok(event), (job, watcher, next + 1, last)));
            }
            if watcher.changed().await.is_err() {
                return None;
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}
