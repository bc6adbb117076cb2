-- one round of the live checker: hot users and 20 random accounts, every
-- invariant, in one REPEATABLE READ snapshot
BEGIN ISOLATION LEVEL REPEATABLE READ;
SELECT stress.check_round(20);
COMMIT;
