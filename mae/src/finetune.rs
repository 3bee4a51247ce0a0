//! Fine-tuning an encoder as an image classifier, as the official `main_finetune.py` does
//! (the paper's Table 8): every patch goes through the encoder (no masking), a pooled head
//! gives logits, a soft-target cross-entropy (label smoothing, mixup) gives the loss, and AdamW
//! updates each tensor at a layer-wise decayed learning rate. Blocks drop paths per image.
//! Partial fine-tuning (Figure 9) trains only the last `k` blocks and the head, and
//! backpropagates through those blocks only.
//!
//! ```text
//!  imgs ─ patchify ─ patch_embed ─ +pos ─ [cls] ─ blocks (drop path) ─┬─ mean of patches ─ fc_norm ─┐
//!                                                                     └─ norm ─ cls token ──────────┴─ head ─► logits
//!  loss = soft-target cross-entropy(logits, targets) on the host; the same path backwards, then AdamW
//! ```

use crate::backend::Backend;
use crate::config::{Config, ConfigError};
use crate::embed::Pool;
use crate::error::{finite_loss, Error, Result};
use crate::model::block::DropPath;
use crate::model::encoder::{
    encoder_body_backward, encoder_body_forward, encoder_forward, EncoderActs, EncoderScratch,
    EncoderShape,
};
use crate::model::head::{head_backward, head_forward, HeadActs, HeadScratch, HeadShape};
use crate::model::layernorm::layernorm_backward;
use crate::optim::{adamw_update, layer_decay_scale, layer_id, AdamW};
use crate::params::TensorSpec;
use crate::params::{classifier_specs, ClassifierParams, Encoder, Head, Linear, Norm, Role};
use crate::rng::Rng;
use crate::weights::check_lengths;
use alloc::vec;
use alloc::vec::Vec;

/// Settings of a fine-tuning run that shape the step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FinetuneOptions {
    /// Images per batch.
    pub batch_size: usize,
    /// Classes of the head.
    pub num_classes: usize,
    /// Mean pooling with `fc_norm` (the paper's fine-tuning) or the cls token (its linear probe).
    pub pool: Pool,
    /// AdamW settings (PyTorch's betas 0.9 / 0.999 and weight decay 0.05 in the official code).
    pub adamw: AdamW,
    /// Layer-wise learning-rate decay (0.75 in Table 8).
    pub layer_decay: f64,
    /// Drop path rate of the last block; block `i` of `depth` drops with `rate * i / (depth - 1)`.
    pub drop_path: f64,
    /// `Some(k)`: train only the last `k` blocks and what follows them (partial fine-tuning);
    /// `None`: train everything.
    pub trainable_blocks: Option<usize>,
}

impl FinetuneOptions {
    /// The paper's settings (Table 8) at `batch_size` for `num_classes` classes.
    pub fn new(batch_size: usize, num_classes: usize) -> Self {
        FinetuneOptions {
            batch_size,
            num_classes,
            pool: Pool::Mean,
            adamw: AdamW {
                beta2: 0.999,
                ..AdamW::default()
            },
            layer_decay: 0.75,
            drop_path: 0.1,
            trainable_blocks: None,
        }
    }

    /// Checks the options against `cfg`.
    pub fn validate(&self, cfg: &Config) -> core::result::Result<(), ConfigError> {
        if self.batch_size == 0 {
            return Err(ConfigError::EmptyBatch);
        }
        if self.num_classes == 0 {
            return Err(ConfigError::Zero("num_classes"));
        }
        let unit = |x: f64| x.is_finite() && (0.0..1.0).contains(&x);
        if !(unit(self.drop_path)) {
            let (name, value) = ("drop_path", self.drop_path);
            return Err(ConfigError::Hyper { name, value });
        }
        if !(self.layer_decay.is_finite() && self.layer_decay > 0.0 && self.layer_decay <= 1.0) {
            let (name, value) = ("layer_decay", self.layer_decay);
            return Err(ConfigError::Hyper { name, value });
        }
        if let Some(k) = self.trainable_blocks {
            if k > cfg.depth {
                let (name, value) = ("trainable_blocks", k as f64);
                return Err(ConfigError::Hyper { name, value });
            }
        }
        self.adamw.validate()
    }

    /// The first block that trains (`depth` when only the head does); 0 trains the embedding too.
    pub fn first_trained_block(&self, depth: usize) -> usize {
        depth - self.trainable_blocks.unwrap_or(depth).min(depth)
    }

    /// Whether the tensor `name` of a `depth`-block classifier trains: everything in full
    /// fine-tuning (or with `k == depth`), else the last `k` blocks and what follows them.
    pub fn trains(&self, name: &str, depth: usize) -> bool {
        match self.trainable_blocks {
            Some(k) if k < depth => layer_id(name, depth) > self.first_trained_block(depth),
            _ => true,
        }
    }
}

/// A classifier's host tensors from an encoder (pre-trained, or freshly initialized for the
/// from-scratch baseline) and a new head: `fc_norm` 1 and 0, the head's weight normal with
/// `head_std` (2e-5 after pre-training as the official code, timm's 0.02 from scratch), its
/// bias 0. An encoder mask token of the pre-training ablation is dropped.
///
/// ```
/// let cfg = mae::Config::preset("tiny32").unwrap();
/// let encoder = mae::init::init_params(&cfg, 0).encoder;
/// let p = mae::finetune::classifier(&cfg, encoder, 10, mae::embed::Pool::Mean, 2e-5, 0);
/// assert_eq!(p.head.linear.weight.len(), 10 * 192);
/// ```
pub fn classifier(
    cfg: &Config,
    encoder: Encoder<Vec<f32>>,
    num_classes: usize,
    pool: Pool,
    head_std: f64,
    seed: u64,
) -> ClassifierParams<Vec<f32>> {
    let d = cfg.embed_dim;
    let mut rng = Rng::new(seed).fork(0x4EAD);
    let weight = (0..num_classes * d)
        .map(|_| (head_std * rng.normal()) as f32)
        .collect();
    ClassifierParams {
        encoder: Encoder {
            mask_token: None,
            ..encoder
        },
        head: Head {
            fc_norm: (pool == Pool::Mean).then(|| Norm {
                weight: vec![1.0; d],
                bias: vec![0.0; d],
            }),
            linear: Linear {
                weight,
                bias: vec![0.0; num_classes],
            },
        },
    }
}

/// Soft targets from labels with label smoothing: `1 - s + s / C` on the label, `s / C`
/// elsewhere (timm's `LabelSmoothingCrossEntropy` as soft targets).
///
/// ```
/// let t = mae::finetune::smoothed_targets(&[1], 4, 0.1);
/// let expected = [0.025, 0.925, 0.025, 0.025];
/// assert!(t.iter().zip(expected).all(|(a, b)| (a - b).abs() < 1e-6));
/// ```
pub fn smoothed_targets(labels: &[u32], num_classes: usize, smoothing: f32) -> Vec<f32> {
    let off = smoothing / num_classes as f32;
    let mut t = vec![off; labels.len() * num_classes];
    for (row, &y) in t.chunks_mut(num_classes).zip(labels) {
        if let Some(on) = row.get_mut(y as usize) {
            *on = 1.0 - smoothing + off;
        }
    }
    t
}

/// A classifier being fine-tuned, with every buffer its step needs, allocated once.
///
/// ```
/// # fn demo<B: mae::Backend>(backend: &B) -> mae::Result<()> {
/// use mae::finetune::{classifier, smoothed_targets, FinetuneOptions, Finetuner};
/// let cfg = mae::Config::preset("tiny32")?;
/// let encoder = mae::init::init_params(&cfg, 0).encoder;
/// let params = classifier(&cfg, encoder, 10, mae::embed::Pool::Mean, 2e-5, 0);
/// let mut ft = Finetuner::new(backend, &cfg, &params, FinetuneOptions::new(4, 10), 0)?;
/// let imgs = vec![0.5f32; 4 * 3 * 32 * 32];
/// let loss = ft.train_step(backend, &imgs, &smoothed_targets(&[0, 1, 2, 3], 10, 0.1), 1e-4)?;
/// assert!(loss.is_finite());
/// let logits = ft.predict(backend, &imgs[..3 * 32 * 32])?; // one image
/// assert_eq!(logits.len(), 10);
/// # Ok(()) }
/// ```
pub struct Finetuner<B: Backend> {
    cfg: Config,
    opts: FinetuneOptions,
    specs: ClassifierParams<TensorSpec>,
    /// Learning-rate factor per tensor, canonical order; 0 for a tensor that does not train.
    lr_scales: Vec<f64>,
    first_trained: usize,
    params: ClassifierParams<B::Buf>,
    grads: ClassifierParams<B::Buf>,
    m: ClassifierParams<B::Buf>,
    v: ClassifierParams<B::Buf>,
    enc_shape: EncoderShape,
    head_shape: HeadShape,
    imgs: B::Buf,
    padded: Vec<f32>,
    enc: EncoderActs<B>,
    enc_scratch: EncoderScratch<B>,
    head: HeadActs<B>,
    head_scratch: HeadScratch<B>,
    d_latent: B::Buf,
    logits: Vec<f32>,
    d_logits_host: Vec<f32>,
    d_logits: B::Buf,
    /// Drop probability per block.
    drop_rates: Vec<f64>,
    factors: Vec<f32>,
    rng: Rng,
    updates: u64,
    forward_done: bool,
}

impl<B: Backend> Finetuner<B> {
    /// Uploads `params` and allocates every buffer of the step; `seed` drives drop path.
    pub fn new(
        b: &B,
        cfg: &Config,
        params: &ClassifierParams<Vec<f32>>,
        opts: FinetuneOptions,
        seed: u64,
    ) -> Result<Self> {
        let cfg = Config {
            encoder_mask_tokens: false,
            ..cfg.clone()
        };
        cfg.validate()?;
        opts.validate(&cfg)?;
        let specs = classifier_specs(&cfg, opts.num_classes, opts.pool == Pool::Mean);
        check_lengths(specs.tensors(), params.tensors())?;
        let (n, l, d, depth) = (opts.batch_size, cfg.num_patches(), cfg.embed_dim, cfg.depth);
        let first_trained = opts.first_trained_block(depth);
        let lr_scales = specs
            .tensors()
            .map(|s| match (s.role, opts.trains(&s.name, depth)) {
                (Role::Fixed, _) | (_, false) => 0.0,
                _ => layer_decay_scale(&s.name, depth, opts.layer_decay),
            })
            .collect();
        let enc_shape = EncoderShape {
            learn_pos_embed: true,
            ..EncoderShape::new(&cfg, n, l)
        };
        let head_shape = HeadShape {
            batch: n,
            tokens: 1 + l,
            dim: d,
            classes: opts.num_classes,
            pool: opts.pool,
            eps: cfg.norm_eps as f32,
        };
        let drop_rates: Vec<f64> = (0..depth)
            .map(|i| match depth {
                1 => 0.0,
                _ => opts.drop_path * i as f64 / (depth - 1) as f64,
            })
            .collect();
        let mut enc = EncoderActs::new(b, &enc_shape, true, depth)?;
        for (acts, &rate) in enc.blocks.iter_mut().zip(&drop_rates) {
            if rate > 0.0 {
                acts.drop = Some(DropPath {
                    attn: b.alloc(n)?,
                    mlp: b.alloc(n)?,
                    active: false,
                });
            }
        }
        // Every patch is kept, in spatial order.
        let identity: Vec<u32> = (0..n).flat_map(|_| 0..l as u32).collect();
        b.write_idx(&mut enc.ids_keep, &identity)?;
        let any_drop = drop_rates.iter().any(|&r| r > 0.0);
        let image = cfg.in_chans * cfg.img_size * cfg.img_size;
        let zeros_like = |s: &TensorSpec| b.alloc(s.numel());
        Ok(Finetuner {
            params: params.try_map(|t| b.upload(t))?,
            grads: specs.try_map(zeros_like)?,
            m: specs.try_map(zeros_like)?,
            v: specs.try_map(zeros_like)?,
            imgs: b.alloc(n * image)?,
            padded: vec![0.0; n * image],
            enc_scratch: EncoderScratch::new(b, &enc_shape, true, any_drop)?,
            enc,
            head: HeadActs::new(b, &head_shape)?,
            head_scratch: HeadScratch::new(b, &head_shape)?,
            d_latent: b.alloc(n * (1 + l) * d)?,
            logits: vec![0.0; n * opts.num_classes],
            d_logits_host: vec![0.0; n * opts.num_classes],
            d_logits: b.alloc(n * opts.num_classes)?,
            factors: vec![0.0; n],
            drop_rates,
            rng: Rng::new(seed),
            enc_shape,
            head_shape,
            lr_scales,
            first_trained,
            specs,
            cfg,
            opts,
            updates: 0,
            forward_done: false,
        })
    }

    /// Writes up to `batch` images, padding a short batch with zero images; returns the count.
    fn write_images(&mut self, b: &B, imgs: &[f32]) -> Result<usize> {
        let c = &self.cfg;
        let image = c.in_chans * c.img_size * c.img_size;
        let n = imgs.len() / image;
        if imgs.len() % image != 0 || n == 0 || n > self.opts.batch_size {
            return Err(Error::Shape {
                what: "images (1 to the batch size)",
                expected: vec![self.opts.batch_size, c.in_chans, c.img_size, c.img_size],
                got: vec![imgs.len()],
            });
        }
        if n == self.opts.batch_size {
            b.write(&mut self.imgs, imgs)?;
        } else {
            self.padded[..imgs.len()].copy_from_slice(imgs);
            self.padded[imgs.len()..].fill(0.0);
            b.write(&mut self.imgs, &self.padded)?;
        }
        Ok(n)
    }

    /// Turns drop path on (drawing this step's per-image factors) or off.
    fn set_drop_path(&mut self, b: &B, training: bool) -> Result<()> {
        for (acts, &rate) in self.enc.blocks.iter_mut().zip(&self.drop_rates) {
            let Some(drop) = acts.drop.as_mut() else {
                continue;
            };
            drop.active = training;
            if !training {
                continue;
            }
            // timm's DropPath: keep with probability 1 - rate, scaled by 1 / (1 - rate).
            let keep = 1.0 - rate;
            for buf in [&mut drop.attn, &mut drop.mlp] {
                for f in self.factors.iter_mut() {
                    *f = if self.rng.uniform_f64() < keep {
                        (1.0 / keep) as f32
                    } else {
                        0.0
                    };
                }
                b.write(buf, &self.factors)?;
            }
        }
        Ok(())
    }

    /// Encoder and head on the images in `self.imgs`; logits land in `self.logits`.
    fn run(&mut self, b: &B) -> Result<()> {
        let p = &self.params;
        let (enc, scratch) = (&mut self.enc, &mut self.enc_scratch);
        let (imgs, sh) = (&self.imgs, &self.enc_shape);
        // Mean pooling reads the last block's output (fc_norm replaces the final norm).
        let tokens = match self.opts.pool {
            Pool::Mean => {
                encoder_body_forward(b, imgs, &p.encoder, enc, scratch, sh)?;
                &enc.blocks[enc.last].out
            }
            Pool::Cls => {
                encoder_forward(b, imgs, &p.encoder, enc, scratch, sh)?;
                &enc.norm.y
            }
        };
        head_forward(b, tokens, &p.head, &mut self.head, &self.head_shape)?;
        b.download(&self.head.logits, &mut self.logits)?;
        Ok(())
    }

    /// The training forward on a full batch of images (`[batch, C, H, W]`, normalized) with soft
    /// `targets` (`[batch, classes]`, rows summing to 1); returns the mean cross-entropy.
    pub fn forward(&mut self, b: &B, imgs: &[f32], targets: &[f32]) -> Result<f32> {
        let (n, k) = (self.opts.batch_size, self.opts.num_classes);
        if targets.len() != n * k {
            return Err(Error::Shape {
                what: "targets",
                expected: vec![n, k],
                got: vec![targets.len()],
            });
        }
        if let Some(bad) = targets.iter().find(|t| !t.is_finite()) {
            return Err(Error::Input(alloc::format!("targets contain {bad}")));
        }
        if self.write_images(b, imgs)? != n {
            return Err(Error::Input("a training batch must be full".into()));
        }
        self.set_drop_path(b, true)?;
        self.run(b)?;
        let loss = soft_cross_entropy(&self.logits, targets, k, &mut self.d_logits_host);
        self.forward_done = true;
        Ok(loss)
    }

    /// Backward of the last forward: accumulates the gradients of the trained tensors.
    pub fn backward(&mut self, b: &B) -> Result<()> {
        if !self.forward_done {
            return Err(Error::Input("backward called without a forward".into()));
        }
        b.write(&mut self.d_logits, &self.d_logits_host)?;
        let (p, g) = (&self.params, &mut self.grads);
        let (enc, s, sh) = (&self.enc, &mut self.enc_scratch, &self.enc_shape);
        let (rows, d) = (sh.stack.rows(), sh.stack.dim);
        let d_top = &mut s.stack.d_x;
        match self.opts.pool {
            Pool::Mean => {
                let hs = &mut self.head_scratch;
                head_backward(
                    b,
                    &self.d_logits,
                    &p.head,
                    &mut g.head,
                    &self.head,
                    hs,
                    d_top,
                    &self.head_shape,
                )?;
            }
            Pool::Cls => {
                let (hs, d_latent) = (&mut self.head_scratch, &mut self.d_latent);
                head_backward(
                    b,
                    &self.d_logits,
                    &p.head,
                    &mut g.head,
                    &self.head,
                    hs,
                    d_latent,
                    &self.head_shape,
                )?;
                b.fill(d_top, 0.0)?;
                let out = &enc.blocks[enc.last].out;
                let (norm, g_norm) = (&p.encoder.norm, &mut g.encoder.norm);
                layernorm_backward(
                    b,
                    &self.d_latent,
                    out,
                    norm,
                    &enc.norm,
                    g_norm,
                    d_top,
                    rows,
                    d,
                )?;
            }
        }
        encoder_body_backward(
            b,
            &p.encoder,
            &mut g.encoder,
            enc,
            s,
            sh,
            self.first_trained,
            &mut (),
        )?;
        self.forward_done = false;
        Ok(())
    }

    /// One AdamW update at peak learning rate `lr`, each tensor at its layer-decayed share; the
    /// gradients are then zeroed.
    pub fn update(&mut self, b: &B, lr: f64) -> Result<()> {
        let t = self.updates + 1;
        let tensors = self
            .params
            .tensors_mut()
            .zip(self.grads.tensors_mut())
            .zip(self.m.tensors_mut().zip(self.v.tensors_mut()))
            .zip(
                self.specs
                    .tensors()
                    .map(|s| s.role)
                    .zip(self.lr_scales.iter().copied()),
            );
        adamw_update(b, &self.opts.adamw, lr, t, tensors)?;
        self.updates = t;
        Ok(())
    }

    /// Forward, backward and update on one batch; a NaN or infinite loss stops before the
    /// backward with [`Error::NonFiniteLoss`].
    pub fn train_step(&mut self, b: &B, imgs: &[f32], targets: &[f32], lr: f64) -> Result<f32> {
        let loss = self.forward(b, imgs, targets)?;
        self.forward_done = loss.is_finite();
        let loss = finite_loss(loss, self.updates)?;
        self.backward(b)?;
        self.update(b, lr)?;
        Ok(loss)
    }

    /// Logits `[n, classes]` of 1 to `batch` images in evaluation mode (no drop path).
    pub fn predict(&mut self, b: &B, imgs: &[f32]) -> Result<Vec<f32>> {
        let n = self.write_images(b, imgs)?;
        self.set_drop_path(b, false)?;
        self.run(b)?;
        self.forward_done = false;
        Ok(self.logits[..n * self.opts.num_classes].to_vec())
    }

    /// The learning-rate factor of each tensor, canonical order (0: not trained).
    pub fn lr_scales(&self) -> impl Iterator<Item = (&str, f64)> + '_ {
        let names = self.specs.tensors().map(|s| s.name.as_str());
        names.zip(self.lr_scales.iter().copied())
    }
    /// Names, shapes and optimizer groups of the tensors.
    pub fn specs(&self) -> &ClassifierParams<TensorSpec> {
        &self.specs
    }
    /// The run's options.
    pub fn options(&self) -> &FinetuneOptions {
        &self.opts
    }
    /// The model configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }
    /// Optimizer updates done.
    pub fn updates(&self) -> u64 {
        self.updates
    }
    /// The weights, downloaded.
    pub fn params(&self, b: &B) -> Result<ClassifierParams<Vec<f32>>> {
        self.download(b, &self.params)
    }
    /// The gradients accumulated since the last update, downloaded.
    pub fn grads(&self, b: &B) -> Result<ClassifierParams<Vec<f32>>> {
        self.download(b, &self.grads)
    }
    fn download(&self, b: &B, t: &ClassifierParams<B::Buf>) -> Result<ClassifierParams<Vec<f32>>> {
        let mut host = self
            .specs
            .try_map(|s| Ok::<_, Error>(vec![0.0; s.numel()]))?;
        for (h, d) in host.tensors_mut().zip(t.tensors()) {
            b.download(d, h)?;
        }
        Ok(host)
    }
}

/// Mean over rows of `-sum_c t_c log softmax(z)_c`, and its gradient `(softmax(z) - t) / N`
/// into `d_logits`; computed in f64.
fn soft_cross_entropy(
    logits: &[f32],
    targets: &[f32],
    classes: usize,
    d_logits: &mut [f32],
) -> f32 {
    let n = logits.len() / classes;
    let mut total = 0.0f64;
    let rows = logits.chunks(classes).zip(targets.chunks(classes));
    for ((z, t), dz) in rows.zip(d_logits.chunks_mut(classes)) {
        let max = z.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
        let sum: f64 = z.iter().map(|&x| libm::exp(x as f64 - max)).sum();
        let log_sum = max + libm::log(sum);
        for ((&zi, &ti), d) in z.iter().zip(t).zip(dz.iter_mut()) {
            let log_p = zi as f64 - log_sum;
            total -= ti as f64 * log_p;
            *d = ((libm::exp(log_p) - ti as f64) / n as f64) as f32;
        }
    }
    (total / n as f64) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cross_entropy_and_gradient_match_the_formula() {
        let logits = [1.0f32, 2.0, 0.5, -1.0, 0.0, 3.0];
        let targets = [0.0f32, 1.0, 0.0, 0.1, 0.1, 0.8];
        let mut d = [0.0f32; 6];
        let loss = soft_cross_entropy(&logits, &targets, 3, &mut d);
        let lse = |z: &[f32]| libm::log(z.iter().map(|&x| libm::exp(x as f64)).sum::<f64>());
        let row0 = -(2.0 - lse(&logits[..3]));
        let l1 = lse(&logits[3..]);
        let row1 = -(0.1 * (-1.0 - l1) + 0.1 * (0.0 - l1) + 0.8 * (3.0 - l1));
        assert!((loss as f64 - (row0 + row1) / 2.0).abs() < 1e-6);
        // Each gradient row sums to zero when the targets sum to one.
        assert!(d[..3].iter().sum::<f32>().abs() < 1e-7 && d[3..].iter().sum::<f32>().abs() < 1e-7);
        let p1 = libm::exp(2.0 - lse(&logits[..3]));
        assert!((d[1] as f64 - (p1 - 1.0) / 2.0).abs() < 1e-7);
    }

    #[test]
    fn layer_decay_and_partial_training_follow_the_official_groups() {
        let cfg = Config::preset("tiny32").unwrap();
        let scales = |opts: FinetuneOptions| {
            let specs = classifier_specs(&cfg, 10, opts.pool == Pool::Mean);
            let trains = |s: &TensorSpec| opts.trains(&s.name, cfg.depth);
            let row = |s: &TensorSpec| (s.name.clone(), s.role, trains(s));
            specs.tensors().map(row).collect::<Vec<_>>()
        };
        let all = scales(FinetuneOptions::new(2, 10));
        let find = |v: &[(alloc::string::String, Role, bool)], n: &str| {
            v.iter().find(|s| s.0 == n).cloned().unwrap()
        };
        assert_eq!(find(&all, "pos_embed").1, Role::NotDecayed);
        assert_eq!(find(&all, "cls_token").1, Role::NotDecayed);
        assert_eq!(find(&all, "norm.weight").1, Role::Fixed);
        assert_eq!(find(&all, "head.weight").1, Role::Decayed);
        assert!(all.iter().all(|s| s.2));
        let last2 = scales(FinetuneOptions {
            trainable_blocks: Some(2),
            ..FinetuneOptions::new(2, 10)
        });
        let depth = cfg.depth;
        assert!(!find(&last2, "patch_embed.proj.weight").2);
        assert!(
            !find(
                &last2,
                &alloc::format!("blocks.{}.attn.qkv.weight", depth - 3)
            )
            .2
        );
        assert!(
            find(
                &last2,
                &alloc::format!("blocks.{}.attn.qkv.weight", depth - 2)
            )
            .2
        );
        assert!(find(&last2, "fc_norm.weight").2 && find(&last2, "head.bias").2);
    }
}
