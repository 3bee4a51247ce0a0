//! The run's record: one JSON object per logged step in `metrics.jsonl`, and the loss curve
//! drawn from it as `loss.svg` (rewritten atomically, so it can be watched while training).

use crate::checkpoint::write_atomic;
use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Optimizer updates done.
    pub step: u64,
    /// Fractional epoch.
    pub epoch: f64,
    /// Mean loss of the micro-batches since the previous record.
    pub loss: f64,
    /// Learning rate of the last update.
    pub lr: f64,
    /// Training throughput since the previous record.
    pub img_per_s: f64,
    /// Seconds since this process started training.
    pub elapsed_s: f64,
    /// Unreadable images skipped so far in this process.
    pub skipped: u64,
}

/// Appends records to `metrics.jsonl` and redraws `loss.svg`.
pub struct MetricsLog {
    jsonl: File,
    svg: PathBuf,
    history: Vec<(u64, f64)>,
    title: String,
}

impl MetricsLog {
    /// Opens the log in `dir`. Records past `keep_until` (logged after the checkpoint a run
    /// resumes from) are dropped, so a resumed run's history has no duplicates.
    pub fn open(dir: &Path, keep_until: Option<u64>, title: &str) -> io::Result<MetricsLog> {
        let path = dir.join("metrics.jsonl");
        let mut kept = Vec::new();
        if let (Some(limit), Ok(f)) = (keep_until, File::open(&path)) {
            for line in BufReader::new(f).lines() {
                let line = line?;
                if let Ok(r) = serde_json::from_str::<Record>(&line) {
                    if r.step <= limit {
                        kept.push(r);
                    }
                }
            }
        }
        let mut text = String::new();
        for r in &kept {
            text.push_str(&to_line(r));
        }
        write_atomic(&path, text.as_bytes())?;
        let jsonl = OpenOptions::new().append(true).open(&path)?;
        Ok(MetricsLog {
            jsonl,
            svg: dir.join("loss.svg"),
            history: kept.iter().map(|r| (r.step, r.loss)).collect(),
            title: title.to_string(),
        })
    }

    /// Appends `r` and redraws the curve.
    pub fn record(&mut self, r: &Record) -> io::Result<()> {
        self.jsonl.write_all(to_line(r).as_bytes())?;
        self.jsonl.flush()?;
        self.history.push((r.step, r.loss));
        write_atomic(&self.svg, loss_svg(&self.history, &self.title).as_bytes())
    }

    /// The (step, loss) points so far.
    pub fn history(&self) -> &[(u64, f64)] {
        &self.history
    }
}

fn to_line(r: &Record) -> String {
    // Plain numbers always serialize.
    let mut s = serde_json::to_string(r).unwrap_or_default();
    s.push('\n');
    s
}

/// Reads every record of a `metrics.jsonl`.
pub fn read_records(path: &Path) -> io::Result<Vec<Record>> {
    let text = fs::read_to_string(path)?;
    text.lines()
        .map(|l| serde_json::from_str(l).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)))
        .collect()
}

/// An SVG line chart of loss against step: axes with ticks, the curve, the title.
pub fn loss_svg(points: &[(u64, f64)], title: &str) -> String {
    const W: f64 = 640.0;
    const H: f64 = 400.0;
    const L: f64 = 70.0; // left margin, room for tick labels
    const R: f64 = 20.0;
    const T: f64 = 40.0;
    const B: f64 = 50.0;
    let finite: Vec<(f64, f64)> = points
        .iter()
        .filter(|(_, l)| l.is_finite())
        .map(|&(s, l)| (s as f64, l))
        .collect();
    let (x0, x1) = span(finite.iter().map(|p| p.0), 0.0);
    let (y0, y1) = span(finite.iter().map(|p| p.1), 0.0);
    let sx = |x: f64| L + (x - x0) / (x1 - x0) * (W - L - R);
    let sy = |y: f64| H - B - (y - y0) / (y1 - y0) * (H - T - B);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"24\" text-anchor=\"middle\" font-size=\"15\">{}</text>\n",
        W / 2.0,
        escape(title)
    );
    // Axes and ticks.
    svg += &format!(
        "<path d=\"M{L},{T} V{} H{}\" stroke=\"black\" fill=\"none\"/>\n",
        H - B,
        W - R
    );
    for i in 0..=4 {
        let f = i as f64 / 4.0;
        let (x, y) = (x0 + f * (x1 - x0), y0 + f * (y1 - y0));
        svg += &format!(
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n",
            sx(x),
            H - B + 18.0,
            x.round()
        );
        svg += &format!(
            "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{:.3}</text>\n\
             <path d=\"M{L},{:.1} H{}\" stroke=\"#ddd\"/>\n",
            L - 6.0,
            sy(y) + 4.0,
            y,
            sy(y),
            W - R
        );
    }
    svg += &format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">optimizer step</text>\n\
         <text x=\"16\" y=\"{}\" text-anchor=\"middle\" transform=\"rotate(-90 16 {})\">loss</text>\n",
        (L + W - R) / 2.0,
        H - 10.0,
        (T + H - B) / 2.0,
        (T + H - B) / 2.0
    );
    if !finite.is_empty() {
        let pts: Vec<String> = finite
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        svg += &format!(
            "<polyline points=\"{}\" fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"1.5\"/>\n",
            pts.join(" ")
        );
    }
    svg + "</svg>\n"
}

/// The range of `values` widened to a non-empty interval that includes `floor` when the data
/// sits close to it (loss curves read best from zero).
fn span(values: impl Iterator<Item = f64>, floor: f64) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if lo > floor && lo - floor < hi - lo {
        lo = floor;
    }
    if hi - lo < 1e-12 {
        hi = lo + 1.0;
    }
    (lo, hi)
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(step: u64, loss: f64) -> Record {
        Record {
            step,
            epoch: step as f64 / 10.0,
            loss,
            lr: 1e-4,
            img_per_s: 100.0,
            elapsed_s: step as f64,
            skipped: 0,
        }
    }

    #[test]
    fn log_appends_and_resume_drops_later_records() {
        let dir = std::env::temp_dir().join(format!("mae-metrics-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let mut log = MetricsLog::open(&dir, None, "t").unwrap();
        for s in 1..=5 {
            log.record(&record(s * 10, 1.0 / s as f64)).unwrap();
        }
        drop(log);
        assert_eq!(read_records(&dir.join("metrics.jsonl")).unwrap().len(), 5);
        // Resuming from step 30: records 40 and 50 were logged after that checkpoint.
        let log = MetricsLog::open(&dir, Some(30), "t").unwrap();
        assert_eq!(log.history().len(), 3);
        let svg = fs::read_to_string(dir.join("loss.svg")).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("<polyline"));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn svg_maps_points_inside_the_plot_and_survives_odd_input() {
        let svg = loss_svg(&[(0, 2.0), (100, 0.5), (200, f64::NAN)], "a <b>");
        assert!(svg.contains("a &lt;b&gt;"));
        let poly = svg
            .split("points=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        let pts: Vec<(f64, f64)> = poly
            .split(' ')
            .map(|p| {
                let (x, y) = p.split_once(',').unwrap();
                (x.parse().unwrap(), y.parse().unwrap())
            })
            .collect();
        assert_eq!(pts.len(), 2, "the NaN point is left out");
        assert!(
            pts[0].0 < pts[1].0 && pts[0].1 < pts[1].1,
            "falling loss goes down the page"
        );
        for (x, y) in pts {
            assert!((70.0..=620.0).contains(&x) && (40.0..=350.0).contains(&y));
        }
        assert!(loss_svg(&[], "empty").contains("</svg>"));
        assert!(loss_svg(&[(5, 1.0)], "one").contains("<polyline"));
    }
}
