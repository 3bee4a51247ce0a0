//! The tuning table of `MAE_CUDA_GEMM_TUNE=FILE` (`tuning.rs`): per product shape the
//! cuBLASLt algorithm measured fastest, and per bf16 weight gradient the chunk count
//! (`split_k.rs`), with the times that chose them.
//!
//! The file is text, one shape a line, tab-separated (`# ` lines are comments), written whole
//! to a temporary file and renamed over the old one, so an interrupted run leaves the last
//! complete table. Backends that share a file (data-parallel ranks, tests) each write their
//! own view: a shape that only another one measured may be measured again by a later run. Its
//! `made-for` line names the cuBLASLt version and the card: cuBLASLt documents its algorithm
//! structures as reusable with the same library version only, and timings hold for one kind
//! of card, so a table made elsewhere is refused with an error that says so, never silently
//! used.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Candidates timed per shape: the heuristic's best few.
pub(super) const CANDIDATES: usize = 8;

/// Timed runs per candidate (after one untimed run, which also loads the kernel).
pub(super) const RUNS: usize = 5;

/// Another candidate replaces the heuristic's first only when this much faster: closer than
/// this, timing noise would decide.
const MARGIN: f64 = 0.03;

/// Another chunk count replaces `split_k::chunks`' estimate only when this much faster, timed
/// or as a table records it. Timed alone, a weight gradient's ways rank otherwise than in a
/// step: on an H200 (2026-11-28) the whole products that a table chose over the estimate's
/// chunks by 3-10 % took 5-39 % longer than those chunks in the profiled step (`2048x512x50432`:
/// 293 us whole against 211 us in 4 chunks), while the choices it made by 21-42 % held.
const SPLIT_MARGIN: f64 = 0.15;

/// The first line of every table.
const TITLE: &str = "# mae cuBLASLt tuning table (MAE_CUDA_GEMM_TUNE): \
                     shape, algorithm, waves, microseconds tuned and the heuristic's first";

/// One shape's measured choice.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Tuned {
    /// cuBLASLt's opaque algorithm structure (`cublasLtMatmulAlgo_t`), as the library filled it.
    pub algo: [u64; 8],
    /// How many waves of blocks the algorithm runs, as the heuristic reported it.
    pub waves: f32,
    /// Microseconds a product took with it...
    pub us: f64,
    /// ...and with the heuristic's first choice, for the record.
    pub first_us: f64,
}

/// One weight gradient's measured chunk count (`split_k.rs`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Split {
    /// Chunks of rows (1: the whole product).
    pub chunks: usize,
    /// Microseconds the op took so...
    pub us: f64,
    /// ...and split as `split_k::chunks` estimates, for the record.
    pub policy_us: f64,
}

/// The first field of a split line (shape keys start with the epilogue's name).
const SPLIT: &str = "split";

/// Why a table cannot be used.
#[derive(Debug)]
pub(super) enum TuneError {
    /// Reading or writing the file failed.
    Io {
        path: PathBuf,
        doing: &'static str,
        error: std::io::Error,
    },
    /// A line is not a table line.
    Malformed {
        path: PathBuf,
        line: usize,
        why: String,
    },
    /// The table was made for another library version or card.
    MadeFor {
        path: PathBuf,
        file: String,
        here: String,
    },
}

impl fmt::Display for TuneError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TuneError::Io { path, doing, error } => {
                write!(f, "MAE_CUDA_GEMM_TUNE: {doing} {}: {error}", path.display())
            }
            TuneError::Malformed { path, line, why } => write!(
                f,
                "MAE_CUDA_GEMM_TUNE: {} line {line} is not a tuning table line: {why}",
                path.display()
            ),
            TuneError::MadeFor { path, file, here } => write!(
                f,
                "MAE_CUDA_GEMM_TUNE: {} was tuned for {file}, and this is {here}; \
                 name another file (or delete this one) to tune here",
                path.display()
            ),
        }
    }
}

impl std::error::Error for TuneError {}

/// Tables measured on cards and kept in the crate (`lt/tables/`), each a tuning file as a run
/// with `MAE_CUDA_GEMM_TUNE` wrote it: by name, and the text. Where one was made for the
/// cuBLASLt version and card a backend runs on, the backend runs its choices without timing
/// anything (`MAE_CUDA_GEMM_TABLE`, `tuning.rs`). Shapes it does not list run the heuristic's
/// first algorithm, as without a table.
pub(super) const BUILTIN: &[(&str, &str)] = &[(
    "h200-cublaslt-130100.tsv",
    include_str!("tables/h200-cublaslt-130100.tsv"),
)];

/// The tuning table of one file: its entries by shape key, written back whole on each change;
/// or a built-in table ([`BUILTIN`]), which is only read.
#[derive(Debug)]
pub(super) struct TuneTable {
    path: PathBuf,
    made_for: String,
    entries: BTreeMap<String, Tuned>,
    splits: BTreeMap<String, Split>,
    read_only: bool,
}

impl TuneTable {
    /// The table in `path` for `made_for` (the library version and card, as [`made_for`]
    /// words them); where the file does not exist yet, an empty table, written there at once so
    /// that a place where it cannot be written is refused now, not at the first product.
    pub(super) fn open(path: &Path, made_for: &str) -> Result<TuneTable, TuneError> {
        let table = TuneTable {
            path: path.to_path_buf(),
            made_for: made_for.to_string(),
            entries: BTreeMap::new(),
            splits: BTreeMap::new(),
            read_only: false,
        };
        match std::fs::read_to_string(path) {
            Ok(text) => table.parse(&text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                table.save()?;
                Ok(table)
            }
            Err(error) => Err(TuneError::Io {
                path: table.path,
                doing: "reading",
                error,
            }),
        }
    }

    /// The built-in table made for `made_for`, if any; read-only. A built-in table that does not
    /// parse is an error (the crate's tests parse every one).
    pub(super) fn builtin(made_for: &str) -> Result<Option<TuneTable>, TuneError> {
        for (name, text) in BUILTIN {
            if let Some(table) = TuneTable::read_only_from(name, text, made_for)? {
                return Ok(Some(table));
            }
        }
        Ok(None)
    }

    /// The read-only table of a table's `text` (called `name` in errors), if it was made for
    /// `made_for`.
    pub(super) fn read_only_from(
        name: &str,
        text: &str,
        made_for: &str,
    ) -> Result<Option<TuneTable>, TuneError> {
        let table = TuneTable {
            path: PathBuf::from(format!("(built-in table {name})")),
            made_for: made_for.to_string(),
            entries: BTreeMap::new(),
            splits: BTreeMap::new(),
            read_only: true,
        };
        match table.parse(text) {
            Ok(table) => Ok(Some(table)),
            Err(TuneError::MadeFor { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Whether the table is only read (built in).
    pub(super) fn read_only(&self) -> bool {
        self.read_only
    }

    /// This empty table filled from a table's text.
    fn parse(mut self, text: &str) -> Result<TuneTable, TuneError> {
        let path = self.path.clone();
        let malformed = |line: usize, why: String| TuneError::Malformed {
            path: path.clone(),
            line,
            why,
        };
        let table = &mut self;
        let mut seen_made_for = false;
        for (i, line) in text.lines().enumerate() {
            let number = i + 1;
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            if let Some(file) = line.strip_prefix("made-for\t") {
                if file != table.made_for {
                    return Err(TuneError::MadeFor {
                        path: table.path.clone(),
                        file: file.to_string(),
                        here: table.made_for.clone(),
                    });
                }
                seen_made_for = true;
                continue;
            }
            if !seen_made_for {
                return Err(malformed(number, "no `made-for` line before it".into()));
            }
            let again = |key: &str| malformed(number, format!("a second entry for `{key}`"));
            if let Some(rest) = line.strip_prefix(SPLIT).and_then(|r| r.strip_prefix('\t')) {
                let (key, split) = parse_split(rest).map_err(|why| malformed(number, why))?;
                if table.splits.insert(key.to_string(), split).is_some() {
                    return Err(again(key));
                }
                continue;
            }
            let (key, tuned) = parse_entry(line).map_err(|why| malformed(number, why))?;
            if table.entries.insert(key.to_string(), tuned).is_some() {
                return Err(again(key));
            }
        }
        Ok(self)
    }

    /// The entry for `key`, if the table has one.
    pub(super) fn get(&self, key: &str) -> Option<Tuned> {
        self.entries.get(key).copied()
    }

    /// Adds (or replaces) the entry for `key` and writes the table back.
    pub(super) fn insert(&mut self, key: String, tuned: Tuned) -> Result<(), TuneError> {
        self.entries.insert(key, tuned);
        self.save()
    }

    /// The chunk count recorded for the weight gradient of shape `key`, if any.
    pub(super) fn split(&self, key: &str) -> Option<Split> {
        self.splits.get(key).copied()
    }

    /// Records the chunk count for the weight gradient of shape `key` and writes the table back.
    pub(super) fn insert_split(&mut self, key: String, split: Split) -> Result<(), TuneError> {
        self.splits.insert(key, split);
        self.save()
    }

    /// How many shapes and splits the table lists.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.entries.len() + self.splits.len()
    }

    /// The whole table into a temporary file beside it, then renamed over it; nothing for a
    /// built-in table, which a backend never adds to (`tuning.rs`).
    fn save(&self) -> Result<(), TuneError> {
        if self.read_only {
            return Ok(());
        }
        let mut text = format!("{TITLE}\nmade-for\t{}\n", self.made_for);
        for (key, t) in &self.entries {
            let algo: Vec<String> = t.algo.iter().map(|w| format!("{w:016x}")).collect();
            text += &format!(
                "{key}\t{}\t{}\t{:.2}\t{:.2}\n",
                algo.join(" "),
                t.waves,
                t.us,
                t.first_us
            );
        }
        for (key, split) in &self.splits {
            text += &format!(
                "{SPLIT}\t{key}\t{}\t{:.2}\t{:.2}\n",
                split.chunks, split.us, split.policy_us
            );
        }
        // A name of its own per save: backends of one process may share a table.
        static SAVES: AtomicUsize = AtomicUsize::new(0);
        let mut tmp = self.path.clone().into_os_string();
        let n = SAVES.fetch_add(1, Ordering::Relaxed);
        tmp.push(format!(".tmp{}-{n}", std::process::id()));
        let tmp = PathBuf::from(tmp);
        let io = |doing, error| TuneError::Io {
            path: self.path.clone(),
            doing,
            error,
        };
        std::fs::write(&tmp, text).map_err(|e| io("writing a temporary file beside", e))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            io("renaming the temporary file onto", e)
        })
    }
}

/// One entry line: key, algorithm (eight 16-digit hex words), waves, microseconds tuned and
/// microseconds of the heuristic's first, tab-separated.
fn parse_entry(line: &str) -> Result<(&str, Tuned), String> {
    let fields: Vec<&str> = line.split('\t').collect();
    let [key, algo, waves, us, first_us] = fields[..] else {
        return Err(format!("{} tab-separated fields, not 5", fields.len()));
    };
    let words: Vec<&str> = algo.split(' ').collect();
    if words.len() != 8 {
        return Err(format!("an algorithm of {} words, not 8", words.len()));
    }
    let mut parsed = [0u64; 8];
    for (slot, word) in parsed.iter_mut().zip(&words) {
        *slot =
            u64::from_str_radix(word, 16).map_err(|e| format!("algorithm word `{word}`: {e}"))?;
    }
    Ok((
        key,
        Tuned {
            algo: parsed,
            waves: number("waves", waves)? as f32,
            us: number("microseconds", us)?,
            first_us: number("microseconds", first_us)?,
        },
    ))
}

/// A split line after its first field: key, chunks, microseconds so and as estimated.
fn parse_split(rest: &str) -> Result<(&str, Split), String> {
    let fields: Vec<&str> = rest.split('\t').collect();
    let [key, chunks, us, policy_us] = fields[..] else {
        return Err(format!("{} tab-separated fields, not 5", fields.len() + 1));
    };
    let chunks = chunks
        .parse::<usize>()
        .ok()
        .filter(|&c| c >= 1)
        .ok_or_else(|| format!("chunks `{chunks}` is not a count of at least 1"))?;
    Ok((
        key,
        Split {
            chunks,
            us: number("microseconds", us)?,
            policy_us: number("microseconds", policy_us)?,
        },
    ))
}

/// A table's number field: finite and not negative.
fn number(what: &str, v: &str) -> Result<f64, String> {
    v.parse::<f64>()
        .ok()
        .filter(|x| x.is_finite() && *x >= 0.0)
        .ok_or_else(|| format!("{what} `{v}` is not a number of at least 0"))
}

/// The `made-for` words of a table: the cuBLASLt version and the card.
pub(super) fn made_for(lt_version: usize, device: &str, multiprocessors: i32) -> String {
    format!("cuBLASLt {lt_version} on {device} ({multiprocessors} multiprocessors)")
}

/// The candidate to run, from each candidate's time (`None`: it could not run), the
/// heuristic's first at index 0: the fastest, unless it beats the first by less than
/// [`MARGIN`]; `None` where none ran.
pub(super) fn fastest(times: &[Option<f64>]) -> Option<usize> {
    fastest_by(times, MARGIN)
}

/// [`fastest`] for a weight gradient's chunk counts, the estimate's at index 0: by
/// [`SPLIT_MARGIN`].
pub(super) fn fastest_split(times: &[Option<f64>]) -> Option<usize> {
    fastest_by(times, SPLIT_MARGIN)
}

fn fastest_by(times: &[Option<f64>], margin: f64) -> Option<usize> {
    let best = (0..times.len())
        .filter_map(|i| times[i].map(|t| (i, t)))
        .min_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)))?;
    match times.first().copied().flatten() {
        Some(first) if best.1 > first * (1.0 - margin) => Some(0),
        _ => Some(best.0),
    }
}

impl Split {
    /// Whether the recorded count beat the estimate's time by [`SPLIT_MARGIN`] (a table written
    /// before the margin may hold counts that did not; then the estimate runs).
    pub(super) fn beats_estimate(&self) -> bool {
        fastest_split(&[Some(self.policy_us), Some(self.us)]) == Some(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A table's path in a directory of its own, removed with everything in it when dropped.
    struct Temp(PathBuf);

    impl std::ops::Deref for Temp {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }

    impl AsRef<Path> for Temp {
        fn as_ref(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Temp {
        fn drop(&mut self) {
            if let Some(dir) = self.0.parent() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }

    fn temp(name: &str) -> Temp {
        let dir = std::env::temp_dir().join(format!("mae-tune-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Temp(dir.join("table.txt"))
    }

    fn tuned(seed: u64) -> Tuned {
        Tuned {
            algo: [seed, u64::MAX, 0, 1, 2, 3, 4, seed << 32],
            waves: 0.25,
            us: 12.5,
            first_us: 20.0,
        }
    }

    #[test]
    fn a_table_reads_back_what_it_wrote() {
        let path = temp("roundtrip");
        let here = made_for(130200, "NVIDIA H200", 132);
        let mut table = TuneTable::open(&path, &here).unwrap();
        assert_eq!(table.len(), 0, "a missing file is an empty table");
        table.insert("bias bf16 NT m768".into(), tuned(7)).unwrap();
        table.insert("none f32 NN m1".into(), tuned(9)).unwrap();
        let split = Split {
            chunks: 4,
            us: 80.25,
            policy_us: 99.0,
        };
        table.insert_split("bgradb NT m512".into(), split).unwrap();
        let back = TuneTable::open(&path, &here).unwrap();
        assert_eq!(back.len(), 3);
        assert_eq!(back.split("bgradb NT m512"), Some(split));
        assert_eq!(back.split("bias bf16 NT m768"), None);
        assert_eq!(back.get("bias bf16 NT m768"), Some(tuned(7)));
        assert_eq!(back.get("none f32 NN m1"), Some(tuned(9)));
        assert_eq!(back.get("none f32 NN m2"), None);
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec!["table.txt"], "no temporary file is left");
    }

    #[test]
    fn a_table_for_another_library_or_card_is_refused() {
        let path = temp("made-for");
        let mut table = TuneTable::open(&path, &made_for(130200, "NVIDIA H200", 132)).unwrap();
        table.insert("k".into(), tuned(1)).unwrap();
        for here in [
            made_for(130100, "NVIDIA H200", 132),
            made_for(130200, "NVIDIA H100 80GB HBM3", 132),
        ] {
            let e = TuneTable::open(&path, &here).unwrap_err();
            assert!(matches!(e, TuneError::MadeFor { .. }), "{e}");
            assert!(e.to_string().contains("name another file"), "{e}");
        }
    }

    #[test]
    fn malformed_lines_are_refused_with_their_number() {
        let path = temp("malformed");
        let here = made_for(1, "card", 2);
        let good = "k\t0000000000000001 0 0 0 0 0 0 0\t0.5\t1.00\t2.00";
        let cases = [
            (format!("{good}\n"), 1, "no `made-for`"),
            (
                format!("made-for\t{here}\nk\t1 2\t0.5\t1\t2\n"),
                2,
                "2 words",
            ),
            (format!("made-for\t{here}\nk\t1\n"), 2, "2 tab-separated"),
            (
                format!("made-for\t{here}\n{}\n", good.replace("0.5", "-1")),
                2,
                "waves",
            ),
            (
                format!("made-for\t{here}\n{}\n", good.replace("0001", "000g")),
                2,
                "algorithm word",
            ),
            (format!("made-for\t{here}\n{good}\n{good}\n"), 3, "a second"),
            (
                format!("made-for\t{here}\nsplit\tk\t0\t1\t2\n"),
                2,
                "chunks `0`",
            ),
            (
                format!("made-for\t{here}\nsplit\tk\t2\t1\n"),
                2,
                "4 tab-separated",
            ),
            (
                format!("made-for\t{here}\nsplit\tk\t2\t1\t2\nsplit\tk\t4\t1\t2\n"),
                3,
                "a second",
            ),
        ];
        for (text, line, why) in cases {
            std::fs::write(&path, &text).unwrap();
            match TuneTable::open(&path, &here) {
                Err(TuneError::Malformed {
                    line: l, why: w, ..
                }) => {
                    assert_eq!(l, line, "{text:?}: {w}");
                    assert!(w.contains(why), "{text:?}: {w}");
                }
                other => panic!("{text:?}: {other:?}"),
            }
        }
        std::fs::write(&path, format!("# comment\n\nmade-for\t{here}\n{good}\n")).unwrap();
        let table = TuneTable::open(&path, &here).unwrap();
        assert_eq!(table.get("k").map(|t| t.algo[0]), Some(1));
    }

    #[test]
    fn a_new_table_is_written_at_once_or_refused() {
        let path = temp("new");
        let table = TuneTable::open(&path, "here").unwrap();
        assert_eq!(table.len(), 0);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("made-for\there\n"), "{text}");
        let nowhere = path.with_file_name("missing").join("table.txt");
        let e = TuneTable::open(&nowhere, "here").unwrap_err();
        assert!(matches!(e, TuneError::Io { .. }), "{e}");
    }

    #[test]
    fn an_unreadable_table_is_an_error() {
        let dir = temp("unreadable");
        let e = TuneTable::open(dir.parent().unwrap(), "x").unwrap_err();
        assert!(
            matches!(
                e,
                TuneError::Io {
                    doing: "reading",
                    ..
                }
            ),
            "{e}"
        );
    }

    /// The `made-for` words of a table's text.
    fn made_for_of(text: &str) -> &str {
        text.lines()
            .find_map(|l| l.strip_prefix("made-for\t"))
            .expect("a made-for line")
    }

    #[test]
    fn every_builtin_table_is_found_for_its_own_card_whole() {
        for (name, text) in BUILTIN {
            let table = TuneTable::builtin(made_for_of(text))
                .unwrap_or_else(|e| panic!("{name}: {e}"))
                .unwrap_or_else(|| panic!("{name} is not found for its own made-for line"));
            assert!(table.read_only(), "{name}");
            let lines = text
                .lines()
                .filter(|l| !l.starts_with('#') && !l.starts_with("made-for\t"))
                .count();
            assert!(lines > 0, "{name} lists no shape");
            assert_eq!(table.len(), lines, "{name}: every line an entry");
        }
    }

    #[test]
    fn no_builtin_table_serves_another_library_or_card() {
        let (_, text) = BUILTIN[0];
        let theirs = made_for_of(text);
        // The same card with another library version, and the fake driver's card.
        let version = theirs.split(' ').nth(1).unwrap();
        let other = theirs.replacen(version, &format!("{version}1"), 1);
        for here in [other.as_str(), &made_for(130100, "fake", 132)] {
            assert!(TuneTable::builtin(here).unwrap().is_none(), "{here}");
        }
    }

    #[test]
    fn a_builtin_table_writes_nothing() {
        let (_, text) = BUILTIN[0];
        let mut table = TuneTable::builtin(made_for_of(text)).unwrap().unwrap();
        let before = table.len();
        table.insert("k".into(), tuned(3)).unwrap();
        assert_eq!(table.len(), before + 1, "kept in memory");
        assert!(
            !table.path.exists(),
            "no file named {}",
            table.path.display()
        );
    }

    #[test]
    fn the_fastest_candidate_wins_by_a_margin_over_the_first() {
        assert_eq!(fastest(&[]), None);
        assert_eq!(fastest(&[None, None]), None);
        assert_eq!(fastest(&[Some(10.0), Some(8.0), Some(9.0)]), Some(1));
        // 2 % faster is within the margin: the heuristic's first stays.
        assert_eq!(fastest(&[Some(10.0), Some(9.8)]), Some(0));
        assert_eq!(fastest(&[Some(10.0), Some(11.0)]), Some(0));
        // Ties go to the earlier candidate; a first that could not run does not count.
        assert_eq!(fastest(&[Some(10.0), Some(5.0), Some(5.0)]), Some(1));
        assert_eq!(fastest(&[None, Some(7.0), Some(6.0)]), Some(2));
        // A chunk count beats the estimate's (index 0) by 15 %: 10 % is not enough.
        assert_eq!(fastest_split(&[Some(10.0), Some(9.0)]), Some(0));
        assert_eq!(fastest_split(&[Some(10.0), Some(9.0), Some(8.0)]), Some(2));
        let split = |us| Split {
            chunks: 1,
            us,
            policy_us: 100.0,
        };
        assert!(split(85.0).beats_estimate() && !split(90.0).beats_estimate());
    }
}
