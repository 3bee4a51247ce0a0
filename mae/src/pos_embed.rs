//! The fixed 2-D sin-cos position tables of the official code (`util/pos_embed.py`), computed in
//! f64 and rounded to f32 once, as `torch.from_numpy(...).float()` does.

use alloc::vec::Vec;

/// `[1 + grid * grid, dim]` with a zero row for the cls token first. For the patch in row `i`,
/// column `j` (table row `1 + i * grid + j`) the channels are
/// `[sin(j w), cos(j w), sin(i w), cos(i w)]`, `w_k = 10000^(-k / (dim / 4))`: the first half
/// encodes the column, despite the official variable being called `emb_h`.
///
/// ```
/// let t = mae::pos_embed::sincos_2d(8, 2);
/// // row 2 is patch (i = 0, j = 1): sin(1), sin(0.01), cos(1), cos(0.01), then the row part.
/// assert!((t[2 * 8] - 0.841471).abs() < 1e-6);
/// assert_eq!(&t[2 * 8 + 4..3 * 8], &[0.0, 0.0, 1.0, 1.0]);
/// ```
pub fn sincos_2d(dim: usize, grid: usize) -> Vec<f32> {
    let quarter = dim / 4;
    let mut table = Vec::with_capacity((1 + grid * grid) * dim);
    table.resize(dim, 0.0);
    for i in 0..grid {
        for j in 0..grid {
            for pos in [j, i] {
                let angles = (0..quarter).map(|k| {
                    let omega = 1.0 / libm::pow(10000.0, k as f64 / quarter as f64);
                    pos as f64 * omega
                });
                table.extend(angles.clone().map(|a| libm::sin(a) as f32));
                table.extend(angles.map(|a| libm::cos(a) as f32));
            }
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_reference_check_values() {
        // mae-reference.md section 3: D = 768, grid 14, token (i = 1, j = 2) is row 17.
        let t = sincos_2d(768, 14);
        let row = &t[17 * 768..18 * 768];
        for (ch, want) in [
            (0, 0.9092974),
            (1, 0.94423676),
            (192, -0.41614684),
            (384, 0.84147096),
            (576, 0.5403023),
            (767, 1.0),
        ] {
            assert!(
                (row[ch] - want).abs() < 1e-6,
                "channel {ch}: {} vs {want}",
                row[ch]
            );
        }
        assert!(t[..768].iter().all(|&x| x == 0.0));
    }
}
