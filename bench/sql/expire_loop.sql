-- W6: run points.expire_due(:batch) until it finds nothing (as the worker
-- does), each batch its own transaction; bounded by :max_s seconds.
\set ON_ERROR_STOP on
DO $$
DECLARE
    n bigint; total bigint := 0; calls int := 0;
    t0 timestamptz := clock_timestamp();
BEGIN
    LOOP
        n := points.expire_due(current_setting('bench.batch')::int);
        COMMIT;
        total := total + n; calls := calls + 1;
        EXIT WHEN n = 0 OR clock_timestamp() - t0 > make_interval(secs => current_setting('bench.max_s')::float8);
    END LOOP;
    RAISE NOTICE 'expired % lots in % calls, % s', total, calls,
        round(extract(epoch FROM clock_timestamp() - t0)::numeric, 3);
END $$;
