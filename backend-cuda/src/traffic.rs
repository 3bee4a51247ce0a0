//! The bytes each kernel moves in device memory, for the profile's bandwidth column.
//!
//! Outside the products a step is a chain of passes over activations, each bound by memory
//! bandwidth: their time against the bytes they must move says which pass is far from the
//! card's bandwidth and which is at it. The count here is the least each launch moves: every
//! element it reads or writes once (re-reads that the caches serve are not counted), at the
//! width it is stored (4 bytes a float, 2 a bf16 copy; a null pointer is not accessed), read
//! off the launch's own arguments, so that it follows the floats and copies each launch takes.
//! A kernel whose traffic the arguments do not give (`adamw_many`'s table lives on the device)
//! is counted by its caller or not at all.

use crate::kernels::{Arg, Kernel};

/// The bytes `kernel` moves at least when launched on `blocks` blocks with `args` (checked
/// against its parameter list before), or `None` for a kernel this module does not count.
pub(crate) fn bytes(kernel: Kernel, blocks: u64, args: &[Arg]) -> Option<f64> {
    let a = Args(args);
    let b = match kernel {
        Kernel::Fill => 4.0 * a.n(1),
        Kernel::Add => 12.0 * a.n(2),
        Kernel::Scale => 8.0 * a.n(1),
        Kernel::SumPartials => {
            // Each of `count` partials read, the result written, dst read where beta is not 0.
            let (n, n_b, count) = (a.n(2), a.n(6), a.n(8));
            let read_dst = |len: f64, beta: usize| if a.f(beta) == 0.0 { 0.0 } else { len };
            4.0 * (count * (n + n_b) + n + n_b + read_dst(n, 3) + read_dst(n_b, 7))
        }
        Kernel::ScaleRows => a.n(3) * (8.0 + a.flag(5) * 4.0),
        Kernel::GeluForward | Kernel::GeluForwardF32 => {
            a.n(4) * (a.input(0, 1) + a.output(2) + a.copy(3))
        }
        Kernel::BiasGeluForward | Kernel::BiasGeluForwardF32 => {
            // `pre` read and written back with its bias.
            a.n(4) * (8.0 + a.output(2) + a.copy(3))
        }
        Kernel::GeluBackward | Kernel::GeluBackwardF32 => {
            let dx = a.output(4) * (1.0 + a.flag(7)) + a.copy(5);
            a.n(6) * (a.input(0, 1) + a.input(2, 3) + dx)
        }
        Kernel::AdamW => 28.0 * a.n(4),
        Kernel::RoundToBf16 | Kernel::FloatsOfBf16 => 6.0 * a.n(2),
        Kernel::CopyRows => a.n(2) * a.n(3) * a.n(4) * (8.0 + a.flag(10) * 4.0),
        Kernel::CopyRowsBackwardPartials => {
            // d_dst's rows read, one f64 partial per (chunk, source element) written.
            4.0 * a.n(2) * a.n(3) * a.n(4) + 8.0 * a.n(11) * a.n(10) * a.n(4)
        }
        Kernel::GatherRows | Kernel::GatherRowsBackward => {
            let rows = a.n(3) * a.n(4);
            let dst = if kernel == Kernel::GatherRows {
                4.0
            } else {
                8.0
            };
            rows * 4.0 + rows * a.n(5) * (4.0 + dst)
        }
        Kernel::Patchify => 8.0 * a.n(2) * a.n(3) * a.n(4) * a.n(5),
        Kernel::SplitHeads | Kernel::MergeHeads => 8.0 * a.n(2) * a.n(3) * a.n(4) * a.n(5),
        Kernel::LayerNormForward => {
            let (rows, cols) = (a.n(7), a.n(8));
            rows * cols * (4.0 + a.output(3) + a.copy(4)) + 8.0 * (rows + cols)
        }
        Kernel::LayerNormBackwardDx => {
            // dx is the residual stream's gradient, added to; the fused parameter-gradient
            // partials are one f64 per (block, column) for each of the two (one block per row
            // at most: `launch::layernorm_backward_blocks`).
            let (rows, cols) = (a.n(10), a.n(11));
            let partials = match a.present(8) {
                true => 16.0 * rows.min(blocks as f64) * cols,
                false => 0.0,
            };
            rows * cols * (a.input(0, 1) + 4.0 + 8.0 + a.copy(7)) + 8.0 * rows + partials
        }
        Kernel::LayerNormParamPartials => {
            let (rows, cols, chunks) = (a.n(7), a.n(8), a.n(9));
            rows * cols * (a.input(0, 1) + 4.0) + 8.0 * rows + 16.0 * chunks * cols
        }
        Kernel::ColumnSumPartials | Kernel::ColumnSumPartialsBf16 => {
            let width = if kernel == Kernel::ColumnSumPartials {
                4.0
            } else {
                2.0
            };
            a.n(3) * a.n(4) * width + 8.0 * a.n(5) * a.n(4)
        }
        // The sums of the partials, added to the output.
        Kernel::ColumnSumFinish => a.n(3) * (8.0 * a.n(2) + 8.0),
        Kernel::ColumnSumFinishPair => 2.0 * a.n(5) * (8.0 * a.n(4) + 8.0),
        Kernel::NormalizeRows | Kernel::SoftmaxForward => 8.0 * a.n(2) * a.n(3),
        Kernel::SoftmaxBackward => 12.0 * a.n(3) * a.n(4),
        Kernel::MaskedMseRows => 8.0 * a.n(4) * a.n(5) + 12.0 * a.n(4),
        Kernel::MaskedMseTotal => 12.0 * a.n(3),
        Kernel::MaskSum => 4.0 * a.n(2),
        // d_pred is added to.
        Kernel::MaskedMseBackward => 16.0 * a.n(5) * a.n(6) + 4.0 * a.n(5),
        Kernel::AttentionForwardMma
        | Kernel::AttentionForwardMmaBf16Hd32
        | Kernel::AttentionForwardMmaBf16Hd64
        | Kernel::AttentionForwardMmaTail => {
            // q, k and v read; out written (floats, copy or both); lse written.
            let (rows, width) = attention_rows(&a, 5);
            rows * width * (3.0 * a.input(0, 1) + a.output(2) + a.copy(3)) + 4.0 * rows * a.n(7)
        }
        Kernel::AttentionBackwardDqMma
        | Kernel::AttentionBackwardDqMmaBf16Hd32
        | Kernel::AttentionBackwardDqMmaBf16Hd64
        | Kernel::AttentionBackwardDqMmaTail => {
            // q, k, v, out and dO read; dQ written; lse read and the row statistics written
            // (8 bytes a score row each).
            let (rows, width) = attention_rows(&a, 10);
            let d_q = a.output(7) + a.copy(8);
            let read = 3.0 * a.input(0, 1) + a.input(2, 3) + a.input(5, 6);
            rows * width * (read + d_q) + 12.0 * rows * a.n(12)
        }
        Kernel::AttentionBackwardDkvMma
        | Kernel::AttentionBackwardDkvMmaBf16Hd32
        | Kernel::AttentionBackwardDkvMmaBf16Hd64
        | Kernel::AttentionBackwardDkvMmaTail => {
            // q, k, v and dO read, the row statistics read; dK and dV written.
            let (rows, width) = attention_rows(&a, 7);
            let d_kv = 2.0 * (a.output(5) + a.copy(6));
            rows * width * (3.0 * a.input(0, 1) + a.input(2, 3) + d_kv) + 8.0 * rows * a.n(9)
        }
        _ => return None,
    };
    Some(b)
}

/// The rows (images x tokens) and the width of one of q, k and v (heads x head width) of an
/// attention kernel whose dimensions start at argument `dims` (batch, tokens, heads, head
/// width).
fn attention_rows(a: &Args, dims: usize) -> (f64, f64) {
    (a.n(dims) * a.n(dims + 1), a.n(dims + 2) * a.n(dims + 3))
}

/// A launch's arguments, read by position.
struct Args<'a>(&'a [Arg]);

impl Args<'_> {
    /// A count argument (0 where the position holds something else: the caller's table and the
    /// kernel's parameter list are checked against each other before any launch).
    fn n(&self, i: usize) -> f64 {
        match self.0.get(i) {
            Some(Arg::U64(v)) => *v as f64,
            Some(Arg::U32(v)) => f64::from(*v),
            _ => 0.0,
        }
    }

    fn f(&self, i: usize) -> f32 {
        match self.0.get(i) {
            Some(Arg::F32(v)) => *v,
            _ => 0.0,
        }
    }

    /// 1 for a set flag, else 0.
    fn flag(&self, i: usize) -> f64 {
        f64::from(self.n(i) != 0.0)
    }

    fn present(&self, i: usize) -> bool {
        matches!(self.0.get(i), Some(Arg::Ptr(p)) if *p != 0)
    }

    /// Bytes per element of an input given as floats (`floats`) and a bf16 copy (`copy`): the
    /// kernels read the copy where there is one (`load_in`), else the floats.
    fn input(&self, floats: usize, copy: usize) -> f64 {
        match (self.present(copy), self.present(floats)) {
            (true, _) => 2.0,
            (false, true) => 4.0,
            (false, false) => 0.0,
        }
    }

    /// Bytes per element written to a float output, 0 where it is null.
    fn output(&self, i: usize) -> f64 {
        if self.present(i) {
            4.0
        } else {
            0.0
        }
    }

    /// Bytes per element written to a bf16 copy, 0 where it is null.
    fn copy(&self, i: usize) -> f64 {
        if self.present(i) {
            2.0
        } else {
            0.0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A launch's arguments: a pointer for each of `pointers` ('1' live, '0' null), then `rest`.
    fn args(pointers: &str, rest: &[Arg]) -> Vec<Arg> {
        let live = |c| Arg::Ptr(if c == '1' { 0x1000 } else { 0 });
        pointers
            .chars()
            .map(live)
            .chain(rest.iter().copied())
            .collect()
    }

    fn n(v: u64) -> Arg {
        Arg::U64(v)
    }

    /// Each kernel's count follows the widths its arguments give: an input read from its copy
    /// moves 2 bytes an element, from its floats 4; a null output moves nothing.
    #[test]
    fn traffic_follows_the_widths_of_the_arguments() {
        let gelu = Kernel::GeluForwardF32;
        // GELU forward on 1,000 elements: x from its copy (2) into y's copy alone (2).
        assert_eq!(bytes(gelu, 1, &args("0101", &[n(1000)])), Some(4000.0));
        // From the floats into floats and copy: 4 + 4 + 2.
        assert_eq!(bytes(gelu, 1, &args("1011", &[n(1000)])), Some(10_000.0));
        // GELU backward accumulating into floats: x 2, dy 4, dx read and written 8.
        let backward = args("111010", &[n(10), Arg::U32(1)]);
        assert_eq!(bytes(Kernel::GeluBackwardF32, 1, &backward), Some(140.0));
        // LayerNorm forward, 8 rows of 4: x 4, y's copy alone 2, mean and rstd 8 a row,
        // gamma and beta 8 a column.
        let norm = args("1110111", &[n(8), n(4), Arg::F32(1e-6)]);
        assert_eq!(
            bytes(Kernel::LayerNormForward, 1, &norm),
            Some(32.0 * 6.0 + 96.0)
        );
        // Summing 3 partials of 10 and 2 elements, dst read (beta 1) and the bias's not.
        let sums = [
            Arg::Ptr(1),
            Arg::Ptr(1),
            n(10),
            Arg::F32(1.0),
            Arg::Ptr(1),
            Arg::Ptr(1),
            n(2),
            Arg::F32(0.0),
            Arg::U32(3),
        ];
        let read = 3.0 * 12.0 + 12.0 + 10.0;
        assert_eq!(bytes(Kernel::SumPartials, 1, &sums), Some(4.0 * read));
        // The bf16 forward attention: 2 images x 5 tokens, 3 heads of 4: q, k, v from copies
        // (3 x 2), out as floats and copy (4 + 2), lse 4 a score row.
        let dims = [n(2), n(5), n(3), n(4), Arg::F32(0.5), Arg::U32(0)];
        let attention = args("01111", &dims);
        let expected = 10.0 * 12.0 * 12.0 + 4.0 * 10.0 * 3.0;
        let forward = Kernel::AttentionForwardMmaBf16Hd32;
        assert_eq!(bytes(forward, 1, &attention), Some(expected));
        // The LayerNorm backward over 100 rows of 8, dy from its copy (2), x (4), dx added to
        // (8) with its copy (2), mean and rstd 8 a row, and the parameter partials: 16 bytes a
        // column for each block, of which there are no more than rows.
        let ln = args("0111111111", &[n(100), n(8)]);
        let rows = 800.0 * 16.0 + 800.0;
        let ln_dx = Kernel::LayerNormBackwardDx;
        assert_eq!(bytes(ln_dx, 10, &ln), Some(rows + 16.0 * 10.0 * 8.0));
        assert_eq!(bytes(ln_dx, 1000, &ln), Some(rows + 16.0 * 100.0 * 8.0));
    }

    /// `adamw_many` reads its tensors from a device table: its caller counts it.
    #[test]
    fn a_table_driven_kernel_is_left_to_its_caller() {
        let table = args("1", &[n(3), n(7)]);
        assert_eq!(bytes(Kernel::AdamWMany, 1, &table), None);
    }
}
