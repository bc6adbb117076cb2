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

#include "access/genam.h"
#include "access/stratnum.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/pg_am.h"
#include "catalog/pg_type.h"
#include "common/int.h"
#include "miscadmin.h"
#include "parser/parse_relation.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "points.h"

PG_FUNCTION_INFO_V1(points_expire_due);

static SPIPlanPtr plan_due_users;
static SPIPlanPtr plan_due_lots;
static SPIPlanPtr plan_empty_lots;

/* soonest first */
static int
CompareDue(const void *a, const void *b)
{
	const PointsLot *x = a;
	const PointsLot *y = b;

	if (x->expires_at != y->expires_at)
		return x->expires_at < y->expires_at ? -1 : 1;
	return x->lot_id < y->lot_id ? -1 : x->lot_id > y->lot_id ? 1 : 0;
}

/* by user, then soonest first */
static int
CompareUserDue(const void *a, const void *b)
{
	const PointsLot *x = a;
	const PointsLot *y = b;

	if (x->user_id != y->user_id)
		return x->user_id < y->user_id ? -1 : 1;
	return CompareDue(a, b);
}

/*
 * ScanDueLots
 *		The due lots of each locked user, read directly through
 *		lot_user_idx (one index range a user, in its order: expires_at,
 *		lot_id), at most max_lots a user; the soonest max_lots of them all
 *		are kept, by user.  Returns how many, in *out.  What the statement
 *		of ReadDueLots returns, without its executor nodes, sorts and
 *		tuple copies (a fifth of an expiry's work).
 */
static int64
ScanDueLots(Relation lot, Relation index, PointsAccountSet *set,
			TimestampTz now, int32 max_lots, PointsLot **out)
{
	PointsLotScan scan;
	int64		limit = 2 * (int64) max_lots;	/* then cut to the soonest max_lots */
	int64		cap = Min((int64) set->n * 8, limit) + 1;
	int64		n = 0;
	PointsLot  *due = palloc(sizeof(PointsLot) * cap);
	PointsLot	cut;			/* the latest lot that can still be kept */
	bool		have_cut = false;

	PointsLotScanBegin(&scan, lot, index);
	for (int u = 0; u < set->n; u++)
	{
		PointsLotScanUser(&scan, set->accounts[u].user_id, now, true);
		for (int64 taken = 0; taken < max_lots; taken++)
		{
			if (n == cap)
			{
				cap = Min(cap * 2, limit + 1);
				due = repalloc_huge(due, sizeof(PointsLot) * cap);
			}
			if (!PointsLotScanNext(&scan, &due[n]))
				break;
			if (have_cut && CompareDue(&due[n], &cut) > 0)
				break;			/* this user's next lots are later still */
			if (++n == limit)
			{
				/* memory stays within 2 x max_lots: keep the soonest half */
				qsort(due, n, sizeof(PointsLot), CompareDue);
				n = max_lots;
				cut = due[n - 1];
				have_cut = true;
			}
		}
	}
	PointsLotScanEnd(&scan);

	/* users in user_id order, each one's lots in index order: sorted */
	if (n > max_lots)
	{
		qsort(due, n, sizeof(PointsLot), CompareDue);
		n = max_lots;
		have_cut = true;
	}
	if (have_cut)
		qsort(due, n, sizeof(PointsLot), CompareUserDue);
	*out = due;
	return n;
}

/*
 * ReadDueLots
 *		ScanDueLots through SQL, for when the lot table or its index is not
 *		what the direct read expects.  The LIMIT in the lateral subquery
 *		keeps each user's read a range of lot_user_idx whatever the
 *		statistics say (an index scan in its order, not a bitmap scan and a
 *		sort).
 */
static int64
ReadDueLots(PointsAccountSet *set, TimestampTz now, int32 max_lots, PointsLot **out)
{
	static const Oid lot_types[3] = {INT8ARRAYOID, TIMESTAMPTZOID, INT4OID};
	Datum		values[3];
	int64		n;
	PointsLot	   *due;

	values[0] = set->users;
	values[1] = TimestampTzGetDatum(now);
	values[2] = Int32GetDatum(max_lots);
	PointsPlanSet(&plan_due_lots,
			   "SELECT lot_id, user_id, remaining, tid, expires_at FROM ("
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
	n = (int64) SPI_processed;
	due = palloc(sizeof(PointsLot) * (n + 1));
	for (int64 i = 0; i < n; i++)
	{
		bool		isnull;

		due[i].lot_id = PointsGetInt64(i, 1, NULL);
		due[i].user_id = PointsGetInt64(i, 2, NULL);
		due[i].remaining = PointsGetInt64(i, 3, NULL);
		ItemPointerCopy((ItemPointer) DatumGetPointer(SPI_getbinval(SPI_tuptable->vals[i],
																 SPI_tuptable->tupdesc,
																 4, &isnull)),
						&due[i].tid);
		due[i].expires_at = DatumGetTimestampTz(SPI_getbinval(SPI_tuptable->vals[i],
															  SPI_tuptable->tupdesc,
															  5, &isnull));
	}
	*out = due;
	return n;
}

/*
 * EmptyDueLots
 *		Read the due lots of the locked users (at most max_lots, soonest
 *		first; returned in *out by user) and set their remaining to 0.
 *		Directly where the lot table allows (bulk.c: no triggers or rules)
 *		and lot_user_idx is valid: an index range a user, then each row's
 *		next version written by ctid.  Otherwise by two statements.  The
 *		users are locked: no one else changes their lots in between, and
 *		the versions read are the latest.
 */
static int64
EmptyDueLots(PointsAccountSet *set, TimestampTz now, int32 max_lots, PointsLot **out)
{
	static const char *const remaining[1] = {"remaining"};
	static const Oid empty_types[1] = {TIDARRAYOID};
	Datum		zero = Int64GetDatum(0);
	Oid			relid = PointsRelid("lot");
	PointsBulk *bulk = palloc(sizeof(PointsBulk));
	Relation	index;
	PointsLot	   *due;
	Datum	   *tids;
	Datum		empty_values[1];
	int64		n = 0;
	bool		direct;

	/* this transaction's writes so far are seen, and its writes here not */
	CommandCounterIncrement();
	PointsBulkBegin(bulk, &relid, 1);
	index = PointsOpenLotUserIndex(bulk->tables[0].rel);
	direct = index != NULL && PointsBulkUsable(bulk);
	if (direct)
	{
		/* a snapshot that sees what committed before the users were locked */
		PushActiveSnapshot(GetTransactionSnapshot());
		n = ScanDueLots(bulk->tables[0].rel, index, set, now, max_lots, &due);
		for (int64 i = 0; i < n; i++)
			PointsBulkUpdate(bulk, 0, &due[i].tid, 1, remaining, &zero, NULL);
		PopActiveSnapshot();
	}
	if (index)
		index_close(index, NoLock);
	PointsBulkEnd(bulk);
	pfree(bulk);
	if (direct)
	{
		*out = due;
		return n;
	}

	n = ReadDueLots(set, now, max_lots, &due);
	*out = due;
	if (n == 0)
		return 0;
	tids = palloc(sizeof(Datum) * n);
	for (int64 i = 0; i < n; i++)
		tids[i] = PointerGetDatum(&due[i].tid);
	empty_values[0] = PointerGetDatum(construct_array(tids, (int) n, TIDOID,
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
	if (SPI_processed != (uint64) n)
		elog(ERROR, "points: %llu of %lld due lots could be expired",
			 (unsigned long long) SPI_processed, (long long) n);
	return n;
}

/*
 * Where this backend's next search for due lots starts (see PointsHint):
 * the expires_at of the first due lot the last search saw.  New lots
 * expire in the future; points given back to an expired lot by a cancelled
 * use, or lots a rolled-back call had expired, can be due before it: they
 * are found by the next search from the beginning.  Expiry is exact
 * without the job: such points are only written as expired a little later.
 */
static PointsHint due_hint;

/* the predicate of lot_due_idx (remaining > 0), on a version */
static bool
LotHasPoints(TupleTableSlot *slot, void *arg)
{
	bool		isnull;
	Datum		remaining = slot_getattr(slot, *(AttrNumber *) arg, &isnull);

	return !isnull && DatumGetInt64(remaining) > 0;
}

/*
 * FindDueUsers
 *		The users of the soonest-expired due lots, in the order of their
 *		first lot, at most POINTS_BATCH_MAX_USERS of them among the first
 *		max_lots due lots.  Read directly from lot_due_idx: the search
 *		stops at the last user it needs, and starts at the hint above.
 *		Returns how many, in *out.
 */
static int64
FindDueUsers(TimestampTz now, int32 max_lots, int64 **out)
{
	static const Oid types[3] = {TIMESTAMPTZOID, INT4OID, INT4OID};
	static const char *const cols[] = {"expires_at", NULL};
	Oid			relid = PointsRelid("lot");
	Relation	lot = table_open(relid, AccessShareLock);
	Relation	index = PointsOpenIndex(lot, "lot_due_idx", cols);
	int64	   *users = palloc(sizeof(int64) * (POINTS_BATCH_MAX_USERS + 1));
	int64		n = 0;

	if (index)
	{
		ScanKeyData key;
		int64	   *first = palloc(sizeof(int64) * (POINTS_BATCH_MAX_USERS + 1));
		AttrNumber	a_remaining = attnameAttNum(lot, "remaining", false);

		ScanKeyInit(&key, 1, BTLessEqualStrategyNumber, F_TIMESTAMPTZ_LE,
					TimestampTzGetDatum(now));
		n = PointsFirstUsers(lot, index, &key, 1, F_TIMESTAMPTZ_GE, &due_hint,
							 LotHasPoints, &a_remaining,
							 attnameAttNum(lot, "user_id", false),
							 attnameAttNum(lot, "expires_at", false),
							 max_lots, POINTS_BATCH_MAX_USERS, users, first);
		PointsHintSet(&due_hint, n > 0, n > 0 ? first[0] : 0);
	}
	else
	{
		Datum		values[3];

		values[0] = TimestampTzGetDatum(now);
		values[1] = Int32GetDatum(max_lots);
		values[2] = Int32GetDatum(POINTS_BATCH_MAX_USERS);
		PointsPlan(&plan_due_users,
				   "SELECT user_id FROM ("
				   "  SELECT user_id, expires_at FROM points.lot"
				   "  WHERE remaining > 0 AND expires_at <= $1"
				   "  ORDER BY expires_at LIMIT $2) d"
				   " GROUP BY user_id ORDER BY min(expires_at) LIMIT $3",
				   3, types);
		PointsExec(plan_due_users, values, NULL, false, 0);
		for (uint64 i = 0; i < SPI_processed; i++)
			users[n++] = PointsGetInt64(i, 1, NULL);
	}
	if (index)
		index_close(index, NoLock);
	table_close(lot, NoLock);
	*out = users;
	return n;
}

/*
 * points_expire_due
 *		points.expire_due(max_lots): expire at most max_lots due lots now,
 *		soonest-expired first; returns how many were expired.  Run it again
 *		while it returns more than zero (or leave it to the worker).
 *
 * Set-based: the users are found (FindDueUsers), one statement reads
 * their accounts; their due lots are read and emptied, and every expire
 * transaction is written (batch.c), directly where the tables allow.
 */
static Datum
ExpireDueImpl(PG_FUNCTION_ARGS)
{
	int32		max_lots = PointsArgPositiveInt32(fcinfo, 0, "max_lots");
	TimestampTz now = GetCurrentTimestamp();
	int64	   *users;
	int64		nusers;
	PointsLot	   *due;
	PointsAccountSet set;
	PointsTxBatch batch = {0};
	int64		i;
	int64		nlots;
	int64	   *lot_ids;
	int64	   *amounts;
	MemoryContext outer;

	SPI_connect();
	nusers = FindDueUsers(now, max_lots, &users);
	if (!PointsLockBatchUsers(false, now, users, nusers, nusers, NULL, &set))
	{
		SPI_finish();
		PG_RETURN_INT64(0);
	}
	outer = PointsArenaEnter();
	nlots = EmptyDueLots(&set, now, max_lots, &due);
	if (nlots == 0)
	{
		PointsArenaLeave(outer);
		SPI_finish();
		PG_RETURN_INT64(0);
	}

	/*
	 * One expire transaction per user for the lots of that user due now (in
	 * chunks of POINTS_EXPIRE_MAX_LOTS, so that an event stays small), each
	 * lot and its points listed in the metadata.
	 */
	lot_ids = palloc(sizeof(int64) * POINTS_EXPIRE_MAX_LOTS);
	amounts = palloc(sizeof(int64) * POINTS_EXPIRE_MAX_LOTS);
	for (i = 0; i < nlots;)
	{
		int64		user_id = due[i].user_id;
		PointsAccountState *a = PointsFindAccount(&set, user_id);
		int64		total = 0;
		int			n = 0;

		for (; i < nlots && n < POINTS_EXPIRE_MAX_LOTS && due[i].user_id == user_id; i++, n++)
		{
			lot_ids[n] = due[i].lot_id;
			amounts[n] = due[i].remaining;
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
	PointsArenaLeave(outer);
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
