//! The `finetune` program end to end on tiny synthetic data: from a pre-training checkpoint and
//! from scratch, full and partial, with its outputs and its refusals.

use mae::weights::WeightsFile;
use std::path::{Path, PathBuf};
mod common;
use common::text;
use std::process::{Command, Output};

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mae-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn finetune(args: &[&str], out: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_finetune"))
        .args([
            "--data",
            "synthetic:96:32",
            "--batch-size",
            "16",
            "--epochs",
            "1",
        ])
        .args(["--warmup-epochs", "0.5", "--workers", "2"])
        .args(args)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap()
}

fn result(out: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(out.join("result.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn fine_tunes_a_checkpoint_and_from_scratch() {
    let dir = temp_dir("finetune");
    let cfg = mae_examples::models::demo();
    let weights = dir.join("pretrained.safetensors");
    let params = mae::init::init_params(&cfg, 3);
    std::fs::write(
        &weights,
        mae::weights::save_mae(&cfg, &params, &[]).unwrap(),
    )
    .unwrap();

    let from_mae = dir.join("mae");
    let eval = ["--eval-data", "synthetic:40:32"];
    let o = finetune(
        &[&["--checkpoint", weights.to_str().unwrap()][..], &eval].concat(),
        &from_mae,
    );
    assert!(o.status.success(), "{}", text(&o));
    let r = result(&from_mae);
    let top1 = r["top1"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&top1), "{r}");
    assert_eq!(r["steps"], 6);
    assert!(r["init"]
        .as_str()
        .unwrap()
        .contains("pretrained.safetensors"));
    // The classifier carries the official names; its encoder started from the checkpoint's and
    // moved.
    let bytes = std::fs::read(from_mae.join("classifier.safetensors")).unwrap();
    let file = WeightsFile::parse(&bytes).unwrap();
    for name in [
        "fc_norm.weight",
        "head.weight",
        "head.bias",
        "blocks.3.mlp.fc2.weight",
    ] {
        assert!(file.contains(name), "{name} missing");
    }
    let (_, qkv) = file.tensor("blocks.0.attn.qkv.weight").unwrap();
    assert_ne!(qkv, params.encoder.blocks[0].qkv.weight);
    let diff = qkv
        .iter()
        .zip(&params.encoder.blocks[0].qkv.weight)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(diff < 0.05, "6 small updates moved a weight by {diff}");

    // Partial fine-tuning leaves the embedding and the first blocks as they were.
    let partial = dir.join("partial");
    let o = finetune(
        &[
            "--checkpoint",
            weights.to_str().unwrap(),
            "--train-blocks",
            "1",
            "--pool",
            "cls",
        ],
        &partial,
    );
    assert!(o.status.success(), "{}", text(&o));
    let bytes = std::fs::read(partial.join("classifier.safetensors")).unwrap();
    let file = WeightsFile::parse(&bytes).unwrap();
    assert_eq!(
        file.tensor("blocks.2.attn.qkv.weight").unwrap().1,
        params.encoder.blocks[2].qkv.weight
    );
    assert_eq!(
        file.tensor("patch_embed.proj.weight").unwrap().1,
        params.encoder.patch_embed.weight
    );
    assert_ne!(
        file.tensor("blocks.3.attn.qkv.weight").unwrap().1,
        params.encoder.blocks[3].qkv.weight
    );
    assert!(!file.contains("fc_norm.weight"));

    let scratch = dir.join("scratch");
    let o = finetune(
        &[&["--model", "demo", "--randaug", "false"][..], &eval].concat(),
        &scratch,
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(result(&scratch)["init"]
        .as_str()
        .unwrap()
        .starts_with("random-init"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_settings_stop_with_a_clear_message() {
    let dir = temp_dir("finetune-bad");
    let fails_with = |args: &[&str], needle: &str| {
        let o = finetune(args, &dir);
        assert!(
            !o.status.success() && text(&o).contains(needle),
            "{needle}: {}",
            text(&o)
        );
    };
    fails_with(&["--train-blocks", "9"], "trainable_blocks");
    fails_with(&["--drop-path", "1.5"], "drop_path");
    fails_with(&["--checkpoint", "/nonexistent/run"], "/nonexistent/run");
    fails_with(
        &["--eval-data", "/nonexistent/images"],
        "/nonexistent/images",
    );
    fails_with(&["--smoothing", "1"], "--smoothing");
    std::fs::remove_dir_all(&dir).unwrap();
}
