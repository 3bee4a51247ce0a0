//! Data-parallel training across GPUs through NCCL: one process per GPU, each with its own
//! [`CudaBackend`], gradients averaged with `ncclAllReduce` before every optimizer update.
//!
//! The pieces:
//! - [`RankEnv`]: the process's rank, the job's size and its GPU, from the launcher's
//!   environment (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`).
//! - [`exchange_id`]: rank 0 draws the NCCL unique id ([`NcclId::new`]) and publishes it in a
//!   file (`MAE_NCCL_ID_FILE`); the other ranks wait for it there.
//! - [`DataParallel`]: the communicator on the backend's device. It averages a training step's
//!   gradients while the backward runs: the backward hands it each group of finished gradients
//!   ([`GradsReady`]), full buckets are all-reduced on a stream of their own, and
//!   [`DataParallel::finish_mean`] makes the update wait for them (`overlap.rs`).
//!   [`DataParallel::all_reduce_mean`] averages buffers after the fact, in buckets
//!   ([`plan_buckets`]) on the backend's stream; `MAE_NCCL_OVERLAP=off` makes
//!   `finish_mean` do that instead.
//!
//! `libnccl` (2.10 or later) is loaded at run time like the CUDA libraries: where it is missing,
//! [`NcclId::new`] and [`DataParallel::new`] return [`BackendErrorKind::NoDevice`] naming the
//! library, and nothing else changes.
//!
//! ```no_run
//! use mae::backend::Backend;
//! use mae_backend_cuda::nccl::{exchange_id, DataParallel, NcclId, RankEnv, DEFAULT_ID_TIMEOUT};
//! use mae_backend_cuda::CudaBackend;
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let env = RankEnv::from_env()?;
//! let gpu = CudaBackend::new(env.local_rank)?;
//! let path = std::env::var_os("MAE_NCCL_ID_FILE").map(std::path::PathBuf::from);
//! let id = exchange_id::<Box<dyn std::error::Error>>(&env, path.as_deref(), DEFAULT_ID_TIMEOUT, || {
//!     Ok(NcclId::new()?.to_bytes())
//! })?;
//! let dp = DataParallel::new(&gpu, env.rank, env.world_size, &NcclId::from_bytes(id))?;
//! let mut grads = vec![gpu.upload(&[1.0, 2.0])?, gpu.upload(&[3.0])?];
//! dp.all_reduce_mean(grads.iter_mut())?;
//! # Ok(()) }
//! ```

mod buckets;
mod library;
mod overlap;
mod rendezvous;

pub use buckets::{plan_buckets, DEFAULT_BUCKET_BYTES};
pub use library::{candidates as library_candidates, LIBRARY_ENV, LIBRARY_NAMES};
pub use rendezvous::{
    exchange_id, publish_id, wait_for_id, RankEnv, RendezvousError, DEFAULT_ID_TIMEOUT, ID_BYTES,
    ID_FILE_ENV,
};

/// `on` (the default) or `off`: whether [`DataParallel`] starts averaging during the backward.
pub const OVERLAP_ENV: &str = "MAE_NCCL_OVERLAP";

use crate::backend::env_choice;
use crate::{error, CudaBackend, CudaBuf};
use cudarc::driver::{CudaContext, CudaStream};
use library::{nccl, Nccl, RawComm, RawId, AVG, FLOAT32};
use mae::backend::{BResult, BackendError, BackendErrorKind};
use mae::model::GradsReady;
use overlap::{Bucket, Overlap};
use std::ffi::c_int;
use std::sync::Arc;

impl From<RendezvousError> for BackendError {
    fn from(e: RendezvousError) -> BackendError {
        BackendError::new(BackendErrorKind::Device, e.to_string())
    }
}

/// An NCCL unique id: drawn once by rank 0, passed to every rank of the job.
#[derive(Clone, Copy)]
pub struct NcclId(RawId);

impl std::fmt::Debug for NcclId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NcclId(..)")
    }
}

impl NcclId {
    /// A fresh id (`ncclGetUniqueId`; NCCL also starts its bootstrap listener here).
    pub fn new() -> BResult<NcclId> {
        let lib = nccl()?;
        let mut id = RawId { internal: [0; 128] };
        // SAFETY: `id` is a valid, writable ncclUniqueId.
        lib.check(unsafe { (lib.get_unique_id)(&mut id) }, "ncclGetUniqueId")?;
        Ok(NcclId(id))
    }

    /// The id's bytes, to hand to the other ranks.
    pub fn to_bytes(&self) -> [u8; ID_BYTES] {
        self.0.internal.map(|c| c as u8)
    }

    /// The id rank 0 handed out as bytes.
    pub fn from_bytes(bytes: [u8; ID_BYTES]) -> NcclId {
        NcclId(RawId {
            internal: bytes.map(|b| b as std::ffi::c_char),
        })
    }
}

/// This process's member of an NCCL communicator, on the device of a [`CudaBackend`]:
/// averages gradients across the ranks of a data-parallel job.
///
/// Collectives are queued behind the kernels that produced the gradients and ahead of those
/// that read them, so they add no host synchronization. As a [`GradsReady`], it all-reduces
/// each bucket of finished gradients on a stream of its own while the backward goes on, and
/// [`finish_mean`](DataParallel::finish_mean) completes the step's averaging. Every rank must
/// make the same calls with tensors of the same lengths in the same order, or the job hangs in
/// NCCL.
pub struct DataParallel {
    lib: &'static Nccl,
    comm: RawComm,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    rank: usize,
    world_size: usize,
    bucket_bytes: usize,
    /// The buckets averaged while the backward runs; `None` under `MAE_NCCL_OVERLAP=off`.
    overlap: Option<Overlap>,
}

impl std::fmt::Debug for DataParallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataParallel")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("nccl", &self.nccl_version())
            .field("bucket_bytes", &self.bucket_bytes)
            .field("overlap", &self.overlap.is_some())
            .finish()
    }
}

fn fit_int(value: usize, what: &str) -> BResult<c_int> {
    c_int::try_from(value).map_err(|_| {
        BackendError::new(
            BackendErrorKind::TooLarge {
                len: value,
                max: c_int::MAX as usize,
            },
            format!("{what} does not fit NCCL's int"),
        )
    })
}

impl DataParallel {
    /// Joins the communicator of `world_size` ranks as `rank` (`ncclCommInitRank`), on
    /// `backend`'s GPU. Blocks until every rank has joined. A job of one rank is allowed (the
    /// all-reduce is then a copy in place). `MAE_NCCL_OVERLAP=on|off` (default on) chooses
    /// whether [`GradsReady`] reports start the averaging during the backward; any other value
    /// is an error.
    pub fn new(
        backend: &CudaBackend,
        rank: usize,
        world_size: usize,
        id: &NcclId,
    ) -> BResult<DataParallel> {
        if rank >= world_size {
            return Err(RendezvousError::RankOutOfRange { rank, world_size }.into());
        }
        let overlap = match env_choice(OVERLAP_ENV, &[("on", true), ("off", false)])? {
            Some(false) => None,
            _ => Some(Overlap::new(&backend.stream)?),
        };
        let lib = nccl()?;
        let (n, r) = (
            fit_int(world_size, "the world size")?,
            fit_int(rank, "the rank")?,
        );
        // NCCL takes the device from the calling thread's current context.
        backend
            .ctx
            .bind_to_thread()
            .map_err(|e| error::driver(e, "binding the CUDA context for NCCL", 0))?;
        let mut comm: RawComm = std::ptr::null_mut();
        // SAFETY: `comm` is writable; the id is 128 bytes drawn by ncclGetUniqueId on rank 0
        // (NCCL validates it and fails with an error code otherwise); rank < world_size.
        let code = unsafe { (lib.comm_init_rank)(&mut comm, n, id.0, r) };
        lib.check(
            code,
            &format!(
                "ncclCommInitRank (rank {rank} of {world_size}, device {})",
                backend.ctx.ordinal()
            ),
        )?;
        Ok(DataParallel {
            lib,
            comm,
            ctx: backend.ctx.clone(),
            stream: backend.stream.clone(),
            rank,
            world_size,
            bucket_bytes: DEFAULT_BUCKET_BYTES,
            overlap,
        })
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of ranks.
    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// The loaded NCCL's version (`2.21.5`) and the library name it was loaded by.
    pub fn nccl_version(&self) -> String {
        format!(
            "{} ({})",
            library::version_string(self.lib.version),
            self.lib.name
        )
    }

    /// Sets the bucket size in bytes ([`DEFAULT_BUCKET_BYTES`] by default). Every rank must use
    /// the same.
    pub fn with_bucket_bytes(mut self, bytes: usize) -> DataParallel {
        self.bucket_bytes = bytes;
        self
    }

    /// Whether the averaging starts during the backward (`MAE_NCCL_OVERLAP`).
    pub fn overlaps(&self) -> bool {
        self.overlap.is_some()
    }

    /// Completes the averaging of a step's gradients, `bufs` (every gradient of the model, in
    /// parameter order): queues the gradients the backward handed over that are not yet in a
    /// bucket, and any it never handed over, and makes the backend's stream wait for every
    /// bucket, so the update reads the means. Without overlap, the whole
    /// [`all_reduce_mean`](DataParallel::all_reduce_mean) of `bufs`.
    pub fn finish_mean<'a>(
        &mut self,
        bufs: impl IntoIterator<Item = &'a mut CudaBuf>,
    ) -> BResult<()> {
        let Some(overlap) = &mut self.overlap else {
            return self.all_reduce_mean(bufs);
        };
        let (lib, comm, ctx) = (self.lib, self.comm, &self.ctx);
        overlap.finish(bufs, &mut |stream, bucket| {
            all_reduce_group(lib, comm, ctx, stream, bucket)
        })
    }

    /// Replaces every buffer by its mean over the ranks, in place: buffers in parameter order
    /// (as `MaeParams::tensors_mut` yields them), all-reduced last first in buckets of about
    /// the bucket size, each bucket one NCCL group. The buffers must live on this
    /// communicator's backend. Queued on the backend's stream: it returns before the reduction
    /// is done, and the backend's next op waits for it.
    pub fn all_reduce_mean<'a>(
        &self,
        bufs: impl IntoIterator<Item = &'a mut CudaBuf>,
    ) -> BResult<()> {
        let mut bufs: Vec<&mut CudaBuf> = bufs.into_iter().collect();
        let lens: Vec<usize> = bufs.iter().map(|b| b.len()).collect();
        let ptrs = bufs
            .iter_mut()
            .map(|b| b.addr_mut(&self.stream))
            .collect::<BResult<Vec<u64>>>()?;
        for bucket in plan_buckets(&lens, self.bucket_bytes) {
            let bucket: Vec<(u64, usize)> = bucket.iter().map(|&i| (ptrs[i], lens[i])).collect();
            all_reduce_group(self.lib, self.comm, &self.ctx, &self.stream, &bucket)?;
        }
        Ok(())
    }
}

/// Finished gradients handed over by the backward: their averaging starts once a bucket's
/// worth has gathered (without overlap, [`DataParallel::finish_mean`] does it all).
impl GradsReady<CudaBackend> for DataParallel {
    fn ready(&mut self, _: &CudaBackend, grads: &mut [&mut CudaBuf]) -> BResult<()> {
        let Some(overlap) = &mut self.overlap else {
            return Ok(());
        };
        let (lib, comm, ctx) = (self.lib, self.comm, &self.ctx);
        overlap.ready(grads, self.bucket_bytes, &mut |stream, bucket| {
            all_reduce_group(lib, comm, ctx, stream, bucket)
        })
    }
}

/// `bucket`'s buffers replaced by their means over the ranks, in place: one NCCL group of
/// average all-reduces, queued on `stream`.
fn all_reduce_group(
    lib: &Nccl,
    comm: RawComm,
    ctx: &CudaContext,
    stream: &CudaStream,
    bucket: Bucket,
) -> BResult<()> {
    ctx.bind_to_thread()
        .map_err(|e| error::driver(e, "binding the CUDA context for NCCL", 0))?;
    // SAFETY: no arguments; pairs with the ncclGroupEnd below on every path.
    let started = unsafe { (lib.group_start)() };
    lib.check(started, "ncclGroupStart")?;
    let mut queued = Ok(());
    for &(addr, len) in bucket {
        let ptr = addr as *mut std::ffi::c_void;
        // SAFETY: `ptr` addresses a live allocation of `len` f32 on the communicator's device
        // (a gradient of the model being trained, which outlives the step; frees are ordered
        // after the collective, which the backend's stream waits for); reducing in place is
        // allowed; the stream belongs to the context the communicator was created on.
        let code =
            unsafe { (lib.all_reduce)(ptr, ptr, len, FLOAT32, AVG, comm, stream.cu_stream()) };
        queued = lib.check(code, &format!("ncclAllReduce of {len} floats"));
        if queued.is_err() {
            break;
        }
    }
    // SAFETY: closes the group opened above.
    let ended = lib.check(unsafe { (lib.group_end)() }, "ncclGroupEnd");
    queued?;
    ended
}

impl Drop for DataParallel {
    fn drop(&mut self) {
        // Let queued collectives finish before the communicator's resources go; errors cannot
        // be reported from here and the process is ending its use of NCCL anyway.
        let _ = self.ctx.bind_to_thread();
        // The overlap's stream, joined into the backend's as it goes.
        drop(self.overlap.take());
        let _ = self.stream.synchronize();
        // SAFETY: `comm` came from a successful ncclCommInitRank and is destroyed once.
        let _ = unsafe { (self.lib.comm_destroy)(self.comm) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_through_bytes() {
        let bytes: [u8; ID_BYTES] = std::array::from_fn(|i| (255 - i) as u8);
        assert_eq!(NcclId::from_bytes(bytes).to_bytes(), bytes);
    }

    /// A GPU and NCCL, or `None` after printing why the test skips (a failure where
    /// `MAE_REQUIRE_BACKENDS` names cuda).
    fn gpu_and_id() -> Option<(CudaBackend, NcclId)> {
        let ready = CudaBackend::new(0).and_then(|gpu| Ok((gpu, NcclId::new()?)));
        match ready {
            Ok(ready) => Some(ready),
            Err(e) => {
                let required = std::env::var("MAE_REQUIRE_BACKENDS")
                    .unwrap_or_default()
                    .split(',')
                    .any(|b| b.trim().eq_ignore_ascii_case("cuda"));
                assert!(!required, "cuda is required by MAE_REQUIRE_BACKENDS: {e}");
                eprintln!("SKIP cuda nccl: {e}");
                None
            }
        }
    }

    /// One rank's average is its own gradient, bit for bit, through many buckets (16-byte
    /// buckets: one group per tensor), empty tensors included, after a backward and during
    /// one.
    #[test]
    fn one_rank_averages_to_its_own_gradients_in_many_buckets() {
        use mae::backend::Backend;
        use mae::model::GradsReady;
        let Some((gpu, id)) = gpu_and_id() else {
            return;
        };
        let mut dp = DataParallel::new(&gpu, 0, 1, &id)
            .unwrap()
            .with_bucket_bytes(16);
        let host: Vec<Vec<f32>> = [5usize, 0, 1, 4, 1000, 3]
            .iter()
            .enumerate()
            .map(|(t, &n)| {
                (0..n)
                    .map(|i| (i as f32 * 0.37 - t as f32).sin() * 1e-3)
                    .collect()
            })
            .collect();
        let mut bufs: Vec<CudaBuf> = host.iter().map(|h| gpu.upload(h).unwrap()).collect();
        dp.all_reduce_mean(bufs.iter_mut()).unwrap();
        dp.all_reduce_mean(bufs.iter_mut()).unwrap();
        // And as a step's averaging: two tensors handed over during a "backward", the rest
        // taken by `finish_mean`.
        assert!(dp.overlaps(), "MAE_NCCL_OVERLAP defaults to on");
        let (low, high) = bufs.split_at_mut(4);
        dp.ready(&gpu, &mut [&mut high[0], &mut low[1]]).unwrap();
        dp.finish_mean(bufs.iter_mut()).unwrap();
        for (h, b) in host.iter().zip(&bufs) {
            let mut back = vec![0.0f32; h.len()];
            gpu.download(b, &mut back).unwrap();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&back), bits(h));
        }
        assert!(dp.nccl_version().starts_with("2."), "{dp:?}");
        let e = DataParallel::new(&gpu, 1, 1, &id).unwrap_err();
        assert!(e.message.contains("RANK=1"), "{e}");
    }

    /// Without NCCL drawing an id is a NoDevice error naming the library; with it, an id.
    #[test]
    fn drawing_an_id_never_panics() {
        match NcclId::new() {
            Ok(id) => assert_ne!(id.to_bytes(), [0; ID_BYTES]),
            Err(e) => {
                assert!(
                    matches!(
                        e.kind,
                        BackendErrorKind::NoDevice | BackendErrorKind::Unsupported
                    ),
                    "{e}"
                );
                assert!(e.message.contains("libnccl"), "{e}");
            }
        }
    }
}
