#!/usr/bin/env bash
# The small-scale study of docs/results.md ("What did the encoder learn"): CIFAR-10, 2 CPU cores.
#
#   scripts/study.sh STAGE...     stages: ratios sampling probe finetune speed (or all)
#
# Every run writes to $STUDY_DIR (default runs/study) and logs its CPU time there; the
# numbers in docs/results.md come from these logs. Release binaries are built first.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${MAE_DATA_DIR:-../shared/data}/cifar10
STUDY=${STUDY_DIR:-runs/study}
BIN=target/release
mkdir -p "$STUDY"

# Pre-training: the demo ViT (img 32, patch 4, 4 blocks of 96, decoder 2 x 64), 20 epochs of
# the 10k training images, base lr 1.5e-3 at batch 64, two warmup epochs.
PRETRAIN=(--data "$DATA/train_10k.bin" --model demo --epochs 20 --warmup-epochs 2 --blr 1.5e-3
          --seed 0 --save-every 0 --log-every 50 --vis-images 0)

timed() { # timed NAME COMMAND...: runs COMMAND, keeping its output and CPU seconds
    local name=$1; shift
    echo "== $name: $*"
    /usr/bin/time -f "$name cpu_s=%U+%S wall_s=%e max_rss_kb=%M" -a -o "$STUDY/times.txt" \
        "$@" 2>&1 | tee "$STUDY/$name.log" | grep -v '^\s*$' | tail -3
}

stage_ratios() { # Figure 5: mask ratio 0.25 .. 0.9, random sampling
    for r in 0.75 0.9 0.5 0.25; do
        [ -f "$STUDY/mask-$r/checkpoint.safetensors" ] && continue
        timed "pretrain-mask-$r" $BIN/pretrain "${PRETRAIN[@]}" --mask-ratio $r --out "$STUDY/mask-$r"
    done
}

cargo build --release -p mae-examples --quiet
stages=("$@"); [ "${stages[*]:-all}" = all ] && stages=(ratios sampling probe finetune speed)
for s in "${stages[@]}"; do "stage_$s"; done
