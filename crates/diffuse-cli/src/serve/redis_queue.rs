//! The job queue in Redis: `diffuse serve --queue redis://HOST/` puts jobs there and
//! `diffuse worker --queue redis://HOST/ --model M` runs them, on any number of machines.
//!
//! - `diffuse:models` (hash): each worker's models, name → ModelInfo as JSON.
//! - `diffuse:models:alive` (sorted set): model name → until when (Redis's clock, in ms) a
//!   worker serves it; each worker pushes that on every few seconds while it runs. A front
//!   end reads the live set every second: a model a worker registers later is served from
//!   then on, and one no worker has served for a while is no longer listed or accepted.
//! - `diffuse:jobs:{model}` (stream, consumer group `workers`): one entry per job (`id`,
//!   `request` as JSON). A worker reads with XREADGROUP and acknowledges with XACK once the
//!   job's end is stored; while it runs a job it re-claims the entry now and then, so the
//!   entry stays fresh. An entry idle longer than `--claim-after-secs` (its worker died) is
//!   taken over by another worker with XAUTOCLAIM and run again: no job is lost.
//! - `diffuse:job:{id}:events` (stream): the job's events (`name`, `data` as JSON), as the
//!   local queue records them; the front end follows it and mirrors it into its own job, so
//!   every route answers as with local models.
//! - `diffuse:job:{id}`: the job as the front end queued it (`request`, `model`, `origin`,
//!   `created`, its stream `entry`), so that any front end answers for it (GET, events, DELETE).
//! - `diffuse:job:{id}:cancel`: set by the front end (DELETE, interrupt); checked each step.
//! - `diffuse:job:{id}:skip`: set by the front end (A1111's skip) to the iteration to skip
//!   (from 1); taken (GETDEL) by the worker at its next event.
//! - `diffuse:job:{id}:preview`: the latest live preview (its `preview` event carries only the
//!   step, so the stream does not keep every preview's image).
//! - `diffuse:job:{id}:done`: set with SET NX in one script with the final event and the
//!   XACK (and XDEL of the entry), so a job ends exactly once even when two workers ran it.
//!
//! Every job key expires after the result TTL.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use base64::Engine;
use diffuse::pipelines::image_processor::Image8;
use redis::streams::{StreamAutoClaimReply, StreamReadReply};
use serde_json::{json, Value};

use super::jobs::{self, GenerateRequest, ImageOut, InitImage, Job, ModelInfo, Origin, Shared, Status, Worker};

const GROUP: &str = "workers";
const MODELS: &str = "diffuse:models";
const ALIVE: &str = "diffuse:models:alive";
/// How often a worker says its models are served, and how long each saying lasts.
const HEARTBEAT: Duration = Duration::from_secs(2);
const ALIVE_FOR: Duration = Duration::from_secs(10);

/// Marks models (ARGV[2..]) served until Redis's now + ARGV[1] ms (a later mark is kept).
const MARK_ALIVE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'GT', now + tonumber(ARGV[1]), ARGV[i])
end
return now
"#;

/// The models some worker serves now.
const LIVE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')
"#;

/// A Redis worker's settings.
pub struct WorkerConfig {
    pub url: String,
    /// How long a job's entry may sit unacknowledged and untouched before another worker takes it.
    pub claim_after: Duration,
    /// How long a job's keys (events, result) live.
    pub ttl_secs: u64,
}

/// Set at SIGTERM: workers take no new job, finish the one they run, and stop.
pub static STOP: AtomicBool = AtomicBool::new(false);
/// Worker threads still running.
pub static RUNNING: AtomicUsize = AtomicUsize::new(0);

fn jobs_key(model: &str) -> String {
    format!("diffuse:jobs:{model}")
}
fn events_key(id: &str) -> String {
    format!("diffuse:job:{id}:events")
}
fn cancel_key(id: &str) -> String {
    format!("diffuse:job:{id}:cancel")
}
fn preview_key(id: &str) -> String {
    format!("diffuse:job:{id}:preview")
}
fn done_key(id: &str) -> String {
    format!("diffuse:job:{id}:done")
}
fn skip_key(id: &str) -> String {
    format!("diffuse:job:{id}:skip")
}
fn record_key(id: &str) -> String {
    format!("diffuse:job:{id}")
}

pub fn connect(url: &str) -> Result<redis::Connection> {
    let client = redis::Client::open(url).with_context(|| format!("--queue {url}"))?;
    client.get_connection_with_timeout(Duration::from_secs(5)).with_context(|| format!("cannot reach Redis at {url}"))
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}
fn unb64(text: &str) -> Result<Vec<u8>> {
    Ok(base64::engine::general_purpose::STANDARD.decode(text)?)
}

fn model_json(info: &ModelInfo) -> Value {
    json!({
        "name": info.name, "spec": info.spec, "path": info.path, "single_file": info.single_file,
        "hash": info.hash, "default_size": [info.default_size.0, info.default_size.1],
        "infotext_name": info.infotext_name, "lcm": info.lcm,
    })
}

fn model_from_json(value: &Value) -> Result<ModelInfo> {
    let text = |key: &str| value[key].as_str().map(str::to_string).ok_or_else(|| anyhow!("model record without {key}"));
    Ok(ModelInfo {
        name: text("name")?,
        spec: text("spec")?,
        path: PathBuf::from(text("path")?),
        single_file: value["single_file"].as_bool().unwrap_or(false),
        hash: value["hash"].as_str().map(str::to_string),
        default_size: (
            value["default_size"][0].as_u64().unwrap_or(512) as usize,
            value["default_size"][1].as_u64().unwrap_or(512) as usize,
        ),
        infotext_name: text("infotext_name")?,
        lcm: value["lcm"].as_bool().unwrap_or(false),
    })
}

/// Records this process's models for front ends, and keeps saying they are served (a
/// thread, until STOP).
pub fn register(url: &str, shared: &Shared) -> Result<()> {
    let mut con = connect(url)?;
    let mut names = Vec::new();
    for (_, info) in shared.models() {
        let _: () = redis::cmd("HSET").arg(MODELS).arg(&info.name).arg(model_json(&info).to_string()).query(&mut con)?;
        ensure_group(&mut con, &jobs_key(&info.name))?;
        names.push(info.name.clone());
    }
    let mark = move |con: &mut redis::Connection| -> redis::RedisResult<i64> {
        let script = redis::Script::new(MARK_ALIVE);
        let mut invocation = script.key(ALIVE);
        invocation.arg(ALIVE_FOR.as_millis() as u64);
        for name in &names {
            invocation.arg(name);
        }
        invocation.invoke(con)
    };
    mark(&mut con)?;
    let url = url.to_string();
    std::thread::Builder::new().name("heartbeat".into()).spawn(move || {
        let mut last = Instant::now();
        while !STOP.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(50));
            if last.elapsed() < HEARTBEAT {
                continue;
            }
            last = Instant::now();
            if let Err(e) = mark(&mut con) {
                eprintln!("cannot tell Redis the models are served: {e}");
                if let Ok(new) = connect(&url) {
                    con = new;
                }
            }
        }
    })?;
    Ok(())
}

fn ensure_group(con: &mut redis::Connection, stream: &str) -> Result<()> {
    let created: redis::RedisResult<()> = redis::cmd("XGROUP").arg("CREATE").arg(stream).arg(GROUP).arg("0").arg("MKSTREAM").query(con);
    match created {
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        other => Ok(other?),
    }
}

/// The models live workers serve now, sorted by name.
fn live_models(con: &mut redis::Connection) -> Result<Vec<ModelInfo>> {
    let live: Vec<String> = redis::Script::new(LIVE).key(ALIVE).invoke(con)?;
    let records: HashMap<String, String> = redis::cmd("HGETALL").arg(MODELS).query(con)?;
    let mut models = records
        .iter()
        .filter(|(name, _)| live.contains(name))
        .map(|(_, r)| model_from_json(&serde_json::from_str(r)?))
        .collect::<Result<Vec<_>>>()?;
    models.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(models)
}

/// The models live workers serve, waiting until there is one; sorted by name.
pub fn registered_models(url: &str) -> Result<Vec<ModelInfo>> {
    let mut con = connect(url)?;
    let mut said = false;
    loop {
        let models = live_models(&mut con)?;
        if !models.is_empty() {
            return Ok(models);
        }
        if !said {
            eprintln!("waiting for a `diffuse worker` to register a model at {url}");
            said = true;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn image_json(image: &Image8) -> Value {
    json!({ "width": image.width, "height": image.height, "channels": image.channels, "pixels": b64(&image.pixels) })
}

fn image_from_json(value: &Value) -> Result<Image8> {
    let size = |key: &str| value[key].as_u64().map(|v| v as usize).ok_or_else(|| anyhow!("image without {key}"));
    Ok(Image8 { width: size("width")?, height: size("height")?, channels: size("channels")?, pixels: unb64(value["pixels"].as_str().unwrap_or(""))? })
}

/// A request as a job entry carries it (the model by name).
pub fn request_json(request: &GenerateRequest, model: &str) -> Value {
    json!({
        "model": model,
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "steps": request.steps,
        "guidance_scale": request.guidance_scale,
        "guidance_rescale": request.guidance_rescale,
        "width": request.width,
        "height": request.height,
        "seed": request.seed,
        "scheduler": request.scheduler,
        "scheduler_config": request.scheduler_config.iter().map(|(k, v)| json!([k, v])).collect::<Vec<_>>(),
        "eta": request.eta,
        "clip_skip": request.clip_skip,
        "prompt_syntax": request.prompt_syntax,
        "batch_size": request.batch_size,
        "iterations": request.iterations,
        "init": request.init.as_ref().map(|init| json!({
            "image": image_json(&init.image),
            "mask": init.mask.as_ref().map(image_json),
            "strength": init.strength,
        })),
        "notes": request.notes,
        "ignored_fields": request.ignored_fields,
        "preview": request.preview,
    })
}

/// A job entry's request, for the local model `model`.
pub fn request_from_json(value: &Value, model: usize) -> Result<GenerateRequest> {
    let size = |key: &str| value[key].as_u64().map(|v| v as usize);
    let strings = |key: &str| value[key].as_array().map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect()).unwrap_or_default();
    let init = match &value["init"] {
        Value::Null => None,
        init => Some(InitImage {
            image: image_from_json(&init["image"])?,
            mask: match &init["mask"] {
                Value::Null => None,
                mask => Some(image_from_json(mask)?),
            },
            strength: init["strength"].as_f64().unwrap_or(0.75),
        }),
    };
    Ok(GenerateRequest {
        model,
        prompt: value["prompt"].as_str().unwrap_or("").to_string(),
        negative_prompt: value["negative_prompt"].as_str().map(str::to_string),
        steps: size("steps").ok_or_else(|| anyhow!("request without steps"))?,
        guidance_scale: value["guidance_scale"].as_f64().unwrap_or(7.5),
        guidance_rescale: value["guidance_rescale"].as_f64().unwrap_or(0.0),
        width: size("width"),
        height: size("height"),
        seed: value["seed"].as_u64().ok_or_else(|| anyhow!("request without seed"))?,
        scheduler: value["scheduler"].as_str().map(str::to_string),
        scheduler_config: value["scheduler_config"]
            .as_array()
            .map(|a| a.iter().filter_map(|kv| Some((kv[0].as_str()?.to_string(), kv[1].clone()))).collect())
            .unwrap_or_default(),
        eta: value["eta"].as_f64(),
        clip_skip: size("clip_skip"),
        prompt_syntax: value["prompt_syntax"].as_str().unwrap_or("diffusers").to_string(),
        batch_size: size("batch_size").unwrap_or(1),
        iterations: size("iterations").unwrap_or(1),
        init,
        notes: strings("notes"),
        ignored_fields: strings("ignored_fields"),
        preview: value["preview"].as_bool().unwrap_or(false),
    })
}

// ---------------------------------------------------------------------------------------------
// The worker side.

/// The end of a job, stored once: the done key (SET NX), the final event, the XACK, and the
/// entry deleted from the stream (which so does not grow without end). A job that another
/// worker already ended is only acknowledged. Returns 1 when this call ended it.
const FINISH: &str = r#"
local ended = 0
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then
  redis.call('XADD', KEYS[2], '*', 'name', ARGV[3], 'data', ARGV[4])
  redis.call('EXPIRE', KEYS[2], ARGV[2])
  ended = 1
end
redis.call('XACK', KEYS[3], ARGV[5], ARGV[6])
redis.call('XDEL', KEYS[3], ARGV[6])
return ended
"#;

/// Ends job `id` (entry `entry` of `stream`) with its final event, unless it has ended
/// already; acknowledges the entry either way. True when this call ended it.
#[allow(clippy::too_many_arguments)]
fn finish(con: &mut redis::Connection, id: &str, stream: &str, entry: &str, by: &str, ttl: u64, name: &str, data: &Value) -> Result<bool> {
    let ended: i64 = redis::Script::new(FINISH)
        .key(done_key(id))
        .key(events_key(id))
        .key(stream)
        .arg(by)
        .arg(ttl)
        .arg(name)
        .arg(data.to_string())
        .arg(GROUP)
        .arg(entry)
        .invoke(con)?;
    Ok(ended == 1)
}

/// A model's worker thread under Redis: takes its jobs (abandoned ones first) until STOP.
pub(super) fn work(index: usize, mut worker: Worker, shared: Arc<Shared>, config: Arc<WorkerConfig>) {
    RUNNING.fetch_add(1, Ordering::SeqCst);
    let name = shared.model(index).name.clone();
    let consumer = format!("{}-{}-{}", hostname(), std::process::id(), index);
    let mut failures = 0u32;
    while !STOP.load(Ordering::SeqCst) && !shared.shutting_down() {
        match work_once(index, &mut worker, &shared, &config, &name, &consumer) {
            Ok(()) => failures = 0,
            Err(e) => {
                failures += 1;
                eprintln!("worker {consumer}: {e:#}");
                std::thread::sleep(Duration::from_millis(500 * u64::from(failures.min(10))));
            }
        }
    }
    RUNNING.fetch_sub(1, Ordering::SeqCst);
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "host".to_string())
}

/// Connects, then runs jobs as they come; returns on a Redis error (after which it reconnects).
fn work_once(index: usize, worker: &mut Worker, shared: &Arc<Shared>, config: &WorkerConfig, name: &str, consumer: &str) -> Result<()> {
    let mut con = connect(&config.url)?;
    let stream = jobs_key(name);
    ensure_group(&mut con, &stream)?;
    let min_idle = config.claim_after.as_millis() as u64;
    while !STOP.load(Ordering::SeqCst) && !shared.shutting_down() {
        let claimed: StreamAutoClaimReply =
            redis::cmd("XAUTOCLAIM").arg(&stream).arg(GROUP).arg(consumer).arg(min_idle).arg("0-0").arg("COUNT").arg(1).query(&mut con)?;
        let entry = match claimed.claimed.into_iter().next() {
            Some(entry) => {
                eprintln!("worker {consumer}: took over abandoned entry {}", entry.id);
                Some(entry)
            }
            None => {
                let read: Option<StreamReadReply> = redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg(GROUP)
                    .arg(consumer)
                    .arg("COUNT")
                    .arg(1)
                    .arg("BLOCK")
                    .arg(500)
                    .arg("STREAMS")
                    .arg(&stream)
                    .arg(">")
                    .query(&mut con)?;
                read.and_then(|r| r.keys.into_iter().next()).and_then(|k| k.ids.into_iter().next())
            }
        };
        let Some(entry) = entry else { continue };
        let id: Option<String> = entry.get("id");
        let request: Option<String> = entry.get("request");
        let (Some(id), Some(request)) = (id, request) else {
            eprintln!("worker {consumer}: entry {} is not a job; dropped", entry.id);
            let _: () = redis::cmd("XACK").arg(&stream).arg(GROUP).arg(&entry.id).query(&mut con)?;
            let _: () = redis::cmd("XDEL").arg(&stream).arg(&entry.id).query(&mut con)?;
            continue;
        };
        run_entry(index, worker, shared, config, &mut con, &stream, consumer, &entry.id, &id, &request)?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn run_entry(
    index: usize,
    worker: &mut Worker,
    shared: &Arc<Shared>,
    config: &WorkerConfig,
    con: &mut redis::Connection,
    stream: &str,
    consumer: &str,
    entry: &str,
    id: &str,
    request: &str,
) -> Result<()> {
    let ttl = config.ttl_secs;
    let finish = |con: &mut redis::Connection, name: &str, data: &Value| finish(con, id, stream, entry, consumer, ttl, name, data);
    let done: bool = redis::cmd("EXISTS").arg(done_key(id)).query(con)?;
    if done {
        let _: () = redis::cmd("XACK").arg(stream).arg(GROUP).arg(entry).query(con)?;
        let _: () = redis::cmd("XDEL").arg(stream).arg(entry).query(con)?;
        return Ok(());
    }
    let request = match serde_json::from_str(request).map_err(anyhow::Error::from).and_then(|r| request_from_json(&r, index)) {
        Ok(request) => request,
        Err(e) => {
            finish(con, "failed", &json!({ "error": format!("the job's request did not parse: {e:#}") }))?;
            return Ok(());
        }
    };
    let cancelled: bool = redis::cmd("EXISTS").arg(cancel_key(id)).query(con)?;
    if cancelled {
        finish(con, "cancelled", &json!({ "images": 0 }))?;
        return Ok(());
    }
    eprintln!("worker {consumer}: running job {id}");
    // Events go out on their own connection; each step also looks for the cancel key.
    let events = Mutex::new(connect(&config.url)?);
    let (events_stream, cancel, skip, preview) = (events_key(id), cancel_key(id), skip_key(id), preview_key(id));
    let sink: jobs::Sink = Box::new(move |name: &str, data: &Value| {
        if matches!(name, "done" | "failed" | "cancelled" | "queued") {
            return jobs::Control::default();
        }
        let mut con = events.lock().unwrap_or_else(|e| e.into_inner());
        let mut pipe = redis::pipe();
        if name == "preview" {
            // Only the latest preview's image is kept (in its own key); the event says its step.
            pipe.cmd("SET").arg(&preview).arg(data.to_string()).arg("EX").arg(ttl).ignore();
            let step = json!({ "step": data["step"] });
            pipe.cmd("XADD").arg(&events_stream).arg("*").arg("name").arg(name).arg("data").arg(step.to_string()).ignore();
        } else {
            pipe.cmd("XADD").arg(&events_stream).arg("*").arg("name").arg(name).arg("data").arg(data.to_string()).ignore();
        }
        pipe.cmd("EXPIRE").arg(&events_stream).arg(ttl).ignore();
        pipe.cmd("EXISTS").arg(&cancel);
        pipe.cmd("GETDEL").arg(&skip);
        match pipe.query::<(bool, Option<usize>)>(&mut *con) {
            Ok((cancel, skip_iteration)) => jobs::Control { cancel, skip_iteration },
            Err(e) => {
                eprintln!("job {}: {e}", events_stream);
                jobs::Control::default()
            }
        }
    });
    let job = Arc::new(Job::new(id.to_string(), request, Origin::Native, Some(sink)));
    // Keeps the entry fresh while the job runs (XCLAIM by its own consumer resets its idle time).
    let running = Arc::new(AtomicBool::new(true));
    let heartbeat = {
        let (running, url, stream, consumer, entry) = (running.clone(), config.url.clone(), stream.to_string(), consumer.to_string(), entry.to_string());
        let every = (config.claim_after / 4).max(Duration::from_millis(50));
        std::thread::spawn(move || {
            let Ok(mut con) = connect(&url) else { return };
            let mut last = Instant::now();
            while running.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(20));
                if last.elapsed() >= every {
                    let _: redis::RedisResult<redis::Value> =
                        redis::cmd("XCLAIM").arg(&stream).arg(GROUP).arg(&consumer).arg(0).arg(&entry).arg("JUSTID").query(&mut con);
                    last = Instant::now();
                }
            }
        })
    };
    jobs::run_job(worker, shared, &job);
    worker.pipeline.interrupt = None;
    if let Some((_, pipeline)) = &mut worker.with_loras {
        pipeline.interrupt = None;
    }
    running.store(false, Ordering::SeqCst);
    let _ = heartbeat.join();
    let (name, mut data, warnings, invalid, images) = {
        let state = job.state();
        let (name, data) = state.events.last().cloned().unwrap_or(("failed", json!({ "error": "the job made no events" })));
        (name, data, state.warnings.clone(), state.invalid, state.images.iter().map(jobs::image_json).collect::<Vec<_>>())
    };
    if let Some(map) = data.as_object_mut() {
        map.insert("warnings".to_string(), json!(warnings));
        match name {
            "failed" => {
                map.insert("invalid".to_string(), json!(invalid));
            }
            // An interrupted job's images of the iterations it finished (A1111 answers with them).
            "cancelled" => {
                map.insert("images".to_string(), json!(images));
            }
            _ => {}
        }
    }
    let _: () = redis::cmd("DEL").arg(preview_key(id)).query(con)?;
    if finish(con, name, &data)? {
        eprintln!("worker {consumer}: job {id} {name}");
    } else {
        eprintln!("worker {consumer}: job {id} had already been ended by another worker");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The front end's side.

/// Starts the front end's threads: one per model that moves its queued jobs into Redis, and
/// one per job in Redis that mirrors its events into the local job.
pub fn start_front_end(shared: Arc<Shared>, url: String, ttl_secs: u64) -> Result<()> {
    connect(&url)?;
    let _ = shared.redis.set((url.clone(), ttl_secs));
    for model in 0..shared.model_count() {
        hand_over(&shared, &url, ttl_secs, model)?;
    }
    // The live models, read again every second: new ones get their thread.
    let (refreshing, url) = (shared.clone(), url.clone());
    std::thread::Builder::new().name("models".into()).spawn(move || {
        let shared = refreshing;
        let mut con = None;
        while !shared.shutting_down() {
            std::thread::sleep(Duration::from_secs(1));
            if con.is_none() {
                con = connect(&url).ok();
            }
            let Some(connection) = con.as_mut() else { continue };
            if let Err(e) = refresh_models(&shared, connection, &url, ttl_secs) {
                eprintln!("cannot read the models from Redis: {e:#}");
                con = None;
            }
        }
    })?;
    Ok(())
}

/// Reads the live models from Redis into the front end's registry; a new one gets its queue.
fn refresh_models(shared: &Arc<Shared>, con: &mut redis::Connection, url: &str, ttl_secs: u64) -> Result<()> {
    for model in shared.set_models(live_models(con)?) {
        eprintln!("model {} registered by a worker: served from now on", shared.model(model).name);
        if let Err(e) = hand_over(shared, url, ttl_secs, model) {
            eprintln!("cannot start the queue of model {}: {e}", shared.model(model).name);
        }
    }
    Ok(())
}

/// The thread that moves model `model`'s queued jobs into Redis (and one per job that
/// follows it there).
fn hand_over(shared: &Arc<Shared>, url: &str, ttl_secs: u64, model: usize) -> Result<()> {
    let (shared, url) = (shared.clone(), url.to_string());
    std::thread::Builder::new().name(format!("queue-{model}")).spawn(move || {
        while let Some(job) = shared.next_job(model) {
            let (shared, url) = (shared.clone(), url.clone());
            std::thread::spawn(move || {
                if let Err(e) = follow(&shared, &url, &job, ttl_secs) {
                    fail(&shared, &job, &e);
                }
            });
        }
    })?;
    Ok(())
}

fn origin_name(origin: Origin) -> &'static str {
    match origin {
        Origin::Native => "native",
        Origin::A1111 => "a1111",
        Origin::OpenAi => "openai",
    }
}

/// Puts a job into Redis (its entry in the model's stream, and its record for other front
/// ends) and mirrors its events until it ends.
fn follow(shared: &Shared, url: &str, job: &Arc<Job>, ttl: u64) -> Result<()> {
    let mut con = connect(url)?;
    let model = &shared.model(job.request.model).name;
    let stream = jobs_key(model);
    let request = request_json(&job.request, model);
    let entry: String = redis::cmd("XADD").arg(&stream).arg("*").arg("id").arg(&job.id).arg("request").arg(request.to_string()).query(&mut con)?;
    let created = job.created.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or_default();
    let record = json!({ "request": request, "model": model, "origin": origin_name(job.origin), "created": created, "entry": entry });
    let _: () = redis::cmd("SET").arg(record_key(&job.id)).arg(record.to_string()).arg("EX").arg(ttl).query(&mut con)?;
    let mut last = "0-0".to_string();
    follow_events(shared, &mut con, job, &stream, &entry, &mut last, ttl, true)?;
    Ok(())
}

/// Mirrors a job's events from Redis into the local job (from after `last`), and passes its
/// cancel and skip on; until the job ends (`wait`), or until the events in Redis now are read.
/// True when the job has ended.
#[allow(clippy::too_many_arguments)]
fn follow_events(shared: &Shared, con: &mut redis::Connection, job: &Arc<Job>, stream: &str, entry: &str, last: &mut String, ttl: u64, wait: bool) -> Result<bool> {
    let mut cancel_sent = false;
    let mut skip_sent = None;
    loop {
        if !cancel_sent && job.cancelled.load(Ordering::SeqCst) {
            let _: () = redis::cmd("SET").arg(cancel_key(&job.id)).arg(1).arg("EX").arg(ttl).query(con)?;
            cancel_sent = true;
            // A job no worker has started ends here and now (a worker that takes it later
            // finds it ended; one that started it meanwhile stops at its next step).
            if job.status() == Status::Queued {
                finish(con, &job.id, stream, entry, "front end", ttl, "cancelled", &json!({ "images": 0 }))?;
            }
        }
        // A skip names the iteration it was meant for, so a late one skips nothing else.
        let iteration = job.state().iteration + 1;
        if job.skip.load(Ordering::SeqCst) && skip_sent != Some(iteration) {
            let _: () = redis::cmd("SET").arg(skip_key(&job.id)).arg(iteration).arg("EX").arg(ttl).query(con)?;
            skip_sent = Some(iteration);
        }
        let block = if wait { 250 } else { 0 };
        let mut read = redis::cmd("XREAD");
        read.arg("COUNT").arg(64);
        if wait {
            read.arg("BLOCK").arg(block);
        }
        let read: Option<StreamReadReply> = read.arg("STREAMS").arg(events_key(&job.id)).arg(&*last).query(con)?;
        let mut any = false;
        for entry in read.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids) {
            any = true;
            *last = entry.id.clone();
            let name: String = entry.get("name").unwrap_or_default();
            let data: String = entry.get("data").unwrap_or_default();
            let mut data: Value = serde_json::from_str(&data).unwrap_or(Value::Null);
            if name == "preview" {
                // The latest preview's image (a later one may have replaced this step's).
                let latest: Option<String> = redis::cmd("GET").arg(preview_key(&job.id)).query(con)?;
                if let Some(latest) = latest.and_then(|l| serde_json::from_str::<Value>(&l).ok()) {
                    data = latest;
                }
            }
            if mirror(job, &name, data) {
                shared.remember_finished(&job.id);
                return Ok(true);
            }
        }
        if !wait && !any {
            return Ok(false);
        }
    }
}

/// A job this front end does not know, looked up in Redis (another front end queued it): its
/// events so far mirrored into a new local job, which a thread then follows until it ends.
/// `None` when Redis has no such job (or it has expired).
pub(super) fn attach(shared: &Arc<Shared>, id: &str) -> Result<Option<Arc<Job>>> {
    let Some((url, ttl)) = shared.redis.get().cloned() else { return Ok(None) };
    let mut con = connect(&url)?;
    let record: Option<String> = redis::cmd("GET").arg(record_key(id)).query(&mut con)?;
    let Some(record) = record else { return Ok(None) };
    let record: Value = serde_json::from_str(&record)?;
    let model_name = record["model"].as_str().unwrap_or_default();
    let find = || (0..shared.model_count()).find(|i| shared.model(*i).name == model_name);
    if find().is_none() {
        // A model registered since this front end last looked.
        refresh_models(shared, &mut con, &url, ttl)?;
    }
    let model = find()
        .ok_or_else(|| anyhow!("job {id} is for the model `{model_name}`, which this server does not serve"))?;
    let request = request_from_json(&record["request"], model)?;
    let origin = match record["origin"].as_str() {
        Some("a1111") => Origin::A1111,
        Some("openai") => Origin::OpenAi,
        _ => Origin::Native,
    };
    let mut job = Job::new(id.to_string(), request, origin, None);
    if let Some(created) = record["created"].as_f64().filter(|c| c.is_finite() && *c >= 0.0) {
        job.created = std::time::UNIX_EPOCH + Duration::from_secs_f64(created);
    }
    let job = Arc::new(job);
    {
        let mut state = job.state();
        job.push_event(&mut state, "queued", json!({ "id": id }));
    }
    let (stream, entry) = (jobs_key(model_name), record["entry"].as_str().unwrap_or("0-0").to_string());
    let mut last = "0-0".to_string();
    let ended = follow_events(shared, &mut con, &job, &stream, &entry, &mut last, ttl, false)?;
    let (job, new) = shared.adopt(job);
    if new && !ended {
        let (shared, job) = (shared.clone(), job.clone());
        std::thread::spawn(move || {
            let followed = connect(&url).and_then(|mut con| follow_events(&shared, &mut con, &job, &stream, &entry, &mut last, ttl, true));
            if let Err(e) = followed {
                fail(&shared, &job, &e);
            }
        });
    }
    Ok(Some(job))
}

/// A job whose mirror from Redis broke: it fails (unless it has ended).
fn fail(shared: &Shared, job: &Job, e: &anyhow::Error) {
    let mut state = job.state();
    if !state.status.finished() {
        state.status = Status::Failed;
        state.finished = Some(Instant::now());
        let error = format!("the job queue in Redis: {e:#}");
        state.error = Some(error.clone());
        job.push_event(&mut state, "failed", json!({ "error": error }));
    }
    drop(state);
    shared.remember_finished(&job.id);
}

/// One event from Redis into the local job; true when it ended the job.
fn mirror(job: &Job, name: &str, data: Value) -> bool {
    let mut state = job.state();
    let name: &'static str = match name {
        "started" => {
            // Also a restart, when another worker took the job over.
            state.status = Status::Running;
            state.started.get_or_insert_with(Instant::now);
            state.step = 0;
            state.iteration = 0;
            "started"
        }
        "step" => {
            state.step = data["step"].as_u64().unwrap_or(0) as usize;
            state.steps = data["steps"].as_u64().unwrap_or(0) as usize;
            let iteration = (data["iteration"].as_u64().unwrap_or(1) as usize).saturating_sub(1);
            if iteration != state.iteration {
                // A skip not taken before its iteration ended is dropped, as on a local model
                // (it never skips the next one).
                job.skip.store(false, Ordering::SeqCst);
            }
            state.iteration = iteration;
            state.it_per_s = data["it_per_s"].as_f64().unwrap_or(0.0);
            "step"
        }
        "preview" => {
            drop(state);
            if let Some(png) = data["png"].as_str().and_then(|p| unb64(p).ok()) {
                job.set_preview(data["step"].as_u64().unwrap_or(0) as usize, png);
            }
            return false;
        }
        "skipped" => {
            state.skipped += 1;
            job.skip.store(false, Ordering::SeqCst);
            "skipped"
        }
        "done" | "failed" | "cancelled" => {
            job.drop_preview_image(&mut state);
            state.finished = Some(Instant::now());
            state.warnings = data["warnings"].as_array().map(|a| a.iter().filter_map(|w| w.as_str().map(str::to_string)).collect()).unwrap_or_default();
            let mut data = data;
            if let Some(map) = data.as_object_mut() {
                map.remove("warnings");
            }
            // A done job's images, and an interrupted one's so far.
            state.images = data["images"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|i| {
                            Some(ImageOut {
                                png: unb64(i["png"].as_str()?).ok()?,
                                infotext: i["infotext"].as_str()?.to_string(),
                                seed: i["seed"].as_u64()?,
                                width: i["width"].as_u64()? as usize,
                                height: i["height"].as_u64()? as usize,
                            })
                        })
                        .collect()
                })
                .unwrap_or_default();
            let name = match name {
                "done" => {
                    state.status = Status::Done;
                    "done"
                }
                "failed" => {
                    state.status = Status::Failed;
                    state.invalid = data["invalid"].as_bool().unwrap_or(false);
                    if let Some(map) = data.as_object_mut() {
                        map.remove("invalid");
                    }
                    state.error = Some(data["error"].as_str().unwrap_or("failed").to_string());
                    "failed"
                }
                _ => {
                    state.status = Status::Cancelled;
                    // As a local job's cancelled event: the number of images it has.
                    data = json!({ "images": state.images.len() });
                    "cancelled"
                }
            };
            job.push_event(&mut state, name, data);
            return true;
        }
        _ => return false,
    };
    job.push_event(&mut state, name, data);
    false
}
