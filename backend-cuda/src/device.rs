//! Finding the GPU without crashing where there is none.
//!
//! cudarc loads `libcuda`, `libnvrtc` and `libcublas` with `dlopen` on first use and panics when
//! one is missing; `CudaContext::new` panics without a driver. So the libraries are probed first
//! (`is_culib_present`), and every cudarc call that can still panic while the device is opened
//! runs under `catch_unwind`: the caller gets [`BackendErrorKind::NoDevice`] with the reason.

use crate::error;
use cudarc::driver::CudaContext;
use mae::backend::{BackendError, BackendErrorKind};
use std::panic::{catch_unwind, AssertUnwindSafe, UnwindSafe};
use std::sync::Arc;

/// A library the backend loads at run time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Library {
    /// The driver API, `libcuda.so` (installed with the NVIDIA driver).
    Driver,
    /// The runtime compiler, `libnvrtc.so` (CUDA toolkit, or the `nvidia-cuda-nvrtc` wheel).
    Nvrtc,
    /// `libcublas.so` (CUDA toolkit, or the `nvidia-cublas` wheel).
    Cublas,
}

impl Library {
    /// The base name cudarc searches for (`libNAME.so`, `libNAME.so.13`, ...).
    pub fn base_name(self) -> &'static str {
        match self {
            Library::Driver => "cuda",
            Library::Nvrtc => "nvrtc",
            Library::Cublas => "cublas",
        }
    }

    /// The file names cudarc tries on this platform, in order, without repeats (they depend
    /// on the `cuda-*` feature: `libnvrtc.so.13` first with `cuda-13`).
    pub fn candidates(self) -> Vec<String> {
        let prefix = format!(
            "{}{}{}",
            std::env::consts::DLL_PREFIX,
            self.base_name(),
            std::env::consts::DLL_SUFFIX
        );
        let mut names: Vec<String> = Vec::new();
        for name in cudarc::get_lib_name_candidates(self.base_name()) {
            // cudarc also lists Windows-style names (`cuda64_13`); keep this platform's.
            if name.starts_with(&prefix) && !names.contains(&name) {
                names.push(name);
            }
        }
        names
    }

    /// Whether the library can be loaded (this `dlopen`s it). Never panics.
    pub fn is_present(self) -> bool {
        let probe = || match self {
            // SAFETY: these only try `dlopen` on cudarc's candidate names and close the
            // handles again; they run no code of the libraries beyond their initializers.
            Library::Driver => unsafe { cudarc::driver::sys::is_culib_present() },
            // SAFETY: as above.
            Library::Nvrtc => unsafe { cudarc::nvrtc::sys::is_culib_present() },
            // SAFETY: as above.
            Library::Cublas => unsafe { cudarc::cublas::sys::is_culib_present() },
        };
        catch_unwind(probe).unwrap_or(false)
    }
}

/// [`BackendErrorKind::NoDevice`] naming the missing library and the names searched.
pub(crate) fn missing(lib: Library) -> BackendError {
    let hint = match lib {
        Library::Driver => "is the NVIDIA driver installed?",
        _ => "is the CUDA toolkit's lib64 folder on LD_LIBRARY_PATH?",
    };
    BackendError::new(
        BackendErrorKind::NoDevice,
        format!(
            "lib{}.so not found (searched {}): {hint}",
            lib.base_name(),
            lib.candidates().join(", ")
        ),
    )
}

/// Every library the backend needs, in the order it needs them.
pub(crate) fn probe_libraries() -> Result<(), BackendError> {
    for lib in [Library::Driver, Library::Nvrtc, Library::Cublas] {
        if !lib.is_present() {
            return Err(missing(lib));
        }
    }
    Ok(())
}

/// Runs `f`, turning a panic inside cudarc into a [`BackendErrorKind::NoDevice`] error.
pub(crate) fn no_panic<T>(
    what: &str,
    f: impl FnOnce() -> Result<T, BackendError> + UnwindSafe,
) -> Result<T, BackendError> {
    catch_unwind(f).unwrap_or_else(|panic| {
        let reason = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("unknown reason");
        Err(BackendError::new(
            BackendErrorKind::NoDevice,
            format!("{what}: cudarc panicked: {reason}"),
        ))
    })
}

/// The context of GPU `ordinal`, after checking the libraries and the ordinal.
pub(crate) fn open(ordinal: usize) -> Result<Arc<CudaContext>, BackendError> {
    probe_libraries()?;
    no_panic(
        "opening the CUDA device",
        AssertUnwindSafe(|| {
            let count = CudaContext::device_count()
                .map_err(|e| error::driver(e, "counting CUDA devices", 0))?;
            if ordinal >= count.max(0) as usize {
                return Err(BackendError::new(
                    BackendErrorKind::NoDevice,
                    format!("no CUDA device {ordinal}: the driver reports {count} device(s)"),
                ));
            }
            CudaContext::new(ordinal).map_err(|e| {
                error::driver(e, &format!("creating a context on device {ordinal}"), 0)
            })
        }),
    )
}

/// Makes the device's default memory pool, which cudarc's allocations draw from where the
/// driver has one, keep the memory its allocations free. By default the pool hands every unused
/// byte back to the driver at each synchronization, which a training step has one of (the loss
/// read): the backward's scratch allocations would then map fresh memory from the driver each
/// step, queued by a host that has just caught up with the GPU, which waits meanwhile. PyTorch's
/// allocators keep their memory in the same way. The pool then holds at most the step's peak.
pub(crate) fn keep_pool_memory(ctx: &CudaContext) -> Result<(), BackendError> {
    use cudarc::driver::sys;
    if !ctx.has_async_alloc() {
        return Ok(());
    }
    let failed = |e| error::driver(e, "keeping the memory pool's memory", 0);
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: `pool` is a valid out-pointer and the device handle is the context's.
    unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) }
        .result()
        .map_err(failed)?;
    let mut keep_all = u64::MAX;
    // SAFETY: the release threshold is a cuuint64_t attribute, which `keep_all` is, and `pool`
    // is the device's default pool, live as long as the device.
    unsafe {
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut keep_all as *mut u64).cast(),
        )
    }
    .result()
    .map_err(failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_include_the_versioned_sonames() {
        let names = Library::Nvrtc.candidates();
        let major = if cfg!(feature = "cuda-13") { 13 } else { 12 };
        assert!(names.contains(&format!("libnvrtc.so.{major}")), "{names:?}");
        assert!(
            names.contains(&"libcuda.so.1".to_string())
                || Library::Driver
                    .candidates()
                    .contains(&"libcuda.so.1".to_string())
        );
    }

    #[test]
    fn missing_library_errors_name_what_was_searched() {
        let e = missing(Library::Cublas);
        assert_eq!(e.kind, BackendErrorKind::NoDevice);
        assert!(e.message.contains("libcublas.so"), "{e}");
        assert!(e.message.contains("LD_LIBRARY_PATH"), "{e}");
    }

    #[test]
    fn panics_become_no_device_errors() {
        let e = no_panic::<()>("probing", || panic!("Unable to dynamically load")).unwrap_err();
        assert_eq!(e.kind, BackendErrorKind::NoDevice);
        assert!(e.message.contains("Unable to dynamically load"), "{e}");
        assert_eq!(no_panic("ok", || Ok(3)).unwrap(), 3);
    }

    /// On a device (or the fake driver of `emulate/`): a backend leaves the pool keeping what
    /// its allocations free.
    #[test]
    fn the_memory_pool_keeps_freed_memory() {
        use cudarc::driver::sys;
        let Some(be) = crate::test_device(crate::Precision::F32) else {
            return;
        };
        if !be.ctx.has_async_alloc() {
            eprintln!("SKIP the_memory_pool_keeps_freed_memory: the driver has no memory pools");
            return;
        }
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        let mut threshold = 0u64;
        // SAFETY: valid out-pointers; the release threshold is a cuuint64_t.
        unsafe {
            sys::cuDeviceGetDefaultMemPool(&mut pool, be.ctx.cu_device())
                .result()
                .unwrap();
            sys::cuMemPoolGetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut threshold as *mut u64).cast(),
            )
            .result()
            .unwrap();
        }
        assert_eq!(threshold, u64::MAX);
    }

    /// Without a driver (CI, this crate's development machine) opening a device is an error,
    /// never a panic; with one, it is the context or a NoDevice for a missing ordinal.
    #[test]
    fn open_never_panics() {
        match open(0) {
            Ok(_) => assert!(Library::Driver.is_present()),
            Err(e) => assert_eq!(e.kind, BackendErrorKind::NoDevice, "{e}"),
        }
        let e = open(1 << 20).unwrap_err();
        assert_eq!(e.kind, BackendErrorKind::NoDevice, "{e}");
    }
}
