//! The data pipeline: datasets (embedded synthetic images, a folder of JPEG/PNG files, CIFAR-10
//! binaries, MNIST IDX files), the paper's augmentations (pre-training; fine-tuning with
//! RandAugment, RandomErasing and batch Mixup/CutMix), and a multi-threaded loader whose batches
//! depend only on (dataset, seed, batch number).
//!
//! ```
//! use mae_examples::data::{self, Augment, Loader, LoaderOptions};
//!
//! // 64 synthetic images of 3 channels; no files needed.
//! let ds = data::open("synthetic:64", 3)?;
//! let opts = LoaderOptions::new(8, Augment::paper(32, 3), 7);
//! let mut loader = Loader::new(ds, opts, 0)?;
//! assert_eq!(loader.batches_per_epoch(), 8);
//! let batch = loader.next()?;
//! assert_eq!(batch.images.len(), 8 * 3 * 32 * 32);
//! assert_eq!((batch.index, batch.epoch), (0, 0));
//! # Ok::<(), data::DataError>(())
//! ```

mod augment;
mod cifar;
mod erasing;
mod error;
mod folder;
mod loader;
mod mixup;
mod mnist;
mod ordered;
pub mod pillow;
mod randaugment;
pub mod resample;
pub mod synthetic;

pub use augment::{Augment, CropBox};
pub use cifar::Cifar10;
pub use erasing::{EraseMode, RandomErasing};
pub use error::DataError;
pub use folder::ImageFolder;
pub use loader::{load_items, Batch, Loader, LoaderOptions, Shard};
pub use mixup::{sample_beta, sample_gamma, targets_without_mixing, Mixed, Mixup};
pub use mnist::Mnist;
pub use ordered::InOrder;
pub use randaugment::{RandAugment, RandOp, RAND_INCREASING_OPS};
pub use synthetic::Synthetic;

use std::path::Path;
use std::sync::Arc;

/// One decoded image: `channels x height x width` values in [0, 1], planar (CHW), row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Image {
    /// Planes: 1 (gray) or 3 (RGB) for files, any count for synthetic images.
    pub channels: usize,
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
    /// `channels * height * width` values in [0, 1].
    pub pixels: Vec<f32>,
}

impl Image {
    /// The value of channel `c` at row `y`, column `x`.
    pub fn at(&self, c: usize, y: usize, x: usize) -> f32 {
        self.pixels[(c * self.height + y) * self.width + x]
    }
}

/// A list of images that can be decoded one at a time, from any thread.
pub trait Dataset: Send + Sync {
    /// Number of images.
    fn len(&self) -> usize;
    /// Whether there are no images (never true for a dataset returned by [`open`]).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The channel count of the images [`get`](Dataset::get) returns.
    fn channels(&self) -> usize;
    /// Decodes image `index`, which must be `< len()` (it may panic otherwise). An unreadable file
    /// gives [`DataError::Unreadable`].
    fn get(&self, index: usize) -> Result<Image, DataError>;
    /// The class of image `index`, an index into [`classes`](Dataset::classes).
    fn label(&self, index: usize) -> u32;
    /// A name for image `index` in messages: its file path, or `cifar10:123`.
    fn name(&self, index: usize) -> String;
    /// The class names, in label order.
    fn classes(&self) -> Vec<String>;
    /// One line for logs, e.g. `CIFAR-10 train_10k.bin: 10000 images, 10 classes`.
    fn describe(&self) -> String;
}

/// Default number of images of the `synthetic` dataset.
pub const SYNTHETIC_DEFAULT_LEN: usize = 50_000;
/// Default side of the `synthetic` dataset's images (the augmentation crops and resizes them).
pub const SYNTHETIC_DEFAULT_SIZE: usize = 64;

/// Opens the dataset named by `spec` for a model of `channels` input channels, checking before
/// training starts everything that can be checked: existence, non-emptiness, channel fit,
/// file lengths and headers.
///
/// `spec` is one of
/// - `synthetic`, `synthetic:N` or `synthetic:N:SIZE`: N images (default 50,000) of SIZE x SIZE
///   pixels (default 64) generated on the fly from their index; no files (a folder that happens to
///   be called `synthetic` is reached as `./synthetic`);
/// - a folder: class subfolders of `.jpg`/`.jpeg`/`.png` files (the ImageFolder layout; a flat folder
///   of images is one class), any size, gray/RGB/RGBA converted to `channels` (1 or 3);
/// - a CIFAR-10 binary file (`.bin`), or a folder holding `data_batch_*.bin` files (3 channels);
/// - an MNIST `idx3-ubyte` file, gzipped or not, labelled by its sibling `idx1-ubyte` file when
///   there is one (1 channel).
pub fn open(spec: &str, channels: usize) -> Result<Arc<dyn Dataset>, DataError> {
    if channels == 0 {
        return Err(DataError::Options {
            why: "the model takes 0 input channels".into(),
        });
    }
    if let Some(rest) = spec.strip_prefix("synthetic") {
        if rest.is_empty() || rest.starts_with(':') {
            return Ok(Arc::new(Synthetic::parse(rest, channels)?));
        }
    }
    let path = Path::new(spec);
    let meta = std::fs::metadata(path).map_err(|e| DataError::io(path, e))?;
    if meta.is_dir() {
        if let Some(bins) = cifar::batch_files(path)? {
            return Ok(Arc::new(Cifar10::open(&bins, channels)?));
        }
        return Ok(Arc::new(ImageFolder::open(path, channels)?));
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    if name.ends_with(".bin") {
        return Ok(Arc::new(Cifar10::open(&[path.to_path_buf()], channels)?));
    }
    if name.contains("idx") || name.contains("ubyte") {
        return Ok(Arc::new(Mnist::open(path, channels)?));
    }
    Err(DataError::BadFormat {
        path: path.to_path_buf(),
        why: "not a dataset: expected a folder of images, a CIFAR-10 .bin file, an MNIST \
              idx3-ubyte file (.gz or not), or `synthetic`"
            .into(),
    })
}

/// The ImageNet channel means the official transforms normalize with (RGB order).
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// The ImageNet channel standard deviations (RGB order).
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Per-channel (mean, std) for normalizing images of `channels` channels: ImageNet's for 3; for
/// any other count every channel gets the average of ImageNet's three (mean 0.449, std 0.226),
/// the usual choice when a gray image stands in for an RGB one. (MNIST's own statistics, 0.131 and
/// 0.308, would centre its digits better, but with `norm_pix_loss` the target is normalized per
/// patch anyway, and one fixed rule keeps checkpoints interchangeable between gray datasets.)
pub fn norm_stats(channels: usize) -> (Vec<f32>, Vec<f32>) {
    if channels == 3 {
        (IMAGENET_MEAN.to_vec(), IMAGENET_STD.to_vec())
    } else {
        let mean = IMAGENET_MEAN.iter().sum::<f32>() / 3.0;
        let std = IMAGENET_STD.iter().sum::<f32>() / 3.0;
        (vec![mean; channels], vec![std; channels])
    }
}

/// File name of `path` for messages and `describe` lines.
pub(crate) fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// Reads a whole file, mapping errors to [`DataError`] naming `path`.
pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>, DataError> {
    std::fs::read(path).map_err(|e| DataError::io(path, e))
}
