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
 * shared lock table.  The lots of one user due in one call become one
 * "expire" transaction (at most POINTS_EXPIRE_MAX_LOTS lots each) with
 * metadata {"lots": [{"lot_id": N, "amount": n}, ...]}: a backlog of ten
 * lots a user costs one ledger row and one event, not ten.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "common/int.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/timestamp.h"

#include "points.h"

PG_FUNCTION_INFO_V1(points_expire_due);

static SPIPlanPtr plan_due_users;
static SPIPlanPtr plan_due_lots;
static SPIPlanPtr plan_empty_lots;

/*
 * points_expire_due
 *		points.expire_due(max_lots): expire at most max_lots due lots now,
 *		soonest-expired first; returns how many were expired.  Run it again
 *		while it returns more than zero (or leave it to the worker).
 *
 * Set-based: one statement finds the users, one reads their accounts, one
 * reads their due lots, one empties those lots, and one (batch.c) writes
 * every expire transaction.
 */
static Datum
ExpireDueImpl(PG_FUNCTION_ARGS)
{
	int32		max_lots = PointsArgPositiveInt32(fcinfo, 0, "max_lots");
	TimestampTz now = GetCurrentTimestamp();
	static const Oid types[3] = {TIMESTAMPTZOID, INT4OID, INT4OID};
	static const Oid lot_types[3] = {INT8ARRAYOID, TIMESTAMPTZOID, INT4OID};
	static const Oid empty_types[1] = {TIDARRAYOID};
	Datum		values[3];
	Datum		empty_values[1];
	Datum	   *tids;
	SPITupleTable *due;
	PointsAccountSet set;
	PointsTxBatch batch = {0};
	uint64		i;
	int64		nlots;
	int64	   *lot_ids;
	int64	   *amounts;

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

	/*
	 * Their due lots, soonest first, each user's read through lot_user_idx
	 * (the LIMIT in the lateral subquery keeps it a per-user index range
	 * whatever the statistics say; an index scan in its order, not a
	 * bitmap scan and a sort), then emptied by ctid.  The users
	 * are locked: no one else changes their lots in between.
	 */
	values[0] = set.users;
	values[1] = TimestampTzGetDatum(now);
	values[2] = Int32GetDatum(max_lots);
	PointsPlanSet(&plan_due_lots,
			   "SELECT lot_id, user_id, remaining, tid FROM ("
			   "  SELECT l.lot_id, l.user_id, l.remaining, l.expires_at, l.tid"
			   "  FROM unnest($1) u(user_id),"
			   "       LATERAL (SELECT lot_id, user_id, remaining, expires_at, ctid AS tid"
			   "                FROM points.lot l"
			   "                WHERE l.user_id = u.user_id AND l.remaining > 0"
			   "                AND l.expires_at <= $2"
			   "                ORDER BY l.user_id, l.expires_at, l.lot_id LIMIT $3) l"
			   "  ORDER BY l.expires_at, l.lot_id LIMIT $3) d"
			   " ORDER BY user_id, expires_at, lot_id",
			   3, lot_types);
	PointsExecPerKey(plan_due_lots, values, NULL, false, 0);
	nlots = (int64) SPI_processed;
	if (nlots == 0)
	{
		SPI_finish();
		PG_RETURN_INT64(0);
	}
	due = SPI_tuptable;
	tids = palloc(sizeof(Datum) * nlots);
	for (i = 0; i < (uint64) nlots; i++)
	{
		bool		isnull;

		tids[i] = SPI_getbinval(due->vals[i], due->tupdesc, 4, &isnull);
	}
	empty_values[0] = PointerGetDatum(construct_array(tids, (int) nlots, TIDOID,
													  sizeof(ItemPointerData), false,
													  TYPALIGN_SHORT));
	/*
	 * By ctid, a TID scan: the rows cannot move while their users are ours.
	 * The planner prices a fetch of 10,000 tids as 10,000 random reads and
	 * would rather scan the whole table; it must not (see PointsExecIndexed).
	 */
	PointsPlanSet(&plan_empty_lots,
			   "UPDATE points.lot SET remaining = 0 WHERE ctid = ANY($1)",
			   1, empty_types);
	PointsExecIndexed(plan_empty_lots, empty_values, NULL, false, 0);
	if (SPI_processed != (uint64) nlots)
		elog(ERROR, "points: %llu of %lld due lots could be expired",
			 (unsigned long long) SPI_processed, (long long) nlots);

	/*
	 * One expire transaction per user for the lots of that user due now (in
	 * chunks of POINTS_EXPIRE_MAX_LOTS, so that an event stays small), each
	 * lot and its points listed in the metadata.
	 */
	lot_ids = palloc(sizeof(int64) * POINTS_EXPIRE_MAX_LOTS);
	amounts = palloc(sizeof(int64) * POINTS_EXPIRE_MAX_LOTS);
	for (i = 0; i < (uint64) nlots;)
	{
		int64		user_id = PointsGetInt64Of(due, i, 2, NULL);
		PointsAccountState *a = PointsFindAccount(&set, user_id);
		int64		total = 0;
		int			n = 0;

		for (; i < (uint64) nlots && n < POINTS_EXPIRE_MAX_LOTS &&
			 PointsGetInt64Of(due, i, 2, NULL) == user_id; i++, n++)
		{
			lot_ids[n] = PointsGetInt64Of(due, i, 1, NULL);
			amounts[n] = PointsGetInt64Of(due, i, 3, NULL);
			if (pg_add_s64_overflow(total, amounts[n], &total))
				elog(ERROR, "points: the due lots of user %lld overflow bigint",
					 (long long) user_id);	/* their sum is the balance's part */
		}
		a->balance -= total;
		a->last_seq++;
		PointsBatchAdd(&batch, user_id, a->last_seq, "expire", -total,
					   a->balance, NULL, NULL,
					   PointsLotsMetadata(lot_ids, amounts, n), 0);
	}
	PointsAppendBatch(&batch, &set, now);
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
