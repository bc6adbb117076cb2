/* points--0.1--0.2.sql: monitoring: statistics, anomaly alerts, daily rollup */

\echo Use "ALTER EXTENSION points UPDATE TO '0.2'" to load this file. \quit

CREATE FUNCTION points.stats()
RETURNS TABLE(op text, calls bigint, failures bigint, lock_timeouts bigint,
              points bigint, total_ms float8, max_ms float8, lock_wait_ms float8)
AS 'MODULE_PATHNAME', 'points_stats'
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
ROWS 6;

CREATE FUNCTION points.stats_reset()
RETURNS void
AS 'MODULE_PATHNAME', 'points_stats_reset'
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

/*
 * Where points.detect_anomalies() has looked: every ledger row with
 * tx_id <= done_upto (see monitor.c for why this is exact).
 */
CREATE TABLE points.scan_state (
    id              int PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    done_upto       bigint NOT NULL,
    pending_upto    bigint,
    pending_xmax    xid8,
    last_run        timestamptz
);
-- rows written before this version are not looked at: alerts are about news
INSERT INTO points.scan_state (done_upto)
SELECT COALESCE(max(tx_id), 0) FROM (
    SELECT tx_id FROM points.ledger UNION ALL SELECT tx_id FROM points.ledger_archive) x;

/* Alerts: at most one per user, rule and window. */
CREATE TABLE points.alert (
    alert_id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id         bigint NOT NULL,
    rule            text NOT NULL CHECK (rule IN ('large_amount', 'use_burst', 'cancel_burst')),
    observed        bigint NOT NULL,
    threshold       bigint NOT NULL,
    tx_id           bigint NOT NULL,
    raised_at       timestamptz NOT NULL,
    window_start    timestamptz NOT NULL,
    UNIQUE (user_id, rule, window_start)
);
CREATE INDEX alert_raised_idx ON points.alert (raised_at);

/*
 * The daily rollup: per UTC day and kind; users through daily_user.  points
 * is numeric so that no sum of bigint amounts can stop the rollup;
 * points.daily() returns it as bigint (22003 for a day beyond bigint).
 */
CREATE TABLE points.daily_rollup (
    day             date NOT NULL,
    kind            text NOT NULL,
    transactions    bigint NOT NULL,
    points          numeric NOT NULL,
    PRIMARY KEY (day, kind)
);
CREATE TABLE points.daily_user (
    day             date NOT NULL,
    kind            text NOT NULL,
    user_id         bigint NOT NULL,
    PRIMARY KEY (day, kind, user_id)
);
-- the rollup starts complete: it includes what was written before
INSERT INTO points.daily_rollup
SELECT (created_at AT TIME ZONE 'UTC')::date, kind, count(*), sum(amount) FROM (
    SELECT created_at, kind, amount FROM points.ledger UNION ALL
    SELECT created_at, kind, amount FROM points.ledger_archive) x
GROUP BY 1, 2;
INSERT INTO points.daily_user
SELECT DISTINCT (created_at AT TIME ZONE 'UTC')::date, kind, user_id FROM (
    SELECT created_at, kind, user_id FROM points.ledger UNION ALL
    SELECT created_at, kind, user_id FROM points.ledger_archive) x;

CREATE FUNCTION points.detect_anomalies()
RETURNS bigint
AS 'MODULE_PATHNAME', 'points_detect_anomalies'
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

CREATE FUNCTION points.alerts(since interval DEFAULT '1 day')
RETURNS TABLE(alert_id bigint, user_id bigint, rule text, observed bigint, threshold bigint,
              tx_id bigint, raised_at timestamptz)
AS 'MODULE_PATHNAME', 'points_alerts'
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

CREATE FUNCTION points.daily(from_day date, to_day date)
RETURNS TABLE(day date, kind text, transactions bigint, points bigint, users bigint)
AS 'MODULE_PATHNAME', 'points_daily'
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

ALTER TABLE points.worker_state ADD COLUMN monitor_last_run timestamptz;
ALTER TABLE points.worker_state ADD COLUMN alerts_raised bigint NOT NULL DEFAULT 0;

/* worker_status, with the monitor's columns at the end */
CREATE OR REPLACE VIEW points.worker_status AS
SELECT (SELECT a.pid FROM pg_catalog.pg_stat_activity a
        WHERE a.backend_type = 'points worker'
          AND a.datname = pg_catalog.current_database() LIMIT 1) AS worker_pid,
       s.started_at,
       s.expire_last_run,
       s.expire_last_lots,
       s.expire_total_lots,
       (SELECT pg_catalog.count(*) FROM points.lot l
        WHERE l.remaining > 0 AND l.expires_at <= pg_catalog.now()) AS expire_backlog,
       s.archive_last_run,
       s.archive_last_rows,
       s.archive_total_rows,
       (SELECT pg_catalog.count(*) FROM points.ledger g
        WHERE g.created_at < pg_catalog.now() OPERATOR(pg_catalog.-) COALESCE(
              pg_catalog.current_setting('points.archive_after', true), '365d')::interval) AS archive_backlog,
       (SELECT pg_catalog.count(*) FROM points.outbox) AS outbox_backlog,
       pg_catalog.now() OPERATOR(pg_catalog.-)
           (SELECT pg_catalog.min(o.created_at) FROM points.outbox o) AS outbox_oldest_age,
       s.events_published,
       (SELECT pg_catalog.count(*) FROM points.request r WHERE r.state = 'queued') AS queue_depth,
       pg_catalog.now() OPERATOR(pg_catalog.-)
           (SELECT pg_catalog.min(r.queued_at) FROM points.request r
            WHERE r.state = 'queued') AS queue_oldest_age,
       (SELECT pg_catalog.count(*) FROM points.request r
        WHERE r.state = 'applied' AND r.applied_at > pg_catalog.now() OPERATOR(pg_catalog.-) '1 minute'::interval) AS queue_applied_last_minute,
       (SELECT pg_catalog.count(*) FROM points.request r
        WHERE r.state = 'rejected' AND r.applied_at > pg_catalog.now() OPERATOR(pg_catalog.-) '1 minute'::interval) AS queue_rejected_last_minute,
       s.queue_last_run,
       s.queue_last_requests,
       s.kafka_last_error,
       s.kafka_last_error_at,
       s.last_error,
       s.last_error_at,
       s.monitor_last_run,
       s.alerts_raised
FROM points.worker_state s;

REVOKE ALL ON FUNCTION points.stats(), points.stats_reset(), points.detect_anomalies(),
    points.alerts(interval), points.daily(date, date) FROM PUBLIC;
REVOKE ALL ON points.scan_state, points.alert, points.daily_rollup, points.daily_user FROM PUBLIC;
