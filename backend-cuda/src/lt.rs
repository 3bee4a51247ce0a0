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
//! bf16 copies (`bf16.rs`) with f32 C, D and bias.
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
//! Where `libcublasLt` is missing, or it has no algorithm for a shape (the heuristic finds
//! none, or the call answers `NOT_SUPPORTED`), both ops run the composed ops instead,
//! without an error. `MAE_CUDA_GEMM_BIAS=composed` chooses the composed ops by hand (`lt`, the
//! default, takes cuBLASLt where it can).

#[cfg(test)]
use crate::backend::choice;
use crate::backend::{env_choice, CudaBackend, Precision};
use crate::buffer::CudaBuf;
use crate::error;
use crate::gemm::{column_major, ColumnMajor};
use crate::kernels::{Arg, Kernel};
use crate::launch::elementwise;
use cudarc::cublaslt::result::{self as lt, CublasError};
use cudarc::cublaslt::sys::{
    self, cublasComputeType_t, cublasLtEpilogue_t, cublasLtMatmulAlgo_t,
    cublasLtMatmulDescAttributes_t as DescAttr, cublasLtMatmulPreferenceAttributes_t as PrefAttr,
    cublasStatus_t, cudaDataType,
};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtrMut};
use mae::backend::{BResult, BackendError, BackendErrorKind, Gemm};
use std::collections::HashMap;
use std::ffi::c_void;
use std::panic::catch_unwind;
use std::sync::{Arc, Mutex};

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
    /// `CUBLASLT_EPILOGUE_BIAS`: adds it to every row of our C (`gemm_bias`).
    Bias,
    /// `CUBLASLT_EPILOGUE_BGRADB`: writes into it the sums of our A over the product's `k`, one
    /// per row of our C (`gemm_bias_grad`: `dW = dY^T X` with `db = ` dY's column sums).
    BiasGrad,
}

/// What the heuristic's choice depends on: the column-major call, the operands' type and the
/// epilogue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Shape {
    cm: ColumnMajor,
    bf16_copies: bool,
    /// Whether D is bf16 (a buffer's copy alone, `gemm_out16`).
    out16: bool,
    epilogue: Epilogue,
}

/// A cuBLASLt handle, its workspace, and the algorithm chosen per shape (`None`: cuBLASLt has
/// none, the composed ops run).
pub(crate) struct Lt {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    algos: HashMap<Shape, Option<cublasLtMatmulAlgo_t>>,
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
/// and C and D of type `out`.
fn describe(
    cm: &ColumnMajor,
    operand: cudaDataType,
    compute: cublasComputeType_t,
    (epilogue, bias): (Epilogue, u64),
    out: cudaDataType,
) -> Result<Call, CublasError> {
    let desc = Desc(lt::create_matmul_desc(compute, cudaDataType::CUDA_R_32F)?);
    // cublasOperation_t as cuBLASLt's attributes take it: an int32, N = 0, T = 1.
    let op = |t: bool| -> i32 { t as i32 };
    desc.set(DescAttr::CUBLASLT_MATMUL_DESC_TRANSA, &op(cm.trans_first))?;
    desc.set(DescAttr::CUBLASLT_MATMUL_DESC_TRANSB, &op(cm.trans_second))?;
    // cuBLASLt's B is our A (`gemm.rs`): BGRADB sums our A over k, one value per column of
    // cuBLASLt's D, that is per row of our C.
    let epilogue = match epilogue {
        Epilogue::Bias => cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS,
        Epilogue::BiasGrad => cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BGRADB,
    };
    desc.set(DescAttr::CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue)?;
    let bias_ptr = bias as *const c_void;
    desc.set(DescAttr::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias_ptr)?;
    // f32 whatever D is (the default would follow D, and a bf16 D must not make it bf16).
    desc.set(
        DescAttr::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE,
        &cudaDataType::CUDA_R_32F,
    )?;
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
    fn algo(&mut self, shape: Shape, call: &Call) -> Option<cublasLtMatmulAlgo_t> {
        if let Some(known) = self.algos.get(&shape) {
            return *known;
        }
        let found = self.heuristic(call).ok();
        self.algos.insert(shape, found);
        found
    }

    fn heuristic(&self, call: &Call) -> Result<cublasLtMatmulAlgo_t, CublasError> {
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
        // SAFETY: the handle and the descriptors are live; C and D share the `out` layout.
        let found = unsafe {
            lt::get_matmul_algo_heuristic(
                self.handle,
                call.desc.0,
                call.first.0,
                call.second.0,
                call.out.0,
                call.out.0,
                pref.0,
            )
        }?;
        Ok(found.algo)
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
        let pbias = self.read_addr(bias)?;
        self.lt_product(g, a, b, (Epilogue::Bias, pbias), base, c)
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
        let bytes = error::bytes_of::<f32>(g.m)?;
        // SAFETY: the epilogue writes all m sums before `add_f32` reads them.
        let mut sums = unsafe { self.stream.alloc::<f32>(g.m) }
            .map_err(|e| error::driver(e, "allocating bias-gradient sums", bytes))?;
        let psums = sums.device_ptr_mut(&self.stream).0;
        if !self.lt_product(g, a, b, (Epilogue::BiasGrad, psums), None, c)? {
            return Ok(false);
        }
        let args = [Arg::Ptr(psums), self.ptr_mut(db)?, Arg::U64(g.m as u64)];
        self.launch(Kernel::Add, elementwise(g.m as u64), &args)
            .map(|()| true)
    }

    /// Whether cuBLASLt may take the single product `g`: on (`MAE_CUDA_GEMM_BIAS`), one matrix,
    /// not empty (which cuBLASLt may refuse), alpha not 0 (for which cuBLASLt on an H200
    /// returned something other than C + bias: a 1 x 1 x 1 product with beta = 1, seen in
    /// `gemm_bias_is_the_product_plus_bias`).
    fn lt_takes(&self, g: &Gemm) -> bool {
        let empty = g.m == 0 || g.n == 0 || g.k == 0 || g.alpha == 0.0;
        self.gemm_bias == GemmBias::Lt && g.batch == 1 && !empty
    }

    /// The product of `gemm_bias_lt` and `gemm_bias_grad_lt` with `epilogue` on the f32 vector
    /// at the given device address: `true` once queued, `false` where cuBLASLt is missing or
    /// has no algorithm for it.
    fn lt_product(
        &self,
        g: &Gemm,
        a: &CudaBuf,
        b: &CudaBuf,
        (epilogue, pbias): (Epilogue, u64),
        base: Option<&CudaBuf>,
        c: &mut CudaBuf,
    ) -> BResult<bool> {
        let Some(lt) = self
            .lt
            .get_or_init(|| Lt::open(&self.stream).map(Mutex::new))
        else {
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
        // D as `c`'s bf16 copy alone where `gemm_out16` allows it and cuBLASLt has an algorithm
        // for it, else f32.
        let want16 =
            base.is_none() && epilogue == Epilogue::Bias && self.gemm_out16(g, bf16_copies, c);
        let mut chosen = None;
        for out16 in [true, false] {
            if out16 && !want16 {
                continue;
            }
            let ty = if out16 {
                cudaDataType::CUDA_R_16BF
            } else {
                cudaDataType::CUDA_R_32F
            };
            let call = describe(&cm, operand, compute, (epilogue, pbias), ty)
                .map_err(|e| lt_error(e, &format!("describing {g:?} to cuBLASLt")))?;
            let shape = Shape {
                cm,
                bf16_copies,
                out16,
                epilogue,
            };
            if let Some(algo) = lt.algo(shape, &call) {
                chosen = Some((call, shape, algo));
                break;
            }
        }
        let Some((call, shape, algo)) = chosen else {
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
        self.ctx
            .bind_to_thread()
            .map_err(|e| error::driver(e, "binding the CUDA context", 0))?;
        let timer = self.profile.as_ref().map(|p| p.start(&self.stream));
        let lt = &mut *lt;
        let workspace = lt.workspace.device_ptr_mut(&self.stream).0;
        // SAFETY: the handle and descriptors are live; `algo` came from the heuristic for
        // these descriptors. A (our B) and B (our A) are device addresses of live buffers, or
        // of their bf16 copies (locked in `copies` until this returns), holding at least the
        // k x n and m x k elements their layouts span (checked by `gemm_lens`); D is `c`, m x n,
        // checked likewise, and C is D or `base`, a distinct live buffer of at least m x n
        // (checked above) with D's layout; where D is bf16 it is `c`'s copy, room for all of
        // `c` (exactly m x n), locked in `c` until this returns, and C is D (beta 0: not read);
        // the epilogue's vector holds the n floats it reads (the bias, checked by
        // `gemm_bias_lt`) or the m it writes (the sums of `gemm_bias_grad_lt`). alpha and
        // beta are host f32 values (the default pointer mode, scale type f32) that live
        // through the call; the workspace holds `WORKSPACE_BYTES`, the most the heuristic was
        // allowed to ask for. The work is queued on the backend's stream.
        let status = unsafe {
            lt::matmul(
                lt.handle,
                call.desc.0,
                (&g.alpha as *const f32).cast(),
                (&g.beta as *const f32).cast(),
                pb as *const c_void,
                call.first.0,
                pa as *const c_void,
                call.second.0,
                pc as *const c_void,
                call.out.0,
                pd as *mut c_void,
                call.out.0,
                &algo,
                workspace as *mut c_void,
                WORKSPACE_BYTES,
                self.stream.cu_stream() as sys::cudaStream_t,
            )
        };
        drop(copies);
        match status {
            Ok(()) => {
                if let Some(copy) = out16 {
                    copy.written(c.contents(), g.m * g.n);
                }
            }
            Err(CublasError(cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED)) => {
                lt.algos.insert(shape, None);
                return Ok(false);
            }
            Err(e) => {
                return Err(lt_error(
                    e,
                    &format!(
                        "cublasLtMatmul for {g:?}, {epilogue:?} epilogue ({:?})",
                        self.precision()
                    ),
                ))
            }
        }
        if let (Some(p), Some(t)) = (&self.profile, timer) {
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
                Epilogue::Bias => "gemm_bias",
                Epilogue::BiasGrad => "gemm_bias_grad",
            };
            let label = format!("{op} {}x{}x{} {ta}{tb} lt{copies}{onto}", g.m, g.n, g.k);
            p.end(&self.stream, t, label);
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
