#!/usr/bin/env bash
# What points.stats() costs an earn: the same pgbench earn workload with the
# counters on and off (points.track_stats, per session through PGOPTIONS),
# alternated in one cluster; prints each round's ratio and the median.
# Usage (PG* variables point at a cluster with the extension preloaded and
# created): bench/stats_ab.sh [rounds] [seconds] [clients]
set -euo pipefail
rounds=${1:-8} secs=${2:-6} clients=${3:-8}
script=$(mktemp); trap 'rm -f "$script"' EXIT
printf '\\set u random(1, 100000)\nSELECT points.earn(:u, 10);\n' > "$script"
tps() { PGOPTIONS="-c points.track_stats=$1" pgbench -n -c "$clients" -j 2 -T "$secs" -f "$script" 2>&1 |
        sed -n 's/^tps = \([0-9.]*\).*/\1/p'; }
tps on >/dev/null   # warm up
ratios=()
for r in $(seq "$rounds"); do
    off=$(tps off); on=$(tps on)
    ratio=$(awk -v a="$on" -v b="$off" 'BEGIN { printf "%.3f", a / b }')
    echo "round $r: off $off tps, on $on tps, on/off $ratio"
    ratios+=("$ratio")
done
printf '%s\n' "${ratios[@]}" | sort -n | awk '{ v[NR] = $1 } END {
    m = NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
    printf "median on/off %.3f (spread %.3f-%.3f)\n", m, v[1], v[NR] }'
