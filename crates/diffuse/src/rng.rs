//! A random generator that reproduces `torch.Generator("cpu").manual_seed(s)` followed by
//! `torch.randn(shape, generator=g)` bit for bit, so that a seed gives diffusers' noise.
//!
//! torch (aten/src/ATen/core/DistributionsHelper.h, native/cpu/DistributionTemplates.h):
//! - the engine is a standard mt19937 seeded with `s mod 2^32`;
//! - fewer than 16 float32 values: each is a double-precision Box–Muller draw from two
//!   53-bit uniforms, the second value of each pair cached for the next draw;
//! - 16 or more: all uniforms first (24 bits each, float32), then Box–Muller in float32 on
//!   blocks of 16 (the last block redrawn when the count is not a multiple of 16).
//!
//! The float32 Box–Muller is the one torch runs on x86 CPUs with AVX2 or AVX512
//! (`normal_fill_16_AVX2`, whose log and sincos come from native/cpu/avx_mathfun.h); torch on a
//! CPU without AVX2, or on ARM, takes a scalar libm loop instead and differs from us (and from
//! itself on x86) by about 1e-6.

// The Cephes constants below keep all the digits of the C source.
#![allow(clippy::excessive_precision)]

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::{bail, Result};

const MT_N: usize = 624;
const MT_M: usize = 397;

/// The Mersenne Twister mt19937 as torch's `at::mt19937` runs it.
#[derive(Clone, Debug)]
pub struct Mt19937 {
    state: Box<[u32; MT_N]>,
    index: usize,
}

impl Mt19937 {
    /// std::mt19937 seeded with `seed`.
    pub fn new(seed: u32) -> Self {
        let mut state = Box::new([0u32; MT_N]);
        state[0] = seed;
        for i in 1..MT_N {
            state[i] = 1812433253u32.wrapping_mul(state[i - 1] ^ (state[i - 1] >> 30)).wrapping_add(i as u32);
        }
        Mt19937 { state, index: MT_N }
    }

    fn twist(&mut self) {
        for i in 0..MT_N {
            let y = (self.state[i] & 0x8000_0000) | (self.state[(i + 1) % MT_N] & 0x7fff_ffff);
            let mut next = self.state[(i + MT_M) % MT_N] ^ (y >> 1);
            if y & 1 != 0 {
                next ^= 0x9908_b0df;
            }
            self.state[i] = next;
        }
        self.index = 0;
    }

    /// The next 32-bit output.
    pub fn next_u32(&mut self) -> u32 {
        if self.index >= MT_N {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }

    /// torch's `random64()`: the first 32-bit output is the high half.
    pub fn next_u64(&mut self) -> u64 {
        let hi = self.next_u32() as u64;
        let lo = self.next_u32() as u64;
        (hi << 32) | lo
    }
}

/// Everything a [`TorchGenerator`] needs to resume its stream exactly, e.g. from a training
/// checkpoint. Serialisable with serde.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TorchGeneratorState {
    /// The seed the generator was created with (all 64 bits, as `initial_seed()` reports it).
    pub seed: u64,
    /// The engine's 624 state words.
    pub mt: Vec<u32>,
    /// The next state word to use; 624 means the words are regenerated before the next draw.
    pub index: usize,
    /// The cached second value of the double-precision Box–Muller pair, as its IEEE bits
    /// (bits, so that a text format cannot round it).
    pub next_double_normal_bits: Option<u64>,
}

/// torch's CPU generator: the engine plus the cached second Box–Muller value.
#[derive(Clone, Debug)]
pub struct TorchGenerator {
    engine: Mt19937,
    seed: u64,
    next_double_normal: Option<f64>,
}

impl TorchGenerator {
    /// `torch.Generator("cpu").manual_seed(seed)` (the MT19937 engine takes the low 32 bits).
    pub fn new(seed: u64) -> Self {
        TorchGenerator { engine: Mt19937::new(seed as u32), seed, next_double_normal: None }
    }

    /// The seed it was made with.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// A snapshot from which [`TorchGenerator::from_state`] continues the same stream.
    pub fn state(&self) -> TorchGeneratorState {
        TorchGeneratorState {
            seed: self.seed,
            mt: self.engine.state.to_vec(),
            index: self.engine.index,
            next_double_normal_bits: self.next_double_normal.map(f64::to_bits),
        }
    }

    /// Continues the stream of a [`TorchGenerator::state`] snapshot; errors on a malformed one.
    pub fn from_state(state: &TorchGeneratorState) -> Result<Self> {
        let words: Box<[u32; MT_N]> = match state.mt.clone().into_boxed_slice().try_into() {
            Ok(words) => words,
            Err(words) => bail!("generator state: mt has {} words, expected {MT_N}", words.len()),
        };
        if state.index > MT_N {
            bail!("generator state: index {} is above {MT_N}", state.index);
        }
        Ok(TorchGenerator {
            engine: Mt19937 { state: words, index: state.index },
            seed: state.seed,
            next_double_normal: state.next_double_normal_bits.map(f64::from_bits),
        })
    }

    /// A uniform double in [0, 1) from the low 53 bits of one 64-bit draw.
    fn uniform_f64(&mut self) -> f64 {
        let bits = self.engine.next_u64() & ((1u64 << 53) - 1);
        bits as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// A uniform float in [0, 1) from the low 24 bits of one 32-bit draw.
    fn uniform_f32(&mut self) -> f32 {
        let bits = self.engine.next_u32() & ((1u32 << 24) - 1);
        bits as f32 * (1.0 / (1u32 << 24) as f32)
    }

    /// torch's `normal_distribution<double>` with the cached second value.
    fn normal_f64(&mut self) -> f64 {
        if let Some(cached) = self.next_double_normal.take() {
            return cached;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let r = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.next_double_normal = Some(r * theta.sin());
        r * theta.cos()
    }

    /// `torch.randn(n, dtype=torch.float32, generator=g)` as a flat vector.
    pub fn randn(&mut self, n: usize) -> Vec<f32> {
        if n < 16 {
            return (0..n).map(|_| self.normal_f64() as f32).collect();
        }
        let mut data: Vec<f32> = (0..n).map(|_| self.uniform_f32()).collect();
        for start in (0..n - 15).step_by(16) {
            normal_fill_16(&mut data[start..start + 16]);
        }
        if !n.is_multiple_of(16) {
            let tail = n - 16;
            for value in data[tail..].iter_mut() {
                *value = self.uniform_f32();
            }
            normal_fill_16(&mut data[tail..]);
        }
        data
    }

    /// `torch.rand(n, dtype=torch.float32, generator=g)`: one 32-bit draw per value, its low
    /// 24 bits scaled into [0, 1).
    pub fn rand(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.uniform_f32()).collect()
    }

    /// `torch.randint(low, high, (n,), generator=g)`: `draw % (high - low) + low`, with one
    /// 32-bit draw per value (a 64-bit draw when the range needs more than 32 bits).
    pub fn randint(&mut self, low: i64, high: i64, n: usize) -> Result<Vec<i64>> {
        if high <= low {
            bail!("randint: empty range {low}..{high}");
        }
        let range = (high - low) as u64;
        Ok((0..n)
            .map(|_| {
                let draw = if range >= 1 << 32 { self.engine.next_u64() } else { self.engine.next_u32() as u64 };
                (draw % range) as i64 + low
            })
            .collect())
    }

    /// `torch.randn(shape, generator=g)` as an f32 tensor on `device`.
    pub fn randn_tensor(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        let n = shape.iter().product();
        Ok(Tensor::from_vec(self.randn(n), shape, device)?)
    }
}

/// Box–Muller on 16 uniforms in place, pairs (j, j + 8): torch's `normal_fill_16_AVX2` one
/// lane at a time, for mean 0 and std 1.
fn normal_fill_16(data: &mut [f32]) {
    // `_mm256_set1_ps(2.0f * c10::pi<double>)`: 2π in double, rounded to float once.
    let two_pi = (2.0 * std::f64::consts::PI) as f32;
    let (mean, std) = (0.0f32, 1.0f32);
    for j in 0..8 {
        let u1 = 1.0 - data[j];
        let u2 = data[j + 8];
        let radius = (-2.0 * cephes_log(u1)).sqrt();
        let (sin_theta, cos_theta) = cephes_sincos(two_pi * u2);
        // `_mm256_fmadd_ps(n, std, mean)`: exact here, except that it turns -0 into +0.
        data[j] = (radius * cos_theta).mul_add(std, mean);
        data[j + 8] = (radius * sin_theta).mul_add(std, mean);
    }
}

// The float32 routines of avx_mathfun.h (Cephes' logf and sinf/cosf as vectorised by Pommier
// and Garberoglio), one lane. torch's build (GCC, whose `_mm256_mul_ps`/`_mm256_add_ps` are
// plain vector arithmetic, with the default -ffp-contract=fast) fuses each multiply whose only
// use is an add or subtract into an FMA; the `mul_add` calls below are those fusions, and every
// other operation is rounded separately. (Without the fusions about 1% of values are 1-2 ulp
// off torch's; with them, all of tests/fixtures/rng match.) Constants are double literals
// stored as float in the C source, hence the `as f32` (digits kept as the source has them).

const LOG_SQRT_HALF: f32 = std::f64::consts::FRAC_1_SQRT_2 as f32; // 0.707106781186547524
const LOG_POLY: [f32; 9] = [
    7.0376836292E-2_f64 as f32,
    -1.1514610310E-1_f64 as f32,
    1.1676998740E-1_f64 as f32,
    -1.2420140846E-1_f64 as f32,
    1.4249322787E-1_f64 as f32,
    -1.6668057665E-1_f64 as f32,
    2.0000714765E-1_f64 as f32,
    -2.4999993993E-1_f64 as f32,
    3.3333331174E-1_f64 as f32,
];
// ln 2 split in two: a short head (exact in products with the exponent) and the rest.
const LN2_HEAD: f32 = 0.693359375;
const LN2_TAIL: f32 = -2.12194440e-4_f64 as f32;

/// avx_mathfun's `log256_ps` for x > 0 (the generator never passes anything else).
fn cephes_log(x: f32) -> f32 {
    // Split x = m · 2^e with m in [0.5, 1), denormals cut to the smallest normal float.
    let bits = x.max(f32::MIN_POSITIVE).to_bits();
    let mut exponent = ((bits >> 23) as i32 - 0x7f) as f32 + 1.0;
    let mantissa = f32::from_bits((bits & !0x7f80_0000) | 0.5f32.to_bits());
    // For m < √½ use 2m - 1 and e - 1 so that the polynomial's argument stays in [√½ - 1, √2 - 1).
    let mut m = mantissa - 1.0;
    if mantissa < LOG_SQRT_HALF {
        exponent -= 1.0;
        m += mantissa;
    }
    let m_squared = m * m;
    let mut poly = LOG_POLY[0];
    for &coefficient in &LOG_POLY[1..] {
        poly = poly.mul_add(m, coefficient);
    }
    poly *= m;
    let mut y = poly.mul_add(m_squared, exponent * LN2_TAIL);
    y = (-m_squared).mul_add(0.5, y);
    exponent.mul_add(LN2_HEAD, m + y)
}

const FOUR_OVER_PI: f32 = 1.27323954473516_f64 as f32;
// π/4 split in three for the "extended precision modular arithmetic" of the range reduction.
const MINUS_PI_4_PARTS: [f32; 3] =
    [-0.78515625, -2.4187564849853515625e-4_f64 as f32, -3.77489497744594108e-8_f64 as f32];
const SIN_POLY: [f32; 3] = [-1.9515295891E-4_f64 as f32, 8.3321608736E-3_f64 as f32, -1.6666654611E-1_f64 as f32];
const COS_POLY: [f32; 3] =
    [2.443315711809948E-005_f64 as f32, -1.388731625493765E-003_f64 as f32, 4.166664568298827E-002_f64 as f32];

/// avx_mathfun's `sincos256_ps`: (sin x, cos x), accurate for |x| < 8192.
fn cephes_sincos(x: f32) -> (f32, f32) {
    let mut sign_sin = x.to_bits() & 0x8000_0000;
    let mut x = x.abs();
    // The octant j (rounded up to even) of |x|, and x reduced to [-π/4, π/4] around j·π/4.
    let octant = (((x * FOUR_OVER_PI) as i32) + 1) & !1;
    let octant_f = octant as f32;
    for part in MINUS_PI_4_PARTS {
        x = octant_f.mul_add(part, x);
    }
    sign_sin ^= ((octant & 4) as u32) << 29;
    let sign_cos = ((!(octant - 2) & 4) as u32) << 29;
    // In octants 2 and 6 (mod 8) sine and cosine trade polynomials.
    let swap = octant & 2 != 0;

    let z = x * x;
    let mut cos_poly = COS_POLY[0].mul_add(z, COS_POLY[1]);
    cos_poly = cos_poly.mul_add(z, COS_POLY[2]);
    cos_poly *= z;
    cos_poly = cos_poly.mul_add(z, -(z * 0.5)) + 1.0;

    let mut sin_poly = SIN_POLY[0].mul_add(z, SIN_POLY[1]);
    sin_poly = sin_poly.mul_add(z, SIN_POLY[2]);
    sin_poly *= z;
    sin_poly = sin_poly.mul_add(x, x);

    let (sin, cos) = if swap { (cos_poly, sin_poly) } else { (sin_poly, cos_poly) };
    (f32::from_bits(sin.to_bits() ^ sign_sin), f32::from_bits(cos.to_bits() ^ sign_cos))
}
