/*
 * stress.sql: the schema "stress" that test/stress/run.sh installs before a
 * run (it drops and recreates it, so every run starts clean).
 *
 *  - wrappers around the points API for the pgbench clients: each catches
 *    the SQLSTATEs the workload expects (PT001 not enough points, PT003
 *    over-cancel, 55P03 lock timeout), logs every call with its outcome in
 *    stress.call_log in the caller's transaction, and re-raises anything
 *    else, which aborts the pgbench client and fails the run.  40001 is not
 *    caught either: pgbench retries it (--max-tries).
 *  - client-side assertions on idempotency replays and on PT002, written to
 *    stress.violation;
 *  - the checker (stress.check_round, run in a loop by its own pgbench
 *    process at REPEATABLE READ) and the final checks (stress.final_checks),
 *    each a set of invariants, every one evaluated by one statement, that
 *    write what they find to stress.violation and count what they checked in
 *    stress.check_log.
 */
SET client_min_messages = warning;
DROP SCHEMA IF EXISTS stress CASCADE;
CREATE SCHEMA stress;

/*
 * run settings: strict_outbox = nothing consumes the outbox during the run;
 * start_tx = the newest transaction before the run (older ones were not made
 * by this run's clients)
 */
CREATE TABLE stress.config (strict_outbox boolean NOT NULL, start_tx bigint NOT NULL);

/* one row per API call that a committed transaction made */
CREATE UNLOGGED TABLE stress.call_log (
    op          text NOT NULL,          -- earn, use, cancel, replay_earn, ...
    user_id     bigint NOT NULL,
    outcome     text NOT NULL,          -- ok, replayed, none, or a SQLSTATE
    tx_id       bigint,
    user_seq    bigint,
    kind        text,
    amount      bigint,
    balance_after bigint,
    idempotency_key text,
    at          timestamptz NOT NULL DEFAULT clock_timestamp()
);

/* what a check or an assertion found wrong */
CREATE UNLOGGED TABLE stress.violation (
    found_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    source      text NOT NULL,          -- live (checker), workload, final
    check_name  text NOT NULL,
    user_id     bigint,
    detail      text
);

/* how many checks were evaluated, by category */
CREATE UNLOGGED TABLE stress.check_log (
    at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    source      text NOT NULL,
    check_name  text NOT NULL,
    checks      bigint NOT NULL,
    violations  bigint NOT NULL
);

/* what the background jobs did */
CREATE UNLOGGED TABLE stress.job_log (
    at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    archived    bigint NOT NULL,
    expired     bigint NOT NULL
);

/* every transaction, live or archived, read in one statement */
CREATE VIEW stress.tx AS
    SELECT 'live'::text AS src, tx_id, user_id, user_seq, kind, amount, balance_after,
           idempotency_key, cancels_tx, metadata, created_at
      FROM points.ledger
    UNION ALL
    SELECT 'archive', tx_id, user_id, user_seq, kind, amount, balance_after,
           idempotency_key, cancels_tx, metadata, created_at
      FROM points.ledger_archive;

INSERT INTO stress.config
SELECT coalesce(current_setting('points.kafka_brokers', true), '') = '',
       coalesce((SELECT max(tx_id) FROM stress.tx), 0);

CREATE FUNCTION stress.log(op text, u bigint, outcome text, r points.tx DEFAULT NULL)
RETURNS text LANGUAGE sql AS $$
    INSERT INTO stress.call_log (op, user_id, outcome, tx_id, user_seq, kind, amount,
                                 balance_after, idempotency_key)
    VALUES (op, u, outcome, r.tx_id, r.user_seq, r.kind, r.amount, r.balance_after,
            r.idempotency_key);
    SELECT outcome;
$$;

CREATE FUNCTION stress.violation(check_name text, u bigint, detail text)
RETURNS void LANGUAGE sql AS $$
    INSERT INTO stress.violation (source, check_name, user_id, detail)
    VALUES ('workload', check_name, u, detail);
$$;

/* ---------------------------------------------------------------- workload */

/* earn; short: expires within 0.2-3 s, so that uses race the expiry */
CREATE FUNCTION stress.earn(u bigint, amount bigint, short boolean, key text DEFAULT NULL)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    r points.tx;
    exp timestamptz;
BEGIN
    IF short THEN
        exp := clock_timestamp() + (200 + random() * 2800) * interval '1 ms';
    END IF;
    BEGIN
        SELECT * INTO r FROM points.earn(u, amount, key, exp);
    EXCEPTION WHEN SQLSTATE '55P03' THEN
        RETURN stress.log('earn', u, SQLSTATE);
    END;
    RETURN stress.log('earn', u, CASE WHEN r.replayed THEN 'replayed' ELSE 'ok' END, r);
END $$;

/* use; patient: wait up to 1 s for the user (the clients' default is 100 ms) */
CREATE FUNCTION stress.use(u bigint, amount bigint, key text DEFAULT NULL,
                           patient boolean DEFAULT false)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    r points.tx;
BEGIN
    IF patient THEN
        PERFORM set_config('points.lock_timeout', '1s', true);
    END IF;
    BEGIN
        SELECT * INTO r FROM points.use(u, amount, key);
    EXCEPTION WHEN SQLSTATE 'PT001' OR SQLSTATE '55P03' THEN
        RETURN stress.log('use', u, SQLSTATE);
    END;
    RETURN stress.log('use', u, CASE WHEN r.replayed THEN 'replayed' ELSE 'ok' END, r);
END $$;

/*
 * Cancel one of the user's recent earns or uses (pick: how far back among
 * them), pct percent of its original amount (0: all that is left), with a
 * key derived from the target and amount when keyed, so that a repeat of the
 * same cancel must replay.
 */
CREATE FUNCTION stress.cancel_recent(u bigint, pick int, pct int, keyed boolean)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    t record;
    amt bigint;
    k text;
    prev bigint;
    r points.tx;
BEGIN
    SELECT h.tx_id, h.amount INTO t
      FROM points.history(u, NULL, 12) h
     WHERE h.kind IN ('earn', 'use')
     ORDER BY h.user_seq DESC OFFSET pick LIMIT 1;
    IF NOT FOUND THEN
        RETURN stress.log('cancel', u, 'none');
    END IF;
    IF pct > 0 THEN
        amt := greatest(1, abs(t.amount) * pct / 100);
    END IF;
    IF keyed THEN
        k := format('c-%s-%s', t.tx_id, coalesce(amt::text, 'rest'));
        SELECT x.tx_id INTO prev FROM stress.tx x
         WHERE x.user_id = u AND x.idempotency_key = k;
    END IF;
    BEGIN
        SELECT * INTO r FROM points.cancel(t.tx_id, amt, k);
    EXCEPTION WHEN SQLSTATE 'PT001' OR SQLSTATE 'PT003' OR SQLSTATE '55P03' THEN
        IF prev IS NOT NULL THEN
            PERFORM stress.violation('replay', u,
                format('cancel key %s was applied by tx %s, a repeat failed with %s: %s',
                       k, prev, SQLSTATE, SQLERRM));
        END IF;
        RETURN stress.log('cancel', u, SQLSTATE);
    END;
    IF prev IS NOT NULL AND (NOT r.replayed OR r.tx_id <> prev) THEN
        PERFORM stress.violation('replay', u,
            format('cancel key %s was applied by tx %s, a repeat returned tx %s replayed %s',
                   k, prev, r.tx_id, r.replayed));
    END IF;
    IF r.cancels_tx IS DISTINCT FROM t.tx_id OR r.user_id <> u THEN
        PERFORM stress.violation('replay', u,
            format('cancel of tx %s returned tx %s cancelling %s of user %s',
                   t.tx_id, r.tx_id, r.cancels_tx, r.user_id));
    END IF;
    RETURN stress.log('cancel', u, CASE WHEN r.replayed THEN 'replayed' ELSE 'ok' END, r);
END $$;

/*
 * An idempotent earn or use whose key determines its operation and amount
 * (n: which of the user's keys).  If the key was already applied when the
 * call started, the call must replay that transaction; if the call applies
 * it, nobody had; a replay must return the transaction that holds the key.
 */
CREATE FUNCTION stress.replay(u bigint, n int, op_pick int)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    op text := CASE WHEN op_pick = 0 THEN 'earn' ELSE 'use' END;
    amt bigint := 1 + (n * 7) % 40;
    k text := format('r-%s-%s-%s', op, amt, n);
    prev bigint;
    holder bigint;
    r points.tx;
BEGIN
    SELECT x.tx_id INTO prev FROM stress.tx x WHERE x.user_id = u AND x.idempotency_key = k;
    BEGIN
        IF op = 'earn' THEN
            SELECT * INTO r FROM points.earn(u, amt, k);
        ELSE
            SELECT * INTO r FROM points.use(u, amt, k);
        END IF;
    EXCEPTION WHEN SQLSTATE 'PT001' OR SQLSTATE '55P03' THEN
        IF prev IS NOT NULL THEN
            PERFORM stress.violation('replay', u,
                format('key %s was applied by tx %s, a repeat failed with %s: %s',
                       k, prev, SQLSTATE, SQLERRM));
        END IF;
        RETURN stress.log('replay_' || op, u, SQLSTATE);
    END;
    IF prev IS NOT NULL AND (NOT r.replayed OR r.tx_id <> prev) THEN
        PERFORM stress.violation('replay', u,
            format('key %s was applied by tx %s, a repeat returned tx %s replayed %s',
                   k, prev, r.tx_id, r.replayed));
    END IF;
    IF r.replayed THEN
        SELECT x.tx_id INTO holder FROM stress.tx x WHERE x.user_id = u AND x.idempotency_key = k;
        IF holder IS DISTINCT FROM r.tx_id THEN
            PERFORM stress.violation('replay', u,
                format('a replay of key %s returned tx %s, the key is held by tx %s',
                       k, r.tx_id, holder));
        END IF;
    END IF;
    IF r.user_id <> u OR r.kind <> op OR abs(r.amount) <> amt OR r.idempotency_key <> k THEN
        PERFORM stress.violation('replay', u,
            format('%s of %s with key %s returned user %s kind %s amount %s key %s',
                   op, amt, k, r.user_id, r.kind, r.amount, r.idempotency_key));
    END IF;
    RETURN stress.log('replay_' || op, u, CASE WHEN r.replayed THEN 'replayed' ELSE 'ok' END, r);
END $$;

/*
 * Reuse one of the user's applied replay keys with another amount: must be
 * PT002, live or archived; with the right amount it must replay.
 */
CREATE FUNCTION stress.probe_mismatch(u bigint)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    t record;
    r points.tx;
BEGIN
    SELECT x.tx_id, x.kind, x.amount, x.idempotency_key, x.src INTO t
      FROM stress.tx x
     WHERE x.user_id = u AND x.idempotency_key LIKE 'r-%'
     ORDER BY random() LIMIT 1;
    IF NOT FOUND THEN
        RETURN stress.log('probe', u, 'none');
    END IF;
    BEGIN
        IF t.kind = 'earn' THEN
            PERFORM points.earn(u, abs(t.amount) + 1, t.idempotency_key);
        ELSE
            PERFORM points.use(u, abs(t.amount) + 1, t.idempotency_key);
        END IF;
        PERFORM stress.violation('key_mismatch', u,
            format('key %s of tx %s (%s, %s) reused with amount %s was applied',
                   t.idempotency_key, t.tx_id, t.kind, t.src, abs(t.amount) + 1));
    EXCEPTION WHEN SQLSTATE 'PT002' THEN
        NULL;
    END;
    IF t.kind = 'earn' THEN
        SELECT * INTO r FROM points.earn(u, abs(t.amount), t.idempotency_key);
    ELSE
        SELECT * INTO r FROM points.use(u, abs(t.amount), t.idempotency_key);
    END IF;
    IF NOT r.replayed OR r.tx_id <> t.tx_id THEN
        PERFORM stress.violation('replay', u,
            format('key %s of tx %s (%s) replayed as tx %s replayed %s',
                   t.idempotency_key, t.tx_id, t.src, r.tx_id, r.replayed));
    END IF;
    RETURN stress.log('probe', u, 'PT002', r);
END $$;

/* earn and use with keys in a transaction the script then rolls back */
CREATE FUNCTION stress.rolled_back(u bigint, n bigint)
RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    PERFORM stress.earn(u, 10, false, 'rb-e-' || n);
    PERFORM stress.use(u, 3, 'rb-u-' || n);
    RETURN 'rolled back by the script';
END $$;

/* the jobs, as the worker or pg_cron would run them, archiving everything */
CREATE FUNCTION stress.jobs()
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    a bigint;
    e bigint;
BEGIN
    PERFORM set_config('points.archive_after', '0', true);
    a := points.archive(2000);
    e := points.expire_due(2000);
    INSERT INTO stress.job_log (archived, expired) VALUES (a, e);
    RETURN format('archived %s, expired %s', a, e);
END $$;

/* ---------------------------------------------------------------- checks */

/*
 * Check the invariants of the given users (NULL: every account) in the
 * caller's snapshot, each category in one statement.  Violations go to
 * stress.violation, counts to stress.check_log.  Returns the number of
 * violations.
 */
CREATE FUNCTION stress.check_users(users bigint[], source text)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    outbox_strict boolean := (SELECT strict_outbox FROM stress.config);
    nusers bigint;
    n bigint;
    total bigint := 0;
    t1 timestamptz;
    t2 timestamptz;
BEGIN
    IF users IS NULL THEN
        users := ARRAY(SELECT user_id FROM points.account ORDER BY user_id);
    END IF;
    nusers := cardinality(users);

    IF to_regclass('pg_temp.chk_users') IS NULL THEN
        CREATE TEMP TABLE chk_users (user_id bigint PRIMARY KEY);
        CREATE TEMP TABLE chk_spendable (user_id bigint, spendable bigint);
    END IF;
    TRUNCATE chk_users;
    INSERT INTO chk_users SELECT DISTINCT unnest(users);
    ANALYZE chk_users;

    -- no negative balance, stored or spendable, and no negative balance_after
    INSERT INTO stress.violation (source, check_name, user_id, detail)
    SELECT source, 'no_negative_balance', a.user_id,
           format('balance %s, spendable %s', a.balance, points.balance(a.user_id))
      FROM points.account a JOIN chk_users c USING (user_id)
     WHERE a.balance < 0 OR points.balance(a.user_id) < 0
    UNION ALL
    SELECT source, 'no_negative_balance', t.user_id,
           format('tx %s has balance_after %s', t.tx_id, t.balance_after)
      FROM stress.tx t JOIN chk_users c USING (user_id)
     WHERE t.balance_after < 0;
    GET DIAGNOSTICS n = ROW_COUNT;
    INSERT INTO stress.check_log (source, check_name, checks, violations)
    VALUES (source, 'no_negative_balance', nusers, n);
    total := total + n;

    -- balance = sum of lot remaining = sum of ledger amounts (archive included)
    INSERT INTO stress.violation (source, check_name, user_id, detail)
    SELECT source, 'balance_eq_lots_eq_ledger', s.user_id,
           format('balance %s, lots %s, ledger %s', s.balance, s.lots, s.ledger)
      FROM (SELECT c.user_id, a.balance,
                   (SELECT coalesce(sum(l.remaining), 0) FROM points.lot l
                     WHERE l.user_id = c.user_id AND l.remaining > 0) AS lots,
                   (SELECT coalesce(sum(t.amount), 0) FROM stress.tx t
                     WHERE t.user_id = c.user_id) AS ledger
              FROM chk_users c LEFT JOIN points.account a USING (user_id)) s
     WHERE coalesce(s.balance, 0) <> s.lots OR coalesce(s.balance, 0) <> s.ledger
        OR (s.balance IS NULL AND EXISTS (SELECT FROM stress.tx t WHERE t.user_id = s.user_id));
    GET DIAGNOSTICS n = ROW_COUNT;
    INSERT INTO stress.check_log (source, check_name, checks, violations)
    VALUES (source, 'balance_eq_lots_eq_ledger', nusers, n);
    total := total + n;

    -- user_seq is 1..last_seq without gaps or duplicates; a tx is in one table
    INSERT INTO stress.violation (source, check_name, user_id, detail)
    SELECT source, 'user_seq_gapless', s.user_id,
           format('last_seq %s; %s rows, %s distinct seqs, %s distinct tx, min %s, max %s',
                  s.last_seq, s.n, s.nseq, s.ntx, s.lo, s.hi)
      FROM (SELECT c.user_id, coalesce(a.last_seq, 0) AS last_seq,
                   count(t.tx_id) AS n, count(DISTINCT t.user_seq) AS nseq,
                   count(DISTINCT t.tx_id) AS ntx,
                   min(t.user_seq) AS lo, max(t.user_seq) AS hi
              FROM chk_users c
              LEFT JOIN points.account a USING (user_id)
              LEFT JOIN stress.tx t ON t.user_id = c.user_id
             GROUP BY c.user_id, a.last_seq) s
     WHERE s.n <> s.last_seq OR s.nseq <> s.n OR s.ntx <> s.n
        OR (s.n > 0 AND (s.lo <> 1 OR s.hi <> s.last_seq));
    GET DIAGNOSTICS n = ROW_COUNT;
    INSERT INTO stress.check_log (source, check_name, checks, violations)
    VALUES (source, 'user_seq_gapless', nusers, n);
    total := total + n;

    -- each idempotency key at most once per user, live and archive together
    INSERT INTO stress.violation (source, check_name, user_id, detail)
    SELECT source, 'key_at_most_once', t.user_id,
           format('key %s used by tx %s', t.idempotency_key, string_agg(t.tx_id::text, ', '))
      FROM stress.tx t JOIN chk_users c USING (user_id)
     WHERE t.idempotency_key IS NOT NULL
     GROUP BY t.user_id, t.idempotency_key
    HAVING count(*) > 1;
    GET DIAGNOSTICS n = ROW_COUNT;
    INSERT INTO stress.check_log (source, check_name, checks, violations)
    VALUES (source, 'key_at_most_once', nusers, n);
    total := total + n;

    -- one outbox event per transaction (id = tx_id), matching it
    INSERT INTO stress.violation (source, check_name, user_id, detail)
    SELECT source, 'outbox_per_tx', t.user_id,
           CASE WHEN o.id IS NULL THEN format('tx %s (%s) has no outbox row', t.tx_id, t.src)
                ELSE format('outbox row %s does not match tx: %s %s %s', o.id,
                            o.aggregateid, o.type, o.payload) END
      FROM stress.tx t JOIN chk_users c USING (user_id)
      LEFT JOIN points.outbox o ON o.id = t.tx_id
     WHERE (o.id IS NULL AND outbox_strict)
        OR (o.id IS NOT NULL AND (
               o.aggregateid <> t.user_id::text
            OR o.aggregatetype <> 'points.account'
            OR o.type <> CASE t.kind WHEN 'earn' THEN 'points.earned'
                                     WHEN 'use' THEN 'points.used'
                                     WHEN 'earn_cancel' THEN 'points.earn_cancelled'
                                     WHEN 'use_cancel' THEN 'points.use_cancelled'
                                     WHEN 'expire' THEN 'points.expired' END
            OR (o.payload->>'tx_id')::bigint IS DISTINCT FROM t.tx_id
            OR (o.payload->>'user_id')::bigint IS DISTINCT FROM t.user_id
            OR (o.payload->>'user_seq')::bigint IS DISTINCT FROM t.user_seq
            OR (o.payload->>'amount')::bigint IS DISTINCT FROM t.amount
            OR (o.payload->>'balance_after')::bigint IS DISTINCT FROM t.balance_after));
    GET DIAGNOSTICS n = ROW_COUNT;
    INSERT INTO stress.check_log (source, check_name, checks, violations)
    VALUES (source, 'outbox_per_tx', nusers, n);
    total := total + n;

    -- balance_after chain: each = previous + amount; the last = the balance
    INSERT INTO stress.violation (source, check_name, user_id, detail)
    SELECT source, 'balance_after_chain', s.user_id,
           format('user_seq %s: %s + %s <> %s', s.user_seq, s.prev, s.amount, s.balance_after)
      FROM (SELECT t.user_id, t.user_seq, t.amount, t.balance_after,
                   coalesce(lag(t.balance_after) OVER w, 0) AS prev
              FROM stress.tx t JOIN chk_users c USING (user_id)
            WINDOW w AS (PARTITION BY t.user_id ORDER BY t.user_seq)) s
     WHERE s.balance_after <> s.prev + s.amount
    UNION ALL
    SELECT source, 'balance_after_chain', a.user_id,
           format('balance %s, balance_after of user_seq %s is %s', a.balance, a.last_seq,
                  t.balance_after)
      FROM points.account a JOIN chk_users c USING (user_id)
      JOIN stress.tx t ON t.user_id = a.user_id AND t.user_seq = a.last_seq
     WHERE t.balance_after <> a.balance;
    GET DIAGNOSTICS n = ROW_COUNT;
    INSERT INTO stress.check_log (source, check_name, checks, violations)
    VALUES (source, 'balance_after_chain', nusers, n);
    total := total + n;

    -- points.history returns exactly the user's transactions, newest first
    INSERT INTO stress.violation (source, check_name, user_id, detail)
    SELECT source, 'history_matches_ledger', s.user_id,
           format('history: %s rows, %s tx, sum %s, %s out of order, %s replayed;'
                  ' ledger: %s rows, sum %s; %s rows differ',
                  s.hn, s.ntx, s.hsum, s.disorder, s.replayed, s.tn, s.tsum, s.diff)
      FROM (SELECT c.user_id, h.hn, h.ntx, h.hsum, h.disorder, h.replayed, t.tn, t.tsum, d.diff
              FROM chk_users c
              CROSS JOIN LATERAL (
                    SELECT count(*) AS hn, count(DISTINCT x.tx_id) AS ntx,
                           coalesce(sum(x.amount), 0) AS hsum,
                           count(*) FILTER (WHERE x.user_seq >= x.prev_seq) AS disorder,
                           count(*) FILTER (WHERE x.replayed) AS replayed
                      FROM (SELECT y.*, lag(y.user_seq) OVER (ORDER BY y.ordinality) AS prev_seq
                              FROM points.history(c.user_id, NULL, 2147483647)
                                   WITH ORDINALITY y) x) h
              CROSS JOIN LATERAL (
                    SELECT count(*) AS tn, coalesce(sum(t.amount), 0) AS tsum
                      FROM stress.tx t WHERE t.user_id = c.user_id) t
              CROSS JOIN LATERAL (
                    SELECT count(*) AS diff FROM (
                      (SELECT y.tx_id, y.user_seq, y.kind, y.amount, y.balance_after
                         FROM points.history(c.user_id, NULL, 2147483647) y
                       EXCEPT ALL
                       SELECT t.tx_id, t.user_seq, t.kind, t.amount, t.balance_after
                         FROM stress.tx t WHERE t.user_id = c.user_id)
                      UNION ALL
                      (SELECT t.tx_id, t.user_seq, t.kind, t.amount, t.balance_after
                         FROM stress.tx t WHERE t.user_id = c.user_id
                       EXCEPT ALL
                       SELECT y.tx_id, y.user_seq, y.kind, y.amount, y.balance_after
                         FROM points.history(c.user_id, NULL, 2147483647) y)) z) d) s
     WHERE s.hn <> s.tn OR s.ntx <> s.tn OR s.hsum <> s.tsum OR s.disorder > 0
        OR s.replayed > 0 OR s.diff > 0;
    GET DIAGNOSTICS n = ROW_COUNT;
    INSERT INTO stress.check_log (source, check_name, checks, violations)
    VALUES (source, 'history_matches_ledger', nusers, n);
    total := total + n;

    -- an expire transaction takes exactly the points of the lots it lists
    INSERT INTO stress.violation (source, check_name, user_id, detail)
    SELECT source, 'expire_lots_sum', t.user_id,
           format('expire %s: amount %s, its lots %s', t.tx_id, t.amount, t.metadata->'lots')
      FROM stress.tx t JOIN chk_users c USING (user_id)
     WHERE t.kind = 'expire'
       AND -t.amount IS DISTINCT FROM (SELECT sum((x->>'amount')::bigint)
                                         FROM jsonb_array_elements(t.metadata->'lots') x);
    GET DIAGNOSTICS n = ROW_COUNT;
    INSERT INTO stress.check_log (source, check_name, checks, violations)
    VALUES (source, 'expire_lots_sum', nusers, n);
    total := total + n;

    -- each lot's remaining = amount - used + restored - earn-cancelled - expired;
    -- each use took exactly its amount; cancels never exceed what they cancel
    -- (set-based: the aggregates are grouped once, then joined)
    INSERT INTO stress.violation (source, check_name, user_id, detail)
    WITH ut AS (SELECT t.* FROM stress.tx t JOIN chk_users c USING (user_id)),
         used AS (SELECT ul.lot_id, sum(ul.taken - ul.restored) AS used
                    FROM ut JOIN points.use_lot ul ON ul.use_tx = ut.tx_id
                   WHERE ut.kind = 'use' GROUP BY ul.lot_id),
         ec AS (SELECT ut.cancels_tx AS lot_id, -sum(ut.amount) AS cancelled
                  FROM ut WHERE ut.kind = 'earn_cancel' GROUP BY ut.cancels_tx),
         ex AS (SELECT (x->>'lot_id')::bigint AS lot_id, sum((x->>'amount')::bigint) AS expired
                  FROM ut, jsonb_array_elements(ut.metadata->'lots') x
                 WHERE ut.kind = 'expire' GROUP BY 1),
         taken AS (SELECT ul.use_tx, sum(ul.taken) AS taken, sum(ul.restored) AS restored
                     FROM ut JOIN points.use_lot ul ON ul.use_tx = ut.tx_id
                    WHERE ut.kind = 'use' GROUP BY ul.use_tx),
         uc AS (SELECT ut.cancels_tx AS use_tx, sum(ut.amount) AS cancelled
                  FROM ut WHERE ut.kind = 'use_cancel' GROUP BY ut.cancels_tx)
    SELECT source, 'lot_accounting', l.user_id,
           format('lot %s: amount %s, remaining %s, used %s, earn-cancelled %s, expired %s, earn %s',
                  l.lot_id, l.amount, l.remaining, used.used, ec.cancelled, ex.expired,
                  e.kind || ' of ' || e.amount || ' by user ' || e.user_id)
      FROM points.lot l JOIN chk_users c USING (user_id)
      LEFT JOIN ut e ON e.tx_id = l.lot_id
      LEFT JOIN used USING (lot_id)
      LEFT JOIN ec USING (lot_id)
      LEFT JOIN ex USING (lot_id)
     WHERE e.tx_id IS NULL OR e.kind <> 'earn' OR e.user_id <> l.user_id OR e.amount <> l.amount
        OR l.remaining <> l.amount - coalesce(used.used, 0) - coalesce(ec.cancelled, 0)
                                   - coalesce(ex.expired, 0)
        OR coalesce(ec.cancelled, 0) > l.amount
    UNION ALL
    SELECT source, 'lot_accounting', u.user_id,
           format('use %s of %s: lots took %s, restored %s; use_cancels %s',
                  u.tx_id, u.amount, taken.taken, taken.restored, uc.cancelled)
      FROM ut u
      LEFT JOIN taken ON taken.use_tx = u.tx_id
      LEFT JOIN uc ON uc.use_tx = u.tx_id
     WHERE u.kind = 'use'
       AND (coalesce(taken.taken, 0) <> -u.amount
            OR coalesce(taken.restored, 0) <> coalesce(uc.cancelled, 0)
            OR coalesce(uc.cancelled, 0) > -u.amount)
    UNION ALL
    SELECT source, 'lot_accounting', u.user_id,
           format('cancel %s (%s) of tx %s: target %s', u.tx_id, u.kind, u.cancels_tx,
                  coalesce(g.kind || ' of user ' || g.user_id, 'missing'))
      FROM ut u
      LEFT JOIN stress.tx g ON g.tx_id = u.cancels_tx
     WHERE u.cancels_tx IS NOT NULL
       AND (g.tx_id IS NULL OR g.user_id <> u.user_id
            OR (u.kind = 'earn_cancel' AND g.kind <> 'earn')
            OR (u.kind = 'use_cancel' AND g.kind <> 'use')
            OR u.kind NOT IN ('earn_cancel', 'use_cancel'));
    GET DIAGNOSTICS n = ROW_COUNT;
    INSERT INTO stress.check_log (source, check_name, checks, violations)
    VALUES (source, 'lot_accounting', nusers, n);
    total := total + n;

    -- exact expiry: no use took points from a lot that had expired when the
    -- use ran, and points.balance() leaves out exactly the lots past
    -- expires_at
    t1 := clock_timestamp();
    TRUNCATE chk_spendable;
    INSERT INTO chk_spendable SELECT c.user_id, points.balance(c.user_id) FROM chk_users c;
    t2 := clock_timestamp();
    INSERT INTO stress.violation (source, check_name, user_id, detail)
    SELECT source, 'exact_expiry', t.user_id,
           format('use %s at %s took %s from lot %s that expired at %s',
                  t.tx_id, t.created_at, ul.taken, l.lot_id, l.expires_at)
      FROM stress.tx t JOIN chk_users c USING (user_id)
      JOIN points.use_lot ul ON ul.use_tx = t.tx_id
      JOIN points.lot l ON l.lot_id = ul.lot_id
     WHERE t.kind = 'use' AND l.expires_at <= t.created_at
    UNION ALL
    -- the transaction before a use (user_seq - 1) was made by a call that
    -- held the user lock no earlier than its created_at; the use got the lock
    -- after it.  So a lot that had expired by then was spent after expiring,
    -- even if the use's own created_at (when its call started) is earlier.
    SELECT source, 'exact_expiry', t.user_id,
           format('use %s (user_seq %s, call started %s) took %s from lot %s that expired at %s,'
                  ' before tx %s (user_seq %s, %s at %s) that held the user before the use',
                  t.tx_id, t.user_seq, t.created_at, ul.taken, l.lot_id, l.expires_at,
                  p.tx_id, p.user_seq, p.kind, p.created_at)
      FROM stress.tx t JOIN chk_users c USING (user_id)
      JOIN points.use_lot ul ON ul.use_tx = t.tx_id
      JOIN points.lot l ON l.lot_id = ul.lot_id
      JOIN stress.tx p ON p.user_id = t.user_id AND p.user_seq = t.user_seq - 1
     WHERE t.kind = 'use' AND l.expires_at > t.created_at AND l.expires_at <= p.created_at
    UNION ALL
    SELECT source, 'exact_expiry', s.user_id,
           format('spendable %s, balance %s, past expiry %s..%s', s.spendable,
                  a.balance, e.at_t2, e.at_t1)
      FROM chk_spendable s
      LEFT JOIN points.account a USING (user_id)
      CROSS JOIN LATERAL (
        SELECT coalesce(sum(l.remaining) FILTER (WHERE l.expires_at <= t1), 0) AS at_t1,
               coalesce(sum(l.remaining) FILTER (WHERE l.expires_at <= t2), 0) AS at_t2
          FROM points.lot l WHERE l.user_id = s.user_id AND l.remaining > 0) e
     WHERE s.spendable < coalesce(a.balance, 0) - e.at_t2
        OR s.spendable > coalesce(a.balance, 0) - e.at_t1;
    GET DIAGNOSTICS n = ROW_COUNT;
    INSERT INTO stress.check_log (source, check_name, checks, violations)
    VALUES (source, 'exact_expiry', nusers, n);
    total := total + n;

    RETURN total;
END $$;

/*
 * Whole-database invariants: the totals agree (Jepsen's bank total), every
 * outbox row belongs to a transaction, no transaction is both live and
 * archived, every user with lots or transactions has an account.
 */
CREATE FUNCTION stress.check_global(source text)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    outbox_strict boolean := (SELECT strict_outbox FROM stress.config);
    n bigint;
    total bigint := 0;
BEGIN
    INSERT INTO stress.violation (source, check_name, user_id, detail)
    SELECT source, 'global_totals', NULL::bigint,
           format('sum balance %s, sum lots %s, sum ledger %s, accounts %s, outbox %s, tx %s',
                  s.b, s.l, s.g, s.na, s.no, s.nt)
      FROM (SELECT (SELECT coalesce(sum(balance), 0) FROM points.account) AS b,
                   (SELECT count(*) FROM points.account) AS na,
                   (SELECT coalesce(sum(remaining), 0) FROM points.lot) AS l,
                   (SELECT coalesce(sum(amount), 0) FROM stress.tx) AS g,
                   (SELECT count(*) FROM stress.tx) AS nt,
                   (SELECT count(*) FROM points.outbox) AS no) s
     WHERE s.b <> s.l OR s.b <> s.g OR (outbox_strict AND s.no <> s.nt)
    UNION ALL
    SELECT source, 'global_totals', NULL::bigint, format('outbox row %s has no transaction', o.id)
      FROM points.outbox o
     WHERE NOT EXISTS (SELECT FROM stress.tx t WHERE t.tx_id = o.id)
    UNION ALL
    SELECT source, 'global_totals', g.user_id, format('tx %s is both live and archived', g.tx_id)
      FROM points.ledger g JOIN points.ledger_archive a USING (tx_id)
    UNION ALL
    SELECT source, 'global_totals', x.user_id, 'lots or transactions without an account'
      FROM (SELECT user_id FROM points.lot UNION SELECT user_id FROM stress.tx) x
     WHERE NOT EXISTS (SELECT FROM points.account a WHERE a.user_id = x.user_id);
    GET DIAGNOSTICS n = ROW_COUNT;
    INSERT INTO stress.check_log (source, check_name, checks, violations)
    VALUES (source, 'global_totals', 1, n);
    total := total + n;
    RETURN total;
END $$;

/* one round of the live checker: the hot users and a sample of the others */
CREATE FUNCTION stress.check_round(sample int)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    users bigint[];
    n bigint;
BEGIN
    IF current_setting('transaction_isolation') <> 'repeatable read' THEN
        RAISE EXCEPTION 'the checker must run at REPEATABLE READ (one snapshot per round)';
    END IF;
    users := ARRAY[1, 2, 3, 4, 5]::bigint[]
             || ARRAY(SELECT user_id FROM points.account WHERE user_id > 5
                       ORDER BY random() LIMIT sample);
    n := stress.check_users(users, 'live');
    IF random() < 0.2 THEN
        n := n + stress.check_global('live');
    END IF;
    RETURN n;
END $$;

/*
 * After the run: expire everything due, then every invariant over every
 * account, plus what only the end can tell.
 */
CREATE FUNCTION stress.final_checks()
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    n bigint;
    total bigint := 0;
    nacc bigint := (SELECT count(*) FROM points.account);
BEGIN
    total := total + stress.check_users(NULL, 'final');
    total := total + stress.check_global('final');

    -- points.verify() finds nothing
    INSERT INTO stress.violation (source, check_name, user_id, detail)
    SELECT 'final', 'verify_empty', v.user_id,
           format('balance %s, lots %s, ledger %s', v.balance, v.lots_remaining, v.ledger_sum)
      FROM points.verify() v;
    GET DIAGNOSTICS n = ROW_COUNT;
    INSERT INTO stress.check_log (source, check_name, checks, violations)
    VALUES ('final', 'verify_empty', 1, n);
    total := total + n;

    -- rebuild every account from points.history alone: user_seq 1..n, the
    -- balance_after chain, the sum of amounts = the account's balance
    INSERT INTO stress.violation (source, check_name, user_id, detail)
    SELECT 'final', 'rebuild_from_history', r.user_id,
           format('balance %s, last_seq %s; history: %s rows, sum %s, last balance_after %s,'
                  ' %s chain breaks, %s seq gaps',
                  r.balance, r.last_seq, r.n, r.total, r.last_after, r.breaks, r.gaps)
      FROM (SELECT a.user_id, a.balance, a.last_seq,
                   count(h.tx_id) AS n, coalesce(sum(h.amount), 0) AS total,
                   (array_agg(h.balance_after ORDER BY h.user_seq DESC))[1] AS last_after,
                   count(*) FILTER (WHERE h.balance_after <> h.prev_after + h.amount) AS breaks,
                   count(*) FILTER (WHERE h.user_seq <> h.pos) AS gaps
              FROM points.account a
              LEFT JOIN LATERAL (
                    SELECT x.tx_id, x.user_seq, x.amount, x.balance_after,
                           coalesce(lag(x.balance_after) OVER (ORDER BY x.user_seq), 0) AS prev_after,
                           row_number() OVER (ORDER BY x.user_seq) AS pos
                      FROM points.history(a.user_id, NULL, 2147483647) x) h ON true
             GROUP BY a.user_id, a.balance, a.last_seq) r
     WHERE r.n <> r.last_seq OR r.total <> r.balance OR r.breaks > 0 OR r.gaps > 0
        OR (r.n > 0 AND r.last_after <> r.balance);
    GET DIAGNOSTICS n = ROW_COUNT;
    INSERT INTO stress.check_log (source, check_name, checks, violations)
    VALUES ('final', 'rebuild_from_history', nacc, n);
    total := total + n;

    -- every call acknowledged to a client is in the ledger as it was returned,
    -- and every non-expire transaction was acknowledged to exactly one call
    INSERT INTO stress.violation (source, check_name, user_id, detail)
    SELECT 'final', 'acknowledged_calls', c.user_id,
           format('%s %s returned tx %s (seq %s, %s %s, after %s), ledger has %s',
                  c.op, c.outcome, c.tx_id, c.user_seq, c.kind, c.amount, c.balance_after,
                  coalesce(format('seq %s, %s %s, after %s, user %s',
                                  t.user_seq, t.kind, t.amount, t.balance_after, t.user_id),
                           'nothing'))
      FROM stress.call_log c LEFT JOIN stress.tx t ON t.tx_id = c.tx_id
     WHERE c.outcome IN ('ok', 'replayed')
       AND (t.tx_id IS NULL OR t.user_id <> c.user_id OR t.user_seq <> c.user_seq
            OR t.kind <> c.kind OR t.amount <> c.amount OR t.balance_after <> c.balance_after
            OR t.idempotency_key IS DISTINCT FROM c.idempotency_key)
    UNION ALL
    SELECT 'final', 'acknowledged_calls', t.user_id,
           format('tx %s (%s) was acknowledged by %s calls', t.tx_id, t.kind, count(c.tx_id))
      FROM stress.tx t LEFT JOIN stress.call_log c ON c.tx_id = t.tx_id AND c.outcome = 'ok'
     WHERE t.kind <> 'expire' AND t.tx_id > (SELECT start_tx FROM stress.config)
     GROUP BY t.tx_id, t.user_id, t.kind
    HAVING count(c.tx_id) <> 1;
    GET DIAGNOSTICS n = ROW_COUNT;
    INSERT INTO stress.check_log (source, check_name, checks, violations)
    VALUES ('final', 'acknowledged_calls', (SELECT count(*) FROM stress.call_log), n);
    total := total + n;

    -- rolled-back calls left nothing: no transaction, no event
    INSERT INTO stress.violation (source, check_name, user_id, detail)
    SELECT 'final', 'rollback_leaves_nothing', t.user_id,
           format('tx %s with key %s of a rolled-back call', t.tx_id, t.idempotency_key)
      FROM stress.tx t WHERE t.idempotency_key LIKE 'rb-%'
    UNION ALL
    SELECT 'final', 'rollback_leaves_nothing', NULL::bigint,
           format('outbox row %s of a rolled-back call', o.id)
      FROM points.outbox o WHERE o.payload->>'idempotency_key' LIKE 'rb-%';
    GET DIAGNOSTICS n = ROW_COUNT;
    INSERT INTO stress.check_log (source, check_name, checks, violations)
    VALUES ('final', 'rollback_leaves_nothing', 1, n);
    total := total + n;

    -- no user lock is left held once every client has gone, and none by a
    -- session that is not in a transaction
    INSERT INTO stress.violation (source, check_name, user_id, detail)
    SELECT 'final', 'no_leftover_locks', (l.classid::bigint << 32) | l.objid::bigint,
           format('user lock held by pid %s (granted %s)', l.pid, l.granted)
      FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
     WHERE l.locktype = 'advisory' AND l.objsubid = 21588 AND l.pid <> pg_backend_pid()
       -- a client of the run, or any session outside a transaction (the
       -- worker may hold a user inside one of its own transactions)
       AND (a.application_name = 'pgbench' OR a.state = 'idle');
    GET DIAGNOSTICS n = ROW_COUNT;
    INSERT INTO stress.check_log (source, check_name, checks, violations)
    VALUES ('final', 'no_leftover_locks', 1, n);
    total := total + n;
    RETURN total;
END $$;

/* expire everything due (the job skips nothing once no one holds a user) */
CREATE FUNCTION stress.expire_all()
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    t0 timestamptz := clock_timestamp();
    n bigint;
    total bigint := 0;
    i int := 0;
BEGIN
    -- a user the worker holds at that moment is skipped: run again
    LOOP
        n := points.expire_due(10000);
        total := total + n;
        i := i + 1;
        EXIT WHEN i > 50 OR NOT EXISTS (SELECT FROM points.lot l
                                         WHERE l.remaining > 0 AND l.expires_at <= t0);
        IF n = 0 THEN
            PERFORM pg_sleep(0.1);
        END IF;
    END LOOP;
    INSERT INTO stress.violation (source, check_name, user_id, detail)
    SELECT 'final', 'expiry_job_completes', l.user_id,
           format('lot %s still holds %s points past expires_at %s', l.lot_id, l.remaining,
                  l.expires_at)
      FROM points.lot l WHERE l.remaining > 0 AND l.expires_at <= t0;
    GET DIAGNOSTICS n = ROW_COUNT;
    INSERT INTO stress.check_log (source, check_name, checks, violations)
    VALUES ('final', 'expiry_job_completes', 1, n);
    RETURN total;
END $$;
