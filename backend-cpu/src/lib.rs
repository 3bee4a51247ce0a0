//! # mae-backend-cpu: the `mae` compute backend on the CPU
//!
//! Buffers are host memory ([`CpuBuf`]: floats on 64-byte boundaries, which the GEMM wants;
//! `Vec<u32>` for indices), and every op runs synchronously. GEMM runs on the crate's own
//! AVX2/FMA kernel on x86-64 (the `gemm` crate elsewhere; see [`gemm_kernel`]); every op, GEMM
//! included, splits its work over one small thread pool ([`pool`]). The thread count comes from
//! `MAE_CPU_THREADS`, else `MATMUL_NUM_THREADS`, else the number of CPUs the process may use;
//! `MAE_CPU_THREADS=1` runs everything on the calling thread. Work is split in fixed pieces that
//! never share an output element, and no sum is split across threads, so results are bitwise
//! the same for any thread count and any scheduling.
//!
//! Attention is fused ([`Backend::fused_attention`] is true): per image and head, blocks of query
//! rows go through `q k^T`, the softmax and `P v` in a small per-thread scratch, straight from
//! and into the qkv layout, and the backward recomputes the probabilities from one saved
//! log-sum-exp per row, so no `[N, H, T, T]` tensor is ever in memory. `MAE_CPU_ATTENTION=composed`
//! makes the model compose attention from `split_heads`, `gemm`, `softmax_*` and `merge_heads`
//! instead (to compare the two; the fused ops stay callable).
//!
//! Numerics, beyond the [`Backend`] contract:
//! - Row reductions (LayerNorm statistics, softmax sums, loss sums) and column sums over many rows
//!   (bias and LayerNorm parameter gradients) accumulate in `f64` in a fixed order, so results are
//!   bitwise repeatable run to run and independent of the GEMM thread count.
//! - GELU, its gradient and the softmax's `exp` are the crate's own branch-free `f32` routines
//!   (eight lanes with AVX2 + FMA, bitwise the same on the scalar fallback), within a few ulp of
//!   the correctly rounded value (measured bounds in `fastmath.rs`), so results do not depend on
//!   the platform's C library either.
//! - The fused attention turns scores into probabilities with `softmax_forward`'s arithmetic
//!   and takes `dS` with `softmax_backward`'s; its backward recomputes the probabilities from the
//!   `f32` log-sum-exp, which moves them by that rounding (~1e-7 relative per unit of
//!   log-sum-exp).
//! - Ops never allocate: only [`Backend::alloc`], [`Backend::upload`] and
//!   [`Backend::upload_idx`] do (and the thread pool and each thread's GEMM packing buffers once,
//!   on first use, the fused attention's per-thread score scratch when a call needs more than any
//!   before, and the fallback GEMM libraries on every product), and they report failure as
//!   [`BackendErrorKind::OutOfMemory`] instead of aborting.
//! - Like every backend, this one trusts `mae` to pass buffers of the documented lengths. A wrong
//!   length can panic (slice bounds) but never causes undefined behaviour: the `unsafe` code (the
//!   GEMM, the AVX2 loads and stores in `fastmath.rs`) asserts its bounds first.
//!
//! ```
//! use mae::backend::{Backend, Gemm};
//! use mae_backend_cpu::CpuBackend;
//!
//! let cpu = CpuBackend::new();
//! // A = [[1, 2, 3], [4, 5, 6]] (2 x 3), B = [[1, 0], [0, 1], [1, 1]] (3 x 2).
//! let a = cpu.upload(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0])?;
//! let b = cpu.upload(&[1.0, 0.0, 0.0, 1.0, 1.0, 1.0])?;
//! let mut c = cpu.alloc(4)?;
//! cpu.gemm(&Gemm::new(2, 2, 3), &a, &b, &mut c)?;
//!
//! let mut host = [0.0f32; 4];
//! cpu.download(&c, &mut host)?;
//! assert_eq!(host, [4.0, 5.0, 10.0, 11.0]);
//! # Ok::<(), mae::BackendError>(())
//! ```
#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]
#![warn(missing_docs)]
// The trait's signatures (llm.c style: buffers, then dimensions) carry many arguments.
#![allow(clippy::too_many_arguments)]

mod activation;
mod adamw;
mod attention;
mod buf;
mod fastmath;
mod gemm;
mod loss;
mod norm;
pub mod pool;
mod reduce;
mod rows;

pub use buf::CpuBuf;
use mae::backend::{
    AdamWStep, AdamWTensor, Attention, BResult, Backend, BackendError, BackendErrorKind, Gather,
    Gemm, Heads, Patchify, RowMap,
};

/// The CPU backend. It holds no state: buffers are owned by the caller and the thread pool
/// is global (started on first use), so the value is free to create, copy and share between
/// threads.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBackend {
    _private: (),
}

impl CpuBackend {
    /// The backend. Creating one is free and cannot fail.
    pub fn new() -> Self {
        CpuBackend { _private: () }
    }
}

/// The single-threaded GEMM kernel every product runs on: `"packed-avx512"` or
/// `"packed-avx2"`, the crate's own (x86-64 with AVX2 and FMA, with AVX-512 register tiles
/// where the CPU has AVX-512F, the same bits either way; it allocates nothing after a thread's
/// first product), else `"gemm"` (the `gemm` crate) or `"matrixmultiply"`, both of which
/// allocate their packing buffers on every call. `MAE_CPU_GEMM=packed-avx2|gemm|matrixmultiply`
/// overrides the choice.
///
/// ```
/// let kernel = mae_backend_cpu::gemm_kernel();
/// assert!(["packed-avx512", "packed-avx2", "gemm", "matrixmultiply"].contains(&kernel));
/// ```
pub fn gemm_kernel() -> &'static str {
    gemm::kernel_name()
}

/// The bytes of `len` elements of `T`, or the contract's error for a buffer past `isize::MAX`
/// bytes (which no allocation can hold).
fn checked_bytes<T>(len: usize) -> BResult<usize> {
    let max = isize::MAX as usize / size_of::<T>();
    if len > max {
        return Err(BackendError::new(
            BackendErrorKind::TooLarge { len, max },
            "a buffer holds at most isize::MAX bytes",
        ));
    }
    Ok(len * size_of::<T>())
}

/// The contract's error for an allocation of `bytes` that failed, instead of an abort.
fn out_of_memory(bytes: usize, e: std::collections::TryReserveError) -> BackendError {
    BackendError::new(BackendErrorKind::OutOfMemory { bytes }, e.to_string())
}

/// An empty `Vec` with room for `len` elements, failing as [`checked_bytes`] and
/// [`out_of_memory`] say.
fn try_vec<T>(len: usize) -> BResult<Vec<T>> {
    let bytes = checked_bytes::<T>(len)?;
    let mut v = Vec::new();
    v.try_reserve_exact(len)
        .map_err(|e| out_of_memory(bytes, e))?;
    Ok(v)
}

/// A copy of `host`, failing like [`try_vec`].
fn try_copy<T: Copy>(host: &[T]) -> BResult<Vec<T>> {
    let mut v = try_vec(host.len())?;
    v.extend_from_slice(host);
    Ok(v)
}

impl Backend for CpuBackend {
    type Buf = CpuBuf;
    type Idx = Vec<u32>;

    fn name(&self) -> &str {
        "cpu"
    }

    fn max_buf_len(&self) -> usize {
        isize::MAX as usize / size_of::<f32>()
    }

    // ---- memory -----------------------------------------------------------------------------

    fn alloc(&self, len: usize) -> BResult<CpuBuf> {
        let bytes = checked_bytes::<f32>(len)?;
        CpuBuf::try_zeroed(len).map_err(|e| out_of_memory(bytes, e))
    }

    fn upload(&self, host: &[f32]) -> BResult<CpuBuf> {
        let mut buf = self.alloc(host.len())?;
        buf.copy_from_slice(host);
        Ok(buf)
    }

    fn write(&self, dst: &mut CpuBuf, host: &[f32]) -> BResult<()> {
        dst.copy_from_slice(host);
        Ok(())
    }

    fn download(&self, src: &CpuBuf, host: &mut [f32]) -> BResult<()> {
        host.copy_from_slice(src);
        Ok(())
    }

    fn len(&self, buf: &CpuBuf) -> usize {
        buf.len()
    }

    fn upload_idx(&self, host: &[u32]) -> BResult<Vec<u32>> {
        try_copy(host)
    }

    fn write_idx(&self, dst: &mut Vec<u32>, host: &[u32]) -> BResult<()> {
        dst.copy_from_slice(host);
        Ok(())
    }

    fn idx_len(&self, idx: &Vec<u32>) -> usize {
        idx.len()
    }

    /// Threaded, like `copy`: the backward zeroes its scratch gradients (about 75 MB a step at
    /// small64), which one thread did while the other waited.
    fn fill(&self, dst: &mut CpuBuf, value: f32) -> BResult<()> {
        pool::chunks1(dst, pool::GRAIN, |_, d| d.fill(value));
        Ok(())
    }

    fn copy(&self, src: &CpuBuf, dst: &mut CpuBuf) -> BResult<()> {
        // The contract's equal lengths, checked as `copy_from_slice` did before the split.
        assert_eq!(
            src.len(),
            dst.len(),
            "copy between buffers of different lengths"
        );
        pool::chunks1(dst, pool::GRAIN, |i, d| {
            d.copy_from_slice(&src[i * pool::GRAIN..i * pool::GRAIN + d.len()]);
        });
        Ok(())
    }

    /// Every op has finished when it returns; there is nothing to wait for.
    fn sync(&self) -> BResult<()> {
        Ok(())
    }

    // ---- dense ------------------------------------------------------------------------------

    fn gemm(&self, g: &Gemm, a: &CpuBuf, b: &CpuBuf, c: &mut CpuBuf) -> BResult<()> {
        gemm::gemm(g, a, (b, Some(&b.packed)), c, None, None);
        Ok(())
    }

    fn gemm_bias(
        &self,
        g: &Gemm,
        a: &CpuBuf,
        b: &CpuBuf,
        bias: &CpuBuf,
        c: &mut CpuBuf,
    ) -> BResult<()> {
        gemm::gemm(g, a, (b, Some(&b.packed)), c, Some(bias), None);
        Ok(())
    }

    fn gemm_bias_gelu(
        &self,
        g: &Gemm,
        a: &CpuBuf,
        b: &CpuBuf,
        bias: &CpuBuf,
        pre: &mut CpuBuf,
        act: &mut CpuBuf,
    ) -> BResult<()> {
        gemm::gemm(g, a, (b, Some(&b.packed)), pre, Some(bias), Some(act));
        Ok(())
    }

    fn add(&self, src: &CpuBuf, dst: &mut CpuBuf) -> BResult<()> {
        let n = dst.len();
        let src = &src[..n];
        pool::chunks1(dst, pool::GRAIN, |i, d| {
            rows::add_into(d, &src[i * pool::GRAIN..]);
        });
        Ok(())
    }

    fn scale(&self, buf: &mut CpuBuf, s: f32) -> BResult<()> {
        pool::chunks1(buf, pool::GRAIN, |_, b| {
            for x in b.iter_mut() {
                *x *= s;
            }
        });
        Ok(())
    }

    fn scale_rows(
        &self,
        src: &CpuBuf,
        scales: &CpuBuf,
        dst: &mut CpuBuf,
        rows_per_scale: usize,
        cols: usize,
        accumulate: bool,
    ) -> BResult<()> {
        let group = rows_per_scale * cols;
        if group == 0 {
            return Ok(());
        }
        pool::chunks1(dst, group, |i, d| {
            let (s, f) = (&src[i * group..(i + 1) * group], scales[i]);
            for (d, s) in d.iter_mut().zip(s) {
                *d = if accumulate { *d + s * f } else { s * f };
            }
        });
        Ok(())
    }

    // ---- rows -------------------------------------------------------------------------------

    fn copy_rows(
        &self,
        src: &CpuBuf,
        dst: &mut CpuBuf,
        map: &RowMap,
        accumulate: bool,
    ) -> BResult<()> {
        rows::copy_rows(src, dst, map, accumulate);
        Ok(())
    }

    fn copy_rows_backward(&self, d_dst: &CpuBuf, d_src: &mut CpuBuf, map: &RowMap) -> BResult<()> {
        rows::copy_rows_backward(d_dst, d_src, map);
        Ok(())
    }

    fn gather_rows(
        &self,
        src: &CpuBuf,
        idx: &Vec<u32>,
        dst: &mut CpuBuf,
        g: &Gather,
    ) -> BResult<()> {
        rows::gather_rows(src, idx, dst, g);
        Ok(())
    }

    fn gather_rows_backward(
        &self,
        d_dst: &CpuBuf,
        idx: &Vec<u32>,
        d_src: &mut CpuBuf,
        g: &Gather,
    ) -> BResult<()> {
        g.check_backward()?;
        rows::gather_rows_backward(d_dst, idx, d_src, g);
        Ok(())
    }

    fn patchify(&self, imgs: &CpuBuf, out: &mut CpuBuf, p: &Patchify) -> BResult<()> {
        rows::patchify(imgs, out, p);
        Ok(())
    }

    fn split_heads(&self, x: &CpuBuf, heads: &mut CpuBuf, h: &Heads) -> BResult<()> {
        rows::split_heads(x, heads, h);
        Ok(())
    }

    fn merge_heads(&self, heads: &CpuBuf, x: &mut CpuBuf, h: &Heads) -> BResult<()> {
        rows::merge_heads(heads, x, h);
        Ok(())
    }

    // ---- normalization and activation -------------------------------------------------------

    fn layernorm_forward(
        &self,
        x: &CpuBuf,
        gamma: &CpuBuf,
        beta: &CpuBuf,
        y: &mut CpuBuf,
        mean: &mut CpuBuf,
        rstd: &mut CpuBuf,
        rows: usize,
        cols: usize,
        eps: f32,
    ) -> BResult<()> {
        norm::layernorm_forward(x, gamma, beta, y, mean, rstd, rows, cols, eps);
        Ok(())
    }

    fn layernorm_backward(
        &self,
        dy: &CpuBuf,
        x: &CpuBuf,
        gamma: &CpuBuf,
        mean: &CpuBuf,
        rstd: &CpuBuf,
        dx: &mut CpuBuf,
        dgamma: &mut CpuBuf,
        dbeta: &mut CpuBuf,
        rows: usize,
        cols: usize,
    ) -> BResult<()> {
        norm::layernorm_backward(dy, x, gamma, mean, rstd, dx, dgamma, dbeta, rows, cols);
        Ok(())
    }

    fn gelu_forward(&self, x: &CpuBuf, y: &mut CpuBuf) -> BResult<()> {
        activation::gelu_forward(x, y);
        Ok(())
    }

    fn bias_gelu_forward(
        &self,
        bias: &CpuBuf,
        pre: &mut CpuBuf,
        act: &mut CpuBuf,
        rows: usize,
        cols: usize,
    ) -> BResult<()> {
        activation::bias_gelu_forward(bias, pre, act, rows, cols);
        Ok(())
    }

    fn gelu_backward(
        &self,
        x: &CpuBuf,
        dy: &CpuBuf,
        dx: &mut CpuBuf,
        accumulate: bool,
    ) -> BResult<()> {
        activation::gelu_backward(x, dy, dx, accumulate);
        Ok(())
    }

    fn softmax_forward(
        &self,
        x: &CpuBuf,
        y: &mut CpuBuf,
        rows: usize,
        cols: usize,
        scale: f32,
    ) -> BResult<()> {
        activation::softmax_forward(x, y, rows, cols, scale);
        Ok(())
    }

    fn softmax_backward(
        &self,
        y: &CpuBuf,
        dy: &CpuBuf,
        dx: &mut CpuBuf,
        rows: usize,
        cols: usize,
        scale: f32,
    ) -> BResult<()> {
        activation::softmax_backward(y, dy, dx, rows, cols, scale);
        Ok(())
    }

    // ---- fused attention --------------------------------------------------------------------

    /// True for every shape unless `MAE_CPU_ATTENTION=composed` (see the crate docs).
    fn fused_attention(&self, a: &Attention) -> bool {
        let _ = a;
        attention::enabled()
    }

    fn attention_forward(
        &self,
        qkv: &CpuBuf,
        out: &mut CpuBuf,
        lse: &mut CpuBuf,
        a: &Attention,
    ) -> BResult<()> {
        attention::forward(qkv, out, lse, a)
    }

    fn attention_backward(
        &self,
        qkv: &CpuBuf,
        out: &CpuBuf,
        lse: &CpuBuf,
        d_out: &CpuBuf,
        d_qkv: &mut CpuBuf,
        a: &Attention,
    ) -> BResult<()> {
        let _ = out; // the backward's row sums come from the recomputed probabilities
        attention::backward(qkv, lse, d_out, d_qkv, a)
    }

    // ---- loss -------------------------------------------------------------------------------

    fn normalize_rows(
        &self,
        x: &CpuBuf,
        y: &mut CpuBuf,
        rows: usize,
        cols: usize,
        eps: f32,
    ) -> BResult<()> {
        norm::normalize_rows(x, y, rows, cols, eps);
        Ok(())
    }

    fn masked_mse_forward(
        &self,
        pred: &CpuBuf,
        target: &CpuBuf,
        mask: &CpuBuf,
        loss: &mut CpuBuf,
        rows: usize,
        cols: usize,
    ) -> BResult<()> {
        loss::masked_mse_forward(pred, target, mask, loss, rows, cols);
        Ok(())
    }

    fn masked_mse_backward(
        &self,
        pred: &CpuBuf,
        target: &CpuBuf,
        mask: &CpuBuf,
        d_pred: &mut CpuBuf,
        rows: usize,
        cols: usize,
        d_loss: f32,
    ) -> BResult<()> {
        loss::masked_mse_backward(pred, target, mask, d_pred, rows, cols, d_loss);
        Ok(())
    }

    // ---- optimizer --------------------------------------------------------------------------

    fn adamw(
        &self,
        param: &mut CpuBuf,
        grad: &CpuBuf,
        m: &mut CpuBuf,
        v: &mut CpuBuf,
        step: &AdamWStep,
    ) -> BResult<()> {
        adamw::adamw(param, grad, m, v, step);
        Ok(())
    }

    /// Each gradient is zeroed chunk by chunk right after its AdamW step has read it, while
    /// the chunk is still in cache, instead of by a second pass over every gradient.
    fn adamw_many<'a>(
        &self,
        tensors: impl Iterator<Item = AdamWTensor<'a, CpuBuf>>,
    ) -> BResult<()> {
        for t in tensors {
            match &t.step {
                Some(step) => adamw::adamw_then_zero_grad(t.param, t.grad, t.m, t.v, step),
                None => self.fill(t.grad, 0.0)?,
            }
        }
        Ok(())
    }
}

/// Helpers shared by the unit tests of every module.
#[cfg(test)]
pub(crate) mod test_util {
    use super::{CpuBackend, CpuBuf};
    use mae::backend::Backend;

    pub(crate) fn be() -> CpuBackend {
        CpuBackend::new()
    }

    /// A buffer holding `host`, made through the backend.
    pub(crate) fn up(host: &[f32]) -> CpuBuf {
        be().upload(host).unwrap()
    }

    pub(crate) fn f64s(x: &[f32]) -> Vec<f64> {
        x.iter().map(|&v| v as f64).collect()
    }

    pub(crate) fn f32s(x: &[f64]) -> Vec<f32> {
        x.iter().map(|&v| v as f32).collect()
    }

    /// `|got - want| <= tol * max(1, |want|)` elementwise, with the first offender in the message.
    #[track_caller]
    pub(crate) fn assert_close(got: &[f32], want: &[f32], tol: f64) {
        assert_eq!(got.len(), want.len(), "lengths differ");
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            let err = (g as f64 - w as f64).abs();
            assert!(
                err <= tol * (w as f64).abs().max(1.0),
                "element {i}: got {g}, want {w} (error {err:e}, tolerance {tol:e})\n got: {got:?}\nwant: {want:?}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_util::*;
    use super::CpuBackend;
    use mae::backend::{Backend, BackendErrorKind};

    #[test]
    fn name_and_limits() {
        let be = CpuBackend::default();
        assert_eq!(be.name(), "cpu");
        assert_eq!(be.max_buf_len(), isize::MAX as usize / 4);
    }

    #[test]
    fn alloc_is_zero_filled_and_sized() {
        let be = be();
        let buf = be.alloc(5).unwrap();
        assert_eq!(be.len(&buf), 5);
        assert_eq!(buf, [0.0; 5]);
        assert_eq!(be.alloc(0).unwrap().len(), 0);
    }

    #[test]
    fn alloc_too_large_is_an_error_not_an_abort() {
        let be = be();
        let err = be.alloc(usize::MAX).unwrap_err();
        assert!(
            matches!(
                err.kind,
                BackendErrorKind::TooLarge {
                    len: usize::MAX,
                    ..
                }
            ),
            "{err}"
        );
        // Within the Vec limit but far beyond any machine's memory.
        let err = be.alloc(be.max_buf_len()).unwrap_err();
        assert!(
            matches!(err.kind, BackendErrorKind::OutOfMemory { .. }),
            "{err}"
        );
    }

    #[test]
    fn upload_write_download_round_trip() {
        let be = be();
        let mut buf = be.upload(&[1.0, 2.0, 3.0]).unwrap();
        let mut host = [0.0; 3];
        be.download(&buf, &mut host).unwrap();
        assert_eq!(host, [1.0, 2.0, 3.0]);
        be.write(&mut buf, &[4.0, 5.0, 6.0]).unwrap();
        be.download(&buf, &mut host).unwrap();
        assert_eq!(host, [4.0, 5.0, 6.0]);
        be.sync().unwrap();
    }

    #[test]
    fn index_buffers_round_trip() {
        let be = be();
        let mut idx = be.upload_idx(&[3, 1, 2]).unwrap();
        assert_eq!(be.idx_len(&idx), 3);
        be.write_idx(&mut idx, &[0, 7, 9]).unwrap();
        assert_eq!(idx, [0, 7, 9]);
    }

    #[test]
    fn fill_and_copy_overwrite() {
        let be = be();
        let mut a = up(&[1.0, 2.0]);
        be.fill(&mut a, f32::NAN).unwrap();
        assert!(a.iter().all(|x| x.is_nan()));
        be.copy(&up(&[7.0, 8.0]), &mut a).unwrap();
        assert_eq!(a, [7.0, 8.0]);
    }

    #[test]
    fn add_accumulates_over_dst_length() {
        let be = be();
        let mut dst = up(&[1.0, 2.0]);
        let src = up(&[10.0, 20.0, 30.0]);
        be.add(&src, &mut dst).unwrap();
        be.add(&src, &mut dst).unwrap();
        assert_eq!(dst, [21.0, 42.0]);
    }

    #[test]
    fn scale_multiplies_in_place() {
        let be = be();
        let mut buf = up(&[1.0, -2.0, 0.5]);
        be.scale(&mut buf, -2.0).unwrap();
        assert_eq!(buf, [-2.0, 4.0, -1.0]);
    }

    #[test]
    fn backend_is_send_sync_copy() {
        fn check<T: Send + Sync + Copy + 'static>() {}
        check::<CpuBackend>();
    }
}
