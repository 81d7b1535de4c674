//! Generation metadata (pipelines/metadata.rs): the AUTOMATIC1111 infotext written and read
//! back, checked against A1111's own reading of real and tricky infotexts
//! (tools/fixtures/infotext.py), PNG text chunks as Pillow (and so A1111) writes them, the
//! sampler mapping, and the model hash.

mod common;

use std::path::{Path, PathBuf};

use diffuse::pipelines::metadata::{
    a1111_sampler, diffuse_scheduler_name, model_hash, parse_infotext, quote, read_png_parameters, scheduler_from_a1111,
    split_infotext, GenerationParameters, InfotextParts,
};
use diffuse::pipelines::{resolve_scheduler, write_png, SCHEDULER_NAMES};
use serde_json::{json, Value};

fn metadata_fixtures() -> PathBuf {
    common::fixtures_dir().join("metadata")
}

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("diffuse-metadata-test-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn full_parameters() -> GenerationParameters {
    GenerationParameters {
        prompt: "a photo of a cat, (sitting:1.2)\non a \"red\" sofa — 猫 🐱".into(),
        negative_prompt: "blurry, low quality\nwatermark".into(),
        steps: Some(25),
        sampler: Some("DPM++ 2M".into()),
        schedule_type: Some("Karras".into()),
        cfg_scale: Some(7.5),
        seed: Some(18446744073709551615),
        width: Some(512),
        height: Some(768),
        model_hash: Some("6ce0161689".into()),
        model: Some("stable-diffusion-v1-5/stable-diffusion-v1-5".into()),
        denoising_strength: Some(0.75),
        clip_skip: Some(1),
        eta: Some(0.3),
        guidance_rescale: Some(0.7),
        class_label: Some(-3),
        batch_size: Some(4),
        batch_position: Some(2),
        scheduler: Some("dpm++2m-karras".into()),
        scheduler_config: vec![
            ("timestep_spacing".into(), json!("trailing")),
            ("steps_offset".into(), json!(1)),
            ("final_sigmas_type".into(), json!("zero")),
        ],
        variant: Some("fp16".into()),
        dtype: Some("f16".into()),
        version: Some("diffuse 0.1.0".into()),
        extra: vec![("Prompt syntax".into(), "a1111".into()), ("Quoted note".into(), "\"x\"".into())],
    }
}

#[test]
fn reading_matches_a1111_on_real_and_tricky_infotexts() {
    let cases: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(metadata_fixtures().join("parse_cases.json")).unwrap()).unwrap();
    assert!(cases.len() >= 18);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let expected = InfotextParts {
            prompt: case["prompt"].as_str().unwrap().into(),
            negative_prompt: case["negative_prompt"].as_str().unwrap().into(),
            pairs: case["pairs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| (p[0].as_str().unwrap().to_string(), p[1].as_str().unwrap().to_string()))
                .collect(),
        };
        assert_eq!(split_infotext(text), expected, "infotext {text:?}");
    }
}

#[test]
fn real_a1111_infotexts_are_typed() {
    // A1111 v1.6.0: combined sampler name, LoRA hashes quoted, Clip skip 2.
    let text = std::fs::read_to_string(metadata_fixtures().join("parse_cases.json")).unwrap();
    let cases: Vec<Value> = serde_json::from_str(&text).unwrap();
    let v160 = parse_infotext(cases[0]["text"].as_str().unwrap()).unwrap();
    assert_eq!(v160.prompt, "snowy,winter,(snowfall in background:1.2),(heavyfall:1.15),snow,very snowy,photorealistic,<lora:snowfall:0.8>,");
    assert_eq!(v160.negative_prompt, "Unrealistic,");
    assert_eq!(v160.steps, Some(20));
    assert_eq!(v160.sampler.as_deref(), Some("DPM++ 2M Karras"));
    assert_eq!(v160.schedule_type, None);
    assert_eq!(v160.cfg_scale, Some(7.0));
    assert_eq!(v160.seed, Some(712934690));
    assert_eq!((v160.width, v160.height), (Some(500), Some(375)));
    assert_eq!(v160.model_hash.as_deref(), Some("fe7578cb5e"));
    assert_eq!(v160.model.as_deref(), Some("realisticVisionV60B1_v60B1VAE"));
    assert_eq!(v160.denoising_strength, Some(0.34));
    assert_eq!(v160.clip_skip, Some(1), "A1111's Clip skip 2 is diffusers' clip_skip 1");
    assert_eq!(v160.version.as_deref(), Some("v1.6.0-2-g4afaaf8a"));
    let extra_keys: Vec<&str> = v160.extra.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(extra_keys, ["VAE hash", "VAE", "Lora hashes"]);
    assert_eq!(v160.extra[2].1, "snowfall: f8324b7af7d9");
    assert_eq!(v160.diffuse_scheduler().unwrap(), Some(("dpm++2m-karras".to_string(), vec![])));

    // A1111 v1.9.4: sampler and schedule type apart.
    let v194 = parse_infotext(cases[1]["text"].as_str().unwrap()).unwrap();
    assert_eq!(v194.sampler.as_deref(), Some("DPM++ 2M"));
    assert_eq!(v194.schedule_type.as_deref(), Some("Karras"));
    assert_eq!((v194.width, v194.height), (Some(985), Some(1266)));
    assert_eq!(v194.clip_skip, None);
    assert_eq!(v194.extra, vec![("Masked content".to_string(), "fill".to_string())]);
    assert_eq!(v194.diffuse_scheduler().unwrap(), Some(("dpm++2m-karras".to_string(), vec![])));

    // The example in A1111's parse_generation_parameters docstring.
    let old = parse_infotext(cases[2]["text"].as_str().unwrap()).unwrap();
    assert!(old.prompt.starts_with("girl with an artist's beret") && old.prompt.ends_with("intricate"));
    assert!(old.negative_prompt.starts_with("ugly, fat") && old.negative_prompt.ends_with("messy drawing"));
    assert_eq!(old.sampler.as_deref(), Some("Euler a"));
    assert_eq!(old.model_hash.as_deref(), Some("45dee52b"));
    assert_eq!(old.diffuse_scheduler().unwrap(), Some(("euler-ancestral".to_string(), vec![])));

    // Wrong types name the key.
    for (bad, needle) in [
        ("p\nSteps: many, Seed: 1, Size: 8x8", "Steps: many"),
        ("p\nSteps: 2, Seed: -1, Size: 8x8", "Seed: -1"),
        ("p\nSteps: 2, Seed: 1, Size: 8 by 8", "Size: 8 by 8"),
        ("p\nSteps: 2, Seed: 1, CFG scale: high", "CFG scale: high"),
        ("p\nSteps: 2, Seed: 1, Diffuse scheduler config: \"[1, 2]\"", "Diffuse scheduler config"),
    ] {
        let err = parse_infotext(bad).unwrap_err().to_string();
        assert!(err.contains(needle), "{err} should name {needle}");
    }
}

#[test]
fn writes_a1111s_layout_and_quoting() {
    let params = GenerationParameters {
        prompt: "a photo of a cat".into(),
        negative_prompt: "blurry, low quality".into(),
        steps: Some(20),
        sampler: Some("DPM++ 2M".into()),
        schedule_type: Some("Karras".into()),
        cfg_scale: Some(7.5),
        seed: Some(42),
        width: Some(512),
        height: Some(512),
        model_hash: Some("6ce0161689".into()),
        model: Some("v1-5-pruned-emaonly".into()),
        clip_skip: Some(1),
        scheduler: Some("dpm++2m-karras".into()),
        scheduler_config: vec![("timestep_spacing".into(), json!("trailing"))],
        version: Some("diffuse 0.1.0".into()),
        ..Default::default()
    };
    assert_eq!(
        params.to_infotext(),
        "a photo of a cat\nNegative prompt: blurry, low quality\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, \
         CFG scale: 7.5, Seed: 42, Size: 512x512, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Clip skip: 2, \
         Diffuse scheduler: dpm++2m-karras, Diffuse scheduler config: \"{\\\"timestep_spacing\\\":\\\"trailing\\\"}\", \
         Version: diffuse 0.1.0"
    );
    // No prompt, no negative prompt: just the parameters (A1111 strips the leading newline).
    let bare = GenerationParameters { steps: Some(3), seed: Some(1), width: Some(8), height: Some(8), ..Default::default() };
    assert_eq!(bare.to_infotext(), "Steps: 3, Seed: 1, Size: 8x8");
    // A1111 writes a whole-number CFG scale as the UI gave it; diffuse writes the shortest form.
    let whole = GenerationParameters { cfg_scale: Some(7.0), ..bare.clone() };
    assert!(whole.to_infotext().contains("CFG scale: 7,"));

    // quote(): A1111's json.dumps(ensure_ascii=False) for values with , : newline (and ").
    assert_eq!(quote("Euler a"), "Euler a");
    assert_eq!(quote("a, b"), "\"a, b\"");
    assert_eq!(quote("lora: 1"), "\"lora: 1\"");
    assert_eq!(quote("two\nlines\twith tab"), "\"two\\nlines\\twith tab\"");
    assert_eq!(quote("say \"hi\""), "\"say \\\"hi\\\"\"");
    assert_eq!(quote("back\\slash: é 猫 \u{1}"), "\"back\\\\slash: é 猫 \\u0001\"");
    assert_eq!(quote("back\\slash"), "back\\slash");
}

#[test]
fn every_field_round_trips() {
    let params = full_parameters();
    let text = params.to_infotext();
    assert_eq!(parse_infotext(&text).unwrap(), params, "{text}");
    // Clip skip 0 (no skip) is not written, and reads back as none.
    let no_skip = GenerationParameters { clip_skip: Some(0), ..full_parameters() };
    assert_eq!(parse_infotext(&no_skip.to_infotext()).unwrap().clip_skip, None);
    // Floats come back bit for bit.
    for value in [0.1, 1.0 / 3.0, 7.123456789012345, 1e-7, 12345678.9] {
        let p = GenerationParameters { cfg_scale: Some(value), steps: Some(1), seed: Some(1), ..Default::default() };
        assert_eq!(parse_infotext(&p.to_infotext()).unwrap().cfg_scale, Some(value));
    }
    // The JSON form `diffuse info --json` prints.
    let json = serde_json::to_value(&params).unwrap();
    assert_eq!(json["steps"], json!(25));
    assert_eq!(json["scheduler_config"], json!({"timestep_spacing": "trailing", "steps_offset": 1, "final_sigmas_type": "zero"}));
    assert_eq!(json["extra"]["Prompt syntax"], json!("a1111"));
    assert!(json.get("variant").is_some() && serde_json::to_value(GenerationParameters::default()).unwrap().get("variant").is_none());
}

#[test]
fn a1111_samplers_map_to_diffuse_schedulers() {
    let ok = |sampler: &str, schedule: Option<&str>| scheduler_from_a1111(sampler, schedule).unwrap();
    let flag = |key: &str| vec![(key.to_string(), Value::Bool(true))];
    assert_eq!(ok("DPM++ 2M Karras", None), ("dpm++2m-karras".into(), vec![]));
    assert_eq!(ok("DPM++ 2M", Some("Karras")), ("dpm++2m-karras".into(), vec![]));
    // A1111 1.9+: "Automatic" is the sampler's own default (Karras for DPM++ 2M).
    assert_eq!(ok("DPM++ 2M", Some("Automatic")), ("dpm++2m-karras".into(), vec![]));
    // Before 1.9 there was no schedule type, and "DPM++ 2M" was uniform.
    assert_eq!(ok("DPM++ 2M", None), ("dpm++2m".into(), vec![]));
    assert_eq!(ok("DPM++ 2M", Some("Uniform")), ("dpm++2m".into(), vec![]));
    assert_eq!(ok("DPM++ 2M SDE", Some("Automatic")), ("dpm++2m-sde".into(), flag("use_exponential_sigmas")));
    assert_eq!(ok("DPM++ 2M SDE Karras", None), ("dpm++2m-sde".into(), flag("use_karras_sigmas")));
    assert_eq!(ok("Euler", Some("karras")), ("euler".into(), flag("use_karras_sigmas")));
    assert_eq!(ok("LMS Karras", Some("Automatic")), ("lms".into(), flag("use_karras_sigmas")));
    assert_eq!(ok("UniPC", Some("Beta")), ("unipc".into(), flag("use_beta_sigmas")));
    assert_eq!(ok("Euler a", Some("Automatic")), ("euler-ancestral".into(), vec![]));
    assert_eq!(ok("PLMS", None), ("pndm".into(), vec![]));
    assert_eq!(ok("DDIM", Some("Automatic")), ("ddim".into(), vec![]));
    for (sampler, schedule, needle) in [
        ("DPM++ SDE Karras", None, "`DPM++ SDE Karras` has no diffuse equivalent"),
        ("Euler a", Some("Karras"), "`Euler a` with the `Karras` schedule"),
        ("Euler", Some("Align Your Steps"), "`Align Your Steps` schedule"),
        ("Euler SGM Uniform", None, "`SGM Uniform` schedule"),
    ] {
        let err = scheduler_from_a1111(sampler, schedule).unwrap_err().to_string();
        assert!(err.contains(needle) && err.contains("choose a diffuse scheduler instead"), "{err}");
    }

    // Written and read back, every scheduler name (and the schedule flags) resolves to the
    // same scheduler class and config.
    let scheduler_dir = common::fixtures_dir().join("sd/sd1/scheduler");
    // (TCD has no A1111 sampler: its infotext names the class, and `Diffuse scheduler` says tcd.)
    let mut cases: Vec<(&str, Vec<(String, Value)>)> =
        SCHEDULER_NAMES.iter().filter(|(name, ..)| *name != "tcd").map(|(name, ..)| (*name, vec![])).collect();
    for name in ["lms", "euler", "heun", "dpm++2m-sde", "unipc", "dpm++2m"] {
        // (use_beta_sigmas maps too, but diffuse does not run it yet.)
        for key in ["use_karras_sigmas", "use_exponential_sigmas"] {
            cases.push((name, vec![(key.to_string(), Value::Bool(true))]));
        }
    }
    for (name, overrides) in cases {
        let written = resolve_scheduler(&scheduler_dir, Some(name), &overrides).unwrap();
        let (sampler, schedule) = a1111_sampler(&written.class_name, &written.config);
        let (read_name, read_overrides) = scheduler_from_a1111(&sampler, schedule.as_deref())
            .unwrap_or_else(|e| panic!("{name} {overrides:?} -> {sampler} {schedule:?}: {e}"));
        let read = resolve_scheduler(&scheduler_dir, Some(&read_name), &read_overrides).unwrap();
        assert_eq!(read.class_name, written.class_name, "{name} {overrides:?} -> {sampler} {schedule:?}");
        assert_eq!(read.config, written.config, "{name} {overrides:?} -> {sampler} {schedule:?}");
    }
    let folder_default = resolve_scheduler(&scheduler_dir, None, &[]).unwrap();
    assert_eq!(a1111_sampler(&folder_default.class_name, &folder_default.config), ("PLMS".to_string(), Some("Automatic".to_string())));
    assert_eq!(diffuse_scheduler_name(&folder_default.class_name, &folder_default.config), Some("pndm"));
    assert_eq!(a1111_sampler("DDIMInverseScheduler", &Default::default()), ("DDIMInverseScheduler".to_string(), None));
}

#[test]
fn recorded_diffuse_scheduler_wins_over_the_sampler() {
    let mut params = parse_infotext("p\nSteps: 2, Sampler: Euler a, Seed: 1, Diffuse scheduler: dpm++2m-sde, Diffuse scheduler config: \"{\\\"use_karras_sigmas\\\": true}\"").unwrap();
    assert_eq!(params.diffuse_scheduler().unwrap(), Some(("dpm++2m-sde".to_string(), vec![("use_karras_sigmas".to_string(), json!(true))])));
    params.scheduler = Some("warp-drive".into());
    assert!(params.diffuse_scheduler().unwrap_err().to_string().contains("warp-drive"));
    assert_eq!(GenerationParameters::default().diffuse_scheduler().unwrap(), None);
}

#[test]
fn png_parameters_are_read_from_every_text_chunk_kind() {
    let dir = metadata_fixtures();
    let cases: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(dir.join("parse_cases.json")).unwrap()).unwrap();
    let text = |i: usize| cases[i]["text"].as_str().unwrap().to_string();
    // Written by Pillow as A1111 writes them: tEXt, iTXt, compressed iTXt, tEXt after IDAT.
    assert_eq!(read_png_parameters(&dir.join("a1111_latin1.png")).unwrap(), Some(text(0)));
    assert_eq!(read_png_parameters(&dir.join("a1111_utf8.png")).unwrap(), Some(text(3)));
    assert_eq!(read_png_parameters(&dir.join("a1111_zipped.png")).unwrap(), Some(text(3)));
    assert_eq!(read_png_parameters(&dir.join("after_idat.png")).unwrap(), Some(text(1)));
    assert_eq!(read_png_parameters(&dir.join("no_parameters.png")).unwrap(), None);
    let parsed = parse_infotext(&text(3)).unwrap();
    assert_eq!(parsed.prompt, "一只猫坐在窗台上, 🐱 kawaii, café");
    assert_eq!(parsed.model.as_deref(), Some("模型"));

    let scratch = scratch("png");
    let not_png = scratch.join("not.png");
    std::fs::write(&not_png, b"GIF89a not a png").unwrap();
    let err = read_png_parameters(&not_png).unwrap_err().to_string();
    assert!(err.contains("not a readable PNG") && err.contains("not.png"), "{err}");
    assert!(read_png_parameters(&scratch.join("missing.png")).unwrap_err().to_string().contains("missing.png"));

    // diffuse writes tEXt for Latin-1 text and iTXt otherwise, as Pillow decides.
    let pixels = vec![7u8; 4 * 4 * 3];
    for (name, value, chunk) in [("latin1", "café, naïve\nSteps: 1, Seed: 1, Size: 4x4", b"tEXt"), ("utf8", full_parameters().to_infotext().as_str(), b"iTXt")] {
        let path = scratch.join(format!("{name}.png"));
        write_png(&path, 4, 4, 3, &pixels, &[("parameters", value.to_string())]).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert!(bytes.windows(4).any(|w| w == chunk), "{name}: expected a {} chunk", String::from_utf8_lossy(chunk));
        assert_eq!(read_png_parameters(&path).unwrap().as_deref(), Some(value));
    }
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn model_hash_is_sha256_of_the_checkpoint_or_the_unet_files() {
    // SHA-256("abc") = ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad (FIPS 180-2).
    let abc = "ba7816bf8f";
    let dir = scratch("hash");
    let file = dir.join("model.safetensors");
    write(&file, b"abc");
    assert_eq!(model_hash(&file, None, None).unwrap(), abc);

    // A diffusers folder: the UNet's shards, in file-name order, hashed as one stream.
    let folder = dir.join("folder");
    write(&folder.join("unet/diffusion_pytorch_model-00002-of-00002.safetensors"), b"c");
    write(&folder.join("unet/diffusion_pytorch_model-00001-of-00002.safetensors"), b"ab");
    write(
        &folder.join("unet/diffusion_pytorch_model.safetensors.index.json"),
        json!({"weight_map": {"a": "diffusion_pytorch_model-00002-of-00002.safetensors", "b": "diffusion_pytorch_model-00001-of-00002.safetensors"}})
            .to_string()
            .as_bytes(),
    );
    assert_eq!(model_hash(&folder, None, None).unwrap(), abc);
    // The variant's files are the ones hashed. SHA-256("") = e3b0c44298fc...
    write(&folder.join("unet/diffusion_pytorch_model.fp16.safetensors"), b"");
    assert_eq!(model_hash(&folder, Some("fp16"), None).unwrap(), "e3b0c44298");
    let err = model_hash(&dir.join("nothing"), None, None).unwrap_err().to_string();
    assert!(err.contains("unet"), "{err}");

    // The cache is used while the files are unchanged, and ignored once they change.
    let cache = dir.join("cache/model-hashes.json");
    assert_eq!(model_hash(&file, None, Some(&cache)).unwrap(), abc);
    let text = std::fs::read_to_string(&cache).unwrap();
    let full = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
    assert!(text.contains(full), "{text}");
    std::fs::write(&cache, text.replace(full, &"0123456789".repeat(7)[..64])).unwrap();
    assert_eq!(model_hash(&file, None, Some(&cache)).unwrap(), "0123456789", "the cached value is used");
    std::thread::sleep(std::time::Duration::from_millis(20));
    write(&file, b"abc");
    assert_eq!(model_hash(&file, None, Some(&cache)).unwrap(), abc, "a rewritten file is hashed again");
    std::fs::write(&cache, "not json").unwrap();
    assert_eq!(model_hash(&file, None, Some(&cache)).unwrap(), abc, "a broken cache is ignored");
}
