//! How close the kernels come to the machine's limit: a probe of the peak multiply-add rate
//! of each instruction set (independent FMA chains in registers, on every thread), and the
//! GFLOP/s of the GEMM, convolution and attention kernels on Stable Diffusion's shapes.
//! `diffuse bench --kernels` prints both.

use std::time::Instant;

use rayon::prelude::*;

use super::attention::{self, AttentionDims};
use super::conv::{self, Geometry};
use super::gemm::{self, ASource, Init, Isa, MatRef, PackedA};
use super::gemm_bf16::{self, ABf16, Bf16Matrix, RoundedB};
use super::Precision;

/// One kernel's measured rate.
#[derive(Debug, Clone)]
pub struct Rate {
    /// The kernel's name.
    pub name: String,
    /// Its measured rate, in GFLOP/s.
    pub gflops: f64,
    /// The measured peak of the instructions it runs on (f32 FMA, or the bf16 dot product).
    pub peak_gflops: f64,
}

/// The peak f32 GFLOP/s of `isa` on all rayon threads: 12 independent accumulator chains per
/// thread (enough to cover the FMA latency on two pipes), `iterations` steps each.
pub fn peak_gflops(isa: Isa, iterations: usize) -> f64 {
    let threads = rayon::current_num_threads();
    let start = Instant::now();
    let lanes: usize = (0..threads).into_par_iter().map(|_| fma_chains(isa, iterations)).sum();
    (2.0 * lanes as f64 * iterations as f64 * 12.0) / start.elapsed().as_secs_f64() / 1e9
}

/// Runs the chains and returns the lanes per vector (the work done is
/// `iterations × 12 × lanes` multiply-adds).
fn fma_chains(isa: Isa, iterations: usize) -> usize {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::*;
        macro_rules! chains {
            ($feature:literal, $vector:ty, $lanes:expr, $set1:ident, $fmadd:ident, $store:ident) => {{
                #[target_feature(enable = $feature)]
                fn run(iterations: usize) -> f32 {
                    let mut acc = [$set1(0.0); 12];
                    let (a, b) = ($set1(0.999_999), $set1(1e-7));
                    for _ in 0..iterations {
                        for acc in acc.iter_mut() {
                            *acc = $fmadd(*acc, a, b);
                        }
                    }
                    let mut out = [0f32; $lanes];
                    let mut sum = 0.0;
                    for acc in acc {
                        // SAFETY: `out` has room for one vector of `$lanes` floats.
                        unsafe { $store(out.as_mut_ptr(), acc) };
                        sum += out[0];
                    }
                    sum
                }
                // SAFETY: `isa` is supported by this CPU (the caller's contract, checked by
                // `Isa::is_supported` in `rates`).
                std::hint::black_box(unsafe { run(iterations) });
                $lanes
            }};
        }
        match isa {
            Isa::Avx512 | Isa::Avx512Bf16 | Isa::Amx => return chains!("avx512f", __m512, 16, _mm512_set1_ps, _mm512_fmadd_ps, _mm512_storeu_ps),
            Isa::Avx2 => return chains!("avx2,fma", __m256, 8, _mm256_set1_ps, _mm256_fmadd_ps, _mm256_storeu_ps),
            Isa::Portable => {}
        }
    }
    let mut acc = [0f32; 12];
    for _ in 0..iterations {
        for acc in acc.iter_mut() {
            *acc = acc.mul_add(0.999_999, 1e-7);
        }
    }
    std::hint::black_box(acc);
    1
}

/// The peak bf16 GFLOP/s of `vdpbf16ps` on all rayon threads (12 chains per thread, each
/// instruction 32 products and 32 additions), or `None` without AVX512-BF16.
pub fn peak_bf16_gflops(iterations: usize) -> Option<f64> {
    if !Isa::Avx512Bf16.is_supported() {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::*;
        #[target_feature(enable = "avx512f,avx512bf16")]
        fn run(iterations: usize) -> f32 {
            let mut acc = [_mm512_setzero_ps(); 12];
            // SAFETY: __m512 and __m512bh are both 64-byte vectors of plain bits.
            let (a, b): (__m512bh, __m512bh) = unsafe { (std::mem::transmute(_mm512_set1_ps(0.5)), std::mem::transmute(_mm512_set1_ps(1e-3))) };
            for _ in 0..iterations {
                for acc in acc.iter_mut() {
                    *acc = _mm512_dpbf16_ps(*acc, a, b);
                }
            }
            acc.iter().map(|&v| _mm512_reduce_add_ps(v)).sum()
        }
        let threads = rayon::current_num_threads();
        let start = Instant::now();
        // SAFETY: AVX512-BF16 was checked above.
        (0..threads).into_par_iter().for_each(|_| {
            std::hint::black_box(unsafe { run(iterations) });
        });
        Some(64.0 * 12.0 * (threads * iterations) as f64 / start.elapsed().as_secs_f64() / 1e9)
    }
    #[cfg(not(target_arch = "x86_64"))]
    None
}

fn timed<T>(runs: usize, mut f: impl FnMut() -> T) -> f64 {
    std::hint::black_box(f());
    let mut best = f64::INFINITY;
    for _ in 0..runs {
        let start = Instant::now();
        std::hint::black_box(f());
        best = best.min(start.elapsed().as_secs_f64());
    }
    best
}

/// The peak of the level in use, then each kernel's GFLOP/s (best of `runs`) on SD 1.5 shapes
/// at 512×512.
pub fn rates(runs: usize) -> Vec<Rate> {
    let isa = gemm::isa();
    let peak = peak_gflops(isa, 20_000_000);
    let mut rates = vec![Rate { name: format!("peak FMA ({})", isa.name()), gflops: peak, peak_gflops: peak }];
    // Without AVX512-BF16 the bf16 kernels widen to f32: the f32 peak is theirs.
    let peak_bf16 = peak_bf16_gflops(10_000_000).unwrap_or(peak);
    let values = |len: usize| -> Vec<f32> { (0..len).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect() };

    let (m, k, n) = (2048, 2048, 2048);
    let (a, b) = (values(m * k), values(k * n));
    let mut c = vec![0f32; m * n];
    let a_view = MatRef::row_major(&a, m, k).expect("sized");
    let b_view = MatRef::row_major(&b, k, n).expect("sized");
    let packed = PackedA::new(&a_view);
    let seconds = timed(runs, || gemm::gemm(&mut c, n, ASource::Packed(&packed), &b_view, Init::Overwrite, true));
    rates.push(Rate { name: "gemm 2048³".into(), gflops: 2.0 * (m * k * n) as f64 / seconds / 1e9, peak_gflops: peak });

    if isa >= Isa::Avx512Bf16 {
        rates.push(Rate { name: "peak bf16 dot (avx512bf16)".into(), gflops: peak_bf16, peak_gflops: peak_bf16 });
    }
    // With AMX the bf16 products below run on the tiles: their peak is the tiles'.
    let peak_tiles = if isa == Isa::Amx { super::amx::peak_gflops(1_000_000) } else { None };
    let peak_gemm_bf16 = match peak_tiles {
        Some(peak_tiles) => {
            rates.push(Rate { name: "peak bf16 tiles (amx)".into(), gflops: peak_tiles, peak_gflops: peak_tiles });
            peak_tiles
        }
        None => peak_bf16,
    };
    let a16: Vec<half::bf16> = a.iter().map(|&v| half::bf16::from_f32(v)).collect();
    let a16 = Bf16Matrix::new(&a16, m, k).expect("sized");
    let seconds = timed(runs, || gemm_bf16::gemm_bf16(&mut c, n, ABf16::Weight(a16), &RoundedB::new(&b_view), Init::Overwrite, true));
    rates.push(Rate { name: "gemm bf16 2048³ (B rounded as packed)".into(), gflops: 2.0 * (m * k * n) as f64 / seconds / 1e9, peak_gflops: peak_gemm_bf16 });

    // The UNet's (batch 2) and the VAE decoder's (batch 1) shapes at 512×512, and a UNet 1×1;
    // then the training benchmark's pixel UNet and text-to-image UNet (8×8 and 4×4 latents),
    // batch 64, with their backward passes.
    let inference = [(320, 320, 64, 2, 3), (640, 640, 32, 2, 3), (1280, 1280, 16, 2, 3), (512, 512, 64, 1, 3), (512, 512, 128, 1, 3), (256, 256, 256, 1, 3), (128, 128, 512, 1, 3), (320, 320, 64, 2, 1)];
    let training = [(64, 64, 32, 64, 3), (128, 128, 16, 64, 3), (256, 128, 16, 64, 3), (128, 128, 8, 64, 3), (64, 64, 8, 64, 3), (128, 128, 4, 64, 3)];
    for (index, (in_channels, channels, side, batch, k)) in inference.into_iter().chain(training).enumerate() {
        let g = Geometry { batch, in_channels, height: side, width: side, out_channels: channels, kernel_h: k, kernel_w: k, stride: 1, padding: k / 2 };
        let (input, weight) = (values(batch * in_channels * side * side), values(channels * in_channels * k * k));
        let flops = 2.0 * (batch * in_channels * side * side * channels * k * k) as f64;
        let name = format!("{k}×{k} {in_channels}→{channels} at {side}×{side}, batch {batch}");
        let seconds = timed(runs, || conv::forward(&g, &input, &weight, None));
        rates.push(Rate { name: format!("conv {name}"), gflops: flops / seconds / 1e9, peak_gflops: peak });
        let weight16: Vec<half::bf16> = weight.iter().map(|&v| half::bf16::from_f32(v)).collect();
        let seconds = timed(runs, || conv::forward_bf16(&g, &input, &weight16, None));
        rates.push(Rate { name: format!("conv bf16 {name}"), gflops: flops / seconds / 1e9, peak_gflops: peak_gemm_bf16 });
        if index < inference.len() {
            continue;
        }
        let grad_output = values(batch * channels * side * side);
        for (precision, label, peak) in [(Precision::F32, "", peak), (Precision::Bf16, " bf16", peak_gemm_bf16)] {
            let seconds = timed(runs, || conv::backward_input(&g, &grad_output, &weight, precision));
            rates.push(Rate { name: format!("conv{label} ∂input {name}"), gflops: flops / seconds / 1e9, peak_gflops: peak });
            let seconds = timed(runs, || conv::backward_weight(&g, &input, &grad_output, precision));
            rates.push(Rate { name: format!("conv{label} ∂kernel {name}"), gflops: flops / seconds / 1e9, peak_gflops: peak });
        }
    }

    for (queries, keys, head_dim) in [(4096, 4096, 40), (4096, 77, 40), (1024, 1024, 80)] {
        let dims = AttentionDims { heads: 16, queries, keys, head_dim };
        let (q, kv) = (values(16 * queries * head_dim), values(16 * keys * head_dim));
        let seconds = timed(runs, || attention::attention(dims, &q, &kv, &kv, 1.0 / (head_dim as f32).sqrt(), None));
        let flops = 4.0 * (16 * queries * keys * head_dim) as f64;
        rates.push(Rate { name: format!("attention 16 heads, {queries}×{keys}, d {head_dim}"), gflops: flops / seconds / 1e9, peak_gflops: peak });
        let seconds = timed(runs, || attention::attention_bf16(dims, &q, &kv, &kv, 1.0 / (head_dim as f32).sqrt(), None));
        rates.push(Rate { name: format!("attention bf16 16 heads, {queries}×{keys}, d {head_dim}"), gflops: flops / seconds / 1e9, peak_gflops: peak_gemm_bf16 });
    }
    rates
}
