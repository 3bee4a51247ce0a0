//! Synthetic images generated from a seed, with structure worth reconstructing: smooth
//! gradients, stripes, filled shapes that occlude each other. No files needed.

use mae::rng::Rng;

/// ImageNet channel statistics used to normalize RGB inputs, as the official transforms do.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// See [`IMAGENET_MEAN`].
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// One image `[channels, size, size]` in [0, 1], fully determined by `seed`.
pub fn image(seed: u64, channels: usize, size: usize) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    let mut img = vec![0.0f32; channels * size * size];
    let color = |rng: &mut Rng| -> Vec<f32> { (0..channels).map(|_| rng.uniform()).collect() };
    // Background: a linear gradient between two colors in a random direction.
    let (c0, c1) = (color(&mut rng), color(&mut rng));
    let angle = rng.range(0.0, std::f64::consts::TAU);
    let (dx, dy) = (angle.cos() as f32, angle.sin() as f32);
    let s = size as f32;
    for y in 0..size {
        for x in 0..size {
            let t = ((x as f32 / s - 0.5) * dx + (y as f32 / s - 0.5) * dy + 0.5).clamp(0.0, 1.0);
            for c in 0..channels {
                img[(c * size + y) * size + x] = c0[c] * (1.0 - t) + c1[c] * t;
            }
        }
    }
    // Two to four shapes, later ones occluding earlier ones.
    let shapes = 2 + (rng.next_u64() % 3) as usize;
    for _ in 0..shapes {
        let col = color(&mut rng);
        let (cx, cy) = (
            rng.range(0.0, s as f64) as f32,
            rng.range(0.0, s as f64) as f32,
        );
        let r = rng.range(0.1, 0.35) as f32 * s;
        let kind = rng.next_u64() % 3;
        let period = rng.range(2.0, 6.0) as f32;
        for y in 0..size {
            for x in 0..size {
                let (fx, fy) = (x as f32 + 0.5 - cx, y as f32 + 0.5 - cy);
                let inside = match kind {
                    0 => fx * fx + fy * fy <= r * r,
                    1 => fx.abs() <= r && fy.abs() <= 0.6 * r,
                    // A striped disc: texture inside a shape.
                    _ => fx * fx + fy * fy <= r * r && ((fx + fy) / period).rem_euclid(2.0) < 1.0,
                };
                if inside {
                    for c in 0..channels {
                        img[(c * size + y) * size + x] = col[c];
                    }
                }
            }
        }
    }
    img
}

/// Normalizes `[channels, H, W]` in [0, 1] in place: ImageNet statistics for 3 channels, and
/// mean 0.5, std 0.25 otherwise.
pub fn normalize(img: &mut [f32], channels: usize) {
    let plane = img.len() / channels;
    for (c, values) in img.chunks_mut(plane).enumerate() {
        let (mean, std) = if channels == 3 {
            (IMAGENET_MEAN[c], IMAGENET_STD[c])
        } else {
            (0.5, 0.25)
        };
        for v in values {
            *v = (*v - mean) / std;
        }
    }
}

/// A normalized batch `[n, channels, size, size]` of images `first .. first + n` of the
/// dataset of `seed`.
pub fn batch(seed: u64, first: u64, n: usize, channels: usize, size: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n * channels * size * size);
    for i in 0..n as u64 {
        let mut img = image(
            seed.wrapping_mul(0x9E37_79B9).wrapping_add(first + i),
            channels,
            size,
        );
        normalize(&mut img, channels);
        out.extend_from_slice(&img);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_are_repeatable_and_varied() {
        assert_eq!(image(1, 3, 16), image(1, 3, 16));
        assert_ne!(image(1, 3, 16), image(2, 3, 16));
        let img = image(7, 3, 32);
        assert!(img.iter().all(|v| (0.0..=1.0).contains(v)));
        let mean = img.iter().sum::<f32>() / img.len() as f32;
        let var = img.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / img.len() as f32;
        assert!(
            var > 1e-3,
            "an image with structure has variance, got {var}"
        );
    }
}
