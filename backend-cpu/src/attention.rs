//! Fused multi-head self-attention ([`mae::backend::Backend::attention_forward`] and
//! [`mae::backend::Backend::attention_backward`]): `softmax(scale q k^T) v` per (image, head)
//! straight from timm's qkv layout, without the `[N, H, T, T]` score and probability tensors of
//! the composed path and without `split_heads` / `merge_heads` copies.
//!
//! Each head's query rows are taken in blocks of at most [`BLOCK_FLOATS`] scores; a block's scores
//! (`rows x T`) live in a small scratch that stays in cache while it is turned into
//! probabilities and multiplied by `v`. Every key of a block's rows is in that scratch, so each
//! row's softmax is the exact one of the composed path (no online rescaling), and the forward
//! keeps one log-sum-exp per row for the backward, which recomputes the probabilities from it
//! (flash-attention style) instead of reading them back from memory:
//!
//! ```text
//! forward, per query block:   S = q k^T          P = softmax(scale S)      O = P v
//!                             lse = log(sum(exp(scale S)))  per row
//! backward, per query block:  P = exp(scale S - lse)       dP = dO v^T
//!                             dV += P^T dO                 dS = scale P (dP - rowsum(dP P))
//!                             dQ = dS k                    dK += dS^T q
//! ```
//!
//! The products are the crate's single-threaded strided [`product`], reading q, k, v, `d_out`
//! and writing `out`, `d_qkv` in place through row strides (`3 D` or `D`), so nothing is copied.
//!
//! Threads: one pool task per image. A head's columns interleave with the other heads' in every
//! row of `out` and `d_qkv`, so an image's rows are the smallest piece of those buffers a task
//! can own as a plain `&mut` slice (the same split as `split_heads` / `merge_heads`). A task
//! writes only its image's rows of `out`, `lse` and `d_qkv`, every sum (the softmax rows, the
//! products, the `dK`, `dV` sums over query blocks in ascending order) runs inside one task, so
//! the results are bitwise the same for any thread count and any scheduling.
//!
//! Numerics follow the composed ops: the probabilities are computed exactly as
//! `softmax_forward` computes them (scale after the product, `exp` of the `f32` difference to
//! the row maximum in `f64`, row sum in `f64` in the crate's fixed order), and `dS` as
//! `softmax_backward` computes it (the row dot product in `f64`). `lse` is `max + ln(sum)` in
//! `f64`, stored as `f32` as the trait asks; the backward's probabilities `exp(scale S - lse)`
//! therefore differ from the forward's by the rounding of `lse` (~1e-7 relative per unit of
//! `lse`).
//!
//! Scratch: the block scores live in [`SLOTS`], one buffer per pool thread, grown on the calling
//! thread at the start of a call to what that call needs and never shrunk, so after the first
//! call at the largest shape the ops allocate nothing (the crate's "ops never allocate"
//! contract, checked per training step by `conformance/tests/alloc.rs`). Growing every slot up
//! front, rather than a thread-local buffer on first use per thread, keeps that independent of
//! which threads happened to run tasks in the first step.
//!
//! `MAE_CPU_ATTENTION=composed` (read once) makes [`enabled`] false, so the model composes
//! attention from `split_heads`, `gemm`, `softmax_*` and `merge_heads` again, to compare the
//! two paths; the fused ops themselves stay callable.

use crate::activation::{exp_normalize_rows, scaled_max};
use crate::fastmath::{exp_in_place, wide};
use crate::gemm::{product, MatRef};
use crate::pool;
use crate::reduce::fold2;
use core::ops::Range;
use mae::backend::{Attention, BResult, BackendError, BackendErrorKind};
use std::sync::{Mutex, MutexGuard, OnceLock, TryLockError};

/// Floats of one block of scores (128 KiB): the backward holds two blocks, half the 512 KiB L2
/// of a core of the EPYC this was tuned on, so they stay in cache between the products and the
/// row passes. At MAE's sequence lengths a block is most or all of a head (`T` = 50 in a ViT-B
/// encoder: one block of 50 rows; 197 in its decoder: two of 99 and 98), which keeps each
/// product big enough for the GEMM kernel's micro-tiles; longer sequences get shorter blocks.
const BLOCK_FLOATS: usize = 32 * 1024;

/// The fewest query rows per block, however long the rows: shorter blocks would make the
/// products too thin to run at speed.
const MIN_BLOCK_ROWS: usize = 16;

/// Whether the model takes the fused path: true unless `MAE_CPU_ATTENTION=composed`.
pub(crate) fn enabled() -> bool {
    static FUSED: OnceLock<bool> = OnceLock::new();
    *FUSED.get_or_init(|| std::env::var("MAE_CPU_ATTENTION").as_deref() != Ok("composed"))
}

// ---- forward ------------------------------------------------------------------------------------

/// `out = softmax(scale q k^T) v` per (image, head), `lse` = each score row's log-sum-exp.
pub(crate) fn forward(qkv: &[f32], out: &mut [f32], lse: &mut [f32], a: &Attention) -> BResult<()> {
    let (lq, lo, ll) = a.lens();
    let (t, dim) = (a.tokens, a.dim());
    if ll == 0 {
        return Ok(()); // no score rows
    }
    let scratch_len = block_rows(t) * t;
    reserve_slots(scratch_len)?;
    let qkv = &qkv[..lq];
    pool::chunks2(
        a.batch,
        &mut out[..lo],
        t * dim,
        &mut lse[..ll],
        a.heads * t,
        |b, out_b, lse_b| {
            let qkv_b = &qkv[b * t * 3 * dim..(b + 1) * t * 3 * dim];
            with_slot(|slot| forward_image(qkv_b, out_b, lse_b, a, &mut slot[..scratch_len]))
        },
    );
    Ok(())
}

/// One image: `qkv` `[T, 3 D]`, `out` `[T, D]`, `lse` `[H, T]`; `scratch` holds a block of scores.
fn forward_image(
    qkv: &[f32],
    out: &mut [f32],
    lse: &mut [f32],
    a: &Attention,
    scratch: &mut [f32],
) {
    let (t, dim) = (a.tokens, a.dim());
    for h in 0..a.heads {
        let head = HeadCols::new(a, h);
        let k_t = transpose(head.k(qkv, 0..t));
        let v = head.v(qkv, 0..t);
        for rows in query_blocks(t) {
            let (i0, m) = (rows.start, rows.len());
            let p = &mut scratch[..m * t];
            product(1.0, head.q(qkv, rows), k_t, 0.0, p, t);
            let lse = &mut lse[h * t + i0..h * t + i0 + m];
            wide(
                #[inline(always)]
                || softmax_rows(p, lse, t, a.scale),
            );
            product(
                1.0,
                dense(p, m, t),
                v,
                0.0,
                &mut out[i0 * dim + head.q..],
                dim,
            );
        }
    }
}

/// Each row of `p` (rows of `t` scores) becomes `softmax(scale * row)`, bitwise what
/// `softmax_forward` computes for it, and the matching element of `lse` the row's
/// `log(sum(exp(scale * row)))`.
///
/// This and the row helpers below run inside [`wide`] through `#[inline(always)]` closures: a
/// closure that LLVM leaves out of line is compiled without AVX2, and it did leave these out
/// (SSE2 code, which made the fused attention slower than the composed ops).
#[inline(always)]
fn softmax_rows(p: &mut [f32], lse: &mut [f32], t: usize, scale: f32) {
    let rows = lse.len();
    for (row, l) in p.chunks_exact_mut(t).zip(lse.iter_mut()) {
        let max = scaled_max(row, scale);
        for x in row.iter_mut() {
            *x = scale * *x - max;
        }
        // The row maximum, until its log-sum-exp replaces it below.
        *l = max;
    }
    exp_normalize_rows(&mut p[..rows * t], t, |r, total| {
        // `total` is at least 1, so the log is finite and non-negative.
        lse[r] = (lse[r] as f64 + libm::log(total)) as f32;
    });
}

// ---- backward -----------------------------------------------------------------------------------

/// Overwrites `d_qkv` with the gradients of q, k and v given `d_out`, recomputing the
/// probabilities from `lse`. (`out` is not needed: the softmax backward's row sum is taken over
/// the recomputed `P` and `dP`, as the composed path does.)
pub(crate) fn backward(
    qkv: &[f32],
    lse: &[f32],
    d_out: &[f32],
    d_qkv: &mut [f32],
    a: &Attention,
) -> BResult<()> {
    let (lq, lo, ll) = a.lens();
    let (t, dim) = (a.tokens, a.dim());
    if lq == 0 {
        return Ok(()); // d_qkv has no elements
    }
    let scratch_len = 2 * block_rows(t) * t;
    reserve_slots(scratch_len)?;
    let (qkv, lse, d_out) = (&qkv[..lq], &lse[..ll], &d_out[..lo]);
    pool::chunks1(&mut d_qkv[..lq], t * 3 * dim, |b, d_qkv_b| {
        let qkv_b = &qkv[b * t * 3 * dim..(b + 1) * t * 3 * dim];
        let d_out_b = &d_out[b * t * dim..(b + 1) * t * dim];
        let lse_b = &lse[b * a.heads * t..(b + 1) * a.heads * t];
        with_slot(|slot| {
            backward_image(qkv_b, lse_b, d_out_b, d_qkv_b, a, &mut slot[..scratch_len])
        })
    });
    Ok(())
}

/// One image: `qkv`, `d_qkv` `[T, 3 D]`, `d_out` `[T, D]`, `lse` `[H, T]`; `scratch` holds two
/// blocks of scores.
fn backward_image(
    qkv: &[f32],
    lse: &[f32],
    d_out: &[f32],
    d_qkv: &mut [f32],
    a: &Attention,
    scratch: &mut [f32],
) {
    let (t, dim) = (a.tokens, a.dim());
    let width = 3 * dim;
    for h in 0..a.heads {
        let head = HeadCols::new(a, h);
        let k = head.k(qkv, 0..t);
        let (k_t, v_t) = (transpose(k), transpose(head.v(qkv, 0..t)));
        for (n, rows) in query_blocks(t).enumerate() {
            let (i0, m) = (rows.start, rows.len());
            let (p, ds) = scratch[..2 * m * t].split_at_mut(m * t);
            let q = head.q(qkv, rows.clone());
            let d_o = cols(d_out, dim, head.q, rows, a.head_dim);
            product(1.0, q, k_t, 0.0, p, t);
            let lse = &lse[h * t + i0..h * t + i0 + m];
            wide(
                #[inline(always)]
                || probabilities(p, lse, t, a.scale),
            );
            product(1.0, d_o, v_t, 0.0, ds, t);
            // dK and dV sum over every query row: the first block overwrites, later ones add.
            let beta = if n == 0 { 0.0 } else { 1.0 };
            product(
                1.0,
                transpose(dense(p, m, t)),
                d_o,
                beta,
                &mut d_qkv[head.v..],
                width,
            );
            wide(
                #[inline(always)]
                || softmax_backward_rows(p, ds, t, a.scale),
            );
            let ds = dense(ds, m, t);
            product(1.0, ds, k, 0.0, &mut d_qkv[i0 * width + head.q..], width);
            product(1.0, transpose(ds), q, beta, &mut d_qkv[head.k..], width);
        }
    }
}

/// Each row of `p` becomes `exp(scale * row - lse)`: the forward's probabilities again, from
/// its log-sum-exp.
#[inline(always)]
fn probabilities(p: &mut [f32], lse: &[f32], t: usize, scale: f32) {
    for (row, &l) in p.chunks_exact_mut(t).zip(lse) {
        for x in row.iter_mut() {
            // Mathematically <= 0; the rounding of `lse` to f32 can leave a hair above 0 for the
            // row's largest score, where `exp` is 1 to within that rounding anyway.
            *x = (scale * *x - l).min(0.0);
        }
    }
    // One pass over the block: per row, the last partial group of eight would take the padded
    // path each time.
    exp_in_place(&mut p[..lse.len() * t]);
}

/// Each row of `dp` becomes `scale * p * (dp - sum(dp * p))`, bitwise what `softmax_backward`
/// adds to a zeroed row.
#[inline(always)]
fn softmax_backward_rows(p: &[f32], dp: &mut [f32], t: usize, scale: f32) {
    for (p, dp) in p.chunks_exact(t).zip(dp.chunks_exact_mut(t)) {
        let dot = fold2(dp, p, |d, p| d as f64 * p as f64) as f32;
        for (d, &p) in dp.iter_mut().zip(p) {
            *d = scale * p * (*d - dot);
        }
    }
}

// ---- views --------------------------------------------------------------------------------------

/// The first column of head `h`'s q, k and v in a row of the qkv layout (`[T, 3 D]`, q | k | v,
/// each head-major); `q` is also the head's first column in `out` and `d_out` (`[T, D]`).
#[derive(Clone, Copy)]
struct HeadCols {
    q: usize,
    k: usize,
    v: usize,
    hd: usize,
    width: usize,
}

impl HeadCols {
    fn new(a: &Attention, h: usize) -> Self {
        let (dim, hd) = (a.dim(), a.head_dim);
        HeadCols {
            q: h * hd,
            k: dim + h * hd,
            v: 2 * dim + h * hd,
            hd,
            width: 3 * dim,
        }
    }

    /// The head's q for the token rows `rows`, `rows.len() x hd`.
    fn q<'a>(&self, qkv: &'a [f32], rows: Range<usize>) -> MatRef<'a> {
        cols(qkv, self.width, self.q, rows, self.hd)
    }

    /// The head's k, like [`HeadCols::q`].
    fn k<'a>(&self, qkv: &'a [f32], rows: Range<usize>) -> MatRef<'a> {
        cols(qkv, self.width, self.k, rows, self.hd)
    }

    /// The head's v, like [`HeadCols::q`].
    fn v<'a>(&self, qkv: &'a [f32], rows: Range<usize>) -> MatRef<'a> {
        cols(qkv, self.width, self.v, rows, self.hd)
    }
}

/// Columns `col .. col + n` of the rows `rows` of a row-major matrix `width` columns wide.
fn cols(m: &[f32], width: usize, col: usize, rows: Range<usize>, n: usize) -> MatRef<'_> {
    MatRef {
        data: &m[rows.start * width + col..],
        rows: rows.len(),
        cols: n,
        row_stride: width,
        col_stride: 1,
    }
}

/// A contiguous row-major `rows x cols` matrix.
fn dense(m: &[f32], rows: usize, cols: usize) -> MatRef<'_> {
    MatRef {
        data: m,
        rows,
        cols,
        row_stride: cols,
        col_stride: 1,
    }
}

/// The same elements read transposed: only the strides swap.
fn transpose(m: MatRef<'_>) -> MatRef<'_> {
    MatRef {
        rows: m.cols,
        cols: m.rows,
        row_stride: m.col_stride,
        col_stride: m.row_stride,
        ..m
    }
}

/// The query blocks of `tokens` rows: as few as [`BLOCK_FLOATS`] allows, of equal height (to
/// within one row), so no block is a sliver.
fn query_blocks(tokens: usize) -> impl Iterator<Item = Range<usize>> {
    let most = (BLOCK_FLOATS / tokens.max(1)).max(MIN_BLOCK_ROWS);
    let blocks = tokens.div_ceil(most);
    (0..blocks).map(move |b| b * tokens / blocks..(b + 1) * tokens / blocks)
}

/// The tallest block [`query_blocks`] makes.
fn block_rows(tokens: usize) -> usize {
    query_blocks(tokens).map(|r| r.len()).max().unwrap_or(0)
}

// ---- scratch ------------------------------------------------------------------------------------

/// One score scratch per pool thread: a call runs at most [`pool::threads`] tasks at once.
static SLOTS: OnceLock<Box<[Mutex<Vec<f32>>]>> = OnceLock::new();

fn slots() -> &'static [Mutex<Vec<f32>>] {
    SLOTS.get_or_init(|| {
        (0..pool::threads())
            .map(|_| Mutex::new(Vec::new()))
            .collect()
    })
}

fn lock(m: &Mutex<Vec<f32>>) -> MutexGuard<'_, Vec<f32>> {
    // A poisoned slot only means a task panicked; the buffer is scratch, overwritten before use.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Grows every slot to at least `len` floats, or reports the allocation failure.
fn reserve_slots(len: usize) -> BResult<()> {
    for slot in slots() {
        let mut v = lock(slot);
        if v.len() < len {
            let more = len - v.len();
            v.try_reserve_exact(more).map_err(|e| {
                BackendError::new(
                    BackendErrorKind::OutOfMemory {
                        bytes: len.saturating_mul(size_of::<f32>()),
                    },
                    format!("attention scratch of {len} floats: {e}"),
                )
            })?;
            v.resize(len, 0.0);
        }
    }
    Ok(())
}

/// Runs `f` on a free slot. There is one per pool thread, so a task finds one free unless a
/// second thread drives the backend at the same time; it then waits for the first slot, whose
/// holder only finishes its own task. Slots never shrink, and [`reserve_slots`] grew them all
/// for this call before its tasks started.
fn with_slot<R>(f: impl FnOnce(&mut [f32]) -> R) -> R {
    let slots = slots();
    let free = slots.iter().find_map(|s| match s.try_lock() {
        Ok(g) => Some(g),
        Err(TryLockError::Poisoned(e)) => Some(e.into_inner()),
        Err(TryLockError::WouldBlock) => None,
    });
    let mut slot = free.unwrap_or_else(|| lock(&slots[0]));
    f(&mut slot)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::*;
    use crate::CpuBuf;
    use mae::backend::{Backend, Gemm};

    fn dims(batch: usize, heads: usize, tokens: usize, head_dim: usize) -> Attention {
        Attention {
            batch,
            tokens,
            heads,
            head_dim,
            scale: 1.0 / (head_dim as f32).sqrt(),
        }
    }

    /// Deterministic values in about [-2, 2), varied enough that the softmax rows are far from
    /// uniform.
    fn values(seed: usize, len: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (((i * 7919 + seed * 104_729) % 4001) as f32 - 2000.0) / 1000.0)
            .collect()
    }

    /// The composed path exactly as `mae::model::attention` runs it, with its buffers.
    struct Composed {
        a: Attention,
        /// q, k, v, heads_out, out, d_heads_out, d_q, d_k, d_v `[N, H, T, hd]` or `[N T, D]`.
        small: [CpuBuf; 9],
        /// scores, att, d_att `[N, H, T, T]`.
        scores: [CpuBuf; 3],
        d_qkv: CpuBuf,
    }

    impl Composed {
        fn new(a: &Attention) -> Self {
            let (lq, lo, _) = a.lens();
            let ls = a.batch * a.heads * a.tokens * a.tokens;
            Composed {
                a: *a,
                small: std::array::from_fn(|_| up(&vec![0.0; lo])),
                scores: std::array::from_fn(|_| up(&vec![0.0; ls])),
                d_qkv: up(&vec![0.0; lq]),
            }
        }

        /// `(out, d_qkv)`.
        fn run(&mut self, qkv: &CpuBuf, d_out: &CpuBuf) -> (&[f32], &[f32]) {
            let (be, a) = (be(), &self.a);
            let (n, t, hd, dim) = (a.batch * a.heads, a.tokens, a.head_dim, a.dim());
            let view = |row_width, col_offset| a.heads(row_width, col_offset);
            let per_head = |m, nn, k| Gemm::new(m, nn, k).batched(n, m * k, k * nn, m * nn);
            let [q, k, v, heads_out, out, d_heads_out, d_q, d_k, d_v] = &mut self.small;
            let [scores, att, d_att] = &mut self.scores;
            let d_qkv = &mut self.d_qkv;
            be.split_heads(qkv, q, &view(3 * dim, 0)).unwrap();
            be.split_heads(qkv, k, &view(3 * dim, dim)).unwrap();
            be.split_heads(qkv, v, &view(3 * dim, 2 * dim)).unwrap();
            be.gemm(&per_head(t, t, hd).trans_b(), q, k, scores)
                .unwrap();
            be.softmax_forward(scores, att, n * t, t, a.scale).unwrap();
            be.gemm(&per_head(t, hd, t), att, v, heads_out).unwrap();
            be.merge_heads(heads_out, out, &view(dim, 0)).unwrap();

            be.split_heads(d_out, d_heads_out, &view(dim, 0)).unwrap();
            be.gemm(&per_head(t, t, hd).trans_b(), d_heads_out, v, d_att)
                .unwrap();
            be.gemm(&per_head(t, hd, t).trans_a(), att, d_heads_out, d_v)
                .unwrap();
            // `scores` now holds d(scores).
            be.fill(scores, 0.0).unwrap();
            be.softmax_backward(att, d_att, scores, n * t, t, a.scale)
                .unwrap();
            be.gemm(&per_head(t, hd, t), scores, k, d_q).unwrap();
            be.gemm(&per_head(t, hd, t).trans_a(), scores, q, d_k)
                .unwrap();
            be.merge_heads(d_q, d_qkv, &view(3 * dim, 0)).unwrap();
            be.merge_heads(d_k, d_qkv, &view(3 * dim, dim)).unwrap();
            be.merge_heads(d_v, d_qkv, &view(3 * dim, 2 * dim)).unwrap();
            (out, d_qkv)
        }
    }

    /// `log(sum_j exp(scale q_i . k_j))` per (image, head, row), in f64 from the definition.
    fn lse_oracle(qkv: &[f32], a: &Attention) -> Vec<f32> {
        let (t, hd, dim) = (a.tokens, a.head_dim, a.dim());
        let at = |b: usize, i: usize, col: usize| qkv[(b * t + i) * 3 * dim + col] as f64;
        let mut lse = Vec::new();
        for b in 0..a.batch {
            for h in 0..a.heads {
                for i in 0..t {
                    let s: Vec<f64> = (0..t)
                        .map(|j| {
                            let dot: f64 = (0..hd)
                                .map(|c| at(b, i, h * hd + c) * at(b, j, dim + h * hd + c))
                                .sum();
                            a.scale as f64 * dot
                        })
                        .collect();
                    let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let total: f64 = s.iter().map(|x| (x - max).exp()).sum();
                    lse.push((max + total.ln()) as f32);
                }
            }
        }
        lse
    }

    fn fused(qkv: &[f32], d_out: &[f32], a: &Attention) -> (CpuBuf, CpuBuf, CpuBuf) {
        let be = be();
        let (lq, lo, ll) = a.lens();
        let qkv = up(qkv);
        let (mut out, mut lse) = (up(&vec![f32::NAN; lo]), up(&vec![f32::NAN; ll]));
        be.attention_forward(&qkv, &mut out, &mut lse, a).unwrap();
        let mut d_qkv = up(&vec![f32::NAN; lq]);
        be.attention_backward(&qkv, &out, &lse, &up(d_out), &mut d_qkv, a)
            .unwrap();
        (out, lse, d_qkv)
    }

    /// Shapes with one query block (`T` = 17, 50, 64), two (197) and three (301, not a multiple
    /// of the block), the two head widths of MAE and narrow heads, and several images and heads so
    /// tasks run in parallel.
    const SHAPES: [(usize, usize, usize, usize); 7] = [
        (3, 2, 50, 8),
        (2, 2, 50, 64),
        (2, 3, 17, 64),
        (1, 3, 17, 8),
        (1, 2, 64, 32),
        (2, 2, 197, 64),
        (2, 1, 301, 8),
    ];

    #[test]
    fn fused_equals_the_composed_ops() {
        for (i, &(batch, heads, tokens, head_dim)) in SHAPES.iter().enumerate() {
            let a = dims(batch, heads, tokens, head_dim);
            let (lq, lo, _) = a.lens();
            let (qkv, d_out) = (values(2 * i, lq), values(2 * i + 1, lo));
            let (out, lse, d_qkv) = fused(&qkv, &d_out, &a);
            let mut composed = Composed::new(&a);
            let (want_out, want_d_qkv) = composed.run(&up(&qkv), &up(&d_out));
            // Both sides round to f32 along sums of `tokens` and `head_dim` terms in different
            // orders (block products, lse-recomputed probabilities), so allow that many epsilons.
            let tol = (tokens + head_dim) as f64 * f32::EPSILON as f64;
            eprintln!("{a:?}");
            assert_close(&out, want_out, tol);
            assert_close(&lse, &lse_oracle(&qkv, &a), tol);
            assert_close(&d_qkv, want_d_qkv, tol);
        }
    }

    #[test]
    fn results_are_bitwise_those_of_one_image_at_a_time() {
        // The ops run one pool task per image on however many threads the pool has; running
        // the same per-image functions in order on this thread, with a fresh scratch full of
        // NaN, is what a single thread does. Equal bits mean neither the thread count, nor the
        // scheduling, nor the scratch's previous contents matter.
        let a = dims(3, 2, 301, 8);
        let (lq, lo, ll) = a.lens();
        let (qkv, d_out) = (values(7, lq), values(8, lo));
        let (out, lse, d_qkv) = fused(&qkv, &d_out, &a);
        let (t, dim) = (a.tokens, a.dim());
        let mut scratch = vec![f32::NAN; 2 * block_rows(t) * t];
        let (mut out1, mut lse1, mut d_qkv1) = (vec![0.0; lo], vec![0.0; ll], vec![0.0; lq]);
        for b in 0..a.batch {
            let (rows, rows3, heads) = (b * t * dim.., b * t * 3 * dim.., b * a.heads * t..);
            forward_image(
                &qkv[rows3.clone()],
                &mut out1[rows.clone()],
                &mut lse1[heads.clone()],
                &a,
                &mut scratch,
            );
            backward_image(
                &qkv[rows3.clone()],
                &lse[heads],
                &d_out[rows],
                &mut d_qkv1[rows3],
                &a,
                &mut scratch,
            );
        }
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&out), bits(&out1));
        assert_eq!(bits(&lse), bits(&lse1));
        assert_eq!(bits(&d_qkv), bits(&d_qkv1));
    }

    #[test]
    fn query_blocks_cover_the_rows_in_order_within_the_block_limit() {
        for tokens in [0, 1, 5, 63, 64, 65, 128, 129, 197, 1000] {
            let blocks: Vec<_> = query_blocks(tokens).collect();
            let rows: Vec<usize> = blocks.iter().flat_map(|r| r.clone()).collect();
            assert_eq!(rows, (0..tokens).collect::<Vec<_>>(), "tokens {tokens}");
            for r in &blocks {
                assert!(!r.is_empty() && r.len() <= block_rows(tokens), "{blocks:?}");
            }
            let rows = block_rows(tokens);
            assert!(
                rows * tokens <= BLOCK_FLOATS || rows <= MIN_BLOCK_ROWS,
                "{blocks:?}"
            );
        }
        // What the shapes of `fused_equals_the_composed_ops` rely on.
        let count = |tokens| query_blocks(tokens).count();
        assert_eq!((count(64), count(197), count(301)), (1, 2, 3));
    }

    /// Single-threaded GFLOP/s of the forward and the backward (model FLOPs: `4 T^2 hd` per
    /// head forward, twice that backward) on the attention shapes of the three benchmark cases,
    /// best of five batches, wall time (run it on an idle machine):
    /// `cargo test --release -p mae-backend-cpu --lib -- --ignored --nocapture attention_speed`.
    #[test]
    #[ignore]
    fn attention_speed() {
        // (tokens, head_dim, heads, label)
        for (t, hd, heads, label) in [
            (17, 64, 6, "small64 encoder, training"),
            (65, 32, 8, "small64 decoder"),
            (65, 64, 6, "small64 embedding"),
            (65, 64, 3, "tiny32 embedding"),
            (50, 64, 12, "base224 encoder, training"),
            (197, 32, 16, "base224 decoder"),
            (197, 64, 12, "base224 embedding"),
        ] {
            let a = dims(1, heads, t, hd);
            let (lq, lo, ll) = a.lens();
            let (qkv, d_out) = (values(1, lq), values(2, lo));
            let (mut out, mut lse, mut d_qkv) = (vec![0.0; lo], vec![0.0; ll], vec![0.0; lq]);
            let mut scratch = vec![0.0; 2 * block_rows(t) * t];
            let flops = (4 * t * t * hd * heads) as f64;
            let reps = (2e8 / flops).ceil() as usize;
            let rate = |f: &mut dyn FnMut()| {
                (0..5)
                    .map(|_| {
                        let start = std::time::Instant::now();
                        for _ in 0..reps {
                            f();
                        }
                        reps as f64 / start.elapsed().as_secs_f64() / 1e9
                    })
                    .fold(0.0, f64::max)
            };
            let fwd =
                flops * rate(&mut || forward_image(&qkv, &mut out, &mut lse, &a, &mut scratch));
            let bwd = 2.0
                * flops
                * rate(&mut || backward_image(&qkv, &lse, &d_out, &mut d_qkv, &a, &mut scratch));
            println!("T {t:3} hd {hd:2} ({label}): forward {fwd:5.1}, backward {bwd:5.1} GFLOP/s");
        }
    }

    #[test]
    fn one_token_attends_to_itself() {
        // A single key: probability 1, out = v, lse = the scaled score, no gradient reaches q
        // or k, and v gets d_out.
        let a = dims(1, 1, 1, 2);
        let qkv = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let (out, lse, d_qkv) = fused(&qkv, &[0.5, -1.0], &a);
        assert_eq!(out, [5.0, 6.0]);
        assert_close(&lse, &[(11.0 * a.scale as f64) as f32], 1e-7);
        assert_eq!(d_qkv, [0.0, 0.0, 0.0, 0.0, 0.5, -1.0]);
    }
}
