//! Exact GELU and the attention softmax, split over the pool's threads.
//!
//! Transcendentals are the crate's own branch-free `f32` routines ([`crate::fastmath`], eight
//! lanes with AVX2 + FMA, bitwise the same without) rather than the platform's C library, so the
//! CPU backend gives bitwise the same results on every operating system.

use crate::fastmath::{self, exp_in_place, wide};
use crate::pool::{chunks1, chunks2, rows_per_chunk, GRAIN};
use crate::reduce::{fold2, sum};
use crate::rows::add_into;

/// `x * Phi(x)` in `f32` within a few ulp (see [`crate::fastmath`]), with `Phi` free of
/// cancellation for negative `x` (where `1 + erf` would lose the digits of a tiny result).
pub(crate) fn gelu_forward(x: &[f32], y: &mut [f32]) {
    let n = y.len();
    let x = &x[..n];
    chunks1(y, GRAIN, |i, yc| {
        fastmath::gelu_forward(&x[i * GRAIN..i * GRAIN + yc.len()], yc);
    });
}

/// The MLP's `fc1` epilogue: `pre[r] += bias` for every row `r`, then `act = gelu(pre)`, one row
/// at a time, so each row is still in cache for its GELU and the matrix is read and written once
/// instead of twice. The add is [`add_into`] (what `copy_rows` accumulating a bias does) and the
/// GELU is [`gelu_forward`]'s, so the result is bitwise that of the two ops in turn.
pub(crate) fn bias_gelu_forward(
    bias: &[f32],
    pre: &mut [f32],
    act: &mut [f32],
    rows: usize,
    cols: usize,
) {
    if rows == 0 || cols == 0 {
        return;
    }
    let (n, bias) = (rows * cols, &bias[..cols]);
    let chunk = rows_per_chunk(cols) * cols;
    let (pre, act) = (&mut pre[..n], &mut act[..n]);
    chunks2(n.div_ceil(chunk), pre, chunk, act, chunk, |_, pc, ac| {
        for (pr, ar) in pc.chunks_exact_mut(cols).zip(ac.chunks_exact_mut(cols)) {
            add_into(pr, bias);
            fastmath::gelu_forward(pr, ar);
        }
    });
}

/// `dx += dy * (Phi(x) + x * exp(-x^2 / 2) / sqrt(2 pi))`: the gradient in `f32` (absolute
/// error at most 1.26e-7, see [`crate::fastmath`]), then one FMA.
pub(crate) fn gelu_backward(x: &[f32], dy: &[f32], dx: &mut [f32], accumulate: bool) {
    let n = dx.len();
    let (x, dy) = (&x[..n], &dy[..n]);
    chunks1(dx, GRAIN, |i, dxc| {
        let span = i * GRAIN..i * GRAIN + dxc.len();
        fastmath::gelu_backward(&x[span.clone()], &dy[span], dxc, accumulate);
    });
}

/// Scales first, subtracts the row maximum of the scaled values (so `exp` never overflows and
/// the largest term is exactly 1), exponentiates in `f32` (within 1 ulp, see
/// [`crate::fastmath`]), sums the exponentials in `f64` and normalizes in `f64`.
pub(crate) fn softmax_forward(x: &[f32], y: &mut [f32], rows: usize, cols: usize, scale: f32) {
    if cols == 0 {
        return;
    }
    let y = &mut y[..rows * cols];
    let rpc = rows_per_chunk(cols);
    chunks1(y, rpc * cols, |i, yc| {
        // `inline(always)`: a closure left out of line is compiled without AVX2 (see `wide`).
        wide(
            #[inline(always)]
            || {
                let x = &x[i * rpc * cols..][..yc.len()];
                for (xr, yr) in x.chunks_exact(cols).zip(yc.chunks_exact_mut(cols)) {
                    let max = scaled_max(xr, scale);
                    for (o, &v) in yr.iter_mut().zip(xr) {
                        *o = scale * v - max;
                    }
                }
                exp_normalize_rows(yc, cols, |_, _| ());
            },
        )
    });
}

/// `max_j scale * x[j]` (negative infinity for an empty row), in eight running maxima so that
/// it vectorizes; the maximum does not depend on the order.
#[inline(always)]
pub(crate) fn scaled_max(x: &[f32], scale: f32) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let groups = x.chunks_exact(8);
    let rest = groups.remainder();
    for g in groups {
        for (m, &v) in lanes.iter_mut().zip(g) {
            *m = m.max(scale * v);
        }
    }
    let max = rest
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| m.max(scale * v));
    lanes.iter().fold(max, |m, &v| m.max(v))
}

/// The tail of the softmax for a block of rows (`cols` each) that hold `scale * x - max`:
/// the exponentials of the whole block in one pass (a row's last partial group of eight would
/// otherwise take the padded path once per row), then each row's sum in `f64`, at least 1 (the
/// maximum's term is exactly 1), passed to `total` with the row's index, and the division by
/// it. The fused attention shares it, so its probabilities are bitwise the composed softmax's.
#[inline(always)]
pub(crate) fn exp_normalize_rows(
    block: &mut [f32],
    cols: usize,
    mut total: impl FnMut(usize, f64),
) {
    exp_in_place(block);
    for (r, row) in block.chunks_exact_mut(cols).enumerate() {
        let sum = sum(row);
        let inv = 1.0 / sum;
        for o in row.iter_mut() {
            *o = (*o as f64 * inv) as f32;
        }
        total(r, sum);
    }
}

/// `dx += scale * y * (dy - sum(dy * y))`, the row dot product in `f64`.
pub(crate) fn softmax_backward(
    y: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    rows: usize,
    cols: usize,
    scale: f32,
) {
    if cols == 0 {
        return;
    }
    let dx = &mut dx[..rows * cols];
    let rpc = rows_per_chunk(cols);
    chunks1(dx, rpc * cols, |i, dxc| {
        for (r, dxr) in dxc.chunks_exact_mut(cols).enumerate() {
            let span = (i * rpc + r) * cols..(i * rpc + r + 1) * cols;
            softmax_backward_row(&y[span.clone()], &dy[span], dxr, scale);
        }
    });
}

/// One row of [`softmax_backward`].
#[inline]
pub(crate) fn softmax_backward_row(yr: &[f32], dyr: &[f32], dxr: &mut [f32], scale: f32) {
    let dot = fold2(dyr, yr, |d, p| d as f64 * p as f64) as f32;
    for ((o, &p), &d) in dxr.iter_mut().zip(yr).zip(dyr) {
        *o += scale * p * (d - dot);
    }
}

#[cfg(test)]
mod tests {
    use crate::test_util::*;
    use mae::backend::{Backend, RowMap};

    /// GELU in f64 from the definition with `erf`, the form the contract states.
    fn gelu64(x: f64) -> f64 {
        0.5 * x * (1.0 + libm::erf(x / 2f64.sqrt()))
    }

    #[test]
    fn gelu_forward_known_values() {
        // Values of 0.5 x (1 + erf(x / sqrt 2)) from Python's math.erf.
        let be = be();
        let x = up(&[0.0, 1.0, -1.0, 2.0, -3.0, 0.5]);
        let mut y = up(&[f32::NAN; 6]);
        be.gelu_forward(&x, &mut y).unwrap();
        let expect = [
            0.0,
            0.841_344_746_068_542_9,
            -0.158_655_253_931_457_07,
            1.954_499_736_103_641_6,
            -0.004_049_694_094_890_31,
            0.345_731_230_637_006_56,
        ];
        // Within the bounds measured in fastmath.rs: 1 ulp of the correctly rounded value for
        // x >= 0, 3 for -1 <= x < 0, 5 below.
        for ((&got, &want), &x) in y.iter().zip(&expect).zip(&x) {
            let bound = if x >= 0.0 {
                1
            } else if x >= -1.0 {
                3
            } else {
                5
            };
            let ulps = (got.to_bits() as i64 - (want as f32).to_bits() as i64).abs();
            assert!(ulps <= bound, "gelu({x}) = {got} vs {want}: {ulps} ulps");
        }
        assert_eq!(y[0].to_bits(), 0);
    }

    #[test]
    fn gelu_forward_tails() {
        let be = be();
        let x = up(&[-10.0, 10.0, -40.0]);
        let mut y = up(&[f32::NAN; 3]);
        be.gelu_forward(&x, &mut y).unwrap();
        // -10 Phi(-10) = -7.6e-23: tiny but not flushed to zero by cancellation.
        assert_close(&y[..1], &[-7.619_853_024_160_527e-23f64 as f32], 1e-6);
        assert_eq!(&y[1..], &[10.0, -0.0]);
    }

    #[test]
    fn gelu_backward_matches_finite_differences_and_accumulates() {
        let be = be();
        let xs = [-4.0f32, -1.5, -0.3, 0.0, 0.2, 1.0, 2.5, 6.0];
        let dy = [1.0f32, 2.0, -1.0, 0.5, 3.0, -2.0, 1.0, 1.0];
        // The first call overwrites what was there, the second accumulates.
        let mut dx = up(&[f32::NAN; 8]);
        be.gelu_backward(&up(&xs), &up(&dy), &mut dx, false)
            .unwrap();
        be.copy_rows(&up(&[0.25; 8]), &mut dx, &RowMap::bias(1, 8), true)
            .unwrap();
        be.gelu_backward(&up(&xs), &up(&dy), &mut dx, true).unwrap();
        let h = 1e-6;
        let expect: Vec<f32> = xs
            .iter()
            .zip(&dy)
            .map(|(&x, &d)| {
                let x = x as f64;
                let slope = (gelu64(x + h) - gelu64(x - h)) / (2.0 * h);
                (0.25 + 2.0 * d as f64 * slope) as f32
            })
            .collect();
        assert_close(&dx, &expect, 1e-6);
    }

    #[test]
    fn bias_gelu_forward_is_bitwise_bias_then_gelu() {
        // 37 rows of 1001 columns: several parallel chunks of whole rows, and rows whose length
        // is no multiple of the vector width.
        let be = be();
        let (rows, cols) = (37, 1001);
        let wave =
            |n: usize, k: f32| -> Vec<f32> { (0..n).map(|i| (i as f32 * k).sin() * 4.0).collect() };
        let (bias, x) = (up(&wave(cols, 0.37)), up(&wave(rows * cols, 0.011)));
        let (mut pre, mut act) = (x.clone(), up(&vec![f32::NAN; rows * cols]));
        be.bias_gelu_forward(&bias, &mut pre, &mut act, rows, cols)
            .unwrap();
        let (mut want_pre, mut want_act) = (x, up(&vec![f32::NAN; rows * cols]));
        let map = mae::backend::RowMap::bias(rows, cols);
        be.copy_rows(&bias, &mut want_pre, &map, true).unwrap();
        be.gelu_forward(&want_pre, &mut want_act).unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&pre), bits(&want_pre));
        assert_eq!(bits(&act), bits(&want_act));
    }

    #[test]
    fn softmax_forward_by_hand_with_scale() {
        let be = be();
        let x = up(&[1.0, 2.0, 3.0, 0.0, 0.0, 0.0]);
        let mut y = up(&[0.0; 6]);
        be.softmax_forward(&x, &mut y, 2, 3, 0.5).unwrap();
        // Row 0: softmax([0.5, 1, 1.5]).
        let e: Vec<f64> = [0.5f64, 1.0, 1.5].iter().map(|v| v.exp()).collect();
        let s: f64 = e.iter().sum();
        let expect: Vec<f32> = e.iter().map(|v| (v / s) as f32).collect();
        assert_close(&y[..3], &expect, 1e-7);
        assert_close(&y[3..], &[1.0 / 3.0; 3], 1e-7);
    }

    #[test]
    fn softmax_forward_is_stable_for_large_inputs() {
        let be = be();
        let x = up(&[1000.0, 1001.0, -1000.0, -1001.0]);
        let mut y = up(&[0.0; 4]);
        be.softmax_forward(&x, &mut y, 2, 2, 1.0).unwrap();
        let a = 1.0 / (1.0 + 1f64.exp()); // e^0 / (e^0 + e^1)
        assert_close(
            &y,
            &[a as f32, (1.0 - a) as f32, (1.0 - a) as f32, a as f32],
            1e-6,
        );
    }

    #[test]
    fn softmax_forward_negative_scale_takes_max_after_scaling() {
        let be = be();
        let x = up(&[1000.0, 0.0]);
        let mut y = up(&[0.0; 2]);
        be.softmax_forward(&x, &mut y, 1, 2, -1.0).unwrap();
        assert_eq!(y, [0.0, 1.0]);
    }

    #[test]
    fn softmax_backward_matches_finite_differences_and_accumulates() {
        let be = be();
        let (rows, cols, scale) = (2, 4, 0.7f32);
        let x: Vec<f32> = vec![0.1, -0.4, 1.3, 0.2, 2.0, -1.0, 0.5, 0.0];
        let dy: Vec<f32> = vec![1.0, -2.0, 0.5, 0.3, -0.2, 0.8, 1.5, -1.1];
        let softmax64 = |row: &[f64]| -> Vec<f64> {
            let m = row.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b));
            let e: Vec<f64> = row.iter().map(|v| (scale as f64 * (v - m)).exp()).collect();
            let s: f64 = e.iter().sum();
            e.iter().map(|v| v / s).collect()
        };
        let objective = |x: &[f64]| -> f64 {
            (0..rows)
                .map(|r| {
                    let y = softmax64(&x[r * cols..(r + 1) * cols]);
                    y.iter()
                        .zip(&dy[r * cols..])
                        .map(|(y, &d)| y * d as f64)
                        .sum::<f64>()
                })
                .sum()
        };
        let x64 = f64s(&x);
        let h = 1e-6;
        let expect: Vec<f32> = (0..rows * cols)
            .map(|i| {
                let (mut a, mut b) = (x64.clone(), x64.clone());
                a[i] += h;
                b[i] -= h;
                (-1.0 + 2.0 * (objective(&a) - objective(&b)) / (2.0 * h)) as f32
            })
            .collect();
        let mut y = be.alloc(rows * cols).unwrap();
        be.softmax_forward(&up(&x), &mut y, rows, cols, scale)
            .unwrap();
        let mut dx = up(&[-1.0; 8]);
        for _ in 0..2 {
            be.softmax_backward(&y, &up(&dy), &mut dx, rows, cols, scale)
                .unwrap();
        }
        assert_close(&dx, &expect, 1e-5);
    }
}

/// Throughput of GELU, its gradient and the softmax on an MLP-sized buffer (a ViT-B `fc1`
/// activation of 1576 rows by 3072 columns; the softmax as rows of 197). Prints ns per element,
/// the best of several repetitions (the machine is shared). Run with
/// `MAE_CPU_THREADS=1 cargo test --release -p mae-backend-cpu -- --ignored --nocapture timing`.
#[cfg(test)]
mod timing {
    use std::time::Instant;

    fn best_ns_per_element(n: usize, mut f: impl FnMut()) -> f64 {
        f();
        let mut best = f64::INFINITY;
        for _ in 0..7 {
            let t = Instant::now();
            f();
            best = best.min(t.elapsed().as_nanos() as f64 / n as f64);
        }
        best
    }

    #[test]
    #[ignore = "a timing, not a check: run it by hand in release"]
    fn timing_gelu_and_softmax() {
        let n = 1576 * 3072;
        let x: Vec<f32> = (0..n)
            .map(|i| ((i % 9973) as f32 - 4986.0) * 1e-3)
            .collect();
        let dy: Vec<f32> = (0..n).map(|i| ((i % 13) as f32 - 6.0) * 0.1).collect();
        let mut y = vec![0.0f32; n];
        let forward = best_ns_per_element(n, || super::gelu_forward(&x, &mut y));
        let backward = best_ns_per_element(n, || super::gelu_backward(&x, &dy, &mut y, true));
        let cols = 197;
        let rows = n / cols;
        let softmax = best_ns_per_element(rows * cols, || {
            super::softmax_forward(&x, &mut y, rows, cols, 0.125)
        });
        println!(
            "ns/element: gelu_forward {forward:.3} gelu_backward {backward:.3} softmax {softmax:.3}"
        );
    }
}
