/*-------------------------------------------------------------------------
 *
 * expire.c
 *	  points.expire_due: write the expire transactions of lots whose
 *	  expires_at has passed.
 *
 * Expiry is exact without this job (balance and use ignore expired lots);
 * the job makes it visible in the ledger and as events.  It only tries
 * each user's lock and skips a user that is busy, so it never waits for a
 * caller and never takes part in a deadlock, and it locks at most
 * POINTS_BATCH_MAX_USERS users per call so that a backlog cannot fill the
 * shared lock table.  Each expired lot becomes one "expire" transaction
 * with metadata {"lot_id": N}.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/timestamp.h"

#include "points.h"

PG_FUNCTION_INFO_V1(points_expire_due);

static SPIPlanPtr plan_due_users;
static SPIPlanPtr plan_take_lots;

/*
 * points_expire_due
 *		points.expire_due(max_lots): expire at most max_lots due lots now,
 *		soonest-expired first; returns how many were expired.  Run it again
 *		while it returns more than zero (or leave it to the worker).
 *
 * Set-based: one statement finds the users, one locks their accounts, one
 * takes their due lots, and one (batch.c) writes every expire transaction.
 */
static Datum
ExpireDueImpl(PG_FUNCTION_ARGS)
{
	int32		max_lots = PointsArgPositiveInt32(fcinfo, 0, "max_lots");
	TimestampTz now = GetCurrentTimestamp();
	static const Oid types[3] = {TIMESTAMPTZOID, INT4OID, INT4OID};
	static const Oid lot_types[3] = {INT8ARRAYOID, TIMESTAMPTZOID, INT4OID};
	Datum		values[3];
	PointsAccountSet set;
	PointsTxBatch batch = {0};
	uint64		i;
	int64		nlots;

	values[0] = TimestampTzGetDatum(now);
	values[1] = Int32GetDatum(max_lots);
	values[2] = Int32GetDatum(POINTS_BATCH_MAX_USERS);

	SPI_connect();
	PointsPlan(&plan_due_users,
			   "SELECT user_id FROM ("
			   "  SELECT user_id, expires_at FROM points.lot"
			   "  WHERE remaining > 0 AND expires_at <= $1"
			   "  ORDER BY expires_at LIMIT $2) d"
			   " GROUP BY user_id ORDER BY min(expires_at) LIMIT $3",
			   3, types);
	PointsExec(plan_due_users, values, NULL, false, 0);

	if (!PointsLockBatchUsers(false, now, SPI_processed, NULL, &set))
	{
		SPI_finish();
		PG_RETURN_INT64(0);
	}

	values[0] = set.users;
	values[1] = TimestampTzGetDatum(now);
	values[2] = Int32GetDatum(max_lots);
	PointsPlan(&plan_take_lots,
			   "WITH d AS ("
			   "  SELECT l.ctid AS tid, l.lot_id, l.user_id, l.remaining, l.expires_at"
			   "  FROM unnest($1) u(user_id),"
			   "       LATERAL (SELECT ctid, * FROM points.lot l"
			   "                WHERE l.user_id = u.user_id AND l.remaining > 0"
			   "                AND l.expires_at <= $2) l"
			   "  ORDER BY l.expires_at, l.lot_id LIMIT $3),"
			   " u AS ("
			   "  UPDATE points.lot l SET remaining = 0 FROM d"
			   "  WHERE l.ctid = d.tid"
			   "  RETURNING d.lot_id, d.user_id, d.remaining, d.expires_at)"
			   " SELECT lot_id, user_id, remaining FROM u"
			   " ORDER BY user_id, expires_at, lot_id",
			   3, lot_types);
	PointsExec(plan_take_lots, values, NULL, false, 0);

	/* one expire transaction per lot, in each user's order */
	nlots = (int64) SPI_processed;
	for (i = 0; i < SPI_processed; i++)
	{
		PointsAccountState *a = PointsFindAccount(&set, PointsGetInt64(i, 2, NULL));
		int64		lot_id = PointsGetInt64(i, 1, NULL);
		int64		remaining = PointsGetInt64(i, 3, NULL);
		a->balance -= remaining;
		a->last_seq++;
		PointsBatchAdd(&batch, a->user_id, a->last_seq, "expire", -remaining,
					   a->balance, NULL, NULL, PointsLotMetadata(lot_id), 0);
	}
	PointsAppendBatch(&batch, now);
	SPI_finish();
	PG_RETURN_INT64(nlots);
}

/*
 * points_expire_due
 *		The SQL entry point: ExpireDueImpl, counted in points.stats().
 */
Datum
points_expire_due(PG_FUNCTION_ARGS)
{
	return PointsCounted(POINTS_OP_EXPIRE, ExpireDueImpl, fcinfo);
}
