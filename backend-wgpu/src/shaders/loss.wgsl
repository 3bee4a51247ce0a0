// The masked MSE loss. The forward is one workgroup: invocation t takes rows t, t + WG, ...
// in order, then a fixed tree adds the partial sums, so the result is deterministic without
// atomics. The backward first forms its coefficient in one invocation, then runs elementwise.

struct Params {
    rows: u32,
    cols: u32,
    d_loss: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> pred: array<f32>;
@group(0) @binding(2) var<storage, read> tgt: array<f32>;
@group(0) @binding(3) var<storage, read> mask: array<f32>;
@group(0) @binding(4) var<storage, read_write> loss: array<f32>;

var<workgroup> part_num: array<f32, WG>;
var<workgroup> part_mask: array<f32, WG>;

@compute @workgroup_size(WG)
fn mse_forward(@builtin(local_invocation_index) lid: u32) {
    var num = sum_new();
    var msum = sum_new();
    for (var r = lid; r < p.rows; r += WG) {
        var sse = sum_new();
        for (var c = 0u; c < p.cols; c++) {
            let d = pred[r * p.cols + c] - tgt[r * p.cols + c];
            sse = sum_add(sse, d * d);
        }
        num = sum_add(num, mask[r] * (sum_value(sse) / f32(p.cols)));
        msum = sum_add(msum, mask[r]);
    }
    part_num[lid] = sum_value(num);
    part_mask[lid] = sum_value(msum);
    workgroupBarrier();
    for (var width = WG / 2u; width > 0u; width /= 2u) {
        if lid < width {
            part_num[lid] += part_num[lid + width];
            part_mask[lid] += part_mask[lid + width];
        }
        workgroupBarrier();
    }
    if lid == 0u {
        // An all-zero mask gives 0 / 0 = NaN, as PyTorch does.
        loss[0] = part_num[0] / part_mask[0];
    }
}

// Binding 1 is the mask, binding 2 a one-element scratch buffer for the coefficient.
@group(0) @binding(1) var<storage, read> coef_mask: array<f32>;
@group(0) @binding(2) var<storage, read_write> coef_out: array<f32>;

// d_loss * 2 / (cols * sum(mask)), the mask summed in ascending rows.
@compute @workgroup_size(1)
fn mse_coefficient() {
    var msum = sum_new();
    for (var r = 0u; r < p.rows; r++) {
        msum = sum_add(msum, coef_mask[r]);
    }
    coef_out[0] = p.d_loss * 2.0 / (f32(p.cols) * sum_value(msum));
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
