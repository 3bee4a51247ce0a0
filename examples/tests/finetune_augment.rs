//! The fine-tuning data recipe: `Augment::finetune` (crop, flip, RandAugment, normalize,
//! RandomErasing) and batch Mixup/CutMix with smoothed targets; `paper()` and `eval()` give the
//! same numbers as before the fine-tuning stages existed.

use mae::rng::Rng;
use mae_examples::data::{
    self, targets_without_mixing, Augment, DataError, Image, Loader, LoaderOptions, Mixup,
};

/// A `channels x h x w` image with structure in every channel.
fn test_image(channels: usize, h: usize, w: usize) -> Image {
    Image {
        channels,
        height: h,
        width: w,
        pixels: (0..channels * h * w)
            .map(|i| {
                let (c, y, x) = (i / (h * w), (i / w) % h, i % w);
                ((x * 7 + y * 3 + c * 50) % 97) as f32 / 96.0
            })
            .collect(),
    }
}

/// FNV-1a over the bit patterns: any change of any value changes it.
fn fingerprint(values: &[f32]) -> u64 {
    values.iter().fold(0xcbf2_9ce4_8422_2325, |h, v| {
        (h ^ v.to_bits() as u64).wrapping_mul(0x0000_0100_0000_01B3)
    })
}

#[test]
fn paper_and_eval_outputs_are_unchanged() {
    // Fingerprints recorded with the code before RandAugment and RandomErasing were added
    // (pre-training resumes bitwise, so these must never move).
    let img = test_image(3, 40, 52);
    let mut got = Vec::new();
    for (aug, seed) in [
        (Augment::paper(24, 3), 1),
        (Augment::paper(24, 3), 2),
        (Augment::eval(24, 3), 3),
    ] {
        let mut out = vec![0.0; aug.output_len()];
        aug.apply(&img, &mut Rng::new(seed), &mut out);
        got.push(fingerprint(&out));
    }
    let gray = test_image(1, 30, 30);
    let aug = Augment::paper(16, 1);
    let mut out = vec![0.0; aug.output_len()];
    aug.apply(&gray, &mut Rng::new(4), &mut out);
    got.push(fingerprint(&out));
    assert_eq!(
        got,
        [
            0x72ba_227a_6c99_998a,
            0xb7dd_935b_6c65_abaa,
            0x5f35_a206_4b0f_3c3f,
            0x44ad_8e5e_5936_d5de
        ],
        "{got:#x?}"
    );
}

#[test]
fn finetune_output_has_the_right_length_and_repeats_with_the_seed() {
    for channels in [1, 3] {
        let aug = Augment::finetune(32, channels);
        assert_eq!(aug.output_len(), channels * 32 * 32);
        let img = test_image(channels, 48, 40);
        let run = |seed| {
            let mut out = vec![f32::NAN; aug.output_len()];
            aug.apply(&img, &mut Rng::new(seed), &mut out);
            out
        };
        let a = run(5);
        assert!(a.iter().all(|v| v.is_finite()));
        assert_eq!(a, run(5));
        assert_ne!(a, run(6));
    }
}

#[test]
fn finetune_is_the_paper_crop_with_its_own_scale_and_two_more_stages() {
    let finetune = Augment::finetune(16, 3);
    let paper = Augment::paper(16, 3);
    assert_eq!(finetune.scale, (0.08, 1.0));
    assert_eq!(
        (paper.rand_augment.is_none(), paper.erasing.is_none()),
        (true, true)
    );
    // Without its two stages the fine-tuning transform is the pre-training one with scale 0.08.
    let bare = Augment {
        rand_augment: None,
        erasing: None,
        ..finetune.clone()
    };
    assert_eq!(
        bare,
        Augment {
            scale: (0.08, 1.0),
            ..paper
        }
    );
    // With them, outputs differ from the bare transform for most seeds (RandAugment applies no
    // op to about a quarter of the images and erasing skips three quarters, and even then the
    // 8-bit quantization moves values a little).
    let img = test_image(3, 24, 24);
    let differ = (0..40)
        .filter(|&seed| {
            let (mut a, mut b) = (vec![0.0; 768], vec![0.0; 768]);
            finetune.apply(&img, &mut Rng::new(seed), &mut a);
            bare.apply(&img, &mut Rng::new(seed), &mut b);
            a != b
        })
        .count();
    assert_eq!(differ, 40);
}

#[test]
fn finetune_augment_feeds_the_loader() -> Result<(), DataError> {
    let ds = data::open("synthetic:16:24", 3)?;
    let opts = LoaderOptions::new(4, Augment::finetune(16, 3), 3);
    let mut loader = Loader::new(ds.clone(), opts.clone(), 0)?;
    let first = loader.next()?;
    assert_eq!(first.images.len(), 4 * 3 * 16 * 16);
    let mut again = Loader::new(ds, opts, 0)?;
    assert_eq!(again.next()?.images, first.images);
    Ok(())
}

/// `n` images of `shape` where image `i` is the constant `i + 1`.
fn constant_batch(n: usize, (c, h, w): (usize, usize, usize)) -> Vec<f32> {
    (0..n)
        .flat_map(|i| std::iter::repeat_n((i + 1) as f32, c * h * w))
        .collect()
}

fn smoothed(label: u32, classes: usize, smoothing: f64) -> Vec<f64> {
    let off = smoothing / classes as f64;
    (0..classes)
        .map(|k| {
            if k == label as usize {
                1.0 - smoothing + off
            } else {
                off
            }
        })
        .collect()
}

#[test]
fn mixup_targets_are_lam_weighted_smoothed_one_hots() -> Result<(), DataError> {
    let mix = Mixup::paper(5);
    let labels = [0, 3, 1, 4, 4, 2];
    let shape = (2, 8, 8);
    let (mut cutmix, mut mixup) = (0, 0);
    for seed in 0..200 {
        let mut images = constant_batch(labels.len(), shape);
        let m = mix.mix(&mut images, &labels, shape, &mut Rng::new(seed))?;
        assert!((0.0..=1.0).contains(&m.lam), "lam {}", m.lam);
        match m.cutmix_box {
            Some(_) => cutmix += 1,
            None => mixup += 1,
        }
        for (i, row) in m.targets.chunks(5).enumerate() {
            let sum: f32 = row.iter().sum();
            assert!((sum - 1.0).abs() < 1e-6, "row {i} sums to {sum}");
            let own = smoothed(labels[i], 5, 0.1);
            let other = smoothed(labels[labels.len() - 1 - i], 5, 0.1);
            for k in 0..5 {
                let want = m.lam * own[k] + (1.0 - m.lam) * other[k];
                assert!((row[k] as f64 - want).abs() < 1e-6, "{row:?}");
            }
        }
    }
    // switch_prob 0.5: both kinds come up about equally often.
    assert!(cutmix > 70 && mixup > 70, "{cutmix} cutmix, {mixup} mixup");
    Ok(())
}

#[test]
fn cutmix_lambda_is_the_true_unpasted_fraction() {
    let mix = Mixup {
        switch_prob: 1.0,
        ..Mixup::paper(3)
    };
    let (n, shape) = (4, (3, 10, 14));
    let per_image = 3 * 10 * 14;
    let mut seen_clipped = false;
    for seed in 0..100 {
        let mut images = constant_batch(n, shape);
        let m = mix
            .mix(&mut images, &[0, 1, 2, 0], shape, &mut Rng::new(seed))
            .unwrap();
        let (top, bottom, left, right) = m.cutmix_box.expect("switch_prob 1 always cuts");
        for i in 0..n {
            let img = &images[i * per_image..][..per_image];
            let own = img.iter().filter(|&&v| v == (i + 1) as f32).count();
            let pasted = img.iter().filter(|&&v| v == (n - i) as f32).count();
            assert_eq!(own + pasted, per_image, "only the partner's values come in");
            let frac_own = own as f64 / per_image as f64;
            assert!(
                (m.lam - frac_own).abs() < 1e-12,
                "lam {} vs {frac_own}",
                m.lam
            );
            // The pasted pixels are exactly the box.
            for (k, &v) in img.iter().enumerate() {
                let (y, x) = ((k / 14) % 10, k % 14);
                let inside = (top..bottom).contains(&y) && (left..right).contains(&x);
                assert_eq!(v == (n - i) as f32, inside);
            }
        }
        // Boxes near a border are clipped; then lam exceeds 1 - cut area.
        seen_clipped |= top == 0 || left == 0 || bottom == 10 || right == 14;
    }
    assert!(seen_clipped);
}

#[test]
fn mixup_blends_each_image_with_its_mirror() {
    let mix = Mixup {
        switch_prob: 0.0,
        ..Mixup::paper(4)
    };
    let shape = (1, 2, 3);
    for n in [2, 4, 5] {
        let mut images = constant_batch(n, shape);
        let labels: Vec<u32> = (0..n as u32).map(|i| i % 4).collect();
        let m = mix
            .mix(&mut images, &labels, shape, &mut Rng::new(7))
            .unwrap();
        assert!(m.cutmix_box.is_none());
        for i in 0..n {
            let want = m.lam * (i + 1) as f64 + (1.0 - m.lam) * (n - i) as f64;
            for &v in &images[i * 6..][..6] {
                assert!((v as f64 - want).abs() < 1e-5, "image {i}: {v} vs {want}");
            }
        }
        if n % 2 == 1 {
            // The middle image of an odd batch is its own partner: it keeps its label.
            let mid = n / 2;
            let row = &m.targets[mid * 4..][..4];
            let want = smoothed(labels[mid], 4, 0.1);
            for k in 0..4 {
                assert!((row[k] as f64 - want[k]).abs() < 1e-6);
            }
        }
    }
}

#[test]
fn mixup_repeats_with_the_seed_and_rejects_bad_input() {
    let mix = Mixup::paper(3);
    let shape = (1, 4, 4);
    let run = |seed| {
        let mut images: Vec<f32> = (0..64).map(|i| i as f32).collect();
        let t = mix.apply(&mut images, &[0, 1, 2, 1], shape, &mut Rng::new(seed));
        (images, t.unwrap())
    };
    assert_eq!(run(3), run(3));
    assert_ne!(run(3), run(4));
    let mut images = vec![0.0; 32];
    let err = mix
        .apply(&mut images, &[0, 3], shape, &mut Rng::new(0))
        .unwrap_err();
    assert!(err.to_string().contains("label 3"), "{err}");
    let err = mix
        .apply(&mut images, &[0, 1, 2], shape, &mut Rng::new(0))
        .unwrap_err();
    assert!(err.to_string().contains("not 3 images"), "{err}");
    assert!(Mixup::paper(0)
        .apply(&mut images, &[0, 0], shape, &mut Rng::new(0))
        .is_err());
}

#[test]
fn targets_without_mixing_are_smoothed_one_hots() {
    let t = targets_without_mixing(&[1, 0, 2], 3, 0.1).unwrap();
    for (i, label) in [1u32, 0, 2].into_iter().enumerate() {
        let want = smoothed(label, 3, 0.1);
        for k in 0..3 {
            assert!((t[i * 3 + k] as f64 - want[k]).abs() < 1e-7);
        }
    }
    assert_eq!(
        targets_without_mixing(&[0, 1], 2, 0.0).unwrap(),
        [1.0, 0.0, 0.0, 1.0]
    );
    assert!(targets_without_mixing(&[2], 2, 0.1).is_err());
}
