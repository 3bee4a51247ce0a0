//! `gemm_bias` on cuBLASLt: the Linear layer's bias added by the GEMM's epilogue
//! (`CUBLASLT_EPILOGUE_BIAS`) while the product is still in registers, instead of a second
//! pass over the output (`copy_rows`, about 7 % of a ViT-B training step on an H200 in bf16).
//!
//! The product is the one `gemm` computes, in cuBLASLt's terms: the row-major `C = op(A) op(B)`
//! is the column-major `C^T = op(B)^T op(A)^T` (`gemm.rs`), so cuBLASLt's first operand is our
//! B and its output `D` is `n x m` column-major; our bias, one value per column of the
//! row-major `C`, is one per row of `D`, which is what the epilogue broadcasts. With
//! `accumulate` (beta = 1) C and D are the same matrix: cuBLASLt computes
//! `D = alpha op(B)^T op(A)^T + beta C + bias`, so the bias is added once, as in the composed
//! ops. The operands are what `gemm` multiplies in each precision: f32 (`CUBLAS_COMPUTE_32F`,
//! or the TF32 and bf16 `FAST` compute types) or, in bf16 where the copies pay, the buffers'
//! bf16 copies (`bf16.rs`) with f32 C, D and bias, or, where D is a buffer's bf16 copy alone,
//! a bf16 D and the bias's bf16 copy (cuBLASLt reads the bias in D's type).
//!
//! cuBLASLt sums the products in its own kernels' order, which need not be the order of the
//! kernel `cublasGemmEx` picks for the same shape: the result is the same product within the
//! GEMM tolerance, not always bitwise that of `gemm` then `copy_rows`.
//!
//! `gemm_bias_grad` (a Linear layer's `dW += dY^T X` with `db +=` dY's column sums) runs the
//! weight gradient with `CUBLASLT_EPILOGUE_BGRADB` in the bf16 mode: cuBLASLt's B is our A, dY,
//! and the epilogue sums it over `k` (the token rows) while the product reads it, where the
//! composed ops read dY once more for the column sums (`copy_rows_backward`, about 4 % of a
//! ViT-B bf16 step on an H200). The sums are of the bf16 copy that the product multiplies.
//!
//! A weight gradient whose output cannot fill the card runs as a batch of products over
//! chunks of its `k` rows, their partials summed after (`split_k.rs`).
//!
//! Where `libcublasLt` is missing, or it has no algorithm for a shape (the heuristic finds
//! none, or the call answers `NOT_SUPPORTED`), both ops run the composed ops instead,
//! without an error. `MAE_CUDA_GEMM_BIAS=composed` chooses the composed ops by hand (`lt`, the
//! default, takes cuBLASLt where it can).
//!
//! Each product runs the heuristic's first algorithm for its shape, unless
//! `MAE_CUDA_GEMM_TUNE` names a tuning table (`lt/tuning.rs`): then the table's algorithm, or
//! the fastest of the heuristic's candidates timed on the spot, and plain `gemm`s of one matrix
//! run here too (with no epilogue), so that every product of a Linear layer is tuned.

#[cfg(test)]
use crate::backend::choice;
use crate::backend::{env_choice, CudaBackend, Precision};
use crate::buffer::CudaBuf;
use crate::error;
use crate::gemm::{column_major, ColumnMajor};
use crate::kernels::{Arg, Kernel};
use crate::launch::elementwise;
use crate::split_k::{self, WeightGradSplit};
use cudarc::cublaslt::result::{self as lt, CublasError};
use cudarc::cublaslt::sys::{
    self, cublasComputeType_t, cublasLtEpilogue_t, cublasLtMatmulAlgo_t,
    cublasLtMatmulDescAttributes_t as DescAttr, cublasLtMatmulPreferenceAttributes_t as PrefAttr,
    cublasLtMatrixLayoutAttribute_t as LayoutAttr, cublasStatus_t, cudaDataType,
};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtrMut};
use mae::backend::{BResult, BackendError, BackendErrorKind, Gemm};
use std::collections::HashMap;
use std::ffi::c_void;
use std::panic::catch_unwind;
use std::sync::{Arc, Mutex};
use tuning::Tuning;

mod table;
mod tuning;

/// The workspace cuBLASLt's kernels may use (split-K partial sums and the like): allocated
/// once per backend, the size NVIDIA recommends for Hopper.
const WORKSPACE_BYTES: usize = 32 << 20;

/// Where `gemm_bias` adds the bias (`MAE_CUDA_GEMM_BIAS`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum GemmBias {
    /// cuBLASLt's bias epilogue where the library and the shape allow, else the composed ops.
    #[default]
    Lt,
    /// Always `gemm` then `copy_rows` (the trait's default).
    Composed,
}

impl GemmBias {
    const CHOICES: [(&'static str, GemmBias); 2] =
        [("lt", GemmBias::Lt), ("composed", GemmBias::Composed)];

    /// Reads `MAE_CUDA_GEMM_BIAS`; unset is [`GemmBias::Lt`].
    pub(crate) fn from_env() -> BResult<GemmBias> {
        Ok(env_choice("MAE_CUDA_GEMM_BIAS", &Self::CHOICES)?.unwrap_or_default())
    }

    #[cfg(test)]
    fn parse(v: &str) -> BResult<GemmBias> {
        choice("MAE_CUDA_GEMM_BIAS", v, &Self::CHOICES)
    }
}

/// What the epilogue does with its f32 vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Epilogue {
    /// `CUBLASLT_EPILOGUE_DEFAULT`: the product alone, no vector (`gemm`, where tuned).
    Default,
    /// `CUBLASLT_EPILOGUE_BIAS`: adds it to every row of our C (`gemm_bias`).
    Bias,
    /// `CUBLASLT_EPILOGUE_BGRADB`: writes into it the sums of our A over the product's `k`, one
    /// per row of our C (`gemm_bias_grad`: `dW = dY^T X` with `db = ` dY's column sums).
    BiasGrad,
}

/// The vector an epilogue reads or writes besides D, as `lt_product` takes it.
#[derive(Clone, Copy)]
enum Vector<'a> {
    /// None: `Epilogue::Default`.
    None,
    /// The bias `Epilogue::Bias` adds (at least n floats, checked by the caller): its floats,
    /// or where D is bf16 its bf16 copy. cuBLASLt reads the bias in D's type: on an H200 it has
    /// no algorithm for a bf16 D with an f32 bias (2026-11-28), so a bf16 D takes the bias
    /// rounded to bf16, as PyTorch's autocast Linear layers do.
    Bias(&'a CudaBuf),
    /// The address of the m sums `Epilogue::BiasGrad` writes.
    Sums(u64),
}

impl Vector<'_> {
    fn epilogue(&self) -> Epilogue {
        match self {
            Vector::None => Epilogue::Default,
            Vector::Bias(_) => Epilogue::Bias,
            Vector::Sums(_) => Epilogue::BiasGrad,
        }
    }
}

/// What the heuristic's choice depends on: the column-major call, the operands' type, the
/// epilogue and the chunks of `k` (`split_k.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Shape {
    /// One chunk's product where `chunks` > 1.
    cm: ColumnMajor,
    bf16_copies: bool,
    /// Whether D is bf16 (a buffer's copy alone, `gemm_out16`).
    out16: bool,
    epilogue: Epilogue,
    /// The batch of chunk products (1: the whole product).
    chunks: usize,
}

/// The heuristic's algorithm for a shape and how many waves of thread blocks it runs (1.0: the
/// card full once).
#[derive(Clone, Copy, Debug)]
struct Found {
    algo: cublasLtMatmulAlgo_t,
    waves: f32,
}

/// A cuBLASLt handle, its workspace, and the algorithm chosen per shape (`None`: cuBLASLt has
/// none, the composed ops run).
pub(crate) struct Lt {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    /// The heuristic's first choice per shape.
    algos: HashMap<Shape, Option<Found>>,
    /// `MAE_CUDA_GEMM_TUNE`'s table and what it chose, where tuning.
    tuning: Option<Tuning>,
}

// SAFETY: the handle is only used under the backend's `Mutex<Lt>`, one thread at a time, and
// cuBLASLt handles are not tied to the thread that created them (NVIDIA documents them as
// usable from any host thread, with the device's context current, which callers bind).
unsafe impl Send for Lt {}

impl Drop for Lt {
    fn drop(&mut self) {
        // SAFETY: the handle was created by `create_handle` and is destroyed only here; work
        // queued with it is stream-ordered before the workspace's (stream-ordered) free.
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}

impl Lt {
    /// A handle and workspace, or `None` where `libcublasLt` is missing or refuses to start:
    /// the caller then composes `gemm` and `copy_rows`.
    pub(crate) fn open(stream: &Arc<CudaStream>) -> Option<Lt> {
        // SAFETY: `is_culib_present` only tries `dlopen` on cudarc's candidate names and
        // closes the handles again.
        let present = catch_unwind(|| unsafe { sys::is_culib_present() }).unwrap_or(false);
        if !present {
            return None;
        }
        // cudarc panics where a symbol is missing (a library older than its bindings).
        let handle = catch_unwind(lt::create_handle).ok()?.ok()?;
        // SAFETY: cuBLASLt's kernels write the workspace before they read it; nothing else
        // reads it.
        match unsafe { stream.alloc::<u8>(WORKSPACE_BYTES) } {
            Ok(workspace) => Some(Lt {
                handle,
                workspace,
                algos: HashMap::new(),
                tuning: None,
            }),
            Err(_) => {
                // SAFETY: created just above, used by nothing yet.
                let _ = unsafe { lt::destroy_handle(handle) };
                None
            }
        }
    }
}

/// A matmul descriptor, destroyed when dropped.
struct Desc(sys::cublasLtMatmulDesc_t);

impl Drop for Desc {
    fn drop(&mut self) {
        // SAFETY: created by `create_matmul_desc`, destroyed only here.
        let _ = unsafe { lt::destroy_matmul_desc(self.0) };
    }
}

impl Desc {
    fn set<T>(&self, attr: DescAttr, value: &T) -> Result<(), CublasError> {
        // SAFETY: the descriptor is live (owned by `self`); cuBLASLt copies `size_of::<T>()`
        // bytes from `value`, which the callers give the type the attribute documents.
        unsafe {
            lt::set_matmul_desc_attribute(self.0, attr, (value as *const T).cast(), size_of::<T>())
        }
    }
}

/// A matrix layout, destroyed when dropped.
struct Layout(sys::cublasLtMatrixLayout_t);

impl Drop for Layout {
    fn drop(&mut self) {
        // SAFETY: created by `create_matrix_layout`, destroyed only here.
        let _ = unsafe { lt::destroy_matrix_layout(self.0) };
    }
}

impl Layout {
    /// A column-major `rows x cols` matrix of `ty` with leading dimension `ld`.
    fn new(ty: cudaDataType, rows: usize, cols: usize, ld: usize) -> Result<Layout, CublasError> {
        lt::create_matrix_layout(ty, rows as u64, cols as u64, ld as i64).map(Layout)
    }

    /// Makes it a batch of `count` matrices, `offset` elements apart.
    fn batched(self, count: usize, offset: usize) -> Result<Layout, CublasError> {
        let (count, offset) = (count as i32, offset as i64);
        // SAFETY: the layout is live (owned by `self`); the attributes take an int32 and an
        // int64, copied from the locals.
        unsafe {
            lt::set_matrix_layout_attribute(
                self.0,
                LayoutAttr::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                (&count as *const i32).cast(),
                size_of::<i32>(),
            )?;
            lt::set_matrix_layout_attribute(
                self.0,
                LayoutAttr::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                (&offset as *const i64).cast(),
                size_of::<i64>(),
            )?;
        }
        Ok(self)
    }
}

/// A heuristic preference, destroyed when dropped.
struct Pref(sys::cublasLtMatmulPreference_t);

impl Drop for Pref {
    fn drop(&mut self) {
        // SAFETY: created by `create_matmul_pref`, destroyed only here.
        let _ = unsafe { lt::destroy_matmul_pref(self.0) };
    }
}

/// The descriptors of one `gemm_bias` call.
struct Call {
    desc: Desc,
    /// cuBLASLt's A (our B), B (our A), and C = D.
    first: Layout,
    second: Layout,
    out: Layout,
}

/// The operand type and compute type of the product in `precision`: the bf16 copies with
/// exact products, or f32 operands with the precision's compute type.
fn types(precision: Precision, bf16_copies: bool) -> (cudaDataType, cublasComputeType_t) {
    use cublasComputeType_t as C;
    match (precision, bf16_copies) {
        (_, true) => (cudaDataType::CUDA_R_16BF, C::CUBLAS_COMPUTE_32F),
        (Precision::F32, false) => (cudaDataType::CUDA_R_32F, C::CUBLAS_COMPUTE_32F),
        (Precision::Tf32, false) => (cudaDataType::CUDA_R_32F, C::CUBLAS_COMPUTE_32F_FAST_TF32),
        (Precision::Bf16, false) => (cudaDataType::CUDA_R_32F, C::CUBLAS_COMPUTE_32F_FAST_16BF),
    }
}

/// The descriptors for `cm` with `epilogue` on the f32 vector at `bias` (a device address)
/// and C and D of type `out`: one product, or with `chunks` > 1 the batch of products over
/// consecutive chunks of `cm.k` rows (`split_k.rs`) into as many matrices D and vectors.
fn describe(
    cm: &ColumnMajor,
    operand: cudaDataType,
    compute: cublasComputeType_t,
    (epilogue, bias): (Epilogue, u64),
    out: cudaDataType,
    chunks: usize,
) -> Result<Call, CublasError> {
    if chunks > 1 {
        let chunk = ColumnMajor {
            k: cm.k / chunks,
            ..*cm
        };
        let call = describe(&chunk, operand, compute, (epilogue, bias), out, 1)?;
        // Chunk i of a stored operand starts i x chunk.k columns (rows where transposed) on.
        let offset = |trans: bool, ld: usize| if trans { chunk.k } else { chunk.k * ld };
        // One vector of the epilogue's per chunk, one value per column of D each.
        let stride = cm.n as i64;
        call.desc
            .set(DescAttr::CUBLASLT_MATMUL_DESC_BIAS_BATCH_STRIDE, &stride)?;
        return Ok(Call {
            first: call
                .first
                .batched(chunks, offset(cm.trans_first, cm.ld_first))?,
            second: call
                .second
                .batched(chunks, offset(!cm.trans_second, cm.ld_second))?,
            out: call.out.batched(chunks, cm.m * cm.n)?,
            desc: call.desc,
        });
    }
    let desc = Desc(lt::create_matmul_desc(compute, cudaDataType::CUDA_R_32F)?);
    // cublasOperation_t as cuBLASLt's attributes take it: an int32, N = 0, T = 1.
    let op = |t: bool| -> i32 { t as i32 };
    desc.set(DescAttr::CUBLASLT_MATMUL_DESC_TRANSA, &op(cm.trans_first))?;
    desc.set(DescAttr::CUBLASLT_MATMUL_DESC_TRANSB, &op(cm.trans_second))?;
    // cuBLASLt's B is our A (`gemm.rs`): BGRADB sums our A over k, one value per column of
    // cuBLASLt's D, that is per row of our C.
    let epilogue = match epilogue {
        Epilogue::Default => None,
        Epilogue::Bias => Some(cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS),
        Epilogue::BiasGrad => Some(cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BGRADB),
    };
    if let Some(epilogue) = epilogue {
        desc.set(DescAttr::CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue)?;
        let bias_ptr = bias as *const c_void;
        desc.set(DescAttr::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias_ptr)?;
        // f32 where D is f32 (BGRADB's sums always), bf16 where D is (`Vector::Bias`).
        let vector = match out {
            cudaDataType::CUDA_R_16BF => cudaDataType::CUDA_R_16BF,
            _ => cudaDataType::CUDA_R_32F,
        };
        desc.set(DescAttr::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &vector)?;
    }
    // Stored shapes: op(first) is m x k, op(second) is k x n.
    let (rows1, cols1) = if cm.trans_first {
        (cm.k, cm.m)
    } else {
        (cm.m, cm.k)
    };
    let (rows2, cols2) = if cm.trans_second {
        (cm.n, cm.k)
    } else {
        (cm.k, cm.n)
    };
    Ok(Call {
        desc,
        first: Layout::new(operand, rows1, cols1, cm.ld_first)?,
        second: Layout::new(operand, rows2, cols2, cm.ld_second)?,
        out: Layout::new(out, cm.m, cm.n, cm.ldc)?,
    })
}

impl Lt {
    /// The algorithm for `shape` (asked of the heuristic once, then remembered), or `None`
    /// where cuBLASLt has none.
    fn algo(&mut self, shape: Shape, call: &Call) -> Option<Found> {
        if let Some(known) = self.algos.get(&shape) {
            return *known;
        }
        let found = self.heuristic(call).ok();
        self.algos.insert(shape, found);
        found
    }

    fn heuristic(&self, call: &Call) -> Result<Found, CublasError> {
        self.heuristics(call, 1)?
            .first()
            .copied()
            .ok_or(CublasError(cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED))
    }

    /// The heuristic's best `count` algorithms for `call`, best first (none where it has none).
    fn heuristics(&self, call: &Call, count: usize) -> Result<Vec<Found>, CublasError> {
        let pref = Pref(lt::create_matmul_pref()?);
        let bytes = WORKSPACE_BYTES as u64;
        // SAFETY: the preference is live (owned by `pref`); the attribute takes a uint64,
        // copied from `bytes`.
        unsafe {
            lt::set_matmul_pref_attribute(
                pref.0,
                PrefAttr::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&bytes as *const u64).cast(),
                size_of::<u64>(),
            )
        }?;
        // SAFETY: the results are plain data, for which zero bytes are valid (a state of 0 is
        // CUBLAS_STATUS_SUCCESS).
        let mut results: Vec<sys::cublasLtMatmulHeuristicResult_t> =
            vec![unsafe { std::mem::zeroed() }; count];
        let mut returned = 0i32;
        // SAFETY: the handle and the descriptors are live; C and D share the `out` layout;
        // `results` has room for the `count` results asked for, and `returned` receives how
        // many were written.
        unsafe {
            sys::cublasLtMatmulAlgoGetHeuristic(
                self.handle,
                call.desc.0,
                call.first.0,
                call.second.0,
                call.out.0,
                call.out.0,
                pref.0,
                count as i32,
                results.as_mut_ptr(),
                &mut returned,
            )
        }
        .result()?;
        let returned = (returned.max(0) as usize).min(count);
        Ok(results[..returned]
            .iter()
            .filter(|r| r.state == cublasStatus_t::CUBLAS_STATUS_SUCCESS)
            .map(|r| Found {
                algo: r.algo,
                waves: r.wavesCount,
            })
            .collect())
    }

    /// Queues `D = alpha op(first) op(second) + beta C` (and the epilogue) as `call`
    /// describes it, on `stream`, with `found`'s algorithm and the whole workspace.
    ///
    /// # Safety
    /// `call`'s descriptors must be the ones `found` was chosen for, and the addresses those of
    /// live device memory holding what the layouts span (D and the epilogue's vectors
    /// writable, C readable where beta is not 0), alive until the work has run in stream order.
    #[allow(clippy::too_many_arguments)]
    unsafe fn matmul(
        &mut self,
        call: &Call,
        found: &Found,
        (alpha, beta): (f32, f32),
        (first, second): (u64, u64),
        (c, d): (u64, u64),
        stream: &CudaStream,
    ) -> Result<(), CublasError> {
        let workspace = self.workspace.device_ptr_mut(stream).0;
        // SAFETY: the handle is live and the rest is the caller's promise; alpha and beta are
        // host f32 values (the default pointer mode, scale type f32) that live through the
        // call; the workspace holds `WORKSPACE_BYTES`, the most the heuristic was allowed to ask
        // for.
        unsafe {
            lt::matmul(
                self.handle,
                call.desc.0,
                (&alpha as *const f32).cast(),
                (&beta as *const f32).cast(),
                first as *const c_void,
                call.first.0,
                second as *const c_void,
                call.second.0,
                c as *const c_void,
                call.out.0,
                d as *mut c_void,
                call.out.0,
                &found.algo,
                workspace as *mut c_void,
                WORKSPACE_BYTES,
                stream.cu_stream() as sys::cudaStream_t,
            )
        }
    }
}

/// A failed cuBLASLt call while doing `what`.
fn lt_error(e: CublasError, what: &str) -> BackendError {
    let kind = match e.0 {
        cublasStatus_t::CUBLAS_STATUS_ALLOC_FAILED => BackendErrorKind::OutOfMemory { bytes: 0 },
        _ => BackendErrorKind::Device,
    };
    BackendError::new(kind, format!("{what}: {:?}", e.0))
}

impl CudaBackend {
    /// `gemm_bias` on cuBLASLt: queues `c = alpha op(A) op(B) + beta C + bias` (bias per
    /// column), C being `base` where given (`gemm_bias_onto`) and `c` itself otherwise, and
    /// returns `true`; or returns `false` having queued nothing that changes `c` where
    /// cuBLASLt is off, missing, or has no algorithm for the shape: the caller then composes
    /// `gemm` and `copy_rows`. (Bf16 copies of A and B may have been made by then; the
    /// composed `gemm` multiplies them.)
    pub(crate) fn gemm_bias_lt(
        &self,
        g: &Gemm,
        a: &CudaBuf,
        b: &CudaBuf,
        bias: &CudaBuf,
        base: Option<&CudaBuf>,
        c: &mut CudaBuf,
    ) -> BResult<bool> {
        if !self.lt_takes(g) {
            return Ok(false);
        }
        crate::backend::need(bias, g.n, "gemm_bias", "bias")?;
        self.lt_product(g, a, b, Vector::Bias(bias), base, c)
    }

    /// `gemm_bias_grad` on cuBLASLt where the product multiplies bf16 copies (the bf16 mode's
    /// Linear layers): queues `c = alpha op(A) op(B) + beta C` and `db += ` the sums of `a`
    /// over the product's `k` (the epilogue writes them into scratch, which is then added) and
    /// returns `true`; or returns `false` having queued nothing that changes `c` or `db`: the
    /// caller then runs `gemm` and `copy_rows_backward`. The epilogue sums the bf16 copy of `a`
    /// in f32 in cuBLASLt's order, which is the rounding its product already takes; in the f32
    /// and TF32 modes the composed column sums keep their f64 partial sums.
    pub(crate) fn gemm_bias_grad_lt(
        &self,
        g: &Gemm,
        a: &CudaBuf,
        b: &CudaBuf,
        c: &mut CudaBuf,
        db: &mut CudaBuf,
    ) -> BResult<bool> {
        // alpha 1 (every Linear layer's): whether the epilogue scales its sums by alpha is not
        // something the product of a Linear layer needs to find out.
        if !self.lt_takes(g) || !g.trans_a || g.alpha != 1.0 || self.precision() != Precision::Bf16
        {
            return Ok(false);
        }
        let (a_len, b_len) = crate::ops::gemm_lens(g, a, b, c)?;
        if !self.bf16_gemm.copies(g, a_len, b_len) {
            return Ok(false);
        }
        crate::backend::need(db, g.m, "gemm_bias_grad", "db")?;
        // Room for the sums of every chunk of a split (`split_k.rs`), m floats each.
        let len = g.m * split_k::MAX_CHUNKS;
        let bytes = error::bytes_of::<f32>(len)?;
        // SAFETY: the epilogue writes all m sums of each chunk it runs before they are read.
        let mut sums = unsafe { self.stream.alloc::<f32>(len) }
            .map_err(|e| error::driver(e, "allocating bias-gradient sums", bytes))?;
        let psums = sums.device_ptr_mut(&self.stream).0;
        let epilogue = (Epilogue::BiasGrad, psums);
        // Each chunk's partial product and sums start 16 bytes on from the last's, at least.
        if self.weight_grad_split == WeightGradSplit::Auto && g.m % 4 == 0 {
            let (estimate, waves) = self.lt_chunks(g, epilogue)?;
            let chunks = self.tuned_chunks(g, (a, b), epilogue, (estimate, waves))?;
            if chunks > 1 && self.lt_split_product(g, a, b, epilogue, (chunks, waves), (c, db))? {
                return Ok(true);
            }
        }
        self.lt_weight_grad(g, (a, b), epilogue, (1, 0.0), (c, db))
    }

    /// The weight gradient `g` with the bias gradient `epilogue` sums: in `chunks` chunks
    /// (`lt_split_product`), or whole with the sums then added to `db`; `false`, with nothing
    /// queued that changes `c` or `db`, where cuBLASLt has no algorithm for it.
    fn lt_weight_grad(
        &self,
        g: &Gemm,
        (a, b): (&CudaBuf, &CudaBuf),
        (epilogue, psums): (Epilogue, u64),
        (chunks, waves): (usize, f32),
        (c, db): (&mut CudaBuf, &mut CudaBuf),
    ) -> BResult<bool> {
        if chunks > 1 {
            return self.lt_split_product(g, a, b, (epilogue, psums), (chunks, waves), (c, db));
        }
        debug_assert_eq!(epilogue, Epilogue::BiasGrad);
        if !self.lt_product(g, a, b, Vector::Sums(psums), None, c)? {
            return Ok(false);
        }
        let args = [Arg::Ptr(psums), self.ptr_mut(db)?, Arg::U64(g.m as u64)];
        self.launch(Kernel::Add, elementwise(g.m as u64), &args)
            .map(|()| true)
    }

    /// The cuBLASLt handle, opened at the first call; `None` where `libcublasLt` is missing.
    fn lt(&self) -> Option<&Mutex<Lt>> {
        self.lt
            .get_or_init(|| Lt::open(&self.stream).map(Mutex::new))
            .as_ref()
    }

    /// Into how many chunks of `k` rows `split_k::chunks` splits the bf16 weight gradient `g`
    /// with `epilogue`, by the waves of cuBLASLt's algorithm for the whole product (1 where
    /// there is none), and those waves.
    fn lt_chunks(&self, g: &Gemm, epilogue: (Epilogue, u64)) -> BResult<(usize, f32)> {
        let Some(lt) = self.lt() else {
            return Ok((1, 0.0));
        };
        let cm = column_major(g);
        let shape = Shape {
            cm,
            bf16_copies: true,
            out16: false,
            epilogue: epilogue.0,
            chunks: 1,
        };
        let mut lt = lt
            .lock()
            .map_err(|_| error::device("the cuBLASLt handle's lock is poisoned"))?;
        // Described only for the heuristic's first answer: every later step finds it known.
        let found = match lt.algos.get(&shape) {
            Some(known) => *known,
            None => {
                let (operand, compute) = types(Precision::Bf16, true);
                let call = describe(&cm, operand, compute, epilogue, cudaDataType::CUDA_R_32F, 1)
                    .map_err(|e| lt_error(e, &format!("describing {g:?} to cuBLASLt")))?;
                lt.algo(shape, &call)
            }
        };
        Ok(found.map_or((1, 0.0), |found| {
            (split_k::chunks(g.k, found.waves), found.waves)
        }))
    }

    /// The bf16 weight gradient `g` as `chunks` products over consecutive chunks of its `k`
    /// rows in one batched cuBLASLt call, each into a partial product of its own (scratch) and
    /// the epilogue's vector number i at i x m floats from `epilogue`'s address, then, in one
    /// launch, `c = beta C + ` the partials' sum and `db += ` the vectors' sum: `true` once
    /// queued; `false`, with nothing queued that changes `c` or `db`, where cuBLASLt has no
    /// algorithm for the batch. `whole_waves`, those of the unsplit product, go into the
    /// profile's label.
    fn lt_split_product(
        &self,
        g: &Gemm,
        a: &CudaBuf,
        b: &CudaBuf,
        (epilogue, pbias): (Epilogue, u64),
        (chunks, whole_waves): (usize, f32),
        (c, db): (&mut CudaBuf, &mut CudaBuf),
    ) -> BResult<bool> {
        let Some(lt) = self.lt() else {
            return Ok(false);
        };
        let (a_len, b_len) = crate::ops::gemm_lens(g, a, b, c)?;
        let cm = column_major(g);
        let (operand, compute) = types(Precision::Bf16, true);
        let out = cudaDataType::CUDA_R_32F;
        // A library that takes no batch of this kind leaves the product whole.
        let Ok(call) = describe(&cm, operand, compute, (epilogue, pbias), out, chunks) else {
            return Ok(false);
        };
        let shape = Shape {
            cm: ColumnMajor {
                k: cm.k / chunks,
                ..cm
            },
            bf16_copies: true,
            out16: false,
            epilogue,
            chunks,
        };
        let mut lt = lt
            .lock()
            .map_err(|_| error::device("the cuBLASLt handle's lock is poisoned"))?;
        let Some(found) = lt.algo(shape, &call) else {
            return Ok(false);
        };
        let len = g.m * g.n * chunks;
        let bytes = error::bytes_of::<f32>(len)?;
        // SAFETY: the batched product writes every partial before `sum_partials_f32` reads it.
        let mut parts = unsafe { self.stream.alloc::<f32>(len) }.map_err(|e| {
            error::driver(e, "allocating a split weight gradient's partials", bytes)
        })?;
        let pparts = parts.device_ptr_mut(&self.stream).0;
        let copies = self.bf16_operands((a, a_len), (b, b_len))?;
        let [pa, pb] = copies.addrs;
        let label = || {
            format!(
                "gemm_bias_grad {}x{}x{} TN lt bf16 copies, {chunks} chunks (waves {:.2}, \
                 {whole_waves:.2} whole)",
                g.m, g.n, g.k, found.waves
            )
        };
        // SAFETY: `call` is what `found` was chosen for. A (our B) and B (our A) are the bf16
        // copies of live buffers, locked in `copies` until this returns, holding the k x n and
        // k x m elements that the chunks span together (`gemm_lens`, and `chunks` divides k);
        // C and D are the partials, chunks x m x n floats just allocated (beta 0: C not read),
        // and the epilogue writes chunks x m floats at `pbias`, which the caller allocated.
        let queued = unsafe {
            self.lt_queue(
                &mut lt,
                (&call, shape, &found),
                g,
                0.0,
                [pb, pa, pparts, pparts],
                label,
            )
        }?;
        drop((copies, lt));
        if !queued {
            return Ok(false);
        }
        let args = [
            Arg::Ptr(pparts),
            self.ptr_mut(c)?,
            Arg::U64((g.m * g.n) as u64),
            Arg::F32(g.beta),
            Arg::Ptr(pbias),
            self.ptr_mut(db)?,
            Arg::U64(g.m as u64),
            Arg::F32(1.0),
            Arg::U32(chunks as u32),
        ];
        let n = (g.m * g.n + g.m) as u64;
        self.launch(Kernel::SumPartials, elementwise(n), &args)?;
        Ok(true)
    }

    /// Whether cuBLASLt may take the single product `g`: on (`MAE_CUDA_GEMM_BIAS`), one matrix,
    /// not empty (which cuBLASLt may refuse), alpha not 0 (for which cuBLASLt on an H200
    /// returned something other than C + bias: a 1 x 1 x 1 product with beta = 1, seen in
    /// `gemm_bias_is_the_product_plus_bias`).
    fn lt_takes(&self, g: &Gemm) -> bool {
        let empty = g.m == 0 || g.n == 0 || g.k == 0 || g.alpha == 0.0;
        self.gemm_bias == GemmBias::Lt && g.batch == 1 && !empty
    }

    /// The product of `gemm_bias_lt`, `gemm_bias_grad_lt` and `gemm_lt` with the epilogue of
    /// `vector`: `true` once queued, `false` where cuBLASLt is missing or has no algorithm for
    /// it.
    fn lt_product(
        &self,
        g: &Gemm,
        a: &CudaBuf,
        b: &CudaBuf,
        vector: Vector<'_>,
        base: Option<&CudaBuf>,
        c: &mut CudaBuf,
    ) -> BResult<bool> {
        let epilogue = vector.epilogue();
        let Some(lt) = self.lt() else {
            return Ok(false);
        };
        let (a_len, b_len) = crate::ops::gemm_lens(g, a, b, c)?;
        let cm = column_major(g);
        let bf16_copies =
            self.precision() == Precision::Bf16 && self.bf16_gemm.copies(g, a_len, b_len);
        let (operand, compute) = types(self.precision(), bf16_copies);
        // C's floats are read where beta is not 0: up to date before any lock is taken.
        let base = match base {
            Some(base) => {
                crate::backend::need(base, g.m * g.n, "gemm_bias_onto", "base")?;
                Some(self.read_addr(base)?)
            }
            None => {
                if g.beta != 0.0 {
                    self.floats_current(c)?;
                }
                None
            }
        };
        let mut lt = lt
            .lock()
            .map_err(|_| error::device("the cuBLASLt handle's lock is poisoned"))?;
        // The bias's copy is locked before A's and B's: one buffer as bias and operand (no
        // Linear layer's) keeps the f32 D rather than lock its copy twice.
        let bias_alone = match vector {
            Vector::Bias(bias) => !std::ptr::eq(bias, a) && !std::ptr::eq(bias, b),
            _ => true,
        };
        // D as `c`'s bf16 copy alone where `gemm_out16` allows it and cuBLASLt has an algorithm
        // for it, else f32.
        let want16 = base.is_none()
            && epilogue != Epilogue::BiasGrad
            && bias_alone
            && self.gemm_out16(g, bf16_copies, c);
        // The vector's address for an f32 D and for a bf16 D; the bias's copy stays locked
        // until the product reading it is queued.
        let mut bias16 = None;
        let (pvector, pvector16) = match vector {
            Vector::None => (0, 0),
            Vector::Sums(sums) => (sums, sums),
            Vector::Bias(bias) => {
                let floats = self.read_addr(bias)?;
                let copy = match want16 {
                    true => bias16.insert(self.bf16_vector(bias)?).addrs[0],
                    false => floats,
                };
                (floats, copy)
            }
        };
        let mut chosen = None;
        for out16 in [true, false] {
            if out16 && !want16 {
                continue;
            }
            let (ty, pvector) = if out16 {
                (cudaDataType::CUDA_R_16BF, pvector16)
            } else {
                (cudaDataType::CUDA_R_32F, pvector)
            };
            let call = describe(&cm, operand, compute, (epilogue, pvector), ty, 1)
                .map_err(|e| lt_error(e, &format!("describing {g:?} to cuBLASLt")))?;
            let shape = Shape {
                cm,
                bf16_copies,
                out16,
                epilogue,
                chunks: 1,
            };
            if let Some(found) = lt.algo(shape, &call) {
                chosen = Some((call, shape, found));
                break;
            }
        }
        let Some((call, shape, found)) = chosen else {
            return Ok(false);
        };
        // The copies stay locked until the product reading them is queued (bf16.rs).
        let mut copies = None;
        let (pa, pb) = if bf16_copies {
            let [pa, pb] = copies
                .insert(self.bf16_operands((a, a_len), (b, b_len))?)
                .addrs;
            (pa, pb)
        } else {
            (self.read_addr(a)?, self.read_addr(b)?)
        };
        c.renew();
        let mut out16 = if shape.out16 {
            self.produced_copy(c)?
        } else {
            None
        };
        // A bf16 D leaves c's floats untouched (not even allocated).
        let pd = match out16.as_mut() {
            Some(copy) => {
                copy.alone();
                copy.addr()
            }
            None if shape.out16 => {
                return Err(error::device("bug: a bf16 D without a bf16 copy to write"));
            }
            None => c.addr(&self.stream)?,
        };
        let pc = base.unwrap_or(pd);
        let label = || {
            let (ta, tb) = (
                if g.trans_a { "T" } else { "N" },
                if g.trans_b { "T" } else { "N" },
            );
            let copies = if bf16_copies { " bf16 copies" } else { "" };
            let onto = match (base.is_some(), shape.out16) {
                (true, _) => " onto",
                (false, true) => " bf16 out",
                (false, false) => "",
            };
            let op = match epilogue {
                Epilogue::Default => "gemm",
                Epilogue::Bias => "gemm_bias",
                Epilogue::BiasGrad => "gemm_bias_grad",
            };
            format!(
                "{op} {}x{}x{} {ta}{tb} lt{copies}{onto} (waves {:.2})",
                g.m, g.n, g.k, found.waves
            )
        };
        // SAFETY: `call` is what `found` was chosen for. A (our B) and B (our A) are device
        // addresses of live buffers, or of their bf16 copies (locked in `copies` until this
        // returns), holding at least the k x n and m x k elements their layouts span (checked
        // by `gemm_lens`); D is `c`, m x n, checked likewise, and C is D or `base`, a distinct
        // live buffer of at least m x n (checked above) with D's layout; where D is bf16 it is
        // `c`'s copy, room for all of `c` (exactly m x n), locked in `c` until this returns,
        // and C is D (beta 0: not read); the epilogue's vector holds the n values it reads
        // (the bias, checked by `gemm_bias_lt`: its floats, or for a bf16 D its bf16 copy of
        // all of it, locked in `bias16` until this returns) or the m it writes (the sums of
        // `gemm_bias_grad_lt`). The work is queued on the backend's stream.
        let queued = unsafe {
            self.lt_queue(
                &mut lt,
                (&call, shape, &found),
                g,
                g.beta,
                [pb, pa, pc, pd],
                label,
            )
        }?;
        drop(copies);
        drop(bias16);
        if queued {
            if let Some(copy) = out16 {
                copy.written(c.contents(), g.m * g.n);
            }
        }
        Ok(queued)
    }

    /// Queues `call` with `found`'s algorithm, or where tuning the one [`CudaBackend::tuned`]
    /// gives ([`Lt::matmul`], alpha from `g`, `beta`, the addresses of A, B, C and D in
    /// cuBLASLt's order) with the context bound, timed under `label()` where profiling: `true`
    /// once queued; `false` where cuBLASLt turns it down (`NOT_SUPPORTED`: the shape's
    /// algorithm is forgotten and the caller runs something else); an error naming `label()`
    /// otherwise.
    ///
    /// # Safety
    /// As [`Lt::matmul`].
    unsafe fn lt_queue(
        &self,
        lt: &mut Lt,
        (call, shape, found): (&Call, Shape, &Found),
        g: &Gemm,
        beta: f32,
        [first, second, c, d]: [u64; 4],
        label: impl Fn() -> String,
    ) -> BResult<bool> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| error::driver(e, "binding the CUDA context", 0))?;
        // SAFETY: the caller's promise, which `tuned` needs for C (where read) and the
        // epilogue's vector.
        let found = unsafe { self.tuned(lt, (call, shape, *found), g, beta, [first, second, c]) }?;
        let timer = self.profile.as_ref().map(|p| p.start(&self.stream));
        // SAFETY: the caller's promise; `found` is one of the heuristic's algorithms for
        // `call` (or the table's record of one).
        let status = unsafe {
            lt.matmul(
                call,
                &found,
                (g.alpha, beta),
                (first, second),
                (c, d),
                &self.stream,
            )
        };
        match status {
            Ok(()) => {}
            Err(CublasError(cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED)) => {
                lt.algos.insert(shape, None);
                if let Some(tuning) = lt.tuning.as_mut() {
                    tuning.forget(&shape);
                }
                return Ok(false);
            }
            Err(e) => {
                let what = format!("cublasLtMatmul for {} ({:?})", label(), self.precision());
                return Err(lt_error(e, &what));
            }
        }
        if let (Some(p), Some(t)) = (&self.profile, timer) {
            p.end(&self.stream, t, label(), crate::gemm::work(g));
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a device (or the fake driver): in bf16, `gemm_bias_grad` of a product that takes the
    /// copies sums dY's bf16 copy in cuBLASLt's epilogue; with the composed ops the column sums
    /// add the floats. dY holds 1 + 3 x 2^-9, which rounds to 1 + 2^-7 in bf16, so the two sums
    /// over 300 rows lie 0.59 apart.
    #[test]
    fn bias_gradients_in_the_epilogue_sum_the_bf16_copy() {
        use crate::bf16::Bf16Gemm;
        use mae::backend::Backend;
        let Some(mut be) = crate::test_device(Precision::Bf16) else {
            return;
        };
        be.bf16_gemm = Bf16Gemm::Auto;
        let (rows, out, inputs) = (300, 512, 512);
        let value = 1.0 + 3.0 * 2f32.powi(-9);
        let (dy, x) = (
            be.upload(&vec![value; rows * out]).unwrap(),
            be.upload(&vec![0.5; rows * inputs]).unwrap(),
        );
        let g = Gemm::new(out, inputs, rows).trans_a().accumulate();
        for (path, each) in [
            (GemmBias::Lt, 1.0 + 2f32.powi(-7)),
            (GemmBias::Composed, value),
        ] {
            be.gemm_bias = path;
            let mut dw = be.upload(&vec![0.0; out * inputs]).unwrap();
            let mut db = be.upload(&vec![0.25; out]).unwrap();
            be.gemm_bias_grad(&g, &dy, &x, &mut dw, &mut db).unwrap();
            let mut got = vec![f32::NAN; out];
            be.download(&db, &mut got).unwrap();
            let want = 0.25 + rows as f64 * each as f64;
            for (j, &v) in got.iter().enumerate() {
                assert!(
                    (v as f64 - want).abs() < 1e-3,
                    "{path:?}: db[{j}] = {v}, want {want}"
                );
            }
            let mut got = vec![f32::NAN; out * inputs];
            be.download(&dw, &mut got).unwrap();
            let want = rows as f64 * 0.5 * (1.0 + 2f64.powi(-7));
            assert!(
                got.iter().all(|&v| (v as f64 - want).abs() < 1e-3),
                "{path:?}: dW"
            );
        }
    }

    /// On a device (or the fake driver): a bf16 weight gradient whose output leaves the card
    /// mostly idle (512 x 512 from 2,048 rows) runs in the chunks that `split_k::chunks` gives
    /// for its unsplit product's waves, and on operands whose every sum is exact in f32 it
    /// equals the unsplit product (`off`) bitwise, its bias gradient likewise.
    #[test]
    fn weight_gradients_that_leave_the_card_idle_run_in_chunks() {
        use crate::bf16::Bf16Gemm;
        use mae::backend::Backend;
        let Some(mut be) = crate::test_device(Precision::Bf16) else {
            return;
        };
        be.bf16_gemm = Bf16Gemm::Auto;
        let (rows, out, inputs) = (2048, 512, 512);
        let wave = |i: usize, period: usize| ((i % period) as f32 - period as f32 / 2.0) / 16.0;
        let dy: Vec<f32> = (0..rows * out).map(|i| wave(i, 29)).collect();
        let x: Vec<f32> = (0..rows * inputs).map(|i| wave(i, 31)).collect();
        let (dy, x) = (be.upload(&dy).unwrap(), be.upload(&x).unwrap());
        let g = Gemm::new(out, inputs, rows).trans_a().accumulate();
        let mut results = vec![];
        for split in [WeightGradSplit::Auto, WeightGradSplit::Off] {
            be.weight_grad_split = split;
            let mut dw = be.upload(&vec![0.5; out * inputs]).unwrap();
            let mut db = be.upload(&vec![0.25; out]).unwrap();
            be.gemm_bias_grad(&g, &dy, &x, &mut dw, &mut db).unwrap();
            let (mut w, mut d) = (vec![f32::NAN; out * inputs], vec![f32::NAN; out]);
            be.download(&dw, &mut w).unwrap();
            be.download(&db, &mut d).unwrap();
            results.push((w, d));
        }
        let lt = be.lt().expect("cuBLASLt").lock().unwrap();
        let whole = lt
            .algos
            .iter()
            .find(|(s, _)| s.epilogue == Epilogue::BiasGrad && s.chunks == 1 && s.cm.k == rows)
            .and_then(|(_, found)| *found)
            .expect("the unsplit product's algorithm");
        let want = split_k::chunks(rows, whole.waves);
        let taken: Vec<usize> = lt
            .algos
            .iter()
            .filter(|(s, found)| s.chunks > 1 && found.is_some())
            .map(|(s, _)| s.chunks)
            .collect();
        // The fake driver's heuristic reports 16 tiles of 132 (0.12 waves): 4 chunks. A card's
        // own heuristic may already fill it, and then nothing is split.
        if be.device_name().contains("fake libcuda") {
            assert_eq!(want, 4, "waves {}", whole.waves);
        }
        let want: Vec<usize> = if want > 1 { vec![want] } else { vec![] };
        assert_eq!(taken, want, "waves {}", whole.waves);
        // The operands are multiples of 2^-4 under 1 (exact in bf16), so every product is a
        // multiple of 2^-8 and every sum of up to 2,048 of them needs under 20 bits: exact in
        // f32 in any order. Split or not, the results are the same numbers.
        let ((w, d), (w1, d1)) = (&results[0], &results[1]);
        for (i, (a, b)) in w.iter().zip(w1).enumerate() {
            assert_eq!(a, b, "dW[{i}]: split, whole");
        }
        for (i, (a, b)) in d.iter().zip(d1).enumerate() {
            assert_eq!(a, b, "db[{i}]: split, whole");
        }
    }

    #[test]
    fn the_choice_parses_and_refuses_unknown_values() {
        assert_eq!(GemmBias::parse("lt"), Ok(GemmBias::Lt));
        assert_eq!(GemmBias::parse("composed"), Ok(GemmBias::Composed));
        let e = GemmBias::parse("cublaslt").unwrap_err();
        assert_eq!(e.kind, BackendErrorKind::Unsupported);
    }

    #[test]
    fn operands_and_compute_follow_the_precision() {
        use cublasComputeType_t as C;
        assert_eq!(
            types(Precision::Bf16, true),
            (cudaDataType::CUDA_R_16BF, C::CUBLAS_COMPUTE_32F)
        );
        assert_eq!(
            types(Precision::F32, false),
            (cudaDataType::CUDA_R_32F, C::CUBLAS_COMPUTE_32F)
        );
        assert_eq!(
            types(Precision::Tf32, false).1,
            C::CUBLAS_COMPUTE_32F_FAST_TF32
        );
        assert_eq!(
            types(Precision::Bf16, false).1,
            C::CUBLAS_COMPUTE_32F_FAST_16BF
        );
    }
}
