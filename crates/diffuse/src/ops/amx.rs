//! bf16 matrix products on AMX tiles (Intel Xeon since Sapphire Rapids): `tdpbf16ps` adds a
//! 16 × 32 bf16 tile times a 32 × 16 one into 16 × 16 f32 sums, 16,384 operations per
//! instruction, where AVX512-BF16's `vdpbf16ps` does 64.
//!
//! The level [`Isa::Amx`] runs [`gemm_bf16`](super::gemm_bf16)'s products here and everything
//! else as [`Isa::Avx512Bf16`]. `B` comes in the pair panels of that level (32 columns, a word
//! `(x[k], x[k + 1])` per column and pair step), which are AMX's `B` layout already: a tile is
//! 16 pair rows of 16 words, read from a panel with a stride of 32 words. `A` is copied into
//! row-major pair rows (AMX's `A` layout), 32 rows at a time, or read where it lies when it is
//! bf16 already and its depth is whole tiles. Each call keeps a 32 × 32 block of `C` in four
//! tiles (`tmm0`–`tmm3`), two tiles of `A` and two of `B` (`tmm4`–`tmm7`). The direct
//! convolution has its own walk here ([`walk_tiles`]): `B` read in place from its channel-pair
//! planes, 16 planes a tile.
//!
//! On the one AMX machine measured (BENCHMARKS.md, session 20) a tile load costs about as much
//! as a tile product and does not overlap it, so the products are bounded by their loads: the
//! 2 × 2 block of `C` is the one that loads least per product with eight tiles.
//!
//! The instructions are used through `asm!` (Rust has no stable AMX intrinsics). Linux hands a
//! process the 8 KiB tile state only when asked (`arch_prctl(ARCH_REQ_XCOMP_PERM)`); if it
//! refuses, or the tile kernel disagrees with [`tiles_emulated`] (its definition, in Rust) on
//! a first product, the level is not offered and one line says why. The driver's packing and
//! blocking are tested on every machine with the emulated tiles.

use std::sync::OnceLock;

use super::gemm::{self, BWalk, COut, Init, Isa};
// Depth blocks of `KC` values, as `gemm_bf16`'s: a `B` packed at load is stored in them.
use super::gemm_bf16::{widen, ABf16, PackBPairs, KC};
use half::bf16;

/// Columns of a `B` panel: the pair panels of [`Isa::Avx512Bf16`] (`Isa::tile`).
const NR: usize = 32;
/// Rows of `A` per call: two tiles of 16.
const MR: usize = 32;
/// Pair steps per tile (32 bf16 values of depth).
const PAIRS_PER_TILE: usize = 16;
/// Rows of `A` per block: 256 rows × 256 pair steps = 256 KiB of packed `A`.
const MC: usize = 256;
/// Columns of `B` per block.
const NC: usize = 1024;

/// Who runs the tile instructions: the CPU, or their definition in Rust (tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TileUnit {
    Hardware,
    Emulated,
}

/// Whether this process can use AMX's bf16 tiles: the CPU has AMX-TILE, AMX-BF16 and
/// AVX512-BF16, Linux granted the tile state, and the tile kernel gives its definition's sums.
/// Decided once; a CPU with AMX that cannot use it says why on stderr.
pub(crate) fn usable() -> bool {
    static USABLE: OnceLock<bool> = OnceLock::new();
    *USABLE.get_or_init(|| {
        if !cpu_has_amx_bf16() || !Isa::Avx512Bf16.is_supported() {
            return false;
        }
        if let Err(why) = request_tile_state() {
            eprintln!("AMX: Linux did not grant this process the tile state ({why}); using avx512bf16");
            return false;
        }
        if !self_check() {
            eprintln!("AMX: the tile kernel's sums differ from their definition on this CPU; using avx512bf16");
            return false;
        }
        true
    })
}

/// CPUID leaf 7: AMX-BF16 (EDX bit 22) and AMX-TILE (EDX bit 24).
fn cpu_has_amx_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: `cpuid` exists on every x86-64 CPU; leaf 7 is answered (with zeros where a
        // CPU lacks it) on all of them that have AVX-512, which `usable` also requires.
        #[allow(unused_unsafe)]
        let leaf = unsafe { std::arch::x86_64::__cpuid_count(7, 0) };
        leaf.edx & (1 << 22) != 0 && leaf.edx & (1 << 24) != 0
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Asks Linux for the tile data state (`XFEATURE_XTILEDATA`) for this process.
fn request_tile_state() -> Result<(), String> {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: `arch_prctl(ARCH_REQ_XCOMP_PERM, feature)` takes two integers and changes
        // only which extended states the process may use.
        let status = unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) };
        if status == 0 {
            Ok(())
        } else {
            Err(format!("arch_prctl(ARCH_REQ_XCOMP_PERM): {}", std::io::Error::last_os_error()))
        }
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    Err("only asked for on Linux".into())
}

/// A pair word of varied, exactly representable values for checking the tiles (`i` picks it).
fn sample_word(i: usize) -> u32 {
    let even = bf16::from_f32(((i * 37 % 101) as f32 - 50.0) / 64.0).to_bits() as u32;
    let odd = bf16::from_f32(((i * 53 % 97) as f32 - 48.0) / 32.0).to_bits() as u32;
    even | odd << 16
}

/// A first product on the tiles against [`tiles_emulated`]: a wrong operand order or layout
/// would show here rather than in an image.
fn self_check() -> bool {
    let pairs = 2 * PAIRS_PER_TILE;
    let word = sample_word;
    let a: Vec<u32> = (0..MR * pairs).map(word).collect();
    let b: Vec<u32> = (0..pairs * NR).map(|i| word(i + 7919)).collect();
    let (mut hardware, mut emulated) = ([f32::NAN; MR * NR], [0f32; MR * NR]);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `usable`, the only caller, checked the CPU and the OS's grant first; `a` is 32
    // rows of `pairs` words, `b` `pairs` rows of 32, `hardware` 32 × 32 values.
    unsafe {
        x86::tiles(a.as_ptr(), pairs, pairs, b.as_ptr(), hardware.as_mut_ptr())
    };
    tiles(TileUnit::Emulated, ARows::Words(&a, pairs), pairs, &b, &mut emulated);
    hardware.iter().zip(&emulated).all(|(h, e)| (h - e).abs() <= 1e-4 * (1.0 + e.abs()))
}

/// 32 rows of `A` for [`tiles`], `lda` pair words apart: copied pair words, or a bf16 matrix's
/// values read where they lie (two per word).
#[derive(Clone, Copy)]
enum ARows<'a> {
    Words(&'a [u32], usize),
    Values(&'a [bf16], usize),
}

impl ARows<'_> {
    /// The row stride in words, if 32 rows of `pairs` words from the start lie inside.
    fn stride_if_holds(&self, pairs: usize) -> Option<usize> {
        let (len, lda) = match *self {
            ARows::Words(words, lda) => (words.len(), lda),
            ARows::Values(values, lda) => (values.len() / 2, lda),
        };
        (pairs <= lda && (MR - 1) * lda + pairs <= len).then_some(lda)
    }

    /// Word `p` of row `i`.
    fn word(&self, i: usize, p: usize) -> u32 {
        match *self {
            ARows::Words(words, lda) => words[i * lda + p],
            ARows::Values(values, lda) => values[2 * (i * lda + p)].to_bits() as u32 | (values[2 * (i * lda + p) + 1].to_bits() as u32) << 16,
        }
    }
}

/// `c[32 × 32] = a · b`: `a` is 32 rows of `pairs` words, `b` `pairs` rows of 32 words (a
/// panel), `pairs` a positive multiple of 16.
fn tiles(unit: TileUnit, a: ARows, pairs: usize, b: &[u32], c: &mut [f32; MR * NR]) {
    let lda = a.stride_if_holds(pairs).filter(|_| pairs > 0 && pairs.is_multiple_of(PAIRS_PER_TILE) && b.len() >= pairs * NR).expect("amx: tile operands");
    match unit {
        TileUnit::Emulated => tiles_emulated(a, pairs, b, c),
        #[cfg(target_arch = "x86_64")]
        TileUnit::Hardware => {
            assert!(usable(), "amx: the tiles run only where they are usable");
            let a_words = match a {
                ARows::Words(words, _) => words.as_ptr(),
                // Tile loads have no alignment requirement: words at any even value.
                ARows::Values(values, _) => values.as_ptr().cast::<u32>(),
            };
            // SAFETY: the CPU has AMX-TILE and AMX-BF16 and the OS granted the tile state
            // (`usable`); the checks on `lda` keep every tile load inside `a` and `b`, and `c`
            // is the 32 × 32 values the four stores write.
            unsafe { x86::tiles(a_words, lda, pairs, b.as_ptr(), c.as_mut_ptr()) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        TileUnit::Hardware => unreachable!("amx: no tiles off x86-64"),
    }
}

/// What [`x86::tiles`] computes, by `tdpbf16ps`'s definition (Intel's pseudocode): for each
/// pair step in order, the even product and then the odd one added to the f32 sum.
fn tiles_emulated(a: ARows, pairs: usize, b: &[u32], c: &mut [f32; MR * NR]) {
    for (i, row) in c.chunks_exact_mut(NR).enumerate() {
        for (j, sum) in row.iter_mut().enumerate() {
            *sum = 0.0;
            for p in 0..pairs {
                let ((a_even, a_odd), (b_even, b_odd)) = (widen(a.word(i, p)), widen(b[p * NR + j]));
                *sum += a_even * b_even;
                *sum += a_odd * b_odd;
            }
        }
    }
}

/// Rows and columns of [`walk_tiles`]'s block.
pub(crate) const WALK_TILE: (usize, usize) = (MR, NR);

/// Pair steps of a walk's `A` block per tile: [`walk_tiles`] needs its walks' steps to be a
/// multiple of this.
pub(crate) const WALK_STEPS: usize = PAIRS_PER_TILE;

/// `tile[32 × 32] = A · B` for the direct convolution (`conv_direct`): `B` read in place from
/// channel-pair planes as `walk` says (pair step `p` of tap `t` is the row of 32 words at
/// `b[taps[t] + p·ldb]`), `A` packed by tap, then by 16 pair steps, then by row: word
/// `(row i, tap t, step 16s + q)` at `a[((t · steps/16 + s) · 32 + i) · 16 + q]`, two tiles of
/// 16 rows each. `walk.steps` must be a positive multiple of [`WALK_STEPS`].
pub(crate) fn walk_tiles(unit: TileUnit, walk: BWalk, a: &[u32], b: &[u32], tile: &mut [f32]) {
    let chunks = walk.steps / PAIRS_PER_TILE;
    assert!(walk.steps > 0 && walk.steps.is_multiple_of(PAIRS_PER_TILE), "amx: a walk of whole tiles");
    assert!(a.len() >= walk.depth() * MR && b.len() >= walk.extent(NR) && tile.len() >= MR * NR, "amx: walk operands");
    match unit {
        TileUnit::Emulated => {
            tile[..MR * NR].fill(0.0);
            for (t, &offset) in walk.taps.iter().enumerate() {
                for s in 0..chunks {
                    let a_chunk = &a[(t * chunks + s) * MR * PAIRS_PER_TILE..][..MR * PAIRS_PER_TILE];
                    for (i, row) in tile[..MR * NR].chunks_exact_mut(NR).enumerate() {
                        for q in 0..PAIRS_PER_TILE {
                            let a_word = widen(a_chunk[i * PAIRS_PER_TILE + q]);
                            let b_row = &b[offset + (s * PAIRS_PER_TILE + q) * walk.ldb..][..NR];
                            for (sum, &b_word) in row.iter_mut().zip(b_row) {
                                let b_word = widen(b_word);
                                *sum += a_word.0 * b_word.0;
                                *sum += a_word.1 * b_word.1;
                            }
                        }
                    }
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        TileUnit::Hardware => {
            assert!(usable(), "amx: the tiles run only where they are usable");
            // SAFETY: the CPU has the tiles and the OS granted them (`usable`); the assertions
            // above keep every tile load inside `a` (depth · 32 words) and `b` (the walk's
            // extent for 32 columns), and `tile` holds the 32 × 32 values stored.
            unsafe { x86::walk(walk.taps, chunks, walk.ldb, a.as_ptr(), b.as_ptr(), tile.as_mut_ptr()) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        TileUnit::Hardware => unreachable!("amx: no tiles off x86-64"),
    }
}

/// The bf16 product into `c` (this thread's part: `c.rows` rows from row `m0` of `A`, columns
/// from column `n_first` of `B`), as `gemm_bf16`'s per-thread block does it with its
/// micro-kernels: `init` as there (its bias already offset), `A` rounded with `rounding`'s
/// vector instructions.
#[allow(clippy::too_many_arguments)]
pub(crate) fn block(unit: TileUnit, rounding: Isa, c: COut, m0: usize, n_first: usize, a: ABf16, b: &impl PackBPairs, init: Init) {
    let (_, k) = a.dims();
    let (rows, n) = (c.rows, c.cols);
    if rows == 0 || n == 0 {
        return;
    }
    if k == 0 {
        gemm::store_empty_product(&c, init);
        return;
    }
    let max_pairs = KC.min(k).div_ceil(2).next_multiple_of(PAIRS_PER_TILE);
    let mut a_rows = vec![0u32; MC.min(rows).next_multiple_of(MR) * max_pairs];
    let mut b_buffer = vec![0u32; KC.min(k).div_ceil(2) * NC.min(n).div_ceil(NR) * NR];
    let mut b_padded = Vec::new();
    let mut scratch = Vec::new();
    let mut tile = [0f32; MR * NR];
    for n0 in (0..n).step_by(NC) {
        let nc = NC.min(n - n0);
        for k0 in (0..k).step_by(KC) {
            let kc = KC.min(k - k0);
            let pairs = kc.div_ceil(2);
            let padded = pairs.next_multiple_of(PAIRS_PER_TILE);
            let panels = b.panels(k0, kc, n_first + n0, nc, NR, &mut b_buffer, &mut scratch);
            // A depth that is not whole tiles: the panels again with zero pair rows after
            // their own (the tiles read whole tiles).
            let panels = if padded == pairs {
                panels
            } else {
                b_padded.clear();
                b_padded.resize(nc.div_ceil(NR) * padded * NR, 0);
                for (from, to) in panels.chunks_exact(pairs * NR).zip(b_padded.chunks_exact_mut(padded * NR)) {
                    to[..pairs * NR].copy_from_slice(from);
                }
                &b_padded[..]
            };
            for i0 in (0..rows).step_by(MC) {
                let mc = MC.min(rows - i0);
                let block_rows = mc.next_multiple_of(MR);
                // A bf16 `A` of whole tiles is read where it lies when its data holds the
                // block's rows up to a multiple of 32 (rows past `mc` give sums never stored;
                // attention pads its keys and values so); otherwise it is copied.
                let in_place = match a {
                    ABf16::Weight(w) if padded == pairs => w.pair_rows(m0 + i0, k0, block_rows, pairs),
                    _ => None,
                };
                if in_place.is_none() {
                    pack_rows(rounding, &a, k0, kc, m0 + i0, mc, padded, &mut a_rows[..block_rows * padded]);
                }
                for (jp, panel) in panels.chunks_exact(padded * NR).enumerate() {
                    let j = n0 + jp * NR;
                    let width = NR.min(n - j);
                    for ip in 0..block_rows / MR {
                        let i = i0 + ip * MR;
                        let a_panel = match in_place {
                            Some((values, lda)) => ARows::Values(&values[2 * ip * MR * lda..], lda),
                            None => ARows::Words(&a_rows[ip * MR * padded..(ip + 1) * MR * padded], padded),
                        };
                        tiles(unit, a_panel, padded, panel, &mut tile);
                        gemm::store_tile(&c, i, j, MR.min(rows - i), width, &tile, NR, init, k0 == 0);
                    }
                }
            }
        }
    }
}

/// Rows `m0..m0 + mc` of `A`, depth `k0..k0 + kc`, as rows of `pairs` words (pair steps past
/// the depth and rows past `mc`, up to a multiple of 32, zero).
#[allow(clippy::too_many_arguments)]
fn pack_rows(rounding: Isa, a: &ABf16, k0: usize, kc: usize, m0: usize, mc: usize, pairs: usize, out: &mut [u32]) {
    let used = kc.div_ceil(2);
    for (r, row) in out.chunks_exact_mut(pairs).enumerate() {
        let (words, rest) = row.split_at_mut(used);
        rest.fill(0);
        if r >= mc {
            words.fill(0);
            continue;
        }
        a.row_pairs_into(rounding, m0 + r, k0, kc, words);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::asm;
    use std::cell::Cell;

    /// The tile configuration (palette 1): `tmm0`–`tmm7` all 16 rows of 64 bytes (16 f32 sums,
    /// or 16 pair words).
    #[repr(C, align(64))]
    struct TileConfig([u8; 64]);

    static CONFIG: TileConfig = {
        let mut bytes = [0u8; 64];
        bytes[0] = 1; // palette 1
        let mut t = 0;
        while t < 8 {
            // Bytes per row (u16, little-endian) at 16 + 2t, rows at 48 + t.
            bytes[16 + 2 * t] = 64;
            bytes[48 + t] = 16;
            t += 1;
        }
        TileConfig(bytes)
    };

    thread_local! {
        /// Whether this thread loaded [`CONFIG`]: loaded once per thread (`ldtilecfg` costs
        /// about as much as a few tile products) and never released, so nothing else on the
        /// thread can leave another configuration behind.
        static CONFIGURED: Cell<bool> = const { Cell::new(false) };
    }

    /// Loads [`CONFIG`] on this thread unless it did already.
    ///
    /// # Safety
    /// As [`tiles`]'s CPU and OS conditions.
    unsafe fn configure() {
        if !CONFIGURED.get() {
            // The grant is the process's (Linux), asked for again on each thread all the same,
            // as some AMX users found needed; it succeeds where it did once.
            let _ = super::request_tile_state();
            // SAFETY: `CONFIG` is a valid palette-1 configuration, 64 bytes, aligned; the
            // caller's contract grants the instruction.
            unsafe { asm!("ldtilecfg [{config}]", config = in(reg) &CONFIG as *const TileConfig, options(nostack, readonly)) };
            CONFIGURED.set(true);
        }
    }

    /// `c[32 × 32] = a · b` on the tiles (see [`super::tiles`]).
    ///
    /// # Safety
    /// The CPU has AMX-TILE and AMX-BF16 and the OS granted the process the tile state; `a`
    /// has 32 rows of `pairs` words, `lda` words apart, `b` `pairs` rows of 32 words, `pairs`
    /// is a positive multiple of 16, and `c` has 32 × 32 writable values.
    pub unsafe fn tiles(a: *const u32, lda: usize, pairs: usize, b: *const u32, c: *mut f32) {
        // SAFETY: the caller's contract.
        unsafe { configure() };
        // SAFETY: per step, `tmm4`/`tmm5` load rows 0–15 and 16–31 of `a` (16 words each, rows
        // `lda` words apart) at the step's 16 pair columns, `tmm6`/`tmm7` load the step's 16
        // pair rows of `b` (128 bytes apart), columns 0–15 and 16–31; the steps cover `pairs`
        // exactly, so every read lies in `a` and `b`. The four stores write the 32 × 32 `c`
        // (rows 128 bytes apart): `tmm0` at (0, 0), `tmm1` (0, 16), `tmm2` (16, 0), `tmm3`
        // (16, 16). Rust code uses no tile registers, so nothing else is clobbered.
        unsafe {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                "2:",
                "tileloadd tmm4, [{a0} + {lda} * 1]",
                "tileloadd tmm5, [{a1} + {lda} * 1]",
                "tileloadd tmm6, [{b} + {row128} * 1]",
                "tileloadd tmm7, [{b} + {row128} * 1 + 64]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                "add {a0}, 64",
                "add {a1}, 64",
                "add {b}, 2048",
                "dec {steps}",
                "jnz 2b",
                "tilestored [{c} + {row128} * 1], tmm0",
                "tilestored [{c} + {row128} * 1 + 64], tmm1",
                "tilestored [{c} + {row128} * 1 + 2048], tmm2",
                "tilestored [{c} + {row128} * 1 + 2112], tmm3",
                a0 = inout(reg) a => _,
                a1 = inout(reg) a.add(16 * lda) => _,
                b = inout(reg) b => _,
                steps = inout(reg) pairs / 16 => _,
                lda = in(reg) lda * 4,
                row128 = in(reg) 128usize,
                c = in(reg) c,
                options(nostack),
            );
        }
    }

    /// [`super::walk_tiles`] on the tiles: `chunks` tile steps per tap, `B`'s pair rows `ldb`
    /// words apart.
    ///
    /// # Safety
    /// As [`tiles`]'s CPU and OS conditions; `a` holds `taps.len() · chunks · 32 · 16` words,
    /// `b` every word the walk reads (32 from `taps[t] + p · ldb` for each tap `t` and pair
    /// step `p < 16 · chunks`), and `c` has 32 × 32 writable values.
    pub unsafe fn walk(taps: &[usize], chunks: usize, ldb: usize, a: *const u32, b: *const u32, c: *mut f32) {
        // SAFETY: the caller's contract.
        unsafe { configure() };
        // SAFETY: tile registers hold the sums from here to the store below: compiled Rust
        // code never uses them, and the OS keeps them (XSAVE state) across interruptions.
        unsafe { asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem)) };
        let mut a = a;
        for &offset in taps {
            // SAFETY: per step, `tmm4`/`tmm5` load rows 0–15 and 16–31 of the step's 32 × 16
            // words of `a` (64 bytes apart), `tmm6`/`tmm7` the step's 16 pair rows of `b`
            // (`ldb` words apart) at columns 0–15 and 16–31; the caller's contract covers
            // every one of them.
            unsafe {
                asm!(
                    "2:",
                    "tileloadd tmm4, [{a} + {row64} * 1]",
                    "tileloadd tmm5, [{a} + {row64} * 1 + 1024]",
                    "tileloadd tmm6, [{b} + {ldb} * 1]",
                    "tileloadd tmm7, [{b} + {ldb} * 1 + 64]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    "add {a}, 2048",
                    "add {b}, {ldb16}",
                    "dec {steps}",
                    "jnz 2b",
                    a = inout(reg) a,
                    b = inout(reg) b.add(offset) => _,
                    steps = inout(reg) chunks => _,
                    ldb = in(reg) ldb * 4,
                    ldb16 = in(reg) ldb * 64,
                    row64 = in(reg) 64usize,
                    options(nostack, readonly),
                );
            }
        }
        // SAFETY: the four stores write the 32 × 32 `c` (rows 128 bytes apart), as in `tiles`.
        unsafe {
            asm!(
                "tilestored [{c} + {row128} * 1], tmm0",
                "tilestored [{c} + {row128} * 1 + 64], tmm1",
                "tilestored [{c} + {row128} * 1 + 2048], tmm2",
                "tilestored [{c} + {row128} * 1 + 2112], tmm3",
                c = in(reg) c,
                row128 = in(reg) 128usize,
                options(nostack),
            );
        }
    }

    /// The peak of `tdpbf16ps` on this thread: `iterations` rounds of 4 tile products
    /// (16 × 16 sums over 32 products each) on tiles loaded once.
    ///
    /// # Safety
    /// As [`tiles`]'s CPU and OS conditions.
    pub unsafe fn peak_rounds(iterations: usize) {
        let zeros = [0u32; 16 * 32];
        // SAFETY: the caller's contract.
        unsafe { configure() };
        // SAFETY: the loads read 16 rows of 64 bytes, 128 bytes apart, from `zeros` (2 KiB);
        // nothing is stored.
        unsafe {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                "tileloadd tmm4, [{z} + {row128} * 1]",
                "tileloadd tmm5, [{z} + {row128} * 1]",
                "tileloadd tmm6, [{z} + {row128} * 1]",
                "tileloadd tmm7, [{z} + {row128} * 1]",
                "test {n}, {n}",
                "jz 3f",
                "2:",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                "dec {n}",
                "jnz 2b",
                "3:",
                z = in(reg) zeros.as_ptr(),
                row128 = in(reg) 128usize,
                n = inout(reg) iterations => _,
                options(nostack, readonly),
            );
        }
    }
}

/// The peak bf16 GFLOP/s of AMX's `tdpbf16ps` on all rayon threads, or `None` where the tiles
/// are not [`usable`].
pub fn peak_gflops(iterations: usize) -> Option<f64> {
    if !usable() {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        use rayon::prelude::*;
        let threads = rayon::current_num_threads();
        let start = std::time::Instant::now();
        (0..threads).into_par_iter().for_each(|_| {
            // SAFETY: `usable` checked the CPU and the OS's grant.
            unsafe { x86::peak_rounds(iterations) }
        });
        let seconds = start.elapsed().as_secs_f64();
        // Each round: 4 instructions × 16 × 16 sums × 32 products × 2 operations.
        Some((threads * iterations * 4 * 16 * 16 * 32 * 2) as f64 / seconds / 1e9)
    }
    #[cfg(not(target_arch = "x86_64"))]
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gemm::tests::values;
    use crate::ops::gemm::MatRef;
    use crate::ops::gemm_bf16::{Bf16Matrix, PackedBPairs, RoundedB, TransposedWeight};
    use half::bf16;

    /// The tile driver (packing, depth and row padding, blocks, partial tiles, bias and
    /// accumulation) on the emulated tiles against an f64 product of the rounded operands, on
    /// every machine; where the CPU has usable tiles, the hardware too.
    #[test]
    fn tile_driver_matches_f64_reference() {
        let rounding = Isa::all_supported().into_iter().filter(|&isa| isa <= Isa::Avx512Bf16).max().unwrap_or(Isa::Portable);
        let units: Vec<TileUnit> = if usable() { vec![TileUnit::Emulated, TileUnit::Hardware] } else { vec![TileUnit::Emulated] };
        for unit in units {
            for &(m, k, n) in &[(1, 1, 1), (3, 0, 4), (33, 31, 33), (32, 32, 32), (70, 600, 40), (257, 64, 65), (5, 1030, 1100), (40, 2 * KC + 33, 20)] {
                let round = |v: &[f32]| -> Vec<bf16> { v.iter().map(|&x| bf16::from_f32(x)).collect() };
                let (a32, b32) = (values(m * k, 3), values(k * n, 4));
                let (a16, b16) = (round(&a32), round(&b32));
                let w16: Vec<bf16> = (0..n * k).map(|jp| b16[jp % k * n + jp / k]).collect();
                let reference = |i: usize, j: usize| (0..k).map(|p| a16[i * k + p].to_f64() * b16[p * n + j].to_f64()).sum::<f64>();
                let bias: Vec<f32> = (0..m.max(n)).map(|i| i as f32 * 0.25).collect();
                let a_view = MatRef::row_major(&a32, m, k).unwrap();
                let b_view = MatRef::row_major(&b32, k, n).unwrap();
                let w = TransposedWeight(Bf16Matrix::new(&w16, n, k).unwrap());
                let packed = PackedBPairs::new(&w, Isa::Avx512Bf16);
                let ldc = n + 2;
                for case in 0..4 {
                    let mut c = vec![if case == 3 { 1.0 } else { f32::NAN }; m.max(1) * ldc];
                    let (init, added): (Init, &dyn Fn(usize, usize) -> f64) = match case {
                        0 => (Init::RowBias(&bias), &|i, _| bias[i] as f64),
                        1 => (Init::ColumnBias(&bias), &|_, j| bias[j] as f64),
                        2 => (Init::Overwrite, &|_, _| 0.0),
                        _ => (Init::Accumulate, &|_, _| 1.0),
                    };
                    let out = COut::new(&mut c, ldc, m, n);
                    match case {
                        0 => block(unit, rounding, out, 0, 0, ABf16::F32(a_view), &RoundedB { source: &b_view, isa: rounding }, init),
                        1 => block(unit, rounding, out, 0, 0, ABf16::Weight(Bf16Matrix::new(&a16, m, k).unwrap()), &packed, init),
                        2 => block(unit, rounding, out, 0, 0, ABf16::F32(a_view), &w, init),
                        _ => block(unit, rounding, out, 0, 0, ABf16::F32(MatRef::row_major(&a32, m, k).unwrap()), &packed, init),
                    }
                    for i in 0..m {
                        for j in 0..n {
                            let (got, want) = (c[i * ldc + j] as f64, reference(i, j) + added(i, j));
                            assert!((got - want).abs() <= 1e-4 * (1.0 + k as f64).sqrt(), "{unit:?} case {case} {m}x{k}x{n} ({i},{j}): {got} vs {want}");
                        }
                    }
                }
            }
        }
    }

    /// The direct convolution's walk: several taps at odd offsets, pair rows a plane apart,
    /// against an f64 sum of the same words, on the emulated tiles and, where usable, the
    /// hardware.
    #[test]
    fn walk_matches_f64_reference() {
        let word = sample_word;
        for (taps, steps, ldb) in [(vec![0usize], 16usize, 40usize), (vec![0, 1, 2, 45, 46, 47, 90, 91, 92], 48, 131)] {
            let walk = BWalk { taps: &taps, steps, ldb };
            let a: Vec<u32> = (0..walk.depth() * MR).map(word).collect();
            let b: Vec<u32> = (0..walk.extent(NR)).map(|i| word(i + 7919)).collect();
            let chunks = steps / PAIRS_PER_TILE;
            let reference = |i: usize, j: usize| -> f64 {
                let mut sum = 0.0;
                for (t, &offset) in taps.iter().enumerate() {
                    for p in 0..steps {
                        let (s, q) = (p / PAIRS_PER_TILE, p % PAIRS_PER_TILE);
                        let (a0, a1) = widen(a[((t * chunks + s) * MR + i) * PAIRS_PER_TILE + q]);
                        let (b0, b1) = widen(b[offset + p * ldb + j]);
                        sum += a0 as f64 * b0 as f64 + a1 as f64 * b1 as f64;
                    }
                }
                sum
            };
            let units: Vec<TileUnit> = if usable() { vec![TileUnit::Emulated, TileUnit::Hardware] } else { vec![TileUnit::Emulated] };
            for unit in units {
                let mut tile = vec![f32::NAN; MR * NR];
                walk_tiles(unit, walk, &a, &b, &mut tile);
                for i in 0..MR {
                    for j in 0..NR {
                        let (got, want) = (tile[i * NR + j] as f64, reference(i, j));
                        assert!((got - want).abs() <= 1e-3 * (1.0 + want.abs()), "{unit:?} {steps} steps ({i},{j}): {got} vs {want}");
                    }
                }
            }
        }
    }

    /// Row and column offsets into `A` and `B` (a thread's part, a depth share).
    #[test]
    fn tile_driver_reads_its_part() {
        let (m, k, n) = (50, 70, 80);
        let (a32, b32) = (values(m * k, 5), values(k * n, 6));
        let a16: Vec<bf16> = a32.iter().map(|&x| bf16::from_f32(x)).collect();
        let b_view = MatRef::row_major(&b32, k, n).unwrap();
        let rounding = Isa::Portable;
        let mut whole = vec![0f32; m * n];
        block(TileUnit::Emulated, rounding, COut::new(&mut whole, n, m, n), 0, 0, ABf16::Weight(Bf16Matrix::new(&a16, m, k).unwrap()), &RoundedB { source: &b_view, isa: rounding }, Init::Overwrite);
        // Rows 10.. and columns 32.. (a panel boundary, as `for_each_share` splits columns).
        let mut part = vec![0f32; (m - 10) * (n - 32)];
        block(TileUnit::Emulated, rounding, COut::new(&mut part, n - 32, m - 10, n - 32), 10, 32, ABf16::Weight(Bf16Matrix::new(&a16, m, k).unwrap()), &RoundedB { source: &b_view, isa: rounding }, Init::Overwrite);
        for i in 10..m {
            for j in 32..n {
                assert_eq!(part[(i - 10) * (n - 32) + j - 32], whole[i * n + j], "({i}, {j})");
            }
        }
    }
}

