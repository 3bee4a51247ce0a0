//! # mae-backend-cuda: the `mae` compute backend on NVIDIA GPUs
//!
//! GEMMs go to cuBLAS (`sgemmStridedBatched` in f32 by default; TF32 or bf16 tensor cores as an
//! opt-in [`Precision`], backend names `cuda-tf32` and `cuda-bf16`); every other op is a CUDA C
//! kernel (`src/kernels/*.cu`) compiled with NVRTC for the device's architecture at the first op
//! and kept for the backend's lifetime. Attention runs as fused kernels (no score matrix in
//! memory): f32 SIMT kernels in f32 and TF32, tensor-core (`mma.sync`, bf16 operands, f32
//! accumulation) kernels in bf16 on compute capability 8.0 and later, split-heads, GEMM and
//! softmax ops before that; `MAE_CUDA_ATTENTION=fused|composed|mma` overrides ([`AttentionPath`]);
//! the tensor-core kernels load each tile while computing the one before
//! (`MAE_CUDA_ATTENTION_PREFETCH=on|off`).
//! In bf16 the Linear layers' GEMMs multiply bf16 copies of their operands written by a rounding
//! kernel, the others let cuBLAS round the f32 operands (`bf16.rs`;
//! `MAE_CUDA_BF16_GEMM=auto|copies|fast`). A Linear layer's bias is added by cuBLASLt's GEMM
//! epilogue where `libcublasLt` is found and takes the shape, else by a second pass, and in bf16
//! its gradient is summed in the weight gradient's epilogue (`lt.rs`;
//! `MAE_CUDA_GEMM_BIAS=lt|composed`); a weight gradient whose output cannot fill the card runs
//! in chunks of its rows (`split_k.rs`; `MAE_CUDA_WEIGHT_GRAD_SPLIT=auto|off`).
//! `MAE_CUDA_GEMM_TUNE=FILE` measures cuBLASLt's algorithms and the weight gradients' chunk
//! counts on the card the first time a shape is met and keeps the fastest in FILE, which
//! later runs reuse (`lt/tuning.rs`); without it, the bf16 mode runs the table kept in the crate
//! for the cuBLASLt version and card where there is one, timing nothing (`lt/tables/`;
//! `MAE_CUDA_GEMM_TABLE=builtin|heuristic`). Buffers written from the host again and again (a step's
//! images and masking indices) are copied through pinned staging, so the host queues the upload
//! without waiting for the GPU, into a second allocation on a stream of their own, so the
//! copy runs during the previous step (`upload.rs`; `MAE_CUDA_UPLOAD=overlapped|pinned|pageable`).
//! The LayerNorm backward sums its parameter gradients' partials in the dx kernel
//! (`MAE_CUDA_LAYERNORM_PARTIALS=fused|separate`).
//! `MAE_CUDA_PROFILE=1` prints the device time per kernel when the backend is dropped, with the
//! products' TFLOP/s and the other kernels' bandwidth, and each kernel's registers, spills and
//! resident blocks as the driver compiled it.
//!
//! The CUDA libraries are loaded at run time (cudarc's `dynamic-loading`), so this crate builds
//! and its tests run on machines without CUDA: there [`CudaBackend::new`] returns a
//! [`mae::BackendErrorKind::NoDevice`] error naming what is missing. The Cargo feature `cuda-13`
//! (default) searches CUDA 13's library names first; `cuda-12` builds against the CUDA 12 API
//! for older drivers.
//!
//! Numerics, beyond the [`Backend`] contract:
//! - Deterministic: no floating-point atomics. Row reductions (LayerNorm, softmax, the loss) run
//!   one block per row and sum in `f64` in a fixed tree order; column sums (bias, LayerNorm
//!   parameter and position-table gradients) run in two passes, chunks of rows in `f64` then
//!   the chunks in order. cuBLAS is deterministic for a given GPU model and library version,
//!   and so is a tuned run for a given tuning table.
//! - The kernels round like the CPU reference: compiled without FMA contraction, IEEE division
//!   and square root, GELU in `f64` from `erfc`.
//! - Ops are queued on one stream (only the copies of rewritten inputs run on a second, which
//!   the first waits for); errors of a failed kernel surface at the next
//!   [`Backend::sync`] or [`Backend::download`].
//!
//! Several GPUs train one model data-parallel through [`nccl`] (`libnccl` loaded at run time
//! too): one process per GPU, gradients averaged with NCCL all-reduces.
//!
//! ```
//! use mae::backend::{Backend, Gemm};
//! use mae_backend_cuda::CudaBackend;
//!
//! let gpu = match CudaBackend::new(0) {
//!     Ok(gpu) => gpu,
//!     Err(e) => {
//!         eprintln!("no GPU here: {e}");
//!         return Ok(());
//!     }
//! };
//! // A = [[1, 2, 3], [4, 5, 6]] (2 x 3), B = [[1, 0], [0, 1], [1, 1]] (3 x 2).
//! let a = gpu.upload(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0])?;
//! let b = gpu.upload(&[1.0, 0.0, 0.0, 1.0, 1.0, 1.0])?;
//! let mut c = gpu.alloc(4)?;
//! gpu.gemm(&Gemm::new(2, 2, 3), &a, &b, &mut c)?;
//!
//! let mut host = [0.0f32; 4];
//! gpu.download(&c, &mut host)?;
//! assert_eq!(host, [4.0, 5.0, 10.0, 11.0]);
//! # Ok::<(), mae::BackendError>(())
//! ```
#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]
#![warn(missing_docs)]
// The trait's signatures (llm.c style: buffers, then dimensions) carry many arguments.
#![allow(clippy::too_many_arguments)]

mod adamw_many;
mod backend;
mod bf16;
mod buffer;
mod device;
mod error;
mod gemm;
pub mod kernels;
mod launch;
mod lt;
pub mod nccl;
mod ops;
mod profile;
mod readers;
mod split_k;
mod traffic;
mod upload;

pub use backend::{AttentionPath, CudaBackend, Precision};
pub use buffer::{CudaBuf, CudaIdx};
pub use device::Library;

#[allow(unused_imports)]
use mae::backend::Backend;

/// The backend on device 0 in `precision` for the crate's tests that need a device (or the fake
/// driver of `emulate/`); `None`, after a visible `SKIP`, where there is none and
/// `MAE_REQUIRE_BACKENDS` does not name `cuda` (it fails where it does).
#[cfg(test)]
pub(crate) fn test_device(precision: Precision) -> Option<CudaBackend> {
    use std::io::Write;
    match CudaBackend::with_precision(0, precision) {
        Ok(be) => Some(be),
        Err(e) if e.kind == mae::backend::BackendErrorKind::NoDevice => {
            let required = std::env::var("MAE_REQUIRE_BACKENDS").unwrap_or_default();
            assert!(!required.split(',').any(|b| b.trim() == "cuda"), "{e}");
            // Past libtest's capture, as the conformance suite's skips.
            let _ = writeln!(std::io::stderr(), "SKIP cuda: {e}");
            None
        }
        Err(e) => panic!("{e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_and_buffers_are_send_sync_static() {
        fn check<T: Send + Sync + 'static>() {}
        check::<CudaBackend>();
        check::<CudaBuf>();
        check::<CudaIdx>();
    }
}
