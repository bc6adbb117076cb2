-- daily: per UTC day and kind, from the rollup that detect_anomalies keeps
-- current; archived rows included; it must match a direct aggregate
-- detect_anomalies looks at every ledger row: start from an empty ledger so
-- that these checks do not depend on what the earlier test files wrote
DROP EXTENSION points;
CREATE EXTENSION points;
CREATE FUNCTION pg_temp.try(q text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN EXECUTE q; RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
  RETURN SQLSTATE || ': ' || SQLERRM;
END $$;
-- see alerts.sql: run detect_anomalies until it has looked at every row
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
-- the direct aggregate of the whole history, live and archived
CREATE FUNCTION pg_temp.direct(from_day date, to_day date)
RETURNS TABLE(day date, kind text, transactions bigint, points bigint, users bigint)
LANGUAGE sql AS $$
  SELECT (created_at AT TIME ZONE 'UTC')::date, kind, count(*), sum(amount), count(DISTINCT user_id)
  FROM (SELECT created_at, kind, amount, user_id FROM points.ledger UNION ALL
        SELECT created_at, kind, amount, user_id FROM points.ledger_archive) x
  WHERE (created_at AT TIME ZONE 'UTC')::date BETWEEN from_day AND to_day
  GROUP BY 1, 2;
$$;
-- rows that differ between daily() and the direct aggregate (none expected)
CREATE FUNCTION pg_temp.mismatches(from_day date DEFAULT '2000-01-01', to_day date DEFAULT '2100-01-01')
RETURNS bigint LANGUAGE sql AS $$
  SELECT count(*) FROM (
    (SELECT * FROM points.daily(from_day, to_day) EXCEPT ALL SELECT * FROM pg_temp.direct(from_day, to_day))
    UNION ALL
    (SELECT * FROM pg_temp.direct(from_day, to_day) EXCEPT ALL SELECT * FROM points.daily(from_day, to_day))) d;
$$;
-- totals per kind over all days, to see what a step added
CREATE FUNCTION pg_temp.totals()
RETURNS TABLE(kind text, transactions numeric, points numeric)
LANGUAGE sql AS $$
  SELECT kind, sum(transactions), sum(points) FROM points.daily('2000-01-01', '2100-01-01') GROUP BY kind;
$$;
CALL pg_temp.catch_up();
CREATE TEMP TABLE t0 AS SELECT * FROM pg_temp.totals();

-- traffic of every kind
SELECT count(points.earn(u, 100)) AS earns FROM generate_series(1501, 1510) u;
SELECT count(points.use(u, 30)) AS uses FROM generate_series(1501, 1505) u;
SELECT count(points.cancel(tx_id, 10)) AS use_cancels
FROM points.ledger WHERE user_id BETWEEN 1501 AND 1503 AND kind = 'use';
SELECT count(points.cancel(tx_id, 40)) AS earn_cancels
FROM points.ledger WHERE user_id BETWEEN 1506 AND 1507 AND kind = 'earn';
SELECT count(points.earn(u, 7, expires_at => clock_timestamp() + interval '100 ms')) AS short_lived
FROM generate_series(1508, 1510) u;
SELECT count(points.earn_async(1510, 5)) AS queued FROM generate_series(1, 4);
SELECT pg_sleep(0.2);
SELECT points.expire_due() >= 3 AS expired;
SELECT points.apply_queued() >= 4 AS applied;

-- the rollup has not looked at them yet: the direct aggregate is ahead
SELECT pg_temp.mismatches() > 0 AS behind;
CALL pg_temp.catch_up();
SELECT pg_temp.mismatches();
-- what this traffic added, per kind
SELECT kind, t.transactions - coalesce(t0.transactions, 0) AS transactions,
       t.points - coalesce(t0.points, 0) AS points
FROM pg_temp.totals() t LEFT JOIN t0 USING (kind) ORDER BY kind;

-- archived rows are still counted, once
CREATE TEMP TABLE before_archive AS SELECT * FROM points.daily('2000-01-01', '2100-01-01');
SET points.archive_after = 0;
SELECT points.archive() > 0 AS archived;
RESET points.archive_after;
SELECT count(*) > 0 AS some_archived FROM points.ledger_archive WHERE user_id BETWEEN 1501 AND 1510;
SELECT count(*) AS live FROM points.ledger WHERE user_id BETWEEN 1501 AND 1510;
CALL pg_temp.catch_up();
SELECT count(*) AS changed_by_archive FROM (
  (SELECT * FROM points.daily('2000-01-01', '2100-01-01') EXCEPT ALL SELECT * FROM before_archive)
  UNION ALL
  (SELECT * FROM before_archive EXCEPT ALL SELECT * FROM points.daily('2000-01-01', '2100-01-01'))) d;
SELECT pg_temp.mismatches();
-- rows written after the archive run, next to archived ones of the same users
SELECT count(points.earn(u, 1)) AS more_earns FROM generate_series(1501, 1510) u;
SELECT kind, amount FROM points.cancel(
  (SELECT tx_id FROM points.ledger_archive WHERE user_id = 1504 AND kind = 'use'));
CALL pg_temp.catch_up();
SELECT pg_temp.mismatches();
-- a rolled-back transaction adds nothing
BEGIN;
SELECT amount FROM points.earn(1511, 999);
ROLLBACK;
CALL pg_temp.catch_up();
SELECT pg_temp.mismatches();
SELECT count(*) AS users_1511 FROM points.daily_user WHERE user_id = 1511;

-- days are UTC days, whatever the session's time zone
SET TIME ZONE 'Pacific/Kiritimati';
SELECT pg_temp.mismatches();
RESET TIME ZONE;
-- every kind is there; one day at a time matches too
SELECT DISTINCT kind FROM points.daily('2000-01-01', '2100-01-01') ORDER BY kind;
SELECT bool_and(pg_temp.mismatches(day, day) = 0) AS each_day_matches
FROM (SELECT DISTINCT day FROM points.daily('2000-01-01', '2100-01-01')) d;
-- the range is inclusive, and may hold no day at all
SELECT count(*) = (SELECT count(*) FROM pg_temp.direct(current_date - 1, current_date + 1)) AS inclusive
FROM points.daily(current_date - 1, current_date + 1);
SELECT count(*) FROM points.daily('1999-01-01', '1999-12-31');
SELECT count(*) FROM points.daily('2000-01-01', '2000-01-01');

-- bad input
SELECT q, pg_temp.try(q) FROM unnest(ARRAY[
  'SELECT count(*) FROM points.daily(NULL, ''2020-01-01'')',
  'SELECT count(*) FROM points.daily(''2020-01-01'', NULL)',
  'SELECT count(*) FROM points.daily(''2020-01-02'', ''2020-01-01'')',
  'SELECT count(*) FROM points.daily(''-infinity'', ''infinity'')']) q;

-- a day whose sum passes bigint does not stop the rollup: that day's read
-- is 22003, every other day and every later run still work
SELECT amount FROM points.earn(1601, 9223372036854775000);
SELECT amount FROM points.earn(1602, 9223372036854775000);
SELECT points.detect_anomalies() >= 0 AS ran;
SELECT points.detect_anomalies() >= 0 AS ran;
SELECT points.detect_anomalies() >= 0 AS ran;
SELECT (SELECT done_upto FROM points.scan_state) >= max(tx_id) AS rollup_caught_up FROM points.ledger;
SELECT pg_temp.try(format('SELECT count(*) FROM points.daily(%L, %L)',
                          (now() AT TIME ZONE 'UTC')::date, (now() AT TIME ZONE 'UTC')::date));
SELECT count(*) FROM points.daily('1999-01-01', '1999-12-31');
