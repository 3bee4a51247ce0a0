//! The backends under test, the skip policy, and host <-> device helpers generic over
//! [`Backend`].
//!
//! Each backend has a getter (`cpu()`, ...) that builds it once per test process and returns
//! `None` when its device is missing, after printing `SKIP <backend>: <reason>` straight to the
//! terminal (past the test harness's output capture). Naming the backend in
//! `MAE_REQUIRE_BACKENDS` (a comma list, e.g. `wgpu,cuda`) turns the skip into a test failure.
//! [`dispatch`] runs an [`OnBackend`] job on a backend chosen by name, for the programs.

use mae::backend::{Backend, BackendError, OnBackend};
use std::io::Write;
use std::sync::OnceLock;

/// The backends this crate tests, by `--backend` name.
pub const NAMES: &[&str] = &["cpu", "wgpu", "cuda", "cuda-tf32", "cuda-bf16"];

/// The backends listed in `MAE_REQUIRE_BACKENDS` (comma-separated, trimmed, lower-case).
pub fn required_backends() -> Vec<String> {
    std::env::var("MAE_REQUIRE_BACKENDS")
        .unwrap_or_default()
        .split(',')
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect()
}

/// Reports that `backend` is not available; panics if it is required.
pub fn skip(backend: &str, reason: &str) {
    // Straight to stderr: libtest captures `eprintln!`, and a skip must be visible.
    let _ = writeln!(std::io::stderr(), "SKIP {backend}: {reason}");
    if required_backends()
        .iter()
        .any(|b| b == &backend.to_ascii_lowercase())
    {
        panic!("backend {backend} is required by MAE_REQUIRE_BACKENDS but not available: {reason}");
    }
}

/// Returns the backend in `cell`, building it on first use; `None` (after [`skip`]) when it
/// could not be built.
fn shared<B>(
    cell: &'static OnceLock<Result<B, String>>,
    name: &str,
    build: impl FnOnce() -> Result<B, BackendError>,
) -> Option<&'static B> {
    match cell.get_or_init(|| build().map_err(|e| e.to_string())) {
        Ok(b) => Some(b),
        Err(reason) => {
            skip(name, reason);
            None
        }
    }
}

/// The CPU backend (always available).
pub fn cpu() -> Option<&'static mae_backend_cpu::CpuBackend> {
    static CELL: OnceLock<Result<mae_backend_cpu::CpuBackend, String>> = OnceLock::new();
    shared(&CELL, "cpu", || Ok(mae_backend_cpu::CpuBackend::new()))
}

/// The wgpu backend on the default adapter (`WGPU_BACKEND=vulkan` picks lavapipe on a machine
/// without a GPU); `None` after a skip when there is no adapter.
pub fn wgpu() -> Option<&'static mae_backend_wgpu::WgpuBackend> {
    static CELL: OnceLock<Result<mae_backend_wgpu::WgpuBackend, String>> = OnceLock::new();
    shared(&CELL, "wgpu", mae_backend_wgpu::WgpuBackend::new)
}

/// The CUDA backend on GPU 0, with f32 GEMMs; `None` (after a `SKIP cuda: ...` line) without
/// a driver, the CUDA libraries or a GPU. Its kernels are compiled here, so a failed NVRTC
/// compile fails every test instead of being taken for a missing device.
pub fn cuda() -> Option<&'static mae_backend_cuda::CudaBackend> {
    static CELL: OnceLock<Result<mae_backend_cuda::CudaBackend, String>> = OnceLock::new();
    cuda_in(&CELL, mae_backend_cuda::Precision::F32)
}

/// The CUDA backend on GPU 0 with bf16 GEMMs (`cuda-bf16`), held to
/// [`crate::golden::Tolerances::REDUCED`]; skipped as [`cuda`] is.
pub fn cuda_bf16() -> Option<&'static mae_backend_cuda::CudaBackend> {
    static CELL: OnceLock<Result<mae_backend_cuda::CudaBackend, String>> = OnceLock::new();
    cuda_in(&CELL, mae_backend_cuda::Precision::Bf16)
}

/// The CUDA backend in `precision`, built once in `cell`, its kernels compiled.
fn cuda_in(
    cell: &'static OnceLock<Result<mae_backend_cuda::CudaBackend, String>>,
    precision: mae_backend_cuda::Precision,
) -> Option<&'static mae_backend_cuda::CudaBackend> {
    let name = precision.backend_name();
    let backend = shared(cell, name, || {
        mae_backend_cuda::CudaBackend::with_precision(0, precision)
    })?;
    if let Err(e) = backend.compile_kernels() {
        panic!("{name}: the device is present but its kernels do not build: {e}");
    }
    Some(backend)
}

/// Why [`dispatch`] could not run a job.
#[derive(Debug)]
pub enum DispatchError {
    /// No backend of this name exists in this build.
    Unknown(String),
    /// The backend exists but its device is missing.
    Unavailable(String, String),
}

impl std::fmt::Display for DispatchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DispatchError::Unknown(n) => {
                write!(
                    f,
                    "unknown backend {n:?} (this build has: {})",
                    NAMES.join(", ")
                )
            }
            DispatchError::Unavailable(n, why) => write!(f, "backend {n} is not available: {why}"),
        }
    }
}

impl std::error::Error for DispatchError {}

/// Runs `job` on the backend called `name`.
pub fn dispatch<J: OnBackend>(name: &str, job: J) -> Result<J::Output, DispatchError> {
    // Each arm builds its backend afresh: a program wants the device's own error, not a skip.
    #[allow(unused)]
    let unavailable = |e: BackendError| DispatchError::Unavailable(name.to_string(), e.to_string());
    if let Some(precision) = mae_backend_cuda::Precision::from_backend_name(name) {
        let b = mae_backend_cuda::CudaBackend::with_precision(0, precision).map_err(unavailable)?;
        return Ok(job.run(&b));
    }
    match name {
        "cpu" => Ok(job.run(&mae_backend_cpu::CpuBackend::new())),
        "wgpu" => mae_backend_wgpu::WgpuBackend::new()
            .map(|b| job.run(&b))
            .map_err(unavailable),
        other => Err(DispatchError::Unknown(other.to_string())),
    }
}

/// Uploads `host`, panicking with the backend's message on failure.
pub fn up<B: Backend>(b: &B, host: &[f32]) -> B::Buf {
    b.upload(host)
        .unwrap_or_else(|e| panic!("{}: upload of {} floats: {e}", b.name(), host.len()))
}

/// Uploads indices.
pub fn up_idx<B: Backend>(b: &B, host: &[u32]) -> B::Idx {
    b.upload_idx(host)
        .unwrap_or_else(|e| panic!("{}: upload of {} indices: {e}", b.name(), host.len()))
}

/// Downloads a whole buffer.
pub fn down<B: Backend>(b: &B, buf: &B::Buf) -> Vec<f32> {
    let mut host = vec![0.0; b.len(buf)];
    b.download(buf, &mut host)
        .unwrap_or_else(|e| panic!("{}: download: {e}", b.name()));
    host
}

/// Unwraps a backend result, naming the backend and the op on failure.
fn ok<B: Backend, T>(b: &B, r: mae::backend::BResult<T>, op: &str) -> T {
    r.unwrap_or_else(|e| panic!("{}: {op}: {e}", b.name()))
}

/// One-call wrappers: upload the inputs and the initial outputs, run one op, download the outputs.
/// Tests written with them run unchanged on every backend.
pub mod run {
    use super::{down, ok, up, up_idx};
    use mae::backend::{AdamWStep, AdamWTensor, Backend, Gather, Gemm, Heads, Patchify, RowMap};

    pub fn gemm<B: Backend>(b: &B, g: &Gemm, a: &[f32], bm: &[f32], c: &[f32]) -> Vec<f32> {
        let (a, bm, mut c) = (up(b, a), up(b, bm), up(b, c));
        ok(b, b.gemm(g, &a, &bm, &mut c), "gemm");
        down(b, &c)
    }

    pub fn gemm_bias<B: Backend>(
        b: &B,
        g: &Gemm,
        (a, bm): (&[f32], &[f32]),
        bias: &[f32],
        c: &[f32],
    ) -> Vec<f32> {
        let (a, bm, bias, mut c) = (up(b, a), up(b, bm), up(b, bias), up(b, c));
        ok(b, b.gemm_bias(g, &a, &bm, &bias, &mut c), "gemm_bias");
        down(b, &c)
    }

    /// Returns `(c, db)` after the op.
    pub fn gemm_bias_grad<B: Backend>(
        b: &B,
        g: &Gemm,
        (a, bm): (&[f32], &[f32]),
        c: &[f32],
        db: &[f32],
    ) -> (Vec<f32>, Vec<f32>) {
        let (a, bm, mut c, mut db) = (up(b, a), up(b, bm), up(b, c), up(b, db));
        ok(
            b,
            b.gemm_bias_grad(g, &a, &bm, &mut c, &mut db),
            "gemm_bias_grad",
        );
        (down(b, &c), down(b, &db))
    }

    /// Returns `(base, c)` after the op.
    pub fn gemm_bias_onto<B: Backend>(
        b: &B,
        g: &Gemm,
        (a, bm): (&[f32], &[f32]),
        bias: &[f32],
        base: &[f32],
        c: &[f32],
    ) -> (Vec<f32>, Vec<f32>) {
        let (a, bm, bias, base, mut c) = (up(b, a), up(b, bm), up(b, bias), up(b, base), up(b, c));
        ok(
            b,
            b.gemm_bias_onto(g, &a, &bm, &bias, &base, &mut c),
            "gemm_bias_onto",
        );
        (down(b, &base), down(b, &c))
    }

    /// Returns `(pre, act)` after the op.
    pub fn gemm_bias_gelu<B: Backend>(
        b: &B,
        g: &Gemm,
        (a, bm): (&[f32], &[f32]),
        bias: &[f32],
        pre: &[f32],
        act: &[f32],
    ) -> (Vec<f32>, Vec<f32>) {
        let (a, bm, bias) = (up(b, a), up(b, bm), up(b, bias));
        let (mut pre, mut act) = (up(b, pre), up(b, act));
        let r = b.gemm_bias_gelu(g, &a, &bm, &bias, &mut pre, &mut act);
        ok(b, r, "gemm_bias_gelu");
        (down(b, &pre), down(b, &act))
    }

    pub fn add<B: Backend>(b: &B, src: &[f32], dst: &[f32]) -> Vec<f32> {
        let (src, mut dst) = (up(b, src), up(b, dst));
        ok(b, b.add(&src, &mut dst), "add");
        down(b, &dst)
    }

    pub fn scale<B: Backend>(b: &B, buf: &[f32], s: f32) -> Vec<f32> {
        let mut buf = up(b, buf);
        ok(b, b.scale(&mut buf, s), "scale");
        down(b, &buf)
    }

    pub fn scale_rows<B: Backend>(
        b: &B,
        src: &[f32],
        scales: &[f32],
        dst: &[f32],
        rows_per_scale: usize,
        cols: usize,
        acc: bool,
    ) -> Vec<f32> {
        let (src, scales, mut dst) = (up(b, src), up(b, scales), up(b, dst));
        let r = b.scale_rows(&src, &scales, &mut dst, rows_per_scale, cols, acc);
        ok(b, r, "scale_rows");
        down(b, &dst)
    }

    pub fn copy_rows<B: Backend>(
        b: &B,
        src: &[f32],
        dst: &[f32],
        map: &RowMap,
        acc: bool,
    ) -> Vec<f32> {
        let (src, mut dst) = (up(b, src), up(b, dst));
        ok(b, b.copy_rows(&src, &mut dst, map, acc), "copy_rows");
        down(b, &dst)
    }

    pub fn copy_rows_backward<B: Backend>(
        b: &B,
        d_dst: &[f32],
        d_src: &[f32],
        map: &RowMap,
    ) -> Vec<f32> {
        let (d_dst, mut d_src) = (up(b, d_dst), up(b, d_src));
        ok(
            b,
            b.copy_rows_backward(&d_dst, &mut d_src, map),
            "copy_rows_backward",
        );
        down(b, &d_src)
    }

    pub fn gather_rows<B: Backend>(
        b: &B,
        src: &[f32],
        idx: &[u32],
        dst: &[f32],
        g: &Gather,
    ) -> Vec<f32> {
        let (src, idx, mut dst) = (up(b, src), up_idx(b, idx), up(b, dst));
        ok(b, b.gather_rows(&src, &idx, &mut dst, g), "gather_rows");
        down(b, &dst)
    }

    pub fn gather_rows_backward<B: Backend>(
        b: &B,
        d_dst: &[f32],
        idx: &[u32],
        d_src: &[f32],
        g: &Gather,
    ) -> Vec<f32> {
        let (d_dst, idx, mut d_src) = (up(b, d_dst), up_idx(b, idx), up(b, d_src));
        ok(
            b,
            b.gather_rows_backward(&d_dst, &idx, &mut d_src, g),
            "gather_rows_backward",
        );
        down(b, &d_src)
    }

    pub fn patchify<B: Backend>(b: &B, imgs: &[f32], out: &[f32], p: &Patchify) -> Vec<f32> {
        let (imgs, mut out) = (up(b, imgs), up(b, out));
        ok(b, b.patchify(&imgs, &mut out, p), "patchify");
        down(b, &out)
    }

    pub fn split_heads<B: Backend>(b: &B, x: &[f32], heads: &[f32], h: &Heads) -> Vec<f32> {
        let (x, mut heads) = (up(b, x), up(b, heads));
        ok(b, b.split_heads(&x, &mut heads, h), "split_heads");
        down(b, &heads)
    }

    pub fn merge_heads<B: Backend>(b: &B, heads: &[f32], x: &[f32], h: &Heads) -> Vec<f32> {
        let (heads, mut x) = (up(b, heads), up(b, x));
        ok(b, b.merge_heads(&heads, &mut x, h), "merge_heads");
        down(b, &x)
    }

    /// Returns `(y, mean, rstd)`; `init` gives their initial contents.
    #[allow(clippy::too_many_arguments)]
    pub fn layernorm_forward<B: Backend>(
        b: &B,
        x: &[f32],
        gamma: &[f32],
        beta: &[f32],
        init: (&[f32], &[f32], &[f32]),
        rows: usize,
        cols: usize,
        eps: f32,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (x, gamma, beta) = (up(b, x), up(b, gamma), up(b, beta));
        let (mut y, mut mean, mut rstd) = (up(b, init.0), up(b, init.1), up(b, init.2));
        let r = b.layernorm_forward(
            &x, &gamma, &beta, &mut y, &mut mean, &mut rstd, rows, cols, eps,
        );
        ok(b, r, "layernorm_forward");
        (down(b, &y), down(b, &mean), down(b, &rstd))
    }

    /// Returns `(dx, dgamma, dbeta)`; `init` gives their initial contents.
    #[allow(clippy::too_many_arguments)]
    pub fn layernorm_backward<B: Backend>(
        b: &B,
        dy: &[f32],
        x: &[f32],
        gamma: &[f32],
        mean: &[f32],
        rstd: &[f32],
        init: (&[f32], &[f32], &[f32]),
        rows: usize,
        cols: usize,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (dy, x, gamma, mean, rstd) =
            (up(b, dy), up(b, x), up(b, gamma), up(b, mean), up(b, rstd));
        let (mut dx, mut dg, mut db) = (up(b, init.0), up(b, init.1), up(b, init.2));
        let r = b.layernorm_backward(
            &dy, &x, &gamma, &mean, &rstd, &mut dx, &mut dg, &mut db, rows, cols,
        );
        ok(b, r, "layernorm_backward");
        (down(b, &dx), down(b, &dg), down(b, &db))
    }

    pub fn gelu_forward<B: Backend>(b: &B, x: &[f32], y: &[f32]) -> Vec<f32> {
        let (x, mut y) = (up(b, x), up(b, y));
        ok(b, b.gelu_forward(&x, &mut y), "gelu_forward");
        down(b, &y)
    }

    /// Returns `(pre, act)` after the op: `pre` with the bias added, `act = gelu(pre)`.
    pub fn bias_gelu_forward<B: Backend>(
        b: &B,
        bias: &[f32],
        pre: &[f32],
        act: &[f32],
        rows: usize,
        cols: usize,
    ) -> (Vec<f32>, Vec<f32>) {
        let (bias, mut pre, mut act) = (up(b, bias), up(b, pre), up(b, act));
        let r = b.bias_gelu_forward(&bias, &mut pre, &mut act, rows, cols);
        ok(b, r, "bias_gelu_forward");
        (down(b, &pre), down(b, &act))
    }

    pub fn gelu_backward<B: Backend>(
        b: &B,
        x: &[f32],
        dy: &[f32],
        dx: &[f32],
        accumulate: bool,
    ) -> Vec<f32> {
        let (x, dy, mut dx) = (up(b, x), up(b, dy), up(b, dx));
        let r = b.gelu_backward(&x, &dy, &mut dx, accumulate);
        ok(b, r, "gelu_backward");
        down(b, &dx)
    }

    pub fn softmax_forward<B: Backend>(
        b: &B,
        x: &[f32],
        y: &[f32],
        rows: usize,
        cols: usize,
        s: f32,
    ) -> Vec<f32> {
        let (x, mut y) = (up(b, x), up(b, y));
        ok(
            b,
            b.softmax_forward(&x, &mut y, rows, cols, s),
            "softmax_forward",
        );
        down(b, &y)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn softmax_backward<B: Backend>(
        b: &B,
        y: &[f32],
        dy: &[f32],
        dx: &[f32],
        rows: usize,
        cols: usize,
        s: f32,
    ) -> Vec<f32> {
        let (y, dy, mut dx) = (up(b, y), up(b, dy), up(b, dx));
        ok(
            b,
            b.softmax_backward(&y, &dy, &mut dx, rows, cols, s),
            "softmax_backward",
        );
        down(b, &dx)
    }

    pub fn normalize_rows<B: Backend>(
        b: &B,
        x: &[f32],
        y: &[f32],
        rows: usize,
        cols: usize,
        eps: f32,
    ) -> Vec<f32> {
        let (x, mut y) = (up(b, x), up(b, y));
        ok(
            b,
            b.normalize_rows(&x, &mut y, rows, cols, eps),
            "normalize_rows",
        );
        down(b, &y)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn masked_mse_forward<B: Backend>(
        b: &B,
        pred: &[f32],
        target: &[f32],
        mask: &[f32],
        loss: &[f32],
        rows: usize,
        cols: usize,
    ) -> Vec<f32> {
        let (pred, target, mask, mut loss) = (up(b, pred), up(b, target), up(b, mask), up(b, loss));
        ok(
            b,
            b.masked_mse_forward(&pred, &target, &mask, &mut loss, rows, cols),
            "masked_mse_forward",
        );
        down(b, &loss)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn masked_mse_backward<B: Backend>(
        b: &B,
        pred: &[f32],
        target: &[f32],
        mask: &[f32],
        d_pred: &[f32],
        rows: usize,
        cols: usize,
        d_loss: f32,
    ) -> Vec<f32> {
        let (pred, target, mask, mut dp) = (up(b, pred), up(b, target), up(b, mask), up(b, d_pred));
        let r = b.masked_mse_backward(&pred, &target, &mask, &mut dp, rows, cols, d_loss);
        ok(b, r, "masked_mse_backward");
        down(b, &dp)
    }

    /// Returns `(param, m, v)` after one step.
    pub fn adamw<B: Backend>(
        b: &B,
        param: &[f32],
        grad: &[f32],
        m: &[f32],
        v: &[f32],
        s: &AdamWStep,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (mut p, g, mut m, mut v) = (up(b, param), up(b, grad), up(b, m), up(b, v));
        ok(b, b.adamw(&mut p, &g, &mut m, &mut v, s), "adamw");
        (down(b, &p), down(b, &m), down(b, &v))
    }

    /// One tensor of [`adamw_many`] on the host: its four buffers and its update (`None`: it
    /// does not train).
    #[derive(Clone, Debug, PartialEq)]
    pub struct AdamWHost {
        pub param: Vec<f32>,
        pub grad: Vec<f32>,
        pub m: Vec<f32>,
        pub v: Vec<f32>,
        pub step: Option<AdamWStep>,
    }

    /// `tensors` after one [`Backend::adamw_many`] call (`one_op`), or after what it stands
    /// for: per tensor in order, [`Backend::adamw`] where it has a step, then
    /// [`Backend::fill`] of its gradient with 0.
    pub fn adamw_many<B: Backend>(b: &B, tensors: &[AdamWHost], one_op: bool) -> Vec<AdamWHost> {
        let mut bufs: Vec<[B::Buf; 4]> = tensors
            .iter()
            .map(|t| [up(b, &t.param), up(b, &t.grad), up(b, &t.m), up(b, &t.v)])
            .collect();
        if one_op {
            let all = bufs
                .iter_mut()
                .zip(tensors)
                .map(|([param, grad, m, v], t)| AdamWTensor {
                    param,
                    grad,
                    m,
                    v,
                    step: t.step,
                });
            ok(b, b.adamw_many(all), "adamw_many");
        } else {
            for ([p, g, m, v], t) in bufs.iter_mut().zip(tensors) {
                if let Some(s) = &t.step {
                    ok(b, b.adamw(p, g, m, v, s), "adamw");
                }
                ok(b, b.fill(g, 0.0), "fill");
            }
        }
        bufs.iter()
            .zip(tensors)
            .map(|([p, g, m, v], t)| AdamWHost {
                param: down(b, p),
                grad: down(b, g),
                m: down(b, m),
                v: down(b, v),
                step: t.step,
            })
            .collect()
    }
}
