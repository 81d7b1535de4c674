//! Element-wise work on f32 slices, written as plain loops that the compiler vectorises, and
//! compiled once per instruction set (the `isa` argument picks the copy this CPU can run).

use super::gemm::Isa;

/// `e^x` in f32 to about 1 ulp (Cephes' `expf`: x = n·ln 2 + r with |r| ≤ ln 2 / 2, a degree-6
/// polynomial in r, then 2ⁿ put into the exponent bits), written so that the compiler
/// vectorises a loop over it. 0 below -87.3 (where e^x leaves the normal range).
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so that n·LN2_HI is exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let clamped = x.clamp(-87.3, 88.7);
    // Round to nearest by adding and subtracting 1.5·2²³ (a plain `round` may become a libm
    // call, which does not vectorise).
    const ROUNDING: f32 = 12_582_912.0;
    let shifted = clamped * LOG2_E + ROUNDING;
    let n = shifted - ROUNDING;
    let r = clamped - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_2e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.000_000_1e-1;
    let y = p * r * r + r + 1.0;
    // 2ⁿ from `shifted`'s low mantissa bits, which hold n (its ulp is 1 there): integer lane
    // arithmetic, where `n as i32` would saturate lane by lane in scalar code.
    let two_to_n = f32::from_bits(shifted.to_bits().wrapping_sub(ROUNDING.to_bits()).wrapping_add(127) << 23);
    let scaled = y * two_to_n;
    if x < -87.3 {
        0.0
    } else {
        scaled
    }
}

/// Runs `body` compiled for `isa` (AVX-512, AVX2 + FMA, or the baseline).
macro_rules! dispatch {
    ($isa:expr, fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty $body:block) => {{
        // Inlined into each copy below, so that each is compiled for its instruction set.
        #[inline(always)]
        fn generic($($arg: $ty),*) -> $ret $body
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f")]
            fn avx512($($arg: $ty),*) -> $ret { generic($($arg),*) }
            #[target_feature(enable = "avx2,fma")]
            fn avx2($($arg: $ty),*) -> $ret { generic($($arg),*) }
            match $isa {
                // SAFETY: `isa` is a level this CPU supports (from `gemm::isa()` or, in tests,
                // `Isa::all_supported()`); the function body is safe code.
                Isa::Avx512 | Isa::Avx512Bf16 | Isa::Amx => unsafe { avx512($($arg),*) },
                // SAFETY: as above.
                Isa::Avx2 => unsafe { avx2($($arg),*) },
                Isa::Portable => generic($($arg),*),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = $isa;
            generic($($arg),*)
        }
    }};
}

/// `Σ term(v)` over `values` in f64, in eight running sums: one chain of f64 adds waits for
/// each add in turn, eight pipeline and vectorise. Inlined into the `dispatch!` copies, and every
/// level adds the same lanes in the same order, so the result does not depend on the level.
#[inline(always)]
fn lane_sum_f64(values: &[f32], term: impl Fn(f32) -> f64) -> f64 {
    let mut lanes = [0f64; 8];
    let (chunks, rest) = values.as_chunks::<8>();
    for chunk in chunks {
        lanes.iter_mut().zip(chunk).for_each(|(lane, &v)| *lane += term(v));
    }
    lanes.iter().sum::<f64>() + rest.iter().map(|&v| term(v)).sum::<f64>()
}

/// `Σ values` in f64 ([`lane_sum_f64`]).
pub(crate) fn sum_f64(isa: Isa, values: &[f32]) -> f64 {
    dispatch!(isa, fn sum_f64(values: &[f32]) -> f64 { lane_sum_f64(values, |v| v as f64) })
}

/// The mean of `values` and 1/sqrt(variance + eps), in f64, two passes ([`lane_sum_f64`]; a
/// GroupNorm group of the VAE's last blocks is a million values).
pub(crate) fn mean_and_inverse_std(isa: Isa, values: &[f32], eps: f64) -> (f64, f64) {
    dispatch!(isa, fn mean_and_inverse_std(values: &[f32], eps: f64) -> (f64, f64) {
        let len = values.len() as f64;
        let mean = lane_sum_f64(values, |v| v as f64) / len;
        let variance = lane_sum_f64(values, |v| (v as f64 - mean).powi(2)) / len;
        (mean, 1.0 / (variance + eps).sqrt())
    })
}

/// The scalars of one AdamW update, rounded to f32 where torch multiplies a float32 tensor by
/// them (see `training::optimizer::AdamW::update`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct AdamWScalars {
    /// `1 - lr · weight_decay`, applied when `decay`.
    pub decay_factor: f32,
    pub decay: bool,
    /// `1 - beta1`.
    pub lerp_weight: f32,
    pub beta2: f32,
    pub one_minus_beta2: f32,
    pub bias_correction2_sqrt: f32,
    pub eps: f32,
    pub negative_step_size: f32,
}

/// AdamW's element-wise update of one parameter `p` with its gradient `g` and moments `m`,
/// `v`, in place, in ATen's order and fused multiply-adds (so the same bits on every level:
/// the fused multiply-add is exact, and so are the vector square root and division).
pub(crate) fn adamw_in_place(isa: Isa, s: AdamWScalars, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
    dispatch!(isa, fn adamw(s: AdamWScalars, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) -> () {
        // ATen's lerp: a fused multiply-add from the nearer end.
        let near_start = s.lerp_weight.abs() < 0.5;
        for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            if s.decay {
                *p *= s.decay_factor;
            }
            *m = if near_start { s.lerp_weight.mul_add(g - *m, *m) } else { (s.lerp_weight - 1.0).mul_add(g - *m, g) };
            // addcmul: self + value * t1 * t2, the last multiply fused with the add.
            *v = (s.one_minus_beta2 * g).mul_add(g, *v * s.beta2);
            let denominator = v.sqrt() / s.bias_correction2_sqrt + s.eps;
            // addcdiv: self + value * t1 / t2.
            *p += s.negative_step_size * *m / denominator;
        }
    })
}

/// diffusers' `EMAModel.step` on one parameter: `shadow -= one_minus_decay · (shadow - param)`,
/// three float32 operations as torch does them (nothing fused).
pub(crate) fn ema_in_place(isa: Isa, one_minus_decay: f32, shadow: &mut [f32], param: &[f32]) {
    dispatch!(isa, fn ema(one_minus_decay: f32, shadow: &mut [f32], param: &[f32]) -> () {
        for (s, &p) in shadow.iter_mut().zip(param) {
            *s -= one_minus_decay * (*s - p);
        }
    })
}

/// `x · sigmoid(x)` in place, as `x / (1 + e^-x)`.
pub(crate) fn silu_in_place(isa: Isa, values: &mut [f32]) {
    dispatch!(isa, fn silu(values: &mut [f32]) -> () {
        for x in values.iter_mut() {
            *x /= 1.0 + exp(-*x);
        }
    })
}

/// OpenAI CLIP's `quick_gelu`, `x · sigmoid(1.702 x)`, in place, as `x / (1 + e^(-1.702 x))`.
pub(crate) fn quick_gelu_in_place(isa: Isa, values: &mut [f32]) {
    dispatch!(isa, fn quick_gelu(values: &mut [f32]) -> () {
        for x in values.iter_mut() {
            *x /= 1.0 + exp(-1.702 * *x);
        }
    })
}

/// One block of FlashAttention's online softmax over transposed scores (`keys × rows`, a row
/// of `scores_t` per key): each column (query row) gets its new maximum over the block and
/// the old one, its scores become `exp(score - maximum)`, its sum is rescaled and grows by
/// them, and `correction` receives `exp(old maximum - new maximum)`. Columns with every score
/// so far -inf (masked) keep a sum of 0.
pub(crate) fn online_softmax_columns(isa: Isa, scores_t: &mut [f32], max: &mut [f32], sum: &mut [f32], correction: &mut [f32]) {
    dispatch!(isa, fn softmax(scores_t: &mut [f32], max: &mut [f32], sum: &mut [f32], correction: &mut [f32]) -> () {
        let rows = max.len();
        let mut new_max = max.to_vec();
        for scores in scores_t.chunks_exact(rows) {
            new_max.iter_mut().zip(scores).for_each(|(m, &s)| *m = m.max(s));
        }
        // A column with nothing but -inf so far shifts by 0: exp(-inf) = 0, never NaN.
        let shift: Vec<f32> = new_max.iter().map(|&m| if m == f32::NEG_INFINITY { 0.0 } else { m }).collect();
        for ((c, &old), &shift) in correction.iter_mut().zip(max.iter()).zip(&shift) {
            *c = exp(old - shift);
        }
        for (s, &c) in sum.iter_mut().zip(correction.iter()) {
            *s *= c;
        }
        for scores in scores_t.chunks_exact_mut(rows) {
            for ((score, &shift), s) in scores.iter_mut().zip(&shift).zip(sum.iter_mut()) {
                *score = exp(*score - shift);
                *s += *score;
            }
        }
        max.copy_from_slice(&new_max);
    })
}

/// Σ `term(i)` over `0..len` in eight running sums (lane `i % 8`), then the lanes in order and
/// the tail: the compiler keeps the lanes in one vector, where a single running sum waits
/// for each add in turn (floating-point addition is not reassociated for it).
#[inline(always)]
fn lane_sum(len: usize, term: impl Fn(usize) -> f32) -> f32 {
    let mut lanes = [0f32; 8];
    for chunk in 0..len / 8 {
        for (lane, sum) in lanes.iter_mut().enumerate() {
            *sum += term(chunk * 8 + lane);
        }
    }
    lanes.iter().sum::<f32>() + (len / 8 * 8..len).map(term).sum::<f32>()
}

/// `softmax(scale · row)` in place: subtract the maximum, then exponentiate and sum in one
/// pass, then multiply by the sum's inverse, each pass vectorised (the maximum and the sum lane
/// by lane).
pub(crate) fn softmax_row(isa: Isa, row: &mut [f32], scale: f32) {
    dispatch!(isa, fn softmax(row: &mut [f32], scale: f32) -> () {
        let mut lanes = [f32::NEG_INFINITY; 8];
        let (chunks, rest) = row.as_chunks::<8>();
        for chunk in chunks {
            for (lane, &v) in lanes.iter_mut().zip(chunk) {
                *lane = lane.max(v * scale);
            }
        }
        let max = lanes.into_iter().chain(rest.iter().map(|&v| v * scale)).fold(f32::NEG_INFINITY, f32::max);
        // A row of -inf (all masked) stays finite: exp(-inf - -inf) would be NaN.
        let shift = if max == f32::NEG_INFINITY { 0.0 } else { max };
        // Exponentiate and sum in one pass, in the eight lanes `lane_sum` would use.
        let mut lanes = [0f32; 8];
        let (chunks, rest) = row.as_chunks_mut::<8>();
        for chunk in chunks {
            for (lane, v) in lanes.iter_mut().zip(chunk) {
                *v = exp(*v * scale - shift);
                *lane += *v;
            }
        }
        rest.iter_mut().for_each(|v| *v = exp(*v * scale - shift));
        let sum = lanes.iter().sum::<f32>() + rest.iter().sum::<f32>();
        let inverse = 1.0 / sum;
        row.iter_mut().for_each(|v| *v *= inverse);
    })
}

/// The softmax's backward pass for one row: `out = scale · y · (g - Σ g·y)` from its output
/// `y` and the output's gradient `g`.
pub(crate) fn softmax_backward_row(isa: Isa, y: &[f32], g: &[f32], out: &mut [f32], scale: f32) {
    dispatch!(isa, fn backward(y: &[f32], g: &[f32], out: &mut [f32], scale: f32) -> () {
        let dot = lane_sum(y.len().min(g.len()), |i| y[i] * g[i]);
        for ((out, &y), &g) in out.iter_mut().zip(y).zip(g) {
            *out = y * (g - dot) * scale;
        }
    })
}

/// `erf(x)` to within 1.5e-7 (Abramowitz and Stegun 7.1.26), built on [`exp`].
#[inline(always)]
fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t * (0.254_829_6 + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152_1 + t * 1.061_405_4))));
    let y = 1.0 - poly * exp(-a * a);
    if x < 0.0 {
        -y
    } else {
        y
    }
}

/// diffusers' GEGLU after its projection: each row of `projected` is `[value | gate]` (two
/// halves of `out`'s row width), and `out = value · gelu(gate)` with the exact (erf) GELU.
pub(crate) fn geglu_rows(isa: Isa, projected: &[f32], out: &mut [f32]) {
    dispatch!(isa, fn geglu(projected: &[f32], out: &mut [f32]) -> () {
        let width = out.len();
        let (value, gate) = projected.split_at(width);
        for ((out, &v), &g) in out.iter_mut().zip(value).zip(gate) {
            *out = v * (0.5 * g * (1.0 + erf(g * std::f32::consts::FRAC_1_SQRT_2)));
        }
    })
}

/// SiLU's backward pass: `out = g · s · (1 + x · (1 - s))` with `s = sigmoid(x)`, the
/// derivative of `x · s` times the output's gradient `g`.
pub(crate) fn silu_backward(isa: Isa, x: &[f32], g: &[f32], out: &mut [f32]) {
    dispatch!(isa, fn silu_backward(x: &[f32], g: &[f32], out: &mut [f32]) -> () {
        for ((out, &x), &g) in out.iter_mut().zip(x).zip(g) {
            let s = 1.0 / (1.0 + exp(-x));
            *out = g * s * (1.0 + x * (1.0 - s));
        }
    })
}

/// A GroupNorm channel's output, `out = x · scale + shift`, then SiLU when `silu` (the same
/// f32 operations as [`silu_backward_at_affine`] repeats to recompute it).
pub(crate) fn affine_then_silu(isa: Isa, x: &[f32], scale: f32, shift: f32, silu: bool, out: &mut [f32]) {
    dispatch!(isa, fn affine(x: &[f32], scale: f32, shift: f32, silu: bool, out: &mut [f32]) -> () {
        for (out, &x) in out.iter_mut().zip(x) {
            *out = x * scale + shift;
        }
        if silu {
            for y in out.iter_mut() {
                *y /= 1.0 + exp(-*y);
            }
        }
    })
}

/// SiLU's backward pass at a GroupNorm channel's output `x · scale + shift` (recomputed as
/// [`affine_then_silu`] computes it): `out = g · silu'(x · scale + shift)`.
pub(crate) fn silu_backward_at_affine(isa: Isa, x: &[f32], scale: f32, shift: f32, g: &[f32], out: &mut [f32]) {
    dispatch!(isa, fn silu_backward(x: &[f32], scale: f32, shift: f32, g: &[f32], out: &mut [f32]) -> () {
        for ((out, &x), &g) in out.iter_mut().zip(x).zip(g) {
            let y = x * scale + shift;
            let s = 1.0 / (1.0 + exp(-y));
            *out = g * s * (1.0 + y * (1.0 - s));
        }
    })
}

/// `(Σ d, Σ d·x)` in f64, eight running sums each ([`lane_sum_f64`]'s order on every level).
pub(crate) fn sum_and_dot_f64(isa: Isa, d: &[f32], x: &[f32]) -> (f64, f64) {
    dispatch!(isa, fn sum_and_dot(d: &[f32], x: &[f32]) -> (f64, f64) {
        let (mut lanes_d, mut lanes_dx) = ([0f64; 8], [0f64; 8]);
        let ((d8, d_rest), (x8, x_rest)) = (d.as_chunks::<8>(), x.as_chunks::<8>());
        for (d, x) in d8.iter().zip(x8) {
            for lane in 0..8 {
                lanes_d[lane] += d[lane] as f64;
                lanes_dx[lane] += d[lane] as f64 * x[lane] as f64;
            }
        }
        let (mut sum_d, mut sum_dx) = (lanes_d.iter().sum::<f64>(), lanes_dx.iter().sum::<f64>());
        for (&d, &x) in d_rest.iter().zip(x_rest) {
            sum_d += d as f64;
            sum_dx += d as f64 * x as f64;
        }
        (sum_d, sum_dx)
    })
}

/// GroupNorm's input gradient for one channel, `out = a·d + (b·x + c)`, with `d` from
/// `d`, or from `out` itself where it already holds it (`None`).
pub(crate) fn group_norm_input_gradient(isa: Isa, a: f32, b: f32, c: f32, x: &[f32], d: Option<&[f32]>, out: &mut [f32]) {
    dispatch!(isa, fn input_gradient(a: f32, b: f32, c: f32, x: &[f32], d: Option<&[f32]>, out: &mut [f32]) -> () {
        match d {
            Some(d) => out.iter_mut().zip(x).zip(d).for_each(|((out, &x), &d)| *out = a * d + (b * x + c)),
            None => out.iter_mut().zip(x).for_each(|(d, &x)| *d = a * *d + (b * x + c)),
        }
    })
}

/// GEGLU's backward pass for one row: with `[value | gate]` = `projected` and the output's
/// gradient `g`, `out = [g · gelu(gate) | g · value · gelu'(gate)]`, where
/// `gelu'(x) = Φ(x) + x · φ(x)` (Φ, φ: the normal CDF and density).
pub(crate) fn geglu_backward_rows(isa: Isa, projected: &[f32], g: &[f32], out: &mut [f32]) {
    dispatch!(isa, fn geglu_backward(projected: &[f32], g: &[f32], out: &mut [f32]) -> () {
        const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;
        let width = g.len();
        let (value, gate) = projected.split_at(width);
        let (grad_value, grad_gate) = out.split_at_mut(width);
        for ((((dv, dg), &v), &x), &g) in grad_value.iter_mut().zip(grad_gate.iter_mut()).zip(value).zip(gate).zip(g) {
            let cdf = 0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2));
            let density = FRAC_1_SQRT_2PI * exp(-0.5 * x * x);
            *dv = g * x * cdf;
            *dg = g * v * (cdf + x * density);
        }
    })
}

/// `x` rounded to the nearest bf16 (ties to even) in the high half of the result (NaN stays
/// a quiet NaN), in 32-bit lane arithmetic that vectorises.
#[inline(always)]
pub(crate) fn bf16_high_half(x: f32) -> u32 {
    let bits = x.to_bits();
    let rounded = bits.wrapping_add(0x7FFF + ((bits >> 16) & 1));
    if x.is_nan() {
        bits | 0x0040_0000
    } else {
        rounded
    }
}

/// `out[j]` = the bf16 pair word of `(even[j], odd[j])` (`even` in the low half), or of
/// `(even[j], 0)` without `odd`.
pub(crate) fn round_pairs(isa: Isa, even: &[f32], odd: Option<&[f32]>, out: &mut [u32]) {
    dispatch!(isa, fn round(even: &[f32], odd: Option<&[f32]>, out: &mut [u32]) -> () {
        match odd {
            Some(odd) => {
                for ((word, &e), &o) in out.iter_mut().zip(even).zip(odd) {
                    *word = (bf16_high_half(o) & 0xFFFF_0000) | (bf16_high_half(e) >> 16);
                }
            }
            None => {
                for (word, &e) in out.iter_mut().zip(even) {
                    *word = bf16_high_half(e) >> 16;
                }
            }
        }
    })
}

/// `out[q]` = the bf16 pair word of `(values[2q], values[2q + 1])`, the second zero past the
/// end of an odd-length `values` (a row of activations, rounded as it is packed).
pub(crate) fn round_adjacent_pairs(isa: Isa, values: &[f32], out: &mut [u32]) {
    dispatch!(isa, fn round(values: &[f32], out: &mut [u32]) -> () {
        let (pairs, rest) = values.as_chunks::<2>();
        for (word, &[even, odd]) in out.iter_mut().zip(pairs) {
            *word = (bf16_high_half(odd) & 0xFFFF_0000) | (bf16_high_half(even) >> 16);
        }
        if let (Some(&even), Some(word)) = (rest.first(), out.get_mut(pairs.len())) {
            *word = bf16_high_half(even) >> 16;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate() {
        for i in -2000..=2000 {
            let x = i as f32 * 0.0437;
            let (got, want) = (exp(x) as f64, (x as f64).exp());
            // Below -87.3 the result would be subnormal: it is flushed to 0.
            let tolerance = if x < -87.3 { 1.3e-38 } else { 3e-7 * want };
            assert!((got - want).abs() <= tolerance, "{x}: {got} vs {want}");
        }
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
    }

    /// The optimizer's passes give the same bits at every level as the scalar code (whose
    /// fused multiply-adds are libm's `fmaf`), for both ends of the lerp, with and without decay.
    #[test]
    fn adamw_and_ema_are_the_same_at_every_level() {
        let values = |seed: usize, n: usize| -> Vec<f32> { (0..n).map(|i| (((i * 7919 + seed * 104_729) % 2000) as f32 - 1000.0) * 1.3e-3).collect() };
        let n = 333;
        for (lerp_weight, decay) in [(0.1, true), (0.7, false)] {
            let scalars = AdamWScalars {
                decay_factor: 0.999_9,
                decay,
                lerp_weight,
                beta2: 0.999,
                one_minus_beta2: 1.0e-3,
                bias_correction2_sqrt: 0.044_7,
                eps: 1e-8,
                negative_step_size: -1.0e-3,
            };
            let run = |isa: Isa| {
                let (mut p, g, mut m, mut v) = (values(1, n), values(2, n), values(3, n), values(4, n).iter().map(|x| x * x).collect::<Vec<_>>());
                adamw_in_place(isa, scalars, &mut p, &g, &mut m, &mut v);
                let mut shadow = values(5, n);
                ema_in_place(isa, 0.013, &mut shadow, &p);
                [p, m, v, shadow].map(|x| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>())
            };
            let want = run(Isa::Portable);
            for isa in Isa::all_supported() {
                assert!(run(isa) == want, "{isa:?}, lerp weight {lerp_weight}");
            }
        }
    }

    #[test]
    fn geglu_matches_the_definition_at_every_level() {
        let width = 300;
        let projected: Vec<f32> = (0..2 * width).map(|i| (i as f32 - 300.0) * 0.031).collect();
        for isa in Isa::all_supported() {
            let mut out = vec![0f32; width];
            geglu_rows(isa, &projected, &mut out);
            for (j, &y) in out.iter().enumerate() {
                let (v, g) = (projected[j] as f64, projected[width + j] as f64);
                let want = v * 0.5 * g * (1.0 + libm_erf(g / std::f64::consts::SQRT_2));
                assert!((y as f64 - want).abs() <= 2e-6 * (1.0 + want.abs()), "{isa:?} at {j}: {y} vs {want}");
            }
        }
    }

    /// erf in f64: its Taylor series below 3, the asymptotic series of erfc above (each
    /// accurate to about 1e-10 there), for the reference.
    fn libm_erf(x: f64) -> f64 {
        if x.abs() >= 3.0 {
            let z = x.abs();
            let z2 = z * z;
            let erfc = (-z2).exp() / (z * std::f64::consts::PI.sqrt())
                * (1.0 - 1.0 / (2.0 * z2) + 3.0 / (4.0 * z2 * z2) - 15.0 / (8.0 * z2 * z2 * z2) + 105.0 / (16.0 * z2.powi(4)));
            return x.signum() * (1.0 - erfc);
        }
        let (mut term, mut sum, mut n) = (x, x, 0.0);
        while term.abs() > 1e-17 * sum.abs().max(1e-300) {
            n += 1.0;
            term *= -x * x / n;
            sum += term / (2.0 * n + 1.0);
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn silu_matches_the_definition_at_every_level() {
        let inputs: Vec<f32> = (-300..300).map(|i| i as f32 * 0.37).collect();
        for isa in Isa::all_supported() {
            let mut values = inputs.clone();
            silu_in_place(isa, &mut values);
            for (&x, &y) in inputs.iter().zip(&values) {
                let want = x as f64 / (1.0 + (-x as f64).exp());
                assert!((y as f64 - want).abs() <= 1e-6 * (1.0 + want.abs()), "{isa:?} silu({x}) = {y}, want {want}");
            }
        }
    }

    /// The backward passes of SiLU and GEGLU against their derivatives in f64, at every level.
    #[test]
    fn silu_and_geglu_gradients_match_the_derivatives_at_every_level() {
        let width = 300;
        let x: Vec<f32> = (0..2 * width).map(|i| (i as f32 - 300.0) * 0.031).collect();
        let g: Vec<f32> = (0..2 * width).map(|i| ((i * 7) % 11) as f32 * 0.3 - 1.5).collect();
        let phi = |x: f64| 0.5 * (1.0 + libm_erf(x / std::f64::consts::SQRT_2));
        let density = |x: f64| (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
        for isa in Isa::all_supported() {
            let mut out = vec![0f32; 2 * width];
            silu_backward(isa, &x, &g, &mut out);
            for ((&x, &g), &y) in x.iter().zip(&g).zip(&out) {
                let (x, g) = (x as f64, g as f64);
                let s = 1.0 / (1.0 + (-x).exp());
                let want = g * s * (1.0 + x * (1.0 - s));
                assert!((y as f64 - want).abs() <= 1e-6 * (1.0 + want.abs()), "{isa:?} silu'({x}): {y} vs {want}");
            }
            geglu_backward_rows(isa, &x, &g[..width], &mut out);
            for j in 0..width {
                let (v, gate, g) = (x[j] as f64, x[width + j] as f64, g[j] as f64);
                let (want_value, want_gate) = (g * gate * phi(gate), g * v * (phi(gate) + gate * density(gate)));
                for (got, want) in [(out[j], want_value), (out[width + j], want_gate)] {
                    assert!((got as f64 - want).abs() <= 2e-6 * (1.0 + want.abs()), "{isa:?} geglu' at {j}: {got} vs {want}");
                }
            }
        }
    }
}
