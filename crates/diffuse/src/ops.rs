//! The hot operations of every model, in one place: the models call only these for
//! convolution, linear layers, group and layer normalisation, attention and SiLU, so that faster CPU
//! kernels can replace the bodies here later without touching any model.
//!
//! Each matches the PyTorch function of the same name (NCHW layout, weights as PyTorch
//! stores them).

use candle_core::{DType, Tensor, D};

use crate::Result;

/// `torch.nn.functional.conv2d`: `input` is `[N, C_in, H, W]`, `weight` is
/// `[C_out, C_in / groups, kH, kW]`, `bias` is `[C_out]`; symmetric zero `padding`.
pub fn conv2d(input: &Tensor, weight: &Tensor, bias: Option<&Tensor>, stride: usize, padding: usize) -> Result<Tensor> {
    let output = input.conv2d(weight, padding, stride, 1, 1)?;
    Ok(match bias {
        Some(bias) => output.broadcast_add(&bias.reshape((1, bias.elem_count(), 1, 1))?)?,
        None => output,
    })
}

/// `torch.nn.functional.linear`: `input` is `[..., in]`, `weight` is `[out, in]`, `bias` is `[out]`.
pub fn linear(input: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let dims = input.dims();
    let in_features = *dims.last().ok_or_else(|| crate::Error::invalid("linear: input has rank 0"))?;
    let out_features = weight.dim(0)?;
    let rows = input.elem_count() / in_features.max(1);
    let flat = input.reshape((rows, in_features))?;
    let mut output = flat.matmul(&weight.t()?)?;
    if let Some(bias) = bias {
        output = output.broadcast_add(bias)?;
    }
    let mut out_dims = dims.to_vec();
    if let Some(last) = out_dims.last_mut() {
        *last = out_features;
    }
    Ok(output.reshape(out_dims)?)
}

/// `torch.nn.functional.group_norm` with affine `weight` and `bias` (`[C]`): `input` is
/// `[N, C, *]`, normalised over each of `num_groups` channel groups and all spatial positions.
/// Statistics are taken in f32 (mean first, then the mean squared deviation), as PyTorch does
/// for half-precision inputs.
pub fn group_norm(input: &Tensor, num_groups: usize, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let dims = input.dims().to_vec();
    if dims.len() < 2 {
        crate::bail!("group_norm: input of shape {dims:?} has no channel dimension");
    }
    let (batch, channels) = (dims[0], dims[1]);
    if num_groups == 0 || !channels.is_multiple_of(num_groups) {
        crate::bail!("group_norm: {num_groups} groups do not divide {channels} channels");
    }
    let dtype = input.dtype();
    let x = input.to_dtype(DType::F32)?.reshape((batch, num_groups, ()))?;
    let group_size = x.dim(2)? as f64;
    let mean = (x.sum_keepdim(2)? / group_size)?;
    let centered = x.broadcast_sub(&mean)?;
    let variance = (centered.sqr()?.sum_keepdim(2)? / group_size)?;
    let normalized = centered.broadcast_div(&(variance + eps)?.sqrt()?)?;
    let mut affine_shape = vec![1usize; dims.len()];
    affine_shape[1] = channels;
    let weight = weight.to_dtype(DType::F32)?.reshape(affine_shape.clone())?;
    let bias = bias.to_dtype(DType::F32)?.reshape(affine_shape)?;
    let output = normalized.reshape(dims)?.broadcast_mul(&weight)?.broadcast_add(&bias)?;
    Ok(output.to_dtype(dtype)?)
}

/// `torch.nn.functional.scaled_dot_product_attention` without mask or dropout: `query` is
/// `[B, heads, L, D]`, `key`/`value` are `[B, heads, S, D]`; `scale` defaults to `1/sqrt(D)`.
/// Scores and softmax are computed in f32 whatever the input type.
pub fn scaled_dot_product_attention(query: &Tensor, key: &Tensor, value: &Tensor, scale: Option<f64>) -> Result<Tensor> {
    let head_dim = query.dim(D::Minus1)?;
    let scale = scale.unwrap_or(1.0 / (head_dim as f64).sqrt());
    let dtype = query.dtype();
    let query = query.to_dtype(DType::F32)?.contiguous()?;
    let key = key.to_dtype(DType::F32)?.contiguous()?;
    let value = value.to_dtype(DType::F32)?.contiguous()?;
    let scores = (query.matmul(&key.t()?)? * scale)?;
    let probabilities = candle_nn::ops::softmax_last_dim(&scores)?;
    Ok(probabilities.matmul(&value)?.to_dtype(dtype)?)
}

/// `torch.nn.functional.silu`: `x * sigmoid(x)`.
pub fn silu(input: &Tensor) -> Result<Tensor> {
    Ok(input.silu()?)
}

/// `torch.nn.functional.layer_norm` over the last dimension with affine `weight` and `bias`;
/// statistics in f32 (mean, then the mean squared deviation), as PyTorch does.
pub fn layer_norm(input: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = input.dtype();
    let x = input.to_dtype(DType::F32)?;
    let size = x.dim(D::Minus1)? as f64;
    let mean = (x.sum_keepdim(D::Minus1)? / size)?;
    let centered = x.broadcast_sub(&mean)?;
    let variance = (centered.sqr()?.sum_keepdim(D::Minus1)? / size)?;
    let normalized = centered.broadcast_div(&(variance + eps)?.sqrt()?)?;
    let output = normalized.broadcast_mul(&weight.to_dtype(DType::F32)?)?.broadcast_add(&bias.to_dtype(DType::F32)?)?;
    Ok(output.to_dtype(dtype)?)
}

/// Attention with an additive mask (`[L, S]` or broadcastable to the scores): softmax in f32.
/// `query` is `[B, heads, L, D]`, `key`/`value` `[B, heads, S, D]`.
pub fn masked_attention(query: &Tensor, key: &Tensor, value: &Tensor, scale: f64, mask: &Tensor) -> Result<Tensor> {
    let dtype = query.dtype();
    let query = query.to_dtype(DType::F32)?.contiguous()?;
    let key = key.to_dtype(DType::F32)?.contiguous()?;
    let value = value.to_dtype(DType::F32)?.contiguous()?;
    let scores = (query.matmul(&key.t()?)? * scale)?.broadcast_add(&mask.to_dtype(DType::F32)?)?;
    let probabilities = candle_nn::ops::softmax_last_dim(&scores)?;
    Ok(probabilities.matmul(&value)?.to_dtype(dtype)?)
}
