//! bf16 matrix products with f32 accumulation on the CPU: the scheme of [`super::gemm`]
//! (panels, blocking, threads, the same `MR × NR` tiles), with operands stored as pairs of
//! bf16 values along the shared dimension, the layout of AVX512-BF16's `vdpbf16ps`, which
//! does 32 bf16 products into 16 f32 sums per instruction.
//!
//! A packed value is a `u32` holding `(x[k], x[k + 1])` for an even `k` (`x[k]` in the low
//! half, as the instruction pairs them). Weights are bf16 already (converted when the model
//! loads); f32 activations are rounded to bf16 as they are packed. Every level runs the same
//! layout: `vdpbf16ps` on [`Isa::Avx512Bf16`], and on the lower levels the pairs are widened
//! to f32 (a shift, a mask) for the f32 fused multiply-adds, which gives the same sums, since a
//! product of two bf16 values is exact in f32.

use half::bf16;
use rayon::prelude::*;

use super::gemm::{self, BWalk, COut, Init, Isa, PackB};
use super::{vector, Precision};

/// Panel depth in values (256 pairs): a `B` panel of 32 columns is 32 KiB, as in f32.
pub(super) const KC: usize = 512;
/// Rows of `A` per block (a multiple of every `MR`).
const MC: usize = 240;
/// Columns of `B` per block.
const NC: usize = 1024;

/// `x` rounded to the nearest bf16 (ties to even), as PyTorch's `.to(torch.bfloat16)`; NaN
/// stays NaN.
#[inline(always)]
pub(crate) fn to_bf16_bits(x: f32) -> u16 {
    (vector::bf16_high_half(x) >> 16) as u16
}

/// The pair word of `(even, odd)`.
#[inline(always)]
fn pair(even: f32, odd: f32) -> u32 {
    (vector::bf16_high_half(odd) & 0xFFFF_0000) | (vector::bf16_high_half(even) >> 16)
}

/// The pair word at element `index` (even) of a bf16 slice, zero-extended past its end.
#[inline(always)]
fn pair_at(data: &[bf16], index: usize) -> u32 {
    let even = data[index].to_bits() as u32;
    let odd = data.get(index + 1).map_or(0, |v| v.to_bits() as u32);
    even | odd << 16
}

/// A row-major bf16 matrix (`rows × cols`, rows `row_stride` apart): a layer's weight, or
/// bf16 planes read in place.
#[derive(Debug, Clone, Copy)]
pub struct Bf16Matrix<'a> {
    data: &'a [bf16],
    rows: usize,
    cols: usize,
    row_stride: usize,
}

impl<'a> Bf16Matrix<'a> {
    /// The matrix, or `None` if `data` does not hold exactly `rows × cols` values.
    pub fn new(data: &'a [bf16], rows: usize, cols: usize) -> Option<Self> {
        (rows.checked_mul(cols) == Some(data.len())).then_some(Self { data, rows, cols, row_stride: cols })
    }

    /// Rows of `cols` values `row_stride` apart from the start of `data`, or `None` if one
    /// would run past its end.
    pub fn strided(data: &'a [bf16], rows: usize, cols: usize, row_stride: usize) -> Option<Self> {
        let end = match rows {
            0 => 0,
            _ => (rows - 1).checked_mul(row_stride)?.checked_add(cols)?,
        };
        (cols <= row_stride && end <= data.len()).then_some(Self { data, rows, cols, row_stride })
    }

    /// From row `i`, column `k0`: the values of `rows` rows of `pairs` pair words, where they
    /// lie inside the data (rows past `self.rows` included, for a caller that pads them) and
    /// rows hold whole pairs (even stride and `k0`), with the row stride in words; `A` read in
    /// place by AMX's tiles.
    pub(super) fn pair_rows(&self, i: usize, k0: usize, rows: usize, pairs: usize) -> Option<(&'a [bf16], usize)> {
        let start = i.checked_mul(self.row_stride)?.checked_add(k0)?;
        let end = rows.checked_sub(1)?.checked_mul(self.row_stride)?.checked_add(start)?.checked_add(2 * pairs)?;
        (self.row_stride.is_multiple_of(2) && k0.is_multiple_of(2) && k0 + 2 * pairs <= self.cols && end <= self.data.len()).then(|| (&self.data[start..end], self.row_stride / 2))
    }

    /// Columns `first..first + len` (in range) as a matrix of their own.
    fn columns(self, first: usize, len: usize) -> Self {
        assert!(first + len <= self.cols, "Bf16Matrix: columns out of range");
        if len == 0 || self.rows == 0 {
            return Self { cols: len, ..self };
        }
        Self { data: &self.data[first..], cols: len, ..self }
    }

    /// Row `i`, columns `k0..k0 + kc`, as pairs (the last one zero-padded when `kc` is odd).
    fn row_pairs(&self, i: usize, k0: usize, kc: usize) -> impl Iterator<Item = u32> + '_ {
        let row = &self.data[i * self.row_stride + k0..i * self.row_stride + k0 + kc];
        (0..kc).step_by(2).map(move |k| pair_at(row, k))
    }
}

/// Where `A` (`m × k`) comes from.
#[derive(Clone, Copy)]
pub enum ABf16<'a> {
    /// f32 values, rounded as they are packed (a linear layer's activations).
    F32(gemm::MatRef<'a>),
    /// A bf16 matrix, read where it lies when its rows hold whole pairs (an even number of
    /// columns, an even row stride): a convolution's kernel, bf16 planes. Otherwise it is
    /// packed block by block.
    Weight(Bf16Matrix<'a>),
}

impl ABf16<'_> {
    pub(super) fn dims(&self) -> (usize, usize) {
        match self {
            ABf16::F32(a) => (a.rows(), a.cols()),
            ABf16::Weight(w) => (w.rows, w.cols),
        }
    }

    /// Row `i`'s pair words at depth `k0..k0 + kc` into `out` (`ceil(kc / 2)` of them, the
    /// last zero-padded when `kc` is odd), f32 values rounded with `isa`'s vector instructions.
    pub(super) fn row_pairs_into(&self, isa: Isa, i: usize, k0: usize, kc: usize, out: &mut [u32]) {
        match self {
            ABf16::Weight(w) => out.iter_mut().zip(w.row_pairs(i, k0, kc)).for_each(|(word, pair)| *word = pair),
            // Rounded as a contiguous run (vectorised).
            ABf16::F32(a) => match a.row_run(i, k0, kc) {
                Some(row) => vector::round_adjacent_pairs(isa, row, out),
                None => {
                    for (q, word) in out.iter_mut().enumerate() {
                        let k = k0 + 2 * q;
                        let odd = if 2 * q + 1 < kc { a.at(i, k + 1) } else { 0.0 };
                        *word = pair(a.at(i, k), odd);
                    }
                }
            },
        }
    }

    /// Writes the panels of rows `m0..m0 + mc`, depth `k0..k0 + kc`: panel `p` holds
    /// `ceil(kc / 2)` pairs of `mr` rows, zero past row `m`.
    fn pack(&self, isa: Isa, k0: usize, kc: usize, m0: usize, mc: usize, mr: usize, out: &mut [u32]) {
        let pairs = kc.div_ceil(2);
        let mut row_words = Vec::new();
        for (panel, chunk) in out.chunks_exact_mut(pairs * mr).take(mc.div_ceil(mr)).enumerate() {
            let first = m0 + panel * mr;
            let height = mr.min(m0 + mc - first);
            if let ABf16::F32(a) = self {
                if a.column_run(first, k0, height).is_some() {
                    // A transposed view: each depth's panel rows are adjacent, so a pair's words
                    // come from two runs, rounded together (vectorised).
                    for (q, words) in chunk.chunks_exact_mut(mr).enumerate() {
                        let k = k0 + 2 * q;
                        let even = a.column_run(first, k, height).expect("a transposed view");
                        let odd = (2 * q + 1 < kc).then(|| a.column_run(first, k + 1, height).expect("a transposed view"));
                        vector::round_pairs(isa, even, odd, &mut words[..height]);
                        words[height..].fill(0);
                    }
                    continue;
                }
            }
            row_words.resize(pairs, 0);
            for i in 0..height {
                // A row's words, then spread over the panel.
                self.row_pairs_into(isa, first + i, k0, kc, &mut row_words);
                for (q, &word) in row_words.iter().enumerate() {
                    chunk[q * mr + i] = word;
                }
            }
            for column in chunk.chunks_exact_mut(mr) {
                column[height..].fill(0);
            }
        }
    }
}

/// A source of `B` (`k × n`) as pair panels: for columns `n0..n0 + nc` and depth
/// `k0..k0 + kc`, panel `p` holds `ceil(kc / 2)` pairs of `nr` columns (`n0 + p·nr ..`), zero
/// past column `n` and past depth `k0 + kc`.
pub trait PackBPairs: Sync {
    /// `(k, n)`.
    fn dims(&self) -> (usize, usize);
    /// Fills `out` (`ceil(nc / nr) · ceil(kc / 2) · nr` words); `scratch` is for the source's use.
    fn pack_pairs(&self, k0: usize, kc: usize, n0: usize, nc: usize, nr: usize, out: &mut [u32], scratch: &mut Vec<f32>);

    /// The panels for this block: packed into `buffer`, or borrowed where they already exist.
    #[allow(clippy::too_many_arguments)]
    fn panels<'s>(&'s self, k0: usize, kc: usize, n0: usize, nc: usize, nr: usize, buffer: &'s mut [u32], scratch: &mut Vec<f32>) -> &'s [u32] {
        let len = nc.div_ceil(nr) * nr * kc.div_ceil(2);
        self.pack_pairs(k0, kc, n0, nc, nr, &mut buffer[..len], scratch);
        &buffer[..len]
    }
}

impl<B: PackBPairs> PackBPairs for gemm::DepthRange<'_, B> {
    fn dims(&self) -> (usize, usize) {
        (self.len, self.inner.dims().1)
    }

    fn pack_pairs(&self, k0: usize, kc: usize, n0: usize, nc: usize, nr: usize, out: &mut [u32], scratch: &mut Vec<f32>) {
        self.inner.pack_pairs(self.first + k0, kc, n0, nc, nr, out, scratch)
    }

    fn panels<'s>(&'s self, k0: usize, kc: usize, n0: usize, nc: usize, nr: usize, buffer: &'s mut [u32], scratch: &mut Vec<f32>) -> &'s [u32] {
        self.inner.panels(self.first + k0, kc, n0, nc, nr, buffer, scratch)
    }
}

/// `B` packed once for the tile of one level: a linear layer's weight, packed when the model
/// loads. For each `KC` block of depth, all column panels.
#[derive(Debug)]
pub struct PackedBPairs {
    nr: usize,
    depth: usize,
    cols: usize,
    data: Vec<u32>,
}

impl PackedBPairs {
    /// `b` packed for the tile of `isa`.
    pub fn new(b: &impl PackBPairs, isa: Isa) -> Self {
        let (_, nr) = isa.tile();
        let (k, n) = b.dims();
        let padded = n.div_ceil(nr) * nr;
        let mut data = vec![0u32; padded * k.div_ceil(2)];
        // One task per depth block (a model's weights are packed as it loads: all threads).
        data.par_chunks_mut((KC / 2 * padded).max(1)).enumerate().for_each_init(Vec::new, |scratch, (block, out)| {
            let k0 = block * KC;
            b.pack_pairs(k0, KC.min(k - k0), 0, n, nr, out, scratch);
        });
        Self { nr, depth: k, cols: n, data }
    }

    /// The panels of columns `n0..n0 + nc` (`n0` starts a panel) in the `KC` block at `k0`.
    fn block(&self, k0: usize, kc: usize, n0: usize, nc: usize, nr: usize) -> &[u32] {
        assert_eq!(nr, self.nr, "PackedBPairs was packed for another level");
        assert!(k0 % KC == 0 && kc == KC.min(self.depth - k0) && n0 % nr == 0, "PackedBPairs: not a packed block");
        let (padded, pairs) = (self.cols.div_ceil(nr) * nr, kc.div_ceil(2));
        let start = k0 / 2 * padded + n0 * pairs;
        &self.data[start..start + nc.div_ceil(nr) * nr * pairs]
    }
}

impl PackBPairs for PackedBPairs {
    fn dims(&self) -> (usize, usize) {
        (self.depth, self.cols)
    }

    fn pack_pairs(&self, k0: usize, kc: usize, n0: usize, nc: usize, nr: usize, out: &mut [u32], _: &mut Vec<f32>) {
        let block = self.block(k0, kc, n0, nc, nr);
        out[..block.len()].copy_from_slice(block);
    }

    fn panels<'s>(&'s self, k0: usize, kc: usize, n0: usize, nc: usize, nr: usize, _: &'s mut [u32], _: &mut Vec<f32>) -> &'s [u32] {
        self.block(k0, kc, n0, nc, nr)
    }
}

/// An f32 `B` ([`PackB`]: a view, a convolution's patches), packed one f32 panel at a time
/// into a scratch panel that stays in cache, then rounded into pairs (vectorised for `isa`).
pub struct RoundedB<'a, B: PackB> {
    /// The f32 source.
    pub source: &'a B,
    /// The instruction set the rounding is vectorised for.
    pub isa: Isa,
}

impl<'a, B: PackB> RoundedB<'a, B> {
    /// Rounds `source` with the vector instructions of the level in use.
    pub fn new(source: &'a B) -> Self {
        Self { source, isa: gemm::isa() }
    }
}

impl<B: PackB> PackBPairs for RoundedB<'_, B> {
    fn dims(&self) -> (usize, usize) {
        self.source.dims()
    }

    fn pack_pairs(&self, k0: usize, kc: usize, n0: usize, nc: usize, nr: usize, out: &mut [u32], scratch: &mut Vec<f32>) {
        // Depth per staged piece (even): 64 × 32 f32 = 8 KiB, in L1 beside the output.
        const PIECE: usize = 64;
        let pairs = kc.div_ceil(2);
        scratch.resize(PIECE * nr, 0.0);
        for (p, words) in out.chunks_exact_mut(pairs * nr).take(nc.div_ceil(nr)).enumerate() {
            let first = n0 + p * nr;
            for depth in (0..kc).step_by(PIECE) {
                let piece = PIECE.min(kc - depth);
                let staged = &mut scratch[..piece * nr];
                self.source.pack(k0 + depth, piece, first, nr.min(n0 + nc - first), nr, staged);
                let words = &mut words[depth / 2 * nr..(depth + piece).div_ceil(2) * nr];
                for (q, words) in words.chunks_exact_mut(nr).enumerate() {
                    let even = &staged[2 * q * nr..(2 * q + 1) * nr];
                    let odd = (2 * q + 1 < piece).then(|| &staged[(2 * q + 1) * nr..(2 * q + 2) * nr]);
                    vector::round_pairs(self.isa, even, odd, words);
                }
            }
        }
    }
}

/// A bf16 weight `W` (`n × k`, row-major) read as `B = Wᵀ`: a linear layer's weight, whose
/// pairs along `k` are already adjacent in memory.
pub struct TransposedWeight<'a>(pub Bf16Matrix<'a>);

impl PackBPairs for TransposedWeight<'_> {
    fn dims(&self) -> (usize, usize) {
        (self.0.cols, self.0.rows)
    }

    fn pack_pairs(&self, k0: usize, kc: usize, n0: usize, nc: usize, nr: usize, out: &mut [u32], _: &mut Vec<f32>) {
        let pairs = kc.div_ceil(2);
        for (panel, chunk) in out.chunks_exact_mut(pairs * nr).take(nc.div_ceil(nr)).enumerate() {
            let first = n0 + panel * nr;
            let width = nr.min(n0 + nc - first);
            // Eight rows at a time, so that each panel row gets eight adjacent words per visit.
            const ROWS: usize = 8;
            let mut j = 0;
            if kc % 2 == 0 {
                while j + ROWS <= width {
                    let rows: [&[bf16]; ROWS] = std::array::from_fn(|r| {
                        let start = (first + j + r) * self.0.row_stride + k0;
                        &self.0.data[start..start + kc]
                    });
                    for (q, words) in chunk.chunks_exact_mut(nr).take(pairs).enumerate() {
                        for (word, row) in words[j..j + ROWS].iter_mut().zip(&rows) {
                            *word = row[2 * q].to_bits() as u32 | (row[2 * q + 1].to_bits() as u32) << 16;
                        }
                    }
                    j += ROWS;
                }
            }
            for j in j..width {
                for (q, word) in self.0.row_pairs(first + j, k0, kc).enumerate() {
                    chunk[q * nr + j] = word;
                }
            }
            if width < nr {
                for words in chunk.chunks_exact_mut(nr) {
                    words[width..].fill(0);
                }
            }
        }
    }
}

/// `C[m × n] (+)= A[m × k] · B[k × n]` in bf16 with f32 sums, `C` row-major with row stride
/// `ldc`, as [`gemm::gemm`] (same `init`, same split over threads when `parallel`).
///
/// Panics if the operands' dimensions disagree or `c` is too short: callers size them.
pub fn gemm_bf16(c: &mut [f32], ldc: usize, a: ABf16, b: &impl PackBPairs, init: Init, parallel: bool) {
    gemm_bf16_with(gemm::isa(), c, ldc, a, b, init, parallel)
}

/// `C (+)= A·B` for f32 operands in `precision` (training's products, see
/// [`super::with_training_precision`]): [`gemm::gemm`] with `A` read in place when its rows
/// are contiguous (packing it per call costs about as much as it saves when the product is
/// only a few `B` panels wide, as a small model's layers are), else packed as it is used; or
/// [`gemm_bf16`] with both operands rounded to bf16 as they are packed.
pub fn gemm_in(precision: Precision, c: &mut [f32], ldc: usize, a: gemm::MatRef, b: &impl PackB, init: Init, parallel: bool) {
    match precision {
        Precision::F32 if a.rows_are_contiguous() => gemm::gemm(c, ldc, gemm::ASource::InPlace(a), b, init, parallel),
        Precision::F32 => gemm::gemm(c, ldc, gemm::ASource::View(a), b, init, parallel),
        Precision::Bf16 => gemm_bf16(c, ldc, ABf16::F32(a), &RoundedB::new(b), init, parallel),
    }
}

/// [`gemm_in`] into a new output that the product writes in full (see [`gemm::gemm_fresh`]):
/// `init` is not [`Init::Accumulate`].
pub fn gemm_in_fresh(precision: Precision, c: &mut [std::mem::MaybeUninit<f32>], ldc: usize, a: gemm::MatRef, b: &impl PackB, init: Init, parallel: bool) {
    match precision {
        Precision::F32 if a.rows_are_contiguous() => gemm::gemm_fresh(c, ldc, gemm::ASource::InPlace(a), b, init, parallel),
        Precision::F32 => gemm::gemm_fresh(c, ldc, gemm::ASource::View(a), b, init, parallel),
        Precision::Bf16 => {
            // The bf16 driver writes through values: give it zeros.
            c.fill(std::mem::MaybeUninit::new(0.0));
            // SAFETY: every element was just written, and `MaybeUninit<f32>` has `f32`'s layout.
            let c = unsafe { &mut *(c as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]) };
            gemm_bf16(c, ldc, ABf16::F32(a), &RoundedB::new(b), init, parallel)
        }
    }
}

/// [`gemm_bf16`] on the micro-kernel of `isa`.
pub(crate) fn gemm_bf16_with(isa: Isa, c: &mut [f32], ldc: usize, a: ABf16, b: &impl PackBPairs, init: Init, parallel: bool) {
    let (m, k) = a.dims();
    let (kb, n) = b.dims();
    assert_eq!(k, kb, "gemm_bf16: A has {k} columns, B {kb} rows");
    match init {
        Init::RowBias(bias) => assert!(bias.len() >= m, "gemm_bf16: a bias per row"),
        Init::ColumnBias(bias) => assert!(bias.len() >= n, "gemm_bf16: a bias per column"),
        _ => {}
    }
    if m == 0 || n == 0 {
        return;
    }
    // Little output, much depth: split along the depth, as `gemm::gemm` does.
    if let Some(per_share) = gemm::depth_share(m, n, k, KC) {
        gemm::split_depth(COut::new(c, ldc, m, n), (m, n, k), per_share, init, parallel, |first, len, out| {
            let a = match a {
                ABf16::F32(view) => ABf16::F32(view.columns(first, len)),
                ABf16::Weight(w) => ABf16::Weight(w.columns(first, len)),
            };
            gemm_bf16_block(isa, COut::new(out, n, m, n), 0, 0, a, &gemm::DepthRange { inner: b, first, len }, Init::Overwrite);
        });
        return;
    }
    let (mr, nr) = isa.tile();
    gemm::for_each_share(COut::new(c, ldc, m, n), mr, nr, parallel, |part, m0, first, _| {
        gemm_bf16_block(isa, part, m0, first, a, b, init.offset(m0, first));
    });
}

/// [`gemm_bf16`] on one thread for all of `c` (`rows × n`, with `ldc`), whose first row is row
/// `m0` of `A`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_bf16_rows(isa: Isa, c: &mut [f32], ldc: usize, m0: usize, rows: usize, a: ABf16, b: &impl PackBPairs, init: Init) {
    let (_, n) = b.dims();
    if rows == 0 || n == 0 {
        return;
    }
    gemm_bf16_block(isa, COut::new(c, ldc, rows, n), m0, 0, a, b, init);
}

/// The product into `c`, whose first row is row `m0` of `A` and first column column `n_first`
/// of `B` (`init`'s bias already offset to this block).
fn gemm_bf16_block(isa: Isa, c: COut, m0: usize, n_first: usize, a: ABf16, b: &impl PackBPairs, init: Init) {
    if isa == Isa::Amx {
        return super::amx::block(super::amx::TileUnit::Hardware, Isa::Avx512Bf16, c, m0, n_first, a, b, init);
    }
    let (mr, nr) = isa.tile();
    let (_, k) = a.dims();
    let (rows, n) = (c.rows, c.cols);
    if k == 0 {
        gemm::store_empty_product(&c, init);
        return;
    }
    // A weight with whole pairs per row is read in place, but for a last partial panel.
    let in_place = match a {
        ABf16::Weight(w) if w.cols % 2 == 0 && w.row_stride % 2 == 0 => Some(w),
        _ => None,
    };
    let a_rows_packed = if in_place.is_some() { mr } else { MC.min(rows).div_ceil(mr) * mr };
    let mut a_panels = vec![0u32; KC.min(k).div_ceil(2) * a_rows_packed];
    let mut b_buffer = vec![0u32; KC.min(k).div_ceil(2) * NC.min(n).div_ceil(nr) * nr];
    let mut scratch = Vec::new();
    let mut tile = [0f32; 12 * 32];
    for n0 in (0..n).step_by(NC) {
        let nc = NC.min(n - n0);
        for k0 in (0..k).step_by(KC) {
            let kc = KC.min(k - k0);
            let pairs = kc.div_ceil(2);
            let b_panels = b.panels(k0, kc, n_first + n0, nc, nr, &mut b_buffer, &mut scratch);
            for i0 in (0..rows).step_by(MC) {
                let mc = MC.min(rows - i0);
                let panels = mc.div_ceil(mr);
                let last = (panels - 1) * mr;
                match in_place {
                    // Only a last partial panel is packed (its missing rows read as zeros).
                    Some(_) if mc - last < mr => a.pack(isa, k0, kc, m0 + i0 + last, mc - last, mr, &mut a_panels[..pairs * mr]),
                    Some(_) => {}
                    None => a.pack(isa, k0, kc, m0 + i0, mc, mr, &mut a_panels[..panels * pairs * mr]),
                }
                for (jp, b_panel) in b_panels.chunks_exact(pairs * nr).enumerate() {
                    let j = n0 + jp * nr;
                    let width = nr.min(n - j);
                    for ip in 0..panels {
                        let i = i0 + ip * mr;
                        let height = mr.min(rows - i);
                        let tile = &mut tile[..mr * nr];
                        match in_place {
                            Some(w) if height == mr => {
                                let start = (m0 + i) * w.row_stride + k0;
                                let lda = w.row_stride / 2;
                                assert!(w.data.len() >= start + (mr - 1) * w.row_stride + 2 * pairs, "gemm_bf16: A in place");
                                // SAFETY: the assertion keeps the MR rows of `pairs` words from
                                // `start` inside the weight (a `u32` read at an even element of
                                // a bf16 slice, unaligned reads), `b_panel` holds `pairs · nr`
                                // words, `tile` MR × NR values.
                                unsafe { run_kernel::<true>(isa, BWalk::panel(pairs, nr), w.data[start..].as_ptr().cast(), lda, b_panel, tile) }
                            }
                            Some(_) => {
                                // SAFETY: the packed panel holds `pairs · mr` words.
                                unsafe { run_kernel::<false>(isa, BWalk::panel(pairs, nr), a_panels.as_ptr(), 0, b_panel, tile) }
                            }
                            None => {
                                let a_panel = &a_panels[ip * pairs * mr..(ip + 1) * pairs * mr];
                                // SAFETY: as above.
                                unsafe { run_kernel::<false>(isa, BWalk::panel(pairs, nr), a_panel.as_ptr(), 0, b_panel, tile) }
                            }
                        }
                        gemm::store_tile(&c, i, j, height, width, tile, nr, init, k0 == 0);
                    }
                }
            }
        }
    }
}

/// `tile[MR × NR] = A · B` over the pair steps of `walk` (see [`BWalk`]) for the ISA's tile:
/// `A`'s word (p, i) is `a[p·MR + i]` (a packed panel) or, when `IN_PLACE`, `a[i·lda + p]`
/// (read unaligned), `p` running over the walk's whole depth.
///
/// # Safety
/// `a` must have those words readable, `b.len() ≥ walk.extent(NR)` and
/// `tile.len() ≥ MR · NR` (checked here for `b` and `tile`).
unsafe fn run_kernel<const IN_PLACE: bool>(isa: Isa, walk: BWalk, a: *const u32, lda: usize, b: &[u32], tile: &mut [f32]) {
    let (mr, nr) = isa.tile();
    assert!(b.len() >= walk.extent(nr) && tile.len() >= mr * nr);
    match isa {
        // SAFETY (all arms): the ISA was checked to be supported before it was chosen
        // (`gemm::isa()`, `Isa::all_supported()` in tests); the reads of `a` are the caller's
        // contract, those of `b` and the writes of `tile` were asserted above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Bf16 | Isa::Amx => unsafe { x86::kernel_avx512bf16::<12, 2, IN_PLACE>(walk, a, lda, b.as_ptr(), tile.as_mut_ptr()) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { x86::kernel_avx512::<12, 2, IN_PLACE>(walk, a, lda, b.as_ptr(), tile.as_mut_ptr()) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::kernel_avx2::<6, 2, IN_PLACE>(walk, a, lda, b.as_ptr(), tile.as_mut_ptr()) },
        _ => unsafe { kernel_portable::<4, 16, IN_PLACE>(walk, a, lda, b, tile) },
    }
}

/// `tile[MR × NR] = A · B` with `A` a packed panel (word (p, i) at `a[p·MR + i]`, `p` over the
/// walk's whole depth) and `B` read as `walk` says.
pub(crate) fn walk_kernel(isa: Isa, walk: BWalk, a: &[u32], b: &[u32], tile: &mut [f32]) {
    let (mr, _) = isa.tile();
    assert!(a.len() >= walk.depth() * mr, "gemm_bf16: A panel too short");
    // SAFETY: the assertion keeps the reads of `a` inside it; `run_kernel` checks `b` and `tile`.
    unsafe { run_kernel::<false>(isa, walk, a.as_ptr(), 0, b, tile) }
}

/// The two bf16 values of a pair word, widened to f32: (even, odd).
#[inline(always)]
pub(super) fn widen(word: u32) -> (f32, f32) {
    (f32::from_bits(word << 16), f32::from_bits(word & 0xFFFF_0000))
}

/// # Safety
/// As [`run_kernel`] for the `4 × 16` tile.
unsafe fn kernel_portable<const MR: usize, const NR: usize, const IN_PLACE: bool>(walk: BWalk, a: *const u32, lda: usize, b: &[u32], tile: &mut [f32]) {
    let mut acc = [[0f32; NR]; MR];
    let mut q = 0;
    for &tap in walk.taps {
        for r in 0..walk.steps {
            let b = &b[tap + r * walk.ldb..tap + r * walk.ldb + NR];
            for (i, acc_row) in acc.iter_mut().enumerate() {
                // SAFETY: the caller's contract on `a`.
                let (a_even, a_odd) = widen(unsafe { a.add(if IN_PLACE { i * lda + q } else { q * MR + i }).read_unaligned() });
                for (acc, &word) in acc_row.iter_mut().zip(b) {
                    let (b_even, b_odd) = widen(word);
                    // vdpbf16ps's order: the odd products first.
                    *acc = a_even.mul_add(b_even, a_odd.mul_add(b_odd, *acc));
                }
            }
            q += 1;
        }
    }
    for (row, acc_row) in tile.chunks_exact_mut(NR).zip(&acc) {
        row.copy_from_slice(acc_row);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::BWalk;

    /// `vdpbf16ps` micro-kernel: `MR` rows × `NV` vectors of 16 columns, each instruction
    /// adding a pair step's two products per lane.
    ///
    /// # Safety
    /// The CPU supports AVX512F and AVX512-BF16; `a` has the words of [`super::run_kernel`]
    /// readable, `b` the walk's extent for `NV · 16` columns, `tile` room for `MR · NV · 16`
    /// values.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn kernel_avx512bf16<const MR: usize, const NV: usize, const IN_PLACE: bool>(
        walk: BWalk,
        a: *const u32,
        lda: usize,
        b: *const u32,
        tile: *mut f32,
    ) {
        let mut acc = [[_mm512_setzero_ps(); NV]; MR];
        let mut q = 0;
        for &tap in walk.taps {
            // `wrapping_add`: the row pointer may step past `b` after its last read.
            let mut row = b.wrapping_add(tap);
            for _ in 0..walk.steps {
                let mut bv = [_mm512_setzero_si512(); NV];
                for (v, bv) in bv.iter_mut().enumerate() {
                    *bv = _mm512_loadu_si512(row.add(v * 16).cast());
                }
                for (i, acc) in acc.iter_mut().enumerate() {
                    let word = a.add(if IN_PLACE { i * lda + q } else { q * MR + i }).read_unaligned();
                    // SAFETY: __m512i and __m512bh are both 64-byte vectors of plain bits.
                    let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(word as i32));
                    for v in 0..NV {
                        acc[v] = _mm512_dpbf16_ps(acc[v], av, std::mem::transmute::<__m512i, __m512bh>(bv[v]));
                    }
                }
                q += 1;
                row = row.wrapping_add(walk.ldb);
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            for (v, &acc) in acc.iter().enumerate() {
                _mm512_storeu_ps(tile.add((i * NV + v) * 16), acc);
            }
        }
    }

    /// AVX-512F micro-kernel on pairs widened to f32 (a shift for the even value, a mask for
    /// the odd one) and two fused multiply-adds.
    ///
    /// # Safety
    /// The CPU supports AVX512F; otherwise as [`kernel_avx512bf16`].
    #[target_feature(enable = "avx512f")]
    pub unsafe fn kernel_avx512<const MR: usize, const NV: usize, const IN_PLACE: bool>(
        walk: BWalk,
        a: *const u32,
        lda: usize,
        b: *const u32,
        tile: *mut f32,
    ) {
        let high = _mm512_set1_epi32(0xFFFF_0000_u32 as i32);
        let mut acc = [[_mm512_setzero_ps(); NV]; MR];
        let mut q = 0;
        for &tap in walk.taps {
            let mut row = b.wrapping_add(tap);
            for _ in 0..walk.steps {
                let (mut even, mut odd) = ([_mm512_setzero_ps(); NV], [_mm512_setzero_ps(); NV]);
                for v in 0..NV {
                    let words = _mm512_loadu_si512(row.add(v * 16).cast());
                    even[v] = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(words));
                    odd[v] = _mm512_castsi512_ps(_mm512_and_si512(words, high));
                }
                for (i, acc) in acc.iter_mut().enumerate() {
                    let word = a.add(if IN_PLACE { i * lda + q } else { q * MR + i }).read_unaligned();
                    let (a_even, a_odd) = super::widen(word);
                    let (a_even, a_odd) = (_mm512_set1_ps(a_even), _mm512_set1_ps(a_odd));
                    for v in 0..NV {
                        acc[v] = _mm512_fmadd_ps(a_even, even[v], _mm512_fmadd_ps(a_odd, odd[v], acc[v]));
                    }
                }
                q += 1;
                row = row.wrapping_add(walk.ldb);
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            for (v, &acc) in acc.iter().enumerate() {
                _mm512_storeu_ps(tile.add((i * NV + v) * 16), acc);
            }
        }
    }

    /// AVX2 + FMA micro-kernel on widened pairs: `MR` rows × `NV` vectors of 8 columns.
    ///
    /// Two passes over the walk, the odd products of every pair step and then the even ones:
    /// AVX2 has 16 vector registers, which the `6 × 2` tile's accumulators, a `B` vector per
    /// column group and an `A` broadcast fill; widening both halves of a step at once made the
    /// compiler spill (38 % of the FMA peak), each half alone does not.
    ///
    /// # Safety
    /// The CPU supports AVX2 and FMA; `b` has the walk's extent for `NV · 8` columns, `tile`
    /// room for `MR · NV · 8` values; `a` as [`kernel_avx512bf16`].
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn kernel_avx2<const MR: usize, const NV: usize, const IN_PLACE: bool>(
        walk: BWalk,
        a: *const u32,
        lda: usize,
        b: *const u32,
        tile: *mut f32,
    ) {
        let mut acc = [[_mm256_setzero_ps(); NV]; MR];
        half_pass::<MR, NV, IN_PLACE, false>(&mut acc, walk, a, lda, b);
        half_pass::<MR, NV, IN_PLACE, true>(&mut acc, walk, a, lda, b);
        for (i, acc) in acc.iter().enumerate() {
            for (v, &acc) in acc.iter().enumerate() {
                _mm256_storeu_ps(tile.add((i * NV + v) * 8), acc);
            }
        }
    }

    /// The 32-bit word at `p` in every lane, loaded by `vpbroadcastd` from memory (a load-port
    /// operation). Written in `asm!` because the compiler, seeing a broadcast that is then
    /// masked or shifted, moves the masking to a general register and broadcasts from there:
    /// two more vector operations per row of the tile, which cost half the kernel's speed.
    ///
    /// # Safety
    /// `p` points to 4 readable bytes (no alignment needed); the CPU supports AVX2.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn broadcast_word(p: *const u32) -> __m256i {
        let words: __m256i;
        // SAFETY: the caller's contract: 4 bytes at `p` are readable and AVX2 is available;
        // the instruction only reads them and writes the output register.
        unsafe { std::arch::asm!("vpbroadcastd {out}, dword ptr [{p}]", p = in(reg) p, out = out(ymm_reg) words, options(pure, readonly, nostack, preserves_flags)) };
        words
    }

    /// Adds the products of one half of every pair (`EVEN`: the low bf16 of each word, widened
    /// by a shift; else the high one, by a mask) to `acc`.
    ///
    /// # Safety
    /// As [`kernel_avx2`].
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn half_pass<const MR: usize, const NV: usize, const IN_PLACE: bool, const EVEN: bool>(acc: &mut [[__m256; NV]; MR], walk: BWalk, a: *const u32, lda: usize, b: *const u32) {
        let widen = |words: __m256i| {
            if EVEN {
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(words))
            } else {
                _mm256_castsi256_ps(_mm256_and_si256(words, _mm256_set1_epi32(0xFFFF_0000_u32 as i32)))
            }
        };
        let mut q = 0;
        for &tap in walk.taps {
            // `wrapping_add`: the row pointer may step past `b` after its last read.
            let mut row = b.wrapping_add(tap);
            for _ in 0..walk.steps {
                let mut bv = [_mm256_setzero_ps(); NV];
                for (v, bv) in bv.iter_mut().enumerate() {
                    *bv = widen(_mm256_loadu_si256(row.add(v * 8).cast()));
                }
                for (i, acc) in acc.iter_mut().enumerate() {
                    let av = widen(broadcast_word(a.add(if IN_PLACE { i * lda + q } else { q * MR + i })));
                    for v in 0..NV {
                        acc[v] = _mm256_fmadd_ps(av, bv[v], acc[v]);
                    }
                }
                q += 1;
                row = row.wrapping_add(walk.ldb);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gemm::tests::values;
    use crate::ops::gemm::MatRef;

    fn round(values: &[f32]) -> Vec<bf16> {
        values.iter().map(|&v| bf16::from_bits(to_bf16_bits(v))).collect()
    }

    #[test]
    fn rounding_matches_half() {
        for v in values(10_000, 9).into_iter().chain([0.0, -0.0, f32::INFINITY, f32::NEG_INFINITY, f32::MAX, 1e-40, 3.0e38]) {
            assert_eq!(to_bf16_bits(v), bf16::from_f32(v).to_bits(), "{v}");
        }
        assert!(bf16::from_bits(to_bf16_bits(f32::NAN)).is_nan());
    }

    /// Every source pairing against an f64 product of the bf16-rounded operands, on odd
    /// shapes (odd depths, partial tiles, one row, empty; little output and much depth, split
    /// along the depth, its last share odd) at every level this CPU has.
    #[test]
    fn gemm_bf16_matches_f64_reference_on_odd_shapes_at_every_level() {
        assert_eq!(gemm::depth_share(9, 20, 1100, KC), Some(2 * KC));
        for isa in Isa::all_supported() {
            for &(m, k, n) in &[(1, 1, 1), (0, 3, 4), (3, 0, 4), (5, 7, 0), (13, 300, 33), (25, 17, 65), (1, 513, 40), (241, 5, 31), (7, 1030, 1100), (12, 64, 32), (9, 1100, 20), (3, 2 * KC + 1, 10)] {
                let a32 = values(m * k, 1);
                let b32 = values(k * n, 2);
                let (a16, bt16) = (round(&a32), round(&b32));
                // Bᵀ as a bf16 weight (n × k).
                let mut w32 = vec![0f32; n * k];
                for p in 0..k {
                    for j in 0..n {
                        w32[j * k + p] = b32[p * n + j];
                    }
                }
                let w16 = round(&w32);
                let reference: Vec<f64> = (0..m * n)
                    .map(|ij| (0..k).map(|p| a16[ij / n * k + p].to_f64() * bt16[p * n + ij % n].to_f64()).sum())
                    .collect();
                let bias: Vec<f32> = (0..m.max(n)).map(|i| i as f32 * 0.5).collect();
                let a_view = MatRef::row_major(&a32, m, k).unwrap();
                // A stored transposed (k × m) and read as its transpose: the column-run packing.
                let at32: Vec<f32> = (0..k * m).map(|pi| a32[pi % m * k + pi / m]).collect();
                let a_transposed = MatRef::row_major(&at32, k, m).unwrap().t();
                let b_view = MatRef::row_major(&b32, k, n).unwrap();
                let a_weight = Bf16Matrix::new(&a16, m, k).unwrap();
                let w = TransposedWeight(Bf16Matrix::new(&w16, n, k).unwrap());
                let ldc = n + 3;
                let packed = PackedBPairs::new(&w, isa);
                for (case, parallel) in [(0, false), (1, true), (2, true), (3, false), (4, true), (5, true)] {
                    let mut c = vec![f32::NAN; m.max(1) * ldc];
                    let (init, bias_of): (Init, &dyn Fn(usize, usize) -> f64) = match case {
                        0 | 2 | 4 => (Init::RowBias(&bias), &|i, _| bias[i] as f64),
                        _ => (Init::ColumnBias(&bias), &|_, j| bias[j] as f64),
                    };
                    match case {
                        0 => gemm_bf16_with(isa, &mut c, ldc, ABf16::Weight(a_weight), &RoundedB { source: &b_view, isa }, init, parallel),
                        1 => gemm_bf16_with(isa, &mut c, ldc, ABf16::F32(a_view), &w, init, parallel),
                        2 => gemm_bf16_with(isa, &mut c, ldc, ABf16::Weight(a_weight), &w, init, parallel),
                        4 => gemm_bf16_with(isa, &mut c, ldc, ABf16::Weight(a_weight), &packed, init, parallel),
                        5 => gemm_bf16_with(isa, &mut c, ldc, ABf16::F32(a_transposed), &w, init, parallel),
                        _ => gemm_bf16_with(isa, &mut c, ldc, ABf16::F32(a_view), &RoundedB { source: &b_view, isa }, init, parallel),
                    }
                    for i in 0..m {
                        for j in 0..n {
                            let want = reference[i * n + j] + bias_of(i, j);
                            let got = c[i * ldc + j] as f64;
                            assert!((got - want).abs() <= 1e-4 * (1.0 + k as f64).sqrt(), "{isa:?} case {case} {m}x{k}x{n} ({i},{j}): {got} vs {want}");
                        }
                    }
                }
            }
        }
    }
}
