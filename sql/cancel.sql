-- cancel: of an earn, of a use (partial, restoring the same lots), over-cancel, wrong kind
CREATE FUNCTION pg_temp.try(q text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN EXECUTE q; RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
  RETURN SQLSTATE || ': ' || regexp_replace(SQLERRM, 'transaction \d+', 'transaction T', 'g');
END $$;
CREATE TEMP TABLE t (name text PRIMARY KEY, tx_id bigint);

INSERT INTO t SELECT 'e1', tx_id FROM points.earn(301, 100, expires_at => now() + interval '5 days');
INSERT INTO t SELECT 'e2', tx_id FROM points.earn(301, 100, expires_at => now() + interval '9 days');
INSERT INTO t SELECT 'u1', tx_id FROM points.use(301, 150);

-- partial cancel of the use gives back to the lot that expires last first
SELECT kind, amount, balance_after, cancels_tx = (SELECT tx_id FROM t WHERE name = 'u1') AS links
FROM points.cancel((SELECT tx_id FROM t WHERE name = 'u1'), 30, reason => 'item returned');
SELECT t.name, l.remaining FROM points.lot l JOIN t ON t.tx_id = l.lot_id ORDER BY t.name;
SELECT kind, amount, balance_after
FROM points.cancel((SELECT tx_id FROM t WHERE name = 'u1'), 40);
SELECT t.name, l.remaining FROM points.lot l JOIN t ON t.tx_id = l.lot_id ORDER BY t.name;
-- the rest (NULL amount: all not cancelled before)
SELECT kind, amount, balance_after FROM points.cancel((SELECT tx_id FROM t WHERE name = 'u1'));
SELECT t.name, l.remaining FROM points.lot l JOIN t ON t.tx_id = l.lot_id ORDER BY t.name;
-- nothing left
SELECT pg_temp.try(format('SELECT points.cancel(%s)', tx_id))
FROM t WHERE name = 'u1';
SELECT pg_temp.try(format('SELECT points.cancel(%s, 1)', tx_id))
FROM t WHERE name = 'u1';

-- cancel of an earn takes the points out of its lot
INSERT INTO t SELECT 'u2', tx_id FROM points.use(301, 80);   -- takes 80 of e1
SELECT t.name, l.remaining FROM points.lot l JOIN t ON t.tx_id = l.lot_id ORDER BY t.name;
-- e1 holds only 20 now: PT001
SELECT pg_temp.try(format('SELECT points.cancel(%s, 50)', tx_id))
FROM t WHERE name = 'e1';
SELECT kind, amount, balance_after FROM points.cancel((SELECT tx_id FROM t WHERE name = 'e1'), 20);
-- more than is left of the earn to cancel: PT003
SELECT pg_temp.try(format('SELECT points.cancel(%s, 81)', tx_id))
FROM t WHERE name = 'e1';
-- cancelling the use afterwards restores to e1 (with e1's expiry) and e2
SELECT kind, amount, balance_after FROM points.cancel((SELECT tx_id FROM t WHERE name = 'u2'));
SELECT t.name, l.remaining FROM points.lot l JOIN t ON t.tx_id = l.lot_id ORDER BY t.name;

-- only earn and use can be cancelled
SELECT pg_temp.try(format('SELECT points.cancel(%s)', max(tx_id)))
FROM points.ledger WHERE user_id = 301 AND kind = 'use_cancel';
SELECT pg_temp.try(format('SELECT points.cancel(%s)', max(tx_id)))
FROM points.ledger WHERE user_id = 301 AND kind = 'earn_cancel';
-- unknown tx: P0002
SELECT pg_temp.try('SELECT points.cancel(999999999)');

-- a cancelled earn's expired lot cannot be cancelled (PT001)
INSERT INTO t SELECT 'e3', tx_id FROM points.earn(302, 10, expires_at => clock_timestamp() + interval '200 ms');
SELECT pg_sleep(0.3);
SELECT pg_temp.try(format('SELECT points.cancel(%s)', tx_id))
FROM t WHERE name = 'e3';

SELECT user_seq, kind, amount, balance_after FROM points.history(301) ORDER BY user_seq;
SELECT * FROM points.verify(301);
