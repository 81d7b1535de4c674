//! `UNet2DModel`, the unconditional (or class-conditional) pixel-space UNet of DDPM,
//! improved-diffusion and score-SDE checkpoints; port of diffusers/models/unets/unet_2d.py.

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::embeddings::{GaussianFourierProjection, TimestepEmbedding, TimestepEmbeddingConfig, Timesteps};
use super::resnet::TimeEmbeddingNorm;
use super::unet_2d_blocks::{get_down_block, get_up_block, BlockArgs, DownBlock, MidBlockArgs, ResampleType, UNetMidBlock2D, UpBlock};
use super::{Activation, Conv2d, Embedding, GroupNorm};
use crate::{bail, ops, Error, Result};

/// `sample_size`: one side of a square sample, or (height, width).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum SampleSize {
    /// A square of this side.
    Square(usize),
    /// `[height, width]`.
    HeightWidth([usize; 2]),
}

impl SampleSize {
    /// (height, width).
    pub fn height_width(&self) -> (usize, usize) {
        match *self {
            SampleSize::Square(side) => (side, side),
            SampleSize::HeightWidth([height, width]) => (height, width),
        }
    }
}

/// The arguments of `UNet2DModel.__init__`, as `config.json` stores them, with its defaults.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct UNet2DModelConfig {
    /// The size, in pixels, the model was trained at.
    pub sample_size: Option<SampleSize>,
    /// Channels of the input. Default: `3`.
    pub in_channels: usize,
    /// Channels of the output. Default: `3`.
    pub out_channels: usize,
    /// Map the input from [0, 1] to [-1, 1] first. Default: `false`.
    pub center_input_sample: bool,
    /// `positional`, `fourier` or `learned`.
    pub time_embedding_type: String,
    /// Width of the time embedding (default: 4 × `block_out_channels[0]`).
    pub time_embedding_dim: Option<usize>,
    /// The sinusoidal timestep projection's `downscale_freq_shift`. Default: `0.0`.
    pub freq_shift: f64,
    /// Cosines before sines in the timestep projection. Default: `true`.
    pub flip_sin_to_cos: bool,
    /// The down blocks' class names, one per resolution level.
    pub down_block_types: Vec<String>,
    /// The mid block's class name (`None`: no mid block). Default: `UNetMidBlock2D`.
    pub mid_block_type: Option<String>,
    /// The up blocks' class names, one per resolution level.
    pub up_block_types: Vec<String>,
    /// Channels of each resolution level.
    pub block_out_channels: Vec<usize>,
    /// Resnets per down block (up blocks have one more). Default: `2`.
    pub layers_per_block: usize,
    /// The mid block resnets' `output_scale_factor`. Default: `1.0`.
    pub mid_block_scale_factor: f64,
    /// Padding of the downsampling convolutions. Default: `1`.
    pub downsample_padding: usize,
    /// How resolution is halved: `conv` or `resnet`. Default: `conv`.
    pub downsample_type: String,
    /// How resolution is doubled: `conv` or `resnet`. Default: `conv`.
    pub upsample_type: String,
    /// Dropout probability (training only; 0 at inference). Default: `0.0`.
    pub dropout: f64,
    /// The activation (diffusers' `get_activation` name). Default: `silu`.
    pub act_fn: String,
    /// Width of each attention head. Default: `8`.
    pub attention_head_dim: Option<usize>,
    /// Groups of the group norms. Default: `32`.
    pub norm_num_groups: usize,
    /// Groups of the attention group norms (default: `norm_num_groups`).
    pub attn_norm_num_groups: Option<usize>,
    /// The norms' epsilon. Default: `1e-5`.
    pub norm_eps: f64,
    /// How resnets take the time embedding: `default` (added) or `scale_shift`. Default: `default`.
    pub resnet_time_scale_shift: String,
    /// Whether the mid block has attention. Default: `true`.
    pub add_attention: bool,
    /// How class labels are embedded (`None`: a lookup table when `num_class_embeds` is set).
    pub class_embed_type: Option<String>,
    /// Classes of the class-label embedding (class-conditional models).
    pub num_class_embeds: Option<usize>,
    /// For `time_embedding_type` `learned`: the embedding table's size.
    pub num_train_timesteps: Option<usize>,
}

impl Default for UNet2DModelConfig {
    fn default() -> Self {
        let strings = |names: &[&str]| names.iter().map(|n| n.to_string()).collect();
        Self {
            sample_size: None,
            in_channels: 3,
            out_channels: 3,
            center_input_sample: false,
            time_embedding_type: "positional".to_string(),
            time_embedding_dim: None,
            freq_shift: 0.0,
            flip_sin_to_cos: true,
            down_block_types: strings(&["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"]),
            mid_block_type: Some("UNetMidBlock2D".to_string()),
            up_block_types: strings(&["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"]),
            block_out_channels: vec![224, 448, 672, 896],
            layers_per_block: 2,
            mid_block_scale_factor: 1.0,
            downsample_padding: 1,
            downsample_type: "conv".to_string(),
            upsample_type: "conv".to_string(),
            dropout: 0.0,
            act_fn: "silu".to_string(),
            attention_head_dim: Some(8),
            norm_num_groups: 32,
            attn_norm_num_groups: None,
            norm_eps: 1e-5,
            resnet_time_scale_shift: "default".to_string(),
            add_attention: true,
            class_embed_type: None,
            num_class_embeds: None,
            num_train_timesteps: None,
        }
    }
}

/// Maps a configuration problem to an error naming the key.
fn config_error(key: &str, message: impl std::fmt::Display) -> Error {
    Error::invalid(format!("UNet2DModel config: key `{key}`: {message}"))
}

/// How timesteps become vectors (`time_proj`).
#[derive(Debug, Clone)]
enum TimeProjection {
    Positional(Timesteps),
    Fourier(GaussianFourierProjection),
    Learned(Embedding),
}

impl TimeProjection {
    fn forward(&self, timesteps: &Tensor) -> Result<Tensor> {
        match self {
            TimeProjection::Positional(projection) => projection.forward(timesteps),
            TimeProjection::Fourier(projection) => projection.forward(timesteps),
            TimeProjection::Learned(embedding) => embedding.forward(timesteps),
        }
    }
}

/// `class_embedding`: how class labels are turned into an addition to the time embedding.
#[derive(Debug, Clone)]
enum ClassEmbedding {
    /// `nn.Embedding(num_class_embeds, time_embed_dim)` on integer labels.
    Table(Embedding),
    /// Labels projected like timesteps, then through their own `TimestepEmbedding`.
    Timestep(TimestepEmbedding),
    /// Labels that already are embeddings (`[B, time_embed_dim]`).
    Identity,
}

/// diffusers' `UNet2DModel`: the unconditional (or class-conditional) pixel-space denoiser of DDPM.
#[derive(Debug, Clone)]
pub struct UNet2DModel {
    config: UNet2DModelConfig,
    conv_in: Conv2d,
    time_proj: TimeProjection,
    time_embedding: TimestepEmbedding,
    class_embedding: Option<ClassEmbedding>,
    down_blocks: Vec<DownBlock>,
    mid_block: Option<UNetMidBlock2D>,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl UNet2DModel {
    /// Loads the weights under `vb` (diffusers' parameter names); errors name a missing tensor or a
    /// wrong shape. Errors on config values it does not support.
    pub fn new(vb: VarBuilder, config: &UNet2DModelConfig) -> Result<Self> {
        let block_out_channels = &config.block_out_channels;
        if config.down_block_types.len() != config.up_block_types.len() {
            return Err(config_error(
                "up_block_types",
                format!(
                    "must have as many entries as `down_block_types` ({:?} vs {:?})",
                    config.up_block_types, config.down_block_types
                ),
            ));
        }
        if block_out_channels.len() != config.down_block_types.len() {
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
        let last_channels = block_out_channels[block_out_channels.len() - 1];
        let act_fn = Activation::from_name(&config.act_fn).map_err(|e| config_error("act_fn", e))?;
        let time_scale_shift =
            TimeEmbeddingNorm::from_name(&config.resnet_time_scale_shift).map_err(|e| config_error("resnet_time_scale_shift", e))?;
        let downsample_type =
            ResampleType::from_name("downsample_type", &config.downsample_type).map_err(|e| config_error("downsample_type", e))?;
        let upsample_type =
            ResampleType::from_name("upsample_type", &config.upsample_type).map_err(|e| config_error("upsample_type", e))?;
        if let Some(mid_block_type) = &config.mid_block_type {
            if mid_block_type != "UNetMidBlock2D" {
                return Err(config_error(
                    "mid_block_type",
                    format!("`{mid_block_type}` is not supported (supported: UNetMidBlock2D, null)"),
                ));
            }
        }

        // `time_embedding_dim or ...`: 0 counts as unset, as in Python.
        let time_embed_dim = config.time_embedding_dim.filter(|&d| d > 0).unwrap_or(first_channels * 4);

        let conv_in = Conv2d::new(vb.pp("conv_in"), config.in_channels, first_channels, 3, 1, 1, true)?;

        let (time_proj, timestep_input_dim) = match config.time_embedding_type.as_str() {
            "fourier" => (
                TimeProjection::Fourier(GaussianFourierProjection::new(vb.pp("time_proj"), first_channels, true, false)?),
                2 * first_channels,
            ),
            "positional" => (
                TimeProjection::Positional(Timesteps::new(first_channels, config.flip_sin_to_cos, config.freq_shift)),
                first_channels,
            ),
            "learned" => {
                let Some(num_train_timesteps) = config.num_train_timesteps else {
                    return Err(config_error("num_train_timesteps", "must be set when time_embedding_type is `learned`"));
                };
                (TimeProjection::Learned(Embedding::new(vb.pp("time_proj"), num_train_timesteps, first_channels)?), first_channels)
            }
            other => {
                return Err(config_error(
                    "time_embedding_type",
                    format!("`{other}` is not supported (supported: positional, fourier, learned)"),
                ))
            }
        };
        let time_embedding = TimestepEmbedding::new(
            vb.pp("time_embedding"),
            timestep_input_dim,
            time_embed_dim,
            &TimestepEmbeddingConfig::default(),
        )?;

        let class_embedding = match (config.class_embed_type.as_deref(), config.num_class_embeds) {
            (None, Some(num_class_embeds)) => {
                Some(ClassEmbedding::Table(Embedding::new(vb.pp("class_embedding"), num_class_embeds, time_embed_dim)?))
            }
            (None, None) => None,
            (Some("timestep"), _) => Some(ClassEmbedding::Timestep(TimestepEmbedding::new(
                vb.pp("class_embedding"),
                timestep_input_dim,
                time_embed_dim,
                &TimestepEmbeddingConfig::default(),
            )?)),
            (Some("identity"), _) => Some(ClassEmbedding::Identity),
            (Some(other), _) => {
                return Err(config_error(
                    "class_embed_type",
                    format!("`{other}` is not supported by UNet2DModel (supported: null, timestep, identity)"),
                ))
            }
        };

        let block_args = |i: usize, in_channels: usize, out_channels: usize, prev_output_channel: usize, num_layers: usize| {
            let is_final_block = i == block_out_channels.len() - 1;
            BlockArgs {
                num_layers,
                in_channels,
                out_channels,
                prev_output_channel,
                temb_channels: Some(time_embed_dim),
                add_resample: !is_final_block,
                resnet_eps: config.norm_eps,
                resnet_act_fn: act_fn,
                resnet_groups: config.norm_num_groups,
                attention_head_dim: Some(config.attention_head_dim.unwrap_or(out_channels)),
                downsample_padding: config.downsample_padding,
                resnet_time_scale_shift: time_scale_shift,
                resnet_skip_time_act: false,
                resnet_out_scale_factor: 1.0,
                resample_type: downsample_type,
            }
        };

        let mut down_blocks = Vec::with_capacity(block_out_channels.len());
        let mut output_channel = first_channels;
        for (i, block_type) in config.down_block_types.iter().enumerate() {
            let input_channel = output_channel;
            output_channel = block_out_channels[i];
            let args = block_args(i, input_channel, output_channel, 0, config.layers_per_block);
            let block = get_down_block(vb.pp("down_blocks").pp(i), block_type, &args)
                .map_err(|e| prefix_block_error(e, "down_block_types", i))?;
            down_blocks.push(block);
        }

        let mid_block = match config.mid_block_type {
            None => None,
            Some(_) => Some(UNetMidBlock2D::new(
                vb.pp("mid_block"),
                &MidBlockArgs {
                    in_channels: last_channels,
                    temb_channels: Some(time_embed_dim),
                    num_layers: 1,
                    resnet_eps: config.norm_eps,
                    resnet_time_scale_shift: time_scale_shift,
                    resnet_act_fn: act_fn,
                    resnet_groups: Some(config.norm_num_groups),
                    attn_groups: config.attn_norm_num_groups,
                    add_attention: config.add_attention,
                    attention_head_dim: Some(config.attention_head_dim.unwrap_or(last_channels)),
                    output_scale_factor: config.mid_block_scale_factor,
                },
            )?),
        };

        let reversed: Vec<usize> = block_out_channels.iter().rev().copied().collect();
        let mut up_blocks = Vec::with_capacity(reversed.len());
        let mut output_channel = reversed[0];
        for (i, block_type) in config.up_block_types.iter().enumerate() {
            let prev_output_channel = output_channel;
            output_channel = reversed[i];
            let input_channel = reversed[(i + 1).min(reversed.len() - 1)];
            let args = BlockArgs {
                resample_type: upsample_type,
                ..block_args(i, input_channel, output_channel, prev_output_channel, config.layers_per_block + 1)
            };
            let block = get_up_block(vb.pp("up_blocks").pp(i), block_type, &args)
                .map_err(|e| prefix_block_error(e, "up_block_types", i))?;
            up_blocks.push(block);
        }

        let conv_norm_out = GroupNorm::new(vb.pp("conv_norm_out"), config.norm_num_groups, first_channels, config.norm_eps)?;
        let conv_out = Conv2d::new(vb.pp("conv_out"), first_channels, config.out_channels, 3, 1, 1, true)?;

        Ok(Self {
            config: config.clone(),
            conv_in,
            time_proj,
            time_embedding,
            class_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_out,
        })
    }

    /// The config the model was built from.
    pub fn config(&self) -> &UNet2DModelConfig {
        &self.config
    }

    /// Predicts from a noisy `sample` (`[B, C, H, W]`) at `timesteps` (`[B]` or one value,
    /// f32; for `fourier` models these are noise levels sigma) the model output (noise,
    /// sample or v, and for learned-variance models also the variance channels).
    /// `class_labels` (`[B]` integers) are required by class-conditional models and refused
    /// by others.
    pub fn forward(&self, sample: &Tensor, timesteps: &Tensor, class_labels: Option<&Tensor>) -> Result<Tensor> {
        let batch = sample.dim(0)?;
        let mut sample = sample.clone();
        if self.config.center_input_sample {
            sample = sample.affine(2.0, -1.0)?;
        }

        // 1. time
        let timesteps = timesteps.to_dtype(DType::F32)?.flatten_all()?;
        let timesteps = match timesteps.elem_count() {
            n if n == batch => timesteps,
            1 => timesteps.broadcast_as(batch)?.contiguous()?,
            n => bail!("got {n} timesteps for a batch of {batch}"),
        };
        let t_emb = self.time_proj.forward(&timesteps)?.to_dtype(sample.dtype())?;
        let mut emb = self.time_embedding.forward(&t_emb, None, None)?;

        match (&self.class_embedding, class_labels) {
            (Some(class_embedding), Some(class_labels)) => {
                let class_emb = match class_embedding {
                    ClassEmbedding::Table(table) => table.forward(class_labels)?,
                    ClassEmbedding::Timestep(embedding) => {
                        let projected = self.time_proj.forward(&class_labels.to_dtype(DType::F32)?)?;
                        embedding.forward(&projected.to_dtype(emb.dtype())?, None, None)?
                    }
                    ClassEmbedding::Identity => class_labels.clone(),
                };
                emb = emb.broadcast_add(&class_emb.to_dtype(emb.dtype())?)?;
            }
            (Some(_), None) => bail!("class_labels should be provided when doing class conditioning"),
            (None, Some(_)) => bail!("class_embedding needs to be initialized in order to use class conditioning"),
            (None, None) => {}
        }

        // 2. pre-process
        let mut skip_sample = Some(sample.clone());
        let mut sample = self.conv_in.forward(&sample)?;

        // 3. down
        let mut down_block_res_samples = vec![sample.clone()];
        for down_block in &self.down_blocks {
            let (hidden_states, res_samples, skip) = down_block.forward(&sample, Some(&emb), skip_sample)?;
            sample = hidden_states;
            skip_sample = skip;
            down_block_res_samples.extend(res_samples);
        }

        // 4. mid
        if let Some(mid_block) = &self.mid_block {
            sample = mid_block.forward(&sample, Some(&emb), None)?;
        }

        // 5. up
        let mut skip_sample = None;
        for up_block in &self.up_blocks {
            let count = up_block.num_resnets();
            if count > down_block_res_samples.len() {
                bail!("up block needs {count} skip connections, {} left", down_block_res_samples.len());
            }
            let res_samples = down_block_res_samples.split_off(down_block_res_samples.len() - count);
            let (hidden_states, skip) = up_block.forward(&sample, &res_samples, Some(&emb), skip_sample)?;
            sample = hidden_states;
            skip_sample = skip;
        }

        // 6. post-process
        let mut sample = self.conv_out.forward(&ops::silu(&self.conv_norm_out.forward(&sample)?)?)?;
        if let Some(skip) = skip_sample {
            sample = (sample + skip)?;
        }
        if self.config.time_embedding_type == "fourier" {
            // Score models predict the score times sigma; dividing by sigma gives the score.
            sample = sample.broadcast_div(&timesteps.reshape((batch, 1, 1, 1))?.to_dtype(sample.dtype())?)?;
        }
        Ok(sample)
    }
}

/// Names the config entry of a block that failed to build.
fn prefix_block_error(error: Error, key: &str, index: usize) -> Error {
    match error {
        Error::InvalidInput(message) => Error::invalid(format!("UNet2DModel config: key `{key}[{index}]`: {message}")),
        other => other,
    }
}
