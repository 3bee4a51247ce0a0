//! timm's RandAugment as the MAE fine-tuning recipe configures it (`rand-m9-mstd0.5-inc1`,
//! `timm/data/auto_augment.py`): per image, two operations drawn with replacement from the 15
//! "increasing" transforms, each applied with probability 1/2 at magnitude 9 of 10 plus gaussian
//! noise of std 0.5, clipped to [0, 10].
//!
//! timm runs on 8-bit PIL images, so this does too: the cropped image is quantized to bytes
//! (`round(255 v)`), the operations run on bytes exactly as Pillow's (see [`pillow`](super::pillow)),
//! and the result goes back to `k / 255` as `ToTensor` gives it. That makes posterize, solarize,
//! equalize and autocontrast act on the same 256 levels as in timm.

use super::pillow::{self, Image8, Interpolation};
use mae::rng::Rng;

/// One of timm's RandAugment transforms (the `_RAND_INCREASING_TRANSFORMS` list), named as there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RandOp {
    /// Stretch each channel to the full 0..=255 range.
    AutoContrast,
    /// Flatten each channel's histogram.
    Equalize,
    /// `255 - v`.
    Invert,
    /// Rotate by up to ±30 degrees (sign random).
    Rotate,
    /// Keep 4 down to 0 top bits as the magnitude grows.
    PosterizeIncreasing,
    /// Invert values above a threshold falling from 256 to 0 as the magnitude grows.
    SolarizeIncreasing,
    /// Add up to 110 to values below 128.
    SolarizeAdd,
    /// Saturation factor 1 ± up to 0.9.
    ColorIncreasing,
    /// Contrast factor 1 ± up to 0.9.
    ContrastIncreasing,
    /// Brightness factor 1 ± up to 0.9.
    BrightnessIncreasing,
    /// Sharpness factor 1 ± up to 0.9.
    SharpnessIncreasing,
    /// Horizontal shear by up to ±0.3.
    ShearX,
    /// Vertical shear by up to ±0.3.
    ShearY,
    /// Horizontal shift by up to ±45 % of the width.
    TranslateXRel,
    /// Vertical shift by up to ±45 % of the height.
    TranslateYRel,
}

/// timm's `_RAND_INCREASING_TRANSFORMS`, in its order (the order matters: an op is drawn by index).
pub const RAND_INCREASING_OPS: [RandOp; 15] = [
    RandOp::AutoContrast,
    RandOp::Equalize,
    RandOp::Invert,
    RandOp::Rotate,
    RandOp::PosterizeIncreasing,
    RandOp::SolarizeIncreasing,
    RandOp::SolarizeAdd,
    RandOp::ColorIncreasing,
    RandOp::ContrastIncreasing,
    RandOp::BrightnessIncreasing,
    RandOp::SharpnessIncreasing,
    RandOp::ShearX,
    RandOp::ShearY,
    RandOp::TranslateXRel,
    RandOp::TranslateYRel,
];

/// timm's `_LEVEL_DENOM`: magnitudes are tenths of an op's full strength.
const LEVEL_DENOM: f64 = 10.0;

/// A RandAugment policy: which ops, how many per image, how strong.
#[derive(Clone, Debug, PartialEq)]
pub struct RandAugment {
    /// The ops to draw from, uniformly and with replacement.
    pub ops: Vec<RandOp>,
    /// Ops drawn per image (timm's `n`, default 2).
    pub num_ops: usize,
    /// Probability that a drawn op is applied (timm's `AugmentOp.prob`, 0.5 in RandAugment).
    pub prob: f64,
    /// Magnitude on the 0..=10 scale (timm's `m`).
    pub magnitude: f64,
    /// Std of the gaussian noise added to the magnitude each time an op runs (timm's `mstd`);
    /// 0: none; infinite: the magnitude is uniform in [0, `magnitude`] instead.
    pub magnitude_std: f64,
    /// Upper clip of the noisy magnitude (timm's `mmax`, default 10).
    pub magnitude_max: f64,
    /// Full-strength shift of TranslateXRel / TranslateYRel as a fraction of the side (0.45).
    pub translate_pct: f64,
    /// Resampling of Rotate, ShearX/Y and TranslateX/YRel.
    pub interpolation: Interpolation,
    /// Per-channel 8-bit colour of the area that geometric ops uncover.
    pub fill: Vec<u8>,
}

impl RandAugment {
    /// `rand-m9-mstd0.5-inc1` with the hyper-parameters timm's `create_transform` gives it in the
    /// MAE fine-tuning recipe (`interpolation='bicubic'`): geometric ops resample bicubically and
    /// fill with the dataset mean in 8 bits, `round(255 * mean)` per channel (124, 116, 104 for
    /// ImageNet's).
    ///
    /// ```
    /// use mae_examples::data::{self, RandAugment};
    /// use mae::rng::Rng;
    ///
    /// let (mean, _) = data::norm_stats(3);
    /// let ra = RandAugment::paper(&mean);
    /// assert_eq!((ra.num_ops, ra.magnitude, ra.fill.clone()), (2, 9.0, vec![124, 116, 104]));
    /// let mut pixels = vec![0.25f32; 3 * 8 * 8];
    /// ra.apply(&mut pixels, (3, 8, 8), &mut Rng::new(1));
    /// assert!(pixels.iter().all(|v| (0.0..=1.0).contains(v)));
    /// ```
    pub fn paper(mean: &[f32]) -> RandAugment {
        RandAugment {
            ops: RAND_INCREASING_OPS.to_vec(),
            num_ops: 2,
            prob: 0.5,
            magnitude: 9.0,
            magnitude_std: 0.5,
            magnitude_max: LEVEL_DENOM,
            translate_pct: 0.45,
            interpolation: Interpolation::Bicubic,
            // Python's round() of 255 * mean; no ImageNet-like mean lands on a tie.
            fill: mean
                .iter()
                .map(|&m| (255.0 * m as f64).round().clamp(0.0, 255.0) as u8)
                .collect(),
        }
    }

    /// Augments the planar `[0, 1]` image `pixels` of shape (channels, height, width) in place:
    /// quantized to 8 bits, [`apply_8bit`](RandAugment::apply_8bit), back to `k / 255`.
    ///
    /// # Panics
    /// If `pixels` is not `channels * height * width` long or `fill` has another channel count.
    pub fn apply(&self, pixels: &mut [f32], (c, h, w): (usize, usize, usize), rng: &mut Rng) {
        let mut img = Image8::from_unit(pixels, c, h, w);
        self.apply_8bit(&mut img, rng);
        img.to_unit(pixels);
    }

    /// timm's `RandAugment.__call__` on an 8-bit image: draws `num_ops` ops, then runs each
    /// (which may skip itself with probability `1 - prob`). Random numbers are drawn in timm's
    /// order: the op indices, then per op the apply decision, the magnitude noise and the sign.
    pub fn apply_8bit(&self, img: &mut Image8, rng: &mut Rng) {
        if self.ops.is_empty() {
            return;
        }
        let chosen: Vec<RandOp> = (0..self.num_ops)
            .map(|_| self.ops[(rng.next_u64() % self.ops.len() as u64) as usize])
            .collect();
        for op in chosen {
            self.run(op, img, rng);
        }
    }

    /// timm's `AugmentOp.__call__`.
    fn run(&self, op: RandOp, img: &mut Image8, rng: &mut Rng) {
        if self.prob < 1.0 && rng.uniform_f64() > self.prob {
            return;
        }
        let mut magnitude = self.magnitude;
        if self.magnitude_std == f64::INFINITY {
            magnitude = rng.range(0.0, magnitude);
        } else if self.magnitude_std > 0.0 {
            magnitude += self.magnitude_std * rng.normal();
        }
        let magnitude = magnitude.clamp(0.0, self.magnitude_max);
        self.run_at(op, magnitude, img, rng);
    }

    /// Op `op` at `magnitude` (0..=10) with timm's level-to-argument rules; `rng` only chooses
    /// signs, where timm negates at random.
    pub fn run_at(&self, op: RandOp, magnitude: f64, img: &mut Image8, rng: &mut Rng) {
        let level = magnitude / LEVEL_DENOM;
        let (interp, fill) = (self.interpolation, &self.fill[..]);
        match op {
            RandOp::AutoContrast => pillow::autocontrast(img),
            RandOp::Equalize => pillow::equalize(img),
            RandOp::Invert => pillow::invert(img),
            RandOp::Rotate => pillow::rotate(img, randomly_negate(level * 30.0, rng), interp, fill),
            // Python's int() truncates; the levels are non-negative.
            RandOp::PosterizeIncreasing => pillow::posterize(img, 4 - (level * 4.0) as u32),
            RandOp::SolarizeIncreasing => pillow::solarize(img, 256 - (level * 256.0) as u32),
            RandOp::SolarizeAdd => pillow::solarize_add(img, (level * 110.0) as u32, 128),
            RandOp::ColorIncreasing => pillow::color(img, enhance_factor(level, rng)),
            RandOp::ContrastIncreasing => pillow::contrast(img, enhance_factor(level, rng)),
            RandOp::BrightnessIncreasing => pillow::brightness(img, enhance_factor(level, rng)),
            RandOp::SharpnessIncreasing => pillow::sharpness(img, enhance_factor(level, rng)),
            RandOp::ShearX => {
                let s = randomly_negate(level * 0.3, rng);
                pillow::affine(img, [1.0, s, 0.0, 0.0, 1.0, 0.0], interp, fill);
            }
            RandOp::ShearY => {
                let s = randomly_negate(level * 0.3, rng);
                pillow::affine(img, [1.0, 0.0, 0.0, s, 1.0, 0.0], interp, fill);
            }
            RandOp::TranslateXRel => {
                let px = randomly_negate(level * self.translate_pct, rng) * img.width as f64;
                pillow::affine(img, [1.0, 0.0, px, 0.0, 1.0, 0.0], interp, fill);
            }
            RandOp::TranslateYRel => {
                let px = randomly_negate(level * self.translate_pct, rng) * img.height as f64;
                pillow::affine(img, [1.0, 0.0, 0.0, 0.0, 1.0, px], interp, fill);
            }
        }
    }
}

/// timm's `_randomly_negate`: `-v` when a uniform draw exceeds 1/2.
fn randomly_negate(v: f64, rng: &mut Rng) -> f64 {
    if rng.uniform_f64() > 0.5 {
        -v
    } else {
        v
    }
}

/// timm's `_enhance_increasing_level_to_arg`: 1 ± 0.9 level, at least 0.1.
fn enhance_factor(level: f64, rng: &mut Rng) -> f32 {
    (1.0 + randomly_negate(level * 0.9, rng)).max(0.1) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(c: usize, h: usize, w: usize) -> Image8 {
        Image8 {
            channels: c,
            height: h,
            width: w,
            pixels: (0..c * h * w)
                .map(|i| ((i * 29 + i / 7) % 256) as u8)
                .collect(),
        }
    }

    #[test]
    fn magnitude_rules_follow_timm() {
        let ra = RandAugment::paper(&[0.5]);
        // Posterize at magnitude 10 keeps 0 bits (black); at 0 keeps 4.
        let mut img = ramp(1, 8, 8);
        ra.run_at(
            RandOp::PosterizeIncreasing,
            10.0,
            &mut img,
            &mut Rng::new(0),
        );
        assert!(img.pixels.iter().all(|&v| v == 0));
        let orig = ramp(1, 8, 8);
        let mut img = orig.clone();
        ra.run_at(RandOp::PosterizeIncreasing, 0.0, &mut img, &mut Rng::new(0));
        assert!(img
            .pixels
            .iter()
            .zip(&orig.pixels)
            .all(|(&p, &o)| p == o & 0xF0));
        // Solarize at magnitude 0 is the identity (threshold 256); at 10 inverts everything.
        let mut img = orig.clone();
        ra.run_at(RandOp::SolarizeIncreasing, 0.0, &mut img, &mut Rng::new(0));
        assert_eq!(img, orig);
        ra.run_at(RandOp::SolarizeIncreasing, 10.0, &mut img, &mut Rng::new(0));
        assert!(img
            .pixels
            .iter()
            .zip(&orig.pixels)
            .all(|(&p, &o)| p == 255 - o));
        // Magnitude 0 of the enhancements, rotate, shear and translate changes nothing.
        for op in [
            RandOp::Rotate,
            RandOp::ColorIncreasing,
            RandOp::ContrastIncreasing,
            RandOp::BrightnessIncreasing,
            RandOp::SharpnessIncreasing,
            RandOp::ShearX,
            RandOp::ShearY,
            RandOp::TranslateXRel,
            RandOp::TranslateYRel,
            RandOp::SolarizeAdd,
        ] {
            let mut img = orig.clone();
            ra.run_at(op, 0.0, &mut img, &mut Rng::new(3));
            assert_eq!(img, orig, "{op:?}");
        }
    }

    #[test]
    fn translate_shifts_by_the_fraction_of_the_side_either_way() {
        // Full strength shifts by a quarter of the 20-pixel side: exactly 5 pixels.
        let ra = RandAugment {
            translate_pct: 0.25,
            ..RandAugment::paper(&[0.5])
        };
        let (h, w) = (4, 20);
        let mut orig = Image8 {
            channels: 1,
            height: h,
            width: w,
            pixels: vec![0; h * w],
        };
        for y in 0..h {
            orig.pixels[y * w + 10] = 200;
        }
        let mut seen = std::collections::BTreeSet::new();
        for seed in 0..32 {
            let mut img = orig.clone();
            ra.run_at(RandOp::TranslateXRel, 10.0, &mut img, &mut Rng::new(seed));
            let col = (0..w).find(|&x| img.pixels[x] == 200).expect("column kept");
            seen.insert(col);
        }
        // Output x reads input x ± 5, so the column lands at 5 or 15.
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), [5, 15]);
    }

    #[test]
    fn op_choice_covers_the_list_and_repeats_with_the_seed() {
        let ra = RandAugment {
            prob: 1.0,
            magnitude_std: 0.0,
            ..RandAugment::paper(&[0.5, 0.5, 0.5])
        };
        let orig = ramp(3, 16, 16);
        let mut results = std::collections::HashSet::new();
        for seed in 0..200 {
            let mut a = orig.clone();
            let mut b = orig.clone();
            ra.apply_8bit(&mut a, &mut Rng::new(seed));
            ra.apply_8bit(&mut b, &mut Rng::new(seed));
            assert_eq!(a, b);
            results.insert(a.pixels);
        }
        // 15 * 15 ordered pairs with random signs: many distinct outcomes.
        assert!(results.len() > 100, "{} distinct results", results.len());
    }

    #[test]
    fn ops_are_skipped_half_the_time() {
        let ra = RandAugment {
            ops: vec![RandOp::Invert],
            num_ops: 1,
            ..RandAugment::paper(&[0.5])
        };
        let orig = ramp(1, 4, 4);
        let n = 2000;
        let inverted = (0..n)
            .filter(|&seed| {
                let mut img = orig.clone();
                ra.apply_8bit(&mut img, &mut Rng::new(seed));
                img != orig
            })
            .count();
        assert!(
            (inverted as f64 / n as f64 - 0.5).abs() < 0.05,
            "{inverted} of {n}"
        );
    }

    #[test]
    fn fill_is_the_mean_in_eight_bits() {
        let (mean, _) = crate::data::norm_stats(3);
        assert_eq!(RandAugment::paper(&mean).fill, [124, 116, 104]);
    }
}
