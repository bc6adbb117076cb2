/*-------------------------------------------------------------------------
 *
 * expire.c
 *	  points.expire_due: write the expire transactions of lots whose
 *	  expires_at has passed.
 *
 * Expiry is exact without this job (balance and use ignore expired lots);
 * the job makes it visible in the ledger and as events.  It works user by
 * user: it only tries each user's lock and skips a user that is busy, so
 * it never waits for a caller and never takes part in a deadlock, and it
 * locks at most POINTS_BATCH_MAX_USERS users per call so that a backlog
 * cannot fill the shared lock table.  Each expired lot becomes one "expire"
 * transaction with metadata {"lot_id": N}.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/timestamp.h"

#include "points.h"

PG_FUNCTION_INFO_V1(points_expire_due);

static SPIPlanPtr plan_due_users;
static SPIPlanPtr plan_take_lots;

/*
 * ExpireUser
 *		Expire up to max_lots due lots of one user, whose lock is held.
 *		Returns how many lots were expired.
 */
static int64
ExpireUser(int64 user_id, TimestampTz now, int64 max_lots)
{
	static const Oid types[3] = {INT8OID, TIMESTAMPTZOID, INT8OID};
	Datum		values[3];
	PointsAccount acct;
	int64	   *lots;
	int64	   *amounts;
	int64		n;
	int64		i;

	PointsLockAccount(user_id, false, &acct);
	if (!acct.exists)
		return 0;

	values[0] = Int64GetDatum(user_id);
	values[1] = TimestampTzGetDatum(now);
	values[2] = Int64GetDatum(max_lots);
	PointsPlan(&plan_take_lots,
			   "WITH d AS ("
			   "  SELECT lot_id, remaining, expires_at FROM points.lot"
			   "  WHERE user_id = $1 AND remaining > 0 AND expires_at <= $2"
			   "  ORDER BY expires_at, lot_id LIMIT $3),"
			   " u AS ("
			   "  UPDATE points.lot l SET remaining = 0 FROM d"
			   "  WHERE l.lot_id = d.lot_id"
			   "  RETURNING d.lot_id, d.remaining, d.expires_at)"
			   " SELECT lot_id, remaining FROM u ORDER BY expires_at, lot_id",
			   3, types);
	PointsExec(plan_take_lots, values, NULL, false, 0);

	n = (int64) SPI_processed;
	lots = palloc(sizeof(int64) * (n + 1));
	amounts = palloc(sizeof(int64) * (n + 1));
	for (i = 0; i < n; i++)
	{
		lots[i] = PointsGetInt64(i, 1, NULL);
		amounts[i] = PointsGetInt64(i, 2, NULL);
	}
	for (i = 0; i < n; i++)
	{
		char		meta[64];
		Datum		metadata;

		snprintf(meta, sizeof(meta), "{\"lot_id\": %lld}", (long long) lots[i]);
		metadata = DirectFunctionCall1(jsonb_in, CStringGetDatum(meta));
		PointsAppendTx(&acct, user_id, "expire", -amounts[i], NULL, 0, NULL,
					   metadata, false, now, 0, false);
	}
	pfree(lots);
	pfree(amounts);
	return n;
}

/*
 * points_expire_due
 *		points.expire_due(max_lots): expire at most max_lots due lots now,
 *		soonest-expired first; returns how many were expired.  Run it again
 *		while it returns max_lots (or leave it to the worker).
 */
Datum
points_expire_due(PG_FUNCTION_ARGS)
{
	int32		max_lots = PointsArgPositiveInt32(fcinfo, 0, "max_lots");
	TimestampTz now = GetCurrentTimestamp();
	static const Oid types[3] = {TIMESTAMPTZOID, INT4OID, INT4OID};
	Datum		values[3];
	int64	   *users;
	int64		nusers;
	int64		i;
	int64		expired = 0;

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
	nusers = (int64) SPI_processed;
	users = palloc(sizeof(int64) * (nusers + 1));
	for (i = 0; i < nusers; i++)
		users[i] = PointsGetInt64(i, 1, NULL);

	for (i = 0; i < nusers && expired < max_lots; i++)
	{
		if (!PointsTryLockUser(users[i]))
			continue;			/* busy: a later run takes it */
		expired += ExpireUser(users[i], now, max_lots - expired);
	}
	SPI_finish();
	PG_RETURN_INT64(expired);
}
