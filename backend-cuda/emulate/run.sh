#!/usr/bin/env bash
# Builds and runs the host emulation of the CUDA kernels (emulate.cpp). Needs g++ >= 11 (C++20).
set -euo pipefail
cd "$(dirname "$0")"
out=${TMPDIR:-/tmp}/mae-cuda-emulate
# -ffp-contract=off: no FMA contraction, as the kernels are compiled (--fmad=false);
# -fno-strict-aliasing: the kernels read float rows as float4.
g++ -std=c++20 -O1 -ffp-contract=off -fno-strict-aliasing -Wall -Wno-unused-function -o "$out" emulate.cpp
"$out"
