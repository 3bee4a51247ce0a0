//! Data-parallel pre-training: two ranks (threads on the CPU backend, gradients averaged on the
//! host) train like one process at twice the batch; `pretrain --data-parallel` with one rank
//! through NCCL ends bitwise where single-process pre-training does (needs a GPU and libnccl:
//! skips with the reason without them, fails under `MAE_REQUIRE_BACKENDS=cuda`); the flag is
//! refused clearly where it cannot run.

use mae_examples::checkpoint::{TrainCheckpoint, FILE_NAME};
use mae_examples::metrics::read_records;
use std::path::{Path, PathBuf};
mod common;
use common::text;
use std::process::{Command, Output};

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mae-dp-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
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

/// Two ranks as threads on the CPU backend: each averages with the other on the host, summing
/// in rank order so that both get the same bits, as NCCL gives every rank the same result.
#[cfg(feature = "cpu")]
mod two_ranks {
    use mae::backend::{Backend, BackendError};
    use mae::model::GradsReady;
    use mae::params::MaeParams;
    use mae::train::Trainer;
    use mae_backend_cpu::{CpuBackend, CpuBuf};
    use mae_examples::data::{self, Augment, Loader, LoaderOptions, Shard};
    use mae_examples::parallel::{GradAverager, Rank, Replica};
    use std::sync::{Arc, Barrier, Mutex};

    type Grads = Vec<Vec<f32>>;

    /// Averages on the host through shared slots: each group of gradients as the backward
    /// hands it over (`overlap`, as NCCL does on GPUs), or all of them after the backward.
    struct HostAverager {
        rank: usize,
        slots: Arc<Mutex<Vec<Grads>>>,
        barrier: Arc<Barrier>,
        overlap: bool,
        /// Tensors averaged during the current backward.
        handed: usize,
    }

    impl HostAverager {
        /// Replaces `grads` by their means over the ranks (every rank passes the same tensors).
        fn exchange(&self, b: &CpuBackend, grads: &mut [&mut CpuBuf]) -> Result<(), BackendError> {
            let mine: Grads = grads.iter().map(|g| g.to_vec()).collect();
            self.slots.lock().unwrap()[self.rank] = mine;
            self.barrier.wait();
            let mean: Grads = {
                let slots = self.slots.lock().unwrap();
                let n = slots.len() as f32;
                (0..slots[0].len())
                    .map(|t| {
                        (0..slots[0][t].len())
                            .map(|i| slots.iter().map(|s| s[t][i]).sum::<f32>() / n)
                            .collect()
                    })
                    .collect()
            };
            // Every rank has read the slots before any rank writes them again.
            self.barrier.wait();
            for (dst, src) in grads.iter_mut().zip(&mean) {
                b.write(dst, src)?;
            }
            Ok(())
        }
    }

    impl GradsReady<CpuBackend> for HostAverager {
        fn ready(&mut self, b: &CpuBackend, grads: &mut [&mut CpuBuf]) -> Result<(), BackendError> {
            if self.overlap {
                self.exchange(b, grads)?;
                self.handed += grads.len();
            }
            Ok(())
        }
    }

    impl GradAverager<CpuBackend> for HostAverager {
        fn finish(
            &mut self,
            b: &CpuBackend,
            grads: &mut MaeParams<CpuBuf>,
        ) -> Result<(), BackendError> {
            let mut all: Vec<&mut CpuBuf> = grads.tensors_mut().collect();
            if self.overlap {
                // Every gradient was averaged as it was handed over, none left for now.
                assert_eq!(std::mem::take(&mut self.handed), all.len());
                return Ok(());
            }
            self.exchange(b, &mut all)
        }
    }

    const PER_RANK: usize = 4;
    const RANKS: usize = 2;
    const MICRO_BATCHES: usize = 6;
    const LR: f64 = 1e-3;

    struct Trained {
        losses: Vec<f32>,
        params: MaeParams<Vec<f32>>,
    }

    /// Trains shard `shard` (of batches of `PER_RANK * RANKS`), with `averager` or alone.
    fn train(shard: Shard, averager: Option<&mut dyn GradAverager<CpuBackend>>) -> Trained {
        let b = CpuBackend::new();
        let cfg = mae::Config::preset("tiny32").unwrap();
        let params = mae::init::init_params(&cfg, 3);
        let mut opts = mae::train::TrainOptions::new(shard.range(PER_RANK * RANKS).len());
        opts.accum_steps = 2;
        let seed = 17;
        let mut trainer = Trainer::new(&b, &cfg, &params, opts, seed).unwrap();
        let ds = data::open("synthetic:64:32", 3).unwrap();
        let mut lo = LoaderOptions::new(PER_RANK * RANKS, Augment::paper(32, 3), 5);
        lo.workers = 2;
        lo.shard = shard;
        let mut loader = Loader::new(ds, lo, 0).unwrap();
        let mut replica = averager.map(|averager| {
            let rank = Rank {
                rank: shard.index,
                world_size: shard.count,
                averager,
            };
            Replica::new(rank, seed)
        });
        let mut losses = Vec::new();
        for _ in 0..MICRO_BATCHES {
            let batch = loader.next().unwrap();
            let loss = match &mut replica {
                Some(r) => r.step(&mut trainer, &b, &batch.images, LR),
                None => trainer.train_step(&b, &batch.images, None, LR),
            };
            losses.push(loss.unwrap());
        }
        assert_eq!(trainer.updates(), (MICRO_BATCHES / 2) as u64);
        Trained {
            losses,
            params: trainer.download(&b, trainer.params()).unwrap(),
        }
    }

    /// With the averaging after the backward, and during it as each group of gradients is
    /// handed over: a group handed over before its last write would average stale values, and
    /// the ranks would not train like the single process.
    #[test]
    fn two_ranks_train_like_one_process_at_twice_the_batch() {
        for overlap in [false, true] {
            two_ranks_against_one_process(overlap);
        }
    }

    fn two_ranks_against_one_process(overlap: bool) {
        let single = train(Shard::WHOLE, None);
        let slots = Arc::new(Mutex::new(vec![Vec::new(); RANKS]));
        let barrier = Arc::new(Barrier::new(RANKS));
        let ranks: Vec<Trained> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..RANKS)
                .map(|rank| {
                    let mut averager = HostAverager {
                        rank,
                        slots: slots.clone(),
                        barrier: barrier.clone(),
                        overlap,
                        handed: 0,
                    };
                    s.spawn(move || {
                        let shard = Shard {
                            index: rank,
                            count: RANKS,
                        };
                        train(shard, Some(&mut averager))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        // The replicas stay identical: the same start, the same averaged gradients.
        assert!(
            ranks[0].params == ranks[1].params,
            "the replicas diverged (overlap {overlap})"
        );
        // Each micro-batch's loss over the two halves is the single process's loss over the
        // whole batch: the same images, masks and weights, the mean of two means of equal
        // counts, up to float rounding of sums over a few thousand terms (about 1e-7 relative);
        // after updates it still holds, because the weights differ only by that rounding.
        for (k, &whole) in single.losses.iter().enumerate() {
            let halves = (ranks[0].losses[k] + ranks[1].losses[k]) / 2.0;
            let rel = ((halves - whole) / whole).abs();
            assert!(
                rel < 1e-6,
                "micro-batch {k} (overlap {overlap}): ranks {halves}, single {whole}"
            );
            // Different halves of the batch: a rank's own loss is not the whole batch's.
            assert_ne!(ranks[0].losses[k], ranks[1].losses[k], "micro-batch {k}");
        }
    }
}
