-- Bulk-load :nu users (ids :ubase+1 ..), each with :k earns of :amount
-- points, consistent as points.verify() checks it: the account's balance =
-- the sum of its lots' remaining = the sum of its ledger's amounts, and
-- user_seq runs 1..:k.  The earns happened at :created (+ s seconds); their
-- lots expire at :expires (an SQL expression, may use s = 1..:k).  Their
-- events were published long ago: no outbox rows.
--   psql -v ubase=N -v nu=N -v k=N -v amount=N -v created=EXPR -v expires=EXPR -v reason=TEXT
\set ON_ERROR_STOP on
BEGIN;
SELECT nextval('points.tx_seq') AS base \gset
SELECT setval('points.tx_seq', :base + :nu::bigint * :k) \g /dev/null
INSERT INTO points.account (user_id, balance, last_seq, created_at, updated_at)
SELECT :ubase + u, :amount::bigint * :k, :k, :created, :created + :k * interval '1 second'
FROM generate_series(1, :nu) u;
INSERT INTO points.ledger (tx_id, user_id, user_seq, kind, amount, balance_after,
                           idempotency_key, cancels_tx, reason, metadata, created_at)
SELECT :base + (u - 1)::bigint * :k + s, :ubase + u, s, 'earn', :amount, :amount::bigint * s,
       NULL, NULL, :'reason', NULL, :created + s * interval '1 second'
FROM generate_series(1, :nu) u, generate_series(1, :k) s;
INSERT INTO points.lot (lot_id, user_id, amount, remaining, expires_at)
SELECT :base + (u - 1)::bigint * :k + s, :ubase + u, :amount, :amount, :expires
FROM generate_series(1, :nu) u, generate_series(1, :k) s;
COMMIT;
ANALYZE points.account;
ANALYZE points.ledger;
ANALYZE points.lot;
