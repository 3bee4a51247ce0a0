#!/usr/bin/env bash
# Runs `bench` (this project, CPU backend) and bench/torch_reference.py (the official MAE in
# PyTorch, eager fp32) one after the other on the same machine, per case, and prints both JSON
# lines and the ratios.
#
#   bench/compare.sh [CASE...]            # default: tiny32 small64 base224
#
# Environment:
#   MAE_TORCH_VENV   a virtual environment with torch and timm (default: bench/.venv, created
#                    on first use with the CPU wheel of torch and timm from PyPI)
#   MAE_CPU_THREADS  threads for both programs (default 2; also sets MATMUL_NUM_THREADS for the
#                    GEMM and torch.set_num_threads)
#   SECONDS_PER_RUN  timing window of each phase (default 10)
set -euo pipefail
cd "$(dirname "$0")/.."

cases=("$@")
[ ${#cases[@]} -eq 0 ] && cases=(tiny32 small64 base224)
threads="${MAE_CPU_THREADS:-2}"
seconds="${SECONDS_PER_RUN:-10}"
venv="${MAE_TORCH_VENV:-bench/.venv}"

if [ ! -x "$venv/bin/python" ]; then
    echo "== creating $venv (torch CPU wheel + timm)" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip
    # The CPU-only wheel (no CUDA libraries to load); PyPI's default wheel is the fallback.
    "$venv/bin/pip" install --quiet --timeout 15 --retries 0 torch \
        --index-url https://download.pytorch.org/whl/cpu \
        || "$venv/bin/pip" install --quiet torch
    "$venv/bin/pip" install --quiet timm
fi

cargo build --release -p mae-examples --bin bench >&2
bench="${CARGO_TARGET_DIR:-target}/release/bench"

export MAE_CPU_THREADS="$threads" MATMUL_NUM_THREADS="$threads"
echo "== $(nproc) CPUs, load average: $(cut -d' ' -f1-3 /proc/loadavg), threads $threads" >&2
for case in "${cases[@]}"; do
    ours=$("$bench" --case "$case" --seconds "$seconds")
    torch=$("$venv/bin/python" bench/torch_reference.py --case "$case" --seconds "$seconds" \
        --threads "$threads")
    echo "$ours"
    echo "$torch"
    python3 - "$ours" "$torch" <<'PY'
import json, sys
a, b = json.loads(sys.argv[1]), json.loads(sys.argv[2])
line = f"{a['case']}: train {a['train_img_s']:.2f} vs {b['train_img_s']:.2f} img/s " \
       f"= {a['train_img_s'] / b['train_img_s']:.2f}x, " \
       f"embed {a['embed_img_s']:.2f} vs {b['embed_img_s']:.2f} img/s " \
       f"= {a['embed_img_s'] / b['embed_img_s']:.2f}x"
if "train_peak_rss_mb" in a and "train_peak_rss_mb" in b:
    line += f", training peak RSS {a['train_peak_rss_mb']:.0f} vs {b['train_peak_rss_mb']:.0f} MiB"
print(line)
PY
done
