//! f32 matrix products on the CPU, BLIS's way: the operands are copied into panels that the
//! register-tiled micro-kernel reads in order (`A` in `MR`-row panels, `B` in `NR`-column
//! panels, blocked by `KC` along the shared dimension so that a `B` panel stays in L1 and an
//! `A` block in L2), and each `MR × NR` tile of the product is accumulated in registers.
//!
//! The micro-kernel is chosen at run time from what the CPU offers ([`Isa`]): AVX-512 FMA,
//! AVX2 + FMA, or portable code that the compiler vectorises for the baseline. The
//! environment variable `DIFFUSE_ISA` (`avx512`, `avx2`, `portable`) forces a lower level, so
//! that every path can be tested on a machine that has the higher ones; `DIFFUSE_ISA=tensor`
//! turns the kernels off (see [`kernels_enabled`]).
//!
//! `B` reaches the driver through [`PackB`], so a convolution can write its im2col patches
//! straight into the panels (an implicit GEMM: no full column buffer); an operand used many
//! times (the keys and values of an attention head) can be packed once ([`PackedA`],
//! [`PackedB`]); and a row-major `A` can be read where it lies ([`ASource::InPlace`], a
//! convolution's kernel), which saves its packing traffic.

use std::mem::MaybeUninit;
use std::sync::OnceLock;

use rayon::prelude::*;

/// Panel depth along the shared dimension: an AVX-512 `B` panel is 32 KiB, an `A` panel 12 KiB.
pub(crate) const KC: usize = 256;
/// Rows of `A` per block (a multiple of every `MR`): 240 × 256 floats = 240 KiB, in L2.
const MC: usize = 240;
/// Columns of `B` per block: 1,024 × 256 floats = 1 MiB, the L2 of the smaller cores seen.
const NC: usize = 1024;

/// The instruction set the micro-kernels use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Plain Rust, vectorised by the compiler for the target's baseline.
    Portable,
    /// 256-bit AVX2 with fused multiply-add.
    Avx2,
    /// 512-bit AVX-512 (foundation) with fused multiply-add.
    Avx512,
    /// AVX-512 with the bf16 dot product `vdpbf16ps` (32 bf16 products per instruction into
    /// f32): the bf16 kernels' native level; f32 products run as on [`Isa::Avx512`].
    Avx512Bf16,
    /// [`Isa::Avx512Bf16`] with bf16 matrix products on AMX tiles (`ops::amx`), where the
    /// CPU has them and the OS grants them.
    Amx,
}

impl Isa {
    /// The name `DIFFUSE_ISA` takes and `--profile` prints.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Avx512Bf16 => "avx512bf16",
            Isa::Amx => "amx",
        }
    }

    /// Whether this CPU (and OS) can run the level.
    pub fn is_supported(self) -> bool {
        match self {
            Isa::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => is_x86_feature_detected!("avx512f"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Bf16 => is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16"),
            #[cfg(target_arch = "x86_64")]
            Isa::Amx => super::amx::usable(),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    const ALL: [Isa; 5] = [Isa::Portable, Isa::Avx2, Isa::Avx512, Isa::Avx512Bf16, Isa::Amx];

    /// Every level this machine supports, lowest first (the tests run each).
    pub fn all_supported() -> Vec<Isa> {
        Self::ALL.into_iter().filter(|isa| isa.is_supported()).collect()
    }

    /// The micro-kernel's tile: rows of `A` and columns of `B` it keeps in registers.
    pub fn tile(self) -> (usize, usize) {
        match self {
            Isa::Avx512 | Isa::Avx512Bf16 | Isa::Amx => (12, 32),
            Isa::Avx2 => (6, 16),
            Isa::Portable => (4, 16),
        }
    }
}

/// Whether the project's CPU kernels run at all. `DIFFUSE_ISA=tensor` turns them off: the CPU
/// then takes candle's tensor operations, the path every other device (CUDA, Metal) takes, so
/// that path is tested against diffusers on machines without a GPU.
pub fn kernels_enabled() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var("DIFFUSE_ISA").as_deref() != Ok("tensor"))
}

/// The level in use: the best this CPU supports, or the lower one `DIFFUSE_ISA` asks for.
pub fn isa() -> Isa {
    static CHOSEN: OnceLock<Isa> = OnceLock::new();
    *CHOSEN.get_or_init(|| {
        let best = Isa::all_supported().into_iter().max().unwrap_or(Isa::Portable);
        let Ok(requested) = std::env::var("DIFFUSE_ISA") else { return best };
        if requested == "tensor" {
            return best; // no kernel runs (kernels_enabled); tests of the kernels still may
        }
        match Isa::ALL.into_iter().find(|isa| isa.name() == requested) {
            Some(isa) if isa.is_supported() => isa,
            Some(isa) => {
                eprintln!("DIFFUSE_ISA={}: this CPU lacks it; using {}", isa.name(), best.name());
                best
            }
            None => {
                eprintln!("DIFFUSE_ISA={requested}: not one of portable, avx2, avx512, avx512bf16, amx, tensor; using {}", best.name());
                best
            }
        }
    })
}

/// A read-only strided view of a `rows × cols` f32 matrix: element `(i, j)` is
/// `data[i * row_stride + j * col_stride]`. Construction checks that every element is inside
/// `data`, so nothing that reads through a view can go out of bounds.
#[derive(Debug, Clone, Copy)]
pub struct MatRef<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A view, or `None` if some element would lie outside `data`.
    pub fn new(data: &'a [f32], rows: usize, cols: usize, row_stride: usize, col_stride: usize) -> Option<Self> {
        if rows > 0 && cols > 0 {
            let last = (rows - 1).checked_mul(row_stride)?.checked_add((cols - 1).checked_mul(col_stride)?)?;
            if last >= data.len() {
                return None;
            }
        }
        Some(Self { data, rows, cols, row_stride, col_stride })
    }

    /// A row-major view (`row_stride = cols`).
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Option<Self> {
        Self::new(data, rows, cols, cols, 1)
    }

    /// The same data read as its transpose.
    pub fn t(self) -> Self {
        Self { data: self.data, rows: self.cols, cols: self.rows, row_stride: self.col_stride, col_stride: self.row_stride }
    }

    /// Rows of the view.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns of the view.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Elements `j0..j0 + len` of row `i` as a slice, when the view's columns are contiguous.
    pub(crate) fn row_run(&self, i: usize, j0: usize, len: usize) -> Option<&'a [f32]> {
        let start = i * self.row_stride + j0;
        (self.col_stride == 1 && i < self.rows && j0 + len <= self.cols).then(|| &self.data[start..start + len])
    }

    /// Elements `i0..i0 + len` of column `j` as a slice, when the view's rows are contiguous
    /// (a row-major matrix read transposed).
    pub(crate) fn column_run(&self, i0: usize, j: usize, len: usize) -> Option<&'a [f32]> {
        let start = i0 + j * self.col_stride;
        (self.row_stride == 1 && j < self.cols && i0 + len <= self.rows).then(|| &self.data[start..start + len])
    }

    pub(crate) fn at(&self, i: usize, j: usize) -> f32 {
        self.data[i * self.row_stride + j * self.col_stride]
    }

    /// Whether each row's elements are contiguous (the micro-kernel can read it in place).
    pub(crate) fn rows_are_contiguous(&self) -> bool {
        self.col_stride == 1
    }

    /// Columns `first..first + len` (in range) as a view of their own.
    pub(crate) fn columns(self, first: usize, len: usize) -> Self {
        assert!(first + len <= self.cols, "MatRef: columns out of range");
        if len == 0 || self.rows == 0 {
            return Self { cols: len, ..self };
        }
        Self { data: &self.data[first * self.col_stride..], cols: len, ..self }
    }
}

/// A source of `B` (`k × n`) that can write its panels: for columns `n0..n0 + nc` and depth
/// `k0..k0 + kc`, panel `p` holds `kc` rows of `nr` values (columns `n0 + p·nr ..`), zero past
/// column `n`. `out` has room for `ceil(nc / nr) · kc · nr` values.
pub trait PackB: Sync {
    /// `(k, n)`.
    fn dims(&self) -> (usize, usize);
    /// Writes the panels for columns `n0..n0 + nc` and depth `k0..k0 + kc` into `out`.
    fn pack(&self, k0: usize, kc: usize, n0: usize, nc: usize, nr: usize, out: &mut [f32]);

    /// The panels for this block: packed into `scratch` (grown as needed), or borrowed where
    /// they already exist.
    fn panels<'s>(&'s self, k0: usize, kc: usize, n0: usize, nc: usize, nr: usize, scratch: &'s mut Vec<f32>) -> &'s [f32] {
        let len = nc.div_ceil(nr) * nr * kc;
        if scratch.len() < len {
            scratch.resize(len, 0.0);
        }
        self.pack(k0, kc, n0, nc, nr, &mut scratch[..len]);
        &scratch[..len]
    }
}

impl PackB for MatRef<'_> {
    fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    fn pack(&self, k0: usize, kc: usize, n0: usize, nc: usize, nr: usize, out: &mut [f32]) {
        for (panel, chunk) in out.chunks_exact_mut(kc * nr).take(nc.div_ceil(nr)).enumerate() {
            let first = n0 + panel * nr;
            let width = nr.min(n0 + nc - first);
            if self.col_stride == 1 && width == nr {
                // Row-major, a whole panel: `kc` runs of `nr` values, one row apart.
                copy_runs(&self.data[k0 * self.row_stride + first..], self.row_stride, nr, chunk);
                continue;
            }
            for (kk, row) in chunk.chunks_exact_mut(nr).enumerate() {
                let k = k0 + kk;
                if self.col_stride == 1 {
                    let start = k * self.row_stride + first;
                    row[..width].copy_from_slice(&self.data[start..start + width]);
                } else if self.row_stride != 1 {
                    for (j, value) in row[..width].iter_mut().enumerate() {
                        *value = self.at(k, first + j);
                    }
                }
                row[width..].fill(0.0);
            }
            if self.row_stride == 1 && self.col_stride != 1 {
                // A transposed row-major matrix (a weight read as Wᵀ): each column is a
                // contiguous run of the source. Eight runs at a time, so that each panel row
                // gets eight adjacent values per visit rather than one.
                const RUNS: usize = 8;
                let run = |j: usize| {
                    let start = (first + j) * self.col_stride + k0;
                    &self.data[start..start + kc]
                };
                let mut j = 0;
                while j + RUNS <= width {
                    let runs: [&[f32]; RUNS] = std::array::from_fn(|r| run(j + r));
                    for (kk, row) in chunk.chunks_exact_mut(nr).take(kc).enumerate() {
                        for (value, source) in row[j..j + RUNS].iter_mut().zip(&runs) {
                            *value = source[kk];
                        }
                    }
                    j += RUNS;
                }
                for j in j..width {
                    for (kk, &value) in run(j).iter().enumerate() {
                        chunk[kk * nr + j] = value;
                    }
                }
            }
        }
    }
}

/// `dst`'s rows of `len` values from `src`, one run of `len` every `stride` values: a whole
/// panel of a row-major `B` (`len` = NR) or of a column-major `A` (`len` = MR). The tiles'
/// widths are copied as fixed runs, a few vector moves each: with the width a variable, each
/// run was a call to `memmove` (a tenth of a 1×1 convolution's time).
fn copy_runs(src: &[f32], stride: usize, len: usize, dst: &mut [f32]) {
    match len {
        6 => copy_fixed_runs::<6>(src, stride, dst),
        12 => copy_fixed_runs::<12>(src, stride, dst),
        16 => copy_fixed_runs::<16>(src, stride, dst),
        32 => copy_fixed_runs::<32>(src, stride, dst),
        _ => dst.chunks_exact_mut(len.max(1)).enumerate().for_each(|(k, row)| row.copy_from_slice(&src[k * stride..][..row.len()])),
    }
}

/// [`copy_runs`] with the run's length fixed.
fn copy_fixed_runs<const N: usize>(src: &[f32], stride: usize, dst: &mut [f32]) {
    for (k, row) in dst.chunks_exact_mut(N).enumerate() {
        let run: &[f32; N] = src[k * stride..][..N].try_into().expect("N values");
        row.copy_from_slice(run);
    }
}

/// Writes `A`'s panels for rows `m0..m0 + mc` and depth `k0..k0 + kc`: panel `p` holds `kc`
/// columns of `mr` values (rows `m0 + p·mr ..`), zero past row `m`.
fn pack_a(a: &MatRef, k0: usize, kc: usize, m0: usize, mc: usize, mr: usize, out: &mut [f32]) {
    for (panel, chunk) in out.chunks_exact_mut(kc * mr).take(mc.div_ceil(mr)).enumerate() {
        let first = m0 + panel * mr;
        let height = mr.min(m0 + mc - first);
        if a.col_stride == 1 {
            // Row-major: each row is a contiguous run, scattered into the panel with stride mr.
            for i in 0..height {
                let start = (first + i) * a.row_stride + k0;
                for (kk, &value) in a.data[start..start + kc].iter().enumerate() {
                    chunk[kk * mr + i] = value;
                }
            }
            if height < mr {
                for column in chunk.chunks_exact_mut(mr) {
                    column[height..].fill(0.0);
                }
            }
            continue;
        }
        if a.row_stride == 1 && height == mr {
            // A transposed row-major matrix, a whole panel: `kc` runs of `mr` values.
            copy_runs(&a.data[k0 * a.col_stride + first..], a.col_stride, mr, chunk);
            continue;
        }
        for (kk, column) in chunk.chunks_exact_mut(mr).enumerate() {
            if a.row_stride == 1 {
                // A transposed row-major matrix (attention's probabilities): a panel column
                // is a contiguous run of the source.
                let start = (k0 + kk) * a.col_stride + first;
                column[..height].copy_from_slice(&a.data[start..start + height]);
            } else {
                for (i, value) in column[..height].iter_mut().enumerate() {
                    *value = a.at(first + i, k0 + kk);
                }
            }
            column[height..].fill(0.0);
        }
    }
}

/// `A` (`m × k`) packed once for the current [`Isa`], e.g. a layer's weight: for each `KC`
/// block of depth, all row panels of `MR` rows.
#[derive(Debug)]
pub struct PackedA {
    isa: Isa,
    rows: usize,
    depth: usize,
    data: Vec<f32>,
}

impl PackedA {
    /// Packs `a` for the running CPU's kernel.
    pub fn new(a: &MatRef) -> Self {
        Self::with_isa(a, isa())
    }

    /// Packed for the tile of `isa` (the tests force each level).
    pub(crate) fn with_isa(a: &MatRef, isa: Isa) -> Self {
        let mut packed = Self { isa, rows: 0, depth: 0, data: Vec::new() };
        packed.repack_in_place(a);
        packed
    }

    /// Packs `a` for this packing's level, reusing the allocation.
    pub(crate) fn repack_in_place(&mut self, a: &MatRef) {
        let (mr, _) = self.isa.tile();
        let (m, k) = (a.rows, a.cols);
        let padded = m.div_ceil(mr) * mr;
        self.data.resize(padded * k, 0.0);
        // A large operand (a weight) is worth all threads, in tasks of 16 independent panels;
        // small ones (attention's blocks, packed inside tasks that are parallel already) not.
        let parallel = m * k >= 1 << 20;
        for k0 in (0..k).step_by(KC) {
            let kc = KC.min(k - k0);
            let block = &mut self.data[k0 * padded..(k0 + kc) * padded];
            let task = 16 * mr * kc;
            let pack_task = |(index, chunk): (usize, &mut [f32])| {
                let first = index * 16 * mr;
                pack_a(a, k0, kc, first, (16 * mr).min(m - first), mr, chunk);
            };
            if parallel {
                block.par_chunks_mut(task).enumerate().for_each(pack_task);
            } else {
                block.chunks_mut(task).enumerate().for_each(pack_task);
            }
        }
        (self.rows, self.depth) = (m, k);
    }

    /// The panels of rows `m0..` (a multiple of MR) for the depth block starting at `k0`.
    fn block(&self, k0: usize, kc: usize, m0: usize, mc: usize) -> &[f32] {
        let (mr, _) = self.isa.tile();
        let padded = self.rows.div_ceil(mr) * mr;
        let start = k0 * padded + m0 * kc;
        &self.data[start..start + mc.div_ceil(mr) * mr * kc]
    }
}

/// `B` (`k × n`) packed once, e.g. the keys or values of one attention head, read by many
/// products: for each `KC` block of depth, all column panels of `NR` columns.
#[derive(Debug)]
pub struct PackedB {
    nr: usize,
    depth: usize,
    cols: usize,
    data: Vec<f32>,
}

impl PackedB {
    /// `b` packed for the current [`Isa`] (a layer's weight read by every call).
    pub fn new(b: &impl PackB) -> Self {
        Self::with_isa(b, isa())
    }

    /// `B` again, row-major (`k × n`): for the rare product that needs it in another layout
    /// (a frozen layer's input gradient in training).
    pub fn unpacked(&self) -> Vec<f32> {
        let (nr, n) = (self.nr, self.cols);
        let padded = n.div_ceil(nr) * nr;
        let mut b = vec![0f32; self.depth * n];
        for (k, row) in b.chunks_exact_mut(n.max(1)).enumerate().take(self.depth) {
            let (k0, kc) = (k / KC * KC, KC.min(self.depth - k / KC * KC));
            for (j, value) in row.iter_mut().enumerate() {
                *value = self.data[k0 * padded + j / nr * kc * nr + (k - k0) * nr + j % nr];
            }
        }
        b
    }

    /// Packed for the tile of `isa` (the tests force each level).
    pub(crate) fn with_isa(b: &impl PackB, isa: Isa) -> Self {
        let (_, nr) = isa.tile();
        let (k, n) = b.dims();
        let padded = n.div_ceil(nr) * nr;
        let mut data = vec![0f32; padded * k];
        for k0 in (0..k).step_by(KC) {
            let kc = KC.min(k - k0);
            b.pack(k0, kc, 0, n, nr, &mut data[k0 * padded..(k0 + kc) * padded]);
        }
        Self { nr, depth: k, cols: n, data }
    }
}

impl PackB for PackedB {
    fn dims(&self) -> (usize, usize) {
        (self.depth, self.cols)
    }

    fn pack(&self, k0: usize, kc: usize, n0: usize, nc: usize, nr: usize, out: &mut [f32]) {
        let len = nc.div_ceil(nr) * nr * kc;
        out[..len].copy_from_slice(self.block(k0, kc, n0, nc, nr));
    }

    fn panels<'s>(&'s self, k0: usize, kc: usize, n0: usize, nc: usize, nr: usize, _: &'s mut Vec<f32>) -> &'s [f32] {
        self.block(k0, kc, n0, nc, nr)
    }
}

impl PackedB {
    /// The stored panels of a block: `k0` starts a `KC` block (of its full depth) and `n0` a panel.
    fn block(&self, k0: usize, kc: usize, n0: usize, nc: usize, nr: usize) -> &[f32] {
        assert_eq!(nr, self.nr, "PackedB was packed for another ISA");
        assert!(k0 % KC == 0 && kc == KC.min(self.depth - k0) && n0 % nr == 0, "PackedB: not a packed block");
        let padded = self.cols.div_ceil(nr) * nr;
        let start = k0 * padded + n0 * kc;
        &self.data[start..start + nc.div_ceil(nr) * nr * kc]
    }
}

/// Columns `first..first + len` of a `B`, as a `B` of its own (starting at a panel).
pub struct Columns<'a, B: PackB> {
    /// The whole `B`.
    pub inner: &'a B,
    /// The first column taken.
    pub first: usize,
    /// Columns taken.
    pub len: usize,
}

impl<B: PackB> PackB for Columns<'_, B> {
    fn dims(&self) -> (usize, usize) {
        (self.inner.dims().0, self.len)
    }

    fn pack(&self, k0: usize, kc: usize, n0: usize, nc: usize, nr: usize, out: &mut [f32]) {
        self.inner.pack(k0, kc, self.first + n0, nc, nr, out)
    }

    fn panels<'s>(&'s self, k0: usize, kc: usize, n0: usize, nc: usize, nr: usize, scratch: &'s mut Vec<f32>) -> &'s [f32] {
        self.inner.panels(k0, kc, self.first + n0, nc, nr, scratch)
    }
}

/// Rows `first..first + len` of a `B` (a range of the product's depth), as a `B` of its own,
/// for the f32 products and (`gemm_bf16`) the bf16 ones. `first` is a multiple of the driver's
/// depth block, so that a packed `B`'s blocks stay whole.
pub(crate) struct DepthRange<'a, B> {
    pub(crate) inner: &'a B,
    pub(crate) first: usize,
    pub(crate) len: usize,
}

impl<B: PackB> PackB for DepthRange<'_, B> {
    fn dims(&self) -> (usize, usize) {
        (self.len, self.inner.dims().1)
    }

    fn pack(&self, k0: usize, kc: usize, n0: usize, nc: usize, nr: usize, out: &mut [f32]) {
        self.inner.pack(self.first + k0, kc, n0, nc, nr, out)
    }

    fn panels<'s>(&'s self, k0: usize, kc: usize, n0: usize, nc: usize, nr: usize, scratch: &'s mut Vec<f32>) -> &'s [f32] {
        self.inner.panels(self.first + k0, kc, n0, nc, nr, scratch)
    }
}

/// Where `A` comes from: a strided view (packed block by block as it is used) or panels
/// packed once.
#[derive(Clone, Copy)]
pub enum ASource<'a> {
    /// A strided view, packed block by block as it is used.
    View(MatRef<'a>),
    /// Panels packed once.
    Packed(&'a PackedA),
    /// A row-major matrix (column stride 1) that the micro-kernel reads where it lies, a row
    /// per register row: nothing is copied but a last partial panel. For a convolution's
    /// kernel, or training's activations, whose packing per call would cost as much memory
    /// traffic as it saves.
    InPlace(MatRef<'a>),
}

impl ASource<'_> {
    fn dims(&self) -> (usize, usize) {
        match self {
            ASource::View(a) | ASource::InPlace(a) => (a.rows, a.cols),
            ASource::Packed(a) => (a.rows, a.depth),
        }
    }
}

/// What a product does with `C`'s previous contents.
#[derive(Debug, Clone, Copy)]
pub enum Init<'a> {
    /// `C = A·B`.
    Overwrite,
    /// `C += A·B`.
    Accumulate,
    /// `C[i, j] = bias[i] + (A·B)[i, j]` (a convolution's bias, one per output channel).
    RowBias(&'a [f32]),
    /// `C[i, j] = bias[j] + (A·B)[i, j]` (a linear layer's bias, one per output feature).
    ColumnBias(&'a [f32]),
}

impl Init<'_> {
    /// The part of the bias that a block of `C` (rows from `m0`, columns from `n0`) sees.
    pub(crate) fn offset(self, m0: usize, n0: usize) -> Self {
        match self {
            Init::RowBias(bias) => Init::RowBias(&bias[m0..]),
            Init::ColumnBias(bias) => Init::ColumnBias(&bias[n0..]),
            other => other,
        }
    }
}

/// `C[m × n] (+)= A[m × k] · B[k × n]`, with `C` row-major with row stride `ldc`, its previous
/// contents overwritten, accumulated into or offset by a bias as `init` says. When `parallel`,
/// the rayon threads share `C` by column ranges if it is wider than tall (each packs only its
/// part of `B`), else by row ranges. A product with little output and much depth is split
/// along the depth instead ([`depth_share`]), whether `parallel` or not, so that its sums are
/// the same for any thread count.
///
/// Panics if the operands' dimensions disagree or `c` is too short: callers size them.
pub fn gemm(c: &mut [f32], ldc: usize, a: ASource, b: &impl PackB, init: Init, parallel: bool) {
    let isa = match a {
        ASource::Packed(packed) => packed.isa,
        ASource::View(_) | ASource::InPlace(_) => isa(),
    };
    gemm_with(isa, c, ldc, a, b, init, parallel)
}

/// [`gemm`] into a new output, `c` (`m × n` with row stride `ldc`), that the product writes in
/// full, so that it need not be zeroed first (see [`fresh_output`]). `init` must not be
/// [`Init::Accumulate`].
pub fn gemm_fresh(c: &mut [MaybeUninit<f32>], ldc: usize, a: ASource, b: &impl PackB, init: Init, parallel: bool) {
    assert!(!matches!(init, Init::Accumulate), "gemm: a fresh output has nothing to add to");
    let isa = match a {
        ASource::Packed(packed) => packed.isa,
        ASource::View(_) | ASource::InPlace(_) => isa(),
    };
    let (m, n) = (a.dims().0, b.dims().1);
    product(isa, COut::fresh(c, ldc, m, n), a, b, init, parallel)
}

/// A new output of `len` values that `write` fills in full, without a pass that zeroes it
/// first (for a large output, as long as one pass of an element-wise operation).
///
/// # Safety
/// `write` writes every element of the slice it is given (e.g. [`gemm_fresh`] with every row
/// and column of its `C` in the slice).
pub(crate) unsafe fn fresh_output(len: usize, write: impl FnOnce(&mut [MaybeUninit<f32>])) -> Vec<f32> {
    let mut values = Vec::with_capacity(len);
    write(&mut values.spare_capacity_mut()[..len]);
    // SAFETY: the first `len` elements are initialised (the caller's contract) and within the
    // capacity.
    unsafe { values.set_len(len) };
    values
}

/// [`gemm`] on the micro-kernel of `isa` (a packed `A` must have been packed for it).
pub(crate) fn gemm_with(isa: Isa, c: &mut [f32], ldc: usize, a: ASource, b: &impl PackB, init: Init, parallel: bool) {
    let (m, n) = (a.dims().0, b.dims().1);
    product(isa, COut::new(c, ldc, m, n), a, b, init, parallel)
}

/// [`gemm_with`] into `c`, `A`'s rows × `B`'s columns.
fn product(isa: Isa, c: COut, a: ASource, b: &impl PackB, init: Init, parallel: bool) {
    match a {
        ASource::Packed(packed) => assert_eq!(packed.isa, isa, "gemm: A was packed for another ISA"),
        ASource::InPlace(view) => assert!(view.col_stride == 1 || view.cols <= 1, "gemm: A in place must be row-major"),
        ASource::View(_) => {}
    }
    let (m, k) = a.dims();
    let (kb, n) = b.dims();
    assert_eq!(k, kb, "gemm: A has {k} columns, B {kb} rows");
    match init {
        Init::RowBias(bias) => assert!(bias.len() >= m, "gemm: a bias per row"),
        Init::ColumnBias(bias) => assert!(bias.len() >= n, "gemm: a bias per column"),
        _ => {}
    }
    if m == 0 || n == 0 {
        return;
    }
    if let Some(per_share) = depth_share(m, n, k, KC).filter(|_| !matches!(a, ASource::Packed(_))) {
        split_depth(c, (m, n, k), per_share, init, parallel, |first, len, out| {
            let a = match a {
                ASource::View(view) => ASource::View(view.columns(first, len)),
                ASource::InPlace(view) => ASource::InPlace(view.columns(first, len)),
                ASource::Packed(_) => unreachable!("a packed A is not split by depth"),
            };
            gemm_block(isa, COut::new(out, n, m, n), 0, a, &DepthRange { inner: b, first, len }, Init::Overwrite);
        });
        return;
    }
    let (mr, nr) = isa.tile();
    for_each_share(c, mr, nr, parallel, |part, m0, first, len| {
        if (first, len) == (0, n) {
            gemm_block(isa, part, m0, a, b, init.offset(m0, 0));
        } else {
            gemm_block(isa, part, m0, a, &Columns { inner: b, first, len }, init.offset(m0, first));
        }
    });
}

/// Shares of the depth a product with little output and much depth is split into (a weight's
/// gradient `Gᵀ·X` over thousands of rows): as many as the machines seen have cores, and
/// fixed, so that the sums do not depend on the thread count.
const DEPTH_SHARES: usize = 4;

/// The depth of each share when a product is split along its depth ([`DEPTH_SHARES`]), or
/// `None` when splitting the output is the better way. Split by rows or columns of the
/// output, every thread would pack all of one operand, as much work as its share of the
/// product when the depth is this long; split by depth, each packs its own part of both and
/// the partial products (small: at most 4 Mi values together) are added at the end. The
/// shares are whole depth blocks of `block` (the driver's `KC`).
pub(crate) fn depth_share(m: usize, n: usize, k: usize, block: usize) -> Option<usize> {
    if k < 2 * block || k < 4 * m.max(n) || m * n > (1 << 20) {
        return None;
    }
    let shares = DEPTH_SHARES.min(k / block);
    Some(k.div_ceil(shares).next_multiple_of(block))
}

/// `C (+)= A·B` (`m × n`, depth `k`) as partial products over `per_share` of the depth each,
/// `partial(first, len, out)` writing the product of depth `first..first + len` into `out`
/// (`m × n`, row-major); on all threads when `parallel`; added in share order and applied to
/// `c` as `init` says.
pub(crate) fn split_depth(c: COut, (m, n, k): (usize, usize, usize), per_share: usize, init: Init, parallel: bool, partial: impl Fn(usize, usize, &mut [f32]) + Sync) {
    assert!(c.rows == m && c.cols == n, "gemm: C is {}×{}, the product {m}×{n}", c.rows, c.cols);
    let shares = k.div_ceil(per_share);
    let mut partials = vec![0f32; shares * m * n];
    let product = |(share, out): (usize, &mut [f32])| {
        let first = share * per_share;
        partial(first, per_share.min(k - first), out)
    };
    if parallel {
        partials.par_chunks_mut(m * n).enumerate().for_each(product);
    } else {
        partials.chunks_mut(m * n).enumerate().for_each(product);
    }
    let (first, rest) = partials.split_at(m * n);
    for i in 0..m {
        let sum = |j: usize| rest.chunks_exact(m * n).fold(first[i * n + j], |s, p| s + p[i * n + j]);
        if let Init::Accumulate = init {
            // SAFETY: `c` is all this caller's; an accumulated `C` holds values.
            let row = unsafe { c.row(i, 0, n) };
            row.iter_mut().enumerate().for_each(|(j, c)| *c += sum(j));
            continue;
        }
        // SAFETY: `c` is all this caller's.
        let row = unsafe { c.row_uninit(i, 0, n) };
        match init {
            Init::RowBias(bias) => row.iter_mut().enumerate().for_each(|(j, c)| _ = c.write(bias[i] + sum(j))),
            Init::ColumnBias(bias) => row.iter_mut().enumerate().for_each(|(j, c)| _ = c.write(bias[j] + sum(j))),
            Init::Overwrite | Init::Accumulate => row.iter_mut().enumerate().for_each(|(j, c)| _ = c.write(sum(j))),
        }
    }
}

/// Splits a product into `c` (`m × n`, tiles of `mr × nr`) over the rayon threads when
/// `parallel`, and calls `block(part, first row, first column, columns)` for each share. Wide
/// products (a convolution of one large image) go by column ranges, so that each thread packs
/// only its own part of `B`; tall ones (a linear layer over many tokens) by row ranges.
pub(crate) fn for_each_share(c: COut, mr: usize, nr: usize, parallel: bool, block: impl Fn(COut, usize, usize, usize) + Sync) {
    let (m, n) = (c.rows, c.cols);
    let threads = if parallel { rayon::current_num_threads() } else { 1 };
    let (row_panels, column_panels) = (m.div_ceil(mr), n.div_ceil(nr));
    if threads == 1 || (row_panels < 2 && column_panels < 2) {
        block(c, 0, 0, n);
    } else if n > m && column_panels >= threads {
        let per_share = column_panels.div_ceil(threads) * nr;
        (0..n.div_ceil(per_share)).into_par_iter().for_each(|share| {
            let first = share * per_share;
            let len = per_share.min(n - first);
            block(c.columns(first, len), 0, first, len);
        });
    } else {
        let per_share = row_panels.div_ceil(threads.min(row_panels)) * mr;
        (0..m.div_ceil(per_share)).into_par_iter().for_each(|share| {
            let first = share * per_share;
            block(c.rows(first, per_share.min(m - first)), first, 0, n);
        });
    }
}

/// The destination of a product: `rows × cols` floats from `ptr`, rows `ldc` apart. Threads
/// write disjoint row or column ranges of one matrix through copies of it, which `&mut`
/// slices (one contiguous range each) cannot express for column ranges.
#[derive(Clone, Copy)]
pub(crate) struct COut {
    ptr: *mut f32,
    ldc: usize,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
}

// SAFETY: a `COut` is only made from a `&mut [f32]` borrowed for the whole product
// (`gemm_with`, `gemm_rows`), and split into disjoint row or column ranges, one per thread,
// so no element is written by two threads or read by anyone else meanwhile.
unsafe impl Send for COut {}
// SAFETY: as above.
unsafe impl Sync for COut {}

impl COut {
    /// Panics unless `c` holds `rows × cols` with row stride `ldc`.
    pub(crate) fn new(c: &mut [f32], ldc: usize, rows: usize, cols: usize) -> Self {
        assert!(ldc >= cols && (rows == 0 || cols == 0 || c.len() >= (rows - 1) * ldc + cols), "gemm: C is too small");
        Self { ptr: c.as_mut_ptr(), ldc, rows, cols }
    }

    /// [`COut::new`] over memory that may not be written yet: each element is to be written
    /// (through [`COut::row_uninit`], or a kernel's tile that does not add) before it is read
    /// or taken by [`COut::row`].
    pub(crate) fn fresh(c: &mut [MaybeUninit<f32>], ldc: usize, rows: usize, cols: usize) -> Self {
        assert!(ldc >= cols && (rows == 0 || cols == 0 || c.len() >= (rows - 1) * ldc + cols), "gemm: C is too small");
        Self { ptr: c.as_mut_ptr().cast(), ldc, rows, cols }
    }

    fn columns(self, first: usize, len: usize) -> Self {
        assert!(first + len <= self.cols);
        // `wrapping_add` keeps this safe; the pointer is only dereferenced in `row`, or by a
        // kernel through `tile_out`, in bounds.
        Self { ptr: self.ptr.wrapping_add(first), cols: len, ..self }
    }

    fn rows(self, first: usize, len: usize) -> Self {
        assert!(first + len <= self.rows);
        Self { ptr: self.ptr.wrapping_add(first * self.ldc), rows: len, ..self }
    }

    /// The `height × width` block at `(i, j)` as a micro-kernel's destination (panics unless it
    /// lies inside). Writing through it has [`COut::row`]'s contract.
    fn tile_out(&self, i: usize, j: usize, height: usize, width: usize, add: bool) -> TileOut {
        assert!(height > 0 && i + height <= self.rows && j + width <= self.cols, "gemm: tile outside C");
        TileOut { ptr: self.ptr.wrapping_add(i * self.ldc + j), ld: self.ldc, add }
    }

    /// Elements `j..j + width` of row `i`.
    ///
    /// # Safety
    /// No other live reference covers these elements (the split into disjoint ranges), and
    /// they hold values (not fresh memory never written: see [`COut::fresh`]).
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn row(&self, i: usize, j: usize, width: usize) -> &mut [f32] {
        assert!(i < self.rows && j + width <= self.cols, "gemm: write outside C");
        // SAFETY: in bounds of the matrix `new` checked (the assertion), exclusive and holding
        // values by the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(i * self.ldc + j), width) }
    }

    /// Elements `j..j + width` of row `i`, to be written (they may be fresh memory).
    ///
    /// # Safety
    /// No other live reference covers these elements (the split into disjoint ranges).
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn row_uninit(&self, i: usize, j: usize, width: usize) -> &mut [MaybeUninit<f32>] {
        assert!(i < self.rows && j + width <= self.cols, "gemm: write outside C");
        // SAFETY: in bounds (the assertion), exclusive by the caller's contract; any memory is a
        // valid `MaybeUninit<f32>`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(i * self.ldc + j).cast(), width) }
    }
}

/// [`gemm`] on one thread for all of `c` (`rows × n`, with `ldc`), whose first row is row
/// `m0` of `A`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_rows(isa: Isa, c: &mut [f32], ldc: usize, m0: usize, rows: usize, a: ASource, b: &impl PackB, init: Init) {
    let (_, n) = b.dims();
    if rows == 0 || n == 0 {
        return;
    }
    gemm_block(isa, COut::new(c, ldc, rows, n), m0, a, b, init);
}

/// The product into `c`, whose first row is row `m0` of `A` and whose columns are `b`'s
/// (`init`'s bias already offset to this block).
fn gemm_block(isa: Isa, c: COut, m0: usize, a: ASource, b: &impl PackB, init: Init) {
    let (mr, nr) = isa.tile();
    let (_, k) = a.dims();
    let (_, n) = b.dims();
    let rows = c.rows;
    assert_eq!(c.cols, n);
    if k == 0 {
        store_empty_product(&c, init);
        return;
    }
    let mut b_scratch = Vec::new();
    let mut a_panels = match a {
        ASource::View(_) => vec![0f32; KC.min(k) * MC.min(rows).div_ceil(mr) * mr],
        ASource::InPlace(_) => vec![0f32; KC.min(k) * mr],
        ASource::Packed(_) => Vec::new(),
    };
    let mut tile = [0f32; 12 * 32];
    for n0 in (0..n).step_by(NC) {
        let nc = NC.min(n - n0);
        for k0 in (0..k).step_by(KC) {
            let kc = KC.min(k - k0);
            let b_panels = b.panels(k0, kc, n0, nc, nr, &mut b_scratch);
            for i0 in (0..rows).step_by(MC) {
                let mc = MC.min(rows - i0);
                let panels = mc.div_ceil(mr);
                let a_block: &[f32] = match a {
                    ASource::View(view) => {
                        pack_a(&view, k0, kc, m0 + i0, mc, mr, &mut a_panels);
                        &a_panels
                    }
                    ASource::Packed(packed) => packed.block(k0, kc, m0 + i0, mc),
                    ASource::InPlace(view) => {
                        // Only a last partial panel is packed (its missing rows read as zeros).
                        let last = (panels - 1) * mr;
                        if mc - last < mr {
                            pack_a(&view, k0, kc, m0 + i0 + last, mc - last, mr, &mut a_panels[..kc * mr]);
                        }
                        &a_panels
                    }
                };
                for (jp, b_panel) in b_panels.chunks_exact(kc * nr).take(nc.div_ceil(nr)).enumerate() {
                    let j = n0 + jp * nr;
                    let width = nr.min(n - j);
                    for ip in 0..panels {
                        let i = i0 + ip * mr;
                        let height = mr.min(rows - i);
                        // `A`'s MR rows where they lie (`lda` apart), or a packed panel.
                        let (panel_of_a, lda) = match a {
                            ASource::InPlace(view) if height == mr => (&view.data[(m0 + i) * view.row_stride + k0..], Some(view.row_stride)),
                            ASource::InPlace(_) => (&a_block[..kc * mr], None),
                            _ => (&a_block[ip * kc * mr..(ip + 1) * kc * mr], None),
                        };
                        assert!(panel_of_a.len() >= lda.map_or(kc * mr, |lda| (mr - 1) * lda + kc) && b_panel.len() >= kc * nr, "gemm: panel sizes");
                        // A whole tile of C is written (or added to) where it lies, a bias then
                        // added to it while it is in L1; partial tiles go through the tile buffer.
                        let direct = height == mr && width == nr;
                        let out = if direct {
                            c.tile_out(i, j, mr, nr, k0 > 0 || matches!(init, Init::Accumulate))
                        } else {
                            TileOut::buffer(&mut tile, mr, nr)
                        };
                        let walk = BWalk::panel(kc, nr);
                        // SAFETY: `isa` is supported (`gemm_with`'s callers choose it with
                        // `isa()` or pack for it); the assertion keeps the kernel's reads inside
                        // the panels (`A`'s MR rows `lda` apart in place); `out` is the tile
                        // buffer or a whole `isa.tile()` tile of this thread's part of C
                        // (`COut::tile_out` checks it is inside), which `A` and `B` cannot
                        // overlap (C is borrowed mutably for the whole product).
                        unsafe {
                            match lda {
                                Some(lda) => run_kernel::<true>(isa, walk, panel_of_a, lda, b_panel, out),
                                None => run_kernel::<false>(isa, walk, panel_of_a, 0, b_panel, out),
                            }
                        }
                        if !direct {
                            store_tile(&c, i, j, height, width, &tile, nr, init, k0 == 0);
                        } else if k0 == 0 {
                            add_bias(&c, i, j, mr, nr, init);
                        }
                    }
                }
            }
        }
    }
}

/// Adds `init`'s bias (if it has one) to the `height × width` block of `c` at `(i, j)`: a
/// whole tile the kernel wrote where it lies. The sums are the same as the tile buffer's
/// `bias + sum` (one rounded addition either way).
fn add_bias(c: &COut, i: usize, j: usize, height: usize, width: usize, init: Init) {
    for r in 0..height {
        // SAFETY: `c` is this thread's part of C (see `COut`), written by no one else.
        let row = unsafe { c.row(i + r, j, width) };
        match init {
            Init::RowBias(bias) => row.iter_mut().for_each(|c| *c += bias[i + r]),
            Init::ColumnBias(bias) => row.iter_mut().zip(&bias[j..j + width]).for_each(|(c, b)| *c += b),
            Init::Overwrite | Init::Accumulate => return,
        }
    }
}

/// `c` as a product with no depth leaves it: zero, unchanged, or the bias.
pub(crate) fn store_empty_product(c: &COut, init: Init) {
    for i in 0..c.rows {
        // SAFETY: `c` is this thread's part of C (see `COut`), written by no one else.
        let row = unsafe { c.row_uninit(i, 0, c.cols) };
        match init {
            Init::Overwrite => row.fill(MaybeUninit::new(0.0)),
            Init::Accumulate => {}
            Init::RowBias(bias) => row.fill(MaybeUninit::new(bias[i])),
            Init::ColumnBias(bias) => row.iter_mut().zip(bias).for_each(|(c, &b)| _ = c.write(b)),
        }
    }
}

/// Writes the first `height × width` of a `tile` (rows `nr` apart) into `c` at `(i, j)`: the
/// first depth block applies `init` (its bias already offset to `c`), later ones add.
#[allow(clippy::too_many_arguments)]
pub(crate) fn store_tile(c: &COut, i: usize, j: usize, height: usize, width: usize, tile: &[f32], nr: usize, init: Init, first_block: bool) {
    for (r, tile_row) in tile.chunks_exact(nr).take(height).enumerate() {
        let tile_row = &tile_row[..width];
        if !first_block || matches!(init, Init::Accumulate) {
            // SAFETY: `c` is this thread's part of C (see `COut`), written by no one else, and
            // holds values here (an earlier depth block wrote them, or the caller's `C`).
            let c_row = unsafe { c.row(i + r, j, width) };
            c_row.iter_mut().zip(tile_row).for_each(|(c, t)| *c += t);
            continue;
        }
        // SAFETY: as above; the first depth block writes without reading.
        let c_row = unsafe { c.row_uninit(i + r, j, width) };
        match init {
            Init::RowBias(bias) => c_row.iter_mut().zip(tile_row).for_each(|(c, t)| _ = c.write(bias[i + r] + t)),
            Init::ColumnBias(bias) => c_row.iter_mut().zip(tile_row).zip(&bias[j..j + width]).for_each(|((c, t), b)| _ = c.write(b + t)),
            Init::Overwrite | Init::Accumulate => c_row.iter_mut().zip(tile_row).for_each(|(c, &t)| _ = c.write(t)),
        }
    }
}

/// How a micro-kernel walks `B`: `taps.len()` runs of `steps` rows; row `r` of run `t` starts
/// `taps[t] + r·ldb` values after `b`'s start, and `A`'s depth index runs on through all runs
/// (`t·steps + r`). A packed panel is one run of `kc` rows `nr` apart ([`BWalk::panel`]); a
/// stride-1 convolution reads its zero-padded input planes where they lie, one run per kernel
/// position (`ops::conv_direct`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct BWalk<'t> {
    pub(crate) taps: &'t [usize],
    pub(crate) steps: usize,
    pub(crate) ldb: usize,
}

impl BWalk<'_> {
    /// A packed panel: `kc` rows of `nr` values.
    pub(crate) fn panel(kc: usize, nr: usize) -> BWalk<'static> {
        BWalk { taps: &[0], steps: kc, ldb: nr }
    }

    /// `A`'s depth: every run's rows.
    pub(crate) fn depth(&self) -> usize {
        self.taps.len() * self.steps
    }

    /// How many values of `b` a tile `nr` wide reads: `b` must hold at least these.
    pub(crate) fn extent(&self, nr: usize) -> usize {
        match self.taps.iter().max() {
            Some(&last) if self.steps > 0 => last + (self.steps - 1) * self.ldb + nr,
            _ => 0,
        }
    }
}

/// Where a micro-kernel writes its `MR × NR` sums: rows `ld` apart from `ptr`, added to what
/// is there when `add`. A tile buffer (`ld = NR`), or a full tile of `C` itself, which saves
/// copying every tile through a buffer.
#[derive(Clone, Copy)]
pub(crate) struct TileOut {
    ptr: *mut f32,
    ld: usize,
    add: bool,
}

impl TileOut {
    /// A tile buffer of (at least) `mr × nr` values, overwritten.
    fn buffer(tile: &mut [f32], mr: usize, nr: usize) -> Self {
        assert!(tile.len() >= mr * nr, "gemm: tile buffer too small");
        Self { ptr: tile.as_mut_ptr(), ld: nr, add: false }
    }
}

/// `tile[MR × NR] = A · B` with `A` a packed panel (element (p, i) at `a[p·MR + i]`, `p` over
/// the walk's whole depth) and `B` read as `walk` says.
pub(crate) fn walk_kernel(isa: Isa, walk: BWalk, a: &[f32], b: &[f32], tile: &mut [f32]) {
    let (mr, nr) = isa.tile();
    assert!(a.len() >= walk.depth() * mr && b.len() >= walk.extent(nr));
    // SAFETY: `a` and `b` hold what the kernel reads (the assertion), and the buffer the
    // MR × NR it writes (`TileOut::buffer` checks).
    unsafe { run_kernel::<false>(isa, walk, a, 0, b, TileOut::buffer(tile, mr, nr)) }
}

/// The kernel of `isa` on `A` (a packed panel, or MR rows `lda` apart when `IN_PLACE`), `B`
/// walked as `walk` says, into `out`.
///
/// # Safety
/// `isa` is supported by this CPU; `a` holds the panel, `b` the walk's extent, and `out` is
/// `MR × NR` values (`isa.tile()`) writable, and readable when it adds, that nothing else
/// references during the call.
unsafe fn run_kernel<const IN_PLACE: bool>(isa: Isa, walk: BWalk, a: &[f32], lda: usize, b: &[f32], out: TileOut) {
    match isa {
        // SAFETY: the ISA was checked to be supported before it was chosen (`isa()` and
        // `PackedA::new` only pick supported levels); the reads of `a` and `b` and the writes
        // to `out` are the caller's contract.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx512Bf16 | Isa::Amx => unsafe { x86::kernel_avx512::<12, 2, IN_PLACE>(walk, a.as_ptr(), lda, b.as_ptr(), out) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::kernel_avx2::<6, 2, IN_PLACE>(walk, a.as_ptr(), lda, b.as_ptr(), out) },
        // SAFETY: as above.
        _ => unsafe { kernel_portable::<4, 16, IN_PLACE>(walk, a, lda, b, out) },
    }
}

/// # Safety
/// As [`run_kernel`]'s `out`.
unsafe fn kernel_portable<const MR: usize, const NR: usize, const IN_PLACE: bool>(walk: BWalk, a: &[f32], lda: usize, b: &[f32], out: TileOut) {
    let mut acc = [[0f32; NR]; MR];
    let mut p = 0;
    for &tap in walk.taps {
        for r in 0..walk.steps {
            let b = &b[tap + r * walk.ldb..tap + r * walk.ldb + NR];
            for (i, acc_row) in acc.iter_mut().enumerate() {
                let a = if IN_PLACE { a[i * lda + p] } else { a[p * MR + i] };
                for (acc, &b) in acc_row.iter_mut().zip(b) {
                    *acc = a.mul_add(b, *acc);
                }
            }
            p += 1;
        }
    }
    for (i, acc_row) in acc.iter().enumerate() {
        if out.add {
            // SAFETY: row `i` of `out`, NR values, exclusively the caller's and readable when
            // it adds (the contract).
            let row = unsafe { std::slice::from_raw_parts_mut(out.ptr.add(i * out.ld), NR) };
            row.iter_mut().zip(acc_row).for_each(|(c, s)| *c += s);
        } else {
            // SAFETY: as above, writable (maybe not yet written: no reference is made to it).
            unsafe { std::ptr::copy_nonoverlapping(acc_row.as_ptr(), out.ptr.add(i * out.ld), NR) };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// AVX-512 micro-kernel: `MR` rows × `NV` vectors of 16 columns. `A`'s element (p, i) is
    /// `a[p·MR + i]` (a packed panel) or, when `IN_PLACE`, `a[i·lda + p]`; `B` is walked as
    /// [`super::BWalk`] says.
    ///
    /// # Safety
    /// The CPU supports AVX-512F; `a` has the panel readable (`depth × MR` values, or MR rows
    /// of `depth` values `lda` apart when `IN_PLACE`), `b` the walk's extent for `NV · 16`
    /// columns, and `out` is `MR` rows of `NV · 16` values as [`super::run_kernel`] says.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn kernel_avx512<const MR: usize, const NV: usize, const IN_PLACE: bool>(
        walk: super::BWalk,
        a: *const f32,
        lda: usize,
        b: *const f32,
        out: super::TileOut,
    ) {
        let mut acc = [[_mm512_setzero_ps(); NV]; MR];
        let mut p = 0;
        for &tap in walk.taps {
            // `wrapping_add`: the row pointer may step past `b` after its last read.
            let mut row = b.wrapping_add(tap);
            for _ in 0..walk.steps {
                let mut bv = [_mm512_setzero_ps(); NV];
                for (v, bv) in bv.iter_mut().enumerate() {
                    *bv = _mm512_loadu_ps(row.add(v * 16));
                }
                for (i, acc) in acc.iter_mut().enumerate() {
                    let av = _mm512_set1_ps(*a.add(if IN_PLACE { i * lda + p } else { p * MR + i }));
                    for v in 0..NV {
                        acc[v] = _mm512_fmadd_ps(av, bv[v], acc[v]);
                    }
                }
                p += 1;
                row = row.wrapping_add(walk.ldb);
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            for (v, &acc) in acc.iter().enumerate() {
                let at = out.ptr.add(i * out.ld + v * 16);
                _mm512_storeu_ps(at, if out.add { _mm512_add_ps(_mm512_loadu_ps(at), acc) } else { acc });
            }
        }
    }

    /// AVX2 + FMA micro-kernel: `MR` rows × `NV` vectors of 8 columns, `A` and `B` addressed
    /// as in [`kernel_avx512`].
    ///
    /// # Safety
    /// The CPU supports AVX2 and FMA; `a` has the panel readable (as for [`kernel_avx512`]),
    /// `b` the walk's extent for `NV · 8` columns, and `out` is `MR` rows of `NV · 8` values as
    /// [`super::run_kernel`] says.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn kernel_avx2<const MR: usize, const NV: usize, const IN_PLACE: bool>(
        walk: super::BWalk,
        a: *const f32,
        lda: usize,
        b: *const f32,
        out: super::TileOut,
    ) {
        let mut acc = [[_mm256_setzero_ps(); NV]; MR];
        let mut p = 0;
        for &tap in walk.taps {
            let mut row = b.wrapping_add(tap);
            for _ in 0..walk.steps {
                let mut bv = [_mm256_setzero_ps(); NV];
                for (v, bv) in bv.iter_mut().enumerate() {
                    *bv = _mm256_loadu_ps(row.add(v * 8));
                }
                for (i, acc) in acc.iter_mut().enumerate() {
                    let av = _mm256_set1_ps(*a.add(if IN_PLACE { i * lda + p } else { p * MR + i }));
                    for v in 0..NV {
                        acc[v] = _mm256_fmadd_ps(av, bv[v], acc[v]);
                    }
                }
                p += 1;
                row = row.wrapping_add(walk.ldb);
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            for (v, &acc) in acc.iter().enumerate() {
                let at = out.ptr.add(i * out.ld + v * 8);
                _mm256_storeu_ps(at, if out.add { _mm256_add_ps(_mm256_loadu_ps(at), acc) } else { acc });
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A deterministic pseudo-random matrix in [-1, 1).
    pub(crate) fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..len)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn reference(a: &MatRef, b: &MatRef) -> Vec<f64> {
        let (m, k, n) = (a.rows(), a.cols(), b.cols());
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a.at(i, p) as f64 * b.at(p, j) as f64).sum();
            }
        }
        c
    }

    /// `A · B` at one level, with A packed once and as a view, B as a view and packed once,
    /// overwriting and accumulating, on one thread and on all; into fresh memory too.
    /// With `transposed`, A is column-major and B row-major (each packing path's other branch).
    fn check(m: usize, k: usize, n: usize, isa: Isa, transposed: bool) {
        let a_data = values(m * k + 3, 1);
        let b_data = values(k * n + 5, 2);
        // A row-major with an offset; B read transposed from a column-major buffer (or the
        // other way round).
        let (a, b) = if transposed {
            (MatRef::new(&a_data[3..], m, k, 1, m.max(1)).unwrap(), MatRef::new(&b_data[5..], k, n, n.max(1), 1).unwrap())
        } else {
            (MatRef::new(&a_data[3..], m, k, k, 1).unwrap(), MatRef::new(&b_data[5..], k, n, 1, k.max(1)).unwrap())
        };
        let expected = reference(&a, &b);
        let packed_a = PackedA::with_isa(&a, isa);
        let packed_b = PackedB::with_isa(&b, isa);
        let row_bias: Vec<f32> = (0..m).map(|i| i as f32 * 0.5).collect();
        let column_bias: Vec<f32> = (0..n).map(|j| j as f32 * -0.25).collect();
        for (source, init, parallel, packed) in [
            (ASource::Packed(&packed_a), Init::Overwrite, false, false),
            (ASource::Packed(&packed_a), Init::Accumulate, true, false),
            (ASource::View(a), Init::RowBias(&row_bias), true, true),
            (ASource::View(a), Init::ColumnBias(&column_bias), false, true),
            (ASource::Packed(&packed_a), Init::ColumnBias(&column_bias), true, false),
            (ASource::InPlace(a), Init::RowBias(&row_bias), true, false),
            (ASource::InPlace(a), Init::Overwrite, false, true),
            (ASource::View(a), Init::Accumulate, true, true),
            (ASource::InPlace(a), Init::ColumnBias(&column_bias), true, true),
            (ASource::InPlace(a), Init::Overwrite, true, false),
            (ASource::View(a), Init::Accumulate, false, false),
        ] {
            // A is read in place only where it is row-major.
            if transposed && matches!(source, ASource::InPlace(_)) {
                continue;
            }
            {
                let ldc = n + 3;
                // Accumulating into varied values (a direct add reading the wrong element of
                // C shows), the padding past column n a sentinel that must stay.
                let start = values(m.max(1) * ldc, 3);
                let mut c: Vec<f32> = (0..m.max(1) * ldc).map(|x| if x % ldc >= n { 7.0 } else if matches!(init, Init::Accumulate) { start[x] } else { f32::NAN }).collect();
                if packed {
                    gemm_with(isa, &mut c, ldc, source, &packed_b, init, parallel);
                } else {
                    gemm_with(isa, &mut c, ldc, source, &b, init, parallel);
                }
                for i in 0..m {
                    for j in 0..n {
                        let want = expected[i * n + j]
                            + match init {
                                Init::Overwrite => 0.0,
                                Init::Accumulate => start[i * ldc + j] as f64,
                                Init::RowBias(bias) => bias[i] as f64,
                                Init::ColumnBias(bias) => bias[j] as f64,
                            };
                        let got = c[i * ldc + j] as f64;
                        assert!((got - want).abs() <= 1e-4 * (1.0 + k as f64).sqrt(), "{isa:?} {m}x{k}x{n} ({i},{j}): {got} vs {want}");
                    }
                    assert!(c[i * ldc + n..(i + 1) * ldc].iter().all(|&v| v == 7.0), "{isa:?} {m}x{k}x{n}: row {i}'s padding was written");
                }
                // The same product into fresh memory (`gemm_fresh`): the same values, the
                // padding past column n untouched.
                if !matches!(init, Init::Accumulate) {
                    let mut fresh: Vec<MaybeUninit<f32>> = (0..m.max(1) * ldc).map(|x| MaybeUninit::new(if x % ldc >= n { 7.0 } else { f32::NAN })).collect();
                    let out = COut::fresh(&mut fresh, ldc, m, n);
                    if packed {
                        product(isa, out, source, &packed_b, init, parallel);
                    } else {
                        product(isa, out, source, &b, init, parallel);
                    }
                    // SAFETY: every element was made with a value.
                    let fresh: Vec<f32> = fresh.into_iter().map(|v| unsafe { v.assume_init() }).collect();
                    assert!(fresh.iter().zip(&c).all(|(f, c)| f.to_bits() == c.to_bits()), "{isa:?} {m}x{k}x{n} {init:?}: into fresh memory differs");
                }
            }
        }
    }

    #[test]
    fn gemm_matches_f64_reference_on_odd_shapes_at_every_level() {
        for isa in Isa::all_supported() {
            for &(m, k, n) in &[(1, 1, 1), (0, 3, 4), (3, 0, 4), (5, 7, 0), (13, 300, 33), (25, 17, 65), (1, 513, 40), (241, 5, 31), (7, 260, 4100)] {
                check(m, k, n, isa, false);
                check(m, k, n, isa, true);
            }
        }
    }

    /// A product with little output and much depth is split along the depth (shares of whole
    /// depth blocks, the last one short): the same sums for every source of `A` but a packed
    /// one (not split), every `init`, `B` packed once or not, on three threads and on one.
    #[test]
    fn depth_split_matches_f64_reference() {
        // 1100 deep: four blocks and a bit, shares of two blocks.
        assert_eq!(depth_share(9, 20, 1100, KC), Some(2 * KC));
        assert_eq!(depth_share(9, 20, 4 * KC + 1, KC), Some(2 * KC));
        assert_eq!(depth_share(9, 20, 40 * KC, KC), Some(10 * KC));
        assert_eq!(depth_share(300, 20, 1100, KC), None);
        assert_eq!(depth_share(9, 20, 2 * KC - 1, KC), None);
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().expect("a thread pool");
        pool.install(|| {
            for isa in Isa::all_supported() {
                check(9, 1100, 20, isa, false);
                check(1, 2 * KC, 40, isa, false);
                // Whole tiles at every level, written where they lie in each share.
                check(13, 1100, 40, isa, false);
                check(13, 1100, 40, isa, true);
            }
        });
    }

    /// A packed `B` unpacks to itself: depth blocks (the last one short) and a last column
    /// panel short of `NR`, at every level.
    #[test]
    fn packed_b_unpacks_to_itself() {
        let (k, n) = (2 * KC + 37, 37);
        let data = values(k * n, 9);
        let b = MatRef::row_major(&data, k, n).unwrap();
        for isa in Isa::all_supported() {
            assert_eq!(PackedB::with_isa(&b, isa).unpacked(), data, "{isa:?}");
        }
    }

    #[test]
    fn views_out_of_bounds_are_refused() {
        let data = [0f32; 12];
        assert!(MatRef::new(&data, 3, 4, 4, 1).is_some());
        assert!(MatRef::new(&data, 3, 5, 4, 1).is_none());
        assert!(MatRef::new(&data, usize::MAX, 2, usize::MAX, 1).is_none());
        assert!(MatRef::new(&data, 0, 100, 100, 1).is_some());
    }
}
