//! Whole-buffer ops: fill, copy, add, scale, scale_rows (`shaders/memory.wgsl`).

use crate::kernel::{grid_1d, word, Kernel};
use crate::{Buf, WgpuBackend};
use mae::backend::{BResult, BackendError, BackendErrorKind};

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

/// `dst = src * scales[group]` (or `+=`), one invocation per element. The lengths must be
/// exactly `scales.len() * rows_per_scale * cols`: the `mae` caller guarantees it, and a
/// mismatch is refused here rather than read past or left half-done.
pub(crate) fn scale_rows(
    be: &WgpuBackend,
    src: &Buf,
    scales: &Buf,
    dst: &mut Buf,
    rows_per_scale: usize,
    cols: usize,
    accumulate: bool,
) -> BResult<()> {
    let group = rows_per_scale.checked_mul(cols);
    let n = group.and_then(|g| g.checked_mul(scales.len()));
    let (Some(group), Some(n)) = (group, n) else {
        return Err(scale_rows_lengths(src, scales, dst, rows_per_scale, cols));
    };
    if src.len() != n || dst.len() != n {
        return Err(scale_rows_lengths(src, scales, dst, rows_per_scale, cols));
    }
    if n == 0 {
        return Ok(());
    }
    be.launch(
        Kernel::ScaleRows,
        &[word(n)?, word(group)?, u32::from(accumulate)],
        &[&src.raw, &scales.raw, &dst.raw],
        grid_1d(n),
    )
}

fn scale_rows_lengths(
    src: &Buf,
    scales: &Buf,
    dst: &Buf,
    rows_per_scale: usize,
    cols: usize,
) -> BackendError {
    BackendError::new(
        BackendErrorKind::Device,
        format!(
            "bug: scale_rows: src holds {} floats and dst {}, but {} scales x {rows_per_scale} \
             rows x {cols} columns need both to hold the product",
            src.len(),
            dst.len(),
            scales.len()
        ),
    )
}
