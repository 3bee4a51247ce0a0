// Elementwise ops: fill, add, scale, scale_rows, exact GELU (alone and after fc1's bias) and
// AdamW.

extern "C" __global__ void fill_f32(float* dst, u64 n, float value) {
    FOR_EACH(i, n) dst[i] = value;
}

extern "C" __global__ void add_f32(const float* src, float* dst, u64 n) {
    FOR_EACH(i, n) dst[i] += src[i];
}

extern "C" __global__ void scale_f32(float* buf, u64 n, float s) {
    FOR_EACH(i, n) buf[i] *= s;
}

// dst[i] = src[i] * scales[i / group] (or += with `accumulate`): one factor per group of
// rows_per_scale * cols elements, an image's rows for drop path. Overwriting never reads dst.
extern "C" __global__ void scale_rows(const float* src, const float* scales, float* dst, u64 n,
                                      u64 group, u32 accumulate) {
    FOR_EACH(i, n) {
        const float v = src[i] * scales[i / group];
        dst[i] = accumulate ? dst[i] + v : v;
    }
}

// Phi(x) = erfc(-x / sqrt 2) / 2: no cancellation for negative x, where 1 + erf(x / sqrt 2)
// would erase the digits of a tiny result. In double, rounded once, as the CPU reference does.
__device__ double normal_cdf(double x) {
    return 0.5 * erfc(-x * 0.70710678118654752440);
}

// Exact GELU, x * Phi(x), in double, rounded once.
__device__ float gelu(float x) {
    const double v = (double)x;
    return (float)(v * normal_cdf(v));
}

extern "C" __global__ void gelu_forward(const float* x, float* y, u64 n) {
    FOR_EACH(i, n) y[i] = gelu(x[i]);
}

// The MLP's fc1 epilogue over rows x cols = n elements: pre[r][c] += bias[c] (the f32 add of
// copy_rows), act = gelu(pre) (gelu_forward's GELU), one read and two writes per element instead
// of the two passes of copy_rows and gelu_forward.
extern "C" __global__ void bias_gelu_forward(const float* bias, float* pre, float* act, u64 n,
                                             u64 cols) {
    FOR_EACH(i, n) {
        const float p = pre[i] + bias[mod_u(i, cols)];
        pre[i] = p;
        act[i] = gelu(p);
    }
}

// dx += dy * (Phi(x) + x * exp(-x^2 / 2) / sqrt(2 pi)), in double, rounded once.
extern "C" __global__ void gelu_backward(const float* x, const float* dy, float* dx, u64 n) {
    FOR_EACH(i, n) {
        const double v = (double)x[i];
        const double grad = normal_cdf(v) + v * exp(-0.5 * v * v) * 0.39894228040143267794;
        dx[i] = (float)((double)dx[i] + (double)dy[i] * grad);
    }
}

// The reduced-precision modes (Precision::Tf32, Bf16) compute GELU in f32 with erfcf and expf:
// the double erfc above is bound by the GPU's double-precision rate, these by memory. Their error
// (a few f32 ulps) is far below that of the bf16 GEMM operands around them.
__device__ float gelu_f32(float x) { return 0.5f * x * erfcf(-x * 0.70710678f); }

extern "C" __global__ void gelu_forward_f32(const float* x, float* y, u64 n) {
    FOR_EACH(i, n) y[i] = gelu_f32(x[i]);
}

extern "C" __global__ void bias_gelu_forward_f32(const float* bias, float* pre, float* act, u64 n,
                                                 u64 cols) {
    FOR_EACH(i, n) {
        const float p = pre[i] + bias[mod_u(i, cols)];
        pre[i] = p;
        act[i] = gelu_f32(p);
    }
}

extern "C" __global__ void gelu_backward_f32(const float* x, const float* dy, float* dx, u64 n) {
    FOR_EACH(i, n) {
        const float v = x[i];
        const float grad = 0.5f * erfcf(-v * 0.70710678f) + v * expf(-0.5f * v * v) * 0.39894228f;
        dx[i] += dy[i] * grad;
    }
}

// PyTorch's AdamW (single-tensor path). The per-step scalars (decay = 1 - lr * wd,
// step_size = lr / bc1, bc2_sqrt = sqrt(bc2), 1 - beta1, 1 - beta2) are formed on the host in
// f32, exactly as the CPU reference forms them.
extern "C" __global__ void adamw(float* param, const float* grad, float* m, float* v, u64 n,
                                 float decay, float beta1, float beta2, float one_minus_beta1,
                                 float one_minus_beta2, float step_size, float bc2_sqrt,
                                 float eps) {
    FOR_EACH(i, n) {
        const float g = grad[i];
        float p = param[i] * decay;
        const float mi = beta1 * m[i] + one_minus_beta1 * g;
        const float vi = beta2 * v[i] + one_minus_beta2 * g * g;
        p -= step_size * mi / (sqrtf(vi) / bc2_sqrt + eps);
        param[i] = p;
        m[i] = mi;
        v[i] = vi;
    }
}

// The bf16 copy of a GEMM operand, two values per u32 (the first in the low half, as they lie
// in memory): the upper 16 bits of each f32, rounded to nearest even as the tensor cores round
// the operands of CUBLAS_COMPUTE_32F_FAST_16BF; infinities stay, NaN stays NaN (quiet). With
// `n` odd the last word's high half is 0. cuBLAS's bf16 kernels on such copies run much closer
// to the tensor cores' peak than its FAST_16BF kernels on f32 operands (ops.rs, `gemm`).
__device__ __forceinline__ u32 bf16_bits(float x) {
    const u32 u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u >> 16) | 0x40u;
    return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}

extern "C" __global__ void round_to_bf16(const float* x, u32* pairs, u64 n) {
    FOR_EACH(i, (n + 1) / 2) {
        const u32 lo = bf16_bits(x[2 * i]);
        const u32 hi = 2 * i + 1 < n ? bf16_bits(x[2 * i + 1]) : 0u;
        pairs[i] = lo | (hi << 16);
    }
}
