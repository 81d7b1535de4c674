//! `diffuse serve` as clients use it: the real binary on the built-in model, on a free port,
//! driven over HTTP. Images must be the ones `diffuse generate` makes, pixel for pixel.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod support;

use support::*;

/// txt2img and img2img give `diffuse generate`'s images and infotexts; png-info reads them
/// back; `generate --from` on a served PNG makes it again.
#[test]
fn a1111_images_are_generate_images() {
    let server = Server::start("a1111", &[]);
    let dir = scratch("a1111");
    let request = json!({
        "prompt": "a photo of a (sneaker:1.2)", "negative_prompt": "blurry", "steps": 6, "seed": 7, "cfg_scale": 7.5,
        "sampler_name": "Euler a", "sampler_index": "Euler", "scheduler": "automatic", "batch_size": 2, "n_iter": 1,
        "enable_hr": false, "styles": [], "restore_faces": false, "subseed": -1, "subseed_strength": 0, "tiling": true,
        "override_settings": {}, "send_images": true,
    });
    let (status, body, _) = post(&server.url("/sdapi/v1/txt2img"), &request, None);
    assert_eq!(status, 200, "{body}");
    let info: Value = serde_json::from_str(body["info"].as_str().expect("info is a JSON string")).unwrap();
    assert_eq!(info["seed"], 7);
    assert_eq!(info["all_seeds"], json!([7, 7]));
    assert_eq!(info["ignored_fields"], json!(["tiling"]), "{info}");
    assert_eq!(body["parameters"]["prompt"], request["prompt"]);
    let images: Vec<Vec<u8>> = body["images"].as_array().unwrap().iter().map(|i| unb64(i.as_str().unwrap())).collect();
    assert_eq!(images.len(), 2);
    let expected = generate_images(
        &dir,
        &[
            "--prompt", "a photo of a (sneaker:1.2)", "--negative-prompt", "blurry", "--steps", "6", "--seed", "7",
            "--guidance-scale", "7.5", "--scheduler", "euler-ancestral", "--num-images", "2", "--prompt-syntax", "a1111",
        ],
        2,
    );
    for (index, (served, made)) in images.iter().zip(&expected).enumerate() {
        let (served_pixels, served_text) = decode_png(served);
        let (made_pixels, made_text) = decode_png(made);
        assert_eq!(served_pixels, made_pixels, "image {index}: the served pixels differ from diffuse generate's");
        assert_eq!(served_text, made_text);
        assert_eq!(info["infotexts"][index].as_str(), served_text.as_deref());
    }

    // png-info reads the infotext back.
    let (status, read, _) = post(&server.url("/sdapi/v1/png-info"), &json!({ "image": format!("data:image/png;base64,{}", b64(&images[1])) }), None);
    assert_eq!(status, 200, "{read}");
    assert_eq!(read["info"].as_str(), decode_png(&images[1]).1.as_deref());
    assert_eq!(read["parameters"]["Seed"], "7");
    assert_eq!(read["parameters"]["Sampler"], "Euler a");

    // `generate --from` the served PNG (image 1 of its batch) makes it again.
    let served = dir.join("served.png");
    std::fs::write(&served, &images[1]).unwrap();
    let again = generate_images(&dir, &["--from", served.to_str().unwrap()], 1);
    assert_eq!(decode_png(&again[0]).0, decode_png(&images[1]).0);

    // seed -1: a random seed, the real one in info and in the infotext.
    let (status, body, _) = post(&server.url("/sdapi/v1/txt2img"), &json!({ "prompt": "a bag", "steps": 2, "seed": -1 }), None);
    assert_eq!(status, 200, "{body}");
    let info: Value = serde_json::from_str(body["info"].as_str().unwrap()).unwrap();
    let seed = info["seed"].as_u64().expect("a real seed");
    assert!(info["infotexts"][0].as_str().unwrap().contains(&format!("Seed: {seed},")));

    // img2img from a data: URL is generate --init-image.
    let init = dir.join("init.png");
    std::fs::write(&init, &images[0]).unwrap();
    let request = json!({
        "prompt": "a bag", "steps": 6, "seed": 3, "cfg_scale": 7.5, "sampler_name": "DDIM", "denoising_strength": 0.5,
        "init_images": [format!("data:image/png;base64,{}", b64(&images[0]))], "resize_mode": 0, "inpainting_fill": 1,
    });
    let (status, body, _) = post(&server.url("/sdapi/v1/img2img"), &request, None);
    assert_eq!(status, 200, "{body}");
    assert!(body["parameters"]["init_images"].is_null(), "the echo leaves the images out");
    let served = unb64(body["images"][0].as_str().unwrap());
    let made = generate_images(
        &dir,
        &["--prompt", "a bag", "--steps", "6", "--seed", "3", "--scheduler", "ddim", "--strength", "0.5", "--prompt-syntax", "a1111", "--init-image", init.to_str().unwrap()],
        1,
    );
    assert_eq!(decode_png(&served), decode_png(&made[0]));

    // The listings A1111 clients read.
    let (status, samplers) = get(&server.url("/sdapi/v1/samplers"), None);
    assert_eq!(status, 200);
    assert!(samplers.as_array().unwrap().iter().any(|s| s["name"] == "Euler a"));
    let (_, models) = get(&server.url("/sdapi/v1/sd-models"), None);
    assert_eq!(models[0]["model_name"], "builtin");
    let (_, options) = get(&server.url("/sdapi/v1/options"), None);
    assert_eq!(options["sd_model_checkpoint"], models[0]["title"]);
    let (status, _, _) = post(&server.url("/sdapi/v1/options"), &json!({ "sd_model_checkpoint": models[0]["title"] }), None);
    assert_eq!(status, 200);
    let (status, _, _) = post(&server.url("/sdapi/v1/options"), &json!({ "sd_model_checkpoint": "nope" }), None);
    assert_eq!(status, 422);
    for path in ["/sdapi/v1/schedulers", "/sdapi/v1/loras", "/sdapi/v1/scripts", "/sdapi/v1/progress"] {
        assert_eq!(get(&server.url(path), None).0, 200, "{path}");
    }
    let (_, progress) = get(&server.url("/sdapi/v1/progress"), None);
    assert_eq!(progress["state"]["job_count"], 0);
    let (status, interrupt, _) = post(&server.url("/sdapi/v1/interrupt"), &json!({}), None);
    assert_eq!(status, 200);
    assert!(interrupt.is_object());
}

/// The native job API: 202 with an id, status until done, the events replayed in full to a
/// subscriber who comes after the end.
#[test]
fn job_lifecycle_and_event_replay() {
    let server = Server::start("jobs", &[]);
    let (status, created, _) = post(&server.url("/v1/jobs"), &json!({ "prompt": "an ankle boot", "steps": 5, "seed": 3, "scheduler": "ddim" }), None);
    assert_eq!(status, 202, "{created}");
    let id = created["id"].as_str().unwrap().to_string();
    let started = Instant::now();
    let job = loop {
        let (status, job) = get(&server.url(&format!("/v1/jobs/{id}")), None);
        assert_eq!(status, 200);
        match job["status"].as_str().unwrap() {
            "done" => break job,
            "queued" | "running" => {}
            other => panic!("job {other}: {job}"),
        }
        assert!(started.elapsed() < Duration::from_secs(60), "the job did not finish");
        std::thread::sleep(Duration::from_millis(50));
    };
    let png = unb64(job["images"][0]["png"].as_str().unwrap());
    let (pixels, text) = decode_png(&png);
    assert!(text.unwrap().contains("Seed: 3,"));
    let dir = scratch("jobs");
    let made = generate_images(&dir, &["--prompt", "an ankle boot", "--steps", "5", "--seed", "3", "--scheduler", "ddim"], 1);
    assert_eq!(pixels, decode_png(&made[0]).0);

    // The events, replayed from the start after the job ended.
    let mut response = agent().get(&server.url(&format!("/v1/jobs/{id}/events"))).call().unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let mut text = String::new();
    response.body_mut().as_reader().read_to_string(&mut text).unwrap();
    let names: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("event: ")).collect();
    assert_eq!(names, ["queued", "started", "step", "step", "step", "step", "step", "done"], "{text}");
    let last_step: Value =
        serde_json::from_str(text.lines().filter(|l| l.starts_with("data: ")).nth(6).unwrap().strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!((last_step["step"].as_u64(), last_step["steps"].as_u64()), (Some(5), Some(5)));
    assert!(last_step["it_per_s"].as_f64().unwrap() > 0.0);

    assert_eq!(get(&server.url("/v1/jobs/nope"), None).0, 404);
    assert_eq!(delete(&server.url(&format!("/v1/jobs/{id}"))).0, 409, "a finished job cannot be cancelled");
}

/// DELETE stops a running job within a step and no other job; a full queue answers 429 with
/// Retry-After; the server goes on.
#[test]
fn cancel_and_full_queue() {
    let server = Server::start("cancel", &["--max-queue", "1", "--max-steps", "5000"]);
    let long = json!({ "prompt": "a bag", "steps": 500, "iterations": 3, "seed": 1, "scheduler": "ddim" });
    let (status, a, _) = post(&server.url("/v1/jobs"), &long, None);
    assert_eq!(status, 202, "{a}");
    let a = a["id"].as_str().unwrap().to_string();
    let started = Instant::now();
    loop {
        let (_, job) = get(&server.url(&format!("/v1/jobs/{a}")), None);
        if job["status"] == "running" && job["step"].as_u64().unwrap_or(0) >= 2 {
            break;
        }
        assert!(job["status"] == "queued" || job["status"] == "running", "{job}");
        assert!(started.elapsed() < Duration::from_secs(60), "job A never ran: {job}");
        std::thread::sleep(Duration::from_millis(20));
    }
    // B waits; C finds the queue full.
    let (status, b, _) = post(&server.url("/v1/jobs"), &json!({ "prompt": "a bag", "steps": 3, "seed": 2, "scheduler": "ddim" }), None);
    assert_eq!(status, 202, "{b}");
    let b = b["id"].as_str().unwrap().to_string();
    assert_eq!(b_position(&server, &b), Some(0));
    let (status, full, retry_after) = post(&server.url("/v1/jobs"), &long, None);
    assert_eq!(status, 429, "{full}");
    assert!(retry_after.unwrap().parse::<u64>().unwrap() >= 1);
    assert_eq!(full["error"]["type"], "queue_full");
    // A1111 routes share the queue.
    let (status, _, _) = post(&server.url("/sdapi/v1/txt2img"), &json!({ "prompt": "x", "steps": 2 }), None);
    assert_eq!(status, 429);

    // Cancelling A: it stops within a step, B then runs to the end.
    let (_, before) = get(&server.url(&format!("/v1/jobs/{a}")), None);
    let step_before = before["step"].as_u64().unwrap();
    let cancelled_at = Instant::now();
    let (status, answer) = delete(&server.url(&format!("/v1/jobs/{a}")));
    assert_eq!(status, 200, "{answer}");
    let job = loop {
        let (_, job) = get(&server.url(&format!("/v1/jobs/{a}")), None);
        if job["status"] != "running" {
            break job;
        }
        assert!(cancelled_at.elapsed() < Duration::from_secs(10), "the job did not stop");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(job["status"], "cancelled", "{job}");
    let mut response = agent().get(&server.url(&format!("/v1/jobs/{a}/events"))).call().unwrap();
    let mut text = String::new();
    response.body_mut().as_reader().read_to_string(&mut text).unwrap();
    assert_eq!(text.lines().filter_map(|l| l.strip_prefix("event: ")).last(), Some("cancelled"));
    let steps_run = text.lines().filter(|l| *l == "event: step").count() as u64;
    // Steps run after DELETE: the one in progress (the request's own time allows a few).
    let elapsed_steps = (cancelled_at.elapsed().as_secs_f64() * 1000.0) as u64;
    assert!(steps_run < step_before + 3 + elapsed_steps / 20, "{steps_run} steps ran, {step_before} before the cancel");
    assert!(steps_run < 500);

    let started = Instant::now();
    loop {
        let (_, job) = get(&server.url(&format!("/v1/jobs/{b}")), None);
        if job["status"] == "done" {
            break;
        }
        assert!(job["status"] == "queued" || job["status"] == "running", "{job}");
        assert!(started.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(20));
    }
    // A queued job cancelled never runs.
    let (status, c, _) = post(&server.url("/v1/jobs"), &long, None);
    assert_eq!(status, 202, "{c}");
    let c = c["id"].as_str().unwrap().to_string();
    let (_, d, _) = post(&server.url("/v1/jobs"), &json!({ "prompt": "a bag", "steps": 2 }), None);
    let d = d["id"].as_str().unwrap().to_string();
    let (status, answer) = delete(&server.url(&format!("/v1/jobs/{d}")));
    assert_eq!((status, answer["was"].as_str()), (200, Some("queued")), "{answer}");
    assert_eq!(get(&server.url(&format!("/v1/jobs/{d}")), None).1["status"], "cancelled");
    assert_eq!(delete(&server.url(&format!("/v1/jobs/{c}"))).0, 200);
}

fn b_position(server: &Server, id: &str) -> Option<u64> {
    get(&server.url(&format!("/v1/jobs/{id}")), None).1["position"].as_u64()
}

/// `--api-key`: bearer or Basic auth on every API route, 401 JSON without; the page loads
/// without it.
#[test]
fn api_key() {
    let server = Server::start("auth", &["--api-key", "sekrit"]);
    let url = server.url("/sdapi/v1/samplers");
    let (status, body) = get(&url, None);
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["type"], "authentication_error");
    assert_eq!(get(&url, Some("Bearer sekrit")).0, 200);
    assert_eq!(get(&url, Some(&format!("Basic {}", b64(b"user:sekrit")))).0, 200);
    assert_eq!(get(&url, Some(&format!("Basic {}", b64(b"sekrit:wrong")))).0, 401);
    assert_eq!(get(&url, Some("Bearer wrong")).0, 401);
    assert_eq!(get(&server.url("/v1/models"), None).0, 401);
    let (status, _, _) = post(&server.url("/v1/jobs"), &json!({ "prompt": "x" }), None);
    assert_eq!(status, 401);
    let mut page = agent().get(&server.url("/?api_key=sekrit")).call().unwrap();
    assert_eq!(page.status().as_u16(), 200);
    let html = page.body_mut().read_to_string().unwrap();
    for hook in ["id=\"prompt\"", "id=\"negative-prompt\"", "id=\"steps\"", "id=\"seed\"", "id=\"sampler\"", "id=\"generate\"", "id=\"progress\"", "id=\"gallery\""] {
        assert!(html.contains(hook), "the page has no {hook}");
    }
    assert!(!html.contains("http://") && !html.contains("https://"), "the page loads nothing from elsewhere");

    // Beyond loopback without a key: a warning.
    let open = Server::start("open", &["--host", "0.0.0.0"]);
    let stderr = std::fs::read_to_string(&open.stderr).unwrap();
    assert!(stderr.contains("warning: listening on 0.0.0.0 without --api-key"), "{stderr}");
    assert!(!std::fs::read_to_string(&server.stderr).unwrap().contains("warning"));
}

/// Bad input is a 4xx JSON answer naming the field, never a dead server.
#[test]
fn bad_input_names_the_field() {
    let server = Server::start("bad", &["--max-body-mb", "1", "--max-steps", "100", "--max-images", "4"]);
    let txt2img = server.url("/sdapi/v1/txt2img");
    let img2img = server.url("/sdapi/v1/img2img");
    let jobs = server.url("/v1/jobs");
    let openai = server.url("/v1/images/generations");
    let cases: Vec<(&str, Value, u16, &str)> = vec![
        (&txt2img, json!({ "steps": "x" }), 400, "steps"),
        (&txt2img, json!({ "steps": 0 }), 422, "steps"),
        (&txt2img, json!({ "steps": 101 }), 422, "steps"),
        (&txt2img, json!({ "width": 33 }), 422, "width"),
        (&txt2img, json!({ "height": 4096 }), 422, "height"),
        (&txt2img, json!({ "sampler_name": "Euler Foo" }), 422, "sampler_name"),
        (&txt2img, json!({ "sampler_name": "Euler", "scheduler": "polyexponential" }), 422, "scheduler"),
        (&txt2img, json!({ "batch_size": 3, "n_iter": 2 }), 422, "batch_size"),
        (&txt2img, json!({ "seed": "seven" }), 422, "seed"),
        (&txt2img, json!({ "override_settings": { "sd_model_checkpoint": "nope" } }), 422, "override_settings.sd_model_checkpoint"),
        (&img2img, json!({ "prompt": "x" }), 422, "init_images"),
        (&img2img, json!({ "init_images": ["not base64!"] }), 400, "init_images[0]"),
        (&img2img, json!({ "init_images": [b64(b"hello, not an image")] }), 400, "init_images[0]"),
        (&jobs, json!({ "scheduler": "nope" }), 422, "scheduler"),
        (&jobs, json!({ "num_images": 5 }), 422, "num_images"),
        (&jobs, json!({ "prompt_syntax": "klingon" }), 422, "prompt_syntax"),
        (&jobs, json!({ "scheduler_config": { "num_train_timesteps": 1e12 } }), 422, "scheduler_config"),
        (&jobs, json!({ "init_image": "data:image/png;base64,!!!" }), 400, "init_image"),
        (&jobs, json!({ "prompt": "(unbalanced:1.2", "prompt_syntax": "a1111", "guidance_scale": 7.0 }), 200, ""),
        (&jobs, json!({ "prompt": "<lora:missing:1>", "prompt_syntax": "a1111" }), 422, "prompt"),
        (&openai, json!({ "prompt": "x", "size": "100x100" }), 422, "size"),
        (&openai, json!({ "prompt": "x", "size": "big" }), 400, "size"),
    ];
    for (url, body, status, field) in cases {
        let (got, answer, _) = post(url, &body, None);
        if status == 200 {
            assert!(got < 500, "{url} {body}: {got} {answer}");
            continue;
        }
        assert_eq!(got, status, "{url} {body}: {answer}");
        assert_eq!(answer["error"]["param"], field, "{url} {body}: {answer}");
        assert!(answer["detail"].as_str().is_some_and(|d| !d.is_empty()));
    }
    let (status, answer, _) = post_raw(&txt2img, b"{\"prompt\": ".to_vec(), "application/json");
    assert_eq!((status, answer["error"]["param"].as_str()), (400, Some("body")), "{answer}");
    // The server answers 413 as soon as it sees the size and closes the connection; a client
    // still writing the body may then get a broken pipe or a reset instead of the answer
    // (curl says "Failed sending data"). Either is the refusal; anything else is not.
    match agent().post(&txt2img).header("Content-Type", "application/json").send(vec![b' '; 2 << 20]) {
        Ok(response) => {
            let (status, answer, _) = support::answer(Ok(response));
            assert_eq!((status, answer["error"]["param"].as_str()), (413, Some("body")), "{answer}");
        }
        Err(ureq::Error::Io(e)) => {
            use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset};
            assert!(matches!(e.kind(), BrokenPipe | ConnectionReset | ConnectionAborted), "oversized body: {e}");
        }
        Err(e) => panic!("oversized body: {e}"),
    }
    // Still serving.
    let (status, body, _) = post(&txt2img, &json!({ "prompt": "a bag", "steps": 2 }), None);
    assert_eq!(status, 200, "{body}");
}

/// Steps the scheduler cannot schedule (more than its training timesteps, here 1000) are
/// refused up front with 422 naming the field, on every route, not accepted and failed later.
#[test]
fn steps_beyond_the_scheduler_are_refused_up_front() {
    let server = Server::start("schedule", &["--max-steps", "5000"]);
    let png = generate(&scratch("schedule"), &["--prompt", "a bag", "--steps", "2", "--seed", "1"]);
    let cases: Vec<(&str, Value, &str)> = vec![
        ("/v1/jobs", json!({ "prompt": "a bag", "steps": 1001 }), "steps"),
        ("/v1/jobs", json!({ "prompt": "a bag", "steps": 60, "scheduler": "ddim", "scheduler_config": { "num_train_timesteps": 50 } }), "steps"),
        ("/v1/jobs", json!({ "prompt": "a bag", "steps": 1001, "init_image": b64(&png), "strength": 0.5 }), "steps"),
        ("/sdapi/v1/txt2img", json!({ "prompt": "a bag", "steps": 1001 }), "steps"),
        ("/sdapi/v1/txt2img", json!({ "prompt": "a bag", "steps": 1001, "sampler_name": "DDIM" }), "steps"),
        ("/sdapi/v1/img2img", json!({ "prompt": "a bag", "steps": 1500, "init_images": [b64(&png)] }), "steps"),
        ("/v1/images/generations", json!({ "prompt": "a bag", "steps": 1001 }), "steps"),
        ("/v1/jobs", json!({ "prompt": "a bag", "steps": 2, "scheduler_config": { "beta_schedule": "sideways" } }), "scheduler_config"),
    ];
    for (path, body, field) in cases {
        let (status, answer, _) = post(&server.url(path), &body, None);
        assert_eq!(status, 422, "{path} {body}: {answer}");
        assert_eq!(answer["error"]["param"], field, "{path} {body}: {answer}");
        let detail = answer["detail"].as_str().unwrap();
        assert!(detail.contains("steps") || field != "steps", "{detail}");
    }
    // Nothing was queued; a request the scheduler can do still runs.
    let (_, jobs) = get(&server.url("/v1/jobs"), None);
    assert_eq!(jobs["jobs"].as_array().map(Vec::len), Some(0), "{jobs}");
    let (status, body, _) = post(&server.url("/sdapi/v1/txt2img"), &json!({ "prompt": "a bag", "steps": 2 }), None);
    assert_eq!(status, 200, "{body}");
}

/// OpenAI's Images API: b64_json images (those of generate), `url` refused with 400, models
/// listed, edits from multipart.
#[test]
fn openai_images() {
    let server = Server::start("openai", &[]);
    let request = json!({ "model": "builtin", "prompt": "a shirt", "n": 2, "size": "32x32", "response_format": "b64_json", "seed": 5, "steps": 4, "quality": "hd" });
    let (status, body, _) = post(&server.url("/v1/images/generations"), &request, None);
    assert_eq!(status, 200, "{body}");
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    let dir = scratch("openai");
    let made = generate_images(&dir, &["--prompt", "a shirt", "--num-images", "2", "--seed", "5", "--steps", "4", "--width", "32", "--height", "32"], 2);
    for (served, made) in data.iter().zip(&made) {
        assert_eq!(decode_png(&unb64(served["b64_json"].as_str().unwrap())).0, decode_png(made).0);
    }
    let (status, body, _) = post(&server.url("/v1/images/generations"), &json!({ "prompt": "a shirt", "response_format": "url" }), None);
    assert_eq!(status, 400);
    assert_eq!(body["error"]["param"], "response_format");
    assert!(body["error"]["message"].as_str().unwrap().contains("b64_json"));
    let (status, body, _) = post(&server.url("/v1/images/generations"), &json!({ "prompt": "x", "model": "dall-e-3" }), None);
    assert_eq!((status, body["error"]["param"].as_str()), (422, Some("model")));
    let (status, models) = get(&server.url("/v1/models"), None);
    assert_eq!(status, 200);
    assert_eq!(models["data"][0]["id"], "builtin");

    // Edits: multipart image (+ mask), as the OpenAI client sends them.
    let image = unb64(data[0]["b64_json"].as_str().unwrap());
    let boundary = "diffuseboundary";
    let mut body = Vec::new();
    for (name, value) in [("prompt", "a bag"), ("n", "1"), ("steps", "3"), ("seed", "9"), ("response_format", "b64_json")] {
        body.extend(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n").as_bytes());
    }
    body.extend(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"i.png\"\r\nContent-Type: image/png\r\n\r\n").as_bytes());
    body.extend(&image);
    body.extend(format!("\r\n--{boundary}--\r\n").as_bytes());
    let (status, answer, _) = post_raw(&server.url("/v1/images/edits"), body, &format!("multipart/form-data; boundary={boundary}"));
    assert_eq!(status, 200, "{answer}");
    let edited = unb64(answer["data"][0]["b64_json"].as_str().unwrap());
    assert!(decode_png(&edited).1.unwrap().contains("Denoising strength: 0.8"));
}

/// The job of the running `txt2img`, once it has run `steps` steps.
fn wait_running(server: &Server, steps: u64) -> Value {
    let started = Instant::now();
    loop {
        let (_, jobs) = get(&server.url("/v1/jobs"), None);
        if let Some(job) = jobs["jobs"].as_array().unwrap().iter().find(|j| j["status"] == "running" && j["step"].as_u64().unwrap_or(0) >= steps) {
            return job.clone();
        }
        assert!(started.elapsed() < Duration::from_secs(60), "no job ran: {jobs}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_status(server: &Server, id: &str, status: &str) {
    let started = Instant::now();
    loop {
        let (_, job) = get(&server.url(&format!("/v1/jobs/{id}")), None);
        if job["status"] == status {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "job {id} is not {status}: {job}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A1111's interrupt answers the interrupted request with what it has; a client that hangs
/// up cancels its job; SIGTERM cancels the running job, says which, and ends the server.
#[test]
fn interrupt_hang_up_and_shutdown() {
    use std::io::Write;
    let mut server = Server::start("shutdown", &["--max-steps", "2000"]);
    let long = json!({ "prompt": "a bag", "steps": 500, "n_iter": 2, "sampler_name": "DDIM" });

    // Interrupt: the waiting client gets 200 with `interrupted` in info.
    let url = server.url("/sdapi/v1/txt2img");
    let body = long.clone();
    let client = std::thread::spawn(move || post(&url, &body, None));
    wait_running(&server, 2);
    let (status, answer, _) = post(&server.url("/sdapi/v1/interrupt"), &json!({}), None);
    assert_eq!(status, 200);
    assert_eq!(answer["interrupted"].as_array().unwrap().len(), 1);
    let (status, body, _) = client.join().unwrap();
    assert_eq!(status, 200, "{body}");
    let info: Value = serde_json::from_str(body["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["interrupted"], true);

    // Skip: the running batch is dropped, the next one is made.
    check_a1111_skip(&server, 40, || {
        wait_running(&server, 2);
    });

    // Hang up: the job is cancelled.
    let address = server.base.strip_prefix("http://").unwrap().to_string();
    let mut stream = std::net::TcpStream::connect(&address).unwrap();
    let text = long.to_string();
    write!(stream, "POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{text}", text.len()).unwrap();
    let job = wait_running(&server, 2);
    drop(stream);
    wait_status(&server, job["id"].as_str().unwrap(), "cancelled");

    // SIGTERM while a job runs.
    let (_, created, _) = post(&server.url("/v1/jobs"), &json!({ "prompt": "a bag", "steps": 500, "scheduler": "ddim" }), None);
    let id = created["id"].as_str().unwrap().to_string();
    wait_status(&server, &id, "running");
    let killed = Command::new("kill").args(["-TERM", &server.child.id().to_string()]).status().unwrap();
    assert!(killed.success());
    let started = Instant::now();
    let exit = loop {
        if let Some(exit) = server.child.try_wait().unwrap() {
            break exit;
        }
        assert!(started.elapsed() < Duration::from_secs(15), "the server did not exit");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "{exit:?}");
    let stderr = std::fs::read_to_string(&server.stderr).unwrap();
    assert!(stderr.contains(&format!("cancelled job {id} (running")), "{stderr}");
}

/// The job of `id` once it is done.
fn wait_done(server: &Server, id: &str) -> Value {
    let started = Instant::now();
    loop {
        let (_, job) = get(&server.url(&format!("/v1/jobs/{id}")), None);
        match job["status"].as_str().unwrap() {
            "done" => return job,
            "queued" | "running" => {}
            other => panic!("job {other}: {job}"),
        }
        assert!(started.elapsed() < Duration::from_secs(60), "the job did not finish");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../diffuse/tests/fixtures")
}

/// Two models at once (the tiny SD fixture beside the built-in one), `<lora:>` tags from
/// --lora-dir as `generate --prompt-syntax a1111` reads them, sd_model_checkpoint, and live
/// previews that leave the image as it is.
#[test]
fn models_loras_and_previews() {
    let sd1 = fixtures().join("sd/sd1");
    let loras = fixtures().join("lora");
    let server = Server::start("models", &["--model", "builtin", "--model", sd1.to_str().unwrap(), "--lora-dir", loras.to_str().unwrap()]);
    let (_, models) = get(&server.url("/v1/models"), None);
    let names: Vec<&str> = models["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(names, ["builtin", "sd1"]);
    let (_, listed) = get(&server.url("/sdapi/v1/loras"), None);
    assert!(listed.as_array().unwrap().iter().any(|l| l["name"] == "peft_a"), "{listed}");

    let dir = scratch("models");
    let prompt = "a photo of a cat <lora:peft_a:0.6>";
    let request = json!({ "prompt": prompt, "steps": 4, "seed": 0, "cfg_scale": 7.5, "override_settings": { "sd_model_checkpoint": "sd1" } });
    for round in 0..2 {
        // The second round reuses the pipeline loaded with the LoRA.
        let (status, body, _) = post(&server.url("/sdapi/v1/txt2img"), &request, None);
        assert_eq!(status, 200, "{body}");
        let served = unb64(body["images"][0].as_str().unwrap());
        let made = generate_images(
            &dir,
            &["--model", sd1.to_str().unwrap(), "--prompt", prompt, "--steps", "4", "--seed", "0", "--prompt-syntax", "a1111", "--lora-dir", loras.to_str().unwrap()],
            1,
        );
        assert_eq!(decode_png(&served), decode_png(&made[0]), "round {round}");
        assert!(decode_png(&served).1.unwrap().contains("Lora hashes: \"peft_a: "));
    }
    // Without the tag: the model as loaded, not the LoRA pipeline.
    let (status, body, _) = post(&server.url("/sdapi/v1/txt2img"), &json!({ "prompt": "a photo of a cat", "steps": 4, "seed": 0, "cfg_scale": 7.5, "override_settings": { "sd_model_checkpoint": "sd1" } }), None);
    assert_eq!(status, 200, "{body}");
    let made = generate_images(&dir, &["--model", sd1.to_str().unwrap(), "--prompt", "a photo of a cat", "--steps", "4", "--seed", "0", "--prompt-syntax", "a1111"], 1);
    assert_eq!(decode_png(&unb64(body["images"][0].as_str().unwrap())), decode_png(&made[0]));

    // sd_model_checkpoint makes sd1 the default.
    let (status, _, _) = post(&server.url("/sdapi/v1/options"), &json!({ "sd_model_checkpoint": "sd1" }), None);
    assert_eq!(status, 200);
    let (_, created, _) = post(&server.url("/v1/jobs"), &json!({ "prompt": "a photo of a cat", "steps": 4, "seed": 0, "scheduler": "ddim", "preview": true }), None);
    let job = wait_done(&server, created["id"].as_str().unwrap());
    assert_eq!(job["model"], "sd1");
    let made = generate_images(&dir, &["--model", sd1.to_str().unwrap(), "--prompt", "a photo of a cat", "--steps", "4", "--seed", "0", "--scheduler", "ddim"], 1);
    assert_eq!(decode_png(&unb64(job["images"][0]["png"].as_str().unwrap())), decode_png(&made[0]), "a preview changes nothing");
    let mut response = agent().get(&server.url(&format!("/v1/jobs/{}/events", job["id"].as_str().unwrap()))).call().unwrap();
    let mut text = String::new();
    response.body_mut().as_reader().read_to_string(&mut text).unwrap();
    assert_eq!(text.lines().filter(|l| *l == "event: preview").count(), 4, "{text}");
}

/// Single-file checkpoints: the scheduler a request names is built from the file's own config,
/// and an LCM-distilled file runs with LCMScheduler, 4 steps and guidance 8.5 unless the request
/// says otherwise, as `diffuse generate` runs it. (At 64x64: the fixture's own size is 512.)
#[test]
fn single_file_checkpoints() {
    use candle_core::Device;
    let dir = scratch("single-file");
    let checkpoint = fixtures().join("single_file/sd1_pipeline/model.safetensors");
    let lcm = dir.join("lcm.safetensors");
    let mut tensors = candle_core::safetensors::load(&checkpoint, &Device::Cpu).unwrap();
    tensors.extend(candle_core::safetensors::load(fixtures().join("single_file/lcm_cond_proj.safetensors"), &Device::Cpu).unwrap());
    candle_core::safetensors::save(&tensors, &lcm).unwrap();
    let server = Server::start("single-file", &["--model", checkpoint.to_str().unwrap(), "--model", lcm.to_str().unwrap()]);

    let (status, body, _) = post(&server.url("/sdapi/v1/txt2img"), &json!({ "prompt": "a cat", "steps": 3, "seed": 4, "cfg_scale": 7.5, "sampler_name": "Euler", "width": 64, "height": 64 }), None);
    assert_eq!(status, 200, "{body}");
    let made = generate_images(&dir, &["--model", checkpoint.to_str().unwrap(), "--prompt", "a cat", "--steps", "3", "--seed", "4", "--scheduler", "euler", "--prompt-syntax", "a1111", "--width", "64", "--height", "64"], 1);
    assert_eq!(decode_png(&unb64(body["images"][0].as_str().unwrap())), decode_png(&made[0]));

    let (status, created, _) = post(&server.url("/v1/jobs"), &json!({ "model": "lcm", "prompt": "a cat", "seed": 2, "width": 64, "height": 64 }), None);
    assert_eq!(status, 202, "{created}");
    let job = wait_done(&server, created["id"].as_str().unwrap());
    let made = generate_images(&dir, &["--model", lcm.to_str().unwrap(), "--prompt", "a cat", "--seed", "2", "--width", "64", "--height", "64"], 1);
    let (pixels, text) = decode_png(&unb64(job["images"][0]["png"].as_str().unwrap()));
    assert_eq!((pixels, text.clone()), decode_png(&made[0]));
    assert!(text.unwrap().contains("Steps: 4, Sampler: LCM"));
}
