//! Every golden file (the official PyTorch MAE in float64) replayed on every available backend,
//! within the tolerances of `golden/README.md`: loss, latent, prediction, masking, every
//! gradient and two AdamW updates.
//!
//! Files: `$MAE_GOLDEN_DIR` (default `../shared/golden`, skipped with a message when absent) and
//! the project's own `conformance/golden/*.safetensors` (other sizes, norm-pix, C = 1 and 4,
//! mask ratios 0.5 to 0.9).

use mae::backend::Backend;
use mae_conformance::backends;
use mae_conformance::golden::{run, GoldenCase};
use std::io::Write;
use std::path::{Path, PathBuf};

fn safetensors_in(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.retain(|p| p.extension().is_some_and(|e| e == "safetensors"));
    files.sort();
    files
}

fn golden_files() -> Vec<PathBuf> {
    let root = &mae_conformance::dir();
    let shared = std::env::var_os("MAE_GOLDEN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("../../shared/golden"));
    let mut files = safetensors_in(&shared);
    if files.is_empty() {
        // Past libtest's capture of `eprintln!`: a skip must be visible.
        let _ = writeln!(
            std::io::stderr(),
            "SKIP shared golden files: none in {} (set MAE_GOLDEN_DIR)",
            shared.display()
        );
    }
    let own = safetensors_in(&root.join("golden"));
    assert!(
        own.len() >= 4,
        "the project's own golden files are missing from conformance/golden"
    );
    files.extend(own);
    files
}

fn check_all<B: Backend>(b: &B) {
    let mut failed = Vec::new();
    for path in golden_files() {
        let case = GoldenCase::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let report = run(b, &case).unwrap_or_else(|e| panic!("{} on {}: {e}", case.name, b.name()));
        let worst = report
            .checks
            .iter()
            .filter(|c| c.tol > 0.0)
            .map(|c| c.error / c.tol)
            .fold(0.0, f64::max);
        eprintln!(
            "{} on {}: {} checks, worst error {:.1e} of its tolerance",
            case.name,
            b.name(),
            report.checks.len(),
            worst
        );
        for c in report.failures() {
            failed.push(format!(
                "{} {}: {:.3e} > {:.0e}",
                case.name, c.name, c.error, c.tol
            ));
        }
    }
    assert!(
        failed.is_empty(),
        "golden failures on {}:\n{}",
        b.name(),
        failed.join("\n")
    );
}

/// One test per backend, named after its getter in `mae_conformance::backends`.
macro_rules! golden_tests {
    ($($backend:ident),*) => {$(
        #[test]
        fn $backend() {
            if let Some(b) = backends::$backend() {
                check_all(b);
            }
        }
    )*};
}

golden_tests!(cpu, wgpu, cuda, cuda_bf16);

/// The `golden` program's interface (DESIGN.md): per-tensor lines, a closing
/// `golden: N passed, M failed` line, and a non-zero exit when any file fails.
#[test]
fn golden_program_reports_and_fails_loudly() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let good = root.join("golden/odd_r50.safetensors");
    let bad =
        std::env::temp_dir().join(format!("mae-truncated-{}.safetensors", std::process::id()));
    let bytes = std::fs::read(&good).unwrap();
    std::fs::write(&bad, &bytes[..bytes.len() / 3]).unwrap();
    let run = |files: &[&Path]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_golden"))
            .args(["--backend", "cpu"])
            .args(files)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, out) = run(&[&good]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("step 2 grad decoder_pred.weight"), "{out}");
    assert_eq!(out.lines().last(), Some("golden: 1 passed, 0 failed"));
    let (code, out) = run(&[&good, &bad]);
    std::fs::remove_file(&bad).unwrap();
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("not a safetensors file"), "{out}");
    assert_eq!(out.lines().last(), Some("golden: 1 passed, 1 failed"));
}
