//! `libnccl` loaded at run time, with the few entry points data-parallel training calls.
//!
//! cudarc's NCCL bindings are not used: its dynamic loader searches `libnccl.so`,
//! `libnccl.so.12`, `libnccl.so.11`, ... but never `libnccl.so.2`, the only name under which NCCL
//! ships in NVIDIA's `libnccl2` package and in PyTorch's `nvidia-nccl-cu12`/`-cu13` wheels (the
//! unversioned `libnccl.so` comes only with the development package), and it panics where the
//! library is missing. This loader searches `$MAE_NCCL_LIBRARY`, then `libnccl.so.2`, then
//! `libnccl.so`, and reports a missing library or symbol as [`BackendErrorKind::NoDevice`].

use mae::backend::{BackendError, BackendErrorKind};
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::OnceLock;

/// The environment variable naming the NCCL library file to load, searched first.
pub const LIBRARY_ENV: &str = "MAE_NCCL_LIBRARY";

/// The library names searched after [`LIBRARY_ENV`], in order.
pub const LIBRARY_NAMES: &[&str] = &["libnccl.so.2", "libnccl.so"];

/// The oldest NCCL with the `ncclAvg` reduction (2.10.0), as `ncclGetVersion` codes it.
pub(crate) const MIN_VERSION: c_int = 21000;

/// `ncclUniqueId`: 128 opaque bytes that rank 0 draws and every rank passes to init.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct RawId {
    pub(crate) internal: [c_char; 128],
}

/// `ncclComm_t`, an opaque pointer.
pub(crate) type RawComm = *mut c_void;

/// `ncclDataType_t::ncclFloat32`.
pub(crate) const FLOAT32: c_int = 7;
/// `ncclRedOp_t::ncclAvg` (sum, then divide by the number of ranks).
pub(crate) const AVG: c_int = 4;
/// `ncclResult_t::ncclSuccess`.
const SUCCESS: c_int = 0;

type GetUniqueId = unsafe extern "C" fn(*mut RawId) -> c_int;
type CommInitRank = unsafe extern "C" fn(*mut RawComm, c_int, RawId, c_int) -> c_int;
type AllReduce = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    c_int,
    c_int,
    RawComm,
    cudarc::driver::sys::CUstream,
) -> c_int;
type Group = unsafe extern "C" fn() -> c_int;
type CommDestroy = unsafe extern "C" fn(RawComm) -> c_int;
type GetErrorString = unsafe extern "C" fn(c_int) -> *const c_char;
type GetVersion = unsafe extern "C" fn(*mut c_int) -> c_int;

/// The loaded library and its entry points.
pub(crate) struct Nccl {
    pub(crate) get_unique_id: GetUniqueId,
    pub(crate) comm_init_rank: CommInitRank,
    pub(crate) all_reduce: AllReduce,
    pub(crate) group_start: Group,
    pub(crate) group_end: Group,
    pub(crate) comm_destroy: CommDestroy,
    get_error_string: GetErrorString,
    /// `ncclGetVersion`'s code (`2.21.5` is 22105).
    pub(crate) version: c_int,
    /// The name it was loaded by.
    pub(crate) name: String,
    /// Keeps the entry points above valid: never unloaded while the process runs.
    _lib: libloading::Library,
}

impl std::fmt::Debug for Nccl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nccl")
            .field("name", &self.name)
            .field("version", &self.version)
            .finish()
    }
}

/// The names tried, in order: `$MAE_NCCL_LIBRARY` when set, then [`LIBRARY_NAMES`].
pub fn candidates() -> Vec<String> {
    let explicit = std::env::var(LIBRARY_ENV).ok().filter(|s| !s.is_empty());
    explicit
        .into_iter()
        .chain(LIBRARY_NAMES.iter().map(|s| s.to_string()))
        .collect()
}

/// The library, loaded at the first call; the same error at every call where it is missing.
pub(crate) fn nccl() -> Result<&'static Nccl, BackendError> {
    static NCCL: OnceLock<Result<Nccl, BackendError>> = OnceLock::new();
    NCCL.get_or_init(load).as_ref().map_err(Clone::clone)
}

fn no_device(message: String) -> BackendError {
    BackendError::new(BackendErrorKind::NoDevice, message)
}

fn load() -> Result<Nccl, BackendError> {
    let names = candidates();
    let mut failures = Vec::new();
    for name in &names {
        // SAFETY: loading NCCL runs its initializers, which only set up the library's own
        // state; it is loaded once per process (the OnceLock above) and never unloaded.
        match unsafe { libloading::Library::new(name) } {
            Ok(lib) => return from_library(lib, name),
            // libloading's message is "dlopen failed"; dlerror's (the source) says why.
            Err(e) => failures.push(
                std::error::Error::source(&e)
                    .map_or_else(|| format!("{name}: {e}"), |s| s.to_string()),
            ),
        }
    }
    Err(no_device(format!(
        "libnccl.so.2 not found (searched {}): install NCCL (the `libnccl2` package, or the \
         `nvidia-nccl-cu12` or `-cu13` wheel's site-packages/nvidia/nccl/lib on LD_LIBRARY_PATH) or set \
         {LIBRARY_ENV} to the library file [{}]",
        names.join(", "),
        failures.join("; ")
    )))
}

/// Looks up `symbol` in `lib` as a function of type `F`.
///
/// # Safety
/// `F` must be the C signature the library defines for `symbol`.
unsafe fn entry<F: Copy>(
    lib: &libloading::Library,
    name: &str,
    symbol: &str,
) -> Result<F, BackendError> {
    // SAFETY: the caller names the symbol's true signature; the returned pointer stays valid
    // because the library is kept loaded for the life of the process.
    unsafe { lib.get::<F>(symbol.as_bytes()) }
        .map(|s| *s)
        .map_err(|e| {
            no_device(format!(
                "{name} lacks {symbol}: {e} (NCCL 2.10 or later is needed)"
            ))
        })
}

fn from_library(lib: libloading::Library, name: &str) -> Result<Nccl, BackendError> {
    // The types of the `entry` calls here and below are the signatures of nccl.h (2.10 and
    // later): ncclGetUniqueId(ncclUniqueId*), ncclCommInitRank(ncclComm_t*, int, ncclUniqueId,
    // int), ncclAllReduce(const void*, void*, size_t, ncclDataType_t, ncclRedOp_t, ncclComm_t,
    // cudaStream_t), ncclGroupStart(void), ncclGroupEnd(void), ncclCommDestroy(ncclComm_t),
    // ncclGetErrorString(ncclResult_t), ncclGetVersion(int*); C enums are ints.
    // SAFETY: ncclGetVersion(int*), as above.
    let get_version: GetVersion = unsafe { entry(&lib, name, "ncclGetVersion")? };
    let mut version: c_int = 0;
    // SAFETY: `version` is a valid, writable int.
    let code = unsafe { get_version(&mut version) };
    if code != SUCCESS {
        return Err(no_device(format!(
            "{name}: ncclGetVersion failed with code {code}"
        )));
    }
    if version < MIN_VERSION {
        return Err(BackendError::new(
            BackendErrorKind::Unsupported,
            format!(
                "{name} is NCCL {}, older than 2.10, which added the average reduction",
                version_string(version)
            ),
        ));
    }
    Ok(Nccl {
        // SAFETY: see above.
        get_unique_id: unsafe { entry(&lib, name, "ncclGetUniqueId")? },
        // SAFETY: see above.
        comm_init_rank: unsafe { entry(&lib, name, "ncclCommInitRank")? },
        // SAFETY: see above.
        all_reduce: unsafe { entry(&lib, name, "ncclAllReduce")? },
        // SAFETY: see above.
        group_start: unsafe { entry(&lib, name, "ncclGroupStart")? },
        // SAFETY: see above.
        group_end: unsafe { entry(&lib, name, "ncclGroupEnd")? },
        // SAFETY: see above.
        comm_destroy: unsafe { entry(&lib, name, "ncclCommDestroy")? },
        // SAFETY: see above.
        get_error_string: unsafe { entry(&lib, name, "ncclGetErrorString")? },
        version,
        name: name.to_string(),
        _lib: lib,
    })
}

/// `22105` as `2.21.5` (codes since 2.9 are major * 10000 + minor * 100 + patch).
pub(crate) fn version_string(code: c_int) -> String {
    format!("{}.{}.{}", code / 10000, (code / 100) % 100, code % 100)
}

/// The name of an `ncclResult_t` code.
pub(crate) fn code_name(code: c_int) -> &'static str {
    match code {
        0 => "ncclSuccess",
        1 => "ncclUnhandledCudaError",
        2 => "ncclSystemError",
        3 => "ncclInternalError",
        4 => "ncclInvalidArgument",
        5 => "ncclInvalidUsage",
        6 => "ncclRemoteError",
        7 => "ncclInProgress",
        _ => "unknown ncclResult_t",
    }
}

impl Nccl {
    /// `Ok` for `ncclSuccess`, else a [`BackendErrorKind::Device`] error naming the call, the
    /// code and NCCL's description of it.
    pub(crate) fn check(&self, code: c_int, what: &str) -> Result<(), BackendError> {
        if code == SUCCESS {
            return Ok(());
        }
        // SAFETY: ncclGetErrorString takes any code and returns a static C string (or null).
        let text = unsafe { (self.get_error_string)(code) };
        let text = if text.is_null() {
            String::new()
        } else {
            // SAFETY: non-null, NUL-terminated and static, as nccl.h documents.
            unsafe { CStr::from_ptr(text) }
                .to_string_lossy()
                .into_owned()
        };
        Err(BackendError::new(
            BackendErrorKind::Device,
            format!("{what}: {} ({code}): {text}", code_name(code)),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_and_codes_read_as_nccl_writes_them() {
        assert_eq!(version_string(22105), "2.21.5");
        assert_eq!(version_string(MIN_VERSION), "2.10.0");
        assert_eq!(code_name(6), "ncclRemoteError");
        assert_eq!(code_name(99), "unknown ncclResult_t");
    }

    #[test]
    fn the_wheel_s_soname_is_searched_first() {
        let names = candidates();
        let at = |n: &str| names.iter().position(|c| c == n);
        assert!(
            at("libnccl.so.2").unwrap() < at("libnccl.so").unwrap(),
            "{names:?}"
        );
    }

    /// Where NCCL is missing (CI, this crate's development machine) loading it is a NoDevice
    /// error naming what was searched; where it is installed, a loaded library of 2.10 or later.
    #[test]
    fn loading_never_panics() {
        match nccl() {
            Ok(lib) => assert!(lib.version >= MIN_VERSION, "{lib:?}"),
            Err(e) => {
                assert!(
                    matches!(
                        e.kind,
                        BackendErrorKind::NoDevice | BackendErrorKind::Unsupported
                    ),
                    "{e}"
                );
                assert!(e.message.contains("libnccl"), "{e}");
                eprintln!("SKIP nccl library: {e}");
            }
        }
    }
}
