#!/usr/bin/env python3
"""The kernels' Nsight Compute counters in a few lines each, for gpu-check's report.

    scripts/ncu-summary.py FILE.csv...

Each FILE is `ncu --import REPORT --csv --page raw` of one kernel launch (scripts/ncu-kernel.sh):
a header of metric names, a line of units, a line per launch. Prints, per launch, the duration,
the compute (SM) and memory throughput and DRAM's as shares of the card's peaks, the achieved
occupancy, the share of cycles a scheduler issued, and the stall reasons that cost the most
cycles per issued instruction (smsp__average_warps_issue_stalled_*_per_issue_active: a warp's
cycles between two of its issues, by what held it). A metric this ncu did not give prints as
`-`; the CSV keeps the rest.
"""

import csv
import re
import sys

COLUMNS = [
    ("us", "gpu__time_duration.sum"),
    ("SM %", "sm__throughput.avg.pct_of_peak_sustained_elapsed"),
    ("memory %", "gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed"),
    ("DRAM %", "dram__throughput.avg.pct_of_peak_sustained_elapsed"),
    ("occupancy %", "sm__warps_active.avg.pct_of_peak_sustained_active"),
    ("issue %", "smsp__issue_active.avg.pct_of_peak_sustained_active"),
    ("regs", "launch__registers_per_thread"),
    ("smem conflicts", "l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum"),
]
STALL = re.compile(r"^smsp__average_warps_issue_stalled_(\w+?)_per_issue_active\.ratio$")
TOP_STALLS = 5


def number(text):
    """A value as ncu prints it (thousands separated by commas), or None."""
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def duration_us(value, unit):
    scale = {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3, "second": 1e6}
    return value * scale.get(unit, float("nan"))


def launches(path):
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    # Lines before the header (ncu's own messages) are skipped.
    start = next((i for i, r in enumerate(rows) if "Kernel Name" in r), None)
    if start is None or len(rows) < start + 3:
        return
    names, units = rows[start], rows[start + 1]
    for row in rows[start + 2 :]:
        yield {n: (v, u) for n, v, u in zip(names, row, units)}


def cell(launch, metric):
    value, unit = launch.get(metric, ("", ""))
    v = number(value)
    if v is None:
        return "-"
    if metric == "gpu__time_duration.sum":
        v = duration_us(v, unit)
    return f"{v:.1f}" if abs(v) < 1e5 else f"{v:.3g}"


def stalls(launch):
    found = []
    for metric, (value, _) in launch.items():
        m = STALL.match(metric)
        v = number(value) if m else None
        if v is not None and v > 0:
            found.append((v, m.group(1)))
    found.sort(reverse=True)
    total = sum(v for v, _ in found)
    top = ", ".join(f"{name} {v:.1f}" for v, name in found[:TOP_STALLS])
    return f"{total:.1f}: {top}" if found else "-"


def main(paths):
    header = ["kernel"] + [c for c, _ in COLUMNS] + ["stall cycles per issue: top reasons"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for path in paths:
        for launch in launches(path):
            name = launch.get("Kernel Name", (path, ""))[0]
            cells = [cell(launch, m) for _, m in COLUMNS]
            print("| " + " | ".join([name] + cells + [stalls(launch)]) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
