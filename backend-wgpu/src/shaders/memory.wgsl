// Whole-buffer kernels: fill, add, scale, scale_rows. One invocation per element.

struct Params {
    n: u32,
    // fill: the value's bits; scale: the factor's bits.
    value: u32,
}

@group(0) @binding(0) var<uniform> p: Params;

// fill: bits, so that every value (a NaN payload, -0.0) is stored exactly.
@group(0) @binding(1) var<storage, read_write> fill_dst: array<u32>;

@compute @workgroup_size(WG)
fn fill(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = flat_id(wg, nwg, lid);
    if i < p.n {
        fill_dst[i] = p.value;
    }
}

@group(0) @binding(1) var<storage, read> add_src: array<f32>;
@group(0) @binding(2) var<storage, read_write> add_dst: array<f32>;

@compute @workgroup_size(WG)
fn add(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
       @builtin(local_invocation_index) lid: u32) {
    let i = flat_id(wg, nwg, lid);
    if i < p.n {
        add_dst[i] = add_dst[i] + add_src[i];
    }
}

@group(0) @binding(1) var<storage, read_write> scale_buf: array<f32>;

@compute @workgroup_size(WG)
fn scale(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_index) lid: u32) {
    let i = flat_id(wg, nwg, lid);
    if i < p.n {
        scale_buf[i] = scale_buf[i] * bitcast<f32>(p.value);
    }
}

// scale_rows: dst[i] = src[i] * scales[i / group] (or +=), one factor per group of
// rows_per_scale * cols elements (an image's rows, for drop path).
struct ScaleRowsParams {
    // Elements: scales.len() * group.
    n: u32,
    // Elements per factor: rows_per_scale * cols (non-zero when n is).
    group: u32,
    // 1 to add into dst, 0 to overwrite it (its old contents are then never read).
    accumulate: u32,
}

@group(0) @binding(0) var<uniform> sr: ScaleRowsParams;
@group(0) @binding(1) var<storage, read> sr_src: array<f32>;
@group(0) @binding(2) var<storage, read> sr_scales: array<f32>;
@group(0) @binding(3) var<storage, read_write> sr_dst: array<f32>;

@compute @workgroup_size(WG)
fn scale_rows(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let i = flat_id(wg, nwg, lid);
    if i >= sr.n {
        return;
    }
    let v = sr_src[i] * sr_scales[i / sr.group];
    if sr.accumulate != 0u {
        sr_dst[i] = sr_dst[i] + v;
    } else {
        sr_dst[i] = v;
    }
}

// The second pass of a GEMM split along k (gemm.rs): c[i] = the sum of the slices' products
// partials[s * n + i] in slice order, plus beta c[i] (c is not read when beta is 0).
struct SliceParams {
    n: u32,
    slices: u32,
    beta: f32,
}

@group(0) @binding(0) var<uniform> sp: SliceParams;
@group(0) @binding(1) var<storage, read> slices_partials: array<f32>;
@group(0) @binding(2) var<storage, read_write> slices_c: array<f32>;

@compute @workgroup_size(WG)
fn sum_slices(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let i = flat_id(wg, nwg, lid);
    if i >= sp.n {
        return;
    }
    var x = slices_partials[i];
    for (var s = 1u; s < sp.slices; s++) {
        x += slices_partials[s * sp.n + i];
    }
    if sp.beta != 0.0 {
        x += sp.beta * slices_c[i];
    }
    slices_c[i] = x;
}
