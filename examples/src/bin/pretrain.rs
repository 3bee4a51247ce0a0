//! `pretrain`: masked-autoencoder pre-training.
//!
//! This first version trains on the embedded synthetic dataset (no files needed) and prints the
//! falling loss; the full recipe on real data (ImageFolder, CIFAR-10, MNIST, augmentation,
//! resume, pictures) is the `pretrain` issue's work.
//!
//! ```text
//! cargo run --release -p mae-examples --bin pretrain -- [--model NAME] [--steps N]
//!     [--batch-size N] [--blr X] [--mask-ratio X] [--seed N] [--out DIR] [--backend cpu]
//! ```

use mae::optim::{scaled_lr, Schedule};
use mae::train::{TrainOptions, Trainer};
use mae::Config;
use mae_backend_cpu::CpuBackend;
use mae_examples::{checkpoint, synthetic};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

struct Args {
    model: String,
    steps: u64,
    batch_size: usize,
    blr: f64,
    mask_ratio: f64,
    seed: u64,
    out: PathBuf,
    backend: String,
}

const USAGE: &str = "usage: pretrain [--model NAME] [--steps N] [--batch-size N] [--blr X] \
[--mask-ratio X] [--seed N] [--out DIR] [--backend cpu]\n  --model: demo (default; img 32, patch 4, dim 96, depth 4) \
or a preset: tiny32, small64, base224, mae_vit_base_patch16, ...";

fn parse() -> Result<Args, String> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut a = Args {
        model: "demo".into(),
        steps: 300,
        batch_size: 32,
        // Ten times the paper's 1.5e-4: the demo runs hundreds of steps, not hundreds of epochs.
        blr: 1.5e-3,
        mask_ratio: 0.75,
        seed: 0,
        out: PathBuf::from(format!("runs/{stamp}")),
        backend: "cpu".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            return Err(USAGE.into());
        }
        let value = it
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}");
        match flag.as_str() {
            "--model" => a.model = value,
            "--steps" => a.steps = value.parse().map_err(|e| bad(&e))?,
            "--batch-size" => a.batch_size = value.parse().map_err(|e| bad(&e))?,
            "--blr" => a.blr = value.parse().map_err(|e| bad(&e))?,
            "--mask-ratio" => a.mask_ratio = value.parse().map_err(|e| bad(&e))?,
            "--seed" => a.seed = value.parse().map_err(|e| bad(&e))?,
            "--out" => a.out = PathBuf::from(value),
            "--backend" => a.backend = value,
            _ => return Err(format!("unknown flag {flag}\n{USAGE}")),
        }
    }
    Ok(a)
}

/// A model small enough to learn visibly in a minute on two CPU cores.
fn demo_config() -> Config {
    Config {
        img_size: 32,
        patch_size: 4,
        in_chans: 3,
        embed_dim: 96,
        depth: 4,
        num_heads: 3,
        decoder_embed_dim: 64,
        decoder_depth: 2,
        decoder_num_heads: 4,
        mlp_ratio: 4.0,
        norm_pix_loss: true,
        norm_eps: 1e-6,
    }
}

fn run(a: Args) -> Result<(), Box<dyn std::error::Error>> {
    let cfg = match a.model.as_str() {
        "demo" => demo_config(),
        name => Config::preset(name)?,
    };
    if a.backend != "cpu" {
        return Err(format!(
            "backend `{}` is not compiled in (available: cpu)",
            a.backend
        )
        .into());
    }
    let backend = CpuBackend::new();
    let opts = TrainOptions {
        mask_ratio: a.mask_ratio,
        ..TrainOptions::new(a.batch_size)
    };
    // Fail on an unusable output folder now, not after the training it would hold.
    std::fs::create_dir_all(&a.out)
        .map_err(|e| format!("cannot create output folder {}: {e}", a.out.display()))?;
    let params = mae::init::init_params(&cfg, a.seed);
    let mut trainer = Trainer::new(&backend, &cfg, &params, opts, a.seed)?;
    let lr = scaled_lr(a.blr, a.batch_size);
    let warmup = (a.steps / 10).max(1) as f64;
    let schedule = Schedule {
        lr,
        min_lr: 0.0,
        warmup_epochs: warmup,
        epochs: a.steps as f64,
    };
    println!(
        "pretrain: model {} ({} patches, keep {}), batch {}, {} steps, peak lr {lr:.2e}, backend cpu",
        a.model,
        cfg.num_patches(),
        trainer.masking().len_keep,
        a.batch_size,
        a.steps
    );
    let start = Instant::now();
    let mut window = 0.0;
    for step in 0..a.steps {
        let imgs = synthetic::batch(
            a.seed,
            step * a.batch_size as u64,
            a.batch_size,
            cfg.in_chans,
            cfg.img_size,
        );
        let loss = trainer.train_step(&backend, &imgs, None, schedule.lr_at(step as f64))?;
        window += loss as f64;
        if (step + 1) % 25 == 0 || step + 1 == a.steps {
            let n = if (step + 1) % 25 == 0 {
                25
            } else {
                (step + 1) % 25
            };
            let secs = start.elapsed().as_secs_f64();
            println!(
                "step {:>5}  loss {:.4}  lr {:.2e}  {:.1} img/s",
                step + 1,
                window / n as f64,
                schedule.lr_at(step as f64),
                ((step + 1) as usize * a.batch_size) as f64 / secs
            );
            window = 0.0;
        }
    }
    let path = a.out.join("checkpoint.safetensors");
    let state = trainer.state(&backend)?;
    let bytes =
        mae::weights::save_mae(&cfg, &state.params, &[("step", &state.updates.to_string())])?;
    checkpoint::write_atomic(&path, &bytes)?;
    println!("wrote {}", path.display());
    Ok(())
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(msg) => {
            eprintln!("{msg}");
            return ExitCode::from(2);
        }
    };
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pretrain: {e}");
            ExitCode::FAILURE
        }
    }
}
