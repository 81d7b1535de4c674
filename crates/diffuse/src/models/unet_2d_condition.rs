//! `UNet2DConditionModel`, the text-conditioned latent UNet of Stable Diffusion 1.x, 2.x and XL;
//! port of diffusers/models/unets/unet_2d_condition.py.
//!
//! Every argument of diffusers' `__init__` is a config field with its default. The ones that
//! only other model families use (Kandinsky's projections and added embeddings, GLIGEN, dual
//! cross-attention, class embeddings other than a plain `num_class_embeds` table) are parsed
//! and refused with an error naming the key when set. SDXL's `addition_embed_type = "text_time"`
//! (the pooled text embedding and the size/crop ids, added to the time embedding) is built.

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Deserializer};

use super::embeddings::{GaussianFourierProjection, TimestepEmbedding, TimestepEmbeddingConfig, Timesteps};
use super::resnet::TimeEmbeddingNorm;
use super::unet_2d::SampleSize;
use super::unet_2d_blocks::{
    BlockArgs, CrossAttnArgs, CrossAttnDownBlock2D, CrossAttnUpBlock2D, DownBlock2D, MidBlockArgs, ResampleType, UNetMidBlock2D,
    UNetMidBlock2DCrossAttn, UpBlock2D,
};
use super::{Activation, Conv2d, Embedding, GroupNorm, LoraDropout};
use crate::{bail, Error, Result};

/// A setting given once for all blocks or as a list with one entry per down block.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum PerBlock<T> {
    /// The same value for every block.
    One(T),
    /// One value per down block (reversed for the up blocks).
    List(Vec<T>),
}

impl<T: Clone + std::fmt::Debug> PerBlock<T> {
    /// One value per block (`num_blocks` of them); a list of another length is an error
    /// naming `key`.
    pub fn per_block(&self, key: &str, num_blocks: usize) -> Result<Vec<T>> {
        match self {
            PerBlock::One(value) => Ok(vec![value.clone(); num_blocks]),
            PerBlock::List(values) if values.len() == num_blocks => Ok(values.clone()),
            PerBlock::List(values) => Err(config_error(
                key,
                format!("has {} entries ({values:?}) but there are {num_blocks} down blocks", values.len()),
            )),
        }
    }
}

/// `cross_attention_dim` as Stable Diffusion has it: one number. A per-block list is accepted
/// only if all its entries are equal.
fn deserialize_cross_attention_dim<'de, D: Deserializer<'de>>(deserializer: D) -> std::result::Result<usize, D::Error> {
    match PerBlock::<usize>::deserialize(deserializer)? {
        PerBlock::One(dim) => Ok(dim),
        PerBlock::List(dims) => match dims.first() {
            Some(&first) if dims.iter().all(|&d| d == first) => Ok(first),
            _ => Err(serde::de::Error::custom(format!(
                "a per-block list of different widths ({dims:?}) is not supported; Stable Diffusion UNets use one number"
            ))),
        },
    }
}

fn null_as_false<'de, D: Deserializer<'de>>(deserializer: D) -> std::result::Result<bool, D::Error> {
    Ok(Option::<bool>::deserialize(deserializer)?.unwrap_or(false))
}

fn default_cross_attention_dim() -> usize {
    1280
}

/// The arguments of `UNet2DConditionModel.__init__`, as `config.json` stores them, with its
/// defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct UNet2DConditionModelConfig {
    /// The size, in latent pixels, the model was trained at (64 for SD 1.x).
    pub sample_size: Option<SampleSize>,
    /// Channels of the input. Default: `4`.
    pub in_channels: usize,
    /// Channels of the output. Default: `4`.
    pub out_channels: usize,
    /// Map the input from [0, 1] to [-1, 1] first. Default: `false`.
    pub center_input_sample: bool,
    /// Cosines before sines in the timestep projection. Default: `true`.
    pub flip_sin_to_cos: bool,
    /// The sinusoidal timestep projection's `downscale_freq_shift`. Default: `0.0`.
    pub freq_shift: f64,
    /// The down blocks' class names, one per resolution level.
    pub down_block_types: Vec<String>,
    /// The mid block's class name (`None`: no mid block). Default: `UNetMidBlock2DCrossAttn`.
    pub mid_block_type: Option<String>,
    /// The up blocks' class names, one per resolution level.
    pub up_block_types: Vec<String>,
    /// Whether each block's first attention attends to the context only (one value or one per
    /// block).
    pub only_cross_attention: PerBlock<bool>,
    /// Channels of each resolution level.
    pub block_out_channels: Vec<usize>,
    /// Resnets per down block, one value or one per block (up blocks have one more).
    pub layers_per_block: PerBlock<usize>,
    /// Padding of the downsampling convolutions. Default: `1`.
    pub downsample_padding: usize,
    /// The mid block resnets' `output_scale_factor`. Default: `1.0`.
    pub mid_block_scale_factor: f64,
    /// Dropout probability (training only; 0 at inference). Default: `0.0`.
    pub dropout: f64,
    /// The activation (diffusers' `get_activation` name). Default: `silu`.
    pub act_fn: String,
    /// `None` (no output normalisation) is not supported.
    pub norm_num_groups: Option<usize>,
    /// The norms' epsilon. Default: `1e-5`.
    pub norm_eps: f64,
    /// Width of the context, the text encoder's hidden states (768 for SD 1.x, 1024 for SD 2.x).
    #[serde(deserialize_with = "deserialize_cross_attention_dim", default = "default_cross_attention_dim")]
    pub cross_attention_dim: usize,
    /// Transformer blocks in each attention layer (SDXL: more in deeper levels).
    pub transformer_layers_per_block: PerBlock<usize>,
    /// Refused if set (asymmetric UNets).
    pub reverse_transformer_layers_per_block: Option<serde_json::Value>,
    /// Refused if set (Kandinsky / IP-adapter style context projections).
    pub encoder_hid_dim: Option<usize>,
    /// How `encoder_hid_dim` projects the context (`text_proj`, ...); `None` for SD.
    pub encoder_hid_dim_type: Option<String>,
    /// Despite its name, the number of attention heads of the cross-attention blocks (see
    /// diffusers issue 2011): each head has `block_out_channels[i] / attention_head_dim[i]`
    /// channels.
    pub attention_head_dim: PerBlock<usize>,
    /// Refused if set, as diffusers refuses it.
    pub num_attention_heads: Option<PerBlock<usize>>,
    /// Refused if true (versatile diffusion).
    pub dual_cross_attention: bool,
    /// Linear layers instead of 1×1 convolutions around the transformers (SD 2.x). Default:
    /// `false`.
    pub use_linear_projection: bool,
    /// Refused if set; `num_class_embeds` alone gives a class-embedding table.
    pub class_embed_type: Option<String>,
    /// `text_time` (SDXL: [`AddedConditions`]); the other kinds (Kandinsky's) are refused.
    pub addition_embed_type: Option<String>,
    /// Width of each projected SDXL micro-conditioning value (`add_time_proj`).
    pub addition_time_embed_dim: Option<usize>,
    /// Classes of the class-label embedding (class-conditional models).
    pub num_class_embeds: Option<usize>,
    /// SDXL's configs say `null`, which diffusers reads as false.
    #[serde(deserialize_with = "null_as_false")]
    pub upcast_attention: bool,
    /// How resnets take the time embedding: `default` (added) or `scale_shift`. Default: `default`.
    pub resnet_time_scale_shift: String,
    /// Only used by block types we do not build.
    pub resnet_skip_time_act: bool,
    /// Only used by block types we do not build.
    pub resnet_out_scale_factor: f64,
    /// `positional` or `fourier`.
    pub time_embedding_type: String,
    /// Width of the time embedding (default: 4 × `block_out_channels[0]`).
    pub time_embedding_dim: Option<usize>,
    /// An activation applied to the time embedding before the resnets.
    pub time_embedding_act_fn: Option<String>,
    /// An activation after the time embedding MLP.
    pub timestep_post_act: Option<String>,
    /// LCM's guidance embedding (`time_embedding.cond_proj`).
    pub time_cond_proj_dim: Option<usize>,
    /// Kernel size of `conv_in`. Default: `3`.
    pub conv_in_kernel: usize,
    /// Kernel size of `conv_out`. Default: `3`.
    pub conv_out_kernel: usize,
    /// Input width of the `projection` class embedding (SDXL: text_embeds + time_ids).
    pub projection_class_embeddings_input_dim: Option<usize>,
    /// Only `default` (`gated` is GLIGEN).
    pub attention_type: String,
    /// Refused if true.
    pub class_embeddings_concat: bool,
    /// Only used by `UNetMidBlock2DSimpleCrossAttn`, which we do not build.
    pub mid_block_only_cross_attention: Option<bool>,
    /// Only used by the simple cross-attention blocks, which we do not build.
    pub cross_attention_norm: Option<String>,
    /// Heads of the `text` addition embedding's attention pooling. Default: `64`.
    pub addition_embed_type_num_heads: usize,
}

impl Default for UNet2DConditionModelConfig {
    fn default() -> Self {
        let strings = |names: &[&str]| names.iter().map(|n| n.to_string()).collect();
        Self {
            sample_size: None,
            in_channels: 4,
            out_channels: 4,
            center_input_sample: false,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: strings(&["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]),
            mid_block_type: Some("UNetMidBlock2DCrossAttn".to_string()),
            up_block_types: strings(&["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]),
            only_cross_attention: PerBlock::One(false),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: PerBlock::One(2),
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            dropout: 0.0,
            act_fn: "silu".to_string(),
            norm_num_groups: Some(32),
            norm_eps: 1e-5,
            cross_attention_dim: default_cross_attention_dim(),
            transformer_layers_per_block: PerBlock::One(1),
            reverse_transformer_layers_per_block: None,
            encoder_hid_dim: None,
            encoder_hid_dim_type: None,
            attention_head_dim: PerBlock::One(8),
            num_attention_heads: None,
            dual_cross_attention: false,
            use_linear_projection: false,
            class_embed_type: None,
            addition_embed_type: None,
            addition_time_embed_dim: None,
            num_class_embeds: None,
            upcast_attention: false,
            resnet_time_scale_shift: "default".to_string(),
            resnet_skip_time_act: false,
            resnet_out_scale_factor: 1.0,
            time_embedding_type: "positional".to_string(),
            time_embedding_dim: None,
            time_embedding_act_fn: None,
            timestep_post_act: None,
            time_cond_proj_dim: None,
            conv_in_kernel: 3,
            conv_out_kernel: 3,
            projection_class_embeddings_input_dim: None,
            attention_type: "default".to_string(),
            class_embeddings_concat: false,
            mid_block_only_cross_attention: None,
            cross_attention_norm: None,
            addition_embed_type_num_heads: 64,
        }
    }
}

impl UNet2DConditionModelConfig {
    /// The latent (height, width) the model was trained at: `sample_size`, or 64×64 (Stable
    /// Diffusion 1.x's 512-pixel images) when the config does not say.
    pub fn sample_size_hw(&self) -> (usize, usize) {
        self.sample_size.map(|size| size.height_width()).unwrap_or((64, 64))
    }

    /// Whether the UNet takes SDXL's added conditioning (`addition_embed_type = "text_time"`):
    /// the pooled text embedding and the size/crop time ids.
    pub fn takes_text_time(&self) -> bool {
        self.addition_embed_type.as_deref() == Some("text_time")
    }

    /// Refuses the settings of other model families that we do not implement.
    fn check_supported(&self) -> Result<()> {
        let refuse = |key: &str, what: &str| Err(config_error(key, format!("{what} is not supported")));
        if let Some(heads) = &self.num_attention_heads {
            return Err(config_error(
                "num_attention_heads",
                format!(
                    "is {heads:?}, but must not be set (diffusers refuses it too, because of the naming issue \
                     described in diffusers issue 2011; set `attention_head_dim` to the number of heads)"
                ),
            ));
        }
        if let Some(dim) = self.encoder_hid_dim {
            return refuse("encoder_hid_dim", &format!("projecting the context from width {dim}"));
        }
        if let Some(kind) = &self.encoder_hid_dim_type {
            return refuse("encoder_hid_dim_type", &format!("`{kind}`"));
        }
        if let Some(kind) = &self.class_embed_type {
            return refuse(
                "class_embed_type",
                &format!("`{kind}` (only a plain `num_class_embeds` table, with class_embed_type null,)"),
            );
        }
        match self.addition_embed_type.as_deref() {
            None | Some("text_time") => {}
            Some(kind) => return refuse("addition_embed_type", &format!("`{kind}` (only `text_time`, SDXL's)")),
        }
        if self.dual_cross_attention {
            return refuse("dual_cross_attention", "dual cross-attention");
        }
        if self.class_embeddings_concat {
            return refuse("class_embeddings_concat", "concatenating class embeddings");
        }
        if self.attention_type != "default" {
            return refuse("attention_type", &format!("`{}` (only `default`)", self.attention_type));
        }
        if matches!(&self.reverse_transformer_layers_per_block, Some(value) if !value.is_null()) {
            return refuse("reverse_transformer_layers_per_block", "an asymmetric UNet");
        }
        if self.norm_num_groups.is_none() {
            return refuse("norm_num_groups", "null (no normalisation)");
        }
        Ok(())
    }
}

/// Maps a configuration problem to an error naming the key.
fn config_error(key: &str, message: impl std::fmt::Display) -> Error {
    Error::invalid(format!("UNet2DConditionModel config: key `{key}`: {message}"))
}

/// Names the config entry of a block that failed to build.
fn prefix_block_error(error: Error, key: &str, index: usize) -> Error {
    match error {
        Error::InvalidInput(message) => Error::invalid(format!("UNet2DConditionModel config: key `{key}[{index}]`: {message}")),
        other => other,
    }
}

/// The down block types we build.
const SUPPORTED_DOWN_BLOCKS: &[&str] = &["CrossAttnDownBlock2D", "DownBlock2D"];
/// The up block types we build.
const SUPPORTED_UP_BLOCKS: &[&str] = &["CrossAttnUpBlock2D", "UpBlock2D"];

/// How timesteps become vectors (`time_proj`).
#[derive(Debug, Clone)]
enum TimeProjection {
    Positional(Timesteps),
    Fourier(GaussianFourierProjection),
}

impl TimeProjection {
    fn forward(&self, timesteps: &Tensor) -> Result<Tensor> {
        match self {
            TimeProjection::Positional(projection) => projection.forward(timesteps),
            TimeProjection::Fourier(projection) => projection.forward(timesteps),
        }
    }
}

#[derive(Debug, Clone)]
enum DownBlock {
    CrossAttn(CrossAttnDownBlock2D),
    Plain(DownBlock2D),
}

#[derive(Debug, Clone)]
enum MidBlock {
    CrossAttn(UNetMidBlock2DCrossAttn),
    Plain(UNetMidBlock2D),
}

#[derive(Debug, Clone)]
enum UpBlock {
    CrossAttn(CrossAttnUpBlock2D),
    Plain(UpBlock2D),
}

impl UpBlock {
    fn num_resnets(&self) -> usize {
        match self {
            UpBlock::CrossAttn(block) => block.num_resnets(),
            UpBlock::Plain(block) => block.num_resnets(),
        }
    }
}

/// SDXL's extra conditioning (`added_cond_kwargs` of addition_embed_type `text_time`): the
/// pooled, projected embedding of the second text encoder `[B, projection_dim]` and the
/// micro-conditioning ids `[B, n]` (original size, crop top-left, then target size or the
/// aesthetic score).
#[derive(Debug, Clone)]
pub struct AddedConditions {
    /// The pooled text embedding `[B, projection_dim]`.
    pub text_embeds: Tensor,
    /// The micro-conditioning ids `[B, n]`.
    pub time_ids: Tensor,
}

/// `add_time_proj` and `add_embedding` of a `text_time` UNet.
#[derive(Debug, Clone)]
struct TextTimeEmbedding {
    time_proj: Timesteps,
    embedding: TimestepEmbedding,
    /// `projection_class_embeddings_input_dim`: text embedding width + ids × time-proj width.
    input_dim: usize,
    time_embed_dim: usize,
}

impl TextTimeEmbedding {
    /// `aug_emb = add_embedding(concat(text_embeds, flatten(add_time_proj(time_ids))))`.
    fn forward(&self, added: &AddedConditions, batch: usize, dtype: DType) -> Result<Tensor> {
        let (text_batch, text_dim) = added.text_embeds.dims2().map_err(|_| {
            Error::invalid(format!("text_embeds should be [batch, width], got {:?}", added.text_embeds.dims()))
        })?;
        let (ids_batch, num_ids) = added.time_ids.dims2().map_err(|_| {
            Error::invalid(format!("time_ids should be [batch, n], got {:?}", added.time_ids.dims()))
        })?;
        if text_batch != batch || ids_batch != batch {
            bail!("text_embeds ({text_batch}) and time_ids ({ids_batch}) must have the sample's batch size {batch}");
        }
        let passed = text_dim + num_ids * self.time_embed_dim;
        if passed != self.input_dim {
            bail!(
                "the UNet expects an added time embedding vector of length {} (projection_class_embeddings_input_dim), \
                 but {text_dim} (pooled text embedding) + {num_ids} time ids × {} (addition_time_embed_dim) = {passed} \
                 were given: check the text encoder's projection_dim and whether the model takes a target size or an \
                 aesthetic score (requires_aesthetics_score)",
                self.input_dim,
                self.time_embed_dim
            );
        }
        let time_embeds = self.time_proj.forward(&added.time_ids.to_dtype(DType::F32)?.flatten_all()?)?;
        let time_embeds = time_embeds.reshape((batch, num_ids * self.time_embed_dim))?;
        let add_embeds = Tensor::cat(&[added.text_embeds.to_dtype(DType::F32)?, time_embeds], 1)?.to_dtype(dtype)?;
        self.embedding.forward(&add_embeds, None, None)
    }
}

/// diffusers' `UNet2DConditionModel`: the text-conditioned latent denoiser of Stable Diffusion 1.x,
/// 2.x and SDXL.
#[derive(Debug, Clone)]
pub struct UNet2DConditionModel {
    config: UNet2DConditionModelConfig,
    conv_in: Conv2d,
    time_proj: TimeProjection,
    time_embedding: TimestepEmbedding,
    class_embedding: Option<Embedding>,
    add_embedding: Option<TextTimeEmbedding>,
    time_embed_act: Option<Activation>,
    down_blocks: Vec<DownBlock>,
    mid_block: Option<MidBlock>,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_act: Activation,
    conv_out: Conv2d,
    /// How many up blocks double the resolution.
    num_upsamplers: usize,
}

impl UNet2DConditionModel {
    /// Loads the weights under `vb` (diffusers' parameter names); errors name a missing tensor or a
    /// wrong shape. Errors on config values it does not support.
    pub fn new(vb: VarBuilder, config: &UNet2DConditionModelConfig) -> Result<Self> {
        config.check_supported()?;
        let block_out_channels = &config.block_out_channels;
        let num_blocks = config.down_block_types.len();
        if config.up_block_types.len() != num_blocks {
            return Err(config_error(
                "up_block_types",
                format!(
                    "must have as many entries as `down_block_types` ({:?} vs {:?})",
                    config.up_block_types, config.down_block_types
                ),
            ));
        }
        if block_out_channels.len() != num_blocks {
            return Err(config_error(
                "block_out_channels",
                format!(
                    "must have as many entries as `down_block_types` ({block_out_channels:?} vs {:?})",
                    config.down_block_types
                ),
            ));
        }
        let Some(&first_channels) = block_out_channels.first() else {
            return Err(config_error("block_out_channels", "must not be empty"));
        };
        let last_channels = block_out_channels[num_blocks - 1];
        let norm_num_groups = config.norm_num_groups.unwrap_or(32);
        let act_fn = Activation::from_name(&config.act_fn).map_err(|e| config_error("act_fn", e))?;
        let time_scale_shift = TimeEmbeddingNorm::from_name(&config.resnet_time_scale_shift)
            .map_err(|e| config_error("resnet_time_scale_shift", e))?;
        let optional_activation = |key: &str, name: &Option<String>| -> Result<Option<Activation>> {
            name.as_deref().map(|name| Activation::from_name(name).map_err(|e| config_error(key, e))).transpose()
        };
        let time_embed_act = optional_activation("time_embedding_act_fn", &config.time_embedding_act_fn)?;
        let timestep_post_act = optional_activation("timestep_post_act", &config.timestep_post_act)?;
        for (key, kernel) in [("conv_in_kernel", config.conv_in_kernel), ("conv_out_kernel", config.conv_out_kernel)] {
            if kernel.is_multiple_of(2) {
                return Err(config_error(key, format!("{kernel} is not odd, so the convolution would change the size")));
            }
        }

        // diffusers' naming: `attention_head_dim` holds the numbers of heads.
        let num_attention_heads = config.attention_head_dim.per_block("attention_head_dim", num_blocks)?;
        let only_cross_attention = config.only_cross_attention.per_block("only_cross_attention", num_blocks)?;
        let layers_per_block = config.layers_per_block.per_block("layers_per_block", num_blocks)?;
        let transformer_layers_per_block =
            config.transformer_layers_per_block.per_block("transformer_layers_per_block", num_blocks)?;

        // input
        let conv_in = Conv2d::new(
            vb.pp("conv_in"),
            config.in_channels,
            first_channels,
            config.conv_in_kernel,
            1,
            (config.conv_in_kernel - 1) / 2,
            true,
        )?;

        // time (`time_embedding_dim or ...`: 0 counts as unset, as in Python)
        let time_embedding_dim = config.time_embedding_dim.filter(|&d| d > 0);
        let (time_proj, time_embed_dim, timestep_input_dim) = match config.time_embedding_type.as_str() {
            "fourier" => {
                let time_embed_dim = time_embedding_dim.unwrap_or(first_channels * 2);
                if !time_embed_dim.is_multiple_of(2) {
                    return Err(config_error(
                        "time_embedding_dim",
                        format!("the time embedding width {time_embed_dim} must be even for `fourier` embeddings"),
                    ));
                }
                let projection =
                    GaussianFourierProjection::new(vb.pp("time_proj"), time_embed_dim / 2, false, config.flip_sin_to_cos)?;
                (TimeProjection::Fourier(projection), time_embed_dim, time_embed_dim)
            }
            "positional" => (
                TimeProjection::Positional(Timesteps::new(first_channels, config.flip_sin_to_cos, config.freq_shift)),
                time_embedding_dim.unwrap_or(first_channels * 4),
                first_channels,
            ),
            other => {
                return Err(config_error(
                    "time_embedding_type",
                    format!("`{other}` is not supported (supported: positional, fourier)"),
                ))
            }
        };
        let time_embedding = TimestepEmbedding::new(
            vb.pp("time_embedding"),
            timestep_input_dim,
            time_embed_dim,
            &TimestepEmbeddingConfig {
                act_fn,
                post_act_fn: timestep_post_act,
                // LCM-distilled UNets: the guidance-scale embedding, added to the timestep's.
                cond_proj_dim: config.time_cond_proj_dim,
                ..TimestepEmbeddingConfig::default()
            },
        )?;
        let class_embedding = match config.num_class_embeds {
            Some(num_class_embeds) => Some(Embedding::new(vb.pp("class_embedding"), num_class_embeds, time_embed_dim)?),
            None => None,
        };
        let add_embedding = match config.addition_embed_type.as_deref() {
            Some("text_time") => {
                let missing = |key: &str| config_error(key, "must be set when addition_embed_type is `text_time`");
                let time_dim = config.addition_time_embed_dim.ok_or_else(|| missing("addition_time_embed_dim"))?;
                let input_dim =
                    config.projection_class_embeddings_input_dim.ok_or_else(|| missing("projection_class_embeddings_input_dim"))?;
                let embedding = TimestepEmbedding::new(
                    vb.pp("add_embedding"),
                    input_dim,
                    time_embed_dim,
                    // diffusers builds it with TimestepEmbedding's own default (SiLU), not `act_fn`.
                    &TimestepEmbeddingConfig::default(),
                )?;
                Some(TextTimeEmbedding {
                    time_proj: Timesteps::new(time_dim, config.flip_sin_to_cos, config.freq_shift),
                    embedding,
                    input_dim,
                    time_embed_dim: time_dim,
                })
            }
            _ => None,
        };

        let cross_args = |i: usize, only_cross_attention: bool| CrossAttnArgs {
            transformer_layers_per_block: transformer_layers_per_block[i],
            num_attention_heads: num_attention_heads[i],
            cross_attention_dim: config.cross_attention_dim,
            use_linear_projection: config.use_linear_projection,
            only_cross_attention,
            upcast_attention: config.upcast_attention,
        };
        let block_args = |num_layers: usize, in_channels: usize, out_channels: usize, prev_output_channel: usize, add_resample: bool| {
            BlockArgs {
                num_layers,
                in_channels,
                out_channels,
                prev_output_channel,
                temb_channels: Some(time_embed_dim),
                add_resample,
                resnet_eps: config.norm_eps,
                resnet_act_fn: act_fn,
                resnet_groups: norm_num_groups,
                attention_head_dim: None,
                downsample_padding: config.downsample_padding,
                resnet_time_scale_shift: time_scale_shift,
                resnet_skip_time_act: config.resnet_skip_time_act,
                resnet_out_scale_factor: config.resnet_out_scale_factor,
                resample_type: ResampleType::Conv,
            }
        };

        // down
        let mut down_blocks = Vec::with_capacity(num_blocks);
        let mut output_channel = first_channels;
        for (i, block_type) in config.down_block_types.iter().enumerate() {
            let input_channel = output_channel;
            output_channel = block_out_channels[i];
            let is_final_block = i == num_blocks - 1;
            let args = block_args(layers_per_block[i], input_channel, output_channel, 0, !is_final_block);
            let vb = vb.pp("down_blocks").pp(i);
            let block = match block_type.strip_prefix("UNetRes").unwrap_or(block_type) {
                "CrossAttnDownBlock2D" => {
                    CrossAttnDownBlock2D::new(vb, &args, &cross_args(i, only_cross_attention[i])).map(DownBlock::CrossAttn)
                }
                "DownBlock2D" => DownBlock2D::new(vb, &args).map(DownBlock::Plain),
                other => Err(Error::invalid(format!(
                    "down block type `{other}` is not supported (supported: {})",
                    SUPPORTED_DOWN_BLOCKS.join(", ")
                ))),
            };
            down_blocks.push(block.map_err(|e| prefix_block_error(e, "down_block_types", i))?);
        }

        // mid
        let mid_args = MidBlockArgs {
            in_channels: last_channels,
            temb_channels: Some(time_embed_dim),
            num_layers: 1,
            resnet_eps: config.norm_eps,
            resnet_time_scale_shift: time_scale_shift,
            resnet_act_fn: act_fn,
            resnet_groups: Some(norm_num_groups),
            attn_groups: None,
            add_attention: false,
            attention_head_dim: None,
            output_scale_factor: config.mid_block_scale_factor,
        };
        let mid_block = match config.mid_block_type.as_deref() {
            None => None,
            Some("UNetMidBlock2DCrossAttn") => {
                let cross = cross_args(num_blocks - 1, false);
                Some(MidBlock::CrossAttn(UNetMidBlock2DCrossAttn::new(vb.pp("mid_block"), &mid_args, &cross)?))
            }
            // `get_mid_block` builds this one with a single resnet and no attention.
            Some("UNetMidBlock2D") => {
                let args = MidBlockArgs { num_layers: 0, ..mid_args };
                Some(MidBlock::Plain(UNetMidBlock2D::new(vb.pp("mid_block"), &args)?))
            }
            Some(other) => {
                return Err(config_error(
                    "mid_block_type",
                    format!("`{other}` is not supported (supported: UNetMidBlock2DCrossAttn, UNetMidBlock2D, null)"),
                ))
            }
        };

        // up: the per-block settings are read in reverse
        let reversed = |i: usize| num_blocks - 1 - i;
        let mut up_blocks = Vec::with_capacity(num_blocks);
        let mut num_upsamplers = 0;
        let mut output_channel = block_out_channels[reversed(0)];
        for (i, block_type) in config.up_block_types.iter().enumerate() {
            let is_final_block = i == num_blocks - 1;
            let prev_output_channel = output_channel;
            output_channel = block_out_channels[reversed(i)];
            let input_channel = block_out_channels[reversed((i + 1).min(num_blocks - 1))];
            if !is_final_block {
                num_upsamplers += 1;
            }
            let args = block_args(
                layers_per_block[reversed(i)] + 1,
                input_channel,
                output_channel,
                prev_output_channel,
                !is_final_block,
            );
            let vb = vb.pp("up_blocks").pp(i);
            let block = match block_type.strip_prefix("UNetRes").unwrap_or(block_type) {
                "CrossAttnUpBlock2D" => {
                    let cross = cross_args(reversed(i), only_cross_attention[reversed(i)]);
                    CrossAttnUpBlock2D::new(vb, &args, &cross).map(UpBlock::CrossAttn)
                }
                "UpBlock2D" => UpBlock2D::new(vb, &args).map(UpBlock::Plain),
                other => Err(Error::invalid(format!(
                    "up block type `{other}` is not supported (supported: {})",
                    SUPPORTED_UP_BLOCKS.join(", ")
                ))),
            };
            up_blocks.push(block.map_err(|e| prefix_block_error(e, "up_block_types", i))?);
        }

        // out
        let conv_norm_out = GroupNorm::new(vb.pp("conv_norm_out"), norm_num_groups, first_channels, config.norm_eps)?;
        let conv_out = Conv2d::new(
            vb.pp("conv_out"),
            first_channels,
            config.out_channels,
            config.conv_out_kernel,
            1,
            (config.conv_out_kernel - 1) / 2,
            true,
        )?;

        Ok(Self {
            config: config.clone(),
            conv_in,
            time_proj,
            time_embedding,
            class_embedding,
            add_embedding,
            time_embed_act,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_act: act_fn,
            conv_out,
            num_upsamplers,
        })
    }

    /// The config the model was built from.
    pub fn config(&self) -> &UNet2DConditionModelConfig {
        &self.config
    }

    /// Predicts from a noisy latent `sample` (`[B, in_channels, H, W]`) at `timesteps` (`[B]`
    /// or one value, f32) conditioned on `encoder_hidden_states` (the text encoder's output,
    /// `[B, T, cross_attention_dim]`) the model output (noise, sample or v) `[B, out_channels,
    /// H, W]`. Any H and W work; sides that are not multiples of 2^(levels-1) are upsampled
    /// back to the sizes of the skip connections, as in diffusers.
    pub fn forward(&self, sample: &Tensor, timesteps: &Tensor, encoder_hidden_states: &Tensor) -> Result<Tensor> {
        self.forward_with_class_labels(sample, timesteps, encoder_hidden_states, None)
    }

    /// [`Self::forward`] for models with a class-embedding table (`num_class_embeds`, e.g. the
    /// noise level of the x4 upscaler): `class_labels` (`[B]` integers) are required by those
    /// models and refused by others.
    pub fn forward_with_class_labels(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        class_labels: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.forward_with_conditions(sample, timesteps, encoder_hidden_states, class_labels, None)
    }

    /// [`Self::forward_with_class_labels`] with diffusers' `timestep_cond` (`[B,
    /// time_cond_proj_dim]`), which LCM-distilled UNets (`time_cond_proj_dim` set) add, through
    /// `time_embedding.cond_proj`, to the timestep's projection: their guidance-scale embedding.
    /// Without it they run unconditioned on guidance, as in diffusers; UNets without
    /// `time_cond_proj_dim` refuse it.
    pub fn forward_with_conditions(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        class_labels: Option<&Tensor>,
        timestep_cond: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.predict(sample, timesteps, encoder_hidden_states, class_labels, timestep_cond, None, None)
    }

    /// The full forward pass: [`Self::forward_with_conditions`] with SDXL's `added_cond_kwargs`
    /// (required by `addition_embed_type = "text_time"` UNets, refused by others).
    pub fn forward_with_added_conditions(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        timestep_cond: Option<&Tensor>,
        added: Option<&AddedConditions>,
    ) -> Result<Tensor> {
        self.predict(sample, timesteps, encoder_hidden_states, None, timestep_cond, added, None)
    }

    /// [`Self::forward`] in training, with SDXL's added conditioning where the UNet takes it,
    /// and peft's `lora_dropout` on the inputs of the LoRA branches that training gave the layers.
    pub fn forward_with_lora_dropout(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        added: Option<&AddedConditions>,
        lora_dropout: Option<&LoraDropout>,
    ) -> Result<Tensor> {
        self.predict(sample, timesteps, encoder_hidden_states, None, None, added, lora_dropout)
    }

    fn predict(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        class_labels: Option<&Tensor>,
        timestep_cond: Option<&Tensor>,
        added: Option<&AddedConditions>,
        lora_dropout: Option<&LoraDropout>,
    ) -> Result<Tensor> {
        let (batch, channels, height, width) = sample.dims4()?;
        if channels != self.config.in_channels {
            bail!("the sample has {channels} channels, but the UNet takes {}", self.config.in_channels);
        }
        let context_dims = encoder_hidden_states.dims();
        if context_dims.len() != 3 || context_dims[0] != batch || context_dims[2] != self.config.cross_attention_dim {
            bail!(
                "encoder_hidden_states should be [{batch}, tokens, {}] (batch, tokens, cross_attention_dim), got {context_dims:?}",
                self.config.cross_attention_dim
            );
        }

        // Sides that are not multiples of the overall upsampling factor need the up blocks to
        // interpolate to the skip connections' sizes instead of doubling.
        let overall_up_factor = 1usize << self.num_upsamplers;
        let forward_upsample_size = !height.is_multiple_of(overall_up_factor) || !width.is_multiple_of(overall_up_factor);

        // 0. center input if necessary
        let sample = if self.config.center_input_sample { sample.affine(2.0, -1.0)? } else { sample.clone() };

        // 1. time
        let timesteps = timesteps.to_dtype(DType::F32)?.flatten_all()?;
        let timesteps = match timesteps.elem_count() {
            n if n == batch => timesteps,
            1 => timesteps.broadcast_as(batch)?.contiguous()?,
            n => bail!("got {n} timesteps for a batch of {batch}"),
        };
        let t_emb = self.time_proj.forward(&timesteps)?.to_dtype(sample.dtype())?;
        let timestep_cond = match (timestep_cond, self.config.time_cond_proj_dim) {
            (None, _) => None,
            (Some(_), None) => bail!("a timestep condition was given, but this UNet has no time_cond_proj_dim"),
            (Some(cond), Some(dim)) => {
                if cond.dims() != [batch, dim] {
                    bail!("timestep_cond should be [{batch}, {dim}] (batch, time_cond_proj_dim), got {:?}", cond.dims());
                }
                Some(cond.to_dtype(sample.dtype())?)
            }
        };
        let mut emb = self.time_embedding.forward(&t_emb, timestep_cond.as_ref(), lora_dropout)?;
        match (&self.class_embedding, class_labels) {
            (Some(class_embedding), Some(class_labels)) => {
                emb = (emb + class_embedding.forward(class_labels)?.to_dtype(sample.dtype())?)?;
            }
            (Some(_), None) => bail!("class_labels should be provided when num_class_embeds > 0"),
            (None, Some(_)) => bail!("class labels were given, but this UNet has no class embedding (num_class_embeds)"),
            (None, None) => {}
        }
        match (&self.add_embedding, added) {
            (Some(add_embedding), Some(added)) => emb = (emb + add_embedding.forward(added, batch, sample.dtype())?)?,
            (Some(_), None) => bail!(
                "this UNet has addition_embed_type `text_time` (SDXL): it needs the pooled text embedding and the time ids"
            ),
            (None, Some(_)) => bail!("added conditions (text_embeds, time_ids) were given, but this UNet has no addition_embed_type"),
            (None, None) => {}
        }
        if let Some(activation) = &self.time_embed_act {
            emb = activation.forward(&emb)?;
        }
        let emb = Some(&emb);
        let context = Some(encoder_hidden_states);

        // 2. pre-process
        let mut sample = self.conv_in.forward_with_lora_dropout(&sample, lora_dropout)?;

        // 3. down
        let mut down_block_res_samples = vec![sample.clone()];
        for down_block in &self.down_blocks {
            let (hidden_states, res_samples) = match down_block {
                DownBlock::CrossAttn(block) => block.forward(&sample, emb, context, lora_dropout)?,
                DownBlock::Plain(block) => block.forward(&sample, emb, lora_dropout)?,
            };
            sample = hidden_states;
            down_block_res_samples.extend(res_samples);
        }

        // 4. mid
        sample = match &self.mid_block {
            Some(MidBlock::CrossAttn(block)) => block.forward(&sample, emb, context, lora_dropout)?,
            Some(MidBlock::Plain(block)) => block.forward(&sample, emb, lora_dropout)?,
            None => sample,
        };

        // 5. up
        let mut upsample_size = None;
        for (i, up_block) in self.up_blocks.iter().enumerate() {
            let is_final_block = i == self.up_blocks.len() - 1;
            let count = up_block.num_resnets();
            if count > down_block_res_samples.len() {
                bail!("up block {i} needs {count} skip connections, {} left", down_block_res_samples.len());
            }
            let res_samples = down_block_res_samples.split_off(down_block_res_samples.len() - count);
            if !is_final_block && forward_upsample_size {
                if let Some(next_skip) = down_block_res_samples.last() {
                    let (_, _, skip_height, skip_width) = next_skip.dims4()?;
                    upsample_size = Some((skip_height, skip_width));
                }
            }
            sample = match up_block {
                UpBlock::CrossAttn(block) => block.forward(&sample, &res_samples, emb, context, upsample_size, lora_dropout)?,
                UpBlock::Plain(block) => block.forward(&sample, &res_samples, emb, upsample_size, lora_dropout)?,
            };
        }

        // 6. post-process
        let sample = self.conv_act.forward(&self.conv_norm_out.forward(&sample)?)?;
        self.conv_out.forward_with_lora_dropout(&sample, lora_dropout)
    }
}
