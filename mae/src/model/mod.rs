//! The model, one function per layer and direction, forward next to backward (llm.c style).
//!
//! | paper / official code               | here                                   |
//! |-------------------------------------|----------------------------------------|
//! | `PatchEmbed` + `pos_embed`          | [`encoder`]: `encoder_forward`, start  |
//! | `random_masking`                    | [`crate::masking`] (host), applied by the gather in [`encoder`] |
//! | `Block` (pre-LN attention + MLP)    | [`block`], [`attention`], [`mlp`], [`layernorm`], [`linear`] |
//! | `forward_decoder` (mask tokens, unshuffle) | [`decoder`]                     |
//! | `forward_loss` (norm-pix, masked MSE) | [`loss`]                              |
//!
//! Activations live in `*Acts` structs allocated once per configuration and batch size; the
//! backward of a stack reuses one `*Scratch` of gradient buffers for all its blocks.
// Layer functions take buffers then dimensions, like llm.c's kernels.
#![allow(clippy::too_many_arguments)]

pub mod attention;
pub mod block;
pub mod decoder;
pub mod encoder;
pub mod head;
pub mod layernorm;
pub mod linear;
pub mod loss;
pub mod mlp;

use crate::backend::{BResult, Backend};

/// Told by a backward pass which parameter gradients are final: no later op of the same
/// backward writes them. A data-parallel job starts averaging those across its ranks while the
/// rest of the backward runs (`DataParallel` in `mae-backend-cuda`); `()` ignores the reports.
///
/// A training backward ([`crate::train::Trainer::backward_reporting`]) reports every gradient
/// tensor exactly once, in the order it finishes them: the decoder's prediction and norm, its
/// blocks from the last, its embedding; the encoder's norm, its blocks from the last, its
/// embedding. The order depends only on the model, so it is the same on every rank.
///
/// ```
/// use mae::backend::{BResult, Backend};
/// use mae::model::GradsReady;
///
/// /// Counts the floats handed over, group by group.
/// struct Count(Vec<usize>);
///
/// impl<B: Backend> GradsReady<B> for Count {
///     fn ready(&mut self, b: &B, grads: &mut [&mut B::Buf]) -> BResult<()> {
///         self.0.push(grads.iter().map(|g| b.len(g)).sum());
///         Ok(())
///     }
/// }
///
/// # fn demo<B: mae::Backend>(backend: &B) -> mae::Result<()> {
/// let cfg = mae::Config::preset("tiny32")?;
/// let params = mae::init::init_params(&cfg, 0);
/// let opts = mae::train::TrainOptions::new(8);
/// let mut trainer = mae::train::Trainer::new(backend, &cfg, &params, opts, 0)?;
/// let imgs = vec![0.5f32; 8 * 3 * 32 * 32];
/// let mut count = Count(Vec::new());
/// trainer.forward_backward_reporting(backend, &imgs, None, &mut count)?;
/// let total: usize = trainer.grads().tensors().map(|g| backend.len(g)).sum();
/// assert_eq!(count.0.iter().sum::<usize>(), total);
/// # Ok(()) }
/// ```
pub trait GradsReady<B: Backend> {
    /// `grads` are final for this backward (ops already queued on `b` write them last).
    fn ready(&mut self, b: &B, grads: &mut [&mut B::Buf]) -> BResult<()>;
}

/// Ignores the reports.
impl<B: Backend> GradsReady<B> for () {
    fn ready(&mut self, _: &B, _: &mut [&mut B::Buf]) -> BResult<()> {
        Ok(())
    }
}

/// The shape of one transformer stack at one batch size.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StackDims {
    /// Images in the batch.
    pub batch: usize,
    /// Tokens per image (cls included).
    pub tokens: usize,
    /// Width.
    pub dim: usize,
    /// Attention heads.
    pub heads: usize,
    /// MLP hidden width.
    pub hidden: usize,
    /// LayerNorm epsilon.
    pub eps: f32,
}

impl StackDims {
    /// Token rows in the batch.
    pub fn rows(&self) -> usize {
        self.batch * self.tokens
    }
    /// Width of one head.
    pub fn head_dim(&self) -> usize {
        self.dim / self.heads
    }
}

/// The previous element (read) and the current one (written) of a slice of per-layer buffers.
pub(crate) fn prev_and_cur<T>(v: &mut [T], prev: usize, cur: usize) -> (&T, &mut T) {
    assert_ne!(prev, cur, "a layer cannot read and write the same buffers");
    if prev < cur {
        let (a, b) = v.split_at_mut(cur);
        (&a[prev], &mut b[0])
    } else {
        let (a, b) = v.split_at_mut(prev);
        (&b[0], &mut a[cur])
    }
}
