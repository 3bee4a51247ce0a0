//! A folder of images in torchvision's ImageFolder layout: one subfolder per class (searched
//! recursively), or a flat folder of images that is one class. Files are listed at open (`.jpg`,
//! `.jpeg`, `.png`, any case; hidden files skipped; sorted, so the order is the same on every
//! machine) and decoded lazily in [`Dataset::get`].

use super::{file_name, read_file, DataError, Dataset, Image};
use image::DynamicImage;
use std::path::{Path, PathBuf};

/// How deep class subfolders are searched (a guard against symbolic-link loops).
const MAX_DEPTH: usize = 16;

/// Images of a folder, converted to the model's channel count when decoded.
pub struct ImageFolder {
    root: PathBuf,
    files: Vec<(PathBuf, u32)>,
    classes: Vec<String>,
    channels: usize,
    loose: usize,
}

fn is_image(path: &Path) -> bool {
    let name = file_name(path);
    if name.starts_with('.') {
        return false;
    }
    let lower = name.to_lowercase();
    [".jpg", ".jpeg", ".png"].iter().any(|e| lower.ends_with(e))
}

/// Image files under `dir`, recursively, sorted.
fn list_images(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) -> Result<(), DataError> {
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))? {
        entries.push(entry.map_err(|e| DataError::io(dir, e))?.path());
    }
    entries.sort();
    for path in entries {
        if path.is_dir() {
            if depth < MAX_DEPTH && !file_name(&path).starts_with('.') {
                list_images(&path, depth + 1, out)?;
            }
        } else if is_image(&path) {
            out.push(path);
        }
    }
    Ok(())
}

/// Names of the CIFAR-10 or IDX files directly in `dir` (at most three), for the hint of an
/// empty folder.
fn dataset_files(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| file_name(&e.path()))
        .filter(|n| n.ends_with(".bin") || n.contains("idx3"))
        .collect();
    names.sort();
    names.truncate(3);
    names
}

impl ImageFolder {
    /// Lists the images of `root` for a model of `channels` input channels (1 or 3: colour images
    /// are converted to gray by ITU-R 601 luma, gray ones replicated to RGB, alpha dropped).
    pub fn open(root: &Path, channels: usize) -> Result<ImageFolder, DataError> {
        let mut subdirs = Vec::new();
        let mut top = Vec::new();
        for entry in std::fs::read_dir(root).map_err(|e| DataError::io(root, e))? {
            let path = entry.map_err(|e| DataError::io(root, e))?.path();
            if path.is_dir() {
                if !file_name(&path).starts_with('.') {
                    subdirs.push(path);
                }
            } else if is_image(&path) {
                top.push(path);
            }
        }
        subdirs.sort();
        top.sort();
        let mut files = Vec::new();
        let mut classes = Vec::new();
        for dir in &subdirs {
            let mut found = Vec::new();
            list_images(dir, 1, &mut found)?;
            if !found.is_empty() {
                let label = classes.len() as u32;
                classes.push(file_name(dir));
                files.extend(found.into_iter().map(|f| (f, label)));
            }
        }
        let mut loose = 0;
        if classes.is_empty() {
            // A flat folder of images: one class named after the folder.
            classes.push(file_name(root));
            files.extend(top.into_iter().map(|f| (f, 0)));
        } else {
            loose = top.len();
        }
        if files.is_empty() {
            let mut why = "no .jpg, .jpeg or .png files in it or its subfolders".to_string();
            let datasets = dataset_files(root);
            if !datasets.is_empty() {
                why += &format!(
                    " (it holds {}: give the path of the file itself)",
                    datasets.join(", ")
                );
            }
            return Err(DataError::Empty {
                path: root.to_path_buf(),
                why,
            });
        }
        if channels != 1 && channels != 3 {
            return Err(DataError::Channels {
                dataset: format!("image folder {}", root.display()),
                has: "images convertible to 1 (gray) or 3 (RGB) channels".into(),
                model: channels,
            });
        }
        Ok(ImageFolder {
            root: root.to_path_buf(),
            files,
            classes,
            channels,
            loose,
        })
    }

    /// The path of image `index`.
    pub fn path(&self, index: usize) -> &Path {
        &self.files[index].0
    }
}

/// Converts a decoded image to planar `channels` (1 or 3) in [0, 1].
fn to_planar(img: DynamicImage, channels: usize) -> Image {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let wide = matches!(
        img,
        DynamicImage::ImageLuma16(_)
            | DynamicImage::ImageLumaA16(_)
            | DynamicImage::ImageRgb16(_)
            | DynamicImage::ImageRgba16(_)
            | DynamicImage::ImageRgb32F(_)
            | DynamicImage::ImageRgba32F(_)
    );
    // Decoded photos are large: one table lookup per byte.
    let lut: [f32; 256] = std::array::from_fn(|b| b as f32 / 255.0);
    let byte = |b: u8| lut[b as usize];
    let mut pixels = vec![0.0f32; channels * w * h];
    if channels == 1 && !img.color().has_color() {
        // Gray stays gray exactly.
        if wide {
            planes(img.into_luma16().as_raw(), 1, &mut pixels, |v| {
                v as f32 / 65535.0
            });
        } else {
            planes(img.into_luma8().as_raw(), 1, &mut pixels, byte);
        }
    } else if wide {
        planes(img.into_rgb32f().as_raw(), 3, &mut pixels, |v| v);
    } else {
        // into_rgb8 replicates gray and drops alpha (no compositing, as Pillow's convert).
        planes(img.into_rgb8().as_raw(), 3, &mut pixels, byte);
    }
    Image {
        channels,
        height: h,
        width: w,
        pixels,
    }
}

/// Writes interleaved `src` of `src_channels` (1 or 3) values per pixel to the planes of `dst`
/// (1 or 3 of them): copied plane by plane, or reduced to ITU-R BT.601 luma (Pillow's
/// `convert("L")`) when `dst` has one plane and `src` three.
fn planes<T: Copy>(src: &[T], src_channels: usize, dst: &mut [f32], value: impl Fn(T) -> f32) {
    let n = src.len() / src_channels;
    match (src_channels, dst.len() / n) {
        (3, 3) => {
            let (r, gb) = dst.split_at_mut(n);
            let (g, b) = gb.split_at_mut(n);
            for (i, px) in src.chunks_exact(3).enumerate() {
                r[i] = value(px[0]);
                g[i] = value(px[1]);
                b[i] = value(px[2]);
            }
        }
        (3, _) => {
            for (d, px) in dst.iter_mut().zip(src.chunks_exact(3)) {
                *d = 0.299 * value(px[0]) + 0.587 * value(px[1]) + 0.114 * value(px[2]);
            }
        }
        _ => {
            for (d, v) in dst.iter_mut().zip(src) {
                *d = value(*v);
            }
        }
    }
}

impl Dataset for ImageFolder {
    fn len(&self) -> usize {
        self.files.len()
    }
    fn channels(&self) -> usize {
        self.channels
    }
    fn get(&self, index: usize) -> Result<Image, DataError> {
        let path = &self.files[index].0;
        let unreadable = |why: String| DataError::Unreadable {
            name: path.display().to_string(),
            why,
        };
        let bytes = read_file(path).map_err(|e| unreadable(e.to_string()))?;
        let img = image::load_from_memory(&bytes).map_err(|e| unreadable(e.to_string()))?;
        if img.width() == 0 || img.height() == 0 {
            return Err(unreadable("the image has no pixels".into()));
        }
        Ok(to_planar(img, self.channels))
    }
    fn label(&self, index: usize) -> u32 {
        self.files[index].1
    }
    fn name(&self, index: usize) -> String {
        self.files[index].0.display().to_string()
    }
    fn classes(&self) -> Vec<String> {
        self.classes.clone()
    }
    fn describe(&self) -> String {
        let mut line = format!(
            "image folder {}: {} images, {} class(es), converted to {} channel(s)",
            self.root.display(),
            self.files.len(),
            self.classes.len(),
            self.channels
        );
        if self.loose > 0 {
            line += &format!(
                "; {} image(s) directly in the folder ignored (classes are subfolders)",
                self.loose
            );
        }
        line
    }
}
