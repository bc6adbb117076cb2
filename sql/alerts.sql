-- alerts: large_amount, use_burst and cancel_burst, raised by
-- points.detect_anomalies() from the ledger rows settled since its last run,
-- at most once per user, rule and window; all off (0) by default.
-- detect_anomalies looks at every ledger row: start from an empty ledger so
-- that these checks do not depend on what the earlier test files wrote
DROP EXTENSION points;
CREATE EXTENSION points;
CREATE FUNCTION pg_temp.try(q text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN EXECUTE q; RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
  RETURN SQLSTATE || ': ' || SQLERRM;
END $$;
-- run detect_anomalies, each run its own transaction, until it has looked at
-- every row written so far (a row is settled one or two runs after its
-- commit); returns how many alerts those runs raised
CREATE PROCEDURE pg_temp.catch_up(INOUT raised bigint DEFAULT 0) LANGUAGE plpgsql AS $$
DECLARE
  target bigint;
  runs int := 0;
BEGIN
  SELECT coalesce(max(tx_id), 0) INTO target FROM (
    SELECT tx_id FROM points.ledger UNION ALL SELECT tx_id FROM points.ledger_archive) x;
  raised := 0;
  LOOP
    raised := raised + points.detect_anomalies();
    runs := runs + 1;
    COMMIT;
    EXIT WHEN (SELECT done_upto FROM points.scan_state) >= target;
    IF runs >= 100 THEN
      RAISE EXCEPTION 'detect_anomalies did not reach tx % in % runs', target, runs;
    END IF;
    PERFORM pg_sleep(0.05);
  END LOOP;
END $$;
-- the bursts below must not straddle the end of a minute (or an hour):
-- the windows are date_trunc('minute'/'hour', created_at); they take well
-- under 15 s
CREATE PROCEDURE pg_temp.away_from_window_end() LANGUAGE plpgsql AS $$
BEGIN
  IF extract(second FROM clock_timestamp()) >= 45 THEN
    PERFORM pg_sleep(60.2 - extract(second FROM clock_timestamp()));
  END IF;
END $$;
-- the alerts, with their tx checked against the ledger (ids left out)
CREATE FUNCTION pg_temp.shown(since interval DEFAULT '1 day')
RETURNS TABLE(user_id bigint, rule text, observed bigint, threshold bigint,
              tx_kind text, tx_amount bigint, tx_of_user boolean, raised_recently boolean)
LANGUAGE sql AS $$
  SELECT a.user_id, a.rule, a.observed, a.threshold, g.kind, g.amount, g.user_id = a.user_id,
         a.raised_at BETWEEN now() - interval '5 minutes' AND clock_timestamp()
  FROM points.alerts(since) a
  LEFT JOIN (SELECT tx_id, user_id, kind, amount FROM points.ledger UNION ALL
             SELECT tx_id, user_id, kind, amount FROM points.ledger_archive) g USING (tx_id)
  ORDER BY a.user_id, a.rule;
$$;
CALL pg_temp.catch_up();

-- the defaults: every rule off, nothing fires even for traffic that would
SELECT name, setting, context FROM pg_settings WHERE name LIKE 'points.alert%' ORDER BY name;
SELECT amount FROM points.earn(1401, 1000000);
SELECT count(points.use(1401, 1)) AS uses FROM generate_series(1, 20);
SELECT count(points.cancel(tx_id)) AS cancels
FROM (SELECT (points.earn(1402, 10)).tx_id FROM generate_series(1, 10)) e;
-- two rows to be cancelled once the rules are on
SELECT tx_id AS big_earn FROM points.earn(1403, 5000) \gset
SELECT amount FROM points.earn(1404, 5000, expires_at => clock_timestamp() + interval '300 ms');
CALL pg_temp.catch_up();
SELECT count(*) FROM points.alerts();

-- turn the rules on (sighup settings: ALTER SYSTEM and a reload)
ALTER SYSTEM SET points.alert_amount = 1000;
ALTER SYSTEM SET points.alert_uses_per_minute = 3;
ALTER SYSTEM SET points.alert_cancels_per_hour = 2;
SELECT pg_reload_conf();
SELECT pg_sleep(0.3);
SHOW points.alert_amount;
SHOW points.alert_uses_per_minute;
SHOW points.alert_cancels_per_hour;
-- rows already looked at are not looked at again: no alert for them
CALL pg_temp.catch_up();

-- normal traffic: under every threshold, and kinds a rule does not cover
SELECT amount FROM points.earn(1410, 999);
SELECT count(points.use(1410, 100)) AS uses FROM generate_series(1, 3);     -- 3 uses: not more than 3
SELECT count(points.cancel(tx_id)) AS cancels
FROM (SELECT (points.earn(1410, 5)).tx_id FROM generate_series(1, 2)) e;    -- 2 cancels: not more than 2
SELECT kind, amount FROM points.cancel(:big_earn);                         -- an earn_cancel of 5000
SELECT pg_sleep(0.3);
SELECT points.expire_due() >= 1 AS expired;                                 -- an expire of 5000
SELECT kind, amount FROM points.ledger WHERE user_id = 1404 ORDER BY user_seq;
CALL pg_temp.catch_up();
SELECT count(*) FROM points.alerts();

-- each rule fires, once per user and window
CALL pg_temp.away_from_window_end();
-- large_amount: an earn or a use of at least 1000
SELECT amount FROM points.earn(1411, 1000);
SELECT amount FROM points.earn(1411, 5000);
SELECT amount FROM points.use(1411, 2000);
SELECT amount FROM points.earn(1412, 999);
SELECT amount FROM points.use(1412, 999);
SELECT amount FROM points.earn(1413, 3000);
SELECT amount FROM points.use(1413, 1500);
-- use_burst: more than 3 uses by one user within a minute (6 here)
SELECT amount FROM points.earn(1420, 100);
SELECT count(points.use(1420, 1)) AS uses FROM generate_series(1, 6);
-- cancel_burst: more than 2 cancels of one user's transactions within an hour (4 here)
SELECT count(points.cancel(tx_id)) AS cancels
FROM (SELECT (points.earn(1430, 10)).tx_id FROM generate_series(1, 3)) e;
SELECT amount FROM points.earn(1430, 50);
SELECT kind, amount FROM points.cancel((points.use(1430, 20)).tx_id);
CALL pg_temp.catch_up();
-- one alert per user and rule; tx is the first row that broke the threshold
SELECT * FROM pg_temp.shown();

-- more of the same in the same windows, seen by a later run: no new alert
SELECT amount FROM points.earn(1411, 7000);
SELECT amount FROM points.earn(1413, 1000);
SELECT count(points.use(1420, 1)) AS uses FROM generate_series(1, 3);
SELECT count(points.cancel(tx_id)) AS cancels
FROM (SELECT (points.earn(1430, 10)).tx_id FROM generate_series(1, 2)) e;
CALL pg_temp.catch_up();
SELECT rule, count(*) FROM points.alerts() GROUP BY rule ORDER BY rule;

-- another window is another alert: move user 1411's alert to the previous
-- hour (as if it had been raised then) and the next large earn raises again
UPDATE points.alert SET window_start = window_start - interval '1 hour' WHERE user_id = 1411;
SELECT amount FROM points.earn(1411, 1200);
CALL pg_temp.catch_up();
SELECT user_id, rule, observed, count(*) OVER (PARTITION BY user_id, rule) AS alerts_of_user
FROM points.alerts() WHERE user_id = 1411 ORDER BY observed;

-- alerts(since) keeps those raised within the interval, newest first
UPDATE points.alert SET raised_at = raised_at - interval '2 days' WHERE user_id = 1413;
UPDATE points.alert SET raised_at = raised_at - interval '2 hours' WHERE user_id = 1430;
SELECT user_id, rule FROM points.alerts() ORDER BY user_id, rule, observed;
SELECT user_id, rule FROM points.alerts('1 hour') ORDER BY user_id, rule, observed;
SELECT user_id, rule FROM points.alerts('3 days') ORDER BY user_id, rule, observed;
SELECT user_id, rule FROM points.alerts('1 week') WHERE user_id IN (1413, 1430);  -- newest first
SELECT count(*) FROM points.alerts('0');
SELECT bool_and(raised_at >= next_raised_at) AS newest_first FROM (
  SELECT raised_at, lead(raised_at) OVER () AS next_raised_at FROM points.alerts('1 year')) x
WHERE next_raised_at IS NOT NULL;
SELECT q, pg_temp.try(q) FROM unnest(ARRAY[
  'SELECT count(*) FROM points.alerts(NULL)',
  'SELECT count(*) FROM points.alerts(''-1 day'')',
  'SELECT count(*) FROM points.alerts(''1000000 years'')']) q;

-- off again: the same traffic raises nothing
ALTER SYSTEM RESET points.alert_amount;
ALTER SYSTEM RESET points.alert_uses_per_minute;
ALTER SYSTEM RESET points.alert_cancels_per_hour;
SELECT pg_reload_conf();
SELECT pg_sleep(0.3);
SELECT name, setting FROM pg_settings WHERE name LIKE 'points.alert%' ORDER BY name;
SELECT amount FROM points.earn(1450, 1000000);
SELECT count(points.use(1450, 1)) AS uses FROM generate_series(1, 10);
CALL pg_temp.catch_up();

-- the rule names are checked, and the table is not writable by PUBLIC
SELECT pg_temp.try($$INSERT INTO points.alert (user_id, rule, observed, threshold, tx_id, raised_at, window_start)
                     VALUES (1, 'no_such_rule', 1, 1, 1, now(), now())$$);
SELECT has_table_privilege('public', 'points.alert', 'SELECT') AS public_select,
       has_function_privilege('public', 'points.alerts(interval)', 'EXECUTE') AS public_alerts,
       has_function_privilege('public', 'points.detect_anomalies()', 'EXECUTE') AS public_detect;
