/*-------------------------------------------------------------------------
 *
 * verify.c
 *	  points.verify: check that each account's balance equals the sum of
 *	  its lots' remaining points and the sum of its ledger amounts (archive
 *	  included), and that it is not negative.
 *
 * One statement, so one snapshot: concurrent writers and archiving cannot
 * make a consistent account look inconsistent.  An account missing while
 * lots or ledger rows exist shows with a NULL balance.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"

#include "points.h"

PG_FUNCTION_INFO_V1(points_verify);

static SPIPlanPtr plan_verify_one;
static SPIPlanPtr plan_verify_all;

/*
 * points_verify
 *		points.verify(user_id): the accounts that disagree; all accounts
 *		when user_id is NULL.  No rows means consistent.
 */
Datum
points_verify(PG_FUNCTION_ARGS)
{
	static const Oid types[1] = {INT8OID};
	Datum		values[1];

	SPI_connect();
	if (PG_ARGISNULL(0))
	{
		PointsPlan(&plan_verify_all,
				   "SELECT coalesce(a.user_id, l.user_id, g.user_id), a.balance,"
				   "       coalesce(l.total, 0)::int8, coalesce(g.total, 0)::int8"
				   " FROM points.account a"
				   " FULL JOIN (SELECT user_id, sum(remaining) AS total"
				   "            FROM points.lot GROUP BY user_id) l"
				   "   ON l.user_id = a.user_id"
				   " FULL JOIN (SELECT user_id, sum(amount) AS total FROM ("
				   "              SELECT user_id, amount FROM points.ledger"
				   "              UNION ALL"
				   "              SELECT user_id, amount FROM points.ledger_archive) x"
				   "            GROUP BY user_id) g"
				   "   ON g.user_id = coalesce(a.user_id, l.user_id)"
				   " WHERE a.balance IS NULL OR a.balance < 0"
				   "    OR a.balance <> coalesce(l.total, 0)"
				   "    OR a.balance <> coalesce(g.total, 0)"
				   " ORDER BY 1",
				   0, NULL);
		PointsExec(plan_verify_all, NULL, NULL, true, 0);
	}
	else
	{
		values[0] = PG_GETARG_DATUM(0);
		PointsPlan(&plan_verify_one,
				   "SELECT * FROM ("
				   " SELECT $1 AS user_id,"
				   "  (SELECT balance FROM points.account WHERE user_id = $1) AS balance,"
				   "  (SELECT coalesce(sum(remaining), 0) FROM points.lot"
				   "    WHERE user_id = $1)::int8 AS lots,"
				   "  (SELECT coalesce(sum(amount), 0) FROM ("
				   "     SELECT amount FROM points.ledger WHERE user_id = $1"
				   "     UNION ALL"
				   "     SELECT amount FROM points.ledger_archive WHERE user_id = $1) x"
				   "  )::int8 AS ledger) v"
				   " WHERE (balance IS NULL AND (lots <> 0 OR ledger <> 0))"
				   "    OR balance < 0 OR balance <> lots OR balance <> ledger",
				   1, types);
		PointsExec(plan_verify_one, values, NULL, true, 0);
	}
	PointsReturnRows(fcinfo);
	SPI_finish();
	return (Datum) 0;
}
