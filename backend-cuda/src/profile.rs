//! GPU time per kernel and GEMM shape, for finding where a step's time goes.
//!
//! Off unless the environment variable `MAE_CUDA_PROFILE` is set when the backend is built.
//! Then every launch and GEMM is bracketed by two CUDA events on the backend's stream, and when
//! the backend is dropped a table of the device time per label (count, total and mean, and for
//! products the rate: the FLOPs they execute over their time) is printed to standard error,
//! largest first. The events add a few microseconds of host work per
//! op and a synchronization every few thousand ops, so wall-clock numbers measured with the
//! profiler on are slightly pessimistic; the per-label device times are not affected.
//!
//! A second table gives what the driver made of each kernel launched: its registers, its
//! spills (local memory), its shared memory and how many of its blocks a multiprocessor holds
//! at once. The driver compiles our PTX itself, so these are the card's numbers, where
//! `ptxas -v` on a development machine only approximates them, and they tell a kernel bound by
//! occupancy from one bound by issue or spills.

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaFunction, CudaStream, LaunchConfig};
use std::collections::{BTreeMap, HashMap};
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
    /// kernel name -> its resources as the driver reports them (or why it could not)
    kernels: BTreeMap<&'static str, Result<Resources, String>>,
    failed: Option<String>,
}

/// One kernel's resources at its first launch, as the driver reports them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Resources {
    /// Threads per block of the launch.
    pub threads: u32,
    /// Registers per thread.
    pub registers: i32,
    /// Local memory per thread in bytes: spilled registers and arrays indexed at run time.
    pub local_bytes: i32,
    /// Static shared memory per block in bytes.
    pub shared_bytes: i32,
    /// The launch's dynamic shared memory per block in bytes.
    pub dynamic_shared_bytes: u32,
    /// Blocks of this launch's size that one multiprocessor holds at once.
    pub blocks_per_sm: u32,
    /// The threads one multiprocessor holds at most (2,048 on sm_80 to sm_90).
    pub sm_threads: i32,
}

impl Resources {
    /// What the driver reports for `function` launched with `cfg`, on a device whose
    /// multiprocessors hold `sm_threads` threads.
    pub(crate) fn of(
        function: &CudaFunction,
        cfg: &LaunchConfig,
        sm_threads: i32,
    ) -> Result<Resources, String> {
        let read = |what: &str, r: Result<i32, cudarc::driver::DriverError>| {
            r.map_err(|e| format!("reading {what}: {e:?}"))
        };
        let threads = cfg.block_dim.0 * cfg.block_dim.1 * cfg.block_dim.2;
        // The attribute reads first: they bind the function's context to this thread, which
        // cudarc's occupancy query does not.
        let registers = read("the registers", function.num_regs())?;
        let local_bytes = read("the local memory", function.local_size_bytes())?;
        let shared_bytes = read("the shared memory", function.shared_size_bytes())?;
        let blocks_per_sm = function
            .occupancy_max_active_blocks_per_multiprocessor(
                threads,
                cfg.shared_mem_bytes as usize,
                None,
            )
            .map_err(|e| format!("reading the occupancy: {e:?}"))?;
        Ok(Resources {
            threads,
            registers,
            local_bytes,
            shared_bytes,
            dynamic_shared_bytes: cfg.shared_mem_bytes,
            blocks_per_sm,
            sm_threads,
        })
    }

    /// The share of a multiprocessor's threads that its resident blocks fill.
    fn occupancy(&self) -> f64 {
        (self.blocks_per_sm * self.threads) as f64 / self.sm_threads.max(1) as f64
    }
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

    /// Whether `kernel`'s resources are still to be recorded (the first launch of each kernel
    /// records them: [`Profile::record_kernel`]).
    pub(crate) fn is_new_kernel(&self, kernel: &'static str) -> bool {
        self.state
            .lock()
            .is_ok_and(|state| !state.kernels.contains_key(kernel))
    }

    /// Records `kernel`'s resources (or why they could not be read) for the second table.
    pub(crate) fn record_kernel(&self, kernel: &'static str, resources: Result<Resources, String>) {
        if let Ok(mut state) = self.state.lock() {
            state.kernels.entry(kernel).or_insert(resources);
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
        state.write_kernels(&mut out);
        out
    }
}

impl State {
    /// The second table: each kernel's resources, by name.
    fn write_kernels(&self, out: &mut String) {
        if self.kernels.is_empty() {
            return;
        }
        let _ = writeln!(
            out,
            "MAE_CUDA_PROFILE: kernel resources as the driver compiled them (at the first launch)"
        );
        let _ = writeln!(
            out,
            "{:>7} {:>9} {:>11} {:>12} {:>9} {:>9}  kernel",
            "threads", "registers", "local B/thr", "shared B/blk", "blocks/SM", "occupancy"
        );
        for (name, resources) in &self.kernels {
            match resources {
                Ok(r) => {
                    let _ = writeln!(
                        out,
                        "{:>7} {:>9} {:>11} {:>12} {:>9} {:>8.0}%  {name}",
                        r.threads,
                        r.registers,
                        r.local_bytes,
                        r.shared_bytes as i64 + r.dynamic_shared_bytes as i64,
                        r.blocks_per_sm,
                        100.0 * r.occupancy()
                    );
                }
                Err(why) => {
                    let _ = writeln!(out, "{:>62}  {name}", format!("({why})"));
                }
            }
        }
    }

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
        assert_eq!(
            lines.len(),
            4,
            "no kernel launched, no second table: {table}"
        );
    }

    /// The second table: each kernel's resources with its occupancy, or why they are missing.
    #[test]
    fn the_kernel_table_gives_each_kernels_occupancy() {
        let profile = Profile::default();
        let resources = Resources {
            threads: 128,
            registers: 96,
            local_bytes: 8,
            shared_bytes: 36_864,
            dynamic_shared_bytes: 1024,
            blocks_per_sm: 5,
            sm_threads: 2048,
        };
        profile.record_kernel("attention_forward_mma", Ok(resources));
        profile.record_kernel("add_f32", Err("reading the registers: gone".into()));
        // A kernel is recorded once: later launches change nothing.
        let changed = Resources {
            registers: 1,
            ..resources
        };
        profile.record_kernel("attention_forward_mma", Ok(changed));
        assert!(!profile.is_new_kernel("attention_forward_mma"));
        assert!(profile.is_new_kernel("layernorm_forward"));
        let table = profile.report();
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[2].contains("kernel resources"), "{table}");
        assert!(lines[3].contains("occupancy"), "{table}");
        // By name; 5 blocks of 128 threads fill 640 of 2,048: 31 %.
        assert!(
            lines[4].ends_with("(reading the registers: gone)  add_f32"),
            "{table}"
        );
        let cells: Vec<&str> = lines[5].split_whitespace().collect();
        assert_eq!(
            cells,
            [
                "128",
                "96",
                "8",
                "37888",
                "5",
                "31%",
                "attention_forward_mma"
            ],
            "{table}"
        );
    }

    /// On a device (or the fake driver): the first launch of each kernel records what the
    /// driver reports, with the launch's block size, once.
    #[test]
    fn launches_record_each_kernels_resources_once() {
        use mae::backend::Backend;
        let Some(mut be) = crate::test_device(crate::Precision::F32) else {
            return;
        };
        be.profile = Some(Profile::default());
        let x = be.upload(&[1.0; 1000]).unwrap();
        let mut y = be.alloc(1000).unwrap();
        be.add(&x, &mut y).unwrap();
        be.add(&x, &mut y).unwrap();
        let profile = be.profile.take().unwrap();
        let state = profile.state.lock().unwrap();
        let names: Vec<&str> = state.kernels.keys().copied().collect();
        assert_eq!(names, ["add_f32"]);
        let r = state.kernels["add_f32"].clone().unwrap();
        assert_eq!(r.threads, crate::launch::BLOCK);
        assert!(r.registers > 0 && r.blocks_per_sm >= 1, "{r:?}");
        // What one multiprocessor holds: threads, and 65,536 registers (sm_50 to sm_90).
        assert!(r.blocks_per_sm * r.threads <= r.sm_threads as u32, "{r:?}");
        assert!(
            r.blocks_per_sm * r.threads * r.registers as u32 <= 65_536,
            "{r:?}"
        );
    }
}
