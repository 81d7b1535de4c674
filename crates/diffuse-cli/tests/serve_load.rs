//! `diffuse serve` under load and faults, on loopback with the built-in model (1–2 steps) and a
//! small queue: concurrent clients all answered (an image or 429) with none lost or
//! duplicated; a storm of DELETEs; clients that hang up mid-request; the job list drains and
//! the server's memory stays bounded. Prints its figures (the README's Serving section quotes
//! one run).

mod support;

use std::collections::HashSet;
use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{agent, decode_png, delete, get, post, unb64, Server};

const CLIENTS: usize = 16;
const REQUESTS_PER_CLIENT: usize = 8;
const MAX_QUEUE: usize = 4;

/// What one request came to.
struct Outcome {
    seed: u64,
    status: u16,
    latency: Duration,
    /// The job that answered it (for an image).
    job: Option<String>,
}

/// One client's request `index`: A1111's txt2img (the answer waits for the image) or a native
/// job (202, then polled until done), alternately; checks the image is this request's.
fn request(server: &Server, client: usize, index: usize) -> Outcome {
    let seed = (1000 + client * 10 + index) as u64;
    let steps = 1 + index % 2;
    let started = Instant::now();
    if index % 2 == 0 {
        let (status, body, retry_after) =
            post(&server.url("/sdapi/v1/txt2img"), &json!({ "prompt": "a bag", "steps": steps, "seed": seed, "sampler_name": "DDIM" }), None);
        let latency = started.elapsed();
        if status == 429 {
            assert!(retry_after.unwrap().parse::<u64>().unwrap() >= 1);
            assert_eq!(body["error"]["type"], "queue_full");
            return Outcome { seed, status, latency, job: None };
        }
        assert_eq!(status, 200, "{body}");
        let info: Value = serde_json::from_str(body["info"].as_str().unwrap()).unwrap();
        assert_eq!(info["all_seeds"], json!([seed]), "another request's image: {info}");
        let text = decode_png(&unb64(body["images"][0].as_str().unwrap())).1.unwrap();
        assert!(text.contains(&format!("Steps: {steps}, Sampler: DDIM,")) && text.contains(&format!(" Seed: {seed},")), "{text}");
        return Outcome { seed, status, latency, job: info["job_id"].as_str().map(str::to_string) };
    }
    let (status, created, retry_after) = post(&server.url("/v1/jobs"), &json!({ "prompt": "a bag", "steps": steps, "seed": seed, "scheduler": "ddim" }), None);
    if status == 429 {
        assert!(retry_after.unwrap().parse::<u64>().unwrap() >= 1);
        return Outcome { seed, status, latency: started.elapsed(), job: None };
    }
    assert_eq!(status, 202, "{created}");
    let id = created["id"].as_str().unwrap().to_string();
    loop {
        let (status, job) = get(&server.url(&format!("/v1/jobs/{id}")), None);
        assert_eq!(status, 200, "job {id} lost: {job}");
        match job["status"].as_str().unwrap() {
            "done" => {
                let images = job["images"].as_array().unwrap();
                assert_eq!(images.len(), 1);
                assert_eq!(images[0]["seed"], seed, "another request's image: {job}");
                return Outcome { seed, status: 200, latency: started.elapsed(), job: Some(id) };
            }
            "queued" | "running" => {}
            other => panic!("job {id} {other}: {job}"),
        }
        assert!(started.elapsed() < Duration::from_secs(60), "job {id} did not finish");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn percentile(sorted: &[Duration], percent: usize) -> Duration {
    sorted.get((sorted.len().saturating_sub(1)) * percent / 100).copied().unwrap_or_default()
}

fn ms(duration: Duration) -> u128 {
    duration.as_millis()
}

/// Jobs neither queued nor running (after at most `timeout`): the list drains.
fn drained(server: &Server, timeout: Duration) -> Vec<Value> {
    let started = Instant::now();
    loop {
        let (_, jobs) = get(&server.url("/v1/jobs"), None);
        let jobs = jobs["jobs"].as_array().unwrap().clone();
        if jobs.iter().all(|j| j["status"] != "queued" && j["status"] != "running") {
            return jobs;
        }
        let open: Vec<String> = jobs.iter().filter(|j| j["status"] == "queued" || j["status"] == "running").map(|j| format!("{} {}", j["id"], j["status"])).collect();
        assert!(started.elapsed() < timeout, "jobs left behind: {open:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until `count` jobs run.
fn wait_running(server: &Server, count: usize) {
    let started = Instant::now();
    loop {
        let (_, jobs) = get(&server.url("/v1/jobs"), None);
        if jobs["jobs"].as_array().unwrap().iter().filter(|j| j["status"] == "running").count() >= count {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "no job runs: {jobs}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The server's event stream of a finished job: its event names.
fn event_names(server: &Server, id: &str) -> Vec<String> {
    let mut response = agent().get(&server.url(&format!("/v1/jobs/{id}/events"))).call().unwrap();
    let text = response.body_mut().read_to_string().unwrap();
    text.lines().filter_map(|l| l.strip_prefix("event: ")).map(str::to_string).collect()
}

#[test]
fn load_cancel_storm_and_hang_ups() {
    let test_started = Instant::now();
    let max_queue = MAX_QUEUE.to_string();
    let server = Server::start("load", &["--max-queue", &max_queue, "--max-steps", "1000"]);
    // One image first (the model warmed up): the reference for the same request after the load.
    let reference = json!({ "prompt": "a shirt", "steps": 2, "seed": 0 });
    let (status, body, _) = post(&server.url("/sdapi/v1/txt2img"), &reference, None);
    assert_eq!(status, 200, "{body}");
    let reference_pixels = decode_png(&unb64(body["images"][0].as_str().unwrap())).0;
    let rss_before = server.memory_kb("VmHWM").expect("the server's /proc status");

    // 1. Load: every request answered, an image (its own) or 429.
    let load_started = Instant::now();
    let outcomes: Vec<Outcome> = std::thread::scope(|scope| {
        let clients: Vec<_> = (0..CLIENTS)
            .map(|client| {
                let server = &server;
                scope.spawn(move || {
                    (0..REQUESTS_PER_CLIENT)
                        .map(|index| {
                            let outcome = request(server, client, index);
                            if outcome.status == 429 {
                                std::thread::sleep(Duration::from_millis(50));
                            }
                            outcome
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        clients.into_iter().flat_map(|c| c.join().unwrap()).collect()
    });
    let requests = CLIENTS * REQUESTS_PER_CLIENT;
    assert_eq!(outcomes.len(), requests);
    let images: Vec<&Outcome> = outcomes.iter().filter(|o| o.status == 200).collect();
    let refused = outcomes.iter().filter(|o| o.status == 429).count();
    assert_eq!(images.len() + refused, requests, "every request is an image or a 429");
    assert!(!images.is_empty());
    let jobs: HashSet<&str> = images.iter().map(|o| o.job.as_deref().expect("a job id")).collect();
    assert_eq!(jobs.len(), images.len(), "two requests answered by one job");
    let seeds: HashSet<u64> = images.iter().map(|o| o.seed).collect();
    assert_eq!(seeds.len(), images.len());
    let mut latencies: Vec<Duration> = images.iter().map(|o| o.latency).collect();
    latencies.sort();
    let mut refusals: Vec<Duration> = outcomes.iter().filter(|o| o.status == 429).map(|o| o.latency).collect();
    refusals.sort();
    let load_time = load_started.elapsed();
    drained(&server, Duration::from_secs(10));

    // 2. A cancel storm: long jobs until the queue is full, then 8 clients DELETE every one of
    // them (and ids that do not exist) at once, three times over.
    let long = json!({ "prompt": "a bag", "steps": 400, "seed": 1, "scheduler": "ddim" });
    let (status, first, _) = post(&server.url("/v1/jobs"), &long, None);
    assert_eq!(status, 202, "{first}");
    let mut ids = vec![first["id"].as_str().unwrap().to_string()];
    wait_running(&server, 1);
    loop {
        let (status, created, _) = post(&server.url("/v1/jobs"), &long, None);
        if status == 429 {
            break;
        }
        assert_eq!(status, 202, "{created}");
        ids.push(created["id"].as_str().unwrap().to_string());
        assert!(ids.len() <= MAX_QUEUE + 1, "the queue took more than --max-queue");
    }
    assert_eq!(ids.len(), MAX_QUEUE + 1, "one running, --max-queue waiting");
    let storm_started = Instant::now();
    let answers: Vec<u16> = std::thread::scope(|scope| {
        let storms: Vec<_> = (0..8)
            .map(|client| {
                let (server, ids) = (&server, &ids);
                scope.spawn(move || {
                    let mut answers = Vec::new();
                    for round in 0..3 {
                        for k in 0..ids.len() {
                            let id = &ids[(k + client + round) % ids.len()];
                            answers.push(delete(&server.url(&format!("/v1/jobs/{id}"))).0);
                        }
                        let (status, _) = delete(&server.url(&format!("/v1/jobs/nope-{client}-{round}")));
                        assert_eq!(status, 404);
                    }
                    answers
                })
            })
            .collect();
        storms.into_iter().flat_map(|s| s.join().unwrap()).collect()
    });
    assert!(answers.iter().all(|s| *s == 200), "DELETE of a live or cancelled job: {answers:?}");
    drained(&server, Duration::from_secs(10));
    let storm_time = storm_started.elapsed();
    for (index, id) in ids.iter().enumerate() {
        let (_, job) = get(&server.url(&format!("/v1/jobs/{id}")), None);
        assert_eq!(job["status"], "cancelled", "{job}");
        let names = event_names(&server, id);
        assert_eq!(names.iter().filter(|n| matches!(n.as_str(), "done" | "failed" | "cancelled")).count(), 1, "{names:?}");
        assert_eq!(names.last().map(String::as_str), Some("cancelled"));
        assert!(names.iter().filter(|n| *n == "step").count() < 400, "job {index} ran to the end");
    }

    // 3. Clients that hang up: 8 start long A1111 requests (5 get a job, the rest 429) and
    // close their connections, 2 close halfway through sending their body. Every job ends
    // cancelled; none is left queued or running.
    let address = server.address();
    let body = json!({ "prompt": "a bag", "steps": 300, "sampler_name": "DDIM" }).to_string();
    let mut streams = Vec::new();
    for client in 0..8 {
        let mut stream = TcpStream::connect(&address).unwrap();
        write!(stream, "POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
        streams.push(stream);
        if client == 0 {
            // The others queue behind a running job.
            wait_running(&server, 1);
        }
    }
    for _ in 0..2 {
        let mut stream = TcpStream::connect(&address).unwrap();
        write!(stream, "POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{}", body.len(), &body[..10]).unwrap();
        streams.push(stream);
    }
    let started = Instant::now();
    let hung = loop {
        let (_, jobs) = get(&server.url("/v1/jobs"), None);
        let open: Vec<String> =
            jobs["jobs"].as_array().unwrap().iter().filter(|j| j["status"] == "queued" || j["status"] == "running").map(|j| j["id"].as_str().unwrap().to_string()).collect();
        if open.len() == MAX_QUEUE + 1 {
            break open;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the hung-up clients' jobs: {jobs}");
        std::thread::sleep(Duration::from_millis(20));
    };
    drop(streams);
    let hang_up_started = Instant::now();
    drained(&server, Duration::from_secs(10));
    let hang_up_time = hang_up_started.elapsed();
    for id in &hung {
        let (_, job) = get(&server.url(&format!("/v1/jobs/{id}")), None);
        assert_eq!(job["status"], "cancelled", "{job}");
    }

    // The server goes on: the first request again gives the same image; it remembers a
    // bounded number of jobs; its memory stayed bounded; nothing panicked.
    let (status, body, _) = post(&server.url("/sdapi/v1/txt2img"), &reference, None);
    assert_eq!(status, 200, "{body}");
    assert!(decode_png(&unb64(body["images"][0].as_str().unwrap())).0 == reference_pixels, "the same request after the load gives another image");
    let (_, jobs) = get(&server.url("/v1/jobs"), None);
    let remembered = jobs["jobs"].as_array().unwrap().len();
    assert!(remembered <= 64, "{remembered} jobs remembered");
    let rss_after = server.memory_kb("VmHWM").unwrap();
    let stderr = std::fs::read_to_string(&server.stderr).unwrap();
    assert!(!stderr.contains("panicked"), "{stderr}");

    eprintln!(
        "load: {requests} requests ({CLIENTS} clients x {REQUESTS_PER_CLIENT}, 1-2 steps, --max-queue {MAX_QUEUE}), {} answered: {} images, {refused} x 429, none lost or duplicated, in {:.1} s",
        images.len() + refused,
        images.len(),
        load_time.as_secs_f64()
    );
    eprintln!(
        "latency of an image: p50 {} ms, p95 {} ms; of a 429: p50 {} ms, p95 {} ms",
        ms(percentile(&latencies, 50)),
        ms(percentile(&latencies, 95)),
        ms(percentile(&refusals, 50)),
        ms(percentile(&refusals, 95))
    );
    eprintln!(
        "cancel storm: {} DELETEs (+24 unknown ids) on {} jobs, all cancelled in {} ms; hang-ups: {} jobs of 10 clients cancelled in {} ms",
        answers.len(),
        ids.len(),
        storm_time.as_millis(),
        hung.len(),
        hang_up_time.as_millis()
    );
    eprintln!(
        "server peak RSS (VmHWM): {} MB after one image, {} MB at the end; {remembered} jobs remembered; {:.1} s in all",
        rss_before / 1024,
        rss_after / 1024,
        test_started.elapsed().as_secs_f64()
    );
    assert!(rss_after < rss_before + 256 * 1024, "the server's peak memory grew from {rss_before} kB to {rss_after} kB");
}
