// Strided-batched GEMM with 128 x 128 blocks of C and an 8 x 8 register block per invocation,
// like gemm_wide.wgsl (read gemm_tiled.wgsl first), reorganized for what NVIDIA GPUs want from
// a shader SGEMM (issue 4: the wide kernel reached 14-18 TFLOP/s on an H200, cuBLAS 40-50):
//
// - Vector reads of the tiles. Both tiles are stored k-major as vectors of 4 consecutive rows
//   (A) or columns (B), and the invocation (tx, ty) owns rows 4 ty + i and 64 + 4 ty + i and
//   columns 4 tx + j and 64 + 4 tx + j (i, j < 4): per step of k it reads its 8 A and 8 B
//   values as 2 + 2 vec4 loads instead of the wide kernel's 16 scalar loads. Eight
//   neighbouring tx read 128 consecutive bytes (no bank conflicts) and the invocations of one
//   row of the workgroup read the same A vectors (a broadcast).
// - Register double buffering. The next step's values are loaded from storage into registers
//   before the current step is multiplied out, so the loads' latency hides behind 512
//   multiply-adds, and stored to workgroup memory after it.
// - Two copies of the tiles in workgroup memory, one read while the other is written, so each
//   step of BK = 8 along k needs one barrier instead of two: the copy written in step t was
//   last read in step t - 1, which every invocation finished before the barrier ending t - 1.
// - Staging by vectors. Each invocation loads one 4-value vector of the A tile and one of the
//   B tile per step and stores each with one vector store. Which 4 values it loads follows the
//   stored layout so that neighbouring invocations read neighbouring addresses: where k is
//   the fastest index (A as stored m x k, B stored n x k), 8 neighbouring invocations take the
//   8 k of one step for 4 rows (columns of B); where it is not, 32 take 128 consecutive rows
//   (columns) of one k. Rows of the tiles are padded to 33 vectors, so the first case's
//   stores, 8 different k of one vector, fall in different banks.
// - No bounds checks where the block lies inside C and the step inside k; the edge blocks and
//   the last step of a k that is no multiple of 8 load with checks and stage zeros outside,
//   as the tiled kernels do. Stores to C test the edges.
//
// The 8 x 8 accumulators are sixteen named vectors, not an array: an array went to local memory
// on an H200 (gemm_wide.wgsl). The tiles are indexed [copy][k][vector] so that the bounds
// clamps wgpu's Vulkan backend puts on workgroup-array indices depend on the invocation alone
// and can be hoisted out of the inner loop.
//
// Summation order: each C value sums its k products in ascending order, one rounding per step
// (acc += a * b), as the other kernels do. The zeros past k add exact zeros.

// Block of C per workgroup (BM x BM), step along k, vectors per padded tile row.
const BM: u32 = 128u;
const BK: u32 = 8u;
const TV: u32 = 33u;

// tile_a[s][kk][v] = op(A)[row0 + 4 v + (0, 1, 2, 3), k0 + kk] for the step k0 of copy s;
// tile_b[s][kk][v] = op(B)[k0 + kk, col0 + 4 v + (0, 1, 2, 3)].
var<workgroup> tile_a: array<array<array<vec4<f32>, TV>, BK>, 2>;
var<workgroup> tile_b: array<array<array<vec4<f32>, TV>, BK>, 2>;

// (kk, v) of the vector invocation `lid` stages: with k the fastest index of the stored
// operand, 8 neighbouring invocations take the 8 k of one vector; otherwise 32 take the 32
// vectors of one k.
fn staged_vector(lid: u32, k_fastest: bool) -> vec2<u32> {
    if k_fastest {
        return vec2<u32>(lid % BK, lid / BK);
    }
    return vec2<u32>(lid / 32u, lid % 32u);
}

// op(A)[row .. row + 3, kk] at a[at], a[at + next], ..: the whole vector if `inside`, else the
// values inside op(A) and zeros outside.
fn fetch_a(at: u32, next: u32, row: u32, kk: u32, inside: bool) -> vec4<f32> {
    if inside {
        return vec4<f32>(a[at], a[at + next], a[at + 2u * next], a[at + 3u * next]);
    }
    var v = vec4<f32>(0.0);
    if kk < p.k {
        if row < p.m {
            v.x = a[at];
        }
        if row + 1u < p.m {
            v.y = a[at + next];
        }
        if row + 2u < p.m {
            v.z = a[at + 2u * next];
        }
        if row + 3u < p.m {
            v.w = a[at + 3u * next];
        }
    }
    return v;
}

// op(B)[kk, col .. col + 3] at b[at], b[at + next], .., as fetch_a.
fn fetch_b(at: u32, next: u32, kk: u32, col: u32, inside: bool) -> vec4<f32> {
    if inside {
        return vec4<f32>(b[at], b[at + next], b[at + 2u * next], b[at + 3u * next]);
    }
    var v = vec4<f32>(0.0);
    if kk < p.k {
        if col < p.n {
            v.x = b[at];
        }
        if col + 1u < p.n {
            v.y = b[at + next];
        }
        if col + 2u < p.n {
            v.z = b[at + 2u * next];
        }
        if col + 3u < p.n {
            v.w = b[at + 3u * next];
        }
    }
    return v;
}

@compute @workgroup_size(16, 16, 1)
fn gemm_fast(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) l: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let row0 = wg.y * BM;
    let col0 = wg.x * BM;
    let item = p.batch_base + wg.z;
    let base_a = item * p.stride_a;
    let base_b = item * p.stride_b;
    let base_c = item * p.stride_c;
    let tx = l.x;
    let ty = l.y;

    // The staged vectors: va = (kk, v) in the A tile, first row ra; vb in the B tile, first
    // column cb. Step t's values lie at at_a + t step_a + j next_a (j < 4), and likewise for B.
    // (For values outside the operands these addresses are meaningless and never read.)
    let va = staged_vector(lid, !TRANS_A);
    let vb = staged_vector(lid, TRANS_B);
    let ra = row0 + 4u * va.y;
    let cb = col0 + 4u * vb.y;
    var at_a: u32;
    var step_a: u32;
    var next_a: u32;
    if TRANS_A {
        at_a = base_a + va.x * p.m + ra;
        step_a = BK * p.m;
        next_a = 1u;
    } else {
        at_a = base_a + ra * p.k + va.x;
        step_a = BK;
        next_a = p.k;
    }
    var at_b: u32;
    var step_b: u32;
    var next_b: u32;
    if TRANS_B {
        at_b = base_b + cb * p.k + vb.x;
        step_b = BK;
        next_b = p.k;
    } else {
        at_b = base_b + vb.x * p.n + cb;
        step_b = BK * p.n;
        next_b = 1u;
    }
    // Whether the block's rows and columns lie inside C (then only k can leave the operands).
    let block_inside = row0 + BM <= p.m && col0 + BM <= p.n;
    let steps = (p.k + BK - 1u) / BK;

    // accIH: row 4 ty + I (I < 4) or 64 + 4 ty + I - 4 (I >= 4) of the block, columns
    // 4 tx + lane (H = 0) or 64 + 4 tx + lane (H = 1).
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

    // Step 0 into copy 0 (zeros if k is 0: the loop below then does not run).
    let inside0 = block_inside && BK <= p.k;
    tile_a[0][va.x][va.y] = fetch_a(at_a, next_a, ra, va.x, inside0);
    tile_b[0][vb.x][vb.y] = fetch_b(at_b, next_b, vb.x, cb, inside0);
    workgroupBarrier();
    for (var t = 0u; t < steps; t++) {
        let cur = t % 2u;
        // Step t + 1's values, loaded now and used after this step's multiply-adds. Past the
        // last step they are zeros (every kk is past k), staged but never read.
        let k1 = (t + 1u) * BK;
        let inside = block_inside && k1 + BK <= p.k;
        at_a += step_a;
        at_b += step_b;
        let na = fetch_a(at_a, next_a, ra, k1 + va.x, inside);
        let nb = fetch_b(at_b, next_b, k1 + vb.x, cb, inside);
        for (var kk = 0u; kk < BK; kk++) {
            let a0 = tile_a[cur][kk][ty];
            let a1 = tile_a[cur][kk][ty + 16u];
            let b0 = tile_b[cur][kk][tx];
            let b1 = tile_b[cur][kk][tx + 16u];
            acc00 += a0.x * b0;
            acc01 += a0.x * b1;
            acc10 += a0.y * b0;
            acc11 += a0.y * b1;
            acc20 += a0.z * b0;
            acc21 += a0.z * b1;
            acc30 += a0.w * b0;
            acc31 += a0.w * b1;
            acc40 += a1.x * b0;
            acc41 += a1.x * b1;
            acc50 += a1.y * b0;
            acc51 += a1.y * b1;
            acc60 += a1.z * b0;
            acc61 += a1.z * b1;
            acc70 += a1.w * b0;
            acc71 += a1.w * b1;
        }
        // The other copy was last read in step t - 1, before the previous barrier.
        tile_a[1u - cur][va.x][va.y] = na;
        tile_b[1u - cur][vb.x][vb.y] = nb;
        workgroupBarrier();
    }

    let r = row0 + 4u * ty;
    let c0 = col0 + 4u * tx;
    let c1 = c0 + 64u;
    store_quad(base_c, r, c0, acc00);
    store_quad(base_c, r, c1, acc01);
    store_quad(base_c, r + 1u, c0, acc10);
    store_quad(base_c, r + 1u, c1, acc11);
    store_quad(base_c, r + 2u, c0, acc20);
    store_quad(base_c, r + 2u, c1, acc21);
    store_quad(base_c, r + 3u, c0, acc30);
    store_quad(base_c, r + 3u, c1, acc31);
    store_quad(base_c, r + 64u, c0, acc40);
    store_quad(base_c, r + 64u, c1, acc41);
    store_quad(base_c, r + 65u, c0, acc50);
    store_quad(base_c, r + 65u, c1, acc51);
    store_quad(base_c, r + 66u, c0, acc60);
    store_quad(base_c, r + 66u, c1, acc61);
    store_quad(base_c, r + 67u, c0, acc70);
    store_quad(base_c, r + 67u, c1, acc71);
}

// Writes the in-range values of C[row, col .. col + 3] from v.
fn store_quad(base_c: u32, row: u32, col: u32, v: vec4<f32>) {
    if row >= p.m {
        return;
    }
    let at = base_c + row * p.n + col;
    if col + 4u <= p.n {
        store_c(at, v.x);
        store_c(at + 1u, v.y);
        store_c(at + 2u, v.z);
        store_c(at + 3u, v.w);
        return;
    }
    if col < p.n {
        store_c(at, v.x);
    }
    if col + 1u < p.n {
        store_c(at + 1u, v.y);
    }
    if col + 2u < p.n {
        store_c(at + 2u, v.z);
    }
}
