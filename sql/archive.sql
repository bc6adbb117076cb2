-- archive: old rows move to ledger_archive in batches, nothing is lost
SELECT count(points.earn(u, 10)) FROM generate_series(701, 710) u;
SELECT count(points.use(u, 3)) FROM generate_series(701, 710) u;
CREATE TEMP TABLE before AS
  SELECT user_id, sum(amount) AS total, count(*) AS n FROM (
    SELECT user_id, amount FROM points.ledger UNION ALL
    SELECT user_id, amount FROM points.ledger_archive) x
  WHERE user_id BETWEEN 701 AND 710 GROUP BY user_id;

-- nothing is old enough with the default of 365 days
SELECT points.archive();
SET points.archive_after = '365d';
SHOW points.archive_after;
SET points.archive_after = 0;
-- in batches of max_rows
SELECT points.archive(7);
SELECT points.archive(7) AS second_batch;
SELECT points.archive() > 0 AS rest;
SELECT points.archive();
SELECT count(*) FROM points.ledger WHERE user_id BETWEEN 701 AND 710;
SELECT count(*) FROM points.ledger_archive WHERE user_id BETWEEN 701 AND 710;
RESET points.archive_after;

-- sums and counts unchanged; history and verify still see everything
SELECT count(*) AS changed FROM before b JOIN (
    SELECT user_id, sum(amount) AS total, count(*) AS n FROM points.ledger_archive
    WHERE user_id BETWEEN 701 AND 710 GROUP BY user_id) a USING (user_id)
WHERE a.total <> b.total OR a.n <> b.n;
SELECT user_seq, kind, amount, balance_after FROM points.history(705);
SELECT * FROM points.verify();
-- a cancel of an archived transaction still works
SELECT kind, amount, balance_after
FROM points.cancel((SELECT tx_id FROM points.ledger_archive WHERE user_id = 705 AND kind = 'use'));
SELECT points.balance(705);
-- archive needs superuser to lower archive_after (suset)
CREATE ROLE points_archive_nobody;
SET ROLE points_archive_nobody;
SET points.archive_after = 0;
RESET ROLE;
DROP ROLE points_archive_nobody;
