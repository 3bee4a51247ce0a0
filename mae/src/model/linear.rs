//! `y = x W^T + b` with PyTorch's `[out, in]` weights.

use crate::backend::{BResult, Backend, Gemm, RowMap};
use crate::params::Linear;

/// `y = x W^T + b` over `rows` rows; with `accumulate`, `y += x W^T + b` (a residual branch).
pub fn linear_forward<B: Backend>(
    b: &B,
    x: &B::Buf,
    lin: &Linear<B::Buf>,
    y: &mut B::Buf,
    rows: usize,
    in_dim: usize,
    out_dim: usize,
    accumulate: bool,
) -> BResult<()> {
    linear_matmul(b, x, lin, y, rows, in_dim, out_dim, accumulate)?;
    b.copy_rows(&lin.bias, y, &RowMap::bias(rows, out_dim), true)
}

/// `y = x W^T` without the bias (`y += x W^T` with `accumulate`): for a caller that adds the
/// bias in a fused epilogue, as the MLP's `fc1` does with [`Backend::bias_gelu_forward`].
pub fn linear_matmul<B: Backend>(
    b: &B,
    x: &B::Buf,
    lin: &Linear<B::Buf>,
    y: &mut B::Buf,
    rows: usize,
    in_dim: usize,
    out_dim: usize,
    accumulate: bool,
) -> BResult<()> {
    let mut g = Gemm::new(rows, out_dim, in_dim).trans_b();
    if accumulate {
        g = g.accumulate();
    }
    b.gemm(&g, x, &lin.weight, y)
}

/// Accumulates `dW += dy^T x`, `db += sum_rows dy`; overwrites `dx = dy W` when asked.
pub fn linear_backward<B: Backend>(
    b: &B,
    dy: &B::Buf,
    x: &B::Buf,
    lin: &Linear<B::Buf>,
    grad: &mut Linear<B::Buf>,
    dx: Option<&mut B::Buf>,
    rows: usize,
    in_dim: usize,
    out_dim: usize,
) -> BResult<()> {
    if let Some(dx) = dx {
        b.gemm(&Gemm::new(rows, in_dim, out_dim), dy, &lin.weight, dx)?;
    }
    let dw = Gemm::new(out_dim, in_dim, rows).trans_a().accumulate();
    b.gemm(&dw, dy, x, &mut grad.weight)?;
    b.copy_rows_backward(dy, &mut grad.bias, &RowMap::bias(rows, out_dim))
}
