#!/usr/bin/env bash
# Runs the conformance suite's cuda tests (ops, gradcheck, embed, golden, training) and the
# `golden` program on the real CUDA backend over a fake CUDA (fake_cuda.cpp: the kernels on the
# host, cuBLAS and cuBLASLt as loops). Checks everything the GPU check checks except the GPU
# itself: NVRTC's compile (see tests/nvrtc_compile.rs), the PTX, real cuBLAS and the device.
# Needs g++ >= 11.
# MAE_EMULATE_FILTER (default `cuda`) selects the tests by name, MAE_EMULATE_SUITES (default all
# six) the conformance suites; MAE_EMULATE_BACKEND_TESTS=0 skips the backend's own tests.
set -euo pipefail
cd "$(dirname "$0")"
fake=${TMPDIR:-/tmp}/mae-fake-cuda
mkdir -p "$fake"
python3 gen_dispatch.py ../src/kernels/*.cu >"$fake/dispatch.inc"
g++ -std=c++20 -O2 -pthread -ffp-contract=off -fno-strict-aliasing -fPIC -shared -Wall -Wno-unused-function \
    -I"$fake" -o "$fake/libfakecuda.so" fake_cuda.cpp
for lib in libcuda.so libnvrtc.so libcublas.so libcublasLt.so; do ln -sf libfakecuda.so "$fake/$lib"; done
cd ../..
export LD_LIBRARY_PATH="$fake${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export MAE_REQUIRE_BACKENDS=cuda,cuda-bf16
# The backend's own tests that need a device (the others run in the workspace's test command).
[ "${MAE_EMULATE_BACKEND_TESTS:-1}" = 0 ] ||
cargo test --release -p mae-backend-cuda --lib -- upload::tests::rewrites upload::tests::overlapped \
    bf16::tests::bias_gradients_of_a_copy_alone bf16::tests::products_into_operand_buffers \
    bf16::tests::operand_floats bf16::tests::bf16_training_and_embedding bf16::tests::the_optimizer \
    bf16::tests::attention_inputs_of_mixed_kinds lt::tests::weight_gradients_that_leave \
    lt::tests::bias_gradients_in_the_epilogue lt::tests::tuned_products lt::tests::tuning_refuses \
    nccl::overlap::tests \
    device::tests::the_memory_pool_keeps_freed_memory
suites=()
for suite in ${MAE_EMULATE_SUITES:-ops gradcheck embed golden variants training}; do
    suites+=(--test "$suite")
done
cargo test --release --no-fail-fast -p mae-conformance "${suites[@]}" -- "${MAE_EMULATE_FILTER:-cuda}" "$@"
