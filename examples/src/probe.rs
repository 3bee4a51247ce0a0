//! The paper's linear probe (Table 9; the official `main_linprobe.py`), trained on precomputed
//! features: `BatchNorm1d(D, affine=False, eps=1e-6)` followed by `Linear(D, classes)` whose
//! weight starts `trunc_normal(std=0.01)` and bias zero, softmax cross-entropy, LARS (the
//! official `util/lars.py`) or SGD with momentum 0.9, no weight decay, `lr = blr x batch / 256`,
//! per-iteration linear warmup then half-cycle cosine. The batch norm uses batch statistics in
//! training and its running statistics in evaluation, as PyTorch's `train()` / `eval()` modes do.
//!
//! Everything runs on the host in f32 (statistics and losses accumulate in f64); the matrix
//! products are split over threads by output rows, so the numbers do not depend on the thread
//! count.
//!
//! ```
//! use mae_examples::probe::{train, Optimizer, ProbeOptions, Samples};
//!
//! // One value per sample: negative values are class 0, positive ones class 1.
//! let features: Vec<f32> = (0..64)
//!     .map(|i| (1.0 + i as f32 / 64.0) * if i % 2 == 0 { -1.0 } else { 1.0 })
//!     .collect();
//! let labels: Vec<u32> = (0..64).map(|i| i % 2).collect();
//! let data = Samples::new(&features, &labels, 1)?;
//! // The paper's recipe, shortened, with SGD: LARS at base lr 0.1 needs ImageNet's number of
//! // steps to move far from the random start.
//! let opts = ProbeOptions {
//!     epochs: 20,
//!     warmup_epochs: 2.0,
//!     batch_size: 16,
//!     optimizer: Optimizer::Sgd,
//!     ..ProbeOptions::default()
//! };
//! let trained = train(data, 2, &opts, |epoch| println!("loss {:.3}", epoch.loss))?;
//! assert_eq!(trained.history.len(), 20);
//! assert_eq!(trained.probe.evaluate(data)?.top1, 1.0);
//! # Ok::<(), mae_examples::probe::ProbeError>(())
//! ```

use crate::features::FeatureSet;
use mae::optim::{scaled_lr, Schedule};
use mae::rng::Rng;
use std::fmt;
use std::time::Instant;

/// The official probe's base learning rate (per 256 images).
pub const PAPER_BLR: f64 = 0.1;
/// Sub-stream of the seed for the head's initialization.
const INIT_STREAM: u64 = 1;
/// Sub-stream of the seed for the epochs' orders.
const SHUFFLE_STREAM: u64 = 2;
/// Multiply-adds below which a product runs on the calling thread (a thread costs ~10 us).
const PARALLEL_WORK: usize = 1 << 18;

/// Features and labels to train or evaluate on, borrowed.
#[derive(Clone, Copy, Debug)]
pub struct Samples<'a> {
    features: &'a [f32],
    labels: &'a [u32],
    dim: usize,
}

impl<'a> Samples<'a> {
    /// `labels.len()` rows of `dim` values.
    pub fn new(features: &'a [f32], labels: &'a [u32], dim: usize) -> Result<Self, ProbeError> {
        if dim == 0 || labels.len().checked_mul(dim) != Some(features.len()) {
            return Err(ProbeError::Shape {
                what: "feature values (labels x dim)",
                expected: labels.len().saturating_mul(dim),
                got: features.len(),
            });
        }
        Ok(Samples {
            features,
            labels,
            dim,
        })
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Values per feature vector.
    pub fn dim(&self) -> usize {
        self.dim
    }

    fn row(&self, i: usize) -> &'a [f32] {
        &self.features[i * self.dim..(i + 1) * self.dim]
    }
}

impl<'a> From<&'a FeatureSet> for Samples<'a> {
    fn from(set: &'a FeatureSet) -> Samples<'a> {
        Samples {
            features: &set.features,
            labels: &set.labels,
            dim: set.dim,
        }
    }
}

/// Why a probe cannot be trained or evaluated.
#[derive(Clone, Debug, PartialEq)]
pub enum ProbeError {
    /// Counts that must agree do not (feature dims, values per row).
    Shape {
        /// What was counted.
        what: &'static str,
        /// The count needed.
        expected: usize,
        /// The count found.
        got: usize,
    },
    /// A setting outside its domain.
    BadOption {
        /// The setting.
        name: &'static str,
        /// Its value and why it does not work.
        why: String,
    },
    /// A label is not below the number of classes.
    LabelOutOfRange {
        /// The sample.
        index: usize,
        /// Its label.
        label: u32,
        /// The number of classes.
        classes: usize,
    },
    /// The loss became NaN or infinite.
    Diverged {
        /// The epoch (from 0).
        epoch: usize,
        /// The step within it.
        step: usize,
    },
}

impl fmt::Display for ProbeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProbeError::Shape {
                what,
                expected,
                got,
            } => write!(f, "{what}: expected {expected}, got {got}"),
            ProbeError::BadOption { name, why } => write!(f, "{name}: {why}"),
            ProbeError::LabelOutOfRange {
                index,
                label,
                classes,
            } => write!(
                f,
                "sample {index} has label {label}, but the probe has {classes} classes"
            ),
            ProbeError::Diverged { epoch, step } => write!(
                f,
                "the loss became NaN or infinite at epoch {epoch}, step {step}: lower --blr"
            ),
        }
    }
}

impl std::error::Error for ProbeError {}

/// The optimizer of the head.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Optimizer {
    /// The official `util/lars.py`: for tensors of more than one dimension the update
    /// (gradient plus weight decay) is scaled by `trust_coefficient * |p| / |update|` (1 when
    /// either norm is zero); 1-D tensors (the bias) take plain momentum SGD without weight decay.
    Lars {
        /// The trust coefficient (0.001).
        trust_coefficient: f64,
    },
    /// `torch.optim.SGD` with momentum (no dampening, no Nesterov), weight decay on every tensor.
    Sgd,
}

impl Optimizer {
    /// The official LARS (trust coefficient 0.001).
    pub const LARS: Optimizer = Optimizer::Lars {
        trust_coefficient: 0.001,
    };

    /// `lars` or `sgd`.
    pub fn name(&self) -> &'static str {
        match self {
            Optimizer::Lars { .. } => "lars",
            Optimizer::Sgd => "sgd",
        }
    }

    /// Parses [`Optimizer::name`].
    pub fn parse(name: &str) -> Result<Optimizer, ProbeError> {
        match name {
            "lars" => Ok(Optimizer::LARS),
            "sgd" => Ok(Optimizer::Sgd),
            other => Err(ProbeError::BadOption {
                name: "optimizer",
                why: format!("{other:?} is neither `lars` nor `sgd`"),
            }),
        }
    }

    /// One momentum update of tensor `param` with gradient `grad` and momentum buffer `mu`:
    /// `mu = momentum * mu + update; param -= lr * mu`. `matrix` says whether the tensor has more
    /// than one dimension (LARS adapts only those).
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &self,
        param: &mut [f32],
        grad: &[f32],
        mu: &mut [f32],
        lr: f64,
        momentum: f64,
        weight_decay: f64,
        matrix: bool,
    ) {
        let decay = match self {
            Optimizer::Lars { .. } => matrix,
            Optimizer::Sgd => true,
        };
        let wd = if decay { weight_decay as f32 } else { 0.0 };
        let mut update: Vec<f32> = grad
            .iter()
            .zip(param.iter())
            .map(|(&g, &p)| g + wd * p)
            .collect();
        if let (Optimizer::Lars { trust_coefficient }, true) = (self, matrix) {
            let norm = |v: &[f32]| v.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
            let (p_norm, u_norm) = (norm(param), norm(&update));
            if p_norm > 0.0 && u_norm > 0.0 {
                let q = (trust_coefficient * p_norm / u_norm) as f32;
                update.iter_mut().for_each(|u| *u *= q);
            }
        }
        let (m, lr) = (momentum as f32, lr as f32);
        for ((p, mu), u) in param.iter_mut().zip(mu.iter_mut()).zip(update) {
            *mu = m * *mu + u;
            *p -= lr * *mu;
        }
    }
}

/// Every setting of a probe; [`Default`] is the paper's recipe.
#[derive(Clone, Debug, PartialEq)]
pub struct ProbeOptions {
    /// Passes over the training set (90).
    pub epochs: usize,
    /// Linear warmup, in epochs (10).
    pub warmup_epochs: f64,
    /// Samples per step (16384); clamped to the training set. The last partial batch of an
    /// epoch is dropped, as the official loader does.
    pub batch_size: usize,
    /// Base learning rate per 256 samples (0.1).
    pub blr: f64,
    /// Learning rate at the end of the cosine (0).
    pub min_lr: f64,
    /// LARS (the paper) or SGD.
    pub optimizer: Optimizer,
    /// Momentum (0.9).
    pub momentum: f64,
    /// Weight decay (0).
    pub weight_decay: f64,
    /// Seed of the head's initialization and of the epochs' orders.
    pub seed: u64,
    /// Worker threads for the matrix products (0: one per core).
    pub threads: usize,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        ProbeOptions {
            epochs: 90,
            warmup_epochs: 10.0,
            batch_size: 16384,
            blr: PAPER_BLR,
            min_lr: 0.0,
            optimizer: Optimizer::LARS,
            momentum: 0.9,
            weight_decay: 0.0,
            seed: 0,
            threads: 0,
        }
    }
}

impl ProbeOptions {
    /// The batch size used on a training set of `n` samples.
    pub fn effective_batch(&self, n: usize) -> usize {
        self.batch_size.min(n)
    }

    /// The learning-rate schedule for batches of `batch` samples (peak `blr * batch / 256`).
    pub fn schedule(&self, batch: usize) -> Schedule {
        Schedule {
            lr: scaled_lr(self.blr, batch),
            min_lr: self.min_lr,
            warmup_epochs: self.warmup_epochs,
            epochs: self.epochs as f64,
        }
    }

    /// The learning rate of step `step` of `epoch` (both from 0) with `steps_per_epoch` steps,
    /// as `lr_sched.adjust_learning_rate` sets it: at the fractional epoch
    /// `epoch + step / steps_per_epoch`.
    pub fn lr_at(&self, batch: usize, epoch: usize, step: usize, steps_per_epoch: usize) -> f64 {
        self.schedule(batch)
            .lr_at(epoch as f64 + step as f64 / steps_per_epoch.max(1) as f64)
    }

    fn validate(&self) -> Result<(), ProbeError> {
        let bad = |name, why: String| Err(ProbeError::BadOption { name, why });
        let finite_nonneg = |x: f64| x.is_finite() && x >= 0.0;
        if self.epochs == 0 {
            return bad("epochs", "must be at least 1".into());
        }
        if !finite_nonneg(self.warmup_epochs) {
            return bad(
                "warmup_epochs",
                format!("{} is not >= 0", self.warmup_epochs),
            );
        }
        if !(self.blr.is_finite() && self.blr > 0.0) {
            return bad("blr", format!("{} is not > 0", self.blr));
        }
        if !finite_nonneg(self.min_lr) || !finite_nonneg(self.weight_decay) {
            return bad("min_lr / weight_decay", "must be finite and >= 0".into());
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return bad("momentum", format!("{} is not in [0, 1)", self.momentum));
        }
        Ok(())
    }

    fn thread_count(&self) -> usize {
        match self.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            t => t,
        }
    }
}

/// `BatchNorm1d(dim, affine=False)`: normalization only, with running statistics for evaluation.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchNorm {
    /// Running mean (starts at 0).
    pub running_mean: Vec<f32>,
    /// Running (unbiased) variance (starts at 1).
    pub running_var: Vec<f32>,
    /// Weight of the newest batch in the running statistics (0.1).
    pub momentum: f32,
    /// Added to the variance (1e-6, the official probe's choice).
    pub eps: f32,
    /// Training batches seen.
    pub batches_tracked: u64,
}

impl BatchNorm {
    /// Fresh statistics for `dim` features, as PyTorch initializes them.
    pub fn new(dim: usize) -> BatchNorm {
        BatchNorm {
            running_mean: vec![0.0; dim],
            running_var: vec![1.0; dim],
            momentum: 0.1,
            eps: 1e-6,
            batches_tracked: 0,
        }
    }

    /// Training mode: normalizes the `rows x dim` batch `x` into `out` with the batch's own mean
    /// and biased variance, and moves the running statistics towards the batch's mean and
    /// unbiased variance. Needs at least 2 rows (as PyTorch does).
    pub fn train_batch(&mut self, x: &[f32], out: &mut [f32]) {
        let dim = self.running_mean.len();
        let rows = x.len() / dim;
        let (mut sum, mut sq) = (vec![0.0f64; dim], vec![0.0f64; dim]);
        for row in x.chunks_exact(dim) {
            for (s, &v) in sum.iter_mut().zip(row) {
                *s += v as f64;
            }
        }
        let mean: Vec<f64> = sum.iter().map(|s| s / rows as f64).collect();
        for row in x.chunks_exact(dim) {
            for ((q, &v), m) in sq.iter_mut().zip(row).zip(&mean) {
                *q += (v as f64 - m) * (v as f64 - m);
            }
        }
        let var: Vec<f64> = sq.iter().map(|q| q / rows as f64).collect();
        let scale: Vec<f32> = var
            .iter()
            .map(|v| (1.0 / (v + self.eps as f64).sqrt()) as f32)
            .collect();
        let mean32: Vec<f32> = mean.iter().map(|&m| m as f32).collect();
        for (o, row) in out.chunks_exact_mut(dim).zip(x.chunks_exact(dim)) {
            for j in 0..dim {
                o[j] = (row[j] - mean32[j]) * scale[j];
            }
        }
        let m = self.momentum as f64;
        let unbiased = rows as f64 / (rows as f64 - 1.0);
        for j in 0..dim {
            let rm = &mut self.running_mean[j];
            *rm = ((1.0 - m) * *rm as f64 + m * mean[j]) as f32;
            let rv = &mut self.running_var[j];
            *rv = ((1.0 - m) * *rv as f64 + m * var[j] * unbiased) as f32;
        }
        self.batches_tracked += 1;
    }

    /// Evaluation mode: normalizes one row with the running statistics.
    pub fn eval_row(&self, x: &[f32], out: &mut [f32]) {
        for (j, (o, &v)) in out.iter_mut().zip(x).enumerate() {
            *o = (v - self.running_mean[j]) / (self.running_var[j] + self.eps).sqrt();
        }
    }
}

/// The probe: batch norm then a linear classifier.
#[derive(Clone, Debug, PartialEq)]
pub struct LinearProbe {
    /// The normalization in front of the classifier.
    pub bn: BatchNorm,
    /// `[classes, dim]`.
    pub weight: Vec<f32>,
    /// `[classes]`.
    pub bias: Vec<f32>,
    /// Number of classes.
    pub classes: usize,
}

/// What a probe makes of a set of samples.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Accuracy {
    /// Fraction of samples whose true class has the highest logit.
    pub top1: f64,
    /// Fraction among the five highest (when there are at least 5 classes).
    pub top5: Option<f64>,
    /// Mean cross-entropy.
    pub loss: f64,
    /// Samples evaluated.
    pub samples: usize,
}

impl LinearProbe {
    /// A fresh probe: weight `trunc_normal(std=0.01)` (timm's, truncated at +-2), bias 0, fresh
    /// batch-norm statistics.
    pub fn new(dim: usize, classes: usize, seed: u64) -> LinearProbe {
        let mut rng = Rng::new(seed).fork(INIT_STREAM);
        let weight = (0..classes * dim)
            .map(|_| loop {
                let x = 0.01 * rng.normal();
                if (-2.0..=2.0).contains(&x) {
                    break x as f32;
                }
            })
            .collect();
        LinearProbe {
            bn: BatchNorm::new(dim),
            weight,
            bias: vec![0.0; classes],
            classes,
        }
    }

    /// Values per input vector.
    pub fn dim(&self) -> usize {
        self.bn.running_mean.len()
    }

    /// Evaluation-mode logits `[n, classes]` of `n` feature rows.
    pub fn logits(&self, features: &[f32], threads: usize) -> Vec<f32> {
        let (d, c) = (self.dim(), self.classes);
        let n = features.len() / d;
        let mut out = vec![0.0; n * c];
        let threads = threads_for(n * d * c, threads);
        par_rows(&mut out, c, threads, |i, logits| {
            let mut x = vec![0.0; d];
            self.bn.eval_row(&features[i * d..(i + 1) * d], &mut x);
            linear_row(&self.weight, &self.bias, &x, logits);
        });
        out
    }

    /// Top-1 (and top-5) accuracy and mean loss on `data`, in evaluation mode.
    pub fn evaluate(&self, data: Samples<'_>) -> Result<Accuracy, ProbeError> {
        if data.dim != self.dim() {
            return Err(ProbeError::Shape {
                what: "feature dimension of the evaluated set vs the probe's",
                expected: self.dim(),
                got: data.dim,
            });
        }
        check_labels(data.labels, self.classes)?;
        let threads = ProbeOptions::default().thread_count();
        let logits = self.logits(data.features, threads);
        let (mut top1, mut top5, mut loss) = (0usize, 0usize, 0.0f64);
        for (row, &y) in logits.chunks_exact(self.classes).zip(data.labels) {
            let y = y as usize;
            // Rank of the true class, ties broken by class index (as a stable sort would).
            let rank = row
                .iter()
                .enumerate()
                .filter(|&(k, &v)| v > row[y] || (v == row[y] && k < y))
                .count();
            top1 += (rank < 1) as usize;
            top5 += (rank < 5) as usize;
            loss += cross_entropy(row, y);
        }
        let n = data.len().max(1) as f64;
        Ok(Accuracy {
            top1: top1 as f64 / n,
            top5: (self.classes >= 5).then_some(top5 as f64 / n),
            loss: loss / n,
            samples: data.len(),
        })
    }
}

/// One epoch of training, for progress lines.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EpochStats {
    /// The epoch, from 0.
    pub epoch: usize,
    /// Mean training loss over its steps.
    pub loss: f64,
    /// Learning rate of its last step.
    pub lr: f64,
    /// Steps taken.
    pub steps: usize,
    /// Seconds it took.
    pub seconds: f64,
}

/// A trained probe and its training curve.
#[derive(Clone, Debug, PartialEq)]
pub struct Trained {
    /// The probe.
    pub probe: LinearProbe,
    /// One entry per epoch.
    pub history: Vec<EpochStats>,
    /// Samples per step actually used.
    pub batch_size: usize,
    /// Steps per epoch.
    pub steps_per_epoch: usize,
    /// Peak learning rate.
    pub lr: f64,
}

/// Trains a probe for `classes` classes on `data` with `opts`, calling `on_epoch` after each
/// epoch.
pub fn train(
    data: Samples<'_>,
    classes: usize,
    opts: &ProbeOptions,
    mut on_epoch: impl FnMut(&EpochStats),
) -> Result<Trained, ProbeError> {
    opts.validate()?;
    if classes == 0 {
        return Err(ProbeError::BadOption {
            name: "classes",
            why: "a probe needs at least one class".into(),
        });
    }
    check_labels(data.labels, classes)?;
    let n = data.len();
    let batch = opts.effective_batch(n);
    if batch < 2 {
        return Err(ProbeError::BadOption {
            name: "batch_size",
            why: format!(
                "batch norm needs batches of at least 2 samples (batch size {}, {n} training \
                 samples)",
                opts.batch_size
            ),
        });
    }
    let (d, c) = (data.dim, classes);
    let steps_per_epoch = n / batch;
    let threads = threads_for(batch * d * c, opts.thread_count());
    let mut probe = LinearProbe::new(d, c, opts.seed);
    let (mut mu_w, mut mu_b) = (vec![0.0f32; c * d], vec![0.0f32; c]);
    let (mut x, mut xhat) = (vec![0.0f32; batch * d], vec![0.0f32; batch * d]);
    let mut logits = vec![0.0f32; batch * c];
    let (mut grad_w, mut grad_b) = (vec![0.0f32; c * d], vec![0.0f32; c]);
    let mut history = Vec::with_capacity(opts.epochs);
    let shuffle = Rng::new(opts.seed).fork(SHUFFLE_STREAM);

    for epoch in 0..opts.epochs {
        let start = Instant::now();
        let order = permutation(n, &mut shuffle.fork(epoch as u64));
        let (mut loss_sum, mut lr) = (0.0f64, 0.0);
        for (step, items) in order.chunks_exact(batch).enumerate() {
            lr = opts.lr_at(batch, epoch, step, steps_per_epoch);
            for (dst, &i) in x.chunks_exact_mut(d).zip(items) {
                dst.copy_from_slice(data.row(i));
            }
            probe.bn.train_batch(&x, &mut xhat);
            let (w, b) = (&probe.weight, &probe.bias);
            par_rows(&mut logits, c, threads, |r, out| {
                linear_row(w, b, &xhat[r * d..(r + 1) * d], out)
            });
            // Softmax cross-entropy; the logits become d(mean loss)/d(logits).
            let mut batch_loss = 0.0f64;
            for (row, &i) in logits.chunks_exact_mut(c).zip(items) {
                let y = data.labels[i] as usize;
                batch_loss += cross_entropy(row, y);
                softmax(row);
                row[y] -= 1.0;
                row.iter_mut().for_each(|g| *g /= batch as f32);
            }
            if !batch_loss.is_finite() {
                return Err(ProbeError::Diverged { epoch, step });
            }
            loss_sum += batch_loss / batch as f64;
            // dW = dlogits^T xhat, one class per output row; db = column sums.
            par_rows(&mut grad_w, d, threads, |k, out| {
                out.fill(0.0);
                for (g, xr) in logits.chunks_exact(c).zip(xhat.chunks_exact(d)) {
                    let gk = g[k];
                    out.iter_mut().zip(xr).for_each(|(o, &v)| *o += gk * v);
                }
            });
            grad_b.fill(0.0);
            for g in logits.chunks_exact(c) {
                grad_b.iter_mut().zip(g).for_each(|(o, &v)| *o += v);
            }
            let o = &opts.optimizer;
            let (m, wd) = (opts.momentum, opts.weight_decay);
            o.step(&mut probe.weight, &grad_w, &mut mu_w, lr, m, wd, true);
            o.step(&mut probe.bias, &grad_b, &mut mu_b, lr, m, wd, false);
        }
        let stats = EpochStats {
            epoch,
            loss: loss_sum / steps_per_epoch as f64,
            lr,
            steps: steps_per_epoch,
            seconds: start.elapsed().as_secs_f64(),
        };
        on_epoch(&stats);
        history.push(stats);
    }
    Ok(Trained {
        probe,
        history,
        batch_size: batch,
        steps_per_epoch,
        lr: scaled_lr(opts.blr, batch),
    })
}

fn check_labels(labels: &[u32], classes: usize) -> Result<(), ProbeError> {
    match labels.iter().position(|&l| l as usize >= classes) {
        Some(index) => Err(ProbeError::LabelOutOfRange {
            index,
            label: labels[index],
            classes,
        }),
        None => Ok(()),
    }
}

/// A uniformly random order of `0..n` (Fisher-Yates).
fn permutation(n: usize, rng: &mut Rng) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

/// `out[k] = weight[k] . x + bias[k]`.
fn linear_row(weight: &[f32], bias: &[f32], x: &[f32], out: &mut [f32]) {
    for ((o, w), &b) in out.iter_mut().zip(weight.chunks_exact(x.len())).zip(bias) {
        *o = dot(w, x) + b;
    }
}

/// A dot product in eight lanes, so that it vectorizes.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `-log softmax(row)[y]`, computed stably.
fn cross_entropy(row: &[f32], y: usize) -> f64 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
    max + sum.ln() - row[y] as f64
}

/// Replaces `row` by its softmax.
fn softmax(row: &mut [f32]) {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut sum = 0.0f32;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    row.iter_mut().for_each(|v| *v /= sum);
}

/// Threads worth using for `work` multiply-adds.
fn threads_for(work: usize, available: usize) -> usize {
    if work < PARALLEL_WORK {
        1
    } else {
        available.max(1)
    }
}

/// Calls `f(row, out_row)` for every `row_len`-long row of `out`, split in contiguous ranges over
/// `threads` threads. Each row is computed by one call, so the result does not depend on
/// `threads`.
fn par_rows(out: &mut [f32], row_len: usize, threads: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let rows = out.len() / row_len;
    if threads <= 1 || rows < 2 {
        for (i, r) in out.chunks_exact_mut(row_len).enumerate() {
            f(i, r);
        }
        return;
    }
    let per = rows.div_ceil(threads);
    std::thread::scope(|s| {
        for (t, part) in out.chunks_mut(per * row_len).enumerate() {
            let f = &f;
            s.spawn(move || {
                for (i, r) in part.chunks_exact_mut(row_len).enumerate() {
                    f(t * per + i, r);
                }
            });
        }
    });
}
