//! Conformance of every `mae` backend: golden files made by the official PyTorch model, an f64
//! oracle of every op, and the selection of backends to test.
pub mod backends;
pub mod golden;
pub mod oracle;

/// This crate's folder, where its golden files are (`golden/`): `$MAE_CONFORMANCE_DIR` when set
/// (test binaries run on another machine, as the GPU check does, where the folder they were
/// built in does not exist), else the folder the crate was compiled in.
pub fn dir() -> std::path::PathBuf {
    std::env::var_os("MAE_CONFORMANCE_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}
