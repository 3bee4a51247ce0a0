//! MNIST-style IDX files (LeCun et al.): a big-endian header (two zero bytes, the element type
//! 0x08 = unsigned byte, the number of dimensions, then each dimension as a u32) followed by the
//! data. Images are `idx3` (count x rows x cols), labels `idx1` (count). Gzipped files (the way
//! MNIST is distributed) are recognized by their magic bytes and decompressed at open.

use super::{file_name, read_file, DataError, Dataset, Image};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Single-channel images from an IDX file, held in memory, with labels when the sibling labels
/// file exists.
pub struct Mnist {
    pixels: Vec<u8>,
    rows: usize,
    cols: usize,
    labels: Option<Vec<u8>>,
    path: PathBuf,
    labels_path: Option<PathBuf>,
}

/// The file's bytes, gunzipped when they start with the gzip magic.
fn read_maybe_gz(path: &Path) -> Result<Vec<u8>, DataError> {
    let raw = read_file(path)?;
    if !raw.starts_with(&[0x1f, 0x8b]) {
        return Ok(raw);
    }
    let mut out = Vec::new();
    match flate2::read::GzDecoder::new(&raw[..]).read_to_end(&mut out) {
        Ok(_) => Ok(out),
        Err(e) => Err(DataError::Truncated {
            path: path.to_path_buf(),
            len: raw.len() as u64,
            why: format!("the gzip stream is damaged or cut short ({e})"),
        }),
    }
}

/// Parses an IDX header of unsigned bytes with `ndims` dimensions; returns the dimensions and the
/// data, checked to be exactly as long as they say.
fn parse_idx<'a>(
    path: &Path,
    bytes: &'a [u8],
    ndims: usize,
) -> Result<(Vec<usize>, &'a [u8]), DataError> {
    let bad = |why: String| DataError::BadFormat {
        path: path.to_path_buf(),
        why,
    };
    let header = 4 + 4 * ndims;
    if bytes.len() < 4 {
        return Err(DataError::Truncated {
            path: path.to_path_buf(),
            len: bytes.len() as u64,
            why: "shorter than the 4-byte IDX magic number".into(),
        });
    }
    let magic = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let expected = 0x0800 + ndims as u32;
    if magic != expected {
        return Err(bad(format!(
            "IDX magic number is {magic:#010x}, expected {expected:#010x} (unsigned bytes, \
             {ndims} dimension(s)); not an MNIST {} file",
            if ndims == 3 { "images" } else { "labels" }
        )));
    }
    if bytes.len() < header {
        return Err(DataError::Truncated {
            path: path.to_path_buf(),
            len: bytes.len() as u64,
            why: format!("shorter than its {header}-byte IDX header"),
        });
    }
    let dims: Vec<usize> = bytes[4..header]
        .chunks(4)
        .map(|d| u32::from_be_bytes([d[0], d[1], d[2], d[3]]) as usize)
        .collect();
    let body = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| bad(format!("IDX dimensions {dims:?} overflow")))?;
    let data = &bytes[header..];
    if data.len() != body {
        return Err(DataError::Truncated {
            path: path.to_path_buf(),
            len: bytes.len() as u64,
            why: format!(
                "the IDX header announces dimensions {dims:?} = {body} data bytes after the \
                 {header}-byte header, the file has {}",
                data.len()
            ),
        });
    }
    Ok((dims, data))
}

/// The labels file of an images file, by MNIST's naming: `images` -> `labels`, `idx3` -> `idx1`,
/// with or without `.gz`.
fn labels_path(images: &Path) -> Option<PathBuf> {
    let name = file_name(images);
    let guess = name.replace("images", "labels").replace("idx3", "idx1");
    if guess == name {
        return None;
    }
    let stem = guess.strip_suffix(".gz").unwrap_or(&guess).to_string();
    [stem.clone(), format!("{stem}.gz")]
        .into_iter()
        .map(|n| images.with_file_name(n))
        .find(|p| p.is_file())
}

impl Mnist {
    /// Reads and checks the IDX images file `path` (and its labels file) for a model of
    /// `channels` input channels: MNIST has 1.
    pub fn open(path: &Path, channels: usize) -> Result<Mnist, DataError> {
        std::fs::metadata(path).map_err(|e| DataError::io(path, e))?;
        if channels != 1 {
            return Err(DataError::Channels {
                dataset: format!("MNIST {}", file_name(path)),
                has: "1 channel (gray)".into(),
                model: channels,
            });
        }
        let bytes = read_maybe_gz(path)?;
        let (dims, data) = parse_idx(path, &bytes, 3)?;
        let (count, rows, cols) = (dims[0], dims[1], dims[2]);
        if count == 0 || rows == 0 || cols == 0 {
            return Err(DataError::Empty {
                path: path.to_path_buf(),
                why: format!("the IDX header announces {count} images of {rows}x{cols}"),
            });
        }
        let pixels = data.to_vec();
        let labels_path = labels_path(path);
        let labels = match &labels_path {
            None => None,
            Some(lp) => {
                let bytes = read_maybe_gz(lp)?;
                let (dims, data) = parse_idx(lp, &bytes, 1)?;
                if dims[0] != count {
                    return Err(DataError::BadFormat {
                        path: lp.clone(),
                        why: format!(
                            "{} labels for the {count} images of {}",
                            dims[0],
                            file_name(path)
                        ),
                    });
                }
                if let Some((k, l)) = data.iter().enumerate().find(|(_, &l)| l > 9) {
                    return Err(DataError::BadFormat {
                        path: lp.clone(),
                        why: format!("label {k} is {l}, MNIST labels are 0..9"),
                    });
                }
                Some(data.to_vec())
            }
        };
        Ok(Mnist {
            pixels,
            rows,
            cols,
            labels,
            path: path.to_path_buf(),
            labels_path,
        })
    }
}

impl Dataset for Mnist {
    fn len(&self) -> usize {
        self.pixels.len() / (self.rows * self.cols)
    }
    fn channels(&self) -> usize {
        1
    }
    fn get(&self, index: usize) -> Result<Image, DataError> {
        let n = self.rows * self.cols;
        Ok(Image {
            channels: 1,
            height: self.rows,
            width: self.cols,
            pixels: self.pixels[index * n..][..n]
                .iter()
                .map(|&b| b as f32 / 255.0)
                .collect(),
        })
    }
    fn label(&self, index: usize) -> u32 {
        self.labels.as_ref().map_or(0, |l| l[index] as u32)
    }
    fn name(&self, index: usize) -> String {
        format!("mnist:{index}")
    }
    fn classes(&self) -> Vec<String> {
        if self.labels.is_some() {
            (0..10).map(|d| d.to_string()).collect()
        } else {
            vec!["unlabelled".into()]
        }
    }
    fn describe(&self) -> String {
        format!(
            "MNIST {}: {} images of {}x{}, {}",
            file_name(&self.path),
            self.len(),
            self.rows,
            self.cols,
            match &self.labels_path {
                Some(p) => format!("10 classes (labels from {})", file_name(p)),
                None => "no labels file found (one class)".into(),
            }
        )
    }
}
