// Strided-batched GEMM for real GPUs, C = alpha op(A) op(B) + beta C (mae::backend::Gemm), with
// the parameters and semantics of gemm.wgsl (both start with gemm_common.wgsl).
//
// Workgroup-shared tiles: a workgroup of 16 x 16 invocations owns a 64 x 64 block of C. Per
// step of BK = 16 along k it stages a 64 x 16 tile of op(A) and a 16 x 64 tile of op(B) in
// workgroup memory (each invocation loads 4 + 4 values, consecutive invocations reading
// consecutive addresses of whichever layout A and B have), waits at a barrier, and each
// invocation then multiplies out its 4 x 4 register block: rows ty + 16 i, columns tx + 16 j, so
// the invocations of one row of the workgroup read consecutive B values and share one A value
// (a broadcast), and the final stores to C are coalesced. A second barrier at the top of the
// next step keeps the tiles until every invocation has used them.
//
// Bank conflicts: both tiles are stored k-major (A transposed), rows padded to TS = 65 floats,
// so the staging stores of the k-fastest layouts (A as stored m x k, B stored n x k) spread over
// the banks instead of hitting one bank 16 times.
//
// Edges: values outside op(A) and op(B) (rows past m, columns past n, k past the end) are
// staged as zeros, so the inner loop has no branches; only the final stores test the edges.
//
// Summation order: each C value sums its k products in ascending order, one rounding per step,
// as the register kernel does. The zeros past k add exact zeros.

// Block of C per workgroup (BM x BM), step along k, padded tile row.
const BM: u32 = 64u;
const BK: u32 = 16u;
const TS: u32 = 65u;
// Invocations per workgroup (16 x 16).
const THREADS: u32 = 256u;

// tile_a[kk * TS + r] = op(A)[row0 + r, k0 + kk]; tile_b[kk * TS + j] = op(B)[k0 + kk, col0 + j].
var<workgroup> tile_a: array<f32, BK * TS>;
var<workgroup> tile_b: array<f32, BK * TS>;

@compute @workgroup_size(16, 16, 1)
fn gemm_tiled(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) l: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let row0 = wg.y * BM;
    let col0 = wg.x * BM;
    let item = p.batch_base + wg.z;
    let base_a = item * p.stride_a;
    let base_b = item * p.stride_b;
    let base_c = item * p.stride_c;
    let tx = l.x;
    let ty = l.y;

    // Row ty + 16 i of the block is acc{i}, its columns tx + 16 j the vector's lanes.
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    for (var k0 = 0u; k0 < p.k; k0 += BK) {
        // The previous step's tiles are no longer read.
        workgroupBarrier();
        for (var s = 0u; s < 4u; s++) {
            let e = lid + s * THREADS;
            let a_at = staged_a(e, BM);
            tile_a[a_at.y * TS + a_at.x] = load_a(base_a, row0 + a_at.x, k0 + a_at.y);
            let b_at = staged_b(e, BM);
            tile_b[b_at.x * TS + b_at.y] = load_b(base_b, k0 + b_at.x, col0 + b_at.y);
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk++) {
            let at = kk * TS;
            let av = vec4<f32>(tile_a[at + ty], tile_a[at + ty + 16u], tile_a[at + ty + 32u],
                               tile_a[at + ty + 48u]);
            let bv = vec4<f32>(tile_b[at + tx], tile_b[at + tx + 16u], tile_b[at + tx + 32u],
                               tile_b[at + tx + 48u]);
            acc0 += av.x * bv;
            acc1 += av.y * bv;
            acc2 += av.z * bv;
            acc3 += av.w * bv;
        }
    }

    store_row(base_c, row0 + ty, col0 + tx, acc0);
    store_row(base_c, row0 + ty + 16u, col0 + tx, acc1);
    store_row(base_c, row0 + ty + 32u, col0 + tx, acc2);
    store_row(base_c, row0 + ty + 48u, col0 + tx, acc3);
}

// Writes the in-range values of one row of the register block, columns col + 16 j.
fn store_row(base_c: u32, row: u32, col: u32, v: vec4<f32>) {
    if row >= p.m {
        return;
    }
    for (var j = 0u; j < 4u; j++) {
        let cj = col + 16u * j;
        if cj < p.n {
            store_c(base_c + row * p.n + cj, v[j]);
        }
    }
}
