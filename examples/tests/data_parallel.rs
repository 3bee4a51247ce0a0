//! `pretrain --data-parallel`: one rank through NCCL ends bitwise where single-process
//! pre-training does (needs a GPU and libnccl: skips with the reason without them, fails under
//! `MAE_REQUIRE_BACKENDS=cuda`), and the flag is refused clearly where it cannot run.

use mae_examples::checkpoint::{TrainCheckpoint, FILE_NAME};
use mae_examples::metrics::read_records;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mae-dp-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs `pretrain` with `args` and the data-parallel variables `env` (the others removed).
fn pretrain(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pretrain"));
    for var in ["RANK", "WORLD_SIZE", "LOCAL_RANK", "MAE_NCCL_ID_FILE"] {
        cmd.env_remove(var);
    }
    cmd.args(args).envs(env.iter().copied()).output().unwrap()
}

fn required() -> bool {
    std::env::var("MAE_REQUIRE_BACKENDS")
        .unwrap_or_default()
        .split(',')
        .any(|b| b.trim().eq_ignore_ascii_case("cuda"))
}

/// Prints why the GPU test skips, or fails it where cuda is required.
fn skip(why: &str) {
    assert!(
        !required(),
        "cuda is required by MAE_REQUIRE_BACKENDS: {why}"
    );
    eprintln!("SKIP data-parallel on cuda: {why}");
}

/// Why data-parallel training cannot run here, or `None` where it can.
#[cfg(feature = "cuda")]
fn unavailable() -> Option<String> {
    if let Err(e) = mae_backend_cuda::CudaBackend::new(0) {
        return Some(e.to_string());
    }
    mae_backend_cuda::nccl::NcclId::new()
        .err()
        .map(|e| e.to_string())
}

#[cfg(not(feature = "cuda"))]
fn unavailable() -> Option<String> {
    Some("mae-examples was built without the `cuda` feature".into())
}

fn checkpoint(dir: &Path) -> TrainCheckpoint {
    TrainCheckpoint::load(&dir.join(FILE_NAME)).unwrap()
}

/// 12 updates of 2 accumulated micro-batches of 8 on the demo model: the accumulation
/// boundary, the lr schedule and the loader's epochs all take part.
const RUN: &[&str] = &[
    "--backend",
    "cuda",
    "--data",
    "synthetic:128",
    "--batch-size",
    "8",
    "--accum-iter",
    "2",
    "--steps",
    "12",
    "--blr",
    "1e-3",
    "--log-every",
    "1",
    "--save-every",
    "5",
    "--vis-images",
    "0",
    "--seed",
    "7",
];

#[test]
fn one_rank_through_nccl_ends_bitwise_where_a_single_process_does() {
    if let Some(why) = unavailable() {
        return skip(&why);
    }
    let dir = temp_dir("one-rank");
    let (single, parallel) = (dir.join("single"), dir.join("parallel"));
    let id_file = dir.join("nccl-id");
    let o = pretrain(&[RUN, &["--out", single.to_str().unwrap()]].concat(), &[]);
    assert!(o.status.success(), "{}", text(&o));
    let o = pretrain(
        &[
            RUN,
            &["--data-parallel", "--out", parallel.to_str().unwrap()],
        ]
        .concat(),
        &[
            ("RANK", "0"),
            ("WORLD_SIZE", "1"),
            ("LOCAL_RANK", "0"),
            ("MAE_NCCL_ID_FILE", id_file.to_str().unwrap()),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let log = text(&o);
    assert!(log.contains("data-parallel: 1 rank(s), NCCL"), "{log}");
    assert!(!id_file.exists(), "rank 0 leaves the used id file behind");

    let (a, b) = (checkpoint(&single), checkpoint(&parallel));
    assert_eq!(a.state.updates, 12);
    assert_eq!(a.state.updates, b.state.updates);
    assert_eq!(a.state.rng_state, b.state.rng_state, "masking generator");
    for (name, x, y) in [
        ("params", &a.state.params, &b.state.params),
        ("m", &a.state.m, &b.state.m),
        ("v", &a.state.v, &b.state.v),
    ] {
        let bits = |p: &mae::params::MaeParams<Vec<f32>>| -> Vec<u32> {
            p.tensors().flatten().map(|v| v.to_bits()).collect()
        };
        assert!(bits(x) == bits(y), "{name} differ after 12 updates");
    }
    let losses = |d: &Path| -> Vec<u64> {
        read_records(&d.join("metrics.jsonl"))
            .unwrap()
            .iter()
            .map(|r| r.loss.to_bits())
            .collect()
    };
    assert_eq!(losses(&single).len(), 12);
    assert_eq!(losses(&single), losses(&parallel), "loss step by step");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn data_parallel_needs_the_cuda_backend() {
    let dir = temp_dir("refused");
    let out = dir.join("out");
    let args = [
        "--data-parallel",
        "--backend",
        "cpu",
        "--steps",
        "1",
        "--out",
        out.to_str().unwrap(),
    ];
    let o = pretrain(&args, &[]);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    let why = if cfg!(feature = "cuda") {
        "runs on --backend cuda, not cpu"
    } else {
        "built without"
    };
    assert!(t.contains(why), "expected {why:?} in:\n{t}");
    // Launched as one of several ranks, without the flag: the same.
    let o = pretrain(&args[1..], &[("WORLD_SIZE", "2"), ("RANK", "1")]);
    assert!(
        !o.status.success() && text(&o).contains(why),
        "{}",
        text(&o)
    );
    assert!(!out.exists(), "a refused run writes nothing");
    let _ = std::fs::remove_dir_all(&dir);
}
