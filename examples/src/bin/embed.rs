//! `embed`: one feature vector per image of a dataset, saved as a feature file for `linprobe`.
//!
//! Images go through the evaluation transform (resize the shorter side to the model's size,
//! centre crop, normalize; no randomness) and the frozen encoder; the feature is the cls token
//! after the final norm (the paper's linear-probing feature) or the mean of the patch tokens.
//! Two baselines need no pre-trained model: `--random-init` (an encoder as initialized, never
//! trained) and `--pixels` (the normalized pixels themselves).
//!
//! ```text
//! cargo run --release -p mae-examples --bin embed -- --checkpoint runs/cifar \
//!     --data ../shared/data/cifar10/train_10k.bin --out cifar-train.safetensors
//! cargo run --release -p mae-examples --bin embed -- --pixels --model tiny32 \
//!     --data ../shared/data/cifar10/test.bin --out cifar-test-pixels.safetensors
//! ```

use clap::{ArgGroup, Parser, ValueEnum};
use mae::backend::{Backend, OnBackend};
use mae::embed::{Embedder, Pool};
use mae::params::Encoder;
use mae::Config;
use mae_examples::data::{self, Augment, InOrder};
use mae_examples::features::{FeatureSet, FeatureSource};
use mae_examples::progress::human;
use mae_examples::{backends, checkpoint, models};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

type Failure = Box<dyn std::error::Error + Send + Sync>;

/// Features of every image of a dataset, from a pre-trained encoder, a random-init encoder, or
/// the pixels, saved as a safetensors feature file.
#[derive(Parser, Debug)]
#[command(name = "embed", version)]
#[command(group(ArgGroup::new("encoder").required(true).args(["checkpoint", "random_init", "pixels"])))]
struct Args {
    /// Dataset: `synthetic[:N[:SIZE]]`, a folder of class subfolders of JPEG/PNG files, a
    /// CIFAR-10 `.bin` file, or an MNIST `idx3-ubyte[.gz]` file
    #[arg(long)]
    data: String,
    /// The feature file to write (safetensors)
    #[arg(long)]
    out: PathBuf,
    /// The encoder of this checkpoint file (full or encoder-only) or run folder
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// A randomly initialized encoder of `--model` (a baseline)
    #[arg(long)]
    random_init: bool,
    /// The normalized pixels at `--model`'s image size and channels (a baseline; no backend)
    #[arg(long)]
    pixels: bool,
    /// The model (preset, `demo`, or `.json`): the architecture of `--random-init`, the image
    /// size of `--pixels`, or the configuration of a checkpoint that stores none [default: demo,
    /// or the checkpoint's]
    #[arg(long)]
    model: Option<String>,
    /// Seed of `--random-init`
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Feature of an image: the cls token (the paper's) or the mean of the patch tokens
    #[arg(long, value_enum, default_value_t = PoolArg::Cls, conflicts_with = "pixels")]
    pool: PoolArg,
    /// Images per encoder call
    #[arg(long, default_value_t = 256)]
    batch_size: usize,
    /// Compute backend
    #[arg(long, default_value_t = backends::default_name().to_string())]
    backend: String,
    /// Threads decoding images [default: one per core, at most 8]
    #[arg(long)]
    workers: Option<usize>,
    /// Embed only the first N images
    #[arg(long)]
    limit: Option<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum PoolArg {
    Cls,
    Mean,
}

impl PoolArg {
    fn pool(self) -> Pool {
        match self {
            PoolArg::Cls => Pool::Cls,
            PoolArg::Mean => Pool::Mean,
        }
    }
    fn name(self) -> &'static str {
        match self {
            PoolArg::Cls => "cls",
            PoolArg::Mean => "mean",
        }
    }
}

/// Prints a progress line every few seconds and at the end.
struct Meter {
    start: Instant,
    last: Instant,
    total: usize,
}

impl Meter {
    fn new(total: usize) -> Meter {
        let now = Instant::now();
        Meter {
            start: now,
            last: now,
            total,
        }
    }
    fn done(&mut self, done: usize) {
        let now = Instant::now();
        if now - self.last < Duration::from_secs(2) && done < self.total {
            return;
        }
        self.last = now;
        let rate = done as f64 / self.start.elapsed().as_secs_f64().max(1e-9);
        let left = (self.total - done) as f64 / rate.max(1e-9);
        eprintln!(
            "embedded {done}/{} images, {rate:.0} img/s, ETA {}",
            self.total,
            human(Duration::from_secs_f64(left))
        );
    }
    fn rate(&self) -> f64 {
        self.total as f64 / self.start.elapsed().as_secs_f64().max(1e-9)
    }
}

/// The encoder's features of every image, on one backend.
struct Embed<'a> {
    cfg: Config,
    encoder: Encoder<Vec<f32>>,
    pool: Pool,
    images: InOrder<'a>,
}

impl OnBackend for Embed<'_> {
    type Output = Result<(Vec<f32>, f64), Failure>;
    fn run<B: Backend>(self, b: &B) -> Self::Output {
        let batch = self.images.batch.min(self.images.n);
        let mut embedder = Embedder::new(b, &self.cfg, &self.encoder, batch)?;
        let mut features = Vec::with_capacity(self.images.n * self.cfg.embed_dim);
        let mut meter = Meter::new(self.images.n);
        self.images.for_each(|first, imgs| {
            let f = embedder.pooled(b, imgs, self.pool)?;
            features.extend(f);
            meter.done(first + imgs.len() / self.images.augment.output_len());
            Ok(())
        })?;
        Ok((features, meter.rate()))
    }
}

/// The encoder and configuration of `--checkpoint` or `--random-init`, with its description.
fn encoder(a: &Args) -> Result<(Config, Encoder<Vec<f32>>, String), Failure> {
    let preset = a.model.as_deref().map(models::resolve).transpose()?;
    if let Some(given) = &a.checkpoint {
        return Ok(checkpoint::load_encoder(given, preset.as_ref())?);
    }
    let cfg = preset.unwrap_or_else(models::demo);
    let enc = mae::init::init_params(&cfg, a.seed).encoder;
    Ok((cfg, enc, format!("random-init (seed {})", a.seed)))
}

fn run(a: &Args) -> Result<(), Failure> {
    if a.batch_size == 0 {
        return Err("--batch-size must be at least 1".into());
    }
    let started = Instant::now();
    // The configuration sets the image size and channels; pixels need no encoder.
    let (cfg, encoder, what) = if a.pixels {
        let cfg = a
            .model
            .as_deref()
            .map_or(Ok(models::demo()), models::resolve)?;
        (cfg, None, "pixels".to_string())
    } else {
        let (cfg, enc, what) = encoder(a)?;
        (cfg, Some(enc), what)
    };
    let ds = data::open(&a.data, cfg.in_chans)?;
    let n = a.limit.map_or(ds.len(), |l| l.min(ds.len()));
    if n == 0 {
        return Err("--limit 0 leaves no image to embed".into());
    }
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    let images = InOrder {
        ds: ds.as_ref(),
        augment: Augment::eval(cfg.img_size, cfg.in_chans),
        n,
        batch: a.batch_size,
        workers: a.workers.unwrap_or(cores.min(8)).max(1),
    };
    let (features, dim, rate, source) = match encoder {
        None => {
            let dim = images.augment.output_len();
            let mut features = Vec::with_capacity(n * dim);
            let mut meter = Meter::new(n);
            images.for_each(|first, imgs| {
                features.extend_from_slice(imgs);
                meter.done(first + imgs.len() / dim);
                Ok(())
            })?;
            let source = FeatureSource::pixels(&ds.describe());
            (features, dim, meter.rate(), source)
        }
        Some(encoder) => {
            let source = FeatureSource {
                encoder: what.clone(),
                pool: a.pool.name().into(),
                dataset: ds.describe(),
                model: cfg.to_json(),
            };
            let dim = cfg.embed_dim;
            let job = Embed {
                cfg,
                encoder,
                pool: a.pool.pool(),
                images,
            };
            let (features, rate) = backends::dispatch(&a.backend, job)??;
            (features, dim, rate, source)
        }
    };
    let labels = (0..n).map(|i| ds.label(i)).collect();
    let names = (0..n).map(|i| ds.name(i)).collect();
    let set = FeatureSet::new(features, dim, labels, names, ds.classes(), source)?;
    set.save(&a.out)?;
    println!(
        "embed: wrote {}: {n} features of dimension {dim} ({what}, pool {}) of {}",
        a.out.display(),
        set.source.pool,
        ds.describe()
    );
    println!(
        "embed: {n} images in {:.1} s, {rate:.0} img/s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("embed: {e}");
            ExitCode::FAILURE
        }
    }
}
