// Column sums in two passes: bias gradients (copy_rows_backward of a broadcast row) and the
// LayerNorm parameter gradients. One invocation per column would leave a GPU nearly idle (a
// 768-wide bias is three workgroups walking 12,608 rows each), so pass 1 gives each
// invocation one column of a chunk of CHUNK rows, and pass 2 adds the chunks' partial sums of
// each column in chunk order. Both passes use compensated sums; the order depends only on the
// shape, so the results are deterministic.

const CHUNK: u32 = 64u;

struct ColParams {
    // The rows summed: row t (0 <= t < rows) of the view is matrix row
    // (t / count) * stride + start + t % count.
    rows: u32,
    cols: u32,
    count: u32,
    stride: u32,
    start: u32,
    // Pass 2: where the partials of this sum start, and where the sum is added in `acc`.
    partial_at: u32,
    acc_at: u32,
}

@group(0) @binding(0) var<uniform> cp: ColParams;

fn view_row(t: u32) -> u32 {
    return (t / cp.count) * cp.stride + cp.start + t % cp.count;
}

fn chunks() -> u32 {
    return (cp.rows + CHUNK - 1u) / CHUNK;
}

@group(0) @binding(1) var<storage, read> cs_src: array<f32>;
@group(0) @binding(2) var<storage, read_write> cs_partials: array<f32>;

// partials[k * cols + c] = sum of column c over the view's rows k * CHUNK ..
@compute @workgroup_size(WG)
fn column_partials(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let e = flat_id(wg, nwg, lid);
    if e >= chunks() * cp.cols {
        return;
    }
    let c = e % cp.cols;
    let k = e / cp.cols;
    let end = min(cp.rows, (k + 1u) * CHUNK);
    var acc = sum_new();
    for (var t = k * CHUNK; t < end; t++) {
        acc = sum_add(acc, cs_src[view_row(t) * cp.cols + c]);
    }
    cs_partials[e] = sum_value(acc);
}

@group(0) @binding(1) var<storage, read> lp_dy: array<f32>;
@group(0) @binding(2) var<storage, read> lp_x: array<f32>;
@group(0) @binding(3) var<storage, read> lp_mean: array<f32>;
@group(0) @binding(4) var<storage, read> lp_rstd: array<f32>;
@group(0) @binding(5) var<storage, read_write> lp_partials: array<f32>;

// The LayerNorm parameter gradients' partials over rows 0 .. rows of [rows, cols]: dgamma's
// (sum dy * xhat) at k * cols + c, dbeta's (sum dy) after all of dgamma's.
@compute @workgroup_size(WG)
fn layernorm_param_partials(@builtin(workgroup_id) wg: vec3<u32>,
                            @builtin(num_workgroups) nwg: vec3<u32>,
                            @builtin(local_invocation_index) lid: u32) {
    let e = flat_id(wg, nwg, lid);
    let n = chunks() * cp.cols;
    if e >= n {
        return;
    }
    let c = e % cp.cols;
    let k = e / cp.cols;
    let end = min(cp.rows, (k + 1u) * CHUNK);
    var dg = sum_new();
    var db = sum_new();
    for (var r = k * CHUNK; r < end; r++) {
        let at = r * cp.cols + c;
        let d = lp_dy[at];
        dg = sum_add(dg, d * ((lp_x[at] - lp_mean[r]) * lp_rstd[r]));
        db = sum_add(db, d);
    }
    lp_partials[e] = sum_value(dg);
    lp_partials[n + e] = sum_value(db);
}

@group(0) @binding(1) var<storage, read> cf_partials: array<f32>;
@group(0) @binding(2) var<storage, read_write> cf_acc: array<f32>;

// acc[acc_at + c] += the sum over chunks of partials[partial_at + k * cols + c].
@compute @workgroup_size(WG)
fn column_sum_finish(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    let c = flat_id(wg, nwg, lid);
    if c >= cp.cols {
        return;
    }
    var acc = sum_new();
    for (var k = 0u; k < chunks(); k++) {
        acc = sum_add(acc, cf_partials[cp.partial_at + k * cp.cols + c]);
    }
    cf_acc[cp.acc_at + c] += sum_value(acc);
}
