//! `diffuse serve --queue redis://...` with two `diffuse worker` processes, against a real
//! `redis-server` on loopback: one worker is killed (SIGKILL) in the middle of a job, and every
//! job still ends exactly once, none lost, its image the one `diffuse generate` makes.
//! Skipped (with the reason printed) where `redis-server` is not installed.

mod support;

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;

/// A child process killed (and reaped) when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli").args(["-h", "127.0.0.1", "-p", &port.to_string()]).args(args).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn start_worker(url: &str, stderr: &Path) -> Killed {
    start_worker_for(url, stderr, "builtin")
}

fn start_worker_for(url: &str, stderr: &Path, model: &str) -> Killed {
    let child = Command::new(env!("CARGO_BIN_EXE_diffuse"))
        .args(["worker", "--queue", url, "--model", model, "--claim-after-secs", "1"])
        .env("DIFFUSE_CACHE_DIR", cache_dir())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(stderr).unwrap())
        .spawn()
        .unwrap();
    Killed(child)
}

/// Waits (bounded) until `check` says yes.
fn wait_until(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A `redis-server` on a free loopback port (its files in `dir`), once it answers: the
/// process and the port; `None` (with the reason printed) where it is not installed.
fn start_redis(dir: &Path) -> Option<(Killed, u16)> {
    let installed = Command::new("redis-server").arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success());
    let cli = Command::new("redis-cli").arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success());
    if !installed || !cli {
        println!("skipped: redis-server or redis-cli is not installed (Debian package redis-server)");
        return None;
    }
    let port = free_port();
    let redis = Killed(
        Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_until("redis-server", Duration::from_secs(10), || redis_cli(port, &["PING"]).trim() == "PONG");
    Some((redis, port))
}

/// Waits (bounded) until the job at `job_url` runs, two steps in.
fn wait_running_at(job_url: &str, what: &str, limit: Duration) {
    wait_until(what, limit, || {
        let (_, job) = get(job_url, None);
        job["status"] == "running" && job["step"].as_u64().unwrap_or(0) >= 2
    });
}

#[test]
fn jobs_survive_a_killed_worker_and_end_exactly_once() {
    let started = Instant::now();
    let dir = scratch("redis");
    let Some((_redis, port)) = start_redis(&dir) else { return };
    let url = format!("redis://127.0.0.1:{port}/");

    // The built-in model, made once before the workers race to make it.
    let expected = generate(&dir, &["--prompt", "a sneaker", "--steps", "30", "--seed", "11"]);

    let stderr = [dir.join("worker-0.txt"), dir.join("worker-1.txt")];
    let mut workers = vec![Some(start_worker(&url, &stderr[0])), Some(start_worker(&url, &stderr[1]))];
    let server = Server::start("redis", &["--queue", &url, "--claim-after-secs", "1"]);

    // Several jobs, long enough (30 steps) that one is surely caught mid-run.
    let mut ids = Vec::new();
    for (k, prompt) in ["a sneaker", "a bag", "a shirt", "a boot", "a dress"].iter().enumerate() {
        let seed = if k == 0 { 11 } else { 100 + k };
        let (status, body, _) = post(&server.url("/v1/jobs"), &json!({ "prompt": prompt, "steps": 30, "seed": seed }), None);
        assert_eq!(status, 202, "{body}");
        ids.push(body["id"].as_str().unwrap().to_string());
    }

    // Both workers load their model; one is killed when it is a few steps into a job.
    let running_on = |w: usize| -> Option<String> {
        let text = std::fs::read_to_string(&stderr[w]).unwrap_or_default();
        let last = text.lines().filter(|l| l.contains(": running job ")).last()?.rsplit(' ').next()?.to_string();
        (!text.contains(&format!("job {last} done"))).then_some(last)
    };
    let mut victim = None;
    wait_until("a worker a few steps into a job", Duration::from_secs(30), || {
        for w in 0..2 {
            if let Some(id) = running_on(w) {
                let (_, job) = get(&server.url(&format!("/v1/jobs/{id}")), None);
                if job["status"] == "running" && job["step"].as_u64().unwrap_or(0) >= 3 {
                    victim = Some((w, id));
                    return true;
                }
            }
        }
        false
    });
    let (killed, killed_job) = victim.unwrap();
    let mut child = workers[killed].take().unwrap();
    child.0.kill().unwrap(); // SIGKILL
    child.0.wait().unwrap();
    let killed_at = Instant::now();
    let killed_step = get(&server.url(&format!("/v1/jobs/{killed_job}")), None).1["step"].clone();
    println!("killed worker {killed} during job {killed_job} (at step {killed_step})");

    // Every job ends, done, within the bound.
    let mut jobs: HashMap<String, Value> = HashMap::new();
    wait_until("every job to end", Duration::from_secs(40), || {
        for id in &ids {
            if !jobs.contains_key(id) {
                let (status, job) = get(&server.url(&format!("/v1/jobs/{id}")), None);
                assert_eq!(status, 200, "job {id} lost: {job}");
                let state = job["status"].as_str().unwrap_or("").to_string();
                assert!(state == "queued" || state == "running" || state == "done", "job {id}: {job}");
                if state == "done" {
                    jobs.insert(id.clone(), job);
                }
            }
        }
        jobs.len() == ids.len()
    });

    println!("all {} jobs done {:.1} s after the kill", ids.len(), killed_at.elapsed().as_secs_f64());

    // Exactly once: one end in each job's event stream, one done key; the killed job started twice.
    for id in &ids {
        let events = redis_cli(port, &["XRANGE", &format!("diffuse:job:{id}:events"), "-", "+"]);
        let ends = events.lines().filter(|l| matches!(l.trim(), "done" | "failed" | "cancelled")).count();
        assert_eq!(ends, 1, "job {id} ended {ends} times");
        assert_eq!(redis_cli(port, &["EXISTS", &format!("diffuse:job:{id}:done")]).trim(), "1");
        let starts = events.lines().filter(|l| l.trim() == "started").count();
        if *id == killed_job {
            assert_eq!(starts, 2, "the killed worker's job was taken over and run again");
        }
        assert_eq!(jobs[id]["images"].as_array().map(Vec::len), Some(1), "{}", jobs[id]);
    }
    // Nothing left pending in the consumer group.
    let pending = redis_cli(port, &["XPENDING", "diffuse:jobs:builtin", "workers"]);
    assert_eq!(pending.lines().next().map(str::trim), Some("0"), "{pending}");
    assert_eq!(redis_cli(port, &["XLEN", "diffuse:jobs:builtin"]).trim(), "0", "ended jobs leave the stream");

    // The image made through Redis is `diffuse generate`'s, pixel for pixel (and infotext).
    let served = unb64(jobs[&ids[0]]["images"][0]["png"].as_str().unwrap());
    let (served_pixels, served_text) = decode_png(&served);
    let (made_pixels, made_text) = decode_png(&expected);
    assert_eq!(served_pixels, made_pixels);
    assert_eq!(served_text, made_text);

    // DELETE reaches a job running on a worker elsewhere: it stops within a step or so.
    let (status, body, _) = post(&server.url("/v1/jobs"), &json!({ "prompt": "a coat", "steps": 150, "seed": 5, "preview": true }), None);
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().unwrap().to_string();
    let job_url = server.url(&format!("/v1/jobs/{id}"));
    wait_running_at(&job_url, "the long job to run", Duration::from_secs(15));
    // One queued behind it ends as cancelled at once, never started.
    let (status, body, _) = post(&server.url("/v1/jobs"), &json!({ "prompt": "a hat", "steps": 2, "seed": 6 }), None);
    assert_eq!(status, 202, "{body}");
    let queued = body["id"].as_str().unwrap().to_string();
    let queued_url = server.url(&format!("/v1/jobs/{queued}"));
    assert_eq!(get(&queued_url, None).1["status"], "queued");
    let (status, body) = delete(&queued_url);
    assert_eq!(status, 200, "{body}");
    wait_until("the queued job to end as cancelled", Duration::from_secs(5), || get(&queued_url, None).1["status"] == "cancelled");
    let (status, body) = delete(&job_url);
    assert_eq!(status, 200, "{body}");
    let mut last = Value::Null;
    wait_until("the cancel to reach the worker", Duration::from_secs(10), || {
        last = get(&job_url, None).1;
        last["status"] == "cancelled"
    });
    assert!(last["step"].as_u64().unwrap_or(0) < 150, "{last}");
    // Its events, replayed by the front end, as a local job's: previews too.
    let mut response = agent().get(&server.url(&format!("/v1/jobs/{id}/events"))).call().unwrap();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut response.body_mut().as_reader(), &mut text).unwrap();
    let names: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("event: ")).collect();
    assert_eq!(names.first(), Some(&"queued"), "{names:?}");
    assert_eq!(names.last(), Some(&"cancelled"), "{names:?}");
    assert!(names.contains(&"started") && names.contains(&"step") && names.contains(&"preview"), "{names:?}");
    // The worker writes its own end to Redis as it stops (the front end may report the job
    // cancelled a moment before): wait for it, then it is there exactly once.
    let cancelled_events = || {
        let events = redis_cli(port, &["XRANGE", &format!("diffuse:job:{id}:events"), "-", "+"]);
        events.lines().filter(|l| l.trim() == "cancelled").count()
    };
    wait_until("the worker's cancelled event in Redis", Duration::from_secs(10), || cancelled_events() >= 1);
    assert_eq!(cancelled_events(), 1);
    // The queued one never started; cancelled before the front end had handed it to Redis, it
    // has no events there at all, else its one end.
    let events = redis_cli(port, &["XRANGE", &format!("diffuse:job:{queued}:events"), "-", "+"]);
    assert!(events.lines().filter(|l| l.trim() == "cancelled").count() <= 1, "{events}");
    assert_eq!(events.lines().filter(|l| l.trim() == "started").count(), 0, "{events}");

    // SIGTERM in the middle of a job: the surviving worker finishes it, then stops.
    let (status, body, _) = post(&server.url("/v1/jobs"), &json!({ "prompt": "a skirt", "steps": 30, "seed": 8 }), None);
    assert_eq!(status, 202, "{body}");
    let last_url = server.url(&format!("/v1/jobs/{}", body["id"].as_str().unwrap()));
    wait_running_at(&last_url, "the last job to run", Duration::from_secs(15));
    let mut survivor = workers[1 - killed].take().unwrap();
    // SAFETY: kill(2) on our own child's pid, which has not been reaped yet.
    assert_eq!(unsafe { libc::kill(survivor.0.id() as libc::pid_t, libc::SIGTERM) }, 0);
    wait_until("the worker to stop at SIGTERM", Duration::from_secs(15), || survivor.0.try_wait().unwrap().is_some());
    // The job the worker ran at SIGTERM was finished first (its end reaches the front end soon after).
    wait_until("the last job's end", Duration::from_secs(5), || get(&last_url, None).1["status"] == "done");
    drop(server);
    println!("redis test took {:.1} s", started.elapsed().as_secs_f64());
    assert!(started.elapsed() < Duration::from_secs(60));
}

/// A1111's skip and interrupt reach jobs running on a Redis worker as they reach local ones;
/// any front end over the same Redis answers for any job (status, events, DELETE), and the
/// A1111 progress counts the jobs waiting in Redis.
#[test]
fn skip_interrupt_and_jobs_from_any_front_end() {
    let dir = scratch("redis-fronts");
    let Some((_redis, port)) = start_redis(&dir) else { return };
    let url = format!("redis://127.0.0.1:{port}/");
    let _worker = start_worker(&url, &dir.join("worker.txt"));
    let a = Server::start("redis-a", &["--queue", &url, "--max-steps", "2000"]);
    let b = Server::start("redis-b", &["--queue", &url, "--max-steps", "2000"]);
    let running_job = |server: &Server| -> Option<Value> {
        let (_, jobs) = get(&server.url("/v1/jobs"), None);
        jobs["jobs"].as_array()?.iter().find(|j| j["status"] == "running" && j["step"].as_u64().unwrap_or(0) >= 2).cloned()
    };

    // Skip: the running batch is dropped on the worker, the next one is made.
    check_a1111_skip(&a, 400, || {
        wait_until("the A1111 job to run", Duration::from_secs(30), || running_job(&a).is_some());
        let (_, progress) = get(&a.url("/sdapi/v1/progress"), None);
        assert_eq!(progress["state"]["job_count"], 1, "{progress}");
    });

    // Interrupt: the job stops on the worker; the waiting client gets 200, `interrupted`.
    let txt2img = a.url("/sdapi/v1/txt2img");
    let client = std::thread::spawn(move || post(&txt2img, &json!({ "prompt": "a bag", "steps": 900, "n_iter": 2, "sampler_name": "DDIM" }), None));
    wait_until("the A1111 job to run", Duration::from_secs(30), || running_job(&a).is_some());
    let (status, answer, _) = post(&a.url("/sdapi/v1/interrupt"), &json!({}), None);
    assert_eq!((status, answer["interrupted"].as_array().map(Vec::len)), (200, Some(1)), "{answer}");
    let stopped = Instant::now();
    let (status, body, _) = client.join().unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(stopped.elapsed() < Duration::from_secs(10));
    let info: Value = serde_json::from_str(body["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["interrupted"], true, "{info}");

    // A job queued through A, read through B: done, with A's images; its events replayed.
    let (status, created, _) = post(&a.url("/v1/jobs"), &json!({ "prompt": "a shirt", "steps": 5, "seed": 3 }), None);
    assert_eq!(status, 202, "{created}");
    let id = created["id"].as_str().unwrap().to_string();
    wait_until("the job to be done on A", Duration::from_secs(30), || get(&a.url(&format!("/v1/jobs/{id}")), None).1["status"] == "done");
    let (status, on_b) = get(&b.url(&format!("/v1/jobs/{id}")), None);
    assert_eq!(status, 200, "{on_b}");
    assert_eq!(on_b["status"], "done", "{on_b}");
    let on_a = get(&a.url(&format!("/v1/jobs/{id}")), None).1;
    assert_eq!(on_b["images"], on_a["images"]);
    assert_eq!((on_b["seed"].as_u64(), on_b["created"].as_f64()), (Some(3), on_a["created"].as_f64()));
    let mut response = agent().get(&b.url(&format!("/v1/jobs/{id}/events"))).call().unwrap();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut response.body_mut().as_reader(), &mut text).unwrap();
    let names: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("event: ")).collect();
    assert_eq!((names.first(), names.last()), (Some(&"queued"), Some(&"done")), "{names:?}");
    assert!(names.contains(&"started") && names.contains(&"step"), "{names:?}");
    assert_eq!(get(&b.url("/v1/jobs/0123456789abcdef"), None).0, 404);

    // A long job queued through A, followed and cancelled through B.
    let (status, created, _) = post(&a.url("/v1/jobs"), &json!({ "prompt": "a coat", "steps": 900, "scheduler": "ddim" }), None);
    assert_eq!(status, 202, "{created}");
    let id = created["id"].as_str().unwrap().to_string();
    let on_b = b.url(&format!("/v1/jobs/{id}"));
    wait_running_at(&on_b, "B to see the job run", Duration::from_secs(30));
    let (status, answer) = delete(&on_b);
    assert_eq!(status, 200, "{answer}");
    wait_until("A to see the job cancelled", Duration::from_secs(10), || get(&a.url(&format!("/v1/jobs/{id}")), None).1["status"] == "cancelled");
    let (_, job) = get(&on_b, None);
    assert_eq!(job["status"], "cancelled", "{job}");

    // A worker started later with another model: the front ends serve it from then on, and
    // stop listing it once no worker serves it.
    let listed = |server: &Server| -> Vec<String> {
        let (_, models) = get(&server.url("/v1/models"), None);
        models["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap().to_string()).collect()
    };
    assert_eq!(listed(&a), ["builtin"]);
    let sd1 = Path::new(env!("CARGO_MANIFEST_DIR")).join("../diffuse/tests/fixtures/sd/sd1");
    let mut late = start_worker_for(&url, &dir.join("worker-sd1.txt"), sd1.to_str().unwrap());
    wait_until("both front ends to list sd1", Duration::from_secs(30), || listed(&a) == ["builtin", "sd1"] && listed(&b) == ["builtin", "sd1"]);
    let (_, sd_models) = get(&b.url("/sdapi/v1/sd-models"), None);
    assert!(sd_models.as_array().unwrap().iter().any(|m| m["model_name"] == "sd1"), "{sd_models}");
    let (status, created, _) = post(&b.url("/v1/jobs"), &json!({ "model": "sd1", "prompt": "a cat", "steps": 2, "seed": 1 }), None);
    assert_eq!(status, 202, "{created}");
    let id = created["id"].as_str().unwrap().to_string();
    wait_until("the sd1 job to be done", Duration::from_secs(30), || get(&b.url(&format!("/v1/jobs/{id}")), None).1["status"] == "done");
    late.0.kill().unwrap(); // SIGKILL: it says nothing more
    late.0.wait().unwrap();
    wait_until("sd1 to be dropped", Duration::from_secs(20), || listed(&a) == ["builtin"]);
    let (status, refused, _) = post(&a.url("/v1/jobs"), &json!({ "model": "sd1", "prompt": "a cat", "steps": 2 }), None);
    assert_eq!((status, refused["error"]["param"].as_str()), (422, Some("model")), "{refused}");
}

/// Without a reachable Redis, `worker` and `serve --queue` stop at once with a one-line error
/// (needs no redis-server); `serve --help` says what --queue does.
#[test]
fn an_unreachable_queue_is_a_clear_error() {
    let url = format!("redis://127.0.0.1:{}/", free_port());
    for args in [vec!["worker", "--queue", &url], vec!["serve", "--port", "0", "--queue", &url], vec!["worker", "--queue", "not-a-url"]] {
        let out = Command::new(env!("CARGO_BIN_EXE_diffuse")).args(&args).env("DIFFUSE_CACHE_DIR", cache_dir()).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(stderr.starts_with("error: ") && stderr.contains("--queue") || stderr.contains("cannot reach Redis"), "{args:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    }
    let help = Command::new(env!("CARGO_BIN_EXE_diffuse")).args(["serve", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout).replace('\n', " ");
    assert!(help.contains("--queue") && help.contains("runs no model itself unless --model"), "{help}");
}
