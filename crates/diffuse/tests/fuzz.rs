//! Fuzzing, on stable Rust with proptest: every parser of user files and text is fed generated
//! inputs (mutated real files and token soups of each format's syntax, beside random bytes).
//! For every input: no panic, no hang (a watchdog aborts a case running longer than
//! `DIFFUSE_FUZZ_HANG_SECS`, 20 s by default), and no allocation beyond the input's scale (the
//! live heap of a case may grow by at most 64 MiB + 256 × the input's length, checked on every
//! allocation). Errors are fine: a bad file is refused.
//!
//! `cargo test -p diffuse --test fuzz` runs a short run of each target (about 20 s in all). The
//! long run, a million inputs per target (the test profile keeps overflow checks on, which
//! find more than a release build would):
//!
//! ```sh
//! DIFFUSE_FUZZ_CASES=1000000 cargo test -p diffuse --test fuzz -- --nocapture --test-threads 1
//! ```
//!
//! (`DIFFUSE_FUZZ_SEED=N` draws other inputs; one target: add its name as a test filter.)
//! An input that fails is written to `target/tmp/fuzz-failures/TARGET/`; fix the library, then
//! commit the input to `tests/fuzz_corpus/TARGET/`, which `the_corpus_replays` runs every time.
//! `DIFFUSE_FUZZ_BACKTRACE=1` also prints where the case was when it went over a bound.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::{select, Index};
use proptest::test_runner::{Config, RngAlgorithm, TestError, TestRng, TestRunner};
use serde_json::{json, Map, Value};

use diffuse::loading::config::{parse_config, parse_override, read_json_object};
use diffuse::loading::single_file::{recognise, Component, SingleFile};
use diffuse::loading::weights::{check_safetensors, var_builder};
use diffuse::lora::file::LoraFile;
use diffuse::lora::keys::{self, Part, Target};
use diffuse::lora::LoraSpec;
use diffuse::models::autoencoder_kl::AutoencoderKLConfig;
use diffuse::models::clip_text::ClipTextConfig;
use diffuse::models::unet_2d::UNet2DModelConfig;
use diffuse::models::unet_2d_condition::UNet2DConditionModelConfig;
use diffuse::pipelines::metadata::{parse_infotext, read_png_parameters, scheduler_from_a1111, split_infotext};
use diffuse::prompts::a1111::{chunk_prompt, parse_prompt_attention, ChunkTokens};
use diffuse::prompts::extra_networks;
use diffuse::rng::TorchGenerator;
use diffuse::tokenizers::clip::ClipTokenizer;
use diffuse::training::data::{Captions, Dataset, IdxDataset, IdxHeader, ImageFolderDataset};

// ---------------------------------------------------------------------------------------------
// The harness: a counting allocator, a watchdog, and a proptest runner per target.
// ---------------------------------------------------------------------------------------------

/// The system allocator, counting the live heap so that a case's growth can be bounded.
struct CountingAllocator;

static LIVE: AtomicUsize = AtomicUsize::new(0);
/// While a case runs: the live heap at its start and the most it may add.
static CASE_BASE: AtomicUsize = AtomicUsize::new(0);
static CASE_LIMIT: AtomicUsize = AtomicUsize::new(usize::MAX);
static CASE_PEAK: AtomicUsize = AtomicUsize::new(0);
/// Set once a case went over its limit, so that reporting it does not report again.
static OVER_LIMIT: AtomicBool = AtomicBool::new(false);

// SAFETY: every method forwards to `System` with the caller's own layout and pointer, so the
// allocator's contract is System's; the counters are plain atomics and never allocate.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        grew(layout.size());
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        grew(layout.size());
        System.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size >= layout.size() {
            grew(new_size - layout.size());
        } else {
            LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
        }
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// Counts `size` more bytes; a case that goes over its limit is reported and the process
/// aborted before the allocation is made (it may be far too large to survive).
fn grew(size: usize) {
    let live = LIVE.fetch_add(size, Ordering::Relaxed) + size;
    let used = live.saturating_sub(CASE_BASE.load(Ordering::Relaxed));
    CASE_PEAK.fetch_max(used, Ordering::Relaxed);
    if used > CASE_LIMIT.load(Ordering::Relaxed) && !OVER_LIMIT.swap(true, Ordering::Relaxed) {
        CASE_LIMIT.store(usize::MAX, Ordering::Relaxed);
        report_and_abort(&format!("allocated {used} bytes more than at its start (an allocation of {size})"));
    }
}

/// The input of the running case (pointer and length; the case borrows it for its duration).
static CURRENT_INPUT: AtomicPtr<u8> = AtomicPtr::new(std::ptr::null_mut());
static CURRENT_LEN: AtomicUsize = AtomicUsize::new(0);
static CURRENT_TARGET: Mutex<&'static str> = Mutex::new("");
/// Milliseconds since `epoch()` at which the running case started, 0 between cases.
static CASE_STARTED_MS: AtomicU64 = AtomicU64::new(0);

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Writes the running case's input where a failure is kept, says so, and aborts.
fn report_and_abort(what: &str) -> ! {
    let len = CURRENT_LEN.load(Ordering::SeqCst);
    let ptr = CURRENT_INPUT.load(Ordering::SeqCst);
    // SAFETY: the pointer and length are those of the input the running case borrows; the
    // case cannot end while this runs (it is this thread or the case is stuck in a hang).
    let input: Vec<u8> = if ptr.is_null() { Vec::new() } else { unsafe { std::slice::from_raw_parts(ptr, len) }.to_vec() };
    let target = CURRENT_TARGET.try_lock().map(|t| *t).unwrap_or("unknown");
    let saved = save_failure(target, &input);
    eprintln!("fuzz target `{target}`: a case {what}; its input is {}", saved.display());
    if std::env::var_os("DIFFUSE_FUZZ_BACKTRACE").is_some() {
        eprintln!("{}", std::backtrace::Backtrace::force_capture());
    }
    std::process::abort();
}

fn save_failure(target: &str, input: &[u8]) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-failures").join(target);
    let _ = std::fs::create_dir_all(&dir);
    let hash = input.iter().fold(0xcbf29ce484222325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100000001b3));
    let path = dir.join(format!("{hash:016x}"));
    let _ = std::fs::write(&path, input);
    path
}

/// Aborts (reporting the input) when a case runs longer than the hang limit; lifts the heap
/// limit while a panic is reported (its backtrace may read debug information).
fn start_watchdog() {
    static STARTED: OnceLock<()> = OnceLock::new();
    STARTED.get_or_init(|| {
        let report = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            CASE_LIMIT.store(usize::MAX, Ordering::SeqCst);
            report(info)
        }));
        let limit_ms = env_number("DIFFUSE_FUZZ_HANG_SECS", 20) * 1000;
        std::thread::spawn(move || {
            let tick = Duration::from_millis(250);
            let mut last = Instant::now();
            loop {
                std::thread::sleep(tick);
                // A tick far longer than asked for means the process was stopped (SIGSTOP, a
                // suspended machine): that time is no case's, so the running case's start moves.
                let stopped = last.elapsed().saturating_sub(tick);
                last = Instant::now();
                if stopped > Duration::from_secs(1) {
                    let _ = CASE_STARTED_MS.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |start| {
                        (start != 0).then(|| start + stopped.as_millis() as u64)
                    });
                }
                check_hang(limit_ms);
            }
        });
    });
}

/// Aborts when the running case has run longer than `limit_ms`.
fn check_hang(limit_ms: u64) {
    let started = CASE_STARTED_MS.load(Ordering::SeqCst);
    if started != 0 && (epoch().elapsed().as_millis() as u64).saturating_sub(started) > limit_ms {
        report_and_abort(&format!("ran longer than {} s (a hang)", limit_ms / 1000));
    }
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// One target at a time: the heap counts are process-wide.
static SERIAL: Mutex<()> = Mutex::new(());

/// What a target did over a run.
#[derive(Default)]
struct RunStats {
    cases: u64,
    /// Inputs the target's parser took as valid (the rest were refused with an error).
    accepted: u64,
    slowest: Duration,
    most_heap: usize,
}

/// Runs `body` on one input under the harness's bounds.
fn run_case(target: &'static str, input: &[u8], body: fn(&[u8]) -> bool, stats: &mut RunStats) {
    *CURRENT_TARGET.lock().unwrap_or_else(|e| e.into_inner()) = target;
    CURRENT_INPUT.store(input.as_ptr() as *mut u8, Ordering::SeqCst);
    CURRENT_LEN.store(input.len(), Ordering::SeqCst);
    CASE_BASE.store(LIVE.load(Ordering::SeqCst), Ordering::SeqCst);
    CASE_PEAK.store(0, Ordering::SeqCst);
    CASE_LIMIT.store((64 << 20) + 256 * input.len(), Ordering::SeqCst);
    let started = Instant::now();
    CASE_STARTED_MS.store((epoch().elapsed().as_millis() as u64).max(1), Ordering::SeqCst);
    let outcome = std::panic::catch_unwind(|| body(input));
    CASE_STARTED_MS.store(0, Ordering::SeqCst);
    CASE_LIMIT.store(usize::MAX, Ordering::SeqCst);
    CURRENT_INPUT.store(std::ptr::null_mut(), Ordering::SeqCst);
    stats.cases += 1;
    stats.slowest = stats.slowest.max(started.elapsed());
    stats.most_heap = stats.most_heap.max(CASE_PEAK.load(Ordering::SeqCst));
    match outcome {
        Ok(accepted) => stats.accepted += accepted as u64,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Runs a target on `DIFFUSE_FUZZ_CASES` (else `default_cases`) generated inputs; a panic is
/// shrunk by proptest to a small input, saved, and reported.
fn fuzz(target: &'static str, default_cases: u32, strategy: impl Strategy<Value = Vec<u8>>, body: fn(&[u8]) -> bool) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    start_watchdog();
    let cases = env_number("DIFFUSE_FUZZ_CASES", default_cases as u64) as u32;
    let config = Config { cases, failure_persistence: None, max_shrink_iters: 4096, ..Config::default() };
    let mut seed = [0u8; 32];
    let mixed = target.bytes().fold(env_number("DIFFUSE_FUZZ_SEED", 0) ^ 0x9e3779b97f4a7c15, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3));
    seed[..8].copy_from_slice(&mixed.to_le_bytes());
    let mut runner = TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &seed));
    // proptest's runner takes a `Fn`: the counts go through a cell.
    let stats = std::cell::RefCell::new(RunStats::default());
    let started = Instant::now();
    let result = runner.run(&strategy, |input| {
        run_case(target, &input, body, &mut stats.borrow_mut());
        Ok(())
    });
    let stats = stats.into_inner();
    match result {
        Ok(()) => eprintln!(
            "fuzz target `{target}`: {} inputs ({} accepted) in {:.1} s, none failed (slowest {:.1} ms, most heap {} KiB)",
            stats.cases,
            stats.accepted,
            started.elapsed().as_secs_f64(),
            stats.slowest.as_secs_f64() * 1e3,
            stats.most_heap >> 10
        ),
        Err(TestError::Fail(reason, input)) => {
            let saved = save_failure(target, &input);
            panic!("fuzz target `{target}`: {reason}; the smallest failing input is {}", saved.display())
        }
        Err(e) => panic!("fuzz target `{target}`: {e}"),
    }
}

/// A scratch folder per target, reused by every case.
fn scratch(target: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("diffuse-fuzz").join(target);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn fixture(path: &str) -> Vec<u8> {
    std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap()
}

fn fixture_json(path: &str) -> Value {
    serde_json::from_slice(&fixture(path)).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Input strategies.
// ---------------------------------------------------------------------------------------------

/// Pieces of each format's syntax, random characters and random bytes, concatenated.
fn soup(fragments: &'static [&'static str], max_pieces: usize) -> BoxedStrategy<Vec<u8>> {
    let piece = prop_oneof![
        4 => select(fragments).prop_map(|f| f.as_bytes().to_vec()),
        2 => "[ -~]{0,8}".prop_map(String::into_bytes),
        1 => any::<char>().prop_map(|c| c.to_string().into_bytes()),
        1 => vec(any::<u8>(), 0..4),
        1 => prop_oneof![Just("0"), Just("-1"), Just("1e309"), Just("18446744073709551616"), Just("4294967295"), Just("nan"), Just("inf"), Just("1.5")]
            .prop_map(|n| n.as_bytes().to_vec()),
    ];
    vec(piece, 0..max_pieces).prop_map(|pieces| pieces.concat()).boxed()
}

/// One edit of a byte string; positions are taken modulo its length.
#[derive(Clone, Debug)]
enum Edit {
    Set(Index, u8),
    Insert(Index, Vec<u8>),
    Delete(Index, usize),
    Repeat(Index, usize, usize),
    Truncate(Index),
}

fn edit(fragments: &'static [&'static str]) -> impl Strategy<Value = Edit> {
    prop_oneof![
        3 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Edit::Set(i, b)),
        2 => (any::<Index>(), prop_oneof![select(fragments).prop_map(|f| f.as_bytes().to_vec()), vec(any::<u8>(), 1..6)])
            .prop_map(|(i, bytes)| Edit::Insert(i, bytes)),
        2 => (any::<Index>(), 1usize..32).prop_map(|(i, n)| Edit::Delete(i, n)),
        1 => (any::<Index>(), 1usize..64, 1usize..8).prop_map(|(i, n, times)| Edit::Repeat(i, n, times)),
        1 => any::<Index>().prop_map(Edit::Truncate),
    ]
}

fn apply(mut bytes: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for edit in edits {
        let at = |i: &Index, len: usize| if len == 0 { 0 } else { i.index(len + 1) };
        match edit {
            Edit::Set(i, b) if !bytes.is_empty() => {
                let i = i.index(bytes.len());
                bytes[i] = *b;
            }
            Edit::Set(..) => {}
            Edit::Insert(i, piece) => {
                let i = at(i, bytes.len());
                bytes.splice(i..i, piece.iter().copied());
            }
            Edit::Delete(i, n) => {
                let i = at(i, bytes.len()).min(bytes.len());
                bytes.drain(i..(i + n).min(bytes.len()));
            }
            Edit::Repeat(i, n, times) => {
                let i = at(i, bytes.len()).min(bytes.len());
                let piece = bytes[i..(i + n).min(bytes.len())].to_vec();
                for _ in 0..*times {
                    bytes.splice(i..i, piece.iter().copied());
                }
            }
            Edit::Truncate(i) => bytes.truncate(at(i, bytes.len())),
        }
    }
    bytes
}

/// Real inputs with a few byte-level edits.
fn mutated(seeds: Vec<Vec<u8>>, fragments: &'static [&'static str]) -> BoxedStrategy<Vec<u8>> {
    (select(seeds), vec(edit(fragments), 0..6)).prop_map(|(seed, edits)| apply(seed, &edits)).boxed()
}

/// JSON values a config may wrongly hold.
fn json_leaf(strings: &'static [&'static str]) -> BoxedStrategy<Value> {
    let scalar = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        (-1e6f64..1e6).prop_map(|x| json!(x)),
        prop_oneof![Just(0.0), Just(-0.0), Just(1e300), Just(-1e300), Just(f64::MIN_POSITIVE), Just(1e-300), Just(0.5)].prop_map(|x| json!(x)),
        (0u64..70).prop_map(|n| json!(n)),
        select(strings).prop_map(|s| json!(s)),
        "[ -~]{0,12}".prop_map(Value::String),
    ];
    prop_oneof![
        6 => scalar.clone(),
        2 => vec(scalar.clone(), 0..6).prop_map(Value::Array),
        1 => vec((select(strings).prop_map(str::to_string), scalar), 0..3).prop_map(|kv| Value::Object(kv.into_iter().collect())),
    ]
    .boxed()
}

/// An edit of a JSON object's entries (or of an array inside one).
#[derive(Clone, Debug)]
enum JsonEdit {
    Set(Index, Value),
    Remove(Index),
    Add(String, Value),
    SetElement(Index, Index, Value),
    DropElement(Index, Index),
}

fn json_edit(keys: &'static [&'static str], strings: &'static [&'static str]) -> impl Strategy<Value = JsonEdit> {
    prop_oneof![
        4 => (any::<Index>(), json_leaf(strings)).prop_map(|(i, v)| JsonEdit::Set(i, v)),
        2 => any::<Index>().prop_map(JsonEdit::Remove),
        2 => (select(keys).prop_map(str::to_string), json_leaf(strings)).prop_map(|(k, v)| JsonEdit::Add(k, v)),
        2 => (any::<Index>(), any::<Index>(), json_leaf(strings)).prop_map(|(i, j, v)| JsonEdit::SetElement(i, j, v)),
        1 => (any::<Index>(), any::<Index>()).prop_map(|(i, j)| JsonEdit::DropElement(i, j)),
    ]
}

fn apply_json(mut object: Map<String, Value>, edits: &[JsonEdit]) -> Map<String, Value> {
    for edit in edits {
        let key = |i: &Index, object: &Map<String, Value>| (!object.is_empty()).then(|| object.keys().nth(i.index(object.len())).unwrap().clone());
        match edit {
            JsonEdit::Set(i, v) => {
                if let Some(k) = key(i, &object) {
                    object.insert(k, v.clone());
                }
            }
            JsonEdit::Remove(i) => {
                if let Some(k) = key(i, &object) {
                    object.remove(&k);
                }
            }
            JsonEdit::Add(k, v) => {
                object.insert(k.clone(), v.clone());
            }
            JsonEdit::SetElement(i, j, v) => {
                if let Some(Value::Array(items)) = key(i, &object).and_then(|k| object.get_mut(&k)) {
                    if !items.is_empty() {
                        let j = j.index(items.len());
                        items[j] = v.clone();
                    }
                }
            }
            JsonEdit::DropElement(i, j) => {
                if let Some(Value::Array(items)) = key(i, &object).and_then(|k| object.get_mut(&k)) {
                    if !items.is_empty() {
                        items.remove(j.index(items.len()));
                    }
                }
            }
        }
    }
    object
}

/// Real JSON objects with a few entries changed, as JSON text.
fn json_mutated(seeds: Vec<Map<String, Value>>, keys: &'static [&'static str], strings: &'static [&'static str]) -> BoxedStrategy<Vec<u8>> {
    (select(seeds), vec(json_edit(keys, strings), 0..6))
        .prop_map(|(seed, edits)| serde_json::to_vec(&apply_json(seed, &edits)).unwrap())
        .boxed()
}

// ---------------------------------------------------------------------------------------------
// Targets: each takes the raw input (what a corpus file holds).
// ---------------------------------------------------------------------------------------------

const INFOTEXT_FRAGMENTS: &[&str] = &[
    "Negative prompt: ", "Steps: ", "Sampler: ", "Schedule type: ", "CFG scale: ", "Seed: ", "Size: ", "Model hash: ",
    "Model: ", "Denoising strength: ", "Clip skip: ", "Eta DDIM: ", "Guidance rescale: ", "Batch size: ", "Batch pos: ",
    "Diffuse scheduler: ", "Diffuse scheduler config: ", "Lora hashes: ", "Diffuse loras: ", "Class label: ", "Version: ",
    ", ", ": ", "\n", "\"", "\\\"", "\\", "{", "}", "[", "]", "x", "512x512", "DPM++ 2M", "Euler a", "Karras", "ddim",
    "{\"timestep_spacing\": \"trailing\"}", "Template: ", "Hires upscale: ", "lcm", "Exponential", "SGM Uniform", "UniPC", "7.5", "25",
];

fn infotext(input: &[u8]) -> bool {
    let text = String::from_utf8_lossy(input);
    let _ = split_infotext(&text);
    let Ok(parameters) = parse_infotext(&text) else { return false };
    let _ = parameters.diffuse_scheduler();
    if let Some(sampler) = &parameters.sampler {
        let _ = scheduler_from_a1111(sampler, parameters.schedule_type.as_deref());
    }
    // What diffuse writes, it reads back.
    parse_infotext(&parameters.to_infotext()).is_ok()
}

fn infotext_inputs() -> BoxedStrategy<Vec<u8>> {
    let cases: Value = fixture_json("tests/fixtures/metadata/parse_cases.json");
    let mut seeds = Vec::new();
    collect_strings(&cases, &mut seeds);
    seeds.retain(|s| s.contains("Steps"));
    seeds.push("a fox\nNegative prompt: blurry\nSteps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 1, Size: 512x512".into());
    let seeds: Vec<Vec<u8>> = seeds.into_iter().map(String::into_bytes).collect();
    prop_oneof![2 => soup(INFOTEXT_FRAGMENTS, 60), 3 => mutated(seeds, INFOTEXT_FRAGMENTS)].boxed()
}

fn collect_strings(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::String(s) => out.push(s.clone()),
        Value::Array(items) => items.iter().for_each(|v| collect_strings(v, out)),
        Value::Object(map) => map.values().for_each(|v| collect_strings(v, out)),
        _ => {}
    }
}

/// A PNG chunk with its CRC.
fn png_chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut crc = 0xffff_ffffu32;
    for &byte in kind.iter().chain(data) {
        crc ^= byte as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    let mut chunk = (data.len() as u32).to_be_bytes().to_vec();
    chunk.extend_from_slice(kind);
    chunk.extend_from_slice(data);
    chunk.extend_from_slice(&(!crc).to_be_bytes());
    chunk
}

fn png_text(input: &[u8]) -> bool {
    let path = scratch("png_text").join("input.png");
    std::fs::write(&path, input).unwrap();
    let Ok(Some(text)) = read_png_parameters(&path) else { return false };
    let _ = parse_infotext(&text);
    true
}

fn png_inputs() -> BoxedStrategy<Vec<u8>> {
    let names = ["a1111_latin1.png", "a1111_utf8.png", "a1111_zipped.png", "after_idat.png", "no_parameters.png"];
    let seeds: Vec<Vec<u8>> = names.iter().map(|n| fixture(&format!("tests/fixtures/metadata/{n}"))).collect();
    // A 1×1 gray image (the smallest fixture's chunks), with text chunks put together here.
    let plain = seeds[4].clone();
    let ihdr_end = 8 + 25;
    let head = plain[..ihdr_end].to_vec();
    let tail = plain[ihdr_end..].to_vec();
    let keyword = prop_oneof![4 => Just(b"parameters".to_vec()), 1 => vec(any::<u8>(), 0..90)];
    let text = prop_oneof![soup(INFOTEXT_FRAGMENTS, 20), vec(any::<u8>(), 0..64)];
    let chunk = (keyword, text, 0u8..4, any::<bool>()).prop_map(|(keyword, text, kind, bad_crc)| {
        let (name, data): (&[u8; 4], Vec<u8>) = match kind {
            0 => (b"tEXt", [keyword, vec![0], text].concat()),
            1 => (b"iTXt", [keyword, vec![0, 0, 0], b"en".to_vec(), vec![0, 0], text].concat()),
            2 => (b"zTXt", [keyword, vec![0, 0], text].concat()),
            _ => (b"iTXt", [keyword, vec![0, 1, 0, 0, 0], text].concat()),
        };
        let mut chunk = png_chunk(name, &data);
        if bad_crc {
            let last = chunk.len() - 1;
            chunk[last] ^= 1;
        }
        chunk
    });
    let built = (vec(chunk.clone(), 0..3), vec(chunk, 0..2)).prop_map(move |(before, after)| {
        let idat_end = tail.len() - 12;
        [head.clone(), before.concat(), tail[..idat_end].to_vec(), after.concat(), tail[idat_end..].to_vec()].concat()
    });
    prop_oneof![3 => built, 2 => mutated(seeds, &["tEXt", "zTXt", "iTXt", "IEND", "parameters\0", "\0\0\0\0"])].boxed()
}

const PROMPT_FRAGMENTS: &[&str] = &[
    "(", ")", "[", "]", ":", "\\", "\\(", "\\)", "BREAK", " BREAK ", "<lora:", "<lyco:", "<hypernet:", ">", ":0.8", ":1.2",
    ":-1", ":1e9", ":nan", "te=", "unet=", "dyn=", "..", "/", "../x", "/etc/passwd", "a", "fox", ",", " ", "((", "))",
    "(word:1.3)", "[[", "]]", "ç", "🦊", "\n", "AND", "|", "{", "}",
];

fn lora_dir() -> PathBuf {
    let dir = scratch("a1111_prompt").join("loras");
    std::fs::create_dir_all(&dir).unwrap();
    for name in ["a", "fox", "x"] {
        let _ = std::fs::write(dir.join(format!("{name}.safetensors")), b"");
    }
    dir
}

fn tokenizer() -> &'static ClipTokenizer {
    static TOKENIZER: OnceLock<ClipTokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| {
        diffuse::tokenizers::builtin::builtin_clip_tokenizer(diffuse::loading::single_file::Family::StableDiffusion1).unwrap()
    })
}

fn a1111_prompt(input: &[u8]) -> bool {
    let text = String::from_utf8_lossy(input);
    let mut accepted = false;
    if let Ok(parsed) = parse_prompt_attention(&text) {
        let tokenizer = tokenizer();
        accepted = chunk_prompt(&parsed, ChunkTokens::of(tokenizer).unwrap(), |piece| tokenizer.tokenize(piece)).is_ok();
    }
    let (_, tags) = extra_networks::parse_prompt(&text);
    let dir = lora_dir();
    for tag in tags.iter().filter(|t| t.is_lora()) {
        if let Ok(spec) = LoraSpec::from_tag(tag, Some(&dir)) {
            // A tag resolves only to a file inside the folder.
            let path = spec.path.canonicalize().unwrap();
            assert!(path.starts_with(dir.canonicalize().unwrap()), "{} escaped {}", path.display(), dir.display());
        }
    }
    accepted
}

fn prompt_inputs() -> BoxedStrategy<Vec<u8>> {
    soup(PROMPT_FRAGMENTS, 80)
}

const KEY_FRAGMENTS: &[&str] = &[
    "lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "unet.", "text_encoder.", "text_encoder_2.", "down_blocks_", "up_blocks_",
    "mid_block_", "input_blocks_", "output_blocks_", "middle_block_", "attentions_", "resnets_", "transformer_blocks_",
    "attn1_", "attn2_", "to_q", "to_k", "to_v", "to_out_0", "proj_in", "ff_net_0_proj", "text_model_encoder_layers_",
    "self_attn_q_proj", "mlp_fc1", ".lora_down.weight", ".lora_up.weight", ".alpha", ".lora_A.weight", ".lora_B.weight",
    ".processor.to_q_lora.down.weight", ".dora_scale", ".hada_w1_a", ".lora_mid.weight", "0", "1", "2", "9", "_", ".",
    "4294967296", "18446744073709551615", "\n",
];

fn lora_keys(input: &[u8]) -> bool {
    let text = String::from_utf8_lossy(input);
    let mut accepted = false;
    for line in text.lines().take(64) {
        accepted |= !matches!(keys::parse_key(line), keys::KeyMeaning::Skipped(..));
        let flat = keys::flat(line);
        for layers_per_block in [0, 1, 2, 3, usize::MAX] {
            let _ = keys::ldm_unet_to_diffusers(&flat, layers_per_block);
        }
        for target in Target::ALL {
            let _ = keys::lookup_name(target, line, Some(2));
            let _ = keys::lookup_name(target, line, Some(0));
            let _ = keys::lookup_name(target, line, None);
            let _ = keys::model_lookup_name(target, line);
            let _ = keys::kohya_name(target, line);
            for part in [Part::Down, Part::Up, Part::Alpha] {
                let _ = keys::peft_key(target, line, part);
            }
        }
        let _ = LoraSpec::parse(line);
    }
    accepted
}

fn key_inputs() -> BoxedStrategy<Vec<u8>> {
    // The keys of the committed LoRA fixtures, a few per input.
    let mut keys = Vec::new();
    for name in ["kohya_a", "kohya_b_ldm", "old_a", "peft_a", "single_file_kohya"] {
        let bytes = fixture(&format!("tests/fixtures/lora/{name}.safetensors"));
        let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: Map<String, Value> = serde_json::from_slice(&bytes[8..8 + len]).unwrap();
        keys.extend(header.keys().filter(|k| *k != "__metadata__").map(|k| k.clone().into_bytes()));
    }
    let real = vec(mutated(keys, KEY_FRAGMENTS), 1..6).prop_map(|lines| lines.join(&b'\n'));
    prop_oneof![2 => real, 1 => soup(KEY_FRAGMENTS, 40)].boxed()
}

const DTYPES: &[&str] = &["F32", "F16", "BF16", "F64", "I64", "I32", "U8", "I8", "BOOL", "U32", "F8_E4M3", "U16", "X"];

/// A safetensors file put together from a header description: tensors with a dtype, a shape
/// and data offsets (consistent or not), metadata, and as many data bytes as chosen.
fn safetensors_file(names: BoxedStrategy<String>) -> BoxedStrategy<Vec<u8>> {
    let tensor = (names, select(DTYPES), vec(prop_oneof![4 => 0usize..6, 1 => Just(usize::MAX / 2), 1 => Just(1 << 20)], 0..4), any::<Option<(u16, u16)>>());
    let metadata = vec(("[a-z_]{0,12}", "[ -~]{0,16}"), 0..3);
    (vec(tensor, 0..6), metadata, prop_oneof![3 => Just(0isize), 1 => -8isize..8], any::<bool>())
        .prop_map(|(tensors, metadata, data_slack, as_number)| {
            let mut header = Map::new();
            let mut offset = 0usize;
            for (name, dtype, shape, offsets) in tensors {
                let size = match dtype {
                    "F64" | "I64" => 8,
                    "F32" | "I32" | "U32" => 4,
                    "F16" | "BF16" | "U16" => 2,
                    _ => 1,
                };
                let bytes = shape.iter().try_fold(size, |n: usize, &d| n.checked_mul(d)).unwrap_or(usize::MAX).min(1 << 12);
                let (start, end) = offsets.map(|(a, b)| (a as usize, b as usize)).unwrap_or((offset, offset + bytes));
                offset = offset.max(end);
                header.insert(name, json!({"dtype": dtype, "shape": shape, "data_offsets": [start, end]}));
            }
            let metadata: Map<String, Value> = metadata
                .into_iter()
                .map(|(k, v)| (k, if as_number { json!(v.len()) } else { json!(v) }))
                .collect();
            if !metadata.is_empty() {
                header.insert("__metadata__".into(), Value::Object(metadata));
            }
            let text = serde_json::to_vec(&header).unwrap();
            let data_len = (offset as isize + data_slack).clamp(0, 1 << 14) as usize;
            [(text.len() as u64).to_le_bytes().to_vec(), text, vec![0x3f; data_len]].concat()
        })
        .boxed()
}

fn safetensors(input: &[u8]) -> bool {
    let path = scratch("safetensors").join("weights.safetensors");
    std::fs::write(&path, input).unwrap();
    let accepted = check_safetensors(&path).is_ok();
    if accepted {
        if let Ok(vb) = var_builder(std::slice::from_ref(&path), DType::F32, &Device::Cpu) {
            let header_len = u64::from_le_bytes(input[..8].try_into().unwrap()) as usize;
            let header: Map<String, Value> = serde_json::from_slice(&input[8..8 + header_len]).unwrap_or_default();
            for (name, info) in header.iter().filter(|(name, _)| *name != "__metadata__") {
                let _ = vb.get_unchecked(name);
                let shape: Vec<usize> = info["shape"].as_array().map(|s| s.iter().filter_map(|d| d.as_u64()).map(|d| d as usize).collect()).unwrap_or_default();
                let _ = vb.get(shape.as_slice(), name);
                let _ = vb.get((1, 2), name);
            }
            let _ = vb.get(3, "missing");
        }
    }
    let _ = diffuse::pipelines::inversion::load_latents(&path, &Device::Cpu);
    if let Ok(file) = SingleFile::open(&path) {
        let _ = file.load(Component::Unet, &Device::Cpu);
    }
    accepted
}

fn safetensors_inputs() -> BoxedStrategy<Vec<u8>> {
    let names = prop_oneof![select(&["latents", "a", "b.weight", "", "__metadata__"][..]).prop_map(str::to_string), "[ -~]{0,10}"].boxed();
    let seeds = vec![fixture("tests/fixtures/lora/old_a.safetensors"), fixture("tests/fixtures/single_file/sd2_pipeline.safetensors")[..4096].to_vec()];
    prop_oneof![4 => safetensors_file(names), 1 => mutated(seeds, &["{", "}", "\"dtype\"", "F32", "[0, 4]", "\0\0\0\0\0\0\0\0"])].boxed()
}

fn lora_file(input: &[u8]) -> bool {
    let path = scratch("lora_file").join("lora.safetensors");
    std::fs::write(&path, input).unwrap();
    let Ok(lora) = LoraFile::open(&path) else { return false };
    for layer in &lora.layers {
        let (rows, columns) = layer.delta_shape();
        // Fusion computes a delta only for a layer of the model's own shape.
        if rows.saturating_mul(columns) <= 1 << 16 {
            let _ = layer.delta(0.5);
        }
    }
    true
}

fn lora_inputs() -> BoxedStrategy<Vec<u8>> {
    const PARTS: &[&str] = &[".lora_down.weight", ".lora_up.weight", ".alpha", ".lora_A.weight", ".lora_B.weight", ".processor.to_q_lora.down.weight", ".dora_scale", ".hada_w1_a", ""];
    const MODULES: &[&str] = &["lora_unet_down_blocks_0_attentions_0_proj_in", "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "lora_te_text_model_encoder_layers_0_self_attn_q_proj", "text_encoder.text_model.encoder.layers.0.mlp.fc1", "lora_unet_input_blocks_1_1_proj_in", "x"];
    let names = (select(MODULES), select(PARTS)).prop_map(|(m, p)| format!("{m}{p}")).boxed();
    let seeds: Vec<Vec<u8>> = ["kohya_a", "old_a", "peft_a", "single_file_kohya"].iter().map(|n| fixture(&format!("tests/fixtures/lora/{n}.safetensors"))).collect();
    prop_oneof![2 => lora_layers_file(), 2 => safetensors_file(names), 1 => mutated(seeds, &["lora_up", "lora_down", "alpha", "\"F16\"", "\"shape\":[0]"])].boxed()
}

/// A LoRA file of whole layers (down, up and alpha of consistent shapes, in one of the three
/// naming conventions), some of them then broken: a piece dropped, a dimension changed.
fn lora_layers_file() -> BoxedStrategy<Vec<u8>> {
    const NAMINGS: &[(&str, &str, &str, Option<&str>)] = &[
        ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", ".lora_down.weight", ".lora_up.weight", Some(".alpha")),
        ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", ".lora_down.weight", ".lora_up.weight", Some(".alpha")),
        ("lora_unet_input_blocks_1_1_proj_in", ".lora_down.weight", ".lora_up.weight", Some(".alpha")),
        ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", ".lora_A.weight", ".lora_B.weight", None),
        ("text_encoder.text_model.encoder.layers.1.mlp.fc2", ".lora_A.weight", ".lora_B.weight", None),
        ("unet.mid_block.attentions.0.processor", ".to_v_lora.down.weight", ".to_v_lora.up.weight", None),
    ];
    let layer = (select(NAMINGS), 1usize..4, 1usize..6, 1usize..6, any::<bool>(), select(&["F32", "F16", "BF16", "F64", "I32"][..]));
    let breakage = prop_oneof![6 => Just(None), 1 => (0usize..3, 0usize..2, 0usize..5).prop_map(Some)];
    (vec((layer, breakage), 1..4), any::<bool>()).prop_map(|(layers, metadata)| {
        let mut tensors: Vec<(String, &str, Vec<usize>)> = Vec::new();
        for (((module, down, up, alpha), rank, inputs, outputs, conv, dtype), broken) in layers {
            let tail = if conv { vec![1, 1] } else { vec![] };
            tensors.push((format!("{module}{down}"), dtype, [vec![rank, inputs], tail.clone()].concat()));
            tensors.push((format!("{module}{up}"), dtype, [vec![outputs, rank], tail].concat()));
            if let Some(alpha) = alpha {
                tensors.push((format!("{module}{alpha}"), dtype, vec![]));
            }
            if let Some((piece, axis, value)) = broken {
                let last = tensors.len() - 1;
                let piece = last.saturating_sub(piece);
                match tensors[piece].2.get_mut(axis) {
                    Some(dim) => *dim = value,
                    None => drop(tensors.remove(piece)),
                }
            }
        }
        let mut header = Map::new();
        let mut offset = 0;
        for (name, dtype, shape) in tensors {
            let size = match dtype {
                "F64" => 8,
                "F32" | "I32" => 4,
                _ => 2,
            };
            let bytes = shape.iter().product::<usize>() * size;
            header.insert(name, json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + bytes]}));
            offset += bytes;
        }
        if metadata {
            header.insert("__metadata__".into(), json!({"unet.lora_adapter_metadata": "{\"r\": 2, \"lora_alpha\": 4}", "ss_network_alpha": "x"}));
        }
        let text = serde_json::to_vec(&header).unwrap();
        // 0x3f bytes are finite in every float type: 0.747 in f32, 1.81 in f16.
        [(text.len() as u64).to_le_bytes().to_vec(), text, vec![0x3f; offset]].concat()
    })
    .boxed()
}

fn single_file(input: &[u8]) -> bool {
    let Ok(shapes) = serde_json::from_slice::<BTreeMap<String, Vec<usize>>>(input) else { return false };
    let Ok(recognised) = recognise(&shapes, Path::new("fuzz.safetensors")) else { return false };
    let origin = Path::new("fuzz.safetensors");
    let _ = parse_config::<UNet2DConditionModelConfig>(recognised.config(Component::Unet), origin);
    let _ = parse_config::<AutoencoderKLConfig>(recognised.config(Component::Vae), origin);
    let _ = parse_config::<ClipTextConfig>(recognised.config(Component::TextEncoder), origin);
    for prediction_type in [None, Some("v_prediction"), Some("epsilon"), Some("nonsense")] {
        let _ = recognised.scheduler_config(prediction_type);
    }
    true
}

/// Real checkpoints' tensor names and shapes, with tensors dropped, renamed or reshaped.
fn single_file_inputs() -> BoxedStrategy<Vec<u8>> {
    let seeds: Vec<Vec<(String, Vec<usize>)>> = ["shapes_sd15.json", "shapes_sd21.json"]
        .iter()
        .map(|n| {
            let json = fixture_json(&format!("tests/fixtures/single_file/{n}"));
            serde_json::from_value::<BTreeMap<String, Vec<usize>>>(json["ldm"].clone()).unwrap().into_iter().collect()
        })
        .collect();
    #[derive(Clone, Debug)]
    enum ShapeEdit {
        Drop(Index),
        Reshape(Index, Vec<usize>),
        SetDim(Index, Index, usize),
        Rename(Index, String),
    }
    let dim = prop_oneof![5 => 0usize..800, 1 => Just(usize::MAX), 1 => Just(1 << 40), 1 => Just(0)];
    let shape_edit = prop_oneof![
        3 => any::<Index>().prop_map(ShapeEdit::Drop),
        2 => (any::<Index>(), vec(dim.clone(), 0..5)).prop_map(|(i, s)| ShapeEdit::Reshape(i, s)),
        3 => (any::<Index>(), any::<Index>(), dim).prop_map(|(i, j, d)| ShapeEdit::SetDim(i, j, d)),
        1 => (any::<Index>(), "[a-z0-9_.]{0,30}").prop_map(|(i, n)| ShapeEdit::Rename(i, n)),
    ];
    (select(seeds), vec(shape_edit, 0..12))
        .prop_map(|(mut tensors, edits)| {
            for edit in edits {
                if tensors.is_empty() {
                    break;
                }
                match edit {
                    ShapeEdit::Drop(i) => {
                        tensors.remove(i.index(tensors.len()));
                    }
                    ShapeEdit::Reshape(i, shape) => {
                        let i = i.index(tensors.len());
                        tensors[i].1 = shape;
                    }
                    ShapeEdit::SetDim(i, j, d) => {
                        let i = i.index(tensors.len());
                        let shape = &mut tensors[i].1;
                        if !shape.is_empty() {
                            let j = j.index(shape.len());
                            shape[j] = d;
                        }
                    }
                    ShapeEdit::Rename(i, name) => {
                        let i = i.index(tensors.len());
                        tensors[i].0 = name;
                    }
                }
            }
            serde_json::to_vec(&tensors.into_iter().collect::<BTreeMap<_, _>>()).unwrap()
        })
        .boxed()
}

const CONFIG_KEYS: &[&str] = &[
    "_class_name", "in_channels", "out_channels", "block_out_channels", "down_block_types", "up_block_types", "layers_per_block",
    "attention_head_dim", "num_attention_heads", "cross_attention_dim", "norm_num_groups", "sample_size", "latent_channels",
    "hidden_size", "intermediate_size", "num_hidden_layers", "max_position_embeddings", "vocab_size", "hidden_act",
    "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type", "timestep_spacing",
    "steps_offset", "solver_order", "use_karras_sigmas", "rescale_betas_zero_snr", "original_inference_steps", "mid_block_type",
    "transformer_layers_per_block", "class_embed_type", "num_class_embeds", "time_embedding_type", "resnet_time_scale_shift",
];

const CONFIG_STRINGS: &[&str] = &[
    "linear", "scaled_linear", "squaredcos_cap_v2", "epsilon", "v_prediction", "sample", "leading", "trailing", "linspace",
    "CrossAttnDownBlock2D", "DownBlock2D", "UpBlock2D", "CrossAttnUpBlock2D", "UNetMidBlock2DCrossAttn", "quick_gelu", "gelu",
    "silu", "positional", "fourier", "default", "scale_shift", "DDIMScheduler", "EulerDiscreteScheduler", "", "karras",
];

fn config_seeds(paths: &[&str]) -> Vec<Map<String, Value>> {
    paths.iter().map(|p| fixture_json(p).as_object().cloned().unwrap()).collect()
}

fn model_configs(input: &[u8]) -> bool {
    let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(input) else { return false };
    let origin = Path::new("config.json");
    let accepted = [
        parse_config::<UNet2DConditionModelConfig>(&map, origin).is_ok(),
        parse_config::<UNet2DModelConfig>(&map, origin).is_ok(),
        parse_config::<AutoencoderKLConfig>(&map, origin).is_ok(),
        parse_config::<ClipTextConfig>(&map, origin).is_ok(),
    ];
    // The same text through the file reader and a `KEY=VALUE` override.
    let path = scratch("model_configs").join("config.json");
    std::fs::write(&path, input).unwrap();
    let _ = read_json_object(&path);
    for (key, value) in map.iter().take(4) {
        let _ = parse_override(&format!("{key}={value}"));
    }
    accepted.contains(&true)
}

fn model_config_inputs() -> BoxedStrategy<Vec<u8>> {
    let seeds = config_seeds(&[
        "configs/sd15/unet/config.json",
        "configs/sd21/unet/config.json",
        "configs/sd15/vae/config.json",
        "configs/sd15/text_encoder/config.json",
        "tests/fixtures/unet2d_condition/time_options/config.json",
    ]);
    prop_oneof![4 => json_mutated(seeds, CONFIG_KEYS, CONFIG_STRINGS), 1 => soup(&["{", "}", "\"", ":", ",", "[", "]", "\"in_channels\"", "null", "1e999"], 30)].boxed()
}

fn scheduler_configs(input: &[u8]) -> bool {
    let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(input) else { return false };
    let classes = diffuse::schedulers::SUPPORTED_CLASSES;
    let class = map.get("_class_name").and_then(|c| c.as_str()).filter(|c| classes.contains(c)).unwrap_or(classes[input.len() % classes.len()]);
    let Ok(mut scheduler) = diffuse::schedulers::from_config(class, &map, Path::new("scheduler_config.json")) else { return false };
    let sample = Tensor::ones((1, 1, 2, 2), DType::F32, &Device::Cpu).unwrap();
    let mut generator = TorchGenerator::new(0);
    for steps in [1, 4, 25] {
        if scheduler.set_timesteps(steps).is_err() {
            continue;
        }
        let timesteps = scheduler.timesteps().to_vec();
        let _ = scheduler.add_noise(&sample, &sample, &timesteps[..timesteps.len().min(1)]);
        let mut x = sample.clone();
        for &t in timesteps.iter().take(3) {
            let Ok(input) = scheduler.scale_model_input(&x, t) else { break };
            match scheduler.step(&input, t, &x, 0.0, &mut generator) {
                Ok(next) => x = next,
                Err(_) => break,
            }
        }
    }
    true
}

fn scheduler_config_inputs() -> BoxedStrategy<Vec<u8>> {
    let mut seeds = config_seeds(&["configs/sd15/scheduler/scheduler_config.json", "configs/sd21/scheduler/scheduler_config.json"]);
    for entry in std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/schedulers")).unwrap().flatten() {
        if entry.path().extension().is_some_and(|e| e == "json") {
            if let Some(Value::Object(config)) = serde_json::from_slice::<Value>(&std::fs::read(entry.path()).unwrap()).ok().and_then(|v| v.get("config").cloned()) {
                seeds.push(config);
            }
        }
    }
    json_mutated(seeds, CONFIG_KEYS, CONFIG_STRINGS)
}

fn idx(input: &[u8]) -> bool {
    let _ = IdxHeader::read(&mut &input[..], Path::new("fuzz-idx3-ubyte"));
    let dir = scratch("idx");
    let path = dir.join("train-images-idx3-ubyte");
    std::fs::write(&path, input).unwrap();
    let _ = diffuse::training::data::read_idx_labels(&path);
    let Ok(mut dataset) = IdxDataset::open(&path, None, &dir.join("cache")) else { return false };
    let len = dataset.len();
    for index in [0, len.saturating_sub(1), len] {
        let _ = dataset.get(index);
    }
    true
}

fn idx_inputs() -> BoxedStrategy<Vec<u8>> {
    let dim = prop_oneof![8 => 0u32..9, 1 => any::<u32>(), 1 => Just(u32::MAX), 1 => Just(1 << 16)];
    let dims = prop_oneof![4 => vec(dim.clone(), 3..=3), 1 => vec(dim, 0..6)];
    let built = (prop_oneof![6 => Just(8u8), 1 => any::<u8>()], dims, prop_oneof![3 => Just(0isize), 1 => -16isize..16], any::<bool>())
        .prop_map(|(kind, dims, slack, gzip_magic)| {
            let mut bytes = vec![0, 0, kind, dims.len() as u8];
            for d in &dims {
                bytes.extend_from_slice(&d.to_be_bytes());
            }
            let data = dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d as usize)).unwrap_or(usize::MAX).min(1 << 14);
            bytes.extend(std::iter::repeat_n(7u8, (data as isize + slack).max(0) as usize));
            if gzip_magic {
                bytes.splice(0..0, [0x1f, 0x8b]);
            }
            bytes
        });
    prop_oneof![4 => built, 1 => vec(any::<u8>(), 0..64)].boxed()
}

const CAPTION_FRAGMENTS: &[&str] = &[
    "{\"file_name\": \"a.png\", \"text\": \"a fox\"}\n", "{\"file_name\": \"sub/b.png\", \"text\": \"\"}\n", "{", "}", "\"file_name\"",
    "\"text\"", ": ", ", ", "\"a.png\"", "\"../a.png\"", "\"missing.png\"", "\"sub\"", "null", "1", "[]", "\n", "\r\n", "\"\\u0000\"",
    "\"\\ud800\"", "\u{feff}", "\"", "\\",
];

fn image_folder() -> PathBuf {
    let root = scratch("captions").join("images");
    std::fs::create_dir_all(root.join("sub")).unwrap();
    // A 1×1 gray PNG.
    let png = fixture("tests/fixtures/metadata/no_parameters.png");
    std::fs::write(root.join("a.png"), &png).unwrap();
    std::fs::write(root.join("sub/b.png"), &png).unwrap();
    root
}

fn captions(input: &[u8]) -> bool {
    let root = image_folder();
    // diffusers' metadata.jsonl ...
    std::fs::write(root.join("metadata.jsonl"), input).unwrap();
    let accepted = open_folder(&root);
    // ... and kohya's sidecar files.
    std::fs::remove_file(root.join("metadata.jsonl")).unwrap();
    std::fs::write(root.join("a.txt"), input).unwrap();
    std::fs::write(root.join("sub/b.txt"), input).unwrap();
    let accepted = open_folder(&root) || accepted;
    let _ = std::fs::remove_file(root.join("a.txt"));
    let _ = std::fs::remove_file(root.join("sub/b.txt"));
    accepted
}

/// Whether the folder opened.
fn open_folder(root: &Path) -> bool {
    let mut opened = false;
    for labels in [false, true] {
        if let Ok(mut dataset) = ImageFolderDataset::open(root, Captions::Required, labels) {
            opened = true;
            for index in 0..dataset.len().min(4) {
                let _ = dataset.get(index);
            }
            let _ = dataset.class_names();
        }
    }
    opened
}

fn caption_inputs() -> BoxedStrategy<Vec<u8>> {
    let file_name = prop_oneof![
        4 => select(&["a.png", "sub/b.png"][..]).prop_map(|n| json!(n)),
        1 => select(&["../a.png", "missing.png", "sub", "", "/", "sub/../a.png"][..]).prop_map(|n| json!(n)),
        1 => json_leaf(&["a.png"]),
    ];
    let text = prop_oneof![4 => soup(PROMPT_FRAGMENTS, 8).prop_map(|t| json!(String::from_utf8_lossy(&t))), 1 => json_leaf(&["a fox"])];
    let line = prop_oneof![
        6 => (file_name, text, any::<bool>()).prop_map(|(f, t, both)| {
            let line = if both { json!({"file_name": f, "text": t}) } else { json!({"file_name": f}) };
            serde_json::to_vec(&line).unwrap()
        }),
        1 => soup(CAPTION_FRAGMENTS, 6),
    ];
    prop_oneof![4 => vec(line, 0..4).prop_map(|lines| lines.join(&b'\n')), 1 => soup(CAPTION_FRAGMENTS, 30)].boxed()
}

// ---------------------------------------------------------------------------------------------
// The tests: a short run of each target, and the corpus of inputs that once failed.
// ---------------------------------------------------------------------------------------------

/// Every target by name, with its default number of inputs (a few seconds each in debug).
const TARGETS: &[(&str, fn(&[u8]) -> bool)] = &[
    ("infotext", infotext),
    ("png_text", png_text),
    ("a1111_prompt", a1111_prompt),
    ("lora_keys", lora_keys),
    ("safetensors", safetensors),
    ("lora_file", lora_file),
    ("single_file", single_file),
    ("model_configs", model_configs),
    ("scheduler_configs", scheduler_configs),
    ("idx", idx),
    ("captions", captions),
];

#[test]
fn fuzz_infotext() {
    fuzz("infotext", 20000, infotext_inputs(), infotext);
}

#[test]
fn fuzz_png_text() {
    fuzz("png_text", 10000, png_inputs(), png_text);
}

#[test]
fn fuzz_a1111_prompt() {
    fuzz("a1111_prompt", 5000, prompt_inputs(), a1111_prompt);
}

#[test]
fn fuzz_lora_keys() {
    fuzz("lora_keys", 10000, key_inputs(), lora_keys);
}

#[test]
fn fuzz_safetensors() {
    fuzz("safetensors", 8000, safetensors_inputs(), safetensors);
}

#[test]
fn fuzz_lora_file() {
    fuzz("lora_file", 6000, lora_inputs(), lora_file);
}

#[test]
fn fuzz_single_file() {
    fuzz("single_file", 1000, single_file_inputs(), single_file);
}

#[test]
fn fuzz_model_configs() {
    fuzz("model_configs", 8000, model_config_inputs(), model_configs);
}

#[test]
fn fuzz_scheduler_configs() {
    fuzz("scheduler_configs", 6000, scheduler_config_inputs(), scheduler_configs);
}

#[test]
fn fuzz_idx() {
    fuzz("idx", 8000, idx_inputs(), idx);
}

#[test]
fn fuzz_captions() {
    fuzz("captions", 3000, caption_inputs(), captions);
}

/// Every input that ever failed (`tests/fuzz_corpus/TARGET/*`) passes now.
#[test]
fn the_corpus_replays() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    start_watchdog();
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_corpus");
    let mut replayed = HashMap::new();
    for entry in std::fs::read_dir(&corpus).unwrap().flatten().filter(|e| e.path().is_dir()) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let (target, body) = TARGETS.iter().find(|(t, _)| *t == name).unwrap_or_else(|| panic!("{}: no fuzz target of that name", entry.path().display()));
        for input in std::fs::read_dir(entry.path()).unwrap().flatten() {
            let bytes = std::fs::read(input.path()).unwrap();
            run_case(target, &bytes, *body, &mut RunStats::default());
            *replayed.entry(name.clone()).or_insert(0) += 1;
        }
    }
    eprintln!("replayed {replayed:?}");
}
