#!/usr/bin/env bash
# Starts a data-parallel job on this machine: N processes of PROGRAM, one per GPU, and waits for
# them (docs/gpu.md, "Multi-GPU data parallel").
#
#   scripts/launch-dp.sh N -- PROGRAM [ARGS...]
#   scripts/launch-dp.sh 8 -- target/release/pretrain --backend cuda --batch-size 64 ...
#
# Process r gets RANK=r, LOCAL_RANK=r (its GPU ordinal), WORLD_SIZE=N and MAE_NCCL_ID_FILE, a
# path in a fresh temporary folder through which rank 0 hands the NCCL id to the others (removed
# at the end). If any rank fails, the others are stopped (they would wait forever in NCCL for
# it) and the script exits with that rank's status; it exits 0 when every rank succeeded.
set -uo pipefail

usage() {
    echo "usage: $0 N -- PROGRAM [ARGS...]   (N processes, one per GPU)" >&2
    exit 2
}
[[ $# -ge 3 && $2 == "--" && $1 =~ ^[1-9][0-9]*$ ]] || usage
n=$1
shift 2

dir=$(mktemp -d "${TMPDIR:-/tmp}/mae-dp.XXXXXX") || exit 1
pids=()
stop_all() {
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null
    done
}
trap 'stop_all; rm -rf "$dir"' EXIT
trap 'echo "launch-dp: interrupted, stopping every rank" >&2; exit 130' INT TERM

export WORLD_SIZE=$n MAE_NCCL_ID_FILE=$dir/nccl-id
for ((r = 0; r < n; r++)); do
    RANK=$r LOCAL_RANK=$r "$@" &
    pids+=($!)
done

# `wait -n` returns as soon as any rank ends, so a failure stops the job at once.
for ((done = 0; done < n; done++)); do
    wait -n
    status=$?
    if [[ $status -ne 0 ]]; then
        echo "launch-dp: a rank exited with status $status; stopping the others" >&2
        exit "$status"
    fi
done
pids=()
echo "launch-dp: all $n rank(s) finished" >&2
