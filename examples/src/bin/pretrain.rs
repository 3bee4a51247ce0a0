//! `pretrain`: masked-autoencoder pre-training with the paper's recipe.
//!
//! With no flags it pre-trains a small model on the embedded synthetic dataset in a few minutes
//! and leaves, under `--out` (default `runs/<timestamp>`): `checkpoint.safetensors` (weights,
//! AdamW moments, step, generator state, config and recipe), `metrics.jsonl`, `loss.svg`,
//! `run.json` and `reconstruction.png`. `pretrain --help` lists every flag.
//!
//! ```text
//! cargo run --release -p mae-examples --bin pretrain -- --data ../shared/data/cifar10/train_10k.bin \
//!     --model tiny32 --epochs 30 --out runs/cifar
//! cargo run --release -p mae-examples --bin pretrain -- --resume runs/cifar
//! ```
//!
//! Data-parallel on several GPUs (built with `--features cuda`; one process per GPU, gradients
//! averaged through NCCL, see `docs/gpu.md`):
//!
//! ```text
//! scripts/launch-dp.sh 8 -- target/release/pretrain --backend cuda --batch-size 64 ...
//! ```

use clap::Parser;
use mae::backend::{Backend, OnBackend};
use mae::masking::MaskSampling;
use mae::train::{TrainState, Trainer};
use mae::{Config, Error};
use mae_examples::checkpoint::{self, write_atomic, TrainCheckpoint};
use mae_examples::data::{self, Augment, Dataset, Loader, LoaderOptions, Shard};
use mae_examples::metrics::{MetricsLog, Record};
use mae_examples::parallel::{Rank, Replica};
use mae_examples::progress::{Progress, Status};
use mae_examples::recipe::{Recipe, PAPER_BLR, PAPER_WARMUP_FRACTION};
use mae_examples::{backends, models, picture, reconstruct};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

type Failure = Box<dyn std::error::Error>;

/// Masked-autoencoder pre-training (He et al. 2021) with the paper's recipe (Table 7) as
/// defaults: AdamW (0.9, 0.95), weight decay 0.05, base lr 1.5e-4 x effective batch / 256,
/// warmup then cosine, mask ratio 0.75, norm-pix loss. The run's length and model default to a
/// short demo on synthetic images.
#[derive(Parser, Debug)]
#[command(name = "pretrain", version)]
struct Args {
    /// Dataset: `synthetic[:N[:SIZE]]` (generated, no files), a folder of class subfolders of
    /// JPEG/PNG files, a CIFAR-10 `.bin` file, or an MNIST `idx3-ubyte[.gz]` file
    #[arg(long)]
    data: Option<String>,
    /// Model: `demo` (img 32, patch 4, 4 blocks of 96), a preset (tiny32, small64, base224,
    /// mae_vit_base_patch16, mae_vit_large_patch16, mae_vit_huge_patch14), or a `.json` file
    /// with the configuration's fields
    #[arg(long)]
    model: Option<String>,
    /// Length of the run in epochs [default: 8 on the synthetic default, else 800 as the paper]
    #[arg(long, conflicts_with = "steps")]
    epochs: Option<f64>,
    /// Length of the run in optimizer updates (instead of --epochs)
    #[arg(long)]
    steps: Option<u64>,
    /// Linear warmup in epochs [default: 5 % of the run, the paper's 40 of 800]
    #[arg(long)]
    warmup_epochs: Option<f64>,
    /// Images per micro-batch; per rank with --data-parallel, where the run's batch is this
    /// times WORLD_SIZE [default: 64]
    #[arg(long)]
    batch_size: Option<usize>,
    /// Micro-batches whose gradients are summed per update [default: 1]
    #[arg(long)]
    accum_iter: Option<usize>,
    /// Base learning rate; the peak lr is blr x batch-size x accum-iter / 256 [default: 1.5e-4]
    #[arg(long)]
    blr: Option<f64>,
    /// Peak learning rate, overriding the --blr rule
    #[arg(long)]
    lr: Option<f64>,
    /// Learning rate at the end of the cosine [default: 0]
    #[arg(long)]
    min_lr: Option<f64>,
    /// AdamW weight decay (not on biases, norms, cls and mask tokens) [default: 0.05]
    #[arg(long)]
    weight_decay: Option<f64>,
    /// AdamW beta1 [default: 0.9]
    #[arg(long)]
    beta1: Option<f64>,
    /// AdamW beta2 [default: 0.95]
    #[arg(long)]
    beta2: Option<f64>,
    /// Fraction of patches removed [default: 0.75]
    #[arg(long)]
    mask_ratio: Option<f64>,
    /// Which patches are removed: random (the paper's), block (BEiT's blocks) or grid (one
    /// patch kept per 2 x 2 cell at ratio 0.75), as Table 1f [default: random]
    #[arg(long, value_parser = MaskSampling::parse)]
    mask_sampling: Option<MaskSampling>,
    /// The encoder sees every patch, a learned mask token standing in for each removed one
    /// (the ablation of Table 1c; the decoder then adds no mask tokens)
    #[arg(long)]
    encoder_mask_tokens: bool,
    /// Decoder blocks, overriding the model's (Table 1a)
    #[arg(long)]
    decoder_depth: Option<usize>,
    /// Decoder width, overriding the model's (Table 1b; a multiple of 4 and of its heads)
    #[arg(long)]
    decoder_width: Option<usize>,
    /// Per-patch normalized pixel targets: `--norm-pix-loss` (as the official flag) or
    /// `--norm-pix-loss false` [default: true, as the recipe; a .json model's own value]
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    norm_pix_loss: Option<bool>,
    /// Seed of initialization, masking, data order and augmentation [default: 0]
    #[arg(long)]
    seed: Option<u64>,

    /// Output folder [default: runs/<unix time>; with --resume, the checkpoint's folder]
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the run saved in this checkpoint file or run folder, exactly as it would have
    /// gone on; its recipe is kept, so recipe flags are refused
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Compute backend
    #[arg(long, default_value_t = backends::default_name().to_string())]
    backend: String,
    /// Decoding / augmentation threads [default: the machine's cores, at most 8]
    #[arg(long)]
    workers: Option<usize>,
    /// Save the checkpoint every this many updates (0: only at the end)
    #[arg(long, default_value_t = 200)]
    save_every: u64,
    /// Log metrics every this many updates
    #[arg(long, default_value_t = 20)]
    log_every: u64,
    /// Stop once this many updates of the run are done, with a checkpoint, as an interruption
    /// would (for time-sliced jobs; continue with --resume)
    #[arg(long)]
    stop_after: Option<u64>,
    /// Images in the final reconstruction picture (0: none)
    #[arg(long, default_value_t = 8)]
    vis_images: usize,
    /// Data-parallel training, one process per GPU, as rank RANK of WORLD_SIZE on GPU
    /// LOCAL_RANK, meeting through the file MAE_NCCL_ID_FILE (scripts/launch-dp.sh sets them);
    /// on by itself when WORLD_SIZE is above 1. Needs --backend cuda. Only rank 0 writes
    /// outputs
    #[arg(long)]
    data_parallel: bool,
}

/// The default data: a synthetic set sized so the default run is a few minutes.
const DEFAULT_DATA: &str = "synthetic:8192";
/// The default run length on the default data.
const DEFAULT_DEMO_EPOCHS: f64 = 8.0;
/// The paper's run length.
const PAPER_EPOCHS: f64 = 800.0;

/// A run ready to start: model, recipe, data, where it is saved, and the state to continue.
struct Plan {
    cfg: Config,
    recipe: Recipe,
    dataset: Arc<dyn Dataset>,
    out: PathBuf,
    resume: Option<TrainState>,
}

/// Resolves flags (or the checkpoint to resume) into a [`Plan`], checking everything that can be
/// checked before the backend starts: model, recipe values, dataset, output folder.
///
/// `world_size` processes train data-parallel: the run's batch is `--batch-size` times that.
fn plan(a: &Args, world_size: usize) -> Result<Plan, Failure> {
    if let Some(from) = &a.resume {
        return plan_resume(a, from);
    }
    let model = a.model.clone().unwrap_or_else(|| "demo".into());
    let mut cfg = models::resolve(&model)?;
    // The recipe trains with norm-pix loss (Table 7); the paper's model constructors default it
    // off, so a preset gets it unless the flag says otherwise. A .json file says it itself.
    match a.norm_pix_loss {
        Some(n) => cfg.norm_pix_loss = n,
        None if !model.ends_with(".json") => cfg.norm_pix_loss = true,
        None => {}
    }
    cfg.encoder_mask_tokens |= a.encoder_mask_tokens;
    cfg.decoder_depth = a.decoder_depth.unwrap_or(cfg.decoder_depth);
    cfg.decoder_embed_dim = a.decoder_width.unwrap_or(cfg.decoder_embed_dim);
    cfg.validate()?;
    let spec = a.data.clone().unwrap_or_else(|| DEFAULT_DATA.into());
    let dataset = data::open(&spec, cfg.in_chans)?;
    let accum_iter = a.accum_iter.unwrap_or(1);
    if a.batch_size == Some(0) || accum_iter == 0 {
        return Err("--batch-size and --accum-iter must be at least 1".into());
    }
    let batch_size = a
        .batch_size
        .unwrap_or(64)
        .checked_mul(world_size)
        .ok_or("--batch-size times WORLD_SIZE overflows")?;
    let batches_per_epoch = (dataset.len() / batch_size) as u64;
    if batches_per_epoch == 0 {
        return Err(format!(
            "{}: {} images, fewer than one batch of {batch_size}",
            dataset.describe(),
            dataset.len()
        )
        .into());
    }
    let epochs = match (a.steps, a.epochs) {
        (Some(steps), _) => (steps * accum_iter as u64) as f64 / batches_per_epoch as f64,
        (None, Some(e)) => e,
        (None, None) if a.data.is_none() => DEFAULT_DEMO_EPOCHS,
        (None, None) => PAPER_EPOCHS,
    };
    if !(epochs.is_finite() && epochs > 0.0) {
        return Err(format!("--epochs must be positive, got {epochs}").into());
    }
    let blr = a.blr.unwrap_or(PAPER_BLR);
    let recipe = Recipe {
        model,
        data: spec,
        batch_size,
        accum_iter,
        blr,
        lr: a
            .lr
            .unwrap_or_else(|| Recipe::scaled_lr(blr, batch_size, accum_iter)),
        min_lr: a.min_lr.unwrap_or(0.0),
        warmup_epochs: a.warmup_epochs.unwrap_or(epochs * PAPER_WARMUP_FRACTION),
        epochs,
        batches_per_epoch,
        total_steps: a
            .steps
            .unwrap_or_else(|| Recipe::steps_for(epochs, batches_per_epoch, accum_iter)),
        mask_ratio: a.mask_ratio.unwrap_or(0.75),
        mask_sampling: a.mask_sampling.unwrap_or_default(),
        weight_decay: a.weight_decay.unwrap_or(0.05),
        beta1: a.beta1.unwrap_or(0.9),
        beta2: a.beta2.unwrap_or(0.95),
        seed: a.seed.unwrap_or(0),
    };
    check_recipe(&recipe)?;
    recipe.train_options().validate(&cfg)?;
    let out = a.out.clone().unwrap_or_else(default_out);
    Ok(Plan {
        cfg,
        recipe,
        dataset,
        out,
        resume: None,
    })
}

/// Values the trainer would only refuse later, or never (a negative warmup).
fn check_recipe(r: &Recipe) -> Result<(), Failure> {
    let checks = [
        ("lr", r.lr, r.lr >= 0.0),
        ("min-lr", r.min_lr, r.min_lr >= 0.0),
        ("warmup-epochs", r.warmup_epochs, r.warmup_epochs >= 0.0),
    ];
    for (name, value, ok) in checks {
        if !(value.is_finite() && ok) {
            return Err(
                format!("--{name} must be a finite non-negative number, got {value}").into(),
            );
        }
    }
    if r.total_steps == 0 {
        return Err("the run has no optimizer step: raise --epochs or --steps".into());
    }
    Ok(())
}

fn plan_resume(a: &Args, from: &Path) -> Result<Plan, Failure> {
    let given = [
        ("--data", a.data.is_some()),
        ("--model", a.model.is_some()),
        ("--epochs", a.epochs.is_some()),
        ("--steps", a.steps.is_some()),
        ("--warmup-epochs", a.warmup_epochs.is_some()),
        ("--batch-size", a.batch_size.is_some()),
        ("--accum-iter", a.accum_iter.is_some()),
        ("--blr", a.blr.is_some()),
        ("--lr", a.lr.is_some()),
        ("--min-lr", a.min_lr.is_some()),
        ("--weight-decay", a.weight_decay.is_some()),
        ("--beta1", a.beta1.is_some()),
        ("--beta2", a.beta2.is_some()),
        ("--mask-ratio", a.mask_ratio.is_some()),
        ("--mask-sampling", a.mask_sampling.is_some()),
        ("--encoder-mask-tokens", a.encoder_mask_tokens),
        ("--decoder-depth", a.decoder_depth.is_some()),
        ("--decoder-width", a.decoder_width.is_some()),
        ("--norm-pix-loss", a.norm_pix_loss.is_some()),
        ("--seed", a.seed.is_some()),
    ];
    let refused: Vec<&str> = given.iter().filter(|g| g.1).map(|g| g.0).collect();
    if !refused.is_empty() {
        return Err(format!(
            "--resume continues the saved run with its own recipe; remove {}",
            refused.join(", ")
        )
        .into());
    }
    let path = if from.is_dir() {
        from.join(checkpoint::FILE_NAME)
    } else {
        from.to_path_buf()
    };
    let ck = TrainCheckpoint::load(&path)?;
    let dataset = data::open(&ck.recipe.data, ck.cfg.in_chans)?;
    let batches = (dataset.len() / ck.recipe.batch_size) as u64;
    if batches != ck.recipe.batches_per_epoch {
        return Err(format!(
            "{} now gives {batches} batches per epoch, the saved run had {}: the data changed",
            dataset.describe(),
            ck.recipe.batches_per_epoch
        )
        .into());
    }
    let out = match &a.out {
        Some(o) => o.clone(),
        None => path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf(),
    };
    Ok(Plan {
        cfg: ck.cfg,
        recipe: ck.recipe,
        dataset,
        out,
        resume: Some(ck.state),
    })
}

fn default_out() -> PathBuf {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    PathBuf::from(format!("runs/{stamp}"))
}

/// The masking generator's seed, kept apart from the initialization's stream.
fn masking_seed(seed: u64) -> u64 {
    mae::rng::Rng::new(seed).fork(0x6d61_736b).state()
}

/// The training loop on one backend.
struct Train<'a> {
    plan: Plan,
    args: &'a Args,
}

impl OnBackend for Train<'_> {
    type Output = Result<(), Failure>;
    fn run<B: Backend>(self, b: &B) -> Self::Output {
        train(b, self.plan, self.args, None)
    }
}

/// Trains on `b`, alone (`rank` None) or as one rank of a data-parallel job, where only rank 0
/// prints, logs and saves.
fn train<B: Backend>(
    b: &B,
    plan: Plan,
    a: &Args,
    rank: Option<Rank<'_, B>>,
) -> Result<(), Failure> {
    let Plan {
        cfg,
        recipe,
        dataset,
        out,
        resume,
    } = plan;
    let ckpt_path = out.join(checkpoint::FILE_NAME);
    let shard = rank.as_ref().map_or(Shard::WHOLE, |r| Shard {
        index: r.rank,
        count: r.world_size,
    });
    let lead = shard.index == 0;
    let mut opts = recipe.train_options();
    opts.batch_size = shard.range(recipe.batch_size).len();
    let mut trainer = match &resume {
        Some(state) => Trainer::from_state(b, &cfg, state, opts)?,
        None => {
            let params = mae::init::init_params(&cfg, recipe.seed);
            Trainer::new(b, &cfg, &params, opts, masking_seed(recipe.seed))?
        }
    };
    // Data-parallel: every rank draws the masks of the whole global batch from one generator,
    // which starts where a single process's would.
    let masking_state = resume
        .as_ref()
        .map_or(masking_seed(recipe.seed), |s| s.rng_state);
    let mut replica = rank.map(|r| Replica::new(r, masking_state));
    let start_step = trainer.updates();
    let end = recipe
        .total_steps
        .min(a.stop_after.unwrap_or(u64::MAX))
        .max(start_step);
    let accum = recipe.accum_iter as u64;
    let workers = a.workers.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get().min(8))
            .unwrap_or(2)
    });
    let mut loader_opts = LoaderOptions::new(
        recipe.batch_size,
        Augment::paper(cfg.img_size, cfg.in_chans),
        recipe.seed,
    );
    loader_opts.workers = workers;
    loader_opts.shard = shard;
    let mut loader = Loader::new(dataset.clone(), loader_opts, start_step * accum)?;
    let title = format!("{} on {}", recipe.model, recipe.data);
    let resumed_at = resume.as_ref().map(|_| start_step);
    let mut log = if lead {
        Some(MetricsLog::open(&out, resumed_at, &title)?)
    } else {
        None
    };
    // Ranks other than 0 train silently.
    macro_rules! say {
        ($($t:tt)*) => { if lead { println!($($t)*) } };
    }

    say!(
        "pretrain: model {} ({} patches, {} visible), {}",
        recipe.model,
        cfg.num_patches(),
        trainer.masking().len_keep,
        dataset.describe()
    );
    say!(
        "  batch {} x {} accumulated, {} updates ({:.2} epochs of {} batches), peak lr {:.3e} \
         (blr {:.2e}), warmup {:.2} epochs, mask {}, norm-pix {}, backend {}, {} loader workers",
        recipe.batch_size,
        recipe.accum_iter,
        recipe.total_steps,
        recipe.epochs,
        recipe.batches_per_epoch,
        recipe.lr,
        recipe.blr,
        recipe.warmup_epochs,
        recipe.mask_ratio,
        cfg.norm_pix_loss,
        b.name(),
        workers
    );
    if shard.count > 1 || replica.is_some() {
        say!(
            "  data-parallel over {} rank(s) of {} images each",
            shard.count,
            opts.batch_size
        );
    }
    if start_step > 0 {
        say!(
            "  resuming at update {start_step} from {}",
            ckpt_path.display()
        );
    }
    say!("  writing to {}", out.display());

    let progress = Progress::new(a.log_every);
    let started = Instant::now();
    let mut window = Window::new();
    let mut skipped = 0u64;
    let mut last_saved = resume.as_ref().map(|s| s.updates);
    let save = |trainer: &Trainer<B>, replica: &Option<Replica<'_, B>>| -> Result<u64, Failure> {
        let mut state = trainer.state(b)?;
        if let Some(r) = replica {
            // The masks came from the replica's generator, not the trainer's.
            state.rng_state = r.masking_state();
        }
        let ck = TrainCheckpoint {
            cfg: cfg.clone(),
            recipe: recipe.clone(),
            state,
        };
        ck.save(&ckpt_path)?;
        Ok(ck.state.updates)
    };
    while trainer.updates() < end {
        let batch = loader.next()?;
        for (_, why) in &batch.skipped {
            skipped += 1;
            progress.finish_line();
            eprintln!("warning: skipped unreadable image: {why}; {skipped} skipped so far");
        }
        let lr = recipe.lr_at_batch(batch.index);
        let step = match &mut replica {
            Some(r) => r.step(&mut trainer, b, &batch.images, lr),
            None => trainer.train_step(b, &batch.images, None, lr),
        };
        let loss = match step {
            Ok(loss) => loss,
            Err(Error::NonFiniteLoss { loss, .. }) => {
                progress.finish_line();
                return Err(diverged(trainer.updates() + 1, loss, last_saved, &ckpt_path).into());
            }
            Err(e) => return Err(e.into()),
        };
        window.add(loss, recipe.batch_size);
        if trainer.pending() != 0 {
            continue;
        }
        let step = trainer.updates();
        let epoch = (step * accum) as f64 / recipe.batches_per_epoch as f64;
        if lead && (step % a.log_every.max(1) == 0 || step == end) {
            let (mean_loss, img_per_s) = window.take();
            let elapsed = started.elapsed();
            let per_step = elapsed.as_secs_f64() / (step - start_step) as f64;
            let log = log.as_mut().ok_or("bug: rank 0 without a metrics log")?;
            log.record(&Record {
                step,
                epoch,
                loss: mean_loss,
                lr,
                img_per_s,
                elapsed_s: elapsed.as_secs_f64(),
                skipped,
            })?;
            progress.show(&Status {
                step,
                total: recipe.total_steps,
                epoch,
                loss: mean_loss,
                lr,
                img_per_s,
                eta: Duration::from_secs_f64(per_step * (recipe.total_steps - step) as f64),
            });
        }
        if lead && a.save_every > 0 && step % a.save_every == 0 && step != end {
            last_saved = Some(save(&trainer, &replica)?);
        }
    }
    if !lead {
        return Ok(());
    }
    if last_saved != Some(trainer.updates()) {
        save(&trainer, &replica)?;
    }
    println!(
        "saved {} (update {} of {}) after {:.1} s",
        ckpt_path.display(),
        trainer.updates(),
        recipe.total_steps,
        started.elapsed().as_secs_f64()
    );
    if trainer.updates() < recipe.total_steps {
        println!(
            "stopped early as asked; continue with: pretrain --resume {}",
            out.display()
        );
    }
    drop(loader);
    drop(replica);
    if a.vis_images > 0 {
        let params = trainer.download(b, trainer.params())?;
        drop(trainer);
        let n = a.vis_images.min(dataset.len());
        let inputs = reconstruct::eval_inputs(dataset.as_ref(), &cfg, 0, n)?;
        let p = reconstruct::panels(b, &cfg, &params, &inputs, recipe.mask_ratio, recipe.seed)?;
        let path = out.join("reconstruction.png");
        let text = picture::save_grid(&p, &path)?;
        println!("wrote {} ({text})", path.display());
    }
    Ok(())
}

/// The message for a non-finite loss: which update, and which checkpoint is still good.
fn diverged(step: u64, loss: f32, last_saved: Option<u64>, path: &Path) -> String {
    let last = match last_saved {
        Some(s) => format!(
            "the last good checkpoint is {} (update {s}); start again with a lower --blr or a \
             longer --warmup-epochs",
            path.display()
        ),
        None => "no checkpoint was written yet; start again with a lower --blr or a longer \
                 --warmup-epochs"
            .to_string(),
    };
    format!("loss became {loss} at update {step}: training diverged; {last}")
}

/// Loss and throughput since the last log line.
struct Window {
    loss: f64,
    batches: u64,
    images: usize,
    since: Instant,
}

impl Window {
    fn new() -> Window {
        Window {
            loss: 0.0,
            batches: 0,
            images: 0,
            since: Instant::now(),
        }
    }

    fn add(&mut self, loss: f32, images: usize) {
        self.loss += loss as f64;
        self.batches += 1;
        self.images += images;
    }

    /// Mean loss and images/s of the window, and a new window.
    fn take(&mut self) -> (f64, f64) {
        let secs = self.since.elapsed().as_secs_f64().max(1e-9);
        let r = (
            self.loss / self.batches.max(1) as f64,
            self.images as f64 / secs,
        );
        *self = Window::new();
        r
    }
}

fn run(a: &Args) -> Result<(), Failure> {
    if wants_data_parallel(a) {
        #[cfg(feature = "cuda")]
        return data_parallel::run(a);
        #[cfg(not(feature = "cuda"))]
        return Err(
            "data-parallel training (--data-parallel, or WORLD_SIZE above 1) runs on \
                    --backend cuda, which this pretrain was built without: build it with \
                    `cargo build --release -p mae-examples --features cuda --bin pretrain`"
                .into(),
        );
    }
    let plan = plan(a, 1)?;
    prepare_output(&plan)?;
    backends::dispatch(&a.backend, Train { plan, args: a })?
}

/// Whether to train data-parallel: asked with the flag, or launched as one of several ranks.
fn wants_data_parallel(a: &Args) -> bool {
    let launched = std::env::var("WORLD_SIZE").is_ok_and(|w| !matches!(w.trim(), "" | "1"));
    a.data_parallel || launched
}

/// Creates the output folder and writes `run.json` (rank 0's job).
fn prepare_output(plan: &Plan) -> Result<(), Failure> {
    // An unusable output folder fails now, not after the training it would hold.
    std::fs::create_dir_all(&plan.out)
        .map_err(|e| format!("cannot create output folder {}: {e}", plan.out.display()))?;
    let stale = checkpoint::remove_stale_temporaries(&plan.out, checkpoint::FILE_NAME);
    if stale > 0 {
        println!("removed {stale} temporary file(s) of an interrupted save");
    }
    write_atomic(&plan.out.join("run.json"), plan.recipe.to_json().as_bytes())
        .map_err(|e| format!("cannot write to {}: {e}", plan.out.display()))?;
    Ok(())
}

/// One rank of a data-parallel job on GPU `LOCAL_RANK`, gradients averaged through NCCL.
#[cfg(feature = "cuda")]
mod data_parallel {
    use super::{plan, prepare_output, train, Args, Failure};
    use mae_backend_cuda::nccl::{
        exchange_id, DataParallel, NcclId, RankEnv, DEFAULT_ID_TIMEOUT, ID_FILE_ENV,
    };
    use mae_backend_cuda::CudaBackend;
    use mae_examples::parallel::Rank;
    use std::path::PathBuf;

    pub(super) fn run(a: &Args) -> Result<(), Failure> {
        if a.backend != "cuda" {
            return Err(format!(
                "data-parallel training runs on --backend cuda, not {}",
                a.backend
            )
            .into());
        }
        let env = RankEnv::from_env()?;
        let plan = plan(a, env.world_size)?;
        if plan.recipe.batch_size % env.world_size != 0 {
            return Err(format!(
                "the run's batch of {} images does not split over WORLD_SIZE={} ranks",
                plan.recipe.batch_size, env.world_size
            )
            .into());
        }
        let gpu = CudaBackend::new(env.local_rank)
            .map_err(|e| format!("rank {}: GPU {}: {e}", env.rank, env.local_rank))?;
        let id_file = std::env::var_os(ID_FILE_ENV).map(PathBuf::from);
        let id = exchange_id::<Failure>(&env, id_file.as_deref(), DEFAULT_ID_TIMEOUT, || {
            Ok(NcclId::new()?.to_bytes())
        })?;
        let mut dp = DataParallel::new(&gpu, env.rank, env.world_size, &NcclId::from_bytes(id))
            .map_err(|e| format!("rank {}: {e}", env.rank))?;
        if env.rank == 0 {
            prepare_output(&plan)?;
            // Every rank has joined: the id is used up, and a later launch with the same path
            // must not read it.
            if let Some(path) = &id_file {
                let _ = std::fs::remove_file(path);
            }
            println!(
                "data-parallel: {} rank(s), NCCL {}, rank 0 on {}, gradients averaged {}",
                env.world_size,
                dp.nccl_version(),
                gpu.device_name(),
                match dp.overlaps() {
                    true => "during the backward",
                    false => "after the backward (MAE_NCCL_OVERLAP=off)",
                }
            );
        }
        let rank = Rank {
            rank: env.rank,
            world_size: env.world_size,
            averager: &mut dp,
        };
        train(&gpu, plan, a, Some(rank)).map_err(|e| format!("rank {}: {e}", env.rank).into())
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pretrain: {e}");
            ExitCode::FAILURE
        }
    }
}
