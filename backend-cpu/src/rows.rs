//! Row movement: row maps (biases, tokens, position tables), index gathers (masking), patchify
//! and the attention-head views.
//!
//! Everything here moves whole contiguous runs (a row, a head slice, a patch row), so the inner
//! work is `copy_from_slice` or a short vectorizable add; indices are computed once per run.

use crate::pool::{chunks1, rows_per_chunk};
use crate::reduce::{col_block, COL_BLOCK};
use mae::backend::{Gather, Heads, PatchOrder, Patchify, RowMap};

/// `dst += src`, elementwise.
#[inline(always)]
pub(crate) fn add_into(dst: &mut [f32], src: &[f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d += s;
    }
}

pub(crate) fn copy_rows(src: &[f32], dst: &mut [f32], map: &RowMap, accumulate: bool) {
    let cols = map.cols;
    debug_assert!({
        let (ls, ld) = map.lens();
        src.len() >= ls && dst.len() >= ld
    });
    if map.batch == 0 || map.count == 0 || cols == 0 {
        return;
    }
    let one = |b: usize, i: usize, to: &mut [f32]| {
        let s = map.src_row(b, i) * cols;
        let from = &src[s..s + cols];
        if accumulate {
            add_into(to, from);
        } else {
            to.copy_from_slice(from);
        }
    };
    let stride = map.dst_stride;
    if map.dst_start + map.count <= stride {
        // Item b writes only inside rows [b * stride, (b + 1) * stride): items split over threads.
        let items = rows_per_chunk(stride * cols);
        let end = (map.batch * stride * cols).min(dst.len());
        chunks1(&mut dst[..end], items * stride * cols, |k, part| {
            for (ib, item) in part.chunks_mut(stride * cols).enumerate() {
                let b = k * items + ib;
                for i in 0..map.count {
                    let d = (map.dst_start + i) * cols;
                    one(b, i, &mut item[d..d + cols]);
                }
            }
        });
    } else {
        for b in 0..map.batch {
            for i in 0..map.count {
                let d = map.dst_row(b, i) * cols;
                one(b, i, &mut dst[d..d + cols]);
            }
        }
    }
}

/// Whether `(b, i)` is the first pair, in ascending `(b, i)` order, that reads its source row.
/// Only for `src_step` 0 or 1.
fn first_reader(map: &RowMap, b: usize, i: usize) -> bool {
    if map.src_step == 0 {
        // Row `b * stride + start` is read by every i of item b, and by every item when the
        // stride is 0.
        i == 0 && (b == 0 || map.src_stride > 0)
    } else {
        // Row s = b * stride + start + i; item b - 1 reads it at i + stride if that is < count.
        b == 0 || i + map.src_stride >= map.count
    }
}

/// Calls `f` with every destination row whose pair reads the same source row as `(b0, i0)`, the
/// first reader, in ascending `(b, i)` order. Only for `src_step` 0 or 1.
#[inline(always)]
fn for_each_reader(map: &RowMap, b0: usize, i0: usize, mut f: impl FnMut(usize)) {
    if map.src_step == 0 {
        let items = if map.src_stride == 0 {
            b0..map.batch
        } else {
            b0..b0 + 1
        };
        for b in items {
            for i in 0..map.count {
                f(map.dst_row(b, i));
            }
        }
    } else {
        // Row s = b * stride + start + i: each later item reads it `stride` tokens earlier.
        let mut i = i0;
        for b in b0..map.batch {
            f(map.dst_row(b, i));
            match i.checked_sub(map.src_stride) {
                Some(next) => i = next,
                None => break,
            }
        }
    }
}

/// Every source row gets the sum of the `d_dst` rows it was copied to. The sum runs over its
/// readers in ascending `(b, i)` in `f64` (see [`add_reader_sums`]), and is then added to `d_src`
/// with one rounding. This is the bias gradient (one source row, every destination row) as well
/// as the position-table and token gradients, so the long sums are the common case.
pub(crate) fn copy_rows_backward(d_dst: &[f32], d_src: &mut [f32], map: &RowMap) {
    let cols = map.cols;
    debug_assert!({
        let (ls, ld) = map.lens();
        d_src.len() >= ls && d_dst.len() >= ld
    });
    if map.src_step > 1 {
        // Not a map mae builds (the contract says 0 or 1). Still correct: one pair at a time, in
        // ascending order, accumulating in f32.
        for b in 0..map.batch {
            for i in 0..map.count {
                let (s, d) = (map.src_row(b, i) * cols, map.dst_row(b, i) * cols);
                add_into(&mut d_src[s..s + cols], &d_dst[d..d + cols]);
            }
        }
        return;
    }
    if map.batch == 0 || map.count == 0 || cols == 0 {
        return;
    }
    if map.src_step == 0 && (map.src_stride == 0 || map.batch == 1) {
        // One source row (a bias, a shared token): its column blocks split over threads.
        let s = map.src_row(0, 0) * cols;
        let w = col_block(cols);
        chunks1(&mut d_src[s..s + cols], w, |k, out| {
            add_reader_sums(d_dst, map, (0, 0), k * w, out)
        });
        return;
    }
    if map.src_step == 1 && map.src_stride == 0 {
        // A shared table: rows src_start + i, first read by item 0, split over threads.
        let s = map.src_start * cols;
        let rpc = rows_per_chunk(cols * map.batch);
        chunks1(
            &mut d_src[s..s + map.count * cols],
            rpc * cols,
            |k, part| {
                for (r, row) in part.chunks_exact_mut(cols).enumerate() {
                    add_reader_sums(d_dst, map, (0, k * rpc + r), 0, row);
                }
            },
        );
        return;
    }
    for b in 0..map.batch {
        for i in 0..map.count {
            if !first_reader(map, b, i) {
                continue;
            }
            let s = map.src_row(b, i) * cols;
            add_reader_sums(d_dst, map, (b, i), 0, &mut d_src[s..s + cols]);
        }
    }
}

/// `out[j] += ` the sum of column `c0 + j` over the `d_dst` rows that read source row
/// `(b, i)`'s, in reader order and in `f64`, with one rounding at the end. Columns go in blocks
/// of [`COL_BLOCK`] whose `f64` partials live on the stack, the loop compiled for AVX2 (as SSE2
/// code it ran at half the speed); each column's sum is the same whatever block it falls in.
/// Blocks of 32 columns, whose partials would stay in registers, were twice as slow: each pass
/// over the rows then reads only two cache lines of each.
fn add_reader_sums(
    d_dst: &[f32],
    map: &RowMap,
    reader: (usize, usize),
    c0: usize,
    out: &mut [f32],
) {
    let ((b, i), cols) = (reader, map.cols);
    crate::fastmath::wide(
        #[inline(always)]
        || {
            for (g, out) in out.chunks_mut(COL_BLOCK).enumerate() {
                let (c, w) = (c0 + g * COL_BLOCK, out.len());
                let mut acc = [0.0f64; COL_BLOCK];
                for_each_reader(map, b, i, |d| {
                    let row = &d_dst[d * cols + c..][..w];
                    acc.iter_mut().zip(row).for_each(|(a, &x)| *a += x as f64);
                });
                for (o, &a) in out.iter_mut().zip(&acc) {
                    *o = (*o as f64 + a) as f32;
                }
            }
        },
    );
}

/// Offsets (in floats) of the source and destination rows of pair `(b, j)`.
#[inline(always)]
fn gather_pair(g: &Gather, idx: &[u32], b: usize, j: usize) -> (usize, usize) {
    let k = idx[b * g.count + j] as usize;
    debug_assert!(
        k < g.src_rows,
        "gather index {k} >= src_rows {}",
        g.src_rows
    );
    (
        (b * g.src_stride + g.src_start + k) * g.cols,
        (b * g.dst_rows + g.dst_start + j) * g.cols,
    )
}

/// Items split over threads: item `b` writes only its own `dst_rows` rows.
pub(crate) fn gather_rows(src: &[f32], idx: &[u32], dst: &mut [f32], g: &Gather) {
    debug_assert!(g.dst_start + g.count <= g.dst_rows);
    let cols = g.cols;
    let per_item = g.dst_rows * cols;
    if per_item == 0 {
        return;
    }
    let items = rows_per_chunk(per_item);
    chunks1(
        &mut dst[..g.batch * per_item],
        items * per_item,
        |k, part| {
            for (ib, item) in part.chunks_exact_mut(per_item).enumerate() {
                let b = k * items + ib;
                for j in 0..g.count {
                    let (s, d) = gather_pair(g, idx, b, j);
                    let d = d - b * per_item;
                    item[d..d + cols].copy_from_slice(&src[s..s + cols]);
                }
            }
        },
    );
}

/// Indices of one item are distinct, so each `d_src` row receives at most one `d_dst` row per
/// call: a plain add, no reduction order to fix. Items split over threads: item `b` writes only
/// its own block of `src_stride` rows (the caller checked [`Gather::sources_apart`]).
pub(crate) fn gather_rows_backward(d_dst: &[f32], idx: &[u32], d_src: &mut [f32], g: &Gather) {
    debug_assert!(g.dst_start + g.count <= g.dst_rows && g.sources_apart());
    let cols = g.cols;
    let per_item = g.src_stride * cols;
    if per_item == 0 {
        return;
    }
    let items = rows_per_chunk(per_item);
    // The last item's block may end at its last source row, short of `src_stride` rows.
    chunks1(&mut d_src[..g.lens().0], items * per_item, |k, part| {
        for (ib, item) in part.chunks_mut(per_item).enumerate() {
            let b = k * items + ib;
            for j in 0..g.count {
                let (s, d) = gather_pair(g, idx, b, j);
                let s = s - b * per_item;
                add_into(&mut item[s..s + cols], &d_dst[d..d + cols]);
            }
        }
    });
}

/// Walks the image one pixel row at a time. For `Chw` each patch-wide run of a pixel row is one
/// contiguous run of the patch vector, so it is a `copy_from_slice`; for `Hwc` the channels
/// interleave, so the output is written in order and the `channels` planes are read in step.
/// Pixels beyond the last whole patch (height or width not a multiple of `patch`) are ignored, as
/// the stride-`p` Conv2d ignores them.
pub(crate) fn patchify(imgs: &[f32], out: &mut [f32], p: &Patchify) {
    let (ch, h, w, ps) = (p.channels, p.height, p.width, p.patch);
    if ps == 0 {
        return;
    }
    let (gh, gw) = (h / ps, w / ps);
    let num = gh * gw;
    let plen = ps * ps * ch;
    let plane = h * w;
    let per_item = num * plen;
    if per_item == 0 {
        return;
    }
    chunks1(&mut out[..p.batch * per_item], per_item, |b, out| {
        let img = &imgs[b * ch * plane..(b + 1) * ch * plane];
        for y in 0..gh * ps {
            let (gy, py) = (y / ps, y % ps);
            for gx in 0..gw {
                let patch = (gy * gw + gx) * plen;
                match p.order {
                    PatchOrder::Chw => {
                        for c in 0..ch {
                            let s = c * plane + y * w + gx * ps;
                            let d = patch + c * ps * ps + py * ps;
                            out[d..d + ps].copy_from_slice(&img[s..s + ps]);
                        }
                    }
                    PatchOrder::Hwc => {
                        let d = patch + py * ps * ch;
                        let run = &mut out[d..d + ps * ch];
                        for (px, pixel) in run.chunks_exact_mut(ch).enumerate() {
                            let s = y * w + gx * ps + px;
                            for (c, v) in pixel.iter_mut().enumerate() {
                                *v = img[c * plane + s];
                            }
                        }
                    }
                }
            }
        }
    });
}

/// Offsets of the token-matrix run and the per-head run of `(b, h, t)`, each `head_dim` long.
#[inline(always)]
fn head_pair(hd: &Heads, b: usize, h: usize, t: usize) -> (usize, usize) {
    (
        (b * hd.tokens + t) * hd.row_width + hd.col_offset + h * hd.head_dim,
        ((b * hd.heads + h) * hd.tokens + t) * hd.head_dim,
    )
}

/// Writes the per-head tensor in order; the reads stride through the token rows. Items split
/// over threads.
pub(crate) fn split_heads(x: &[f32], heads: &mut [f32], hd: &Heads) {
    debug_assert!(hd.col_offset + hd.heads * hd.head_dim <= hd.row_width);
    let n = hd.head_dim;
    let per_item = hd.heads * hd.tokens * n;
    if per_item == 0 {
        return;
    }
    chunks1(&mut heads[..hd.batch * per_item], per_item, |b, item| {
        for h in 0..hd.heads {
            for t in 0..hd.tokens {
                let (xo, ho) = head_pair(hd, b, h, t);
                let ho = ho - b * per_item;
                item[ho..ho + n].copy_from_slice(&x[xo..xo + n]);
            }
        }
    });
}

/// Writes each token row in order (all heads of a token are adjacent in `x`). Items split over
/// threads.
pub(crate) fn merge_heads(heads: &[f32], x: &mut [f32], hd: &Heads) {
    debug_assert!(hd.col_offset + hd.heads * hd.head_dim <= hd.row_width);
    let n = hd.head_dim;
    let per_item = hd.tokens * hd.row_width;
    if per_item == 0 || n == 0 {
        return;
    }
    // The last item's rows may end before its row width does; never cut past `x`.
    let end = (hd.batch * per_item).min(x.len());
    chunks1(&mut x[..end], per_item, |b, item| {
        for t in 0..hd.tokens {
            for h in 0..hd.heads {
                let (xo, ho) = head_pair(hd, b, h, t);
                let xo = xo - b * per_item;
                item[xo..xo + n].copy_from_slice(&heads[ho..ho + n]);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use crate::test_util::*;
    use mae::backend::{Backend, Gather, Heads, PatchOrder, Patchify, RowMap};

    fn map(batch: usize, count: usize, cols: usize) -> RowMap {
        RowMap {
            batch,
            count,
            cols,
            src_stride: 0,
            src_start: 0,
            src_step: 1,
            dst_stride: count,
            dst_start: 0,
        }
    }

    #[test]
    fn copy_rows_bias_overwrites_then_accumulates() {
        let be = be();
        let bias = up(&[1.0, 2.0]);
        let mut x = up(&[10.0, 20.0, 30.0, 40.0, 50.0, 60.0]);
        be.copy_rows(&bias, &mut x, &RowMap::bias(3, 2), true)
            .unwrap();
        assert_eq!(x, [11.0, 22.0, 31.0, 42.0, 51.0, 62.0]);
        be.copy_rows(&bias, &mut x, &RowMap::bias(3, 2), false)
            .unwrap();
        assert_eq!(x, [1.0, 2.0, 1.0, 2.0, 1.0, 2.0]);
    }

    #[test]
    fn copy_rows_shared_block_into_offset_rows() {
        // A 2-row table (src_step 1, shared over the batch) into rows 1..3 of each 3-row item,
        // starting from table row 1 of a 3-row table: row 0 of each item is left alone.
        let be = be();
        let table = up(&[0.0, 0.0, 1.0, 2.0, 3.0, 4.0]);
        let m = RowMap {
            src_start: 1,
            dst_stride: 3,
            dst_start: 1,
            ..map(2, 2, 2)
        };
        let mut x = up(&[9.0; 12]);
        be.copy_rows(&table, &mut x, &m, false).unwrap();
        assert_eq!(
            x,
            [9.0, 9.0, 1.0, 2.0, 3.0, 4.0, 9.0, 9.0, 1.0, 2.0, 3.0, 4.0]
        );
    }

    #[test]
    fn copy_rows_per_item_source() {
        // One source row per item (src_step 0, src_stride 1), like a per-image token.
        let be = be();
        let m = RowMap {
            src_stride: 1,
            src_step: 0,
            ..map(2, 2, 1)
        };
        let mut x = up(&[0.0; 4]);
        be.copy_rows(&up(&[5.0, 7.0]), &mut x, &m, true).unwrap();
        assert_eq!(x, [5.0, 5.0, 7.0, 7.0]);
    }

    #[test]
    fn copy_rows_backward_of_bias_sums_every_row() {
        let be = be();
        let dy = up(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let mut db = up(&[100.0, 200.0]);
        be.copy_rows_backward(&dy, &mut db, &RowMap::bias(3, 2))
            .unwrap();
        assert_eq!(db, [109.0, 212.0]);
        be.copy_rows_backward(&dy, &mut db, &RowMap::bias(3, 2))
            .unwrap();
        assert_eq!(db, [118.0, 224.0]);
    }

    #[test]
    fn copy_rows_backward_of_shared_table_sums_over_batch() {
        let be = be();
        let m = RowMap {
            src_start: 1,
            ..map(2, 2, 1)
        };
        let mut dt = up(&[0.5, 0.0, 0.0]);
        be.copy_rows_backward(&up(&[1.0, 2.0, 10.0, 20.0]), &mut dt, &m)
            .unwrap();
        assert_eq!(dt, [0.5, 11.0, 22.0]);
    }

    #[test]
    fn copy_rows_backward_of_wide_rows_crosses_column_blocks() {
        // 3 rows of 300 columns onto one bias row: column blocks of 256 + 44.
        let be = be();
        let cols = 300;
        let dy: Vec<f32> = (0..3 * cols).map(|i| (i % 7) as f32).collect();
        let mut db = up(&vec![1.0; cols]);
        be.copy_rows_backward(&up(&dy), &mut db, &RowMap::bias(3, cols))
            .unwrap();
        for c in 0..cols {
            assert_eq!(
                db[c],
                1.0 + dy[c] + dy[cols + c] + dy[2 * cols + c],
                "column {c}"
            );
        }
    }

    /// Every shape of map the contract allows, against a naive per-source-row sum.
    #[test]
    fn copy_rows_backward_matches_naive_for_all_map_shapes() {
        let be = be();
        let cols = 3;
        for step in [0, 1] {
            for stride in [0, 1, 2, 3, 5] {
                for (batch, count) in [(1, 1), (1, 3), (3, 1), (3, 3), (4, 2)] {
                    for start in [0, 2] {
                        let m = RowMap {
                            batch,
                            count,
                            cols,
                            src_stride: stride,
                            src_start: start,
                            src_step: step,
                            dst_stride: count + 1,
                            dst_start: 1,
                        };
                        let (ls, ld) = m.lens();
                        let d_dst: Vec<f32> = (0..ld).map(|i| (i * 3 % 17) as f32 - 4.0).collect();
                        let init: Vec<f32> = (0..ls).map(|i| i as f32 * 0.5).collect();
                        let mut expect: Vec<f64> = init.iter().map(|&x| x as f64).collect();
                        for b in 0..batch {
                            for i in 0..count {
                                for c in 0..cols {
                                    expect[m.src_row(b, i) * cols + c] +=
                                        d_dst[m.dst_row(b, i) * cols + c] as f64;
                                }
                            }
                        }
                        let mut got = up(&init);
                        be.copy_rows_backward(&up(&d_dst), &mut got, &m).unwrap();
                        let expect: Vec<f32> = expect.iter().map(|&x| x as f32).collect();
                        assert_eq!(got, expect, "{m:?}");
                    }
                }
            }
        }
    }

    fn gather_desc() -> Gather {
        // 2 items, 4 source rows each, keep 2, written after one leading row (a cls slot).
        Gather {
            batch: 2,
            count: 2,
            cols: 2,
            src_rows: 4,
            src_stride: 4,
            src_start: 0,
            dst_rows: 3,
            dst_start: 1,
        }
    }

    #[test]
    fn gather_rows_picks_indexed_rows_and_leaves_other_rows() {
        let be = be();
        let src: Vec<f32> = (0..16).map(|i| i as f32).collect();
        let idx = be.upload_idx(&[3, 0, 1, 2]).unwrap();
        let mut dst = up(&[-1.0; 12]);
        be.gather_rows(&up(&src), &idx, &mut dst, &gather_desc())
            .unwrap();
        assert_eq!(
            dst,
            [-1.0, -1.0, 6.0, 7.0, 0.0, 1.0, -1.0, -1.0, 10.0, 11.0, 12.0, 13.0]
        );
    }

    #[test]
    fn gather_rows_backward_accumulates_into_indexed_rows() {
        let be = be();
        let d_dst: Vec<f32> = (0..12).map(|i| i as f32).collect();
        let idx = be.upload_idx(&[3, 0, 1, 2]).unwrap();
        let mut d_src = up(&[1.0; 16]);
        for _ in 0..2 {
            be.gather_rows_backward(&up(&d_dst), &idx, &mut d_src, &gather_desc())
                .unwrap();
        }
        #[rustfmt::skip]
        let expect = [
            1.0 + 2.0 * 4.0, 1.0 + 2.0 * 5.0, 1.0, 1.0, 1.0, 1.0, 1.0 + 2.0 * 2.0, 1.0 + 2.0 * 3.0,
            1.0, 1.0, 1.0 + 2.0 * 8.0, 1.0 + 2.0 * 9.0, 1.0 + 2.0 * 10.0, 1.0 + 2.0 * 11.0, 1.0, 1.0,
        ];
        assert_eq!(d_src, expect);
    }

    fn patch_desc(order: PatchOrder) -> Patchify {
        Patchify {
            batch: 1,
            channels: 2,
            height: 2,
            width: 4,
            patch: 2,
            order,
        }
    }

    // Channel 0 holds 0..8, channel 1 holds 10..18, each a 2 x 4 image.
    const IMG: [f32; 16] = [
        0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, //
        10.0, 11.0, 12.0, 13.0, 14.0, 15.0, 16.0, 17.0,
    ];

    #[test]
    fn patchify_chw_by_hand() {
        let be = be();
        let mut out = up(&[0.0; 16]);
        be.patchify(&up(&IMG), &mut out, &patch_desc(PatchOrder::Chw))
            .unwrap();
        #[rustfmt::skip]
        let expect = [
            0.0, 1.0, 4.0, 5.0, 10.0, 11.0, 14.0, 15.0,
            2.0, 3.0, 6.0, 7.0, 12.0, 13.0, 16.0, 17.0,
        ];
        assert_eq!(out, expect);
    }

    #[test]
    fn patchify_hwc_by_hand() {
        let be = be();
        let mut out = up(&[0.0; 16]);
        be.patchify(&up(&IMG), &mut out, &patch_desc(PatchOrder::Hwc))
            .unwrap();
        #[rustfmt::skip]
        let expect = [
            0.0, 10.0, 1.0, 11.0, 4.0, 14.0, 5.0, 15.0,
            2.0, 12.0, 3.0, 13.0, 6.0, 16.0, 7.0, 17.0,
        ];
        assert_eq!(out, expect);
    }

    #[test]
    fn patchify_matches_naive_index_formula() {
        let be = be();
        let (n, c, h, w, p) = (2, 3, 6, 9, 3);
        let imgs: Vec<f32> = (0..n * c * h * w).map(|i| i as f32).collect();
        for order in [PatchOrder::Chw, PatchOrder::Hwc] {
            let desc = Patchify {
                batch: n,
                channels: c,
                height: h,
                width: w,
                patch: p,
                order,
            };
            let mut out = up(&vec![0.0; imgs.len()]);
            be.patchify(&up(&imgs), &mut out, &desc).unwrap();
            let l = (h / p) * (w / p);
            let mut expect = vec![0.0; imgs.len()];
            for b in 0..n {
                for ci in 0..c {
                    for y in 0..h {
                        for x in 0..w {
                            let patch = (y / p) * (w / p) + x / p;
                            let (py, px) = (y % p, x % p);
                            let within = match order {
                                PatchOrder::Chw => ci * p * p + py * p + px,
                                PatchOrder::Hwc => (py * p + px) * c + ci,
                            };
                            expect[(b * l + patch) * p * p * c + within] =
                                imgs[((b * c + ci) * h + y) * w + x];
                        }
                    }
                }
            }
            assert_eq!(out, expect, "{order:?}");
        }
    }

    fn heads_desc() -> Heads {
        // 1 item, 2 tokens, 2 heads of dim 2, inside rows of width 6 starting at column 1.
        Heads {
            batch: 1,
            tokens: 2,
            heads: 2,
            head_dim: 2,
            row_width: 6,
            col_offset: 1,
        }
    }

    #[test]
    fn split_heads_by_hand() {
        let be = be();
        let x: Vec<f32> = (0..12).map(|i| i as f32).collect();
        let mut heads = up(&[0.0; 8]);
        be.split_heads(&up(&x), &mut heads, &heads_desc()).unwrap();
        // heads[h, t, j] = x[t, 1 + 2h + j]
        assert_eq!(heads, [1.0, 2.0, 7.0, 8.0, 3.0, 4.0, 9.0, 10.0]);
    }

    #[test]
    fn merge_heads_inverts_split_and_keeps_other_columns() {
        let be = be();
        let heads = up(&[1.0, 2.0, 7.0, 8.0, 3.0, 4.0, 9.0, 10.0]);
        let mut x = up(&[-1.0; 12]);
        be.merge_heads(&heads, &mut x, &heads_desc()).unwrap();
        #[rustfmt::skip]
        let expect = [-1.0, 1.0, 2.0, 3.0, 4.0, -1.0, -1.0, 7.0, 8.0, 9.0, 10.0, -1.0];
        assert_eq!(x, expect);
    }

    #[test]
    fn split_then_merge_round_trips_a_batch() {
        let be = be();
        let h = Heads {
            batch: 2,
            tokens: 3,
            heads: 3,
            head_dim: 2,
            row_width: 18,
            col_offset: 6,
        };
        let x: Vec<f32> = (0..h.lens().0).map(|i| i as f32).collect();
        let mut heads = be.alloc(h.lens().1).unwrap();
        be.split_heads(&up(&x), &mut heads, &h).unwrap();
        let mut back = up(&x);
        be.fill(&mut back, 0.0).unwrap();
        be.merge_heads(&heads, &mut back, &h).unwrap();
        for (i, (&got, &want)) in back.iter().zip(&x).enumerate() {
            let col = i % 18;
            let expect = if (6..12).contains(&col) { want } else { 0.0 };
            assert_eq!(got, expect, "element {i}");
        }
    }
}
