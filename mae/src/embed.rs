//! Embedding whole images with a pre-trained encoder: no masking, no decoder, no backward.

use crate::backend::{Backend, RowMap};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::model::block::StackScratch;
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
            scratch: EncoderScratch {
                stack: StackScratch::new(b, &shape.stack, false)?,
                d_tokens: b.alloc(0)?,
            },
            pooled: b.alloc(batch * cfg.embed_dim)?,
            acts,
            shape,
            cfg: cfg.clone(),
        })
    }

    /// Images per batch.
    pub fn batch(&self) -> usize {
        self.shape.stack.batch
    }

    fn run(&mut self, b: &B, imgs: &[f32]) -> Result<()> {
        let c = &self.cfg;
        let n = self.batch();
        if imgs.len() != n * c.in_chans * c.img_size * c.img_size {
            return Err(Error::Shape {
                what: "images",
                expected: vec![n, c.in_chans, c.img_size, c.img_size],
                got: vec![imgs.len()],
            });
        }
        b.write(&mut self.imgs, imgs)?;
        encoder_forward(
            b,
            &self.imgs,
            &self.params,
            &mut self.acts,
            &mut self.scratch,
            &self.shape,
        )?;
        Ok(())
    }

    /// Every token after the final norm, `[batch, 1 + L, D]`, cls first, patches in row-major
    /// order.
    pub fn tokens(&mut self, b: &B, imgs: &[f32]) -> Result<Vec<f32>> {
        self.run(b, imgs)?;
        let mut out = vec![0.0; self.shape.stack.rows() * self.cfg.embed_dim];
        b.download(&self.acts.norm.y, &mut out)?;
        Ok(out)
    }

    /// One feature vector per image, `[batch, D]`.
    pub fn pooled(&mut self, b: &B, imgs: &[f32], pool: Pool) -> Result<Vec<f32>> {
        self.run(b, imgs)?;
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
        Ok(out)
    }
}
