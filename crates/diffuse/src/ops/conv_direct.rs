//! Stride-1 convolution read where the input lies. Each image's channels are copied once into
//! zero-padded planes, flattened with the padded row length `wp`, and output position `(y, x)`
//! becomes column `y·wp + x` of the product. Kernel position `(ky, kx)` then reads every output
//! column's input at the same offset `ky·wp + kx`, so `B`'s row for one channel and one kernel
//! position is a contiguous run of a plane: the micro-kernel walks the planes in place
//! ([`BWalk`], one run per kernel position) and nothing is packed per block, where the implicit
//! GEMM of `ops::conv` writes every patch into panels (a fifth of a VAE decode's time). When
//! the output's width is a whole number of the micro-kernel's tiles, the tiles start at each
//! output row and skip the columns at the end of each padded row that are no output position
//! (one at 3×3: a row's right padding is the next row's left, see `Plan::row_length`);
//! otherwise those columns are computed and dropped ([`ColumnTiles`]).
//!
//! In bf16 a plane holds a channel pair (one `u32` per position: channels `2c` and `2c + 1`),
//! the layout `vdpbf16ps` reads; the kernel is packed in the same order.

use half::bf16;
use rayon::prelude::*;

use super::conv::Geometry;
use super::gemm::{self, ASource, BWalk, COut, Init, Isa, MatRef, PackedB};
use super::{amx, gemm_bf16, vector, Precision};

/// Bytes of input planes that one block of output columns reads, kept in L2 while every row
/// panel of the kernel passes over them.
const BLOCK_BYTES: usize = 512 << 10;
/// Planes (channels, or channel pairs in bf16) per depth block for a tile of `mr` rows. A row
/// panel's share of the kernel for one block is read again for every column panel of the block,
/// so it should stay in L1: at 3×3 with AVX2's 6 rows, 64 planes are 13.5 KiB; 128 (27 KiB,
/// most of a 32 KiB L1) measured 3–7 % slower on the VAE's and the UNet's shapes (Zen 2).
/// AVX-512's 12 rows keep 128 planes, measured on Zen 4 where fewer depth blocks meant fewer
/// tile stores. Later blocks add to the output.
fn planes_per_block(mr: usize) -> usize {
    if mr >= 12 { 128 } else { 64 }
}

/// The depth blocks of `steps` planes for a tile of `mr` rows: `(first plane, planes)`.
fn depth_blocks(steps: usize, mr: usize) -> impl Iterator<Item = (usize, usize)> {
    let per_block = planes_per_block(mr);
    (0..steps).step_by(per_block).map(move |first| (first, per_block.min(steps - first)))
}

/// Whether the direct path suits `g`'s forward pass (and so its input gradient, a forward
/// convolution): what [`suits_kernel_gradient`] asks, or rows of at least two whole tiles of
/// the micro-kernel (they start at each output row, see [`ColumnTiles`]): on AVX2's 16-column
/// tiles, SD 1.5's 32×32 convolutions with 640 to 1,920 channels run 1.15–1.3× faster direct
/// (Zen 2), where 16×16 ones with 1,280 channels still run 1.2× faster packed.
pub(super) fn suits(g: &Geometry, bf16: bool) -> bool {
    let (_, nr) = gemm::isa().tile();
    suits_kernel_gradient(g, bf16) || (fits(g) && g.out_width() % nr == 0 && g.out_width() >= 2 * nr)
}

/// Whether the direct path suits `g`'s forward pass in bf16 on `isa`: [`suits`], or on AMX's
/// tiles any convolution it [`fits`]: there it runs 1.2-2× faster than the packed path at
/// every 3×3 shape of SD 1.5's UNet and VAE and of the training benchmark, 4×4 to 512×512
/// (`diffuse bench --kernels`, Xeon with AMX), where packing the patches would cost more than
/// the tiles' products.
pub(super) fn suits_bf16(isa: Isa, g: &Geometry) -> bool {
    (on_tiles(isa, g) && fits(g)) || suits(g, true)
}

/// Whether the direct path suits `g`'s kernel gradient: [`fits`], and either few output
/// channels or wide rows. The packed path's cost is packing the patches, shared by all output
/// channels: measured on SD 1.5's and the training benchmark's shapes (`diffuse bench
/// --kernels`), direct is 1.1–1.3× faster up to 256 output channels from 16×16 up, and, with
/// more channels, from 32 columns in bf16 (whose patches are also rounded) and 64 in f32; below
/// those (1,280 channels at 16×16) packing wins, 1.3×. (The kernel gradient with 640 channels
/// at 32×32 runs 1.5× slower direct on AVX2, where the forward pass runs faster.)
pub(super) fn suits_kernel_gradient(g: &Geometry, bf16: bool) -> bool {
    let wide = g.width + 2 * g.padding >= if bf16 { 32 } else { 64 };
    fits(g) && (g.out_channels <= 256 || wide)
}

/// Whether the direct path can run `g` at all, and cheaply: stride 1, a kernel wider than 1×1
/// (whose input is its own column matrix already: the packed path is 1.15× faster there), and
/// at most one dropped column in eight.
fn fits(g: &Geometry) -> bool {
    let padded_width = g.width + 2 * g.padding;
    g.stride == 1 && g.kernel_w > 1 && g.kernel_w <= padded_width && g.kernel_h <= g.height + 2 * g.padding && (g.kernel_w - 1) * 8 <= padded_width
}

/// Bytes of padded planes per band of output rows: a large image (the VAE's last blocks) is
/// convolved a band at a time, so that its planes add little to the peak memory. (Tiny in the
/// unit tests, so that their small images take several bands.)
const PLANES_BYTES: usize = if cfg!(test) { 4 << 10 } else { 16 << 20 };

/// Where the padded planes of one band of output rows put things.
struct Plan {
    /// Padded row length.
    wp: usize,
    /// Words per plane: the band's padded input rows, then slack that a tile past the last
    /// column reads.
    plane: usize,
    /// The band's first output row.
    first_row: usize,
    /// Product columns: the band's output rows at the padded length.
    columns: usize,
    /// Offset of each kernel position `(ky, kx)` in a plane, row-major.
    taps: Vec<usize>,
    /// The micro-kernel's tile width.
    nr: usize,
}

impl Plan {
    /// Output rows `first_row..first_row + rows`.
    fn band(g: &Geometry, nr: usize, first_row: usize, rows: usize) -> Self {
        let wp = Self::row_length(g);
        // The last tile starts below `columns` and reads nr words from its taps' offsets, the
        // largest (kh - 1)·wp + kw - 1: (rows + kh - 1)·wp + kw + nr covers it.
        // Even, so that bf16 planes start on a pair (read in place as one, see `kernel_gradient`).
        let plane = ((rows + g.kernel_h - 1) * wp + g.kernel_w + nr).next_multiple_of(2);
        let taps = (0..g.kernel_h).flat_map(|ky| (0..g.kernel_w).map(move |kx| ky * wp + kx)).collect();
        Self { wp, plane, first_row, columns: rows * wp, taps, nr }
    }

    /// The padded row length: a row's left padding, its values, and the next row's left
    /// padding doubles as its right padding (both zeros), so `width + padding` (not `+ 2 ·
    /// padding`) and one dropped column per row at 3×3, not two. Never shorter than an output row.
    fn row_length(g: &Geometry) -> usize {
        (g.width + g.padding).max(g.out_width())
    }

    /// The whole output.
    fn new(g: &Geometry, nr: usize) -> Self {
        Self::band(g, nr, 0, g.out_height())
    }

    /// The bands of output rows whose `planes` planes of `word_size` bytes stay within
    /// [`PLANES_BYTES`] (one row at least).
    fn bands(g: &Geometry, nr: usize, planes: usize, word_size: usize) -> impl Iterator<Item = Plan> + '_ {
        let row_bytes = (planes * Self::row_length(g) * word_size).max(1);
        let rows = (PLANES_BYTES / row_bytes).saturating_sub(g.kernel_h).max(1);
        (0..g.out_height()).step_by(rows).map(move |first| Plan::band(g, nr, first, rows.min(g.out_height() - first)))
    }

    /// The band's input rows, padding included.
    fn padded_rows(&self, g: &Geometry) -> usize {
        self.columns / self.wp + g.kernel_h - 1
    }

    /// The image row that plane row `r` holds, if it is inside the image (padding otherwise).
    fn image_row(&self, g: &Geometry, r: usize) -> Option<usize> {
        (self.first_row + r).checked_sub(g.padding).filter(|&y| y < g.height)
    }
}

/// The kernel `[C_out, C_in, kh, kw]` as the micro-kernel reads it: for each depth block of
/// planes (see [`depth_blocks`]), row panels of `mr` output channels, each in the walk's order
/// (kernel position, then plane), zero past `C_out`. `word(o, c, t)` is output channel `o`'s
/// value for plane `c` at kernel position `t`.
fn pack_panels<W: Copy + Default + Send>(g: &Geometry, planes: usize, mr: usize, word: impl Fn(usize, usize, usize) -> W + Sync) -> Vec<W> {
    let taps = g.kernel_h * g.kernel_w;
    let padded_rows = g.out_channels.div_ceil(mr) * mr;
    let mut panels = vec![W::default(); padded_rows * taps * planes];
    for (first, len) in depth_blocks(planes, mr) {
        let block = &mut panels[padded_rows * taps * first..padded_rows * taps * (first + len)];
        block.par_chunks_mut(taps * len * mr).enumerate().for_each(|(p, panel)| {
            for i in 0..mr.min(g.out_channels - p * mr) {
                for t in 0..taps {
                    for c in 0..len {
                        panel[(t * len + c) * mr + i] = word(p * mr + i, first + c, t);
                    }
                }
            }
        });
    }
    panels
}

/// An f32 kernel packed for [`forward_image`] on a tile of `mr` rows.
pub(super) fn pack_kernel(g: &Geometry, weight: &[f32], mr: usize) -> Vec<f32> {
    let taps = g.kernel_h * g.kernel_w;
    pack_panels(g, g.in_channels, mr, |o, c, t| weight[(o * g.in_channels + c) * taps + t])
}

/// A bf16 kernel packed for [`forward_image_bf16`] on `isa`: a word holds channels `2q` and
/// `2q + 1` (zero past `C_in`), in the panels of `isa`'s tile or, [`on_tiles`], of AMX's.
pub(super) fn pack_kernel_bf16(isa: Isa, g: &Geometry, weight: &[bf16]) -> Vec<u32> {
    let taps = g.kernel_h * g.kernel_w;
    let at = |o: usize, c: usize, t: usize| if c < g.in_channels { weight[(o * g.in_channels + c) * taps + t].to_bits() as u32 } else { 0 };
    let word = |o: usize, q: usize, t: usize| at(o, 2 * q, t) | at(o, 2 * q + 1, t) << 16;
    if !on_tiles(isa, g) {
        return pack_panels(g, g.in_channels.div_ceil(2), isa.tile().0, word);
    }
    // AMX's panels (see `amx::walk_tiles`): by tap, then by 16 pair steps, then by row.
    let (mr, steps) = (amx::WALK_TILE.0, amx::WALK_STEPS);
    let pairs = g.in_channels / 2;
    let padded_rows = g.out_channels.div_ceil(mr) * mr;
    let mut panels = vec![0u32; padded_rows * taps * pairs];
    for (first, len) in depth_blocks(pairs, mr) {
        let block = &mut panels[padded_rows * taps * first..padded_rows * taps * (first + len)];
        block.par_chunks_mut(taps * len * mr).enumerate().for_each(|(p, panel)| {
            for (index, chunk) in panel.chunks_exact_mut(mr * steps).enumerate() {
                let (t, s) = (index / (len / steps), index % (len / steps));
                for (i, row) in chunk.chunks_exact_mut(steps).enumerate().take(g.out_channels.saturating_sub(p * mr)) {
                    for (q, w) in row.iter_mut().enumerate() {
                        *w = word(p * mr + i, first + s * steps + q, t);
                    }
                }
            }
        });
    }
    panels
}

/// Whether the bf16 forward pass of `g` runs on AMX's tiles ([`amx::walk_tiles`]): `isa` has
/// them and the input's channel pairs fill whole tiles (every depth block is then whole
/// tiles too), as every convolution of SD's UNets and VAEs but the first has.
fn on_tiles(isa: Isa, g: &Geometry) -> bool {
    isa == Isa::Amx && g.in_channels.is_multiple_of(2 * amx::WALK_STEPS) && g.in_channels > 0
}

/// The geometry whose forward pass is `g`'s input gradient when `g` has stride 1 and a
/// square kernel: the output's gradient convolved with the kernel flipped and its channels
/// swapped, padded by `k - 1 - padding`. `None` for other convolutions.
pub(super) fn input_gradient_geometry(g: &Geometry) -> Option<Geometry> {
    let k = g.kernel_w;
    (g.stride == 1 && g.kernel_h == k && g.padding < k).then(|| Geometry {
        batch: g.batch,
        in_channels: g.out_channels,
        height: g.out_height(),
        width: g.out_width(),
        out_channels: g.in_channels,
        kernel_h: k,
        kernel_w: k,
        stride: 1,
        padding: k - 1 - g.padding,
    })
}

/// The kernel (`[C_in, C_out, kh, kw]`) of the convolution [`input_gradient_geometry`] gives,
/// from `g`'s (`[C_out, C_in, kh, kw]`): channels swapped, both kernel axes flipped.
pub(super) fn input_gradient_kernel(g: &Geometry, weight: &[f32]) -> Vec<f32> {
    let taps = g.kernel_h * g.kernel_w;
    let mut kernel = Vec::with_capacity(weight.len());
    for o in 0..g.in_channels {
        for c in 0..g.out_channels {
            // Flipping both axes reverses the flattened position.
            kernel.extend((0..taps).map(|t| weight[(c * g.in_channels + o) * taps + taps - 1 - t]));
        }
    }
    kernel
}

/// One image's output `[C_out, H_out·W_out]` of `image` `[C_in, H, W]` and a kernel packed by
/// [`pack_kernel`] for `isa`'s tile, plus `bias`.
///
/// Panics unless `g` [`fits`] the direct path and the slices match it.
pub(super) fn forward_image(isa: Isa, g: &Geometry, image: &[f32], panels: &[f32], bias: Option<&[f32]>, out: &mut [f32], parallel: bool) {
    let (_, nr) = isa.tile();
    let mut planes = Vec::new();
    for plan in Plan::bands(g, nr, g.in_channels, 4) {
        planes.clear();
        planes.resize(g.in_channels * plan.plane, 0f32);
        fill_planes(g, &plan, image, &mut planes, parallel);
        product(isa, isa.tile(), g, &plan, g.in_channels, &planes, panels, bias, out, parallel, gemm::walk_kernel);
    }
}

/// Copies the band's input rows of `image`'s channels into `planes` (zeroed before), one
/// padded plane each.
fn fill_planes(g: &Geometry, plan: &Plan, image: &[f32], planes: &mut [f32], parallel: bool) {
    fill_plane_rows(g, plan, planes, parallel, |c, y, row| row.copy_from_slice(&image[(c * g.height + y) * g.width..][..g.width]));
}

/// Writes each plane's rows that lie inside the image with `row(plane, image row, its place
/// in the plane)`; the padding stays as it was (zero).
fn fill_plane_rows<W: Send>(g: &Geometry, plan: &Plan, planes: &mut [W], parallel: bool, row: impl Fn(usize, usize, &mut [W]) + Sync) {
    let fill = |(c, plane): (usize, &mut [W])| {
        for r in 0..plan.padded_rows(g) {
            if let Some(y) = plan.image_row(g, r) {
                let start = r * plan.wp + g.padding;
                row(c, y, &mut plane[start..start + g.width]);
            }
        }
    };
    if parallel {
        planes.par_chunks_mut(plan.plane).enumerate().for_each(fill);
    } else {
        planes.chunks_mut(plan.plane).enumerate().for_each(fill);
    }
}

/// `g`'s kernel gradient, `Σ_images grad_output · patchesᵀ`, from the padded planes: for each
/// kernel position `t`, `∂W_t [C_in × C_out] += P_t · Gᵀ`, where `P_t` is the planes read in
/// place from `t`'s offset (rows one plane apart) and `Gᵀ` the output's gradient at the padded
/// row length (zero in the dropped columns), packed once per image for all positions.
/// Images are shared over the threads when there are enough of them, each share summing its
/// own; otherwise the products use every thread.
///
/// In bf16 (mixed precision) the planes are rounded once per image and read in place as pairs
/// along the columns, `Gᵀ` is rounded as it is packed; the sums are f32.
///
/// Panics unless `g` [`fits`] the direct path and the slices match it.
pub(super) fn kernel_gradient(g: &Geometry, input: &[f32], grad_output: &[f32], precision: Precision) -> Vec<f32> {
    let isa = gemm::isa();
    let plan = Plan::new(g, isa.tile().1);
    let (taps, in_channels, out_channels) = (plan.taps.len(), g.in_channels, g.out_channels);
    let (out_w, out_len) = (g.out_width(), g.out_height() * g.out_width());
    let (input_len, output_len, per_tap) = (in_channels * g.height * g.width, out_channels * out_len, in_channels * out_channels);
    assert!(input.len() == g.batch * input_len && grad_output.len() == g.batch * output_len, "conv2d: operand sizes");
    let threads = rayon::current_num_threads();
    let (shares, parallel) = if g.batch >= threads { (threads, false) } else { (1, true) };
    let per_share = g.batch.div_ceil(shares).max(1);
    let partials: Vec<Vec<f32>> = (0..shares)
        .into_par_iter()
        .map(|share| {
            let mut sums = vec![0f32; taps * per_tap];
            // f32 planes, or in bf16 the same planes rounded (read in place as pairs along the
            // columns: a tap's offset may be odd, each plane starts on a pair).
            let (mut planes, mut planes16) = match precision {
                Precision::F32 => (vec![0f32; in_channels * plan.plane], Vec::new()),
                Precision::Bf16 => (Vec::new(), vec![bf16::ZERO; in_channels * plan.plane]),
            };
            let mut grad_rows = vec![0f32; out_channels * plan.columns];
            for b in share * per_share..((share + 1) * per_share).min(g.batch) {
                let image = &input[b * input_len..][..input_len];
                match precision {
                    Precision::F32 => fill_planes(g, &plan, image, &mut planes, parallel),
                    Precision::Bf16 => fill_plane_rows(g, &plan, &mut planes16, parallel, |c, y, row| {
                        let source = &image[(c * g.height + y) * g.width..][..g.width];
                        row.iter_mut().zip(source).for_each(|(d, &s)| *d = bf16::from_bits(gemm_bf16::to_bf16_bits(s)));
                    }),
                }
                let grad = &grad_output[b * output_len..][..output_len];
                for (padded, rows) in grad_rows.chunks_exact_mut(plan.columns).zip(grad.chunks_exact(out_len.max(1))) {
                    for (padded, row) in padded.chunks_exact_mut(plan.wp).zip(rows.chunks_exact(out_w.max(1))) {
                        padded[..out_w].copy_from_slice(row);
                    }
                }
                let grad_t = MatRef::row_major(&grad_rows, out_channels, plan.columns).expect("sized").t();
                match precision {
                    Precision::F32 => {
                        let grad_t = PackedB::with_isa(&grad_t, isa);
                        for (t, &offset) in plan.taps.iter().enumerate() {
                            let rows = MatRef::new(&planes[offset..], in_channels, plan.columns, plan.plane, 1).expect("inside the planes (see Plan)");
                            gemm::gemm_with(isa, &mut sums[t * per_tap..(t + 1) * per_tap], out_channels, ASource::InPlace(rows), &grad_t, Init::Accumulate, parallel);
                        }
                    }
                    Precision::Bf16 => {
                        let grad_t = gemm_bf16::PackedBPairs::new(&gemm_bf16::RoundedB { source: &grad_t, isa }, isa);
                        for (t, &offset) in plan.taps.iter().enumerate() {
                            let rows = gemm_bf16::Bf16Matrix::strided(&planes16[offset..], in_channels, plan.columns, plan.plane).expect("inside the planes (see Plan)");
                            gemm_bf16::gemm_bf16_with(isa, &mut sums[t * per_tap..(t + 1) * per_tap], out_channels, gemm_bf16::ABf16::Weight(rows), &grad_t, Init::Accumulate, parallel);
                        }
                    }
                }
            }
            sums
        })
        .collect();
    let mut grad = vec![0f32; out_channels * in_channels * taps];
    for (o, filter) in grad.chunks_exact_mut(in_channels * taps).enumerate() {
        for (c, positions) in filter.chunks_exact_mut(taps).enumerate() {
            for (t, value) in positions.iter_mut().enumerate() {
                *value = partials.iter().map(|sums| sums[t * per_tap + c * out_channels + o]).sum();
            }
        }
    }
    grad
}

/// [`forward_image`] in bf16: the input rounded into channel-pair planes, a kernel packed by
/// [`pack_kernel_bf16`], f32 sums.
pub(super) fn forward_image_bf16(isa: Isa, g: &Geometry, image: &[f32], panels: &[u32], bias: Option<&[f32]>, out: &mut [f32], parallel: bool) {
    let (kernel_tile, kernel): ((usize, usize), Kernel<u32>) = if on_tiles(isa, g) {
        (amx::WALK_TILE, |_, walk, a, b, tile| amx::walk_tiles(amx::TileUnit::Hardware, walk, a, b, tile))
    } else {
        (isa.tile(), gemm_bf16::walk_kernel)
    };
    let nr = kernel_tile.1;
    let pairs = g.in_channels.div_ceil(2);
    let mut planes = Vec::new();
    for plan in Plan::bands(g, nr, pairs, 4) {
        planes.clear();
        planes.resize(pairs * plan.plane, 0u32);
        fill_plane_rows(g, &plan, &mut planes, parallel, |q, y, words| {
            // Channels 2q and 2q + 1 (zero past the last) at image row y.
            let row_of = |c: usize| &image[(c * g.height + y) * g.width..][..g.width];
            vector::round_pairs(isa, row_of(2 * q), (2 * q + 1 < g.in_channels).then(|| row_of(2 * q + 1)), words);
        });
        product(isa, kernel_tile, g, &plan, pairs, &planes, panels, bias, out, parallel, kernel);
    }
}

/// A micro-kernel of the direct path: `tile = A · B` over a walk of the planes.
type Kernel<W> = fn(Isa, BWalk, &[W], &[W], &mut [f32]);

/// The product of the kernel's panels and the planes (`steps` planes, walked once per kernel
/// position) on `kernel`, whose tile is `kernel_tile` (rows, columns), its valid columns written to
/// `out` with `bias`, shared over the threads by column ranges (or row ranges when there are
/// too few columns).
#[allow(clippy::too_many_arguments)]
fn product<W: Copy + Sync>(
    isa: Isa,
    kernel_tile: (usize, usize),
    g: &Geometry,
    plan: &Plan,
    steps: usize,
    planes: &[W],
    panels: &[W],
    bias: Option<&[f32]>,
    out: &mut [f32],
    parallel: bool,
    kernel: Kernel<W>,
) {
    let (mr, nr) = kernel_tile;
    assert_eq!(plan.nr, nr, "conv2d: planes laid out for another tile");
    let (out_w, out_len) = (g.out_width(), g.out_height() * g.out_width());
    let depth = plan.taps.len() * steps;
    assert!(planes.len() == steps * plan.plane && panels.len() == g.out_channels.div_ceil(mr) * mr * depth && out.len() == g.out_channels * out_len);
    assert!(bias.is_none_or(|b| b.len() == g.out_channels), "conv2d: one bias per output channel");
    if out.is_empty() {
        return;
    }
    if depth == 0 {
        // No input channels: the bias alone.
        for (channel, out) in out.chunks_exact_mut(out_len).enumerate() {
            out.fill(bias.map_or(0.0, |b| b[channel]));
        }
        return;
    }
    let c = COut::new(out, out_len, g.out_channels, out_len);
    let tiles = ColumnTiles::new(plan, out_w, nr);
    let (row_panels, column_panels) = (g.out_channels.div_ceil(mr), tiles.count(plan));
    // Column panels per block, so that the planes' runs they read stay in L2.
    let run_bytes = planes_per_block(mr).min(steps) * g.kernel_h * nr * std::mem::size_of::<W>();
    let block = (BLOCK_BYTES / run_bytes).clamp(1, 32);
    let taps = plan.taps.len();
    let share = |rows: std::ops::Range<usize>, columns: std::ops::Range<usize>| {
        let mut tile = [0f32; 32 * 32];
        for first_column in columns.clone().step_by(block) {
            for (first, len) in depth_blocks(steps, mr) {
                let walk = BWalk { taps: &plan.taps, steps: len, ldb: plan.plane };
                let block_panels = &panels[row_panels * mr * taps * first..];
                for ip in rows.clone() {
                    let a = &block_panels[ip * taps * len * mr..(ip + 1) * taps * len * mr];
                    let height = mr.min(g.out_channels - ip * mr);
                    for jp in first_column..(first_column + block).min(columns.end) {
                        let j = tiles.first_column(plan, jp);
                        kernel(isa, walk, a, &planes[first * plan.plane + j..], &mut tile[..mr * nr]);
                        // The first depth block writes the sums and the bias, later ones add.
                        let first_block = (first == 0).then_some(bias);
                        match tiles {
                            ColumnTiles::ByRow { per_row } => {
                                let (y, x) = (plan.first_row + jp / per_row, jp % per_row * nr);
                                store_run(&c, &tile[..mr * nr], nr, ip * mr, height, y * out_w + x, first_block);
                            }
                            ColumnTiles::Flat => store(&c, &tile[..mr * nr], nr, ip * mr, height, j..j + nr.min(plan.columns - j), plan, out_w, first_block),
                        }
                    }
                }
            }
        }
    };
    let threads = if parallel { rayon::current_num_threads() } else { 1 };
    if threads == 1 {
        share(0..row_panels, 0..column_panels);
    } else if column_panels >= threads {
        let per_share = column_panels.div_ceil(threads);
        (0..threads).into_par_iter().for_each(|t| share(0..row_panels, (t * per_share).min(column_panels)..((t + 1) * per_share).min(column_panels)));
    } else {
        let per_share = row_panels.div_ceil(threads);
        (0..threads).into_par_iter().for_each(|t| share((t * per_share).min(row_panels)..((t + 1) * per_share).min(row_panels), 0..column_panels));
    }
}

/// How the product's columns fall into the micro-kernel's tiles of `nr`.
#[derive(Debug, Clone, Copy, PartialEq)]
enum ColumnTiles {
    /// The output's width is `per_row` tiles: each output row starts a tile, so every column
    /// computed is an output column (none of the dropped ones, one in 17 of a 16×16
    /// image's) and each tile row is one run of the output.
    ByRow { per_row: usize },
    /// Tiles side by side over the padded rows, wherever those rows end (an output narrower
    /// than a tile, or not a whole number of tiles wide); [`store`] drops the padding columns.
    Flat,
}

impl ColumnTiles {
    fn new(plan: &Plan, out_w: usize, nr: usize) -> Self {
        if out_w >= nr && out_w.is_multiple_of(nr) && plan.wp >= out_w {
            ColumnTiles::ByRow { per_row: out_w / nr }
        } else {
            ColumnTiles::Flat
        }
    }

    /// Tiles in the band.
    fn count(&self, plan: &Plan) -> usize {
        match *self {
            ColumnTiles::ByRow { per_row } => plan.columns / plan.wp * per_row,
            ColumnTiles::Flat => plan.columns.div_ceil(plan.nr),
        }
    }

    /// The product column where tile `index` starts.
    fn first_column(&self, plan: &Plan, index: usize) -> usize {
        match *self {
            ColumnTiles::ByRow { per_row } => index / per_row * plan.wp + index % per_row * plan.nr,
            ColumnTiles::Flat => index * plan.nr,
        }
    }
}

/// Writes rows `0..height` of `tile` to output channels `i..i + height`, each to the `nr`
/// output positions from `at`: the first depth block (`first: Some(bias)`) overwrites, later
/// ones add.
fn store_run(c: &COut, tile: &[f32], nr: usize, i: usize, height: usize, at: usize, first: Option<Option<&[f32]>>) {
    for (r, values) in tile.chunks_exact(nr).take(height).enumerate() {
        // SAFETY: the threads write disjoint column ranges of the product (or disjoint rows),
        // hence disjoint output elements (see `COut`).
        let dst = unsafe { c.row(i + r, at, nr) };
        match first {
            Some(bias) => {
                let offset = bias.map_or(0.0, |b| b[i + r]);
                dst.iter_mut().zip(values).for_each(|(d, &t)| *d = t + offset);
            }
            None => dst.iter_mut().zip(values).for_each(|(d, &t)| *d += t),
        }
    }
}

/// Writes rows `0..height` of `tile` (product columns `columns` of `plan`'s band) to output
/// channels `i..i + height`, dropping the columns past the output's width in each padded row: the
/// first depth block (`first: Some(bias)`) overwrites, later ones add.
#[allow(clippy::too_many_arguments)]
fn store(c: &COut, tile: &[f32], nr: usize, i: usize, height: usize, columns: std::ops::Range<usize>, plan: &Plan, out_w: usize, first: Option<Option<&[f32]>>) {
    let wp = plan.wp;
    for (r, tile_row) in tile.chunks_exact(nr).take(height).enumerate() {
        let mut n = columns.start;
        while n < columns.end {
            let (y, x) = (plan.first_row + n / wp, n % wp);
            let row_end = (n - x + wp).min(columns.end);
            if x < out_w {
                let len = (n - x + out_w).min(row_end) - n;
                // SAFETY: the threads write disjoint column ranges of the product (or disjoint
                // rows), hence disjoint output elements (see `COut`).
                let dst = unsafe { c.row(i + r, y * out_w + x, len) };
                let values = &tile_row[n - columns.start..n - columns.start + len];
                match first {
                    Some(bias) => {
                        let offset = bias.map_or(0.0, |b| b[i + r]);
                        dst.iter_mut().zip(values).for_each(|(d, &t)| *d = t + offset);
                    }
                    None => dst.iter_mut().zip(values).for_each(|(d, &t)| *d += t),
                }
            }
            n = row_end;
        }
    }
}
