-- stats: per-operation counters in shared memory, counted also for calls
-- that fail and roll back.  They are cluster-wide, so every check compares
-- a delta against a snapshot taken just before.
CREATE FUNCTION pg_temp.try(q text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN EXECUTE q; RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
  RETURN SQLSTATE || ': ' || regexp_replace(SQLERRM, 'transaction \d+', 'transaction T', 'g');
END $$;
CREATE TEMP TABLE snap AS SELECT * FROM points.stats();
CREATE FUNCTION pg_temp.snap() RETURNS void LANGUAGE sql AS $$
  DELETE FROM snap; INSERT INTO snap SELECT * FROM points.stats();
$$;
-- what changed since the snapshot (times only as "did it grow")
CREATE FUNCTION pg_temp.delta()
RETURNS TABLE(op text, calls bigint, failures bigint, lock_timeouts bigint, points bigint,
              timed boolean, max_ok boolean)
LANGUAGE sql AS $$
  SELECT s.op, s.calls - b.calls, s.failures - b.failures, s.lock_timeouts - b.lock_timeouts,
         s.points - b.points, s.total_ms >= b.total_ms AND (s.calls = b.calls OR s.total_ms > b.total_ms),
         s.max_ms >= b.max_ms AND s.max_ms <= s.total_ms
  FROM points.stats() s JOIN snap b USING (op)
  WHERE (s.calls, s.failures, s.lock_timeouts, s.points) <> (b.calls, b.failures, b.lock_timeouts, b.points)
  ORDER BY s.op;
$$;

-- one row per operation, with the SPEC's columns
SELECT op FROM points.stats();
SELECT pg_get_function_result('points.stats()'::regprocedure);
-- the counters are consistent with each other
SELECT op, calls >= failures AS calls_ge_failures, failures >= lock_timeouts AS failures_ge_timeouts,
       total_ms >= 0 AND max_ms >= 0 AND lock_wait_ms >= 0 AS times_ok
FROM points.stats();

-- successes: calls and points moved
SELECT pg_temp.snap();
SELECT user_seq, amount FROM points.earn(1301, 100);
SELECT user_seq, amount FROM points.earn(1301, 50);
SELECT tx_id AS use_tx FROM points.use(1301, 30) \gset
SELECT * FROM pg_temp.delta();

-- a failed use is counted: a call and a failure, no points
SELECT pg_temp.snap();
SELECT points.use(1301, 1000);
SELECT * FROM pg_temp.delta();

-- a cancel moves the points it restores
SELECT pg_temp.snap();
SELECT kind, amount FROM points.cancel(:use_tx);
SELECT * FROM pg_temp.delta();

-- bad input is a failed call as well (22004, 22023, P0002)
SELECT pg_temp.snap();
SELECT q, pg_temp.try(q) FROM unnest(ARRAY[
  'SELECT points.earn(NULL, 1)',
  'SELECT points.earn(1301, 0)',
  'SELECT points.use(1301, NULL)',
  'SELECT points.cancel(-1)',
  'SELECT points.earn_async(1301, -5)']) q;
SELECT * FROM pg_temp.delta();

-- a call that succeeded in a transaction that rolled back is still counted,
-- like the failure that rolled it back (pg_stat_statements does the same)
SELECT pg_temp.snap();
BEGIN;
SELECT amount FROM points.earn(1302, 10);
SELECT points.use(1302, 20);
ROLLBACK;
SELECT points.balance(1302);
SELECT * FROM pg_temp.delta();

-- a replay of an idempotency key is a call that moves no points
SELECT pg_temp.snap();
SELECT amount, replayed FROM points.earn(1303, 40, 'stats-k1');
SELECT amount, replayed FROM points.earn(1303, 40, 'stats-k1');
SELECT pg_temp.try('SELECT points.earn(1303, 41, ''stats-k1'')');   -- PT002: a failure
SELECT * FROM pg_temp.delta();

-- earn_async counts the points requested; applying them is not an earn call
SELECT pg_temp.snap();
SELECT count(points.earn_async(1304, 25)) FROM generate_series(1, 2);
SELECT points.apply_queued() >= 2 AS applied;
SELECT * FROM pg_temp.delta();

-- expire: one call, the points of the lots it expired
SELECT points.expire_due() >= 0 AS backlog_cleared;
SELECT amount FROM points.earn(1305, 70, expires_at => clock_timestamp() + interval '100 ms');
SELECT pg_sleep(0.2);
SELECT pg_temp.snap();
SELECT points.expire_due();
SELECT * FROM pg_temp.delta();

-- archive: one call, no points moved
SELECT pg_temp.snap();
SELECT points.archive(1) >= 0 AS archived;
SELECT op, calls, failures, points FROM pg_temp.delta();

-- a lock timeout (55P03): another session holds user 1306's lock
CREATE EXTENSION dblink;
SELECT dblink_connect('holder', format('dbname=%s user=%s port=%s host=%s', current_database(),
       current_user, current_setting('port'), split_part(current_setting('unix_socket_directories'), ',', 1)));
SELECT dblink_exec('holder', 'BEGIN');
SELECT amount FROM dblink('holder', 'SELECT amount FROM points.earn(1306, 10)') t(amount bigint);
SET points.lock_timeout = '100ms';
SELECT pg_temp.snap();
SELECT points.use(1306, 1);
SELECT * FROM pg_temp.delta();
-- the wait is in lock_wait_ms (and in the call's time)
SELECT s.lock_wait_ms - b.lock_wait_ms >= 90 AS waited,
       s.total_ms - b.total_ms >= s.lock_wait_ms - b.lock_wait_ms AS wait_in_call_time,
       s.max_ms >= 90 AS max_covers_wait
FROM points.stats() s JOIN snap b USING (op) WHERE op = 'use';
RESET points.lock_timeout;
SELECT dblink_exec('holder', 'ROLLBACK');
SELECT dblink_disconnect('holder');
DROP EXTENSION dblink;
SELECT points.balance(1306);

-- stats_reset zeroes every counter
SELECT points.stats_reset();
SELECT op, calls, failures, lock_timeouts, points, total_ms, max_ms, lock_wait_ms FROM points.stats();
-- and counting starts again from zero
SELECT amount FROM points.earn(1307, 5);
SELECT op, calls, failures, lock_timeouts, points, total_ms > 0 AS timed, max_ms = total_ms AS max_is_only_call
FROM points.stats() WHERE calls > 0;

-- only superusers and those granted EXECUTE may read or reset (nothing for PUBLIC)
CREATE ROLE points_stats_nobody;
GRANT USAGE ON SCHEMA points TO points_stats_nobody;
GRANT EXECUTE ON FUNCTION pg_temp.try(text) TO PUBLIC;
SET ROLE points_stats_nobody;
SELECT q, pg_temp.try(q) FROM unnest(ARRAY[
  'SELECT count(*) FROM points.stats()',
  'SELECT points.stats_reset()']) q;
RESET ROLE;
REVOKE USAGE ON SCHEMA points FROM points_stats_nobody;
DROP ROLE points_stats_nobody;

-- points.track_stats = off skips the counting (superuser, per session)
SELECT pg_temp.snap();
SET points.track_stats = off;
SELECT amount FROM points.earn(1308, 5);
SELECT count(*) AS counted FROM pg_temp.delta();
RESET points.track_stats;
SELECT amount FROM points.earn(1308, 5);
SELECT op, calls, points FROM pg_temp.delta();
