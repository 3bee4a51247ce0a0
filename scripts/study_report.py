#!/usr/bin/env python3
"""Prints the tables of docs/results.md's study from the outputs of scripts/study.sh.

    python3 scripts/study_report.py [STUDY_DIR]      (default runs/study)
"""
import json
import re
import sys
from pathlib import Path

study = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/study")


def last_loss(run):
    lines = (study / run / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1])["loss"]


def probe(name):
    path = study / "probe" / f"{name}.json"
    if not path.exists():
        return None
    r = json.loads(path.read_text())
    return 100 * r["test"]["top1"], 100 * r["test"]["top5"]


def pct(x):
    return "–" if x is None else f"{x[0]:.2f} | {x[1]:.2f}"


print("| pre-training | final train loss (masked patches) | probe top-1 % | top-5 % |")
print("|---|---|---|---|")
for r in ["0.25", "0.5", "0.75", "0.9"]:
    print(f"| mask ratio {r}, random | {last_loss('mask-' + r):.4f} | {pct(probe('mask-' + r))} |")
print()
print("| features | probe top-1 % | top-5 % |")
print("|---|---|---|")
for name, what in [("mask-0.75", "MAE encoder (mask 0.75)"), ("random-init", "random-init encoder"),
                   ("pixels", "raw pixels (3,072 values)")]:
    print(f"| {what} | {pct(probe(name))} |")
print()
print("| sampling (ratio 0.75) | final train loss | probe top-1 % | top-5 % |")
print("|---|---|---|---|")
for name, run in [("random", "mask-0.75"), ("block", "sampling-block"), ("grid", "sampling-grid")]:
    print(f"| {name} | {last_loss(run):.4f} | {pct(probe(run))} |")
print()
print("| fine-tuning | top-1 % after each 5 epochs | final top-1 % | top-5 % |")
print("|---|---|---|---|")
for name, what in [("finetune-mae", "from the MAE (mask 0.75), 25 epochs, full recipe"),
                   ("finetune-scratch", "from scratch, 25 epochs, full recipe"),
                   ("finetune-light-mae", "from the MAE (mask 0.75), 10 epochs, light"),
                   ("finetune-light-scratch", "from scratch, 10 epochs, light")]:
    path = study / name / "result.json"
    if path.exists():
        r = json.loads(path.read_text())
        curve = ", ".join(f"{100 * e['top1']:.1f}" for e in r["evaluations"])
        print(f"| {what} | {curve} | {100 * r['top1']:.2f} | {100 * r['top5']:.2f} |")
print()
print("| spread at ratio 0.75 | probe top-1 % | top-5 % |")
print("|---|---|---|")
for name, what in [("mask-0.75", "pre-training seed 0, probe seed 0"),
                   ("mask-0.75-seed1", "pre-training seed 1, probe seed 0"),
                   ("mask-0.75-probe-seed1", "pre-training seed 0, probe seed 1"),
                   ("mask-0.75-probe-seed2", "pre-training seed 0, probe seed 2")]:
    print(f"| {what} | {pct(probe(name))} |")
print()
for name in ["speed-vit-large", "speed-demo"]:
    path = study / f"{name}.log"
    if path.exists():
        for line in path.read_text().splitlines():
            if line.startswith("{"):
                print(line)
print()
total = 0.0
for line in (study / "times.txt").read_text().splitlines():
    m = re.search(r"cpu_s=([\d.]+)\+([\d.]+) wall_s=([\d.]+)", line)
    if m:
        cpu = float(m.group(1)) + float(m.group(2))
        total += cpu
        print(f"{line.split()[0]}: {cpu:.0f} CPU-s, {float(m.group(3)):.0f} s wall")
print(f"total: {total:.0f} CPU-s = {total / 60 / 2:.1f} min of 2 cores")
