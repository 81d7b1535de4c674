//! The `diffuse` command as users run it: parity of a written PNG with diffusers, and clear
//! one-line errors (non-zero exit, no panic, no partial output) for bad input.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../diffuse/tests/fixtures")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("diffuse-cli-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

fn diffuse(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_diffuse")).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Runs a command that must fail, and checks the error is one clear line naming `needle`.
fn assert_fails_with(args: &[&str], needle: &str) {
    let (ok, _, stderr) = diffuse(args);
    assert!(!ok, "expected failure for {args:?}");
    assert!(!stderr.contains("panicked"), "panic for {args:?}: {stderr}");
    assert!(stderr.contains(needle), "error for {args:?} should mention `{needle}`: {stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one-line error expected: {stderr}");
}

fn decode_png(path: &Path) -> (Vec<u8>, Vec<(String, String)>) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    buf.truncate(info.buffer_size());
    let text = reader.info().uncompressed_latin1_text.iter().map(|t| (t.keyword.clone(), t.text.clone())).collect();
    (buf, text)
}

#[test]
fn generate_matches_diffusers_and_writes_parameters() {
    let dir = scratch("parity");
    let out = dir.join("img.png");
    let model = fixtures().join("pixel/classcond");
    let (ok, stdout, stderr) = diffuse(&[
        "generate", "--model", model.to_str().unwrap(), "--scheduler", "ddim", "--steps", "8", "--seed", "11",
        "--class-label", "3", "--quiet", "--output", out.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("img.png"));
    let (pixels, text) = decode_png(&out);
    let reference = candle_core::safetensors::load(fixtures().join("pixel/cases/classcond_ddim.safetensors"), &candle_core::Device::Cpu).unwrap();
    let expected = reference["images"].flatten_all().unwrap().to_vec1::<u8>().unwrap();
    let mse = pixels.iter().zip(&expected).map(|(&a, &b)| (a as f64 - b as f64).powi(2)).sum::<f64>() / pixels.len() as f64;
    let psnr = if mse == 0.0 { f64::INFINITY } else { 10.0 * (255f64.powi(2) / mse).log10() };
    assert!(psnr >= 40.0, "PSNR {psnr}");
    let parameters = &text.iter().find(|(k, _)| k == "parameters").expect("parameters chunk").1;
    assert!(parameters.contains("Seed: 11") && parameters.contains("Steps: 8"), "{parameters}");
}

#[test]
fn several_images_are_numbered_and_random_seed_is_printed() {
    let dir = scratch("batch");
    let out = dir.join("x.png");
    let model = fixtures().join("pixel/gray");
    let (ok, _, stderr) = diffuse(&["generate", "--model", model.to_str().unwrap(), "--steps", "3", "--num-images", "2", "--output", out.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("seed"), "{stderr}");
    assert!(dir.join("x-0.png").is_file() && dir.join("x-1.png").is_file());
    assert!(!out.exists());
}

#[test]
fn schedulers_lists_every_name() {
    let (ok, stdout, _) = diffuse(&["schedulers"]);
    assert!(ok);
    for name in ["ddpm", "ddim", "pndm", "lms", "euler", "euler-ancestral", "heun", "dpm++2m", "dpm++2m-karras", "dpm++2m-sde", "unipc"] {
        assert!(stdout.lines().any(|l| l.split_whitespace().next() == Some(name)), "{name} missing");
    }
}

#[test]
fn bad_input_gives_clear_errors_and_no_output() {
    let dir = scratch("bad");
    let out = dir.join("out.png");
    let out_s = out.to_str().unwrap();
    let good = fixtures().join("pixel/uncond");
    let good_s = good.to_str().unwrap();

    assert_fails_with(&["generate", "--model", good_s, "--scheduler", "nope", "--output", out_s], "valid names: ddpm");
    assert_fails_with(&["generate", "--model", good_s, "--steps", "0", "--output", out_s], "--steps");
    assert_fails_with(&["generate", "--model", good_s, "--class-label", "1", "--output", out_s], "unconditional");
    let cond = fixtures().join("pixel/classcond");
    assert_fails_with(&["generate", "--model", cond.to_str().unwrap(), "--class-label", "9", "--output", out_s], "out of range");
    assert_fails_with(
        &["generate", "--model", good_s, "--scheduler-config", "timestep_spacing=sideways", "--output", out_s],
        "sideways",
    );
    assert_fails_with(
        &["generate", "--model", good_s, "--scheduler-config", "num_train_timesteps=\"many\"", "--output", out_s],
        "num_train_timesteps",
    );
    assert_fails_with(&["generate", "--model", good_s, "--output", dir.join("missing/out.png").to_str().unwrap()], "does not exist");
    assert_fails_with(&["generate", "--model", dir.join("nowhere").to_str().unwrap(), "--output", out_s], "nowhere");

    // A folder without its unet weights.
    let broken = dir.join("no-weights");
    copy_dir(&good, &broken);
    std::fs::remove_file(broken.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    assert_fails_with(&["generate", "--model", broken.to_str().unwrap(), "--output", out_s], "diffusion_pytorch_model.safetensors");

    // A truncated weights file.
    let truncated = dir.join("truncated");
    copy_dir(&good, &truncated);
    let weights = truncated.join("unet/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    assert_fails_with(&["generate", "--model", truncated.to_str().unwrap(), "--output", out_s], "truncated");

    // A config naming a block type we do not have.
    let odd = dir.join("odd-block");
    copy_dir(&good, &odd);
    let config_path = odd.join("unet/config.json");
    let config = std::fs::read_to_string(&config_path).unwrap().replace("\"AttnDownBlock2D\"", "\"FancyDownBlock2D\"");
    std::fs::write(&config_path, config).unwrap();
    assert_fails_with(&["generate", "--model", odd.to_str().unwrap(), "--output", out_s], "FancyDownBlock2D");

    // A config whose channels disagree with the weights: name the tensor and both shapes.
    let mismatched = dir.join("mismatch");
    copy_dir(&good, &mismatched);
    let config_path = mismatched.join("unet/config.json");
    let config = std::fs::read_to_string(&config_path).unwrap().replace("\"out_channels\": 3", "\"out_channels\": 4");
    std::fs::write(&config_path, config).unwrap();
    assert_fails_with(&["generate", "--model", mismatched.to_str().unwrap(), "--output", out_s], "conv_out");

    assert!(!out.exists(), "no output may be written on failure");
    let leftovers: Vec<_> = std::fs::read_dir(&dir).unwrap().filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().contains(".tmp")).collect();
    assert!(leftovers.is_empty());
}

#[test]
fn text_to_image_matches_diffusers() {
    let dir = scratch("sd");
    let out = dir.join("cat.png");
    let model = fixtures().join("sd/sd1");
    let (ok, _, stderr) = diffuse(&[
        "generate", "--model", model.to_str().unwrap(), "--prompt", "a photo of a cat", "--negative-prompt",
        "blurry, low quality", "--scheduler", "euler", "--steps", "8", "--seed", "3", "--output", out.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("text encoding") && stderr.contains("decoding"), "phase times: {stderr}");
    let (pixels, text) = decode_png(&out);
    let reference = candle_core::safetensors::load(fixtures().join("sd/cases/sd1_negative.safetensors"), &candle_core::Device::Cpu).unwrap();
    let expected = reference["images"].flatten_all().unwrap().to_vec1::<u8>().unwrap();
    let mse = pixels.iter().zip(&expected).map(|(&a, &b)| (a as f64 - b as f64).powi(2)).sum::<f64>() / pixels.len() as f64;
    let psnr = if mse == 0.0 { f64::INFINITY } else { 10.0 * (255f64.powi(2) / mse).log10() };
    assert!(psnr >= 40.0, "PSNR {psnr}");
    let parameters = &text.iter().find(|(k, _)| k == "parameters").expect("parameters chunk").1;
    assert!(parameters.starts_with("a photo of a cat\nNegative prompt: blurry, low quality\nSteps: 8"), "{parameters}");
    assert!(parameters.contains("CFG scale: 7.5") && parameters.contains("Seed: 3") && parameters.contains("Size: 64x64"), "{parameters}");
}

#[test]
fn text_to_image_bad_input() {
    let dir = scratch("sd-bad");
    let out = dir.join("out.png");
    let out_s = out.to_str().unwrap();
    let sd = fixtures().join("sd/sd1");
    let sd_s = sd.to_str().unwrap();
    let base = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["generate", "--model", sd_s, "--prompt", "a cat", "--steps", "2", "--output", out_s].iter().map(|s| s.to_string()).collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let run = |extra: &[&str], needle: &str| {
        let args = base(extra);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_fails_with(&refs, needle);
    };
    run(&["--width", "60"], "multiples of 8");
    run(&["--height", "100000", "--width", "100000"], "too large");
    run(&["--dtype", "bf16"], "bf16");
    run(&["--dtype", "f64"], "f32, f16, bf16");
    run(&["--class-label", "1"], "class-conditional");
    run(&["--clip-skip", "7"], "clip skip");
    let pixel = fixtures().join("pixel/uncond");
    assert_fails_with(&["generate", "--model", pixel.to_str().unwrap(), "--prompt", "x", "--output", out_s], "pixel-space");

    let no_vae = dir.join("no-vae");
    copy_dir(&sd, &no_vae);
    std::fs::remove_dir_all(no_vae.join("vae")).unwrap();
    assert_fails_with(&["generate", "--model", no_vae.to_str().unwrap(), "--prompt", "x", "--output", out_s], "`vae/` component is missing");

    // A UNet whose cross_attention_dim does not match the text encoder.
    let mismatch = dir.join("cross-dim");
    copy_dir(&sd, &mismatch);
    let te_config = mismatch.join("text_encoder/config.json");
    let text = std::fs::read_to_string(&te_config).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&text).unwrap();
    config["hidden_size"] = serde_json::json!(8);
    config["intermediate_size"] = serde_json::json!(8);
    std::fs::write(&te_config, config.to_string()).unwrap();
    let (ok, _, stderr) = diffuse(&["generate", "--model", mismatch.to_str().unwrap(), "--prompt", "x", "--output", out_s]);
    assert!(!ok && !stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains("model.safetensors") || stderr.contains("cross_attention_dim"), "{stderr}");
    assert!(!out.exists());

    // The empty prompt is valid, as in diffusers.
    let (ok, _, stderr) = diffuse(&["generate", "--model", sd_s, "--prompt", "", "--steps", "2", "--quiet", "--output", out_s]);
    assert!(ok, "{stderr}");
    assert!(out.exists());
}

/// A small IDX dataset in a scratch folder: 24 images of 8×8 (bars in three directions) and
/// their labels, as MNIST names them.
fn idx_dataset(dir: &Path) -> PathBuf {
    let idx = |dims: &[u32], data: &[u8]| {
        let mut bytes = vec![0, 0, 0x08, dims.len() as u8];
        for d in dims {
            bytes.extend(d.to_be_bytes());
        }
        bytes.extend_from_slice(data);
        bytes
    };
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    for i in 0..24u32 {
        let class = i % 3;
        labels.push(class as u8);
        for y in 0..8u32 {
            for x in 0..8u32 {
                let on = match class { 0 => (y + i) % 4 < 2, 1 => (x + i) % 4 < 2, _ => (x + y) % 4 < 2 };
                pixels.push(if on { 220 } else { 30 });
            }
        }
    }
    let images = dir.join("train-images-idx3-ubyte");
    std::fs::write(&images, idx(&[24, 8, 8], &pixels)).unwrap();
    std::fs::write(dir.join("train-labels-idx1-ubyte"), idx(&[24], &labels)).unwrap();
    images
}

#[test]
fn train_writes_a_pipeline_that_generate_loads_and_resumes() {
    fn as_str(args: &[String]) -> Vec<&str> {
        args.iter().map(String::as_str).collect()
    }
    let dir = scratch("train");
    let data = idx_dataset(&dir);
    let out = dir.join("run");
    let train_args = |steps: &str, extra: &[&str]| -> Vec<String> {
        let mut args: Vec<String> = [
            "train", "--data", data.to_str().unwrap(), "--output", out.to_str().unwrap(), "--model-config", "tiny",
            "--class-conditional", "--class-dropout", "0.1", "--steps", steps, "--batch-size", "4", "--warmup", "1",
            "--lr", "1e-3", "--checkpoint-every", "2", "--sample-every", "4", "--sample-steps", "2", "--sample-count", "2",
            "--random-flip", "--quiet",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    let (ok, stdout, stderr) = diffuse(&as_str(&train_args("4", &[])));
    assert!(ok, "{stderr}");
    assert!(stdout.contains("run"), "{stdout}");
    for file in ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json", "loss.csv", "loss.png", "samples/step-0000004.png", "checkpoints/latest"] {
        assert!(out.join(file).is_file(), "{file} missing");
    }
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("unet/config.json")).unwrap()).unwrap();
    assert_eq!((config["num_class_embeds"].as_u64(), config["sample_size"].as_u64(), config["in_channels"].as_u64()), (Some(4), Some(8), Some(1)));

    // diffuse generate loads the folder.
    let image = dir.join("sample.png");
    let (ok, _, stderr) = diffuse(&["generate", "--model", out.to_str().unwrap(), "--class-label", "2", "--steps", "3", "--seed", "1", "--quiet", "--output", image.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    assert_eq!(decode_png(&image).0.len(), 64);

    // Continued to 6 steps with --resume; without it the folder is refused.
    assert_fails_with(&as_str(&train_args("6", &[])), "--resume");
    let (ok, _, stderr) = diffuse(&as_str(&train_args("6", &["--resume"])));
    assert!(ok, "{stderr}");
    assert_eq!(std::fs::read_to_string(out.join("loss.csv")).unwrap().lines().count(), 7);
    // Another architecture cannot continue this run.
    let mut other = train_args("8", &["--resume"]);
    let position = other.iter().position(|a| a == "tiny").unwrap();
    other[position] = "small".into();
    assert_fails_with(&as_str(&other), "unet.block_out_channels: [32,64] in the checkpoint, [64,128,128] now");
}

#[test]
fn train_bad_input() {
    let dir = scratch("train-bad");
    let data = idx_dataset(&dir);
    let data = data.to_str().unwrap();
    let out = dir.join("out");
    let out = out.to_str().unwrap();
    let base = ["train", "--data", data, "--output", out, "--quiet"];
    let with = |extra: &[&'static str]| -> Vec<&str> { base.iter().copied().chain(extra.iter().copied()).collect() };
    assert_fails_with(&with(&["--lr", "0"]), "learning rate");
    assert_fails_with(&with(&["--lr", "NaN"]), "learning rate");
    assert_fails_with(&with(&["--steps", "0"]), "--steps");
    assert_fails_with(&with(&["--loss", "l1"]), "--loss l1");
    assert_fails_with(&with(&["--prediction-type", "x0"]), "prediction_type");
    assert_fails_with(&with(&["--model-config", "huge"]), "neither a preset");
    assert_fails_with(&with(&["--sample-scheduler", "nope"]), "--sample-scheduler");
    assert_fails_with(&with(&["--model-config", "tiny", "--resolution", "9"]), "multiple of 2");
    assert_fails_with(&with(&["--model-config", "tiny", "--resolution", "16"]), "use --image-fit pad or resize");
    assert_fails_with(&with(&["--class-dropout", "0.2"]), "--class-dropout");
    assert_fails_with(&with(&["--resume"]), "no checkpoint");
    let missing = dir.join("nothing-here");
    assert_fails_with(&["train", "--data", missing.to_str().unwrap(), "--output", out, "--quiet"], "no such file or folder");
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    assert_fails_with(&["train", "--data", empty.to_str().unwrap(), "--output", out, "--quiet"], "no images found");
    // Mixed sizes in a folder: refused naming the file.
    let folder = dir.join("mixed");
    std::fs::create_dir_all(&folder).unwrap();
    for (name, size) in [("a.png", 8u32), ("b.png", 6)] {
        let file = std::fs::File::create(folder.join(name)).unwrap();
        let mut encoder = png::Encoder::new(file, size, size);
        encoder.set_color(png::ColorType::Grayscale);
        encoder.write_header().unwrap().write_image_data(&vec![128u8; (size * size) as usize]).unwrap();
    }
    assert_fails_with(
        &["train", "--data", folder.to_str().unwrap(), "--output", out, "--model-config", "tiny", "--batch-size", "2", "--quiet"],
        "b.png: the image is 6×6, the model takes 8×8",
    );
}
