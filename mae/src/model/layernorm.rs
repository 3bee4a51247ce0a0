//! LayerNorm (biased variance, PyTorch semantics) and what its backward needs.

use crate::backend::{BResult, Backend};
use crate::params::Norm;

/// Output and saved statistics of one LayerNorm.
pub struct NormActs<B: Backend> {
    /// Normalized output `[rows, cols]`.
    pub y: B::Buf,
    /// Row means.
    pub mean: B::Buf,
    /// Row reciprocal standard deviations.
    pub rstd: B::Buf,
}

impl<B: Backend> NormActs<B> {
    /// Buffers for `rows` rows of `cols`.
    pub fn new(b: &B, rows: usize, cols: usize) -> BResult<Self> {
        Ok(NormActs {
            y: b.alloc(rows * cols)?,
            mean: b.alloc(rows)?,
            rstd: b.alloc(rows)?,
        })
    }

    /// [`NormActs::new`] for a LayerNorm whose output only a Linear layer reads (a block's
    /// `norm1` and `norm2`, before qkv and fc1): `y` from [`Backend::alloc_operand`].
    pub fn before_linear(b: &B, rows: usize, cols: usize) -> BResult<Self> {
        Ok(NormActs {
            y: b.alloc_operand(rows * cols)?,
            mean: b.alloc(rows)?,
            rstd: b.alloc(rows)?,
        })
    }
}

/// `acts.y = LayerNorm(x)`.
pub fn layernorm_forward<B: Backend>(
    b: &B,
    x: &B::Buf,
    norm: &Norm<B::Buf>,
    acts: &mut NormActs<B>,
    rows: usize,
    cols: usize,
    eps: f32,
) -> BResult<()> {
    let NormActs { y, mean, rstd } = acts;
    b.layernorm_forward(x, &norm.weight, &norm.bias, y, mean, rstd, rows, cols, eps)
}

/// Accumulates into `dx` and the LayerNorm's parameter gradients.
pub fn layernorm_backward<B: Backend>(
    b: &B,
    dy: &B::Buf,
    x: &B::Buf,
    norm: &Norm<B::Buf>,
    acts: &NormActs<B>,
    grad: &mut Norm<B::Buf>,
    dx: &mut B::Buf,
    rows: usize,
    cols: usize,
) -> BResult<()> {
    b.layernorm_backward(
        dy,
        x,
        &norm.weight,
        &acts.mean,
        &acts.rstd,
        dx,
        &mut grad.weight,
        &mut grad.bias,
        rows,
        cols,
    )
}
