#!/usr/bin/env bash
# Every test of points, each suite on its own throwaway cluster:
#   regress   pg_regress files (sql/ + expected/) and isolation specs
#             (test/isolation), library preloaded
#   pgtap     the schema contract (test/pgtap), with pg_prove
#   stress    randomized load with a live invariant checker (test/stress)
#   tap       crash, worker, queue and Kafka tests (test/t), as user postgres
#   monitoring  Prometheus rules (promtool) and the real exporter's scrape
#   valgrind  the pg_regress files against a server under valgrind memcheck;
#             fails on an error in the extension's code (test/valgrind.sh)
# Usage: test/all.sh [suite ...]     (default: all; SKIP_SETUP=1 skips setup)
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

[ "${SKIP_SETUP:-0}" = 1 ] || bash scripts/setup.sh || exit 1

PRELOAD="shared_preload_libraries=points"
suites=("$@")
[ ${#suites[@]} -gt 0 ] || suites=(regress pgtap stress tap monitoring valgrind)

suite_regress() {
    pg_virtualenv -t -o "$PRELOAD" -c '-p 5451' make -s installcheck
}

suite_pgtap() {
    pg_virtualenv -t -o "$PRELOAD" -c '-p 5452' sh -c \
        'psql -qX -c "CREATE EXTENSION points" -c "CREATE EXTENSION pgtap" && pg_prove test/pgtap/*.sql'
}

suite_stress() {
    [ -x test/stress/run_local.sh ] || { echo "no stress test"; return 1; }
    bash test/stress/run_local.sh 5453
}

suite_monitoring() {
    bash test/monitoring.sh
}

suite_valgrind() {
    bash test/valgrind.sh
}

suite_tap() {
    [ -x test/tap.sh ] || { echo "no tap tests"; return 1; }
    bash test/tap.sh
}

passed=0 failed=0 failures=()
for s in "${suites[@]}"; do
    echo ">>> $s"
    start=$(date +%s)
    if "suite_$s"; then
        passed=$((passed + 1)); echo ">>> $s: ok ($(( $(date +%s) - start ))s)"
    else
        failed=$((failed + 1)); failures+=("$s"); echo ">>> $s: FAILED ($(( $(date +%s) - start ))s)"
        for f in regression.diffs output_iso/regression.diffs; do
            [ -f "$f" ] && { echo "--- $f"; head -200 "$f"; }
        done
    fi
done
[ ${#failures[@]} -eq 0 ] || echo "failed suites: ${failures[*]}"
echo "suites: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
