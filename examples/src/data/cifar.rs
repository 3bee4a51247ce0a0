//! CIFAR-10 binary files: records of 3073 bytes, a label byte (0..9) then 1024 red, 1024 green and
//! 1024 blue bytes, each plane row-major 32 x 32. The files are read whole at open and checked.

use super::{file_name, read_file, DataError, Dataset, Image};
use std::path::{Path, PathBuf};

const SIDE: usize = 32;
const PIXELS: usize = 3 * SIDE * SIDE;
const RECORD: usize = 1 + PIXELS;

/// The class names of CIFAR-10 in label order (as in `batches.meta.txt`).
pub const CLASSES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

/// The official distribution's training files in a folder (`data_batch_1.bin` ...), sorted;
/// `None` when there are none.
pub(crate) fn batch_files(dir: &Path) -> Result<Option<Vec<PathBuf>>, DataError> {
    let mut bins = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))? {
        let path = entry.map_err(|e| DataError::io(dir, e))?.path();
        let name = file_name(&path);
        if name.starts_with("data_batch_") && name.ends_with(".bin") {
            bins.push(path);
        }
    }
    bins.sort();
    Ok((!bins.is_empty()).then_some(bins))
}

/// CIFAR-10 images from one or more binary files, held in memory.
pub struct Cifar10 {
    records: Vec<u8>,
    classes: Vec<String>,
    files: Vec<PathBuf>,
}

impl Cifar10 {
    /// Reads and checks `files` for a model of `channels` input channels: CIFAR-10 has 3.
    pub fn open(files: &[PathBuf], channels: usize) -> Result<Cifar10, DataError> {
        let names: Vec<String> = files.iter().map(|f| file_name(f)).collect();
        if channels != 3 {
            // Checked first so that the message comes before any reading; the files must still
            // exist for the message to be about channels rather than a typo.
            for f in files {
                std::fs::metadata(f).map_err(|e| DataError::io(f, e))?;
            }
            return Err(DataError::Channels {
                dataset: format!("CIFAR-10 {}", names.join(", ")),
                has: "3 channels (RGB)".into(),
                model: channels,
            });
        }
        let mut records = Vec::new();
        for path in files {
            let bytes = read_file(path)?;
            let len = bytes.len() as u64;
            if bytes.is_empty() {
                return Err(DataError::Empty {
                    path: path.clone(),
                    why: "the CIFAR-10 file has 0 bytes".into(),
                });
            }
            if bytes.len() % RECORD != 0 {
                return Err(DataError::Truncated {
                    path: path.clone(),
                    len,
                    why: format!(
                        "not a whole number of {RECORD}-byte CIFAR-10 records (1 label byte + \
                         {PIXELS} pixel bytes): {} records and {} bytes left over",
                        bytes.len() / RECORD,
                        bytes.len() % RECORD
                    ),
                });
            }
            if let Some((k, rec)) = bytes
                .chunks(RECORD)
                .enumerate()
                .find(|(_, r)| r[0] as usize >= CLASSES.len())
            {
                return Err(DataError::BadFormat {
                    path: path.clone(),
                    why: format!(
                        "record {k} has label {}, CIFAR-10 labels are 0..9; not a CIFAR-10 binary \
                         file (CIFAR-100's records have two label bytes)",
                        rec[0]
                    ),
                });
            }
            records.extend_from_slice(&bytes);
        }
        Ok(Cifar10 {
            records,
            classes: class_names(files),
            files: files.to_vec(),
        })
    }
}

/// `batches.meta.txt` beside the first file when it lists ten names, else the standard names.
fn class_names(files: &[PathBuf]) -> Vec<String> {
    let standard = || CLASSES.iter().map(|c| c.to_string()).collect();
    let Some(dir) = files.first().and_then(|f| f.parent()) else {
        return standard();
    };
    match std::fs::read_to_string(dir.join("batches.meta.txt")) {
        Ok(text) => {
            let names: Vec<String> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect();
            if names.len() == CLASSES.len() {
                names
            } else {
                standard()
            }
        }
        Err(_) => standard(),
    }
}

impl Dataset for Cifar10 {
    fn len(&self) -> usize {
        self.records.len() / RECORD
    }
    fn channels(&self) -> usize {
        3
    }
    fn get(&self, index: usize) -> Result<Image, DataError> {
        let rec = &self.records[index * RECORD..][..RECORD];
        Ok(Image {
            channels: 3,
            height: SIDE,
            width: SIDE,
            pixels: rec[1..].iter().map(|&b| b as f32 / 255.0).collect(),
        })
    }
    fn label(&self, index: usize) -> u32 {
        self.records[index * RECORD] as u32
    }
    fn name(&self, index: usize) -> String {
        format!("cifar10:{index}")
    }
    fn classes(&self) -> Vec<String> {
        self.classes.clone()
    }
    fn describe(&self) -> String {
        let names: Vec<String> = self.files.iter().map(|f| file_name(f)).collect();
        format!(
            "CIFAR-10 {}: {} images, {} classes",
            names.join(", "),
            self.len(),
            self.classes.len()
        )
    }
}
