//! Device buffers and the host transfers.

use crate::context::Gpu;
use crate::kernel::Kernels;
use mae::backend::{BResult, BackendError, BackendErrorKind};
use std::marker::PhantomData;
use std::sync::mpsc;

/// An owned device buffer of `len` elements of `T` (`f32` or `u32`).
///
/// The allocation is at least 4 bytes, because wgpu cannot bind an empty buffer, but a
/// zero-length buffer reports length 0 and no op touches it.
pub struct GpuBuf<T> {
    pub(crate) raw: wgpu::Buffer,
    len: usize,
    _elem: PhantomData<T>,
}

impl<T> GpuBuf<T> {
    /// Length in elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer holds no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Size of the contents in bytes.
    pub(crate) fn bytes(&self) -> u64 {
        (self.len * 4) as u64
    }
}

impl<T> std::fmt::Debug for GpuBuf<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GpuBuf<{}>[{}]", std::any::type_name::<T>(), self.len)
    }
}

/// Longest buffer in elements of 4 bytes: one storage binding.
pub(crate) fn max_len(gpu: &Gpu) -> usize {
    usize::try_from(gpu.max_binding_bytes / 4).unwrap_or(usize::MAX)
}

/// A zero-filled buffer of `len` elements (wgpu zero-initializes every buffer).
pub(crate) fn alloc<T>(gpu: &Gpu, len: usize) -> BResult<GpuBuf<T>> {
    let max = max_len(gpu);
    if len > max {
        return Err(BackendError::new(
            BackendErrorKind::TooLarge { len, max },
            format!(
                "{} binds at most {} bytes per storage buffer",
                gpu.info.name, gpu.max_binding_bytes
            ),
        ));
    }
    let bytes = len * 4;
    let raw = gpu.scoped(bytes, || {
        gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: bytes.max(4) as u64,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    })?;
    Ok(GpuBuf {
        raw,
        len,
        _elem: PhantomData,
    })
}

/// Overwrites `dst` with `host` (same length). The queue applies writes before the next
/// submission, so recorded work that reads the old contents is submitted first.
pub(crate) fn write<T: bytemuck::Pod>(
    gpu: &Gpu,
    kernels: &Kernels,
    dst: &GpuBuf<T>,
    host: &[T],
) -> BResult<()> {
    check_len("write", dst.len, host.len())?;
    if host.is_empty() {
        return Ok(());
    }
    kernels.flush(gpu);
    gpu.queue
        .write_buffer(&dst.raw, 0, bytemuck::cast_slice(host));
    Ok(())
}

/// A new buffer holding `host`.
pub(crate) fn upload<T: bytemuck::Pod>(
    gpu: &Gpu,
    kernels: &Kernels,
    host: &[T],
) -> BResult<GpuBuf<T>> {
    let buf = alloc(gpu, host.len())?;
    write(gpu, kernels, &buf, host)?;
    Ok(buf)
}

fn check_len(what: &str, buf: usize, host: usize) -> BResult<()> {
    if buf == host {
        Ok(())
    } else {
        Err(BackendError::new(
            BackendErrorKind::Unsupported,
            format!("{what}: buffer of {buf} elements, host slice of {host}"),
        ))
    }
}

/// Copies `src` to `host` (same length), after all recorded work.
pub(crate) fn download(
    gpu: &Gpu,
    kernels: &Kernels,
    src: &GpuBuf<f32>,
    host: &mut [f32],
) -> BResult<()> {
    check_len("download", src.len, host.len())?;
    if host.is_empty() {
        return gpu.wait();
    }
    let staging = gpu.scoped(src.len * 4, || {
        gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("download"),
            size: src.bytes(),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    })?;
    kernels.record(gpu, |e| {
        e.copy_buffer_to_buffer(&src.raw, 0, &staging, 0, src.bytes());
    });
    kernels.flush(gpu);
    let (tx, rx) = mpsc::channel();
    staging.map_async(wgpu::MapMode::Read, .., move |r| {
        // The receiver outlives the poll below; a failed send only means it gave up.
        let _ = tx.send(r);
    });
    gpu.wait()?;
    let mapped = rx
        .recv()
        .map_err(|_| device_error("download: map callback never ran"))?;
    mapped.map_err(|e| device_error(format!("download: map failed: {e}")))?;
    {
        let view = staging
            .get_mapped_range(..)
            .map_err(|e| device_error(format!("download: mapped range: {e}")))?;
        host.copy_from_slice(bytemuck::cast_slice(&view));
    }
    staging.unmap();
    Ok(())
}

pub(crate) fn device_error(message: impl Into<String>) -> BackendError {
    BackendError::new(BackendErrorKind::Device, message)
}
