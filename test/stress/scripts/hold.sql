-- a transaction that holds a hot user for 0.1-0.3 s: the other clients'
-- calls on that user (points.lock_timeout = 100ms) get 55P03
\set u random(1, 5)
\set amt random(1, 30)
BEGIN;
SELECT stress.earn(:u, :amt, false);
SELECT pg_sleep(0.1 + random() * 0.2);
SELECT stress.use(:u, :amt);
SELECT stress.cancel_recent(:u, 0, 50, false);
COMMIT;
