//! `visualize`: what a pre-trained MAE makes of masked images, as the paper's Figures 2-4 show
//! it. For each image a row of original | masked | reconstruction | reconstruction with the
//! visible patches pasted back, saved as one PNG grid.
//!
//! ```text
//! cargo run --release -p mae-examples --bin visualize -- --checkpoint runs/cifar \
//!     --data ../shared/data/cifar10/test.bin --images 8 --mask-ratio 0.75 --out cifar-test.png
//! ```

use clap::Parser;
use mae::backend::{Backend, OnBackend};
use mae::params::MaeParams;
use mae::weights::WeightsFile;
use mae::Config;
use mae_examples::data;
use mae_examples::{backends, checkpoint, models, picture, reconstruct};
use std::path::PathBuf;
use std::process::ExitCode;

type Failure = Box<dyn std::error::Error>;

/// Reconstructions of masked images by a pre-trained MAE, as a PNG grid.
#[derive(Parser, Debug)]
#[command(name = "visualize", version)]
struct Args {
    /// A checkpoint file (any full MAE checkpoint with the official tensor names) or a run
    /// folder holding `checkpoint.safetensors`
    #[arg(long)]
    checkpoint: PathBuf,
    /// Images to show: a folder, a CIFAR-10 `.bin`, an MNIST idx file, or `synthetic`
    #[arg(long, default_value = "synthetic")]
    data: String,
    /// How many images (rows)
    #[arg(long, default_value_t = 8)]
    images: usize,
    /// Index of the first image in the dataset
    #[arg(long, default_value_t = 0)]
    first: usize,
    /// Fraction of patches removed (any value in [0, 1))
    #[arg(long, default_value_t = 0.75)]
    mask_ratio: f64,
    /// Seed of the masking
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The model (preset name or `.json` file), for checkpoints without a stored configuration
    #[arg(long)]
    model: Option<String>,
    /// The PNG to write
    #[arg(long, default_value = "reconstruction.png")]
    out: PathBuf,
    /// Compute backend
    #[arg(long, default_value_t = backends::default_name().to_string())]
    backend: String,
}

/// The reconstruction on one backend.
struct Show {
    cfg: Config,
    params: MaeParams<Vec<f32>>,
    inputs: reconstruct::Inputs,
    mask_ratio: f64,
    seed: u64,
}

impl OnBackend for Show {
    type Output = mae::Result<reconstruct::Panels>;
    fn run<B: Backend>(self, b: &B) -> Self::Output {
        reconstruct::panels(
            b,
            &self.cfg,
            &self.params,
            &self.inputs,
            self.mask_ratio,
            self.seed,
        )
    }
}

fn run(a: &Args) -> Result<(), Failure> {
    let path = if a.checkpoint.is_dir() {
        a.checkpoint.join(checkpoint::FILE_NAME)
    } else {
        a.checkpoint.clone()
    };
    let bytes = std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let file = WeightsFile::parse(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    let preset = a.model.as_deref().map(models::resolve).transpose()?;
    let cfg = file.config_or(preset.as_ref()).map_err(|e| {
        format!(
            "{}: {e} (give --model for files without one)",
            path.display()
        )
    })?;
    let params = file
        .mae(&cfg, "")
        .map_err(|e| format!("{}: {e}", path.display()))?;

    let dataset = data::open(&a.data, cfg.in_chans)?;
    let end = a.first.saturating_add(a.images);
    if a.images == 0 || end > dataset.len() {
        return Err(format!(
            "--first {} --images {} asks for images past the end of {}",
            a.first,
            a.images,
            dataset.describe()
        )
        .into());
    }
    let job = Show {
        inputs: reconstruct::eval_inputs(dataset.as_ref(), &cfg, a.first, a.images)?,
        cfg,
        params,
        mask_ratio: a.mask_ratio,
        seed: a.seed,
    };
    let panels = backends::dispatch(&a.backend, job)??;
    let text = picture::save_grid(&panels, &a.out)
        .map_err(|e| format!("cannot write {}: {e}", a.out.display()))?;
    println!(
        "wrote {}: {} images of {}",
        a.out.display(),
        a.images,
        dataset.describe()
    );
    println!("{text}");
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("visualize: {e}");
            ExitCode::FAILURE
        }
    }
}
