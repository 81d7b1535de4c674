//! Flash attention on the CPU in f32 (FlashAttention's tiling with an online softmax): for a
//! block of query rows, the scores against one block of keys at a time, a running row maximum
//! and sum, and the output rescaled as the maximum grows. The full score matrix never exists
//! (at 512×512, SD 1.5's first self-attention would hold 1 GiB of it), and both products
//! run on the packed GEMM kernels: each head's keys and values are packed once and read by
//! every query block; the threads share the (head, query block) tasks.

use rayon::prelude::*;

use super::gemm::{self, ASource, Columns, Init, Isa, MatRef, PackedA, PackedB, Rows};
use super::vector::{exp, exp_shifted_in_place};

/// Query rows per task: a multiple of every ISA's MR (12, 6, 4).
const QUERY_BLOCK: usize = 96;
/// Keys per block: whole KC blocks of the GEMM, so that packed values are read in place.
const KEY_BLOCK: usize = 256;
const _: () = assert!(KEY_BLOCK % gemm::KC == 0);

/// The sizes of one attention call: `heads` independent (batch × head) problems of `queries`
/// rows, `keys` keys and `head_dim` features.
#[derive(Debug, Clone, Copy)]
pub struct AttentionDims {
    pub heads: usize,
    pub queries: usize,
    pub keys: usize,
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

pub(crate) fn attention_with(isa: Isa, dims: AttentionDims, q: &[f32], k: &[f32], v: &[f32], scale: f32, mask: Option<&[f32]>) -> Vec<f32> {
    let AttentionDims { heads, queries, keys, head_dim } = dims;
    let (q_len, kv_len) = (queries * head_dim, keys * head_dim);
    assert!(q.len() == heads * q_len && k.len() == heads * kv_len && v.len() == heads * kv_len, "attention: operand sizes");
    assert!(mask.is_none_or(|m| m.len() == queries * keys), "attention: mask size");
    let mut output = vec![0f32; heads * q_len];
    if q_len == 0 || head_dim == 0 {
        return output;
    }
    // Kᵀ (head_dim × keys) and V (keys × head_dim) of every head, in the kernel's panels.
    let packed: Vec<(PackedB, PackedB)> = (0..heads)
        .into_par_iter()
        .map(|h| {
            let keys_view = MatRef::row_major(&k[h * kv_len..(h + 1) * kv_len], keys, head_dim).expect("sizes checked");
            let values_view = MatRef::row_major(&v[h * kv_len..(h + 1) * kv_len], keys, head_dim).expect("sizes checked");
            (PackedB::with_isa(&keys_view.t(), isa), PackedB::with_isa(&values_view, isa))
        })
        .collect();
    output.par_chunks_mut(q_len).enumerate().for_each(|(h, out)| {
        let (keys_t, values) = &packed[h];
        out.par_chunks_mut(QUERY_BLOCK * head_dim).enumerate().for_each(|(block, out)| {
            let first = block * QUERY_BLOCK;
            let q_block = &q[h * q_len + first * head_dim..h * q_len + first * head_dim + out.len()];
            query_block(isa, dims, first, q_block, keys_t, values, scale, mask, out);
        });
    });
    output
}

/// One task: `out` (`rows × head_dim`) for the query rows `first..` in `q_block`.
#[allow(clippy::too_many_arguments)]
fn query_block(
    isa: Isa,
    dims: AttentionDims,
    first: usize,
    q_block: &[f32],
    keys_t: &PackedB,
    values: &PackedB,
    scale: f32,
    mask: Option<&[f32]>,
    out: &mut [f32],
) {
    let AttentionDims { keys, head_dim, .. } = dims;
    let rows = q_block.len() / head_dim;
    // The scale goes into Q once, not into every score; Q is packed once for all key blocks,
    // and the probabilities' panels reuse one allocation.
    let scaled_q: Vec<f32> = q_block.iter().map(|&x| x * scale).collect();
    let q_packed = PackedA::with_isa(&MatRef::row_major(&scaled_q, rows, head_dim).expect("sizes checked"), isa);
    let mut p_packed = PackedA::with_isa(&MatRef::row_major(&[], 0, 0).expect("empty"), isa);
    let mut scores = vec![0f32; rows * KEY_BLOCK];
    let mut row_max = vec![f32::NEG_INFINITY; rows];
    let mut row_sum = vec![0f32; rows];
    out.fill(0.0);
    for key0 in (0..keys).step_by(KEY_BLOCK) {
        let width = KEY_BLOCK.min(keys - key0);
        gemm::gemm_rows(isa, &mut scores, width, 0, rows, ASource::Packed(&q_packed), &Columns { inner: keys_t, first: key0, len: width }, Init::Overwrite);
        for r in 0..rows {
            let row = &mut scores[r * width..(r + 1) * width];
            if let Some(mask) = mask {
                let mask_row = &mask[(first + r) * keys + key0..(first + r) * keys + key0 + width];
                row.iter_mut().zip(mask_row).for_each(|(s, m)| *s += m);
            }
            let block_max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let new_max = row_max[r].max(block_max);
            // Every key so far masked: nothing to weigh yet (and -inf - -inf would be NaN).
            if new_max == f32::NEG_INFINITY {
                row.fill(0.0);
                continue;
            }
            let correction = exp(row_max[r] - new_max);
            row_max[r] = new_max;
            let block_sum = exp_shifted_in_place(isa, row, new_max);
            row_sum[r] = row_sum[r] * correction + block_sum;
            if correction != 1.0 {
                out[r * head_dim..(r + 1) * head_dim].iter_mut().for_each(|o| *o *= correction);
            }
        }
        p_packed.repack_in_place(&MatRef::row_major(&scores[..rows * width], rows, width).expect("sizes checked"));
        gemm::gemm_rows(isa, out, head_dim, 0, rows, ASource::Packed(&p_packed), &Rows { inner: values, first: key0, len: width }, Init::Accumulate);
    }
    for (r, out_row) in out.chunks_exact_mut(head_dim).enumerate() {
        let inverse = if row_sum[r] > 0.0 { 1.0 / row_sum[r] } else { 0.0 };
        out_row.iter_mut().for_each(|o| *o *= inverse);
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
            for &(heads, queries, keys, head_dim) in &[(1, 1, 1, 1), (2, 50, 77, 40), (3, 97, 300, 8), (1, 5, 513, 33), (2, 0, 4, 4), (1, 3, 0, 4)] {
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
}
