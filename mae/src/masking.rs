//! Random masking, exactly as the official `random_masking`: per image, argsort the noise
//! ascending; the first `len_keep` patches stay visible (in noise order), the rest are removed.
//! It runs on the host so every backend receives identical indices.

use crate::config::ConfigError;
use crate::error::{Error, Result};
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
