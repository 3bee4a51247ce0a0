//! How the processes of a data-parallel job find their place and each other, without a network
//! library: the launcher's environment (torchrun's names) says which rank a process is, and rank
//! 0 hands the NCCL unique id to the others through a file on a filesystem they share.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The environment variable naming the file through which rank 0 passes the NCCL unique id.
pub const ID_FILE_ENV: &str = "MAE_NCCL_ID_FILE";

/// Bytes in an NCCL unique id.
pub const ID_BYTES: usize = 128;

/// How long ranks other than 0 wait for the id file by default.
pub const DEFAULT_ID_TIMEOUT: Duration = Duration::from_secs(300);

/// Where this process stands in the job, from `RANK`, `WORLD_SIZE` and `LOCAL_RANK` (the names
/// torchrun and `scripts/launch-dp.sh` set).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RankEnv {
    /// This process's rank, `0..world_size`; rank 0 draws the NCCL id and writes the outputs.
    pub rank: usize,
    /// Processes in the job, one per GPU.
    pub world_size: usize,
    /// The GPU ordinal on this machine (`LOCAL_RANK`; `RANK` when unset, as on one machine).
    pub local_rank: usize,
}

/// Why the launch environment or the id exchange failed.
#[derive(Debug)]
pub enum RendezvousError {
    /// A variable the job needs is not set.
    Missing {
        /// The variable.
        var: &'static str,
        /// Why it is needed.
        why: &'static str,
    },
    /// A variable is set but not a valid number.
    Invalid {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
    },
    /// `RANK` is not below `WORLD_SIZE`.
    RankOutOfRange {
        /// `RANK`.
        rank: usize,
        /// `WORLD_SIZE`.
        world_size: usize,
    },
    /// Rank 0 did not publish the id within the timeout.
    Timeout {
        /// The id file waited for.
        path: PathBuf,
        /// How long this rank waited.
        waited: Duration,
    },
    /// The id file holds something else than an id.
    BadIdFile {
        /// The file.
        path: PathBuf,
        /// Its length in bytes.
        len: usize,
    },
    /// Reading or writing the id file failed.
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        error: std::io::Error,
    },
}

impl fmt::Display for RendezvousError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RendezvousError::Missing { var, why } => write!(f, "{var} is not set: {why}"),
            RendezvousError::Invalid { var, value } => {
                write!(f, "{var}={value:?} is not a non-negative integer")
            }
            RendezvousError::RankOutOfRange { rank, world_size } => write!(
                f,
                "RANK={rank} is out of range for WORLD_SIZE={world_size} (ranks are 0..{world_size})"
            ),
            RendezvousError::Timeout { path, waited } => write!(
                f,
                "no NCCL id from rank 0 at {} after {:.0} s: did rank 0 start, with the same \
                 {ID_FILE_ENV} on a filesystem both ranks see?",
                path.display(),
                waited.as_secs_f64()
            ),
            RendezvousError::BadIdFile { path, len } => write!(
                f,
                "{} holds {len} bytes, not a {ID_BYTES}-byte NCCL id: a stale or foreign file? \
                 use a fresh {ID_FILE_ENV} per launch",
                path.display()
            ),
            RendezvousError::Io { path, error } => write!(f, "{}: {error}", path.display()),
        }
    }
}

impl std::error::Error for RendezvousError {}

impl RankEnv {
    /// One process alone: rank 0 of 1 on GPU 0.
    pub const SINGLE: RankEnv = RankEnv {
        rank: 0,
        world_size: 1,
        local_rank: 0,
    };

    /// The process's place from its environment; a process started without the variables is
    /// [`RankEnv::SINGLE`].
    pub fn from_env() -> Result<RankEnv, RendezvousError> {
        RankEnv::from_vars(|var| std::env::var(var).ok())
    }

    /// [`RankEnv::from_env`] with the variables read by `var` (for tests).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<RankEnv, RendezvousError> {
        let number = |name: &'static str| -> Result<Option<usize>, RendezvousError> {
            match var(name) {
                None => Ok(None),
                Some(v) if v.trim().is_empty() => Ok(None),
                Some(v) => v
                    .trim()
                    .parse()
                    .map(Some)
                    .map_err(|_| RendezvousError::Invalid {
                        var: name,
                        value: v,
                    }),
            }
        };
        let world_size = number("WORLD_SIZE")?.unwrap_or(1);
        if world_size == 0 {
            return Err(RendezvousError::Invalid {
                var: "WORLD_SIZE",
                value: "0".into(),
            });
        }
        let rank = match number("RANK")? {
            Some(r) => r,
            None if world_size == 1 => 0,
            None => {
                return Err(RendezvousError::Missing {
                    var: "RANK",
                    why: "WORLD_SIZE is above 1, so each process needs its rank",
                })
            }
        };
        if rank >= world_size {
            return Err(RendezvousError::RankOutOfRange { rank, world_size });
        }
        let local_rank = number("LOCAL_RANK")?.unwrap_or(rank);
        Ok(RankEnv {
            rank,
            world_size,
            local_rank,
        })
    }
}

/// Writes `id` to `path` atomically: a temporary file in the same folder, then a rename, so a
/// reader sees either no file or the whole id.
pub fn publish_id(path: &Path, id: &[u8; ID_BYTES]) -> Result<(), RendezvousError> {
    let io = |error| RendezvousError::Io {
        path: path.to_path_buf(),
        error,
    };
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp.{}", std::process::id()));
    let tmp = path.with_file_name(name);
    std::fs::write(&tmp, id).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io(e)
    })
}

/// Waits until `path` exists and reads the id in it, polling every 20 ms for at most `timeout`.
pub fn wait_for_id(path: &Path, timeout: Duration) -> Result<[u8; ID_BYTES], RendezvousError> {
    let started = Instant::now();
    loop {
        match std::fs::read(path) {
            Ok(bytes) => {
                return bytes
                    .as_slice()
                    .try_into()
                    .map_err(|_| RendezvousError::BadIdFile {
                        path: path.to_path_buf(),
                        len: bytes.len(),
                    })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => {
                return Err(RendezvousError::Io {
                    path: path.to_path_buf(),
                    error,
                })
            }
        }
        if started.elapsed() >= timeout {
            return Err(RendezvousError::Timeout {
                path: path.to_path_buf(),
                waited: started.elapsed(),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The id every rank of `env` uses: rank 0 draws it with `draw` and publishes it at `path`;
/// the others wait for it there. A job of one process needs no file (`path` may be `None`).
pub fn exchange_id<E>(
    env: &RankEnv,
    path: Option<&Path>,
    timeout: Duration,
    draw: impl FnOnce() -> Result<[u8; ID_BYTES], E>,
) -> Result<[u8; ID_BYTES], E>
where
    E: From<RendezvousError>,
{
    let path = match path {
        Some(p) => p,
        None if env.world_size == 1 => return draw(),
        None => {
            return Err(RendezvousError::Missing {
                var: ID_FILE_ENV,
                why: "the ranks of a job of several processes meet through this file",
            }
            .into())
        }
    };
    if env.rank == 0 {
        let id = draw()?;
        publish_id(path, &id)?;
        Ok(id)
    } else {
        Ok(wait_for_id(path, timeout)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> Result<RankEnv, RendezvousError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        RankEnv::from_vars(|k| map.get(k).cloned())
    }

    #[test]
    fn torchrun_variables_give_the_rank() {
        assert_eq!(env(&[]).unwrap(), RankEnv::SINGLE);
        let e = env(&[("RANK", "3"), ("WORLD_SIZE", "8"), ("LOCAL_RANK", "3")]).unwrap();
        assert_eq!((e.rank, e.world_size, e.local_rank), (3, 8, 3));
        // Second machine of two: global rank 9, GPU 1.
        let e = env(&[("RANK", "9"), ("WORLD_SIZE", "16"), ("LOCAL_RANK", "1")]).unwrap();
        assert_eq!((e.rank, e.local_rank), (9, 1));
        // One machine without LOCAL_RANK: the GPU is the rank.
        let e = env(&[("RANK", "5"), ("WORLD_SIZE", "8")]).unwrap();
        assert_eq!(e.local_rank, 5);
        assert_eq!(env(&[("WORLD_SIZE", " 1 ")]).unwrap(), RankEnv::SINGLE);
    }

    #[test]
    fn bad_variables_are_typed_errors_naming_them() {
        let e = env(&[("WORLD_SIZE", "8")]).unwrap_err();
        assert!(
            matches!(e, RendezvousError::Missing { var: "RANK", .. }),
            "{e}"
        );
        let e = env(&[("RANK", "8"), ("WORLD_SIZE", "8")]).unwrap_err();
        assert!(
            matches!(
                e,
                RendezvousError::RankOutOfRange {
                    rank: 8,
                    world_size: 8
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("RANK=8"), "{e}");
        let e = env(&[("RANK", "one"), ("WORLD_SIZE", "2")]).unwrap_err();
        assert!(
            matches!(e, RendezvousError::Invalid { var: "RANK", .. }),
            "{e}"
        );
        assert!(e.to_string().contains("\"one\""), "{e}");
        let e = env(&[("WORLD_SIZE", "0")]).unwrap_err();
        assert!(matches!(
            e,
            RendezvousError::Invalid {
                var: "WORLD_SIZE",
                ..
            }
        ));
        let e = env(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "-1")]).unwrap_err();
        assert!(matches!(
            e,
            RendezvousError::Invalid {
                var: "LOCAL_RANK",
                ..
            }
        ));
    }

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("mae-nccl-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn rank_0_hands_its_id_to_a_rank_waiting_in_another_thread() {
        let dir = temp("exchange");
        let path = dir.join("id");
        let id: [u8; ID_BYTES] = std::array::from_fn(|i| (i * 37 % 251) as u8);
        let waiter = {
            let path = path.clone();
            std::thread::spawn(move || {
                let me = RankEnv {
                    rank: 1,
                    world_size: 2,
                    local_rank: 1,
                };
                exchange_id::<RendezvousError>(&me, Some(&path), Duration::from_secs(20), || {
                    panic!("only rank 0 draws the id")
                })
            })
        };
        // Let the waiter poll for a while before the file appears.
        std::thread::sleep(Duration::from_millis(100));
        let me = RankEnv {
            rank: 0,
            world_size: 2,
            local_rank: 0,
        };
        let published =
            exchange_id::<RendezvousError>(&me, Some(&path), Duration::ZERO, || Ok(id)).unwrap();
        assert_eq!(published, id);
        assert_eq!(waiter.join().unwrap().unwrap(), id);
        // No temporary file is left next to the id.
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("id")]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_missing_or_foreign_id_file_is_a_clear_error() {
        let dir = temp("errors");
        let path = dir.join("id");
        let started = Instant::now();
        let e = wait_for_id(&path, Duration::from_millis(60)).unwrap_err();
        assert!(matches!(e, RendezvousError::Timeout { .. }), "{e}");
        assert!(started.elapsed() >= Duration::from_millis(60));
        assert!(e.to_string().contains(ID_FILE_ENV), "{e}");
        std::fs::write(&path, b"not an id").unwrap();
        let e = wait_for_id(&path, Duration::from_secs(1)).unwrap_err();
        assert!(
            matches!(e, RendezvousError::BadIdFile { len: 9, .. }),
            "{e}"
        );
        // Several ranks need the file; one rank alone does not.
        let two = RankEnv {
            rank: 0,
            world_size: 2,
            local_rank: 0,
        };
        let e = exchange_id::<RendezvousError>(&two, None, Duration::ZERO, || Ok([0; ID_BYTES]))
            .unwrap_err();
        assert!(
            matches!(
                e,
                RendezvousError::Missing {
                    var: ID_FILE_ENV,
                    ..
                }
            ),
            "{e}"
        );
        let one = exchange_id::<RendezvousError>(&RankEnv::SINGLE, None, Duration::ZERO, || {
            Ok([7; ID_BYTES])
        });
        assert_eq!(one.unwrap(), [7; ID_BYTES]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
