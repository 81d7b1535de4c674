//! Flash attention on the CPU in f32 (FlashAttention's tiling with an online softmax): for a
//! block of query rows, the scores against one block of keys at a time, a running row maximum
//! and sum, and the output rescaled as the maximum grows. The full score matrix never exists
//! (at 512×512, SD 1.5's first self-attention would hold 1 GiB of it), and both products
//! run on the packed GEMM kernels: each head's keys and values are packed once and read by
//! every query block; the threads share the (head, query block) tasks.

use rayon::prelude::*;

use half::bf16;

use super::gemm::{self, ASource, Init, Isa, MatRef, PackedA, PackedB};
use super::gemm_bf16::{self, ABf16, Bf16Matrix, RoundedB};
use super::vector;

/// Query rows per task: a multiple of every ISA's MR (12, 6, 4) and of the vector width.
const QUERY_BLOCK: usize = 96;
/// Keys per block: a multiple of every MR (the keys are `A`'s rows), so that the packed keys
/// are read in place.
const KEY_BLOCK: usize = 768;
const _: () = assert!(KEY_BLOCK % 12 == 0);

/// The sizes of one attention call: `heads` independent (batch × head) problems of `queries`
/// rows, `keys` keys and `head_dim` features.
#[derive(Debug, Clone, Copy)]
pub struct AttentionDims {
    /// Independent problems (batch × heads).
    pub heads: usize,
    /// Query rows per problem.
    pub queries: usize,
    /// Keys (and values) per problem.
    pub keys: usize,
    /// Features per query, key and value.
    pub head_dim: usize,
}

/// `softmax(scale · Q Kᵀ + mask) V` for contiguous `q` (`[heads, queries, head_dim]`), `k` and
/// `v` (`[heads, keys, head_dim]`), with an optional additive `mask` (`[queries, keys]`, the
/// same for every head). Returns `[heads, queries, head_dim]`. A row whose keys are all masked
/// gives zeros.
///
/// Panics if a slice's length does not match `dims`.
pub fn attention(dims: AttentionDims, q: &[f32], k: &[f32], v: &[f32], scale: f32, mask: Option<&[f32]>) -> Vec<f32> {
    attention_with(gemm::isa(), dims, q, k, v, scale, mask)
}

/// [`attention`] with both products in bf16 (f32 sums), as PyTorch computes a bf16 model's
/// attention: Q, K, V and the probabilities are rounded to bf16 as they are packed; the
/// softmax stays in f32.
///
/// Panics if a slice's length does not match `dims`.
pub fn attention_bf16(dims: AttentionDims, q: &[f32], k: &[f32], v: &[f32], scale: f32, mask: Option<&[f32]>) -> Vec<f32> {
    attention_bf16_with(gemm::isa(), dims, q, k, v, scale, mask)
}

/// Each head's keys (`keys × depth`) and, per key block, values transposed
/// (`head_dim × block`), rounded to bf16 once and read in place by every query block. On AMX
/// the keys' depth is the head dimension padded with zeros to whole tiles (32 values), and
/// both are padded with zero rows to a multiple of 32, so that the tiles read them where they
/// lie (see `amx::block`); elsewhere `depth` is the head dimension.
struct HeadBf16 {
    keys: Vec<bf16>,
    values_t: Vec<Vec<bf16>>,
}

pub(crate) fn attention_bf16_with(isa: Isa, dims: AttentionDims, q: &[f32], k: &[f32], v: &[f32], scale: f32, mask: Option<&[f32]>) -> Vec<f32> {
    let AttentionDims { keys, head_dim, .. } = dims;
    let kv_len = keys * head_dim;
    let (depth, row_multiple) = if isa == Isa::Amx { (head_dim.next_multiple_of(32), 32) } else { (head_dim, 1) };
    let round = |x: f32| bf16::from_bits(gemm_bf16::to_bf16_bits(x));
    let prepare = |h: usize| {
        let head_values = &v[h * kv_len..(h + 1) * kv_len];
        let values_t = (0..keys)
            .step_by(KEY_BLOCK)
            .map(|key0| {
                let width = KEY_BLOCK.min(keys - key0);
                let mut block = vec![bf16::ZERO; head_dim.next_multiple_of(row_multiple) * width];
                for (j, row) in head_values[key0 * head_dim..(key0 + width) * head_dim].chunks_exact(head_dim).enumerate() {
                    for (feature, &value) in row.iter().enumerate() {
                        block[feature * width + j] = round(value);
                    }
                }
                block
            })
            .collect();
        let mut head_keys = vec![bf16::ZERO; keys.next_multiple_of(row_multiple) * depth];
        for (to, from) in head_keys.chunks_exact_mut(depth).zip(k[h * kv_len..(h + 1) * kv_len].chunks_exact(head_dim)) {
            to.iter_mut().zip(from).for_each(|(t, &f)| *t = round(f));
        }
        HeadBf16 { keys: head_keys, values_t }
    };
    over_query_blocks(dims, q, k, v, mask, prepare, |head, first, q_block, out| {
        let rows = q_block.len() / head_dim;
        // Q scaled once, in `depth` columns (zeros past the head dimension).
        let mut scaled_q = vec![0f32; rows * depth];
        for (to, from) in scaled_q.chunks_exact_mut(depth).zip(q_block.chunks_exact(head_dim)) {
            to.iter_mut().zip(from).for_each(|(t, &f)| *t = f * scale);
        }
        let q_t = MatRef::row_major(&scaled_q, rows, depth).expect("sizes checked").t();
        let q_t = RoundedB { source: &q_t, isa };
        let keys_bf16 = Bf16Matrix::strided(&head.keys, keys, depth, depth).expect("sizes checked");
        let products = Products {
            scores: &|scores_t: &mut [f32], key0, width| {
                gemm_bf16::gemm_bf16_rows(isa, scores_t, rows, key0, width, ABf16::Weight(keys_bf16), &q_t, Init::Overwrite)
            },
            output: &|out_t: &mut [f32], block, probabilities_t: MatRef| {
                let width = probabilities_t.rows();
                let values_t = Bf16Matrix::strided(&head.values_t[block], head_dim, width, width).expect("sizes checked");
                let probabilities_t = RoundedB { source: &probabilities_t, isa };
                gemm_bf16::gemm_bf16_rows(isa, out_t, rows, 0, head_dim, ABf16::Weight(values_t), &probabilities_t, Init::Accumulate)
            },
        };
        online_attention(isa, dims, first, rows, &products, mask, out);
    })
}

/// Checks the operands' sizes, prepares each head once (`prepare(head)`, heads in parallel),
/// then runs `block(head's preparation, first query row, the block's queries, its output)`
/// for every (head, query block) on the rayon threads. Empty problems give zeros.
#[allow(clippy::too_many_arguments)]
fn over_query_blocks<P: Send + Sync>(
    dims: AttentionDims,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: Option<&[f32]>,
    prepare: impl Fn(usize) -> P + Sync + Send,
    block: impl Fn(&P, usize, &[f32], &mut [f32]) + Sync + Send,
) -> Vec<f32> {
    let AttentionDims { heads, queries, keys, head_dim } = dims;
    let (q_len, kv_len) = (queries * head_dim, keys * head_dim);
    assert!(q.len() == heads * q_len && k.len() == heads * kv_len && v.len() == heads * kv_len, "attention: operand sizes");
    assert!(mask.is_none_or(|m| m.len() == queries * keys), "attention: mask size");
    let mut output = vec![0f32; heads * q_len];
    if q_len == 0 || head_dim == 0 {
        return output;
    }
    let prepared: Vec<P> = (0..heads).into_par_iter().map(prepare).collect();
    output.par_chunks_mut(q_len).enumerate().for_each(|(h, out)| {
        out.par_chunks_mut(QUERY_BLOCK * head_dim).enumerate().for_each(|(index, out)| {
            let first = index * QUERY_BLOCK;
            let q_block = &q[h * q_len + first * head_dim..h * q_len + first * head_dim + out.len()];
            block(&prepared[h], first, q_block, out);
        });
    });
    output
}

/// The two products of one query block: the transposed scores of a key block
/// (`scores(scores_t, first key, keys)`), and the transposed output's update from its
/// probabilities (`output(out_t, key block index, Pᵀ)`).
struct Products<'a> {
    scores: &'a (dyn Fn(&mut [f32], usize, usize) + Sync),
    output: &'a (dyn Fn(&mut [f32], usize, MatRef) + Sync),
}

pub(crate) fn attention_with(isa: Isa, dims: AttentionDims, q: &[f32], k: &[f32], v: &[f32], scale: f32, mask: Option<&[f32]>) -> Vec<f32> {
    let AttentionDims { keys, head_dim, .. } = dims;
    let kv_len = keys * head_dim;
    // K (keys × head_dim) and, per key block, Vᵀ (head_dim × block) of every head, packed once
    // as A operands.
    let prepare = |h: usize| {
        let (head_keys, head_values) = (&k[h * kv_len..(h + 1) * kv_len], &v[h * kv_len..(h + 1) * kv_len]);
        let keys_view = MatRef::row_major(head_keys, keys, head_dim).expect("sizes checked");
        let values_t: Vec<PackedA> = (0..keys)
            .step_by(KEY_BLOCK)
            .map(|key0| {
                let width = KEY_BLOCK.min(keys - key0);
                let block = &head_values[key0 * head_dim..(key0 + width) * head_dim];
                PackedA::with_isa(&MatRef::row_major(block, width, head_dim).expect("sizes checked").t(), isa)
            })
            .collect();
        (PackedA::with_isa(&keys_view, isa), values_t)
    };
    over_query_blocks(dims, q, k, v, mask, prepare, |(keys_packed, values_t), first, q_block, out| {
        query_block(isa, dims, first, q_block, keys_packed, values_t, scale, mask, out)
    })
}

/// One task: `out` (`rows × head_dim`) for the query rows `first..` in `q_block`.
///
/// Everything is computed transposed: the scores `Sᵀ = K Qᵀ` (`keys × rows`), so that the
/// softmax's running maximum and sum are vectors over the query rows (every step vectorises),
/// and the output `Oᵀ += Vᵀ Pᵀ` (`head_dim × rows`), so that the product's short side is the
/// head dimension (40 in SD's first blocks) on the micro-kernel's 12-row side rather than its
/// 32-column side, and `Pᵀ` is read as it lies.
#[allow(clippy::too_many_arguments)]
fn query_block(
    isa: Isa,
    dims: AttentionDims,
    first: usize,
    q_block: &[f32],
    keys_packed: &PackedA,
    values_t: &[PackedA],
    scale: f32,
    mask: Option<&[f32]>,
    out: &mut [f32],
) {
    let AttentionDims { head_dim, .. } = dims;
    let rows = q_block.len() / head_dim;
    // The scale goes into Q once, not into every score; Qᵀ is packed once for all key blocks.
    let scaled_q: Vec<f32> = q_block.iter().map(|&x| x * scale).collect();
    let q_t = PackedB::with_isa(&MatRef::row_major(&scaled_q, rows, head_dim).expect("sizes checked").t(), isa);
    let products = Products {
        scores: &|scores_t: &mut [f32], key0, width| {
            gemm::gemm_rows(isa, scores_t, rows, key0, width, ASource::Packed(keys_packed), &q_t, Init::Overwrite)
        },
        output: &|out_t: &mut [f32], block, probabilities_t: MatRef| {
            gemm::gemm_rows(isa, out_t, rows, 0, head_dim, ASource::Packed(&values_t[block]), &probabilities_t, Init::Accumulate)
        },
    };
    online_attention(isa, dims, first, rows, &products, mask, out);
}

/// FlashAttention's loop over the key blocks for the query rows `first..first + rows`, into
/// `out` (`rows × head_dim`), on either precision's products.
fn online_attention(isa: Isa, dims: AttentionDims, first: usize, rows: usize, products: &Products, mask: Option<&[f32]>, out: &mut [f32]) {
    let AttentionDims { keys, head_dim, .. } = dims;
    let mut scores_t = vec![0f32; KEY_BLOCK.min(keys) * rows];
    let mut out_t = vec![0f32; head_dim * rows];
    let mut state = OnlineSoftmax::new(rows);
    for (block, key0) in (0..keys).step_by(KEY_BLOCK).enumerate() {
        let width = KEY_BLOCK.min(keys - key0);
        let scores_t = &mut scores_t[..width * rows];
        (products.scores)(scores_t, key0, width);
        if let Some(mask) = mask {
            for (c, scores) in scores_t.chunks_exact_mut(rows).enumerate() {
                for (r, score) in scores.iter_mut().enumerate() {
                    *score += mask[(first + r) * keys + key0 + c];
                }
            }
        }
        let correction = state.update(isa, scores_t);
        if correction.iter().any(|&c| c != 1.0) {
            for out_row in out_t.chunks_exact_mut(rows) {
                out_row.iter_mut().zip(correction).for_each(|(o, c)| *o *= c);
            }
        }
        (products.output)(&mut out_t, block, MatRef::row_major(scores_t, width, rows).expect("sizes checked"));
    }
    let inverse: Vec<f32> = state.sum.iter().map(|&sum| if sum > 0.0 { 1.0 / sum } else { 0.0 }).collect();
    for (feature, out_t_row) in out_t.chunks_exact(rows).enumerate() {
        for (r, (&value, &inverse)) in out_t_row.iter().zip(&inverse).enumerate() {
            out[r * head_dim + feature] = value * inverse;
        }
    }
}

/// The running row maximum and sum of FlashAttention's softmax, one per query row.
struct OnlineSoftmax {
    max: Vec<f32>,
    sum: Vec<f32>,
    correction: Vec<f32>,
}

impl OnlineSoftmax {
    fn new(rows: usize) -> Self {
        Self { max: vec![f32::NEG_INFINITY; rows], sum: vec![0.0; rows], correction: vec![1.0; rows] }
    }

    /// Takes a block of transposed scores (`keys × rows`), replaces them by
    /// `exp(score - new row maximum)`, and returns each row's factor for what was accumulated
    /// before (`exp(old maximum - new maximum)`).
    fn update(&mut self, isa: Isa, scores_t: &mut [f32]) -> &[f32] {
        vector::online_softmax_columns(isa, scores_t, &mut self.max, &mut self.sum, &mut self.correction);
        &self.correction
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gemm::tests::values;

    fn reference(dims: AttentionDims, q: &[f32], k: &[f32], v: &[f32], scale: f32, mask: Option<&[f32]>) -> Vec<f64> {
        let AttentionDims { heads, queries, keys, head_dim: d } = dims;
        let mut out = vec![0f64; heads * queries * d];
        for h in 0..heads {
            for i in 0..queries {
                let scores: Vec<f64> = (0..keys)
                    .map(|j| {
                        let dot: f64 = (0..d).map(|x| q[(h * queries + i) * d + x] as f64 * k[(h * keys + j) * d + x] as f64).sum();
                        dot * scale as f64 + mask.map_or(0.0, |m| m[i * keys + j] as f64)
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                if max == f64::NEG_INFINITY {
                    continue;
                }
                let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f64 = weights.iter().sum();
                for x in 0..d {
                    out[(h * queries + i) * d + x] = (0..keys).map(|j| weights[j] * v[(h * keys + j) * d + x] as f64).sum::<f64>() / sum;
                }
            }
        }
        out
    }

    #[test]
    fn flash_attention_matches_f64_reference_at_every_level() {
        for isa in Isa::all_supported() {
            for &(heads, queries, keys, head_dim) in SHAPES {
                let dims = AttentionDims { heads, queries, keys, head_dim };
                let q = values(heads * queries * head_dim, 3);
                let k = values(heads * keys * head_dim, 4);
                let v = values(heads * keys * head_dim, 5);
                // Large scores, so that the running maximum moves between key blocks.
                let scale = 4.0 / (head_dim as f32).sqrt();
                let causal: Vec<f32> = (0..queries * keys).map(|i| if i % keys > i / keys { f32::NEG_INFINITY } else { 0.0 }).collect();
                for mask in [None, Some(&causal[..])] {
                    let got = attention_with(isa, dims, &q, &k, &v, scale, mask);
                    let want = reference(dims, &q, &k, &v, scale, mask);
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        assert!((*g as f64 - w).abs() < 2e-5, "{isa:?} {dims:?} mask {} at {i}: {g} vs {w}", mask.is_some());
                    }
                }
            }
        }
    }

    /// Odd sizes, one of everything, empty, and more keys than one key block.
    const SHAPES: &[(usize, usize, usize, usize)] = &[(1, 1, 1, 1), (2, 50, 77, 40), (3, 97, 300, 8), (1, 5, 513, 33), (2, 0, 4, 4), (1, 3, 0, 4), (1, 20, 1700, 40)];

    /// The bf16 products against the f64 reference of the bf16-rounded scaled queries, keys and
    /// values: what is left is the rounding of the probabilities (2⁻⁹ relative).
    #[test]
    fn bf16_flash_attention_matches_f64_reference_of_rounded_operands_at_every_level() {
        let round = |v: &[f32]| -> Vec<f32> { v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect() };
        for isa in Isa::all_supported() {
            for &(heads, queries, keys, head_dim) in SHAPES {
                let dims = AttentionDims { heads, queries, keys, head_dim };
                let q = values(heads * queries * head_dim, 3);
                let k = values(heads * keys * head_dim, 4);
                let v = values(heads * keys * head_dim, 5);
                let scale = 4.0 / (head_dim as f32).sqrt();
                let scaled_q: Vec<f32> = q.iter().map(|&x| x * scale).collect();
                let causal: Vec<f32> = (0..queries * keys).map(|i| if i % keys > i / keys { f32::NEG_INFINITY } else { 0.0 }).collect();
                for mask in [None, Some(&causal[..])] {
                    let got = attention_bf16_with(isa, dims, &q, &k, &v, scale, mask);
                    let want = reference(dims, &round(&scaled_q), &round(&k), &round(&v), 1.0, mask);
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        assert!((*g as f64 - w).abs() < 1e-2, "{isa:?} {dims:?} mask {} at {i}: {g} vs {w}", mask.is_some());
                    }
                }
            }
        }
    }
}
