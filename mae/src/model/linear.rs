//! `y = x W^T + b` with PyTorch's `[out, in]` weights.

use crate::backend::{BResult, Backend, Gemm, RowMap};
use crate::params::Linear;

/// `y = x W^T + b` over `rows` rows; with `accumulate`, `y += x W^T + b` (a residual branch).
/// The bias is added by the product's epilogue ([`Backend::gemm_bias`]).
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
    b.gemm_bias(
        &linear_gemm(rows, in_dim, out_dim, accumulate),
        x,
        &lin.weight,
        &lin.bias,
        y,
    )
}

/// The product `x W^T` of a Linear with PyTorch's `[out, in]` weights (`y += x W^T` with
/// `accumulate`).
pub fn linear_gemm(rows: usize, in_dim: usize, out_dim: usize, accumulate: bool) -> Gemm {
    let g = Gemm::new(rows, out_dim, in_dim).trans_b();
    if accumulate {
        g.accumulate()
    } else {
        g
    }
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
