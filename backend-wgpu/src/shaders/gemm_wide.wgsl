// Strided-batched GEMM with 128 x 128 blocks of C per workgroup: gemm_tiled.wgsl's scheme
// (read it first) with an 8 x 8 register block per invocation instead of 4 x 4, so each value
// staged in workgroup memory feeds twice the multiply-adds: 64 per 16 reads of the tiles
// instead of 16 per 8. For products large enough to fill the GPU with 128 x 128 blocks.
//
// The invocation (tx, ty) of the 16 x 16 workgroup owns rows ty + 16 i and columns tx + 16 j
// (i, j < 8) of the block: loads of the tiles and stores to C stay consecutive across tx.
// Each C value sums its k products in ascending order, as the other kernels do.

const BM: u32 = 128u;
const BK: u32 = 16u;
const TS: u32 = 129u;
const THREADS: u32 = 256u;

var<workgroup> tile_a: array<f32, BK * TS>;
var<workgroup> tile_b: array<f32, BK * TS>;

@compute @workgroup_size(16, 16, 1)
fn gemm_wide(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) l: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let row0 = wg.y * BM;
    let col0 = wg.x * BM;
    let item = p.batch_base + wg.z;
    let base_a = item * p.stride_a;
    let base_b = item * p.stride_b;
    let base_c = item * p.stride_c;
    let tx = l.x;
    let ty = l.y;

    // accIH: row ty + 16 I of the block, columns tx + 16 (4 H + lane). Sixteen named vectors,
    // not an array: with an array indexed in loops the kernel ran 5x slower than the 64 x 64
    // one on an H200 (most likely the array went to local memory).
    var acc00 = vec4<f32>(0.0);
    var acc01 = vec4<f32>(0.0);
    var acc10 = vec4<f32>(0.0);
    var acc11 = vec4<f32>(0.0);
    var acc20 = vec4<f32>(0.0);
    var acc21 = vec4<f32>(0.0);
    var acc30 = vec4<f32>(0.0);
    var acc31 = vec4<f32>(0.0);
    var acc40 = vec4<f32>(0.0);
    var acc41 = vec4<f32>(0.0);
    var acc50 = vec4<f32>(0.0);
    var acc51 = vec4<f32>(0.0);
    var acc60 = vec4<f32>(0.0);
    var acc61 = vec4<f32>(0.0);
    var acc70 = vec4<f32>(0.0);
    var acc71 = vec4<f32>(0.0);
    for (var k0 = 0u; k0 < p.k; k0 += BK) {
        workgroupBarrier();
        for (var s = 0u; s < 8u; s++) {
            let e = lid + s * THREADS;
            let a_at = staged_a(e, BM);
            tile_a[a_at.y * TS + a_at.x] = load_a(base_a, row0 + a_at.x, k0 + a_at.y);
            let b_at = staged_b(e, BM);
            tile_b[b_at.x * TS + b_at.y] = load_b(base_b, k0 + b_at.x, col0 + b_at.y);
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk++) {
            let at = kk * TS;
            let b0 = vec4<f32>(tile_b[at + tx], tile_b[at + tx + 16u], tile_b[at + tx + 32u],
                               tile_b[at + tx + 48u]);
            let b1 = vec4<f32>(tile_b[at + tx + 64u], tile_b[at + tx + 80u],
                               tile_b[at + tx + 96u], tile_b[at + tx + 112u]);
            let a0 = tile_a[at + ty + 0u];
            let a1 = tile_a[at + ty + 16u];
            let a2 = tile_a[at + ty + 32u];
            let a3 = tile_a[at + ty + 48u];
            let a4 = tile_a[at + ty + 64u];
            let a5 = tile_a[at + ty + 80u];
            let a6 = tile_a[at + ty + 96u];
            let a7 = tile_a[at + ty + 112u];
            acc00 += a0 * b0;
            acc01 += a0 * b1;
            acc10 += a1 * b0;
            acc11 += a1 * b1;
            acc20 += a2 * b0;
            acc21 += a2 * b1;
            acc30 += a3 * b0;
            acc31 += a3 * b1;
            acc40 += a4 * b0;
            acc41 += a4 * b1;
            acc50 += a5 * b0;
            acc51 += a5 * b1;
            acc60 += a6 * b0;
            acc61 += a6 * b1;
            acc70 += a7 * b0;
            acc71 += a7 * b1;
        }
    }

    store_row8(base_c, row0 + ty + 0u, col0 + tx, acc00, acc01);
    store_row8(base_c, row0 + ty + 16u, col0 + tx, acc10, acc11);
    store_row8(base_c, row0 + ty + 32u, col0 + tx, acc20, acc21);
    store_row8(base_c, row0 + ty + 48u, col0 + tx, acc30, acc31);
    store_row8(base_c, row0 + ty + 64u, col0 + tx, acc40, acc41);
    store_row8(base_c, row0 + ty + 80u, col0 + tx, acc50, acc51);
    store_row8(base_c, row0 + ty + 96u, col0 + tx, acc60, acc61);
    store_row8(base_c, row0 + ty + 112u, col0 + tx, acc70, acc71);
}

// Writes the in-range values of one row of the register block, columns col + 16 j (j < 8):
// lo holds j < 4, hi the rest.
fn store_row8(base_c: u32, row: u32, col: u32, lo: vec4<f32>, hi: vec4<f32>) {
    if row >= p.m {
        return;
    }
    for (var j = 0u; j < 8u; j++) {
        let cj = col + 16u * j;
        if cj < p.n {
            if j < 4u {
                store_c(base_c + row * p.n + cj, lo[j]);
            } else {
                store_c(base_c + row * p.n + cj, hi[j - 4u]);
            }
        }
    }
}
