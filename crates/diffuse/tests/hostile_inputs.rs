//! Inputs that cannot hurt (issue 13): files and text from anywhere (a PNG's parameters, a
//! prompt's `<lora:>` tags, IDX headers, LoRA files) and numbers a library caller gives give
//! errors, not panics, path escapes, quadratic time or allocations beyond the input's size.
//!
//! This test binary counts allocations (the largest one made on the test's thread), so that
//! "no allocation beyond the input's scale" is checked, not assumed.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use diffuse::lora::{path_in_dir, LoraFile, LoraSpec};
use diffuse::models::clip_text::{ClipTextConfig, ClipTextModel};
use diffuse::pipelines::metadata::parse_infotext;
use diffuse::prompts::extra_networks::parse_prompt;
use diffuse::training::data::{read_idx_labels, Captions, Dataset, IdxDataset, ImageFolderDataset};

struct Tracking;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // `try_with`: allocations while a thread is torn down are not counted.
    let _ = LARGEST.try_with(|largest| largest.set(largest.get().max(size)));
}

unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Tracking = Tracking;

/// What `f` returns and the largest single allocation it made on this thread.
fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|largest| largest.set(0));
    let value = f();
    (value, LARGEST.with(Cell::get))
}

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("diffuse-hostile-test-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn assert_contains(text: &str, needles: &[&str]) {
    for needle in needles {
        assert!(text.contains(needle), "`{needle}` missing from: {text}");
    }
}
fn write_file(path: &Path, bytes: &[u8]) {
    std::fs::File::create(path).and_then(|mut f| f.write_all(bytes)).unwrap();
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

#[test]
fn idx_headers_are_checked_against_the_file_before_anything_is_allocated() {
    let dir = scratch("idx");
    const SMALL: usize = 1 << 20;
    // Labels: an 8-byte file whose header promises 4 GiB of labels, plain and gzipped (with 10).
    let labels = dir.join("labels-idx1-ubyte");
    write_file(&labels, &[0, 0, 8, 1, 0xff, 0xff, 0xff, 0xff]);
    let (result, largest) = largest_allocation(|| read_idx_labels(&labels));
    assert_contains(&result.unwrap_err().to_string(), &["labels-idx1-ubyte", "is 8 bytes long", "4294967303"]);
    assert!(largest < SMALL, "{largest} bytes allocated for an 8-byte file");
    let gzipped = dir.join("labels-idx1-ubyte.gz");
    write_file(&gzipped, &gzip(&[&[0u8, 0, 8, 1, 0xff, 0xff, 0xff, 0xff][..], &[1; 10]].concat()));
    let (result, largest) = largest_allocation(|| read_idx_labels(&gzipped));
    assert_contains(&result.unwrap_err().to_string(), &["holds 10 labels; its header says 4294967295"]);
    assert!(largest < SMALL, "{largest} bytes allocated for a 10-label file");

    // Images whose dimensions' product overflows, and a file shorter than its header says.
    let cache = dir.join("cache");
    let images = dir.join("images-idx3-ubyte");
    write_file(&images, &[0, 0, 8, 3, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
    let error = IdxDataset::open(&images, None, &cache).err().unwrap().to_string();
    assert_contains(&error, &["images-idx3-ubyte", "overflow"]);
    let gzipped = dir.join("images-idx3-ubyte.gz");
    write_file(&gzipped, &gzip(&[0, 0, 8, 3, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]));
    let error = IdxDataset::open(&gzipped, None, &cache).err().unwrap().to_string();
    assert_contains(&error, &["images-idx3-ubyte.gz", "overflow"]);
    write_file(&images, &[0, 0, 8, 3, 0, 0, 0x10, 0, 0, 0, 0x10, 0, 0, 0, 0x10, 0, 7]);
    let (result, largest) = largest_allocation(|| IdxDataset::open(&images, None, &cache));
    assert_contains(&result.err().unwrap().to_string(), &["is 17 bytes long"]);
    assert!(largest < SMALL, "{largest} bytes allocated for a 17-byte file");
}

#[test]
fn lora_files_are_mapped_not_read_whole() {
    let path = common::fixtures_dir().join("lora/peft_a.safetensors");
    let file_len = std::fs::metadata(&path).unwrap().len() as usize;
    let (lora, largest) = largest_allocation(|| LoraFile::open(&path).unwrap());
    assert_eq!(lora.layers.len(), 44);
    // The largest tensor is 1 KiB; the file, 58 KiB.
    assert!(largest < file_len / 4, "{largest} bytes allocated at once for a LoRA file of {file_len}");
}

#[test]
fn lora_names_resolve_only_inside_the_lora_dir() {
    let dir = scratch("lora-names");
    let loras = dir.join("loras");
    std::fs::create_dir_all(loras.join("styles")).unwrap();
    let fixture = common::fixtures_dir().join("lora/peft_a.safetensors");
    std::fs::copy(&fixture, dir.join("outside.safetensors")).unwrap();
    std::fs::copy(&fixture, loras.join("styles/inside.safetensors")).unwrap();
    let outside = dir.join("outside");
    let prompt = format!("<lora:../outside:1> <lora:{}:1> <lora:styles/../../outside> <lora:styles/inside:0.5>", outside.display());
    let (_, tags) = parse_prompt(&prompt);
    for tag in &tags[..3] {
        let error = LoraSpec::from_tag(tag, Some(&loras)).unwrap_err().to_string();
        assert_contains(&error, &[&tag.text, "is not the name of a file inside", loras.to_str().unwrap()]);
    }
    // A sub-folder of the LoRA folder is inside it.
    let inside = LoraSpec::from_tag(&tags[3], Some(&loras)).unwrap();
    assert_eq!(inside.path, loras.join("styles/inside.safetensors"));
    for name in ["", ".", "./x", "..", "x/..", "/etc/passwd"] {
        assert!(path_in_dir(&loras, name).is_err(), "`{name}` must not resolve");
    }
}

#[test]
fn a_megabyte_of_infotext_parses_in_well_under_a_second() {
    const SIZE: usize = 1 << 20;
    let many_keys: String = (0..SIZE / 12).map(|i| format!("Key {i}: v, ")).collect();
    let lines = [
        // One long key-like run without `:` (the last line, so it is scanned for parameters).
        "a".repeat(SIZE),
        "a b-c/d ".repeat(SIZE / 8),
        format!("x{}, y", " ".repeat(SIZE)),
        "a:\"\\\",".repeat(SIZE / 6),
        format!("a: \"{}", "\\x".repeat(SIZE / 2)),
        // As many distinct settings as fit in a megabyte.
        many_keys.clone(),
    ];
    for line in lines {
        let text = format!("a cat\nNegative prompt: blurry\n{line}");
        let start = Instant::now();
        let parsed = parse_infotext(&text);
        let elapsed = start.elapsed();
        assert!(elapsed < Duration::from_millis(500), "{elapsed:?} for a line starting {:?}", &line[..20]);
        drop(parsed);
    }
    let params = parse_infotext(&format!("a cat\n{many_keys}")).unwrap();
    assert_eq!(params.extra.len(), SIZE / 12);
    // A key given twice keeps its first place and its last value.
    let params = parse_infotext("a cat\nSteps: 2, Foo: 1, Bar: 2, Foo: 3").unwrap();
    assert_eq!(params.extra, vec![("Foo".to_string(), "3".to_string()), ("Bar".to_string(), "2".to_string())]);
}

#[test]
fn clip_skip_beyond_the_encoders_layers_is_an_error() {
    let config = ClipTextConfig {
        vocab_size: 16,
        hidden_size: 8,
        intermediate_size: 16,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        max_position_embeddings: 8,
        ..Default::default()
    };
    let model = ClipTextModel::new(VarBuilder::zeros(DType::F32, &Device::Cpu), &config).unwrap();
    let ids = Tensor::new(&[[1u32, 2, 3, 4]], &Device::Cpu).unwrap();
    assert!(model.encode(&ids, Some(1)).is_ok());
    for skip in [2, 3, usize::MAX] {
        let error = model.encode(&ids, Some(skip)).unwrap_err().to_string();
        assert_contains(&error, &[&format!("clip skip {skip} is too large for a text encoder with 2 layers (at most 1)")]);
    }
}

#[test]
fn image_folder_metadata_names_only_files_inside_the_folder() {
    let dir = scratch("metadata-names");
    let root = dir.join("images");
    std::fs::create_dir_all(&root).unwrap();
    let png = std::fs::read(common::fixtures_dir().join("metadata/no_parameters.png")).unwrap();
    write_file(&dir.join("outside.png"), &png);
    write_file(&root.join("inside.png"), &png);
    let outside = dir.join("outside.png");
    for name in ["../outside.png", outside.to_str().unwrap(), "sub/../../outside.png"] {
        let line = serde_json::json!({"file_name": name, "text": "a caption"}).to_string();
        write_file(&root.join("metadata.jsonl"), line.as_bytes());
        let error = ImageFolderDataset::open(&root, Captions::Required, false).err().expect(name).to_string();
        assert_contains(&error, &["metadata.jsonl", "line 1", name, "is not a file inside"]);
    }
    write_file(&root.join("metadata.jsonl"), br#"{"file_name": "./inside.png", "text": "a caption"}"#);
    assert_eq!(ImageFolderDataset::open(&root, Captions::Required, false).unwrap().len(), 1);
}
