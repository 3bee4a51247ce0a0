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
# The backend's own tests, all of them (those that need a device run on this fake driver)
# but NCCL's, which need libnccl (gpu-check runs them on a card). A list of the device tests
# went stale once: tests moved to another module matched no filter and ran nowhere but as
# skips.
[ "${MAE_EMULATE_BACKEND_TESTS:-1}" = 0 ] ||
cargo test --release -p mae-backend-cuda --lib -- --skip nccl::tests::
suites=()
for suite in ${MAE_EMULATE_SUITES:-ops gradcheck embed golden variants training}; do
    suites+=(--test "$suite")
done
cargo test --release --no-fail-fast -p mae-conformance "${suites[@]}" -- "${MAE_EMULATE_FILTER:-cuda}" "$@"
