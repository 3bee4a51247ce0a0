//! `MAE_WGPU_PROFILE=1`: where the device time goes, per kernel and grid.
//!
//! wgpu's timestamp queries are an optional feature that not every adapter has; this profile
//! needs none. Each launch waits until the queue is idle before and after it, and its wall
//! time is added to its kernel's row (the grid tells the shapes apart). The waits serialize
//! the queue and add a submission to every op, so small ops read high; the large ones, where
//! the time goes, read true. The table is printed when the backend is dropped.

use crate::context::lock;
use std::collections::HashMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

/// Seconds and calls per kernel and grid.
#[derive(Default)]
pub(crate) struct Profile {
    rows: Mutex<HashMap<String, (Duration, u64)>>,
}

impl Profile {
    /// A profile when `MAE_WGPU_PROFILE` is set to anything but `0`.
    pub(crate) fn from_env() -> Option<Profile> {
        match std::env::var("MAE_WGPU_PROFILE") {
            Ok(v) if v != "0" => Some(Profile::default()),
            _ => None,
        }
    }

    pub(crate) fn add(&self, label: String, time: Duration) {
        let mut rows = lock(&self.rows);
        let row = rows.entry(label).or_default();
        row.0 += time;
        row.1 += 1;
    }

    /// The rows, most time first, with each one's share of the total.
    pub(crate) fn report(&self) -> String {
        let rows = lock(&self.rows);
        let mut sorted: Vec<_> = rows.iter().collect();
        sorted.sort_by(|a, b| b.1 .0.cmp(&a.1 .0).then(a.0.cmp(b.0)));
        let total: f64 = sorted.iter().map(|(_, (t, _))| t.as_secs_f64()).sum();
        let mut out = format!(
            "MAE_WGPU_PROFILE: wall time per op, the queue drained around each, {:.1} ms in all\n",
            total * 1e3
        );
        out.push_str("  total ms      %     calls    mean us  op [workgroups]\n");
        for (label, (time, calls)) in sorted {
            let ms = time.as_secs_f64() * 1e3;
            let _ = writeln!(
                out,
                "{ms:10.2} {:6.2} {calls:9} {:10.2}  {label}",
                100.0 * ms / (total * 1e3).max(f64::MIN_POSITIVE),
                1e3 * ms / *calls as f64
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_sorts_by_time_and_averages_per_call() {
        let p = Profile::default();
        p.add("small".into(), Duration::from_millis(1));
        p.add("big".into(), Duration::from_millis(6));
        p.add("big".into(), Duration::from_millis(2));
        let report = p.report();
        let lines: Vec<&str> = report.lines().collect();
        assert!(lines[0].contains("9.0 ms in all"), "{report}");
        assert!(
            lines[2].ends_with("big") && lines[3].ends_with("small"),
            "{report}"
        );
        assert!(
            lines[2].contains("88.89") && lines[2].contains("4000.00"),
            "{report}"
        );
    }
}
