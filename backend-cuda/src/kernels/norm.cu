// LayerNorm forward and backward, and the norm-pix target. One block of BLOCK threads per row;
// row statistics are two-pass (mean, then squared deviations from it) in double, as on the CPU.

// Mean and sum of squared deviations of one row, in double. Every thread gets both.
__device__ void mean_and_ssd(const float* row, u64 cols, double* scratch, double* mean,
                             double* ssd) {
    double acc = 0.0;
    for (u64 j = threadIdx.x; j < cols; j += BLOCK) acc += (double)row[j];
    const double m = block_sum(acc, scratch) / (double)cols;
    acc = 0.0;
    for (u64 j = threadIdx.x; j < cols; j += BLOCK) {
        const double d = (double)row[j] - m;
        acc += d * d;
    }
    *mean = m;
    *ssd = block_sum(acc, scratch);
}

// Rows of up to 32 * LN_HELD columns (the widths of ViT-B and ViT-L, and every decoder) run
// one warp per row from registers (the host launches launch::per_warp_row's grid for them).
#define LN_HELD 32

// The column of a lane's k-th held value: four consecutive columns per lane and step where the
// rows are read as float4 (`wide`), else one.
__device__ __forceinline__ u64 ln_col(u32 lane, u32 k, bool wide) {
    return wide ? 4 * (lane + 32 * (k / 4)) + k % 4 : lane + 32 * k;
}

__device__ void layernorm_forward_warp(const float* x, const float* gamma, const float* beta,
                                       float* y, u16* y16, float* mean, float* rstd, u64 rows,
                                       u64 cols, float eps) {
    const u32 lane = threadIdx.x % 32;
    // float4 rows take a fifth of the loads and their addresses; the row's statistics are
    // double sums whatever the order, so the two layouts give the same f32 results but for
    // the last bit of a double.
    const bool wide = cols % 4 == 0 && (((u64)x | (u64)gamma | (u64)beta | (u64)y) & 15) == 0;
    FOR_EACH_WARP_ROW(r, rows) {
        const float* xr = x + r * cols;
        float v[LN_HELD];
        if (wide) {
UNROLL
            for (u32 k = 0; k < LN_HELD; k += 4) {
                const u64 j = ln_col(lane, k, true);
                float4 f = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
                if (j < cols) f = *(const float4*)(xr + j);
                v[k] = f.x;
                v[k + 1] = f.y;
                v[k + 2] = f.z;
                v[k + 3] = f.w;
            }
        } else {
UNROLL
            for (u32 k = 0; k < LN_HELD; ++k) {
                const u64 j = ln_col(lane, k, false);
                v[k] = j < cols ? xr[j] : 0.0f;
            }
        }
        double acc = 0.0;
UNROLL
        for (u32 k = 0; k < LN_HELD; ++k) acc += (double)v[k];  // zeros past the row
        const double m64 = warp_sum(acc) / (double)cols;
        acc = 0.0;
UNROLL
        for (u32 k = 0; k < LN_HELD; ++k) {
            if (ln_col(lane, k, wide) < cols) {
                const double d = (double)v[k] - m64;
                acc += d * d;
            }
        }
        const double ssd = warp_sum(acc);
        const float m = (float)m64;
        const float rs = (float)(1.0 / sqrt(ssd / (double)cols + (double)eps));
        if (lane == 0) {
            mean[r] = m;
            rstd[r] = rs;
        }
        // y null: the output is kept as its bf16 copy alone (bf16.rs, `overwritten_floats`).
        float* yr = y ? y + r * cols : nullptr;
        if (wide) {
UNROLL
            for (u32 k = 0; k < LN_HELD; k += 4) {
                const u64 j = ln_col(lane, k, true);
                if (j >= cols) continue;
                const float4 g = *(const float4*)(gamma + j), b = *(const float4*)(beta + j);
                const float4 o = make_float4((v[k] - m) * rs * g.x + b.x,
                                             (v[k + 1] - m) * rs * g.y + b.y,
                                             (v[k + 2] - m) * rs * g.z + b.z,
                                             (v[k + 3] - m) * rs * g.w + b.w);
                if (yr) *(float4*)(yr + j) = o;
                // Element r * cols + j is a multiple of 4: its four bf16 fill two words.
                if (y16) *(uint2*)(y16 + r * cols + j) = bf16_quad(o);
            }
        } else {
UNROLL
            for (u32 k = 0; k < LN_HELD; ++k) {
                const u64 j = ln_col(lane, k, false);
                if (j >= cols) continue;
                const float o = (v[k] - m) * rs * gamma[j] + beta[j];
                if (yr) yr[j] = o;
                if (y16) y16[r * cols + j] = (u16)bf16_bits(o);
            }
        }
    }
}

// y = (x - mean) * rstd * gamma + beta, from the f32 mean and rstd that are stored, so the
// backward's xhat is bitwise the forward's. `y16`, where not null, receives y's bf16 copy (the
// operand of the Linear layer that reads y: bf16.rs, `produced_copy`); a null `y` keeps the copy
// alone.
// Three blocks per multiprocessor at least (85 registers): unbounded, the unrolled rows took
// 157 registers, one block of 8 warps per multiprocessor, too few loads in flight.
extern "C" __global__ void __launch_bounds__(BLOCK, 3)
    layernorm_forward(const float* x, const float* gamma, const float* beta, float* y, u16* y16,
                      float* mean, float* rstd, u64 rows, u64 cols, float eps) {
    if (cols <= 32 * LN_HELD) {
        layernorm_forward_warp(x, gamma, beta, y, y16, mean, rstd, rows, cols, eps);
        return;
    }
    __shared__ double scratch[BLOCK / 32];
    FOR_EACH_ROW(r, rows) {
        const float* xr = x + r * cols;
        double m64, ssd;
        mean_and_ssd(xr, cols, scratch, &m64, &ssd);
        const float m = (float)m64;
        const float rs = (float)(1.0 / sqrt(ssd / (double)cols + (double)eps));
        if (threadIdx.x == 0) {
            mean[r] = m;
            rstd[r] = rs;
        }
        float* yr = y ? y + r * cols : nullptr;
        for (u64 j = threadIdx.x; j < cols; j += BLOCK) {
            const float o = (xr[j] - m) * rs * gamma[j] + beta[j];
            if (yr) yr[j] = o;
            if (y16) y16[r * cols + j] = (u16)bf16_bits(o);
        }
    }
}

// dx += rstd * (dnorm - mean(dnorm) - xhat * mean(dnorm * xhat)), dnorm = dy * gamma (llm.c's
// formula); the two row means are double sums. dy is read as load_in does: floats, or where
// `dy16` is not null its bf16 copy alone (the input gradient of qkv or fc1, which the bf16 mode
// writes so). `dx16`, where not null, receives dx's bf16 copy (bf16.rs, `produced_copy`).
//
// Where `partial_g` is not null (rows of up to LN_FUSED_COLS columns), the kernel also does pass
// 1 of dgamma and dbeta while it holds each row: thread t sums columns t, t + BLOCK, ... of
// dy * xhat and of dy over the rows its block takes (blockIdx.x, + gridDim.x, ..., ascending), in
// double, into partial_g/partial_b[blockIdx.x][c]; column_sum_finish then folds the gridDim.x
// partials. That saves the second read of dy and x that layernorm_param_partials makes (8 of
// the 26 bytes per element the two passes moved). Wider rows take that kernel instead. Four
// columns a thread cover every ViT-B and ViT-L width (eight took 64 registers and four blocks).
// Four blocks a multiprocessor (__launch_bounds__) give the kernel 64 registers, in which the
// fused path holds two rows (ptxas 13, sm_90: no spills; at five blocks' 48 it spilled 104 bytes
// of loads a row). Five blocks holding one row each, in 48 registers, ran at 2.3 TB/s on the
// H200 (2026-11-28): fewer rows' loads in flight than the bandwidth needs.
#define LN_FUSED_PER_THREAD 4
#define LN_FUSED_COLS (BLOCK * LN_FUSED_PER_THREAD)
// One row's values for the fused path: dy, x and dx's old value of this thread's columns, and
// the row's mean and rstd.
struct LnRow {
    float d[LN_FUSED_PER_THREAD], x[LN_FUSED_PER_THREAD], old[LN_FUSED_PER_THREAD];
    float mean, rstd;
};

__device__ __forceinline__ void ln_load_row(LnRow& v, const float* dy, const u16* dy16,
                                            const float* x, const float* dx, const float* mean,
                                            const float* rstd, u64 r, u64 cols) {
    const u64 row = r * cols;
    v.mean = mean[r];
    v.rstd = rstd[r];
    UNROLL
    for (u32 k = 0; k < LN_FUSED_PER_THREAD; ++k) {
        const u64 j = threadIdx.x + k * BLOCK;
        const bool in = j < cols;
        v.d[k] = in ? load_in(dy, dy16, row + j) : 0.0f;
        v.x[k] = in ? x[row + j] : 0.0f;
        v.old[k] = in ? dx[row + j] : 0.0f;
    }
}

// The fused path (rows of up to LN_FUSED_COLS columns, partials wanted): each thread holds its
// LN_FUSED_PER_THREAD columns of a row, dy, x and dx's old value from one round of loads, and
// gamma's for all its block's rows, and the row's two sums share one block reduction. A row
// thus waits on memory once and on the block's barriers twice, and the next row's loads are
// in flight during both; the general path below waits on memory twice (its second loop's
// loads start after the sums) and on barriers four times, and its block holds one row at a
// time, so the latency of each row was what bounded it. The arithmetic is the general path's,
// in the same order: the results are bitwise the same.
__device__ void layernorm_backward_dx_fused(const float* dy, const u16* dy16, const float* x,
                                            const float* gamma, const float* mean,
                                            const float* rstd, float* dx, u16* dx16,
                                            double* partial_g, double* partial_b, u64 rows,
                                            u64 cols, double* scratch) {
    double pg[LN_FUSED_PER_THREAD], pb[LN_FUSED_PER_THREAD];
    float g[LN_FUSED_PER_THREAD];
    UNROLL
    for (u32 k = 0; k < LN_FUSED_PER_THREAD; ++k) {
        const u64 j = threadIdx.x + k * BLOCK;
        pg[k] = pb[k] = 0.0;
        g[k] = j < cols ? gamma[j] : 0.0f;
    }
    // The next row's loads are issued before this row's sums and their barriers, so they are in
    // flight while the block waits on those. Every row is one block's alone, and distinct from
    // the row before: loading it early reads dx before anything writes it, as before.
    LnRow cur;
    if (blockIdx.x < rows) ln_load_row(cur, dy, dy16, x, dx, mean, rstd, blockIdx.x, cols);
    FOR_EACH_ROW(r, rows) {
        const u64 row = r * cols;
        LnRow next{};
        if (r + gridDim.x < rows) {
            ln_load_row(next, dy, dy16, x, dx, mean, rstd, r + gridDim.x, cols);
        }
        const float m = cur.mean, rs = cur.rstd;
        double a = 0.0, b = 0.0;
        UNROLL
        for (u32 k = 0; k < LN_FUSED_PER_THREAD; ++k) {
            if (threadIdx.x + k * BLOCK >= cols) break;
            const float dnorm = cur.d[k] * g[k];
            a += (double)dnorm;
            b += (double)(dnorm * ((cur.x[k] - m) * rs));
        }
        block_sum_pair(&a, &b, scratch);
        const float mean_dnorm = (float)(a / (double)cols);
        const float mean_dnorm_xhat = (float)(b / (double)cols);
        UNROLL
        for (u32 k = 0; k < LN_FUSED_PER_THREAD; ++k) {
            const u64 j = threadIdx.x + k * BLOCK;
            if (j >= cols) break;
            const float xhat = (cur.x[k] - m) * rs;
            const float o =
                cur.old[k] + rs * (cur.d[k] * g[k] - mean_dnorm - xhat * mean_dnorm_xhat);
            dx[row + j] = o;
            if (dx16) dx16[row + j] = (u16)bf16_bits(o);
            pg[k] += (double)(cur.d[k] * xhat);
            pb[k] += (double)cur.d[k];
        }
        cur = next;
    }
    UNROLL
    for (u32 k = 0; k < LN_FUSED_PER_THREAD; ++k) {
        const u64 j = threadIdx.x + k * BLOCK;
        if (j >= cols) break;
        partial_g[blockIdx.x * cols + j] = pg[k];
        partial_b[blockIdx.x * cols + j] = pb[k];
    }
}

// Blocks a multiprocessor holds (launch::LAYERNORM_BACKWARD_PER_SM: the host launches one
// wave of them for the fused path).
#define LN_BACKWARD_PER_SM 4
extern "C" __global__ void __launch_bounds__(BLOCK, LN_BACKWARD_PER_SM)
    layernorm_backward_dx(const float* dy, const u16* dy16,
                                                 const float* x, const float* gamma,
                                                 const float* mean, const float* rstd, float* dx,
                                                 u16* dx16, double* partial_g, double* partial_b,
                                                 u64 rows, u64 cols) {
    __shared__ double scratch[2 * (BLOCK / 32)];
    if (partial_g) {
        layernorm_backward_dx_fused(dy, dy16, x, gamma, mean, rstd, dx, dx16, partial_g,
                                    partial_b, rows, cols, scratch);
        return;
    }
    FOR_EACH_ROW(r, rows) {
        const u64 row = r * cols;
        const float* xr = x + row;
        const float m = mean[r], rs = rstd[r];
        double a = 0.0, b = 0.0;
        for (u64 j = threadIdx.x; j < cols; j += BLOCK) {
            const float dnorm = load_in(dy, dy16, row + j) * gamma[j];
            a += (double)dnorm;
            b += (double)(dnorm * ((xr[j] - m) * rs));
        }
        const float mean_dnorm = (float)(block_sum(a, scratch) / (double)cols);
        const float mean_dnorm_xhat = (float)(block_sum(b, scratch) / (double)cols);
        float* dxr = dx + r * cols;
        for (u64 j = threadIdx.x; j < cols; j += BLOCK) {
            const float xhat = (xr[j] - m) * rs;
            const float d =
                dxr[j] + rs * (load_in(dy, dy16, row + j) * gamma[j] - mean_dnorm -
                               xhat * mean_dnorm_xhat);
            dxr[j] = d;
            if (dx16) dx16[r * cols + j] = (u16)bf16_bits(d);
        }
    }
}

// Pass 1 of dgamma and dbeta, column sums over all rows without atomics: thread (chunk, c)
// sums rows chunk * chunk_len ... in ascending order in double into partial_g/partial_b
// [chunk][c]. dy as layernorm_backward_dx reads it.
extern "C" __global__ void layernorm_param_partials(const float* dy, const u16* dy16,
                                                    const float* x, const float* mean,
                                                    const float* rstd, double* partial_g,
                                                    double* partial_b, u64 rows, u64 cols,
                                                    u64 chunks, u64 chunk_len) {
    const u64 n = chunks * cols;
    FOR_EACH(e, n) {
        const u64 chunk = div_u(e, cols), c = e - chunk * cols;
        const u64 r0 = chunk * chunk_len;
        const u64 r1 = r0 + chunk_len < rows ? r0 + chunk_len : rows;
        double g = 0.0, b = 0.0;
        for (u64 r = r0; r < r1; ++r) {
            const float d = load_in(dy, dy16, r * cols + c);
            g += (double)(d * ((x[r * cols + c] - mean[r]) * rstd[r]));
            b += (double)d;
        }
        partial_g[e] = g;
        partial_b[e] = b;
    }
}

// Pass 1 of the column sums of dense rows (bias gradients: copy_rows_backward of a bias map):
// thread (chunk, c) sums x[first + r][c] over rows r = chunk * chunk_len ... (below `rows`) in
// ascending order in double into partial[chunk][c]. Four rows per step of the loop keep four
// loads in flight. The rows are floats, or a bf16 copy (two values a word, the low half first)
// for a buffer whose producer wrote the copy alone (bf16.rs).
__device__ __forceinline__ double column_value(const float* p) { return (double)*p; }
__device__ __forceinline__ double column_value(const u16* p) {
    return (double)__uint_as_float((u32)*p << 16);
}

template <typename T>
__device__ void column_sum_partials_of(const T* x, double* partial, u64 first, u64 rows,
                                       u64 cols, u64 chunks, u64 chunk_len) {
    const u64 n = chunks * cols;
    FOR_EACH(e, n) {
        const u64 chunk = div_u(e, cols), c = e - chunk * cols;
        const u64 r0 = chunk * chunk_len;
        const u64 r1 = r0 + chunk_len < rows ? r0 + chunk_len : rows;
        const T* p = x + (first + r0) * cols + c;
        double acc = 0.0;
UNROLL_BY(4)
        for (u64 r = r0; r < r1; ++r, p += cols) acc += column_value(p);
        partial[e] = acc;
    }
}

extern "C" __global__ void column_sum_partials(const float* x, double* partial, u64 first,
                                               u64 rows, u64 cols, u64 chunks, u64 chunk_len) {
    column_sum_partials_of(x, partial, first, rows, cols, chunks, chunk_len);
}

extern "C" __global__ void column_sum_partials_bf16(const u16* x16, double* partial, u64 first,
                                                    u64 rows, u64 cols, u64 chunks,
                                                    u64 chunk_len) {
    column_sum_partials_of(x16, partial, first, rows, cols, chunks, chunk_len);
}

// Pass 2 for one output: out[c] += the sum over chunks, rounded once. Also the second pass of
// any other column sum laid out as partial[chunk][c]. One warp per column (the host launches
// launch::per_warp_row's grid): lane l folds chunks l, l + 32, ... in ascending order, then the
// warp's butterfly (warp_sum) adds the lanes, an order fixed by the chunk count. A thread per
// column took 14 us for ViT-B's 170 chunks on an H200, waiting on one load after another; a
// lane still waited on each of its own (64 of them for a LayerNorm's 2,048 partials), so it
// now issues eight loads before it adds them, in the same order.
#define FINISH_LOADS 8
__device__ void column_sum_finish_at(const double* partial, float* out, u64 chunks, u64 cols,
                                     u64 c) {
    const u32 lane = threadIdx.x % 32;
    double acc = 0.0;
    u64 k = lane;
    for (; k + 32 * (FINISH_LOADS - 1) < chunks; k += 32 * FINISH_LOADS) {
        double p[FINISH_LOADS];
        UNROLL
        for (u32 i = 0; i < FINISH_LOADS; ++i) p[i] = partial[(k + 32 * i) * cols + c];
        UNROLL
        for (u32 i = 0; i < FINISH_LOADS; ++i) acc += p[i];
    }
    for (; k < chunks; k += 32) acc += partial[k * cols + c];
    acc = warp_sum(acc);
    if (lane == 0) out[c] = (float)((double)out[c] + acc);
}

extern "C" __global__ void column_sum_finish(const double* partial, float* out, u64 chunks,
                                             u64 cols) {
    FOR_EACH_WARP_ROW(c, cols) column_sum_finish_at(partial, out, chunks, cols, c);
}

// Two column sums of the same shape in one launch, the host's grid over 2 cols warps: a
// LayerNorm's dgamma (partial_g) then dbeta (partial_b).
extern "C" __global__ void column_sum_finish_pair(const double* partial_g, float* out_g,
                                                  const double* partial_b, float* out_b,
                                                  u64 chunks, u64 cols) {
    FOR_EACH_WARP_ROW(c, 2 * cols) {
        if (c < cols) {
            column_sum_finish_at(partial_g, out_g, chunks, cols, c);
        } else {
            column_sum_finish_at(partial_b, out_b, chunks, cols, c - cols);
        }
    }
}

// The official norm-pix target: (x - mean) / sqrt(var + eps) with the unbiased variance, in
// double, rounded once. cols == 1 gives NaN (0 / 0), as PyTorch does.
extern "C" __global__ void normalize_rows(const float* x, float* y, u64 rows, u64 cols,
                                          float eps) {
    __shared__ double scratch[BLOCK / 32];
    FOR_EACH_ROW(r, rows) {
        const float* xr = x + r * cols;
        double m, ssd;
        mean_and_ssd(xr, cols, scratch, &m, &ssd);
        const double std = sqrt(ssd / ((double)cols - 1.0) + (double)eps);
        float* yr = y + r * cols;
        for (u64 j = threadIdx.x; j < cols; j += BLOCK) yr[j] = (float)(((double)xr[j] - m) / std);
    }
}
