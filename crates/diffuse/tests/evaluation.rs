//! The quality evaluation (diffuse::evaluation): the Fréchet distance against scipy, the
//! classifier on a small synthetic set it must learn, and the whole evaluation on the tiny
//! random Stable Diffusion fixture.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use diffuse::evaluation::classifier::{
    classifier_from_weights, classify_dataset, save_classifier, train_classifier, Classifier, ClassifierConfig, ClassifierTraining,
};
use diffuse::evaluation::frechet::{frechet_distance, FeatureStatistics};
use diffuse::evaluation::{evaluate, generate_class_images, FashionMnist, GenerationSettings, Stage};
use diffuse::pipelines::stable_diffusion::StableDiffusionPipeline;
use diffuse::training::data::{Dataset, ImageFit};

use common::{fixtures_dir, load_tensors, to_vec_f64};

// ---- Fréchet distance ----

#[test]
fn frechet_distance_matches_scipy_sqrtm() {
    let tensors = load_tensors(&fixtures_dir().join("evaluation/frechet.safetensors"));
    for case in ["small", "wide"] {
        let get = |name: &str| tensors.get(&format!("{case}.{name}")).unwrap_or_else(|| panic!("{case}.{name} missing"));
        let dim = get("a").dim(1).unwrap();
        let a = FeatureStatistics::from_features(&to_vec_f64(get("a")), dim).unwrap();
        let b = FeatureStatistics::from_features(&to_vec_f64(get("b")), dim).unwrap();
        // numpy's mean and np.cov.
        let relative = |actual: &[f64], expected: &[f64]| {
            let scale = expected.iter().fold(0f64, |m, v| m.max(v.abs()));
            actual.iter().zip(expected).map(|(x, y)| (x - y).abs() / scale).fold(0f64, f64::max)
        };
        assert!(relative(&a.mean, &to_vec_f64(get("mean_a"))) < 1e-12, "{case}: mean");
        assert!(relative(&a.covariance, &to_vec_f64(get("covariance_a"))) < 1e-12, "{case}: covariance");
        let expected = to_vec_f64(get("distance"))[0];
        let actual = frechet_distance(&a, &b).unwrap();
        let error = (actual - expected).abs() / expected.abs();
        assert!(error < 1e-6, "{case}: Fréchet distance {actual}, scipy {expected} (relative error {error:.2e})");
        // Symmetric in its arguments.
        let swapped = frechet_distance(&b, &a).unwrap();
        assert!((swapped - expected).abs() / expected.abs() < 1e-6, "{case}: swapped {swapped}");
    }
}

// ---- Synthetic IDX data ----

/// Writes an IDX images file (`[N, 28, 28]` bytes) and its labels file.
fn write_idx(dir: &Path, stem: &str, images: &[Vec<u8>], labels: &[u8]) {
    let mut bytes = vec![0, 0, 8, 3];
    for dim in [images.len() as u32, 28, 28] {
        bytes.extend(dim.to_be_bytes());
    }
    for image in images {
        bytes.extend(image);
    }
    std::fs::write(dir.join(format!("{stem}-images-idx3-ubyte")), bytes).unwrap();
    let mut bytes = vec![0, 0, 8, 1];
    bytes.extend((labels.len() as u32).to_be_bytes());
    bytes.extend(labels);
    std::fs::write(dir.join(format!("{stem}-labels-idx1-ubyte")), bytes).unwrap();
}

/// A 28×28 image of class `label`: a bright 8-pixel-high band whose position says the class
/// (so that any classifier can tell them apart), on noise.
fn synthetic_image(label: usize, num_classes: usize, seed: usize) -> Vec<u8> {
    let mut state = (seed as u64).wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let top = label * 20 / num_classes.max(2).saturating_sub(1).max(1);
    (0..28 * 28)
        .map(|i| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let noise = (state >> 58) as u8; // 0..63
            let row = i / 28;
            if row >= top && row < top + 8 {
                180 + noise
            } else {
                noise
            }
        })
        .collect()
}

/// A folder with synthetic Fashion-MNIST-named IDX files: `per_class` training and test
/// images of each class.
fn synthetic_fashion_mnist(dir: &Path, num_classes: usize, train_per_class: usize, test_per_class: usize) -> FashionMnist {
    std::fs::create_dir_all(dir).unwrap();
    for (stem, per_class, offset) in [("train", train_per_class, 0), ("t10k", test_per_class, 1_000_000)] {
        let labels: Vec<u8> = (0..per_class * num_classes).map(|i| (i % num_classes) as u8).collect();
        let images: Vec<Vec<u8>> = labels.iter().enumerate().map(|(i, &l)| synthetic_image(l as usize, num_classes, offset + i)).collect();
        write_idx(dir, stem, &images, &labels);
    }
    FashionMnist::locate(dir).unwrap()
}

fn scratch_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("diffuse-evaluation-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn missing_dataset_files_are_named() {
    let dir = scratch_dir("missing");
    std::fs::create_dir_all(&dir).unwrap();
    let error = FashionMnist::locate(&dir).unwrap_err().to_string();
    assert!(error.contains("train-images-idx3-ubyte.gz"), "{error}");
    synthetic_fashion_mnist(&dir, 3, 1, 1);
    std::fs::remove_file(dir.join("t10k-labels-idx1-ubyte")).unwrap();
    let error = FashionMnist::locate(&dir).unwrap_err().to_string();
    assert!(error.contains("t10k-labels-idx1-ubyte"), "{error}");
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- The classifier ----

#[test]
fn classifier_learns_a_separable_set_and_round_trips() {
    let dir = scratch_dir("classifier");
    let data = synthetic_fashion_mnist(&dir.join("data"), 4, 80, 25);
    let config = ClassifierConfig { block_channels: vec![8, 16], feature_dim: 16, num_classes: 4, ..ClassifierConfig::default() };
    let training = ClassifierTraining { epochs: 2, batch_size: 32, warmup_steps: 2, learning_rate: 3e-3, ..ClassifierTraining::default() };
    let device = Device::Cpu;
    let mut losses = Vec::new();
    let weights =
        train_classifier(&config, &training, Box::new(data.train().unwrap()), ImageFit::Pad, &device, &mut |p| losses.push(p.loss)).unwrap();
    assert_eq!(losses.len(), 2 * 10, "2 epochs of 320 images in batches of 32");
    let first: f32 = losses[..3].iter().sum::<f32>() / 3.0;
    let last: f32 = losses[losses.len() - 3..].iter().sum::<f32>() / 3.0;
    assert!(first > 1.2, "a 4-class classifier starts near ln 4 = 1.39, got {first}");
    assert!(last < 0.5 * first, "the loss went from {first} to {last}");

    let classifier = classifier_from_weights(&weights, &config, &device).unwrap();
    let mut test = data.test().unwrap();
    let indices: Vec<usize> = (0..test.len()).collect();
    let result = classify_dataset(&classifier, &mut test, &indices, ImageFit::Pad, &device, &mut |_, _| {}).unwrap();
    let accuracy = result.accuracy(4);
    assert!(accuracy.overall() >= 0.95, "test accuracy {:?}", accuracy);
    assert_eq!(result.features.len(), 100 * 16);

    // Saved and loaded, it classifies the same (the features to the last bit).
    let saved = dir.join("classifier");
    save_classifier(&saved, &weights, &config, &training, &accuracy).unwrap();
    let loaded = Classifier::load(&saved, &device).unwrap();
    assert_eq!(loaded.config, config);
    let again = classify_dataset(&loaded, &mut test, &indices, ImageFit::Pad, &device, &mut |_, _| {}).unwrap();
    assert_eq!(again.predictions, result.predictions);
    assert_eq!(again.features, result.features);
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(saved.join("config.json")).unwrap()).unwrap();
    assert_eq!(json["test_accuracy"].as_f64(), Some(accuracy.overall()));
    assert_eq!(json["training"]["epochs"].as_u64(), Some(2));
    let leftovers: Vec<_> = std::fs::read_dir(&saved).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers.len(), 2, "only config.json and model.safetensors: {leftovers:?}");

    // A wrong layout names the file and the key; a missing weights file is named.
    std::fs::write(saved.join("config.json"), r#"{"image_size": 30, "block_channels": [8, 16], "num_classes": 4}"#).unwrap();
    let error = Classifier::load(&saved, &device).err().unwrap().to_string();
    assert!(error.contains("config.json") && error.contains("image_size"), "{error}");
    std::fs::write(saved.join("config.json"), r#"{"block_channels": [8, 32], "feature_dim": 16, "num_classes": 4}"#).unwrap();
    let error = Classifier::load(&saved, &device).err().unwrap().to_string();
    assert!(error.contains("model.safetensors") && error.contains("blocks.1"), "{error}");
    std::fs::remove_file(saved.join("model.safetensors")).unwrap();
    let error = Classifier::load(&saved, &device).err().unwrap().to_string();
    assert!(error.contains("model.safetensors"), "{error}");
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- The evaluation on the tiny random pipeline ----

fn tiny_pipeline() -> StableDiffusionPipeline {
    StableDiffusionPipeline::load(&fixtures_dir().join("sd/sd1"), None, &[], None, &Device::Cpu, DType::F32).unwrap()
}

#[test]
fn each_image_comes_from_its_own_seed_whatever_the_batch() {
    let mut pipeline = tiny_pipeline();
    let settings = |batch_size| GenerationSettings {
        per_class: 3,
        batch_size,
        prompt_words: vec!["sneaker".to_string(), "bag".to_string()],
        num_inference_steps: 2,
        ..GenerationSettings::default()
    };
    let batched = generate_class_images(&mut pipeline, &settings(3), &mut |_, _| {}, &mut |_| {}).unwrap();
    let single = generate_class_images(&mut pipeline, &settings(1), &mut |_, _| {}, &mut |_| {}).unwrap();
    assert_eq!(batched.len(), 2);
    let mut distinct = std::collections::HashSet::new();
    for (batched, single) in batched.iter().flatten().zip(single.iter().flatten()) {
        assert_eq!((batched.0, batched.1, batched.2), (64, 64, 3));
        // The same image up to a rounding step of the batched arithmetic.
        let largest = batched.3.iter().zip(&single.3).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
        assert!(largest <= 1, "pixels differ by {largest}");
        distinct.insert(batched.3.clone());
    }
    assert_eq!(distinct.len(), 6, "six seeds, six images");
}

#[test]
fn evaluation_runs_end_to_end_on_the_tiny_pipeline() {
    let dir = scratch_dir("end-to-end");
    let data = synthetic_fashion_mnist(&dir.join("data"), 10, 3, 2);
    let device = Device::Cpu;
    let config = ClassifierConfig::default();
    let training = ClassifierTraining { epochs: 1, batch_size: 15, ..ClassifierTraining::default() };
    let weights = train_classifier(&config, &training, Box::new(data.train().unwrap()), ImageFit::Pad, &device, &mut |_| {}).unwrap();
    let classifier = classifier_from_weights(&weights, &config, &device).unwrap();
    let mut pipeline = tiny_pipeline();
    let settings = GenerationSettings { per_class: 2, batch_size: 2, num_inference_steps: 2, ..GenerationSettings::default() };
    let mut stages = Vec::new();
    let (report, images) = evaluate(
        &mut pipeline,
        &classifier,
        &data,
        &settings,
        &mut |stage, _, _| {
            if stages.last() != Some(&stage) {
                stages.push(stage);
            }
        },
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(stages, [Stage::ClassifyingTest, Stage::ClassifyingTrain, Stage::Generating, Stage::ClassifyingGenerated]);
    assert_eq!(images.len(), 10);
    assert!(images.iter().all(|class| class.len() == 2));
    assert_eq!((report.num_generated, report.num_test, report.num_train_subset), (20, 20, 20));
    assert_eq!(report.generated_size, (64, 64));
    assert!(report.resized);
    assert_eq!(report.classes[7].prompt, "a photo of a sneaker");
    assert_eq!(report.classes[0].name, "T-shirt/top");
    assert!(report.generated_confusion.iter().all(|row| row.iter().sum::<usize>() == 2));
    let correct: usize = (0..10).map(|c| report.generated_confusion[c][c]).sum();
    assert_eq!(report.generated_accuracy, correct as f64 / 20.0);
    assert!(report.ratio.is_finite() && report.passed == (report.ratio >= 0.9));
    // Distances are ≥ 0 up to rounding, and random noise is farther from the data than
    // real images of the same kind.
    assert!(report.frechet_train_test > -1e-6, "{}", report.frechet_train_test);
    assert!(report.frechet_generated_test > report.frechet_train_test, "{report:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The classifier built into diffuse is written out and loads, so that `diffuse evaluate`
/// works outside the repository; it is the committed one, byte for byte.
#[test]
fn the_built_in_classifier_loads() {
    let root = scratch_dir("builtin-classifier");
    let dir = diffuse::default_model::materialize_classifier(&root).unwrap();
    assert!(dir.starts_with(&root) && dir.ends_with(diffuse::default_model::CLASSIFIER_NAME), "{}", dir.display());
    let committed = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/fashion-mnist-classifier");
    for file in ["config.json", "model.safetensors"] {
        assert_eq!(std::fs::read(dir.join(file)).unwrap(), std::fs::read(committed.join(file)).unwrap(), "{file}");
    }
    let classifier = Classifier::load(&dir, &Device::Cpu).unwrap();
    let (features, logits) = classifier.forward(&candle_core::Tensor::zeros((2, 1, 32, 32), candle_core::DType::F32, &Device::Cpu).unwrap()).unwrap();
    assert_eq!(logits.dims(), &[2, 10]);
    assert_eq!(features.dims()[0], 2);
    // Written once: a second call finds the files in place.
    assert_eq!(diffuse::default_model::materialize_classifier(&root).unwrap(), dir);
}
