//! Column sums in two passes (`shaders/columns.wgsl`): the bias gradients of
//! `copy_rows_backward` and the LayerNorm parameter gradients. Pass 1 sums chunks of
//! [`CHUNK`] rows per column into partials, pass 2 adds each column's partials in order: a
//! wide grid instead of one invocation per column walking every row.

use crate::kernel::{grid_1d, word, Kernel};
use crate::{buffer, Buf, WgpuBackend};
use mae::backend::BResult;

/// Rows per partial sum (`CHUNK` in `columns.wgsl`).
pub(crate) const CHUNK: usize = 64;

/// The rows a column sum reads: row `t` of the view (`t < rows`) is matrix row
/// `(t / count) * stride + start + t % count` of a matrix `cols` wide.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RowView {
    pub rows: usize,
    pub cols: usize,
    pub count: usize,
    pub stride: usize,
    pub start: usize,
}

impl RowView {
    /// Rows `0 .. rows` of a `[rows, cols]` matrix.
    pub(crate) fn all(rows: usize, cols: usize) -> RowView {
        RowView {
            rows,
            cols,
            count: rows.max(1),
            stride: 0,
            start: 0,
        }
    }

    fn chunks(&self) -> usize {
        self.rows.div_ceil(CHUNK)
    }

    /// The uniform block, with pass 2's offsets into the partials and the accumulator.
    fn params(&self, partial_at: usize, acc_at: usize) -> BResult<[u32; 7]> {
        Ok([
            word(self.rows)?,
            word(self.cols)?,
            word(self.count)?,
            word(self.stride)?,
            word(self.start)?,
            word(partial_at)?,
            word(acc_at)?,
        ])
    }
}

/// `acc[acc_at + c] += sum over the view's rows of src[row * cols + c]`.
pub(crate) fn sum_columns(
    be: &WgpuBackend,
    src: &Buf,
    view: RowView,
    acc: &mut Buf,
    acc_at: usize,
) -> BResult<()> {
    if view.rows == 0 || view.cols == 0 {
        return Ok(());
    }
    let n = view.chunks() * view.cols;
    let partials: Buf = buffer::alloc(&be.gpu, n)?;
    let params = view.params(0, acc_at)?;
    be.launch(
        Kernel::ColumnPartials,
        &params,
        &[&src.raw, &partials.raw],
        grid_1d(n),
    )?;
    be.launch(
        Kernel::ColumnSumFinish,
        &params,
        &[&partials.raw, &acc.raw],
        grid_1d(view.cols),
    )
}

/// `dgamma += sum_r dy * xhat`, `dbeta += sum_r dy` over the rows of `[rows, cols]`.
pub(crate) fn layernorm_params(
    be: &WgpuBackend,
    [dy, x, mean, rstd]: [&Buf; 4],
    dgamma: &mut Buf,
    dbeta: &mut Buf,
    rows: usize,
    cols: usize,
) -> BResult<()> {
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let view = RowView::all(rows, cols);
    let n = view.chunks() * cols;
    let partials: Buf = buffer::alloc(&be.gpu, 2 * n)?;
    be.launch(
        Kernel::LayerNormParamPartials,
        &view.params(0, 0)?,
        &[&dy.raw, &x.raw, &mean.raw, &rstd.raw, &partials.raw],
        grid_1d(n),
    )?;
    for (acc, partial_at) in [(dgamma, 0), (dbeta, n)] {
        be.launch(
            Kernel::ColumnSumFinish,
            &view.params(partial_at, 0)?,
            &[&partials.raw, &acc.raw],
            grid_1d(cols),
        )?;
    }
    Ok(())
}
