//! Device buffers. An empty buffer holds no allocation: `cuMemAlloc` refuses zero bytes, and
//! `mae` allocates empty gradient slots for inference-only models.
//!
//! In the bf16 mode a buffer that a GEMM multiplied as a bf16 operand also holds that bf16
//! copy (`bf16.rs`): half the bytes of the floats it copies, allocated at the first such GEMM
//! and freed with the buffer. A buffer from `alloc_operand` may hold its contents in that copy
//! alone until an op reads the floats, and in that mode its floats are not allocated until an
//! op reads or writes them: in training no op does, which leaves the f32 memory of the block
//! activations that only GEMMs read (their LayerNorm outputs, qkv, the MLP's hidden tensors)
//! unallocated.

use crate::bf16::Bf16Copy;
use crate::error;
use crate::upload::Staging;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use mae::backend::BResult;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// An owned device buffer of `f32` (the backend's `Buf`).
#[derive(Debug)]
pub struct CudaBuf {
    /// The floats: allocated with the buffer, or for a lazy one ([`CudaBuf::lazy`]) by the
    /// first access that needs them, zeroed as `alloc`'s are. Empty for an empty buffer.
    floats: OnceLock<CudaSlice<f32>>,
    /// Length in floats.
    len: usize,
    /// Where a lazy buffer counts the bytes of its floats when it allocates them (the
    /// backend's `operand_floats`).
    lazy: Option<Arc<AtomicUsize>>,
    /// Names the buffer's contents: a number no other buffer and no earlier contents had,
    /// renewed by every access that may write ([`CudaBuf::renew`]), so that a copy of the
    /// contents (`bf16.rs`) can tell whether it still is one.
    contents: u64,
    /// The bf16 copy that the bf16 mode's GEMMs multiply instead of the floats (`bf16.rs`),
    /// made at the first such GEMM and kept, with the contents it copies, for the next. Locked
    /// from the copy's launch until the GEMM reading it is queued.
    pub(crate) bf16: Mutex<Option<Bf16Copy>>,
    /// Pinned host memory that rewrites of the buffer go through (`upload.rs`).
    pub(crate) staging: Staging<f32>,
    /// Made by `alloc_operand`: a producer that writes the bf16 copy may skip the floats
    /// (`bf16.rs`, `CudaBackend::overwritten_floats`).
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
    /// A buffer of the floats in `slice` (none: empty).
    pub(crate) fn new(slice: Option<CudaSlice<f32>>) -> CudaBuf {
        let len = slice.as_ref().map_or(0, CudaSlice::len);
        let floats = OnceLock::new();
        if let Some(slice) = slice {
            let _ = floats.set(slice);
        }
        CudaBuf::with(floats, len, None)
    }

    /// A buffer of `len` floats whose memory is allocated when an access first needs it,
    /// adding its bytes to `count`.
    pub(crate) fn lazy(len: usize, count: Arc<AtomicUsize>) -> CudaBuf {
        CudaBuf::with(OnceLock::new(), len, Some(count))
    }

    fn with(
        floats: OnceLock<CudaSlice<f32>>,
        len: usize,
        lazy: Option<Arc<AtomicUsize>>,
    ) -> CudaBuf {
        CudaBuf {
            floats,
            len,
            lazy,
            contents: NEXT_CONTENTS.fetch_add(1, Ordering::Relaxed),
            bf16: Mutex::new(None),
            staging: Staging::default(),
            operand: false,
        }
    }

    /// The floats, allocated (zeroed) here if they were not yet; `None` for an empty buffer.
    /// Takes a shared reference because reads need them too (and the widening of a bf16 copy,
    /// `bf16.rs`, which writes the values the buffer already holds).
    pub(crate) fn floats(&self, stream: &Arc<CudaStream>) -> BResult<Option<&CudaSlice<f32>>> {
        if self.len == 0 {
            return Ok(None);
        }
        if let Some(slice) = self.floats.get() {
            return Ok(Some(slice));
        }
        let bytes = error::bytes_of::<f32>(self.len)?;
        let fresh = stream
            .alloc_zeros::<f32>(self.len)
            .map_err(|e| error::driver(e, &format!("allocating {} floats", self.len), bytes))?;
        // Another thread may have set them meanwhile (through a shared reference): keep theirs.
        if self.floats.set(fresh).is_ok() {
            if let Some(count) = &self.lazy {
                count.fetch_add(bytes, Ordering::Relaxed);
            }
        }
        Ok(self.floats.get())
    }

    /// [`CudaBuf::floats`], for an op that writes them: the buffer's contents get a new name.
    pub(crate) fn floats_mut(
        &mut self,
        stream: &Arc<CudaStream>,
    ) -> BResult<Option<&mut CudaSlice<f32>>> {
        self.renew();
        self.floats(stream)?;
        Ok(self.floats.get_mut())
    }

    /// [`CudaBuf::floats_mut`] and the staging, for a write from the host.
    pub(crate) fn floats_and_staging(
        &mut self,
        stream: &Arc<CudaStream>,
    ) -> BResult<(Option<&mut CudaSlice<f32>>, &mut Staging<f32>)> {
        self.renew();
        self.floats(stream)?;
        Ok((self.floats.get_mut(), &mut self.staging))
    }

    /// The device address of the floats (allocated if they were not), or 0 (null) for an
    /// empty buffer, which no kernel reads because every launch over no elements is skipped.
    ///
    /// The backend turns off cudarc's per-buffer event tracking (it uses one stream), so the
    /// guard `device_ptr` returns records nothing and is dropped at once.
    pub(crate) fn addr(&self, stream: &Arc<CudaStream>) -> BResult<u64> {
        Ok(self.floats(stream)?.map_or(0, |s| s.device_ptr(stream).0))
    }

    /// [`CudaBuf::addr`] for an op that writes the floats: the contents get a new name.
    pub(crate) fn addr_mut(&mut self, stream: &Arc<CudaStream>) -> BResult<u64> {
        Ok(self
            .floats_mut(stream)?
            .map_or(0, |s| s.device_ptr_mut(stream).0))
    }

    /// Gives the contents a new name without touching the floats: for an op that writes the
    /// buffer's bf16 copy alone (`bf16.rs`).
    pub(crate) fn renew(&mut self) {
        self.contents = NEXT_CONTENTS.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether the floats are allocated (a lazy buffer's may not be yet).
    #[cfg(test)]
    pub(crate) fn has_floats(&self) -> bool {
        self.floats.get().is_some()
    }

    /// The name of the buffer's current contents (see the field).
    pub(crate) fn contents(&self) -> u64 {
        self.contents
    }

    /// Length in floats.
    pub fn len(&self) -> usize {
        self.len
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

/// The device address of an index buffer's slice, or 0 (null) for an empty one (see
/// [`CudaBuf::addr`]).
pub(crate) fn addr<T>(slice: &Option<CudaSlice<T>>, stream: &CudaStream) -> u64 {
    slice.as_ref().map_or(0, |s| s.device_ptr(stream).0)
}
