//! Embedding whole images with a pre-trained encoder: no masking, no decoder, no backward.

use crate::backend::{Backend, RowMap};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::model::encoder::{encoder_forward, EncoderActs, EncoderScratch, EncoderShape};
use crate::params::{encoder_specs, Encoder};
use crate::weights::check_lengths;
use alloc::vec;
use alloc::vec::Vec;

/// How to reduce an image's tokens to one feature vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pool {
    /// The cls token after the final norm (the paper's linear-probing feature).
    Cls,
    /// The mean of the patch tokens after the final norm.
    Mean,
}

/// A frozen encoder that embeds batches of whole images.
///
/// ```
/// # fn demo<B: mae::Backend>(backend: &B) -> mae::Result<()> {
/// let cfg = mae::Config::preset("tiny32")?;
/// let encoder = mae::init::init_params(&cfg, 0).encoder; // or mae::weights::load_encoder(...)
/// let mut embedder = mae::embed::Embedder::new(backend, &cfg, &encoder, 4)?;
/// let imgs = vec![0.0f32; 4 * 3 * 32 * 32];
/// let features = embedder.pooled(backend, &imgs, mae::embed::Pool::Cls)?;
/// assert_eq!(features.len(), 4 * 192);
/// # Ok(()) }
/// ```
pub struct Embedder<B: Backend> {
    cfg: Config,
    params: Encoder<B::Buf>,
    shape: EncoderShape,
    imgs: B::Buf,
    acts: EncoderActs<B>,
    scratch: EncoderScratch<B>,
    pooled: B::Buf,
    /// Host staging for a short last batch, padded with zero images.
    padded: Vec<f32>,
}

impl<B: Backend> Embedder<B> {
    /// Uploads the encoder and allocates buffers for batches of `batch` images.
    pub fn new(b: &B, cfg: &Config, encoder: &Encoder<Vec<f32>>, batch: usize) -> Result<Self> {
        cfg.validate()?;
        if batch == 0 {
            return Err(crate::config::ConfigError::EmptyBatch.into());
        }
        check_lengths(encoder_specs(cfg).tensors(), encoder.tensors())?;
        let l = cfg.num_patches();
        let shape = EncoderShape::new(cfg, batch, l);
        let mut acts = EncoderActs::new(b, &shape, false, cfg.depth)?;
        // Every patch is kept, in spatial order.
        let identity: Vec<u32> = (0..batch).flat_map(|_| 0..l as u32).collect();
        b.write_idx(&mut acts.ids_keep, &identity)?;
        Ok(Embedder {
            params: encoder.try_map(|t| b.upload(t))?,
            imgs: b.alloc(batch * cfg.in_chans * cfg.img_size * cfg.img_size)?,
            scratch: EncoderScratch::new(b, &shape, false, false)?,
            pooled: b.alloc(batch * cfg.embed_dim)?,
            padded: vec![0.0; batch * cfg.in_chans * cfg.img_size * cfg.img_size],
            acts,
            shape,
            cfg: cfg.clone(),
        })
    }

    /// The most images one call takes.
    pub fn batch(&self) -> usize {
        self.shape.stack.batch
    }

    /// Runs the encoder on `imgs` (1 to `batch` images); returns how many there were.
    fn run(&mut self, b: &B, imgs: &[f32]) -> Result<usize> {
        let c = &self.cfg;
        let image = c.in_chans * c.img_size * c.img_size;
        let n = imgs.len() / image;
        if imgs.len() % image != 0 || n == 0 || n > self.batch() {
            return Err(Error::Shape {
                what: "images (1 to the embedder's batch size)",
                expected: vec![self.batch(), c.in_chans, c.img_size, c.img_size],
                got: vec![imgs.len()],
            });
        }
        if n == self.batch() {
            b.write(&mut self.imgs, imgs)?;
        } else {
            // A short batch runs padded with zero images, whose outputs are dropped.
            self.padded[..imgs.len()].copy_from_slice(imgs);
            self.padded[imgs.len()..].fill(0.0);
            b.write(&mut self.imgs, &self.padded)?;
        }
        let (p, acts, scratch) = (&self.params, &mut self.acts, &mut self.scratch);
        encoder_forward(b, &self.imgs, p, acts, scratch, &self.shape)?;
        Ok(n)
    }

    /// Every token after the final norm, `[n, 1 + L, D]` for `n` images (`[n, C, H, W]`, at most
    /// the batch size), cls first, patches in row-major order.
    pub fn tokens(&mut self, b: &B, imgs: &[f32]) -> Result<Vec<f32>> {
        let n = self.run(b, imgs)?;
        let mut out = vec![0.0; self.shape.stack.rows() * self.cfg.embed_dim];
        b.download(&self.acts.norm.y, &mut out)?;
        out.truncate(n * self.shape.stack.tokens * self.cfg.embed_dim);
        Ok(out)
    }

    /// One feature vector per image, `[n, D]` for `n` images.
    pub fn pooled(&mut self, b: &B, imgs: &[f32], pool: Pool) -> Result<Vec<f32>> {
        let images = self.run(b, imgs)?;
        let (n, t, d) = (self.batch(), self.shape.stack.tokens, self.cfg.embed_dim);
        let tokens = &self.acts.norm.y;
        match pool {
            Pool::Cls => {
                let map = RowMap {
                    batch: n,
                    count: 1,
                    cols: d,
                    src_stride: t,
                    src_start: 0,
                    src_step: 0,
                    dst_stride: 1,
                    dst_start: 0,
                };
                b.copy_rows(tokens, &mut self.pooled, &map, false)?;
            }
            Pool::Mean => {
                // The sum over patch rows is the backward of broadcasting one row to them.
                let map = RowMap {
                    batch: n,
                    count: t - 1,
                    cols: d,
                    src_stride: 1,
                    src_start: 0,
                    src_step: 0,
                    dst_stride: t,
                    dst_start: 1,
                };
                b.fill(&mut self.pooled, 0.0)?;
                b.copy_rows_backward(tokens, &mut self.pooled, &map)?;
                b.scale(&mut self.pooled, 1.0 / (t - 1) as f32)?;
            }
        }
        let mut out = vec![0.0; n * d];
        b.download(&self.pooled, &mut out)?;
        out.truncate(images * d);
        Ok(out)
    }
}
