#!/bin/bash
# Randomized stress of the points extension with a live invariant checker.
#
#   test/stress/run.sh [--seconds N] [--clients N]
#
# Runs against the cluster the PG* environment variables point at (as a
# superuser; the database gets CREATE EXTENSION IF NOT EXISTS points and a
# fresh schema "stress").  For --seconds (default 20), three pgbench
# processes run at once:
#   workload  --clients (default 8) clients calling earn, use, partial and
#             full cancels, idempotent replays, PT002 probes, transactions
#             that hold a hot user (others time out with 55P03), rolled-back
#             calls, REPEATABLE READ and SERIALIZABLE callers (40001 is
#             retried); hot users 1..5, cold users 1000..100000; a quarter of
#             the earns expire within 3 s.  Expected errors (PT001, PT003,
#             55P03) are caught and counted by the stress.* wrappers, any
#             other error aborts the client and fails the run.
#   checker   one client that loops over stress.check_round(): in one
#             REPEATABLE READ snapshot, every invariant for the hot users and
#             20 random accounts (no negative balance, balance = sum of lots
#             = sum of ledger + archive, user_seq gapless, keys at most once,
#             one matching outbox row per transaction, the balance_after
#             chain, history = ledger, per-lot accounting, exact expiry), and
#             now and then the whole-database totals.
#   jobs      points.archive() with points.archive_after = 0 and
#             points.expire_due(), three times a second.
# Then it expires everything due and checks every invariant over every
# account, points.verify(), a rebuild of each account from points.history,
# that every acknowledged call is in the ledger as returned (and every
# transaction was acknowledged once), that rolled-back calls left nothing,
# and that no user lock is left held.
#
# Exit status 0 only if every check category passed.  Ends with
#   stress: N calls, M checks, 0 violations
#   K passed, 0 failed
set -uo pipefail

dir=$(cd "$(dirname "$0")" && pwd)
seconds=20
clients=8
while [ $# -gt 0 ]; do
	case "$1" in
		--seconds) seconds="$2"; shift 2 ;;
		--seconds=*) seconds="${1#*=}"; shift ;;
		--clients) clients="$2"; shift 2 ;;
		--clients=*) clients="${1#*=}"; shift ;;
		-h|--help) sed -n '2,31p' "$0"; exit 0 ;;
		*) echo "run.sh: unknown argument $1" >&2; exit 2 ;;
	esac
done
case "$seconds$clients" in
	*[!0-9]*) echo "run.sh: --seconds and --clients take whole numbers" >&2; exit 2 ;;
esac
[ "$seconds" -ge 1 ] && [ "$clients" -ge 1 ] || { echo "run.sh: need --seconds >= 1 and --clients >= 1" >&2; exit 2; }

work=$(mktemp -d /tmp/points-stress.XXXXXX)
keep_work=
cleanup() { [ -n "$keep_work" ] || rm -rf "$work"; }
trap cleanup EXIT

psql_q() { psql -X -q -v ON_ERROR_STOP=1 "$@"; }
die() { echo "stress: FAILED: $*" >&2; keep_work=1; echo "stress: logs kept in $work" >&2; exit 1; }

psql_q -c "CREATE EXTENSION IF NOT EXISTS points" >/dev/null || die "cannot create extension points"
psql_q -f "$dir/stress.sql" >/dev/null || die "cannot install the stress schema ($dir/stress.sql)"

threads=2
[ "$clients" -ge 2 ] || threads=1
s="$dir/scripts"
echo "stress: ${seconds}s, $clients clients + checker + jobs, against ${PGHOST:-local}:${PGPORT:-5432}/${PGDATABASE:-$(id -un)}"

start=$(date +%s.%N)
PGOPTIONS="${PGOPTIONS:-} -c points.lock_timeout=100ms" \
pgbench -n -c "$clients" -j "$threads" -T "$seconds" --max-tries=100 --failures-detailed \
	-f "$s/earn.sql@30" -f "$s/use.sql@25" -f "$s/cancel.sql@15" -f "$s/replay.sql@12" \
	-f "$s/probe.sql@2" -f "$s/hold.sql@3" -f "$s/rollback.sql@5" -f "$s/rr.sql@5" \
	-f "$s/serializable.sql@5" \
	>"$work/workload.log" 2>&1 &
wpid=$!
pgbench -n -c 1 -T "$seconds" -f "$s/check.sql" >"$work/checker.log" 2>&1 &
cpid=$!
pgbench -n -c 1 -T "$seconds" -f "$s/jobs.sql" >"$work/jobs.log" 2>&1 &
jpid=$!
wait $wpid; wrc=$?
wait $cpid; crc=$?
wait $jpid; jrc=$?
end=$(date +%s.%N)

# the pgbench backends are gone before the final checks look at locks
for _ in $(seq 1 50); do
	n=$(psql -X -At -c "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgbench' AND pid <> pg_backend_pid()") || break
	[ "$n" = 0 ] && break
	sleep 0.1
done

final_start=$(date +%s.%N)
psql_q -At -c "SELECT stress.expire_all()" >"$work/expire_all.log" 2>&1 \
	|| die "stress.expire_all() failed: $(cat "$work/expire_all.log")"
psql_q -At >"$work/final.log" 2>&1 <<'EOF' || die "final checks failed to run: $(cat "$work/final.log")"
BEGIN ISOLATION LEVEL REPEATABLE READ;
SELECT stress.final_checks();
COMMIT;
EOF

final_end=$(date +%s.%N)

# ------------------------------------------------------------ the verdict
pg_stat() { sed -n "s/^$1: \([0-9]*\).*/\1/p" "$2" | head -1; }
w_tx=$(pg_stat "number of transactions actually processed" "$work/workload.log")
w_failed=$(pg_stat "number of failed transactions" "$work/workload.log")
w_ser=$(pg_stat "number of serialization failures" "$work/workload.log")
w_dead=$(pg_stat "number of deadlock failures" "$work/workload.log")
w_retried=$(pg_stat "number of transactions retried" "$work/workload.log")
c_rounds=$(pg_stat "number of transactions actually processed" "$work/checker.log")
j_runs=$(pg_stat "number of transactions actually processed" "$work/jobs.log")
w_aborts=$(grep -c "aborted in command" "$work/workload.log")
c_aborts=$(grep -c "aborted in command" "$work/checker.log")
j_aborts=$(grep -c "aborted in command" "$work/jobs.log")

passed=0
failed=0
verdict() {		# name, ok (0/1), detail
	if [ "$2" = 1 ]; then
		passed=$((passed + 1)); printf '  ok    %-26s %s\n' "$1" "$3"
	else
		failed=$((failed + 1)); printf '  FAIL  %-26s %s\n' "$1" "$3"
	fi
}

echo "stress: pgbench workload exit $wrc, ${w_tx:-?} transactions, ${w_retried:-0} retried after 40001/40P01, ${w_failed:-?} failed; checker exit $crc, ${c_rounds:-?} rounds; jobs exit $jrc, ${j_runs:-?} runs"
psql -X -At -F' ' -c "SELECT 'stress: calls by outcome:', string_agg(format('%s %s', outcome, n), ', ' ORDER BY n DESC) FROM (SELECT outcome, count(*) n FROM stress.call_log GROUP BY outcome) x" 2>/dev/null
psql -X -At -F' ' -c "SELECT 'stress: jobs archived', coalesce(sum(archived), 0), 'rows and expired', coalesce(sum(expired), 0), 'lots during the run; the final expiry run expired', '$(cat "$work/expire_all.log")'  FROM stress.job_log" 2>/dev/null

verdict workload_pgbench "$([ "$wrc" = 0 ] && [ "$w_aborts" = 0 ] && [ -n "$w_tx" ] && echo 1)" \
	"exit $wrc, $w_aborts aborted clients (an unexpected SQLSTATE aborts a client)"
verdict checker_pgbench "$([ "$crc" = 0 ] && [ "$c_aborts" = 0 ] && [ "${c_rounds:-0}" -gt 0 ] && echo 1)" \
	"exit $crc, $c_aborts aborted, ${c_rounds:-0} rounds"
verdict jobs_pgbench "$([ "$jrc" = 0 ] && [ "$j_aborts" = 0 ] && [ "${j_runs:-0}" -gt 0 ] && echo 1)" \
	"exit $jrc, $j_aborts aborted, ${j_runs:-0} runs"
verdict no_deadlocks "$([ "${w_dead:-x}" = 0 ] && echo 1)" "${w_dead:-?} deadlock failures"
verdict serialization_retried "$([ "${w_failed:-x}" = 0 ] && echo 1)" \
	"${w_ser:-?} serialization failures left after 100 tries, ${w_retried:-0} transactions retried"

# every check category of the checker, the final checks and the workload's
# own assertions: its number of checks and of violations
while IFS='|' read -r name checks viol; do
	verdict "$name" "$([ "$viol" = 0 ] && echo 1)" "$checks checks, $viol violations"
done < <(psql -X -At -c "
	WITH cats(name, ord) AS (VALUES
	  ('no_negative_balance', 1), ('balance_eq_lots_eq_ledger', 2), ('user_seq_gapless', 3),
	  ('key_at_most_once', 4), ('outbox_per_tx', 5), ('balance_after_chain', 6),
	  ('history_matches_ledger', 7), ('lot_accounting', 8), ('exact_expiry', 9),
	  ('global_totals', 10), ('verify_empty', 11), ('rebuild_from_history', 12),
	  ('acknowledged_calls', 13), ('rollback_leaves_nothing', 14), ('no_leftover_locks', 15),
	  ('expiry_job_completes', 16), ('replay', 17), ('key_mismatch', 18), ('expire_lots_sum', 19))
	SELECT c.name,
	       CASE c.name
	         WHEN 'replay' THEN (SELECT count(*) FROM stress.call_log
	                              WHERE op LIKE 'replay%' OR (op = 'cancel' AND idempotency_key IS NOT NULL) OR op = 'probe')
	         WHEN 'key_mismatch' THEN (SELECT count(*) FROM stress.call_log WHERE op = 'probe' AND outcome = 'PT002')
	         ELSE (SELECT coalesce(sum(l.checks), 0) FROM stress.check_log l WHERE l.check_name = c.name)
	       END,
	       (SELECT count(*) FROM stress.violation v WHERE v.check_name = c.name)
	  FROM cats c ORDER BY c.ord")

# any violation of a name not listed above is a failure too
other=$(psql -X -At -c "SELECT count(*) FROM stress.violation WHERE check_name NOT IN (
	'no_negative_balance', 'balance_eq_lots_eq_ledger', 'user_seq_gapless', 'key_at_most_once',
	'outbox_per_tx', 'balance_after_chain', 'history_matches_ledger', 'lot_accounting',
	'exact_expiry', 'global_totals', 'verify_empty', 'rebuild_from_history', 'acknowledged_calls',
	'rollback_leaves_nothing', 'no_leftover_locks', 'expiry_job_completes', 'replay', 'key_mismatch',
	'expire_lots_sum')")
[ "${other:-0}" = 0 ] || verdict other_violations 0 "$other"

if [ "$w_aborts" != 0 ] || [ "$wrc" != 0 ]; then
	echo "stress: workload errors (first 10):"
	grep -E "aborted|ERROR|error" "$work/workload.log" | head -10 | sed 's/^/    /'
fi
if [ "$c_aborts" != 0 ] || [ "$crc" != 0 ]; then
	echo "stress: checker errors:"; grep -E "aborted|ERROR|error" "$work/checker.log" | head -5 | sed 's/^/    /'
fi
if [ "$j_aborts" != 0 ] || [ "$jrc" != 0 ]; then
	echo "stress: jobs errors:"; grep -E "aborted|ERROR|error" "$work/jobs.log" | head -5 | sed 's/^/    /'
fi
nviol=$(psql -X -At -c "SELECT count(*) FROM stress.violation")
if [ "${nviol:-1}" != 0 ]; then
	echo "stress: violations, as first found (the live checker finds one again each round it looks; all in table stress.violation):"
	psql -X -At -F' | ' -c "SELECT check_name, 'user ' || coalesce(user_id::text, '-'), detail,
		format('%s, found %s times', string_agg(DISTINCT source, '+'), count(*))
		FROM stress.violation GROUP BY check_name, user_id, detail ORDER BY min(found_at) LIMIT 20" | sed 's/^/    /'
fi

# coverage: say so when the run did not exercise a path it is meant to
missing=$(psql -X -At -c "SELECT string_agg(o, ', ') FROM unnest(ARRAY['PT001', 'PT003', '55P03', 'replayed']) o
	WHERE NOT EXISTS (SELECT FROM stress.call_log c WHERE c.outcome = o)")
[ -z "$missing" ] || echo "stress: warning: this run never saw outcome(s) $missing (a longer run would)"
[ "${w_retried:-0}" -gt 0 ] || echo "stress: warning: no 40001 retry happened in this run"

ncalls=$(psql -X -At -c "SELECT count(*) FROM stress.call_log")
nchecks=$(psql -X -At -c "SELECT coalesce(sum(checks), 0) FROM stress.check_log")
printf 'stress: %s calls, %s checks, %s violations (%s s of load, %s s of final checks)\n' \
	"${ncalls:-?}" "${nchecks:-?}" "${nviol:-?}" \
	"$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')" \
	"$(awk -v a="$final_start" -v b="$final_end" 'BEGIN { printf "%.1f", b - a }')"
echo "$passed passed, $failed failed"
if [ "$failed" -ne 0 ]; then
	keep_work=1
	echo "stress: logs kept in $work" >&2
	exit 1
fi
exit 0
