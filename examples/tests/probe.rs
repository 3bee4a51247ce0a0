//! Features and the paper's linear probe: the probe learns separable data, LARS, batch norm and
//! the schedule follow the official code's formulas, feature files round-trip and refuse damage
//! with typed errors, and `embed` then `linprobe` run end to end.

use mae::rng::Rng;
use mae_examples::data::{self, load_items, Augment};
use mae_examples::features::{FeatureSet, FeatureSource, FeaturesError};
use mae_examples::probe::{self, BatchNorm, Optimizer, ProbeOptions, Samples};
use std::path::{Path, PathBuf};
mod common;
use common::text;
use std::process::Command;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mae-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `n` samples of `classes` Gaussian clusters in `dim` dimensions: centres N(0, 1) per
/// coordinate (about 8 apart in 32 dimensions), noise of std 0.5, so the classes are linearly
/// separable with a wide margin.
fn clusters(n: usize, classes: usize, dim: usize, seed: u64) -> (Vec<f32>, Vec<u32>) {
    let mut centres = Rng::new(99);
    let centres: Vec<f64> = (0..classes * dim).map(|_| centres.normal()).collect();
    let mut rng = Rng::new(seed);
    let mut x = Vec::with_capacity(n * dim);
    let mut y = Vec::with_capacity(n);
    for i in 0..n {
        let c = i % classes;
        y.push(c as u32);
        for j in 0..dim {
            // An offset of 3 on every coordinate: the batch norm has something to remove.
            x.push((3.0 + centres[c * dim + j] + 0.5 * rng.normal()) as f32);
        }
    }
    (x, y)
}

fn separable_case(opts: &ProbeOptions) -> (f64, f64) {
    let (classes, dim) = (10, 32);
    let (xt, yt) = clusters(4000, classes, dim, 1);
    let (xv, yv) = clusters(1000, classes, dim, 2);
    let train = Samples::new(&xt, &yt, dim).unwrap();
    let test = Samples::new(&xv, &yv, dim).unwrap();
    let trained = probe::train(train, classes, opts, |_| {}).unwrap();
    let first = trained.history[0].loss;
    let last = trained.history.last().unwrap().loss;
    assert!(last < first, "the loss fell: {first} -> {last}");
    let acc = trained.probe.evaluate(test).unwrap();
    let top5 = acc.top5.expect("10 classes have a top-5");
    assert!(top5 >= acc.top1);
    (acc.top1, top5)
}

#[test]
fn the_probe_learns_separable_features_with_sgd_and_lars() {
    // SGD at the paper's base lr.
    let sgd = ProbeOptions {
        epochs: 10,
        warmup_epochs: 1.0,
        batch_size: 256,
        optimizer: Optimizer::Sgd,
        ..ProbeOptions::default()
    };
    let (top1, _) = separable_case(&sgd);
    assert!(top1 >= 0.99, "SGD probe test top-1 {top1}");
    // LARS moves the weights by about lr x 0.001 of their norm per step, so on 4000 samples it
    // needs a larger base lr than ImageNet's 0.1 to get far from the random start.
    let lars = ProbeOptions {
        epochs: 10,
        warmup_epochs: 1.0,
        batch_size: 256,
        blr: 10.0,
        ..ProbeOptions::default()
    };
    let (top1, _) = separable_case(&lars);
    assert!(top1 >= 0.99, "LARS probe test top-1 {top1}");
}

#[test]
fn training_is_repeatable_and_independent_of_threads() {
    // Batches of 600 x 64 x 8 multiply-adds: enough work for the products to be split.
    let (x, y) = clusters(1200, 8, 64, 3);
    let data = Samples::new(&x, &y, 64).unwrap();
    let opts = |threads| ProbeOptions {
        epochs: 3,
        warmup_epochs: 1.0,
        batch_size: 600,
        threads,
        ..ProbeOptions::default()
    };
    let one = probe::train(data, 8, &opts(1), |_| {}).unwrap();
    let three = probe::train(data, 8, &opts(3), |_| {}).unwrap();
    assert_eq!(one.probe, three.probe);
    let other_seed = probe::train(data, 8, &ProbeOptions { seed: 1, ..opts(1) }, |_| {}).unwrap();
    assert_ne!(one.probe.weight, other_seed.probe.weight);
}

/// `|v|` in f64.
fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

#[test]
fn lars_trust_ratio_and_momentum_match_a_hand_computation() {
    let lars = Optimizer::LARS;
    let (lr, m, wd) = (0.5, 0.9, 0.1);
    let mut p = vec![1.0f32, 2.0, 3.0, 4.0];
    let mut mu = vec![0.0f32; 4];
    let g1 = [0.5f32, -0.5, 1.0, 0.0];
    let g2 = [0.0f32, 1.0, -2.0, 0.5];

    // Step 1 by hand: u = g + wd p; q = 0.001 |p| / |u|; mu = q u; p -= lr mu.
    let p0 = [1.0f64, 2.0, 3.0, 4.0];
    let u1: Vec<f64> = (0..4).map(|i| g1[i] as f64 + wd * p0[i]).collect();
    let q1 = 0.001 * norm(&p0) / norm(&u1);
    let mu1: Vec<f64> = u1.iter().map(|u| q1 * u).collect();
    let p1: Vec<f64> = (0..4).map(|i| p0[i] - lr * mu1[i]).collect();
    lars.step(&mut p, &g1, &mut mu, lr, m, wd, true);
    for i in 0..4 {
        assert!((p[i] as f64 - p1[i]).abs() < 1e-6, "{p:?} vs {p1:?}");
        assert!((mu[i] as f64 - mu1[i]).abs() < 1e-8, "{mu:?} vs {mu1:?}");
    }
    // Step 2: the trust ratio is taken on the new weights, momentum carries the first update.
    let u2: Vec<f64> = (0..4).map(|i| g2[i] as f64 + wd * p1[i]).collect();
    let q2 = 0.001 * norm(&p1) / norm(&u2);
    let mu2: Vec<f64> = (0..4).map(|i| m * mu1[i] + q2 * u2[i]).collect();
    let p2: Vec<f64> = (0..4).map(|i| p1[i] - lr * mu2[i]).collect();
    lars.step(&mut p, &g2, &mut mu, lr, m, wd, true);
    for i in 0..4 {
        assert!((p[i] as f64 - p2[i]).abs() < 1e-6, "{p:?} vs {p2:?}");
        assert!((mu[i] as f64 - mu2[i]).abs() < 1e-8, "{mu:?} vs {mu2:?}");
    }

    // A 1-D tensor (bias): plain momentum SGD, no weight decay, no trust ratio.
    let (mut b, mut mb) = (vec![1.0f32, -1.0], vec![0.0f32; 2]);
    lars.step(&mut b, &[0.2, 0.4], &mut mb, lr, m, wd, false);
    lars.step(&mut b, &[0.2, 0.4], &mut mb, lr, m, wd, false);
    // mu: 0.2, then 0.9 * 0.2 + 0.2 = 0.38; p: 1 - 0.5 (0.2 + 0.38).
    assert!((b[0] - (1.0 - 0.5 * 0.58)).abs() < 1e-6, "{b:?}");
    assert!((b[1] - (-1.0 - 0.5 * 1.16)).abs() < 1e-6, "{b:?}");

    // Zero weights: the ratio is 1, as `torch.where(param_norm > 0, ..., one)`.
    let (mut z, mut mz) = (vec![0.0f32; 4], vec![0.0f32; 4]);
    lars.step(&mut z, &g1, &mut mz, lr, m, 0.0, true);
    assert_eq!(z, vec![-0.25, 0.25, -0.5, 0.0]);

    // SGD: the same momentum rule with no trust ratio, decay on every tensor.
    let (mut s, mut ms) = (vec![1.0f32, 2.0, 3.0, 4.0], vec![0.0f32; 4]);
    Optimizer::Sgd.step(&mut s, &g1, &mut ms, lr, m, wd, true);
    for i in 0..4 {
        let want = p0[i] - lr * (g1[i] as f64 + wd * p0[i]);
        assert!((s[i] as f64 - want).abs() < 1e-6, "{s:?}");
    }
}

#[test]
fn batch_norm_running_statistics_follow_the_formula() {
    let mut bn = BatchNorm::new(2);
    let x = [1.0f32, 10.0, 2.0, 20.0, 6.0, 30.0];
    let mut out = [0.0f32; 6];
    bn.train_batch(&x, &mut out);
    // Column 0: mean 3, biased var ((4 + 1 + 9) / 3), unbiased var 7; column 1: mean 20, 200/3.
    let (mean, var) = ([3.0f64, 20.0], [14.0f64 / 3.0, 200.0 / 3.0]);
    for j in 0..2 {
        let rm = 0.9 * 0.0 + 0.1 * mean[j];
        let rv = 0.9 * 1.0 + 0.1 * var[j] * 3.0 / 2.0;
        assert!((bn.running_mean[j] as f64 - rm).abs() < 1e-6, "{bn:?}");
        assert!((bn.running_var[j] as f64 - rv).abs() < 1e-5, "{bn:?}");
        for i in 0..3 {
            let want = (x[i * 2 + j] as f64 - mean[j]) / (var[j] + 1e-6).sqrt();
            assert!((out[i * 2 + j] as f64 - want).abs() < 1e-5, "{out:?}");
        }
    }
    assert_eq!(bn.batches_tracked, 1);
    // Evaluation uses the running statistics.
    let mut row = [0.0f32; 2];
    bn.eval_row(&[3.0, 20.0], &mut row);
    let want0 = (3.0 - 0.3) / (0.9f64 + 0.7 + 1e-6).sqrt();
    assert!((row[0] as f64 - want0).abs() < 1e-5, "{row:?}");
}

#[test]
fn the_schedule_warms_up_per_step_then_follows_the_cosine() {
    let opts = ProbeOptions::default();
    let batch = 16384;
    let peak = 0.1 * 16384.0 / 256.0;
    assert!((opts.schedule(batch).lr - 6.4).abs() < 1e-12);
    let at = |epoch, step| opts.lr_at(batch, epoch, step, 4);
    assert_eq!(at(0, 0), 0.0);
    // Fractional epoch 2.25 of a 10-epoch warmup.
    assert!((at(2, 1) - peak * 0.225).abs() < 1e-12);
    assert!((at(10, 0) - peak).abs() < 1e-12);
    // Half-way through the 80 cosine epochs, half the peak; a quarter of the way, 0.854 of it.
    assert!((at(50, 0) - peak / 2.0).abs() < 1e-12);
    let quarter = peak * 0.5 * (1.0 + (std::f64::consts::PI / 4.0).cos());
    assert!((at(30, 0) - quarter).abs() < 1e-12);
    assert!(at(89, 3) > 0.0 && at(89, 3) < peak * 1e-3);
}

#[test]
fn bad_options_and_labels_are_refused() {
    let (x, y) = clusters(8, 2, 4, 0);
    let data = Samples::new(&x, &y, 4).unwrap();
    let one = ProbeOptions {
        batch_size: 1,
        ..ProbeOptions::default()
    };
    assert!(matches!(
        probe::train(data, 2, &one, |_| {}),
        Err(probe::ProbeError::BadOption {
            name: "batch_size",
            ..
        })
    ));
    assert!(matches!(
        probe::train(data, 1, &ProbeOptions::default(), |_| {}),
        Err(probe::ProbeError::LabelOutOfRange { index: 1, .. })
    ));
    let zero = ProbeOptions {
        epochs: 0,
        ..ProbeOptions::default()
    };
    assert!(probe::train(data, 2, &zero, |_| {}).is_err());
    assert!(Samples::new(&x, &y, 3).is_err());
    assert!(Optimizer::parse("adam").is_err());
}

fn small_set() -> FeatureSet {
    FeatureSet::new(
        vec![0.5, -1.0, 2.0, 0.25, 1e-3, -7.5],
        2,
        vec![1, 0, 2],
        vec!["a".into(), "b".into(), "c \"quoted\"".into()],
        vec!["x".into(), "y".into(), "z".into()],
        FeatureSource {
            encoder: "runs/x/checkpoint.safetensors".into(),
            pool: "cls".into(),
            dataset: "three images".into(),
            model: "{\"img_size\": 32}".into(),
        },
    )
    .unwrap()
}

#[test]
fn feature_files_round_trip_and_are_standard_safetensors() {
    let dir = temp_dir("features-roundtrip");
    let set = small_set();
    let path = dir.join("f.safetensors");
    set.save(&path).unwrap();
    let back = FeatureSet::load(&path).unwrap();
    assert_eq!(back, set);
    // The safetensors crate (through mae's reader) accepts the file and reads the same values.
    let bytes = std::fs::read(&path).unwrap();
    let file = mae::weights::WeightsFile::parse(&bytes).unwrap();
    let (shape, values) = file.tensor("features").unwrap();
    assert_eq!((shape, values), (vec![3, 2], set.features.clone()));
    assert_eq!(file.metadata("pool"), Some("cls"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Rewrites the header of a feature file with `edit`, keeping the data.
fn edit_header(bytes: &[u8], edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(&mut header);
    let text = header.to_string().into_bytes();
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend(text);
    out.extend(&bytes[8 + n..]);
    out
}

#[test]
fn damaged_feature_files_give_typed_errors() {
    let bytes = small_set().to_bytes().unwrap();
    let parse = FeatureSet::from_bytes;
    assert!(matches!(parse(b"garbage"), Err(FeaturesError::Corrupt(_))));
    assert!(matches!(
        parse(&bytes[..bytes.len() / 2]),
        Err(FeaturesError::Corrupt(_))
    ));
    assert!(matches!(
        parse(&bytes[..bytes.len() - 1]),
        Err(FeaturesError::Corrupt(_))
    ));
    let mut huge = bytes.clone();
    huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(parse(&huge), Err(FeaturesError::Corrupt(_))));
    let mut not_json = bytes.clone();
    not_json[8] = b'!';
    assert!(matches!(parse(&not_json), Err(FeaturesError::Corrupt(_))));

    let no_labels = edit_header(&bytes, |h| {
        h.as_object_mut().unwrap().remove("labels");
    });
    assert!(matches!(
        parse(&no_labels),
        Err(FeaturesError::MissingTensor("labels"))
    ));
    let f16 = edit_header(&bytes, |h| h["features"]["dtype"] = "F16".into());
    assert!(matches!(
        parse(&f16),
        Err(FeaturesError::WrongTensor { .. })
    ));
    // Four rows declared over the bytes of three.
    let long = edit_header(&bytes, |h| {
        h["features"]["shape"] = serde_json::json!([4, 2])
    });
    assert!(matches!(
        parse(&long),
        Err(FeaturesError::LengthMismatch { .. })
    ));
    let names = edit_header(&bytes, |h| h["__metadata__"]["names"] = "[\"a\"]".into());
    assert!(matches!(
        parse(&names),
        Err(FeaturesError::LengthMismatch {
            expected: 3,
            got: 1,
            ..
        })
    ));
    let classes = edit_header(&bytes, |h| h["__metadata__"]["classes"] = "[\"x\"]".into());
    assert!(matches!(
        parse(&classes),
        Err(FeaturesError::LabelOutOfRange {
            index: 0,
            label: 1,
            classes: 1
        })
    ));
    let format = edit_header(&bytes, |h| h["__metadata__"]["format"] = "other".into());
    assert!(matches!(parse(&format), Err(FeaturesError::Metadata(_))));

    // Building a set checks the same invariants; a missing file names itself.
    let s = small_set();
    let short = FeatureSet::new(
        s.features[..5].to_vec(),
        2,
        s.labels,
        s.names,
        s.classes,
        s.source,
    );
    assert!(matches!(short, Err(FeaturesError::LengthMismatch { .. })));
    let e = FeatureSet::load(Path::new("/nonexistent/f.safetensors")).unwrap_err();
    assert!(matches!(e, FeaturesError::Io { .. }) && e.to_string().contains("nonexistent"));
}

fn run_ok(exe: &str, args: &[&str]) -> String {
    let o = Command::new(exe).args(args).output().unwrap();
    assert!(o.status.success(), "{exe} {args:?}\n{}", text(&o));
    text(&o)
}

fn run_fails(exe: &str, args: &[&str], needle: &str) {
    let o = Command::new(exe).args(args).output().unwrap();
    let t = text(&o);
    assert!(!o.status.success(), "expected a failure:\n{t}");
    assert!(t.contains(needle), "expected {needle:?} in:\n{t}");
}

const EMBED: &str = env!("CARGO_BIN_EXE_embed");
const LINPROBE: &str = env!("CARGO_BIN_EXE_linprobe");

/// `embed` then `linprobe` on `synthetic:64:32`; returns the feature set and the result JSON.
fn embed_and_probe(dir: &Path, name: &str, encoder: &[&str]) -> (FeatureSet, serde_json::Value) {
    let features = dir.join(format!("{name}.safetensors"));
    let f = features.to_str().unwrap();
    let mut args = vec![
        "--data",
        "synthetic:64:32",
        "--out",
        f,
        "--batch-size",
        "24",
    ];
    args.extend(encoder);
    let log = run_ok(EMBED, &args);
    assert!(log.contains("img/s"), "{log}");
    let result = dir.join(format!("{name}.json"));
    let r = result.to_str().unwrap();
    let log = run_ok(
        LINPROBE,
        &[
            "--train",
            f,
            "--test",
            f,
            "--epochs",
            "5",
            "--warmup-epochs",
            "1",
            "--batch-size",
            "16",
            "--optimizer",
            "sgd",
            "--out",
            r,
        ],
    );
    assert!(log.contains("epoch   5/5 loss"), "{log}");
    assert!(log.contains("test top-1"), "{log}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&result).unwrap()).unwrap();
    (FeatureSet::load(&features).unwrap(), json)
}

#[test]
fn embed_then_linprobe_on_a_random_init_encoder() {
    let dir = temp_dir("embed-random");
    let (set, json) = embed_and_probe(&dir, "random", &["--random-init", "--model", "demo"]);
    assert_eq!((set.len(), set.dim), (64, 96));
    assert_eq!(set.source.encoder, "random-init (seed 0)");
    assert_eq!(set.source.pool, "cls");
    assert_eq!(set.classes.len(), data::synthetic::CLASSES.len());
    assert_eq!(json["settings"]["batch_size"], 16);
    assert_eq!(json["epochs"].as_array().unwrap().len(), 5);
    assert_eq!(json["train_features"]["dim"], 96);
    let top1 = json["test"]["top1"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&top1));

    // The same encoder saved as a checkpoint embeds to the same features, batch by batch
    // (64 images in batches of 24 end on a short, padded batch).
    let cfg = mae_examples::models::demo();
    let params = mae::init::init_params(&cfg, 0);
    let ckpt = dir.join("ckpt.safetensors");
    std::fs::write(&ckpt, mae::weights::save_mae(&cfg, &params, &[]).unwrap()).unwrap();
    let from_ckpt = dir.join("ckpt-features.safetensors");
    run_ok(
        EMBED,
        &[
            "--data",
            "synthetic:64:32",
            "--checkpoint",
            ckpt.to_str().unwrap(),
            "--out",
            from_ckpt.to_str().unwrap(),
            "--batch-size",
            "64",
        ],
    );
    let other = FeatureSet::load(&from_ckpt).unwrap();
    assert_eq!(other.features, set.features);
    assert_eq!(other.labels, set.labels);

    // Mean pooling gives other features; --limit takes the first images.
    let mean = dir.join("mean.safetensors");
    run_ok(
        EMBED,
        &[
            "--data",
            "synthetic:64:32",
            "--random-init",
            "--pool",
            "mean",
            "--limit",
            "10",
            "--out",
            mean.to_str().unwrap(),
        ],
    );
    let mean = FeatureSet::load(&mean).unwrap();
    assert_eq!((mean.len(), mean.source.pool.as_str()), (10, "mean"));
    assert_ne!(mean.row(0), set.row(0));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn embed_then_linprobe_on_pixels_and_mismatches_refused() {
    let dir = temp_dir("embed-pixels");
    let (set, json) = embed_and_probe(&dir, "pixels", &["--pixels"]);
    assert_eq!((set.len(), set.dim), (64, 3 * 32 * 32));
    assert_eq!(set.source.encoder, "pixels");
    // The features are the eval transform's normalized pixels.
    let ds = data::open("synthetic:64:32", 3).unwrap();
    let want = load_items(ds.as_ref(), &[5], &Augment::eval(32, 3), 0).unwrap();
    assert_eq!(set.row(5), want.as_slice());
    assert_eq!(json["train_features"]["encoder"], "pixels");
    assert!(json["train"]["top1"].as_f64().unwrap() > 0.5);

    // Sets of different dimensions or classes cannot be probed together.
    let small = dir.join("small.safetensors");
    run_ok(
        EMBED,
        &[
            "--data",
            "synthetic:64:32",
            "--random-init",
            "--out",
            small.to_str().unwrap(),
        ],
    );
    let pixels = dir.join("pixels.safetensors");
    let (p, s) = (pixels.to_str().unwrap(), small.to_str().unwrap());
    run_fails(
        LINPROBE,
        &["--train", p, "--test", s],
        "different dimensions",
    );
    let mut renamed = FeatureSet::load(&small).unwrap();
    renamed.classes[0] = "blob".into();
    let renamed_path = dir.join("renamed.safetensors");
    renamed.save(&renamed_path).unwrap();
    run_fails(
        LINPROBE,
        &["--train", s, "--test", renamed_path.to_str().unwrap()],
        "different classes",
    );
    run_fails(
        LINPROBE,
        &["--train", s, "--test", "/nonexistent.safetensors"],
        "nonexistent",
    );
    run_fails(
        EMBED,
        &[
            "--data",
            "synthetic:8",
            "--pixels",
            "--pool",
            "mean",
            "--out",
            s,
        ],
        "cannot be used",
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
