//! Whole-buffer ops: fill, copy, add, scale (`shaders/memory.wgsl`).

use crate::kernel::{grid_1d, word, Kernel};
use crate::{Buf, WgpuBackend};
use mae::backend::BResult;

pub(crate) fn fill(be: &WgpuBackend, dst: &mut Buf, value: f32) -> BResult<()> {
    let n = dst.len();
    be.launch(
        Kernel::Fill,
        &[word(n)?, value.to_bits()],
        &[&dst.raw],
        grid_1d(n),
    )
}

/// A device-side copy, bit for bit.
pub(crate) fn copy(be: &WgpuBackend, src: &Buf, dst: &mut Buf) -> BResult<()> {
    debug_assert_eq!(src.len(), dst.len());
    let bytes = (src.len().min(dst.len()) * 4) as u64;
    if bytes > 0 {
        be.kernels.record(&be.gpu, |e| {
            e.copy_buffer_to_buffer(&src.raw, 0, &dst.raw, 0, bytes);
        });
    }
    Ok(())
}

pub(crate) fn add(be: &WgpuBackend, src: &Buf, dst: &mut Buf) -> BResult<()> {
    let n = dst.len();
    debug_assert!(src.len() >= n);
    be.launch(Kernel::Add, &[word(n)?], &[&src.raw, &dst.raw], grid_1d(n))
}

pub(crate) fn scale(be: &WgpuBackend, buf: &mut Buf, s: f32) -> BResult<()> {
    let n = buf.len();
    be.launch(
        Kernel::Scale,
        &[word(n)?, s.to_bits()],
        &[&buf.raw],
        grid_1d(n),
    )
}
