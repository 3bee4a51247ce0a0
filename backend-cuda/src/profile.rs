//! GPU time per kernel and GEMM shape, for finding where a step's time goes.
//!
//! Off unless the environment variable `MAE_CUDA_PROFILE` is set when the backend is built.
//! Then every launch and GEMM is bracketed by two CUDA events on the backend's stream, and when
//! the backend is dropped a table of the device time per label (count, total and mean, and for
//! products the rate: the FLOPs they execute over their time) is printed to standard error,
//! largest first. The events add a few microseconds of host work per
//! op and a synchronization every few thousand ops, so wall-clock numbers measured with the
//! profiler on are slightly pessimistic; the per-label device times are not affected.

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaStream};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Mutex;

/// Pending event pairs are resolved (one stream synchronization) once this many accumulate, so
/// a long run holds a bounded number of events.
const RESOLVE_EVERY: usize = 4096;

/// The profiler's state: event pairs not yet read, and totals per label.
#[derive(Default)]
pub(crate) struct Profile {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// (label, FLOPs, start, end)
    pending: Vec<(String, f64, CudaEvent, CudaEvent)>,
    /// label -> (calls, milliseconds, FLOPs)
    totals: HashMap<String, (u64, f64, f64)>,
    failed: Option<String>,
}

/// The start event of one timed op; [`Profile::end`] closes it.
pub(crate) struct Timer(Option<CudaEvent>);

impl Profile {
    /// A profiler when `MAE_CUDA_PROFILE` is set.
    pub(crate) fn from_env() -> Option<Profile> {
        std::env::var_os("MAE_CUDA_PROFILE").map(|_| Profile::default())
    }

    /// Records the start of an op on `stream`. A failure to record is remembered and reported
    /// in the table instead of failing the op.
    pub(crate) fn start(&self, stream: &CudaStream) -> Timer {
        match stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)) {
            Ok(e) => Timer(Some(e)),
            Err(e) => {
                self.fail(format!("recording an event: {e:?}"));
                Timer(None)
            }
        }
    }

    /// Records the end of the op that `timer` started, under `label`, with the floating-point
    /// operations it executes (2 per multiply-add of a product; 0 for an op without a rate).
    pub(crate) fn end(
        &self,
        stream: &CudaStream,
        timer: Timer,
        label: impl Into<String>,
        flops: f64,
    ) {
        let Timer(Some(start)) = timer else { return };
        let end = match stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)) {
            Ok(e) => e,
            Err(e) => return self.fail(format!("recording an event: {e:?}")),
        };
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        state.pending.push((label.into(), flops, start, end));
        if state.pending.len() >= RESOLVE_EVERY {
            state.resolve();
        }
    }

    fn fail(&self, why: String) {
        if let Ok(mut state) = self.state.lock() {
            state.failed.get_or_insert(why);
        }
    }

    /// The table of device time per label, largest total first.
    pub(crate) fn report(&self) -> String {
        let Ok(mut state) = self.state.lock() else {
            return "MAE_CUDA_PROFILE: the profiler's lock is poisoned\n".into();
        };
        state.resolve();
        let mut rows: Vec<(&String, &(u64, f64, f64))> = state.totals.iter().collect();
        rows.sort_by(|a, b| b.1 .1.total_cmp(&a.1 .1));
        let all: f64 = rows.iter().map(|r| r.1 .1).sum();
        let mut out = format!("MAE_CUDA_PROFILE: device time per op, {all:.1} ms in all\n");
        let _ = writeln!(
            out,
            "{:>10} {:>6} {:>9} {:>10} {:>9}  op",
            "total ms", "%", "calls", "mean us", "TFLOP/s"
        );
        for (label, &(calls, ms, flops)) in rows {
            let rate = if flops > 0.0 && ms > 0.0 {
                format!("{:.1}", flops / (ms * 1e9))
            } else {
                String::new()
            };
            let _ = writeln!(
                out,
                "{ms:>10.2} {:>6.2} {calls:>9} {:>10.2} {rate:>9}  {label}",
                100.0 * ms / all.max(f64::MIN_POSITIVE),
                1000.0 * ms / calls as f64
            );
        }
        if let Some(why) = &state.failed {
            let _ = writeln!(out, "(incomplete: {why})");
        }
        out
    }
}

impl State {
    /// Reads every pending pair's elapsed time (waiting for the stream to reach them).
    fn resolve(&mut self) {
        for (label, flops, start, end) in self.pending.drain(..) {
            match start.elapsed_ms(&end) {
                Ok(ms) => {
                    let t = self.totals.entry(label).or_insert((0, 0.0, 0.0));
                    t.0 += 1;
                    t.1 += ms as f64;
                    t.2 += flops;
                }
                Err(e) => {
                    self.failed
                        .get_or_insert(format!("reading an event: {e:?}"));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows by total time, products with their rate (FLOPs over time), other ops without.
    #[test]
    fn the_table_gives_products_their_rate() {
        let profile = Profile::default();
        {
            let mut state = profile.state.lock().unwrap();
            state.totals.insert("gemm 2x3x4".into(), (4, 2.0, 3e12));
            state
                .totals
                .insert("layernorm_forward".into(), (10, 6.0, 0.0));
        }
        let table = profile.report();
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].contains("8.0 ms in all"), "{table}");
        assert!(lines[1].contains("TFLOP/s"), "{table}");
        let cells = |line: &str| {
            line.split_whitespace()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            cells(lines[2]),
            ["6.00", "75.00", "10", "600.00", "layernorm_forward"]
        );
        // 3e12 FLOPs in 2 ms: 1,500 TFLOP/s.
        assert_eq!(
            cells(lines[3]),
            ["2.00", "25.00", "4", "500.00", "1500.0", "gemm", "2x3x4"]
        );
    }
}
