-- exact expiry: expired points are never spendable, before and after expire_due
SELECT amount FROM points.earn(401, 100, expires_at => clock_timestamp() + interval '500 ms');
SELECT amount FROM points.earn(401, 30, expires_at => clock_timestamp() + interval '1 hour');
SELECT amount FROM points.earn(402, 7, expires_at => clock_timestamp() + interval '500 ms');
SELECT points.balance(401);
SELECT lot.remaining FROM points.expiring(401, '1 minute') lot;
SELECT pg_sleep(0.6);

-- past expires_at: not counted, not spendable, though expire_due has not run
SELECT points.balance(401), points.balance(402);
SELECT count(*) FROM points.expiring(401, '1 minute');
\set VERBOSITY sqlstate
SELECT points.use(401, 31);
\set VERBOSITY default
SELECT points.use(401, 31);
SELECT amount, balance_after FROM points.use(401, 10);
-- the stored balance still holds the unexpired-by-job lot; verify agrees
SELECT balance FROM points.account WHERE user_id = 401;
SELECT * FROM points.verify(401);

-- the expiry job writes one expire transaction (and event) per user, listing its lots
SELECT points.expire_due() >= 2 AS expired;
SELECT points.expire_due();
SELECT user_seq, kind, amount, balance_after,
       metadata = jsonb_build_object('lots', jsonb_build_array(
           jsonb_build_object('lot_id', (SELECT tx_id FROM points.history(401) WHERE user_seq = 1),
                              'amount', 100))) AS names_lot
FROM points.history(401) ORDER BY user_seq;
SELECT o.type, (o.payload->>'amount')::bigint AS amount
FROM points.outbox o JOIN points.ledger g ON g.tx_id = o.id
WHERE g.user_id IN (401, 402) AND g.kind = 'expire' ORDER BY g.user_id;
SELECT points.balance(401), points.balance(402);
SELECT balance FROM points.account WHERE user_id IN (401, 402) ORDER BY user_id;

-- max_lots bounds one call
SELECT count(points.earn(403, 1, expires_at => clock_timestamp() + interval '300 ms'))
FROM generate_series(1, 5);
SELECT pg_sleep(0.4);
SELECT points.expire_due(2), points.expire_due(2), points.expire_due(2), points.expire_due(2);
SELECT user_seq, amount, jsonb_array_length(metadata->'lots') AS lots
FROM points.history(403) WHERE kind = 'expire' ORDER BY user_seq;

-- the lots of a user due together expire in one transaction, soonest first,
-- at most 100 lots to a transaction (an event stays small)
SELECT count(points.earn(406, i, expires_at => now() + interval '300 ms' - i * interval '10 ms'))
FROM generate_series(1, 3) i;
SELECT count(points.earn(407, 1, expires_at => clock_timestamp() + interval '300 ms'))
FROM generate_series(1, 101);
SELECT pg_sleep(0.4);
SELECT points.expire_due();
SELECT user_id, user_seq, amount, balance_after, jsonb_array_length(metadata->'lots') AS lots
FROM points.ledger WHERE user_id IN (406, 407) AND kind = 'expire' ORDER BY user_id, user_seq;
SELECT array_agg((x->>'amount')::int ORDER BY o) AS soonest_first
FROM points.ledger, jsonb_array_elements(metadata->'lots') WITH ORDINALITY AS e(x, o)
WHERE user_id = 406 AND kind = 'expire';
SELECT count(*) AS lots_listed_once
FROM points.lot l JOIN points.ledger g ON g.user_id = l.user_id AND g.kind = 'expire'
JOIN LATERAL jsonb_array_elements(g.metadata->'lots') x ON (x->>'lot_id')::bigint = l.lot_id
WHERE l.user_id IN (406, 407) AND (x->>'amount')::bigint = l.amount AND l.remaining = 0;
SELECT o.payload->'metadata' = g.metadata AS event_lists_lots, count(*)
FROM points.ledger g JOIN points.outbox o ON o.id = g.tx_id
WHERE g.user_id IN (406, 407) AND g.kind = 'expire' GROUP BY 1;

-- a use cancelled after its lot expired restores points that are already expired
SELECT amount FROM points.earn(404, 50, expires_at => clock_timestamp() + interval '300 ms');
CREATE TEMP TABLE u AS SELECT tx_id FROM points.use(404, 20);
SELECT pg_sleep(0.4);
SELECT points.expire_due();
SELECT kind, amount, balance_after FROM points.cancel((SELECT tx_id FROM u));
SELECT points.balance(404);
SELECT points.expire_due();
SELECT user_seq, kind, amount, balance_after FROM points.history(404) ORDER BY user_seq;

-- expiring(): lots expiring within the interval, soonest first; never-expiring ones are not listed
SELECT amount FROM points.earn(405, 5, expires_at => now() + interval '2 days');
SELECT amount FROM points.earn(405, 6, expires_at => now() + interval '1 day');
SELECT amount FROM points.earn(405, 7, expires_at => now() + interval '40 days');
SELECT amount FROM points.earn(405, 8, expires_at => 'infinity');
SELECT remaining FROM points.expiring(405);
SELECT remaining FROM points.expiring(405, '3 days');
SELECT remaining FROM points.expiring(405, '100000 years');
SELECT remaining FROM points.expiring(405, '0');
SELECT * FROM points.verify();

-- with a trigger on the ledger, expiry writes through SQL so that it runs
CREATE TABLE ledger_seen (tx_id bigint, kind text, amount bigint);
CREATE FUNCTION see_tx() RETURNS trigger LANGUAGE plpgsql AS
$$BEGIN INSERT INTO public.ledger_seen VALUES (NEW.tx_id, NEW.kind, NEW.amount); RETURN NEW; END$$;
CREATE TRIGGER see_tx AFTER INSERT ON points.ledger FOR EACH ROW EXECUTE FUNCTION see_tx();
SELECT count(points.earn(408, 4, expires_at => clock_timestamp() + interval '300 ms'))
FROM generate_series(1, 2);
SELECT pg_sleep(0.4);
SELECT points.expire_due();
SELECT kind, amount FROM ledger_seen s JOIN points.ledger g USING (tx_id, kind, amount)
WHERE g.user_id = 408 ORDER BY g.user_seq;
DROP TRIGGER see_tx ON points.ledger;
DROP TABLE ledger_seen;
DROP FUNCTION see_tx();
SELECT * FROM points.verify();

-- with a trigger on the lot table, expiry reads and empties the lots through
-- SQL (the trigger sees each update); a twin user expired directly before
-- got the same transaction, metadata and lots.  Each twin: lots of 1, 2
-- and 3 points due in a second (the 3 soonest: times from the statement's
-- start, so that a slow machine cannot reorder them), 2 points used from
-- the 3
CREATE FUNCTION pg_temp.three_lots(u bigint) RETURNS bigint LANGUAGE sql AS $$
  SELECT count(points.earn(u, a, expires_at => now() + interval '1 s' - a * interval '1 ms'))
  FROM generate_series(1, 3) a;
  SELECT amount FROM points.use(u, 2);
$$;
SELECT pg_temp.three_lots(409);
SELECT pg_sleep(1.1);
SELECT points.expire_due() AS expired;
SELECT pg_temp.three_lots(410);
CREATE TABLE lot_seen (lot_id bigint, old_remaining bigint, new_remaining bigint);
CREATE FUNCTION see_lot() RETURNS trigger LANGUAGE plpgsql AS
$$BEGIN INSERT INTO public.lot_seen VALUES (NEW.lot_id, OLD.remaining, NEW.remaining); RETURN NEW; END$$;
CREATE TRIGGER see_lot AFTER UPDATE ON points.lot FOR EACH ROW EXECUTE FUNCTION see_lot();
SELECT pg_sleep(1.1);
SELECT points.expire_due() AS expired;
SELECT user_id, user_seq, amount, balance_after,
       jsonb_path_query_array(metadata, '$.lots[*].amount') AS lot_amounts
FROM points.ledger WHERE user_id IN (409, 410) AND kind = 'expire' ORDER BY user_id;
SELECT user_id, array_agg(amount || '/' || remaining ORDER BY lot_id) AS lots
FROM points.lot WHERE user_id IN (409, 410) GROUP BY user_id ORDER BY user_id;
SELECT l.user_id, s.old_remaining, s.new_remaining
FROM lot_seen s JOIN points.lot l USING (lot_id) ORDER BY s.lot_id;
DROP TRIGGER see_lot ON points.lot;
DROP TABLE lot_seen;
DROP FUNCTION see_lot();
SELECT * FROM points.verify();

-- without its indexes (dropped, or being rebuilt) expiry reads through SQL
-- and finds the same lots
SELECT pg_temp.three_lots(411);
SELECT pg_sleep(1.1);
BEGIN;
DROP INDEX points.lot_due_idx;
DROP INDEX points.lot_user_idx;
SELECT points.expire_due() AS expired;
SELECT user_seq, amount, balance_after, jsonb_path_query_array(metadata, '$.lots[*].amount') AS lot_amounts
FROM points.ledger WHERE user_id = 411 AND kind = 'expire';
SELECT * FROM points.verify(411);
ROLLBACK;
SELECT points.expire_due() AS expired;
SELECT user_seq, amount, balance_after, jsonb_path_query_array(metadata, '$.lots[*].amount') AS lot_amounts
FROM points.ledger WHERE user_id = 411 AND kind = 'expire';
SELECT * FROM points.verify();

-- a run that rolls back does not make the next ones skip what it expired
-- (the search hint is dropped at an abort): two users' lots due, two
-- runs of three lots each in a transaction that rolls back, then one run
-- expires all six
SELECT count(points.earn(412, 1, expires_at => now() + interval '1 s')),
       count(points.earn(413, 1, expires_at => now() + interval '1050 ms'))
FROM generate_series(1, 3);
SELECT pg_sleep(1.1);
BEGIN;
SELECT points.expire_due(3) AS first_run, points.expire_due(3) AS second_run;
ROLLBACK;
SELECT points.expire_due() AS after_rollback;
SELECT user_id, amount FROM points.ledger WHERE user_id IN (412, 413) AND kind = 'expire' ORDER BY user_id;
SELECT * FROM points.verify();
