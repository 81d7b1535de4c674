//! Single-file Stable Diffusion 1.x / 2.x checkpoints (the original LDM key names) and SDXL
//! base / refiner ones (Stability's SGM layout: `conditioner.embedders.N.*` text encoders, the
//! UNet's `label_emb` as the added text-time embedding) read as diffusers components: port of
//! diffusers/loaders/single_file_utils.py
//! (`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`,
//! `convert_open_clip_checkpoint`, `_legacy_load_scheduler`).
//!
//! diffusers takes the configs of a single file from the hub repository of the model type it
//! infers (`fetch_diffusers_config`); we start from the same configs, committed under
//! `configs/{sd15,sd21,sdxl,sdxl_refiner}`, and set every value the tensor shapes show. A
//! checkpoint whose other values differ (a test-size model) can take its configs from a
//! diffusers folder instead, as diffusers' `from_single_file(config=folder)` does
//! ([`SingleFile::with_folder_configs`]). What the weights cannot
//! show is taken from the family: SD 1.x uses 8 heads, SD 2.x heads of 64 channels; OpenCLIP's
//! last layer is not used by SD 2.x (it reads the penultimate one), so its text encoder has one
//! layer fewer than the file; v-prediction (SD 2.x at 768 px) is the caller's to say.
//!
//! Nothing is converted up front: [`SingleFile`] maps the file and keeps, per component, a
//! table from each diffusers name to the LDM tensor it comes from, so that a `VarBuilder`
//! reads each weight from the mapped file when the model asks for it (splitting OpenCLIP's
//! fused q/k/v rows and reshaping the VAE's 1x1-conv attention weights on the way).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use serde_json::{json, Map, Value};

use crate::loading::config::read_json_object;
use crate::loading::mapped::MappedTensors;
use crate::{Error, Result};

const UNET_PREFIX: &str = "model.diffusion_model.";
/// diffusers' LDM_VAE_KEYS: the last of these that any tensor starts with is the VAE's.
const VAE_PREFIXES: [&str; 2] = ["first_stage_model.", "vae."];
const CLIP_PREFIX: &str = "cond_stage_model.transformer.";
const OPEN_CLIP_PREFIX: &str = "cond_stage_model.model.";
// SDXL's text encoders (single_file_utils.py: convert_ldm_clip_checkpoint's and
// convert_open_clip_checkpoint's SGM prefixes).
const SDXL_CLIP_PREFIX: &str = "conditioner.embedders.0.transformer.";
const SDXL_OPEN_CLIP_PREFIX: &str = "conditioner.embedders.1.model.";
const SDXL_REFINER_OPEN_CLIP_PREFIX: &str = "conditioner.embedders.0.model.";

/// Which Stable Diffusion generation a checkpoint is, by its text encoder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// SD 1.x: OpenAI CLIP ViT-L/14 text encoder (`cond_stage_model.transformer.*`).
    StableDiffusion1,
    /// SD 2.x: OpenCLIP ViT-H/14 text encoder (`cond_stage_model.model.*`).
    StableDiffusion2,
    /// SDXL base: CLIP ViT-L (`conditioner.embedders.0.transformer.*`) and OpenCLIP bigG with
    /// its projection (`conditioner.embedders.1.model.*`).
    StableDiffusionXL,
    /// SDXL refiner: OpenCLIP bigG alone (`conditioner.embedders.0.model.*`).
    StableDiffusionXLRefiner,
}

impl Family {
    /// The configs diffusers falls back to for this family (its hub repository's).
    pub fn configs(self) -> &'static FamilyConfigs {
        match self {
            Family::StableDiffusion1 => &SD15,
            Family::StableDiffusion2 => &SD21,
            Family::StableDiffusionXL => &SDXL,
            Family::StableDiffusionXLRefiner => &SDXL_REFINER,
        }
    }

    /// Whether the family is SDXL (base or refiner): two-encoder or bigG conditioning and the SDXL
    /// UNet's added time ids.
    pub fn is_xl(self) -> bool {
        matches!(self, Family::StableDiffusionXL | Family::StableDiffusionXLRefiner)
    }

    /// The model whose configs the family's are, for messages.
    pub fn model_name(self) -> &'static str {
        match self {
            Family::StableDiffusion1 => "Stable Diffusion 1.5",
            Family::StableDiffusion2 => "Stable Diffusion 2.1",
            Family::StableDiffusionXL => "Stable Diffusion XL base 1.0",
            Family::StableDiffusionXLRefiner => "Stable Diffusion XL refiner 1.0",
        }
    }

    /// The diffusers pipeline class of the family's hub repository.
    pub fn pipeline_class(self) -> &'static str {
        match self {
            Family::StableDiffusion1 | Family::StableDiffusion2 => "StableDiffusionPipeline",
            Family::StableDiffusionXL => "StableDiffusionXLPipeline",
            Family::StableDiffusionXLRefiner => "StableDiffusionXLImg2ImgPipeline",
        }
    }
}

/// The diffusers components a checkpoint holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Component {
    /// The UNet (`UNet2DConditionModel`; LDM `model.diffusion_model.*`).
    Unet,
    /// The VAE (`AutoencoderKL`; LDM `first_stage_model.*`).
    Vae,
    /// The first (for the SDXL refiner, the only) text encoder.
    TextEncoder,
    /// SDXL base's second text encoder (OpenCLIP bigG with its projection).
    TextEncoder2,
}

impl Component {
    /// The components every family has.
    pub const ALL: [Component; 3] = [Component::Unet, Component::Vae, Component::TextEncoder];

    /// The diffusers folder name (`unet`, `vae`, `text_encoder`, `text_encoder_2`); the SDXL
    /// refiner's text encoder is in `text_encoder_2` ([`Recognised::folder`]).
    pub fn folder(self) -> &'static str {
        match self {
            Component::Unet => "unet",
            Component::Vae => "vae",
            Component::TextEncoder => "text_encoder",
            Component::TextEncoder2 => "text_encoder_2",
        }
    }
}

/// What is done to an LDM tensor to give the diffusers one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transform {
    /// The tensor as it is.
    Identity,
    /// A 1x1 convolution weight `[out, in, 1, 1]` used as a linear one `[out, in]`.
    ConvToLinear,
    /// Rows `start..start + len` of a fused q/k/v projection (OpenCLIP's `in_proj_*`).
    Rows {
        /// The first row.
        start: usize,
        /// The number of rows.
        len: usize,
    },
    /// A 2-D tensor transposed (OpenCLIP's `text_projection`, applied as `x @ p`).
    Transpose,
}

/// Where one diffusers tensor comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    /// The tensor's name in the checkpoint (original LDM naming).
    pub ldm_name: String,
    /// What is done to it to give the diffusers tensor.
    pub transform: Transform,
    /// The diffusers shape (after the transform).
    pub shape: Vec<usize>,
}

/// diffusers name -> source, for one component.
pub type WeightMap = BTreeMap<String, Source>;

/// A checkpoint's architecture and name mapping, worked out from tensor names and shapes alone.
#[derive(Clone, Debug)]
pub struct Recognised {
    /// Which model family the tensors make it.
    pub family: Family,
    /// A 9-channel UNet input (latents, mask, masked-image latents).
    pub inpainting: bool,
    unet: (Map<String, Value>, WeightMap),
    vae: (Map<String, Value>, WeightMap),
    text_encoder: (Map<String, Value>, WeightMap),
    /// SDXL base's second text encoder (empty for the other families).
    text_encoder_2: (Map<String, Value>, WeightMap),
    /// A scheduler config from a diffusers folder ([`SingleFile::with_folder_configs`]).
    scheduler: Option<Map<String, Value>>,
    /// The diffusers folder the configs come from, if not the family's.
    pub config_folder: Option<PathBuf>,
    /// Tensors of the file no component uses (DDPM buffers, EMA copies, OpenCLIP's unused layer...).
    pub ignored: Vec<String>,
}

impl Recognised {
    /// The component's diffusers `config.json`, as an object.
    pub fn config(&self, component: Component) -> &Map<String, Value> {
        &self.component(component).0
    }

    /// The component's diffusers tensor names and where each comes from.
    pub fn weights(&self, component: Component) -> &WeightMap {
        &self.component(component).1
    }

    /// Whether the checkpoint has this component (only SDXL base has `TextEncoder2`).
    pub fn has(&self, component: Component) -> bool {
        component != Component::TextEncoder2 || self.family == Family::StableDiffusionXL
    }

    /// The component's folder in a diffusers pipeline of this family.
    pub fn folder(&self, component: Component) -> &'static str {
        match (self.family, component) {
            (Family::StableDiffusionXLRefiner, Component::TextEncoder) => "text_encoder_2",
            _ => component.folder(),
        }
    }

    fn component(&self, component: Component) -> &(Map<String, Value>, WeightMap) {
        match component {
            Component::Unet => &self.unet,
            Component::Vae => &self.vae,
            Component::TextEncoder => &self.text_encoder,
            Component::TextEncoder2 => &self.text_encoder_2,
        }
    }

    fn component_mut(&mut self, component: Component) -> &mut (Map<String, Value>, WeightMap) {
        match component {
            Component::Unet => &mut self.unet,
            Component::Vae => &mut self.vae,
            Component::TextEncoder => &mut self.text_encoder,
            Component::TextEncoder2 => &mut self.text_encoder_2,
        }
    }

    /// The scheduler config diffusers gives a single file: SD 1.x's PNDM, SD 2.x's DDIM or
    /// SDXL's Euler settings (or the config folder's). `prediction_type` is not visible in the
    /// weights: by default `epsilon`, except `v_prediction` for non-inpainting SD 2.x (the
    /// 768-px models; SD 2.x base and other epsilon-trained SD 2 checkpoints must say
    /// `epsilon`), as `_legacy_load_scheduler` does.
    pub fn scheduler_config(&self, prediction_type: Option<&str>) -> Result<Map<String, Value>> {
        let default = match self.family {
            Family::StableDiffusion2 if !self.inpainting => "v_prediction",
            _ => "epsilon",
        };
        let folder_default = self.scheduler.as_ref().and_then(|c| c.get("prediction_type")?.as_str());
        let prediction_type = prediction_type.or(folder_default).unwrap_or(default);
        if !["epsilon", "v_prediction", "sample"].contains(&prediction_type) {
            return Err(Error::invalid(format!(
                "prediction_type `{prediction_type}` is not one of epsilon, v_prediction, sample"
            )));
        }
        let mut config = match &self.scheduler {
            Some(config) => config.clone(),
            None => base_config(self.family.configs().scheduler, "scheduler/scheduler_config.json")?,
        };
        config.insert("prediction_type".into(), json!(prediction_type));
        Ok(config)
    }
}

// The configs of the hub repositories diffusers falls back to (stable-diffusion-v1-5,
// stable-diffusion-2-1, stable-diffusion-xl-base-1.0, stable-diffusion-xl-refiner-1.0),
// committed with the crate.
use crate::configs::{FamilyConfigs, SD15, SD21, SDXL, SDXL_REFINER};

/// A family's built-in config for one component, named `{family}/{folder}/config.json` in errors.
fn family_config(family: Family, text: &str, folder: &str) -> Result<Map<String, Value>> {
    base_config(text, &format!("{}/{folder}/config.json", family.configs().name))
}

fn base_config(text: &str, name: &str) -> Result<Map<String, Value>> {
    match serde_json::from_str(text) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(Error::config(name, "built-in config is not a JSON object")),
    }
}

// ---------------------------------------------------------------------------------------------
// Opening a file
// ---------------------------------------------------------------------------------------------

/// A memory-mapped single-file checkpoint and what it was recognised as.
pub struct SingleFile {
    path: PathBuf,
    tensors: Arc<MappedTensors>,
    recognised: Arc<Recognised>,
}

impl SingleFile {
    /// Maps a `.safetensors` checkpoint and recognises its architecture. Pickle checkpoints
    /// (`.ckpt`, `.pt`, `.pth`, `.bin`) are refused: loading them can run arbitrary code.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        refuse_pickle(path)?;
        let tensors = MappedTensors::open(&[path.to_path_buf()])?;
        let shapes: BTreeMap<String, Vec<usize>> = tensors.shapes().map(|(name, shape)| (name.to_string(), shape.to_vec())).collect();
        let recognised = recognise(&shapes, path)?;
        Ok(Self { path: path.to_path_buf(), tensors: Arc::new(tensors), recognised: Arc::new(recognised) })
    }

    /// The checkpoint file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What the file was recognised as: family, configs and weight maps.
    pub fn recognised(&self) -> &Recognised {
        &self.recognised
    }

    /// The checkpoint's model family.
    pub fn family(&self) -> Family {
        self.recognised.family
    }

    /// The component's diffusers `config.json`, as an object ([`Recognised::config`]).
    pub fn config(&self, component: Component) -> &Map<String, Value> {
        self.recognised.config(component)
    }

    /// The scheduler config diffusers gives this file ([`Recognised::scheduler_config`]).
    pub fn scheduler_config(&self, prediction_type: Option<&str>) -> Result<Map<String, Value>> {
        self.recognised.scheduler_config(prediction_type)
    }

    /// Takes every component's config (and the scheduler's) from a diffusers pipeline folder
    /// of this architecture rather than from the family's, as diffusers'
    /// `from_single_file(file, config=folder)` does: for checkpoints whose heads, norm groups
    /// or other values the weights cannot show are not the family's. The weights still come
    /// from the file, under the names its shapes gave them.
    pub fn with_folder_configs(mut self, folder: &Path) -> Result<Self> {
        let mut recognised = (*self.recognised).clone();
        let components = [Component::Unet, Component::Vae, Component::TextEncoder, Component::TextEncoder2];
        for component in components {
            if !recognised.has(component) {
                continue;
            }
            let path = folder.join(recognised.folder(component)).join("config.json");
            let config = read_json_object(&path)?;
            recognised.component_mut(component).0 = config;
        }
        recognised.scheduler = Some(read_json_object(&folder.join("scheduler").join("scheduler_config.json"))?);
        recognised.config_folder = Some(folder.to_path_buf());
        self.recognised = Arc::new(recognised);
        Ok(self)
    }

    /// A `VarBuilder` over one component under its diffusers names. Each weight is read from
    /// the mapped file when asked for, so the checkpoint is never held in memory twice.
    pub fn var_builder(&self, component: Component, dtype: DType, device: &Device) -> VarBuilder<'static> {
        let backend = RenamedTensors { tensors: self.tensors.clone(), recognised: self.recognised.clone(), component };
        VarBuilder::from_backend(Box::new(backend), dtype, device.clone())
    }

    /// Every tensor of one component under its diffusers name, in the file's dtype.
    pub fn load(&self, component: Component, device: &Device) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (name, source) in self.recognised.weights(component) {
            let dtype = self.tensors.stored_dtype(&source.ldm_name).unwrap_or(DType::F32);
            let tensor = load_source(&self.tensors, source, dtype, device)
                .map_err(|e| Error::weights(&self.path, format!("{} (for {name}): {e}", source.ldm_name)))?;
            out.insert(name.clone(), tensor);
        }
        Ok(out)
    }
}

fn load_source(tensors: &MappedTensors, source: &Source, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
    let tensor = tensors.load(&source.ldm_name, dtype, device)?;
    match source.transform {
        Transform::Identity => Ok(tensor),
        Transform::ConvToLinear => tensor.reshape(source.shape.as_slice()),
        Transform::Rows { start, len } => tensor.narrow(0, start, len)?.contiguous(),
        Transform::Transpose => tensor.t()?.contiguous(),
    }
}

/// The `SimpleBackend` behind [`SingleFile::var_builder`]: renames on lookup.
struct RenamedTensors {
    tensors: Arc<MappedTensors>,
    recognised: Arc<Recognised>,
    component: Component,
}

impl RenamedTensors {
    fn source(&self, name: &str) -> candle_core::Result<&Source> {
        self.recognised
            .weights(self.component)
            .get(name)
            .ok_or_else(|| candle_core::Error::CannotFindTensor { path: name.to_string() }.bt())
    }
}

impl SimpleBackend for RenamedTensors {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let source = self.source(name)?;
        if source.shape != shape.dims() {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name} (from {})", source.ldm_name),
                expected: shape,
                got: source.shape.as_slice().into(),
            }
            .bt());
        }
        load_source(&self.tensors, source, dtype, device)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        load_source(&self.tensors, self.source(name)?, dtype, device)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.recognised.weights(self.component).contains_key(name)
    }
}

/// How to turn a pickle checkpoint into one we read, with the user's file name filled in.
fn pickle_help(file_name: &str) -> String {
    let stem = file_name.rsplit_once('.').map_or(file_name, |(stem, _)| stem);
    format!(
        "Convert it once to safetensors in Python:\n\
         \x20   import torch\n\
         \x20   from safetensors.torch import save_file\n\
         \x20   sd = torch.load({file_name:?}, map_location=\"cpu\", weights_only=True)\n\
         \x20   sd = sd.get(\"state_dict\", sd)\n\
         \x20   save_file({{k: v.contiguous().clone() for k, v in sd.items() if isinstance(v, torch.Tensor)}}, {:?})\n\
         (weights_only=True loads tensors only; if it refuses the file, the file holds other objects: \
         pass weights_only=False only for a file you trust.) Or with diffusers:\n\
         \x20   StableDiffusionPipeline.from_single_file({file_name:?}).save_pretrained({:?})\n\
         and load that folder.",
        format!("{stem}.safetensors"),
        format!("{stem}-diffusers"),
    )
}

/// Refuses PyTorch pickle files, by extension or by content (a zip archive or a raw pickle).
fn refuse_pickle(path: &Path) -> Result<()> {
    let extension = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
    let by_name = matches!(extension.as_deref(), Some("ckpt" | "pt" | "pth" | "bin" | "pkl"));
    let mut head = [0u8; 9];
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let n = file.read(&mut head).map_err(|e| Error::io(path, e))?;
    // A safetensors file starts with its header's length (8 bytes) and then the header's `{`.
    // torch.save writes a zip archive ("PK\x03\x04"); older files are a bare pickle (PROTO
    // opcode 0x80, protocol 2-5), which a header length like 0x280 also starts with.
    let safetensors_like = n == 9 && head[8] == b'{';
    let zip = n >= 4 && &head[..4] == b"PK\x03\x04";
    let bare_pickle = n >= 2 && head[0] == 0x80 && (2..=5).contains(&head[1]);
    let by_content = !safetensors_like && (zip || bare_pickle);
    if by_name || by_content {
        return Err(Error::weights(
            path,
            format!(
                "this is a PyTorch pickle checkpoint, which diffuse does not load: unpickling \
                 executes arbitrary code stored in the file, so a malicious checkpoint could do \
                 anything on this machine. {}",
                pickle_help(&path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default())
            ),
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Recognition
// ---------------------------------------------------------------------------------------------

/// Recognises an LDM-layout SD 1.x / 2.x checkpoint or an SGM-layout SDXL base / refiner one
/// from its tensor names and shapes, and maps every tensor to its diffusers name. `origin`
/// names the file in errors.
pub fn recognise(shapes: &BTreeMap<String, Vec<usize>>, origin: &Path) -> Result<Recognised> {
    let file = Tensors { shapes, origin };
    let unet_conv_in = format!("{UNET_PREFIX}input_blocks.0.0.weight");
    if !shapes.contains_key(&unet_conv_in) {
        return Err(file.error(format!(
            "no tensor matches {unet_conv_in}: not a Stable Diffusion 1.x/2.x/XL checkpoint in the \
             original (LDM/SGM) layout{}. Its tensors start with: {}",
            file.hint(),
            file.top_level_prefixes()
        )));
    }
    let mut used = BTreeSet::new();

    let (family, encoders) = recognise_text_encoders(&file, &mut used)?;
    // SDXL concatenates both encoders' hidden states; its pooled embedding is the last one's projection.
    let hidden_size = encoders.iter().try_fold(0usize, |sum, e| sum.checked_add(e.hidden_size));
    let hidden_size = hidden_size.ok_or_else(|| file.error("the text encoders' widths overflow".to_string()))?;
    let pooled_dim = encoders.last().and_then(|e| e.projection_dim);
    let (unet_config, unet_weights, cross_attention_dim, in_channels) =
        recognise_unet(&file, family, pooled_dim, &mut used)?;
    if cross_attention_dim != hidden_size {
        let widths: Vec<String> = encoders.iter().map(|e| e.hidden_size.to_string()).collect();
        return Err(file.error(format!(
            "the UNet's cross-attention takes {cross_attention_dim} channels but the text encoder(s) give {hidden_size} ({})",
            widths.join(" + ")
        )));
    }
    let inpainting = in_channels == 9;
    let (vae_config, vae_weights) = recognise_vae(&file, family, inpainting, &mut used)?;

    let mut unet_config = unet_config;
    if family == Family::StableDiffusion2 && inpainting {
        // The inpainting models are 512-pixel ones (diffusers' image size map: 512 for inpainting_v2).
        unet_config.insert("sample_size".into(), json!(64));
    }
    let ignored = shapes.keys().filter(|name| !used.contains(name.as_str())).cloned().collect();
    let mut encoders = encoders.into_iter().map(|e| (e.config, e.weights));
    let text_encoder = encoders.next().unwrap_or_default();
    let text_encoder_2 = encoders.next().unwrap_or_default();
    Ok(Recognised {
        family,
        inpainting,
        unet: (unet_config, unet_weights),
        vae: (vae_config, vae_weights),
        text_encoder,
        text_encoder_2,
        scheduler: None,
        config_folder: None,
        ignored,
    })
}

/// The file's names and shapes, with error helpers.
struct Tensors<'a> {
    shapes: &'a BTreeMap<String, Vec<usize>>,
    origin: &'a Path,
}

impl Tensors<'_> {
    fn error(&self, message: String) -> Error {
        Error::weights(self.origin, message)
    }

    fn shape(&self, name: &str) -> Result<&[usize]> {
        self.shapes.get(name).map(Vec::as_slice).ok_or_else(|| self.error(format!("no tensor matches {name}")))
    }

    /// A dimension of a tensor that must exist with at least `axis + 1` dimensions.
    fn dim(&self, name: &str, axis: usize) -> Result<usize> {
        let shape = self.shape(name)?;
        shape
            .get(axis)
            .copied()
            .ok_or_else(|| self.error(format!("{name} has shape {shape:?}, expected at least {} dimensions", axis + 1)))
    }

    /// `(rest, shape)` for the tensors whose names start with `prefix`.
    fn under<'s>(&'s self, prefix: &'s str) -> impl Iterator<Item = (&'s str, &'s [usize])> + 's {
        self.shapes
            .range(prefix.to_string()..)
            .take_while(move |(k, _)| k.starts_with(prefix))
            .map(move |(k, v)| (&k[prefix.len()..], v.as_slice()))
    }

    /// How many `{prefix}{i}.` indices there are (the largest `i` plus one; 0 if none).
    fn count(&self, prefix: &str) -> usize {
        self.under(prefix).filter_map(|(rest, _)| split_index(rest).map(|(i, _)| i + 1)).max().unwrap_or(0)
    }

    fn top_level_prefixes(&self) -> String {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for name in self.shapes.keys() {
            let prefix: Vec<&str> = name.split('.').take(2).collect();
            *counts.entry(prefix.join(".")).or_default() += 1;
        }
        let list: Vec<String> = counts.iter().take(8).map(|(p, n)| format!("{p} ({n})")).collect();
        let more = counts.len().saturating_sub(8);
        if more > 0 {
            format!("{}, and {more} more", list.join(", "))
        } else {
            list.join(", ")
        }
    }

    fn hint(&self) -> &'static str {
        let any = |p: &str| self.shapes.keys().any(|k| k.starts_with(p));
        if any("down_blocks.") || any("text_model.") || any("encoder.down_blocks.") {
            " (it looks like one component of a diffusers folder: load the folder instead)"
        } else {
            ""
        }
    }
}

/// `"{i}.rest"` -> `(i, "rest")`.
fn split_index(name: &str) -> Option<(usize, &str)> {
    let (index, rest) = name.split_once('.')?;
    Some((index.parse().ok()?, rest))
}

/// Names for error messages: the first few, and how many more.
fn some_names(names: &[String]) -> String {
    let shown: Vec<&str> = names.iter().take(6).map(String::as_str).collect();
    match names.len().saturating_sub(shown.len()) {
        0 => shown.join(", "),
        more => format!("{}, and {more} more", shown.join(", ")),
    }
}

/// Heads 64 channels wide, as SD 2.x's UNet (`num_head_channels: 64`) and both CLIPs use.
/// A width under 64 (test-size models only) gets one head of its whole width.
fn heads_of_64(width: usize, what: &str, origin: &Tensors) -> Result<usize> {
    match width {
        0 => Err(origin.error(format!("{what} has width 0"))),
        w if w < 64 => Ok(1),
        w if w % 64 == 0 => Ok(w / 64),
        w => Err(origin.error(format!("{what} has width {w}, not a whole number of 64-channel heads"))),
    }
}

/// Builds a component's weight map: every tensor under `prefix` must get a diffusers name
/// from `rename` (or be deliberately skipped by it), else the architecture is not one we know.
fn map_component(
    file: &Tensors,
    prefix: &str,
    what: &str,
    used: &mut BTreeSet<String>,
    mut rename: impl FnMut(&str, &[usize]) -> Renamed,
) -> Result<WeightMap> {
    let mut weights = WeightMap::new();
    let mut unplaced = Vec::new();
    for (rest, shape) in file.under(prefix) {
        let ldm_name = format!("{prefix}{rest}");
        let targets = match rename(rest, shape) {
            Renamed::Skip => continue,
            Renamed::Unknown => {
                unplaced.push(ldm_name);
                continue;
            }
            Renamed::To(name) => vec![(name, Transform::Identity)],
            Renamed::Transformed(targets) => targets,
        };
        for (name, transform) in targets {
            let shape = match &transform {
                Transform::Identity => shape.to_vec(),
                Transform::ConvToLinear => shape.iter().take(2).copied().collect(),
                Transform::Rows { len, .. } => std::iter::once(*len).chain(shape.iter().skip(1).copied()).collect(),
                Transform::Transpose => shape.iter().rev().copied().collect(),
            };
            let source = Source { ldm_name: ldm_name.clone(), transform, shape };
            if let Some(previous) = weights.insert(name.clone(), source) {
                return Err(file.error(format!("{} and {ldm_name} both map to {name}", previous.ldm_name)));
            }
        }
        used.insert(ldm_name);
    }
    if !unplaced.is_empty() {
        return Err(file.error(format!(
            "{} tensor(s) under {prefix} do not fit a Stable Diffusion {what}: {}",
            unplaced.len(),
            some_names(&unplaced)
        )));
    }
    Ok(weights)
}

enum Renamed {
    To(String),
    Transformed(Vec<(String, Transform)>),
    /// A tensor of the file that the diffusers model does not have.
    Skip,
    Unknown,
}

// ---------------------------------------------------------------------------------------------
// Text encoders
// ---------------------------------------------------------------------------------------------

/// One text encoder of the file: its config, weights, width and (for a
/// CLIPTextModelWithProjection) projection width.
struct Encoder {
    config: Map<String, Value>,
    weights: WeightMap,
    hidden_size: usize,
    projection_dim: Option<usize>,
}

/// The family and the text encoders (in diffusers' order), by where their token embeddings are:
/// single_file_utils.py's CHECKPOINT_KEY_NAMES look for a later layer, which a test-size model
/// may not have.
fn recognise_text_encoders(file: &Tensors, used: &mut BTreeSet<String>) -> Result<(Family, Vec<Encoder>)> {
    let has = |key: String| file.shapes.contains_key(&key).then_some(key);
    let clip = |prefix: &str| has(format!("{prefix}text_model.embeddings.token_embedding.weight"));
    let open_clip = |prefix: &str| has(format!("{prefix}token_embedding.weight"));
    let sdxl_second = open_clip(SDXL_OPEN_CLIP_PREFIX);
    if clip(SDXL_CLIP_PREFIX).is_some() || sdxl_second.is_some() {
        let family = Family::StableDiffusionXL;
        let configs = family.configs();
        let Some(second) = configs.text_encoder_2 else {
            return Err(file.error("no built-in config for SDXL's second text encoder".to_string()));
        };
        if sdxl_second.is_none() || clip(SDXL_CLIP_PREFIX).is_none() {
            let (found, missing) = match sdxl_second {
                Some(_) => (
                    format!("{SDXL_OPEN_CLIP_PREFIX}* (OpenCLIP bigG)"),
                    format!("{SDXL_CLIP_PREFIX}text_model.embeddings.token_embedding.weight (CLIP ViT-L)"),
                ),
                None => (
                    format!("{SDXL_CLIP_PREFIX}* (CLIP ViT-L)"),
                    format!("{SDXL_OPEN_CLIP_PREFIX}token_embedding.weight (OpenCLIP bigG)"),
                ),
            };
            return Err(file.error(format!(
                "an SDXL base checkpoint has both text encoders: it has {found} but no tensor matches {missing}"
            )));
        }
        let first = recognise_clip(file, used, SDXL_CLIP_PREFIX, family, configs.text_encoder)?;
        let second = recognise_open_clip(file, used, SDXL_OPEN_CLIP_PREFIX, family, second)?;
        return Ok((family, vec![first, second]));
    }
    if open_clip(SDXL_REFINER_OPEN_CLIP_PREFIX).is_some() {
        let family = Family::StableDiffusionXLRefiner;
        let encoder =
            recognise_open_clip(file, used, SDXL_REFINER_OPEN_CLIP_PREFIX, family, family.configs().text_encoder)?;
        return Ok((family, vec![encoder]));
    }
    if let Some((name, _)) = file.shapes.iter().find(|(k, _)| k.starts_with("conditioner.embedders.")) {
        return Err(file.error(format!(
            "{name}: an SGM-layout (SDXL) text encoder, but neither {SDXL_CLIP_PREFIX}text_model.* with \
             {SDXL_OPEN_CLIP_PREFIX}* (SDXL base) nor {SDXL_REFINER_OPEN_CLIP_PREFIX}* alone (SDXL refiner)"
        )));
    }
    let clip_tokens = format!("{CLIP_PREFIX}text_model.embeddings.token_embedding.weight");
    let open_clip_tokens = format!("{OPEN_CLIP_PREFIX}token_embedding.weight");
    if file.shapes.contains_key(&clip_tokens) {
        let family = Family::StableDiffusion1;
        Ok((family, vec![recognise_clip(file, used, CLIP_PREFIX, family, family.configs().text_encoder)?]))
    } else if file.shapes.contains_key(&open_clip_tokens) {
        let family = Family::StableDiffusion2;
        Ok((family, vec![recognise_open_clip(file, used, OPEN_CLIP_PREFIX, family, family.configs().text_encoder)?]))
    } else {
        Err(file.error(format!(
            "no text encoder: no tensor matches {clip_tokens} (SD 1.x), {open_clip_tokens} (SD 2.x), \
             {SDXL_CLIP_PREFIX}text_model.embeddings.token_embedding.weight (SDXL base) or \
             {SDXL_REFINER_OPEN_CLIP_PREFIX}token_embedding.weight (SDXL refiner)"
        )))
    }
}

/// transformers' CLIPTextModel under `prefix` (SD 1.x's `cond_stage_model.transformer.`,
/// SDXL's `conditioner.embedders.0.transformer.`), names unchanged (convert_ldm_clip_checkpoint
/// strips the prefix).
fn recognise_clip(
    file: &Tensors,
    used: &mut BTreeSet<String>,
    p: &str,
    family: Family,
    config: &str,
) -> Result<Encoder> {
    let tokens = format!("{p}text_model.embeddings.token_embedding.weight");
    let hidden_size = file.dim(&tokens, 1)?;
    let mut config = family_config(family, config, "text_encoder")?;
    config.insert("vocab_size".into(), json!(file.dim(&tokens, 0)?));
    config.insert("hidden_size".into(), json!(hidden_size));
    config.insert("num_attention_heads".into(), json!(heads_of_64(hidden_size, "the CLIP text encoder", file)?));
    config.insert(
        "max_position_embeddings".into(),
        json!(file.dim(&format!("{p}text_model.embeddings.position_embedding.weight"), 0)?),
    );
    config.insert("num_hidden_layers".into(), json!(file.count(&format!("{p}text_model.encoder.layers."))));
    config.insert(
        "intermediate_size".into(),
        json!(file.dim(&format!("{p}text_model.encoder.layers.0.mlp.fc1.weight"), 0)?),
    );

    let weights = map_component(file, p, "CLIP text encoder", used, |rest, _| {
        if rest == "text_model.embeddings.position_ids" {
            Renamed::Skip // a buffer (0..77) the model builds itself
        } else if rest.starts_with("text_model.") {
            Renamed::To(rest.to_string())
        } else {
            Renamed::Unknown
        }
    })?;
    Ok(Encoder { config, weights, hidden_size, projection_dim: None })
}

/// OpenCLIP under `p` (convert_open_clip_checkpoint): SD 2.x's ViT-H, whose last transformer
/// layer is left out (SD 2.x conditions on the penultimate layer's output), or SDXL's bigG,
/// every layer kept and with its `text_projection` (stored as `x @ p`: transposed for
/// CLIPTextModelWithProjection's linear layer).
fn recognise_open_clip(
    file: &Tensors,
    used: &mut BTreeSet<String>,
    p: &str,
    family: Family,
    config: &str,
) -> Result<Encoder> {
    let xl = family.is_xl();
    let tokens = format!("{p}token_embedding.weight");
    let hidden_size = file.dim(&tokens, 1)?;
    let layers_in_file = file.count(&format!("{p}transformer.resblocks."));
    let layers = if xl { layers_in_file } else { layers_in_file.saturating_sub(1) };
    if layers == 0 {
        return Err(file.error(format!(
            "the OpenCLIP text encoder has {layers_in_file} layers under {p}transformer.resblocks.{}",
            if xl { "" } else { "; SD 2.x uses all but the last, so it needs at least 2" }
        )));
    }
    let folder = if family == Family::StableDiffusionXL { "text_encoder_2" } else { "text_encoder" };
    let mut config = family_config(family, config, folder)?;
    config.insert("vocab_size".into(), json!(file.dim(&tokens, 0)?));
    config.insert("hidden_size".into(), json!(hidden_size));
    config.insert("num_attention_heads".into(), json!(heads_of_64(hidden_size, "the OpenCLIP text encoder", file)?));
    config.insert("max_position_embeddings".into(), json!(file.dim(&format!("{p}positional_embedding"), 0)?));
    config.insert("num_hidden_layers".into(), json!(layers));
    config.insert(
        "intermediate_size".into(),
        json!(file.dim(&format!("{p}transformer.resblocks.0.mlp.c_fc.weight"), 0)?),
    );
    let projection_dim = if xl {
        let name = format!("{p}text_projection");
        let shape = file.shape(&name)?;
        match shape {
            [rows, columns] if *rows == hidden_size => Some(*columns),
            _ => {
                return Err(file.error(format!(
                    "{name} has shape {shape:?}, expected [{hidden_size}, projection_dim] (hidden_size {hidden_size} from {tokens})"
                )))
            }
        }
    } else {
        None
    };
    if let Some(projection_dim) = projection_dim {
        config.insert("projection_dim".into(), json!(projection_dim));
    }

    let mut bad_in_proj = None;
    let weights = map_component(file, p, "OpenCLIP text encoder", used, |rest, shape| {
        let to = |name: &str| Renamed::To(format!("text_model.{name}"));
        match rest {
            "token_embedding.weight" => return to("embeddings.token_embedding.weight"),
            "positional_embedding" => return to("embeddings.position_embedding.weight"),
            "ln_final.weight" => return to("final_layer_norm.weight"),
            "ln_final.bias" => return to("final_layer_norm.bias"),
            // single_file_utils.py: convert_open_clip_checkpoint transposes `text_projection`.
            "text_projection" if xl => {
                return Renamed::Transformed(vec![("text_projection.weight".to_string(), Transform::Transpose)])
            }
            // CLIP's contrastive head and OpenCLIP's causal mask buffer: not part of CLIPTextModel.
            "text_projection" | "logit_scale" | "attn_mask" => return Renamed::Skip,
            _ => {}
        }
        let Some((layer, tail)) = rest.strip_prefix("transformer.resblocks.").and_then(split_index) else {
            return Renamed::Unknown;
        };
        if layer == layers {
            return Renamed::Skip;
        }
        let layer_prefix = format!("text_model.encoder.layers.{layer}");
        let renamed = match tail.split_once('.') {
            Some(("ln_1", param)) => format!("layer_norm1.{param}"),
            Some(("ln_2", param)) => format!("layer_norm2.{param}"),
            Some(("mlp", "c_fc.weight" | "c_fc.bias")) => tail.replace("c_fc", "fc1"),
            Some(("mlp", "c_proj.weight" | "c_proj.bias")) => tail.replace("c_proj", "fc2"),
            Some(("attn", "out_proj.weight" | "out_proj.bias")) => {
                format!("self_attn.{}", &tail[5..])
            }
            Some(("attn", fused @ ("in_proj_weight" | "in_proj_bias"))) => {
                // Fused [q; k; v] rows, each `hidden_size` long.
                if shape.first() != Some(&(3 * hidden_size)) {
                    bad_in_proj = Some(format!("{p}{rest} has shape {shape:?}, expected {} rows", 3 * hidden_size));
                    return Renamed::Unknown;
                }
                let param = if fused == "in_proj_weight" { "weight" } else { "bias" };
                return Renamed::Transformed(
                    ["q", "k", "v"]
                        .iter()
                        .enumerate()
                        .map(|(i, code)| {
                            let rows = Transform::Rows { start: i * hidden_size, len: hidden_size };
                            (format!("{layer_prefix}.self_attn.{code}_proj.{param}"), rows)
                        })
                        .collect(),
                );
            }
            _ => return Renamed::Unknown,
        };
        Renamed::To(format!("{layer_prefix}.{renamed}"))
    });
    if let Some(message) = bad_in_proj {
        return Err(file.error(message));
    }
    Ok(Encoder { config, weights: weights?, hidden_size, projection_dim })
}

// ---------------------------------------------------------------------------------------------
// UNet
// ---------------------------------------------------------------------------------------------

/// diffusers' ResnetBlock2D names for LDM's ResBlock (update_unet_resnet_ldm_to_diffusers).
fn unet_resnet(tail: &str) -> Option<String> {
    const RENAMES: [(&str, &str); 6] = [
        ("in_layers.0.", "norm1."),
        ("in_layers.2.", "conv1."),
        ("out_layers.0.", "norm2."),
        ("out_layers.3.", "conv2."),
        ("emb_layers.1.", "time_emb_proj."),
        ("skip_connection.", "conv_shortcut."),
    ];
    RENAMES.iter().find_map(|(ldm, diffusers)| tail.strip_prefix(ldm).map(|param| format!("{diffusers}{param}")))
}

/// Config, weights, cross-attention width and input channels of the UNet. `pooled_dim` is the
/// width of SDXL's pooled text embedding (the last text encoder's projection).
fn recognise_unet(
    file: &Tensors,
    family: Family,
    pooled_dim: Option<usize>,
    used: &mut BTreeSet<String>,
) -> Result<(Map<String, Value>, WeightMap, usize, usize)> {
    let p = UNET_PREFIX;
    let name = |rest: &str| format!("{p}{rest}");
    let in_channels = file.dim(&name("input_blocks.0.0.weight"), 1)?;

    // LDM numbers the levels' layers consecutively: input block 0 is conv_in, then per level
    // `layers_per_block` (resnet, attention) pairs and, but for the last level, a downsampler;
    // the output blocks have one layer more per level and no conv_in.
    let input_blocks = file.count(&name("input_blocks."));
    let output_blocks = file.count(&name("output_blocks."));
    let downsamplers: Vec<usize> = (1..input_blocks)
        .filter(|i| file.shapes.contains_key(&name(&format!("input_blocks.{i}.0.op.weight"))))
        .collect();
    let levels = downsamplers.len() + 1;
    let per_level = output_blocks / levels;
    if output_blocks == 0 || !output_blocks.is_multiple_of(levels) || per_level < 2 || input_blocks != output_blocks {
        return Err(file.error(format!(
            "the UNet's {input_blocks} input blocks, {output_blocks} output blocks and {} downsamplers \
             (input_blocks.N.0.op) do not make the levels of a Stable Diffusion UNet",
            downsamplers.len()
        )));
    }
    let layers_per_block = per_level - 1;
    for (level, &index) in downsamplers.iter().enumerate() {
        if index != (level + 1) * per_level {
            return Err(file.error(format!(
                "{} is a downsampler where a level of {layers_per_block} layers has none",
                name(&format!("input_blocks.{index}.0.op.weight"))
            )));
        }
    }

    let mut block_out_channels = Vec::new();
    let mut down_block_types = Vec::new();
    let mut up_block_types = Vec::new();
    for level in 0..levels {
        let first = 1 + level * per_level;
        block_out_channels.push(file.dim(&name(&format!("input_blocks.{first}.0.out_layers.3.weight")), 0)?);
        let down_attention = file.shapes.contains_key(&name(&format!("input_blocks.{first}.1.proj_in.weight")));
        down_block_types.push(if down_attention { "CrossAttnDownBlock2D" } else { "DownBlock2D" });
        let up_attention =
            file.shapes.contains_key(&name(&format!("output_blocks.{}.1.proj_in.weight", level * per_level)));
        up_block_types.push(if up_attention { "CrossAttnUpBlock2D" } else { "UpBlock2D" });
    }
    let to_k = name("middle_block.1.transformer_blocks.0.attn2.to_k.weight");
    let cross_attention_dim = file.dim(&to_k, 1)?;
    // SD 2.x and SDXL project into the transformer with a linear layer, SD 1.x with a 1x1 conv.
    let use_linear_projection = file.shape(&name("middle_block.1.proj_in.weight"))?.len() == 2;
    if !family.is_xl() {
        if let Some(deeper) = file.shapes.keys().find(|k| k.starts_with(p) && k.contains(".transformer_blocks.1.")) {
            return Err(
                file.error(format!("{deeper}: more than one transformer block per attention is not SD 1.x/2.x"))
            );
        }
    }

    let mut config = family_config(family, family.configs().unet, "unet")?;
    if family.is_xl() {
        let transformer_layers = transformer_depths(file, &config, levels, per_level, &down_block_types)?;
        config.insert("transformer_layers_per_block".into(), transformer_layers);
    }
    config.insert("in_channels".into(), json!(in_channels));
    config.insert("out_channels".into(), json!(file.dim(&name("out.2.weight"), 0)?));
    config.insert("block_out_channels".into(), json!(block_out_channels));
    config.insert("layers_per_block".into(), json!(layers_per_block));
    config.insert("down_block_types".into(), json!(down_block_types));
    config.insert("up_block_types".into(), json!(up_block_types));
    config.insert("cross_attention_dim".into(), json!(cross_attention_dim));
    if use_linear_projection || config.contains_key("use_linear_projection") {
        config.insert("use_linear_projection".into(), json!(use_linear_projection));
    }
    // diffusers' `attention_head_dim` is the number of heads here (a historical misnomer).
    let heads = match family {
        Family::StableDiffusion1 => json!(8),
        Family::StableDiffusion2 | Family::StableDiffusionXL | Family::StableDiffusionXLRefiner => {
            let heads: Result<Vec<usize>> =
                block_out_channels.iter().map(|&c| heads_of_64(c, "a UNet level", file)).collect();
            json!(heads?)
        }
    };
    config.insert("attention_head_dim".into(), heads);
    // The upscaler's noise-level classes and unCLIP's image embedding (create_unet_diffusers_config_from_ldm).
    if file.shapes.contains_key(&name("label_emb.weight")) {
        config.insert("num_class_embeds".into(), json!(file.dim(&name("label_emb.weight"), 0)?));
    }
    if family.is_xl() {
        let (input_dim, time_embed_dim) = added_embedding_dims(file, family, pooled_dim)?;
        config.insert("projection_class_embeddings_input_dim".into(), json!(input_dim));
        config.insert("addition_time_embed_dim".into(), json!(time_embed_dim));
    } else if file.shapes.contains_key(&name("label_emb.0.0.weight")) {
        config.insert("class_embed_type".into(), json!("projection"));
        config
            .insert("projection_class_embeddings_input_dim".into(), json!(file.dim(&name("label_emb.0.0.weight"), 1)?));
    }

    // An LCM-distilled UNet embeds the guidance scale (time_embedding.cond_proj): the LDM layout
    // never had that layer, so diffusers' conversion script keeps its diffusers name.
    if let Some(cond_proj) = LCM_COND_PROJ.iter().map(|k| name(&format!("{k}weight"))).find(|k| file.shapes.contains_key(k)) {
        config.insert("time_cond_proj_dim".into(), json!(file.dim(&cond_proj, 1)?));
    }

    let weights = map_component(file, p, "UNet", used, |rest, _| match unet_name(rest, per_level, family.is_xl()) {
        Some(name) => Renamed::To(name),
        None => Renamed::Unknown,
    })?;
    Ok((config, weights, cross_attention_dim, in_channels))
}

/// Where single files keep an LCM UNet's guidance embedding (diffusers' name, and the LDM-style
/// name some converters give it).
const LCM_COND_PROJ: [&str; 2] = ["time_embedding.cond_proj.", "time_embed.cond_proj."];

/// SDXL's `transformer_layers_per_block`, from how many `transformer_blocks.N` each attention
/// holds: the family's form (a number for the refiner, a list per level for the base), a level
/// without attention as 1 but for the last, whose value the mid block takes (diffusers builds
/// it with `transformer_layers_per_block[-1]`; the up blocks take the list reversed). Every
/// attention must hold its level's number.
fn transformer_depths(
    file: &Tensors,
    family_config: &Map<String, Value>,
    levels: usize,
    per_level: usize,
    down_block_types: &[&str],
) -> Result<Value> {
    let p = UNET_PREFIX;
    let depth = |block: &str| file.count(&format!("{p}{block}.1.transformer_blocks."));
    let mid = depth("middle_block");
    let attention = |level: usize| down_block_types.get(level).is_some_and(|t| t.starts_with("CrossAttn"));
    let down: Vec<Option<usize>> = (0..levels)
        .map(|level| attention(level).then(|| depth(&format!("input_blocks.{}", 1 + level * per_level))))
        .collect();
    let list: Vec<usize> =
        down.iter().enumerate().map(|(level, d)| d.unwrap_or(if level + 1 == levels { mid } else { 1 })).collect();
    let expect = |block: String, expected: usize| -> Result<()> {
        let found = depth(&block);
        if found != 0 && found != expected {
            return Err(file.error(format!(
                "{p}{block}.1 has {found} transformer blocks where its level has {expected} \
                 (diffusers' transformer_layers_per_block gives each level one number, the mid block the last level's)"
            )));
        }
        Ok(())
    };
    expect("middle_block".to_string(), list[levels - 1])?;
    for level in 0..levels {
        for layer in 0..per_level - 1 {
            expect(format!("input_blocks.{}", 1 + level * per_level + layer), list[level])?;
        }
        // Output level `level` mirrors input level `levels - 1 - level`.
        for layer in 0..per_level {
            expect(format!("output_blocks.{}", level * per_level + layer), list[levels - 1 - level])?;
        }
    }
    let uniform = down.iter().flatten().all(|&d| d == mid);
    let family_number = family_config.get("transformer_layers_per_block").is_some_and(Value::is_u64);
    Ok(if uniform && family_number { json!(mid) } else { json!(list) })
}

/// SDXL's added text-time embedding (`label_emb.0.0` = add_embedding.linear_1): its input width
/// (projection_class_embeddings_input_dim) is the pooled text embedding and 6 time ids (the
/// refiner: 5, the aesthetic score for the target size) of `addition_time_embed_dim` each.
fn added_embedding_dims(file: &Tensors, family: Family, pooled_dim: Option<usize>) -> Result<(usize, usize)> {
    let linear_1 = format!("{UNET_PREFIX}label_emb.0.0.weight");
    let input_dim = file.dim(&linear_1, 1)?;
    let Some(pooled_dim) = pooled_dim else {
        return Err(file.error(format!("{linear_1}: an SDXL UNet needs a text encoder with a text_projection")));
    };
    let ids = if family == Family::StableDiffusionXLRefiner { 5 } else { 6 };
    match input_dim.checked_sub(pooled_dim) {
        Some(time_width) if time_width > 0 && time_width % ids == 0 => Ok((input_dim, time_width / ids)),
        _ => Err(file.error(format!(
            "{linear_1} takes {input_dim} inputs, which is not the pooled text embedding ({pooled_dim}, the \
             text_projection's width) and {ids} time ids of one width{}",
            if family == Family::StableDiffusionXLRefiner {
                " (an SDXL refiner: 5 ids, with the aesthetic score)"
            } else {
                " (an SDXL base: 6 ids)"
            }
        ))),
    }
}

/// The diffusers name of one UNet tensor (`rest` without the prefix), as convert_ldm_unet_checkpoint
/// places it; `per_level` is layers_per_block + 1. SDXL's `label_emb.0` is its added text-time
/// embedding, other models' a class embedding.
fn unet_name(rest: &str, per_level: usize, xl: bool) -> Option<String> {
    if xl {
        // single_file_utils.py: convert_ldm_unet_checkpoint maps label_emb.0.{0,2} to add_embedding.linear_{1,2}.
        if let Some(param) = rest.strip_prefix("label_emb.0.0.") {
            return Some(format!("add_embedding.linear_1.{param}"));
        }
        if let Some(param) = rest.strip_prefix("label_emb.0.2.") {
            return Some(format!("add_embedding.linear_2.{param}"));
        }
        if rest.starts_with("label_emb.") {
            return None;
        }
    }
    const TOP: [(&str, &str); 9] = [
        (LCM_COND_PROJ[0], "time_embedding.cond_proj."),
        (LCM_COND_PROJ[1], "time_embedding.cond_proj."),
        ("time_embed.0.", "time_embedding.linear_1."),
        ("time_embed.2.", "time_embedding.linear_2."),
        ("input_blocks.0.0.", "conv_in."),
        ("out.0.", "conv_norm_out."),
        ("out.2.", "conv_out."),
        ("label_emb.0.0.", "class_embedding.linear_1."),
        ("label_emb.0.2.", "class_embedding.linear_2."),
    ];
    if let Some(name) =
        TOP.iter().find_map(|(ldm, diffusers)| rest.strip_prefix(ldm).map(|param| format!("{diffusers}{param}")))
    {
        return Some(name);
    }
    if let Some(param) = rest.strip_prefix("label_emb.") {
        return (param == "weight").then(|| "class_embedding.weight".to_string());
    }
    if let Some((index, tail)) = rest.strip_prefix("input_blocks.").and_then(split_index) {
        if index == 0 {
            return None; // conv_in, placed above
        }
        let (level, layer) = ((index - 1) / per_level, (index - 1) % per_level);
        let (part, tail) = split_index(tail)?;
        return match part {
            0 if layer == per_level - 1 => {
                let param = tail.strip_prefix("op.")?;
                Some(format!("down_blocks.{level}.downsamplers.0.conv.{param}"))
            }
            0 => Some(format!("down_blocks.{level}.resnets.{layer}.{}", unet_resnet(tail)?)),
            1 if layer < per_level - 1 => Some(format!("down_blocks.{level}.attentions.{layer}.{tail}")),
            _ => None,
        };
    }
    if let Some((part, tail)) = rest.strip_prefix("middle_block.").and_then(split_index) {
        return match part {
            0 | 2 => Some(format!("mid_block.resnets.{}.{}", part / 2, unet_resnet(tail)?)),
            1 => Some(format!("mid_block.attentions.0.{tail}")),
            _ => None,
        };
    }
    if let Some((index, tail)) = rest.strip_prefix("output_blocks.").and_then(split_index) {
        let (level, layer) = (index / per_level, index % per_level);
        let (part, tail) = split_index(tail)?;
        // The level's last layer ends with the upsampler: after the attention if there is one.
        let upsampler = |tail: &str| {
            let param = tail.strip_prefix("conv.")?;
            (layer == per_level - 1).then(|| format!("up_blocks.{level}.upsamplers.0.conv.{param}"))
        };
        return match part {
            0 => Some(format!("up_blocks.{level}.resnets.{layer}.{}", unet_resnet(tail)?)),
            1 if tail.starts_with("conv.") => upsampler(tail),
            1 => Some(format!("up_blocks.{level}.attentions.{layer}.{tail}")),
            2 => upsampler(tail),
            _ => None,
        };
    }
    None
}

// ---------------------------------------------------------------------------------------------
// VAE
// ---------------------------------------------------------------------------------------------

fn recognise_vae(
    file: &Tensors,
    family: Family,
    inpainting: bool,
    used: &mut BTreeSet<String>,
) -> Result<(Map<String, Value>, WeightMap)> {
    let prefix = VAE_PREFIXES
        .iter()
        .rev()
        .find(|p| file.shapes.keys().any(|k| k.starts_with(**p)))
        .ok_or_else(|| file.error(format!("no VAE: no tensor name starts with {}", VAE_PREFIXES.join(" or "))))?;
    let name = |rest: &str| format!("{prefix}{rest}");
    let levels = file.count(&name("encoder.down."));
    let decoder_levels = file.count(&name("decoder.up."));
    if levels == 0 || levels != decoder_levels {
        return Err(file.error(format!(
            "the VAE has {levels} encoder levels ({prefix}encoder.down.N) and {decoder_levels} decoder levels ({prefix}decoder.up.N)"
        )));
    }
    let layers_per_block = file.count(&name("encoder.down.0.block."));
    let block_out_channels: Result<Vec<usize>> =
        (0..levels).map(|i| file.dim(&name(&format!("encoder.down.{i}.block.0.conv1.weight")), 0)).collect();

    let mut config = family_config(family, family.configs().vae, "vae")?;
    config.insert("in_channels".into(), json!(file.dim(&name("encoder.conv_in.weight"), 1)?));
    config.insert("out_channels".into(), json!(file.dim(&name("decoder.conv_out.weight"), 0)?));
    config.insert("latent_channels".into(), json!(file.dim(&name("decoder.conv_in.weight"), 1)?));
    config.insert("block_out_channels".into(), json!(block_out_channels?));
    config.insert("layers_per_block".into(), json!(layers_per_block));
    config.insert("down_block_types".into(), json!(vec!["DownEncoderBlock2D"; levels]));
    config.insert("up_block_types".into(), json!(vec!["UpDecoderBlock2D"; levels]));
    if family == Family::StableDiffusion2 && inpainting {
        config.insert("sample_size".into(), json!(512));
    }

    let weights = map_component(file, prefix, "VAE", used, |rest, shape| match vae_name(rest, levels) {
        Some(name) if is_vae_attention_weight(&name) && shape.len() > 2 => {
            if shape[2..].iter().all(|&d| d == 1) {
                Renamed::Transformed(vec![(name, Transform::ConvToLinear)])
            } else {
                Renamed::Unknown
            }
        }
        Some(name) => Renamed::To(name),
        None => Renamed::Unknown,
    })?;
    Ok((config, weights))
}

fn is_vae_attention_weight(name: &str) -> bool {
    ["to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight"]
        .iter()
        .any(|w| name.ends_with(&format!("attentions.0.{w}")))
}

/// diffusers' ResnetBlock2D names for the VAE's LDM ResnetBlock (update_vae_resnet_ldm_to_diffusers).
fn vae_resnet(tail: &str) -> Option<String> {
    let (layer, param) = tail.split_once('.')?;
    match layer {
        "norm1" | "conv1" | "norm2" | "conv2" => Some(tail.to_string()),
        "nin_shortcut" => Some(format!("conv_shortcut.{param}")),
        _ => None,
    }
}

/// The diffusers name of one VAE tensor (convert_ldm_vae_checkpoint). LDM numbers the decoder's
/// levels from the bottom, diffusers from the top.
fn vae_name(rest: &str, levels: usize) -> Option<String> {
    const SAME: [&str; 6] = [
        "encoder.conv_in.",
        "encoder.conv_out.",
        "decoder.conv_in.",
        "decoder.conv_out.",
        "quant_conv.",
        "post_quant_conv.",
    ];
    if SAME.iter().any(|p| rest.starts_with(p)) {
        return Some(rest.to_string());
    }
    let (side, tail) = rest.split_once('.')?;
    if side != "encoder" && side != "decoder" {
        return None;
    }
    if let Some(param) = tail.strip_prefix("norm_out.") {
        return Some(format!("{side}.conv_norm_out.{param}"));
    }
    if let Some(tail) = tail.strip_prefix("mid.") {
        let (block, inner) = tail.split_once('.')?;
        return match block {
            "block_1" => Some(format!("{side}.mid_block.resnets.0.{}", vae_resnet(inner)?)),
            "block_2" => Some(format!("{side}.mid_block.resnets.1.{}", vae_resnet(inner)?)),
            "attn_1" => {
                let (layer, param) = inner.split_once('.')?;
                let layer = match layer {
                    "norm" => "group_norm",
                    "q" => "to_q",
                    "k" => "to_k",
                    "v" => "to_v",
                    "proj_out" => "to_out.0",
                    _ => return None,
                };
                Some(format!("{side}.mid_block.attentions.0.{layer}.{param}"))
            }
            _ => None,
        };
    }
    let (blocks, level, inner) = match side {
        "encoder" => {
            let (level, inner) = tail.strip_prefix("down.").and_then(split_index)?;
            ("down_blocks", level, inner)
        }
        _ => {
            let (level, inner) = tail.strip_prefix("up.").and_then(split_index)?;
            ("up_blocks", levels.checked_sub(level + 1)?, inner)
        }
    };
    if let Some((layer, tail)) = inner.strip_prefix("block.").and_then(split_index) {
        return Some(format!("{side}.{blocks}.{level}.resnets.{layer}.{}", vae_resnet(tail)?));
    }
    let sampler = if side == "encoder" { "downsample.conv." } else { "upsample.conv." };
    let param = inner.strip_prefix(sampler)?;
    let samplers = if side == "encoder" { "downsamplers" } else { "upsamplers" };
    Some(format!("{side}.{blocks}.{level}.{samplers}.0.conv.{param}"))
}
