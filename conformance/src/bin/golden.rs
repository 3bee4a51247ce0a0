//! `golden [--backend NAME] FILE...`: replays golden files on a backend, prints each tensor's
//! relative error, and ends with `golden: N passed, M failed` (files), exiting non-zero on any
//! failure.

use mae::backend::{Backend, OnBackend};
use mae_conformance::backends;
use mae_conformance::golden::{run, GoldenCase, Report};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

const USAGE: &str = "usage: golden [--backend NAME] FILE...";

fn print(report: &Report) {
    for c in &report.checks {
        let verdict = if c.passed() { "ok  " } else { "FAIL" };
        println!(
            "  {verdict} {:<48} {:>10.3e}  (tol {:.0e})",
            c.name, c.error, c.tol
        );
    }
    let worst = report.failures().len();
    println!(
        "{}: {} on {}: {} checks, {worst} failed",
        if report.passed() { "PASS" } else { "FAIL" },
        report.case,
        report.backend,
        report.checks.len()
    );
}

fn run_file<B: Backend>(b: &B, path: &Path) -> bool {
    let case = match GoldenCase::load(path) {
        Ok(c) => c,
        Err(e) => {
            println!("FAIL: {}: {e}", path.display());
            return false;
        }
    };
    println!("{} ({}):", case.name, path.display());
    match run(b, &case) {
        Ok(report) => {
            print(&report);
            report.passed()
        }
        Err(e) => {
            println!("FAIL: {}: {e}", case.name);
            false
        }
    }
}

/// Every file on one backend: whether each passed.
struct RunFiles<'a>(&'a [PathBuf]);

impl OnBackend for RunFiles<'_> {
    type Output = Vec<bool>;
    fn run<B: Backend>(self, b: &B) -> Vec<bool> {
        self.0.iter().map(|f| run_file(b, f)).collect()
    }
}

fn main() -> ExitCode {
    let mut backend = String::from("cpu");
    let mut files = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--backend" => match args.next() {
                Some(name) => backend = name,
                None => {
                    eprintln!("{USAGE}");
                    return ExitCode::from(2);
                }
            },
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            _ => files.push(PathBuf::from(a)),
        }
    }
    if files.is_empty() {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    }
    let results = match backends::dispatch(&backend, RunFiles(&files)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("golden: {e}");
            return ExitCode::from(2);
        }
    };
    let passed = results.iter().filter(|&&p| p).count();
    println!("golden: {passed} passed, {} failed", results.len() - passed);
    if passed == results.len() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
