// The attention softmax, one block of BLOCK threads per row. Rows of up to SOFTMAX_HELD * BLOCK
// columns (every attention row of the paper's models) are read once into registers, so each
// element is read and written once; longer rows take a second pass over memory.

#define SOFTMAX_HELD 4

// y = softmax(scale * x): the maximum is taken of the scaled values (so exp never overflows and
// the largest term is exactly 1), the exponentials are summed in double and normalized in double.
extern "C" __global__ void softmax_forward(const float* x, float* y, u64 rows, u64 cols,
                                           float scale) {
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
