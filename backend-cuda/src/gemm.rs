//! Row-major strided-batched GEMM on cuBLAS, which is column-major.
//!
//! A row-major `m x n` matrix with leading dimension `n` is, read column-major, its transpose.
//! So `C = op(A) op(B)` (row-major) is computed as the column-major product
//! `C^T = op(B)^T op(A)^T`: cuBLAS gets B as its first operand and A as its second, with the
//! dimensions `(n, m, k)`, and each operand's transpose flag is the one `mae` gave (a row-major
//! `k x n` B is already the column-major `n x k` matrix `B^T`, so it needs no transpose).

use mae::backend::Gemm;

/// One cuBLAS `sgemmStridedBatched` call, in cuBLAS's (column-major) terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct ColumnMajor {
    /// Rows of the result (`n` of the row-major product).
    pub m: usize,
    /// Columns of the result (`m` of the row-major product).
    pub n: usize,
    pub k: usize,
    /// Whether cuBLAS's first operand (our B) is transposed.
    pub trans_first: bool,
    /// Whether cuBLAS's second operand (our A) is transposed.
    pub trans_second: bool,
    pub ld_first: usize,
    pub ld_second: usize,
    pub ldc: usize,
    pub stride_first: usize,
    pub stride_second: usize,
    pub stride_c: usize,
    pub batch: usize,
}

/// The cuBLAS call for a row-major [`Gemm`]. Leading dimensions are at least 1 (cuBLAS refuses
/// 0 even when `k == 0`, where it only scales C by beta).
pub(crate) fn column_major(g: &Gemm) -> ColumnMajor {
    // Our B, stored k x n (ld n) or, transposed, n x k (ld k).
    let ld_first = if g.trans_b { g.k } else { g.n };
    // Our A, stored m x k (ld k) or, transposed, k x m (ld m).
    let ld_second = if g.trans_a { g.m } else { g.k };
    ColumnMajor {
        m: g.n,
        n: g.m,
        k: g.k,
        trans_first: g.trans_b,
        trans_second: g.trans_a,
        ld_first: ld_first.max(1),
        ld_second: ld_second.max(1),
        ldc: g.n.max(1),
        stride_first: g.stride_b,
        stride_second: g.stride_a,
        stride_c: g.stride_c,
        batch: g.batch,
    }
}

/// The profile's work of `g`: the floating-point operations of its products (2 per
/// multiply-add), for their rate. Products are measured by that rate, so their bytes are not
/// counted.
pub(crate) fn work(g: &Gemm) -> crate::profile::Work {
    crate::profile::Work {
        flops: 2.0 * g.m as f64 * g.n as f64 * g.k as f64 * g.batch as f64,
        bytes: None,
    }
}

/// The column-major product that [`column_major`] describes, in f64 on the host: the meaning
/// cuBLAS gives those numbers, written from its documentation, for the tests.
#[cfg(test)]
pub(crate) fn reference_column_major(
    c: &ColumnMajor,
    alpha: f64,
    first: &[f32],
    second: &[f32],
    beta: f64,
    out: &mut [f32],
) {
    for b in 0..c.batch {
        for i in 0..c.m {
            for j in 0..c.n {
                let mut acc = 0.0f64;
                for p in 0..c.k {
                    // op(first) is m x k, op(second) is k x n, element (r, s) of a stored
                    // column-major matrix is at s * ld + r.
                    let f = if c.trans_first {
                        first[b * c.stride_first + i * c.ld_first + p]
                    } else {
                        first[b * c.stride_first + p * c.ld_first + i]
                    };
                    let s = if c.trans_second {
                        second[b * c.stride_second + p * c.ld_second + j]
                    } else {
                        second[b * c.stride_second + j * c.ld_second + p]
                    };
                    acc += f as f64 * s as f64;
                }
                let o = &mut out[b * c.stride_c + j * c.ldc + i];
                let old = if beta == 0.0 { 0.0 } else { beta * *o as f64 };
                *o = (alpha * acc + old) as f32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The row-major definition of the trait, straight from the `Gemm` docs.
    fn row_major(g: &Gemm, a: &[f32], b: &[f32], c: &mut [f32]) {
        for bi in 0..g.batch {
            for i in 0..g.m {
                for j in 0..g.n {
                    let mut s = 0.0f64;
                    for p in 0..g.k {
                        let av = if g.trans_a {
                            a[bi * g.stride_a + p * g.m + i]
                        } else {
                            a[bi * g.stride_a + i * g.k + p]
                        };
                        let bv = if g.trans_b {
                            b[bi * g.stride_b + j * g.k + p]
                        } else {
                            b[bi * g.stride_b + p * g.n + j]
                        };
                        s += av as f64 * bv as f64;
                    }
                    let o = &mut c[bi * g.stride_c + i * g.n + j];
                    let old = if g.beta == 0.0 {
                        0.0
                    } else {
                        g.beta as f64 * *o as f64
                    };
                    *o = (g.alpha as f64 * s + old) as f32;
                }
            }
        }
    }

    /// The layout swap gives the row-major product for every transpose combination, batched
    /// with broadcasting and with alpha and beta.
    #[test]
    fn swapped_column_major_call_computes_the_row_major_product() {
        let (m, n, k) = (3, 5, 4);
        for trans_a in [false, true] {
            for trans_b in [false, true] {
                for (stride_a, stride_b) in [(m * k, k * n), (0, k * n), (m * k, 0)] {
                    let mut g =
                        Gemm::new(m, n, k)
                            .alpha(0.5)
                            .batched(2, stride_a, stride_b, m * n + 1);
                    g.beta = 2.0;
                    g.trans_a = trans_a;
                    g.trans_b = trans_b;
                    let (la, lb, lc) = g.lens();
                    let a: Vec<f32> = (0..la).map(|i| (i % 7) as f32 - 3.0).collect();
                    let b: Vec<f32> = (0..lb).map(|i| (i % 5) as f32 * 0.5).collect();
                    let c0: Vec<f32> = (0..lc).map(|i| i as f32).collect();
                    let mut want = c0.clone();
                    row_major(&g, &a, &b, &mut want);
                    let mut got = c0.clone();
                    let cm = column_major(&g);
                    reference_column_major(&cm, 0.5, &b, &a, 2.0, &mut got);
                    assert_eq!(got, want, "{g:?} -> {cm:?}");
                }
            }
        }
    }

    #[test]
    fn leading_dimensions_are_never_zero() {
        let cm = column_major(&Gemm::new(4, 3, 0).trans_b());
        assert_eq!((cm.ld_first, cm.ld_second, cm.ldc), (1, 1, 3));
    }

    #[test]
    fn linear_layer_maps_to_transposed_weight_first() {
        // y [rows, out] = x [rows, in] W^T, W [out, in]: cuBLAS computes y^T = W x^T.
        let cm = column_major(&Gemm::new(8, 16, 32).trans_b());
        assert_eq!((cm.m, cm.n, cm.k), (16, 8, 32));
        assert!(cm.trans_first && !cm.trans_second);
        assert_eq!((cm.ld_first, cm.ld_second, cm.ldc), (32, 32, 16));
    }
}
