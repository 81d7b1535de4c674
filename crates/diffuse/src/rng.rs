//! A random generator that reproduces `torch.Generator("cpu").manual_seed(s)` followed by
//! `torch.randn(shape, generator=g)`, so that a seed gives diffusers' noise.
//!
//! torch (aten/src/ATen/core/DistributionsHelper.h, native/cpu/DistributionTemplates.h):
//! - the engine is a standard mt19937 seeded with `s mod 2^32`;
//! - fewer than 16 float32 values: each is a double-precision Box–Muller draw from two
//!   53-bit uniforms, the second value of each pair cached for the next draw;
//! - 16 or more: all uniforms first (24 bits each, float32), then Box–Muller in float32 on
//!   blocks of 16 (the last block redrawn when the count is not a multiple of 16).

use candle_core::{Device, Tensor};

use crate::Result;

const MT_N: usize = 624;
const MT_M: usize = 397;

/// The Mersenne Twister mt19937 as torch's `at::mt19937` runs it.
#[derive(Clone, Debug)]
pub struct Mt19937 {
    state: Box<[u32; MT_N]>,
    index: usize,
}

impl Mt19937 {
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

/// torch's CPU generator: the engine plus the cached second Box–Muller value.
#[derive(Clone, Debug)]
pub struct TorchGenerator {
    engine: Mt19937,
    seed: u64,
    next_double_normal: Option<f64>,
}

impl TorchGenerator {
    pub fn new(seed: u64) -> Self {
        TorchGenerator { engine: Mt19937::new(seed as u32), seed, next_double_normal: None }
    }

    pub fn seed(&self) -> u64 {
        self.seed
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
        if n % 16 != 0 {
            let tail = n - 16;
            for value in data[tail..].iter_mut() {
                *value = self.uniform_f32();
            }
            normal_fill_16(&mut data[tail..]);
        }
        data
    }

    /// `torch.randn(shape, generator=g)` as an f32 tensor on `device`.
    pub fn randn_tensor(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        let n = shape.iter().product();
        Ok(Tensor::from_vec(self.randn(n), shape, device)?)
    }
}

/// Box–Muller on 16 uniforms in place: pairs (j, j + 8).
fn normal_fill_16(data: &mut [f32]) {
    for j in 0..8 {
        let u1 = 1.0 - data[j];
        let u2 = data[j + 8];
        let radius = (-2.0 * u1.ln()).sqrt();
        let theta = 2.0 * std::f32::consts::PI * u2;
        data[j] = radius * theta.cos();
        data[j + 8] = radius * theta.sin();
    }
}
