// Just enough of CUDA C to run this crate's kernels on the host. Blocks run one after another, so
// a function-local `static` stands in for __shared__ memory. `launch_rows` runs a block's threads
// as real threads meeting at a real barrier (__syncthreads), so a missing barrier can show up as
// a wrong result; `launch` runs kernels without barriers one thread after another.
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>

struct Dim3 {
    unsigned x = 1, y = 1, z = 1;
};
inline thread_local Dim3 threadIdx, blockIdx;
inline Dim3 blockDim, gridDim;
inline std::barrier<>* block_barrier = nullptr;

#define __global__
#define __device__
#define __shared__ static
#include <cstdio>
#include <cstdlib>
inline void __syncthreads() {
    if (block_barrier == nullptr) {
        std::fprintf(stderr, "__syncthreads in a kernel launched without threads (launch_rows)\n");
        std::abort();
    }
    block_barrier->arrive_and_wait();
}
inline float __int_as_float(unsigned v) {
    float f;
    std::memcpy(&f, &v, 4);
    return f;
}
#include <math.h>  // erfc, exp, expf, fmaxf, sqrt, sqrtf in the global namespace, as in CUDA

// Runs `kernel` on a grid of `grid` blocks of `block` threads, one thread after another: for
// kernels without barriers (a barrier aborts).
inline void launch(unsigned grid, unsigned block, const std::function<void()>& kernel) {
    gridDim.x = grid;
    blockDim.x = block;
    block_barrier = nullptr;
    for (unsigned b = 0; b < grid; ++b) {
        for (unsigned t = 0; t < block; ++t) {
            blockIdx.x = b;
            threadIdx.x = t;
            kernel();
        }
    }
}

// Runs `kernel` with each block's threads as real threads meeting at a real barrier: for the
// row kernels, whose reductions synchronize.
inline void launch_rows(unsigned grid, unsigned block, const std::function<void()>& kernel) {
    gridDim.x = grid;
    blockDim.x = block;
    std::barrier<> bar(block);
    block_barrier = &bar;
    std::vector<std::thread> threads;
    threads.reserve(block);
    for (unsigned t = 0; t < block; ++t) {
        threads.emplace_back([&, t] {
            threadIdx.x = t;
            for (unsigned b = 0; b < grid; ++b) {
                blockIdx.x = b;
                kernel();
                // Block b ends for every thread before block b + 1 reuses the shared memory.
                bar.arrive_and_wait();
            }
        });
    }
    for (auto& th : threads) th.join();
    block_barrier = nullptr;
}
