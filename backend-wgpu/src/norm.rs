//! LayerNorm and the norm-pix target (`shaders/norm.wgsl`).

use crate::columns;
use crate::kernel::{word, Kernel};
use crate::per_row::launch_rows;
use crate::{Buf, WgpuBackend};
use mae::backend::BResult;

fn params(rows: usize, cols: usize, eps: f32) -> BResult<[u32; 3]> {
    word(rows * cols)?;
    Ok([word(rows)?, word(cols)?, eps.to_bits()])
}

pub(crate) fn layernorm_forward(
    be: &WgpuBackend,
    x: &Buf,
    gamma: &Buf,
    beta: &Buf,
    y: &mut Buf,
    mean: &mut Buf,
    rstd: &mut Buf,
    rows: usize,
    cols: usize,
    eps: f32,
) -> BResult<()> {
    launch_rows(
        be,
        Kernel::LayerNormForward,
        &params(rows, cols, eps)?,
        &[&x.raw, &gamma.raw, &beta.raw, &y.raw, &mean.raw, &rstd.raw],
        rows,
    )
}

/// `dx` per row, then `dgamma` and `dbeta` as column sums in two passes (`columns.rs`).
pub(crate) fn layernorm_backward(
    be: &WgpuBackend,
    dy: &Buf,
    x: &Buf,
    gamma: &Buf,
    mean: &Buf,
    rstd: &Buf,
    dx: &mut Buf,
    dgamma: &mut Buf,
    dbeta: &mut Buf,
    rows: usize,
    cols: usize,
) -> BResult<()> {
    let p = params(rows, cols, 0.0)?;
    launch_rows(
        be,
        Kernel::LayerNormBackwardRows,
        &p,
        &[&dy.raw, &x.raw, &gamma.raw, &mean.raw, &rstd.raw, &dx.raw],
        rows,
    )?;
    columns::layernorm_params(be, [dy, x, mean, rstd], dgamma, dbeta, rows, cols)
}

pub(crate) fn normalize_rows(
    be: &WgpuBackend,
    x: &Buf,
    y: &mut Buf,
    rows: usize,
    cols: usize,
    eps: f32,
) -> BResult<()> {
    launch_rows(
        be,
        Kernel::NormalizeRows,
        &params(rows, cols, eps)?,
        &[&x.raw, &y.raw],
        rows,
    )
}
