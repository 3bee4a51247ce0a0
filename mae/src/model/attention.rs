//! Multi-head self-attention as timm 0.3.2 computes it: fused qkv projection, per-head
//! `softmax(q k^T * head_dim^-0.5) v`, heads concatenated, output projection.

use super::linear::{linear_backward, linear_forward, linear_residual, Residual};
use super::StackDims;
use crate::backend::{Attention, BResult, Backend, Gemm, Heads};
use crate::params::Linear;

/// What one attention layer keeps for its backward.
pub struct AttentionActs<B: Backend> {
    /// Heads concatenated `[rows, D]`: the input of `proj`. On the fused path read only by
    /// `proj`'s products and by the fused backward as O of `dO . O`, which may take it rounded
    /// ([`Backend::alloc_operand`]: the bf16 tensor-core kernels sum the bf16 values there).
    pub merged: B::Buf,
    /// What the attention itself keeps, per path.
    pub saved: Saved<B>,
}

/// The attention's saved tensors: the composed path keeps the per-head tensors and the
/// probabilities, the fused path (a backend with [`Backend::fused_attention`]) only its input
/// and one log-sum-exp per score row, and recomputes the probabilities in the backward.
pub enum Saved<B: Backend> {
    /// Attention composed of `split_heads`, `gemm`, `softmax_*` and `merge_heads`.
    Composed {
        /// `[N, H, T, hd]`.
        q: B::Buf,
        /// `[N, H, T, hd]`.
        k: B::Buf,
        /// `[N, H, T, hd]`.
        v: B::Buf,
        /// Attention probabilities `[N, H, T, T]`.
        att: B::Buf,
    },
    /// [`Backend::attention_forward`] and [`Backend::attention_backward`].
    Fused {
        /// This layer's qkv projection `[rows, 3 D]`, read only by the fused attention, which
        /// may take it rounded ([`Backend::alloc_operand`]: the bf16 tensor-core kernels
        /// multiply bf16 values anyway).
        qkv: B::Buf,
        /// Log-sum-exp of each scaled score row, `[N, H, T]`.
        lse: B::Buf,
    },
}

/// Buffers shared by every attention layer of a stack (never needed across layers). The
/// forward's intermediates that the backward does not read live here rather than in
/// [`AttentionActs`], so a training stack keeps one copy instead of one per block. On the fused
/// path only `d_merged` and `d_qkv` are used; the others are empty.
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
    /// Buffers for one layer, for the path `b` takes at these dims.
    pub fn new(b: &B, d: &StackDims) -> BResult<Self> {
        let (r, dim) = (d.rows(), d.dim);
        let fused = b.fused_attention(&fused_dims(d));
        let saved = if fused {
            Saved::Fused {
                qkv: b.alloc_operand(r * 3 * dim)?,
                lse: b.alloc(d.batch * d.heads * d.tokens)?,
            }
        } else {
            let scores = d.batch * d.heads * d.tokens * d.tokens;
            Saved::Composed {
                q: b.alloc(r * dim)?,
                k: b.alloc(r * dim)?,
                v: b.alloc(r * dim)?,
                att: b.alloc(scores)?,
            }
        };
        let merged = if fused {
            b.alloc_operand(r * dim)?
        } else {
            b.alloc(r * dim)?
        };
        Ok(AttentionActs { merged, saved })
    }
}

impl<B: Backend> AttentionScratch<B> {
    /// Buffers for a stack; `backward` adds the gradient buffers.
    pub fn new(b: &B, d: &StackDims, backward: bool) -> BResult<Self> {
        let (r, dim) = (d.rows(), d.dim);
        let fused = b.fused_attention(&fused_dims(d));
        let scores = d.batch * d.heads * d.tokens * d.tokens;
        // Composed-path buffers, empty on the fused path.
        let composed = |len: usize| b.alloc(if fused { 0 } else { len });
        // Gradients of the composed path: empty without a backward and on the fused path.
        let grad = |len: usize| b.alloc(if backward && !fused { len } else { 0 });
        Ok(AttentionScratch {
            qkv: composed(r * 3 * dim)?,
            heads_out: composed(r * dim)?,
            scores: composed(scores)?,
            d_att: grad(scores)?,
            // Read only by the attention backward as dO (its products round it to the
            // backend's operand precision anyway) or, composed, by split_heads.
            d_merged: b.alloc_operand(if backward { r * dim } else { 0 })?,
            d_heads_out: grad(r * dim)?,
            d_q: grad(r * dim)?,
            d_k: grad(r * dim)?,
            d_v: grad(r * dim)?,
            // dY of the qkv Linear, read only by its gradient products and their bias sums
            // (which round it to the backend's operand precision anyway), as `d_merged` is.
            d_qkv: b.alloc_operand(if backward { r * 3 * dim } else { 0 })?,
        })
    }
}

/// The stack's attention as [`Backend::attention_forward`] describes it.
fn fused_dims(d: &StackDims) -> Attention {
    Attention {
        batch: d.batch,
        tokens: d.tokens,
        heads: d.heads,
        head_dim: d.head_dim(),
        scale: scale(d),
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

/// Adds `proj(attention(x))` to the residual stream `out`, `x` being the LayerNorm output
/// `[rows, D]`.
pub fn attention_forward<B: Backend>(
    b: &B,
    x: &B::Buf,
    qkv: &Linear<B::Buf>,
    proj: &Linear<B::Buf>,
    acts: &mut AttentionActs<B>,
    scratch: &mut AttentionScratch<B>,
    out: Residual<'_, B>,
    d: &StackDims,
) -> BResult<()> {
    let (r, dim) = (d.rows(), d.dim);
    let merged = &mut acts.merged;
    match &mut acts.saved {
        Saved::Fused { qkv: q, lse } => {
            linear_forward(b, x, qkv, q, r, dim, 3 * dim, false)?;
            b.attention_forward(q, merged, lse, &fused_dims(d))?;
        }
        Saved::Composed { q, k, v, att } => {
            linear_forward(b, x, qkv, &mut scratch.qkv, r, dim, 3 * dim, false)?;
            composed_forward(b, [q, k, v], att, merged, scratch, d)?;
        }
    }
    linear_residual(b, &acts.merged, proj, out, r, dim, dim)
}

/// `merged = attention(scratch.qkv)` from per-head tensors and the `[N, H, T, T]` scores.
fn composed_forward<B: Backend>(
    b: &B,
    [q, k, v]: [&mut B::Buf; 3],
    att: &mut B::Buf,
    merged: &mut B::Buf,
    scratch: &mut AttentionScratch<B>,
    d: &StackDims,
) -> BResult<()> {
    let (dim, t, hd) = (d.dim, d.tokens, d.head_dim());
    b.split_heads(&scratch.qkv, q, &heads_view(d, 3 * dim, 0))?;
    b.split_heads(&scratch.qkv, k, &heads_view(d, 3 * dim, dim))?;
    b.split_heads(&scratch.qkv, v, &heads_view(d, 3 * dim, 2 * dim))?;
    // scores = q k^T; the scale is applied inside the softmax, after the product, as timm does.
    b.gemm(&per_head(d, t, t, hd).trans_b(), q, k, &mut scratch.scores)?;
    b.softmax_forward(&scratch.scores, att, d.batch * d.heads * t, t, scale(d))?;
    b.gemm(&per_head(d, t, hd, t), att, v, &mut scratch.heads_out)?;
    b.merge_heads(&scratch.heads_out, merged, &heads_view(d, dim, 0))
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
    let (r, dim) = (d.rows(), d.dim);
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
    match &acts.saved {
        Saved::Fused { qkv: q, lse } => b.attention_backward(
            q,
            &acts.merged,
            lse,
            &s.d_merged,
            &mut s.d_qkv,
            &fused_dims(d),
        )?,
        Saved::Composed { q, k, v, att } => composed_backward(b, [q, k, v], att, s, d)?,
    }
    linear_backward(b, &s.d_qkv, x, qkv, g_qkv, Some(dx), r, dim, 3 * dim)
}

/// `s.d_qkv` from `s.d_merged` through the per-head tensors and the `[N, H, T, T]` scores.
fn composed_backward<B: Backend>(
    b: &B,
    [q, k, v]: [&B::Buf; 3],
    att: &B::Buf,
    s: &mut AttentionScratch<B>,
    d: &StackDims,
) -> BResult<()> {
    let (dim, t, hd) = (d.dim, d.tokens, d.head_dim());
    b.split_heads(&s.d_merged, &mut s.d_heads_out, &heads_view(d, dim, 0))?;
    // heads_out = att v
    b.gemm(
        &per_head(d, t, t, hd).trans_b(),
        &s.d_heads_out,
        v,
        &mut s.d_att,
    )?;
    b.gemm(
        &per_head(d, t, hd, t).trans_a(),
        att,
        &s.d_heads_out,
        &mut s.d_v,
    )?;
    // att = softmax(scale * scores); `scores` now holds d(scores).
    b.fill(&mut s.scores, 0.0)?;
    b.softmax_backward(
        att,
        &s.d_att,
        &mut s.scores,
        d.batch * d.heads * t,
        t,
        scale(d),
    )?;
    // scores = q k^T
    b.gemm(&per_head(d, t, hd, t), &s.scores, k, &mut s.d_q)?;
    b.gemm(&per_head(d, t, hd, t).trans_a(), &s.scores, q, &mut s.d_k)?;
    b.merge_heads(&s.d_q, &mut s.d_qkv, &heads_view(d, 3 * dim, 0))?;
    b.merge_heads(&s.d_k, &mut s.d_qkv, &heads_view(d, 3 * dim, dim))?;
    b.merge_heads(&s.d_v, &mut s.d_qkv, &heads_view(d, 3 * dim, 2 * dim))
}
