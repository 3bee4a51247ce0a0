//! Turning cudarc's errors into [`BackendError`]s with the sizes involved.
//!
//! Messages name the CUDA error by its enum name (`CUDA_ERROR_OUT_OF_MEMORY`), formatted from the
//! code alone: cudarc's own `Display` asks the driver for a description, which would load
//! `libcuda` and panic on a machine without one.

use cudarc::cublas::result::CublasError;
use cudarc::driver::sys::cudaError_enum as Cu;
use cudarc::driver::DriverError;
use mae::backend::{BackendError, BackendErrorKind};

/// The error kind a driver result code stands for.
pub(crate) fn driver_kind(code: Cu, bytes: usize) -> BackendErrorKind {
    match code {
        Cu::CUDA_ERROR_OUT_OF_MEMORY => BackendErrorKind::OutOfMemory { bytes },
        Cu::CUDA_ERROR_NO_DEVICE
        | Cu::CUDA_ERROR_INVALID_DEVICE
        | Cu::CUDA_ERROR_STUB_LIBRARY
        | Cu::CUDA_ERROR_SYSTEM_NOT_READY
        | Cu::CUDA_ERROR_SYSTEM_DRIVER_MISMATCH
        | Cu::CUDA_ERROR_NOT_INITIALIZED
        | Cu::CUDA_ERROR_DEINITIALIZED => BackendErrorKind::NoDevice,
        _ => BackendErrorKind::Device,
    }
}

/// A failed driver call while doing `what`; `bytes` is the size of the allocation or copy
/// involved (reported with out-of-memory errors).
pub(crate) fn driver(e: DriverError, what: &str, bytes: usize) -> BackendError {
    BackendError::new(driver_kind(e.0, bytes), format!("{what}: {:?}", e.0))
}

/// A failed cuBLAS call while doing `what`.
pub(crate) fn cublas(e: CublasError, what: &str) -> BackendError {
    use cudarc::cublas::sys::cublasStatus_t as S;
    let kind = match e.0 {
        // cuBLAS could not allocate its workspace; it does not say how much it wanted.
        S::CUBLAS_STATUS_ALLOC_FAILED => BackendErrorKind::OutOfMemory { bytes: 0 },
        S::CUBLAS_STATUS_NOT_INITIALIZED | S::CUBLAS_STATUS_ARCH_MISMATCH => {
            BackendErrorKind::NoDevice
        }
        S::CUBLAS_STATUS_NOT_SUPPORTED => BackendErrorKind::Unsupported,
        _ => BackendErrorKind::Device,
    };
    BackendError::new(kind, format!("{what}: {:?}", e.0))
}

/// A device error with our own words (a failed compile, a caller bug caught before a launch).
pub(crate) fn device(message: impl Into<String>) -> BackendError {
    BackendError::new(BackendErrorKind::Device, message)
}

/// `value` as an `i32` (cuBLAS dimensions), or [`BackendErrorKind::TooLarge`].
pub(crate) fn fit_i32(value: usize, what: &str) -> Result<i32, BackendError> {
    i32::try_from(value).map_err(|_| {
        BackendError::new(
            BackendErrorKind::TooLarge {
                len: value,
                max: i32::MAX as usize,
            },
            format!("{what} exceeds what one cuBLAS call takes"),
        )
    })
}

/// `len` floats in bytes, or [`BackendErrorKind::TooLarge`] when that overflows.
pub(crate) fn bytes_of<T>(len: usize) -> Result<usize, BackendError> {
    let size = size_of::<T>();
    len.checked_mul(size).ok_or_else(|| {
        BackendError::new(
            BackendErrorKind::TooLarge {
                len,
                max: usize::MAX / size,
            },
            "the buffer's size in bytes overflows usize",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_memory_carries_the_size() {
        let e = driver(DriverError(Cu::CUDA_ERROR_OUT_OF_MEMORY), "alloc", 4096);
        assert_eq!(e.kind, BackendErrorKind::OutOfMemory { bytes: 4096 });
        assert!(e.message.contains("CUDA_ERROR_OUT_OF_MEMORY"), "{e}");
        assert!(e.to_string().contains("4096 bytes"), "{e}");
    }

    #[test]
    fn missing_devices_and_drivers_are_no_device() {
        for code in [
            Cu::CUDA_ERROR_NO_DEVICE,
            Cu::CUDA_ERROR_INVALID_DEVICE,
            Cu::CUDA_ERROR_SYSTEM_DRIVER_MISMATCH,
            Cu::CUDA_ERROR_STUB_LIBRARY,
        ] {
            assert_eq!(driver_kind(code, 0), BackendErrorKind::NoDevice, "{code:?}");
        }
    }

    #[test]
    fn launch_failures_are_device_errors_naming_the_code() {
        let e = driver(
            DriverError(Cu::CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES),
            "launch softmax_forward",
            0,
        );
        assert_eq!(e.kind, BackendErrorKind::Device);
        assert!(e.message.contains("softmax_forward"), "{e}");
        assert!(e.message.contains("LAUNCH_OUT_OF_RESOURCES"), "{e}");
        let e = driver(DriverError(Cu::CUDA_ERROR_ILLEGAL_ADDRESS), "sync", 0);
        assert_eq!(e.kind, BackendErrorKind::Device);
    }

    #[test]
    fn cublas_statuses_map_to_kinds() {
        use cudarc::cublas::sys::cublasStatus_t as S;
        let kind = |s| cublas(CublasError(s), "gemm").kind;
        assert_eq!(
            kind(S::CUBLAS_STATUS_ALLOC_FAILED),
            BackendErrorKind::OutOfMemory { bytes: 0 }
        );
        assert_eq!(
            kind(S::CUBLAS_STATUS_NOT_SUPPORTED),
            BackendErrorKind::Unsupported
        );
        assert_eq!(
            kind(S::CUBLAS_STATUS_EXECUTION_FAILED),
            BackendErrorKind::Device
        );
        assert!(
            cublas(CublasError(S::CUBLAS_STATUS_INVALID_VALUE), "gemm m=3")
                .message
                .contains("gemm m=3")
        );
    }

    #[test]
    fn sizes_past_the_limits_are_too_large() {
        assert_eq!(fit_i32(7, "m").unwrap(), 7);
        let e = fit_i32(1 << 31, "m").unwrap_err();
        assert_eq!(
            e.kind,
            BackendErrorKind::TooLarge {
                len: 1 << 31,
                max: i32::MAX as usize
            }
        );
        assert_eq!(bytes_of::<f32>(10).unwrap(), 40);
        assert!(matches!(
            bytes_of::<f32>(usize::MAX).unwrap_err().kind,
            BackendErrorKind::TooLarge { .. }
        ));
    }
}
