/*-------------------------------------------------------------------------
 *
 * stats.c
 *	  points.stats() and points.stats_reset(): per-operation counters kept
 *	  in shared memory, as pg_stat_statements keeps its own.
 *
 * Each counted SQL function runs through PointsCounted, which times the
 * call and adds to its operation's counters with a few atomic adds, also
 * when the call fails (the error is re-thrown untouched).  Counting is
 * done only with the preload; without it the functions run as they are and
 * points.stats() says why it has nothing.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "funcapi.h"
#include "utils/builtins.h"
#include "utils/timestamp.h"
#include "utils/tuplestore.h"

#include "points.h"

PG_FUNCTION_INFO_V1(points_stats);
PG_FUNCTION_INFO_V1(points_stats_reset);

int64		points_call_points = 0;
int64		points_call_lock_wait_us = 0;

static const char *const op_names[POINTS_OP_COUNT] = {
	"earn", "use", "cancel", "earn_async", "expire", "archive"
};

static void
AddMax(pg_atomic_uint64 *max, uint64 v)
{
	uint64		cur = pg_atomic_read_u64(max);

	while (v > cur && !pg_atomic_compare_exchange_u64(max, &cur, v))
		;
}

static void
Count(PointsOp op, TimestampTz start, bool failed, bool lock_timeout)
{
	PointsOpStats *s = &points_shared->ops[op];
	TimestampTz end = GetCurrentTimestamp();
	uint64		us = end > start ? (uint64) (end - start) : 0;

	pg_atomic_fetch_add_u64(&s->calls, 1);
	pg_atomic_fetch_add_u64(&s->total_us, us);
	AddMax(&s->max_us, us);
	if (points_call_lock_wait_us > 0)
		pg_atomic_fetch_add_u64(&s->lock_wait_us, (uint64) points_call_lock_wait_us);
	if (failed)
	{
		pg_atomic_fetch_add_u64(&s->failures, 1);
		if (lock_timeout)
			pg_atomic_fetch_add_u64(&s->lock_timeouts, 1);
	}
	else if (points_call_points > 0)
		pg_atomic_fetch_add_u64(&s->points, (uint64) points_call_points);
}

/*
 * PointsCounted
 *		Call impl(fcinfo), counting it as operation op.
 */
Datum
PointsCounted(PointsOp op, PGFunction impl, FunctionCallInfo fcinfo)
{
	TimestampTz start;
	volatile Datum result = (Datum) 0;

	if (points_shared == NULL || !points_track_stats)
		return impl(fcinfo);

	start = GetCurrentTimestamp();
	points_call_points = 0;
	points_call_lock_wait_us = 0;
	PG_TRY();
	{
		result = impl(fcinfo);
	}
	PG_CATCH();
	{
		Count(op, start, true, geterrcode() == ERRCODE_LOCK_NOT_AVAILABLE);
		PG_RE_THROW();
	}
	PG_END_TRY();
	Count(op, start, false, false);
	return result;
}

static void
RequirePreload(void)
{
	if (points_shared == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("points statistics are not available"),
				 errhint("Add points to shared_preload_libraries and restart the server.")));
}

/*
 * points_stats
 *		points.stats(): one row per operation since the last reset.
 */
Datum
points_stats(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;

	RequirePreload();
	InitMaterializedSRF(fcinfo, 0);
	for (int i = 0; i < POINTS_OP_COUNT; i++)
	{
		PointsOpStats *s = &points_shared->ops[i];
		Datum		values[8];
		bool		nulls[8] = {0};

		values[0] = CStringGetTextDatum(op_names[i]);
		values[1] = Int64GetDatum((int64) pg_atomic_read_u64(&s->calls));
		values[2] = Int64GetDatum((int64) pg_atomic_read_u64(&s->failures));
		values[3] = Int64GetDatum((int64) pg_atomic_read_u64(&s->lock_timeouts));
		values[4] = Int64GetDatum((int64) pg_atomic_read_u64(&s->points));
		values[5] = Float8GetDatum(pg_atomic_read_u64(&s->total_us) / 1000.0);
		values[6] = Float8GetDatum(pg_atomic_read_u64(&s->max_us) / 1000.0);
		values[7] = Float8GetDatum(pg_atomic_read_u64(&s->lock_wait_us) / 1000.0);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}

/*
 * points_stats_reset
 *		points.stats_reset(): zero every counter.
 */
Datum
points_stats_reset(PG_FUNCTION_ARGS)
{
	RequirePreload();
	for (int i = 0; i < POINTS_OP_COUNT; i++)
	{
		PointsOpStats *s = &points_shared->ops[i];

		pg_atomic_write_u64(&s->calls, 0);
		pg_atomic_write_u64(&s->failures, 0);
		pg_atomic_write_u64(&s->lock_timeouts, 0);
		pg_atomic_write_u64(&s->points, 0);
		pg_atomic_write_u64(&s->total_us, 0);
		pg_atomic_write_u64(&s->max_us, 0);
		pg_atomic_write_u64(&s->lock_wait_us, 0);
	}
	pg_atomic_write_u64(&points_shared->stats_reset, (uint64) GetCurrentTimestamp());
	PG_RETURN_VOID();
}
