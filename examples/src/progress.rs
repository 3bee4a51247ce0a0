//! The training progress line: a bar with step, loss, lr, images/s and ETA, redrawn in place on a
//! terminal and printed as plain lines every `every` steps when the output is a log file.

use std::io::{IsTerminal, Write};
use std::time::Duration;

/// What the line shows.
#[derive(Clone, Copy, Debug)]
pub struct Status {
    /// Updates done.
    pub step: u64,
    /// Updates in the run.
    pub total: u64,
    /// Fractional epoch.
    pub epoch: f64,
    /// Recent mean loss.
    pub loss: f64,
    /// Current learning rate.
    pub lr: f64,
    /// Recent throughput.
    pub img_per_s: f64,
    /// Estimated time to the end.
    pub eta: Duration,
}

/// Draws [`Status`] lines on stderr.
pub struct Progress {
    terminal: bool,
    every: u64,
}

impl Progress {
    /// A progress display; on a non-terminal, one line per `every` steps.
    pub fn new(every: u64) -> Progress {
        Progress {
            terminal: std::io::stderr().is_terminal(),
            every: every.max(1),
        }
    }

    /// Shows `s` (always on a terminal; on a log only every `every` steps and at the end).
    pub fn show(&self, s: &Status) {
        let line = format_status(s);
        let mut err = std::io::stderr().lock();
        if self.terminal {
            let _ = write!(err, "\r{line}\x1b[K");
            if s.step == s.total {
                let _ = writeln!(err);
            }
        } else if s.step % self.every == 0 || s.step == s.total {
            let _ = writeln!(err, "{line}");
        }
    }

    /// Ends the in-place line before other output.
    pub fn finish_line(&self) {
        if self.terminal {
            let _ = writeln!(std::io::stderr());
        }
    }
}

/// `step 120/1280 [###-------------] 9% ep 1.50 loss 0.8123 lr 1.20e-5 312 img/s ETA 3m12s`
pub fn format_status(s: &Status) -> String {
    const WIDTH: usize = 20;
    let frac = if s.total == 0 {
        1.0
    } else {
        (s.step as f64 / s.total as f64).clamp(0.0, 1.0)
    };
    let filled = (frac * WIDTH as f64).round() as usize;
    format!(
        "step {}/{} [{}{}] {:>3.0}% ep {:.2} loss {:.4} lr {:.2e} {:.0} img/s ETA {}",
        s.step,
        s.total,
        "#".repeat(filled),
        "-".repeat(WIDTH - filled),
        frac * 100.0,
        s.epoch,
        s.loss,
        s.lr,
        s.img_per_s,
        human(s.eta)
    )
}

/// `1h02m`, `3m12s`, `45s`.
pub fn human(d: Duration) -> String {
    let t = d.as_secs();
    match (t / 3600, t / 60 % 60, t % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s:02}s"),
        (h, m, _) => format!("{h}h{m:02}m"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_line_shows_every_field() {
        let s = Status {
            step: 5,
            total: 20,
            epoch: 0.5,
            loss: 0.81234,
            lr: 1.2e-5,
            img_per_s: 312.4,
            eta: Duration::from_secs(192),
        };
        let line = format_status(&s);
        assert_eq!(
            line,
            "step 5/20 [#####---------------]  25% ep 0.50 loss 0.8123 lr 1.20e-5 312 img/s ETA 3m12s"
        );
        assert_eq!(human(Duration::from_secs(3725)), "1h02m");
        assert_eq!(human(Duration::from_secs(45)), "45s");
    }
}
