-- W7: run points.archive(batch) as the worker does (each batch its own
-- transaction, then a rest of bench.rest times as long as the batch took:
-- the worker rests twice as long) until it finds nothing or bench.max_s
-- seconds have passed.
\set ON_ERROR_STOP on
DO $$
DECLARE
    n bigint; total bigint := 0; calls int := 0;
    t0 timestamptz := clock_timestamp(); t1 timestamptz;
BEGIN
    LOOP
        t1 := clock_timestamp();
        n := points.archive(current_setting('bench.batch')::int);
        COMMIT;
        total := total + n; calls := calls + 1;
        EXIT WHEN n = 0 OR clock_timestamp() - t0 > make_interval(secs => current_setting('bench.max_s')::float8);
        PERFORM pg_sleep(current_setting('bench.rest')::float8 * extract(epoch FROM clock_timestamp() - t1));
    END LOOP;
    RAISE NOTICE 'archived % rows in % calls, % s', total, calls,
        round(extract(epoch FROM clock_timestamp() - t0)::numeric, 3);
END $$;
