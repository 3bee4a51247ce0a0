// Whole-buffer kernels: fill, add, scale. One invocation per element.

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
