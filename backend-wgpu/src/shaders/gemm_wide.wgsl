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

    // acc[i][h]: row ty + 16 i, columns tx + 16 (4 h + lane).
    var acc: array<array<vec4<f32>, 2>, 8>;
    for (var i = 0u; i < 8u; i++) {
        acc[i][0] = vec4<f32>(0.0);
        acc[i][1] = vec4<f32>(0.0);
    }
    for (var k0 = 0u; k0 < p.k; k0 += BK) {
        workgroupBarrier();
        for (var s = 0u; s < 8u; s++) {
            let e = lid + s * THREADS;
            var ra: u32;
            var ka: u32;
            if TRANS_A {
                ra = e % BM;
                ka = e / BM;
            } else {
                ka = e % BK;
                ra = e / BK;
            }
            tile_a[ka * TS + ra] = load_a(base_a, row0 + ra, k0 + ka);
            var cb: u32;
            var kb: u32;
            if TRANS_B {
                kb = e % BK;
                cb = e / BK;
            } else {
                cb = e % BM;
                kb = e / BM;
            }
            tile_b[kb * TS + cb] = load_b(base_b, k0 + kb, col0 + cb);
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk++) {
            let at = kk * TS;
            let b0 = vec4<f32>(tile_b[at + tx], tile_b[at + tx + 16u], tile_b[at + tx + 32u],
                               tile_b[at + tx + 48u]);
            let b1 = vec4<f32>(tile_b[at + tx + 64u], tile_b[at + tx + 80u],
                               tile_b[at + tx + 96u], tile_b[at + tx + 112u]);
            for (var i = 0u; i < 8u; i++) {
                let av = tile_a[at + ty + 16u * i];
                acc[i][0] += av * b0;
                acc[i][1] += av * b1;
            }
        }
    }

    for (var i = 0u; i < 8u; i++) {
        let row = row0 + ty + 16u * i;
        if row < p.m {
            for (var j = 0u; j < 8u; j++) {
                let col = col0 + tx + 16u * j;
                if col < p.n {
                    let at = base_c + row * p.n + col;
                    var x = p.alpha * acc[i][j / 4u][j % 4u];
                    if p.beta != 0.0 {
                        x += p.beta * c[at];
                    }
                    c[at] = x;
                }
            }
        }
    }
}
