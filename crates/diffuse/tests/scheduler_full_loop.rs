//! diffusers' own full-loop scheduler tests (tests/schedulers/test_scheduler_{ddpm,ddim,
//! ddim_inverse,pndm}.py): a closed-form dummy model run through a whole sampling loop from a
//! deterministic sample, checked against diffusers' asserted `result_sum` / `result_mean` of
//! |sample| with diffusers' tolerances (1e-2 on the sum, 1e-3 on the mean).
//!
//! The dummy model and samples are those of diffusers' `SchedulerCommonTest`
//! (tests/schedulers/test_schedulers.py). Where diffusers passes `torch.manual_seed(0)` as the
//! generator, we pass `TorchGenerator::new(0)`, which draws the same numbers.

use candle_core::{Device, Tensor};
use diffuse::rng::TorchGenerator;
use diffuse::schedulers::ddim::DdimScheduler;
use diffuse::schedulers::ddim_inverse::DdimInverseScheduler;
use diffuse::schedulers::ddpm::DdpmScheduler;
use diffuse::schedulers::pndm::PndmScheduler;
use diffuse::schedulers::Scheduler;
use serde_json::{json, Map, Value};

const BATCH: usize = 4;
const CHANNELS: usize = 3;
const HEIGHT: usize = 8;
const WIDTH: usize = 8;

/// `torch.arange(n)` (reversed for the noise) laid out as (C, H, W, B), divided by n in f32, and
/// permuted to (B, C, H, W): `dummy_sample_deter` / `dummy_noise_deter`.
fn arange_deter(reversed: bool) -> Tensor {
    let n = BATCH * CHANNELS * HEIGHT * WIDTH;
    let mut values = vec![0f32; n];
    for b in 0..BATCH {
        for c in 0..CHANNELS {
            for h in 0..HEIGHT {
                for w in 0..WIDTH {
                    let source = ((c * HEIGHT + h) * WIDTH + w) * BATCH + b;
                    let value = if reversed { n - 1 - source } else { source };
                    values[((b * CHANNELS + c) * HEIGHT + h) * WIDTH + w] = value as f32 / n as f32;
                }
            }
        }
    }
    Tensor::from_vec(values, (BATCH, CHANNELS, HEIGHT, WIDTH), &Device::Cpu).unwrap()
}

fn dummy_sample_deter() -> Tensor {
    arange_deter(false)
}

fn dummy_noise_deter() -> Tensor {
    arange_deter(true)
}

/// `dummy_model`: `sample * t / (t + 1)` in f32 (a true division, as torch does).
fn dummy_model(sample: &Tensor, t: f64) -> Tensor {
    let t = t as f32;
    let denominator = Tensor::new(t + 1.0, &Device::Cpu).unwrap();
    (sample * t as f64).unwrap().broadcast_div(&denominator).unwrap()
}

fn config(base: Value, overrides: Value) -> Map<String, Value> {
    let mut map = base.as_object().unwrap().clone();
    map.extend(overrides.as_object().unwrap().clone());
    map
}

fn origin() -> std::path::PathBuf {
    std::path::PathBuf::from("scheduler_config.json")
}

/// Asserts diffusers' `result_sum` and `result_mean` of |sample|.
fn assert_result(sample: &Tensor, expected_sum: f64, expected_mean: f64, what: &str) {
    let abs = sample.abs().unwrap();
    let sum = abs.sum_all().unwrap().to_scalar::<f32>().unwrap() as f64;
    let mean = abs.mean_all().unwrap().to_scalar::<f32>().unwrap() as f64;
    assert!((sum - expected_sum).abs() < 1e-2, "{what}: result_sum {sum}, diffusers {expected_sum}");
    assert!((mean - expected_mean).abs() < 1e-3, "{what}: result_mean {mean}, diffusers {expected_mean}");
}

// ---- DDPM (test_scheduler_ddpm.py) ----

fn ddpm(overrides: Value) -> DdpmScheduler {
    let base = json!({
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "variance_type": "fixed_small",
        "clip_sample": true,
    });
    DdpmScheduler::from_config(&config(base, overrides), &origin()).unwrap()
}

/// Every training timestep, no `set_timesteps`, noise from `torch.manual_seed(0)`.
fn ddpm_full_loop(overrides: Value) -> Tensor {
    let mut scheduler = ddpm(overrides);
    let mut sample = dummy_sample_deter();
    let mut generator = TorchGenerator::new(0);
    for t in (0..1000).rev() {
        let residual = dummy_model(&sample, t as f64);
        sample = scheduler.step(&residual, t as f64, &sample, 0.0, &mut generator).unwrap();
    }
    sample
}

#[test]
fn ddpm_full_loop_no_noise() {
    assert_result(&ddpm_full_loop(json!({})), 258.9606, 0.3372, "DDPM");
}

#[test]
fn ddpm_full_loop_with_v_prediction() {
    assert_result(&ddpm_full_loop(json!({"prediction_type": "v_prediction"})), 202.0296, 0.2631, "DDPM v");
}

#[test]
fn ddpm_full_loop_with_noise() {
    let mut scheduler = ddpm(json!({}));
    let mut generator = TorchGenerator::new(0);
    // Without set_timesteps the timesteps are 999..=0; start two from the end.
    let t_start = 1000 - 2;
    let timesteps = scheduler.timesteps()[t_start * scheduler.order()..].to_vec();
    let mut sample = scheduler.add_noise(&dummy_sample_deter(), &dummy_noise_deter(), &timesteps[..1]).unwrap();
    for &t in &timesteps {
        let residual = dummy_model(&sample, t);
        sample = scheduler.step(&residual, t, &sample, 0.0, &mut generator).unwrap();
    }
    assert_result(&sample, 387.9466, 0.5051, "DDPM with noise");
}

// ---- DDIM (test_scheduler_ddim.py) ----

fn ddim_config(overrides: Value) -> Map<String, Value> {
    let base = json!({
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "clip_sample": true,
    });
    config(base, overrides)
}

/// 10 steps, eta 0 (no noise is drawn).
fn ddim_full_loop(overrides: Value) -> Tensor {
    let mut scheduler = DdimScheduler::from_config(&ddim_config(overrides), &origin()).unwrap();
    let mut generator = TorchGenerator::new(0);
    let mut sample = dummy_sample_deter();
    scheduler.set_timesteps(10).unwrap();
    for t in scheduler.timesteps().to_vec() {
        let residual = dummy_model(&sample, t);
        sample = scheduler.step(&residual, t, &sample, 0.0, &mut generator).unwrap();
    }
    sample
}

#[test]
fn ddim_full_loop_no_noise() {
    assert_result(&ddim_full_loop(json!({})), 172.0067, 0.223967, "DDIM");
}

#[test]
fn ddim_full_loop_with_v_prediction() {
    assert_result(&ddim_full_loop(json!({"prediction_type": "v_prediction"})), 52.5302, 0.0684, "DDIM v");
}

#[test]
fn ddim_full_loop_with_set_alpha_to_one() {
    // A different beta_start, so that the first alpha is 0.99.
    let sample = ddim_full_loop(json!({"set_alpha_to_one": true, "beta_start": 0.01}));
    assert_result(&sample, 149.8295, 0.1951, "DDIM set_alpha_to_one");
}

#[test]
fn ddim_full_loop_with_no_set_alpha_to_one() {
    let sample = ddim_full_loop(json!({"set_alpha_to_one": false, "beta_start": 0.01}));
    assert_result(&sample, 149.0784, 0.1941, "DDIM no set_alpha_to_one");
}

#[test]
fn ddim_full_loop_with_noise() {
    let mut scheduler = DdimScheduler::from_config(&ddim_config(json!({})), &origin()).unwrap();
    let mut generator = TorchGenerator::new(0);
    scheduler.set_timesteps(10).unwrap();
    let t_start = 8;
    let timesteps = scheduler.timesteps()[t_start * scheduler.order()..].to_vec();
    let mut sample = scheduler.add_noise(&dummy_sample_deter(), &dummy_noise_deter(), &timesteps[..1]).unwrap();
    for &t in &timesteps {
        let residual = dummy_model(&sample, t);
        sample = scheduler.step(&residual, t, &sample, 0.0, &mut generator).unwrap();
    }
    assert_result(&sample, 354.5418, 0.4616, "DDIM with noise");
}

// ---- DDIM inverse (test_scheduler_ddim_inverse.py) ----
//
// diffusers' test passes eta as a 4th positional argument, which `DDIMInverseScheduler.step`
// (model_output, timestep, sample, return_dict) takes as `return_dict`; the asserted values are
// those of the plain step, which is what we run (checked against diffusers 0.42.1).

fn ddim_inverse_full_loop(overrides: Value) -> Tensor {
    let mut scheduler = DdimInverseScheduler::from_config(&ddim_config(overrides), &origin()).unwrap();
    let mut generator = TorchGenerator::new(0);
    let mut sample = dummy_sample_deter();
    scheduler.set_timesteps(10).unwrap();
    for t in scheduler.timesteps().to_vec() {
        let residual = dummy_model(&sample, t);
        sample = scheduler.step(&residual, t, &sample, 0.0, &mut generator).unwrap();
    }
    sample
}

#[test]
fn ddim_inverse_full_loop_no_noise() {
    assert_result(&ddim_inverse_full_loop(json!({})), 671.6816, 0.8746, "DDIM inverse");
}

#[test]
fn ddim_inverse_full_loop_with_v_prediction() {
    let sample = ddim_inverse_full_loop(json!({"prediction_type": "v_prediction"}));
    assert_result(&sample, 1394.2185, 1.8154, "DDIM inverse v");
}

#[test]
fn ddim_inverse_full_loop_with_set_alpha_to_one() {
    let sample = ddim_inverse_full_loop(json!({"set_alpha_to_one": true, "beta_start": 0.01}));
    assert_result(&sample, 539.9622, 0.7031, "DDIM inverse set_alpha_to_one");
}

#[test]
fn ddim_inverse_full_loop_with_no_set_alpha_to_one() {
    let sample = ddim_inverse_full_loop(json!({"set_alpha_to_one": false, "beta_start": 0.01}));
    assert_result(&sample, 542.6722, 0.7066, "DDIM inverse no set_alpha_to_one");
}

// ---- PNDM (test_scheduler_pndm.py) ----

/// 10 steps: the Runge-Kutta warm-up on `prk_timesteps`, then PLMS on `plms_timesteps`.
fn pndm_full_loop(overrides: Value) -> Tensor {
    let base = json!({
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
    });
    let mut scheduler = PndmScheduler::from_config(&config(base, overrides), &origin()).unwrap();
    let mut sample = dummy_sample_deter();
    scheduler.set_timesteps(10).unwrap();
    for t in scheduler.prk_timesteps().to_vec() {
        let residual = dummy_model(&sample, t as f64);
        sample = scheduler.step_prk(&residual, t, &sample).unwrap();
    }
    for t in scheduler.plms_timesteps().to_vec() {
        let residual = dummy_model(&sample, t as f64);
        sample = scheduler.step_plms(&residual, t, &sample).unwrap();
    }
    sample
}

#[test]
fn pndm_full_loop_no_noise() {
    assert_result(&pndm_full_loop(json!({})), 198.1318, 0.2580, "PNDM");
}

#[test]
fn pndm_full_loop_with_v_prediction() {
    assert_result(&pndm_full_loop(json!({"prediction_type": "v_prediction"})), 67.3986, 0.0878, "PNDM v");
}

#[test]
fn pndm_full_loop_with_set_alpha_to_one() {
    let sample = pndm_full_loop(json!({"set_alpha_to_one": true, "beta_start": 0.01}));
    assert_result(&sample, 230.0399, 0.2995, "PNDM set_alpha_to_one");
}

#[test]
fn pndm_full_loop_with_no_set_alpha_to_one() {
    let sample = pndm_full_loop(json!({"set_alpha_to_one": false, "beta_start": 0.01}));
    assert_result(&sample, 186.9482, 0.2434, "PNDM no set_alpha_to_one");
}

/// The same loop through the `Scheduler` trait (the pipeline's path): `step` switches from PRK
/// to PLMS by itself.
#[test]
fn pndm_full_loop_through_trait_step() {
    let base = json!({"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"});
    let mut scheduler = PndmScheduler::from_config(&config(base, json!({})), &origin()).unwrap();
    let mut generator = TorchGenerator::new(0);
    let mut sample = dummy_sample_deter();
    scheduler.set_timesteps(10).unwrap();
    for t in scheduler.timesteps().to_vec() {
        let residual = dummy_model(&sample, t);
        sample = scheduler.step(&residual, t, &sample, 0.0, &mut generator).unwrap();
    }
    assert_result(&sample, 198.1318, 0.2580, "PNDM via Scheduler::step");
}
