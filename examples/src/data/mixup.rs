//! timm's `Mixup` in `'batch'` mode (`timm/data/mixup.py`) as the MAE fine-tuning recipe uses it:
//! per batch, either mixup (Zhang et al. 2017: `lam x + (1 - lam) x'`, lam ~ Beta(0.8, 0.8)) or,
//! with probability 1/2, CutMix (Yun et al. 2019: a box of the partner image pasted in, lam ~
//! Beta(1, 1) then corrected to the box's true area), where every image's partner is its mirror
//! in the batch (`x.flip(0)`); targets are the same mix of label-smoothed one-hot vectors.

use super::DataError;
use mae::rng::Rng;

/// Mixup / CutMix parameters (timm's `Mixup` in mode `'batch'`).
#[derive(Clone, Debug, PartialEq)]
pub struct Mixup {
    /// Beta(a, a) parameter of mixup; 0 disables mixup.
    pub mixup_alpha: f64,
    /// Beta(a, a) parameter of CutMix; 0 disables CutMix.
    pub cutmix_alpha: f64,
    /// Probability that a batch is mixed at all.
    pub prob: f64,
    /// Probability of CutMix rather than mixup when both are enabled.
    pub switch_prob: f64,
    /// Label smoothing of the targets: `1 - s + s / C` on the label, `s / C` elsewhere.
    pub label_smoothing: f64,
    /// Number of classes C (columns of the targets).
    pub num_classes: usize,
    /// Set lam to the fraction of the image the CutMix box leaves unchanged (after clipping to
    /// the image) instead of the drawn value.
    pub correct_lam: bool,
}

/// What [`Mixup::mix`] did to a batch.
#[derive(Clone, Debug, PartialEq)]
pub struct Mixed {
    /// Soft targets, `[N, num_classes]` row-major; each row sums to 1.
    pub targets: Vec<f32>,
    /// Weight of each image's own label (1: the batch was not mixed).
    pub lam: f64,
    /// The CutMix box as `(top, bottom, left, right)` (rows `top..bottom`, columns
    /// `left..right`), when CutMix was used.
    pub cutmix_box: Option<(usize, usize, usize, usize)>,
}

impl Mixup {
    /// The MAE fine-tuning setting (`main_finetune.py`): mixup 0.8, CutMix 1.0, prob 1, switch
    /// prob 0.5, label smoothing 0.1, lam corrected.
    ///
    /// ```
    /// use mae_examples::data::Mixup;
    /// use mae::rng::Rng;
    ///
    /// let mix = Mixup::paper(10);
    /// let (n, shape) = (4, (3, 8, 8));
    /// let mut images = vec![0.0f32; n * 3 * 8 * 8];
    /// let targets = mix.apply(&mut images, &[0, 1, 2, 3], shape, &mut Rng::new(0))?;
    /// assert_eq!(targets.len(), n * 10);
    /// for row in targets.chunks(10) {
    ///     assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
    /// }
    /// # Ok::<(), mae_examples::data::DataError>(())
    /// ```
    pub fn paper(num_classes: usize) -> Mixup {
        Mixup {
            mixup_alpha: 0.8,
            cutmix_alpha: 1.0,
            prob: 1.0,
            switch_prob: 0.5,
            label_smoothing: 0.1,
            num_classes,
            correct_lam: true,
        }
    }

    /// Mixes the batch `images` (`N x c x h x w`, planar, `image_shape = (c, h, w)`) in place and
    /// returns the soft targets `[N, num_classes]`. See [`mix`](Mixup::mix).
    pub fn apply(
        &self,
        images: &mut [f32],
        labels: &[u32],
        image_shape: (usize, usize, usize),
        rng: &mut Rng,
    ) -> Result<Vec<f32>, DataError> {
        Ok(self.mix(images, labels, image_shape, rng)?.targets)
    }

    /// timm's `Mixup.__call__` in batch mode: one lam for the whole batch, image `i` mixed with
    /// image `N - 1 - i`. timm requires an even batch; here an odd one is accepted and its middle
    /// image is its own partner (so it stays as it is, with its own smoothed label). Random
    /// numbers are drawn in timm's order: apply?, CutMix?, lam, then the box centre (row, column).
    ///
    /// Errors ([`DataError::Options`]): `num_classes` is 0, a label is not below it, or `images`
    /// is not `labels.len()` images of `image_shape`.
    pub fn mix(
        &self,
        images: &mut [f32],
        labels: &[u32],
        (c, h, w): (usize, usize, usize),
        rng: &mut Rng,
    ) -> Result<Mixed, DataError> {
        let n = labels.len();
        let per_image = c * h * w;
        if images.len() != n * per_image {
            return Err(DataError::Options {
                why: format!(
                    "mixup: {} values are not {n} images of {c} x {h} x {w}",
                    images.len()
                ),
            });
        }
        check_labels(labels, self.num_classes)?;
        let (mut lam, use_cutmix) = self.params_per_batch(rng);
        let mut cutmix_box = None;
        if lam != 1.0 {
            if use_cutmix {
                let (b, corrected) = self.cutmix_box_and_lam(h, w, lam, rng);
                lam = corrected;
                cutmix_box = Some(b);
                paste_mirrored(images, n, (c, h, w), b);
            } else {
                blend_mirrored(images, n, per_image, lam);
            }
        }
        let targets = mixed_targets(labels, self.num_classes, lam, self.label_smoothing);
        Ok(Mixed {
            targets,
            lam,
            cutmix_box,
        })
    }

    /// timm's `_params_per_batch`: (lam, use CutMix). With both alphas 0 nothing is mixed (timm
    /// asserts instead).
    fn params_per_batch(&self, rng: &mut Rng) -> (f64, bool) {
        if rng.uniform_f64() >= self.prob {
            return (1.0, false);
        }
        let (mixup, cutmix) = (self.mixup_alpha > 0.0, self.cutmix_alpha > 0.0);
        let use_cutmix = match (mixup, cutmix) {
            (true, true) => rng.uniform_f64() < self.switch_prob,
            (false, true) => true,
            (true, false) => false,
            (false, false) => return (1.0, false),
        };
        let alpha = if use_cutmix {
            self.cutmix_alpha
        } else {
            self.mixup_alpha
        };
        (sample_beta(alpha, alpha, rng), use_cutmix)
    }

    /// timm's `cutmix_bbox_and_lam` with `rand_bbox`: a box of sides `int(side * sqrt(1 - lam))`
    /// centred on a uniform pixel, clipped to the image; lam becomes the uncovered fraction when
    /// `correct_lam`.
    fn cutmix_box_and_lam(
        &self,
        h: usize,
        w: usize,
        lam: f64,
        rng: &mut Rng,
    ) -> ((usize, usize, usize, usize), f64) {
        let ratio = (1.0 - lam).sqrt();
        let (cut_h, cut_w) = ((h as f64 * ratio) as i64, (w as f64 * ratio) as i64);
        let cy = (rng.next_u64() % h.max(1) as u64) as i64;
        let cx = (rng.next_u64() % w.max(1) as u64) as i64;
        let clip = |v: i64, hi: usize| v.clamp(0, hi as i64) as usize;
        let (top, bottom) = (clip(cy - cut_h / 2, h), clip(cy + cut_h / 2, h));
        let (left, right) = (clip(cx - cut_w / 2, w), clip(cx + cut_w / 2, w));
        let lam = if self.correct_lam {
            1.0 - ((bottom - top) * (right - left)) as f64 / (h * w) as f64
        } else {
            lam
        };
        ((top, bottom, left, right), lam)
    }
}

/// Label-smoothed one-hot targets `[N, num_classes]` for training without mixing (timm's
/// `LabelSmoothingCrossEntropy` is cross-entropy against exactly these): `1 - s + s / C` on the
/// label, `s / C` elsewhere.
///
/// ```
/// let t = mae_examples::data::targets_without_mixing(&[2, 0], 4, 0.1)?;
/// assert_eq!(t.len(), 2 * 4);
/// assert!((t[2] - (1.0 - 0.1 + 0.025)).abs() < 1e-7); // image 0, its label 2
/// assert!((t[1] - 0.025).abs() < 1e-7);
/// # Ok::<(), mae_examples::data::DataError>(())
/// ```
///
/// Errors ([`DataError::Options`]): `num_classes` is 0 or a label is not below it.
pub fn targets_without_mixing(
    labels: &[u32],
    num_classes: usize,
    smoothing: f64,
) -> Result<Vec<f32>, DataError> {
    check_labels(labels, num_classes)?;
    Ok(mixed_targets(labels, num_classes, 1.0, smoothing))
}

fn check_labels(labels: &[u32], num_classes: usize) -> Result<(), DataError> {
    if num_classes == 0 {
        return Err(DataError::Options {
            why: "targets for 0 classes".into(),
        });
    }
    if let Some((i, l)) = labels
        .iter()
        .enumerate()
        .find(|(_, &l)| l as usize >= num_classes)
    {
        return Err(DataError::Options {
            why: format!("label {l} of image {i} is not below the {num_classes} classes"),
        });
    }
    Ok(())
}

/// timm's `mixup_target`: `lam * smooth(y) + (1 - lam) * smooth(y.flip(0))`, in single precision
/// as torch computes it.
fn mixed_targets(labels: &[u32], num_classes: usize, lam: f64, smoothing: f64) -> Vec<f32> {
    let off = smoothing / num_classes as f64;
    let on = 1.0 - smoothing + off;
    let (on, off) = (on as f32, off as f32);
    let (lam_own, lam_other) = (lam as f32, (1.0 - lam) as f32);
    let n = labels.len();
    let mut t = vec![0.0f32; n * num_classes];
    for (i, row) in t.chunks_mut(num_classes).enumerate() {
        let (own, other) = (labels[i] as usize, labels[n - 1 - i] as usize);
        for (k, v) in row.iter_mut().enumerate() {
            let a = if k == own { on } else { off };
            let b = if k == other { on } else { off };
            *v = a * lam_own + b * lam_other;
        }
    }
    t
}

/// `x = lam x + (1 - lam) x.flip(0)`, in single precision as torch's in-place ops compute it.
fn blend_mirrored(images: &mut [f32], n: usize, per_image: usize, lam: f64) {
    let (a, b) = (lam as f32, (1.0 - lam) as f32);
    for i in 0..n / 2 {
        let j = n - 1 - i;
        let (head, tail) = images.split_at_mut(j * per_image);
        let xi = &mut head[i * per_image..][..per_image];
        let xj = &mut tail[..per_image];
        for (p, q) in xi.iter_mut().zip(xj.iter_mut()) {
            let (vi, vj) = (*p, *q);
            *p = vi * a + vj * b;
            *q = vj * a + vi * b;
        }
    }
    if n % 2 == 1 {
        let mid = &mut images[(n / 2) * per_image..][..per_image];
        for v in mid {
            *v = *v * a + *v * b;
        }
    }
}

/// `x[:, :, top:bottom, left:right] = x.flip(0)[:, :, top:bottom, left:right]`: pairs swap the box.
fn paste_mirrored(
    images: &mut [f32],
    n: usize,
    (c, h, w): (usize, usize, usize),
    (top, bottom, left, right): (usize, usize, usize, usize),
) {
    let per_image = c * h * w;
    for i in 0..n / 2 {
        let j = n - 1 - i;
        let (head, tail) = images.split_at_mut(j * per_image);
        let xi = &mut head[i * per_image..][..per_image];
        let xj = &mut tail[..per_image];
        for ch in 0..c {
            for y in top..bottom {
                let row = (ch * h + y) * w;
                xi[row + left..row + right].swap_with_slice(&mut xj[row + left..row + right]);
            }
        }
    }
}

/// A Gamma(`shape`, 1) sample by Marsaglia and Tsang (2000); shapes below 1 use the boost
/// `Gamma(shape + 1) * U^(1 / shape)`.
///
/// # Panics
/// If `shape` is not positive and finite.
pub fn sample_gamma(shape: f64, rng: &mut Rng) -> f64 {
    assert!(shape > 0.0 && shape.is_finite(), "gamma shape {shape}");
    if shape < 1.0 {
        // 1 - u lies in (0, 1], so the power is finite and positive.
        let u = 1.0 - rng.uniform_f64();
        return sample_gamma(shape + 1.0, rng) * u.powf(1.0 / shape);
    }
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let (x, v) = loop {
            let x = rng.normal();
            let v = 1.0 + c * x;
            if v > 0.0 {
                break (x, v * v * v);
            }
        };
        let u = 1.0 - rng.uniform_f64();
        if u < 1.0 - 0.0331 * x.powi(4) || u.ln() < 0.5 * x * x + d * (1.0 - v + v.ln()) {
            return d * v;
        }
    }
}

/// A Beta(`a`, `b`) sample as `X / (X + Y)` with X ~ Gamma(a), Y ~ Gamma(b).
///
/// ```
/// use mae_examples::data::sample_beta;
/// let mut rng = mae::rng::Rng::new(3);
/// let x = sample_beta(0.8, 0.8, &mut rng);
/// assert!((0.0..=1.0).contains(&x));
/// ```
///
/// # Panics
/// If `a` or `b` is not positive and finite.
pub fn sample_beta(a: f64, b: f64, rng: &mut Rng) -> f64 {
    let x = sample_gamma(a, rng);
    let y = sample_gamma(b, rng);
    if x + y > 0.0 {
        x / (x + y)
    } else {
        // Both underflowed (only for tiny shapes): the limit puts all mass on 0 or 1.
        f64::from(rng.uniform_f64() < a / (a + b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn beta_moments_match() {
        let mut rng = Rng::new(11);
        let n = 40_000;
        for (a, b) in [(0.8, 0.8), (1.0, 1.0), (2.0, 5.0), (0.3, 3.0)] {
            let xs: Vec<f64> = (0..n).map(|_| sample_beta(a, b, &mut rng)).collect();
            assert!(xs.iter().all(|x| (0.0..=1.0).contains(x)));
            let mean = xs.iter().sum::<f64>() / n as f64;
            let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
            let want_mean = a / (a + b);
            let want_var = a * b / ((a + b).powi(2) * (a + b + 1.0));
            // The standard error of the mean is at most 0.5 / sqrt(n) = 0.0025.
            assert!(
                (mean - want_mean).abs() < 0.01,
                "Beta({a}, {b}) mean {mean}"
            );
            assert!(
                (var - want_var).abs() < 0.1 * want_var,
                "Beta({a}, {b}) var {var} vs {want_var}"
            );
        }
    }

    #[test]
    fn gamma_mean_and_variance_are_the_shape() {
        let mut rng = Rng::new(5);
        let n = 40_000;
        for k in [0.5, 0.8, 1.0, 3.0] {
            let xs: Vec<f64> = (0..n).map(|_| sample_gamma(k, &mut rng)).collect();
            let mean = xs.iter().sum::<f64>() / n as f64;
            let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
            assert!(
                (mean - k).abs() < 0.03 * k.max(1.0),
                "Gamma({k}) mean {mean}"
            );
            assert!((var - k).abs() < 0.1 * k, "Gamma({k}) var {var}");
        }
    }
}
