//! Layer 2: gradient checks on tiny shapes.
//!
//! For every backward op, two claims:
//! 1. The oracle's backward is the derivative of the oracle's forward: central finite differences
//!    in f64 of `L = <dy, forward(x)>` (`h = 1e-4`) against the oracle's backward. Linear data
//!    movement (copy_rows, gather_rows, split/merge heads) is checked by the adjoint identity
//!    `<y, M x> = <M^T y, x>` instead, and split/merge by being inverses.
//! 2. The backend's backward matches the oracle's backward on the same f32 inputs (each backend
//!    runs its own forward first, as in a training step), under the tolerances of `ops.rs`.
//!
//! The checks are generic over `B: Backend`; `gradient_tests!` at the end runs them per backend.

use mae::backend::{Backend, Gather, Gemm, Heads, RowMap};
use mae_conformance::backends::run;
use mae_conformance::oracle::{self, compare, data, f64s, max_abs, Fill, Rng, Tol};

type Check = Result<(), String>;

/// Finite-difference step.
const H: f64 = 1e-4;

/// Central differences against an analytic gradient: truncation error is `O(h^2)` (~1e-8 here),
/// rounding `O(eps_f64 |L| / h)` (~1e-11).
const FD: Tol = Tol {
    atol: 1e-6,
    rtol: 1e-5,
};

/// Seeds per check: each draws new data.
const SEEDS: u64 = 4;

fn dot(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The gradient of the scalar `f` at `x` by central differences, coordinate by coordinate.
fn numeric_grad(x: &[f64], f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    let mut xp = x.to_vec();
    (0..x.len())
        .map(|i| {
            let orig = xp[i];
            xp[i] = orig + H;
            let up = f(&xp);
            xp[i] = orig - H;
            let down = f(&xp);
            xp[i] = orig;
            (up - down) / (2.0 * H)
        })
        .collect()
}

/// Inputs in `[-1, 1)`, exact in f32 so the backend sees the same values.
fn input(seed: u64, len: usize) -> Vec<f64> {
    f64s(&data(seed, len, 1, Fill::Uniform))
}

fn to_f32(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

/// `<y, M x>` and `<M^T y, x>` must agree (relative to the terms' magnitude).
fn adjoint(what: &str, shape: &str, y_mx: f64, mty_x: f64, magnitude: f64, tol: f64) -> Check {
    let err = (y_mx - mty_x).abs();
    if err <= tol * magnitude.max(1.0) {
        Ok(())
    } else {
        Err(format!(
            "{what} [{shape}]: adjoint identity broken: <y, M x> = {y_mx}, <M^T y, x> = {mty_x}, \
             abs err {err:e}, rel err {:e}",
            err / y_mx.abs().max(f64::MIN_POSITIVE)
        ))
    }
}

// ---- gemm ---------------------------------------------------------------------------------------

/// Descriptors of the gradients of `C = alpha op(A) op(B)` (batched, no broadcast), each
/// accumulating (`beta = 1`), and whether their operands are `(dC, B)` / `(B, dC)` for dA and
/// `(A, dC)` / `(dC, A)` for dB.
///
/// - `dA = alpha dC op(B)^T`; A stored transposed (`k x m`): `dA^T = alpha op(B) dC^T`.
/// - `dB = alpha op(A)^T dC`; B stored transposed (`n x k`): `dB^T = alpha dC^T op(A)`.
fn gemm_grad_descs(g: &Gemm) -> (Gemm, bool, Gemm, bool) {
    let base = |m, n, k, trans_a, trans_b, sa, sb, sc| Gemm {
        m,
        n,
        k,
        trans_a,
        trans_b,
        alpha: g.alpha,
        beta: 1.0,
        batch: g.batch,
        stride_a: sa,
        stride_b: sb,
        stride_c: sc,
    };
    let (m, n, k) = (g.m, g.n, g.k);
    let (da, da_dc_first) = if !g.trans_a {
        (
            base(
                m, k, n, false, !g.trans_b, g.stride_c, g.stride_b, g.stride_a,
            ),
            true,
        )
    } else {
        (
            base(k, m, n, g.trans_b, true, g.stride_b, g.stride_c, g.stride_a),
            false,
        )
    };
    let (db, db_dc_first) = if !g.trans_b {
        (
            base(
                k, n, m, !g.trans_a, false, g.stride_a, g.stride_c, g.stride_b,
            ),
            false,
        )
    } else {
        (
            base(n, k, m, true, g.trans_a, g.stride_c, g.stride_a, g.stride_b),
            true,
        )
    };
    (da, da_dc_first, db, db_dc_first)
}

fn check_gemm_grad<B: Backend>(b: &B, seed: u64) -> Check {
    let mut rng = Rng::new(seed);
    let dims = [1, 2, 3, 5];
    for trans_a in [false, true] {
        for trans_b in [false, true] {
            let (m, n, k) = (dims[rng.below(4)], dims[rng.below(4)], dims[rng.below(4)]);
            let batch = 1 + rng.below(2);
            let pad = rng.below(2);
            let mut g = Gemm::new(m, n, k).alpha([1.0, 0.5][rng.below(2)]);
            g.trans_a = trans_a;
            g.trans_b = trans_b;
            let g = g.batched(batch, m * k + pad, k * n + pad, m * n + pad);
            let (la, lb, lc) = g.lens();
            let (a, bm, dc) = (input(seed, la), input(seed ^ 1, lb), input(seed ^ 2, lc));
            let shape = format!("{g:?}");
            let (da_g, da_dc_first, db_g, db_dc_first) = gemm_grad_descs(&g);
            let forward = |a: &[f64], bm: &[f64]| {
                let mut c = vec![0.0; lc];
                oracle::gemm(&g, a, bm, &mut c);
                dot(&dc, &c)
            };

            // 1. The transposed gemms are the derivative of the forward gemm.
            let mut da = vec![0.0; la];
            let mut db = vec![0.0; lb];
            if da_dc_first {
                oracle::gemm(&da_g, &dc, &bm, &mut da);
            } else {
                oracle::gemm(&da_g, &bm, &dc, &mut da);
            }
            if db_dc_first {
                oracle::gemm(&db_g, &dc, &a, &mut db);
            } else {
                oracle::gemm(&db_g, &a, &dc, &mut db);
            }
            let num_da = numeric_grad(&a, |a| forward(a, &bm));
            let num_db = numeric_grad(&bm, |bm| forward(&a, bm));
            // Padding between batch items is not an input of the product: its gradient is 0.
            compare(
                "gemm dA (oracle vs finite differences)",
                &shape,
                &da,
                &num_da,
                FD,
                None,
            )?;
            compare(
                "gemm dB (oracle vs finite differences)",
                &shape,
                &db,
                &num_db,
                FD,
                None,
            )?;

            // 2. The backend's gemms with those descriptors.
            let (a32, b32, dc32) = (to_f32(&a), to_f32(&bm), to_f32(&dc));
            let zeros_a = vec![0.0f32; la];
            let zeros_b = vec![0.0f32; lb];
            let got_da = if da_dc_first {
                run::gemm(b, &da_g, &dc32, &b32, &zeros_a)
            } else {
                run::gemm(b, &da_g, &b32, &dc32, &zeros_a)
            };
            let got_db = if db_dc_first {
                run::gemm(b, &db_g, &dc32, &a32, &zeros_b)
            } else {
                run::gemm(b, &db_g, &a32, &dc32, &zeros_b)
            };
            let tol_da = Tol::gemm(da_g.k, max_abs(&dc), max_abs(&bm));
            let tol_db = Tol::gemm(db_g.k, max_abs(&dc), max_abs(&a));
            compare(
                "gemm dA (backend vs oracle)",
                &shape,
                &got_da,
                &da,
                tol_da,
                None,
            )?;
            compare(
                "gemm dB (backend vs oracle)",
                &shape,
                &got_db,
                &db,
                tol_db,
                None,
            )?;
        }
    }
    Ok(())
}

// ---- copy_rows, gather_rows, heads: adjoints and inverses --------------------------------------

fn check_copy_rows_adjoint<B: Backend>(b: &B, seed: u64) -> Check {
    let mut rng = Rng::new(seed);
    let count = 1 + rng.below(3);
    let map = RowMap {
        batch: 1 + rng.below(3),
        count,
        cols: 1 + rng.below(4),
        src_stride: rng.below(3),
        src_start: rng.below(2),
        src_step: rng.below(2),
        dst_stride: count + rng.below(2),
        dst_start: rng.below(2),
    };
    let (ls, ld) = map.lens();
    let (x, y) = (input(seed, ls), input(seed ^ 1, ld));
    let shape = format!("{map:?}");

    // Oracle: M x into zeros, M^T y into zeros.
    let mut mx = vec![0.0; ld];
    oracle::copy_rows(&x, &mut mx, &map, false);
    let mut mty = vec![0.0; ls];
    oracle::copy_rows_backward(&y, &mut mty, &map);
    let magnitude: f64 = y.iter().zip(&mx).map(|(a, b)| (a * b).abs()).sum();
    adjoint(
        "copy_rows (oracle)",
        &shape,
        dot(&y, &mx),
        dot(&mty, &x),
        magnitude,
        1e-12,
    )?;

    // Backend: the same two products.
    let got_mx = run::copy_rows(b, &to_f32(&x), &vec![0.0; ld], &map, false);
    let got_mty = run::copy_rows_backward(b, &to_f32(&y), &vec![0.0; ls], &map);
    compare(
        "copy_rows (backend vs oracle)",
        &shape,
        &got_mx,
        &mx,
        Tol::EXACT,
        None,
    )?;
    compare(
        "copy_rows_backward (backend vs oracle)",
        &shape,
        &got_mty,
        &mty,
        Tol::ELEMENTWISE.scaled(4.0),
        None,
    )?;
    adjoint(
        "copy_rows (backend)",
        &shape,
        dot(&y, &f64s(&got_mx)),
        dot(&f64s(&got_mty), &x),
        magnitude,
        1e-5,
    )
}

fn check_gather_adjoint<B: Backend>(b: &B, seed: u64) -> Check {
    let mut rng = Rng::new(seed);
    let src_rows = 1 + rng.below(5);
    let count = 1 + rng.below(src_rows);
    let dst_start = rng.below(2);
    let g = Gather {
        batch: 1 + rng.below(3),
        count,
        cols: 1 + rng.below(4),
        src_rows,
        src_stride: src_rows,
        src_start: 0,
        dst_rows: dst_start + count + rng.below(2),
        dst_start,
    };
    let idx: Vec<u32> = (0..g.batch)
        .flat_map(|_| rng.permutation(src_rows)[..count].to_vec())
        .collect();
    let (ls, _, ld) = g.lens();
    let (x, y) = (input(seed, ls), input(seed ^ 1, ld));
    let shape = format!("{g:?}, idx {idx:?}");

    let mut mx = vec![0.0; ld];
    oracle::gather_rows(&x, &idx, &mut mx, &g);
    let mut mty = vec![0.0; ls];
    oracle::gather_rows_backward(&y, &idx, &mut mty, &g);
    let magnitude: f64 = y.iter().zip(&mx).map(|(a, b)| (a * b).abs()).sum();
    adjoint(
        "gather_rows (oracle)",
        &shape,
        dot(&y, &mx),
        dot(&mty, &x),
        magnitude,
        1e-12,
    )?;

    let got_mx = run::gather_rows(b, &to_f32(&x), &idx, &vec![0.0; ld], &g);
    let got_mty = run::gather_rows_backward(b, &to_f32(&y), &idx, &vec![0.0; ls], &g);
    compare(
        "gather_rows (backend vs oracle)",
        &shape,
        &got_mx,
        &mx,
        Tol::EXACT,
        None,
    )?;
    compare(
        "gather_rows_backward (backend vs oracle)",
        &shape,
        &got_mty,
        &mty,
        Tol::EXACT,
        None,
    )?;
    adjoint(
        "gather_rows (backend)",
        &shape,
        dot(&y, &f64s(&got_mx)),
        dot(&f64s(&got_mty), &x),
        magnitude,
        1e-5,
    )
}

/// split_heads and merge_heads are inverses on the head columns, and adjoints of each other.
fn check_heads_inverse<B: Backend>(b: &B, seed: u64) -> Check {
    let mut rng = Rng::new(seed);
    let (heads, head_dim, col_offset) = (1 + rng.below(3), 1 + rng.below(4), rng.below(3));
    let h = Heads {
        batch: 1 + rng.below(2),
        tokens: 1 + rng.below(4),
        heads,
        head_dim,
        row_width: col_offset + heads * head_dim + rng.below(3),
        col_offset,
    };
    let (lx, lh) = h.lens();
    let (x, t) = (input(seed, lx), input(seed ^ 1, lh));
    let shape = format!("{h:?}");

    // Oracle: merge(split(x)) restores x; split(merge(t)) restores t; <t, split x> = <merge t, x>.
    let mut sx = vec![0.0; lh];
    oracle::split_heads(&x, &mut sx, &h);
    // x with NaN in the head columns, which merge_heads must overwrite.
    let holes: Vec<f64> = (0..lx)
        .map(|i| {
            let col = i % h.row_width;
            let head_col = col >= h.col_offset && col < h.col_offset + heads * head_dim;
            if head_col {
                f64::NAN
            } else {
                x[i]
            }
        })
        .collect();
    let mut back = holes.clone();
    oracle::merge_heads(&sx, &mut back, &h);
    compare(
        "merge_heads(split_heads(x)) (oracle)",
        &shape,
        &back,
        &x,
        Tol::EXACT,
        None,
    )?;
    let mut mt = vec![0.0; lx];
    oracle::merge_heads(&t, &mut mt, &h);
    let mut smt = vec![0.0; lh];
    oracle::split_heads(&mt, &mut smt, &h);
    compare(
        "split_heads(merge_heads(t)) (oracle)",
        &shape,
        &smt,
        &t,
        Tol::EXACT,
        None,
    )?;
    let magnitude: f64 = t.iter().zip(&sx).map(|(a, b)| (a * b).abs()).sum();
    adjoint(
        "split_heads / merge_heads (oracle)",
        &shape,
        dot(&t, &sx),
        dot(&mt, &x),
        magnitude,
        1e-12,
    )?;

    // Backend: the same round trips, bitwise.
    let (x32, t32) = (to_f32(&x), to_f32(&t));
    let got_sx = run::split_heads(b, &x32, &vec![f32::NAN; lh], &h);
    compare(
        "split_heads (backend vs oracle)",
        &shape,
        &got_sx,
        &sx,
        Tol::EXACT,
        None,
    )?;
    let got_back = run::merge_heads(b, &got_sx, &to_f32(&holes), &h);
    compare(
        "merge_heads(split_heads(x)) (backend)",
        &shape,
        &got_back,
        &x,
        Tol::EXACT,
        None,
    )?;
    let got_mt = run::merge_heads(b, &t32, &vec![0.0; lx], &h);
    let got_smt = run::split_heads(b, &got_mt, &vec![f32::NAN; lh], &h);
    compare(
        "split_heads(merge_heads(t)) (backend)",
        &shape,
        &got_smt,
        &t,
        Tol::EXACT,
        None,
    )
}

// ---- layernorm ----------------------------------------------------------------------------------

fn check_layernorm_grad<B: Backend>(b: &B, seed: u64) -> Check {
    let mut rng = Rng::new(seed);
    let (rows, cols) = (1 + rng.below(3), [1, 2, 3, 5, 8][rng.below(5)]);
    let eps = 1e-5f32;
    let n = rows * cols;
    let (x, gamma, beta, dy) = (
        input(seed, n),
        input(seed ^ 1, cols),
        input(seed ^ 2, cols),
        input(seed ^ 3, n),
    );
    let shape = format!("rows {rows}, cols {cols}, eps {eps:e}, seed {seed}");
    let forward = |x: &[f64], gamma: &[f64], beta: &[f64]| {
        let (mut y, mut mean, mut rstd) = (vec![0.0; n], vec![0.0; rows], vec![0.0; rows]);
        oracle::layernorm_forward(
            x, gamma, beta, &mut y, &mut mean, &mut rstd, rows, cols, eps as f64,
        );
        (y, mean, rstd)
    };
    let (_, mean, rstd) = forward(&x, &gamma, &beta);

    // 1. Oracle backward vs finite differences of the oracle forward, for x, gamma and beta.
    let (mut dx, mut dg, mut db) = (vec![0.0; n], vec![0.0; cols], vec![0.0; cols]);
    oracle::layernorm_backward(
        &dy, &x, &gamma, &mean, &rstd, &mut dx, &mut dg, &mut db, rows, cols,
    );
    let num_dx = numeric_grad(&x, |x| dot(&dy, &forward(x, &gamma, &beta).0));
    let num_dg = numeric_grad(&gamma, |g| dot(&dy, &forward(&x, g, &beta).0));
    let num_db = numeric_grad(&beta, |bt| dot(&dy, &forward(&x, &gamma, bt).0));
    compare(
        "layernorm dx (oracle vs finite differences)",
        &shape,
        &dx,
        &num_dx,
        FD,
        None,
    )?;
    compare(
        "layernorm dgamma (oracle vs finite differences)",
        &shape,
        &dg,
        &num_dg,
        FD,
        None,
    )?;
    compare(
        "layernorm dbeta (oracle vs finite differences)",
        &shape,
        &db,
        &num_db,
        FD,
        None,
    )?;

    // 2. The backend's forward then backward, against the oracle's.
    let (x32, g32, b32, dy32) = (to_f32(&x), to_f32(&gamma), to_f32(&beta), to_f32(&dy));
    let (zn, zr) = (vec![0.0f32; n], vec![0.0f32; rows]);
    let (_, bmean, brstd) =
        run::layernorm_forward(b, &x32, &g32, &b32, (&zn, &zr, &zr), rows, cols, eps);
    let zc = vec![0.0f32; cols];
    let (gdx, gdg, gdb) = run::layernorm_backward(
        b,
        &dy32,
        &x32,
        &g32,
        &bmean,
        &brstd,
        (&zn, &zc, &zc),
        rows,
        cols,
    );
    compare(
        "layernorm dx (backend vs oracle)",
        &shape,
        &gdx,
        &dx,
        Tol::REDUCTION,
        None,
    )?;
    compare(
        "layernorm dgamma (backend vs oracle)",
        &shape,
        &gdg,
        &dg,
        Tol::REDUCTION,
        None,
    )?;
    compare(
        "layernorm dbeta (backend vs oracle)",
        &shape,
        &gdb,
        &db,
        Tol::REDUCTION,
        None,
    )
}

// ---- gelu ---------------------------------------------------------------------------------------

fn check_gelu_grad<B: Backend>(b: &B, seed: u64) -> Check {
    // Spread over [-4, 4) to reach both tails.
    let x: Vec<f64> = input(seed, 40).iter().map(|v| 4.0 * v).collect();
    let dy = input(seed ^ 1, 40);
    let shape = format!("len 40, x in [-4, 4), seed {seed}");
    let mut dx = vec![0.0; 40];
    oracle::gelu_backward(&x, &dy, &mut dx);
    let num = numeric_grad(&x, |x| {
        let mut y = vec![0.0; 40];
        oracle::gelu_forward(x, &mut y);
        dot(&dy, &y)
    });
    compare(
        "gelu dx (oracle vs finite differences)",
        &shape,
        &dx,
        &num,
        FD,
        None,
    )?;

    let got = run::gelu_backward(b, &to_f32(&x), &to_f32(&dy), &[0.0; 40], true);
    compare(
        "gelu dx (backend vs oracle)",
        &shape,
        &got,
        &dx,
        Tol::ELEMENTWISE,
        None,
    )
}

// ---- softmax ------------------------------------------------------------------------------------

fn check_softmax_grad<B: Backend>(b: &B, seed: u64) -> Check {
    let mut rng = Rng::new(seed);
    let (rows, cols) = (1 + rng.below(3), [1, 2, 3, 5, 8][rng.below(5)]);
    let scale = [1.0f32, 0.5, 0.125][rng.below(3)];
    let n = rows * cols;
    let (x, dy) = (
        input(seed, n).iter().map(|v| 3.0 * v).collect::<Vec<_>>(),
        input(seed ^ 1, n),
    );
    let shape = format!("rows {rows}, cols {cols}, scale {scale}, seed {seed}");
    let forward = |x: &[f64]| {
        let mut y = vec![0.0; n];
        oracle::softmax_forward(x, &mut y, rows, cols, scale);
        y
    };
    let y = forward(&x);
    let mut dx = vec![0.0; n];
    oracle::softmax_backward(&y, &dy, &mut dx, rows, cols, scale);
    let num = numeric_grad(&x, |x| dot(&dy, &forward(x)));
    compare(
        "softmax dx (oracle vs finite differences)",
        &shape,
        &dx,
        &num,
        FD,
        None,
    )?;

    let x32 = to_f32(&x);
    let by = run::softmax_forward(b, &x32, &vec![0.0; n], rows, cols, scale);
    let got = run::softmax_backward(b, &by, &to_f32(&dy), &vec![0.0; n], rows, cols, scale);
    compare(
        "softmax dx (backend vs oracle)",
        &shape,
        &got,
        &dx,
        Tol::REDUCTION,
        None,
    )
}

// ---- masked mse ---------------------------------------------------------------------------------

fn check_masked_mse_grad<B: Backend>(b: &B, seed: u64) -> Check {
    let mut rng = Rng::new(seed);
    let (rows, cols) = (1 + rng.below(4), [1, 2, 3, 5][rng.below(4)]);
    let d_loss = [1.0f32, 0.25][rng.below(2)];
    let n = rows * cols;
    let (pred, target) = (input(seed, n), input(seed ^ 1, n));
    let mut mask: Vec<f64> = (0..rows).map(|_| rng.below(2) as f64).collect();
    mask[rng.below(rows)] = 1.0;
    let shape = format!("rows {rows}, cols {cols}, mask {mask:?}, d_loss {d_loss}, seed {seed}");
    let mut dp = vec![0.0; n];
    oracle::masked_mse_backward(&pred, &target, &mask, &mut dp, rows, cols, d_loss);
    let num = numeric_grad(&pred, |p| {
        let mut loss = [0.0];
        oracle::masked_mse_forward(p, &target, &mask, &mut loss, rows, cols);
        d_loss as f64 * loss[0]
    });
    compare(
        "masked_mse d_pred (oracle vs finite differences)",
        &shape,
        &dp,
        &num,
        FD,
        None,
    )?;

    let (p32, t32, m32) = (to_f32(&pred), to_f32(&target), to_f32(&mask));
    let got = run::masked_mse_backward(b, &p32, &t32, &m32, &vec![0.0; n], rows, cols, d_loss);
    compare(
        "masked_mse d_pred (backend vs oracle)",
        &shape,
        &got,
        &dp,
        Tol::ELEMENTWISE,
        None,
    )
}

// ---- the tests, instantiated per backend ---------------------------------------------------------

/// Runs `check` for every seed; does nothing when the backend was skipped.
fn seeds<B: Backend>(b: Option<&B>, seeds: std::ops::Range<u64>, check: impl Fn(&B, u64) -> Check) {
    let Some(b) = b else { return };
    for seed in seeds {
        if let Err(e) = check(b, seed) {
            panic!("{}, seed {seed}: {e}", b.name());
        }
    }
}

/// One module of tests per backend, named after its getter in `mae_conformance::backends`.
macro_rules! gradient_tests {
    ($($backend:ident),*) => {$(
        mod $backend {
            use super::*;

            fn b() -> Option<&'static impl Backend> {
                mae_conformance::backends::$backend()
            }

            #[test]
            fn gemm_gradients() {
                seeds(b(), 0..SEEDS, check_gemm_grad);
            }
            #[test]
            fn copy_rows_adjoint() {
                seeds(b(), 0..4 * SEEDS, check_copy_rows_adjoint);
            }
            #[test]
            fn gather_rows_adjoint() {
                seeds(b(), 0..4 * SEEDS, check_gather_adjoint);
            }
            #[test]
            fn split_merge_heads_inverse() {
                seeds(b(), 0..4 * SEEDS, check_heads_inverse);
            }
            #[test]
            fn layernorm_gradients() {
                seeds(b(), 0..4 * SEEDS, check_layernorm_grad);
            }
            #[test]
            fn gelu_gradient() {
                seeds(b(), 0..SEEDS, check_gelu_grad);
            }
            #[test]
            fn softmax_gradient() {
                seeds(b(), 0..4 * SEEDS, check_softmax_grad);
            }
            #[test]
            fn masked_mse_gradient() {
                seeds(b(), 0..4 * SEEDS, check_masked_mse_grad);
            }
        }
    )*};
}

gradient_tests!(cpu, wgpu, cuda);
