//! Tuning cuBLASLt's products on the card (`MAE_CUDA_GEMM_TUNE=FILE`).
//!
//! cuBLASLt's heuristic ranks its algorithms for a product by a model of the card, and `lt.rs`
//! runs the first. With `MAE_CUDA_GEMM_TUNE` naming a file, the first time a backend meets a
//! product shape that the file does not list, it times the heuristic's best few candidates on
//! the product's own operands (into scratch, so nothing is written twice), runs the fastest,
//! and adds it to the file (`table.rs`); a shape the file lists runs its recorded algorithm
//! without timing. Plain `gemm`s of one matrix then run on cuBLASLt too (no epilogue), so that
//! every product of a Linear layer is tuned. And each bf16 weight gradient is run whole and in
//! the chunk counts worth trying (`split_k::tuning_candidates`: products and partial sums
//! together, 5 runs each), and the fastest count joins the file, where `split_k::chunks`
//! otherwise estimates it from the heuristic's waves. A count other than the estimate's runs
//! only where it beat the estimate by 15 % (`table::SPLIT_MARGIN`): timed alone, the ways of a
//! weight gradient ranked otherwise than in a step.
//!
//! So a run with a table chooses the same algorithms every time, which keeps the backend
//! bitwise repeatable: every algorithm computes the same product within the GEMM tolerance,
//! but each sums in its own order, so choosing by a stopwatch in every process would not.
//! Without the variable nothing is timed: in the bf16 mode a table measured on the same
//! cuBLASLt version and card and kept in the crate (`tables/`, `table::BUILTIN`) runs where
//! there is one, read-only (shapes it does not list run the heuristic's first, weight gradients
//! it does not list `split_k`'s estimate), and elsewhere, or with
//! `MAE_CUDA_GEMM_TABLE=heuristic`, the heuristic's first choices run, as they always did.
//! Timing waits for the device, once per shape new to the table. PyTorch's TunableOp keeps such
//! a file for the same reasons.

use super::table::{self, Split, TuneError, TuneTable, Tuned};
use super::{column_major, types, Call, Epilogue, Found, GemmBias, Lt, Shape, Vector};
use crate::backend::Precision;
use crate::buffer::CudaBuf;
use crate::error;
use crate::split_k;
use crate::CudaBackend;
use cudarc::cublaslt::sys::{self, cublasComputeType_t, cublasLtMatmulAlgo_t};
use cudarc::driver::sys::{CUdevice_attribute, CUevent_flags};
use cudarc::driver::{CudaEvent, DevicePtrMut};
use mae::backend::{BResult, BackendError, BackendErrorKind, Gemm};
use std::collections::HashMap;
use std::panic::catch_unwind;
use std::path::Path;

/// The tuning state of a backend.
pub(super) struct Tuning {
    table: TuneTable,
    /// The algorithm each shape met so far runs, from the table or timed.
    chosen: HashMap<Shape, Found>,
    /// The chunks each weight gradient met so far runs in, by its whole product's shape.
    chunks: HashMap<Shape, usize>,
    /// Shapes and splits timed by this backend (the others came from the table).
    timed: usize,
}

impl Tuning {
    /// Forgets the algorithm chosen for `shape`, which the library turned down.
    pub(super) fn forget(&mut self, shape: &Shape) {
        self.chosen.remove(shape);
    }
}

impl Shape {
    /// The shape's line key in a tuning table (`table.rs`), with the product's compute type.
    fn key(&self, compute: cublasComputeType_t) -> String {
        let cm = &self.cm;
        let t = |trans: bool| if trans { 'T' } else { 'N' };
        let ty = |bf16: bool| if bf16 { "bf16" } else { "f32" };
        let epilogue = match self.epilogue {
            Epilogue::Default => "product",
            Epilogue::Bias => "bias",
            Epilogue::BiasGrad => "bgradb",
        };
        let compute = format!("{compute:?}");
        format!(
            "{epilogue} {}{} m{} n{} k{} ld{},{},{} {}>{} {} x{}",
            t(cm.trans_first),
            t(cm.trans_second),
            cm.m,
            cm.n,
            cm.k,
            cm.ld_first,
            cm.ld_second,
            cm.ldc,
            ty(self.bf16_copies),
            ty(self.out16),
            compute.trim_start_matches("CUBLAS_COMPUTE_"),
            self.chunks
        )
    }

    /// Bytes of the output matrices D (the chunks' partials, where split).
    fn out_bytes(&self) -> usize {
        let each = if self.out16 { 2 } else { 4 };
        self.cm.ldc * self.cm.n * self.chunks * each
    }
}

impl CudaBackend {
    /// Into how many chunks to split the weight gradient `g`: `estimate` (`split_k::chunks`)
    /// unless the backend tunes; then the count chosen earlier for the shape, else the table's
    /// where it beat the estimate by the split margin (`Split::beats_estimate`), else the
    /// fastest of `split_k::tuning_candidates` by that margin (`table::fastest_split`), each
    /// run whole (products and sums) into scratch once to tune its products and then
    /// [`table::RUNS`] times between two events, which joins the table.
    pub(super) fn tuned_chunks(
        &self,
        g: &Gemm,
        (a, b): (&CudaBuf, &CudaBuf),
        epilogue: (Epilogue, u64),
        (estimate, waves): (usize, f32),
    ) -> BResult<usize> {
        let Some(lt) = self.lt() else {
            return Ok(estimate);
        };
        let whole = Shape {
            cm: column_major(g),
            bf16_copies: true,
            out16: false,
            epilogue: epilogue.0,
            chunks: 1,
        };
        let key = whole.key(types(Precision::Bf16, true).1);
        {
            let mut lt = lt
                .lock()
                .map_err(|_| error::device("the cuBLASLt handle's lock is poisoned"))?;
            let Some(tuning) = lt.tuning.as_mut() else {
                return Ok(estimate);
            };
            if let Some(&chunks) = tuning.chunks.get(&whole) {
                return Ok(chunks);
            }
            if let Some(split) = tuning.table.split(&key) {
                let chunks = match split.beats_estimate() {
                    true => split.chunks,
                    false => estimate,
                };
                tuning.chunks.insert(whole, chunks);
                return Ok(chunks);
            }
            if tuning.table.read_only() {
                tuning.chunks.insert(whole, estimate);
                return Ok(estimate);
            }
        }
        let candidates = split_k::tuning_candidates(g.k, waves);
        let (mut c, mut db) = (self.alloc_scratch(g.m * g.n)?, self.alloc_scratch(g.m)?);
        let mut times = Vec::with_capacity(candidates.len());
        for &chunks in &candidates {
            let mut run =
                || self.lt_weight_grad(g, (a, b), epilogue, (chunks, waves), (&mut c, &mut db));
            if !run()? {
                times.push(None);
                continue;
            }
            let start = self.record_timing_event()?;
            for _ in 0..table::RUNS {
                run()?;
            }
            let end = self.record_timing_event()?;
            let ms = start
                .elapsed_ms(&end)
                .map_err(|e| error::driver(e, "timing a weight gradient", 0))?;
            times.push(Some(1000.0 * ms as f64 / table::RUNS as f64));
        }
        let i = table::fastest_split(&times).unwrap_or(0);
        let chunks = candidates[i];
        let mut lt = lt
            .lock()
            .map_err(|_| error::device("the cuBLASLt handle's lock is poisoned"))?;
        if let Some(tuning) = lt.tuning.as_mut() {
            if let Some(us) = times[i] {
                let policy_us = times[0].unwrap_or(0.0);
                let split = Split {
                    chunks,
                    us,
                    policy_us,
                };
                tuning.table.insert_split(key, split).map_err(tune_error)?;
                tuning.timed += 1;
            }
            tuning.chunks.insert(whole, chunks);
        }
        Ok(chunks)
    }

    /// The algorithm to run `call` (for `shape`) with: `first`, the heuristic's first, unless
    /// the backend tunes (`table.rs`); then the one chosen earlier for the shape, else the
    /// table's, else the fastest candidate [`CudaBackend::measure`] finds, which joins the
    /// table.
    ///
    /// # Safety
    /// As [`Lt::matmul`] for `call` with `beta`, A and B at `first` and `second` and C at `c`
    /// (read where beta is not 0); D is not written.
    pub(super) unsafe fn tuned(
        &self,
        lt: &mut Lt,
        (call, shape, first): (&Call, Shape, Found),
        g: &Gemm,
        beta: f32,
        operands: [u64; 3],
    ) -> BResult<Found> {
        let Some(tuning) = lt.tuning.as_ref() else {
            return Ok(first);
        };
        if let Some(&chosen) = tuning.chosen.get(&shape) {
            return Ok(chosen);
        }
        let key = shape.key(types(self.precision(), shape.bf16_copies).1);
        let chosen = match tuning.table.get(&key) {
            Some(t) => Found {
                algo: cublasLtMatmulAlgo_t { data: t.algo },
                waves: t.waves,
            },
            // A built-in table is only read: its shapes run their choices, the others the
            // heuristic's first, nothing timed.
            None if tuning.table.read_only() => first,
            None => {
                // SAFETY: the caller's promise.
                let (chosen, tuned) =
                    unsafe { self.measure(lt, (call, shape, first), g, beta, operands) }?;
                if let (Some(tuned), Some(tuning)) = (tuned, lt.tuning.as_mut()) {
                    tuning.table.insert(key, tuned).map_err(tune_error)?;
                    tuning.timed += 1;
                }
                chosen
            }
        };
        if let Some(tuning) = lt.tuning.as_mut() {
            tuning.chosen.insert(shape, chosen);
        }
        Ok(chosen)
    }

    /// Times the heuristic's best [`table::CANDIDATES`] algorithms for `call`, each run once and
    /// then [`table::RUNS`] times between two events, into a scratch D (C read where beta is
    /// not 0, the epilogue's vector used as the real call will), and returns the one
    /// [`table::fastest`] picks with its record; `first` and no record where none could run.
    /// Waits for the device: a tuning run synchronizes once per new shape.
    ///
    /// # Safety
    /// As [`CudaBackend::tuned`].
    unsafe fn measure(
        &self,
        lt: &mut Lt,
        (call, shape, first): (&Call, Shape, Found),
        g: &Gemm,
        beta: f32,
        [a, b, c]: [u64; 3],
    ) -> BResult<(Found, Option<Tuned>)> {
        let mut candidates = lt.heuristics(call, table::CANDIDATES).unwrap_or_default();
        if candidates.is_empty() {
            candidates.push(first);
        }
        let bytes = shape.out_bytes();
        // SAFETY: the candidates write D before anything reads it, and nothing else does.
        let mut scratch = unsafe { self.stream.alloc::<u8>(bytes) }
            .map_err(|e| error::driver(e, "allocating a product to tune into", bytes))?;
        let d = scratch.device_ptr_mut(&self.stream).0;
        let c = if beta != 0.0 { c } else { d };
        let record = || self.record_timing_event();
        let mut events = Vec::with_capacity(candidates.len());
        for found in &candidates {
            // SAFETY: the caller's promise for A, B, C and the epilogue's vector; D is the
            // scratch just allocated, of the layout's size; `found` is one of the heuristic's
            // algorithms for `call`.
            let mut run =
                || unsafe { lt.matmul(call, found, (g.alpha, beta), (a, b), (c, d), &self.stream) };
            // A candidate that cannot run (the library refuses it) is left out.
            if run().is_err() {
                events.push(None);
                continue;
            }
            let start = record()?;
            let ran = (0..table::RUNS).all(|_| run().is_ok());
            let end = record()?;
            events.push(ran.then_some((start, end)));
        }
        let mut times = Vec::with_capacity(events.len());
        for pair in &events {
            times.push(match pair {
                Some((start, end)) => Some(
                    start
                        .elapsed_ms(end)
                        .map_err(|e| error::driver(e, "timing a product", 0))?
                        as f64
                        * 1000.0
                        / table::RUNS as f64,
                ),
                None => None,
            });
        }
        drop(scratch);
        let Some(i) = table::fastest(&times) else {
            return Ok((first, None));
        };
        let chosen = candidates[i];
        let tuned = Tuned {
            algo: chosen.algo.data,
            waves: chosen.waves,
            us: times[i].unwrap_or(0.0),
            first_us: times[0].unwrap_or(0.0),
        };
        Ok((chosen, Some(tuned)))
    }

    /// An event on the backend's stream that can time what is queued between two of them.
    fn record_timing_event(&self) -> BResult<CudaEvent> {
        self.stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| error::driver(e, "recording an event to time a product", 0))
    }

    /// A buffer of `len` floats for results that are only timed.
    fn alloc_scratch(&self, len: usize) -> BResult<CudaBuf> {
        mae::backend::Backend::alloc(self, len)
    }

    /// Starts tuning the products (`MAE_CUDA_GEMM_TUNE`) with the table in `path`, made for this
    /// cuBLASLt version and card (`table.rs`). An `Unsupported` error where cuBLASLt is off or
    /// missing, or the table cannot be used.
    pub(crate) fn start_tuning(&self, path: &Path) -> BResult<()> {
        let unsupported = |why: String| BackendError::new(BackendErrorKind::Unsupported, why);
        if self.gemm_bias != GemmBias::Lt {
            return Err(unsupported(
                "MAE_CUDA_GEMM_TUNE tunes cuBLASLt's products, which MAE_CUDA_GEMM_BIAS=composed \
                 turns off"
                    .into(),
            ));
        }
        if self.lt().is_none() {
            return Err(unsupported(
                "MAE_CUDA_GEMM_TUNE tunes cuBLASLt's products, and libcublasLt is missing".into(),
            ));
        }
        let here = self
            .made_for()?
            .ok_or_else(|| unsupported("MAE_CUDA_GEMM_TUNE: cuBLASLt has no version".into()))?;
        self.run_table(TuneTable::open(path, &here).map_err(tune_error)?)
    }

    /// Runs the built-in table made for this cuBLASLt version and card, if there is one
    /// (`table::BUILTIN`, `MAE_CUDA_GEMM_TABLE=builtin`): its choices, nothing timed. Returns
    /// whether there was one; none where cuBLASLt is off or missing.
    pub(crate) fn start_builtin_table(&self) -> BResult<bool> {
        if self.gemm_bias != GemmBias::Lt || self.lt().is_none() {
            return Ok(false);
        }
        let Some(here) = self.made_for()? else {
            return Ok(false);
        };
        match TuneTable::builtin(&here).map_err(tune_error)? {
            Some(table) => self.run_table(table).map(|()| true),
            None => Ok(false),
        }
    }

    /// The `made-for` words of a table for this backend's cuBLASLt and card (`table::made_for`);
    /// `None` where the library reports no version. Only where cuBLASLt is loaded.
    fn made_for(&self) -> BResult<Option<String>> {
        // SAFETY: a query of the loaded library's version, without arguments; cudarc panics
        // where the symbol is missing.
        let Ok(version) = catch_unwind(|| unsafe { sys::cublasLtGetVersion() }) else {
            return Ok(None);
        };
        let sms = self
            .ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| error::driver(e, "reading the multiprocessor count", 0))?;
        Ok(Some(table::made_for(version, self.device_name(), sms)))
    }

    /// Products from now on run `table`'s choices (and, where it is a file, add to it).
    fn run_table(&self, table: TuneTable) -> BResult<()> {
        let Some(lt) = self.lt() else {
            return Ok(());
        };
        let mut lt = lt
            .lock()
            .map_err(|_| error::device("the cuBLASLt handle's lock is poisoned"))?;
        lt.tuning = Some(Tuning {
            table,
            chosen: HashMap::new(),
            chunks: HashMap::new(),
            timed: 0,
        });
        Ok(())
    }

    /// Whether products are tuned (`MAE_CUDA_GEMM_TUNE`).
    pub(crate) fn tuning(&self) -> bool {
        let lt = self.lt.get().and_then(Option::as_ref);
        lt.and_then(|lt| lt.lock().ok().map(|lt| lt.tuning.is_some()))
            .unwrap_or(false)
    }

    /// A plain `gemm` of one matrix on cuBLASLt, where products are tuned: `true` once queued;
    /// `false`, with nothing queued that changes `c`, where not tuning or cuBLASLt has no
    /// algorithm for it (the caller then runs cuBLAS).
    pub(crate) fn gemm_lt(
        &self,
        g: &Gemm,
        a: &CudaBuf,
        b: &CudaBuf,
        c: &mut CudaBuf,
    ) -> BResult<bool> {
        if !self.lt_takes(g) || !self.tuning() {
            return Ok(false);
        }
        self.lt_product(g, a, b, Vector::None, None, c)
    }
}

/// A tuning table that cannot be used, as the backend's error.
fn tune_error(e: TuneError) -> BackendError {
    BackendError::new(BackendErrorKind::Unsupported, e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a device (or the fake driver): with a tuning table, `gemm`, `gemm_bias` and
    /// `gemm_bias_grad` run on cuBLASLt with the algorithm timed fastest, and the weight
    /// gradient in the number of chunks timed fastest, which the table keeps; a second backend
    /// on the same table times nothing and runs the same algorithms. The results equal the
    /// untuned backend's bitwise (operands whose every sum is exact). Over the fake driver,
    /// whose candidate 1 is modeled twice as fast as the heuristic's first and whose batched
    /// products cost more than whole ones, the table holds candidate 1 and a whole weight
    /// gradient (where `split_k::chunks` estimates 4 chunks), and the product takes candidate
    /// 1's modeled time.
    #[test]
    fn tuned_products_run_the_fastest_algorithm_and_the_table_keeps_it() {
        use crate::bf16::Bf16Gemm;
        use cudarc::driver::sys::CUevent_flags;
        use mae::backend::Backend;
        let Some(plain) = crate::test_device(Precision::Bf16) else {
            return;
        };
        let dir = std::env::temp_dir().join(format!("mae-tuning-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("table.txt");
        let _ = std::fs::remove_file(&path);
        // Small products on bf16 copies (`Bf16Gemm::Copies`), the weight gradient's 2,048 rows
        // enough for chunks.
        let (rows, out, inputs) = (2048, 64, 64);
        let wave = |i: usize, period: usize| ((i % period) as f32 - period as f32 / 2.0) / 16.0;
        let x: Vec<f32> = (0..rows * inputs).map(|i| wave(i, 31)).collect();
        let w: Vec<f32> = (0..out * inputs).map(|i| wave(i, 29)).collect();
        let dy: Vec<f32> = (0..rows * out).map(|i| wave(i, 23)).collect();
        let bias: Vec<f32> = (0..out).map(|i| wave(i, 7)).collect();
        let forward = Gemm::new(rows, out, inputs).trans_b();
        let backward = Gemm::new(out, inputs, rows).trans_a().accumulate();
        // y = x w^T + bias, x w^T, dW += dy^T x with db, on the backend `be`; and the modeled
        // milliseconds of the plain product, timed by events around its second run.
        let run = |be: &mut CudaBackend| {
            be.bf16_gemm = Bf16Gemm::Copies;
            let (xb, wb, bb) = (
                be.upload(&x).unwrap(),
                be.upload(&w).unwrap(),
                be.upload(&bias).unwrap(),
            );
            let mut y = be.alloc(rows * out).unwrap();
            be.gemm_bias(&forward, &xb, &wb, &bb, &mut y).unwrap();
            let mut p = be.alloc(rows * out).unwrap();
            // Timed the second time: the first, meeting the shape, tunes it.
            be.gemm(&forward, &xb, &wb, &mut p).unwrap();
            let flags = Some(CUevent_flags::CU_EVENT_DEFAULT);
            let start = be.stream.record_event(flags).unwrap();
            be.gemm(&forward, &xb, &wb, &mut p).unwrap();
            let end = be.stream.record_event(flags).unwrap();
            let ms = start.elapsed_ms(&end).unwrap();
            let mut dw = be.upload(&vec![0.5; out * inputs]).unwrap();
            let mut db = be.upload(&vec![0.25; out]).unwrap();
            let dyb = be.upload(&dy).unwrap();
            be.gemm_bias_grad(&backward, &dyb, &xb, &mut dw, &mut db)
                .unwrap();
            let mut got = vec![];
            for buf in [&y, &p, &dw, &db] {
                let mut host = vec![f32::NAN; buf.len()];
                be.download(buf, &mut host).unwrap();
                got.push(host);
            }
            (got, ms)
        };
        let mut plain = plain;
        let (want, _) = run(&mut plain);
        let mut tuned = crate::test_device(Precision::Bf16).unwrap();
        tuned.start_tuning(&path).unwrap();
        let (got, ms) = run(&mut tuned);
        // Products of multiples of 2^-4 under 1, summed 2,048 at most: under 20 bits, exact in
        // f32 in any order.
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                g == w,
                "result {i} of the tuned backend differs from the untuned one's"
            );
        }
        let (timed, entries, splits) = {
            let lt = tuned.lt().expect("cuBLASLt").lock().unwrap();
            let tuning = lt.tuning.as_ref().expect("tuning");
            let key = |s: &Shape| s.key(types(Precision::Bf16, s.bf16_copies).1);
            let entries: Vec<Tuned> = tuning
                .chosen
                .keys()
                .map(|s| tuning.table.get(&key(s)).unwrap())
                .collect();
            let splits: Vec<Split> = tuning
                .chunks
                .keys()
                .map(|s| tuning.table.split(&key(s)).unwrap())
                .collect();
            (tuning.timed, entries, splits)
        };
        // gemm_bias, gemm and the weight gradient (whole and in each chunk count tried); one
        // weight gradient's split.
        assert!(entries.len() >= 3, "{entries:?}");
        assert_eq!(splits.len(), 1, "{splits:?}");
        assert_eq!(timed, entries.len() + splits.len());
        if tuned.device_name().contains("fake libcuda") {
            for t in &entries {
                assert_eq!(t.algo[1], 1, "the modeled fastest candidate: {t:?}");
                assert!(t.us < t.first_us, "{t:?}");
            }
            assert_eq!(splits[0].chunks, 1, "{splits:?}");
            assert!(splits[0].us < splits[0].policy_us, "{splits:?}");
            let modeled = 2.0 * (rows * out * inputs) as f32 / 1e9 * 0.5;
            assert!(
                (ms - modeled).abs() < 1e-6 * modeled,
                "{ms} ms, want {modeled}"
            );
        }
        drop(tuned);
        let mut again = crate::test_device(Precision::Bf16).unwrap();
        again.start_tuning(&path).unwrap();
        let (got, _) = run(&mut again);
        assert!(got == want, "the table's algorithms changed a result");
        let lt = again.lt().expect("cuBLASLt").lock().unwrap();
        assert_eq!(
            lt.tuning.as_ref().unwrap().timed,
            0,
            "the table lists every shape"
        );
        drop(lt);
        // The same table read-only, as a built-in one (`MAE_CUDA_GEMM_TABLE`), without its plain
        // product: its other products run its algorithms, the plain product the heuristic's
        // first; nothing is timed and nothing written. The weight gradient runs the table's
        // count where the table's times show it beating the estimate by the split margin (the
        // fake driver's whole product: by 23 %), else `split_k`'s estimate: without the split
        // line, and with it claiming a whole product 5 % faster.
        let text = std::fs::read_to_string(&path).unwrap();
        let here = text
            .lines()
            .find_map(|l| l.strip_prefix("made-for\t"))
            .unwrap();
        let variant = |split: &dyn Fn(&str) -> Option<String>| -> String {
            text.lines()
                .filter(|l| !l.starts_with("product "))
                .filter_map(|l| match l.starts_with("split\t") {
                    true => split(l),
                    false => Some(l.to_string()),
                })
                .map(|l| format!("{l}\n"))
                .collect()
        };
        let marginal = |l: &str| {
            let f: Vec<&str> = l.split('\t').collect();
            Some(format!("{}\t{}\t{}\t95\t100", f[0], f[1], f[2]))
        };
        let fake = plain.device_name().contains("fake libcuda");
        for (table, want_chunks) in [
            (variant(&|_| None), 4),
            (variant(&|l| Some(l.to_string())), 1),
            (variant(&marginal), 4),
        ] {
            let table = TuneTable::read_only_from("test", &table, here)
                .unwrap()
                .unwrap();
            let mut builtin = crate::test_device(Precision::Bf16).unwrap();
            builtin.run_table(table).unwrap();
            let (got, _) = run(&mut builtin);
            assert!(got == want, "the read-only table changed a result");
            let lt = builtin.lt().expect("cuBLASLt").lock().unwrap();
            let tuning = lt.tuning.as_ref().unwrap();
            assert_eq!(tuning.timed, 0, "a read-only table times nothing");
            let key = |s: &Shape| s.key(types(Precision::Bf16, s.bf16_copies).1);
            let mut unlisted = 0;
            for (shape, found) in &tuning.chosen {
                match tuning.table.get(&key(shape)) {
                    Some(listed) => assert_eq!(found.algo.data, listed.algo, "{}", key(shape)),
                    None => {
                        unlisted += 1;
                        if fake {
                            assert_eq!(found.algo.data[1], 0, "the heuristic's first");
                        }
                    }
                }
            }
            assert_eq!(unlisted, 1, "the plain product");
            let chunks: Vec<usize> = tuning.chunks.values().copied().collect();
            if fake {
                assert_eq!(chunks, vec![want_chunks], "the weight gradient's chunks");
            }
        }
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A table made for another card, or tuning with cuBLASLt turned off, is refused with an
    /// error that says why, and the table stays as it was.
    #[test]
    fn tuning_refuses_a_table_it_cannot_use() {
        let Some(mut be) = crate::test_device(Precision::Bf16) else {
            return;
        };
        let dir = std::env::temp_dir().join(format!("mae-tuning-refused-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("table.txt");
        let other = "made-for\tcuBLASLt 1 on another card (1 multiprocessors)\n";
        std::fs::write(&path, other).unwrap();
        let e = be.start_tuning(&path).unwrap_err();
        assert_eq!(e.kind, BackendErrorKind::Unsupported);
        assert!(e.message.contains("another card"), "{e}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), other);
        be.gemm_bias = GemmBias::Composed;
        let e = be.start_tuning(&dir.join("new.txt")).unwrap_err();
        assert!(e.message.contains("MAE_CUDA_GEMM_BIAS=composed"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
