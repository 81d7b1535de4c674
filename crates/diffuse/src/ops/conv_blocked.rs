//! Stride-1 convolution on channel-blocked input, the layout of oneDNN's AVX2 direct
//! convolution (`jit_avx2_conv_kernel_f32`, NCHW8c): a band of input rows is copied once into
//! blocks of 8 channels, `[C_in/8][rows][W + 2·padding][8]`, so that the 8 channels of one
//! position lie together. The micro-kernel ([`x86::kernel_avx2`]) keeps 3 output positions × 32
//! output channels in registers; for each kernel position and input channel it broadcasts the
//! 3 positions' input values and multiplies them by 32 output channels' weights, loaded as 4
//! vectors. A block's weights (kernel positions × 8 input channels × 32 output channels, 9 KiB
//! at 3×3) stay in L1 while the kernel walks a chunk of output positions, and each position's
//! input is a short run per kernel row, so that little streams from L2 at the pace of the
//! multiply-adds. `ops::conv_direct` broadcasts weights instead and reads 16 positions of 64
//! planes per tile from L2: on Zen 2 it runs the VAE's convolutions at 72–85 % of the FMA
//! peak, this path at 85–95 %.
//!
//! A chunk of output positions (in row-major order, across rows) is summed into a buffer
//! (`[positions][32]`, started from the bias), a block of input channels at a time, and
//! transposed into the NCHW output when complete.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::conv::Geometry;
use super::gemm::{fresh_output, COut, Isa};

/// Input channels per block: the 8 values of one position the kernel broadcasts in turn.
const CHANNELS: usize = 8;
/// Output channels per kernel call: 4 AVX2 vectors.
const OUT_CHANNELS: usize = 32;
/// Output positions per kernel call (with 4 vectors of channels, 12 of AVX2's 16 registers
/// hold the sums, 3 the broadcasts, 1 a vector of weights).
const POSITIONS: usize = 3;
/// Blocks of input channels per kernel call: their weights (18 KiB at 3×3) still stay in L1,
/// and each call loads and stores its 3 × 32 sums half as often as with one.
const BLOCKS_PER_CALL: usize = 2;
/// Output positions per pass over a group's weights (32 KiB of sums): a 16×16 image's 256 in
/// one pass. (63 measured the same on larger images.)
const CHUNK: usize = 86 * POSITIONS;
/// Bytes of blocked input per band of output rows, so that a large image (the VAE's last
/// blocks) adds little to the peak memory. (Tiny in the unit tests: several bands.)
const BAND_BYTES: usize = if cfg!(test) { 4 << 10 } else { 16 << 20 };

/// Whether the blocked path suits `g` on `isa`: it [`runs`] it, over runs of 64 positions or
/// more (an image of 8×8, or several small images walked as one run: a training batch's 128
/// channels at 4×4 run 1.15× faster than on the packed path, Zen 2), and either large images
/// or a kernel that stays in cache: every chunk of [`CHUNK`] positions reads all of its
/// group's weights, so that small images with a large kernel wait on memory (SD 1.5's 1,280
/// channels at 16×16, 59 MB of kernel: 1.3× slower than the packed path; 640 at 32×32, 15 MB:
/// even; 320 at 64×64 and the VAE's 128–512 channels at 64×64 to 512×512: 1.03–1.2× faster on
/// Zen 2; a training batch's 64–256 channels at 8×8 to 32×32: even to 1.1× faster).
pub(super) fn suits(g: &Geometry, isa: Isa) -> bool {
    let kernel_bytes = g.out_channels * g.in_channels * g.kernel_h * g.kernel_w * 4;
    let positions = g.out_height() * g.out_width();
    let chunk_positions = positions * images_per_item(g, rayon::current_num_threads());
    runs(g, isa) && chunk_positions >= 64 && (positions >= 64 * 64 || kernel_bytes <= 4 << 20)
}

/// Images whose positions one work item of [`forward`] or [`kernel_gradient`] walks as one
/// run, their blocked copies one after another in each block: small images (4×4, 8×8), so
/// that a chunk of positions spans several and reads its weights once for all of them. At
/// least one item per thread.
fn images_per_item(g: &Geometry, threads: usize) -> usize {
    let positions = g.out_height() * g.out_width();
    if positions == 0 || 2 * positions > CHUNK || g.batch < threads {
        return 1;
    }
    (CHUNK / positions).min(g.batch.div_ceil(threads.max(1))).max(1)
}

/// Whether the blocked path can run `g` on `isa`: [`runs_any_kernel`], with a kernel wider
/// than 1×1 (a 1×1 convolution is a plain GEMM).
pub(super) fn runs(g: &Geometry, isa: Isa) -> bool {
    g.kernel_w > 1 && runs_any_kernel(g, isa)
}

/// Whether the blocked kernels can take `g` on `isa`: AVX2 (the only kernel so far) on a CPU
/// that has it, stride 1, a kernel that fits the padded image, enough input channels to fill
/// a block, and output channels that fill at least three quarters of their groups of 32 (a
/// model's last convolution, to 1 channel, would compute 32).
fn runs_any_kernel(g: &Geometry, isa: Isa) -> bool {
    let channels_fill_groups = g.out_channels * 4 >= g.out_channels.div_ceil(OUT_CHANNELS) * OUT_CHANNELS * 3;
    isa == Isa::Avx2 && isa.is_supported() && g.stride == 1 && g.in_channels >= CHANNELS && channels_fill_groups && g.kernel_w <= g.width + 2 * g.padding && g.kernel_h <= g.height + 2 * g.padding
}

/// The kernel `[C_out, C_in, kh, kw]` as the micro-kernel reads it: for each group of 32 output
/// channels and block of 8 input channels, `[kernel position][input channel][output channel]`,
/// zero past `C_out` and `C_in`.
pub(super) fn pack_kernel(g: &Geometry, weight: &[f32]) -> Vec<f32> {
    let taps = g.kernel_h * g.kernel_w;
    assert_eq!(weight.len(), g.out_channels * g.in_channels * taps, "conv2d: kernel size");
    pack_kernel_with(g, |o, c, t| weight[(o * g.in_channels + c) * taps + t])
}

/// [`pack_kernel`] for the input gradient of `g` (stride 1, square kernel): the forward
/// convolution of `conv_direct::input_gradient_geometry(g)` whose kernel has `weight`'s
/// channels swapped and both axes flipped, packed straight from `weight`.
pub(super) fn pack_input_gradient_kernel(g: &Geometry, weight: &[f32]) -> Vec<f32> {
    let transposed = super::conv_direct::input_gradient_geometry(g).expect("conv2d: a stride-1 square kernel");
    let taps = g.kernel_h * g.kernel_w;
    assert_eq!(weight.len(), g.out_channels * g.in_channels * taps, "conv2d: kernel size");
    pack_kernel_with(&transposed, |c, o, t| weight[(o * g.in_channels + c) * taps + taps - 1 - t])
}

/// [`pack_kernel`]'s layout of the kernel whose value for output channel `o`, input channel
/// `c` and kernel position `t` (row-major) is `value(o, c, t)`.
fn pack_kernel_with(g: &Geometry, value: impl Fn(usize, usize, usize) -> f32 + Sync) -> Vec<f32> {
    let taps = g.kernel_h * g.kernel_w;
    let blocks = g.in_channels.div_ceil(CHANNELS);
    let block_len = taps * CHANNELS * OUT_CHANNELS;
    let mut packed = vec![0f32; g.out_channels.div_ceil(OUT_CHANNELS) * blocks * block_len];
    packed.par_chunks_mut(blocks * block_len).enumerate().for_each(|(group, packed)| {
        for o in 0..OUT_CHANNELS.min(g.out_channels - group * OUT_CHANNELS) {
            for c in 0..g.in_channels {
                let block = &mut packed[c / CHANNELS * block_len..][..block_len];
                for t in 0..taps {
                    block[(t * CHANNELS + c % CHANNELS) * OUT_CHANNELS + o] = value(group * OUT_CHANNELS + o, c, t);
                }
            }
        }
    });
    packed
}

/// `output[N, C_out, H_out, W_out]` of `input[N, C_in, H, W]` and a kernel packed by
/// [`pack_kernel`], plus `bias`. Images are shared over the threads when there are enough of
/// them; otherwise each image's groups of output channels and ranges of positions are.
///
/// Panics unless the path [`runs`] `g` on `isa` and the slices match it.
pub(super) fn forward(isa: Isa, g: &Geometry, input: &[f32], packed: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
    assert!(runs(g, isa), "conv2d: the blocked path does not run {g:?}");
    let (in_len, out_len) = (g.in_channels * g.height * g.width, g.out_channels * g.out_height() * g.out_width());
    assert!(input.len() == g.batch * in_len && bias.is_none_or(|b| b.len() == g.out_channels), "conv2d: operand sizes");
    assert_eq!(packed.len(), g.out_channels.div_ceil(OUT_CHANNELS) * g.in_channels.div_ceil(CHANNELS) * g.kernel_h * g.kernel_w * CHANNELS * OUT_CHANNELS);
    if out_len == 0 {
        return vec![0f32; g.batch * out_len];
    }
    let write = |output: &mut [MaybeUninit<f32>]| {
        // One blocked copy per thread, its padding zeroed once.
        let per_item = images_per_item(g, rayon::current_num_threads());
        if per_item > 1 {
            output.par_chunks_mut(per_item * out_len).zip(input.par_chunks(per_item * in_len)).for_each_init(Vec::new, |blocked, (out, images)| forward_images(isa, g, images, packed, bias, out, blocked));
        } else if g.batch >= rayon::current_num_threads() {
            output.par_chunks_mut(out_len).zip(input.par_chunks(in_len.max(1))).for_each_init(Vec::new, |blocked, (out, image)| forward_image(isa, g, image, packed, bias, out, blocked, false));
        } else {
            let mut blocked = Vec::new();
            for (out, image) in output.chunks_mut(out_len).zip(input.chunks(in_len.max(1))) {
                forward_image(isa, g, image, packed, bias, out, &mut blocked, true);
            }
        }
    };
    // SAFETY: every image's output is written in full: each band's positions, in chunks, for
    // every group of output channels (`forward_image`, `forward_images`).
    unsafe { fresh_output(g.batch * out_len, write) }
}

/// One image's output `[C_out, H_out·W_out]`, a band of output rows at a time, through
/// `blocked` (empty, or left by an image of the same geometry: its padding is still zero).
#[allow(clippy::too_many_arguments)]
fn forward_image(isa: Isa, g: &Geometry, image: &[f32], packed: &[f32], bias: Option<&[f32]>, out: &mut [MaybeUninit<f32>], blocked: &mut Vec<f32>, parallel: bool) {
    let (out_h, out_w) = (g.out_height(), g.out_width());
    let blocks = g.in_channels.div_ceil(CHANNELS);
    // A row's left padding, its values and its right padding.
    let row_len = (g.width + 2 * g.padding) * CHANNELS;
    let band_rows = (BAND_BYTES / (blocks * row_len * 4)).saturating_sub(g.kernel_h).clamp(1, out_h);
    let input_rows = band_rows + g.kernel_h - 1;
    // Zeroed once: the padding columns and the channels past `C_in` are never written.
    blocked.resize(blocks * input_rows * row_len, 0.0);
    let taps: Vec<usize> = (0..g.kernel_h).flat_map(|ky| (0..g.kernel_w).map(move |kx| ky * row_len + kx * CHANNELS)).collect();
    let c = COut::fresh(out, out_h * out_w, g.out_channels, out_h * out_w);
    let groups = g.out_channels.div_ceil(OUT_CHANNELS);
    for first_row in (0..out_h).step_by(band_rows) {
        let rows = band_rows.min(out_h - first_row);
        fill_band(isa, g, image, first_row, rows + g.kernel_h - 1, blocked, parallel);
        // Work items: a group of output channels over a share of the band's positions; enough
        // of them for every thread when one image has the threads to itself (four per thread,
        // so that a number of groups that is not a multiple of the threads leaves little idle).
        let positions = rows * out_w;
        let threads = if parallel { rayon::current_num_threads() } else { 1 };
        let shares = if threads > 1 { (4 * threads).div_ceil(groups).clamp(1, positions.div_ceil(CHUNK)) } else { 1 };
        let per_share = positions.div_ceil(shares).next_multiple_of(POSITIONS);
        let item = |index: usize| {
            let (group, share) = (index / shares, index % shares);
            let block_weights = taps.len() * CHANNELS * OUT_CHANNELS;
            let weights = &packed[group * blocks * block_weights..][..blocks * block_weights];
            let channels = group * OUT_CHANNELS..(group * OUT_CHANNELS + OUT_CHANNELS).min(g.out_channels);
            let (mut sums, mut starts) = (vec![0f32; CHUNK * OUT_CHANNELS], vec![0usize; CHUNK]);
            let share = share * per_share..((share + 1) * per_share).min(positions);
            // Chunks of equal length (a last chunk of a few positions would read all the
            // weights again for them).
            let chunk = share.len().div_ceil(share.len().div_ceil(CHUNK).max(1)).next_multiple_of(POSITIONS);
            for first in share.clone().step_by(chunk) {
                let len = chunk.min(share.end - first);
                let sums = &mut sums[..len.next_multiple_of(POSITIONS) * OUT_CHANNELS];
                for position in sums.chunks_exact_mut(OUT_CHANNELS) {
                    match bias {
                        Some(bias) => position[..channels.len()].copy_from_slice(&bias[channels.clone()]),
                        None => position.fill(0.0),
                    }
                }
                // Where each position's patch starts in a block (positions past the chunk's
                // end repeat its last: summed, never written out).
                let (mut y, mut x) = (first / out_w, first % out_w);
                for (i, start) in starts.iter_mut().enumerate() {
                    *start = y * row_len + x * CHANNELS;
                    if i + 1 < len {
                        x += 1;
                        if x == out_w {
                            (y, x) = (y + 1, 0);
                        }
                    }
                }
                let calls = len.div_ceil(POSITIONS) * POSITIONS;
                let block_len = input_rows * row_len;
                for (index, weights) in weights.chunks(BLOCKS_PER_CALL * block_weights).enumerate() {
                    let first_block = index * BLOCKS_PER_CALL;
                    let blocks = weights.len() / block_weights;
                    let input = &blocked[first_block * block_len..][..blocks * block_len];
                    block_product(isa, &taps, input, block_len, &starts[..calls], weights, sums);
                }
                // The sums, transposed into the output's rows.
                let at = first_row * out_w + first;
                for first_channel in channels.clone().step_by(CHANNELS) {
                    // SAFETY: items write disjoint (channel group, position range) parts of
                    // the output.
                    let mut rows: Vec<&mut [MaybeUninit<f32>]> = (first_channel..(first_channel + CHANNELS).min(channels.end)).map(|channel| unsafe { c.row_uninit(channel, at, len) }).collect();
                    write_transposed(isa, &sums[first_channel - channels.start..], OUT_CHANNELS, &mut rows);
                }
            }
        };
        if threads > 1 {
            (0..groups * shares).into_par_iter().for_each(item);
        } else {
            (0..groups * shares).for_each(item);
        }
    }
}

/// Several small images' outputs (`images.len() / in_len` of them, each `[C_out, H_out·W_out]`
/// in `out`) on this thread: their blocked copies lie one after another in each block of
/// `blocked`, so that a chunk's positions run on from one image into the next.
fn forward_images(isa: Isa, g: &Geometry, images: &[f32], packed: &[f32], bias: Option<&[f32]>, out: &mut [MaybeUninit<f32>], blocked: &mut Vec<f32>) {
    let (out_w, positions) = (g.out_width(), g.out_height() * g.out_width());
    let count = out.len() / (g.out_channels * positions);
    let blocks = g.in_channels.div_ceil(CHANNELS);
    let row_len = (g.width + 2 * g.padding) * CHANNELS;
    let image_len = (g.height + 2 * g.padding) * row_len;
    let block_len = count * image_len;
    fill_images(isa, g, images, count, blocked);
    let taps: Vec<usize> = (0..g.kernel_h).flat_map(|ky| (0..g.kernel_w).map(move |kx| ky * row_len + kx * CHANNELS)).collect();
    let block_weights = taps.len() * CHANNELS * OUT_CHANNELS;
    // The items' images are `C_out` rows of the output apiece.
    let c = COut::fresh(out, positions, count * g.out_channels, positions);
    let (mut sums, mut starts) = (vec![0f32; CHUNK * OUT_CHANNELS], vec![0usize; CHUNK]);
    let total = count * positions;
    // Chunks of equal length, as in `forward_image`.
    let chunk = total.div_ceil(total.div_ceil(CHUNK)).next_multiple_of(POSITIONS);
    for group in 0..g.out_channels.div_ceil(OUT_CHANNELS) {
        let weights = &packed[group * blocks * block_weights..][..blocks * block_weights];
        let channels = group * OUT_CHANNELS..(group * OUT_CHANNELS + OUT_CHANNELS).min(g.out_channels);
        for first in (0..total).step_by(chunk) {
            let len = chunk.min(total - first);
            let sums = &mut sums[..len.next_multiple_of(POSITIONS) * OUT_CHANNELS];
            for position in sums.chunks_exact_mut(OUT_CHANNELS) {
                match bias {
                    Some(bias) => position[..channels.len()].copy_from_slice(&bias[channels.clone()]),
                    None => position.fill(0.0),
                }
            }
            // Positions past the chunk's end repeat its last: summed, never written out.
            for (i, start) in starts.iter_mut().enumerate() {
                let p = first + i.min(len - 1);
                let (image, at) = (p / positions, p % positions);
                *start = image * image_len + at / out_w * row_len + at % out_w * CHANNELS;
            }
            let calls = len.div_ceil(POSITIONS) * POSITIONS;
            for (index, weights) in weights.chunks(BLOCKS_PER_CALL * block_weights).enumerate() {
                let input = &blocked[index * BLOCKS_PER_CALL * block_len..][..weights.len() / block_weights * block_len];
                block_product(isa, &taps, input, block_len, &starts[..calls], weights, sums);
            }
            // The sums, transposed into each image's rows.
            let mut p = first;
            while p < first + len {
                let (image, at) = (p / positions, p % positions);
                let run = (positions - at).min(first + len - p);
                for first_channel in channels.clone().step_by(CHANNELS) {
                    let row = image * g.out_channels;
                    // SAFETY: this thread holds the whole of `out`, and the rows are distinct.
                    let mut rows: Vec<&mut [MaybeUninit<f32>]> = (first_channel..(first_channel + CHANNELS).min(channels.end)).map(|channel| unsafe { c.row_uninit(row + channel, at, run) }).collect();
                    write_transposed(isa, &sums[(p - first) * OUT_CHANNELS + first_channel - channels.start..], OUT_CHANNELS, &mut rows);
                }
                p += run;
            }
        }
    }
}

/// `count` whole images (`images`) into `blocked`, their padded copies one after another in
/// each block of 8 channels: `[C_in/8][count][H + 2·padding][W + 2·padding][8]`.
fn fill_images(isa: Isa, g: &Geometry, images: &[f32], count: usize, blocked: &mut Vec<f32>) {
    let row_len = (g.width + 2 * g.padding) * CHANNELS;
    let image_len = (g.height + 2 * g.padding) * row_len;
    let block_len = count * image_len;
    let len = g.in_channels.div_ceil(CHANNELS) * block_len;
    // Zeroed when made for this many images: the padding columns and the channels past
    // `C_in` are never written.
    if blocked.len() != len {
        blocked.clear();
        blocked.resize(len, 0.0);
    }
    let in_len = g.in_channels * g.height * g.width;
    for (i, image) in images.chunks_exact(in_len).take(count).enumerate() {
        for (block, blocked) in blocked.chunks_exact_mut(block_len).enumerate() {
            for (r, row) in blocked[i * image_len..][..image_len].chunks_exact_mut(row_len).enumerate() {
                fill_row(isa, g, image, block, r, row);
            }
        }
    }
}

/// Output positions per pass of the kernel gradient's micro-kernel: the output gradient's
/// chunk (`[positions][32]`, 24 KiB) stays in L1 while every input channel and kernel
/// position passes over it.
const GRADIENT_CHUNK: usize = 192;

/// The kernel gradient copies a whole image at a time into blocks: images up to this size
/// (a training batch's: 128 channels at 32×32 are 0.6 MB).
const GRADIENT_IMAGE_BYTES: usize = 16 << 20;

/// Whether the blocked path suits `g`'s kernel gradient: [`runs_any_kernel`] (1×1 kernels
/// too), an image's blocked copy is at most [`GRADIENT_IMAGE_BYTES`], and its runs of
/// positions (an image, or several small ones: [`images_per_item`]) are 64 or more. (On Zen
/// 2, a training batch's 64–256 channels at 8×8 to 32×32 run 1.1–1.6× faster than on the
/// planes of `conv_direct::kernel_gradient` or the packed path; at 4×4, about as fast as the
/// packed path; 1×1 kernels at 4×4 and 8×8, 1.04–1.9× faster than the packed path.)
pub(super) fn suits_kernel_gradient(g: &Geometry, isa: Isa) -> bool {
    let blocked_bytes = g.in_channels.div_ceil(CHANNELS) * CHANNELS * (g.height + 2 * g.padding) * (g.width + 2 * g.padding) * 4;
    runs_any_kernel(g, isa) && g.out_height() * g.out_width() * images_per_item(g, rayon::current_num_threads()) >= 64 && blocked_bytes <= GRADIENT_IMAGE_BYTES
}

/// `g`'s kernel gradient, `∂W[o][c][t] = Σ_images Σ_positions ∂out[o][position] ·
/// input[c][position + t]`, summed in [`pack_kernel`]'s layout: a call of
/// [`x86::gradient_avx2`] holds 3 (kernel position, input channel) pairs × 32 output channels
/// and runs over a chunk of positions, broadcasting the 3 input values and loading the output
/// gradient's 32 channels (transposed to `[position][32]` once per chunk). Images are shared
/// over the threads when there are enough of them, each share summing its own; otherwise the
/// groups of output channels are.
///
/// Panics unless the path suits `g` on `isa` ([`suits_kernel_gradient`]) and the slices match it.
pub(super) fn kernel_gradient(isa: Isa, g: &Geometry, input: &[f32], grad_output: &[f32]) -> Vec<f32> {
    assert!(suits_kernel_gradient(g, isa), "conv2d: the blocked kernel gradient does not run {g:?}");
    let (in_len, out_len) = (g.in_channels * g.height * g.width, g.out_channels * g.out_height() * g.out_width());
    assert!(input.len() == g.batch * in_len && grad_output.len() == g.batch * out_len, "conv2d: operand sizes");
    let taps = g.kernel_h * g.kernel_w;
    let (groups, blocks) = (g.out_channels.div_ceil(OUT_CHANNELS), g.in_channels.div_ceil(CHANNELS));
    let group_len = blocks * taps * CHANNELS * OUT_CHANNELS;
    let threads = rayon::current_num_threads();
    let sums = if g.batch >= threads {
        let per_share = g.batch.div_ceil(threads);
        let per_item = images_per_item(g, threads);
        let partials: Vec<Vec<f32>> = (0..threads)
            .into_par_iter()
            .map(|share| {
                let mut sums = vec![0f32; groups * group_len];
                let mut blocked = Vec::new();
                let images = share * per_share..((share + 1) * per_share).min(g.batch);
                for b in images.clone().step_by(per_item) {
                    let count = per_item.min(images.end - b);
                    fill_images(isa, g, &input[b * in_len..][..count * in_len], count, &mut blocked);
                    for (group, sums) in sums.chunks_exact_mut(group_len).enumerate() {
                        gradient_group(isa, g, &blocked, &grad_output[b * out_len..][..count * out_len], count, group, sums);
                    }
                }
                sums
            })
            .collect();
        let mut sums = vec![0f32; groups * group_len];
        for partial in &partials {
            sums.iter_mut().zip(partial).for_each(|(s, p)| *s += p);
        }
        sums
    } else {
        let mut sums = vec![0f32; groups * group_len];
        let mut blocked = Vec::new();
        for b in 0..g.batch {
            fill_band(isa, g, &input[b * in_len..][..in_len], 0, g.height + 2 * g.padding, blocked_for(g, &mut blocked), true);
            let grad = &grad_output[b * out_len..][..out_len];
            sums.par_chunks_mut(group_len).enumerate().for_each(|(group, sums)| gradient_group(isa, g, &blocked, grad, 1, group, sums));
        }
        sums
    };
    // From the packed layout to `[C_out, C_in, kh, kw]`.
    let mut grad = vec![0f32; g.out_channels * g.in_channels * taps];
    let block_len = taps * CHANNELS * OUT_CHANNELS;
    for (o, filters) in grad.chunks_exact_mut((g.in_channels * taps).max(1)).enumerate() {
        let group = &sums[o / OUT_CHANNELS * group_len..][..group_len];
        for (c, filter) in filters.chunks_exact_mut(taps).enumerate() {
            let block = &group[c / CHANNELS * block_len..][..block_len];
            for (t, value) in filter.iter_mut().enumerate() {
                *value = block[(t * CHANNELS + c % CHANNELS) * OUT_CHANNELS + o % OUT_CHANNELS];
            }
        }
    }
    grad
}

/// `blocked` sized for one image of `g` as a single band (zeroed when first made: the padding
/// is never written).
fn blocked_for<'b>(g: &Geometry, blocked: &'b mut Vec<f32>) -> &'b mut [f32] {
    blocked.resize(g.in_channels.div_ceil(CHANNELS) * (g.height + 2 * g.padding) * (g.width + 2 * g.padding) * CHANNELS, 0.0);
    blocked
}

/// Adds `count` images' share of the kernel gradient for group `group` of output channels
/// into `sums` (the group's part of [`pack_kernel`]'s layout), from their blocked input (one
/// band each, one after another in each block, as [`fill_images`] lays them) and their output
/// gradients (`grad`, one after another).
#[allow(clippy::too_many_arguments)]
fn gradient_group(isa: Isa, g: &Geometry, blocked: &[f32], grad: &[f32], count: usize, group: usize, sums: &mut [f32]) {
    let (out_w, positions) = (g.out_width(), g.out_height() * g.out_width());
    let row_len = (g.width + 2 * g.padding) * CHANNELS;
    let image_len = (g.height + 2 * g.padding) * row_len;
    let blocks = g.in_channels.div_ceil(CHANNELS);
    let block_input = blocked.len() / blocks;
    assert!(block_input >= count * image_len && grad.len() == count * g.out_channels * positions, "conv2d: blocked gradient operands");
    // The (kernel position, channel) pairs of a block in the packed order, 3 per call; a last
    // call short of pairs repeats one and sums it into `spare`.
    let pairs: Vec<usize> = (0..g.kernel_h).flat_map(|ky| (0..g.kernel_w).flat_map(move |kx| (0..CHANNELS).map(move |c| ky * row_len + kx * CHANNELS + c))).collect();
    let channels = group * OUT_CHANNELS..(group * OUT_CHANNELS + OUT_CHANNELS).min(g.out_channels);
    let total = count * positions;
    // Chunks of equal length.
    let chunk = total.div_ceil(total.div_ceil(GRADIENT_CHUNK));
    // Zero past the last output channel (never written).
    let mut transposed = vec![0f32; chunk * OUT_CHANNELS];
    let mut starts = vec![0usize; chunk];
    for first in (0..total).step_by(chunk) {
        let len = chunk.min(total - first);
        // The chunk's output gradient, transposed image by image.
        let mut p = first;
        while p < first + len {
            let (image, at) = (p / positions, p % positions);
            let run = (positions - at).min(first + len - p);
            let grad = &grad[image * g.out_channels * positions..];
            for v in (channels.start..channels.end).step_by(CHANNELS) {
                let filled = (channels.end - v).min(CHANNELS);
                let sources: [&[f32]; CHANNELS] = std::array::from_fn(|j| &grad[(v + j.min(filled - 1)) * positions + at..][..run]);
                read_transposed(isa, &sources[..filled], &mut transposed[(p - first) * OUT_CHANNELS + v - channels.start..], OUT_CHANNELS);
            }
            p += run;
        }
        for (i, start) in starts[..len].iter_mut().enumerate() {
            let (image, at) = ((first + i) / positions, (first + i) % positions);
            *start = image * image_len + at / out_w * row_len + at % out_w * CHANNELS;
        }
        let (starts, grad) = (Starts::new(&starts[..len]), &transposed[..len * OUT_CHANNELS]);
        for (block, sums) in sums.chunks_exact_mut(pairs.len() * OUT_CHANNELS).enumerate() {
            let input = &blocked[block * block_input..][..block_input];
            for (sums, pairs) in sums.chunks_mut(POSITIONS * OUT_CHANNELS).zip(pairs.chunks(POSITIONS)) {
                if let Ok(offsets) = pairs.try_into() {
                    gradient_call(isa, input, &starts, offsets, grad, sums);
                } else {
                    let mut spare = [0f32; POSITIONS * OUT_CHANNELS];
                    let offsets = std::array::from_fn(|j| pairs[j.min(pairs.len() - 1)]);
                    gradient_call(isa, input, &starts, offsets, grad, &mut spare);
                    sums.iter_mut().zip(spare).for_each(|(s, v)| *s += v);
                }
            }
        }
    }
}

/// Where a chunk's positions start in a block of blocked input, and the largest of them
/// (found once per chunk, not per call).
struct Starts<'s> {
    starts: &'s [usize],
    last: usize,
}

impl<'s> Starts<'s> {
    fn new(starts: &'s [usize]) -> Self {
        Self { starts, last: starts.iter().max().copied().unwrap_or(0) }
    }
}

/// `sums[j][32] += Σ_positions input[starts[position] + offsets[j]] · grad[position][32]`.
fn gradient_call(isa: Isa, input: &[f32], starts: &Starts, offsets: [usize; POSITIONS], grad: &[f32], sums: &mut [f32]) {
    let last = starts.last + offsets.iter().max().copied().unwrap_or(0);
    let starts = starts.starts;
    assert!(input.len() > last && grad.len() == starts.len() * OUT_CHANNELS && sums.len() == POSITIONS * OUT_CHANNELS, "conv2d: blocked gradient operands");
    match isa {
        // SAFETY: `runs` admits only AVX2 on a CPU that has it; the assertion covers every
        // write (3 × 32 sums) and every read: 32 gradient values per start, and input values
        // up to `last` (`Starts::new` found the largest start).
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::gradient_avx2(input.as_ptr(), starts, offsets, grad.as_ptr(), sums.as_mut_ptr()) },
        _ => unreachable!("the blocked path runs on AVX2 only (`runs`)"),
    }
}

/// Copies input rows `first_row - padding ..` (`rows` of them, zero outside the image) of
/// every channel into `blocked`'s blocks of 8 channels.
fn fill_band(isa: Isa, g: &Geometry, image: &[f32], first_row: usize, rows: usize, blocked: &mut [f32], parallel: bool) {
    let row_len = (g.width + 2 * g.padding) * CHANNELS;
    let block_len = blocked.len() / g.in_channels.div_ceil(CHANNELS);
    let fill = |(block, blocked): (usize, &mut [f32])| {
        for r in 0..rows {
            fill_row(isa, g, image, block, first_row + r, &mut blocked[r * row_len..(r + 1) * row_len]);
        }
    };
    if parallel {
        blocked.par_chunks_mut(block_len).enumerate().for_each(fill);
    } else {
        blocked.chunks_mut(block_len).enumerate().for_each(fill);
    }
}

/// Row `padded_row` of the padded image (zero outside the image), block `block` of its
/// channels, into `row` (`(W + 2·padding) · 8` values; the padding columns are left as they are).
fn fill_row(isa: Isa, g: &Geometry, image: &[f32], block: usize, padded_row: usize, row: &mut [f32]) {
    let Some(y) = padded_row.checked_sub(g.padding).filter(|&y| y < g.height) else {
        row.fill(0.0);
        return;
    };
    let inside = &mut row[g.padding * CHANNELS..(g.padding + g.width) * CHANNELS];
    let channels = (g.in_channels - block * CHANNELS).min(CHANNELS);
    let sources: [&[f32]; CHANNELS] = std::array::from_fn(|i| {
        let c = block * CHANNELS + i.min(channels - 1);
        &image[(c * g.height + y) * g.width..][..g.width]
    });
    read_transposed(isa, &sources[..channels], inside, CHANNELS);
}

/// `rows[j][i] = values[i·stride + j]`: up to 8 columns of a row-major matrix (`rows.len()`
/// of them, from `values`' start) into rows, 8 × 8 blocks through registers.
fn write_transposed(isa: Isa, values: &[f32], stride: usize, rows: &mut [&mut [MaybeUninit<f32>]]) {
    let len = rows.first().map_or(0, |row| row.len());
    assert!(rows.len() <= CHANNELS && rows.iter().all(|row| row.len() == len) && (len == 0 || values.len() >= (len - 1) * stride + rows.len()));
    let whole = if rows.len() == CHANNELS && isa == Isa::Avx2 { len / 8 * 8 } else { 0 };
    for i in (0..whole).step_by(8) {
        let dst: [*mut f32; 8] = std::array::from_fn(|j| rows[j][i..].as_mut_ptr().cast());
        // SAFETY: AVX2 is this CPU's (`isa`, see `kernel`); 8 rows of `values` from
        // `i·stride` hold 8 values each and every destination 8 from `i` (the assertion, and
        // `i + 8 <= len`); the rows are distinct slices.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            x86::transpose8(std::array::from_fn(|k| values[(i + k) * stride..][..8].as_ptr()), dst)
        };
    }
    for (j, row) in rows.iter_mut().enumerate() {
        for (i, value) in row.iter_mut().enumerate().skip(whole) {
            value.write(values[i * stride + j]);
        }
    }
}

/// `dst[i·stride + j] = sources[j][i]` for every source (at most 8, all as long) and index:
/// rows of channels into positions of 8 channels `stride` apart (lanes past the sources'
/// count keep their value), 8 × 8 blocks through registers.
fn read_transposed(isa: Isa, sources: &[&[f32]], dst: &mut [f32], stride: usize) {
    let len = sources.first().map_or(0, |s| s.len());
    assert!(sources.len() <= CHANNELS && sources.iter().all(|s| s.len() == len) && stride >= CHANNELS && (len == 0 || dst.len() >= (len - 1) * stride + CHANNELS));
    let whole = if sources.len() == CHANNELS && isa == Isa::Avx2 { len / 8 * 8 } else { 0 };
    for i in (0..whole).step_by(8) {
        let dst = dst[i * stride..].as_mut_ptr();
        // SAFETY: AVX2 is this CPU's; every source holds 8 values from `i`, and `dst` 8 from
        // each of `(i + k)·stride`, k < 8 (the assertion, and `i + 8 <= len`), runs that do
        // not overlap (`stride >= 8`).
        #[cfg(target_arch = "x86_64")]
        unsafe {
            x86::transpose8(std::array::from_fn(|j| sources[j][i..].as_ptr()), std::array::from_fn(|k| dst.add(k * stride)))
        };
    }
    for i in whole..len {
        for (j, source) in sources.iter().enumerate() {
            dst[i * stride + j] = source[i];
        }
    }
}

/// `sums[position][32] += Σ_blocks Σ_taps Σ_channels input · weights` for a few blocks of
/// input channels (`weights.len()` says how many; `block_len` values apart in `input`) and
/// every position of a chunk, 3 per kernel call: position `i`'s patch from `input[starts[i]..]`
/// in each block, `weights` the blocks' packed panels one after the other.
fn block_product(isa: Isa, taps: &[usize], input: &[f32], block_len: usize, starts: &[usize], weights: &[f32], sums: &mut [f32]) {
    let block_weights = taps.len() * CHANNELS * OUT_CHANNELS;
    let blocks = weights.len() / block_weights.max(1);
    let last = taps.iter().max().copied().unwrap_or(0) + starts.iter().max().copied().unwrap_or(0);
    assert!(
        blocks >= 1
            && weights.len() == blocks * block_weights
            && input.len() >= (blocks - 1) * block_len + last + CHANNELS
            && sums.len() == starts.len() * OUT_CHANNELS
            && starts.len().is_multiple_of(POSITIONS),
        "conv2d: blocked kernel operands"
    );
    for (sums, starts) in sums.chunks_exact_mut(POSITIONS * OUT_CHANNELS).zip(starts.chunks_exact(POSITIONS)) {
        match isa {
            // SAFETY: `runs` admits only AVX2, chosen because this CPU has it (`gemm::isa`);
            // the assertion covers every read (each position's 8 channels at each tap, the
            // block's weights) and write (3 positions' 32 sums).
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { x86::kernel_avx2(taps, std::array::from_fn(|j| input.as_ptr().add(starts[j])), block_len, blocks, weights.as_ptr(), sums.as_mut_ptr()) },
            _ => unreachable!("the blocked path runs on AVX2 only (`runs`)"),
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{CHANNELS, OUT_CHANNELS, POSITIONS};
    use std::arch::x86_64::*;

    /// The step both kernels repeat, 12 multiply-adds: `acc[j][v] += b[j] · w[8v..8v + 8]` for
    /// 3 broadcasts and 4 vectors loaded from `w`. (A macro, so that it compiles inside each
    /// kernel's target features.)
    macro_rules! multiply_add {
        ($acc:ident, $b:expr, $w:expr) => {
            let b: [__m256; POSITIONS] = $b;
            for v in 0..4 {
                let wv = _mm256_loadu_ps($w.add(v * 8));
                for j in 0..POSITIONS {
                    $acc[j][v] = _mm256_fmadd_ps(b[j], wv, $acc[j][v]);
                }
            }
        };
    }

    /// The AVX2 + FMA micro-kernel: 3 positions × 4 vectors of 8 output channels, summed over
    /// `blocks` blocks (`block_len` values apart), their taps and 8 channels, and added to
    /// `sums`.
    ///
    /// # Safety
    /// The CPU supports AVX2 and FMA; each of `inputs` holds `(blocks - 1) · block_len +
    /// max(taps) + 8` values, `weights` the blocks' `blocks · taps · 8 · 32`, and `sums` 3 · 32
    /// writable values.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::needless_range_loop)]
    pub unsafe fn kernel_avx2(taps: &[usize], inputs: [*const f32; POSITIONS], block_len: usize, blocks: usize, weights: *const f32, sums: *mut f32) {
        let mut acc = [[_mm256_setzero_ps(); 4]; POSITIONS];
        for (j, acc) in acc.iter_mut().enumerate() {
            for (v, acc) in acc.iter_mut().enumerate() {
                *acc = _mm256_loadu_ps(sums.add(j * OUT_CHANNELS + v * 8));
            }
        }
        let mut w = weights;
        // A loop over the channels that LLVM cannot unroll: unrolled, it hoists the loads and
        // spills the sums to the stack (10 % slower than the path this one replaces).
        let channels = std::hint::black_box(CHANNELS);
        for block in 0..blocks {
            for &tap in taps {
                let [x0, x1, x2] = inputs.map(|x| x.add(block * block_len + tap));
                for i in 0..channels {
                    multiply_add!(acc, [x0, x1, x2].map(|x| _mm256_broadcast_ss(&*x.add(i))), w);
                    w = w.add(OUT_CHANNELS);
                }
            }
        }
        for (j, acc) in acc.iter().enumerate() {
            for (v, &acc) in acc.iter().enumerate() {
                _mm256_storeu_ps(sums.add(j * OUT_CHANNELS + v * 8), acc);
            }
        }
    }

    /// An 8 × 8 transpose: `dst[j][i] = src[i][j]`.
    ///
    /// # Safety
    /// The CPU supports AVX2; every `src` pointer has 8 readable values and every `dst` 8
    /// writable ones that nothing else references.
    #[target_feature(enable = "avx2")]
    pub unsafe fn transpose8(src: [*const f32; 8], dst: [*mut f32; 8]) {
        let r = src.map(|p| _mm256_loadu_ps(p));
        // Pairs of rows interleaved, then pairs of pairs, then the 128-bit halves.
        let t = [
            _mm256_unpacklo_ps(r[0], r[1]),
            _mm256_unpackhi_ps(r[0], r[1]),
            _mm256_unpacklo_ps(r[2], r[3]),
            _mm256_unpackhi_ps(r[2], r[3]),
            _mm256_unpacklo_ps(r[4], r[5]),
            _mm256_unpackhi_ps(r[4], r[5]),
            _mm256_unpacklo_ps(r[6], r[7]),
            _mm256_unpackhi_ps(r[6], r[7]),
        ];
        let s = [
            _mm256_shuffle_ps::<0x44>(t[0], t[2]),
            _mm256_shuffle_ps::<0xEE>(t[0], t[2]),
            _mm256_shuffle_ps::<0x44>(t[1], t[3]),
            _mm256_shuffle_ps::<0xEE>(t[1], t[3]),
            _mm256_shuffle_ps::<0x44>(t[4], t[6]),
            _mm256_shuffle_ps::<0xEE>(t[4], t[6]),
            _mm256_shuffle_ps::<0x44>(t[5], t[7]),
            _mm256_shuffle_ps::<0xEE>(t[5], t[7]),
        ];
        for j in 0..4 {
            _mm256_storeu_ps(dst[j], _mm256_permute2f128_ps::<0x20>(s[j], s[j + 4]));
            _mm256_storeu_ps(dst[j + 4], _mm256_permute2f128_ps::<0x31>(s[j], s[j + 4]));
        }
    }

    /// The AVX2 + FMA kernel-gradient micro-kernel: 3 (kernel position, channel) pairs × 4
    /// vectors of 8 output channels, summed over the positions and added to `sums`.
    ///
    /// # Safety
    /// The CPU supports AVX2 and FMA; `input` holds `max(starts) + max(offsets) + 1` values,
    /// `grad` `starts.len() · 32`, and `sums` 3 · 32 writable values.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::needless_range_loop)]
    pub unsafe fn gradient_avx2(input: *const f32, starts: &[usize], offsets: [usize; POSITIONS], grad: *const f32, sums: *mut f32) {
        let mut acc = [[_mm256_setzero_ps(); 4]; POSITIONS];
        let [o0, o1, o2] = offsets.map(|o| input.add(o));
        let mut g = grad;
        for &start in starts {
            multiply_add!(acc, [o0, o1, o2].map(|x| _mm256_broadcast_ss(&*x.add(start))), g);
            g = g.add(OUT_CHANNELS);
        }
        for (j, acc) in acc.iter().enumerate() {
            for (v, &acc) in acc.iter().enumerate() {
                let at = sums.add(j * OUT_CHANNELS + v * 8);
                _mm256_storeu_ps(at, _mm256_add_ps(_mm256_loadu_ps(at), acc));
            }
        }
    }
}
