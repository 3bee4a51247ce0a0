//! `bench --case tiny32|small64|base224|PRESET [--backend NAME] [--seconds S] [--phase P]`:
//! training and embedding throughput of one case, printed as one JSON line. Cases (mask 0.75,
//! norm-pix loss, AdamW) are the presets of the same names with the batch sizes of DESIGN.md; any
//! other preset (`mae_vit_large_patch16`, ...) runs at batch 8 unless `--batch` says otherwise.
//! `--phase train` or `--phase embed` runs one of the two phases (default `both`), so that a
//! backend's profile (`MAE_CUDA_PROFILE`) shows one of them alone.
//!
//! `bench --loader SPEC [--img-size 224] [--workers 2] [--batch N] [--channels 3] [--seconds S]`:
//! the data loader alone (decoding, RandomResizedCrop, flip, normalization) on the dataset SPEC
//! (as `pretrain --data`), printed as one JSON line with `loader_img_s`.
//!
//! `bench --mask-tokens MODEL [--batch N] [--seconds S] [--backend NAME]`: the paper's Table 2,
//! the wall-clock time of a pre-training step (mask 0.75) with the encoder seeing only the
//! visible patches against the encoder seeing mask tokens too, on MODEL (`demo` or a preset such
//! as `mae_vit_large_patch16`), printed as one JSON line with the speedup.
//!
//! The case line also carries `train_peak_rss_mb`: the process's peak resident memory (Linux
//! `VmHWM`) measured after the training phase, before the embedding phase.

use mae::backend::{Backend, OnBackend};
use mae::embed::{Embedder, Pool};
use mae::masking::keep_count;
use mae::train::{TrainOptions, Trainer};
use mae::Config;
use mae_examples::data::{self, Augment, Loader, LoaderOptions};
use mae_examples::{backends, flops, models, synthetic};
use std::process::ExitCode;
use std::time::Instant;

const USAGE: &str =
    "usage: bench --case tiny32|small64|base224|PRESET [--backend NAME] [--seconds S] [--batch N]
                   [--phase train|embed|both]
       bench --loader SPEC [--img-size N] [--workers N] [--batch N] [--channels N] [--seconds S]
       bench --mask-tokens MODEL [--backend NAME] [--seconds S] [--batch N]";

/// Runs `f` twice to warm up, then repeatedly until `seconds` have passed (at least twice);
/// returns calls per second and the calls made, warm-up included. Two, because the CPU backend
/// packs a weight matrix it sees read unchanged into a panel on the second call (`PackCache`),
/// so the embedding's steady state starts at the third; `bench/torch_reference.py` warms up
/// the same way.
fn rate(seconds: f64, mut f: impl FnMut() -> mae::Result<()>) -> mae::Result<(f64, u32)> {
    f()?;
    f()?;
    let start = Instant::now();
    let mut calls = 0u32;
    while calls < 2 || start.elapsed().as_secs_f64() < seconds {
        f()?;
        calls += 1;
    }
    Ok((calls as f64 / start.elapsed().as_secs_f64(), calls + 2))
}

/// Which phases of a case run.
#[derive(Clone, Copy, PartialEq)]
enum Phase {
    Train,
    Embed,
    Both,
}

impl Phase {
    fn parse(s: &str) -> Option<Phase> {
        match s {
            "train" => Some(Phase::Train),
            "embed" => Some(Phase::Embed),
            "both" => Some(Phase::Both),
            _ => None,
        }
    }

    fn trains(self) -> bool {
        self != Phase::Embed
    }

    fn embeds(self) -> bool {
        self != Phase::Train
    }
}

/// One case on one backend.
struct Bench<'a> {
    case: &'a str,
    batch: Option<usize>,
    seconds: f64,
    phase: Phase,
}

impl OnBackend for Bench<'_> {
    type Output = Result<String, Box<dyn std::error::Error>>;
    fn run<B: Backend>(self, b: &B) -> Self::Output {
        run(b, &self)
    }
}

fn run<B: Backend>(b: &B, bench: &Bench) -> Result<String, Box<dyn std::error::Error>> {
    let (case, seconds) = (bench.case, bench.seconds);
    let cfg = Config::preset(case)?;
    let batch = bench.batch.unwrap_or(match case {
        "tiny32" => 64,
        "small64" => 32,
        _ => 8,
    });
    let params = mae::init::init_params(&cfg, 0);
    let imgs = synthetic::batch(0, 0, batch, cfg.in_chans, cfg.img_size);
    let mut line = format!(
        "{{\"case\":\"{case}\",\"backend\":\"{}\",\"batch\":{batch}",
        b.name()
    );

    if bench.phase.trains() {
        let mut trainer = Trainer::new(b, &cfg, &params, TrainOptions::new(batch), 0)?;
        let (train_steps, steps_run) = rate(seconds, || {
            trainer.train_step(b, &imgs, None, 1e-4).map(drop)
        })?;
        let train_img_s = train_steps * batch as f64;
        let keep = keep_count(cfg.num_patches(), 0.75);
        // The steps run (warm-up included) let a device profile's total be read per step.
        line += &format!(
            ",\"train_img_s\":{train_img_s:.3},\"train_gflop_s\":{:.2},\"train_steps_run\":{steps_run}",
            train_img_s * flops::mae_train(&cfg, keep) / 1e9
        );
        // Peak resident memory so far: the process's high-water mark after the training phase,
        // read before the embedding phase starts (Linux only; absent elsewhere).
        if let Some(mb) = peak_rss_mb() {
            line += &format!(",\"train_peak_rss_mb\":{mb:.1}");
        }
    }
    if bench.phase.embeds() {
        let mut embedder = Embedder::new(b, &cfg, &params.encoder, batch)?;
        let (embed_calls, _) = rate(seconds, || embedder.pooled(b, &imgs, Pool::Cls).map(drop))?;
        let embed_img_s = embed_calls * batch as f64;
        line += &format!(
            ",\"embed_img_s\":{embed_img_s:.3},\"embed_gflop_s\":{:.2}",
            embed_img_s * flops::encoder_forward(&cfg, cfg.num_patches()) / 1e9
        );
    }
    Ok(line + "}")
}

/// Table 2: seconds per pre-training step without and with mask tokens in the encoder.
struct MaskTokens {
    cfg: Config,
    model: String,
    batch: usize,
    seconds: f64,
}

impl OnBackend for MaskTokens {
    type Output = Result<String, Box<dyn std::error::Error>>;
    fn run<B: Backend>(self, b: &B) -> Self::Output {
        let imgs = synthetic::batch(0, 0, self.batch, self.cfg.in_chans, self.cfg.img_size);
        let mut step_s = [0.0; 2];
        for (with, s) in [false, true].into_iter().zip(&mut step_s) {
            let cfg = Config {
                encoder_mask_tokens: with,
                ..self.cfg.clone()
            };
            let params = mae::init::init_params(&cfg, 0);
            let opts = TrainOptions::new(self.batch);
            let mut trainer = Trainer::new(b, &cfg, &params, opts, 0)?;
            let (steps, _) = rate(self.seconds, || {
                trainer.train_step(b, &imgs, None, 1e-4).map(drop)
            })?;
            *s = 1.0 / steps;
        }
        Ok(format!(
            "{{\"model\":\"{}\",\"backend\":\"{}\",\"batch\":{},\"step_s_encoder_visible_only\":{:.4},\
\"step_s_encoder_with_mask_tokens\":{:.4},\"speedup\":{:.2}}}",
            self.model,
            b.name(),
            self.batch,
            step_s[0],
            step_s[1],
            step_s[1] / step_s[0]
        ))
    }
}

/// The process's peak resident set size in MiB (`VmHWM` of `/proc/self/status`), where the
/// system reports one.
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Settings of the loader benchmark.
struct LoaderBench {
    spec: String,
    img_size: usize,
    workers: usize,
    batch: Option<usize>,
    channels: usize,
    seconds: f64,
}

/// Images per second of the loader alone: one batch to warm up (workers started, first files
/// read), then batches until `seconds` have passed.
fn run_loader(b: &LoaderBench) -> Result<String, data::DataError> {
    let ds = data::open(&b.spec, b.channels)?;
    let batch = b.batch.unwrap_or(ds.len().min(32));
    let mut opts = LoaderOptions::new(batch, Augment::paper(b.img_size, b.channels), 0);
    opts.workers = b.workers;
    let mut loader = Loader::new(ds, opts, 0)?;
    loader.next()?;
    let start = Instant::now();
    let mut images = 0usize;
    while images == 0 || start.elapsed().as_secs_f64() < b.seconds {
        images += loader.next()?.labels.len();
    }
    let rate = images as f64 / start.elapsed().as_secs_f64();
    let spec = b.spec.replace('\\', "\\\\").replace('"', "\\\"");
    Ok(format!(
        "{{\"case\":\"loader\",\"data\":\"{spec}\",\"img_size\":{},\"workers\":{},\"batch\":{batch},\
\"loader_img_s\":{rate:.1}}}",
        b.img_size, b.workers
    ))
}

fn main() -> ExitCode {
    let (mut case, mut backend, mut seconds, mut batch) =
        (None, backends::default_name().to_string(), 10.0, None);
    let (mut loader, mut img_size, mut workers, mut channels) = (None, 224, 2, 3);
    let mut mask_tokens = None;
    let mut phase = Phase::Both;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let Some(value) = args.next() else {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        };
        let count = |value: &str| -> Result<usize, ExitCode> {
            value.parse().map_err(|e| {
                eprintln!("{flag} {value}: {e}");
                ExitCode::from(2)
            })
        };
        match flag.as_str() {
            "--case" => case = Some(value),
            "--phase" => match Phase::parse(&value) {
                Some(p) => phase = p,
                None => {
                    eprintln!("--phase {value}: expected train, embed or both");
                    return ExitCode::from(2);
                }
            },
            "--backend" => backend = value,
            "--loader" => loader = Some(value),
            "--mask-tokens" => mask_tokens = Some(value),
            "--img-size" => match count(&value) {
                Ok(n) => img_size = n,
                Err(code) => return code,
            },
            "--workers" => match count(&value) {
                Ok(n) => workers = n,
                Err(code) => return code,
            },
            "--channels" => match count(&value) {
                Ok(n) => channels = n,
                Err(code) => return code,
            },
            "--seconds" => match value.parse() {
                Ok(s) => seconds = s,
                Err(e) => {
                    eprintln!("--seconds {value}: {e}");
                    return ExitCode::from(2);
                }
            },
            "--batch" => match value.parse() {
                Ok(n) => batch = Some(n),
                Err(e) => {
                    eprintln!("--batch {value}: {e}");
                    return ExitCode::from(2);
                }
            },
            _ => {
                eprintln!("unknown flag {flag}\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    if let Some(model) = mask_tokens {
        let cfg = match models::resolve(&model) {
            Ok(cfg) => cfg,
            Err(e) => {
                eprintln!("bench: {e}");
                return ExitCode::from(2);
            }
        };
        let job = MaskTokens {
            cfg,
            model,
            batch: batch.unwrap_or(8),
            seconds,
        };
        return report(backends::dispatch(&backend, job));
    }
    if let Some(spec) = loader {
        let job = LoaderBench {
            spec,
            img_size,
            workers,
            batch,
            channels,
            seconds,
        };
        return match run_loader(&job) {
            Ok(line) => {
                println!("{line}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("bench: {e}");
                ExitCode::FAILURE
            }
        };
    }
    // The three cases of DESIGN.md, or any preset (the paper's models, for their memory).
    let Some(case) = case.filter(|c| Config::preset(c).is_ok()) else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let job = Bench {
        case: &case,
        batch,
        seconds,
        phase,
    };
    report(backends::dispatch(&backend, job))
}

/// Prints a benchmark's JSON line, or why there is none.
fn report(
    result: Result<Result<String, Box<dyn std::error::Error>>, backends::BackendChoiceError>,
) -> ExitCode {
    let result = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("bench: {e}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bench: {e}");
            ExitCode::FAILURE
        }
    }
}
