//! The backends compiled into the programs (Cargo features `cpu`, `wgpu`, `cuda`) and the choice
//! among them by `--backend NAME`.
//!
//! A program writes its work once as an [`OnBackend`] job, generic over the backend, and
//! [`dispatch`] builds the named backend and runs it:
//!
//! ```
//! use mae::backend::{Backend, OnBackend};
//! use mae_examples::backends::dispatch;
//!
//! struct Hello;
//! impl OnBackend for Hello {
//!     type Output = String;
//!     fn run<B: Backend>(self, b: &B) -> String {
//!         format!("hello from {}", b.name())
//!     }
//! }
//!
//! assert_eq!(dispatch("cpu", Hello).unwrap(), "hello from cpu");
//! assert!(dispatch("tpu", Hello).is_err());
//! ```

use mae::backend::{BackendError, OnBackend};
use std::fmt;

/// Every backend name the project knows, compiled in or not.
/// `cuda-tf32` and `cuda-bf16` are the CUDA backend with its GEMMs on tensor cores
/// ([`mae_backend_cuda::Precision`]).
pub const KNOWN: &[&str] = &["cpu", "wgpu", "cuda", "cuda-tf32", "cuda-bf16"];

/// The backends this build has, in order of preference.
pub fn compiled() -> Vec<&'static str> {
    let mut names = Vec::new();
    if cfg!(feature = "cpu") {
        names.push("cpu");
    }
    if cfg!(feature = "wgpu") {
        names.push("wgpu");
    }
    if cfg!(feature = "cuda") {
        names.extend(["cuda", "cuda-tf32", "cuda-bf16"]);
    }
    names
}

/// Why a backend could not be used.
#[derive(Debug)]
pub enum BackendChoiceError {
    /// No backend has this name.
    Unknown(String),
    /// A known backend that this build left out (its Cargo feature is off).
    NotCompiled(String),
    /// The backend is compiled in but its device is missing or failed to start.
    Unavailable(String, BackendError),
}

impl fmt::Display for BackendChoiceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendChoiceError::Unknown(n) => write!(
                f,
                "unknown backend {n:?}: choose one of {}",
                compiled().join(", ")
            ),
            BackendChoiceError::NotCompiled(n) => write!(
                f,
                "backend {n} is not compiled in: rebuild with `--features {}` (this build has {})",
                // `cuda-bf16` is a mode of the `cuda` feature.
                n.split('-').next().unwrap_or(n),
                compiled().join(", ")
            ),
            BackendChoiceError::Unavailable(n, e) => write!(f, "backend {n} is not available: {e}"),
        }
    }
}

impl std::error::Error for BackendChoiceError {}

/// Builds the backend called `name` and runs `job` on it.
pub fn dispatch<J: OnBackend>(name: &str, job: J) -> Result<J::Output, BackendChoiceError> {
    // Each arm is compiled only with its feature; the rest fall through to the errors below.
    #[allow(unused)]
    let unavailable = |e: BackendError| BackendChoiceError::Unavailable(name.to_string(), e);
    // `cuda`, `cuda-tf32` and `cuda-bf16`: one backend in three precisions.
    #[cfg(feature = "cuda")]
    if let Some(precision) = mae_backend_cuda::Precision::from_backend_name(name) {
        let b = mae_backend_cuda::CudaBackend::with_precision(0, precision).map_err(unavailable)?;
        return Ok(job.run(&b));
    }
    match name {
        #[cfg(feature = "cpu")]
        "cpu" => Ok(job.run(&mae_backend_cpu::CpuBackend::new())),
        #[cfg(feature = "wgpu")]
        "wgpu" => mae_backend_wgpu::WgpuBackend::new()
            .map(|b| job.run(&b))
            .map_err(unavailable),
        n if KNOWN.contains(&n) => Err(BackendChoiceError::NotCompiled(n.to_string())),
        n => Err(BackendChoiceError::Unknown(n.to_string())),
    }
}

/// The backend a program uses when `--backend` is not given: the first compiled in.
pub fn default_name() -> &'static str {
    compiled().first().copied().unwrap_or("cpu")
}
