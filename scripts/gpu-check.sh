#!/usr/bin/env bash
# The GPU check of the CUDA backend in two steps (docs/gpu.md):
#
#   scripts/gpu-check.sh build
#       Here, on the development machine (x86-64, no GPU needed): builds in release everything
#       the check runs -- the `golden` and `bench` programs with the CUDA backend, the
#       conformance test binaries and the backend's own tests -- and gathers them, stripped of
#       debug info and compressed, with a copy of ../shared/golden, in gpu-check/ (git-ignored;
#       carry it).
#
#   scripts/gpu-check.sh run [--golden DIR]...
#       There, on the GPU machine, in the repository root, with gpu-check/ beside it: writes
#       $OUT/report.md (device, driver, a verdict per step) and the raw logs, and exits non-zero
#       if any step failed. Steps: the backend's tests and the conformance suite's cuda tests
#       under MAE_REQUIRE_BACKENDS=cuda (so a missing device fails instead of skipping), the
#       `golden` program with --backend cuda on every *.safetensors of each DIR (default
#       ../shared/golden, else the copy in gpu-check/shared-golden), and
#       speed: `bench` at base224 in f32 and bf16 (batches 64 to 256, GPU_CHECK_BATCHES; bf16
#       also with the composed attention), ViT-L/16 at batch 128 and ViT-H/14 at 64 next to
#       bench/torch_reference.py (PyTorch eager, bf16 autocast and f32) on the same card, each
#       with its peak device memory; MAE_CUDA_PROFILE tables of the bf16 training step alone
#       (at the largest batch, with the share of the step the GPU is busy: `busy_share`) and
#       of embedding alone, each with every kernel's registers, spills and resident blocks;
#       and the wgpu backend on the GPU where the machine has a Vulkan driver; and
#       scripts/dp-check.sh (one NCCL rank against a single process), and bf16 at the
#       largest batch with MAE_CUDA_UPLOAD=pageable (the uploads before pinned staging), with
#       MAE_CUDA_UPLOAD=pinned (pinned uploads in the compute stream's order, before they
#       overlapped the step before), with
#       MAE_CUDA_ATTENTION_PREFETCH=off (the attention's tile loads not overlapped), with
#       MAE_CUDA_ATTENTION_TAIL=split (the attention's last blocks split over their warps in
#       tail kernels, the default before 2026-11-28),
#       with MAE_CUDA_ATTENTION_OCCUPANCY=more and =fewer (the attention kernels' resident
#       blocks one up, one down),
#       with MAE_CUDA_LAYERNORM_PARTIALS=separate (the LayerNorm
#       parameter gradients' partials in a pass of their own) and with
#       MAE_CUDA_WEIGHT_GRAD_SPLIT=off (weight gradients as one product each), and with
#       MAE_CUDA_GEMM_TUNE (cuBLASLt's algorithms and the weight gradients' chunk counts timed
#       in the warm-up steps; the golden files in bf16 with it too, and its table in the
#       report), and with MAE_CUDA_GEMM_TABLE=heuristic (without the built-in table, where
#       one was made for the card). Each of those settings is also profiled at the largest
#       batch. Then Nsight Compute's counters for one launch of each of the slowest kernels
#       (scripts/ncu-kernel.sh; GPU_CHECK_NCU lists them, empty skips them; only where ncu can
#       read the counters). The report ends with issue 6's numbers worked out: the ratio to
#       PyTorch and the MFU per batch, each A/B run as a share of the default's rate, each
#       profiled setting's device time per step with the ops it moved most, and the ncu table
#       (throughput against the peaks, occupancy, issue rate, the top stall reasons). A full
#       run took 195-213 s on an H200 (2026-11-27), before the profiled settings (about 10 s
#       each); on 2026-11-28 one without wgpu did not finish in 420 s (the NVRTC compile alone
#       took 96 s, the backend's tests 45 s), so the profiles and the last suites were not
#       reached: give a full run the whole 540 s.
#       GPU_CHECK_QUICK=1 keeps what a change to the bf16 mode needs, in about half the time:
#       the backend's tests, bf16 golden and ops, bf16 bench at GPU_CHECK_BATCHES (the composed
#       attention and PyTorch bf16 at the largest), the profiles, ncu; no f32, ViT-L, wgpu or
#       NCCL.
#       GPU_CHECK_WGPU=0 skips the wgpu steps of a full run. GPU_CHECK_ONLY (an extended
#       regex) runs only the steps whose report names it matches, for a second call in a
#       session whose device time is short, e.g. 'unit|ops|cuda-bf16 b256$|torch|train b256$'.
#
# Nothing in `run` compiles or fetches anything: the GPU machines reach no registry.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PACK=$ROOT/gpu-check

usage() {
    echo "usage: $0 build | run [--golden DIR]..." >&2
    exit 2
}

# ---- build ---------------------------------------------------------------------------------

# Test executables of a `cargo test --no-run` as "name path" lines (name = the test target).
test_executables() {
    cargo test --release --no-run --message-format=json "$@" |
        jq -r 'select(.reason == "compiler-artifact" and .executable != null and .profile.test)
               | "\(.target.name)-\(.target.kind[0]) \(.executable)"'
}

build() {
    set -e
    command -v jq >/dev/null || { echo "gpu-check build needs jq" >&2; exit 1; }
    rm -rf "$PACK"
    mkdir -p "$PACK/bin" "$PACK/tests"
    echo "== building golden and bench (release, --features cuda)"
    cargo build --release -p mae-conformance --bin golden
    cargo build --release -p mae-examples --features cuda,wgpu --bin bench --bin pretrain
    local target
    target=$(cargo metadata --format-version 1 --no-deps | jq -r .target_directory)
    cp "$target/release/golden" "$target/release/bench" "$target/release/pretrain" "$PACK/bin/"
    echo "== building the test binaries"
    local name path
    while read -r name path; do
        case "$name" in
        # The conformance suites that instantiate every test per backend, and the backend's
        # own unit and NVRTC tests; the others (alloc, errors, the golden program's unit
        # tests) are CPU-only.
        ops-test | gradcheck-test | golden-test | embed-test | training-test | variants-test | \
            mae_backend_cuda-lib | mae_backend_wgpu-lib | nvrtc_compile-test)
            cp "$path" "$PACK/tests/$name"
            ;;
        esac
    done < <(test_executables -p mae-conformance -p mae-backend-cuda -p mae-backend-wgpu)
    strip --strip-debug "$PACK"/bin/* "$PACK"/tests/*
    # The Vulkan loader and GL dispatch libraries as Debian packages, for the wgpu step: the GPU
    # machines mount NVIDIA's Vulkan driver but have no loader (`run` unpacks them into /).
    mkdir -p "$PACK/gl"
    (cd "$PACK/gl" && apt-get download libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 \
        libgles2) || echo "apt-get download failed: the wgpu step will rely on the GPU machine's loader" >&2
    ls -la "$PACK"/bin "$PACK"/tests
    # Every test binary links all three backends (~45 MiB together); compressed they carry in
    # a tenth of the device tool's 64 MiB.
    tar -C "$PACK" -cJf "$PACK/binaries.tar.xz" bin tests
    rm -rf "$PACK/bin" "$PACK/tests"
    if [ -d ../shared/golden ]; then
        mkdir -p "$PACK/shared-golden"
        cp ../shared/golden/*.safetensors "$PACK/shared-golden/"
    fi
    git rev-parse HEAD >"$PACK/commit"
    local mib
    mib=$(du -sm "$PACK" | cut -f1)
    echo "gpu-check/: $mib MiB (the device tool carries at most 64 MiB with the working tree)"
    [ "$mib" -lt 56 ] || { echo "gpu-check/ is too large to carry" >&2; exit 1; }
    echo "next, on the GPU machine: scripts/gpu-check.sh run   (carry: gpu-check)"
}

# ---- run -----------------------------------------------------------------------------------

# find_cuda_libraries, shared with dp-check.sh.
source "$ROOT/scripts/cuda-libraries.sh"

run() {
    local golden_dirs=()
    while [ $# -gt 0 ]; do
        case "$1" in
        --golden)
            [ $# -ge 2 ] || usage
            golden_dirs+=("$2")
            shift 2
            ;;
        *) usage ;;
        esac
    done
    if [ ${#golden_dirs[@]} -eq 0 ]; then
        if [ -d ../shared/golden ]; then
            golden_dirs=(../shared/golden)
        else
            golden_dirs=("$PACK/shared-golden")
        fi
    fi
    [ -f "$PACK/binaries.tar.xz" ] || {
        echo "no $PACK/binaries.tar.xz: run '$0 build' first and carry gpu-check" >&2
        exit 2
    }
    # Unpacked outside the carried folder, which may be read-only.
    local bins
    bins=$(mktemp -d)
    tar -C "$bins" -xJf "$PACK/binaries.tar.xz" || { echo "cannot unpack the binaries" >&2; exit 2; }

    local out=${OUT:-$ROOT/gpu-check-out}
    mkdir -p "$out"
    local report=$out/report.md
    local failed=0
    find_cuda_libraries 'libcuda.so.1' 'libnvrtc.so.1[23]' 'libcublas.so.1[23]' 'libcublasLt.so.1[23]'
    export MAE_REQUIRE_BACKENDS=cuda,cuda-bf16
    # The test binaries were built elsewhere: their files are in this checkout's conformance/.
    export MAE_CONFORMANCE_DIR=$ROOT/conformance
    export RUST_BACKTRACE=1

    {
        echo "# GPU check of the CUDA backend"
        echo
        echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
        echo "- commit built: $(cat "$PACK/commit" 2>/dev/null || echo unknown)"
        echo "- device: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>&1 | head -n 1)"
        echo "- driver: $(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>&1 | head -n 1)"
        echo "- LD_LIBRARY_PATH: ${LD_LIBRARY_PATH:-(unset)}"
        echo "- libraries: $(ldconfig -p 2>/dev/null | grep -oE 'lib(cuda|nvrtc|cublas|cublasLt)\.so\.[0-9]+' | sort -u | tr '\n' ' ')"
        echo
        echo "| step | verdict | seconds | log |"
        echo "|---|---|---|---|"
    } >"$report"

    # One device command may run 10 minutes: every step gets at most what is left of
    # GPU_CHECK_SECONDS (default 540), so the report is complete before the command is killed.
    local budget=${GPU_CHECK_SECONDS:-540}
    local quick=${GPU_CHECK_QUICK:-0}

    # step NAME LOG TIMEOUT COMMAND...: runs the command (output appended to LOG), adds a line
    # to the report, and remembers failures; with SOFT=1 in its environment a failure is
    # reported as not measured and fails nothing (a measurement the machine may not allow).
    step() {
        local name=$1 log=$2 limit=$3
        shift 3
        selected "$name" || return 0
        local start=$SECONDS rc
        local left=$((budget - SECONDS))
        if [ "$left" -lt 10 ]; then
            echo "| $name | FAIL (not run: the time budget of ${budget}s is spent) | 0 | - |" >>"$report"
            failed=1
            return
        fi
        [ "$limit" -le "$left" ] || limit=$left
        echo "== $name" >>"$out/$log"
        timeout "$limit" "$@" >>"$out/$log" 2>&1
        rc=$?
        local verdict=PASS
        if [ $rc -ne 0 ]; then
            verdict="(exit $rc$([ $rc -eq 124 ] && echo ", timed out after ${limit}s"))"
            if [ "${SOFT:-0}" = 1 ]; then
                verdict="NOT MEASURED $verdict"
            else
                verdict="FAIL $verdict"
                failed=1
            fi
        fi
        echo "| $name | $verdict | $((SECONDS - start)) | $log |" >>"$report"
        echo "$name: $verdict"
    }

    # selected NAME: whether GPU_CHECK_ONLY (an extended regex; unset: all) selects the step.
    selected() {
        [ -z "${GPU_CHECK_ONLY:-}" ] || grep -qE -- "$GPU_CHECK_ONLY" <<<"$1"
    }

    # measure NAME COMMAND...: a `step` logging to bench.log whose JSON line gains the peak
    # device memory in use (MiB) that nvidia-smi sampled every 100 ms while it ran.
    measure() {
        local name=$1
        shift
        selected "$name" || return 0
        local mem=$out/mem.$RANDOM.csv
        nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$mem" 2>/dev/null &
        local sampler=$!
        local before
        before=$(wc -l <"$out/bench.log" 2>/dev/null || echo 0)
        step "$name" bench.log 150 "$@"
        kill "$sampler" 2>/dev/null
        wait "$sampler" 2>/dev/null
        local peak
        peak=$(sort -n "$mem" | tail -n 1)
        rm -f "$mem"
        # Append the peak to the JSON line(s) the step printed.
        sed -i "$((before + 1)),\$ s/^\({.*\)}\$/\1, \"peak_gpu_mb\": ${peak:-null}}/" "$out/bench.log"
    }

    # vulkan_setup: NVIDIA's Vulkan driver is mounted under /usr/local/nvidia, but the machine
    # has no Vulkan loader: unpack the carried Debian packages into / (the machine is bare and
    # given back after the call) and point the loader at NVIDIA's ICD file.
    vulkan_setup() {
        if ! ldconfig -p 2>/dev/null | grep -q 'libvulkan\.so\.1\b'; then
            local deb
            for deb in "$PACK"/gl/*.deb; do
                [ -e "$deb" ] && dpkg -x "$deb" / && echo "== unpacked $(basename "$deb")"
            done
            ldconfig
        fi
        local icd
        for icd in /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json \
            /usr/share/vulkan/icd.d/nvidia_icd.json /etc/vulkan/icd.d/nvidia_icd.json; do
            if [ -f "$icd" ]; then
                export VK_DRIVER_FILES=$icd
                echo "== VK_DRIVER_FILES=$icd: $(tr -d '\n ' <"$icd")"
                break
            fi
        done
        echo "== loader: $(ldconfig -p 2>/dev/null | grep -oE 'libvulkan\.so\.1 .*' | head -n 1)"
    }

    step "backend unit tests" backend.log 120 "$bins/tests/mae_backend_cuda-lib"
    local dir files
    for dir in "${golden_dirs[@]}"; do
        [ "$quick" = 1 ] && break
        files=("$dir"/*.safetensors)
        if [ ! -e "${files[0]}" ]; then
            echo "| golden $dir | FAIL (no *.safetensors) | 0 | golden.log |" >>"$report"
            failed=1
            continue
        fi
        step "golden --backend cuda on $dir (${#files[@]} files)" golden.log 300 \
            "$bins/bin/golden" --backend cuda "${files[@]}"
    done
    for dir in "${golden_dirs[@]}"; do
        step "golden --backend cuda-bf16 on $dir" golden.log 120 \
            "$bins/bin/golden" --backend cuda-bf16 "$dir"/*.safetensors
        step "golden --backend cuda-bf16 on $dir, MAE_CUDA_ATTENTION=composed" golden.log 120 \
            env MAE_CUDA_ATTENTION=composed "$bins/bin/golden" --backend cuda-bf16 "$dir"/*.safetensors
        # Every product on bf16 copies: the golden files' small products then take the bf16
        # outputs (cuBLAS's bf16 C, cuBLASLt's bf16 D with an f32 bias) that only ViT-size
        # products take by default.
        step "golden --backend cuda-bf16 on $dir, MAE_CUDA_BF16_GEMM=copies" golden.log 120 \
            env MAE_CUDA_BF16_GEMM=copies "$bins/bin/golden" --backend cuda-bf16 "$dir"/*.safetensors
        # Every product on cuBLASLt with the algorithm timed fastest (lt/tuning.rs).
        step "golden --backend cuda-bf16 on $dir, MAE_CUDA_GEMM_TUNE" golden.log 120 \
            env MAE_CUDA_GEMM_TUNE="$out/golden-tune.txt" "$bins/bin/golden" --backend cuda-bf16 \
            "$dir"/*.safetensors
    done
    # The op suite early: it holds the bf16 GEMM's rounding checks (both routes, bf16.rs) and
    # the bf16 mode's tensor-core attention against the f64 oracle.
    step "conformance ops (cuda)" conformance.log 90 \
        env MAE_GOLDEN_DIR="${golden_dirs[0]}" "$bins/tests/ops-test" cuda

    # Speed (issue 6): ours in f32 and bf16 next to PyTorch eager on the same card, each with
    # the peak device memory nvidia-smi saw while it ran; bf16 (tensor-core attention) also with
    # the composed attention it replaced (MAE_CUDA_ATTENTION=composed).
    # GPU_CHECK_BATCHES (default "256 128 64") lists the bf16 batches, largest first;
    # GPU_CHECK_LARGE=0 skips ViT-L/16.
    local s=${BENCH_SECONDS:-3}
    local batches=${GPU_CHECK_BATCHES:-256 128 64}
    local batch largest=${batches%% *} large=${GPU_CHECK_LARGE:-1} composed=$batches
    if [ "$quick" = 1 ]; then
        large=0
        composed=$largest
    else
        measure "bench base224 cuda b64" "$bins/bin/bench" --case base224 --backend cuda \
            --batch 64 --seconds "$s"
    fi
    for batch in $batches; do
        measure "bench base224 cuda-bf16 b$batch" "$bins/bin/bench" --case base224 \
            --backend cuda-bf16 --batch "$batch" --seconds "$s"
    done
    # Where the device time goes, early so that a call whose time runs out still has it:
    # MAE_CUDA_PROFILE's table (printed when the backend drops), for the training step alone at
    # the largest batch (the ratio the issue asks for), then for embedding alone.
    step "profile base224 cuda-bf16 train b$largest" profile.log 120 \
        env MAE_CUDA_PROFILE=1 "$bins/bin/bench" --case base224 --backend cuda-bf16 \
        --batch "$largest" --seconds 2 --phase train
    step "profile base224 cuda-bf16 embed b128" profile.log 120 \
        env MAE_CUDA_PROFILE=1 "$bins/bin/bench" --case base224 --backend cuda-bf16 --batch 128 \
        --seconds 2 --phase embed
    # The uploads from pageable memory that pinned staging replaced, and pinned uploads in the
    # compute stream's order, before they overlapped the previous step (upload.rs); the
    # tensor-core attention waiting for each tile's loads instead of computing the tile before
    # meanwhile (attention_mma.cu, mma_row_walk); same batch.
    measure "bench base224 cuda-bf16 b$largest MAE_CUDA_UPLOAD=pageable" \
        env MAE_CUDA_UPLOAD=pageable "$bins/bin/bench" --case base224 --backend cuda-bf16 \
        --batch "$largest" --seconds "$s"
    measure "bench base224 cuda-bf16 b$largest MAE_CUDA_UPLOAD=pinned" \
        env MAE_CUDA_UPLOAD=pinned "$bins/bin/bench" --case base224 --backend cuda-bf16 \
        --batch "$largest" --seconds "$s"
    measure "bench base224 cuda-bf16 b$largest MAE_CUDA_ATTENTION_PREFETCH=off" \
        env MAE_CUDA_ATTENTION_PREFETCH=off "$bins/bin/bench" --case base224 \
        --backend cuda-bf16 --batch "$largest" --seconds "$s"
    # The last block of each (image, head) at 197 tokens (5 rows) split over its four warps in
    # the tail kernels (attention_mma.cu), instead of run by the main kernels with three warps
    # idle: on an H200 (2026-11-28) the split took 0.7 ms a step more, so it is not the default.
    measure "bench base224 cuda-bf16 b$largest MAE_CUDA_ATTENTION_TAIL=split" \
        env MAE_CUDA_ATTENTION_TAIL=split "$bins/bin/bench" --case base224 \
        --backend cuda-bf16 --batch "$largest" --seconds "$s"
    # The attention kernels with one resident block more (fewer registers, spills) and one
    # fewer (more registers, mostly no spills): whether they wait on latency or on issue.
    local occupancy
    for occupancy in more fewer; do
        measure "bench base224 cuda-bf16 b$largest MAE_CUDA_ATTENTION_OCCUPANCY=$occupancy" \
            env MAE_CUDA_ATTENTION_OCCUPANCY=$occupancy "$bins/bin/bench" --case base224 \
            --backend cuda-bf16 --batch "$largest" --seconds "$s"
    done
    measure "bench base224 cuda-bf16 b$largest MAE_CUDA_LAYERNORM_PARTIALS=separate" \
        env MAE_CUDA_LAYERNORM_PARTIALS=separate "$bins/bin/bench" --case base224 \
        --backend cuda-bf16 --batch "$largest" --seconds "$s"
    # Weight gradients that leave the card idle run in chunks of their rows (split_k.rs): the
    # profile's labels give cuBLASLt's waves and the chunks; this is the whole products' rate.
    measure "bench base224 cuda-bf16 b$largest MAE_CUDA_WEIGHT_GRAD_SPLIT=off" \
        env MAE_CUDA_WEIGHT_GRAD_SPLIT=off "$bins/bin/bench" --case base224 \
        --backend cuda-bf16 --batch "$largest" --seconds "$s"
    # cuBLASLt's algorithms and the weight gradients' chunks measured (lt/tuning.rs): the warm-up
    # steps fill the table, the timed steps run its choices; the table lands in the report.
    measure "bench base224 cuda-bf16 b$largest MAE_CUDA_GEMM_TUNE" \
        env MAE_CUDA_GEMM_TUNE="$out/gemm-tune.txt" "$bins/bin/bench" --case base224 \
        --backend cuda-bf16 --batch "$largest" --seconds "$s"
    # The built-in tuning table (lt/tables/: the default where one was made for this cuBLASLt
    # and card) against the heuristic's first choices.
    measure "bench base224 cuda-bf16 b$largest MAE_CUDA_GEMM_TABLE=heuristic" \
        env MAE_CUDA_GEMM_TABLE=heuristic "$bins/bin/bench" --case base224 \
        --backend cuda-bf16 --batch "$largest" --seconds "$s"
    for batch in $composed; do
        measure "bench base224 cuda-bf16 b$batch MAE_CUDA_ATTENTION=composed" \
            env MAE_CUDA_ATTENTION=composed "$bins/bin/bench" --case base224 --backend cuda-bf16 \
            --batch "$batch" --seconds "$s"
    done
    if [ "$large" != 0 ]; then
        measure "bench ViT-L/16 cuda-bf16 b128" "$bins/bin/bench" --case mae_vit_large_patch16 \
            --backend cuda-bf16 --batch 128 --seconds "$s"
        measure "bench ViT-L/16 cuda-bf16 b128 MAE_CUDA_ATTENTION=composed" \
            env MAE_CUDA_ATTENTION=composed \
            "$bins/bin/bench" --case mae_vit_large_patch16 --backend cuda-bf16 --batch 128 \
            --seconds "$s"
        # The largest model's peak memory (issue 6: "report peak memory per model size").
        measure "bench ViT-H/14 cuda-bf16 b64" "$bins/bin/bench" --case mae_vit_huge_patch14 \
            --backend cuda-bf16 --batch 64 --seconds "$s"
    fi
    if python3 -c 'import torch, timm' 2>/dev/null; then
        local torch_batches
        torch_batches=$(echo "$batches" | tr ' ' ',')
        [ "$quick" = 1 ] && torch_batches=$largest
        measure "torch base224 bf16 autocast" python3 bench/torch_reference.py --case base224 \
            --device cuda --amp bf16 --batch "$torch_batches" --seconds "$s"
        [ "$quick" = 1 ] || measure "torch base224 f32 b64" python3 bench/torch_reference.py \
            --case base224 --device cuda --batch 64 --seconds "$s"
        if [ "$large" != 0 ]; then
            measure "torch ViT-L/16 bf16 b128" python3 bench/torch_reference.py \
                --case mae_vit_large_patch16 --device cuda --amp bf16 --batch 128 --seconds "$s"
            measure "torch ViT-H/14 bf16 b64" python3 bench/torch_reference.py \
                --case mae_vit_huge_patch14 --device cuda --amp bf16 --batch 64 --seconds "$s"
        fi
    else
        echo "| torch | FAIL (python3 cannot import torch and timm) | 0 | - |" >>"$report"
        failed=1
    fi
    # The A/B settings again under the profiler, into profile-ab.log: each kernel's and
    # product's own time beside the default's (`kernel_ab` in the report). A setting that
    # changes one kernel by 20 % moves the step's rate by a few per cent, no more than the rates
    # move between runs; a kernel's mean time and the device time per step move far less. The
    # tuning table is the one the bench run above filled, so nothing is timed anew.
    local setting
    for setting in MAE_CUDA_ATTENTION_OCCUPANCY=more MAE_CUDA_ATTENTION_OCCUPANCY=fewer \
        MAE_CUDA_ATTENTION_PREFETCH=off MAE_CUDA_ATTENTION_TAIL=split \
        MAE_CUDA_LAYERNORM_PARTIALS=separate MAE_CUDA_WEIGHT_GRAD_SPLIT=off \
        "MAE_CUDA_GEMM_TUNE=$out/gemm-tune.txt" MAE_CUDA_GEMM_TABLE=heuristic; do
        step "profile base224 cuda-bf16 train b$largest ${setting%%=/*}" profile-ab.log 60 \
            env MAE_CUDA_PROFILE=1 "$setting" "$bins/bin/bench" --case base224 \
            --backend cuda-bf16 --batch "$largest" --seconds 1 --phase train
    done

    # Why the slowest kernels are slow: Nsight Compute's counters for one launch of each
    # (scripts/ncu-kernel.sh; the report's ncu section), where ncu is on the machine and may
    # read them (KINDS.md: a Firecracker machine, not gVisor). The first that makes no report
    # ends the part, which fails nothing. GPU_CHECK_NCU lists the kernels; empty skips the part.
    local kernel ncu_kernels=${GPU_CHECK_NCU-attention_forward_mma_bf16_hd32 \
attention_backward_dq_mma_bf16_hd32 attention_backward_dkv_mma_bf16_hd32 \
attention_forward_mma_bf16_hd64 layernorm_backward_dx layernorm_forward gelu_forward_f32}
    if [ -n "$ncu_kernels" ] && ! command -v ncu >/dev/null; then
        echo "| ncu | not run: no ncu on this machine | 0 | - |" >>"$report"
        ncu_kernels=
    fi
    for kernel in $ncu_kernels; do
        selected "ncu $kernel b$largest" || continue
        SOFT=1 step "ncu $kernel b$largest" ncu.log 60 "$ROOT/scripts/ncu-kernel.sh" \
            "$out" "$kernel" \
            "$bins/bin/bench" --case base224 --backend cuda-bf16 --batch "$largest" \
            --seconds 0.2 --phase train
        [ -s "$out/ncu-$kernel.csv" ] || break
    done

    # Late: every kernel for every architecture the backend supports (96 s on an H200); the
    # card's own architecture was compiled by every step before.
    step "kernels compile with NVRTC" backend.log 120 "$bins/tests/nvrtc_compile-test" --nocapture
    [ "$quick" = 1 ] && { summary; return $failed; }

    # The wgpu backend on this GPU through NVIDIA's Vulkan driver (issue 4): its own tests (which
    # force every GEMM kernel and row-kernel variant) and the conformance suites' wgpu
    # instances, then `bench` with the default GEMM choice and with each GPU kernel
    # (MAE_WGPU_GEMM), next to `cuda` (f32) above, and a MAE_WGPU_PROFILE table.
    # GPU_CHECK_WGPU=0 skips this part (a change that leaves the wgpu backend alone).
    if [ "${GPU_CHECK_WGPU:-1}" != 0 ]; then
        vulkan_setup >>"$out/wgpu.log" 2>&1
        step "wgpu backend unit tests" wgpu.log 60 env MAE_REQUIRE_BACKENDS=wgpu \
            "$bins/tests/mae_backend_wgpu-lib"
        for suite in ops gradcheck golden; do
            step "conformance $suite (wgpu)" wgpu.log 60 env MAE_REQUIRE_BACKENDS=wgpu \
                MAE_GOLDEN_DIR="${golden_dirs[0]}" "$bins/tests/$suite-test" wgpu
        done
        step "golden --backend wgpu on ${golden_dirs[0]}" wgpu.log 60 \
            "$bins/bin/golden" --backend wgpu "${golden_dirs[0]}"/*.safetensors
        # Each GPU GEMM kernel on the products of one base224 batch-64 step, side by side.
        step "wgpu GEMM kernels per product" wgpu.log 60 env MAE_REQUIRE_BACKENDS=wgpu \
            "$bins/tests/mae_backend_wgpu-lib" timing_gemm --ignored --nocapture
        local gemm
        for gemm in default ${GPU_CHECK_WGPU_GEMMS:-wide tiled}; do
            if [ "$gemm" = default ]; then
                measure "bench base224 wgpu b64" "$bins/bin/bench" --case base224 --backend wgpu \
                    --batch 64 --seconds "$s"
            else
                measure "bench base224 wgpu b64 MAE_WGPU_GEMM=$gemm" env MAE_WGPU_GEMM=$gemm \
                    "$bins/bin/bench" --case base224 --backend wgpu --batch 64 --seconds "$s"
            fi
            # No adapter: the other ways would fail the same way.
            grep -q 'no wgpu adapter\|NoDevice' "$out/bench.log" && break
        done
        step "profile base224 wgpu b64" profile.log 90 \
            env MAE_WGPU_PROFILE=1 "$bins/bin/bench" --case base224 --backend wgpu --batch 64 \
            --seconds 1
    fi

    # Data parallel through NCCL with one rank: bitwise the single-process run.
    step "dp-check (NCCL, one rank)" dp.log 120 env OUT=/tmp scripts/dp-check.sh "$bins/bin/pretrain"

    # Last, with what is left of the budget: the suites, which take longest.
    # Only the cuda instances (test paths containing "cuda"); CI runs the CPU ones.
    local suite
    for suite in gradcheck embed golden variants training; do
        step "conformance $suite (cuda)" conformance.log 90 \
            env MAE_GOLDEN_DIR="${golden_dirs[0]}" "$bins/tests/$suite-test" cuda
    done

    summary
    return $failed
}

# The report's summaries of the logs of `run`, and the verdict (uses run's locals).
summary() {
    {
        echo
        echo "## golden summary"
        echo '```'
        grep -E '^(==|golden|PASS|FAIL)' "$out/golden.log" 2>/dev/null
        echo '```'
        echo
        echo "## bench (peak_gpu_mb: the most nvidia-smi saw in use while the step ran)"
        echo '```'
        grep -hE '^(\{|== bench)' "$out/bench.log" "$out/wgpu.log" 2>/dev/null || tail -n 5 "$out/bench.log"
        echo '```'
        echo
        echo "## wgpu and dp-check"
        echo '```'
        grep -E '^== (VK|loader|unpacked)' "$out/wgpu.log" 2>/dev/null
        grep -vE '^(\{|==)' "$out/wgpu.log" 2>/dev/null | tail -n 8
        tail -n 3 "$out/dp.log" 2>/dev/null
        echo '```'
        echo
        echo "## profile"
        echo '```'
        # Each table's first 34 lines: the device time per op, then (CUDA) each kernel's
        # registers, spills and resident blocks as the driver compiled it.
        grep -E -A 34 '^(==|MAE_CUDA_PROFILE|MAE_WGPU_PROFILE)' "$out/profile.log" 2>/dev/null | grep -v '^\{' | head -n 240
        echo '```'
        busy_share
        floor
        targets
        kernel_ab
        if compgen -G "$out/ncu-*.csv" >/dev/null; then
            echo
            echo "## ncu: one launch of each kernel (ncu-*.csv hold every metric)"
            echo
            python3 "$ROOT/scripts/ncu-summary.py" "$out"/ncu-*.csv 2>&1
        fi
        echo
        echo "## GEMM tuning table (MAE_CUDA_GEMM_TUNE: shape, -, waves, us tuned, us of the heuristic's first)"
        echo '```'
        # Entries without their algorithm (opaque words); split lines: key, chunks, us, us as
        # split_k::chunks estimates.
        grep -v '^#' "$out/gemm-tune.txt" 2>/dev/null |
            awk -F'\t' -v OFS='\t' '$1 == "split" || $1 == "made-for" { print; next } { $2 = "-"; print }' | head -n 80
        echo '```'
        echo
        echo "## conformance summary"
        echo '```'
        grep -hE '^(==|test result|    cuda|    wgpu|    tests::)' "$out/backend.log" \
            "$out/conformance.log" "$out/wgpu.log" 2>/dev/null | head -n 100
        echo '```'
        echo
        echo "overall: $([ $failed -eq 0 ] && echo PASS || echo FAIL)"
    } >>"$report"
    cat "$report"
}

# How much of a training step the GPU spends in kernels: the profiled training run's device time
# per step (its table's total over the steps it ran, warm-up included) against the unprofiled
# step at the same batch in bench.log. What is left is the GPU waiting for the host, the share
# that capturing the step in a CUDA graph could recover at most.
busy_share() {
    python3 - "$out/profile.log" "$out/bench.log" <<'PY' 2>/dev/null || true
import json, re, sys
prof, bench = open(sys.argv[1]).read(), open(sys.argv[2]).read()
# The section of the default's profile, whose JSON line may come before or after its table.
sec = re.search(r"^== profile base224 cuda-bf16 train b(\d+)\n(.*?)(?=^== |\Z)", prof, re.S | re.M)
m = sec and re.search(r"MAE_CUDA_PROFILE: device time per op, ([0-9.]+) ms", sec.group(2))
if m:
    batch, device_ms = int(sec.group(1)), float(m.group(1))
    steps = [json.loads(l)["train_steps_run"] for l in sec.group(2).splitlines() if l.startswith("{")]
    rates = [json.loads(l) for l in bench.splitlines() if l.startswith("{")]
    plain = [r["train_img_s"] for r in rates if r.get("backend") == "cuda-bf16" and r.get("case") == "base224" and r.get("batch") == batch]
    if steps and plain:
        busy, wall = device_ms / steps[0], 1000.0 * batch / plain[0]
        # The profile's total counts the warm-up step too: over 100 % leaves no idle time.
        print(f"\nGPU busy in a bf16 training step at batch {batch}: {busy:.1f} ms of {wall:.1f} ms ({100 * busy / wall:.0f} %"
              f"{', the warm-up step included: no idle time to recover' if busy >= wall else ''})")
PY
}

# The step against its floor at the card's peaks, from the profiled training run's totals
# (profile.log): the products' FLOPs at the dense bf16 peak plus the other kernels' bytes (the
# least each moves, traffic.rs) at the memory bandwidth, beside the device time they took.
floor() {
    python3 - "$out/profile.log" "$out/bench.log" <<'PY' 2>/dev/null || true
import json, re, sys
prof, bench = open(sys.argv[1]).read(), open(sys.argv[2]).read()
# The section of the default's profile, whose JSON line may come before or after its table.
sec = re.search(r"^== profile base224 cuda-bf16 train b(\d+)\n(.*?)(?=^== |\Z)", prof, re.S | re.M)
m = sec and re.search(r"MAE_CUDA_PROFILE: totals: products ([0-9.]+) TFLOP in ([0-9.]+) ms; "
                      r"other kernels ([0-9.]+) GB in ([0-9.]+) ms; not counted ([0-9.]+) ms", sec.group(2))
gpu = next((json.loads(l).get("gpu", "") for l in bench.splitlines()
            if l.startswith("{") and json.loads(l).get("gpu")), "")
# Dense bf16 tensor-core peak (TFLOP/s) and memory bandwidth (TB/s) from NVIDIA's data sheets.
peaks = {"H200": (989.4, 4.8), "H100 PCIe": (756.0, 2.0), "H100": (989.4, 3.35)}
peak = next((v for k, v in peaks.items() if k in gpu), None)
if m and peak:
    steps = [json.loads(l)["train_steps_run"] for l in sec.group(2).splitlines() if l.startswith("{")]
    if steps:
        n = steps[0]
        tflop, p_ms, gb, k_ms, rest = (float(m.group(i)) / n for i in range(1, 6))
        f_p, f_k = 1000 * tflop / peak[0], gb / peak[1]
        print(f"\n## the bf16 training step against its floor at batch {sec.group(1)} ({gpu}: {peak[0]} TFLOP/s, {peak[1]} TB/s)\n```")
        print(f"products (GEMMs, attention): {tflop:.3f} TFLOP a step in {p_ms:.2f} ms: "
              f"{tflop / p_ms * 1000:.0f} TFLOP/s, floor {f_p:.2f} ms")
        print(f"other kernels: {gb:.2f} GB a step in {k_ms:.2f} ms: {1000 * gb / max(k_ms, 1e-9):.0f} GB/s, "
              f"floor {f_k:.2f} ms; kernels not counted {rest:.2f} ms")
        print(f"device time {p_ms + k_ms + rest:.2f} ms a step against a floor of {f_p + f_k:.2f} ms")
        print("```")
PY
}

# The profiled A/B runs (profile-ab.log) against the default's profile (profile.log): the
# device time per step of each, and the ops whose time per step moved most, with their mean
# time per call in both.
kernel_ab() {
    python3 - "$out/profile.log" "$out/profile-ab.log" <<'PY' 2>/dev/null || true
import json, re, sys
# total ms, %, calls, mean us, then TFLOP/s and GB/s where the op has them, then the label.
row = re.compile(r"^\s*([\d.]+)\s+[\d.]+\s+(\d+)\s+([\d.]+)\s+(?:[\d.]+\s+){0,2}(\S.*)$")
def sections(text):
    """name -> (steps, {label: (ms per step, mean us)}) of each training profile in text."""
    out = {}
    for part in re.split(r"^== ", text, flags=re.M)[1:]:
        name, _, body = part.partition("\n")
        if "cuda-bf16 train" not in name:
            continue
        steps = [json.loads(l)["train_steps_run"] for l in body.splitlines() if l.startswith("{")]
        table = body.split("MAE_CUDA_PROFILE: device time per op", 1)[-1]
        table = table.split("MAE_CUDA_PROFILE: kernel resources", 1)[0]
        if not steps:
            continue
        ops = {}
        for line in table.splitlines()[2:]:
            m = row.match(line)
            if m:
                ops[m.group(4)] = (float(m.group(1)) / steps[0], float(m.group(3)))
        out[name.strip()] = ops
    return out
base = sections(open(sys.argv[1]).read())
default = next((ops for name, ops in base.items() if name.count(" ") == 4), None)
if default is None:
    sys.exit()
total = sum(ms for ms, _ in default.values())
print("\n## per-op A/B under the profiler (bf16 training step; device ms per step)\n```")
print(f"default: {total:.2f} ms")
for name, ops in sections(open(sys.argv[2]).read()).items():
    t = sum(ms for ms, _ in ops.values())
    print(f"{name.split(' ', 5)[-1]}: {t:.2f} ms ({100 * (t / total - 1):+.1f} %)")
    moved = sorted(set(default) | set(ops),
                   key=lambda l: -abs(ops.get(l, (0, 0))[0] - default.get(l, (0, 0))[0]))
    for label in moved[:8]:
        (a, am), (b, bm) = default.get(label, (0, 0)), ops.get(label, (0, 0))
        if abs(b - a) >= 0.01:
            print(f"    {b - a:+7.2f} ms  {am:9.1f} -> {bm:9.1f} us a call  {label}")
print("```")
PY
}

# Issue 6's two numbers from bench.log, so a reader need not work them out: ours against
# PyTorch eager (bf16 autocast) at each batch both ran, and model-FLOP utilization against the
# card's dense bf16 peak; then every A/B run (an environment setting at the largest batch)
# against the default at that batch.
targets() {
    python3 - "$out/bench.log" <<'PY' 2>/dev/null || true
import json, sys
runs, name = [], ""
for line in open(sys.argv[1]):
    if line.startswith("== "):
        name = line[3:].strip()
    elif line.startswith("{"):
        runs.append((name, json.loads(line)))
# Dense bf16 tensor-core peaks, TFLOP/s (NVIDIA's data sheets, without sparsity).
def peak(gpu):
    if "H200" in gpu or ("H100" in gpu and "PCIe" not in gpu):
        return 989.4
    return 756.0 if "H100" in gpu else None
torch = {r["batch"]: r for n, r in runs if r.get("backend") == "torch" and r.get("amp") == "bf16"
         and r.get("case") == "base224"}
ours = {r["batch"]: r for n, r in runs if n == f"bench base224 cuda-bf16 b{r.get('batch')}"}
gpu = next((r.get("gpu", "") for r in torch.values()), "")
tflops = peak(gpu)
print("\n## issue 6 targets (ViT-B/16, bf16; 1.3x PyTorch eager, 45 % MFU)\n```")
for batch in sorted(ours, reverse=True):
    o, t = ours[batch], torch.get(batch)
    line = f"b{batch}: ours {o['train_img_s']:.0f} img/s"
    if t:
        line += f", PyTorch {t['train_img_s']:.0f} img/s, ratio {o['train_img_s'] / t['train_img_s']:.2f}x"
    if tflops:
        line += f", MFU ours {o['train_gflop_s'] / 10 / tflops:.1f} %"
        if t:
            line += f", PyTorch {t['train_gflop_s'] / 10 / tflops:.1f} %"
    print(line)
if not tflops:
    print(f"no bf16 peak known for {gpu!r}: MFU not computed")
for n, r in runs:
    base = ours.get(r.get("batch"))
    if " MAE_" in n and n.startswith("bench base224 cuda-bf16") and base:
        print(f"{n.split(' ', 4)[-1]}: {r['train_img_s']:.0f} img/s, "
              f"{100 * r['train_img_s'] / base['train_img_s']:.1f} % of the default")
print("```")
PY
}

case "${1:-}" in
build) build ;;
run)
    shift
    run "$@"
    ;;
*) usage ;;
esac
