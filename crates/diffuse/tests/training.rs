//! Training: parity of its parts with PyTorch, diffusers and improved-diffusion
//! (tests/fixtures/training, from tools/fixtures/training.py), gradients against finite
//! differences, data reading, and the loop (the loss goes down, resume is exact, checkpoints
//! survive failures, bad input is refused).

mod common;

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use common::{fixtures_dir, load_tensors, to_vec_f32};
use diffuse::ops::Precision;
use diffuse::models::unet_2d::{UNet2DModel, UNet2DModelConfig};
use diffuse::rng::TorchGenerator;
use diffuse::schedulers::betas::{alphas_cumprod, make_betas};
use diffuse::schedulers::PredictionType;
use diffuse::training::data::{self, Captions, DataLoader, Dataset, Example, ImageFit, ImageFolderDataset, ImageSpec, IdxDataset, RawImage};
use diffuse::training::ema::{Ema, EmaConfig};
use diffuse::training::objectives::{self, LossKind, LossSecondMomentResampler, PosteriorCoefficients};
use diffuse::training::optimizer::{clip_grad_norm, AdamW, AdamWConfig, LearningRate, LrSchedule};
use diffuse::training::params::Parameters;
use diffuse::training::pixel::{NoiseSchedule, PixelTask, PixelTrainingConfig, SampleSettings, TimestepSampling};
use diffuse::training::{checkpoint, train, Hooks, TrainConfig, TrainSummary};
use serde_json::Value;

fn fixture() -> (HashMap<String, Tensor>, Value) {
    let dir = fixtures_dir().join("training");
    let tensors = load_tensors(&dir.join("training.safetensors"));
    let json: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("training.json")).unwrap()).unwrap();
    (tensors, json)
}

fn f64s(value: &Value) -> Vec<f64> {
    value.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect()
}

fn tensor_f64s(t: &Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_vec1::<f64>().unwrap()
}

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("diffuse-training-test-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The number of f32 values that differ between two vectors, and the largest difference in ulps.
fn ulp_difference(actual: &[f32], expected: &[f32]) -> (usize, u32) {
    assert_eq!(actual.len(), expected.len());
    let mut differing = 0;
    let mut worst = 0u32;
    for (&a, &e) in actual.iter().zip(expected) {
        if a.to_bits() != e.to_bits() {
            differing += 1;
            worst = worst.max((a.to_bits() as i64 - e.to_bits() as i64).unsigned_abs() as u32);
        }
    }
    (differing, worst)
}

// ---- Parity with torch, diffusers and improved-diffusion ----

#[test]
fn rand_and_randint_match_torch() {
    let (t, _) = fixture();
    let mut generator = TorchGenerator::new(1234);
    assert_eq!(generator.rand(5), to_vec_f32(&t["rng/rand_5"]));
    let expected: Vec<i64> = t["rng/randint_8"].to_vec1::<i64>().unwrap();
    assert_eq!(generator.randint(0, 1000, 8).unwrap(), expected);
    assert_eq!(generator.randn(3), to_vec_f32(&t["rng/randn_3"]));
    assert_eq!(generator.rand(40), to_vec_f32(&t["rng/rand_40"]));
    assert_eq!(generator.randint(3, 10, 7).unwrap(), t["rng/randint_7"].to_vec1::<i64>().unwrap());
    assert_eq!(generator.randn(20), to_vec_f32(&t["rng/randn_20"]));
}

/// Three AdamW steps, bit for bit what torch.optim.AdamW computes.
#[test]
fn adamw_matches_torch_exactly() {
    let (t, json) = fixture();
    let count = 4;
    for name in ["default", "custom"] {
        let settings = &json[format!("adamw/{name}")];
        let betas = f64s(&settings["betas"]);
        let config = AdamWConfig {
            beta1: betas[0],
            beta2: betas[1],
            eps: settings["eps"].as_f64().unwrap(),
            weight_decay: settings["weight_decay"].as_f64().unwrap(),
        };
        let lrs = f64s(&settings["lrs"]);
        let mut params: Vec<Vec<f32>> = (0..count).map(|i| to_vec_f32(&t[&format!("adamw/param{i}")])).collect();
        let mut optimizer = AdamW::new(config, &params.iter().map(Vec::len).collect::<Vec<_>>());
        for (step, lr) in lrs.iter().enumerate() {
            let grads: Vec<Vec<f32>> = (0..count).map(|i| to_vec_f32(&t[&format!("adamw/grad{i}_step{}", step + 1)])).collect();
            optimizer.update(&mut params, &grads, *lr).unwrap();
            for (i, param) in params.iter().enumerate() {
                let expected = to_vec_f32(&t[&format!("adamw/{name}/param{i}_step{}", step + 1)]);
                assert_eq!(ulp_difference(param, &expected), (0, 0), "{name}: parameter {i} after step {}", step + 1);
            }
        }
        for i in 0..count {
            let m = to_vec_f32(&t[&format!("adamw/{name}/exp_avg{i}")]);
            let v = to_vec_f32(&t[&format!("adamw/{name}/exp_avg_sq{i}")]);
            assert_eq!(ulp_difference(&optimizer.exp_avg[i], &m), (0, 0), "{name}: exp_avg {i}");
            assert_eq!(ulp_difference(&optimizer.exp_avg_sq[i], &v), (0, 0), "{name}: exp_avg_sq {i}");
        }
    }
}

#[test]
fn clip_grad_norm_matches_torch() {
    let (t, _) = fixture();
    for max_norm in [1.0, 1000.0] {
        let mut grads: Vec<Vec<f32>> = (0..4).map(|i| to_vec_f32(&t[&format!("adamw/grad{i}_step3")])).collect();
        let total = clip_grad_norm(&mut grads, max_norm);
        let expected_total = to_vec_f32(&t[&format!("clip/max{max_norm}/total_norm")])[0] as f64;
        assert!(((total as f64 - expected_total) / expected_total).abs() < 1e-6, "total norm {total} vs {expected_total}");
        for (i, grad) in grads.iter().enumerate() {
            let expected = to_vec_f32(&t[&format!("clip/max{max_norm}/grad{i}")]);
            // torch sums each norm in its own vectorised order; the scale can differ by an ulp.
            let (_, worst) = ulp_difference(grad, &expected);
            assert!(worst <= 4, "max_norm {max_norm}, gradient {i}: {worst} ulp");
        }
    }
}

#[test]
fn learning_rate_schedules_match_diffusers() {
    let (t, _) = fixture();
    for (key, schedule, warmup, total) in [
        ("lr/cosine_5_20", LrSchedule::Cosine, 5, 20),
        ("lr/cosine_0_7", LrSchedule::Cosine, 0, 7),
        ("lr/constant_with_warmup_3_10", LrSchedule::Constant, 3, 10),
    ] {
        let rate = LearningRate::new(2e-4, warmup, total, schedule).unwrap();
        for (step, expected) in tensor_f64s(&t[key]).into_iter().enumerate() {
            assert_eq!(rate.at(step), expected, "{key}, step {step}");
        }
    }
    for bad in [0.0, -1e-4, f64::NAN, f64::INFINITY] {
        let error = LearningRate::new(bad, 0, 10, LrSchedule::Constant).unwrap_err().to_string();
        assert!(error.contains("learning rate"), "{error}");
    }
}

#[test]
fn ema_matches_diffusers() {
    let (t, json) = fixture();
    for name in ["default", "after3", "warmup", "warmup_custom"] {
        let entry = &json[format!("ema/{name}")];
        let options = &entry["options"];
        let mut config = EmaConfig::default();
        if let Some(v) = options.get("decay") { config.decay = v.as_f64().unwrap() }
        if let Some(v) = options.get("min_decay") { config.min_decay = v.as_f64().unwrap() }
        if let Some(v) = options.get("update_after_step") { config.update_after_step = v.as_u64().unwrap() }
        if let Some(v) = options.get("use_ema_warmup") { config.use_ema_warmup = v.as_bool().unwrap() }
        if let Some(v) = options.get("inv_gamma") { config.inv_gamma = v.as_f64().unwrap() }
        if let Some(v) = options.get("power") { config.power = v.as_f64().unwrap() }
        for (step, expected) in tensor_f64s(&t[&format!("ema/{name}/decays")]).into_iter().enumerate() {
            assert_eq!(config.decay_at(step as u64), expected, "{name}: decay at step {step}");
        }
    }
    // The update itself, in float32 as diffusers runs it.
    let mut params: Vec<Vec<f32>> = (0..4).map(|i| to_vec_f32(&t[&format!("adamw/param{i}")])).collect();
    let config = EmaConfig { decay: 0.9, update_after_step: 1, ..EmaConfig::default() };
    let mut ema = Ema::new(config, &params);
    for step in 0..5 {
        for (i, param) in params.iter_mut().enumerate() {
            let grad = to_vec_f32(&t[&format!("adamw/grad{i}_step{}", step % 3 + 1)]);
            for (p, g) in param.iter_mut().zip(grad) {
                *p -= 0.1f32 * g;
            }
        }
        ema.step(&params).unwrap();
    }
    for i in 0..4 {
        assert_eq!(ulp_difference(&params[i], &to_vec_f32(&t[&format!("ema/param{i}")])), (0, 0), "parameter {i}");
        assert_eq!(ulp_difference(&ema.shadow[i], &to_vec_f32(&t[&format!("ema/shadow{i}")])), (0, 0), "shadow {i}");
    }
}

fn assert_close(actual: &Tensor, expected: &Tensor, tolerance: f64, what: &str) {
    common::assert_close(actual, expected, tolerance, what);
}

/// improved-diffusion's normal_kl, discretized_gaussian_log_likelihood and _vb_terms_bpd,
/// and the hybrid loss of training_losses, on fixed inputs with both beta schedules.
#[test]
fn hybrid_loss_terms_match_improved_diffusion() {
    let (t, _) = fixture();
    for schedule in ["linear", "squaredcos_cap_v2"] {
        let get = |name: &str| t[&format!("hybrid/{schedule}/{name}")].clone();
        let (x_start, model_output) = (get("x_start"), get("model_output"));
        let channels = x_start.dim(1).unwrap();
        let (means, variance_values) = (model_output.narrow(1, 0, channels).unwrap(), model_output.narrow(1, channels, channels).unwrap());
        let log_scales = variance_values.affine(2.0, -3.0).unwrap();
        assert_close(&objectives::normal_kl(&x_start, &variance_values, &means, &log_scales).unwrap(), &get("normal_kl"), 1e-5, "normal_kl");
        assert_close(
            &objectives::discretized_gaussian_log_likelihood(&x_start, &means, &log_scales).unwrap(),
            &get("log_likelihood"),
            1e-5,
            "discretized_gaussian_log_likelihood",
        );

        let betas = make_betas(schedule, 0.0001, 0.02, 1000, None, &[]).unwrap();
        let posterior = PosteriorCoefficients::new(&betas).unwrap();
        let timesteps: Vec<usize> = get("t").to_vec1::<i64>().unwrap().into_iter().map(|v| v as usize).collect();
        let (vb, kl, nll) = posterior
            .vb_terms_bpd(PredictionType::Epsilon, &means, &variance_values, &x_start, &get("x_t"), &timesteps)
            .unwrap();
        assert_close(&kl, &get("kl"), 1e-5, "kl");
        assert_close(&nll, &get("decoder_nll"), 1e-5, "decoder_nll");
        assert_close(&vb, &get("vb"), 1e-5, "vb");

        // The whole hybrid loss through the objective, with its noise and timesteps fixed.
        let mse = objectives::mean_flat(&(&means - get("noise")).unwrap().sqr().unwrap()).unwrap();
        assert_close(&mse, &get("mse"), 1e-6, "mse");
        assert_close(&(mse + vb).unwrap(), &get("loss"), 1e-5, "loss");
    }
}

/// The stop-gradient of the hybrid loss: its VLB term trains the variance channels only.
#[test]
fn hybrid_loss_vlb_term_does_not_reach_the_mean() {
    let betas = make_betas("linear", 0.0001, 0.02, 1000, None, &[]).unwrap();
    let sampler = objectives::TimestepSampler::Uniform { num_timesteps: 1000 };
    let mut objective = objectives::DiffusionObjective::new(
        PredictionType::Epsilon,
        LossKind::Hybrid { vlb_weight: 0.001 },
        None,
        &betas,
        alphas_cumprod(&betas, false),
        sampler,
    )
    .unwrap();
    let device = Device::Cpu;
    let x_start = Tensor::randn(0f32, 0.5, (4, 1, 4, 4), &device).unwrap();
    let output = Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, 2, 4, 4), &device).unwrap()).unwrap();
    let mut generator = TorchGenerator::new(0);
    let result = objective.loss(&x_start, &mut generator, &mut |_, _| Ok(output.as_tensor().clone())).unwrap();
    let grads = result.loss.backward().unwrap();
    let gradient = grads.get(output.as_tensor()).unwrap();
    // Replay the draws: the mean's gradient is exactly the MSE term's, 2 (mean - noise) / (B·C·H·W).
    let mut generator = TorchGenerator::new(0);
    generator.randint(0, 1000, 4).unwrap();
    let noise = generator.randn_tensor(&[4, 1, 4, 4], &device).unwrap();
    let mse_gradient = ((output.as_tensor().narrow(1, 0, 1).unwrap() - noise).unwrap() * (2.0 / 64.0)).unwrap();
    assert_close(&gradient.narrow(1, 0, 1).unwrap(), &mse_gradient, 1e-5, "the mean's gradient");
    let variance_gradient = gradient.narrow(1, 1, 1).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(variance_gradient > 0.0, "the variance channels get a gradient");
}

#[test]
fn loss_second_moment_resampler_matches_improved_diffusion() {
    let (t, json) = fixture();
    let entry = &json["resample"];
    let mut resampler = LossSecondMomentResampler::new(entry["num_timesteps"].as_u64().unwrap() as usize, 4, 0.001);
    let (losses, weights) = (t["resample/losses"].to_vec2::<f64>().unwrap(), t["resample/weights"].to_vec2::<f64>().unwrap());
    for ((ts, losses), expected) in entry["ts"].as_array().unwrap().iter().zip(losses).zip(weights) {
        let ts: Vec<usize> = ts.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        resampler.update_with_all_losses(&ts, &losses);
        for (a, e) in resampler.weights().iter().zip(&expected) {
            assert!((a - e).abs() <= 1e-15 * e.abs().max(1.0), "weights {:?} vs {expected:?}", resampler.weights());
        }
    }
    // Sampling follows the weights: importance weights are 1 / (T p_t).
    let weights = resampler.weights();
    let total: f64 = weights.iter().sum();
    let mut generator = TorchGenerator::new(9);
    let (timesteps, importance) = resampler.sample(4000, &mut generator);
    for (&t, &w) in timesteps.iter().zip(&importance) {
        assert!((w as f64 - total / (weights.len() as f64 * weights[t])).abs() < 1e-5 * w as f64);
    }
    let heaviest = (0..weights.len()).max_by(|&a, &b| weights[a].total_cmp(&weights[b])).unwrap();
    let frequency = timesteps.iter().filter(|&&t| t == heaviest).count() as f64 / 4000.0;
    assert!((frequency - weights[heaviest] / total).abs() < 0.03, "timestep {heaviest}: {frequency} vs {}", weights[heaviest] / total);
}

#[test]
fn min_snr_weights_match_diffusers() {
    let (t, _) = fixture();
    let betas = make_betas("linear", 0.0001, 0.02, 1000, None, &[]).unwrap();
    let alphas_cumprod = alphas_cumprod(&betas, false);
    let timesteps: Vec<usize> = t["snr/t"].to_vec1::<i64>().unwrap().into_iter().map(|v| v as usize).collect();
    let (_, worst) = ulp_difference(&objectives::compute_snr(&alphas_cumprod, &timesteps), &to_vec_f32(&t["snr/snr"]));
    assert!(worst <= 1, "snr: {worst} ulp");
    assert_eq!(alphas_cumprod.len(), 1000);
    for (name, prediction_type) in [("epsilon", PredictionType::Epsilon), ("v_prediction", PredictionType::VPrediction), ("sample", PredictionType::Sample)] {
        let weights = objectives::min_snr_weights(&alphas_cumprod, &timesteps, 5.0, prediction_type);
        let (_, worst) = ulp_difference(&weights, &to_vec_f32(&t[&format!("snr/weights_{name}")]));
        assert!(worst <= 2, "{name}: {worst} ulp");
    }
}

#[test]
fn label_dropout_uses_the_null_class_at_the_given_rate() {
    let mut generator = TorchGenerator::new(3);
    let labels: Vec<u32> = (0..4000).map(|i| i % 10).collect();
    let dropped = objectives::drop_labels(&labels, 0.2, 10, &mut generator);
    let nulls = dropped.iter().filter(|&&l| l == 10).count() as f64 / 4000.0;
    assert!((nulls - 0.2).abs() < 0.03, "{nulls}");
    assert!(dropped.iter().zip(&labels).all(|(&d, &l)| d == l || d == 10));
    assert_eq!(objectives::drop_labels(&labels, 0.0, 10, &mut generator), labels);
}


// ---- Gradients ----

fn max_abs_difference(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// The fused CPU group norm's backward pass against candle's autograd through the
/// tensor-operation version, on contiguous and transposed input.
#[test]
fn group_norm_backward_matches_autograd() {
    let device = Device::Cpu;
    for (shape, groups, transposed) in [((2, 6, 5, 7), 3, false), ((3, 8, 4, 4), 8, false), ((2, 4, 9, 1), 1, false), ((2, 6, 10, 1), 2, true)] {
        let input = Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, &device).unwrap().affine(2.0, 0.3).unwrap()).unwrap();
        let weight = Var::from_tensor(&Tensor::randn(0f32, 1.0, shape.1, &device).unwrap()).unwrap();
        let bias = Var::from_tensor(&Tensor::randn(0f32, 1.0, shape.1, &device).unwrap()).unwrap();
        let upstream = Tensor::randn(0f32, 1.0, shape, &device).unwrap();
        let x = if transposed {
            // [B, C, L] seen through a transpose, as attention's sequences are.
            let (b, c, l) = (shape.0, shape.1, shape.2);
            input.as_tensor().reshape((b, l, c)).unwrap().transpose(1, 2).unwrap().unsqueeze(3).unwrap()
        } else {
            input.as_tensor().clone()
        };
        let gradients = |output: Tensor| {
            let grads = (output * &upstream).unwrap().sum_all().unwrap().backward().unwrap();
            [input.as_tensor(), weight.as_tensor(), bias.as_tensor()].map(|v| grads.get(v).unwrap().clone())
        };
        let fused = gradients(diffuse::ops::group_norm(&x, groups, &weight, &bias, 1e-5).unwrap());
        let reference = gradients(diffuse::ops::group_norm_from_tensor_ops(&x, groups, &weight, &bias, 1e-5).unwrap());
        for (name, (a, b)) in ["input", "weight", "bias"].iter().zip(fused.iter().zip(&reference)) {
            let scale = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            let difference = max_abs_difference(a, b);
            assert!(difference <= 2e-5 * scale.max(1.0), "{shape:?}, {groups} groups: d{name} differs by {difference}");
        }
    }
}

/// Attention's softmax has a backward pass when gradients are tracked: the gradients of
/// scaled-dot-product attention match autograd through candle's tensor-op softmax.
#[test]
fn attention_backward_matches_autograd() {
    let device = Device::Cpu;
    let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 2, 5, 4), &device).unwrap()).unwrap();
    let k = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 2, 6, 4), &device).unwrap()).unwrap();
    let v = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 2, 6, 4), &device).unwrap()).unwrap();
    let upstream = Tensor::randn(0f32, 1.0, (2, 2, 5, 4), &device).unwrap();
    let gradients = |output: Tensor| {
        let grads = (output * &upstream).unwrap().sum_all().unwrap().backward().unwrap();
        [q.as_tensor(), k.as_tensor(), v.as_tensor()].map(|t| grads.get(t).unwrap().clone())
    };
    let ours = gradients(diffuse::ops::scaled_dot_product_attention(&q, &k, &v, None).unwrap());
    let scores = (q.matmul(&k.t().unwrap()).unwrap() * 0.5).unwrap();
    let reference = gradients(candle_nn::ops::softmax(&scores, candle_core::D::Minus1).unwrap().matmul(&v).unwrap());
    for (name, (a, b)) in ["q", "k", "v"].iter().zip(ours.iter().zip(&reference)) {
        let difference = max_abs_difference(a, b);
        assert!(difference < 1e-5, "d{name} differs by {difference}");
    }
}

/// A small class-conditional UNet2DModel with attention (for gradient and loop tests).
fn tiny_unet_config(in_channels: usize, size: usize, num_class_embeds: Option<usize>) -> UNet2DModelConfig {
    UNet2DModelConfig {
        sample_size: Some(diffuse::models::unet_2d::SampleSize::Square(size)),
        in_channels,
        out_channels: in_channels,
        block_out_channels: vec![8, 16],
        layers_per_block: 1,
        norm_num_groups: 4,
        attention_head_dim: Some(8),
        down_block_types: vec!["DownBlock2D".into(), "AttnDownBlock2D".into()],
        up_block_types: vec!["AttnUpBlock2D".into(), "UpBlock2D".into()],
        num_class_embeds,
        ..UNet2DModelConfig::default()
    }
}

/// Every parameter's gradient (from candle's autograd with the training ops, in f32) against
/// central finite differences of the same model in f64, for one entry of each parameter.
#[test]
fn unet_gradients_match_finite_differences() {
    let device = Device::Cpu;
    for config in [
        tiny_unet_config(2, 8, Some(3)),
        // Resnets that resample (whose input feeds both the upsampling and the normalisation).
        UNet2DModelConfig {
            resnet_time_scale_shift: "scale_shift".into(),
            downsample_type: "resnet".into(),
            upsample_type: "resnet".into(),
            ..tiny_unet_config(1, 4, None)
        },
    ] {
        let varmap = VarMap::new();
        let unet = UNet2DModel::new(VarBuilder::from_varmap(&varmap, DType::F32, &device), &config).unwrap();
        let parameters = Parameters::from_varmap(&varmap).unwrap();
        parameters.init_torch_default(5).unwrap();
        let size = config.sample_size.unwrap().height_width().0;
        let sample = Tensor::randn(0f32, 1.0, (2, config.in_channels, size, size), &device).unwrap();
        let timesteps = Tensor::new(&[3f32, 700.0], &device).unwrap();
        let labels = config.num_class_embeds.map(|_| Tensor::new(&[2u32, 0], &device).unwrap());
        let projection = Tensor::randn(0f32, 1.0, (2, config.out_channels, size, size), &device).unwrap();
        let loss = |unet: &UNet2DModel, dtype: DType| -> f64 {
            let output = unet.forward(&sample.to_dtype(dtype).unwrap(), &timesteps, labels.as_ref()).unwrap();
            (output * projection.to_dtype(dtype).unwrap()).unwrap().sum_all().unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
        };
        let output = unet.forward(&sample, &timesteps, labels.as_ref()).unwrap();
        let grads = (output * &projection).unwrap().sum_all().unwrap().backward().unwrap();

        // The same weights in f64, as variables that can be nudged.
        let varmap64 = VarMap::new();
        let unet64 = UNet2DModel::new(VarBuilder::from_varmap(&varmap64, DType::F64, &device), &config).unwrap();
        let vars64: HashMap<String, Var> = varmap64.data().lock().unwrap().clone();
        for (name, var) in parameters.names().iter().zip(parameters.vars()) {
            vars64[name].set(&var.as_tensor().to_dtype(DType::F64).unwrap()).unwrap();
        }
        let mut generator = TorchGenerator::new(1);
        let mut checked = Vec::new();
        for (name, var) in parameters.names().iter().zip(parameters.vars()) {
            let analytic = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}")).flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let index = (generator.rand(1)[0] * analytic.len() as f32) as usize % analytic.len();
            let var64 = &vars64[name];
            let original = var64.as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let h = 1e-4 * original[index].abs().max(1.0);
            let nudged = |delta: f64| {
                let mut values = original.clone();
                values[index] += delta;
                var64.set(&Tensor::from_vec(values, var64.shape(), &device).unwrap()).unwrap();
                loss(&unet64, DType::F64)
            };
            let numeric = (nudged(h) - nudged(-h)) / (2.0 * h);
            var64.set(&Tensor::from_vec(original, var64.shape(), &device).unwrap()).unwrap();
            checked.push((name.clone(), analytic[index] as f64, numeric));
        }
        let scale = (checked.iter().map(|(_, _, n)| n * n).sum::<f64>() / checked.len() as f64).sqrt();
        for (name, analytic, numeric) in &checked {
            assert!(
                (analytic - numeric).abs() <= 1e-3 * numeric.abs() + 1e-4 * scale,
                "{name}: autograd {analytic}, finite differences {numeric} (gradient scale {scale})"
            );
        }
        assert!(checked.len() > 30, "{} parameters checked", checked.len());
    }
}


// ---- Data ----

fn write_idx(path: &Path, type_code: u8, dims: &[u32], data: &[u8], gzip: bool) {
    let mut bytes = vec![0, 0, type_code, dims.len() as u8];
    for d in dims {
        bytes.extend(d.to_be_bytes());
    }
    bytes.extend_from_slice(data);
    if gzip {
        use std::io::Write;
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(&bytes).unwrap();
        bytes = encoder.finish().unwrap();
    }
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn idx_files_plain_and_gzipped() {
    let dir = scratch("idx");
    let pixels: Vec<u8> = (0..5 * 4 * 3).map(|i| (i * 7 % 256) as u8).collect();
    let labels = [3u8, 0, 9, 9, 1];
    for gzip in [false, true] {
        let suffix = if gzip { ".gz" } else { "" };
        let images_path = dir.join(format!("train-images-idx3-ubyte{suffix}"));
        write_idx(&images_path, 0x08, &[5, 4, 3], &pixels, gzip);
        write_idx(&dir.join(format!("train-labels-idx1-ubyte{suffix}")), 0x08, &[5], &labels, gzip);
        let labels_path = data::guess_idx_labels_path(&images_path).expect("labels file found");
        assert!(labels_path.to_string_lossy().ends_with(&format!("train-labels-idx1-ubyte{suffix}")));
        let cache = dir.join("cache");
        let mut dataset = IdxDataset::open(&images_path, Some(&labels_path), &cache).unwrap();
        assert_eq!((dataset.len(), dataset.num_classes()), (5, Some(10)));
        for index in [0, 2, 4] {
            let example = dataset.get(index).unwrap();
            assert_eq!((example.image.width, example.image.height, example.image.channels), (3, 4, 1));
            assert_eq!(example.image.pixels, pixels[index * 12..(index + 1) * 12]);
            assert_eq!(example.label, Some(labels[index] as usize));
        }
        assert_eq!(cache.join("train-images-idx3-ubyte.idx").is_file(), gzip, "a gzipped file is decompressed into the cache");
        // Opened again, the cached copy is reused.
        assert_eq!(IdxDataset::open(&images_path, None, &cache).unwrap().get(1).unwrap().image.pixels, pixels[12..24]);
        std::fs::remove_file(&images_path).unwrap();
        std::fs::remove_file(&labels_path).unwrap();
    }
}

#[test]
fn bad_idx_files_are_refused_naming_the_file() {
    let dir = scratch("idx-bad");
    let cache = dir.join("cache");
    let check = |name: &str, type_code: u8, dims: &[u32], data: &[u8], needle: &str| {
        let path = dir.join(name);
        write_idx(&path, type_code, dims, data, false);
        let error = IdxDataset::open(&path, None, &cache).err().unwrap_or_else(|| panic!("{name} accepted")).to_string();
        assert!(error.contains(name) && error.contains(needle), "{name}: {error}");
    };
    check("floats", 0x0D, &[2, 2, 2], &[0; 32], "0x0d");
    check("truncated", 0x08, &[3, 4, 4], &[0; 40], "needs");
    check("empty", 0x08, &[0, 28, 28], &[], "no images");
    check("labels-shaped", 0x08, &[10], &[0; 10], "three dimensions");
    std::fs::write(dir.join("text"), b"hello world").unwrap();
    let error = IdxDataset::open(&dir.join("text"), None, &cache).err().unwrap().to_string();
    assert!(error.contains("not an IDX file"), "{error}");
    let images = dir.join("images");
    write_idx(&images, 0x08, &[3, 2, 2], &[0; 12], false);
    write_idx(&dir.join("labels"), 0x08, &[4], &[0; 4], false);
    let error = IdxDataset::open(&images, Some(&dir.join("labels")), &cache).err().unwrap().to_string();
    assert!(error.contains("4 labels for the 3 images"), "{error}");
}

fn save_png(path: &Path, image: image::DynamicImage) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    image.save(path).unwrap();
}

fn gray(width: u32, height: u32, value: u8) -> image::DynamicImage {
    image::DynamicImage::ImageLuma8(image::GrayImage::from_pixel(width, height, image::Luma([value])))
}

#[test]
fn image_folders_with_captions() {
    let dir = scratch("folder");
    // Sidecar captions (kohya style).
    let sidecar = dir.join("sidecar");
    save_png(&sidecar.join("a.png"), gray(4, 4, 10));
    save_png(&sidecar.join("b.png"), gray(4, 4, 20));
    std::fs::write(sidecar.join("a.txt"), "a red shoe\n").unwrap();
    std::fs::write(sidecar.join("b.txt"), "une chaussure bleue").unwrap();
    let mut dataset = ImageFolderDataset::open(&sidecar, Captions::Required, false).unwrap();
    assert_eq!(dataset.len(), 2);
    assert_eq!(dataset.get(0).unwrap().caption.as_deref(), Some("a red shoe"));
    assert_eq!(dataset.get(1).unwrap().image.pixels, vec![20; 16]);
    // Captions not needed: the sidecar files are not read.
    std::fs::remove_file(sidecar.join("b.txt")).unwrap();
    assert_eq!(ImageFolderDataset::open(&sidecar, Captions::Ignore, false).unwrap().len(), 2);
    let error = ImageFolderDataset::open(&sidecar, Captions::Required, false).err().unwrap().to_string();
    assert!(error.contains("b.txt") && error.contains("missing"), "{error}");
    std::fs::write(sidecar.join("b.txt"), [0x61, 0xff, 0x62]).unwrap();
    let error = ImageFolderDataset::open(&sidecar, Captions::Required, false).err().unwrap().to_string();
    assert!(error.contains("b.txt") && error.contains("not UTF-8"), "{error}");

    // diffusers' metadata.jsonl.
    let metadata = dir.join("metadata");
    save_png(&metadata.join("img/x.png"), gray(4, 4, 1));
    save_png(&metadata.join("y.png"), gray(4, 4, 2));
    std::fs::write(metadata.join("metadata.jsonl"), "{\"file_name\": \"y.png\", \"text\": \"why\"}\n\n{\"file_name\": \"img/x.png\", \"text\": \"ex\"}\n").unwrap();
    let mut dataset = ImageFolderDataset::open(&metadata, Captions::Required, false).unwrap();
    assert_eq!(dataset.get(0).unwrap().caption.as_deref(), Some("why"));
    assert_eq!(dataset.get(1).unwrap().caption.as_deref(), Some("ex"));
    std::fs::write(metadata.join("metadata.jsonl"), "{\"file_name\": \"y.png\"}\n").unwrap();
    let error = ImageFolderDataset::open(&metadata, Captions::Required, false).err().unwrap().to_string();
    assert!(error.contains("line 1") && error.contains("text"), "{error}");
    std::fs::write(metadata.join("metadata.jsonl"), "{\"file_name\": \"gone.png\", \"text\": \"t\"}\n").unwrap();
    let error = ImageFolderDataset::open(&metadata, Captions::Required, false).err().unwrap().to_string();
    assert!(error.contains("gone.png") && error.contains("does not exist"), "{error}");

    // Class labels from sub-folders; an empty folder is refused.
    let classes = dir.join("classes");
    save_png(&classes.join("shoe/1.png"), gray(4, 4, 1));
    save_png(&classes.join("bag/1.png"), gray(4, 4, 2));
    save_png(&classes.join("shoe/2.png"), gray(4, 4, 3));
    let mut dataset = ImageFolderDataset::open(&classes, Captions::Ignore, true).unwrap();
    assert_eq!(dataset.class_names(), Some(vec!["bag".to_string(), "shoe".to_string()]));
    let labels: Vec<_> = (0..3).map(|i| dataset.get(i).unwrap().label).collect();
    assert_eq!(labels, [Some(0), Some(1), Some(1)]);
    std::fs::create_dir_all(dir.join("empty")).unwrap();
    let error = ImageFolderDataset::open(&dir.join("empty"), Captions::Ignore, false).err().unwrap().to_string();
    assert!(error.contains("no images"), "{error}");
}

#[test]
fn images_are_converted_or_refused_naming_the_file() {
    let example = |width: usize, height: usize, channels: usize, pixels: Vec<u8>| Example {
        image: RawImage { width, height, channels, pixels },
        label: None,
        caption: None,
        name: "photo.png".into(),
    };
    let spec = |channels, fit| ImageSpec { channels, height: 4, width: 4, fit };
    // RGBA to RGB drops alpha; RGB to gray is PIL's luma; gray to RGB replicates.
    let rgba = example(4, 4, 4, [255u8, 0, 0, 7].repeat(16));
    assert_eq!(data::prepare(&rgba, &spec(3, ImageFit::Exact), false).unwrap()[..2], [1.0, 1.0]);
    let luma = data::prepare(&rgba, &spec(1, ImageFit::Exact), false).unwrap();
    assert_eq!(luma[0], (76.0f32 / 255.0 - 0.5) / 0.5);
    let gray_image = example(4, 4, 1, vec![0; 16]);
    assert_eq!(data::prepare(&gray_image, &spec(3, ImageFit::Exact), false).unwrap(), vec![-1.0; 48]);
    // Another size: refused unless padded or resized.
    let small = example(2, 2, 1, vec![255; 4]);
    let error = data::prepare(&small, &spec(1, ImageFit::Exact), false).unwrap_err().to_string();
    assert!(error.contains("photo.png") && error.contains("2×2") && error.contains("4×4"), "{error}");
    let padded = data::prepare(&small, &spec(1, ImageFit::Pad), false).unwrap();
    assert_eq!(padded.iter().filter(|&&v| v == 1.0).count(), 4);
    assert_eq!(padded[5], 1.0, "centred");
    let large = example(8, 6, 1, vec![255; 48]);
    assert!(data::prepare(&large, &spec(1, ImageFit::Pad), false).unwrap_err().to_string().contains("photo.png"));
    assert_eq!(data::prepare(&large, &spec(1, ImageFit::Resize), false).unwrap(), vec![1.0; 16]);
    // Flipping mirrors each row.
    let ramp = example(4, 4, 1, (0..16).map(|i| (i % 4) as u8 * 80).collect());
    let (plain, flipped) = (data::prepare(&ramp, &spec(1, ImageFit::Exact), false).unwrap(), data::prepare(&ramp, &spec(1, ImageFit::Exact), true).unwrap());
    assert_eq!(plain[0], flipped[3]);
    assert_eq!(plain[4..8].iter().rev().copied().collect::<Vec<_>>(), flipped[4..8]);
}

/// An in-memory dataset of 8×8 patterns in three classes: horizontal bars, vertical bars and
/// a checkerboard, each at a few offsets.
struct Patterns {
    len: usize,
    size: usize,
}

impl Dataset for Patterns {
    fn len(&self) -> usize {
        self.len
    }
    fn get(&mut self, index: usize) -> diffuse::Result<Example> {
        let (class, offset) = (index % 3, index / 3);
        let s = self.size;
        let pixels = (0..s * s)
            .map(|i| {
                let (y, x) = (i / s + offset, i % s + offset);
                let on = match class {
                    0 => y % 4 < 2,
                    1 => x % 4 < 2,
                    _ => (x / 2 + y / 2) % 2 == 0,
                };
                if on { 230 } else { 25 }
            })
            .collect();
        Ok(Example { image: RawImage { width: s, height: s, channels: 1, pixels }, label: Some(class), caption: None, name: format!("pattern {index}") })
    }
    fn num_classes(&self) -> Option<usize> {
        Some(3)
    }
    fn describe(&self) -> String {
        format!("{} patterns", self.len)
    }
}

fn pattern_loader(len: usize, seed: u64, flip: bool) -> DataLoader {
    let spec = ImageSpec { channels: 1, height: 8, width: 8, fit: ImageFit::Exact };
    DataLoader::new(Box::new(Patterns { len, size: 8 }), spec, seed, flip).unwrap()
}

#[test]
fn the_loader_shuffles_each_epoch_and_resumes_at_its_position() {
    let device = Device::Cpu;
    let order = |loader: &mut DataLoader, batches: usize| -> Vec<Vec<f32>> {
        (0..batches).map(|_| to_vec_f32(&loader.next_batch(4, &device).unwrap().images)).collect()
    };
    // Each epoch is a permutation, different from the last.
    let first = data::epoch_order(7, 0, 10);
    let second = data::epoch_order(7, 1, 10);
    let mut sorted = first.clone();
    sorted.sort();
    assert_eq!(sorted, (0..10).collect::<Vec<u32>>());
    assert_ne!(first, second);
    assert_eq!(first, data::epoch_order(7, 0, 10), "seeded");
    // A loader moved to a saved position continues exactly, across epoch boundaries.
    let mut reference = pattern_loader(10, 7, true);
    let all = order(&mut reference, 8);
    let mut loader = pattern_loader(10, 7, true);
    order(&mut loader, 3);
    let position = loader.position();
    assert_eq!(position, data::DataPosition { epoch: 1, index: 2 });
    let mut resumed = pattern_loader(10, 7, true);
    resumed.set_position(position).unwrap();
    assert_eq!(order(&mut resumed, 5), all[3..]);
    // With flipping, some examples come mirrored.
    let mut unflipped = pattern_loader(10, 7, false);
    assert_ne!(order(&mut unflipped, 8), all);
    // An empty dataset is refused.
    let spec = ImageSpec { channels: 1, height: 8, width: 8, fit: ImageFit::Exact };
    let error = DataLoader::new(Box::new(Patterns { len: 0, size: 8 }), spec, 0, false).err().unwrap().to_string();
    assert!(error.contains("empty"), "{error}");
}

// ---- The loop ----

fn pixel_config(unet: UNet2DModelConfig, loss: LossKind, num_classes: Option<usize>, class_dropout: f64) -> PixelTrainingConfig {
    PixelTrainingConfig {
        unet,
        noise: NoiseSchedule::default(),
        prediction_type: PredictionType::Epsilon,
        loss,
        timestep_sampling: TimestepSampling::Uniform,
        snr_gamma: None,
        num_classes,
        class_dropout,
        sampling: SampleSettings { count: 2, steps: 2, scheduler: "ddim".into(), seed: 0 },
    }
}

fn train_config(output_dir: &Path, steps: usize) -> TrainConfig {
    TrainConfig {
        output_dir: output_dir.to_path_buf(),
        steps,
        batch_size: 8,
        grad_accum: 1,
        learning_rate: 2e-3,
        warmup_steps: 2,
        lr_schedule: LrSchedule::Constant,
        adamw: AdamWConfig::default(),
        grad_clip: Some(1.0),
        ema: Some(EmaConfig { decay: 0.9, ..EmaConfig::default() }),
        checkpoint_every: 0,
        keep_checkpoints: 2,
        sample_every: None,
        sample_at_start: false,
        seed: 1,
        resume: false,
        mixed_precision: Precision::F32,
        gradient_checkpointing: false,
    }
}

fn run(task: &mut PixelTask, loader: &mut DataLoader, config: &TrainConfig, stop_after: Option<usize>) -> diffuse::Result<TrainSummary> {
    let mut hooks = Hooks { on_progress: Box::new(move |p| if Some(p.step) == stop_after { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }), ..Hooks::default() };
    train(task, loader, config, &mut hooks)
}

fn mean(values: &[(u64, f32)]) -> f32 {
    values.iter().map(|(_, l)| l).sum::<f32>() / values.len() as f32
}

/// A tiny UNet learns the patterns: the loss falls, and the run leaves a model that the
/// pixel pipeline loads, the loss log and chart, and sample grids.
#[test]
fn the_loss_goes_down_and_the_model_is_exported() {
    let dir = scratch("loss-down");
    let unet = UNet2DModelConfig { block_out_channels: vec![16, 32], ..tiny_unet_config(1, 8, None) };
    let mut task = PixelTask::new(pixel_config(unet, LossKind::Mse, None, 0.0), 0, &Device::Cpu).unwrap();
    let mut loader = pattern_loader(48, 3, false);
    let config = TrainConfig { sample_every: Some(20), checkpoint_every: 20, ..train_config(&dir, 40) };
    let summary = run(&mut task, &mut loader, &config, None).unwrap();
    assert_eq!((summary.step, summary.stopped, summary.losses.len()), (40, false, 40));
    let (first, last) = (mean(&summary.losses[..5]), mean(&summary.losses[30..]));
    assert!(last < 0.6 * first, "loss {first} -> {last}");

    let csv = std::fs::read_to_string(dir.join("loss.csv")).unwrap();
    assert_eq!(csv.lines().count(), 41);
    assert!(csv.starts_with("step,loss,learning_rate,grad_norm\n1,"));
    for file in ["loss.png", "samples/step-0000020.png", "samples/step-0000040.png"] {
        let image = image::open(dir.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert!(image.width() > 8, "{file}");
    }
    assert_eq!(checkpoint::list(&dir.join("checkpoints")).unwrap().len(), 2);
    let latest = checkpoint::latest(&dir.join("checkpoints")).unwrap().unwrap();
    assert!(latest.ends_with("checkpoint-0000040"));
    // Without the pointer (a kill right after the first checkpoint's rename), the newest
    // complete checkpoint is the latest.
    std::fs::rename(dir.join("checkpoints/latest"), dir.join("latest.moved")).unwrap();
    assert_eq!(checkpoint::latest(&dir.join("checkpoints")).unwrap(), Some(latest.clone()));

    // The export: a DDPMPipeline folder with the EMA weights, loadable and sampling.
    let mut pipeline = diffuse::pipelines::pixel::PixelPipeline::load(&dir, Some("ddim"), &[], None, &Device::Cpu).unwrap();
    let options = diffuse::pipelines::pixel::PixelOptions { num_inference_steps: 3, num_images: 2, eta: 0.0, class_label: None };
    let samples = pipeline.generate(&options, &mut TorchGenerator::new(0), &mut |_, _| {}).unwrap();
    assert_eq!(samples.dims(), [2, 1, 8, 8]);
    let exported = load_tensors(&dir.join("unet/diffusion_pytorch_model.safetensors"));
    let ema = load_tensors(&latest.join("ema.safetensors"));
    for (name, tensor) in &exported {
        assert_eq!(to_vec_f32(tensor), to_vec_f32(&ema[name]), "{name} is the EMA weight");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Files whose content must be identical between two runs.
fn run_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    ["loss.csv", "unet/diffusion_pytorch_model.safetensors", "unet/config.json", "scheduler/scheduler_config.json", "model_index.json"]
        .iter()
        .map(|f| (f.to_string(), std::fs::read(dir.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"))))
        .collect()
}

/// Gradient checkpointing (`--gradient-checkpointing`) recomputes each resnet and attention
/// block in the backward pass: the same run as without it, in f32 and in bf16 mixed
/// precision. The first loss is bit for bit the same (the forward pass is); the gradients only
/// up to the order in which an input's gradient contributions are summed (a block's inner
/// ones come summed), as with torch's checkpointing.
#[test]
fn gradient_checkpointing_gives_the_same_run() {
    let pixel = pixel_config(tiny_unet_config(1, 8, Some(4)), LossKind::Mse, Some(3), 0.25);
    for mixed_precision in [Precision::F32, Precision::Bf16] {
        let config = |dir: &Path, gradient_checkpointing| TrainConfig { mixed_precision, gradient_checkpointing, ..train_config(dir, 4) };
        let plain = scratch("checkpointing-plain");
        run(&mut PixelTask::new(pixel.clone(), 0, &Device::Cpu).unwrap(), &mut pattern_loader(30, 5, true), &config(&plain, false), None).unwrap();
        let checkpointed = scratch("checkpointing-on");
        run(&mut PixelTask::new(pixel.clone(), 0, &Device::Cpu).unwrap(), &mut pattern_loader(30, 5, true), &config(&checkpointed, true), None).unwrap();
        assert_same_run(&plain, &checkpointed, &format!("{mixed_precision:?}"));
        for dir in [plain, checkpointed] {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

/// Two runs' losses (the first bit for bit, the rest within 1e-5 of each other) and exported
/// weights (within 1e-5) agree.
fn assert_same_run(a: &Path, b: &Path, what: &str) {
    let losses = |dir: &Path| -> Vec<f64> {
        std::fs::read_to_string(dir.join("loss.csv")).unwrap().lines().skip(1).map(|line| line.split(',').nth(1).unwrap().parse().unwrap()).collect()
    };
    let (first, second) = (losses(a), losses(b));
    assert_eq!(first.len(), second.len());
    assert_eq!(first[0], second[0], "{what}: the first loss");
    for (x, y) in first.iter().zip(&second) {
        assert!((x - y).abs() <= 1e-5 * x.abs(), "{what}: losses {x} and {y}");
    }
    let weights = |dir: &Path| load_tensors(&dir.join("unet/diffusion_pytorch_model.safetensors"));
    let (first, second) = (weights(a), weights(b));
    // A key projection's bias has no gradient but rounding noise (the softmax ignores a shift
    // of every score), which AdamW scales up to whole steps: it is left out.
    for (name, tensor) in first.iter().filter(|(name, _)| !name.ends_with("to_k.bias")) {
        for (x, y) in to_vec_f32(tensor).iter().zip(to_vec_f32(&second[name])) {
            assert!((x - y).abs() <= 1e-5, "{what}: {name} is {x} and {y}");
        }
    }
}

/// bf16 mixed precision (`--mixed-precision bf16`): a run stopped and resumed is bit-identical
/// to an uninterrupted one, its weights differ from the f32 run's (the bf16 products ran) but
/// stay close to them, and the export is f32.
#[test]
fn mixed_precision_resumes_exactly_and_stays_near_f32() {
    let unet = UNet2DModelConfig { out_channels: 1, ..tiny_unet_config(1, 8, Some(4)) };
    let pixel = pixel_config(unet, LossKind::Mse, Some(3), 0.25);
    let config = |dir: &Path, mixed_precision| TrainConfig { checkpoint_every: 3, mixed_precision, ..train_config(dir, 6) };
    let new_task = || PixelTask::new(pixel.clone(), 0, &Device::Cpu).unwrap();

    let f32_run = scratch("mixed-f32");
    run(&mut new_task(), &mut pattern_loader(30, 5, true), &config(&f32_run, Precision::F32), None).unwrap();
    let whole = scratch("mixed-whole");
    run(&mut new_task(), &mut pattern_loader(30, 5, true), &config(&whole, Precision::Bf16), None).unwrap();
    let parts = scratch("mixed-parts");
    let stopped = run(&mut new_task(), &mut pattern_loader(30, 5, true), &config(&parts, Precision::Bf16), Some(4)).unwrap();
    assert!(stopped.stopped);
    run(&mut new_task(), &mut pattern_loader(30, 5, true), &TrainConfig { resume: true, ..config(&parts, Precision::Bf16) }, None).unwrap();
    for ((name, a), (_, b)) in run_files(&whole).iter().zip(run_files(&parts)) {
        assert!(*a == b, "{name} differs between the whole and the resumed bf16 run");
    }
    let weights = |dir: &Path| load_tensors(&dir.join("unet/diffusion_pytorch_model.safetensors"));
    let (mixed, full) = (weights(&whole), weights(&f32_run));
    let mut differing = 0;
    for (name, tensor) in &mixed {
        assert_eq!(tensor.dtype(), DType::F32, "{name} is exported in f32");
        differing += to_vec_f32(tensor).iter().zip(to_vec_f32(&full[name])).filter(|(x, y)| *x != y).count();
    }
    // Mixed precision is the CPU kernels' (`DIFFUSE_ISA=tensor`, candle's own operations, has
    // no bf16 product: the run is f32's there).
    assert_eq!(differing > 0, diffuse::ops::uses_kernels(&Device::Cpu), "bf16 mixed precision against the f32 run's weights");
    // The same training, step by step: each step's loss within 1 % of f32's.
    let losses = |dir: &Path| -> Vec<f64> {
        let text = std::fs::read_to_string(dir.join("loss.csv")).unwrap();
        text.lines().skip(1).map(|line| line.split(',').nth(1).unwrap().parse().unwrap()).collect()
    };
    let (mixed, full) = (losses(&whole), losses(&f32_run));
    assert_eq!(mixed.len(), 6);
    for (step, (a, b)) in mixed.iter().zip(&full).enumerate() {
        assert!((a - b).abs() <= 0.01 * b.abs(), "step {}: bf16 loss {a}, f32 loss {b}", step + 1);
    }
    for dir in [f32_run, whole, parts] {
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// A run stopped after step 7 (its last checkpoint at step 4, steps 5-7 logged and lost) and
/// resumed gives bit-identical losses, gradient norms and final weights to an uninterrupted
/// run: with gradient accumulation, clipping, EMA, label dropout, loss-aware timestep
/// sampling (warmed up during the run) and the hybrid loss.
#[test]
fn resume_after_a_stop_is_exact() {
    let unet = UNet2DModelConfig { out_channels: 2, ..tiny_unet_config(1, 8, Some(4)) };
    let mut pixel = pixel_config(unet, LossKind::Hybrid { vlb_weight: 0.001 }, Some(3), 0.25);
    pixel.noise.num_train_timesteps = 6;
    pixel.timestep_sampling = TimestepSampling::LossAware;
    let steps = 10;
    let config = |dir: &Path| TrainConfig { grad_accum: 2, batch_size: 4, checkpoint_every: 4, ..train_config(dir, steps) };
    let new_task = || PixelTask::new(pixel.clone(), 0, &Device::Cpu).unwrap();

    let whole = scratch("resume-whole");
    run(&mut new_task(), &mut pattern_loader(30, 5, true), &config(&whole), None).unwrap();

    let parts = scratch("resume-parts");
    let stopped = run(&mut new_task(), &mut pattern_loader(30, 5, true), &config(&parts), Some(7)).unwrap();
    assert!(stopped.stopped && stopped.step == 7);
    assert!(checkpoint::latest(&parts.join("checkpoints")).unwrap().unwrap().ends_with("checkpoint-0000004"));
    // Without `resume`, a folder holding a run is not overwritten.
    let error = run(&mut new_task(), &mut pattern_loader(30, 5, true), &config(&parts), None).unwrap_err().to_string();
    assert!(error.contains("`resume`"), "{error}");
    let resumed = run(&mut new_task(), &mut pattern_loader(30, 5, true), &TrainConfig { resume: true, ..config(&parts) }, None).unwrap();
    assert_eq!(resumed.losses.first().map(|l| l.0), Some(5), "resumed after the checkpoint of step 4");
    for ((name, a), (_, b)) in run_files(&whole).iter().zip(run_files(&parts)) {
        assert!(*a == b, "{name} differs between the whole and the resumed run");
    }
    let _ = std::fs::remove_dir_all(&whole);

    // Resuming with another model config is refused, naming the difference.
    let mut other = pixel.clone();
    other.unet.block_out_channels = vec![8, 8];
    let mut task = PixelTask::new(other, 0, &Device::Cpu).unwrap();
    let error = run(&mut task, &mut pattern_loader(30, 5, true), &TrainConfig { resume: true, steps: 12, ..config(&parts) }, None)
        .unwrap_err()
        .to_string();
    assert!(error.contains("unet.block_out_channels: [8,16] in the checkpoint, [8,8] now"), "{error}");
    // And so is other data.
    let error = run(&mut new_task(), &mut pattern_loader(31, 5, true), &TrainConfig { resume: true, steps: 12, ..config(&parts) }, None)
        .unwrap_err()
        .to_string();
    assert!(error.contains("30 examples") && error.contains("31"), "{error}");
    let _ = std::fs::remove_dir_all(&parts);
}

/// A loss that stops being finite stops the run at that step and keeps the last good checkpoint.
#[test]
fn a_diverging_run_stops_and_keeps_the_last_good_checkpoint() {
    let dir = scratch("nan");
    let mut task = PixelTask::new(pixel_config(tiny_unet_config(1, 8, None), LossKind::Mse, None, 0.0), 0, &Device::Cpu).unwrap();
    let config = TrainConfig { learning_rate: 1e30, warmup_steps: 0, grad_clip: None, checkpoint_every: 1, ..train_config(&dir, 20) };
    let error = run(&mut task, &mut pattern_loader(12, 0, false), &config, None).unwrap_err().to_string();
    let step: usize = error.split("diverged at step ").nth(1).and_then(|s| s.split(':').next()).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("{error}"));
    assert!(step >= 2, "{error}");
    let last_good = checkpoint::checkpoint_name(step as u64 - 1);
    assert!(error.contains(&last_good) && error.contains("is kept"), "{error}");
    let latest = checkpoint::latest(&dir.join("checkpoints")).unwrap().unwrap();
    assert!(latest.ends_with(&last_good));
    assert_eq!(checkpoint::load(&latest).unwrap().state.step, step as u64 - 1);
    assert!(!dir.join("model_index.json").exists(), "nothing exported");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A disk that fills while a checkpoint is written: the run fails with the error, the previous
/// checkpoint and the `latest` pointer stay intact, nothing half-written is left, and the run
/// resumes from it.
#[test]
fn a_failed_checkpoint_write_keeps_the_previous_checkpoint() {
    let no_space = || std::io::Error::from_raw_os_error(28);
    for failing_file in ["optimizer.safetensors", "state.json", "latest"] {
        let dir = scratch(&format!("disk-full-{failing_file}"));
        let mut task = PixelTask::new(pixel_config(tiny_unet_config(1, 8, None), LossKind::Mse, None, 0.0), 0, &Device::Cpu).unwrap();
        let config = TrainConfig { checkpoint_every: 2, ..train_config(&dir, 6) };
        let mut hooks = Hooks {
            write_file: Box::new(move |path: &Path, bytes: &[u8]| {
                let name = path.to_string_lossy();
                let fail = match failing_file {
                    // The pointer's update after the second checkpoint's folder is in place.
                    "latest" => name.contains(".latest") && path.parent().unwrap().join("checkpoint-0000004").exists(),
                    file => name.contains("checkpoint-0000004") && name.ends_with(file),
                };
                if fail {
                    return Err(no_space());
                }
                checkpoint::write_and_sync(path, bytes)
            }),
            ..Hooks::default()
        };
        let error = train(&mut task, &mut pattern_loader(12, 0, false), &config, &mut hooks).unwrap_err().to_string();
        assert!(error.contains("No space left on device"), "{failing_file}: {error}");
        let root = dir.join("checkpoints");
        let latest = checkpoint::latest(&root).unwrap().unwrap();
        assert!(latest.ends_with("checkpoint-0000002"), "{failing_file}: latest is {}", latest.display());
        assert_eq!(checkpoint::load(&latest).unwrap().state.step, 2);
        let leftovers: Vec<String> = std::fs::read_dir(&root).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with('.')).collect();
        assert!(leftovers.is_empty(), "{failing_file}: left behind {leftovers:?}");
        // The run continues from the checkpoint that survived.
        let mut task = PixelTask::new(pixel_config(tiny_unet_config(1, 8, None), LossKind::Mse, None, 0.0), 0, &Device::Cpu).unwrap();
        let resumed = run(&mut task, &mut pattern_loader(12, 0, false), &TrainConfig { resume: true, ..config }, None).unwrap();
        assert_eq!(resumed.losses.first().map(|l| l.0), Some(3));
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn bad_settings_are_refused() {
    let dir = scratch("bad-settings");
    let base = train_config(&dir, 10);
    let check = |config: TrainConfig, needle: &str| {
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains(needle), "{needle}: {error}");
    };
    check(TrainConfig { learning_rate: 0.0, ..base.clone() }, "learning rate");
    check(TrainConfig { learning_rate: f64::NAN, ..base.clone() }, "learning rate");
    check(TrainConfig { steps: 0, ..base.clone() }, "`steps`");
    check(TrainConfig { batch_size: 0, ..base.clone() }, "`batch_size`");
    check(TrainConfig { grad_accum: 0, ..base.clone() }, "`grad_accum`");
    check(TrainConfig { grad_clip: Some(f64::NAN), ..base.clone() }, "`grad_clip`");
    check(TrainConfig { ema: Some(EmaConfig { decay: 1.5, ..EmaConfig::default() }), ..base.clone() }, "EMA decay");
    check(TrainConfig { adamw: AdamWConfig { beta2: 1.0, ..AdamWConfig::default() }, ..base.clone() }, "beta2");
    // Resuming where there is nothing to resume.
    let mut task = PixelTask::new(pixel_config(tiny_unet_config(1, 8, None), LossKind::Mse, None, 0.0), 0, &Device::Cpu).unwrap();
    let error = run(&mut task, &mut pattern_loader(12, 0, false), &TrainConfig { resume: true, ..base.clone() }, None).unwrap_err().to_string();
    assert!(error.contains("no checkpoint"), "{error}");
    // Task settings: the model must fit the objective and the labels.
    let error = PixelTask::new(pixel_config(tiny_unet_config(1, 8, None), LossKind::Hybrid { vlb_weight: 0.001 }, None, 0.0), 0, &Device::Cpu).err().unwrap().to_string();
    assert!(error.contains("out_channels"), "{error}");
    let error = PixelTask::new(pixel_config(tiny_unet_config(1, 8, None), LossKind::Mse, None, 0.1), 0, &Device::Cpu).err().unwrap().to_string();
    assert!(error.contains("`class_dropout`"), "{error}");
    let error = PixelTask::new(pixel_config(tiny_unet_config(1, 5, None), LossKind::Mse, None, 0.0), 0, &Device::Cpu).err().unwrap().to_string();
    assert!(error.contains("multiple of 2"), "{error}");
    let error = PixelTask::new(pixel_config(UNet2DModelConfig { dropout: 0.1, ..tiny_unet_config(1, 8, None) }, LossKind::Mse, None, 0.0), 0, &Device::Cpu).err().unwrap().to_string();
    assert!(error.contains("dropout"), "{error}");
    // Class-conditional training on data without labels.
    struct Unlabelled(Patterns);
    impl Dataset for Unlabelled {
        fn len(&self) -> usize { self.0.len() }
        fn get(&mut self, index: usize) -> diffuse::Result<Example> { Ok(Example { label: None, ..self.0.get(index)? }) }
        fn num_classes(&self) -> Option<usize> { None }
        fn describe(&self) -> String { "unlabelled".into() }
    }
    let mut task = PixelTask::new(pixel_config(tiny_unet_config(1, 8, Some(3)), LossKind::Mse, Some(3), 0.0), 0, &Device::Cpu).unwrap();
    let spec = ImageSpec { channels: 1, height: 8, width: 8, fit: ImageFit::Exact };
    let mut loader = DataLoader::new(Box::new(Unlabelled(Patterns { len: 6, size: 8 })), spec, 0, false).unwrap();
    let error = run(&mut task, &mut loader, &base, None).unwrap_err().to_string();
    assert!(error.contains("needs labels"), "{error}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The project's convolution (im2col + gemm, ops/conv.rs) and its backward pass against
/// candle's own, for the kernel sizes, strides and paddings the
/// models use, on odd and even sizes.
#[test]
fn conv2d_backward_matches_candle() {
    let device = Device::Cpu;
    for (size, kernel, stride, padding) in [(8, 3, 1, 1), (7, 3, 2, 1), (8, 3, 2, 1), (9, 3, 2, 0), (8, 3, 2, 0), (6, 1, 1, 0), (6, 1, 1, 1), (5, 3, 1, 0), (6, 4, 1, 2)] {
        let input = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, size, size), &device).unwrap()).unwrap();
        let weight = Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, 3, kernel, kernel), &device).unwrap()).unwrap();
        let ours = diffuse::ops::conv2d(&input, &weight, None, stride, padding).unwrap();
        let candle = input.conv2d(&weight, padding, stride, 1, 1).unwrap();
        assert_eq!(ours.dims(), candle.dims());
        let upstream = Tensor::randn(0f32, 1.0, ours.dims(), &device).unwrap();
        let gradients = |output: &Tensor| {
            let grads = (output * &upstream).unwrap().sum_all().unwrap().backward().unwrap();
            [input.as_tensor(), weight.as_tensor()].map(|t| grads.get(t).unwrap().clone())
        };
        let (a, b) = (gradients(&ours), gradients(&candle));
        let forward_difference = max_abs_difference(&ours, &candle);
        assert!(forward_difference < 1e-5, "size {size}, kernel {kernel}, stride {stride}, padding {padding}: the output differs by {forward_difference}");
        for (name, (a, b)) in ["input", "weight"].iter().zip(a.iter().zip(&b)) {
            let difference = max_abs_difference(a, b);
            assert!(difference < 1e-4, "size {size}, kernel {kernel}, stride {stride}, padding {padding}: d{name} differs by {difference}");
        }
    }
}

/// The library's training recipe: `diffuse train`'s defaults, errors that name the recipe's
/// fields, and a whole run (data → exported DDPMPipeline) through the progress callback,
/// which can stop it.
#[test]
fn a_training_recipe_runs_and_names_its_fields_in_errors() {
    use diffuse::training::recipe::{run, LoraRecipe, ModelKind, TrainingRecipe};
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("diffuse-recipe");
    let _ = std::fs::remove_dir_all(&dir);
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    for i in 0..4u32 {
        image::GrayImage::from_fn(8, 8, |x, y| image::Luma([((x * 31 + y * 7 + i * 50) % 256) as u8])).save(data.join(format!("{i}.png"))).unwrap();
    }
    let pixel = TrainingRecipe::new(ModelKind::Pixel, &data);
    assert_eq!((pixel.noise.beta_schedule.as_str(), pixel.noise.beta_end), ("linear", 0.02));
    let text = TrainingRecipe::new(ModelKind::TextToImage, &data);
    assert_eq!((text.noise.beta_schedule.as_str(), text.noise.beta_end), ("scaled_linear", 0.012));

    let refused = |recipe: &TrainingRecipe, needle: &str| {
        let message = recipe.validate().unwrap_err().to_string();
        assert!(message.contains(needle), "{needle}: {message}");
    };
    let mut lora = text.clone();
    lora.text_to_image.lora = Some(LoraRecipe::new(4));
    refused(&lora, "`lora` needs `base`");
    lora.text_to_image.base = Some("somewhere".into());
    lora.text_to_image.lora.as_mut().unwrap().dropout = 1.0;
    refused(&lora, "the LoRA `dropout` must be in [0, 1)");
    lora.text_to_image.lora = Some(LoraRecipe { targets: vec!["text-encoder".into()], ..LoraRecipe::new(4) });
    refused(&lora, "LoRA `targets` text-encoder: no UNet layers");
    refused(&TrainingRecipe { channels: Some(2), ..pixel.clone() }, "`channels` 2");
    let mut scheduler = pixel.clone();
    scheduler.sampling.scheduler = "nope".into();
    refused(&scheduler, "the samples' `scheduler` nope");
    let missing = TrainingRecipe::new(ModelKind::Pixel, dir.join("missing"));
    let error = missing.open_dataset(&dir).err().unwrap().to_string();
    assert!(error.contains("`data`") && error.contains("no such file or folder"), "{error}");

    let mut recipe = pixel;
    recipe.model_config = Some("tiny".into());
    recipe.sampling.count = 2;
    recipe.sampling.steps = 2;
    let config = TrainConfig { steps: 3, batch_size: 2, warmup_steps: 1, checkpoint_every: 1, ..TrainConfig::new(dir.join("out")) };
    assert_eq!((config.adamw.beta1, config.ema.as_ref().map(|e| e.power)), (0.95, Some(0.75)));
    let mut messages = Vec::new();
    let mut hooks = Hooks {
        on_progress: Box::new(|p| if p.step == 2 { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }),
        on_message: Box::new(|text| messages.push(text.to_string())),
        ..Hooks::default()
    };
    let stopped = run(&recipe, &config, &mut hooks, &Device::Cpu).unwrap();
    assert!(stopped.stopped && stopped.step == 2 && stopped.exported.is_none());
    let finished = run(&recipe, &TrainConfig { resume: true, ..config.clone() }, &mut Hooks::default(), &Device::Cpu).unwrap();
    assert_eq!(finished.exported.as_deref(), Some(dir.join("out").as_path()));
    assert!(dir.join("out/unet/config.json").is_file() && dir.join("out/model_index.json").is_file());
    drop(hooks);
    assert!(messages.iter().any(|m| m.starts_with("model: UNet2DModel")), "{messages:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every fused training pass (ops/fused.rs) and its backward pass against PyTorch's autograd
/// (tools/fixtures/fused_backward.py, float64): the output and the gradient of every input, in
/// f32, through the library's public `ops` functions (so with `DIFFUSE_ISA=tensor` the same
/// checks hold candle's tensor-operation path, the one other devices take).
#[test]
fn fused_backward_passes_match_pytorch() {
    use diffuse::ops;
    let fixture = load_tensors(&fixtures_dir().join("training/fused_backward.safetensors"));
    let get = |name: &str| fixture.get(name).unwrap_or_else(|| panic!("fixture lacks {name}")).to_dtype(DType::F32).unwrap();
    type Forward<'a> = dyn Fn(&HashMap<&str, Tensor>) -> diffuse::Result<Tensor> + 'a;
    let check = |op: &str, trained: &[&str], frozen: &[&str], forward: &Forward<'_>| {
        let vars: Vec<Var> = trained.iter().map(|n| Var::from_tensor(&get(&format!("{op}.{n}"))).unwrap()).collect();
        let mut inputs: HashMap<&str, Tensor> = trained.iter().zip(&vars).map(|(n, v)| (*n, v.as_tensor().clone())).collect();
        inputs.extend(frozen.iter().map(|n| (*n, get(&format!("{op}.{n}")))));
        let out = forward(&inputs).unwrap();
        let close = |what: &str, got: &Tensor, want: &Tensor| {
            let (got, want) = (to_vec_f32(got), to_vec_f32(want));
            assert_eq!(got.len(), want.len(), "{op} {what}: size");
            let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
            let worst = got.iter().zip(&want).map(|(g, w)| (g - w).abs()).fold(0f32, f32::max);
            assert!(worst <= 2e-5 * scale, "{op} {what}: off by {worst} (scale {scale})");
        };
        close("output", &out, &get(&format!("{op}.out")));
        let grads = (out * get(&format!("{op}.probe"))).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, var) in trained.iter().zip(&vars) {
            let grad = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{op}: no gradient for {name}"));
            close(&format!("∂{name}"), grad, &get(&format!("{op}.grad_{name}")));
        }
    };
    check("silu", &["x"], &[], &|t| ops::silu(&t["x"]));
    check("geglu", &["x"], &[], &|t| ops::geglu(&t["x"]));
    check("layer_norm", &["x", "weight", "bias"], &[], &|t| ops::layer_norm(&t["x"], &t["weight"], &t["bias"], 1e-5));
    check("group_norm", &["x", "weight", "bias"], &[], &|t| ops::group_norm(&t["x"], 3, &t["weight"], &t["bias"], 1e-6));
    check("group_norm_silu", &["x", "weight", "bias"], &[], &|t| ops::group_norm_silu(&t["x"], 3, &t["weight"], &t["bias"], 1e-6));
    check("linear", &["x", "weight", "bias"], &[], &|t| ops::linear(&t["x"], &t["weight"], Some(&t["bias"])));
    check("lora_linear", &["x", "a", "b"], &["weight", "bias"], &|t| {
        let (x, weight, bias, a, b) = (&t["x"], &t["weight"], &t["bias"], &t["a"], &t["b"]);
        match ops::linear_with_lora(x, weight, Some(bias), a, b, 0.75)? {
            Some(output) => Ok(output),
            // Other devices build the branch from linear layers.
            None => Ok((ops::linear(x, weight, Some(bias))? + (ops::linear(&ops::linear(x, a, None)?, b, None)? * 0.75)?)?),
        }
    });
    // A 1×1 identity convolution, then the per-channel bias.
    let identity = Tensor::eye(5, DType::F32, &Device::Cpu).unwrap().reshape((5, 5, 1, 1)).unwrap();
    check("conv_bias", &["x", "bias"], &[], &|t| ops::conv2d(&t["x"], &identity, Some(&t["bias"]), 1, 0));
    check("attention", &["q", "k", "v"], &[], &|t| ops::scaled_dot_product_attention(&t["q"], &t["k"], &t["v"], None));
    // The masked path (candle's products, the trainable softmax), with a mask that changes nothing.
    let zeros = Tensor::zeros((17, 11), DType::F32, &Device::Cpu).unwrap();
    check("attention", &["q", "k", "v"], &[], &|t| ops::masked_attention(&t["q"], &t["k"], &t["v"], 8f64.powf(-0.5), &zeros));
    // The convolution's own passes: channel-blocked (AVX2) and packed, bias as an operand.
    check("conv_blocked", &["x", "weight", "bias"], &[], &|t| ops::conv2d(&t["x"], &t["weight"], Some(&t["bias"]), 1, 1));
    check("conv_strided", &["x", "weight", "bias"], &[], &|t| ops::conv2d(&t["x"], &t["weight"], Some(&t["bias"]), 2, 1));
    check("conv_image_bias", &["x", "weight", "bias", "image_bias"], &[], &|t| {
        ops::conv2d_plus_image_bias(&t["x"], &t["weight"], Some(&t["bias"]), &t["image_bias"], 1, 1)
    });
    check("upsample_nearest", &["x"], &[], &|t| ops::upsample_nearest2d(&t["x"], 8, 10));
}
