//! The pre-training recipe of a run, every value resolved: the paper's Table 7 by default
//! (AdamW with betas 0.9 / 0.95 and weight decay 0.05, base lr 1.5e-4 scaled by the effective
//! batch over 256, linear warmup then half-cycle cosine, mask ratio 0.75), with the run's length,
//! data and seed. It is stored in every checkpoint, so `--resume` continues exactly the run that
//! was saved.

use mae::masking::MaskSampling;
use mae::optim::{scaled_lr, AdamW, Schedule};
use mae::train::TrainOptions;
use serde::{Deserialize, Serialize};

/// The paper's base learning rate (Table 7), per 256 images.
pub const PAPER_BLR: f64 = 1.5e-4;
/// The paper's warmup as a fraction of the run: 40 of 800 epochs.
pub const PAPER_WARMUP_FRACTION: f64 = 40.0 / 800.0;

/// Every setting that shapes a pre-training run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// Model preset name (or `demo`).
    pub model: String,
    /// Dataset spec, as given to `--data`.
    pub data: String,
    /// Images per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer update.
    pub accum_iter: usize,
    /// Base learning rate (per 256 images).
    pub blr: f64,
    /// Peak learning rate actually used: `blr * batch_size * accum_iter / 256` unless set.
    pub lr: f64,
    /// Learning rate at the end of the cosine.
    pub min_lr: f64,
    /// Linear warmup, in epochs.
    pub warmup_epochs: f64,
    /// Length of the run, in epochs (fractional when `--steps` set it).
    pub epochs: f64,
    /// Micro-batches per epoch (the dataset's size over the batch size, rounded down).
    pub batches_per_epoch: u64,
    /// Optimizer updates in the whole run.
    pub total_steps: u64,
    /// Fraction of patches removed.
    pub mask_ratio: f64,
    /// Which patches are removed (`random` in recipes saved before the choice existed).
    #[serde(default)]
    pub mask_sampling: MaskSampling,
    /// AdamW settings.
    pub weight_decay: f64,
    /// AdamW beta1.
    pub beta1: f64,
    /// AdamW beta2.
    pub beta2: f64,
    /// Seed of initialization, masking and data order / augmentation.
    pub seed: u64,
}

impl Recipe {
    /// The peak learning rate of the paper's rule: `blr * effective batch / 256`.
    pub fn scaled_lr(blr: f64, batch_size: usize, accum_iter: usize) -> f64 {
        scaled_lr(blr, batch_size * accum_iter)
    }

    /// Optimizer updates in `epochs` epochs of `batches_per_epoch` micro-batches.
    pub fn steps_for(epochs: f64, batches_per_epoch: u64, accum_iter: usize) -> u64 {
        ((epochs * batches_per_epoch as f64) / accum_iter as f64).ceil() as u64
    }

    /// The learning-rate schedule.
    pub fn schedule(&self) -> Schedule {
        Schedule {
            lr: self.lr,
            min_lr: self.min_lr,
            warmup_epochs: self.warmup_epochs,
            epochs: self.epochs,
        }
    }

    /// The learning rate of the update that follows micro-batch `batch` (counted from the start
    /// of the run), set as the official code does: from the fractional epoch at the first
    /// micro-batch of each accumulation group.
    pub fn lr_at_batch(&self, batch: u64) -> f64 {
        let first = batch - batch % self.accum_iter as u64;
        self.schedule()
            .lr_at(first as f64 / self.batches_per_epoch.max(1) as f64)
    }

    /// The trainer's options.
    pub fn train_options(&self) -> TrainOptions {
        TrainOptions {
            batch_size: self.batch_size,
            mask_ratio: self.mask_ratio,
            adamw: AdamW {
                beta1: self.beta1,
                beta2: self.beta2,
                weight_decay: self.weight_decay,
                ..AdamW::default()
            },
            accum_steps: self.accum_iter,
            mask_sampling: self.mask_sampling,
        }
    }

    /// The recipe as pretty JSON (`run.json`, checkpoint metadata).
    pub fn to_json(&self) -> String {
        // A struct of numbers and strings always serializes.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Parses [`Recipe::to_json`]'s output.
    pub fn from_json(json: &str) -> Result<Recipe, String> {
        serde_json::from_str(json).map_err(|e| format!("bad run recipe: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipe() -> Recipe {
        Recipe {
            model: "tiny32".into(),
            data: "synthetic".into(),
            batch_size: 64,
            accum_iter: 2,
            blr: PAPER_BLR,
            lr: Recipe::scaled_lr(PAPER_BLR, 64, 2),
            min_lr: 0.0,
            warmup_epochs: 1.0,
            epochs: 4.0,
            batches_per_epoch: 10,
            total_steps: Recipe::steps_for(4.0, 10, 2),
            mask_ratio: 0.75,
            mask_sampling: Default::default(),
            weight_decay: 0.05,
            beta1: 0.9,
            beta2: 0.95,
            seed: 0,
        }
    }

    #[test]
    fn paper_scaling_and_schedule() {
        let r = recipe();
        assert!((r.lr - 1.5e-4 * 128.0 / 256.0).abs() < 1e-15);
        assert_eq!(r.total_steps, 20);
        // Both micro-batches of a group get the lr of the group's first one.
        assert_eq!(r.lr_at_batch(0), 0.0);
        assert_eq!(r.lr_at_batch(5), r.lr_at_batch(4));
        assert!(
            (r.lr_at_batch(10) - r.lr).abs() < 1e-15,
            "peak after warmup"
        );
        assert!(r.lr_at_batch(39) < r.lr * 0.05, "cosine decays to ~0");
    }

    #[test]
    fn json_round_trip_and_unknown_fields() {
        let r = recipe();
        assert_eq!(Recipe::from_json(&r.to_json()).unwrap(), r);
        let extra = r.to_json().replacen('{', "{\"bogus\": 1,", 1);
        assert!(Recipe::from_json(&extra).unwrap_err().contains("bogus"));
    }
}
