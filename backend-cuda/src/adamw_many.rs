//! The optimizer step of a whole model in one launch (`adamw_many` in `kernels/elementwise.cu`):
//! a table describes every tensor (addresses, length, update constants), and one grid walks the
//! chunks of all of them, updating each element and zeroing its gradient. In the bf16 mode it
//! also writes the new bf16 copy of each weight that the products read as a copy (the Linear
//! layers'), so the next step's products need no rounding pass over the weights.
//!
//! The table is built and uploaded on every call, a few kilobytes for a ViT's few hundred
//! tensors: the learning rate and the bias corrections change every step, so there is nothing
//! to keep. Its device copy is a stream-ordered allocation freed after the kernel, as the
//! reductions' scratch is, so the backend holds no state for it.

use crate::backend::{u, CudaBackend};
use crate::buffer::CudaBuf;
use crate::error;
use crate::kernels::{Arg, Kernel};
use crate::launch;
use crate::profile::Work;
use cudarc::driver::DevicePtr;
use mae::backend::{AdamWStep, AdamWTensor, BResult};

/// Words (`u64`) per tensor in the table: `ADAMW_WORDS` in `kernels/elementwise.cu`.
pub(crate) const WORDS: usize = 16;

/// Elements per chunk, the work of one block: `ADAMW_CHUNK` in `kernels/elementwise.cu`.
pub(crate) const CHUNK: u64 = 1024;

/// The word holding a tensor's first chunk: `ADAMW_FIRST_CHUNK` in `kernels/elementwise.cu`.
const FIRST_CHUNK: usize = 5;

/// The per-step scalars of `s` in the order both AdamW kernels take them (`AdamWScalars`):
/// `1 - lr * wd`, `beta1`, `beta2`, `1 - beta1`, `1 - beta2`, `lr / bc1`, `sqrt(bc2)`, `eps`,
/// formed in f32 exactly as the CPU reference forms them.
pub(crate) fn scalars(s: &AdamWStep) -> [f32; 8] {
    [
        1.0 - s.lr * s.weight_decay,
        s.beta1,
        s.beta2,
        1.0 - s.beta1,
        1.0 - s.beta2,
        s.lr / s.bias_correction1,
        s.bias_correction2.sqrt(),
        s.eps,
    ]
}

/// One tensor as the table describes it: device addresses (0 for `param`, `m` and `v` of a
/// tensor that does not train, which the kernel does not touch, and for a param without a bf16
/// copy to refresh), its length and its update.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Entry {
    pub(crate) param: u64,
    pub(crate) grad: u64,
    pub(crate) m: u64,
    pub(crate) v: u64,
    pub(crate) len: u64,
    pub(crate) step: Option<AdamWStep>,
    pub(crate) param16: u64,
}

/// The table the kernel reads for `entries`, and the number of chunks they span. Per tensor:
/// param, grad, m, v, length, first chunk (the chunks of the tensors before it), 1 if it trains
/// else 0, [`scalars`] as f32 bit patterns (zeros when it does not train), the param's copy.
pub(crate) fn table(entries: &[Entry]) -> (Vec<u64>, u64) {
    let mut words = Vec::with_capacity(entries.len() * WORDS);
    let mut chunks = 0u64;
    for e in entries {
        let mut w = [0u64; WORDS];
        w[..5].copy_from_slice(&[e.param, e.grad, e.m, e.v, e.len]);
        w[FIRST_CHUNK] = chunks;
        w[6] = u64::from(e.step.is_some());
        let constants = e.step.as_ref().map_or([0.0; 8], scalars);
        for (w, x) in w[7..15].iter_mut().zip(constants) {
            *w = u64::from(x.to_bits());
        }
        w[15] = e.param16;
        words.extend(w);
        chunks += e.len.div_ceil(CHUNK);
    }
    (words, chunks)
}

/// The bytes the kernel moves for `entries`, for the profile: each gradient read and zeroed;
/// a training tensor's param, m and v read and written, and its bf16 copy written where it has
/// one.
pub(crate) fn traffic(entries: &[Entry]) -> f64 {
    entries
        .iter()
        .map(|e| {
            let trains = if e.step.is_some() { 24.0 } else { 0.0 };
            let copy = if e.step.is_some() && e.param16 != 0 {
                2.0
            } else {
                0.0
            };
            e.len as f64 * (8.0 + trains + copy)
        })
        .sum()
}

impl CudaBackend {
    /// [`mae::backend::Backend::adamw_many`]: one upload of the table, one launch.
    pub(crate) fn adamw_in_one_launch<'a>(
        &self,
        tensors: impl Iterator<Item = AdamWTensor<'a, CudaBuf>>,
    ) -> BResult<()> {
        let mut tensors: Vec<_> = tensors.collect();
        let mut entries = tensors
            .iter_mut()
            .enumerate()
            .map(|(k, t)| self.entry(k, t))
            .collect::<BResult<Vec<_>>>()?;
        // The copies to refresh, locked until the launch is queued (after `entry` renewed
        // their buffers' contents).
        let mut copies = Vec::new();
        for (t, e) in tensors.iter().zip(&mut entries) {
            if t.step.is_none() {
                continue;
            }
            let param: &CudaBuf = t.param;
            if let Some(copy) = self.refreshed_copy(param)? {
                e.param16 = copy.addr();
                copies.push((copy, param));
            }
        }
        let (table, chunks) = table(&entries);
        let Some(cfg) = launch::per_block(chunks) else {
            return Ok(()); // no tensor has an element
        };
        let bytes = error::bytes_of::<u64>(table.len())?;
        let device_table = self.stream.clone_htod(&table).map_err(|e| {
            let what = format!("uploading adamw_many's table of {} tensors", entries.len());
            error::driver(e, &what, bytes)
        })?;
        // The table holds addresses of the tensors' live buffers, each as long as the length
        // beside it (`entry` checks), which the kernel stays within, as `launch` requires of
        // pointer arguments. Dropping `device_table` after the launch frees it stream-ordered,
        // after the kernel has read it.
        let args = [
            Arg::Ptr(device_table.device_ptr(&self.stream).0),
            u(entries.len()),
            Arg::U64(chunks),
        ];
        let moved = traffic(&entries);
        self.launch_described(Kernel::AdamWMany, Some(cfg), &args, |_| {
            let work = Work {
                flops: 0.0,
                bytes: Some(moved),
            };
            (String::new(), work)
        })?;
        for (copy, param) in copies {
            copy.written(param.contents(), param.len());
        }
        Ok(())
    }

    /// The table entry of tensor `k`, after checking that a training tensor's four buffers
    /// have one length (as [`mae::backend::Backend::adamw`] requires).
    fn entry(&self, k: usize, t: &mut AdamWTensor<'_, CudaBuf>) -> BResult<Entry> {
        let len = t.grad.len();
        let trains = t.step.is_some();
        let lens = [t.param.len(), len, t.m.len(), t.v.len()];
        if trains && lens.iter().any(|&l| l != len) {
            return Err(error::device(format!(
                "bug: adamw_many: tensor {k}: param, grad, m and v hold {lens:?} floats, the op \
                 needs one length"
            )));
        }
        // The kernel only zeroes the gradient of a tensor that does not train: its other
        // buffers get null addresses, so that a wrong lookup faults instead of writing them.
        let stream = &self.stream;
        let addr = |b: &mut CudaBuf| if trains { b.addr_mut(stream) } else { Ok(0) };
        Ok(Entry {
            param: addr(t.param)?,
            grad: t.grad.addr_mut(stream)?,
            m: addr(t.m)?,
            v: addr(t.v)?,
            len: len as u64,
            step: t.step,
            param16: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::program_source;

    #[test]
    fn layout_agrees_with_the_cuda_source() {
        let src = program_source();
        for want in [
            format!("#define ADAMW_WORDS {WORDS}\n"),
            format!("#define ADAMW_CHUNK {CHUNK}\n"),
            format!("#define ADAMW_FIRST_CHUNK {FIRST_CHUNK}\n"),
        ] {
            assert!(src.contains(&want), "elementwise.cu must say {want:?}");
        }
    }

    fn entry(len: u64, step: Option<AdamWStep>) -> Entry {
        Entry {
            param: 0x1000,
            grad: 0x2000,
            m: 0x3000,
            v: 0x4000,
            len,
            step,
            param16: 0,
        }
    }

    #[test]
    fn first_chunks_count_the_chunks_before_each_tensor() {
        let step = AdamWStep::new(1e-3, 0.9, 0.95, 1e-8, 0.05, 3);
        let lens = [0, 1, CHUNK, CHUNK + 1, 0, 5];
        let entries: Vec<Entry> = lens.iter().map(|&l| entry(l, Some(step))).collect();
        let (words, chunks) = table(&entries);
        assert_eq!(words.len(), lens.len() * WORDS);
        let firsts: Vec<u64> = words.chunks(WORDS).map(|w| w[FIRST_CHUNK]).collect();
        assert_eq!(firsts, [0, 0, 1, 2, 4, 4]);
        assert_eq!(chunks, 5);
        assert_eq!(table(&[]), (vec![], 0));
    }

    #[test]
    fn an_entry_holds_addresses_length_flag_and_the_scalars_bits() {
        let step = AdamWStep::new(2e-3, 0.9, 0.999, 1e-8, 0.05, 7);
        let (words, _) = table(&[entry(3, Some(step)), entry(4, None)]);
        let s = scalars(&step).map(|x| u64::from(x.to_bits()));
        assert_eq!(words[..7], [0x1000, 0x2000, 0x3000, 0x4000, 3, 0, 1]);
        assert_eq!(words[7..WORDS - 1], s);
        assert_eq!(words[WORDS - 1], 0);
        assert_eq!(words[WORDS + 4..WORDS + 7], [4, 1, 0]);
        assert!(words[WORDS + 7..].iter().all(|&w| w == 0));
    }

    /// A frozen tensor's gradient is read and zeroed (8 bytes an element); a training one
    /// also reads and writes param, m and v (24), and writes its bf16 copy where it has one (2).
    #[test]
    fn traffic_counts_what_each_tensor_moves() {
        let step = AdamWStep::new(1e-3, 0.9, 0.95, 1e-8, 0.05, 3);
        let with_copy = Entry {
            param16: 0x5000,
            ..entry(10, Some(step))
        };
        let entries = [entry(100, None), entry(10, Some(step)), with_copy];
        assert_eq!(traffic(&entries), 800.0 + 320.0 + 340.0);
    }
}
