// Strided-batched GEMM, C = alpha op(A) op(B) + beta C (mae::backend::Gemm).
//
// Register blocking without workgroup memory: each invocation computes a 4 x 4 block of C in
// registers, reading a column of 4 A values and a row of 4 B values per step of k, so every
// load feeds four multiply-adds. Workgroups of 8 x 8 invocations cover 32 x 32 blocks of C; the
// batch is the grid's z dimension. No barriers: on lavapipe (llvmpipe) they cost more than the
// reuse they buy (shared/reference/toolchain.md), and the caches of a CPU do the sharing.
//
// Edges: rows and columns past m and n are clamped to the last one for loading (valid memory,
// values never stored), so the inner loop has no branches.

override TRANS_A: bool = false;
override TRANS_B: bool = false;

struct Params {
    m: u32,
    n: u32,
    k: u32,
    // First batch item of this launch (batches beyond 65535 take several launches).
    batch_base: u32,
    stride_a: u32,
    stride_b: u32,
    stride_c: u32,
    alpha: f32,
    beta: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;

// op(A)[row, kk] for the item starting at `base`.
fn load_a(base: u32, row: u32, kk: u32) -> f32 {
    if TRANS_A {
        return a[base + kk * p.m + row];
    }
    return a[base + row * p.k + kk];
}

// op(B)[kk, col] for the item starting at `base`.
fn load_b(base: u32, kk: u32, col: u32) -> f32 {
    if TRANS_B {
        return b[base + col * p.k + kk];
    }
    return b[base + kk * p.n + col];
}

@compute @workgroup_size(8, 8, 1)
fn gemm(@builtin(global_invocation_id) gid: vec3<u32>) {
    let row0 = gid.y * 4u;
    let col0 = gid.x * 4u;
    if row0 >= p.m || col0 >= p.n {
        return;
    }
    let item = p.batch_base + gid.z;
    let base_a = item * p.stride_a;
    let base_b = item * p.stride_b;
    let base_c = item * p.stride_c;
    let r = min(vec4<u32>(row0) + vec4<u32>(0u, 1u, 2u, 3u), vec4<u32>(p.m - 1u));
    let q = min(vec4<u32>(col0) + vec4<u32>(0u, 1u, 2u, 3u), vec4<u32>(p.n - 1u));

    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    for (var kk = 0u; kk < p.k; kk++) {
        let bv = vec4<f32>(load_b(base_b, kk, q.x), load_b(base_b, kk, q.y),
                           load_b(base_b, kk, q.z), load_b(base_b, kk, q.w));
        acc0 += load_a(base_a, r.x, kk) * bv;
        acc1 += load_a(base_a, r.y, kk) * bv;
        acc2 += load_a(base_a, r.z, kk) * bv;
        acc3 += load_a(base_a, r.w, kk) * bv;
    }

    store_row(base_c, row0, col0, acc0);
    store_row(base_c, row0 + 1u, col0, acc1);
    store_row(base_c, row0 + 2u, col0, acc2);
    store_row(base_c, row0 + 3u, col0, acc3);
}

// Writes the in-range part of one row of a block. With beta == 0 the old C is not read, so a
// NaN there does not leak into the result.
fn store_row(base_c: u32, row: u32, col0: u32, acc: vec4<f32>) {
    if row >= p.m {
        return;
    }
    for (var j = 0u; j < 4u; j++) {
        let col = col0 + j;
        if col < p.n {
            let at = base_c + row * p.n + col;
            var v = p.alpha * acc[j];
            if p.beta != 0.0 {
                v += p.beta * c[at];
            }
            c[at] = v;
        }
    }
}
