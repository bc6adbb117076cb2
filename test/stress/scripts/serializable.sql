-- a SERIALIZABLE caller on a hot user; 40001 is retried by pgbench
\set u random(1, 5)
\set amt random(1, 40)
BEGIN ISOLATION LEVEL SERIALIZABLE;
SELECT points.balance(:u);
SELECT stress.earn(:u, :amt, false);
SELECT stress.cancel_recent(:u, 1, 20, false);
COMMIT;
