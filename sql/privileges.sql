-- privileges: nothing for PUBLIC; an app role and an operator role get what the README grants
CREATE FUNCTION pg_temp.try(q text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN EXECUTE q; RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
  RETURN SQLSTATE || ': ' || regexp_replace(SQLERRM, 'transaction \d+', 'transaction T', 'g');
END $$;
GRANT EXECUTE ON FUNCTION pg_temp.try(text) TO PUBLIC;

-- PUBLIC has no privilege on any object of the schema
SELECT p.proname, has_function_privilege('public', p.oid, 'EXECUTE') AS public_exec,
       p.prosecdef AS security_definer, p.proisstrict AS strict, p.proconfig
FROM pg_proc p WHERE p.pronamespace = 'points'::regnamespace ORDER BY 1;
SELECT c.relname, c.relacl FROM pg_class c
WHERE c.relnamespace = 'points'::regnamespace AND c.relkind IN ('r', 'S', 'v') ORDER BY 1;
SELECT nspacl IS NULL OR NOT aclcontains(nspacl, makeaclitem(0, nspowner, 'USAGE', false)) AS no_public_usage
FROM pg_namespace WHERE nspname = 'points';

CREATE ROLE points_test_app;
CREATE ROLE points_test_ops;
CREATE ROLE points_test_nobody;
-- the README's GRANTs
GRANT USAGE ON SCHEMA points TO points_test_app, points_test_ops;
GRANT EXECUTE ON FUNCTION points.earn, points.use, points.cancel, points.balance,
      points.history, points.expiring TO points_test_app;
GRANT EXECUTE ON FUNCTION points.expire_due, points.archive, points.verify,
      points.balance, points.history TO points_test_ops;

SET ROLE points_test_app;
SELECT user_seq, amount FROM points.earn(1001, 50);
SELECT user_seq, amount FROM points.use(1001, 20);
SELECT points.balance(1001);
SELECT count(*) FROM points.history(1001);
SELECT count(*) FROM points.expiring(1001);
SELECT q, pg_temp.try(q) FROM unnest(ARRAY[
  'SELECT points.expire_due()',
  'SELECT points.archive()',
  'SELECT * FROM points.verify()',
  'SELECT * FROM points.ledger',
  'SELECT * FROM points.account',
  'INSERT INTO points.account VALUES (1, 1000000, 0, now(), now())',
  'UPDATE points.account SET balance = 1000000',
  'DELETE FROM points.outbox',
  'UPDATE points.lot SET remaining = 1',
  'SELECT nextval(''points.tx_seq'')',
  'TRUNCATE points.ledger']) q;
RESET ROLE;

SET ROLE points_test_ops;
SELECT points.expire_due() >= 0 AS ok, points.archive() >= 0 AS ok;
SELECT count(*) FROM points.verify();
SELECT q, pg_temp.try(q) FROM unnest(ARRAY[
  'SELECT points.earn(1001, 1)',
  'SELECT points.use(1001, 1)',
  'UPDATE points.lot SET remaining = 1']) q;
RESET ROLE;

SET ROLE points_test_nobody;
SELECT q, pg_temp.try(q) FROM unnest(ARRAY[
  'SELECT points.balance(1001)',
  'SELECT points.earn(1001, 1)',
  'SELECT * FROM points.ledger']) q;
RESET ROLE;

-- a hostile search_path cannot redirect the functions
CREATE SCHEMA evil;
CREATE TABLE evil.ledger (x int);
CREATE FUNCTION evil.coalesce(bigint, bigint) RETURNS bigint LANGUAGE sql AS 'SELECT 424242::bigint';
SET search_path = evil, public;
SELECT points.balance(1001);
SELECT amount, balance_after FROM points.earn(1001, 1);
RESET search_path;
DROP SCHEMA evil CASCADE;

REVOKE ALL ON SCHEMA points FROM points_test_app, points_test_ops;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA points FROM points_test_app, points_test_ops;
DROP ROLE points_test_app;
DROP ROLE points_test_ops;
DROP ROLE points_test_nobody;
