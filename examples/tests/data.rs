//! The data pipeline: every bad input gives its message, conversions and augmentations do what
//! they say, and batches depend only on (dataset, seed, batch number). Bad files are generated in
//! temporary folders; tests on the real files of `MAE_DATA_DIR` (default `../shared/data`) skip
//! with a message when it is absent.

use mae::rng::Rng;
use mae_examples::data::{
    self, resample, Augment, DataError, Dataset, Image, Loader, LoaderOptions, Shard,
};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A temporary folder removed at the end of the test.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "mae-data-test-{}-{}-{name}",
            std::process::id(),
            COUNT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    fn path(&self) -> &Path {
        &self.0
    }
    fn spec(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The shared real data, or `None` after printing why the test is skipped.
fn data_dir(test: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("MAE_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/data").into());
    if dir.is_dir() {
        Some(dir)
    } else {
        // Past libtest's capture of `eprintln!`: a skip must be visible.
        let _ = writeln!(
            std::io::stderr(),
            "SKIP {test}: no data folder at {} (set MAE_DATA_DIR)",
            dir.display()
        );
        None
    }
}

fn write_png(path: &Path, w: u32, h: u32, color: image::ExtendedColorType, bytes: &[u8]) {
    image::save_buffer(path, bytes, w, h, color).unwrap();
}

/// A `w x h` RGB PNG of one colour.
fn solid_png(path: &Path, w: u32, h: u32, rgb: [u8; 3]) {
    let bytes: Vec<u8> = (0..w * h).flat_map(|_| rgb).collect();
    write_png(path, w, h, image::ExtendedColorType::Rgb8, &bytes);
}

fn open_err(spec: &str, channels: usize) -> DataError {
    match data::open(spec, channels) {
        Ok(ds) => panic!("{spec} opened: {}", ds.describe()),
        Err(e) => e,
    }
}

fn options(batch_size: usize, img_size: usize, channels: usize, workers: usize) -> LoaderOptions {
    let mut opts = LoaderOptions::new(batch_size, Augment::paper(img_size, channels), 11);
    opts.workers = workers;
    opts.prefetch = 3;
    opts
}

fn batches(ds: Arc<dyn Dataset>, opts: LoaderOptions, start: u64, n: usize) -> Vec<data::Batch> {
    let mut loader = Loader::new(ds, opts, start).unwrap();
    (0..n).map(|_| loader.next().unwrap()).collect()
}

// ---- bad inputs ----

#[test]
fn a_missing_path_is_named() {
    let e = open_err("/nonexistent/mae/images", 3);
    assert!(matches!(e, DataError::Missing { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains("/nonexistent/mae/images"), "{msg}");
    assert!(msg.contains("no such file or folder"), "{msg}");
}

#[test]
fn an_empty_folder_and_a_folder_without_images_are_refused() {
    let dir = TempDir::new("empty");
    let e = open_err(dir.spec(), 3);
    assert!(matches!(e, DataError::Empty { .. }), "{e:?}");
    assert!(e.to_string().contains("empty dataset"), "{e}");
    assert!(e.to_string().contains(dir.spec()), "{e}");
    std::fs::write(dir.path().join("notes.txt"), "not an image").unwrap();
    std::fs::create_dir(dir.path().join("cats")).unwrap();
    std::fs::write(dir.path().join("cats/readme.md"), "still not").unwrap();
    let e = open_err(dir.spec(), 3);
    assert!(matches!(e, DataError::Empty { .. }), "{e:?}");
    assert!(e.to_string().contains(".jpg, .jpeg or .png"), "{e}");
    // A folder of CIFAR-10 files that are not the official training batches: point at them.
    std::fs::write(dir.path().join("train_10k.bin"), [0u8; 3073]).unwrap();
    let e = open_err(dir.spec(), 3);
    assert!(
        e.to_string()
            .contains("it holds train_10k.bin: give the path of the file itself"),
        "{e}"
    );
}

#[test]
fn an_unknown_file_type_is_refused() {
    let dir = TempDir::new("unknown");
    let file = dir.path().join("weights.safetensors");
    std::fs::write(&file, b"x").unwrap();
    let e = open_err(file.to_str().unwrap(), 3);
    assert!(matches!(e, DataError::BadFormat { .. }), "{e:?}");
    assert!(e.to_string().contains("not a dataset"), "{e}");
}

#[test]
fn a_corrupt_jpeg_in_a_folder_is_skipped_counted_and_replaced() {
    let dir = TempDir::new("corrupt");
    solid_png(&dir.path().join("a.png"), 8, 6, [200, 10, 10]);
    // A JPEG header followed by garbage: listed at open, unreadable at decode.
    let mut bad = vec![0xff, 0xd8, 0xff, 0xe0, 0x00, 0x10];
    bad.extend((0..200).map(|i| (i * 37 % 251) as u8));
    std::fs::write(dir.path().join("b_bad.JPG"), &bad).unwrap();
    solid_png(&dir.path().join("c.png"), 5, 9, [10, 200, 10]);
    solid_png(&dir.path().join("d.png"), 7, 7, [10, 10, 200]);
    let ds = data::open(dir.spec(), 3).unwrap();
    assert_eq!(ds.len(), 4, "{}", ds.describe());
    assert!(matches!(ds.get(1), Err(DataError::Unreadable { .. })));
    let got = batches(ds, options(4, 8, 3, 2), 0, 3);
    for b in &got {
        // Each epoch visits the bad file once: it is reported and a readable item stands in.
        assert_eq!(b.skipped.len(), 1, "batch {}: {:?}", b.index, b.skipped);
        assert_eq!(b.skipped[0].0, 1);
        assert!(b.skipped[0].1.contains("b_bad.JPG"), "{}", b.skipped[0].1);
        assert_eq!(b.items.len(), 4);
        assert!(!b.items.contains(&1), "{:?}", b.items);
        assert_eq!(b.images.len(), 4 * 3 * 8 * 8);
        assert!(b.images.iter().all(|v| v.is_finite()));
    }
}

#[test]
fn a_mostly_unreadable_batch_is_an_error() {
    let dir = TempDir::new("mostly-bad");
    solid_png(&dir.path().join("a.png"), 4, 4, [1, 2, 3]);
    for name in ["b.jpg", "c.jpeg", "d.png"] {
        std::fs::write(dir.path().join(name), b"definitely not an image").unwrap();
    }
    let ds = data::open(dir.spec(), 3).unwrap();
    let mut loader = Loader::new(ds, options(4, 4, 3, 1), 0).unwrap();
    let e = loader.next().unwrap_err();
    assert!(matches!(e, DataError::TooManyUnreadable { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains("could not be read"), "{msg}");
    assert!(msg.contains("b.jpg") || msg.contains("c.jpeg"), "{msg}");
}

#[test]
fn a_truncated_cifar_file_is_refused_with_its_length() {
    let dir = TempDir::new("cifar-truncated");
    let file = dir.path().join("data_batch_1.bin");
    std::fs::write(&file, vec![1u8; 3073 * 2 + 100]).unwrap();
    let e = open_err(file.to_str().unwrap(), 3);
    assert!(matches!(e, DataError::Truncated { len: 6246, .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("data_batch_1.bin") && msg.contains("6246 bytes"),
        "{msg}"
    );
    assert!(msg.contains("3073-byte"), "{msg}");
    // The same file found through its folder.
    let e = open_err(dir.spec(), 3);
    assert!(matches!(e, DataError::Truncated { .. }), "{e:?}");
}

#[test]
fn a_cifar_file_with_an_impossible_label_is_refused() {
    let dir = TempDir::new("cifar-label");
    let file = dir.path().join("x.bin");
    let mut bytes = vec![3u8; 3073 * 3];
    bytes[3073 * 2] = 57;
    std::fs::write(&file, bytes).unwrap();
    let e = open_err(file.to_str().unwrap(), 3);
    assert!(matches!(e, DataError::BadFormat { .. }), "{e:?}");
    assert!(e.to_string().contains("record 2 has label 57"), "{e}");
}

/// An IDX file of unsigned bytes.
fn idx(magic_dims: u8, dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, 8, magic_dims];
    for d in dims {
        out.extend_from_slice(&d.to_be_bytes());
    }
    out.extend_from_slice(data);
    out
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

#[test]
fn truncated_and_garbled_idx_files_are_refused() {
    let dir = TempDir::new("idx");
    let file = dir.path().join("train-images-idx3-ubyte");
    std::fs::write(&file, idx(3, &[10, 28, 28], &vec![0; 5 * 784])).unwrap();
    let e = open_err(file.to_str().unwrap(), 1);
    assert!(matches!(e, DataError::Truncated { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("[10, 28, 28]") && msg.contains("3920"),
        "{msg}"
    );

    let file = dir.path().join("garbled-images-idx3-ubyte");
    std::fs::write(&file, idx(4, &[1, 2, 2, 2], &[0; 8])).unwrap();
    let e = open_err(file.to_str().unwrap(), 1);
    assert!(matches!(e, DataError::BadFormat { .. }), "{e:?}");
    assert!(e.to_string().contains("magic number is 0x00000804"), "{e}");

    let file = dir.path().join("short-images-idx3-ubyte");
    std::fs::write(&file, [0, 0, 8, 3, 0, 0]).unwrap();
    let e = open_err(file.to_str().unwrap(), 1);
    assert!(matches!(e, DataError::Truncated { .. }), "{e:?}");
    assert!(e.to_string().contains("16-byte IDX header"), "{e}");

    // A gzip stream cut short.
    let file = dir.path().join("cut-images-idx3-ubyte.gz");
    let gz = gzip(&idx(3, &[4, 8, 8], &[7; 256]));
    std::fs::write(&file, &gz[..gz.len() / 2]).unwrap();
    let e = open_err(file.to_str().unwrap(), 1);
    assert!(matches!(e, DataError::Truncated { .. }), "{e:?}");
    assert!(e.to_string().contains("gzip"), "{e}");
}

#[test]
fn idx_labels_come_from_the_sibling_file_and_must_match() {
    let dir = TempDir::new("idx-labels");
    let images = dir.path().join("t-images-idx3-ubyte.gz");
    let pixels: Vec<u8> = (0..3 * 4 * 5).map(|i| i as u8).collect();
    std::fs::write(&images, gzip(&idx(3, &[3, 4, 5], &pixels))).unwrap();
    let ds = data::open(images.to_str().unwrap(), 1).unwrap();
    assert_eq!(ds.classes(), vec!["unlabelled".to_string()]);
    let labels = dir.path().join("t-labels-idx1-ubyte");
    std::fs::write(&labels, idx(1, &[3], &[7, 0, 9])).unwrap();
    let ds = data::open(images.to_str().unwrap(), 1).unwrap();
    assert_eq!((ds.len(), ds.channels()), (3, 1));
    assert_eq!(
        (0..3).map(|i| ds.label(i)).collect::<Vec<_>>(),
        vec![7, 0, 9]
    );
    let img = ds.get(2).unwrap();
    assert_eq!((img.height, img.width), (4, 5));
    assert_eq!(img.pixels[0], 40.0 / 255.0);
    assert!(
        ds.describe().contains("t-labels-idx1-ubyte"),
        "{}",
        ds.describe()
    );

    std::fs::write(&labels, idx(1, &[2], &[1, 2])).unwrap();
    let e = open_err(images.to_str().unwrap(), 1);
    assert!(matches!(e, DataError::BadFormat { .. }), "{e:?}");
    assert!(e.to_string().contains("2 labels for the 3 images"), "{e}");
}

#[test]
fn channel_counts_that_do_not_fit_the_model_are_refused() {
    let dir = TempDir::new("channels");
    let mnist = dir.path().join("x-images-idx3-ubyte");
    std::fs::write(&mnist, idx(3, &[1, 2, 2], &[0; 4])).unwrap();
    let e = open_err(mnist.to_str().unwrap(), 3);
    assert!(matches!(e, DataError::Channels { model: 3, .. }), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains("MNIST") && msg.contains("1 channel") && msg.contains("in_chans"));

    let cifar = dir.path().join("c.bin");
    std::fs::write(&cifar, vec![0u8; 3073]).unwrap();
    let e = open_err(cifar.to_str().unwrap(), 1);
    assert!(matches!(e, DataError::Channels { model: 1, .. }), "{e:?}");
    assert!(
        e.to_string().contains("CIFAR-10 c.bin has 3 channels"),
        "{e}"
    );

    let folder = TempDir::new("channels-folder");
    solid_png(&folder.path().join("a.png"), 2, 2, [0, 0, 0]);
    let e = open_err(folder.spec(), 2);
    assert!(matches!(e, DataError::Channels { model: 2, .. }), "{e:?}");
    assert!(e.to_string().contains("1 (gray) or 3 (RGB)"), "{e}");
}

#[test]
fn a_dataset_smaller_than_a_batch_and_empty_options_are_refused() {
    let ds = data::open("synthetic:3:8", 3).unwrap();
    let Err(e) = Loader::new(ds.clone(), options(4, 8, 3, 1), 0) else {
        panic!("a batch larger than the dataset was accepted");
    };
    assert!(e.to_string().contains("fewer than one batch of 4"), "{e}");
    let Err(e) = Loader::new(ds.clone(), options(0, 8, 3, 1), 0) else {
        panic!("batch size 0 accepted");
    };
    assert!(e.to_string().contains("batch size is 0"), "{e}");
    let Err(e) = Loader::new(ds, options(2, 8, 1, 1), 0) else {
        panic!("gray statistics for a 3-channel dataset accepted");
    };
    assert!(matches!(e, DataError::Channels { .. }), "{e:?}");
}

#[test]
fn synthetic_specs_parse_or_say_how_to_write_them() {
    let ds = data::open("synthetic:100:24", 1).unwrap();
    assert_eq!((ds.len(), ds.channels()), (100, 1));
    let img = ds.get(99).unwrap();
    assert_eq!((img.channels, img.height, img.width), (1, 24, 24));
    assert_eq!(ds.get(5).unwrap(), ds.get(5).unwrap());
    assert_ne!(ds.get(5).unwrap(), ds.get(6).unwrap());
    assert_eq!(data::open("synthetic", 3).unwrap().len(), 50_000);
    for bad in ["synthetic:abc", "synthetic:0", "synthetic:5:8:9"] {
        let e = open_err(bad, 3);
        assert!(e.to_string().contains("synthetic:N:SIZE"), "{bad}: {e}");
    }
}

// ---- conversions ----

#[test]
fn gray_and_rgba_pngs_are_converted_to_the_model_channels() {
    let dir = TempDir::new("convert");
    write_png(
        &dir.path().join("gray.png"),
        2,
        1,
        image::ExtendedColorType::L8,
        &[100, 7],
    );
    write_png(
        &dir.path().join("rgba.png"),
        1,
        1,
        image::ExtendedColorType::Rgba8,
        &[10, 20, 30, 0],
    );
    solid_png(&dir.path().join("rgb.png"), 1, 1, [10, 200, 30]);
    let rgb = data::open(dir.spec(), 3).unwrap();
    let names: Vec<String> = (0..3).map(|i| rgb.name(i)).collect();
    assert!(names[0].ends_with("gray.png") && names[2].ends_with("rgba.png"));
    let gray = rgb.get(0).unwrap();
    assert_eq!((gray.channels, gray.height, gray.width), (3, 1, 2));
    for c in 0..3 {
        assert_eq!(gray.at(c, 0, 0), 100.0 / 255.0);
        assert_eq!(gray.at(c, 0, 1), 7.0 / 255.0);
    }
    assert_eq!(
        rgb.get(2).unwrap().pixels,
        vec![10.0 / 255.0, 20.0 / 255.0, 30.0 / 255.0]
    );

    let one = data::open(dir.spec(), 1).unwrap();
    assert_eq!(one.get(0).unwrap().pixels, vec![100.0 / 255.0, 7.0 / 255.0]);
    let luma = one.get(1).unwrap().pixels[0];
    let expected = (0.299 * 10.0 + 0.587 * 200.0 + 0.114 * 30.0) / 255.0;
    assert!((luma - expected).abs() < 1e-6, "{luma} vs {expected}");
}

#[test]
fn class_subfolders_are_classes_in_sorted_order() {
    let dir = TempDir::new("classes");
    for (class, n) in [("zebra", 2), ("ant", 1), ("empty", 0)] {
        std::fs::create_dir(dir.path().join(class)).unwrap();
        for i in 0..n {
            solid_png(
                &dir.path().join(format!("{class}/{i}.PNG")),
                2,
                2,
                [0, 0, 0],
            );
        }
    }
    std::fs::create_dir_all(dir.path().join("zebra/deeper")).unwrap();
    solid_png(&dir.path().join("zebra/deeper/x.jpeg.png"), 2, 2, [0, 0, 0]);
    solid_png(&dir.path().join("loose.png"), 2, 2, [0, 0, 0]);
    let ds = data::open(dir.spec(), 3).unwrap();
    assert_eq!(ds.classes(), vec!["ant".to_string(), "zebra".into()]);
    assert_eq!(ds.len(), 4);
    let labels: Vec<u32> = (0..4).map(|i| ds.label(i)).collect();
    assert_eq!(labels, vec![0, 1, 1, 1]);
    assert!(ds
        .describe()
        .contains("1 image(s) directly in the folder ignored"));
}

// ---- augmentation ----

#[test]
fn random_resized_crop_stays_within_scale_and_ratio() {
    let aug = Augment::paper(224, 3);
    let mut rng = Rng::new(3);
    for (h, w) in [(100, 100), (427, 640), (1000, 872), (32, 32)] {
        let (mut min_frac, mut max_frac) = (f64::MAX, 0.0f64);
        for _ in 0..2000 {
            let b = aug.crop_params(h, w, &mut rng);
            assert!(b.height > 0 && b.width > 0);
            assert!(
                b.top + b.height <= h && b.left + b.width <= w,
                "{b:?} in {h}x{w}"
            );
            // The box was rounded from an exact one: allow half a pixel on each side.
            let (bh, bw) = (b.height as f64, b.width as f64);
            let area = (h * w) as f64;
            assert!((bh + 0.5) * (bw + 0.5) >= 0.2 * area, "{b:?} in {h}x{w}");
            assert!((bh - 0.5) * (bw - 0.5) <= area);
            assert!(
                ((bw + 0.5) / (bh - 0.5)).ln() >= (3.0f64 / 4.0).ln(),
                "{b:?}"
            );
            assert!(
                ((bw - 0.5) / (bh + 0.5)).ln() <= (4.0f64 / 3.0).ln(),
                "{b:?}"
            );
            let frac = bh * bw / area;
            min_frac = min_frac.min(frac);
            max_frac = max_frac.max(frac);
        }
        // The whole range is used: small crops near 0.2 and crops near the largest box of the
        // ratio range (the whole image when square, 0.89 of a 3:2 one).
        assert!(min_frac < 0.25 && max_frac > 0.85, "{min_frac} {max_frac}");
    }
    // No box of the ratio range fits a 31 x 500 strip: the centre crop at ratio 3/4.
    let b = aug.crop_params(500, 31, &mut rng);
    assert_eq!(
        (b.top, b.left, b.height, b.width),
        ((500 - 41) / 2, 0, 41, 31)
    );
}

#[test]
fn bicubic_resize_keeps_a_constant_image_constant() {
    let src = vec![0.3f32; 3 * 37 * 53];
    for (oh, ow) in [(16, 20), (90, 70), (37, 53), (5, 100)] {
        let mut out = vec![0.0; 3 * oh * ow];
        resample::resize_region(&src, 3, (37, 53), (2, 3, 30, 41), (oh, ow), &mut out);
        for v in out {
            assert!((v - 0.3).abs() < 1e-6, "{v} at {oh}x{ow}");
        }
    }
}

/// Pillow 13's `Image.resize(..., BICUBIC)` of an 8-bit gray 23 x 17 test pattern, printed by
/// `list(img.getdata())`; the pattern is `(37 x + 91 y + 7 ((x y) mod 13)) mod 256`.
const PILLOW_DOWN_9X7: [u8; 63] = [
    104, 123, 138, 119, 115, 124, 131, 137, 122, 124, 137, 137, 156, 132, 141, 141, 158, 126, 123,
    111, 131, 136, 123, 118, 117, 131, 137, 134, 100, 143, 127, 102, 100, 111, 135, 123, 146, 100,
    131, 127, 113, 130, 162, 118, 89, 162, 122, 97, 157, 122, 116, 155, 94, 121, 143, 127, 123,
    119, 123, 112, 95, 111, 115,
];
/// `img.crop((3, 2, 18, 14)).resize((8, 8), BICUBIC)` of the same pattern.
const PILLOW_CROP_8X8: [u8; 64] = [
    155, 178, 167, 101, 144, 162, 164, 122, 106, 119, 122, 199, 121, 116, 125, 153, 98, 169, 104,
    150, 140, 123, 127, 117, 68, 126, 154, 85, 112, 81, 137, 76, 121, 124, 173, 111, 123, 113, 66,
    129, 57, 102, 155, 119, 70, 92, 192, 148, 140, 144, 107, 128, 165, 127, 123, 159, 68, 76, 157,
    179, 90, 87, 197, 171,
];
/// `img.resize((12, 20), BICUBIC)`: narrower and taller.
const PILLOW_12X20: [u8; 240] = [
    16, 83, 172, 143, 27, 116, 201, 77, 59, 148, 192, 34, 90, 177, 71, 103, 169, 87, 95, 85, 174,
    116, 100, 156, 183, 110, 102, 189, 191, 75, 135, 175, 154, 115, 155, 141, 125, 104, 201, 153,
    133, 119, 160, 165, 130, 177, 174, 81, 67, 164, 178, 75, 134, 178, 106, 109, 142, 197, 116,
    107, 154, 136, 47, 137, 202, 179, 79, 149, 115, 125, 115, 187, 108, 64, 167, 141, 136, 110,
    168, 184, 52, 148, 210, 128, 77, 161, 127, 101, 113, 192, 63, 72, 168, 201, 55, 92, 157, 148,
    60, 133, 138, 68, 79, 143, 89, 72, 101, 192, 155, 100, 119, 216, 125, 66, 171, 109, 60, 85,
    184, 123, 111, 122, 110, 163, 127, 140, 117, 64, 109, 180, 143, 75, 121, 138, 31, 76, 155, 141,
    5, 118, 178, 182, 76, 115, 187, 40, 88, 181, 143, 58, 104, 192, 199, 78, 153, 88, 161, 114,
    173, 156, 82, 132, 185, 107, 95, 152, 96, 60, 131, 219, 79, 90, 134, 212, 83, 113, 211, 122,
    62, 115, 176, 170, 39, 123, 203, 109, 71, 160, 215, 54, 101, 180, 170, 98, 125, 88, 146, 125,
    107, 118, 124, 125, 118, 123, 125, 128, 155, 61, 108, 199, 99, 75, 101, 142, 97, 84, 126, 184,
    85, 130, 143, 162, 78, 112, 143, 47, 96, 139, 197, 81, 132, 194, 61, 53, 165, 147, 48, 112,
    151, 127,
];

#[test]
fn bicubic_matches_pillow_to_within_one_8_bit_level() {
    let (w, h) = (23usize, 17usize);
    let src: Vec<f32> = (0..h * w)
        .map(|i| {
            let (x, y) = (i % w, i / w);
            ((x * 37 + y * 91 + (x * y) % 13 * 7) % 256) as f32 / 255.0
        })
        .collect();
    // (Pillow's output, region (top, left, rows, cols), output (rows, cols))
    let cases = [
        (&PILLOW_DOWN_9X7[..], (0, 0, h, w), (7, 9)),
        (&PILLOW_CROP_8X8, (2, 3, 12, 15), (8, 8)),
        (&PILLOW_12X20, (0, 0, h, w), (20, 12)),
    ];
    for (pillow, region, (oh, ow)) in cases {
        let mut out = vec![0.0; oh * ow];
        resample::resize_region(&src, 1, (h, w), region, (oh, ow), &mut out);
        // Pillow rounds to 8 bits after each pass; this resampler does not.
        let worst = out
            .iter()
            .zip(pillow)
            .map(|(o, p)| (o * 255.0 - *p as f32).abs())
            .fold(0.0f32, f32::max);
        assert!(worst <= 1.0, "{oh}x{ow}: {worst} levels from Pillow");
    }
}

#[test]
fn bicubic_downscale_of_a_checkerboard_is_antialiased() {
    let n = 64;
    let src: Vec<f32> = (0..n * n).map(|i| ((i / n + i % n) % 2) as f32).collect();
    let mut out = vec![0.0; 24 * 24];
    resample::resize_region(&src, 1, (n, n), (0, 0, n, n), (24, 24), &mut out);
    // The kernel is widened to the 2.67-pixel spacing, so each output averages whole cells of
    // the pattern; a plain (not widened) bicubic would alias into values spread over [0, 1].
    for v in &out {
        assert!((v - 0.5).abs() < 0.05, "{v}");
    }
    // A smooth ramp survives the same downscale.
    let ramp: Vec<f32> = (0..n * n)
        .map(|i| (i % n) as f32 / (n - 1) as f32)
        .collect();
    resample::resize_region(&ramp, 1, (n, n), (0, 0, n, n), (24, 24), &mut out);
    for row in out.chunks(24) {
        assert!(row.windows(2).all(|p| p[1] > p[0]), "{row:?}");
    }
}

#[test]
fn flip_really_flips() {
    let mut aug = Augment::eval(8, 1);
    aug.hflip = true;
    let img = Image {
        channels: 1,
        height: 8,
        width: 8,
        pixels: (0..64).map(|i| (i % 8) as f32 / 7.0).collect(),
    };
    let mut plain = vec![0.0; 64];
    Augment::eval(8, 1).apply(&img, &mut Rng::new(0), &mut plain);
    let mirrored: Vec<f32> = plain
        .chunks(8)
        .flat_map(|row| row.iter().rev().copied().collect::<Vec<_>>())
        .collect();
    assert_ne!(plain, mirrored);
    let (mut flipped, mut kept) = (0, 0);
    for seed in 0..64 {
        let mut out = vec![0.0; 64];
        aug.apply(&img, &mut Rng::new(seed), &mut out);
        if out == mirrored {
            flipped += 1;
        } else {
            assert_eq!(out, plain);
            kept += 1;
        }
    }
    assert!(flipped > 16 && kept > 16, "{flipped} flipped, {kept} kept");
}

#[test]
fn eval_resizes_the_shorter_side_and_crops_the_centre_then_normalizes() {
    // 4 x 8: the shorter side is already 4, so the centre 4 x 4 is taken as is.
    let img = Image {
        channels: 3,
        height: 4,
        width: 8,
        pixels: (0..3 * 32).map(|i| (i % 8) as f32 / 8.0).collect(),
    };
    let aug = Augment::eval(4, 3);
    let mut out = vec![0.0; 3 * 16];
    aug.apply(&img, &mut Rng::new(1), &mut out);
    for c in 0..3 {
        for y in 0..4 {
            for x in 0..4 {
                let want = ((x + 2) as f32 / 8.0 - data::IMAGENET_MEAN[c]) / data::IMAGENET_STD[c];
                let got = out[(c * 4 + y) * 4 + x];
                assert!((got - want).abs() < 1e-5, "{got} vs {want}");
            }
        }
    }
    let (mean, std) = data::norm_stats(1);
    assert!((mean[0] - 0.449).abs() < 1e-6 && (std[0] - 0.226).abs() < 1e-6);
}

// ---- the loader ----

#[test]
fn batches_do_not_depend_on_the_worker_count() {
    let ds = data::open("synthetic:40:16", 3).unwrap();
    // 10 batches per epoch: 15 batches cross into the second epoch.
    let one = batches(ds.clone(), options(4, 12, 3, 1), 0, 15);
    let four = batches(ds, options(4, 12, 3, 4), 0, 15);
    assert_eq!(one, four);
    assert_eq!(one[14].epoch, 1);
    assert_eq!(
        one.iter().map(|b| b.index).collect::<Vec<_>>(),
        (0..15).collect::<Vec<_>>()
    );
}

#[test]
fn resuming_at_batch_k_gives_the_batches_of_an_uninterrupted_run() {
    let ds = data::open("synthetic:24:16", 3).unwrap();
    let fresh = batches(ds.clone(), options(5, 8, 3, 3), 0, 9);
    let resumed = batches(ds, options(5, 8, 3, 2), 5, 4);
    assert_eq!(resumed[..], fresh[5..]);
    assert_eq!(resumed[0].index, 5);
}

#[test]
fn each_epoch_is_a_fresh_permutation_and_the_seed_matters() {
    let ds = data::open("synthetic:12:8", 3).unwrap();
    let got = batches(ds.clone(), options(4, 8, 3, 2), 0, 6);
    let epoch = |e: usize| -> Vec<usize> {
        got[e * 3..e * 3 + 3]
            .iter()
            .flat_map(|b| b.items.clone())
            .collect()
    };
    for e in 0..2 {
        let mut items = epoch(e);
        items.sort();
        assert_eq!(items, (0..12).collect::<Vec<_>>());
    }
    assert_ne!(epoch(0), epoch(1));
    let mut other = options(4, 8, 3, 2);
    other.seed = 12;
    assert_ne!(batches(ds.clone(), other, 0, 1)[0], got[0]);
    let mut ordered = options(4, 8, 3, 2);
    ordered.shuffle = false;
    assert_eq!(batches(ds, ordered, 0, 1)[0].items, vec![0, 1, 2, 3]);
}

/// The loaders of shards `0..count`, batches `start..start + n` of each.
fn shards(
    ds: &Arc<dyn Dataset>,
    opts: &LoaderOptions,
    count: usize,
    start: u64,
    n: usize,
) -> Vec<Vec<data::Batch>> {
    (0..count)
        .map(|index| {
            let mut o = opts.clone();
            o.shard = Shard { index, count };
            batches(ds.clone(), o, start, n)
        })
        .collect()
}

#[test]
fn shards_of_a_batch_put_together_are_the_whole_batch() {
    let ds = data::open("synthetic:50:16", 3).unwrap();
    // Batches of 12 in 3 shards of 4: 4 batches per epoch, 6 batches cross into epoch 1.
    let whole = batches(ds.clone(), options(12, 8, 3, 2), 0, 6);
    for workers in [1, 3] {
        let parts = shards(&ds, &options(12, 8, 3, workers), 3, 0, 6);
        for (k, batch) in whole.iter().enumerate() {
            let pieces: Vec<&data::Batch> = parts.iter().map(|p| &p[k]).collect();
            assert!(pieces
                .iter()
                .all(|p| p.index == batch.index && p.epoch == batch.epoch));
            assert!(pieces
                .iter()
                .all(|p| p.items.len() == 4 && p.labels.len() == 4));
            let items: Vec<usize> = pieces.iter().flat_map(|p| p.items.clone()).collect();
            let images: Vec<f32> = pieces.iter().flat_map(|p| p.images.clone()).collect();
            assert_eq!(items, batch.items, "batch {k}");
            assert!(
                images == batch.images,
                "batch {k}: the augmentations differ"
            );
        }
    }
    // A shard resumed at batch 5 continues as it would have.
    let mut o = options(12, 8, 3, 2);
    o.shard = Shard { index: 2, count: 3 };
    assert_eq!(
        batches(ds.clone(), o, 5, 1)[0],
        shards(&ds, &options(12, 8, 3, 2), 3, 0, 6)[2][5]
    );
}

#[test]
fn across_shards_every_sample_is_seen_once_per_epoch() {
    let ds = data::open("synthetic:64:8", 3).unwrap();
    // 8 shards (ranks) of 2: batches of 16, 4 per epoch, two epochs.
    let parts = shards(&ds, &options(16, 8, 3, 2), 8, 0, 8);
    for epoch in 0..2 {
        let mut seen: Vec<usize> = parts
            .iter()
            .flat_map(|p| {
                p[epoch * 4..epoch * 4 + 4]
                    .iter()
                    .flat_map(|b| b.items.clone())
            })
            .collect();
        seen.sort();
        assert_eq!(seen, (0..64).collect::<Vec<_>>(), "epoch {epoch}");
    }
    // Each rank's own data differs from every other's.
    assert_ne!(parts[0][0].items, parts[1][0].items);
}

#[test]
fn shards_that_do_not_divide_the_batch_are_refused() {
    let ds = data::open("synthetic:64:8", 3).unwrap();
    for (index, count) in [(0, 3), (2, 2), (0, 0)] {
        let mut o = options(16, 8, 3, 2);
        o.shard = Shard { index, count };
        match Loader::new(ds.clone(), o, 0) {
            Err(DataError::Options { why }) => assert!(why.contains("shard"), "{why}"),
            Err(e) => panic!("shard {index} of {count}: {e}"),
            Ok(_) => panic!("shard {index} of {count} accepted"),
        }
    }
}

#[test]
fn dropping_a_loader_stops_its_workers_promptly() {
    let ds = data::open("synthetic:1000:64", 3).unwrap();
    let mut opts = options(16, 64, 3, 4);
    opts.prefetch = 2;
    let mut loader = Loader::new(ds, opts, 0).unwrap();
    loader.next().unwrap();
    let start = Instant::now();
    drop(loader);
    assert!(start.elapsed() < Duration::from_secs(5));
}

/// A dataset whose image 3 panics when decoded.
struct Panicky;

impl Dataset for Panicky {
    fn len(&self) -> usize {
        8
    }
    fn channels(&self) -> usize {
        1
    }
    fn get(&self, index: usize) -> Result<Image, DataError> {
        assert_ne!(index, 3, "image 3 is cursed");
        Ok(Image {
            channels: 1,
            height: 2,
            width: 2,
            pixels: vec![0.5; 4],
        })
    }
    fn label(&self, _: usize) -> u32 {
        0
    }
    fn name(&self, index: usize) -> String {
        format!("panicky:{index}")
    }
    fn classes(&self) -> Vec<String> {
        vec!["x".into()]
    }
    fn describe(&self) -> String {
        "panicky".into()
    }
}

#[test]
fn a_worker_panic_is_an_error_of_its_batch() {
    let mut opts = options(4, 2, 1, 2);
    opts.shuffle = false;
    let mut loader = Loader::new(Arc::new(Panicky), opts, 0).unwrap();
    let e = loader.next().unwrap_err();
    assert!(matches!(e, DataError::Worker { .. }), "{e:?}");
    assert!(e.to_string().contains("image 3 is cursed"), "{e}");
    // The next batch (items 4..8) is fine.
    assert_eq!(loader.next().unwrap().items, vec![4, 5, 6, 7]);
}

// ---- the real files ----

#[test]
fn cifar10_files_load_with_their_labels() {
    let Some(dir) = data_dir("cifar10_files_load_with_their_labels") else {
        return;
    };
    let file = dir.join("cifar10/test_first20_exact.bin");
    let ds = data::open(file.to_str().unwrap(), 3).unwrap();
    assert_eq!(ds.len(), 20);
    let labels: Vec<u32> = (0..20).map(|i| ds.label(i)).collect();
    assert_eq!(
        labels,
        vec![3, 8, 8, 0, 6, 6, 1, 6, 3, 1, 0, 9, 5, 7, 9, 8, 5, 7, 8, 6]
    );
    assert_eq!(ds.classes()[3], "cat");
    assert_eq!(
        ds.describe(),
        "CIFAR-10 test_first20_exact.bin: 20 images, 10 classes"
    );
    assert_eq!(ds.name(7), "cifar10:7");
    let img = ds.get(0).unwrap();
    assert_eq!((img.channels, img.height, img.width), (3, 32, 32));
}

#[test]
fn mnist_test_set_loads_with_labels() {
    let Some(dir) = data_dir("mnist_test_set_loads_with_labels") else {
        return;
    };
    let file = dir.join("mnist/t10k-images-idx3-ubyte.gz");
    let ds = data::open(file.to_str().unwrap(), 1).unwrap();
    assert_eq!((ds.len(), ds.classes().len()), (10_000, 10));
    // The first test digits of MNIST are 7, 2, 1, 0, 4.
    let labels: Vec<u32> = (0..5).map(|i| ds.label(i)).collect();
    assert_eq!(labels, vec![7, 2, 1, 0, 4]);
    let img = ds.get(0).unwrap();
    assert_eq!((img.channels, img.height, img.width), (1, 28, 28));
    assert!(img.pixels.contains(&1.0) && img.pixels[0] == 0.0);
}

#[test]
fn jpeg_photos_decode_and_batch() {
    let Some(dir) = data_dir("jpeg_photos_decode_and_batch") else {
        return;
    };
    let jpeg = dir.join("photos/jpeg");
    let ds = data::open(jpeg.to_str().unwrap(), 3).unwrap();
    assert_eq!(ds.len(), 4, "{}", ds.describe());
    let sizes: Vec<(usize, usize)> = (0..4)
        .map(|i| {
            let img = ds.get(i).unwrap();
            (img.height, img.width)
        })
        .collect();
    assert!(
        sizes.contains(&(872, 1000)) && sizes.contains(&(427, 640)),
        "{sizes:?}"
    );
    let b = batches(ds, options(4, 64, 3, 2), 0, 1).remove(0);
    assert!(b.skipped.is_empty());
    // Normalized natural images: roughly zero mean, unit spread.
    let mean = b.images.iter().sum::<f32>() / b.images.len() as f32;
    assert!(mean.abs() < 1.5, "{mean}");
}

#[test]
fn load_items_gives_fixed_eval_images_and_refuses_bad_indices() {
    let ds = data::open("synthetic:10:16", 3).unwrap();
    let aug = Augment::eval(16, 3);
    let a = data::load_items(ds.as_ref(), &[3, 7], &aug, 0).unwrap();
    let b = data::load_items(ds.as_ref(), &[7], &aug, 99).unwrap();
    assert_eq!(a.len(), 2 * 3 * 16 * 16);
    // Eval: no randomness, and the 16 x 16 image is only normalized.
    assert_eq!(a[3 * 256..], b[..]);
    let mut want = ds.get(3).unwrap().pixels;
    data::synthetic::normalize(&mut want, 3);
    for (x, y) in a[..3 * 256].iter().zip(&want) {
        assert!((x - y).abs() < 1e-5, "{x} vs {y}");
    }
    let e = data::load_items(ds.as_ref(), &[10], &aug, 0).unwrap_err();
    assert!(e.to_string().contains("image 10 asked of synthetic"), "{e}");
}
