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
#   ROUNDS           how many times each program runs per case, alternating (default 3)
#
# A shared VM's speed drifts by tens of percent within minutes (other tenants' load), so one
# run of each program can compare two different machines. The rounds alternate the programs,
# and the summary line gives, per phase, the median of the rounds' ratios (each one of two
# neighbouring runs) and the ratio of each program's best run.
set -euo pipefail
cd "$(dirname "$0")/.."

cases=("$@")
[ ${#cases[@]} -eq 0 ] && cases=(tiny32 small64 base224)
threads="${MAE_CPU_THREADS:-2}"
seconds="${SECONDS_PER_RUN:-10}"
rounds="${ROUNDS:-3}"
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
    lines=()
    for _ in $(seq "$rounds"); do
        ours=$("$bench" --case "$case" --seconds "$seconds")
        torch=$("$venv/bin/python" bench/torch_reference.py --case "$case" --seconds "$seconds" \
            --threads "$threads")
        echo "$ours"
        echo "$torch"
        lines+=("$ours" "$torch")
    done
    python3 - "${lines[@]}" <<'PY'
import json, statistics, sys
runs = [json.loads(line) for line in sys.argv[1:]]
ours, torch = runs[0::2], runs[1::2]
case = ours[0]["case"]
parts = []
for phase in ("train", "embed"):
    key = f"{phase}_img_s"
    ratios = [a[key] / b[key] for a, b in zip(ours, torch)]
    best_a, best_b = max(a[key] for a in ours), max(b[key] for b in torch)
    parts.append(
        f"{phase} {best_a:.2f} vs {best_b:.2f} img/s (best runs) = {best_a / best_b:.2f}x, "
        f"median of {len(ratios)} paired ratios {statistics.median(ratios):.2f}x "
        f"({', '.join(f'{r:.2f}' for r in ratios)})")
line = f"{case}: " + "; ".join(parts)
if all("train_peak_rss_mb" in r for r in runs):
    line += (f"; training peak RSS {max(a['train_peak_rss_mb'] for a in ours):.0f} vs "
             f"{max(b['train_peak_rss_mb'] for b in torch):.0f} MiB")
print(line)
PY
done
