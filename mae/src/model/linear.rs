//! `y = x W^T + b` with PyTorch's `[out, in]` weights.

use crate::backend::{BResult, Backend, Gemm};
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

/// Where a residual branch adds its output to the residual stream.
pub enum Residual<'a, B: Backend> {
    /// `out += branch(x)`: the stream in place.
    Into(&'a mut B::Buf),
    /// `out = base + branch(x)`: the stream's old value stays in `base` (a block's input, which
    /// its backward reads), and is not copied first ([`Backend::gemm_bias_onto`]).
    Onto {
        /// The stream before the branch.
        base: &'a B::Buf,
        /// The stream after it.
        out: &'a mut B::Buf,
    },
}

/// A residual branch's last Linear layer: `y = x W^T + b` added to the stream as `res` says.
pub fn linear_residual<B: Backend>(
    b: &B,
    x: &B::Buf,
    lin: &Linear<B::Buf>,
    res: Residual<'_, B>,
    rows: usize,
    in_dim: usize,
    out_dim: usize,
) -> BResult<()> {
    let g = linear_gemm(rows, in_dim, out_dim, true);
    match res {
        Residual::Into(out) => b.gemm_bias(&g, x, &lin.weight, &lin.bias, out),
        Residual::Onto { base, out } => b.gemm_bias_onto(&g, x, &lin.weight, &lin.bias, base, out),
    }
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
    b.gemm_bias_grad(&dw, dy, x, &mut grad.weight, &mut grad.bias)
}
