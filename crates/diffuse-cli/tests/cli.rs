//! The `diffuse` command as users run it: parity of a written PNG with diffusers, and clear
//! one-line errors (non-zero exit, no panic, no partial output) for bad input.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../diffuse/tests/fixtures")
}

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("diffuse-cli-test-{name}"));
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
    // Model hashes are cached under the test's temporary folder, not the user's cache.
    // (Per process: a fresh hash cache for each run of the tests.)
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("diffuse-cli-test-cache-{}", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_diffuse")).args(args).env("DIFFUSE_CACHE_DIR", cache).output().unwrap();
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

/// `--threads` takes a whole number of at least 1, on every subcommand.
#[test]
fn threads_must_be_a_positive_number() {
    for bad in ["0", "two", "-1"] {
        let (ok, _, stderr) = diffuse(&["schedulers", &format!("--threads={bad}")]);
        assert!(!ok && !stderr.contains("panicked") && stderr.contains("threads"), "--threads {bad}: {stderr}");
    }
    assert_fails_with(&["schedulers", "--threads", "100000"], "between 1 and 4096");
    let (ok, stdout, _) = diffuse(&["--threads", "1", "schedulers"]);
    assert!(ok && stdout.contains("ddim"));
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
    for name in ["ddpm", "ddim", "pndm", "lms", "euler", "euler-ancestral", "heun", "dpm++2m", "dpm++2m-karras", "dpm++2m-sde", "unipc", "lcm", "tcd"] {
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

/// `--dtype bf16` (and f16, kept as the faster of bf16 and f32) runs on the CPU, close to the
/// f32 image, and says so in the PNG.
#[test]
fn bf16_runs_on_the_cpu() {
    let dir = scratch("sd-bf16");
    let model = fixtures().join("sd/sd1");
    let run = |dtype: &str| {
        let out = dir.join(format!("{dtype}.png"));
        let (ok, _, stderr) = diffuse(&[
            "generate", "--model", model.to_str().unwrap(), "--prompt", "a photo of a cat", "--steps", "4", "--seed", "3",
            "--dtype", dtype, "--output", out.to_str().unwrap(),
        ]);
        assert!(ok, "--dtype {dtype}: {stderr}");
        decode_png(&out)
    };
    let (f32_pixels, _) = run("f32");
    let (bf16_pixels, text) = run("bf16");
    let (f16_pixels, _) = run("f16");
    // f16 is computed as the faster of bf16 and f32 on this CPU.
    let f16_as = diffuse::ops::weight_dtype(candle_core::DType::F16, &candle_core::Device::Cpu);
    let expected = if f16_as == candle_core::DType::BF16 { &bf16_pixels } else { &f32_pixels };
    assert_eq!(&f16_pixels, expected, "f16 is computed as {f16_as:?} on this CPU");
    let mse = f32_pixels.iter().zip(&bf16_pixels).map(|(&a, &b)| (a as f64 - b as f64).powi(2)).sum::<f64>() / f32_pixels.len() as f64;
    assert!(mse > 0.0 && 10.0 * (255f64.powi(2) / mse).log10() > 40.0, "bf16 against f32: MSE {mse}");
    let parameters = &text.iter().find(|(k, _)| k == "parameters").expect("parameters chunk").1;
    assert!(parameters.contains("Dtype: bf16"), "{parameters}");
}

/// `--device` on every subcommand: `cpu` gives the same image as no flag; a GPU this build
/// has no backend for, an unknown name or a bad number is one clear line.
#[test]
fn device_is_chosen_by_name() {
    let dir = scratch("device");
    let model = fixtures().join("sd/sd1");
    let run = |extra: &[&str], name: &str| {
        let out = dir.join(name);
        let mut args = vec!["generate", "--model", model.to_str().unwrap(), "--prompt", "a cat", "--steps", "2", "--seed", "1", "--output"];
        args.push(out.to_str().unwrap());
        args.extend_from_slice(extra);
        let (ok, _, stderr) = diffuse(&args);
        assert!(ok, "{extra:?}: {stderr}");
        decode_png(&out).0
    };
    assert_eq!(run(&[], "default.png"), run(&["--device", "cpu"], "cpu.png"));
    let out = dir.join("x.png");
    let out = out.to_str().unwrap();
    if !cfg!(feature = "cuda") {
        assert_fails_with(&["--device", "cuda:0", "generate", "--prompt", "x", "--output", out], "no CUDA support (build it with `--features cuda`)");
    }
    assert_fails_with(&["generate", "--device", "tpu", "--prompt", "x", "--output", out], "device `tpu` is not one of cpu, cuda");
    assert_fails_with(&["schedulers", "--device", "cuda:x"], "`x` is not a device number");
    assert_fails_with(&["bench", "--device", "metal:1"], "device `metal:1`");
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
    // --from with the init image given again makes the same image (strength from the PNG).
    let again = dir.join("again.png");
    let (ok, _, stderr) = diffuse(&[
        "generate", "--from", out.to_str().unwrap(), "--model", fixtures().join("sd/sd1").to_str().unwrap(),
        "--init-image", inputs.join("init_64x64.png").to_str().unwrap(), "--quiet", "--output", again.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert_eq!(decode_png(&again).0, pixels, "--from --init-image makes the same image");

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
    assert_eq!(stderr.matches("the mask is 40x24").count(), 1, "each warning once: {stderr}");
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

/// `--vae` replaces the pipeline's VAE (vae_taesd_lcm_4_no_guidance and vae_taesd_img2img of
/// tools/fixtures/vae_taesd_tiling.py), and refuses what is not an autoencoder for this UNet.
#[test]
fn vae_flag_replaces_the_vae() {
    let dir = scratch("vae");
    let sd1 = fixtures().join("sd/sd1");
    let taesd = fixtures().join("vae/taesd");
    let out = dir.join("lcm.png");
    let (ok, stdout, stderr) = diffuse(&[
        "generate", "--model", sd1.to_str().unwrap(), "--vae", taesd.to_str().unwrap(), "--prompt", "a photo of a cat",
        "--scheduler", "lcm", "--steps", "4", "--guidance-scale", "1", "--num-images", "2", "--seed", "32", "--quiet",
        "--output", out.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert_eq!(stdout.lines().count(), 2, "{stdout}");
    let (first, text) = decode_png(&dir.join("lcm-0.png"));
    let second = decode_png(&dir.join("lcm-1.png")).0;
    let psnr = psnr_against(&[first, second].concat(), &fixtures().join("sd/cases/vae_taesd_lcm_4_no_guidance.safetensors"));
    assert!(psnr >= 40.0, "PSNR {psnr}");
    assert!(text.iter().any(|(k, v)| k == "parameters" && v.contains("VAE: taesd")), "{text:?}");

    let out = dir.join("i2i.png");
    let (ok, _, stderr) = diffuse(&[
        "generate", "--model", sd1.to_str().unwrap(), "--vae", taesd.to_str().unwrap(), "--prompt", "a photo of a cat",
        "--init-image", fixtures().join("img2img/inputs/init_64x64.png").to_str().unwrap(), "--strength", "0.75",
        "--scheduler", "ddim", "--steps", "8", "--seed", "33", "--quiet", "--output", out.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let psnr = psnr_against(&decode_png(&out).0, &fixtures().join("img2img/cases/vae_taesd_img2img.safetensors"));
    assert!(psnr >= 40.0, "image-to-image PSNR {psnr}");

    let bad = dir.join("bad.png");
    let run = |vae: &Path, needle: &str| {
        assert_fails_with(
            &["generate", "--model", sd1.to_str().unwrap(), "--vae", vae.to_str().unwrap(), "--prompt", "x", "--steps", "1",
              "--output", bad.to_str().unwrap()],
            needle,
        );
    };
    run(&sd1.join("unet"), "not an autoencoder this pipeline can use: the config names `UNet2DConditionModel`");
    run(&sd1, "(a pipeline folder: its VAE is in vae/)");
    run(&dir.join("missing"), "not an autoencoder folder");
    // Latent channels that are not the UNet's: both named.
    let wide = dir.join("wide-vae");
    copy_dir(&sd1.join("vae"), &wide);
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(wide.join("config.json")).unwrap()).unwrap();
    config["latent_channels"] = serde_json::json!(2);
    config["use_quant_conv"] = serde_json::json!(false);
    config["use_post_quant_conv"] = serde_json::json!(false);
    std::fs::write(wide.join("config.json"), config.to_string()).unwrap();
    let weights = candle_core::safetensors::load(wide.join("diffusion_pytorch_model.safetensors"), &candle_core::Device::Cpu).unwrap();
    let mut weights: std::collections::HashMap<String, candle_core::Tensor> = weights;
    let zeros = |shape: &[usize]| candle_core::Tensor::zeros(shape, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
    weights.insert("encoder.conv_out.weight".into(), zeros(&[4, 16, 3, 3]));
    weights.insert("encoder.conv_out.bias".into(), zeros(&[4]));
    weights.insert("decoder.conv_in.weight".into(), zeros(&[16, 2, 3, 3]));
    candle_core::safetensors::save(&weights, wide.join("diffusion_pytorch_model.safetensors")).unwrap();
    run(&wide, "has 2 latent channels, but the UNet of");
    let (_, _, stderr) = diffuse(&["generate", "--model", sd1.to_str().unwrap(), "--vae", wide.to_str().unwrap(), "--prompt", "x",
        "--steps", "1", "--output", bad.to_str().unwrap()]);
    assert!(stderr.contains("wide-vae") && stderr.contains("takes 4 input channels"), "{stderr}");
    assert!(!bad.exists());
    let pixel = fixtures().join("pixel/uncond");
    assert_fails_with(
        &["generate", "--model", pixel.to_str().unwrap(), "--vae", taesd.to_str().unwrap(), "--output", bad.to_str().unwrap()],
        "--vae-slicing need a Stable Diffusion model",
    );
}

/// `--vae-tiling` (vae_tiling_t2i_96: sd1's VAE tiles above 64 pixels), recorded in the PNG so
/// that `--from` tiles again; `--vae-slicing` (vae_slicing_batch).
#[test]
fn vae_tiling_and_slicing_flags() {
    let dir = scratch("vae-tiling");
    let sd1 = fixtures().join("sd/sd1");
    let out = dir.join("tiled.png");
    let (ok, _, stderr) = diffuse(&[
        "generate", "--model", sd1.to_str().unwrap(), "--vae-tiling", "--prompt", "a photo of a cat", "--scheduler", "euler",
        "--steps", "8", "--width", "96", "--height", "96", "--seed", "41", "--quiet", "--output", out.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let (pixels, text) = decode_png(&out);
    let psnr = psnr_against(&pixels, &fixtures().join("sd/cases/vae_tiling_t2i_96.safetensors"));
    assert!(psnr >= 40.0, "PSNR {psnr}");
    assert!(text.iter().any(|(k, v)| k == "parameters" && v.contains("VAE tiling: true")), "{text:?}");
    let again = dir.join("again.png");
    let (ok, _, stderr) =
        diffuse(&["generate", "--from", out.to_str().unwrap(), "--model", sd1.to_str().unwrap(), "--output", again.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    assert!(!stderr.contains("ignored"), "{stderr}");
    assert_eq!(decode_png(&again).0, pixels, "--from tiles again");

    let out = dir.join("sliced.png");
    let (ok, _, stderr) = diffuse(&[
        "generate", "--model", sd1.to_str().unwrap(), "--vae-slicing", "--prompt", "a photo of a cat", "--scheduler",
        "euler-ancestral", "--steps", "8", "--num-images", "2", "--seed", "43", "--quiet", "--output", out.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let pixels = [decode_png(&dir.join("sliced-0.png")).0, decode_png(&dir.join("sliced-1.png")).0].concat();
    let psnr = psnr_against(&pixels, &fixtures().join("sd/cases/vae_slicing_batch.safetensors"));
    assert!(psnr >= 40.0, "PSNR {psnr}");
}

/// A LatentConsistencyModelPipeline folder (tools/fixtures/lcm_unet.py) runs with that
/// pipeline's defaults (4 steps, guidance 8.5: lcm_unet_4_steps); a negative prompt is ignored
/// with a warning.
#[test]
fn lcm_pipeline_folders_run_with_their_defaults() {
    let dir = scratch("lcm-unet");
    let lcm = fixtures().join("sd/lcm");
    let out = dir.join("lcm.png");
    let (ok, _, stderr) = diffuse(&[
        "generate", "--model", lcm.to_str().unwrap(), "--prompt", "a photo of a cat", "--negative-prompt", "blurry", "--seed",
        "51", "--output", out.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("negative prompt is ignored"), "{stderr}");
    let (pixels, text) = decode_png(&out);
    let psnr = psnr_against(&pixels, &fixtures().join("sd/cases/lcm_unet_4_steps.safetensors"));
    assert!(psnr >= 40.0, "PSNR {psnr}");
    let parameters = &text.iter().find(|(k, _)| k == "parameters").expect("parameters chunk").1;
    assert!(parameters.contains("Steps: 4") && parameters.contains("CFG scale: 8.5"), "{parameters}");
    // Given flags win.
    let (ok, _, stderr) = diffuse(&[
        "generate", "--model", lcm.to_str().unwrap(), "--prompt", "a photo of a cat", "--steps", "2", "--guidance-scale", "1",
        "--num-images", "2", "--seed", "52", "--quiet", "--output", out.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let pixels = [decode_png(&dir.join("lcm-0.png")).0, decode_png(&dir.join("lcm-1.png")).0].concat();
    let psnr = psnr_against(&pixels, &fixtures().join("sd/cases/lcm_unet_guidance_1_batch.safetensors"));
    assert!(psnr >= 40.0, "PSNR {psnr}");
}

/// `--preview` rewrites a PNG after every step (the batch side by side, decoded by
/// `--preview-vae`), never leaving a temporary file; into a missing folder it is refused as
/// `--output` is.
#[test]
fn preview_is_written_each_step() {
    let dir = scratch("preview");
    let sd1 = fixtures().join("sd/sd1");
    let taesd = fixtures().join("vae/taesd");
    let out = dir.join("out.png");
    let preview = dir.join("preview.png");
    let (ok, _, stderr) = diffuse(&[
        "generate", "--model", sd1.to_str().unwrap(), "--prompt", "a photo of a cat", "--scheduler", "ddim", "--steps", "3", "--num-images", "2",
        "--seed", "1", "--preview", preview.to_str().unwrap(), "--preview-vae", taesd.to_str().unwrap(), "--quiet",
        "--output", out.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&preview).unwrap()));
    let reader = decoder.read_info().unwrap();
    assert_eq!((reader.info().width, reader.info().height), (128, 64));
    let (_, text) = decode_png(&preview);
    assert!(text.iter().any(|(k, v)| k == "preview step" && v == "3"), "{text:?}");
    let leftovers: Vec<_> =
        std::fs::read_dir(&dir).unwrap().filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().contains(".tmp")).collect();
    assert!(leftovers.is_empty());

    let missing = dir.join("no-such-folder/preview.png");
    let bad_out = dir.join("bad.png");
    assert_fails_with(
        &["generate", "--model", sd1.to_str().unwrap(), "--prompt", "x", "--steps", "1", "--preview", missing.to_str().unwrap(),
          "--output", bad_out.to_str().unwrap()],
        &format!("--preview {}: the folder {} does not exist", missing.display(), dir.join("no-such-folder").display()),
    );
    assert_fails_with(
        &["generate", "--model", sd1.to_str().unwrap(), "--prompt", "x", "--steps", "1", "--preview", dir.join("p.jpg").to_str().unwrap(),
          "--output", bad_out.to_str().unwrap()],
        "must end in .png",
    );
    assert_fails_with(
        &["generate", "--model", sd1.to_str().unwrap(), "--prompt", "x", "--steps", "1", "--preview", preview.to_str().unwrap(),
          "--preview-vae", sd1.join("unet").to_str().unwrap(), "--output", bad_out.to_str().unwrap()],
        "--preview-vae",
    );
    assert!(!bad_out.exists());
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
    run(&["--init-image", init_s, "--strength", "0.1"], "strength 0.1 with 8 steps runs no denoising step");
    run(&["--init-image", init_s, "--mask", mask_s, "--strength", "0.05"], "runs no denoising step");
    run(&["--init-image", init_s, "--width", "60"], "multiples of 8");
    run(&["--init-image", init_s, "--latents", bad_s], "two different starting points");
    run(&["--latents", bad_s], "not a latents file");
    let inpainting = fixtures().join("sd/sd1_inpaint");
    assert_fails_with(
        &["generate", "--model", inpainting.to_str().unwrap(), "--init-image", init_s, "--steps", "8", "--output", out_s],
        "needs a mask",
    );
    assert_fails_with(
        &["generate", "--model", inpainting.to_str().unwrap(), "--prompt", "x", "--steps", "8", "--output", out_s],
        "an inpainting model): give an init image and a mask",
    );
    let pixel = fixtures().join("pixel/uncond");
    assert_fails_with(&["generate", "--model", pixel.to_str().unwrap(), "--init-image", init_s, "--output", out_s], "need a Stable Diffusion model");

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
    assert_fails_with(&["invert", "--model", pixel.to_str().unwrap(), "--image", init_s, "--output", lat_s], "not a Stable Diffusion model");
    assert!(!lat_out.exists());
    let leftovers: Vec<_> = std::fs::read_dir(&dir).unwrap().filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().contains(".tmp")).collect();
    assert!(leftovers.is_empty());
}

/// `diffuse info FILE` (raw infotext).
fn info(path: &Path) -> String {
    let (ok, stdout, stderr) = diffuse(&["info", path.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    stdout.trim_end_matches('\n').to_string()
}

#[test]
fn from_png_makes_the_same_stable_diffusion_image() {
    let dir = scratch("from-sd");
    let model = fixtures().join("sd/sd1");
    let model_s = model.to_str().unwrap();
    let first = dir.join("first.png");
    let (ok, _, stderr) = diffuse(&[
        "generate", "--model", model_s, "--prompt", "a cat on a sofa, (soft light:1.2)\n猫 🐱", "--negative-prompt",
        "blurry: low quality", "--scheduler", "dpm++2m-karras", "--scheduler-config", "timestep_spacing=trailing",
        "--steps", "5", "--seed", "21", "--guidance-scale", "6.5", "--guidance-rescale", "0.3", "--clip-skip", "1",
        "--width", "72", "--height", "56", "--num-images", "2", "--quiet", "--output", first.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let second_of_batch = dir.join("first-1.png");
    let text = info(&second_of_batch);
    assert!(text.starts_with("a cat on a sofa, (soft light:1.2)\n猫 🐱\nNegative prompt: blurry: low quality\nSteps: 5, "), "{text}");
    for part in [
        "Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 21, Size: 72x56, Model hash: 7413faf943, Model: sd1,",
        "Batch size: 2, Batch pos: 1, Clip skip: 2, Guidance rescale: 0.3, Diffuse scheduler: dpm++2m-karras,",
        r#"Diffuse scheduler config: "{\"timestep_spacing\":\"trailing\"}", Version: diffuse "#,
    ] {
        assert!(text.contains(part), "{part} missing from {text}");
    }
    let (ok, json, stderr) = diffuse(&["info", "--json", second_of_batch.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(json["prompt"], "a cat on a sofa, (soft light:1.2)\n猫 🐱");
    assert_eq!(json["clip_skip"], 1);
    assert_eq!(json["scheduler_config"]["timestep_spacing"], "trailing");

    // The second image of the batch, made again from its PNG alone: the same file, byte for
    // byte (pixels and metadata), and only that one image written.
    let again = dir.join("again.png");
    let (ok, stdout, stderr) = diffuse(&["generate", "--from", second_of_batch.to_str().unwrap(), "--model", model_s, "--quiet", "--output", again.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    assert_eq!(stdout.trim(), again.to_str().unwrap());
    assert!(std::fs::read(&second_of_batch).unwrap() == std::fs::read(&again).unwrap(), "--from must make the same image");
    assert!(!dir.join("again-0.png").exists());
    let (from_batch, _) = decode_png(&again);
    let (first_of_batch, _) = decode_png(&dir.join("first-0.png"));
    assert_ne!(from_batch, first_of_batch, "the batch's images differ, so the right one was kept");

    // Flags given win over the PNG's.
    let changed = dir.join("changed.png");
    let (ok, _, stderr) = diffuse(&[
        "generate", "--from", second_of_batch.to_str().unwrap(), "--model", model_s, "--steps", "3", "--num-images", "1",
        "--scheduler", "euler", "--quiet", "--output", changed.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let text = info(&changed);
    assert!(text.contains("Steps: 3, Sampler: Euler,") && text.contains("Seed: 21") && text.contains("Diffuse scheduler: euler,"), "{text}");
    assert!(!text.contains("Batch"), "{text}");
    assert_ne!(decode_png(&changed).0, from_batch);

    // Another model than the image's: made, with a warning naming both hashes.
    let other = dir.join("other.png");
    let (ok, _, stderr) = diffuse(&[
        "generate", "--from", second_of_batch.to_str().unwrap(), "--model", fixtures().join("sd/sd2").to_str().unwrap(),
        "--num-images", "1", "--output", other.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("made with model hash 7413faf943, this model's is "), "{stderr}");
}

#[test]
fn from_png_makes_the_same_pixel_space_image() {
    let dir = scratch("from-pixel");
    let model = fixtures().join("pixel/classcond");
    let first = dir.join("first.png");
    let (ok, _, stderr) = diffuse(&[
        "generate", "--model", model.to_str().unwrap(), "--class-label", "2", "--scheduler", "ddim", "--eta", "0.5",
        "--steps", "6", "--quiet", "--output", first.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let text = info(&first);
    assert!(text.starts_with("Steps: 6, Sampler: DDIM, Schedule type: Automatic, Seed: "), "{text}");
    assert!(text.contains("Model: classcond, Eta DDIM: 0.5, Class label: 2, Diffuse scheduler: ddim,") && !text.contains("CFG"), "{text}");
    let again = dir.join("again.png");
    let (ok, _, stderr) = diffuse(&["generate", "--from", first.to_str().unwrap(), "--model", model.to_str().unwrap(), "--quiet", "--output", again.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    assert!(std::fs::read(&first).unwrap() == std::fs::read(&again).unwrap(), "--from must make the same image");
}

#[test]
fn from_png_reads_automatic1111_images() {
    // A PNG as A1111 writes it for a UTF-8 prompt (an iTXt chunk, by Pillow): its sampler maps
    // to a diffuse scheduler, its LoRA hashes are named as ignored.
    let dir = scratch("from-a1111");
    let out = dir.join("out.png");
    let a1111 = fixtures().join("metadata/a1111_utf8.png");
    let (ok, _, stderr) = diffuse(&[
        "generate", "--from", a1111.to_str().unwrap(), "--model", fixtures().join("sd/sd1").to_str().unwrap(), "--width", "64",
        "--height", "64", "--steps", "2", "--output", out.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("ignored: Lora hashes"), "{stderr}");
    let text = info(&out);
    assert!(text.starts_with("一只猫坐在窗台上, 🐱 kawaii, café\nNegative prompt: 模糊, low quality\nSteps: 2, Sampler: Euler a,"), "{text}");
    assert!(text.contains("CFG scale: 7, Seed: 1, Size: 64x64") && text.contains("Diffuse scheduler: euler-ancestral"), "{text}");
    // An A1111 prompt is read as A1111 reads it.
    assert!(text.contains("Prompt syntax: a1111"), "{text}");
}

#[test]
fn metadata_bad_input_gives_clear_errors() {
    let dir = scratch("metadata-bad");
    let out = dir.join("out.png");
    let out_s = out.to_str().unwrap();
    let sd = fixtures().join("sd/sd1");
    let sd_s = sd.to_str().unwrap();
    let bare = fixtures().join("metadata/no_parameters.png");
    let bare_s = bare.to_str().unwrap();
    assert_fails_with(&["info", bare_s], "no generation parameters");
    assert_fails_with(&["generate", "--from", bare_s, "--model", sd_s, "--output", out_s], "no generation parameters");
    let not_png = dir.join("not.png");
    std::fs::write(&not_png, "hello").unwrap();
    assert_fails_with(&["info", not_png.to_str().unwrap()], "not a readable PNG");
    assert_fails_with(&["generate", "--from", not_png.to_str().unwrap(), "--model", sd_s, "--output", out_s], "not a readable PNG");
    assert_fails_with(&["generate", "--from", dir.join("missing.png").to_str().unwrap(), "--model", sd_s, "--output", out_s], "missing.png");

    // Images whose parameters diffuse cannot follow.
    let with_text = |name: &str, text: &str| {
        let path = dir.join(name);
        diffuse::pipelines::write_png(&path, 8, 8, 3, &[0; 8 * 8 * 3], &[("parameters", text.to_string())]).unwrap();
        path
    };
    let local = with_text("local.png", "a cat\nSteps: 2, Sampler: Euler, Seed: 1, Size: 64x64, Model: sd1");
    assert_fails_with(&["generate", "--from", local.to_str().unwrap(), "--output", out_s], "give its folder or file with --model");
    let sampler = with_text("sampler.png", "a cat\nSteps: 2, Sampler: DPM++ SDE Karras, Seed: 1, Size: 64x64");
    assert_fails_with(&["generate", "--from", sampler.to_str().unwrap(), "--model", sd_s, "--output", out_s], "`DPM++ SDE Karras` has no diffuse equivalent");
    let img2img = with_text("img2img.png", "a cat\nSteps: 2, Sampler: Euler, Seed: 1, Size: 64x64, Denoising strength: 0.5");
    assert_fails_with(&["generate", "--from", img2img.to_str().unwrap(), "--model", sd_s, "--output", out_s], "give it again with --init-image");
    let typo = with_text("typo.png", "a cat\nSteps: two, Sampler: Euler, Seed: 1, Size: 64x64");
    assert_fails_with(&["generate", "--from", typo.to_str().unwrap(), "--model", sd_s, "--output", out_s], "Steps: two");
    assert_fails_with(&["info", "--json", typo.to_str().unwrap()], "Steps: two");
    let (ok, stdout, _) = diffuse(&["info", typo.to_str().unwrap()]);
    assert!(ok && stdout.contains("Steps: two"), "the raw text is shown whatever it holds");
    assert!(!out.exists());
}

#[test]
fn repo_id_resolves_in_the_hugging_face_cache_offline() {
    let dir = scratch("hub");
    let out = dir.join("hub.png");
    // A cache as huggingface_hub lays it out: refs/main names a snapshot folder.
    let cache = dir.join("cache");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let repo = cache.join("models--diffuse-test--tiny-pipeline");
    copy_dir(&fixtures().join("pixel/uncond"), &repo.join("snapshots").join(commit));
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    let run = |model: &str| {
        Command::new(env!("CARGO_BIN_EXE_diffuse"))
            .args(["generate", "--model", model, "--steps", "2", "--seed", "1", "--quiet", "--output", out.to_str().unwrap()])
            .env("HF_HUB_CACHE", &cache)
            .env("HF_HUB_OFFLINE", "1")
            .env("DIFFUSE_CACHE_DIR", dir.join("diffuse-cache"))
            .output()
            .unwrap()
    };
    let ok = run("diffuse-test/tiny-pipeline");
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert!(out.is_file());
    std::fs::remove_file(&out).unwrap();
    let missing = run("diffuse-test/not-downloaded");
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(!missing.status.success() && !stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains(cache.to_str().unwrap()) && stderr.contains("HF_HUB_OFFLINE"), "should say where it looked: {stderr}");
    assert!(!out.exists());
}

/// `--vae ORG/NAME` (and `--preview-vae`) finds an autoencoder repo in the Hugging Face cache;
/// one that is not there is an error saying where it looked and how to get it.
#[test]
fn vae_repo_id_resolves_in_the_hugging_face_cache() {
    let dir = scratch("hub-vae");
    let out = dir.join("taesd.png");
    let cache = dir.join("cache");
    let commit = "89abcdef0123456789abcdef0123456789abcdef";
    let repo = cache.join("models--diffuse-test--taesd");
    copy_dir(&fixtures().join("vae/taesd"), &repo.join("snapshots").join(commit));
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    let sd1 = fixtures().join("sd/sd1");
    let run = |vae: &str| {
        Command::new(env!("CARGO_BIN_EXE_diffuse"))
            .args([
                "generate", "--model", sd1.to_str().unwrap(), "--vae", vae, "--prompt", "a photo of a cat", "--scheduler", "lcm",
                "--steps", "4", "--guidance-scale", "1", "--num-images", "2", "--seed", "32", "--quiet", "--output",
                out.to_str().unwrap(),
            ])
            .env("HF_HUB_CACHE", &cache)
            .env("HF_HUB_OFFLINE", "1")
            .env("DIFFUSE_CACHE_DIR", dir.join("diffuse-cache"))
            .output()
            .unwrap()
    };
    let ok = run("diffuse-test/taesd");
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let pixels = [decode_png(&dir.join("taesd-0.png")).0, decode_png(&dir.join("taesd-1.png")).0].concat();
    let psnr = psnr_against(&pixels, &fixtures().join("sd/cases/vae_taesd_lcm_4_no_guidance.safetensors"));
    assert!(psnr >= 40.0, "PSNR {psnr}");
    let missing = run("diffuse-test/not-downloaded");
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(!missing.status.success() && !stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains("not in the Hugging Face cache") && stderr.contains(cache.to_str().unwrap()), "{stderr}");
}

/// A single-file checkpoint (converted from a diffusers folder by tools/fixtures/
/// single_file_pipeline.py) gives the folder's PNG and diffusers' image.
#[test]
fn single_file_checkpoint_gives_the_folders_image() {
    let dir = scratch("single-file");
    let folder = fixtures().join("single_file/sd1_pipeline");
    let file = folder.join("model.safetensors");
    let generate = |model: &Path, name: &str, extra: &[&str]| -> PathBuf {
        let out = dir.join(name);
        let mut args = vec![
            "generate", "--model", model.to_str().unwrap(), "--prompt", "a photo of a cat", "--steps", "8", "--seed", "0",
            "--width", "64", "--height", "64", "--quiet", "--output", out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let (ok, _, stderr) = diffuse(&args);
        assert!(ok, "{stderr}");
        out
    };
    let (from_file, _) = decode_png(&generate(&file, "file.png", &[]));
    let (from_folder, _) = decode_png(&generate(&folder, "folder.png", &[]));
    assert!(from_file == from_folder, "the single file's image differs from the folder's");
    let reference = candle_core::safetensors::load(fixtures().join("single_file/cases/sd1_single_file_default.safetensors"), &candle_core::Device::Cpu).unwrap();
    let expected = reference["images"].flatten_all().unwrap().to_vec1::<u8>().unwrap();
    let mse = from_file.iter().zip(&expected).map(|(&a, &b)| (a as f64 - b as f64).powi(2)).sum::<f64>() / expected.len() as f64;
    let psnr = if mse == 0.0 { f64::INFINITY } else { 10.0 * (255f64.powi(2) / mse).log10() };
    assert!(psnr >= 40.0, "PSNR {psnr}");

    // --prediction-type reaches the scheduler for both: v-prediction changes the image.
    let (file_v, _) = decode_png(&generate(&file, "file-v.png", &["--prediction-type", "v_prediction"]));
    let (folder_v, _) = decode_png(&generate(&folder, "folder-v.png", &["--prediction-type", "v_prediction"]));
    assert!(file_v == folder_v && file_v != from_file, "--prediction-type v_prediction");

    // The prediction type is recorded (as a scheduler override), so --from makes the same image.
    let text = info(&dir.join("file-v.png"));
    assert!(text.contains(r#"Diffuse scheduler config: "{\"prediction_type\":\"v_prediction\"}""#) && text.contains("Model: model,"), "{text}");
    let again = dir.join("again.png");
    let (ok, _, stderr) = diffuse(&["generate", "--from", dir.join("file-v.png").to_str().unwrap(), "--model", file.to_str().unwrap(), "--quiet", "--output", again.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    assert!(std::fs::read(dir.join("file-v.png")).unwrap() == std::fs::read(&again).unwrap(), "--from must make the same image");
}

#[test]
fn single_file_bad_input() {
    let dir = scratch("single-file-bad");
    let out = dir.join("out.png");
    let out_s = out.to_str().unwrap();
    let file = fixtures().join("single_file/sd1_pipeline/model.safetensors");
    let file_s = file.to_str().unwrap();
    assert_fails_with(&["generate", "--model", file_s, "--prompt", "x", "--prediction-type", "x0", "--output", out_s], "prediction_type `x0`");
    assert_fails_with(&["generate", "--model", file_s, "--prompt", "x", "--variant", "fp16", "--output", out_s], "--variant");
    let folder = fixtures().join("sd/sd1");
    assert_fails_with(&["generate", "--model", folder.to_str().unwrap(), "--prompt", "x", "--prediction-type", "x0", "--output", out_s], "x0");

    // A pickle checkpoint: refused, saying why and how to convert (several lines: the Python to run).
    let ckpt = dir.join("model.ckpt");
    std::fs::write(&ckpt, b"PK\x03\x04 a torch.save zip archive").unwrap();
    let (ok, _, stderr) = diffuse(&["generate", "--model", ckpt.to_str().unwrap(), "--prompt", "x", "--output", out_s]);
    assert!(!ok && !stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains("pickle") && stderr.contains("arbitrary code") && stderr.contains("save_file("), "{stderr}");

    // A tensor no SD 1.x/2.x UNet has is named.
    let mut tensors = candle_core::safetensors::load(&file, &candle_core::Device::Cpu).unwrap();
    let extra = "model.diffusion_model.input_blocks.1.2.weight";
    tensors.insert(extra.to_string(), candle_core::Tensor::zeros(4, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap());
    let odd = dir.join("odd.safetensors");
    candle_core::safetensors::save(&tensors, &odd).unwrap();
    assert_fails_with(&["generate", "--model", odd.to_str().unwrap(), "--prompt", "x", "--output", out_s], extra);
    assert!(!out.exists(), "no output may be written on failure");
}

/// `--prompt-syntax a1111`: a plain short prompt gives diffusers' image; weights and prompts
/// past 77 tokens change it (diffusers' syntax truncates those, with a warning).
#[test]
fn a1111_prompt_syntax() {
    let dir = scratch("a1111");
    let model = fixtures().join("sd/sd1");
    let generate = |name: &str, prompt: &str, syntax: &str| -> (Vec<u8>, String) {
        let out = dir.join(name);
        let (ok, _, stderr) = diffuse(&[
            "generate", "--model", model.to_str().unwrap(), "--prompt", prompt, "--scheduler", "ddim", "--steps", "4",
            "--seed", "5", "--prompt-syntax", syntax, "--output", out.to_str().unwrap(),
        ]);
        assert!(ok, "{stderr}");
        (decode_png(&out).0, stderr)
    };
    let (plain, _) = generate("plain.png", "a photo of a cat", "diffusers");
    let (plain_a1111, _) = generate("plain-a1111.png", "a photo of a cat", "a1111");
    assert!(plain == plain_a1111, "a plain prompt must give the same image in both syntaxes");
    let (weighted, _) = generate("weighted.png", "a (photo:1.5) of a [cat]", "a1111");
    assert!(weighted != plain, "weights must change the image");
    // Recorded in the metadata, and used again by --from.
    let text = info(&dir.join("weighted.png"));
    assert!(text.contains("Prompt syntax: a1111") && !info(&dir.join("plain.png")).contains("Prompt syntax"), "{text}");
    let again = dir.join("again.png");
    let (ok, _, stderr) = diffuse(&[
        "generate", "--from", dir.join("weighted.png").to_str().unwrap(), "--model", model.to_str().unwrap(), "--quiet",
        "--output", again.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(std::fs::read(dir.join("weighted.png")).unwrap() == std::fs::read(&again).unwrap(), "--from must make the same image");

    let items: Vec<String> = (0..40).map(|i| format!("item number {i}")).collect();
    let long = format!("a photo of a cat, {}", items.join(", "));
    let (truncated, stderr) = generate("long.png", &long, "diffusers");
    assert!(stderr.contains("truncated"), "{stderr}");
    let (chunked, stderr) = generate("long-a1111.png", &long, "a1111");
    assert!(!stderr.contains("truncated"), "{stderr}");
    assert!(chunked != truncated, "the tokens past 77 must count with a1111");

    let out = dir.join("bad.png");
    let (ok, _, stderr) = diffuse(&[
        "generate", "--model", model.to_str().unwrap(), "--prompt", "x", "--prompt-syntax", "comfy", "--output", out.to_str().unwrap(),
    ]);
    assert!(!ok && stderr.contains("comfy") && stderr.contains("a1111"), "{stderr}");
    assert_fails_with(
        &["generate", "--model", model.to_str().unwrap(), "--prompt", "(x:1.2.3)", "--prompt-syntax", "a1111", "--output", out.to_str().unwrap()],
        "1.2.3",
    );
    assert!(!out.exists());
}

/// `--lora FILE:WEIGHT` (repeatable) against diffusers' fused images (tools/fixtures/lora.py),
/// recorded in the metadata and taken back by `--from`.
#[test]
fn lora_matches_diffusers_and_is_recorded() {
    let dir = scratch("lora");
    let model = fixtures().join("sd/sd1");
    let loras = fixtures().join("lora");
    let lora = |name: &str, weight: &str| format!("{}:{weight}", loras.join(format!("{name}.safetensors")).display());
    let generate = |name: &str, extra: &[&str]| -> (PathBuf, String) {
        let out = dir.join(name);
        let mut args = vec!["generate", "--model", model.to_str().unwrap(), "--prompt", "a photo of a cat", "--steps", "8", "--seed", "0"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--output", out.to_str().unwrap()]);
        let (ok, _, stderr) = diffuse(&args);
        assert!(ok, "{stderr}");
        (out, stderr)
    };

    let (scaled, stderr) = generate("scaled.png", &["--lora", &lora("peft_a", "0.6")]);
    assert!(stderr.contains("LoRA peft_a (diffusers/PEFT, weight 0.6): fused 44 layers (UNet 32, text encoder 12) from 88 keys"), "{stderr}");
    let psnr = psnr_against(&decode_png(&scaled).0, &loras.join("cases/a_scaled.safetensors"));
    assert!(psnr >= 40.0, "PSNR {psnr}");
    let text = info(&scaled);
    assert!(text.contains(r#"Lora hashes: "peft_a: f0294f38d3c0", Diffuse loras: "peft_a: 0.6", Version: diffuse"#), "{text}");

    let (stacked, _) = generate("stacked.png", &["--lora", &lora("peft_a", "0.8"), "--lora", &lora("kohya_b_ldm", "-0.5"), "--quiet"]);
    let psnr = psnr_against(&decode_png(&stacked).0, &loras.join("cases/stack.safetensors"));
    assert!(psnr >= 40.0, "PSNR {psnr}");

    // --from finds the LoRAs in --lora-dir and makes the same file again.
    let again = dir.join("again.png");
    let (ok, _, stderr) = diffuse(&[
        "generate", "--from", stacked.to_str().unwrap(), "--model", model.to_str().unwrap(), "--lora-dir", loras.to_str().unwrap(),
        "--quiet", "--output", again.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(std::fs::read(&stacked).unwrap() == std::fs::read(&again).unwrap(), "--from must make the same image");
    assert_fails_with(
        &["generate", "--from", stacked.to_str().unwrap(), "--model", model.to_str().unwrap(), "--output", again.to_str().unwrap()],
        "--lora-dir",
    );
    // Another file under the recorded name: made, with a warning about its hash.
    let other_dir = dir.join("other-loras");
    std::fs::create_dir_all(&other_dir).unwrap();
    std::fs::copy(loras.join("kohya_a.safetensors"), other_dir.join("peft_a.safetensors")).unwrap();
    std::fs::copy(loras.join("kohya_b_ldm.safetensors"), other_dir.join("kohya_b_ldm.safetensors")).unwrap();
    let (ok, _, stderr) = diffuse(&[
        "generate", "--from", stacked.to_str().unwrap(), "--model", model.to_str().unwrap(), "--lora-dir", other_dir.to_str().unwrap(),
        "--output", again.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("made with the LoRA peft_a of hash f0294f38d3c0") && !stderr.contains("kohya_b_ldm of hash"), "{stderr}");
}

/// `<lora:NAME:TE:UNET>` in an AUTOMATIC1111 prompt, found in --lora-dir; the tag stays in the
/// recorded prompt, as AUTOMATIC1111 writes it.
#[test]
fn lora_prompt_tags() {
    let dir = scratch("lora-tags");
    let model = fixtures().join("sd/sd1");
    let loras = fixtures().join("lora");
    let out = dir.join("tag.png");
    let prompt = "a photo of a cat<lora:kohya_a:1.5:0.5>";
    let (ok, _, stderr) = diffuse(&[
        "generate", "--model", model.to_str().unwrap(), "--prompt", prompt, "--prompt-syntax", "a1111", "--lora-dir",
        loras.to_str().unwrap(), "--steps", "8", "--seed", "0", "--output", out.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("LoRA kohya_a (kohya, UNet weight 0.5, text encoder weight 1.5)"), "{stderr}");
    let psnr = psnr_against(&decode_png(&out).0, &loras.join("cases/a_split.safetensors"));
    assert!(psnr >= 40.0, "PSNR {psnr}");
    let text = info(&out);
    assert!(text.starts_with(prompt) && text.contains(r#"Lora hashes: "kohya_a: 77a1cd10da3b""#) && !text.contains("Diffuse loras"), "{text}");
    let again = dir.join("again.png");
    let (ok, _, stderr) = diffuse(&[
        "generate", "--from", out.to_str().unwrap(), "--model", model.to_str().unwrap(), "--lora-dir", loras.to_str().unwrap(),
        "--quiet", "--output", again.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&again).unwrap(), "--from must make the same image");

    // With diffusers' syntax the tag is text, with a warning.
    let (ok, _, stderr) = diffuse(&[
        "generate", "--model", model.to_str().unwrap(), "--prompt", prompt, "--steps", "2", "--output", again.to_str().unwrap(),
    ]);
    assert!(ok && stderr.contains("<lora:kohya_a:1.5:0.5> is read as text"), "{stderr}");
}

#[test]
fn lora_bad_input() {
    let dir = scratch("lora-bad");
    let out = dir.join("out.png");
    let out_s = out.to_str().unwrap();
    let model = fixtures().join("sd/sd1");
    let model_s = model.to_str().unwrap();
    let loras = fixtures().join("lora");
    let peft_a = loras.join("peft_a.safetensors");
    let run_with = |prompt: &str, extra: &[&str], needle: &str| {
        let mut args = vec!["generate", "--model", model_s, "--prompt", prompt, "--steps", "2", "--output", out_s];
        args.extend_from_slice(extra);
        assert_fails_with(&args, needle);
    };
    let run = |extra: &[&str], needle: &str| run_with("a cat", extra, needle);
    run(&["--lora", &format!("{}:strong", peft_a.display())], "the weight `strong` is not a number");
    run(&["--lora", &format!("{}:nan", peft_a.display())], "not a finite number");
    run(&["--lora", dir.join("missing.safetensors").to_str().unwrap()], "missing.safetensors");
    let truncated = dir.join("truncated.safetensors");
    std::fs::write(&truncated, &std::fs::read(&peft_a).unwrap()[..1000]).unwrap();
    run(&["--lora", truncated.to_str().unwrap()], "not a valid safetensors file");
    // A LoRA for another model: the SD 1.x pipeline's LoRA on the single-file pipeline has
    // layers it lacks (a third CLIP layer).
    let single = fixtures().join("single_file/sd1_pipeline/model.safetensors");
    let (ok, _, stderr) = diffuse(&[
        "generate", "--model", single.to_str().unwrap(), "--prompt", "a cat", "--steps", "2", "--lora", peft_a.to_str().unwrap(),
        "--output", out_s,
    ]);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("fused 40 layers (UNet 32, text encoder 8) from 88 keys; 8 keys unused: 4 layers match no layer of this model"), "{stderr}");
    std::fs::remove_file(&out).unwrap();
    run_with("a cat <lora:peft_a:1>", &["--prompt-syntax", "a1111"], "--lora-dir");
    run_with("a cat <lora:nowhere:1>", &["--prompt-syntax", "a1111", "--lora-dir", loras.to_str().unwrap()], "nowhere.safetensors does not exist");
    let pixel = fixtures().join("pixel/uncond");
    assert_fails_with(&["generate", "--model", pixel.to_str().unwrap(), "--lora", peft_a.to_str().unwrap(), "--output", out_s], "pixel-space");
    assert!(!out.exists());
}

#[test]
fn invert_and_image_to_image_with_a_single_file_match_its_folder() {
    let dir = scratch("single-file-img2img");
    let folder = fixtures().join("single_file/sd1_pipeline");
    let file = folder.join("model.safetensors");
    let image = fixtures().join("img2img/inputs/init_64x64.png");
    let run = |model: &Path, args: &[&str], out: &Path| -> Vec<u8> {
        let mut all = vec![args[0], "--model", model.to_str().unwrap()];
        all.extend_from_slice(&args[1..]);
        all.extend_from_slice(&["--steps", "6", "--quiet", "--output", out.to_str().unwrap()]);
        let (ok, _, stderr) = diffuse(&all);
        assert!(ok, "{stderr}");
        std::fs::read(out).unwrap()
    };
    let invert = ["invert", "--image", image.to_str().unwrap(), "--prompt", "a cat"];
    let from_file = run(&file, &invert, &dir.join("file.safetensors"));
    let from_folder = run(&folder, &invert, &dir.join("folder.safetensors"));
    let latents = |bytes: &[u8]| safetensors_latents(bytes);
    assert_eq!(latents(&from_file), latents(&from_folder), "inverted latents");
    let img2img = ["generate", "--prompt", "a cat", "--init-image", image.to_str().unwrap(), "--seed", "1"];
    run(&file, &img2img, &dir.join("file.png"));
    run(&folder, &img2img, &dir.join("folder.png"));
    assert_eq!(decode_png(&dir.join("file.png")).0, decode_png(&dir.join("folder.png")).0, "image-to-image");
}

/// The `latents` tensor's bytes in a safetensors file.
fn safetensors_latents(bytes: &[u8]) -> Vec<u8> {
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let offsets = &header["latents"]["data_offsets"];
    let (start, end) = (offsets[0].as_u64().unwrap() as usize, offsets[1].as_u64().unwrap() as usize);
    bytes[8 + header_len + start..8 + header_len + end].to_vec()
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

    // Continued to 6 steps with --resume (in bf16 mixed precision with gradient checkpointing:
    // the state is f32 either way); without it the folder is refused.
    assert_fails_with(&as_str(&train_args("6", &[])), "--resume");
    let (ok, _, stderr) = diffuse(&as_str(&train_args("6", &["--resume", "--mixed-precision", "bf16", "--gradient-checkpointing"])));
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
    assert_fails_with(&with(&["--mixed-precision", "fp16"]), "use --mixed-precision bf16");
    assert_fails_with(&with(&["--mixed-precision", "fp8"]), "--mixed-precision fp8 is not one of no, bf16");
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

/// `diffuse bench --train` times training steps and writes the UNet config the PyTorch side
/// builds the same model from.
#[test]
fn bench_times_training_steps_and_saves_the_config() {
    let dir = scratch("bench-train");
    let config = dir.join("unet.json");
    let (ok, stdout, stderr) = diffuse(&["bench", "--train", "text-to-image", "--batch", "1", "--runs", "1", "--save-config", config.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("train text-to-image: 6133444 parameters") && stdout.contains("images/s"), "{stdout}");
    let saved: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    assert_eq!((saved["cross_attention_dim"].as_u64(), saved["sample_size"].as_u64()), (Some(64), Some(8)));
    let (ok, stdout, stderr) = diffuse(&["bench", "--train", "text-to-image", "--batch", "1", "--runs", "1", "--mixed-precision", "bf16", "--gradient-checkpointing"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("bf16 mixed") && stdout.contains("gradient checkpointing") && stdout.contains("images/s"), "{stdout}");
    assert_fails_with(&["bench", "--train", "video", "--runs", "1"], "--train video is not one of text-to-image, pixel");
    assert_fails_with(&["bench", "--mixed-precision", "bf16", "--runs", "1"], "add --train");
    assert_fails_with(&["bench", "--train", "pixel", "--mixed-precision", "fp16", "--runs", "1"], "use --mixed-precision bf16");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Without --model, `generate` uses the built-in Fashion-MNIST model (written once into the
/// cache folder): a 32×32 image whose parameters name it.
#[test]
fn generate_without_a_model_uses_the_built_in_one() {
    let dir = scratch("default-model");
    let out = dir.join("sneaker.png");
    for _ in 0..2 {
        let (ok, _, stderr) = diffuse(&["generate", "--prompt", "a photo of a sneaker", "--steps", "4", "--seed", "3", "--output", out.to_str().unwrap()]);
        assert!(ok, "{stderr}");
    }
    let (pixels, text) = decode_png(&out);
    assert_eq!(pixels.len(), 32 * 32 * 3);
    let parameters = &text.iter().find(|(key, _)| key == "parameters").unwrap().1;
    assert!(parameters.contains("Model: fashion-mnist") && parameters.contains("Size: 32x32"), "{parameters}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `diffuse train --lora-rank` on a pipeline (the tiny SD 1.x fixture, from an image folder with
/// diffusers' metadata.jsonl): only the LoRA is written, in diffusers' and kohya's formats,
/// and `generate --lora` makes the same image from either; bad LoRA options are refused.
#[test]
fn train_a_lora_and_generate_with_it() {
    let dir = scratch("train-lora");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let mut metadata = String::new();
    for index in 0..4u32 {
        let file = std::fs::File::create(data.join(format!("{index}.png"))).unwrap();
        let mut encoder = png::Encoder::new(file, 64, 64);
        encoder.set_color(png::ColorType::Rgb);
        let pixels: Vec<u8> = (0..64 * 64 * 3).map(|i| if (i / 3 % 64 < 32) == (index % 2 == 0) { 200 } else { 20 }).collect();
        encoder.write_header().unwrap().write_image_data(&pixels).unwrap();
        let side = if index % 2 == 0 { "left" } else { "right" };
        metadata.push_str(&format!("{{\"file_name\": \"{index}.png\", \"text\": \"bright on the {side}\"}}\n"));
    }
    std::fs::write(data.join("metadata.jsonl"), metadata).unwrap();
    let sd1 = fixtures().join("sd/sd1");
    let (sd1_s, data_s) = (sd1.to_str().unwrap(), data.to_str().unwrap());
    let out = dir.join("my-style");
    let out_s = out.to_str().unwrap();
    let (ok, stdout, stderr) = diffuse(&[
        "train", "--base", sd1_s, "--lora-rank", "2", "--lora-targets", "attention,text-encoder", "--data", data_s, "--output", out_s,
        "--steps", "4", "--batch-size", "2", "--lr", "1e-2", "--warmup", "1", "--checkpoint-every", "0", "--export-dtype", "bf16", "--quiet",
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("my-style"), "{stdout}");
    let (diffusers_file, kohya_file) = (out.join("pytorch_lora_weights.safetensors"), out.join("my-style.safetensors"));
    assert!(diffusers_file.is_file() && kohya_file.is_file() && !out.join("unet").exists());
    // --export-dtype bf16: the adapters are stored in bf16 (the safetensors header says so).
    let bytes = std::fs::read(&diffusers_file).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + header_len]).unwrap();
    assert!(header.contains("\"dtype\":\"BF16\"") && !header.contains("\"dtype\":\"F32\""), "{header}");

    let image = |lora: &Path, name: &str| {
        let png = dir.join(name);
        let (ok, _, stderr) = diffuse(&[
            "generate", "--model", sd1_s, "--lora", lora.to_str().unwrap(), "--prompt", "bright on the left", "--steps", "3", "--seed", "1",
            "--output", png.to_str().unwrap(),
        ]);
        assert!(ok, "{stderr}");
        assert!(stderr.contains("fused 44 layers (UNet 32, text encoder 12)"), "{stderr}");
        decode_png(&png).0
    };
    assert_eq!(image(&diffusers_file, "a.png"), image(&kohya_file, "b.png"), "both formats make the same image");

    let refused = dir.join("refused");
    let common = ["train", "--data", data_s, "--output", refused.to_str().unwrap(), "--steps", "2", "--quiet"];
    let on_base = joined(&common, &["--base", sd1_s]);
    assert_fails_with(&joined(&common, &["--lora-rank", "2"]), "--lora-rank needs --base");
    assert_fails_with(&joined(&on_base, &["--lora-rank", "0"]), "--lora-rank must be at least 1");
    assert_fails_with(&joined(&on_base, &["--lora-rank", "2", "--lora-alpha", "0"]), "--lora-alpha");
    assert_fails_with(&joined(&on_base, &["--lora-rank", "2", "--lora-dropout", "1"]), "--lora-dropout must be in [0, 1)");
    assert_fails_with(&joined(&on_base, &["--lora-dropout", "0.1"]), "need --lora-rank");
    assert_fails_with(&joined(&on_base, &["--lora-rank", "2", "--kind", "pixel"]), "--kind text-to-image");
    assert_fails_with(&joined(&on_base, &["--lora-rank", "2", "--lora-targets", "to_nothing"]), "no linear or convolution layer");
    assert_fails_with(&joined(&common, &["--base", dir.to_str().unwrap(), "--lora-rank", "2"]), "not a StableDiffusionPipeline folder");
    assert!(!refused.join("pytorch_lora_weights.safetensors").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

fn joined<'a>(a: &[&'a str], b: &[&'a str]) -> Vec<&'a str> {
    [a, b].concat()
}

#[test]
fn tcd_gamma_defaults_to_0_3_and_lcm_refuses_more_steps_than_its_schedule() {
    let dir = scratch("tcd-lcm");
    let model = fixtures().join("pixel/uncond");
    let model = model.to_str().unwrap();
    let run = |name: &str, extra: &[&str]| -> Vec<u8> {
        let out = dir.join(format!("{name}.png"));
        let mut args = vec!["generate", "--model", model, "--scheduler", "tcd", "--steps", "3", "--seed", "4", "--quiet"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--output", out.to_str().unwrap()]);
        let (ok, _, stderr) = diffuse(&args);
        assert!(ok, "{stderr}");
        decode_png(&out).0
    };
    // TCDScheduler.step's own gamma without --eta; it is not written to the infotext, so that
    // --from gets it again.
    let default = run("default", &[]);
    assert!(default == run("explicit", &["--eta", "0.3"]), "--scheduler tcd without --eta must use gamma 0.3");
    assert!(default != run("deterministic", &["--eta", "0"]));
    assert!(!info(&dir.join("default.png")).contains("Eta DDIM"));
    assert!(info(&dir.join("deterministic.png")).contains("Eta DDIM: 0,"));
    assert_fails_with(
        &["generate", "--model", model, "--scheduler", "tcd", "--eta", "1.5", "--steps", "2", "--quiet", "--output", dir.join("x.png").to_str().unwrap()],
        "eta (gamma) must be between 0 and 1, got 1.5",
    );
    assert_fails_with(
        &["generate", "--model", model, "--scheduler", "lcm", "--steps", "51", "--quiet", "--output", dir.join("x.png").to_str().unwrap()],
        "original_inference_steps (50)",
    );
}

// ---- Inputs that cannot hurt (issue 13) ----

/// A PNG whose `parameters` chunk is `text`.
fn png_with_parameters(path: &Path, text: &str) -> PathBuf {
    diffuse::pipelines::write_png(path, 8, 8, 3, &[0; 8 * 8 * 3], &[("parameters", text.to_string())]).unwrap();
    path.to_path_buf()
}

#[test]
fn lora_names_from_pngs_and_prompts_stay_inside_the_lora_dir() {
    let dir = scratch("lora-escape");
    let out = dir.join("out.png");
    let model = fixtures().join("sd/sd1");
    let loras = dir.join("loras");
    std::fs::create_dir_all(&loras).unwrap();
    std::fs::copy(fixtures().join("lora/peft_a.safetensors"), dir.join("outside.safetensors")).unwrap();
    let run = |text: &str, needle: &str| {
        let png = png_with_parameters(&dir.join("from.png"), text);
        assert_fails_with(
            &[
                "generate", "--from", png.to_str().unwrap(), "--model", model.to_str().unwrap(), "--lora-dir",
                loras.to_str().unwrap(), "--output", out.to_str().unwrap(),
            ],
            needle,
        );
    };
    let settings = "Steps: 2, Sampler: Euler, Seed: 1, Size: 64x64";
    run(&format!("a cat <lora:../outside:1>\n{settings}, Prompt syntax: a1111"), "<lora:../outside:1>: the LoRA name `../outside` is not the name of a file inside");
    let absolute = dir.join("outside");
    run(&format!("a cat <lora:{}:1>\n{settings}, Prompt syntax: a1111", absolute.display()), "is not the name of a file inside");
    run(&format!("a cat\n{settings}, Diffuse loras: \"../outside: 1\""), "`Diffuse loras`: the LoRA name `../outside` is not the name of a file inside");
    // The same from the command line.
    assert_fails_with(
        &[
            "generate", "--model", model.to_str().unwrap(), "--prompt", "a cat <lora:../outside:1>", "--prompt-syntax", "a1111",
            "--lora-dir", loras.to_str().unwrap(), "--steps", "2", "--output", out.to_str().unwrap(),
        ],
        "is not the name of a file inside",
    );
    assert!(!out.exists());
}

#[test]
fn from_png_never_starts_a_download() {
    let dir = scratch("from-download");
    let out = dir.join("out.png");
    let cache = dir.join("hub-cache");
    // A cache with one repo; a Hub that cannot be reached (a download would fail at once).
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let repo = cache.join("models--diffuse-test--cached");
    copy_dir(&fixtures().join("pixel/uncond"), &repo.join("snapshots").join(commit));
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    let run = |png: &Path, extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_diffuse"))
            .args(["generate", "--from", png.to_str().unwrap(), "--quiet", "--output", out.to_str().unwrap()])
            .args(extra)
            .env("HF_HUB_CACHE", &cache)
            .env_remove("HF_HUB_OFFLINE")
            .env_remove("TRANSFORMERS_OFFLINE")
            .env("HF_ENDPOINT", "http://127.0.0.1:9")
            .env("DIFFUSE_CACHE_DIR", dir.join("diffuse-cache"))
            .output()
            .unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let missing = png_with_parameters(&dir.join("missing.png"), "Steps: 2, Sampler: DDIM, Seed: 1, Model: diffuse-test/not-in-cache");
    let (ok, stderr) = run(&missing, &[]);
    assert!(!ok && !stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains("a PNG never starts a download") && stderr.contains("--allow-download"), "{stderr}");
    assert!(!stderr.contains("downloading it failed"), "no download may be tried: {stderr}");
    // Asked for, the download is tried (and fails: there is no Hub here).
    let (ok, stderr) = run(&missing, &["--allow-download"]);
    assert!(!ok && stderr.contains("downloading it failed"), "{stderr}");
    // A repo in the cache is used as it is.
    let cached = png_with_parameters(&dir.join("cached.png"), "Steps: 2, Sampler: DDIM, Seed: 1, Model: diffuse-test/cached");
    let (ok, stderr) = run(&cached, &[]);
    assert!(ok, "{stderr}");
    assert!(out.is_file());
}

#[test]
fn num_images_is_checked_first_and_without_overflow() {
    let dir = scratch("num-images");
    let out = dir.join("out.png");
    let out_s = out.to_str().unwrap();
    assert_fails_with(&["generate", "--model", "nowhere", "--num-images", "0", "--output", out_s], "--num-images must be at least 1");
    let pixel = fixtures().join("pixel/uncond");
    let sd = fixtures().join("sd/sd1");
    for model in [&pixel, &sd] {
        for count in ["18446744073709551615", "9223372036854775808", "4611686018427387904", "100000000"] {
            let args = ["generate", "--model", model.to_str().unwrap(), "--num-images", count, "--steps", "2", "--output", out_s];
            assert_fails_with(&args, "too large for this machine's memory");
        }
    }
    // A PNG's batch size is a number from a file.
    let png = png_with_parameters(&dir.join("batch.png"), "a cat\nSteps: 2, Sampler: Euler, Seed: 1, Size: 64x64, Batch size: 18446744073709551615, Batch pos: 3");
    assert_fails_with(&["generate", "--from", png.to_str().unwrap(), "--model", sd.to_str().unwrap(), "--output", out_s], "too large");
    assert!(!out.exists());
}

/// Runs `diffuse` with stdout closed before it writes, waiting at most `limit`.
fn diffuse_into_closed_pipe(args: &[&str], limit: std::time::Duration) -> (std::process::ExitStatus, String) {
    use std::io::Read;
    let mut child = Command::new(env!("CARGO_BIN_EXE_diffuse"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("diffuse {args:?} still ran after {limit:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    (status, stderr)
}

#[test]
fn a_closed_stdout_ends_every_command_quietly_and_long_infotexts_are_fast() {
    let dir = scratch("epipe");
    // A megabyte of parameters, its last line without `:` (the scanner's worst case once).
    let text = format!("a cat\nSteps: 2, Seed: 1, Size: 8x8\n{}", "a".repeat(1 << 20));
    let png = png_with_parameters(&dir.join("big.png"), &text);
    let limit = std::time::Duration::from_secs(20);
    for args in [&["info", png.to_str().unwrap()][..], &["info", "--json", png.to_str().unwrap()], &["schedulers"]] {
        let (status, stderr) = diffuse_into_closed_pipe(args, limit);
        assert!(status.success() && stderr.is_empty(), "diffuse {args:?}: {status}, {stderr}");
    }
    let start = std::time::Instant::now();
    let (ok, stdout, stderr) = diffuse(&["info", "--json", png.to_str().unwrap()]);
    assert!(ok && stdout.contains("\"prompt\""), "{stderr}");
    assert!(start.elapsed() < std::time::Duration::from_secs(5), "{:?}", start.elapsed());
}

#[test]
fn help_says_what_each_subcommand_does() {
    let about = |command: &str| {
        let (ok, stdout, stderr) = diffuse(&[command, "--help"]);
        assert!(ok, "{stderr}");
        stdout.split("Usage:").next().unwrap().replace('\n', " ")
    };
    let train = about("train");
    for needle in ["pixel-space UNet2DModel", "AutoencoderKL", "text-to-image", "--base", "LoRA adapters"] {
        assert!(train.contains(needle), "`train --help` should mention {needle}: {train}");
    }
    let generate = about("generate");
    for needle in ["text-to-image", "image-to-image", "inpainting", "single checkpoint file", "pixel-space", "--from"] {
        assert!(generate.contains(needle), "`generate --help` should mention {needle}: {generate}");
    }
    assert!(about("bench").contains("training step"));
    assert!(about("evaluate").contains("--train-classifier"));
    let (_, train_help, _) = diffuse(&["train", "--help"]);
    assert!(train_help.contains("StableDiffusionPipeline (text-to-image), or the LoRA files"), "--output: {train_help}");
}

/// SDXL through the CLI: micro-conditioning flags give diffusers' image, the PNG records them
/// and `--from` makes the same file again; `--refiner` runs diffusers' base + refiner
/// ensemble; the refiner alone refines an init image (default guidance 5 as the SDXL folders').
#[test]
fn sdxl_flags_match_diffusers_and_are_recorded() {
    let dir = scratch("sdxl");
    let sdxl = fixtures().join("sdxl");
    let base = sdxl.join("base");
    let base_s = base.to_str().unwrap();
    let out = dir.join("micro.png");
    let (ok, _, stderr) = diffuse(&[
        "generate", "--model", base_s, "--prompt", "a photo of a cat", "--steps", "8", "--seed", "5", "--width", "64",
        "--height", "48", "--original-size", "128x96", "--crops-coords-top-left", "8,16", "--target-size", "56x40",
        "--quiet", "--output", out.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let (pixels, _) = decode_png(&out);
    let psnr = psnr_against(&pixels, &sdxl.join("cases/base_micro_conditioning.safetensors"));
    assert!(psnr >= 40.0, "PSNR {psnr:.1} dB");
    let text = info(&out);
    for part in ["CFG scale: 5,", r#"Original size: 128x96, Target size: 56x40, Crop top left: "8,16""#] {
        assert!(text.contains(part), "{part} missing from {text}");
    }
    let again = dir.join("again.png");
    let (ok, _, stderr) = diffuse(&["generate", "--from", out.to_str().unwrap(), "--model", base_s, "--quiet", "--output", again.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&again).unwrap(), "--from must make the same SDXL image");

    // The ensemble: the base runs half the schedule, the refiner the rest, one generator.
    let refined = dir.join("refined.png");
    let (ok, _, stderr) = diffuse(&[
        "generate", "--model", base_s, "--refiner", sdxl.join("refiner").to_str().unwrap(), "--refiner-switch", "0.5",
        "--prompt", "a photo of a cat", "--negative-prompt", "blurry", "--scheduler", "euler-ancestral", "--steps", "10",
        "--seed", "27", "--width", "64", "--height", "48", "--quiet", "--output", refined.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let (pixels, _) = decode_png(&refined);
    let psnr = psnr_against(&pixels, &sdxl.join("cases/ensemble_euler_a_negative.safetensors"));
    assert!(psnr >= 40.0, "ensemble PSNR {psnr:.1} dB");
    assert!(info(&refined).contains("Refiner: refiner, Refiner switch at: 0.5"), "{}", info(&refined));

    // The refiner on its own: image-to-image with its aesthetic scores.
    let refiner_out = dir.join("refiner.png");
    let (ok, _, stderr) = diffuse(&[
        "generate", "--model", sdxl.join("refiner").to_str().unwrap(), "--init-image", sdxl.join("inputs/init_64x48.png").to_str().unwrap(),
        "--strength", "0.8", "--prompt", "a photo of a cat", "--aesthetic-score", "8.5", "--negative-aesthetic-score", "1",
        "--negative-prompt", "blurry", "--steps", "10", "--seed", "25", "--quiet", "--output", refiner_out.to_str().unwrap(),
    ]);
    assert!(ok, "{stderr}");
    let (pixels, _) = decode_png(&refiner_out);
    let psnr = psnr_against(&pixels, &sdxl.join("cases/refiner_aesthetic.safetensors"));
    assert!(psnr >= 40.0, "refiner PSNR {psnr:.1} dB");
}

#[test]
fn sdxl_bad_input() {
    let dir = scratch("sdxl-bad");
    let sdxl = fixtures().join("sdxl");
    let base = sdxl.join("base");
    let out = dir.join("out.png");
    let out_s = out.to_str().unwrap();
    let base_s = base.to_str().unwrap();
    let generate = |extra: &[&str]| -> Vec<String> {
        let mut args: Vec<String> = ["generate", "--steps", "2", "--output", out_s].iter().map(|s| s.to_string()).collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    let check = |extra: &[&str], needle: &str| {
        let args = generate(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_fails_with(&args, needle);
        assert!(!out.exists(), "no output for {extra:?}");
    };
    // The refiner makes no image from noise.
    check(&["--model", sdxl.join("refiner").to_str().unwrap()], "SDXL refiner");
    // SDXL flags on an SD 1.x model.
    check(&["--model", fixtures().join("sd/sd1").to_str().unwrap(), "--prompt-2", "x"], "are for SDXL models");
    check(&["--model", base_s, "--original-size", "64"], "WIDTHxHEIGHT");
    check(&["--model", base_s, "--crops-coords-top-left", "a,b"], "TOP,LEFT");
    check(&["--model", base_s, "--refiner", base_s, "--refiner-switch", "1.5"], "--refiner-switch must be between 0 and 1");
    check(&["--model", base_s, "--width", "60", "--height", "48"], "multiples of 8");
    check(&["--model", base_s, "--refiner", fixtures().join("sd/sd1").to_str().unwrap()], "not an SDXL model");
    // A folder whose UNet takes other time ids than the pipeline makes (a refiner's UNet in a
    // folder that does not say requires_aesthetics_score).
    let broken = dir.join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    for component in ["scheduler", "text_encoder_2", "tokenizer_2", "unet", "vae"] {
        std::os::unix::fs::symlink(sdxl.join("refiner").join(component).canonicalize().unwrap(), broken.join(component)).unwrap();
    }
    let index = std::fs::read_to_string(sdxl.join("refiner/model_index.json")).unwrap();
    let index = index.replace("\"requires_aesthetics_score\": true", "\"requires_aesthetics_score\": false");
    std::fs::write(broken.join("model_index.json"), index).unwrap();
    check(
        &["--model", broken.to_str().unwrap(), "--init-image", sdxl.join("inputs/init_64x48.png").to_str().unwrap(), "--strength", "0.8"],
        "projection_class_embeddings_input_dim",
    );
}

/// A LoRA trained on an SDXL base (both text encoders frozen, the UNet conditioned on the
/// pooled embedding and each example's size and crop): written in both formats, loaded by
/// `generate`, and changing the image; an SDXL base without --lora-rank is refused.
#[test]
fn train_a_lora_on_an_sdxl_base() {
    let dir = scratch("train-sdxl-lora");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let mut metadata = String::new();
    for index in 0..4u32 {
        // 80×64 images: fitted to 64×64, so the time ids carry a crop.
        let file = std::fs::File::create(data.join(format!("{index}.png"))).unwrap();
        let mut encoder = png::Encoder::new(file, 80, 64);
        encoder.set_color(png::ColorType::Rgb);
        let pixels: Vec<u8> = (0..80 * 64 * 3).map(|i| if (i / 3 % 80 < 40) == (index % 2 == 0) { 200 } else { 20 }).collect();
        encoder.write_header().unwrap().write_image_data(&pixels).unwrap();
        let side = if index % 2 == 0 { "left" } else { "right" };
        metadata.push_str(&format!("{{\"file_name\": \"{index}.png\", \"text\": \"bright on the {side}\"}}\n"));
    }
    std::fs::write(data.join("metadata.jsonl"), metadata).unwrap();
    let base = fixtures().join("sdxl/base");
    let (base_s, data_s) = (base.to_str().unwrap(), data.to_str().unwrap());
    let out = dir.join("xl-style");
    let (ok, _, stderr) = diffuse(&[
        "train", "--base", base_s, "--lora-rank", "2", "--lora-targets", "attention,text-encoder", "--data", data_s, "--output",
        out.to_str().unwrap(), "--resolution", "64", "--image-fit", "resize", "--steps", "3", "--batch-size", "2", "--lr", "1e-2",
        "--warmup", "1", "--checkpoint-every", "0", "--sample-steps", "2", "--quiet",
    ]);
    assert!(ok, "{stderr}");
    let (diffusers_file, kohya_file) = (out.join("pytorch_lora_weights.safetensors"), out.join("xl-style.safetensors"));
    assert!(diffusers_file.is_file() && kohya_file.is_file());
    let keys = |file: &Path| -> Vec<String> { candle_core::safetensors::load(file, &candle_core::Device::Cpu).unwrap().into_keys().collect() };
    assert!(keys(&diffusers_file).iter().any(|k| k.starts_with("text_encoder_2.")), "the second encoder's adapters are saved");
    assert!(keys(&kohya_file).iter().any(|k| k.starts_with("lora_te2_")), "kohya's name for the second encoder");

    let image = |lora: Option<&Path>, name: &str| {
        let png = dir.join(name);
        let mut args = vec!["generate", "--model", base_s, "--prompt", "bright on the left", "--steps", "3", "--seed", "1", "--output"];
        args.push(png.to_str().unwrap());
        let lora_s = lora.map(|l| l.to_str().unwrap().to_string());
        if let Some(lora) = &lora_s {
            args.extend(["--lora", lora.as_str()]);
        }
        let (ok, _, stderr) = diffuse(&args);
        assert!(ok, "{stderr}");
        decode_png(&png).0
    };
    let with_lora = image(Some(&diffusers_file), "a.png");
    assert_eq!(with_lora, image(Some(&kohya_file), "b.png"), "both formats make the same image");
    assert_ne!(with_lora, image(None, "c.png"), "the trained LoRA changes the image");

    let refused = dir.join("refused");
    assert_fails_with(
        &["train", "--base", base_s, "--data", data_s, "--output", refused.to_str().unwrap(), "--steps", "2", "--resolution", "64", "--image-fit", "resize", "--quiet"],
        "LoRA adapters only",
    );
    let _ = std::fs::remove_dir_all(&dir);
}
