//! Feature files: one vector per image of a dataset, with its label and name, and a record of
//! where the vectors came from (a checkpoint's encoder, a random-init encoder, or the pixels
//! themselves). `embed` writes them and `linprobe` trains the paper's linear probe on them, so
//! an encoder runs once however many probes follow.
//!
//! The file is safetensors, readable by any safetensors reader: tensor `features` (F32,
//! `[N, D]`) and `labels` (I64, `[N]`), and in `__metadata__` the image names and class names as
//! JSON arrays and the source fields as strings. The header is written here by hand (the
//! weights writer of `mae` stores f32 tensors only).
//!
//! ```
//! use mae_examples::features::{FeatureSet, FeatureSource};
//!
//! let set = FeatureSet::new(
//!     vec![0.5, -1.0, 2.0, 0.25], // two images, two values each
//!     2,
//!     vec![1, 0],
//!     vec!["a.png".into(), "b.png".into()],
//!     vec!["cat".into(), "dog".into()],
//!     FeatureSource::pixels("synthetic: 2 images"),
//! )?;
//! let back = FeatureSet::from_bytes(&set.to_bytes()?)?;
//! assert_eq!(back, set);
//! assert_eq!(back.row(1), &[2.0, 0.25]);
//! # Ok::<(), mae_examples::features::FeaturesError>(())
//! ```

use crate::checkpoint::write_atomic;
use serde_json::{Map, Value};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// The `format` metadata value of a feature file.
pub const FORMAT: &str = "mae-features-v1";
/// Name of the `[N, D]` F32 tensor.
pub const FEATURES: &str = "features";
/// Name of the `[N]` I64 tensor.
pub const LABELS: &str = "labels";
/// Largest header accepted (the safetensors crate's own limit), so a corrupt length cannot ask
/// for an absurd allocation.
const MAX_HEADER: u64 = 100_000_000;

/// Where a feature set came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeatureSource {
    /// The encoder: a checkpoint path, `random-init (seed S)`, or `pixels`.
    pub encoder: String,
    /// How tokens became one vector: `cls`, `mean`, or `none` (pixels).
    pub pool: String,
    /// The dataset, as its `describe()` line.
    pub dataset: String,
    /// The model configuration as JSON (empty for pixels).
    pub model: String,
}

impl FeatureSource {
    /// The source of a raw-pixel feature set of `dataset`.
    pub fn pixels(dataset: &str) -> FeatureSource {
        FeatureSource {
            encoder: "pixels".into(),
            pool: "none".into(),
            dataset: dataset.into(),
            model: String::new(),
        }
    }
}

/// One feature vector per image, with labels and names.
#[derive(Clone, Debug, PartialEq)]
pub struct FeatureSet {
    /// `[N, dim]`, row-major.
    pub features: Vec<f32>,
    /// Values per vector.
    pub dim: usize,
    /// The class of each image, an index into `classes`.
    pub labels: Vec<u32>,
    /// A name per image (its file or `synthetic:12`).
    pub names: Vec<String>,
    /// Class names in label order.
    pub classes: Vec<String>,
    /// Where the vectors came from.
    pub source: FeatureSource,
}

/// Why a feature set cannot be built, written or read.
#[derive(Debug)]
pub enum FeaturesError {
    /// Reading or writing the file failed.
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        err: io::Error,
    },
    /// The bytes are not a well-formed safetensors file (truncated, bad header, offsets out of
    /// range).
    Corrupt(String),
    /// A tensor the format needs is absent.
    MissingTensor(&'static str),
    /// A tensor has another dtype or rank than the format's.
    WrongTensor {
        /// The tensor.
        name: &'static str,
        /// What the format stores.
        expected: &'static str,
        /// What the file holds.
        got: String,
    },
    /// Two counts that must agree do not (values vs `N x D`, names vs images, ...).
    LengthMismatch {
        /// What was counted.
        what: &'static str,
        /// The count the rest of the set implies.
        expected: usize,
        /// The count found.
        got: usize,
    },
    /// A label is not an index into the class list.
    LabelOutOfRange {
        /// The image.
        index: usize,
        /// Its label.
        label: i64,
        /// How many classes there are.
        classes: usize,
    },
    /// A feature value is NaN or infinite.
    NonFinite {
        /// The first image holding one.
        index: usize,
    },
    /// The metadata is missing a field or holds a malformed one.
    Metadata(String),
    /// The header (mostly the image names) would pass the 100 MB that safetensors readers
    /// accept.
    HeaderTooLarge {
        /// Its size in bytes.
        bytes: usize,
    },
}

impl fmt::Display for FeaturesError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FeaturesError::Io { path, err } => write!(f, "{}: {err}", path.display()),
            FeaturesError::Corrupt(why) => write!(f, "not a feature file: {why}"),
            FeaturesError::MissingTensor(name) => {
                write!(f, "feature file has no `{name}` tensor")
            }
            FeaturesError::WrongTensor {
                name,
                expected,
                got,
            } => write!(f, "tensor `{name}` is {got}, expected {expected}"),
            FeaturesError::LengthMismatch {
                what,
                expected,
                got,
            } => write!(f, "{what}: expected {expected}, got {got}"),
            FeaturesError::LabelOutOfRange {
                index,
                label,
                classes,
            } => write!(
                f,
                "image {index} has label {label}, but there are {classes} classes"
            ),
            FeaturesError::NonFinite { index } => {
                write!(f, "image {index} has a NaN or infinite feature")
            }
            FeaturesError::Metadata(why) => write!(f, "feature file metadata: {why}"),
            FeaturesError::HeaderTooLarge { bytes } => write!(
                f,
                "the header would take {bytes} bytes, over the {MAX_HEADER} that safetensors \
                 readers accept (shorter image names, or fewer images per file)"
            ),
        }
    }
}

impl std::error::Error for FeaturesError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            FeaturesError::Io { err, .. } => Some(err),
            _ => None,
        }
    }
}

impl FeatureSet {
    /// A checked feature set: `features` holds `labels.len()` rows of `dim` finite values, one
    /// name per row, every label below `classes.len()`.
    pub fn new(
        features: Vec<f32>,
        dim: usize,
        labels: Vec<u32>,
        names: Vec<String>,
        classes: Vec<String>,
        source: FeatureSource,
    ) -> Result<FeatureSet, FeaturesError> {
        let set = FeatureSet {
            features,
            dim,
            labels,
            names,
            classes,
            source,
        };
        set.validate()?;
        Ok(set)
    }

    /// Checks the invariants [`FeatureSet::new`] states.
    pub fn validate(&self) -> Result<(), FeaturesError> {
        let n = self.len();
        if self.dim == 0 {
            return Err(FeaturesError::LengthMismatch {
                what: "values per feature vector (at least 1)",
                expected: 1,
                got: 0,
            });
        }
        let mismatch = |what, expected, got| FeaturesError::LengthMismatch {
            what,
            expected,
            got,
        };
        if n.checked_mul(self.dim) != Some(self.features.len()) {
            return Err(mismatch(
                "feature values (images x dim)",
                n.saturating_mul(self.dim),
                self.features.len(),
            ));
        }
        if self.names.len() != n {
            return Err(mismatch("image names", n, self.names.len()));
        }
        if let Some(index) = self
            .labels
            .iter()
            .position(|&l| l as usize >= self.classes.len())
        {
            return Err(FeaturesError::LabelOutOfRange {
                index,
                label: self.labels[index] as i64,
                classes: self.classes.len(),
            });
        }
        if let Some(at) = self.features.iter().position(|x| !x.is_finite()) {
            return Err(FeaturesError::NonFinite {
                index: at / self.dim,
            });
        }
        Ok(())
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the set holds no image.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The feature vector of image `i`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.features[i * self.dim..(i + 1) * self.dim]
    }

    /// The safetensors bytes of the set (labels first, so both tensors start aligned).
    pub fn to_bytes(&self) -> Result<Vec<u8>, FeaturesError> {
        let n = self.len();
        let label_bytes = n * 8;
        let feature_bytes = self.features.len() * 4;
        let strings = |v: &[String]| Value::from(v.to_vec()).to_string();
        let mut meta = Map::new();
        for (k, v) in [
            ("format", FORMAT.to_string()),
            ("names", strings(&self.names)),
            ("classes", strings(&self.classes)),
            ("encoder", self.source.encoder.clone()),
            ("pool", self.source.pool.clone()),
            ("dataset", self.source.dataset.clone()),
            ("model", self.source.model.clone()),
        ] {
            meta.insert(k.into(), Value::String(v));
        }
        let tensor = |dtype: &str, shape: Vec<usize>, begin: usize, end: usize| serde_json::json!({ "dtype": dtype, "shape": shape, "data_offsets": [begin, end] });
        let mut header = Map::new();
        header.insert("__metadata__".into(), Value::Object(meta));
        header.insert(LABELS.into(), tensor("I64", vec![n], 0, label_bytes));
        header.insert(
            FEATURES.into(),
            tensor(
                "F32",
                vec![n, self.dim],
                label_bytes,
                label_bytes + feature_bytes,
            ),
        );
        let mut header = Value::Object(header).to_string().into_bytes();
        // The data starts 8-byte aligned, as the reference writer pads it.
        while header.len() % 8 != 0 {
            header.push(b' ');
        }
        if header.len() as u64 > MAX_HEADER {
            return Err(FeaturesError::HeaderTooLarge {
                bytes: header.len(),
            });
        }
        let mut out = Vec::with_capacity(8 + header.len() + label_bytes + feature_bytes);
        out.extend((header.len() as u64).to_le_bytes());
        out.extend(header);
        for &l in &self.labels {
            out.extend((l as i64).to_le_bytes());
        }
        for &x in &self.features {
            out.extend(x.to_le_bytes());
        }
        Ok(out)
    }

    /// Parses [`FeatureSet::to_bytes`]'s output (or any safetensors file of that layout) and
    /// checks it as [`FeatureSet::new`] does.
    pub fn from_bytes(bytes: &[u8]) -> Result<FeatureSet, FeaturesError> {
        let corrupt = |why: String| FeaturesError::Corrupt(why);
        let len_bytes: [u8; 8] =
            bytes
                .get(..8)
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| {
                    corrupt(format!(
                        "{} bytes, shorter than the header size",
                        bytes.len()
                    ))
                })?;
        let header_len = u64::from_le_bytes(len_bytes);
        if header_len > MAX_HEADER || header_len > (bytes.len() - 8) as u64 {
            return Err(corrupt(format!(
                "header of {header_len} bytes in a file of {} (truncated?)",
                bytes.len()
            )));
        }
        let (header, data) = bytes[8..].split_at(header_len as usize);
        let header: Map<String, Value> = serde_json::from_slice(header)
            .map_err(|e| corrupt(format!("header is not a JSON object: {e}")))?;
        let meta = header
            .get("__metadata__")
            .and_then(Value::as_object)
            .ok_or_else(|| FeaturesError::Metadata("no `__metadata__`".into()))?;
        let text = |key: &str| -> Result<String, FeaturesError> {
            meta.get(key)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| FeaturesError::Metadata(format!("no `{key}` string")))
        };
        let format = text("format")?;
        if format != FORMAT {
            return Err(FeaturesError::Metadata(format!(
                "format {format:?}, expected {FORMAT:?}"
            )));
        }
        let list = |key: &str| -> Result<Vec<String>, FeaturesError> {
            serde_json::from_str(&text(key)?).map_err(|e| {
                FeaturesError::Metadata(format!("`{key}` is not a JSON list of strings: {e}"))
            })
        };
        let (names, classes) = (list("names")?, list("classes")?);
        let source = FeatureSource {
            encoder: text("encoder")?,
            pool: text("pool")?,
            dataset: text("dataset")?,
            model: text("model")?,
        };

        let (label_shape, label_data) = tensor(&header, data, LABELS, "I64", 8)?;
        let (feature_shape, feature_data) = tensor(&header, data, FEATURES, "F32", 4)?;
        let [n] = label_shape[..] else {
            return Err(FeaturesError::WrongTensor {
                name: LABELS,
                expected: "rank 1 [N]",
                got: format!("shape {label_shape:?}"),
            });
        };
        let [rows, dim] = feature_shape[..] else {
            return Err(FeaturesError::WrongTensor {
                name: FEATURES,
                expected: "rank 2 [N, D]",
                got: format!("shape {feature_shape:?}"),
            });
        };
        if rows != n {
            return Err(FeaturesError::LengthMismatch {
                what: "feature rows vs labels",
                expected: n,
                got: rows,
            });
        }
        let mut labels = Vec::with_capacity(n);
        for (index, b) in label_data.chunks_exact(8).enumerate() {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            let label = i64::from_le_bytes(a);
            match u32::try_from(label) {
                Ok(l) if (l as usize) < classes.len() => labels.push(l),
                _ => {
                    return Err(FeaturesError::LabelOutOfRange {
                        index,
                        label,
                        classes: classes.len(),
                    })
                }
            }
        }
        let features = feature_data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        FeatureSet::new(features, dim, labels, names, classes, source)
    }

    /// Writes the set to `path` atomically (a crash leaves the previous file or none).
    pub fn save(&self, path: &Path) -> Result<(), FeaturesError> {
        self.validate()?;
        write_atomic(path, &self.to_bytes()?).map_err(|err| FeaturesError::Io {
            path: path.to_path_buf(),
            err,
        })
    }

    /// Reads a set written by [`FeatureSet::save`].
    pub fn load(path: &Path) -> Result<FeatureSet, FeaturesError> {
        let bytes = std::fs::read(path).map_err(|err| FeaturesError::Io {
            path: path.to_path_buf(),
            err,
        })?;
        FeatureSet::from_bytes(&bytes)
    }
}

/// The shape and bytes of tensor `name`, checked against its header entry and the data area.
fn tensor<'a>(
    header: &Map<String, Value>,
    data: &'a [u8],
    name: &'static str,
    dtype: &'static str,
    size: usize,
) -> Result<(Vec<usize>, &'a [u8]), FeaturesError> {
    let entry = header
        .get(name)
        .and_then(Value::as_object)
        .ok_or(FeaturesError::MissingTensor(name))?;
    let got = entry.get("dtype").and_then(Value::as_str).unwrap_or("?");
    if got != dtype {
        return Err(FeaturesError::WrongTensor {
            name,
            expected: dtype,
            got: format!("dtype {got}"),
        });
    }
    let numbers = |key: &str| -> Result<Vec<usize>, FeaturesError> {
        entry
            .get(key)
            .and_then(Value::as_array)
            .and_then(|a| {
                a.iter()
                    .map(|v| v.as_u64().and_then(|x| usize::try_from(x).ok()))
                    .collect::<Option<Vec<usize>>>()
            })
            .ok_or_else(|| {
                FeaturesError::Corrupt(format!("tensor `{name}` has no valid `{key}` list"))
            })
    };
    let shape = numbers("shape")?;
    let offsets = numbers("data_offsets")?;
    let &[begin, end] = &offsets[..] else {
        return Err(FeaturesError::Corrupt(format!(
            "tensor `{name}` has {} data offsets, expected 2",
            offsets.len()
        )));
    };
    if begin > end || end > data.len() {
        return Err(FeaturesError::Corrupt(format!(
            "tensor `{name}` spans bytes {begin}..{end} of a data area of {} (truncated?)",
            data.len()
        )));
    }
    let numel = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .and_then(|n| n.checked_mul(size));
    if numel != Some(end - begin) {
        return Err(FeaturesError::LengthMismatch {
            what: if name == LABELS {
                "bytes of the labels tensor"
            } else {
                "bytes of the features tensor"
            },
            expected: numel.unwrap_or(usize::MAX),
            got: end - begin,
        });
    }
    Ok((shape, &data[begin..end]))
}
