//! Checkpoint files, written atomically: a crash or a kill during a save leaves the previous
//! checkpoint intact, never a half-written file.
//!
//! A pre-training checkpoint ([`TrainCheckpoint`]) is one safetensors file: the weights under the
//! official names (so `load_mae` and `load_encoder` read it like any MAE checkpoint), the AdamW
//! moments as `optimizer.exp_avg.<name>` and `optimizer.exp_avg_sq.<name>` (PyTorch's names for
//! them), and in the metadata the configuration, the update count, the masking generator's state
//! and the run's [`Recipe`]. The data order and augmentation are functions of the seed and the
//! batch number, so these few numbers continue a run bitwise.

use crate::recipe::Recipe;
use mae::params::{mae_specs, Encoder};
use mae::train::TrainState;
use mae::weights::{save_tensors, WeightsError, WeightsFile};
use mae::Config;
use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// The `format` metadata value of a pre-training checkpoint.
pub const FORMAT: &str = "mae-pretrain-checkpoint-v1";
/// Prefix of the AdamW first moments.
pub const EXP_AVG: &str = "optimizer.exp_avg.";
/// Prefix of the AdamW second moments.
pub const EXP_AVG_SQ: &str = "optimizer.exp_avg_sq.";
/// The checkpoint's file name inside a run folder.
pub const FILE_NAME: &str = "checkpoint.safetensors";

/// Writes `bytes` to `path` through a temporary file in the same folder, flushed to disk and then
/// renamed over `path` (an atomic replace on POSIX file systems).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "checkpoint path has no file name",
        )
    })?;
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        // Persist the rename itself.
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Removes temporary files that [`write_atomic`] left in `dir` for `name` when a process was
/// killed mid-save (they never replace a good file, but would pile up); returns how many.
pub fn remove_stale_temporaries(dir: &Path, name: &str) -> usize {
    let prefix = format!(".{name}.tmp");
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .filter(|e| fs::remove_file(e.path()).is_ok())
        .count()
}

/// Everything a run needs to continue exactly where it was saved.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainCheckpoint {
    /// The model.
    pub cfg: Config,
    /// The run's settings.
    pub recipe: Recipe,
    /// Weights, moments, update count, masking generator.
    pub state: TrainState,
}

/// Why a checkpoint could not be written or read.
#[derive(Debug)]
pub enum CheckpointError {
    /// Reading or writing the file failed.
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        err: io::Error,
    },
    /// The file's contents are not a usable checkpoint.
    Contents {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        err: WeightsError,
    },
    /// A weights file without optimizer state or run recipe: it can be used for pictures and
    /// embeddings, but a run cannot continue from it.
    NotResumable {
        /// The file.
        path: PathBuf,
        /// What is missing.
        missing: String,
    },
}

impl fmt::Display for CheckpointError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CheckpointError::Io { path, err } => write!(f, "{}: {err}", path.display()),
            CheckpointError::Contents { path, err } => write!(f, "{}: {err}", path.display()),
            CheckpointError::NotResumable { path, missing } => write!(
                f,
                "{}: not a pre-training checkpoint ({missing}); a run can only resume from the \
                 {FILE_NAME} that pretrain writes",
                path.display()
            ),
        }
    }
}

impl std::error::Error for CheckpointError {}

impl TrainCheckpoint {
    /// Serializes the checkpoint.
    pub fn to_bytes(&self) -> Result<Vec<u8>, WeightsError> {
        let specs = mae_specs(&self.cfg);
        let groups = [
            ("", &self.state.params),
            (EXP_AVG, &self.state.m),
            (EXP_AVG_SQ, &self.state.v),
        ];
        let tensors = groups.into_iter().flat_map(|(prefix, values)| {
            specs.tensors().zip(values.tensors()).map(move |(s, t)| {
                (
                    format!("{prefix}{}", s.name),
                    s.shape.as_slice(),
                    t.as_slice(),
                )
            })
        });
        let (step, rng, recipe) = (
            self.state.updates.to_string(),
            self.state.rng_state.to_string(),
            self.recipe.to_json(),
        );
        save_tensors(
            &self.cfg,
            tensors,
            &[
                ("format", FORMAT),
                ("step", &step),
                ("rng_state", &rng),
                ("recipe", &recipe),
            ],
        )
    }

    /// Writes the checkpoint to `path` atomically.
    pub fn save(&self, path: &Path) -> Result<(), CheckpointError> {
        let bytes = self.to_bytes().map_err(|err| CheckpointError::Contents {
            path: path.to_path_buf(),
            err,
        })?;
        write_atomic(path, &bytes).map_err(|err| CheckpointError::Io {
            path: path.to_path_buf(),
            err,
        })
    }

    /// Reads a checkpoint written by [`TrainCheckpoint::save`]; every tensor is checked for
    /// shape and finiteness.
    pub fn load(path: &Path) -> Result<TrainCheckpoint, CheckpointError> {
        let bytes = fs::read(path).map_err(|err| CheckpointError::Io {
            path: path.to_path_buf(),
            err,
        })?;
        let contents = |err| CheckpointError::Contents {
            path: path.to_path_buf(),
            err,
        };
        let not_resumable = |missing: &str| CheckpointError::NotResumable {
            path: path.to_path_buf(),
            missing: missing.to_string(),
        };
        let file = WeightsFile::parse(&bytes).map_err(contents)?;
        if file.metadata("format") != Some(FORMAT) {
            return Err(not_resumable("no `format` metadata of this version"));
        }
        let number = |key: &str| -> Result<u64, CheckpointError> {
            file.metadata(key)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| contents(WeightsError::Metadata(format!("bad or missing `{key}`"))))
        };
        let recipe = file
            .metadata("recipe")
            .ok_or_else(|| not_resumable("no run recipe"))
            .and_then(|json| {
                Recipe::from_json(json).map_err(|e| contents(WeightsError::Metadata(e)))
            })?;
        let cfg = file.config().map_err(contents)?;
        let state = TrainState {
            params: file.mae(&cfg, "").map_err(contents)?,
            m: file.mae(&cfg, EXP_AVG).map_err(contents)?,
            v: file.mae(&cfg, EXP_AVG_SQ).map_err(contents)?,
            updates: number("step")?,
            rng_state: number("rng_state")?,
        };
        Ok(TrainCheckpoint { cfg, recipe, state })
    }
}

/// The file a `finetune` run folder holds its classifier in.
pub const CLASSIFIER_FILE: &str = "classifier.safetensors";

/// The encoder of a checkpoint (a run folder or a safetensors file: a pre-training checkpoint,
/// an encoder-only file, or a fine-tuned classifier), with its configuration (from the file, or
/// `model` for files without one) and a description for logs and metadata.
pub fn load_encoder(
    given: &Path,
    model: Option<&Config>,
) -> Result<(Config, Encoder<Vec<f32>>, String), String> {
    // A pre-training run folder holds checkpoint.safetensors, a fine-tuning one
    // classifier.safetensors.
    let path = match given.is_dir() {
        true if !given.join(FILE_NAME).exists() && given.join(CLASSIFIER_FILE).exists() => {
            given.join(CLASSIFIER_FILE)
        }
        true => given.join(FILE_NAME),
        false => given.to_path_buf(),
    };
    let bytes = std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let file = WeightsFile::parse(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    let cfg = file.config_or(model).map_err(|e| {
        format!(
            "{}: {e} (give --model for files without one)",
            path.display()
        )
    })?;
    let enc = file
        .encoder(&cfg, "")
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((cfg, enc, path.display().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_whole_files_and_leaves_no_temporaries() {
        let dir = std::env::temp_dir().join(format!("mae-ckpt-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("model.safetensors");
        write_atomic(&path, b"first").unwrap();
        write_atomic(&path, b"second version").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second version");
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "temporary files left: {names:?}");
        // A folder that does not exist is an error, not a panic, and creates nothing.
        assert!(write_atomic(&dir.join("missing/x.safetensors"), b"x").is_err());
        fs::remove_dir_all(&dir).unwrap();
    }

    fn small_checkpoint() -> TrainCheckpoint {
        let cfg = Config {
            depth: 1,
            decoder_depth: 1,
            ..Config::preset("tiny32").unwrap()
        };
        let params = mae::init::init_params(&cfg, 3);
        let mut rng = mae::rng::Rng::new(9);
        let moments = |rng: &mut mae::rng::Rng| {
            params
                .clone()
                .try_map(|t| Ok::<_, ()>(t.iter().map(|_| rng.normal() as f32).collect()))
                .unwrap()
        };
        let (m, v) = (moments(&mut rng), moments(&mut rng));
        TrainCheckpoint {
            recipe: crate::recipe::Recipe {
                model: "tiny32".into(),
                data: "synthetic".into(),
                batch_size: 4,
                accum_iter: 1,
                blr: 1.5e-4,
                lr: 1e-4,
                min_lr: 0.0,
                warmup_epochs: 1.0,
                epochs: 2.0,
                batches_per_epoch: 5,
                total_steps: 10,
                mask_ratio: 0.75,
                mask_sampling: Default::default(),
                weight_decay: 0.05,
                beta1: 0.9,
                beta2: 0.95,
                seed: 1,
            },
            state: TrainState {
                params,
                m,
                v,
                updates: 7,
                rng_state: u64::MAX - 5,
            },
            cfg,
        }
    }

    #[test]
    fn training_checkpoints_round_trip_bitwise() {
        let dir = std::env::temp_dir().join(format!("mae-trainckpt-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join(FILE_NAME);
        let ck = small_checkpoint();
        ck.save(&path).unwrap();
        let back = TrainCheckpoint::load(&path).unwrap();
        let bits = |c: &TrainCheckpoint| {
            [&c.state.params, &c.state.m, &c.state.v]
                .iter()
                .flat_map(|p| {
                    p.tensors()
                        .flatten()
                        .map(|x| x.to_bits())
                        .collect::<Vec<_>>()
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(bits(&back), bits(&ck));
        assert_eq!(back, ck);
        // The same file is an ordinary MAE checkpoint for everything else.
        let (cfg, params) = mae::weights::load_mae(&fs::read(&path).unwrap(), None).unwrap();
        assert_eq!((cfg, params), (ck.cfg.clone(), ck.state.params.clone()));

        // A weights-only file cannot be resumed from, and says why.
        let plain = dir.join("weights.safetensors");
        write_atomic(
            &plain,
            &mae::weights::save_mae(&ck.cfg, &ck.state.params, &[]).unwrap(),
        )
        .unwrap();
        let e = TrainCheckpoint::load(&plain).unwrap_err();
        assert!(matches!(e, CheckpointError::NotResumable { .. }), "{e}");
        // A truncated file is a contents error naming the file.
        let bytes = fs::read(&path).unwrap();
        fs::write(&plain, &bytes[..bytes.len() / 2]).unwrap();
        let e = TrainCheckpoint::load(&plain).unwrap_err();
        assert!(matches!(e, CheckpointError::Contents { .. }), "{e}");
        assert!(e.to_string().contains("weights.safetensors"), "{e}");
        let e = TrainCheckpoint::load(&dir.join("missing")).unwrap_err();
        assert!(matches!(e, CheckpointError::Io { .. }), "{e}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
