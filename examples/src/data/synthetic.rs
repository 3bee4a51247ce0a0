//! Synthetic images generated from a seed, with structure worth reconstructing: a background that
//! is a gradient or a texture, and two to five shapes (discs, rectangles, triangles, rings), each
//! filled with a flat colour, a gradient, stripes, checkers or smooth noise, later shapes occluding
//! earlier ones. No files needed: the `synthetic` dataset is the default of `pretrain`, so the
//! README's main command works on a fresh machine.
//!
//! Shapes are placed in coordinates relative to the image side, so one seed draws the same picture
//! at any size; the label of an image is the kind of its front shape.

use super::{DataError, Dataset, Image};
use mae::rng::Rng;

/// Kinds of shapes, in label order.
pub const CLASSES: [&str; 4] = ["disc", "rectangle", "triangle", "ring"];

/// The seed of image `index` of the dataset of `seed`.
fn image_seed(seed: u64, index: u64) -> u64 {
    Rng::new(seed).fork(index).next_u64()
}

/// One image `[channels, size, size]` in [0, 1], fully determined by `seed`.
pub fn image(seed: u64, channels: usize, size: usize) -> Vec<f32> {
    draw(seed, channels, size).0
}

/// The class of the image of `seed`: the kind of its front shape (an index into [`CLASSES`]).
pub fn label(seed: u64) -> u32 {
    // Drawing at size 1 costs little and follows the same random sequence as any other size.
    draw(seed, 1, 1).1
}

/// How a region is coloured: every variant maps a point (in image-relative units) to a colour.
enum Paint {
    Flat(Vec<f32>),
    /// Linear blend from `c0` to `c1` along direction `dir`.
    Gradient {
        c0: Vec<f32>,
        c1: Vec<f32>,
        dir: (f32, f32),
    },
    /// Bands of `c0` and `c1` across direction `dir`, `period` wide.
    Stripes {
        c0: Vec<f32>,
        c1: Vec<f32>,
        dir: (f32, f32),
        period: f32,
    },
    /// A checkerboard of `period`-wide cells rotated by `dir`.
    Checkers {
        c0: Vec<f32>,
        c1: Vec<f32>,
        dir: (f32, f32),
        period: f32,
    },
    /// Value noise: random values on a `cells x cells` grid, bilinearly interpolated.
    Noise {
        c0: Vec<f32>,
        c1: Vec<f32>,
        cells: usize,
        grid: Vec<f32>,
    },
}

impl Paint {
    fn random(rng: &mut Rng, channels: usize, allow_flat: bool) -> Paint {
        // One draw per colour whatever the channel count, so the picture (and the label) of a
        // seed is the same for every channel count.
        let color = |rng: &mut Rng| -> Vec<f32> {
            let mut c = Rng::new(rng.next_u64());
            (0..channels).map(|_| c.uniform()).collect()
        };
        let (c0, c1) = (color(rng), color(rng));
        let angle = rng.range(0.0, std::f64::consts::TAU);
        let dir = (angle.cos() as f32, angle.sin() as f32);
        let kinds = if allow_flat { 5 } else { 4 };
        match rng.next_u64() % kinds {
            0 => Paint::Gradient { c0, c1, dir },
            1 => Paint::Stripes {
                c0,
                c1,
                dir,
                period: rng.range(0.04, 0.15) as f32,
            },
            2 => Paint::Checkers {
                c0,
                c1,
                dir,
                period: rng.range(0.05, 0.2) as f32,
            },
            3 => {
                let cells = 2 + (rng.next_u64() % 6) as usize;
                let grid = (0..(cells + 1) * (cells + 1))
                    .map(|_| rng.uniform())
                    .collect();
                Paint::Noise {
                    c0,
                    c1,
                    cells,
                    grid,
                }
            }
            _ => Paint::Flat(c0),
        }
    }

    /// Writes the colour at (u, v) to channel planes `img` at pixel offset `at`.
    fn put(&self, u: f32, v: f32, img: &mut [f32], plane: usize, at: usize) {
        let mix = |c0: &[f32], c1: &[f32], t: f32, img: &mut [f32]| {
            for (c, (a, b)) in c0.iter().zip(c1).enumerate() {
                img[c * plane + at] = a + (b - a) * t;
            }
        };
        match self {
            Paint::Flat(col) => {
                for (c, a) in col.iter().enumerate() {
                    img[c * plane + at] = *a;
                }
            }
            Paint::Gradient { c0, c1, dir } => {
                let t = ((u - 0.5) * dir.0 + (v - 0.5) * dir.1 + 0.5).clamp(0.0, 1.0);
                mix(c0, c1, t, img);
            }
            Paint::Stripes {
                c0,
                c1,
                dir,
                period,
            } => {
                let s = (u * dir.0 + v * dir.1) / period;
                mix(c0, c1, (s.rem_euclid(2.0) >= 1.0) as u8 as f32, img);
            }
            Paint::Checkers {
                c0,
                c1,
                dir,
                period,
            } => {
                let a = ((u * dir.0 + v * dir.1) / period).floor() as i64;
                let b = ((v * dir.0 - u * dir.1) / period).floor() as i64;
                mix(c0, c1, ((a + b).rem_euclid(2)) as f32, img);
            }
            Paint::Noise {
                c0,
                c1,
                cells,
                grid,
            } => {
                let n = *cells;
                let (gx, gy) = (u.clamp(0.0, 1.0) * n as f32, v.clamp(0.0, 1.0) * n as f32);
                let (x0, y0) = ((gx as usize).min(n - 1), (gy as usize).min(n - 1));
                let (fx, fy) = (gx - x0 as f32, gy - y0 as f32);
                // Smoothstep weights hide the grid lines of plain bilinear interpolation.
                let (sx, sy) = (fx * fx * (3.0 - 2.0 * fx), fy * fy * (3.0 - 2.0 * fy));
                let g = |x: usize, y: usize| grid[y * (n + 1) + x];
                let top = g(x0, y0) + (g(x0 + 1, y0) - g(x0, y0)) * sx;
                let bottom = g(x0, y0 + 1) + (g(x0 + 1, y0 + 1) - g(x0, y0 + 1)) * sx;
                mix(c0, c1, top + (bottom - top) * sy, img);
            }
        }
    }
}

/// A shape in image-relative units, centred at (cx, cy) with radius r.
struct Shape {
    kind: u32,
    cx: f32,
    cy: f32,
    r: f32,
    /// Rotation (cos, sin), for rectangles.
    rot: (f32, f32),
    /// Aspect of rectangles, inner radius fraction of rings.
    extra: f32,
    /// Triangle vertices.
    tri: [(f32, f32); 3],
}

impl Shape {
    fn random(rng: &mut Rng) -> Shape {
        let kind = (rng.next_u64() % CLASSES.len() as u64) as u32;
        let (cx, cy) = (rng.range(0.1, 0.9) as f32, rng.range(0.1, 0.9) as f32);
        let r = rng.range(0.12, 0.35) as f32;
        let angle = rng.range(0.0, std::f64::consts::TAU);
        let rot = (angle.cos() as f32, angle.sin() as f32);
        let extra = rng.range(0.35, 0.8) as f32;
        let mut tri = [(0.0, 0.0); 3];
        for (k, v) in tri.iter_mut().enumerate() {
            let a = angle + k as f64 * std::f64::consts::TAU / 3.0 + rng.range(-0.5, 0.5);
            *v = (cx + r * a.cos() as f32, cy + r * a.sin() as f32);
        }
        Shape {
            kind,
            cx,
            cy,
            r,
            rot,
            extra,
            tri,
        }
    }

    fn contains(&self, u: f32, v: f32) -> bool {
        let (dx, dy) = (u - self.cx, v - self.cy);
        let d2 = dx * dx + dy * dy;
        match self.kind {
            0 => d2 <= self.r * self.r,
            1 => {
                let a = dx * self.rot.0 + dy * self.rot.1;
                let b = dy * self.rot.0 - dx * self.rot.1;
                a.abs() <= self.r && b.abs() <= self.r * self.extra
            }
            2 => {
                let edge = |p: (f32, f32), q: (f32, f32)| {
                    (q.0 - p.0) * (v - p.1) - (q.1 - p.1) * (u - p.0)
                };
                let [a, b, c] = self.tri;
                let (e0, e1, e2) = (edge(a, b), edge(b, c), edge(c, a));
                (e0 >= 0.0 && e1 >= 0.0 && e2 >= 0.0) || (e0 <= 0.0 && e1 <= 0.0 && e2 <= 0.0)
            }
            _ => d2 <= self.r * self.r && d2 >= (self.r * self.extra).powi(2),
        }
    }
}

/// Draws the image of `seed`; returns it with its label.
fn draw(seed: u64, channels: usize, size: usize) -> (Vec<f32>, u32) {
    let mut rng = Rng::new(seed);
    let plane = size * size;
    let mut img = vec![0.0f32; channels * plane];
    let s = size as f32;
    let background = Paint::random(&mut rng, channels, false);
    for y in 0..size {
        for x in 0..size {
            let (u, v) = ((x as f32 + 0.5) / s, (y as f32 + 0.5) / s);
            background.put(u, v, &mut img, plane, y * size + x);
        }
    }
    let shapes = 2 + (rng.next_u64() % 4) as usize;
    let mut label = 0;
    for _ in 0..shapes {
        let shape = Shape::random(&mut rng);
        let paint = Paint::random(&mut rng, channels, true);
        label = shape.kind;
        // Only the bounding box of the shape needs testing.
        let lo = |c: f32| (((c - shape.r) * s).floor().max(0.0) as usize).min(size);
        let hi = |c: f32| (((c + shape.r) * s).ceil().max(0.0) as usize).min(size);
        for y in lo(shape.cy)..hi(shape.cy) {
            for x in lo(shape.cx)..hi(shape.cx) {
                let (u, v) = ((x as f32 + 0.5) / s, (y as f32 + 0.5) / s);
                if shape.contains(u, v) {
                    paint.put(u, v, &mut img, plane, y * size + x);
                }
            }
        }
    }
    (img, label)
}

/// Normalizes `[channels, H, W]` in [0, 1] in place with [`norm_stats`](super::norm_stats).
pub fn normalize(img: &mut [f32], channels: usize) {
    let (mean, std) = super::norm_stats(channels);
    let plane = img.len() / channels;
    for (c, values) in img.chunks_mut(plane).enumerate() {
        for v in values {
            *v = (*v - mean[c]) / std[c];
        }
    }
}

/// A normalized batch `[n, channels, size, size]` of images `first .. first + n` of the
/// dataset of `seed`, drawn directly at `size` without augmentation (fast; for benchmarks and
/// demos).
pub fn batch(seed: u64, first: u64, n: usize, channels: usize, size: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n * channels * size * size);
    for i in 0..n as u64 {
        let mut img = image(image_seed(seed, first + i), channels, size);
        normalize(&mut img, channels);
        out.extend_from_slice(&img);
    }
    out
}

/// The synthetic dataset as a [`Dataset`]: `len` virtual images of `size x size`, image `i`
/// generated on demand from `(seed, i)`.
#[derive(Clone, Debug)]
pub struct Synthetic {
    len: usize,
    size: usize,
    channels: usize,
    seed: u64,
}

impl Synthetic {
    /// `len` images of `size x size` pixels and `channels` channels from `seed`.
    pub fn new(len: usize, size: usize, channels: usize, seed: u64) -> Synthetic {
        Synthetic {
            len,
            size,
            channels,
            seed,
        }
    }

    /// Parses the part of a spec after `synthetic`: empty, `:N` or `:N:SIZE`.
    pub(crate) fn parse(rest: &str, channels: usize) -> Result<Synthetic, DataError> {
        let bad = |why: String| DataError::BadFormat {
            path: format!("synthetic{rest}").into(),
            why: format!("{why}; write `synthetic`, `synthetic:N` or `synthetic:N:SIZE`"),
        };
        let mut parts = rest.split(':').skip(1);
        let mut number = |what: &str, default: usize| -> Result<usize, DataError> {
            match parts.next() {
                None => Ok(default),
                Some(p) => match p.parse::<usize>() {
                    Ok(0) => Err(bad(format!("{what} must be at least 1"))),
                    Ok(n) => Ok(n),
                    Err(e) => Err(bad(format!("{what} `{p}`: {e}"))),
                },
            }
        };
        let len = number("the image count", super::SYNTHETIC_DEFAULT_LEN)?;
        let size = number("the image size", super::SYNTHETIC_DEFAULT_SIZE)?;
        if parts.next().is_some() {
            return Err(bad("too many fields".into()));
        }
        Ok(Synthetic::new(len, size, channels, 0))
    }
}

impl Dataset for Synthetic {
    fn len(&self) -> usize {
        self.len
    }
    fn channels(&self) -> usize {
        self.channels
    }
    fn get(&self, index: usize) -> Result<Image, DataError> {
        Ok(Image {
            channels: self.channels,
            height: self.size,
            width: self.size,
            pixels: image(
                image_seed(self.seed, index as u64),
                self.channels,
                self.size,
            ),
        })
    }
    fn label(&self, index: usize) -> u32 {
        label(image_seed(self.seed, index as u64))
    }
    fn name(&self, index: usize) -> String {
        format!("synthetic:{index}")
    }
    fn classes(&self) -> Vec<String> {
        CLASSES.iter().map(|c| c.to_string()).collect()
    }
    fn describe(&self) -> String {
        format!(
            "synthetic: {} images of {}x{}, {} channel(s), {} classes (front shape), generated \
             from seed {}",
            self.len,
            self.size,
            self.size,
            self.channels,
            CLASSES.len(),
            self.seed
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_are_repeatable_and_varied() {
        assert_eq!(image(1, 3, 16), image(1, 3, 16));
        assert_ne!(image(1, 3, 16), image(2, 3, 16));
        for seed in 0..20 {
            let img = image(seed, 3, 32);
            assert!(img.iter().all(|v| (0.0..=1.0).contains(v)));
            let mean = img.iter().sum::<f32>() / img.len() as f32;
            let var = img.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / img.len() as f32;
            assert!(
                var > 1e-3,
                "an image with structure has variance, got {var} (seed {seed})"
            );
        }
    }

    #[test]
    fn labels_match_the_drawn_image_and_cover_every_class() {
        let mut seen = [false; 4];
        for seed in 0..200 {
            let (_, l) = draw(seed, 3, 24);
            assert_eq!(label(seed), l);
            seen[l as usize] = true;
        }
        assert_eq!(seen, [true; 4]);
    }
}
