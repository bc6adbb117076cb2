-- use: soonest-expiring lots first, then the oldest; consumption recorded
SELECT amount FROM points.earn(201, 100, expires_at => now() + interval '30 days');
SELECT amount FROM points.earn(201, 100, expires_at => now() + interval '10 days');
SELECT amount FROM points.earn(201, 100, expires_at => 'infinity');
SELECT amount FROM points.earn(201, 100, expires_at => now() + interval '10 days');

SELECT user_seq, kind, amount, balance_after, reason, metadata
FROM points.use(201, 150, reason => 'checkout', metadata => '{"basket": [1, 2]}');
-- took 100 from the first 10-day lot, then 50 from the second (same expiry, later earn)
SELECT g.user_seq AS lot_of_earn_seq, u.taken, u.restored
FROM points.use_lot u JOIN points.ledger g ON g.tx_id = u.lot_id
WHERE u.use_tx = (SELECT max(tx_id) FROM points.ledger WHERE user_id = 201)
ORDER BY g.user_seq;
SELECT g.user_seq AS lot_of_earn_seq, l.remaining
FROM points.lot l JOIN points.ledger g ON g.tx_id = l.lot_id
WHERE l.user_id = 201 ORDER BY g.user_seq;

SELECT user_seq, amount, balance_after FROM points.use(201, 200);
-- the 'infinity' lot is used last
SELECT g.user_seq AS lot_of_earn_seq, l.remaining
FROM points.lot l JOIN points.ledger g ON g.tx_id = l.lot_id
WHERE l.user_id = 201 ORDER BY g.user_seq;
SELECT points.balance(201);

-- not enough: PT001 naming the user and the numbers; nothing changes
\set VERBOSITY sqlstate
SELECT points.use(201, 51);
\set VERBOSITY default
SELECT points.use(201, 51);
SELECT points.use(202, 1);
SELECT points.balance(201), (SELECT last_seq FROM points.account WHERE user_id = 201);
SELECT user_seq, amount, balance_after FROM points.use(201, 50);
SELECT points.balance(201);
SELECT * FROM points.verify(201);

-- without lot_user_idx (dropped, or being rebuilt) a use finds and takes its
-- lots through SQL: the same order, and an expired lot is not spendable
BEGIN;
DROP INDEX points.lot_user_idx;
SELECT amount FROM points.earn(203, 100, expires_at => now() + interval '30 days');
SELECT amount FROM points.earn(203, 100, expires_at => now() + interval '10 days');
SELECT amount FROM points.earn(203, 100, expires_at => 'infinity');
SELECT amount FROM points.earn(203, 100, expires_at => now() + interval '10 days');
SELECT amount FROM points.earn(203, 7, expires_at => clock_timestamp() + interval '100 ms');
SELECT pg_sleep(0.2);
SELECT user_seq, kind, amount, balance_after FROM points.use(203, 150);
SELECT g.user_seq AS lot_of_earn_seq, u.taken, u.restored
FROM points.use_lot u JOIN points.ledger g ON g.tx_id = u.lot_id
WHERE u.use_tx = (SELECT max(tx_id) FROM points.ledger WHERE user_id = 203)
ORDER BY g.user_seq;
SAVEPOINT s;
SELECT points.use(203, 251);
ROLLBACK TO s;
SELECT * FROM points.verify(203);
ROLLBACK;
