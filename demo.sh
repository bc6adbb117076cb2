#!/usr/bin/env bash
# The points demo, on a throwaway cluster and a local Kafka-protocol broker:
# earn, use, cancel, expiry by the worker, history, verify, archive, and the
# events arriving on the broker.  Run as root (it installs packages):
#     bash demo.sh
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
make -s -C test/kafka mock_broker >/dev/null

work=$(mktemp -d /tmp/points-demo.XXXXXX)
broker_pid=
cleanup() { [ -n "$broker_pid" ] && kill "$broker_pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

# a local broker: librdkafka's mock cluster, 3 brokers, topic with 3 partitions
test/kafka/mock_broker --brokers 3 --topic points.events --partitions 3 \
    --bootstrap-file "$work/bootstrap" 2>"$work/broker.log" &
broker_pid=$!
for _ in $(seq 50); do [ -s "$work/bootstrap" ] && break; sleep 0.1; done
brokers=$(cat "$work/bootstrap")
echo "broker: $brokers"

export DEMO_BROKERS="$brokers"
pg_virtualenv -t -o shared_preload_libraries=points -o points.expire_interval=1s \
    -o "points.kafka_brokers=$brokers" -c '-p 5459' bash -c '
set -euo pipefail
q() { echo; echo "points=# $*"; psql -X -q -P pager=off -c "$*"; }
psql -Xq -c "CREATE EXTENSION points"
echo "== a user earns, spends, gets a refund"
q "SELECT user_seq, kind, amount, balance_after FROM points.earn(42, 500, idempotency_key => '\''order-1001'\'', reason => '\''purchase'\'')"
q "SELECT user_seq, kind, amount, balance_after, replayed FROM points.earn(42, 500, idempotency_key => '\''order-1001'\'')   -- a retry: replayed, not paid twice"
q "SELECT user_seq, kind, amount, balance_after FROM points.use(42, 300, idempotency_key => '\''checkout-77'\'')"
q "SELECT user_seq, kind, amount, balance_after, cancels_tx FROM points.cancel((SELECT tx_id FROM points.history(42) WHERE kind = '\''use'\''), 120, reason => '\''item returned'\'')"
q "SELECT user_seq, kind, amount, balance_after FROM points.earn(42, 100, expires_at => clock_timestamp() + interval '\''2 seconds'\'', reason => '\''welcome bonus'\'')"
q "SELECT points.balance(42)"
q "SELECT lot_id, remaining, expires_at FROM points.expiring(42, '\''1 day'\'')"
q "SELECT * FROM points.use(42, 10000)   -- more than the user has: SQLSTATE PT001" || true
echo; echo "== the welcome bonus expires; the worker writes the expire transaction by itself"
sleep 3.5
q "SELECT points.balance(42)"
q "SELECT user_seq, kind, amount, balance_after, reason FROM points.history(42)"
q "SELECT * FROM points.verify()   -- no rows: every balance = its lots = its ledger"
echo; echo "== a campaign queues earns; the worker applies them (a second run pays nothing)"
q "SELECT count(points.earn_async(u, 50, idempotency_key => '\''black-friday'\'')) FROM generate_series(100, 199) u"
sleep 1
q "SELECT count(points.earn_async(u, 50, idempotency_key => '\''black-friday'\'')) FROM generate_series(100, 199) u"
sleep 1
q "SELECT state, count(*) FROM points.request GROUP BY state"
q "SELECT sum(points.balance(u)) AS campaign_points FROM generate_series(100, 199) u"
echo; echo "== archiving moves old ledger rows; history still sees them"
psql -Xq -c "ALTER SYSTEM SET points.archive_after = 0" -c "SELECT pg_reload_conf()" >/dev/null
q "SELECT points.archive()"
q "SELECT count(*) AS live_rows, (SELECT count(*) FROM points.ledger_archive) AS archived_rows FROM points.ledger"
q "SELECT count(*) AS history_rows FROM points.history(42)"
echo; echo "== the worker published every change to Kafka"
sleep 1
q "SELECT outbox_backlog, events_published, expire_total_lots, last_error FROM points.worker_status"
echo; echo "kcat -C -t points.events (partition, offset, key, value):"
kcat -b "$DEMO_BROKERS" -t points.events -C -e -q -f "%p %o key=%k %s\n" | sort -k1,1n -k2,2n
'
echo; echo "demo finished"
