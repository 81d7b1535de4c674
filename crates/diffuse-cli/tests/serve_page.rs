//! The web page of `diffuse serve` in a real headless Chromium, driven through chromedriver
//! with the W3C WebDriver protocol (plain HTTP and JSON, spoken here with ureq): the page
//! loads, a generation through its form gives `diffuse generate`'s image, the progress bar
//! moves and the live preview shows, cancel stops the job, `/?api_key=KEY` works.
//!
//! Where no Chromium or chromedriver is installed (Debian: `apt-get install chromium
//! chromium-driver`; or set CHROME_BIN and CHROMEDRIVER) each test says so and returns.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{decode_png, generate, get, scratch, unb64, Server};

/// One browser at a time (two cores; the tests are slow enough one by one).
static ONE_BROWSER: Mutex<()> = Mutex::new(());

/// The W3C WebDriver key of an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// An executable named by `variable`, or the first of `names` on PATH (or at `extra` paths).
fn program(variable: &str, names: &[&str], extra: &[&str]) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(variable).filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(path)).filter(|p| p.is_file());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in names {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Some(candidate);
            }
        }
    }
    extra.iter().map(PathBuf::from).find(|p| p.is_file())
}

/// (chromedriver, the browser), or None with the reason printed.
fn installed() -> Option<(PathBuf, PathBuf)> {
    let driver = program("CHROMEDRIVER", &["chromedriver"], &["/usr/lib/chromium/chromedriver"]);
    let browser = program("CHROME_BIN", &["chromium", "chromium-browser", "google-chrome", "google-chrome-stable"], &["/usr/lib/chromium/chromium"]);
    match (driver, browser) {
        (Some(driver), Some(browser)) => Some((driver, browser)),
        (driver, browser) => {
            let missing: Vec<&str> = [(driver.is_none(), "chromedriver"), (browser.is_none(), "chromium")].iter().filter(|m| m.0).map(|m| m.1).collect();
            eprintln!(
                "skipped: no {} installed, so the page is not tested in a browser (Debian: apt-get install chromium chromium-driver; or set CHROMEDRIVER and CHROME_BIN)",
                missing.join(" and ")
            );
            None
        }
    }
}

/// A chromedriver on a free loopback port, killed when dropped.
struct Driver {
    child: Child,
    base: String,
}

impl Driver {
    fn start(program: &Path, log: &Path) -> Driver {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut child = Command::new(program)
            .arg(format!("--port={port}"))
            .stdout(std::fs::File::create(log).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        let base = format!("http://127.0.0.1:{port}");
        let started = Instant::now();
        loop {
            if let Ok(Some(exit)) = child.try_wait() {
                panic!("chromedriver ended ({exit}): {}", std::fs::read_to_string(log).unwrap_or_default());
            }
            if let Ok(mut response) = support::agent().get(&format!("{base}/status")).call() {
                let status: Value = serde_json::from_str(&response.body_mut().read_to_string().unwrap_or_default()).unwrap_or_default();
                if status["value"]["ready"] == true {
                    return Driver { child, base };
                }
            }
            assert!(started.elapsed() < Duration::from_secs(30), "chromedriver was not ready in 30 s");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A headless Chromium session; closed when dropped.
struct Browser<'a> {
    driver: &'a Driver,
    session: String,
}

impl<'a> Browser<'a> {
    fn open(driver: &'a Driver, binary: &Path, profile: &Path) -> Browser<'a> {
        let capabilities = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": binary,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,900",
                    "--no-first-run", "--no-default-browser-check", format!("--user-data-dir={}", profile.display()),
                ],
            },
        } } });
        let value = call(driver, "POST", "/session", Some(capabilities));
        let session = value["sessionId"].as_str().unwrap_or_else(|| panic!("no session: {value}")).to_string();
        Browser { driver, session }
    }

    fn cmd(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        call(self.driver, method, &format!("/session/{}{path}", self.session), body)
    }

    fn goto(&self, url: &str) {
        self.cmd("POST", "/url", Some(json!({ "url": url })));
    }

    fn url(&self) -> String {
        self.cmd("GET", "/url", None).as_str().unwrap().to_string()
    }

    fn find(&self, css: &str) -> String {
        let value = self.cmd("POST", "/element", Some(json!({ "using": "css selector", "value": css })));
        value[ELEMENT].as_str().unwrap_or_else(|| panic!("no element {css}: {value}")).to_string()
    }

    fn find_all(&self, css: &str) -> Vec<String> {
        let value = self.cmd("POST", "/elements", Some(json!({ "using": "css selector", "value": css })));
        value.as_array().unwrap().iter().map(|e| e[ELEMENT].as_str().unwrap().to_string()).collect()
    }

    /// Types into a field (after clearing it), as a user does: key events, input and change.
    fn type_into(&self, css: &str, text: &str) {
        let element = self.find(css);
        self.cmd("POST", &format!("/element/{element}/clear"), Some(json!({})));
        self.cmd("POST", &format!("/element/{element}/value"), Some(json!({ "text": text })));
    }

    fn click(&self, css: &str) {
        let element = self.find(css);
        self.cmd("POST", &format!("/element/{element}/click"), Some(json!({})));
    }

    fn attribute(&self, element: &str, name: &str) -> Option<String> {
        self.cmd("GET", &format!("/element/{element}/attribute/{name}"), None).as_str().map(str::to_string)
    }

    fn text(&self, css: &str) -> String {
        let element = self.find(css);
        self.cmd("GET", &format!("/element/{element}/text"), None).as_str().unwrap().to_string()
    }

    fn enabled(&self, css: &str) -> bool {
        let element = self.find(css);
        self.cmd("GET", &format!("/element/{element}/enabled"), None).as_bool().unwrap()
    }

    fn displayed(&self, css: &str) -> bool {
        let element = self.find(css);
        self.cmd("GET", &format!("/element/{element}/displayed"), None).as_bool().unwrap()
    }

    fn script(&self, script: &str) -> Value {
        self.cmd("POST", "/execute/sync", Some(json!({ "script": script, "args": [] })))
    }

    fn screenshot(&self, path: &Path) {
        let png = unb64(self.cmd("GET", "/screenshot", None).as_str().unwrap());
        std::fs::write(path, png).unwrap();
    }

    /// Polls `check` until it gives a value; panics with `what` and the page's status line
    /// after `timeout`.
    fn wait<T>(&self, what: &str, timeout: Duration, mut check: impl FnMut(&Self) -> Option<T>) -> T {
        let started = Instant::now();
        loop {
            if let Some(value) = check(self) {
                return value;
            }
            if started.elapsed() > timeout {
                panic!("{what}: not within {timeout:?}; the page says: {:?}", self.text("#status"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the page has listed the models and samplers (its first API calls).
    fn wait_loaded(&self) {
        self.wait("the page lists the samplers", Duration::from_secs(30), |b| {
            (b.script("return document.querySelectorAll('#sampler option').length").as_u64().unwrap_or(0) > 1).then_some(())
        });
    }
}

impl Drop for Browser<'_> {
    fn drop(&mut self) {
        let _ = support::agent().delete(&format!("{}/session/{}", self.driver.base, self.session)).call();
    }
}

/// A WebDriver command; its `value`. Any error answer is a test failure.
fn call(driver: &Driver, method: &str, path: &str, body: Option<Value>) -> Value {
    let url = format!("{}{path}", driver.base);
    let agent = support::agent();
    let response = match method {
        "GET" => agent.get(&url).call(),
        "DELETE" => agent.delete(&url).call(),
        _ => agent.post(&url).header("Content-Type", "application/json").send(body.unwrap_or(json!({})).to_string()),
    };
    let (status, answer, _) = support::answer(response);
    assert_eq!(status, 200, "WebDriver {method} {path}: {answer}");
    answer["value"].clone()
}

/// Records every value the progress bar takes (its `value` attribute reflects the property).
const WATCH_PROGRESS: &str = "
    const bar = document.getElementById('progress');
    window.progressSeen = [];
    new MutationObserver((records) => {
      for (const r of records) if (r.attributeName === 'value') window.progressSeen.push(Number(r.oldValue));
    }).observe(bar, { attributes: true, attributeOldValue: true });";

/// The page's form makes `diffuse generate`'s image (pixels and infotext), with a seed past
/// 2^53 kept whole; the progress bar goes through every step; the gallery image carries its
/// infotext and downloads; the fields stay inside the form.
#[test]
fn page_generates_the_generate_image() {
    let Some((chromedriver, chromium)) = installed() else { return };
    let _one = ONE_BROWSER.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch("page");
    let server = Server::start("page", &[]);
    let driver = Driver::start(&chromedriver, &dir.join("chromedriver.log"));
    let browser = Browser::open(&driver, &chromium, &dir.join("profile"));
    browser.goto(&server.url("/"));
    browser.wait_loaded();
    assert_eq!(browser.text("#status"), "", "the page loaded with an error");

    let seed = "9007199254740993"; // 2^53 + 1: a JavaScript number would make it ...992.
    browser.type_into("textarea#prompt", "a photo of a (sneaker:1.2)");
    browser.type_into("input#negative-prompt", "blurry");
    browser.type_into("input#steps", "4");
    browser.type_into("input#seed", seed);
    browser.click("select#sampler option[value='Euler a']");
    browser.script(WATCH_PROGRESS);
    browser.click("button#generate");
    let image = browser.wait("an image in the gallery", Duration::from_secs(60), |b| b.find_all("#gallery img").pop());
    assert_eq!(browser.text("#status"), "done: 1 image(s)");

    // The bar went through each step and ends full.
    let seen: Vec<u64> = serde_json::from_value(browser.script("return window.progressSeen")).unwrap();
    let bar = browser.script("const p = document.getElementById('progress'); return [p.value, p.max]");
    assert_eq!(bar, json!([4, 4]), "the bar at the end (seen: {seen:?})");
    for step in 1..4 {
        assert!(seen.contains(&step), "the bar never showed step {step}: {seen:?}");
    }

    // The gallery's image is generate's, pixel for pixel, with its infotext.
    let src = browser.attribute(&image, "src").unwrap();
    let png = unb64(src.strip_prefix("data:image/png;base64,").expect("a data: URL"));
    let made = generate(
        &dir,
        &[
            "--prompt", "a photo of a (sneaker:1.2)", "--negative-prompt", "blurry", "--steps", "4", "--seed", seed,
            "--scheduler", "euler-ancestral", "--prompt-syntax", "a1111",
        ],
    );
    let (pixels, infotext) = decode_png(&png);
    let (made_pixels, made_infotext) = decode_png(&made);
    assert!(pixels == made_pixels, "the page's image differs from diffuse generate's");
    assert_eq!(infotext, made_infotext);
    let infotext = infotext.unwrap();
    assert!(infotext.starts_with("a photo of a (sneaker:1.2)\nNegative prompt: blurry\n"), "{infotext}");
    assert!(infotext.contains(&format!("Seed: {seed},")), "{infotext}");
    assert_eq!(browser.attribute(&image, "title").as_deref(), Some(infotext.as_str()));
    let link = browser.find("#gallery figure a");
    assert_eq!(browser.attribute(&link, "href").as_deref(), Some(src.as_str()));
    assert_eq!(browser.attribute(&link, "download"), Some(format!("diffuse-{seed}.png")));
    assert_eq!(browser.text("#gallery figure a"), format!("seed {seed} · download"));

    // No field sticks out of the form's column.
    let outside = browser.script(
        "const edge = document.getElementById('form').getBoundingClientRect().right;
         return [...document.querySelectorAll('#form input, #form select, #form textarea')]
           .filter((e) => e.getBoundingClientRect().right > edge + 0.5).map((e) => e.id);",
    );
    assert_eq!(outside, json!([]), "fields past the form's edge");
    let shot = dir.join("page.png");
    browser.screenshot(&shot);
    eprintln!("screenshot: {}", shot.display());
}

/// With --api-key: `/?api_key=KEY` hands the page its key (then gone from the address bar),
/// the page generates with it; a wrong key asks for the right one, which Enter takes without
/// starting a generation.
#[test]
fn page_with_api_key() {
    let Some((chromedriver, chromium)) = installed() else { return };
    let _one = ONE_BROWSER.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch("page-key");
    let server = Server::start("page-key", &["--api-key", "sekrit"]);
    let driver = Driver::start(&chromedriver, &dir.join("chromedriver.log"));
    let browser = Browser::open(&driver, &chromium, &dir.join("profile"));
    browser.goto(&server.url("/?api_key=sekrit"));
    browser.wait_loaded();
    assert_eq!(browser.text("#status"), "");
    assert!(!browser.url().contains("api_key"), "the key stays in the address bar: {}", browser.url());
    assert!(!browser.displayed("#key-row"), "the page asks for a key it has");

    browser.type_into("textarea#prompt", "a bag");
    browser.type_into("input#steps", "2");
    browser.type_into("input#seed", "5");
    browser.click("button#generate");
    let image = browser.wait("an image in the gallery", Duration::from_secs(60), |b| b.find_all("#gallery img").pop());
    let png = unb64(browser.attribute(&image, "src").unwrap().strip_prefix("data:image/png;base64,").unwrap());
    let made = generate(&dir, &["--prompt", "a bag", "--steps", "2", "--seed", "5", "--prompt-syntax", "a1111"]);
    assert_eq!(decode_png(&png), decode_png(&made));
    let title = browser.attribute(&image, "title").unwrap();
    assert!(title.starts_with("a bag\n") && title.contains("Seed: 5,"), "{title}");

    // A wrong key: the page asks; the right one typed and Enter pressed loads the page.
    browser.goto(&server.url("/?api_key=wrong"));
    browser.wait("the page asks for the key", Duration::from_secs(30), |b| b.text("#status").contains("API key").then_some(()));
    assert!(browser.displayed("#key-row"));
    browser.type_into("input#api-key", "sekrit\u{E007}");
    browser.wait_loaded();
    browser.wait("the error cleared", Duration::from_secs(30), |b| b.text("#status").is_empty().then_some(()));
    std::thread::sleep(Duration::from_millis(500));
    let (status, jobs) = get(&server.url("/v1/jobs"), Some("Bearer sekrit"));
    assert_eq!(status, 200);
    assert_eq!(jobs["jobs"].as_array().unwrap().len(), 1, "Enter in the key field started a generation: {jobs}");
    // The key is kept: the page at `/` works without it in the address.
    browser.goto(&server.url("/"));
    browser.wait_loaded();
    assert_eq!(browser.text("#status"), "");
}

/// A long run with live previews: the bar moves and the preview shows while it runs, Cancel
/// stops it within a few steps, the page is ready again and the gallery stays empty.
#[test]
fn page_cancels_a_long_run() {
    let Some((chromedriver, chromium)) = installed() else { return };
    let _one = ONE_BROWSER.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch("page-cancel");
    let server = Server::start("page-cancel", &["--max-steps", "1000"]);
    let driver = Driver::start(&chromedriver, &dir.join("chromedriver.log"));
    let browser = Browser::open(&driver, &chromium, &dir.join("profile"));
    browser.goto(&server.url("/"));
    browser.wait_loaded();
    browser.type_into("textarea#prompt", "a bag");
    browser.type_into("input#steps", "900");
    browser.type_into("input#seed", "1");
    browser.click("select#sampler option[value='DDIM']");
    browser.click("input#preview");
    browser.click("button#generate");
    let bar = browser.wait("the bar moves", Duration::from_secs(60), |b| {
        assert!(!b.text("#status").starts_with("failed"), "{}", b.text("#status"));
        let bar = b.script("const p = document.getElementById('progress'); return [p.value, p.max]");
        (bar[0].as_f64().unwrap() >= 3.0).then_some(bar)
    });
    assert_eq!(bar[1], 900);
    assert!(browser.text("#status").starts_with("step "), "{}", browser.text("#status"));
    assert!(browser.enabled("button#cancel") && !browser.enabled("button#generate"));
    // The live preview shows the step's image.
    let live = browser.wait("a live preview", Duration::from_secs(30), |b| b.displayed("img#live").then(|| b.find("img#live")));
    let preview = unb64(browser.attribute(&live, "src").unwrap().strip_prefix("data:image/png;base64,").expect("a data: URL"));
    assert!(!decode_png(&preview).0.is_empty());
    browser.click("button#cancel");
    browser.wait("the page says cancelled", Duration::from_secs(15), |b| (b.text("#status") == "cancelled").then_some(()));
    assert!(browser.enabled("button#generate") && !browser.enabled("button#cancel"));
    assert!(browser.find_all("#gallery img").is_empty());
    assert!(!browser.displayed("img#live"), "the preview stays after the cancel");

    let (_, jobs) = get(&server.url("/v1/jobs"), None);
    let jobs = jobs["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0]["status"], "cancelled", "{}", jobs[0]);
    let stopped_at = browser.script("return document.getElementById('progress').value").as_f64().unwrap();
    assert!(stopped_at < 200.0, "the job ran on to step {stopped_at} after the cancel");
}
