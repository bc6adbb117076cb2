/* points--0.2--0.3.sql: cheaper writes: the CHECK constraints that only restated the code */

\echo Use "ALTER EXTENSION points UPDATE TO '0.3'" to load this file. \quit

/*
 * PostgreSQL reads a table's CHECK constraints back from the catalog and
 * compiles them for every statement that writes the table: an earn wrote
 * three tables with six constraints, a use four with eight, and that was a
 * fifth of the instructions of a call (measured with callgrind; the
 * kind's list alone 7%).  The constraints kept guard the money whatever
 * the code does: no balance below zero, no lot below zero or above what
 * was earned, no use_lot restored more than was taken, and the queue's
 * amount and state.  Those dropped restated what only the extension's own
 * code writes, and checks before writing:
 *   ledger.kind           one of the five kinds: constants of the C code
 *   ledger.balance_after  >= 0: the same value as the account's balance,
 *                         which keeps its CHECK in the same statement
 *   account.last_seq      >= 0: starts at 0 and only grows
 *   lot.amount            > 0: every earn's amount is checked (22023), and
 *                         0 <= remaining <= amount still holds
 *   use_lot.taken         > 0: the part of a lot a use takes, > 0 by
 *                         construction; restored <= taken still holds
 * The names are those PostgreSQL gave them in points--0.1.sql.
 */
ALTER TABLE points.ledger
    DROP CONSTRAINT ledger_kind_check,
    DROP CONSTRAINT ledger_balance_after_check;
ALTER TABLE points.account DROP CONSTRAINT account_last_seq_check;
ALTER TABLE points.lot DROP CONSTRAINT lot_amount_check;
ALTER TABLE points.use_lot DROP CONSTRAINT use_lot_taken_check;
