//! `linprobe`: the paper's linear probe (Table 9) on feature files written by `embed`:
//! batch norm without affine parameters, then a linear classifier trained with LARS, base lr 0.1,
//! 90 epochs with 10 of warmup, batch 16384 (clamped to the training set). Prints the loss of
//! every epoch and the final top-1 on the training and test sets, and writes them with the
//! settings and the feature files' sources as JSON.
//!
//! ```text
//! cargo run --release -p mae-examples --bin linprobe -- --train cifar-train.safetensors \
//!     --test cifar-test.safetensors --batch-size 1024 --out probe.json
//! ```

use clap::Parser;
use mae_examples::checkpoint::write_atomic;
use mae_examples::features::FeatureSet;
use mae_examples::probe::{self, Accuracy, Optimizer, ProbeOptions, Samples};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

type Failure = Box<dyn std::error::Error>;

/// Linear probing (He et al. 2021, Table 9) on precomputed features.
#[derive(Parser, Debug)]
#[command(name = "linprobe", version)]
struct Args {
    /// Feature file of the training set (from `embed`)
    #[arg(long)]
    train: PathBuf,
    /// Feature file of the held-out set (same encoder, same classes)
    #[arg(long)]
    test: PathBuf,
    /// Passes over the training set
    #[arg(long, default_value_t = 90)]
    epochs: usize,
    /// Linear warmup, in epochs
    #[arg(long, default_value_t = 10.0)]
    warmup_epochs: f64,
    /// Samples per step (clamped to the training set; the last partial batch is dropped)
    #[arg(long, default_value_t = 16384)]
    batch_size: usize,
    /// Base learning rate: lr = blr x batch / 256
    #[arg(long, default_value_t = probe::PAPER_BLR)]
    blr: f64,
    /// `lars` (the paper's) or `sgd` (momentum 0.9)
    #[arg(long, default_value = "lars", value_parser = ["lars", "sgd"])]
    optimizer: String,
    /// Seed of the head's initialization and the data order
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write the result here as JSON
    #[arg(long)]
    out: Option<PathBuf>,
}

/// How far LARS can move the weights over the run, relative to their norm: the sum over steps
/// of `lr x trust`, amplified by the momentum's `1 / (1 - momentum)`. `None` for SGD.
fn lars_reach(opts: &ProbeOptions, n: usize) -> Option<f64> {
    let Optimizer::Lars { trust_coefficient } = opts.optimizer else {
        return None;
    };
    let batch = opts.effective_batch(n).max(1);
    let steps = n / batch;
    let sum: f64 = (0..opts.epochs)
        .flat_map(|e| (0..steps).map(move |s| (e, s)))
        .map(|(e, s)| opts.lr_at(batch, e, s, steps))
        .sum();
    Some(sum * trust_coefficient / (1.0 - opts.momentum))
}

fn load(path: &Path) -> Result<FeatureSet, Failure> {
    FeatureSet::load(path).map_err(|e| format!("{}: {e}", path.display()).into())
}

fn accuracy_json(a: &Accuracy) -> Value {
    json!({ "top1": a.top1, "top5": a.top5, "loss": a.loss, "samples": a.samples })
}

fn describe(path: &Path, set: &FeatureSet) -> Value {
    json!({
        "path": path.display().to_string(),
        "samples": set.len(),
        "dim": set.dim,
        "classes": set.classes,
        "encoder": set.source.encoder,
        "pool": set.source.pool,
        "dataset": set.source.dataset,
        "model": serde_json::from_str::<Value>(&set.source.model).unwrap_or(Value::Null),
    })
}

fn percent(a: &Accuracy) -> String {
    match a.top5 {
        Some(t5) => format!("top-1 {:.2} %, top-5 {:.2} %", 100.0 * a.top1, 100.0 * t5),
        None => format!("top-1 {:.2} %", 100.0 * a.top1),
    }
}

fn run(a: &Args) -> Result<(), Failure> {
    let (train, test) = (load(&a.train)?, load(&a.test)?);
    if train.dim != test.dim {
        return Err(format!(
            "the feature files have different dimensions: {} has {}, {} has {} (embed both \
             sets with the same encoder)",
            a.train.display(),
            train.dim,
            a.test.display(),
            test.dim
        )
        .into());
    }
    if train.classes != test.classes {
        return Err(format!(
            "the feature files have different classes: {} has {:?}, {} has {:?}",
            a.train.display(),
            train.classes,
            a.test.display(),
            test.classes
        )
        .into());
    }
    if train.source.encoder != test.source.encoder || train.source.pool != test.source.pool {
        eprintln!(
            "linprobe: warning: the sets come from different encoders ({}, pool {} vs {}, pool {})",
            train.source.encoder, train.source.pool, test.source.encoder, test.source.pool
        );
    }
    let opts = ProbeOptions {
        epochs: a.epochs,
        warmup_epochs: a.warmup_epochs,
        batch_size: a.batch_size,
        blr: a.blr,
        optimizer: Optimizer::parse(&a.optimizer)?,
        seed: a.seed,
        ..ProbeOptions::default()
    };
    let batch = opts.effective_batch(train.len());
    let steps = train.len() / batch.max(1);
    println!(
        "linprobe: {} training and {} test samples of dimension {}, {} classes; {} x {} steps \
         of batch {batch}, {}, lr {:.4} (blr {})",
        train.len(),
        test.len(),
        train.dim,
        train.classes.len(),
        a.epochs,
        steps,
        opts.optimizer.name(),
        opts.schedule(batch).lr,
        a.blr
    );
    if let Some(reach) = lars_reach(&opts, train.len()) {
        if reach < 10.0 {
            eprintln!(
                "linprobe: note: LARS scales every step to lr x 0.001 x |W|, so this run can move \
                 the weights by only about {reach:.2} times their initial norm (ImageNet with the \
                 paper's settings: ~220); on a small set raise --blr or --epochs, or use \
                 --optimizer sgd"
            );
        }
    }
    let started = Instant::now();
    let trained = probe::train(Samples::from(&train), train.classes.len(), &opts, |e| {
        println!(
            "epoch {:>3}/{} loss {:.4} lr {:.3e} ({:.2} s)",
            e.epoch + 1,
            a.epochs,
            e.loss,
            e.lr,
            e.seconds
        )
    })?;
    let seconds = started.elapsed().as_secs_f64();
    let train_acc = trained.probe.evaluate(Samples::from(&train))?;
    let test_acc = trained.probe.evaluate(Samples::from(&test))?;
    println!("linprobe: train {}", percent(&train_acc));
    println!("linprobe: test {}", percent(&test_acc));
    println!("linprobe: trained in {seconds:.2} s");

    if let Some(out) = &a.out {
        let result = json!({
            "train": accuracy_json(&train_acc),
            "test": accuracy_json(&test_acc),
            "settings": {
                "epochs": a.epochs,
                "warmup_epochs": a.warmup_epochs,
                "batch_size": trained.batch_size,
                "batch_size_asked": a.batch_size,
                "steps_per_epoch": trained.steps_per_epoch,
                "blr": a.blr,
                "lr": trained.lr,
                "min_lr": opts.min_lr,
                "optimizer": opts.optimizer.name(),
                "momentum": opts.momentum,
                "weight_decay": opts.weight_decay,
                "seed": a.seed,
            },
            "epochs": trained.history.iter().map(|e| json!({
                "epoch": e.epoch, "loss": e.loss, "lr": e.lr,
            })).collect::<Vec<_>>(),
            "train_features": describe(&a.train, &train),
            "test_features": describe(&a.test, &test),
            "seconds": seconds,
        });
        let text = serde_json::to_string_pretty(&result)? + "\n";
        write_atomic(out, text.as_bytes())
            .map_err(|e| format!("cannot write {}: {e}", out.display()))?;
        println!("linprobe: wrote {}", out.display());
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("linprobe: {e}");
            ExitCode::FAILURE
        }
    }
}
