//! The backend value: one device, one stream, one cuBLAS handle, and the kernels compiled at
//! first use.

use crate::bf16::Bf16Gemm;
use crate::buffer::CudaBuf;
use crate::device;
use crate::error;
use crate::kernels::{check_args, Arg, Compiled, Kernel};
use crate::lt::{GemmBias, Lt};
use crate::profile::{Profile, Resources, Work};
use crate::split_k::WeightGradSplit;
use crate::traffic;
use crate::upload::Upload;
use cudarc::cublas::sys::{cublasComputeType_t, cublasMath_t};
use cudarc::cublas::CudaBlas;
use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtrMut, LaunchConfig, PushKernelArg,
};
use mae::backend::{BResult, BackendError};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, OnceLock};

/// The arithmetic of the GEMMs (every other op is f32 with f64 reductions in every mode).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    /// IEEE f32 products (cuBLAS's default math mode, which never uses TF32 for sgemm): the
    /// mode the conformance tolerances are written for.
    #[default]
    F32,
    /// TF32 tensor cores for the GEMMs (10-bit mantissa products, f32 accumulation), several
    /// times faster on Ampere and later, with relative errors around 1e-3. Opt-in.
    Tf32,
    /// bf16 tensor cores for the GEMMs: cuBLAS rounds each f32 operand to bf16 (8-bit
    /// mantissa) and accumulates the products in f32. Weights, optimizer state, activations and
    /// every other op stay f32, so no loss scaling is needed; golden-file errors grow to the
    /// bounds of `mae_conformance::golden::Tolerances::REDUCED`. Opt-in.
    Bf16,
}

impl Precision {
    /// Every mode, f32 first.
    pub const ALL: [Precision; 3] = [Precision::F32, Precision::Tf32, Precision::Bf16];

    /// The backend's name in this mode (`cuda`, `cuda-tf32`, `cuda-bf16`), as programs take it
    /// after `--backend`.
    pub fn backend_name(self) -> &'static str {
        match self {
            Precision::F32 => "cuda",
            Precision::Tf32 => "cuda-tf32",
            Precision::Bf16 => "cuda-bf16",
        }
    }

    /// The mode called `name` by [`Precision::backend_name`].
    pub fn from_backend_name(name: &str) -> Option<Precision> {
        Precision::ALL
            .into_iter()
            .find(|p| p.backend_name() == name)
    }

    /// The compute type of `cublasGemmStridedBatchedEx` for the reduced modes; `None` for f32,
    /// which calls `cublasSgemmStridedBatched`.
    pub(crate) fn compute_type(self) -> Option<cublasComputeType_t> {
        match self {
            Precision::F32 => None,
            Precision::Tf32 => Some(cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32),
            Precision::Bf16 => Some(cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_16BF),
        }
    }
}

/// How the backend runs multi-head attention (`MAE_CUDA_ATTENTION` chooses by hand).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionPath {
    /// `composed`: split-heads, GEMM and softmax ops, with an `[N, H, T, T]` score tensor.
    Composed,
    /// `fused`: the flash-attention kernels of `kernels/attention.cu`, f32 throughout (one
    /// thread per row, no tensor cores).
    Fused,
    /// `mma`: the flash-attention kernels of `kernels/attention_mma.cu`, whose products run on
    /// bf16 tensor cores (compute capability 8.0 and later). The bf16 mode only: the f32 and
    /// TF32 modes, whose tolerances bf16 products would break, take [`AttentionPath::Fused`]
    /// when asked for it.
    TensorCores,
}

/// The `mae` backend on one NVIDIA GPU.
///
/// Build it with [`CudaBackend::new`]; where there is no driver, library or device that returns
/// a [`mae::BackendErrorKind::NoDevice`] error instead of panicking. The value is
/// `Send + Sync`: every op is queued on the backend's one stream, from any thread (the copies of
/// rewritten inputs on a second, `upload.rs`).
pub struct CudaBackend {
    pub(crate) ctx: Arc<CudaContext>,
    pub(crate) stream: Arc<CudaStream>,
    /// cuBLAS handles may be shared between threads, but calls that set state (the stream, the
    /// math mode) race with GEMMs; one lock keeps the handle simple to reason about.
    pub(crate) blas: Mutex<CudaBlas>,
    kernels: OnceLock<Result<Compiled, BackendError>>,
    arch: String,
    device_name: String,
    /// The device's multiprocessors: grids that launch one wave of resident blocks.
    pub(crate) multiprocessors: u64,
    precision: Precision,
    /// Device time per op when `MAE_CUDA_PROFILE` is set (printed when the backend is dropped).
    pub(crate) profile: Option<Profile>,
    /// `MAE_CUDA_ATTENTION=fused|composed|mma`: the attention path chosen by hand, for
    /// measuring one against the other; `None` takes the default of the precision.
    pub(crate) attention_choice: Option<AttentionPath>,
    /// Compute capability 8.0 or later: bf16 `mma.sync` for the tensor-core attention.
    bf16_tensor_cores: bool,
    /// `MAE_CUDA_ATTENTION_PREFETCH=on|off` (default on): whether the tensor-core attention
    /// stages each tile while computing the one before (`attention_mma.cu`, `mma_row_walk`).
    pub(crate) attention_prefetch: bool,
    /// `MAE_CUDA_ATTENTION_TAIL=split|whole` (default whole): whether a last block of the
    /// tensor-core attention whose rows fit in one warp (at 197 tokens) runs in the tail kernels,
    /// each tile split over its four warps (`attention_mma.cu`, `mma_has_tail`), or in the main
    /// kernels with three warps idle. On an H200 the tail kernels took 100 us a call, where the
    /// main kernels took 40-50 us longer running those blocks (2026-11-28): `whole` is faster.
    pub(crate) attention_tail_split: bool,
    /// `MAE_CUDA_ATTENTION_OCCUPANCY=default|more|fewer`: the tensor-core attention kernels ask
    /// for their own number of resident blocks per multiprocessor, one more (fewer registers)
    /// or one fewer (more registers) (`kernels::compile_options_for`).
    attention_blocks: i32,
    /// `MAE_CUDA_LAYERNORM_PARTIALS=fused|separate` (default fused): whether the LayerNorm
    /// backward sums its parameter gradients' partials in the dx kernel (`kernels/norm.cu`) or
    /// in a pass of its own.
    pub(crate) layernorm_fused: bool,
    /// `MAE_CUDA_BF16_GEMM`: where the bf16 mode rounds GEMM operands (`bf16.rs`).
    pub(crate) bf16_gemm: Bf16Gemm,
    /// `MAE_CUDA_GEMM_BIAS`: whether `gemm_bias` adds the bias in cuBLASLt's epilogue (`lt.rs`).
    pub(crate) gemm_bias: GemmBias,
    /// `MAE_CUDA_WEIGHT_GRAD_SPLIT`: whether bf16 weight gradients that cannot fill the card
    /// run in chunks of their rows (`split_k.rs`).
    pub(crate) weight_grad_split: WeightGradSplit,
    /// The cuBLASLt handle and workspace, opened at the first `gemm_bias`; `None` where
    /// `libcublasLt` is missing (the composed ops run).
    pub(crate) lt: OnceLock<Option<Mutex<Lt>>>,
    /// The device's memory in floats: no buffer can be longer.
    pub(crate) max_len: usize,
    /// `MAE_CUDA_UPLOAD`: whether rewrites from the host go through pinned staging, and on
    /// which stream (`upload.rs`).
    pub(crate) upload: Upload,
    /// The stream of overlapped uploads (`upload.rs`), created at the first.
    pub(crate) uploads: OnceLock<Arc<CudaStream>>,
    /// Bytes of floats allocated for buffers from `alloc_operand` whose floats an op needed
    /// (`buffer.rs`): none in a bf16 training step or embedding, which is the point.
    pub(crate) operand_floats: Arc<AtomicUsize>,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend")
            .field("device", &self.device_name)
            .field("ordinal", &self.ctx.ordinal())
            .field("arch", &self.arch)
            .field("precision", &self.precision)
            .finish()
    }
}

impl CudaBackend {
    /// The backend on GPU `ordinal` (0 is the first), with f32 GEMMs.
    pub fn new(ordinal: usize) -> BResult<CudaBackend> {
        Self::with_precision(ordinal, Precision::F32)
    }

    /// The backend on GPU `ordinal` with the given GEMM precision.
    pub fn with_precision(ordinal: usize, precision: Precision) -> BResult<CudaBackend> {
        let ctx = device::open(ordinal)?;
        device::no_panic(
            "setting up the CUDA backend",
            AssertUnwindSafe(|| Self::on_context(ctx, precision)),
        )
    }

    fn on_context(ctx: Arc<CudaContext>, precision: Precision) -> BResult<CudaBackend> {
        // SAFETY: every buffer and launch of this backend uses the one stream below, so stream
        // order alone keeps uses before frees and writes before reads; cudarc's per-buffer
        // events (two per allocation) would only add overhead. The one exception, the upload
        // stream (`upload.rs`), orders its copies against this stream with events of its own.
        unsafe { ctx.disable_event_tracking() };
        device::keep_pool_memory(&ctx)?;
        let stream = ctx.default_stream();
        let blas = CudaBlas::new(stream.clone()).map_err(|e| error::cublas(e, "cublasCreate"))?;
        // The reduced modes choose their arithmetic per call (the compute type of
        // `cublasGemmStridedBatchedEx`); the default mode keeps sgemm in IEEE f32.
        let mode = cublasMath_t::CUBLAS_DEFAULT_MATH;
        // SAFETY: the handle is live (owned by `blas`) and the mode is a valid enum value.
        unsafe { cudarc::cublas::sys::cublasSetMathMode(*blas.handle(), mode) }
            .result()
            .map_err(|e| error::cublas(e, "cublasSetMathMode"))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| error::driver(e, "reading the compute capability", 0))?;
        let device_name = ctx
            .name()
            .map_err(|e| error::driver(e, "reading the device name", 0))?;
        let total = ctx
            .total_mem()
            .map_err(|e| error::driver(e, "reading the device's memory size", 0))?;
        let multiprocessors = ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| error::driver(e, "reading the multiprocessor count", 0))?;
        let be = CudaBackend {
            max_len: total / size_of::<f32>(),
            ctx,
            stream,
            blas: Mutex::new(blas),
            kernels: OnceLock::new(),
            arch: crate::kernels::arch_for(major, minor),
            device_name,
            multiprocessors: multiprocessors.max(1) as u64,
            precision,
            profile: Profile::from_env(),
            attention_choice: attention_choice(major, minor)?,
            bf16_tensor_cores: major >= 8,
            bf16_gemm: Bf16Gemm::from_env()?,
            gemm_bias: GemmBias::from_env()?,
            weight_grad_split: WeightGradSplit::from_env()?,
            attention_prefetch: env_choice(
                "MAE_CUDA_ATTENTION_PREFETCH",
                &[("on", true), ("off", false)],
            )?
            .unwrap_or(true),
            attention_tail_split: env_choice(
                "MAE_CUDA_ATTENTION_TAIL",
                &[("split", true), ("whole", false)],
            )?
            .unwrap_or(false),
            attention_blocks: env_choice(
                "MAE_CUDA_ATTENTION_OCCUPANCY",
                &[("default", 0), ("more", 1), ("fewer", -1)],
            )?
            .unwrap_or(0),
            layernorm_fused: env_choice(
                "MAE_CUDA_LAYERNORM_PARTIALS",
                &[("fused", true), ("separate", false)],
            )?
            .unwrap_or(true),
            lt: OnceLock::new(),
            upload: Upload::from_env()?,
            uploads: OnceLock::new(),
            operand_floats: Arc::default(),
        };
        // `MAE_CUDA_GEMM_TUNE=FILE`: the products' algorithms measured and kept in FILE
        // (`lt/tuning.rs`). Unset or empty, in the bf16 mode, the built-in table made for this
        // cuBLASLt and card where there is one (`MAE_CUDA_GEMM_TABLE=builtin`, the default;
        // measured in that mode alone), else the heuristic's first choices.
        let builtin = env_choice(
            "MAE_CUDA_GEMM_TABLE",
            &[("builtin", true), ("heuristic", false)],
        )?
        .unwrap_or(true);
        if let Some(path) = std::env::var_os("MAE_CUDA_GEMM_TUNE").filter(|v| !v.is_empty()) {
            be.start_tuning(std::path::Path::new(&path))?;
        } else if builtin && be.precision == Precision::Bf16 {
            be.start_builtin_table()?;
        }
        Ok(be)
    }

    /// The device's name, as the driver reports it (`NVIDIA H100 80GB HBM3`).
    pub fn device_name(&self) -> &str {
        &self.device_name
    }

    /// The virtual architecture the kernels are compiled for (`compute_90`).
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// The GEMM precision.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// How attention runs: `MAE_CUDA_ATTENTION` if set, else the fused f32 kernels in the f32
    /// and TF32 modes, and in bf16 the tensor-core kernels (the composed ops on devices older
    /// than compute capability 8.0). Heads wider than the kernels take (64) are composed
    /// whatever the path.
    pub fn attention_path(&self) -> AttentionPath {
        match (self.attention_choice, self.precision) {
            (Some(AttentionPath::TensorCores), Precision::F32 | Precision::Tf32) => {
                AttentionPath::Fused
            }
            (Some(path), _) => path,
            (None, Precision::Bf16) if self.bf16_tensor_cores => AttentionPath::TensorCores,
            (None, Precision::Bf16) => AttentionPath::Composed,
            (None, _) => AttentionPath::Fused,
        }
    }

    /// Compiles the kernels now instead of at the first op (NVRTC takes about a second), and
    /// reports a compile failure.
    pub fn compile_kernels(&self) -> BResult<()> {
        self.compiled().map(|_| ())
    }

    fn compiled(&self) -> BResult<&Compiled> {
        self.kernels
            .get_or_init(|| {
                device::no_panic(
                    "compiling the kernels",
                    AssertUnwindSafe(|| {
                        Compiled::build(&self.ctx, &self.arch, self.attention_blocks)
                    }),
                )
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    /// Launches `kernel` with `args` (checked against its parameter list), or does nothing when
    /// `cfg` is `None` (no work).
    pub(crate) fn launch(
        &self,
        kernel: Kernel,
        cfg: Option<LaunchConfig>,
        args: &[Arg],
    ) -> BResult<()> {
        self.launch_described(kernel, cfg, args, |bytes| {
            (String::new(), Work { flops: 0.0, bytes })
        })
    }

    /// [`CudaBackend::launch`], with what the profile records beside the time: `describe`
    /// gets the bytes the launch moves by its arguments (`traffic.rs`) and gives the detail
    /// after the kernel's name in the label (such as the shape, so that calls of one kernel on
    /// different shapes are told apart) and the launch's work (its FLOPs, 0 for none worth a
    /// rate, and its bytes).
    pub(crate) fn launch_described(
        &self,
        kernel: Kernel,
        cfg: Option<LaunchConfig>,
        args: &[Arg],
        describe: impl FnOnce(Option<f64>) -> (String, Work),
    ) -> BResult<()> {
        let Some(cfg) = cfg else { return Ok(()) };
        check_args(kernel, args)?;
        let function = self.compiled()?.function(kernel);
        if let Some(p) = self
            .profile
            .as_ref()
            .filter(|p| p.is_new_kernel(kernel.name()))
        {
            p.record_kernel(kernel.name(), self.kernel_resources(function, &cfg));
        }
        let timer = self.profile.as_ref().map(|p| p.start(&self.stream));
        let mut launch = self.stream.launch_builder(function);
        for a in args {
            match a {
                Arg::Ptr(p) | Arg::U64(p) => launch.arg(p),
                Arg::U32(v) => launch.arg(v),
                Arg::F32(v) => launch.arg(v),
            };
        }
        // SAFETY: the arguments match the kernel's parameter list in number and kind
        // (`check_args`, whose table a unit test compares with the CUDA sources); pointers are
        // addresses of live buffers of this context, each at least as long as the elements the
        // kernel indexes (the callers check lengths before launching, see `need`), and the
        // buffers outlive the kernel because frees are stream-ordered after it.
        unsafe { launch.launch(cfg) }.map_err(|e| {
            error::driver(
                e,
                &format!(
                    "launching {} (grid {:?}, block {:?})",
                    kernel.name(),
                    cfg.grid_dim,
                    cfg.block_dim
                ),
                0,
            )
        })?;
        if let (Some(p), Some(t)) = (&self.profile, timer) {
            let blocks = cfg.grid_dim.0 as u64;
            let (detail, work) = describe(traffic::bytes(kernel, blocks, args));
            if detail.is_empty() {
                p.end(&self.stream, t, kernel.name(), work);
            } else {
                let label = format!("{} {detail}", kernel.name());
                p.end(&self.stream, t, label, work);
            }
        }
        Ok(())
    }

    /// What the driver made of `function` launched with `cfg` (the profile's second table).
    fn kernel_resources(
        &self,
        function: &CudaFunction,
        cfg: &LaunchConfig,
    ) -> Result<Resources, String> {
        let attribute = CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_MULTIPROCESSOR;
        let sm_threads = self
            .ctx
            .attribute(attribute)
            .map_err(|e| format!("reading the threads a multiprocessor holds: {e:?}"))?;
        Resources::of(function, cfg, sm_threads)
    }

    /// A scratch buffer of `len` 8-byte slots (two-pass reductions' doubles, the attention
    /// backward's row statistics), not filled; freed (stream-ordered) when dropped at the end of
    /// the op.
    pub(crate) fn scratch(&self, len: usize) -> BResult<CudaSlice<f64>> {
        let bytes = error::bytes_of::<f64>(len)?;
        // SAFETY: the kernels that use scratch write every element they later read.
        unsafe { self.stream.alloc::<f64>(len.max(1)) }
            .map_err(|e| error::driver(e, "allocating reduction scratch", bytes))
    }

    /// The kernel argument for a buffer the op reads (its floats brought up to date first:
    /// `bf16.rs`, [`CudaBackend::floats_current`]).
    pub(crate) fn ptr(&self, b: &CudaBuf) -> BResult<Arg> {
        Ok(Arg::Ptr(self.read_addr(b)?))
    }

    /// The device address of a buffer's floats, for an op that reads them.
    pub(crate) fn read_addr(&self, b: &CudaBuf) -> BResult<u64> {
        self.floats_current(b)?;
        b.addr(&self.stream)
    }

    /// The kernel argument for a buffer the op may read and writes: its contents get a new name.
    pub(crate) fn ptr_mut(&self, b: &mut CudaBuf) -> BResult<Arg> {
        self.floats_current(b)?;
        Ok(Arg::Ptr(b.addr_mut(&self.stream)?))
    }

    /// The kernel argument for a buffer the op overwrites without reading (every element the
    /// op's contract covers): no need to bring stale floats up to date first.
    pub(crate) fn ptr_out(&self, b: &mut CudaBuf) -> BResult<Arg> {
        Ok(Arg::Ptr(b.addr_mut(&self.stream)?))
    }

    pub(crate) fn scratch_ptr(&self, s: &mut CudaSlice<f64>) -> Arg {
        Arg::Ptr(s.device_ptr_mut(&self.stream).0)
    }
}

/// Reads `MAE_CUDA_ATTENTION` (`fused`, `composed` or `mma`, see [`AttentionPath`]) on a
/// device of compute capability `major.minor`; unset leaves the choice to the precision.
fn attention_choice(major: i32, minor: i32) -> BResult<Option<AttentionPath>> {
    let choices = [
        ("fused", AttentionPath::Fused),
        ("composed", AttentionPath::Composed),
        ("mma", AttentionPath::TensorCores),
    ];
    match env_choice("MAE_CUDA_ATTENTION", &choices)? {
        Some(AttentionPath::TensorCores) if major < 8 => Err(BackendError::new(
            mae::backend::BackendErrorKind::Unsupported,
            format!(
                "MAE_CUDA_ATTENTION=mma needs bf16 tensor cores (compute capability 8.0 or \
                 later); this device has {major}.{minor}"
            ),
        )),
        path => Ok(path),
    }
}

/// The backend switch `name` (an environment variable): the value of `choices` its setting
/// names, `None` when it is unset.
pub(crate) fn env_choice<T: Copy>(name: &str, choices: &[(&str, T)]) -> BResult<Option<T>> {
    match std::env::var(name) {
        Err(_) => Ok(None),
        Ok(v) => choice(name, &v, choices).map(Some),
    }
}

/// The value of `choices` that `v`, the setting of the switch `name`, names; an
/// `Unsupported` error listing the accepted settings for any other.
pub(crate) fn choice<T: Copy>(name: &str, v: &str, choices: &[(&str, T)]) -> BResult<T> {
    if let Some(&(_, value)) = choices.iter().find(|(setting, _)| *setting == v) {
        return Ok(value);
    }
    let names: Vec<String> = choices.iter().map(|(s, _)| format!("`{s}`")).collect();
    let expected = match names.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    };
    Err(BackendError::new(
        mae::backend::BackendErrorKind::Unsupported,
        format!("{name}={v:?}: expected {expected}"),
    ))
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        if let Some(p) = &self.profile {
            eprint!("{}", p.report());
        }
    }
}

/// `buf` holds at least `len` floats, or a [`mae::BackendErrorKind::Device`] error naming the
/// op: `mae` checks lengths before every call, so this only fires on a bug, but a kernel
/// writing past a buffer would corrupt other allocations instead of failing.
pub(crate) fn need(buf: &CudaBuf, len: usize, op: &str, what: &str) -> BResult<()> {
    if buf.len() >= len {
        Ok(())
    } else {
        Err(error::device(format!(
            "bug: {op}: {what} holds {} floats, the op needs {len}",
            buf.len()
        )))
    }
}

/// `value` as the `u64` kernels take.
pub(crate) fn u(value: usize) -> Arg {
    Arg::U64(value as u64)
}
