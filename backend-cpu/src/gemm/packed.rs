//! The crate's own single-threaded GEMM for x86-64 with AVX2 and FMA: the BLIS loop nest
//! (Goto & van de Geijn, "Anatomy of high-performance matrix multiplication", 2008) around a
//! 6 x 16 register-tile micro-kernel, or, where the CPU has AVX-512F, a 6 x 64 one
//! ([`avx512`]) that reads the same packing and gives the same bits.
//!
//! Why our own, when the `gemm` crate has the same kind of kernel (single-threaded within about
//! 2 % of it on this project's shapes, see the `gemm_speed` timing in `gemm.rs`): it packs into
//! buffers it allocates on every call, the only allocations left in a training step, and the
//! fresh pages cost page faults. Here the packing buffers are one per thread, allocated on the
//! thread's first product and reused by every later one. Packing a stored transpose (the weight
//! matrices) goes through 8 x 8 register transposes.
//!
//! The loop nest, for `C = alpha A B + beta C` (A is m x k, B is k x n):
//!
//! ```text
//! for jc in steps of NC over n:              B's columns, a panel that stays in L3
//!   for pc in blocks of at most KC over k:   pack B[pc.., jc..] (kc x NC, 16-column strips)
//!     for ic in steps of MC over m:          pack A[ic.., pc..] (MC x kc, 6-row strips), in L2
//!       for jb in steps of NB over NC:       a block of B (kc x NB) that stays in L2
//!         for ir in steps of 6 over MC:      one A strip (6 x kc, in L1)
//!           for jr in steps of 16 over NB:   micro-kernel: a 6 x 16 tile of C in 12 registers
//!                                            (AVX-512: steps of 64, 6 x 64 in 24 registers)
//! ```
//!
//! `k` is cut into blocks of equal depth, at most [`KC`] (a 544-deep product into two of 272,
//! not 256 + 256 + 32): C is read and written once per block, so few and even blocks waste least.
//! The A strip stays in L1 while the B strips of a block stream from L2, and consecutive tiles
//! lie side by side in the same six rows of C. Against the earlier order (256-deep blocks, a B
//! strip in L1, A strips streamed), products ran 1.5-2 % faster on their own (`gemm_speed`,
//! relative to the `gemm` crate in the same run) and training 1.4-2.5 %, embedding 2.2-3.5 %
//! (small64 and tiny32, in-process; docs/results.md).
//!
//! Numerics: every element of C is one chain of fused multiply-adds over `p = 0..k` in
//! ascending order, restarted at each block of `k`: the first block stores `alpha * acc + beta * C`,
//! later ones `alpha * acc + C`. The value of an element depends only on its own row of A and
//! column of B, not on where its tile or the caller's band falls, so splitting C among threads
//! changes no bit.

use super::Epilogue;
use crate::buf::{floats, floats_mut, Line};
use crate::fastmath;
use core::arch::x86_64::*;
use std::cell::RefCell;

mod avx512;

/// Rows of the register tile.
const MR: usize = 6;
/// Columns of the register tile: two 8-float AVX registers.
const NR: usize = 16;
/// Most depth of a packed block: an A strip of 6 x 512 floats is 12 KiB, a third of L1, and a
/// B block of NB columns 256 KiB, half of L2.
const KC: usize = 512;
/// Rows of A packed at once (a multiple of MR): 120 x 512 floats = 240 KiB, in L2 or L3.
const MC: usize = 120;
/// Columns of B read per A strip (a multiple of NR): 128 x 512 floats = 256 KiB, in L2.
/// 64 and 256 (and MC 60 or 240) measured the same within the noise.
const NB: usize = 128;
/// Columns of B packed at once (a multiple of NR): up to 6 MiB, inside L3; as wide as the
/// widest weight matrix of ViT-B and ViT-L (3072 and 4096 columns) needs in one or two panels.
const NC: usize = 3072;

/// The depth of `k`'s blocks: as few as [`KC`] allows, of equal depth (rounded up, so the last
/// may be a little shallower).
fn kc_step(k: usize) -> usize {
    k.div_ceil(k.div_ceil(KC).max(1)).max(1)
}

/// Whether this CPU runs the kernel (checked once by the caller).
pub(super) fn available() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

/// Which micro-kernel tiles C: both give the same bits (see [`avx512`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Isa {
    /// 6 x 16 tiles in AVX2 registers.
    Avx2,
    /// 6 x 64 tiles in AVX-512 registers ([`avx512`]), AVX2 ones for edges of at most eight
    /// columns.
    Avx512,
}

impl Isa {
    /// The widest this CPU runs, if it runs the kernel at all.
    pub(super) fn best() -> Option<Isa> {
        if avx512::available() {
            Some(Isa::Avx512)
        } else if available() {
            Some(Isa::Avx2)
        } else {
            None
        }
    }

    /// Whether this CPU runs it.
    #[cfg(test)]
    pub(super) fn runs_here(self) -> bool {
        match self {
            Isa::Avx2 => available(),
            Isa::Avx512 => avx512::available(),
        }
    }
}

thread_local! {
    /// This thread's packing buffers: packed A (MC x kc) then packed B (kc x NC). Grown on the
    /// thread's first product to the size the largest product needs and kept, so a training
    /// step allocates nothing here after the first.
    static WORKSPACE: RefCell<Vec<Line>> = const { RefCell::new(Vec::new()) };
}

/// Lines of the largest workspace any product needs: the full MC x KC and KC x NC panels.
const WORKSPACE_LINES: usize = (MC * KC + KC * NC).div_ceil(16) + 1;

/// Reserves this thread's workspace for the largest product (address space only: nothing is
/// written, so no page is touched until a product needs it). The growth of the workspace later
/// stays inside the reservation and allocates nothing: a pool thread that runs its first
/// product in a later step, as dynamic scheduling may make it, does not allocate then.
pub(super) fn reserve_workspace() {
    WORKSPACE.with(|ws| reserve_largest(&mut ws.borrow_mut()));
}

/// Makes `ws` hold [`WORKSPACE_LINES`] without reallocating (once: a no-op after).
fn reserve_largest(ws: &mut Vec<Line>) {
    if ws.capacity() < WORKSPACE_LINES {
        let len = ws.len();
        ws.reserve_exact(WORKSPACE_LINES - len);
    }
}

/// A strided operand: element `(i, j)` at `ptr + i * rs + j * cs`.
#[derive(Clone, Copy)]
pub(super) struct Operand {
    pub(super) ptr: *const f32,
    pub(super) rs: usize,
    pub(super) cs: usize,
}

/// Where the micro-kernel's B strips come from.
#[derive(Clone, Copy)]
pub(super) enum BSource<'a> {
    /// Packed from the operand block by block, into this thread's workspace.
    Strided(Operand),
    /// Read from a panel packed before, whose 16-column strip `first_strip` is this product's
    /// first (the panel of a whole B, and a band of its columns that starts on a strip).
    Packed {
        panel: &'a PackedB,
        first_strip: usize,
    },
}

/// A whole `k x n` B packed as [`gemm()`] packs it block by block: for each block of `k` in
/// turn, every 16-column strip of `n` (zeros past it), `kc x 16` values each. The block that
/// starts at `pc` therefore starts at `pc * n16` (`n16` = `n` rounded up to 16), and its strip
/// `s` at `s * kc * 16` after that. Made for a B that many products read unchanged (the
/// weights of a model that is only run forward): they then skip the packing and its 8 x 8
/// transposes, which each thread otherwise repeats for every product.
pub(crate) struct PackedB {
    /// `(k, n, row stride, column stride)` of the operand it was packed from.
    key: (usize, usize, usize, usize),
    lines: Vec<Line>,
}

impl PackedB {
    /// Packs the `k x n` B at `b`, or `None` when the memory cannot be had (the caller then
    /// packs as usual).
    ///
    /// # Safety
    /// [`available`] returned true; every element `(p, j)`, `p < k`, `j < n`, of `b` is readable.
    pub(super) unsafe fn pack(k: usize, n: usize, b: Operand) -> Option<PackedB> {
        let n16 = n.next_multiple_of(NR);
        let mut lines = Vec::new();
        lines.try_reserve_exact(n16 * k / 16).ok()?;
        lines.resize(n16 * k / 16, Line([0.0; 16]));
        /// B, read by the packing tasks.
        struct Shared(Operand);
        // SAFETY: the tasks only read B's elements, which nothing writes meanwhile (the
        // caller's contract).
        unsafe impl Sync for Shared {}
        // Captured whole (a closure would otherwise capture the non-`Sync` field).
        let shared = &Shared(b);
        let floats = floats_mut(&mut lines);
        let step = kc_step(k);
        for pc in (0..k).step_by(step) {
            let kc = step.min(k - pc);
            // The block's strips in groups of eight, packed by the pool's threads.
            let block = &mut floats[pc * n16..][..n16 * kc];
            crate::pool::chunks1(block, 8 * NR * kc, |i, strips| {
                let first = 8 * NR * i;
                // SAFETY: rows pc .. pc + kc and columns first .. first + 8 * 16 (clipped to
                // n) lie inside B (the caller's contract); `strips` holds their 16-column
                // strips (the block's last group holds the rest of n, rounded up to 16).
                unsafe {
                    pack_b(
                        kc,
                        (8 * NR).min(n - first),
                        offset(shared.0, pc, first),
                        strips,
                    )
                };
            });
        }
        Some(PackedB {
            key: (k, n, b.rs, b.cs),
            lines,
        })
    }

    /// Whether this is the packing of a `k x n` B with B's strides.
    pub(super) fn packs(&self, k: usize, n: usize, b: Operand) -> bool {
        self.key == (k, n, b.rs, b.cs)
    }

    /// The `kc x nc` block at `(pc, 16 * first_strip + jc)`, as [`pack_b`] would have packed it.
    fn block(&self, first_strip: usize, pc: usize, jc: usize, kc: usize, nc: usize) -> &[f32] {
        let n16 = self.key.1.next_multiple_of(NR);
        let start = pc * n16 + (first_strip * NR + jc) * kc;
        &floats(&self.lines)[start..start + nc.next_multiple_of(NR) * kc]
    }
}

/// `C = alpha * A * B + beta * C` for an `m x k` A and a `k x n` B; C has contiguous columns
/// and row stride `rsc`.
///
/// # Safety
/// `isa` runs on this CPU ([`available`], and `avx512::available` for [`Isa::Avx512`]). Every
/// element of A, B and C addressed by the shapes and strides is inside one allocation; C's
/// elements are distinct and overlap neither A nor B. With `beta == 0` C is only written; with
/// `k == 0` A and B are not read. A packed B holds this product's `k` rows and its `n` columns
/// from its first strip on.
pub(super) unsafe fn gemm(
    isa: Isa,
    (m, n, k): (usize, usize, usize),
    alpha: f32,
    a: Operand,
    b: BSource,
    beta: f32,
    c: *mut f32,
    rsc: usize,
    epilogue: Epilogue,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        // SAFETY: the caller's contract on C and the epilogue.
        unsafe {
            scale(m, n, beta, c, rsc);
            epilogue.apply(m, n, c, rsc);
        }
        return;
    }
    let kc_max = kc_step(k);
    let layout = StripLayout::of(a);
    // Rounded up to a line, so that packed B starts on one too (its 16-column strips are whole
    // lines; A's strips are read one float at a time).
    let a_len = (m.min(MC).next_multiple_of(MR) * kc_max).next_multiple_of(16);
    let b_len = n.min(NC).next_multiple_of(NR) * kc_max;
    WORKSPACE.with(|ws| {
        // Not reentrant: the loop nest below calls nothing that multiplies again.
        let mut ws = ws.borrow_mut();
        if ws.len() * 16 < a_len + b_len {
            // Rounded up to the full panel sizes, so that later, larger products on this thread
            // rarely need to write more of it; within the reservation, which a thread's first
            // growth makes, growing allocates nothing.
            let want = (a_len + b_len).max(MC * kc_max + kc_max * NC.min(n.next_multiple_of(NR)));
            reserve_largest(&mut ws);
            ws.resize(want.div_ceil(16), Line([0.0; 16]));
        }
        let (a_pack, rest) = floats_mut(&mut ws).split_at_mut(a_len);
        let b_space = &mut rest[..b_len];
        for jc in (0..n).step_by(NC) {
            let nc = NC.min(n - jc);
            for pc in (0..k).step_by(kc_max) {
                let kc = kc_max.min(k - pc);
                let b_pack: &[f32] = match b {
                    BSource::Strided(b) => {
                        // SAFETY: the block's elements lie inside B (caller's contract).
                        unsafe { pack_b(kc, nc, offset(b, pc, jc), b_space) };
                        b_space
                    }
                    BSource::Packed { panel, first_strip } => {
                        panel.block(first_strip, pc, jc, kc, nc)
                    }
                };
                let beta_block = if pc == 0 { beta } else { 1.0 };
                // The epilogue goes with the last block, when C holds the whole sum.
                let last = pc + kc == k;
                for ic in (0..m).step_by(MC) {
                    let mc = MC.min(m - ic);
                    // SAFETY: as above, for A.
                    unsafe { pack_a(mc, kc, offset(a, ic, pc), layout, a_pack) };
                    for jb in (0..nc).step_by(NB) {
                        for ir in (0..mc).step_by(MR) {
                            let a_strip = &a_pack[ir * kc..(ir + MR) * kc];
                            let mut jr = jb;
                            while jr < nc.min(jb + NB) {
                                let (rows, cols) = (MR.min(mc - ir), nc.min(jb + NB) - jr);
                                let (kernel, width) = tile(isa, layout, cols);
                                let cols = cols.min(width);
                                let b_strips = &b_pack[jr * kc..(jr + width) * kc];
                                let at = (ic + ir) * rsc + jc + jr;
                                let epilogue = match last {
                                    // SAFETY: the tile (ic + ir .., jc + jr ..), clipped to
                                    // m x n, is inside C and the epilogue's arrays (caller's
                                    // contract).
                                    true => unsafe { epilogue.at(jc + jr, at) },
                                    false => Epilogue::NONE,
                                };
                                // SAFETY: as above; `tile` picks kernels `isa` runs (the
                                // caller's contract), for a tile `width` wide, whose strips
                                // `b_strips` holds (blocks of B are rounded up to 16 columns,
                                // and `width` is 16 or 64 for a full block, less only at its
                                // end).
                                unsafe {
                                    kernel(
                                        kc,
                                        a_strip,
                                        b_strips,
                                        (c.add(at), rsc, rows, cols),
                                        alpha,
                                        beta_block,
                                        epilogue,
                                    )
                                };
                                jr += width;
                            }
                        }
                    }
                }
            }
        }
    });
}

/// A micro-kernel: see [`micro_kernel`] and [`avx512::micro_kernel`].
type MicroKernel =
    unsafe fn(usize, &[f32], &[f32], (*mut f32, usize, usize, usize), f32, f32, Epilogue);

/// The kernel for the next tile of a row of tiles, `cols` columns before the block's end, and
/// the tile's width (a multiple of 16, at most what the packed strips hold from there on).
fn tile(isa: Isa, layout: StripLayout, cols: usize) -> (MicroKernel, usize) {
    let row_major = layout == StripLayout::RowMajor;
    // A strip of at most eight columns (a product whose n is not a multiple of 16, as
    // attention's T = 16 k + 1 keys) takes half the FMAs on one register per row.
    if cols <= NR / 2 {
        let kernel: MicroKernel = match row_major {
            true => micro_kernel::<true, 1>,
            false => micro_kernel::<false, 1>,
        };
        return (kernel, NR);
    }
    let kernel: MicroKernel = match (isa, row_major, cols.div_ceil(NR).min(4)) {
        (Isa::Avx2, true, _) => micro_kernel::<true, 2>,
        (Isa::Avx2, false, _) => micro_kernel::<false, 2>,
        (Isa::Avx512, true, 4) => avx512::micro_kernel::<true, 4>,
        (Isa::Avx512, false, 4) => avx512::micro_kernel::<false, 4>,
        (Isa::Avx512, true, 3) => avx512::micro_kernel::<true, 3>,
        (Isa::Avx512, false, 3) => avx512::micro_kernel::<false, 3>,
        (Isa::Avx512, true, 2) => avx512::micro_kernel::<true, 2>,
        (Isa::Avx512, false, 2) => avx512::micro_kernel::<false, 2>,
        (Isa::Avx512, true, _) => avx512::micro_kernel::<true, 1>,
        (Isa::Avx512, false, _) => avx512::micro_kernel::<false, 1>,
    };
    let width = match isa {
        Isa::Avx2 => NR,
        Isa::Avx512 => cols.next_multiple_of(NR).min(avx512::NR_WIDE),
    };
    (kernel, width)
}

/// The operand moved to element `(i, j)`.
///
/// # Safety
/// `(i, j)` is an element of the operand (or `i`/`j` equal a dimension with nothing read there).
unsafe fn offset(x: Operand, i: usize, j: usize) -> Operand {
    Operand {
        // SAFETY: the caller's contract: the address is inside (or one past) the allocation.
        ptr: unsafe { x.ptr.add(i * x.rs + j * x.cs) },
        ..x
    }
}

/// `C = beta * C` (zero when `beta == 0`, whatever C held): the product of an empty sum.
///
/// # Safety
/// The m x n elements of C are valid for writes (and reads when `beta != 0`).
unsafe fn scale(m: usize, n: usize, beta: f32, c: *mut f32, rsc: usize) {
    for i in 0..m {
        for j in 0..n {
            // SAFETY: the caller's contract.
            unsafe {
                let e = c.add(i * rsc + j);
                *e = if beta == 0.0 { 0.0 } else { beta * *e };
            }
        }
    }
}

/// How [`pack_a`] lays out a 6-row strip of A, and so how the micro-kernel reads it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum StripLayout {
    /// For each `p`, the six values `A[6s + 0..6][p]`: what a stored transpose (a gradient
    /// `dY^T`, whose columns are contiguous) copies into directly.
    ColumnMajor,
    /// The six rows one after the other, `kc` values each: what row-major activations copy into
    /// directly. The micro-kernel broadcasts from six rows as fast as from one (each cache line
    /// serves sixteen `p`; `micro_kernel_peak` measured both within 1 %), so row-major A needs
    /// no register transposes, which a column-major strip of it would (they were 7 % of the
    /// tiny32 embedding's time).
    RowMajor,
}

impl StripLayout {
    /// Row-major strips where A's rows are contiguous (and it is not also a column).
    fn of(a: Operand) -> StripLayout {
        if a.cs == 1 && a.rs != 1 {
            StripLayout::RowMajor
        } else {
            StripLayout::ColumnMajor
        }
    }
}

/// Packs the `mc x kc` block of A at `a` into 6-row strips of `6 * kc` values each, laid out as
/// `layout` (which is [`StripLayout::of`] `a`) says; rows past `mc` are zeros.
///
/// # Safety
/// Every element `(i, p)`, `i < mc`, `p < kc`, of `a` is readable.
unsafe fn pack_a(mc: usize, kc: usize, a: Operand, layout: StripLayout, dst: &mut [f32]) {
    debug_assert!(layout == StripLayout::of(a));
    for (s, strip) in dst[..mc.next_multiple_of(MR) * kc]
        .chunks_exact_mut(MR * kc)
        .enumerate()
    {
        let rows = MR.min(mc - s * MR);
        if rows < MR {
            strip.fill(0.0);
        }
        match layout {
            StripLayout::RowMajor => {
                for (i, row) in strip.chunks_exact_mut(kc).take(rows).enumerate() {
                    // SAFETY: row 6s + i < mc of the block, its kc values contiguous (cs == 1).
                    let src =
                        unsafe { core::slice::from_raw_parts(a.ptr.add((s * MR + i) * a.rs), kc) };
                    row.copy_from_slice(src);
                }
            }
            StripLayout::ColumnMajor if a.rs == 1 => {
                // The strip's six values of each `p` are contiguous in A.
                for p in 0..kc {
                    // SAFETY: column p < kc, rows 6s .. 6s + rows <= mc.
                    unsafe {
                        copy_run::<MR>(a.ptr.add(p * a.cs + s * MR), &mut strip[p * MR..][..rows])
                    };
                }
            }
            StripLayout::ColumnMajor => {
                // Neither rows nor columns contiguous (no product of the model): value by value.
                for p in 0..kc {
                    for i in 0..rows {
                        // SAFETY: element (6s + i, p) of the block.
                        strip[p * MR + i] = unsafe { *a.ptr.add((s * MR + i) * a.rs + p * a.cs) };
                    }
                }
            }
        }
    }
}

/// Packs the `kc x nc` block of B at `b` into 16-column strips: strip `s` holds, for each `p`,
/// the sixteen values `B[p][16s + 0..16]` (zeros past column `nc`).
///
/// # Safety
/// Every element `(p, j)`, `p < kc`, `j < nc`, of `b` is readable.
unsafe fn pack_b(kc: usize, nc: usize, b: Operand, dst: &mut [f32]) {
    for (s, strip) in dst[..nc.next_multiple_of(NR) * kc]
        .chunks_exact_mut(NR * kc)
        .enumerate()
    {
        let cols = NR.min(nc - s * NR);
        if cols < NR {
            strip.fill(0.0);
        }
        if b.cs == 1 {
            // Rows of B are contiguous: copy 16 (or fewer) floats per row.
            for p in 0..kc {
                // SAFETY: row p < kc, columns 16s .. 16s + cols < nc.
                unsafe {
                    copy_run::<NR>(b.ptr.add(p * b.rs + s * NR), &mut strip[p * NR..][..cols])
                };
            }
        } else if cols == NR && b.rs == 1 {
            // A stored transpose (a weight matrix `[n, k]`): sixteen contiguous columns of B,
            // turned into rows of the strip eight by eight.
            for p in (0..kc - kc % 8).step_by(8) {
                for h in 0..2 {
                    // SAFETY: columns 16s + 8h .. + 8 < nc and rows p .. p + 8 <= kc; AVX2 is
                    // available (the kernel's precondition).
                    unsafe {
                        let first = b.ptr.add((s * NR + 8 * h) * b.cs + p);
                        let src = core::array::from_fn(|j| first.add(j * b.cs));
                        transpose_8x8(src, strip.as_mut_ptr().add(p * NR + 8 * h), NR)
                    };
                }
            }
            for p in kc - kc % 8..kc {
                for j in 0..NR {
                    // SAFETY: element (p, 16s + j) of the block.
                    strip[p * NR + j] = unsafe { *b.ptr.add((s * NR + j) * b.cs + p) };
                }
            }
        } else {
            for j in 0..cols {
                // SAFETY: column 16s + j < nc; p < kc below.
                let col = unsafe { b.ptr.add((s * NR + j) * b.cs) };
                for p in 0..kc {
                    // SAFETY: as above.
                    strip[p * NR + j] = unsafe { *col.add(p * b.rs) };
                }
            }
        }
    }
}

/// Copies `dst.len()` floats from `src`. A strip's full rows (`N` floats) take a fixed-size
/// copy, which compiles to a few register moves instead of a call to `memcpy` per row.
///
/// # Safety
/// `dst.len()` floats at `src` are readable.
#[inline(always)]
unsafe fn copy_run<const N: usize>(src: *const f32, dst: &mut [f32]) {
    if let Ok(full) = <&mut [f32; N]>::try_from(&mut *dst) {
        // SAFETY: the caller's contract, with `dst.len() == N`.
        *full = unsafe { src.cast::<[f32; N]>().read_unaligned() };
    } else {
        // SAFETY: the caller's contract.
        dst.copy_from_slice(unsafe { core::slice::from_raw_parts(src, dst.len()) });
    }
}

/// Writes the transpose of the 8 x 8 block whose rows start at `src` to `dst` (rows
/// `dst_stride` apart): `dst[j][i] = src[i][j]`.
///
/// # Safety
/// AVX2 is available; the 8 floats at each `src[i]` are readable and the 8 rows of 8 floats at
/// `dst` writable.
#[target_feature(enable = "avx2")]
unsafe fn transpose_8x8(src: [*const f32; 8], dst: *mut f32, dst_stride: usize) {
    // SAFETY: the caller's contract bounds every load and store.
    unsafe {
        let r: [__m256; 8] = src.map(|row| _mm256_loadu_ps(row));
        // Interleave pairs of rows, then pairs of pairs, then swap 128-bit halves.
        let t0 = _mm256_unpacklo_ps(r[0], r[1]);
        let t1 = _mm256_unpackhi_ps(r[0], r[1]);
        let t2 = _mm256_unpacklo_ps(r[2], r[3]);
        let t3 = _mm256_unpackhi_ps(r[2], r[3]);
        let t4 = _mm256_unpacklo_ps(r[4], r[5]);
        let t5 = _mm256_unpackhi_ps(r[4], r[5]);
        let t6 = _mm256_unpacklo_ps(r[6], r[7]);
        let t7 = _mm256_unpackhi_ps(r[6], r[7]);
        let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        let out = [
            _mm256_permute2f128_ps::<0x20>(u0, u4),
            _mm256_permute2f128_ps::<0x20>(u1, u5),
            _mm256_permute2f128_ps::<0x20>(u2, u6),
            _mm256_permute2f128_ps::<0x20>(u3, u7),
            _mm256_permute2f128_ps::<0x31>(u0, u4),
            _mm256_permute2f128_ps::<0x31>(u1, u5),
            _mm256_permute2f128_ps::<0x31>(u2, u6),
            _mm256_permute2f128_ps::<0x31>(u3, u7),
        ];
        for (j, v) in out.into_iter().enumerate() {
            _mm256_storeu_ps(dst.add(j * dst_stride), v);
        }
    }
}

/// The 6 x 16 tile `sum_p a_strip[p] (6 values) x b_strip[p] (16 values)`, accumulated by FMA
/// in ascending `p` in 12 AVX registers (row `i`'s two halves at `2i`, `2i + 1`), then written
/// to the `rows x cols` corner of C at `c`, with the epilogue, by [`store`]. The A strip is
/// [`StripLayout::RowMajor`] when `ROW_MAJOR_A`, else column-major. With `HALVES == 1` only the
/// first eight columns are computed (the corner must be at most eight wide), with the same FMAs
/// in the same order for each of them, so the bits do not depend on the kernel either.
///
/// # Safety
/// AVX2 and FMA are available; the strips hold `6 * kc` and `16 * kc` values; the corner and
/// the epilogue are valid as [`store`] requires; `HALVES` is 1 or 2, and `cols <= 8` when 1.
#[target_feature(enable = "avx2,fma")]
unsafe fn micro_kernel<const ROW_MAJOR_A: bool, const HALVES: usize>(
    kc: usize,
    a_strip: &[f32],
    b_strip: &[f32],
    (c, rsc, rows, cols): (*mut f32, usize, usize, usize),
    alpha: f32,
    beta: f32,
    epilogue: Epilogue,
) {
    debug_assert!(a_strip.len() >= MR * kc && b_strip.len() >= NR * kc);
    debug_assert!(HALVES == 2 || (HALVES == 1 && cols <= NR / 2));
    // SAFETY: the corner is inside C (the caller's contract).
    unsafe { prefetch_corner((c, rsc, rows, cols)) };
    let (a, b) = (a_strip.as_ptr(), b_strip.as_ptr());
    // Element (i, p) of the A strip is at `a + i * rs + p * cs`.
    let (rs, cs) = if ROW_MAJOR_A { (kc, 1) } else { (1, MR) };
    let mut acc = [_mm256_setzero_ps(); 12];
    // Four steps of p per trip: at one step per trip, the loop's counting and branching were
    // 4 of its 23 instructions (about 1 % faster on every benchmark case, docs/results.md).
    let mut p = 0;
    while p + 4 <= kc {
        for q in p..p + 4 {
            // SAFETY: q < kc, so the 16 values of B's row and 6 of A's column are in the strips.
            unsafe { fma_step::<HALVES>(&mut acc, a, b, q, (rs, cs)) };
        }
        p += 4;
    }
    for q in p..kc {
        // SAFETY: as above.
        unsafe { fma_step::<HALVES>(&mut acc, a, b, q, (rs, cs)) };
    }
    // SAFETY: the caller's contract.
    unsafe { store(acc, (c, rsc, rows, cols), alpha, beta, epilogue) }
}

/// Asks for every cache line of the `rows x cols` corner of C at `c` (row stride `rsc`). C's rows
/// are far apart and usually out of L1 (or L2): asked for before the k loop, they have arrived
/// when the tile is stored after it. A row's floats start anywhere in a line, so its lines are
/// those of every sixteenth float and of its last. (For a 6 x 64 tile that is five lines a row
/// where the first and last float alone asked for two: within the noise of an in-process A/B.)
///
/// # Safety
/// The corner's elements lie inside one allocation.
#[inline(always)]
unsafe fn prefetch_corner((c, rsc, rows, cols): (*mut f32, usize, usize, usize)) {
    for i in 0..rows {
        // SAFETY: a prefetch is only a hint and never faults; the addresses are inside C.
        unsafe {
            let row = c.add(i * rsc);
            for j in (0..cols).step_by(NR) {
                _mm_prefetch::<_MM_HINT_T0>(row.add(j).cast::<i8>());
            }
            _mm_prefetch::<_MM_HINT_T0>(row.add(cols - 1).cast::<i8>());
        }
    }
}

/// One step of the micro-kernel: the outer product of A's six values at `p` (element `(i, p)`
/// at `a + i * rs + p * cs`) and B's sixteen (at `b + 16 p`; the first eight when `HALVES` is
/// 1), added into the accumulators by FMA. Always inlined into [`micro_kernel`], whose AVX2 and
/// FMA it is compiled with.
///
/// # Safety
/// AVX2 and FMA are available; the six values of A and sixteen of B at `p` are readable.
#[inline(always)]
unsafe fn fma_step<const HALVES: usize>(
    acc: &mut [__m256; 12],
    a: *const f32,
    b: *const f32,
    p: usize,
    (rs, cs): (usize, usize),
) {
    // SAFETY: the caller's contract.
    unsafe {
        let b0 = _mm256_loadu_ps(b.add(p * NR));
        let b1 = _mm256_loadu_ps(b.add(p * NR + 8));
        for i in 0..MR {
            let ai = _mm256_broadcast_ss(&*a.add(i * rs + p * cs));
            acc[2 * i] = _mm256_fmadd_ps(ai, b0, acc[2 * i]);
            if HALVES == 2 {
                acc[2 * i + 1] = _mm256_fmadd_ps(ai, b1, acc[2 * i + 1]);
            }
        }
    }
}

/// Writes `alpha * acc + beta * C` into the `rows x cols` corner of the tile at `c` (C not read
/// when `beta == 0`), then the epilogue: `+ bias[j]` (one add) and `act = gelu(C)`. Eight
/// columns at a time, the last group of an edge tile through masked loads and stores, with the
/// same operations (a multiply, a fused multiply-add, an add, and the vector GELU that
/// [`Epilogue::apply`] also uses), so an element gets the same bits whichever kind of tile it
/// falls in, and the same as [`Epilogue::apply`] gives after the other kernels.
///
/// Always inlined into [`micro_kernel`], whose AVX2 and FMA it is compiled with (a function of
/// its own would take the accumulators through memory).
///
/// # Safety
/// AVX2 and FMA are available; the `rows x cols` elements at `c` (row stride `rsc`) are valid,
/// and so are the epilogue's `cols` bias values and `rows x cols` act elements (C's layout).
#[inline(always)]
unsafe fn store(
    acc: [__m256; 12],
    (c, rsc, rows, cols): (*mut f32, usize, usize, usize),
    alpha: f32,
    beta: f32,
    Epilogue { bias, act }: Epilogue,
) {
    // SAFETY: the intrinsics need AVX2 and FMA, which the caller guarantees; a group's loads
    // and stores touch only its first `lanes` elements (the mask's), which are elements of the
    // caller's valid corner of C, of the bias (columns < cols) or of act (C's layout).
    unsafe {
        let va = _mm256_set1_ps(alpha);
        let vb = _mm256_set1_ps(beta);
        for h in 0..2 {
            let lanes = cols.saturating_sub(8 * h).min(8);
            if lanes == 0 {
                break;
            }
            let group = Lanes::first(lanes);
            let bias = (!bias.is_null()).then(|| group.load(bias.add(8 * h)));
            for i in 0..rows {
                let e = c.add(i * rsc + 8 * h);
                let mut v = _mm256_mul_ps(va, acc[2 * i + h]);
                if beta != 0.0 {
                    v = _mm256_fmadd_ps(vb, group.load(e), v);
                }
                if let Some(bias) = bias {
                    v = _mm256_add_ps(v, bias);
                }
                group.store(e, v);
                if !act.is_null() {
                    group.store(act.add(i * rsc + 8 * h), fastmath::gelu_m256(v));
                }
            }
        }
    }
}

/// The first `n` of a group of eight consecutive floats (`1 <= n <= 8`): plain loads and stores
/// for a whole group, masked ones (which touch no other element) for the part of one.
#[derive(Clone, Copy)]
struct Lanes {
    n: usize,
    mask: __m256i,
}

impl Lanes {
    /// # Safety
    /// AVX2 is available.
    #[inline(always)]
    unsafe fn first(n: usize) -> Lanes {
        // SAFETY: the caller's contract (the intrinsics need AVX2).
        let mask = unsafe {
            _mm256_cmpgt_epi32(
                _mm256_set1_epi32(n as i32),
                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
            )
        };
        Lanes { n, mask }
    }

    /// The group at `p`, zeros past the first `n`.
    ///
    /// # Safety
    /// AVX2; the first `n` floats at `p` are readable.
    #[inline(always)]
    unsafe fn load(self, p: *const f32) -> __m256 {
        // SAFETY: the caller's contract; a masked load does not touch masked-off elements.
        unsafe {
            if self.n == 8 {
                _mm256_loadu_ps(p)
            } else {
                _mm256_maskload_ps(p, self.mask)
            }
        }
    }

    /// Writes the first `n` lanes of `v` to `p`.
    ///
    /// # Safety
    /// AVX2; the first `n` floats at `p` are writable.
    #[inline(always)]
    unsafe fn store(self, p: *mut f32, v: __m256) {
        // SAFETY: the caller's contract; a masked store does not touch masked-off elements.
        unsafe {
            if self.n == 8 {
                _mm256_storeu_ps(p, v)
            } else {
                _mm256_maskstore_ps(p, self.mask, v)
            }
        }
    }
}

#[cfg(test)]
mod speed {
    use super::{available, micro_kernel, Epilogue, MR, NR};

    /// Strips of this depth (16 + 6 KiB) stay in L1 together.
    const DEPTH: usize = 256;
    use core::arch::x86_64::*;
    use std::hint::black_box;
    use std::time::Instant;

    /// GFLOP/s of `f` (which does `flops` each call), best of five timed batches of calls.
    fn best_rate(flops: f64, mut f: impl FnMut()) -> f64 {
        (0..5)
            .map(|_| {
                let start = Instant::now();
                for _ in 0..200 {
                    f();
                }
                200.0 * flops / start.elapsed().as_secs_f64() / 1e9
            })
            .fold(0.0, f64::max)
    }

    /// Twelve independent chains of `n` FMAs on eight lanes: the core's FMA throughput.
    #[target_feature(enable = "avx2,fma")]
    fn fma_chains(n: usize) -> f32 {
        let mut acc = [_mm256_set1_ps(1.0); 12];
        let (x, y) = (black_box(_mm256_set1_ps(0.999)), _mm256_set1_ps(1e-3));
        for _ in 0..black_box(n) {
            for a in &mut acc {
                *a = _mm256_fmadd_ps(*a, x, y);
            }
        }
        let mut out = [0.0f32; 8];
        // SAFETY: eight floats into an array of eight.
        unsafe {
            _mm256_storeu_ps(
                out.as_mut_ptr(),
                acc.iter().fold(acc[0], |s, &a| _mm256_add_ps(s, a)),
            )
        };
        out[0]
    }

    /// The measured FMA peak of one core next to the micro-kernel on strips that stay in L1:
    /// the ceiling every product (and docs/results.md's efficiency figures) is measured
    /// against. Timing only, on an idle machine:
    /// `cargo test --release -p mae-backend-cpu --lib -- --ignored --nocapture micro_kernel_peak`.
    #[test]
    #[ignore]
    fn micro_kernel_peak() {
        if !available() {
            println!("SKIP micro_kernel_peak: no AVX2/FMA");
            return;
        }
        const N: usize = 100_000;
        let peak = best_rate((N * 12 * 16) as f64, || {
            // SAFETY: AVX2 and FMA are available (checked above).
            black_box(unsafe { fma_chains(N) });
        });
        let a = vec![0.5f32; MR * DEPTH];
        let b = vec![0.25f32; NR * DEPTH];
        let mut c = [0.0f32; MR * NR];
        let mut rate = |kernel: unsafe fn(usize, &[f32], &[f32], _, f32, f32, Epilogue)| {
            best_rate((2 * MR * NR * DEPTH) as f64, || {
                // SAFETY: the strips hold 6 and 16 values per p < DEPTH (either layout); C is one
                // full 6 x 16 tile; AVX2 and FMA are available.
                unsafe {
                    kernel(
                        DEPTH,
                        &a,
                        &b,
                        (c.as_mut_ptr(), NR, MR, NR),
                        1.0,
                        0.0,
                        Epilogue::NONE,
                    )
                };
                black_box(&mut c);
            })
        };
        let (column_major, row_major) = (
            rate(micro_kernel::<false, 2>),
            rate(micro_kernel::<true, 2>),
        );
        if super::avx512::available() {
            // Four B strips of this depth (24 KiB) and A's (2.3 KiB) stay in L1 together.
            const WIDE_DEPTH: usize = 96;
            let b = vec![0.25f32; 4 * NR * WIDE_DEPTH];
            let mut c = [0.0f32; MR * 4 * NR];
            for (name, kernel) in [
                (
                    "column-major",
                    super::avx512::micro_kernel::<false, 4> as super::MicroKernel,
                ),
                ("row-major", super::avx512::micro_kernel::<true, 4>),
            ] {
                let rate = best_rate((2 * MR * 4 * NR * WIDE_DEPTH) as f64, || {
                    // SAFETY: the strips hold 6 and 64 values per p < WIDE_DEPTH; C is one
                    // full 6 x 64 tile; AVX-512F, AVX2 and FMA are available.
                    unsafe {
                        kernel(
                            WIDE_DEPTH,
                            &a,
                            &b,
                            (c.as_mut_ptr(), 4 * NR, MR, 4 * NR),
                            1.0,
                            0.0,
                            Epilogue::NONE,
                        )
                    };
                    black_box(&mut c);
                });
                println!(
                    "AVX-512 6 x 64 micro-kernel, {name} A, depth {WIDE_DEPTH}: {rate:.1} \
                     GFLOP/s ({:.1} %)",
                    100.0 * rate / peak
                );
            }
        }
        println!(
            "one core: FMA peak {peak:.1} GFLOP/s; micro-kernel on L1-resident strips: \
             column-major A {column_major:.1} GFLOP/s ({:.1} %), row-major A {row_major:.1} \
             GFLOP/s ({:.1} %)",
            100.0 * column_major / peak,
            100.0 * row_major / peak
        );
    }
}
