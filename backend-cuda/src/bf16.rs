//! The operands of bf16 GEMMs: where [`Precision::Bf16`](crate::Precision::Bf16) rounds them.
//!
//! Both routes compute the same function, the products of operands rounded to bf16 (nearest,
//! ties to even) accumulated in f32:
//! - **copies**: a kernel (`round_to_bf16`) writes bf16 copies of A and B into scratch, and
//!   cuBLAS multiplies those (`CUDA_R_16BF` operands, `CUBLAS_COMPUTE_32F`). cuBLAS's bf16
//!   kernels stream half the bytes and run near the tensor cores' peak; the copies cost one
//!   pass over each operand.
//! - **fast**: cuBLAS reads the f32 operands and rounds them itself
//!   (`CUBLAS_COMPUTE_32F_FAST_16BF`), without the extra pass; its kernels for f32 operands ran
//!   at about a third of the bf16 peak on an H200 (docs/results-gpu.md).
//!
//! So the copies pay where the product is compute-bound (every Linear layer: thousands of
//! FLOPs per operand element) and not where it is memory-bound (attention's `T x T x head`
//! products: a few hundred). `MAE_CUDA_BF16_GEMM=auto|copies|fast` chooses; `auto` (the
//! default) decides per GEMM by [`copies_pay`].

use crate::backend::{u, CudaBackend};
use crate::buffer::CudaBuf;
use crate::error;
use crate::kernels::{Arg, Kernel};
use crate::launch::elementwise;
use cudarc::driver::{CudaSlice, DevicePtrMut};
use mae::backend::{BResult, BackendError, BackendErrorKind, Gemm};

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
    /// Reads `MAE_CUDA_BF16_GEMM`; unset is [`Bf16Gemm::Auto`].
    pub(crate) fn from_env() -> BResult<Bf16Gemm> {
        match std::env::var("MAE_CUDA_BF16_GEMM") {
            Err(_) => Ok(Bf16Gemm::Auto),
            Ok(v) => Self::parse(&v),
        }
    }

    fn parse(v: &str) -> BResult<Bf16Gemm> {
        match v {
            "auto" => Ok(Bf16Gemm::Auto),
            "copies" => Ok(Bf16Gemm::Copies),
            "fast" => Ok(Bf16Gemm::Fast),
            _ => Err(BackendError::new(
                BackendErrorKind::Unsupported,
                format!("MAE_CUDA_BF16_GEMM={v:?}: expected `auto`, `copies` or `fast`"),
            )),
        }
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

/// The bf16 copy of one GEMM operand (A or B): the scratch, two values per u32, and which
/// contents it holds.
pub(crate) struct Bf16Copy {
    words: CudaSlice<u32>,
    /// [`CudaBuf::contents`] and length of the operand last copied here. A GEMM whose operand
    /// still has those contents (the same buffer, not written since) multiplies the copy
    /// again: a Linear layer's input-gradient and weight-gradient products both read dY as A.
    of: Option<(u64, usize)>,
}

impl CudaBackend {
    /// Queues bf16 copies of the first `len` elements of each operand into `copies` (grown to
    /// fit; the old buffer's free is stream-ordered after the work that reads it), unless the
    /// slot already holds a copy of those contents, and returns the copies' device addresses.
    /// The caller holds `copies` locked until the GEMM that reads them is queued.
    pub(crate) fn round_to_bf16(
        &self,
        copies: &mut [Option<Bf16Copy>; 2],
        operands: [(&CudaBuf, usize); 2],
    ) -> BResult<[u64; 2]> {
        let mut addrs = [0u64; 2];
        for ((slot, (buf, len)), addr) in copies.iter_mut().zip(operands).zip(&mut addrs) {
            let words = len.div_ceil(2).max(1);
            let copy = match slot {
                Some(c) if c.words.len() >= words => c,
                _ => {
                    *slot = None;
                    let bytes = error::bytes_of::<u32>(words)?;
                    // SAFETY: uninitialised device memory; `round_to_bf16` writes the first
                    // `words` elements before the GEMM, which reads no further, runs.
                    let fresh = unsafe { self.stream.alloc::<u32>(words) }.map_err(|e| {
                        error::driver(e, "allocating the bf16 copies of GEMM operands", bytes)
                    })?;
                    slot.insert(Bf16Copy {
                        words: fresh,
                        of: None,
                    })
                }
            };
            *addr = copy.words.device_ptr_mut(&self.stream).0;
            let contents = Some((buf.contents(), len));
            if copy.of == contents {
                continue;
            }
            copy.of = None;
            let args = [self.ptr(buf), Arg::Ptr(*addr), u(len)];
            self.launch(
                Kernel::RoundToBf16,
                elementwise(len.div_ceil(2) as u64),
                &args,
            )?;
            copy.of = contents;
        }
        Ok(addrs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
