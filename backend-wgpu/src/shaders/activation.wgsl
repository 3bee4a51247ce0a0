// Exact GELU (elementwise), bias + GELU fused (elementwise) and the attention softmax (one
// invocation per row, or one workgroup per row in the `_group` kernels at the end).

// ---- gelu -----------------------------------------------------------------------------------

const FRAC_1_SQRT_2: f32 = 0.70710678118654752;
const FRAC_1_SQRT_2PI: f32 = 0.39894228040143268;

// erfc(z) for z >= 0: the Chebyshev fit of Numerical Recipes (`erfcc`), relative error below
// 1.2e-7 everywhere, so its f32 evaluation stays within a few ulps of the true value.
fn erfc_nonneg(z: f32) -> f32 {
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 +
        t * (-0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 +
        t * (-0.82215223 + t * 0.17087277))))))));
    return t * exp(-z * z + poly);
}

// The standard normal CDF, erfc(-x / sqrt 2) / 2, taking the tail from erfc on either side so
// that a tiny result for negative x keeps its digits (1 + erf(x / sqrt 2) would cancel them).
fn phi(x: f32) -> f32 {
    let z = -x * FRAC_1_SQRT_2;
    if z >= 0.0 {
        return 0.5 * erfc_nonneg(z);
    }
    return 1.0 - 0.5 * erfc_nonneg(-z);
}

struct EltParams {
    n: u32,
}

@group(0) @binding(0) var<uniform> ep: EltParams;
@group(0) @binding(1) var<storage, read> gelu_x: array<f32>;
@group(0) @binding(2) var<storage, read_write> gelu_y: array<f32>;

@compute @workgroup_size(WG)
fn gelu_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let i = flat_id(wg, nwg, lid);
    if i < ep.n {
        let x = gelu_x[i];
        gelu_y[i] = x * phi(x);
    }
}

// Binding 2 is dy here, binding 3 the accumulated dx.
@group(0) @binding(2) var<storage, read> gelu_dy: array<f32>;
@group(0) @binding(3) var<storage, read_write> gelu_dx: array<f32>;

// dx += dy (Phi(x) + x exp(-x^2 / 2) / sqrt(2 pi)).
@compute @workgroup_size(WG)
fn gelu_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let i = flat_id(wg, nwg, lid);
    if i < ep.n {
        let x = gelu_x[i];
        let grad = phi(x) + x * exp(-0.5 * x * x) * FRAC_1_SQRT_2PI;
        gelu_dx[i] += gelu_dy[i] * grad;
    }
}

// ---- bias + gelu (the MLP's fc1 epilogue) ---------------------------------------------------

struct BiasGeluParams {
    n: u32,
    cols: u32,
}

@group(0) @binding(0) var<uniform> bgp: BiasGeluParams;
@group(0) @binding(1) var<storage, read> bg_bias: array<f32>;
@group(0) @binding(2) var<storage, read_write> bg_pre: array<f32>;
@group(0) @binding(3) var<storage, read_write> bg_act: array<f32>;

// pre += bias (one f32 add, as copy_rows accumulating a bias row does), then act = gelu(pre) as
// gelu_forward computes it: bitwise those two kernels in turn, reading and writing pre once.
@compute @workgroup_size(WG)
fn bias_gelu_forward(@builtin(workgroup_id) wg: vec3<u32>,
                     @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    let i = flat_id(wg, nwg, lid);
    if i < bgp.n {
        let x = bg_pre[i] + bg_bias[i % bgp.cols];
        bg_pre[i] = x;
        bg_act[i] = x * phi(x);
    }
}

// ---- softmax --------------------------------------------------------------------------------

struct RowParams {
    rows: u32,
    cols: u32,
    scale: f32,
}

@group(0) @binding(0) var<uniform> rp: RowParams;
@group(0) @binding(1) var<storage, read> sm_x: array<f32>;
@group(0) @binding(2) var<storage, read_write> sm_y: array<f32>;

// Softmax of scale * x: the row maximum is subtracted first, so exp never overflows and the
// largest term is exactly 1; the exponentials are stored, summed, then scaled in place.
@compute @workgroup_size(WG)
fn softmax_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let r = flat_id(wg, nwg, lid);
    if r >= rp.rows {
        return;
    }
    let at = r * rp.cols;
    var mx = -3.40282347e38;
    for (var c = 0u; c < rp.cols; c++) {
        mx = max(mx, rp.scale * sm_x[at + c]);
    }
    var acc = sum_new();
    for (var c = 0u; c < rp.cols; c++) {
        let e = exp(rp.scale * sm_x[at + c] - mx);
        sm_y[at + c] = e;
        acc = sum_add(acc, e);
    }
    let inv = 1.0 / sum_value(acc);
    for (var c = 0u; c < rp.cols; c++) {
        sm_y[at + c] *= inv;
    }
}

// Binding 1 is y, 2 is dy, 3 the accumulated dx.
@group(0) @binding(1) var<storage, read> sb_y: array<f32>;
@group(0) @binding(2) var<storage, read> sb_dy: array<f32>;
@group(0) @binding(3) var<storage, read_write> sb_dx: array<f32>;

// dx += scale * y * (dy - sum(dy * y)).
@compute @workgroup_size(WG)
fn softmax_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) lid: u32) {
    let r = flat_id(wg, nwg, lid);
    if r >= rp.rows {
        return;
    }
    let at = r * rp.cols;
    var acc = sum_new();
    for (var c = 0u; c < rp.cols; c++) {
        acc = sum_add(acc, sb_dy[at + c] * sb_y[at + c]);
    }
    let dot = sum_value(acc);
    for (var c = 0u; c < rp.cols; c++) {
        sb_dx[at + c] += rp.scale * sb_y[at + c] * (sb_dy[at + c] - dot);
    }
}

// ---- softmax, one workgroup per row (per_row.rs `RowKernel::Workgroup`) ---------------------
//
// The kernels above with a workgroup of ROW_WG invocations per row (`row_group.wgsl`). Each
// invocation scales the exponentials it stored itself, so the last pass needs no barrier.

@compute @workgroup_size(ROW_WG)
fn softmax_forward_group(@builtin(workgroup_id) wg: vec3<u32>,
                         @builtin(num_workgroups) nwg: vec3<u32>,
                         @builtin(local_invocation_index) lid: u32) {
    let r = group_row(wg, nwg);
    if r >= rp.rows {
        return;
    }
    let at = r * rp.cols;
    var part_max = -3.40282347e38;
    for (var c = lid; c < rp.cols; c += ROW_WG) {
        part_max = max(part_max, rp.scale * sm_x[at + c]);
    }
    let mx = group_max(lid, part_max);
    var acc = sum_new();
    for (var c = lid; c < rp.cols; c += ROW_WG) {
        let e = exp(rp.scale * sm_x[at + c] - mx);
        sm_y[at + c] = e;
        acc = sum_add(acc, e);
    }
    let inv = 1.0 / sum_value(group_sum(lid, acc));
    for (var c = lid; c < rp.cols; c += ROW_WG) {
        sm_y[at + c] *= inv;
    }
}

@compute @workgroup_size(ROW_WG)
fn softmax_backward_group(@builtin(workgroup_id) wg: vec3<u32>,
                          @builtin(num_workgroups) nwg: vec3<u32>,
                          @builtin(local_invocation_index) lid: u32) {
    let r = group_row(wg, nwg);
    if r >= rp.rows {
        return;
    }
    let at = r * rp.cols;
    var acc = sum_new();
    for (var c = lid; c < rp.cols; c += ROW_WG) {
        acc = sum_add(acc, sb_dy[at + c] * sb_y[at + c]);
    }
    let dot = sum_value(group_sum(lid, acc));
    for (var c = lid; c < rp.cols; c += ROW_WG) {
        sb_dx[at + c] += rp.scale * sb_y[at + c] * (sb_dy[at + c] - dot);
    }
}
