/* points--0.1.sql: the ledger's schema and its SQL API */

\echo Use "CREATE EXTENSION points" to load this file. \quit

/*
 * The transaction as the API returns it.  The ledger tables below have the
 * same columns in the same order, less "replayed".
 */
CREATE TYPE points.tx AS (
    tx_id           bigint,
    user_id         bigint,
    user_seq        bigint,
    kind            text,
    amount          bigint,
    balance_after   bigint,
    idempotency_key text,
    cancels_tx      bigint,
    reason          text,
    metadata        jsonb,
    created_at      timestamptz,
    replayed        boolean
);

/* tx_id = points.node_id * 2^40 + nextval */
CREATE SEQUENCE points.tx_seq MINVALUE 1 MAXVALUE 1099511627775 NO CYCLE;

/*
 * One row per user.  balance is the sum of the remaining points of the
 * user's lots, including lots past expires_at that the expiry job has not
 * yet expired; points.balance() subtracts those.
 */
CREATE TABLE points.account (
    user_id     bigint PRIMARY KEY,
    balance     bigint NOT NULL CHECK (balance >= 0),
    last_seq    bigint NOT NULL CHECK (last_seq >= 0),
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL
) WITH (fillfactor = 80);

/* One row per earn: lot_id is the earn's tx_id. */
CREATE TABLE points.lot (
    lot_id      bigint PRIMARY KEY,
    user_id     bigint NOT NULL,
    amount      bigint NOT NULL CHECK (amount > 0),
    remaining   bigint NOT NULL CHECK (remaining >= 0 AND remaining <= amount),
    expires_at  timestamptz NOT NULL
) WITH (fillfactor = 80);
/* a user's lots with points left, in use order */
CREATE INDEX lot_user_idx ON points.lot (user_id, expires_at, lot_id) WHERE remaining > 0;
/* lots with points left, soonest expiry first: the expiry job's queue */
CREATE INDEX lot_due_idx ON points.lot (expires_at) WHERE remaining > 0;

/* How much each use took from each lot, and how much cancels gave back. */
CREATE TABLE points.use_lot (
    use_tx      bigint NOT NULL,
    lot_id      bigint NOT NULL,
    taken       bigint NOT NULL CHECK (taken > 0),
    restored    bigint NOT NULL DEFAULT 0 CHECK (restored >= 0 AND restored <= taken),
    PRIMARY KEY (use_tx, lot_id)
);

/* The live ledger: immutable rows, moved to ledger_archive when old. */
CREATE TABLE points.ledger (
    tx_id           bigint PRIMARY KEY,
    user_id         bigint NOT NULL,
    user_seq        bigint NOT NULL,
    kind            text NOT NULL CHECK (kind IN ('earn', 'use', 'earn_cancel', 'use_cancel', 'expire')),
    amount          bigint NOT NULL,
    balance_after   bigint NOT NULL CHECK (balance_after >= 0),
    idempotency_key text,
    cancels_tx      bigint,
    reason          text,
    metadata        jsonb,
    created_at      timestamptz NOT NULL,
    UNIQUE (user_id, user_seq)
);
CREATE UNIQUE INDEX ledger_key_idx ON points.ledger (user_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX ledger_cancels_idx ON points.ledger (cancels_tx) WHERE cancels_tx IS NOT NULL;
/* cheap to keep up on an append-only table; finds archivable rows */
CREATE INDEX ledger_created_brin ON points.ledger USING brin (created_at);

CREATE TABLE points.ledger_archive (
    tx_id           bigint PRIMARY KEY,
    user_id         bigint NOT NULL,
    user_seq        bigint NOT NULL,
    kind            text NOT NULL,
    amount          bigint NOT NULL,
    balance_after   bigint NOT NULL,
    idempotency_key text,
    cancels_tx      bigint,
    reason          text,
    metadata        jsonb,
    created_at      timestamptz NOT NULL,
    UNIQUE (user_id, user_seq)
);
CREATE UNIQUE INDEX ledger_archive_key_idx ON points.ledger_archive (user_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX ledger_archive_cancels_idx ON points.ledger_archive (cancels_tx)
    WHERE cancels_tx IS NOT NULL;

/*
 * Transactional outbox, with Debezium's outbox column names: id is the
 * event_id (the tx_id), aggregateid the message key, payload the value.
 */
CREATE TABLE points.outbox (
    id              bigint PRIMARY KEY,
    aggregatetype   text NOT NULL DEFAULT 'points.account',
    aggregateid     text NOT NULL,
    type            text NOT NULL,
    payload         jsonb NOT NULL,
    created_at      timestamptz NOT NULL
);

/*
 * Queued earns (points.earn_async): applied by the worker or by
 * points.apply_queued.  Rows that are no longer queued are kept for
 * points.archive_after, then deleted by points.archive.
 */
CREATE SEQUENCE points.request_seq MINVALUE 1 MAXVALUE 1099511627775 NO CYCLE;
CREATE TABLE points.request (
    request_id      bigint PRIMARY KEY,
    user_id         bigint NOT NULL,
    amount          bigint NOT NULL CHECK (amount > 0),
    idempotency_key text,
    expires_at      timestamptz NOT NULL,
    reason          text,
    metadata        jsonb,
    state           text NOT NULL DEFAULT 'queued'
                    CHECK (state IN ('queued', 'applied', 'rejected')),
    tx_id           bigint,
    error           text,
    queued_at       timestamptz NOT NULL,
    applied_at      timestamptz
);
/* the queue: oldest first, and per user */
CREATE INDEX request_queued_idx ON points.request (request_id) WHERE state = 'queued';
CREATE INDEX request_user_idx ON points.request (user_id, request_id) WHERE state = 'queued';
/* finished requests, for retention and the last minute's counts */
CREATE INDEX request_done_idx ON points.request (applied_at) WHERE state <> 'queued';

/*
 * What the background worker did last: one row, updated by the worker after
 * each run (worker.c).  Read it through the view points.worker_status.
 */
CREATE TABLE points.worker_state (
    id                  int PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    started_at          timestamptz,
    expire_last_run     timestamptz,
    expire_last_lots    bigint NOT NULL DEFAULT 0,
    expire_total_lots   bigint NOT NULL DEFAULT 0,
    archive_last_run    timestamptz,
    archive_last_rows   bigint NOT NULL DEFAULT 0,
    archive_total_rows  bigint NOT NULL DEFAULT 0,
    events_published    bigint NOT NULL DEFAULT 0,
    queue_last_run      timestamptz,
    queue_last_requests bigint NOT NULL DEFAULT 0,
    kafka_last_error    text,
    kafka_last_error_at timestamptz,
    last_error          text,
    last_error_at       timestamptz
);
INSERT INTO points.worker_state DEFAULT VALUES;

/*
 * The worker's state and the backlogs, true at the moment it is read.
 * worker_pid is NULL when no worker runs for this database.
 */
CREATE VIEW points.worker_status AS
SELECT (SELECT a.pid FROM pg_catalog.pg_stat_activity a
        WHERE a.backend_type = 'points worker'
          AND a.datname = pg_catalog.current_database() LIMIT 1) AS worker_pid,
       s.started_at,
       s.expire_last_run,
       s.expire_last_lots,
       s.expire_total_lots,
       (SELECT pg_catalog.count(*) FROM points.lot l
        WHERE l.remaining > 0 AND l.expires_at <= pg_catalog.now()) AS expire_backlog,
       s.archive_last_run,
       s.archive_last_rows,
       s.archive_total_rows,
       (SELECT pg_catalog.count(*) FROM points.ledger g
        WHERE g.created_at < pg_catalog.now() OPERATOR(pg_catalog.-) COALESCE(
              pg_catalog.current_setting('points.archive_after', true), '365d')::interval) AS archive_backlog,
       (SELECT pg_catalog.count(*) FROM points.outbox) AS outbox_backlog,
       pg_catalog.now() OPERATOR(pg_catalog.-)
           (SELECT pg_catalog.min(o.created_at) FROM points.outbox o) AS outbox_oldest_age,
       s.events_published,
       (SELECT pg_catalog.count(*) FROM points.request r WHERE r.state = 'queued') AS queue_depth,
       pg_catalog.now() OPERATOR(pg_catalog.-)
           (SELECT pg_catalog.min(r.queued_at) FROM points.request r
            WHERE r.state = 'queued') AS queue_oldest_age,
       (SELECT pg_catalog.count(*) FROM points.request r
        WHERE r.state = 'applied' AND r.applied_at > pg_catalog.now() OPERATOR(pg_catalog.-) '1 minute'::interval) AS queue_applied_last_minute,
       (SELECT pg_catalog.count(*) FROM points.request r
        WHERE r.state = 'rejected' AND r.applied_at > pg_catalog.now() OPERATOR(pg_catalog.-) '1 minute'::interval) AS queue_rejected_last_minute,
       s.queue_last_run,
       s.queue_last_requests,
       s.kafka_last_error,
       s.kafka_last_error_at,
       s.last_error,
       s.last_error_at
FROM points.worker_state s;

/* ---- the SQL API: C functions, SECURITY DEFINER, fixed search_path ---- */

CREATE FUNCTION points.earn(user_id bigint, amount bigint,
                            idempotency_key text DEFAULT NULL,
                            expires_at timestamptz DEFAULT NULL,
                            reason text DEFAULT NULL,
                            metadata jsonb DEFAULT NULL)
RETURNS points.tx
AS 'MODULE_PATHNAME', 'points_earn'
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

CREATE FUNCTION points.use(user_id bigint, amount bigint,
                           idempotency_key text DEFAULT NULL,
                           reason text DEFAULT NULL,
                           metadata jsonb DEFAULT NULL)
RETURNS points.tx
AS 'MODULE_PATHNAME', 'points_use'
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

CREATE FUNCTION points.cancel(tx_id bigint, amount bigint DEFAULT NULL,
                              idempotency_key text DEFAULT NULL,
                              reason text DEFAULT NULL)
RETURNS points.tx
AS 'MODULE_PATHNAME', 'points_cancel'
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

CREATE FUNCTION points.balance(user_id bigint)
RETURNS bigint
AS 'MODULE_PATHNAME', 'points_balance'
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

CREATE FUNCTION points.history(user_id bigint, before_seq bigint DEFAULT NULL,
                               max_rows int DEFAULT 50)
RETURNS SETOF points.tx
AS 'MODULE_PATHNAME', 'points_history'
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
ROWS 50;

CREATE FUNCTION points.expiring(user_id bigint, within interval DEFAULT '30 days')
RETURNS TABLE(lot_id bigint, remaining bigint, expires_at timestamptz)
AS 'MODULE_PATHNAME', 'points_expiring'
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
ROWS 10;

CREATE FUNCTION points.earn_async(user_id bigint, amount bigint,
                                  idempotency_key text DEFAULT NULL,
                                  expires_at timestamptz DEFAULT NULL,
                                  reason text DEFAULT NULL,
                                  metadata jsonb DEFAULT NULL)
RETURNS bigint
AS 'MODULE_PATHNAME', 'points_earn_async'
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

CREATE FUNCTION points.request(request_id bigint)
RETURNS TABLE(request_id bigint, user_id bigint, state text, tx_id bigint, error text,
              queued_at timestamptz, applied_at timestamptz)
AS 'MODULE_PATHNAME', 'points_request'
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
ROWS 1;

CREATE FUNCTION points.apply_queued(max_requests int DEFAULT 10000)
RETURNS bigint
AS 'MODULE_PATHNAME', 'points_apply_queued'
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

CREATE FUNCTION points.expire_due(max_lots int DEFAULT 10000)
RETURNS bigint
AS 'MODULE_PATHNAME', 'points_expire_due'
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

CREATE FUNCTION points.archive(max_rows int DEFAULT 100000)
RETURNS bigint
AS 'MODULE_PATHNAME', 'points_archive'
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

CREATE FUNCTION points.verify(user_id bigint DEFAULT NULL)
RETURNS TABLE(user_id bigint, balance bigint, lots_remaining bigint, ledger_sum bigint)
AS 'MODULE_PATHNAME', 'points_verify'
LANGUAGE C VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

/* Nothing for PUBLIC: the README shows the GRANTs for app and operator roles. */
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA points FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA points FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA points FROM PUBLIC;
REVOKE ALL ON TYPE points.tx FROM PUBLIC;
REVOKE ALL ON points.worker_status FROM PUBLIC;
