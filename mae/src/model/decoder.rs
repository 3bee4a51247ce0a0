//! The MAE decoder: embed the latent, append one mask token per removed patch, unshuffle to the
//! original patch order (`ids_restore`), add the decoder's position table, run the blocks and
//! predict every patch's pixels. The cls token rides along and is dropped from the prediction.

use super::block::{stack_backward, stack_forward, BlockActs, StackScratch};
use super::layernorm::{layernorm_backward, layernorm_forward, NormActs};
use super::linear::{linear_backward, linear_forward};
use super::{GradsReady, StackDims};
use crate::backend::{BResult, Backend, Gather, RowMap};
use crate::config::Config;
use crate::params::Decoder;
use alloc::vec::Vec;

/// The decoder's shape at one batch size and keep count.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DecoderShape {
    /// Patches per image, L.
    pub num_patches: usize,
    /// Visible patches per image.
    pub keep: usize,
    /// Encoder width.
    pub enc_dim: usize,
    /// Values predicted per patch, `p p C`.
    pub patch_dim: usize,
    /// The blocks: `1 + L` tokens per image.
    pub stack: StackDims,
}

impl DecoderShape {
    /// The shape for `cfg`, `batch` images and `keep` visible patches each.
    pub fn new(cfg: &Config, batch: usize, keep: usize) -> Self {
        let dim = cfg.decoder_embed_dim;
        DecoderShape {
            num_patches: cfg.num_patches(),
            keep,
            enc_dim: cfg.embed_dim,
            patch_dim: cfg.patch_dim(),
            stack: StackDims {
                batch,
                tokens: 1 + cfg.num_patches(),
                dim,
                heads: cfg.decoder_num_heads,
                hidden: cfg.mlp_hidden(dim),
                eps: cfg.norm_eps as f32,
            },
        }
    }
    fn batch(&self) -> usize {
        self.stack.batch
    }
    fn enc_tokens(&self) -> usize {
        1 + self.keep
    }
    /// Embedded latent (cls + visible) into the first `1 + keep` rows of each image's
    /// `[x, mask tokens]` matrix.
    fn embedded_rows(&self) -> RowMap {
        RowMap {
            batch: self.batch(),
            count: self.enc_tokens(),
            cols: self.stack.dim,
            src_stride: self.enc_tokens(),
            src_start: 0,
            src_step: 1,
            dst_stride: self.stack.tokens,
            dst_start: 0,
        }
    }
    /// The mask token into the remaining `L - keep` rows.
    fn mask_rows(&self) -> RowMap {
        RowMap {
            batch: self.batch(),
            count: self.num_patches - self.keep,
            cols: self.stack.dim,
            src_stride: 0,
            src_start: 0,
            src_step: 0,
            dst_stride: self.stack.tokens,
            dst_start: self.enc_tokens(),
        }
    }
    /// Unshuffle: token `t` of an image takes row `ids[t]` of its `[x, mask tokens]` matrix.
    fn unshuffle(&self) -> Gather {
        let tokens = self.stack.tokens;
        Gather::per_item(self.batch(), tokens, self.stack.dim, tokens, tokens, 0)
    }
    /// The whole position table onto every image.
    fn pos_rows(&self) -> RowMap {
        RowMap {
            batch: self.batch(),
            count: self.stack.tokens,
            cols: self.stack.dim,
            src_stride: 0,
            src_start: 0,
            src_step: 1,
            dst_stride: self.stack.tokens,
            dst_start: 0,
        }
    }
    /// Predictions without the cls row.
    fn pred_rows(&self) -> RowMap {
        RowMap {
            batch: self.batch(),
            count: self.num_patches,
            cols: self.patch_dim,
            src_stride: self.stack.tokens,
            src_start: 1,
            src_step: 1,
            dst_stride: self.num_patches,
            dst_start: 0,
        }
    }
    /// The predictions' gradient back to every token's rows but the cls row's (the inverse of
    /// `pred_rows`, which reads each row once: a copy, not a sum).
    fn pred_grad_rows(&self) -> RowMap {
        RowMap {
            src_stride: self.num_patches,
            src_start: 0,
            dst_stride: self.stack.tokens,
            dst_start: 1,
            ..self.pred_rows()
        }
    }
    /// The embedded latent's gradient out of each image's first `1 + keep` rows (the inverse
    /// of `embedded_rows`).
    fn embedded_grad_rows(&self) -> RowMap {
        RowMap {
            src_stride: self.stack.tokens,
            dst_stride: self.enc_tokens(),
            ..self.embedded_rows()
        }
    }
}

/// The unshuffle indices of one batch: for each image, `0` (cls) then `1 + ids_restore[l]`.
pub fn unshuffle_indices(ids_restore: &[u32], num_patches: usize, out: &mut [u32]) {
    for (src, dst) in ids_restore
        .chunks_exact(num_patches)
        .zip(out.chunks_exact_mut(num_patches + 1))
    {
        dst[0] = 0;
        for (d, &s) in dst[1..].iter_mut().zip(src) {
            *d = s + 1;
        }
    }
}

/// The inverse of [`unshuffle_indices`]: for each image, row `j` of its `[x, mask tokens]`
/// matrix becomes token `out[j]` (`0` for cls, `1 + l` for row `1 + ids_restore[l]`). The
/// unshuffle is a permutation, so its backward gathers the tokens' gradients back with these
/// instead of scattering them into zeros. `ids_restore` holds a permutation per image, as
/// [`crate::masking::Masking`] makes it.
///
/// # Panics
/// If an entry of `ids_restore` is `num_patches` or more.
pub fn unshuffle_inverse_indices(ids_restore: &[u32], num_patches: usize, out: &mut [u32]) {
    for (src, dst) in ids_restore
        .chunks_exact(num_patches)
        .zip(out.chunks_exact_mut(num_patches + 1))
    {
        dst[0] = 0;
        for (l, &s) in src.iter().enumerate() {
            dst[1 + s as usize] = 1 + l as u32;
        }
    }
}

/// The decoder's activations.
pub struct DecoderActs<B: Backend> {
    /// `decoder_embed(latent)`, `[N (1 + keep), Dd]`.
    pub embedded: B::Buf,
    /// Per image: the embedded tokens, then mask tokens, `[N (1 + L), Dd]`.
    pub with_mask: B::Buf,
    /// Unshuffled, plus positions: the first block's input.
    pub x0: B::Buf,
    /// One per block.
    pub blocks: Vec<BlockActs<B>>,
    /// Which `blocks` entry holds the last block's output.
    pub last: usize,
    /// `decoder_norm`.
    pub norm: NormActs<B>,
    /// `decoder_pred` on every token, `[N (1 + L), p p C]`.
    pub pred_all: B::Buf,
    /// The prediction without cls, `[N L, p p C]`.
    pub pred: B::Buf,
    /// `[N, 1 + L]` unshuffle indices, written by the caller (see [`unshuffle_indices`]).
    pub ids_unshuffle: B::Idx,
    /// `[N, 1 + L]` their inverse, written by the caller (see [`unshuffle_inverse_indices`]).
    pub ids_unshuffle_inverse: B::Idx,
}

impl<B: Backend> DecoderActs<B> {
    /// Buffers for `sh`.
    pub fn new(b: &B, sh: &DecoderShape, depth: usize) -> BResult<Self> {
        let (rows, dim) = (sh.stack.rows(), sh.stack.dim);
        Ok(DecoderActs {
            embedded: b.alloc(sh.batch() * sh.enc_tokens() * dim)?,
            with_mask: b.alloc(rows * dim)?,
            x0: b.alloc(rows * dim)?,
            blocks: (0..depth)
                .map(|_| BlockActs::new(b, &sh.stack))
                .collect::<BResult<_>>()?,
            last: 0,
            norm: NormActs::new(b, rows, dim)?,
            pred_all: b.alloc(rows * sh.patch_dim)?,
            pred: b.alloc(sh.batch() * sh.num_patches * sh.patch_dim)?,
            ids_unshuffle: b.upload_idx(&alloc::vec![0; sh.stack.batch * sh.stack.tokens])?,
            ids_unshuffle_inverse: b
                .upload_idx(&alloc::vec![0; sh.stack.batch * sh.stack.tokens])?,
        })
    }
}

/// Gradient buffers of the decoder's backward.
pub struct DecoderScratch<B: Backend> {
    /// Shared by the blocks.
    pub stack: StackScratch<B>,
    /// Gradient of `pred_all`; its cls rows are zero (never written).
    pub d_pred_all: B::Buf,
    /// Gradient of `norm.y`.
    pub d_norm: B::Buf,
    /// Gradient of `with_mask`.
    pub d_with_mask: B::Buf,
    /// Gradient of `embedded`.
    pub d_embedded: B::Buf,
}

impl<B: Backend> DecoderScratch<B> {
    /// Buffers for `sh`.
    pub fn new(b: &B, sh: &DecoderShape) -> BResult<Self> {
        let (rows, dim) = (sh.stack.rows(), sh.stack.dim);
        Ok(DecoderScratch {
            stack: StackScratch::new(b, &sh.stack, true)?,
            d_pred_all: b.alloc(rows * sh.patch_dim)?,
            d_norm: b.alloc(rows * dim)?,
            d_with_mask: b.alloc(rows * dim)?,
            d_embedded: b.alloc(sh.batch() * sh.enc_tokens() * dim)?,
        })
    }
}

/// The latent `[N (1 + keep), D]` to the prediction `acts.pred [N L, p p C]`.
pub fn decoder_forward<B: Backend>(
    b: &B,
    latent: &B::Buf,
    p: &Decoder<B::Buf>,
    acts: &mut DecoderActs<B>,
    scratch: &mut DecoderScratch<B>,
    sh: &DecoderShape,
) -> BResult<()> {
    let (rows, dim) = (sh.stack.rows(), sh.stack.dim);
    let enc_rows = sh.batch() * sh.enc_tokens();
    linear_forward(
        b,
        latent,
        &p.embed,
        &mut acts.embedded,
        enc_rows,
        sh.enc_dim,
        dim,
        false,
    )?;
    b.copy_rows(
        &acts.embedded,
        &mut acts.with_mask,
        &sh.embedded_rows(),
        false,
    )?;
    if sh.keep < sh.num_patches {
        b.copy_rows(&p.mask_token, &mut acts.with_mask, &sh.mask_rows(), false)?;
    }
    b.gather_rows(
        &acts.with_mask,
        &acts.ids_unshuffle,
        &mut acts.x0,
        &sh.unshuffle(),
    )?;
    b.copy_rows(&p.pos_embed, &mut acts.x0, &sh.pos_rows(), true)?;
    let attn = &mut scratch.stack.block;
    acts.last = stack_forward(b, &acts.x0, &p.blocks, &mut acts.blocks, attn, &sh.stack)?;
    let out = &acts.blocks[acts.last].out;
    layernorm_forward(b, out, &p.norm, &mut acts.norm, rows, dim, sh.stack.eps)?;
    linear_forward(
        b,
        &acts.norm.y,
        &p.pred,
        &mut acts.pred_all,
        rows,
        dim,
        sh.patch_dim,
        false,
    )?;
    b.copy_rows(&acts.pred_all, &mut acts.pred, &sh.pred_rows(), false)
}

/// Given the gradient of the prediction, accumulates the decoder's parameter gradients and
/// overwrites `d_latent`. Gradients go to `ready` as they are finished (see [`GradsReady`]).
pub fn decoder_backward<B: Backend>(
    b: &B,
    d_pred: &B::Buf,
    latent: &B::Buf,
    p: &Decoder<B::Buf>,
    g: &mut Decoder<B::Buf>,
    acts: &DecoderActs<B>,
    s: &mut DecoderScratch<B>,
    d_latent: &mut B::Buf,
    sh: &DecoderShape,
    ready: &mut dyn GradsReady<B>,
) -> BResult<()> {
    let (rows, dim) = (sh.stack.rows(), sh.stack.dim);
    // The cls row has no prediction: its rows of d_pred_all are never written and keep the
    // zeros they were allocated with.
    b.copy_rows(d_pred, &mut s.d_pred_all, &sh.pred_grad_rows(), false)?;
    let norm_y = &acts.norm.y;
    linear_backward(
        b,
        &s.d_pred_all,
        norm_y,
        &p.pred,
        &mut g.pred,
        Some(&mut s.d_norm),
        rows,
        dim,
        sh.patch_dim,
    )?;
    let top = &mut s.stack.d_x;
    b.fill(top, 0.0)?;
    let out = &acts.blocks[acts.last].out;
    layernorm_backward(
        b,
        &s.d_norm,
        out,
        &p.norm,
        &acts.norm,
        &mut g.norm,
        top,
        rows,
        dim,
    )?;
    let (pred, norm) = (&mut g.pred, &mut g.norm);
    ready.ready(
        b,
        &mut [
            &mut pred.weight,
            &mut pred.bias,
            &mut norm.weight,
            &mut norm.bias,
        ],
    )?;
    stack_backward(
        b,
        &acts.x0,
        &p.blocks,
        &mut g.blocks,
        &acts.blocks,
        &mut s.stack,
        &sh.stack,
        ready,
    )?;
    // The unshuffle's backward: each row of `with_mask` went to one token.
    b.gather_rows(
        &s.stack.d_x,
        &acts.ids_unshuffle_inverse,
        &mut s.d_with_mask,
        &sh.unshuffle(),
    )?;
    if sh.keep < sh.num_patches {
        b.copy_rows_backward(&s.d_with_mask, &mut g.mask_token, &sh.mask_rows())?;
    }
    b.copy_rows(
        &s.d_with_mask,
        &mut s.d_embedded,
        &sh.embedded_grad_rows(),
        false,
    )?;
    let enc_rows = sh.batch() * sh.enc_tokens();
    linear_backward(
        b,
        &s.d_embedded,
        latent,
        &p.embed,
        &mut g.embed,
        Some(d_latent),
        enc_rows,
        sh.enc_dim,
        dim,
    )?;
    // The position table is fixed: its gradient stays zero, and is final from the start.
    let (embed, mask, pos) = (&mut g.embed, &mut g.mask_token, &mut g.pos_embed);
    ready.ready(b, &mut [&mut embed.weight, &mut embed.bias, mask, pos])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::masking::Masking;
    use alloc::vec;

    /// Gathering with the unshuffle and then with its inverse gives every row back, per image.
    #[test]
    fn the_inverse_unshuffle_undoes_the_unshuffle() {
        let (batch, l) = (2, 6);
        let mut m = Masking::new(batch, l, 0.5).unwrap();
        m.apply_noise(&[0.9, 0.1, 0.5, 0.3, 0.7, 0.2, 0.4, 0.8, 0.0, 0.6, 0.35, 0.15])
            .unwrap();
        let (mut ids, mut inverse) = (vec![0; batch * (1 + l)], vec![0; batch * (1 + l)]);
        unshuffle_indices(&m.ids_restore, l, &mut ids);
        unshuffle_inverse_indices(&m.ids_restore, l, &mut inverse);
        for (ids, inverse) in ids.chunks(1 + l).zip(inverse.chunks(1 + l)) {
            for t in 0..=l {
                assert_eq!(inverse[ids[t] as usize], t as u32, "{ids:?} {inverse:?}");
            }
        }
        // The unshuffle is not the identity here, so an "inverse" returning its input fails.
        assert_ne!(ids[..1 + l], [0, 1, 2, 3, 4, 5, 6]);
    }
}
