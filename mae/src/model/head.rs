//! The classification head of fine-tuning (`models_vit.py`): pool the encoder's tokens, then one
//! linear layer. With mean pooling (`global_pool`, the paper's fine-tuning) the patch tokens of
//! the last block are averaged and go through `fc_norm`; with cls pooling the cls token after
//! the encoder's final `norm` is used as is.

use super::layernorm::{layernorm_backward, layernorm_forward, NormActs};
use super::linear::{linear_backward, linear_forward};
use crate::backend::{BResult, Backend, BackendError, BackendErrorKind, RowMap};
use crate::embed::Pool;
use crate::params::{Head, Norm};

/// The head's shape at one batch size.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HeadShape {
    /// Images in the batch.
    pub batch: usize,
    /// Tokens per image coming from the encoder, cls included.
    pub tokens: usize,
    /// Encoder width.
    pub dim: usize,
    /// Classes.
    pub classes: usize,
    /// How tokens become one feature vector.
    pub pool: Pool,
    /// `fc_norm`'s epsilon.
    pub eps: f32,
}

impl HeadShape {
    /// Mean pooling as the sum over patch rows: the backward of broadcasting one row to them.
    fn patch_rows(&self) -> RowMap {
        RowMap {
            batch: self.batch,
            count: self.tokens - 1,
            cols: self.dim,
            src_stride: 1,
            src_start: 0,
            src_step: 0,
            dst_stride: self.tokens,
            dst_start: 1,
        }
    }
    /// The cls row of each image.
    fn cls_row(&self) -> RowMap {
        RowMap {
            batch: self.batch,
            count: 1,
            cols: self.dim,
            src_stride: self.tokens,
            src_start: 0,
            src_step: 0,
            dst_stride: 1,
            dst_start: 0,
        }
    }
}

/// The head's activations.
pub struct HeadActs<B: Backend> {
    /// One vector per image, `[N, D]`.
    pub pooled: B::Buf,
    /// `fc_norm(pooled)` (mean pooling only).
    pub norm: NormActs<B>,
    /// `[N, classes]`.
    pub logits: B::Buf,
}

impl<B: Backend> HeadActs<B> {
    /// Buffers for `sh`.
    pub fn new(b: &B, sh: &HeadShape) -> BResult<Self> {
        let norm_rows = if sh.pool == Pool::Mean { sh.batch } else { 0 };
        Ok(HeadActs {
            pooled: b.alloc(sh.batch * sh.dim)?,
            norm: NormActs::new(b, norm_rows, sh.dim)?,
            logits: b.alloc(sh.batch * sh.classes)?,
        })
    }
}

/// Gradient buffers of the head's backward.
pub struct HeadScratch<B: Backend> {
    /// Gradient of the head's input features.
    pub d_features: B::Buf,
    /// Gradient of `pooled`.
    pub d_pooled: B::Buf,
}

impl<B: Backend> HeadScratch<B> {
    /// Buffers for `sh`.
    pub fn new(b: &B, sh: &HeadShape) -> BResult<Self> {
        Ok(HeadScratch {
            d_features: b.alloc(sh.batch * sh.dim)?,
            d_pooled: b.alloc(sh.batch * sh.dim)?,
        })
    }
}

fn fc_norm<T>(p: &Head<T>) -> BResult<&Norm<T>> {
    p.fc_norm.as_ref().ok_or_else(|| {
        BackendError::new(BackendErrorKind::Unsupported, "mean pooling needs fc_norm")
    })
}

/// `tokens [N T, D]` to `acts.logits [N, classes]`. `tokens` is the last block's output for
/// mean pooling and the encoder's final norm output for cls pooling.
pub fn head_forward<B: Backend>(
    b: &B,
    tokens: &B::Buf,
    p: &Head<B::Buf>,
    acts: &mut HeadActs<B>,
    sh: &HeadShape,
) -> BResult<()> {
    let (n, d) = (sh.batch, sh.dim);
    let features = match sh.pool {
        Pool::Mean => {
            b.fill(&mut acts.pooled, 0.0)?;
            b.copy_rows_backward(tokens, &mut acts.pooled, &sh.patch_rows())?;
            b.scale(&mut acts.pooled, 1.0 / (sh.tokens - 1) as f32)?;
            layernorm_forward(b, &acts.pooled, fc_norm(p)?, &mut acts.norm, n, d, sh.eps)?;
            &acts.norm.y
        }
        Pool::Cls => {
            b.copy_rows(tokens, &mut acts.pooled, &sh.cls_row(), false)?;
            &acts.pooled
        }
    };
    linear_forward(
        b,
        features,
        &p.linear,
        &mut acts.logits,
        n,
        d,
        sh.classes,
        false,
    )
}

/// Given the gradient of the logits, accumulates the head's parameter gradients and overwrites
/// `d_tokens` (`[N T, D]`, the gradient of the head's input).
pub fn head_backward<B: Backend>(
    b: &B,
    d_logits: &B::Buf,
    p: &Head<B::Buf>,
    g: &mut Head<B::Buf>,
    acts: &HeadActs<B>,
    s: &mut HeadScratch<B>,
    d_tokens: &mut B::Buf,
    sh: &HeadShape,
) -> BResult<()> {
    let (n, d) = (sh.batch, sh.dim);
    let features = match sh.pool {
        Pool::Mean => &acts.norm.y,
        Pool::Cls => &acts.pooled,
    };
    let d_features = Some(&mut s.d_features);
    linear_backward(
        b,
        d_logits,
        features,
        &p.linear,
        &mut g.linear,
        d_features,
        n,
        d,
        sh.classes,
    )?;
    match sh.pool {
        Pool::Mean => {
            let g_norm = g.fc_norm.as_mut().ok_or_else(|| {
                BackendError::new(BackendErrorKind::Unsupported, "no fc_norm gradient")
            })?;
            b.fill(&mut s.d_pooled, 0.0)?;
            let (x, norm) = (&acts.pooled, fc_norm(p)?);
            let d_pooled = &mut s.d_pooled;
            layernorm_backward(
                b,
                &s.d_features,
                x,
                norm,
                &acts.norm,
                g_norm,
                d_pooled,
                n,
                d,
            )?;
            b.scale(d_pooled, 1.0 / (sh.tokens - 1) as f32)?;
            b.fill(d_tokens, 0.0)?;
            b.copy_rows(d_pooled, d_tokens, &sh.patch_rows(), false)
        }
        Pool::Cls => {
            b.fill(d_tokens, 0.0)?;
            b.copy_rows_backward(&s.d_features, d_tokens, &sh.cls_row())
        }
    }
}
