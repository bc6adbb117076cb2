-- verify: no rows while consistent; a damaged account is reported
SELECT count(points.earn(u, 100)) FROM generate_series(801, 803) u;
SELECT amount FROM points.use(802, 30);
SELECT * FROM points.verify();
SELECT * FROM points.verify(802);
SELECT * FROM points.verify(899);
-- damage the account, a lot and the ledger (only a superuser can)
UPDATE points.account SET balance = balance + 1 WHERE user_id = 801;
UPDATE points.lot SET remaining = remaining - 5 WHERE user_id = 802;
DELETE FROM points.ledger WHERE user_id = 803;
SELECT * FROM points.verify() WHERE user_id BETWEEN 801 AND 803;
SELECT * FROM points.verify(801);
SELECT * FROM points.verify(802);
SELECT * FROM points.verify(803);
-- repair to leave the database consistent for the tests after this one
UPDATE points.account SET balance = balance - 1 WHERE user_id = 801;
UPDATE points.lot SET remaining = remaining + 5 WHERE user_id = 802;
DELETE FROM points.lot WHERE user_id = 803;
DELETE FROM points.outbox WHERE aggregateid = '803';
DELETE FROM points.account WHERE user_id = 803;
SELECT * FROM points.verify();
