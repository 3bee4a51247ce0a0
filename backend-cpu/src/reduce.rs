//! Row reductions in `f64` with a fixed summation order.
//!
//! Each sum keeps [`LANES`] independent partial sums (element `j` goes to lane `j % LANES`, the
//! tail after the last full group goes to a separate partial) and combines them in one fixed tree.
//! The order depends only on the length, so results are bitwise repeatable, while the independent
//! lanes let the compiler vectorize and hide the latency of the `f64` adds. `f64` keeps the
//! rounding error of a 1000-term row sum far below `f32` precision.

/// Partial sums per reduction; eight `f64` fill one AVX-512 register or two AVX2 registers.
const LANES: usize = 8;

/// The fixed combination order of the lane partials and the tail.
#[inline(always)]
fn combine(acc: [f64; LANES], tail: f64) -> f64 {
    (((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))) + tail
}

/// `sum_j f(a[j])`.
#[inline(always)]
pub(crate) fn fold1(a: &[f32], f: impl Fn(f32) -> f64) -> f64 {
    let mut acc = [0.0f64; LANES];
    let chunks = a.chunks_exact(LANES);
    let rest = chunks.remainder();
    for ca in chunks {
        for l in 0..LANES {
            acc[l] += f(ca[l]);
        }
    }
    let mut tail = 0.0;
    for &x in rest {
        tail += f(x);
    }
    combine(acc, tail)
}

/// `sum_j f(a[j], b[j])` over `a.len()` elements (`b` at least as long).
#[inline(always)]
pub(crate) fn fold2(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f64) -> f64 {
    let b = &b[..a.len()];
    let mut acc = [0.0f64; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (xa, xb) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += f(xa[l], xb[l]);
        }
    }
    let mut tail = 0.0;
    for (&x, &y) in ra.iter().zip(rb) {
        tail += f(x, y);
    }
    combine(acc, tail)
}

/// `sum_j f(a[j], b[j], c[j])` over `a.len()` elements (`b`, `c` at least as long).
#[inline(always)]
pub(crate) fn fold3(a: &[f32], b: &[f32], c: &[f32], f: impl Fn(f32, f32, f32) -> f64) -> f64 {
    let (b, c) = (&b[..a.len()], &c[..a.len()]);
    let mut acc = [0.0f64; LANES];
    let (ca, cb, cc) = (
        a.chunks_exact(LANES),
        b.chunks_exact(LANES),
        c.chunks_exact(LANES),
    );
    let (ra, rb, rc) = (ca.remainder(), cb.remainder(), cc.remainder());
    for ((xa, xb), xc) in ca.zip(cb).zip(cc) {
        for l in 0..LANES {
            acc[l] += f(xa[l], xb[l], xc[l]);
        }
    }
    let mut tail = 0.0;
    for ((&x, &y), &z) in ra.iter().zip(rb).zip(rc) {
        tail += f(x, y, z);
    }
    combine(acc, tail)
}

/// Plain `sum_j a[j]`.
#[inline(always)]
pub(crate) fn sum(a: &[f32]) -> f64 {
    fold1(a, |x| x as f64)
}

/// Width of the column blocks in which column sums over many rows are accumulated: the `f64`
/// partials of one block live on the stack (2 KiB), so column reductions need no heap buffer.
pub(crate) const COL_BLOCK: usize = 256;

/// Width of the column blocks (at most [`COL_BLOCK`]) in which a column reduction over `cols`
/// columns is split over threads: narrow enough to give every thread several blocks. Each
/// column's sum is the same whatever the width, so this only changes who computes it.
pub(crate) fn col_block(cols: usize) -> usize {
    let per_thread = cols.div_ceil(4 * crate::pool::threads());
    per_thread.next_multiple_of(16).clamp(16, COL_BLOCK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folds_sum_every_element_once_for_all_tail_lengths() {
        for n in 0..20 {
            let a: Vec<f32> = (1..=n).map(|i| i as f32).collect();
            let expect = (n * (n + 1) / 2) as f64;
            assert_eq!(sum(&a), expect, "n = {n}");
            assert_eq!(fold1(&a, |x| 2.0 * x as f64), 2.0 * expect);
            assert_eq!(fold2(&a, &a, |x, y| (x * y) as f64), {
                (1..=n).map(|i| (i * i) as f64).sum::<f64>()
            });
            assert_eq!(
                fold3(&a, &a, &a, |x, y, z| (x + y + z) as f64),
                3.0 * expect
            );
        }
    }

    #[test]
    fn f64_accumulation_keeps_small_terms() {
        // In f32, 1e8 + 1 + 1 + ... stays 1e8; the f64 sum keeps every 1.
        let mut a = vec![1.0f32; 1001];
        a[0] = 1.0e8;
        assert_eq!(sum(&a), 1.0e8 + 1000.0);
    }
}
