// Just enough of CUDA C to run this crate's kernels on the host. Blocks run one after another, so
// a function-local `static` stands in for __shared__ memory. `launch_rows` runs a block's threads
// as fibers meeting at real barriers (__syncthreads for the block, warp barriers inside the warp
// collectives: shuffles, mma, ldmatrix), so a missing barrier shows up as a wrong result, and a
// warp whose lanes part ways at a collective, or a barrier that not every thread reaches, aborts;
// `launch` runs kernels without barriers one thread after another.
#pragma once
#include <ucontext.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

struct Dim3 {
    unsigned x = 1, y = 1, z = 1;
};
inline thread_local Dim3 threadIdx, blockIdx;
inline Dim3 blockDim, gridDim;
inline thread_local bool in_fibers = false;

#define __global__
#define __launch_bounds__(...)
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#include <cstdio>
#include <cstdlib>
// What a fiber waits for when it yields to the scheduler.
enum class Wait { Nothing, Warp, Block, Exited };
inline void yield_to_scheduler(Wait why);
inline void check_fibers(const char* what) {
    if (!in_fibers) {
        std::fprintf(stderr, "%s in a kernel launched without fibers (use launch_rows)\n", what);
        std::abort();
    }
}
inline void __syncthreads() {
    check_fibers("__syncthreads");
    yield_to_scheduler(Wait::Block);
}
// The barrier of a warp collective: all lanes of this thread's warp (threads 32w .. 32w + 31)
// meet here, whatever the block's other warps do.
inline void warp_barrier() {
    check_fibers("a warp collective");
    yield_to_scheduler(Wait::Warp);
}
// __syncwarp: the warp barrier alone (the emulated lanes share memory, so meeting is enough).
inline void __syncwarp(unsigned = 0xffffffffu) { warp_barrier(); }
// A warp shuffle as two warp barriers around a per-thread slot (the lanes of a real warp are
// threads 32w .. 32w + 31, so `lane ^ o` with o < 32 stays inside the warp).
template <typename T>
inline T __shfl_xor_sync(unsigned, T v, unsigned o) {
    static thread_local std::vector<T> slots;
    if (slots.size() < blockDim.x) slots.resize(blockDim.x);
    slots[threadIdx.x] = v;
    warp_barrier();
    const T other = slots[threadIdx.x ^ o];
    warp_barrier();
    return other;
}
struct alignas(16) float4 {
    float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
struct alignas(8) float2 {
    float x, y;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }
struct alignas(8) uint2 {
    unsigned x, y;
};
inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
inline float __int_as_float(unsigned v) {
    float f;
    std::memcpy(&f, &v, 4);
    return f;
}
inline unsigned __float_as_uint(float f) {
    unsigned v;
    std::memcpy(&v, &f, 4);
    return v;
}
inline float __uint_as_float(unsigned v) { return __int_as_float(v); }
#include <math.h>  // erfc, exp, expf, fmaxf, sqrt, sqrtf in the global namespace, as in CUDA

// The kernels take this shim's stand-ins for inline PTX (attention_mma.cu).
#define MAE_HOST_SHIM 1

// mma.sync.m16n8k16 with bf16 A and B and f32 accumulators, across each warp: every lane
// publishes its fragments, and after a barrier computes its own four outputs from the whole
// warp's, placed as the PTX ISA lays the fragments out (lane = 4 g + t; A register j: row
// g + 8 (j % 2), columns 8 (j / 2) + 2 t and + 1; B register j: rows 8 j + 2 t and + 1 of column
// g; C element i: row g + 8 (i / 2), column 2 t + i % 2). Products of bf16 values are exact in
// f32; they are summed in ascending k, then added to the accumulator.
inline void host_mma_bf16(float* d, const unsigned* a, unsigned b0, unsigned b1) {
    struct Fragments {
        unsigned a[4], b[2];
    };
    static thread_local std::vector<Fragments> slots;
    if (slots.size() < blockDim.x) slots.resize(blockDim.x);
    slots[threadIdx.x] = Fragments{{a[0], a[1], a[2], a[3]}, {b0, b1}};
    warp_barrier();
    const unsigned lane = threadIdx.x % 32, warp = threadIdx.x - lane;
    auto half = [](unsigned w, unsigned high) {
        return __uint_as_float(high ? w & 0xffff0000u : w << 16);
    };
    auto at_a = [&](unsigned r, unsigned k) {
        const Fragments& f = slots[warp + (r % 8) * 4 + (k % 8) / 2];
        return half(f.a[(k / 8) * 2 + r / 8], k % 2);
    };
    auto at_b = [&](unsigned k, unsigned n) {
        const Fragments& f = slots[warp + n * 4 + (k % 8) / 2];
        return half(f.b[k / 8], k % 2);
    };
    float out[4];
    for (unsigned i = 0; i < 4; ++i) {
        const unsigned r = lane / 4 + 8 * (i / 2), n = 2 * (lane % 4) + i % 2;
        float sum = 0.0f;
        for (unsigned k = 0; k < 16; ++k) sum += at_a(r, k) * at_b(k, n);
        out[i] = d[i] + sum;
    }
    warp_barrier();
    for (unsigned i = 0; i < 4; ++i) d[i] = out[i];
}

// ldmatrix.sync.aligned.m8n8.x2 or .x4 (.trans).shared.b16 across each warp (`count` 2 or 4
// matrices): every lane publishes its row address, and after a barrier takes its registers from
// the warp's (lanes 8 i .. 8 i + 7 address matrix i's rows; register i of lane 4 g + t is row g,
// columns 2 t and 2 t + 1 of matrix i, or with `trans` of its transpose: rows 2 t and 2 t + 1 of
// column g). With two matrices lanes 16 .. 31 give addresses that are not read.
inline void host_ldmatrix(unsigned* r, const unsigned short* row, bool trans, unsigned count) {
    static thread_local std::vector<const unsigned short*> slots;
    if (slots.size() < blockDim.x) slots.resize(blockDim.x);
    if (threadIdx.x % 32 < 8 * count && ((uintptr_t)row & 15) != 0) {
        std::fprintf(stderr, "ldmatrix: row address not 16-byte aligned\n");
        std::abort();
    }
    slots[threadIdx.x] = row;
    warp_barrier();
    const unsigned lane = threadIdx.x % 32, warp = threadIdx.x - lane, g = lane / 4, t = lane % 4;
    unsigned out[4];
    for (unsigned i = 0; i < count; ++i) {
        const unsigned short* const* m = &slots[warp + 8 * i];
        const unsigned lo = trans ? m[2 * t][g] : m[g][2 * t];
        const unsigned hi = trans ? m[2 * t + 1][g] : m[g][2 * t + 1];
        out[i] = lo | (hi << 16);
    }
    warp_barrier();
    for (unsigned i = 0; i < count; ++i) r[i] = out[i];
}

// cp.async of 16 bytes (.cg) or 8 (.ca): the copy is only noted, and lands at the thread's next
// cp.async.wait_group (host_cp_async_wait_all), the latest moment the real one may, so that a
// tile read before its wait and barrier reads the old contents and fails the tests.
struct AsyncCopy {
    void* dst;
    const void* src;
    unsigned size;
    bool valid;
};
inline std::vector<AsyncCopy>& pending_copies() {
    static thread_local std::vector<std::vector<AsyncCopy>> pending;
    if (pending.size() < blockDim.x) pending.resize(blockDim.x);
    return pending[threadIdx.x];
}
inline void host_cp_async(void* dst, const void* src, unsigned size, bool valid) {
    if (((uintptr_t)dst % size) != 0 || (valid && ((uintptr_t)src % size) != 0)) {
        std::fprintf(stderr, "cp.async: address not %u-byte aligned\n", size);
        std::abort();
    }
    pending_copies().push_back(AsyncCopy{dst, src, size, valid});
}
inline void host_cp_async_wait_all() {
    for (const AsyncCopy& c : pending_copies()) {
        if (c.valid) {
            std::memcpy(c.dst, c.src, c.size);
        } else {
            std::memset(c.dst, 0, c.size);
        }
    }
    pending_copies().clear();
}

// Runs `kernel` on a grid of `grid` blocks of `block` threads, one thread after another: for
// kernels without barriers (a barrier aborts).
inline void launch(unsigned grid, unsigned block, const std::function<void()>& kernel) {
    gridDim.x = grid;
    blockDim.x = block;
    for (unsigned b = 0; b < grid; ++b) {
        for (unsigned t = 0; t < block; ++t) {
            blockIdx.x = b;
            threadIdx.x = t;
            kernel();
        }
    }
}

// Runs `kernel` with each block's threads as fibers (ucontext) on this OS thread: every fiber runs
// until it waits at a barrier, in thread order; a warp barrier opens when every lane of the warp
// waits at one, __syncthreads when every thread that has not exited waits at it. The schedule is
// deterministic (a missing barrier gives the same wrong result every run). Lanes of one warp at
// different barriers, or threads that can never meet, abort with the block and thread.
struct Fiber {
    ucontext_t ctx;
    Wait wait;
};
inline thread_local ucontext_t* scheduler = nullptr;
inline thread_local Fiber* running = nullptr;
inline thread_local const std::function<void()>* fiber_body = nullptr;

inline void yield_to_scheduler(Wait why) {
    running->wait = why;
    swapcontext(&running->ctx, scheduler);
}

inline void fiber_entry() {
    (*fiber_body)();
    running->wait = Wait::Exited;  // returning switches to uc_link, the scheduler
}

[[noreturn]] inline void fiber_abort(unsigned t, const char* why) {
    std::fprintf(stderr, "launch_rows: block %u, thread %u: %s\n", blockIdx.x, t, why);
    std::abort();
}

// With `warp_ahead`, the lowest-numbered warp that can go on runs alone until it waits at a
// block barrier (or exits), then the next: the most skew between warps that the barriers allow,
// where the default runs every warp in each round and opens every warp's collective (the warps
// in lockstep). Shared memory overwritten while a slower warp still reads it (a staged tile, a
// reduction's scratch) shows up only in this order.
inline bool warp_ahead = false;

// Opens the barriers that every thread they wait for has reached; false when none could open.
inline bool open_barriers(std::vector<Fiber>& fibers, unsigned block) {
    bool opened = false;
    for (unsigned w = 0; w < block; w += 32) {
        const unsigned end = w + 32 < block ? w + 32 : block;
        unsigned at_warp = 0;
        for (unsigned t = w; t < end; ++t) at_warp += fibers[t].wait == Wait::Warp;
        if (at_warp == 0) continue;
        if (at_warp < end - w) {
            for (unsigned t = w; t < end; ++t) {
                if (fibers[t].wait != Wait::Warp)
                    fiber_abort(t, "not at the warp collective its lanes wait at (divergent warp)");
            }
        }
        for (unsigned t = w; t < end; ++t) fibers[t].wait = Wait::Nothing;
        opened = true;
        if (warp_ahead) return true;
    }
    if (opened) return true;
    bool all = true, any = false;
    for (unsigned t = 0; t < block; ++t) {
        all = all && (fibers[t].wait == Wait::Block || fibers[t].wait == Wait::Exited);
        any = any || fibers[t].wait == Wait::Block;
    }
    if (!all || !any) return false;
    for (unsigned t = 0; t < block; ++t) {
        if (fibers[t].wait == Wait::Block) fibers[t].wait = Wait::Nothing;
    }
    return true;
}

inline void launch_rows(unsigned grid, unsigned block, const std::function<void()>& kernel) {
    gridDim.x = grid;
    blockDim.x = block;
    // Stacks and fibers are kept between launches: allocating 16 MiB per launch dominated.
    const size_t stack_size = 64 * 1024;
    static thread_local std::vector<char> stacks;
    static thread_local std::vector<Fiber> fibers;
    if (stacks.size() < stack_size * block) stacks.resize(stack_size * block);
    if (fibers.size() < block) fibers.resize(block);
    ucontext_t sched;
    scheduler = &sched;
    fiber_body = &kernel;
    in_fibers = true;
    for (unsigned b = 0; b < grid; ++b) {
        blockIdx.x = b;
        for (unsigned t = 0; t < block; ++t) {
            Fiber& f = fibers[t];
            f.wait = Wait::Nothing;
            getcontext(&f.ctx);
            f.ctx.uc_stack.ss_sp = stacks.data() + t * stack_size;
            f.ctx.uc_stack.ss_size = stack_size;
            f.ctx.uc_link = &sched;
            makecontext(&f.ctx, fiber_entry, 0);
        }
        for (;;) {
            // With `warp_ahead`, only the lowest warp that can go on runs in this round.
            unsigned first = 0, end = block;
            if (warp_ahead) {
                while (first < block && fibers[first].wait != Wait::Nothing) ++first;
                first -= first % 32;
                end = first + 32 < block ? first + 32 : block;
            }
            for (unsigned t = first; t < end; ++t) {
                if (fibers[t].wait != Wait::Nothing) continue;
                threadIdx.x = t;
                running = &fibers[t];
                swapcontext(&sched, &fibers[t].ctx);
            }
            if (open_barriers(fibers, block)) continue;
            // Warps that did not run this round (with `warp_ahead`) go on in the next.
            bool runnable = false;
            for (unsigned t = 0; t < block; ++t) runnable = runnable || fibers[t].wait == Wait::Nothing;
            if (runnable) continue;
            unsigned t = 0;
            while (t < block && fibers[t].wait == Wait::Exited) ++t;
            if (t == block) break;
            fiber_abort(t, "waits at a barrier that the block's other threads never reach");
        }
    }
    in_fibers = false;
}
