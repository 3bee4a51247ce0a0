//! Batches from a [`Dataset`], decoded and augmented by worker threads ahead of the training loop.
//!
//! Determinism: the contents of global batch `k` depend only on the dataset, the seed and `k`.
//! Epoch `e = k / batches_per_epoch` visits the items in a permutation drawn from `(seed, e)`; the
//! sample at position `p` of the epoch is augmented with a generator drawn from `(seed, e, p)`.
//! Workers build chunks of batches in any order and at any speed; the loader hands batches out in
//! order. So the worker count does not change a batch, and a run resumed at batch `k` sees exactly
//! the batches an uninterrupted run would have.
//!
//! Data-parallel training splits every batch into [`Shard`]s: the loader of shard `r` of `n`
//! builds only samples `r * b .. (r + 1) * b` of each batch (`b = batch_size / n`), with the same
//! items and generators as the whole batch, so the `n` processes of a job see together exactly
//! the batches one process would, each sample once.
//!
//! Unreadable items (a corrupt JPEG) are replaced by the next item of the epoch's permutation
//! that decodes, augmented with the replaced sample's generator, and listed in [`Batch::skipped`];
//! a batch in which more attempts fail than succeed is an error.

use super::{Augment, DataError, Dataset};
use mae::rng::Rng;
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

/// Sub-streams of the loader's seed, so that permutations and augmentations never share numbers.
const PERMUTATION_STREAM: u64 = 1;
const AUGMENT_STREAM: u64 = 2;
/// Largest number of samples one work unit holds.
const MAX_CHUNK: usize = 32;
/// Items tried for one sample before giving up on the batch.
const MAX_TRIES_PER_SAMPLE: usize = 16;

/// How the loader batches, shuffles and augments.
#[derive(Clone, Debug, PartialEq)]
pub struct LoaderOptions {
    /// Images per batch (of the whole batch when sharded: each shard gets `batch_size /
    /// shard.count`); the last partial batch of an epoch is dropped, as the official loader does
    /// (`drop_last=True`).
    pub batch_size: usize,
    /// Worker threads decoding and augmenting.
    pub workers: usize,
    /// Batches built ahead of the one the training loop is using.
    pub prefetch: usize,
    /// Seed of the permutations and augmentations.
    pub seed: u64,
    /// Visit each epoch in a fresh random order (else in dataset order).
    pub shuffle: bool,
    pub augment: Augment,
    /// The part of every batch this loader builds ([`Shard::WHOLE`] unless data-parallel).
    pub shard: Shard,
}

/// One of `count` equal slices of every batch: data-parallel rank `index` of `count`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    /// Which slice, `0..count`.
    pub index: usize,
    /// Slices per batch; it must divide the batch size.
    pub count: usize,
}

impl Shard {
    /// The whole batch.
    pub const WHOLE: Shard = Shard { index: 0, count: 1 };

    /// The positions within a batch of `batch_size` that this shard builds.
    pub fn range(&self, batch_size: usize) -> std::ops::Range<usize> {
        let per = batch_size / self.count.max(1);
        self.index * per..(self.index + 1) * per
    }
}

impl LoaderOptions {
    /// Shuffled batches of `batch_size`, one worker per available core (at most 8), 4 batches of
    /// prefetch.
    pub fn new(batch_size: usize, augment: Augment, seed: u64) -> LoaderOptions {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        LoaderOptions {
            batch_size,
            workers: cores.min(8),
            prefetch: 4,
            seed,
            shuffle: true,
            augment,
            shard: Shard::WHOLE,
        }
    }
}

/// One batch of augmented, normalized images (this loader's shard of it).
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// Global batch number, counted from the start of training across epochs.
    pub index: u64,
    /// The epoch the batch belongs to.
    pub epoch: u64,
    /// `batch_size x channels x img_size x img_size`, normalized.
    pub images: Vec<f32>,
    /// The class of each image.
    pub labels: Vec<u32>,
    /// The dataset index of each image.
    pub items: Vec<usize>,
    /// Items that could not be read and were replaced, with the reason (`Dataset::name: why`).
    pub skipped: Vec<(usize, String)>,
}

/// A chunk of a batch, built by one worker.
struct Chunk {
    images: Vec<f32>,
    labels: Vec<u32>,
    items: Vec<usize>,
    skipped: Vec<(usize, String)>,
}

type ChunkResult = (u64, usize, Result<Chunk, DataError>);

/// What workers take next, shared under a lock.
struct Schedule {
    /// Next unit to hand out: (batch, chunk).
    next: (u64, usize),
    /// The batch the consumer waits for; units of batches beyond `want + prefetch` wait.
    want: u64,
    stop: bool,
    /// The permutation of the epoch of `next`.
    perm: (u64, Arc<Vec<usize>>),
}

struct Shared {
    ds: Arc<dyn Dataset>,
    opts: LoaderOptions,
    batches_per_epoch: u64,
    chunk: usize,
    chunks_per_batch: usize,
    schedule: Mutex<Schedule>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Schedule> {
        // A worker that panicked while holding the lock left the schedule consistent (it only
        // reads and advances counters), so the poison can be ignored.
        self.schedule.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The item order of `epoch`.
    fn permutation(&self, epoch: u64) -> Vec<usize> {
        let n = self.ds.len();
        let mut perm: Vec<usize> = (0..n).collect();
        if self.opts.shuffle {
            let mut rng = Rng::new(self.opts.seed)
                .fork(PERMUTATION_STREAM)
                .fork(epoch);
            for i in (1..n).rev() {
                let j = (rng.next_u64() % (i as u64 + 1)) as usize;
                perm.swap(i, j);
            }
        }
        perm
    }

    /// Waits for the next unit of work within the prefetch window; `None` when stopping.
    fn take(&self) -> Option<(u64, usize, Arc<Vec<usize>>)> {
        let mut s = self.lock();
        while !s.stop && s.next.0 >= s.want + self.opts.prefetch as u64 {
            s = self.wake.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        if s.stop {
            return None;
        }
        let (batch, chunk) = s.next;
        let epoch = batch / self.batches_per_epoch;
        if s.perm.0 != epoch {
            s.perm = (epoch, Arc::new(self.permutation(epoch)));
        }
        s.next = if chunk + 1 == self.chunks_per_batch {
            (batch + 1, 0)
        } else {
            (batch, chunk + 1)
        };
        Some((batch, chunk, s.perm.1.clone()))
    }

    /// Decodes and augments the samples of chunk `chunk` of batch `batch`.
    fn build(&self, batch: u64, chunk: usize, perm: &[usize]) -> Result<Chunk, DataError> {
        let bs = self.opts.batch_size;
        let epoch = batch / self.batches_per_epoch;
        let mine = self.opts.shard.range(bs);
        let first = mine.start + chunk * self.chunk;
        let samples = first..(first + self.chunk).min(mine.end);
        let per_image = self.opts.augment.output_len();
        let mut out = Chunk {
            images: vec![0.0; samples.len() * per_image],
            labels: Vec::with_capacity(samples.len()),
            items: Vec::with_capacity(samples.len()),
            skipped: Vec::new(),
        };
        let n = perm.len();
        let channels = self.ds.channels();
        for (slot, j) in samples.enumerate() {
            let pos = (batch % self.batches_per_epoch) as usize * bs + j;
            let mut failures = Vec::new();
            let mut decoded = None;
            for t in 0..MAX_TRIES_PER_SAMPLE.min(n) {
                let item = perm[(pos + t) % n];
                match self.ds.get(item) {
                    Ok(img) if img.channels == channels && img.height > 0 && img.width > 0 => {
                        decoded = Some((item, img));
                        break;
                    }
                    Ok(img) => failures.push((
                        item,
                        format!(
                            "{}: decoded to {} channel(s) of {}x{}, expected {channels} channel(s)",
                            self.ds.name(item),
                            img.channels,
                            img.height,
                            img.width
                        ),
                    )),
                    Err(e) => failures.push((item, e.to_string())),
                }
            }
            let Some((item, img)) = decoded else {
                return Err(DataError::TooManyUnreadable {
                    batch,
                    failed: failures.len(),
                    attempts: failures.len(),
                    examples: failures.into_iter().take(3).map(|f| f.1).collect(),
                });
            };
            let mut rng = Rng::new(self.opts.seed)
                .fork(AUGMENT_STREAM)
                .fork(epoch)
                .fork(pos as u64);
            let dst = &mut out.images[slot * per_image..][..per_image];
            self.opts.augment.apply(&img, &mut rng, dst);
            out.labels.push(self.ds.label(item));
            out.items.push(item);
            out.skipped.extend(failures);
        }
        Ok(out)
    }
}

/// The images `items` of `ds`, augmented and normalized, one after another on the calling thread
/// (for pictures and evaluations of a few fixed images; training uses a [`Loader`]). Item `i` is
/// augmented with a generator drawn from `(seed, i)`, so with [`Augment::eval`] the result depends
/// on nothing but the images. An unreadable image is an error.
pub fn load_items(
    ds: &dyn Dataset,
    items: &[usize],
    augment: &Augment,
    seed: u64,
) -> Result<Vec<f32>, DataError> {
    if augment.mean.len() != ds.channels() {
        return Err(DataError::Channels {
            dataset: ds.describe(),
            has: format!("{} channel(s)", ds.channels()),
            model: augment.mean.len(),
        });
    }
    let per_image = augment.output_len();
    let mut out = vec![0.0; items.len() * per_image];
    for (&item, dst) in items.iter().zip(out.chunks_mut(per_image)) {
        if item >= ds.len() {
            return Err(DataError::Options {
                why: format!("image {item} asked of {}", ds.describe()),
            });
        }
        let img = ds.get(item)?;
        let mut rng = Rng::new(seed).fork(AUGMENT_STREAM).fork(item as u64);
        augment.apply(&img, &mut rng, dst);
    }
    Ok(out)
}

fn worker(shared: Arc<Shared>, results: Sender<ChunkResult>) {
    while let Some((batch, chunk, perm)) = shared.take() {
        let result = catch_unwind(AssertUnwindSafe(|| shared.build(batch, chunk, &perm)))
            .unwrap_or_else(|panic| {
                let why = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                Err(DataError::Worker {
                    why: format!("panicked while building batch {batch}: {why}"),
                })
            });
        if results.send((batch, chunk, result)).is_err() {
            return; // the loader is gone
        }
    }
}

/// An endless sequence of batches, epoch after epoch, built by worker threads. Dropping it stops
/// the workers.
pub struct Loader {
    shared: Arc<Shared>,
    results: Option<Receiver<ChunkResult>>,
    workers: Vec<JoinHandle<()>>,
    /// The batch `next` returns.
    want: u64,
    /// Chunks received ahead of their turn.
    pending: BTreeMap<u64, Vec<Option<Result<Chunk, DataError>>>>,
}

impl Loader {
    /// Starts the workers on `ds`, the first batch being global batch `start_batch` (0 for a new
    /// run, the number of batches already trained on when resuming).
    pub fn new(
        ds: Arc<dyn Dataset>,
        opts: LoaderOptions,
        start_batch: u64,
    ) -> Result<Loader, DataError> {
        let options = |why: String| Err(DataError::Options { why });
        if opts.batch_size == 0 {
            return options("the batch size is 0".into());
        }
        if opts.workers == 0 || opts.prefetch == 0 {
            return options(format!(
                "{} worker(s) and {} batch(es) of prefetch; both must be at least 1",
                opts.workers, opts.prefetch
            ));
        }
        if opts.augment.img_size == 0 {
            return options("the image size is 0".into());
        }
        let a = &opts.augment;
        if a.mean.len() != ds.channels() || a.std.len() != ds.channels() {
            return Err(DataError::Channels {
                dataset: ds.describe(),
                has: format!("{} channel(s)", ds.channels()),
                model: a.mean.len(),
            });
        }
        let scale_ok = 0.0 < a.scale.0 && a.scale.0 <= a.scale.1 && a.scale.1 <= 1.0;
        let ratio_ok = 0.0 < a.ratio.0 && a.ratio.0 <= a.ratio.1;
        if !(scale_ok && ratio_ok) {
            return options(format!(
                "crop scale {:?} must lie in (0, 1] and ratio {:?} be positive, low before high",
                a.scale, a.ratio
            ));
        }
        if ds.len() < opts.batch_size {
            return options(format!(
                "{} has {} image(s), fewer than one batch of {}; lower the batch size",
                ds.describe(),
                ds.len(),
                opts.batch_size
            ));
        }
        let shard = opts.shard;
        if shard.count == 0 || shard.index >= shard.count || opts.batch_size % shard.count != 0 {
            return options(format!(
                "shard {} of {} of batches of {}: the shard count must divide the batch size, \
                 the index be below the count",
                shard.index, shard.count, opts.batch_size
            ));
        }
        let batches_per_epoch = (ds.len() / opts.batch_size) as u64;
        let per_shard = opts.batch_size / shard.count;
        let chunk = per_shard.div_ceil(opts.workers).clamp(1, MAX_CHUNK);
        let chunks_per_batch = per_shard.div_ceil(chunk);
        let workers = opts.workers;
        let shared = Arc::new(Shared {
            ds,
            opts,
            batches_per_epoch,
            chunk,
            chunks_per_batch,
            schedule: Mutex::new(Schedule {
                next: (start_batch, 0),
                want: start_batch,
                stop: false,
                perm: (u64::MAX, Arc::new(Vec::new())),
            }),
            wake: Condvar::new(),
        });
        let (tx, rx) = channel();
        let mut loader = Loader {
            shared: shared.clone(),
            results: Some(rx),
            workers: Vec::with_capacity(workers),
            want: start_batch,
            pending: BTreeMap::new(),
        };
        for i in 0..workers {
            let (shared, tx) = (shared.clone(), tx.clone());
            let handle = std::thread::Builder::new()
                .name(format!("mae-data-{i}"))
                .spawn(move || worker(shared, tx))
                .map_err(|e| DataError::Worker {
                    why: format!("cannot start a worker thread: {e}"),
                })?;
            loader.workers.push(handle);
        }
        Ok(loader)
    }

    /// Full batches per epoch: `len / batch_size`, the rest dropped.
    pub fn batches_per_epoch(&self) -> u64 {
        self.shared.batches_per_epoch
    }

    /// The global number of the batch [`next`](Loader::next) returns next.
    pub fn position(&self) -> u64 {
        self.want
    }

    /// The dataset.
    pub fn dataset(&self) -> &Arc<dyn Dataset> {
        &self.shared.ds
    }

    /// The options.
    pub fn options(&self) -> &LoaderOptions {
        &self.shared.opts
    }

    /// The next batch, waiting for the workers if it is not ready. Never ends: after the last
    /// batch of an epoch comes the first of the next.
    ///
    /// An error (too many unreadable images, a worker that panicked) is about this batch; the
    /// following call moves on to the next batch.
    #[allow(clippy::should_implement_trait)] // endless and fallible: not an Iterator
    pub fn next(&mut self) -> Result<Batch, DataError> {
        let k = self.want;
        let parts = self.shared.chunks_per_batch;
        loop {
            if let Some(chunks) = self.pending.get(&k) {
                if chunks.iter().all(Option::is_some) {
                    let chunks = self.pending.remove(&k).unwrap_or_default();
                    self.advance();
                    return self.assemble(k, chunks);
                }
            }
            let received = self.results.as_ref().map(|rx| rx.recv());
            match received {
                Some(Ok((batch, chunk, result))) => {
                    let slots = self
                        .pending
                        .entry(batch)
                        .or_insert_with(|| (0..parts).map(|_| None).collect());
                    slots[chunk] = Some(result);
                }
                _ => {
                    self.advance();
                    return Err(DataError::Worker {
                        why: "all worker threads stopped".into(),
                    });
                }
            }
        }
    }

    /// Moves the window on to the next batch and wakes the workers waiting for it.
    fn advance(&mut self) {
        self.want += 1;
        self.shared.lock().want = self.want;
        self.shared.wake.notify_all();
    }

    fn assemble(
        &self,
        index: u64,
        chunks: Vec<Option<Result<Chunk, DataError>>>,
    ) -> Result<Batch, DataError> {
        let bs = self
            .shared
            .opts
            .shard
            .range(self.shared.opts.batch_size)
            .len();
        let mut batch = Batch {
            index,
            epoch: index / self.shared.batches_per_epoch,
            images: Vec::with_capacity(bs * self.shared.opts.augment.output_len()),
            labels: Vec::with_capacity(bs),
            items: Vec::with_capacity(bs),
            skipped: Vec::new(),
        };
        for chunk in chunks.into_iter().flatten() {
            let chunk = chunk?;
            batch.images.extend_from_slice(&chunk.images);
            batch.labels.extend_from_slice(&chunk.labels);
            batch.items.extend_from_slice(&chunk.items);
            batch.skipped.extend(chunk.skipped);
        }
        let failed = batch.skipped.len();
        if failed > bs {
            return Err(DataError::TooManyUnreadable {
                batch: index,
                failed,
                attempts: failed + bs,
                examples: batch.skipped.iter().take(3).map(|s| s.1.clone()).collect(),
            });
        }
        Ok(batch)
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.wake.notify_all();
        // Workers notice `stop` when they next take work, or fail to send to the dropped receiver.
        self.results = None;
        for handle in self.workers.drain(..) {
            // A worker's panic was already caught and reported; nothing is left to report here.
            let _ = handle.join();
        }
    }
}
