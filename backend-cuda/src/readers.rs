//! Which destination rows read each source row of a [`RowMap`]: the enumeration that
//! `copy_rows_backward` sums over. The CUDA functions `readers_of` and `reader_dst_row` in
//! `kernels/rows.cu` are a line-by-line transliteration of the two functions here, which the
//! unit tests check against a brute-force enumeration of every pair.

use mae::backend::RowMap;

/// The readers of source row `s`: `(first_b, count)`, the pairs in ascending `(b, i)` order.
/// For `src_step` 0 or 1 and a map with `batch >= 1`.
#[cfg(test)]
pub(crate) fn readers_of(m: &RowMap, s: usize) -> (usize, usize) {
    if s < m.src_start {
        return (0, 0);
    }
    let t = s - m.src_start;
    if m.src_step == 0 {
        if m.src_stride == 0 {
            return (0, if t == 0 { m.batch * m.count } else { 0 });
        }
        if t % m.src_stride != 0 || t / m.src_stride >= m.batch {
            return (0, 0);
        }
        return (t / m.src_stride, m.count);
    }
    if m.src_stride == 0 {
        return (0, if t < m.count { m.batch } else { 0 });
    }
    let lo = if t >= m.count {
        (t - m.count) / m.src_stride + 1
    } else {
        0
    };
    let hi = (t / m.src_stride).min(m.batch - 1);
    (lo, if hi >= lo { hi - lo + 1 } else { 0 })
}

/// The destination row of the `k`-th reader of source row `s`.
#[cfg(test)]
pub(crate) fn reader_dst_row(m: &RowMap, s: usize, first_b: usize, k: usize) -> usize {
    let (b, i) = if m.src_step == 0 {
        if m.src_stride == 0 {
            (k / m.count, k % m.count)
        } else {
            (first_b, k)
        }
    } else if m.src_stride == 0 {
        (k, s - m.src_start)
    } else {
        let b = first_b + k;
        (b, (s - m.src_start) - b * m.src_stride)
    };
    m.dst_row(b, i)
}

/// An upper bound of the readers of any one source row, which sizes the partial sums.
pub(crate) fn max_readers(m: &RowMap) -> usize {
    match (m.src_step, m.src_stride) {
        (0, 0) => m.batch * m.count,
        (0, _) => m.count,
        (_, 0) => m.batch,
        (_, stride) => m.batch.min((m.count - 1) / stride + 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enumeration_matches_every_pair_in_order() {
        let mut maps = 0;
        for step in [0, 1] {
            for stride in [0, 1, 2, 3, 5, 7] {
                for (batch, count) in [(1, 1), (1, 3), (3, 1), (3, 3), (4, 2), (5, 7), (2, 9)] {
                    for start in [0, 2] {
                        let m = RowMap {
                            batch,
                            count,
                            cols: 1,
                            src_stride: stride,
                            src_start: start,
                            src_step: step,
                            dst_stride: count + 1,
                            dst_start: 1,
                        };
                        maps += 1;
                        let src_rows = m.lens().0;
                        let mut most = 0;
                        for s in 0..src_rows + 3 {
                            // Brute force: every pair, ascending (b, i).
                            let mut want = Vec::new();
                            for b in 0..batch {
                                for i in 0..count {
                                    if m.src_row(b, i) == s {
                                        want.push(m.dst_row(b, i));
                                    }
                                }
                            }
                            let (first_b, n) = readers_of(&m, s);
                            let got: Vec<usize> =
                                (0..n).map(|k| reader_dst_row(&m, s, first_b, k)).collect();
                            assert_eq!(got, want, "{m:?} source row {s}");
                            most = most.max(n);
                        }
                        assert!(most <= max_readers(&m), "{m:?}: {most} readers");
                    }
                }
            }
        }
        assert_eq!(maps, 2 * 6 * 7 * 2);
    }

    #[test]
    fn bias_map_has_one_row_read_by_every_row() {
        let m = RowMap::bias(1576, 768);
        assert_eq!(readers_of(&m, 0), (0, 1576));
        assert_eq!(readers_of(&m, 1), (0, 0));
        assert_eq!(reader_dst_row(&m, 0, 0, 1575), 1575);
        assert_eq!(max_readers(&m), 1576);
    }
}
