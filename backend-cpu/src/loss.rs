//! The masked reconstruction loss: the per-patch MSE averaged over the removed patches only.

use crate::pool::{chunks1, rows_per_chunk};
use crate::reduce::fold2;

/// Squared error of one row, in `f64` (the difference too, so it is exact).
#[inline(always)]
fn row_sse(pred: &[f32], target: &[f32]) -> f64 {
    fold2(pred, target, |p, t| {
        let d = p as f64 - t as f64;
        d * d
    })
}

/// `sum_r mask[r]`, in ascending rows, shared by forward and backward so both divide by the same
/// number.
fn mask_sum(mask: &[f32]) -> f64 {
    mask.iter().fold(0.0, |s, &m| s + m as f64)
}

/// `sum_r mask[r] * mean_c (pred - target)^2 / sum_r mask[r]`, accumulated in `f64` in ascending
/// rows. An all-zero mask gives 0 / 0 = NaN, as PyTorch's `(loss * mask).sum() / mask.sum()`.
pub(crate) fn masked_mse_forward(
    pred: &[f32],
    target: &[f32],
    mask: &[f32],
    loss: &mut [f32],
    rows: usize,
    cols: usize,
) {
    let mut num = 0.0f64;
    for (r, &m) in mask[..rows].iter().enumerate() {
        let span = r * cols..(r + 1) * cols;
        num += m as f64 * (row_sse(&pred[span.clone()], &target[span]) / cols as f64);
    }
    loss[0] = (num / mask_sum(&mask[..rows])) as f32;
}

/// `d_pred += d_loss * mask[r] * 2 (pred - target) / (cols * sum(mask))`. Rows with mask 0 are
/// not skipped, so a non-finite prediction there gives NaN exactly where PyTorch's would.
pub(crate) fn masked_mse_backward(
    pred: &[f32],
    target: &[f32],
    mask: &[f32],
    d_pred: &mut [f32],
    rows: usize,
    cols: usize,
    d_loss: f32,
) {
    let coef = d_loss as f64 * 2.0 / (cols as f64 * mask_sum(&mask[..rows]));
    if cols == 0 {
        return;
    }
    let rpc = rows_per_chunk(cols);
    chunks1(&mut d_pred[..rows * cols], rpc * cols, |i, dc| {
        for (r, dr) in dc.chunks_exact_mut(cols).enumerate() {
            let row = i * rpc + r;
            let span = row * cols..(row + 1) * cols;
            let k = coef * mask[row] as f64;
            let (pr, tr) = (&pred[span.clone()], &target[span]);
            for ((o, &p), &t) in dr.iter_mut().zip(pr).zip(tr) {
                *o = (*o as f64 + k * (p as f64 - t as f64)) as f32;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use crate::test_util::*;
    use mae::backend::Backend;

    // 3 rows of 2: squared errors per row 1 + 4, 9 + 0, 0.25 + 0.25; mask keeps rows 0 and 2.
    const PRED: [f32; 6] = [1.0, 2.0, 3.0, 0.0, 0.5, -0.5];
    const TARGET: [f32; 6] = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
    const MASK: [f32; 3] = [1.0, 0.0, 1.0];

    #[test]
    fn masked_mse_forward_by_hand() {
        let be = be();
        let mut loss = up(&[f32::NAN]);
        be.masked_mse_forward(&up(&PRED), &up(&TARGET), &up(&MASK), &mut loss, 3, 2)
            .unwrap();
        // (mean(1, 4) + mean(0.25, 0.25)) / 2 = (2.5 + 0.25) / 2
        assert_eq!(loss, [1.375]);
    }

    #[test]
    fn masked_mse_forward_weights_rows_by_mask_value() {
        let be = be();
        let mut loss = up(&[0.0]);
        let mask = up(&[0.5, 1.0, 0.0]);
        be.masked_mse_forward(&up(&PRED), &up(&TARGET), &mask, &mut loss, 3, 2)
            .unwrap();
        assert_eq!(loss, [(0.5 * 2.5 + 4.5) / 1.5]);
    }

    #[test]
    fn masked_mse_forward_all_zero_mask_is_nan() {
        let be = be();
        let mut loss = up(&[0.0]);
        be.masked_mse_forward(&up(&PRED), &up(&TARGET), &up(&[0.0; 3]), &mut loss, 3, 2)
            .unwrap();
        assert!(loss[0].is_nan());
    }

    #[test]
    fn masked_mse_backward_by_hand_and_accumulates() {
        // d/dpred = d_loss * mask[r] * 2 (pred - target) / (cols * sum(mask)) = d_loss * mask * diff / 2.
        let be = be();
        let mut d = up(&[1.0; 6]);
        for _ in 0..2 {
            be.masked_mse_backward(&up(&PRED), &up(&TARGET), &up(&MASK), &mut d, 3, 2, 0.5)
                .unwrap();
        }
        let expect: Vec<f32> = PRED
            .iter()
            .enumerate()
            .map(|(i, &p)| 1.0 + 2.0 * 0.5 * MASK[i / 2] * p / 2.0)
            .collect();
        assert_eq!(d, expect);
    }

    #[test]
    fn masked_mse_backward_matches_finite_differences() {
        let be = be();
        let (rows, cols) = (3, 4);
        let pred: Vec<f32> = (0..12).map(|i| (i as f32 * 0.37).sin()).collect();
        let target: Vec<f32> = (0..12).map(|i| (i as f32 * 0.11).cos()).collect();
        let mask = [1.0f32, 0.0, 1.0];
        let loss64 = |p: &[f64]| -> f64 {
            let num: f64 = (0..rows)
                .map(|r| {
                    let mse = (0..cols)
                        .map(|c| (p[r * cols + c] - target[r * cols + c] as f64).powi(2))
                        .sum::<f64>()
                        / cols as f64;
                    mask[r] as f64 * mse
                })
                .sum();
            num / mask.iter().map(|&m| m as f64).sum::<f64>()
        };
        let p64 = f64s(&pred);
        let h = 1e-6;
        let expect: Vec<f32> = (0..12)
            .map(|i| {
                let (mut a, mut b) = (p64.clone(), p64.clone());
                a[i] += h;
                b[i] -= h;
                (0.25 * (loss64(&a) - loss64(&b)) / (2.0 * h)) as f32
            })
            .collect();
        let mut d = be.alloc(12).unwrap();
        be.masked_mse_backward(
            &up(&pred),
            &up(&target),
            &up(&mask),
            &mut d,
            rows,
            cols,
            0.25,
        )
        .unwrap();
        assert_close(&d, &expect, 1e-6);
        let mut loss = up(&[0.0]);
        be.masked_mse_forward(&up(&pred), &up(&target), &up(&mask), &mut loss, rows, cols)
            .unwrap();
        assert_close(&loss, &[loss64(&p64) as f32], 1e-7);
    }
}
