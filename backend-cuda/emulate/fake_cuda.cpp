// A stand-in for libcuda, libnvrtc and libcublas that runs this crate's kernels on the host
// (shim.h), so that the real backend -- its Rust host code, cudarc, argument packing, launch
// sizes, scratch buffers -- runs the whole conformance suite on a machine without a GPU.
// Device pointers are host pointers; the stream is synchronous; "PTX" is ignored and kernels are
// found by name in the table gen_dispatch.py writes; cuBLAS's sgemmStridedBatched is a plain
// loop with f32 accumulation, written from cuBLAS's documented column-major semantics.
// Build and run: backend-cuda/emulate/conformance.sh
#include "shim.h"

#include "../src/kernels/prelude.cuh"
#include "../src/kernels/elementwise.cu"
#include "../src/kernels/rows.cu"
#include "../src/kernels/norm.cu"
#include "../src/kernels/softmax.cu"
#include "../src/kernels/loss.cu"
#include "../src/kernels/attention.cu"
#include "../src/kernels/attention_mma.cu"

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>

template <class T>
static T arg(void** params, int i) {
    T v;
    std::memcpy(&v, params[i], sizeof(T));
    return v;
}

struct KernelEntry {
    const char* name;
    bool syncs;
    void (*call)(void**);
};
#include "dispatch.inc"

// One kernel at a time: the emulated blocks share `static` memory.
static std::mutex device_lock;

typedef int CUresult;  // CUDA_SUCCESS = 0
typedef unsigned long long CUdeviceptr;
static const CUresult OK = 0, INVALID_VALUE = 1, INVALID_DEVICE = 101, NOT_FOUND = 500;
static int dummy_ctx, dummy_module, dummy_handle;

extern "C" {

CUresult cuInit(unsigned) { return OK; }
CUresult cuDeviceGetCount(int* n) { *n = 1; return OK; }
CUresult cuDeviceGet(int* dev, int ordinal) {
    if (ordinal != 0) return INVALID_DEVICE;
    *dev = 0;
    return OK;
}
CUresult cuDevicePrimaryCtxRetain(void** ctx, int) { *ctx = &dummy_ctx; return OK; }
CUresult cuDevicePrimaryCtxRelease_v2(int) { return OK; }
CUresult cuCtxSetCurrent(void*) { return OK; }
CUresult cuCtxGetCurrent(void** ctx) { *ctx = &dummy_ctx; return OK; }
CUresult cuCtxSynchronize() { return OK; }
CUresult cuStreamSynchronize(void*) { return OK; }
CUresult cuDeviceGetAttribute(int* v, int attribute, int) {
    switch (attribute) {
    case 75: *v = 9; break;   // compute capability major
    case 76: *v = 0; break;   // minor
    case 115: *v = 1; break;  // memory pools: cudarc then uses cuMemAllocAsync
    default: *v = 0;
    }
    return OK;
}
CUresult cuDeviceGetName(char* name, int len, int) {
    std::strncpy(name, "host emulator (fake libcuda)", len);
    name[len - 1] = 0;
    return OK;
}
CUresult cuDeviceTotalMem_v2(size_t* bytes, int) { *bytes = size_t(8) << 30; return OK; }
CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
    *free_bytes = *total = size_t(8) << 30;
    return OK;
}
CUresult cuGetErrorName(CUresult, const char** s) { *s = "CUDA_ERROR_FAKE"; return OK; }
CUresult cuGetErrorString(CUresult, const char** s) { *s = "fake driver error"; return OK; }

// Fresh memory is filled with 0xFF bytes (NaN as f32 and f64), as a GPU's is arbitrary: a read
// of memory nobody wrote shows up as NaN in the results.
CUresult cuMemAllocAsync(CUdeviceptr* p, size_t bytes, void*) {
    if (bytes == 0) return INVALID_VALUE;  // as cuMemAlloc does
    void* m = std::malloc(bytes);
    if (!m) return 2;  // CUDA_ERROR_OUT_OF_MEMORY
    std::memset(m, 0xFF, bytes);
    *p = (CUdeviceptr)m;
    return OK;
}
CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) { return cuMemAllocAsync(p, bytes, nullptr); }
CUresult cuMemFreeAsync(CUdeviceptr p, void*) { std::free((void*)p); return OK; }
CUresult cuMemFree_v2(CUdeviceptr p) { std::free((void*)p); return OK; }
CUresult cuMemsetD8Async(CUdeviceptr p, unsigned char v, size_t n, void*) {
    std::memset((void*)p, v, n);
    return OK;
}
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t n, void*) {
    std::memcpy((void*)dst, src, n);
    return OK;
}
CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, void*) {
    std::memcpy(dst, (const void*)src, n);
    return OK;
}
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, void*) {
    std::memmove((void*)dst, (const void*)src, n);
    return OK;
}
CUresult cuModuleLoadData(void** module, const void*) { *module = &dummy_module; return OK; }
CUresult cuModuleUnload(void*) { return OK; }
CUresult cuModuleGetFunction(const KernelEntry** f, void*, const char* name) {
    for (const auto& k : KERNELS) {
        if (std::strcmp(k.name, name) == 0) {
            *f = &k;
            return OK;
        }
    }
    return NOT_FOUND;
}
CUresult cuLaunchKernel(const KernelEntry* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                        unsigned by, unsigned bz, unsigned, void*, void** params, void** extra) {
    if (gy != 1 || gz != 1 || by != 1 || bz != 1 || extra != nullptr || gx == 0 || bx == 0)
        return INVALID_VALUE;
    std::lock_guard<std::mutex> guard(device_lock);
    auto body = [&] { f->call(params); };
    if (f->syncs) {
        launch_rows(gx, bx, body);
    } else {
        launch(gx, bx, body);
    }
    return OK;
}

// ---- NVRTC: accepts the program, returns a placeholder "PTX" ----------------------------------
struct Program {
    std::string src;
};
int nvrtcCreateProgram(Program** prog, const char* src, const char*, int, const char* const*,
                       const char* const*) {
    *prog = new Program{src};
    return 0;
}
int nvrtcCompileProgram(Program*, int, const char* const*) { return 0; }
static const char PTX[] = "// host emulator: kernels run from the fake driver's table\n";
int nvrtcGetPTXSize(Program*, size_t* n) { *n = sizeof(PTX); return 0; }
int nvrtcGetPTX(Program*, char* out) { std::memcpy(out, PTX, sizeof(PTX)); return 0; }
int nvrtcGetProgramLogSize(Program*, size_t* n) { *n = 1; return 0; }
int nvrtcGetProgramLog(Program*, char* log) { log[0] = 0; return 0; }
int nvrtcDestroyProgram(Program** prog) { delete *prog; *prog = nullptr; return 0; }

// ---- cuBLAS -------------------------------------------------------------------------------------
int cublasCreate_v2(void** handle) { *handle = &dummy_handle; return 0; }
int cublasDestroy_v2(void*) { return 0; }
int cublasSetStream_v2(void*, void*) { return 0; }
int cublasSetMathMode(void*, int) { return 0; }

// The operand rounding of cuBLAS's f32 compute types: none for CUBLAS_COMPUTE_32F (68), to
// bf16 for CUBLAS_COMPUTE_32F_FAST_16BF (75) and to TF32 for CUBLAS_COMPUTE_32F_FAST_TF32 (77),
// round to nearest even, as the tensor cores receive them; products accumulate in f32.
static float round_mantissa(float x, int dropped_bits) {
    if (dropped_bits == 0 || !std::isfinite(x)) return x;
    uint32_t u;
    std::memcpy(&u, &x, 4);
    const uint32_t half = (1u << (dropped_bits - 1)) - 1;
    u += half + ((u >> dropped_bits) & 1u);
    u &= ~((1u << dropped_bits) - 1u);
    std::memcpy(&x, &u, 4);
    return x;
}

// Column-major C[b] = alpha op(A[b]) op(B[b]) + beta C[b], op(A) m x k, op(B) k x n; with
// beta == 0, C is not read. CUBLAS_OP_N = 0, CUBLAS_OP_T = 1.
static int gemm(int ta, int tb, int m, int n, int k, float alpha, const float* A, int lda,
                long long sa, const float* B, int ldb, long long sb, float beta, float* C, int ldc,
                long long sc, int batch, int dropped_bits) {
    if (m < 0 || n < 0 || k < 0 || batch < 0) return 7;  // CUBLAS_STATUS_INVALID_VALUE
    if (lda < (ta ? std::max(1, k) : std::max(1, m)) || ldb < (tb ? std::max(1, n) : std::max(1, k)) ||
        ldc < std::max(1, m))
        return 7;
    std::lock_guard<std::mutex> guard(device_lock);
    for (int b = 0; b < batch; ++b) {
        const float* a = A + b * sa;
        const float* bb = B + b * sb;
        float* c = C + b * sc;
        for (int j = 0; j < n; ++j)
            for (int i = 0; i < m; ++i) {
                float acc = 0.0f;
                for (int p = 0; p < k; ++p) {
                    const float av = ta ? a[i * (long long)lda + p] : a[p * (long long)lda + i];
                    const float bv = tb ? bb[p * (long long)ldb + j] : bb[j * (long long)ldb + p];
                    acc += round_mantissa(av, dropped_bits) * round_mantissa(bv, dropped_bits);
                }
                float& out = c[j * (long long)ldc + i];
                out = beta == 0.0f ? alpha * acc : alpha * acc + beta * out;
            }
    }
    return 0;
}

int cublasSgemmStridedBatched(void*, int ta, int tb, int m, int n, int k, const float* alpha,
                              const float* A, int lda, long long sa, const float* B, int ldb,
                              long long sb, const float* beta, float* C, int ldc, long long sc,
                              int batch) {
    return gemm(ta, tb, m, n, k, *alpha, A, lda, sa, B, ldb, sb, *beta, C, ldc, sc, batch, 0);
}

// The f32 values of a column-major bf16 operand (CUDA_R_16BF: the upper halves of f32s) of
// `rows x cols` per batch, leading dimension `ld`, batch stride `stride`.
static std::vector<float> widen_bf16(const void* p, int rows, int cols, int ld, long long stride,
                                     int batch) {
    if (rows == 0 || cols == 0 || batch == 0) return {};
    const size_t len = (size_t)((batch - 1) * stride + (long long)(cols - 1) * ld + rows);
    const uint16_t* h = static_cast<const uint16_t*>(p);
    std::vector<float> out(len);
    for (size_t i = 0; i < len; ++i) {
        const uint32_t u = (uint32_t)h[i] << 16;
        std::memcpy(&out[i], &u, 4);
    }
    return out;
}

// What the backend calls: f32 matrices (CUDA_R_32F = 0) with an f32 compute type, or bf16 A
// and B (CUDA_R_16BF = 14) with f32 C and CUBLAS_COMPUTE_32F, whose products are exact.
int cublasGemmStridedBatchedEx(void*, int ta, int tb, int m, int n, int k, const void* alpha,
                               const void* A, int atype, int lda, long long sa, const void* B,
                               int btype, int ldb, long long sb, const void* beta, void* C,
                               int ctype, int ldc, long long sc, int batch, int compute, int) {
    const float a = *static_cast<const float*>(alpha), b = *static_cast<const float*>(beta);
    float* c = static_cast<float*>(C);
    if (atype == 14 && btype == 14 && ctype == 0 && compute == 68) {
        const std::vector<float> wa = widen_bf16(A, ta ? k : m, ta ? m : k, lda, sa, batch);
        const std::vector<float> wb = widen_bf16(B, tb ? n : k, tb ? k : n, ldb, sb, batch);
        return gemm(ta, tb, m, n, k, a, wa.data(), lda, sa, wb.data(), ldb, sb, b, c, ldc, sc,
                    batch, 0);
    }
    if (atype != 0 || btype != 0 || ctype != 0) return 15;  // CUBLAS_STATUS_NOT_SUPPORTED
    int dropped_bits;
    switch (compute) {
    case 68: dropped_bits = 0; break;
    case 75: dropped_bits = 16; break;
    case 77: dropped_bits = 13; break;
    default: return 15;
    }
    return gemm(ta, tb, m, n, k, a, static_cast<const float*>(A), lda, sa,
                static_cast<const float*>(B), ldb, sb, b, c, ldc, sc, batch, dropped_bits);
}

}  // extern "C"
