//! The hot operations of every model, in one place: the models call only these for
//! convolution, linear layers, group and layer normalisation, attention, GEGLU and SiLU.
//!
//! Each matches the PyTorch function of the same name (NCHW layout, weights as PyTorch
//! stores them). On the CPU in f32 they run the project's own kernels (the submodules: packed
//! GEMM, implicit-GEMM convolution, flash attention, vectorised element-wise work, all on one
//! rayon pool and chosen at run time by what the CPU offers); where gradients are tracked
//! (training) or on other devices, the same functions fall back to candle's differentiable
//! tensor operations, which the tests compare against the kernels.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;
use std::sync::OnceLock;

use crate::Result;
use gemm_bf16::{ABf16, Bf16Matrix, TransposedWeight};

mod amx;
pub mod attention;
pub mod checkpoint;
pub mod conv;
mod conv_blocked;
mod conv_direct;
mod fused;
pub mod gemm;
pub mod gemm_bf16;
pub mod probe;
pub mod profile;
pub(crate) mod vector;

/// Makes every kernel run on one pool, rayon's global one, of `threads` threads (default: one
/// per core, or `RAYON_NUM_THREADS`). candle's element-wise operations otherwise use a second
/// pool of their own whose workers spin between operations: on a machine with few cores they
/// take the cores the kernels run on (a training step was 15 % slower with it). That pool is
/// left without workers (unless `CANDLE_NUM_THREADS` says otherwise), and the vendored candle
/// then shares its chunks over rayon's pool (vendor/candle-core/PATCHED.md). Call it once, at
/// start-up, before any other thread exists (the CLI does).
pub fn init_threads(threads: Option<usize>) -> Result<()> {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // Safe only while no other thread reads the environment: hence "at start-up".
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    match threads {
        Some(threads) => set_threads(threads),
        None => Ok(()),
    }
}

/// Sets the number of threads of the one pool every kernel runs on (rayon's global pool,
/// which candle's own matrix products also use). Call it once, at start-up, before any other
/// thread exists; without it, the pool has one thread per core (or `RAYON_NUM_THREADS`).
pub fn set_threads(threads: usize) -> Result<()> {
    // Far beyond any machine's cores; a larger number would only try to start that many
    // threads.
    const MAX_THREADS: usize = 4096;
    if threads == 0 || threads > MAX_THREADS {
        crate::bail!("the number of threads must be between 1 and {MAX_THREADS}, got {threads}");
    }
    // candle sizes its matrix products by this variable. Setting it is only safe while no
    // other thread reads the environment: hence "once, at start-up" (the CLI does it first).
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .map_err(|e| crate::Error::invalid(format!("cannot set {threads} threads: {e} (the thread pool already runs)")))
}

/// Whether tensors on `device` run on the project's CPU kernels: on the CPU, unless
/// `DIFFUSE_ISA=tensor` sends it down candle's tensor operations, the path other devices take.
pub fn uses_kernels(device: &candle_core::Device) -> bool {
    device.is_cpu() && gemm::kernels_enabled()
}

/// The type a model's weights are kept in when `requested` on `device`. The CPU kernels
/// compute in bf16 or f32, so f16 becomes the faster of the two on this CPU: bf16 where it has
/// a bf16 dot product (AVX512-BF16: twice f32's products per instruction; f16's three extra
/// mantissa bits are rounded away when the model loads), f32 elsewhere (without it, bf16
/// values are widened to f32 in the kernel: on AVX2 a UNet step took 1.3× f32's time).
/// Otherwise the request.
pub fn weight_dtype(requested: DType, device: &candle_core::Device) -> DType {
    if uses_kernels(device) && requested == DType::F16 {
        if gemm::isa() >= gemm::Isa::Avx512Bf16 {
            DType::BF16
        } else {
            DType::F32
        }
    } else {
        requested
    }
}

/// The type activations flow in between the layers of a model whose weights are `weights`:
/// on the CPU always f32 (the kernels round activations to bf16 as they pack them for a bf16
/// weight, and norms, softmax and element-wise work stay in f32), f64 for f64 weights;
/// elsewhere the weights' type.
pub fn activation_dtype(weights: DType, device: &candle_core::Device) -> DType {
    match weights {
        DType::F64 => DType::F64,
        _ if uses_kernels(device) => DType::F32,
        other => other,
    }
}

/// `torch.nn.functional.conv2d`: `input` is `[N, C_in, H, W]`, `weight` is
/// `[C_out, C_in / groups, kH, kW]`, `bias` is `[C_out]`; symmetric zero `padding`.
/// In f32 on the CPU it runs the project's implicit-GEMM kernel (ops/conv.rs), with its own
/// backward pass, and with a bf16 `weight` (f32 input) the bf16 kernel for inference; other
/// types and devices use candle's.
pub fn conv2d(input: &Tensor, weight: &Tensor, bias: Option<&Tensor>, stride: usize, padding: usize) -> Result<Tensor> {
    let _timer = profile::timer("conv2d");
    let weight = &cpu_half_for_kernels(input, weight)?;
    if uses_kernels(input.device()) && input.dtype() == DType::F32 {
        let tracked = input.track_op() || weight.track_op() || bias.is_some_and(|b| b.track_op());
        if !tracked && matches!(weight.dtype(), DType::F32 | DType::BF16) {
            // Inference: the bias is added as the product is written, not in another pass.
            let bias = bias.map(|b| b.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()).transpose()?;
            return Ok(input.contiguous()?.apply_op2_no_bwd(&weight.contiguous()?, &conv::Conv2d { stride, padding, bias, precision: Precision::F32 })?);
        }
    }
    if uses_kernels(input.device()) && input.dtype() == DType::F32 && weight.dtype() == DType::F32 {
        let op = conv::Conv2d { stride, padding, bias: None, precision: training_precision() };
        let (input, weight) = (input.contiguous()?, weight.contiguous()?);
        return match bias {
            // The bias as an operand of the op: added as the output is written.
            Some(bias) if bias.dtype() == DType::F32 && bias.dims() == [weight.dim(0)?] => Ok(input.apply_op3(&weight, &bias.contiguous()?, op)?),
            _ => add_channel_bias(input.apply_op2(&weight, op)?, bias),
        };
    }
    add_channel_bias(input.conv2d(weight, padding, stride, 1, 1)?, bias)
}

/// [`conv2d`] plus `image_bias[n, c]` (`[N, C_out]`) on every position of image `n`'s channel
/// `c`, as a ResNet block adds its time embedding to its first convolution's output. For
/// training on the CPU both biases are added in one pass (and their gradients summed in one);
/// elsewhere it is a broadcast add after the convolution.
pub fn conv2d_plus_image_bias(input: &Tensor, weight: &Tensor, bias: Option<&Tensor>, image_bias: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    let tracked = input.track_op() || weight.track_op() || bias.is_some_and(|b| b.track_op()) || image_bias.track_op();
    let all_f32 = [Some(input), Some(weight), bias, Some(image_bias)].into_iter().flatten().all(|t| t.dtype() == DType::F32);
    if tracked && all_f32 && uses_kernels(input.device()) && image_bias.dims() == [input.dim(0)?, weight.dim(0)?] {
        let _timer = profile::timer("conv2d");
        let op = conv::Conv2d { stride, padding, bias: None, precision: training_precision() };
        let output = input.contiguous()?.apply_op2(&weight.contiguous()?, op)?;
        let bias = match bias {
            Some(bias) => bias.contiguous()?,
            None => Tensor::zeros(weight.dim(0)?, DType::F32, weight.device())?,
        };
        return Ok(output.apply_op3(&bias, &image_bias.contiguous()?, fused::ChannelAndImageBias)?);
    }
    Ok(conv2d(input, weight, bias, stride, padding)?.broadcast_add(&image_bias.unsqueeze(2)?.unsqueeze(3)?)?)
}

/// An f16 `weight` meeting an f32 `input` on the CPU (a model not loaded through
/// [`weight_dtype`]) in the type [`weight_dtype`] gives f16 there; any other weight as it is.
fn cpu_half_for_kernels(input: &Tensor, weight: &Tensor) -> Result<Tensor> {
    if uses_kernels(input.device()) && input.dtype() == DType::F32 && weight.dtype() == DType::F16 {
        return Ok(weight.to_dtype(weight_dtype(DType::F16, input.device()))?);
    }
    Ok(weight.clone())
}

fn add_channel_bias(output: Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    Ok(match bias {
        Some(bias) => output.broadcast_add(&bias.reshape((1, bias.elem_count(), 1, 1))?)?,
        None => output,
    })
}

/// `torch.nn.functional.linear`: `input` is `[..., in]`, `weight` is `[out, in]`, `bias` is `[out]`.
/// On the CPU, for inference, an f32 input runs on the packed GEMM kernels with an f32 weight,
/// and on the bf16 ones with a bf16 weight; for training (f32, gradients tracked) on the f32
/// kernels with their own backward pass.
pub fn linear(input: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let _timer = profile::timer("linear");
    let weight = &cpu_half_for_kernels(input, weight)?;
    let dims = input.dims();
    let in_features = *dims.last().ok_or_else(|| crate::Error::invalid("linear: input has rank 0"))?;
    let out_features = weight.dim(0)?;
    let rows = input.elem_count() / in_features.max(1);
    profile::count_flops("linear", 2.0 * (rows * in_features * out_features) as f64);
    let flat = input.reshape((rows, in_features))?;
    let on_kernel = uses_kernels(input.device())
        && input.dtype() == DType::F32
        && matches!(weight.dtype(), DType::F32 | DType::BF16)
        && !input.track_op()
        && !weight.track_op();
    let tracked = input.track_op() || weight.track_op() || bias.is_some_and(|b| b.track_op());
    let trainable = tracked
        && uses_kernels(input.device())
        && input.dtype() == DType::F32
        && weight.dtype() == DType::F32
        && bias.is_none_or(|b| b.dtype() == DType::F32);
    let output = if on_kernel && !bias.is_some_and(|b| b.track_op()) {
        // The bias is added as the product is written, not in another pass.
        let bias = bias.map(|b| b.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()).transpose()?;
        flat.contiguous()?.apply_op2_no_bwd(&weight.contiguous()?, &LinearCpu { bias })?
    } else if trainable {
        let (flat, weight) = (flat.contiguous()?, weight.contiguous()?);
        let op = fused::Linear { precision: training_precision() };
        match bias {
            Some(bias) => flat.apply_op3(&weight, &bias.contiguous()?, op)?,
            None => flat.apply_op2(&weight, op)?,
        }
    } else {
        let output = flat.matmul(&weight.t()?)?;
        match bias {
            Some(bias) => output.broadcast_add(bias)?,
            None => output,
        }
    };
    let mut out_dims = dims.to_vec();
    if let Some(last) = out_dims.last_mut() {
        *last = out_features;
    }
    Ok(output.reshape(out_dims)?)
}

/// A frozen linear layer with a LoRA branch beside it, `linear(input, weight, bias) + scale ·
/// linear(linear(input, down), up)`, as one op with one backward pass where the training
/// kernels apply (the CPU, f32, a frozen weight and bias); `None` elsewhere, where the caller
/// builds the branch from [`linear`]s.
pub fn linear_with_lora(input: &Tensor, weight: &Tensor, bias: Option<&Tensor>, down: &Tensor, up: &Tensor, scale: f64) -> Result<Option<Tensor>> {
    let _timer = profile::timer("linear + lora");
    let f32_operands = [input, weight, down, up].iter().all(|t| t.dtype() == DType::F32) && bias.is_none_or(|b| b.dtype() == DType::F32);
    let frozen = !weight.track_op() && !bias.is_some_and(|b| b.track_op());
    if !uses_kernels(input.device()) || !f32_operands || !frozen || weight.rank() != 2 {
        return Ok(None);
    }
    let dims = input.dims();
    let in_features = *dims.last().ok_or_else(|| crate::Error::invalid("linear: input has rank 0"))?;
    let flat = input.reshape((input.elem_count() / in_features.max(1), in_features))?.contiguous()?;
    let op = fused::LoraLinear {
        weight: weight.contiguous()?,
        bias: bias.map(|b| b.contiguous()).transpose()?,
        scale: scale as f32,
        precision: training_precision(),
    };
    let output = flat.apply_op3(&down.contiguous()?, &up.contiguous()?, op)?;
    let mut out_dims = dims.to_vec();
    if let Some(last) = out_dims.last_mut() {
        *last = weight.dim(0)?;
    }
    Ok(Some(output.reshape(out_dims)?))
}

/// A frozen linear layer's weight (`[out, in]`) packed once, when the model loads, into the
/// panels the GEMM reads (`Wᵀ`; for bf16, pairs along the input features), so that no call
/// repacks it: for the few rows of a text encoder or a time embedding, packing was most of the
/// work, and the threads that share a tall product each packed all of it.
#[derive(Debug)]
pub struct PackedLinearWeight {
    packed: PackedPanels,
    out_features: usize,
    in_features: usize,
}

#[derive(Debug)]
enum PackedPanels {
    Bf16(gemm_bf16::PackedBPairs),
    F32(gemm::PackedB),
}

impl PackedLinearWeight {
    /// The packed form of a contiguous bf16 or f32 CPU weight that no training updates (not a
    /// `Var`); `None` for any other weight (variables, other types and devices keep the
    /// tensor).
    pub fn new(weight: &Tensor) -> Result<Option<Self>> {
        if !uses_kernels(weight.device()) || !matches!(weight.dtype(), DType::BF16 | DType::F32) || weight.rank() != 2 || weight.is_variable() {
            return Ok(None);
        }
        let (out_features, in_features) = weight.dims2()?;
        let weight = weight.contiguous()?;
        let (storage, layout) = weight.storage_and_layout();
        let Some((start, end)) = layout.contiguous_offsets() else {
            return Ok(None);
        };
        let size_error = || crate::Error::invalid(format!("linear: a weight of {} values is not {out_features}×{in_features}", end - start));
        let packed = match &*storage {
            candle_core::Storage::Cpu(CpuStorage::BF16(data)) => {
                let matrix = Bf16Matrix::new(&data[start..end], out_features, in_features).ok_or_else(size_error)?;
                PackedPanels::Bf16(gemm_bf16::PackedBPairs::new(&TransposedWeight(matrix), gemm::isa()))
            }
            candle_core::Storage::Cpu(CpuStorage::F32(data)) => {
                let matrix = gemm::MatRef::row_major(&data[start..end], out_features, in_features).ok_or_else(size_error)?;
                PackedPanels::F32(gemm::PackedB::new(&matrix.t()))
            }
            _ => return Ok(None),
        };
        Ok(Some(Self { packed, out_features, in_features }))
    }

    /// `(out_features, in_features)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.out_features, self.in_features)
    }

    /// The type of the weight that was packed.
    pub fn dtype(&self) -> DType {
        match self.packed {
            PackedPanels::Bf16(_) => DType::BF16,
            PackedPanels::F32(_) => DType::F32,
        }
    }
}

/// [`linear`] with a weight packed at load (inference on the CPU; f32 input and output).
pub fn linear_packed(input: &Tensor, weight: &std::sync::Arc<PackedLinearWeight>, bias: Option<&Tensor>) -> Result<Tensor> {
    let _timer = profile::timer("linear");
    let (out_features, in_features) = weight.dims();
    let dims = input.dims();
    if dims.last() != Some(&in_features) {
        crate::bail!("linear: input {dims:?} does not end in the weight's {in_features} input features");
    }
    let rows = input.elem_count() / in_features.max(1);
    profile::count_flops("linear", 2.0 * (rows * in_features * out_features) as f64);
    if input.track_op() {
        // Training through a frozen layer (a LoRA adapter before it): the plain weight again,
        // on training's path and precision, with its backward pass for the input.
        let PackedPanels::F32(packed) = &weight.packed else {
            crate::bail!("linear: no backward pass through a bf16 weight packed for inference");
        };
        let weight_t = Tensor::from_vec(packed.unpacked(), (in_features, out_features), input.device())?;
        return linear(input, &weight_t.t()?.contiguous()?, bias);
    }
    let flat = input.to_dtype(DType::F32)?.reshape((rows, in_features))?;
    let bias = bias.map(|b| b.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()).transpose()?;
    let output = flat.contiguous()?.apply_op1_no_bwd(&LinearPackedCpu { weight: weight.clone(), bias })?;
    let mut out_dims = dims.to_vec();
    if let Some(last) = out_dims.last_mut() {
        *last = out_features;
    }
    Ok(output.reshape(out_dims)?)
}

struct LinearPackedCpu {
    weight: std::sync::Arc<PackedLinearWeight>,
    bias: Option<Vec<f32>>,
}

impl candle_core::CustomOp1 for LinearPackedCpu {
    fn name(&self) -> &'static str {
        "linear-gemm-packed"
    }

    fn cpu_fwd(&self, input: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, in_features) = layout.shape().dims2()?;
        let (out_features, _) = self.weight.dims();
        if self.bias.as_ref().is_some_and(|b| b.len() != out_features) {
            candle_core::bail!("linear: the bias does not have {out_features} values");
        }
        let input = contiguous_f32(input, layout, "linear input")?;
        let Some(x) = gemm::MatRef::row_major(input, rows, in_features) else {
            candle_core::bail!("linear: the input's size does not match its shape");
        };
        let init = self.bias.as_deref().map_or(gemm::Init::Overwrite, gemm::Init::ColumnBias);
        let output = match &self.weight.packed {
            PackedPanels::Bf16(packed) => {
                let mut output = vec![0f32; rows * out_features];
                gemm_bf16::gemm_bf16(&mut output, out_features, ABf16::F32(x), packed, init, true);
                output
            }
            // SAFETY: a product that does not accumulate writes all of its `C`, here the whole
            // `rows × out_features` output.
            PackedPanels::F32(packed) => unsafe { gemm::fresh_output(rows * out_features, |out| gemm::gemm_fresh(out, out_features, gemm::ASource::InPlace(x), packed, init, true)) },
        };
        Ok((CpuStorage::F32(output), Shape::from((rows, out_features))))
    }
}

/// `input[rows, in] · weight[out, in]ᵀ (+ bias)` on the packed GEMM kernels, for inference
/// (training's is `fused::Linear`).
struct LinearCpu {
    bias: Option<Vec<f32>>,
}

impl candle_core::CustomOp2 for LinearCpu {
    fn name(&self) -> &'static str {
        "linear-gemm"
    }

    fn cpu_fwd(&self, input: &CpuStorage, input_layout: &Layout, weight: &CpuStorage, weight_layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::BF16(data) = weight else {
            // An f32 weight: the product training's linear layer makes.
            return fused::Linear { precision: Precision::F32 }.forward(input, input_layout, weight, weight_layout, self.bias.as_deref());
        };
        let (rows, in_features) = input_layout.shape().dims2()?;
        let (out_features, weight_in) = weight_layout.shape().dims2()?;
        if weight_in != in_features {
            candle_core::bail!("linear: input has {in_features} features, the weight expects {weight_in}");
        }
        let input = contiguous_f32(input, input_layout, "linear input")?;
        if self.bias.as_ref().is_some_and(|b| b.len() != out_features) {
            candle_core::bail!("linear: the bias does not have {out_features} values");
        }
        let init = self.bias.as_deref().map_or(gemm::Init::Overwrite, gemm::Init::ColumnBias);
        let mut output = vec![0f32; rows * out_features];
        let Some(x) = gemm::MatRef::row_major(input, rows, in_features) else {
            candle_core::bail!("linear: the input's size does not match its shape");
        };
        // A model loaded in bf16: bf16 products, f32 sums.
        let weight = weight_layout.contiguous_offsets().and_then(|(start, end)| Bf16Matrix::new(&data[start..end], out_features, in_features));
        let Some(weight) = weight else {
            candle_core::bail!("linear: the bf16 weight is not contiguous or does not match its shape");
        };
        gemm_bf16::gemm_bf16(&mut output, out_features, ABf16::F32(x), &TransposedWeight(weight), init, true);
        Ok((CpuStorage::F32(output), Shape::from((rows, out_features))))
    }
}

/// The f32 values of a contiguous CPU operand.
fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(data), Some((start, end))) => Ok(&data[start..end]),
        (CpuStorage::F32(_), None) => candle_core::bail!("{what}: not contiguous"),
        _ => candle_core::bail!("{what}: not f32"),
    }
}

/// `torch.nn.functional.group_norm` with affine `weight` and `bias` (`[C]`): `input` is
/// `[N, C, *]`, normalised over each of `num_groups` channel groups and all spatial positions.
/// Statistics are taken in f32 or better (as PyTorch does for half-precision inputs).
///
/// On the CPU this is one fused kernel that allocates nothing but its output (the
/// activations of a 512×512 VAE decoder are hundreds of MB each), with a fused backward pass
/// for training; elsewhere, and for f64 input, it is built from tensor operations.
pub fn group_norm(input: &Tensor, num_groups: usize, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let _timer = profile::timer("group_norm");
    group_norm_then(input, num_groups, weight, bias, eps, false)
}

/// [`group_norm`] followed by [`silu`], as every ResNet block and output head applies them:
/// on the CPU, one pass that writes each normalised channel and applies SiLU while it is
/// still in cache, and for training one backward pass through both (the norm's output is
/// recomputed there, not kept).
pub fn group_norm_silu(input: &Tensor, num_groups: usize, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let _timer = profile::timer("group_norm + silu");
    if !uses_kernels(input.device()) || input.dtype() == DType::F64 {
        return silu(&group_norm_then(input, num_groups, weight, bias, eps, false)?);
    }
    group_norm_then(input, num_groups, weight, bias, eps, true)
}

fn group_norm_then(input: &Tensor, num_groups: usize, weight: &Tensor, bias: &Tensor, eps: f64, silu: bool) -> Result<Tensor> {
    let dims = input.dims().to_vec();
    if dims.len() < 2 {
        crate::bail!("group_norm: input of shape {dims:?} has no channel dimension");
    }
    let channels = dims[1];
    if num_groups == 0 || !channels.is_multiple_of(num_groups) {
        crate::bail!("group_norm: {num_groups} groups do not divide {channels} channels");
    }
    if weight.dims() != [channels] || bias.dims() != [channels] {
        crate::bail!(
            "group_norm: weight {:?} and bias {:?} do not match {channels} channels",
            weight.dims(),
            bias.dims()
        );
    }
    let dtype = input.dtype();
    if uses_kernels(input.device()) && dtype != DType::F64 {
        let f32_contiguous = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::F32)?.contiguous()?) };
        let (input, weight, bias) = (f32_contiguous(input)?, f32_contiguous(weight)?, f32_contiguous(bias)?);
        let output = input.apply_op3(&weight, &bias, GroupNormCpu { num_groups, eps, silu, statistics: OnceLock::new() })?;
        return Ok(output.to_dtype(dtype)?);
    }
    group_norm_from_tensor_ops(input, num_groups, weight, bias, eps)
}

/// The type statistics are computed in: f64 for f64 input, else f32.
fn statistics_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// [`group_norm`] built from tensor operations (differentiable by candle's autograd), for
/// devices without the fused kernel and for f64.
pub fn group_norm_from_tensor_ops(input: &Tensor, num_groups: usize, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let dims = input.dims().to_vec();
    let (batch, channels) = (dims[0], dims[1]);
    let dtype = input.dtype();
    let compute = statistics_dtype(dtype);
    let x = input.to_dtype(compute)?.reshape((batch, num_groups, ()))?;
    let group_size = x.dim(2)? as f64;
    let mean = (x.sum_keepdim(2)? / group_size)?;
    let centered = x.broadcast_sub(&mean)?;
    let variance = (centered.sqr()?.sum_keepdim(2)? / group_size)?;
    let normalized = centered.broadcast_div(&(variance + eps)?.sqrt()?)?;
    let mut affine_shape = vec![1usize; dims.len()];
    affine_shape[1] = channels;
    let weight = weight.to_dtype(compute)?.reshape(affine_shape.clone())?;
    let bias = bias.to_dtype(compute)?.reshape(affine_shape)?;
    let output = normalized.reshape(dims)?.broadcast_mul(&weight)?.broadcast_add(&bias)?;
    Ok(output.to_dtype(dtype)?)
}

/// The CPU kernel of [`group_norm`] on contiguous f32 input, weight and bias: each group's
/// mean and variance in f64 (mean first, then the mean squared deviation), then, as
/// PyTorch's CPU kernel does, each channel's normalisation and affine folded into one
/// `x * scale + shift`.
struct GroupNormCpu {
    num_groups: usize,
    eps: f64,
    /// Apply SiLU to the output (the backward pass then recomputes the norm's output).
    silu: bool,
    /// Each (image, group)'s mean and 1/sqrt(variance + eps), kept by the forward pass for
    /// the backward pass (which otherwise reads the input twice more to recompute them).
    statistics: OnceLock<Vec<(f64, f64)>>,
}

impl CustomOp3 for GroupNormCpu {
    fn name(&self) -> &'static str {
        "group-norm"
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
        let contiguous = |storage: &CpuStorage, layout: &Layout| -> candle_core::Result<Vec<f32>> {
            match layout.contiguous_offsets() {
                Some((start, end)) => Ok(storage.as_slice::<f32>()?[start..end].to_vec()),
                None => candle_core::bail!("group-norm: operands must be contiguous"),
            }
        };
        let (weight, bias) = (contiguous(weight, weight_layout)?, contiguous(bias, bias_layout)?);
        let Some((start, end)) = input_layout.contiguous_offsets() else {
            candle_core::bail!("group-norm: input must be contiguous");
        };
        let input = &input.as_slice::<f32>()?[start..end];
        let dims = input_layout.dims();
        let channels = dims[1];
        let spatial: usize = dims[2..].iter().product();
        let channels_per_group = channels / self.num_groups;
        let group_len = channels_per_group * spatial;
        let mut output = vec![0f32; input.len()];
        let isa = gemm::isa();
        if group_len == 0 {
            return Ok((CpuStorage::F32(output), input_layout.shape().clone()));
        }
        // Groups are independent: tasks of 16 K values or more (a small image's group is a few
        // hundred), over all threads.
        let statistics = input
            .par_chunks_exact(group_len)
            .zip(output.par_chunks_exact_mut(group_len))
            .enumerate()
            .with_min_len((1 << 14) / group_len + 1)
            .map(|(index, (source, destination))| {
                let (mean, inverse_std) = self.statistics(source);
                let first_channel = (index % self.num_groups) * channels_per_group;
                for (offset, (source, destination)) in source.chunks_exact(spatial).zip(destination.chunks_exact_mut(spatial)).enumerate() {
                    let channel = first_channel + offset;
                    let (scale, shift) = scale_and_shift(weight[channel], bias[channel], mean, inverse_std);
                    vector::affine_then_silu(isa, source, scale, shift, self.silu, destination);
                }
                (mean, inverse_std)
            })
            .collect();
        // A second forward pass of the same op (none is made) would find them set: the same values.
        let _ = self.statistics.set(statistics);
        Ok((CpuStorage::F32(output), input_layout.shape().clone()))
    }

    /// With x̂ = (x - mean) · inverse_std per group and d the normalised output's gradient
    /// (the output's, `g`, or with SiLU applied after the norm, SiLU's backward pass of `g` at
    /// the recomputed norm output): ∂bias_c = Σ d, ∂weight_c = Σ d·x̂ (over the batch and the
    /// channel's positions), and with h = d·weight_c, ∂x = inverse_std · (h - mean(h) - x̂ ·
    /// mean(h·x̂)), the means over the group: per channel `a·d + b·x + c`. Sums in f64, and
    /// a small image's group stays in cache between the passes.
    fn bwd(
        &self,
        input: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _output: &Tensor,
        grad_output: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _timer = profile::timer("group_norm backward");
        let dims = input.dims();
        let channels = dims[1];
        let spatial: usize = dims[2..].iter().product();
        let channels_per_group = channels / self.num_groups;
        let group_len = channels_per_group * spatial;
        let grad_output = grad_output.to_dtype(DType::F32)?.contiguous()?;
        let mut grad_input = vec![0f32; input.elem_count()];
        let mut grad_weight = vec![0f64; channels];
        let mut grad_bias = vec![0f64; channels];
        let isa = gemm::isa();
        if group_len > 0 {
            // Groups are independent: each writes its channels' sums for its image, which the
            // batch's images then add up in order. Tasks of 16 K values or more (an 8×8 image's
            // group is a few hundred).
            let (mut sums_weight, mut sums_bias) = (vec![0f64; dims[0] * channels], vec![0f64; dims[0] * channels]);
            let min_groups = (1 << 14) / group_len + 1;
            fused::with_slices(&[input, &grad_output, weight, bias], "group-norm backward", |s| {
                let (x, g, weight_values, bias_values) = (s[0], s[1], s[2], s[3]);
                grad_input
                    .par_chunks_exact_mut(group_len)
                    .zip(x.par_chunks_exact(group_len))
                    .zip(g.par_chunks_exact(group_len))
                    .zip(sums_weight.par_chunks_exact_mut(channels_per_group).zip(sums_bias.par_chunks_exact_mut(channels_per_group)))
                    .enumerate()
                    .with_min_len(min_groups)
                    .for_each(|(index, (((grad_x, x), g), (sum_weight, sum_bias)))| {
                        let (mean, inverse_std) = match self.statistics.get() {
                            Some(statistics) => statistics[index],
                            None => self.statistics(x),
                        };
                        let first_channel = (index % self.num_groups) * channels_per_group;
                        let (mut sum_h, mut sum_h_xhat) = (0f64, 0f64);
                        for (offset, ((x, g), grad_x)) in x.chunks_exact(spatial).zip(g.chunks_exact(spatial)).zip(grad_x.chunks_exact_mut(spatial)).enumerate() {
                            let channel = first_channel + offset;
                            // d: the output's gradient, or SiLU's backward pass at the norm's
                            // output (recomputed as the forward pass computed it), kept in
                            // `grad_x` for the last pass.
                            let d: &[f32] = if self.silu {
                                let (scale, shift) = scale_and_shift(weight_values[channel], bias_values[channel], mean, inverse_std);
                                vector::silu_backward_at_affine(isa, x, scale, shift, g, grad_x);
                                grad_x
                            } else {
                                g
                            };
                            // Σ d·x̂ = inverse_std · (Σ d·x - mean · Σ d).
                            let (sum_d, sum_dx) = vector::sum_and_dot_f64(isa, d, x);
                            let sum_d_xhat = inverse_std * (sum_dx - mean * sum_d);
                            sum_bias[offset] = sum_d;
                            sum_weight[offset] = sum_d_xhat;
                            let w = weight_values[channel] as f64;
                            sum_h += sum_d * w;
                            sum_h_xhat += sum_d_xhat * w;
                        }
                        let (mean_h, mean_h_xhat) = (sum_h / group_len as f64, sum_h_xhat / group_len as f64);
                        // ∂x = a·d + b·x + c, with a per channel.
                        let b = (-inverse_std * inverse_std * mean_h_xhat) as f32;
                        let c = (inverse_std * (mean * inverse_std * mean_h_xhat - mean_h)) as f32;
                        for (offset, ((x, g), grad_x)) in x.chunks_exact(spatial).zip(g.chunks_exact(spatial)).zip(grad_x.chunks_exact_mut(spatial)).enumerate() {
                            let a = (inverse_std * weight_values[first_channel + offset] as f64) as f32;
                            vector::group_norm_input_gradient(isa, a, b, c, x, (!self.silu).then_some(g), grad_x);
                        }
                    });
                Ok(())
            })?;
            for (image_weight, image_bias) in sums_weight.chunks_exact(channels).zip(sums_bias.chunks_exact(channels)) {
                grad_weight.iter_mut().zip(image_weight).for_each(|(sum, w)| *sum += w);
                grad_bias.iter_mut().zip(image_bias).for_each(|(sum, b)| *sum += b);
            }
        }
        let device = input.device();
        let to_f32 = |v: Vec<f64>| v.into_iter().map(|v| v as f32).collect::<Vec<f32>>();
        Ok((
            Some(Tensor::from_vec(grad_input, dims, device)?),
            Some(Tensor::from_vec(to_f32(grad_weight), channels, device)?),
            Some(Tensor::from_vec(to_f32(grad_bias), channels, device)?),
        ))
    }
}

/// A channel's normalisation and affine folded into one `x · scale + shift` (f32), as
/// PyTorch's CPU kernel does: the forward pass and the backward pass's recomputation agree.
fn scale_and_shift(weight: f32, bias: f32, mean: f64, inverse_std: f64) -> (f32, f32) {
    let scale = weight as f64 * inverse_std;
    (scale as f32, (bias as f64 - mean * scale) as f32)
}

impl GroupNormCpu {
    /// A group's mean and 1/sqrt(variance + eps), in f64 (the mean first, then the mean
    /// squared deviation).
    fn statistics(&self, group: &[f32]) -> (f64, f64) {
        fused::mean_and_inverse_std(group, self.eps)
    }
}

/// `torch.nn.functional.scaled_dot_product_attention` without mask or dropout: `query` is
/// `[B, heads, L, D]`, `key`/`value` are `[B, heads, S, D]`; `scale` defaults to `1/sqrt(D)`.
/// Scores and softmax are computed in f32 whatever the input type.
pub fn scaled_dot_product_attention(query: &Tensor, key: &Tensor, value: &Tensor, scale: Option<f64>) -> Result<Tensor> {
    scaled_dot_product_attention_in(query, key, value, scale, Precision::F32)
}

/// The precision of a layer's products on the CPU, which the weights' type decides: a model
/// loaded in bf16 computes its attention's products in bf16 too, as PyTorch does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// f32 products.
    F32,
    /// Products of bf16-rounded inputs, accumulated in f32.
    Bf16,
}

impl Precision {
    /// bf16 for bf16 weights, else f32.
    pub fn of_weights(dtype: DType) -> Self {
        if dtype == DType::BF16 {
            Precision::Bf16
        } else {
            Precision::F32
        }
    }
}

thread_local! {
    static TRAINING_PRECISION: std::cell::Cell<Precision> = const { std::cell::Cell::new(Precision::F32) };
}

/// Runs `f` with the products of the layers it trains (convolutions and linear layers whose
/// gradients are tracked) in `precision`: bf16 mixed precision, the CPU kernels' counterpart of
/// `torch.autocast("cpu", dtype=torch.bfloat16)` as accelerate's `mixed_precision="bf16"`
/// applies it. The weights, their gradients and everything else (norms, softmax, element-wise
/// work, the optimizer) stay f32; only the products' operands are rounded to bf16, with f32
/// sums, in the forward pass and in the backward passes of the ops built inside `f`.
/// Inference is unaffected (a bf16 model says so with its weights' type), and so are other
/// devices and `DIFFUSE_ISA=tensor` (candle's operations, f32).
pub fn with_training_precision<R>(precision: Precision, f: impl FnOnce() -> R) -> R {
    struct Restore(Precision);
    impl Drop for Restore {
        fn drop(&mut self) {
            TRAINING_PRECISION.with(|p| p.set(self.0));
        }
    }
    let _restore = Restore(TRAINING_PRECISION.with(|p| p.replace(precision)));
    f()
}

/// The precision [`with_training_precision`] set on this thread (f32 outside it).
fn training_precision() -> Precision {
    TRAINING_PRECISION.with(|p| p.get())
}

/// [`scaled_dot_product_attention`] with its two products (on the CPU kernel) in `precision`;
/// the softmax is f32 either way.
pub fn scaled_dot_product_attention_in(query: &Tensor, key: &Tensor, value: &Tensor, scale: Option<f64>, precision: Precision) -> Result<Tensor> {
    let _timer = profile::timer("scaled_dot_product_attention");
    let head_dim = query.dim(D::Minus1)?;
    // Two products of L × S × D per batch element and head.
    profile::count_flops("scaled_dot_product_attention", 4.0 * (query.elem_count() * key.dim(D::Minus2)?) as f64);
    let scale = scale.unwrap_or(1.0 / (head_dim as f64).sqrt());
    if let Some(output) = flash_attention(query, key, value, scale, None, precision)? {
        return Ok(output);
    }
    attention_in_blocks(query, key, value, scale, None, MAX_SCORE_BYTES)
}

/// Attention with an additive mask (`[L, S]`, or broadcastable to the `[B, heads, L, S]`
/// scores), softmax in f32.
pub fn masked_attention(query: &Tensor, key: &Tensor, value: &Tensor, scale: f64, mask: &Tensor) -> Result<Tensor> {
    let _timer = profile::timer("masked_attention");
    attention(query, key, value, scale, Some(mask))
}

/// The largest score matrix built at once. Softmax is per query row, so splitting the queries
/// into row blocks changes nothing numerically, and keeps memory flat: SD 1.5's first
/// self-attention at 512×512 would otherwise hold 1 GiB of scores (2 × 8 heads × 4096²).
const MAX_SCORE_BYTES: usize = 128 << 20;

fn attention(query: &Tensor, key: &Tensor, value: &Tensor, scale: f64, mask: Option<&Tensor>) -> Result<Tensor> {
    if let Some(output) = flash_attention(query, key, value, scale, mask, Precision::F32)? {
        return Ok(output);
    }
    attention_in_blocks(query, key, value, scale, mask, MAX_SCORE_BYTES)
}

/// The CPU attention kernels where they apply: for inference (no gradient tracked) the flash
/// kernel (ops/attention.rs), f32/f16/bf16 computed in f32, rank-4 operands, and no mask or
/// one `[L, S]` mask shared by every head; for training, f32 rank-4 operands without a mask,
/// the kernel with a backward pass (`fused::Attention`). `None` where neither applies.
fn flash_attention(query: &Tensor, key: &Tensor, value: &Tensor, scale: f64, mask: Option<&Tensor>, precision: Precision) -> Result<Option<Tensor>> {
    let tracked = query.track_op() || key.track_op() || value.track_op() || mask.is_some_and(|m| m.track_op());
    // Training without a mask: the f32 kernels with their own backward pass.
    let trainable = [query, key, value].iter().all(|t| t.dtype() == DType::F32 && t.rank() == 4);
    if tracked && trainable && mask.is_none() && uses_kernels(query.device()) {
        // Operands are read in place when their last dimension is contiguous (the heads split
        // off a projection by a transpose); the output comes back as [B, L, H, D], transposed.
        let in_place = |t: &Tensor| -> Result<Tensor> { Ok(if t.stride()[3] == 1 { t.clone() } else { t.contiguous()? }) };
        let (query, key, value) = (in_place(query)?, in_place(key)?, in_place(value)?);
        return Ok(Some(query.apply_op3(&key, &value, fused::Attention { scale: scale as f32, precision: training_precision() })?.transpose(1, 2)?));
    }
    if !uses_kernels(query.device()) || tracked || query.dtype() == DType::F64 || query.rank() != 4 {
        return Ok(None);
    }
    let (batch, heads, queries, head_dim) = query.dims4()?;
    let (key_batch, key_heads, keys, key_dim) = key.dims4()?;
    if (key_batch, key_heads, key_dim) != (batch, heads, head_dim) || value.dims() != key.dims() {
        return Ok(None);
    }
    if mask.is_some_and(|m| m.dims() != [queries, keys]) {
        return Ok(None);
    }
    let dtype = query.dtype();
    let dims = attention::AttentionDims { heads: batch * heads, queries, keys, head_dim };
    let kernel = match precision {
        Precision::F32 => attention::attention,
        Precision::Bf16 => attention::attention_bf16,
    };
    let output = with_f32_slices(&[query, key, value], |slices| match mask {
        None => Ok(kernel(dims, slices[0], slices[1], slices[2], scale as f32, None)),
        Some(mask) => with_f32_slices(&[mask], |m| Ok(kernel(dims, slices[0], slices[1], slices[2], scale as f32, Some(m[0])))),
    })?;
    Ok(Some(Tensor::from_vec(output, (batch, heads, queries, head_dim), query.device())?.to_dtype(dtype)?))
}

/// Calls `f` with the contiguous f32 values of CPU tensors (converted and copied only where
/// they are not already contiguous f32).
fn with_f32_slices<R>(tensors: &[&Tensor], f: impl FnOnce(&[&[f32]]) -> Result<R>) -> Result<R> {
    let prepared: Vec<Tensor> = tensors.iter().map(|t| Ok(t.to_dtype(DType::F32)?.contiguous()?)).collect::<Result<_>>()?;
    let guards: Vec<_> = prepared.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(guards.len());
    for (storage, layout) in &guards {
        match (&**storage, layout.contiguous_offsets()) {
            (candle_core::Storage::Cpu(CpuStorage::F32(data)), Some((start, end))) => slices.push(&data[start..end]),
            _ => crate::bail!("attention: expected contiguous f32 CPU operands"),
        }
    }
    f(&slices)
}

fn attention_in_blocks(
    query: &Tensor,
    key: &Tensor,
    value: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
    max_score_bytes: usize,
) -> Result<Tensor> {
    let dtype = query.dtype();
    let compute = statistics_dtype(dtype);
    let query = query.to_dtype(compute)?.contiguous()?;
    let key_t = key.to_dtype(compute)?.t()?.contiguous()?;
    let value = value.to_dtype(compute)?.contiguous()?;
    let mask = mask.map(|m| m.to_dtype(compute)).transpose()?;
    let rank = query.rank();
    let rows = query.dim(rank - 2)?;
    let keys = key_t.dim(D::Minus1)?;
    let batch_heads = query.elem_count() / (rows * query.dim(D::Minus1)?).max(1);
    let rows_per_block = (max_score_bytes / (batch_heads * keys * 4).max(1)).clamp(1, rows.max(1));
    let mut outputs = Vec::with_capacity(rows.div_ceil(rows_per_block));
    for start in (0..rows).step_by(rows_per_block) {
        let len = rows_per_block.min(rows - start);
        let q = if len == rows { query.clone() } else { query.narrow(rank - 2, start, len)? };
        let mut scores = (q.matmul(&key_t)? * scale)?;
        if let Some(mask) = &mask {
            // A mask with a row per query is cut to the block; a broadcast row is kept whole.
            let mask_rank = mask.rank();
            let block_mask = if len != rows && mask_rank >= 2 && mask.dim(mask_rank - 2)? == rows {
                mask.narrow(mask_rank - 2, start, len)?
            } else {
                mask.clone()
            };
            scores = scores.broadcast_add(&block_mask)?;
        }
        // candle's fused softmax has no backward pass; when gradients are tracked, ours does.
        let probabilities = if scores.track_op() {
            softmax_last_dim_trainable(&scores)?
        } else {
            candle_nn::ops::softmax_last_dim(&scores)?
        };
        outputs.push(probabilities.matmul(&value)?);
    }
    let output = if outputs.len() == 1 { outputs.pop().unwrap_or_else(|| unreachable!()) } else { Tensor::cat(&outputs, rank - 2)? };
    Ok(output.to_dtype(dtype)?)
}

/// Softmax over the last dimension with a backward pass (candle's fused softmax has none).
fn softmax_last_dim_trainable(scores: &Tensor) -> candle_core::Result<Tensor> {
    scores.contiguous()?.apply_op1(SoftmaxLastDim)
}

/// Softmax over the last dimension of contiguous f32 or f64 input, as candle's
/// `softmax_last_dim` computes it (subtract the row maximum, exponentiate, divide by the
/// sum), with a backward pass: ∂x = y · (g - Σ g·y) per row.
struct SoftmaxLastDim;

impl candle_core::CustomOp1 for SoftmaxLastDim {
    fn name(&self) -> &'static str {
        "softmax-last-dim-trainable"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("softmax: input must be contiguous");
        };
        let row_len = layout.dims().last().copied().unwrap_or(1).max(1);
        macro_rules! softmax {
            ($data:expr, $float:ty) => {{
                let mut output = $data[start..end].to_vec();
                for row in output.chunks_exact_mut(row_len) {
                    let max = row.iter().copied().fold(<$float>::NEG_INFINITY, <$float>::max);
                    let mut sum: $float = 0.0;
                    for value in row.iter_mut() {
                        *value = (*value - max).exp();
                        sum += *value;
                    }
                    for value in row.iter_mut() {
                        *value /= sum;
                    }
                }
                output
            }};
        }
        let output = match storage {
            CpuStorage::F32(data) => {
                let mut output = data[start..end].to_vec();
                fused::softmax_rows_in_place(&mut output, row_len);
                CpuStorage::F32(output)
            }
            CpuStorage::F64(data) => CpuStorage::F64(softmax!(data, f64)),
            _ => candle_core::bail!("softmax: only f32 and f64 are supported"),
        };
        Ok((output, layout.shape().clone()))
    }

    fn bwd(&self, _input: &Tensor, output: &Tensor, grad_output: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let _timer = profile::timer("softmax backward");
        if output.dtype() == DType::F32 && output.device().is_cpu() {
            return Ok(Some(output.apply_op2_no_bwd(&grad_output.contiguous()?, &fused::SoftmaxBackward)?));
        }
        let dot = (grad_output * output)?.sum_keepdim(D::Minus1)?;
        Ok(Some((grad_output.broadcast_sub(&dot)? * output)?))
    }
}

/// `torch.nn.functional.interpolate(mode="nearest")` to `(height, width)`. For training on
/// the CPU in f32, by whole factors, one threaded pass with a backward pass that sums each
/// block; otherwise candle's. (At inference candle's pass is as fast, and a 512×512 VAE
/// decode peaked 0.26 GB higher with the threaded one.)
pub fn upsample_nearest2d(input: &Tensor, height: usize, width: usize) -> Result<Tensor> {
    let (_, _, input_height, input_width) = input.dims4()?;
    let whole = input_height > 0 && input_width > 0 && height.is_multiple_of(input_height) && width.is_multiple_of(input_width);
    if whole && input.track_op() && uses_kernels(input.device()) && input.dtype() == DType::F32 {
        let op = fused::UpsampleNearest { scale_h: height / input_height, scale_w: width / input_width };
        return Ok(input.contiguous()?.apply_op1(op)?);
    }
    // candle 0.11's backward pass of this op replaces its input's gradient instead of adding
    // to it, losing the gradient of the input's other uses (a resnet that upsamples its input
    // also normalises it). Upsampling a reshaped view, a node of its own (no copy), keeps them.
    let input = if input.track_op() { input.reshape(input.shape())? } else { input.clone() };
    Ok(input.upsample_nearest2d(height, width)?)
}

/// `torch.nn.functional.silu`: `x * sigmoid(x)`; on the CPU in f32 one vectorised, threaded
/// pass, with a fused backward pass for training.
pub fn silu(input: &Tensor) -> Result<Tensor> {
    let _timer = profile::timer("silu");
    if uses_kernels(input.device()) && input.dtype() == DType::F32 {
        let input = input.contiguous()?;
        return Ok(if input.track_op() { input.apply_op1(fused::Silu)? } else { input.apply_op1_no_bwd(&fused::Silu)? });
    }
    Ok(input.silu()?)
}

/// OpenAI CLIP's `quick_gelu`, `x · sigmoid(1.702 x)`: on the CPU in f32 at inference one
/// vectorised, threaded pass; otherwise (and for training) tensor operations.
pub fn quick_gelu(input: &Tensor) -> Result<Tensor> {
    let _timer = profile::timer("quick_gelu");
    if uses_kernels(input.device()) && input.dtype() == DType::F32 && !input.track_op() {
        return Ok(input.contiguous()?.apply_op1_no_bwd(&fused::QuickGelu)?);
    }
    Ok((input * candle_nn::ops::sigmoid(&(input * 1.702)?)?)?)
}

/// diffusers' `GEGLU` after its projection: `projected` (`[..., 2·D]`) is split into a value
/// and a gate half, and the result (`[..., D]`) is `value · gelu(gate)` with the exact (erf)
/// GELU. On the CPU in f32 one fused, threaded pass, with a fused backward pass for training.
pub fn geglu(projected: &Tensor) -> Result<Tensor> {
    let _timer = profile::timer("geglu");
    if uses_kernels(projected.device()) && projected.dtype() == DType::F32 {
        let projected = projected.contiguous()?;
        return Ok(if projected.track_op() { projected.apply_op1(fused::Geglu)? } else { projected.apply_op1_no_bwd(&fused::Geglu)? });
    }
    let chunks = projected.chunk(2, D::Minus1)?;
    Ok((&chunks[0] * chunks[1].gelu_erf()?)?)
}

/// `torch.nn.functional.layer_norm` over the last dimension with affine `weight` and `bias`;
/// statistics in f32 (mean, then the mean squared deviation), as PyTorch does.
///
/// On the CPU with f32 input, one threaded pass (statistics in f64) with a fused backward
/// pass for training; elsewhere, tensor operations.
pub fn layer_norm(input: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let _timer = profile::timer("layer_norm");
    let width = input.dims().last().copied().unwrap_or(0);
    if uses_kernels(input.device()) && input.dtype() == DType::F32 && weight.dims() == [width] && bias.dims() == [width] {
        let f32_contiguous = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::F32)?.contiguous()?) };
        let (input, weight, bias) = (input.contiguous()?, f32_contiguous(weight)?, f32_contiguous(bias)?);
        let op = fused::LayerNorm { eps };
        let tracked = input.track_op() || weight.track_op() || bias.track_op();
        return Ok(if tracked { input.apply_op3(&weight, &bias, op)? } else { input.apply_op3_no_bwd(&weight, &bias, &op)? });
    }
    let dtype = input.dtype();
    let compute = statistics_dtype(dtype);
    let x = input.to_dtype(compute)?;
    let size = x.dim(D::Minus1)? as f64;
    let mean = (x.sum_keepdim(D::Minus1)? / size)?;
    let centered = x.broadcast_sub(&mean)?;
    let variance = (centered.sqr()?.sum_keepdim(D::Minus1)? / size)?;
    let normalized = centered.broadcast_div(&(variance + eps)?.sqrt()?)?;
    let output = normalized.broadcast_mul(&weight.to_dtype(compute)?)?.broadcast_add(&bias.to_dtype(compute)?)?;
    Ok(output.to_dtype(dtype)?)
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, IndexOp};

    use super::*;

    /// Row blocks must give exactly what one block gives.
    #[test]
    fn blocked_attention_matches_whole() {
        let device = Device::Cpu;
        let q = Tensor::randn(0f32, 1f32, (1, 2, 300, 8), &device).unwrap();
        let k = Tensor::randn(0f32, 1f32, (1, 2, 200, 8), &device).unwrap();
        let v = Tensor::randn(0f32, 1f32, (1, 2, 200, 8), &device).unwrap();
        let mask = Tensor::randn(0f32, 1f32, (300, 200), &device).unwrap();
        let whole = |mask: Option<&Tensor>| {
            let mut scores = (q.matmul(&k.t().unwrap()).unwrap() * 0.3).unwrap();
            if let Some(m) = mask {
                scores = scores.broadcast_add(m).unwrap();
            }
            candle_nn::ops::softmax_last_dim(&scores).unwrap().matmul(&v).unwrap()
        };
        // 64 rows per block (2 heads × 200 keys × 4 bytes each): five blocks, the last partial.
        let blocked = |mask: Option<&Tensor>| attention_in_blocks(&q, &k, &v, 0.3, mask, 2 * 200 * 4 * 64).unwrap();
        for m in [None, Some(&mask)] {
            let diff = (whole(m) - blocked(m)).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-6, "{diff}");
        }
    }

    fn max_difference(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    /// The flash kernel (taken for inference) gives what the score-matrix path gives, with
    /// and without the `[L, S]` mask, and in f16 through f32.
    #[test]
    fn flash_attention_matches_score_matrix_path() -> Result<()> {
        let device = Device::Cpu;
        let q = Tensor::randn(0f32, 1f32, (2, 3, 70, 40), &device)?;
        let k = Tensor::randn(0f32, 1f32, (2, 3, 300, 40), &device)?;
        let v = Tensor::randn(0f32, 1f32, (2, 3, 300, 40), &device)?;
        let mask = Tensor::randn(0f32, 1f32, (70, 300), &device)?;
        for m in [None, Some(&mask)] {
            let flash = flash_attention(&q, &k, &v, 0.3, m, Precision::F32)?.expect("the flash kernel applies");
            let blocked = attention_in_blocks(&q, &k, &v, 0.3, m, MAX_SCORE_BYTES)?;
            assert!(max_difference(&flash, &blocked) < 1e-5);
        }
        let half = |t: &Tensor| t.to_dtype(DType::F16).unwrap();
        let flash = flash_attention(&half(&q), &half(&k), &half(&v), 0.3, None, Precision::F32)?.expect("applies");
        assert_eq!(flash.dtype(), DType::F16);
        // A tracked operand (training) takes the trainable kernel without a mask, candle's
        // differentiable path with one.
        let var = candle_core::Var::from_tensor(&q)?;
        let trained = flash_attention(var.as_tensor(), &k, &v, 0.3, None, Precision::F32)?.expect("the training kernel applies");
        assert!(max_difference(&trained, &attention_in_blocks(&q, &k, &v, 0.3, None, MAX_SCORE_BYTES)?) < 1e-5);
        assert!(flash_attention(var.as_tensor(), &k, &v, 0.3, Some(&mask), Precision::F32)?.is_none());
        Ok(())
    }

    /// The linear layer's kernel path agrees with candle's matmul.
    #[test]
    fn linear_kernel_matches_matmul() -> Result<()> {
        let device = Device::Cpu;
        let x = Tensor::randn(0f32, 1f32, (2, 37, 65), &device)?;
        let w = Tensor::randn(0f32, 1f32, (33, 65), &device)?;
        let b = Tensor::randn(0f32, 1f32, 33, &device)?;
        let got = linear(&x, &w, Some(&b))?;
        let want = x.reshape((74, 65))?.matmul(&w.t()?)?.broadcast_add(&b)?.reshape((2, 37, 33))?;
        assert!(max_difference(&got, &want) < 1e-4);
        let x_silu = silu(&x)?;
        assert!(max_difference(&x_silu, &x.silu()?) < 1e-5);
        // bf16 weights, as a tensor and packed at load: the product of the rounded operands.
        let w16 = w.to_dtype(DType::BF16)?;
        let x16 = x.to_dtype(DType::BF16)?.to_dtype(DType::F32)?;
        let want = x16.reshape((74, 65))?.matmul(&w16.to_dtype(DType::F32)?.t()?)?.broadcast_add(&b)?.reshape((2, 37, 33))?;
        assert!(max_difference(&linear(&x, &w16, Some(&b))?, &want) < 1e-3);
        let packed = std::sync::Arc::new(PackedLinearWeight::new(&w16)?.expect("a bf16 CPU weight packs"));
        assert!(max_difference(&linear_packed(&x, &packed, Some(&b))?, &want) < 1e-3);
        // f32 weights packed at load: the same sums as the product that packs per call.
        let packed = std::sync::Arc::new(PackedLinearWeight::new(&w)?.expect("an f32 CPU weight packs"));
        assert_eq!(packed.dtype(), DType::F32);
        let got = linear_packed(&x, &packed, Some(&b))?;
        assert_eq!(got.flatten_all()?.to_vec1::<f32>()?, linear(&x, &w, Some(&b))?.flatten_all()?.to_vec1::<f32>()?);
        // A weight that training updates stays a tensor; a frozen one passes the input's
        // gradient on (G·W for loss = Σ output·G).
        assert!(PackedLinearWeight::new(candle_core::Var::from_tensor(&w)?.as_tensor())?.is_none());
        let x_var = candle_core::Var::from_tensor(&x)?;
        let probe = Tensor::randn(0f32, 1f32, (2, 37, 33), &device)?;
        let grads = (linear_packed(x_var.as_tensor(), &packed, Some(&b))? * &probe)?.sum_all()?.backward()?;
        let want = probe.reshape((74, 33))?.matmul(&w)?.reshape((2, 37, 65))?;
        assert!(max_difference(grads.get(x_var.as_tensor()).expect("an input gradient"), &want) < 1e-4);
        Ok(())
    }

    /// The fused CPU group norm agrees with the tensor-operation version (which other
    /// devices use), also on non-contiguous input and in half precision.
    #[test]
    fn fused_group_norm_matches_tensor_ops() -> Result<()> {
        let device = Device::Cpu;
        let input = Tensor::randn(0f32, 1.0, (2, 6, 5, 7), &device)?.affine(3.0, 0.5)?;
        let weight = Tensor::randn(0f32, 1.0, 6, &device)?;
        let bias = Tensor::randn(0f32, 1.0, 6, &device)?;
        let check = |input: &Tensor, groups: usize, tolerance: f32| -> Result<()> {
            let fused = group_norm(input, groups, &weight, &bias, 1e-6)?.to_dtype(DType::F32)?;
            let reference = group_norm_from_tensor_ops(input, groups, &weight, &bias, 1e-6)?.to_dtype(DType::F32)?;
            assert_eq!(fused.dims(), input.dims());
            let difference = (fused - reference)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert!(difference <= tolerance, "{groups} groups: max difference {difference}");
            Ok(())
        };
        check(&input, 3, 1e-5)?;
        check(&input, 1, 1e-5)?;
        check(&input, 6, 1e-5)?;
        // [B, C, L] seen through a transpose, as the attention's sequences are.
        let sequence = input.reshape((2, 6, 35))?.i((.., .., 1..))?;
        check(&sequence, 2, 1e-5)?;
        check(&input.to_dtype(DType::F16)?, 3, 1e-2)?;
        Ok(())
    }
}
