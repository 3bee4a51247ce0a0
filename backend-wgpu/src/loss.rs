//! The masked MSE loss (`shaders/loss.wgsl`).

use crate::buffer;
use crate::kernel::{grid_1d, word, Kernel};
use crate::per_row::launch_rows;
use crate::{Buf, WgpuBackend};
use mae::backend::BResult;

fn params(rows: usize, cols: usize, d_loss: f32) -> BResult<[u32; 3]> {
    word(rows * cols)?;
    Ok([word(rows)?, word(cols)?, d_loss.to_bits()])
}

/// Each row's mean squared error into a scratch buffer (in parallel over rows), then one
/// workgroup adds the masked errors. The first version was that workgroup alone, each of its
/// invocations walking whole rows: 11 ms a call on an H200 (docs/results-gpu.md).
pub(crate) fn masked_mse_forward(
    be: &WgpuBackend,
    pred: &Buf,
    target: &Buf,
    mask: &Buf,
    loss: &mut Buf,
    rows: usize,
    cols: usize,
) -> BResult<()> {
    let p = params(rows, cols, 0.0)?;
    let row_err: Buf = buffer::alloc(&be.gpu, rows)?;
    launch_rows(
        be,
        Kernel::MseRows,
        &p,
        &[&pred.raw, &target.raw, &row_err.raw],
        rows,
    )?;
    be.launch(
        Kernel::MseForward,
        &p,
        &[&row_err.raw, &mask.raw, &loss.raw],
        [1, 1, 1],
    )
}

/// The coefficient `d_loss * 2 / (cols * sum(mask))` goes through a one-float scratch buffer
/// (one workgroup sums the mask), then every element is updated in parallel.
pub(crate) fn masked_mse_backward(
    be: &WgpuBackend,
    pred: &Buf,
    target: &Buf,
    mask: &Buf,
    d_pred: &mut Buf,
    rows: usize,
    cols: usize,
    d_loss: f32,
) -> BResult<()> {
    let p = params(rows, cols, d_loss)?;
    let coef = be.scratch()?;
    be.launch(
        Kernel::MseCoefficient,
        &p,
        &[&mask.raw, &coef.raw],
        [1, 1, 1],
    )?;
    be.launch(
        Kernel::MseBackward,
        &p,
        &[&pred.raw, &target.raw, &mask.raw, &coef.raw, &d_pred.raw],
        grid_1d(rows * cols),
    )
}
