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
