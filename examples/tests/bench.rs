//! The `bench` program's case line: each phase it runs, and only those.

use std::process::Command;

/// The JSON line of `bench --case tiny32` on the CPU with `extra` flags, as a map.
fn case_line(extra: &[&str]) -> serde_json::Map<String, serde_json::Value> {
    let o = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args([
            "--case",
            "tiny32",
            "--backend",
            "cpu",
            "--seconds",
            "0",
            "--batch",
            "4",
        ])
        .args(extra)
        .output()
        .expect("bench starts");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let line = String::from_utf8_lossy(&o.stdout);
    match serde_json::from_str(line.trim()) {
        Ok(serde_json::Value::Object(m)) => m,
        other => panic!("not a JSON object: {line:?} ({other:?})"),
    }
}

fn rate(m: &serde_json::Map<String, serde_json::Value>, key: &str) -> Option<f64> {
    m.get(key).and_then(|v| v.as_f64())
}

#[test]
fn a_case_reports_the_phases_it_runs() {
    let both = case_line(&[]);
    assert_eq!(both.get("case").and_then(|v| v.as_str()), Some("tiny32"));
    assert_eq!(both.get("batch").and_then(|v| v.as_u64()), Some(4));
    for key in [
        "train_img_s",
        "train_gflop_s",
        "embed_img_s",
        "embed_gflop_s",
    ] {
        assert!(
            rate(&both, key).is_some_and(|r| r > 0.0),
            "{key} in {both:?}"
        );
    }
    let train = case_line(&["--phase", "train"]);
    assert!(rate(&train, "train_img_s").is_some_and(|r| r > 0.0));
    assert!(!train.contains_key("embed_img_s"), "{train:?}");
    let embed = case_line(&["--phase", "embed"]);
    assert!(rate(&embed, "embed_img_s").is_some_and(|r| r > 0.0));
    assert!(!embed.contains_key("train_img_s"), "{embed:?}");
}

#[test]
fn an_unknown_phase_is_refused() {
    let o = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(["--case", "tiny32", "--phase", "warmup"])
        .output()
        .expect("bench starts");
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--phase warmup"));
}
