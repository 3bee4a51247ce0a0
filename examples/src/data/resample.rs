//! Bicubic resampling as Pillow does it (`Image.resize(..., BICUBIC)`, which torchvision calls on
//! PIL images): the Keys kernel with a = -0.5, widened by the scale factor when downscaling so that
//! every source pixel contributes (antialiasing), weights normalized to sum to one, a horizontal
//! pass then a vertical pass, each clamped to [0, 1] as Pillow's 8-bit intermediate image is.
//! The arithmetic is f32 without Pillow's rounding to 8 bits, so results agree with Pillow to
//! within about one 8-bit step.

/// Pillow's bicubic kernel (`bicubic_filter` in `libImaging/Resample.c`), a = -0.5; support 2.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// For each output pixel, the first input pixel it reads and the weights of the pixels from there.
struct Taps {
    start: Vec<usize>,
    /// `out_size` rows of `width` weights (zero-padded).
    weights: Vec<f32>,
    width: usize,
}

/// Pillow's `precompute_coeffs` for resampling `in_size` pixels to `out_size`.
fn taps(in_size: usize, out_size: usize) -> Taps {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    let width = support.ceil() as usize * 2 + 1;
    let mut start = Vec::with_capacity(out_size);
    let mut weights = vec![0.0f32; out_size * width];
    let mut w = vec![0.0f64; width];
    for (xx, row) in weights.chunks_mut(width).enumerate() {
        let center = (xx as f64 + 0.5) * scale;
        // Pillow rounds with `(int)(v + 0.5)`, which truncates toward zero; clamping to 0 first
        // gives the same result for the negative values.
        let xmin = ((center - support + 0.5).max(0.0) as usize).min(in_size);
        let xmax = ((center + support + 0.5).max(0.0) as usize).min(in_size);
        let n = (xmax - xmin).min(width);
        let mut total = 0.0;
        for (x, wx) in w[..n].iter_mut().enumerate() {
            *wx = bicubic((x as f64 + xmin as f64 - center + 0.5) / filterscale);
            total += *wx;
        }
        for (r, wx) in row.iter_mut().zip(&w[..n]) {
            *r = if total != 0.0 {
                (wx / total) as f32
            } else {
                0.0
            };
        }
        start.push(xmin);
    }
    Taps {
        start,
        weights,
        width,
    }
}

/// `a . b` with eight independent partial sums: a plain `sum()` is one serial chain of dependent
/// additions, which made the horizontal pass several times slower than the vertical one.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8
        .remainder()
        .iter()
        .zip(b8.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a8.zip(b8) {
        for i in 0..8 {
            lanes[i] += x[i] * y[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// Resamples the region `rows x cols` at (`top`, `left`) of each of the `channels` planes of
/// `src` (planes of `src_h x src_w`) to `out_h x out_w`, writing planar output to `out`
/// (`channels * out_h * out_w` values). This is Pillow's `img.crop(box).resize(size, BICUBIC)`:
/// pixels outside the region are not read.
///
/// # Panics
/// If the region does not lie inside the source, a size is zero, or a buffer has the wrong length.
#[allow(clippy::too_many_arguments)]
pub fn resize_region(
    src: &[f32],
    channels: usize,
    (src_h, src_w): (usize, usize),
    (top, left, rows, cols): (usize, usize, usize, usize),
    (out_h, out_w): (usize, usize),
    out: &mut [f32],
) {
    assert!(
        rows > 0 && cols > 0 && out_h > 0 && out_w > 0,
        "empty resize"
    );
    assert!(
        top + rows <= src_h && left + cols <= src_w,
        "region outside the image"
    );
    assert_eq!(src.len(), channels * src_h * src_w);
    assert_eq!(out.len(), channels * out_h * out_w);
    let horizontal = taps(cols, out_w);
    let vertical = taps(rows, out_h);
    // Horizontal pass over the region's rows: `tmp` is channels x rows x out_w.
    let mut tmp = vec![0.0f32; channels * rows * out_w];
    for c in 0..channels {
        for y in 0..rows {
            let line = &src[(c * src_h + top + y) * src_w + left..][..cols];
            let dst = &mut tmp[(c * rows + y) * out_w..][..out_w];
            for (x, d) in dst.iter_mut().enumerate() {
                let s = horizontal.start[x];
                let w = &horizontal.weights[x * horizontal.width..][..horizontal.width];
                let n = (cols - s).min(horizontal.width);
                *d = dot(&line[s..s + n], &w[..n]).clamp(0.0, 1.0);
            }
        }
    }
    // Vertical pass, row by row so the inner loop runs along contiguous memory.
    for c in 0..channels {
        let plane = &tmp[c * rows * out_w..][..rows * out_w];
        for y in 0..out_h {
            let dst = &mut out[(c * out_h + y) * out_w..][..out_w];
            dst.fill(0.0);
            let s = vertical.start[y];
            let w = &vertical.weights[y * vertical.width..][..vertical.width];
            let n = (rows - s).min(vertical.width);
            for (k, wk) in w[..n].iter().enumerate() {
                let line = &plane[(s + k) * out_w..][..out_w];
                for (d, p) in dst.iter_mut().zip(line) {
                    *d += wk * p;
                }
            }
            for d in dst.iter_mut() {
                *d = d.clamp(0.0, 1.0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_size_is_the_identity() {
        let src: Vec<f32> = (0..2 * 5 * 7).map(|i| (i % 11) as f32 / 10.0).collect();
        let mut out = vec![0.0; src.len()];
        resize_region(&src, 2, (5, 7), (0, 0, 5, 7), (5, 7), &mut out);
        assert_eq!(src, out);
    }

    #[test]
    fn kernel_matches_pillow_values() {
        // Values of Pillow's bicubic_filter.
        assert_eq!(bicubic(0.0), 1.0);
        assert_eq!(bicubic(1.0), 0.0);
        assert_eq!(bicubic(0.5), 0.5625);
        assert_eq!(bicubic(1.5), -0.0625);
        assert_eq!(bicubic(2.0), 0.0);
    }
}
