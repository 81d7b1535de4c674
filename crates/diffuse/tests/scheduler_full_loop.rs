//! diffusers' own full-loop scheduler tests (tests/schedulers/test_scheduler_*.py): a
//! closed-form dummy model run through a whole sampling loop from a deterministic sample,
//! checked against diffusers' asserted `result_sum` / `result_mean` of |sample| with
//! diffusers' tolerances (1e-2 on the sum, 1e-3 on the mean unless it says otherwise). Where
//! those bounds cannot tell results apart (near zero) or diffusers only checks for NaN, the
//! values diffusers 0.42.1 (torch 2.15, CPU) gives for the same loop are checked too, to 1e-5
//! relative (tools/fixtures/multistep_full_loops.py for DPM-Solver and UniPC).
//!
//! The dummy model and samples are those of diffusers' `SchedulerCommonTest`
//! (tests/schedulers/test_schedulers.py). Where diffusers passes `torch.manual_seed(0)` as the
//! generator, we pass `TorchGenerator::new(0)`, which draws the same numbers.

use candle_core::{DType, Device, Tensor};
use diffuse::rng::TorchGenerator;
use diffuse::schedulers::euler_discrete::{Churn, EulerDiscreteScheduler};
use diffuse::schedulers::pndm::PndmScheduler;
use diffuse::schedulers::Scheduler;
use serde_json::{json, Map, Value};

/// The shape of `dummy_sample_deter`: (batch, channels, height, width).
const SAMPLE_2D: &[usize] = &[4, 3, 8, 8];
/// UniPC's 1-D variant.
const SAMPLE_1D: &[usize] = &[4, 3, 8];

/// `torch.arange(n)` (reversed for the noise) laid out as (rest..., batch), divided by n in
/// float32 and permuted to (batch, rest...): `dummy_sample_deter` / `dummy_noise_deter`.
fn deterministic(shape: &[usize], reversed: bool) -> Tensor {
    let n: usize = shape.iter().product();
    let batch = shape[0];
    let mut values = vec![0f32; n];
    for (position, value) in values.iter_mut().enumerate() {
        // position = b * rest + r in (batch, rest...) order; arange index = r * batch + b.
        let (b, r) = (position / (n / batch), position % (n / batch));
        let index = r * batch + b;
        let index = if reversed { n - 1 - index } else { index };
        *value = index as f32 / n as f32;
    }
    Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
}

fn dummy_sample_deter() -> Tensor {
    deterministic(SAMPLE_2D, false)
}

/// `dummy_model`: `sample * t / (t + 1)`, with t cast to the sample's dtype (and a true
/// division, as torch does).
fn dummy_model(sample: &Tensor, t: f64) -> Tensor {
    let t = t as f32;
    let t_plus_one = Tensor::new(t + 1.0, &Device::Cpu).unwrap().to_dtype(sample.dtype()).unwrap();
    sample.affine(t as f64, 0.0).unwrap().broadcast_div(&t_plus_one).unwrap()
}

/// A scheduler of diffusers class `class_name` from the test's config `base` with `overrides`.
fn scheduler(class_name: &str, base: Value, overrides: Value) -> Box<dyn Scheduler> {
    diffuse::schedulers::from_config(class_name, &config(base, overrides), "scheduler_config.json".as_ref()).unwrap()
}

fn config(base: Value, overrides: Value) -> Map<String, Value> {
    let mut map = base.as_object().unwrap().clone();
    map.extend(overrides.as_object().unwrap().clone());
    map
}

/// The loop of diffusers' `full_loop` / `test_full_loop_*`: `set_timesteps` (unless
/// `num_inference_steps` is `None`: then every training timestep, as DDPM's test runs), the
/// sample scaled by `init_noise_sigma`, and per timestep `scale_model_input`, the dummy model
/// and `step` (given the scaled sample, as there). With `t_start`, `test_full_loop_with_noise`:
/// only the timesteps from `t_start * order` on, from the sample noised to the first of them.
fn run_loop(
    scheduler: &mut dyn Scheduler,
    num_inference_steps: Option<usize>,
    sample: Tensor,
    t_start: Option<usize>,
) -> Tensor {
    if let Some(steps) = num_inference_steps {
        scheduler.set_timesteps(steps).unwrap();
    }
    let mut generator = TorchGenerator::new(0);
    let mut sample = (sample * scheduler.init_noise_sigma()).unwrap();
    let mut timesteps = scheduler.timesteps().to_vec();
    if let Some(t_start) = t_start {
        timesteps = timesteps[t_start * scheduler.order()..].to_vec();
        let noise = deterministic(sample.dims(), true);
        sample = scheduler.add_noise(&sample, &noise, &timesteps[..1]).unwrap();
    }
    for &t in &timesteps {
        sample = scheduler.scale_model_input(&sample, t).unwrap();
        let model_output = dummy_model(&sample, t);
        sample = scheduler.step(&model_output, t, &sample, 0.0, &mut generator).unwrap();
    }
    sample
}

fn full_loop(scheduler: &mut dyn Scheduler, num_inference_steps: usize) -> Tensor {
    run_loop(scheduler, Some(num_inference_steps), dummy_sample_deter(), None)
}

fn full_loop_with_noise(scheduler: &mut dyn Scheduler, num_inference_steps: usize, t_start: usize) -> Tensor {
    run_loop(scheduler, Some(num_inference_steps), dummy_sample_deter(), Some(t_start))
}

/// sum(|x|) and mean(|x|) in f64.
fn abs_sum_and_mean(sample: &Tensor) -> (f64, f64) {
    let values = sample.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let sum: f64 = values.iter().map(|v| v.abs()).sum();
    (sum, sum / values.len() as f64)
}

/// diffusers' assertions on `result_sum` and `result_mean`, with its tolerances on each.
fn assert_result_within(sample: &Tensor, expected: (f64, f64), tolerances: (f64, f64), what: &str) {
    let (sum, mean) = abs_sum_and_mean(sample);
    assert!((sum - expected.0).abs() < tolerances.0, "{what}: result_sum {sum}, diffusers {}", expected.0);
    assert!((mean - expected.1).abs() < tolerances.1, "{what}: result_mean {mean}, diffusers {}", expected.1);
}

/// diffusers' assertions with its usual tolerances, 1e-2 on the sum and 1e-3 on the mean.
fn assert_result(sample: &Tensor, expected: (f64, f64), what: &str) {
    assert_result_within(sample, expected, (1e-2, 1e-3), what);
}

/// Where diffusers asserts only the mean (to 1e-3).
fn assert_mean(sample: &Tensor, expected: f64, what: &str) {
    let (_, mean) = abs_sum_and_mean(sample);
    assert!((mean - expected).abs() < 1e-3, "{what}: result_mean {mean}, diffusers {expected}");
}

/// Agreement to 1e-5 relative with the sum and mean diffusers 0.42.1 gives for the same loop.
fn assert_exact(sample: &Tensor, exact: (f64, f64), what: &str) {
    let (sum, mean) = abs_sum_and_mean(sample);
    assert!((sum - exact.0).abs() <= 1e-5 * exact.0, "{what}: result_sum {sum} != {} (diffusers 0.42.1)", exact.0);
    assert!((mean - exact.1).abs() <= 1e-5 * exact.1, "{what}: result_mean {mean} != {} (diffusers 0.42.1)", exact.1);
}

/// diffusers' assertions, then agreement with diffusers 0.42.1's exact values.
fn check(sample: &Tensor, expected: (f64, f64), exact: (f64, f64), what: &str) {
    assert_result(sample, expected, what);
    assert_exact(sample, exact, what);
}

// ---- DDPM (test_scheduler_ddpm.py) ----

fn ddpm(overrides: Value) -> Box<dyn Scheduler> {
    let base = json!({
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "variance_type": "fixed_small",
        "clip_sample": true,
    });
    scheduler("DDPMScheduler", base, overrides)
}

/// Every training timestep, no `set_timesteps`, noise from `torch.manual_seed(0)`.
fn ddpm_full_loop(overrides: Value) -> Tensor {
    run_loop(&mut *ddpm(overrides), None, dummy_sample_deter(), None)
}

#[test]
fn ddpm_full_loop_no_noise() {
    assert_result(&ddpm_full_loop(json!({})), (258.9606, 0.3372), "DDPM");
}

#[test]
fn ddpm_full_loop_with_v_prediction() {
    assert_result(&ddpm_full_loop(json!({"prediction_type": "v_prediction"})), (202.0296, 0.2631), "DDPM v");
}

#[test]
fn ddpm_full_loop_with_noise() {
    // Without set_timesteps the timesteps are 999..=0; start two from the end.
    let sample = run_loop(&mut *ddpm(json!({})), None, dummy_sample_deter(), Some(1000 - 2));
    assert_result(&sample, (387.9466, 0.5051), "DDPM with noise");
}

// ---- DDIM (test_scheduler_ddim.py) ----

fn ddim_config() -> Value {
    json!({
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "clip_sample": true,
    })
}

/// 10 steps, eta 0 (no noise is drawn).
fn ddim_full_loop(overrides: Value) -> Tensor {
    full_loop(&mut *scheduler("DDIMScheduler", ddim_config(), overrides), 10)
}

#[test]
fn ddim_full_loop_no_noise() {
    assert_result(&ddim_full_loop(json!({})), (172.0067, 0.223967), "DDIM");
}

#[test]
fn ddim_full_loop_with_v_prediction() {
    assert_result(&ddim_full_loop(json!({"prediction_type": "v_prediction"})), (52.5302, 0.0684), "DDIM v");
}

#[test]
fn ddim_full_loop_with_set_alpha_to_one() {
    // A different beta_start, so that the first alpha is 0.99.
    let sample = ddim_full_loop(json!({"set_alpha_to_one": true, "beta_start": 0.01}));
    assert_result(&sample, (149.8295, 0.1951), "DDIM set_alpha_to_one");
}

#[test]
fn ddim_full_loop_with_no_set_alpha_to_one() {
    let sample = ddim_full_loop(json!({"set_alpha_to_one": false, "beta_start": 0.01}));
    assert_result(&sample, (149.0784, 0.1941), "DDIM no set_alpha_to_one");
}

#[test]
fn ddim_full_loop_with_noise() {
    let sample = full_loop_with_noise(&mut *scheduler("DDIMScheduler", ddim_config(), json!({})), 10, 8);
    assert_result(&sample, (354.5418, 0.4616), "DDIM with noise");
}

// ---- DDIM inverse (test_scheduler_ddim_inverse.py) ----
//
// diffusers' test passes eta as a 4th positional argument, which `DDIMInverseScheduler.step`
// (model_output, timestep, sample, return_dict) takes as `return_dict`; the asserted values are
// those of the plain step, which is what we run (checked against diffusers 0.42.1).

fn ddim_inverse_full_loop(overrides: Value) -> Tensor {
    full_loop(&mut *scheduler("DDIMInverseScheduler", ddim_config(), overrides), 10)
}

#[test]
fn ddim_inverse_full_loop_no_noise() {
    assert_result(&ddim_inverse_full_loop(json!({})), (671.6816, 0.8746), "DDIM inverse");
}

#[test]
fn ddim_inverse_full_loop_with_v_prediction() {
    let sample = ddim_inverse_full_loop(json!({"prediction_type": "v_prediction"}));
    assert_result(&sample, (1394.2185, 1.8154), "DDIM inverse v");
}

#[test]
fn ddim_inverse_full_loop_with_set_alpha_to_one() {
    let sample = ddim_inverse_full_loop(json!({"set_alpha_to_one": true, "beta_start": 0.01}));
    assert_result(&sample, (539.9622, 0.7031), "DDIM inverse set_alpha_to_one");
}

#[test]
fn ddim_inverse_full_loop_with_no_set_alpha_to_one() {
    let sample = ddim_inverse_full_loop(json!({"set_alpha_to_one": false, "beta_start": 0.01}));
    assert_result(&sample, (542.6722, 0.7066), "DDIM inverse no set_alpha_to_one");
}

// ---- PNDM (test_scheduler_pndm.py) ----

fn pndm_config() -> Value {
    json!({"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"})
}

/// 10 steps: the Runge-Kutta warm-up on `prk_timesteps`, then PLMS on `plms_timesteps`.
fn pndm_full_loop(overrides: Value) -> Tensor {
    let mut scheduler =
        PndmScheduler::from_config(&config(pndm_config(), overrides), "scheduler_config.json".as_ref()).unwrap();
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
    assert_result(&pndm_full_loop(json!({})), (198.1318, 0.2580), "PNDM");
}

#[test]
fn pndm_full_loop_with_v_prediction() {
    assert_result(&pndm_full_loop(json!({"prediction_type": "v_prediction"})), (67.3986, 0.0878), "PNDM v");
}

#[test]
fn pndm_full_loop_with_set_alpha_to_one() {
    let sample = pndm_full_loop(json!({"set_alpha_to_one": true, "beta_start": 0.01}));
    assert_result(&sample, (230.0399, 0.2995), "PNDM set_alpha_to_one");
}

#[test]
fn pndm_full_loop_with_no_set_alpha_to_one() {
    let sample = pndm_full_loop(json!({"set_alpha_to_one": false, "beta_start": 0.01}));
    assert_result(&sample, (186.9482, 0.2434), "PNDM no set_alpha_to_one");
}

/// The same loop through the `Scheduler` trait (the pipeline's path): `step` switches from PRK
/// to PLMS by itself.
#[test]
fn pndm_full_loop_through_trait_step() {
    let sample = full_loop(&mut *scheduler("PNDMScheduler", pndm_config(), json!({})), 10);
    assert_result(&sample, (198.1318, 0.2580), "PNDM via Scheduler::step");
}

// ---- The sigma schedulers (test_scheduler_{lms,euler,euler_ancestral,heun}.py) ----
//
// `test_full_loop_device` is `test_full_loop_no_noise` on the CPU; `test_full_loop_with_noise`
// starts two steps from the end.

fn sigma_config() -> Value {
    json!({"num_train_timesteps": 1100, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"})
}

fn lms(overrides: Value) -> Box<dyn Scheduler> {
    scheduler("LMSDiscreteScheduler", sigma_config(), overrides)
}

#[test]
fn lms_full_loop_no_noise() {
    let sample = full_loop(&mut *lms(json!({})), 10);
    check(&sample, (1006.388, 1.31), (1006.3880615234375, 1.3104010820388794), "LMS");
}

#[test]
fn lms_full_loop_with_v_prediction() {
    let sample = full_loop(&mut *lms(json!({"prediction_type": "v_prediction"})), 10);
    check(&sample, (0.0017, 2.2676e-06), (0.0017415338661521673, 2.267622221552301e-06), "LMS v");
}

#[test]
fn lms_full_loop_device_karras_sigmas() {
    let sample = full_loop(&mut *lms(json!({"use_karras_sigmas": true})), 10);
    assert_result_within(&sample, (3812.9927, 4.9648), (2e-2, 1e-3), "LMS karras");
    assert_exact(&sample, (3812.992919921875, 4.964834690093994), "LMS karras");
}

#[test]
fn lms_full_loop_with_noise() {
    let sample = full_loop_with_noise(&mut *lms(json!({})), 10, 8);
    check(&sample, (27663.6895, 36.0204), (27663.689453125, 36.02042770385742), "LMS with noise");
}

fn euler(overrides: Value) -> Box<dyn Scheduler> {
    scheduler("EulerDiscreteScheduler", sigma_config(), overrides)
}

#[test]
fn euler_full_loop_no_noise() {
    let sample = full_loop(&mut *euler(json!({})), 10);
    check(&sample, (10.0807, 0.0131), (10.080682754516602, 0.013125889003276825), "Euler");
}

#[test]
fn euler_full_loop_with_v_prediction() {
    let sample = full_loop(&mut *euler(json!({"prediction_type": "v_prediction"})), 10);
    check(&sample, (0.0002, 2.2676e-06), (2.4181501245834625e-10, 3.148632884367869e-13), "Euler v");
}

#[test]
fn euler_full_loop_device_karras_sigmas() {
    let sample = full_loop(&mut *euler(json!({"use_karras_sigmas": true})), 10);
    let expected = (124.52299499511719, 0.16213932633399963);
    check(&sample, expected, (124.52259826660156, 0.16213880479335785), "Euler karras");
}

#[test]
fn euler_full_loop_with_noise() {
    let sample = full_loop_with_noise(&mut *euler(json!({})), 10, 8);
    check(&sample, (57062.9297, 74.3007), (57062.9296875, 74.30068969726562), "Euler with noise");
}

#[test]
fn euler_churn_draws_noise_only_where_gamma_is_positive() {
    // diffusers 0.42.1: the no-noise loop with step(..., s_churn=1.0, s_tmin=0.5,
    // s_tmax=20.0, s_noise=1.003, generator=torch.Generator().manual_seed(0)); 5 of the 10
    // sigmas are in [0.5, 20]. Then torch.randn(3, generator=g) shows where the stream is.
    let origin = "scheduler_config.json".as_ref();
    let mut euler = EulerDiscreteScheduler::from_config(&config(sigma_config(), json!({})), origin).unwrap();
    euler.set_timesteps(10).unwrap();
    let churn = Churn { s_churn: 1.0, s_tmin: 0.5, s_tmax: 20.0, s_noise: 1.003 };
    let mut generator = TorchGenerator::new(0);
    let mut sample = (dummy_sample_deter() * euler.init_noise_sigma()).unwrap();
    for t in euler.timesteps().to_vec() {
        sample = euler.scale_model_input(&sample, t).unwrap();
        let model_output = dummy_model(&sample, t);
        sample = euler.step_with_churn(&model_output, t, &sample, churn, &mut generator).unwrap();
    }
    let (sum, _) = abs_sum_and_mean(&sample);
    assert!((sum - 164.2066650390625).abs() <= 1e-5 * 164.2066650390625, "result_sum {sum}");
    assert_eq!(generator.randn(3), vec![-0.5145536661148071, 0.2027513086795807, 0.8091323375701904]);
}

/// The noise comes from `torch.manual_seed(0)`, i.e. `TorchGenerator::new(0)`.
fn euler_ancestral(overrides: Value) -> Box<dyn Scheduler> {
    scheduler("EulerAncestralDiscreteScheduler", sigma_config(), overrides)
}

#[test]
fn euler_ancestral_full_loop_no_noise() {
    let sample = full_loop(&mut *euler_ancestral(json!({})), 10);
    check(&sample, (152.3192, 0.1983), (152.3192901611328, 0.19833241403102875), "Euler ancestral");
}

#[test]
fn euler_ancestral_full_loop_with_v_prediction() {
    let sample = full_loop(&mut *euler_ancestral(json!({"prediction_type": "v_prediction"})), 10);
    check(&sample, (108.4439, 0.1412), (108.44389343261719, 0.14120298624038696), "Euler ancestral v");
}

#[test]
fn euler_ancestral_full_loop_with_noise() {
    let sample = full_loop_with_noise(&mut *euler_ancestral(json!({})), 10, 8);
    check(&sample, (56163.0508, 73.1290), (56163.05078125, 73.12897491455078), "Euler ancestral with noise");
}

fn heun(overrides: Value) -> Box<dyn Scheduler> {
    scheduler("HeunDiscreteScheduler", sigma_config(), overrides)
}

#[test]
fn heun_full_loop_no_noise() {
    let sample = full_loop(&mut *heun(json!({})), 10);
    check(&sample, (0.1233, 0.0002), (0.1233307421207428, 0.00016058690380305052), "Heun");
}

#[test]
fn heun_full_loop_with_v_prediction() {
    let sample = full_loop(&mut *heun(json!({"prediction_type": "v_prediction"})), 10);
    check(&sample, (4.6934e-07, 6.1112e-10), (4.923867322759179e-07, 6.411285391472177e-10), "Heun v");
}

#[test]
fn heun_full_loop_device_karras_sigmas() {
    let sample = full_loop(&mut *heun(json!({"use_karras_sigmas": true})), 10);
    assert_result_within(&sample, (0.00015, 1.9869554535034695e-07), (1e-2, 1e-2), "Heun karras");
    assert_exact(&sample, (0.00015259823703672737, 1.9869561640462052e-07), "Heun karras");
}

#[test]
fn heun_full_loop_with_noise() {
    let sample = full_loop_with_noise(&mut *heun(json!({})), 10, 8);
    check(&sample, (75074.8906, 97.7538), (75074.890625, 97.7537612915039), "Heun with noise");
}

// ---- DPM-Solver multistep (test_scheduler_dpm_multi.py, DPMSolverMultistepSchedulerTest) ----

fn dpm_solver(overrides: Value) -> Box<dyn Scheduler> {
    let base = json!({
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "solver_order": 2,
        "prediction_type": "epsilon",
        "thresholding": false,
        "sample_max_value": 1.0,
        "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint",
        "lower_order_final": false,
        "euler_at_final": false,
        "variance_type": null,
        "final_sigmas_type": "sigma_min",
    });
    scheduler("DPMSolverMultistepScheduler", base, overrides)
}

fn dpm_solver_full_loop(overrides: Value) -> Tensor {
    full_loop(&mut *dpm_solver(overrides), 10)
}

#[test]
fn dpm_solver_full_loop_no_noise() {
    assert_mean(&dpm_solver_full_loop(json!({})), 0.3301, "DPM-Solver");
}

#[test]
fn dpm_solver_full_loop_with_noise() {
    let sample = full_loop_with_noise(&mut *dpm_solver(json!({})), 10, 5);
    assert_result(&sample, (318.4111, 0.4146), "DPM-Solver with noise");
}

#[test]
fn dpm_solver_full_loop_no_noise_thres() {
    let overrides = json!({"thresholding": true, "dynamic_thresholding_ratio": 0.87, "sample_max_value": 0.5});
    let sample = dpm_solver_full_loop(overrides);
    assert_mean(&sample, 1.1364, "DPM-Solver thresholding");
}

#[test]
fn dpm_solver_full_loop_with_v_prediction() {
    assert_mean(&dpm_solver_full_loop(json!({"prediction_type": "v_prediction"})), 0.2251, "DPM-Solver v");
}

#[test]
fn dpm_solver_full_loop_with_karras_and_v_prediction() {
    let sample = dpm_solver_full_loop(json!({"prediction_type": "v_prediction", "use_karras_sigmas": true}));
    assert_mean(&sample, 0.2096, "DPM-Solver karras v");
}

#[test]
fn dpm_solver_full_loop_with_lu_and_v_prediction() {
    let sample = dpm_solver_full_loop(json!({"prediction_type": "v_prediction", "use_lu_lambdas": true}));
    assert_mean(&sample, 0.1554, "DPM-Solver Lu v");
}

#[test]
fn dpm_solver_switch_from_other_multistep_configs() {
    // test_switch passes the config through DPMSolverSinglestep, UniPC and DEIS; what
    // reaches DPM-Solver from them is their solver/algorithm names, which map back.
    for overrides in [json!({"solver_type": "bh2"}), json!({"solver_type": "logrho", "algorithm_type": "deis"})] {
        assert_mean(&dpm_solver_full_loop(overrides.clone()), 0.3301, &format!("DPM-Solver from {overrides}"));
    }
}

#[test]
fn dpm_solver_solver_order_and_type() {
    // (algorithm, solver type, order, prediction, mean |x|, sum |x|) from diffusers 0.42.1.
    let cases: &[(&str, &str, usize, &str, f64, f64)] = &[
        ("dpmsolver", "midpoint", 1, "epsilon", 0.224302366, 172.264221),
        ("dpmsolver", "midpoint", 1, "sample", 0.882301986, 677.60791),
        ("dpmsolver", "midpoint", 2, "epsilon", 0.291127712, 223.58609),
        ("dpmsolver", "midpoint", 2, "sample", 1.02012789, 783.458252),
        ("dpmsolver", "midpoint", 3, "epsilon", 0.266911775, 204.988251),
        ("dpmsolver", "midpoint", 3, "sample", 0.978390276, 751.403748),
        ("dpmsolver", "heun", 2, "epsilon", 0.26510945, 203.60405),
        ("dpmsolver", "heun", 2, "sample", 0.973665476, 747.775085),
        ("dpmsolver", "heun", 3, "epsilon", 0.266938716, 205.008942),
        ("dpmsolver", "heun", 3, "sample", 0.978381217, 751.39679),
        ("dpmsolver++", "midpoint", 1, "epsilon", 0.224302292, 172.26416),
        ("dpmsolver++", "midpoint", 1, "sample", 0.882301748, 677.607727),
        ("dpmsolver++", "midpoint", 2, "sample", 1.10292089, 847.043213),
        ("dpmsolver++", "midpoint", 3, "epsilon", 0.23042345, 176.96521),
        ("dpmsolver++", "midpoint", 3, "sample", 0.889741361, 683.32135),
        ("dpmsolver++", "heun", 2, "epsilon", 0.380375296, 292.128235),
        ("dpmsolver++", "heun", 2, "sample", 1.20224881, 923.327087),
        ("dpmsolver++", "heun", 3, "epsilon", 0.230395481, 176.943726),
        ("dpmsolver++", "heun", 3, "sample", 0.889753819, 683.330933),
        ("sde-dpmsolver", "midpoint", 1, "epsilon", 0.370003074, 284.162354),
        ("sde-dpmsolver", "midpoint", 1, "sample", 1.24272692, 954.414307),
        ("sde-dpmsolver", "midpoint", 2, "epsilon", 6.53053856, 5015.45361),
        ("sde-dpmsolver", "midpoint", 2, "sample", 1.39002001, 1067.5354),
        ("sde-dpmsolver", "heun", 2, "epsilon", 1.71210039, 1314.89307),
        ("sde-dpmsolver", "heun", 2, "sample", 1.27989578, 982.959961),
        ("sde-dpmsolver++", "midpoint", 1, "epsilon", 0.303224832, 232.876663),
        ("sde-dpmsolver++", "midpoint", 1, "sample", 1.03847671, 797.55011),
        ("sde-dpmsolver++", "midpoint", 2, "epsilon", 0.68482846, 525.948242),
        ("sde-dpmsolver++", "midpoint", 2, "sample", 1.6966635, 1303.0376),
        ("sde-dpmsolver++", "heun", 2, "epsilon", 1.00881112, 774.766907),
        ("sde-dpmsolver++", "heun", 2, "sample", 2.32857132, 1788.34277),
    ];
    for &(algorithm, solver_type, order, prediction, expected_mean, expected_sum) in cases {
        let sample = dpm_solver_full_loop(json!({
            "algorithm_type": algorithm, "solver_type": solver_type,
            "solver_order": order, "prediction_type": prediction,
        }));
        let what = format!("{algorithm} {solver_type} order {order} {prediction}");
        assert_exact(&sample, (expected_sum, expected_mean), &what);
    }
}

#[test]
fn dpm_solver_fp16_support() {
    let mut scheduler = dpm_solver(json!({"thresholding": true, "dynamic_thresholding_ratio": 0}));
    let sample = dummy_sample_deter().to_dtype(DType::F16).unwrap();
    let sample = run_loop(&mut *scheduler, Some(10), sample, None);
    assert_eq!(sample.dtype(), DType::F16);
}

// ---- UniPC (test_scheduler_unipc.py, UniPCMultistepSchedulerTest and its 1-D variant) ----
//
// UniPC draws no noise.

fn unipc(overrides: Value) -> Box<dyn Scheduler> {
    let base = json!({
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "solver_order": 2,
        "solver_type": "bh2",
        "final_sigmas_type": "sigma_min",
    });
    scheduler("UniPCMultistepScheduler", base, overrides)
}

fn unipc_full_loop(shape: &[usize], overrides: Value) -> Tensor {
    run_loop(&mut *unipc(overrides), Some(10), deterministic(shape, false), None)
}

#[test]
fn unipc_full_loop_no_noise() {
    assert_mean(&unipc_full_loop(SAMPLE_2D, json!({})), 0.2464, "UniPC");
}

#[test]
fn unipc_full_loop_with_karras() {
    assert_mean(&unipc_full_loop(SAMPLE_2D, json!({"use_karras_sigmas": true})), 0.2925, "UniPC karras");
}

#[test]
fn unipc_full_loop_with_v_prediction() {
    assert_mean(&unipc_full_loop(SAMPLE_2D, json!({"prediction_type": "v_prediction"})), 0.1014, "UniPC v");
}

#[test]
fn unipc_full_loop_with_karras_and_v_prediction() {
    let sample = unipc_full_loop(SAMPLE_2D, json!({"prediction_type": "v_prediction", "use_karras_sigmas": true}));
    assert_mean(&sample, 0.1966, "UniPC karras v");
}

#[test]
fn unipc_full_loop_with_noise_2d() {
    // Noised to timestep 8 of 10, then denoised.
    let sample = run_loop(&mut *unipc(json!({})), Some(10), deterministic(SAMPLE_2D, false), Some(8));
    assert_result(&sample, (315.5757, 0.4109), "UniPC with noise");
}

#[test]
fn unipc_full_loop_1d() {
    assert_mean(&unipc_full_loop(SAMPLE_1D, json!({})), 0.2441, "UniPC 1-D");
    assert_mean(&unipc_full_loop(SAMPLE_1D, json!({"use_karras_sigmas": true})), 0.2898, "UniPC 1-D karras");
    let sample = unipc_full_loop(SAMPLE_1D, json!({"prediction_type": "v_prediction"}));
    assert_mean(&sample, 0.1014, "UniPC 1-D v");
    let sample = unipc_full_loop(SAMPLE_1D, json!({"prediction_type": "v_prediction", "use_karras_sigmas": true}));
    assert_mean(&sample, 0.1944, "UniPC 1-D karras v");
}

#[test]
fn unipc_full_loop_with_noise_1d() {
    let sample = run_loop(&mut *unipc(json!({})), Some(10), deterministic(SAMPLE_1D, false), Some(8));
    assert_result(&sample, (39.0870, 0.4072), "UniPC 1-D with noise");
}

#[test]
fn unipc_switch_from_other_multistep_configs() {
    // test_switch passes the config through DPM-Solver, DPMSolverSinglestep and DEIS; what
    // reaches UniPC from them is their solver names, which map to bh2.
    for solver_type in ["midpoint", "logrho"] {
        let sample = unipc_full_loop(SAMPLE_2D, json!({"solver_type": solver_type}));
        assert_mean(&sample, 0.2464, &format!("UniPC from {solver_type}"));
    }
}

#[test]
fn unipc_solver_order_and_type() {
    // (solver type, order, prediction, mean |x|, sum |x|) from diffusers 0.42.1.
    let cases: &[(&str, usize, &str, f64, f64)] = &[
        ("bh1", 1, "epsilon", 0.234811053, 180.334885),
        ("bh1", 1, "sample", 0.920928538, 707.273132),
        ("bh1", 2, "epsilon", 0.252051502, 193.575546),
        ("bh1", 2, "sample", 0.977219284, 750.504395),
        ("bh1", 3, "epsilon", 0.252083451, 193.600098),
        ("bh1", 3, "sample", 0.977377474, 750.625916),
        ("bh2", 1, "epsilon", 0.232373059, 178.462509),
        ("bh2", 1, "sample", 0.911411822, 699.964294),
        ("bh2", 2, "epsilon", 0.246395633, 189.231842),
        ("bh2", 2, "sample", 0.958283246, 735.961548),
        ("bh2", 3, "epsilon", 0.247360572, 189.972916),
        ("bh2", 3, "sample", 0.964490891, 740.729004),
    ];
    for &(solver_type, order, prediction, expected_mean, expected_sum) in cases {
        let overrides = json!({"solver_type": solver_type, "solver_order": order, "prediction_type": prediction});
        let sample = unipc_full_loop(SAMPLE_2D, overrides);
        assert_exact(&sample, (expected_sum, expected_mean), &format!("{solver_type} order {order} {prediction}"));
    }
}

#[test]
fn unipc_fp16_support() {
    for order in [1, 2, 3] {
        for solver_type in ["bh1", "bh2"] {
            for prediction in ["epsilon", "sample", "v_prediction"] {
                let mut scheduler = unipc(json!({
                    "thresholding": true, "dynamic_thresholding_ratio": 0,
                    "prediction_type": prediction, "solver_order": order, "solver_type": solver_type,
                }));
                let sample = dummy_sample_deter().to_dtype(DType::F16).unwrap();
                let sample = run_loop(&mut *scheduler, Some(10), sample, None);
                assert_eq!(sample.dtype(), DType::F16);
            }
        }
    }
}

#[test]
fn deterministic_sample_layout() {
    // torch.arange(24).reshape(3, 2, 4) / 24, permuted (2, 0, 1): element [1, 2, 1] is
    // arange index (2 * 2 + 1) * 4 + 1 = 21.
    let sample = deterministic(&[4, 3, 2], false);
    let value = sample.get(1).unwrap().get(2).unwrap().get(1).unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(value, 21.0 / 24.0);
    let noise = deterministic(&[4, 3, 2], true);
    let value = noise.get(1).unwrap().get(2).unwrap().get(1).unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(value, 2.0 / 24.0);
}
