//! `loading::hub` against Hugging Face cache trees: hand-built ones that follow huggingface_hub's
//! layout (blobs, relative symlinks from snapshots/, refs/), one written by the real
//! huggingface_hub 2.4 (tests/fixtures/hub_cache, from tools/fixtures/hub_cache.py), and a fake
//! Hub standing in for the network.
#![cfg(unix)]

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use diffuse::loading::hub::{
    cached_tree_listing, lookup_in_cache, pipeline_files, repo_folder_name, resolve_in_cache, resolve_model_with,
    CacheLookup, Fetch, HubEnv, RepoListing,
};
use diffuse::{Error, Result};
use serde_json::{json, Map, Value};

const C0: &str = "0000000000000000000000000000000000000a0a";
const C1: &str = "1111111111111111111111111111111111111b1b";

/// A fresh folder under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("diffuse-hub-{name}-{n}"));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn str_of(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Writes `data` as huggingface_hub does: a blob named by its content, and a relative symlink to
/// it at `snapshots/{commit}/{filename}`.
fn put_file(cache: &Path, repo_id: &str, commit: &str, filename: &str, data: &[u8]) {
    let repo_dir = cache.join(repo_folder_name(repo_id));
    // FNV-1a stands in for the etag (git sha1 or sha256) that names real blobs.
    let hash = data.iter().fold(0xcbf29ce484222325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100000001b3));
    let blob = repo_dir.join("blobs").join(format!("{hash:016x}"));
    std::fs::create_dir_all(blob.parent().unwrap()).unwrap();
    std::fs::write(&blob, data).unwrap();
    let pointer = repo_dir.join("snapshots").join(commit).join(filename);
    std::fs::create_dir_all(pointer.parent().unwrap()).unwrap();
    let depth = filename.split('/').count() + 1; // up out of the subfolders, {commit} and snapshots/
    let target = format!("{}blobs/{hash:016x}", "../".repeat(depth));
    std::os::unix::fs::symlink(target, &pointer).unwrap();
}

/// `refs/{name}` holding `commit`, without a newline, as huggingface_hub writes it.
fn put_ref(cache: &Path, repo_id: &str, name: &str, commit: &str) {
    let path = cache.join(repo_folder_name(repo_id)).join("refs").join(name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, commit).unwrap();
}

fn snapshot(cache: &Path, repo_id: &str, commit: &str) -> PathBuf {
    cache.join(repo_folder_name(repo_id)).join("snapshots").join(commit)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn model_index(components: &[(&str, &str, &str)]) -> Map<String, Value> {
    let mut index = Map::new();
    index.insert("_class_name".into(), json!("StableDiffusionPipeline"));
    index.insert("_diffusers_version".into(), json!("0.42.1"));
    for (name, library, class) in components {
        index.insert(name.to_string(), json!([library, class]));
    }
    index
}

fn ddpm_index() -> Vec<u8> {
    let index = model_index(&[("unet", "diffusers", "UNet2DModel"), ("scheduler", "diffusers", "DDPMScheduler")]);
    serde_json::to_vec(&index).unwrap()
}

/// A complete DDPM pipeline snapshot at `commit`.
fn put_ddpm(cache: &Path, repo_id: &str, commit: &str) {
    put_file(cache, repo_id, commit, "model_index.json", &ddpm_index());
    put_file(cache, repo_id, commit, "unet/config.json", format!("{{\"commit\": \"{commit}\"}}").as_bytes());
    put_file(cache, repo_id, commit, "unet/diffusion_pytorch_model.safetensors", b"weights");
    put_file(cache, repo_id, commit, "scheduler/scheduler_config.json", b"{}");
}

fn env(vars: &[(&str, &str)]) -> HubEnv {
    HubEnv::from_vars(vars.iter().copied())
}

fn offline_env(cache: &Path) -> HubEnv {
    env(&[("HF_HUB_CACHE", str_of(cache)), ("HF_HUB_OFFLINE", "1")])
}

fn online_env(cache: &Path) -> HubEnv {
    env(&[("HF_HUB_CACHE", str_of(cache))])
}

fn message(error: Error) -> String {
    error.to_string()
}

// ---------------------------------------------------------------------------------------------
// Hand-built caches

#[test]
fn resolves_main_through_refs() {
    let dir = TempDir::new("main");
    put_ddpm(&dir.0, "org/pipe", C0);
    put_ddpm(&dir.0, "org/pipe", C1);
    put_ref(&dir.0, "org/pipe", "main", C1);
    let expected = snapshot(&dir.0, "org/pipe", C1);
    assert_eq!(resolve_in_cache(&dir.0, "org/pipe", "main").unwrap(), Some(expected.clone()));
    let resolved = resolve_model_with("org/pipe", None, None, &offline_env(&dir.0), None).unwrap();
    assert_eq!(resolved, expected);
    // Through the symlink to the blob.
    assert_eq!(read(&resolved.join("unet/config.json")), format!("{{\"commit\": \"{C1}\"}}"));
}

#[test]
fn resolves_named_revisions() {
    let dir = TempDir::new("named");
    put_ddpm(&dir.0, "org/pipe", C0);
    put_ddpm(&dir.0, "org/pipe", C1);
    put_ref(&dir.0, "org/pipe", "main", C1);
    put_ref(&dir.0, "org/pipe", "v1.0", C0);
    put_ref(&dir.0, "org/pipe", "refs/pr/1", C0);
    let env = offline_env(&dir.0);
    for revision in ["v1.0", "refs/pr/1"] {
        let resolved = resolve_model_with("org/pipe", Some(revision), None, &env, None).unwrap();
        assert_eq!(resolved, snapshot(&dir.0, "org/pipe", C0), "{revision}");
    }
    // A ref file ending in a newline (hand-edited) still works.
    put_ref(&dir.0, "org/pipe", "v1.0", &format!("{C1}\n"));
    assert_eq!(resolve_in_cache(&dir.0, "org/pipe", "v1.0").unwrap(), Some(snapshot(&dir.0, "org/pipe", C1)));
}

#[test]
fn resolves_a_commit_hash_without_refs() {
    let dir = TempDir::new("hash");
    put_ddpm(&dir.0, "org/pipe", C0);
    assert!(!dir.0.join("models--org--pipe/refs").exists());
    let resolved = resolve_model_with("org/pipe", Some(C0), None, &offline_env(&dir.0), None).unwrap();
    assert_eq!(resolved, snapshot(&dir.0, "org/pipe", C0));
    // Repo ids without an organisation live in models--{name}.
    put_ddpm(&dir.0, "gpt2", C1);
    assert_eq!(resolve_in_cache(&dir.0, "gpt2", C1).unwrap(), Some(dir.0.join("models--gpt2/snapshots").join(C1)));
}

#[test]
fn missing_refs_and_snapshots() {
    let dir = TempDir::new("missing");
    assert_eq!(resolve_in_cache(&dir.0, "org/pipe", "main").unwrap(), None);
    put_ddpm(&dir.0, "org/pipe", C0);
    put_ref(&dir.0, "org/pipe", "main", C0);
    put_ref(&dir.0, "org/pipe", "gone", C1);
    assert_eq!(resolve_in_cache(&dir.0, "org/pipe", "dev").unwrap(), None);
    assert_eq!(
        lookup_in_cache(&dir.0, "org/pipe", "dev").unwrap(),
        CacheLookup::NoRef { ref_path: dir.0.join("models--org--pipe/refs/dev") }
    );
    assert_eq!(
        lookup_in_cache(&dir.0, "org/pipe", "gone").unwrap(),
        CacheLookup::NoSnapshot { commit: C1.to_string(), snapshot: snapshot(&dir.0, "org/pipe", C1) }
    );
    assert_eq!(resolve_in_cache(&dir.0, "org/pipe", C1).unwrap(), None);
    // A ref that is not a commit hash is an error naming the file, never a path to follow.
    put_ref(&dir.0, "org/pipe", "bad", "../../../../etc");
    let error = message(resolve_in_cache(&dir.0, "org/pipe", "bad").unwrap_err());
    assert!(error.contains("refs/bad") && error.contains("not a commit hash"), "{error}");
    // Revisions never leave refs/.
    let error = message(resolve_in_cache(&dir.0, "org/pipe", "../../x").unwrap_err());
    assert!(error.contains("revision `../../x`"), "{error}");
}

#[test]
fn cache_dir_precedence() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[("HOME", "/h")], "/h/.cache/huggingface/hub"),
        (&[("HOME", "/h"), ("XDG_CACHE_HOME", "/xdg")], "/xdg/huggingface/hub"),
        (&[("HOME", "/h"), ("XDG_CACHE_HOME", "/xdg"), ("HF_HOME", "/hf")], "/hf/hub"),
        (&[("HF_HOME", "/hf"), ("HUGGINGFACE_HUB_CACHE", "/legacy")], "/legacy"),
        (&[("HF_HOME", "/hf"), ("HUGGINGFACE_HUB_CACHE", "/legacy"), ("HF_HUB_CACHE", "/new")], "/new"),
        // `~` and `$VAR` expand, in HF_HOME and XDG_CACHE_HOME as in the cache variables.
        (&[("HOME", "/h"), ("HF_HOME", "~/hf")], "/h/hf/hub"),
        (&[("HOME", "/h"), ("XDG_CACHE_HOME", "~/xdg")], "/h/xdg/huggingface/hub"),
        (&[("HOME", "/h"), ("HF_HUB_CACHE", "~/c")], "/h/c"),
        (&[("HOME", "/h"), ("SCRATCH", "/s"), ("HF_HUB_CACHE", "$SCRATCH/hub")], "/s/hub"),
        (&[("HOME", "/h"), ("HUGGINGFACE_HUB_CACHE", "${HOME}/legacy")], "/h/legacy"),
    ];
    for (vars, expected) in cases {
        assert_eq!(env(vars).cache_dir().unwrap(), PathBuf::from(expected), "{vars:?}");
    }
    // No home and nothing set: an error that says what to set, not a panic.
    let error = message(env(&[]).cache_dir().unwrap_err());
    assert!(error.contains("HF_HOME"), "{error}");
    assert_eq!(env(&[("HF_HOME", "/hf")]).token_path().unwrap(), PathBuf::from("/hf/token"));
}

#[test]
fn an_existing_path_wins_over_a_repo_id() {
    let dir = TempDir::new("path");
    // `tests/fixtures` is also a valid repo id; cargo runs tests in the package folder, where it
    // exists as a path.
    put_ddpm(&dir.0, "tests/fixtures", C0);
    put_ref(&dir.0, "tests/fixtures", "main", C0);
    let fake = FakeHub::new(&dir.0);
    let resolved = resolve_model_with("tests/fixtures", None, None, &online_env(&dir.0), Some(&fake)).unwrap();
    assert_eq!(resolved, PathBuf::from("tests/fixtures"));
    let folder = str_of(&dir.0);
    assert_eq!(resolve_model_with(folder, None, None, &offline_env(&dir.0), None).unwrap(), dir.0);
    assert!(fake.calls().is_empty());
}

#[test]
fn neither_path_nor_repo_id() {
    let dir = TempDir::new("neither");
    for spec in ["./no/such/folder", "no/such/folder", "-bad-/x", ""] {
        let error = message(resolve_model_with(spec, None, None, &offline_env(&dir.0), None).unwrap_err());
        assert!(error.contains("neither an existing path nor a Hugging Face repo id"), "{spec}: {error}");
    }
}

#[test]
fn offline_miss_says_where_it_looked_and_how_to_fix() {
    let dir = TempDir::new("offline");
    let fake = FakeHub::new(&dir.0);
    let offline = offline_env(&dir.0);
    let error = message(resolve_model_with("google/ddpm-cat-256", None, None, &offline, Some(&fake)).unwrap_err());
    for needle in [
        "`google/ddpm-cat-256` is not a local path",
        "revision `main`",
        &format!("cache at {} (from HF_HUB_CACHE)", dir.0.display()),
        &format!("there is no {}", dir.0.join("models--google--ddpm-cat-256").display()),
        "HF_HUB_OFFLINE is set",
        "unset HF_HUB_OFFLINE",
        "hf download google/ddpm-cat-256 --include",
        "huggingface-cli download",
    ] {
        assert!(error.contains(needle), "missing `{needle}` in: {error}");
    }
    // A repo in the cache without that revision names the ref it looked for.
    put_ddpm(&dir.0, "google/ddpm-cat-256", C0);
    put_ref(&dir.0, "google/ddpm-cat-256", "main", C0);
    let error =
        message(resolve_model_with("google/ddpm-cat-256", Some("v2"), None, &offline, Some(&fake)).unwrap_err());
    assert!(
        error.contains(&format!("there is no {}", dir.0.join("models--google--ddpm-cat-256/refs/v2").display())),
        "{error}"
    );
    assert!(error.contains("--revision v2"), "{error}");
    // TRANSFORMERS_OFFLINE counts too; the fake Hub is never asked.
    let transformers_offline = env(&[("HF_HUB_CACHE", str_of(&dir.0)), ("TRANSFORMERS_OFFLINE", "yes")]);
    assert!(resolve_model_with("org/other", None, None, &transformers_offline, Some(&fake)).is_err());
    assert!(fake.calls().is_empty(), "{:?}", fake.calls());
}

#[test]
fn without_download_support_the_error_says_so() {
    let dir = TempDir::new("nodl");
    let error = message(resolve_model_with("org/pipe", None, None, &online_env(&dir.0), None).unwrap_err());
    assert!(error.contains("without the `download` feature") && error.contains("hf download org/pipe"), "{error}");
}

// ---------------------------------------------------------------------------------------------
// The cache written by the real huggingface_hub

const FIXTURE_REPO: &str = "diffuse-test/tiny-pipeline";

fn fixture_cache() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hub_cache")
}

fn fixture_refs() -> BTreeMap<String, String> {
    let expected: Value = serde_json::from_str(&read(&fixture_cache().join("expected.json"))).unwrap();
    serde_json::from_value(expected["refs"].clone()).unwrap()
}

fn f32_tensor(path: &Path, name: &str) -> Vec<f32> {
    let tensors = candle_core::safetensors::load(path, &candle_core::Device::Cpu).unwrap();
    let tensor = tensors[name].to_dtype(candle_core::DType::F32).unwrap();
    tensor.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn real_huggingface_hub_cache_resolves_by_ref_and_hash() {
    let cache = fixture_cache();
    let refs = fixture_refs();
    let env = offline_env(&cache);
    for (revision, commit) in &refs {
        let expected = snapshot(&cache, FIXTURE_REPO, commit);
        let by_ref = resolve_model_with(FIXTURE_REPO, Some(revision), None, &env, None).unwrap();
        assert_eq!(by_ref, expected, "{revision}");
        let by_hash = resolve_model_with(FIXTURE_REPO, Some(commit), None, &env, None).unwrap();
        assert_eq!(by_hash, expected, "{commit}");
        // The symlinks reach real blobs: the weights load, the model index parses.
        let index: Value = serde_json::from_str(&read(&by_ref.join("model_index.json"))).unwrap();
        assert_eq!(index["_class_name"], "DDPMPipeline");
        let weights = f32_tensor(&by_ref.join("unet/diffusion_pytorch_model.safetensors"), "conv_in.weight");
        assert_eq!(weights, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
    }
    let main = resolve_model_with(FIXTURE_REPO, None, None, &env, None).unwrap();
    assert_eq!(main, snapshot(&cache, FIXTURE_REPO, &refs["main"]));
    let scheduler = read(&main.join("scheduler/scheduler_config.json"));
    assert!(scheduler.contains("squaredcos_cap_v2"), "{scheduler}");
    let old = resolve_model_with(FIXTURE_REPO, Some("v1.0"), None, &env, None).unwrap();
    assert!(!read(&old.join("scheduler/scheduler_config.json")).contains("squaredcos_cap_v2"));
}

#[test]
fn real_huggingface_hub_tree_listing_decides_completeness() {
    let cache = fixture_cache();
    let refs = fixture_refs();
    let repo_dir = cache.join(repo_folder_name(FIXTURE_REPO));
    let listing: BTreeSet<String> = cached_tree_listing(&repo_dir, &refs["main"]).unwrap().into_iter().collect();
    assert!(listing.contains("unet/diffusion_pytorch_model.bin") && listing.contains("README.md"), "{listing:?}");
    let env = offline_env(&cache);
    // The .bin and README.md are listed but not needed: the snapshot is complete, also for fp16.
    let fp16 = resolve_model_with(FIXTURE_REPO, None, Some("fp16"), &env, None).unwrap();
    let half = f32_tensor(&fp16.join("unet/diffusion_pytorch_model.fp16.safetensors"), "conv_in.weight");
    assert_eq!(half, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
    // v1.0 has no fp16 weights at all, which its listing shows.
    let error = message(resolve_model_with(FIXTURE_REPO, Some("v1.0"), Some("fp16"), &env, None).unwrap_err());
    assert!(error.contains("no `fp16` variant weights"), "{error}");
}

/// Copies a cache tree, keeping symlinks as symlinks.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        let kind = entry.file_type().unwrap();
        if kind.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(entry.path()).unwrap(), &target).unwrap();
        } else if kind.is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

#[test]
fn incomplete_real_snapshot_offline_lists_what_is_missing() {
    let dir = TempDir::new("incomplete");
    copy_tree(&fixture_cache(), &dir.0);
    let commit = &fixture_refs()["main"];
    std::fs::remove_file(snapshot(&dir.0, FIXTURE_REPO, commit).join("unet/config.json")).unwrap();
    let error = message(resolve_model_with(FIXTURE_REPO, None, None, &offline_env(&dir.0), None).unwrap_err());
    assert!(error.contains("lacks 1 file(s) the pipeline needs: unet/config.json"), "{error}");
    assert!(error.contains(&format!("commit {commit}")) && error.contains("HF_HUB_OFFLINE"), "{error}");
    // Online, the fake Hub serves the missing file into the same snapshot, and nothing else.
    let fake = FakeHub::new(&dir.0);
    let listing = cached_tree_listing(&dir.0.join(repo_folder_name(FIXTURE_REPO)), commit).unwrap();
    fake.add_commit(FIXTURE_REPO, commit, listing.iter().map(|f| (f.as_str(), b"{}".as_slice())));
    fake.set_ref(FIXTURE_REPO, "main", commit);
    let resolved = resolve_model_with(FIXTURE_REPO, None, None, &online_env(&dir.0), Some(&fake)).unwrap();
    assert_eq!(resolved, snapshot(&dir.0, FIXTURE_REPO, commit));
    assert_eq!(fake.calls(), [format!("list {FIXTURE_REPO}@main"), format!("get {commit}/unet/config.json")]);
}

// ---------------------------------------------------------------------------------------------
// Downloading, with a fake Hub

/// Stands in for the Hub: serves files of commits and writes them into the cache as
/// huggingface_hub would, recording every call.
struct FakeHub {
    cache: PathBuf,
    commits: RefCell<BTreeMap<(String, String), BTreeMap<String, Vec<u8>>>>,
    refs: RefCell<BTreeMap<(String, String), String>>,
    calls: RefCell<Vec<String>>,
    fail_listing: bool,
}

impl FakeHub {
    fn new(cache: &Path) -> Self {
        FakeHub {
            cache: cache.to_path_buf(),
            commits: Default::default(),
            refs: Default::default(),
            calls: Default::default(),
            fail_listing: false,
        }
    }

    fn add_commit<'a>(&self, repo_id: &str, commit: &str, files: impl IntoIterator<Item = (&'a str, &'a [u8])>) {
        let files = files.into_iter().map(|(name, data)| (name.to_string(), data.to_vec())).collect();
        self.commits.borrow_mut().insert((repo_id.to_string(), commit.to_string()), files);
    }

    fn set_ref(&self, repo_id: &str, name: &str, commit: &str) {
        self.refs.borrow_mut().insert((repo_id.to_string(), name.to_string()), commit.to_string());
    }

    fn calls(&self) -> Vec<String> {
        self.calls.borrow().clone()
    }
}

impl Fetch for FakeHub {
    fn list_files(&self, repo_id: &str, revision: &str) -> Result<RepoListing> {
        self.calls.borrow_mut().push(format!("list {repo_id}@{revision}"));
        if self.fail_listing {
            return Err(Error::invalid("request error: https://huggingface.co/api/models/x: status code 401"));
        }
        let commit = match self.refs.borrow().get(&(repo_id.to_string(), revision.to_string())) {
            Some(commit) => commit.clone(),
            None => revision.to_string(),
        };
        let commits = self.commits.borrow();
        let files = commits
            .get(&(repo_id.to_string(), commit.clone()))
            .ok_or_else(|| Error::invalid(format!("404: {repo_id}@{revision}")))?;
        Ok(RepoListing { commit, files: files.keys().cloned().collect() })
    }

    fn download(&self, repo_id: &str, commit: &str, filename: &str) -> Result<()> {
        self.calls.borrow_mut().push(format!("get {commit}/{filename}"));
        let commits = self.commits.borrow();
        let data = &commits[&(repo_id.to_string(), commit.to_string())][filename];
        put_file(&self.cache, repo_id, commit, filename, data);
        Ok(())
    }
}

/// A Stable-Diffusion-1.5-like repo: fp16 variants for the unet only, a sharded text encoder,
/// pickles and single-file checkpoints beside the safetensors.
const SD_FILES: &[&str] = &[
    ".gitattributes",
    "README.md",
    "model_index.json",
    "v1-5-pruned.ckpt",
    "v1-5-pruned.safetensors",
    "feature_extractor/preprocessor_config.json",
    "safety_checker/config.json",
    "safety_checker/model.safetensors",
    "safety_checker/pytorch_model.bin",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model-00001-of-00002.safetensors",
    "text_encoder/model-00002-of-00002.safetensors",
    "text_encoder/model.safetensors.index.json",
    "text_encoder/pytorch_model.bin",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.bin",
    "unet/diffusion_pytorch_model.fp16.bin",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.non_ema.safetensors",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.bin",
];

fn sd_index() -> Map<String, Value> {
    let mut index = model_index(&[
        ("feature_extractor", "transformers", "CLIPImageProcessor"),
        ("safety_checker", "stable_diffusion", "StableDiffusionSafetyChecker"),
        ("scheduler", "diffusers", "PNDMScheduler"),
        ("text_encoder", "transformers", "CLIPTextModel"),
        ("tokenizer", "transformers", "CLIPTokenizer"),
        ("unet", "diffusers", "UNet2DConditionModel"),
        ("vae", "diffusers", "AutoencoderKL"),
    ]);
    index.insert("requires_safety_checker".into(), json!(true));
    index
}

fn files(names: &[&str]) -> Vec<String> {
    names.iter().map(|name| name.to_string()).collect()
}

fn sd_repo(fake: &FakeHub, repo_id: &str, commit: &str) {
    let index = serde_json::to_vec(&sd_index()).unwrap();
    let shard_index = serde_json::to_vec(&json!({
        "metadata": {},
        "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"},
    }))
    .unwrap();
    let contents: Vec<(&str, &[u8])> = SD_FILES
        .iter()
        .map(|&name| match name {
            "model_index.json" => (name, index.as_slice()),
            "text_encoder/model.safetensors.index.json" => (name, shard_index.as_slice()),
            _ => (name, name.as_bytes()),
        })
        .collect();
    fake.add_commit(repo_id, commit, contents);
}

const SD_PLAIN: &[&str] = &[
    "feature_extractor/preprocessor_config.json",
    "model_index.json",
    "safety_checker/config.json",
    "safety_checker/model.safetensors",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model-00001-of-00002.safetensors",
    "text_encoder/model-00002-of-00002.safetensors",
    "text_encoder/model.safetensors.index.json",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
];

#[test]
fn downloads_only_what_the_pipeline_needs_and_records_the_ref() {
    let dir = TempDir::new("download");
    let fake = FakeHub::new(&dir.0);
    sd_repo(&fake, "org/sd", C1);
    fake.set_ref("org/sd", "main", C1);
    let env = online_env(&dir.0);
    let resolved = resolve_model_with("org/sd", None, None, &env, Some(&fake)).unwrap();
    assert_eq!(resolved, snapshot(&dir.0, "org/sd", C1));
    let mut expected = vec![format!("list org/sd@main"), format!("get {C1}/model_index.json")];
    expected.extend(SD_PLAIN.iter().filter(|f| **f != "model_index.json").map(|f| format!("get {C1}/{f}")));
    assert_eq!(fake.calls(), expected);
    assert_eq!(read(&dir.0.join("models--org--sd/refs/main")), C1);
    assert_eq!(read(&resolved.join("tokenizer/vocab.json")), "tokenizer/vocab.json");

    // Complete now: a second resolve never asks the Hub.
    let again = resolve_model_with("org/sd", None, None, &env, Some(&fake)).unwrap();
    assert_eq!(again, resolved);
    assert_eq!(fake.calls().len(), expected.len());

    // fp16 adds the unet's fp16 weights; the other components have none and keep theirs.
    let fp16 = resolve_model_with("org/sd", None, Some("fp16"), &env, Some(&fake)).unwrap();
    assert_eq!(fp16, resolved);
    assert_eq!(
        fake.calls()[expected.len()..],
        [format!("list org/sd@main"), format!("get {C1}/unet/diffusion_pytorch_model.fp16.safetensors")]
    );
}

#[test]
fn downloads_by_commit_hash_write_no_ref() {
    let dir = TempDir::new("download-hash");
    let fake = FakeHub::new(&dir.0);
    sd_repo(&fake, "org/sd", C0);
    let resolved = resolve_model_with("org/sd", Some(C0), None, &online_env(&dir.0), Some(&fake)).unwrap();
    assert_eq!(resolved, snapshot(&dir.0, "org/sd", C0));
    assert!(!dir.0.join("models--org--sd/refs").exists());
    // A branch now pointing at it gets its ref.
    fake.set_ref("org/sd", "release", C0);
    std::fs::remove_file(resolved.join("vae/config.json")).unwrap();
    let again = resolve_model_with("org/sd", Some("release"), None, &online_env(&dir.0), Some(&fake));
    // refs/release is unknown locally, so the Hub is asked and only vae/config.json fetched.
    assert_eq!(again.unwrap(), resolved);
    assert_eq!(fake.calls().last().unwrap(), &format!("get {C0}/vae/config.json"));
    assert_eq!(read(&dir.0.join("models--org--sd/refs/release")), C0);
}

#[test]
fn a_partial_snapshot_is_completed_online() {
    let dir = TempDir::new("partial");
    put_file(&dir.0, "org/sd", C1, "model_index.json", &serde_json::to_vec(&sd_index()).unwrap());
    put_file(&dir.0, "org/sd", C1, "unet/config.json", b"unet/config.json");
    put_ref(&dir.0, "org/sd", "main", C1);
    let fake = FakeHub::new(&dir.0);
    sd_repo(&fake, "org/sd", C1);
    fake.set_ref("org/sd", "main", C1);
    // Offline there is no listing (no trees/), so the snapshot is taken as it is.
    let offline = resolve_model_with("org/sd", None, None, &offline_env(&dir.0), Some(&fake)).unwrap();
    assert_eq!(offline, snapshot(&dir.0, "org/sd", C1));
    assert!(fake.calls().is_empty());
    // Online, what the snapshot lacks is fetched, and only that.
    resolve_model_with("org/sd", None, None, &online_env(&dir.0), Some(&fake)).unwrap();
    let fetched: BTreeSet<String> =
        fake.calls().iter().filter_map(|c| c.strip_prefix(&format!("get {C1}/")).map(str::to_string)).collect();
    let expected: BTreeSet<String> = SD_PLAIN
        .iter()
        .filter(|f| !["model_index.json", "unet/config.json"].contains(f))
        .map(|f| f.to_string())
        .collect();
    assert_eq!(fetched, expected);
    // A snapshot file whose blob was deleted is fetched again.
    let vocab = snapshot(&dir.0, "org/sd", C1).join("tokenizer/vocab.json");
    std::fs::remove_file(std::fs::canonicalize(&vocab).unwrap()).unwrap();
    assert!(vocab.symlink_metadata().is_ok() && !vocab.exists());
    resolve_model_with("org/sd", None, None, &online_env(&dir.0), Some(&fake)).unwrap();
    assert_eq!(fake.calls().last().unwrap(), &format!("get {C1}/tokenizer/vocab.json"));
    assert_eq!(read(&vocab), "tokenizer/vocab.json");
}

#[test]
fn a_missing_shard_makes_a_snapshot_incomplete() {
    let dir = TempDir::new("shard");
    let fake = FakeHub::new(&dir.0);
    sd_repo(&fake, "org/sd", C1);
    fake.set_ref("org/sd", "main", C1);
    let env = online_env(&dir.0);
    let resolved = resolve_model_with("org/sd", None, None, &env, Some(&fake)).unwrap();
    std::fs::remove_file(resolved.join("text_encoder/model-00002-of-00002.safetensors")).unwrap();
    let calls = fake.calls().len();
    resolve_model_with("org/sd", None, None, &env, Some(&fake)).unwrap();
    assert_eq!(
        fake.calls()[calls..],
        [format!("list org/sd@main"), format!("get {C1}/text_encoder/model-00002-of-00002.safetensors")]
    );
}

#[test]
fn download_failures_explain_themselves() {
    let dir = TempDir::new("fail");
    let mut fake = FakeHub::new(&dir.0);
    fake.fail_listing = true;
    let error = message(resolve_model_with("org/private", None, None, &online_env(&dir.0), Some(&fake)).unwrap_err());
    for needle in
        ["org/private (revision `main`)", "downloading it failed", "status code 401", "HF_TOKEN", "HF_HUB_OFFLINE=1"]
    {
        assert!(error.contains(needle), "missing `{needle}` in: {error}");
    }
    // A snapshot that looks incomplete (no scheduler/) but has no trees/ listing is used as it is
    // when the Hub cannot be reached, as huggingface_hub does.
    put_file(&dir.0, "org/private", C0, "model_index.json", &ddpm_index());
    put_file(&dir.0, "org/private", C0, "unet/config.json", b"{}");
    put_file(&dir.0, "org/private", C0, "unet/diffusion_pytorch_model.safetensors", b"w");
    put_ref(&dir.0, "org/private", "main", C0);
    let resolved = resolve_model_with("org/private", None, None, &online_env(&dir.0), Some(&fake)).unwrap();
    assert_eq!(resolved, snapshot(&dir.0, "org/private", C0));
    assert_eq!(fake.calls().len(), 2);
    // With a listing that shows files missing, it is an error.
    let trees = dir.0.join("models--org--private/trees");
    std::fs::create_dir_all(&trees).unwrap();
    let listing = json!({"format_version": 1, "files": {
        "model_index.json": {"size": 1, "blob_id": "x"},
        "unet/config.json": {"size": 1, "blob_id": "x"},
        "unet/diffusion_pytorch_model.safetensors": {"size": 1, "blob_id": "x"},
        "scheduler/scheduler_config.json": {"size": 1, "blob_id": "x"},
    }});
    std::fs::write(trees.join(format!("{C0}.json")), listing.to_string()).unwrap();
    let error = message(resolve_model_with("org/private", None, None, &online_env(&dir.0), Some(&fake)).unwrap_err());
    assert!(error.contains("downloading it failed") && error.contains("status code 401"), "{error}");
    assert_eq!(fake.calls().len(), 3);

    // A repo that is not a diffusers pipeline.
    let fake = FakeHub::new(&dir.0);
    fake.add_commit("org/bert", C0, [("config.json", b"{}".as_slice()), ("model.safetensors", b"w")]);
    fake.set_ref("org/bert", "main", C0);
    let error = message(resolve_model_with("org/bert", None, None, &online_env(&dir.0), Some(&fake)).unwrap_err());
    assert!(error.contains("has no model_index.json"), "{error}");
}

// ---------------------------------------------------------------------------------------------
// Which files: diffusers' selection, safetensors only

fn selection(index: &Map<String, Value>, names: &[&str], variant: Option<&str>) -> Result<Vec<String>> {
    pipeline_files("org/repo", index, &files(names), variant)
}

#[test]
fn selects_plain_safetensors_and_non_model_folders() {
    assert_eq!(selection(&sd_index(), SD_FILES, None).unwrap(), files(SD_PLAIN));
}

#[test]
fn selects_variants_per_component() {
    let mut names = SD_FILES.to_vec();
    names.extend([
        "text_encoder/model.fp16-00001-of-00002.safetensors",
        "text_encoder/model.fp16-00002-of-00002.safetensors",
    ]);
    names.push("text_encoder/model.safetensors.index.fp16.json");
    let selected = selection(&sd_index(), &names, Some("fp16")).unwrap();
    let expected: Vec<String> = SD_PLAIN
        .iter()
        .map(|f| match *f {
            "unet/diffusion_pytorch_model.safetensors" => "unet/diffusion_pytorch_model.fp16.safetensors",
            "text_encoder/model-00001-of-00002.safetensors" => "text_encoder/model.fp16-00001-of-00002.safetensors",
            "text_encoder/model-00002-of-00002.safetensors" => "text_encoder/model.fp16-00002-of-00002.safetensors",
            "text_encoder/model.safetensors.index.json" => "text_encoder/model.safetensors.index.fp16.json",
            other => other,
        })
        .map(str::to_string)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(selected, expected);
}

#[test]
fn selects_legacy_sharded_variants() {
    let index = model_index(&[("text_encoder", "transformers", "CLIPTextModel")]);
    let names = [
        "text_encoder/config.json",
        "text_encoder/model-00001-of-00002.safetensors",
        "text_encoder/model-00002-of-00002.safetensors",
        "text_encoder/model.safetensors.index.json",
        "text_encoder/model-00001-of-00002.fp16.safetensors",
        "text_encoder/model-00002-of-00002.fp16.safetensors",
        "text_encoder/model.safetensors.fp16.index.json",
    ];
    assert_eq!(
        selection(&index, &names, Some("fp16")).unwrap(),
        files(&[
            "model_index.json",
            "text_encoder/config.json",
            "text_encoder/model-00001-of-00002.fp16.safetensors",
            "text_encoder/model-00002-of-00002.fp16.safetensors",
            "text_encoder/model.safetensors.fp16.index.json",
        ])
    );
    // Without the variant, the fp16 shards are not plain weights.
    assert_eq!(
        selection(&index, &names, None).unwrap(),
        files(&[
            "model_index.json",
            "text_encoder/config.json",
            "text_encoder/model-00001-of-00002.safetensors",
            "text_encoder/model-00002-of-00002.safetensors",
            "text_encoder/model.safetensors.index.json",
        ])
    );
}

#[test]
fn never_pickles() {
    // A component with only .bin weights is an error naming it, not a .bin download.
    let index = model_index(&[("unet", "diffusers", "UNet2DModel"), ("scheduler", "diffusers", "DDPMScheduler")]);
    let names =
        ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.bin", "scheduler/scheduler_config.json"];
    let error = message(selection(&index, &names, None).unwrap_err());
    assert!(error.contains("component `unet` of org/repo has no safetensors weights"), "{error}");
    assert!(error.contains("diffusion_pytorch_model.bin"), "{error}");
    // Weights of any pickle format in a folder without safetensors-style weights make it a model
    // folder too; nested pickles in other folders are skipped.
    let names = ["unet/config.json", "unet/model.ckpt", "scheduler/scheduler_config.json", "scheduler/extra/state.pt"];
    assert!(selection(&index, &names, None).is_err());
    let names = [
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "scheduler/scheduler_config.json",
        "scheduler/extra/state.pt",
    ];
    assert_eq!(
        selection(&index, &names, None).unwrap(),
        files(&[
            "model_index.json",
            "scheduler/scheduler_config.json",
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors"
        ])
    );
}

#[test]
fn a_missing_variant_is_an_error() {
    let error = message(selection(&sd_index(), SD_FILES, Some("bf16")).unwrap_err());
    assert!(error.contains("org/repo has no `bf16` variant weights"), "{error}");
}

#[test]
fn ignored_files_and_absent_components() {
    let mut index = sd_index();
    index.insert("_ignore_files".into(), json!(["unet/diffusion_pytorch_model.safetensors", "tokenizer/merges.txt"]));
    index.insert("safety_checker".into(), json!([null, null]));
    index.insert("image_encoder".into(), json!([null, null]));
    let mut names = SD_FILES.to_vec();
    names.retain(|f| !f.starts_with("safety_checker/"));
    names.push("unet/diffusion_pytorch_model-00001-of-00001.safetensors");
    let selected = selection(&index, &names, None).unwrap();
    let mut expected: Vec<&str> = SD_PLAIN
        .iter()
        .copied()
        .filter(|f| !f.starts_with("safety_checker/") && *f != "tokenizer/merges.txt")
        .map(|f| {
            if f == "unet/diffusion_pytorch_model.safetensors" {
                "unet/diffusion_pytorch_model-00001-of-00001.safetensors"
            } else {
                f
            }
        })
        .collect();
    expected.sort();
    assert_eq!(selected, files(&expected));
}

// ---------------------------------------------------------------------------------------------
// The real downloader (hf-hub), against a fake Hub on 127.0.0.1

#[cfg(feature = "download")]
mod hf_hub_download {
    use super::*;
    use diffuse::loading::hub::HfHubFetch;
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpListener;
    use std::sync::{Arc, Mutex};

    /// Serves one repo at one commit on a loopback port, answering the requests hf-hub makes
    /// (repo info; ranged GETs of `resolve/` URLs with `etag`, `x-repo-commit`, `content-range`),
    /// and logs each request as `PATH auth=... range=...`.
    fn serve(
        repo_id: &'static str,
        commit: &'static str,
        files: BTreeMap<String, Vec<u8>>,
    ) -> (String, Arc<Mutex<Vec<String>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let log = Arc::new(Mutex::new(Vec::new()));
        let requests = log.clone();
        std::thread::spawn(move || {
            // Bounded: one connection per request, and no test here makes nearly this many.
            for stream in listener.incoming().take(200) {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut request_line = String::new();
                let _ = reader.read_line(&mut request_line);
                let (mut range, mut auth) = (None, None);
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    let (name, value) = line.split_once(':').unwrap_or((&line, ""));
                    match name.to_ascii_lowercase().as_str() {
                        "range" => range = value.trim().strip_prefix("bytes=").map(str::to_string),
                        "authorization" => auth = Some(value.trim().to_string()),
                        _ => {}
                    }
                }
                let path = request_line.split_whitespace().nth(1).unwrap_or("").to_string();
                let auth = auth.as_deref().unwrap_or("-");
                requests.lock().unwrap().push(format!("{path} auth={auth} range={}", range.as_deref().unwrap_or("-")));
                let info_prefix = format!("/api/models/{repo_id}/revision/");
                let resolve_prefix = format!("/{repo_id}/resolve/{commit}/");
                let (status, headers, body) = if path.starts_with(&info_prefix) {
                    let siblings: Vec<Value> = files.keys().map(|name| json!({"rfilename": name})).collect();
                    let info = json!({"sha": commit, "siblings": siblings});
                    ("200 OK", String::new(), serde_json::to_vec(&info).unwrap())
                } else if let Some(data) = path.strip_prefix(&resolve_prefix).and_then(|name| files.get(name)) {
                    let (start, end) = match range.as_deref().and_then(|r| r.split_once('-')) {
                        Some((start, end)) => (start.parse().unwrap_or(0), end.parse().unwrap_or(data.len() - 1)),
                        None => (0, data.len() - 1),
                    };
                    let etag =
                        data.iter().fold(0xcbf29ce484222325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100000001b3));
                    let headers = format!(
                        "etag: \"{etag:016x}\"\r\nx-repo-commit: {commit}\r\ncontent-range: bytes {start}-{end}/{}\r\n",
                        data.len()
                    );
                    ("206 Partial Content", headers, data[start..=end].to_vec())
                } else {
                    ("404 Not Found", String::new(), Vec::new())
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\n{headers}content-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes()).and_then(|_| stream.write_all(&body));
            }
        });
        (endpoint, log)
    }

    #[test]
    fn hf_hub_fills_the_cache_as_huggingface_hub_lays_it_out() {
        let dir = TempDir::new("hf-hub");
        let files: BTreeMap<String, Vec<u8>> = [
            ("model_index.json", ddpm_index()),
            ("unet/config.json", b"{\"sample_size\": 8}".to_vec()),
            ("unet/diffusion_pytorch_model.safetensors", b"safetensors bytes".to_vec()),
            ("unet/diffusion_pytorch_model.bin", b"pickle bytes".to_vec()),
            ("scheduler/scheduler_config.json", b"{}".to_vec()),
            ("README.md", b"# readme".to_vec()),
        ]
        .into_iter()
        .map(|(name, data)| (name.to_string(), data))
        .collect();
        let (endpoint, requests) = serve("org/pipe", C1, files.clone());
        let env = env(&[("HF_HUB_CACHE", str_of(&dir.0)), ("HF_ENDPOINT", &endpoint), ("HF_TOKEN", "hf_test")]);
        let fetch = HfHubFetch::new(&env).unwrap();

        let resolved = resolve_model_with("org/pipe", None, None, &env, Some(&fetch)).unwrap();
        assert_eq!(resolved, snapshot(&dir.0, "org/pipe", C1));
        let needed = [
            "model_index.json",
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors",
            "scheduler/scheduler_config.json",
        ];
        for name in needed {
            let pointer = resolved.join(name);
            assert_eq!(std::fs::read(&pointer).unwrap(), files[name], "{name}");
            // A relative symlink into blobs/, as huggingface_hub makes.
            let target = std::fs::read_link(&pointer).unwrap();
            assert!(target.is_relative() && target.to_str().unwrap().contains("../blobs/"), "{name} -> {target:?}");
        }
        assert!(!resolved.join("unet/diffusion_pytorch_model.bin").exists());
        assert!(!resolved.join("README.md").exists());
        let repo_dir = dir.0.join("models--org--pipe");
        assert_eq!(read(&repo_dir.join("refs/main")), C1);
        // Neither hf-hub's refs/{commit} nor its lock files are left behind.
        let names = |folder: &str| -> Vec<String> {
            let entries = std::fs::read_dir(repo_dir.join(folder)).unwrap();
            entries.map(|e| e.unwrap().file_name().into_string().unwrap()).collect()
        };
        assert_eq!(names("refs"), ["main"]);
        let blobs = names("blobs");
        assert_eq!(blobs.len(), 4, "{blobs:?}");
        assert!(blobs.iter().all(|b| !b.contains('.')), "{blobs:?}");

        let log = requests.lock().unwrap().clone();
        assert_eq!(log[0], "/api/models/org/pipe/revision/main auth=Bearer hf_test range=-");
        assert!(log.iter().all(|r| r.contains("auth=Bearer hf_test")), "{log:?}");
        assert!(log.iter().all(|r| !r.contains(".bin") && !r.contains("README")), "{log:?}");
        let weights = format!("/org/pipe/resolve/{C1}/unet/diffusion_pytorch_model.safetensors");
        assert!(log.iter().any(|r| r.starts_with(&weights)), "{log:?}");

        // The cache now serves it without a request.
        let count = log.len();
        assert_eq!(resolve_model_with("org/pipe", None, None, &env, Some(&fetch)).unwrap(), resolved);
        assert_eq!(requests.lock().unwrap().len(), count);

        // An unknown repo: the Hub's 404 comes back as an explained error.
        let error = message(resolve_model_with("org/nothing", None, None, &env, Some(&fetch)).unwrap_err());
        assert!(error.contains("downloading it failed") && error.contains("404"), "{error}");
    }
}

// ---------------------------------------------------------------------------------------------
// SDXL from the cache

/// Every file under `dir` (symlinks followed), as paths relative to it.
fn files_under(dir: &Path, prefix: &str, out: &mut Vec<(String, Vec<u8>)>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = format!("{prefix}{}", path.file_name().unwrap().to_str().unwrap());
        if path.is_dir() {
            files_under(&path, &format!("{name}/"), out);
        } else {
            out.push((name, std::fs::read(&path).unwrap()));
        }
    }
}

/// An SDXL base as a repo in the cache (the fixture's files as blobs): resolved by repo id
/// offline, it loads as an SDXL pipeline with both text encoders; and diffusers' selection of
/// files to download takes the second encoder and tokenizer with the rest.
#[test]
fn an_sdxl_repo_in_the_cache_loads_with_both_text_encoders() {
    let dir = TempDir::new("sdxl");
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sdxl/base");
    let mut files = Vec::new();
    files_under(&fixture, "", &mut files);
    for (name, data) in &files {
        put_file(&dir.0, "org/sdxl", C0, name, data);
    }
    put_ref(&dir.0, "org/sdxl", "main", C0);
    let path = resolve_model_with("org/sdxl", None, None, &offline_env(&dir.0), None).unwrap();
    assert_eq!(path, snapshot(&dir.0, "org/sdxl", C0));
    let pipeline =
        diffuse::pipelines::stable_diffusion::StableDiffusionPipeline::load(&path, None, &[], None, &candle_core::Device::Cpu, candle_core::DType::F32)
            .unwrap();
    assert!(pipeline.is_xl() && pipeline.text_encoder_2.is_some() && pipeline.force_zeros_for_empty_prompt);
    assert_eq!(pipeline.pipeline_class, "StableDiffusionXLPipeline");

    let index: Map<String, Value> = serde_json::from_slice(&std::fs::read(fixture.join("model_index.json")).unwrap()).unwrap();
    let names: Vec<&str> = files.iter().map(|(name, _)| name.as_str()).collect();
    let selected = pipeline_files("org/sdxl", &index, &names.iter().map(|n| n.to_string()).collect::<Vec<_>>(), None).unwrap();
    for needed in ["text_encoder_2/model.safetensors", "text_encoder_2/config.json", "tokenizer_2/vocab.json", "tokenizer_2/merges.txt"] {
        assert!(selected.iter().any(|s| s == needed), "{needed} not in {selected:?}");
    }
}
