//! Averaging gradients while the backward still runs. The backward hands over each group of
//! gradients as soon as its last op is queued (`mae::model::GradsReady`); once a bucket's worth
//! has gathered, its collective is queued on a stream of its own, behind an event on the compute
//! stream, so it runs beside the kernels of the layers below. Before the update, the compute
//! stream waits for the last bucket.
//!
//! ```text
//! compute: ..dec blk 7 bwd | dec blk 6 bwd | .. | enc blk 0 bwd | embed bwd |  wait  | AdamW
//!                  event ^         event ^                           event ^     ^
//! comm:                    [bucket 1]      [bucket 2]  ..                 [last] -+
//! ```
//!
//! The collective itself (NCCL's all-reduce) is the caller's: [`Overlap`] only decides when and
//! after what each bucket runs.

use crate::{error, CudaBuf};
use cudarc::driver::CudaStream;
use mae::backend::BResult;
use std::collections::HashSet;
use std::sync::Arc;

/// A bucket's gradients as (device address, floats): what a collective reduces in place.
pub(crate) type Bucket<'a> = &'a [(u64, usize)];

/// Buckets of finished gradients, queued on the communication stream in the order the backward
/// finishes them.
pub(crate) struct Overlap {
    compute: Arc<CudaStream>,
    comm: Arc<CudaStream>,
    /// Finished gradients not yet in a queued bucket.
    pending: Vec<(u64, usize)>,
    pending_bytes: usize,
    /// Addresses of the gradients taken (pending or in a queued bucket) since the last
    /// [`Overlap::finish`]: a gradient handed over twice is reduced once.
    queued: HashSet<u64>,
}

impl Overlap {
    /// Buckets reduced on a new stream of `compute`'s context.
    pub(crate) fn new(compute: &Arc<CudaStream>) -> BResult<Overlap> {
        let comm = compute
            .context()
            .new_stream()
            .map_err(|e| error::driver(e, "creating the gradient averaging's stream", 0))?;
        Ok(Overlap {
            compute: compute.clone(),
            comm,
            pending: Vec::new(),
            pending_bytes: 0,
            queued: HashSet::new(),
        })
    }

    /// Takes finished gradients; queues a bucket through `reduce` once `bucket_bytes` have
    /// gathered (every rank passes the same).
    pub(crate) fn ready(
        &mut self,
        grads: &mut [&mut CudaBuf],
        bucket_bytes: usize,
        reduce: &mut dyn FnMut(&CudaStream, Bucket) -> BResult<()>,
    ) -> BResult<()> {
        for g in grads.iter_mut() {
            self.take(g)?;
        }
        if self.pending_bytes >= bucket_bytes {
            self.queue(reduce)?;
        }
        Ok(())
    }

    /// Queues what is pending and any of `all` (the step's every gradient) that was never
    /// handed over, then makes the compute stream wait for every queued bucket, so the ops
    /// queued after this (the update) read the reduced gradients.
    pub(crate) fn finish<'a>(
        &mut self,
        all: impl IntoIterator<Item = &'a mut CudaBuf>,
        reduce: &mut dyn FnMut(&CudaStream, Bucket) -> BResult<()>,
    ) -> BResult<()> {
        for g in all {
            self.take(g)?;
        }
        if !self.pending.is_empty() {
            self.queue(reduce)?;
        }
        self.queued.clear();
        self.compute
            .join(&self.comm)
            .map_err(|e| error::driver(e, "waiting for the gradient averaging", 0))
    }

    /// Adds `g` to the pending bucket unless it is empty or already queued this step.
    fn take(&mut self, g: &mut CudaBuf) -> BResult<()> {
        let addr = g.addr_mut(&self.compute)?;
        if !g.is_empty() && self.queued.insert(addr) {
            self.pending.push((addr, g.len()));
            self.pending_bytes += 4 * g.len();
        }
        Ok(())
    }

    /// The pending gradients as one bucket on the communication stream, after every op queued
    /// so far on the compute stream (among them the last writes of these gradients).
    fn queue(&mut self, reduce: &mut dyn FnMut(&CudaStream, Bucket) -> BResult<()>) -> BResult<()> {
        self.comm.join(&self.compute).map_err(|e| {
            error::driver(e, "ordering the gradient averaging after the backward", 0)
        })?;
        reduce(&self.comm, &self.pending)?;
        self.pending.clear();
        self.pending_bytes = 0;
        Ok(())
    }
}

impl Drop for Overlap {
    fn drop(&mut self) {
        // A step that failed between a queued bucket and `finish` leaves a collective running:
        // the gradients' memory is freed in the compute stream's order, so that waits for it.
        let _ = self.compute.join(&self.comm);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{test_device, CudaBackend, Precision};
    use cudarc::driver::result;
    use mae::backend::{Backend, Gemm};

    /// Overwrites `dst` with `src` on `stream` (both `n` floats).
    fn copy_on(stream: &CudaStream, dst: u64, src: u64, n: usize) -> BResult<()> {
        // SAFETY: both addresses are live allocations of `n` floats on this context (the
        // test's buffers, alive until after the final synchronize).
        unsafe { result::memcpy_dtod_async(dst, src, 4 * n, stream.cu_stream()) }
            .map_err(|e| error::driver(e, "test copy", 0))
    }

    /// `c = a . b` several times over, slow enough on a GPU (about a millisecond) that a
    /// collective not waiting for it would read `c` before its last write.
    fn slow_write(gpu: &CudaBackend, a: &CudaBuf, c: &mut CudaBuf, n: usize, times: usize) {
        for _ in 0..times {
            gpu.gemm(&Gemm::new(n, n, n), a, a, c).unwrap();
        }
    }

    /// Each bucket runs after the ops that wrote its gradients, the update after each bucket:
    /// the "collective" copies each gradient into a snapshot and then overwrites it with a
    /// marker, so the snapshots must hold the products and the gradients the markers. A
    /// gradient never handed over is taken by `finish`, and one handed over twice is reduced
    /// once. On a GPU the products take long enough that a missing wait shows up; on the fake
    /// driver, which runs every op when it is queued, this checks the bucketing alone.
    #[test]
    fn buckets_run_after_the_gradients_last_writes_and_before_the_update() {
        let Some(gpu) = test_device(Precision::F32) else {
            return;
        };
        let real = !gpu.device_name().contains("emulator");
        let (n, times) = if real { (1024, 8) } else { (16, 1) };
        let a = gpu
            .upload(&(0..n * n).map(|i| (i % 7) as f32 / 8.0).collect::<Vec<_>>())
            .unwrap();
        let tensors = 5;
        let mut grads: Vec<CudaBuf> = (0..tensors).map(|_| gpu.alloc(n * n).unwrap()).collect();
        let mut snaps: Vec<CudaBuf> = (0..tensors).map(|_| gpu.alloc(n * n).unwrap()).collect();
        let marks: Vec<CudaBuf> = (0..tensors)
            .map(|t| gpu.upload(&vec![-(t as f32) - 1.0; n * n]).unwrap())
            .collect();
        let snap_of: std::collections::HashMap<u64, (u64, u64)> = (0..tensors)
            .map(|t| {
                let g = grads[t].addr(&gpu.stream).unwrap();
                let s = snaps[t].addr_mut(&gpu.stream).unwrap();
                (g, (s, marks[t].addr(&gpu.stream).unwrap()))
            })
            .collect();
        let mut buckets = Vec::new();
        let mut reduce = |stream: &CudaStream, bucket: Bucket| -> BResult<()> {
            for &(g, len) in bucket {
                let (snap, mark) = snap_of[&g];
                copy_on(stream, snap, g, len)?;
                copy_on(stream, g, mark, len)?;
            }
            buckets.push(bucket.len());
            Ok(())
        };
        // Two gradients a bucket; the last one is never handed over, the first twice.
        let mut overlap = Overlap::new(&gpu.stream).unwrap();
        let bucket_bytes = 2 * 4 * n * n;
        for (t, g) in grads.iter_mut().enumerate() {
            slow_write(&gpu, &a, g, n, times);
            if t + 1 < tensors {
                overlap.ready(&mut [g], bucket_bytes, &mut reduce).unwrap();
            }
        }
        overlap
            .ready(&mut [&mut grads[0]], bucket_bytes, &mut reduce)
            .unwrap();
        overlap.finish(grads.iter_mut(), &mut reduce).unwrap();
        assert_eq!(buckets, [2, 2, 1]);
        let mut expected = vec![0.0f32; n * n];
        let mut product = gpu.alloc(n * n).unwrap();
        gpu.gemm(&Gemm::new(n, n, n), &a, &a, &mut product).unwrap();
        gpu.download(&product, &mut expected).unwrap();
        let mut got = vec![0.0f32; n * n];
        for t in 0..tensors {
            // Queued on the compute stream right after `finish`: sees the markers.
            gpu.download(&grads[t], &mut got).unwrap();
            assert!(got.iter().all(|&x| x == -(t as f32) - 1.0), "gradient {t}");
            gpu.download(&snaps[t], &mut got).unwrap();
            assert!(
                got == expected,
                "bucket of gradient {t} ran before its last write"
            );
        }
    }
}
