//! Layer 1: every `Backend` op against the f64 oracle (`mae_conformance::oracle`), property-tested
//! on odd shapes, plus the output contracts of the trait: overwriting ops ignore what the output
//! held (even NaN), accumulating ops add (twice gives 2x), and what an op must not touch stays
//! bitwise as it was.
//!
//! Every check is a function generic over `B: Backend` that uploads its inputs, runs the op and
//! downloads the result; `op_tests!` at the end instantiates them once per backend (module `cpu`,
//! `wgpu`, ...): a new backend joins by adding its getter to the `op_tests!` line.
//!
//! Tolerances are rust-backends.md §9: per element `|got - want| <= atol + rtol * |want|`, with
//! `want` the f64 oracle on the same f32 inputs. Where an output is a sum of terms that can cancel
//! (a reduction, or an accumulation into an existing gradient), `atol` is multiplied by the
//! magnitude of those terms (`Tol::scaled`), the standard bound for a floating-point sum; gemm's
//! `atol` scales with `K` and the operands' norms as §9 prescribes.
//!
//! `PROPTEST_CASES` overrides the number of cases per property (default 64).

use mae::backend::{
    AdamWStep, Attention, Backend, BackendErrorKind, Gather, Gemm, Heads, PatchOrder, Patchify,
    RowMap,
};
use mae_conformance::backends::{down, run, up, up_idx};
use mae_conformance::oracle::{
    self, compare, data, f32s, f64s, max_abs, untouched, Fill, Rng, Tol, FILLS,
};
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::{FileFailurePersistence, TestError, TestRunner};
use std::io::Write;

type Check = Result<(), String>;

// ---- strategies ---------------------------------------------------------------------------------

/// Sizes that hit tile edges and non-multiples of 4, 8 and 64.
const DIMS: [usize; 10] = [1, 2, 3, 7, 8, 16, 31, 33, 64, 65];

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(64);
    ProptestConfig {
        cases,
        max_shrink_iters: 200,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/proptest-regressions/ops.txt"
        )))),
        ..ProptestConfig::default()
    }
}

fn dim() -> impl Strategy<Value = usize> {
    prop_oneof![select(DIMS.to_vec()), 1usize..=12]
}

/// A dimension of at least 2 (the unbiased variance of `normalize_rows`).
fn dim2() -> impl Strategy<Value = usize> {
    dim().prop_map(|d| d.max(2))
}

fn fill() -> impl Strategy<Value = Fill> {
    select(FILLS.to_vec())
}

/// What an overwritten output holds before the op: it must not matter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Init {
    Nan,
    Garbage,
}

fn init() -> impl Strategy<Value = Init> {
    select(vec![Init::Nan, Init::Garbage])
}

fn old_contents(init: Init, len: usize, seed: u64) -> Vec<f32> {
    match init {
        Init::Nan => vec![f32::NAN; len],
        Init::Garbage => data(seed, len, 1, Fill::Uniform)
            .iter()
            .map(|x| x * 1e30)
            .collect(),
    }
}

/// Random values in `[-1, 1)` for an output that an op accumulates into.
fn prior(len: usize, seed: u64) -> Vec<f32> {
    data(seed ^ 0xacc, len, 1, Fill::Uniform)
}

fn abs(v: &[f32]) -> Vec<f64> {
    v.iter().map(|x| x.abs() as f64).collect()
}

// ---- gemm ---------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct GemmCase {
    m: usize,
    n: usize,
    k: usize,
    trans_a: bool,
    trans_b: bool,
    alpha: f32,
    beta: f32,
    batch: usize,
    bcast_a: bool,
    bcast_b: bool,
    /// Extra elements between batch items and after the last one.
    pad: usize,
    seed: u64,
    fill: Fill,
}

impl GemmCase {
    fn desc(&self) -> Gemm {
        let (m, n, k, pad) = (self.m, self.n, self.k, self.pad);
        let mut g = Gemm::new(m, n, k).alpha(self.alpha);
        g.beta = self.beta;
        if self.trans_a {
            g = g.trans_a();
        }
        if self.trans_b {
            g = g.trans_b();
        }
        let sa = if self.bcast_a { 0 } else { m * k + pad };
        let sb = if self.bcast_b { 0 } else { k * n + pad };
        g.batched(self.batch, sa, sb, m * n + pad)
    }

    /// The case's single product (batch and padding dropped), as the epilogue ops take it, and
    /// its A, B, C and bias (n values).
    fn single_product(&self) -> (Gemm, [Vec<f32>; 4]) {
        let g = GemmCase {
            batch: 1,
            pad: 0,
            ..self.clone()
        }
        .desc();
        let (la, lb, lc) = g.lens();
        let data = [
            data(self.seed, la, g.k, self.fill),
            data(self.seed ^ 1, lb, g.n, self.fill),
            data(self.seed ^ 2, lc, g.n, self.fill),
            data(self.seed ^ 3, g.n, g.n, self.fill),
        ];
        (g, data)
    }
}

fn gemm_case() -> impl Strategy<Value = GemmCase> {
    (
        (dim(), dim(), dim()),
        (
            any::<bool>(),
            any::<bool>(),
            select(vec![0.0f32, 0.5, 1.0]),
            select(vec![0.0f32, 0.5, 1.0]),
        ),
        (1usize..=3, any::<bool>(), any::<bool>(), 0usize..=3),
        (any::<u64>(), fill()),
    )
        .prop_map(
            |(
                (m, n, k),
                (trans_a, trans_b, alpha, beta),
                (batch, bcast_a, bcast_b, pad),
                (seed, fill),
            )| {
                GemmCase {
                    m,
                    n,
                    k,
                    trans_a,
                    trans_b,
                    alpha,
                    beta,
                    batch,
                    bcast_a,
                    bcast_b,
                    pad,
                    seed,
                    fill,
                }
            },
        )
}

/// Which elements of a C buffer of `len` the product writes.
fn gemm_touched(g: &Gemm, len: usize) -> Vec<bool> {
    let mut t = vec![false; len];
    for b in 0..g.batch {
        for i in 0..g.m * g.n {
            t[b * g.stride_c + i] = true;
        }
    }
    t
}

fn check_gemm<B: Backend>(b: &B, c: &GemmCase) -> Check {
    check_gemm_of(b, c, |x| x, 0.0)
}

/// [`check_gemm`] against the product of the operands as `operand` rounds them, allowing each
/// product term a further relative error of `slack` (0: the f32 GEMM tolerance alone).
fn check_gemm_of<B: Backend>(
    b: &B,
    c: &GemmCase,
    operand: impl Fn(f32) -> f32,
    slack: f64,
) -> Check {
    let g = c.desc();
    let (la, lb, lc) = g.lens();
    let a = data(c.seed, la + c.pad, g.k, c.fill);
    let bm = data(c.seed ^ 1, lb + c.pad, g.n, c.fill);
    // C[b] holds NaN when beta == 0 (it must be ignored), data otherwise; the padding between
    // batch items and the tail hold data that must stay as it is.
    let touched = gemm_touched(&g, lc + c.pad);
    let mut c0 = data(c.seed ^ 2, lc + c.pad, g.n, c.fill);
    if g.beta == 0.0 {
        for (x, &t) in c0.iter_mut().zip(&touched) {
            if t {
                *x = f32::NAN;
            }
        }
    }
    let got = run::gemm(b, &g, &a, &bm, &c0);
    let (a, bm): (Vec<f32>, Vec<f32>) = (
        a.iter().map(|&x| operand(x)).collect(),
        bm.iter().map(|&x| operand(x)).collect(),
    );
    let mut want = f64s(&c0);
    oracle::gemm(&g, &f64s(&a), &f64s(&bm), &mut want);
    let shape = format!("{g:?}, {:?}, seed {}", c.fill, c.seed);
    let (max_a, max_b) = (max_abs(&f64s(&a)), max_abs(&f64s(&bm)));
    let mut tol = Tol::gemm(g.k, max_a, max_b);
    tol.atol += slack * (g.alpha.abs() as f64) * g.k as f64 * max_a * max_b;
    compare("gemm", &shape, &got, &want, tol, None)?;
    untouched("gemm", &shape, &got, &c0, &touched)
}

/// The GEMM epilogues (`gemm_bias`, `gemm_bias_gelu`) against the ops they replace, on the same
/// backend: bitwise equal (the same product, f32 add and GELU). The trait promises that where
/// the override sums the product in `gemm`'s order; CUDA's cuBLASLt epilogue need not, but
/// chose the same order as `cublasGemmEx` for every shape of this suite on an H200 (2026-11-27),
/// and `check_gemm_bias_of` holds it to the f64 oracle whatever the order. A single product of
/// the case (its batch and padding dropped).
fn check_gemm_epilogues<B: Backend>(b: &B, c: &GemmCase) -> Check {
    let (g, [a, bm, c0, bias]) = c.single_product();
    let act0 = vec![f32::NAN; c0.len()];
    let shape = format!("{g:?}, {:?}, seed {}", c.fill, c.seed);
    let product = run::gemm(b, &g, &a, &bm, &c0);
    let two_pre = run::copy_rows(b, &bias, &product, &RowMap::bias(g.m, g.n), true);
    let (_, two_act) = run::bias_gelu_forward(b, &bias, &product, &act0, g.m, g.n);
    let fused = run::gemm_bias(b, &g, (&a, &bm), &bias, &c0);
    let (pre, act) = run::gemm_bias_gelu(b, &g, (&a, &bm), &bias, &c0, &act0);
    for (what, fused, two) in [
        ("gemm_bias", &fused, &two_pre),
        ("gemm_bias_gelu pre", &pre, &two_pre),
        ("gemm_bias_gelu act", &act, &two_act),
    ] {
        if let Some(i) = (0..fused.len()).find(|&i| fused[i].to_bits() != two[i].to_bits()) {
            return Err(format!(
                "{what} ({shape}): element {i} is {} fused, {} from the composed ops",
                fused[i], two[i]
            ));
        }
    }
    Ok(())
}

/// `gemm_bias` (the single product of the case, batch and padding dropped) against the f64
/// oracle of `alpha op(A) op(B) + beta C + bias`, on the operands as `operand` rounds them, with
/// gemm's tolerance (and `slack` as in [`check_gemm_of`]): a backend may add the bias in the
/// GEMM's epilogue (cuBLASLt), whose sums need not be bitwise `gemm`'s. `beta == 1` is the
/// accumulating product: the bias is added once. `gemm_bias_onto` too, with C read from a
/// separate buffer that must stay as it was (with `beta == 0`, C holds NaN and is ignored).
fn check_gemm_bias_of<B: Backend>(
    b: &B,
    c: &GemmCase,
    operand: impl Fn(f32) -> f32,
    slack: f64,
) -> Check {
    let (g, [a, bm, mut c0, bias]) = c.single_product();
    if g.beta == 0.0 {
        c0.fill(f32::NAN); // must be ignored
    }
    let got = run::gemm_bias(b, &g, (&a, &bm), &bias, &c0);
    let (a0, b0) = (a.clone(), bm.clone());
    let (a, bm): (Vec<f32>, Vec<f32>) = (
        a.iter().map(|&x| operand(x)).collect(),
        bm.iter().map(|&x| operand(x)).collect(),
    );
    let mut want = f64s(&c0);
    oracle::gemm(&g, &f64s(&a), &f64s(&bm), &mut want);
    for (i, w) in want.iter_mut().enumerate() {
        *w += bias[i % g.n] as f64;
    }
    let shape = format!("{g:?}, {:?}, seed {}", c.fill, c.seed);
    let (max_a, max_b) = (max_abs(&f64s(&a)), max_abs(&f64s(&bm)));
    let mut tol = Tol::gemm(g.k, max_a, max_b);
    tol.atol += slack * (g.alpha.abs() as f64) * g.k as f64 * max_a * max_b;
    compare("gemm_bias", &shape, &got, &want, tol, None)?;
    // The same with C read from a separate `base`, which stays as it was, into a C of NaN.
    let nan = vec![f32::NAN; c0.len()];
    let (base, onto) = run::gemm_bias_onto(b, &g, (&a0, &b0), &bias, &c0, &nan);
    if base
        .iter()
        .zip(&c0)
        .any(|(x, y)| x.to_bits() != y.to_bits())
    {
        return Err(format!("gemm_bias_onto {shape}: base changed"));
    }
    compare("gemm_bias_onto", &shape, &onto, &want, tol, None)
}

/// [`check_gemm_bias_of`] on fixed shapes of `(m, n, k)`, each with every transpose and both an
/// overwriting and an accumulating (`beta = 1`) product.
fn check_gemm_bias_shapes<B: Backend>(
    b: &B,
    shapes: &[(usize, usize, usize)],
    operand: impl Fn(f32) -> f32 + Copy,
    slack: f64,
) -> Check {
    for &(m, n, k) in shapes {
        for (trans_a, trans_b) in [(false, false), (false, true), (true, false), (true, true)] {
            for beta in [0.0, 1.0] {
                let c = GemmCase {
                    m,
                    n,
                    k,
                    trans_a,
                    trans_b,
                    alpha: 1.0,
                    beta,
                    batch: 1,
                    bcast_a: false,
                    bcast_b: false,
                    pad: 0,
                    seed: (m * n * k) as u64,
                    fill: Fill::Uniform,
                };
                check_gemm_bias_of(b, &c, operand, slack)?;
            }
        }
    }
    Ok(())
}

/// Odd shapes (no dimension a multiple of 8) and a Linear layer's; the largest takes the bf16
/// mode's copies.
const GEMM_BIAS_SHAPES: [(usize, usize, usize); 3] = [(33, 65, 31), (197, 96, 48), (601, 577, 67)];

/// `gemm_bias_grad` (a Linear layer's `dW = dY^T X + beta dW` and `db += ` dY's column sums)
/// against the f64 oracle on the operands as `operand` rounds them, for token rows x outputs x
/// inputs in `shapes`, overwriting and accumulating: dW with gemm's tolerance plus `slack_dw`
/// (as in [`check_gemm_of`]), db with that of a product over the rows plus `slack_db` times the
/// rows and the largest |dY|: a backend may sum the columns inside the product (cuBLASLt), in
/// f32 in its own order.
fn check_gemm_bias_grad<B: Backend>(
    b: &B,
    shapes: &[(usize, usize, usize)],
    operand: impl Fn(f32) -> f32,
    (slack_dw, slack_db): (f64, f64),
) -> Check {
    for &(rows, out, inputs) in shapes {
        for beta in [0.0, 1.0] {
            let seed = (rows * out * inputs) as u64 + beta as u64;
            let mut g = Gemm::new(out, inputs, rows).trans_a();
            g.beta = beta;
            let dy = data(seed, rows * out, out, Fill::Uniform);
            let x = data(seed ^ 1, rows * inputs, inputs, Fill::Uniform);
            let dw0 = if beta == 0.0 {
                vec![f32::NAN; out * inputs] // must be ignored
            } else {
                data(seed ^ 2, out * inputs, inputs, Fill::Uniform)
            };
            let db0 = data(seed ^ 3, out, out, Fill::Uniform);
            let (dw, db) = run::gemm_bias_grad(b, &g, (&dy, &x), &dw0, &db0);
            let (dy, x): (Vec<f32>, Vec<f32>) = (
                dy.iter().map(|&v| operand(v)).collect(),
                x.iter().map(|&v| operand(v)).collect(),
            );
            let (max_dy, max_x) = (max_abs(&f64s(&dy)), max_abs(&f64s(&x)));
            let shape = format!("{rows} rows x {out} out x {inputs} in, beta {beta}");
            let mut want = f64s(&dw0);
            oracle::gemm(&g, &f64s(&dy), &f64s(&x), &mut want);
            let mut tol = Tol::gemm(rows, max_dy, max_x);
            tol.atol += slack_dw * rows as f64 * max_dy * max_x;
            compare("gemm_bias_grad dW", &shape, &dw, &want, tol, None)?;
            let mut want = f64s(&db0);
            for (j, w) in want.iter_mut().enumerate() {
                *w += (0..rows).map(|r| dy[r * out + j] as f64).sum::<f64>();
            }
            let mut tol = Tol::gemm(rows, max_dy, 1.0);
            tol.atol += slack_db * rows as f64 * max_dy;
            compare("gemm_bias_grad db", &shape, &db, &want, tol, None)?;
        }
    }
    Ok(())
}

/// Odd shapes and two whose products take the CUDA bf16 mode's copies (2 x 512 x 512 / 1,024 =
/// 512 FLOPs per operand element), which cuBLASLt's bias-gradient epilogue runs; the second
/// has rows enough (2,048) to run in chunks of them where its output leaves most of the card
/// idle (`backend-cuda/src/split_k.rs`).
const GEMM_BIAS_GRAD_SHAPES: [(usize, usize, usize); 4] = [
    (31, 33, 65),
    (197, 96, 48),
    (300, 512, 512),
    (2048, 512, 512),
];

// ---- add, scale ---------------------------------------------------------------------------------

fn check_add<B: Backend>(b: &B, len: usize, seed: u64, fill: Fill) -> Check {
    let src = data(seed, len, 1, fill);
    let dst = data(seed ^ 1, len, 1, fill);
    let got = run::add(b, &src, &dst);
    let mut want = f64s(&dst);
    oracle::add(&f64s(&src), &mut want);
    let mut mag = abs(&dst);
    oracle::add(&abs(&src), &mut mag);
    compare(
        "add",
        &format!("len {len}, {fill:?}"),
        &got,
        &want,
        Tol::ELEMENTWISE,
        Some(&mag),
    )
}

fn check_scale<B: Backend>(b: &B, len: usize, s: f32, seed: u64, fill: Fill) -> Check {
    let x = data(seed, len, 1, fill);
    let got = run::scale(b, &x, s);
    let mut want = f64s(&x);
    oracle::scale(&mut want, s);
    compare(
        "scale",
        &format!("len {len}, s {s}, {fill:?}"),
        &got,
        &want,
        Tol::ELEMENTWISE,
        None,
    )
}

// ---- scale_rows ---------------------------------------------------------------------------------

/// Drop path's factors (0 drops an image, `1 / keep_prob` rescales a kept one) and a few others.
const ROW_FACTORS: [f32; 5] = [0.0, 1.0 / 0.9, 1.0 / 0.75, 1.0, -2.5];

#[derive(Clone, Debug)]
struct ScaleRowsCase {
    /// One factor per group of `rows_per_scale` rows.
    scales: Vec<f32>,
    rows_per_scale: usize,
    cols: usize,
    accumulate: bool,
    seed: u64,
    fill: Fill,
    init: Init,
}

fn scale_rows_case() -> impl Strategy<Value = ScaleRowsCase> {
    (
        proptest::collection::vec(select(ROW_FACTORS.to_vec()), 1..=5),
        (1usize..=5, dim()),
        (any::<bool>(), any::<u64>(), fill(), init()),
    )
        .prop_map(
            |(scales, (rows_per_scale, cols), (accumulate, seed, fill, init))| ScaleRowsCase {
                scales,
                rows_per_scale,
                cols,
                accumulate,
                seed,
                fill,
                init,
            },
        )
}

/// Overwriting: `dst` starts as NaN or garbage, which must not show. Accumulating: `dst` starts
/// with values of either sign, so the sum can cancel (its `atol` scales with `|dst| + |src * f|`).
fn check_scale_rows<B: Backend>(b: &B, c: &ScaleRowsCase) -> Check {
    let n = c.scales.len() * c.rows_per_scale * c.cols;
    let src = data(c.seed, n, c.cols, c.fill);
    let dst = if c.accumulate {
        prior(n, c.seed)
    } else {
        old_contents(c.init, n, c.seed)
    };
    let (rps, cols, acc) = (c.rows_per_scale, c.cols, c.accumulate);
    let got = run::scale_rows(b, &src, &c.scales, &dst, rps, cols, acc);
    let mut want = if acc { f64s(&dst) } else { vec![0.0; n] };
    oracle::scale_rows(&f64s(&src), &f64s(&c.scales), &mut want, rps, cols, acc);
    let mag = acc.then(|| {
        let mut m = abs(&dst);
        oracle::scale_rows(&abs(&src), &abs(&c.scales), &mut m, rps, cols, true);
        m
    });
    let shape = format!(
        "scales {:?}, {rps} rows of {cols} per scale, accumulate {acc}, {:?}, {:?}, seed {}",
        c.scales, c.fill, c.init, c.seed
    );
    compare(
        "scale_rows",
        &shape,
        &got,
        &want,
        Tol::ELEMENTWISE,
        mag.as_deref(),
    )
}

/// By hand: three images of two rows of two values, the first dropped (factor 0), the second
/// doubled, the third halved; into NaN (overwrite) and into 100 (accumulate).
fn check_scale_rows_fixed<B: Backend>(b: &B) -> Check {
    let src: Vec<f32> = (1..=12).map(|v| v as f32).collect();
    let scales = [0.0, 2.0, 0.5];
    let got = run::scale_rows(b, &src, &scales, &[f32::NAN; 12], 2, 2, false);
    let want = [
        0.0, 0.0, 0.0, 0.0, 10.0, 12.0, 14.0, 16.0, 4.5, 5.0, 5.5, 6.0,
    ];
    compare("scale_rows", "3 x 2 x 2", &got, &want, Tol::EXACT, None)?;
    let got = run::scale_rows(b, &src, &scales, &[100.0; 12], 2, 2, true);
    let want = want.map(|w| w + 100.0);
    compare(
        "scale_rows accumulate",
        "3 x 2 x 2",
        &got,
        &want,
        Tol::EXACT,
        None,
    )?;
    // Drop path in training: one factor per image over its tokens, on a real shape.
    for accumulate in [false, true] {
        let c = ScaleRowsCase {
            scales: vec![0.0, 1.0 / 0.9, 1.0 / 0.9, 0.0],
            rows_per_scale: 17,
            cols: 64,
            accumulate,
            seed: 7,
            fill: Fill::Uniform,
            init: Init::Nan,
        };
        check_scale_rows(b, &c)?;
    }
    Ok(())
}

// ---- copy_rows ----------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct RowsCase {
    map: RowMap,
    /// Extra rows after the last source and destination row.
    tail: usize,
    accumulate: bool,
    seed: u64,
    fill: Fill,
    init: Init,
}

fn rows_case() -> impl Strategy<Value = RowsCase> {
    (
        (1usize..=3, 1usize..=5, dim()),
        (0usize..=1, 0usize..=7, 0usize..=2),
        (0usize..=2, 0usize..=2, 0usize..=2),
        (any::<bool>(), any::<u64>(), fill(), init()),
    )
        .prop_map(
            |(
                (batch, count, cols),
                (src_step, src_stride, src_start),
                (dst_gap, dst_start, tail),
                (accumulate, seed, fill, init),
            )| {
                RowsCase {
                    map: RowMap {
                        batch,
                        count,
                        cols,
                        src_stride,
                        src_start,
                        src_step,
                        // Distinct destination rows.
                        dst_stride: count + dst_gap,
                        dst_start,
                    },
                    tail,
                    accumulate,
                    seed,
                    fill,
                    init,
                }
            },
        )
}

/// Which elements of a destination of `len` floats `map` writes.
fn rows_touched(map: &RowMap, len: usize) -> Vec<bool> {
    let mut t = vec![false; len];
    for b in 0..map.batch {
        for i in 0..map.count {
            let d = map.dst_row(b, i);
            t[d * map.cols..(d + 1) * map.cols].fill(true);
        }
    }
    t
}

fn check_copy_rows<B: Backend>(b: &B, c: &RowsCase) -> Check {
    let map = c.map;
    let (ls, ld) = map.lens();
    let (ls, ld) = (ls + c.tail * map.cols, ld + c.tail * map.cols);
    let src = data(c.seed, ls, map.cols, c.fill);
    let touched = rows_touched(&map, ld);
    let mut dst = prior(ld, c.seed);
    if !c.accumulate {
        let old = old_contents(c.init, ld, c.seed ^ 3);
        for i in 0..ld {
            if touched[i] {
                dst[i] = old[i];
            }
        }
    }
    let shape = format!(
        "{map:?}, tail {}, accumulate {}, {:?}",
        c.tail, c.accumulate, c.init
    );
    let got = run::copy_rows(b, &src, &dst, &map, c.accumulate);
    let mut want = f64s(&dst);
    oracle::copy_rows(&f64s(&src), &mut want, &map, c.accumulate);
    let tol = if c.accumulate {
        Tol::ELEMENTWISE
    } else {
        Tol::EXACT
    };
    compare("copy_rows", &shape, &got, &want, tol, None)?;
    untouched("copy_rows", &shape, &got, &dst, &touched)
}

fn check_copy_rows_backward<B: Backend>(b: &B, c: &RowsCase) -> Check {
    let map = c.map;
    let (ls, ld) = map.lens();
    let (ls, ld) = (ls + c.tail * map.cols, ld + c.tail * map.cols);
    let d_dst = data(c.seed, ld, map.cols, c.fill);
    let d_src = prior(ls, c.seed);
    let got = run::copy_rows_backward(b, &d_dst, &d_src, &map);
    let mut want = f64s(&d_src);
    oracle::copy_rows_backward(&f64s(&d_dst), &mut want, &map);
    let mut mag = abs(&d_src);
    oracle::copy_rows_backward(&abs(&d_dst), &mut mag, &map);
    let shape = format!("{map:?}, tail {}", c.tail);
    compare(
        "copy_rows_backward",
        &shape,
        &got,
        &want,
        Tol::ELEMENTWISE,
        Some(&mag),
    )
}

// ---- gather_rows --------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct GatherCase {
    g: Gather,
    seed: u64,
    fill: Fill,
    init: Init,
}

/// Where a gather's items read: rows of their own (`gap` rows apart, from `start` on), or one
/// table that every item reads (`shared`, from row `start` on).
fn gather_case() -> impl Strategy<Value = GatherCase> {
    (
        (1usize..=3, 1usize..=12, any::<usize>(), dim()),
        (0usize..=2, 0usize..=2),
        (any::<bool>(), 0usize..=2, 0usize..=2),
        (any::<u64>(), fill(), init()),
    )
        .prop_map(
            |(
                (batch, src_rows, count, cols),
                (dst_start, dst_gap),
                (shared, src_start, src_gap),
                (seed, fill, init),
            )| {
                let count = 1 + count % src_rows;
                let src_stride = match shared {
                    true => 0,
                    false => src_start + src_rows + src_gap,
                };
                GatherCase {
                    g: Gather {
                        batch,
                        count,
                        cols,
                        src_rows,
                        src_stride,
                        src_start,
                        dst_rows: dst_start + count + dst_gap,
                        dst_start,
                    },
                    seed,
                    fill,
                    init,
                }
            },
        )
}

/// Per batch item, `count` distinct indices below `src_rows`, as mae builds them.
fn gather_indices(g: &Gather, seed: u64) -> Vec<u32> {
    let mut rng = Rng::new(seed ^ 0x1d);
    (0..g.batch)
        .flat_map(|_| rng.permutation(g.src_rows)[..g.count].to_vec())
        .collect()
}

fn gather_touched(g: &Gather) -> Vec<bool> {
    let mut t = vec![false; g.lens().2];
    for b in 0..g.batch {
        let first = (b * g.dst_rows + g.dst_start) * g.cols;
        t[first..first + g.count * g.cols].fill(true);
    }
    t
}

fn check_gather_rows<B: Backend>(b: &B, c: &GatherCase) -> Check {
    let g = c.g;
    let (ls, _, ld) = g.lens();
    let src = data(c.seed, ls, g.cols, c.fill);
    let idx = gather_indices(&g, c.seed);
    let touched = gather_touched(&g);
    let old = old_contents(c.init, ld, c.seed ^ 3);
    let mut dst = prior(ld, c.seed);
    for i in 0..ld {
        if touched[i] {
            dst[i] = old[i];
        }
    }
    let got = run::gather_rows(b, &src, &idx, &dst, &g);
    let mut want = f64s(&dst);
    oracle::gather_rows(&f64s(&src), &idx, &mut want, &g);
    let shape = format!("{g:?}, idx {idx:?}, {:?}", c.init);
    compare("gather_rows", &shape, &got, &want, Tol::EXACT, None)?;
    untouched("gather_rows", &shape, &got, &dst, &touched)
}

fn check_gather_rows_backward<B: Backend>(b: &B, c: &GatherCase) -> Check {
    let g = c.g;
    let (ls, _, ld) = g.lens();
    let d_dst = data(c.seed, ld, g.cols, c.fill);
    let idx = gather_indices(&g, c.seed);
    let d_src = prior(ls, c.seed);
    if !g.sources_apart() {
        return refuses_shared_sources(b, &d_dst, &idx, &d_src, &g);
    }
    let got = run::gather_rows_backward(b, &d_dst, &idx, &d_src, &g);
    let mut want = f64s(&d_src);
    oracle::gather_rows_backward(&f64s(&d_dst), &idx, &mut want, &g);
    let mut mag = abs(&d_src);
    oracle::gather_rows_backward(&abs(&d_dst), &idx, &mut mag, &g);
    let shape = format!("{g:?}, idx {idx:?}");
    compare(
        "gather_rows_backward",
        &shape,
        &got,
        &want,
        Tol::ELEMENTWISE,
        Some(&mag),
    )
}

/// Items that share source rows would scatter into one row from several items: the backward
/// refuses them with a typed error and leaves `d_src` as it was.
fn refuses_shared_sources<B: Backend>(
    b: &B,
    d_dst: &[f32],
    idx: &[u32],
    d_src: &[f32],
    g: &Gather,
) -> Check {
    let (d_dst_b, idx_b, mut d_src_b) = (up(b, d_dst), up_idx(b, idx), up(b, d_src));
    match b.gather_rows_backward(&d_dst_b, &idx_b, &mut d_src_b, g) {
        Err(e) if e.kind == BackendErrorKind::Unsupported => {}
        other => {
            return Err(format!(
                "gather_rows_backward {g:?}: {other:?}, not Unsupported"
            ))
        }
    }
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    if bits(&down(b, &d_src_b)) != bits(d_src) {
        return Err(format!(
            "gather_rows_backward {g:?}: refused, but d_src changed"
        ));
    }
    Ok(())
}

// ---- patchify, heads ----------------------------------------------------------------------------

fn patchify_case() -> impl Strategy<Value = (Patchify, u64, Init)> {
    (
        (1usize..=2, 1usize..=4, 1usize..=5, 1usize..=4, 1usize..=4),
        any::<bool>(),
        any::<u64>(),
        init(),
    )
        .prop_map(|((batch, channels, patch, gh, gw), hwc, seed, init)| {
            let p = Patchify {
                batch,
                channels,
                height: gh * patch,
                width: gw * patch,
                patch,
                order: if hwc {
                    PatchOrder::Hwc
                } else {
                    PatchOrder::Chw
                },
            };
            (p, seed, init)
        })
}

fn check_patchify<B: Backend>(b: &B, p: &Patchify, seed: u64, init: Init) -> Check {
    let (li, lo) = p.lens();
    let imgs = data(seed, li, 1, Fill::Uniform);
    let out = old_contents(init, lo, seed);
    let got = run::patchify(b, &imgs, &out, p);
    let mut want = f64s(&out);
    oracle::patchify(&f64s(&imgs), &mut want, p);
    compare(
        "patchify",
        &format!("{p:?}, {init:?}"),
        &got,
        &want,
        Tol::EXACT,
        None,
    )
}

fn heads_case() -> impl Strategy<Value = (Heads, u64, Init)> {
    (
        (
            1usize..=2,
            dim(),
            1usize..=4,
            select(vec![1usize, 2, 3, 7, 8, 16]),
        ),
        (0usize..=5, 0usize..=5),
        any::<u64>(),
        init(),
    )
        .prop_map(
            |((batch, tokens, heads, head_dim), (col_offset, extra), seed, init)| {
                let h = Heads {
                    batch,
                    tokens,
                    heads,
                    head_dim,
                    row_width: col_offset + heads * head_dim + extra,
                    col_offset,
                };
                (h, seed, init)
            },
        )
}

fn heads_touched(h: &Heads) -> Vec<bool> {
    let mut t = vec![false; h.lens().0];
    for row in t.chunks_mut(h.row_width) {
        row[h.col_offset..h.col_offset + h.heads * h.head_dim].fill(true);
    }
    t
}

fn check_split_heads<B: Backend>(b: &B, h: &Heads, seed: u64, init: Init) -> Check {
    let (lx, lh) = h.lens();
    let x = data(seed, lx, h.row_width, Fill::Uniform);
    let heads = old_contents(init, lh, seed);
    let got = run::split_heads(b, &x, &heads, h);
    let mut want = f64s(&heads);
    oracle::split_heads(&f64s(&x), &mut want, h);
    compare(
        "split_heads",
        &format!("{h:?}, {init:?}"),
        &got,
        &want,
        Tol::EXACT,
        None,
    )
}

fn check_merge_heads<B: Backend>(b: &B, h: &Heads, seed: u64, init: Init) -> Check {
    let (lx, lh) = h.lens();
    let heads = data(seed, lh, h.head_dim, Fill::Uniform);
    let touched = heads_touched(h);
    let old = old_contents(init, lx, seed);
    let mut x = prior(lx, seed);
    for i in 0..lx {
        if touched[i] {
            x[i] = old[i];
        }
    }
    let got = run::merge_heads(b, &heads, &x, h);
    let mut want = f64s(&x);
    oracle::merge_heads(&f64s(&heads), &mut want, h);
    let shape = format!("{h:?}, {init:?}");
    compare("merge_heads", &shape, &got, &want, Tol::EXACT, None)?;
    untouched("merge_heads", &shape, &got, &x, &touched)
}

// ---- layernorm ----------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct RowOpCase {
    rows: usize,
    cols: usize,
    /// eps, softmax scale, or d_loss.
    param: f32,
    seed: u64,
    fill: Fill,
    init: Init,
}

fn row_case(
    cols: impl Strategy<Value = usize>,
    params: Vec<f32>,
) -> impl Strategy<Value = RowOpCase> {
    (dim(), cols, select(params), any::<u64>(), fill(), init()).prop_map(
        |(rows, cols, param, seed, fill, init)| RowOpCase {
            rows,
            cols,
            param,
            seed,
            fill,
            init,
        },
    )
}

const LN_EPS: [f32; 2] = [1e-6, 1e-5];

fn check_layernorm_forward<B: Backend>(b: &B, c: &RowOpCase) -> Check {
    let (rows, cols, eps) = (c.rows, c.cols, c.param);
    let x = data(c.seed, rows * cols, cols, c.fill);
    let gamma = data(c.seed ^ 1, cols, cols, Fill::Uniform);
    let beta = data(c.seed ^ 2, cols, cols, Fill::Uniform);
    let y0 = old_contents(c.init, rows * cols, c.seed);
    let m0 = old_contents(c.init, rows, c.seed ^ 4);
    let r0 = old_contents(c.init, rows, c.seed ^ 5);
    let (y, mean, rstd) =
        run::layernorm_forward(b, &x, &gamma, &beta, (&y0, &m0, &r0), rows, cols, eps);
    let (mut wy, mut wm, mut wr) = (vec![0.0; rows * cols], vec![0.0; rows], vec![0.0; rows]);
    let (x64, g64, b64) = (f64s(&x), f64s(&gamma), f64s(&beta));
    oracle::layernorm_forward(
        &x64, &g64, &b64, &mut wy, &mut wm, &mut wr, rows, cols, eps as f64,
    );
    let shape = format!(
        "rows {rows}, cols {cols}, eps {eps:e}, {:?}, {:?}",
        c.fill, c.init
    );
    compare("layernorm_forward y", &shape, &y, &wy, Tol::REDUCTION, None)?;
    compare(
        "layernorm_forward mean",
        &shape,
        &mean,
        &wm,
        Tol::REDUCTION,
        None,
    )?;
    compare(
        "layernorm_forward rstd",
        &shape,
        &rstd,
        &wr,
        Tol::REDUCTION,
        None,
    )
}

/// Inputs of a layernorm backward: `(dy, x, gamma, mean, rstd)`, the statistics from the oracle's
/// forward rounded to f32, so backend and oracle see the same values.
fn layernorm_backward_inputs(c: &RowOpCase) -> [Vec<f32>; 5] {
    let (rows, cols) = (c.rows, c.cols);
    let x = data(c.seed, rows * cols, cols, c.fill);
    let gamma = data(c.seed ^ 1, cols, cols, Fill::Uniform);
    let dy = data(c.seed ^ 2, rows * cols, cols, c.fill);
    let (mut y, mut mean, mut rstd) = (vec![0.0; rows * cols], vec![0.0; rows], vec![0.0; rows]);
    let zeros = vec![0.0; cols];
    oracle::layernorm_forward(
        &f64s(&x),
        &f64s(&gamma),
        &zeros,
        &mut y,
        &mut mean,
        &mut rstd,
        rows,
        cols,
        c.param as f64,
    );
    [dy, x, gamma, f32s(&mean), f32s(&rstd)]
}

/// Magnitudes of the terms of each layernorm gradient element (the `atol` scale of
/// [`compare`]): `(dx, dgamma, dbeta)` without their prior values.
fn layernorm_backward_magnitudes(
    inputs: &[Vec<f32>; 5],
    rows: usize,
    cols: usize,
) -> [Vec<f64>; 3] {
    let [dy, x, gamma, mean, rstd] = inputs.clone().map(|v| f64s(&v));
    let (mut mdx, mut mdg, mut mdb) = (vec![0.0; rows * cols], vec![0.0; cols], vec![0.0; cols]);
    for r in 0..rows {
        let xhat: Vec<f64> = (0..cols)
            .map(|c| ((x[r * cols + c] - mean[r]) * rstd[r]).abs())
            .collect();
        let g: Vec<f64> = (0..cols)
            .map(|c| (dy[r * cols + c] * gamma[c]).abs())
            .collect();
        let mg = g.iter().sum::<f64>() / cols as f64;
        let mgx = g.iter().zip(&xhat).map(|(g, x)| g * x).sum::<f64>() / cols as f64;
        for c in 0..cols {
            mdx[r * cols + c] = rstd[r] * (g[c] + mg + xhat[c] * mgx);
            mdg[c] += (dy[r * cols + c] * xhat[c]).abs();
            mdb[c] += dy[r * cols + c].abs();
        }
    }
    [mdx, mdg, mdb]
}

/// The LayerNorm backward at row widths on both sides of the backends' own limits: CUDA's warp
/// per row (up to 1,024 columns) and its parameter gradients' partials summed in the dx kernel
/// (up to 1,024), a block per row and a pass of their own past them.
fn check_layernorm_backward_widths<B: Backend>(b: &B) -> Check {
    for (rows, cols) in [(3, 255), (70, 1024), (5, 1025), (2, 1500)] {
        let c = RowOpCase {
            rows,
            cols,
            param: LN_EPS[0],
            seed: (rows * cols) as u64,
            fill: Fill::Uniform,
            init: Init::Garbage,
        };
        check_layernorm_backward(b, &c)?;
    }
    Ok(())
}

fn check_layernorm_backward<B: Backend>(b: &B, c: &RowOpCase) -> Check {
    let (rows, cols) = (c.rows, c.cols);
    let inputs = layernorm_backward_inputs(c);
    let [dy, x, gamma, mean, rstd] = &inputs;
    let (dx0, dg0, db0) = (
        prior(rows * cols, c.seed),
        prior(cols, c.seed ^ 1),
        prior(cols, c.seed ^ 2),
    );
    let (dx, dg, db) =
        run::layernorm_backward(b, dy, x, gamma, mean, rstd, (&dx0, &dg0, &db0), rows, cols);
    let (mut wdx, mut wdg, mut wdb) = (f64s(&dx0), f64s(&dg0), f64s(&db0));
    let [dy64, x64, g64, m64, r64] = inputs.clone().map(|v| f64s(&v));
    oracle::layernorm_backward(
        &dy64, &x64, &g64, &m64, &r64, &mut wdx, &mut wdg, &mut wdb, rows, cols,
    );
    let [mut mdx, mut mdg, mut mdb] = layernorm_backward_magnitudes(&inputs, rows, cols);
    oracle::add(&abs(&dx0), &mut mdx);
    oracle::add(&abs(&dg0), &mut mdg);
    oracle::add(&abs(&db0), &mut mdb);
    let shape = format!(
        "rows {rows}, cols {cols}, eps {:e}, {:?}, seed {}",
        c.param, c.fill, c.seed
    );
    compare(
        "layernorm_backward dx",
        &shape,
        &dx,
        &wdx,
        Tol::REDUCTION,
        Some(&mdx),
    )?;
    compare(
        "layernorm_backward dgamma",
        &shape,
        &dg,
        &wdg,
        Tol::REDUCTION,
        Some(&mdg),
    )?;
    compare(
        "layernorm_backward dbeta",
        &shape,
        &db,
        &wdb,
        Tol::REDUCTION,
        Some(&mdb),
    )
}

// ---- gelu ---------------------------------------------------------------------------------------

fn check_gelu_forward<B: Backend>(b: &B, len: usize, seed: u64, fill: Fill, init: Init) -> Check {
    let x = data(seed, len, 1, fill);
    let y0 = old_contents(init, len, seed);
    let got = run::gelu_forward(b, &x, &y0);
    let mut want = vec![0.0; len];
    oracle::gelu_forward(&f64s(&x), &mut want);
    compare(
        "gelu_forward",
        &format!("len {len}, {fill:?}, {init:?}"),
        &got,
        &want,
        Tol::ELEMENTWISE,
        None,
    )
}

/// Inputs of `bias_gelu_forward` on `rows x cols`: `(bias, pre, act)`, `pre` spread over
/// [-4, 4) (x4 is exact) so the GELU's curved part and both tails are exercised, `act` holding
/// what `init` says (the op overwrites it).
fn bias_gelu_inputs(
    rows: usize,
    cols: usize,
    seed: u64,
    fill: Fill,
    init: Init,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let bias = data(seed ^ 1, cols, cols, fill);
    let pre: Vec<f32> = data(seed, rows * cols, cols, fill)
        .iter()
        .map(|x| 4.0 * x)
        .collect();
    (bias, pre, old_contents(init, rows * cols, seed ^ 2))
}

fn check_bias_gelu_forward<B: Backend>(
    b: &B,
    (rows, cols): (usize, usize),
    seed: u64,
    fill: Fill,
    init: Init,
) -> Check {
    let (bias, pre0, act0) = bias_gelu_inputs(rows, cols, seed, fill, init);
    let (pre, act) = run::bias_gelu_forward(b, &bias, &pre0, &act0, rows, cols);
    let mut want_pre = f64s(&pre0);
    for row in want_pre.chunks_exact_mut(cols) {
        for (p, &bv) in row.iter_mut().zip(&bias) {
            *p += bv as f64;
        }
    }
    let mut want_act = vec![0.0; rows * cols];
    oracle::gelu_forward(&want_pre, &mut want_act);
    let shape = format!("{rows} x {cols}, {fill:?}, {init:?}, seed {seed}");
    // The f32 `pre` is the sum rounded once (relative error <= 2^-24), and |x gelu'(x)| stays
    // below 1.3 |gelu(x)| for x > 0 and below 0.3 for x < 0: the GELU of the rounded sum is
    // within the elementwise tolerance of the GELU of the exact one.
    compare(
        "bias_gelu_forward pre",
        &shape,
        &pre,
        &want_pre,
        Tol::ELEMENTWISE,
        None,
    )?;
    compare(
        "bias_gelu_forward act",
        &shape,
        &act,
        &want_act,
        Tol::ELEMENTWISE,
        None,
    )
}

/// The fused op against the two ops it replaces, on the same backend: bitwise equal, since it
/// promises the same f32 add and the same GELU.
fn check_bias_gelu_is_bias_then_gelu<B: Backend>(
    b: &B,
    (rows, cols): (usize, usize),
    seed: u64,
    fill: Fill,
    init: Init,
) -> Check {
    let (bias, pre0, act0) = bias_gelu_inputs(rows, cols, seed, fill, init);
    let (pre, act) = run::bias_gelu_forward(b, &bias, &pre0, &act0, rows, cols);
    let two_pre = run::copy_rows(b, &bias, &pre0, &RowMap::bias(rows, cols), true);
    let two_act = run::gelu_forward(b, &two_pre, &act0);
    let shape = format!("{rows} x {cols}, {fill:?}, {init:?}, seed {seed}");
    for (what, fused, two) in [("pre", &pre, &two_pre), ("act", &act, &two_act)] {
        if let Some(i) = (0..fused.len()).find(|&i| fused[i].to_bits() != two[i].to_bits()) {
            return Err(format!(
                "bias_gelu_forward {what} ({shape}): element {i} is {} fused, {} from copy_rows \
                 + gelu_forward",
                fused[i], two[i]
            ));
        }
    }
    Ok(())
}

fn check_gelu_backward<B: Backend>(b: &B, len: usize, seed: u64, fill: Fill) -> Check {
    let x = data(seed, len, 1, fill);
    let dy = data(seed ^ 1, len, 1, fill);
    let dx0 = prior(len, seed);
    let got = run::gelu_backward(b, &x, &dy, &dx0, true);
    let mut want = f64s(&dx0);
    oracle::gelu_backward(&f64s(&x), &f64s(&dy), &mut want);
    // gelu'(x) = Phi(x) + x phi(x) cancels for negative x: the terms' magnitude is
    // |dy| (Phi(x) + |x| phi(x)).
    let mut mag = abs(&dx0);
    for i in 0..len {
        let (x, dy) = (x[i] as f64, dy[i] as f64);
        mag[i] += dy.abs() * (oracle::normal_cdf(x) + (x * oracle::normal_pdf(x)).abs());
    }
    compare(
        "gelu_backward",
        &format!("len {len}, {fill:?}"),
        &got,
        &want,
        Tol::ELEMENTWISE,
        Some(&mag),
    )
}

/// Overwriting never reads `dx` (NaN here) and gives bitwise the accumulation into zeros;
/// `dy` holds zeros of both signs, whose products the sign of the zero addend decides.
fn check_gelu_backward_overwrites<B: Backend>(b: &B, len: usize, seed: u64, fill: Fill) -> Check {
    let x = data(seed, len, 1, fill);
    let mut dy = data(seed ^ 1, len, 1, fill);
    for (i, v) in dy.iter_mut().enumerate().step_by(5) {
        *v = if i % 2 == 0 { 0.0 } else { -0.0 };
    }
    let overwritten = run::gelu_backward(b, &x, &dy, &vec![f32::NAN; len], false);
    let accumulated = run::gelu_backward(b, &x, &dy, &vec![0.0; len], true);
    match (0..len).find(|&i| overwritten[i].to_bits() != accumulated[i].to_bits()) {
        Some(i) => Err(format!(
            "gelu_backward (len {len}, {fill:?}, seed {seed}): element {i} is {} overwritten, {} \
             accumulated into zeros",
            overwritten[i], accumulated[i]
        )),
        None => Ok(()),
    }
}

// ---- softmax ------------------------------------------------------------------------------------

const SOFTMAX_SCALES: [f32; 3] = [1.0, 0.125, 0.176_776_7];

fn check_softmax_forward<B: Backend>(b: &B, c: &RowOpCase) -> Check {
    let (rows, cols, s) = (c.rows, c.cols, c.param);
    let x = data(c.seed, rows * cols, cols, c.fill);
    let y0 = old_contents(c.init, rows * cols, c.seed);
    let got = run::softmax_forward(b, &x, &y0, rows, cols, s);
    let mut want = vec![0.0; rows * cols];
    oracle::softmax_forward(&f64s(&x), &mut want, rows, cols, s);
    let shape = format!(
        "rows {rows}, cols {cols}, scale {s}, {:?}, {:?}",
        c.fill, c.init
    );
    compare("softmax_forward", &shape, &got, &want, Tol::REDUCTION, None)
}

fn check_softmax_backward<B: Backend>(b: &B, c: &RowOpCase) -> Check {
    let (rows, cols, s) = (c.rows, c.cols, c.param);
    let x = data(c.seed, rows * cols, cols, c.fill);
    let mut y = vec![0.0; rows * cols];
    oracle::softmax_forward(&f64s(&x), &mut y, rows, cols, s);
    let y = f32s(&y);
    let dy = data(c.seed ^ 1, rows * cols, cols, c.fill);
    let dx0 = prior(rows * cols, c.seed);
    let got = run::softmax_backward(b, &y, &dy, &dx0, rows, cols, s);
    let mut want = f64s(&dx0);
    oracle::softmax_backward(&f64s(&y), &f64s(&dy), &mut want, rows, cols, s);
    // |scale| y (|dy| + sum |dy y|) + |dx0|.
    let mut mag = abs(&dx0);
    for r in 0..rows {
        let dot: f64 = (0..cols)
            .map(|c| (dy[r * cols + c] * y[r * cols + c]).abs() as f64)
            .sum();
        for c in 0..cols {
            let i = r * cols + c;
            mag[i] += (s * y[i]) as f64 * (dy[i].abs() as f64 + dot);
        }
    }
    let shape = format!(
        "rows {rows}, cols {cols}, scale {s}, {:?}, seed {}",
        c.fill, c.seed
    );
    compare(
        "softmax_backward",
        &shape,
        &got,
        &want,
        Tol::REDUCTION,
        Some(&mag),
    )
}

// ---- loss ---------------------------------------------------------------------------------------

fn check_normalize_rows<B: Backend>(b: &B, c: &RowOpCase) -> Check {
    let (rows, cols, eps) = (c.rows, c.cols, c.param);
    let x = data(c.seed, rows * cols, cols, c.fill);
    let y0 = old_contents(c.init, rows * cols, c.seed);
    let got = run::normalize_rows(b, &x, &y0, rows, cols, eps);
    let mut want = vec![0.0; rows * cols];
    oracle::normalize_rows(&f64s(&x), &mut want, rows, cols, eps as f64);
    let shape = format!(
        "rows {rows}, cols {cols}, eps {eps:e}, {:?}, {:?}",
        c.fill, c.init
    );
    compare("normalize_rows", &shape, &got, &want, Tol::REDUCTION, None)
}

/// A 0/1 mask with about three quarters ones (MAE's ratio) and at least one.
fn loss_mask(rows: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed ^ 0x3a5c);
    let mut mask: Vec<f32> = (0..rows)
        .map(|_| (rng.below(4) != 0) as u32 as f32)
        .collect();
    if mask.iter().all(|&m| m == 0.0) {
        mask[rng.below(rows)] = 1.0;
    }
    mask
}

fn check_masked_mse_forward<B: Backend>(b: &B, c: &RowOpCase) -> Check {
    let (rows, cols) = (c.rows, c.cols);
    let pred = data(c.seed, rows * cols, cols, c.fill);
    let target = data(c.seed ^ 1, rows * cols, cols, c.fill);
    let mask = loss_mask(rows, c.seed);
    let loss0 = old_contents(c.init, 1, c.seed);
    let got = run::masked_mse_forward(b, &pred, &target, &mask, &loss0, rows, cols);
    let mut want = vec![0.0];
    oracle::masked_mse_forward(
        &f64s(&pred),
        &f64s(&target),
        &f64s(&mask),
        &mut want,
        rows,
        cols,
    );
    let shape = format!(
        "rows {rows}, cols {cols}, mask {mask:?}, {:?}, {:?}",
        c.fill, c.init
    );
    compare(
        "masked_mse_forward",
        &shape,
        &got,
        &want,
        Tol::REDUCTION,
        None,
    )
}

fn check_masked_mse_backward<B: Backend>(b: &B, c: &RowOpCase) -> Check {
    let (rows, cols, d_loss) = (c.rows, c.cols, c.param);
    let pred = data(c.seed, rows * cols, cols, c.fill);
    let target = data(c.seed ^ 1, rows * cols, cols, c.fill);
    let mask = loss_mask(rows, c.seed);
    let dp0 = prior(rows * cols, c.seed);
    let got = run::masked_mse_backward(b, &pred, &target, &mask, &dp0, rows, cols, d_loss);
    let (p64, t64, m64) = (f64s(&pred), f64s(&target), f64s(&mask));
    let mut want = f64s(&dp0);
    oracle::masked_mse_backward(&p64, &t64, &m64, &mut want, rows, cols, d_loss);
    let mut grad = vec![0.0; rows * cols];
    oracle::masked_mse_backward(&p64, &t64, &m64, &mut grad, rows, cols, d_loss);
    let mut mag = abs(&dp0);
    oracle::add(&grad.iter().map(|g| g.abs()).collect::<Vec<_>>(), &mut mag);
    let shape = format!(
        "rows {rows}, cols {cols}, d_loss {d_loss}, mask {mask:?}, {:?}",
        c.fill
    );
    compare(
        "masked_mse_backward",
        &shape,
        &got,
        &want,
        Tol::ELEMENTWISE,
        Some(&mag),
    )
}

// ---- adamw --------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct AdamCase {
    len: usize,
    step: AdamWStep,
    seed: u64,
    fill: Fill,
}

/// The constants of one update: learning rates from the paper's range and above, both beta2
/// choices, with and without weight decay, early and late steps (bias correction).
fn adam_step() -> impl Strategy<Value = AdamWStep> {
    (
        select(vec![1e-3f64, 1.5e-4, 0.1]),
        select(vec![(0.9f64, 0.95f64), (0.9, 0.999)]),
        select(vec![0.0f64, 0.05]),
        1u64..=1000,
    )
        .prop_map(|(lr, (b1, b2), wd, t)| AdamWStep::new(lr, b1, b2, 1e-8, wd, t))
}

fn adam_case() -> impl Strategy<Value = AdamCase> {
    (1usize..=300, adam_step(), any::<u64>(), fill()).prop_map(|(len, step, seed, fill)| AdamCase {
        len,
        step,
        seed,
        fill,
    })
}

/// `(param, grad, m, v)` of an AdamW check.
fn adam_inputs(len: usize, seed: u64, fill: Fill) -> [Vec<f32>; 4] {
    let p = data(seed, len, 1, fill);
    let g = data(seed ^ 1, len, 1, fill);
    let m = data(seed ^ 2, len, 1, fill)
        .iter()
        .map(|x| x * 0.1)
        .collect::<Vec<_>>();
    // v is a running mean of squares: non-negative, some exactly zero.
    let v: Vec<f32> = data(seed ^ 3, len, 1, fill)
        .iter()
        .enumerate()
        .map(|(i, x)| if i % 5 == 0 { 0.0 } else { x * x * 0.01 })
        .collect();
    [p, g, m, v]
}

fn check_adamw<B: Backend>(b: &B, c: &AdamCase) -> Check {
    let len = c.len;
    let [p, g, m, v] = adam_inputs(len, c.seed, c.fill);
    let (gp, gm, gv) = run::adamw(b, &p, &g, &m, &v, &c.step);
    let (mut wp, mut wm, mut wv) = (f64s(&p), f64s(&m), f64s(&v));
    oracle::adamw(&mut wp, &f64s(&g), &mut wm, &mut wv, &c.step);
    let shape = format!("len {len}, {:?}, {:?}, seed {}", c.step, c.fill, c.seed);
    compare("adamw param", &shape, &gp, &wp, Tol::ADAMW, None)?;
    compare("adamw m", &shape, &gm, &wm, Tol::ADAMW, None)?;
    compare("adamw v", &shape, &gv, &wv, Tol::ADAMW, None)
}

/// The tensors of one `adamw_many` call, `(length, update)` each (no update: the tensor only
/// has its gradient zeroed): empty and one-element tensors, lengths on both sides of the CUDA
/// kernel's 256-thread blocks and 1024-element chunks and of the CPU's 16,384-element chunks,
/// and any length up to two CUDA chunks.
fn adam_many_case() -> impl Strategy<Value = (Vec<(usize, Option<AdamWStep>)>, u64, Fill)> {
    let edges = select(vec![
        0usize, 1, 255, 256, 257, 1023, 1024, 1025, 16_385, 40_000,
    ]);
    let len = prop_oneof![edges, 0usize..=2100];
    let tensor = (len, proptest::option::of(adam_step()));
    (
        proptest::collection::vec(tensor, 1..=7),
        any::<u64>(),
        fill(),
    )
}

fn check_adamw_many<B: Backend>(
    b: &B,
    (tensors, seed, fill): (Vec<(usize, Option<AdamWStep>)>, u64, Fill),
) -> Check {
    let host: Vec<run::AdamWHost> = tensors
        .iter()
        .enumerate()
        .map(|(k, &(len, step))| {
            let [param, grad, m, v] = adam_inputs(len, seed ^ ((k as u64) << 8), fill);
            run::AdamWHost {
                param,
                grad,
                m,
                v,
                step,
            }
        })
        .collect();
    let one = run::adamw_many(b, &host, true);
    let composed = run::adamw_many(b, &host, false);
    for (k, (one, composed)) in one.iter().zip(&composed).enumerate() {
        let buffers = [
            ("param", &one.param, &composed.param),
            ("grad", &one.grad, &composed.grad),
            ("m", &one.m, &composed.m),
            ("v", &one.v, &composed.v),
        ];
        for (what, got, want) in buffers {
            if let Some(i) = (0..want.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
                return Err(format!(
                    "adamw_many {what} of tensor {k} ({tensors:?}, {fill:?}, seed {seed}): \
                     element {i} is {} in one op, {} from adamw + fill",
                    got[i], want[i]
                ));
            }
        }
    }
    Ok(())
}

// ---- fused attention ----------------------------------------------------------------------------

/// `(batch, heads, tokens, head_dim)` of the fused attention checks: the encoder's 50 and the
/// decoder's 197 tokens, a single token, a count below one tile, and the head widths of the
/// paper's decoder (32) and ViT-B/L (64) and a narrow one (8).
const ATTENTION_SHAPES: [(usize, usize, usize, usize); 7] = [
    (2, 3, 1, 8),
    (1, 2, 7, 32),
    (2, 2, 7, 8),
    (2, 2, 50, 64),
    (3, 1, 50, 32),
    (1, 3, 197, 64),
    (2, 2, 197, 8),
];

/// The composed attention in f64 (the oracle's `split_heads`, `gemm`, `softmax_*`,
/// `merge_heads`, as `mae::model::attention` composes them), and per output the magnitude that
/// bounds its rounding error (see [`check_fused_attention`]).
struct AttentionWant {
    out: Vec<f64>,
    lse: Vec<f64>,
    d_qkv: Vec<f64>,
    out_mag: Vec<f64>,
    lse_mag: Vec<f64>,
    d_qkv_mag: Vec<f64>,
}

fn attention_oracle(qkv: &[f64], d_out: &[f64], a: &Attention) -> AttentionWant {
    let (n, t, hd, dim) = (a.batch * a.heads, a.tokens, a.head_dim, a.dim());
    let view = |row_width, col_offset| a.heads(row_width, col_offset);
    let per_head = |m, nn, k| Gemm::new(m, nn, k).batched(n, m * k, k * nn, m * nn);
    let split = |x: &[f64], h: &Heads| {
        let mut y = vec![0.0; n * t * hd];
        oracle::split_heads(x, &mut y, h);
        y
    };
    let (q, k, v) = (
        split(qkv, &view(3 * dim, 0)),
        split(qkv, &view(3 * dim, dim)),
        split(qkv, &view(3 * dim, 2 * dim)),
    );
    let d_heads = split(d_out, &view(dim, 0));
    let mut scores = vec![0.0; n * t * t];
    oracle::gemm(&per_head(t, t, hd).trans_b(), &q, &k, &mut scores);
    let mut att = vec![0.0; n * t * t];
    oracle::softmax_forward(&scores, &mut att, n * t, t, a.scale);
    let mut heads_out = vec![0.0; n * t * hd];
    oracle::gemm(&per_head(t, hd, t), &att, &v, &mut heads_out);
    let mut d_att = vec![0.0; n * t * t];
    oracle::gemm(&per_head(t, t, hd).trans_b(), &d_heads, &v, &mut d_att);
    let mut d_v = vec![0.0; n * t * hd];
    oracle::gemm(&per_head(t, hd, t).trans_a(), &att, &d_heads, &mut d_v);
    let mut d_scores = vec![0.0; n * t * t];
    oracle::softmax_backward(&att, &d_att, &mut d_scores, n * t, t, a.scale);
    let (mut d_q, mut d_k) = (vec![0.0; n * t * hd], vec![0.0; n * t * hd]);
    oracle::gemm(&per_head(t, hd, t), &d_scores, &k, &mut d_q);
    oracle::gemm(&per_head(t, hd, t).trans_a(), &d_scores, &q, &mut d_k);

    let s = a.scale as f64;
    let mut lse = vec![0.0; n * t];
    for (r, l) in lse.iter_mut().enumerate() {
        let row = &scores[r * t..(r + 1) * t];
        let max = row.iter().map(|x| s * x).fold(f64::NEG_INFINITY, f64::max);
        *l = max + row.iter().map(|x| (s * x - max).exp()).sum::<f64>().ln();
    }
    // The magnitudes: each output evaluated with every operand replaced by its absolute value
    // and every difference by a sum, times `c_i = 1 + max_j |scale| sum |q_i| |k_j|`, the
    // magnitude of the error of score row i (which multiplies its probabilities).
    let (mut out_mag, mut lse_mag) = (vec![0.0; n * t * hd], vec![0.0; n * t]);
    let (mut dq_mag, mut dk_mag, mut dv_mag) = (
        vec![0.0; n * t * hd],
        vec![0.0; n * t * hd],
        vec![0.0; n * t * hd],
    );
    let dot_abs = |x: &[f64], y: &[f64]| x.iter().zip(y).map(|(x, y)| (x * y).abs()).sum::<f64>();
    for g in 0..n {
        let row = |i: usize| (g * t + i) * hd..(g * t + i + 1) * hd;
        for i in 0..t {
            let (qi, doi) = (&q[row(i)], &d_heads[row(i)]);
            let c = 1.0
                + (0..t)
                    .map(|j| s.abs() * dot_abs(qi, &k[row(j)]))
                    .fold(0.0, f64::max);
            lse_mag[g * t + i] = c;
            let p = |j: usize| att[(g * t + i) * t + j];
            let dp_abs: Vec<f64> = (0..t).map(|j| dot_abs(doi, &v[row(j)])).collect();
            let drow_abs: f64 = (0..t).map(|j| p(j) * dp_abs[j]).sum();
            for (j, dp) in dp_abs.iter().enumerate() {
                let (pc, ds) = (c * p(j), c * p(j) * (dp + drow_abs));
                for col in 0..hd {
                    let (ii, jj) = ((g * t + i) * hd + col, (g * t + j) * hd + col);
                    out_mag[ii] += pc * v[jj].abs();
                    dq_mag[ii] += s.abs() * ds * k[jj].abs();
                    dk_mag[jj] += s.abs() * ds * q[ii].abs();
                    dv_mag[jj] += pc * d_heads[ii].abs();
                }
            }
        }
    }
    let merge = |parts: [&[f64]; 3], width: usize| {
        let mut x = vec![0.0; a.batch * t * width];
        for (part, m) in parts.iter().enumerate() {
            oracle::merge_heads(m, &mut x, &view(width, part * dim));
        }
        x
    };
    let merge1 = |m: &[f64]| {
        let mut x = vec![0.0; a.batch * t * dim];
        oracle::merge_heads(m, &mut x, &view(dim, 0));
        x
    };
    AttentionWant {
        out: merge1(&heads_out),
        lse,
        d_qkv: merge([&d_q, &d_k, &d_v], 3 * dim),
        out_mag: merge1(&out_mag),
        lse_mag,
        d_qkv_mag: merge([&dq_mag, &dk_mag, &dv_mag], 3 * dim),
    }
}

/// `attention_forward` and `attention_backward` against the composed attention in f64, on
/// backends that have them. The fused kernels accumulate in f32 in a different order than the
/// composed ops (online softmax, recomputed probabilities), so the bound is the standard one for
/// f32 sums rather than bitwise equality: per element `(T + hd) eps_f32` times the magnitude
/// `attention_oracle` computes (each output is a sum over T rows of dot products of hd terms,
/// with the scores' rounding multiplying every probability), plus `1e-5` relative. Outputs start
/// as NaN: the ops overwrite. The backward runs on the backend's own forward results, as the
/// model does, and twice, bitwise equal.
fn check_fused_attention<B: Backend>(b: &B) -> Check {
    check_fused_attention_of(b, |x| x, 0.0)
}

/// [`check_fused_attention`] on inputs passed through `round` (which the backend's own rounding
/// then leaves unchanged), with `extra` more relative error per unit of magnitude: for kernels
/// that round the probabilities and score gradients before their products.
fn check_fused_attention_of<B: Backend>(b: &B, round: fn(f32) -> f32, extra: f64) -> Check {
    let mut skipped = Vec::new();
    for (i, &(batch, heads, tokens, head_dim)) in ATTENTION_SHAPES.iter().enumerate() {
        let a = Attention {
            batch,
            tokens,
            heads,
            head_dim,
            scale: 1.0 / (head_dim as f32).sqrt(),
        };
        if !b.fused_attention(&a) {
            skipped.push(format!("{a:?}"));
            continue;
        }
        let shape = format!("N{batch} H{heads} T{tokens} hd{head_dim}");
        let (lq, lo, ll) = a.lens();
        let rounded = |x: Vec<f32>| x.into_iter().map(round).collect::<Vec<_>>();
        let qkv = rounded(data(100 + i as u64, lq, 3 * a.dim(), Fill::Uniform));
        let d_out = rounded(data(200 + i as u64, lo, a.dim(), Fill::Uniform));
        let want = attention_oracle(&f64s(&qkv), &f64s(&d_out), &a);
        let tol = Tol {
            atol: (tokens + head_dim) as f64 * f32::EPSILON as f64 + extra,
            rtol: 1e-5,
        };
        let qkv_b = up(b, &qkv);
        let (mut out, mut lse) = (up(b, &vec![f32::NAN; lo]), up(b, &vec![f32::NAN; ll]));
        b.attention_forward(&qkv_b, &mut out, &mut lse, &a)
            .map_err(|e| format!("attention_forward [{shape}]: {e}"))?;
        let out_h = down(b, &out);
        compare(
            "attention_forward out",
            &shape,
            &out_h,
            &want.out,
            tol,
            Some(&want.out_mag),
        )?;
        compare(
            "attention_forward lse",
            &shape,
            &down(b, &lse),
            &want.lse,
            tol,
            Some(&want.lse_mag),
        )?;
        let d_out_b = up(b, &d_out);
        let backward = || -> Result<Vec<f32>, String> {
            let mut d_qkv = up(b, &vec![f32::NAN; lq]);
            b.attention_backward(&qkv_b, &out, &lse, &d_out_b, &mut d_qkv, &a)
                .map_err(|e| format!("attention_backward [{shape}]: {e}"))?;
            Ok(down(b, &d_qkv))
        };
        let d_qkv = backward()?;
        compare(
            "attention_backward d_qkv",
            &shape,
            &d_qkv,
            &want.d_qkv,
            tol,
            Some(&want.d_qkv_mag),
        )?;
        if backward()?
            .iter()
            .map(|x| x.to_bits())
            .ne(d_qkv.iter().map(|x| x.to_bits()))
        {
            return Err(format!("attention_backward [{shape}]: two runs differ"));
        }
    }
    if !skipped.is_empty() {
        // Straight to stderr, as `backends::skip` does: libtest captures `eprintln!`.
        let _ = writeln!(
            std::io::stderr(),
            "SKIP {} fused attention for {} of {} shapes: the backend composes attention \
             (fused_attention is false)",
            b.name(),
            skipped.len(),
            ATTENTION_SHAPES.len()
        );
    }
    Ok(())
}

// ---- fixed cases ----------------------------------------------------------------------------------

/// Shapes that broke other projects' GEMMs (burn: `(1, 128, 512)` transposed, `(1024, 64, 8)`)
/// and the shapes of an MAE step (tokens x dim x 3 dim, per-head attention products).
fn check_gemm_fixed<B: Backend>(b: &B) -> Check {
    let shapes = [
        (1, 128, 512, 1),
        (1024, 64, 8, 1),
        (130, 192, 64, 1),
        (65, 65, 16, 3),
        (17, 17, 32, 6),
    ];
    for (i, &(m, n, k, batch)) in shapes.iter().enumerate() {
        for (trans_a, trans_b) in [(false, false), (false, true), (true, false), (true, true)] {
            let c = GemmCase {
                m,
                n,
                k,
                trans_a,
                trans_b,
                alpha: 1.0,
                beta: if i % 2 == 0 { 0.0 } else { 1.0 },
                batch,
                bcast_a: false,
                bcast_b: i == 4,
                pad: 0,
                seed: i as u64,
                fill: Fill::Uniform,
            };
            check_gemm(b, &c)?;
        }
    }
    Ok(())
}

/// The bias-add map of `RowMap::bias`, the cls-token prepend, and a position-table add.
fn check_copy_rows_fixed<B: Backend>(b: &B) -> Check {
    let maps = [
        RowMap::bias(37, 33),
        // cls token: one shared row to row 0 of each of 3 sequences of 5 tokens.
        RowMap {
            batch: 3,
            count: 1,
            cols: 8,
            src_stride: 0,
            src_start: 0,
            src_step: 0,
            dst_stride: 5,
            dst_start: 0,
        },
        // pos table rows 1..5 onto tokens 1..5 of each sequence.
        RowMap {
            batch: 3,
            count: 4,
            cols: 8,
            src_stride: 0,
            src_start: 1,
            src_step: 1,
            dst_stride: 5,
            dst_start: 1,
        },
        // Broadcasts over more rows than one partial sum of a two-pass column sum (64 in
        // wgpu's): a bias over 300 rows, a cls token over 150 sequences, and one row onto 130
        // rows of one batch item read through a source stride.
        RowMap::bias(300, 33),
        RowMap {
            batch: 150,
            count: 1,
            cols: 8,
            src_stride: 0,
            src_start: 0,
            src_step: 0,
            dst_stride: 5,
            dst_start: 0,
        },
        RowMap {
            batch: 1,
            count: 130,
            cols: 5,
            src_stride: 3,
            src_start: 2,
            src_step: 0,
            dst_stride: 140,
            dst_start: 4,
        },
    ];
    for (i, map) in maps.into_iter().enumerate() {
        for accumulate in [false, true] {
            let c = RowsCase {
                map,
                tail: 0,
                accumulate,
                seed: i as u64,
                fill: Fill::Uniform,
                init: Init::Nan,
            };
            check_copy_rows(b, &c)?;
            check_copy_rows_backward(b, &c)?;
        }
    }
    Ok(())
}

// ---- memory ops ---------------------------------------------------------------------------------

fn check_memory<B: Backend>(b: &B) -> Check {
    let special = [
        0.0f32,
        -0.0,
        1.0,
        -1.5,
        f32::MIN_POSITIVE / 4.0,
        f32::MAX,
        f32::INFINITY,
        f32::NAN,
        3.25e-7,
    ];
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();

    let empty = b.alloc(0).map_err(|e| format!("alloc(0): {e}"))?;
    if b.len(&empty) != 0 {
        return Err(format!("alloc(0): len {}", b.len(&empty)));
    }
    let z = b.alloc(13).map_err(|e| e.to_string())?;
    if b.len(&z) != 13 || down(b, &z) != vec![0.0; 13] {
        return Err(format!(
            "alloc(13): len {}, contents {:?}",
            b.len(&z),
            down(b, &z)
        ));
    }
    let mut buf = up(b, &special);
    if bits(&down(b, &buf)) != bits(&special) {
        return Err(format!(
            "upload/download round trip changed bits: {:?}",
            down(b, &buf)
        ));
    }
    let other: Vec<f32> = (0..special.len()).map(|i| i as f32 * 0.5 - 1.0).collect();
    b.write(&mut buf, &other).map_err(|e| e.to_string())?;
    if bits(&down(b, &buf)) != bits(&other) {
        return Err(format!("write: {:?}, want {other:?}", down(b, &buf)));
    }
    b.fill(&mut buf, -2.5).map_err(|e| e.to_string())?;
    if down(b, &buf) != vec![-2.5; special.len()] {
        return Err(format!("fill(-2.5): {:?}", down(b, &buf)));
    }
    let src = up(b, &special);
    b.copy(&src, &mut buf).map_err(|e| e.to_string())?;
    if bits(&down(b, &buf)) != bits(&special) {
        return Err(format!("copy: {:?}", down(b, &buf)));
    }
    b.sync().map_err(|e| e.to_string())?;

    // Index buffers: upload_idx, idx_len and write_idx, observed through a gather.
    let g = Gather {
        batch: 1,
        count: 3,
        cols: 2,
        src_rows: 4,
        src_stride: 4,
        src_start: 0,
        dst_rows: 3,
        dst_start: 0,
    };
    let rows = up(b, &[0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5]);
    let mut idx = up_idx(b, &[3, 1, 0]);
    if b.idx_len(&idx) != 3 {
        return Err(format!("idx_len: {}", b.idx_len(&idx)));
    }
    let mut dst = b.alloc(6).map_err(|e| e.to_string())?;
    b.gather_rows(&rows, &idx, &mut dst, &g)
        .map_err(|e| e.to_string())?;
    if down(b, &dst) != [3.0, 3.5, 1.0, 1.5, 0.0, 0.5] {
        return Err(format!("gather with idx [3, 1, 0]: {:?}", down(b, &dst)));
    }
    b.write_idx(&mut idx, &[2, 0, 3])
        .map_err(|e| e.to_string())?;
    b.gather_rows(&rows, &idx, &mut dst, &g)
        .map_err(|e| e.to_string())?;
    if down(b, &dst) != [2.0, 2.5, 0.0, 0.5, 3.0, 3.5] {
        return Err(format!(
            "gather after write_idx [2, 0, 3]: {:?}",
            down(b, &dst)
        ));
    }
    Ok(())
}

/// A buffer rewritten from the host several times, each contents read by an op queued before
/// the next write, without a sync in between: every op sees the contents written just before
/// it. The sizes are those of a step's inputs, large enough that the CUDA backend stages them
/// in pinned memory from the second write on, so on a GPU this checks that a write does not
/// refill the staging while the copy of the previous one may still be reading it.
fn check_rewrites<B: Backend>(b: &B) -> Check {
    let fail = |e: mae::backend::BackendError| e.to_string();
    // 256 KiB of floats; 64 KiB of indices (16,384 rows of 4 floats gathered).
    let (rows, cols) = (16_384, 4);
    let contents = |k: usize| data(40 + k as u64, rows * cols, cols, Fill::Uniform);
    let mut src = b.alloc(rows * cols).map_err(fail)?;
    let mut copies = Vec::new();
    for k in 0..4 {
        b.write(&mut src, &contents(k)).map_err(fail)?;
        let mut copy = b.alloc(rows * cols).map_err(fail)?;
        b.copy(&src, &mut copy).map_err(fail)?;
        copies.push(copy);
    }
    for (k, copy) in copies.iter().enumerate() {
        if down(b, copy) != contents(k) {
            return Err(format!(
                "write {k} of {}: an op queued after it read other contents",
                rows * cols
            ));
        }
    }
    // Index buffers: rewrite k gathers row r (2k + 1) mod rows into row r, a permutation of
    // its own (odd multipliers, rows a power of two).
    let g = Gather {
        batch: 1,
        count: rows,
        cols,
        src_rows: rows,
        src_stride: rows,
        src_start: 0,
        dst_rows: rows,
        dst_start: 0,
    };
    let table = up(b, &contents(0));
    let order = |k: usize| -> Vec<u32> {
        (0..rows as u32)
            .map(|r| (r * (2 * k as u32 + 1)) % rows as u32)
            .collect()
    };
    let mut idx = up_idx(b, &order(0));
    let mut gathered = Vec::new();
    for k in 1..5 {
        b.write_idx(&mut idx, &order(k)).map_err(fail)?;
        let mut dst = b.alloc(rows * cols).map_err(fail)?;
        b.gather_rows(&table, &idx, &mut dst, &g).map_err(fail)?;
        gathered.push(dst);
    }
    let host = contents(0);
    for (k, dst) in (1..5).zip(&gathered) {
        let want: Vec<f32> = order(k)
            .iter()
            .flat_map(|&r| {
                host[r as usize * cols..(r as usize + 1) * cols]
                    .iter()
                    .copied()
            })
            .collect();
        if down(b, dst) != want {
            return Err(format!(
                "write_idx {k}: the gather queued after it read other indices"
            ));
        }
    }
    Ok(())
}

/// A buffer from `alloc_operand` beside one from `alloc`, both written by the producers the
/// model gives such buffers (`gelu_forward`, `bias_gelu_forward`, `gemm_bias_gelu` as the MLP
/// calls it, `layernorm_forward` before qkv and fc1, the overwriting `gelu_backward` that gives
/// fc1's dY): the GEMMs that read them (a Linear layer's forward as A, its weight gradient as
/// B) give bitwise the same products, and every other read (a download, a bias gradient's column
/// sums, an accumulating op) sees `stored` of the values, the rounding the backend may keep them
/// at (the identity where it keeps the floats). Twice, so a second contents replaces the first,
/// and the products are taken again after the reads. Then the same for the fused attention's
/// backward, which overwrites the qkv Linear's dY (`check_operand_attention_gradient`), and
/// for its forward, whose output `proj` and the backward read (`check_operand_attention_output`).
fn check_operand_buffers<B: Backend>(b: &B, stored: fn(f32) -> f32) -> Check {
    let fail = |e: mae::backend::BackendError| e.to_string();
    // 640 token rows, 512 hidden features, 640 outputs. These products do 569-640 FLOPs per
    // operand element, above the CUDA bf16 mode's copy threshold (512), so they multiply bf16
    // copies, as the Linear layers of ViT-B and larger do: the plain buffer's rounded to
    // nearest by `round_to_bf16`, the operand buffer's written so by its producer, hence
    // bitwise one product. Below the threshold cuBLAS's FAST_16BF would round the plain
    // buffer's floats its own way, not always to nearest (docs/results-gpu.md).
    let (rows, hidden, out) = (640, 512, 640);
    let n = rows * hidden;
    let host = |seed: u64, len: usize, cols: usize| data(seed, len, cols, Fill::Uniform);
    let (w2, dy) = (
        up(b, &host(50, out * hidden, hidden)),
        up(b, &host(51, rows * out, out)),
    );
    let forward = Gemm::new(rows, out, hidden).trans_b();
    let weight_grad = Gemm::new(out, hidden, rows).trans_a();
    let products = |act: &B::Buf| -> Result<[Vec<f32>; 2], String> {
        let mut y = up(b, &vec![f32::NAN; rows * out]);
        let mut dw = up(b, &vec![f32::NAN; out * hidden]);
        b.gemm(&forward, act, &w2, &mut y).map_err(fail)?;
        b.gemm(&weight_grad, &dy, act, &mut dw).map_err(fail)?;
        Ok([down(b, &y), down(b, &dw)])
    };
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let (mut plain, mut operand) = (b.alloc(n).map_err(fail)?, b.alloc_operand(n).map_err(fail)?);
    let bias = up(b, &host(52, hidden, hidden));
    let (x, w1) = (
        up(b, &host(53, rows * 64, 64)),
        up(b, &host(54, hidden * 64, 64)),
    );
    let fc1 = Gemm::new(rows, hidden, 64).trans_b();
    let (gamma, beta) = (
        up(b, &host(55, hidden, hidden)),
        up(b, &host(56, hidden, hidden)),
    );
    let (mut mean, mut rstd) = (b.alloc(rows).map_err(fail)?, b.alloc(rows).map_err(fail)?);
    let d_act = up(b, &host(57, n, hidden));
    let producers = [
        "gelu_forward",
        "bias_gelu_forward",
        "gemm_bias_gelu",
        "layernorm_forward",
        "gelu_backward",
    ];
    for (k, producer) in producers.iter().enumerate() {
        for act in [&mut plain, &mut operand] {
            let pre0 = host(60 + k as u64, n, hidden);
            let mut pre = up(b, &pre0);
            let r = match k {
                0 => b.gelu_forward(&pre, act),
                1 => b.bias_gelu_forward(&bias, &mut pre, act, rows, hidden),
                2 => b.gemm_bias_gelu(&fc1, &x, &w1, &bias, &mut pre, act),
                3 => b.layernorm_forward(
                    &pre, &gamma, &beta, act, &mut mean, &mut rstd, rows, hidden, 1e-6,
                ),
                _ => b.gelu_backward(&pre, &d_act, act, false),
            };
            r.map_err(fail)?;
        }
        let want = products(&plain)?;
        if products(&operand)?.map(|p| bits(&p)) != want.clone().map(|p| bits(&p)) {
            return Err(format!(
                "{producer}: a product of the operand buffer differs from the plain one's"
            ));
        }
        let stored_values: Vec<f32> = down(b, &plain).into_iter().map(stored).collect();
        if bits(&down(b, &operand)) != bits(&stored_values) {
            return Err(format!(
                "{producer}: the operand buffer's download is not the stored values"
            ));
        }
        if products(&operand)?.map(|p| bits(&p)) != want.map(|p| bits(&p)) {
            return Err(format!("{producer}: a product after the download differs"));
        }
    }
    // A bias gradient of the buffer (the column sums of fc1's dY, the GELU gradient) sums the
    // stored values, read before anything else touched them.
    let fresh = up(b, &host(69, n, hidden));
    b.gelu_backward(&fresh, &d_act, &mut operand, false)
        .map_err(fail)?;
    b.gelu_backward(&fresh, &d_act, &mut plain, false)
        .map_err(fail)?;
    let stored_values: Vec<f32> = down(b, &plain).into_iter().map(stored).collect();
    let bias0 = host(68, hidden, hidden);
    let (mut got, mut want) = (up(b, &bias0), up(b, &bias0));
    let sums = RowMap::bias(rows, hidden);
    b.copy_rows_backward(&operand, &mut got, &sums)
        .map_err(fail)?;
    b.copy_rows_backward(&up(b, &stored_values), &mut want, &sums)
        .map_err(fail)?;
    if bits(&down(b, &got)) != bits(&down(b, &want)) {
        return Err("the bias gradient of the operand buffer summed other values".into());
    }
    // Ops that read and write the buffer (an accumulating bias add; fc1's product accumulated
    // into it, beta 1) start from the stored values, each after a fresh GELU.
    for (seed, what) in [(70, "copy_rows"), (71, "a GEMM")] {
        let fresh = up(b, &host(seed, n, hidden));
        b.gelu_forward(&fresh, &mut operand).map_err(fail)?;
        b.gelu_forward(&fresh, &mut plain).map_err(fail)?;
        let stored_values: Vec<f32> = down(b, &plain).into_iter().map(stored).collect();
        let mut expect = up(b, &stored_values);
        for buf in [&mut operand, &mut expect] {
            let r = match seed {
                70 => b.copy_rows(&bias, buf, &RowMap::bias(rows, hidden), true),
                _ => b.gemm(&fc1.accumulate(), &x, &w1, buf),
            };
            r.map_err(fail)?;
        }
        if bits(&down(b, &operand)) != bits(&down(b, &expect)) {
            return Err(format!(
                "{what} accumulating into the operand buffer read other values"
            ));
        }
    }
    check_operand_attention_gradient(b, stored)?;
    check_operand_attention_output(b, stored)
}

/// The fused attention as the model runs it, every buffer from `alloc_operand`: qkv and dO
/// written by products (the qkv Linear's output, the proj Linear's input gradient), `out` by the
/// forward, the backward reading all three (`out` as O of `dO . O`); beside the same ops on
/// plain buffers holding the `stored` values of the operand ones. The forward's output and the
/// gradients are bitwise the same, and so is `proj`'s product of `out` (sizes that the CUDA
/// bf16 mode runs on bf16 copies, where it keeps every one of these buffers as its copy alone
/// and runs the kernels that read copies).
fn check_operand_attention_output<B: Backend>(b: &B, stored: fn(f32) -> f32) -> Check {
    let fail = |e: mae::backend::BackendError| e.to_string();
    // 1,280 token rows, 12 heads of 32 (384 features); qkv from 64 features, dO from 256.
    // FLOPs per operand element: the qkv product 1,212, dO's 591, proj's (384 -> 1,024) 1,138.
    let Some(a) = fused_heads_of_32(b, 10, 12) else {
        return Ok(());
    };
    let (rows, dim, feats) = (a.batch * a.tokens, a.dim(), 1024);
    let host = |seed: u64, len: usize, cols: usize| data(seed, len, cols, Fill::Uniform);
    let (x, w_qkv) = (
        up(b, &host(90, rows * 64, 64)),
        up(b, &host(91, 3 * dim * 64, 64)),
    );
    let (dy, w_dout) = (
        up(b, &host(92, rows * 256, 256)),
        up(b, &host(93, dim * 256, 256)),
    );
    let w_proj = up(b, &host(94, feats * dim, dim));
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let proj = |out: &B::Buf| -> Result<Vec<u32>, String> {
        let mut y = up(b, &vec![f32::NAN; rows * feats]);
        b.gemm(&Gemm::new(rows, feats, dim).trans_b(), out, &w_proj, &mut y)
            .map_err(fail)?;
        Ok(bits(&down(b, &y)))
    };
    let operand = |len: usize| b.alloc_operand(len).map_err(fail);
    let (mut qkv, mut d_out, mut out) = (
        operand(rows * 3 * dim)?,
        operand(rows * dim)?,
        operand(rows * dim)?,
    );
    let mut d_qkv = operand(rows * 3 * dim)?;
    b.gemm(
        &Gemm::new(rows, 3 * dim, 64).trans_b(),
        &x,
        &w_qkv,
        &mut qkv,
    )
    .map_err(fail)?;
    b.gemm(
        &Gemm::new(rows, dim, 256).trans_b(),
        &dy,
        &w_dout,
        &mut d_out,
    )
    .map_err(fail)?;
    let mut lse = b.alloc(a.batch * a.heads * a.tokens).map_err(fail)?;
    b.attention_forward(&qkv, &mut out, &mut lse, &a)
        .map_err(fail)?;
    b.attention_backward(&qkv, &out, &lse, &d_out, &mut d_qkv, &a)
        .map_err(fail)?;
    let proj_of_operand = proj(&out)?;
    // The plain run, on the values the operand buffers hold (their downloads, read only now:
    // a read of the floats may end a buffer's keeping its copy alone).
    let stored_of = |buf: &B::Buf| -> Vec<f32> { down(b, buf).into_iter().map(stored).collect() };
    let plain_qkv = up(b, &stored_of(&qkv));
    let plain_d_out = up(b, &stored_of(&d_out));
    let mut plain_out = up(b, &vec![f32::NAN; rows * dim]);
    let mut plain_lse = up(b, &vec![f32::NAN; a.batch * a.heads * a.tokens]);
    b.attention_forward(&plain_qkv, &mut plain_out, &mut plain_lse, &a)
        .map_err(fail)?;
    if bits(&stored_of(&out)) != bits(&stored_of(&plain_out)) {
        return Err(
            "attention_forward: the operand out holds other values than the plain one's".into(),
        );
    }
    if proj(&plain_out)? != proj_of_operand {
        return Err("attention_forward: proj's product of the operand out differs".into());
    }
    let plain_out = up(b, &stored_of(&out));
    let mut plain_d_qkv = up(b, &vec![f32::NAN; rows * 3 * dim]);
    b.attention_backward(
        &plain_qkv,
        &plain_out,
        &plain_lse,
        &plain_d_out,
        &mut plain_d_qkv,
        &a,
    )
    .map_err(fail)?;
    if bits(&stored_of(&d_qkv)) != bits(&stored_of(&plain_d_qkv)) {
        return Err("attention_backward: the operand buffers gave other gradients".into());
    }
    Ok(())
}

/// Attention over `batch` images of 128 tokens in `heads` heads of 32 (the decoder's width),
/// where `b` has a fused attention for it.
fn fused_heads_of_32<B: Backend>(b: &B, batch: usize, heads: usize) -> Option<Attention> {
    let a = Attention {
        batch,
        tokens: 128,
        heads,
        head_dim: 32,
        scale: 32f32.powf(-0.5),
    };
    b.fused_attention(&a).then_some(a)
}

/// `d_qkv` from `alloc_operand` beside one from `alloc`, both overwritten by the fused
/// attention's backward (where the backend has one): the qkv Linear's two gradient products
/// (`dX = dY W` and `dW = dY^T X`, sizes that the CUDA bf16 mode runs on bf16 copies) are
/// bitwise the same, the download and the bias gradient's column sums see `stored` values.
fn check_operand_attention_gradient<B: Backend>(b: &B, stored: fn(f32) -> f32) -> Check {
    let fail = |e: mae::backend::BackendError| e.to_string();
    // 640 token rows, 6 heads of 32 (the decoder's width): d_qkv is 640 x 576; the products
    // do 640 and 606 FLOPs per operand element.
    let Some(a) = fused_heads_of_32(b, 5, 6) else {
        return Ok(());
    };
    let (rows, dim, feats) = (a.batch * a.tokens, a.dim(), 640);
    let host = |seed: u64, len: usize, cols: usize| data(seed, len, cols, Fill::Uniform);
    let qkv = up(b, &host(80, rows * 3 * dim, 3 * dim));
    let d_out = up(b, &host(81, rows * dim, dim));
    let (w, x) = (
        up(b, &host(82, 3 * dim * feats, feats)),
        up(b, &host(83, rows * feats, feats)),
    );
    let mut out = b.alloc(rows * dim).map_err(fail)?;
    let mut lse = b.alloc(a.batch * a.heads * a.tokens).map_err(fail)?;
    b.attention_forward(&qkv, &mut out, &mut lse, &a)
        .map_err(fail)?;
    let input_grad = Gemm::new(rows, feats, 3 * dim);
    let weight_grad = Gemm::new(3 * dim, feats, rows).trans_a();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let products = |d_qkv: &B::Buf| -> Result<[Vec<u32>; 2], String> {
        let mut dx = up(b, &vec![f32::NAN; rows * feats]);
        let mut dw = up(b, &vec![f32::NAN; 3 * dim * feats]);
        b.gemm(&input_grad, d_qkv, &w, &mut dx).map_err(fail)?;
        b.gemm(&weight_grad, d_qkv, &x, &mut dw).map_err(fail)?;
        Ok([bits(&down(b, &dx)), bits(&down(b, &dw))])
    };
    let mut plain = up(b, &vec![f32::NAN; rows * 3 * dim]);
    let mut operand = b.alloc_operand(rows * 3 * dim).map_err(fail)?;
    for d_qkv in [&mut plain, &mut operand] {
        b.attention_backward(&qkv, &out, &lse, &d_out, d_qkv, &a)
            .map_err(fail)?;
    }
    let want = products(&plain)?;
    if products(&operand)? != want {
        return Err("attention_backward: a product of the operand d_qkv differs".into());
    }
    let stored_values: Vec<f32> = down(b, &plain).into_iter().map(stored).collect();
    let sums = RowMap::bias(rows, 3 * dim);
    let (mut got, mut expect) = (up(b, &vec![0.0; 3 * dim]), up(b, &vec![0.0; 3 * dim]));
    b.copy_rows_backward(&operand, &mut got, &sums)
        .map_err(fail)?;
    b.copy_rows_backward(&up(b, &stored_values), &mut expect, &sums)
        .map_err(fail)?;
    if bits(&down(b, &got)) != bits(&down(b, &expect)) {
        return Err(
            "attention_backward: the operand d_qkv's column sums summed other values".into(),
        );
    }
    if bits(&down(b, &operand)) != bits(&stored_values) {
        return Err(
            "attention_backward: the operand d_qkv's download is not the stored values".into(),
        );
    }
    if products(&operand)? != want {
        return Err("attention_backward: a product after the download differs".into());
    }
    Ok(())
}

/// Products into buffers from `alloc_operand` (fc1's `pre` through `gemm`, `gemm_bias` and
/// `gemm_bias_gelu`; fc2's input gradient `d_act` through `gemm`; qkv's and fc1's input
/// gradients, a LayerNorm's dy, through `gemm`), then the GELU and its gradient reading them (one
/// buffer as both `x` and `dy`) and the LayerNorm backward reading them as dy, all before
/// anything else reads the buffer:
/// the stored values are `stored` values within the GEMM's tolerance and one `stored` rounding
/// (2^-8 relative) of the plain buffer's (and, where a bias is added, one of the bias's), and
/// the ops that read them give bitwise what they give on a plain buffer holding those values.
fn check_operand_products<B: Backend>(b: &B, stored: fn(f32) -> f32) -> Check {
    let fail = |e: mae::backend::BackendError| e.to_string();
    // 1,024 x 768 outputs over k = 64: 877 FLOPs per operand element, a product that the CUDA
    // bf16 mode runs on bf16 copies.
    let (rows, cols, k) = (1024, 768, 64);
    let n = rows * cols;
    let host = |seed: u64, len: usize, c: usize| data(seed, len, c, Fill::Uniform);
    let (hx, hw, hbias) = (
        host(80, rows * k, k),
        host(81, cols * k, k),
        host(82, cols, cols),
    );
    let (x, w, bias) = (up(b, &hx), up(b, &hw), up(b, &hbias));
    let g = Gemm::new(rows, cols, k).trans_b();
    let tol = Tol::gemm(k, max_abs(&f64s(&hx)), max_abs(&f64s(&hw)));
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    // A LayerNorm whose output gradient the product is (qkv's or fc1's input gradient in a
    // block): its input, weight and statistics.
    let (ln_x, gamma) = (up(b, &host(83, n, cols)), up(b, &host(84, cols, cols)));
    let (mut mean, mut rstd) = (b.alloc(rows).map_err(fail)?, b.alloc(rows).map_err(fail)?);
    let mut ln_y = b.alloc(n).map_err(fail)?;
    b.layernorm_forward(
        &ln_x, &gamma, &gamma, &mut ln_y, &mut mean, &mut rstd, rows, cols, 1e-6,
    )
    .map_err(fail)?;
    let ln_backward = |dy: &B::Buf| -> Result<[Vec<u32>; 3], String> {
        let mut dx = up(b, &vec![0.5; n]);
        let (mut dg, mut db) = (up(b, &vec![0.0; cols]), up(b, &vec![0.0; cols]));
        b.layernorm_backward(
            dy, &ln_x, &gamma, &mean, &rstd, &mut dx, &mut dg, &mut db, rows, cols,
        )
        .map_err(fail)?;
        Ok([
            bits(&down(b, &dx)),
            bits(&down(b, &dg)),
            bits(&down(b, &db)),
        ])
    };
    for (i, producer) in ["gemm", "gemm_bias", "gemm_bias_gelu"].iter().enumerate() {
        let (mut plain, mut operand) =
            (b.alloc(n).map_err(fail)?, b.alloc_operand(n).map_err(fail)?);
        let (mut act_plain, mut act) = (b.alloc(n).map_err(fail)?, b.alloc(n).map_err(fail)?);
        for (pre, act) in [(&mut plain, &mut act_plain), (&mut operand, &mut act)] {
            match i {
                0 => b.gemm(&g, &x, &w, pre),
                1 => b.gemm_bias(&g, &x, &w, &bias, pre),
                _ => b.gemm_bias_gelu(&g, &x, &w, &bias, pre, act),
            }
            .map_err(fail)?;
        }
        if i < 2 {
            b.gelu_forward(&operand, &mut act).map_err(fail)?;
        }
        let mut grad = b.alloc(n).map_err(fail)?;
        b.gelu_backward(&operand, &operand, &mut grad, false)
            .map_err(fail)?;
        let ln = ln_backward(&operand)?;
        // Only now the floats: the stored values, a rounding of the plain product's.
        let values = down(b, &operand);
        if let Some(j) = (0..n).find(|&j| stored(values[j]).to_bits() != values[j].to_bits()) {
            return Err(format!(
                "{producer}: element {j} of the operand buffer, {}, is not a stored value",
                values[j]
            ));
        }
        let plain_values = f64s(&down(b, &plain));
        // A stored output takes the bias stored too, as cuBLASLt adds it to a bf16 D (and
        // PyTorch's autocast Linear layers): one more rounding, of the bias alone.
        let rounds = stored(1.0 + f32::EPSILON) != 1.0 + f32::EPSILON;
        let bias_rounding = match (i, rounds) {
            (1 | 2, true) => 2f64.powi(-9) * max_abs(&f64s(&hbias)),
            _ => 0.0,
        };
        let rounding = Tol {
            atol: tol.atol + bias_rounding,
            rtol: tol.rtol + 2f64.powi(-8),
        };
        compare(
            producer,
            "into alloc_operand",
            &values,
            &plain_values,
            rounding,
            None,
        )?;
        // The reads of the operand buffer against the same ops on a plain buffer of its values.
        let same = up(b, &values);
        let (mut act_want, mut grad_want) = (b.alloc(n).map_err(fail)?, b.alloc(n).map_err(fail)?);
        b.gelu_forward(&same, &mut act_want).map_err(fail)?;
        b.gelu_backward(&same, &same, &mut grad_want, false)
            .map_err(fail)?;
        if bits(&down(b, &act)) != bits(&down(b, &act_want)) {
            return Err(format!(
                "{producer}: the GELU of the operand buffer read other values"
            ));
        }
        if bits(&down(b, &grad)) != bits(&down(b, &grad_want)) {
            return Err(format!(
                "{producer}: the GELU gradient of the operand buffer read other values"
            ));
        }
        if ln != ln_backward(&same)? {
            return Err(format!(
                "{producer}: the LayerNorm backward of the operand buffer as dy read other values"
            ));
        }
    }
    Ok(())
}

// ---- contracts: accumulate twice, overwrite ignores old contents, untouched outputs ---------------

/// Runs `op` twice into one zero-filled output of `len` floats; returns the output after each run.
fn twice<B: Backend>(
    b: &B,
    len: usize,
    mut op: impl FnMut(&mut B::Buf) -> mae::backend::BResult<()>,
) -> Result<(Vec<f32>, Vec<f32>), String> {
    let mut out = b.alloc(len).map_err(|e| e.to_string())?;
    b.fill(&mut out, 0.0).map_err(|e| e.to_string())?;
    op(&mut out).map_err(|e| e.to_string())?;
    let first = down(b, &out);
    op(&mut out).map_err(|e| e.to_string())?;
    Ok((first, down(b, &out)))
}

/// The first run must match the oracle (and so cannot be all zeros when the oracle is not), the
/// second must be twice the first.
fn check_twice(
    what: &str,
    shape: &str,
    (first, second): (Vec<f32>, Vec<f32>),
    want: &[f64],
    tol: Tol,
    mag: Option<&[f64]>,
) -> Check {
    if want.iter().all(|&w| w == 0.0) {
        return Err(format!(
            "{what} [{shape}]: test bug, the expected gradient is all zeros"
        ));
    }
    compare(
        &format!("{what} (first call into zeros)"),
        shape,
        &first,
        want,
        tol,
        mag,
    )?;
    let doubled: Vec<f64> = first.iter().map(|&x| 2.0 * x as f64).collect();
    let mag2: Option<Vec<f64>> = mag.map(|m| m.iter().map(|x| 2.0 * x).collect());
    compare(
        &format!("{what} (second call must give 2x the first)"),
        shape,
        &second,
        &doubled,
        tol,
        mag2.as_deref(),
    )
}

fn check_accumulate_twice<B: Backend>(b: &B) -> Check {
    let (rows, cols) = (7, 33);
    let n = rows * cols;
    let x = data(1, n, cols, Fill::Uniform);
    let x2 = data(2, n, cols, Fill::Uniform);
    let (x64, x264) = (f64s(&x), f64s(&x2));
    let (xb, x2b) = (up(b, &x), up(b, &x2));

    // gemm with beta = 1.
    let g = Gemm::new(rows, 5, cols).trans_b().accumulate();
    let w = data(3, 5 * cols, cols, Fill::Uniform);
    let wb = up(b, &w);
    let mut want = vec![0.0; rows * 5];
    oracle::gemm(&g, &x64, &f64s(&w), &mut want);
    let r = twice(b, rows * 5, |c| b.gemm(&g, &xb, &wb, c))?;
    check_twice(
        "gemm beta=1",
        &format!("{g:?}"),
        r,
        &want,
        Tol::gemm(cols, 1.0, 1.0),
        None,
    )?;

    // add.
    let r = twice(b, n, |d| b.add(&xb, d))?;
    check_twice("add", &format!("len {n}"), r, &x64, Tol::ELEMENTWISE, None)?;

    // scale_rows with accumulate: 3 images of 7 rows of 11.
    let factors = [2.0, 0.0, 1.0 / 0.9];
    let mut want = vec![0.0; n];
    oracle::scale_rows(&x64, &f64s(&factors), &mut want, 7, 11, true);
    let fb = up(b, &factors);
    let r = twice(b, n, |d| b.scale_rows(&xb, &fb, d, 7, 11, true))?;
    check_twice(
        "scale_rows accumulate",
        "3 x 7 x 11",
        r,
        &want,
        Tol::ELEMENTWISE,
        None,
    )?;

    // copy_rows with accumulate, and its backward.
    let map = RowMap {
        batch: 2,
        count: 3,
        cols,
        src_stride: 1,
        src_start: 1,
        src_step: 1,
        dst_stride: 3,
        dst_start: 0,
    };
    let (ls, ld) = map.lens();
    let mut want = vec![0.0; ld];
    oracle::copy_rows(&x64[..ls], &mut want, &map, true);
    let src = up(b, &x[..ls]);
    let r = twice(b, ld, |d| b.copy_rows(&src, d, &map, true))?;
    check_twice(
        "copy_rows accumulate",
        &format!("{map:?}"),
        r,
        &want,
        Tol::ELEMENTWISE,
        None,
    )?;
    let mut want = vec![0.0; ls];
    oracle::copy_rows_backward(&x64[..ld], &mut want, &map);
    let d_dst = up(b, &x[..ld]);
    let r = twice(b, ls, |d| b.copy_rows_backward(&d_dst, d, &map))?;
    check_twice(
        "copy_rows_backward",
        &format!("{map:?}"),
        r,
        &want,
        Tol::ELEMENTWISE.scaled(4.0),
        None,
    )?;

    // gather_rows_backward.
    let gd = Gather {
        batch: 1,
        count: 4,
        cols,
        src_rows: rows,
        src_stride: rows,
        src_start: 0,
        dst_rows: 5,
        dst_start: 1,
    };
    let idx = [5u32, 0, 2, 6];
    let (ls, _, ld) = gd.lens();
    let mut want = vec![0.0; ls];
    oracle::gather_rows_backward(&x64[..ld], &idx, &mut want, &gd);
    let (d_dst, idxb) = (up(b, &x[..ld]), up_idx(b, &idx));
    let r = twice(b, ls, |d| b.gather_rows_backward(&d_dst, &idxb, d, &gd))?;
    check_twice(
        "gather_rows_backward",
        &format!("{gd:?}"),
        r,
        &want,
        Tol::ELEMENTWISE,
        None,
    )?;

    // layernorm_backward: dx, dgamma and dbeta, one output at a time.
    let c = RowOpCase {
        rows,
        cols,
        param: 1e-6,
        seed: 4,
        fill: Fill::Uniform,
        init: Init::Nan,
    };
    let inputs = layernorm_backward_inputs(&c);
    let [dy, xl, gamma, mean, rstd] = inputs.clone().map(|v| up(b, &v));
    let [dy64, xl64, g64, m64, r64] = inputs.clone().map(|v| f64s(&v));
    let (mut wdx, mut wdg, mut wdb) = (vec![0.0; n], vec![0.0; cols], vec![0.0; cols]);
    oracle::layernorm_backward(
        &dy64, &xl64, &g64, &m64, &r64, &mut wdx, &mut wdg, &mut wdb, rows, cols,
    );
    let [mdx, mdg, mdb] = layernorm_backward_magnitudes(&inputs, rows, cols);
    let (mut sdx, mut sdg, mut sdb) = (
        b.alloc(n).unwrap(),
        b.alloc(cols).unwrap(),
        b.alloc(cols).unwrap(),
    );
    let shape = format!("rows {rows}, cols {cols}");
    let r = twice(b, n, |dx| {
        b.layernorm_backward(
            &dy, &xl, &gamma, &mean, &rstd, dx, &mut sdg, &mut sdb, rows, cols,
        )
    })?;
    check_twice(
        "layernorm_backward dx",
        &shape,
        r,
        &wdx,
        Tol::REDUCTION,
        Some(&mdx),
    )?;
    let r = twice(b, cols, |dg| {
        b.layernorm_backward(
            &dy, &xl, &gamma, &mean, &rstd, &mut sdx, dg, &mut sdb, rows, cols,
        )
    })?;
    check_twice(
        "layernorm_backward dgamma",
        &shape,
        r,
        &wdg,
        Tol::REDUCTION,
        Some(&mdg),
    )?;
    let r = twice(b, cols, |db| {
        b.layernorm_backward(
            &dy, &xl, &gamma, &mean, &rstd, &mut sdx, &mut sdg, db, rows, cols,
        )
    })?;
    check_twice(
        "layernorm_backward dbeta",
        &shape,
        r,
        &wdb,
        Tol::REDUCTION,
        Some(&mdb),
    )?;

    // gelu_backward.
    let mut want = vec![0.0; n];
    oracle::gelu_backward(&x64, &x264, &mut want);
    let r = twice(b, n, |dx| b.gelu_backward(&xb, &x2b, dx, true))?;
    check_twice(
        "gelu_backward",
        &format!("len {n}"),
        r,
        &want,
        Tol::ELEMENTWISE,
        None,
    )?;

    // softmax_backward.
    let mut y = vec![0.0; n];
    oracle::softmax_forward(&x64, &mut y, rows, cols, 0.5);
    let y = f32s(&y);
    let mut want = vec![0.0; n];
    oracle::softmax_backward(&f64s(&y), &x264, &mut want, rows, cols, 0.5);
    let yb = up(b, &y);
    let r = twice(b, n, |dx| {
        b.softmax_backward(&yb, &x2b, dx, rows, cols, 0.5)
    })?;
    check_twice("softmax_backward", &shape, r, &want, Tol::REDUCTION, None)?;

    // masked_mse_backward.
    let mask = loss_mask(rows, 5);
    let mut want = vec![0.0; n];
    oracle::masked_mse_backward(&x64, &x264, &f64s(&mask), &mut want, rows, cols, 0.5);
    let maskb = up(b, &mask);
    let r = twice(b, n, |dp| {
        b.masked_mse_backward(&xb, &x2b, &maskb, dp, rows, cols, 0.5)
    })?;
    check_twice(
        "masked_mse_backward",
        &shape,
        r,
        &want,
        Tol::ELEMENTWISE,
        None,
    )
}

/// Runs `op` on an output of `len` floats that holds NaN, then on one that holds garbage, and
/// requires bitwise-identical results (an overwriting op must not read its output).
fn nan_vs_garbage<B: Backend>(
    b: &B,
    what: &str,
    len: usize,
    mut op: impl FnMut(&mut B::Buf) -> mae::backend::BResult<()>,
) -> Result<Vec<f32>, String> {
    let mut out = b.alloc(len).map_err(|e| e.to_string())?;
    b.fill(&mut out, f32::NAN).map_err(|e| e.to_string())?;
    op(&mut out).map_err(|e| e.to_string())?;
    let from_nan = down(b, &out);
    b.write(&mut out, &old_contents(Init::Garbage, len, 99))
        .map_err(|e| e.to_string())?;
    op(&mut out).map_err(|e| e.to_string())?;
    let from_garbage = down(b, &out);
    for i in 0..len {
        if from_nan[i].to_bits() != from_garbage[i].to_bits() {
            return Err(format!(
                "{what}: output depends on its old contents at {i} of {len}: {} from NaN, {} from garbage",
                from_nan[i], from_garbage[i]
            ));
        }
    }
    Ok(from_nan)
}

fn check_overwrite<B: Backend>(b: &B) -> Check {
    let (rows, cols) = (5, 31);
    let n = rows * cols;
    let x = data(11, n, cols, Fill::Uniform);
    let x64 = f64s(&x);
    let xb = up(b, &x);

    let g = Gemm::new(rows, 4, cols).trans_b().alpha(0.5);
    let w = data(12, 4 * cols, cols, Fill::Uniform);
    let wb = up(b, &w);
    let got = nan_vs_garbage(b, "gemm beta=0", rows * 4, |c| b.gemm(&g, &xb, &wb, c))?;
    let mut want = vec![0.0; rows * 4];
    oracle::gemm(&g, &x64, &f64s(&w), &mut want);
    compare(
        "gemm beta=0",
        &format!("{g:?}"),
        &got,
        &want,
        Tol::gemm(cols, 1.0, 1.0),
        None,
    )?;

    // scale_rows, one factor per row; a zero factor must give zeros, not the old NaN.
    let factors = [0.0, 1.25, -2.0, 0.0, 1.0 / 0.9];
    let fb = up(b, &factors);
    let got = nan_vs_garbage(b, "scale_rows", n, |d| {
        b.scale_rows(&xb, &fb, d, 1, cols, false)
    })?;
    let mut want = vec![0.0; n];
    oracle::scale_rows(&x64, &f64s(&factors), &mut want, 1, cols, false);
    compare(
        "scale_rows",
        "5 x 1 x 31",
        &got,
        &want,
        Tol::ELEMENTWISE,
        None,
    )?;

    let map = RowMap {
        batch: rows,
        count: 1,
        cols,
        src_stride: 0,
        src_start: 2,
        src_step: 0,
        dst_stride: 1,
        dst_start: 0,
    };
    let got = nan_vs_garbage(b, "copy_rows", n, |d| b.copy_rows(&xb, d, &map, false))?;
    let mut want = vec![0.0; n];
    oracle::copy_rows(&x64, &mut want, &map, false);
    compare(
        "copy_rows",
        &format!("{map:?}"),
        &got,
        &want,
        Tol::EXACT,
        None,
    )?;

    let gd = Gather {
        batch: 1,
        count: rows,
        cols,
        src_rows: rows,
        src_stride: rows,
        src_start: 0,
        dst_rows: rows,
        dst_start: 0,
    };
    let idx = [4u32, 2, 0, 1, 3];
    let idxb = up_idx(b, &idx);
    let got = nan_vs_garbage(b, "gather_rows", n, |d| b.gather_rows(&xb, &idxb, d, &gd))?;
    let mut want = vec![0.0; n];
    oracle::gather_rows(&x64, &idx, &mut want, &gd);
    compare(
        "gather_rows",
        &format!("{gd:?}"),
        &got,
        &want,
        Tol::EXACT,
        None,
    )?;

    for order in [PatchOrder::Chw, PatchOrder::Hwc] {
        let p = Patchify {
            batch: 2,
            channels: 3,
            height: 6,
            width: 9,
            patch: 3,
            order,
        };
        let imgs = data(13, p.lens().0, 1, Fill::Uniform);
        let ib = up(b, &imgs);
        let got = nan_vs_garbage(b, "patchify", p.lens().1, |o| b.patchify(&ib, o, &p))?;
        let mut want = vec![0.0; p.lens().1];
        oracle::patchify(&f64s(&imgs), &mut want, &p);
        compare("patchify", &format!("{p:?}"), &got, &want, Tol::EXACT, None)?;
    }

    let h = Heads {
        batch: 2,
        tokens: 5,
        heads: 3,
        head_dim: 4,
        row_width: 12,
        col_offset: 0,
    };
    let t = data(14, h.lens().0, 12, Fill::Uniform);
    let tb = up(b, &t);
    let got = nan_vs_garbage(b, "split_heads", h.lens().1, |o| b.split_heads(&tb, o, &h))?;
    let mut want = vec![0.0; h.lens().1];
    oracle::split_heads(&f64s(&t), &mut want, &h);
    compare(
        "split_heads",
        &format!("{h:?}"),
        &got,
        &want,
        Tol::EXACT,
        None,
    )?;
    // merge_heads writes every column when they are all head columns.
    let hb = up(b, &f32s(&want));
    let got = nan_vs_garbage(b, "merge_heads", h.lens().0, |o| b.merge_heads(&hb, o, &h))?;
    compare(
        "merge_heads",
        &format!("{h:?}"),
        &got,
        &f64s(&t),
        Tol::EXACT,
        None,
    )?;

    let gamma = up(b, &data(15, cols, cols, Fill::Uniform));
    let beta = up(b, &data(16, cols, cols, Fill::Uniform));
    let (mut mean, mut rstd, mut y) = (
        b.alloc(rows).unwrap(),
        b.alloc(rows).unwrap(),
        b.alloc(n).unwrap(),
    );
    let y1 = nan_vs_garbage(b, "layernorm_forward y", n, |y| {
        b.layernorm_forward(
            &xb, &gamma, &beta, y, &mut mean, &mut rstd, rows, cols, 1e-6,
        )
    })?;
    let m1 = nan_vs_garbage(b, "layernorm_forward mean", rows, |m| {
        b.layernorm_forward(&xb, &gamma, &beta, &mut y, m, &mut rstd, rows, cols, 1e-6)
    })?;
    let r1 = nan_vs_garbage(b, "layernorm_forward rstd", rows, |r| {
        b.layernorm_forward(&xb, &gamma, &beta, &mut y, &mut mean, r, rows, cols, 1e-6)
    })?;
    let (mut wy, mut wm, mut wr) = (vec![0.0; n], vec![0.0; rows], vec![0.0; rows]);
    let (g64, b64) = (f64s(&down(b, &gamma)), f64s(&down(b, &beta)));
    oracle::layernorm_forward(
        &x64,
        &g64,
        &b64,
        &mut wy,
        &mut wm,
        &mut wr,
        rows,
        cols,
        1e-6f32 as f64,
    );
    compare(
        "layernorm_forward y",
        "5x31",
        &y1,
        &wy,
        Tol::REDUCTION,
        None,
    )?;
    compare(
        "layernorm_forward mean",
        "5x31",
        &m1,
        &wm,
        Tol::REDUCTION,
        None,
    )?;
    compare(
        "layernorm_forward rstd",
        "5x31",
        &r1,
        &wr,
        Tol::REDUCTION,
        None,
    )?;

    let got = nan_vs_garbage(b, "gelu_forward", n, |y| b.gelu_forward(&xb, y))?;
    let mut want = vec![0.0; n];
    oracle::gelu_forward(&x64, &mut want);
    compare("gelu_forward", "5x31", &got, &want, Tol::ELEMENTWISE, None)?;

    let got = nan_vs_garbage(b, "softmax_forward", n, |y| {
        b.softmax_forward(&xb, y, rows, cols, 0.25)
    })?;
    let mut want = vec![0.0; n];
    oracle::softmax_forward(&x64, &mut want, rows, cols, 0.25);
    compare("softmax_forward", "5x31", &got, &want, Tol::REDUCTION, None)?;

    let got = nan_vs_garbage(b, "normalize_rows", n, |y| {
        b.normalize_rows(&xb, y, rows, cols, 1e-6)
    })?;
    let mut want = vec![0.0; n];
    oracle::normalize_rows(&x64, &mut want, rows, cols, 1e-6f32 as f64);
    compare("normalize_rows", "5x31", &got, &want, Tol::REDUCTION, None)?;

    let target = data(17, n, cols, Fill::Uniform);
    let mask = loss_mask(rows, 18);
    let (tb, mb) = (up(b, &target), up(b, &mask));
    let got = nan_vs_garbage(b, "masked_mse_forward", 1, |l| {
        b.masked_mse_forward(&xb, &tb, &mb, l, rows, cols)
    })?;
    let mut want = vec![0.0];
    oracle::masked_mse_forward(&x64, &f64s(&target), &f64s(&mask), &mut want, rows, cols);
    compare(
        "masked_mse_forward",
        "5x31",
        &got,
        &want,
        Tol::REDUCTION,
        None,
    )?;

    let got = nan_vs_garbage(b, "fill", n, |o| b.fill(o, 0.75))?;
    compare("fill", "5x31", &got, &vec![0.75; n], Tol::EXACT, None)?;
    let got = nan_vs_garbage(b, "copy", n, |o| b.copy(&xb, o))?;
    compare("copy", "5x31", &got, &x64, Tol::EXACT, None)
}

/// Outputs an op must leave alone, filled with a sentinel: merge_heads' other columns, copy_rows'
/// non-destination rows, gather_rows' rows outside `dst_start .. dst_start + count`, the gaps
/// between gemm's batch items.
fn check_untouched<B: Backend>(b: &B) -> Check {
    let sentinel = |len: usize| -> Vec<f32> { (0..len).map(|i| 1000.0 + i as f32).collect() };

    let h = Heads {
        batch: 2,
        tokens: 3,
        heads: 2,
        head_dim: 3,
        row_width: 3 * 6 + 1,
        col_offset: 6,
    };
    let heads = data(21, h.lens().1, 3, Fill::Uniform);
    let x0 = sentinel(h.lens().0);
    let got = run::merge_heads(b, &heads, &x0, &h);
    let touched = heads_touched(&h);
    untouched("merge_heads", &format!("{h:?}"), &got, &x0, &touched)?;
    let mut want = f64s(&x0);
    oracle::merge_heads(&f64s(&heads), &mut want, &h);
    compare(
        "merge_heads",
        &format!("{h:?}"),
        &got,
        &want,
        Tol::EXACT,
        None,
    )?;

    let map = RowMap {
        batch: 2,
        count: 2,
        cols: 5,
        src_stride: 2,
        src_start: 0,
        src_step: 1,
        dst_stride: 4,
        dst_start: 1,
    };
    let (ls, ld) = map.lens();
    let src = data(22, ls, 5, Fill::Uniform);
    for accumulate in [false, true] {
        let d0 = sentinel(ld + 5);
        let got = run::copy_rows(b, &src, &d0, &map, accumulate);
        untouched(
            "copy_rows",
            &format!("{map:?}"),
            &got,
            &d0,
            &rows_touched(&map, ld + 5),
        )?;
        let mut want = f64s(&d0);
        oracle::copy_rows(&f64s(&src), &mut want, &map, accumulate);
        compare(
            "copy_rows",
            &format!("{map:?}"),
            &got,
            &want,
            Tol::ELEMENTWISE,
            None,
        )?;
    }

    let g = Gather {
        batch: 2,
        count: 2,
        cols: 4,
        src_rows: 3,
        src_stride: 3,
        src_start: 0,
        dst_rows: 5,
        dst_start: 2,
    };
    let (ls, _, ld) = g.lens();
    let src = data(23, ls, 4, Fill::Uniform);
    let idx = [2u32, 0, 1, 2];
    let d0 = sentinel(ld);
    let got = run::gather_rows(b, &src, &idx, &d0, &g);
    untouched(
        "gather_rows",
        &format!("{g:?}"),
        &got,
        &d0,
        &gather_touched(&g),
    )?;
    let mut want = f64s(&d0);
    oracle::gather_rows(&f64s(&src), &idx, &mut want, &g);
    compare(
        "gather_rows",
        &format!("{g:?}"),
        &got,
        &want,
        Tol::EXACT,
        None,
    )?;

    let gm = Gemm::new(3, 4, 5).batched(3, 3 * 5, 0, 3 * 4 + 2);
    let (la, lb, lc) = gm.lens();
    let (a, bm) = (
        data(24, la, 5, Fill::Uniform),
        data(25, lb, 4, Fill::Uniform),
    );
    let c0 = sentinel(lc + 2);
    let got = run::gemm(b, &gm, &a, &bm, &c0);
    untouched(
        "gemm",
        &format!("{gm:?}"),
        &got,
        &c0,
        &gemm_touched(&gm, lc + 2),
    )?;
    let mut want = f64s(&c0);
    oracle::gemm(&gm, &f64s(&a), &f64s(&bm), &mut want);
    compare(
        "gemm",
        &format!("{gm:?}"),
        &got,
        &want,
        Tol::gemm(5, 1.0, 1.0),
        None,
    )
}

/// Two runs of one op on one backend are bitwise identical (no floating-point atomics, fixed
/// reduction orders), on shapes large enough for a backend to split the work across threads.
fn check_deterministic<B: Backend>(b: &B) -> Check {
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let same = |what: &str, first: Vec<f32>, second: Vec<f32>| -> Check {
        match (0..first.len()).find(|&i| first[i].to_bits() != second[i].to_bits()) {
            None => Ok(()),
            Some(i) => Err(format!(
                "{what}: two runs differ at {i} of {}: {} then {}",
                first.len(),
                first[i],
                second[i]
            )),
        }
    };
    let g = Gemm::new(257, 300, 129)
        .trans_b()
        .batched(2, 257 * 129, 0, 257 * 300);
    let (la, lb, lc) = g.lens();
    let (a, bm) = (
        data(31, la, 129, Fill::Uniform),
        data(32, lb, 129, Fill::Uniform),
    );
    let c0 = vec![0.0; lc];
    let first = run::gemm(b, &g, &a, &bm, &c0);
    same("gemm", first.clone(), run::gemm(b, &g, &a, &bm, &c0))?;
    if bits(&first) == bits(&c0) {
        return Err("gemm: output not written".into());
    }

    let (rows, cols) = (513, 384);
    let x = data(33, rows * cols, cols, Fill::Outliers);
    let (gamma, beta) = (
        data(34, cols, cols, Fill::Uniform),
        data(35, cols, cols, Fill::Uniform),
    );
    let (zn, zr) = (vec![0.0; rows * cols], vec![0.0; rows]);
    let ln = || run::layernorm_forward(b, &x, &gamma, &beta, (&zn, &zr, &zr), rows, cols, 1e-6);
    let ((y1, m1, r1), (y2, m2, r2)) = (ln(), ln());
    same("layernorm_forward y", y1, y2)?;
    same("layernorm_forward mean", m1, m2)?;
    same("layernorm_forward rstd", r1, r2)?;
    let dy = data(36, rows * cols, cols, Fill::Uniform);
    let (mean, rstd) = (ln().1, ln().2);
    let zc = vec![0.0; cols];
    let lnb = || {
        let init = (&zn[..], &zc[..], &zc[..]);
        run::layernorm_backward(b, &dy, &x, &gamma, &mean, &rstd, init, rows, cols)
    };
    let ((dx1, dg1, db1), (dx2, dg2, db2)) = (lnb(), lnb());
    same("layernorm_backward dx", dx1, dx2)?;
    same("layernorm_backward dgamma", dg1, dg2)?;
    same("layernorm_backward dbeta", db1, db2)?;
    let sm = || run::softmax_forward(b, &x, &zn, rows, cols, 0.125);
    same("softmax_forward", sm(), sm())?;
    let mask = loss_mask(rows, 37);
    let mse = || run::masked_mse_forward(b, &x, &dy, &mask, &[0.0], rows, cols);
    same("masked_mse_forward", mse(), mse())
}

// ---- the tests, instantiated per backend ---------------------------------------------------------

/// Checks `check` on `config().cases` values of `strategy`, shrinking a failure to a minimal
/// input; does nothing when the backend was skipped.
fn property<B: Backend, S: Strategy>(
    b: Option<&B>,
    strategy: S,
    check: impl Fn(&B, S::Value) -> Check,
) {
    let Some(b) = b else { return };
    let mut runner = TestRunner::new(config());
    match runner.run(&strategy, |v| check(b, v).map_err(TestCaseError::fail)) {
        Ok(()) => {}
        Err(TestError::Fail(why, input)) => {
            panic!("{}: {why}\nminimal failing input: {input:?}", b.name())
        }
        Err(e) => panic!("{}: {e}", b.name()),
    }
}

/// Runs a fixed check; does nothing when the backend was skipped.
fn fixed<B: Backend>(b: Option<&B>, check: impl Fn(&B) -> Check) {
    if let Some(b) = b {
        if let Err(e) = check(b) {
            panic!("{}: {e}", b.name());
        }
    }
}

/// One module of tests per backend, named after its getter in `mae_conformance::backends`.
macro_rules! op_tests {
    ($($backend:ident),*) => {$(
        mod $backend {
            use super::*;

            fn b() -> Option<&'static impl Backend> {
                mae_conformance::backends::$backend()
            }

            const SCALES: [f32; 5] = [0.0, 0.5, -2.0, 1e-3, 3.0];

            #[test]
            fn gemm() {
                property(b(), gemm_case(), |b, c| check_gemm(b, &c));
            }
            #[test]
            fn gemm_epilogues_are_the_composed_ops() {
                property(b(), gemm_case(), |b, c| check_gemm_epilogues(b, &c));
            }
            #[test]
            fn gemm_bias_is_the_product_plus_bias() {
                property(b(), gemm_case(), |b, c| check_gemm_bias_of(b, &c, |x| x, 0.0));
            }
            #[test]
            fn gemm_bias_fixed_shapes() {
                fixed(b(), |b| check_gemm_bias_shapes(b, &GEMM_BIAS_SHAPES, |x| x, 0.0));
            }
            #[test]
            fn gemm_bias_grad_is_the_weight_and_bias_gradients() {
                fixed(b(), |b| {
                    check_gemm_bias_grad(b, &GEMM_BIAS_GRAD_SHAPES, |x| x, (0.0, 0.0))
                });
            }
            #[test]
            fn add() {
                property(b(), (1usize..=300, any::<u64>(), fill()), |b, (len, seed, fill)| {
                    check_add(b, len, seed, fill)
                });
            }
            #[test]
            fn scale() {
                let strategy = (1usize..=300, select(SCALES.to_vec()), any::<u64>(), fill());
                property(b(), strategy, |b, (len, s, seed, fill)| {
                    check_scale(b, len, s, seed, fill)
                });
            }
            #[test]
            fn scale_rows() {
                property(b(), scale_rows_case(), |b, c| check_scale_rows(b, &c));
            }
            #[test]
            fn scale_rows_fixed_images() {
                fixed(b(), check_scale_rows_fixed);
            }
            #[test]
            fn copy_rows() {
                property(b(), rows_case(), |b, c| check_copy_rows(b, &c));
            }
            #[test]
            fn copy_rows_backward() {
                property(b(), rows_case(), |b, c| check_copy_rows_backward(b, &c));
            }
            #[test]
            fn gather_rows() {
                property(b(), gather_case(), |b, c| check_gather_rows(b, &c));
            }
            #[test]
            fn gather_rows_backward() {
                property(b(), gather_case(), |b, c| check_gather_rows_backward(b, &c));
            }
            #[test]
            fn patchify() {
                property(b(), patchify_case(), |b, (p, seed, init)| {
                    check_patchify(b, &p, seed, init)
                });
            }
            #[test]
            fn split_heads() {
                property(b(), heads_case(), |b, (h, seed, init)| {
                    check_split_heads(b, &h, seed, init)
                });
            }
            #[test]
            fn merge_heads() {
                property(b(), heads_case(), |b, (h, seed, init)| {
                    check_merge_heads(b, &h, seed, init)
                });
            }
            #[test]
            fn layernorm_forward() {
                property(b(), row_case(dim(), LN_EPS.to_vec()), |b, c| {
                    check_layernorm_forward(b, &c)
                });
            }
            #[test]
            fn layernorm_backward() {
                property(b(), row_case(dim(), LN_EPS.to_vec()), |b, c| {
                    check_layernorm_backward(b, &c)
                });
            }
            #[test]
            fn layernorm_backward_row_widths() {
                fixed(b(), check_layernorm_backward_widths);
            }
            #[test]
            fn gelu_forward() {
                let strategy = (1usize..=500, any::<u64>(), fill(), init());
                property(b(), strategy, |b, (len, seed, fill, init)| {
                    check_gelu_forward(b, len, seed, fill, init)
                });
            }
            #[test]
            fn bias_gelu_forward() {
                let strategy = ((dim(), dim()), any::<u64>(), fill(), init());
                property(b(), strategy, |b, (shape, seed, fill, init)| {
                    check_bias_gelu_forward(b, shape, seed, fill, init)
                });
            }
            #[test]
            fn bias_gelu_forward_is_bias_then_gelu() {
                let strategy = ((dim(), dim()), any::<u64>(), fill(), init());
                property(b(), strategy, |b, (shape, seed, fill, init)| {
                    check_bias_gelu_is_bias_then_gelu(b, shape, seed, fill, init)
                });
            }
            #[test]
            fn gelu_backward() {
                property(b(), (1usize..=500, any::<u64>(), fill()), |b, (len, seed, fill)| {
                    check_gelu_backward(b, len, seed, fill)
                });
            }
            #[test]
            fn gelu_backward_overwrites_as_accumulating_into_zeros() {
                property(b(), (1usize..=500, any::<u64>(), fill()), |b, (len, seed, fill)| {
                    check_gelu_backward_overwrites(b, len, seed, fill)
                });
            }
            #[test]
            fn softmax_forward() {
                property(b(), row_case(dim(), SOFTMAX_SCALES.to_vec()), |b, c| {
                    check_softmax_forward(b, &c)
                });
            }
            #[test]
            fn softmax_backward() {
                property(b(), row_case(dim(), SOFTMAX_SCALES.to_vec()), |b, c| {
                    check_softmax_backward(b, &c)
                });
            }
            #[test]
            fn normalize_rows() {
                property(b(), row_case(dim2(), vec![1e-6, 1e-4]), |b, c| {
                    check_normalize_rows(b, &c)
                });
            }
            #[test]
            fn masked_mse_forward() {
                property(b(), row_case(dim(), vec![0.0]), |b, c| {
                    check_masked_mse_forward(b, &c)
                });
            }
            #[test]
            fn masked_mse_backward() {
                property(b(), row_case(dim(), vec![1.0, 0.5, 0.25]), |b, c| {
                    check_masked_mse_backward(b, &c)
                });
            }
            #[test]
            fn adamw() {
                property(b(), adam_case(), |b, c| check_adamw(b, &c));
            }
            #[test]
            fn adamw_many_is_adamw_then_fill_per_tensor() {
                property(b(), adam_many_case(), check_adamw_many);
            }
            #[test]
            fn gemm_fixed_shapes() {
                fixed(b(), check_gemm_fixed);
            }
            #[test]
            fn copy_rows_fixed_maps() {
                fixed(b(), check_copy_rows_fixed);
            }
            #[test]
            fn memory_ops() {
                fixed(b(), check_memory);
            }
            #[test]
            fn rewrites_reach_the_ops_queued_after_them() {
                fixed(b(), check_rewrites);
            }
            #[test]
            fn operand_buffers_hold_their_values() {
                fixed(b(), |b| check_operand_buffers(b, |x| x));
            }
            #[test]
            fn products_into_operand_buffers_hold_their_values() {
                fixed(b(), |b| check_operand_products(b, |x| x));
            }
            #[test]
            fn accumulating_ops_add_up() {
                fixed(b(), check_accumulate_twice);
            }
            #[test]
            fn overwriting_ops_ignore_old_contents() {
                fixed(b(), check_overwrite);
            }
            #[test]
            fn outputs_outside_the_op_stay_untouched() {
                fixed(b(), check_untouched);
            }
            #[test]
            fn ops_are_deterministic() {
                fixed(b(), check_deterministic);
            }
            #[test]
            fn fused_attention_equals_the_composed_ops() {
                fixed(b(), check_fused_attention);
            }
        }
    )*};
}

op_tests!(cpu, wgpu, cuda);

/// `x` rounded to the nearest bf16 (an f32 with 8 significant bits), ties to the even one,
/// found by comparing its two bf16 neighbours in f64; infinities and NaN stay.
fn bf16_nearest(x: f32) -> f32 {
    if !x.is_finite() {
        return x;
    }
    let down = x.to_bits() & 0xffff_0000;
    let up = down + 0x1_0000;
    // Past the largest bf16 the upper neighbour is 2^128 (which rounds to infinity).
    let up_value = if up & 0x7fff_ffff == 0x7f80_0000 {
        2f64.powi(128).copysign(x as f64)
    } else {
        f32::from_bits(up) as f64
    };
    let (dd, du) = (
        (x as f64 - f32::from_bits(down) as f64).abs(),
        (x as f64 - up_value).abs(),
    );
    if dd < du || (dd == du && (down >> 16) & 1 == 0) {
        f32::from_bits(down)
    } else {
        f32::from_bits(up)
    }
}

/// The CUDA backend's bf16 mode (backend-cuda/src/bf16.rs). Its Linear layers' GEMMs multiply
/// the backend's bf16 copies of the operands, rounded to nearest (ties to even), with f32
/// accumulation: the fixed shapes, large enough to take the copies, are held to the f32 GEMM
/// tolerance against that product, which unrounded or otherwise rounded operands miss by far.
/// Smaller GEMMs let cuBLAS round the f32 operands itself (`CUBLAS_COMPUTE_32F_FAST_16BF`),
/// which does not round to nearest (seen on an H200: a 1 x 1 x 3 product 0.3 % from the
/// nearest-rounded one): the random shapes are held to that product with each operand allowed
/// one bf16 ulp (at most 2^-7 relative) from its nearest rounding.
mod cuda_bf16 {
    use super::*;

    fn b() -> Option<&'static impl Backend> {
        mae_conformance::backends::cuda_bf16()
    }

    /// Where the bf16 mode's GEMMs multiply bf16 copies (not under `MAE_CUDA_BF16_GEMM=fast`),
    /// the GELU and LayerNorm outputs, the GELU gradient kept for a Linear layer and the fused
    /// attention's output and qkv gradient are stored as that copy alone: other reads see bf16
    /// values, the products and the attention kernels' results are bitwise those of a plain
    /// buffer holding them.
    #[test]
    fn operand_buffers_keep_the_bf16_copy_alone() {
        let fast = std::env::var("MAE_CUDA_BF16_GEMM").is_ok_and(|v| v == "fast");
        let stored: fn(f32) -> f32 = if fast { |x| x } else { bf16_nearest };
        fixed(b(), |b| check_operand_buffers(b, stored));
    }

    /// Products that overwrite a buffer from `alloc_operand` write their result as its bf16
    /// copy alone (cuBLAS rounding its f32 sums once), and the GELU and its gradient read it.
    #[test]
    fn products_into_operand_buffers_write_bf16() {
        let fast = std::env::var("MAE_CUDA_BF16_GEMM").is_ok_and(|v| v == "fast");
        let stored: fn(f32) -> f32 = if fast { |x| x } else { bf16_nearest };
        fixed(b(), |b| check_operand_products(b, stored));
    }

    /// The tensor-core attention (the bf16 mode's default on compute capability 8.0 and later)
    /// on bf16 inputs, which it multiplies exactly: it rounds the probabilities before their
    /// product with v and dO, and the score gradients before theirs with q and k, each term
    /// within 2^-8, so two such roundings per unit of magnitude on top of the f32 bound.
    #[test]
    fn fused_attention_rounds_only_probabilities_and_score_gradients() {
        fixed(b(), |b| {
            check_fused_attention_of(b, bf16_nearest, 2.0 * 2f64.powi(-8))
        });
    }

    #[test]
    fn gemm_is_within_a_bf16_rounding_of_each_operand() {
        // (1 + 2^-7)^2 - 1 < 2^-6: both operands of a product one bf16 ulp away.
        let slack = 2f64.powi(-6);
        property(b(), gemm_case(), |b, c| {
            check_gemm_of(b, &c, bf16_nearest, slack)
        });
    }

    #[test]
    fn gemm_bias_is_within_a_bf16_rounding_of_each_operand() {
        let slack = 2f64.powi(-6);
        property(b(), gemm_case(), |b, c| {
            check_gemm_bias_of(b, &c, bf16_nearest, slack)
        });
    }

    /// The weight gradient within a bf16 rounding of each operand (the small shapes take
    /// FAST_16BF), the bias gradient the sums of dY or of its bf16 rounding (cuBLASLt's epilogue
    /// sums the copy its product multiplies; the composed column sums add the floats).
    #[test]
    fn gemm_bias_grad_is_within_a_bf16_rounding_of_each_operand() {
        let slack = 2f64.powi(-6);
        fixed(b(), |b| {
            check_gemm_bias_grad(
                b,
                &GEMM_BIAS_GRAD_SHAPES,
                bf16_nearest,
                (slack, 2f64.powi(-8)),
            )
        });
    }

    /// The shape that takes the copies (2mn/(m + n) = 588 FLOPs per operand element) multiplies
    /// operands rounded to nearest, epilogue or not.
    #[test]
    fn large_gemm_bias_multiplies_operands_rounded_to_nearest_bf16() {
        fixed(b(), |b| {
            check_gemm_bias_shapes(b, &GEMM_BIAS_SHAPES[2..], bf16_nearest, 0.0)
        });
    }

    #[test]
    fn large_gemm_multiplies_operands_rounded_to_nearest_bf16() {
        fixed(b(), |b| {
            // 2mn/(m + n) FLOPs per operand element, 606 and 800: above the copies' threshold.
            for (m, n, k, batch, bcast_b) in [(640, 576, 64, 1, false), (600, 600, 40, 2, true)] {
                for (trans_a, trans_b) in
                    [(false, false), (false, true), (true, false), (true, true)]
                {
                    let c = GemmCase {
                        m,
                        n,
                        k,
                        trans_a,
                        trans_b,
                        alpha: 1.0,
                        beta: if batch == 1 { 0.0 } else { 0.5 },
                        batch,
                        bcast_a: false,
                        bcast_b,
                        pad: 3,
                        seed: m as u64,
                        fill: Fill::Uniform,
                    };
                    check_gemm_of(b, &c, bf16_nearest, 0.0)?;
                }
            }
            Ok(())
        });
    }

    /// The bf16 mode keeps a buffer's bf16 copy with the buffer and multiplies it again while
    /// the buffer is unchanged (a Linear layer's weight in its forward and input-gradient
    /// products, dY in both gradient products): a product after the operand was overwritten
    /// uses the new values, one after nothing changed gives bitwise the same result.
    #[test]
    fn gemm_copies_follow_their_operands_contents() {
        fixed(b(), check_gemm_copies);
    }

    /// A copy made by one GEMM serves a later GEMM that reads the buffer in another role and
    /// layout, after other operands were copied in between, and a copy is renewed when its
    /// buffer is written: a Linear layer's forward `Y = X W^T`, another layer's product, the
    /// input gradient `dX = dY W`, then `W` overwritten and `dX` again; and one buffer as both
    /// operands (`X X^T`), overwritten between two products.
    #[test]
    fn gemm_copies_outlive_other_gemms() {
        fixed(b(), check_gemm_copies_across_gemms);
    }

    /// The oracle of `g` on the operands rounded to nearest bf16.
    fn bf16_product(g: &Gemm, a: &[f32], bm: &[f32]) -> Vec<f64> {
        let r = |v: &[f32]| {
            v.iter()
                .map(|&x| bf16_nearest(x) as f64)
                .collect::<Vec<_>>()
        };
        let mut c = vec![0.0; g.lens().2];
        oracle::gemm(g, &r(a), &r(bm), &mut c);
        c
    }

    /// `g` on the backend into a fresh C (NaN before).
    fn product<B: Backend>(b: &B, g: &Gemm, a: &B::Buf, bm: &B::Buf) -> Result<Vec<f32>, String> {
        let mut c = up(b, &vec![f32::NAN; g.lens().2]);
        b.gemm(g, a, bm, &mut c).map_err(|e| e.to_string())?;
        Ok(down(b, &c))
    }

    fn check_gemm_copies<B: Backend>(b: &B) -> Check {
        let g = Gemm::new(640, 576, 64);
        let (la, lb, _) = g.lens();
        let host_a = [1, 2].map(|seed| data(seed, la, g.k, Fill::Uniform));
        let host_b = data(3, lb, g.n, Fill::Uniform);
        let want = |a: &[f32]| bf16_product(&g, a, &host_b);
        let tol = Tol::gemm(g.k, 1.0, 1.0);
        let (mut a, bm) = (up(b, &host_a[0]), up(b, &host_b));
        let first = product(b, &g, &a, &bm)?;
        compare("gemm", "first", &first, &want(&host_a[0]), tol, None)?;
        if product(b, &g, &a, &bm)? != first {
            return Err("the same product twice differs".into());
        }
        b.write(&mut a, &host_a[1]).map_err(|e| e.to_string())?;
        let changed = product(b, &g, &a, &bm)?;
        compare(
            "gemm",
            "A overwritten",
            &changed,
            &want(&host_a[1]),
            tol,
            None,
        )?;
        let other = up(b, &host_a[0]);
        compare(
            "gemm",
            "another A",
            &product(b, &g, &other, &bm)?,
            &want(&host_a[0]),
            tol,
            None,
        )?;
        compare(
            "gemm",
            "A again",
            &product(b, &g, &a, &bm)?,
            &want(&host_a[1]),
            tol,
            None,
        )
    }

    fn check_gemm_copies_across_gemms<B: Backend>(b: &B) -> Check {
        // A Linear layer of 576 -> 640 features on 600 rows, and another of 512 -> 448: every
        // product above the copies' threshold.
        let (rows, inp, out) = (600, 576, 640);
        let forward = Gemm::new(rows, out, inp).trans_b();
        let input_grad = Gemm::new(rows, inp, out);
        let other = Gemm::new(rows, 448, 512).trans_b();
        let host_x = data(11, rows * inp, inp, Fill::Uniform);
        let host_w = [12, 13].map(|seed| data(seed, out * inp, inp, Fill::Uniform));
        let host_dy = data(14, rows * out, out, Fill::Uniform);
        let (host_p, host_q) = (
            data(15, rows * 512, 512, Fill::Uniform),
            data(16, 448 * 512, 512, Fill::Uniform),
        );
        let (x, mut w, dy) = (up(b, &host_x), up(b, &host_w[0]), up(b, &host_dy));
        let (p, q) = (up(b, &host_p), up(b, &host_q));
        let check = |what: &str, g: &Gemm, got: Vec<f32>, a: &[f32], bm: &[f32]| {
            let tol = Tol::gemm(g.k, 1.0, 1.0);
            compare("gemm", what, &got, &bf16_product(g, a, bm), tol, None)
        };
        let y = product(b, &forward, &x, &w)?;
        check("forward", &forward, y, &host_x, &host_w[0])?;
        let pq = product(b, &other, &p, &q)?;
        check("another layer", &other, pq, &host_p, &host_q)?;
        let dx = product(b, &input_grad, &dy, &w)?;
        check(
            "input gradient",
            &input_grad,
            dx.clone(),
            &host_dy,
            &host_w[0],
        )?;
        if product(b, &input_grad, &dy, &w)? != dx {
            return Err("the input gradient twice differs".into());
        }
        b.write(&mut w, &host_w[1]).map_err(|e| e.to_string())?;
        let dx = product(b, &input_grad, &dy, &w)?;
        check("W overwritten", &input_grad, dx, &host_dy, &host_w[1])?;

        // X X^T: one buffer as A and as B.
        let gram = Gemm::new(rows, rows, inp).trans_b();
        let mut x = x;
        let xx = product(b, &gram, &x, &x)?;
        check("X X^T", &gram, xx, &host_x, &host_x)?;
        b.write(&mut x, &host_w[1][..rows * inp])
            .map_err(|e| e.to_string())?;
        let xx = product(b, &gram, &x, &x)?;
        let new_x = &host_w[1][..rows * inp];
        check("X X^T, X overwritten", &gram, xx, new_x, new_x)
    }

    /// LayerNorm (y, and dx in its backward), GELU (alone and after a bias), the GELU gradient
    /// and the tensor-core attention (its output and d_qkv) write the bf16 copy of their output as they write it
    /// (the bf16 mode's producing kernels): a product that reads such an output multiplies
    /// bitwise what it multiplies from the same values uploaded into a fresh buffer (copied by
    /// `round_to_bf16`), again after the producer overwrites it.
    #[test]
    fn produced_copies_are_the_copies_of_the_outputs() {
        fixed(b(), check_produced_copies);
    }

    fn check_produced_copies<B: Backend>(b: &B) -> Check {
        // 640 rows of `cols` features into 576: above the copies' threshold for any `cols`.
        let (rows, cols) = (640, 64);
        let same_as_fresh_of = |what: &str, y: &B::Buf, cols: usize| -> Check {
            let g = Gemm::new(rows, 576, cols).trans_b();
            let w = up(b, &data(21, 576 * cols, cols, Fill::Uniform));
            let produced = product(b, &g, y, &w)?;
            let fresh = product(b, &g, &up(b, &down(b, y)), &w)?;
            match (0..produced.len()).find(|&i| produced[i].to_bits() != fresh[i].to_bits()) {
                Some(i) => Err(format!(
                    "{what}: element {i} of the product is {} from the produced copy, {} from a \
                     fresh one",
                    produced[i], fresh[i]
                )),
                None => Ok(()),
            }
        };
        let same_as_fresh = |what: &str, y: &B::Buf| same_as_fresh_of(what, y, cols);
        let n = rows * cols;
        let host = |seed| data(seed, n, cols, Fill::Uniform);
        let (gamma, beta) = (
            up(b, &data(22, cols, cols, Fill::Uniform)),
            up(b, &data(23, cols, cols, Fill::Uniform)),
        );
        let bias = up(b, &data(24, cols, cols, Fill::Uniform));
        let (mut mean, mut rstd) = (up(b, &vec![0.0; rows]), up(b, &vec![0.0; rows]));
        let mut y = up(b, &vec![f32::NAN; n]);
        let mut pre = up(b, &host(25));
        let fail = |e: mae::backend::BackendError| e.to_string();
        for seed in [26, 27] {
            let x = up(b, &host(seed));
            b.layernorm_forward(
                &x, &gamma, &beta, &mut y, &mut mean, &mut rstd, rows, cols, 1e-6,
            )
            .map_err(fail)?;
            same_as_fresh(&format!("layernorm_forward, input {seed}"), &y)?;
            b.gelu_forward(&x, &mut y).map_err(fail)?;
            same_as_fresh(&format!("gelu_forward, input {seed}"), &y)?;
            b.bias_gelu_forward(&bias, &mut pre, &mut y, rows, cols)
                .map_err(fail)?;
            same_as_fresh(&format!("bias_gelu_forward, input {seed}"), &y)?;
            let dy = up(b, &host(seed + 10));
            b.gelu_backward(&x, &dy, &mut y, true).map_err(fail)?;
            same_as_fresh(&format!("gelu_backward (accumulating), input {seed}"), &y)?;
            b.gelu_backward(&x, &dy, &mut y, false).map_err(fail)?;
            same_as_fresh(&format!("gelu_backward (overwriting), input {seed}"), &y)?;
            let (mut dgamma, mut dbeta) = (up(b, &vec![0.0; cols]), up(b, &vec![0.0; cols]));
            b.layernorm_backward(
                &dy,
                &x,
                &gamma,
                &mean,
                &rstd,
                &mut y,
                &mut dgamma,
                &mut dbeta,
                rows,
                cols,
            )
            .map_err(fail)?;
            same_as_fresh(
                &format!("layernorm_backward dx (accumulating), input {seed}"),
                &y,
            )?;
        }
        // 4 images of 160 tokens, 2 heads of 32: out is 640 x 64, d_qkv 640 x 192.
        let a = Attention {
            batch: 4,
            tokens: 160,
            heads: 2,
            head_dim: 32,
            scale: 32f32.powf(-0.5),
        };
        if !b.fused_attention(&a) {
            eprintln!(
                "{}: attention composes here (MAE_CUDA_ATTENTION): no attention kernel to check",
                b.name()
            );
            return Ok(());
        }
        let (lq, lo, ll) = a.lens();
        let (mut out, mut lse) = (up(b, &vec![f32::NAN; lo]), up(b, &vec![f32::NAN; ll]));
        let mut d_qkv = up(b, &vec![f32::NAN; lq]);
        for seed in [31, 32] {
            let qkv = up(b, &data(seed, lq, 3 * cols, Fill::Uniform));
            b.attention_forward(&qkv, &mut out, &mut lse, &a)
                .map_err(fail)?;
            same_as_fresh(&format!("attention_forward out, input {seed}"), &out)?;
            let d_out = up(b, &data(seed + 10, lo, cols, Fill::Uniform));
            b.attention_backward(&qkv, &out, &lse, &d_out, &mut d_qkv, &a)
                .map_err(fail)?;
            same_as_fresh_of(
                &format!("attention_backward d_qkv, input {seed}"),
                &d_qkv,
                3 * cols,
            )?;
        }
        Ok(())
    }

    #[test]
    fn bf16_nearest_rounds_to_nearest_even() {
        assert_eq!(bf16_nearest(1.0 + 1.0 / 256.0), 1.0); // a tie, to even
        assert_eq!(bf16_nearest(1.0 + 3.0 / 256.0), 1.0 + 4.0 / 256.0); // a tie, to even
        assert_eq!(bf16_nearest(1.0 + 1.0 / 512.0), 1.0);
        assert_eq!(bf16_nearest(-(1.0 + 5.0 / 512.0)), -(1.0 + 1.0 / 128.0));
        assert_eq!(bf16_nearest(f32::MAX), f32::INFINITY);
        assert!(bf16_nearest(f32::NAN).is_nan());
    }
}
