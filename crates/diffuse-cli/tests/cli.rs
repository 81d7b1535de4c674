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

fn psnr_against(pixels: &[u8], reference: &std::path::Path) -> f64 {
    let reference = candle_core::safetensors::load(reference, &candle_core::Device::Cpu).unwrap();
    let expected = reference["images"].flatten_all().unwrap().to_vec1::<u8>().unwrap();
    assert_eq!(pixels.len(), expected.len(), "image size");
    let mse = pixels.iter().zip(&expected).map(|(&a, &b)| (a as f64 - b as f64).powi(2)).sum::<f64>() / pixels.len() as f64;
    if mse == 0.0 { f64::INFINITY } else { 10.0 * (255f64.powi(2) / mse).log10() }
}

#[test]
fn image_to_image_and_inpainting_match_diffusers() {
    let dir = scratch("img2img");
    let inputs = fixtures().join("img2img/inputs");
    let cases = fixtures().join("img2img/cases");

    // img2img_default: the folder's PNDM, strength 0.75, guidance 7.5.
    let out = dir.join("i2i.png");
    let (ok, _, stderr) = diffuse(&[
        "generate", "--model", fixtures().join("sd/sd1").to_str().unwrap(), "--prompt", "a photo of a cat",
        "--init-image", inputs.join("init_64x64.png").to_str().unwrap(), "--strength", "0.75", "--steps", "8",
        "--seed", "0", "--output", out.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let (pixels, text) = decode_png(&out);
    let psnr = psnr_against(&pixels, &cases.join("img2img_default.safetensors"));
    assert!(psnr >= 40.0, "image-to-image PSNR {psnr}");
    let parameters = &text.iter().find(|(k, _)| k == "parameters").expect("parameters chunk").1;
    assert!(parameters.contains("Denoising strength: 0.75") && parameters.contains("Size: 64x64"), "{parameters}");

    // inpaint9_resized_image: a 71x53 image and a 40x24 mask, both resized to the model's
    // 64x64 as diffusers does; strength defaults to 1 with a mask.
    let out = dir.join("inpaint.png");
    let (ok, _, stderr) = diffuse(&[
        "generate", "--model", fixtures().join("sd/sd1_inpaint").to_str().unwrap(), "--prompt", "a photo of a cat",
        "--init-image", inputs.join("init_71x53.png").to_str().unwrap(), "--mask", inputs.join("mask_40x24.png").to_str().unwrap(),
        "--scheduler", "euler", "--steps", "8", "--seed", "24", "--output", out.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("the mask is 40x24 and the image 71x53"), "{stderr}");
    assert!(stderr.contains("inpainting at the model's 64x64"), "{stderr}");
    let (pixels, text) = decode_png(&out);
    let psnr = psnr_against(&pixels, &cases.join("inpaint9_resized_image.safetensors"));
    assert!(psnr >= 40.0, "inpainting PSNR {psnr}");
    assert!(text.iter().any(|(k, v)| k == "parameters" && v.contains("Denoising strength: 1")));

    // inpaint4_dpm_non_square: a 4-channel model, 80x48 given explicitly, guidance off.
    let out = dir.join("inpaint4.png");
    let (ok, _, stderr) = diffuse(&[
        "generate", "--model", fixtures().join("sd/sd1").to_str().unwrap(), "--prompt", "a photo of a cat",
        "--init-image", inputs.join("init_80x48.png").to_str().unwrap(), "--mask", inputs.join("mask_80x48.png").to_str().unwrap(),
        "--strength", "0.6", "--guidance-scale", "1", "--width", "80", "--height", "48", "--scheduler", "dpm++2m",
        "--steps", "8", "--seed", "13", "--quiet", "--output", out.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(stderr.is_empty(), "--quiet: {stderr}");
    let psnr = psnr_against(&decode_png(&out).0, &cases.join("inpaint4_dpm_non_square.safetensors"));
    assert!(psnr >= 40.0, "4-channel inpainting PSNR {psnr}");
}

#[test]
fn invert_then_generate_from_the_latents() {
    let dir = scratch("invert");
    let latents = dir.join("cat.safetensors");
    let sd1 = fixtures().join("sd/sd1");
    let image = fixtures().join("img2img/inputs/init_64x64.png");
    let (ok, stdout, stderr) = diffuse(&[
        "invert", "--model", sd1.to_str().unwrap(), "--image", image.to_str().unwrap(), "--prompt", "a photo of a cat",
        "--steps", "25", "--seed", "30", "--output", latents.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("cat.safetensors"));
    assert!(stderr.contains("--latents") && stderr.contains("--scheduler ddim"), "regeneration hint: {stderr}");
    // The latents are diffusers' (invert_sd1), and the metadata says how they were made.
    let written = candle_core::safetensors::load(&latents, &candle_core::Device::Cpu).unwrap();
    let reference = candle_core::safetensors::load(fixtures().join("img2img/cases/invert_sd1.safetensors"), &candle_core::Device::Cpu).unwrap();
    let (a, b) = (written["latents"].flatten_all().unwrap().to_vec1::<f32>().unwrap(), reference["latents"].flatten_all().unwrap().to_vec1::<f32>().unwrap());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max) / scale;
    assert!(err < 1e-3, "inverted latents differ from diffusers' by {err:e}");
    let bytes = std::fs::read(&latents).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let metadata = &header["__metadata__"];
    assert_eq!(metadata["prompt"], "a photo of a cat");
    assert_eq!(metadata["steps"], "25");
    assert_eq!(metadata["model"], sd1.to_str().unwrap());
    assert_eq!(metadata["guidance_scale"], "1");

    // Regenerate without --prompt (taken from the file), as the inversion ran: no warning.
    let out = dir.join("regen.png");
    let (ok, _, stderr) = diffuse(&[
        "generate", "--model", sd1.to_str().unwrap(), "--latents", latents.to_str().unwrap(), "--scheduler", "ddim",
        "--steps", "25", "--guidance-scale", "1", "--output", out.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(!stderr.contains("warning"), "{stderr}");
    let (pixels, text) = decode_png(&out);
    let psnr = psnr_against(&pixels, &fixtures().join("img2img/cases/invert_sd1.safetensors"));
    assert!(psnr >= 40.0, "regenerated image PSNR {psnr}");
    assert!(text.iter().any(|(k, v)| k == "parameters" && v.starts_with("a photo of a cat\n")), "{text:?}");

    // A run that differs from the inversion says it will not reconstruct the image.
    let (ok, _, stderr) = diffuse(&[
        "generate", "--model", sd1.to_str().unwrap(), "--latents", latents.to_str().unwrap(), "--steps", "10",
        "--output", out.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("differs from the inversion") && stderr.contains("10 steps, inverted with 25"), "{stderr}");
}

#[test]
fn image_flags_bad_input() {
    let dir = scratch("img2img-bad");
    let out = dir.join("out.png");
    let out_s = out.to_str().unwrap();
    let sd1 = fixtures().join("sd/sd1");
    let sd1_s = sd1.to_str().unwrap();
    let init = fixtures().join("img2img/inputs/init_64x64.png");
    let init_s = init.to_str().unwrap();
    let mask = fixtures().join("img2img/inputs/mask_64x64.png");
    let mask_s = mask.to_str().unwrap();
    let not_an_image = dir.join("notes.png");
    std::fs::write(&not_an_image, "not a picture").unwrap();
    let bad_s = not_an_image.to_str().unwrap();
    let run = |extra: &[&str], needle: &str| {
        let mut args = vec!["generate", "--model", sd1_s, "--prompt", "a cat", "--steps", "8", "--output", out_s];
        args.extend_from_slice(extra);
        assert_fails_with(&args, needle);
    };
    run(&["--init-image", bad_s], "notes.png: cannot decode the image");
    run(&["--init-image", dir.join("missing.png").to_str().unwrap()], "missing.png");
    run(&["--init-image", init_s, "--mask", bad_s], "notes.png: cannot decode the image");
    run(&["--mask", mask_s], "--mask needs --init-image");
    run(&["--strength", "0.5"], "--strength needs --init-image");
    run(&["--init-image", init_s, "--strength", "1.5"], "--strength must be in [0, 1], got 1.5");
    run(&["--init-image", init_s, "--strength=-0.2"], "--strength must be in [0, 1]");
    run(&["--init-image", init_s, "--strength", "0.1"], "--strength 0.1 with 8 steps runs no denoising step");
    run(&["--init-image", init_s, "--mask", mask_s, "--strength", "0.05"], "runs no denoising step");
    run(&["--init-image", init_s, "--width", "60"], "multiples of 8");
    run(&["--init-image", init_s, "--latents", bad_s], "two different starting points");
    run(&["--latents", bad_s], "not a latents file");
    let inpainting = fixtures().join("sd/sd1_inpaint");
    assert_fails_with(
        &["generate", "--model", inpainting.to_str().unwrap(), "--init-image", init_s, "--steps", "8", "--output", out_s],
        "needs a mask",
    );
    let pixel = fixtures().join("pixel/uncond");
    assert_fails_with(&["generate", "--model", pixel.to_str().unwrap(), "--init-image", init_s, "--output", out_s], "Stable Diffusion folder");

    // Latents for another size than --width/--height.
    let latents = dir.join("lat.safetensors");
    let (ok, _, stderr) = diffuse(&[
        "invert", "--model", sd1_s, "--image", init_s, "--steps", "4", "--quiet", "--output", latents.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    run(&["--latents", latents.to_str().unwrap(), "--width", "128"], "latents for 64x64 images");
    run(&["--latents", latents.to_str().unwrap(), "--num-images", "2"], "--num-images must be 1");
    assert!(!out.exists(), "no output may be written on failure");

    // invert's own checks.
    let lat_out = dir.join("x.safetensors");
    let lat_s = lat_out.to_str().unwrap();
    assert_fails_with(&["invert", "--model", sd1_s, "--image", bad_s, "--output", lat_s], "notes.png: cannot decode the image");
    assert_fails_with(&["invert", "--model", sd1_s, "--image", init_s, "--output", dir.join("x.png").to_str().unwrap()], ".safetensors");
    assert_fails_with(&["invert", "--model", sd1_s, "--image", init_s, "--output", dir.join("no/x.safetensors").to_str().unwrap()], "does not exist");
    assert_fails_with(&["invert", "--model", sd1_s, "--image", init_s, "--steps", "0", "--output", lat_s], "--steps");
    assert_fails_with(&["invert", "--model", pixel.to_str().unwrap(), "--image", init_s, "--output", lat_s], "not a Stable Diffusion folder");
    assert!(!lat_out.exists());
    let leftovers: Vec<_> = std::fs::read_dir(&dir).unwrap().filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().contains(".tmp")).collect();
    assert!(leftovers.is_empty());
}
