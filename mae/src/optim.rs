//! AdamW with the official parameter groups, and the per-iteration learning-rate schedule.

use crate::backend::{AdamWStep, AdamWTensor, Backend};
use crate::config::ConfigError;
use crate::params::Role;

/// AdamW hyper-parameters other than the learning rate (the paper's Table 7 by default).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    /// First-moment decay (0.9).
    pub beta1: f64,
    /// Second-moment decay (0.95: the paper's choice, not PyTorch's 0.999).
    pub beta2: f64,
    /// Denominator epsilon (1e-8).
    pub eps: f64,
    /// Decoupled weight decay for the decayed group (0.05); biases and 1-D tensors get none.
    pub weight_decay: f64,
}

impl Default for AdamW {
    fn default() -> Self {
        AdamW {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.05,
        }
    }
}

impl AdamW {
    /// Checks every value's domain.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let checks = [
            ("beta1", self.beta1, (0.0..1.0).contains(&self.beta1)),
            ("beta2", self.beta2, (0.0..1.0).contains(&self.beta2)),
            ("eps", self.eps, self.eps.is_finite() && self.eps > 0.0),
            (
                "weight_decay",
                self.weight_decay,
                self.weight_decay.is_finite() && self.weight_decay >= 0.0,
            ),
        ];
        match checks.iter().find(|c| !c.2) {
            Some(&(name, value, _)) => Err(ConfigError::Hyper { name, value }),
            None => Ok(()),
        }
    }
}

/// The paper's learning rate rule: `lr = base_lr * effective_batch / 256`.
pub fn scaled_lr(base_lr: f64, effective_batch: usize) -> f64 {
    base_lr * effective_batch as f64 / 256.0
}

/// Linear warmup, then a half-cycle cosine to `min_lr`, evaluated per iteration at a fractional
/// epoch (`util/lr_sched.py`).
///
/// ```
/// let s = mae::optim::Schedule { lr: 1e-3, min_lr: 0.0, warmup_epochs: 2.0, epochs: 10.0 };
/// assert_eq!(s.lr_at(0.0), 0.0);              // the very first step uses lr 0
/// assert!((s.lr_at(1.0) - 5e-4).abs() < 1e-12);
/// assert!((s.lr_at(2.0) - 1e-3).abs() < 1e-12);
/// assert!((s.lr_at(6.0) - 5e-4).abs() < 1e-12); // half-way down the cosine
/// assert!(s.lr_at(10.0).abs() < 1e-12);
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedule {
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate.
    pub min_lr: f64,
    /// Warmup length.
    pub warmup_epochs: f64,
    /// Total length.
    pub epochs: f64,
}

impl Schedule {
    /// The learning rate at fractional epoch `epoch` (`step / steps_per_epoch + epoch_index`).
    pub fn lr_at(&self, epoch: f64) -> f64 {
        if epoch < self.warmup_epochs {
            self.lr * epoch / self.warmup_epochs
        } else {
            let span = (self.epochs - self.warmup_epochs).max(f64::MIN_POSITIVE);
            let progress = ((epoch - self.warmup_epochs) / span).min(1.0);
            self.min_lr
                + (self.lr - self.min_lr)
                    * 0.5
                    * (1.0 + libm::cos(core::f64::consts::PI * progress))
        }
    }
}

/// Layer-wise learning-rate decay (BEiT, the paper's Table 8): the learning-rate factor of the
/// tensor `name` in a ViT of `depth` blocks, `decay^(depth + 1 - layer)` where the embedding
/// (`cls_token`, `pos_embed`, `patch_embed.*`) is layer 0, `blocks.i.*` is layer `i + 1`, and
/// everything after the blocks (norms, head) is layer `depth + 1`, as `util/lr_decay.py`.
///
/// ```
/// use mae::optim::layer_decay_scale;
/// assert_eq!(layer_decay_scale("head.weight", 12, 0.75), 1.0);
/// assert_eq!(layer_decay_scale("blocks.11.mlp.fc1.weight", 12, 0.75), 0.75);
/// assert_eq!(layer_decay_scale("patch_embed.proj.weight", 12, 0.75), 0.75f64.powi(13));
/// ```
pub fn layer_decay_scale(name: &str, depth: usize, decay: f64) -> f64 {
    libm::pow(decay, (depth + 1 - layer_id(name, depth)) as f64)
}

/// The layer of the tensor `name` in [`layer_decay_scale`]'s numbering: 0 for the embedding,
/// `i + 1` for block `i`, `depth + 1` after the blocks.
pub fn layer_id(name: &str, depth: usize) -> usize {
    let top = depth + 1;
    if ["cls_token", "pos_embed"].contains(&name) || name.starts_with("patch_embed") {
        0
    } else if let Some(rest) = name.strip_prefix("blocks.") {
        let index = rest.split('.').next().and_then(|i| i.parse::<usize>().ok());
        index.map_or(top, |i| (i + 1).min(top))
    } else {
        top
    }
}

/// One AdamW update of every tensor `((param, grad), (m, v))` at `lr` times its factor (0: the
/// tensor does not train), with weight decay for the [`Role::Decayed`] ones; every gradient is
/// zeroed afterwards. `step` counts updates from 1 (bias correction). All tensors go to the
/// backend in one [`Backend::adamw_many`] call.
pub(crate) fn adamw_update<'a, B: Backend + 'a>(
    b: &B,
    h: &AdamW,
    lr: f64,
    step: u64,
    tensors: impl Iterator<Item = (BufQuad<'a, B>, (Role, f64))>,
) -> crate::error::Result<()> {
    if !(lr.is_finite() && lr >= 0.0) {
        return Err(ConfigError::Hyper {
            name: "lr",
            value: lr,
        }
        .into());
    }
    // An iterator, not a collected list: steps after the first allocate nothing on the host
    // (conformance/tests/alloc.rs).
    let all = tensors.map(|(((param, grad), (m, v)), (role, factor))| {
        let trains = factor > 0.0 && role != Role::Fixed;
        let update = trains.then(|| {
            let wd = if role == Role::Decayed {
                h.weight_decay
            } else {
                0.0
            };
            AdamWStep::new(lr * factor, h.beta1, h.beta2, h.eps, wd, step)
        });
        AdamWTensor {
            param,
            grad,
            m,
            v,
            step: update,
        }
    });
    b.adamw_many(all)?;
    Ok(())
}

/// A tensor, its gradient and its two AdamW moments.
pub(crate) type BufQuad<'a, B> = (
    (&'a mut <B as Backend>::Buf, &'a mut <B as Backend>::Buf),
    (&'a mut <B as Backend>::Buf, &'a mut <B as Backend>::Buf),
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_edges() {
        let s = Schedule {
            lr: 2e-3,
            min_lr: 1e-5,
            warmup_epochs: 0.0,
            epochs: 4.0,
        };
        assert_eq!(s.lr_at(0.0), 2e-3);
        assert!((s.lr_at(4.0) - 1e-5).abs() < 1e-15);
        assert!(
            (s.lr_at(9.0) - 1e-5).abs() < 1e-15,
            "past the end it stays at min_lr"
        );
        let monotone = (0..40)
            .map(|i| s.lr_at(i as f64 / 10.0))
            .collect::<alloc::vec::Vec<_>>();
        assert!(monotone.windows(2).all(|w| w[1] <= w[0]));
        // The paper's rule: base lr 1.5e-4 at batch 4096 is 2.4e-3.
        assert!((scaled_lr(1.5e-4, 4096) - 2.4e-3).abs() < 1e-15);
    }

    #[test]
    fn adamw_domains() {
        assert!(AdamW::default().validate().is_ok());
        let bad = AdamW {
            eps: 0.0,
            ..AdamW::default()
        };
        assert_eq!(
            bad.validate(),
            Err(ConfigError::Hyper {
                name: "eps",
                value: 0.0
            })
        );
    }
}
