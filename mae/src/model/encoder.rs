//! The MAE encoder: masking keeps the visible patches (in noise order), each is embedded and gets
//! its position, the cls token goes in front, and only those tokens run through the ViT blocks.
//! The encoder never sees mask tokens: that is where MAE's speed comes from.
//!
//! The official code embeds every patch and adds the position table before it masks. The patch
//! embedding (a Conv2d with stride = kernel) is the same Linear on each patch and the position is
//! added per patch, so keeping the visible patches first gives the same tokens for a quarter of
//! the work (`EncoderShape::embeds_kept_only`).
//!
//! Whole images, and two variants that serve the paper's ablations and fine-tuning, embed every
//! patch as the official code does: with `mask_tokens` (Table 1c) every patch goes through, a
//! removed one replaced by the learned `encoder_mask_token` plus its position; with
//! `learn_pos_embed` (fine-tuning, where timm's ViT trains its position table) the table gets a
//! gradient too.

use super::block::{stack_backward, stack_forward, BlockActs, StackScratch};
use super::layernorm::{layernorm_backward, layernorm_forward, NormActs};
use super::linear::{linear_backward, linear_forward};
use super::{GradsReady, StackDims};
use crate::backend::{
    BResult, Backend, BackendError, BackendErrorKind, Gather, PatchOrder, Patchify, RowMap,
};
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
    /// Removed patches enter as mask tokens (then `keep == num_patches`).
    pub mask_tokens: bool,
    /// The position table is trained.
    pub learn_pos_embed: bool,
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
            mask_tokens: false,
            learn_pos_embed: false,
        }
    }
    /// The shape for a pre-training step of `cfg` at `batch` images and `keep` visible patches:
    /// with [`Config::encoder_mask_tokens`] every patch enters the blocks.
    pub fn pretraining(cfg: &Config, batch: usize, keep: usize) -> Self {
        if cfg.encoder_mask_tokens {
            EncoderShape {
                mask_tokens: true,
                ..EncoderShape::new(cfg, batch, cfg.num_patches())
            }
        } else {
            EncoderShape::new(cfg, batch, keep)
        }
    }
    fn batch(&self) -> usize {
        self.stack.batch
    }
    /// Whether only the visible patches are embedded: wherever patches are removed, but in the
    /// two variants, which embed every patch (mask tokens take the removed patches' places; a
    /// learned position table gets its gradient from every patch's row). Whole images (the
    /// embedding path) take the official order too: there the gather would only copy.
    pub fn embeds_kept_only(&self) -> bool {
        !self.mask_tokens && !self.learn_pos_embed && self.keep < self.num_patches
    }
    /// The visible patches, `[N keep, C p p]`, out of every patch.
    fn kept_patches(&self) -> Gather {
        Gather::per_item(
            self.batch(),
            self.keep,
            self.patch_dim,
            self.num_patches,
            self.keep,
            0,
        )
    }
    /// The visible patches' positions, rows `1 + ids_keep` of the one position table, into
    /// rows `1..=keep` of each image.
    fn kept_positions(&self) -> Gather {
        Gather {
            src_stride: 0,
            src_start: 1,
            ..self.keep_gather()
        }
    }
    /// The visible patches' tokens `[N keep, D]` onto rows `1..=keep` of each image.
    fn kept_token_rows(&self) -> RowMap {
        RowMap {
            batch: self.batch(),
            count: self.keep,
            cols: self.stack.dim,
            src_stride: self.keep,
            src_start: 0,
            src_step: 1,
            dst_stride: self.stack.tokens,
            dst_start: 1,
        }
    }
    /// Rows `1..=keep` of each image back to the visible patches' `[N keep, D]`.
    fn kept_token_grads(&self) -> RowMap {
        RowMap {
            src_stride: self.stack.tokens,
            src_start: 1,
            dst_stride: self.keep,
            dst_start: 0,
            ..self.kept_token_rows()
        }
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
    /// Visible patch tokens into rows `1..=keep` of each image; with mask tokens, each patch's
    /// token or its mask token from the `[tokens, mask tokens]` candidates.
    fn keep_gather(&self) -> Gather {
        Gather::per_item(
            self.batch(),
            self.keep,
            self.stack.dim,
            self.num_patches * if self.mask_tokens { 2 } else { 1 },
            self.stack.tokens,
            1,
        )
    }
    /// Patch tokens into the first `L` candidate rows of each image.
    fn token_candidates(&self) -> RowMap {
        RowMap {
            batch: self.batch(),
            count: self.num_patches,
            cols: self.stack.dim,
            src_stride: self.num_patches,
            src_start: 0,
            src_step: 1,
            dst_stride: 2 * self.num_patches,
            dst_start: 0,
        }
    }
    /// The mask token into the last `L` candidate rows.
    fn mask_candidates(&self) -> RowMap {
        RowMap {
            src_stride: 0,
            src_step: 0,
            dst_start: self.num_patches,
            ..self.token_candidates()
        }
    }
    /// Position rows `1..=L` onto the mask-token candidates.
    fn mask_pos_candidates(&self) -> RowMap {
        RowMap {
            src_start: 1,
            src_step: 1,
            ..self.mask_candidates()
        }
    }
}

/// The encoder's gather indices with mask tokens: for each image and patch `j`, `j` when it is
/// visible (`mask == 0`), else `L + j`, its mask-token candidate.
pub fn mask_token_indices(mask: &[f32], num_patches: usize, out: &mut [u32]) {
    for (o, (j, &m)) in out.iter_mut().zip(mask.iter().enumerate()) {
        let j = (j % num_patches) as u32;
        *o = if m == 0.0 { j } else { num_patches as u32 + j };
    }
}

/// The encoder's activations. `latent` is `norm.y`.
pub struct EncoderActs<B: Backend> {
    /// `[N L, C p p]`, CHW inside a patch.
    pub patches: B::Buf,
    /// The visible patches, `[N keep, C p p]`, where only they are embedded (else empty).
    pub kept: B::Buf,
    /// The embedded patches: the visible ones, `[N keep, D]`; in the variants that embed every
    /// patch, every patch plus its position, `[N L, D]`.
    pub tokens: B::Buf,
    /// With mask tokens: each image's patch tokens, then its mask tokens, `[N 2L, D]`.
    pub candidates: B::Buf,
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
        let (kept, embedded) = match sh.embeds_kept_only() {
            true => (n * sh.keep, n * sh.keep),
            false => (0, n * l),
        };
        Ok(EncoderActs {
            patches: b.alloc(n * l * sh.patch_dim)?,
            kept: b.alloc(kept * sh.patch_dim)?,
            tokens: b.alloc(embedded * d)?,
            candidates: b.alloc(if sh.mask_tokens { 2 * n * l * d } else { 0 })?,
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
    /// Gradient of `candidates`.
    pub d_candidates: B::Buf,
}

impl<B: Backend> EncoderScratch<B> {
    /// Buffers for `sh`; `backward` allocates the gradient buffers, `drop_path` the buffer of
    /// a dropped branch.
    pub fn new(b: &B, sh: &EncoderShape, backward: bool, drop_path: bool) -> BResult<Self> {
        let embedded = match (backward, sh.embeds_kept_only()) {
            (false, _) => 0,
            (true, true) => sh.batch() * sh.keep,
            (true, false) => sh.batch() * sh.num_patches,
        };
        let len = embedded * sh.stack.dim;
        let candidates = match backward && sh.mask_tokens {
            true => 2 * sh.batch() * sh.num_patches * sh.stack.dim,
            false => 0,
        };
        Ok(EncoderScratch {
            stack: StackScratch::with_drop_path(b, &sh.stack, backward, drop_path)?,
            d_tokens: b.alloc(len)?,
            d_candidates: b.alloc(candidates)?,
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
    encoder_body_forward(b, imgs, p, acts, scratch, sh)?;
    let out = &acts.blocks[acts.last].out;
    let (rows, d, eps) = (sh.stack.rows(), sh.stack.dim, sh.stack.eps);
    layernorm_forward(b, out, &p.norm, &mut acts.norm, rows, d, eps)
}

/// The encoder up to its last block, `acts.blocks[acts.last].out`, without the final norm:
/// what mean-pooled fine-tuning reads (`fc_norm` replaces `norm` there).
pub fn encoder_body_forward<B: Backend>(
    b: &B,
    imgs: &B::Buf,
    p: &Encoder<B::Buf>,
    acts: &mut EncoderActs<B>,
    scratch: &mut EncoderScratch<B>,
    sh: &EncoderShape,
) -> BResult<()> {
    // The Conv2d with stride = kernel = p is a GEMM over CHW-ordered patches.
    b.patchify(imgs, &mut acts.patches, &sh.patchify)?;
    if sh.embeds_kept_only() {
        embed_kept_patches(b, p, acts, sh)?;
    } else {
        embed_every_patch(b, p, acts, sh)?;
    }
    // Prepend cls_token + pos_embed[0].
    b.copy_rows(&p.cls_token, &mut acts.x0, &sh.cls_rows(), false)?;
    b.copy_rows(&p.pos_embed, &mut acts.x0, &sh.cls_rows(), true)?;
    acts.last = stack_forward(
        b,
        &acts.x0,
        &p.blocks,
        &mut acts.blocks,
        &mut scratch.stack.block,
        &sh.stack,
    )?;
    Ok(())
}

/// random_masking first: the visible patches alone are embedded, into rows `1..=keep` of each
/// image, each with its position.
fn embed_kept_patches<B: Backend>(
    b: &B,
    p: &Encoder<B::Buf>,
    acts: &mut EncoderActs<B>,
    sh: &EncoderShape,
) -> BResult<()> {
    let (d, rows) = (sh.stack.dim, sh.batch() * sh.keep);
    b.gather_rows(
        &acts.patches,
        &acts.ids_keep,
        &mut acts.kept,
        &sh.kept_patches(),
    )?;
    let (kept, tokens) = (&acts.kept, &mut acts.tokens);
    linear_forward(
        b,
        kept,
        &p.patch_embed,
        tokens,
        rows,
        sh.patch_dim,
        d,
        false,
    )?;
    // position + token: one f32 add, so bitwise the official token + position.
    b.gather_rows(
        &p.pos_embed,
        &acts.ids_keep,
        &mut acts.x0,
        &sh.kept_positions(),
    )?;
    b.copy_rows(&acts.tokens, &mut acts.x0, &sh.kept_token_rows(), true)
}

/// As the official code: every patch embedded, plus its position (or, with mask tokens, each
/// removed patch's mask token plus its position), then random_masking keeps the tokens of
/// `ids_keep` in rows `1..=keep` of each image.
fn embed_every_patch<B: Backend>(
    b: &B,
    p: &Encoder<B::Buf>,
    acts: &mut EncoderActs<B>,
    sh: &EncoderShape,
) -> BResult<()> {
    let (d, rows) = (sh.stack.dim, sh.batch() * sh.num_patches);
    let (patches, tokens) = (&acts.patches, &mut acts.tokens);
    linear_forward(
        b,
        patches,
        &p.patch_embed,
        tokens,
        rows,
        sh.patch_dim,
        d,
        false,
    )?;
    b.copy_rows(&p.pos_embed, &mut acts.tokens, &sh.patch_pos_rows(), true)?;
    if sh.mask_tokens {
        let mask_token = encoder_mask_token(p)?;
        let cand = &mut acts.candidates;
        b.copy_rows(&acts.tokens, cand, &sh.token_candidates(), false)?;
        b.copy_rows(mask_token, cand, &sh.mask_candidates(), false)?;
        b.copy_rows(&p.pos_embed, cand, &sh.mask_pos_candidates(), true)?;
        b.gather_rows(cand, &acts.ids_keep, &mut acts.x0, &sh.keep_gather())
    } else {
        let x0 = &mut acts.x0;
        b.gather_rows(&acts.tokens, &acts.ids_keep, x0, &sh.keep_gather())
    }
}

/// The backward of [`embed_every_patch`] up to the patch embedding: `s.d_tokens` from
/// `s.stack.d_x`, the gradient of `x0`, and the gradients of the mask token and a learned
/// position table.
fn every_patch_token_grads<B: Backend>(
    b: &B,
    g: &mut Encoder<B::Buf>,
    acts: &EncoderActs<B>,
    s: &mut EncoderScratch<B>,
    sh: &EncoderShape,
) -> BResult<()> {
    let d_x0 = &s.stack.d_x;
    // Removed patches get no gradient: their rows of d_tokens stay zero.
    b.fill(&mut s.d_tokens, 0.0)?;
    if sh.mask_tokens {
        let d_cand = &mut s.d_candidates;
        b.fill(d_cand, 0.0)?;
        b.gather_rows_backward(d_x0, &acts.ids_keep, d_cand, &sh.keep_gather())?;
        b.copy_rows_backward(d_cand, &mut s.d_tokens, &sh.token_candidates())?;
        let g_mask = g.mask_token.as_mut().ok_or_else(|| {
            BackendError::new(
                BackendErrorKind::Unsupported,
                "no encoder_mask_token gradient",
            )
        })?;
        b.copy_rows_backward(d_cand, g_mask, &sh.mask_candidates())?;
        if sh.learn_pos_embed {
            b.copy_rows_backward(d_cand, &mut g.pos_embed, &sh.mask_pos_candidates())?;
        }
    } else {
        let d_tokens = &mut s.d_tokens;
        b.gather_rows_backward(d_x0, &acts.ids_keep, d_tokens, &sh.keep_gather())?;
    }
    if sh.learn_pos_embed {
        b.copy_rows_backward(&s.d_tokens, &mut g.pos_embed, &sh.patch_pos_rows())?;
    }
    Ok(())
}

fn encoder_mask_token<T>(p: &Encoder<T>) -> BResult<&T> {
    p.mask_token.as_ref().ok_or_else(|| {
        BackendError::new(
            BackendErrorKind::Unsupported,
            "an encoder with mask tokens needs the encoder_mask_token tensor",
        )
    })
}

/// Given the gradient of the latent, accumulates the encoder's parameter gradients (the fixed
/// position table gets none unless `sh.learn_pos_embed`). Gradients go to `ready` as they are
/// finished (see [`GradsReady`]).
pub fn encoder_backward<B: Backend>(
    b: &B,
    d_latent: &B::Buf,
    p: &Encoder<B::Buf>,
    g: &mut Encoder<B::Buf>,
    acts: &EncoderActs<B>,
    s: &mut EncoderScratch<B>,
    sh: &EncoderShape,
    ready: &mut dyn GradsReady<B>,
) -> BResult<()> {
    let d = sh.stack.dim;
    let top = &mut s.stack.d_x;
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
    ready.ready(b, &mut [&mut g.norm.weight, &mut g.norm.bias])?;
    encoder_body_backward(b, p, g, acts, s, sh, 0, ready)
}

/// Backward from `s.stack.d_x`, the gradient of the last block's output (before the final
/// norm), through the blocks `first..` and, when `first == 0`, the embedding. Partial
/// fine-tuning passes the first trained block. Gradients go to `ready` as they are finished:
/// the blocks', and with `first == 0` the embedding's (the mask token's among them).
pub fn encoder_body_backward<B: Backend>(
    b: &B,
    p: &Encoder<B::Buf>,
    g: &mut Encoder<B::Buf>,
    acts: &EncoderActs<B>,
    s: &mut EncoderScratch<B>,
    sh: &EncoderShape,
    first: usize,
    ready: &mut dyn GradsReady<B>,
) -> BResult<()> {
    let input = match first {
        0 => &acts.x0,
        _ => &acts.blocks[first - 1].out,
    };
    stack_backward(
        b,
        input,
        &p.blocks[first..],
        &mut g.blocks[first..],
        &acts.blocks[first..],
        &mut s.stack,
        &sh.stack,
        ready,
    )?;
    if first > 0 {
        return Ok(());
    }
    let d_x0 = &s.stack.d_x;
    b.copy_rows_backward(d_x0, &mut g.cls_token, &sh.cls_rows())?;
    if sh.learn_pos_embed {
        b.copy_rows_backward(d_x0, &mut g.pos_embed, &sh.cls_rows())?;
    }
    // The embedded patches' gradient, then the patch embedding's.
    let (input, rows) = if sh.embeds_kept_only() {
        b.copy_rows(&s.stack.d_x, &mut s.d_tokens, &sh.kept_token_grads(), false)?;
        (&acts.kept, sh.batch() * sh.keep)
    } else {
        every_patch_token_grads(b, g, acts, s, sh)?;
        (&acts.patches, sh.batch() * sh.num_patches)
    };
    let (pe, g_pe, d) = (&p.patch_embed, &mut g.patch_embed, sh.stack.dim);
    linear_backward(b, &s.d_tokens, input, pe, g_pe, None, rows, sh.patch_dim, d)?;
    // One group either way, without allocating (a training step allocates nothing).
    let (pe, cls, pos) = (&mut g.patch_embed, &mut g.cls_token, &mut g.pos_embed);
    match g.mask_token.as_mut() {
        Some(mask) => ready.ready(b, &mut [&mut pe.weight, &mut pe.bias, cls, pos, mask]),
        None => ready.ready(b, &mut [&mut pe.weight, &mut pe.bias, cls, pos]),
    }
}
