// Shared by every kernel file; the host concatenates this prelude and the .cu files into one
// NVRTC program (NVRTC has no file system, so there are no #include lines).
//
// Conventions:
// - Every size and index is `u64`, so no product of dimensions overflows.
// - Elementwise kernels use grid-stride loops: any grid size is correct, the host caps it.
// - Row kernels run one block of exactly BLOCK threads per row (grid-stride over rows), and
//   reduce in `double` in a fixed order: thread t folds elements t, t + BLOCK, ... in ascending
//   order, then a warp butterfly and a fixed fold of the warp sums combine the BLOCK partials
//   (`block_sum`). The order depends only on the row length, so results are bitwise repeatable. No kernel uses floating-point atomics.
// - The program is compiled with --fmad=false: `a * b + c` is rounded twice, as on the CPU
//   reference, instead of being contracted into an FMA.

typedef unsigned long long u64;
typedef unsigned int u32;
typedef unsigned short u16;

// An f32 rounded to bf16 (its upper 16 bits, rounded to nearest even, as the tensor cores round
// the operands of CUBLAS_COMPUTE_32F_FAST_16BF; infinities stay, NaN stays NaN, made quiet): the
// bits of a bf16 GEMM operand's copy (bf16.rs), whichever kernel writes it.
__device__ __forceinline__ u32 bf16_bits(float x) {
    const u32 u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u >> 16) | 0x40u;
    return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}

// Two floats rounded to nearest bf16, `lo` in the low half: one `cvt` on compute capability 8.0
// and later, which rounds as bf16_bits does but for NaN payloads; bf16_bits elsewhere (its
// callers run on 8.0 and later, but compile for every device).
__device__ __forceinline__ u32 pack_bf16(float lo, float hi) {
#if !defined(MAE_HOST_SHIM) && __CUDA_ARCH__ >= 800
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
#else
    return bf16_bits(lo) | (bf16_bits(hi) << 16);
#endif
}

#define LOG2E 1.4426950408889634f

// 2^x by the special-function unit (`ex2.approx.ftz`: a relative error of about 2^-22, results
// below 2^-126 flushed to zero), and 1 / x (`rcp.approx.ftz`: about 1 ulp), for the kernels
// whose values are rounded to bf16 after; exact on the host emulator.
#ifdef MAE_HOST_SHIM
__device__ __forceinline__ float exp2_fast(float x) { return exp2f(x); }
__device__ __forceinline__ float rcp_fast(float x) { return 1.0f / x; }
#else
__device__ __forceinline__ float exp2_fast(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
__device__ __forceinline__ float rcp_fast(float x) {
    float y;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
#endif

// Four floats as four bf16 (bf16_bits) in two words, the first in the low half: where they lie.
__device__ __forceinline__ uint2 bf16_quad(float4 v) {
    return make_uint2(bf16_bits(v.x) | bf16_bits(v.y) << 16,
                      bf16_bits(v.z) | bf16_bits(v.w) << 16);
}

// Whether n elements of these buffers can be moved four at a time: n a multiple of 4, the float
// buffers 16-byte and the bf16 one 8-byte aligned (device allocations are 256-byte aligned).
__device__ __forceinline__ bool by_fours(u64 n, u64 floats, u64 halves) {
    return n % 4 == 0 && (floats & 15) == 0 && (halves & 7) == 0;
}

// Threads per block of the row kernels; the host launches exactly this many (power of two).
#define BLOCK 256

// Loop unrolling, a no-op in the host emulator (emulate/shim.h), where g++ knows no such pragma.
#ifdef MAE_HOST_SHIM
#define UNROLL
#define UNROLL_BY(n)
#else
#define UNROLL _Pragma("unroll")
#define MAE_PRAGMA(x) _Pragma(#x)
#define UNROLL_BY(n) MAE_PRAGMA(unroll n)
#endif

// -infinity, without the host headers NVRTC does not have.
#define NEG_INF (__int_as_float(0xff800000))

// The grid-stride loop over `n` elements.
#define FOR_EACH(i, n)                                                                        \
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < (n);                         \
         i += (u64)gridDim.x * blockDim.x)

// The grid-stride loop over `rows`, one block per row.
#define FOR_EACH_ROW(r, rows) for (u64 r = blockIdx.x; r < (rows); r += gridDim.x)

// Warps per block, and the grid-stride loop over `rows` with one warp per row: for rows short
// enough to sit in a warp's registers, where a block per row would leave most threads idle and
// wait on barriers. Every lane of a warp takes the same rows.
#define WARPS (BLOCK / 32)
#define FOR_EACH_WARP_ROW(r, rows)                                                            \
    for (u64 r = (u64)blockIdx.x * WARPS + threadIdx.x / 32; r < (rows);                      \
         r += (u64)gridDim.x * WARPS)

// a / d and a % d: 64-bit integer division is a long software routine on NVIDIA GPUs, 32-bit
// division a few instructions, and almost every index of this crate fits 32 bits.
__device__ __forceinline__ u64 div_u(u64 a, u64 d) {
    return ((a | d) >> 32) == 0 ? (u64)((u32)a / (u32)d) : a / d;
}
__device__ __forceinline__ u64 mod_u(u64 a, u64 d) {
    return ((a | d) >> 32) == 0 ? (u64)((u32)a % (u32)d) : a % d;
}

// Sum of `v` over the 32 lanes of a warp by a butterfly: at every stage both partners add the
// same two values (in swapped order, which is exact), so every lane ends with the bitwise same
// total, in an order that depends only on the lane numbers.
__device__ double warp_sum(double v) {
    for (u32 o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ float warp_max(float v) {
    for (u32 o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum of every thread's `v` over the block, in a fixed order: each warp's butterfly, then every
// thread adds the BLOCK / 32 warp sums in warp order. Every thread returns the same value.
// `scratch` is at least BLOCK / 32 doubles of shared memory; every thread of the block must call.
__device__ double block_sum(double v, double* scratch) {
    v = warp_sum(v);
    if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
    __syncthreads();
    double total = 0.0;
    for (u32 w = 0; w < BLOCK / 32; ++w) total += scratch[w];
    __syncthreads();  // the caller may reuse scratch right away
    return total;
}

// Two block_sums in one: `a` and `b` each become their sum over the block, added in
// block_sum's order, with one pair of barriers where two calls take two each. `scratch` is at
// least 2 * BLOCK / 32 doubles of shared memory; every thread of the block must call.
__device__ void block_sum_pair(double* a, double* b, double* scratch) {
    const double wa = warp_sum(*a), wb = warp_sum(*b);
    if (threadIdx.x % 32 == 0) {
        scratch[threadIdx.x / 32] = wa;
        scratch[BLOCK / 32 + threadIdx.x / 32] = wb;
    }
    __syncthreads();
    double ta = 0.0, tb = 0.0;
    for (u32 w = 0; w < BLOCK / 32; ++w) {
        ta += scratch[w];
        tb += scratch[BLOCK / 32 + w];
    }
    __syncthreads();  // the caller may reuse scratch right away
    *a = ta;
    *b = tb;
}

// Maximum of every thread's `v` over the block (fmaxf ignores NaN, as f32::max does).
__device__ float block_max(float v, float* scratch) {
    v = warp_max(v);
    if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
    __syncthreads();
    float m = scratch[0];
    for (u32 w = 1; w < BLOCK / 32; ++w) m = fmaxf(m, scratch[w]);
    __syncthreads();
    return m;
}
