-- keyed earn and use in a transaction that rolls back: nothing may remain
\set hot random(1, 100)
\set u case when :hot <= 50 then random(1, 5) else random_exponential(1000, 100000, 8.0) end
\set n random(1, 1000000000)
BEGIN;
SELECT stress.rolled_back(:u, :n);
ROLLBACK;
