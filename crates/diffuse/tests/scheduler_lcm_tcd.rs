//! LCMScheduler and TCDScheduler against diffusers 0.42.1 (fixtures: tools/fixtures/lcm_tcd.py):
//! the timesteps of `set_timesteps` (step counts, strengths, `original_inference_steps`, and
//! the cases diffusers refuses), and full denoising loops with seeded generator noise, each
//! scheduler configured from a `scheduler_config.json` as the CLI configures it.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use common::*;
use diffuse::pipelines::img2img::strength_timesteps;
use diffuse::pipelines::scheduler_from_config;
use diffuse::rng::TorchGenerator;
use diffuse::schedulers::lcm::{ConsistencyStepOutput, LcmScheduler, LcmSchedulerConfig};
use diffuse::schedulers::tcd::TcdScheduler;
use diffuse::schedulers::Scheduler;
use serde_json::{Map, Value};

/// Each step from the recorded inputs (teacher forcing): f32 arithmetic in another order.
const STEP_TOLERANCE: f64 = 1e-5;
/// A whole loop run freely through the `Scheduler` trait, as the pipelines run it.
const LOOP_TOLERANCE: f64 = 1e-4;

fn dir() -> PathBuf {
    fixtures_dir().join("lcm_tcd")
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The concrete scheduler, for what the `Scheduler` trait does not offer (the options of
/// `set_timesteps`, `denoised`).
enum Consistency {
    Lcm(LcmScheduler),
    Tcd(TcdScheduler),
}

impl Consistency {
    fn from_config(class_name: &str, config: &Map<String, Value>, origin: &Path) -> Self {
        match class_name {
            "LCMScheduler" => Self::Lcm(LcmScheduler::from_config(config, origin).unwrap()),
            "TCDScheduler" => Self::Tcd(TcdScheduler::from_config(config, origin).unwrap()),
            other => panic!("{other}"),
        }
    }

    fn config(&self) -> &LcmSchedulerConfig {
        match self {
            Self::Lcm(s) => s.config(),
            Self::Tcd(s) => s.config(),
        }
    }

    fn set_timesteps(&mut self, steps: usize, original: Option<usize>, strength: f64) -> diffuse::Result<()> {
        match self {
            Self::Lcm(s) => s.set_timesteps_with_options(steps, original, strength),
            Self::Tcd(s) => s.set_timesteps_with_options(steps, original, strength),
        }
    }

    fn as_scheduler(&mut self) -> &mut dyn Scheduler {
        match self {
            Self::Lcm(s) => s,
            Self::Tcd(s) => s,
        }
    }

    fn step(&mut self, model_output: &Tensor, t: f64, sample: &Tensor, eta: f64, g: &mut TorchGenerator) -> ConsistencyStepOutput {
        match self {
            Self::Lcm(s) => s.step_with_output(model_output, t, sample, g),
            Self::Tcd(s) => s.step_with_output(model_output, t, sample, eta, g),
        }
        .unwrap()
    }
}

fn run_timesteps(class_name: &str) {
    let table = read_json(&dir().join("timesteps.json"));
    let origin = dir().join("timesteps.json");
    let mut checked = 0;
    for row in table["rows"].as_array().unwrap().iter().filter(|r| r["class_name"] == class_name) {
        let config = table["configs"][row["config"].as_str().unwrap()].as_object().unwrap();
        let steps = row["steps"].as_u64().unwrap() as usize;
        let strength = row["strength"].as_f64().unwrap();
        let original = row["original_inference_steps"].as_u64().map(|v| v as usize);
        let what = format!("{class_name} {} steps={steps} strength={strength} original={original:?}", row["config"]);
        let mut scheduler = Consistency::from_config(class_name, config, &origin);
        let result = scheduler.set_timesteps(steps, original, strength);
        match row.get("timesteps") {
            Some(expected) => {
                result.unwrap_or_else(|e| panic!("{what}: {e}"));
                let expected: Vec<f64> = expected.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
                assert_eq!(scheduler.as_scheduler().timesteps(), expected.as_slice(), "{what}");
            }
            None => {
                let error = result.err().unwrap_or_else(|| panic!("{what}: diffusers refuses it ({})", row["error"])).to_string();
                // The message names the limit: original_inference_steps (× strength).
                let limit = original.unwrap_or(config.get("original_inference_steps").and_then(Value::as_u64).unwrap_or(50) as usize);
                assert!(error.contains(&format!("original_inference_steps ({limit})")) || error.contains(&format!("({limit} x ")), "{what}: {error}");
            }
        }
        checked += 1;
    }
    assert!(checked > 100, "{checked} rows for {class_name}");
}

fn run_loop(name: &str) {
    let meta = read_json(&dir().join(format!("{name}.json")));
    let tensors = load_tensors(&dir().join(format!("{name}.safetensors")));
    let class_name = meta["class_name"].as_str().unwrap();
    let origin = dir().join(name).join("scheduler_config.json");
    let file_config = meta["file_config"].as_object().unwrap().clone();
    let steps = meta["num_inference_steps"].as_u64().unwrap() as usize;
    let strength = meta["strength"].as_f64().unwrap();
    let original = meta["original_inference_steps"].as_u64().map(|v| v as usize);
    let mode = meta["mode"].as_str().unwrap();

    // As the CLI builds it: the folder's own class, or `--scheduler lcm|tcd` from its config.
    let resolved = scheduler_from_config(file_config, &origin, meta["cli_name"].as_str(), &[])
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(resolved.class_name, class_name, "{name}");
    let mut boxed = resolved.scheduler;
    let mut scheduler = Consistency::from_config(class_name, &resolved.config, &origin);
    // The keys the file states are kept and the rest take this class's defaults.
    let effective: LcmSchedulerConfig = serde_json::from_value(meta["effective_config"].clone()).unwrap();
    assert_eq!(format!("{:?}", scheduler.config()), format!("{effective:?}"), "{name}: config");
    // No eta: the step's own default (TCD's gamma 0.3), as the CLI without --eta.
    let eta = meta["eta"].as_f64().unwrap_or_else(|| boxed.default_eta());
    if meta["eta"].is_null() && class_name == "TCDScheduler" {
        assert_eq!(eta, 0.3);
    }

    let expected_timesteps = to_vec_f64(&tensors["timesteps"]);
    let timesteps = match mode {
        "strength" => {
            scheduler.set_timesteps(steps, original, strength).unwrap();
            if original.is_none() {
                boxed.set_timesteps_with_strength(steps, strength).unwrap();
            }
            scheduler.as_scheduler().timesteps().to_vec()
        }
        "begin_index" => {
            scheduler.set_timesteps(steps, original, 1.0).unwrap();
            boxed.set_timesteps(steps).unwrap();
            strength_timesteps(scheduler.as_scheduler(), steps, strength);
            strength_timesteps(boxed.as_mut(), steps, strength)
        }
        _ => {
            scheduler.set_timesteps(steps, original, 1.0).unwrap();
            if original.is_none() {
                boxed.set_timesteps(steps).unwrap();
            }
            scheduler.as_scheduler().timesteps().to_vec()
        }
    };
    assert_eq!(timesteps, expected_timesteps, "{name}: timesteps");
    let free_run = original.is_none();
    if free_run && mode != "begin_index" {
        assert_eq!(boxed.timesteps(), expected_timesteps.as_slice(), "{name}: timesteps of the boxed scheduler");
    }

    // The starting latents: noise, or for image-to-image the init latents noised to the
    // first timestep; then the same generator gives every step its noise.
    let mut generator = TorchGenerator::new(meta["seed"].as_u64().unwrap());
    let expected_sample = &tensors["sample_0"];
    let noise = generator.randn_tensor(expected_sample.dims(), &Device::Cpu).unwrap();
    let sample0 = match tensors.get("init") {
        Some(init) => boxed.add_noise(init, &noise, &timesteps[..1]).unwrap(),
        None => noise,
    };
    assert_close(&sample0, expected_sample, STEP_TOLERANCE, &format!("{name}: initial sample"));

    let mut free_generator = generator.clone();
    let mut sample = expected_sample.clone();
    let mut free_sample = sample0;
    for (i, &t) in timesteps.iter().enumerate() {
        let model_output = &tensors[&format!("model_output_{i}")];
        let out = scheduler.step(model_output, t, &sample, eta, &mut generator);
        let at = format!("{name}: step {i} (t={t})");
        assert_close(&out.denoised, &tensors[&format!("denoised_{i}")], STEP_TOLERANCE, &format!("{at}: denoised"));
        let expected = &tensors[&format!("prev_sample_{i}")];
        assert_close(&out.prev_sample, expected, STEP_TOLERANCE, &format!("{at}: prev sample"));
        sample = expected.clone();

        if free_run {
            let input = boxed.scale_model_input(&free_sample, t).unwrap();
            let output = dummy_model(&input, t);
            free_sample = boxed.step(&output, t, &free_sample, eta, &mut free_generator).unwrap();
            assert_close(&free_sample, expected, LOOP_TOLERANCE, &format!("{at}: free-running loop"));
        }
    }
}

/// tools/fixtures/lcm_tcd.py's stand-in model: 0.3 x + 0.7 sin(2 x + 0.01 t).
fn dummy_model(sample: &Tensor, t: f64) -> Tensor {
    let inner = sample.affine(2.0, 0.01 * t).unwrap().sin().unwrap();
    (sample.affine(0.3, 0.0).unwrap() + inner.affine(0.7, 0.0).unwrap()).unwrap()
}

fn run_loops(class_name: &str) {
    let mut names: Vec<String> = std::fs::read_dir(dir())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|f| f.strip_suffix(".safetensors").map(str::to_string))
        .filter(|n| read_json(&dir().join(format!("{n}.json")))["class_name"] == class_name)
        .collect();
    names.sort();
    assert!(names.len() >= 10, "{class_name}: {names:?}");
    for name in names {
        run_loop(&name);
    }
}

#[test]
fn lcm_timesteps() {
    run_timesteps("LCMScheduler");
}

#[test]
fn tcd_timesteps() {
    run_timesteps("TCDScheduler");
}

#[test]
fn lcm_loops() {
    run_loops("LCMScheduler");
}

#[test]
fn tcd_loops() {
    run_loops("TCDScheduler");
}

#[test]
fn more_steps_than_original_inference_steps_is_refused_through_the_cli_path() {
    let config = read_json(&dir().join("lcm_sd15_4.json"))["file_config"].as_object().unwrap().clone();
    let mut resolved = scheduler_from_config(config, Path::new("scheduler_config.json"), Some("lcm"), &[]).unwrap();
    let error = resolved.scheduler.set_timesteps(51).unwrap_err().to_string();
    assert!(error.contains("51 inference steps") && error.contains("original_inference_steps (50)"), "{error}");
    // A config key override raises the limit, as in diffusers.
    let config = read_json(&dir().join("lcm_sd15_4.json"))["file_config"].as_object().unwrap().clone();
    let overrides = [("original_inference_steps".to_string(), Value::from(100))];
    let mut resolved = scheduler_from_config(config, Path::new("scheduler_config.json"), Some("lcm"), &overrides).unwrap();
    resolved.scheduler.set_timesteps(51).unwrap();
}
