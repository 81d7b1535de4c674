//! Every scheduler against diffusers, step by step (fixtures: tools/fixtures/schedulers.py).
//!
//! Each recorded model output is fed back in order (teacher forcing), so multistep state sees
//! the same history as in diffusers; each step's result must agree to 1e-4 of the sample's
//! scale (f32 arithmetic in a different order; the noise itself is bit-exact).

mod common;

use candle_core::Device;
use common::*;
use diffuse::rng::TorchGenerator;

const TOLERANCE: f64 = 1e-4;

fn run_case(name: &str) {
    let dir = fixtures_dir().join("schedulers");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(format!("{name}.json"))).unwrap()).unwrap();
    let tensors = load_tensors(&dir.join(format!("{name}.safetensors")));
    let config = meta["config"].as_object().unwrap().clone();
    let class_name = meta["class_name"].as_str().unwrap();
    let steps = meta["num_inference_steps"].as_u64().unwrap() as usize;
    let eta = meta["eta"].as_f64().unwrap();
    let origin = dir.join(format!("{name}.json"));

    let mut scheduler = diffuse::schedulers::from_config(class_name, &config, &origin)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    scheduler.set_timesteps(steps).unwrap();
    let expected_timesteps = to_vec_f64(&tensors["timesteps"]);
    let timesteps = scheduler.timesteps().to_vec();
    assert_eq!(timesteps.len(), expected_timesteps.len(), "{name}: number of timesteps");
    for (a, e) in timesteps.iter().zip(&expected_timesteps) {
        assert!((a - e).abs() <= 1e-4 * e.abs().max(1.0), "{name}: timesteps {timesteps:?} != {expected_timesteps:?}");
    }
    let sigma = meta["init_noise_sigma"].as_f64().unwrap();
    assert!((scheduler.init_noise_sigma() - sigma).abs() <= 1e-5 * sigma.max(1.0), "{name}: init_noise_sigma");
    assert_eq!(scheduler.order() as u64, meta["order"].as_u64().unwrap(), "{name}: order");

    let mut generator = TorchGenerator::new(meta["seed"].as_u64().unwrap());
    let expected_sample = &tensors["sample_0"];
    let noise = generator.randn_tensor(expected_sample.dims(), &Device::Cpu).unwrap();
    let sample0 = (noise * sigma).unwrap();
    assert_close(&sample0, expected_sample, TOLERANCE, &format!("{name}: initial sample"));

    let mut sample = expected_sample.clone();
    for (i, &t) in timesteps.iter().enumerate() {
        let scaled = scheduler.scale_model_input(&sample, t).unwrap();
        assert_close(&scaled, &tensors[&format!("scaled_{i}")], TOLERANCE, &format!("{name}: scaled input, step {i} (t={t})"));
        let model_output = &tensors[&format!("model_output_{i}")];
        let prev = scheduler
            .step(model_output, t, &sample, eta, &mut generator)
            .unwrap_or_else(|e| panic!("{name}: step {i}: {e}"));
        let expected = &tensors[&format!("prev_sample_{i}")];
        assert_close(&prev, expected, TOLERANCE, &format!("{name}: prev sample, step {i} (t={t})"));
        sample = expected.clone();
    }

    if let Some(result) = tensors.get("add_noise_result") {
        let mut fresh = diffuse::schedulers::from_config(class_name, &config, &origin).unwrap();
        fresh.set_timesteps(steps).unwrap();
        let t = to_vec_f64(&tensors["add_noise_timesteps"]);
        let noisy = fresh.add_noise(&tensors["add_noise_original"], &tensors["add_noise_noise"], &t).unwrap();
        assert_close(&noisy, result, TOLERANCE, &format!("{name}: add_noise"));
    }
}

/// Runs every fixture made with diffusers' class `class_name`, in name order.
fn run_class(class_name: &str) {
    let dir = fixtures_dir().join("schedulers");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|f| f.strip_suffix(".json").map(str::to_string))
        .filter(|n| {
            let text = std::fs::read_to_string(dir.join(format!("{n}.json"))).unwrap();
            let meta: serde_json::Value = serde_json::from_str(&text).unwrap();
            meta["class_name"] == class_name
        })
        .collect();
    names.sort();
    assert!(!names.is_empty(), "no fixtures for {class_name}");
    for name in names {
        run_case(&name);
    }
}

#[test]
fn ddpm() {
    run_class("DDPMScheduler");
}
#[test]
fn ddim() {
    run_class("DDIMScheduler");
}
#[test]
fn ddim_inverse() {
    run_class("DDIMInverseScheduler");
}
#[test]
fn pndm() {
    run_class("PNDMScheduler");
}
#[test]
fn lms() {
    run_class("LMSDiscreteScheduler");
}
#[test]
fn euler() {
    run_class("EulerDiscreteScheduler");
}
#[test]
fn euler_ancestral() {
    run_class("EulerAncestralDiscreteScheduler");
}
#[test]
fn heun() {
    run_class("HeunDiscreteScheduler");
}
#[test]
fn dpm_solver_multistep() {
    run_class("DPMSolverMultistepScheduler");
}
#[test]
fn unipc() {
    run_class("UniPCMultistepScheduler");
}
