//! A small fixed thread pool for every op of the CPU backend.
//!
//! Why not rayon: a training step issues hundreds of short ops, and the pool must not allocate per
//! call (the counting-allocator test checks the step). The GEMMs use it too (matrixmultiply runs
//! single-threaded inside each task), so one set of threads serves every op. It has
//! `threads() - 1` workers; the calling thread works too. A call hands out chunk indices `0..n` from an atomic counter, so which thread
//! runs which chunk varies, but every op here writes each output element from exactly one chunk
//! and never sums across chunks, so results do not depend on the scheduling or the thread count.
//!
//! A call made while the pool is busy (from a worker, or from a second thread using the same
//! backend) runs its chunks on the calling thread instead of waiting.
//!
//! Thread count: `MAE_CPU_THREADS`, else `MATMUL_NUM_THREADS` (the variable matrixmultiply's own
//! threading read, still honoured), else the number of logical CPUs the process may use.

use std::marker::PhantomData;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::thread;

/// Threads the CPU backend's ops use (the caller included), from the environment, at least 1.
pub fn threads() -> usize {
    static THREADS: OnceLock<usize> = OnceLock::new();
    *THREADS.get_or_init(|| {
        let from_env = |name: &str| {
            std::env::var(name)
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
                .filter(|&n| n > 0)
        };
        from_env("MAE_CPU_THREADS")
            .or_else(|| from_env("MATMUL_NUM_THREADS"))
            .unwrap_or_else(|| thread::available_parallelism().map_or(1, |n| n.get()))
            .min(64)
    })
}

/// The job being run: a borrowed closure with its lifetime erased. [`for_each`] does not return
/// before every worker has finished with it, so the borrow outlives every use.
#[derive(Clone, Copy)]
struct Job {
    f: *const (dyn Fn(usize) + Sync),
    n: usize,
}

// SAFETY: the pointee is `Sync`, and the pointer is only dereferenced while `for_each` (which owns
// the borrow) waits for the workers.
unsafe impl Send for Job {}

struct State {
    job: Option<Job>,
    /// Workers that have not yet finished the current job.
    running: usize,
    /// Workers that have started.
    ready: usize,
}

struct Pool {
    /// Worker threads that started.
    workers: AtomicUsize,
    /// Held by the one caller that owns the pool for a job.
    caller: Mutex<()>,
    state: Mutex<State>,
    /// Bumped for every job; workers spin on it briefly before sleeping.
    generation: AtomicU64,
    start: Condvar,
    done: Condvar,
    next: AtomicUsize,
    panicked: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock only means a chunk panicked; the state it guards is still consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Pool {
    /// Runs chunks of `job` until none is left; a panic is recorded, not propagated.
    fn work(&self, job: Job) {
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= job.n {
                return;
            }
            // SAFETY: see `Job`: the closure is alive until every worker reported done.
            let f = unsafe { &*job.f };
            if catch_unwind(AssertUnwindSafe(|| f(i))).is_err() {
                self.panicked.store(true, Ordering::Relaxed);
            }
        }
    }

    fn worker(&self) {
        let mut seen = 0u64;
        crate::gemm::reserve_workspace();
        {
            // Tell `pool()` this thread is up: whatever the runtime allocates for a new thread
            // (and its GEMM workspace, reserved above) has been allocated by now, so it never
            // lands inside a later op.
            let mut st = lock(&self.state);
            st.ready += 1;
            self.done.notify_all();
        }
        loop {
            // Spin a little first: ops come in quick succession, and waking a sleeping thread
            // costs more than many ops take.
            for _ in 0..20_000 {
                if self.generation.load(Ordering::Acquire) != seen {
                    break;
                }
                std::hint::spin_loop();
            }
            let job = {
                let mut st = lock(&self.state);
                loop {
                    // The job and its generation are published together under the lock, and a
                    // job cannot finish before this worker reports, so a new generation always
                    // comes with its job.
                    let g = self.generation.load(Ordering::Acquire);
                    if g != seen {
                        if let Some(job) = st.job {
                            seen = g;
                            break job;
                        }
                    }
                    st = self.start.wait(st).unwrap_or_else(|e| e.into_inner());
                }
            };
            self.work(job);
            let mut st = lock(&self.state);
            st.running -= 1;
            if st.running == 0 {
                self.done.notify_all();
            }
        }
    }
}

fn pool() -> Option<&'static Pool> {
    static POOL: OnceLock<Option<&'static Pool>> = OnceLock::new();
    *POOL.get_or_init(|| {
        let workers = threads() - 1;
        if workers == 0 {
            return None;
        }
        let pool: &'static Pool = Box::leak(Box::new(Pool {
            workers: AtomicUsize::new(0),
            caller: Mutex::new(()),
            state: Mutex::new(State {
                job: None,
                running: 0,
                ready: 0,
            }),
            generation: AtomicU64::new(0),
            start: Condvar::new(),
            done: Condvar::new(),
            next: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
        }));
        let mut started = 0;
        for k in 0..workers {
            let spawned = thread::Builder::new()
                .name(format!("mae-cpu-{k}"))
                .spawn(move || pool.worker());
            if spawned.is_ok() {
                started += 1;
            }
        }
        if started == 0 {
            return None;
        }
        pool.workers.store(started, Ordering::Relaxed);
        let mut st = lock(&pool.state);
        while st.ready < started {
            st = pool.done.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        drop(st);
        Some(pool)
    })
}

/// Calls `f(i)` once for every `i` in `0..n`, spread over the pool's threads; returns when all
/// calls have returned. A panic in any call is re-raised here.
pub fn for_each(n: usize, f: impl Fn(usize) + Sync) {
    let sequential = |f: &dyn Fn(usize)| (0..n).for_each(f);
    if n <= 1 {
        return sequential(&f);
    }
    let Some(pool) = pool() else {
        return sequential(&f);
    };
    let Ok(_owner) = pool.caller.try_lock() else {
        return sequential(&f);
    };
    let dynf: &(dyn Fn(usize) + Sync) = &f;
    // SAFETY: only the lifetime is erased (same fat-pointer layout); the workers stop using the
    // pointer before this function returns (we wait for `running == 0` below).
    let erased: *const (dyn Fn(usize) + Sync + 'static) = unsafe { std::mem::transmute(dynf) };
    let job = Job { f: erased, n };
    pool.next.store(0, Ordering::Relaxed);
    pool.panicked.store(false, Ordering::Relaxed);
    {
        let mut st = lock(&pool.state);
        st.job = Some(job);
        st.running = pool.workers.load(Ordering::Relaxed);
        pool.generation.fetch_add(1, Ordering::Release);
        pool.start.notify_all();
    }
    pool.work(job);
    let mut st = lock(&pool.state);
    while st.running > 0 {
        st = pool.done.wait(st).unwrap_or_else(|e| e.into_inner());
    }
    st.job = None;
    drop(st);
    if pool.panicked.load(Ordering::Relaxed) {
        panic!("a parallel chunk of a CPU backend op panicked");
    }
}

/// A mutable slice cut into consecutive chunks of `chunk` elements (the last may be shorter) that
/// parallel calls take one each.
pub struct Chunks<'a, T> {
    ptr: *mut T,
    len: usize,
    chunk: usize,
    _borrow: PhantomData<&'a mut [T]>,
}

// SAFETY: a `Chunks` only hands out disjoint `&mut [T]`, which may be sent to other threads when
// `T: Send`.
unsafe impl<T: Send> Sync for Chunks<'_, T> {}

impl<'a, T> Chunks<'a, T> {
    /// `s` in chunks of `chunk` (at least 1) elements.
    pub fn new(s: &'a mut [T], chunk: usize) -> Self {
        Chunks {
            ptr: s.as_mut_ptr(),
            len: s.len(),
            chunk: chunk.max(1),
            _borrow: PhantomData,
        }
    }

    /// Number of chunks.
    pub fn count(&self) -> usize {
        self.len.div_ceil(self.chunk)
    }

    /// Chunk `i` (empty past the end).
    ///
    /// # Safety
    /// Each `i` may be taken at most once while the chunks are alive.
    unsafe fn take(&self, i: usize) -> &'a mut [T] {
        let start = (i * self.chunk).min(self.len);
        let end = (start + self.chunk).min(self.len);
        // SAFETY: `start..end` lies within the borrowed slice, and chunks of distinct `i` are
        // disjoint; the caller takes each `i` once.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), end - start) }
    }
}

/// `f(i, chunk_i of a)` for every chunk of `a`, in parallel.
pub fn chunks1<A: Send>(a: &mut [A], ca: usize, f: impl Fn(usize, &mut [A]) + Sync) {
    let a = Chunks::new(a, ca);
    // SAFETY: `for_each` calls each index exactly once.
    for_each(a.count(), |i| f(i, unsafe { a.take(i) }));
}

/// `f(i, chunk_i of a, chunk_i of b)` for `i` in `0..n`, in parallel.
pub fn chunks2<A: Send, B: Send>(
    n: usize,
    a: &mut [A],
    ca: usize,
    b: &mut [B],
    cb: usize,
    f: impl Fn(usize, &mut [A], &mut [B]) + Sync,
) {
    let (a, b) = (Chunks::new(a, ca), Chunks::new(b, cb));
    for_each(n, |i| {
        // SAFETY: `for_each` calls each index exactly once.
        let (ai, bi) = unsafe { (a.take(i), b.take(i)) };
        f(i, ai, bi)
    });
}

/// `f(i, chunk_i of a, chunk_i of b, chunk_i of c)` for `i` in `0..n`, in parallel.
pub fn chunks3<A: Send, B: Send, C: Send>(
    n: usize,
    (a, ca): (&mut [A], usize),
    (b, cb): (&mut [B], usize),
    (c, cc): (&mut [C], usize),
    f: impl Fn(usize, &mut [A], &mut [B], &mut [C]) + Sync,
) {
    let (a, b, c) = (Chunks::new(a, ca), Chunks::new(b, cb), Chunks::new(c, cc));
    for_each(n, |i| {
        // SAFETY: `for_each` calls each index exactly once.
        let (ai, bi, ci) = unsafe { (a.take(i), b.take(i), c.take(i)) };
        f(i, ai, bi, ci)
    });
}

/// `f(i, [chunk_i of each slice])` for `i` in `0..n`, in parallel: any number of slices of one
/// element type, each cut into chunks of its own length.
pub fn zip_chunks<T: Send, const K: usize>(
    n: usize,
    slices: [(&mut [T], usize); K],
    f: impl Fn(usize, [&mut [T]; K]) + Sync,
) {
    let chunks = slices.map(|(s, c)| Chunks::new(s, c));
    for_each(n, |i| {
        // SAFETY: `for_each` calls each index exactly once.
        f(i, chunks.each_ref().map(|c| unsafe { c.take(i) }))
    });
}

/// Rows per parallel chunk for rows of `cols` elements: about `GRAIN` elements, at least one row.
pub fn rows_per_chunk(cols: usize) -> usize {
    (GRAIN / cols.max(1)).max(1)
}

/// Elements per parallel chunk of an elementwise op: big enough that handing out a chunk costs
/// little, small enough that two threads finish close together.
pub const GRAIN: usize = 16 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_index_runs_once() {
        let hits: Vec<AtomicUsize> = (0..1000).map(|_| AtomicUsize::new(0)).collect();
        for_each(hits.len(), |i| {
            hits[i].fetch_add(1, Ordering::Relaxed);
        });
        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
    }

    #[test]
    fn nested_calls_run_inline() {
        let total = AtomicUsize::new(0);
        for_each(8, |_| {
            for_each(8, |_| {
                total.fetch_add(1, Ordering::Relaxed);
            })
        });
        assert_eq!(total.load(Ordering::Relaxed), 64);
    }

    #[test]
    fn chunks_cover_the_slice_once() {
        let mut v = vec![0u32; 1001];
        chunks1(&mut v, 100, |i, c| {
            for x in c.iter_mut() {
                *x += i as u32 + 1;
            }
        });
        for (j, &x) in v.iter().enumerate() {
            assert_eq!(x, (j / 100) as u32 + 1);
        }
    }

    #[test]
    fn concurrent_callers_both_finish() {
        let h: Vec<_> = (0..3)
            .map(|_| {
                thread::spawn(|| {
                    let mut v = vec![1.0f32; 100_000];
                    for _ in 0..50 {
                        chunks1(&mut v, 1000, |_, c| c.iter_mut().for_each(|x| *x *= 1.0));
                    }
                    v.iter().all(|&x| x == 1.0)
                })
            })
            .collect();
        assert!(h.into_iter().all(|t| t.join().unwrap()));
    }

    #[test]
    fn a_panicking_chunk_panics_the_caller_and_the_pool_survives() {
        let r = std::panic::catch_unwind(|| {
            for_each(16, |i| {
                if i == 7 {
                    panic!("boom");
                }
            })
        });
        assert!(r.is_err());
        every_index_runs_once();
    }
}
