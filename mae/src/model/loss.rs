//! The reconstruction loss: mean squared error on the removed patches only, against the pixels
//! in `patchify` order (HWC inside a patch), optionally normalized per patch (norm-pix).

use crate::backend::{BResult, Backend, PatchOrder, Patchify};
use crate::config::Config;

/// Target, mask and loss buffers.
pub struct LossActs<B: Backend> {
    /// The official `patchify(imgs)`, `[N L, p p C]`.
    pub pixels: B::Buf,
    /// What the decoder must predict: `pixels`, or `pixels` normalized per patch.
    pub target: B::Buf,
    /// `[N L]`, 1 = removed; written by the caller.
    pub mask: B::Buf,
    /// One element.
    pub loss: B::Buf,
    /// Gradient of the prediction.
    pub d_pred: B::Buf,
}

/// The loss's shape.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossShape {
    /// Images to patches in the target's order.
    pub patchify: Patchify,
    /// Normalize each target patch (unbiased variance, eps 1e-6).
    pub norm_pix: bool,
}

impl LossShape {
    /// The loss of `cfg` at `batch` images.
    pub fn new(cfg: &Config, batch: usize) -> Self {
        LossShape {
            patchify: cfg.patchify(batch, PatchOrder::Hwc),
            norm_pix: cfg.norm_pix_loss,
        }
    }
    /// Patch rows in the batch.
    pub fn rows(&self) -> usize {
        self.patchify.batch * self.patchify.num_patches()
    }
    /// Values per patch.
    pub fn cols(&self) -> usize {
        self.patchify.patch * self.patchify.patch * self.patchify.channels
    }
}

/// Epsilon of the norm-pix target, `(var + 1e-6) ** 0.5` in the official code.
pub const NORM_PIX_EPS: f32 = 1e-6;

impl<B: Backend> LossActs<B> {
    /// Buffers for `sh`.
    pub fn new(b: &B, sh: &LossShape) -> BResult<Self> {
        let len = sh.rows() * sh.cols();
        Ok(LossActs {
            pixels: b.alloc(if sh.norm_pix { len } else { 0 })?,
            target: b.alloc(len)?,
            mask: b.alloc(sh.rows())?,
            loss: b.alloc(1)?,
            d_pred: b.alloc(len)?,
        })
    }
}

/// `acts.loss = masked MSE(pred, target(imgs))`.
pub fn loss_forward<B: Backend>(
    b: &B,
    imgs: &B::Buf,
    pred: &B::Buf,
    acts: &mut LossActs<B>,
    sh: &LossShape,
) -> BResult<()> {
    if sh.norm_pix {
        b.patchify(imgs, &mut acts.pixels, &sh.patchify)?;
        b.normalize_rows(
            &acts.pixels,
            &mut acts.target,
            sh.rows(),
            sh.cols(),
            NORM_PIX_EPS,
        )?;
    } else {
        b.patchify(imgs, &mut acts.target, &sh.patchify)?;
    }
    b.masked_mse_forward(
        pred,
        &acts.target,
        &acts.mask,
        &mut acts.loss,
        sh.rows(),
        sh.cols(),
    )
}

/// Overwrites `acts.d_pred` with `d_loss` times the loss's gradient.
pub fn loss_backward<B: Backend>(
    b: &B,
    pred: &B::Buf,
    acts: &mut LossActs<B>,
    sh: &LossShape,
    d_loss: f32,
) -> BResult<()> {
    b.fill(&mut acts.d_pred, 0.0)?;
    b.masked_mse_backward(
        pred,
        &acts.target,
        &acts.mask,
        &mut acts.d_pred,
        sh.rows(),
        sh.cols(),
        d_loss,
    )
}
