//! The masked MSE loss (`shaders/loss.wgsl`).

use crate::kernel::{grid_1d, word, Kernel};
use crate::{Buf, WgpuBackend};
use mae::backend::BResult;

fn params(rows: usize, cols: usize, d_loss: f32) -> BResult<[u32; 3]> {
    word(rows * cols)?;
    Ok([word(rows)?, word(cols)?, d_loss.to_bits()])
}

/// One workgroup reduces everything (see the shader), so the launch is a single group.
pub(crate) fn masked_mse_forward(
    be: &WgpuBackend,
    pred: &Buf,
    target: &Buf,
    mask: &Buf,
    loss: &mut Buf,
    rows: usize,
    cols: usize,
) -> BResult<()> {
    be.launch(
        Kernel::MseForward,
        &params(rows, cols, 0.0)?,
        &[&pred.raw, &target.raw, &mask.raw, &loss.raw],
        [1, 1, 1],
    )
}

/// The coefficient `d_loss * 2 / (cols * sum(mask))` goes through a one-float scratch buffer,
/// then every element is updated in parallel.
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
