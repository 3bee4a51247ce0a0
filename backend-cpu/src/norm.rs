//! LayerNorm forward and backward, and the per-row standardization of the norm-pix loss target.
//!
//! Row statistics are two-pass (mean, then squared deviations from it) in `f64`: the one-pass
//! `E[x^2] - E[x]^2` form loses most digits when a row's mean is large against its spread.

use crate::fastmath::wide;
use crate::pool::{chunks1, chunks2, chunks3, rows_per_chunk};
use crate::reduce::{col_block, fold1, fold2, fold3, sum, COL_BLOCK};

/// Mean and the sum of squared deviations of one row, in `f64`.
#[inline(always)]
fn mean_and_ssd(row: &[f32]) -> (f64, f64) {
    let mean = sum(row) / row.len() as f64;
    let ssd = fold1(row, |x| {
        let d = x as f64 - mean;
        d * d
    });
    (mean, ssd)
}

/// `y` is computed from the `f32` `mean` and `rstd` it stores, so the backward's `xhat` is
/// bitwise the forward's. Rows are independent, so they are split over the pool's threads.
pub(crate) fn layernorm_forward(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    y: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    rows: usize,
    cols: usize,
    eps: f32,
) {
    if cols == 0 {
        return;
    }
    let (gamma, beta) = (&gamma[..cols], &beta[..cols]);
    let rpc = rows_per_chunk(cols);
    let (y, mean, rstd) = (&mut y[..rows * cols], &mut mean[..rows], &mut rstd[..rows]);
    let n = rows.div_ceil(rpc);
    chunks3(
        n,
        (y, rpc * cols),
        (mean, rpc),
        (rstd, rpc),
        |i, yc, mc, rc| {
            wide(
                #[inline(always)]
                || {
                    for (r, yr) in yc.chunks_exact_mut(cols).enumerate() {
                        let row = i * rpc + r;
                        let xr = &x[row * cols..(row + 1) * cols];
                        let (m, ssd) = mean_and_ssd(xr);
                        let var = ssd / cols as f64;
                        let (m, rs) = (m as f32, (1.0 / (var + eps as f64).sqrt()) as f32);
                        mc[r] = m;
                        rc[r] = rs;
                        for (((o, &v), &g), &b) in yr.iter_mut().zip(xr).zip(gamma).zip(beta) {
                            *o = (v - m) * rs * g + b;
                        }
                    }
                },
            )
        },
    );
}

/// llm.c's formula: with `dnorm = dy * gamma` and `xhat = (x - mean) * rstd`,
/// `dx += rstd * (dnorm - mean(dnorm) - xhat * mean(dnorm * xhat))`. The two row means are
/// `f64` sums. `dgamma` and `dbeta` are column sums over all rows, taken in a second pass by column
/// blocks so each column's sum runs in `f64` over rows in ascending order without a heap buffer;
/// rows (first pass) and column blocks (second pass) are split over the pool's threads, which
/// changes no summation order.
pub(crate) fn layernorm_backward(
    dy: &[f32],
    x: &[f32],
    gamma: &[f32],
    mean: &[f32],
    rstd: &[f32],
    dx: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
    rows: usize,
    cols: usize,
) {
    if cols == 0 {
        return;
    }
    let gamma = &gamma[..cols];
    let n = cols as f64;
    let rpc = rows_per_chunk(cols);
    chunks1(&mut dx[..rows * cols], rpc * cols, |i, dxc| {
        wide(
            #[inline(always)]
            || {
                for (r, dxr) in dxc.chunks_exact_mut(cols).enumerate() {
                    let row = i * rpc + r;
                    let span = row * cols..(row + 1) * cols;
                    let (dyr, xr) = (&dy[span.clone()], &x[span]);
                    let (m, rs) = (mean[row], rstd[row]);
                    let mean_dnorm = (fold2(dyr, gamma, |d, g| (d * g) as f64) / n) as f32;
                    let mean_dnorm_xhat =
                        (fold3(dyr, gamma, xr, |d, g, v| ((d * g) * ((v - m) * rs)) as f64) / n)
                            as f32;
                    for (((o, &d), &g), &v) in dxr.iter_mut().zip(dyr).zip(gamma).zip(xr) {
                        let xhat = (v - m) * rs;
                        *o += rs * (d * g - mean_dnorm - xhat * mean_dnorm_xhat);
                    }
                }
            },
        )
    });
    let w = col_block(cols);
    let (dgamma, dbeta) = (&mut dgamma[..cols], &mut dbeta[..cols]);
    chunks2(cols.div_ceil(w), dgamma, w, dbeta, w, |bi, dg, db| {
        wide(
            #[inline(always)]
            || {
                let (c0, w) = (bi * w, dg.len());
                let mut acc_g = [0.0f64; COL_BLOCK];
                let mut acc_b = [0.0f64; COL_BLOCK];
                let (acc_g, acc_b) = (&mut acc_g[..w], &mut acc_b[..w]);
                for r in 0..rows {
                    let (m, rs) = (mean[r], rstd[r]);
                    let off = r * cols + c0;
                    let (dyr, xr) = (&dy[off..off + w], &x[off..off + w]);
                    let accs = acc_g.iter_mut().zip(acc_b.iter_mut());
                    for (((ag, ab), &d), &v) in accs.zip(dyr).zip(xr) {
                        *ag += (d * ((v - m) * rs)) as f64;
                        *ab += d as f64;
                    }
                }
                for (o, &a) in dg.iter_mut().zip(acc_g.iter()) {
                    *o = (*o as f64 + a) as f32;
                }
                for (o, &a) in db.iter_mut().zip(acc_b.iter()) {
                    *o = (*o as f64 + a) as f32;
                }
            },
        )
    });
}

/// The official `(target - mean) / (var + eps) ** 0.5` with `var` unbiased (`torch.var`'s
/// default), all in `f64` and rounded once. `cols == 1` gives NaN (0 / 0), as PyTorch does.
pub(crate) fn normalize_rows(x: &[f32], y: &mut [f32], rows: usize, cols: usize, eps: f32) {
    if cols == 0 {
        return;
    }
    let rpc = rows_per_chunk(cols);
    chunks1(&mut y[..rows * cols], rpc * cols, |i, yc| {
        for (r, yr) in yc.chunks_exact_mut(cols).enumerate() {
            let row = i * rpc + r;
            let xr = &x[row * cols..(row + 1) * cols];
            let (m, ssd) = mean_and_ssd(xr);
            let std = (ssd / (cols as f64 - 1.0) + eps as f64).sqrt();
            for (o, &v) in yr.iter_mut().zip(xr) {
                *o = ((v as f64 - m) / std) as f32;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use crate::test_util::*;
    use mae::backend::Backend;

    /// LayerNorm of one row in f64, straight from the definition.
    fn ln_row(x: &[f64], g: &[f64], b: &[f64], eps: f64) -> Vec<f64> {
        let n = x.len() as f64;
        let m = x.iter().sum::<f64>() / n;
        let var = x.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / n;
        x.iter()
            .zip(g.iter().zip(b))
            .map(|(v, (g, b))| (v - m) / (var + eps).sqrt() * g + b)
            .collect()
    }

    #[test]
    fn layernorm_forward_by_hand() {
        // Row [1, 2, 3, 4]: mean 2.5, biased var 1.25. Row [2, 2, 2, 2]: var 0, so y = beta.
        let be = be();
        let x = up(&[1.0, 2.0, 3.0, 4.0, 2.0, 2.0, 2.0, 2.0]);
        let (g, b) = (up(&[1.0, 2.0, 1.0, 0.5]), up(&[0.0, 0.0, 1.0, -1.0]));
        let (mut y, mut mean, mut rstd) = (up(&[f32::NAN; 8]), up(&[0.0; 2]), up(&[0.0; 2]));
        be.layernorm_forward(&x, &g, &b, &mut y, &mut mean, &mut rstd, 2, 4, 1e-5)
            .unwrap();
        let s = 1.0 / (1.25f64 + 1e-5).sqrt();
        let expect = [-1.5 * s, -0.5 * s * 2.0, 0.5 * s + 1.0, 1.5 * s * 0.5 - 1.0];
        assert_close(&y[..4], &expect.map(|v| v as f32), 1e-6);
        assert_eq!(&y[4..], &[0.0, 0.0, 1.0, -1.0]);
        assert_eq!(mean, [2.5, 2.0]);
        assert_close(&rstd[..1], &[s as f32], 1e-7);
        assert_close(&rstd[1..], &[(1.0 / 1e-5f64.sqrt()) as f32], 1e-7);
    }

    #[test]
    fn layernorm_forward_matches_f64_definition_with_large_mean() {
        let be = be();
        let (rows, cols, eps) = (3, 37, 1e-6);
        let x: Vec<f32> = (0..rows * cols)
            .map(|i| 1000.0 + ((i * 13 % 29) as f32) * 0.01)
            .collect();
        let g: Vec<f32> = (0..cols).map(|i| 0.5 + i as f32 / cols as f32).collect();
        let b: Vec<f32> = (0..cols).map(|i| i as f32 * 0.1 - 1.0).collect();
        let (mut y, mut mean, mut rstd) = (
            be.alloc(rows * cols).unwrap(),
            be.alloc(rows).unwrap(),
            be.alloc(rows).unwrap(),
        );
        be.layernorm_forward(
            &up(&x),
            &up(&g),
            &up(&b),
            &mut y,
            &mut mean,
            &mut rstd,
            rows,
            cols,
            eps,
        )
        .unwrap();
        let (g64, b64) = (f64s(&g), f64s(&b));
        for r in 0..rows {
            let expect = ln_row(&f64s(&x[r * cols..(r + 1) * cols]), &g64, &b64, eps as f64);
            // x carries ~6e-5 absolute rounding at 1000, i.e. ~1e-3 of the row's spread.
            assert_close(&y[r * cols..(r + 1) * cols], &f32s(&expect), 2e-3);
        }
    }

    #[test]
    fn layernorm_backward_matches_finite_differences_and_accumulates() {
        let be = be();
        let (rows, cols, eps) = (2, 5, 1e-5);
        let x: Vec<f32> = vec![0.3, -1.2, 2.0, 0.7, -0.4, 1.5, 1.1, -0.2, 0.9, -2.1];
        let g: Vec<f32> = vec![1.0, 0.5, -1.5, 2.0, 0.8];
        let b: Vec<f32> = vec![0.1, 0.2, 0.3, 0.4, 0.5];
        let dy: Vec<f32> = vec![0.2, -0.5, 1.0, 0.3, -0.7, 1.2, 0.4, -0.9, 0.6, 0.1];
        // Objective L = sum(dy * LN(x)), differentiated numerically in f64.
        let objective = |x: &[f64], g: &[f64], b: &[f64]| -> f64 {
            (0..rows)
                .map(|r| {
                    let y = ln_row(&x[r * cols..(r + 1) * cols], g, b, eps);
                    y.iter()
                        .zip(&dy[r * cols..])
                        .map(|(y, &d)| y * d as f64)
                        .sum::<f64>()
                })
                .sum()
        };
        let (x64, g64, b64) = (f64s(&x), f64s(&g), f64s(&b));
        let h = 1e-6;
        let numeric = |which: usize, i: usize| {
            let mut args = [x64.clone(), g64.clone(), b64.clone()];
            args[which][i] += h;
            let up = objective(&args[0], &args[1], &args[2]);
            args[which][i] -= 2.0 * h;
            let down = objective(&args[0], &args[1], &args[2]);
            (up - down) / (2.0 * h)
        };
        let want_dx: Vec<f64> = (0..rows * cols).map(|i| numeric(0, i)).collect();
        let want_dg: Vec<f64> = (0..cols).map(|i| numeric(1, i)).collect();
        let want_db: Vec<f64> = (0..cols).map(|i| numeric(2, i)).collect();

        let (mut y, mut mean, mut rstd) = (
            be.alloc(10).unwrap(),
            be.alloc(2).unwrap(),
            be.alloc(2).unwrap(),
        );
        let (xb, gb) = (up(&x), up(&g));
        be.layernorm_forward(
            &xb,
            &gb,
            &up(&b),
            &mut y,
            &mut mean,
            &mut rstd,
            rows,
            cols,
            eps as f32,
        )
        .unwrap();
        let (mut dx, mut dg, mut db) = (up(&[1.0; 10]), up(&[1.0; 5]), up(&[1.0; 5]));
        for _ in 0..2 {
            be.layernorm_backward(
                &up(&dy),
                &xb,
                &gb,
                &mean,
                &rstd,
                &mut dx,
                &mut dg,
                &mut db,
                rows,
                cols,
            )
            .unwrap();
        }
        let twice_plus_one = |v: &[f64]| f32s(&v.iter().map(|g| 1.0 + 2.0 * g).collect::<Vec<_>>());
        assert_close(&dx, &twice_plus_one(&want_dx), 1e-5);
        assert_close(&dg, &twice_plus_one(&want_dg), 1e-5);
        assert_close(&db, &twice_plus_one(&want_db), 1e-5);
    }

    #[test]
    fn layernorm_backward_wide_rows_cross_column_blocks() {
        // dbeta is the plain column sum of dy, dgamma the column sum of dy * xhat: 300 columns
        // span two column blocks.
        let be = be();
        let (rows, cols) = (3, 300);
        let x: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7 % 23) as f32) - 11.0)
            .collect();
        let dy: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 5 % 9) as f32) - 4.0)
            .collect();
        let ones = up(&vec![1.0; cols]);
        let (mut y, mut mean, mut rstd) = (
            be.alloc(rows * cols).unwrap(),
            be.alloc(rows).unwrap(),
            be.alloc(rows).unwrap(),
        );
        let xb = up(&x);
        be.layernorm_forward(
            &xb,
            &ones,
            &be.alloc(cols).unwrap(),
            &mut y,
            &mut mean,
            &mut rstd,
            rows,
            cols,
            1e-6,
        )
        .unwrap();
        let (mut dx, mut dg, mut db) = (
            be.alloc(rows * cols).unwrap(),
            be.alloc(cols).unwrap(),
            be.alloc(cols).unwrap(),
        );
        be.layernorm_backward(
            &up(&dy),
            &xb,
            &ones,
            &mean,
            &rstd,
            &mut dx,
            &mut dg,
            &mut db,
            rows,
            cols,
        )
        .unwrap();
        for c in 0..cols {
            let want_b: f64 = (0..rows).map(|r| dy[r * cols + c] as f64).sum();
            let want_g: f64 = (0..rows)
                .map(|r| dy[r * cols + c] as f64 * y[r * cols + c] as f64)
                .sum();
            assert_eq!(db[c] as f64, want_b, "dbeta column {c}");
            assert!(
                (dg[c] as f64 - want_g).abs() <= 1e-5 * (1.0 + want_g.abs()),
                "dgamma column {c}"
            );
        }
    }

    #[test]
    fn normalize_rows_uses_unbiased_variance() {
        // Row [1, 2, 3, 4]: mean 2.5, unbiased var 5/3.
        let be = be();
        let mut y = up(&[0.0; 8]);
        let x = up(&[1.0, 2.0, 3.0, 4.0, -3.0, -3.0, -3.0, -3.0]);
        be.normalize_rows(&x, &mut y, 2, 4, 1e-6).unwrap();
        let s = (5.0f64 / 3.0 + 1e-6).sqrt();
        let expect = [-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s].map(|v| v as f32);
        assert_close(&y[..4], &expect, 1e-7);
        assert_eq!(&y[4..], &[0.0; 4]); // constant row: 0 / sqrt(eps)
    }
}
