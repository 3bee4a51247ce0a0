#!/usr/bin/env bash
# Nsight Compute's counters for one launch of one kernel, for gpu-check.sh (issue 6: where the
# kernels lose their time against the card's limits).
#
#   scripts/ncu-kernel.sh DIR KERNEL COMMAND...
#
# Runs COMMAND under `ncu`, profiling the ninth launch of the kernel named exactly KERNEL (the
# first eight, at least a step's worth for every kernel of a ViT step, are skipped so that the
# caches and the memory pool are in their steady state) with the sections that say what
# bounds it: throughput against the card's peaks, occupancy, the scheduler's issue rate, the
# warps' stall reasons, the memory hierarchy. Writes DIR/ncu-KERNEL.csv (every raw metric, `ncu
# --page raw`, for scripts/ncu-summary.py) and fails where ncu made no report: a machine whose
# runtime hides the counters (KINDS.md: gVisor) or an ncu that refuses an option.
# --clock-control none: the card keeps its own clocks, as in every other step.
set -uo pipefail
[ $# -ge 3 ] || { echo "usage: $0 DIR KERNEL COMMAND..." >&2; exit 2; }
dir=$1 kernel=$2
shift 2
rep=$dir/ncu-$kernel
rm -f "$rep.ncu-rep"
ncu --clock-control none --kernel-name "regex:^${kernel}\$" --launch-skip 8 --launch-count 1 \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section SchedulerStats \
    --section WarpStateStats --section MemoryWorkloadAnalysis \
    --force-overwrite --export "$rep" "$@"
rc=$?
if [ ! -s "$rep.ncu-rep" ]; then
    echo "ncu made no report for $kernel (exit $rc)" >&2
    exit 1
fi
# The CSV keeps every metric; the binary report (several MB) would only weigh on what comes back.
ncu --import "$rep.ncu-rep" --csv --page raw >"$rep.csv" || exit 1
rm -f "$rep.ncu-rep"
echo "ncu: $kernel: $(wc -c <"$rep.csv") bytes of metrics in $rep.csv"
