// Strided-batched GEMM, C = alpha op(A) op(B) + beta C (mae::backend::Gemm); parameters,
// bindings and element access in gemm_common.wgsl.
//
// Register blocking without workgroup memory: each invocation computes an 8 x 8 block of C in
// registers, loading a column of 8 A values and a row of 8 B values per step of k, so every
// load feeds eight multiply-adds. Workgroups of 8 x 8 invocations cover 64 x 64 blocks of C;
// the batch is the grid's z dimension.
//
// Why this shape: lavapipe (llvmpipe) runs 8 invocations as the lanes of one SIMD register and
// loads a storage-buffer value lane by lane, so loads, not multiply-adds, set the speed, and
// the block size divides their number per multiply-add (measured on 512^3 by CPU time: 4 x 4
// blocks 0.58 GFLOP per CPU-second whether or not the loads are vec4, 8 x 8 blocks 1.06).
// Workgroup-memory tiles need barriers, which cost more than they save on lavapipe
// (shared/reference/toolchain.md).
//
// Edges: rows and columns past m and n are clamped to the last one for loading (valid memory,
// values never stored), so the inner loop has no branches.

// op(B)[kk, q.x .. q.w] as a vector.
fn load_b4(base: u32, kk: u32, q: vec4<u32>) -> vec4<f32> {
    return vec4<f32>(stored_b(base, kk, q.x), stored_b(base, kk, q.y), stored_b(base, kk, q.z),
                     stored_b(base, kk, q.w));
}

@compute @workgroup_size(8, 8, 1)
fn gemm(@builtin(global_invocation_id) gid: vec3<u32>) {
    let row0 = gid.y * 8u;
    let col0 = gid.x * 8u;
    if row0 >= p.m || col0 >= p.n {
        return;
    }
    let item = p.batch_base + gid.z;
    let base_a = item * p.stride_a;
    let base_b = item * p.stride_b;
    let base_c = item * p.stride_c;
    let last_row = p.m - 1u;
    let r0 = min(row0 + 0u, last_row);
    let r1 = min(row0 + 1u, last_row);
    let r2 = min(row0 + 2u, last_row);
    let r3 = min(row0 + 3u, last_row);
    let r4 = min(row0 + 4u, last_row);
    let r5 = min(row0 + 5u, last_row);
    let r6 = min(row0 + 6u, last_row);
    let r7 = min(row0 + 7u, last_row);
    let last_col = vec4<u32>(p.n - 1u);
    let q_lo = min(vec4<u32>(col0) + vec4<u32>(0u, 1u, 2u, 3u), last_col);
    let q_hi = min(vec4<u32>(col0) + vec4<u32>(4u, 5u, 6u, 7u), last_col);

    // Row i of the block is lo{i} (columns 0-3) and hi{i} (columns 4-7).
    var lo0 = vec4<f32>(0.0);
    var hi0 = vec4<f32>(0.0);
    var lo1 = vec4<f32>(0.0);
    var hi1 = vec4<f32>(0.0);
    var lo2 = vec4<f32>(0.0);
    var hi2 = vec4<f32>(0.0);
    var lo3 = vec4<f32>(0.0);
    var hi3 = vec4<f32>(0.0);
    var lo4 = vec4<f32>(0.0);
    var hi4 = vec4<f32>(0.0);
    var lo5 = vec4<f32>(0.0);
    var hi5 = vec4<f32>(0.0);
    var lo6 = vec4<f32>(0.0);
    var hi6 = vec4<f32>(0.0);
    var lo7 = vec4<f32>(0.0);
    var hi7 = vec4<f32>(0.0);
    for (var kk = 0u; kk < p.k; kk++) {
        let blo = load_b4(base_b, kk, q_lo);
        let bhi = load_b4(base_b, kk, q_hi);
        let a0 = stored_a(base_a, r0, kk);
        lo0 += a0 * blo;
        hi0 += a0 * bhi;
        let a1 = stored_a(base_a, r1, kk);
        lo1 += a1 * blo;
        hi1 += a1 * bhi;
        let a2 = stored_a(base_a, r2, kk);
        lo2 += a2 * blo;
        hi2 += a2 * bhi;
        let a3 = stored_a(base_a, r3, kk);
        lo3 += a3 * blo;
        hi3 += a3 * bhi;
        let a4 = stored_a(base_a, r4, kk);
        lo4 += a4 * blo;
        hi4 += a4 * bhi;
        let a5 = stored_a(base_a, r5, kk);
        lo5 += a5 * blo;
        hi5 += a5 * bhi;
        let a6 = stored_a(base_a, r6, kk);
        lo6 += a6 * blo;
        hi6 += a6 * bhi;
        let a7 = stored_a(base_a, r7, kk);
        lo7 += a7 * blo;
        hi7 += a7 * bhi;
    }

    store_row(base_c, row0 + 0u, col0, lo0, hi0);
    store_row(base_c, row0 + 1u, col0, lo1, hi1);
    store_row(base_c, row0 + 2u, col0, lo2, hi2);
    store_row(base_c, row0 + 3u, col0, lo3, hi3);
    store_row(base_c, row0 + 4u, col0, lo4, hi4);
    store_row(base_c, row0 + 5u, col0, lo5, hi5);
    store_row(base_c, row0 + 6u, col0, lo6, hi6);
    store_row(base_c, row0 + 7u, col0, lo7, hi7);
}

// Writes the in-range part of one row of a block.
fn store_row(base_c: u32, row: u32, col0: u32, lo: vec4<f32>, hi: vec4<f32>) {
    if row >= p.m {
        return;
    }
    for (var j = 0u; j < 8u; j++) {
        let col = col0 + j;
        if col < p.n {
            if j < 4u {
                store_c(base_c + row * p.n + col, lo[j]);
            } else {
                store_c(base_c + row * p.n + col, hi[j - 4u]);
            }
        }
    }
}
