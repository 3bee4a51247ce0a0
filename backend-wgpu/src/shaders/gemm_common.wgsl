// What the GEMM kernels (gemm.wgsl, gemm_tiled.wgsl, gemm_wide.wgsl) share: the transposes as
// override constants, the parameters (mae::backend::Gemm, as gemm.rs writes them), the
// bindings, element access to op(A) and op(B) of one batch item, and the store to C.

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

// op(A)[row, kk] for the item starting at `base` (inside the matrix).
fn stored_a(base: u32, row: u32, kk: u32) -> f32 {
    if TRANS_A {
        return a[base + kk * p.m + row];
    }
    return a[base + row * p.k + kk];
}

// op(B)[kk, col] for the item starting at `base` (inside the matrix).
fn stored_b(base: u32, kk: u32, col: u32) -> f32 {
    if TRANS_B {
        return b[base + col * p.k + kk];
    }
    return b[base + kk * p.n + col];
}

// op(A)[row, kk] of the item starting at `base`, zero outside the matrix (the tiled kernels'
// staging, which pads edge tiles with zeros).
fn load_a(base: u32, row: u32, kk: u32) -> f32 {
    if row >= p.m || kk >= p.k {
        return 0.0;
    }
    return stored_a(base, row, kk);
}

// op(B)[kk, col] of the item starting at `base`, zero outside the matrix.
fn load_b(base: u32, kk: u32, col: u32) -> f32 {
    if kk >= p.k || col >= p.n {
        return 0.0;
    }
    return stored_b(base, kk, col);
}

// The staging of the tiled kernels' steps along k: each of a workgroup's invocations loads
// elements e, e + THREADS, ... of a step's `bm` x 16 tile of op(A) and 16 x `bm` tile of
// op(B), with consecutive e at consecutive addresses of whichever layout A and B are stored in.
// (row, kk) of element e of the op(A) tile:
fn staged_a(e: u32, bm: u32) -> vec2<u32> {
    if TRANS_A {
        return vec2<u32>(e % bm, e / bm);
    }
    return vec2<u32>(e / 16u, e % 16u);
}

// (kk, col) of element e of the op(B) tile.
fn staged_b(e: u32, bm: u32) -> vec2<u32> {
    if TRANS_B {
        return vec2<u32>(e % 16u, e / 16u);
    }
    return vec2<u32>(e / bm, e % bm);
}

// C[at] = alpha v + beta C[at]. With beta == 0 the old C is not read, so a NaN there does not
// leak into the result.
fn store_c(at: u32, v: f32) {
    var x = p.alpha * v;
    if p.beta != 0.0 {
        x += p.beta * c[at];
    }
    c[at] = x;
}
