//! The `pretrain` and `visualize` programs end to end: a short run learns and leaves every
//! output; an interrupted and resumed run ends bitwise where an uninterrupted one does; a kill
//! during a save never damages the last checkpoint; bad input stops with a clear message.

use mae_examples::checkpoint::{TrainCheckpoint, FILE_NAME};
use mae_examples::metrics::read_records;
use std::io::Write;
use std::path::{Path, PathBuf};
mod common;
use common::text;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mae-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn pretrain(args: &[&str], out: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pretrain"))
        .args(args)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap()
}

fn succeed(o: Output) -> String {
    assert!(o.status.success(), "{}", text(&o));
    text(&o)
}

/// Fails with `o`'s output unless it failed with a message containing every one of `needles`.
fn fails_with(o: Output, needles: &[&str]) {
    let t = text(&o);
    assert!(!o.status.success(), "expected a failure:\n{t}");
    for n in needles {
        assert!(t.contains(n), "expected {n:?} in:\n{t}");
    }
}

fn bits(c: &TrainCheckpoint) -> Vec<u32> {
    [&c.state.params, &c.state.m, &c.state.v]
        .iter()
        .flat_map(|p| p.tensors().flatten().map(|x| x.to_bits()))
        .collect()
}

/// A short run on synthetic data (96 updates of the demo model).
const SHORT: &[&str] = &[
    "--data",
    "synthetic:256",
    "--batch-size",
    "16",
    "--epochs",
    "6",
    "--blr",
    "1.5e-3",
    "--log-every",
    "8",
    "--vis-images",
    "3",
    "--seed",
    "3",
];

#[test]
fn a_short_run_learns_and_leaves_every_output() {
    let out = temp_dir("pretrain-short");
    let log = succeed(pretrain(SHORT, &out));
    let records = read_records(&out.join("metrics.jsonl")).unwrap();
    assert_eq!(records.len(), 12, "{log}");
    assert_eq!(records.last().unwrap().step, 96);
    let (first, last) = (records[0].loss, records.last().unwrap().loss);
    assert!(
        last < 0.85 * first,
        "loss did not fall: {first} -> {last}\n{log}"
    );
    assert!(records
        .windows(2)
        .all(|w| w[0].step < w[1].step && w[0].epoch < w[1].epoch));

    let svg = std::fs::read_to_string(out.join("loss.svg")).unwrap();
    assert!(svg.contains("<polyline"), "{svg}");
    let png = std::fs::read(out.join("reconstruction.png")).unwrap();
    let reader = png::Decoder::new(std::io::Cursor::new(png))
        .read_info()
        .unwrap();
    // 3 rows of 4 panels of 96 pixels (32 x 3) with 4-pixel gaps.
    assert_eq!((reader.info().width, reader.info().height), (404, 304));
    assert!(log.contains("true patch's mean and variance"), "{log}");

    let ck = TrainCheckpoint::load(&out.join(FILE_NAME)).unwrap();
    assert_eq!(ck.state.updates, 96);
    assert_eq!(ck.recipe.total_steps, 96);
    assert_eq!(ck.recipe.blr, 1.5e-3);
    // The paper's rule: peak lr = blr x 16 / 256; warmup 5 % of the run.
    assert!((ck.recipe.lr - 1.5e-3 * 16.0 / 256.0).abs() < 1e-15);
    assert!((ck.recipe.warmup_epochs - 0.3).abs() < 1e-12);
    let run: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
    assert_eq!(run["total_steps"], 96);

    // `visualize` on the result, another mask ratio and other images.
    let png = out.join("vis.png");
    let vis = Command::new(env!("CARGO_BIN_EXE_visualize"))
        .arg("--checkpoint")
        .arg(&out)
        .args(["--data", "synthetic:64", "--first", "10", "--images", "2"])
        .args(["--mask-ratio", "0.5", "--out"])
        .arg(&png)
        .output()
        .unwrap();
    let t = succeed(vis);
    assert!(t.contains("50 % of patches removed"), "{t}");
    assert!(t.contains("un-normalized with the true patch's mean and variance"));
    assert!(std::fs::metadata(&png).unwrap().len() > 1000);
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn an_interrupted_and_resumed_run_ends_bitwise_like_an_uninterrupted_one() {
    let (whole, parts) = (temp_dir("pretrain-whole"), temp_dir("pretrain-parts"));
    let args = [
        "--data",
        "synthetic:96",
        "--batch-size",
        "8",
        "--accum-iter",
        "2",
        "--steps",
        "14",
        "--save-every",
        "4",
        "--log-every",
        "2",
        "--vis-images",
        "0",
        "--seed",
        "11",
    ];
    let mut one = args.to_vec();
    one.extend(["--workers", "1"]);
    succeed(pretrain(&one, &whole));

    // Stopped after 9 updates (the last periodic save was at 8), then resumed with another
    // worker count.
    let mut first = args.to_vec();
    first.extend(["--stop-after", "9", "--workers", "3"]);
    let t = succeed(pretrain(&first, &parts));
    assert!(t.contains("continue with: pretrain --resume"), "{t}");
    assert_eq!(
        TrainCheckpoint::load(&parts.join(FILE_NAME))
            .unwrap()
            .state
            .updates,
        9
    );
    let resume = Command::new(env!("CARGO_BIN_EXE_pretrain"))
        .arg("--resume")
        .arg(&parts)
        .args(["--workers", "2", "--log-every", "2", "--vis-images", "0"])
        .output()
        .unwrap();
    let t = succeed(resume);
    assert!(t.contains("resuming at update 9"), "{t}");

    let (a, b) = (
        TrainCheckpoint::load(&whole.join(FILE_NAME)).unwrap(),
        TrainCheckpoint::load(&parts.join(FILE_NAME)).unwrap(),
    );
    assert_eq!(b.state.updates, 14);
    assert_eq!(a.state.rng_state, b.state.rng_state);
    assert!(bits(&a) == bits(&b), "resumed weights or moments differ");
    // The metrics history has each step once: the interrupted run's last record (update 9)
    // joins the others. Losses agree wherever a record's window lies on one side of the
    // interruption (the window of update 10 starts at the resume in the second run).
    let (ma, mb) = (
        read_records(&whole.join("metrics.jsonl")).unwrap(),
        read_records(&parts.join("metrics.jsonl")).unwrap(),
    );
    let steps: Vec<u64> = mb.iter().map(|r| r.step).collect();
    assert_eq!(steps, [2, 4, 6, 8, 9, 10, 12, 14]);
    for a in &ma {
        let b = mb.iter().find(|b| b.step == a.step).unwrap();
        if a.step != 10 {
            assert_eq!(a.loss, b.loss, "loss of the record at update {}", a.step);
        }
    }
    std::fs::remove_dir_all(&whole).unwrap();
    std::fs::remove_dir_all(&parts).unwrap();
}

/// The temporary file a save by process `pid` writes before renaming it over the checkpoint.
fn temporary(dir: &Path, pid: u32) -> PathBuf {
    dir.join(format!(".{FILE_NAME}.tmp{pid}"))
}

/// A model whose checkpoint (~40 MB with its moments) takes far longer to save than a step
/// of its 4-patch images takes to train, so a kill at a random moment usually lands mid-save.
const HEAVY_MODEL: &str = r#"{"img_size": 8, "patch_size": 4, "in_chans": 3, "embed_dim": 256,
"depth": 4, "num_heads": 4, "decoder_embed_dim": 128, "decoder_depth": 2,
"decoder_num_heads": 4, "mlp_ratio": 4.0, "norm_pix_loss": true, "norm_eps": 1e-6}"#;

#[test]
fn a_kill_during_a_save_never_damages_the_last_checkpoint() {
    let out = temp_dir("pretrain-kill");
    let model = out.join("heavy.json");
    std::fs::File::create(&model)
        .unwrap()
        .write_all(HEAVY_MODEL.as_bytes())
        .unwrap();
    let ckpt = out.join(FILE_NAME);
    let mut mid_save_kills = 0;
    let mut last_step = 0;
    for attempt in 0..6 {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pretrain"));
        if attempt == 0 {
            cmd.args([
                "--data",
                "synthetic:64",
                "--batch-size",
                "2",
                "--steps",
                "100000",
            ])
            .arg("--model")
            .arg(&model)
            .args(["--save-every", "1", "--vis-images", "0", "--out"])
            .arg(&out);
        } else {
            cmd.arg("--resume").arg(&out).args(["--vis-images", "0"]);
        }
        let mut child = cmd
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Let this process finish one save (its temporary file appears, then is renamed), then
        // kill it as soon as the next save's temporary file appears: mid-write or mid-sync.
        let start = Instant::now();
        let tmp = temporary(&out, child.id());
        let mut phase = 0; // 0: before the first save, 1: in it, 2: after it
        while phase < 3 {
            assert!(start.elapsed() < Duration::from_secs(120), "no save seen");
            assert!(child.try_wait().unwrap().is_none(), "pretrain exited early");
            phase += usize::from(tmp.exists() == (phase % 2 == 0));
            std::thread::sleep(Duration::from_millis(1));
        }
        child.kill().unwrap();
        child.wait().unwrap();

        mid_save_kills += usize::from(tmp.exists());
        // The checkpoint is whole, and newer than after the previous attempt.
        let ck = TrainCheckpoint::load(&ckpt)
            .unwrap_or_else(|e| panic!("attempt {attempt}: checkpoint damaged by a kill: {e}"));
        assert!(ck.state.updates > last_step);
        last_step = ck.state.updates;
        if mid_save_kills >= 2 {
            break;
        }
    }
    assert!(
        mid_save_kills >= 1,
        "no kill landed during a save (no temporary file was ever left): the test proved nothing"
    );
    // A resumed run clears the temporaries of the interrupted saves.
    let t = succeed(
        Command::new(env!("CARGO_BIN_EXE_pretrain"))
            .arg("--resume")
            .arg(&out)
            .args([
                "--stop-after",
                &(last_step + 1).to_string(),
                "--vis-images",
                "0",
            ])
            .output()
            .unwrap(),
    );
    assert!(
        t.contains("temporary file(s) of an interrupted save"),
        "{t}"
    );
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn bad_input_stops_before_training_with_a_clear_message() {
    let out = temp_dir("pretrain-bad");
    fails_with(
        pretrain(&["--mask-ratio", "1.5"], &out),
        &["mask ratio 1.5 is outside [0, 1)"],
    );
    fails_with(
        pretrain(&["--model", "vit_tiny"], &out),
        &["unknown model preset"],
    );
    fails_with(
        pretrain(&["--data", "/nonexistent/images"], &out),
        &["/nonexistent/images"],
    );
    fails_with(
        pretrain(&["--data", "synthetic:10", "--batch-size", "16"], &out),
        &["fewer than one batch of 16"],
    );
    fails_with(
        pretrain(&["--epochs=-1"], &out),
        &["--epochs must be positive"],
    );
    fails_with(
        pretrain(&["--epochs", "2", "--steps", "5"], &out),
        &["cannot be used with"],
    );
    let bad_model = out.join("bad.json");
    std::fs::write(&bad_model, HEAVY_MODEL.replace("\"depth\"", "\"depht\"")).unwrap();
    fails_with(
        pretrain(&["--model", bad_model.to_str().unwrap()], &out),
        &["bad.json", "depht"],
    );

    // Resuming: from nothing, from a weights-only file, or with a changed recipe.
    let resume = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_pretrain"))
            .args(args)
            .output()
            .unwrap()
    };
    let missing = out.join("missing");
    fails_with(
        resume(&["--resume", missing.to_str().unwrap()]),
        &["missing"],
    );
    let cfg = mae_examples::models::demo();
    let weights = out.join("weights.safetensors");
    let params = mae::init::init_params(&cfg, 0);
    std::fs::write(
        &weights,
        mae::weights::save_mae(&cfg, &params, &[]).unwrap(),
    )
    .unwrap();
    fails_with(
        resume(&["--resume", weights.to_str().unwrap()]),
        &["not a pre-training checkpoint"],
    );
    succeed(pretrain(
        &[
            "--data",
            "synthetic:32",
            "--batch-size",
            "8",
            "--steps",
            "2",
            "--vis-images",
            "0",
        ],
        &out,
    ));
    fails_with(
        resume(&[
            "--resume",
            out.to_str().unwrap(),
            "--blr",
            "1e-3",
            "--seed",
            "2",
        ]),
        &["remove --blr, --seed"],
    );
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn a_diverging_run_stops_naming_the_step_and_the_last_good_checkpoint() {
    let out = temp_dir("pretrain-nan");
    let o = pretrain(
        &[
            "--data",
            "synthetic:64",
            "--batch-size",
            "8",
            "--steps",
            "40",
            "--lr",
            "1e30",
            "--warmup-epochs",
            "0",
            "--save-every",
            "1",
            "--vis-images",
            "0",
        ],
        &out,
    );
    fails_with(
        o,
        &[
            "training diverged",
            "at update",
            "the last good checkpoint is",
            FILE_NAME,
        ],
    );
    // That checkpoint is whole and finite (the loader checks every tensor).
    TrainCheckpoint::load(&out.join(FILE_NAME)).unwrap();
    std::fs::remove_dir_all(&out).unwrap();
}

/// The picture's panels on the CPU backend: the pasted panel is the input on visible patches,
/// the masked panel blanks exactly the removed ones, and the reconstruction of a norm-pix model
/// carries each patch's true mean back.
#[test]
fn reconstruction_panels_keep_visible_patches_and_blank_removed_ones() {
    let cfg = mae::Config {
        depth: 1,
        decoder_depth: 1,
        ..mae_examples::models::demo()
    };
    let params = mae::init::init_params(&cfg, 1);
    let ds = mae_examples::data::open("synthetic:8", 3).unwrap();
    let inputs = mae_examples::reconstruct::eval_inputs(ds.as_ref(), &cfg, 2, 3).unwrap();
    let b = mae_backend_cpu::CpuBackend::new();
    let p = mae_examples::reconstruct::panels(&b, &cfg, &params, &inputs, 0.75, 4).unwrap();
    let (size, patch) = (cfg.img_size, cfg.patch_size);
    let grid = size / patch;
    let mut removed = 0;
    for i in 0..3 {
        for l in 0..grid * grid {
            let (gy, gx) = (l / grid, l % grid);
            let pixels = (0..3).flat_map(|c| {
                (0..patch).flat_map(move |y| {
                    (0..patch)
                        .map(move |x| ((i * 3 + c) * size + gy * patch + y) * size + gx * patch + x)
                })
            });
            let idx: Vec<usize> = pixels.collect();
            let same = |a: &[f32], b: &[f32]| idx.iter().all(|&k| a[k] == b[k]);
            if same(&p.masked, &p.original) {
                assert!(same(&p.pasted, &p.original), "a visible patch was changed");
            } else {
                removed += 1;
                assert!(
                    same(&p.pasted, &p.reconstruction),
                    "a removed patch was not pasted"
                );
                // Blanked to the normalization's mean color.
                let mean = mae_examples::data::IMAGENET_MEAN;
                assert!(idx
                    .iter()
                    .all(|&k| (p.masked[k] - mean[k / (size * size) % 3]).abs() < 1e-6));
            }
        }
    }
    // 64 patches, 16 kept: 48 removed per image.
    assert_eq!(removed, 3 * 48);
}

#[test]
fn ablation_flags_shape_the_model_and_the_masking() {
    let out = temp_dir("pretrain-ablations");
    succeed(pretrain(
        &[
            "--data",
            "synthetic:32",
            "--batch-size",
            "8",
            "--steps",
            "2",
            "--vis-images",
            "2",
            "--mask-sampling",
            "grid",
            "--encoder-mask-tokens",
            "--decoder-depth",
            "1",
            "--decoder-width",
            "32",
        ],
        &out,
    ));
    let ck = TrainCheckpoint::load(&out.join(FILE_NAME)).unwrap();
    assert!(ck.cfg.encoder_mask_tokens);
    assert_eq!((ck.cfg.decoder_depth, ck.cfg.decoder_embed_dim), (1, 32));
    assert_eq!(ck.recipe.mask_sampling, mae::masking::MaskSampling::Grid);
    let token = ck.state.params.encoder.mask_token.as_ref();
    assert_eq!(token.map(Vec::len), Some(ck.cfg.embed_dim));
    fails_with(
        pretrain(&["--mask-sampling", "grid", "--mask-ratio", "0.5"], &out),
        &["grid masking keeps one patch per square cell"],
    );
    fails_with(
        pretrain(&["--mask-sampling", "checkerboard"], &out),
        &["unknown mask sampling `checkerboard`"],
    );
    fails_with(
        pretrain(&["--decoder-width", "30"], &out),
        &["decoder_embed_dim 30"],
    );
    std::fs::remove_dir_all(&out).unwrap();
}
