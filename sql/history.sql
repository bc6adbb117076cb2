-- history: newest first, paging with before_seq, archived rows included
SELECT count(points.earn(601, g)) FROM generate_series(1, 12) g;
SELECT user_seq, amount FROM points.history(601, max_rows => 5);
SELECT user_seq, amount FROM points.history(601, before_seq => 8, max_rows => 5);
SELECT user_seq, amount FROM points.history(601, before_seq => 3);
SELECT count(*) FROM points.history(601, before_seq => 1);
SELECT count(*) FROM points.history(601);
SELECT count(*) FROM points.history(601, max_rows => 2147483647);
SELECT count(*) FROM points.history(699);   -- unknown user: no rows
-- paging walks every row exactly once
WITH RECURSIVE pages(n, last_seq, seqs) AS (
    SELECT 1, min(user_seq), array_agg(user_seq ORDER BY user_seq DESC)
    FROM points.history(601, max_rows => 5)
  UNION ALL
    SELECT n + 1, (SELECT min(user_seq) FROM points.history(601, last_seq, 5)),
           (SELECT array_agg(user_seq ORDER BY user_seq DESC) FROM points.history(601, last_seq, 5))
    FROM pages WHERE last_seq > 1
)
SELECT n, seqs FROM pages;
-- archived rows are included, in order
SET points.archive_after = 0;
SELECT points.archive(4);
RESET points.archive_after;
SELECT count(*) FROM points.ledger_archive WHERE user_id = 601;
SELECT amount FROM points.use(601, 1);
SELECT user_seq, kind, amount, balance_after FROM points.history(601, max_rows => 20);
