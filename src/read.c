/*-------------------------------------------------------------------------
 *
 * read.c
 *	  The read side of the API: points.balance, points.history and
 *	  points.expiring.  None of them takes a lock: each runs one statement,
 *	  so it sees one consistent state of the user.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "datatype/timestamp.h"
#include "utils/fmgrprotos.h"
#include "utils/timestamp.h"

#include "points.h"

PG_FUNCTION_INFO_V1(points_balance);
PG_FUNCTION_INFO_V1(points_history);
PG_FUNCTION_INFO_V1(points_expiring);

static SPIPlanPtr plan_balance;
static SPIPlanPtr plan_history;
static SPIPlanPtr plan_expiring;

/*
 * points_balance
 *		points.balance(user_id): the points spendable now.  The stored
 *		balance less the lots that have passed expires_at but that the
 *		expiry job has not expired yet; 0 for an unknown user.
 */
Datum
points_balance(PG_FUNCTION_ARGS)
{
	int64		user_id = PointsArgInt64(fcinfo, 0, "user_id");
	static const Oid types[2] = {INT8OID, TIMESTAMPTZOID};
	Datum		values[2];
	int64		balance;

	values[0] = Int64GetDatum(user_id);
	values[1] = TimestampTzGetDatum(GetCurrentTimestamp());
	SPI_connect();
	PointsPlanKey(&plan_balance,
				  "SELECT a.balance - coalesce((SELECT sum(l.remaining)"
				  "   FROM points.lot l WHERE l.user_id = $1 AND l.remaining > 0"
				  "   AND l.expires_at <= $2), 0)::int8"
				  " FROM points.account a WHERE a.user_id = $1",
				  2, types);
	PointsExec(plan_balance, values, NULL, true, 1);
	balance = SPI_processed ? PointsGetInt64(0, 1, NULL) : 0;
	SPI_finish();
	PG_RETURN_INT64(balance);
}

/*
 * points_history
 *		points.history(user_id, before_seq, max_rows): the user's
 *		transactions newest first, archived ones included; with before_seq,
 *		only those with a smaller user_seq (for paging).
 */
Datum
points_history(PG_FUNCTION_ARGS)
{
	int64		user_id = PointsArgInt64(fcinfo, 0, "user_id");
	int64		before = PG_ARGISNULL(1) ? PG_INT64_MAX : PG_GETARG_INT64(1);
	int32		max_rows = PointsArgPositiveInt32(fcinfo, 2, "max_rows");
	static const Oid types[3] = {INT8OID, INT8OID, INT4OID};
	Datum		values[3];

	values[0] = Int64GetDatum(user_id);
	values[1] = Int64GetDatum(before);
	values[2] = Int32GetDatum(max_rows);
	SPI_connect();
	PointsPlanKey(&plan_history,
				  "SELECT * FROM ("
				  " (SELECT tx_id, user_id, user_seq, kind, amount, balance_after,"
				  "         idempotency_key, cancels_tx, reason, metadata, created_at, false"
				  "  FROM points.ledger WHERE user_id = $1 AND user_seq < $2"
				  "  ORDER BY user_seq DESC LIMIT $3)"
				  " UNION ALL"
				  " (SELECT tx_id, user_id, user_seq, kind, amount, balance_after,"
				  "         idempotency_key, cancels_tx, reason, metadata, created_at, false"
				  "  FROM points.ledger_archive WHERE user_id = $1 AND user_seq < $2"
				  "  ORDER BY user_seq DESC LIMIT $3)) h"
				  " ORDER BY user_seq DESC LIMIT $3",
				  3, types);
	PointsExec(plan_history, values, NULL, true, 0);
	PointsReturnRows(fcinfo);
	SPI_finish();
	return (Datum) 0;
}

/*
 * points_expiring
 *		points.expiring(user_id, within): the user's lots with points left
 *		that expire within the interval from now, soonest first.  Lots that
 *		never expire are not listed.
 */
Datum
points_expiring(PG_FUNCTION_ARGS)
{
	int64		user_id = PointsArgInt64(fcinfo, 0, "user_id");
	TimestampTz now = GetCurrentTimestamp();
	TimestampTz until;
	static const Oid types[3] = {INT8OID, TIMESTAMPTZOID, TIMESTAMPTZOID};
	Datum		values[3];

	if (PG_ARGISNULL(1))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("within must not be NULL"),
				 errhint("Omit it for the default of 30 days.")));
	until = PointsTimestampPlusInterval(now, PG_GETARG_INTERVAL_P(1), "within", 1);

	values[0] = Int64GetDatum(user_id);
	values[1] = TimestampTzGetDatum(now);
	values[2] = TimestampTzGetDatum(until);
	SPI_connect();
	PointsPlanKey(&plan_expiring,
				  "SELECT lot_id, remaining, expires_at FROM points.lot"
				  " WHERE user_id = $1 AND remaining > 0 AND expires_at > $2"
				  " AND expires_at <= $3 AND expires_at < 'infinity'"
				  " ORDER BY expires_at, lot_id",
				  3, types);
	PointsExec(plan_expiring, values, NULL, true, 0);
	PointsReturnRows(fcinfo);
	SPI_finish();
	return (Datum) 0;
}
