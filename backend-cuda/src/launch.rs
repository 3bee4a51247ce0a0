//! Grid and block sizes, and the chunking of column sums. Pure arithmetic, tested without a GPU.
//!
//! Every kernel loops over its work with a grid stride (see `kernels/prelude.cuh`), so a grid is
//! only a choice of parallelism, never a correctness condition: grids are capped at
//! [`MAX_BLOCKS`] whatever the size of the work.

use cudarc::driver::LaunchConfig;

/// Threads per block, for every kernel. The row kernels depend on it: `BLOCK` in
/// `kernels/prelude.cuh` must be equal (a unit test reads the source to check).
pub(crate) const BLOCK: u32 = 256;

/// Threads per block of the attention kernels, one query (or key) row each: `ATT_THREADS` in
/// `kernels/attention.cu` must be equal (a unit test reads the source to check). Fewer than
/// [`BLOCK`] so that the encoder's 50 tokens leave few threads idle.
pub(crate) const ATTENTION_THREADS: u32 = 64;

/// The head widths the attention kernels hold in registers (`attention.cu` instantiates
/// 32 and 64 and takes the smallest that fits; wider heads take the composed ops).
pub(crate) const ATTENTION_MAX_HEAD_DIM: usize = 64;

/// Threads per block of the tensor-core attention kernels (`MMA_THREADS` in
/// `kernels/attention_mma.cu`, checked by a unit test): four warps of 16 rows each.
pub(crate) const ATTENTION_MMA_THREADS: u32 = 128;

/// Rows of one (image, head) per block of the tensor-core attention kernels (`MMA_ROWS`).
pub(crate) const ATTENTION_MMA_ROWS: u64 = 64;

/// Bits of the tensor-core attention kernels' `flags` (`MMA_PREFETCH`, `MMA_SPLIT`): stage each
/// tile while computing the one before; split the tiles of a block whose rows fit in one warp.
pub(crate) const ATTENTION_MMA_PREFETCH: u32 = 1;
pub(crate) const ATTENTION_MMA_SPLIT: u32 = 2;

/// The most blocks one launch asks for: enough to fill any current GPU many times over
/// (an H100 holds 132 SMs x 8 blocks of 256 threads), far below the 2^31 - 1 grid limit.
pub(crate) const MAX_BLOCKS: u64 = 1 << 16;

/// The widest rows whose LayerNorm backward sums the parameter gradients' partials in the dx
/// kernel (`LN_FUSED_COLS` in `kernels/norm.cu`: four columns a thread).
pub(crate) const LAYERNORM_FUSED_COLS: u64 = 4 * BLOCK as u64;

/// The blocks of the LayerNorm backward that one multiprocessor holds (`LN_BACKWARD_PER_SM`
/// in `kernels/norm.cu`, its `__launch_bounds__`).
pub(crate) const LAYERNORM_BACKWARD_PER_SM: u64 = 4;

/// The blocks of the fused LayerNorm backward for `rows` rows on a card of `multiprocessors`:
/// one wave, as many as the card holds at once, each walking its share of the rows. Each
/// block leaves one row of partials per parameter, so fewer blocks write and fold fewer
/// partials; and a grid of whole waves has no last wave that leaves most of the card idle.
/// (2,048 blocks, 3.1 waves of an H200, left its last wave a tenth full and wrote three times
/// the partials; on the H200 the kernel then ran at 2.3 TB/s, 2026-11-28.)
pub(crate) fn layernorm_backward_blocks(rows: u64, multiprocessors: u64) -> u64 {
    rows.min(multiprocessors.max(1) * LAYERNORM_BACKWARD_PER_SM)
}

/// The fewest rows summed by one thread in pass 1 of a column sum (bias, LayerNorm parameter
/// and position-table gradients).
pub(crate) const CHUNK_ROWS: u64 = 32;

/// The threads pass 1 of a column sum aims at: about what an H100 or H200 holds resident (132
/// multiprocessors x 2,048 threads) at half occupancy. More, with shorter chunks, only lengthen
/// pass 2, whose one thread per column sums every chunk: at 32 rows a chunk, the bias gradient
/// of a 25,216-row batch had pass 2 summing 788 partials per column in 38 us on an H200.
pub(crate) const COLUMN_SUM_THREADS: u64 = 1 << 17;

fn config(blocks: u64) -> LaunchConfig {
    LaunchConfig {
        // Cannot truncate: blocks <= MAX_BLOCKS < 2^32.
        grid_dim: (blocks.clamp(1, MAX_BLOCKS) as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A launch over `n` independent elements, or `None` when there is no work.
pub(crate) fn elementwise(n: u64) -> Option<LaunchConfig> {
    (n > 0).then(|| config(n.div_ceil(BLOCK as u64)))
}

/// A launch of one block per row (grid-stride over rows), or `None` when there is no work.
pub(crate) fn per_row(rows: u64, cols: u64) -> Option<LaunchConfig> {
    (rows > 0 && cols > 0).then(|| config(rows))
}

/// The widest row the warp-per-row LayerNorm holds in registers (`32 * LN_HELD` in
/// `kernels/norm.cu`, checked by a unit test); wider rows run a block per row.
pub(crate) const LAYERNORM_WARP_COLS: u64 = 1024;

/// The launch of `layernorm_forward`: one warp per row for rows of up to
/// [`LAYERNORM_WARP_COLS`], else one block per row; `None` when there is no work.
pub(crate) fn layernorm_rows(rows: u64, cols: u64) -> Option<LaunchConfig> {
    if cols > LAYERNORM_WARP_COLS {
        return per_row(rows, cols);
    }
    per_warp(if cols > 0 { rows } else { 0 })
}

/// A launch of one warp per unit of work ([`BLOCK`] / 32 per block, grid-stride beyond the
/// cap), or `None` when there is no work.
pub(crate) fn per_warp(units: u64) -> Option<LaunchConfig> {
    (units > 0).then(|| config(units.div_ceil(BLOCK as u64 / 32)))
}

/// A launch of one block per unit of work, such as a chunk of elements (grid-stride beyond
/// the cap), or `None` when there is no work.
pub(crate) fn per_block(units: u64) -> Option<LaunchConfig> {
    (units > 0).then(|| config(units))
}

/// A launch of the f32 attention kernels: one block of [`ATTENTION_THREADS`] per tile of that
/// many rows of one of `pairs` (image, head) pairs (grid-stride beyond the cap), or `None` when
/// there is no work.
pub(crate) fn attention(pairs: u64, tokens: u64) -> Option<LaunchConfig> {
    row_tiles(pairs, tokens, ATTENTION_THREADS as u64, ATTENTION_THREADS)
}

/// A launch of the tensor-core attention kernels: one block of [`ATTENTION_MMA_THREADS`] per
/// [`ATTENTION_MMA_ROWS`] rows of one of `pairs` (image, head) pairs.
pub(crate) fn attention_mma(pairs: u64, tokens: u64) -> Option<LaunchConfig> {
    row_tiles(pairs, tokens, ATTENTION_MMA_ROWS, ATTENTION_MMA_THREADS)
}

/// Whether the last block of the tensor-core attention holds rows for its first warp only
/// (`mma_has_tail` in `kernels/attention_mma.cu`: 1 to 16 rows past a multiple of 64).
pub(crate) fn attention_mma_has_tail(tokens: u64) -> bool {
    (1..=16).contains(&(tokens % ATTENTION_MMA_ROWS))
}

/// The launches of one direction of the tensor-core attention with the tail split
/// ([`ATTENTION_MMA_SPLIT`]): the main kernel without the tail blocks, and the tail kernel with
/// one block per pair where there are tail blocks. Either may be `None` (no work).
pub(crate) fn attention_mma_split(
    pairs: u64,
    tokens: u64,
) -> (Option<LaunchConfig>, Option<LaunchConfig>) {
    if !attention_mma_has_tail(tokens) {
        return (attention_mma(pairs, tokens), None);
    }
    let main = tokens - tokens % ATTENTION_MMA_ROWS;
    let tail = row_tiles(pairs, 1, 1, ATTENTION_MMA_THREADS);
    (attention_mma(pairs, main), tail)
}

/// One block of `threads` per `rows` of `tokens` of each of `pairs` (image, head) pairs.
fn row_tiles(pairs: u64, tokens: u64, rows: u64, threads: u32) -> Option<LaunchConfig> {
    (pairs > 0 && tokens > 0).then(|| LaunchConfig {
        block_dim: (threads, 1, 1),
        ..config(pairs.saturating_mul(tokens.div_ceil(rows)))
    })
}

/// One block, for the final fold of a reduction.
pub(crate) fn single_block() -> LaunchConfig {
    config(1)
}

/// How a column sum of `rows` rows over `cols` columns (every source row's columns, for
/// copy_rows_backward) is cut for its two passes: `(chunks, rows per chunk)`, chunks of at
/// least [`CHUNK_ROWS`] rows and no more of them than [`COLUMN_SUM_THREADS`] threads need.
pub(crate) fn column_chunks(rows: u64, cols: u64) -> (u64, u64) {
    let wanted = (COLUMN_SUM_THREADS / cols.max(1)).max(1);
    let len = rows.div_ceil(wanted).max(CHUNK_ROWS);
    (rows.div_ceil(len).max(1), len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_work_means_no_launch() {
        assert!(elementwise(0).is_none());
        assert!(per_row(0, 5).is_none());
        assert!(per_row(5, 0).is_none());
        assert!(per_block(0).is_none());
    }

    #[test]
    fn elementwise_grids_cover_small_work_exactly_and_cap_large_work() {
        let c = elementwise(1).unwrap();
        assert_eq!((c.grid_dim, c.block_dim), ((1, 1, 1), (256, 1, 1)));
        assert_eq!(elementwise(256).unwrap().grid_dim.0, 1);
        assert_eq!(elementwise(257).unwrap().grid_dim.0, 2);
        assert_eq!(elementwise(1 << 40).unwrap().grid_dim.0, MAX_BLOCKS as u32);
    }

    #[test]
    fn row_grids_have_one_block_per_row_up_to_the_cap() {
        assert_eq!(per_row(7, 1000).unwrap().grid_dim.0, 7);
        assert_eq!(per_row(u64::MAX, 1).unwrap().grid_dim.0, MAX_BLOCKS as u32);
        assert_eq!(single_block().grid_dim.0, 1);
        assert_eq!(per_block(3).unwrap().grid_dim.0, 3);
        assert_eq!(per_block(u64::MAX).unwrap().grid_dim.0, MAX_BLOCKS as u32);
    }

    #[test]
    fn attention_grids_have_one_block_per_row_tile_up_to_the_cap() {
        assert!(attention(0, 5).is_none());
        assert!(attention(5, 0).is_none());
        let c = attention(24, 197).unwrap();
        assert_eq!((c.grid_dim, c.block_dim), ((24 * 4, 1, 1), (64, 1, 1)));
        assert_eq!(
            attention(u64::MAX, 65).unwrap().grid_dim.0,
            MAX_BLOCKS as u32
        );
    }

    #[test]
    fn tensor_core_attention_grids_have_one_block_per_64_rows_up_to_the_cap() {
        assert!(attention_mma(0, 5).is_none());
        assert!(attention_mma(5, 0).is_none());
        let c = attention_mma(24, 197).unwrap();
        assert_eq!((c.grid_dim, c.block_dim), ((24 * 4, 1, 1), (128, 1, 1)));
        assert_eq!(attention_mma(3, 64).unwrap().grid_dim.0, 3);
        assert_eq!(
            attention_mma(u64::MAX, 65).unwrap().grid_dim.0,
            MAX_BLOCKS as u32
        );
    }

    #[test]
    fn the_layernorm_backward_runs_one_wave_of_blocks_and_no_more_than_rows() {
        // An H200's 132 multiprocessors hold 528 blocks: ViT-B's 12,800 encoder rows take them
        // all, 24 or 25 rows each.
        assert_eq!(layernorm_backward_blocks(12_800, 132), 528);
        assert_eq!(layernorm_backward_blocks(50_432, 108), 432);
        assert_eq!(layernorm_backward_blocks(7, 132), 7);
        assert_eq!(layernorm_backward_blocks(7, 0), 4);
    }

    #[test]
    fn split_tails_take_a_block_per_pair_and_leave_the_main_grid_the_rest() {
        let grids = |pairs, tokens| {
            let (main, tail) = attention_mma_split(pairs, tokens);
            (main.map(|c| c.grid_dim.0), tail.map(|c| c.grid_dim.0))
        };
        // 197 tokens: three whole blocks and a tail of 5 rows; 257: four and a tail of 1.
        assert_eq!(grids(24, 197), (Some(24 * 3), Some(24)));
        assert_eq!(grids(24, 257), (Some(24 * 4), Some(24)));
        // 7 tokens: the tail is all there is; 64 has none, 81 ends in 17 rows (two warps).
        assert_eq!(grids(24, 7), (None, Some(24)));
        assert_eq!(grids(24, 64), (Some(24), None));
        assert_eq!(grids(24, 81), (Some(24 * 2), None));
        assert_eq!(attention_mma_split(24, 197).1.unwrap().block_dim.0, 128);
        assert!(!attention_mma_has_tail(0) && attention_mma_has_tail(16));
    }

    #[test]
    fn layernorm_grids_have_a_warp_per_row_up_to_the_held_width() {
        assert!(layernorm_rows(0, 768).is_none());
        assert!(layernorm_rows(5, 0).is_none());
        assert_eq!(layernorm_rows(25216, 768).unwrap().grid_dim.0, 25216 / 8);
        assert_eq!(layernorm_rows(9, 1024).unwrap().grid_dim.0, 2);
        assert_eq!(layernorm_rows(9, 1025).unwrap().grid_dim.0, 9);
    }

    #[test]
    fn warp_grids_have_a_block_per_eight_units() {
        assert!(per_warp(0).is_none());
        assert_eq!(per_warp(1).unwrap().grid_dim.0, 1);
        assert_eq!(per_warp(768).unwrap().grid_dim.0, 96);
        assert_eq!(per_warp(769).unwrap().grid_dim.0, 97);
    }

    #[test]
    fn column_chunks_cover_every_row_once_with_enough_threads() {
        for (rows, cols) in [(0, 5), (1, 1), (32, 1), (33, 1), (1576, 768), (25216, 768)] {
            let (chunks, len) = column_chunks(rows, cols);
            assert!(len >= CHUNK_ROWS && chunks >= 1, "{rows} x {cols}");
            assert!(chunks * len >= rows, "{rows} x {cols}: rows left out");
            assert!(
                (chunks - 1) * len < rows.max(1),
                "{rows} x {cols}: an empty chunk"
            );
        }
        assert_eq!(column_chunks(33, 1), (2, 32));
        // ViT-B/16 at batch 128: 170 chunks of 149 rows (pass 1 on 130,560 threads), not 788.
        assert_eq!(column_chunks(25216, 768), (170, 149));
        assert_eq!(column_chunks(25216, 3072), (42, 601));
    }
}
