//! 2-D convolution on the CPU, forward and backward, on the packed GEMM kernels of `ops::gemm`
//! (and `ops::gemm_bf16` for a bf16 model's kernels and for mixed-precision training),
//! activations in NCHW, f32.
//!
//! Forward, per image (or group of images), `output[C_out, positions] = weight · col`: the
//! kernel `[C_out, C_in·kh·kw]` is read in place by the micro-kernel, and the input patches (`col`)
//! are written straight into the GEMM's panels, block by block (an implicit GEMM: no column
//! buffer). Stride-1 convolutions skip the patches altogether: on AVX2 most of them read a copy
//! of the input in blocks of 8 channels (`ops::conv_blocked`), elsewhere those over wide enough
//! rows read zero-padded copies of the input's planes where they lie (`ops::conv_direct`). The backward
//! pass is the same algebra transposed, with a column buffer of a band of rows:
//! `grad_weight += grad_output · colᵀ`, `grad_col = weightᵀ · grad_output` (`weightᵀ` packed
//! once per call), scattered back to the input (col2im); for stride-1 images that a direct path
//! suits, the input's gradient is a forward convolution of the output's gradient instead (the
//! kernel flipped, its channels swapped: `conv_direct::input_gradient_geometry`), and on AVX2
//! the kernel's gradient is summed on the channel-blocked input (`conv_blocked`). Small images (a
//! small UNet's 8×8 and 4×4 latents) are taken several at a time for the forward product and
//! the kernel's gradient, their columns side by side, so that each product is wide and deep
//! enough for the micro-kernel ([`GROUP_COLUMNS`]), and their patches are read from padded
//! copies of the images, where every patch value is a plain load ([`PaddedImages`]); their
//! input gradient is added into a padded image the same way. Images, or groups of them, are
//! spread over the threads when there are enough of them; otherwise each product uses every
//! thread.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

use half::bf16;

use super::{conv_blocked, conv_direct, profile};
use super::gemm::{self, ASource, Columns, Init, MatRef, PackB, PackedA};
use super::gemm_bf16::{gemm_bf16, gemm_in, ABf16, Bf16Matrix, RoundedB};
use super::Precision;

/// The column buffer holds at most this many values (16 MiB): a band of output rows at a time.
const COLUMN_BUDGET: usize = 4 << 20;

/// Output positions a product should have at least: images with fewer are convolved several
/// at a time (forward, kernel gradient), their patches read from padded copies. The kernel
/// gradient of one 8×8 image summed only 64 products per pass over its tiles; a 4×4 image
/// fills half of an AVX-512 tile's 32 columns; and at 512 columns a 128-channel 3×3 product
/// over 4×4 images is wide enough not to be split along its depth (`gemm::depth_share`). The
/// input's gradient measured slower grouped, so it is not.
/// (Small in the unit tests, so that they make groups of every size.)
const GROUP_COLUMNS: usize = if cfg!(test) { 40 } else { 512 };

/// The sizes of one convolution (groups of 1, square stride and padding, no dilation).
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    /// B, images in the batch.
    pub batch: usize,
    /// C_in, the input's channels.
    pub in_channels: usize,
    /// H, the input's rows.
    pub height: usize,
    /// W, the input's columns.
    pub width: usize,
    /// C_out, the output's channels.
    pub out_channels: usize,
    /// The kernel's rows.
    pub kernel_h: usize,
    /// The kernel's columns.
    pub kernel_w: usize,
    /// The step between kernel positions, both ways.
    pub stride: usize,
    /// Zeros added on every side.
    pub padding: usize,
}

impl Geometry {
    /// The convolution's floating-point operations (a multiply-add counts two); each backward
    /// product does as many.
    pub fn flops(&self) -> f64 {
        2.0 * (self.batch * self.out_channels * self.out_height() * self.out_width() * self.patch_len()) as f64
    }

    /// Rows of the output.
    pub fn out_height(&self) -> usize {
        (self.height + 2 * self.padding - self.kernel_h) / self.stride + 1
    }
    /// Columns of the output.
    pub fn out_width(&self) -> usize {
        (self.width + 2 * self.padding - self.kernel_w) / self.stride + 1
    }
    /// Rows of the weight matrix's transpose: `C_in·kh·kw`.
    fn patch_len(&self) -> usize {
        self.in_channels * self.kernel_h * self.kernel_w
    }
    fn input_len(&self) -> usize {
        self.in_channels * self.height * self.width
    }
    fn output_len(&self) -> usize {
        self.out_channels * self.out_height() * self.out_width()
    }
    /// A 1×1, stride-1, unpadded convolution reads the input as its own column matrix.
    fn is_pointwise(&self) -> bool {
        self.kernel_h == 1 && self.kernel_w == 1 && self.stride == 1 && self.padding == 0
    }
    /// Output rows per band, so that the column buffer stays within budget.
    fn band_rows(&self) -> usize {
        (COLUMN_BUDGET / (self.patch_len() * self.out_width()).max(1)).clamp(1, self.out_height())
    }
    /// Whether an image has fewer output positions than a product should have columns: such
    /// images are taken several at a time, and their patches read from padded copies.
    fn has_small_images(&self) -> bool {
        self.out_height() * self.out_width() < GROUP_COLUMNS
    }
    /// Images per product: enough for [`GROUP_COLUMNS`] output positions, 1 for larger
    /// images, and no more than [`COLUMN_BUDGET`] patch values (which bounds a group's padded
    /// copies and its product's output, as it bounds the column buffer of larger images).
    fn images_per_group(&self) -> usize {
        let out_hw = (self.out_height() * self.out_width()).max(1);
        let fit = COLUMN_BUDGET / (self.patch_len() * out_hw).max(1);
        GROUP_COLUMNS.div_ceil(out_hw).min(fit).min(self.batch).max(1)
    }
}

/// For kernel offset `k` (row or column), the output range whose input index
/// `o·stride + k - padding` lies inside `0..size`.
fn valid_range(k: usize, size: usize, out_size: usize, stride: usize, padding: usize) -> (usize, usize) {
    // o·stride + k ≥ padding  and  o·stride + k - padding < size.
    let first = padding.saturating_sub(k).div_ceil(stride);
    let end = if size + padding > k { (size + padding - k).div_ceil(stride).min(out_size) } else { 0 };
    (first.min(end), end)
}

/// Writes the patches of output rows `rows` of one image into `col[patch_len, rows·W_out]`.
fn im2col(g: &Geometry, image: &[f32], rows: std::ops::Range<usize>, col: &mut [f32]) {
    let (out_w, band) = (g.out_width(), rows.len() * g.out_width());
    for c in 0..g.in_channels {
        let plane = &image[c * g.height * g.width..(c + 1) * g.height * g.width];
        for ky in 0..g.kernel_h {
            for kx in 0..g.kernel_w {
                let row = (c * g.kernel_h + ky) * g.kernel_w + kx;
                let dst = &mut col[row * band..(row + 1) * band];
                let (x_lo, x_hi) = valid_range(kx, g.width, out_w, g.stride, g.padding);
                for (i, oy) in rows.clone().enumerate() {
                    let out_row = &mut dst[i * out_w..(i + 1) * out_w];
                    let iy = (oy * g.stride + ky) as isize - g.padding as isize;
                    if iy < 0 || iy >= g.height as isize {
                        out_row.fill(0.0);
                        continue;
                    }
                    let src = &plane[iy as usize * g.width..(iy as usize + 1) * g.width];
                    out_row[..x_lo].fill(0.0);
                    out_row[x_hi.max(x_lo)..].fill(0.0);
                    if x_hi > x_lo {
                        let ix0 = x_lo * g.stride + kx - g.padding;
                        if g.stride == 1 {
                            out_row[x_lo..x_hi].copy_from_slice(&src[ix0..ix0 + (x_hi - x_lo)]);
                        } else {
                            for (j, value) in out_row[x_lo..x_hi].iter_mut().enumerate() {
                                *value = src[ix0 + j * g.stride];
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The adjoint of [`im2col`]: adds `col[patch_len, rows·W_out]` into the image's gradient.
fn col2im(g: &Geometry, col: &[f32], rows: std::ops::Range<usize>, image: &mut [f32]) {
    let (out_w, band) = (g.out_width(), rows.len() * g.out_width());
    for c in 0..g.in_channels {
        let plane = &mut image[c * g.height * g.width..(c + 1) * g.height * g.width];
        for ky in 0..g.kernel_h {
            for kx in 0..g.kernel_w {
                let row = (c * g.kernel_h + ky) * g.kernel_w + kx;
                let src = &col[row * band..(row + 1) * band];
                let (x_lo, x_hi) = valid_range(kx, g.width, out_w, g.stride, g.padding);
                if x_hi <= x_lo {
                    continue;
                }
                for (i, oy) in rows.clone().enumerate() {
                    let iy = (oy * g.stride + ky) as isize - g.padding as isize;
                    if iy < 0 || iy >= g.height as isize {
                        continue;
                    }
                    let dst = &mut plane[iy as usize * g.width..(iy as usize + 1) * g.width];
                    let ix0 = x_lo * g.stride + kx - g.padding;
                    for (j, value) in src[i * out_w + x_lo..i * out_w + x_hi].iter().enumerate() {
                        dst[ix0 + j * g.stride] += value;
                    }
                }
            }
        }
    }
}

/// How work is split: over groups of images (each product on one thread) when there are at
/// least as many as threads, else inside each product (`true` for the product's parallelism).
fn split(groups: usize) -> (bool, bool) {
    let threads = rayon::current_num_threads();
    if groups >= threads || threads == 1 {
        (true, false)
    } else {
        (false, true)
    }
}

/// Runs `f(index, chunk)` for every `chunk_len` chunk of `output` (the last may be shorter),
/// in parallel when `parallel`.
fn for_each_chunk(parallel: bool, output: &mut [f32], chunk_len: usize, f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    if parallel {
        output.par_chunks_mut(chunk_len).enumerate().for_each(|(i, chunk)| f(i, chunk));
    } else {
        output.chunks_mut(chunk_len).enumerate().for_each(|(i, chunk)| f(i, chunk));
    }
}

/// `count` matrices `[rows, cols]` (one per image, one after the other) side by side:
/// `[rows, count·cols]`.
fn side_by_side(matrices: &[f32], count: usize, rows: usize, cols: usize) -> Vec<f32> {
    let mut joined = vec![0f32; matrices.len()];
    if rows * cols > 0 {
        for (i, matrix) in matrices.chunks_exact(rows * cols).enumerate() {
            for (r, row) in matrix.chunks_exact(cols).enumerate() {
                joined[(r * count + i) * cols..][..cols].copy_from_slice(row);
            }
        }
    }
    joined
}

/// The inverse of [`side_by_side`]: `[rows, count·cols]` into `count` matrices `[rows, cols]`.
fn split_apart(joined: &[f32], count: usize, rows: usize, cols: usize, matrices: &mut [f32]) {
    if rows * cols > 0 {
        for (i, matrix) in matrices.chunks_exact_mut(rows * cols).enumerate() {
            for (r, row) in matrix.chunks_exact_mut(cols).enumerate() {
                row.copy_from_slice(&joined[(r * count + i) * cols..][..cols]);
            }
        }
    }
}

/// Zero-padded copies of a few small images' planes (`[count, C_in, H + 2p, W + 2p]`), where
/// the patch value of column `n` (image, output row, output column) and patch row `k`
/// (channel, kernel row, kernel column) is one load at `column_offset(n) + row_offsets[k]`,
/// with no test for the border. For small images the border tests and short copies of
/// [`im2col`] cost more than the product itself (8×8 images: half of a forward convolution).
#[derive(Clone)]
struct PaddedImages {
    planes: Vec<f32>,
    count: usize,
    /// Offset of patch row `k`'s first value: its channel's plane, kernel row and column.
    row_offsets: Arc<[usize]>,
    padded_width: usize,
    /// Values per padded image.
    image_len: usize,
    out_width: usize,
    /// Output positions per image (at least 1).
    out_positions: usize,
    stride: usize,
}

impl PaddedImages {
    /// Zero planes for `count` images.
    fn zeros(g: &Geometry, count: usize) -> Self {
        let (hp, wp) = (g.height + 2 * g.padding, g.width + 2 * g.padding);
        let mut row_offsets = Vec::with_capacity(g.patch_len());
        for c in 0..g.in_channels {
            for ky in 0..g.kernel_h {
                row_offsets.extend((0..g.kernel_w).map(|kx| (c * hp + ky) * wp + kx));
            }
        }
        let image_len = g.in_channels * hp * wp;
        let out_positions = (g.out_height() * g.out_width()).max(1);
        Self { planes: vec![0.0; count * image_len], count, row_offsets: row_offsets.into(), padded_width: wp, image_len, out_width: g.out_width(), out_positions, stride: g.stride }
    }

    /// Padded copies of `images` (`count` images `[C_in, H, W]`), with `self`'s offsets (so
    /// that they are computed once per call, not per group of images).
    fn holding(&self, g: &Geometry, images: &[f32], count: usize) -> Self {
        let mut padded = Self { planes: vec![0.0; count * self.image_len], count, row_offsets: Arc::clone(&self.row_offsets), ..*self };
        let (wp, plane_len) = (padded.padded_width, g.height * g.width);
        if plane_len > 0 {
            for (plane, planes) in images.chunks_exact(plane_len).zip(padded.planes.chunks_exact_mut((g.height + 2 * g.padding) * wp)) {
                for (row, padded_row) in plane.chunks_exact(g.width).zip(planes[g.padding * wp..].chunks_exact_mut(wp)) {
                    padded_row[g.padding..g.padding + g.width].copy_from_slice(row);
                }
            }
        }
        padded
    }

    /// Where column `n`'s patch starts in [`Self::planes`] (add a patch row's offset).
    fn column_offset(&self, n: usize) -> usize {
        let (image, position) = (n / self.out_positions, n % self.out_positions);
        image * self.image_len + (position / self.out_width * self.padded_width + position % self.out_width) * self.stride
    }

    /// The offsets of columns `columns`.
    fn column_offsets(&self, columns: std::ops::Range<usize>) -> Vec<usize> {
        columns.map(|n| self.column_offset(n)).collect()
    }

    /// `dst[j] = planes[base + offsets[j]]`: one patch row at several columns (the base a row's
    /// offset, the offsets columns'), or one column at several patch rows.
    #[inline(always)]
    fn gather(&self, base: usize, offsets: &[usize], dst: &mut [f32]) {
        let planes = &self.planes[base..];
        for (value, &offset) in dst.iter_mut().zip(offsets) {
            *value = planes[offset];
        }
    }

    /// The adjoint of gathering one image's patches: adds `col[patch_len, H_out·W_out]` into
    /// image 0's planes.
    fn scatter_add(&mut self, col: &[f32]) {
        let (out_w, wp, stride) = (self.out_width, self.padded_width, self.stride);
        let out_h = self.out_positions / out_w.max(1);
        for (row, &base) in col.chunks_exact(self.out_positions).zip(self.row_offsets.iter()) {
            for (oy, values) in row.chunks_exact(out_w.max(1)).take(out_h).enumerate() {
                let start = base + oy * stride * wp;
                if stride == 1 {
                    // A contiguous run: added a vector at a time.
                    self.planes[start..start + out_w].iter_mut().zip(values).for_each(|(sum, value)| *sum += value);
                } else {
                    for (ox, value) in values.iter().enumerate() {
                        self.planes[start + ox * stride] += value;
                    }
                }
            }
        }
    }

    /// Image `index`'s planes without their padding, into `image` (`[C_in, H, W]`).
    fn crop(&self, g: &Geometry, index: usize, image: &mut [f32]) {
        let (wp, plane_len) = (self.padded_width, g.height * g.width);
        if plane_len > 0 {
            let planes = &self.planes[index * self.image_len..(index + 1) * self.image_len];
            for (plane, padded) in image.chunks_exact_mut(plane_len).zip(planes.chunks_exact((g.height + 2 * g.padding) * wp)) {
                for (row, padded_row) in plane.chunks_exact_mut(g.width).zip(padded[g.padding * wp..].chunks_exact(wp)) {
                    row.copy_from_slice(&padded_row[g.padding..g.padding + g.width]);
                }
            }
        }
    }
}

/// Columns `dst..dst + len` of a panel whose values lie one after another from `src` (an
/// output row of a stride-1 convolution).
struct Run {
    dst: usize,
    src: usize,
    len: usize,
}

impl Run {
    /// The runs of consecutive `offsets`, into `runs` (cleared first).
    fn split(offsets: impl Iterator<Item = usize>, runs: &mut Vec<Run>) {
        runs.clear();
        for (dst, src) in offsets.enumerate() {
            match runs.last_mut() {
                Some(run) if run.src + run.len == src => run.len += 1,
                _ => runs.push(Run { dst, src, len: 1 }),
            }
        }
    }

    /// Copies the run from `planes` into `row`; the common widths as whole vectors.
    fn copy(&self, planes: &[f32], row: &mut [f32]) {
        let (src, dst) = (&planes[self.src..], &mut row[self.dst..]);
        match self.len {
            4 => copy_fixed::<4>(src, dst),
            8 => copy_fixed::<8>(src, dst),
            16 => copy_fixed::<16>(src, dst),
            len => dst[..len].copy_from_slice(&src[..len]),
        }
    }
}

/// The first `N` values of `src` into `dst`, as a few vector moves. Not inlined: inlined, LLVM
/// merges the arms of [`Run::copy`] into one call to `memcpy` with the length as a variable,
/// which cost as much as the copies (15 % of an 8×8 convolution).
#[inline(never)]
fn copy_fixed<const N: usize>(src: &[f32], dst: &mut [f32]) {
    dst[..N].copy_from_slice(&src[..N]);
}

/// The patches of `count` consecutive images, side by side, as the `B` operand
/// (`C_in·kh·kw × count·H_out·W_out`) of the forward product, written straight into the GEMM's
/// panels: the column matrix never exists whole.
/// Small images are read from padded copies ([`PaddedImages`]).
struct Patches<'a> {
    g: &'a Geometry,
    images: &'a [f32],
    count: usize,
    padded: Option<PaddedImages>,
}

impl<'a> Patches<'a> {
    /// The patches of `images`, read from padded copies that share `offsets`' offsets if given.
    fn new(g: &'a Geometry, images: &'a [f32], count: usize, offsets: Option<&PaddedImages>) -> Self {
        Self { g, images, count, padded: offsets.map(|offsets| offsets.holding(g, images, count)) }
    }
}

impl PackB for Patches<'_> {
    fn dims(&self) -> (usize, usize) {
        (self.g.patch_len(), self.count * self.g.out_height() * self.g.out_width())
    }

    fn pack(&self, k0: usize, kc: usize, n0: usize, nc: usize, nr: usize, out: &mut [f32]) {
        let g = self.g;
        if let Some(padded) = &self.padded {
            let (mut runs, mut offsets) = (Vec::new(), Vec::new());
            for (panel, chunk) in out.chunks_exact_mut(kc * nr).take(nc.div_ceil(nr)).enumerate() {
                let (first, end) = (n0 + panel * nr, (n0 + panel * nr + nr).min(n0 + nc));
                offsets.clear();
                offsets.extend((first..end).map(|n| padded.column_offset(n)));
                Run::split(offsets.iter().copied(), &mut runs);
                // Runs shorter than 4 on average (a stride above 1): value by value.
                let by_value = runs.len() * 4 > offsets.len();
                for (kk, row) in chunk.chunks_exact_mut(nr).enumerate() {
                    let base = padded.row_offsets[k0 + kk];
                    if by_value {
                        padded.gather(base, &offsets, row);
                    } else {
                        for run in &runs {
                            run.copy(&padded.planes[base..], row);
                        }
                    }
                    row[end - first..].fill(0.0);
                }
            }
            return;
        }
        let (out_w, out_h, plane_len) = (g.out_width(), g.out_height(), g.height * g.width);
        for (panel, chunk) in out.chunks_exact_mut(kc * nr).take(nc.div_ceil(nr)).enumerate() {
            let first = n0 + panel * nr;
            let width = nr.min(n0 + nc - first);
            for (kk, row) in chunk.chunks_exact_mut(nr).enumerate() {
                let k = k0 + kk;
                let (c, ky, kx) = (k / (g.kernel_h * g.kernel_w), (k / g.kernel_w) % g.kernel_h, k % g.kernel_w);
                // Output columns x_lo..x_hi read inside the image, as in im2col.
                let (x_lo, x_hi) = valid_range(kx, g.width, out_w, g.stride, g.padding);
                let (mut image, position) = (first / (out_h * out_w), first % (out_h * out_w));
                let (mut oy, mut ox) = (position / out_w, position % out_w);
                let mut done = 0;
                // The panel's columns, one run per output row.
                while done < width {
                    let plane = &self.images[(image * g.in_channels + c) * plane_len..][..plane_len];
                    let run = (width - done).min(out_w - ox);
                    let dst = &mut row[done..done + run];
                    let iy = (oy * g.stride + ky).wrapping_sub(g.padding);
                    // A row above the image wrapped to a huge value: outside too.
                    if iy >= g.height {
                        dst.fill(0.0);
                    } else {
                        let lo = x_lo.clamp(ox, ox + run);
                        let hi = x_hi.clamp(lo, ox + run);
                        let src = &plane[iy * g.width..(iy + 1) * g.width];
                        // A run wholly in the padding has nothing inside (and `ix0` would
                        // point past the row, or before it).
                        if hi > lo {
                            let inside = &mut dst[lo - ox..hi - ox];
                            let ix0 = lo * g.stride + kx - g.padding;
                            if g.stride == 1 {
                                inside.copy_from_slice(&src[ix0..ix0 + (hi - lo)]);
                            } else {
                                for (j, value) in inside.iter_mut().enumerate() {
                                    *value = src[ix0 + j * g.stride];
                                }
                            }
                        }
                        dst[..lo - ox].fill(0.0);
                        dst[hi - ox..].fill(0.0);
                    }
                    done += run;
                    ox = 0;
                    oy += 1;
                    if oy == out_h {
                        (image, oy) = (image + 1, 0);
                    }
                }
                row[width..].fill(0.0);
            }
        }
    }
}

/// The transposed patches of small images (`count·H_out·W_out × C_in·kh·kw`), the `B` operand
/// of the kernel's gradient, packed straight from the padded images: no column buffer.
struct TransposedPatches(PaddedImages);

impl PackB for TransposedPatches {
    fn dims(&self) -> (usize, usize) {
        let images = &self.0;
        (images.count * images.out_positions, images.row_offsets.len())
    }

    fn pack(&self, k0: usize, kc: usize, n0: usize, nc: usize, nr: usize, out: &mut [f32]) {
        let images = &self.0;
        // The block's depth is output positions: their offsets once, not once per panel.
        let positions = images.column_offsets(k0..k0 + kc);
        for (panel, chunk) in out.chunks_exact_mut(kc * nr).take(nc.div_ceil(nr)).enumerate() {
            let first = n0 + panel * nr;
            let rows = &images.row_offsets[first..(first + nr).min(n0 + nc)];
            for (row, &position) in chunk.chunks_exact_mut(nr).zip(&positions) {
                images.gather(position, rows, row);
                row[rows.len()..].fill(0.0);
            }
        }
    }
}

/// `output[N, C_out, H_out, W_out]` of `input[N, C_in, H, W]` and `weight[C_out, C_in, kh, kw]`.
///
/// Panics if the slices' lengths do not match the geometry.
/// With `bias` (`[C_out]`), it is added as the product is written.
pub fn forward(g: &Geometry, input: &[f32], weight: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
    let chosen = path(g);
    profile::count_choice(match chosen {
        Path::Blocked => "conv2d: blocked",
        Path::Direct => "conv2d: direct",
        Path::Packed => "conv2d: packed",
    });
    forward_on_path(g, chosen, input, weight, bias)
}

/// The ways a convolution (forward, or its input gradient as one) runs: `--profile` counts
/// which one each call takes.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Path {
    /// `conv_blocked` (AVX2).
    Blocked,
    /// `conv_direct`'s planes.
    Direct,
    /// The implicit GEMM's packed patches.
    Packed,
}

/// The path [`forward`] takes for `g` (f32).
fn path(g: &Geometry) -> Path {
    if conv_blocked::suits(g, gemm::isa()) {
        Path::Blocked
    } else if conv_direct::suits(g, false) {
        Path::Direct
    } else {
        Path::Packed
    }
}

/// [`forward`] on `path` (the one [`path`] chose for `g`), without counting it.
fn forward_on_path(g: &Geometry, path: Path, input: &[f32], weight: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
    let (out_hw, k) = (g.out_height() * g.out_width(), g.patch_len());
    assert!(weight.len() == g.out_channels * k, "conv2d: operand sizes");
    let isa = gemm::isa();
    match path {
        Path::Blocked => return conv_blocked::forward(isa, g, input, &conv_blocked::pack_kernel(g, weight), bias),
        Path::Direct => {
            let panels = conv_direct::pack_kernel(g, weight, isa.tile().0);
            return forward_with(g, input, bias, 1, |out, image, _, _, parallel| conv_direct::forward_image(isa, g, image, &panels, bias, out, parallel));
        }
        Path::Packed => {}
    }
    // The kernel is read where it lies: packing it per call costs as much as it saves.
    let kernel = MatRef::row_major(weight, g.out_channels, k).expect("sizes checked");
    let offsets = g.has_small_images().then(|| PaddedImages::zeros(g, 0));
    forward_with(g, input, bias, g.images_per_group(), |out, images, count, init, parallel| {
        if g.is_pointwise() && count == 1 {
            let image = MatRef::row_major(images, k, out_hw).expect("sizes checked");
            gemm::gemm(out, out_hw, ASource::InPlace(kernel), &image, init, parallel);
        } else {
            gemm::gemm(out, count * out_hw, ASource::InPlace(kernel), &Patches::new(g, images, count, offsets.as_ref()), init, parallel);
        }
    })
}

/// [`forward`] with a bf16 kernel (converted when the model loaded): the patches are rounded
/// to bf16 as they are packed, and the sums are f32.
///
/// Panics if the slices' lengths do not match the geometry.
pub fn forward_bf16(g: &Geometry, input: &[f32], weight: &[bf16], bias: Option<&[f32]>) -> Vec<f32> {
    let (out_hw, k) = (g.out_height() * g.out_width(), g.patch_len());
    let kernel = Bf16Matrix::new(weight, g.out_channels, k).expect("conv2d: operand sizes");
    if conv_direct::suits_bf16(gemm::isa(), g) {
        let isa = gemm::isa();
        let panels = conv_direct::pack_kernel_bf16(isa, g, weight);
        return forward_with(g, input, bias, 1, |out, image, _, _, parallel| conv_direct::forward_image_bf16(isa, g, image, &panels, bias, out, parallel));
    }
    let offsets = g.has_small_images().then(|| PaddedImages::zeros(g, 0));
    forward_with(g, input, bias, g.images_per_group(), |out, images, count, init, parallel| {
        if g.is_pointwise() && count == 1 {
            let image = MatRef::row_major(images, k, out_hw).expect("sizes checked");
            gemm_bf16(out, out_hw, ABf16::Weight(kernel), &RoundedB::new(&image), init, parallel);
        } else {
            gemm_bf16(out, count * out_hw, ABf16::Weight(kernel), &RoundedB::new(&Patches::new(g, images, count, offsets.as_ref())), init, parallel);
        }
    })
}

/// The output, `group` images at a time, spread over the threads as [`split`] says:
/// `product(output, images, count, init, parallel)` writes the output of `count` consecutive
/// images side by side (`[C_out, count·H_out·W_out]`; one image's is its own output).
fn forward_with(g: &Geometry, input: &[f32], bias: Option<&[f32]>, group: usize, product: impl Fn(&mut [f32], &[f32], usize, Init, bool) + Sync + Send) -> Vec<f32> {
    assert!(input.len() == g.batch * g.input_len(), "conv2d: operand sizes");
    assert!(bias.is_none_or(|b| b.len() == g.out_channels), "conv2d: one bias per output channel");
    let init = bias.map_or(Init::Overwrite, Init::RowBias);
    let mut output = vec![0f32; g.batch * g.output_len()];
    if output.is_empty() {
        return output;
    }
    let (in_len, out_len, out_hw) = (g.input_len(), g.output_len(), g.out_height() * g.out_width());
    let (groups_parallel, product_parallel) = split(g.batch.div_ceil(group));
    for_each_chunk(groups_parallel, &mut output, group * out_len, |index, out| {
        let (first, count) = (index * group, out.len() / out_len);
        let images = &input[first * in_len..(first + count) * in_len];
        if count == 1 {
            product(out, images, 1, init, product_parallel);
        } else {
            let mut joined = vec![0f32; out.len()];
            product(&mut joined, images, count, init, product_parallel);
            split_apart(&joined, count, g.out_channels, out_hw, out);
        }
    });
    output
}

/// The input's gradient: `weightᵀ · grad_output`, scattered back through col2im (small
/// images: added into a padded image, then cropped); the products in `precision` (f32 sums
/// either way).
///
/// Panics if the slices' lengths do not match the geometry.
pub fn backward_input(g: &Geometry, grad_output: &[f32], weight: &[f32], precision: Precision) -> Vec<f32> {
    let (out_hw, k) = (g.out_height() * g.out_width(), g.patch_len());
    assert!(grad_output.len() == g.batch * g.output_len() && weight.len() == g.out_channels * k, "conv2d: operand sizes");
    if g.batch * g.input_len() == 0 || out_hw == 0 {
        return vec![0f32; g.batch * g.input_len()];
    }
    // Stride 1, over wide rows or channel-blocked: a direct forward convolution of the output's
    // gradient, with no column buffer to scatter back. (Small images measured slower that way
    // than through col2im on the planes of `conv_direct`.)
    let direct = conv_direct::input_gradient_geometry(g).and_then(|t| {
        let chosen = match precision {
            Precision::F32 => path(&t),
            Precision::Bf16 if conv_direct::suits_bf16(gemm::isa(), &t) => Path::Direct,
            Precision::Bf16 => Path::Packed,
        };
        (chosen != Path::Packed).then_some((t, chosen))
    });
    if let Some((transposed, chosen)) = direct {
        profile::count_choice(if chosen == Path::Blocked { "conv2d input gradient: blocked" } else { "conv2d input gradient: direct" });
        if chosen == Path::Blocked {
            return conv_blocked::forward(gemm::isa(), &transposed, grad_output, &conv_blocked::pack_input_gradient_kernel(g, weight), None);
        }
        let kernel = conv_direct::input_gradient_kernel(g, weight);
        return match precision {
            Precision::F32 => forward_on_path(&transposed, chosen, grad_output, &kernel, None),
            Precision::Bf16 => forward_bf16(&transposed, grad_output, &kernel.iter().map(|&w| bf16::from_f32(w)).collect::<Vec<_>>(), None),
        };
    }
    profile::count_choice("conv2d input gradient: packed");
    let mut grad_input = vec![0f32; g.batch * g.input_len()];
    let kernel_t = TransposedKernel::new(weight, g.out_channels, k, precision);
    // Small images whose whole column matrix fits the budget; others go band by band.
    let zero_image = (g.has_small_images() && g.band_rows() == g.out_height()).then(|| PaddedImages::zeros(g, 1));
    let (images_parallel, product_parallel) = split(g.batch);
    for_each_chunk(images_parallel, &mut grad_input, g.input_len(), |b, grad_image| {
        let grad_out = MatRef::row_major(&grad_output[b * g.output_len()..(b + 1) * g.output_len()], g.out_channels, out_hw).expect("sizes checked");
        if g.is_pointwise() {
            kernel_t.times(grad_image, out_hw, &grad_out, product_parallel);
            return;
        }
        if let Some(zero_image) = &zero_image {
            // Small images: the column matrix added into a padded image, then cropped.
            let mut col = vec![0f32; k * out_hw];
            kernel_t.times(&mut col, out_hw, &grad_out, product_parallel);
            let mut padded = zero_image.clone();
            padded.scatter_add(&col);
            padded.crop(g, 0, grad_image);
            return;
        }
        let band_rows = g.band_rows();
        let mut col = vec![0f32; k * band_rows * g.out_width()];
        for start in (0..g.out_height()).step_by(band_rows) {
            let rows = start..(start + band_rows).min(g.out_height());
            let band = rows.len() * g.out_width();
            let band_of_grad = Columns { inner: &grad_out, first: start * g.out_width(), len: band };
            kernel_t.times(&mut col[..k * band], band, &band_of_grad, product_parallel);
            col2im(g, &col[..k * band], rows, grad_image);
        }
    });
    grad_input
}

/// `weightᵀ` (`[C_in·kh·kw, C_out]`) prepared once for every image and band of an input
/// gradient: packed in f32; transposed and rounded in bf16 (then read as a weight).
enum TransposedKernel {
    F32(PackedA),
    Bf16 { values: Vec<bf16>, out_channels: usize },
}

impl TransposedKernel {
    fn new(weight: &[f32], out_channels: usize, patch_len: usize, precision: Precision) -> Self {
        match precision {
            Precision::F32 => Self::F32(PackedA::new(&MatRef::row_major(weight, out_channels, patch_len).expect("sizes checked").t())),
            Precision::Bf16 => Self::Bf16 {
                values: (0..patch_len * out_channels).map(|i| bf16::from_f32(weight[(i % out_channels) * patch_len + i / out_channels])).collect(),
                out_channels,
            },
        }
    }

    /// `c = weightᵀ · right`.
    fn times(&self, c: &mut [f32], ldc: usize, right: &impl PackB, parallel: bool) {
        match self {
            Self::F32(packed) => gemm::gemm(c, ldc, ASource::Packed(packed), right, Init::Overwrite, parallel),
            Self::Bf16 { values, out_channels } => {
                let a = ABf16::Weight(Bf16Matrix::new(values, values.len() / out_channels.max(&1), *out_channels).expect("sized"));
                gemm_bf16(c, ldc, a, &RoundedB::new(right), Init::Overwrite, parallel)
            }
        }
    }
}

/// The weight's gradient: `Σ_images grad_output · colᵀ`, the products in `precision` (f32
/// sums either way).
///
/// Panics if the slices' lengths do not match the geometry.
pub fn backward_weight(g: &Geometry, input: &[f32], grad_output: &[f32], precision: Precision) -> Vec<f32> {
    let (out_hw, k) = (g.out_height() * g.out_width(), g.patch_len());
    assert!(input.len() == g.batch * g.input_len() && grad_output.len() == g.batch * g.output_len(), "conv2d: operand sizes");
    let weight_len = g.out_channels * k;
    if weight_len == 0 {
        return Vec::new();
    }
    if precision == Precision::F32 && conv_blocked::suits_kernel_gradient(g, gemm::isa()) {
        profile::count_choice("conv2d kernel gradient: blocked");
        return conv_blocked::kernel_gradient(gemm::isa(), g, input, grad_output);
    }
    if conv_direct::input_gradient_geometry(g).is_some() && conv_direct::suits_kernel_gradient(g, false) {
        profile::count_choice("conv2d kernel gradient: direct");
        return conv_direct::kernel_gradient(g, input, grad_output, precision);
    }
    profile::count_choice("conv2d kernel gradient: packed");
    let (in_len, out_len, group) = (g.input_len(), g.output_len(), g.images_per_group());
    let groups = g.batch.div_ceil(group);
    let (groups_parallel, product_parallel) = split(groups);
    // One partial sum per thread's share of the groups, added at the end.
    let shares = if groups_parallel { rayon::current_num_threads().min(groups).max(1) } else { 1 };
    let per_share = groups.div_ceil(shares);
    let mut partials = vec![0f32; shares * weight_len];
    let offsets = (group > 1).then(|| PaddedImages::zeros(g, 0));
    for_each_chunk(groups_parallel, &mut partials, weight_len, |share, grad_weight| {
        let mut col = Vec::new();
        let mut first = true;
        for index in share * per_share..((share + 1) * per_share).min(groups) {
            let (b, count) = (index * group, group.min(g.batch - index * group));
            if let Some(offsets) = offsets.as_ref().filter(|_| count > 1) {
                // The images' output gradients side by side, and their patches packed from
                // padded copies: one product as deep as all their positions.
                let columns = count * out_hw;
                let joined = side_by_side(&grad_output[b * out_len..(b + count) * out_len], count, g.out_channels, out_hw);
                let grad_view = MatRef::row_major(&joined, g.out_channels, columns).expect("sizes checked");
                let col_t = TransposedPatches(offsets.holding(g, &input[b * in_len..(b + count) * in_len], count));
                gemm_in(precision, grad_weight, k, grad_view, &col_t, if first { Init::Overwrite } else { Init::Accumulate }, product_parallel);
                first = false;
                continue;
            }
            let image = &input[b * in_len..(b + 1) * in_len];
            let grad_out = &grad_output[b * out_len..(b + 1) * out_len];
            if g.is_pointwise() {
                let grad_view = MatRef::row_major(grad_out, g.out_channels, out_hw).expect("sizes checked");
                let image_t = MatRef::row_major(image, k, out_hw).expect("sizes checked").t();
                gemm_in(precision, grad_weight, k, grad_view, &image_t, if first { Init::Overwrite } else { Init::Accumulate }, product_parallel);
                first = false;
                continue;
            }
            let band_rows = g.band_rows();
            col.resize(k * band_rows * g.out_width(), 0.0);
            for start in (0..g.out_height()).step_by(band_rows) {
                let rows = start..(start + band_rows).min(g.out_height());
                let band = rows.len() * g.out_width();
                im2col(g, image, rows, &mut col[..k * band]);
                let offset = start * g.out_width();
                let grad_view = MatRef::new(&grad_out[offset..], g.out_channels, band, out_hw, 1).expect("sizes checked");
                let col_t = MatRef::row_major(&col[..k * band], k, band).expect("sizes checked").t();
                gemm_in(precision, grad_weight, k, grad_view, &col_t, if first { Init::Overwrite } else { Init::Accumulate }, product_parallel);
                first = false;
            }
        }
    });
    let mut sum = partials[..weight_len].to_vec();
    for partial in partials.chunks(weight_len).skip(1) {
        sum.iter_mut().zip(partial).for_each(|(s, p)| *s += p);
    }
    sum
}

fn contiguous<'a>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("conv2d: the {what} is not f32");
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("conv2d: the {what} is not contiguous"),
    }
}

/// Reads the geometry from the input's and the weight's layouts.
fn geometry(input: &Layout, weight: &Layout, stride: usize, padding: usize) -> candle_core::Result<Geometry> {
    let (batch, in_channels, height, width) = input.shape().dims4()?;
    let (out_channels, weight_in, kernel_h, kernel_w) = weight.shape().dims4()?;
    if weight_in != in_channels {
        candle_core::bail!("conv2d: the input has {in_channels} channels, the kernel expects {weight_in}");
    }
    // The padded input's size bounds every buffer the paths make from it (padded planes,
    // blocked copies): refuse one that could not be held, rather than overflow.
    let padded = |size: usize| padding.checked_mul(2).and_then(|p| p.checked_add(size));
    let (Some(padded_height), Some(padded_width)) = (padded(height), padded(width)) else {
        candle_core::bail!("conv2d: padding {padding} makes the {height}×{width} input too large");
    };
    let padded_len = padded_height.checked_mul(padded_width).and_then(|n| n.checked_mul(in_channels.max(1))).and_then(|n| n.checked_mul(batch.max(1)));
    if padded_len.is_none_or(|len| len > isize::MAX as usize / 8) {
        candle_core::bail!("conv2d: padding {padding} makes the {height}×{width} input too large");
    }
    if padded_height < kernel_h || padded_width < kernel_w || stride == 0 {
        candle_core::bail!("conv2d: a {kernel_h}×{kernel_w} kernel does not fit a {height}×{width} input padded by {padding}");
    }
    Ok(Geometry { batch, in_channels, height, width, out_channels, kernel_h, kernel_w, stride, padding })
}

/// The convolution as a candle op with its backward pass: `input.apply_op2(weight, Conv2d)`,
/// or with a bias that gets a gradient, `input.apply_op3(weight, bias, Conv2d)`.
pub struct Conv2d {
    /// The step between kernel positions, both ways.
    pub stride: usize,
    /// Zeros added on every side.
    pub padding: usize,
    /// Added as the output is written (inference; training passes its bias as the op's third
    /// operand, which gets a gradient).
    pub bias: Option<Vec<f32>>,
    /// The products of an f32 kernel: f32, or bf16 mixed precision (training; f32 sums and
    /// gradients). A bf16 kernel (inference) computes in bf16 whatever this says.
    pub precision: Precision,
}

impl Conv2d {
    /// The output, plus `bias` (or the op's own).
    fn output(&self, input: &CpuStorage, input_layout: &Layout, weight: &CpuStorage, weight_layout: &Layout, bias: Option<&[f32]>) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = geometry(input_layout, weight_layout, self.stride, self.padding)?;
        super::profile::count_flops("conv2d", g.flops());
        let bias = bias.or(self.bias.as_deref());
        if bias.is_some_and(|b| b.len() != g.out_channels) {
            candle_core::bail!("conv2d: the bias does not have {} values", g.out_channels);
        }
        let input = contiguous(input, input_layout, "input")?;
        let output = match weight {
            // A bf16 kernel (a model loaded in bf16) runs on the bf16 products.
            CpuStorage::BF16(data) => match weight_layout.contiguous_offsets() {
                Some((start, end)) => forward_bf16(&g, input, &data[start..end], bias),
                None => candle_core::bail!("conv2d: the kernel is not contiguous"),
            },
            _ => {
                let weight = contiguous(weight, weight_layout, "kernel")?;
                match self.precision {
                    Precision::F32 => forward(&g, input, weight, bias),
                    Precision::Bf16 => forward_bf16(&g, input, &weight.iter().map(|&w| bf16::from_f32(w)).collect::<Vec<_>>(), bias),
                }
            }
        };
        Ok((CpuStorage::F32(output), Shape::from((g.batch, g.out_channels, g.out_height(), g.out_width()))))
    }

    /// The input's and the kernel's gradients, each where the operand tracks one.
    fn gradients(&self, input: &Tensor, weight: &Tensor, grad_output: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // An operand that needs no gradient (the images; a LoRA's frozen base kernel) gets
        // none: that product is skipped.
        let (input_needs_grad, weight_needs_grad) = (input.track_op(), weight.track_op());
        let grad_output = grad_output.detach().contiguous()?;
        let (input, weight) = (input.detach(), weight.detach());
        let grad_input = if input_needs_grad {
            Some(grad_output.apply_op2_no_bwd(&weight, &GradInput { stride: self.stride, padding: self.padding, input_dims: input.dims().to_vec(), precision: self.precision })?)
        } else {
            None
        };
        let grad_weight = if weight_needs_grad {
            Some(input.apply_op2_no_bwd(&grad_output, &GradWeight { stride: self.stride, padding: self.padding, weight_dims: weight.dims().to_vec(), precision: self.precision })?)
        } else {
            None
        };
        Ok((grad_input, grad_weight))
    }
}

impl CustomOp2 for Conv2d {
    fn name(&self) -> &'static str {
        "conv2d-im2col-gemm"
    }

    fn cpu_fwd(&self, input: &CpuStorage, input_layout: &Layout, weight: &CpuStorage, weight_layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.output(input, input_layout, weight, weight_layout, None)
    }

    fn bwd(&self, input: &Tensor, weight: &Tensor, _output: &Tensor, grad_output: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        self.gradients(input, weight, grad_output)
    }
}

/// Training's convolution with its bias as a third operand, `input.apply_op3(weight, bias,
/// Conv2d)`: the bias is added as the output is written (not in a pass of its own), and its
/// gradient is the output gradient's sum per channel.
impl CustomOp3 for Conv2d {
    fn name(&self) -> &'static str {
        "conv2d-im2col-gemm-bias"
    }

    fn cpu_fwd(&self, input: &CpuStorage, input_layout: &Layout, weight: &CpuStorage, weight_layout: &Layout, bias: &CpuStorage, bias_layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let bias = contiguous(bias, bias_layout, "bias")?;
        self.output(input, input_layout, weight, weight_layout, Some(bias))
    }

    fn bwd(&self, input: &Tensor, weight: &Tensor, bias: &Tensor, _output: &Tensor, grad_output: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (grad_input, grad_weight) = self.gradients(input, weight, grad_output)?;
        let grad_bias = if bias.track_op() {
            let _timer = profile::timer("conv bias backward");
            Some(super::fused::channel_bias_gradient(grad_output, bias)?)
        } else {
            None
        };
        Ok((grad_input, grad_weight, grad_bias))
    }
}

/// `grad_output.apply_op2(weight)`: the input's gradient.
struct GradInput {
    stride: usize,
    padding: usize,
    input_dims: Vec<usize>,
    precision: Precision,
}

impl CustomOp2 for GradInput {
    fn name(&self) -> &'static str {
        "conv2d-grad-input"
    }

    fn cpu_fwd(&self, grad: &CpuStorage, grad_layout: &Layout, weight: &CpuStorage, weight_layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let _timer = super::profile::timer("conv2d backward (input)");
        let input_layout = Layout::contiguous(self.input_dims.as_slice());
        let g = geometry(&input_layout, weight_layout, self.stride, self.padding)?;
        super::profile::count_flops("conv2d backward (input)", g.flops());
        let values = backward_input(&g, contiguous(grad, grad_layout, "output gradient")?, contiguous(weight, weight_layout, "kernel")?, self.precision);
        Ok((CpuStorage::F32(values), Shape::from(self.input_dims.as_slice())))
    }
}

/// `input.apply_op2(grad_output)`: the kernel's gradient.
struct GradWeight {
    stride: usize,
    padding: usize,
    weight_dims: Vec<usize>,
    precision: Precision,
}

impl CustomOp2 for GradWeight {
    fn name(&self) -> &'static str {
        "conv2d-grad-weight"
    }

    fn cpu_fwd(&self, input: &CpuStorage, input_layout: &Layout, grad: &CpuStorage, grad_layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let _timer = super::profile::timer("conv2d backward (kernel)");
        let weight_layout = Layout::contiguous(self.weight_dims.as_slice());
        let g = geometry(input_layout, &weight_layout, self.stride, self.padding)?;
        super::profile::count_flops("conv2d backward (kernel)", g.flops());
        let values = backward_weight(&g, contiguous(input, input_layout, "input")?, contiguous(grad, grad_layout, "output gradient")?, self.precision);
        Ok((CpuStorage::F32(values), Shape::from(self.weight_dims.as_slice())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The direct definition, in f64.
    fn reference(g: &Geometry, input: &[f32], weight: &[f32]) -> Vec<f64> {
        let (oh, ow) = (g.out_height(), g.out_width());
        let mut out = vec![0f64; g.batch * g.out_channels * oh * ow];
        for b in 0..g.batch {
            for o in 0..g.out_channels {
                for y in 0..oh {
                    for x in 0..ow {
                        let mut sum = 0f64;
                        for c in 0..g.in_channels {
                            for ky in 0..g.kernel_h {
                                for kx in 0..g.kernel_w {
                                    let iy = (y * g.stride + ky) as isize - g.padding as isize;
                                    let ix = (x * g.stride + kx) as isize - g.padding as isize;
                                    if iy < 0 || ix < 0 || iy >= g.height as isize || ix >= g.width as isize {
                                        continue;
                                    }
                                    let i = ((b * g.in_channels + c) * g.height + iy as usize) * g.width + ix as usize;
                                    let w = ((o * g.in_channels + c) * g.kernel_h + ky) * g.kernel_w + kx;
                                    sum += input[i] as f64 * weight[w] as f64;
                                }
                            }
                        }
                        out[((b * g.out_channels + o) * oh + y) * ow + x] = sum;
                    }
                }
            }
        }
        out
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n).map(|i| (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32 / (1u32 << 24) as f32) - 0.5).collect()
    }

    const CASES: &[(usize, usize, usize, usize, usize, usize, usize, usize)] = &[
        // batch, c_in, h, w, c_out, k, stride, padding
        (2, 3, 7, 5, 4, 3, 1, 1),
        (3, 4, 8, 8, 5, 3, 2, 1),
        (1, 2, 9, 6, 3, 3, 2, 0),
        (2, 5, 4, 4, 6, 1, 1, 0),
        (1, 3, 5, 5, 2, 1, 2, 0),
        (4, 2, 6, 7, 3, 3, 1, 0),
        // Wide enough for the direct path, forward and (transposed) backward.
        (2, 3, 5, 17, 4, 3, 1, 1),
        (1, 2, 4, 20, 3, 3, 1, 0),
        // Even product columns and more input channels than a tile has rows: bf16 planes read
        // in place by the kernel gradient.
        (2, 14, 4, 18, 3, 3, 1, 1),
        // Outputs a whole number of tiles wide (16 and 32 columns), tiles starting at each
        // row; more output channels than a tile has rows, and more input channels than one
        // depth block (several bands in the tests).
        (2, 3, 5, 32, 13, 3, 1, 1),
        (1, 130, 3, 16, 7, 3, 1, 1),
        // Channel-blocked on AVX2 (8 input channels or more, output channels filling 3/4 of a
        // group of 32, 64 positions or more), forward and backward.
        (2, 24, 9, 8, 24, 3, 1, 1),
        // Channel-blocked, several small images per run of positions on 2 threads (5, and a
        // last run of 4).
        (9, 9, 3, 5, 24, 3, 1, 1),
        // Small images, convolved several at a time (GROUP_COLUMNS is 40 in the tests):
        // groups of 3 and 2, of 2 and 1; pointwise, of 2 and 1; no output channel.
        (5, 3, 4, 4, 4, 3, 1, 1),
        (3, 2, 5, 5, 3, 3, 1, 1),
        (3, 5, 5, 5, 6, 1, 1, 0),
        (3, 2, 4, 4, 0, 3, 1, 1),
        // Images with enough positions for a product of their own, not direct (stride 2; rows
        // too short for the kernel's dropped columns): patches packed from runs of the rows,
        // input gradients scattered back by col2im.
        (2, 3, 16, 14, 4, 3, 2, 1),
        (2, 3, 7, 9, 4, 3, 1, 1),
    ];

    fn geometries() -> impl Iterator<Item = Geometry> {
        CASES.iter().map(|&(batch, in_channels, height, width, out_channels, k, stride, padding)| Geometry {
            batch,
            in_channels,
            height,
            width,
            out_channels,
            kernel_h: k,
            kernel_w: k,
            stride,
            padding,
        })
    }

    #[test]
    fn forward_matches_the_definition() {
        for g in geometries() {
            let input = values(g.batch * g.input_len(), 1);
            let weight = values(g.out_channels * g.patch_len(), 2);
            let got = forward(&g, &input, &weight, None);
            for (a, b) in got.iter().zip(reference(&g, &input, &weight)) {
                assert!((*a as f64 - b).abs() < 1e-5, "{g:?}: {a} vs {b}");
            }
            let bias = values(g.out_channels, 7);
            let with_bias = forward(&g, &input, &weight, Some(&bias));
            let plane = g.out_height() * g.out_width();
            // (Some paths start the sums from the bias, so the rounding differs: the tolerance
            // is the one above.)
            for (i, (a, b)) in with_bias.iter().zip(&got).enumerate() {
                let bias = bias[(i / plane) % g.out_channels];
                assert!((a - b - bias).abs() < 1e-5, "{g:?}: bias at {i}: {a} - {b} - {bias}");
            }
        }
    }

    /// The bf16 kernel gives the definition's sums of the bf16-rounded operands (in f64), with
    /// the bias added, for every geometry (odd patch lengths among them).
    #[test]
    fn bf16_forward_matches_the_definition_of_rounded_operands() {
        let round = |v: &[f32]| -> Vec<f32> { v.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect() };
        for g in geometries() {
            let input = values(g.batch * g.input_len(), 1);
            let weight = values(g.out_channels * g.patch_len(), 2);
            let bias = values(g.out_channels, 7);
            let weight16: Vec<bf16> = weight.iter().map(|&x| bf16::from_f32(x)).collect();
            let got = forward_bf16(&g, &input, &weight16, Some(&bias));
            let plane = g.out_height() * g.out_width();
            for (i, (a, b)) in got.iter().zip(reference(&g, &round(&input), &round(&weight))).enumerate() {
                let want = b + bias[(i / plane) % g.out_channels] as f64;
                assert!((*a as f64 - want).abs() < 1e-4, "{g:?}: {a} vs {want}");
            }
        }
    }

    /// The direct path (`conv_direct`) at every level this CPU has, f32 and bf16, on one thread
    /// and on all: widths of 1, odd channel counts, partial panels, no input channel, several
    /// depth blocks (300 channels) and bands of rows, padding 0 to 2, kernels 1×1 to 5×5.
    #[test]
    fn direct_path_matches_the_definition_at_every_level() {
        use super::super::gemm::Isa;
        let round = |v: &[f32]| -> Vec<f32> { v.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect() };
        // batch, c_in, h, w, c_out, k, padding
        let cases = [(2, 3, 7, 5, 4, 3, 1), (1, 5, 9, 33, 13, 3, 1), (1, 1, 1, 1, 2, 1, 0), (1, 4, 6, 3, 25, 3, 2), (1, 6, 5, 40, 7, 5, 2), (2, 2, 4, 4, 3, 1, 0), (1, 7, 3, 70, 12, 3, 0), (1, 0, 3, 3, 2, 3, 1), (1, 300, 3, 4, 13, 3, 1), (2, 32, 5, 33, 40, 3, 1), (1, 320, 4, 6, 33, 3, 1)];
        for isa in Isa::all_supported() {
            for (batch, in_channels, height, width, out_channels, k, padding) in cases {
                let g = Geometry { batch, in_channels, height, width, out_channels, kernel_h: k, kernel_w: k, stride: 1, padding };
                let input = values(g.batch * g.input_len(), 1);
                let weight = values(g.out_channels * g.patch_len(), 2);
                let bias = values(g.out_channels, 7);
                let weight16: Vec<bf16> = weight.iter().map(|&x| bf16::from_f32(x)).collect();
                let panels = conv_direct::pack_kernel(&g, &weight, isa.tile().0);
                let panels16 = conv_direct::pack_kernel_bf16(isa, &g, &weight16);
                let plane = g.out_height() * g.out_width();
                for (bf16_path, want) in [(false, reference(&g, &input, &weight)), (true, reference(&g, &round(&input), &round(&weight)))] {
                    for parallel in [false, true] {
                        let mut got = vec![f32::NAN; g.batch * g.output_len()];
                        for (b, out) in got.chunks_exact_mut(g.output_len().max(1)).enumerate() {
                            let image = &input[b * g.input_len()..(b + 1) * g.input_len()];
                            if bf16_path {
                                conv_direct::forward_image_bf16(isa, &g, image, &panels16, Some(&bias), out, parallel);
                            } else {
                                conv_direct::forward_image(isa, &g, image, &panels, Some(&bias), out, parallel);
                            }
                        }
                        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                            let want = b + bias[(i / plane) % g.out_channels] as f64;
                            assert!((*a as f64 - want).abs() < 1e-4, "{isa:?} bf16 {bf16_path} {g:?} at {i}: {a} vs {want}");
                        }
                    }
                }
            }
        }
    }

    /// The channel-blocked path (`conv_blocked`), where this CPU has its kernel: channel counts
    /// that fill no block or group, one position and widths that end mid-call, several bands
    /// of rows and blocks of channels, kernels 2×2 to 5×5, one image (threads over channels and
    /// positions) and several (threads over images; small images several to a run of positions,
    /// with a last run of fewer).
    #[test]
    fn blocked_path_matches_the_definition() {
        use super::super::gemm::Isa;
        if !Isa::Avx2.is_supported() {
            return;
        }
        // batch, c_in, h, w, c_out, k, padding
        let cases = [(1, 8, 5, 7, 24, 3, 1), (3, 13, 9, 4, 56, 3, 1), (1, 16, 1, 1, 24, 3, 1), (1, 20, 6, 11, 64, 5, 2), (2, 9, 30, 17, 88, 3, 0), (1, 24, 40, 3, 30, 2, 0), (4, 300, 3, 4, 24, 3, 1), (1, 8, 70, 90, 32, 3, 1), (37, 16, 4, 4, 48, 3, 1), (11, 9, 2, 3, 24, 2, 0)];
        // On 2 threads whatever the machine: the threads decide how many images share a run.
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        pool.install(|| for (batch, in_channels, height, width, out_channels, k, padding) in cases {
            let g = Geometry { batch, in_channels, height, width, out_channels, kernel_h: k, kernel_w: k, stride: 1, padding };
            assert!(conv_blocked::runs(&g, Isa::Avx2), "{g:?}");
            let input = values(g.batch * g.input_len(), 1);
            let weight = values(g.out_channels * g.patch_len(), 2);
            let bias = values(g.out_channels, 7);
            let got = conv_blocked::forward(Isa::Avx2, &g, &input, &conv_blocked::pack_kernel(&g, &weight), Some(&bias));
            let plane = g.out_height() * g.out_width();
            for (i, (a, b)) in got.iter().zip(reference(&g, &input, &weight)).enumerate() {
                let want = b + bias[(i / plane) % g.out_channels] as f64;
                assert!((*a as f64 - want).abs() < 1e-4, "{g:?} at {i}: {a} vs {want}");
            }
        });
    }

    /// The blocked kernel gradient against its definition (in f64): channel counts that fill
    /// no block or group, a last call short of (kernel position, channel) pairs (1×1, 2×2 and
    /// 5×5 kernels), images with more positions than a chunk, one image (threads over groups) and
    /// several (threads over images; small images several to a chunk, a last one of fewer).
    #[test]
    fn blocked_kernel_gradient_matches_the_definition() {
        use super::super::gemm::Isa;
        if !Isa::Avx2.is_supported() {
            return;
        }
        // batch, c_in, h, w, c_out, k, padding
        let cases = [(1, 8, 9, 8, 24, 3, 1), (3, 13, 8, 9, 56, 3, 1), (2, 20, 10, 11, 64, 5, 2), (1, 9, 30, 17, 88, 3, 0), (4, 24, 9, 9, 30, 2, 0), (2, 16, 16, 16, 32, 3, 1), (37, 16, 4, 4, 48, 3, 1), (11, 9, 5, 3, 24, 2, 1), (40, 16, 4, 4, 32, 1, 0), (9, 9, 8, 8, 24, 1, 0)];
        // On 2 threads whatever the machine: the threads decide how many images share a run.
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        pool.install(|| for (batch, in_channels, height, width, out_channels, k, padding) in cases {
            let g = Geometry { batch, in_channels, height, width, out_channels, kernel_h: k, kernel_w: k, stride: 1, padding };
            assert!(conv_blocked::suits_kernel_gradient(&g, Isa::Avx2), "{g:?}");
            let input = values(g.batch * g.input_len(), 1);
            let grad_output = values(g.batch * g.output_len(), 3);
            let got = conv_blocked::kernel_gradient(Isa::Avx2, &g, &input, &grad_output);
            let (out_h, out_w) = (g.out_height(), g.out_width());
            let mut want = vec![0f64; got.len()];
            for b in 0..g.batch {
                for o in 0..g.out_channels {
                    for c in 0..g.in_channels {
                        for ky in 0..k {
                            for kx in 0..k {
                                let mut sum = 0f64;
                                for oy in 0..out_h {
                                    for ox in 0..out_w {
                                        let (y, x) = ((oy + ky).wrapping_sub(padding), (ox + kx).wrapping_sub(padding));
                                        if y < height && x < width {
                                            let grad = grad_output[((b * g.out_channels + o) * out_h + oy) * out_w + ox] as f64;
                                            sum += grad * input[((b * in_channels + c) * height + y) * width + x] as f64;
                                        }
                                    }
                                }
                                want[((o * in_channels + c) * k + ky) * k + kx] += sum;
                            }
                        }
                    }
                }
            }
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!((*a as f64 - b).abs() < 1e-3, "{g:?} at {i}: {a} vs {b}");
            }
        });
    }

    /// The output and the gradients of loss = Σ output · r against the definition (in f64), in
    /// f32 and in bf16 mixed precision, where the definition takes every product's operands
    /// rounded to bf16 (the sums stay f32, so the tolerance is the same); without a bias and
    /// with one (training's third operand, added as the output is written).
    #[test]
    fn gradients_match_the_definition() -> candle_core::Result<()> {
        let round = |v: &[f32]| -> Vec<f32> { v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect() };
        let cases = geometries().into_iter().flat_map(|g| [(g, Precision::F32, false), (g, Precision::Bf16, false), (g, Precision::F32, true), (g, Precision::Bf16, true)]);
        for (g, precision, with_bias) in cases {
            let dev = Device::Cpu;
            let (input, weight, r) = (values(g.batch * g.input_len(), 3), values(g.out_channels * g.patch_len(), 4), values(g.batch * g.output_len(), 5));
            let input_var = Var::from_vec(input.clone(), (g.batch, g.in_channels, g.height, g.width), &dev)?;
            let weight_var = Var::from_vec(weight.clone(), (g.out_channels, g.in_channels, g.kernel_h, g.kernel_w), &dev)?;
            let r_tensor = Tensor::from_vec(r.clone(), (g.batch, g.out_channels, g.out_height(), g.out_width()), &dev)?;
            let bias = values(g.out_channels, 6);
            let bias_var = Var::from_vec(bias.clone(), g.out_channels, &dev)?;
            let op = Conv2d { stride: g.stride, padding: g.padding, bias: None, precision };
            let output = match with_bias {
                false => input_var.as_tensor().apply_op2(weight_var.as_tensor(), op)?,
                true => input_var.as_tensor().apply_op3(weight_var.as_tensor(), bias_var.as_tensor(), op)?,
            };
            // The bias gradient: each channel's sum of the (unrounded) output gradient.
            let plane = g.out_height() * g.out_width();
            let bias_gradient: Vec<f64> = (0..g.out_channels).map(|o| (0..g.batch).flat_map(|b| &r[(b * g.out_channels + o) * plane..][..plane]).map(|&v| v as f64).sum()).collect();
            let (input, weight, r) = match precision {
                Precision::F32 => (input, weight, r),
                Precision::Bf16 => (round(&input), round(&weight), round(&r)),
            };
            for (i, (a, b)) in output.flatten_all()?.to_vec1::<f32>()?.iter().zip(reference(&g, &input, &weight)).enumerate() {
                let b = if with_bias { b + bias[(i / plane) % g.out_channels] as f64 } else { b };
                assert!((*a as f64 - b).abs() < 1e-5, "{g:?} {precision:?}: the output is {a}, the definition gives {b}");
            }
            let grads = (output * r_tensor)?.sum_all()?.backward()?;
            if with_bias {
                let got = grads.get(bias_var.as_tensor()).expect("bias gradient").to_vec1::<f32>()?;
                for (got, &want) in got.iter().zip(&bias_gradient) {
                    assert!((*got as f64 - want).abs() < 1e-5, "{g:?} {precision:?}: the bias gradient is {got}, the definition gives {want}");
                }
            }
            let grad_input = grads.get(input_var.as_tensor()).expect("input gradient").flatten_all()?.to_vec1::<f32>()?;
            let grad_weight = grads.get(weight_var.as_tensor()).expect("kernel gradient").flatten_all()?.to_vec1::<f32>()?;
            let (mut want_input, mut want_weight) = (vec![0f64; input.len()], vec![0f64; weight.len()]);
            let (oh, ow) = (g.out_height(), g.out_width());
            for b in 0..g.batch {
                for o in 0..g.out_channels {
                    for y in 0..oh {
                        for x in 0..ow {
                            let dr = r[((b * g.out_channels + o) * oh + y) * ow + x] as f64;
                            for c in 0..g.in_channels {
                                for ky in 0..g.kernel_h {
                                    for kx in 0..g.kernel_w {
                                        let iy = (y * g.stride + ky) as isize - g.padding as isize;
                                        let ix = (x * g.stride + kx) as isize - g.padding as isize;
                                        if iy < 0 || ix < 0 || iy >= g.height as isize || ix >= g.width as isize {
                                            continue;
                                        }
                                        let i = ((b * g.in_channels + c) * g.height + iy as usize) * g.width + ix as usize;
                                        let w = ((o * g.in_channels + c) * g.kernel_h + ky) * g.kernel_w + kx;
                                        want_input[i] += dr * weight[w] as f64;
                                        want_weight[w] += dr * input[i] as f64;
                                    }
                                }
                            }
                        }
                    }
                }
            }
            for (got, want, what) in [(&grad_input, &want_input, "input"), (&grad_weight, &want_weight, "kernel")] {
                for (a, b) in got.iter().zip(want.iter()) {
                    assert!((*a as f64 - b).abs() < 1e-5, "{g:?} {precision:?}: the {what} gradient is {a}, the definition gives {b}");
                }
            }
        }
        Ok(())
    }

    /// A padding that would make the padded input larger than memory is refused with its
    /// value, not overflowed.
    #[test]
    fn absurd_padding_is_refused() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let input = Tensor::ones((1, 2, 4, 4), candle_core::DType::F32, &dev)?;
        let weight = Tensor::ones((3, 2, 3, 3), candle_core::DType::F32, &dev)?;
        for padding in [usize::MAX / 2, 1 << 40] {
            let error = input.apply_op2_no_bwd(&weight, &Conv2d { stride: 1, padding, bias: None, precision: Precision::F32 }).expect_err("refused");
            assert!(error.to_string().contains(&format!("padding {padding}")), "{error}");
        }
        Ok(())
    }

    /// An input that needs no gradient gets none (its product is skipped).
    #[test]
    fn constant_input_gets_no_gradient() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let input = Tensor::ones((1, 2, 4, 4), candle_core::DType::F32, &dev)?;
        let weight = Var::ones((3, 2, 3, 3), candle_core::DType::F32, &dev)?;
        let grads = input.apply_op2(weight.as_tensor(), Conv2d { stride: 1, padding: 1, bias: None, precision: Precision::F32 })?.sum_all()?.backward()?;
        assert!(grads.get(&input).is_none());
        assert!(grads.get(weight.as_tensor()).is_some());
        Ok(())
    }

    /// The patches of three images packed straight into panels (from runs of their rows, and
    /// from padded copies) equal im2col's column matrices side by side for every panel width
    /// the levels use and every split of the columns (a panel that starts or ends on an output
    /// row's padding-only tail among them: kernel 4, padding 2; panels across two images); and
    /// transposed, as the kernel gradient packs them.
    #[test]
    fn packed_patches_are_the_column_matrix() {
        let cases = [(6, 4, 1, 2), (7, 3, 2, 1), (9, 3, 2, 0), (5, 3, 1, 0), (6, 1, 1, 1), (8, 5, 1, 2), (3, 3, 3, 2)];
        for (size, kernel, stride, padding) in cases {
            let g = Geometry { batch: 3, in_channels: 2, height: size, width: size + 1, out_channels: 1, kernel_h: kernel, kernel_w: kernel, stride, padding };
            let images = values(g.batch * g.input_len(), 9);
            let (k, out_hw) = (g.patch_len(), g.out_height() * g.out_width());
            let n = g.batch * out_hw;
            let mut cols = vec![f32::NAN; k * n];
            for (image, col) in images.chunks_exact(g.input_len()).zip(cols.chunks_exact_mut(k * out_hw)) {
                im2col(&g, image, 0..g.out_height(), col);
            }
            let col = side_by_side(&cols, g.batch, k, out_hw);
            let runs = Patches::new(&g, &images, g.batch, None);
            let padded = Patches::new(&g, &images, g.batch, Some(&PaddedImages::zeros(&g, 0)));
            for (patches, nr) in [&runs, &padded].into_iter().flat_map(|p| [4, 8, 16, 32].map(|nr| (p, nr))) {
                for n0 in 0..n {
                    let nc = n - n0;
                    let mut panels = vec![f32::NAN; k * nc.div_ceil(nr) * nr];
                    patches.pack(0, k, n0, nc, nr, &mut panels);
                    for (p, panel) in panels.chunks_exact(k * nr).enumerate() {
                        for kk in 0..k {
                            for j in 0..nr {
                                let column = n0 + p * nr + j;
                                let want = if column < n { col[kk * n + column] } else { 0.0 };
                                assert_eq!(panel[kk * nr + j], want, "{g:?} nr {nr} n0 {n0}: row {kk}, column {column}");
                            }
                        }
                    }
                }
            }
            // The transposed patches (the kernel gradient's `B`, `n × k`), for blocks that start
            // inside the depth (positions) and inside the columns (patch rows).
            let transposed = TransposedPatches(PaddedImages::zeros(&g, 0).holding(&g, &images, g.batch));
            assert_eq!(transposed.dims(), (n, k));
            for (nr, k0) in [4, 8, 16, 32].into_iter().flat_map(|nr| [0, 1, n / 2].map(|k0| (nr, k0))) {
                for n0 in 0..k {
                    let (kc, nc) = (n - k0, k - n0);
                    let mut panels = vec![f32::NAN; kc * nc.div_ceil(nr) * nr];
                    transposed.pack(k0, kc, n0, nc, nr, &mut panels);
                    for (p, panel) in panels.chunks_exact(kc * nr).enumerate() {
                        for kk in 0..kc {
                            for j in 0..nr {
                                let row = n0 + p * nr + j;
                                let want = if row < k { col[row * n + k0 + kk] } else { 0.0 };
                                assert_eq!(panel[kk * nr + j], want, "{g:?} nr {nr} k0 {k0} n0 {n0}: position {}, patch row {row}", k0 + kk);
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn small_images_are_grouped_up_to_the_column_target() {
        let g = |batch, size| Geometry { batch, in_channels: 2, height: size, width: size, out_channels: 1, kernel_h: 3, kernel_w: 3, stride: 1, padding: 1 };
        // 40 columns in the tests: 4×4 images three at a time, 5×5 two, 7×7 and larger one.
        assert_eq!([g(5, 4), g(3, 5), g(4, 7), g(1, 4), g(0, 4)].map(|g| g.images_per_group()), [3, 2, 1, 1, 1]);
        // No more than the budget of patch values.
        assert_eq!(Geometry { in_channels: 1 << 20, ..g(8, 4) }.images_per_group(), 1);
    }

    #[test]
    fn bands_cover_the_output() {
        // A column budget smaller than one row's patches still makes one-row bands.
        let g = Geometry { batch: 1, in_channels: 512, height: 64, width: 4096, out_channels: 1, kernel_h: 3, kernel_w: 3, stride: 1, padding: 1 };
        assert_eq!(g.band_rows(), 1);
    }
}
