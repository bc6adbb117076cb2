-- upgrade: install the oldest version, write data, ALTER EXTENSION points
-- UPDATE, and nothing written before has changed; the new functions work.
-- (pg_stat_statements' oldextversions test is the pattern.)  Run last: it
-- drops the extension and leaves a fresh one at the default version.
CREATE FUNCTION pg_temp.try(q text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN EXECUTE q; RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
  RETURN SQLSTATE || ': ' || SQLERRM;
END $$;
DROP EXTENSION points;
CREATE EXTENSION points VERSION '0.1';
SELECT extversion FROM pg_extension WHERE extname = 'points';
SELECT name, version, installed FROM pg_available_extension_versions
WHERE name = 'points' ORDER BY version;
SELECT * FROM pg_extension_update_paths('points') WHERE path IS NOT NULL ORDER BY source, target;
-- 0.1 has no monitoring functions
SELECT p.proname FROM pg_proc p WHERE p.pronamespace = 'points'::regnamespace ORDER BY 1;
SELECT count(*) AS worker_status_columns FROM information_schema.columns
WHERE table_schema = 'points' AND table_name = 'worker_status';

-- data written by 0.1: earns, uses, a cancel, idempotency keys, expiry,
-- archived rows, and queued requests
SELECT count(points.earn(u, 100 * (u - 1700), idempotency_key => 'welcome')) AS earns
FROM generate_series(1701, 1705) u;
SELECT count(points.use(u, 50, idempotency_key => 'order-1')) AS uses FROM generate_series(1701, 1705) u;
SELECT kind, amount, balance_after FROM points.cancel(
  (SELECT tx_id FROM points.ledger WHERE user_id = 1703 AND kind = 'use'), 20, idempotency_key => 'refund-1');
SELECT amount FROM points.earn(1704, 9, expires_at => clock_timestamp() + interval '100 ms');
SELECT pg_sleep(0.2);
SELECT points.expire_due();
SET points.archive_after = 0;
SELECT points.archive() AS archived;
RESET points.archive_after;
SELECT count(points.earn(u, 7, idempotency_key => 'after-archive')) AS more_earns
FROM generate_series(1701, 1703) u;
SELECT points.earn_async(1701, 3) > 0 AS queued;
SELECT points.apply_queued(1) AS applied;
SELECT count(points.earn_async(1705, 11, idempotency_key => 'queued-' || g)) AS queued
FROM generate_series(1, 2) g;

-- what must survive the update
CREATE TEMP TABLE b_balance AS
  SELECT u AS user_id, points.balance(u) AS balance FROM generate_series(1701, 1705) u;
CREATE TEMP TABLE b_history AS
  SELECT h.* FROM generate_series(1701, 1705) u, points.history(u, max_rows => 1000) h;
CREATE TEMP TABLE b_rows AS
  SELECT 'live' AS place, * FROM points.ledger UNION ALL SELECT 'archive', * FROM points.ledger_archive;
CREATE TEMP TABLE b_lots AS SELECT * FROM points.lot;
CREATE TEMP TABLE b_outbox AS SELECT * FROM points.outbox;
CREATE TEMP TABLE b_requests AS SELECT * FROM points.request;
SELECT place, count(*) FROM b_rows GROUP BY place ORDER BY place;
SELECT user_id, balance FROM b_balance ORDER BY user_id;
SELECT user_seq, kind, amount, balance_after, idempotency_key, cancels_tx IS NOT NULL AS cancels
FROM points.history(1703) ORDER BY user_seq;
SELECT * FROM points.verify();
SELECT state, count(*) FROM points.request GROUP BY state ORDER BY state;

-- the update
ALTER EXTENSION points UPDATE;
SELECT extversion FROM pg_extension WHERE extname = 'points';
SELECT p.proname FROM pg_proc p WHERE p.pronamespace = 'points'::regnamespace ORDER BY 1;
-- 0.3 keeps the CHECK constraints that guard the money, and they still refuse
SELECT conrelid::regclass AS "table", pg_get_constraintdef(oid) AS "check"
FROM pg_constraint WHERE connamespace = 'points'::regnamespace AND contype = 'c'
  AND conrelid IN ('points.account'::regclass, 'points.lot'::regclass, 'points.use_lot'::regclass,
                   'points.ledger'::regclass)
ORDER BY 1, 2;
SELECT pg_temp.try('UPDATE points.account SET balance = -1 WHERE user_id = 1701');
SELECT pg_temp.try('UPDATE points.lot SET remaining = amount + 1 WHERE user_id = 1701');
SELECT pg_temp.try('UPDATE points.use_lot SET restored = taken + 1');

-- nothing written before has changed
SELECT count(*) AS balances_changed FROM b_balance b WHERE points.balance(b.user_id) <> b.balance;
SELECT count(*) AS history_changed FROM (
  (SELECT h.* FROM generate_series(1701, 1705) u, points.history(u, max_rows => 1000) h
   EXCEPT ALL SELECT * FROM b_history)
  UNION ALL
  (SELECT * FROM b_history EXCEPT ALL
   SELECT h.* FROM generate_series(1701, 1705) u, points.history(u, max_rows => 1000) h)) d;
SELECT count(*) AS rows_changed FROM (
  (SELECT 'live' AS place, * FROM points.ledger UNION ALL SELECT 'archive', * FROM points.ledger_archive
   EXCEPT ALL SELECT * FROM b_rows)
  UNION ALL
  (SELECT * FROM b_rows EXCEPT ALL
   (SELECT 'live' AS place, * FROM points.ledger UNION ALL SELECT 'archive', * FROM points.ledger_archive))) d;
SELECT (SELECT count(*) FROM (TABLE points.lot EXCEPT ALL TABLE b_lots) d)
     + (SELECT count(*) FROM (TABLE b_lots EXCEPT ALL TABLE points.lot) d) AS lots_changed,
       (SELECT count(*) FROM (TABLE points.outbox EXCEPT ALL TABLE b_outbox) d)
     + (SELECT count(*) FROM (TABLE b_outbox EXCEPT ALL TABLE points.outbox) d) AS events_changed,
       (SELECT count(*) FROM (TABLE points.request EXCEPT ALL TABLE b_requests) d)
     + (SELECT count(*) FROM (TABLE b_requests EXCEPT ALL TABLE points.request) d) AS requests_changed;
SELECT * FROM points.verify();
-- keys written by 0.1 still answer replays, live and archived, and still refuse another amount
SELECT r.user_id, r.idempotency_key, r.replayed, r.tx_id = b.tx_id AS same_tx
FROM (VALUES (1701, 100, 'welcome'), (1702, 7, 'after-archive')) v(u, a, k),
     points.earn(v.u, v.a, v.k) r
JOIN b_rows b ON b.user_id = r.user_id AND b.idempotency_key = r.idempotency_key
ORDER BY r.user_id;
SELECT replayed FROM points.use(1704, 50, 'order-1');
SELECT replayed FROM points.cancel(
  (SELECT tx_id FROM b_rows WHERE user_id = 1703 AND kind = 'use'), 20, idempotency_key => 'refund-1');
SELECT regexp_replace(pg_temp.try('SELECT points.earn(1703, 1, ''welcome'')'), 'transaction \d+', 'transaction T');
-- the requests queued under 0.1 are applied by 0.2, once
SELECT points.apply_queued();
SELECT q.state, q.error FROM points.request q WHERE q.user_id = 1705 ORDER BY q.request_id;
SELECT points.balance(1705) - (SELECT balance FROM b_balance WHERE user_id = 1705) AS added;
SELECT count(points.earn_async(1705, 11, idempotency_key => 'queued-' || g)) AS queued_again
FROM generate_series(1, 2) g;
SELECT points.apply_queued();
SELECT points.balance(1705) - (SELECT balance FROM b_balance WHERE user_id = 1705) AS added;
SELECT * FROM points.verify();

-- the new functions work on the old data
SELECT op, calls >= 0 AS counted FROM points.stats();
SELECT count(*) AS alerts FROM points.alerts('100 years');
-- the rollup starts complete (rows written before the update, archived ones included)
CREATE FUNCTION pg_temp.direct()
RETURNS TABLE(day date, kind text, transactions bigint, points bigint, users bigint)
LANGUAGE sql AS $$
  SELECT (created_at AT TIME ZONE 'UTC')::date, kind, count(*), sum(amount), count(DISTINCT user_id)
  FROM (SELECT created_at, kind, amount, user_id FROM points.ledger UNION ALL
        SELECT created_at, kind, amount, user_id FROM points.ledger_archive) x
  GROUP BY 1, 2;
$$;
CREATE FUNCTION pg_temp.mismatches() RETURNS bigint LANGUAGE sql AS $$
  SELECT count(*) FROM (
    (SELECT * FROM points.daily('2000-01-01', '2100-01-01') EXCEPT ALL SELECT * FROM pg_temp.direct())
    UNION ALL
    (SELECT * FROM pg_temp.direct() EXCEPT ALL SELECT * FROM points.daily('2000-01-01', '2100-01-01'))) d;
$$;
-- the rows written since the update (replays add none) are not in it until detect_anomalies ran
SELECT kind, sum(transactions) AS transactions, sum(points) AS points
FROM points.daily('2000-01-01', '2100-01-01') GROUP BY kind ORDER BY kind;
SELECT done_upto = (SELECT max(tx_id) FROM b_rows) AS scan_starts_after_old_rows FROM points.scan_state;
CREATE PROCEDURE pg_temp.catch_up() LANGUAGE plpgsql AS $$
DECLARE
  target bigint;
  runs int := 0;
BEGIN
  SELECT coalesce(max(tx_id), 0) INTO target FROM (
    SELECT tx_id FROM points.ledger UNION ALL SELECT tx_id FROM points.ledger_archive) x;
  LOOP
    PERFORM points.detect_anomalies();
    runs := runs + 1;
    COMMIT;
    EXIT WHEN (SELECT done_upto FROM points.scan_state) >= target;
    IF runs >= 100 THEN
      RAISE EXCEPTION 'detect_anomalies did not reach tx % in % runs', target, runs;
    END IF;
    PERFORM pg_sleep(0.05);
  END LOOP;
END $$;
CALL pg_temp.catch_up();
SELECT pg_temp.mismatches();
SELECT count(*) AS alerts FROM points.alerts('100 years');
SELECT column_name FROM information_schema.columns
WHERE table_schema = 'points' AND table_name = 'worker_status' ORDER BY ordinal_position DESC LIMIT 2;

-- there is no way down with ALTER EXTENSION (roll back as the README says)
ALTER EXTENSION points UPDATE TO '0.1';

-- the upgraded schema is the one a fresh install has
CREATE TEMP TABLE upgraded AS
  SELECT 'function' AS what, p.oid::regprocedure::text AS name,
         pg_get_function_result(p.oid) || ' ' || p.prosecdef || ' ' || p.proisstrict || ' '
         || p.provolatile::text || ' ' || coalesce(array_to_string(p.proconfig, ','), '')
         || ' ' || coalesce(p.proacl::text, '') AS detail
  FROM pg_proc p WHERE p.pronamespace = 'points'::regnamespace
  UNION ALL
  SELECT c.relkind::text, c.relname, coalesce(string_agg(a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
         || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END, ', ' ORDER BY a.attnum), '')
         || ' ' || coalesce(c.relacl::text, '')
  FROM pg_class c LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
  WHERE c.relnamespace = 'points'::regnamespace GROUP BY c.relkind, c.relname, c.relacl::text
  UNION ALL
  SELECT 'constraint', conrelid::regclass::text || ' ' || conname, pg_get_constraintdef(oid)
  FROM pg_constraint WHERE connamespace = 'points'::regnamespace;
DROP EXTENSION points;
CREATE EXTENSION points;
SELECT extversion FROM pg_extension WHERE extname = 'points';
CREATE TEMP TABLE fresh AS
  SELECT 'function' AS what, p.oid::regprocedure::text AS name,
         pg_get_function_result(p.oid) || ' ' || p.prosecdef || ' ' || p.proisstrict || ' '
         || p.provolatile::text || ' ' || coalesce(array_to_string(p.proconfig, ','), '')
         || ' ' || coalesce(p.proacl::text, '') AS detail
  FROM pg_proc p WHERE p.pronamespace = 'points'::regnamespace
  UNION ALL
  SELECT c.relkind::text, c.relname, coalesce(string_agg(a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
         || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END, ', ' ORDER BY a.attnum), '')
         || ' ' || coalesce(c.relacl::text, '')
  FROM pg_class c LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
  WHERE c.relnamespace = 'points'::regnamespace GROUP BY c.relkind, c.relname, c.relacl::text
  UNION ALL
  SELECT 'constraint', conrelid::regclass::text || ' ' || conname, pg_get_constraintdef(oid)
  FROM pg_constraint WHERE connamespace = 'points'::regnamespace;
SELECT count(*) > 50 AS compared FROM fresh;
(TABLE upgraded EXCEPT TABLE fresh) UNION ALL (TABLE fresh EXCEPT TABLE upgraded);
-- and the fresh one works
SELECT user_seq, amount, balance_after FROM points.earn(1, 10);
SELECT * FROM points.verify();

-- the extension made again in a transaction that rolls back, and its schema
-- renamed in one: the relations a session found by name before are not
-- used after such a change (its cache is emptied), and again after the
-- rollback
SELECT user_seq FROM points.use(1, 3);
BEGIN;
DROP EXTENSION points;
CREATE EXTENSION points;
SELECT user_seq, amount FROM points.earn(1, 11);
ROLLBACK;
SELECT user_seq, amount FROM points.earn(1, 12);
BEGIN;
ALTER SCHEMA points RENAME TO points_renamed;
SELECT points_renamed.earn(1, 1);
ROLLBACK;
SELECT user_seq, amount FROM points.earn(1, 13);
SELECT * FROM points.verify();
