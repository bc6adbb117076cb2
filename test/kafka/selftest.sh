#!/usr/bin/env bash
# selftest.sh - proves the Kafka test tools work, without PostgreSQL
#
# This file owns the self-test of test/kafka: mock_broker and brokerctl.sh
# (start, commands, stop), produce_events, and consume_check (that it passes
# a correct topic and catches what is missing, unexpected, out of order or
# badly keyed).  Run it from anywhere:
#
#   test/kafka/selftest.sh          (or: make -C test/kafka selftest)
#
# Each check prints "ok N - name" or "not ok N - name" with its evidence; the
# last line is "P passed, F failed"; exit 0 only when nothing failed.  Set
# KEEP=1 to keep the work directory (logs, --out dumps) for a look.

set -u

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
make -s -C "$HERE" >/dev/null || { echo "selftest: build failed" >&2; exit 1; }
# shellcheck source=brokerctl.sh
source "$HERE/brokerctl.sh"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/kafka-selftest.XXXXXX")
BDIR=$WORK/broker
TOPIC=selftest.events
BG_PIDS=()
passed=0
failed=0
n=0

cleanup() {
    local pid
    for pid in "${BG_PIDS[@]}"; do
        kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
    done
    broker_stop "$BDIR"
    if [[ ${KEEP:-0} == 1 ]]; then
        echo "selftest: work directory kept: $WORK" >&2
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# report NAME STATUS [EVIDENCE-FILE]: count one check, show evidence on failure
report() {
    local name=$1 status=$2 evidence=${3:-}
    n=$((n + 1))
    if ((status == 0)); then
        passed=$((passed + 1))
        echo "ok $n - $name"
    else
        failed=$((failed + 1))
        echo "not ok $n - $name"
        [[ -n $evidence && -f $evidence ]] && sed 's/^/    # /' "$evidence"
    fi
}

# events FIRST_USER LAST_USER SEQS: lines "event_id user_id user_seq tx_id type"
events() {
    local u s
    for ((u = $1; u <= $2; u++)); do
        for ((s = 1; s <= $3; s++)); do
            echo "$((u * 1000 + s)) $u $s $((900000 + u * 1000 + s)) points.earned"
        done
    done
}

# expected < EVENTS: the expected-ledger lines user_id<TAB>user_seq<TAB>tx_id
expected() {
    awk 'NF >= 4 { printf "%s\t%s\t%s\n", $2, $3, $4 }'
}

produce() { # produce TOPIC [produce_events options] < EVENTS
    local topic=$1
    shift
    "$HERE/produce_events" --bootstrap "$BOOTSTRAP" --topic "$topic" --flush-timeout-ms 30000 "$@"
}

check() { # check TOPIC EXPECT-FILE OUT-NAME [consume_check options]: output in $WORK/OUT-NAME.txt
    local topic=$1 expect=$2 name=$3
    shift 3
    "$HERE/consume_check" --bootstrap "$BOOTSTRAP" --topic "$topic" --expect "$expect" \
        --out "$WORK/$name.dump" "$@" >"$WORK/$name.txt" 2>"$WORK/$name.err"
}

# ---------------------------------------------------------------------------
# 1. the broker starts and serves the topic
BOOTSTRAP=$(broker_start "$BDIR" 3 4 "$TOPIC")
status=$?
if ((status == 0)); then
    kcat -b "$BOOTSTRAP" -L -t "$TOPIC" -m 5 >"$WORK/meta.txt" 2>&1 &&
        grep -q ' 3 brokers:' "$WORK/meta.txt" &&
        grep -q "topic \"$TOPIC\" with 4 partitions" "$WORK/meta.txt" || status=1
else
    echo "broker_start failed" >"$WORK/meta.txt"
fi
report "broker starts: 3 brokers, topic with 4 partitions ($BOOTSTRAP)" $status "$WORK/meta.txt"
if ((status != 0)); then
    cat "$BDIR/broker.log" 2>/dev/null
    echo "$passed passed, $((failed + 1)) failed"
    exit 1
fi

# ---------------------------------------------------------------------------
# 2. 20 users x 5 events, then user 3 seq 2 delivered again: consume_check passes
events 1 20 5 >"$WORK/ev1"
status=0
{ produce "$TOPIC" <"$WORK/ev1" && grep '^3002 ' "$WORK/ev1" | produce "$TOPIC"; } 2>"$WORK/p2.err" || status=1
expected <"$WORK/ev1" >"$WORK/expect1"
if ((status == 0)); then
    check "$TOPIC" "$WORK/expect1" c2 --timeout-ms 10000 || status=1
    grep -qx 'consumed=101 distinct=100 redelivered=1 missing=0 unexpected=0 order_errors=0 format_errors=0' \
        "$WORK/c2.txt" || status=1
    # the check only means something if users were spread over partitions
    (($(cut -f1 "$WORK/c2.dump" | sort -u | wc -l) > 1)) || status=1
fi
cat "$WORK/p2.err" "$WORK/c2.txt" "$WORK/c2.err" >"$WORK/t2.txt" 2>/dev/null
report "consume_check passes 100 events + 1 redelivery: $(tail -n1 "$WORK/c2.txt" 2>/dev/null)" $status "$WORK/t2.txt"

# ---------------------------------------------------------------------------
# 3. an expected row that was never produced: FAIL, non-zero exit
{ cat "$WORK/expect1"; printf '21\t1\t921001\n'; } >"$WORK/expect3"
status=0
if check "$TOPIC" "$WORK/expect3" c3 --timeout-ms 2000; then status=1; fi
grep -q '^FAIL: user 21 seq 1 tx 921001 was never delivered' "$WORK/c3.txt" || status=1
grep -q ' missing=1 unexpected=0 ' "$WORK/c3.txt" || status=1
report "missing event: consume_check fails: $(grep -m1 '^FAIL' "$WORK/c3.txt")" $status "$WORK/c3.txt"

# ---------------------------------------------------------------------------
# 4. a published event the ledger does not hold (rolled back): FAIL
grep -v -x $'20\t5\t920005' "$WORK/expect1" >"$WORK/expect4"
status=0
if check "$TOPIC" "$WORK/expect4" c4 --timeout-ms 2000; then status=1; fi
grep -q '^FAIL: user 20 seq 5 tx 920005 .* is not expected' "$WORK/c4.txt" || status=1
grep -q ' missing=0 unexpected=1 order_errors=0 ' "$WORK/c4.txt" || status=1
report "unexpected event: consume_check fails: $(grep -m1 '^FAIL' "$WORK/c4.txt")" $status "$WORK/c4.txt"

# ---------------------------------------------------------------------------
# 5. order, key and header checks, on a topic of their own
status=0
broker_cmd "$BDIR" "topic selftest.bad 2" 2>"$WORK/t5.err" || status=1
{
    printf '7001 7 1 907001 points.earned\n7003 7 3 907003 points.used\n7002 7 2 907002 points.earned\n'
    printf '8001 8 1 908001 points.earned 9\n'
} | produce selftest.bad 2>>"$WORK/t5.err" || status=1
printf '9001 9 1 909001 points.expired\n' | produce selftest.bad --no-headers 2>>"$WORK/t5.err" || status=1
printf '7\t1\t907001\n7\t2\t907002\n7\t3\t907003\n8\t1\t908001\n9\t1\t909001\n' >"$WORK/expect5"
if check selftest.bad "$WORK/expect5" c5 --timeout-ms 2000; then status=1; fi
grep -q '^FAIL: user 7: seq 3 first delivered .* before seq 2' "$WORK/c5.txt" || status=1
grep -q "^FAIL: .*: key '9' is not user_id 8" "$WORK/c5.txt" || status=1
grep -q '^FAIL: .*: header event_id missing (event_id 9001)' "$WORK/c5.txt" || status=1
grep -q '^FAIL: .*: header event_type missing (type points.expired)' "$WORK/c5.txt" || status=1
grep -q ' missing=0 unexpected=0 order_errors=2 format_errors=3$' "$WORK/c5.txt" || status=1
cat "$WORK/t5.err" "$WORK/c5.txt" >"$WORK/t5.txt"
report "order, key and header errors caught: $(tail -n1 "$WORK/c5.txt")" $status "$WORK/t5.txt"

# ---------------------------------------------------------------------------
# 6. down all: nothing is acknowledged; up all: the waiting producer finishes,
#    a new producer succeeds, and every event is there
status=0
: >"$WORK/t6.txt"
broker_cmd "$BDIR" "down all" 2>>"$WORK/t6.txt" || status=1
if kcat -b "$BOOTSTRAP" -L -m 2 >>"$WORK/t6.txt" 2>&1; then
    echo "kcat -L answered while every broker was down" >>"$WORK/t6.txt"
    status=1
fi
events 30 39 3 >"$WORK/ev6a"
# the binary itself in the background (not the function, which would be a
# subshell), so that cleanup's kill reaches it
"$HERE/produce_events" --bootstrap "$BOOTSTRAP" --topic "$TOPIC" --flush-timeout-ms 30000 \
    <"$WORK/ev6a" 2>"$WORK/p6a.err" &
producer=$!
BG_PIDS+=("$producer")
sleep 2
if ! _broker_alive "$producer"; then
    echo "the producer finished while every broker was down" >>"$WORK/t6.txt"
    status=1
fi
broker_cmd "$BDIR" "up all" 2>>"$WORK/t6.txt" || status=1
wait "$producer" || { echo "the producer started while down failed" >>"$WORK/t6.txt"; status=1; }
BG_PIDS=()
events 40 44 3 >"$WORK/ev6b"
produce "$TOPIC" <"$WORK/ev6b" 2>"$WORK/p6b.err" || { echo "produce after up all failed" >>"$WORK/t6.txt"; status=1; }
cat "$WORK/expect1" >"$WORK/expect6"
expected <"$WORK/ev6a" >>"$WORK/expect6"
expected <"$WORK/ev6b" >>"$WORK/expect6"
check "$TOPIC" "$WORK/expect6" c6 --timeout-ms 10000 || status=1
grep -q ' distinct=145 redelivered=1 missing=0 unexpected=0 order_errors=0 format_errors=0$' \
    "$WORK/c6.txt" || status=1
cat "$WORK/p6a.err" "$WORK/p6b.err" "$WORK/c6.txt" >>"$WORK/t6.txt"
report "down all / up all: producers deliver after up all: $(tail -n1 "$WORK/c6.txt")" $status "$WORK/t6.txt"

# ---------------------------------------------------------------------------
# 7. injected produce errors, a leader move and added latency: still delivered
#    complete and in order (one request in flight: see KAFKA.md on reordering)
status=0
: >"$WORK/t7.txt"
for c in "produce_errors 3 6" "produce_errors 2 7" "leader 0 2" "leader 1 3" "rtt all 20"; do
    broker_cmd "$BDIR" "$c" 2>>"$WORK/t7.txt" || status=1
done
events 50 59 4 >"$WORK/ev7"
produce "$TOPIC" -X max.in.flight.requests.per.connection=1 <"$WORK/ev7" 2>>"$WORK/t7.txt" || status=1
for c in "rtt all 0" "clear_errors"; do
    broker_cmd "$BDIR" "$c" 2>>"$WORK/t7.txt" || status=1
done
{ cat "$WORK/expect6"; expected <"$WORK/ev7"; } >"$WORK/expect7"
check "$TOPIC" "$WORK/expect7" c7 --timeout-ms 10000 || status=1
grep -q ' distinct=185 redelivered=1 missing=0 unexpected=0 order_errors=0 format_errors=0$' \
    "$WORK/c7.txt" || status=1
grep -q 'ok leader 0 2' "$BDIR/control.ack" || status=1
cat "$WORK/c7.txt" >>"$WORK/t7.txt"
report "produce errors 6 and 7, leader moves, rtt: $(tail -n1 "$WORK/c7.txt")" $status "$WORK/t7.txt"

# ---------------------------------------------------------------------------
# 8. bad commands are answered with an error, the broker keeps serving
status=0
: >"$WORK/t8.txt"
for c in "down 9" "bogus" "produce_errors x 6" "leader 0 7"; do
    if broker_cmd "$BDIR" "$c" 2>>"$WORK/t8.txt"; then
        echo "'$c' was accepted" >>"$WORK/t8.txt"
        status=1
    fi
done
(($(grep -c '^error ' "$BDIR/control.ack") == 4)) || status=1
broker_cmd "$BDIR" "up 1" 2>>"$WORK/t8.txt" || status=1
report "bad commands get 'error ...' acks: $(grep -m1 '^error ' "$BDIR/control.ack")" $status "$WORK/t8.txt"

# ---------------------------------------------------------------------------
# 9. quit: acknowledged, the process ends and removes its bootstrap file
status=0
pid=$(cat "$BDIR/broker.pid")
broker_cmd "$BDIR" quit 2>"$WORK/t9.txt" || status=1
for ((i = 0; i < 50; i++)); do
    _broker_alive "$pid" || break
    sleep 0.1
done
_broker_alive "$pid" && { echo "mock_broker still runs after quit" >>"$WORK/t9.txt"; status=1; }
[[ -e $BDIR/bootstrap ]] && { echo "bootstrap file left behind" >>"$WORK/t9.txt"; status=1; }
broker_stop "$BDIR"
report "quit stops the broker" $status "$WORK/t9.txt"

# ---------------------------------------------------------------------------
# 10. SIGTERM (broker_stop) stops a fresh broker; regular-file control works
status=0
BDIR2=$WORK/broker2
mkdir -p "$BDIR2"
: >"$BDIR2/control"   # a regular file: followed like tail -f
B2=$(broker_start "$BDIR2" 1 1 one) || status=1
if ((status == 0)); then
    echo "rtt 1 5" >>"$BDIR2/control"
    for ((i = 0; i < 50; i++)); do
        grep -qx 'ok rtt 1 5' "$BDIR2/control.ack" 2>/dev/null && break
        sleep 0.1
    done
    grep -qx 'ok rtt 1 5' "$BDIR2/control.ack" || status=1
    pid=$(cat "$BDIR2/broker.pid")
    broker_stop "$BDIR2"
    _broker_alive "$pid" && status=1
    grep -q 'stopping' "$BDIR2/broker.log" || status=1
fi
cat "$BDIR2/broker.log" >"$WORK/t10.txt" 2>/dev/null
report "regular-file control and SIGTERM stop (broker at $B2)" $status "$WORK/t10.txt"

echo "$passed passed, $failed failed"
((failed == 0))
