//! `impl Backend for CudaBackend`: argument checks and launches. The arithmetic lives in the
//! kernels (`kernels/*.cu`) and cuBLAS; the semantics of each op are the trait's
//! (`mae::backend`), with the CPU backend as the reference implementation.

use crate::backend::{need, u, AttentionPath, CudaBackend, Precision};
use crate::bf16::{Inputs, ProducedCopy};
use crate::buffer::{addr, CudaBuf, CudaIdx};
use crate::error;
use crate::gemm::column_major;
use crate::kernels::{Arg, Kernel};
use crate::launch::{
    attention, attention_mma, attention_mma_split, column_chunks, elementwise,
    layernorm_backward_blocks, layernorm_rows, per_row, per_warp, single_block,
    ATTENTION_MAX_HEAD_DIM, ATTENTION_MMA_PREFETCH, ATTENTION_MMA_ROWS, ATTENTION_MMA_SPLIT,
    LAYERNORM_FUSED_COLS,
};
use crate::profile::Work;
use crate::readers::max_readers;
use cudarc::cublas::sys::{
    cublasComputeType_t, cublasGemmAlgo_t, cublasGemmStridedBatchedEx, cublasOperation_t,
    cublasSgemmStridedBatched, cublasStatus_t, cudaDataType,
};
use mae::backend::{
    AdamWStep, Attention, BResult, Backend, BackendError, BackendErrorKind, Gather, Gemm, Heads,
    PatchOrder, Patchify, RowMap,
};
use std::ffi::c_void;

/// Elements an operand of a batched GEMM spans: `(batch - 1) * stride + rows * cols`, checked.
fn span(batch: usize, stride: usize, rows: usize, cols: usize) -> Option<usize> {
    (batch - 1)
        .checked_mul(stride)?
        .checked_add(rows.checked_mul(cols)?)
}

/// The elements `g`'s A and B span, having checked that A, B and C hold their spans.
pub(crate) fn gemm_lens(
    g: &Gemm,
    a: &CudaBuf,
    b: &CudaBuf,
    c: &CudaBuf,
) -> BResult<(usize, usize)> {
    let a_len = span(g.batch, g.stride_a, g.m, g.k);
    let b_len = span(g.batch, g.stride_b, g.k, g.n);
    gemm_need(a, a_len, g, "A")?;
    gemm_need(b, b_len, g, "B")?;
    gemm_need(c, span(g.batch, g.stride_c, g.m, g.n), g, "C")?;
    // Checked by gemm_need: both spans exist.
    Ok((a_len.unwrap_or(0), b_len.unwrap_or(0)))
}

fn gemm_need(buf: &CudaBuf, need: Option<usize>, g: &Gemm, what: &str) -> BResult<()> {
    match need {
        Some(n) if buf.len() >= n => Ok(()),
        _ => Err(error::device(format!(
            "bug: gemm: {what} holds {} floats, {g:?} needs {need:?}",
            buf.len()
        ))),
    }
}

fn same_len(a: usize, b: usize, op: &str) -> BResult<()> {
    if a == b {
        Ok(())
    } else {
        Err(error::device(format!(
            "bug: {op}: the device buffer holds {a} elements, the host slice {b}"
        )))
    }
}

fn scale_rows_lengths(
    src: &CudaBuf,
    scales: &CudaBuf,
    dst: &CudaBuf,
    rows_per_scale: usize,
    cols: usize,
) -> BackendError {
    error::device(format!(
        "bug: scale_rows: src holds {} floats and dst {}, but {} scales x {rows_per_scale} \
         rows x {cols} columns need both to hold the product",
        src.len(),
        dst.len(),
        scales.len()
    ))
}

fn op(kind: BackendErrorKind, message: String) -> BackendError {
    BackendError::new(kind, message)
}

impl CudaBackend {
    /// The GELU kernel of this precision: f64 internally in [`Precision::F32`], as the CPU
    /// reference computes it; f32 (`elementwise.cu`, `erfc_nonneg`: within 2e-6 of the value
    /// where it matters) in the reduced modes.
    fn gelu_kernel(&self, f64_kernel: Kernel) -> Kernel {
        if self.precision() == Precision::F32 {
            return f64_kernel;
        }
        match f64_kernel {
            Kernel::GeluForward => Kernel::GeluForwardF32,
            Kernel::BiasGeluForward => Kernel::BiasGeluForwardF32,
            Kernel::GeluBackward => Kernel::GeluBackwardF32,
            other => other,
        }
    }

    fn stream_error(
        &self,
        e: cudarc::driver::DriverError,
        what: &str,
        bytes: usize,
    ) -> BackendError {
        error::driver(e, what, bytes)
    }

    /// Waits for the stream, then reports errors cudarc recorded where it could not return
    /// them (frees in `Drop`).
    fn wait(&self) -> BResult<()> {
        self.stream
            .synchronize()
            .map_err(|e| self.stream_error(e, "waiting for queued work", 0))?;
        self.ctx
            .check_err()
            .map_err(|e| self.stream_error(e, "a deferred CUDA error", 0))
    }
}

impl Backend for CudaBackend {
    type Buf = CudaBuf;
    type Idx = CudaIdx;

    fn name(&self) -> &str {
        self.precision().backend_name()
    }

    fn max_buf_len(&self) -> usize {
        self.max_len
    }

    // ---- memory -----------------------------------------------------------------------------

    /// The bf16 mode's producers may keep such a buffer's contents in its bf16 copy alone
    /// (`bf16.rs`); in that mode its floats are allocated only when an op needs them.
    fn alloc_operand(&self, len: usize) -> BResult<CudaBuf> {
        let mut buf = if self.produces_copies() {
            CudaBuf::lazy(len, self.operand_floats.clone())
        } else {
            self.alloc(len)?
        };
        buf.operand = true;
        Ok(buf)
    }

    fn alloc(&self, len: usize) -> BResult<CudaBuf> {
        if len == 0 {
            return Ok(CudaBuf::new(None));
        }
        let bytes = error::bytes_of::<f32>(len)?;
        let slice = self
            .stream
            .alloc_zeros::<f32>(len)
            .map_err(|e| self.stream_error(e, &format!("allocating {len} floats"), bytes))?;
        Ok(CudaBuf::new(Some(slice)))
    }

    fn upload(&self, host: &[f32]) -> BResult<CudaBuf> {
        if host.is_empty() {
            return Ok(CudaBuf::new(None));
        }
        let bytes = error::bytes_of::<f32>(host.len())?;
        let slice = self.stream.clone_htod(host).map_err(|e| {
            self.stream_error(e, &format!("uploading {} floats", host.len()), bytes)
        })?;
        Ok(CudaBuf::new(Some(slice)))
    }

    /// Rewrites go through pinned staging (`upload.rs`): the copy is queued without waiting for
    /// the GPU.
    fn write(&self, dst: &mut CudaBuf, host: &[f32]) -> BResult<()> {
        same_len(dst.len(), host.len(), "write")?;
        let (slice, staging) = dst.floats_and_staging(&self.stream)?;
        let Some(slice) = slice else {
            return Ok(());
        };
        self.write_host(staging, host, slice, "floats")
    }

    fn download(&self, src: &CudaBuf, host: &mut [f32]) -> BResult<()> {
        same_len(src.len(), host.len(), "download")?;
        self.floats_current(src)?;
        if let Some(slice) = src.floats(&self.stream)? {
            self.stream.memcpy_dtoh(slice, host).map_err(|e| {
                self.stream_error(e, &format!("downloading {} floats", host.len()), 0)
            })?;
        }
        self.wait()
    }

    fn len(&self, buf: &CudaBuf) -> usize {
        buf.len()
    }

    fn upload_idx(&self, host: &[u32]) -> BResult<CudaIdx> {
        if host.is_empty() {
            return Ok(CudaIdx::new(None));
        }
        let bytes = error::bytes_of::<u32>(host.len())?;
        let slice = self.stream.clone_htod(host).map_err(|e| {
            self.stream_error(e, &format!("uploading {} indices", host.len()), bytes)
        })?;
        Ok(CudaIdx::new(Some(slice)))
    }

    fn write_idx(&self, dst: &mut CudaIdx, host: &[u32]) -> BResult<()> {
        same_len(dst.len(), host.len(), "write_idx")?;
        let Some(slice) = dst.slice.as_mut() else {
            return Ok(());
        };
        self.write_host(&mut dst.staging, host, slice, "indices")
    }

    fn idx_len(&self, idx: &CudaIdx) -> usize {
        idx.len()
    }

    fn fill(&self, dst: &mut CudaBuf, value: f32) -> BResult<()> {
        let n = dst.len();
        let args = [self.ptr_out(dst)?, u(n), Arg::F32(value)];
        self.launch(Kernel::Fill, elementwise(n as u64), &args)
    }

    fn copy(&self, src: &CudaBuf, dst: &mut CudaBuf) -> BResult<()> {
        same_len(dst.len(), src.len(), "copy")?;
        self.floats_current(src)?;
        let (Some(s), Some(d)) = (src.floats(&self.stream)?, dst.floats_mut(&self.stream)?) else {
            return Ok(());
        };
        self.stream
            .memcpy_dtod(s, d)
            .map_err(|e| self.stream_error(e, &format!("copying {} floats", s.len()), 0))
    }

    fn sync(&self) -> BResult<()> {
        self.wait()
    }

    // ---- dense ------------------------------------------------------------------------------

    fn gemm(&self, g: &Gemm, a: &CudaBuf, b: &CudaBuf, c: &mut CudaBuf) -> BResult<()> {
        if g.batch == 0 || g.m == 0 || g.n == 0 {
            return Ok(()); // C has no elements.
        }
        let (a_len, b_len) = gemm_lens(g, a, b, c)?;
        // Where products are tuned (`MAE_CUDA_GEMM_TUNE`), on cuBLASLt, whose algorithms can be
        // chosen.
        if self.gemm_lt(g, a, b, c)? {
            return Ok(());
        }
        let cm = column_major(g);
        let fit = |v: usize, what: &str| error::fit_i32(v, &format!("gemm {what} of {g:?}"));
        let (m, n, k) = (fit(cm.m, "n")?, fit(cm.n, "m")?, fit(cm.k, "k")?);
        let (ld1, ld2, ldc) = (
            fit(cm.ld_first, "ldb")?,
            fit(cm.ld_second, "lda")?,
            fit(cm.ldc, "ldc")?,
        );
        let batch = fit(cm.batch, "batch")?;
        // Strides are element counts below the buffers' lengths (checked above), which fit i64.
        let stride = |s: usize| s as i64;
        let op = |t: bool| {
            if t {
                cublasOperation_t::CUBLAS_OP_T
            } else {
                cublasOperation_t::CUBLAS_OP_N
            }
        };
        // C's floats are read where beta is not 0: up to date before any copy is locked.
        if g.beta != 0.0 {
            self.floats_current(c)?;
        }
        // The bf16 mode multiplies bf16 copies of the operands where they pay (bf16.rs); the
        // copies stay locked until the GEMM reading them is queued.
        let mut copies = None;
        let copied = self.precision() == Precision::Bf16 && self.bf16_gemm.copies(g, a_len, b_len);
        let (pa, pb, operand_type, compute) = if copied {
            let [pa, pb] = copies
                .insert(self.bf16_operands((a, a_len), (b, b_len))?)
                .addrs;
            let exact = cublasComputeType_t::CUBLAS_COMPUTE_32F;
            (pa, pb, cudaDataType::CUDA_R_16BF, Some(exact))
        } else {
            let pa = self.read_addr(a)?;
            let pb = self.read_addr(b)?;
            let compute = self.precision().compute_type();
            (pa, pb, cudaDataType::CUDA_R_32F, compute)
        };
        c.renew();
        // A product into a buffer from `alloc_operand` may write C as its bf16 copy alone; C's
        // floats are then not touched (not even allocated) unless cuBLAS refuses that (below).
        let mut out16 = if self.gemm_out16(g, copied, c) {
            self.produced_copy(c)?
        } else {
            None
        };
        let pc = match out16 {
            Some(_) => 0,
            None => c.addr(&self.stream)?,
        };
        let blas = self
            .blas
            .lock()
            .map_err(|_| error::device("the cuBLAS handle's lock is poisoned"))?;
        self.ctx
            .bind_to_thread()
            .map_err(|e| self.stream_error(e, "binding the CUDA context", 0))?;
        let timer = self.profile.as_ref().map(|p| p.start(&self.stream));
        let (call, status) = match compute {
            // SAFETY: the handle is live and bound to this backend's stream; the pointers are
            // device addresses of live buffers (or null for an empty A or B, which cuBLAS does
            // not read: k == 0, since m, n >= 1 and the lengths were checked). The
            // column-major call reads `first` (our B) over (batch - 1) * stride_b + k * n
            // elements, `second` (our A) over (batch - 1) * stride_a + m * k and writes C over
            // (batch - 1) * stride_c + m * n, all within the lengths checked above. alpha and
            // beta are host values (the handle's default pointer mode) that live through the
            // call.
            None => ("cublasSgemmStridedBatched", unsafe {
                cublasSgemmStridedBatched(
                    *blas.handle(),
                    op(cm.trans_first),
                    op(cm.trans_second),
                    m,
                    n,
                    k,
                    &g.alpha,
                    pb as *const f32,
                    ld1,
                    stride(cm.stride_first),
                    pa as *const f32,
                    ld2,
                    stride(cm.stride_second),
                    &g.beta,
                    pc as *mut f32,
                    ldc,
                    stride(cm.stride_c),
                    batch,
                )
            }),
            Some(compute) => {
                // SAFETY: as above, where A and B are either the f32 buffers (CUDA_R_32F) or
                // their bf16 copies (CUDA_R_16BF), which hold at least the same number of
                // elements (a_len and b_len, written by `round_to_bf16` earlier on this stream
                // and locked in their buffers until this call is queued); C is f32, or C's bf16
                // copy (`out16`: room for all of C, which is exactly m x n, one matrix, beta 0
                // so not read; locked in C until this call is queued), and alpha and beta are
                // f32 as the f32 compute types require.
                let ex = |pc: u64, ctype: cudaDataType| unsafe {
                    cublasGemmStridedBatchedEx(
                        *blas.handle(),
                        op(cm.trans_first),
                        op(cm.trans_second),
                        m,
                        n,
                        k,
                        (&g.alpha as *const f32).cast(),
                        pb as *const c_void,
                        operand_type,
                        ld1,
                        stride(cm.stride_first),
                        pa as *const c_void,
                        operand_type,
                        ld2,
                        stride(cm.stride_second),
                        (&g.beta as *const f32).cast(),
                        pc as *mut c_void,
                        ctype,
                        ldc,
                        stride(cm.stride_c),
                        batch,
                        compute,
                        cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                    )
                };
                let mut status = cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED;
                if let Some(copy) = out16.as_mut() {
                    copy.alone();
                    status = ex(copy.addr(), cudaDataType::CUDA_R_16BF);
                }
                // Where cuBLAS has no bf16 C for it, the f32 C (the copy stays unrecorded).
                if status == cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED {
                    let pc = match out16.take() {
                        Some(_) => c.addr(&self.stream)?,
                        None => pc,
                    };
                    status = ex(pc, cudaDataType::CUDA_R_32F);
                }
                ("cublasGemmStridedBatchedEx", status)
            }
        };
        drop(copies);
        status
            .result()
            .map_err(|e| error::cublas(e, &format!("{call} for {g:?} ({:?})", self.precision())))?;
        let wrote16 = out16.is_some();
        if let Some(copy) = out16 {
            copy.written(c.contents(), g.m * g.n);
        }
        if let (Some(p), Some(t)) = (&self.profile, timer) {
            let (ta, tb) = (
                if g.trans_a { "T" } else { "N" },
                if g.trans_b { "T" } else { "N" },
            );
            let copies = if copied { " bf16 copies" } else { "" };
            let out = if wrote16 { " bf16 out" } else { "" };
            let label = format!(
                "gemm {}x{}x{} {ta}{tb} x{}{copies}{out}",
                g.m, g.n, g.k, g.batch
            );
            p.end(&self.stream, t, label, crate::gemm::work(g));
        }
        Ok(())
    }

    /// The bias in cuBLASLt's epilogue where it can (`lt.rs`), else `gemm` then `copy_rows`.
    /// cuBLASLt's kernels need not sum the products in `gemm`'s order: its result is the same
    /// product within the GEMM tolerance, not always bitwise the composed ops'.
    fn gemm_bias(
        &self,
        g: &Gemm,
        a: &CudaBuf,
        b: &CudaBuf,
        bias: &CudaBuf,
        c: &mut CudaBuf,
    ) -> BResult<()> {
        if self.gemm_bias_lt(g, a, b, bias, None, c)? {
            return Ok(());
        }
        self.gemm(g, a, b, c)?;
        self.copy_rows(bias, c, &RowMap::bias(g.m, g.n), true)
    }

    /// cuBLASLt's bias-gradient epilogue in bf16 (`lt.rs`); the default elsewhere.
    fn gemm_bias_grad(
        &self,
        g: &Gemm,
        a: &CudaBuf,
        b: &CudaBuf,
        c: &mut CudaBuf,
        db: &mut CudaBuf,
    ) -> BResult<()> {
        if self.gemm_bias_grad_lt(g, a, b, c, db)? {
            return Ok(());
        }
        self.gemm(g, a, b, c)?;
        self.copy_rows_backward(a, db, &RowMap::bias(g.k, g.m))
    }

    /// cuBLASLt with `base` as C and `c` as D (one pass over the residual stream where the
    /// default copies it first); the default where cuBLASLt does not take the product.
    fn gemm_bias_onto(
        &self,
        g: &Gemm,
        a: &CudaBuf,
        b: &CudaBuf,
        bias: &CudaBuf,
        base: &CudaBuf,
        c: &mut CudaBuf,
    ) -> BResult<()> {
        if self.gemm_bias_lt(g, a, b, bias, Some(base), c)? {
            return Ok(());
        }
        self.copy(base, c)?;
        self.gemm_bias(g, a, b, bias, c)
    }

    /// [`Backend::gemm_bias`] into `pre` (cuBLASLt's epilogue where it can), then the GELU of
    /// `gelu_forward`, which `bias_gelu_forward` applies too; else the composed default.
    fn gemm_bias_gelu(
        &self,
        g: &Gemm,
        a: &CudaBuf,
        b: &CudaBuf,
        bias: &CudaBuf,
        pre: &mut CudaBuf,
        act: &mut CudaBuf,
    ) -> BResult<()> {
        // gelu_forward writes all of act, which the trait makes exactly m x n.
        if Some(act.len()) != g.m.checked_mul(g.n) {
            return Err(error::device(format!(
                "bug: gemm_bias_gelu: act holds {} floats, {g:?} writes m x n",
                act.len()
            )));
        }
        if self.gemm_bias_lt(g, a, b, bias, None, pre)? {
            return self.gelu_forward(pre, act);
        }
        self.gemm(g, a, b, pre)?;
        self.bias_gelu_forward(bias, pre, act, g.m, g.n)
    }

    fn add(&self, src: &CudaBuf, dst: &mut CudaBuf) -> BResult<()> {
        let n = dst.len();
        need(src, n, "add", "src")?;
        let args = [self.ptr(src)?, self.ptr_mut(dst)?, u(n)];
        self.launch(Kernel::Add, elementwise(n as u64), &args)
    }

    fn scale(&self, buf: &mut CudaBuf, s: f32) -> BResult<()> {
        let n = buf.len();
        let args = [self.ptr_mut(buf)?, u(n), Arg::F32(s)];
        self.launch(Kernel::Scale, elementwise(n as u64), &args)
    }

    /// The lengths must be exactly `scales.len() * rows_per_scale * cols`: the `mae` caller
    /// guarantees it, and a mismatch is refused here rather than read or written past the end.
    fn scale_rows(
        &self,
        src: &CudaBuf,
        scales: &CudaBuf,
        dst: &mut CudaBuf,
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
        let args = [
            self.ptr(src)?,
            self.ptr(scales)?,
            self.ptr_mut(dst)?,
            u(n),
            u(group),
            Arg::U32(accumulate as u32),
        ];
        self.launch(Kernel::ScaleRows, elementwise(n as u64), &args)
    }

    // ---- rows -------------------------------------------------------------------------------

    fn copy_rows(
        &self,
        src: &CudaBuf,
        dst: &mut CudaBuf,
        map: &RowMap,
        accumulate: bool,
    ) -> BResult<()> {
        let n = map.batch * map.count * map.cols;
        if n == 0 {
            return Ok(());
        }
        let (ls, ld) = map.lens();
        need(src, ls, "copy_rows", "src")?;
        need(dst, ld, "copy_rows", "dst")?;
        let args = [
            self.ptr(src)?,
            self.ptr_mut(dst)?,
            u(map.batch),
            u(map.count),
            u(map.cols),
            u(map.src_stride),
            u(map.src_start),
            u(map.src_step),
            u(map.dst_stride),
            u(map.dst_start),
            Arg::U32(accumulate as u32),
        ];
        self.launch(Kernel::CopyRows, elementwise(n as u64), &args)
    }

    /// Two passes, no atomics: each source row's readers are summed in chunks ([`column_chunks`])
    /// in f64 (pass 1, in parallel over chunks, rows and columns), then the chunks (pass 2),
    /// added to `d_src` with one rounding; every order depends only on the map, so results
    /// repeat bitwise. A bias map (every row of `d_dst` reads the one source row) takes plain
    /// column sums (`column_sum_partials`, `column_sum_finish`), without the general map's index
    /// arithmetic per element.
    fn copy_rows_backward(
        &self,
        d_dst: &CudaBuf,
        d_src: &mut CudaBuf,
        map: &RowMap,
    ) -> BResult<()> {
        if map.src_step > 1 {
            return Err(op(
                BackendErrorKind::Unsupported,
                format!(
                    "copy_rows_backward with src_step {} (the trait allows 0 or 1)",
                    map.src_step
                ),
            ));
        }
        if map.batch * map.count * map.cols == 0 {
            return Ok(());
        }
        let (ls, ld) = map.lens();
        need(d_dst, ld, "copy_rows_backward", "d_dst")?;
        need(d_src, ls, "copy_rows_backward", "d_src")?;
        let src_rows = ls / map.cols;
        let (chunk_count, chunk_len) =
            column_chunks(max_readers(map) as u64, (src_rows * map.cols) as u64);
        let partial_len = chunk_count as usize * src_rows * map.cols;
        let mut partial = self.scratch(partial_len)?;
        if is_bias(map) {
            // Row b of d_dst (b < batch) is the bias's b-th reader: plain column sums, of the
            // bf16 copy where that alone holds d_dst (the MLP's GELU gradient in bf16).
            let alone = self.copy_alone(d_dst, ld)?;
            let (kernel, source) = match &alone {
                Some(copy) => (Kernel::ColumnSumPartialsBf16, Arg::Ptr(copy.addr)),
                None => (Kernel::ColumnSumPartials, self.ptr(d_dst)?),
            };
            let args = [
                source,
                self.scratch_ptr(&mut partial),
                u(map.dst_start),
                u(map.batch),
                u(map.cols),
                Arg::U64(chunk_count),
                Arg::U64(chunk_len),
            ];
            self.launch(kernel, elementwise(partial_len as u64), &args)?;
            drop(alone);
            let args = [
                self.scratch_ptr(&mut partial),
                self.ptr_mut(d_src)?,
                Arg::U64(chunk_count),
                u(map.cols),
            ];
            return self.launch(Kernel::ColumnSumFinish, per_warp(map.cols as u64), &args);
        }
        let map_args = [
            u(map.batch),
            u(map.count),
            u(map.cols),
            u(map.src_stride),
            u(map.src_start),
            u(map.src_step),
            u(map.dst_stride),
            u(map.dst_start),
            u(src_rows),
        ];
        let mut args = vec![self.ptr(d_dst)?, self.scratch_ptr(&mut partial)];
        args.extend_from_slice(&map_args);
        args.extend([Arg::U64(chunk_count), Arg::U64(chunk_len)]);
        self.launch(
            Kernel::CopyRowsBackwardPartials,
            elementwise(partial_len as u64),
            &args,
        )?;
        let mut args = vec![self.scratch_ptr(&mut partial), self.ptr_mut(d_src)?];
        args.extend_from_slice(&map_args);
        args.push(Arg::U64(chunk_len));
        self.launch(
            Kernel::CopyRowsBackwardFinish,
            elementwise((src_rows * map.cols) as u64),
            &args,
        )
    }

    fn gather_rows(
        &self,
        src: &CudaBuf,
        idx: &CudaIdx,
        dst: &mut CudaBuf,
        g: &Gather,
    ) -> BResult<()> {
        let (ls, _, ld) = g.lens();
        let op = ("gather_rows", "src", "dst");
        self.gather(Kernel::GatherRows, op, (src, ls), idx, (dst, ld), g)
    }

    fn gather_rows_backward(
        &self,
        d_dst: &CudaBuf,
        idx: &CudaIdx,
        d_src: &mut CudaBuf,
        g: &Gather,
    ) -> BResult<()> {
        g.check_backward()?;
        let (ls, _, ld) = g.lens();
        let op = ("gather_rows_backward", "d_dst", "d_src");
        self.gather(
            Kernel::GatherRowsBackward,
            op,
            (d_dst, ld),
            idx,
            (d_src, ls),
            g,
        )
    }

    fn patchify(&self, imgs: &CudaBuf, out: &mut CudaBuf, p: &Patchify) -> BResult<()> {
        if p.patch == 0 {
            return Ok(());
        }
        let (n_in, _) = p.lens();
        let n_out = p.batch * p.num_patches() * p.patch * p.patch * p.channels;
        need(imgs, n_in, "patchify", "imgs")?;
        need(out, n_out, "patchify", "out")?;
        let args = [
            self.ptr(imgs)?,
            self.ptr_mut(out)?,
            u(p.batch),
            u(p.channels),
            u(p.height),
            u(p.width),
            u(p.patch),
            Arg::U32((p.order == PatchOrder::Hwc) as u32),
        ];
        // Four pixels a thread where patches and rows are whole float4s (`patchify_fours`).
        let per_thread = if p.patch % 4 == 0 && p.width % 4 == 0 {
            4
        } else {
            1
        };
        let threads = (n_out / per_thread) as u64;
        self.launch(Kernel::Patchify, elementwise(threads), &args)
    }

    fn split_heads(&self, x: &CudaBuf, heads: &mut CudaBuf, h: &Heads) -> BResult<()> {
        let (lx, lh) = h.lens();
        need(x, lx, "split_heads", "x")?;
        need(heads, lh, "split_heads", "heads")?;
        let args = [self.ptr(x)?, self.ptr_mut(heads)?];
        self.heads(Kernel::SplitHeads, args, h, lh)
    }

    fn merge_heads(&self, heads: &CudaBuf, x: &mut CudaBuf, h: &Heads) -> BResult<()> {
        let (lx, lh) = h.lens();
        need(x, lx, "merge_heads", "x")?;
        need(heads, lh, "merge_heads", "heads")?;
        let args = [self.ptr(heads)?, self.ptr_mut(x)?];
        self.heads(Kernel::MergeHeads, args, h, lh)
    }

    // ---- normalization and activation -------------------------------------------------------

    fn layernorm_forward(
        &self,
        x: &CudaBuf,
        gamma: &CudaBuf,
        beta: &CudaBuf,
        y: &mut CudaBuf,
        mean: &mut CudaBuf,
        rstd: &mut CudaBuf,
        rows: usize,
        cols: usize,
        eps: f32,
    ) -> BResult<()> {
        let o = "layernorm_forward";
        need(x, rows * cols, o, "x")?;
        need(y, rows * cols, o, "y")?;
        need(gamma, cols, o, "gamma")?;
        need(beta, cols, o, "beta")?;
        need(mean, rows, o, "mean")?;
        need(rstd, rows, o, "rstd")?;
        // In the bf16 mode the kernel also writes y's bf16 copy: y is the input of a Linear; a
        // `y` from `alloc_operand` that the kernel fills gets the copy alone. Inputs first, as
        // in `gelu_forward`.
        let (x_ptr, gamma_ptr, beta_ptr) = (self.ptr(x)?, self.ptr(gamma)?, self.ptr(beta)?);
        let (mean_ptr, rstd_ptr) = (self.ptr_mut(mean)?, self.ptr_mut(rstd)?);
        let whole = y.len() == rows * cols;
        let y_ptr = if whole {
            y.renew();
            None
        } else {
            Some(self.ptr_mut(y)?)
        };
        let mut copy = self.produced_copy(y)?;
        let y_ptr = match y_ptr {
            Some(p) => p,
            None => self.overwritten_floats(&mut copy, y)?,
        };
        let args = [
            x_ptr,
            gamma_ptr,
            beta_ptr,
            y_ptr,
            ProducedCopy::arg(&copy),
            mean_ptr,
            rstd_ptr,
            u(rows),
            u(cols),
            Arg::F32(eps),
        ];
        self.launch(
            Kernel::LayerNormForward,
            layernorm_rows(rows as u64, cols as u64),
            &args,
        )?;
        if let Some(copy) = copy {
            copy.written(y.contents(), rows * cols);
        }
        Ok(())
    }

    /// `dx` one block per row; `dgamma` and `dbeta` as column sums in two passes (chunks of
    /// [`column_chunks`] rows in f64, then the chunks, a warp per column), no atomics.
    fn layernorm_backward(
        &self,
        dy: &CudaBuf,
        x: &CudaBuf,
        gamma: &CudaBuf,
        mean: &CudaBuf,
        rstd: &CudaBuf,
        dx: &mut CudaBuf,
        dgamma: &mut CudaBuf,
        dbeta: &mut CudaBuf,
        rows: usize,
        cols: usize,
    ) -> BResult<()> {
        if rows == 0 || cols == 0 {
            return Ok(());
        }
        let o = "layernorm_backward";
        need(dy, rows * cols, o, "dy")?;
        need(x, rows * cols, o, "x")?;
        need(dx, rows * cols, o, "dx")?;
        need(gamma, cols, o, "gamma")?;
        need(dgamma, cols, o, "dgamma")?;
        need(dbeta, cols, o, "dbeta")?;
        need(mean, rows, o, "mean")?;
        need(rstd, rows, o, "rstd")?;
        // In the bf16 mode the kernel also writes dx's bf16 copy: dx is the residual stream's
        // gradient, dY of the Linear layers (proj, fc2) that write into the stream. For rows of
        // up to LN_FUSED_COLS it also sums dgamma's and dbeta's partials per block while it holds
        // each row (pass 1 of the column sums); wider rows take a pass of their own for them.
        let fused = self.layernorm_fused && cols as u64 <= LAYERNORM_FUSED_COLS;
        let (grid, chunks) = if fused {
            let blocks = layernorm_backward_blocks(rows as u64, self.multiprocessors);
            (per_row(blocks, cols as u64), blocks)
        } else {
            (
                per_row(rows as u64, cols as u64),
                column_chunks(rows as u64, cols as u64).0,
            )
        };
        let partial_len = chunks as usize * cols;
        let (mut pg, mut pb) = (self.scratch(partial_len)?, self.scratch(partial_len)?);
        // dy first (its copy's lock, where it alone holds the values: the bf16 mode's input
        // gradient of qkv and fc1), then dx's copy, locked until the launch.
        let inputs = self.inputs([(dy, rows * cols)])?;
        let [dy_args] = inputs.args;
        let dx_ptr = self.ptr_mut(dx)?;
        let copy = self.produced_copy(dx)?;
        let partials = match fused {
            true => [self.scratch_ptr(&mut pg), self.scratch_ptr(&mut pb)],
            false => [Arg::Ptr(0), Arg::Ptr(0)],
        };
        let args = [
            dy_args[0],
            dy_args[1],
            self.ptr(x)?,
            self.ptr(gamma)?,
            self.ptr(mean)?,
            self.ptr(rstd)?,
            dx_ptr,
            ProducedCopy::arg(&copy),
            partials[0],
            partials[1],
            u(rows),
            u(cols),
        ];
        self.launch(Kernel::LayerNormBackwardDx, grid, &args)?;
        if let Some(copy) = copy {
            copy.written(dx.contents(), rows * cols);
        }
        if !fused {
            let chunk_len = column_chunks(rows as u64, cols as u64).1;
            let args = [
                dy_args[0],
                dy_args[1],
                self.ptr(x)?,
                self.ptr(mean)?,
                self.ptr(rstd)?,
                self.scratch_ptr(&mut pg),
                self.scratch_ptr(&mut pb),
                u(rows),
                u(cols),
                Arg::U64(chunks),
                Arg::U64(chunk_len),
            ];
            self.launch(
                Kernel::LayerNormParamPartials,
                elementwise(partial_len as u64),
                &args,
            )?;
        }
        let args = [
            self.scratch_ptr(&mut pg),
            self.ptr_mut(dgamma)?,
            self.scratch_ptr(&mut pb),
            self.ptr_mut(dbeta)?,
            Arg::U64(chunks),
            u(cols),
        ];
        self.launch(
            Kernel::ColumnSumFinishPair,
            per_warp(2 * cols as u64),
            &args,
        )
    }

    /// In the bf16 mode the kernel also writes y's bf16 copy, for the GEMM that reads it
    /// (`fc2`), and for a `y` from `alloc_operand` the copy alone (`bf16.rs`).
    fn gelu_forward(&self, x: &CudaBuf, y: &mut CudaBuf) -> BResult<()> {
        let n = y.len();
        need(x, n, "gelu_forward", "x")?;
        // The inputs first: reading one may take its copy's lock, and the output's stays locked
        // until the launch. x is read from its bf16 copy where that alone holds it (`pre` in
        // the bf16 mode, written so by fc1's product).
        let inputs = self.inputs([(x, n)])?;
        let [[x_ptr, x16]] = inputs.args;
        y.renew();
        let mut copy = self.produced_copy(y)?;
        let y_ptr = self.overwritten_floats(&mut copy, y)?;
        let args = [x_ptr, x16, y_ptr, ProducedCopy::arg(&copy), u(n)];
        self.launch(
            self.gelu_kernel(Kernel::GeluForward),
            elementwise(n as u64),
            &args,
        )?;
        if let Some(copy) = copy {
            copy.written(y.contents(), n);
        }
        Ok(())
    }

    /// One pass instead of `copy_rows` then `gelu_forward`: the kernel computes the same f32 add
    /// and the same GELU, so the result is bitwise theirs (with act's bf16 copy in the bf16
    /// mode, or that alone, as `gelu_forward`).
    fn bias_gelu_forward(
        &self,
        bias: &CudaBuf,
        pre: &mut CudaBuf,
        act: &mut CudaBuf,
        rows: usize,
        cols: usize,
    ) -> BResult<()> {
        let o = "bias_gelu_forward";
        let Some(n) = rows.checked_mul(cols) else {
            return Err(error::device(format!(
                "bug: {o}: {rows} rows x {cols} columns overflow"
            )));
        };
        if n == 0 {
            return Ok(());
        }
        need(bias, cols, o, "bias")?;
        need(pre, n, o, "pre")?;
        need(act, n, o, "act")?;
        // Inputs first, as in `gelu_forward`.
        let (bias_ptr, pre_ptr) = (self.ptr(bias)?, self.ptr_mut(pre)?);
        act.renew();
        let mut copy = self.produced_copy(act)?;
        let act_ptr = self.overwritten_floats(&mut copy, act)?;
        let args = [
            bias_ptr,
            pre_ptr,
            act_ptr,
            ProducedCopy::arg(&copy),
            u(n),
            u(cols),
        ];
        self.launch(
            self.gelu_kernel(Kernel::BiasGeluForward),
            elementwise(n as u64),
            &args,
        )?;
        if let Some(copy) = copy {
            copy.written(act.contents(), n);
        }
        Ok(())
    }

    /// In the bf16 mode the kernel also writes dx's bf16 copy, for the two GEMMs of fc1's
    /// backward that read it.
    fn gelu_backward(
        &self,
        x: &CudaBuf,
        dy: &CudaBuf,
        dx: &mut CudaBuf,
        accumulate: bool,
    ) -> BResult<()> {
        let n = dx.len();
        need(x, n, "gelu_backward", "x")?;
        need(dy, n, "gelu_backward", "dy")?;
        // x and dy from their bf16 copies where those alone hold them (`pre` and `d_act` in the
        // bf16 mode).
        let inputs = self.inputs([(x, n), (dy, n)])?;
        let [[x_ptr, x16], [dy_ptr, dy16]] = inputs.args;
        // Overwriting reads nothing of dx (as `fill`): stale floats need no update first, and a
        // buffer from `alloc_operand` gets its bf16 copy alone.
        let (dx_ptr, copy) = if accumulate {
            (self.ptr_mut(dx)?, self.produced_copy(dx)?)
        } else {
            dx.renew();
            let mut copy = self.produced_copy(dx)?;
            (self.overwritten_floats(&mut copy, dx)?, copy)
        };
        let args = [
            x_ptr,
            x16,
            dy_ptr,
            dy16,
            dx_ptr,
            ProducedCopy::arg(&copy),
            u(n),
            Arg::U32(accumulate.into()),
        ];
        self.launch(
            self.gelu_kernel(Kernel::GeluBackward),
            elementwise(n as u64),
            &args,
        )?;
        if let Some(copy) = copy {
            copy.written(dx.contents(), n);
        }
        Ok(())
    }

    fn softmax_forward(
        &self,
        x: &CudaBuf,
        y: &mut CudaBuf,
        rows: usize,
        cols: usize,
        scale: f32,
    ) -> BResult<()> {
        let op = ("softmax_forward", Kernel::SoftmaxForward);
        self.row_op(op, x, y, rows, cols, scale)
    }

    fn softmax_backward(
        &self,
        y: &CudaBuf,
        dy: &CudaBuf,
        dx: &mut CudaBuf,
        rows: usize,
        cols: usize,
        scale: f32,
    ) -> BResult<()> {
        let o = "softmax_backward";
        need(y, rows * cols, o, "y")?;
        need(dy, rows * cols, o, "dy")?;
        need(dx, rows * cols, o, "dx")?;
        let args = [
            self.ptr(y)?,
            self.ptr(dy)?,
            self.ptr_mut(dx)?,
            u(rows),
            u(cols),
            Arg::F32(scale),
        ];
        self.launch(
            Kernel::SoftmaxBackward,
            per_row(rows as u64, cols as u64),
            &args,
        )
    }

    // ---- fused attention ------------------------------------------------------------------

    fn fused_attention(&self, a: &Attention) -> bool {
        self.attention_path() != AttentionPath::Composed
            && (1..=ATTENTION_MAX_HEAD_DIM).contains(&a.head_dim)
    }

    fn attention_forward(
        &self,
        qkv: &CudaBuf,
        out: &mut CudaBuf,
        lse: &mut CudaBuf,
        a: &Attention,
    ) -> BResult<()> {
        self.attention_supported(a)?;
        let (lq, lo, ll) = a.lens();
        need(qkv, lq, "attention_forward", "qkv")?;
        need(out, lo, "attention_forward", "out")?;
        need(lse, ll, "attention_forward", "lse")?;
        let ([forward, _, _], grids) = self.attention_kernels(a);
        // The tensor-core kernels (the bf16 mode's) also write out's bf16 copy: the input of
        // `proj`, and O of the backward's Drow = dO . O, which those kernels take from the copy
        // too; so an `out` from `alloc_operand` gets the copy alone.
        let tensor_cores = forward == Kernel::AttentionForwardMma;
        let (inputs, _copies) = self.attention_inputs([(qkv, lq)], tensor_cores)?;
        let [forward] = mma_variants([forward], &inputs, a.head_dim);
        let mut args = inputs.concat();
        let copy = if tensor_cores {
            // The copy alone only where the kernel writes all of `out`, as in layernorm_forward.
            let floats = if out.len() == lo {
                out.renew();
                None
            } else {
                Some(self.ptr_mut(out)?)
            };
            let mut copy = self.produced_copy(out)?;
            args.push(match floats {
                Some(p) => p,
                None => self.overwritten_floats(&mut copy, out)?,
            });
            args.push(ProducedCopy::arg(&copy));
            copy
        } else {
            args.push(self.ptr_mut(out)?);
            None
        };
        args.push(self.ptr_mut(lse)?);
        args.extend(attention_dims(a));
        if tensor_cores {
            args.push(self.attention_flags());
        }
        let kernels = [forward, Kernel::AttentionForwardMmaTail];
        self.launch_attention(kernels, &grids, &args, a, 2)?;
        if let Some(copy) = copy {
            copy.written(out.contents(), lo);
        }
        Ok(())
    }

    fn attention_backward(
        &self,
        qkv: &CudaBuf,
        out: &CudaBuf,
        lse: &CudaBuf,
        d_out: &CudaBuf,
        d_qkv: &mut CudaBuf,
        a: &Attention,
    ) -> BResult<()> {
        self.attention_supported(a)?;
        let (lq, lo, ll) = a.lens();
        let o = "attention_backward";
        need(qkv, lq, o, "qkv")?;
        need(out, lo, o, "out")?;
        need(lse, ll, o, "lse")?;
        need(d_out, lo, o, "d_out")?;
        need(d_qkv, lq, o, "d_qkv")?;
        let ([_, dq, dkv], grids) = self.attention_kernels(a);
        let tensor_cores = dq == Kernel::AttentionBackwardDqMma;
        // Written by the dQ kernel for the dK, dV kernel, per score row: Drow_i = dO_i . O_i, and
        // on the tensor cores (lse_i in base 2, Drow_i) as one pair (attention_mma.cu); 8 bytes a
        // row either way. The dQ kernel writes every row, so no fill first.
        let mut row_stats = self.scratch(ll)?;
        let (inputs, _copies) =
            self.attention_inputs([(qkv, lq), (d_out, lo), (out, lo)], tensor_cores)?;
        let [dq, dkv] = mma_variants([dq, dkv], &inputs, a.head_dim);
        let [qkv_args, d_out_args, out_args] = [&inputs[0], &inputs[1], &inputs[2]];
        // The tensor-core kernels overwrite all of d_qkv (dQ its q columns, dK-dV the others)
        // and write its bf16 copy too: d_qkv is dY of the qkv Linear, whose two gradient
        // products and their bias sums read only the copy, so one from `alloc_operand` gets
        // the copy alone.
        let (d_qkv_ptr, copy) = if tensor_cores {
            d_qkv.renew();
            let mut copy = self.produced_copy(d_qkv)?;
            (self.overwritten_floats(&mut copy, d_qkv)?, copy)
        } else {
            (self.ptr_mut(d_qkv)?, None)
        };
        let d_qkv_args = if tensor_cores {
            vec![d_qkv_ptr, ProducedCopy::arg(&copy)]
        } else {
            vec![d_qkv_ptr]
        };
        let mut args = qkv_args.clone();
        args.extend_from_slice(out_args);
        args.push(self.ptr(lse)?);
        args.extend_from_slice(d_out_args);
        args.extend_from_slice(&d_qkv_args);
        args.push(self.scratch_ptr(&mut row_stats));
        args.extend(attention_dims(a));
        let flags = self.attention_flags();
        if tensor_cores {
            args.push(flags);
        }
        let kernels = [dq, Kernel::AttentionBackwardDqMmaTail];
        self.launch_attention(kernels, &grids, &args, a, 3)?;
        let mut args = qkv_args.clone();
        // The tensor-core kernel reads lse from the pairs.
        if !tensor_cores {
            args.push(self.ptr(lse)?);
        }
        args.extend_from_slice(d_out_args);
        args.push(self.scratch_ptr(&mut row_stats));
        args.extend_from_slice(&d_qkv_args);
        args.extend(attention_dims(a));
        if tensor_cores {
            args.push(flags);
        }
        let kernels = [dkv, Kernel::AttentionBackwardDkvMmaTail];
        self.launch_attention(kernels, &grids, &args, a, 4)?;
        if let Some(copy) = copy {
            copy.written(d_qkv.contents(), lq);
        }
        Ok(())
    }

    // ---- loss -------------------------------------------------------------------------------

    fn normalize_rows(
        &self,
        x: &CudaBuf,
        y: &mut CudaBuf,
        rows: usize,
        cols: usize,
        eps: f32,
    ) -> BResult<()> {
        let op = ("normalize_rows", Kernel::NormalizeRows);
        self.row_op(op, x, y, rows, cols, eps)
    }

    fn masked_mse_forward(
        &self,
        pred: &CudaBuf,
        target: &CudaBuf,
        mask: &CudaBuf,
        loss: &mut CudaBuf,
        rows: usize,
        cols: usize,
    ) -> BResult<()> {
        let o = "masked_mse_forward";
        need(pred, rows * cols, o, "pred")?;
        need(target, rows * cols, o, "target")?;
        need(mask, rows, o, "mask")?;
        need(loss, 1, o, "loss")?;
        let mut row_loss = self.scratch(rows)?;
        let args = [
            self.ptr(pred)?,
            self.ptr(target)?,
            self.ptr(mask)?,
            self.scratch_ptr(&mut row_loss),
            u(rows),
            u(cols),
        ];
        // Every row gets its entry even when cols == 0 (0 / 0 = NaN, as on the CPU).
        self.launch(Kernel::MaskedMseRows, per_row(rows as u64, 1), &args)?;
        let args = [
            self.scratch_ptr(&mut row_loss),
            self.ptr(mask)?,
            self.ptr_mut(loss)?,
            u(rows),
        ];
        self.launch(Kernel::MaskedMseTotal, Some(single_block()), &args)
    }

    fn masked_mse_backward(
        &self,
        pred: &CudaBuf,
        target: &CudaBuf,
        mask: &CudaBuf,
        d_pred: &mut CudaBuf,
        rows: usize,
        cols: usize,
        d_loss: f32,
    ) -> BResult<()> {
        let o = "masked_mse_backward";
        need(pred, rows * cols, o, "pred")?;
        need(target, rows * cols, o, "target")?;
        need(d_pred, rows * cols, o, "d_pred")?;
        need(mask, rows, o, "mask")?;
        if rows * cols == 0 {
            return Ok(());
        }
        let mut mask_sum = self.scratch(1)?;
        let args = [self.ptr(mask)?, self.scratch_ptr(&mut mask_sum), u(rows)];
        self.launch(Kernel::MaskSum, Some(single_block()), &args)?;
        let args = [
            self.ptr(pred)?,
            self.ptr(target)?,
            self.ptr(mask)?,
            self.scratch_ptr(&mut mask_sum),
            self.ptr_mut(d_pred)?,
            u(rows),
            u(cols),
            Arg::F32(d_loss),
        ];
        self.launch(
            Kernel::MaskedMseBackward,
            elementwise((rows * cols) as u64),
            &args,
        )
    }

    // ---- optimizer --------------------------------------------------------------------------

    fn adamw(
        &self,
        param: &mut CudaBuf,
        grad: &CudaBuf,
        m: &mut CudaBuf,
        v: &mut CudaBuf,
        s: &AdamWStep,
    ) -> BResult<()> {
        let n = param.len();
        need(grad, n, "adamw", "grad")?;
        need(m, n, "adamw", "m")?;
        need(v, n, "adamw", "v")?;
        let [decay, beta1, beta2, one_minus_beta1, one_minus_beta2, step_size, bc2_sqrt, eps] =
            crate::adamw_many::scalars(s);
        let args = [
            self.ptr_mut(param)?,
            self.ptr(grad)?,
            self.ptr_mut(m)?,
            self.ptr_mut(v)?,
            u(n),
            Arg::F32(decay),
            Arg::F32(beta1),
            Arg::F32(beta2),
            Arg::F32(one_minus_beta1),
            Arg::F32(one_minus_beta2),
            Arg::F32(step_size),
            Arg::F32(bc2_sqrt),
            Arg::F32(eps),
        ];
        self.launch(Kernel::AdamW, elementwise(n as u64), &args)
    }

    fn adamw_many<'a>(
        &self,
        tensors: impl Iterator<Item = mae::backend::AdamWTensor<'a, CudaBuf>>,
    ) -> BResult<()>
    where
        CudaBuf: 'a,
    {
        self.adamw_in_one_launch(tensors)
    }
}

/// The dimension arguments every attention kernel ends with.
fn attention_dims(a: &Attention) -> [Arg; 5] {
    [
        u(a.batch),
        u(a.tokens),
        u(a.heads),
        u(a.head_dim),
        Arg::F32(a.scale),
    ]
}

/// Whether every row of the map's destination reads source row 0, the rows in order (a
/// [`RowMap::bias`], or the same over a window of rows): its backward is a plain column sum.
fn is_bias(map: &RowMap) -> bool {
    map.src_stride == 0
        && map.src_start == 0
        && map.src_step == 0
        && map.count == 1
        && map.dst_stride == 1
}

/// The tensor-core kernels for inputs given as bf16 copies alone (`args` from
/// `attention_inputs`: each input's floats, then its copy or null): one kernel per head width up
/// to 32 and up to 64, each with registers for its own path (`attention_mma.cu`). Kernels for
/// floats, and the f32 kernels, are returned as they are.
fn mma_variants<const N: usize>(
    kernels: [Kernel; N],
    args: &[Vec<Arg>],
    head_dim: usize,
) -> [Kernel; N] {
    let copies = args
        .first()
        .is_some_and(|a| a.len() == 2 && !matches!(a[1], Arg::Ptr(0)));
    let narrow = head_dim <= 32;
    kernels.map(|k| match (k, copies, narrow) {
        (_, false, _) => k,
        (Kernel::AttentionForwardMma, _, true) => Kernel::AttentionForwardMmaBf16Hd32,
        (Kernel::AttentionForwardMma, _, false) => Kernel::AttentionForwardMmaBf16Hd64,
        (Kernel::AttentionBackwardDqMma, _, true) => Kernel::AttentionBackwardDqMmaBf16Hd32,
        (Kernel::AttentionBackwardDqMma, _, false) => Kernel::AttentionBackwardDqMmaBf16Hd64,
        (Kernel::AttentionBackwardDkvMma, _, true) => Kernel::AttentionBackwardDkvMmaBf16Hd32,
        (Kernel::AttentionBackwardDkvMma, _, false) => Kernel::AttentionBackwardDkvMmaBf16Hd64,
        _ => k,
    })
}

/// The profile's detail of an attention kernel that computes `products` rows x T x head-width
/// products per (image, head) (the forward 2: scores and P V; dQ 3: the scores again, dP and
/// dQ; dK-dV 4: scores, dV, dP and dK) for `rows` of the T rows (all but a split tail's, or
/// those): tokens, head width and (image, head) pairs, and the work: the FLOPs executed,
/// recomputation included, and the rows' share of the `bytes` the whole op moves.
fn attention_detail(
    a: &Attention,
    products: usize,
    rows: usize,
    bytes: Option<f64>,
) -> (String, Work) {
    let pairs = a.batch * a.heads;
    let flops = 2.0 * (products * pairs * rows * a.tokens * a.head_dim) as f64;
    let share = rows as f64 / a.tokens.max(1) as f64;
    let work = Work {
        flops,
        bytes: bytes.map(|b| b * share),
    };
    (format!("T{} hd{} x{pairs}", a.tokens, a.head_dim), work)
}

/// The grids of one direction of the fused attention: the main kernel's, and the tail kernel's
/// where the tensor-core attention's tail blocks run split (`launch::attention_mma_split`).
struct AttentionGrids {
    main: Option<cudarc::driver::LaunchConfig>,
    tail: Option<cudarc::driver::LaunchConfig>,
}

impl AttentionGrids {
    fn whole(main: Option<cudarc::driver::LaunchConfig>) -> Self {
        AttentionGrids { main, tail: None }
    }
}

fn need_idx(idx: &CudaIdx, len: usize, op: &str) -> BResult<()> {
    if idx.len() >= len {
        Ok(())
    } else {
        Err(error::device(format!(
            "bug: {op}: idx holds {} indices, the op needs {len}",
            idx.len()
        )))
    }
}

impl CudaBackend {
    /// The forward, dQ and dK-dV kernels of the fused attention path, and their launch.
    fn attention_kernels(&self, a: &Attention) -> ([Kernel; 3], AttentionGrids) {
        let (pairs, tokens) = ((a.batch * a.heads) as u64, a.tokens as u64);
        if self.attention_path() == AttentionPath::TensorCores {
            let kernels = [
                Kernel::AttentionForwardMma,
                Kernel::AttentionBackwardDqMma,
                Kernel::AttentionBackwardDkvMma,
            ];
            let (main, tail) = match self.attention_tail_split {
                true => attention_mma_split(pairs, tokens),
                false => (attention_mma(pairs, tokens), None),
            };
            (kernels, AttentionGrids { main, tail })
        } else if a.head_dim <= 32 {
            let kernels = [
                Kernel::AttentionForwardHd32,
                Kernel::AttentionBackwardDqHd32,
                Kernel::AttentionBackwardDkvHd32,
            ];
            (kernels, AttentionGrids::whole(attention(pairs, tokens)))
        } else {
            let kernels = [
                Kernel::AttentionForwardHd64,
                Kernel::AttentionBackwardDqHd64,
                Kernel::AttentionBackwardDkvHd64,
            ];
            (kernels, AttentionGrids::whole(attention(pairs, tokens)))
        }
    }

    /// Launches one direction of the fused attention: `kernel` on the main grid, then, where the
    /// tensor-core attention's tail blocks run split, `tail` on theirs with the same arguments.
    fn launch_attention(
        &self,
        [kernel, tail]: [Kernel; 2],
        grids: &AttentionGrids,
        args: &[Arg],
        a: &Attention,
        products: usize,
    ) -> BResult<()> {
        let tail_rows = match grids.tail {
            Some(_) => a.tokens % ATTENTION_MMA_ROWS as usize,
            None => 0,
        };
        let rows = a.tokens - tail_rows;
        self.launch_described(kernel, grids.main, args, |bytes| {
            attention_detail(a, products, rows, bytes)
        })?;
        self.launch_described(tail, grids.tail, args, |bytes| {
            attention_detail(a, products, tail_rows, bytes)
        })
    }

    /// The arguments of the attention kernels for their inputs (qkv, and dO and O in the
    /// backward; each with the length the kernels read): the tensor-core kernels take each
    /// input's floats and its bf16 copy where that alone holds it (the qkv product's output,
    /// the proj Linear's input gradient and the forward's output in the bf16 mode: the values
    /// they multiply, staged without rounding, and O of `dO . O`), locked in the returned
    /// [`Inputs`] until the launch. They take all of them as
    /// copies or none: where only some inputs hold a copy alone, those are widened and every
    /// input goes as floats. The f32 kernels take the floats.
    fn attention_inputs<'a, const N: usize>(
        &self,
        bufs: [(&'a CudaBuf, usize); N],
        tensor_cores: bool,
    ) -> BResult<(Vec<Vec<Arg>>, Option<Inputs<'a, N>>)> {
        if tensor_cores {
            let inputs = self.inputs(bufs)?;
            let copies = inputs.args.iter();
            let copies = copies.filter(|a| !matches!(a[1], Arg::Ptr(0))).count();
            if copies == 0 || copies == N {
                let args = inputs.args.iter().map(|a| a.to_vec()).collect();
                return Ok((args, Some(inputs)));
            }
        }
        let floats = bufs.iter().map(|&(b, _)| self.ptr(b));
        let args = floats
            .map(|p| {
                Ok(if tensor_cores {
                    vec![p?, Arg::Ptr(0)]
                } else {
                    vec![p?]
                })
            })
            .collect::<BResult<_>>()?;
        Ok((args, None))
    }

    /// The attention kernels hold a row of up to [`ATTENTION_MAX_HEAD_DIM`] in registers.
    fn attention_supported(&self, a: &Attention) -> BResult<()> {
        if self.fused_attention(a) {
            Ok(())
        } else {
            Err(op(
                BackendErrorKind::Unsupported,
                format!(
                    "fused attention with head_dim {} (the kernels take 1 to \
                     {ATTENTION_MAX_HEAD_DIM})",
                    a.head_dim
                ),
            ))
        }
    }

    fn idx_ptr(&self, idx: &CudaIdx) -> Arg {
        Arg::Ptr(addr(&idx.slice, &self.stream))
    }

    /// A kernel that maps each row of `x` to the same row of `y`, one block per row, with one
    /// scalar setting (softmax's scale, normalize_rows' epsilon).
    fn row_op(
        &self,
        (name, kernel): (&str, Kernel),
        x: &CudaBuf,
        y: &mut CudaBuf,
        rows: usize,
        cols: usize,
        scalar: f32,
    ) -> BResult<()> {
        need(x, rows * cols, name, "x")?;
        need(y, rows * cols, name, "y")?;
        let args = [
            self.ptr(x)?,
            self.ptr_mut(y)?,
            u(rows),
            u(cols),
            Arg::F32(scalar),
        ];
        self.launch(kernel, per_row(rows as u64, cols as u64), &args)
    }

    /// The tensor-core attention kernels' `flags` (`attention_mma.cu`): prefetch and tail split
    /// as `MAE_CUDA_ATTENTION_PREFETCH` and `MAE_CUDA_ATTENTION_TAIL` say.
    fn attention_flags(&self) -> Arg {
        let prefetch = if self.attention_prefetch {
            ATTENTION_MMA_PREFETCH
        } else {
            0
        };
        let split = if self.attention_tail_split {
            ATTENTION_MMA_SPLIT
        } else {
            0
        };
        Arg::U32(prefetch | split)
    }

    /// A gather kernel (forward or backward) reading `input` and writing `output` through `idx`;
    /// `op` names the op and its two buffers in length errors.
    fn gather(
        &self,
        kernel: Kernel,
        op: (&str, &str, &str),
        input: (&CudaBuf, usize),
        idx: &CudaIdx,
        output: (&mut CudaBuf, usize),
        g: &Gather,
    ) -> BResult<()> {
        let n = g.batch * g.count * g.cols;
        if n == 0 {
            return Ok(());
        }
        let (_, li, _) = g.lens();
        need(input.0, input.1, op.0, op.1)?;
        need(output.0, output.1, op.0, op.2)?;
        need_idx(idx, li, op.0)?;
        let args = [
            self.ptr(input.0)?,
            self.idx_ptr(idx),
            self.ptr_mut(output.0)?,
            u(g.batch),
            u(g.count),
            u(g.cols),
            u(g.src_rows),
            u(g.src_stride),
            u(g.src_start),
            u(g.dst_rows),
            u(g.dst_start),
        ];
        self.launch(kernel, elementwise(n as u64), &args)
    }

    fn heads(&self, kernel: Kernel, bufs: [Arg; 2], h: &Heads, n: usize) -> BResult<()> {
        let args = [
            bufs[0],
            bufs[1],
            u(h.batch),
            u(h.tokens),
            u(h.heads),
            u(h.head_dim),
            u(h.row_width),
            u(h.col_offset),
        ];
        self.launch(kernel, elementwise(n as u64), &args)
    }
}
