#!/usr/bin/env bash
# workloads.sh - the benchmark workloads; run by bench/run.sh inside
# pg_virtualenv (PGHOST, PGPORT, PGUSER, PGPASSWORD set), as root.
#
# Environment: BENCH_OUT (output directory, required), BENCH_QUICK (1: one
# short run of each side), BENCH_ONLY (comma-separated workloads: W1..W8,
# Q1 (queued earns on a hot user), Q2 (the campaign)), BENCH_REDIS_PORT.
#
# Every workload runs its baseline and ours alternately in this one cluster
# and writes one row to $BENCH_OUT/results.tsv (and other figures to
# extras.tsv); summarize.pl turns them into the table.  Every loop here is
# bounded by a count or a time limit.
set -uo pipefail

BENCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH/.." && pwd)
SQL=$BENCH/sql
OUT=${BENCH_OUT:?BENCH_OUT must be set}
QUICK=${BENCH_QUICK:-0}
ONLY=${BENCH_ONLY:-}
REDIS_PORT=${BENCH_REDIS_PORT:-6460}
PROFILE=${BENCH_PROFILE:-0}
export PGHOST=127.0.0.1 PGAPPNAME=points-bench
unset PGOPTIONS

RES=$OUT/results.tsv
EXTRA=$OUT/extras.tsv
MACHINE=$OUT/machine.txt
mkdir -p "$OUT/runs" "$OUT/lat"
: >"$RES"
: >"$EXTRA"

# ---- scale -----------------------------------------------------------------
USERS=100000            # W1-W4, W8: pgbench -i -s 1 has 100k accounts
KEYS=10000              # W4: keyed earns made at set-up, then replayed
PROBE_BASE=8000000      # "other users" of the latency probes (W6, Q2)
PROBE_USERS=100000
W6_BASE=5000000
W7_BASE=6000000
W7_PAIRS=50             # W7: 100 ledger rows per user
if [[ $QUICK == 1 ]]; then
    SECS=5 ROUNDS=1
    W6_USERS=5000       # x 10 lots = 50,000 due lots
    W7_USERS=2000       # x 100 rows = 200,000 old rows
    CAMPAIGN=20000
    RAW_EVENTS=20000
    DRAIN_MAX=10000
    PROBE_SECS=3
    Q2_WAIT=120
else
    SECS=8 ROUNDS=3
    W6_USERS=100000     # x 10 lots = 1,000,000 due lots
    W7_USERS=50000      # x 100 rows = 5,000,000 old rows
    CAMPAIGN=1000000
    RAW_EVENTS=200000
    DRAIN_MAX=100000
    PROBE_SECS=8
    Q2_WAIT=200         # longest wait for the campaign's apply (and 3/5 of it for its replay)
fi
PROBE_RATE=200          # earns/s of the latency probes, 4 threads, open loop

# ---- helpers ---------------------------------------------------------------
log() { echo "[$(date +%T)] $*" >&2; }
q() { psql -X -qAt -v ON_ERROR_STOP=1 "$@"; }
want() { [[ -z $ONLY || ,$ONLY, == *,$1,* ]]; }
db_now() { q -c "SELECT extract(epoch FROM clock_timestamp())"; }
fmt() { printf "%.${2:-0}f" "$1"; }
calc() { perl -e "printf '%.3f', $1"; }
ratio() { perl "$BENCH/summarize.pl" ratio "$1" "$2"; }
pct() { perl "$BENCH/summarize.pl" pct "$@"; }
has_stats() { [[ $(q -c "SELECT to_regprocedure('points.stats()') IS NOT NULL") == t ]]; }
stat_lock_timeouts() {
    has_stats && q -c "SELECT coalesce(sum(lock_timeouts), 0) FROM points.stats()" || echo 0
}
extra() { printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "${5:-}" >>"$EXTRA"; }
verdict_ge() { perl -e 'print $ARGV[0] >= $ARGV[1] ? "met" : "MISS"' "$1" "$2"; }
verdict_le() { perl -e 'print $ARGV[0] <= $ARGV[1] ? "met" : "MISS"' "$1" "$2"; }

RUNSEQ=0
# pgb LABEL PGBENCH-ARGS... - one pgbench run of SECS seconds; prints
# "TPS ERRORS" and appends its latencies (ms) to $OUT/lat/LABEL.  Errors:
# failed transactions plus clients aborted by an error (pgbench 15 aborts
# a client on any error that is not a serialization failure or deadlock).
pgb() {
    local label=$1 dir tps failed aborted
    shift
    RUNSEQ=$((RUNSEQ + 1))
    dir=$OUT/runs/$(printf %03d $RUNSEQ)-$label
    mkdir -p "$dir"
    (cd "$dir" && timeout $((SECS + 120)) pgbench -n -M prepared -j 2 -T "$SECS" \
        -l --log-prefix=lat "$@" >out.txt 2>err.txt)
    tps=$(sed -n 's/^tps = \([0-9.]*\) .*/\1/p' "$dir/out.txt")
    failed=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$dir/out.txt")
    aborted=$(grep -c "aborted in command" "$dir/err.txt")
    cat "$dir"/lat.* 2>/dev/null | awk '$3 ~ /^[0-9]+$/ { printf "%.3f\n", $3 / 1000 }' >>"$OUT/lat/$label"
    rm -f "$dir"/lat.*
    grep -m3 -h "ERROR" "$dir/err.txt" >&2
    echo "${tps:-0} $((${failed:-0} + aborted))"
}

# result WORKLOAD BASELINE "BASE_TPS..." "OURS_TPS..." BASE_LABEL OURS_LABEL
#        ERRORS_OURS ERRORS_BASE TARGET MIN_RATIO NOTE [EXTRA_OK]
# One row of the table: medians, the median of the per-round ratios and
# their spread, pooled p50/p99 of each side.  MIN_RATIO "-" means report
# only; EXTRA_OK 0 turns a met ratio into a miss (e.g. errors).
result() {
    local w=$1 base=$2 bt=$3 ot=$4 bl=$5 ol=$6 eo=$7 eb=$8 target=$9 min=${10} note=${11} ok=${12:-1}
    local r op bp verdict
    read -r bmed omed rmed rmin rmax <<<"$(ratio "$bt" "$ot")"
    read -r op50 op99 _ <<<"$(pct "$OUT/lat/$ol")"
    read -r bp50 bp99 _ <<<"$(pct "$OUT/lat/$bl")"
    if [[ $min == - ]]; then
        verdict=report
    else
        verdict=$(verdict_ge "$rmed" "$min")
        [[ $ok == 1 ]] || verdict=MISS
    fi
    printf '%s\t%s\t%s\t%s\t%.2f\t%.2f\t%.2f\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' \
        "$w" "$base" "$bmed" "$omed" "$rmed" "$rmin" "$rmax" "$op50" "$op99" "$bp50" "$bp99" \
        "$eo/$eb" "$target" "$verdict" "$note" >>"$RES"
    log "$w: base $bmed ours $omed ratio $rmed ($rmin-$rmax) p99 ours $op99 base $bp99 errors $eo/$eb"
}

# wait_until SECONDS SQL - poll (every 0.1 s) until SQL returns t, for at
# most SECONDS; prints the seconds waited, or "timeout"
wait_until() {
    local limit=$1 sql=$2 t0 start i
    t0=$SECONDS
    start=$(db_now)
    for ((i = 0; i < limit * 10 && SECONDS - t0 < limit; i++)); do
        if [[ $(q -c "SELECT extract(epoch FROM clock_timestamp()), ($sql)") =~ ^([0-9.]+)\|t$ ]]; then
            calc "${BASH_REMATCH[1]} - $start"
            return 0
        fi
        sleep 0.1
    done
    echo timeout
    return 1
}
outbox_empty="SELECT NOT EXISTS (SELECT FROM points.outbox)"
queue_empty="SELECT NOT EXISTS (SELECT FROM points.request WHERE state = 'queued')"

set_guc() {   # set_guc NAME VALUE|'' - ALTER SYSTEM + reload ('' resets)
    if [[ -z $2 ]]; then
        q -c "ALTER SYSTEM RESET $1"
    else
        q -c "ALTER SYSTEM SET $1 = '$2'"
    fi
    q -c "SELECT pg_reload_conf()" >/dev/null
    sleep 0.5
}

# probe_load LABEL [STOP_FILE] - earns of the probe users at PROBE_RATE/s
probe_load() {
    local label=$1 stop=${2:-} secs=$PROBE_SECS
    [[ -n $stop ]] && secs=900
    "$BENCH/probe" load --threads 4 --rate "$PROBE_RATE" --seconds "$secs" \
        --lo $((PROBE_BASE + 1)) --hi $((PROBE_BASE + PROBE_USERS)) \
        ${stop:+--stop-file "$stop"} >"$OUT/runs/probe-$label.txt" 2>"$OUT/runs/probe-$label.err"
    cat "$OUT/runs/probe-$label.txt" >&2
}
kv() { sed -n "s/.*\b$1=\([^ ]*\).*/\1/p" "$2"; }
# lsn - the WAL insert position; wal_bytes A B - bytes of WAL between two
lsn() { q -c "SELECT pg_current_wal_insert_lsn()"; }
wal_bytes() { q -c "SELECT pg_wal_lsn_diff('$2', '$1')::bigint"; }

# quiesce - before an "idle" probe: a checkpoint, then wait (at most 45 s)
# until no autovacuum worker runs and the points worker is idle (twice in
# a row, 0.5 s apart); prints how long it waited
quiesce() {
    local i calm=0
    q -c "CHECKPOINT"
    for ((i = 0; i < 90 && calm < 2; i++)); do
        if [[ $(q -c "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'autovacuum worker'
                      OR (backend_type = 'points worker' AND state = 'active')") == 0 ]]; then
            calm=$((calm + 1))
        else
            calm=0
        fi
        sleep 0.5
    done
    log "quiet after $((i / 2)) s$( ((calm < 2)) && echo ' (gave up waiting)')"
}

# ---- machine ---------------------------------------------------------------
machine() {
    local data fsync
    data=$(q -c "SHOW data_directory")
    fsync=$(timeout 60 /usr/lib/postgresql/15/bin/pg_test_fsync -s 2 -f "$data/bench_fsync.tmp" 2>/dev/null |
        awk '/fdatasync/ && /ops\/sec/ { print $2; exit }')
    rm -f "$data/bench_fsync.tmp"
    {
        echo "machine: $(nproc) cores, $(free -g | awk '/^Mem:/ { print $2 }') GB RAM," \
            "pg_test_fsync fdatasync ${fsync:-?} ops/s (8kB, on the cluster's disk)," \
            "load average at start $(cut -d' ' -f1-3 /proc/loadavg)"
        echo "postgres: $(q -c 'SELECT version()' | cut -d, -f1); fsync=on, synchronous_commit=on," \
            "shared_buffers=$(q -c 'SHOW shared_buffers'), max_connections=$(q -c 'SHOW max_connections')"
        echo "run: $(date -u '+%Y-%m-%d %H:%M UTC'), $([[ $QUICK == 1 ]] && echo quick || echo full)," \
            "$ROUNDS round(s) of ${SECS}s per side, points $(cd "$ROOT" && git describe --always --dirty 2>/dev/null)"
    } >"$MACHINE"
    cat "$MACHINE" >&2
}

# ---- set-up ----------------------------------------------------------------
setup() {
    log "set-up: extension, pgbench tables, $USERS funded users, probe users"
    q -c "CREATE EXTENSION IF NOT EXISTS points" || return 1
    pgbench -i -s 1 -q >/dev/null 2>&1 || return 1
    # every W1 user holds 1000 points that never expire (bulk-loaded, consistent)
    q -v ubase=0 -v nu=$USERS -v k=1 -v amount=1000 -v created="now() - interval '1 day'" \
        -v expires="'infinity'::timestamptz" -v reason="bench funding" -f "$SQL/load_lots.sql" || return 1
    q -v ubase=$PROBE_BASE -v nu=$PROBE_USERS -v k=1 -v amount=1000 -v created="now() - interval '1 day'" \
        -v expires="'infinity'::timestamptz" -v reason="bench probe users" -f "$SQL/load_lots.sql" || return 1
    q -c "VACUUM ANALYZE" -c "CHECKPOINT"
    [[ -z $(q -c "SELECT 1 FROM points.verify(1) UNION ALL SELECT 1 FROM points.verify($USERS)") ]] ||
        { log "set-up: points.verify found an inconsistent account"; return 1; }
    warm_wal
}

# warm_wal - give the new cluster the WAL segment files a server that has run
# a while keeps. In a new cluster every 16 MB of WAL needs a new segment file,
# zero-filled and fsynced by whichever process crosses into it while it holds
# WALWriteLock: every commit waits meanwhile (100-300 ms here; Q2's campaign
# crossed ~150 such boundaries). A server that has run with min_wal_size (run.sh
# sets 4GB, README "Operations") recycles old segments at each checkpoint
# instead. Writes BENCH_WARM_WAL_MB (default 4096; 0: none) of WAL, then a
# checkpoint recycles them.
warm_wal() {
    local mb=${BENCH_WARM_WAL_MB:-4096} t0
    ((mb > 0)) || { log "set-up: no WAL warm-up (BENCH_WARM_WAL_MB=0)"; return 0; }
    t0=$(date +%s)
    q -c "SELECT count(pg_logical_emit_message(false, 'bench-warm-up', repeat('x', 1048576)))
          FROM generate_series(1, $mb)" >/dev/null || return 1
    q -c "CHECKPOINT"
    log "set-up: $mb MB of WAL written and recycled in $(( $(date +%s) - t0 )) s" \
        "($(q -c "SELECT count(*) FROM pg_ls_waldir()") segment files)"
}

W1ARGS=(-D users=$USERS -c 8)

# ---- W1: earn/use 80/20, 100k users, 8 clients ------------------------------
w1() {
    local su="" tp="" ours="" es=0 et=0 eo=0 r a b c
    log "W1: simple-update, tpcb-like and earn/use 80/20, 8 clients, $ROUNDS round(s)"
    for ((r = 1; r <= ROUNDS; r++)); do
        read -r a b <<<"$(pgb w1-simple-update -b simple-update -c 8)"; su+=" $a"; es=$((es + b))
        read -r a b <<<"$(pgb w1-tpcb-like -b tpcb-like -c 8)"; tp+=" $a"; et=$((et + b))
        read -r a c <<<"$(pgb w1-ours -f "$SQL/w1_earn_use.sql" "${W1ARGS[@]}")"; ours+=" $a"; eo=$((eo + c))
    done
    W1_OURS=$ours
    result W1 "simple-update, 8 clients" "$su" "$ours" w1-simple-update w1-ours $eo $es \
        ">=1.0x (aim 1.3x)" 1.0 ""
    result W1 "tpcb-like, 8 clients" "$tp" "$ours" w1-tpcb-like w1-ours $eo $et "report" - \
        "same ours runs as the simple-update row"
}

# ---- W2: earn on one user, 32 clients ---------------------------------------
w2() {
    local base="" ours="" eb=0 eo=0 r a b lt0 lt1 busy
    log "W2: hot row UPDATE vs points.earn(1, 10), 32 clients, $ROUNDS round(s)"
    lt0=$(stat_lock_timeouts)
    for ((r = 1; r <= ROUNDS; r++)); do
        read -r a b <<<"$(pgb w2-update -f "$SQL/w2_hot_update.sql" -c 32)"; base+=" $a"; eb=$((eb + b))
        read -r a b <<<"$(pgb w2-ours -f "$SQL/w2_hot_earn.sql" -c 32)"; ours+=" $a"; eo=$((eo + b))
    done
    lt1=$(stat_lock_timeouts)
    busy=$(cat "$OUT"/runs/*-w2-ours/err.txt 2>/dev/null | grep -c "lock not granted")
    result W2 "UPDATE one row, 32 clients" "$base" "$ours" w2-update w2-ours $eo $eb \
        ">=0.8x (aim 0.95x), 0 errors" 0.8 \
        "55P03 seen by clients: $busy; points.stats() lock_timeouts: $((lt1 - lt0))" \
        "$([[ $eo == 0 ]] && echo 1 || echo 0)"
}

# ---- W3: zipfian users, 16 clients -------------------------------------------
w3() {
    local base="" ours="" eb=0 eo=0 r a b lots
    log "W3: simple-update vs zipfian earn/use, 16 clients, $ROUNDS round(s)"
    lots=$(q -c "SELECT count(*) FROM points.lot WHERE user_id = 1 AND remaining > 0")
    for ((r = 1; r <= ROUNDS; r++)); do
        read -r a b <<<"$(pgb w3-simple-update -b simple-update -c 16)"; base+=" $a"; eb=$((eb + b))
        read -r a b <<<"$(pgb w3-ours -f "$SQL/w3_zipf.sql" -D users=$USERS -D zipf=1.1 -c 16)"
        ours+=" $a"; eo=$((eo + b))
    done
    result W3 "simple-update, 16 clients" "$base" "$ours" w3-simple-update w3-ours $eo $eb \
        "report" - "random_zipfian(1, 100000, 1.1): user 1 gets ~12% of the calls; it held $lots lots with points at the start (every earn is a lot; W2 earned on it)"
}

# ---- W4: W1 with 10% replayed idempotency keys ------------------------------
w4() {
    local base="" ours="" eb=0 eo=0 r a b keyed
    log "W4: $KEYS keyed earns, then W1 vs W1 with 10% replays, $ROUNDS round(s)"
    PGOPTIONS="-c bench.keys=$KEYS" q -f "$SQL/keys_setup.sql" || return 1
    for ((r = 1; r <= ROUNDS; r++)); do
        read -r a b <<<"$(pgb w4-w1 -f "$SQL/w1_earn_use.sql" "${W1ARGS[@]}")"; base+=" $a"; eb=$((eb + b))
        read -r a b <<<"$(pgb w4-ours -f "$SQL/w4_replay.sql" "${W1ARGS[@]}" -D keys=$KEYS)"
        ours+=" $a"; eo=$((eo + b))
    done
    keyed=$(q -c "SELECT count(*) FROM points.ledger WHERE idempotency_key LIKE 'w4-%'")
    result W4 "W1 (no keys)" "$base" "$ours" w4-w1 w4-ours $eo $eb ">=0.9x W1" 0.9 \
        "ledger rows with a w4 key after the runs: $keyed (must be $KEYS: replays wrote nothing)" \
        "$([[ $keyed == "$KEYS" ]] && echo 1 || echo 0)"
}

# ---- W5: the outbox relay publishing to the test broker ---------------------
KDIR=$OUT/kafka
broker_up() {
    # shellcheck source=../test/kafka/brokerctl.sh
    source "$ROOT/test/kafka/brokerctl.sh"
    BOOTSTRAP=$(broker_start "$KDIR" 3 12 points.events) || return 1
    broker_cmd "$KDIR" "topic bench.raw 12" || return 1
    log "W5: mock broker at $BOOTSTRAP"
}
w5() {
    local base="" ours="" eb=0 eo=0 r a b n t p drain_s lag after pub0
    broker_up || { log "W5: no broker"; return 1; }
    pub0=$(q -c "SELECT events_published FROM points.worker_status")

    # raw produce rate of the same broker
    perl -e 'for $i (1..$ARGV[0]) { print "$i ", 9000000 + $i % 100000, " 1 $i points.earned\n" }' \
        "$RAW_EVENTS" >"$KDIR/raw.txt"
    t=$(date +%s.%N)
    timeout 300 "$ROOT/test/kafka/produce_events" --bootstrap "$BOOTSTRAP" --topic bench.raw \
        <"$KDIR/raw.txt" >/dev/null 2>"$KDIR/raw.err"
    t=$(calc "$(date +%s.%N) - $t")
    extra "W5 raw produce rate (produce_events, idempotent, acks=all)" \
        "$(fmt "$(calc "$RAW_EVENTS / $t")") events/s" "-" report "$RAW_EVENTS events in ${t}s: $(tail -1 "$KDIR/raw.err")"

    # drain: the backlog the earlier workloads left (at most DRAIN_MAX rows)
    n=$(q -c "SELECT count(*) FROM points.outbox")
    if ((n > DRAIN_MAX)); then
        q -c "DELETE FROM points.outbox WHERE id <= (SELECT id FROM points.outbox ORDER BY id DESC OFFSET $DRAIN_MAX LIMIT 1)"
        n=$(q -c "SELECT count(*) FROM points.outbox")
    fi
    if ((n < 1000)); then   # W5 alone: make a backlog
        q -c "DO \$\$ BEGIN FOR c IN 0..19 LOOP PERFORM points.earn(u, 1) FROM generate_series(c * 1000 + 1, c * 1000 + 1000) u; COMMIT; END LOOP; END \$\$"
        n=$(q -c "SELECT count(*) FROM points.outbox")
    fi
    log "W5: draining $n events"
    set_guc points.kafka_brokers "$BOOTSTRAP"
    drain_s=$(wait_until 600 "$outbox_empty")
    if [[ $drain_s == timeout ]]; then
        extra "W5 drain rate" "timeout (600 s)" ">=5000 events/s" MISS "$n events"
    else
        a=$(calc "$n / $drain_s")
        extra "W5 drain rate (backlog -> broker acks -> rows deleted)" "$(fmt "$a") events/s" \
            ">=5000 events/s" "$(verdict_ge "$a" 5000)" "$n events in ${drain_s}s, from setting points.kafka_brokers (reload)"
    fi

    log "W5: W1 without publishing vs W1 publishing, $ROUNDS round(s)"
    after=""
    for ((r = 1; r <= ROUNDS; r++)); do
        set_guc points.kafka_brokers ""
        read -r a b <<<"$(pgb w5-w1 -f "$SQL/w1_earn_use.sql" "${W1ARGS[@]}")"; base+=" $a"; eb=$((eb + b))
        set_guc points.kafka_brokers "$BOOTSTRAP"
        wait_until 300 "$outbox_empty" >/dev/null    # the baseline's events, not timed
        read -r a b <<<"$(pgb w5-ours -f "$SQL/w1_earn_use.sql" "${W1ARGS[@]}")"; ours+=" $a"; eo=$((eo + b))
        after+=" $(wait_until 300 "$outbox_empty")"
    done
    # The lag is sampled in a publishing run of its own, under the same W1
    # load: the probe (an earn every 20 ms, its outbox row polled every 2 ms,
    # ~400 queries/s) would otherwise load only the publishing side of the
    # ratio (~3% of the machine, measured).
    "$BENCH/probe" lag --seconds "$SECS" --lo 1 --hi $USERS --interval-ms 20 \
        >"$OUT/runs/lag-1.txt" 2>"$OUT/runs/lag-1.err" &
    lag=$!
    read -r a b <<<"$(pgb w5-lag -f "$SQL/w1_earn_use.sql" "${W1ARGS[@]}")"
    wait $lag
    wait_until 300 "$outbox_empty" >/dev/null
    result W5 "W1 without publishing" "$base" "$ours" w5-w1 w5-ours $eo $eb ">=0.9x" 0.9 \
        "outbox empty after the publishing runs stopped within:$after s; the lag run (probe on) did $a TPS"
    # the lag samples of all rounds
    cat "$OUT"/runs/lag-*.txt >&2
    lag=$(perl -e '
        my (@p99, @p50, $n, $to);
        for my $f (@ARGV) { open my $h, "<", $f or next; my $l = <$h> // next;
            push @p99, $1 if $l =~ /p99_ms=([\d.]+)/; push @p50, $1 if $l =~ /p50_ms=([\d.]+)/;
            $n += $1 if $l =~ /samples=(\d+)/; $to += $1 if $l =~ /errors=(\d+)/; }
        @p99 = sort { $a <=> $b } @p99;
        printf "%.0f %.0f %d %d", $p99[-1] // 0, (sort { $a <=> $b } @p50)[int($#p50 / 2)] // 0, $n, $to;' \
        "$OUT"/runs/lag-*.txt)
    read -r a b n t <<<"$lag"
    extra "W5 commit-to-ack lag p99 (p50)" "${a} ms (p50 ${b} ms)" "<1000 ms" \
        "$( ((n > 0 && t == 0)) && verdict_le "$a" 1000 || echo MISS)" \
        "$n samples during a publishing W1 run of its own; each: earn commits, then its outbox row polled every 2 ms until the worker deleted it after the ack; $t not acked within 30 s"

    set_guc points.kafka_brokers ""
    # what the broker holds: the sum of the partitions' end offsets (kept
    # even where the mock's 5 MiB retention dropped old messages; nothing is
    # read back here) against what the relay counted as acknowledged
    n=$(timeout 30 kcat -b "$BOOTSTRAP" -Q $(for ((p = 0; p < 12; p++)); do echo "-t points.events:$p:-1"; done) 2>/dev/null |
        awk '{ s += $NF } END { print s + 0 }')
    a=$(($(q -c "SELECT events_published FROM points.worker_status") - pub0))
    extra "W5 messages on the topic (end offsets) / events the relay saw acked" "$n / $a" ">= (at least once)" \
        "$( ((n >= a && a > 0)) && echo met || echo MISS)" ""
    broker_stop "$KDIR"
}

# ---- W6: expiry of 1,000,000 due lots ---------------------------------------
w6() {
    local lots=$((W6_USERS * 10)) stop=$OUT/runs/w6.stop out secs rate p99i p99d l0 l1 wal
    log "W6: loading $lots due lots ($W6_USERS users x 10)"
    q -v ubase=$W6_BASE -v nu=$W6_USERS -v k=10 -v amount=10 -v created="now() - interval '2 days'" \
        -v expires="now() - interval '1 hour' + s * interval '1 second'" -v reason="bench w6" \
        -f "$SQL/load_lots.sql" || return 1
    quiesce
    log "W6: probe earns of other users, idle"
    probe_load w6-idle
    log "W6: expire_due(10000) until done, probe meanwhile"
    rm -f "$stop"
    probe_load w6-during "$stop" &
    l0=$(lsn)
    out=$(PGOPTIONS="-c bench.batch=10000 -c bench.max_s=600" psql -X -q -f "$SQL/expire_loop.sql" 2>&1)
    l1=$(lsn)
    touch "$stop"
    wait
    echo "$out" >&2
    read -r n secs <<<"$(echo "$out" | sed -n 's/.*expired \([0-9]*\) lots in [0-9]* calls, \([0-9.]*\) s.*/\1 \2/p')"
    rate=$(calc "${n:-0} / ${secs:-1}")
    wal=$(wal_bytes "$l0" "$l1")
    extra "W6 expiry rate (expire_due(10000) loop, $W6_USERS users x 10 lots)" "$(fmt "$rate") lots/s" \
        ">=100000 lots/s" "$(verdict_ge "$rate" 100000)" \
        "${n:-0} lots in ${secs:-?} s; WAL $(calc "$wal / 1048576") MB, $(calc "$wal / ${n:-1}") bytes a lot (the probe's earns included)"
    p99i=$(kv p99_ms "$OUT/runs/probe-w6-idle.txt")
    p99d=$(kv p99_ms "$OUT/runs/probe-w6-during.txt")
    extra "W6 earn p99 of other users during expiry / idle" "${p99d} / ${p99i} ms" "<=2x idle" \
        "$(verdict_le "$p99d" "$(calc "2 * $p99i")")" \
        "probe: 4 threads, $PROBE_RATE earns/s open loop; p50 $(kv p50_ms "$OUT/runs/probe-w6-during.txt") / $(kv p50_ms "$OUT/runs/probe-w6-idle.txt") ms"
    [[ -z $(q -c "SELECT 1 FROM points.verify($((W6_BASE + 1))) UNION ALL SELECT 1 FROM points.verify($((W6_BASE + W6_USERS)))") ]] ||
        extra "W6 verify" "inconsistent" "-" MISS ""
}

# ---- W7: archiving 5,000,000 old ledger rows while W1 runs -------------------
w7() {
    local rows=$((W7_USERS * W7_PAIRS * 2)) base="" ours="" eb=0 eo=0 r a b arch=0 asecs=0 out left
    log "W7: loading $rows old ledger rows ($W7_USERS users x $((W7_PAIRS * 2)))"
    q -v ubase=$W7_BASE -v nu=$W7_USERS -v pairs=$W7_PAIRS -f "$SQL/load_old_ledger.sql" || return 1
    # rows two years old have been vacuumed on a real server (hint bits and
    # visibility map set); bulk-loaded, the first archive calls would set
    # them (a third of the speed of the later calls), and autovacuum would
    # take the 5,000,000 new rows on during one of the rounds
    q -c "VACUUM (ANALYZE) points.ledger, points.lot" -c "CHECKPOINT"
    log "W7: W1 alone vs W1 while archive(${W7_BATCH:-2000}) runs paced, $ROUNDS round(s)"
    for ((r = 1; r <= ROUNDS; r++)); do
        read -r a b <<<"$(pgb w7-w1 -f "$SQL/w1_earn_use.sql" "${W1ARGS[@]}")"; base+=" $a"; eb=$((eb + b))
        PGOPTIONS="-c bench.batch=${W7_BATCH:-2000} -c bench.rest=${W7_REST:-2} -c bench.max_s=$SECS" psql -X -q -f "$SQL/archive_loop.sql" \
            >"$OUT/runs/w7-archive-$r.txt" 2>&1 &
        read -r a b <<<"$(pgb w7-ours -f "$SQL/w1_earn_use.sql" "${W1ARGS[@]}")"; ours+=" $a"; eo=$((eo + b))
        wait
        out=$(sed -n 's/.*archived \([0-9]*\) rows in [0-9]* calls, \([0-9.]*\) s.*/\1 \2/p' "$OUT/runs/w7-archive-$r.txt")
        cat "$OUT/runs/w7-archive-$r.txt" >&2
        read -r a b <<<"$out"
        arch=$((arch + ${a:-0})); asecs=$(calc "$asecs + ${b:-0}")
    done
    left=$(q -c "SELECT count(*) FROM points.ledger WHERE created_at < now() - interval '365 days'")
    result W7 "W1 alone" "$base" "$ours" w7-w1 w7-ours $eo $eb ">=0.8x during archiving" 0.8 \
        "archived $arch of $rows rows during the runs; $left old rows left afterwards$([[ $left == 0 ]] && echo ' (archiving finished early: later runs were not all during it)')"
    extra "W7 archive rate while W1 runs" "$(fmt "$(calc "$arch / ($asecs + 0.001)")") rows/s" "-" report \
        "$arch rows in ${asecs}s of paced archive(${W7_BATCH:-2000}) calls"
    [[ -z $(q -c "SELECT 1 FROM points.verify($((W7_BASE + 1))) UNION ALL SELECT 1 FROM points.verify($((W7_BASE + W7_USERS)))") ]] ||
        extra "W7 verify" "inconsistent" "-" MISS ""
}

# ---- W8: the Redis-lock design vs points.earn --------------------------------
w8() {
    local shape threads users f base ours eb eo p op50 op99 bp50 bp99 chk rmed rmin rmax bmed omed ok note verdict
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
        --daemonize yes --pidfile "$OUT/redis.pid" --logfile "$OUT/redis.log" --dir "$OUT" || return 1
    for ((i = 0; i < 50; i++)); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
    for shape in hot cold; do
        if [[ $shape == hot ]]; then threads=32 users=1; else threads=8 users=$USERS; fi
        log "W8 $shape: $threads threads, $users user(s), $ROUNDS round(s) of A (Redis lock) and B (points.earn)"
        f=$OUT/runs/w8-$shape.txt
        timeout $((ROUNDS * 2 * (SECS + 10) + 120)) "$BENCH/w8" --threads $threads --users $users \
            --runs "$ROUNDS" --seconds "$SECS" --redis-port "$REDIS_PORT" >"$f" 2>"$f.err"
        cat "$f" >&2
        base=$(awk '/^W8RUN design=A/ { for (i = 1; i <= NF; i++) if ($i ~ /^tps=/) printf " %s", substr($i, 5) }' "$f")
        ours=$(awk '/^W8RUN design=B/ { for (i = 1; i <= NF; i++) if ($i ~ /^tps=/) printf " %s", substr($i, 5) }' "$f")
        eb=$(awk '/^W8RUN design=A/ { for (i = 1; i <= NF; i++) if ($i ~ /^fail=/) s += substr($i, 6) } END { print s + 0 }' "$f")
        eo=$(awk '/^W8RUN design=B/ { for (i = 1; i <= NF; i++) if ($i ~ /^fail=/) s += substr($i, 6) } END { print s + 0 }' "$f")
        op50=$(sed -n 's/^W8POOL design=B .*p50_ms=\([0-9.]*\).*/\1/p' "$f"); op99=$(sed -n 's/^W8POOL design=B .*p99_ms=\([0-9.]*\).*/\1/p' "$f")
        bp50=$(sed -n 's/^W8POOL design=A .*p50_ms=\([0-9.]*\).*/\1/p' "$f"); bp99=$(sed -n 's/^W8POOL design=A .*p99_ms=\([0-9.]*\).*/\1/p' "$f")
        chk=$(grep '^W8CHECK' "$f")
        read -r bmed omed rmed rmin rmax <<<"$(ratio "$base" "$ours")"
        note="A check: ${chk#W8CHECK }"
        if [[ $shape == hot ]]; then
            ok=$(perl -e 'print(($ARGV[0] >= 0.9 && $ARGV[1] <= $ARGV[2] / 2 && $ARGV[3] == 0) ? "met" : "MISS")' \
                "$rmed" "${op99:-0}" "${bp99:-0}" "$eo")
            verdict=$ok
        else
            verdict=report
        fi
        [[ $chk == *ok=1* ]] || verdict="$verdict (check failed)"
        printf '%s\t%s\t%s\t%s\t%.2f\t%.2f\t%.2f\t%.2f\t%.2f\t%.2f\t%.2f\t%s\t%s\t%s\t%s\n' \
            "W8 $shape" "Redis lock + SQL, $threads threads" "$bmed" "$omed" "$rmed" "$rmin" "$rmax" \
            "${op50:-0}" "${op99:-0}" "${bp50:-0}" "${bp99:-0}" "$eo/$eb" \
            "$([[ $shape == hot ]] && echo ">=0.9x, p99 <= half, 0 failed" || echo report)" "$verdict" "$note" >>"$RES"
    done
    redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1
}

# ---- Q1: queued earns on one hot user (issue 8) -------------------------------
q1() {
    local base="" ours="" eb=0 eo=0 r a b t0 t1 d drains="" p99s="" worst=0
    log "Q1: hot row UPDATE vs earn_async(1, 10), 32 clients, $ROUNDS round(s)"
    wait_until 120 "$queue_empty" >/dev/null
    for ((r = 1; r <= ROUNDS; r++)); do
        read -r a b <<<"$(pgb q1-update -f "$SQL/w2_hot_update.sql" -c 32)"; base+=" $a"; eb=$((eb + b))
        t0=$(q -c "SELECT clock_timestamp()")
        read -r a b <<<"$(pgb q1-ours -f "$SQL/q_hot_async.sql" -c 32)"; ours+=" $a"; eo=$((eo + b))
        d=$(wait_until 120 "$queue_empty")
        drains+=" $d"
        a=$(q -c "SELECT round(1000 * extract(epoch FROM percentile_disc(0.99) WITHIN GROUP (ORDER BY applied_at - queued_at)))
                  FROM points.request WHERE user_id = 1 AND queued_at >= '$t0'")
        p99s+=" ${a:-?}"
        [[ ${a:-0} =~ ^[0-9]+$ ]] && ((a > worst)) && worst=$a
    done
    b=$(q -c "SELECT count(*) FILTER (WHERE state = 'rejected') FROM points.request WHERE user_id = 1")
    result Q1 "UPDATE one row, 32 clients" "$base" "$ours" q1-update q1-ours $eo $eb ">=3x" 3 \
        "rejected requests: $b"
    extra "Q1 queue empty after the load stopped (each round)" "${drains# } s" "a few s" \
        "$(perl -e 'my $m = 0; for (@ARGV) { $m = 999 unless /^[\d.]+$/; $m = $_ if $_ > $m } print $m <= 5 ? "met" : "MISS"' $drains)" ""
    extra "Q1 p99 of applied_at - queued_at (each round)" "${p99s# } ms" "report" report \
        "queued_at = the earn_async call, applied_at = start of the apply_queued batch"
}

# ---- Q2: the campaign (issue 8) -------------------------------------------------
q2() {
    local stmt t0 tq tc te apply rate sum1 sum2 n2 p99i p99d l0 l1 l2 wq wa stop=$OUT/runs/q2.stop
    stmt="SELECT count(points.earn_async(u, 100, idempotency_key => 'campaign-1')) FROM generate_series(1, $CAMPAIGN) u"
    wait_until 120 "$queue_empty" >/dev/null
    quiesce
    log "Q2: probe earns of other users, idle"
    probe_load q2-idle
    log "Q2: campaign of $CAMPAIGN earn_async"
    rm -f "$stop"
    t0=$(db_now)
    l0=$(lsn)
    q -c "$stmt" >/dev/null || return 1
    l1=$(lsn)
    tc=$(db_now)
    probe_load q2-during "$stop" &
    te=$(wait_until "$Q2_WAIT" "$queue_empty")
    l2=$(lsn)
    touch "$stop"
    wait
    tq=$(calc "$tc - $t0")
    wq=$(wal_bytes "$l0" "$l1")
    wa=$(wal_bytes "$l1" "$l2")
    extra "Q2 campaign: time to queue $CAMPAIGN requests (one statement)" "${tq} s" "-" report \
        "$(fmt "$(calc "$CAMPAIGN / $tq")") requests/s; WAL $(calc "$wq / 1048576") MB to queue, $(calc "$wa / 1048576") MB to apply ($(calc "($wq + $wa) / $CAMPAIGN") bytes an earn in all, the probe's earns included)"
    if [[ $te == timeout ]]; then
        extra "Q2 campaign: apply rate" "not done in $Q2_WAIT s" ">=50000/s" MISS \
            "$(q -c "SELECT count(*) FROM points.request WHERE state = 'queued'") of $CAMPAIGN still queued: < $(fmt "$(calc "$CAMPAIGN / $Q2_WAIT")")/s"
        # the replay check needs the campaign applied
        if ! wait_until $((Q2_WAIT / 2)) "$queue_empty" >/dev/null; then
            extra "Q2 campaign again: balances unchanged" "not checked" "yes" MISS \
                "the campaign was not applied within $((Q2_WAIT * 3 / 2)) s"
            return 0
        fi
    else
        rate=$(calc "$CAMPAIGN / $te")
        extra "Q2 campaign: worker apply rate (commit -> queue empty)" "$(fmt "$rate") earns/s" ">=50000/s" \
            "$(verdict_ge "$rate" 50000)" "$CAMPAIGN requests applied in ${te}s"
    fi
    p99i=$(kv p99_ms "$OUT/runs/probe-q2-idle.txt")
    p99d=$(kv p99_ms "$OUT/runs/probe-q2-during.txt")
    extra "Q2 earn p99 of other users during the apply / idle" "${p99d} / ${p99i} ms" "<=2x idle" \
        "$(verdict_le "$p99d" "$(calc "2 * $p99i")")" \
        "probe: 4 threads, $PROBE_RATE earns/s open loop; p50 $(kv p50_ms "$OUT/runs/probe-q2-during.txt") / $(kv p50_ms "$OUT/runs/probe-q2-idle.txt") ms"
    # the same statement again changes no balance
    sum1=$(q -c "SELECT sum(balance) FROM points.account WHERE user_id BETWEEN 1 AND $CAMPAIGN")
    t0=$(db_now)
    q -c "$stmt" >/dev/null
    tc=$(db_now)
    te=$(wait_until $((Q2_WAIT * 3 / 5)) "$queue_empty")
    psql -X -x -c "SELECT * FROM points.worker_status" >"$OUT/runs/q2-worker-status.txt" 2>&1
    sum2=$(q -c "SELECT sum(balance) FROM points.account WHERE user_id BETWEEN 1 AND $CAMPAIGN")
    n2=$(q -c "SELECT count(*) FROM points.ledger WHERE idempotency_key = 'campaign-1'")
    extra "Q2 campaign again: balances unchanged" "$([[ $sum1 == "$sum2" ]] && echo yes || echo NO)" "yes" \
        "$([[ $sum1 == "$sum2" && $n2 == "$CAMPAIGN" ]] && echo met || echo MISS)" \
        "sum of balances $sum1 -> $sum2; ledger rows with the key: $n2; replay queued in $(calc "$tc - $t0") s, resolved in $te s"
}

# pgss NAME - with --profile: save the top statements since the last call
pgss() {
    [[ $PROFILE == 1 ]] || return 0
    q -c "CREATE EXTENSION IF NOT EXISTS pg_stat_statements" 2>/dev/null
    psql -X -P pager=off -c "
        SELECT calls, round(total_exec_time::numeric) AS total_ms,
               round(mean_exec_time::numeric, 3) AS mean_ms,
               round(shared_blks_hit::numeric / greatest(calls, 1), 1) AS hits_per_call,
               round(wal_records::numeric / greatest(calls, 1), 1) AS wal_recs_per_call,
               round(rows::numeric / greatest(calls, 1), 1) AS rows_per_call,
               left(regexp_replace(query, '\s+', ' ', 'g'), 140) AS query
        FROM pg_stat_statements ORDER BY total_exec_time DESC LIMIT 25" >"$OUT/pgss-$1.txt" 2>&1
    q -c "SELECT pg_stat_statements_reset()" >/dev/null 2>&1
}

# ---- main --------------------------------------------------------------------
machine
setup || { log "set-up failed"; exit 1; }
pgss setup
for w in W1 W2 W3 W4 W8 Q1 W5 W6 Q2 W7; do
    if want "$w"; then
        t=$SECONDS
        "${w,,}" || log "$w failed (see above)"
        log "$w took $((SECONDS - t)) s"
        pgss "$w"
    fi
done
PGOPTIONS="-c statement_timeout=300s" q -c "SELECT count(*) FROM points.verify()" >"$OUT/verify.txt" 2>&1
extra "points.verify() after all workloads: inconsistent accounts" "$(cat "$OUT/verify.txt")" "0" \
    "$([[ $(cat "$OUT/verify.txt") == 0 ]] && echo met || echo MISS)" ""
# the server log (pg_virtualenv removes the cluster on exit)
cp "$(dirname "${PG_CLUSTER_CONF_ROOT:-/nonexistent}")/log/postgresql-15-regress.log" "$OUT/server.log" 2>/dev/null
perl "$BENCH/summarize.pl" table "$RES" "$EXTRA" "$MACHINE" | tee "$OUT/table.txt"
