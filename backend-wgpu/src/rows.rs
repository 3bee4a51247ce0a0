//! Row movement: row maps, gathers, patchify, attention heads (`shaders/rows.wgsl`).

use crate::columns::{sum_columns, RowView};
use crate::kernel::{grid_1d, word, Kernel};
use crate::{Buf, Idx, WgpuBackend};
use mae::backend::{BResult, Gather, Heads, PatchOrder, Patchify, RowMap};

fn map_params(map: &RowMap, extra: usize) -> BResult<[u32; 9]> {
    Ok([
        word(map.batch)?,
        word(map.count)?,
        word(map.cols)?,
        word(map.src_stride)?,
        word(map.src_start)?,
        word(map.src_step)?,
        word(map.dst_stride)?,
        word(map.dst_start)?,
        word(extra)?,
    ])
}

pub(crate) fn copy_rows(
    be: &WgpuBackend,
    src: &Buf,
    dst: &mut Buf,
    map: &RowMap,
    accumulate: bool,
) -> BResult<()> {
    let threads = map.batch * map.count * map.cols;
    word(threads)?;
    let params = map_params(map, usize::from(accumulate))?;
    be.launch(
        Kernel::CopyRows,
        &params,
        &[&src.raw, &dst.raw],
        grid_1d(threads),
    )
}

/// A map that broadcasts one source row to all its destination rows (a bias: `src_step` 0,
/// and one batch item or all items reading the same row) is a column sum, in two passes
/// (`columns.rs`); any other map takes one invocation per element of the source rows it reads
/// (`lens().0` floats), each summing the few destination elements its element was copied to.
pub(crate) fn copy_rows_backward(
    be: &WgpuBackend,
    d_dst: &Buf,
    d_src: &mut Buf,
    map: &RowMap,
) -> BResult<()> {
    if map.cols == 0 {
        return Ok(());
    }
    if map.src_step == 0 && (map.src_stride == 0 || map.batch == 1) {
        let view = RowView {
            rows: map.batch * map.count,
            cols: map.cols,
            count: map.count,
            stride: map.dst_stride,
            start: map.dst_start,
        };
        return sum_columns(be, d_dst, view, d_src, map.src_start * map.cols);
    }
    let (src_len, _) = map.lens();
    word(src_len)?;
    let params = map_params(map, src_len / map.cols)?;
    be.launch(
        Kernel::CopyRowsBackward,
        &params,
        &[&d_dst.raw, &d_src.raw],
        grid_1d(src_len),
    )
}

fn gather_params(g: &Gather) -> BResult<[u32; 8]> {
    word(g.batch * g.count * g.cols)?;
    word(g.lens().0)?;
    Ok([
        word(g.batch)?,
        word(g.count)?,
        word(g.cols)?,
        word(g.src_rows)?,
        word(g.src_stride)?,
        word(g.src_start)?,
        word(g.dst_rows)?,
        word(g.dst_start)?,
    ])
}

pub(crate) fn gather_rows(
    be: &WgpuBackend,
    src: &Buf,
    idx: &Idx,
    dst: &mut Buf,
    g: &Gather,
) -> BResult<()> {
    be.launch(
        Kernel::GatherRows,
        &gather_params(g)?,
        &[&src.raw, &idx.raw, &dst.raw],
        grid_1d(g.batch * g.count * g.cols),
    )
}

pub(crate) fn gather_rows_backward(
    be: &WgpuBackend,
    d_dst: &Buf,
    idx: &Idx,
    d_src: &mut Buf,
    g: &Gather,
) -> BResult<()> {
    g.check_backward()?;
    be.launch(
        Kernel::GatherRowsBackward,
        &gather_params(g)?,
        &[&d_dst.raw, &idx.raw, &d_src.raw],
        grid_1d(g.batch * g.count * g.cols),
    )
}

/// One invocation per value of the whole patches (pixels past the last whole patch are
/// ignored, as the stride-`p` convolution ignores them).
pub(crate) fn patchify(be: &WgpuBackend, imgs: &Buf, out: &mut Buf, p: &Patchify) -> BResult<()> {
    if p.patch == 0 {
        return Ok(());
    }
    let total = p.batch * p.num_patches() * p.patch * p.patch * p.channels;
    let params = [
        word(total)?,
        word(p.channels)?,
        word(p.height)?,
        word(p.width)?,
        word(p.patch)?,
        u32::from(p.order == PatchOrder::Hwc),
    ];
    be.launch(
        Kernel::Patchify,
        &params,
        &[&imgs.raw, &out.raw],
        grid_1d(total),
    )
}

fn head_params(h: &Heads) -> BResult<[u32; 6]> {
    word(h.lens().0.max(h.lens().1))?;
    Ok([
        word(h.batch)?,
        word(h.tokens)?,
        word(h.heads)?,
        word(h.head_dim)?,
        word(h.row_width)?,
        word(h.col_offset)?,
    ])
}

pub(crate) fn split_heads(be: &WgpuBackend, x: &Buf, heads: &mut Buf, h: &Heads) -> BResult<()> {
    be.launch(
        Kernel::SplitHeads,
        &head_params(h)?,
        &[&x.raw, &heads.raw],
        grid_1d(h.lens().1),
    )
}

pub(crate) fn merge_heads(be: &WgpuBackend, heads: &Buf, x: &mut Buf, h: &Heads) -> BResult<()> {
    be.launch(
        Kernel::MergeHeads,
        &head_params(h)?,
        &[&heads.raw, &x.raw],
        grid_1d(h.lens().1),
    )
}
