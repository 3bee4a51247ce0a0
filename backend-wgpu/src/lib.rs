//! # mae-backend-wgpu: the `mae` compute backend on any GPU through wgpu
//!
//! Every [`Backend`] op is a WGSL compute shader (`src/shaders/*.wgsl`, one file per op family,
//! mirrored by one Rust module each), run through wgpu on Vulkan, Metal or DX12, or on Mesa's
//! lavapipe, the Vulkan driver on the CPU that CI uses.
//!
//! How it works:
//! - Buffers are [`GpuBuf`]s: a `wgpu::Buffer` and a length. Ops record compute passes into one
//!   pending command encoder that is submitted every few dozen ops and before the host reads or
//!   writes a buffer, so ops never wait for the device; [`Backend::download`] and
//!   [`Backend::sync`] do.
//! - Pipelines are compiled on first use and cached (`kernel.rs`). Each launch gets its scalar
//!   parameters in a small uniform block.
//! - GEMM has four kernels ([`GemmKernel`], `gemm.rs`): on GPUs, 128 x 128 tiles of C per
//!   workgroup with A and B staged in workgroup memory as vectors, double-buffered, the next
//!   step prefetched into registers, and an 8 x 8 register block per invocation
//!   (`shaders/gemm_fast.wgsl`), weight gradients split along k; on CPU adapters such as
//!   lavapipe, where barriers are slow, an 8 x 8 register block per invocation without
//!   workgroup memory (`shaders/gemm.wgsl`). `MAE_WGPU_GEMM=fast|wide|tiled|register`
//!   overrides the choice (`wide`, `shaders/gemm_wide.wgsl`, is the fast kernel's blocking
//!   with scalar tile reads and no prefetch; `tiled`, `shaders/gemm_tiled.wgsl`, 64 x 64
//!   blocks with 4 x 4 per invocation).
//! - Fused ops: `bias_gelu_forward` is one pass (bitwise the two-op default), and attention can
//!   be fused ([`AttentionPath`], `attention.rs`): an online-softmax forward that keeps one
//!   log-sum-exp per score row instead of the `[tokens, tokens]` probabilities, and a
//!   deterministic two-pass backward. The model composes attention by default, which measured
//!   faster on lavapipe and on an H200; `MAE_WGPU_ATTENTION=fused|composed` overrides.
//! - Row kernels ([`RowKernel`], `per_row.rs`): LayerNorm, the norm-pix target and softmax
//!   take one workgroup of 64 invocations per row on GPUs, each invocation striding over the
//!   columns so that reads coalesce, the partial sums combined by a fixed tree in workgroup
//!   memory (`shaders/row_group.wgsl`); on CPU adapters one invocation walks each row, without
//!   barriers. `MAE_WGPU_ROWS=workgroup|invocation` overrides.
//! - `MAE_WGPU_PROFILE=1` prints the wall time per kernel and grid when the backend is dropped
//!   (`profile.rs`; each launch then waits for the queue, so the run is slower).
//! - Reductions (LayerNorm statistics, softmax sums, parameter gradients, the loss) run in `f32`
//!   with compensated summation in a fixed order: deterministic run to run, and within the
//!   conformance tolerances of the `f64`-accumulating CPU backend. GELU is the exact `erf` form.
//! - Errors: no adapter is [`BackendErrorKind::NoDevice`]; a buffer longer than one storage
//!   binding is [`BackendErrorKind::TooLarge`]; an allocation the device refuses is
//!   [`BackendErrorKind::OutOfMemory`]; validation errors and device loss, which wgpu reports
//!   asynchronously, become [`BackendErrorKind::Device`] at the next `sync` or `download`.
//!   Nothing panics on these paths.
//!
//! ```
//! use mae::backend::{Backend, Gemm};
//! use mae_backend_wgpu::WgpuBackend;
//!
//! let gpu = match WgpuBackend::new() {
//!     Ok(gpu) => gpu,
//!     // No GPU and no lavapipe on this machine.
//!     Err(e) => {
//!         eprintln!("skipped: {e}");
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
#![deny(unsafe_code)]
#![warn(missing_docs)]
// The trait's signatures (llm.c style: buffers, then dimensions) carry many arguments.
#![allow(clippy::too_many_arguments)]

mod activation;
mod adamw;
mod attention;
mod buffer;
mod columns;
mod context;
mod gemm;
mod kernel;
mod loss;
mod memory;
mod norm;
mod per_row;
mod profile;
mod rows;

pub use attention::AttentionPath;
pub use buffer::GpuBuf;
pub use gemm::GemmKernel;
pub use per_row::RowKernel;

use context::Gpu;
use kernel::{Kernel, Kernels};
use mae::backend::{AdamWStep, Attention, BResult, Backend, Gather, Gemm, Heads, Patchify, RowMap};

/// A buffer of `f32`.
pub type Buf = GpuBuf<f32>;
/// A buffer of `u32` indices.
pub type Idx = GpuBuf<u32>;

/// The wgpu backend: a device, its queue, the compiled pipelines and the work not yet submitted.
/// It is `Send + Sync`; ops from several threads are recorded in the order they take the lock.
pub struct WgpuBackend {
    gpu: Gpu,
    kernels: Kernels,
    /// The GEMM kernel for this adapter (`gemm.rs`).
    gemm_kernel: GemmKernel,
    /// Whether the model's attention takes the fused kernels (`attention.rs`).
    attention_path: AttentionPath,
    /// Invocations per workgroup of the attention kernels: one SIMD register of rows on a CPU
    /// adapter (8 lanes of 32 bits on lavapipe's 256-bit vectors: fewer idle invocations past
    /// the last row of a short sequence, though lavapipe measured no difference), 64 on GPUs.
    attention_wg: u32,
    /// The variant of the row kernels for this adapter (`per_row.rs`).
    row_kernel: RowKernel,
}

impl std::fmt::Debug for WgpuBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WgpuBackend")
            .field("adapter", &self.gpu.info.name)
            .field("backend", &self.gpu.info.backend)
            .field("gemm", &self.gemm_kernel)
            .field("attention", &self.attention_path)
            .field("rows", &self.row_kernel)
            .finish()
    }
}

impl WgpuBackend {
    /// The backend on wgpu's default adapter (environment variables `WGPU_BACKEND`,
    /// `WGPU_ADAPTER_NAME` and `WGPU_POWER_PREF` choose among several). Fails with
    /// [`BackendErrorKind::NoDevice`](mae::BackendErrorKind::NoDevice) when there is none, and
    /// with [`BackendErrorKind::Unsupported`](mae::BackendErrorKind::Unsupported) when
    /// `MAE_WGPU_GEMM`, `MAE_WGPU_ATTENTION` or `MAE_WGPU_ROWS` holds an unknown value.
    pub fn new() -> BResult<WgpuBackend> {
        WgpuBackend::from_gpu(Gpu::new()?)
    }

    /// The backend on a given adapter (from `wgpu::Instance::enumerate_adapters`).
    pub fn with_adapter(adapter: wgpu::Adapter) -> BResult<WgpuBackend> {
        WgpuBackend::from_gpu(Gpu::with_adapter(adapter)?)
    }

    /// The backend on `gpu`, its kernels chosen from the adapter and the environment
    /// (`MAE_WGPU_GEMM`, `MAE_WGPU_ATTENTION`, `MAE_WGPU_ROWS`, read here once).
    fn from_gpu(gpu: Gpu) -> BResult<WgpuBackend> {
        let cpu = gpu.info.device_type == wgpu::DeviceType::Cpu;
        let gemm_kernel =
            GemmKernel::choose(GemmKernel::from_env()?, gpu.info.device_type, &gpu.limits);
        Ok(WgpuBackend {
            gemm_kernel,
            attention_path: AttentionPath::choose(AttentionPath::from_env()?),
            attention_wg: if cpu { 8 } else { 64 },
            row_kernel: RowKernel::choose(RowKernel::from_env()?, gpu.info.device_type),
            gpu,
            kernels: Kernels::new(),
        })
    }

    /// The GEMM kernel in use: [`GemmKernel::Fast`] on GPUs (where the limits hold it),
    /// [`GemmKernel::Register`] on CPU adapters such as lavapipe
    /// (`MAE_WGPU_GEMM=fast|wide|tiled|register` overrides).
    pub fn gemm_kernel(&self) -> GemmKernel {
        self.gemm_kernel
    }

    /// How the model computes attention here: [`AttentionPath::Composed`] unless
    /// `MAE_WGPU_ATTENTION=fused` asks for the fused kernels, which measured slower on lavapipe
    /// and on an H200.
    pub fn attention_path(&self) -> AttentionPath {
        self.attention_path
    }

    /// The variant of the row kernels in use: [`RowKernel::Workgroup`] on GPUs,
    /// [`RowKernel::Invocation`] on CPU adapters such as lavapipe
    /// (`MAE_WGPU_ROWS=workgroup|invocation` overrides).
    pub fn row_kernel(&self) -> RowKernel {
        self.row_kernel
    }

    /// The adapter in use: its name, driver and API.
    pub fn adapter_info(&self) -> &wgpu::AdapterInfo {
        &self.gpu.info
    }

    fn launch(
        &self,
        kernel: Kernel,
        params: &[u32],
        bufs: &[&wgpu::Buffer],
        groups: [u32; 3],
    ) -> BResult<()> {
        self.kernels.launch(&self.gpu, kernel, params, bufs, groups)
    }

    /// A fresh one-float buffer for an op's intermediate scalar.
    fn scratch(&self) -> BResult<Buf> {
        buffer::alloc(&self.gpu, 1)
    }
}

impl Backend for WgpuBackend {
    type Buf = Buf;
    type Idx = Idx;

    fn name(&self) -> &str {
        "wgpu"
    }

    /// The longest buffer one storage binding can hold (128 MiB on lavapipe, so 32 Mi floats).
    fn max_buf_len(&self) -> usize {
        buffer::max_len(&self.gpu)
    }

    // ---- memory -----------------------------------------------------------------------------

    fn alloc(&self, len: usize) -> BResult<Buf> {
        buffer::alloc(&self.gpu, len)
    }

    fn upload(&self, host: &[f32]) -> BResult<Buf> {
        buffer::upload(&self.gpu, &self.kernels, host)
    }

    fn write(&self, dst: &mut Buf, host: &[f32]) -> BResult<()> {
        buffer::write(&self.gpu, &self.kernels, dst, host)
    }

    fn download(&self, src: &Buf, host: &mut [f32]) -> BResult<()> {
        buffer::download(&self.gpu, &self.kernels, src, host)
    }

    fn len(&self, buf: &Buf) -> usize {
        buf.len()
    }

    fn upload_idx(&self, host: &[u32]) -> BResult<Idx> {
        buffer::upload(&self.gpu, &self.kernels, host)
    }

    fn write_idx(&self, dst: &mut Idx, host: &[u32]) -> BResult<()> {
        buffer::write(&self.gpu, &self.kernels, dst, host)
    }

    fn idx_len(&self, idx: &Idx) -> usize {
        idx.len()
    }

    fn fill(&self, dst: &mut Buf, value: f32) -> BResult<()> {
        memory::fill(self, dst, value)
    }

    fn copy(&self, src: &Buf, dst: &mut Buf) -> BResult<()> {
        memory::copy(self, src, dst)
    }

    fn sync(&self) -> BResult<()> {
        self.kernels.flush(&self.gpu);
        self.gpu.wait()
    }

    // ---- dense ------------------------------------------------------------------------------

    fn gemm(&self, g: &Gemm, a: &Buf, b: &Buf, c: &mut Buf) -> BResult<()> {
        gemm::gemm(self, g, a, b, c)
    }

    fn add(&self, src: &Buf, dst: &mut Buf) -> BResult<()> {
        memory::add(self, src, dst)
    }

    fn scale(&self, buf: &mut Buf, s: f32) -> BResult<()> {
        memory::scale(self, buf, s)
    }

    fn scale_rows(
        &self,
        src: &Buf,
        scales: &Buf,
        dst: &mut Buf,
        rows_per_scale: usize,
        cols: usize,
        accumulate: bool,
    ) -> BResult<()> {
        memory::scale_rows(self, src, scales, dst, rows_per_scale, cols, accumulate)
    }

    // ---- rows -------------------------------------------------------------------------------

    fn copy_rows(&self, src: &Buf, dst: &mut Buf, map: &RowMap, accumulate: bool) -> BResult<()> {
        rows::copy_rows(self, src, dst, map, accumulate)
    }

    fn copy_rows_backward(&self, d_dst: &Buf, d_src: &mut Buf, map: &RowMap) -> BResult<()> {
        rows::copy_rows_backward(self, d_dst, d_src, map)
    }

    fn gather_rows(&self, src: &Buf, idx: &Idx, dst: &mut Buf, g: &Gather) -> BResult<()> {
        rows::gather_rows(self, src, idx, dst, g)
    }

    fn gather_rows_backward(
        &self,
        d_dst: &Buf,
        idx: &Idx,
        d_src: &mut Buf,
        g: &Gather,
    ) -> BResult<()> {
        rows::gather_rows_backward(self, d_dst, idx, d_src, g)
    }

    fn patchify(&self, imgs: &Buf, out: &mut Buf, p: &Patchify) -> BResult<()> {
        rows::patchify(self, imgs, out, p)
    }

    fn split_heads(&self, x: &Buf, heads: &mut Buf, h: &Heads) -> BResult<()> {
        rows::split_heads(self, x, heads, h)
    }

    fn merge_heads(&self, heads: &Buf, x: &mut Buf, h: &Heads) -> BResult<()> {
        rows::merge_heads(self, heads, x, h)
    }

    // ---- normalization and activation -------------------------------------------------------

    fn layernorm_forward(
        &self,
        x: &Buf,
        gamma: &Buf,
        beta: &Buf,
        y: &mut Buf,
        mean: &mut Buf,
        rstd: &mut Buf,
        rows: usize,
        cols: usize,
        eps: f32,
    ) -> BResult<()> {
        norm::layernorm_forward(self, x, gamma, beta, y, mean, rstd, rows, cols, eps)
    }

    fn layernorm_backward(
        &self,
        dy: &Buf,
        x: &Buf,
        gamma: &Buf,
        mean: &Buf,
        rstd: &Buf,
        dx: &mut Buf,
        dgamma: &mut Buf,
        dbeta: &mut Buf,
        rows: usize,
        cols: usize,
    ) -> BResult<()> {
        norm::layernorm_backward(
            self, dy, x, gamma, mean, rstd, dx, dgamma, dbeta, rows, cols,
        )
    }

    fn gelu_forward(&self, x: &Buf, y: &mut Buf) -> BResult<()> {
        activation::gelu_forward(self, x, y)
    }

    /// One pass: the bias add and the GELU of the two-op default, bitwise.
    fn bias_gelu_forward(
        &self,
        bias: &Buf,
        pre: &mut Buf,
        act: &mut Buf,
        rows: usize,
        cols: usize,
    ) -> BResult<()> {
        activation::bias_gelu_forward(self, bias, pre, act, rows, cols)
    }

    /// Overwriting is a fill and the accumulating kernel: the pass it saves on other backends
    /// is not where wgpu's time goes (docs/results-gpu.md).
    fn gelu_backward(&self, x: &Buf, dy: &Buf, dx: &mut Buf, accumulate: bool) -> BResult<()> {
        if !accumulate {
            memory::fill(self, dx, 0.0)?;
        }
        activation::gelu_backward(self, x, dy, dx)
    }

    fn softmax_forward(
        &self,
        x: &Buf,
        y: &mut Buf,
        rows: usize,
        cols: usize,
        scale: f32,
    ) -> BResult<()> {
        activation::softmax_forward(self, x, y, rows, cols, scale)
    }

    fn softmax_backward(
        &self,
        y: &Buf,
        dy: &Buf,
        dx: &mut Buf,
        rows: usize,
        cols: usize,
        scale: f32,
    ) -> BResult<()> {
        activation::softmax_backward(self, y, dy, dx, rows, cols, scale)
    }

    // ---- fused attention ------------------------------------------------------------------

    /// True on the fused path for head widths up to 64 and at most 65535 (image, head) pairs.
    fn fused_attention(&self, a: &Attention) -> bool {
        self.attention_path == AttentionPath::Fused && attention::supported(a)
    }

    /// Runs for head widths up to 64 and at most 65535 (image, head) pairs, whichever path the
    /// model takes; other dims are an `Unsupported` error.
    fn attention_forward(
        &self,
        qkv: &Buf,
        out: &mut Buf,
        lse: &mut Buf,
        a: &Attention,
    ) -> BResult<()> {
        attention::forward(self, qkv, out, lse, a)
    }

    fn attention_backward(
        &self,
        qkv: &Buf,
        out: &Buf,
        lse: &Buf,
        d_out: &Buf,
        d_qkv: &mut Buf,
        a: &Attention,
    ) -> BResult<()> {
        attention::backward(self, qkv, out, lse, d_out, d_qkv, a)
    }

    // ---- loss -------------------------------------------------------------------------------

    fn normalize_rows(
        &self,
        x: &Buf,
        y: &mut Buf,
        rows: usize,
        cols: usize,
        eps: f32,
    ) -> BResult<()> {
        norm::normalize_rows(self, x, y, rows, cols, eps)
    }

    fn masked_mse_forward(
        &self,
        pred: &Buf,
        target: &Buf,
        mask: &Buf,
        loss: &mut Buf,
        rows: usize,
        cols: usize,
    ) -> BResult<()> {
        loss::masked_mse_forward(self, pred, target, mask, loss, rows, cols)
    }

    fn masked_mse_backward(
        &self,
        pred: &Buf,
        target: &Buf,
        mask: &Buf,
        d_pred: &mut Buf,
        rows: usize,
        cols: usize,
        d_loss: f32,
    ) -> BResult<()> {
        loss::masked_mse_backward(self, pred, target, mask, d_pred, rows, cols, d_loss)
    }

    // ---- optimizer --------------------------------------------------------------------------

    fn adamw(
        &self,
        param: &mut Buf,
        grad: &Buf,
        m: &mut Buf,
        v: &mut Buf,
        step: &AdamWStep,
    ) -> BResult<()> {
        adamw::adamw(self, param, grad, m, v, step)
    }
}

#[cfg(test)]
mod tests;
