//! LoRA tensor names in the formats people share, and the model layer each one adapts: the
//! naming rules of diffusers/loaders/lora_conversion_utils.py (`_convert_non_diffusers_lora_to_diffusers`,
//! `_convert_unet_lora_key`, `_convert_text_encoder_lora_key`, `_maybe_map_sgm_blocks_to_diffusers`)
//! and diffusers/utils/state_dict_utils.py (`UNET_TO_DIFFUSERS`, `DIFFUSERS_OLD_TO_PEFT`,
//! `KEYS_TO_ALWAYS_REPLACE`).
//!
//! diffusers turns kohya's names back into module paths by string replacements
//! (`lora_unet_down_blocks_0_...` -> `down.blocks.0...` -> `down_blocks.0...`), which must know every
//! module name that contains an underscore. We go the other way: a layer is looked up by its
//! *flat* name, the module path with every `.` written `_` (exactly how kohya names layers), and
//! the model's weights are flattened the same way when the model asks for them. So kohya's names
//! need no list of renames, every layer kind (attention, feed-forward, resnet convolutions,
//! time embedding) is found, and the mapping reverses trivially: [`kohya_name`] and [`peft_key`]
//! give the names a writer uses for a diffusers module path.
//!
//! kohya files for models trained on the original LDM UNet (SDXL's sgm code, ComfyUI exports)
//! name layers by LDM block (`input_blocks_1_1_...`); [`ldm_unet_to_diffusers`] maps those to the
//! diffusers blocks as `_maybe_map_sgm_blocks_to_diffusers` does, with the layout of
//! loading/single_file.rs's `unet_name` (an SD 1.x upsampler is `output_blocks_N_1_conv` when its
//! up block has no attention, and block numbers are matched whole: diffusers'
//! `f"input_blocks_{i}" in key` also takes `input_blocks_10` for block 1).

/// A Stable Diffusion model a LoRA adapts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    /// The UNet.
    Unet,
    /// The (first) CLIP text encoder.
    TextEncoder,
    /// SDXL's second text encoder (OpenCLIP bigG; the refiner's only one).
    TextEncoder2,
}

impl Target {
    /// Every target, in order.
    pub const ALL: [Target; 3] = [Target::Unet, Target::TextEncoder, Target::TextEncoder2];

    /// The key prefix of diffusers' `save_lora_weights` (`unet.`, `text_encoder.`,
    /// `text_encoder_2.` without the dot).
    pub fn diffusers_prefix(self) -> &'static str {
        match self {
            Target::Unet => "unet",
            Target::TextEncoder => "text_encoder",
            Target::TextEncoder2 => "text_encoder_2",
        }
    }

    /// kohya's layer-name prefix (SDXL files name the first encoder `lora_te1_`, also read).
    pub fn kohya_prefix(self) -> &'static str {
        match self {
            Target::Unet => "lora_unet_",
            Target::TextEncoder => "lora_te_",
            Target::TextEncoder2 => "lora_te2_",
        }
    }

    /// The model's name in messages.
    pub fn label(self) -> &'static str {
        match self {
            Target::Unet => "UNet",
            Target::TextEncoder => "text encoder",
            Target::TextEncoder2 => "second text encoder",
        }
    }

    /// Whether this is one of the CLIP text encoders.
    pub fn is_text_encoder(self) -> bool {
        self != Target::Unet
    }
}

/// Which tensor of a LoRA layer a key holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Part {
    /// `lora_A` / `lora_down`: `[rank, in]` (`[rank, in, kh, kw]` for a convolution).
    Down,
    /// `lora_B` / `lora_up`: `[out, rank]` (`[out, rank, 1, 1]`).
    Up,
    /// kohya's `alpha`, a scalar: the layer's scale is alpha / rank.
    Alpha,
}

/// The naming convention of a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Format {
    /// diffusers' `save_lora_weights` of a peft adapter: `unet.<module>.lora_A.weight`.
    Peft,
    /// kohya-ss / AUTOMATIC1111: `lora_unet_<flat module>.lora_down.weight`, `.alpha`.
    Kohya,
    /// diffusers' older attention-processor (and `lora_linear_layer`) names:
    /// `unet.<attention>.processor.to_q_lora.down.weight`.
    DiffusersOld,
}

impl Format {
    /// The format's name in messages.
    pub fn label(self) -> &'static str {
        match self {
            Format::Peft => "diffusers/PEFT",
            Format::Kohya => "kohya",
            Format::DiffusersOld => "diffusers attention-processor",
        }
    }
}

/// What one key of a LoRA file is.
#[derive(Clone, Debug, PartialEq)]
pub enum KeyMeaning {
    /// One tensor of the layer `module`: a diffusers module path (`down_blocks.0....to_q`) for
    /// the dotted formats, kohya's flat name (`down_blocks_0_..._to_q`) for kohya's.
    Tensor {
        /// The model the layer is in.
        owner: Target,
        /// The layer's name.
        module: String,
        /// Which of the layer's tensors.
        part: Part,
        /// The naming convention the key follows.
        format: Format,
    },
    /// Not a LoRA tensor diffuse applies; the reason.
    Skipped(&'static str),
}

/// Why DoRA tensors are skipped.
pub const DORA: &str = "DoRA magnitudes (dora_scale / lora_magnitude_vector), which diffuse does not apply";
/// Why LyCORIS tensors are skipped.
pub const LYCORIS: &str = "LyCORIS layers other than LoRA (LoHa hada_*, LoKr lokr_*, Tucker lora_mid, full diff), which diffuse does not apply";
/// Why LoRA biases are skipped.
pub const LORA_BIAS: &str = "LoRA biases (peft's lora_bias), which diffuse does not apply";
/// Why unrecognised keys are skipped.
pub const UNKNOWN: &str = "names that are no LoRA tensor diffuse knows";

/// What a key of a LoRA file is.
pub fn parse_key(key: &str) -> KeyMeaning {
    // kohya: `lora_unet_<flat>.<part>`; lora_te1_ is SDXL's first text encoder, which diffusers
    // loads into `text_encoder` as it does lora_te_.
    const KOHYA: [(&str, Target); 4] = [
        ("lora_unet_", Target::Unet),
        ("lora_te_", Target::TextEncoder),
        ("lora_te1_", Target::TextEncoder),
        ("lora_te2_", Target::TextEncoder2),
    ];
    for (prefix, owner) in KOHYA {
        let Some(rest) = key.strip_prefix(prefix) else { continue };
        let Some((module, suffix)) = rest.split_once('.') else { return KeyMeaning::Skipped(UNKNOWN) };
        let part = match suffix {
            "lora_down.weight" => Part::Down,
            "lora_up.weight" => Part::Up,
            "alpha" => Part::Alpha,
            "dora_scale" => return KeyMeaning::Skipped(DORA),
            s if s.starts_with("hada_") || s.starts_with("lokr_") || s.starts_with("lora_mid") || s.starts_with("diff") => {
                return KeyMeaning::Skipped(LYCORIS)
            }
            _ => return KeyMeaning::Skipped(UNKNOWN),
        };
        return KeyMeaning::Tensor { owner, module: module.to_string(), part, format: Format::Kohya };
    }

    // The dotted formats: `unet.` / `text_encoder.`; keys without a prefix are UNet attention
    // processors as `unet.save_attn_procs` wrote them.
    let (owner, rest) = if let Some(rest) = key.strip_prefix("unet.") {
        (Target::Unet, rest)
    } else if let Some(rest) = key.strip_prefix("text_encoder.") {
        (Target::TextEncoder, rest)
    } else if let Some(rest) = key.strip_prefix("text_encoder_2.") {
        (Target::TextEncoder2, rest)
    } else {
        (Target::Unet, key)
    };
    // KEYS_TO_ALWAYS_REPLACE: attention processors sit beside the projections they adapt.
    let rest = rest.replace(".processor.", ".");
    let tensor = |module: &str, part, format| KeyMeaning::Tensor { owner, module: module.to_string(), part, format };

    if rest.ends_with(".lora_magnitude_vector") || rest.contains(".lora_magnitude_vector.") {
        return KeyMeaning::Skipped(DORA);
    }
    if rest.contains(".lora_B.") && rest.ends_with(".bias") {
        return KeyMeaning::Skipped(LORA_BIAS);
    }
    // peft: `<module>.lora_A.weight`, or `<module>.lora_A.<adapter>.weight` in a raw peft state dict.
    for (marker, part) in [(".lora_A.", Part::Down), (".lora_B.", Part::Up)] {
        if let Some((module, tail)) = rest.rsplit_once(marker) {
            let adapter = tail.strip_suffix("weight").map(|a| a.trim_end_matches('.'));
            if matches!(adapter, Some(a) if !a.contains('.')) {
                return tensor(module, part, Format::Peft);
            }
        }
    }
    // diffusers' attention processors (DIFFUSERS_OLD_TO_PEFT, UNET_TO_DIFFUSERS): `to_q_lora`
    // adapts the UNet's `to_q` and the text encoder's `q_proj`.
    let text_encoder = owner.is_text_encoder();
    for (processor, unet_module, text_module) in [
        ("to_q_lora", "to_q", "q_proj"),
        ("to_k_lora", "to_k", "k_proj"),
        ("to_v_lora", "to_v", "v_proj"),
        ("to_out_lora", "to_out.0", "out_proj"),
    ] {
        for (suffix, part) in [("down.weight", Part::Down), ("up.weight", Part::Up)] {
            if let Some(attention) = rest.strip_suffix(&format!(".{processor}.{suffix}")) {
                let projection = if text_encoder { text_module } else { unet_module };
                return tensor(&format!("{attention}.{projection}"), part, Format::DiffusersOld);
            }
        }
    }
    // `<module>.lora_linear_layer.down.weight` (DIFFUSERS_TO_PEFT) and `<module>.lora.down.weight`
    // (what diffusers makes of kohya's names for layers outside the attention).
    for marker in [".lora_linear_layer.", ".lora."] {
        for (suffix, part) in [("down.weight", Part::Down), ("up.weight", Part::Up)] {
            if let Some(module) = rest.strip_suffix(&format!("{marker}{suffix}")) {
                return tensor(module, part, Format::DiffusersOld);
            }
        }
    }
    if let Some(module) = rest.strip_suffix(".alpha") {
        return tensor(module, Part::Alpha, Format::Peft);
    }
    KeyMeaning::Skipped(UNKNOWN)
}

/// A module path or kohya name written flat (`.` -> `_`), the form layers are matched in.
pub fn flat(name: &str) -> String {
    name.replace('.', "_")
}

/// The flat name a model weight's module is matched by: its path flattened, and for the text
/// encoder without `text_model_` (transformers 5 writes CLIP without it; the hub's files and
/// kohya's names have it).
pub fn model_lookup_name(target: Target, module: &str) -> String {
    let name = flat(module);
    match target {
        Target::TextEncoder | Target::TextEncoder2 => name.strip_prefix("text_model_").unwrap_or(&name).to_string(),
        Target::Unet => name,
    }
}

/// The flat name a LoRA layer of `target` is matched by (`name` is a diffusers module path or
/// kohya's name): as [`model_lookup_name`], after mapping an LDM UNet block name to diffusers'
/// blocks (`layers_per_block` is the UNet's; `None` when its levels differ, which LDM names
/// cannot describe). `None` when an LDM name is no layer of that layout.
pub fn lookup_name(target: Target, name: &str, layers_per_block: Option<usize>) -> Option<String> {
    let flat_name = flat(name);
    if target == Target::Unet && is_ldm_unet_name(&flat_name) {
        return ldm_unet_to_diffusers(&flat_name, layers_per_block?);
    }
    Some(model_lookup_name(target, &flat_name))
}

/// kohya's name of a diffusers module (`lora_unet_down_blocks_0_..._to_q`,
/// `lora_te_text_model_encoder_layers_0_self_attn_q_proj`; text encoder modules are written
/// under `text_model.` as the hub's CLIP checkpoints name them, as kohya does).
pub fn kohya_name(target: Target, module: &str) -> String {
    let module = match target {
        Target::TextEncoder | Target::TextEncoder2 if !module.starts_with("text_model.") => format!("text_model.{module}"),
        _ => module.to_string(),
    };
    format!("{}{}", target.kohya_prefix(), flat(&module))
}

/// The key diffusers' `save_lora_weights` writes for a module's `lora_A` (down) or `lora_B`
/// (up) weight; `None` for alpha, which that format keeps in the adapter config
/// (`lora_adapter_metadata`), not in a tensor.
pub fn peft_key(target: Target, module: &str, part: Part) -> Option<String> {
    let matrix = match part {
        Part::Down => "lora_A",
        Part::Up => "lora_B",
        Part::Alpha => return None,
    };
    Some(format!("{}.{module}.{matrix}.weight", target.diffusers_prefix()))
}

fn is_ldm_unet_name(flat_name: &str) -> bool {
    ["input_blocks_", "middle_block_", "output_blocks_", "time_embed_", "out_", "label_emb_"]
        .iter()
        .any(|prefix| flat_name.starts_with(prefix))
}

/// `<digits>_<rest>` -> (number, rest); `rest` may be empty when nothing follows.
fn split_number(s: &str) -> Option<(usize, &str)> {
    let end = s.find('_').unwrap_or(s.len());
    let number = s[..end].parse().ok()?;
    Some((number, s.get(end + 1..).unwrap_or("")))
}

/// An LDM resnet layer under diffusers' name (update_unet_resnet_ldm_to_diffusers).
fn ldm_resnet_layer(rest: &str) -> Option<&'static str> {
    match rest {
        "in_layers_2" => Some("conv1"),
        "out_layers_3" => Some("conv2"),
        "emb_layers_1" => Some("time_emb_proj"),
        "skip_connection" => Some("conv_shortcut"),
        _ => None,
    }
}

/// A flat LDM UNet layer name (`input_blocks_1_1_transformer_blocks_0_attn1_to_q`) as the flat
/// diffusers name (`down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`). LDM numbers a
/// level's layers consecutively: input block 0 is conv_in, then per level `layers_per_block`
/// (resnet, attention) pairs and, but for the last level, a downsampler; the output blocks have
/// one layer more per level, the last one ending with the upsampler.
pub fn ldm_unet_to_diffusers(flat_name: &str, layers_per_block: usize) -> Option<String> {
    const TOP: [(&str, &str); 6] = [
        ("time_embed_0", "time_embedding_linear_1"),
        ("time_embed_2", "time_embedding_linear_2"),
        ("input_blocks_0_0", "conv_in"),
        ("out_2", "conv_out"),
        ("label_emb_0_0", "class_embedding_linear_1"),
        ("label_emb_0_2", "class_embedding_linear_2"),
    ];
    if let Some((_, diffusers)) = TOP.iter().find(|(ldm, _)| *ldm == flat_name) {
        return Some(diffusers.to_string());
    }
    // layers_per_block comes from a config file: no arithmetic that can overflow on it.
    let per_level = layers_per_block.checked_add(1)?;
    let join = |prefix: String, rest: &str| if rest.is_empty() { prefix } else { format!("{prefix}_{rest}") };
    if let Some(tail) = flat_name.strip_prefix("input_blocks_") {
        let (index, tail) = split_number(tail)?;
        let (part, rest) = split_number(tail)?;
        if index == 0 {
            return None;
        }
        let (level, layer) = ((index - 1) / per_level, (index - 1) % per_level);
        return match part {
            0 if layer == per_level - 1 => (rest == "op").then(|| format!("down_blocks_{level}_downsamplers_0_conv")),
            0 => Some(format!("down_blocks_{level}_resnets_{layer}_{}", ldm_resnet_layer(rest)?)),
            1 if layer < per_level - 1 => Some(join(format!("down_blocks_{level}_attentions_{layer}"), rest)),
            _ => None,
        };
    }
    if let Some(tail) = flat_name.strip_prefix("middle_block_") {
        let (part, rest) = split_number(tail)?;
        return match part {
            0 | 2 => Some(format!("mid_block_resnets_{}_{}", part / 2, ldm_resnet_layer(rest)?)),
            1 => Some(join("mid_block_attentions_0".to_string(), rest)),
            _ => None,
        };
    }
    if let Some(tail) = flat_name.strip_prefix("output_blocks_") {
        let (index, tail) = split_number(tail)?;
        let (part, rest) = split_number(tail)?;
        let (level, layer) = (index / per_level, index % per_level);
        let upsampler = || (layer == per_level - 1 && rest == "conv").then(|| format!("up_blocks_{level}_upsamplers_0_conv"));
        return match part {
            0 => Some(format!("up_blocks_{level}_resnets_{layer}_{}", ldm_resnet_layer(rest)?)),
            1 if rest == "conv" => upsampler(),
            1 => Some(join(format!("up_blocks_{level}_attentions_{layer}"), rest)),
            2 => upsampler(),
            _ => None,
        };
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(key: &str) -> (Target, String, Part, Format) {
        match parse_key(key) {
            KeyMeaning::Tensor { owner, module, part, format } => (owner, module, part, format),
            other => panic!("{key}: {other:?}"),
        }
    }

    #[test]
    fn every_format_names_the_same_layer() {
        let unet = Target::Unet;
        let text = Target::TextEncoder;
        let attn = "down_blocks.0.attentions.0.transformer_blocks.0.attn1";
        assert_eq!(tensor(&format!("unet.{attn}.to_q.lora_A.weight")), (unet.clone(), format!("{attn}.to_q"), Part::Down, Format::Peft));
        assert_eq!(tensor(&format!("unet.{attn}.to_q.lora_B.default.weight")).2, Part::Up);
        assert_eq!(tensor(&format!("unet.{attn}.processor.to_out_lora.up.weight")), (unet.clone(), format!("{attn}.to_out.0"), Part::Up, Format::DiffusersOld));
        assert_eq!(tensor(&format!("{attn}.processor.to_k_lora.down.weight")).1, format!("{attn}.to_k"));
        assert_eq!(
            tensor("text_encoder.text_model.encoder.layers.0.self_attn.to_out_lora.down.weight").1,
            "text_model.encoder.layers.0.self_attn.out_proj"
        );
        assert_eq!(tensor("text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.up.weight").1, "text_model.encoder.layers.0.mlp.fc1");
        let (owner, module, part, format) = tensor("lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha");
        assert_eq!((owner, part, format), (text, Part::Alpha, Format::Kohya));
        assert_eq!(lookup_name(Target::TextEncoder, &module, None).unwrap(), "encoder_layers_0_self_attn_q_proj");
        assert_eq!(
            lookup_name(Target::TextEncoder, "encoder.layers.0.self_attn.q_proj", None),
            lookup_name(Target::TextEncoder, "text_model.encoder.layers.0.self_attn.q_proj", None)
        );
        assert_eq!(tensor("lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight").0, Target::TextEncoder2);
        assert_eq!(tensor("text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight").0, Target::TextEncoder2);
        assert_eq!(parse_key("lora_unet_x.hada_w1_a"), KeyMeaning::Skipped(LYCORIS));
        assert_eq!(parse_key("lora_unet_x.dora_scale"), KeyMeaning::Skipped(DORA));
        assert_eq!(parse_key("unet.x.lora_B.bias"), KeyMeaning::Skipped(LORA_BIAS));
        assert_eq!(parse_key("unet.x.weight"), KeyMeaning::Skipped(UNKNOWN));
    }

    #[test]
    fn names_reverse() {
        let module = "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_out.0";
        let kohya = kohya_name(Target::Unet, module);
        assert_eq!(kohya, "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_out_0");
        let (_, name, _, _) = tensor(&format!("{kohya}.lora_down.weight"));
        assert_eq!(lookup_name(Target::Unet, &name, Some(2)), lookup_name(Target::Unet, module, Some(2)));
        let text = "encoder.layers.11.self_attn.v_proj";
        assert_eq!(kohya_name(Target::TextEncoder, text), "lora_te_text_model_encoder_layers_11_self_attn_v_proj");
        let key = peft_key(Target::TextEncoder, text, Part::Up).unwrap();
        assert_eq!(key, "text_encoder.encoder.layers.11.self_attn.v_proj.lora_B.weight");
        assert_eq!(tensor(&key).1, text);
        assert_eq!(peft_key(Target::Unet, module, Part::Alpha), None);
    }

    #[test]
    fn ldm_blocks_of_sd15() {
        // SD 1.5: 2 layers per block, attention in the first three down levels and the last three up levels.
        let map = |name: &str| ldm_unet_to_diffusers(name, 2);
        let cases = [
            ("input_blocks_1_1_transformer_blocks_0_attn1_to_q", "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"),
            ("input_blocks_2_1_proj_in", "down_blocks_0_attentions_1_proj_in"),
            ("input_blocks_3_0_op", "down_blocks_0_downsamplers_0_conv"),
            ("input_blocks_4_0_in_layers_2", "down_blocks_1_resnets_0_conv1"),
            ("input_blocks_4_0_skip_connection", "down_blocks_1_resnets_0_conv_shortcut"),
            ("input_blocks_11_0_emb_layers_1", "down_blocks_3_resnets_1_time_emb_proj"),
            ("middle_block_1_transformer_blocks_0_ff_net_2", "mid_block_attentions_0_transformer_blocks_0_ff_net_2"),
            ("middle_block_2_out_layers_3", "mid_block_resnets_1_conv2"),
            ("output_blocks_2_1_conv", "up_blocks_0_upsamplers_0_conv"),
            ("output_blocks_5_2_conv", "up_blocks_1_upsamplers_0_conv"),
            ("output_blocks_5_1_proj_out", "up_blocks_1_attentions_2_proj_out"),
            ("output_blocks_10_1_transformer_blocks_0_attn2_to_k", "up_blocks_3_attentions_1_transformer_blocks_0_attn2_to_k"),
            ("output_blocks_11_0_out_layers_3", "up_blocks_3_resnets_2_conv2"),
            ("time_embed_2", "time_embedding_linear_2"),
            ("input_blocks_0_0", "conv_in"),
            ("out_2", "conv_out"),
        ];
        for (ldm, diffusers) in cases {
            assert_eq!(map(ldm).as_deref(), Some(diffusers), "{ldm}");
        }
        for unknown in ["input_blocks_1_0_in_layers_0", "input_blocks_3_1_proj_in", "output_blocks_1_1_conv", "middle_block_3_x", "input_blocks_x"] {
            assert_eq!(map(unknown), None, "{unknown}");
        }
        assert_eq!(lookup_name(Target::Unet, "output_blocks_1_1_conv", Some(1)).as_deref(), Some("up_blocks_0_upsamplers_0_conv"));
        assert_eq!(lookup_name(Target::Unet, "input_blocks_1_1_proj_in", None), None);
    }
}
