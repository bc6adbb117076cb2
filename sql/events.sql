-- events: every outbox payload equals the event SPEC.md describes, built
-- here in SQL from its ledger row (the extension builds it in C), for every
-- kind, every path (earn/use/cancel, queued earns, expiry) and odd values:
-- metadata of each JSON type, quotes and unicode in keys and reasons.
SELECT tx_id > 0 FROM points.earn(501, 100, idempotency_key => 'k"1\é', reason => E'tab\there',
                   metadata => '{"order": {"id": [1, 2.5, null, true]}, "s": "x"}');
SELECT tx_id > 0 FROM points.earn(501, 7, metadata => '"just a string"');
SELECT tx_id > 0 FROM points.earn(501, 8, metadata => '12.50');
SELECT tx_id > 0 FROM points.earn(501, 9, metadata => 'null');
SELECT tx_id > 0 FROM points.earn(501, 10, metadata => '[]');
SELECT tx_id > 0 FROM points.earn(501, 11, metadata => '{}', expires_at => 'infinity');
SELECT tx_id > 0 FROM points.use(501, 30, idempotency_key => 'u1', metadata => '[{"sku": "a"}]');
SELECT (points.cancel(tx_id, reason => 'refund')).tx_id > 0
FROM points.ledger WHERE user_id = 501 AND kind = 'use';
SELECT (points.cancel(tx_id, amount => 3)).tx_id > 0
FROM points.ledger WHERE user_id = 501 AND amount = 7;
SELECT points.earn_async(u, 5, idempotency_key => 'camp', metadata => '{"c": 1}') > 0
FROM generate_series(502, 504) u;
SELECT points.earn_async(502, 6, reason => 'second') > 0;
SELECT points.apply_queued();
SELECT tx_id > 0 FROM points.earn(505, 40, expires_at => clock_timestamp() + interval '100 ms');
SELECT pg_sleep(0.2);
SELECT points.expire_due();

-- the reference event of each ledger row
CREATE TEMP VIEW ref AS
SELECT g.tx_id, g.user_id::text AS aggregateid, g.created_at,
       CASE g.kind WHEN 'earn' THEN 'points.earned' WHEN 'use' THEN 'points.used'
            WHEN 'earn_cancel' THEN 'points.earn_cancelled'
            WHEN 'use_cancel' THEN 'points.use_cancelled'
            WHEN 'expire' THEN 'points.expired' END AS type,
       g.metadata, g.kind,
       jsonb_build_object(
         'event_id', g.tx_id, 'user_id', g.user_id, 'user_seq', g.user_seq,
         'tx_id', g.tx_id, 'kind', g.kind, 'amount', g.amount,
         'balance_after', g.balance_after,
         'occurred_at', to_char(g.created_at AT TIME ZONE 'UTC',
                                'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
         'idempotency_key', g.idempotency_key, 'cancels_tx', g.cancels_tx,
         'reason', g.reason, 'metadata', g.metadata) AS body
FROM points.ledger g WHERE g.user_id BETWEEN 501 AND 505;

SELECT count(*) AS events, count(DISTINCT r.kind) AS kinds FROM ref r;
-- payloads that differ from the reference (none), compared as jsonb and as text
SELECT r.tx_id, o.payload, r.body || jsonb_build_object('type', r.type) AS expected
FROM ref r JOIN points.outbox o ON o.id = r.tx_id
WHERE o.payload <> r.body || jsonb_build_object('type', r.type)
   OR o.payload::text <> (r.body || jsonb_build_object('type', r.type))::text
   OR o.type <> r.type OR o.aggregateid <> r.aggregateid
   OR o.created_at <> r.created_at OR o.aggregatetype <> 'points.account';
-- every ledger row has its event
SELECT count(*) FROM ref r WHERE NOT EXISTS (SELECT FROM points.outbox o WHERE o.id = r.tx_id);
-- expire events carry their lot; the metadata types came through as given
SELECT kind, jsonb_typeof(metadata) AS t, count(*) FROM ref GROUP BY 1, 2 ORDER BY 1, 2;
SELECT o.payload->'metadata' = jsonb_build_object('lots', jsonb_build_array(
           jsonb_build_object('lot_id', l.lot_id, 'amount', l.amount))) AS lot_ok
FROM points.outbox o JOIN points.ledger g ON g.tx_id = o.id
JOIN points.lot l ON l.user_id = g.user_id
WHERE g.kind = 'expire' AND g.user_id = 505;
