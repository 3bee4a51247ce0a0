// Elementwise ops: fill, add, scale, scale_rows, exact GELU (alone and after fc1's bias) and
// AdamW.

extern "C" __global__ void fill_f32(float* dst, u64 n, float value) {
    FOR_EACH(i, n) dst[i] = value;
}

extern "C" __global__ void add_f32(const float* src, float* dst, u64 n) {
    FOR_EACH(i, n) dst[i] += src[i];
}

// dst[i] = beta dst[i] + the sum of parts[c n + i] over c < count, in double and in the order
// of c, rounded once, and the same for (parts_b, dst_b, n_b, beta_b) over the elements past n:
// a weight gradient split along k (`split_k.rs`) has one partial product per chunk, and its
// bias gradient one partial sum per chunk, both added in this one launch. beta 0 never reads
// dst.
extern "C" __global__ void sum_partials_f32(const float* parts, float* dst, u64 n, float beta,
                                            const float* parts_b, float* dst_b, u64 n_b,
                                            float beta_b, u32 count) {
    FOR_EACH(j, n + n_b) {
        const bool first = j < n;
        const float* p = first ? parts : parts_b;
        float* d = first ? dst : dst_b;
        const u64 len = first ? n : n_b, i = first ? j : j - n;
        const float b = first ? beta : beta_b;
        double s = b == 0.0f ? 0.0 : (double)b * d[i];
        for (u32 c = 0; c < count; ++c) s += p[(u64)c * len + i];
        d[i] = (float)s;
    }
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

// Element i of an input held as floats `x` or, where `x16` is not null, as its bf16 copy alone
// (bf16.rs, `copy_alone`): the GELU's input and gradient, which the bf16 mode may keep so.
__device__ __forceinline__ float load_in(const float* x, const u16* x16, u64 i) {
    return x16 ? __uint_as_float((u32)x16[i] << 16) : x[i];
}

// Elements 4 q .. 4 q + 3 of such an input (see by_fours).
__device__ __forceinline__ float4 load_in4(const float* x, const u16* x16, u64 q) {
    if (!x16) return ((const float4*)x)[q];
    const uint2 w = ((const uint2*)x16)[q];
    return make_float4(__uint_as_float(w.x << 16), __uint_as_float(w.x & 0xffff0000u),
                       __uint_as_float(w.y << 16), __uint_as_float(w.y & 0xffff0000u));
}

// y = G(x) elementwise, G one of the GELUs, x read as load_in does. `y16`, where not null,
// receives the bf16 copy of y (bf16.rs, `produced_copy`): so do `act16` and `dx16` below. A
// null `y` (or `act` below) is an output kept as the copy alone (bf16.rs, `overwritten_floats`): only
// the copy is stored.
template <float (*G)(float)>
__device__ void gelu_forward_of(const float* x, const u16* x16, float* y, u16* y16, u64 n) {
    FOR_EACH(i, n) {
        const float v = G(load_in(x, x16, i));
        if (y) y[i] = v;
        if (y16) y16[i] = (u16)bf16_bits(v);
    }
}

// The MLP's fc1 epilogue over rows x cols = n elements: pre[r][c] += bias[c] (the f32 add of
// copy_rows), act = G(pre) (gelu_forward's GELU), one read and two writes per element instead
// of the two passes of copy_rows and gelu_forward.
template <float (*G)(float)>
__device__ void bias_gelu_forward_of(const float* bias, float* pre, float* act, u16* act16, u64 n,
                                     u64 cols) {
    FOR_EACH(i, n) {
        const float p = pre[i] + bias[mod_u(i, cols)];
        pre[i] = p;
        const float a = G(p);
        if (act) act[i] = a;
        if (act16) act16[i] = (u16)bf16_bits(a);
    }
}

extern "C" __global__ void gelu_forward(const float* x, const u16* x16, float* y, u16* y16,
                                        u64 n) {
    gelu_forward_of<gelu>(x, x16, y, y16, n);
}

extern "C" __global__ void bias_gelu_forward(const float* bias, float* pre, float* act,
                                             u16* act16, u64 n, u64 cols) {
    bias_gelu_forward_of<gelu>(bias, pre, act, act16, n, cols);
}

// dx += dy * (Phi(x) + x * exp(-x^2 / 2) / sqrt(2 pi)), in double, rounded once. Where not
// `accumulate`, dx's old values are not read: 0 takes their place in the same sum, so the result
// is bitwise that of accumulating into zeros (the sign of a zero included). A null dx (only when
// not accumulating) writes dx16 alone. x and dy are read as load_in does.
extern "C" __global__ void gelu_backward(const float* x, const u16* x16, const float* dy,
                                         const u16* dy16, float* dx, u16* dx16, u64 n,
                                         u32 accumulate) {
    FOR_EACH(i, n) {
        const double v = (double)load_in(x, x16, i);
        const double grad = normal_cdf(v) + v * exp(-0.5 * v * v) * 0.39894228040143267794;
        const double old = accumulate ? (double)dx[i] : 0.0;
        const float d = (float)(old + (double)load_in(dy, dy16, i) * grad);
        if (dx) dx[i] = d;
        if (dx16) dx16[i] = (u16)bf16_bits(d);
    }
}

// The reduced-precision modes (Precision::Tf32, Bf16) compute GELU in f32: the double erfc above
// is bound by the GPU's double-precision rate. With erfcf and expf the loops took 63
// instructions an element for the GELU and 83 for its gradient (sm_90, ptxas 13), which on bf16
// data (4 and 6 bytes an element) bound them by instruction issue at about twice their memory
// time; with the forms below, eight elements at a time from bf16 copies, 25 and 33. Their error,
// within 2e-6 of the value for |x| <= 4 and 1.1e-5 at |x| = 10 (where GELU is below 1e-22), is
// far below the bf16 rounding of what they feed (4e-3).
//
// erfc(z) for z >= 0 as t exp(-z^2 + P(t)), t = 1 / (1 + z / 2), P of degree 9 (the Chebyshev
// fit of Numerical Recipes' `erfcc`, fractional error below 1.2e-7), from one reciprocal and
// one exponential; `gauss` receives exp(-z^2), the gradient's other term.
__device__ __forceinline__ float erfc_nonneg(float z, float* gauss) {
    const float t = rcp_fast(1.0f + 0.5f * z);
    float p = 0.17087277f;
    p = fmaf(p, t, -0.82215223f);
    p = fmaf(p, t, 1.48851587f);
    p = fmaf(p, t, -1.13520398f);
    p = fmaf(p, t, 0.27886807f);
    p = fmaf(p, t, -0.18628806f);
    p = fmaf(p, t, 0.09678418f);
    p = fmaf(p, t, 0.37409196f);
    p = fmaf(p, t, 1.00002368f);
    p = fmaf(p, t, -1.26551223f);
    const float zz = z * z;
    *gauss = exp2_fast(-zz * LOG2E);
    return t * exp2_fast((p - zz) * LOG2E);
}

// Phi(x) = erfc(-x / sqrt 2) / 2, from erfc of |x| / sqrt 2 (for x >= 0 as 1 - Phi(-x): no
// cancellation either way); `gauss` receives exp(-x^2 / 2).
__device__ __forceinline__ float normal_cdf_f32(float x, float* gauss) {
    const float half = 0.5f * erfc_nonneg(fabsf(x) * 0.70710678f, gauss);
    return x >= 0.0f ? 1.0f - half : half;
}

__device__ float gelu_f32(float x) {
    float gauss;  // not used: the compiler drops its exponential
    return x * normal_cdf_f32(x, &gauss);
}

// Eight bf16 of a 16-byte word as floats, and eight floats rounded into one (pack_bf16).
__device__ __forceinline__ void unpack_bf16x8(uint4 w, float* v) {
    const u32 words[4] = {w.x, w.y, w.z, w.w};
    UNROLL
    for (u32 k = 0; k < 4; ++k) {
        v[2 * k] = __uint_as_float(words[k] << 16);
        v[2 * k + 1] = __uint_as_float(words[k] & 0xffff0000u);
    }
}
__device__ __forceinline__ uint4 pack_bf16x8(const float* v) {
    return make_uint4(pack_bf16(v[0], v[1]), pack_bf16(v[2], v[3]), pack_bf16(v[4], v[5]),
                      pack_bf16(v[6], v[7]));
}

// Whether n elements of bf16 buffers can move eight at a time (16-byte aligned).
__device__ __forceinline__ bool by_eights(u64 n, u64 halves) {
    return n % 8 == 0 && (halves & 15) == 0;
}

// The f32 GELU and its gradient move four elements per thread where the buffers allow
// (by_fours): a quarter of the loop's index arithmetic and memory instructions per element.
// Where input and output are bf16 copies alone (the bf16 mode's MLP), eight: 16 bytes a load,
// where four elements moved 8 and left too few bytes in flight to reach the card's bandwidth.
// Rounded by pack_bf16 (as bf16_bits but for NaN payloads).
extern "C" __global__ void gelu_forward_f32(const float* x, const u16* x16, float* y, u16* y16,
                                            u64 n) {
    if (x16 && !y && y16 && by_eights(n, (u64)x16 | (u64)y16)) {
        FOR_EACH(o, n / 8) {
            float v[8];
            unpack_bf16x8(((const uint4*)x16)[o], v);
            UNROLL
            for (u32 k = 0; k < 8; ++k) v[k] = gelu_f32(v[k]);
            ((uint4*)y16)[o] = pack_bf16x8(v);
        }
        return;
    }
    if (by_fours(n, (u64)x | (u64)y, (u64)x16 | (u64)y16)) {
        FOR_EACH(q, n / 4) {
            const float4 v = load_in4(x, x16, q);
            const float4 o =
                make_float4(gelu_f32(v.x), gelu_f32(v.y), gelu_f32(v.z), gelu_f32(v.w));
            if (y) ((float4*)y)[q] = o;
            if (y16) ((uint2*)y16)[q] = bf16_quad(o);
        }
        return;
    }
    gelu_forward_of<gelu_f32>(x, x16, y, y16, n);
}

extern "C" __global__ void bias_gelu_forward_f32(const float* bias, float* pre, float* act,
                                                 u16* act16, u64 n, u64 cols) {
    bias_gelu_forward_of<gelu_f32>(bias, pre, act, act16, n, cols);
}

// gelu'(x) = Phi(x) + x phi(x), phi(x) = exp(-x^2 / 2) / sqrt(2 pi).
__device__ __forceinline__ float gelu_grad_f32(float v) {
    float gauss;
    const float cdf = normal_cdf_f32(v, &gauss);
    return cdf + v * gauss * 0.39894228f;
}

// `accumulate`, a null dx and the inputs as in gelu_backward above.
extern "C" __global__ void gelu_backward_f32(const float* x, const u16* x16, const float* dy,
                                             const u16* dy16, float* dx, u16* dx16, u64 n,
                                             u32 accumulate) {
    // Overwriting from bf16 copies into the copy alone: eight a thread, as the forward.
    if (x16 && dy16 && !dx && dx16 && !accumulate &&
        by_eights(n, (u64)x16 | (u64)dy16 | (u64)dx16)) {
        FOR_EACH(o, n / 8) {
            float v[8], g[8];
            unpack_bf16x8(((const uint4*)x16)[o], v);
            unpack_bf16x8(((const uint4*)dy16)[o], g);
            UNROLL
            for (u32 k = 0; k < 8; ++k) v[k] = 0.0f + g[k] * gelu_grad_f32(v[k]);
            ((uint4*)dx16)[o] = pack_bf16x8(v);
        }
        return;
    }
    if (by_fours(n, (u64)x | (u64)dy | (u64)dx, (u64)x16 | (u64)dy16 | (u64)dx16)) {
        FOR_EACH(q, n / 4) {
            const float4 v = load_in4(x, x16, q), g = load_in4(dy, dy16, q);
            const float4 o = accumulate ? ((const float4*)dx)[q] : make_float4(0.f, 0.f, 0.f, 0.f);
            const float4 d = make_float4(
                o.x + g.x * gelu_grad_f32(v.x), o.y + g.y * gelu_grad_f32(v.y),
                o.z + g.z * gelu_grad_f32(v.z), o.w + g.w * gelu_grad_f32(v.w));
            if (dx) ((float4*)dx)[q] = d;
            if (dx16) ((uint2*)dx16)[q] = bf16_quad(d);
        }
        return;
    }
    FOR_EACH(i, n) {
        const float d =
            (accumulate ? dx[i] : 0.f) + load_in(dy, dy16, i) * gelu_grad_f32(load_in(x, x16, i));
        if (dx) dx[i] = d;
        if (dx16) dx16[i] = (u16)bf16_bits(d);
    }
}

// The per-step scalars of one AdamW update (decay = 1 - lr * wd, step_size = lr / bc1,
// bc2_sqrt = sqrt(bc2), 1 - beta1, 1 - beta2), formed on the host in f32, exactly as the CPU
// reference forms them.
struct AdamWScalars {
    float decay, beta1, beta2, one_minus_beta1, one_minus_beta2, step_size, bc2_sqrt, eps;
};

// PyTorch's AdamW (single-tensor path) on element i with gradient g: the one arithmetic of
// `adamw` and `adamw_many`, so that both round alike.
__device__ __forceinline__ float adamw_element(float* param, float* m, float* v, u64 i, float g,
                                               const AdamWScalars& s) {
    float p = param[i] * s.decay;
    const float mi = s.beta1 * m[i] + s.one_minus_beta1 * g;
    const float vi = s.beta2 * v[i] + s.one_minus_beta2 * g * g;
    p -= s.step_size * mi / (sqrtf(vi) / s.bc2_sqrt + s.eps);
    param[i] = p;
    m[i] = mi;
    v[i] = vi;
    return p;
}

extern "C" __global__ void adamw(float* param, const float* grad, float* m, float* v, u64 n,
                                 float decay, float beta1, float beta2, float one_minus_beta1,
                                 float one_minus_beta2, float step_size, float bc2_sqrt,
                                 float eps) {
    const AdamWScalars s = {decay,           beta1,     beta2,    one_minus_beta1,
                            one_minus_beta2, step_size, bc2_sqrt, eps};
    FOR_EACH(i, n) adamw_element(param, m, v, i, grad[i], s);
}

// `adamw_many`'s description of one tensor, ADAMW_WORDS words of the table the host uploads
// (backend-cuda/src/adamw_many.rs writes it): the device addresses of param, grad, m and v,
// the length n, the tensor's first chunk (the chunks of ADAMW_CHUNK elements of the tensors
// before it), whether it trains (0: its gradient is only zeroed), then the eight AdamWScalars
// in their order, each an f32 bit pattern in the low half of a word, then the address of the
// param's bf16 copy that the update refreshes (0: none; bf16.rs, `refreshed_copy`).
#define ADAMW_WORDS 16
#define ADAMW_CHUNK 1024
#define ADAMW_FIRST_CHUNK 5

// The optimizer step of a whole model in one launch: for each of `tensors` tensors, `adamw` on
// its elements when it trains (and each new value's bf16_bits into its copy, where the table
// gives one: what round_to_bf16 would write), and its gradient zeroed (as `fill_f32` with 0). Grid-stride over
// the `chunks` chunks of all tensors, a block per chunk; every element belongs to one chunk and
// one thread, so the result does not depend on the grid.
extern "C" __global__ void adamw_many(const u64* table, u64 tensors, u64 chunks) {
    for (u64 c = blockIdx.x; c < chunks; c += gridDim.x) {
        // The tensor owning chunk c: the last whose first chunk is <= c. A tensor without
        // elements owns no chunk and shares its first chunk with the next, which the search
        // prefers. The first chunks ascend; tensor 0's is 0.
        u64 lo = 0, hi = tensors - 1;
        while (lo < hi) {
            const u64 mid = hi - (hi - lo) / 2;  // the upper middle, so that lo advances
            if (table[mid * ADAMW_WORDS + ADAMW_FIRST_CHUNK] <= c) {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        const u64* d = table + lo * ADAMW_WORDS;
        float* param = (float*)d[0];
        float* grad = (float*)d[1];
        float* m = (float*)d[2];
        float* v = (float*)d[3];
        const u64 n = d[4];
        const bool trains = d[6] != 0;
        const AdamWScalars s = {
            __uint_as_float((u32)d[7]),  __uint_as_float((u32)d[8]),
            __uint_as_float((u32)d[9]),  __uint_as_float((u32)d[10]),
            __uint_as_float((u32)d[11]), __uint_as_float((u32)d[12]),
            __uint_as_float((u32)d[13]), __uint_as_float((u32)d[14])};
        u16* param16 = (u16*)d[15];
        const u64 start = (c - d[ADAMW_FIRST_CHUNK]) * ADAMW_CHUNK;
        const u64 end = n - start < ADAMW_CHUNK ? n : start + ADAMW_CHUNK;
        for (u64 i = start + threadIdx.x; i < end; i += blockDim.x) {
            const float g = grad[i];
            if (trains) {
                const float p = adamw_element(param, m, v, i, g, s);
                if (param16) param16[i] = (u16)bf16_bits(p);
            }
            grad[i] = 0.0f;
        }
    }
}

// The bf16 copy of a GEMM operand, two values per u32 (the first in the low half, as they lie
// in memory), each rounded by bf16_bits. With `n` odd the last word's high half is 0. cuBLAS's
// bf16 kernels on such copies run much closer to the tensor cores' peak than its FAST_16BF
// kernels on f32 operands (ops.rs, `gemm`).

extern "C" __global__ void round_to_bf16(const float* x, u32* pairs, u64 n) {
    FOR_EACH(i, (n + 1) / 2) {
        const u32 lo = bf16_bits(x[2 * i]);
        const u32 hi = 2 * i + 1 < n ? bf16_bits(x[2 * i + 1]) : 0u;
        pairs[i] = lo | (hi << 16);
    }
}

// The floats of a buffer whose producer wrote only its bf16 copy (bf16.rs, `floats_current`):
// each value widened exactly, for an op that reads the floats.
extern "C" __global__ void floats_of_bf16(const u32* pairs, float* y, u64 n) {
    FOR_EACH(i, n) {
        const u32 word = pairs[i / 2];
        y[i] = __uint_as_float((i % 2 ? word >> 16 : word & 0xffffu) << 16);
    }
}
