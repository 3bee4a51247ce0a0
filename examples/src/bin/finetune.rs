//! `finetune`: end-to-end fine-tuning of an encoder as an image classifier, the recipe of the
//! paper's Table 8 (official `main_finetune.py`): AdamW (0.9, 0.999), weight decay 0.05, base lr
//! 1e-3 x batch / 256, warmup then cosine, layer-wise lr decay 0.75, mean-pooled patch tokens
//! with `fc_norm` and a head initialized with std 2e-5, label smoothing 0.1, mixup 0.8, cutmix
//! 1.0, drop path 0.1, RandAugment (rand-m9-mstd0.5-inc1) and random erasing 0.25.
//!
//! Without `--checkpoint` the same program trains from random initialization: the supervised
//! baseline. `--train-blocks K` fine-tunes only the last K blocks and the head (Figure 9).
//!
//! ```text
//! cargo run --release -p mae-examples --bin finetune -- --checkpoint runs/cifar \
//!     --data ../shared/data/cifar10/train_10k.bin --eval-data ../shared/data/cifar10/test.bin \
//!     --epochs 15 --out runs/cifar-ft
//! ```

use clap::{Parser, ValueEnum};
use mae::backend::{Backend, OnBackend};
use mae::embed::Pool;
use mae::finetune::{classifier, FinetuneOptions, Finetuner};
use mae::optim::{scaled_lr, AdamW, Schedule};
use mae::weights::save_tensors;
use mae::Config;
use mae_examples::checkpoint::{load_encoder, write_atomic, CLASSIFIER_FILE};
use mae_examples::data::{
    self, targets_without_mixing, Augment, Dataset, InOrder, Loader, LoaderOptions, Mixup,
};
use mae_examples::metrics::{MetricsLog, Record};
use mae_examples::progress::{Progress, Status};
use mae_examples::{backends, models};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

type Failure = Box<dyn std::error::Error + Send + Sync>;

/// Fine-tunes a pre-trained MAE encoder (or a random-init one: the supervised baseline) as an
/// image classifier with the paper's recipe (Table 8).
#[derive(Parser, Debug)]
#[command(name = "finetune", version)]
struct Args {
    /// Training data (labelled): an image folder, a CIFAR-10 `.bin`, MNIST, or `synthetic...`
    #[arg(long)]
    data: String,
    /// Held-out data for top-1 / top-5 [default: none, only the training loss is reported]
    #[arg(long)]
    eval_data: Option<String>,
    /// Pre-trained weights: a `pretrain` run folder or checkpoint, or an encoder file
    /// [default: random initialization, the from-scratch baseline]
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Model for a random initialization, or for a file without a configuration [default: demo]
    #[arg(long)]
    model: Option<String>,
    /// Epochs
    #[arg(long, default_value_t = 100.0)]
    epochs: f64,
    /// Linear warmup, in epochs
    #[arg(long, default_value_t = 5.0)]
    warmup_epochs: f64,
    /// Images per batch
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Base learning rate; the peak lr is blr x batch-size / 256
    #[arg(long, default_value_t = 1e-3)]
    blr: f64,
    /// Peak learning rate, overriding the --blr rule
    #[arg(long)]
    lr: Option<f64>,
    /// Learning rate at the end of the cosine
    #[arg(long, default_value_t = 1e-6)]
    min_lr: f64,
    /// Layer-wise learning-rate decay
    #[arg(long, default_value_t = 0.75)]
    layer_decay: f64,
    /// AdamW weight decay (not on biases, norms, cls token and position table)
    #[arg(long, default_value_t = 0.05)]
    weight_decay: f64,
    /// Drop path rate of the last block (stochastic depth)
    #[arg(long, default_value_t = 0.1)]
    drop_path: f64,
    /// Label smoothing
    #[arg(long, default_value_t = 0.1)]
    smoothing: f64,
    /// Mixup alpha (0: off)
    #[arg(long, default_value_t = 0.8)]
    mixup: f64,
    /// CutMix alpha (0: off)
    #[arg(long, default_value_t = 1.0)]
    cutmix: f64,
    /// RandAugment rand-m9-mstd0.5-inc1 (`--randaug false` turns it off)
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    randaug: bool,
    /// Random erasing probability
    #[arg(long, default_value_t = 0.25)]
    reprob: f64,
    /// Feature of the head: mean of the patch tokens with fc_norm (the paper's fine-tuning), or
    /// the cls token after the final norm
    #[arg(long, value_enum, default_value_t = PoolArg::Mean)]
    pool: PoolArg,
    /// Train only the last K blocks and the head (partial fine-tuning, Figure 9)
    #[arg(long)]
    train_blocks: Option<usize>,
    /// Seed of head initialization, data order, augmentation and drop path
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output folder [default: runs/finetune-<unix time>]
    #[arg(long)]
    out: Option<PathBuf>,
    /// Compute backend
    #[arg(long, default_value_t = backends::default_name().to_string())]
    backend: String,
    /// Decoding / augmentation threads [default: the machine's cores, at most 8]
    #[arg(long)]
    workers: Option<usize>,
    /// Evaluate every this many epochs (and always at the end)
    #[arg(long, default_value_t = 1.0)]
    eval_every: f64,
    /// Log the training loss every this many updates
    #[arg(long, default_value_t = 20)]
    log_every: u64,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum PoolArg {
    Mean,
    Cls,
}

/// Top-1 and top-5 accuracy on the held-out data.
#[derive(Clone, Copy, Debug, Default)]
struct Accuracy {
    top1: f64,
    top5: f64,
}

/// Everything the run needs, resolved before the backend starts.
struct Run {
    cfg: Config,
    init: mae::params::ClassifierParams<Vec<f32>>,
    opts: FinetuneOptions,
    train: Arc<dyn Dataset>,
    eval: Option<Arc<dyn Dataset>>,
    schedule: Schedule,
    steps: u64,
    batches_per_epoch: u64,
    source: String,
    out: PathBuf,
    args: Args,
}

impl OnBackend for Run {
    type Output = Result<Option<Accuracy>, Failure>;
    fn run<B: Backend>(self, b: &B) -> Self::Output {
        let a = &self.args;
        let mut ft = Finetuner::new(b, &self.cfg, &self.init, self.opts, a.seed)?;
        let (c, s) = (self.cfg.in_chans, self.cfg.img_size);
        let mut augment = Augment::finetune(s, c);
        if !a.randaug {
            augment.rand_augment = None;
        }
        match augment.erasing.as_mut() {
            Some(e) if a.reprob > 0.0 => e.probability = a.reprob,
            _ => augment.erasing = None,
        }
        let mut loader_opts = LoaderOptions::new(a.batch_size, augment, a.seed);
        if let Some(w) = a.workers {
            loader_opts.workers = w.max(1);
        }
        let mut loader = Loader::new(self.train.clone(), loader_opts, 0)?;
        let classes = self.opts.num_classes;
        let mixup = Mixup {
            mixup_alpha: a.mixup,
            cutmix_alpha: a.cutmix,
            label_smoothing: a.smoothing,
            ..Mixup::paper(classes)
        };
        let mixing = a.mixup > 0.0 || a.cutmix > 0.0;
        // Mixing draws from its own stream, apart from the loader's and drop path's.
        let mut rng = mae::rng::Rng::new(a.seed).fork(0x313C);
        let mut log = MetricsLog::open(&self.out, None, &format!("finetune on {}", a.data))?;
        let mut evals = Vec::new();
        let progress = Progress::new(a.log_every);
        let (start, mut window, mut window_loss) = (Instant::now(), Instant::now(), 0.0);
        let eval_every = (a.eval_every * self.batches_per_epoch as f64)
            .round()
            .max(1.0) as u64;
        let mut last = None;
        for step in 0..self.steps {
            let mut batch = loader.next()?;
            let targets = if mixing {
                mixup.apply(&mut batch.images, &batch.labels, (c, s, s), &mut rng)?
            } else {
                targets_without_mixing(&batch.labels, classes, a.smoothing)?
            };
            let epoch = step as f64 / self.batches_per_epoch as f64;
            let lr = self.schedule.lr_at(epoch);
            let loss = ft.train_step(b, &batch.images, &targets, lr)?;
            window_loss += loss as f64;
            let done = step + 1;
            if done % a.log_every == 0 || done == self.steps {
                let n = (done - 1) % a.log_every + 1;
                let img_per_s = (n as usize * a.batch_size) as f64 / window.elapsed().as_secs_f64();
                let mean = window_loss / n as f64;
                let left = (self.steps - done) as f64 * a.batch_size as f64 / img_per_s;
                log.record(&Record {
                    step: done,
                    epoch: done as f64 / self.batches_per_epoch as f64,
                    loss: mean,
                    lr,
                    img_per_s,
                    elapsed_s: start.elapsed().as_secs_f64(),
                    skipped: 0,
                })?;
                progress.show(&Status {
                    step: done,
                    total: self.steps,
                    epoch: done as f64 / self.batches_per_epoch as f64,
                    loss: mean,
                    lr,
                    img_per_s,
                    eta: Duration::from_secs_f64(left.max(0.0)),
                });
                (window, window_loss) = (Instant::now(), 0.0);
            }
            if let Some(ds) = &self.eval {
                if done % eval_every == 0 || done == self.steps {
                    progress.finish_line();
                    let acc = evaluate(b, &mut ft, ds.as_ref(), &self.cfg, a)?;
                    let epoch = done as f64 / self.batches_per_epoch as f64;
                    println!(
                        "finetune: epoch {epoch:.2}: top-1 {:.2} %, top-5 {:.2} %",
                        100.0 * acc.top1,
                        100.0 * acc.top5
                    );
                    evals.push(
                        json!({"step": done, "epoch": epoch, "top1": acc.top1, "top5": acc.top5}),
                    );
                    last = Some(acc);
                }
            }
        }
        progress.finish_line();
        save(b, &ft, &self, last, &evals, start.elapsed())?;
        Ok(last)
    }
}

/// Top-1 / top-5 of the classifier on every image of `ds` (evaluation transform, no drop path).
fn evaluate<B: Backend>(
    b: &B,
    ft: &mut Finetuner<B>,
    ds: &dyn Dataset,
    cfg: &Config,
    a: &Args,
) -> Result<Accuracy, Failure> {
    let images = InOrder {
        ds,
        augment: Augment::eval(cfg.img_size, cfg.in_chans),
        n: ds.len(),
        batch: a.batch_size,
        workers: a.workers.unwrap_or(2).max(1),
    };
    let classes = ft.options().num_classes;
    let (mut top1, mut top5) = (0usize, 0usize);
    images.for_each(|first, imgs| {
        let logits = ft.predict(b, imgs)?;
        for (i, row) in logits.chunks(classes).enumerate() {
            let label = ds.label(first + i) as usize;
            let above = row.iter().filter(|&&z| z > row[label]).count();
            top1 += usize::from(above == 0);
            top5 += usize::from(above < 5);
        }
        Ok(())
    })?;
    let n = ds.len().max(1) as f64;
    Ok(Accuracy {
        top1: top1 as f64 / n,
        top5: top5 as f64 / n,
    })
}

/// Writes the classifier (official names: encoder, `fc_norm`, `head`) and `result.json`.
fn save<B: Backend>(
    b: &B,
    ft: &Finetuner<B>,
    run: &Run,
    last: Option<Accuracy>,
    evals: &[serde_json::Value],
    took: Duration,
) -> Result<(), Failure> {
    let params = ft.params(b)?;
    let specs = ft.specs();
    let tensors = specs
        .tensors()
        .zip(params.tensors())
        .map(|(s, t)| (s.name.clone(), s.shape.as_slice(), t.as_slice()));
    let classes = run.train.classes().join(",");
    let meta = [("format", "mae-classifier"), ("classes", classes.as_str())];
    let bytes = save_tensors(ft.config(), tensors, &meta)?;
    write_atomic(&run.out.join(CLASSIFIER_FILE), &bytes)?;
    let a = &run.args;
    let result = json!({
        "top1": last.map(|x| x.top1),
        "top5": last.map(|x| x.top5),
        "evaluations": evals,
        "init": run.source,
        "data": a.data,
        "eval_data": a.eval_data,
        "epochs": a.epochs,
        "steps": run.steps,
        "batch_size": a.batch_size,
        "lr": run.schedule.lr,
        "min_lr": a.min_lr,
        "warmup_epochs": a.warmup_epochs,
        "layer_decay": a.layer_decay,
        "weight_decay": a.weight_decay,
        "drop_path": a.drop_path,
        "smoothing": a.smoothing,
        "mixup": a.mixup,
        "cutmix": a.cutmix,
        "randaug": a.randaug,
        "reprob": a.reprob,
        "pool": format!("{:?}", a.pool).to_lowercase(),
        "train_blocks": a.train_blocks,
        "seed": a.seed,
        "backend": a.backend,
        "wall_s": took.as_secs_f64(),
        "model": serde_json::from_str::<serde_json::Value>(&run.cfg.to_json())?,
    });
    let text = serde_json::to_string_pretty(&result)?;
    write_atomic(&run.out.join("result.json"), text.as_bytes())?;
    Ok(())
}

fn plan(a: Args) -> Result<Run, Failure> {
    let pool = match a.pool {
        PoolArg::Mean => Pool::Mean,
        PoolArg::Cls => Pool::Cls,
    };
    let preset = a.model.as_deref().map(models::resolve).transpose()?;
    let (cfg, encoder, source, head_std) = match &a.checkpoint {
        Some(path) => {
            let (cfg, enc, what) = load_encoder(path, preset.as_ref())?;
            (cfg, enc, what, 2e-5)
        }
        None => {
            let cfg = preset.unwrap_or_else(models::demo);
            let enc = mae::init::init_params(&cfg, a.seed).encoder;
            (cfg, enc, format!("random-init (seed {})", a.seed), 0.02)
        }
    };
    let train = data::open(&a.data, cfg.in_chans)?;
    let eval = a
        .eval_data
        .as_deref()
        .map(|spec| data::open(spec, cfg.in_chans))
        .transpose()?;
    let classes = train.classes();
    if let Some(ev) = &eval {
        if ev.classes() != classes {
            return Err(format!(
                "{} has classes {:?}, the training data {:?}",
                ev.describe(),
                ev.classes(),
                classes
            )
            .into());
        }
    }
    let opts = FinetuneOptions {
        pool,
        adamw: AdamW {
            weight_decay: a.weight_decay,
            ..FinetuneOptions::new(a.batch_size, classes.len()).adamw
        },
        layer_decay: a.layer_decay,
        drop_path: a.drop_path,
        trainable_blocks: a.train_blocks,
        ..FinetuneOptions::new(a.batch_size, classes.len())
    };
    opts.validate(&cfg)?;
    let batches_per_epoch = (train.len() / a.batch_size.max(1)) as u64;
    if batches_per_epoch == 0 {
        return Err(format!("{}: fewer images than one batch", train.describe()).into());
    }
    if !(a.epochs.is_finite() && a.epochs > 0.0) {
        return Err(format!("--epochs must be positive, got {}", a.epochs).into());
    }
    for (name, v) in [
        ("mixup", a.mixup),
        ("cutmix", a.cutmix),
        ("min-lr", a.min_lr),
    ] {
        if !(v.is_finite() && v >= 0.0) {
            return Err(format!("--{name} must be a finite non-negative number, got {v}").into());
        }
    }
    if !(0.0..1.0).contains(&a.smoothing) || !(0.0..=1.0).contains(&a.reprob) {
        return Err("--smoothing must lie in [0, 1) and --reprob in [0, 1]".into());
    }
    let schedule = Schedule {
        lr: a.lr.unwrap_or_else(|| scaled_lr(a.blr, a.batch_size)),
        min_lr: a.min_lr,
        warmup_epochs: a.warmup_epochs,
        epochs: a.epochs,
    };
    let steps = (a.epochs * batches_per_epoch as f64).ceil() as u64;
    let init = classifier(&cfg, encoder, classes.len(), pool, head_std, a.seed);
    let out = a.out.clone().unwrap_or_else(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Path::new("runs").join(format!("finetune-{t}"))
    });
    std::fs::create_dir_all(&out).map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    println!(
        "finetune: {} from {source}, {} classes, {steps} updates of {} images, peak lr {:.3e}",
        train.describe(),
        classes.len(),
        a.batch_size,
        schedule.lr
    );
    Ok(Run {
        cfg,
        init,
        opts,
        train,
        eval,
        schedule,
        steps,
        batches_per_epoch,
        source,
        out,
        args: a,
    })
}

fn main() -> ExitCode {
    let a = Args::parse();
    let backend = a.backend.clone();
    let result = plan(a).and_then(|run| {
        let out = run.out.clone();
        let acc = backends::dispatch(&backend, run)??;
        println!("finetune: wrote {}", out.display());
        if let Some(acc) = acc {
            println!("finetune: top-1 {:.2} %", 100.0 * acc.top1);
        }
        Ok(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("finetune: {e}");
            ExitCode::FAILURE
        }
    }
}
