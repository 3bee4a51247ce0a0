//! The pre-LN transformer block of timm: `x = x + attn(norm1(x)); x = x + mlp(norm2(x))`.
//!
//! In fine-tuning each branch may be dropped per image (drop path, stochastic depth):
//! `x = x + s_i * branch(x)` with `s_i` either 0 or `1 / keep_prob`, drawn by the caller.

use super::attention::{attention_backward, attention_forward, AttentionActs, AttentionScratch};
use super::layernorm::{layernorm_backward, layernorm_forward, NormActs};
use super::linear::Residual;
use super::mlp::{mlp_backward, mlp_forward, MlpActs, MlpScratch};
use super::{prev_and_cur, GradsReady, StackDims};
use crate::backend::{BResult, Backend};
use crate::params::Block;

/// What one block keeps for its backward; `out` is the next block's input.
pub struct BlockActs<B: Backend> {
    /// `norm1(x)`.
    pub ln1: NormActs<B>,
    /// The attention branch.
    pub attn: AttentionActs<B>,
    /// `x + attn(norm1(x))`.
    pub res1: B::Buf,
    /// `norm2(res1)`.
    pub ln2: NormActs<B>,
    /// The MLP branch.
    pub mlp: MlpActs<B>,
    /// `res1 + mlp(norm2(res1))`.
    pub out: B::Buf,
    /// Drop path's per-image factors, when this block drops paths in training.
    pub drop: Option<DropPath<B>>,
}

/// Drop path of one block: one factor per image and branch, 0 (dropped) or `1 / keep_prob`.
pub struct DropPath<B: Backend> {
    /// Factors of the attention branch, `[N]`.
    pub attn: B::Buf,
    /// Factors of the MLP branch, `[N]`.
    pub mlp: B::Buf,
    /// Whether the factors apply (training) or not (evaluation).
    pub active: bool,
}

/// Buffers one block needs while it runs, shared by all blocks of a stack.
pub struct BlockScratch<B: Backend> {
    /// Attention scratch.
    pub attn: AttentionScratch<B>,
    /// MLP gradients (absent when the stack only runs forward).
    pub mlp: Option<MlpScratch<B>>,
    /// Gradient of a LayerNorm output: the input gradient of qkv or fc1, read only by the
    /// LayerNorm's backward, so an operand buffer ([`Backend::alloc_operand`]).
    pub d_ln: B::Buf,
    /// One branch's output, or its gradient, while drop path scales it (empty without).
    pub branch: B::Buf,
}

/// Scratch of a whole stack.
pub struct StackScratch<B: Backend> {
    /// Per-block scratch.
    pub block: BlockScratch<B>,
    /// The residual stream's gradient: the top block's output gradient on entry to
    /// [`stack_backward`], each block's input gradient in turn as it runs down the stack.
    pub d_x: B::Buf,
}

impl<B: Backend> BlockActs<B> {
    /// Buffers for one block.
    pub fn new(b: &B, d: &StackDims) -> BResult<Self> {
        let (r, dim) = (d.rows(), d.dim);
        Ok(BlockActs {
            ln1: NormActs::before_linear(b, r, dim)?,
            attn: AttentionActs::new(b, d)?,
            res1: b.alloc(r * dim)?,
            ln2: NormActs::before_linear(b, r, dim)?,
            mlp: MlpActs::new(b, d)?,
            out: b.alloc(r * dim)?,
            drop: None,
        })
    }
}

impl<B: Backend> StackScratch<B> {
    /// Scratch for a stack; `backward` allocates the gradient buffers.
    pub fn new(b: &B, d: &StackDims, backward: bool) -> BResult<Self> {
        Self::with_drop_path(b, d, backward, false)
    }

    /// Scratch for a stack whose blocks may drop paths.
    pub fn with_drop_path(b: &B, d: &StackDims, backward: bool, drop: bool) -> BResult<Self> {
        let len = if backward { d.rows() * d.dim } else { 0 };
        Ok(StackScratch {
            block: BlockScratch {
                attn: AttentionScratch::new(b, d, backward)?,
                mlp: if backward {
                    Some(MlpScratch::new(b, d)?)
                } else {
                    None
                },
                d_ln: b.alloc_operand(len)?,
                branch: b.alloc(if drop { d.rows() * d.dim } else { 0 })?,
            },
            d_x: b.alloc(len)?,
        })
    }
}

/// `acts.out = block(x)`.
pub fn block_forward<B: Backend>(
    b: &B,
    x: &B::Buf,
    p: &Block<B::Buf>,
    acts: &mut BlockActs<B>,
    scratch: &mut BlockScratch<B>,
    d: &StackDims,
) -> BResult<()> {
    let (r, dim) = (d.rows(), d.dim);
    let drop = acts.drop.as_ref().filter(|dp| dp.active);
    layernorm_forward(b, x, &p.norm1, &mut acts.ln1, r, dim, d.eps)?;
    let out = branch_output(b, drop.is_some(), x, &mut acts.res1, &mut scratch.branch)?;
    let (qkv, proj) = (&p.qkv, &p.proj);
    attention_forward(
        b,
        &acts.ln1.y,
        qkv,
        proj,
        &mut acts.attn,
        &mut scratch.attn,
        out,
        d,
    )?;
    if let Some(dp) = drop {
        b.scale_rows(
            &scratch.branch,
            &dp.attn,
            &mut acts.res1,
            d.tokens,
            dim,
            true,
        )?;
    }
    layernorm_forward(b, &acts.res1, &p.norm2, &mut acts.ln2, r, dim, d.eps)?;
    let out = branch_output(
        b,
        drop.is_some(),
        &acts.res1,
        &mut acts.out,
        &mut scratch.branch,
    )?;
    mlp_forward(b, &acts.ln2.y, &p.fc1, &p.fc2, &mut acts.mlp, out, d)?;
    if let Some(dp) = drop {
        b.scale_rows(&scratch.branch, &dp.mlp, &mut acts.out, d.tokens, dim, true)?;
    }
    Ok(())
}

/// Where a branch puts its output: the residual stream after it, `stream = base + branch`
/// (`base` is the stream before it, kept for the backward); or, under drop path, the zeroed
/// `branch` buffer, which the caller then scales per image into `stream`, a copy of `base`.
fn branch_output<'a, B: Backend>(
    b: &B,
    dropping: bool,
    base: &'a B::Buf,
    stream: &'a mut B::Buf,
    branch: &'a mut B::Buf,
) -> BResult<Residual<'a, B>> {
    if dropping {
        b.copy(base, stream)?;
        b.fill(branch, 0.0)?;
        Ok(Residual::Into(branch))
    } else {
        Ok(Residual::Onto { base, out: stream })
    }
}

/// Given `d` holding the gradient of the block's output, accumulates the parameter gradients
/// and leaves in `d` the gradient of its input `x`. Both residual connections pass the gradient
/// through unchanged, so each LayerNorm's backward adds its branch's share to `d` in place, once
/// the branch has read it: the residual stream's gradient is never copied.
pub fn block_backward<B: Backend>(
    b: &B,
    d: &mut B::Buf,
    x: &B::Buf,
    p: &Block<B::Buf>,
    g: &mut Block<B::Buf>,
    acts: &BlockActs<B>,
    s: &mut BlockScratch<B>,
    dims: &StackDims,
) -> BResult<()> {
    let (r, dim) = (dims.rows(), dims.dim);
    let Some(mlp_scratch) = s.mlp.as_mut() else {
        return Err(crate::backend::BackendError::new(
            crate::backend::BackendErrorKind::Unsupported,
            "block_backward on a stack allocated for inference",
        ));
    };
    let drop = acts.drop.as_ref().filter(|dp| dp.active);
    // out = res1 + s_mlp * mlp(norm2(res1)): d_res1 = d + norm2'(mlp'(s_mlp d))
    let d_mlp = match drop {
        Some(dp) => {
            b.scale_rows(d, &dp.mlp, &mut s.branch, dims.tokens, dim, false)?;
            &s.branch
        }
        None => &*d,
    };
    let (fc1, fc2) = (&p.fc1, &p.fc2);
    mlp_backward(
        b,
        d_mlp,
        &acts.ln2.y,
        fc1,
        fc2,
        &mut g.fc1,
        &mut g.fc2,
        &acts.mlp,
        mlp_scratch,
        &mut s.d_ln,
        dims,
    )?;
    let (norm2, g_norm2) = (&p.norm2, &mut g.norm2);
    layernorm_backward(b, &s.d_ln, &acts.res1, norm2, &acts.ln2, g_norm2, d, r, dim)?;
    // res1 = x + s_attn * attn(norm1(x)): d_x = d_res1 + norm1'(attn'(s_attn d_res1))
    let d_attn = match drop {
        Some(dp) => {
            b.scale_rows(d, &dp.attn, &mut s.branch, dims.tokens, dim, false)?;
            &s.branch
        }
        None => &*d,
    };
    let (qkv, proj) = (&p.qkv, &p.proj);
    attention_backward(
        b,
        d_attn,
        &acts.ln1.y,
        qkv,
        proj,
        &mut g.qkv,
        &mut g.proj,
        &acts.attn,
        &mut s.attn,
        &mut s.d_ln,
        dims,
    )?;
    layernorm_backward(b, &s.d_ln, x, &p.norm1, &acts.ln1, &mut g.norm1, d, r, dim)
}

/// Runs `blocks` on `input`. Block `l` writes `acts[l % acts.len()]`, so a training stack keeps
/// one `BlockActs` per block and an inference stack cycles through two. Returns the index of
/// the `BlockActs` holding the output.
pub fn stack_forward<B: Backend>(
    b: &B,
    input: &B::Buf,
    blocks: &[Block<B::Buf>],
    acts: &mut [BlockActs<B>],
    scratch: &mut BlockScratch<B>,
    d: &StackDims,
) -> BResult<usize> {
    let n = acts.len();
    for (l, p) in blocks.iter().enumerate() {
        if l == 0 {
            block_forward(b, input, p, &mut acts[0], scratch, d)?;
        } else {
            let (prev, cur) = prev_and_cur(acts, (l - 1) % n, l % n);
            block_forward(b, &prev.out, p, cur, scratch, d)?;
        }
    }
    Ok((blocks.len() - 1) % n)
}

/// Backward through a training stack (one `BlockActs` per block): `s.d_x` holds the gradient
/// of the last block's output on entry and the gradient of `input` on return. A slice of the top
/// blocks (with the output of the block below as `input`) backpropagates through those only, as
/// partial fine-tuning does. Each block's gradients go to `ready` once its backward is queued.
pub fn stack_backward<B: Backend>(
    b: &B,
    input: &B::Buf,
    blocks: &[Block<B::Buf>],
    grads: &mut [Block<B::Buf>],
    acts: &[BlockActs<B>],
    s: &mut StackScratch<B>,
    d: &StackDims,
    ready: &mut dyn GradsReady<B>,
) -> BResult<()> {
    for l in (0..blocks.len()).rev() {
        let x = if l == 0 { input } else { &acts[l - 1].out };
        let (p, g) = (&blocks[l], &mut grads[l]);
        block_backward(b, &mut s.d_x, x, p, g, &acts[l], &mut s.block, d)?;
        ready.ready(b, &mut g.tensors_mut())?;
    }
    Ok(())
}
