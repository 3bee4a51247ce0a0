//! What the model makes of masked images, in pixels: the four panels of the paper's Figures 2-4
//! (original, masked, reconstruction, reconstruction with the visible patches pasted back).
//!
//! The decoder predicts every patch in the loss's target space. With norm-pix loss that space is
//! each patch normalized by its own mean and variance, so a picture needs those statistics back:
//! they are taken from the true patch, as the paper's visualizations do (the model never sees
//! them for masked patches; say so next to the picture).

use crate::data::{load_items, Augment, DataError, Dataset};
use mae::params::MaeParams;
use mae::train::{TrainOptions, Trainer};
use mae::{Backend, Config};

/// The variance floor of the norm-pix target (`(x - mean) / sqrt(var + 1e-6)` in the official
/// `forward_loss`).
const NORM_PIX_EPS: f64 = 1e-6;

/// The panels of `n` images, each `[n, C, H, W]` in display range (0 to 1, clamped).
#[derive(Clone, Debug, PartialEq)]
pub struct Panels {
    /// Images.
    pub n: usize,
    /// Channels.
    pub channels: usize,
    /// Height and width.
    pub size: usize,
    /// The inputs.
    pub original: Vec<f32>,
    /// The inputs with the removed patches blanked (the dataset's mean color).
    pub masked: Vec<f32>,
    /// The decoder's output for every patch.
    pub reconstruction: Vec<f32>,
    /// The output on removed patches, the input on visible ones.
    pub pasted: Vec<f32>,
    /// Mask ratio used.
    pub mask_ratio: f64,
    /// Whether masked patches were un-normalized with their true statistics (norm-pix models).
    pub used_true_patch_stats: bool,
    /// The masked-patch loss of this batch.
    pub loss: f32,
}

/// Images prepared for the model by the evaluation transform (resize, center crop, normalize).
#[derive(Clone, Debug, PartialEq)]
pub struct Inputs {
    /// How many.
    pub n: usize,
    /// `[n, C, H, W]`, normalized.
    pub imgs: Vec<f32>,
    /// The normalization's per-channel mean.
    pub mean: Vec<f32>,
    /// The normalization's per-channel standard deviation.
    pub std: Vec<f32>,
}

/// Images `first .. first + n` of `ds` for a model of `cfg`'s size and channels.
pub fn eval_inputs(
    ds: &dyn Dataset,
    cfg: &Config,
    first: usize,
    n: usize,
) -> Result<Inputs, DataError> {
    let aug = Augment::eval(cfg.img_size, cfg.in_chans);
    let items: Vec<usize> = (first..first.saturating_add(n)).collect();
    let imgs = load_items(ds, &items, &aug, 0)?;
    Ok(Inputs {
        n,
        imgs,
        mean: aug.mean,
        std: aug.std,
    })
}

/// Runs the model on `inputs` with masking drawn from `seed`, and returns the panels in display
/// range.
pub fn panels<B: Backend>(
    b: &B,
    cfg: &Config,
    params: &MaeParams<Vec<f32>>,
    inputs: &Inputs,
    mask_ratio: f64,
    seed: u64,
) -> mae::Result<Panels> {
    let (imgs, n) = (inputs.imgs.as_slice(), inputs.n);
    let opts = TrainOptions {
        mask_ratio,
        ..TrainOptions::new(n)
    };
    let mut model = Trainer::new(b, cfg, params, opts, seed)?;
    let loss = model.forward(b, imgs, None)?;
    let pred = model.pred(b)?;
    let mask = model.masking().mask.clone();

    let (c, size, p) = (cfg.in_chans, cfg.img_size, cfg.patch_size);
    let grid = size / p;
    let dim = cfg.patch_dim();
    let mut recon = vec![0.0f32; imgs.len()];
    let mut blank = vec![1.0f32; imgs.len()]; // 1 where visible
    for i in 0..n {
        for l in 0..grid * grid {
            let (gy, gx) = (l / grid, l % grid);
            let row = &pred[(i * grid * grid + l) * dim..][..dim];
            // Pixel (py, px, ch) of the patch, as the target orders it (HWC within the patch).
            let at = |py: usize, px: usize, ch: usize| {
                ((i * c + ch) * size + gy * p + py) * size + gx * p + px
            };
            let (mu, sigma) = if cfg.norm_pix_loss {
                patch_stats(imgs, p, c, &at)
            } else {
                (0.0, 1.0)
            };
            let removed = mask[i * grid * grid + l] > 0.5;
            for py in 0..p {
                for px in 0..p {
                    for ch in 0..c {
                        let k = at(py, px, ch);
                        recon[k] = (row[(py * p + px) * c + ch] as f64 * sigma + mu) as f32;
                        if removed {
                            blank[k] = 0.0;
                        }
                    }
                }
            }
        }
    }
    let show = |v: &[f32]| to_display(v, c, size, &inputs.mean, &inputs.std);
    let masked: Vec<f32> = imgs.iter().zip(&blank).map(|(x, k)| x * k).collect();
    let pasted: Vec<f32> = imgs
        .iter()
        .zip(&recon)
        .zip(&blank)
        .map(|((x, y), k)| x * k + y * (1.0 - k))
        .collect();
    Ok(Panels {
        n,
        channels: c,
        size,
        original: show(imgs),
        masked: show(&masked),
        reconstruction: show(&recon),
        pasted: show(&pasted),
        mask_ratio,
        used_true_patch_stats: cfg.norm_pix_loss,
        loss,
    })
}

/// Mean and `sqrt(unbiased variance + eps)` of one patch's values, as the norm-pix target uses.
fn patch_stats(
    imgs: &[f32],
    p: usize,
    c: usize,
    at: &dyn Fn(usize, usize, usize) -> usize,
) -> (f64, f64) {
    let count = (p * p * c) as f64;
    let values =
        || (0..p).flat_map(move |py| (0..p).flat_map(move |px| (0..c).map(move |ch| (py, px, ch))));
    let mu = values()
        .map(|(y, x, ch)| imgs[at(y, x, ch)] as f64)
        .sum::<f64>()
        / count;
    let ss: f64 = values()
        .map(|(y, x, ch)| (imgs[at(y, x, ch)] as f64 - mu).powi(2))
        .sum();
    let var = if count > 1.0 { ss / (count - 1.0) } else { 0.0 };
    (mu, (var + NORM_PIX_EPS).sqrt())
}

/// Undoes the per-channel normalization and clamps to the displayable range.
fn to_display(v: &[f32], c: usize, size: usize, mean: &[f32], std: &[f32]) -> Vec<f32> {
    v.iter()
        .enumerate()
        .map(|(k, &x)| {
            let ch = k / (size * size) % c;
            (x * std[ch] + mean[ch]).clamp(0.0, 1.0)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patch_stats_match_the_unbiased_definition() {
        // One 2x2 single-channel patch with values 1, 2, 3, 4: mean 2.5, unbiased var 5/3.
        let imgs = [1.0f32, 2.0, 3.0, 4.0];
        let (mu, sigma) = patch_stats(&imgs, 2, 1, &|y, x, _| y * 2 + x);
        assert!((mu - 2.5).abs() < 1e-12);
        assert!((sigma - (5.0f64 / 3.0 + 1e-6).sqrt()).abs() < 1e-12);
    }

    #[test]
    fn display_undoes_normalization_and_clamps() {
        let v = [0.0f32, 1.0, -10.0, 10.0];
        let out = to_display(&v, 1, 2, &[0.5], &[0.25]);
        assert_eq!(out, vec![0.5, 0.75, 0.0, 1.0]);
    }
}
