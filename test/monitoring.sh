#!/usr/bin/env bash
# Monitoring end to end, as root:
#   - installs prometheus (promtool) and prometheus-postgres-exporter from
#     Debian if they are missing, without starting their services;
#   - promtool check rules / test rules on monitoring/alerts.yml;
#   - on a throwaway cluster (port 5487, library preloaded) makes some
#     traffic, starts the real exporter with monitoring/queries.yaml as a
#     role with only the grants the file documents, scrapes /metrics and
#     checks the names and values against the database;
#   - LISTENs on points_alert and checks the JSON of a new alert.
# Prints "N passed, M failed" last; exits non-zero on any failure.
# Usage: test/monitoring.sh          (MONITORING_PG_PORT overrides 5487)
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

if [ "${1:-}" != "--inside" ]; then
    PORT=${MONITORING_PG_PORT:-5487}
    passed=0 failed=0
    ok()   { passed=$((passed + 1)); echo "ok - $*"; }
    fail() { failed=$((failed + 1)); echo "not ok - $*"; }

    if ! command -v promtool >/dev/null || [ ! -x /usr/bin/prometheus-postgres-exporter ]; then
        # the packages' services must not start: deny it for the install
        policy=/usr/sbin/policy-rc.d made_policy=0
        if [ ! -e "$policy" ]; then
            printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy" && made_policy=1
        fi
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q --no-install-recommends prometheus prometheus-postgres-exporter >/tmp/points_monitoring_apt.log 2>&1 ||
            { apt-get update -q >>/tmp/points_monitoring_apt.log 2>&1 &&
              apt-get install -y -q --no-install-recommends prometheus prometheus-postgres-exporter >>/tmp/points_monitoring_apt.log 2>&1; } ||
            { tail -20 /tmp/points_monitoring_apt.log; echo "could not install prometheus, prometheus-postgres-exporter"; }
        [ "$made_policy" = 1 ] && rm -f "$policy"
        # with systemd, keep the services we just installed from running
        if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
            systemctl disable --now prometheus prometheus-postgres-exporter >/dev/null 2>&1 || true
        fi
    fi
    if command -v promtool >/dev/null && [ -x /usr/bin/prometheus-postgres-exporter ]; then
        ok "prometheus and prometheus-postgres-exporter installed"
    else
        fail "prometheus and prometheus-postgres-exporter installed"
        echo "0 passed, $((failed)) failed"; exit 1
    fi

    if out=$(promtool check rules monitoring/alerts.yml 2>&1); then
        ok "promtool check rules monitoring/alerts.yml ($(echo "$out" | grep -o '[0-9]* rules found'))"
    else
        fail "promtool check rules monitoring/alerts.yml"; echo "$out"
    fi
    if out=$(promtool test rules monitoring/alerts_test.yml 2>&1); then
        ok "promtool test rules monitoring/alerts_test.yml"
    else
        fail "promtool test rules monitoring/alerts_test.yml"; echo "$out"
    fi
    # every rule has a unit test
    for rule in $(sed -n 's/^ *- alert: *//p' monitoring/alerts.yml); do
        if grep -q "alertname: $rule\$" monitoring/alerts_test.yml; then
            ok "rule $rule has a unit test"
        else
            fail "rule $rule has a unit test"
        fi
    done

    results=$(mktemp /tmp/points_monitoring.XXXXXX)
    echo "0 1" > "$results"     # a cluster that did not run counts as a failure
    pg_virtualenv -t -c "-p $PORT" \
        -o shared_preload_libraries=points \
        -o points.alert_amount=500 \
        -o points.expire_interval=1h -o points.archive_interval=1h \
        bash "$ROOT/test/monitoring.sh" --inside "$results"
    read -r p f < "$results"
    rm -f "$results"
    passed=$((passed + p)) failed=$((failed + f))
    echo "$passed passed, $failed failed"
    [ "$failed" -eq 0 ]
    exit
fi

# ---- inside pg_virtualenv: PGHOST, PGPORT, PGUSER, PGPASSWORD are set ----
results=$2
passed=0 failed=0
ok()   { passed=$((passed + 1)); echo "ok - $*"; }
fail() { failed=$((failed + 1)); echo "not ok - $*"; }
save() { echo "$passed $failed" > "$results"; }
q()    { psql -X -q -At -v ON_ERROR_STOP=1 -c "$1"; }
# check NAME ACTUAL EXPECTED: numeric equality
check() {
    if [ -n "$2" ] && [ -n "$3" ] && awk -v a="$2" -v b="$3" 'BEGIN { exit !(a + 0 == b + 0) }'; then
        ok "$1 = $3"
    else
        fail "$1: got '$2', expected '$3'"
    fi
}
# check_true NAME AWK-CONDITION-ON-x VALUE
check_true() {
    if [ -n "$3" ] && awk -v x="$3" "BEGIN { exit !($2) }"; then
        ok "$1 ($3)"
    else
        fail "$1: '$3' does not satisfy $2"
    fi
}

tmp=$(mktemp -d /tmp/points_monitoring_run.XXXXXX)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null; done
    wait 2>/dev/null
    rm -rf "$tmp"
    save
}
trap cleanup EXIT
save

# the extension in the worker's database, and the exporter's role with the
# grants monitoring/queries.yaml documents
q "CREATE EXTENSION points" || { fail "CREATE EXTENSION points"; exit 1; }
psql -X -q -v ON_ERROR_STOP=1 <<'SQL' || { fail "exporter role"; exit 1; }
CREATE ROLE points_exporter LOGIN PASSWORD 'points-exporter-test';
GRANT pg_monitor TO points_exporter;
GRANT USAGE ON SCHEMA points TO points_exporter;
GRANT EXECUTE ON FUNCTION points.stats(), points.alerts(interval),
      points.verify(bigint) TO points_exporter;
GRANT SELECT ON points.worker_status TO points_exporter;
SQL

# the worker found the extension and did its first runs (expiry, archive:
# then not again for an hour)
for _ in $(seq 1 100); do
    [ "$(q "SELECT worker_pid IS NOT NULL AND expire_last_run IS NOT NULL AND archive_last_run IS NOT NULL FROM points.worker_status")" = t ] && break
    sleep 0.1
done
check "worker running with its first runs done" \
    "$(q "SELECT (worker_pid IS NOT NULL AND expire_last_run IS NOT NULL)::int FROM points.worker_status")" 1

# a listener on points_alert: psql prints notifications after each command
( echo "LISTEN points_alert;"
  for _ in $(seq 1 120); do sleep 0.25; echo "SELECT 1;"; done ) |
    psql -X -q -At > "$tmp/listen.out" 2>&1 &
pids+=($!)
sleep 0.5

# traffic: earns, a failing use, a use, a cancel, queued earns, a large earn
psql -X -q -At -v ON_ERROR_STOP=1 > /dev/null <<'SQL' || fail "traffic"
SELECT points.earn(u, 100) FROM generate_series(1, 3) u;
SELECT points.use(1, 30);
SELECT points.cancel((SELECT tx_id FROM points.ledger WHERE user_id = 1 AND kind = 'use'));
SELECT points.earn_async(3, 5) FROM generate_series(1, 2);
SELECT points.earn(2, 2, expires_at => clock_timestamp() + interval '1 second') FROM generate_series(1, 2);
SQL
q "SELECT points.use(1, 100000)" >/dev/null 2>&1 && fail "a use beyond the balance fails"
big_tx=$(q "SELECT tx_id FROM points.earn(4, 777)")

# the alert: raised by the worker (every 5 s) or by us, whoever is first
for _ in $(seq 1 60); do
    [ "$(q "SELECT count(*) FROM points.alerts()")" -ge 1 ] && break
    q "SELECT points.detect_anomalies()" >/dev/null
    sleep 0.25
done
check "alerts raised for a large earn" "$(q "SELECT count(*) FROM points.alerts() WHERE rule = 'large_amount'")" 1
for _ in $(seq 1 40); do
    grep -q 'Asynchronous notification "points_alert"' "$tmp/listen.out" && break
    sleep 0.25
done
payload=$(sed -n 's/^Asynchronous notification "points_alert" with payload "\(.*\)" received from server process with PID [0-9]*\.$/\1/p' "$tmp/listen.out" | head -1)
if [ -n "$payload" ]; then
    ok "NOTIFY points_alert received"
    # the JSON matches the alert row
    match=$(psql -X -q -At -v payload="$payload" -v tx="$big_tx" <<'SQL'
SELECT (p ->> 'rule') = 'large_amount' AND (p ->> 'user_id')::bigint = 4
   AND (p ->> 'observed')::bigint = 777 AND (p ->> 'threshold')::bigint = 500
   AND (p ->> 'tx_id')::bigint = :tx
   AND (p ->> 'raised_at')::timestamptz = a.raised_at
   AND (SELECT array_agg(k ORDER BY k) FROM jsonb_object_keys(p) k)
       = '{alert_id,observed,raised_at,rule,threshold,tx_id,user_id}'
FROM (SELECT :'payload'::jsonb AS p) x
JOIN points.alerts() a ON a.alert_id = (p ->> 'alert_id')::bigint;
SQL
)
    check "NOTIFY payload is the alert as JSON ($payload)" "$([ "$match" = t ] && echo 1 || echo 0)" 1
else
    fail "NOTIFY points_alert received"; cat "$tmp/listen.out" | head -5
fi

# queued earns that wait: another session holds user 5's lock, so the
# worker leaves them in the queue
psql -X -q -At -c "BEGIN; SELECT points.earn(5, 1); SELECT pg_sleep(15); COMMIT;" > /dev/null 2>&1 &
pids+=($!)
holder=$!
for _ in $(seq 1 50); do
    [ "$(q "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted")" -ge 1 ] && break
    sleep 0.1
done
q "SELECT points.earn_async(5, 10) FROM generate_series(1, 3)" > /dev/null
# the queued earns of user 3 are applied, the expiring lots are due
for _ in $(seq 1 50); do
    [ "$(q "SELECT count(*) FROM points.request WHERE user_id = 3 AND state = 'applied'")" = 2 ] && break
    sleep 0.1
done
sleep 1.2
check "queued earns of user 3 applied" "$(q "SELECT count(*) FROM points.request WHERE user_id = 3 AND state = 'applied'")" 2

# the exporter, as points_exporter, on a free port
port=19187
while (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do port=$((port + 1)); done
env -i PATH=/usr/bin:/bin \
    DATA_SOURCE_NAME="host=localhost port=$PGPORT user=points_exporter password=points-exporter-test dbname=$PGDATABASE sslmode=disable" \
    /usr/bin/prometheus-postgres-exporter \
        --extend.query-path="$ROOT/monitoring/queries.yaml" \
        --web.listen-address="127.0.0.1:$port" \
        --disable-default-metrics --disable-settings-metrics \
        --no-collector.database --no-collector.bgwriter \
        > "$tmp/exporter.log" 2>&1 &
pids+=($!)
scrape() {
    for _ in $(seq 1 50); do
        curl -sf "http://127.0.0.1:$port/metrics" > "$1" && return 0
        sleep 0.2
    done
    return 1
}
if scrape "$tmp/m1"; then
    ok "exporter answers on 127.0.0.1:$port/metrics"
else
    fail "exporter answers"; tail -20 "$tmp/exporter.log"; exit 1
fi
# the database's view of the same moment (nothing changes meanwhile:
# user 5's lock is held, the jobs ran, no broker is configured)
q "SELECT op, calls, failures, lock_timeouts, points FROM points.stats()" > "$tmp/stats"
IFS='|' read -r w_pid w_outbox w_outbox_age w_queue w_queue_age w_expire w_archive w_published <<< \
    "$(q "SELECT worker_pid, outbox_backlog, extract(epoch FROM outbox_oldest_age), queue_depth,
              extract(epoch FROM queue_oldest_age), expire_backlog, archive_backlog, events_published
       FROM points.worker_status")"

# value of a series: m FILE NAME [LABEL="value"]
m() {
    awk -v n="$2" -v l="${3:-}" '
        /^#/ { next }
        { name = $1; sub(/\{.*/, "", name) }
        name == n && (l == "" || index($1, l) > 0) { print $2; exit }' "$1"
}

check "pg_up" "$(m "$tmp/m1" pg_up)" 1
check "pg_exporter_last_scrape_error (every query ran with the documented grants)" \
    "$(m "$tmp/m1" pg_exporter_last_scrape_error)" 0
check "pg_exporter_user_queries_load_error (queries.yaml loaded)" \
    "$(m "$tmp/m1" pg_exporter_user_queries_load_error)" 0
[ "$(m "$tmp/m1" pg_exporter_last_scrape_error)" = 0 ] || grep -i error "$tmp/exporter.log" | tail -5
missing=
for name in \
    points_stats_calls points_stats_failures points_stats_lock_timeouts points_stats_points \
    points_stats_total_ms points_stats_max_ms points_stats_lock_wait_ms \
    points_worker_up points_worker_start_time_seconds points_worker_outbox_backlog \
    points_worker_outbox_oldest_age_seconds points_worker_events_published points_worker_queue_depth \
    points_worker_queue_oldest_age_seconds points_worker_queue_applied_last_minute \
    points_worker_queue_rejected_last_minute points_worker_expire_backlog points_worker_expire_total_lots \
    points_worker_seconds_since_expire_run points_worker_archive_backlog points_worker_archive_total_rows \
    points_worker_seconds_since_archive_run points_worker_seconds_since_monitor_run \
    points_worker_alerts_raised points_worker_last_error_timestamp_seconds \
    points_worker_seconds_since_last_error points_worker_kafka_last_error_timestamp_seconds \
    points_worker_seconds_since_kafka_error points_alerts_last_hour points_alerts_last_day \
    points_verify_mismatches points_verify_checked_at_seconds points_verify_duration_seconds; do
    [ -n "$(m "$tmp/m1" "$name")" ] || missing="$missing $name"
done
if [ -z "$missing" ]; then ok "all 33 points metrics present"; else fail "metrics missing:$missing"; fi
grep -q '^# TYPE points_stats_calls counter' "$tmp/m1" && grep -q '^# TYPE points_worker_outbox_backlog gauge' "$tmp/m1" &&
    ok "metric types (counter, gauge)" || fail "metric types"
check "points_stats series per op" "$(grep -c '^points_stats_calls{' "$tmp/m1")" 6

# stats: what points.stats() says, and what the traffic was
while IFS='|' read -r op calls failures lock_timeouts points; do
    case "$op" in earn|use|cancel|earn_async) ;; *) continue ;; esac
    check "points_stats_calls{op=\"$op\"}" "$(m "$tmp/m1" points_stats_calls "op=\"$op\"")" "$calls"
    check "points_stats_failures{op=\"$op\"}" "$(m "$tmp/m1" points_stats_failures "op=\"$op\"")" "$failures"
    check "points_stats_points{op=\"$op\"}" "$(m "$tmp/m1" points_stats_points "op=\"$op\"")" "$points"
done < "$tmp/stats"
check "points_stats_calls{op=\"earn\"} counts our earns" "$(m "$tmp/m1" points_stats_calls 'op="earn"')" 7
check "points_stats_failures{op=\"use\"} counts the failed use" "$(m "$tmp/m1" points_stats_failures 'op="use"')" 1
check "points_stats_points{op=\"use\"} counts the successful use only" "$(m "$tmp/m1" points_stats_points 'op="use"')" 30
check "points_stats_calls{op=\"earn_async\"}" "$(m "$tmp/m1" points_stats_calls 'op="earn_async"')" 5
check_true "points_stats_total_ms{op=\"earn\"} > 0" "x > 0" "$(m "$tmp/m1" points_stats_total_ms 'op="earn"')"

# the worker and the backlogs: what points.worker_status says
check "points_worker_up" "$(m "$tmp/m1" points_worker_up)" "$([ -n "$w_pid" ] && echo 1 || echo 0)"
check "points_worker_up is 1" "$(m "$tmp/m1" points_worker_up)" 1
check "points_worker_outbox_backlog = count(*) of points.outbox" \
    "$(m "$tmp/m1" points_worker_outbox_backlog)" "$(q "SELECT count(*) FROM points.outbox")"
check "points_worker_outbox_backlog = worker_status" "$(m "$tmp/m1" points_worker_outbox_backlog)" "$w_outbox"
check_true "points_worker_outbox_oldest_age_seconds close to worker_status ($w_outbox_age)" \
    "x > 0 && x <= $w_outbox_age + 0.001 && x > $w_outbox_age - 5" "$(m "$tmp/m1" points_worker_outbox_oldest_age_seconds)"
check "points_worker_queue_depth = worker_status" "$(m "$tmp/m1" points_worker_queue_depth)" "$w_queue"
check "points_worker_queue_depth is 3" "$(m "$tmp/m1" points_worker_queue_depth)" 3
check_true "points_worker_queue_oldest_age_seconds close to worker_status ($w_queue_age)" \
    "x > 0 && x <= $w_queue_age + 0.001 && x > $w_queue_age - 5" "$(m "$tmp/m1" points_worker_queue_oldest_age_seconds)"
check "points_worker_expire_backlog = worker_status" "$(m "$tmp/m1" points_worker_expire_backlog)" "$w_expire"
check "points_worker_expire_backlog is 2" "$(m "$tmp/m1" points_worker_expire_backlog)" 2
check "points_worker_archive_backlog = worker_status" "$(m "$tmp/m1" points_worker_archive_backlog)" "$w_archive"
check "points_worker_events_published = worker_status" "$(m "$tmp/m1" points_worker_events_published)" "$w_published"
check "points_worker_queue_applied_last_minute" "$(m "$tmp/m1" points_worker_queue_applied_last_minute)" 2
check "points_worker_last_error_timestamp_seconds (never)" "$(m "$tmp/m1" points_worker_last_error_timestamp_seconds)" 0
[ "$(m "$tmp/m1" points_worker_seconds_since_last_error)" = NaN ] &&
    ok "points_worker_seconds_since_last_error is NaN (no error)" ||
    fail "points_worker_seconds_since_last_error: $(m "$tmp/m1" points_worker_seconds_since_last_error)"
check_true "points_worker_seconds_since_monitor_run recent" "x >= 0 && x < 30" \
    "$(m "$tmp/m1" points_worker_seconds_since_monitor_run)"
check_true "points_worker_start_time_seconds is a recent Unix time" "x > $(date +%s) - 600" \
    "$(m "$tmp/m1" points_worker_start_time_seconds)"

# alerts by rule, verify
check "points_alerts_last_day{rule=\"large_amount\"}" "$(m "$tmp/m1" points_alerts_last_day 'rule="large_amount"')" 1
check "points_alerts_last_hour{rule=\"large_amount\"}" "$(m "$tmp/m1" points_alerts_last_hour 'rule="large_amount"')" 1
check "points_alerts_last_day{rule=\"use_burst\"}" "$(m "$tmp/m1" points_alerts_last_day 'rule="use_burst"')" 0
check "points_alerts_last_day{rule=\"cancel_burst\"}" "$(m "$tmp/m1" points_alerts_last_day 'rule="cancel_burst"')" 0
check "points_verify_mismatches" "$(m "$tmp/m1" points_verify_mismatches)" "$(q "SELECT count(*) FROM points.verify()")"

# after a reset the counters start again; verify's answer comes from the cache
q "SELECT points.stats_reset()" > /dev/null
sleep 0.2
scrape "$tmp/m2" || fail "second scrape"
check "points_stats_calls{op=\"earn\"} after stats_reset" "$(m "$tmp/m2" points_stats_calls 'op="earn"')" 0
check "points_verify_checked_at_seconds cached (cache_seconds)" \
    "$(m "$tmp/m2" points_verify_checked_at_seconds)" "$(m "$tmp/m1" points_verify_checked_at_seconds)"

# let user 5's lock go (cancel the holder's pg_sleep: its earn rolls back):
# the queue drains
q "SELECT pg_cancel_backend(pid) FROM pg_stat_activity
   WHERE query LIKE '%points.earn(5, 1)%' AND pid <> pg_backend_pid()" > /dev/null
wait "$holder" 2>/dev/null
for _ in $(seq 1 50); do
    [ "$(q "SELECT queue_depth FROM points.worker_status")" = 0 ] && break
    sleep 0.2
done
check "queue drained once the lock is released" "$(q "SELECT queue_depth FROM points.worker_status")" 0
exit 0
