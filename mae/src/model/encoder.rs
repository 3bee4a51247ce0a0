//! The MAE encoder: patch embedding and position table on every patch, then masking keeps the
//! visible ones (in noise order), the cls token goes in front, and only those tokens run through
//! the ViT blocks. The encoder never sees mask tokens: that is where MAE's speed comes from.

use super::block::{stack_backward, stack_forward, BlockActs, StackScratch};
use super::layernorm::{layernorm_backward, layernorm_forward, NormActs};
use super::linear::{linear_backward, linear_forward};
use super::StackDims;
use crate::backend::{BResult, Backend, Gather, PatchOrder, Patchify, RowMap};
use crate::config::Config;
use crate::params::Encoder;
use alloc::vec::Vec;

/// The encoder's shape at one batch size and keep count.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EncoderShape {
    /// Patches per image, L.
    pub num_patches: usize,
    /// Visible patches per image (L when embedding whole images).
    pub keep: usize,
    /// Values per patch in the Conv2d's order, `C p p`.
    pub patch_dim: usize,
    /// Images to patches.
    pub patchify: Patchify,
    /// The blocks: `1 + keep` tokens per image.
    pub stack: StackDims,
}

impl EncoderShape {
    /// The shape for `cfg`, `batch` images and `keep` visible patches each.
    pub fn new(cfg: &Config, batch: usize, keep: usize) -> Self {
        EncoderShape {
            num_patches: cfg.num_patches(),
            keep,
            patch_dim: cfg.patch_dim(),
            patchify: cfg.patchify(batch, PatchOrder::Chw),
            stack: StackDims {
                batch,
                tokens: 1 + keep,
                dim: cfg.embed_dim,
                heads: cfg.num_heads,
                hidden: cfg.mlp_hidden(cfg.embed_dim),
                eps: cfg.norm_eps as f32,
            },
        }
    }
    fn batch(&self) -> usize {
        self.stack.batch
    }
    /// Where the cls token goes: row 0 of each image.
    fn cls_rows(&self) -> RowMap {
        RowMap {
            batch: self.batch(),
            count: 1,
            cols: self.stack.dim,
            src_stride: 0,
            src_start: 0,
            src_step: 0,
            dst_stride: self.stack.tokens,
            dst_start: 0,
        }
    }
    /// Position rows `1..=L` onto each image's patch tokens.
    fn patch_pos_rows(&self) -> RowMap {
        RowMap {
            batch: self.batch(),
            count: self.num_patches,
            cols: self.stack.dim,
            src_stride: 0,
            src_start: 1,
            src_step: 1,
            dst_stride: self.num_patches,
            dst_start: 0,
        }
    }
    /// Visible patch tokens into rows `1..=keep` of each image.
    fn keep_gather(&self) -> Gather {
        Gather {
            batch: self.batch(),
            count: self.keep,
            cols: self.stack.dim,
            src_rows: self.num_patches,
            dst_rows: self.stack.tokens,
            dst_start: 1,
        }
    }
}

/// The encoder's activations. `latent` is `norm.y`.
pub struct EncoderActs<B: Backend> {
    /// `[N L, C p p]`, CHW inside a patch.
    pub patches: B::Buf,
    /// Every patch embedded, plus its position: `[N L, D]`.
    pub tokens: B::Buf,
    /// Encoder input: cls, then the visible tokens, `[N (1 + keep), D]`.
    pub x0: B::Buf,
    /// One per block (training) or two cycled (inference).
    pub blocks: Vec<BlockActs<B>>,
    /// Which `blocks` entry holds the last block's output.
    pub last: usize,
    /// The final LayerNorm: `norm.y` is the latent.
    pub norm: NormActs<B>,
    /// `[N, keep]` visible patch indices, written by the caller before the forward.
    pub ids_keep: B::Idx,
}

impl<B: Backend> EncoderActs<B> {
    /// Buffers for `sh`; `training` keeps every block's activations for the backward.
    pub fn new(b: &B, sh: &EncoderShape, training: bool, depth: usize) -> BResult<Self> {
        let (n, l, d) = (sh.batch(), sh.num_patches, sh.stack.dim);
        let copies = if training { depth } else { depth.min(2) };
        Ok(EncoderActs {
            patches: b.alloc(n * l * sh.patch_dim)?,
            tokens: b.alloc(n * l * d)?,
            x0: b.alloc(sh.stack.rows() * d)?,
            blocks: (0..copies)
                .map(|_| BlockActs::new(b, &sh.stack))
                .collect::<BResult<_>>()?,
            last: 0,
            norm: NormActs::new(b, sh.stack.rows(), d)?,
            ids_keep: b.upload_idx(&alloc::vec![0; n * sh.keep])?,
        })
    }
}

/// Gradient buffers of the encoder's backward.
pub struct EncoderScratch<B: Backend> {
    /// Shared by the blocks.
    pub stack: StackScratch<B>,
    /// Gradient of `tokens`.
    pub d_tokens: B::Buf,
}

impl<B: Backend> EncoderScratch<B> {
    /// Buffers for `sh`; `backward` allocates the gradient buffers.
    pub fn new(b: &B, sh: &EncoderShape, backward: bool) -> BResult<Self> {
        let len = sh.batch() * sh.num_patches * sh.stack.dim;
        Ok(EncoderScratch {
            stack: StackScratch::new(b, &sh.stack, backward)?,
            d_tokens: b.alloc(if backward { len } else { 0 })?,
        })
    }
}

/// `imgs [N, C, H, W]` to the latent `acts.norm.y [N (1 + keep), D]`, keeping the patches in
/// `acts.ids_keep`.
pub fn encoder_forward<B: Backend>(
    b: &B,
    imgs: &B::Buf,
    p: &Encoder<B::Buf>,
    acts: &mut EncoderActs<B>,
    scratch: &mut EncoderScratch<B>,
    sh: &EncoderShape,
) -> BResult<()> {
    let (d, rows) = (sh.stack.dim, sh.batch() * sh.num_patches);
    // The Conv2d with stride = kernel = p is a GEMM over CHW-ordered patches.
    b.patchify(imgs, &mut acts.patches, &sh.patchify)?;
    linear_forward(
        b,
        &acts.patches,
        &p.patch_embed,
        &mut acts.tokens,
        rows,
        sh.patch_dim,
        d,
        false,
    )?;
    b.copy_rows(&p.pos_embed, &mut acts.tokens, &sh.patch_pos_rows(), true)?;
    // random_masking: keep the visible tokens, then prepend cls_token + pos_embed[0].
    b.gather_rows(
        &acts.tokens,
        &acts.ids_keep,
        &mut acts.x0,
        &sh.keep_gather(),
    )?;
    b.copy_rows(&p.cls_token, &mut acts.x0, &sh.cls_rows(), false)?;
    b.copy_rows(&p.pos_embed, &mut acts.x0, &sh.cls_rows(), true)?;
    acts.last = stack_forward(
        b,
        &acts.x0,
        &p.blocks,
        &mut acts.blocks,
        &mut scratch.stack.block.attn,
        &sh.stack,
    )?;
    let out = &acts.blocks[acts.last].out;
    layernorm_forward(
        b,
        out,
        &p.norm,
        &mut acts.norm,
        sh.stack.rows(),
        d,
        sh.stack.eps,
    )
}

/// Given the gradient of the latent, accumulates the encoder's parameter gradients (the fixed
/// position table gets none).
pub fn encoder_backward<B: Backend>(
    b: &B,
    d_latent: &B::Buf,
    p: &Encoder<B::Buf>,
    g: &mut Encoder<B::Buf>,
    acts: &EncoderActs<B>,
    s: &mut EncoderScratch<B>,
    sh: &EncoderShape,
) -> BResult<()> {
    let (d, rows) = (sh.stack.dim, sh.batch() * sh.num_patches);
    let top = &mut s.stack.d_x[0];
    b.fill(top, 0.0)?;
    let out = &acts.blocks[acts.last].out;
    let tokens = sh.stack.rows();
    layernorm_backward(
        b,
        d_latent,
        out,
        &p.norm,
        &acts.norm,
        &mut g.norm,
        top,
        tokens,
        d,
    )?;
    let d_x0 = stack_backward(
        b,
        0,
        &acts.x0,
        &p.blocks,
        &mut g.blocks,
        &acts.blocks,
        &mut s.stack,
        &sh.stack,
    )?;
    let d_x0 = &s.stack.d_x[d_x0];
    b.copy_rows_backward(d_x0, &mut g.cls_token, &sh.cls_rows())?;
    // Removed patches get no gradient: their rows of d_tokens stay zero.
    b.fill(&mut s.d_tokens, 0.0)?;
    b.gather_rows_backward(d_x0, &acts.ids_keep, &mut s.d_tokens, &sh.keep_gather())?;
    linear_backward(
        b,
        &s.d_tokens,
        &acts.patches,
        &p.patch_embed,
        &mut g.patch_embed,
        None,
        rows,
        sh.patch_dim,
        d,
    )
}
