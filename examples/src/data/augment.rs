//! The paper's pre-training augmentation (the official `main_pretrain.py` transforms):
//! `RandomResizedCrop(size, scale=(0.2, 1.0), ratio=(3/4, 4/3), interpolation=BICUBIC)`,
//! `RandomHorizontalFlip()`, `ToTensor()`, `Normalize(ImageNet mean, std)`, drawn from a seeded
//! [`Rng`] so that every sample can be repeated; and the fine-tuning one (`main_finetune.py`,
//! timm's `create_transform`), which adds RandAugment before normalizing and RandomErasing after.

use super::erasing::RandomErasing;
use super::randaugment::RandAugment;
use super::resample::resize_region;
use super::Image;
use mae::rng::Rng;

/// A crop rectangle in pixels: rows `top .. top + height`, columns `left .. left + width`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CropBox {
    pub top: usize,
    pub left: usize,
    pub height: usize,
    pub width: usize,
}

/// One image's way from decoded pixels to a normalized model input of `img_size x img_size`.
#[derive(Clone, Debug, PartialEq)]
pub struct Augment {
    /// Side of the square output.
    pub img_size: usize,
    /// Range of the crop's area as a fraction of the image's (RandomResizedCrop's `scale`).
    pub scale: (f64, f64),
    /// Range of the crop's width / height (RandomResizedCrop's `ratio`), sampled in log space.
    pub ratio: (f64, f64),
    /// Flip horizontally with probability 1/2.
    pub hflip: bool,
    /// Per-channel mean subtracted after scaling to [0, 1].
    pub mean: Vec<f32>,
    /// Per-channel standard deviation divided by.
    pub std: Vec<f32>,
    /// RandomResizedCrop when true; otherwise resize the shorter side to `img_size` and take the
    /// centre square (deterministic, for evaluation and pictures).
    pub random_crop: bool,
    /// RandAugment on the cropped, flipped `[0, 1]` image before normalizing (fine-tuning).
    pub rand_augment: Option<RandAugment>,
    /// RandomErasing on the normalized image (fine-tuning).
    pub erasing: Option<RandomErasing>,
}

impl Augment {
    /// The paper's pre-training augmentation for `channels`-channel images, normalized with
    /// [`norm_stats`](super::norm_stats).
    pub fn paper(img_size: usize, channels: usize) -> Augment {
        let (mean, std) = super::norm_stats(channels);
        Augment {
            img_size,
            scale: (0.2, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
            hflip: true,
            mean,
            std,
            random_crop: true,
            rand_augment: None,
            erasing: None,
        }
    }

    /// The MAE fine-tuning training transform, timm's `create_transform(is_training=True,
    /// auto_augment='rand-m9-mstd0.5-inc1', interpolation='bicubic', re_prob=0.25,
    /// re_mode='pixel', re_count=1)`: RandomResizedCrop with scale (0.08, 1), horizontal flip,
    /// [`RandAugment::paper`], normalization with [`norm_stats`](super::norm_stats), then
    /// [`RandomErasing::paper`].
    ///
    /// ```
    /// use mae_examples::data::{Augment, Image};
    /// use mae::rng::Rng;
    ///
    /// let aug = Augment::finetune(16, 3);
    /// let img = Image { channels: 3, height: 20, width: 24, pixels: vec![0.5; 3 * 20 * 24] };
    /// let mut a = vec![0.0; aug.output_len()];
    /// let mut b = vec![0.0; aug.output_len()];
    /// aug.apply(&img, &mut Rng::new(9), &mut a);
    /// aug.apply(&img, &mut Rng::new(9), &mut b);
    /// assert_eq!((a.len(), a), (3 * 16 * 16, b));
    /// ```
    pub fn finetune(img_size: usize, channels: usize) -> Augment {
        let paper = Augment::paper(img_size, channels);
        Augment {
            scale: (0.08, 1.0),
            rand_augment: Some(RandAugment::paper(&paper.mean)),
            erasing: Some(RandomErasing::paper()),
            ..paper
        }
    }

    /// Deterministic evaluation transform: bicubic resize of the shorter side to `img_size`, centre
    /// crop, no flip. (The official fine-tuning evaluation first resizes to `img_size / 0.875`;
    /// this keeps the whole shorter side instead, which suits small images and pictures.)
    pub fn eval(img_size: usize, channels: usize) -> Augment {
        Augment {
            hflip: false,
            random_crop: false,
            ..Augment::paper(img_size, channels)
        }
    }

    /// Number of values [`apply`](Augment::apply) writes: `channels * img_size * img_size`.
    pub fn output_len(&self) -> usize {
        self.mean.len() * self.img_size * self.img_size
    }

    /// torchvision's `RandomResizedCrop.get_params` for an image of `height x width`: ten tries of
    /// an area fraction uniform in `scale` and an aspect ratio log-uniform in `ratio`, kept when the
    /// rounded box fits; otherwise the centre crop clamped to the ratio range.
    pub fn crop_params(&self, height: usize, width: usize, rng: &mut Rng) -> CropBox {
        let area = (height * width) as f64;
        let (log_lo, log_hi) = (self.ratio.0.ln(), self.ratio.1.ln());
        for _ in 0..10 {
            let target_area = area * rng.range(self.scale.0, self.scale.1);
            let aspect = rng.range(log_lo, log_hi).exp();
            // Python's round() rounds half to even.
            let w = (target_area * aspect).sqrt().round_ties_even() as usize;
            let h = (target_area / aspect).sqrt().round_ties_even() as usize;
            if 0 < w && w <= width && 0 < h && h <= height {
                let top = (rng.next_u64() % (height - h + 1) as u64) as usize;
                let left = (rng.next_u64() % (width - w + 1) as u64) as usize;
                return CropBox {
                    top,
                    left,
                    height: h,
                    width: w,
                };
            }
        }
        let in_ratio = width as f64 / height as f64;
        let (w, h) = if in_ratio < self.ratio.0 {
            (
                width,
                ((width as f64 / self.ratio.0).round_ties_even() as usize).max(1),
            )
        } else if in_ratio > self.ratio.1 {
            (
                ((height as f64 * self.ratio.1).round_ties_even() as usize).max(1),
                height,
            )
        } else {
            (width, height)
        };
        let (w, h) = (w.min(width), h.min(height));
        CropBox {
            top: (height - h) / 2,
            left: (width - w) / 2,
            height: h,
            width: w,
        }
    }

    /// Writes the augmented, normalized `img` to `out` (`channels x img_size x img_size`).
    /// Random decisions are drawn from `rng` in torchvision's order: crop box, flip, then those
    /// of RandAugment and RandomErasing when present.
    ///
    /// # Panics
    /// If `img.channels` differs from `mean.len()` or `out` is not [`output_len`] long; the loader
    /// guarantees both.
    ///
    /// [`output_len`]: Augment::output_len
    pub fn apply(&self, img: &Image, rng: &mut Rng, out: &mut [f32]) {
        let c = img.channels;
        assert_eq!(c, self.mean.len(), "image channels vs normalization stats");
        assert_eq!(out.len(), self.output_len(), "output buffer length");
        let size = self.img_size;
        if self.random_crop {
            let b = self.crop_params(img.height, img.width, rng);
            resize_region(
                &img.pixels,
                c,
                (img.height, img.width),
                (b.top, b.left, b.height, b.width),
                (size, size),
                out,
            );
        } else {
            self.resize_center_crop(img, out);
        }
        if self.hflip && rng.uniform() < 0.5 {
            for row in out.chunks_mut(size) {
                row.reverse();
            }
        }
        if let Some(ra) = &self.rand_augment {
            ra.apply(out, (c, size, size), rng);
        }
        for (ch, plane) in out.chunks_mut(size * size).enumerate() {
            let (mean, inv_std) = (self.mean[ch], 1.0 / self.std[ch]);
            for v in plane {
                *v = (*v - mean) * inv_std;
            }
        }
        if let Some(erasing) = &self.erasing {
            erasing.apply(out, (c, size, size), rng);
        }
    }

    /// torchvision's `Resize(img_size)` (shorter side to `img_size`, the other truncated in
    /// proportion) then `CenterCrop(img_size)`.
    fn resize_center_crop(&self, img: &Image, out: &mut [f32]) {
        let size = self.img_size;
        let (h, w) = (img.height, img.width);
        let (rh, rw) = if w <= h {
            (((size * h) / w).max(size), size)
        } else {
            (size, ((size * w) / h).max(size))
        };
        let c = img.channels;
        let mut resized = vec![0.0f32; c * rh * rw];
        resize_region(&img.pixels, c, (h, w), (0, 0, h, w), (rh, rw), &mut resized);
        // CenterCrop: int(round((resized - size) / 2)).
        let top = ((rh - size) as f64 / 2.0).round_ties_even() as usize;
        let left = ((rw - size) as f64 / 2.0).round_ties_even() as usize;
        for ch in 0..c {
            for y in 0..size {
                let src = &resized[(ch * rh + top + y) * rw + left..][..size];
                out[(ch * size + y) * size..][..size].copy_from_slice(src);
            }
        }
    }
}
