//! The CPU backend's buffer: `f32`s that start on a cache line.
//!
//! Why not `Vec<f32>`: the allocator aligns a large `Vec<f32>` to 16 bytes only (glibc puts a
//! 16-byte header in front of an `mmap`ed block), so a 16-float row of C or of a packed operand
//! straddles two cache lines and half of the GEMM's 32-byte loads and stores cross one. With every
//! buffer on a 64-byte boundary, rows whose length is a multiple of 16 floats (every width of
//! the model) start on a line. Measured in one process against the same buffers 16 bytes past a
//! line (docs/results.md): training steps 3.2-3.4 % faster, embedding 6.4-7.5 %.

use crate::gemm::PackCache;
use core::fmt;
use core::ops::{Deref, DerefMut};

/// One cache line of floats. Buffers made of these start on a line.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(crate) struct Line(pub(crate) [f32; 16]);

/// The floats of `lines`, in order.
pub(crate) fn floats(lines: &[Line]) -> &[f32] {
    // SAFETY: `Line` is `repr(C)` around `[f32; 16]` with no padding (64 bytes either way), so
    // the lines are `16 * len` consecutive, initialized floats, borrowed for as long.
    unsafe { core::slice::from_raw_parts(lines.as_ptr().cast::<f32>(), lines.len() * 16) }
}

/// The floats of `lines`, in order, mutably.
pub(crate) fn floats_mut(lines: &mut [Line]) -> &mut [f32] {
    // SAFETY: as in `floats`, borrowed mutably for as long.
    unsafe { core::slice::from_raw_parts_mut(lines.as_mut_ptr().cast::<f32>(), lines.len() * 16) }
}

/// A buffer of the CPU backend ([`crate::CpuBackend`]'s `Buf`): `len` floats starting on a
/// 64-byte boundary. It dereferences to `[f32]`.
///
/// ```
/// use mae::backend::Backend;
/// let b = mae_backend_cpu::CpuBackend::new();
/// let x = b.upload(&[1.0, 2.0, 3.0]).unwrap();
/// assert_eq!(x.len(), 3);
/// assert_eq!(x.as_ptr() as usize % 64, 0);
/// assert_eq!(x[..], [1.0, 2.0, 3.0]);
/// ```
#[derive(Default)]
pub struct CpuBuf {
    lines: Vec<Line>,
    len: usize,
    /// Its contents packed as a GEMM operand, while they stay unchanged.
    pub(crate) packed: PackCache,
}

impl Clone for CpuBuf {
    fn clone(&self) -> CpuBuf {
        CpuBuf {
            lines: self.lines.clone(),
            len: self.len,
            packed: PackCache::default(),
        }
    }
}

impl CpuBuf {
    /// `len` zeros, or the allocation's error (`Vec::try_reserve_exact`'s) instead of an abort.
    pub(crate) fn try_zeroed(len: usize) -> Result<CpuBuf, std::collections::TryReserveError> {
        let mut lines = Vec::new();
        lines.try_reserve_exact(len.div_ceil(16))?;
        lines.resize(len.div_ceil(16), Line([0.0; 16]));
        Ok(CpuBuf {
            lines,
            len,
            packed: PackCache::default(),
        })
    }
}

impl Deref for CpuBuf {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &floats(&self.lines)[..self.len]
    }
}

impl DerefMut for CpuBuf {
    fn deref_mut(&mut self) -> &mut [f32] {
        // Whoever borrows the floats mutably may change them.
        self.packed.clear();
        &mut floats_mut(&mut self.lines)[..self.len]
    }
}

impl<'a> IntoIterator for &'a CpuBuf {
    type Item = &'a f32;
    type IntoIter = core::slice::Iter<'a, f32>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl<'a> IntoIterator for &'a mut CpuBuf {
    type Item = &'a mut f32;
    type IntoIter = core::slice::IterMut<'a, f32>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter_mut()
    }
}

impl fmt::Debug for CpuBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

impl PartialEq for CpuBuf {
    fn eq(&self, other: &CpuBuf) -> bool {
        **self == **other
    }
}

impl<const N: usize> PartialEq<[f32; N]> for CpuBuf {
    fn eq(&self, other: &[f32; N]) -> bool {
        **self == other[..]
    }
}

impl PartialEq<Vec<f32>> for CpuBuf {
    fn eq(&self, other: &Vec<f32>) -> bool {
        **self == other[..]
    }
}

impl PartialEq<[f32]> for CpuBuf {
    fn eq(&self, other: &[f32]) -> bool {
        **self == *other
    }
}

#[cfg(test)]
mod tests {
    use super::CpuBuf;

    #[test]
    fn every_length_starts_on_a_line_and_reads_back_zeros() {
        for len in [0, 1, 15, 16, 17, 1000] {
            let mut b = CpuBuf::try_zeroed(len).unwrap();
            assert_eq!(b.len(), len);
            assert!(b.iter().all(|&x| x == 0.0));
            b.iter_mut().enumerate().for_each(|(i, x)| *x = i as f32);
            assert_eq!(b.last().copied(), len.checked_sub(1).map(|l| l as f32));
            if len > 0 {
                assert_eq!(b.as_ptr() as usize % 64, 0, "len {len}");
            }
        }
    }
}
