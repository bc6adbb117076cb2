-- The schema contract of SPEC.md as pgTAP assertions.
-- Run with: pg_prove -d DB test/pgtap/*.sql  (the extensions points and pgtap installed)
BEGIN;
SELECT plan(151);

-- every function: signature with argument names and defaults, return type
CREATE TEMP TABLE contract (fn text, args text[], sig text, ret text);
INSERT INTO contract VALUES
 ('earn', '{bigint,bigint,text,"timestamp with time zone",text,jsonb}',
  'user_id bigint, amount bigint, idempotency_key text DEFAULT NULL::text, expires_at timestamp with time zone DEFAULT NULL::timestamp with time zone, reason text DEFAULT NULL::text, metadata jsonb DEFAULT NULL::jsonb',
  'points.tx'),
 ('use', '{bigint,bigint,text,text,jsonb}',
  'user_id bigint, amount bigint, idempotency_key text DEFAULT NULL::text, reason text DEFAULT NULL::text, metadata jsonb DEFAULT NULL::jsonb',
  'points.tx'),
 ('cancel', '{bigint,bigint,text,text}',
  'tx_id bigint, amount bigint DEFAULT NULL::bigint, idempotency_key text DEFAULT NULL::text, reason text DEFAULT NULL::text',
  'points.tx'),
 ('balance', '{bigint}', 'user_id bigint', 'bigint'),
 ('history', '{bigint,bigint,integer}',
  'user_id bigint, before_seq bigint DEFAULT NULL::bigint, max_rows integer DEFAULT 50',
  'SETOF points.tx'),
 ('expiring', '{bigint,interval}',
  'user_id bigint, within interval DEFAULT ''30 days''::interval',
  'TABLE(lot_id bigint, remaining bigint, expires_at timestamp with time zone)'),
 ('expire_due', '{integer}', 'max_lots integer DEFAULT 10000', 'bigint'),
 ('archive', '{integer}', 'max_rows integer DEFAULT 100000', 'bigint'),
 ('verify', '{bigint}', 'user_id bigint DEFAULT NULL::bigint',
  'TABLE(user_id bigint, balance bigint, lots_remaining bigint, ledger_sum bigint)'),
 ('earn_async', '{bigint,bigint,text,"timestamp with time zone",text,jsonb}',
  'user_id bigint, amount bigint, idempotency_key text DEFAULT NULL::text, expires_at timestamp with time zone DEFAULT NULL::timestamp with time zone, reason text DEFAULT NULL::text, metadata jsonb DEFAULT NULL::jsonb',
  'bigint'),
 ('request', '{bigint}', 'request_id bigint',
  'TABLE(request_id bigint, user_id bigint, state text, tx_id bigint, error text, queued_at timestamp with time zone, applied_at timestamp with time zone)'),
 ('apply_queued', '{integer}', 'max_requests integer DEFAULT 10000', 'bigint');

SELECT has_function('points', fn, args, 'points.' || fn || ' exists') FROM contract;
SELECT is(pg_get_function_arguments(format('points.%I(%s)', fn, array_to_string(args, ','))::regprocedure),
          sig, 'points.' || fn || ' has the contract''s argument names and defaults') FROM contract;
SELECT is(pg_get_function_result(format('points.%I(%s)', fn, array_to_string(args, ','))::regprocedure),
          ret, 'points.' || fn || ' returns ' || ret) FROM contract;
SELECT is_definer('points', fn, args, 'points.' || fn || ' is SECURITY DEFINER') FROM contract;
SELECT isnt_strict('points', fn, args, 'points.' || fn || ' is not STRICT') FROM contract;
SELECT ok((SELECT proconfig @> '{"search_path=pg_catalog, pg_temp"}'
           FROM pg_proc WHERE oid = format('points.%I(%s)', fn, array_to_string(args, ','))::regprocedure),
          'points.' || fn || ' has a fixed search_path') FROM contract;
SELECT function_lang_is('points', fn, args, 'c', 'points.' || fn || ' is written in C')
FROM contract;

-- the columns of points.tx and points.outbox
SELECT has_composite('points', 'tx', 'type points.tx exists');
SELECT results_eq(
  $$SELECT attname::text COLLATE "C", format_type(atttypid, atttypmod) COLLATE "C" FROM pg_attribute
    WHERE attrelid = 'points.tx'::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum$$,
  $$VALUES ('tx_id' COLLATE "C", 'bigint' COLLATE "C"), ('user_id', 'bigint'), ('user_seq', 'bigint'), ('kind', 'text'),
           ('amount', 'bigint'), ('balance_after', 'bigint'), ('idempotency_key', 'text'),
           ('cancels_tx', 'bigint'), ('reason', 'text'), ('metadata', 'jsonb'),
           ('created_at', 'timestamp with time zone'), ('replayed', 'boolean')$$,
  'points.tx has the contract''s columns');
SELECT has_table('points', 'outbox', 'table points.outbox exists');
SELECT col_type_is('points', 'outbox', c, t, 'points.outbox.' || c || ' is ' || t)
FROM (VALUES ('id', 'bigint'), ('aggregatetype', 'text'), ('aggregateid', 'text'),
             ('type', 'text'), ('payload', 'jsonb')) v(c, t);
SELECT col_not_null('points', 'outbox', c, 'points.outbox.' || c || ' is NOT NULL')
FROM unnest('{id,aggregatetype,aggregateid,type,payload}'::text[]) c;
SELECT col_default_is('points', 'outbox', 'aggregatetype', 'points.account'::text,
                      'points.outbox.aggregatetype defaults to points.account');
SELECT col_is_pk('points', 'outbox', 'id', 'points.outbox.id is its primary key');

-- the extension: not relocatable, in schema points
SELECT is((SELECT extrelocatable FROM pg_extension WHERE extname = 'points'), false,
          'points is not relocatable');
SELECT is((SELECT extnamespace::regnamespace::text FROM pg_extension WHERE extname = 'points'),
          'points', 'points lives in schema points');

-- privileges: nothing for PUBLIC; an app role and an operator role as the README grants
SELECT function_privs_are('points', fn, args, 'public', '{}',
                          'PUBLIC cannot execute points.' || fn) FROM contract;
SELECT table_privs_are('points', t, 'public', '{}', 'PUBLIC has no privilege on points.' || t)
FROM unnest('{account,lot,use_lot,ledger,ledger_archive,outbox,request,worker_state,worker_status}'::text[]) t;
SELECT schema_privs_are('points', 'public', '{}', 'PUBLIC has no privilege on schema points');

CREATE ROLE pgtap_points_app;
CREATE ROLE pgtap_points_ops;
GRANT USAGE ON SCHEMA points TO pgtap_points_app, pgtap_points_ops;
GRANT EXECUTE ON FUNCTION points.earn, points.use, points.cancel, points.balance,
      points.history, points.expiring, points.earn_async, points.request TO pgtap_points_app;
GRANT EXECUTE ON FUNCTION points.expire_due, points.archive, points.verify,
      points.balance, points.history, points.apply_queued TO pgtap_points_ops;

SELECT function_privs_are('points', fn, args, 'pgtap_points_app',
    CASE WHEN fn IN ('earn', 'use', 'cancel', 'balance', 'history', 'expiring', 'earn_async', 'request')
         THEN '{EXECUTE}' ELSE '{}' END::text[],
    'the app role can execute points.' || fn || ' only if granted') FROM contract;
SELECT function_privs_are('points', fn, args, 'pgtap_points_ops',
    CASE WHEN fn IN ('expire_due', 'archive', 'verify', 'balance', 'history', 'apply_queued')
         THEN '{EXECUTE}' ELSE '{}' END::text[],
    'the operator role can execute points.' || fn || ' only if granted') FROM contract;
SELECT table_privs_are('points', 'ledger', r, '{}', r || ' cannot read or write points.ledger')
FROM unnest('{pgtap_points_app,pgtap_points_ops}'::text[]) r;
SELECT table_privs_are('points', 'account', r, '{}', r || ' cannot read or write points.account')
FROM unnest('{pgtap_points_app,pgtap_points_ops}'::text[]) r;

SELECT * FROM finish();
ROLLBACK;
