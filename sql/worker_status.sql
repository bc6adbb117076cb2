-- worker_status: one row; its backlog columns are true at the moment it is read
SELECT column_name, data_type FROM information_schema.columns
WHERE table_schema = 'points' AND table_name = 'worker_status' ORDER BY ordinal_position;
SELECT count(*) AS rows FROM points.worker_status;

-- no worker serves this database (it serves points.database = postgres):
-- no pid, and nothing it would have recorded
SHOW points.database;
SELECT worker_pid, started_at, expire_last_run, expire_last_lots, expire_total_lots,
       archive_last_run, archive_last_rows, archive_total_rows, events_published,
       queue_last_run, queue_last_requests, kafka_last_error, kafka_last_error_at,
       last_error, last_error_at, monitor_last_run, alerts_raised
FROM points.worker_status;

-- the outbox: every transaction leaves an event, none is published here
SELECT count(points.earn(u, 100)) AS earns FROM generate_series(1601, 1605) u;
SELECT s.outbox_backlog = (SELECT count(*) FROM points.outbox) AS outbox_backlog_true,
       s.outbox_backlog >= 5 AS has_ours,
       s.outbox_oldest_age = now() - (SELECT min(created_at) FROM points.outbox) AS oldest_age_true,
       s.outbox_oldest_age >= '0' AS age_not_negative
FROM points.worker_status s;
CREATE TEMP TABLE o AS SELECT outbox_backlog FROM points.worker_status;
SELECT count(points.use(u, 10)) AS uses FROM generate_series(1601, 1603) u;
SELECT s.outbox_backlog - o.outbox_backlog AS new_events FROM points.worker_status s, o;
-- as the publisher would: remove the events, and the backlog is empty
BEGIN;
DELETE FROM points.outbox;
SELECT outbox_backlog, outbox_oldest_age FROM points.worker_status;
ROLLBACK;

-- expiry: lots whose expires_at has passed and that still hold points
SELECT points.expire_due() >= 0 AS cleared;
SELECT expire_backlog FROM points.worker_status;
SELECT count(points.earn(u, 5, expires_at => clock_timestamp() + interval '100 ms')) AS short_lived
FROM generate_series(1611, 1613) u;
SELECT amount FROM points.earn(1614, 5, expires_at => clock_timestamp() + interval '100 ms');
SELECT amount FROM points.use(1614, 5);   -- empty lot: not a backlog
SELECT expire_backlog AS before_due FROM points.worker_status;
SELECT pg_sleep(0.2);
SELECT expire_backlog AS due,
       expire_backlog = (SELECT count(*) FROM points.lot WHERE remaining > 0 AND expires_at <= now()) AS true_now
FROM points.worker_status;
SELECT points.expire_due();
SELECT expire_backlog AS after_expire FROM points.worker_status;

-- the queue: requests not applied yet, and the age of the oldest
SELECT points.apply_queued() >= 0 AS cleared;
SELECT queue_depth, queue_oldest_age FROM points.worker_status;
SELECT count(points.earn_async(1621, g)) AS queued FROM generate_series(1, 3) g;
SELECT points.earn_async(1622, 1, expires_at => clock_timestamp() + interval '50 ms') > 0 AS queued_to_reject;
SELECT queue_depth,
       queue_oldest_age = now() - (SELECT min(queued_at) FROM points.request WHERE state = 'queued') AS oldest_age_true,
       queue_oldest_age >= '0' AS age_not_negative
FROM points.worker_status;
SELECT pg_sleep(0.1);
SELECT points.apply_queued();
SELECT r.user_id, r.state FROM points.request r WHERE r.user_id IN (1621, 1622) ORDER BY r.request_id;
SELECT queue_depth, queue_oldest_age,
       queue_applied_last_minute >= 3 AND queue_applied_last_minute = (SELECT count(*) FROM points.request
         WHERE state = 'applied' AND applied_at > now() - interval '1 minute') AS applied_true,
       queue_rejected_last_minute >= 1 AND queue_rejected_last_minute = (SELECT count(*) FROM points.request
         WHERE state = 'rejected' AND applied_at > now() - interval '1 minute') AS rejected_true
FROM points.worker_status;

-- archiving: ledger rows older than points.archive_after
SELECT archive_backlog AS with_default_365d FROM points.worker_status;
SET points.archive_after = 0;
SELECT archive_backlog > 0 AS has_backlog,
       archive_backlog = (SELECT count(*) FROM points.ledger WHERE created_at < now()) AS true_now
FROM points.worker_status;
SELECT points.archive() > 0 AS archived;
SELECT archive_backlog AS after_archive FROM points.worker_status;
RESET points.archive_after;

-- nothing for PUBLIC
SELECT has_table_privilege('public', 'points.worker_status', 'SELECT') AS public_select;
