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

// ---- the vectorized variant ---------------------------------------------------------------------
//
// When the contiguous dimension of each operand is a multiple of 4 (and so are the batch
// strides), A and B are read as vec4: a step of 4 along k loads a 4 x 4 block of each operand
// with 4 vector loads and multiplies them as matrices, 64 multiply-adds for 8 loads instead of
// 16 for 8. `gemm.rs` checks the alignment and picks this entry point.

@group(0) @binding(1) var<storage, read> a4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> b4: array<vec4<f32>>;

// op(A)[r0..r0+4, kk..kk+4] as a matrix whose column t holds the 4 rows at k = kk + t.
// Stored transposed (k x m, m a multiple of 4) the columns are vec4s; stored m x k (k a
// multiple of 4) the rows are, and the block is transposed (free: registers only).
fn a_block(base: u32, r: vec4<u32>, kk: u32) -> mat4x4<f32> {
    if TRANS_A {
        return mat4x4<f32>(a4[(base + kk * p.m + r.x) / 4u], a4[(base + (kk + 1u) * p.m + r.x) / 4u],
                           a4[(base + (kk + 2u) * p.m + r.x) / 4u], a4[(base + (kk + 3u) * p.m + r.x) / 4u]);
    }
    return transpose(mat4x4<f32>(a4[(base + r.x * p.k + kk) / 4u], a4[(base + r.y * p.k + kk) / 4u],
                                 a4[(base + r.z * p.k + kk) / 4u], a4[(base + r.w * p.k + kk) / 4u]));
}

// op(B)[kk..kk+4, c0..c0+4] as a matrix whose column j holds the 4 values of k for column
// c0 + j, so that a_block * b_block is the block's contribution to C.
fn b_block(base: u32, q: vec4<u32>, kk: u32) -> mat4x4<f32> {
    if TRANS_B {
        return mat4x4<f32>(b4[(base + q.x * p.k + kk) / 4u], b4[(base + q.y * p.k + kk) / 4u],
                           b4[(base + q.z * p.k + kk) / 4u], b4[(base + q.w * p.k + kk) / 4u]);
    }
    return transpose(mat4x4<f32>(b4[(base + kk * p.n + q.x) / 4u], b4[(base + (kk + 1u) * p.n + q.x) / 4u],
                                 b4[(base + (kk + 2u) * p.n + q.x) / 4u], b4[(base + (kk + 3u) * p.n + q.x) / 4u]));
}

// One element of a vec4-bound operand.
fn a_at(i: u32) -> f32 {
    return a4[i / 4u][i % 4u];
}

fn b_at(i: u32) -> f32 {
    return b4[i / 4u][i % 4u];
}

@compute @workgroup_size(8, 8, 1)
fn gemm_vec4(@builtin(global_invocation_id) gid: vec3<u32>) {
    let row0 = gid.y * 4u;
    let col0 = gid.x * 4u;
    if row0 >= p.m || col0 >= p.n {
        return;
    }
    let item = p.batch_base + gid.z;
    let base_a = item * p.stride_a;
    let base_b = item * p.stride_b;
    let base_c = item * p.stride_c;
    // Rows (columns) that are a vector's lanes are never partial (their dimension is a multiple
    // of 4); the others are clamped like the scalar kernel's.
    let r = min(vec4<u32>(row0) + vec4<u32>(0u, 1u, 2u, 3u), vec4<u32>(p.m - 1u));
    let q = min(vec4<u32>(col0) + vec4<u32>(0u, 1u, 2u, 3u), vec4<u32>(p.n - 1u));

    var acc = mat4x4<f32>();
    let k4 = p.k & ~3u;
    for (var kk = 0u; kk < k4; kk += 4u) {
        acc += a_block(base_a, r, kk) * b_block(base_b, q, kk);
    }
    // The last k % 4 steps (only when both operands are contiguous along m and n).
    for (var kk = k4; kk < p.k; kk++) {
        let av = vec4<f32>(a_at(base_a + kk * p.m + r.x), a_at(base_a + kk * p.m + r.y),
                           a_at(base_a + kk * p.m + r.z), a_at(base_a + kk * p.m + r.w));
        let bv = vec4<f32>(b_at(base_b + kk * p.n + q.x), b_at(base_b + kk * p.n + q.y),
                           b_at(base_b + kk * p.n + q.z), b_at(base_b + kk * p.n + q.w));
        acc += mat4x4<f32>(av * bv.x, av * bv.y, av * bv.z, av * bv.w);
    }

    for (var i = 0u; i < 4u; i++) {
        store_row(base_c, row0 + i, col0, vec4<f32>(acc[0][i], acc[1][i], acc[2][i], acc[3][i]));
    }
}
