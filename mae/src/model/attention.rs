//! Multi-head self-attention as timm 0.3.2 computes it: fused qkv projection, per-head
//! `softmax(q k^T * head_dim^-0.5) v`, heads concatenated, output projection.

use super::linear::{linear_backward, linear_forward};
use super::StackDims;
use crate::backend::{BResult, Backend, Gemm, Heads};
use crate::params::Linear;

/// What one attention layer keeps for its backward.
pub struct AttentionActs<B: Backend> {
    /// `[N, H, T, hd]`.
    pub q: B::Buf,
    /// `[N, H, T, hd]`.
    pub k: B::Buf,
    /// `[N, H, T, hd]`.
    pub v: B::Buf,
    /// Attention probabilities `[N, H, T, T]`.
    pub att: B::Buf,
    /// Heads concatenated `[rows, D]`: the input of `proj`.
    pub merged: B::Buf,
}

/// Buffers shared by every attention layer of a stack (never needed across layers). The
/// forward's intermediates that the backward does not read live here rather than in
/// [`AttentionActs`], so a training stack keeps one copy instead of one per block.
pub struct AttentionScratch<B: Backend> {
    /// The qkv projection `[rows, 3 D]` (q | k | v, each head-major), split into per-head q, k, v.
    pub qkv: B::Buf,
    /// Per-head outputs `[N, H, T, hd]`, merged into `AttentionActs::merged`.
    pub heads_out: B::Buf,
    /// Scores before softmax (forward), then their gradient (backward), `[N, H, T, T]`.
    pub scores: B::Buf,
    /// Gradient of the probabilities, `[N, H, T, T]`.
    pub d_att: B::Buf,
    /// Gradient of `merged`, `[rows, D]`.
    pub d_merged: B::Buf,
    /// Gradient of the per-head outputs.
    pub d_heads_out: B::Buf,
    /// Gradients of q, k, v per head.
    pub d_q: B::Buf,
    /// See `d_q`.
    pub d_k: B::Buf,
    /// See `d_q`.
    pub d_v: B::Buf,
    /// Gradient of `qkv`, `[rows, 3 D]`.
    pub d_qkv: B::Buf,
}

impl<B: Backend> AttentionActs<B> {
    /// Buffers for one layer.
    pub fn new(b: &B, d: &StackDims) -> BResult<Self> {
        let (r, dim) = (d.rows(), d.dim);
        let scores = d.batch * d.heads * d.tokens * d.tokens;
        Ok(AttentionActs {
            q: b.alloc(r * dim)?,
            k: b.alloc(r * dim)?,
            v: b.alloc(r * dim)?,
            att: b.alloc(scores)?,
            merged: b.alloc(r * dim)?,
        })
    }
}

impl<B: Backend> AttentionScratch<B> {
    /// Buffers for a stack; `backward` adds the gradient buffers.
    pub fn new(b: &B, d: &StackDims, backward: bool) -> BResult<Self> {
        let (r, dim) = (d.rows(), d.dim);
        let scores = d.batch * d.heads * d.tokens * d.tokens;
        let n = |len: usize| b.alloc(if backward { len } else { 0 });
        Ok(AttentionScratch {
            qkv: b.alloc(r * 3 * dim)?,
            heads_out: b.alloc(r * dim)?,
            scores: b.alloc(scores)?,
            d_att: n(scores)?,
            d_merged: n(r * dim)?,
            d_heads_out: n(r * dim)?,
            d_q: n(r * dim)?,
            d_k: n(r * dim)?,
            d_v: n(r * dim)?,
            d_qkv: n(r * 3 * dim)?,
        })
    }
}

fn heads_view(d: &StackDims, row_width: usize, col_offset: usize) -> Heads {
    Heads {
        batch: d.batch,
        tokens: d.tokens,
        heads: d.heads,
        head_dim: d.head_dim(),
        row_width,
        col_offset,
    }
}

/// An `m x k` by `k x n` product per (image, head), batched over `N * H` contiguous matrices
/// (transposing an operand does not change its size, so the strides hold for every flag).
fn per_head(d: &StackDims, m: usize, n: usize, k: usize) -> Gemm {
    Gemm::new(m, n, k).batched(d.batch * d.heads, m * k, k * n, m * n)
}

fn scale(d: &StackDims) -> f32 {
    1.0 / libm::sqrtf(d.head_dim() as f32)
}

/// `out += proj(attention(x))`, `x` being the LayerNorm output `[rows, D]`.
pub fn attention_forward<B: Backend>(
    b: &B,
    x: &B::Buf,
    qkv: &Linear<B::Buf>,
    proj: &Linear<B::Buf>,
    acts: &mut AttentionActs<B>,
    scratch: &mut AttentionScratch<B>,
    out: &mut B::Buf,
    d: &StackDims,
) -> BResult<()> {
    let (r, dim, t, hd) = (d.rows(), d.dim, d.tokens, d.head_dim());
    linear_forward(b, x, qkv, &mut scratch.qkv, r, dim, 3 * dim, false)?;
    b.split_heads(&scratch.qkv, &mut acts.q, &heads_view(d, 3 * dim, 0))?;
    b.split_heads(&scratch.qkv, &mut acts.k, &heads_view(d, 3 * dim, dim))?;
    b.split_heads(&scratch.qkv, &mut acts.v, &heads_view(d, 3 * dim, 2 * dim))?;
    // scores = q k^T; the scale is applied inside the softmax, after the product, as timm does.
    b.gemm(
        &per_head(d, t, t, hd).trans_b(),
        &acts.q,
        &acts.k,
        &mut scratch.scores,
    )?;
    b.softmax_forward(
        &scratch.scores,
        &mut acts.att,
        d.batch * d.heads * t,
        t,
        scale(d),
    )?;
    b.gemm(
        &per_head(d, t, hd, t),
        &acts.att,
        &acts.v,
        &mut scratch.heads_out,
    )?;
    b.merge_heads(&scratch.heads_out, &mut acts.merged, &heads_view(d, dim, 0))?;
    linear_forward(b, &acts.merged, proj, out, r, dim, dim, true)
}

/// Given `d_out`, the gradient of the attention branch's output, accumulates the parameter
/// gradients and overwrites `dx` with the gradient of the LayerNorm output `x`.
pub fn attention_backward<B: Backend>(
    b: &B,
    d_out: &B::Buf,
    x: &B::Buf,
    qkv: &Linear<B::Buf>,
    proj: &Linear<B::Buf>,
    g_qkv: &mut Linear<B::Buf>,
    g_proj: &mut Linear<B::Buf>,
    acts: &AttentionActs<B>,
    s: &mut AttentionScratch<B>,
    dx: &mut B::Buf,
    d: &StackDims,
) -> BResult<()> {
    let (r, dim, t, hd) = (d.rows(), d.dim, d.tokens, d.head_dim());
    linear_backward(
        b,
        d_out,
        &acts.merged,
        proj,
        g_proj,
        Some(&mut s.d_merged),
        r,
        dim,
        dim,
    )?;
    b.split_heads(&s.d_merged, &mut s.d_heads_out, &heads_view(d, dim, 0))?;
    // heads_out = att v
    b.gemm(
        &per_head(d, t, t, hd).trans_b(),
        &s.d_heads_out,
        &acts.v,
        &mut s.d_att,
    )?;
    b.gemm(
        &per_head(d, t, hd, t).trans_a(),
        &acts.att,
        &s.d_heads_out,
        &mut s.d_v,
    )?;
    // att = softmax(scale * scores); `scores` now holds d(scores).
    b.fill(&mut s.scores, 0.0)?;
    b.softmax_backward(
        &acts.att,
        &s.d_att,
        &mut s.scores,
        d.batch * d.heads * t,
        t,
        scale(d),
    )?;
    // scores = q k^T
    b.gemm(&per_head(d, t, hd, t), &s.scores, &acts.k, &mut s.d_q)?;
    b.gemm(
        &per_head(d, t, hd, t).trans_a(),
        &s.scores,
        &acts.q,
        &mut s.d_k,
    )?;
    b.merge_heads(&s.d_q, &mut s.d_qkv, &heads_view(d, 3 * dim, 0))?;
    b.merge_heads(&s.d_k, &mut s.d_qkv, &heads_view(d, 3 * dim, dim))?;
    b.merge_heads(&s.d_v, &mut s.d_qkv, &heads_view(d, 3 * dim, 2 * dim))?;
    linear_backward(b, &s.d_qkv, x, qkv, g_qkv, Some(dx), r, dim, 3 * dim)
}
