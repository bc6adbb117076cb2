-- earn: lots, user_seq, balance_after, outbox rows, defaults
CREATE FUNCTION pg_temp.try(q text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN EXECUTE q; RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
  RETURN SQLSTATE || ': ' || regexp_replace(SQLERRM, 'transaction \d+', 'transaction T', 'g');
END $$;

SELECT user_id, user_seq, kind, amount, balance_after, idempotency_key, cancels_tx,
       reason, metadata, replayed
FROM points.earn(101, 100, reason => 'signup', metadata => '{"order": 7}');
SELECT user_id, user_seq, kind, amount, balance_after
FROM points.earn(101, 250, expires_at => 'infinity');
SELECT points.balance(101), points.balance(999999);   -- unknown user: 0

-- the lot of each earn: lot_id is the earn's tx_id
SELECT l.amount, l.remaining, l.expires_at = 'infinity' AS never,
       CASE WHEN l.expires_at < 'infinity' THEN l.expires_at - g.created_at END AS validity
FROM points.lot l JOIN points.ledger g ON g.tx_id = l.lot_id
WHERE l.user_id = 101 ORDER BY l.lot_id;

-- points.default_validity applies when expires_at is NULL
SET points.default_validity = '10d';
CREATE TEMP TABLE e AS SELECT * FROM points.earn(101, 1);
SELECT l.expires_at - e.created_at AS validity FROM points.lot l JOIN e ON l.lot_id = e.tx_id;
RESET points.default_validity;

-- one outbox row per transaction, with the event fields
SELECT o.aggregatetype, o.aggregateid, o.type, o.id = g.tx_id AS id_is_tx,
       o.payload->>'type' AS type, (o.payload->>'user_seq')::int AS user_seq,
       (o.payload->>'amount')::bigint AS amount,
       (o.payload->>'balance_after')::bigint AS balance_after,
       o.payload->'metadata' AS metadata, o.payload->>'reason' AS reason,
       (o.payload->>'event_id')::bigint = g.tx_id AS event_id_ok,
       (o.payload->>'occurred_at')::timestamptz = g.created_at AS occurred_at_ok
FROM points.outbox o JOIN points.ledger g ON g.tx_id = o.id
WHERE g.user_id = 101 ORDER BY g.user_seq;
SELECT array_agg(k ORDER BY k) FROM points.outbox o, jsonb_object_keys(o.payload) k
WHERE o.id = (SELECT min(tx_id) FROM points.ledger WHERE user_id = 101);

-- user_seq is per user and gapless; a failed call uses no user_seq
SELECT user_seq FROM points.earn(102, 5);
SELECT pg_temp.try('SELECT points.earn(102, 0)');
SELECT user_seq FROM points.earn(102, 5);

-- overflow: a balance that would pass bigint is 22003 and changes nothing
SELECT balance_after FROM points.earn(103, 9223372036854775000);
SELECT pg_temp.try('SELECT points.earn(103, 1000)');
SELECT points.balance(103);

-- a rolled-back earn leaves nothing
BEGIN;
SELECT user_seq FROM points.earn(104, 10);
ROLLBACK;
SELECT points.balance(104),
       (SELECT count(*) FROM points.ledger WHERE user_id = 104) AS ledger,
       (SELECT count(*) FROM points.lot WHERE user_id = 104) AS lots,
       (SELECT count(*) FROM points.outbox WHERE aggregateid = '104') AS events,
       (SELECT count(*) FROM points.account WHERE user_id = 104) AS accounts;

-- node_id prefixes every tx_id
SET points.node_id = 3;
SELECT tx_id >> 40 AS node, tx_id & ((1::bigint << 40) - 1) > 0 AS n_ok FROM points.earn(105, 1);
RESET points.node_id;
SELECT tx_id >> 40 AS node FROM points.earn(105, 1);

-- a write returns the row it stored, whether it wrote directly or, with a
-- trigger on ledger, lot, outbox or account, through SQL so that it fires
CREATE TABLE write_seen (tbl text, id bigint);
CREATE FUNCTION see_write() RETURNS trigger LANGUAGE plpgsql AS
$$BEGIN
  INSERT INTO public.write_seen VALUES (TG_TABLE_NAME, (to_jsonb(NEW) ->> CASE TG_TABLE_NAME
    WHEN 'ledger' THEN 'tx_id' WHEN 'lot' THEN 'lot_id' WHEN 'account' THEN 'user_id'
    ELSE 'id' END)::bigint);
  RETURN NEW;
END$$;
CREATE FUNCTION pg_temp.writes(u bigint, path text) RETURNS SETOF record LANGUAGE plpgsql AS
$$DECLARE
  e points.tx;
  s points.tx;
BEGIN
  e := points.earn(u, 50, 'earn-' || u, expires_at => '2100-01-01', reason => 'welcome',
                   metadata => '{"order": 7}');
  RETURN NEXT (path, e);
  s := points.use(u, 20, 'use-' || u, reason => 'checkout', metadata => '[1, 2]');
  RETURN NEXT (path, s);
  RETURN NEXT (path, points.cancel(s.tx_id, 5, 'refund-' || u, reason => 'refund'));
  RETURN NEXT (path, points.cancel(e.tx_id, 10, 'cut-' || u));
END$$;
CREATE TEMP TABLE w AS SELECT * FROM pg_temp.writes(106, 'direct') AS x(path text, r points.tx);
CREATE TRIGGER see_ledger AFTER INSERT ON points.ledger FOR EACH ROW EXECUTE FUNCTION see_write();
CREATE TRIGGER see_lot AFTER INSERT ON points.lot FOR EACH ROW EXECUTE FUNCTION see_write();
CREATE TRIGGER see_outbox AFTER INSERT ON points.outbox FOR EACH ROW EXECUTE FUNCTION see_write();
CREATE TRIGGER see_account AFTER UPDATE ON points.account FOR EACH ROW EXECUTE FUNCTION see_write();
INSERT INTO w SELECT * FROM pg_temp.writes(107, 'sql') AS x(path text, r points.tx);
DROP TRIGGER see_ledger ON points.ledger;
DROP TRIGGER see_lot ON points.lot;
DROP TRIGGER see_outbox ON points.outbox;
DROP TRIGGER see_account ON points.account;
-- every returned row is the ledger row as stored, and its event is there
SELECT path, (r).user_seq, (r).kind, (r).amount, (r).balance_after, (r).replayed,
       (SELECT count(*) FROM points.ledger g
        WHERE (g.tx_id, g.user_id, g.user_seq, g.kind, g.amount, g.balance_after,
               g.idempotency_key, g.cancels_tx, g.reason, g.metadata, g.created_at)
              IS NOT DISTINCT FROM ((r).tx_id, (r).user_id, (r).user_seq, (r).kind, (r).amount,
               (r).balance_after, (r).idempotency_key, (r).cancels_tx, (r).reason,
               (r).metadata, (r).created_at)) AS stored,
       (SELECT count(*) FROM points.outbox o WHERE o.id = (r).tx_id
          AND o.payload ->> 'kind' = (r).kind AND (o.payload ->> 'amount')::bigint = (r).amount
          AND o.payload -> 'metadata' IS NOT DISTINCT FROM coalesce((r).metadata, 'null')
          AND o.aggregatetype = 'points.account') AS event
FROM w ORDER BY path, (r).user_seq;
-- the triggers saw the SQL path's rows: 4 ledger rows, 1 lot, 4 events
SELECT tbl, count(*) FROM write_seen s
WHERE s.id IN (SELECT (r).tx_id FROM w WHERE path = 'sql') GROUP BY tbl ORDER BY tbl;
SELECT count(*) AS seen_of_direct FROM write_seen s
WHERE s.id IN (SELECT (r).tx_id FROM w WHERE path = 'direct');
-- and each of its 4 writes updated the account through SQL (the trigger ran)
SELECT id AS user_id, count(*) AS account_updates FROM write_seen
WHERE tbl = 'account' GROUP BY id ORDER BY id;
-- and both paths left the same lots and balances
SELECT l.user_id, l.amount, l.remaining, l.expires_at FROM points.lot l
WHERE l.user_id IN (106, 107) ORDER BY l.user_id;
SELECT points.balance(106), points.balance(107);
SELECT * FROM points.verify(106) UNION ALL SELECT * FROM points.verify(107);
-- a trigger on the account alone sends the whole write through SQL too
CREATE TRIGGER see_account AFTER UPDATE ON points.account FOR EACH ROW EXECUTE FUNCTION see_write();
SELECT user_seq, kind, amount, balance_after FROM points.earn(112, 9);
SELECT user_seq, kind, amount, balance_after FROM points.use(112, 4);
DROP TRIGGER see_account ON points.account;
SELECT tbl, count(*) FROM write_seen WHERE tbl = 'account' AND id = 112 GROUP BY tbl;
SELECT * FROM points.verify(112);
DROP TABLE write_seen;
DROP FUNCTION see_write();

-- a constraint or default added, changed or dropped between two writes of
-- a session applies from the next write on (the direct inserts compile
-- them once and drop them with the table's cache), also when rolled back
SELECT user_seq FROM points.earn(108, 10);
ALTER TABLE points.outbox ALTER COLUMN aggregatetype SET DEFAULT 'test.changed';
ALTER TABLE points.ledger ADD CONSTRAINT test_small CHECK (amount < 1000) NOT VALID;
SELECT user_seq FROM points.earn(108, 20);
SELECT pg_temp.try('SELECT points.earn(108, 5000)');
SELECT aggregatetype, payload ->> 'amount' AS amount FROM points.outbox
WHERE aggregateid = '108' ORDER BY id;
ALTER TABLE points.ledger DROP CONSTRAINT test_small;
ALTER TABLE points.outbox ALTER COLUMN aggregatetype SET DEFAULT 'points.account';
SELECT user_seq FROM points.earn(108, 5000);
BEGIN;
ALTER TABLE points.ledger ADD CONSTRAINT test_small CHECK (amount < 1000) NOT VALID;
SELECT pg_temp.try('SELECT points.earn(108, 5000)');
ROLLBACK;
SELECT user_seq FROM points.earn(108, 5000);
SELECT aggregatetype, count(*) FROM points.outbox WHERE aggregateid = '108' GROUP BY 1 ORDER BY 1;
SELECT * FROM points.verify(108);

-- the direct writes keep every index whole: one account updated so often in
-- one transaction that its versions fill pages (an update that is not HOT
-- needs new index entries), then amcheck, every heap row in every index
CREATE EXTENSION IF NOT EXISTS amcheck;
BEGIN;
SELECT count(points.earn(109, 1)) FROM generate_series(1, 400);
SELECT count(points.use(109, 1)) FROM generate_series(1, 100);
COMMIT;
SELECT c.relname, bt_index_check(c.oid, true) FROM pg_index i
JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am a ON a.oid = c.relam
WHERE c.relnamespace = 'points'::regnamespace AND a.amname = 'btree'
  AND i.indrelid IN ('points.account'::regclass, 'points.ledger'::regclass,
                     'points.lot'::regclass, 'points.outbox'::regclass, 'points.use_lot'::regclass)
ORDER BY 1;
SET enable_seqscan = off;
SELECT balance, last_seq FROM points.account WHERE user_id = 109;
RESET enable_seqscan;
SELECT * FROM points.verify(109);

-- indexes made, changed and dropped between the calls of one session: the
-- index list each table keeps across calls (with partial indexes'
-- predicates and expressions compiled) follows, also a rolled-back change
SELECT user_seq FROM points.earn(109, 1, reason => 'Before');
CREATE INDEX test_reason_idx ON points.ledger (lower(reason)) WHERE reason IS NOT NULL;
CREATE INDEX test_lot_idx ON points.lot ((amount % 1000)) WHERE amount > 1;
SELECT user_seq FROM points.earn(109, 2, reason => 'Bonus A');
SELECT user_seq FROM points.use(109, 3, reason => 'Shop B');
BEGIN;
CREATE INDEX test_big_idx ON points.ledger (amount) WHERE amount > 100;
SELECT user_seq FROM points.earn(109, 101, reason => 'Bonus C');
ROLLBACK;
SELECT user_seq FROM points.earn(109, 102, reason => 'Bonus D');
SELECT c.relname, bt_index_check(c.oid, true) FROM pg_class c
WHERE c.relname IN ('test_reason_idx', 'test_lot_idx') ORDER BY 1;
SET enable_seqscan = off;
SET enable_bitmapscan = off;
SELECT user_seq, reason FROM points.ledger
WHERE lower(reason) IN ('before', 'bonus a', 'shop b', 'bonus c', 'bonus d')
  AND reason IS NOT NULL AND user_id = 109 ORDER BY 1;
SELECT count(*) FROM points.lot WHERE amount % 1000 = 102 AND amount > 1 AND user_id = 109;
RESET enable_seqscan;
RESET enable_bitmapscan;
DROP INDEX points.test_reason_idx, points.test_lot_idx;
SELECT user_seq FROM points.earn(109, 1);
SELECT * FROM points.verify(109);
DROP EXTENSION amcheck;

-- a write from within a write (a CHECK whose function earns for another
-- user): the nested write compiles its own constraints and defaults instead
-- of sharing those in use
CREATE FUNCTION nested_earn(u bigint) RETURNS boolean LANGUAGE plpgsql AS
$$BEGIN
  IF u = 110 THEN PERFORM points.earn(111, 3); END IF;
  RETURN true;
END$$;
ALTER TABLE points.ledger ADD CONSTRAINT test_nested CHECK (nested_earn(user_id)) NOT VALID;
SELECT user_seq, amount FROM points.earn(110, 7);
ALTER TABLE points.ledger DROP CONSTRAINT test_nested;
DROP FUNCTION nested_earn(bigint);
SELECT g.user_id, g.user_seq, g.amount, o.aggregatetype FROM points.ledger g
JOIN points.outbox o ON o.id = g.tx_id WHERE g.user_id IN (110, 111) ORDER BY g.user_id;
SELECT * FROM points.verify(110) UNION ALL SELECT * FROM points.verify(111);
SELECT user_seq FROM points.earn(110, 1);

-- without the account's primary key (dropped in this transaction) an earn
-- and a use of an existing account read it through SQL: same balances
BEGIN;
ALTER TABLE points.account DROP CONSTRAINT account_pkey;
SELECT user_seq, amount, balance_after FROM points.earn(110, 5);
SELECT user_seq, amount, balance_after FROM points.use(110, 2);
SELECT balance, last_seq FROM points.account WHERE user_id = 110;
SELECT * FROM points.verify(110);
ROLLBACK;
SELECT user_seq, amount, balance_after FROM points.earn(110, 5);
SELECT * FROM points.verify(110);
