// A stand-in for libcuda, libnvrtc, libcublas and libcublasLt that runs this crate's kernels on the host
// (shim.h), so that the real backend -- its Rust host code, cudarc, argument packing, launch
// sizes, scratch buffers -- runs the whole conformance suite on a machine without a GPU.
// Device pointers are host pointers; the backend's stream is synchronous (other streams hold
// their uploads until waited for: see "Streams"); "PTX" is ignored and kernels are
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
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <unordered_set>

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

// MAE_FAKE_CUDA_HOST_ONLY=1: every call is checked and counted but does nothing (no kernel,
// product, fill or copy runs; downloads read zeros; fresh memory is left untouched), so that a
// program over this library spends only the host time of its own code: the backend's cost per
// op, measured on a machine without a GPU (`bench` then times the host side of a step alone).
// The counts are printed to stderr at exit.
static bool host_only() {
    static const bool on = std::getenv("MAE_FAKE_CUDA_HOST_ONLY") != nullptr;
    return on;
}
// `in_use` and `peak` count the device memory the program holds (its own allocations: a real
// device adds the context and the libraries' own, about half a GB).
struct Counts {
    unsigned long long launches = 0, gemms = 0, lt = 0, htod = 0, dtoh = 0, dtod = 0, memsets = 0,
                       allocs = 0, frees = 0, htod_bytes = 0, alloc_bytes = 0, in_use = 0, peak = 0;
    ~Counts() {
        if (host_only())
            std::fprintf(stderr,
                         "fake cuda (host only): %llu launches, %llu cuBLAS and %llu cuBLASLt "
                         "products, %llu uploads (%llu bytes), %llu downloads, %llu device "
                         "copies, %llu fills, %llu allocations (%llu bytes), %llu frees, "
                         "peak %llu bytes in use\n",
                         launches, gemms, lt, htod, htod_bytes, dtoh, dtod, memsets, allocs,
                         alloc_bytes, frees, peak);
    }
};
static Counts counts;

// ---- Streams -------------------------------------------------------------------------------
// The backend's own stream (the legacy default stream, null) runs every call when it is queued.
// A stream created with cuStreamCreate (the upload stream) holds its host-to-device copies
// until something waits for them: a stream or the host waiting for an event recorded after
// them, a synchronization, or another call queued on that stream. So an op of the backend's
// stream that reads a buffer an upload writes, without waiting for the copy, reads the old
// contents, as it may on a GPU. (Waits the other way, for the backend's stream, need nothing
// here: its work has run when it is queued.)
struct FakeStream {
    std::deque<std::function<void()>> pending;
    size_t queued = 0, done = 0;
};
struct FakeEvent {
    FakeStream* stream = nullptr;  // null: recorded on the backend's stream
    size_t upto = 0;
    double clock_ms = 0.0;  // the stream's modeled clock when recorded (modeled_ms)
};
static std::recursive_mutex streams_lock;
static std::unordered_set<FakeStream*> live_streams;
// Modeled device time per stream (by its handle, the backend's null stream included), which
// events read: no kernel has a duration here, but cuBLASLt products take one that depends on
// their algorithm (cublasLtMatmul), so that tuning (lt/tuning.rs) has something to choose. One
// clock per host thread: tests run backends side by side on the one null stream, and each
// times only its own products.
static thread_local std::map<void*, double> modeled_ms;

static FakeStream* own_stream(void* stream) {
    auto* s = static_cast<FakeStream*>(stream);
    return live_streams.count(s) ? s : nullptr;
}
static void run_until(FakeStream* s, size_t upto) {
    while (s->done < upto) {
        auto work = std::move(s->pending.front());
        s->pending.pop_front();
        ++s->done;
        work();
    }
}
// Runs what `stream` holds, before a call that the stream orders after it.
static void drain(void* stream) {
    std::lock_guard<std::recursive_mutex> guard(streams_lock);
    if (auto* s = own_stream(stream)) run_until(s, s->queued);
}
static void drain_all() {
    std::lock_guard<std::recursive_mutex> guard(streams_lock);
    for (auto* s : live_streams) run_until(s, s->queued);
}
// Blocks of cuMemHostAlloc, by address.
static std::map<uintptr_t, size_t> pinned_blocks;
static bool is_pinned(const void* p, size_t n) {
    auto a = (uintptr_t)p;
    auto it = pinned_blocks.upper_bound(a);
    if (it == pinned_blocks.begin()) return false;
    --it;
    return a + n <= it->first + it->second;
}

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
CUresult cuCtxSynchronize() { drain_all(); return OK; }
CUresult cuStreamSynchronize(void* stream) { drain(stream); return OK; }
CUresult cuStreamCreate(void** stream, unsigned) {
    std::lock_guard<std::recursive_mutex> guard(streams_lock);
    auto* s = new FakeStream;
    live_streams.insert(s);
    *stream = s;
    return OK;
}
CUresult cuStreamDestroy_v2(void* stream) {
    std::lock_guard<std::recursive_mutex> guard(streams_lock);
    if (auto* s = own_stream(stream)) {
        run_until(s, s->queued);
        live_streams.erase(s);
        delete s;
    }
    return OK;
}
CUresult cuDeviceGetAttribute(int* v, int attribute, int) {
    switch (attribute) {
    case 75: *v = 9; break;   // compute capability major
    case 76: *v = 0; break;   // minor
    case 115: *v = 1; break;  // memory pools: cudarc then uses cuMemAllocAsync
    case 16: *v = 132; break;  // multiprocessors, as an H100's or H200's
    case 39: *v = 2048; break;  // threads a multiprocessor holds
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

// Device allocations by address, for the memory in use.
static std::map<uintptr_t, size_t> device_blocks;
static std::mutex device_blocks_lock;

// Fresh memory is filled with 0xFF bytes (NaN as f32 and f64), as a GPU's is arbitrary: a read
// of memory nobody wrote shows up as NaN in the results.
CUresult cuMemAllocAsync(CUdeviceptr* p, size_t bytes, void* stream) {
    drain(stream);
    if (bytes == 0) return INVALID_VALUE;  // as cuMemAlloc does
    void* m = std::malloc(bytes);
    if (!m) return 2;  // CUDA_ERROR_OUT_OF_MEMORY
    {
        std::lock_guard<std::mutex> lock(device_blocks_lock);
        device_blocks[(uintptr_t)m] = bytes;
        ++counts.allocs;
        counts.alloc_bytes += bytes;
        counts.in_use += bytes;
        if (counts.in_use > counts.peak) counts.peak = counts.in_use;
    }
    if (!host_only()) std::memset(m, 0xFF, bytes);
    *p = (CUdeviceptr)m;
    return OK;
}
// The device's default memory pool: only its release threshold (attribute 4) is kept, for the
// backend's test that it sets it.
static unsigned long long pool_release_threshold = 0;
static int dummy_pool;
CUresult cuDeviceGetDefaultMemPool(void** pool, int) { *pool = &dummy_pool; return OK; }
CUresult cuMemPoolSetAttribute(void* pool, int attribute, void* value) {
    if (pool != &dummy_pool) return INVALID_VALUE;
    if (attribute == 4) std::memcpy(&pool_release_threshold, value, 8);
    return OK;
}
CUresult cuMemPoolGetAttribute(void* pool, int attribute, void* value) {
    if (pool != &dummy_pool || attribute != 4) return INVALID_VALUE;
    std::memcpy(value, &pool_release_threshold, 8);
    return OK;
}
CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) { return cuMemAllocAsync(p, bytes, nullptr); }
CUresult cuMemFreeAsync(CUdeviceptr p, void* stream) {
    drain(stream);
    {
        std::lock_guard<std::mutex> lock(device_blocks_lock);
        auto it = device_blocks.find((uintptr_t)p);
        if (it == device_blocks.end()) return INVALID_VALUE;
        counts.in_use -= it->second;
        device_blocks.erase(it);
        ++counts.frees;
    }
    std::free((void*)p);
    return OK;
}
CUresult cuMemFree_v2(CUdeviceptr p) { return cuMemFreeAsync(p, nullptr); }
CUresult cuMemsetD8Async(CUdeviceptr p, unsigned char v, size_t n, void* stream) {
    drain(stream);
    ++counts.memsets;
    if (!host_only()) std::memset((void*)p, v, n);
    return OK;
}
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t n, void* stream) {
    ++counts.htod;
    counts.htod_bytes += n;
    if (host_only()) return OK;
    auto copy = [dst, src, n] { std::memcpy((void*)dst, src, n); };
    std::lock_guard<std::recursive_mutex> guard(streams_lock);
    // The driver reads pageable memory before it returns; only pinned sources can be held.
    auto* s = own_stream(stream);
    if (s && is_pinned(src, n)) {
        s->pending.push_back(copy);
        ++s->queued;
    } else {
        copy();
    }
    return OK;
}
CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, void* stream) {
    drain(stream);
    ++counts.dtoh;
    if (host_only()) {
        std::memset(dst, 0, n);
    } else {
        std::memcpy(dst, (const void*)src, n);
    }
    return OK;
}
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, void* stream) {
    drain(stream);
    ++counts.dtod;
    if (!host_only()) std::memmove((void*)dst, (const void*)src, n);
    return OK;
}
// Pinned host memory (the upload staging) is plain memory. An event names the point of its
// stream it was recorded at; waiting for it runs the held copies up to there.
CUresult cuMemHostAlloc(void** p, size_t bytes, unsigned) {
    *p = std::malloc(bytes ? bytes : 1);
    if (!*p) return 2;
    std::memset(*p, 0xFF, bytes);
    std::lock_guard<std::recursive_mutex> guard(streams_lock);
    pinned_blocks[(uintptr_t)*p] = bytes;
    return OK;
}
CUresult cuMemFreeHost(void* p) {
    std::lock_guard<std::recursive_mutex> guard(streams_lock);
    pinned_blocks.erase((uintptr_t)p);
    std::free(p);
    return OK;
}
CUresult cuEventCreate(void** event, unsigned) { *event = new FakeEvent; return OK; }
CUresult cuEventDestroy_v2(void* event) { delete static_cast<FakeEvent*>(event); return OK; }
CUresult cuEventRecord(void* event, void* stream) {
    std::lock_guard<std::recursive_mutex> guard(streams_lock);
    auto* e = static_cast<FakeEvent*>(event);
    e->stream = own_stream(stream);
    e->upto = e->stream ? e->stream->queued : 0;
    e->clock_ms = modeled_ms[stream];
    return OK;
}
static void reach(void* event) {
    std::lock_guard<std::recursive_mutex> guard(streams_lock);
    auto* e = static_cast<FakeEvent*>(event);
    // A destroyed stream ran all it held, and its events may outlive it.
    if (e->stream && live_streams.count(e->stream)) run_until(e->stream, e->upto);
}
CUresult cuEventSynchronize(void* event) { reach(event); return OK; }
CUresult cuEventQuery(void* event) { reach(event); return OK; }
// No device time exists here but the modeled time of cuBLASLt products: `MAE_CUDA_PROFILE`
// over this library lists every op with its label and count (what a step launches), kernels at
// zero milliseconds.
CUresult cuEventElapsedTime_v2(float* ms, void* start, void* end) {
    *ms = (float)(static_cast<FakeEvent*>(end)->clock_ms -
                  static_cast<FakeEvent*>(start)->clock_ms);
    return OK;
}
CUresult cuStreamWaitEvent(void*, void* event, unsigned) {
    reach(event);
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
// What a real driver reports of its compiled kernels, modeled: every kernel takes FAKE_REGISTERS
// registers a thread and no local or static shared memory, so a multiprocessor (65,536
// registers, 2,048 threads) holds as many blocks as the registers allow: 12 of 128 threads, 6
// of 256. `MAE_CUDA_PROFILE`'s second table shows these, so a test can tell that the launch's
// block size reached the query.
static constexpr int FAKE_REGISTERS = 40;
CUresult cuFuncGetAttribute(int* v, int attribute, const KernelEntry*) {
    switch (attribute) {
    case 0: *v = 1024; break;           // most threads a block
    case 4: *v = FAKE_REGISTERS; break;  // registers a thread
    default: *v = 0;                    // shared, constant and local bytes; versions
    }
    return OK;
}
CUresult cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(int* blocks, const KernelEntry*,
                                                              int threads, size_t, unsigned) {
    if (threads <= 0 || threads > 1024) return INVALID_VALUE;
    *blocks = std::min(2048 / threads, 65536 / (FAKE_REGISTERS * threads));
    return OK;
}
CUresult cuLaunchKernel(const KernelEntry* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                        unsigned by, unsigned bz, unsigned, void* stream, void** params,
                        void** extra) {
    drain(stream);
    if (gy != 1 || gz != 1 || by != 1 || bz != 1 || extra != nullptr || gx == 0 || bx == 0)
        return INVALID_VALUE;
    ++counts.launches;
    if (host_only()) return OK;
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
    if (host_only()) return 0;
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

// `rows x cols` f32 values (leading dimension `ld_from`) rounded to nearest bf16, ties to even
// (NaN kept a quiet NaN), into a column-major bf16 matrix with leading dimension `ld_to`: how
// cuBLAS writes a CUDA_R_16BF C or D from its f32 sums.
static void narrow_bf16(const float* from, int ld_from, void* to, int ld_to, int rows, int cols) {
    uint16_t* out = static_cast<uint16_t*>(to);
    for (int j = 0; j < cols; ++j)
        for (int i = 0; i < rows; ++i) {
            uint32_t u;
            std::memcpy(&u, &from[j * (long long)ld_from + i], 4);
            uint16_t h;
            if ((u & 0x7fffffffu) > 0x7f800000u) {
                h = (uint16_t)((u >> 16) | 0x40);
            } else {
                h = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
            }
            out[j * (long long)ld_to + i] = h;
        }
}

// What the backend calls: f32 matrices (CUDA_R_32F = 0) with an f32 compute type, or bf16 A
// and B (CUDA_R_16BF = 14) with an f32 C, or a bf16 C where beta is 0 (a product into a
// buffer's bf16 copy alone), and CUBLAS_COMPUTE_32F, whose products are exact.
int cublasGemmStridedBatchedEx(void*, int ta, int tb, int m, int n, int k, const void* alpha,
                               const void* A, int atype, int lda, long long sa, const void* B,
                               int btype, int ldb, long long sb, const void* beta, void* C,
                               int ctype, int ldc, long long sc, int batch, int compute, int) {
    const float a = *static_cast<const float*>(alpha), b = *static_cast<const float*>(beta);
    float* c = static_cast<float*>(C);
    ++counts.gemms;
    if (host_only()) {
        const bool known = (atype == 14 && btype == 14 && compute == 68 &&
                            (ctype == 0 || (ctype == 14 && b == 0.0f && batch == 1))) ||
                           (atype == 0 && btype == 0 && ctype == 0 &&
                            (compute == 68 || compute == 75 || compute == 77));
        return known ? 0 : 15;
    }
    if (atype == 14 && btype == 14 && ctype == 0 && compute == 68) {
        const std::vector<float> wa = widen_bf16(A, ta ? k : m, ta ? m : k, lda, sa, batch);
        const std::vector<float> wb = widen_bf16(B, tb ? n : k, tb ? k : n, ldb, sb, batch);
        return gemm(ta, tb, m, n, k, a, wa.data(), lda, sa, wb.data(), ldb, sb, b, c, ldc, sc,
                    batch, 0);
    }
    if (atype == 14 && btype == 14 && ctype == 14 && compute == 68 && b == 0.0f && batch == 1) {
        const std::vector<float> wa = widen_bf16(A, ta ? k : m, ta ? m : k, lda, sa, batch);
        const std::vector<float> wb = widen_bf16(B, tb ? n : k, tb ? k : n, ldb, sb, batch);
        std::vector<float> sums((size_t)m * n);
        if (int e = gemm(ta, tb, m, n, k, a, wa.data(), lda, 0, wb.data(), ldb, 0, 0.0f,
                         sums.data(), m, 0, 1, 0))
            return e;
        std::lock_guard<std::mutex> guard(device_lock);
        narrow_bf16(sums.data(), m, C, ldc, m, n);
        return 0;
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


// ---- cuBLASLt -----------------------------------------------------------------------------------
// The calls `lt.rs` makes, with every attribute it sets stored and honoured; an attribute or
// value this fake does not implement is refused (CUBLAS_STATUS_NOT_SUPPORTED = 15,
// CUBLAS_STATUS_INVALID_VALUE = 7) rather than ignored, so that the emulation cannot pass a
// call whose meaning it would get wrong. The product is the fake cublasGemm*'s (the same loop,
// bf16 operands widened exactly), then `+ bias[row]` as a separate f32 add after alpha and beta.
static const int LT_NOT_SUPPORTED = 15, LT_INVALID = 7;
static int lt_handle;

struct LtDesc {
    int compute, scale;
    int transa = 0, transb = 0;
    int epilogue = 1;               // CUBLASLT_EPILOGUE_DEFAULT
    const float* bias = nullptr;    // CUBLASLT_MATMUL_DESC_BIAS_POINTER
    int bias_type = -1;             // CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, -1: D's type
    int64_t bias_stride = 0;        // CUBLASLT_MATMUL_DESC_BIAS_BATCH_STRIDE, in elements
};
struct LtLayout {
    int type;
    uint64_t rows, cols;
    int64_t ld;
    int batch = 1;                  // CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT
    int64_t stride = 0;             // CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, in elements
};
struct LtPref {
    uint64_t workspace = 0;
};
// What the fake heuristic writes into cublasLtMatmulAlgo_t, checked by cublasLtMatmul.
static const uint64_t LT_ALGO_MAGIC = 0x6d61652d66616b65ull;
// Algorithms the heuristic offers per product (numbered 0 .. LT_CANDIDATES - 1 in algo[1]).
static const int LT_CANDIDATES = 4;
struct LtHeuristic {
    uint64_t algo[8];
    size_t workspace;
    int state;
    float waves;
    int reserved[4];
};

}  // extern "C"

template <class T>
static int read_attr(T* out, const void* buf, size_t size) {
    if (size != sizeof(T)) return LT_INVALID;
    std::memcpy(out, buf, sizeof(T));
    return 0;
}

extern "C" {

int cublasLtCreate(void** handle) { *handle = &lt_handle; return 0; }
size_t cublasLtGetVersion() { return 130200; }
int cublasLtDestroy(void* handle) { return handle == &lt_handle ? 0 : LT_INVALID; }

int cublasLtMatmulDescCreate(LtDesc** desc, int compute, int scale) {
    *desc = new LtDesc{compute, scale};
    return 0;
}
int cublasLtMatmulDescDestroy(LtDesc* desc) { delete desc; return 0; }
int cublasLtMatmulDescSetAttribute(LtDesc* d, int attr, const void* buf, size_t size) {
    int v = 0;
    switch (attr) {
    case 2:  // POINTER_MODE: host alpha and beta only
        if (int e = read_attr(&v, buf, size)) return e;
        return v == 0 ? 0 : LT_NOT_SUPPORTED;
    case 3: case 4:  // TRANSA, TRANSB: CUBLAS_OP_N or CUBLAS_OP_T
        if (int e = read_attr(&v, buf, size)) return e;
        if (v != 0 && v != 1) return LT_NOT_SUPPORTED;
        (attr == 3 ? d->transa : d->transb) = v;
        return 0;
    case 7:  // EPILOGUE: DEFAULT, BIAS or BGRADB
        if (int e = read_attr(&v, buf, size)) return e;
        if (v != 1 && v != 4 && v != 512) return LT_NOT_SUPPORTED;
        d->epilogue = v;
        return 0;
    case 8:  // BIAS_POINTER
        return read_attr(&d->bias, buf, size);
    case 26:  // BIAS_DATA_TYPE: f32 or bf16 (lt_check: which D allows)
        if (int e = read_attr(&v, buf, size)) return e;
        if (v != 0 && v != 14) return LT_NOT_SUPPORTED;
        d->bias_type = v;
        return 0;
    case 10:  // BIAS_BATCH_STRIDE
        return read_attr(&d->bias_stride, buf, size);
    default: return LT_NOT_SUPPORTED;
    }
}

int cublasLtMatrixLayoutCreate(LtLayout** layout, int type, uint64_t rows, uint64_t cols,
                               int64_t ld) {
    *layout = new LtLayout{type, rows, cols, ld};
    return 0;
}
int cublasLtMatrixLayoutDestroy(LtLayout* layout) { delete layout; return 0; }
// Column order only (what Create describes); a strided batch.
int cublasLtMatrixLayoutSetAttribute(LtLayout* l, int attr, const void* buf, size_t size) {
    switch (attr) {
    case 5: {  // BATCH_COUNT
        int v = 0;
        if (int e = read_attr(&v, buf, size)) return e;
        if (v < 1) return LT_INVALID;
        l->batch = v;
        return 0;
    }
    case 6:  // STRIDED_BATCH_OFFSET
        return read_attr(&l->stride, buf, size);
    default: return LT_NOT_SUPPORTED;
    }
}

int cublasLtMatmulPreferenceCreate(LtPref** pref) { *pref = new LtPref; return 0; }
int cublasLtMatmulPreferenceDestroy(LtPref* pref) { delete pref; return 0; }
int cublasLtMatmulPreferenceSetAttribute(LtPref* p, int attr, const void* buf, size_t size) {
    if (attr != 1) return LT_NOT_SUPPORTED;  // MAX_WORKSPACE_BYTES
    return read_attr(&p->workspace, buf, size);
}

// Whether the fake computes this call: the types lt.rs uses, dimensions that agree, C = D's
// layout, a bias where the epilogue adds one.
static int lt_check(const LtDesc* d, const LtLayout* a, const LtLayout* b, const LtLayout* c,
                    const LtLayout* dl) {
    if (!d || !a || !b || !c || !dl) return LT_INVALID;
    if (d->scale != 0 || c->type != dl->type || a->type != b->type) return LT_NOT_SUPPORTED;
    // D f32, or bf16 from bf16 operands. The vector of an epilogue is in D's type, as the
    // real library takes it: on an H200 it had no algorithm for a bf16 D with an f32 bias
    // (2026-11-28); a bf16 D writes no bias gradient here (lt.rs never asks for one).
    const bool vector = d->epilogue == 4 || d->epilogue == 512;
    if (dl->type != 0 && (dl->type != 14 || a->type != 14)) return LT_NOT_SUPPORTED;
    if (vector && d->bias_type != -1 && d->bias_type != dl->type) return LT_NOT_SUPPORTED;
    if (dl->type == 14 && d->epilogue == 512) return LT_NOT_SUPPORTED;
    if (a->type == 14) {
        if (d->compute != 68) return LT_NOT_SUPPORTED;
    } else if (a->type != 0 || (d->compute != 68 && d->compute != 75 && d->compute != 77)) {
        return LT_NOT_SUPPORTED;
    }
    const uint64_t m = d->transa ? a->cols : a->rows, k = d->transa ? a->rows : a->cols;
    const uint64_t kb = d->transb ? b->cols : b->rows, n = d->transb ? b->rows : b->cols;
    if (k != kb || m != dl->rows || n != dl->cols) return LT_INVALID;
    if (c->rows != dl->rows || c->cols != dl->cols || c->ld != dl->ld) return LT_NOT_SUPPORTED;
    if (a->ld < (int64_t)std::max<uint64_t>(1, a->rows) || b->ld < (int64_t)std::max<uint64_t>(1, b->rows) ||
        dl->ld < (int64_t)std::max<uint64_t>(1, dl->rows))
        return LT_INVALID;
    if (m > INT32_MAX || n > INT32_MAX || k > INT32_MAX) return LT_NOT_SUPPORTED;
    if ((d->epilogue == 4 || d->epilogue == 512) && !d->bias) return LT_INVALID;
    // One batch count for all four (the real library also broadcasts; lt.rs never asks it to).
    if (a->batch != dl->batch || b->batch != dl->batch || c->batch != dl->batch ||
        c->stride != dl->stride)
        return LT_NOT_SUPPORTED;
    return 0;
}

// BGRADB: bias[j] = the sum over k of op(B)[kk][j], one per column of D (in f32, in order of
// kk), written over the bias vector.
static void bias_grad_b(const LtDesc* d, float* bias, const float* B, int ldb, int n, int k) {
    for (int j = 0; j < n; ++j) {
        float sum = 0.0f;
        for (int kk = 0; kk < k; ++kk)
            sum += d->transb ? B[j + (size_t)kk * ldb] : B[kk + (size_t)j * ldb];
        bias[j] = sum;
    }
}

int cublasLtMatmulAlgoGetHeuristic(void* handle, const LtDesc* d, const LtLayout* a,
                                   const LtLayout* b, const LtLayout* c, const LtLayout* dl,
                                   const LtPref* pref, int requested, LtHeuristic* results,
                                   int* count) {
    if (handle != &lt_handle || !pref || requested < 1 || !results || !count) return LT_INVALID;
    if (int e = lt_check(d, a, b, c, dl)) {
        *count = 0;
        return e;
    }
    // LT_CANDIDATES algorithms, numbered in algo[1] (their modeled speed: cublasLtMatmul).
    *count = std::min(requested, LT_CANDIDATES);
    for (int i = 0; i < *count; ++i) {
        std::memset(&results[i], 0, sizeof(LtHeuristic));
        results[i].algo[0] = LT_ALGO_MAGIC;
        results[i].algo[1] = (uint64_t)i;
        // As a card of 132 multiprocessors running one 128 x 128 tile of D per block would.
        const double tiles =
            std::ceil(dl->rows / 128.0) * std::ceil(dl->cols / 128.0) * dl->batch;
        results[i].waves = (float)(tiles / 132.0);
    }
    return 0;
}

// The modeled milliseconds of a batch of `batch` products of `flops` in all with the heuristic's
// candidate `algo`: 1 TFLOP/s, but candidate 1 twice as fast and each later one 10 % slower
// than the one before, so that the heuristic's first is not the fastest, and 10 % more per
// product of a batch, so that a weight gradient split into chunks (split_k.rs) is slower than
// whole by more than the split margin (lt/tuning.rs must measure to find either out: in 4
// chunks, 1.3 times the whole product).
static double modeled_product_ms(double flops, int batch, uint64_t algo) {
    const double factor = algo == 1 ? 0.5 : 1.0 + 0.1 * (double)algo;
    return flops / 1e9 * factor * (1.0 + 0.1 * (batch - 1));
}

static size_t type_bytes(int type) { return type == 14 ? 2 : 4; }

// One matrix of a cublasLtMatmul call, with its own bias vector.
static int lt_one(const LtDesc* d, float al, const void* A, const LtLayout* a, const void* B,
                  const LtLayout* b, float be, const void* C, const LtLayout* c, void* D,
                  const LtLayout* dl, float* bias) {
    const int m = (int)dl->rows, n = (int)dl->cols, k = (int)(d->transa ? a->rows : a->cols);
    // A bf16 D: the f32 result (C not read: beta must be 0) into scratch, then rounded into D.
    const bool narrow = dl->type == 14;
    std::vector<float> scratch(narrow ? (size_t)m * n : 0);
    float* out = narrow ? scratch.data() : static_cast<float*>(D);
    const int ldd = narrow ? m : (int)dl->ld;
    if (be != 0.0f && C != D) {
        for (int j = 0; j < n; ++j)
            std::memcpy(out + (size_t)j * ldd, static_cast<const float*>(C) + (size_t)j * c->ld,
                        m * sizeof(float));
    }
    int status;
    if (a->type == 14) {
        const std::vector<float> wa = widen_bf16(A, (int)a->rows, (int)a->cols, (int)a->ld, 0, 1);
        const std::vector<float> wb = widen_bf16(B, (int)b->rows, (int)b->cols, (int)b->ld, 0, 1);
        status = gemm(d->transa, d->transb, m, n, k, al, wa.data(), (int)a->ld, 0, wb.data(),
                      (int)b->ld, 0, be, out, ldd, 0, 1, 0);
        if (status == 0 && d->epilogue == 512) bias_grad_b(d, bias, wb.data(), (int)b->ld, n, k);
    } else {
        const int dropped_bits = d->compute == 75 ? 16 : d->compute == 77 ? 13 : 0;
        status = gemm(d->transa, d->transb, m, n, k, al, static_cast<const float*>(A), (int)a->ld,
                      0, static_cast<const float*>(B), (int)b->ld, 0, be, out, ldd, 0, 1,
                      dropped_bits);
        if (status == 0 && d->epilogue == 512)
            bias_grad_b(d, bias, static_cast<const float*>(B), (int)b->ld, n, k);
    }
    if (status != 0) return status;
    if (d->epilogue == 4) {
        // A bf16 D's bias is bf16 (lt_check), widened exactly.
        const std::vector<float> wide = narrow ? widen_bf16(bias, m, 1, m, 0, 1) : std::vector<float>();
        const float* add = narrow ? wide.data() : bias;
        for (int j = 0; j < n; ++j)
            for (int i = 0; i < m; ++i) out[(size_t)j * ldd + i] += add[i];
    }
    if (narrow) {
        std::lock_guard<std::mutex> guard(device_lock);
        narrow_bf16(out, ldd, D, (int)dl->ld, m, n);
    }
    return 0;
}

int cublasLtMatmul(void* handle, const LtDesc* d, const void* alpha, const void* A,
                   const LtLayout* a, const void* B, const LtLayout* b, const void* beta,
                   const void* C, const LtLayout* c, void* D, const LtLayout* dl,
                   const uint64_t* algo, void* workspace, size_t workspace_size, void* stream) {
    if (handle != &lt_handle || !algo || algo[0] != LT_ALGO_MAGIC) return LT_INVALID;
    if (workspace_size > 0 && !workspace) return LT_INVALID;
    if (int e = lt_check(d, a, b, c, dl)) return e;
    const float al = *static_cast<const float*>(alpha), be = *static_cast<const float*>(beta);
    // The real library on an H200 got alpha = 0 with beta = 1 wrong (lt.rs never asks it).
    if (al == 0.0f) return LT_NOT_SUPPORTED;
    if (dl->type == 14 && be != 0.0f) return LT_NOT_SUPPORTED;
    if (algo[1] >= (uint64_t)LT_CANDIDATES) return LT_INVALID;
    ++counts.lt;
    const double k = (double)(d->transa ? a->rows : a->cols);
    modeled_ms[stream] +=
        modeled_product_ms(2.0 * dl->rows * dl->cols * k * dl->batch, dl->batch, algo[1]);
    if (host_only()) return 0;
    // Matrix i of each operand lies i x stride elements on; its bias vector i x bias_stride.
    for (int i = 0; i < dl->batch; ++i) {
        const auto at = [i](const void* p, const LtLayout* l) {
            return static_cast<const char*>(p) + (size_t)i * l->stride * type_bytes(l->type);
        };
        char* bias = reinterpret_cast<char*>(const_cast<float*>(d->bias));
        if (bias) bias += (size_t)i * d->bias_stride * type_bytes(dl->type);
        if (int e = lt_one(d, al, at(A, a), a, at(B, b), b, be, at(C, c), c,
                           const_cast<char*>(at(D, dl)), dl, reinterpret_cast<float*>(bias)))
            return e;
    }
    return 0;
}

}  // extern "C"
