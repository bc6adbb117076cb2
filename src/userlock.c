/*-------------------------------------------------------------------------
 *
 * userlock.c
 *	  The user lock: a transaction-scoped advisory lock on one user_id.
 *
 * Every write of a user (earn, use, cancel, expiry) takes it first, then
 * the user's account row.  Callers wait at most points.lock_timeout and then
 * get SQLSTATE 55P03; batch jobs only try it and skip a busy user, so they
 * never wait and can never take part in a deadlock.
 *
 * The lock lives in the advisory lock space of the current database with
 * its own fourth key field, so it never collides with an application's own
 * pg_advisory_lock(user_id).  It shows in pg_locks as locktype 'advisory',
 * classid/objid the high/low halves of the user_id, objsubid 21588.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "miscadmin.h"
#include "storage/lock.h"
#include "storage/proc.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "points.h"

#define POINTS_LOCK_FIELD4	0x5454	/* 21588 */

static void
SetUserLockTag(LOCKTAG *tag, int64 user_id)
{
	uint64		u = (uint64) user_id;

	SET_LOCKTAG_ADVISORY(*tag, MyDatabaseId, (uint32) (u >> 32),
						 (uint32) u, POINTS_LOCK_FIELD4);
}

/*
 * PointsTryLockUser
 *		Take the user lock if it is free now; never waits.
 */
bool
PointsTryLockUser(int64 user_id)
{
	LOCKTAG		tag;

	SetUserLockTag(&tag, user_id);
	return LockAcquire(&tag, ExclusiveLock, false, true) != LOCKACQUIRE_NOT_AVAIL;
}

/*
 * PointsLockUser
 *		Take the user lock, waiting at most points.lock_timeout.
 *
 * The wait itself is PostgreSQL's ordinary lock wait (with deadlock
 * detection), bounded by temporarily setting the server's lock timeout to
 * ours; a timeout is reported as 55P03 naming the user.
 */
void
PointsLockUser(int64 user_id)
{
	LOCKTAG		tag;
	int			saved_timeout = LockTimeout;
	MemoryContext cxt = CurrentMemoryContext;
	TimestampTz wait_start;

	SetUserLockTag(&tag, user_id);

	/* fast path: nobody holds it */
	if (LockAcquire(&tag, ExclusiveLock, false, true) != LOCKACQUIRE_NOT_AVAIL)
		return;

	LockTimeout = points_lock_timeout;
	wait_start = GetCurrentTimestamp();
	PG_TRY();
	{
		(void) LockAcquire(&tag, ExclusiveLock, false, false);
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		LockTimeout = saved_timeout;
		points_call_lock_wait_us += GetCurrentTimestamp() - wait_start;
		MemoryContextSwitchTo(cxt);
		edata = CopyErrorData();
		if (edata->sqlerrcode != ERRCODE_LOCK_NOT_AVAILABLE)
			PG_RE_THROW();
		FlushErrorState();
		ereport(ERROR,
				(errcode(ERRCODE_LOCK_NOT_AVAILABLE),
				 errmsg("user %lld is busy: lock not granted within %d ms",
						(long long) user_id, points_lock_timeout),
				 errdetail("Another transaction holds the lock of user %lld.",
						   (long long) user_id),
				 errhint("Retry the call, keep transactions that touch a user short, or raise points.lock_timeout.")));
	}
	PG_END_TRY();
	LockTimeout = saved_timeout;
	points_call_lock_wait_us += GetCurrentTimestamp() - wait_start;
}
