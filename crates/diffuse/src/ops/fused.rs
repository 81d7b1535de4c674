//! Fused, threaded CPU passes with their own backward passes: SiLU, GEGLU, LayerNorm and the
//! softmax of attention. Each replaces a chain of candle operations (each a pass over memory
//! into a fresh allocation, most of them on one thread) by one pass forward and one backward,
//! which is most of what a training step spends outside convolutions and matrix products.
//! Inference takes the same forward passes without recording them.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

use super::gemm_bf16::{gemm_in, gemm_in_fresh};
use super::{contiguous_f32, gemm, vector, Precision};

/// Elements per task of the element-wise passes: enough to amortise a task, few enough that
/// any layer's activations split over all threads.
const CHUNK: usize = 1 << 14;

/// Rows per task for rows of `width` elements: about [`CHUNK`] elements, at least one row.
fn rows_per_task(width: usize) -> usize {
    (CHUNK / width.max(1)).max(1)
}

/// Runs `f` on the contiguous f32 data of CPU tensors (a backward pass's operands).
pub(super) fn with_slices<R>(tensors: &[&Tensor], what: &str, f: impl FnOnce(&[&[f32]]) -> candle_core::Result<R>) -> candle_core::Result<R> {
    let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(guards.len());
    for (storage, layout) in &guards {
        match &**storage {
            Storage::Cpu(storage) => slices.push(contiguous_f32(storage, layout, what)?),
            _ => candle_core::bail!("{what}: expected CPU tensors"),
        }
    }
    f(&slices)
}

/// `x · sigmoid(x)`, vectorised over all threads.
pub(super) struct Silu;

impl CustomOp1 for Silu {
    fn name(&self) -> &'static str {
        "silu-fused"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let mut output = contiguous_f32(storage, layout, "silu input")?.to_vec();
        let isa = gemm::isa();
        output.par_chunks_mut(CHUNK).for_each(|chunk| vector::silu_in_place(isa, chunk));
        Ok((CpuStorage::F32(output), layout.shape().clone()))
    }

    fn bwd(&self, input: &Tensor, _output: &Tensor, grad_output: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let _timer = super::profile::timer("silu backward");
        Ok(Some(input.apply_op2_no_bwd(&grad_output.contiguous()?, &SiluBackward)?))
    }
}

/// CLIP's `quick_gelu` for inference, vectorised over all threads (no backward: training
/// takes tensor operations).
pub(super) struct QuickGelu;

impl CustomOp1 for QuickGelu {
    fn name(&self) -> &'static str {
        "quick-gelu-fused"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let mut output = contiguous_f32(storage, layout, "quick_gelu input")?.to_vec();
        let isa = gemm::isa();
        output.par_chunks_mut(CHUNK).for_each(|chunk| vector::quick_gelu_in_place(isa, chunk));
        Ok((CpuStorage::F32(output), layout.shape().clone()))
    }
}

/// [`Silu`]'s input gradient from its input and its output's gradient.
struct SiluBackward;

impl CustomOp2 for SiluBackward {
    fn name(&self) -> &'static str {
        "silu-backward"
    }

    fn cpu_fwd(&self, x: &CpuStorage, x_layout: &Layout, g: &CpuStorage, g_layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, g) = (contiguous_f32(x, x_layout, "silu input")?, contiguous_f32(g, g_layout, "silu gradient")?);
        if x.len() != g.len() {
            candle_core::bail!("silu backward: {} inputs, {} gradients", x.len(), g.len());
        }
        let mut output = vec![0f32; x.len()];
        let isa = gemm::isa();
        output.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).zip(g.par_chunks(CHUNK)).for_each(|((out, x), g)| {
            vector::silu_backward(isa, x, g, out);
        });
        Ok((CpuStorage::F32(output), x_layout.shape().clone()))
    }
}

/// Nearest-neighbour upsampling of `[N, C, H, W]` by whole factors (`F.interpolate(mode=
/// "nearest")` to `[N, C, H·scale_h, W·scale_w]`), the planes over all threads; its backward
/// pass sums each block of the gradient. (candle's backward pass is a grouped convolution,
/// one small product per channel.)
pub(super) struct UpsampleNearest {
    pub scale_h: usize,
    pub scale_w: usize,
}

impl CustomOp1 for UpsampleNearest {
    fn name(&self) -> &'static str {
        "upsample-nearest"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let input = contiguous_f32(storage, layout, "upsample input")?;
        let (n, c, h, w) = layout.shape().dims4()?;
        let (out_h, out_w) = (h * self.scale_h, w * self.scale_w);
        let mut output = vec![0f32; n * c * out_h * out_w];
        if h * w > 0 && self.scale_h * self.scale_w > 0 {
            output.par_chunks_mut(out_h * out_w).zip(input.par_chunks(h * w)).for_each(|(out, plane)| {
                for (row, out_rows) in plane.chunks_exact(w).zip(out.chunks_exact_mut(self.scale_h * out_w)) {
                    let (first, rest) = out_rows.split_at_mut(out_w);
                    for (out, &v) in first.chunks_exact_mut(self.scale_w).zip(row) {
                        out.fill(v);
                    }
                    for copy in rest.chunks_exact_mut(out_w) {
                        copy.copy_from_slice(first);
                    }
                }
            });
        }
        Ok((CpuStorage::F32(output), Shape::from((n, c, out_h, out_w))))
    }

    fn bwd(&self, input: &Tensor, _output: &Tensor, grad_output: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (n, c, h, w) = input.dims4()?;
        let out_w = w * self.scale_w;
        let grad_output = grad_output.contiguous()?;
        let grad = with_slices(&[&grad_output], "upsample backward", |s| {
            let mut grad = vec![0f32; n * c * h * w];
            if h * w > 0 && self.scale_h * self.scale_w > 0 {
                // Each input value's gradient: its block's rows in order, each row's values in order.
                grad.par_chunks_mut(h * w).zip(s[0].par_chunks(h * w * self.scale_h * self.scale_w)).for_each(|(grad, plane)| {
                    for (row, block) in grad.chunks_exact_mut(w).zip(plane.chunks_exact(self.scale_h * out_w)) {
                        for block_row in block.chunks_exact(out_w) {
                            for (g, values) in row.iter_mut().zip(block_row.chunks_exact(self.scale_w)) {
                                *g += values.iter().sum::<f32>();
                            }
                        }
                    }
                });
            }
            Ok(grad)
        })?;
        Ok(Some(Tensor::from_vec(grad, (n, c, h, w), input.device())?))
    }
}

/// diffusers' `GEGLU` after its projection: `[..., 2·D]` → `[..., D]`, `value · gelu(gate)`.
pub(super) struct Geglu;

/// The output width of GEGLU on `dims`: half the last dimension, which must be even.
fn geglu_width(dims: &[usize]) -> candle_core::Result<usize> {
    match dims.last() {
        Some(&last) if last % 2 == 0 => Ok(last / 2),
        _ => candle_core::bail!("geglu: the last dimension of {dims:?} is not even"),
    }
}

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "geglu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let projected = contiguous_f32(storage, layout, "geglu input")?;
        let width = geglu_width(layout.dims())?;
        let mut dims = layout.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = width;
        }
        let mut output = vec![0f32; projected.len() / 2];
        if width > 0 {
            let isa = gemm::isa();
            let rows = rows_per_task(width);
            output.par_chunks_mut(rows * width).zip(projected.par_chunks(rows * 2 * width)).for_each(|(out, input)| {
                for (out, input) in out.chunks_exact_mut(width).zip(input.chunks_exact(2 * width)) {
                    vector::geglu_rows(isa, input, out);
                }
            });
        }
        Ok((CpuStorage::F32(output), Shape::from(dims)))
    }

    fn bwd(&self, input: &Tensor, _output: &Tensor, grad_output: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let _timer = super::profile::timer("geglu backward");
        Ok(Some(input.apply_op2_no_bwd(&grad_output.contiguous()?, &GegluBackward)?))
    }
}

/// [`Geglu`]'s input gradient (`[..., 2·D]`) from its input and its output's gradient.
struct GegluBackward;

impl CustomOp2 for GegluBackward {
    fn name(&self) -> &'static str {
        "geglu-backward"
    }

    fn cpu_fwd(&self, p: &CpuStorage, p_layout: &Layout, g: &CpuStorage, g_layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (projected, g) = (contiguous_f32(p, p_layout, "geglu input")?, contiguous_f32(g, g_layout, "geglu gradient")?);
        let width = geglu_width(p_layout.dims())?;
        if g.len() * 2 != projected.len() {
            candle_core::bail!("geglu backward: {} inputs, {} gradients", projected.len(), g.len());
        }
        let mut output = vec![0f32; projected.len()];
        if width > 0 {
            let isa = gemm::isa();
            let rows = rows_per_task(width);
            output.par_chunks_mut(rows * 2 * width).zip(projected.par_chunks(rows * 2 * width)).zip(g.par_chunks(rows * width)).for_each(
                |((out, projected), g)| {
                    for ((out, projected), g) in out.chunks_exact_mut(2 * width).zip(projected.chunks_exact(2 * width)).zip(g.chunks_exact(width)) {
                        vector::geglu_backward_rows(isa, projected, g, out);
                    }
                },
            );
        }
        Ok((CpuStorage::F32(output), p_layout.shape().clone()))
    }
}

/// `torch.nn.functional.layer_norm` over the last dimension with affine weight and bias, on
/// contiguous f32 operands; each row's mean and variance in f64 (the mean first, then the
/// mean squared deviation).
pub(super) struct LayerNorm {
    /// Added to the variance.
    pub eps: f64,
}

impl LayerNorm {
    /// A row's mean and 1/sqrt(variance + eps).
    fn statistics(&self, row: &[f32]) -> (f64, f64) {
        mean_and_inverse_std(row, self.eps)
    }
}

/// The mean of `values` and 1/sqrt(variance + eps), in f64: the mean first, then the mean
/// squared deviation (as PyTorch's norms compute them).
pub(super) fn mean_and_inverse_std(values: &[f32], eps: f64) -> (f64, f64) {
    vector::mean_and_inverse_std(gemm::isa(), values, eps)
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "layer-norm"
    }

    fn cpu_fwd(
        &self,
        input: &CpuStorage,
        input_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
        bias: &CpuStorage,
        bias_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let input = contiguous_f32(input, input_layout, "layer-norm input")?;
        let weight = contiguous_f32(weight, weight_layout, "layer-norm weight")?;
        let bias = contiguous_f32(bias, bias_layout, "layer-norm bias")?;
        let width = input_layout.dims().last().copied().unwrap_or(0);
        if weight.len() != width || bias.len() != width {
            candle_core::bail!("layer-norm: weight {} and bias {} do not match rows of {width}", weight.len(), bias.len());
        }
        let mut output = vec![0f32; input.len()];
        if width > 0 {
            let rows = rows_per_task(width);
            output.par_chunks_mut(rows * width).zip(input.par_chunks(rows * width)).for_each(|(out, input)| {
                for (out, row) in out.chunks_exact_mut(width).zip(input.chunks_exact(width)) {
                    let (mean, inverse_std) = self.statistics(row);
                    let (mean, inverse_std) = (mean as f32, inverse_std as f32);
                    for (((out, &x), &w), &b) in out.iter_mut().zip(row).zip(weight).zip(bias) {
                        *out = (x - mean) * inverse_std * w + b;
                    }
                }
            });
        }
        Ok((CpuStorage::F32(output), input_layout.shape().clone()))
    }

    /// With x̂ = (x - mean) · inverse_std per row and g the output's gradient:
    /// ∂bias = Σ g, ∂weight = Σ g·x̂ (over the rows), and with h = g·weight,
    /// ∂x = inverse_std · (h - mean(h) - x̂ · mean(h·x̂)), the means over the row.
    fn bwd(
        &self,
        input: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _output: &Tensor,
        grad_output: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _timer = super::profile::timer("layer_norm backward");
        let grad_output = grad_output.contiguous()?;
        let width = input.dims().last().copied().unwrap_or(0);
        let (grad_input, grad_weight, grad_bias) = with_slices(&[input, weight, &grad_output], "layer-norm backward", |s| {
            let (x, weight, g) = (s[0], s[1], s[2]);
            let mut grad_input = vec![0f32; x.len()];
            if width == 0 {
                return Ok((grad_input, vec![0f64; 0], vec![0f64; 0]));
            }
            let rows = rows_per_task(width);
            // Each task sums ∂weight and ∂bias over its rows; the tasks' sums are then added.
            let (grad_weight, grad_bias) = grad_input
                .par_chunks_mut(rows * width)
                .zip(x.par_chunks(rows * width))
                .zip(g.par_chunks(rows * width))
                .map(|((grad_x, x), g)| {
                    let (mut grad_weight, mut grad_bias) = (vec![0f64; width], vec![0f64; width]);
                    let mut x_hat = vec![0f32; width];
                    for ((grad_x, x), g) in grad_x.chunks_exact_mut(width).zip(x.chunks_exact(width)).zip(g.chunks_exact(width)) {
                        let (mean, inverse_std) = self.statistics(x);
                        let (mut sum_h, mut sum_h_xhat) = (0f64, 0f64);
                        for (j, (&x, &g)) in x.iter().zip(g).enumerate() {
                            let xh = ((x as f64 - mean) * inverse_std) as f32;
                            x_hat[j] = xh;
                            let h = (g * weight[j]) as f64;
                            sum_h += h;
                            sum_h_xhat += h * xh as f64;
                            grad_weight[j] += (g * xh) as f64;
                            grad_bias[j] += g as f64;
                        }
                        let (mean_h, mean_h_xhat) = ((sum_h / width as f64) as f32, (sum_h_xhat / width as f64) as f32);
                        let inverse_std = inverse_std as f32;
                        for (((out, &g), &w), &xh) in grad_x.iter_mut().zip(g).zip(weight).zip(&x_hat) {
                            *out = inverse_std * (g * w - mean_h - xh * mean_h_xhat);
                        }
                    }
                    (grad_weight, grad_bias)
                })
                .collect::<Vec<_>>()
                .into_iter()
                // In task order, so that the sums do not depend on the threads' timing.
                .fold((vec![0f64; width], vec![0f64; width]), |(mut wa, mut ba), (wb, bb)| {
                    wa.iter_mut().zip(wb).for_each(|(a, b)| *a += b);
                    ba.iter_mut().zip(bb).for_each(|(a, b)| *a += b);
                    (wa, ba)
                });
            Ok((grad_input, grad_weight, grad_bias))
        })?;
        let device = input.device();
        let to_f32 = |v: Vec<f64>| v.into_iter().map(|v| v as f32).collect::<Vec<f32>>();
        Ok((
            Some(Tensor::from_vec(grad_input, input.shape(), device)?),
            Some(Tensor::from_vec(to_f32(grad_weight), width, device)?),
            Some(Tensor::from_vec(to_f32(grad_bias), width, device)?),
        ))
    }
}

/// The softmax's input gradient over the last dimension, `y · (g - Σ g·y)` per row, from its
/// output `y` and the output's gradient `g`.
pub(super) struct SoftmaxBackward;

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "softmax-backward"
    }

    fn cpu_fwd(&self, y: &CpuStorage, y_layout: &Layout, g: &CpuStorage, g_layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (y, g) = (contiguous_f32(y, y_layout, "softmax output")?, contiguous_f32(g, g_layout, "softmax gradient")?);
        if y.len() != g.len() {
            candle_core::bail!("softmax backward: {} outputs, {} gradients", y.len(), g.len());
        }
        let width = y_layout.dims().last().copied().unwrap_or(0);
        let mut output = vec![0f32; y.len()];
        if width > 0 {
            let rows = rows_per_task(width);
            output.par_chunks_mut(rows * width).zip(y.par_chunks(rows * width)).zip(g.par_chunks(rows * width)).for_each(|((out, y), g)| {
                for ((out, y), g) in out.chunks_exact_mut(width).zip(y.chunks_exact(width)).zip(g.chunks_exact(width)) {
                    softmax_backward_row(y, g, out, 1.0);
                }
            });
        }
        Ok((CpuStorage::F32(output), y_layout.shape().clone()))
    }
}

/// Softmax over the last dimension of contiguous f32 rows, in place, threaded over rows.
pub(super) fn softmax_rows_in_place(values: &mut [f32], width: usize) {
    if width == 0 {
        return;
    }
    values.par_chunks_mut(rows_per_task(width) * width).for_each(|rows| {
        rows.chunks_exact_mut(width).for_each(|row| softmax_row(row, 1.0));
    });
}

/// `softmax(scale · row)` in place: subtract the maximum, exponentiate, divide by the sum.
fn softmax_row(row: &mut [f32], scale: f32) {
    vector::softmax_row(gemm::isa(), row, scale)
}

/// The softmax's backward pass for one row: `out = scale · y · (g - Σ g·y)` from its output
/// `y` and the output's gradient `g` (`scale` carries a scaling applied before the softmax).
fn softmax_backward_row(y: &[f32], g: &[f32], out: &mut [f32], scale: f32) {
    vector::softmax_backward_row(gemm::isa(), y, g, out, scale)
}

/// A linear layer for training on the GEMM kernels: `input[rows, in] · weight[out, in]ᵀ`
/// (+ `bias[out]` as the third operand), the products in `precision`. Its backward pass
/// computes `∂input = G·weight`, `∂weight = Gᵀ·input` and `∂bias = Σ_rows G` on the same
/// kernels, each only for an operand that needs it (a LoRA's frozen base weight gets none).
pub(super) struct Linear {
    /// f32 products, or bf16 mixed precision (f32 sums and gradients).
    pub precision: Precision,
}

impl Linear {
    /// `input · weightᵀ (+ bias)` on contiguous f32 operands (also inference's f32 product).
    pub(super) fn forward(&self, input: &CpuStorage, input_layout: &Layout, weight: &CpuStorage, weight_layout: &Layout, bias: Option<&[f32]>) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, in_features) = input_layout.shape().dims2()?;
        let (out_features, weight_in) = weight_layout.shape().dims2()?;
        if weight_in != in_features || bias.is_some_and(|b| b.len() != out_features) {
            candle_core::bail!("linear: input {:?}, weight {:?} and bias do not match", input_layout.dims(), weight_layout.dims());
        }
        let (x, w) = (contiguous_f32(input, input_layout, "linear input")?, contiguous_f32(weight, weight_layout, "linear weight")?);
        let (Some(x), Some(w)) = (gemm::MatRef::row_major(x, rows, in_features), gemm::MatRef::row_major(w, out_features, in_features)) else {
            candle_core::bail!("linear: an operand's size does not match its shape");
        };
        let init = bias.map_or(gemm::Init::Overwrite, gemm::Init::ColumnBias);
        // SAFETY: a product that does not accumulate writes all of its `C`, here the whole
        // `rows × out_features` output.
        let output = unsafe { gemm::fresh_output(rows * out_features, |out| gemm_in_fresh(self.precision, out, out_features, x, &w.t(), init, true)) };
        Ok((CpuStorage::F32(output), Shape::from((rows, out_features))))
    }

    fn backward(&self, input: &Tensor, weight: &Tensor, grad_output: &Tensor, with_bias: bool) -> candle_core::Result<[Option<Tensor>; 3]> {
        let grad_output = grad_output.contiguous()?;
        let (rows, in_features) = input.dims2()?;
        let out_features = weight.dim(0)?;
        let products = usize::from(input.track_op()) + usize::from(weight.track_op());
        super::profile::count_flops("linear backward", 2.0 * (products * rows * in_features * out_features) as f64);
        let (grad_input, grad_weight, grad_bias) = with_slices(&[input, weight, &grad_output], "linear backward", |s| {
            let matrix = |data, rows, cols| gemm::MatRef::row_major(data, rows, cols).ok_or_else(|| candle_core::Error::Msg("linear backward: operand sizes".into()));
            let (x, w, g) = (matrix(s[0], rows, in_features)?, matrix(s[1], out_features, in_features)?, matrix(s[2], rows, out_features)?);
            // SAFETY (both): a product that does not accumulate writes all of its `C`, here the
            // whole gradient.
            let grad_input = input.track_op().then(|| unsafe { gemm::fresh_output(rows * in_features, |grad| gemm_in_fresh(self.precision, grad, in_features, g, &w, gemm::Init::Overwrite, true)) });
            let grad_weight = weight.track_op().then(|| unsafe { gemm::fresh_output(out_features * in_features, |grad| gemm_in_fresh(self.precision, grad, in_features, g.t(), &x, gemm::Init::Overwrite, true)) });
            let grad_bias = with_bias.then(|| column_sums(s[2], out_features));
            Ok((grad_input, grad_weight, grad_bias))
        })?;
        let device = input.device();
        Ok([
            grad_input.map(|g| Tensor::from_vec(g, (rows, in_features), device)).transpose()?,
            grad_weight.map(|g| Tensor::from_vec(g, (out_features, in_features), device)).transpose()?,
            grad_bias.map(|g| Tensor::from_vec(g, out_features, device)).transpose()?,
        ])
    }
}

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "linear-trainable"
    }

    fn cpu_fwd(&self, input: &CpuStorage, input_layout: &Layout, weight: &CpuStorage, weight_layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.forward(input, input_layout, weight, weight_layout, None)
    }

    fn bwd(&self, input: &Tensor, weight: &Tensor, _output: &Tensor, grad_output: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let _timer = super::profile::timer("linear backward");
        let [grad_input, grad_weight, _] = self.backward(input, weight, grad_output, false)?;
        Ok((grad_input, grad_weight))
    }
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "linear-trainable"
    }

    fn cpu_fwd(
        &self,
        input: &CpuStorage,
        input_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
        bias: &CpuStorage,
        bias_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.forward(input, input_layout, weight, weight_layout, Some(contiguous_f32(bias, bias_layout, "linear bias")?))
    }

    fn bwd(
        &self,
        input: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _output: &Tensor,
        grad_output: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _timer = super::profile::timer("linear backward");
        let [grad_input, grad_weight, grad_bias] = self.backward(input, weight, grad_output, bias.track_op())?;
        Ok((grad_input, grad_weight, grad_bias))
    }
}

/// The sums of each column of a row-major matrix `width` wide, in f64, threaded over row
/// blocks whose sums are added in block order (the same result whatever the threads).
fn column_sums(values: &[f32], width: usize) -> Vec<f32> {
    if width == 0 {
        return Vec::new();
    }
    let partial: Vec<Vec<f64>> = values
        .par_chunks(rows_per_task(width) * width)
        .map(|rows| {
            let mut sums = vec![0f64; width];
            for row in rows.chunks_exact(width) {
                sums.iter_mut().zip(row).for_each(|(s, &v)| *s += v as f64);
            }
            sums
        })
        .collect();
    let mut sums = vec![0f64; width];
    for part in partial {
        sums.iter_mut().zip(part).for_each(|(s, p)| *s += p);
    }
    sums.into_iter().map(|s| s as f32).collect()
}

/// A frozen linear layer with its LoRA branch, for training:
/// `y = x·Wᵀ + b + scale · (x·Aᵀ)·Bᵀ` in one op over `x` (`[rows, in]`), `A` (`[r, in]`) and
/// `B` (`[out, r]`), with W and b held here (frozen: no gradient). The backward pass computes
/// `∂x = G·W + ∂H·A`, `∂A = ∂Hᵀ·x` and `∂B = scale · Gᵀ·H` with `H = x·Aᵀ` and
/// `∂H = scale · G·B`, so that the branch costs no activation-sized temporaries but `H`.
pub(super) struct LoraLinear {
    /// The frozen weight, `[out, in]`, contiguous f32.
    pub weight: Tensor,
    /// The frozen bias, `[out]`, contiguous f32.
    pub bias: Option<Tensor>,
    /// alpha / r.
    pub scale: f32,
    /// f32 products, or bf16 mixed precision (f32 sums and gradients).
    pub precision: Precision,
}

impl LoraLinear {
    /// (rows, in, r, out) of the operands, checked against the frozen weight.
    fn dims(&self, x: &[usize], a: &[usize], b: &[usize]) -> candle_core::Result<(usize, usize, usize, usize)> {
        let (out, weight_in) = self.weight.dims2()?;
        match (x, a, b) {
            ([rows, n], [r, an], [bo, br]) if n == an && an == &weight_in && r == br && bo == &out => Ok((*rows, *n, *r, out)),
            _ => candle_core::bail!("lora linear: input {x:?}, A {a:?} and B {b:?} do not fit the weight {:?}", self.weight.dims()),
        }
    }
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(&self, x: &CpuStorage, x_layout: &Layout, a: &CpuStorage, a_layout: &Layout, b: &CpuStorage, b_layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, inputs, rank, outputs) = self.dims(x_layout.dims(), a_layout.dims(), b_layout.dims())?;
        let (x, a, b) = (contiguous_f32(x, x_layout, "lora input")?, contiguous_f32(a, a_layout, "lora A")?, contiguous_f32(b, b_layout, "lora B")?);
        let frozen: Vec<&Tensor> = std::iter::once(&self.weight).chain(&self.bias).collect();
        let mut output = vec![0f32; rows * outputs];
        with_slices(&frozen, "lora linear weight", |s| {
            let (x, w) = (view(x, rows, inputs), view(s[0], outputs, inputs));
            let init = s.get(1).map_or(gemm::Init::Overwrite, |bias| gemm::Init::ColumnBias(bias));
            gemm_in(self.precision, &mut output, outputs, x, &w.t(), init, true);
            // Hᵀ = A·xᵀ (rank rows by as many columns as x has rows: a product that fills the
            // tiles, where H = x·Aᵀ would be `rank` columns wide), scaled, then y += H·Bᵀ.
            let mut h_t = vec![0f32; rank * rows];
            gemm_in(self.precision, &mut h_t, rows, view(a, rank, inputs), &x.t(), gemm::Init::Overwrite, true);
            h_t.iter_mut().for_each(|v| *v *= self.scale);
            gemm_in(self.precision, &mut output, outputs, view(&h_t, rank, rows).t(), &view(b, outputs, rank).t(), gemm::Init::Accumulate, true);
            Ok(())
        })?;
        Ok((CpuStorage::F32(output), Shape::from((rows, outputs))))
    }

    fn bwd(&self, x: &Tensor, a: &Tensor, b: &Tensor, _output: &Tensor, grad_output: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _timer = super::profile::timer("linear + lora backward");
        let grad_output = grad_output.contiguous()?;
        let (rows, inputs, rank, outputs) = self.dims(x.dims(), a.dims(), b.dims())?;
        let input_needs_grad = x.track_op();
        let (grad_x, grad_a, grad_b) = with_slices(&[x, a, b, &grad_output, &self.weight], "lora linear backward", |s| {
            let (x, a, b, g, w) = (view(s[0], rows, inputs), view(s[1], rank, inputs), view(s[2], outputs, rank), view(s[3], rows, outputs), view(s[4], outputs, inputs));
            let product = |c: &mut [f32], ldc, left, right: &gemm::MatRef, init| gemm_in(self.precision, c, ldc, left, right, init, true);
            // The rank-sized products transposed (`rank` rows, not `rank` columns; see the
            // forward pass): Hᵀ = A·xᵀ, ∂Hᵀ = scale · Bᵀ·Gᵀ.
            let mut h_t = vec![0f32; rank * rows];
            product(&mut h_t, rows, a, &x.t(), gemm::Init::Overwrite);
            let mut grad_h_t = vec![0f32; rank * rows];
            product(&mut grad_h_t, rows, b.t(), &g.t(), gemm::Init::Overwrite);
            grad_h_t.iter_mut().for_each(|v| *v *= self.scale);
            let grad_h_t = view(&grad_h_t, rank, rows);
            // ∂B = scale · Gᵀ·H, as its transpose Hᵀ·G.
            let grad_b = {
                let mut grad_t = vec![0f32; rank * outputs];
                product(&mut grad_t, outputs, view(&h_t, rank, rows), &g, gemm::Init::Overwrite);
                (0..outputs * rank).map(|i| self.scale * grad_t[i % rank * outputs + i / rank]).collect::<Vec<f32>>()
            };
            let mut grad_a = vec![0f32; rank * inputs];
            product(&mut grad_a, inputs, grad_h_t, &x, gemm::Init::Overwrite);
            // The input's gradient is the big product: only when the input needs one.
            let grad_x = input_needs_grad.then(|| {
                let mut grad_x = vec![0f32; rows * inputs];
                product(&mut grad_x, inputs, g, &w, gemm::Init::Overwrite);
                product(&mut grad_x, inputs, grad_h_t.t(), &a, gemm::Init::Accumulate);
                grad_x
            });
            Ok((grad_x, grad_a, grad_b))
        })?;
        let tensor = |values, like: &Tensor| Tensor::from_vec(values, like.shape(), like.device());
        Ok((
            grad_x.map(|grad| tensor(grad, x)).transpose()?,
            a.track_op().then(|| tensor(grad_a, a)).transpose()?,
            b.track_op().then(|| tensor(grad_b, b)).transpose()?,
        ))
    }
}

/// A convolution's bias and a bias per image and channel for training (a ResNet block's
/// time embedding, added to its first convolution's output): `output[n, c, ...] + bias[c] +
/// image_bias[n, c]`, in that order, in one pass; the backward pass sums each plane of the
/// gradient once for both biases' gradients.
pub(super) struct ChannelAndImageBias;

impl CustomOp3 for ChannelAndImageBias {
    fn name(&self) -> &'static str {
        "channel-and-image-bias"
    }

    fn cpu_fwd(&self, x: &CpuStorage, x_layout: &Layout, bias: &CpuStorage, bias_layout: &Layout, image_bias: &CpuStorage, image_bias_layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(x, x_layout, "convolution output")?;
        let bias = contiguous_f32(bias, bias_layout, "convolution bias")?;
        let image_bias = contiguous_f32(image_bias, image_bias_layout, "per-image bias")?;
        let dims = x_layout.dims();
        if dims.len() < 2 || dims[1] != bias.len() || image_bias_layout.dims() != &dims[..2] {
            candle_core::bail!("channel bias: {} and {:?} values for a tensor of shape {dims:?}", bias.len(), image_bias_layout.dims());
        }
        let channels = bias.len();
        Ok((CpuStorage::F32(add_to_planes(x, dims, |index| (bias[index % channels], image_bias[index]))), x_layout.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, bias: &Tensor, image_bias: &Tensor, _output: &Tensor, grad_output: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _timer = super::profile::timer("conv bias backward");
        let planes = if bias.track_op() || image_bias.track_op() { plane_sums(grad_output, x.dims())? } else { Vec::new() };
        let grad_bias = bias.track_op().then(|| Tensor::from_vec(channel_sums(&planes, bias.elem_count()), bias.elem_count(), bias.device())).transpose()?;
        let grad_image_bias = image_bias
            .track_op()
            .then(|| Tensor::from_vec(planes.iter().map(|&s| s as f32).collect::<Vec<f32>>(), image_bias.shape(), image_bias.device()))
            .transpose()?;
        Ok((x.track_op().then(|| grad_output.clone()), grad_bias, grad_image_bias))
    }
}

/// `x` (`dims`: `[N, C, ...]`) with each (image, channel) plane's biases added, `(x + b) + b2`
/// with `(b, b2) = biases(n·C + c)`: each plane read once and written once, in parallel.
fn add_to_planes(x: &[f32], dims: &[usize], biases: impl Fn(usize) -> (f32, f32) + Sync) -> Vec<f32> {
    let plane: usize = dims.get(2..).map_or(1, |d| d.iter().product());
    let mut output = vec![0f32; x.len()];
    if plane > 0 {
        output.par_chunks_mut(plane).zip(x.par_chunks(plane)).enumerate().for_each(|(index, (out, plane))| {
            let (b, b2) = biases(index);
            out.iter_mut().zip(plane).for_each(|(o, &v)| *o = v + b + b2);
        });
    }
    output
}

/// The sum of each (image, channel) plane of `grad` (shaped `dims`: `[N, C, ...]`), in f64,
/// the planes in parallel.
fn plane_sums(grad: &Tensor, dims: &[usize]) -> candle_core::Result<Vec<f64>> {
    let grad = grad.contiguous()?;
    let plane: usize = dims.get(2..).map_or(1, |d| d.iter().product());
    with_slices(&[&grad], "channel bias backward", |s| {
        let isa = gemm::isa();
        Ok(if plane == 0 { vec![0f64; dims.iter().take(2).product()] } else { s[0].par_chunks(plane).map(|p| vector::sum_f64(isa, p)).collect() })
    })
}

/// The gradient of a bias added to every position of each channel of a `[N, C, ...]`
/// output, from the output's gradient: its sum per channel (per plane in f64, then over the
/// images in order).
pub(super) fn channel_bias_gradient(grad_output: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
    let planes = plane_sums(grad_output, grad_output.dims())?;
    Tensor::from_vec(channel_sums(&planes, bias.elem_count()), bias.elem_count(), bias.device())
}

/// Each channel's sum over the images of per-plane sums (`[N, C]`), in image order, as f32.
fn channel_sums(planes: &[f64], channels: usize) -> Vec<f32> {
    let mut sums = vec![0f64; channels];
    for (index, value) in planes.iter().enumerate() {
        sums[index % channels] += value;
    }
    sums.into_iter().map(|s| s as f32).collect()
}

/// Attention for training, `softmax(Q·Kᵀ·scale)·V` without a mask: Q `[B, H, L, D]`, K and V
/// `[B, H, S, D]` in any layout whose last dimension is contiguous (the heads split off a
/// `[B, L, H·D]` projection by a transpose are read where they lie, not copied), f32, on the
/// GEMM kernels, one batch element per task. The output is `[B, L, H, D]` in memory (the
/// caller sees its `[B, H, L, D]` transpose), which is what merging the heads back reads.
/// The backward pass recomputes each head's probabilities P (as FlashAttention's does, so that
/// nothing of size L×S is kept between the passes), then `∂V = Pᵀ·G`, `∂P = G·Vᵀ`,
/// `∂S = P ∘ (∂P − rowsum(∂P ∘ P))·scale`, `∂Q = ∂S·K`, `∂K = ∂Sᵀ·Q`.
pub(super) struct Attention {
    /// The scores' scale, usually `1/sqrt(D)`.
    pub scale: f32,
    /// f32 products, or bf16 mixed precision (the softmax is f32 either way).
    pub precision: Precision,
}

/// The shapes of one attention call: (B, H, L, S, D).
fn attention_dims(q: &[usize], k: &[usize], v: &[usize]) -> candle_core::Result<(usize, usize, usize, usize, usize)> {
    match (q, k, v) {
        ([b, h, l, d], [kb, kh, s, kd], [vb, vh, vs, vd]) if (b, h, d) == (kb, kh, kd) && (b, h, s, d) == (vb, vh, vs, vd) => Ok((*b, *h, *l, *s, *d)),
        _ => candle_core::bail!("attention: query {q:?}, key {k:?} and value {v:?} do not fit"),
    }
}

/// A `[B, H, rows, D]` operand as its storage and strides, for per-(batch, head) views.
#[derive(Clone, Copy)]
struct Heads<'a> {
    data: &'a [f32],
    start: usize,
    stride: [usize; 4],
    rows: usize,
    depth: usize,
}

impl<'a> Heads<'a> {
    fn new(storage: &'a CpuStorage, layout: &Layout, what: &str) -> candle_core::Result<Self> {
        let (CpuStorage::F32(data), [_, _, rows, depth], &[s0, s1, s2, s3]) = (storage, layout.dims(), layout.stride()) else {
            candle_core::bail!("attention: the {what} is not a rank-4 f32 tensor");
        };
        if s3 != 1 && *depth > 1 {
            candle_core::bail!("attention: the {what}'s last dimension is not contiguous");
        }
        Ok(Self { data, start: layout.start_offset(), stride: [s0, s1, s2, 1], rows: *rows, depth: *depth })
    }

    /// The `rows × D` matrix of batch element `b`, head `h` (bounds checked by `MatRef::new`).
    fn at(&self, b: usize, h: usize) -> candle_core::Result<gemm::MatRef<'a>> {
        let offset = self.start + b * self.stride[0] + h * self.stride[1];
        self.data
            .get(offset..)
            .and_then(|data| gemm::MatRef::new(data, self.rows, self.depth, self.stride[2], 1))
            .ok_or_else(|| candle_core::Error::Msg("attention: an operand's layout does not match its storage".into()))
    }
}

impl Attention {
    /// One head's probabilities `softmax(q·kᵀ·scale)` into `p` (`L×S`).
    fn probabilities(&self, q: gemm::MatRef, k: gemm::MatRef, p: &mut [f32], parallel: bool) {
        let keys = k.rows();
        gemm_in(self.precision, p, keys, q, &k.t(), gemm::Init::Overwrite, parallel);
        p.chunks_exact_mut(keys.max(1)).for_each(|row| softmax_row(row, self.scale));
    }
}

/// A row-major `rows × cols` view of `data` (callers size it).
fn view(data: &[f32], rows: usize, cols: usize) -> gemm::MatRef<'_> {
    gemm::MatRef::row_major(data, rows, cols).unwrap_or_else(|| unreachable!("attention: {rows}×{cols} view of {} values", data.len()))
}

/// Runs `f` for each batch element in parallel, the first error kept.
fn for_each_batch<T: Send>(items: Vec<T>, f: impl Fn(usize, T) -> candle_core::Result<()> + Sync) -> candle_core::Result<()> {
    let errors: Vec<candle_core::Error> = items.into_par_iter().enumerate().filter_map(|(b, item)| f(b, item).err()).collect();
    errors.into_iter().next().map_or(Ok(()), Err)
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "attention-trainable"
    }

    fn cpu_fwd(&self, q: &CpuStorage, q_layout: &Layout, k: &CpuStorage, k_layout: &Layout, v: &CpuStorage, v_layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (batch, heads, rows, keys, depth) = attention_dims(q_layout.dims(), k_layout.dims(), v_layout.dims())?;
        let (q, k, v) = (Heads::new(q, q_layout, "query")?, Heads::new(k, k_layout, "key")?, Heads::new(v, v_layout, "value")?);
        let width = heads * depth;
        let mut output = vec![0f32; batch * rows * width];
        // Fewer batch elements than threads (batch-1 fine-tuning): the products share the rest.
        let parallel = batch < rayon::current_num_threads();
        if rows * width > 0 {
            for_each_batch(output.chunks_mut(rows * width).collect(), |b, out: &mut [f32]| {
                let mut p = vec![0f32; rows * keys];
                for h in 0..heads {
                    self.probabilities(q.at(b, h)?, k.at(b, h)?, &mut p, parallel);
                    // Head h's rows of the [L, H·D] block: every H·D values from h·D.
                    gemm_in(self.precision, &mut out[h * depth..], width, view(&p, rows, keys), &v.at(b, h)?, gemm::Init::Overwrite, parallel);
                }
                Ok(())
            })?;
        }
        Ok((CpuStorage::F32(output), Shape::from((batch, rows, heads, depth))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _output: &Tensor,
        grad_output: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _timer = super::profile::timer("attention backward");
        let (batch, heads, rows, keys, depth) = attention_dims(q.dims(), k.dims(), v.dims())?;
        // Five products of L × S × D per batch element and head (the probabilities recomputed).
        super::profile::count_flops("attention backward", 10.0 * (batch * heads * rows * keys * depth) as f64);
        let width = heads * depth;
        // The output's gradient, [B, L, H, D] as the output is laid out.
        let grad_output = grad_output.contiguous()?;
        let (mut grad_q, mut grad_k, mut grad_v) = (vec![0f32; batch * rows * width], vec![0f32; batch * keys * width], vec![0f32; batch * keys * width]);
        let parallel = batch < rayon::current_num_threads();
        if rows * width > 0 && keys * width > 0 {
            let guards = [q, k, v].map(|t| t.storage_and_layout());
            let cpu = |i: usize| match &*guards[i].0 {
                candle_core::Storage::Cpu(storage) => Ok(storage),
                _ => Err(candle_core::Error::Msg("attention backward: expected CPU tensors".into())),
            };
            let (q, k, v) = (Heads::new(cpu(0)?, guards[0].1, "query")?, Heads::new(cpu(1)?, guards[1].1, "key")?, Heads::new(cpu(2)?, guards[2].1, "value")?);
            with_slices(&[&grad_output], "attention backward", |s| {
                let g_all = s[0];
                let chunks = grad_q.chunks_mut(rows * width).zip(grad_k.chunks_mut(keys * width)).zip(grad_v.chunks_mut(keys * width)).collect();
                for_each_batch(chunks, |b, ((grad_q, grad_k), grad_v): ((&mut [f32], &mut [f32]), &mut [f32])| {
                    let g_block = &g_all[b * rows * width..][..rows * width];
                    let (mut p, mut grad_p, mut grad_scores) = (vec![0f32; rows * keys], vec![0f32; rows * keys], vec![0f32; rows * keys]);
                    for h in 0..heads {
                        let (qh, kh, vh) = (q.at(b, h)?, k.at(b, h)?, v.at(b, h)?);
                        let g = gemm::MatRef::new(&g_block[h * depth..], rows, depth, width, 1)
                            .ok_or_else(|| candle_core::Error::Msg("attention backward: gradient size".into()))?;
                        self.probabilities(qh, kh, &mut p, parallel);
                        let (into, ldc) = (h * depth, width);
                        gemm_in(self.precision, &mut grad_v[into..], ldc, view(&p, rows, keys).t(), &g, gemm::Init::Overwrite, parallel);
                        gemm_in(self.precision, &mut grad_p, keys, g, &vh.t(), gemm::Init::Overwrite, parallel);
                        for ((out, p_row), grad_row) in grad_scores.chunks_exact_mut(keys).zip(p.chunks_exact(keys)).zip(grad_p.chunks_exact(keys)) {
                            softmax_backward_row(p_row, grad_row, out, self.scale);
                        }
                        let scores = view(&grad_scores, rows, keys);
                        gemm_in(self.precision, &mut grad_q[into..], ldc, scores, &kh, gemm::Init::Overwrite, parallel);
                        gemm_in(self.precision, &mut grad_k[into..], ldc, scores.t(), &qh, gemm::Init::Overwrite, parallel);
                    }
                    Ok(())
                })
            })?;
        }
        // Laid out [B, rows, H, D]; handed back as the [B, H, rows, D] the operands have.
        let tensor = |values, rows, like: &Tensor| Tensor::from_vec(values, (batch, rows, heads, depth), like.device())?.transpose(1, 2);
        Ok((
            q.track_op().then(|| tensor(grad_q, rows, q)).transpose()?,
            k.track_op().then(|| tensor(grad_k, keys, k)).transpose()?,
            v.track_op().then(|| tensor(grad_v, keys, v)).transpose()?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var, D};

    use super::*;

    fn max_difference(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap() as f32
    }

    /// Each fused pass and its backward pass against candle's operations, in f64, on odd
    /// shapes (rows shorter and longer than a task, a single row, one element).
    #[test]
    fn fused_passes_and_their_gradients_match_candle() -> candle_core::Result<()> {
        let device = Device::Cpu;
        for dims in [vec![3usize, 5, 6], vec![1, 1, 2], vec![2, 9000], vec![4100, 4]] {
            let x = Tensor::randn(0f64, 1.5, dims.as_slice(), &device)?;
            let weight = Tensor::randn(0f64, 1.0, *dims.last().unwrap(), &device)?;
            let bias = Tensor::randn(0f64, 1.0, *dims.last().unwrap(), &device)?;
            let probe = Tensor::randn(0f64, 1.0, dims.as_slice(), &device)?;
            let half = {
                let mut d = dims.clone();
                *d.last_mut().unwrap() /= 2;
                Tensor::randn(0f64, 1.0, d, &device)?
            };
            // Σ probe·f(x): its gradient is f's backward pass applied to `probe`.
            let check = |name: &str, f_fused: &dyn Fn(&Tensor, &Tensor, &Tensor) -> candle_core::Result<Tensor>,
                         f_reference: &dyn Fn(&Tensor, &Tensor, &Tensor) -> candle_core::Result<Tensor>,
                         probe: &Tensor|
             -> candle_core::Result<()> {
                let run = |f: &dyn Fn(&Tensor, &Tensor, &Tensor) -> candle_core::Result<Tensor>, dtype: DType| {
                    let vars = [&x, &weight, &bias].map(|t| Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap());
                    let out = f(vars[0].as_tensor(), vars[1].as_tensor(), vars[2].as_tensor())?;
                    let grads = (out.to_dtype(DType::F64)? * probe)?.sum_all()?.backward()?;
                    let grad = |v: &Var| grads.get(v.as_tensor()).map(|g| g.to_dtype(DType::F64).unwrap());
                    Ok::<_, candle_core::Error>((out.to_dtype(DType::F64)?, vars.iter().map(grad).collect::<Vec<_>>()))
                };
                let (out, grads) = run(f_fused, DType::F32)?;
                let (want, want_grads) = run(f_reference, DType::F64)?;
                let scale = want.abs()?.max_all()?.to_scalar::<f64>()?.max(1.0) as f32;
                assert!(max_difference(&out, &want) < 1e-5 * scale, "{name} {dims:?}: output");
                for (i, (got, want)) in grads.iter().zip(&want_grads).enumerate() {
                    match (got, want) {
                        (Some(got), Some(want)) => {
                            let scale = want.abs()?.max_all()?.to_scalar::<f64>()?.max(1.0) as f32;
                            let difference = max_difference(got, want);
                            assert!(difference < 2e-5 * scale, "{name} {dims:?}: gradient {i} differs by {difference}");
                        }
                        (None, None) => {}
                        _ => panic!("{name} {dims:?}: gradient {i} present on one side only"),
                    }
                }
                Ok(())
            };
            check("silu", &|x, _, _| x.apply_op1(Silu), &|x, _, _| x.silu(), &probe)?;
            check("geglu", &|x, _, _| x.apply_op1(Geglu), &|x, _, _| {
                let chunks = x.chunk(2, D::Minus1)?;
                &chunks[0] * chunks[1].gelu_erf()?
            }, &half)?;
            check("layer_norm", &|x, w, b| x.apply_op3(w, b, LayerNorm { eps: 1e-5 }), &|x, w, b| {
                let size = x.dim(D::Minus1)? as f64;
                let mean = (x.sum_keepdim(D::Minus1)? / size)?;
                let centered = x.broadcast_sub(&mean)?;
                let variance = (centered.sqr()?.sum_keepdim(D::Minus1)? / size)?;
                centered.broadcast_div(&(variance + 1e-5)?.sqrt()?)?.broadcast_mul(w)?.broadcast_add(b)
            }, &probe)?;
            let rows = x.elem_count() / dims.last().unwrap();
            let flat = |t: &Tensor| t.reshape((rows, *dims.last().unwrap())).unwrap();
            let features = Tensor::randn(0f64, 1.0, (7, *dims.last().unwrap()), &device)?;
            let out_probe = Tensor::randn(0f64, 1.0, (rows, 7), &device)?;
            // The weight and bias of the linear layer: `weight` and `bias` above cut to 7 outputs.
            let linear_weight = |w: &Tensor, d: DType| features.to_dtype(d).unwrap().broadcast_mul(&w.unsqueeze(0).unwrap()).unwrap();
            check("linear", &|x, w, b| flat(x).apply_op3(&linear_weight(w, DType::F32), &b.narrow(0, 0, 7.min(b.elem_count()))?.pad_with_zeros(0, 0, 7usize.saturating_sub(b.elem_count()))?, Linear { precision: Precision::F32 }), &|x, w, b| {
                flat(x).matmul(&linear_weight(w, DType::F64).t()?)?.broadcast_add(&b.narrow(0, 0, 7.min(b.elem_count()))?.pad_with_zeros(0, 0, 7usize.saturating_sub(b.elem_count()))?)
            }, &out_probe)?;
            check("linear without bias", &|x, w, _| flat(x).apply_op2(&linear_weight(w, DType::F32), Linear { precision: Precision::F32 }), &|x, w, _| {
                flat(x).matmul(&linear_weight(w, DType::F64).t()?)
            }, &out_probe)?;
            check("softmax", &|x, _, _| super::super::softmax_last_dim_trainable(x), &|x, _, _| {
                let exp = x.broadcast_sub(&x.max_keepdim(D::Minus1)?)?.exp()?;
                exp.broadcast_div(&exp.sum_keepdim(D::Minus1)?)
            }, &probe)?;
        }
        Ok(())
    }

    /// A convolution's bias and a bias per image and channel (a time embedding), and a linear
    /// layer whose weight is frozen (a LoRA's base): no gradient for it, the input's as candle
    /// computes it.
    #[test]
    fn channel_biases_and_a_frozen_linear_weight() -> candle_core::Result<()> {
        let device = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 5, 4, 3), &device)?)?;
        let bias = Var::from_tensor(&Tensor::randn(0f32, 1.0, 5, &device)?)?;
        let probe = Tensor::randn(0f32, 1.0, (3, 5, 4, 3), &device)?;
        let grads = |out: Tensor| (out * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        // The same values as two broadcast adds, and the gradients of all three operands.
        let image_bias = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 5), &device)?)?;
        let output = x.as_tensor().apply_op3(bias.as_tensor(), image_bias.as_tensor(), ChannelAndImageBias)?;
        let expected = x.as_tensor().broadcast_add(&bias.as_tensor().reshape((1, 5, 1, 1))?)?.broadcast_add(&image_bias.as_tensor().reshape((3, 5, 1, 1))?)?;
        assert_eq!(max_difference(&output.to_dtype(DType::F64)?, &expected.to_dtype(DType::F64)?), 0.0);
        let (fused, reference) = (grads(output), grads(expected));
        for var in [&x, &bias, &image_bias] {
            let (got, want) = (fused.get(var.as_tensor()).unwrap(), reference.get(var.as_tensor()).unwrap());
            assert!(max_difference(&got.to_dtype(DType::F64)?, &want.to_dtype(DType::F64)?) < 1e-5);
        }
        let wrong = Tensor::zeros((2, 5), DType::F32, &device)?;
        assert!(x.as_tensor().apply_op3(bias.as_tensor(), &wrong, ChannelAndImageBias).is_err());
        let input = Var::from_tensor(&Tensor::randn(0f32, 1.0, (9, 6), &device)?)?;
        let frozen = Tensor::randn(0f32, 1.0, (4, 6), &device)?;
        let probe = Tensor::randn(0f32, 1.0, (9, 4), &device)?;
        let grads = |out: Tensor| (out * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let fused = grads(input.as_tensor().apply_op2(&frozen, Linear { precision: Precision::F32 })?);
        let reference = grads(input.as_tensor().matmul(&frozen.t()?)?);
        let (got, want) = (fused.get(input.as_tensor()).unwrap(), reference.get(input.as_tensor()).unwrap());
        assert!(max_difference(&got.to_dtype(DType::F64)?, &want.to_dtype(DType::F64)?) < 1e-5);
        assert!(fused.get(&frozen).is_none());
        Ok(())
    }

    /// Nearest upsampling by whole factors: candle's values, and the gradient of an input used
    /// twice (as a ResNet block that upsamples its input also normalises it).
    #[test]
    fn upsampling_matches_candle() -> candle_core::Result<()> {
        let device = Device::Cpu;
        for (dims, scale_h, scale_w) in [((2usize, 3usize, 4usize, 5usize), 2usize, 2usize), ((1, 2, 1, 3), 3, 1), ((1, 1, 3, 2), 1, 4)] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, dims, &device)?)?;
            let (h, w) = (dims.2 * scale_h, dims.3 * scale_w);
            let probe = Tensor::randn(0f32, 1.0, (dims.0, dims.1, h, w), &device)?;
            let ours = x.as_tensor().apply_op1(UpsampleNearest { scale_h, scale_w })?;
            let reference = x.as_tensor().reshape(dims)?.upsample_nearest2d(h, w)?;
            assert_eq!(max_difference(&ours.to_dtype(DType::F64)?, &reference.to_dtype(DType::F64)?), 0.0);
            // The input's gradient: each block of the probe summed, plus 1 from its other use.
            let grads = (ours * &probe)?.sum_all()?.add(&x.as_tensor().sum_all()?)?.backward()?;
            let want = (probe.reshape((dims.0, dims.1, dims.2, scale_h, dims.3, scale_w))?.sum(5)?.sum(3)? + 1.0)?;
            let got = grads.get(x.as_tensor()).unwrap();
            assert!(max_difference(&got.to_dtype(DType::F64)?, &want.to_dtype(DType::F64)?) < 1e-5);
        }
        Ok(())
    }

    /// Training's attention and its gradients against candle's score-matrix path, on odd
    /// shapes (one query, more keys than queries, fewer).
    #[test]
    fn attention_and_its_gradients_match_candle() -> candle_core::Result<()> {
        let device = Device::Cpu;
        // Batch 1 also takes the path whose products are threaded.
        for (n, l, s, d) in [(2usize, 5usize, 7usize, 4usize), (2, 1, 3, 8), (2, 33, 9, 5), (1, 40, 30, 6)] {
            let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, 3, l, d), &device)?)?;
            let k = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, 3, s, d), &device)?)?;
            let v = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, 3, s, d), &device)?)?;
            let probe = Tensor::randn(0f32, 1.0, (n, 3, l, d), &device)?;
            let grads = |out: Tensor| (out * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let scale = 0.37;
            let fused = grads(q.as_tensor().apply_op3(k.as_tensor(), v.as_tensor(), Attention { scale: scale as f32, precision: Precision::F32 })?.transpose(1, 2)?);
            let scores = (q.as_tensor().matmul(&k.as_tensor().t()?)? * scale)?;
            let exp = scores.broadcast_sub(&scores.max_keepdim(D::Minus1)?)?.exp()?;
            let reference = grads(exp.broadcast_div(&exp.sum_keepdim(D::Minus1)?)?.matmul(v.as_tensor())?);
            for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
                let (got, want) = (fused.get(var.as_tensor()).unwrap(), reference.get(var.as_tensor()).unwrap());
                let difference = max_difference(&got.to_dtype(DType::F64)?, &want.to_dtype(DType::F64)?);
                assert!(difference < 1e-5, "{l}×{s}×{d}: ∂{name} differs by {difference}");
            }
        }
        // Heads split off `[B, L, H, D]` projections by a transpose, read where they lie.
        let base = |rows| Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, rows, 3, 5), &device).unwrap()).unwrap();
        let (q, k, v) = (base(6), base(4), base(4));
        let heads = |var: &Var| var.as_tensor().transpose(1, 2).unwrap();
        let probe = Tensor::randn(0f32, 1.0, (2, 3, 6, 5), &device)?;
        let grads = |out: Tensor| (out * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let fused = grads(heads(&q).apply_op3(&heads(&k), &heads(&v), Attention { scale: 0.4, precision: Precision::F32 })?.transpose(1, 2)?);
        let scores = (heads(&q).contiguous()?.matmul(&heads(&k).contiguous()?.t()?)? * 0.4)?;
        let exp = scores.broadcast_sub(&scores.max_keepdim(D::Minus1)?)?.exp()?;
        let reference = grads(exp.broadcast_div(&exp.sum_keepdim(D::Minus1)?)?.matmul(&heads(&v).contiguous()?)?);
        for var in [&q, &k, &v] {
            let (got, want) = (fused.get(var.as_tensor()).unwrap(), reference.get(var.as_tensor()).unwrap());
            assert!(max_difference(&got.to_dtype(DType::F64)?, &want.to_dtype(DType::F64)?) < 1e-5, "strided heads");
        }
        Ok(())
    }

    /// A frozen linear layer with its LoRA branch in one op, against the branch built from
    /// candle's operations: the output and the gradients of the input, A and B.
    #[test]
    fn lora_linear_matches_the_unfused_branch() -> candle_core::Result<()> {
        let device = Device::Cpu;
        for (rows, inputs, rank, outputs, with_bias) in [(9usize, 6usize, 2usize, 5usize, true), (1, 3, 1, 4, false), (70, 33, 8, 17, true)] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (rows, inputs), &device)?)?;
            let a = Var::from_tensor(&Tensor::randn(0f32, 1.0, (rank, inputs), &device)?)?;
            let b = Var::from_tensor(&Tensor::randn(0f32, 1.0, (outputs, rank), &device)?)?;
            let weight = Tensor::randn(0f32, 1.0, (outputs, inputs), &device)?;
            let bias = with_bias.then(|| Tensor::randn(0f32, 1.0, outputs, &device)).transpose()?;
            let probe = Tensor::randn(0f32, 1.0, (rows, outputs), &device)?;
            let grads = |out: Tensor| (out * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let op = LoraLinear { weight: weight.clone(), bias: bias.clone(), scale: 0.7, precision: Precision::F32 };
            let fused_out = x.as_tensor().apply_op3(a.as_tensor(), b.as_tensor(), op)?;
            let mut reference_out = (x.as_tensor().matmul(&weight.t()?)? + (x.as_tensor().matmul(&a.as_tensor().t()?)?.matmul(&b.as_tensor().t()?)? * 0.7)?)?;
            if let Some(bias) = &bias {
                reference_out = reference_out.broadcast_add(bias)?;
            }
            assert!(max_difference(&fused_out.to_dtype(DType::F64)?, &reference_out.to_dtype(DType::F64)?) < 1e-4);
            let (fused, reference) = (grads(fused_out), grads(reference_out));
            for (name, var) in [("x", &x), ("A", &a), ("B", &b)] {
                let (got, want) = (fused.get(var.as_tensor()).unwrap(), reference.get(var.as_tensor()).unwrap());
                let difference = max_difference(&got.to_dtype(DType::F64)?, &want.to_dtype(DType::F64)?);
                assert!(difference < 1e-4, "{rows}×{inputs}, rank {rank}: ∂{name} differs by {difference}");
            }
        }
        Ok(())
    }

    /// bf16 mixed precision: a linear layer's output and gradients are the f32 products of
    /// its operands rounded to bf16 (checked exactly against candle's f32 matmul on rounded
    /// operands); attention and a LoRA linear layer stay within bf16's precision of their f32
    /// results and differ from them (the bf16 products ran).
    #[test]
    fn mixed_precision_rounds_the_products_operands() -> candle_core::Result<()> {
        let device = Device::Cpu;
        let round = |t: &Tensor| t.to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap();
        let difference = |a: &Tensor, b: &Tensor| max_difference(&a.to_dtype(DType::F64).unwrap(), &b.to_dtype(DType::F64).unwrap());
        let relative = |got: &Tensor, want: &Tensor| difference(got, want) / want.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        let bf16 = Precision::Bf16;
        for (rows, inputs, outputs) in [(9usize, 6usize, 5usize), (70, 33, 17), (1, 300, 3)] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (rows, inputs), &device)?)?;
            let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (outputs, inputs), &device)?)?;
            let bias = Var::from_tensor(&Tensor::randn(0f32, 1.0, outputs, &device)?)?;
            let probe = Tensor::randn(0f32, 1.0, (rows, outputs), &device)?;
            let out = x.as_tensor().apply_op3(w.as_tensor(), bias.as_tensor(), Linear { precision: bf16 })?;
            // The references in f64 on the rounded operands; the kernels' f32 sums of n terms
            // are within about n·1e-6 of them (unrounded operands would be ~1e-2 off).
            let f64_of = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
            let tolerance = |n: usize| 1e-6 * (n as f32 + 1.0);
            let want = f64_of(&round(x.as_tensor())).matmul(&f64_of(&round(w.as_tensor())).t()?)?.broadcast_add(&f64_of(bias.as_tensor()))?;
            assert!(difference(&out, &want) < tolerance(inputs), "{rows}×{inputs}×{outputs}: output");
            let grads = (out * &probe)?.sum_all()?.backward()?;
            let want_x = f64_of(&round(&probe)).matmul(&f64_of(&round(w.as_tensor())))?;
            let want_w = f64_of(&round(&probe)).t()?.matmul(&f64_of(&round(x.as_tensor())))?;
            assert!(difference(grads.get(x.as_tensor()).unwrap(), &want_x) < tolerance(outputs), "{rows}×{inputs}×{outputs}: ∂x");
            assert!(difference(grads.get(w.as_tensor()).unwrap(), &want_w) < tolerance(rows), "{rows}×{inputs}×{outputs}: ∂W");
            assert!(difference(grads.get(bias.as_tensor()).unwrap(), &probe.sum(0)?) < tolerance(rows), "{rows}×{inputs}×{outputs}: ∂b");
        }
        // Attention: all gradients near f32's, none equal to them.
        let [q, k, v] = [(2usize, 3usize, 33usize, 8usize), (2, 3, 20, 8), (2, 3, 20, 8)].map(|dims| Var::from_tensor(&Tensor::randn(0f32, 1.0, dims, &device).unwrap()).unwrap());
        let probe = Tensor::randn(0f32, 1.0, (2, 3, 33, 8), &device)?;
        let run = |precision| {
            let out = q.as_tensor().apply_op3(k.as_tensor(), v.as_tensor(), Attention { scale: 0.35, precision }).unwrap().transpose(1, 2).unwrap();
            (out.clone() * &probe).unwrap().sum_all().unwrap().backward().map(|g| (out, g)).unwrap()
        };
        let ((out32, grads32), (out16, grads16)) = (run(Precision::F32), run(bf16));
        let mut pairs = vec![("output", out16, out32)];
        for (name, var) in [("∂q", &q), ("∂k", &k), ("∂v", &v)] {
            pairs.push((name, grads16.get(var.as_tensor()).unwrap().clone(), grads32.get(var.as_tensor()).unwrap().clone()));
        }
        // LoRA linear: the output and the gradients of x, A and B.
        let [x, a, b] = [(40usize, 24usize), (4, 24), (12, 4)].map(|dims| Var::from_tensor(&Tensor::randn(0f32, 1.0, dims, &device).unwrap()).unwrap());
        let weight = Tensor::randn(0f32, 1.0, (12, 24), &device)?;
        let probe = Tensor::randn(0f32, 1.0, (40, 12), &device)?;
        let run = |precision| {
            let op = LoraLinear { weight: weight.clone(), bias: None, scale: 0.7, precision };
            let out = x.as_tensor().apply_op3(a.as_tensor(), b.as_tensor(), op).unwrap();
            (out.clone() * &probe).unwrap().sum_all().unwrap().backward().map(|g| (out, g)).unwrap()
        };
        let ((out32, grads32), (out16, grads16)) = (run(Precision::F32), run(bf16));
        pairs.push(("lora output", out16, out32));
        for (name, var) in [("lora ∂x", &x), ("lora ∂A", &a), ("lora ∂B", &b)] {
            pairs.push((name, grads16.get(var.as_tensor()).unwrap().clone(), grads32.get(var.as_tensor()).unwrap().clone()));
        }
        for (name, got, want) in pairs {
            let error = relative(&got, &want);
            assert!(error < 3e-2 && error > 1e-6, "{name}: bf16 differs from f32 by {error} of its largest value");
        }
        Ok(())
    }
}
