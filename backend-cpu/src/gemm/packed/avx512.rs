//! The AVX-512 micro-kernel: a 6 x 64 register tile, four 16-float registers per row of C.
//!
//! Why a second kernel, when a Zen 4 core runs a 512-bit FMA as two 256-bit halves and so has the
//! same FMA peak with either: each instruction does twice the work, so the loop issues half the
//! instructions, and a broadcast of A feeds 64 columns instead of 16. Inside real products the
//! AVX2 kernel reached 75-89 % of the peak on such a core (Zen 4) where the `gemm` crate's
//! AVX-512 kernel reached 85-95 % (`gemm_speed`); on L1-resident strips both are at 98 %. This
//! one reaches 79-91 % inside products and 99 % on L1-resident strips (docs/results.md).
//!
//! It reads the packing of [`super`] unchanged (6-row A strips, B in 16-column strips, which lie
//! one after the other, so four strips are one `64 x kc` block) and stores the tile with the
//! operations of [`super::store`], lane for lane (through [`super::store`] itself for the GELU
//! epilogue), so every element of C is the same chain of fused multiply-adds, rounded the same
//! way, as with the AVX2 kernel: the two give the same bits, and the driver mixes them freely
//! at the edges (a last strip of at most eight columns takes the AVX2 6 x 8 kernel).
//!
//! Tried and not kept: 12 x 32 tiles (two A strips, two B strips, also 24 registers) ran
//! 25-35 % slower than 6 x 64 in training and embedding (in-process A/B on small64 and
//! base224).

use super::{Epilogue, MR, NR};
use core::arch::x86_64::*;

/// Columns of the full tile.
pub(super) const NR_WIDE: usize = STRIPS * NR;
/// B strips of the full tile.
const STRIPS: usize = 4;

/// Whether this CPU runs the kernel (checked once by the caller).
pub(super) fn available() -> bool {
    super::available() && is_x86_feature_detected!("avx512f")
}

/// The 6 x `16 S` tile `sum_p a_strip[p] (6 values) x b_strips[p] (16 S values)`, accumulated by
/// FMA in ascending `p`, then written to the `rows x cols` corner of C at `c` with the epilogue.
/// The A strip is laid out as the AVX2 kernel reads it (row-major when `ROW_MAJOR_A`); the B
/// strips are `S` consecutive 16-column strips of `16 kc` values each.
///
/// # Safety
/// AVX-512F, AVX2 and FMA are available; `a_strip` holds `6 kc` values and `b_strips`
/// `16 S kc`; `cols <= 16 S`; the corner and the epilogue are valid as [`store`] requires for
/// `rows x cols`.
#[target_feature(enable = "avx512f,avx2,fma")]
pub(super) unsafe fn micro_kernel<const ROW_MAJOR_A: bool, const S: usize>(
    kc: usize,
    a_strip: &[f32],
    b_strips: &[f32],
    (c, rsc, rows, cols): (*mut f32, usize, usize, usize),
    alpha: f32,
    beta: f32,
    epilogue: Epilogue,
) {
    debug_assert!(a_strip.len() >= MR * kc && b_strips.len() >= S * NR * kc && cols <= S * NR);
    // SAFETY: the corner is inside C (the caller's contract).
    unsafe { super::prefetch_corner((c, rsc, rows, cols)) };
    let (a, b) = (a_strip.as_ptr(), b_strips.as_ptr());
    let (rs, cs) = if ROW_MAJOR_A { (kc, 1) } else { (1, MR) };
    let mut acc = [[_mm512_setzero_ps(); S]; MR];
    let mut p = 0;
    while p + 4 <= kc {
        for q in p..p + 4 {
            // SAFETY: q < kc, so A's six values and each strip's sixteen at q are in the strips.
            unsafe { fma_step::<S>(&mut acc, a, b, q, kc, (rs, cs)) };
        }
        p += 4;
    }
    for q in p..kc {
        // SAFETY: as above.
        unsafe { fma_step::<S>(&mut acc, a, b, q, kc, (rs, cs)) };
    }
    // SAFETY: the caller's contract.
    unsafe { store(&acc, (c, rsc, rows, cols), alpha, beta, epilogue) }
}

/// Writes `alpha * acc + beta * C` into the `rows x cols` corner of the tile at `c` (C not read
/// when `beta == 0`), then the epilogue, with the operations of [`super::store`] lane for lane,
/// so with its bits: a multiply, a fused multiply-add and an add on sixteen lanes (the part of
/// a quarter past `cols` masked off), or, with a GELU, [`super::store`] itself on each 6 x 16
/// quarter.
///
/// # Safety
/// As [`micro_kernel`].
#[inline(always)]
unsafe fn store<const S: usize>(
    acc: &[[__m512; S]; MR],
    (c, rsc, rows, cols): (*mut f32, usize, usize, usize),
    alpha: f32,
    beta: f32,
    epilogue: Epilogue,
) {
    // The loops below pick rows and quarters at run time. Copied out with constant indices
    // first: an index into `acc` that varies at run time would keep it in memory through the
    // FMA loop too (a third slower).
    // SAFETY: AVX-512F is available (the caller's contract).
    let mut tile = [[unsafe { _mm512_setzero_ps() }; S]; MR];
    for (to, from) in tile.iter_mut().zip(acc) {
        for (t, &f) in to.iter_mut().zip(from) {
            *t = f;
        }
    }
    // SAFETY: the intrinsics need AVX-512F (and `super::store` AVX2 and FMA), which the caller
    // guarantees; every access stays in the caller's `rows x cols` corner of C (masked loads
    // and stores touch no element outside the mask), the bias's `cols` values and act's
    // elements (C's layout; `at` moves non-null pointers only).
    unsafe {
        for s in 0..S {
            let width = cols.saturating_sub(s * NR).min(NR);
            if width == 0 {
                break;
            }
            if !epilogue.act.is_null() {
                let mut halves = [_mm256_setzero_ps(); 2 * MR];
                for (i, row) in tile.iter().enumerate() {
                    halves[2 * i] = _mm512_castps512_ps256(row[s]);
                    halves[2 * i + 1] =
                        _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(row[s])));
                }
                super::store(
                    halves,
                    (c.add(s * NR), rsc, rows, width),
                    alpha,
                    beta,
                    epilogue.at(s * NR, s * NR),
                );
                continue;
            }
            let mask: __mmask16 = if width == NR {
                0xffff
            } else {
                (1 << width) - 1
            };
            let bias = epilogue.bias;
            let bias = (!bias.is_null()).then(|| _mm512_maskz_loadu_ps(mask, bias.add(s * NR)));
            for (i, row) in tile.iter().enumerate().take(rows) {
                let e = c.add(i * rsc + s * NR);
                let mut v = _mm512_mul_ps(_mm512_set1_ps(alpha), row[s]);
                if beta != 0.0 {
                    v = _mm512_fmadd_ps(_mm512_set1_ps(beta), _mm512_maskz_loadu_ps(mask, e), v);
                }
                if let Some(bias) = bias {
                    v = _mm512_add_ps(v, bias);
                }
                _mm512_mask_storeu_ps(e, mask, v);
            }
        }
    }
}

/// One step: the outer product of A's six values at `p` and the `16 S` values of B's strips at
/// `p`, added into the accumulators by FMA. Always inlined into [`micro_kernel`].
///
/// # Safety
/// As [`micro_kernel`], for this `p < kc`.
#[inline(always)]
unsafe fn fma_step<const S: usize>(
    acc: &mut [[__m512; S]; MR],
    a: *const f32,
    b: *const f32,
    p: usize,
    kc: usize,
    (rs, cs): (usize, usize),
) {
    // SAFETY: the caller's contract.
    unsafe {
        let bs: [__m512; S] = core::array::from_fn(|s| _mm512_loadu_ps(b.add((s * kc + p) * NR)));
        for (i, row) in acc.iter_mut().enumerate() {
            let ai = _mm512_set1_ps(*a.add(i * rs + p * cs));
            for (r, &bv) in row.iter_mut().zip(&bs) {
                *r = _mm512_fmadd_ps(ai, bv, *r);
            }
        }
    }
}
