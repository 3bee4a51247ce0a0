// LayerNorm and the norm-pix target. Row statistics take one invocation per row, walking the
// row in order with compensated sums (deterministic, and accurate to about one rounding), or, in
// the `_group` kernels at the end, one workgroup per row; the parameter gradients are column
// sums (columns.wgsl).

struct Params {
    rows: u32,
    cols: u32,
    eps: f32,
}

@group(0) @binding(0) var<uniform> p: Params;

// The row helpers read ln_x (binding 1), the input of both row kernels.

// The row mean, refined by one correction pass: the mean of the residuals is added back, so a
// row of equal values has exactly that mean and normalizes to exactly 0.
fn row_mean(x_at: u32, n: u32) -> f32 {
    var acc = sum_new();
    for (var c = 0u; c < n; c++) {
        acc = sum_add(acc, ln_x[x_at + c]);
    }
    let mean = sum_value(acc) / f32(n);
    var res = sum_new();
    for (var c = 0u; c < n; c++) {
        res = sum_add(res, ln_x[x_at + c] - mean);
    }
    return mean + sum_value(res) / f32(n);
}

// Sum of squared deviations from `mean`.
fn row_ssd(x_at: u32, n: u32, mean: f32) -> f32 {
    var acc = sum_new();
    for (var c = 0u; c < n; c++) {
        let d = ln_x[x_at + c] - mean;
        acc = sum_add(acc, d * d);
    }
    return sum_value(acc);
}


// ---- layernorm_forward --------------------------------------------------------------------------

@group(0) @binding(1) var<storage, read> ln_x: array<f32>;
@group(0) @binding(2) var<storage, read> ln_gamma: array<f32>;
@group(0) @binding(3) var<storage, read> ln_beta: array<f32>;
@group(0) @binding(4) var<storage, read_write> ln_y: array<f32>;
@group(0) @binding(5) var<storage, read_write> ln_mean: array<f32>;
@group(0) @binding(6) var<storage, read_write> ln_rstd: array<f32>;

@compute @workgroup_size(WG)
fn layernorm_forward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    let r = flat_id(wg, nwg, lid);
    if r >= p.rows {
        return;
    }
    let at = r * p.cols;
    let mean = row_mean(at, p.cols);
    let rstd = 1.0 / sqrt(row_ssd(at, p.cols, mean) / f32(p.cols) + p.eps);
    ln_mean[r] = mean;
    ln_rstd[r] = rstd;
    for (var c = 0u; c < p.cols; c++) {
        ln_y[at + c] = (ln_x[at + c] - mean) * rstd * ln_gamma[c] + ln_beta[c];
    }
}

// ---- layernorm_backward -----------------------------------------------------------------------

@group(0) @binding(1) var<storage, read> lb_dy: array<f32>;
@group(0) @binding(2) var<storage, read> lb_x: array<f32>;
@group(0) @binding(3) var<storage, read> lb_gamma: array<f32>;
@group(0) @binding(4) var<storage, read> lb_mean: array<f32>;
@group(0) @binding(5) var<storage, read> lb_rstd: array<f32>;
@group(0) @binding(6) var<storage, read_write> lb_dx: array<f32>;

// dx += rstd (dy g - mean(dy g) - xhat mean(dy g xhat)), one invocation per row.
@compute @workgroup_size(WG)
fn layernorm_backward_rows(@builtin(workgroup_id) wg: vec3<u32>,
                           @builtin(num_workgroups) nwg: vec3<u32>,
                           @builtin(local_invocation_index) lid: u32) {
    let r = flat_id(wg, nwg, lid);
    if r >= p.rows {
        return;
    }
    let at = r * p.cols;
    let mean = lb_mean[r];
    let rstd = lb_rstd[r];
    var dnorm = sum_new();
    var dnorm_xhat = sum_new();
    for (var c = 0u; c < p.cols; c++) {
        let dg = lb_dy[at + c] * lb_gamma[c];
        dnorm = sum_add(dnorm, dg);
        dnorm_xhat = sum_add(dnorm_xhat, dg * ((lb_x[at + c] - mean) * rstd));
    }
    let n = f32(p.cols);
    let mean_dnorm = sum_value(dnorm) / n;
    let mean_dnorm_xhat = sum_value(dnorm_xhat) / n;
    for (var c = 0u; c < p.cols; c++) {
        let xhat = (lb_x[at + c] - mean) * rstd;
        let dg = lb_dy[at + c] * lb_gamma[c];
        lb_dx[at + c] += rstd * (dg - mean_dnorm - xhat * mean_dnorm_xhat);
    }
}

// ---- normalize_rows ---------------------------------------------------------------------------

// Binding 1 is x, read through ln_x as the row helpers do.
@group(0) @binding(2) var<storage, read_write> nr_y: array<f32>;

// (x - mean) / sqrt(var + eps) with the unbiased variance.
@compute @workgroup_size(WG)
fn normalize_rows(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) lid: u32) {
    let r = flat_id(wg, nwg, lid);
    if r >= p.rows {
        return;
    }
    let at = r * p.cols;
    let mean = row_mean(at, p.cols);
    let sd = sqrt(row_ssd(at, p.cols, mean) / f32(p.cols - 1u) + p.eps);
    for (var c = 0u; c < p.cols; c++) {
        nr_y[at + c] = (ln_x[at + c] - mean) / sd;
    }
}

// ---- one workgroup per row (per_row.rs `RowKernel::Workgroup`) --------------------------------
//
// The kernels above with a workgroup of ROW_WG invocations per row (`row_group.wgsl`): the same
// formulas and compensated sums, the partials of the strided columns combined by a fixed tree.

// row_mean over the workgroup's columns of the row at `x_at`.
fn group_row_mean(lid: u32, x_at: u32, n: u32) -> f32 {
    var acc = sum_new();
    for (var c = lid; c < n; c += ROW_WG) {
        acc = sum_add(acc, ln_x[x_at + c]);
    }
    let mean = sum_value(group_sum(lid, acc)) / f32(n);
    var res = sum_new();
    for (var c = lid; c < n; c += ROW_WG) {
        res = sum_add(res, ln_x[x_at + c] - mean);
    }
    return mean + sum_value(group_sum(lid, res)) / f32(n);
}

// row_ssd over the workgroup's columns.
fn group_row_ssd(lid: u32, x_at: u32, n: u32, mean: f32) -> f32 {
    var acc = sum_new();
    for (var c = lid; c < n; c += ROW_WG) {
        let d = ln_x[x_at + c] - mean;
        acc = sum_add(acc, d * d);
    }
    return sum_value(group_sum(lid, acc));
}

@compute @workgroup_size(ROW_WG)
fn layernorm_forward_group(@builtin(workgroup_id) wg: vec3<u32>,
                           @builtin(num_workgroups) nwg: vec3<u32>,
                           @builtin(local_invocation_index) lid: u32) {
    let r = group_row(wg, nwg);
    if r >= p.rows {
        return;
    }
    let at = r * p.cols;
    let mean = group_row_mean(lid, at, p.cols);
    let rstd = 1.0 / sqrt(group_row_ssd(lid, at, p.cols, mean) / f32(p.cols) + p.eps);
    if lid == 0u {
        ln_mean[r] = mean;
        ln_rstd[r] = rstd;
    }
    for (var c = lid; c < p.cols; c += ROW_WG) {
        ln_y[at + c] = (ln_x[at + c] - mean) * rstd * ln_gamma[c] + ln_beta[c];
    }
}

@compute @workgroup_size(ROW_WG)
fn layernorm_backward_rows_group(@builtin(workgroup_id) wg: vec3<u32>,
                                 @builtin(num_workgroups) nwg: vec3<u32>,
                                 @builtin(local_invocation_index) lid: u32) {
    let r = group_row(wg, nwg);
    if r >= p.rows {
        return;
    }
    let at = r * p.cols;
    let mean = lb_mean[r];
    let rstd = lb_rstd[r];
    var dnorm = sum_new();
    var dnorm_xhat = sum_new();
    for (var c = lid; c < p.cols; c += ROW_WG) {
        let dg = lb_dy[at + c] * lb_gamma[c];
        dnorm = sum_add(dnorm, dg);
        dnorm_xhat = sum_add(dnorm_xhat, dg * ((lb_x[at + c] - mean) * rstd));
    }
    let n = f32(p.cols);
    let mean_dnorm = sum_value(group_sum(lid, dnorm)) / n;
    let mean_dnorm_xhat = sum_value(group_sum(lid, dnorm_xhat)) / n;
    for (var c = lid; c < p.cols; c += ROW_WG) {
        let xhat = (lb_x[at + c] - mean) * rstd;
        let dg = lb_dy[at + c] * lb_gamma[c];
        lb_dx[at + c] += rstd * (dg - mean_dnorm - xhat * mean_dnorm_xhat);
    }
}

@compute @workgroup_size(ROW_WG)
fn normalize_rows_group(@builtin(workgroup_id) wg: vec3<u32>,
                        @builtin(num_workgroups) nwg: vec3<u32>,
                        @builtin(local_invocation_index) lid: u32) {
    let r = group_row(wg, nwg);
    if r >= p.rows {
        return;
    }
    let at = r * p.cols;
    let mean = group_row_mean(lid, at, p.cols);
    let sd = sqrt(group_row_ssd(lid, at, p.cols, mean) / f32(p.cols - 1u) + p.eps);
    for (var c = lid; c < p.cols; c += ROW_WG) {
        nr_y[at + c] = (ln_x[at + c] - mean) / sd;
    }
}
