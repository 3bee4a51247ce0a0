// The attention softmax. The forward runs rows of up to 32 * WARP_HELD columns (every attention
// row of the paper's models: 50 to 257 tokens) one warp per row from registers, 2.6x faster on
// an H200 than a block per row; longer rows, and the backward (whose warp version measured 25 %
// slower, docs/results-gpu.md), run one block of BLOCK threads per row, from registers up to
// SOFTMAX_HELD * BLOCK columns, else in two passes over memory. Each lane (thread) folds its
// elements in ascending order in double, then the warp (block) combines the partials in a
// fixed order.

#define WARP_HELD 16
#define SOFTMAX_HELD 4

__device__ void softmax_forward_warp(const float* x, float* y, u64 rows, u64 cols, float scale) {
    const u32 lane = threadIdx.x % 32;
    FOR_EACH_WARP_ROW(r, rows) {
        const float* xr = x + r * cols;
        float* yr = y + r * cols;
        float v[WARP_HELD];
        float mx = NEG_INF;
        for (u32 k = 0; k < WARP_HELD; ++k) {
            const u64 j = lane + 32 * k;
            v[k] = j < cols ? scale * xr[j] : NEG_INF;
            mx = fmaxf(mx, v[k]);
        }
        mx = warp_max(mx);
        double acc = 0.0;
        for (u32 k = 0; k < WARP_HELD; ++k) {
            if (lane + 32 * k < cols) {
                v[k] = expf(v[k] - mx);
                acc += (double)v[k];
            }
        }
        const double inv = 1.0 / warp_sum(acc);
        for (u32 k = 0; k < WARP_HELD; ++k) {
            const u64 j = lane + 32 * k;
            if (j < cols) yr[j] = (float)((double)v[k] * inv);
        }
    }
}

// y = softmax(scale * x): the maximum is taken of the scaled values (so exp never overflows and
// the largest term is exactly 1), the exponentials are summed in double and normalized in double.
extern "C" __global__ void softmax_forward(const float* x, float* y, u64 rows, u64 cols,
                                           float scale) {
    if (cols <= 32 * WARP_HELD) {
        softmax_forward_warp(x, y, rows, cols, scale);
        return;
    }
    __shared__ double scratch[BLOCK / 32];
    __shared__ float max_scratch[BLOCK / 32];
    const bool held = cols <= SOFTMAX_HELD * BLOCK;
    FOR_EACH_ROW(r, rows) {
        const float* xr = x + r * cols;
        float* yr = y + r * cols;
        float v[SOFTMAX_HELD];
        float mx = NEG_INF;
        if (held) {
            for (u32 k = 0; k < SOFTMAX_HELD; ++k) {
                const u64 j = threadIdx.x + (u64)k * BLOCK;
                v[k] = j < cols ? scale * xr[j] : NEG_INF;
                mx = fmaxf(mx, v[k]);
            }
        } else {
            for (u64 j = threadIdx.x; j < cols; j += BLOCK) mx = fmaxf(mx, scale * xr[j]);
        }
        mx = block_max(mx, max_scratch);
        double acc = 0.0;
        if (held) {
            for (u32 k = 0; k < SOFTMAX_HELD; ++k) {
                if (threadIdx.x + (u64)k * BLOCK < cols) {
                    v[k] = expf(v[k] - mx);
                    acc += (double)v[k];
                }
            }
        } else {
            for (u64 j = threadIdx.x; j < cols; j += BLOCK) {
                const float e = expf(scale * xr[j] - mx);
                yr[j] = e;
                acc += (double)e;
            }
        }
        const double inv = 1.0 / block_sum(acc, scratch);
        if (held) {
            for (u32 k = 0; k < SOFTMAX_HELD; ++k) {
                const u64 j = threadIdx.x + (u64)k * BLOCK;
                if (j < cols) yr[j] = (float)((double)v[k] * inv);
            }
        } else {
            // Each thread rescales the elements it wrote itself: no barrier needed in between.
            for (u64 j = threadIdx.x; j < cols; j += BLOCK) yr[j] = (float)((double)yr[j] * inv);
        }
    }
}

// dx += scale * y * (dy - sum(dy * y)), the row dot product in double.
extern "C" __global__ void softmax_backward(const float* y, const float* dy, float* dx, u64 rows,
                                            u64 cols, float scale) {
    __shared__ double scratch[BLOCK / 32];
    const bool held = cols <= SOFTMAX_HELD * BLOCK;
    FOR_EACH_ROW(r, rows) {
        const float* yr = y + r * cols;
        const float* dyr = dy + r * cols;
        float* dxr = dx + r * cols;
        float yv[SOFTMAX_HELD], dyv[SOFTMAX_HELD];
        double acc = 0.0;
        if (held) {
            for (u32 k = 0; k < SOFTMAX_HELD; ++k) {
                const u64 j = threadIdx.x + (u64)k * BLOCK;
                yv[k] = j < cols ? yr[j] : 0.0f;
                dyv[k] = j < cols ? dyr[j] : 0.0f;
                if (j < cols) acc += (double)dyv[k] * (double)yv[k];
            }
        } else {
            for (u64 j = threadIdx.x; j < cols; j += BLOCK) acc += (double)dyr[j] * (double)yr[j];
        }
        const float dot = (float)block_sum(acc, scratch);
        if (held) {
            for (u32 k = 0; k < SOFTMAX_HELD; ++k) {
                const u64 j = threadIdx.x + (u64)k * BLOCK;
                if (j < cols) dxr[j] += scale * yv[k] * (dyv[k] - dot);
            }
        } else {
            for (u64 j = threadIdx.x; j < cols; j += BLOCK) {
                dxr[j] += scale * yr[j] * (dyr[j] - dot);
            }
        }
    }
}
