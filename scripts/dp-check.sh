#!/usr/bin/env bash
# The one-rank check of data-parallel pre-training on a GPU (docs/gpu.md, "Multi-GPU data
# parallel"): the same short run of the demo model three times, as a single process and as rank 0
# of 1 through NCCL (gradients averaged during the backward, and with MAE_NCCL_OVERLAP=off after
# it), must end with bitwise identical weights and AdamW moments and the same loss at every
# update. Needs python3 (standard library only) to read the checkpoints.
# About 40 s on an H100.
#
#   scripts/dp-check.sh [PRETRAIN]
#
# PRETRAIN is a `pretrain` built with `--features cuda` (default: dp-check/pretrain, else
# target/release/pretrain). When libcuda, libnvrtc, libcublas, libcublasLt or libnccl is not in the
# loader's cache, their folders (a toolkit, /opt, Python's nvidia wheels) are put on LD_LIBRARY_PATH.
# Writes under ${OUT:-/tmp}/dp-check; prints "dp-check: OK ..." and exits 0 when the runs agree.
set -euo pipefail

pretrain=${1:-}
if [ -z "$pretrain" ]; then
    for p in dp-check/pretrain target/release/pretrain; do
        [ -x "$p" ] && pretrain=$p && break
    done
fi
[ -x "${pretrain:-}" ] || { echo "dp-check: no pretrain binary; pass its path" >&2; exit 2; }

# shellcheck source=cuda-libraries.sh
source "$(dirname "$0")/cuda-libraries.sh"
find_cuda_libraries 'libcuda.so.1' 'libnvrtc.so.1[23]' 'libcublas.so.1[23]' 'libcublasLt.so.1[23]' 'libnccl.so.2'
echo "dp-check: LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"

work=${OUT:-/tmp}/dp-check
rm -rf "$work"
mkdir -p "$work"
args=(--backend cuda --data synthetic:1024 --batch-size 32 --accum-iter 2 --steps 20
    --blr 1e-3 --log-every 1 --save-every 0 --vis-images 0 --seed 5)
unset RANK WORLD_SIZE LOCAL_RANK MAE_NCCL_ID_FILE
"$pretrain" "${args[@]}" --out "$work/single"
RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MAE_NCCL_ID_FILE="$work/nccl-id" \
    "$pretrain" "${args[@]}" --data-parallel --out "$work/parallel"
RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MAE_NCCL_ID_FILE="$work/nccl-id" MAE_NCCL_OVERLAP=off \
    "$pretrain" "${args[@]}" --data-parallel --out "$work/parallel-after"

losses() { grep -o '"loss":[^,}]*' "$1/metrics.jsonl"; }
for run in parallel parallel-after; do
    if ! diff <(losses "$work/single") <(losses "$work/$run") >"$work/loss.diff"; then
        echo "dp-check: FAILED: the losses differ (single < > $run):" >&2
        cat "$work/loss.diff" >&2
        exit 1
    fi
done
# The tensors (weights, AdamW moments) bit for bit, and the update count and masking generator
# (the metadata's key order varies between saves, so the files are compared by content).
same_checkpoints() {
    python3 - "$1" "$2" <<'PY'
import json, struct, sys
def read(path):
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", {})
    data = raw[8 + n:]
    return meta, {k: data[v["data_offsets"][0]:v["data_offsets"][1]] for k, v in header.items()}
(ma, ta), (mb, tb) = read(sys.argv[1]), read(sys.argv[2])
bad = [k for k in sorted(set(ta) | set(tb)) if ta.get(k) != tb.get(k)]
bad += [k for k in ("step", "rng_state") if ma.get(k) != mb.get(k)]
print(f"dp-check: {len(ta)} tensors compared, step {ma.get('step')}" + (f"; differ: {bad[:8]}" if bad else ""))
sys.exit(1 if bad or not ta else 0)
PY
}
for run in parallel parallel-after; do
    if ! same_checkpoints "$work/single/checkpoint.safetensors" "$work/$run/checkpoint.safetensors"; then
        echo "dp-check: FAILED: the checkpoints of single and $run differ" >&2
        exit 1
    fi
done
echo "dp-check: OK: $(losses "$work/single" | wc -l) updates, the same loss at each" \
    "($(losses "$work/single" | tail -n 1)), bitwise identical weights and moments," \
    "averaging during and after the backward"
