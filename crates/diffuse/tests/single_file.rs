//! Single-file LDM checkpoints read as diffusers components.
//!
//! Fixtures from tools/fixtures/single_file.py: two tiny pipelines saved as diffusers folders and
//! converted to LDM single files (diffusers' own from_single_file reproduces the folders from
//! them), and the names and shapes of full-size SD 1.5 / SD 2.1 in both layouts.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use diffuse::loading::single_file::{recognise, Component, Family, SingleFile};
use serde_json::{Map, Value};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/single_file")
}

fn configs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("configs")
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn read_object(path: &Path) -> Map<String, Value> {
    match read_json(path) {
        Value::Object(map) => map,
        _ => panic!("{}: not an object", path.display()),
    }
}

fn weights_file(component: Component) -> &'static str {
    match component {
        Component::TextEncoder => "model.safetensors",
        _ => "diffusion_pytorch_model.safetensors",
    }
}

/// Raw little-endian bytes: equal bytes means equal values, dtype and all.
fn bytes(t: &Tensor) -> Vec<u8> {
    let t = t.flatten_all().unwrap();
    match t.dtype() {
        DType::F16 => t.to_vec1::<half::f16>().unwrap().iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::F32 => t.to_vec1::<f32>().unwrap().iter().flat_map(|v| v.to_le_bytes()).collect(),
        other => panic!("unexpected dtype {other:?}"),
    }
}

/// Every tensor of the diffusers folder comes out of the single file under the same name, with
/// the same shape and the same values, both from `load` and through a `VarBuilder`; and the
/// configs derived from the shapes are the folder's.
fn check_tiny(name: &str, family: Family, inpainting: bool, expected_ignored: &[&str]) {
    let folder = fixtures().join(name);
    let file = SingleFile::open(folder.join("model.safetensors")).unwrap();
    assert_eq!(file.family(), family);
    assert_eq!(file.recognised().inpainting, inpainting);
    let mut ignored = file.recognised().ignored.clone();
    ignored.sort();
    let mut expected: Vec<String> = expected_ignored.iter().map(|s| s.to_string()).collect();
    expected.sort();
    assert_eq!(ignored, expected, "ignored tensors");

    let device = Device::Cpu;
    for component in Component::ALL {
        let sub = folder.join(component.folder());
        let reference = candle_core::safetensors::load(sub.join(weights_file(component)), &device).unwrap();
        let loaded = file.load(component, &device).unwrap();
        let mut reference_names: Vec<&String> = reference.keys().collect();
        let mut loaded_names: Vec<&String> = loaded.keys().collect();
        reference_names.sort();
        loaded_names.sort();
        assert_eq!(loaded_names, reference_names, "{name} {component:?}: names");
        let vb = file.var_builder(component, DType::F32, &device);
        for (tensor_name, expected) in &reference {
            let actual = &loaded[tensor_name];
            assert_eq!(actual.dims(), expected.dims(), "{name}: {tensor_name} shape");
            assert_eq!(actual.dtype(), expected.dtype(), "{name}: {tensor_name} dtype");
            assert!(bytes(actual) == bytes(expected), "{name}: {tensor_name} values differ");
            assert!(vb.contains_tensor(tensor_name), "{name}: VarBuilder lacks {tensor_name}");
            let through_vb = vb.get(expected.dims(), tensor_name).unwrap();
            let expected_f32 = expected.to_dtype(DType::F32).unwrap();
            assert!(bytes(&through_vb) == bytes(&expected_f32), "{name}: {tensor_name} via VarBuilder differs");
        }
        assert!(!vb.contains_tensor("no.such.tensor"));

        // The derived config states every key the folder's does, with the same value, except
        // norm_num_groups: invisible in the weights, SD's 32 is too many for these toy widths.
        let folder_config = read_object(&sub.join("config.json"));
        for (key, value) in file.config(component) {
            if key == "norm_num_groups" {
                assert_eq!(value, &Value::from(32), "{name} {component:?}: {key}");
                continue;
            }
            assert_eq!(Some(value), folder_config.get(key), "{name} {component:?}: config key {key}");
        }
    }
}

#[test]
fn tiny_sd1_gives_the_diffusers_folder() {
    check_tiny(
        "sd1_tiny",
        Family::StableDiffusion1,
        false,
        &[
            "alphas_cumprod",
            "betas",
            "model_ema.decay",
            "model_ema.num_updates",
            "cond_stage_model.transformer.text_model.embeddings.position_ids",
        ],
    );
}

#[test]
fn tiny_sd2_inpainting_gives_the_diffusers_folder() {
    let last_layer = [
        "attn.in_proj_bias",
        "attn.in_proj_weight",
        "attn.out_proj.bias",
        "attn.out_proj.weight",
        "ln_1.bias",
        "ln_1.weight",
        "ln_2.bias",
        "ln_2.weight",
        "mlp.c_fc.bias",
        "mlp.c_fc.weight",
        "mlp.c_proj.bias",
        "mlp.c_proj.weight",
    ]
    .map(|tail| format!("cond_stage_model.model.transformer.resblocks.2.{tail}"));
    let mut ignored: Vec<&str> = vec![
        "alphas_cumprod",
        "betas",
        "model_ema.decay",
        "model_ema.num_updates",
        "cond_stage_model.model.text_projection",
        "cond_stage_model.model.logit_scale",
    ];
    ignored.extend(last_layer.iter().map(String::as_str));
    check_tiny("sd2_inpaint_tiny", Family::StableDiffusion2, true, &ignored);
}

#[test]
fn tiny_scheduler_configs() {
    let sd1 = SingleFile::open(fixtures().join("sd1_tiny/model.safetensors")).unwrap();
    let config = sd1.scheduler_config(None).unwrap();
    assert_eq!(config["_class_name"], "PNDMScheduler");
    assert_eq!(config["prediction_type"], "epsilon");
    assert_eq!(sd1.scheduler_config(Some("v_prediction")).unwrap()["prediction_type"], "v_prediction");

    // SD 2 inpainting is an epsilon model; only the 768-px SD 2 defaults to v-prediction.
    let sd2 = SingleFile::open(fixtures().join("sd2_inpaint_tiny/model.safetensors")).unwrap();
    let config = sd2.scheduler_config(None).unwrap();
    assert_eq!(config["_class_name"], "DDIMScheduler");
    assert_eq!(config["prediction_type"], "epsilon");

    let err = sd2.scheduler_config(Some("v-pred")).unwrap_err().to_string();
    assert!(err.contains("prediction_type `v-pred`"), "{err}");
}

/// Full-size SD 1.5 and 2.1: recognised from names and shapes alone, the configs are exactly the
/// hub's, and every diffusers tensor is produced with its shape.
fn check_full_size(family_dir: &str, family: Family) {
    let json = read_json(&fixtures().join(format!("shapes_{family_dir}.json")));
    let shapes_of = |v: &Value| -> BTreeMap<String, Vec<usize>> {
        v.as_object()
            .unwrap()
            .iter()
            .map(|(k, s)| (k.clone(), s.as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect()))
            .collect()
    };
    let ldm = shapes_of(&json["ldm"]);
    let recognised = recognise(&ldm, Path::new("shapes.json")).unwrap();
    assert_eq!(recognised.family, family);
    assert!(!recognised.inpainting);
    for component in Component::ALL {
        let expected = read_object(&configs().join(family_dir).join(component.folder()).join("config.json"));
        assert_eq!(recognised.config(component), &expected, "{family_dir} {component:?} config");
        let diffusers = shapes_of(&json["diffusers"][component.folder()]);
        let produced: BTreeMap<String, Vec<usize>> =
            recognised.weights(component).iter().map(|(k, s)| (k.clone(), s.shape.clone())).collect();
        let missing: Vec<&String> = diffusers.keys().filter(|k| !produced.contains_key(*k)).collect();
        let extra: Vec<&String> = produced.keys().filter(|k| !diffusers.contains_key(*k)).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{family_dir} {component:?}: missing {missing:?}, extra {extra:?}"
        );
        assert_eq!(produced, diffusers, "{family_dir} {component:?} shapes");
    }
    let mut scheduler = read_object(&configs().join(family_dir).join("scheduler/scheduler_config.json"));
    scheduler.entry("prediction_type").or_insert("epsilon".into());
    assert_eq!(recognised.scheduler_config(None).unwrap(), scheduler);
}

#[test]
fn full_size_sd15_recognised_from_shapes() {
    check_full_size("sd15", Family::StableDiffusion1);
}

#[test]
fn full_size_sd21_recognised_from_shapes() {
    check_full_size("sd21", Family::StableDiffusion2);
}

#[test]
fn full_size_sd21_heads_and_layers() {
    let json = read_json(&fixtures().join("shapes_sd21.json"));
    let ldm: BTreeMap<String, Vec<usize>> = serde_json::from_value(json["ldm"].clone()).unwrap();
    let recognised = recognise(&ldm, Path::new("shapes.json")).unwrap();
    let unet = recognised.config(Component::Unet);
    assert_eq!(unet["attention_head_dim"], serde_json::json!([5, 10, 20, 20]));
    assert_eq!(unet["use_linear_projection"], true);
    assert_eq!(unet["sample_size"], 96);
    // 24 OpenCLIP layers in the file, the last unused.
    assert_eq!(recognised.config(Component::TextEncoder)["num_hidden_layers"], 23);
    assert!(recognised
        .ignored
        .iter()
        .any(|k| k == "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight"));
    // v-prediction by default for SD 2.x (768).
    assert_eq!(recognised.scheduler_config(None).unwrap()["prediction_type"], "v_prediction");
}

// ---------------------------------------------------------------------------------------------
// errors
// ---------------------------------------------------------------------------------------------

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("diffuse-single-file");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn open_err(path: &Path) -> String {
    match SingleFile::open(path) {
        Ok(_) => panic!("{} opened", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn truncated_file_is_an_error() {
    let original = std::fs::read(fixtures().join("sd1_tiny/model.safetensors")).unwrap();
    for (name, len) in [("cut_in_data.safetensors", original.len() - 1000), ("cut_in_header.safetensors", 100)] {
        let path = scratch(name);
        std::fs::write(&path, &original[..len]).unwrap();
        let err = open_err(&path);
        assert!(err.contains(name) && err.contains("truncated or corrupt"), "{err}");
    }
}

#[test]
fn missing_file_is_an_io_error() {
    let path = scratch("nowhere.safetensors");
    let err = open_err(&path);
    assert!(err.contains("nowhere.safetensors"), "{err}");
}

fn tiny_sd1_tensors() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("sd1_tiny/model.safetensors"), &Device::Cpu).unwrap()
}

fn save(tensors: &HashMap<String, Tensor>, name: &str) -> PathBuf {
    let path = scratch(name);
    candle_core::safetensors::save(tensors, &path).unwrap();
    path
}

#[test]
fn unknown_architecture_names_the_missing_tensor() {
    let mut tensors = HashMap::new();
    let t = Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap();
    tensors.insert("conditioner.embedders.0.transformer.text_model.final_layer_norm.weight".to_string(), t.clone());
    tensors.insert("model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight".to_string(), t);
    let err = open_err(&save(&tensors, "sdxl_like.safetensors"));
    assert!(err.contains("no tensor matches model.diffusion_model.input_blocks.0.0.weight"), "{err}");
    assert!(err.contains("1.x/2.x/XL") && err.contains("model.diffusion_model (1)"), "{err}");
}

#[test]
fn tensors_that_do_not_fit_are_named() {
    let mut tensors = tiny_sd1_tensors();
    let extra = Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap();
    tensors.insert("model.diffusion_model.input_blocks.1.2.weight".to_string(), extra.clone());
    tensors.insert("first_stage_model.encoder.mid.attn_2.q.weight".to_string(), extra);
    let err = open_err(&save(&tensors, "extra_unet.safetensors"));
    assert!(err.contains("do not fit a Stable Diffusion UNet: model.diffusion_model.input_blocks.1.2.weight"), "{err}");

    let mut tensors = tiny_sd1_tensors();
    tensors.remove("model.diffusion_model.input_blocks.1.0.out_layers.3.weight");
    let err = open_err(&save(&tensors, "missing_resnet.safetensors"));
    assert!(err.contains("no tensor matches model.diffusion_model.input_blocks.1.0.out_layers.3.weight"), "{err}");

    let mut tensors = tiny_sd1_tensors();
    tensors.retain(|k, _| !k.starts_with("cond_stage_model."));
    let err = open_err(&save(&tensors, "no_text_encoder.safetensors"));
    assert!(
        err.contains("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight")
            && err.contains("cond_stage_model.model.token_embedding.weight"),
        "{err}"
    );
}

#[test]
fn pickle_checkpoints_are_refused_with_a_way_out() {
    // By name, whatever the content...
    let ckpt = scratch("model.ckpt");
    std::fs::write(&ckpt, b"anything").unwrap();
    // ...and by content (a torch.save zip archive) whatever the name.
    let disguised = scratch("disguised.safetensors");
    std::fs::write(&disguised, b"PK\x03\x04rest of a zip").unwrap();
    for path in [ckpt, disguised] {
        let err = open_err(&path);
        assert!(err.contains("pickle") && err.contains("arbitrary"), "{err}");
        assert!(err.contains("save_file(") && err.contains("from_single_file("), "{err}");
    }
}

#[test]
fn safetensors_header_length_like_a_pickle_opcode_is_not_refused() {
    // A header 0x280 bytes long starts the file with 80 02, as a protocol-2 pickle does.
    let mut header = br#"{"__metadata__":{"format":"pt"}}"#.to_vec();
    header.resize(0x280, b' ');
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header);
    assert_eq!(&bytes[..2], &[0x80, 0x02]);
    let path = scratch("header_0x280.safetensors");
    std::fs::write(&path, bytes).unwrap();
    let err = open_err(&path);
    assert!(!err.contains("pickle"), "{err}");
    assert!(err.contains("no tensor matches model.diffusion_model.input_blocks.0.0.weight"), "{err}");
}

#[test]
fn bare_pickle_is_refused_whatever_its_name() {
    let path = scratch("protocol2.safetensors");
    std::fs::write(&path, b"\x80\x02}q\x00.").unwrap();
    let err = open_err(&path);
    assert!(err.contains("pickle") && err.contains("arbitrary"), "{err}");
}

#[test]
fn var_builder_shape_mismatch_names_both_tensors() {
    let file = SingleFile::open(fixtures().join("sd2_inpaint_tiny/model.safetensors")).unwrap();
    let vb = file.var_builder(Component::TextEncoder, DType::F32, &Device::Cpu);
    let name = "text_model.encoder.layers.0.self_attn.k_proj.weight";
    assert_eq!(vb.get((32, 32), name).unwrap().dims(), &[32, 32]);
    let err = vb.get((96, 32), name).unwrap_err().to_string();
    assert!(err.contains(name) && err.contains("attn.in_proj_weight"), "{err}");
    let err = vb.get(4, "text_model.no_such_weight").unwrap_err().to_string();
    assert!(err.contains("text_model.no_such_weight"), "{err}");
}
