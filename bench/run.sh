#!/usr/bin/env bash
# bench/run.sh [--quick] [--only W1,W2,...] - the benchmarks of points
#
# As root, from a checkout: installs what it needs with apt-get, builds and
# installs the extension and the helpers, creates a throwaway cluster with
# pg_virtualenv (fsync=on, synchronous_commit=on, the library preloaded),
# runs the workloads (bench/workloads.sh) and prints the table.
#
#   --quick        one short run of each side (a smoke run, ~3 minutes)
#   --only LIST    only these workloads: W1..W8, Q1 (queued earns on a hot
#                  user), Q2 (the campaign); the set-up always runs
#   --profile      also preload pg_stat_statements (track = all) and save
#                  the top statements of each workload in the results
#                  directory (pgss-W.txt); adds overhead to both sides
#
# Environment: BENCH_OUT (where results go; default /tmp/points-bench.PID),
# BENCH_PORT (default 5460), BENCH_REDIS_PORT (default 6460),
# BENCH_NO_INSTALL=1 (use the installed extension as it is).
# Everything talks to 127.0.0.1 only.
set -euo pipefail

BENCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH/.." && pwd)
QUICK=0
ONLY=
PROFILE=0
while [[ $# -gt 0 ]]; do
    case $1 in
    --quick) QUICK=1 ;;
    --only) ONLY=${2:?--only needs a list}; shift ;;
    --only=*) ONLY=${1#--only=} ;;
    --profile) PROFILE=1 ;;
    -h | --help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "run.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
ONLY=$(echo "$ONLY" | tr 'a-z' 'A-Z')

if [[ $(id -u) != 0 ]]; then
    echo "run.sh: run as root (it installs packages and runs pg_virtualenv)" >&2
    exit 1
fi

# ---- packages (Debian) ---------------------------------------------------------
PACKAGES=(
    postgresql-15 postgresql-server-dev-15 postgresql-client-15 postgresql-contrib
    libpq-dev librdkafka-dev kcat pkg-config build-essential
    redis-server libhiredis-dev
)
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [[ ${#missing[@]} -gt 0 ]]; then
    echo "run.sh: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# ---- build ---------------------------------------------------------------------
export PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
if [[ ${BENCH_NO_INSTALL:-0} != 1 ]]; then
    if ! { make -s -C "$ROOT" PG_CONFIG=$PG_CONFIG && make -s -C "$ROOT" PG_CONFIG=$PG_CONFIG install >/dev/null; }; then
        [[ -f $($PG_CONFIG --pkglibdir)/points.so ]] || { echo "run.sh: the build failed" >&2; exit 1; }
        echo "run.sh: the build failed; benchmarking the installed points.so" >&2
    fi
fi
make -s -C "$ROOT/test/kafka" >/dev/null
make -s -C "$BENCH" >/dev/null

# ---- the cluster and the workloads ---------------------------------------------------
OUT=${BENCH_OUT:-/tmp/points-bench.$$}
mkdir -p "$OUT"
echo "run.sh: results in $OUT" >&2
export BENCH_OUT=$OUT BENCH_QUICK=$QUICK BENCH_ONLY=$ONLY BENCH_PROFILE=$PROFILE
export BENCH_REDIS_PORT=${BENCH_REDIS_PORT:-6460}
export PGPORT=${BENCH_PORT:-5460}
PRELOAD=points
PROFILE_OPTS=()
if [[ $PROFILE == 1 ]]; then
    PRELOAD="points,pg_stat_statements"
    PROFILE_OPTS=(-o pg_stat_statements.track=all -o track_io_timing=on)
fi
# BENCH_PG_OPTS="name=value ..." adds server settings (for experiments)
for o in ${BENCH_PG_OPTS:-}; do PROFILE_OPTS+=(-o "$o"); done
cd /tmp
pg_virtualenv -t \
    -o fsync=on -o synchronous_commit=on \
    -o "shared_preload_libraries=$PRELOAD" "${PROFILE_OPTS[@]}" \
    -o shared_buffers=1GB -o max_connections=200 \
    -o max_wal_size=8GB -o min_wal_size=4GB -o checkpoint_timeout=30min -o log_checkpoints=on \
    -o "points.expire_interval=1h" -o "points.archive_interval=1h" \
    -c "-p $PGPORT" \
    bash "$BENCH/workloads.sh"
