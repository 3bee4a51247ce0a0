//! GPU time per kernel and GEMM shape, for finding where a step's time goes.
//!
//! Off unless the environment variable `MAE_CUDA_PROFILE` is set when the backend is built.
//! Then every launch and GEMM is bracketed by two CUDA events on the backend's stream, and when
//! the backend is dropped a table of the device time per label (count, total and mean, for
//! products the rate: the FLOPs they execute over their time, and for kernels the bandwidth:
//! the bytes they move at least, `traffic.rs`, over their time) is printed to standard error,
//! largest first, closed by the run's totals of both (from which `scripts/gpu-check.sh` puts
//! the step against its floor at the card's peaks). The events add a few microseconds of host work per
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
    /// (label, work, start, end)
    pending: Vec<(String, Work, CudaEvent, CudaEvent)>,
    totals: HashMap<String, Total>,
    /// kernel name -> its resources as the driver reports them (or why it could not)
    kernels: BTreeMap<&'static str, Result<Resources, String>>,
    failed: Option<String>,
}

/// What one op does besides taking time: the FLOPs of its products (2 per multiply-add; 0
/// for an op without products) and the bytes it moves at least (`None`: not counted).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Work {
    pub flops: f64,
    pub bytes: Option<f64>,
}

/// The sums over the calls under one label.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Total {
    calls: u64,
    ms: f64,
    flops: f64,
    /// Bytes of the calls that counted theirs, and those calls' milliseconds.
    bytes: f64,
    counted_ms: f64,
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

    /// Records the end of the op that `timer` started, under `label`, with its `work`.
    pub(crate) fn end(
        &self,
        stream: &CudaStream,
        timer: Timer,
        label: impl Into<String>,
        work: Work,
    ) {
        let Timer(Some(start)) = timer else { return };
        let end = match stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)) {
            Ok(e) => e,
            Err(e) => return self.fail(format!("recording an event: {e:?}")),
        };
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        state.pending.push((label.into(), work, start, end));
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

    /// The table of device time per label, largest total first, then the totals.
    pub(crate) fn report(&self) -> String {
        let Ok(mut state) = self.state.lock() else {
            return "MAE_CUDA_PROFILE: the profiler's lock is poisoned\n".into();
        };
        state.resolve();
        let mut rows: Vec<(&String, &Total)> = state.totals.iter().collect();
        rows.sort_by(|a, b| b.1.ms.total_cmp(&a.1.ms));
        let all: f64 = rows.iter().map(|r| r.1.ms).sum();
        let mut out = format!("MAE_CUDA_PROFILE: device time per op, {all:.1} ms in all\n");
        let _ = writeln!(
            out,
            "{:>10} {:>6} {:>9} {:>10} {:>9} {:>8}  op",
            "total ms", "%", "calls", "mean us", "TFLOP/s", "GB/s"
        );
        let rate = |x: f64, ms: f64, unit: f64| match x > 0.0 && ms > 0.0 {
            true => format!("{:.1}", x / (ms * unit)),
            false => String::new(),
        };
        for (label, t) in rows {
            let _ = writeln!(
                out,
                "{:>10.2} {:>6.2} {:>9} {:>10.2} {:>9} {:>8}  {label}",
                t.ms,
                100.0 * t.ms / all.max(f64::MIN_POSITIVE),
                t.calls,
                1000.0 * t.ms / t.calls as f64,
                rate(t.flops, t.ms, 1e9),
                rate(t.bytes, t.counted_ms, 1e6),
            );
        }
        if let Some(why) = &state.failed {
            let _ = writeln!(out, "(incomplete: {why})");
        }
        state.write_totals(&mut out);
        state.write_kernels(&mut out);
        out
    }
}

impl State {
    /// The totals the step's floor follows from: the products' FLOPs (GEMMs and attention)
    /// and their time; the other kernels' bytes and time, where counted; the time of the rest.
    fn write_totals(&self, out: &mut String) {
        let (mut products, mut others) = (Total::default(), Total::default());
        for t in self.totals.values() {
            let sum = if t.flops > 0.0 {
                &mut products
            } else {
                &mut others
            };
            sum.ms += t.ms;
            sum.flops += t.flops;
            sum.bytes += t.bytes;
            sum.counted_ms += t.counted_ms;
        }
        let _ = writeln!(
            out,
            "MAE_CUDA_PROFILE: totals: products {:.3} TFLOP in {:.2} ms; other kernels {:.3} GB \
             in {:.2} ms; not counted {:.2} ms",
            products.flops / 1e12,
            products.ms,
            others.bytes / 1e9,
            others.counted_ms,
            others.ms - others.counted_ms,
        );
    }

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
        for (label, work, start, end) in self.pending.drain(..) {
            match start.elapsed_ms(&end) {
                Ok(ms) => {
                    let t = self.totals.entry(label).or_default();
                    let ms = f64::from(ms);
                    t.calls += 1;
                    t.ms += ms;
                    t.flops += work.flops;
                    if let Some(bytes) = work.bytes {
                        t.bytes += bytes;
                        t.counted_ms += ms;
                    }
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

    /// Rows by total time, products with their rate (FLOPs over time), kernels whose traffic
    /// is counted with their bandwidth, then the totals.
    #[test]
    fn the_table_gives_products_their_rate_and_kernels_their_bandwidth() {
        let profile = Profile::default();
        {
            let mut state = profile.state.lock().unwrap();
            let total = |calls, ms, flops, bytes, counted_ms| Total {
                calls,
                ms,
                flops,
                bytes,
                counted_ms,
            };
            state
                .totals
                .insert("gemm 2x3x4".into(), total(4, 2.0, 3e12, 0.0, 0.0));
            state
                .totals
                .insert("layernorm_forward".into(), total(10, 6.0, 0.0, 1.2e10, 6.0));
            state.totals.insert(
                "copy_rows_backward_finish".into(),
                total(1, 0.5, 0.0, 0.0, 0.0),
            );
        }
        let table = profile.report();
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].contains("8.5 ms in all"), "{table}");
        assert!(
            lines[1].contains("TFLOP/s") && lines[1].contains("GB/s"),
            "{table}"
        );
        let cells = |line: &str| {
            line.split_whitespace()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        // 1.2e10 bytes in 6 ms: 2,000 GB/s.
        assert_eq!(
            cells(lines[2]),
            [
                "6.00",
                "70.59",
                "10",
                "600.00",
                "2000.0",
                "layernorm_forward"
            ]
        );
        // 3e12 FLOPs in 2 ms: 1,500 TFLOP/s.
        assert_eq!(
            cells(lines[3]),
            ["2.00", "23.53", "4", "500.00", "1500.0", "gemm", "2x3x4"]
        );
        assert_eq!(
            cells(lines[4]),
            ["0.50", "5.88", "1", "500.00", "copy_rows_backward_finish"]
        );
        assert_eq!(
            lines[5],
            "MAE_CUDA_PROFILE: totals: products 3.000 TFLOP in 2.00 ms; other kernels 12.000 GB \
             in 6.00 ms; not counted 0.50 ms",
            "{table}"
        );
        assert_eq!(
            lines.len(),
            6,
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
        assert!(lines[3].contains("kernel resources"), "{table}");
        assert!(lines[4].contains("occupancy"), "{table}");
        // By name; 5 blocks of 128 threads fill 640 of 2,048: 31 %.
        assert!(
            lines[5].ends_with("(reading the registers: gone)  add_f32"),
            "{table}"
        );
        let cells: Vec<&str> = lines[6].split_whitespace().collect();
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
