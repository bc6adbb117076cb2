-- bad input: every SQLSTATE of the contract, hostile values, and nothing left behind
CREATE FUNCTION pg_temp.try(q text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN EXECUTE q; RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
  RETURN SQLSTATE || ': ' || regexp_replace(SQLERRM, 'transaction \d+', 'transaction T', 'g');
END $$;
SELECT amount FROM points.earn(901, 100);

-- 22004: NULL where a value is required
SELECT q, pg_temp.try(q) FROM unnest(ARRAY[
  'SELECT points.earn(NULL, 1)',
  'SELECT points.earn(901, NULL)',
  'SELECT points.use(NULL, 1)',
  'SELECT points.use(901, NULL)',
  'SELECT points.cancel(NULL)',
  'SELECT points.balance(NULL)',
  'SELECT points.history(NULL)',
  'SELECT points.history(901, NULL, NULL)',
  'SELECT points.expiring(NULL)',
  'SELECT points.expiring(901, NULL)',
  'SELECT points.expire_due(NULL)',
  'SELECT points.archive(NULL)']) q;

-- 22023: amount <= 0, max_rows <= 0, expires_at not in the future, a bad interval, bad text
SELECT q, pg_temp.try(q) FROM unnest(ARRAY[
  'SELECT points.earn(901, 0)',
  'SELECT points.earn(901, -5)',
  'SELECT points.earn(901, -9223372036854775808)',
  'SELECT points.use(901, 0)',
  'SELECT points.cancel(1, 0)',
  'SELECT points.cancel(1, -1)',
  'SELECT points.history(901, max_rows => 0)',
  'SELECT points.history(901, max_rows => -1)',
  'SELECT points.expire_due(0)',
  'SELECT points.archive(-1)',
  'SELECT points.expiring(901, ''-1 second'')',
  'SELECT points.earn(901, 1, expires_at => ''2000-01-01'')',
  'SELECT points.earn(901, 1, expires_at => ''-infinity'')',
  'SELECT points.earn(901, 1, idempotency_key => '''')',
  'SELECT points.earn(901, 1, idempotency_key => repeat(''k'', 256))',
  'SELECT points.earn(901, 1, reason => '''')',
  'SELECT points.use(901, 1, reason => repeat(''r'', 5000))',
  'SELECT points.earn(901, 1, metadata => (SELECT jsonb_object_agg(g::text, repeat(''x'', 100)) FROM generate_series(1, 1000) g))']) q;

-- 22003: overflow
SELECT amount FROM points.earn(902, 9223372036854775807);
SELECT pg_temp.try('SELECT points.earn(902, 1)');
CREATE TEMP TABLE u AS SELECT tx_id FROM points.use(902, 5);
SELECT amount FROM points.earn(902, 5);
SELECT pg_temp.try(format('SELECT points.cancel(%s)', tx_id)) FROM u;

-- PT001, PT002, PT003, P0002
SELECT pg_temp.try('SELECT points.use(901, 101)');
SELECT amount FROM points.earn(901, 1, 'k');
SELECT pg_temp.try('SELECT points.use(901, 1, ''k'')');
SELECT pg_temp.try(format('SELECT points.cancel(%s, 3)', tx_id))
FROM points.ledger WHERE user_id = 902 AND kind = 'earn' AND amount = 5;
SELECT pg_temp.try(format('SELECT points.cancel(%s, 3)', tx_id))
FROM points.ledger WHERE user_id = 902 AND kind = 'earn' AND amount = 5;
SELECT pg_temp.try('SELECT points.cancel(-1)');
SELECT pg_temp.try('SELECT points.cancel(9223372036854775807)');

-- hostile but valid values are accepted
SELECT user_id, amount FROM points.earn(-9223372036854775808, 1);
SELECT user_id, amount FROM points.earn(9223372036854775807, 1);
SELECT amount, reason = repeat('é', 2048) AS reason_kept
FROM points.earn(903, 1, reason => repeat('é', 2048));
SELECT metadata FROM points.earn(903, 1, metadata => 'null');
SELECT metadata FROM points.earn(903, 1, metadata => '[1, "two", {"three": 3.0}]');
SELECT metadata FROM points.earn(903, 1, metadata => '"\\u0041"');
SELECT pg_temp.try($$SELECT points.earn(903, 1, metadata => '"\u0000"')$$);
SELECT idempotency_key FROM points.earn(903, 1, idempotency_key => E'quote'' and \\ backslash "');
SELECT payload->>'idempotency_key' FROM points.outbox WHERE id = (SELECT max(tx_id) FROM points.ledger);
SELECT count(*) FROM points.history(903, before_seq => -9223372036854775808);
SELECT count(*) FROM points.history(903, before_seq => 9223372036854775807);
SELECT count(*) FROM points.expiring(903, '178000000 years');
SELECT points.expire_due(2147483647) >= 0, points.archive(2147483647) >= 0;

-- nothing of the failed calls was written
SELECT * FROM points.verify();
SELECT user_seq, kind, amount FROM points.history(901) ORDER BY user_seq;
SELECT count(*) FROM points.ledger g WHERE NOT EXISTS (SELECT FROM points.outbox o WHERE o.id = g.tx_id);
