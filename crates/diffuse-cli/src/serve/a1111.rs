//! AUTOMATIC1111's API (`/sdapi/v1/*`), as its clients use it. txt2img and img2img queue a
//! job and answer when it ends (a client that hangs up cancels it); every field A1111 clients
//! send is accepted, and those diffuse does not implement are listed in `info`.
//!
//! A1111 has no job ids: `/progress` reports the running job, and `/interrupt` and `/skip`
//! reach the jobs that came through these routes only (jobs of the native API, which cancels
//! by id, are never stopped by another client's interrupt).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use diffuse::pipelines::metadata::{a1111_sampler_names, png_parameters, split_infotext, A1111_MAPPED_SCHEDULES};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::http::{decode_base64, decode_image, parse_json, ApiError};
use super::jobs::{GenerateRequest, InitImage, Job, Origin, Shared, Status};
use super::native::{check, enqueue, map_sampler, model_index, seed, whole};

/// txt2img's and img2img's fields (A1111's StableDiffusionProcessing*), those diffuse reads;
/// the rest land in `extra` and are reported as ignored.
#[derive(Deserialize)]
struct Request {
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    negative_prompt: Option<String>,
    seed: Option<Value>,
    steps: Option<i64>,
    cfg_scale: Option<f64>,
    width: Option<i64>,
    height: Option<i64>,
    sampler_name: Option<String>,
    sampler_index: Option<String>,
    scheduler: Option<String>,
    batch_size: Option<i64>,
    n_iter: Option<i64>,
    denoising_strength: Option<f64>,
    eta: Option<f64>,
    init_images: Option<Vec<String>>,
    mask: Option<String>,
    inpainting_fill: Option<i64>,
    inpainting_mask_invert: Option<i64>,
    mask_blur: Option<i64>,
    inpaint_full_res: Option<bool>,
    resize_mode: Option<i64>,
    override_settings: Option<Map<String, Value>>,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

/// Fields whose value A1111 clients always send and diffuse has no use for; reported only when
/// they ask for something (not their off value).
fn asks_for_something(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0 && f != -1.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

fn a1111_param(name: &'static str) -> &'static str {
    match name {
        "guidance_scale" => "cfg_scale",
        "strength" => "denoising_strength",
        "scheduler" => "sampler_name",
        other => other,
    }
}

fn request_from(shared: &Shared, raw: Value, img2img: bool) -> Result<(GenerateRequest, Value), ApiError> {
    let parsed: Request = super::http::from_value(raw.clone())?;
    let overrides = parsed.override_settings.clone().unwrap_or_default();
    let checkpoint = overrides.get("sd_model_checkpoint").and_then(Value::as_str);
    let model = model_index(shared, checkpoint, "override_settings.sd_model_checkpoint")?;
    let mut request = GenerateRequest::new(shared, model);
    request.prompt_syntax = "a1111".to_string();
    request.prompt = parsed.prompt.unwrap_or_default();
    request.negative_prompt = parsed.negative_prompt.filter(|n| !n.is_empty());
    let lcm = shared.model(model).lcm;
    request.steps = whole("steps", parsed.steps, request.steps, 0)?;
    request.guidance_scale = parsed.cfg_scale.unwrap_or(if lcm { request.guidance_scale } else { 7.0 });
    request.width = parsed.width.map(|w| whole("width", Some(w), 0, 0)).transpose()?;
    request.height = parsed.height.map(|h| whole("height", Some(h), 0, 0)).transpose()?;
    if let Some(seed) = seed("seed", parsed.seed.as_ref())? {
        request.seed = seed;
    }
    request.batch_size = whole("batch_size", parsed.batch_size, 1, 1)?;
    request.iterations = whole("n_iter", parsed.n_iter, 1, 1)?;
    // `sampler_name` wins over `sampler_index`, which clients send as well (A1111 does the same).
    let sampler_param = if parsed.sampler_name.as_deref().is_some_and(|s| !s.is_empty()) { "sampler_name" } else { "sampler_index" };
    let sampler = parsed.sampler_name.filter(|s| !s.is_empty()).or(parsed.sampler_index.filter(|s| !s.is_empty()));
    let mut notes = Vec::new();
    let mut ignored: Vec<String> = Vec::new();
    if let Some(sampler) = &sampler {
        map_sampler(&mut request, sampler, parsed.scheduler.as_deref(), sampler_param, "scheduler")?;
    }
    // `eta` is DDIM's (A1111's `eta_ddim` setting, or the request's field).
    let eta = parsed.eta.or_else(|| overrides.get("eta_ddim").and_then(Value::as_f64));
    if let Some(eta) = eta {
        if request.scheduler.as_deref() == Some("ddim") {
            request.eta = Some(eta);
        } else if eta != 0.0 && eta != 1.0 {
            notes.push(format!("eta {eta} is ignored: it applies to DDIM only"));
        }
    }
    for (key, value) in &overrides {
        match key.as_str() {
            "sd_model_checkpoint" | "eta_ddim" => {}
            "CLIP_stop_at_last_layers" => {
                let layers = value.as_u64().ok_or_else(|| {
                    ApiError::invalid("override_settings.CLIP_stop_at_last_layers", "CLIP_stop_at_last_layers must be a whole number of at least 1")
                })?;
                // A1111's "Clip skip: 2" is diffusers' clip_skip 1.
                request.clip_skip = (layers > 1).then(|| layers as usize - 1);
            }
            other => ignored.push(format!("override_settings.{other}")),
        }
    }
    if img2img {
        let images = parsed.init_images.unwrap_or_default();
        let Some(first) = images.first() else {
            return Err(ApiError::invalid("init_images", "img2img needs init_images: one image, as base64 or a data: URL"));
        };
        if images.len() > 1 {
            notes.push(format!("{} init images were sent: only the first is used", images.len()));
        }
        let image = decode_image("init_images[0]", first)?;
        let mut mask = parsed.mask.filter(|m| !m.is_empty()).map(|m| decode_image("mask", &m)).transpose()?;
        if let Some(mask) = &mut mask {
            if parsed.inpainting_mask_invert == Some(1) {
                mask.pixels.iter_mut().for_each(|p| *p = 255 - *p);
            }
            if parsed.inpainting_fill.is_some_and(|fill| fill != 1) {
                notes.push("inpainting_fill is ignored: diffusers' inpainting starts from the image noised by the denoising strength".into());
            }
            if parsed.mask_blur.is_some_and(|blur| blur > 0) {
                notes.push("mask_blur is ignored: the mask is used as sent".into());
            }
            if parsed.inpaint_full_res == Some(true) {
                notes.push("inpaint_full_res is ignored: the whole image is inpainted".into());
            }
        }
        if parsed.resize_mode.is_some_and(|mode| mode != 0) {
            notes.push("resize_mode is ignored: the image is resized to width x height (A1111's \"Just resize\")".into());
        }
        let strength = parsed.denoising_strength.unwrap_or(0.75);
        request.init = Some(InitImage { image, mask, strength });
    } else {
        for (field, present) in [
            ("init_images", parsed.init_images.is_some_and(|i| !i.is_empty())),
            ("mask", parsed.mask.is_some_and(|m| !m.is_empty())),
            ("denoising_strength", parsed.denoising_strength.is_some()),
        ] {
            if present {
                ignored.push(field.to_string());
            }
        }
    }
    // Plumbing fields diffuse honours as they are: images are sent, nothing is saved, override
    // settings never outlive the request.
    const HONOURED: &[&str] = &["send_images", "do_not_save_samples", "do_not_save_grid", "override_settings_restore_afterwards"];
    // The hires fix's fields mean nothing unless it is on.
    let hires = parsed.extra.get("enable_hr").is_some_and(asks_for_something);
    let off = |key: &str, value: &Value| {
        (!hires && (key.starts_with("hr_") || key.starts_with("firstphase_")))
            // k-diffusion's noise settings at their defaults.
            || (key == "s_noise" && value.as_f64() == Some(1.0))
            || (key == "s_tmax" && value.as_f64().is_some_and(|v| v.is_infinite()))
    };
    if !img2img && !hires {
        ignored.retain(|field| field != "denoising_strength");
    }
    for (key, value) in &parsed.extra {
        if asks_for_something(value) && !HONOURED.contains(&key.as_str()) && !off(key, value) {
            ignored.push(key.clone());
        }
    }
    if parsed.extra.iter().any(|(k, v)| (k.starts_with("subseed") || k.starts_with("seed_resize")) && asks_for_something(v)) {
        notes.push("subseed fields are ignored: diffuse draws each batch from one generator, as `diffuse generate --num-images`".into());
    }
    ignored.sort();
    ignored.dedup();
    request.notes = notes;
    request.ignored_fields = ignored;
    check(shared, &request, &a1111_param)?;
    // The echo of the request (A1111 answers with it, without the images).
    let mut echo = raw;
    if let Some(map) = echo.as_object_mut() {
        for key in ["init_images", "mask"] {
            if map.contains_key(key) {
                map.insert(key.to_string(), Value::Null);
            }
        }
    }
    Ok((request, echo))
}

/// Cancels a job whose client has gone (the handler's future is dropped) before it ended.
struct CancelOnDrop {
    shared: Arc<Shared>,
    job: Arc<Job>,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if !self.job.status().finished() {
            self.shared.cancel(&self.job);
        }
    }
}

/// Queues a job and waits for it (cancelling it if the client hangs up).
pub async fn run_to_end(shared: &Arc<Shared>, request: GenerateRequest, origin: Origin) -> Result<Arc<Job>, ApiError> {
    let job = enqueue(shared, request, origin)?;
    let guard = CancelOnDrop { shared: shared.clone(), job: job.clone() };
    job.finished().await;
    drop(guard);
    let state = job.state();
    if state.status == Status::Failed {
        let error = state.error.clone().unwrap_or_default();
        return Err(if state.invalid {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request_error", error)
        } else {
            ApiError::internal(format!("the generation failed: {error}"))
        });
    }
    drop(state);
    Ok(job)
}

async fn generate(shared: Arc<Shared>, body: Result<Bytes, BytesRejection>, img2img: bool) -> Result<Json<Value>, ApiError> {
    let raw: Value = parse_json(body)?;
    if !raw.is_object() {
        return Err(ApiError::bad("body", "the body must be a JSON object"));
    }
    // Decoding images is work for a blocking thread, not the async runtime's.
    let checking = shared.clone();
    let (request, echo) = tokio::task::spawn_blocking(move || request_from(&checking, raw, img2img))
        .await
        .map_err(|e| ApiError::internal(format!("the request check failed: {e}")))??;
    let job = run_to_end(&shared, request, Origin::A1111).await?;
    let state = job.state();
    let request = &job.request;
    let model = shared.model(request.model);
    let images: Vec<String> = state.images.iter().map(|i| i.base64()).collect();
    let seeds: Vec<u64> = state.images.iter().map(|i| i.seed).collect();
    let infotexts: Vec<&str> = state.images.iter().map(|i| i.infotext.as_str()).collect();
    let n = images.len();
    let (width, height) = state.images.first().map(|i| (i.width, i.height)).unwrap_or_default();
    let sampler = state
        .images
        .first()
        .and_then(|i| diffuse::pipelines::metadata::parse_infotext(&i.infotext).ok())
        .and_then(|p| p.sampler);
    let info = json!({
        "prompt": request.prompt,
        "all_prompts": vec![&request.prompt; n],
        "negative_prompt": request.negative_prompt.clone().unwrap_or_default(),
        "all_negative_prompts": vec![request.negative_prompt.clone().unwrap_or_default(); n],
        "seed": request.seed,
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": vec![-1; n],
        "subseed_strength": 0,
        "width": width,
        "height": height,
        "sampler_name": sampler,
        "cfg_scale": request.guidance_scale,
        "steps": request.steps,
        "batch_size": request.batch_size,
        "n_iter": request.iterations,
        "restore_faces": false,
        "sd_model_name": model.name,
        "sd_model_hash": model.hash,
        "denoising_strength": request.init.as_ref().map(|i| i.strength),
        "clip_skip": request.clip_skip.map(|c| c + 1).unwrap_or(1),
        "infotexts": infotexts,
        "styles": [],
        "job_timestamp": job.created.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default().to_string(),
        "index_of_first_image": 0,
        "is_using_inpainting_conditioning": false,
        "version": format!("diffuse {}", env!("CARGO_PKG_VERSION")),
        "job_id": job.id,
        "interrupted": state.status == Status::Cancelled,
        "skipped_iterations": state.skipped,
        "ignored_fields": request.ignored_fields,
        "notes": request.notes,
        "warnings": state.warnings,
    });
    drop(state);
    job.forget_images();
    Ok(Json(json!({ "images": images, "parameters": echo, "info": info.to_string() })))
}

/// POST /sdapi/v1/txt2img.
pub async fn txt2img(State(shared): State<Arc<Shared>>, body: Result<Bytes, BytesRejection>) -> Result<Json<Value>, ApiError> {
    generate(shared, body, false).await
}

/// POST /sdapi/v1/img2img (with `mask`: inpainting).
pub async fn img2img(State(shared): State<Arc<Shared>>, body: Result<Bytes, BytesRejection>) -> Result<Json<Value>, ApiError> {
    generate(shared, body, true).await
}

/// GET /sdapi/v1/progress: the running job (the oldest, if several models run at once).
pub async fn progress(State(shared): State<Arc<Shared>>) -> Json<Value> {
    let jobs = shared.all_jobs();
    let running: Vec<&Arc<Job>> = jobs.iter().filter(|j| j.status() == Status::Running).collect();
    // Running and waiting (here or, with --queue, in Redis, not yet started by a worker).
    let job_count = jobs.iter().filter(|j| !j.status().finished()).count();
    let Some(job) = running.first() else {
        return Json(json!({
            "progress": 0.0,
            "eta_relative": 0.0,
            "state": {
                "skipped": false, "interrupted": false, "job": "", "job_count": job_count, "job_timestamp": "0",
                "job_no": 0, "sampling_step": 0, "sampling_steps": 0,
            },
            "current_image": null,
            "textinfo": null,
        }));
    };
    let state = job.state();
    let progress = job.progress(&state);
    let current_image = state.preview.as_ref().map(|png| {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(png)
    });
    let elapsed = state.started.map(|s| s.elapsed().as_secs_f64()).unwrap_or_default();
    let eta = if progress > 0.0 { elapsed / progress - elapsed } else { 0.0 };
    Json(json!({
        "progress": progress,
        "eta_relative": eta,
        "state": {
            "skipped": job.skip.load(Ordering::SeqCst),
            "interrupted": job.cancelled.load(Ordering::SeqCst),
            "job": format!("job {}", job.id),
            "job_count": job_count,
            "job_timestamp": job.created.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default().to_string(),
            "job_no": state.iteration,
            "sampling_step": state.step,
            "sampling_steps": state.steps,
        },
        "current_image": current_image,
        "textinfo": format!("step {}/{}", state.step, state.steps),
    }))
}

fn running_a1111_jobs(shared: &Shared) -> Vec<Arc<Job>> {
    shared.all_jobs().into_iter().filter(|j| j.origin == Origin::A1111 && j.status() == Status::Running).collect()
}

/// POST /sdapi/v1/interrupt: the running A1111 jobs stop within a step and answer with the
/// images they have.
pub async fn interrupt(State(shared): State<Arc<Shared>>) -> Json<Value> {
    let jobs = running_a1111_jobs(&shared);
    for job in &jobs {
        shared.cancel(job);
    }
    Json(json!({ "interrupted": jobs.iter().map(|j| j.id.clone()).collect::<Vec<_>>() }))
}

/// POST /sdapi/v1/skip: the running A1111 jobs drop their current batch and go on.
pub async fn skip(State(shared): State<Arc<Shared>>) -> Json<Value> {
    let jobs = running_a1111_jobs(&shared);
    for job in &jobs {
        shared.skip(job);
    }
    Json(json!({ "skipped": jobs.iter().map(|j| j.id.clone()).collect::<Vec<_>>() }))
}

/// GET /sdapi/v1/samplers: the A1111 samplers diffuse maps (each with its diffuse scheduler).
pub async fn samplers() -> Json<Value> {
    Json(a1111_sampler_names().iter().map(|(a1111, diffuse)| json!({ "name": a1111, "aliases": [diffuse], "options": {} })).collect())
}

/// GET /sdapi/v1/schedulers: the schedule types that have a diffusers equivalent.
pub async fn schedulers() -> Json<Value> {
    Json(
        A1111_MAPPED_SCHEDULES
            .iter()
            .map(|label| json!({ "name": label.to_ascii_lowercase(), "label": label, "aliases": null, "default_rho": -1, "need_inner_model": false }))
            .collect(),
    )
}

/// GET /sdapi/v1/sd-models: the loaded models.
pub async fn sd_models(State(shared): State<Arc<Shared>>) -> Json<Value> {
    Json(
        shared
            .models()
            .iter()
            .map(|(_, m)| json!({ "title": m.title(), "model_name": m.name, "hash": m.hash, "sha256": null, "filename": m.path, "config": null }))
            .collect(),
    )
}

/// GET /sdapi/v1/loras: the LoRAs in --lora-dir.
pub async fn loras(State(shared): State<Arc<Shared>>) -> Json<Value> {
    let mut loras = Vec::new();
    if let Some(dir) = &shared.lora_dir {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten() {
                let path = entry.path();
                if path.extension().and_then(|e| e.to_str()) == Some("safetensors") {
                    let name = path.file_stem().unwrap_or_default().to_string_lossy().into_owned();
                    loras.push(json!({ "name": name, "alias": name, "path": path, "metadata": {} }));
                }
            }
        }
    }
    loras.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    Json(Value::Array(loras))
}

/// GET /sdapi/v1/scripts: diffuse runs no A1111 scripts.
pub async fn scripts() -> Json<Value> {
    Json(json!({ "txt2img": [], "img2img": [] }))
}

/// GET /sdapi/v1/options: the settings diffuse has.
pub async fn options(State(shared): State<Arc<Shared>>) -> Json<Value> {
    let Some(model) = shared.find_model(None).map(|i| shared.model(i)) else {
        return Json(json!({ "sd_model_checkpoint": null, "CLIP_stop_at_last_layers": 1, "eta_ddim": 0.0, "samples_format": "png" }));
    };
    Json(json!({
        "sd_model_checkpoint": model.title(),
        "sd_checkpoint_hash": model.hash,
        "CLIP_stop_at_last_layers": 1,
        "eta_ddim": 0.0,
        "samples_format": "png",
    }))
}

/// POST /sdapi/v1/options: `sd_model_checkpoint` chooses the default model among the loaded
/// ones; other settings are ignored.
pub async fn set_options(State(shared): State<Arc<Shared>>, body: Result<Bytes, BytesRejection>) -> Result<Json<Value>, ApiError> {
    let options: Map<String, Value> = parse_json(body)?;
    if let Some(checkpoint) = options.get("sd_model_checkpoint") {
        let name = checkpoint.as_str().ok_or_else(|| ApiError::bad("sd_model_checkpoint", "sd_model_checkpoint must be a string"))?;
        let index = model_index(&shared, Some(name), "sd_model_checkpoint")?;
        shared.default_model.store(index, Ordering::Relaxed);
    }
    Ok(Json(Value::Null))
}

#[derive(Deserialize)]
struct PngInfoRequest {
    image: String,
}

/// POST /sdapi/v1/png-info: a PNG's infotext, whole and taken apart.
pub async fn png_info(body: Result<Bytes, BytesRejection>) -> Result<Json<Value>, ApiError> {
    let request: PngInfoRequest = parse_json(body)?;
    let bytes = decode_base64("image", &request.image)?;
    let text = png_parameters(&bytes, "image").map_err(|e| ApiError::bad("image", e.to_string()))?;
    let Some(text) = text else {
        return Ok(Json(json!({ "info": "", "items": {}, "parameters": {} })));
    };
    let parts = split_infotext(&text);
    let mut parameters = Map::new();
    parameters.insert("Prompt".into(), json!(parts.prompt));
    parameters.insert("Negative prompt".into(), json!(parts.negative_prompt));
    for (key, value) in parts.pairs {
        if key == "Size" {
            if let Some((w, h)) = value.split_once('x') {
                parameters.insert("Size-1".into(), json!(w));
                parameters.insert("Size-2".into(), json!(h));
            }
        }
        parameters.insert(key, json!(value));
    }
    Ok(Json(json!({ "info": text, "items": { "parameters": text }, "parameters": parameters })))
}
