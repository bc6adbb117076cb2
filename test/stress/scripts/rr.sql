-- a REPEATABLE READ caller on a hot user; 40001 is retried by pgbench
\set u random(1, 5)
\set amt random(1, 40)
BEGIN ISOLATION LEVEL REPEATABLE READ;
SELECT points.balance(:u);
SELECT stress.use(:u, :amt);
SELECT stress.earn(:u, :amt, false);
COMMIT;
