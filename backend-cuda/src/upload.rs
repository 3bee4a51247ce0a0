//! Host-to-device writes of the per-step inputs (images, masking indices, the loss mask)
//! through pinned staging, copied on a stream of their own while the GPU still runs the step
//! before.
//!
//! A copy from pageable host memory larger than the driver's own staging makes the host wait
//! until the stream has finished everything queued before it, and the GPU then idles while the
//! bytes cross at pageable speed: every training step began that way, with the previous step's
//! backward still running (a ViT-B/16 batch of 256 is 154 MB). From pinned memory the copy is
//! one asynchronous DMA; the host's part, filling the staging, overlaps the work already
//! queued. On the compute stream that DMA still runs between the previous step's last kernel
//! and the next step's first, with every multiprocessor idle for its duration (about 3 ms for
//! 154 MB over PCIe 5): so a rewritten buffer holds two device allocations, and the copy
//! fills the one no queued op uses, on the upload stream, during the previous step's backward.
//!
//! A buffer gets its staging (page-locked host memory of its own size, freed with it) at its
//! *second* write of at least [`MIN_PINNED_BYTES`]: inputs are rewritten every step, while
//! weights restored from a checkpoint are written once and should not pin their size in host
//! memory for the rest of the run. Before the host refills the staging it waits for the DMA
//! that last read it (cudarc records an event after each copy from pinned memory), which has
//! normally finished long before.
//!
//! The order of an overlapped write `k`, the buffer's device memory A and B, write `k - 2`
//! having filled B and write `k - 1` A:
//!
//! ```text
//! compute: ops reading B | retire B | ops reading A | wait for copy k | ops reading B
//! upload:                  wait for "retire B" -> copy k into B ---^
//! ```
//!
//! The copy waits only for the ops queued before write `k - 1`, which in training finished
//! long ago (the previous step's loss read waited for them), and the compute stream waits for
//! the copy before the first op queued after it: the buffer behaves exactly as with one
//! allocation written in stream order. `MAE_CUDA_UPLOAD=overlapped|pinned|pageable` chooses
//! (default `overlapped`; `pinned` copies from the staging on the compute stream, `pageable`
//! straight from the caller's memory); where the driver refuses to pin, the buffer keeps the
//! pageable copy.

use crate::backend::{env_choice, CudaBackend};
use crate::error;
use cudarc::driver::{
    CudaEvent, CudaSlice, CudaStream, DeviceRepr, PinnedHostSlice, ValidAsZeroBits,
};
use mae::backend::BResult;
use std::sync::Arc;

/// How `write` and `write_idx` move host data (`MAE_CUDA_UPLOAD`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum Upload {
    /// Through each rewritten buffer's pinned staging, into its second allocation, on the
    /// upload stream.
    #[default]
    Overlapped,
    /// Through each rewritten buffer's pinned staging, in the compute stream's order.
    Pinned,
    /// Straight from the caller's (pageable) memory, as before.
    Pageable,
}

impl Upload {
    const CHOICES: [(&'static str, Upload); 3] = [
        ("overlapped", Upload::Overlapped),
        ("pinned", Upload::Pinned),
        ("pageable", Upload::Pageable),
    ];

    /// Reads `MAE_CUDA_UPLOAD`; unset is [`Upload::Overlapped`].
    pub(crate) fn from_env() -> BResult<Upload> {
        Ok(env_choice("MAE_CUDA_UPLOAD", &Self::CHOICES)?.unwrap_or_default())
    }
}

/// Writes below this many bytes go straight from pageable memory: the driver copies them into
/// its own staging and returns without waiting for the stream.
pub(crate) const MIN_PINNED_BYTES: usize = 64 << 10;

/// Bytes a thread fills per part when staging is filled by several threads: large enough that
/// starting the threads costs little next to the copy.
const BYTES_PER_THREAD: usize = 8 << 20;

/// The pinned staging of one device buffer (see the module docs).
#[derive(Debug)]
pub(crate) struct Staging<T> {
    /// Writes of at least [`MIN_PINNED_BYTES`] so far.
    large_writes: u32,
    /// Made at the second such write.
    pinned: Option<PinnedHostSlice<T>>,
    /// The driver refused to pin the buffer's size once: it is not asked again.
    refused: bool,
    /// [`Upload::Overlapped`]: the allocation the next write fills (made at the first such
    /// write).
    spare: Option<Spare<T>>,
}

/// The allocation of a rewritten buffer that no op queued since its last write reads.
#[derive(Debug)]
struct Spare<T> {
    slice: CudaSlice<T>,
    /// Recorded on the compute stream when the slice stopped being the buffer's: after every
    /// op that may read it.
    retired: CudaEvent,
}

impl<T> Default for Staging<T> {
    fn default() -> Self {
        Staging {
            large_writes: 0,
            pinned: None,
            refused: false,
            spare: None,
        }
    }
}

impl<T> Staging<T> {
    /// Whether the buffer writes through pinned staging now.
    #[cfg(test)]
    pub(crate) fn is_pinned(&self) -> bool {
        self.pinned.is_some()
    }

    /// Whether the buffer has its second allocation.
    #[cfg(test)]
    pub(crate) fn has_spare(&self) -> bool {
        self.spare.is_some()
    }
}

impl CudaBackend {
    /// Queues the copy of `host` into `dst` (as long as `host`), through `staging` where the
    /// module's rule says so. An overlapped write leaves `dst` holding the buffer's other
    /// allocation, which the copy fills.
    pub(crate) fn write_host<T>(
        &self,
        staging: &mut Staging<T>,
        host: &[T],
        dst: &mut CudaSlice<T>,
        what: &str,
    ) -> BResult<()>
    where
        T: DeviceRepr + ValidAsZeroBits + Copy + Send + Sync,
    {
        let failed = |e| error::driver(e, &format!("writing {} {what}", host.len()), 0);
        if std::mem::size_of_val(host) >= MIN_PINNED_BYTES {
            staging.large_writes = staging.large_writes.saturating_add(1);
        }
        let wanted = self.upload != Upload::Pageable && staging.large_writes >= 2;
        if wanted && staging.pinned.is_none() && !staging.refused {
            // SAFETY: the staging is filled below before any copy reads it.
            match unsafe { self.ctx.alloc_pinned::<T>(host.len()) } {
                Ok(p) => staging.pinned = Some(p),
                Err(_) => staging.refused = true,
            }
        }
        let Some(pinned) = staging.pinned.as_mut().filter(|_| wanted) else {
            return self.stream.memcpy_htod(host, dst).map_err(failed);
        };
        // Waits for the copy that last read the staging.
        fill(pinned.as_mut_slice().map_err(failed)?, host);
        if self.upload == Upload::Pinned {
            return self.stream.memcpy_htod(pinned, dst).map_err(failed);
        }
        let uploads = self.upload_stream()?;
        let mut spare = match staging.spare.take() {
            Some(spare) => spare,
            None => Spare {
                // SAFETY: the copy below overwrites all of it before any op reads it.
                slice: unsafe { self.stream.alloc::<T>(host.len()) }.map_err(|e| {
                    let bytes = std::mem::size_of_val(host);
                    error::driver(e, &format!("allocating a second {what} buffer"), bytes)
                })?,
                // Nothing has read the new slice: an event of the compute stream's work so far.
                retired: self.stream.record_event(None).map_err(failed)?,
            },
        };
        uploads.wait(&spare.retired).map_err(failed)?;
        uploads
            .memcpy_htod(pinned, &mut spare.slice)
            .map_err(failed)?;
        self.stream.join(uploads).map_err(failed)?;
        std::mem::swap(dst, &mut spare.slice);
        // The ops queued so far are all that may read the slice `dst` held. The event is the
        // buffer's own, recorded again: the wait above has taken its last recording.
        spare.retired.record(&self.stream).map_err(failed)?;
        staging.spare = Some(spare);
        Ok(())
    }

    /// The stream that overlapped uploads copy on, created at the first.
    fn upload_stream(&self) -> BResult<&Arc<CudaStream>> {
        if let Some(stream) = self.uploads.get() {
            return Ok(stream);
        }
        let stream = self
            .ctx
            .new_stream()
            .map_err(|e| error::driver(e, "creating the upload stream", 0))?;
        Ok(self.uploads.get_or_init(|| stream))
    }
}

/// `staging.copy_from_slice(host)`, by several threads when it is large: one thread's memory
/// copy reaches a fraction of the host's bandwidth.
fn fill<T: Copy + Send + Sync>(staging: &mut [T], host: &[T]) {
    let parts = std::mem::size_of_val(host) / BYTES_PER_THREAD;
    // Asked only where a write could use several threads: on Linux it reads cgroup files.
    let threads = match parts {
        0 | 1 => 1,
        _ => std::thread::available_parallelism()
            .map_or(1, usize::from)
            .min(parts)
            .min(8),
    };
    if threads == 1 {
        staging.copy_from_slice(host);
        return;
    }
    let part = host.len().div_ceil(threads);
    std::thread::scope(|s| {
        for (to, from) in staging.chunks_mut(part).zip(host.chunks(part)) {
            s.spawn(move || to.copy_from_slice(from));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_copies_every_element_whatever_the_split() {
        for len in [0usize, 1, 1000, (3 * BYTES_PER_THREAD) / 4 + 17] {
            let host: Vec<u32> = (0..len as u32)
                .map(|i| i.wrapping_mul(2_654_435_761))
                .collect();
            let mut staging = vec![0u32; len];
            fill(&mut staging, &host);
            assert_eq!(staging, host, "len {len}");
        }
    }

    /// On a device (or the fake driver of `emulate/`): the second large write of a buffer
    /// takes its pinned staging, small ones and `pageable` never do, and every write lands;
    /// overlapped writes alternate between the buffer's two allocations, in-order ones keep one.
    #[test]
    fn rewrites_of_large_buffers_take_pinned_staging() {
        use crate::buffer::addr;
        use mae::backend::Backend;
        let Some(mut be) = crate::test_device(crate::Precision::F32) else {
            return;
        };
        let large = MIN_PINNED_BYTES / 4;
        for (len, upload, pinned_at_second) in [
            (large, Upload::Overlapped, true),
            (large, Upload::Pinned, true),
            (large - 1, Upload::Overlapped, false),
            (large, Upload::Pageable, false),
        ] {
            be.upload = upload;
            let mut buf = be.alloc(len).unwrap();
            let mut idx = be.upload_idx(&vec![0; len]).unwrap();
            let mut addresses = Vec::new();
            for k in 0..4u32 {
                let floats: Vec<f32> = (0..len).map(|i| (i as u32 ^ k) as f32).collect();
                let indices: Vec<u32> = (0..len as u32).map(|i| i.wrapping_mul(k + 3)).collect();
                be.write(&mut buf, &floats).unwrap();
                be.write_idx(&mut idx, &indices).unwrap();
                let pinned = k >= 1 && pinned_at_second;
                let case = format!("{len} elements, {upload:?}, write {k}");
                assert_eq!(buf.staging.is_pinned(), pinned, "{case}");
                assert_eq!(idx.staging.is_pinned(), pinned, "{case}");
                let overlapped = pinned && upload == Upload::Overlapped;
                assert_eq!(buf.staging.has_spare(), overlapped, "{case}");
                assert_eq!(idx.staging.has_spare(), overlapped, "{case}");
                addresses.push((buf.addr(&be.stream).unwrap(), addr(&idx.slice, &be.stream)));
                let mut back = vec![f32::NAN; len];
                be.download(&buf, &mut back).unwrap();
                assert_eq!(back, floats, "{case}");
                let mut back = vec![0u32; len];
                let slice = idx.slice.as_ref().unwrap();
                be.stream.memcpy_dtoh(slice, &mut back).unwrap();
                be.stream.synchronize().unwrap();
                assert_eq!(back, indices, "{case}");
            }
            let case = format!("{len} elements, {upload:?}: addresses {addresses:?}");
            if pinned_at_second && upload == Upload::Overlapped {
                // Writes 1 and 3 fill the second allocation, 2 the first again.
                assert!(
                    addresses
                        .windows(2)
                        .all(|w| w[0].0 != w[1].0 && w[0].1 != w[1].1),
                    "{case}"
                );
                assert_eq!(
                    (addresses[0], addresses[1]),
                    (addresses[2], addresses[3]),
                    "{case}"
                );
            } else {
                assert!(addresses.iter().all(|&a| a == addresses[0]), "{case}");
            }
        }
    }

    /// On a device: an overlapped write waits for the ops that read its allocation two writes
    /// back. Each read is queued behind a slow op (four fills of 1 GiB, about a millisecond on
    /// a card), so the host queues the next writes while the GPU has not run the read yet: a copy
    /// that did not wait for it would overwrite what it reads. The fake driver runs each op as it
    /// is queued, so there only the compute stream's wait for each copy is checked.
    #[test]
    fn overlapped_writes_wait_for_the_reads_queued_two_writes_back() {
        use mae::backend::Backend;
        let Some(mut be) = crate::test_device(crate::Precision::F32) else {
            return;
        };
        be.upload = Upload::Overlapped;
        let len = MIN_PINNED_BYTES / 4;
        let mut buf = be.alloc(len).unwrap();
        // The emulator (whose device name says so) fills at host speed, and cannot fail here.
        let emulated = be.device_name().contains("fake libcuda");
        let mut slow = be.alloc(if emulated { 1 << 18 } else { 1 << 28 }).unwrap();
        let contents = |k: u32| -> Vec<f32> { (0..len).map(|i| (i as u32 ^ k) as f32).collect() };
        let mut reads = Vec::new();
        for k in 0..6 {
            be.write(&mut buf, &contents(k)).unwrap();
            for _ in 0..4 {
                be.fill(&mut slow, k as f32).unwrap();
            }
            let mut read = be.alloc(len).unwrap();
            be.copy(&buf, &mut read).unwrap();
            reads.push(read);
        }
        for (k, read) in reads.iter().enumerate() {
            let mut back = vec![f32::NAN; len];
            be.download(read, &mut back).unwrap();
            assert!(
                back == contents(k as u32),
                "the read after write {k} saw other contents"
            );
        }
    }

    #[test]
    fn the_switch_parses_and_refuses_unknown_values() {
        let parse = |v: &str| crate::backend::choice("MAE_CUDA_UPLOAD", v, &Upload::CHOICES);
        assert_eq!(parse("overlapped"), Ok(Upload::Overlapped));
        assert_eq!(parse("pinned"), Ok(Upload::Pinned));
        assert_eq!(parse("pageable"), Ok(Upload::Pageable));
        assert!(parse("async").is_err());
    }
}
