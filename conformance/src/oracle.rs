//! A plain f64 reference of every [`Backend`](mae::backend::Backend) op, written for reading,
//! not for speed, plus the test data generator and the tolerance check the conformance tests use.
//!
//! Each function has the semantics of the trait method of the same name: the same buffers, the
//! same descriptors, the same overwrite-or-accumulate rule, and it leaves untouched whatever the
//! op must leave untouched. Scalars that a backend receives as `f32` (`alpha`, `eps`, `scale`,
//! the AdamW constants) are taken as the exact `f64` value of that `f32`, so the only difference
//! between a backend and the oracle is the backend's f32 arithmetic.

use mae::backend::{AdamWStep, Gather, Gemm, Heads, PatchOrder, Patchify, RowMap};

// ---- dense --------------------------------------------------------------------------------------

/// `C[b] = alpha * op(A[b]) * op(B[b]) + beta * C[b]`; with `beta == 0` the old C is ignored.
/// Elements of `c` outside every `C[b]` (stride padding, the tail) are left as they are.
pub fn gemm(g: &Gemm, a: &[f64], b: &[f64], c: &mut [f64]) {
    let (m, n, k) = (g.m, g.n, g.k);
    for batch in 0..g.batch {
        let (oa, ob, oc) = (batch * g.stride_a, batch * g.stride_b, batch * g.stride_c);
        for i in 0..m {
            for j in 0..n {
                let mut sum = 0.0;
                for p in 0..k {
                    // op(A)[i, p] and op(B)[p, j].
                    let a_ip = if g.trans_a {
                        a[oa + p * m + i]
                    } else {
                        a[oa + i * k + p]
                    };
                    let b_pj = if g.trans_b {
                        b[ob + j * k + p]
                    } else {
                        b[ob + p * n + j]
                    };
                    sum += a_ip * b_pj;
                }
                let old = if g.beta == 0.0 {
                    0.0
                } else {
                    g.beta as f64 * c[oc + i * n + j]
                };
                c[oc + i * n + j] = g.alpha as f64 * sum + old;
            }
        }
    }
}

/// `dst += src` over `dst`'s length.
pub fn add(src: &[f64], dst: &mut [f64]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d += *s;
    }
}

/// `buf *= s`.
pub fn scale(buf: &mut [f64], s: f32) {
    for x in buf.iter_mut() {
        *x *= s as f64;
    }
}

/// `dst[r] = src[r] * scales[r / rows_per_scale]` (or `+=` with `accumulate`) for every row `r`
/// of `cols` values; overwriting never reads `dst`.
pub fn scale_rows(
    src: &[f64],
    scales: &[f64],
    dst: &mut [f64],
    rows_per_scale: usize,
    cols: usize,
    accumulate: bool,
) {
    for (i, (d, s)) in dst.iter_mut().zip(src).enumerate() {
        let v = s * scales[i / cols / rows_per_scale];
        *d = if accumulate { *d + v } else { v };
    }
}

// ---- rows -----------------------------------------------------------------------------------

/// Destination rows of `map` get (`accumulate == false`) or are increased by their source rows.
pub fn copy_rows(src: &[f64], dst: &mut [f64], map: &RowMap, accumulate: bool) {
    let c = map.cols;
    for b in 0..map.batch {
        for i in 0..map.count {
            let (s, d) = (map.src_row(b, i), map.dst_row(b, i));
            for j in 0..c {
                let v = src[s * c + j];
                if accumulate {
                    dst[d * c + j] += v;
                } else {
                    dst[d * c + j] = v;
                }
            }
        }
    }
}

/// Every source row accumulates the `d_dst` rows it was copied to.
pub fn copy_rows_backward(d_dst: &[f64], d_src: &mut [f64], map: &RowMap) {
    let c = map.cols;
    for b in 0..map.batch {
        for i in 0..map.count {
            let (s, d) = (map.src_row(b, i), map.dst_row(b, i));
            for j in 0..c {
                d_src[s * c + j] += d_dst[d * c + j];
            }
        }
    }
}

/// Destination row `b * dst_rows + dst_start + j` = source row `b * src_rows + idx[b * count + j]`.
pub fn gather_rows(src: &[f64], idx: &[u32], dst: &mut [f64], g: &Gather) {
    let c = g.cols;
    for b in 0..g.batch {
        for j in 0..g.count {
            let s = b * g.src_stride + g.src_start + idx[b * g.count + j] as usize;
            let d = b * g.dst_rows + g.dst_start + j;
            dst[d * c..(d + 1) * c].copy_from_slice(&src[s * c..(s + 1) * c]);
        }
    }
}

/// Indexed rows of `d_src` accumulate the `d_dst` rows gathered from them.
pub fn gather_rows_backward(d_dst: &[f64], idx: &[u32], d_src: &mut [f64], g: &Gather) {
    let c = g.cols;
    for b in 0..g.batch {
        for j in 0..g.count {
            let s = b * g.src_stride + g.src_start + idx[b * g.count + j] as usize;
            let d = b * g.dst_rows + g.dst_start + j;
            for col in 0..c {
                d_src[s * c + col] += d_dst[d * c + col];
            }
        }
    }
}

/// Images `[N, C, H, W]` to patches `[N, L, p * p * C]` (overwrites `out`).
pub fn patchify(imgs: &[f64], out: &mut [f64], p: &Patchify) {
    let (ch, h, w, ps) = (p.channels, p.height, p.width, p.patch);
    let (gh, gw) = (h / ps, w / ps);
    let len = ps * ps * ch;
    for n in 0..p.batch {
        for py in 0..gh {
            for px in 0..gw {
                let l = py * gw + px;
                for c in 0..ch {
                    for y in 0..ps {
                        for x in 0..ps {
                            let inner = match p.order {
                                PatchOrder::Chw => (c * ps + y) * ps + x,
                                PatchOrder::Hwc => (y * ps + x) * ch + c,
                            };
                            let pixel = ((n * ch + c) * h + py * ps + y) * w + px * ps + x;
                            out[(n * gh * gw + l) * len + inner] = imgs[pixel];
                        }
                    }
                }
            }
        }
    }
}

/// Index into the token matrix of `heads[b, h, t, j]`, and into the per-head tensor.
fn head_indices(hd: &Heads, b: usize, h: usize, t: usize, j: usize) -> (usize, usize) {
    let x = (b * hd.tokens + t) * hd.row_width + hd.col_offset + h * hd.head_dim + j;
    let y = ((b * hd.heads + h) * hd.tokens + t) * hd.head_dim + j;
    (x, y)
}

/// `heads[b, h, t, j] = x[b * T + t, off + h * hd + j]` (overwrites `heads`).
pub fn split_heads(x: &[f64], heads: &mut [f64], hd: &Heads) {
    for b in 0..hd.batch {
        for h in 0..hd.heads {
            for t in 0..hd.tokens {
                for j in 0..hd.head_dim {
                    let (xi, hi) = head_indices(hd, b, h, t, j);
                    heads[hi] = x[xi];
                }
            }
        }
    }
}

/// The inverse of [`split_heads`]: overwrites only the head columns of `x`.
pub fn merge_heads(heads: &[f64], x: &mut [f64], hd: &Heads) {
    for b in 0..hd.batch {
        for h in 0..hd.heads {
            for t in 0..hd.tokens {
                for j in 0..hd.head_dim {
                    let (xi, hi) = head_indices(hd, b, h, t, j);
                    x[xi] = heads[hi];
                }
            }
        }
    }
}

// ---- normalization and activation --------------------------------------------------------

/// LayerNorm with biased variance; overwrites `y`, `mean` and `rstd`.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward(
    x: &[f64],
    gamma: &[f64],
    beta: &[f64],
    y: &mut [f64],
    mean: &mut [f64],
    rstd: &mut [f64],
    rows: usize,
    cols: usize,
    eps: f64,
) {
    for r in 0..rows {
        let row = &x[r * cols..(r + 1) * cols];
        let mu = row.iter().sum::<f64>() / cols as f64;
        let var = row.iter().map(|v| (v - mu) * (v - mu)).sum::<f64>() / cols as f64;
        let rs = 1.0 / (var + eps).sqrt();
        for c in 0..cols {
            y[r * cols + c] = (row[c] - mu) * rs * gamma[c] + beta[c];
        }
        mean[r] = mu;
        rstd[r] = rs;
    }
}

/// LayerNorm backward from the forward's `mean` and `rstd`; accumulates into `dx`, `dgamma`,
/// `dbeta`. With `xhat = (x - mean) * rstd` and `g = dy * gamma`:
/// `dx = rstd * (g - mean(g) - xhat * mean(g * xhat))`, `dgamma = sum dy * xhat`, `dbeta = sum dy`.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(
    dy: &[f64],
    x: &[f64],
    gamma: &[f64],
    mean: &[f64],
    rstd: &[f64],
    dx: &mut [f64],
    dgamma: &mut [f64],
    dbeta: &mut [f64],
    rows: usize,
    cols: usize,
) {
    for r in 0..rows {
        let xhat: Vec<f64> = (0..cols)
            .map(|c| (x[r * cols + c] - mean[r]) * rstd[r])
            .collect();
        let g: Vec<f64> = (0..cols).map(|c| dy[r * cols + c] * gamma[c]).collect();
        let mean_g = g.iter().sum::<f64>() / cols as f64;
        let mean_gx = g.iter().zip(&xhat).map(|(g, xh)| g * xh).sum::<f64>() / cols as f64;
        for c in 0..cols {
            dx[r * cols + c] += rstd[r] * (g[c] - mean_g - xhat[c] * mean_gx);
            dgamma[c] += dy[r * cols + c] * xhat[c];
            dbeta[c] += dy[r * cols + c];
        }
    }
}

/// The standard normal CDF `Phi(x) = 0.5 (1 + erf(x / sqrt 2))`.
pub fn normal_cdf(x: f64) -> f64 {
    0.5 * (1.0 + libm::erf(x / core::f64::consts::SQRT_2))
}

/// The standard normal density `phi(x) = exp(-x^2 / 2) / sqrt(2 pi)`.
pub fn normal_pdf(x: f64) -> f64 {
    (-0.5 * x * x).exp() / (2.0 * core::f64::consts::PI).sqrt()
}

/// Exact GELU: `x Phi(x) = 0.5 x (1 + erf(x / sqrt 2))`.
pub fn gelu(x: f64) -> f64 {
    x * normal_cdf(x)
}

/// The derivative of [`gelu`]: `Phi(x) + x phi(x)`.
pub fn gelu_grad(x: f64) -> f64 {
    normal_cdf(x) + x * normal_pdf(x)
}

/// Overwrites `y` with `gelu(x)`.
pub fn gelu_forward(x: &[f64], y: &mut [f64]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y = gelu(*x);
    }
}

/// Accumulates `dy * gelu'(x)` into `dx`.
pub fn gelu_backward(x: &[f64], dy: &[f64], dx: &mut [f64]) {
    for i in 0..dx.len() {
        dx[i] += dy[i] * gelu_grad(x[i]);
    }
}

/// Row softmax of `scale * x`; overwrites `y`.
pub fn softmax_forward(x: &[f64], y: &mut [f64], rows: usize, cols: usize, scale: f32) {
    let s = scale as f64;
    for r in 0..rows {
        let row = &x[r * cols..(r + 1) * cols];
        let max = row.iter().map(|v| s * v).fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = row.iter().map(|v| (s * v - max).exp()).sum();
        for c in 0..cols {
            y[r * cols + c] = (s * row[c] - max).exp() / sum;
        }
    }
}

/// Accumulates `scale * y * (dy - sum(dy * y))` into `dx`.
pub fn softmax_backward(
    y: &[f64],
    dy: &[f64],
    dx: &mut [f64],
    rows: usize,
    cols: usize,
    scale: f32,
) {
    for r in 0..rows {
        let dot: f64 = (0..cols).map(|c| dy[r * cols + c] * y[r * cols + c]).sum();
        for c in 0..cols {
            let i = r * cols + c;
            dx[i] += scale as f64 * y[i] * (dy[i] - dot);
        }
    }
}

// ---- loss ---------------------------------------------------------------------------------

/// Each row to `(x - mean) / sqrt(var + eps)` with the unbiased variance; overwrites `y`.
pub fn normalize_rows(x: &[f64], y: &mut [f64], rows: usize, cols: usize, eps: f64) {
    for r in 0..rows {
        let row = &x[r * cols..(r + 1) * cols];
        let mu = row.iter().sum::<f64>() / cols as f64;
        let var = row.iter().map(|v| (v - mu) * (v - mu)).sum::<f64>() / (cols - 1) as f64;
        let d = (var + eps).sqrt();
        for c in 0..cols {
            y[r * cols + c] = (row[c] - mu) / d;
        }
    }
}

/// `loss[0] = sum_r mask[r] * mean_c (pred - target)^2 / sum_r mask[r]`; overwrites `loss`.
pub fn masked_mse_forward(
    pred: &[f64],
    target: &[f64],
    mask: &[f64],
    loss: &mut [f64],
    rows: usize,
    cols: usize,
) {
    let mut num = 0.0;
    for r in 0..rows {
        let se: f64 = (0..cols)
            .map(|c| (pred[r * cols + c] - target[r * cols + c]).powi(2))
            .sum();
        num += mask[r] * se / cols as f64;
    }
    loss[0] = num / mask[..rows].iter().sum::<f64>();
}

/// Accumulates `d_loss * mask[r] * 2 (pred - target) / (cols * sum(mask))` into `d_pred`.
pub fn masked_mse_backward(
    pred: &[f64],
    target: &[f64],
    mask: &[f64],
    d_pred: &mut [f64],
    rows: usize,
    cols: usize,
    d_loss: f32,
) {
    let msum: f64 = mask[..rows].iter().sum();
    for (r, &m) in mask[..rows].iter().enumerate() {
        for c in 0..cols {
            let i = r * cols + c;
            d_pred[i] += d_loss as f64 * m * 2.0 * (pred[i] - target[i]) / (cols as f64 * msum);
        }
    }
}

// ---- optimizer --------------------------------------------------------------------------------

/// One AdamW step in place, PyTorch semantics, with the step's f32 constants.
pub fn adamw(param: &mut [f64], grad: &[f64], m: &mut [f64], v: &mut [f64], s: &AdamWStep) {
    let (lr, b1, b2) = (s.lr as f64, s.beta1 as f64, s.beta2 as f64);
    let (eps, wd) = (s.eps as f64, s.weight_decay as f64);
    let (bc1, bc2) = (s.bias_correction1 as f64, s.bias_correction2 as f64);
    for i in 0..param.len() {
        let g = grad[i];
        param[i] -= lr * wd * param[i];
        m[i] = b1 * m[i] + (1.0 - b1) * g;
        v[i] = b2 * v[i] + (1.0 - b2) * g * g;
        param[i] -= (lr / bc1) * m[i] / (v[i].sqrt() / bc2.sqrt() + eps);
    }
}

// ---- test data ------------------------------------------------------------------------------

/// A tiny deterministic generator (SplitMix64), so a failing case is its seed.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x853c_49e6_748f_ea9b)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `[-1, 1)`, on a grid of `2^-23` (exact in f32).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    /// Uniform in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    /// A random permutation of `0..n`.
    pub fn permutation(&mut self, n: usize) -> Vec<u32> {
        let mut p: Vec<u32> = (0..n as u32).collect();
        for i in (1..n).rev() {
            p.swap(i, self.below(i + 1));
        }
        p
    }
}

/// How test data is drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fill {
    /// Uniform in `[-1, 1)`.
    Uniform,
    /// Uniform, with about one value in eight multiplied by 100.
    Outliers,
    /// Uniform, with every third row constant. The constants are dyadic (0, ±0.5, ±0.75, ±1):
    /// a row of them sums exactly in f32, so an f32 mean is exact and the normalized row is
    /// exactly 0. (With an arbitrary constant the f32 mean is off by an ulp, and layernorm's
    /// `rstd = 1/sqrt(eps)` of ~1000 magnifies that: an ill-conditioned input, not a bug.)
    ConstRows,
}

pub const FILLS: [Fill; 3] = [Fill::Uniform, Fill::Outliers, Fill::ConstRows];

/// `len` values drawn per `fill`, as rows of `cols` (which only [`Fill::ConstRows`] uses).
pub fn data(seed: u64, len: usize, cols: usize, fill: Fill) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    let mut v: Vec<f32> = (0..len).map(|_| rng.uniform()).collect();
    match fill {
        Fill::Uniform => {}
        Fill::Outliers => {
            for x in v.iter_mut() {
                if rng.below(8) == 0 {
                    *x *= 100.0;
                }
            }
        }
        Fill::ConstRows => {
            const CONSTS: [f32; 7] = [0.0, 0.5, -0.5, 0.75, -0.75, 1.0, -1.0];
            let cols = cols.max(1);
            for (r, row) in v.chunks_mut(cols).enumerate() {
                if r % 3 == 0 {
                    row.fill(CONSTS[rng.below(CONSTS.len())]);
                }
            }
        }
    }
    v
}

/// f32 values to f64, exactly.
pub fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// f64 values rounded to f32.
pub fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

// ---- tolerances ------------------------------------------------------------------------------

/// `|got - want| <= atol + rtol * |want|` per element, rust-backends.md §9.
#[derive(Clone, Copy, Debug)]
pub struct Tol {
    pub atol: f64,
    pub rtol: f64,
}

impl Tol {
    /// Elementwise ops and GELU.
    pub const ELEMENTWISE: Tol = Tol {
        atol: 1e-6,
        rtol: 1e-5,
    };
    /// Softmax, layernorm, row normalization, the loss.
    pub const REDUCTION: Tol = Tol {
        atol: 1e-5,
        rtol: 1e-4,
    };
    /// AdamW.
    pub const ADAMW: Tol = Tol {
        atol: 1e-6,
        rtol: 1e-5,
    };
    /// Data movement: bitwise.
    pub const EXACT: Tol = Tol {
        atol: 0.0,
        rtol: 0.0,
    };

    /// GEMM: `atol = 4 K eps_f32 max(|a|_inf |b|_inf, 1)`, scaled with `K` and the operands.
    pub fn gemm(k: usize, max_a: f64, max_b: f64) -> Tol {
        Tol {
            atol: 4.0 * k.max(1) as f64 * f32::EPSILON as f64 * (max_a * max_b).max(1.0),
            rtol: 1e-5,
        }
    }

    /// The same tolerance with `atol` multiplied by `s` (at least 1): for values computed from
    /// terms of magnitude `s`, where cancellation leaves the result much smaller than its terms.
    pub fn scaled(self, s: f64) -> Tol {
        Tol {
            atol: self.atol * s.max(1.0),
            rtol: self.rtol,
        }
    }
}

/// Largest absolute value (0 for an empty slice).
pub fn max_abs(v: &[f64]) -> f64 {
    v.iter().fold(0.0, |m, x| m.max(x.abs()))
}

/// Compares `got` (f32 from a backend, or f64) with `want` element by element under `tol`, with a per-element `atol` scale
/// (`scale[i]`, see [`Tol::scaled`]) when given. A NaN in `want` (an untouched NaN) requires a NaN
/// in `got`. On failure the message names the op, the shape, the first failing index, and the max
/// absolute and relative errors over the whole buffer.
pub fn compare<T: Copy + Into<f64> + core::fmt::Display>(
    what: &str,
    shape: &str,
    got: &[T],
    want: &[f64],
    tol: Tol,
    scale: Option<&[f64]>,
) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!(
            "{what} [{shape}]: length {} != expected {}",
            got.len(),
            want.len()
        ));
    }
    let (mut max_abs_err, mut max_abs_at) = (0.0f64, 0usize);
    let (mut max_rel_err, mut max_rel_at) = (0.0f64, 0usize);
    let mut first_bad: Option<usize> = None;
    let mut bad = 0usize;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let g: f64 = g.into();
        let ok = if w.is_nan() {
            g.is_nan()
        } else if !g.is_finite() {
            false
        } else {
            let err = (g - w).abs();
            let rel = if w != 0.0 { err / w.abs() } else { err };
            if err > max_abs_err {
                (max_abs_err, max_abs_at) = (err, i);
            }
            if rel > max_rel_err {
                (max_rel_err, max_rel_at) = (rel, i);
            }
            let t = tol.scaled(scale.map_or(1.0, |s| s[i]));
            err <= t.atol + t.rtol * w.abs()
        };
        if !ok {
            bad += 1;
            first_bad.get_or_insert(i);
        }
    }
    match first_bad {
        None => Ok(()),
        Some(i) => Err(format!(
            "{what} [{shape}]: {bad} of {} elements out of tolerance (atol {:e}, rtol {:e}); \
             first at index {i}: got {}, want {}, allowed {:e}; \
             max abs err {max_abs_err:e} at {max_abs_at}, max rel err {max_rel_err:e} at {max_rel_at}",
            got.len(),
            tol.atol,
            tol.rtol,
            got[i],
            want[i],
            tol.scaled(scale.map_or(1.0, |s| s[i])).atol + tol.rtol * want[i].abs(),
        )),
    }
}

/// Checks that `got[i]` is bitwise `init[i]` wherever `touched[i]` is false.
pub fn untouched(
    what: &str,
    shape: &str,
    got: &[f32],
    init: &[f32],
    touched: &[bool],
) -> Result<(), String> {
    for i in 0..got.len() {
        if !touched[i] && got[i].to_bits() != init[i].to_bits() {
            return Err(format!(
                "{what} [{shape}]: element {i} must be left untouched: was {}, now {}",
                init[i], got[i]
            ));
        }
    }
    Ok(())
}
