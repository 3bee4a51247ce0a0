// Fused multi-head self-attention over timm's qkv layout, flash-attention style: no
// [tokens, tokens] score matrix in memory. One thread owns one query row (forward, dQ) or one key
// row (dK, dV) with its accumulators in registers and walks the other rows in tiles staged
// through shared memory, so every sum runs in a fixed order (ascending row, ascending column)
// without atomics. Accumulation is in f32.
//
// Layout: qkv [batch * tokens, 3 D], D = heads * hd, head h of q, k, v at columns
// h * hd, D + h * hd, 2 D + h * hd; out and d_out [batch * tokens, D]; lse and Drow
// [batch, heads, tokens]. The scores are scale * (q . k), the scale applied after the product
// as timm does.
//
// Blocks: ATT_THREADS threads take ATT_THREADS consecutive rows of one (image, head); blocks
// grid-stride over (image, head, row tile). The head width is a template parameter HD (32 or
// 64, the smallest that holds hd; the host sends wider heads, such as ViT-H's 80, to the
// composed ops) so that the per-thread arrays stay in registers, and each width is a kernel of
// its own (`_hd32`, `_hd64`): ptxas gives a kernel one register allocation for all its paths,
// and with both widths in one kernel the 32-wide path (the decoder's) ran at the 64-wide one's
// 168-255 registers and spilled (sm_90: 120 bytes of loads in dQ, 628 in dK-dV), where alone it
// needs 96-236 and spills nothing. Columns hd .. HD are zero in every staged row and register,
// which adds exact zeros to the dot products and keeps their order that of the hd columns.

// Threads per block of the attention kernels: the host launches exactly this many.
#define ATT_THREADS 64
// Rows per tile staged through shared memory, and the widest head.
#define ATT_TILE 32
#define ATT_MAX_HD 64

// The two staged tiles of a kernel, `ta` and `tb`, 2 * ATT_TILE * ATT_MAX_HD floats (16 KiB),
// declared in the kernel and handed to its grid function.
#define ATT_SHARED_TILES                                                                      \
    __shared__ float ta[ATT_TILE * ATT_MAX_HD];                                               \
    __shared__ float tb[ATT_TILE * ATT_MAX_HD]

// The (image, head) pair and the first row of block `blk`, `tiles` tiles of `rows` rows per pair.
struct AttBlock {
    u64 b, h, row0;
};
__device__ __forceinline__ AttBlock att_block(u64 blk, u64 tiles, u64 heads, u64 rows) {
    const u64 pair = div_u(blk, tiles);
    AttBlock a;
    a.row0 = mod_u(blk, tiles) * rows;
    a.b = div_u(pair, heads);
    a.h = mod_u(pair, heads);
    return a;
}

// Stages rows row0 .. row0 + ATT_TILE (those below `tokens`) of one head of two matrices into
// shared memory, zero elsewhere: `a` and `b` point at column 0 of the head in row 0 of the
// image, their rows `stride_a` and `stride_b` floats apart. Every thread of the block calls it
// between barriers.
template <int HD>
__device__ void att_stage(float* dst_a, float* dst_b, const float* a, u64 stride_a, const float* b,
                          u64 stride_b, u64 row0, u64 tokens, u32 hd) {
    for (u32 e = threadIdx.x; e < ATT_TILE * HD; e += ATT_THREADS) {
        const u32 r = e / HD, c = e % HD;
        const u64 row = row0 + r;
        const bool in = row < tokens && c < hd;
        dst_a[e] = in ? a[row * stride_a + c] : 0.0f;
        dst_b[e] = in ? b[row * stride_b + c] : 0.0f;
    }
}

// Loads `hd` columns of `src` into `dst`, zero up to HD.
template <int HD>
__device__ __forceinline__ void att_load(float* dst, const float* src, bool valid, u32 hd) {
    for (u32 c = 0; c < HD; ++c) dst[c] = valid && c < hd ? src[c] : 0.0f;
}

template <int HD>
__device__ __forceinline__ float att_dot(const float* a, const float* b) {
    float s = 0.0f;
    for (u32 c = 0; c < HD; ++c) s += a[c] * b[c];
    return s;
}

// Forward for one block: online softmax over key tiles. Per tile the thread computes its scores,
// rescales its running sum and output once to the new maximum, then adds the tile's terms.
template <int HD>
__device__ void attention_forward_block(const float* qkv, float* out, float* lse, u64 tokens,
                                        u64 heads, u32 hd, float scale, AttBlock blk, float* ks,
                                        float* vs) {
    const u64 dim = heads * hd, width = 3 * dim;
    const u64 i = blk.row0 + threadIdx.x;
    const bool valid = i < tokens;
    const float* base = qkv + blk.b * tokens * width + blk.h * hd;
    float q[HD], o[HD];
    att_load<HD>(q, base + i * width, valid, hd);
    for (u32 c = 0; c < HD; ++c) o[c] = 0.0f;
    float m = NEG_INF, l = 0.0f;
    for (u64 j0 = 0; j0 < tokens; j0 += ATT_TILE) {
        __syncthreads();  // the previous tile is no longer read
        att_stage<HD>(ks, vs, base + dim, width, base + 2 * dim, width, j0, tokens, hd);
        __syncthreads();
        const u32 n = (u32)(tokens - j0 < ATT_TILE ? tokens - j0 : ATT_TILE);
        float s[ATT_TILE];
        float tile_max = NEG_INF;
        for (u32 jj = 0; jj < ATT_TILE; ++jj) {
            s[jj] = jj < n ? scale * att_dot<HD>(q, ks + jj * HD) : NEG_INF;
            tile_max = fmaxf(tile_max, s[jj]);
        }
        if (tile_max > m) {
            // exp(-inf) = 0 on the first tile, where l and o are still 0.
            const float corr = expf(m - tile_max);
            l *= corr;
            for (u32 c = 0; c < HD; ++c) o[c] *= corr;
            m = tile_max;
        }
        for (u32 jj = 0; jj < n; ++jj) {
            const float p = expf(s[jj] - m);
            l += p;
            const float* v = vs + jj * HD;
            for (u32 c = 0; c < HD; ++c) o[c] += p * v[c];
        }
    }
    if (valid) {
        float* orow = out + (blk.b * tokens + i) * dim + blk.h * hd;
        for (u32 c = 0; c < hd; ++c) orow[c] = o[c] / l;
        lse[(blk.b * heads + blk.h) * tokens + i] = m + logf(l);
    }
}

// out = softmax(scale * q k^T) v per (image, head), lse = log of each row's sum of exponentials:
// every block of the grid in turn.
template <int HD>
__device__ void attention_forward_grid(const float* qkv, float* out, float* lse, u64 batch,
                                       u64 tokens, u64 heads, u64 hd, float scale, float* ta,
                                       float* tb) {
    const u64 tiles = (tokens + ATT_THREADS - 1) / ATT_THREADS;
    // The block functions use __syncthreads: every thread of a block runs every tile, so the
    // loop depends on the block alone (here and in the backward's grid functions).
    for (u64 g = blockIdx.x; g < batch * heads * tiles; g += gridDim.x) {
        const AttBlock blk = att_block(g, tiles, heads, ATT_THREADS);
        attention_forward_block<HD>(qkv, out, lse, tokens, heads, (u32)hd, scale, blk, ta, tb);
    }
}

extern "C" __global__ void attention_forward_hd32(const float* qkv, float* out, float* lse,
                                                  u64 batch, u64 tokens, u64 heads, u64 hd,
                                                  float scale) {
    ATT_SHARED_TILES;
    attention_forward_grid<32>(qkv, out, lse, batch, tokens, heads, hd, scale, ta, tb);
}

extern "C" __global__ void attention_forward_hd64(const float* qkv, float* out, float* lse,
                                                  u64 batch, u64 tokens, u64 heads, u64 hd,
                                                  float scale) {
    ATT_SHARED_TILES;
    attention_forward_grid<64>(qkv, out, lse, batch, tokens, heads, hd, scale, ta, tb);
}

// dQ for one block, one thread per query row i: Drow_i = dO_i . O_i (the softmax backward's
// row sum), then over key tiles p = exp(scale q_i . k_j - lse_i), ds = p (dO_i . v_j - Drow_i),
// dq += ds k_j; dq is scaled once at the end. Writes Drow for the dK, dV kernel.
template <int HD>
__device__ void attention_dq_block(const float* qkv, const float* out, const float* lse,
                                   const float* d_out, float* d_qkv, float* drow, u64 tokens,
                                   u64 heads, u32 hd, float scale, AttBlock blk, float* ks,
                                   float* vs) {
    const u64 dim = heads * hd, width = 3 * dim;
    const u64 i = blk.row0 + threadIdx.x;
    const bool valid = i < tokens;
    const float* base = qkv + blk.b * tokens * width + blk.h * hd;
    const u64 row = blk.b * tokens + i;  // the token row of query i
    const u64 lrow = (blk.b * heads + blk.h) * tokens + i;
    float q[HD], dout[HD], dq[HD];
    att_load<HD>(q, base + i * width, valid, hd);
    att_load<HD>(dout, d_out + row * dim + blk.h * hd, valid, hd);
    float d = 0.0f;
    if (valid) {
        const float* orow = out + row * dim + blk.h * hd;
        for (u32 c = 0; c < hd; ++c) d += dout[c] * orow[c];
    }
    const float li = valid ? lse[lrow] : 0.0f;
    for (u32 c = 0; c < HD; ++c) dq[c] = 0.0f;
    for (u64 j0 = 0; j0 < tokens; j0 += ATT_TILE) {
        __syncthreads();
        att_stage<HD>(ks, vs, base + dim, width, base + 2 * dim, width, j0, tokens, hd);
        __syncthreads();
        const u32 n = (u32)(tokens - j0 < ATT_TILE ? tokens - j0 : ATT_TILE);
        for (u32 jj = 0; jj < n; ++jj) {
            const float* k = ks + jj * HD;
            const float p = expf(scale * att_dot<HD>(q, k) - li);
            const float ds = p * (att_dot<HD>(dout, vs + jj * HD) - d);
            for (u32 c = 0; c < HD; ++c) dq[c] += ds * k[c];
        }
    }
    if (valid) {
        float* dqrow = d_qkv + row * width + blk.h * hd;
        for (u32 c = 0; c < hd; ++c) dqrow[c] = scale * dq[c];
        drow[lrow] = d;
    }
}

// Gradient of q into the q columns of d_qkv (overwritten), and Drow [batch, heads, tokens]:
// every block of the grid in turn.
template <int HD>
__device__ void attention_dq_grid(const float* qkv, const float* out, const float* lse,
                                  const float* d_out, float* d_qkv, float* drow, u64 batch,
                                  u64 tokens, u64 heads, u64 hd, float scale, float* ta,
                                  float* tb) {
    const u64 tiles = (tokens + ATT_THREADS - 1) / ATT_THREADS;
    for (u64 g = blockIdx.x; g < batch * heads * tiles; g += gridDim.x) {
        const AttBlock blk = att_block(g, tiles, heads, ATT_THREADS);
        attention_dq_block<HD>(qkv, out, lse, d_out, d_qkv, drow, tokens, heads, (u32)hd, scale,
                               blk, ta, tb);
    }
}

extern "C" __global__ void attention_backward_dq_hd32(const float* qkv, const float* out,
                                                      const float* lse, const float* d_out,
                                                      float* d_qkv, float* drow, u64 batch,
                                                      u64 tokens, u64 heads, u64 hd,
                                                      float scale) {
    ATT_SHARED_TILES;
    attention_dq_grid<32>(qkv, out, lse, d_out, d_qkv, drow, batch, tokens, heads, hd, scale, ta,
                          tb);
}

extern "C" __global__ void attention_backward_dq_hd64(const float* qkv, const float* out,
                                                      const float* lse, const float* d_out,
                                                      float* d_qkv, float* drow, u64 batch,
                                                      u64 tokens, u64 heads, u64 hd,
                                                      float scale) {
    ATT_SHARED_TILES;
    attention_dq_grid<64>(qkv, out, lse, d_out, d_qkv, drow, batch, tokens, heads, hd, scale, ta,
                          tb);
}

// dK, dV for one block, one thread per key row j: over query tiles, p = exp(scale q_i . k_j -
// lse_i) as in the dQ kernel, dv += p dO_i, ds = p (dO_i . v_j - Drow_i), dk += ds q_i; dk is
// scaled once at the end.
template <int HD>
__device__ void attention_dkv_block(const float* qkv, const float* lse, const float* d_out,
                                    const float* drow, float* d_qkv, u64 tokens, u64 heads,
                                    u32 hd, float scale, AttBlock blk, float* qs, float* dos,
                                    float* ls, float* ds_row) {
    const u64 dim = heads * hd, width = 3 * dim;
    const u64 j = blk.row0 + threadIdx.x;
    const bool valid = j < tokens;
    const float* base = qkv + blk.b * tokens * width + blk.h * hd;
    const float* dout_base = d_out + blk.b * tokens * dim + blk.h * hd;
    const u64 lbase = (blk.b * heads + blk.h) * tokens;
    float k[HD], v[HD], dk[HD], dv[HD];
    att_load<HD>(k, base + dim + j * width, valid, hd);
    att_load<HD>(v, base + 2 * dim + j * width, valid, hd);
    for (u32 c = 0; c < HD; ++c) {
        dk[c] = 0.0f;
        dv[c] = 0.0f;
    }
    for (u64 i0 = 0; i0 < tokens; i0 += ATT_TILE) {
        __syncthreads();
        att_stage<HD>(qs, dos, base, width, dout_base, dim, i0, tokens, hd);
        for (u32 r = threadIdx.x; r < ATT_TILE; r += ATT_THREADS) {
            const bool in = i0 + r < tokens;
            ls[r] = in ? lse[lbase + i0 + r] : 0.0f;
            ds_row[r] = in ? drow[lbase + i0 + r] : 0.0f;
        }
        __syncthreads();
        const u32 n = (u32)(tokens - i0 < ATT_TILE ? tokens - i0 : ATT_TILE);
        for (u32 ii = 0; ii < n; ++ii) {
            const float* q = qs + ii * HD;
            const float* dout = dos + ii * HD;
            const float p = expf(scale * att_dot<HD>(q, k) - ls[ii]);
            const float ds = p * (att_dot<HD>(dout, v) - ds_row[ii]);
            for (u32 c = 0; c < HD; ++c) {
                dv[c] += p * dout[c];
                dk[c] += ds * q[c];
            }
        }
    }
    if (valid) {
        float* dkrow = d_qkv + (blk.b * tokens + j) * width + dim + blk.h * hd;
        for (u32 c = 0; c < hd; ++c) {
            dkrow[c] = scale * dk[c];
            dkrow[dim + c] = dv[c];
        }
    }
}

// Gradients of k and v into the k and v columns of d_qkv (overwritten), given the dQ kernel's
// Drow: every block of the grid in turn.
template <int HD>
__device__ void attention_dkv_grid(const float* qkv, const float* lse, const float* d_out,
                                   const float* drow, float* d_qkv, u64 batch, u64 tokens,
                                   u64 heads, u64 hd, float scale, float* ta, float* tb) {
    __shared__ float lse_tile[ATT_TILE];
    __shared__ float drow_tile[ATT_TILE];
    const u64 tiles = (tokens + ATT_THREADS - 1) / ATT_THREADS;
    for (u64 g = blockIdx.x; g < batch * heads * tiles; g += gridDim.x) {
        const AttBlock blk = att_block(g, tiles, heads, ATT_THREADS);
        attention_dkv_block<HD>(qkv, lse, d_out, drow, d_qkv, tokens, heads, (u32)hd, scale, blk,
                                ta, tb, lse_tile, drow_tile);
    }
}

extern "C" __global__ void attention_backward_dkv_hd32(const float* qkv, const float* lse,
                                                       const float* d_out, const float* drow,
                                                       float* d_qkv, u64 batch, u64 tokens,
                                                       u64 heads, u64 hd, float scale) {
    ATT_SHARED_TILES;
    attention_dkv_grid<32>(qkv, lse, d_out, drow, d_qkv, batch, tokens, heads, hd, scale, ta, tb);
}

extern "C" __global__ void attention_backward_dkv_hd64(const float* qkv, const float* lse,
                                                       const float* d_out, const float* drow,
                                                       float* d_qkv, u64 batch, u64 tokens,
                                                       u64 heads, u64 hd, float scale) {
    ATT_SHARED_TILES;
    attention_dkv_grid<64>(qkv, lse, d_out, drow, d_qkv, batch, tokens, heads, hd, scale, ta, tb);
}
