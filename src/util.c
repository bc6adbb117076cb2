/*-------------------------------------------------------------------------
 *
 * util.c
 *	  Helpers shared by the SQL-callable functions: saved SPI plans,
 *	  argument checks, and turning SPI result rows into function results.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "datatype/timestamp.h"
#include "funcapi.h"
#include "utils/builtins.h"
#include "utils/datum.h"
#include "utils/fmgrprotos.h"
#include "utils/lsyscache.h"
#include "utils/tuplestore.h"

#include "utils/guc.h"

#include "points.h"

static SPIPlanPtr
KeepPlan(SPIPlanPtr *slot, const char *sql, int nargs, const Oid *argtypes,
		 int cursor_options)
{
	if (*slot == NULL)
	{
		SPIPlanPtr	plan = SPI_prepare_cursor(sql, nargs, (Oid *) argtypes,
											  cursor_options);

		if (plan == NULL)
			elog(ERROR, "points: SPI_prepare failed (%s): %s",
				 SPI_result_code_string(SPI_result), sql);
		if (SPI_keepplan(plan) != 0)
			elog(ERROR, "points: SPI_keepplan failed");
		*slot = plan;
	}
	return *slot;
}

/*
 * PointsPlan
 *		Return the saved plan in *slot, preparing and keeping it on first use.
 *
 * Plans live for the backend's life; the plan cache re-plans them when the
 * objects they use change (e.g. after DROP/CREATE EXTENSION).
 */
SPIPlanPtr
PointsPlan(SPIPlanPtr *slot, const char *sql, int nargs, const Oid *argtypes)
{
	return KeepPlan(slot, sql, nargs, argtypes, 0);
}

/*
 * PointsPlanKey
 *		PointsPlan for a statement of the per-call path (earn, use, cancel,
 *		the reads): it is planned once, for any parameters (a generic plan).
 *
 * Its parameters are one user's keys, for which one plan is right for all
 * values (an index scan on the key).  Left to choose, the plan cache
 * compared the generic plan's cost with custom plans' and, as those differ
 * with the values (a lot's expires_at against now, an earn's lot insert
 * that a use's custom plan leaves out), went on planning the statement
 * anew on every call: a quarter of the instructions of a use.
 */
SPIPlanPtr
PointsPlanKey(SPIPlanPtr *slot, const char *sql, int nargs, const Oid *argtypes)
{
	return KeepPlan(slot, sql, nargs, argtypes, CURSOR_OPT_GENERIC_PLAN);
}

/*
 * PointsPlanSet
 *		PointsPlan for a set-based statement whose parameters are arrays of
 *		the batch: it is planned anew for each call (a custom plan), with the
 *		arrays' real sizes.  A generic plan guesses ten elements and may pick
 *		a nested loop that, with 2,000 elements on each side, runs for a
 *		second instead of a millisecond.
 */
SPIPlanPtr
PointsPlanSet(SPIPlanPtr *slot, const char *sql, int nargs, const Oid *argtypes)
{
	return KeepPlan(slot, sql, nargs, argtypes, CURSOR_OPT_CUSTOM_PLAN);
}

/*
 * PointsExec
 *		Run a saved plan; any failure is an error.  Returns SPI's result code.
 */
int
PointsExec(SPIPlanPtr plan, Datum *values, const char *nulls, bool read_only,
		   long count)
{
	int			rc = SPI_execute_plan(plan, values, nulls, read_only, count);

	if (rc < 0)
		elog(ERROR, "points: SPI_execute_plan failed: %s",
			 SPI_result_code_string(rc));
	return rc;
}

static int
ExecWithout(SPIPlanPtr plan, Datum *values, const char *nulls,
			bool read_only, long count, bool bitmap_too)
{
	int			nest = NewGUCNestLevel();
	int			rc;

	(void) set_config_option("enable_seqscan", "off", PGC_USERSET, PGC_S_SESSION,
							 GUC_ACTION_SAVE, true, 0, false);
	if (bitmap_too)
		(void) set_config_option("enable_bitmapscan", "off", PGC_USERSET,
								 PGC_S_SESSION, GUC_ACTION_SAVE, true, 0, false);
	rc = PointsExec(plan, values, nulls, read_only, count);
	AtEOXact_GUC(true, nest);
	return rc;
}

/*
 * PointsExecIndexed
 *		PointsExec with enable_seqscan off for this statement only (as a
 *		function's SET clause would do), for the few set-based statements
 *		that name their rows exactly (by ctid or key arrays) and would
 *		otherwise be planned as a scan of the whole table when the
 *		statistics or the cost model misjudge them.  A failure restores the
 *		setting with the (sub)transaction's abort.
 */
int
PointsExecIndexed(SPIPlanPtr plan, Datum *values, const char *nulls,
				  bool read_only, long count)
{
	return ExecWithout(plan, values, nulls, read_only, count, false);
}

/*
 * PointsExecPerKey
 *		PointsExecIndexed with bitmap scans off as well, for a LATERAL
 *		subquery that reads a few rows of each key in index order: the
 *		planner prices a bitmap scan plus a sort per key as cheaper, but it
 *		is half again slower over a thousand keys (expiry: 39 -> 27 ms).
 */
int
PointsExecPerKey(SPIPlanPtr plan, Datum *values, const char *nulls,
				 bool read_only, long count)
{
	return ExecWithout(plan, values, nulls, read_only, count, true);
}

/*
 * PointsGetInt64
 *		Column col (1-based) of result row as int64; 0 when NULL.
 */
int64
PointsGetInt64(int row, int col, bool *isnull)
{
	return PointsGetInt64Of(SPI_tuptable, row, col, isnull);
}

/*
 * PointsGetInt64Of
 *		Column col (1-based) of row of a kept result table; 0 when NULL.
 */
int64
PointsGetInt64Of(SPITupleTable *tab, uint64 row, int col, bool *isnull)
{
	bool		null;
	Datum		d = SPI_getbinval(tab->vals[row], tab->tupdesc, col, &null);

	if (isnull)
		*isnull = null;
	return null ? 0 : DatumGetInt64(d);
}

static void
RaiseNullArgument(FunctionCallInfo fcinfo, const char *name)
{
	ereport(ERROR,
			(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
			 errmsg("%s must not be NULL", name),
			 errhint("%s requires a value for %s.",
					 get_func_name(fcinfo->flinfo->fn_oid), name)));
}

/*
 * PointsArgInt64
 *		A required bigint argument: NULL is SQLSTATE 22004.
 */
int64
PointsArgInt64(FunctionCallInfo fcinfo, int argno, const char *name)
{
	if (PG_ARGISNULL(argno))
		RaiseNullArgument(fcinfo, name);
	return PG_GETARG_INT64(argno);
}

/*
 * PointsArgPositiveInt32
 *		A required int argument that must be > 0 (max_rows, max_lots, ...).
 */
int32
PointsArgPositiveInt32(FunctionCallInfo fcinfo, int argno, const char *name)
{
	int32		v;

	if (PG_ARGISNULL(argno))
		RaiseNullArgument(fcinfo, name);
	v = PG_GETARG_INT32(argno);
	if (v <= 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must be greater than zero, got %d", name, v)));
	return v;
}

/*
 * PointsArgText
 *		An optional text argument of at most max_bytes bytes, not empty;
 *		NULL when absent.
 */
text *
PointsArgText(FunctionCallInfo fcinfo, int argno, const char *name,
			  int max_bytes)
{
	text	   *t;
	int			len;

	if (PG_ARGISNULL(argno))
		return NULL;
	t = PG_GETARG_TEXT_PP(argno);
	len = VARSIZE_ANY_EXHDR(t);
	if (len == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must not be empty", name),
				 errhint("Pass NULL to omit it.")));
	if (len > max_bytes)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s is %d bytes long, at most %d are allowed",
						name, len, max_bytes)));
	return t;
}

/*
 * PointsTimestampPlusSeconds
 *		t + seconds, saturating to 'infinity' instead of overflowing.
 */
TimestampTz
PointsTimestampPlusSeconds(TimestampTz t, int64 seconds)
{
	int64		us;
	TimestampTz r;

	if (TIMESTAMP_NOT_FINITE(t))
		return t;
	if (pg_mul_s64_overflow(seconds, USECS_PER_SEC, &us) ||
		pg_add_s64_overflow(t, us, &r) || !IS_VALID_TIMESTAMP(r))
		return seconds > 0 ? DT_NOEND : DT_NOBEGIN;
	return r;
}

/*
 * PointsTimestampPlusInterval
 *		t + sign * iv (sign 1 or -1), for an interval argument called name:
 *		a negative interval is SQLSTATE 22023; one past the end of time gives
 *		+/-infinity.
 */
TimestampTz
PointsTimestampPlusInterval(TimestampTz t, Interval *iv, const char *name, int sign)
{
	/* an estimate in days is enough to tell the sign and the size */
	double		days = iv->month * (double) DAYS_PER_MONTH + iv->day +
		(double) iv->time / USECS_PER_DAY;

	if (days < 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must not be negative, got %s", name,
						DatumGetCString(DirectFunctionCall1(interval_out,
															IntervalPGetDatum(iv))))));
	if (days > 100000.0 * DAYS_PER_YEAR)
		return sign > 0 ? DT_NOEND : DT_NOBEGIN;
	return DatumGetTimestampTz(DirectFunctionCall2(sign > 0 ? timestamptz_pl_interval :
												   timestamptz_mi_interval,
												   TimestampTzGetDatum(t),
												   IntervalPGetDatum(iv)));
}

/*
 * PointsValuesToComposite
 *		A row of the function's composite result type, made in memory
 *		context outer from natts values and nulls.
 */
Datum
PointsValuesToComposite(FunctionCallInfo fcinfo, MemoryContext outer,
						Datum *values, bool *nulls, int natts)
{
	TupleDesc	resdesc;
	HeapTuple	result;
	MemoryContext old;

	if (get_call_result_type(fcinfo, NULL, &resdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "points: function must return a composite type");
	if (resdesc->natts != natts)
		elog(ERROR, "points: result has %d columns, expected %d",
			 natts, resdesc->natts);
	old = MemoryContextSwitchTo(outer);
	resdesc = BlessTupleDesc(resdesc);
	result = heap_form_tuple(resdesc, values, nulls);
	MemoryContextSwitchTo(old);
	return HeapTupleGetDatum(result);
}

/*
 * PointsRowToComposite
 *		Row row of the last SPI result as the function's composite result.
 */
Datum
PointsRowToComposite(FunctionCallInfo fcinfo, MemoryContext outer, int row)
{
	TupleDesc	spidesc = SPI_tuptable->tupdesc;
	Datum	   *values = palloc(sizeof(Datum) * spidesc->natts);
	bool	   *nulls = palloc(sizeof(bool) * spidesc->natts);

	heap_deform_tuple(SPI_tuptable->vals[row], spidesc, values, nulls);
	return PointsValuesToComposite(fcinfo, outer, values, nulls, spidesc->natts);
}

/*
 * PointsReturnRows
 *		Return every row of the last SPI result as the function's result set
 *		(materialize mode).  The rows' columns must match the result type's.
 */
void
PointsReturnRows(FunctionCallInfo fcinfo)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	TupleDesc	spidesc = SPI_tuptable->tupdesc;
	Datum	   *values;
	bool	   *nulls;
	uint64		i;

	InitMaterializedSRF(fcinfo, 0);
	values = palloc(sizeof(Datum) * spidesc->natts);
	nulls = palloc(sizeof(bool) * spidesc->natts);
	if (rsinfo->setDesc->natts != spidesc->natts)
		elog(ERROR, "points: result has %d columns, expected %d",
			 spidesc->natts, rsinfo->setDesc->natts);
	for (i = 0; i < SPI_processed; i++)
	{
		heap_deform_tuple(SPI_tuptable->vals[i], spidesc, values, nulls);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
}
