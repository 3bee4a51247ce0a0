// The attention softmax, one block of BLOCK threads per row.

// y = softmax(scale * x): the maximum is taken of the scaled values (so exp never overflows and
// the largest term is exactly 1), the exponentials are summed in double and normalized in double.
extern "C" __global__ void softmax_forward(const float* x, float* y, u64 rows, u64 cols,
                                           float scale) {
    __shared__ double scratch[BLOCK];
    __shared__ float max_scratch[BLOCK];
    FOR_EACH_ROW(r, rows) {
        const float* xr = x + r * cols;
        float* yr = y + r * cols;
        float mx = NEG_INF;
        for (u64 j = threadIdx.x; j < cols; j += BLOCK) mx = fmaxf(mx, scale * xr[j]);
        mx = block_max(mx, max_scratch);
        double acc = 0.0;
        for (u64 j = threadIdx.x; j < cols; j += BLOCK) {
            const float e = expf(scale * xr[j] - mx);
            yr[j] = e;
            acc += (double)e;
        }
        const double inv = 1.0 / block_sum(acc, scratch);
        // Each thread rescales the elements it wrote itself: no barrier needed in between.
        for (u64 j = threadIdx.x; j < cols; j += BLOCK) yr[j] = (float)((double)yr[j] * inv);
    }
}

// dx += scale * y * (dy - sum(dy * y)), the row dot product in double.
extern "C" __global__ void softmax_backward(const float* y, const float* dy, float* dx, u64 rows,
                                            u64 cols, float scale) {
    __shared__ double scratch[BLOCK];
    FOR_EACH_ROW(r, rows) {
        const float* yr = y + r * cols;
        const float* dyr = dy + r * cols;
        double acc = 0.0;
        for (u64 j = threadIdx.x; j < cols; j += BLOCK) acc += (double)dyr[j] * (double)yr[j];
        const float dot = (float)block_sum(acc, scratch);
        float* dxr = dx + r * cols;
        for (u64 j = threadIdx.x; j < cols; j += BLOCK) {
            dxr[j] += scale * yr[j] * (dyr[j] - dot);
        }
    }
}
