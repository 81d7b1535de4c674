//! What the `diffuse serve` tests share (serve.rs, serve_page.rs, serve_load.rs,
//! serve_redis.rs): the real binary on a free port, a blocking HTTP client, PNG decoding, `diffuse generate`.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine;
use serde_json::Value;

pub fn cache_dir() -> PathBuf {
    // Per process: a fresh hash cache for each run of the tests.
    Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("diffuse-serve-test-cache-{}", std::process::id()))
}

pub fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("diffuse-serve-test-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A running `diffuse serve --port 0`, killed when dropped.
pub struct Server {
    pub child: Child,
    pub base: String,
    pub stderr: PathBuf,
}

impl Server {
    pub fn start(name: &str, args: &[&str]) -> Server {
        let stderr = scratch(&format!("server-{name}")).join("stderr.txt");
        let mut child = Command::new(env!("CARGO_BIN_EXE_diffuse"))
            .args(["serve", "--port", "0"])
            .args(args)
            .env("DIFFUSE_CACHE_DIR", cache_dir())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        loop {
            line.clear();
            if stdout.read_line(&mut line).unwrap() == 0 {
                panic!("the server ended before listening: {}", std::fs::read_to_string(&stderr).unwrap_or_default());
            }
            if let Some(address) = line.trim().strip_prefix("listening on ") {
                return Server { child, base: address.to_string(), stderr };
            }
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `host:port`.
    pub fn address(&self) -> String {
        self.base.strip_prefix("http://").unwrap().to_string()
    }

    /// A line of the server's /proc status (`VmHWM`, `VmRSS`), in kB.
    pub fn memory_kb(&self, field: &str) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let line = status.lines().find(|l| l.starts_with(&format!("{field}:")))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(Duration::from_secs(120))).build().into()
}

/// (status, JSON body, Retry-After).
pub fn answer(response: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> (u16, Value, Option<String>) {
    let mut response = response.unwrap();
    let status = response.status().as_u16();
    let retry_after = response.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
    let text = response.body_mut().with_config().limit(200 << 20).read_to_string().unwrap();
    let body = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}"));
    (status, body, retry_after)
}

pub fn post(url: &str, body: &Value, auth: Option<&str>) -> (u16, Value, Option<String>) {
    let mut request = agent().post(url).header("Content-Type", "application/json");
    if let Some(auth) = auth {
        request = request.header("Authorization", auth);
    }
    answer(request.send(body.to_string()))
}

pub fn post_raw(url: &str, body: Vec<u8>, content_type: &str) -> (u16, Value, Option<String>) {
    answer(agent().post(url).header("Content-Type", content_type).send(body))
}

pub fn get(url: &str, auth: Option<&str>) -> (u16, Value) {
    let mut request = agent().get(url);
    if let Some(auth) = auth {
        request = request.header("Authorization", auth);
    }
    let (status, body, _) = answer(request.call());
    (status, body)
}

pub fn delete(url: &str) -> (u16, Value) {
    let (status, body, _) = answer(agent().delete(url).call());
    (status, body)
}

pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub fn unb64(text: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD.decode(text).unwrap()
}

/// A PNG's pixels and its `parameters` text.
pub fn decode_png(bytes: &[u8]) -> (Vec<u8>, Option<String>) {
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    buf.truncate(info.buffer_size());
    let text = reader.info().uncompressed_latin1_text.iter().find(|t| t.keyword == "parameters").map(|t| t.text.clone());
    (buf, text)
}

/// A1111's skip on a txt2img of two batches of `steps` DDIM steps (seed 5), sent once
/// `running` has returned (it waits until the job runs): the first batch is dropped, the
/// second (seed 6) is made and answered.
pub fn check_a1111_skip(server: &Server, steps: u64, running: impl FnOnce()) {
    let url = server.url("/sdapi/v1/txt2img");
    let body = serde_json::json!({ "prompt": "a bag", "steps": steps, "n_iter": 2, "seed": 5, "sampler_name": "DDIM" });
    let client = std::thread::spawn(move || post(&url, &body, None));
    running();
    let (status, answer, _) = post(&server.url("/sdapi/v1/skip"), &serde_json::json!({}), None);
    assert_eq!((status, answer["skipped"].as_array().map(Vec::len)), (200, Some(1)), "{answer}");
    let (status, body, _) = client.join().unwrap();
    assert_eq!(status, 200, "{body}");
    let info: Value = serde_json::from_str(body["info"].as_str().unwrap()).unwrap();
    assert_eq!((info["skipped_iterations"].as_u64(), info["interrupted"].as_bool()), (Some(1), Some(false)), "{info}");
    assert_eq!(info["all_seeds"], serde_json::json!([6]), "the second batch, seed + batch_size");
}

/// `diffuse generate` with these flags; the PNG it wrote.
pub fn generate(dir: &Path, args: &[&str]) -> Vec<u8> {
    generate_images(dir, args, 1).swap_remove(0)
}

/// `diffuse generate` with these flags, making `count` images; the PNGs it wrote.
pub fn generate_images(dir: &Path, args: &[&str], count: usize) -> Vec<Vec<u8>> {
    let output = dir.join("generated.png");
    let out = Command::new(env!("CARGO_BIN_EXE_diffuse"))
        .arg("generate")
        .args(args)
        .args(["--quiet", "--output", output.to_str().unwrap()])
        .env("DIFFUSE_CACHE_DIR", cache_dir())
        .output()
        .unwrap();
    assert!(out.status.success(), "generate failed: {}", String::from_utf8_lossy(&out.stderr));
    if count == 1 {
        return vec![std::fs::read(&output).unwrap()];
    }
    (0..count).map(|i| std::fs::read(dir.join(format!("generated-{i}.png"))).unwrap()).collect()
}
