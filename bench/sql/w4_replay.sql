-- W4: W1 with 10% of the calls replaying a keyed earn made at set-up
-- (same user, same key, same amount: answered from the first transaction)
\set r random(1, 100)
\if :r <= 10
\set k random(1, :keys)
SELECT points.earn(:k, 10, idempotency_key => 'w4-' || :k);
\else
\set u random(1, :users)
\if :r <= 82
SELECT points.earn(:u, 10);
\else
SELECT points.use(:u, 5);
\endif
\endif
