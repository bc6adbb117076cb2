-- W7 set-up: bulk-load :nu users (ids :ubase+1 ..), each with :pairs
-- pairs (at most 150) of ledger rows about two years old: pair j is an earn
-- of 10 points 2j days after two years ago, and a day later the expire of
-- its lot, so created_at grows with user_seq.  Consistent as points.verify()
-- checks it: every lot (one per earn, remaining 0), the ledger (sum 0) and
-- the account (balance 0, last_seq = 2 x :pairs) agree.  No outbox rows
-- (published long ago).  Every row is older than points.archive_after
-- (365 days).
\set ON_ERROR_STOP on
BEGIN;
SELECT nextval('points.tx_seq') AS base \gset
SELECT setval('points.tx_seq', :base + :nu::bigint * :pairs * 2) \g /dev/null
INSERT INTO points.account (user_id, balance, last_seq, created_at, updated_at)
SELECT :ubase + u, 0, 2 * :pairs, now() - interval '2 years', now() - interval '2 years'
FROM generate_series(1, :nu) u;
INSERT INTO points.ledger (tx_id, user_id, user_seq, kind, amount, balance_after,
                           idempotency_key, cancels_tx, reason, metadata, created_at)
SELECT :base + (u - 1)::bigint * :pairs * 2 + s, :ubase + u, s,
       CASE WHEN s % 2 = 1 THEN 'earn' ELSE 'expire' END,
       CASE WHEN s % 2 = 1 THEN 10 ELSE -10 END,
       CASE WHEN s % 2 = 1 THEN 10 ELSE 0 END,
       NULL, NULL,
       CASE WHEN s % 2 = 1 THEN 'bench w7' END,
       CASE WHEN s % 2 = 0 THEN jsonb_build_object('lot_id', :base + (u - 1)::bigint * :pairs * 2 + s - 1) END,
       now() - interval '2 years' + ((s + 1) / 2) * interval '2 days' + (s % 2 = 0)::int * interval '1 day'
FROM generate_series(1, :nu) u, generate_series(1, 2 * :pairs) s;
INSERT INTO points.lot (lot_id, user_id, amount, remaining, expires_at)
SELECT :base + (u - 1)::bigint * :pairs * 2 + 2 * j - 1, :ubase + u, 10, 0,
       now() - interval '2 years' + j * interval '2 days' + interval '1 day'
FROM generate_series(1, :nu) u, generate_series(1, :pairs) j;
COMMIT;
ANALYZE points.account;
ANALYZE points.ledger;
ANALYZE points.lot;
