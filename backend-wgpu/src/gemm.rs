//! Strided-batched GEMM (`shaders/gemm.wgsl`).

use crate::kernel::{word, Kernel, MAX_GROUPS};
use crate::{Buf, WgpuBackend};
use mae::backend::{BResult, Gemm};

/// Rows and columns of C per workgroup: 8 x 8 invocations of 8 x 8 blocks.
const TILE: usize = 64;

pub(crate) fn gemm(be: &WgpuBackend, g: &Gemm, a: &Buf, b: &Buf, c: &mut Buf) -> BResult<()> {
    debug_assert!({
        let (la, lb, lc) = g.lens();
        a.len() >= la && b.len() >= lb && c.len() >= lc
    });
    if g.m == 0 || g.n == 0 || g.batch == 0 {
        return Ok(());
    }
    let kernel = Kernel::Gemm {
        trans_a: g.trans_a,
        trans_b: g.trans_b,
    };
    let grid = [word(g.n.div_ceil(TILE))?, word(g.m.div_ceil(TILE))?];
    // The batch is the grid's z dimension, in launches of at most MAX_GROUPS items.
    let mut first = 0;
    while first < g.batch {
        let items = (g.batch - first).min(MAX_GROUPS as usize);
        let params = [
            word(g.m)?,
            word(g.n)?,
            word(g.k)?,
            word(first)?,
            word(g.stride_a)?,
            word(g.stride_b)?,
            word(g.stride_c)?,
            g.alpha.to_bits(),
            g.beta.to_bits(),
        ];
        be.launch(
            kernel,
            &params,
            &[&a.raw, &b.raw, &c.raw],
            [grid[0], grid[1], items as u32],
        )?;
        first += items;
    }
    Ok(())
}
