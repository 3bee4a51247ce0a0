//! What can go wrong while opening or reading a dataset, with messages that name the file and
//! say what to do.

use std::fmt;
use std::path::PathBuf;

/// An error of the data pipeline. Everything that [`open`](super::open) can find out before training
/// starts (a missing path, an empty folder, a channel count the model cannot take, a truncated
/// file) is reported by `open`; the rest (an image that fails to decode) comes from
/// [`Dataset::get`](super::Dataset::get) and is handled by the [`Loader`](super::Loader).
#[derive(Debug)]
pub enum DataError {
    /// The path does not exist.
    Missing { path: PathBuf },
    /// The path exists but holds no images.
    Empty { path: PathBuf, why: String },
    /// The dataset's images have `has` channels and cannot be converted to the model's `model`.
    Channels {
        dataset: String,
        has: String,
        model: usize,
    },
    /// A file is shorter than its format says it should be (or has bytes left over).
    Truncated {
        path: PathBuf,
        len: u64,
        why: String,
    },
    /// A file is not in the format its name or place says.
    BadFormat { path: PathBuf, why: String },
    /// One image could not be read or decoded; the loader replaces it and reports it.
    Unreadable { name: String, why: String },
    /// Too many images of one batch were unreadable to go on.
    TooManyUnreadable {
        batch: u64,
        failed: usize,
        attempts: usize,
        examples: Vec<String>,
    },
    /// The loader's options do not fit the dataset (batch size 0, larger than the dataset, ...).
    Options { why: String },
    /// A loader worker thread panicked or stopped.
    Worker { why: String },
    /// An I/O error while reading `path`.
    Io { path: PathBuf, err: std::io::Error },
}

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>, err: std::io::Error) -> DataError {
        let path = path.into();
        if err.kind() == std::io::ErrorKind::NotFound {
            DataError::Missing { path }
        } else {
            DataError::Io { path, err }
        }
    }
}

impl fmt::Display for DataError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DataError::Missing { path } => write!(
                f,
                "{}: no such file or folder; --data takes a folder of images (class subfolders of \
                 JPEG/PNG files), a CIFAR-10 .bin file, an MNIST idx3-ubyte file, or `synthetic`",
                path.display()
            ),
            DataError::Empty { path, why } => write!(
                f,
                "{}: empty dataset: {why}; put .jpg/.jpeg/.png files in it (one subfolder per class) \
                 or point --data elsewhere",
                path.display()
            ),
            DataError::Channels {
                dataset,
                has,
                model,
            } => write!(
                f,
                "{dataset} has {has} but the model takes {model} input channel(s) (in_chans); \
                 choose a model with a matching in_chans or another dataset"
            ),
            DataError::Truncated { path, len, why } => write!(
                f,
                "{}: truncated or damaged file ({len} bytes): {why}; download or copy it again",
                path.display()
            ),
            DataError::BadFormat { path, why } => write!(f, "{}: {why}", path.display()),
            DataError::Unreadable { name, why } => write!(f, "{name}: unreadable image: {why}"),
            DataError::TooManyUnreadable {
                batch,
                failed,
                attempts,
                examples,
            } => write!(
                f,
                "batch {batch}: {failed} of {attempts} images could not be read (first: {}); \
                 the dataset looks damaged, check its files",
                examples.join("; ")
            ),
            DataError::Options { why } => write!(f, "data loader: {why}"),
            DataError::Worker { why } => write!(f, "data loader worker failed: {why}"),
            DataError::Io { path, err } => write!(f, "{}: {err}", path.display()),
        }
    }
}

impl std::error::Error for DataError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DataError::Io { err, .. } => Some(err),
            _ => None,
        }
    }
}
