// The masked MSE loss, in two passes so that every pass is parallel: each row's mean squared
// error (`mse_rows`, one invocation per row, or `mse_rows_group`, one workgroup per row as
// per_row.rs chooses), then one workgroup adds the rows' masked errors and the mask (invocation
// t takes rows t, t + WG, ..., neighbouring invocations reading neighbouring rows) with a fixed
// tree, so the result is deterministic without atomics. The backward forms its coefficient the
// same way in one workgroup, then runs elementwise.

struct Params {
    rows: u32,
    cols: u32,
    d_loss: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> pred: array<f32>;
@group(0) @binding(2) var<storage, read> tgt: array<f32>;
@group(0) @binding(3) var<storage, read> mask: array<f32>;

// Binding 3 receives each row's mean squared error.
@group(0) @binding(3) var<storage, read_write> row_err: array<f32>;

// row_err[r] = sum_c (pred - tgt)^2 / cols, the row in order.
@compute @workgroup_size(WG)
fn mse_rows(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let r = flat_id(wg, nwg, lid);
    if r >= p.rows {
        return;
    }
    var sse = sum_new();
    for (var c = 0u; c < p.cols; c++) {
        let d = pred[r * p.cols + c] - tgt[r * p.cols + c];
        sse = sum_add(sse, d * d);
    }
    row_err[r] = sum_value(sse) / f32(p.cols);
}

// The same with one workgroup per row: invocation lid takes columns lid, lid + ROW_WG, ...
@compute @workgroup_size(ROW_WG)
fn mse_rows_group(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) lid: u32) {
    let r = group_row(wg, nwg);
    if r >= p.rows {
        return;
    }
    var sse = sum_new();
    for (var c = lid; c < p.cols; c += ROW_WG) {
        let d = pred[r * p.cols + c] - tgt[r * p.cols + c];
        sse = sum_add(sse, d * d);
    }
    let total = group_sum(lid, sse);
    if lid == 0u {
        row_err[r] = sum_value(total) / f32(p.cols);
    }
}

var<workgroup> part_a: array<f32, WG>;
var<workgroup> part_b: array<f32, WG>;

// Adds up every invocation's two partial sums by a fixed tree; invocation 0 gets the totals.
fn workgroup_totals(lid: u32, a: Sum, b: Sum) -> vec2<f32> {
    part_a[lid] = sum_value(a);
    part_b[lid] = sum_value(b);
    workgroupBarrier();
    for (var width = WG / 2u; width > 0u; width /= 2u) {
        if lid < width {
            part_a[lid] += part_a[lid + width];
            part_b[lid] += part_b[lid + width];
        }
        workgroupBarrier();
    }
    return vec2<f32>(part_a[0], part_b[0]);
}

// Bindings 1 the rows' errors, 2 the mask, 3 the loss.
@group(0) @binding(1) var<storage, read> mf_err: array<f32>;
@group(0) @binding(2) var<storage, read> mf_mask: array<f32>;
@group(0) @binding(3) var<storage, read_write> mf_loss: array<f32>;

// loss = sum_r mask[r] row_err[r] / sum_r mask[r], in one workgroup.
@compute @workgroup_size(WG)
fn mse_forward(@builtin(local_invocation_index) lid: u32) {
    var num = sum_new();
    var msum = sum_new();
    for (var r = lid; r < p.rows; r += WG) {
        num = sum_add(num, mf_mask[r] * mf_err[r]);
        msum = sum_add(msum, mf_mask[r]);
    }
    let totals = workgroup_totals(lid, num, msum);
    if lid == 0u {
        // An all-zero mask gives 0 / 0 = NaN, as PyTorch does.
        mf_loss[0] = totals.x / totals.y;
    }
}

// Binding 1 is the mask, binding 2 a one-element scratch buffer for the coefficient.
@group(0) @binding(1) var<storage, read> coef_mask: array<f32>;
@group(0) @binding(2) var<storage, read_write> coef_out: array<f32>;

// d_loss * 2 / (cols * sum(mask)), the mask summed in one workgroup as the forward sums it.
@compute @workgroup_size(WG)
fn mse_coefficient(@builtin(local_invocation_index) lid: u32) {
    var msum = sum_new();
    for (var r = lid; r < p.rows; r += WG) {
        msum = sum_add(msum, coef_mask[r]);
    }
    let totals = workgroup_totals(lid, msum, sum_new());
    if lid == 0u {
        coef_out[0] = p.d_loss * 2.0 / (f32(p.cols) * totals.x);
    }
}

// Bindings 1-3 as in the forward, 4 the coefficient, 5 the accumulated d_pred.
@group(0) @binding(4) var<storage, read> mb_coef: array<f32>;
@group(0) @binding(5) var<storage, read_write> mb_dpred: array<f32>;

// d_pred += coef * mask[r] * (pred - tgt). Rows with mask 0 are not skipped, so a
// non-finite prediction there gives NaN where PyTorch's would.
@compute @workgroup_size(WG)
fn mse_backward(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let i = flat_id(wg, nwg, lid);
    if i >= p.rows * p.cols {
        return;
    }
    let k = mb_coef[0] * mask[i / p.cols];
    mb_dpred[i] += k * (pred[i] - tgt[i]);
}
