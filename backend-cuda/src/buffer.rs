//! Device buffers. An empty buffer holds no allocation: `cuMemAlloc` refuses zero bytes, and
//! `mae` allocates empty gradient slots for inference-only models.

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};

/// An owned device buffer of `f32` (the backend's `Buf`).
#[derive(Debug)]
pub struct CudaBuf {
    pub(crate) slice: Option<CudaSlice<f32>>,
}

/// An owned device buffer of `u32` indices (the backend's `Idx`).
#[derive(Debug)]
pub struct CudaIdx {
    pub(crate) slice: Option<CudaSlice<u32>>,
}

impl CudaBuf {
    /// Length in floats.
    pub fn len(&self) -> usize {
        self.slice.as_ref().map_or(0, CudaSlice::len)
    }

    /// Whether the buffer holds no floats.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl CudaIdx {
    /// Length in indices.
    pub fn len(&self) -> usize {
        self.slice.as_ref().map_or(0, CudaSlice::len)
    }

    /// Whether the buffer holds no indices.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The device address of a slice, or 0 (null) for an empty buffer, which no kernel reads
/// because every launch over no elements is skipped.
///
/// The backend turns off cudarc's per-buffer event tracking (it uses one stream), so the guard
/// `device_ptr` returns records nothing and is dropped at once.
pub(crate) fn addr<T>(slice: &Option<CudaSlice<T>>, stream: &CudaStream) -> u64 {
    slice.as_ref().map_or(0, |s| s.device_ptr(stream).0)
}

/// [`addr`] for a buffer the op writes.
pub(crate) fn addr_mut<T>(slice: &mut Option<CudaSlice<T>>, stream: &CudaStream) -> u64 {
    slice.as_mut().map_or(0, |s| s.device_ptr_mut(stream).0)
}
