//! Device buffers. An empty buffer holds no allocation: `cuMemAlloc` refuses zero bytes, and
//! `mae` allocates empty gradient slots for inference-only models.
//!
//! In the bf16 mode a buffer that a GEMM multiplied as a bf16 operand also holds that bf16
//! copy (`bf16.rs`): half the bytes of the floats it copies, allocated at the first such GEMM
//! and freed with the buffer. A buffer from `alloc_operand` may hold its contents in that copy
//! alone until an op reads the floats.

use crate::bf16::Bf16Copy;
use crate::upload::Staging;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// An owned device buffer of `f32` (the backend's `Buf`).
#[derive(Debug)]
pub struct CudaBuf {
    slice: Option<CudaSlice<f32>>,
    /// Names the buffer's contents: a number no other buffer and no earlier contents had,
    /// renewed by every access that may write ([`CudaBuf::slice_mut`]), so that a copy of the
    /// contents (`bf16.rs`) can tell whether it still is one.
    contents: u64,
    /// The bf16 copy that the bf16 mode's GEMMs multiply instead of the floats (`bf16.rs`),
    /// made at the first such GEMM and kept, with the contents it copies, for the next. Locked
    /// from the copy's launch until the GEMM reading it is queued.
    pub(crate) bf16: Mutex<Option<Bf16Copy>>,
    /// Pinned host memory that rewrites of the buffer go through (`upload.rs`).
    pub(crate) staging: Staging<f32>,
    /// Made by `alloc_operand`: a producer that writes the bf16 copy may skip the floats
    /// (`bf16.rs`, [`crate::bf16::ProducedCopy::skip_floats`]).
    pub(crate) operand: bool,
}

/// The next [`CudaBuf::contents`] number.
static NEXT_CONTENTS: AtomicU64 = AtomicU64::new(1);

/// An owned device buffer of `u32` indices (the backend's `Idx`).
#[derive(Debug)]
pub struct CudaIdx {
    pub(crate) slice: Option<CudaSlice<u32>>,
    /// As [`CudaBuf::staging`].
    pub(crate) staging: Staging<u32>,
}

impl CudaBuf {
    pub(crate) fn new(slice: Option<CudaSlice<f32>>) -> CudaBuf {
        CudaBuf {
            slice,
            contents: NEXT_CONTENTS.fetch_add(1, Ordering::Relaxed),
            bf16: Mutex::new(None),
            staging: Staging::default(),
            operand: false,
        }
    }

    pub(crate) fn slice(&self) -> &Option<CudaSlice<f32>> {
        &self.slice
    }

    /// The slice, for an op that writes it: the buffer's contents get a new name.
    pub(crate) fn slice_mut(&mut self) -> &mut Option<CudaSlice<f32>> {
        self.contents = NEXT_CONTENTS.fetch_add(1, Ordering::Relaxed);
        &mut self.slice
    }

    /// [`CudaBuf::slice_mut`] and the staging, for a write from the host.
    pub(crate) fn slice_and_staging(&mut self) -> (&mut Option<CudaSlice<f32>>, &mut Staging<f32>) {
        self.contents = NEXT_CONTENTS.fetch_add(1, Ordering::Relaxed);
        (&mut self.slice, &mut self.staging)
    }

    /// The name of the buffer's current contents (see the field).
    pub(crate) fn contents(&self) -> u64 {
        self.contents
    }

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
    pub(crate) fn new(slice: Option<CudaSlice<u32>>) -> CudaIdx {
        CudaIdx {
            slice,
            staging: Staging::default(),
        }
    }

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
