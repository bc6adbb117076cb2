-- W4 set-up: bench.keys keyed earns through points.earn, 1000 users per
-- transaction: user u earns 10 points with key 'w4-<u>' (u = 1..bench.keys).
\set ON_ERROR_STOP on
DO $$
DECLARE
    n int := current_setting('bench.keys')::int;
BEGIN
    FOR c IN 0 .. (n - 1) / 1000 LOOP
        PERFORM points.earn(u, 10, idempotency_key => 'w4-' || u)
        FROM generate_series(c * 1000 + 1, least(n, c * 1000 + 1000)) u;
        COMMIT;
    END LOOP;
END $$;
