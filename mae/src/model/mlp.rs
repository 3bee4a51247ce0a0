//! The block's MLP: `fc2(GELU(fc1(x)))`, exact-erf GELU.

use super::linear::{linear_backward, linear_gemm, linear_residual, Residual};
use super::StackDims;
use crate::backend::{BResult, Backend};
use crate::params::Linear;

/// What one MLP keeps for its backward.
pub struct MlpActs<B: Backend> {
    /// `fc1` output before the activation, `[rows, hidden]`: read by the GELU and its gradient,
    /// which take it rounded to bf16 where a backend keeps it so ([`Backend::alloc_operand`]).
    pub pre: B::Buf,
    /// After GELU: the input of `fc2`, read by nothing else ([`Backend::alloc_operand`]).
    pub act: B::Buf,
}

/// Gradient buffers shared by the MLPs of a stack.
pub struct MlpScratch<B: Backend> {
    /// Gradient of `act`: read only by the GELU gradient ([`Backend::alloc_operand`]).
    pub d_act: B::Buf,
    /// Gradient of `pre`: read only by fc1's GEMMs and bias gradient ([`Backend::alloc_operand`]).
    pub d_pre: B::Buf,
}

impl<B: Backend> MlpActs<B> {
    /// Buffers for one layer.
    pub fn new(b: &B, d: &StackDims) -> BResult<Self> {
        Ok(MlpActs {
            pre: b.alloc_operand(d.rows() * d.hidden)?,
            // Read only by fc2's GEMMs (forward and weight gradient).
            act: b.alloc_operand(d.rows() * d.hidden)?,
        })
    }
}

impl<B: Backend> MlpScratch<B> {
    /// Buffers for a stack's backward.
    pub fn new(b: &B, d: &StackDims) -> BResult<Self> {
        Ok(MlpScratch {
            d_act: b.alloc_operand(d.rows() * d.hidden)?,
            d_pre: b.alloc_operand(d.rows() * d.hidden)?,
        })
    }
}

/// Adds `fc2(GELU(fc1(x)))` to the residual stream `out`; `fc1`'s bias and the GELU are the
/// epilogue of its product ([`Backend::gemm_bias_gelu`]).
pub fn mlp_forward<B: Backend>(
    b: &B,
    x: &B::Buf,
    fc1: &Linear<B::Buf>,
    fc2: &Linear<B::Buf>,
    acts: &mut MlpActs<B>,
    out: Residual<'_, B>,
    d: &StackDims,
) -> BResult<()> {
    let (rows, hidden) = (d.rows(), d.hidden);
    let g = linear_gemm(rows, d.dim, hidden, false);
    b.gemm_bias_gelu(&g, x, &fc1.weight, &fc1.bias, &mut acts.pre, &mut acts.act)?;
    linear_residual(b, &acts.act, fc2, out, rows, hidden, d.dim)
}

/// Accumulates the parameter gradients; overwrites `dx`, the gradient of the input `x`.
pub fn mlp_backward<B: Backend>(
    b: &B,
    d_out: &B::Buf,
    x: &B::Buf,
    fc1: &Linear<B::Buf>,
    fc2: &Linear<B::Buf>,
    g_fc1: &mut Linear<B::Buf>,
    g_fc2: &mut Linear<B::Buf>,
    acts: &MlpActs<B>,
    s: &mut MlpScratch<B>,
    dx: &mut B::Buf,
    d: &StackDims,
) -> BResult<()> {
    let (r, dim, hidden) = (d.rows(), d.dim, d.hidden);
    linear_backward(
        b,
        d_out,
        &acts.act,
        fc2,
        g_fc2,
        Some(&mut s.d_act),
        r,
        hidden,
        dim,
    )?;
    b.gelu_backward(&acts.pre, &s.d_act, &mut s.d_pre, false)?;
    linear_backward(b, &s.d_pre, x, fc1, g_fc1, Some(dx), r, dim, hidden)
}
