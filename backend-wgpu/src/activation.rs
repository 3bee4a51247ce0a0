//! Exact GELU, the fused bias + GELU epilogue and the attention softmax (`shaders/activation.wgsl`).

use crate::kernel::{grid_1d, word, Kernel};
use crate::per_row::launch_rows;
use crate::{Buf, WgpuBackend};
use mae::backend::BResult;

pub(crate) fn gelu_forward(be: &WgpuBackend, x: &Buf, y: &mut Buf) -> BResult<()> {
    let n = y.len();
    debug_assert!(x.len() >= n);
    be.launch(
        Kernel::GeluForward,
        &[word(n)?],
        &[&x.raw, &y.raw],
        grid_1d(n),
    )
}

/// `pre += bias` per row, then `act = gelu(pre)`, in one pass (one invocation per element).
pub(crate) fn bias_gelu_forward(
    be: &WgpuBackend,
    bias: &Buf,
    pre: &mut Buf,
    act: &mut Buf,
    rows: usize,
    cols: usize,
) -> BResult<()> {
    let n = rows.saturating_mul(cols);
    if n == 0 {
        return Ok(());
    }
    debug_assert!(bias.len() >= cols && pre.len() >= n && act.len() >= n);
    be.launch(
        Kernel::BiasGelu,
        &[word(n)?, word(cols)?],
        &[&bias.raw, &pre.raw, &act.raw],
        grid_1d(n),
    )
}

pub(crate) fn gelu_backward(be: &WgpuBackend, x: &Buf, dy: &Buf, dx: &mut Buf) -> BResult<()> {
    let n = dx.len();
    debug_assert!(x.len() >= n && dy.len() >= n);
    be.launch(
        Kernel::GeluBackward,
        &[word(n)?],
        &[&x.raw, &dy.raw, &dx.raw],
        grid_1d(n),
    )
}

fn row_params(rows: usize, cols: usize, scale: f32) -> BResult<[u32; 3]> {
    word(rows * cols)?;
    Ok([word(rows)?, word(cols)?, scale.to_bits()])
}

pub(crate) fn softmax_forward(
    be: &WgpuBackend,
    x: &Buf,
    y: &mut Buf,
    rows: usize,
    cols: usize,
    scale: f32,
) -> BResult<()> {
    launch_rows(
        be,
        Kernel::SoftmaxForward,
        &row_params(rows, cols, scale)?,
        &[&x.raw, &y.raw],
        rows,
    )
}

pub(crate) fn softmax_backward(
    be: &WgpuBackend,
    y: &Buf,
    dy: &Buf,
    dx: &mut Buf,
    rows: usize,
    cols: usize,
    scale: f32,
) -> BResult<()> {
    launch_rows(
        be,
        Kernel::SoftmaxBackward,
        &row_params(rows, cols, scale)?,
        &[&y.raw, &dy.raw, &dx.raw],
        rows,
    )
}
