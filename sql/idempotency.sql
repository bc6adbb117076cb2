-- idempotency keys: per user, forever; replay vs PT002
CREATE FUNCTION pg_temp.try(q text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN EXECUTE q; RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
  RETURN SQLSTATE || ': ' || regexp_replace(SQLERRM, 'transaction \d+', 'transaction T', 'g');
END $$;

CREATE TEMP TABLE first AS SELECT * FROM points.earn(501, 100, 'order-1');
SELECT user_seq, amount, balance_after, idempotency_key, replayed FROM first;
-- same key, same operation and amount: the original transaction, replayed
SELECT r.tx_id = f.tx_id AS same_tx, r.user_seq, r.balance_after, r.created_at = f.created_at AS same_time, r.replayed
FROM points.earn(501, 100, 'order-1') r, first f;
-- ... even with other reason/metadata/expires_at (only operation and amount are compared)
SELECT replayed FROM points.earn(501, 100, 'order-1', reason => 'retry', expires_at => 'infinity');
SELECT points.balance(501), (SELECT count(*) FROM points.ledger WHERE user_id = 501);
-- same key, another amount or operation: PT002
SELECT pg_temp.try('SELECT points.earn(501, 101, ''order-1'')');
SELECT pg_temp.try('SELECT points.use(501, 100, ''order-1'')');
-- keys are per user
SELECT user_id, replayed FROM points.earn(502, 100, 'order-1');

-- use and cancel keys
SELECT amount, replayed FROM points.use(501, 40, 'pay-1');
SELECT amount, replayed FROM points.use(501, 40, 'pay-1');
SELECT pg_temp.try('SELECT points.use(501, 41, ''pay-1'')');
CREATE TEMP TABLE c AS SELECT * FROM points.cancel((SELECT tx_id FROM points.ledger WHERE user_id = 501 AND idempotency_key = 'pay-1'), 10, 'refund-1');
SELECT amount, replayed FROM c;
SELECT amount, replayed FROM points.cancel((SELECT tx_id FROM points.ledger WHERE user_id = 501 AND idempotency_key = 'pay-1'), 10, 'refund-1');
-- a replay of a cancel still replays after everything was cancelled
SELECT amount FROM points.cancel((SELECT tx_id FROM points.ledger WHERE user_id = 501 AND idempotency_key = 'pay-1'));
SELECT amount, replayed FROM points.cancel((SELECT tx_id FROM points.ledger WHERE user_id = 501 AND idempotency_key = 'pay-1'), 10, 'refund-1');
-- NULL amount replays whatever the first call cancelled
SELECT amount, replayed FROM points.cancel((SELECT tx_id FROM points.ledger WHERE user_id = 501 AND idempotency_key = 'pay-1'), NULL, 'refund-1');
SELECT pg_temp.try('SELECT points.cancel((SELECT tx_id FROM first), 10, ''refund-1'')');
SELECT pg_temp.try('SELECT points.cancel((SELECT tx_id FROM points.ledger WHERE user_id = 501 AND idempotency_key = ''pay-1''), 11, ''refund-1'')');

-- a failed call does not consume its key
SELECT pg_temp.try('SELECT points.use(501, 1000000, ''pay-2'')');
SELECT amount, replayed FROM points.use(501, 10, 'pay-2');
-- a rolled-back call does not consume its key
BEGIN;
SELECT amount FROM points.earn(501, 5, 'order-2');
ROLLBACK;
SELECT amount, replayed FROM points.earn(501, 6, 'order-2');

-- keys hold forever: after the rows were archived
SET points.archive_after = 0;
SELECT points.archive() > 0 AS archived;
SELECT count(*) FROM points.ledger WHERE user_id = 501;
SELECT r.tx_id = f.tx_id AS same_tx, r.replayed FROM points.earn(501, 100, 'order-1') r, first f;
SELECT pg_temp.try('SELECT points.earn(501, 99, ''order-1'')');
SELECT amount, replayed FROM points.use(501, 40, 'pay-1');
SELECT amount, replayed FROM points.cancel((SELECT tx_id FROM points.ledger_archive WHERE user_id = 501 AND idempotency_key = 'pay-1'), 10, 'refund-1');
RESET points.archive_after;
SELECT points.balance(501), (SELECT count(*) FROM points.ledger WHERE user_id = 501) AS live;
SELECT * FROM points.verify(501);
