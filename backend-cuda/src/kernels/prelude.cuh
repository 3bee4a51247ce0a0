// Shared by every kernel file; the host concatenates this prelude and the .cu files into one
// NVRTC program (NVRTC has no file system, so there are no #include lines).
//
// Conventions:
// - Every size and index is `u64`, so no product of dimensions overflows.
// - Elementwise kernels use grid-stride loops: any grid size is correct, the host caps it.
// - Row kernels run one block of exactly BLOCK threads per row (grid-stride over rows), and
//   reduce in `double` in a fixed order: thread t folds elements t, t + BLOCK, ... in ascending
//   order, then a fixed shared-memory tree combines the BLOCK partials. The order depends only on
//   the row length, so results are bitwise repeatable. No kernel uses floating-point atomics.
// - The program is compiled with --fmad=false: `a * b + c` is rounded twice, as on the CPU
//   reference, instead of being contracted into an FMA.

typedef unsigned long long u64;
typedef unsigned int u32;

// Threads per block of the row kernels; the host launches exactly this many (power of two).
#define BLOCK 256

// -infinity, without the host headers NVRTC does not have.
#define NEG_INF (__int_as_float(0xff800000))

// The grid-stride loop over `n` elements.
#define FOR_EACH(i, n)                                                                        \
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < (n);                         \
         i += (u64)gridDim.x * blockDim.x)

// The grid-stride loop over `rows`, one block per row.
#define FOR_EACH_ROW(r, rows) for (u64 r = blockIdx.x; r < (rows); r += gridDim.x)

// Sum of every thread's `v` over the block, combined in a fixed tree order. Every thread
// returns the same value. `scratch` is BLOCK doubles of shared memory.
__device__ double block_sum(double v, double* scratch) {
    const u32 t = threadIdx.x;
    scratch[t] = v;
    __syncthreads();
    for (u32 s = BLOCK / 2; s > 0; s >>= 1) {
        if (t < s) scratch[t] += scratch[t + s];
        __syncthreads();
    }
    const double total = scratch[0];
    __syncthreads();  // the caller may reuse scratch right away
    return total;
}

// Maximum of every thread's `v` over the block (fmaxf ignores NaN, as f32::max does).
__device__ float block_max(float v, float* scratch) {
    const u32 t = threadIdx.x;
    scratch[t] = v;
    __syncthreads();
    for (u32 s = BLOCK / 2; s > 0; s >>= 1) {
        if (t < s) scratch[t] = fmaxf(scratch[t], scratch[t + s]);
        __syncthreads();
    }
    const float m = scratch[0];
    __syncthreads();
    return m;
}
