//! The README's main command, shortened: it trains, the loss falls, and the checkpoint it writes
//! loads back as a model.

use std::process::Command;

#[test]
fn pretrain_demo_learns_and_saves_a_loadable_checkpoint() {
    let out = std::env::temp_dir().join(format!("mae-pretrain-test-{}", std::process::id()));
    let run = Command::new(env!("CARGO_BIN_EXE_pretrain"))
        .args(["--steps", "100", "--batch-size", "8", "--seed", "3"])
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let losses: Vec<f64> = stdout
        .lines()
        .filter_map(|l| l.split("loss ").nth(1))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .collect();
    assert_eq!(losses.len(), 4, "{stdout}");
    assert!(losses[3] < 0.8 * losses[0], "loss did not fall: {losses:?}");
    let bytes = std::fs::read(out.join("checkpoint.safetensors")).unwrap();
    let (cfg, params) = mae::weights::load_mae(&bytes, None).unwrap();
    assert_eq!(cfg.embed_dim, 96);
    assert_eq!(params.encoder.blocks.len(), cfg.depth);
    std::fs::remove_dir_all(&out).unwrap();

    let bad = Command::new(env!("CARGO_BIN_EXE_pretrain"))
        .args(["--mask-ratio", "1.5"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("mask ratio 1.5 is outside [0, 1)"));
    let bad = Command::new(env!("CARGO_BIN_EXE_pretrain"))
        .args(["--model", "vit_tiny"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown model preset"));
}
