//! Random masking, exactly as the official `random_masking`: per image, argsort the noise
//! ascending; the first `len_keep` patches stay visible (in noise order), the rest are removed.
//! It runs on the host so every backend receives identical indices.
//!
//! The paper's other samplings (Table 1f, Figure 6) are written as noise too: [`sample_noise`]
//! gives the patches a block or grid removes a noise above every kept patch's, so one argsort
//! serves all three and the encoder still sees its visible patches in random order.

use crate::config::ConfigError;
use crate::error::{Error, Result};
use crate::rng::Rng;
use alloc::vec;
use alloc::vec::Vec;

/// `int(L * (1 - mask_ratio))` computed in f64 with truncation, as the official code does (so a
/// ratio of 0.9 on 196 patches keeps 19, not 20).
pub fn keep_count(num_patches: usize, mask_ratio: f64) -> usize {
    (num_patches as f64 * (1.0 - mask_ratio)) as usize
}

/// Checks that `mask_ratio` lies in [0, 1).
pub fn check_ratio(mask_ratio: f64) -> core::result::Result<(), ConfigError> {
    if (0.0..1.0).contains(&mask_ratio) {
        Ok(())
    } else {
        Err(ConfigError::MaskRatio(mask_ratio))
    }
}

/// Which patches a batch hides: the samplings the paper compares in Table 1f.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MaskSampling {
    /// Uniformly random patches, without replacement (the paper's choice).
    #[default]
    Random,
    /// Large random blocks, with BEiT's block-wise generator.
    Block,
    /// A regular grid: keep one patch of every `s x s` cell (one of four at ratio 0.75).
    Grid,
}

impl MaskSampling {
    /// Every sampling, in the paper's order.
    pub const ALL: [MaskSampling; 3] = [
        MaskSampling::Random,
        MaskSampling::Block,
        MaskSampling::Grid,
    ];

    /// `random`, `block` or `grid`.
    pub fn name(self) -> &'static str {
        match self {
            MaskSampling::Random => "random",
            MaskSampling::Block => "block",
            MaskSampling::Grid => "grid",
        }
    }

    /// The sampling called `name`.
    ///
    /// ```
    /// use mae::masking::MaskSampling;
    /// assert_eq!(MaskSampling::parse("grid").unwrap(), MaskSampling::Grid);
    /// assert!(MaskSampling::parse("checkerboard").is_err());
    /// ```
    pub fn parse(name: &str) -> core::result::Result<MaskSampling, ConfigError> {
        MaskSampling::ALL
            .into_iter()
            .find(|s| s.name() == name)
            .ok_or_else(|| ConfigError::MaskSampling(name.into()))
    }

    /// Checks that this sampling can hide `mask_ratio` of a `grid x grid` patch grid: a grid
    /// sampling keeps exactly one patch per `s x s` cell, so the kept count must be `(grid / s)^2`.
    pub fn check(self, grid: usize, mask_ratio: f64) -> core::result::Result<(), ConfigError> {
        if self == MaskSampling::Grid && grid_stride(grid, mask_ratio).is_none() {
            return Err(ConfigError::GridMask {
                mask_ratio,
                num_patches: grid * grid,
            });
        }
        Ok(())
    }
}

/// The cell side `s` of a grid sampling, when keeping one patch per `s x s` cell keeps exactly
/// `keep_count` patches.
fn grid_stride(grid: usize, mask_ratio: f64) -> Option<usize> {
    let keep = keep_count(grid * grid, mask_ratio);
    (2..=grid).find(|&s| grid % s == 0 && (grid / s) * (grid / s) == keep)
}

/// Writes `noise` (`[batch, grid * grid]`) for one batch under `sampling`; with
/// [`Masking::apply_noise`] it hides `mask_ratio` of the patches.
///
/// `Random` draws exactly what the official code draws (uniform noise); `Block` and `Grid` give
/// the patches they remove a noise in [1, 2) and the others one in [0, 1).
///
/// ```
/// use mae::masking::{sample_noise, MaskSampling, Masking};
/// let mut rng = mae::rng::Rng::new(0);
/// let mut noise = vec![0.0; 64];
/// sample_noise(MaskSampling::Grid, 8, 0.75, &mut rng, &mut noise).unwrap();
/// let mut m = Masking::new(1, 64, 0.75).unwrap();
/// m.apply_noise(&noise).unwrap();
/// // Kept: every patch whose row and column are even.
/// assert!(m.ids_keep.iter().all(|&i| (i / 8) % 2 == 0 && (i % 8) % 2 == 0));
/// ```
pub fn sample_noise(
    sampling: MaskSampling,
    grid: usize,
    mask_ratio: f64,
    rng: &mut Rng,
    noise: &mut [f32],
) -> Result<()> {
    let l = grid * grid;
    if l == 0 || noise.len() % l != 0 {
        return Err(Error::Shape {
            what: "masking noise",
            expected: vec![noise.len() / l.max(1), l],
            got: vec![noise.len()],
        });
    }
    sampling.check(grid, mask_ratio)?;
    rng.fill_uniform(noise);
    match sampling {
        MaskSampling::Random => {}
        MaskSampling::Grid => {
            let s = grid_stride(grid, mask_ratio).unwrap_or(1);
            for row in noise.chunks_mut(l) {
                for (i, x) in row.iter_mut().enumerate() {
                    if (i / grid) % s != 0 || (i % grid) % s != 0 {
                        *x += 1.0;
                    }
                }
            }
        }
        MaskSampling::Block => {
            let target = l - keep_count(l, mask_ratio);
            let mut blocked = vec![false; l];
            for row in noise.chunks_mut(l) {
                block_mask(grid, target, rng, &mut blocked);
                for (x, &b) in row.iter_mut().zip(&blocked) {
                    if b {
                        *x += 1.0;
                    }
                }
            }
        }
    }
    Ok(())
}

/// BEiT's block-wise masking generator (`MaskingGenerator`): random rectangles of at least
/// `min_area` patches and aspect ratio in [0.3, 1/0.3] until `target` patches are covered or
/// no block fits. BEiT's minimum of 16 patches on a 14 x 14 grid is scaled to the grid's area.
fn block_mask(grid: usize, target: usize, rng: &mut Rng, mask: &mut [bool]) {
    mask.fill(false);
    let min_area = libm::round(16.0 * (grid * grid) as f64 / 196.0).max(1.0);
    let log_aspect = (libm::log(0.3), libm::log(1.0 / 0.3));
    let mut count = 0;
    while count < target {
        let max_new = target - count;
        let mut delta = 0;
        for _attempt in 0..10 {
            let area = rng.range(min_area, max_new as f64);
            let aspect = libm::exp(rng.range(log_aspect.0, log_aspect.1));
            let h = libm::round(libm::sqrt(area * aspect)) as usize;
            let w = libm::round(libm::sqrt(area / aspect)) as usize;
            if w < grid && h < grid {
                // randint(0, grid - h), inclusive, as Python's.
                let top = (rng.uniform_f64() * (grid - h + 1) as f64) as usize;
                let left = (rng.uniform_f64() * (grid - w + 1) as f64) as usize;
                let cells =
                    || (top..top + h).flat_map(|i| (left..left + w).map(move |j| i * grid + j));
                let fresh = cells().filter(|&c| !mask[c]).count();
                if fresh > 0 && fresh <= max_new {
                    cells().for_each(|c| mask[c] = true);
                    delta = fresh;
                }
                if delta > 0 {
                    break;
                }
            }
        }
        if delta == 0 {
            break;
        }
        count += delta;
    }
}

/// The masking of one batch.
///
/// ```
/// let mut m = mae::masking::Masking::new(1, 4, 0.5).unwrap();
/// m.apply_noise(&[0.9, 0.1, 0.5, 0.3]).unwrap();
/// assert_eq!(m.ids_keep, [1, 3]);               // smallest noise first
/// assert_eq!(m.ids_restore, [3, 0, 2, 1]);      // where each patch sits in the shuffled order
/// assert_eq!(m.mask, [1.0, 0.0, 1.0, 0.0]);     // 1 = removed
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Masking {
    /// Images in the batch.
    pub batch: usize,
    /// Patches per image, L.
    pub num_patches: usize,
    /// Visible patches per image.
    pub len_keep: usize,
    /// `[batch, len_keep]`: the visible patches, in the order the encoder sees them.
    pub ids_keep: Vec<u32>,
    /// `[batch, L]`: position of each patch in the shuffled order (argsort of `ids_shuffle`).
    pub ids_restore: Vec<u32>,
    /// `[batch, L]`: 1 for a removed patch, 0 for a visible one.
    pub mask: Vec<f32>,
    shuffle: Vec<u32>,
}

impl Masking {
    /// Buffers for a batch; call [`Masking::apply_noise`] to fill them.
    pub fn new(batch: usize, num_patches: usize, mask_ratio: f64) -> Result<Masking> {
        check_ratio(mask_ratio)?;
        if batch == 0 {
            return Err(ConfigError::EmptyBatch.into());
        }
        let len_keep = keep_count(num_patches, mask_ratio);
        Ok(Masking {
            batch,
            num_patches,
            len_keep,
            ids_keep: vec![0; batch * len_keep],
            ids_restore: vec![0; batch * num_patches],
            mask: vec![0.0; batch * num_patches],
            shuffle: vec![0; num_patches],
        })
    }

    /// The masking for `noise` `[batch, L]` (uniform [0, 1) in the official code; any finite
    /// values work). Ties are broken by patch index. Allocates nothing.
    pub fn apply_noise(&mut self, noise: &[f32]) -> Result<()> {
        let l = self.num_patches;
        if noise.len() != self.batch * l {
            return Err(Error::Shape {
                what: "masking noise",
                expected: vec![self.batch, l],
                got: vec![noise.len()],
            });
        }
        if let Some(bad) = noise.iter().find(|x| !x.is_finite()) {
            return Err(Error::Input(alloc::format!("masking noise contains {bad}")));
        }
        for b in 0..self.batch {
            let row = &noise[b * l..(b + 1) * l];
            for (i, s) in self.shuffle.iter_mut().enumerate() {
                *s = i as u32;
            }
            // Unstable sort allocates nothing; the index tie-break makes it a total order anyway.
            self.shuffle.sort_unstable_by(|&a, &c| {
                row[a as usize].total_cmp(&row[c as usize]).then(a.cmp(&c))
            });
            let keep = &mut self.ids_keep[b * self.len_keep..(b + 1) * self.len_keep];
            keep.copy_from_slice(&self.shuffle[..self.len_keep]);
            for (rank, &patch) in self.shuffle.iter().enumerate() {
                self.ids_restore[b * l + patch as usize] = rank as u32;
                self.mask[b * l + patch as usize] = if rank < self.len_keep { 0.0 } else { 1.0 };
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_count_truncates_like_python() {
        assert_eq!(keep_count(196, 0.75), 49);
        assert_eq!(keep_count(196, 0.9), 19);
        assert_eq!(keep_count(256, 0.75), 64);
        assert_eq!(keep_count(64, 0.0), 64);
    }

    #[test]
    fn bad_inputs_are_typed_errors() {
        assert!(matches!(
            Masking::new(2, 4, 1.0),
            Err(Error::Config(ConfigError::MaskRatio(_)))
        ));
        assert!(matches!(
            Masking::new(2, 4, -0.1),
            Err(Error::Config(ConfigError::MaskRatio(_)))
        ));
        let mut m = Masking::new(2, 4, 0.5).unwrap();
        assert!(matches!(m.apply_noise(&[0.0; 7]), Err(Error::Shape { .. })));
        assert!(matches!(
            m.apply_noise(&[0.0, 1.0, f32::NAN, 0.5, 0.1, 0.2, 0.3, 0.4]),
            Err(Error::Input(_))
        ));
    }

    fn kept(sampling: MaskSampling, grid: usize, ratio: f64, seed: u64) -> Vec<Vec<bool>> {
        let (n, l) = (4, grid * grid);
        let mut noise = vec![0.0; n * l];
        sample_noise(sampling, grid, ratio, &mut Rng::new(seed), &mut noise).unwrap();
        let mut m = Masking::new(n, l, ratio).unwrap();
        m.apply_noise(&noise).unwrap();
        (0..n)
            .map(|b| {
                m.mask[b * l..(b + 1) * l]
                    .iter()
                    .map(|&x| x == 0.0)
                    .collect()
            })
            .collect()
    }

    #[test]
    fn random_sampling_draws_the_official_noise() {
        let mut a = vec![0.0; 2 * 49];
        sample_noise(MaskSampling::Random, 7, 0.75, &mut Rng::new(5), &mut a).unwrap();
        let mut b = vec![0.0; 2 * 49];
        Rng::new(5).fill_uniform(&mut b);
        assert_eq!(a, b);
    }

    #[test]
    fn grid_sampling_keeps_one_patch_per_cell() {
        for (grid, ratio, s) in [(8, 0.75, 2), (14, 0.75, 2), (9, 1.0 - 1.0 / 9.0, 3)] {
            for img in kept(MaskSampling::Grid, grid, ratio, 1) {
                for (i, &k) in img.iter().enumerate() {
                    assert_eq!(k, (i / grid) % s == 0 && (i % grid) % s == 0, "grid {grid}");
                }
            }
        }
        assert!(matches!(
            MaskSampling::Grid.check(8, 0.5),
            Err(ConfigError::GridMask { .. })
        ));
    }

    #[test]
    fn block_sampling_removes_contiguous_regions() {
        // A removed patch under block sampling mostly has removed 4-neighbours; under random
        // sampling at the same ratio far fewer do.
        let neighbours_removed = |sampling| {
            let (grid, mut same, mut total) = (14, 0, 0);
            for img in kept(sampling, grid, 0.75, 2) {
                assert_eq!(img.iter().filter(|&&k| k).count(), keep_count(196, 0.75));
                for i in 0..grid * grid {
                    if img[i] {
                        continue;
                    }
                    let (r, c) = (i / grid, i % grid);
                    for (dr, dc) in [(0i64, 1i64), (1, 0), (0, -1), (-1, 0)] {
                        let (rr, cc) = (r as i64 + dr, c as i64 + dc);
                        if (0..grid as i64).contains(&rr) && (0..grid as i64).contains(&cc) {
                            total += 1;
                            same += usize::from(!img[(rr * grid as i64 + cc) as usize]);
                        }
                    }
                }
            }
            same as f64 / total as f64
        };
        let (block, random) = (
            neighbours_removed(MaskSampling::Block),
            neighbours_removed(MaskSampling::Random),
        );
        assert!(
            block > 0.85 && random < 0.8,
            "block {block}, random {random}"
        );
    }

    #[test]
    fn restore_inverts_shuffle() {
        let mut rng = crate::rng::Rng::new(3);
        let (n, l) = (3, 50);
        let mut noise = vec![0.0; n * l];
        rng.fill_uniform(&mut noise);
        let mut m = Masking::new(n, l, 0.75).unwrap();
        m.apply_noise(&noise).unwrap();
        for b in 0..n {
            let restore = &m.ids_restore[b * l..(b + 1) * l];
            for (j, &kept) in m.ids_keep[b * m.len_keep..(b + 1) * m.len_keep]
                .iter()
                .enumerate()
            {
                assert_eq!(restore[kept as usize] as usize, j);
            }
            let removed: f32 = m.mask[b * l..(b + 1) * l].iter().sum();
            assert_eq!(removed as usize, l - m.len_keep);
        }
    }
}
