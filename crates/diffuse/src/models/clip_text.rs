//! CLIP's text transformer as Stable Diffusion uses it: transformers'
//! `CLIPTextModel` (transformers/models/clip/modeling_clip.py). Token and position
//! embeddings, pre-norm encoder layers with causal self-attention and a quick_gelu (SD 1.x)
//! or gelu (SD 2.x, OpenCLIP) MLP, and a final layer norm. Every layer's hidden state is
//! returned so that `clip_skip` can pick an earlier one, as diffusers does. A folder whose
//! weights have `text_projection` is `CLIPTextModelWithProjection` (SDXL's second encoder):
//! its pooled output, projected, is SDXL's `text_embeds`.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::{LayerNorm, Linear, LoraDropout};
use crate::ops;
use crate::{Error, Result};

/// `config.json` of a `text_encoder/` folder (transformers' `CLIPTextConfig`).
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct ClipTextConfig {
    /// Tokens in the vocabulary. Default: `49408`.
    pub vocab_size: usize,
    /// Width of the hidden states (and of the output embeddings). Default: `512`.
    pub hidden_size: usize,
    /// Width of the MLPs' hidden layer. Default: `2048`.
    pub intermediate_size: usize,
    /// Width of the text projection (`CLIPTextModelWithProjection`). Default: `512`.
    pub projection_dim: Option<usize>,
    /// Transformer layers. Default: `12`.
    pub num_hidden_layers: usize,
    /// Attention heads per layer. Default: `8`.
    pub num_attention_heads: usize,
    /// The longest token sequence (77). Default: `77`.
    pub max_position_embeddings: usize,
    /// The MLPs' activation: `quick_gelu` or `gelu`. Default: `quick_gelu`.
    pub hidden_act: String,
    /// The layer norms' epsilon. Default: `1e-5`.
    pub layer_norm_eps: f64,
    /// The padding token's id. Default: `1`.
    pub pad_token_id: Option<i64>,
    /// The start-of-text token's id. Default: `49406`.
    pub bos_token_id: Option<i64>,
    /// The end-of-text token's id (transformers' default 2 means "the highest id"). Default:
    /// `49407`.
    pub eos_token_id: Option<i64>,
}

impl Default for ClipTextConfig {
    fn default() -> Self {
        ClipTextConfig {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            projection_dim: Some(512),
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            pad_token_id: Some(1),
            bos_token_id: Some(49406),
            eos_token_id: Some(49407),
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Activation {
    QuickGelu,
    Gelu,
}

impl Activation {
    fn parse(name: &str) -> Result<Self> {
        match name {
            "quick_gelu" => Ok(Activation::QuickGelu),
            "gelu" => Ok(Activation::Gelu),
            other => Err(Error::invalid(format!("hidden_act `{other}` is not supported (quick_gelu or gelu)"))),
        }
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            // x * sigmoid(1.702 x), OpenAI CLIP's approximation.
            Activation::QuickGelu => ops::quick_gelu(x)?,
            // The exact erf form, as torch's nn.functional.gelu.
            Activation::Gelu => x.gelu_erf()?,
        })
    }
}

struct ClipAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    num_heads: usize,
    head_dim: usize,
}

impl ClipAttention {
    fn new(vb: VarBuilder, config: &ClipTextConfig) -> Result<Self> {
        let d = config.hidden_size;
        Ok(ClipAttention {
            q_proj: Linear::new(vb.pp("q_proj"), d, d, true)?,
            k_proj: Linear::new(vb.pp("k_proj"), d, d, true)?,
            v_proj: Linear::new(vb.pp("v_proj"), d, d, true)?,
            out_proj: Linear::new(vb.pp("out_proj"), d, d, true)?,
            num_heads: config.num_attention_heads,
            head_dim: d / config.num_attention_heads,
        })
    }

    fn forward(&self, x: &Tensor, causal_mask: &Tensor, lora_dropout: Option<&LoraDropout>) -> Result<Tensor> {
        let (batch, tokens, channels) = x.dims3()?;
        let heads = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((batch, tokens, self.num_heads, self.head_dim))?.transpose(1, 2)?.contiguous()?)
        };
        let q = heads(self.q_proj.forward_with_lora_dropout(x, lora_dropout)?)?;
        let k = heads(self.k_proj.forward_with_lora_dropout(x, lora_dropout)?)?;
        let v = heads(self.v_proj.forward_with_lora_dropout(x, lora_dropout)?)?;
        let scale = (self.head_dim as f64).powf(-0.5);
        let out = ops::masked_attention(&q, &k, &v, scale, causal_mask)?;
        let out = out.transpose(1, 2)?.reshape((batch, tokens, channels))?;
        self.out_proj.forward_with_lora_dropout(&out, lora_dropout)
    }
}

struct ClipEncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: ClipAttention,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    activation: Activation,
}

impl ClipEncoderLayer {
    fn new(vb: VarBuilder, config: &ClipTextConfig, activation: Activation) -> Result<Self> {
        let d = config.hidden_size;
        Ok(ClipEncoderLayer {
            layer_norm1: LayerNorm::new(vb.pp("layer_norm1"), d, config.layer_norm_eps)?,
            self_attn: ClipAttention::new(vb.pp("self_attn"), config)?,
            layer_norm2: LayerNorm::new(vb.pp("layer_norm2"), d, config.layer_norm_eps)?,
            fc1: Linear::new(vb.pp("mlp.fc1"), d, config.intermediate_size, true)?,
            fc2: Linear::new(vb.pp("mlp.fc2"), config.intermediate_size, d, true)?,
            activation,
        })
    }

    fn forward(&self, x: &Tensor, causal_mask: &Tensor, lora_dropout: Option<&LoraDropout>) -> Result<Tensor> {
        let h = self.self_attn.forward(&self.layer_norm1.forward(x)?, causal_mask, lora_dropout)?;
        let x = (x + h)?;
        let h = self.fc1.forward_with_lora_dropout(&self.layer_norm2.forward(&x)?, lora_dropout)?;
        let h = self.fc2.forward_with_lora_dropout(&self.activation.forward(&h)?, lora_dropout)?;
        Ok((x + h)?)
    }
}

/// The text encoder. Weights are found with or without the `text_model.` prefix: checkpoints
/// on the hub (and transformers 4.x) have it, transformers 5.x saves without it.
pub struct ClipTextModel {
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<ClipEncoderLayer>,
    final_layer_norm: LayerNorm,
    /// `CLIPTextModelWithProjection`'s `text_projection` (no bias), when the weights have it.
    text_projection: Option<Linear>,
    /// The config the model was built from.
    pub config: ClipTextConfig,
}

/// The encoder's outputs for a batch of token ids.
pub struct ClipTextOutput {
    /// The final layer norm applied to the last layer's output: `[B, T, hidden]`.
    pub last_hidden_state: Tensor,
    /// The embeddings, then each layer's output (before the final norm): `num_hidden_layers + 1`.
    pub hidden_states: Vec<Tensor>,
}

impl ClipTextModel {
    /// Loads the weights under `vb` (diffusers' parameter names); errors name a missing tensor or a
    /// wrong shape. Errors on config values it does not support.
    pub fn new(vb: VarBuilder, config: &ClipTextConfig) -> Result<Self> {
        let activation = Activation::parse(&config.hidden_act)?;
        if config.num_attention_heads == 0 || config.hidden_size % config.num_attention_heads != 0 {
            return Err(Error::invalid(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                config.hidden_size, config.num_attention_heads
            )));
        }
        // CLIPTextModelWithProjection keeps its projection beside `text_model`, at the top.
        let text_projection = match vb.contains_tensor("text_projection.weight") {
            true => {
                let Some(projection_dim) = config.projection_dim else {
                    return Err(Error::invalid("the weights have `text_projection`, but the config has no projection_dim"));
                };
                Some(Linear::new(vb.pp("text_projection"), config.hidden_size, projection_dim, false)?)
            }
            false => None,
        };
        let vb = if vb.contains_tensor("text_model.embeddings.token_embedding.weight") { vb.pp("text_model") } else { vb };
        let embeddings = vb.pp("embeddings");
        let token_embedding = embeddings.get((config.vocab_size, config.hidden_size), "token_embedding.weight")?;
        let position_embedding =
            embeddings.get((config.max_position_embeddings, config.hidden_size), "position_embedding.weight")?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| ClipEncoderLayer::new(vb.pp(format!("encoder.layers.{i}")), config, activation))
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm = LayerNorm::new(vb.pp("final_layer_norm"), config.hidden_size, config.layer_norm_eps)?;
        Ok(ClipTextModel { token_embedding, position_embedding, layers, final_layer_norm, text_projection, config: config.clone() })
    }

    /// The device the weights are on.
    pub fn device(&self) -> &Device {
        self.token_embedding.device()
    }

    /// The type the weights are kept in.
    pub fn dtype(&self) -> DType {
        self.token_embedding.dtype()
    }

    /// Encodes `[B, T]` token ids (u32). No padding mask: Stable Diffusion's text encoders
    /// attend causally over the padded sequence, as diffusers calls them.
    pub fn forward(&self, input_ids: &Tensor) -> Result<ClipTextOutput> {
        self.forward_with_lora_dropout(input_ids, None)
    }

    /// [`Self::forward`] in training, with peft's `lora_dropout` on the inputs of the LoRA
    /// branches that training gave the layers.
    pub fn forward_with_lora_dropout(&self, input_ids: &Tensor, lora_dropout: Option<&LoraDropout>) -> Result<ClipTextOutput> {
        let (batch, tokens) = input_ids.dims2()?;
        if tokens > self.config.max_position_embeddings {
            return Err(Error::invalid(format!(
                "{tokens} tokens is more than the text encoder's max_position_embeddings {}",
                self.config.max_position_embeddings
            )));
        }
        let ids = input_ids.flatten_all()?;
        let max_id = ids.max(0)?.to_dtype(DType::U32)?.to_scalar::<u32>()? as usize;
        if max_id >= self.config.vocab_size {
            return Err(Error::invalid(format!("token id {max_id} is outside the vocabulary ({})", self.config.vocab_size)));
        }
        // Half-precision tables on the CPU give f32 activations (see ops::activation_dtype).
        let activations = ops::activation_dtype(self.token_embedding.dtype(), self.token_embedding.device());
        let token = self.token_embedding.embedding(&ids)?.to_dtype(activations)?.reshape((batch, tokens, self.config.hidden_size))?;
        let position = self.position_embedding.narrow(0, 0, tokens)?.to_dtype(activations)?.unsqueeze(0)?;
        let mut hidden = token.broadcast_add(&position)?;
        let causal_mask = causal_mask(tokens, hidden.dtype(), hidden.device())?;
        let mut hidden_states = Vec::with_capacity(self.layers.len() + 1);
        hidden_states.push(hidden.clone());
        for layer in &self.layers {
            hidden = layer.forward(&hidden, &causal_mask, lora_dropout)?;
            hidden_states.push(hidden.clone());
        }
        let last_hidden_state = self.final_layer_norm.forward(&hidden)?;
        Ok(ClipTextOutput { last_hidden_state, hidden_states })
    }

    /// The prompt embeddings Stable Diffusion conditions on. `clip_skip` as diffusers'
    /// (0 or None: the last layer; 1: the penultimate layer's output through the final
    /// layer norm; ...). A1111's "Clip skip: 2" is diffusers' 1.
    pub fn encode(&self, input_ids: &Tensor, clip_skip: Option<usize>) -> Result<Tensor> {
        // Checked before the forward pass, and without arithmetic on the caller's number.
        let layers = self.layers.len();
        if let Some(skip) = clip_skip.filter(|&skip| skip >= layers.max(1)) {
            return Err(Error::invalid(format!(
                "clip skip {skip} is too large for a text encoder with {layers} layers (at most {})",
                layers.saturating_sub(1)
            )));
        }
        let output = self.forward(input_ids)?;
        match clip_skip {
            None | Some(0) => Ok(output.last_hidden_state),
            // hidden_states holds the embeddings and then one output per layer.
            Some(skip) => self.final_layer_norm.forward(&output.hidden_states[layers - skip]),
        }
    }
}

impl ClipTextModel {
    /// Whether this is a `CLIPTextModelWithProjection` (it has `text_projection`).
    pub fn has_projection(&self) -> bool {
        self.text_projection.is_some()
    }

    /// What SDXL's pipelines take from each text encoder: `hidden_states[-(clip_skip + 2)]`
    /// (the penultimate layer by default; no final layer norm), and, from a
    /// `CLIPTextModelWithProjection`, the pooled output projected (`text_embeds`, `[B,
    /// projection_dim]`): the final-normed state at the first end-of-text token (the largest
    /// id, as transformers finds it), through `text_projection`.
    pub fn encode_penultimate(&self, input_ids: &Tensor, clip_skip: Option<usize>) -> Result<(Tensor, Option<Tensor>)> {
        self.encode_penultimate_inner(input_ids, clip_skip, None)
    }

    /// [`Self::encode_penultimate`] in training (no clip skip), with peft's `lora_dropout` on
    /// the inputs of the LoRA branches that training gave the layers.
    pub fn encode_penultimate_with_lora_dropout(
        &self,
        input_ids: &Tensor,
        lora_dropout: Option<&LoraDropout>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        self.encode_penultimate_inner(input_ids, None, lora_dropout)
    }

    fn encode_penultimate_inner(
        &self,
        input_ids: &Tensor,
        clip_skip: Option<usize>,
        lora_dropout: Option<&LoraDropout>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let layers = self.layers.len();
        let skip = clip_skip.unwrap_or(0);
        if skip >= layers.max(1) {
            return Err(Error::invalid(format!(
                "clip skip {skip} is too large for a text encoder with {layers} layers (at most {})",
                layers.saturating_sub(1)
            )));
        }
        let output = self.forward_with_lora_dropout(input_ids, lora_dropout)?;
        // hidden_states has layers + 1 entries; [-(skip + 2)] is index layers - 1 - skip.
        let hidden = output.hidden_states[layers - 1 - skip].clone();
        let pooled = match &self.text_projection {
            None => None,
            Some(projection) => {
                let (batch, _) = input_ids.dims2()?;
                let eos = input_ids.to_dtype(DType::F32)?.argmax(1)?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
                let rows = (0..batch)
                    .map(|b| output.last_hidden_state.get(b)?.get(eos[b] as usize))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Some(projection.forward(&Tensor::stack(&rows, 0)?)?)
            }
        };
        Ok((hidden, pooled))
    }
}

/// Additive causal mask `[T, T]`: 0 on and below the diagonal, -inf above.
fn causal_mask(tokens: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> =
        (0..tokens).flat_map(|i| (0..tokens).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 })).collect();
    Ok(Tensor::from_vec(mask, (tokens, tokens), device)?.to_dtype(dtype)?)
}
