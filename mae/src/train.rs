//! One pre-training step: masking, forward, loss, backward, AdamW, on any backend.
//!
//! ```text
//!  imgs ─ patchify ─ patch_embed ─ +pos ─ keep visible ─ [cls] ─ blocks ─ norm ─► latent
//!                                          (ids_keep)                              │
//!  loss ◄─ masked MSE ◄─ pred ◄─ decoder_pred ◄─ norm ◄─ blocks ◄─ +pos ◄─ unshuffle ◄─ decoder_embed
//!   │        (mask)                                             (ids_restore, mask tokens)
//!   └────────── the same path backwards, then AdamW ──────────────────────────────►
//! ```

use crate::backend::Backend;
use crate::config::{Config, ConfigError};
use crate::error::{finite_loss, Error, Result};
use crate::masking::{check_ratio, keep_count, sample_noise, MaskSampling, Masking};
use crate::model::decoder::{
    decoder_backward, decoder_forward, unshuffle_indices, unshuffle_inverse_indices, DecoderActs,
    DecoderScratch, DecoderShape,
};
use crate::model::encoder::{
    encoder_backward, encoder_forward, mask_token_indices, EncoderActs, EncoderScratch,
    EncoderShape,
};
use crate::model::loss::{loss_backward, loss_forward, LossActs, LossShape};
use crate::model::GradsReady;
use crate::optim::{adamw_update, AdamW};
use crate::params::{mae_specs, MaeParams, TensorSpec};
use crate::rng::Rng;
use crate::weights::check_lengths;
use alloc::vec;
use alloc::vec::Vec;

/// Settings of a training run that shape the step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TrainOptions {
    /// Images per micro-batch.
    pub batch_size: usize,
    /// Fraction of patches removed (0.75 in the paper).
    pub mask_ratio: f64,
    /// AdamW settings.
    pub adamw: AdamW,
    /// Micro-batches whose gradients are summed (each loss divided by this) before one update.
    pub accum_steps: usize,
    /// Which patches are removed when the trainer draws the masking itself.
    pub mask_sampling: MaskSampling,
}

impl TrainOptions {
    /// The paper's settings at `batch_size`.
    pub fn new(batch_size: usize) -> Self {
        TrainOptions {
            batch_size,
            mask_ratio: 0.75,
            adamw: AdamW::default(),
            accum_steps: 1,
            mask_sampling: MaskSampling::Random,
        }
    }

    /// Checks the options against `cfg`.
    pub fn validate(&self, cfg: &Config) -> core::result::Result<(), ConfigError> {
        if self.batch_size == 0 || self.accum_steps == 0 {
            return Err(ConfigError::EmptyBatch);
        }
        check_ratio(self.mask_ratio)?;
        self.mask_sampling.check(cfg.grid_size(), self.mask_ratio)?;
        if keep_count(cfg.num_patches(), self.mask_ratio) >= cfg.num_patches() {
            return Err(ConfigError::MaskRemovesNothing {
                mask_ratio: self.mask_ratio,
                num_patches: cfg.num_patches(),
            });
        }
        self.adamw.validate()
    }
}

/// Everything needed to continue a run exactly: weights, AdamW moments, counters, RNG.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainState {
    /// Weights.
    pub params: MaeParams<Vec<f32>>,
    /// AdamW first moments.
    pub m: MaeParams<Vec<f32>>,
    /// AdamW second moments.
    pub v: MaeParams<Vec<f32>>,
    /// Optimizer updates done.
    pub updates: u64,
    /// State of the masking-noise generator.
    pub rng_state: u64,
}

/// A model being pre-trained, with every buffer its step needs, allocated once.
///
/// ```
/// # fn demo<B: mae::Backend>(backend: &B) -> mae::Result<()> {
/// let cfg = mae::Config::preset("tiny32")?;
/// let params = mae::init::init_params(&cfg, 0);
/// let mut trainer = mae::train::Trainer::new(backend, &cfg, &params, mae::train::TrainOptions::new(8), 0)?;
/// let imgs = vec![0.5f32; 8 * 3 * 32 * 32];
/// let loss = trainer.train_step(backend, &imgs, None, 1e-4)?;
/// assert!(loss.is_finite());
/// # Ok(()) }
/// ```
pub struct Trainer<B: Backend> {
    cfg: Config,
    opts: TrainOptions,
    specs: MaeParams<TensorSpec>,
    params: MaeParams<B::Buf>,
    grads: MaeParams<B::Buf>,
    m: MaeParams<B::Buf>,
    v: MaeParams<B::Buf>,
    enc_shape: EncoderShape,
    dec_shape: DecoderShape,
    loss_shape: LossShape,
    imgs: B::Buf,
    enc: EncoderActs<B>,
    enc_scratch: EncoderScratch<B>,
    dec: DecoderActs<B>,
    dec_scratch: DecoderScratch<B>,
    loss: LossActs<B>,
    d_latent: B::Buf,
    masking: Masking,
    /// With mask tokens in the encoder: its gather indices (`j` or `L + j` per patch).
    mask_token_ids: Vec<u32>,
    unshuffle: Vec<u32>,
    noise: Vec<f32>,
    rng: Rng,
    updates: u64,
    pending: usize,
    forward_done: bool,
}

impl<B: Backend> Trainer<B> {
    /// Uploads `params` and allocates every buffer of the step. `seed` drives the masking noise.
    pub fn new(
        b: &B,
        cfg: &Config,
        params: &MaeParams<Vec<f32>>,
        opts: TrainOptions,
        seed: u64,
    ) -> Result<Self> {
        cfg.validate()?;
        opts.validate(cfg)?;
        let specs = mae_specs(cfg);
        check_lengths(specs.tensors(), params.tensors())?;
        let n = opts.batch_size;
        let l = cfg.num_patches();
        let masking = Masking::new(n, l, opts.mask_ratio)?;
        let keep = masking.len_keep;
        let enc_shape = EncoderShape::pretraining(cfg, n, keep);
        // With mask tokens in the encoder, the decoder receives every patch and adds none.
        let dec_shape = DecoderShape::new(cfg, n, enc_shape.keep);
        let loss_shape = LossShape::new(cfg, n);
        let mut dec = DecoderActs::new(b, &dec_shape, cfg.decoder_depth)?;
        if enc_shape.mask_tokens {
            let identity: Vec<u32> = (0..n).flat_map(|_| 0..=l as u32).collect();
            b.write_idx(&mut dec.ids_unshuffle, &identity)?;
            b.write_idx(&mut dec.ids_unshuffle_inverse, &identity)?;
        }
        let zeros_like = |s: &TensorSpec| b.alloc(s.numel());
        Ok(Trainer {
            params: params.try_map(|t| b.upload(t))?,
            grads: specs.try_map(zeros_like)?,
            m: specs.try_map(zeros_like)?,
            v: specs.try_map(zeros_like)?,
            imgs: b.alloc(n * cfg.in_chans * cfg.img_size * cfg.img_size)?,
            enc: EncoderActs::new(b, &enc_shape, true, cfg.depth)?,
            enc_scratch: EncoderScratch::new(b, &enc_shape, true, false)?,
            mask_token_ids: vec![0; if enc_shape.mask_tokens { n * l } else { 0 }],
            dec,
            dec_scratch: DecoderScratch::new(b, &dec_shape)?,
            loss: LossActs::new(b, &loss_shape)?,
            d_latent: b.alloc(enc_shape.stack.rows() * cfg.embed_dim)?,
            unshuffle: vec![0; n * (1 + l)],
            noise: vec![0.0; n * l],
            rng: Rng::new(seed),
            masking,
            enc_shape,
            dec_shape,
            loss_shape,
            specs,
            cfg: cfg.clone(),
            opts,
            updates: 0,
            pending: 0,
            forward_done: false,
        })
    }

    /// Continues a run saved with [`Trainer::state`].
    pub fn from_state(b: &B, cfg: &Config, state: &TrainState, opts: TrainOptions) -> Result<Self> {
        let mut t = Trainer::new(b, cfg, &state.params, opts, state.rng_state)?;
        check_lengths(t.specs.tensors(), state.m.tensors())?;
        check_lengths(t.specs.tensors(), state.v.tensors())?;
        for (dst, src) in t.m.tensors_mut().zip(state.m.tensors()) {
            b.write(dst, src)?;
        }
        for (dst, src) in t.v.tensors_mut().zip(state.v.tensors()) {
            b.write(dst, src)?;
        }
        t.updates = state.updates;
        Ok(t)
    }

    /// Runs the forward pass on `imgs` (`[batch, C, H, W]`, normalized) and returns the loss.
    /// `noise` (`[batch, L]`) decides the masking; `None` draws it from the trainer's generator.
    pub fn forward(&mut self, b: &B, imgs: &[f32], noise: Option<&[f32]>) -> Result<f32> {
        let c = &self.cfg;
        let n = self.opts.batch_size;
        if imgs.len() != n * c.in_chans * c.img_size * c.img_size {
            return Err(Error::Shape {
                what: "images",
                expected: vec![n, c.in_chans, c.img_size, c.img_size],
                got: vec![imgs.len()],
            });
        }
        match noise {
            Some(noise) => self.masking.apply_noise(noise)?,
            None => {
                let (sampling, grid) = (self.opts.mask_sampling, c.grid_size());
                let ratio = self.opts.mask_ratio;
                sample_noise(sampling, grid, ratio, &mut self.rng, &mut self.noise)?;
                self.masking.apply_noise(&self.noise)?;
            }
        }
        let l = c.num_patches();
        if self.enc_shape.mask_tokens {
            // Every patch stays in place: visible ones as tokens, removed ones as mask tokens;
            // the decoder's unshuffle is the identity, written once in `new`.
            mask_token_indices(&self.masking.mask, l, &mut self.mask_token_ids);
            b.write_idx(&mut self.enc.ids_keep, &self.mask_token_ids)?;
        } else {
            unshuffle_indices(&self.masking.ids_restore, l, &mut self.unshuffle);
            b.write_idx(&mut self.enc.ids_keep, &self.masking.ids_keep)?;
            b.write_idx(&mut self.dec.ids_unshuffle, &self.unshuffle)?;
            unshuffle_inverse_indices(&self.masking.ids_restore, l, &mut self.unshuffle);
            b.write_idx(&mut self.dec.ids_unshuffle_inverse, &self.unshuffle)?;
        }
        b.write(&mut self.loss.mask, &self.masking.mask)?;
        b.write(&mut self.imgs, imgs)?;

        let (enc, dec) = (&self.params.encoder, &self.params.decoder);
        encoder_forward(
            b,
            &self.imgs,
            enc,
            &mut self.enc,
            &mut self.enc_scratch,
            &self.enc_shape,
        )?;
        decoder_forward(
            b,
            &self.enc.norm.y,
            dec,
            &mut self.dec,
            &mut self.dec_scratch,
            &self.dec_shape,
        )?;
        loss_forward(
            b,
            &self.imgs,
            &self.dec.pred,
            &mut self.loss,
            &self.loss_shape,
        )?;
        let mut loss = [0.0f32];
        b.download(&self.loss.loss, &mut loss)?;
        self.forward_done = true;
        Ok(loss[0])
    }

    /// Backward of the last forward: adds this micro-batch's gradients (loss divided by the
    /// accumulation steps) to the accumulated ones.
    pub fn backward(&mut self, b: &B) -> Result<()> {
        self.backward_reporting(b, &mut ())
    }

    /// [`Trainer::backward`], handing `ready` each group of gradients (a block's, a head's, an
    /// embedding's) as soon as their last op is queued, so that averaging them across
    /// data-parallel ranks overlaps the rest of the backward. Every gradient tensor of
    /// [`Trainer::grads`] is handed over exactly once, in the order [`GradsReady`] describes.
    pub fn backward_reporting(&mut self, b: &B, ready: &mut dyn GradsReady<B>) -> Result<()> {
        if !self.forward_done {
            return Err(Error::Input("backward called without a forward".into()));
        }
        let d_loss = 1.0 / self.opts.accum_steps as f32;
        let (p, g) = (&self.params, &mut self.grads);
        let pred = &self.dec.pred;
        loss_backward(b, pred, &mut self.loss, &self.loss_shape, d_loss)?;
        let latent = &self.enc.norm.y;
        decoder_backward(
            b,
            &self.loss.d_pred,
            latent,
            &p.decoder,
            &mut g.decoder,
            &self.dec,
            &mut self.dec_scratch,
            &mut self.d_latent,
            &self.dec_shape,
            ready,
        )?;
        encoder_backward(
            b,
            &self.d_latent,
            &p.encoder,
            &mut g.encoder,
            &self.enc,
            &mut self.enc_scratch,
            &self.enc_shape,
            ready,
        )?;
        self.forward_done = false;
        self.pending += 1;
        Ok(())
    }

    /// Forward and backward of one micro-batch; a NaN or infinite loss stops before the
    /// backward with [`Error::NonFiniteLoss`].
    pub fn forward_backward(&mut self, b: &B, imgs: &[f32], noise: Option<&[f32]>) -> Result<f32> {
        self.forward_backward_reporting(b, imgs, noise, &mut ())
    }

    /// [`Trainer::forward_backward`] with the backward's reports to `ready`
    /// ([`Trainer::backward_reporting`]).
    pub fn forward_backward_reporting(
        &mut self,
        b: &B,
        imgs: &[f32],
        noise: Option<&[f32]>,
        ready: &mut dyn GradsReady<B>,
    ) -> Result<f32> {
        let loss = self.forward(b, imgs, noise)?;
        self.forward_done = loss.is_finite();
        let loss = finite_loss(loss, self.updates)?;
        self.backward_reporting(b, ready)?;
        Ok(loss)
    }

    /// One AdamW update at learning rate `lr` from the accumulated gradients, which are then
    /// zeroed.
    pub fn update(&mut self, b: &B, lr: f64) -> Result<()> {
        let t = self.updates + 1;
        let tensors = self
            .params
            .tensors_mut()
            .zip(self.grads.tensors_mut())
            .zip(self.m.tensors_mut().zip(self.v.tensors_mut()))
            .zip(self.specs.tensors().map(|s| (s.role, 1.0)));
        adamw_update(b, &self.opts.adamw, lr, t, tensors)?;
        self.updates = t;
        self.pending = 0;
        Ok(())
    }

    /// One micro-batch; after `accum_steps` of them, one update at `lr`. Returns the loss.
    pub fn train_step(
        &mut self,
        b: &B,
        imgs: &[f32],
        noise: Option<&[f32]>,
        lr: f64,
    ) -> Result<f32> {
        let loss = self.forward_backward(b, imgs, noise)?;
        if self.pending == self.opts.accum_steps {
            self.update(b, lr)?;
        }
        Ok(loss)
    }

    /// The model configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }
    /// The run's options.
    pub fn options(&self) -> &TrainOptions {
        &self.opts
    }
    /// Optimizer updates done.
    pub fn updates(&self) -> u64 {
        self.updates
    }
    /// Micro-batches accumulated since the last update.
    pub fn pending(&self) -> usize {
        self.pending
    }
    /// The masking of the last forward.
    pub fn masking(&self) -> &Masking {
        &self.masking
    }
    /// Names, shapes and optimizer groups of the tensors.
    pub fn specs(&self) -> &MaeParams<TensorSpec> {
        &self.specs
    }
    /// The device weights.
    pub fn params(&self) -> &MaeParams<B::Buf> {
        &self.params
    }
    /// The device gradients accumulated since the last update.
    pub fn grads(&self) -> &MaeParams<B::Buf> {
        &self.grads
    }

    /// The accumulated gradients, to change between [`Trainer::backward`] and
    /// [`Trainer::update`]: data-parallel training averages them across processes there.
    pub fn grads_mut(&mut self) -> &mut MaeParams<B::Buf> {
        &mut self.grads
    }

    /// Downloads a collection of device tensors.
    pub fn download(&self, b: &B, t: &MaeParams<B::Buf>) -> Result<MaeParams<Vec<f32>>> {
        let mut host = self
            .specs
            .try_map(|s| Ok::<_, Error>(vec![0.0; s.numel()]))?;
        for (h, d) in host.tensors_mut().zip(t.tensors()) {
            b.download(d, h)?;
        }
        Ok(host)
    }

    /// The latent of the last forward, `[batch, 1 + keep, D]` (cls first, after the final norm).
    pub fn latent(&self, b: &B) -> Result<Vec<f32>> {
        let mut out = vec![0.0; self.enc_shape.stack.rows() * self.cfg.embed_dim];
        b.download(&self.enc.norm.y, &mut out)?;
        Ok(out)
    }

    /// The prediction of the last forward, `[batch, L, p p C]` (in the target's space: per-patch
    /// normalized pixels when the model uses norm-pix loss).
    pub fn pred(&self, b: &B) -> Result<Vec<f32>> {
        let mut out = vec![0.0; self.loss_shape.rows() * self.loss_shape.cols()];
        b.download(&self.dec.pred, &mut out)?;
        Ok(out)
    }

    /// Everything needed to resume bitwise: weights, moments, update count, RNG state.
    pub fn state(&self, b: &B) -> Result<TrainState> {
        Ok(TrainState {
            params: self.download(b, &self.params)?,
            m: self.download(b, &self.m)?,
            v: self.download(b, &self.v)?,
            updates: self.updates,
            rng_state: self.rng.state(),
        })
    }
}
