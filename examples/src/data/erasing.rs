//! timm's `RandomErasing` (Zhong et al. 2017, `timm/data/random_erasing.py`) as the MAE
//! fine-tuning recipe uses it (`re_prob=0.25, re_mode='pixel', re_count=1`): with probability
//! 1/4, one rectangle of 2 % to 1/3 of the image, aspect ratio log-uniform in [0.3, 1/0.3], is
//! overwritten with standard-normal noise. It runs on the normalized image, where N(0, 1) noise
//! looks like the data.

use mae::rng::Rng;

/// What an erased rectangle is filled with (timm's `mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EraseMode {
    /// Zeros (the dataset mean after normalization): timm's `'const'`.
    Const,
    /// One normal value per channel: timm's `'rand'`.
    PerChannel,
    /// One normal value per pixel and channel: timm's `'pixel'`.
    PerPixel,
}

/// timm's `RandomErasing` for one image.
#[derive(Clone, Debug, PartialEq)]
pub struct RandomErasing {
    /// Probability that an image gets erased at all.
    pub probability: f64,
    /// Smallest rectangle area as a fraction of the image.
    pub min_area: f64,
    /// Largest rectangle area as a fraction of the image.
    pub max_area: f64,
    /// Range of the rectangle's height / width, sampled in log space.
    pub aspect: (f64, f64),
    /// The fill.
    pub mode: EraseMode,
    /// Rectangles per erased image: exactly 1 when 1, else uniform in `1..=max_count`, each with
    /// `1 / count` of the area.
    pub max_count: usize,
}

impl RandomErasing {
    /// The MAE fine-tuning setting: `RandomErasing(0.25, mode='pixel', max_count=1)` with timm's
    /// defaults `min_area=0.02, max_area=1/3, min_aspect=0.3`.
    ///
    /// ```
    /// use mae_examples::data::{EraseMode, RandomErasing};
    /// use mae::rng::Rng;
    ///
    /// let re = RandomErasing::paper();
    /// assert_eq!((re.probability, re.mode), (0.25, EraseMode::PerPixel));
    /// let mut img = vec![0.0f32; 3 * 16 * 16];
    /// let erased = (0..100).filter(|&seed| {
    ///     img.fill(0.0);
    ///     re.apply(&mut img, (3, 16, 16), &mut Rng::new(seed)).is_some()
    /// });
    /// assert!(erased.count() > 5);
    /// ```
    pub fn paper() -> RandomErasing {
        RandomErasing {
            probability: 0.25,
            min_area: 0.02,
            max_area: 1.0 / 3.0,
            aspect: (0.3, 1.0 / 0.3),
            mode: EraseMode::PerPixel,
            max_count: 1,
        }
    }

    /// Erases in place within the planar image `img` of shape (channels, height, width); returns
    /// the last rectangle erased as `(top, left, height, width)`, or `None` when the image was
    /// left alone (the probability said no, or ten tries found no rectangle that fits).
    /// Random numbers are drawn in timm's order: the decision, the count, then per try the area,
    /// the aspect ratio and, once one fits, its top, left and fill.
    ///
    /// # Panics
    /// If `img` is not `channels * height * width` long.
    pub fn apply(
        &self,
        img: &mut [f32],
        (c, h, w): (usize, usize, usize),
        rng: &mut Rng,
    ) -> Option<(usize, usize, usize, usize)> {
        assert_eq!(img.len(), c * h * w, "image length");
        if rng.uniform_f64() > self.probability {
            return None;
        }
        let area = (h * w) as f64;
        let count = if self.max_count > 1 {
            1 + (rng.next_u64() % self.max_count as u64) as usize
        } else {
            self.max_count
        };
        let (log_lo, log_hi) = (self.aspect.0.ln(), self.aspect.1.ln());
        let mut last = None;
        for _ in 0..count {
            for _attempt in 0..10 {
                let target_area = rng.range(self.min_area, self.max_area) * area / count as f64;
                let aspect = rng.range(log_lo, log_hi).exp();
                // Python's round() rounds half to even.
                let eh = (target_area * aspect).sqrt().round_ties_even() as usize;
                let ew = (target_area / aspect).sqrt().round_ties_even() as usize;
                if ew < w && eh < h {
                    let top = (rng.next_u64() % (h - eh + 1) as u64) as usize;
                    let left = (rng.next_u64() % (w - ew + 1) as u64) as usize;
                    self.fill(img, (c, h, w), (top, left, eh, ew), rng);
                    last = Some((top, left, eh, ew));
                    break;
                }
            }
        }
        last
    }

    /// Writes the fill into the rectangle, values in (channel, row, column) order as torch's
    /// `normal_()` fills a (channels, rows, columns) tensor.
    fn fill(
        &self,
        img: &mut [f32],
        (c, h, w): (usize, usize, usize),
        (top, left, eh, ew): (usize, usize, usize, usize),
        rng: &mut Rng,
    ) {
        for ch in 0..c {
            let channel_value = match self.mode {
                EraseMode::Const => 0.0,
                EraseMode::PerChannel => rng.normal() as f32,
                EraseMode::PerPixel => 0.0,
            };
            for y in top..top + eh {
                for v in &mut img[(ch * h + y) * w + left..][..ew] {
                    *v = match self.mode {
                        EraseMode::PerPixel => rng.normal() as f32,
                        _ => channel_value,
                    };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erased_fraction_stays_within_bounds() {
        let re = RandomErasing {
            probability: 1.0,
            ..RandomErasing::paper()
        };
        let (c, h, w) = (2, 32, 32);
        let (mut erased, mut lo, mut hi) = (0, 1.0f64, 0.0f64);
        for seed in 0..500 {
            // NaN marks untouched pixels; normal noise is never NaN.
            let mut img = vec![f32::NAN; c * h * w];
            let Some((top, left, eh, ew)) = re.apply(&mut img, (c, h, w), &mut Rng::new(seed))
            else {
                continue;
            };
            erased += 1;
            let changed = img.iter().filter(|v| !v.is_nan()).count();
            assert_eq!(changed, c * eh * ew, "exactly the rectangle, every channel");
            for ch in 0..c {
                for y in top..top + eh {
                    assert!(img[(ch * h + y) * w + left..][..ew]
                        .iter()
                        .all(|v| v.is_finite()));
                }
            }
            let frac = (eh * ew) as f64 / (h * w) as f64;
            // Rounding each side to whole pixels moves the area a little past the bounds.
            assert!(
                frac > 0.02 * 0.7 && frac < (1.0 / 3.0) * 1.3,
                "fraction {frac}"
            );
            assert!(eh < h && ew < w);
            lo = lo.min(frac);
            hi = hi.max(frac);
        }
        // Nearly every image finds a rectangle in ten tries, and the sizes span the range.
        assert!(erased > 480, "{erased} of 500 erased");
        assert!(lo < 0.05 && hi > 0.25, "fractions {lo}..{hi}");
    }

    #[test]
    fn a_quarter_of_the_images_are_erased_with_normal_noise() {
        let re = RandomErasing::paper();
        let (c, h, w) = (3, 24, 24);
        let (mut erased, mut sum, mut sum2, mut n) = (0, 0.0f64, 0.0f64, 0usize);
        for seed in 0..2000 {
            let mut img = vec![f32::NAN; c * h * w];
            if re.apply(&mut img, (c, h, w), &mut Rng::new(seed)).is_some() {
                erased += 1;
                for v in img.iter().filter(|v| !v.is_nan()) {
                    sum += *v as f64;
                    sum2 += (*v as f64).powi(2);
                    n += 1;
                }
            } else {
                assert!(img.iter().all(|v| v.is_nan()));
            }
        }
        assert!((erased as f64 / 2000.0 - 0.25).abs() < 0.03, "{erased}");
        let mean = sum / n as f64;
        let var = sum2 / n as f64 - mean * mean;
        assert!(
            mean.abs() < 0.02 && (var - 1.0).abs() < 0.03,
            "{mean} {var}"
        );
    }

    #[test]
    fn const_mode_writes_zeros_and_per_channel_one_value() {
        let (c, h, w) = (3, 16, 16);
        for mode in [EraseMode::Const, EraseMode::PerChannel] {
            let re = RandomErasing {
                probability: 1.0,
                mode,
                ..RandomErasing::paper()
            };
            let mut img = vec![f32::NAN; c * h * w];
            let (top, left, _, _) = re.apply(&mut img, (c, h, w), &mut Rng::new(4)).unwrap();
            for ch in 0..c {
                let first = img[(ch * h + top) * w + left];
                let plane = &img[ch * h * w..][..h * w];
                assert!(plane.iter().filter(|v| !v.is_nan()).all(|&v| v == first));
                if mode == EraseMode::Const {
                    assert_eq!(first, 0.0);
                }
            }
        }
    }
}
