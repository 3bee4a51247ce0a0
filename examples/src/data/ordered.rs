//! A dataset's images `0..n` in order, in batches, decoded ahead of their consumer: the input of
//! evaluation and embedding, where every image counts once and nothing is random.

use super::{load_items, Augment, DataError, Dataset};
use std::sync::mpsc::sync_channel;

type Failure = Box<dyn std::error::Error + Send + Sync>;

/// Decodes images `0..n` of a dataset in batches, ahead of their consumer, on worker threads.
pub struct InOrder<'a> {
    /// The dataset.
    pub ds: &'a dyn Dataset,
    /// The transform (draws nothing: evaluation).
    pub augment: Augment,
    /// Images `0..n` are decoded.
    pub n: usize,
    /// Images per batch.
    pub batch: usize,
    /// Decoding threads.
    pub workers: usize,
}

impl InOrder<'_> {
    /// Calls `consume(first, images)` for each batch in order; batch k+1 is decoded while
    /// `consume` works on batch k.
    pub fn for_each(
        &self,
        mut consume: impl FnMut(usize, &[f32]) -> Result<(), Failure>,
    ) -> Result<(), Failure> {
        std::thread::scope(|s| {
            let (tx, rx) = sync_channel::<Result<(usize, Vec<f32>), Failure>>(2);
            s.spawn(move || {
                for first in (0..self.n).step_by(self.batch) {
                    let end = (first + self.batch).min(self.n);
                    if tx.send(self.decode(first, end)).is_err() {
                        return; // the consumer stopped
                    }
                }
            });
            for batch in rx {
                let (first, images) = batch?;
                consume(first, &images)?;
            }
            Ok(())
        })
    }

    /// Images `first..end`, split over the workers.
    fn decode(&self, first: usize, end: usize) -> Result<(usize, Vec<f32>), Failure> {
        let per = (end - first).div_ceil(self.workers.max(1));
        let parts: Vec<Result<Vec<f32>, DataError>> = std::thread::scope(|s| {
            let handles: Vec<_> = (first..end)
                .step_by(per)
                .map(|a| {
                    let items: Vec<usize> = (a..(a + per).min(end)).collect();
                    // The eval transform draws nothing, so the seed is irrelevant.
                    s.spawn(move || load_items(self.ds, &items, &self.augment, 0))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(DataError::Worker {
                            why: "an image decoder panicked".into(),
                        })
                    })
                })
                .collect()
        });
        let mut out = Vec::with_capacity((end - first) * self.augment.output_len());
        for p in parts {
            out.extend(p?);
        }
        Ok((first, out))
    }
}
