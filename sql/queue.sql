-- queued earns: earn_async records, apply_queued applies in request_id order
CREATE FUNCTION pg_temp.try(q text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN EXECUTE q; RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
  RETURN SQLSTATE || ': ' || regexp_replace(SQLERRM, 'transaction \d+', 'transaction T', 'g');
END $$;

-- arguments are checked like earn's, with the same SQLSTATEs
SELECT q, pg_temp.try(q) FROM unnest(ARRAY[
  'SELECT points.earn_async(NULL, 1)',
  'SELECT points.earn_async(1101, NULL)',
  'SELECT points.earn_async(1101, 0)',
  'SELECT points.earn_async(1101, -1)',
  'SELECT points.earn_async(1101, 1, expires_at => ''2000-01-01'')',
  'SELECT points.earn_async(1101, 1, idempotency_key => '''')',
  'SELECT points.request(NULL)',
  'SELECT points.apply_queued(NULL)',
  'SELECT points.apply_queued(0)']) q;
SELECT count(*) FROM points.request;

-- a rolled-back caller leaves no request
BEGIN;
SELECT points.earn_async(1101, 5) > 0 AS queued;
ROLLBACK;
SELECT count(*) FROM points.request;

-- queued: nothing in the ledger yet, no lock taken
CREATE TEMP TABLE r AS
SELECT g AS n, points.earn_async(1101, g * 10, reason => 'campaign') AS request_id
FROM generate_series(1, 5) g;
SELECT n, q.state, q.tx_id IS NULL AS no_tx, q.error FROM r, points.request(r.request_id) q ORDER BY n;
SELECT points.balance(1101), (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory') AS locks;
SELECT count(*) FROM points.request(-1);   -- unknown request: no row

-- apply in batches; each request becomes an ordinary earn, in request_id order
SELECT points.apply_queued(2);
SELECT points.apply_queued();
SELECT points.apply_queued();
SELECT n, q.state, q.error FROM r, points.request(r.request_id) q ORDER BY n;
SELECT r.n, g.user_seq, g.kind, g.amount, g.balance_after, g.reason
FROM r JOIN points.ledger g ON g.tx_id = (SELECT tx_id FROM points.request(r.request_id))
ORDER BY r.n;
SELECT count(*) AS lots, sum(remaining) FROM points.lot WHERE user_id = 1101;
SELECT count(*) AS events FROM points.outbox WHERE aggregateid = '1101';

-- idempotency keys: a replay resolves to the first transaction; another amount is rejected (PT002)
SELECT tx_id AS first_tx FROM points.earn(1102, 100, 'gift-1') \gset
CREATE TEMP TABLE k AS SELECT * FROM (VALUES
  (1, points.earn_async(1102, 100, 'gift-1')),
  (2, points.earn_async(1102, 100, 'gift-2')),
  (3, points.earn_async(1102, 100, 'gift-2')),
  (4, points.earn_async(1102, 999, 'gift-2')),
  (5, points.earn_async(1102, 999, 'gift-1'))) v(n, request_id);
SELECT points.apply_queued();
SELECT k.n, q.state, q.tx_id = :first_tx AS is_first_tx,
       regexp_replace(q.error, 'transaction \d+', 'transaction T') AS error
FROM k, points.request(k.request_id) q ORDER BY k.n;
SELECT (SELECT tx_id FROM points.request((SELECT request_id FROM k WHERE n = 2)))
     = (SELECT tx_id FROM points.request((SELECT request_id FROM k WHERE n = 3))) AS same_tx;
SELECT user_seq, amount, idempotency_key FROM points.history(1102) ORDER BY user_seq;

-- an expires_at that has passed by the time the request is applied: rejected
SELECT points.earn_async(1103, 7, expires_at => clock_timestamp() + interval '100 ms') AS late \gset
SELECT pg_sleep(0.2);
SELECT points.apply_queued();
SELECT state, error ~ 'had passed when the request was applied' AS expired, tx_id FROM points.request(:late);
SELECT points.balance(1103);

-- overflow at apply: rejected with the message of 22003
SELECT amount FROM points.earn(1104, 9223372036854775000);
SELECT points.earn_async(1104, 1000) AS big \gset
SELECT points.apply_queued();
SELECT state, error FROM points.request(:big);

-- the same campaign queued twice changes no balance the second time
SELECT count(points.earn_async(u, 100, idempotency_key => 'campaign-1')) FROM generate_series(1110, 1119) u;
SELECT points.apply_queued();
SELECT count(points.earn_async(u, 100, idempotency_key => 'campaign-1')) FROM generate_series(1110, 1119) u;
SELECT points.apply_queued();
SELECT sum(points.balance(u)) FROM generate_series(1110, 1119) u;
SELECT state, count(*) FROM points.request WHERE user_id BETWEEN 1110 AND 1119 GROUP BY state;

SELECT count(*) FROM points.request WHERE state = 'queued';
SELECT * FROM points.verify();

-- statistics taken while nothing was queued (the planner would believe the
-- queue empty) are refreshed by the first batch that sees 100+ users
ANALYZE points.request;
SELECT reltuples FROM pg_class WHERE oid = 'points.request_queued_idx'::regclass;
SELECT count(points.earn_async(u, 1)) FROM generate_series(770001, 770250) u;
SELECT points.apply_queued();
SELECT reltuples >= 250 AS analyzed FROM pg_class WHERE oid = 'points.request_queued_idx'::regclass;
SELECT count(*) FROM points.request WHERE state = 'queued';
SELECT * FROM points.verify();

-- the batches of one transaction lock at most 1,000 users together (the
-- user locks last until commit: many calls in one transaction would fill
-- the shared lock table); the next transaction applies the rest
SELECT count(points.earn_async(u, 5)) FROM generate_series(780001, 781200) u;
BEGIN;
SELECT points.apply_queued(300);
SELECT sum(points.apply_queued(100)) FROM generate_series(1, 30);
SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid();
COMMIT;
SELECT points.apply_queued();
SELECT state, count(*) FROM points.request WHERE user_id BETWEEN 780001 AND 781200 GROUP BY state;
SELECT count(*) FROM points.request WHERE state = 'queued';
SELECT * FROM points.verify();

-- a batch writes its rows directly (not through INSERT statements), yet
-- the tables' constraints hold: a CHECK added by an operator stops the
-- batch, which leaves nothing half-written
ALTER TABLE points.ledger ADD CONSTRAINT test_small CHECK (amount < 1000) NOT VALID;
SELECT points.earn_async(790001, 5), points.earn_async(790002, 5000) \gset
\set VERBOSITY sqlstate
SELECT points.apply_queued();
\set VERBOSITY default
SELECT count(*) FROM points.ledger WHERE user_id IN (790001, 790002);
SELECT count(*) FROM points.outbox WHERE aggregateid IN ('790001', '790002');
SELECT count(*) AS queued FROM points.request WHERE user_id IN (790001, 790002) AND state = 'queued';
ALTER TABLE points.ledger DROP CONSTRAINT test_small;

-- with a trigger on one of the tables, a batch writes through SQL so that
-- the trigger runs: one call per event (the two requests left above)
CREATE TABLE outbox_seen (id bigint, type text);
CREATE FUNCTION see_event() RETURNS trigger LANGUAGE plpgsql AS
$$BEGIN INSERT INTO public.outbox_seen VALUES (NEW.id, NEW.type); RETURN NEW; END$$;
CREATE TRIGGER see_event AFTER INSERT ON points.outbox FOR EACH ROW EXECUTE FUNCTION see_event();
SELECT points.apply_queued();
SELECT s.type, count(*) FROM outbox_seen s JOIN points.outbox o ON o.id = s.id
WHERE o.aggregateid IN ('790001', '790002') GROUP BY 1;
SELECT user_id, state FROM points.request WHERE user_id IN (790001, 790002) ORDER BY 1;
DROP TRIGGER see_event ON points.outbox;
DROP TABLE outbox_seen;
DROP FUNCTION see_event();
SELECT * FROM points.verify();

-- a column an operator adds with a default gets it from a batch too (as
-- from an INSERT), and a dropped column is skipped
ALTER TABLE points.outbox ADD COLUMN test_tag text NOT NULL DEFAULT 'tagged';
ALTER TABLE points.ledger ADD COLUMN test_gone int;
ALTER TABLE points.ledger DROP COLUMN test_gone;
SELECT points.earn_async(790003, 7) \gset
SELECT points.apply_queued();
SELECT o.test_tag, o.aggregatetype, o.type, g.amount
FROM points.outbox o JOIN points.ledger g ON g.tx_id = o.id WHERE g.user_id = 790003;
ALTER TABLE points.outbox DROP COLUMN test_tag;
SELECT * FROM points.verify();

-- a batch records its requests directly, or, with a trigger on the request
-- table, through SQL (the trigger sees each one); both record the same:
-- applied with the tx_id of its earn, or rejected with the error, and an
-- account made by the batch (a new user) or updated by it
SELECT points.earn_async(790004, 5, 'twin-a') AS a1, points.earn_async(790004, 6, 'twin-a') AS a2,
       points.earn_async(790005, 7) AS a3 \gset
SELECT points.apply_queued();
CREATE TABLE request_seen (request_id bigint, state text, has_tx boolean, error text);
CREATE FUNCTION see_request() RETURNS trigger LANGUAGE plpgsql AS
$$BEGIN INSERT INTO public.request_seen VALUES (NEW.request_id, NEW.state, NEW.tx_id IS NOT NULL, NEW.error);
RETURN NEW; END$$;
CREATE TRIGGER see_request AFTER UPDATE ON points.request FOR EACH ROW EXECUTE FUNCTION see_request();
SELECT points.earn_async(790006, 5, 'twin-a') AS b1, points.earn_async(790006, 6, 'twin-a') AS b2,
       points.earn_async(790005, 7) AS b3 \gset
SELECT points.apply_queued();
SELECT q.n, q.state, q.tx_id = g.tx_id AS tx_matches, g.user_seq, g.amount, g.balance_after,
       regexp_replace(q.error, '[0-9]{4,}', 'N', 'g') AS error,
       s.state AS trigger_saw
FROM (VALUES ('a1', :a1), ('a2', :a2), ('a3', :a3), ('b1', :b1), ('b2', :b2), ('b3', :b3)) v(n, id)
CROSS JOIN LATERAL (SELECT v.n, r.* FROM points.request(v.id) r) q
LEFT JOIN points.ledger g ON g.tx_id = q.tx_id
LEFT JOIN request_seen s ON s.request_id = v.id
ORDER BY q.n;
SELECT user_id, balance, last_seq FROM points.account WHERE user_id IN (790004, 790005, 790006) ORDER BY 1;
DROP TRIGGER see_request ON points.request;
DROP TABLE request_seen;
DROP FUNCTION see_request();
SELECT * FROM points.verify();

-- without request_queued_idx (dropped, or being rebuilt) a batch finds its
-- users through SQL
BEGIN;
DROP INDEX points.request_queued_idx;
SELECT points.earn_async(790007, 3) AS c1, points.earn_async(790007, 4) AS c2 \gset
SELECT points.apply_queued();
SELECT q.state, g.user_seq, g.amount, g.balance_after
FROM (VALUES (:c1), (:c2)) v(id), points.request(v.id) q JOIN points.ledger g ON g.tx_id = q.tx_id
ORDER BY g.user_seq;
ROLLBACK;
SELECT * FROM points.verify();

-- a batch that rolls back does not make the next ones skip its requests
BEGIN;
SELECT points.earn_async(790008, 1) AS d1 \gset
SELECT points.earn_async(790009, 1) AS d2 \gset
COMMIT;
BEGIN;
SELECT points.apply_queued(1) AS first_batch, points.apply_queued(1) AS second_batch;
ROLLBACK;
SELECT points.earn_async(790010, 1) AS d3 \gset
SELECT points.apply_queued() AS after_rollback;
SELECT q.state FROM (VALUES (:d1), (:d2), (:d3)) v(id), points.request(v.id) q;
SELECT * FROM points.verify();
