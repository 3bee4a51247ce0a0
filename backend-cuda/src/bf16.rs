//! The operands of bf16 GEMMs: where [`Precision::Bf16`](crate::Precision::Bf16) rounds them.
//!
//! Both routes compute the same function, the products of operands rounded to bf16 (nearest,
//! ties to even) accumulated in f32:
//! - **copies**: a kernel (`round_to_bf16`) writes bf16 copies of A and B, and cuBLAS
//!   multiplies those (`CUDA_R_16BF` operands, `CUBLAS_COMPUTE_32F`). cuBLAS's bf16 kernels
//!   stream half the bytes and run near the tensor cores' peak; a copy costs one pass over its
//!   operand, paid once per contents of the buffer (see below).
//! - **fast**: cuBLAS reads the f32 operands and rounds them itself
//!   (`CUBLAS_COMPUTE_32F_FAST_16BF`), without the extra pass; its kernels for f32 operands ran
//!   at about a third of the bf16 peak on an H200 (docs/results-gpu.md).
//!
//! So the copies pay where the product is compute-bound (every Linear layer: thousands of
//! FLOPs per operand element) and not where it is memory-bound (attention's `T x T x head`
//! products: a few hundred). `MAE_CUDA_BF16_GEMM=auto|copies|fast` chooses; `auto` (the
//! default) decides per GEMM by [`copies_pay`].
//!
//! Each buffer holds its own copy ([`CudaBuf::bf16`]), made at the first GEMM that multiplies
//! it as a bf16 operand and kept with the [`CudaBuf::contents`] number it was made from: a
//! later GEMM multiplies it again while the buffer is unchanged, whatever other operands were
//! copied in between. So a Linear layer's weight, copied for the forward, is not copied again
//! for the input gradient (`dX = dY W`), nor its input for the weight gradient (`dW = dY^T X`),
//! and dY once serves both. The price is memory: a copy takes half the bytes of the f32 buffer
//! it copies and lives as long as that buffer, so in training every weight and activation that
//! a Linear layer multiplies carries 50 % more device memory (a written buffer keeps its
//! allocation and recopies at its next GEMM).
//!
//! **Copies alone.** A buffer from `alloc_operand` (the MLP's GELU output and its gradient, a
//! block's LayerNorm outputs and the attention's qkv gradient, which only a Linear layer's GEMMs
//! and bias gradient read; the attention's output, which `proj` and the tensor-core backward's
//! `dO . O` read) is written by its producer as the copy only: the kernel skips the f32
//! store, 4 of the 10 bytes it moves per element
//! ([`CudaBackend::overwritten_floats`]). Its floats are then
//! stale until an op reads them: every read of a buffer's floats goes through
//! [`CudaBackend::floats_current`] (`ptr`, `read_addr`), which widens the copy into them
//! first, so such a read sees the bf16-rounded values the trait allows. Ops that can read bf16
//! values take them from the copy instead ([`CudaBackend::copy_alone`]): the column sums of a
//! bias gradient, whose dY is the MLP's GELU gradient, another `alloc_operand` buffer; the
//! tensor-core attention kernels, whose inputs (qkv, O, dO) are all such buffers in the model.

#[cfg(test)]
use crate::backend::choice;
use crate::backend::{env_choice, u, CudaBackend, Precision};
use crate::buffer::CudaBuf;
use crate::error;
use crate::kernels::{Arg, Kernel};
use crate::launch::elementwise;
use cudarc::driver::{CudaSlice, DevicePtrMut};
use mae::backend::{BResult, Gemm};
use std::sync::MutexGuard;

/// How the bf16 mode rounds the operands of its GEMMs (`MAE_CUDA_BF16_GEMM`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum Bf16Gemm {
    /// Copies where [`copies_pay`], else cuBLAS's FAST_16BF.
    #[default]
    Auto,
    /// Always bf16 copies.
    Copies,
    /// Always FAST_16BF on the f32 operands.
    Fast,
}

impl Bf16Gemm {
    const CHOICES: [(&'static str, Bf16Gemm); 3] = [
        ("auto", Bf16Gemm::Auto),
        ("copies", Bf16Gemm::Copies),
        ("fast", Bf16Gemm::Fast),
    ];

    /// Reads `MAE_CUDA_BF16_GEMM`; unset is [`Bf16Gemm::Auto`].
    pub(crate) fn from_env() -> BResult<Bf16Gemm> {
        Ok(env_choice("MAE_CUDA_BF16_GEMM", &Self::CHOICES)?.unwrap_or_default())
    }

    #[cfg(test)]
    fn parse(v: &str) -> BResult<Bf16Gemm> {
        choice("MAE_CUDA_BF16_GEMM", v, &Self::CHOICES)
    }

    /// Whether the GEMM `g`, whose operands span `a_len` and `b_len` elements, multiplies
    /// bf16 copies.
    pub(crate) fn copies(self, g: &Gemm, a_len: usize, b_len: usize) -> bool {
        match self {
            Bf16Gemm::Auto => copies_pay(g, a_len, b_len),
            Bf16Gemm::Copies => true,
            Bf16Gemm::Fast => false,
        }
    }
}

/// FLOPs per copied operand element above which the copies pay. A copy moves 6 bytes per
/// element (read f32, write bf16): about 1.4 ps at the H200's 4.3 TB/s. If cuBLAS runs bf16
/// operands at the tensor cores' ~790 TFLOP/s and f32 operands (FAST_16BF) at a third of that,
/// the copies save 2 / 790 TFLOP/s = 2.5 ps per 1,000 FLOPs, so they pay from about 550 FLOPs
/// per copied element. Below, the product is memory-bound and the copy only adds traffic.
const COPY_MIN_FLOPS_PER_ELEMENT: u128 = 512;

/// Whether bf16 copies of the operands (`a_len` and `b_len` elements, broadcast operands
/// counted once) are worth their pass: the product does at least
/// [`COPY_MIN_FLOPS_PER_ELEMENT`] FLOPs per copied element.
pub(crate) fn copies_pay(g: &Gemm, a_len: usize, b_len: usize) -> bool {
    let flops = 2 * g.batch as u128 * g.m as u128 * g.n as u128 * g.k as u128;
    let copied = a_len as u128 + b_len as u128;
    copied > 0 && flops >= COPY_MIN_FLOPS_PER_ELEMENT * copied
}

/// The bf16 copy of a buffer (held in [`CudaBuf::bf16`]): room for the whole buffer, two
/// values per u32, and which contents it holds.
#[derive(Debug)]
pub(crate) struct Bf16Copy {
    words: CudaSlice<u32>,
    /// [`CudaBuf::contents`] of the buffer when it was copied, and how many of its first
    /// elements were. A GEMM whose operand still has those contents (not written since) and
    /// spans no more elements multiplies the copy again.
    of: Option<(u64, usize)>,
    /// Whether the buffer's floats hold those contents too; false after a producer wrote the
    /// copy alone ([`CudaBackend::overwritten_floats`]), until [`CudaBackend::floats_current`].
    floats: bool,
}

/// The bf16 copies of one GEMM's A and B, locked until the GEMM that reads them is queued,
/// so that no other thread's GEMM replaces a copy under it.
pub(crate) struct Bf16Operands<'a> {
    /// The device addresses of A's copy and B's copy (the same copy when A is B).
    pub(crate) addrs: [u64; 2],
    _locks: Vec<MutexGuard<'a, Option<Bf16Copy>>>,
}

fn lock(buf: &CudaBuf) -> BResult<MutexGuard<'_, Option<Bf16Copy>>> {
    buf.bf16
        .lock()
        .map_err(|_| error::device("a buffer's bf16 copy lock is poisoned"))
}

impl CudaBackend {
    /// The bf16 copies of the first `a.1` elements of `a.0` and the first `b.1` of `b.0`,
    /// locked: each buffer's copy is reused while the buffer's contents are unchanged and
    /// cover the span, else (re)written by `round_to_bf16`, queued on the stream before the
    /// GEMM. One buffer passed as both operands is locked once and copied once.
    pub(crate) fn bf16_operands<'a>(
        &self,
        a: (&'a CudaBuf, usize),
        b: (&'a CudaBuf, usize),
    ) -> BResult<Bf16Operands<'a>> {
        if std::ptr::eq(a.0, b.0) {
            let mut copy = lock(a.0)?;
            let addr = self.copy_to_bf16(&mut copy, a.0, a.1.max(b.1))?;
            return Ok(Bf16Operands {
                addrs: [addr, addr],
                _locks: vec![copy],
            });
        }
        // Locked in address order: two threads multiplying the same two buffers in opposite
        // roles would otherwise each hold one lock and wait for the other.
        let a_first = (a.0 as *const CudaBuf) < (b.0 as *const CudaBuf);
        let (first, second) = if a_first { (a, b) } else { (b, a) };
        let (mut copy1, mut copy2) = (lock(first.0)?, lock(second.0)?);
        let addr1 = self.copy_to_bf16(&mut copy1, first.0, first.1)?;
        let addr2 = self.copy_to_bf16(&mut copy2, second.0, second.1)?;
        Ok(Bf16Operands {
            addrs: if a_first {
                [addr1, addr2]
            } else {
                [addr2, addr1]
            },
            _locks: vec![copy1, copy2],
        })
    }

    /// The bf16 copy of all of `buf`, locked as [`CudaBackend::bf16_operands`]'s (both
    /// addresses the copy's): the bias that cuBLASLt adds to a bf16 D (`lt.rs`).
    pub(crate) fn bf16_vector<'a>(&self, buf: &'a CudaBuf) -> BResult<Bf16Operands<'a>> {
        let mut copy = lock(buf)?;
        let addr = self.copy_to_bf16(&mut copy, buf, buf.len())?;
        Ok(Bf16Operands {
            addrs: [addr, addr],
            _locks: vec![copy],
        })
    }

    /// Makes `slot` a bf16 copy of at least the first `len` elements of `buf`'s current
    /// contents (allocating room for the whole buffer the first time; a replaced allocation's
    /// free is stream-ordered after the work that reads it) and returns its device address.
    fn copy_to_bf16(&self, slot: &mut Option<Bf16Copy>, buf: &CudaBuf, len: usize) -> BResult<u64> {
        let copy = self.copy_room(slot, buf.len().max(len))?;
        let addr = copy.words.device_ptr_mut(&self.stream).0;
        if let Some((contents, copied)) = copy.of {
            if contents == buf.contents() && copied >= len {
                return Ok(addr);
            }
        }
        // A copy alone holds the buffer's contents: they are not rounded from stale floats.
        if let Some((contents, copied)) = copy.of {
            if contents == buf.contents() && !copy.floats && copied < len {
                return Err(error::device(format!(
                    "bug: a GEMM reads {len} elements of a buffer whose producer wrote only \
                     {copied} as a bf16 copy"
                )));
            }
        }
        copy.of = None;
        let args = [Arg::Ptr(buf.addr(&self.stream)?), Arg::Ptr(addr), u(len)];
        self.launch(
            Kernel::RoundToBf16,
            elementwise(len.div_ceil(2) as u64),
            &args,
        )?;
        copy.of = Some((buf.contents(), len));
        copy.floats = true;
        Ok(addr)
    }

    /// The copy in `slot`, with room for `len` elements: the one there if it is large enough,
    /// else a new allocation (holding no contents yet).
    fn copy_room<'s>(
        &self,
        slot: &'s mut Option<Bf16Copy>,
        len: usize,
    ) -> BResult<&'s mut Bf16Copy> {
        let words = len.div_ceil(2).max(1);
        if slot.as_ref().is_none_or(|c| c.words.len() < words) {
            *slot = None;
            let bytes = error::bytes_of::<u32>(words)?;
            // SAFETY: uninitialised device memory; a copy's contents are recorded in `of` only
            // once `round_to_bf16` or a producing kernel has written them, and GEMMs read no
            // further than that.
            let fresh = unsafe { self.stream.alloc::<u32>(words) }.map_err(|e| {
                error::driver(e, "allocating the bf16 copy of a GEMM operand", bytes)
            })?;
            *slot = Some(Bf16Copy {
                words: fresh,
                of: None,
                floats: true,
            });
        }
        slot.as_mut()
            .ok_or_else(|| error::device("bug: a bf16 copy slot emptied while locked"))
    }

    /// Whether kernels write the bf16 copies of their outputs ([`CudaBackend::produced_copy`]):
    /// in the bf16 mode where GEMMs multiply copies.
    pub(crate) fn produces_copies(&self) -> bool {
        self.precision() == Precision::Bf16 && self.bf16_gemm != Bf16Gemm::Fast
    }

    /// The bf16 copy that a kernel writing `buf` writes as well (one more 2-byte store per
    /// element, where a later copy would read the floats back and write the same): in the bf16
    /// mode where GEMMs multiply copies, `buf`'s own copy, with room for the whole buffer and
    /// locked until [`ProducedCopy::written`]; `None` elsewhere (the kernel gets a null
    /// pointer and writes none). Call it after the access that renews `buf`'s contents.
    pub(crate) fn produced_copy<'a>(&self, buf: &'a CudaBuf) -> BResult<Option<ProducedCopy<'a>>> {
        if !self.produces_copies() {
            return Ok(None);
        }
        let mut slot = lock(buf)?;
        let copy = self.copy_room(&mut slot, buf.len())?;
        copy.of = None;
        let addr = copy.words.device_ptr_mut(&self.stream).0;
        Ok(Some(ProducedCopy {
            slot,
            addr,
            floats: true,
        }))
    }

    /// The bf16 copy that a kernel updating `buf` in place refreshes as it writes (the
    /// optimizer: the Linear layers' weights, which the next step's products read as copies):
    /// `buf`'s copy where a product made one with room for all of it, locked until
    /// [`ProducedCopy::written`]; `None` where there is none (a LayerNorm's weights, and a
    /// bias unless cuBLASLt adds it to a bf16 D: nothing reads them as bf16), so that no copy
    /// is made for a buffer no product reads. Call it after the access that renews `buf`'s
    /// contents.
    pub(crate) fn refreshed_copy<'a>(&self, buf: &'a CudaBuf) -> BResult<Option<ProducedCopy<'a>>> {
        if !self.produces_copies() {
            return Ok(None);
        }
        let mut slot = lock(buf)?;
        let addr = match slot.as_mut() {
            Some(copy) if copy.words.len() >= buf.len().div_ceil(2) => {
                copy.of = None;
                copy.words.device_ptr_mut(&self.stream).0
            }
            _ => return Ok(None),
        };
        Ok(Some(ProducedCopy {
            slot,
            addr,
            floats: true,
        }))
    }

    /// The floats argument of a kernel that overwrites all of `buf` and writes `copy` (from
    /// [`CudaBackend::produced_copy`]) too: null where it writes the copy alone, which it does
    /// for a buffer from `alloc_operand` (see the module docs), else the floats' address
    /// (allocated if they were not). Only kernels that skip their f32 stores at a null pointer
    /// may take it; the caller has renewed `buf`'s contents ([`CudaBuf::renew`]).
    pub(crate) fn overwritten_floats(
        &self,
        copy: &mut Option<ProducedCopy<'_>>,
        buf: &CudaBuf,
    ) -> BResult<Arg> {
        match copy {
            Some(c) if buf.operand => {
                c.alone();
                Ok(Arg::Ptr(0))
            }
            // The op writes the floats: through the shared reference, under the contents
            // name the caller renewed.
            _ => Ok(Arg::Ptr(buf.addr(&self.stream)?)),
        }
    }

    /// The bf16 copy of `buf` where it alone holds the buffer's contents (a producer skipped
    /// the floats) for at least its first `len` elements, locked while the op reading those is
    /// queued: an op that can read bf16 values reads them there instead of widening the copy
    /// into the floats first. `None` where the floats are current.
    pub(crate) fn copy_alone<'a>(
        &self,
        buf: &'a CudaBuf,
        len: usize,
    ) -> BResult<Option<CopyAlone<'a>>> {
        if !buf.operand {
            return Ok(None);
        }
        let mut slot = lock(buf)?;
        let addr = match slot.as_mut() {
            Some(copy)
                if !copy.floats
                    && copy
                        .of
                        .is_some_and(|(c, l)| c == buf.contents() && l >= len) =>
            {
                copy.words.device_ptr_mut(&self.stream).0
            }
            _ => return Ok(None),
        };
        Ok(Some(CopyAlone { _slot: slot, addr }))
    }

    /// The inputs of an op that reads bf16 values where a buffer holds only them (the GELU's
    /// input and gradient, the attention's qkv and dO): per input, its floats' address, or
    /// null and its copy alone's address ([`CudaBackend::copy_alone`] over the first `len`
    /// elements), as the kernel's two arguments; the copies stay locked until the op is queued.
    /// Inputs are locked in address order (one buffer passed twice once), as
    /// [`CudaBackend::bf16_operands`] does, so that two threads reading the same buffers cannot
    /// wait on each other.
    pub(crate) fn inputs<'a, const N: usize>(
        &self,
        bufs: [(&'a CudaBuf, usize); N],
    ) -> BResult<Inputs<'a, N>> {
        let lens: [usize; N] = std::array::from_fn(|i| bufs[i].1);
        let bufs: [&'a CudaBuf; N] = std::array::from_fn(|i| bufs[i].0);
        let mut order: [usize; N] = std::array::from_fn(|i| i);
        order.sort_by_key(|&i| bufs[i] as *const CudaBuf as usize);
        let mut args = [[Arg::Ptr(0), Arg::Ptr(0)]; N];
        let mut locks: [Option<CopyAlone<'a>>; N] = std::array::from_fn(|_| None);
        for (pos, &i) in order.iter().enumerate() {
            if let Some(&j) = order[..pos]
                .iter()
                .find(|&&j| std::ptr::eq(bufs[j], bufs[i]))
            {
                args[i] = args[j];
                continue;
            }
            // A buffer passed twice is looked at once, over the longer of its spans.
            let len = (0..N)
                .filter(|&k| std::ptr::eq(bufs[k], bufs[i]))
                .map(|k| lens[k])
                .max()
                .unwrap_or(lens[i]);
            args[i] = match self.copy_alone(bufs[i], len)? {
                Some(copy) => {
                    let arg = [Arg::Ptr(0), Arg::Ptr(copy.addr)];
                    locks[i] = Some(copy);
                    arg
                }
                None => [self.ptr(bufs[i])?, Arg::Ptr(0)],
            };
        }
        Ok(Inputs {
            args,
            _locks: locks,
        })
    }

    /// Whether a product `g` into `c` writes its result as `c`'s bf16 copy alone (cuBLAS
    /// rounds its f32 sums to bf16 once, to nearest): in the bf16 mode, where the product
    /// multiplies copies (`copied`), overwrites C (beta 0) and is one matrix filling all of `c`,
    /// a buffer from `alloc_operand` (fc1's `pre`, fc2's input gradient `d_act`).
    pub(crate) fn gemm_out16(&self, g: &Gemm, copied: bool, c: &CudaBuf) -> bool {
        copied
            && c.operand
            && g.beta == 0.0
            && g.batch == 1
            && g.m.checked_mul(g.n) == Some(c.len())
    }

    /// Makes `buf`'s floats hold its current contents where only its bf16 copy does (see the
    /// module docs), by widening the copy into them. Every op reading a buffer's floats calls
    /// it first; for buffers not from `alloc_operand` it returns at once.
    pub(crate) fn floats_current(&self, buf: &CudaBuf) -> BResult<()> {
        if !buf.operand {
            return Ok(());
        }
        let mut slot = lock(buf)?;
        let Some(copy) = slot.as_mut() else {
            return Ok(());
        };
        match copy.of {
            Some((contents, len)) if contents == buf.contents() && !copy.floats => {
                let words = copy.words.device_ptr_mut(&self.stream).0;
                // The floats are written through the shared reference: they take the values
                // the buffer already holds (its contents number stays), as a cache would.
                let args = [Arg::Ptr(words), Arg::Ptr(buf.addr(&self.stream)?), u(len)];
                self.launch(Kernel::FloatsOfBf16, elementwise(len as u64), &args)?;
                copy.floats = true;
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// A buffer's bf16 copy that alone holds its contents, locked for the op that reads it
/// ([`CudaBackend::copy_alone`]).
pub(crate) struct CopyAlone<'a> {
    _slot: MutexGuard<'a, Option<Bf16Copy>>,
    /// The copy's device address.
    pub(crate) addr: u64,
}

/// The inputs of an elementwise op, as [`CudaBackend::inputs`] gives them.
pub(crate) struct Inputs<'a, const N: usize> {
    /// Per input, the kernel's arguments: its floats and its copy alone, one of them null.
    pub(crate) args: [[Arg; 2]; N],
    _locks: [Option<CopyAlone<'a>>; N],
}

/// A buffer's bf16 copy that the kernel about to be queued writes along with the buffer
/// ([`CudaBackend::produced_copy`]).
pub(crate) struct ProducedCopy<'a> {
    slot: MutexGuard<'a, Option<Bf16Copy>>,
    addr: u64,
    /// Whether the kernel writes the floats too (not after [`ProducedCopy::alone`]).
    floats: bool,
}

impl ProducedCopy<'_> {
    /// The kernel argument: the copy's device address, or null for no copy.
    pub(crate) fn arg(copy: &Option<ProducedCopy<'_>>) -> Arg {
        Arg::Ptr(copy.as_ref().map_or(0, |c| c.addr))
    }

    /// The copy's device address, for a library call (a GEMM) that writes it.
    pub(crate) fn addr(&self) -> u64 {
        self.addr
    }

    /// Records that the op writes the copy alone, not the floats (which go stale).
    pub(crate) fn alone(&mut self) {
        self.floats = false;
    }

    /// Records, once the kernel is queued, that the copy holds the first `len` elements of the
    /// buffer's `contents` (the stream orders it before any GEMM that reads it), and whether the
    /// floats do.
    pub(crate) fn written(mut self, contents: u64, len: usize) {
        let floats = self.floats;
        if let Some(copy) = self.slot.as_mut() {
            copy.of = Some((contents, len));
            copy.floats = floats;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mae::backend::BackendErrorKind;
    use std::sync::atomic::Ordering;

    fn pays(g: &Gemm) -> bool {
        let (a, b, _) = g.lens();
        copies_pay(g, a, b)
    }

    /// ViT-B/16 at batch 128 (25,216 token rows, 12 heads of 64 over 197 tokens): every
    /// Linear layer in both directions takes copies, attention's products do not.
    #[test]
    fn linear_layers_take_copies_attention_does_not() {
        let rows = 128 * 197;
        let linear = [
            Gemm::new(rows, 3 * 768, 768).trans_b(), // qkv forward
            Gemm::new(rows, 3072, 768).trans_b(),    // fc1 forward
            Gemm::new(rows, 768, 3072).trans_b(),    // fc2 forward
            Gemm::new(rows, 768, 3072),              // fc2 input gradient
            Gemm::new(3072, 768, rows).trans_a(),    // fc2 weight gradient
            Gemm::new(128 * 49, 768, 768).trans_b(), // patch embedding of the visible patches
            Gemm::new(rows, 512, 768).trans_b(),     // decoder embedding
        ];
        for g in &linear {
            assert!(pays(g), "{g:?}");
        }
        let heads = 128 * 12;
        let attention = [
            Gemm::new(197, 197, 64)
                .trans_b()
                .batched(heads, 197 * 64, 197 * 64, 197 * 197), // scores
            Gemm::new(197, 64, 197).batched(heads, 197 * 197, 197 * 64, 197 * 64), // P V
        ];
        for g in &attention {
            assert!(!pays(g), "{g:?}");
        }
        assert!(!pays(&Gemm::new(5, 5, 0)));
    }

    /// On a device (or the fake driver of `emulate/`): the GELU gradient overwriting a buffer
    /// from `alloc_operand` writes its bf16 copy alone, and the bias gradient (column sums)
    /// reads that copy without widening it into the floats, summing the values it holds.
    #[test]
    fn bias_gradients_of_a_copy_alone_read_the_copy() {
        use mae::backend::{Backend, RowMap};
        let Some(mut be) = crate::test_device(Precision::Bf16) else {
            return;
        };
        be.bf16_gemm = Bf16Gemm::Auto;
        let (rows, cols) = (300, 24);
        let host = |k: usize| -> Vec<f32> {
            (0..rows * cols)
                .map(|i| ((i * 7 + k) % 23) as f32 / 7.0 - 1.5)
                .collect()
        };
        let (x, dy) = (be.upload(&host(1)).unwrap(), be.upload(&host(2)).unwrap());
        let mut d = be.alloc_operand(rows * cols).unwrap();
        be.gelu_backward(&x, &dy, &mut d, false).unwrap();
        let floats_current = |d: &CudaBuf| lock(d).unwrap().as_ref().map(|c| c.floats);
        assert_eq!(
            floats_current(&d),
            Some(false),
            "the GELU gradient wrote floats"
        );
        let mut bias = be.upload(&vec![0.5; cols]).unwrap();
        be.copy_rows_backward(&d, &mut bias, &RowMap::bias(rows, cols))
            .unwrap();
        assert_eq!(
            floats_current(&d),
            Some(false),
            "the column sums widened the copy"
        );
        assert!(!d.has_floats(), "floats allocated for a copy alone");
        let mut got = vec![f32::NAN; cols];
        be.download(&bias, &mut got).unwrap();
        // The stored values, through the floats (allocated and widened by the download).
        let mut stored = vec![f32::NAN; rows * cols];
        be.download(&d, &mut stored).unwrap();
        assert!(d.has_floats());
        assert_eq!(be.operand_floats.load(Ordering::Relaxed), 4 * rows * cols);
        for (c, &g) in got.iter().enumerate() {
            let sum: f64 = (0..rows).map(|r| stored[r * cols + c] as f64).sum();
            let want = (0.5 + sum) as f32;
            assert!(
                (g - want).abs() <= 1e-5 * want.abs().max(1.0),
                "column {c}: {g} vs {want}"
            );
        }
    }

    /// On a device (or the fake driver): a product overwriting a buffer from `alloc_operand`
    /// writes the copy alone, through cuBLAS (`gemm`) and cuBLASLt (`gemm_bias`), which the
    /// GELU and its gradient read as it is; one that accumulates, or a plain buffer, keeps the
    /// floats.
    #[test]
    fn products_into_operand_buffers_write_the_copy_alone() {
        use mae::backend::Backend;
        let Some(mut be) = crate::test_device(Precision::Bf16) else {
            return;
        };
        be.bf16_gemm = Bf16Gemm::Auto;
        // 877 FLOPs per operand element: the product multiplies copies.
        let (rows, cols, k) = (1024, 768, 64);
        let host =
            |len: usize| -> Vec<f32> { (0..len).map(|i| (i % 13) as f32 / 8.0 - 0.7).collect() };
        let (x, w) = (
            be.upload(&host(rows * k)).unwrap(),
            be.upload(&host(cols * k)).unwrap(),
        );
        let bias = be.upload(&host(cols)).unwrap();
        let g = Gemm::new(rows, cols, k).trans_b();
        // Whether the floats hold the contents, where the copy holds them too (`None`: the
        // copy is stale or missing, as after a product that fell back to f32).
        let floats = |d: &CudaBuf| {
            let slot = lock(d).unwrap();
            let copy = slot.as_ref()?;
            (copy.of.map(|(contents, _)| contents) == Some(d.contents())).then_some(copy.floats)
        };
        let mut out = be.alloc_operand(rows * cols).unwrap();
        be.gemm(&g, &x, &w, &mut out).unwrap();
        assert_eq!(floats(&out), Some(false), "gemm wrote the floats");
        be.gemm_bias(&g, &x, &w, &bias, &mut out).unwrap();
        assert_eq!(floats(&out), Some(false), "gemm_bias wrote the floats");
        assert!(!out.has_floats(), "floats allocated for a copy alone");
        // The GELU and its gradient read the copy, not widened floats.
        let (mut act, mut grad) = (
            be.alloc(rows * cols).unwrap(),
            be.alloc(rows * cols).unwrap(),
        );
        be.gelu_forward(&out, &mut act).unwrap();
        be.gelu_backward(&out, &out, &mut grad, false).unwrap();
        assert_eq!(
            floats(&out),
            Some(false),
            "the GELU widened its input's copy"
        );
        assert!(!out.has_floats(), "the GELU allocated its input's floats");
        be.gemm(&g.accumulate(), &x, &w, &mut out).unwrap();
        assert_ne!(
            floats(&out),
            Some(false),
            "an accumulating gemm left the floats stale"
        );
        let mut plain = be.alloc(rows * cols).unwrap();
        be.gemm(&g, &x, &w, &mut plain).unwrap();
        assert_ne!(
            floats(&plain),
            Some(false),
            "a plain buffer lost its floats"
        );
    }

    /// On a device (or the fake driver): a buffer from `alloc_operand` gets its floats at the
    /// first op that needs them, zeroed as `alloc`'s, counted in `operand_floats`; in the
    /// modes where no producer writes a copy alone it has them from the start.
    #[test]
    fn operand_floats_are_allocated_by_the_first_op_that_needs_them() {
        use mae::backend::Backend;
        let Some(mut be) = crate::test_device(Precision::Bf16) else {
            return;
        };
        be.bf16_gemm = Bf16Gemm::Auto;
        let n = 1000;
        let fresh = be.alloc_operand(n).unwrap();
        assert!(!fresh.has_floats());
        let mut got = vec![f32::NAN; n];
        be.download(&fresh, &mut got).unwrap();
        assert!(
            got.iter().all(|&v| v.to_bits() == 0),
            "a fresh buffer is not zeros"
        );
        assert!(fresh.has_floats());
        assert_eq!(be.operand_floats.load(Ordering::Relaxed), 4 * n);
        // A host write and an accumulating op need the floats too.
        let host: Vec<f32> = (0..n).map(|i| i as f32 / 7.0).collect();
        let mut written = be.alloc_operand(n).unwrap();
        be.write(&mut written, &host).unwrap();
        be.download(&written, &mut got).unwrap();
        assert_eq!(got, host);
        let x = be.upload(&host).unwrap();
        let mut accumulated = be.alloc_operand(n).unwrap();
        be.gelu_backward(&x, &x, &mut accumulated, true).unwrap();
        assert!(accumulated.has_floats());
        assert_eq!(be.operand_floats.load(Ordering::Relaxed), 3 * 4 * n);
        be.bf16_gemm = Bf16Gemm::Fast;
        assert!(be.alloc_operand(n).unwrap().has_floats());
        let f32_mode = crate::test_device(Precision::F32).unwrap();
        assert!(f32_mode.alloc_operand(n).unwrap().has_floats());
    }

    /// On a device (or the fake driver): a bf16 training step and an embedding allocate no
    /// floats for the model's `alloc_operand` buffers (block LayerNorm outputs, qkv, the
    /// attention's output, its gradient and qkv's, the MLP's hidden tensors and their
    /// gradients): no op reads them as floats. On the bf16 mode's attention path, the tensor-core kernels, whatever
    /// `MAE_CUDA_ATTENTION` says (the composed path's `split_heads` reads the floats).
    #[test]
    fn bf16_training_and_embedding_allocate_no_operand_floats() {
        use crate::backend::AttentionPath;
        use mae::embed::{Embedder, Pool};
        use mae::train::{TrainOptions, Trainer};
        let Some(mut be) = crate::test_device(Precision::Bf16) else {
            return;
        };
        be.attention_choice = Some(AttentionPath::TensorCores);
        let cfg = mae::Config {
            depth: 2,
            decoder_depth: 1,
            ..mae::Config::preset("tiny32").unwrap()
        };
        let batch = 2;
        let params = mae::init::init_params(&cfg, 0);
        let pixels = batch * cfg.in_chans * cfg.img_size * cfg.img_size;
        let imgs: Vec<f32> = (0..pixels).map(|i| (i % 17) as f32 / 8.0 - 1.0).collect();
        // Every Linear layer of ViT-B/16 and larger multiplies copies under `auto`
        // (`linear_layers_take_copies_attention_does_not`); this model's are too small to, so
        // `copies` stands in for that. Under `auto` its products take FAST_16BF, which reads
        // the floats of its inputs: that the count sees those reads shows it can fail.
        for gemm in [Bf16Gemm::Copies, Bf16Gemm::Auto] {
            be.bf16_gemm = gemm;
            be.operand_floats.store(0, Ordering::Relaxed);
            let options = TrainOptions::new(batch);
            let mut trainer = Trainer::new(&be, &cfg, &params, options, 0).unwrap();
            for _ in 0..2 {
                trainer.train_step(&be, &imgs, None, 1e-4).unwrap();
            }
            let mut embedder = Embedder::new(&be, &cfg, &params.encoder, batch).unwrap();
            embedder.pooled(&be, &imgs, Pool::Cls).unwrap();
            let bytes = be.operand_floats.load(Ordering::Relaxed);
            match gemm {
                Bf16Gemm::Copies => assert_eq!(bytes, 0, "operand floats allocated"),
                _ => assert!(bytes > 0, "FAST_16BF's reads of operand floats not counted"),
            }
        }
    }

    /// On a device (or the fake driver): the tensor-core attention takes qkv, O and dO as
    /// copies alone or none of them. Given qkv as a copy alone (a product's bf16 output) and dO as floats,
    /// the backward widens qkv and runs on floats; forward and backward then give bitwise what
    /// plain buffers holding the same values give.
    #[test]
    fn attention_inputs_of_mixed_kinds_run_on_floats() {
        use crate::backend::AttentionPath;
        use mae::backend::{Attention, Backend};
        let Some(mut be) = crate::test_device(Precision::Bf16) else {
            return;
        };
        be.attention_choice = Some(AttentionPath::TensorCores);
        be.bf16_gemm = Bf16Gemm::Copies;
        let a = Attention {
            batch: 2,
            tokens: 70,
            heads: 2,
            head_dim: 32,
            scale: 0.125,
        };
        let (rows, dim, k) = (a.batch * a.tokens, a.dim(), 16);
        let host = |len: usize, seed: usize| -> Vec<f32> {
            (0..len)
                .map(|i| ((i * 7 + seed) % 29) as f32 / 29.0 - 0.5)
                .collect()
        };
        let (x, w) = (
            be.upload(&host(rows * k, 1)).unwrap(),
            be.upload(&host(3 * dim * k, 2)).unwrap(),
        );
        let mut qkv = be.alloc_operand(rows * 3 * dim).unwrap();
        be.gemm(&Gemm::new(rows, 3 * dim, k).trans_b(), &x, &w, &mut qkv)
            .unwrap();
        assert!(!qkv.has_floats(), "the product wrote floats");
        let mut values = vec![0.0; rows * 3 * dim];
        be.download(&qkv, &mut values).unwrap(); // widens, as the backward would
        let plain = be.upload(&values).unwrap();
        let d_out = be.upload(&host(rows * dim, 3)).unwrap();
        let run = |q: &CudaBuf| -> Vec<f32> {
            let (mut out, mut lse) = (
                be.alloc(rows * dim).unwrap(),
                be.alloc(a.batch * a.heads * a.tokens).unwrap(),
            );
            be.attention_forward(q, &mut out, &mut lse, &a).unwrap();
            let mut d_qkv = be.alloc(rows * 3 * dim).unwrap();
            be.attention_backward(q, &out, &lse, &d_out, &mut d_qkv, &a)
                .unwrap();
            let mut got = vec![f32::NAN; rows * 3 * dim + rows * dim];
            be.download(&d_qkv, &mut got[..rows * 3 * dim]).unwrap();
            be.download(&out, &mut got[rows * 3 * dim..]).unwrap();
            got
        };
        let (mixed, floats) = (run(&qkv), run(&plain));
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&mixed), bits(&floats));
    }

    /// On a device (or the fake driver): at 197 tokens the tensor-core attention's last block of
    /// each (image, head) holds 5 rows; `MAE_CUDA_ATTENTION_TAIL=split` runs those blocks in the
    /// tail kernels (not the default since an H200 found them slower), `whole` in the main
    /// kernels. Both routes give the same output and gradients, the last rows included, within
    /// the bf16 rounding of the probabilities.
    #[test]
    fn the_attention_tail_split_and_whole_agree() {
        use crate::backend::AttentionPath;
        use mae::backend::{Attention, Backend};
        let Some(mut be) = crate::test_device(Precision::Bf16) else {
            return;
        };
        be.attention_choice = Some(AttentionPath::TensorCores);
        let a = Attention {
            batch: 1,
            tokens: 197,
            heads: 2,
            head_dim: 32,
            scale: 0.176,
        };
        let (rows, dim) = (a.batch * a.tokens, a.dim());
        let host = |len: usize, seed: usize| -> Vec<f32> {
            (0..len)
                .map(|i| ((i * 7 + seed) % 31) as f32 / 31.0 - 0.5)
                .collect()
        };
        let qkv = be.upload(&host(rows * 3 * dim, 1)).unwrap();
        let d_out = be.upload(&host(rows * dim, 2)).unwrap();
        let mut run = |split: bool| -> Vec<f32> {
            be.attention_tail_split = split;
            let (mut out, mut lse) = (
                be.alloc(rows * dim).unwrap(),
                be.alloc(a.batch * a.heads * a.tokens).unwrap(),
            );
            be.attention_forward(&qkv, &mut out, &mut lse, &a).unwrap();
            let mut d_qkv = be.alloc(rows * 3 * dim).unwrap();
            be.attention_backward(&qkv, &out, &lse, &d_out, &mut d_qkv, &a)
                .unwrap();
            let mut got = vec![f32::NAN; rows * 3 * dim + rows * dim];
            be.download(&d_qkv, &mut got[..rows * 3 * dim]).unwrap();
            be.download(&out, &mut got[rows * 3 * dim..]).unwrap();
            got
        };
        let (split, whole) = (run(true), run(false));
        let scale = whole.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(scale > 0.0, "nothing computed");
        // Each route rounds the probabilities (and their gradients) to bf16 for the tensor
        // cores after its own running maximum: the routes differ by such roundings (2^-9
        // relative) of terms that the largest value bounds (the fake driver: 0.0019 of it).
        // Tail kernels left unlaunched fail it (their rows' gradients are never written).
        let tol = scale / 256.0;
        for (i, (s, w)) in split.iter().zip(&whole).enumerate() {
            assert!((s - w).abs() <= tol, "element {i}: split {s}, whole {w}");
        }
    }

    /// On a device (or the fake driver): `adamw_many` writes the new bf16 copy of a weight that
    /// a product read as a copy, stamped with the weight's new contents, so the next product
    /// multiplies it without another rounding pass, bitwise what a fresh buffer of the new
    /// values gives; a bias that nothing multiplied gets no copy.
    #[test]
    fn the_optimizer_refreshes_the_copies_of_multiplied_weights() {
        use mae::backend::{AdamWStep, AdamWTensor, Backend};
        let Some(mut be) = crate::test_device(Precision::Bf16) else {
            return;
        };
        be.bf16_gemm = Bf16Gemm::Auto;
        let (rows, out, inputs) = (640, 640, 512);
        let host = |len: usize, k: usize| -> Vec<f32> {
            (0..len)
                .map(|i| ((i * 7 + k) % 23) as f32 / 23.0 - 0.5)
                .collect()
        };
        let x = be.upload(&host(rows * inputs, 1)).unwrap();
        let mut w = be.upload(&host(out * inputs, 2)).unwrap();
        let mut bias = be.upload(&host(out, 3)).unwrap();
        let g = Gemm::new(rows, out, inputs).trans_b();
        let product = |be: &CudaBackend, w: &CudaBuf| {
            let mut y = be.alloc(rows * out).unwrap();
            be.gemm(&g, &x, w, &mut y).unwrap();
            let mut got = vec![f32::NAN; rows * out];
            be.download(&y, &mut got).unwrap();
            got.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        };
        product(&be, &w); // makes w's copy
        let state = |len: usize, k: usize| {
            [1, 2, 3].map(|j| {
                be.upload(&host(len, k + j).iter().map(|v| v.abs()).collect::<Vec<_>>())
                    .unwrap()
            })
        };
        let ([mut gw, mut mw, mut vw], [mut gb, mut mb, mut vb]) =
            (state(out * inputs, 10), state(out, 20));
        let step = Some(AdamWStep::new(1e-2, 0.9, 0.95, 1e-8, 0.05, 1));
        let tensors = [
            AdamWTensor {
                param: &mut w,
                grad: &mut gw,
                m: &mut mw,
                v: &mut vw,
                step,
            },
            AdamWTensor {
                param: &mut bias,
                grad: &mut gb,
                m: &mut mb,
                v: &mut vb,
                step,
            },
        ];
        be.adamw_many(tensors.into_iter()).unwrap();
        let copy_of = |buf: &CudaBuf| lock(buf).unwrap().as_ref().and_then(|c| c.of);
        assert_eq!(
            copy_of(&w),
            Some((w.contents(), out * inputs)),
            "w's copy not refreshed"
        );
        assert!(lock(&bias).unwrap().is_none(), "a copy made for the bias");
        let mut values = vec![f32::NAN; out * inputs];
        be.download(&w, &mut values).unwrap();
        let fresh = be.upload(&values).unwrap();
        assert_eq!(product(&be, &w), product(&be, &fresh));
    }

    #[test]
    fn the_choice_parses_and_refuses_unknown_values() {
        assert_eq!(Bf16Gemm::parse("copies"), Ok(Bf16Gemm::Copies));
        assert_eq!(Bf16Gemm::parse("fast"), Ok(Bf16Gemm::Fast));
        assert_eq!(Bf16Gemm::parse("auto"), Ok(Bf16Gemm::Auto));
        let e = Bf16Gemm::parse("bf16").unwrap_err();
        assert_eq!(e.kind, BackendErrorKind::Unsupported);
        let g = Gemm::new(4, 4, 4);
        assert!(Bf16Gemm::Copies.copies(&g, 16, 16));
        assert!(!Bf16Gemm::Fast.copies(&Gemm::new(4096, 4096, 4096), 1 << 24, 1 << 24));
    }
}
