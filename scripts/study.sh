#!/usr/bin/env bash
# The small-scale study of docs/results.md ("What did the encoder learn"): CIFAR-10, 2 CPU cores.
#
#   scripts/study.sh STAGE...     stages: ratios sampling probe finetune speed seeds light (or all)
#
# A stage skips the runs whose results already exist, so an interrupted study continues.
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
          --save-every 0 --log-every 50 --vis-images 0)

timed() { # timed NAME COMMAND...: runs COMMAND, keeping its output and CPU seconds
    local name=$1; shift
    echo "== $name: $*"
    /usr/bin/time -f "$name cpu_s=%U+%S wall_s=%e max_rss_kb=%M" -a -o "$STUDY/times.txt" \
        "$@" 2>&1 | tee "$STUDY/$name.log" | grep -v '^\s*$' | tail -3
}

stage_ratios() { # Figure 5: mask ratio 0.25 .. 0.9, random sampling
    for r in 0.75 0.9 0.5 0.25; do
        [ -f "$STUDY/mask-$r/checkpoint.safetensors" ] && continue
        timed "pretrain-mask-$r" $BIN/pretrain "${PRETRAIN[@]}" --seed 0 --mask-ratio $r \
            --out "$STUDY/mask-$r"
    done
}

stage_sampling() { # Table 1f: block and grid sampling at ratio 0.75 (random is mask-0.75)
    for m in block grid; do
        [ -f "$STUDY/sampling-$m/checkpoint.safetensors" ] && continue
        timed "pretrain-sampling-$m" $BIN/pretrain "${PRETRAIN[@]}" --seed 0 --mask-sampling $m \
            --out "$STUDY/sampling-$m"
    done
}

# Linear probing (Table 9's protocol on frozen cls features; see docs/results.md for the
# settings): every pre-trained encoder, a random-init encoder and the raw pixels.
PROBE=(--epochs 90 --warmup-epochs 10 --batch-size 256 --optimizer sgd --blr 0.1)
ENCODERS=(mask-0.25 mask-0.5 mask-0.75 mask-0.9 sampling-block sampling-grid random-init pixels)

embed_split() { # embed_split NAME SPLIT DATAFILE
    local name=$1 split=$2 file=$3 source
    case $name in
        random-init) source=(--random-init --model demo --seed 0) ;;
        pixels) source=(--pixels --model demo) ;;
        *) source=(--checkpoint "$STUDY/$name") ;;
    esac
    [ -f "$STUDY/features/$name-$split.safetensors" ] && return 0
    timed "embed-$name-$split" $BIN/embed "${source[@]}" --data "$DATA/$file" \
        --out "$STUDY/features/$name-$split.safetensors"
}

stage_probe() {
    mkdir -p "$STUDY/features" "$STUDY/probe"
    for name in "${ENCODERS[@]}"; do
        embed_split "$name" train train_10k.bin
        embed_split "$name" test test.bin
        timed "linprobe-$name" $BIN/linprobe "${PROBE[@]}" --seed 0 \
            --train "$STUDY/features/$name-train.safetensors" \
            --test "$STUDY/features/$name-test.safetensors" --out "$STUDY/probe/$name.json"
    done
}

# Fine-tuning (Table 8's recipe, shortened): from the ratio-0.75 MAE and from scratch.
FINETUNE=(--data "$DATA/train_10k.bin" --eval-data "$DATA/test.bin" --batch-size 64 --eval-every 5
          --seed 0 --log-every 50)

stage_finetune() {
    [ -f "$STUDY/finetune-mae/result.json" ] ||
        timed finetune-mae $BIN/finetune "${FINETUNE[@]}" --epochs 25 --warmup-epochs 3 \
            --checkpoint "$STUDY/mask-0.75" \
            --out "$STUDY/finetune-mae"
    [ -f "$STUDY/finetune-scratch/result.json" ] ||
        timed finetune-scratch $BIN/finetune "${FINETUNE[@]}" --epochs 25 --warmup-epochs 3 \
            --model demo \
            --out "$STUDY/finetune-scratch"
}

stage_light() { # the same fine-tuning, 10 epochs, without mixup, cutmix, RandAugment, erasing
    local light=(--epochs 10 --warmup-epochs 1 --mixup 0 --cutmix 0 --randaug false --reprob 0)
    [ -f "$STUDY/finetune-light-mae/result.json" ] ||
        timed finetune-light-mae $BIN/finetune "${FINETUNE[@]}" "${light[@]}" \
            --checkpoint "$STUDY/mask-0.75" --out "$STUDY/finetune-light-mae"
    [ -f "$STUDY/finetune-light-scratch/result.json" ] ||
        timed finetune-light-scratch $BIN/finetune "${FINETUNE[@]}" "${light[@]}" --model demo \
            --out "$STUDY/finetune-light-scratch"
}

stage_speed() { # Table 2: encoder without vs with mask tokens, ViT-L/16 and the demo model
    timed speed-vit-large $BIN/bench --mask-tokens mae_vit_large_patch16 --batch 2 --seconds 20
    timed speed-demo $BIN/bench --mask-tokens demo --batch 64 --seconds 20
}

stage_seeds() { # the spread of one setting: ratio 0.75 pre-trained with seed 1, probes seeds 1-2
    [ -f "$STUDY/mask-0.75-seed1/checkpoint.safetensors" ] ||
        timed pretrain-mask-0.75-seed1 $BIN/pretrain "${PRETRAIN[@]}" --seed 1 \
            --out "$STUDY/mask-0.75-seed1"
    embed_split mask-0.75-seed1 train train_10k.bin
    embed_split mask-0.75-seed1 test test.bin
    timed linprobe-mask-0.75-seed1 $BIN/linprobe "${PROBE[@]}" --seed 0 \
        --train "$STUDY/features/mask-0.75-seed1-train.safetensors" \
        --test "$STUDY/features/mask-0.75-seed1-test.safetensors" \
        --out "$STUDY/probe/mask-0.75-seed1.json"
    for seed in 1 2; do
        timed "linprobe-mask-0.75-probe-seed$seed" $BIN/linprobe "${PROBE[@]}" --seed $seed \
            --train "$STUDY/features/mask-0.75-train.safetensors" \
            --test "$STUDY/features/mask-0.75-test.safetensors" \
            --out "$STUDY/probe/mask-0.75-probe-seed$seed.json"
    done
}

cargo build --release -p mae-examples --quiet
stages=("$@"); [ "${stages[*]:-all}" = all ] && stages=(ratios sampling probe finetune speed seeds light)
for s in "${stages[@]}"; do "stage_$s"; done
