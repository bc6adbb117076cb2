/*-------------------------------------------------------------------------
 *
 * monitor.c
 *	  Anomaly alerts and the daily rollup, both built from the ledger rows
 *	  written since the last look: points.detect_anomalies() (run by the
 *	  worker, or by pg_cron), points.alerts() and points.daily().
 *
 * Words:
 *	  settled - a tx_id whose transaction has ended (committed or rolled
 *	            back), so no row with that id can appear later
 *	  scan    - the row of points.scan_state: every ledger row with
 *	            tx_id <= done_upto has been looked at; pending_upto is the
 *	            highest tx_id given out when the last look began, and it is
 *	            settled once every transaction older than pending_xmax ended
 *
 * tx_ids are not committed in id order, so "rows after the last id seen"
 * could skip a row committed late.  Every writer locks its account row
 * (which gives it an xid) before it takes a tx_id; so reading the
 * sequence, then taking a snapshot, gives an xmax above the xid of every
 * transaction that holds an id <= that sequence value.  When the oldest
 * running xid has passed that xmax, those ids are settled, and the rows
 * up to them are read exactly once.  A row is looked at one or two runs
 * after its commit: incremental, never a rescan.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "utils/builtins.h"
#include "utils/date.h"
#include "utils/timestamp.h"

#include "points.h"

PG_FUNCTION_INFO_V1(points_detect_anomalies);
PG_FUNCTION_INFO_V1(points_alerts);
PG_FUNCTION_INFO_V1(points_daily);

/* rows looked at per run at most; the rest waits for the next run */
#define MONITOR_MAX_ROWS	200000

extern int	points_alert_amount;
extern int	points_alert_uses_per_minute;
extern int	points_alert_cancels_per_hour;

static SPIPlanPtr plan_scan_state;
static SPIPlanPtr plan_seq;
static SPIPlanPtr plan_xmax;
static SPIPlanPtr plan_new_rows;
static SPIPlanPtr plan_save_state;
static SPIPlanPtr plan_alerts;
static SPIPlanPtr plan_daily;

/*
 * The statement that looks at the new rows: the ledger rows (live or
 * archived) with $1 < tx_id <= $2, at most $3 of them.  It feeds the
 * rollup and the three alert rules ($4 .. $6 their thresholds, 0 = off),
 * raises each alert at most once per user, rule and window, sends each new
 * alert as a NOTIFY, and returns the highest tx_id looked at, how many rows
 * it looked at and how many alerts it raised.
 */
#define NEW_ROWS_SQL \
	"WITH n AS (" \
	"  SELECT * FROM (" \
	"    SELECT tx_id, user_id, kind, amount, created_at FROM points.ledger" \
	"    WHERE tx_id > $1 AND tx_id <= $2" \
	"    UNION ALL" \
	"    SELECT tx_id, user_id, kind, amount, created_at FROM points.ledger_archive" \
	"    WHERE tx_id > $1 AND tx_id <= $2) x" \
	"  ORDER BY tx_id LIMIT $3)," \
	" roll AS (" \
	"  INSERT INTO points.daily_rollup AS r (day, kind, transactions, points)" \
	"  SELECT (created_at AT TIME ZONE 'UTC')::date, kind, count(*), sum(amount)" \
	"  FROM n GROUP BY 1, 2" \
	"  ON CONFLICT (day, kind) DO UPDATE" \
	"  SET transactions = r.transactions + excluded.transactions," \
	"      points = r.points + excluded.points)," \
	" roll_users AS (" \
	"  INSERT INTO points.daily_user (day, kind, user_id)" \
	"  SELECT DISTINCT (created_at AT TIME ZONE 'UTC')::date, kind, user_id FROM n" \
	"  ON CONFLICT DO NOTHING)," \
	" hits AS (" \
	"  SELECT n.user_id, 'large_amount' AS rule, abs(n.amount) AS observed," \
	"         $4::int8 AS threshold, n.tx_id, date_trunc('hour', n.created_at) AS window_start" \
	"  FROM n WHERE $4 > 0 AND n.kind IN ('earn', 'use') AND abs(n.amount) >= $4" \
	"  UNION ALL" \
	"  SELECT n.user_id, 'use_burst', c.uses, $5, n.tx_id, date_trunc('minute', n.created_at)" \
	"  FROM n, LATERAL (" \
	"    SELECT count(*) AS uses FROM (" \
	"      SELECT 1 FROM points.ledger g WHERE g.user_id = n.user_id AND g.kind = 'use'" \
	"      AND g.created_at > n.created_at - interval '1 minute' AND g.created_at <= n.created_at" \
	"      UNION ALL" \
	"      SELECT 1 FROM points.ledger_archive g WHERE g.user_id = n.user_id AND g.kind = 'use'" \
	"      AND g.created_at > n.created_at - interval '1 minute' AND g.created_at <= n.created_at) w) c" \
	"  WHERE $5 > 0 AND n.kind = 'use' AND c.uses > $5" \
	"  UNION ALL" \
	"  SELECT n.user_id, 'cancel_burst', c.cancels, $6, n.tx_id, date_trunc('hour', n.created_at)" \
	"  FROM n, LATERAL (" \
	"    SELECT count(*) AS cancels FROM (" \
	"      SELECT 1 FROM points.ledger g WHERE g.user_id = n.user_id" \
	"      AND g.kind IN ('earn_cancel', 'use_cancel')" \
	"      AND g.created_at > n.created_at - interval '1 hour' AND g.created_at <= n.created_at" \
	"      UNION ALL" \
	"      SELECT 1 FROM points.ledger_archive g WHERE g.user_id = n.user_id" \
	"      AND g.kind IN ('earn_cancel', 'use_cancel')" \
	"      AND g.created_at > n.created_at - interval '1 hour' AND g.created_at <= n.created_at) w) c" \
	"  WHERE $6 > 0 AND n.kind IN ('earn_cancel', 'use_cancel') AND c.cancels > $6)," \
	" raised AS (" \
	"  INSERT INTO points.alert (user_id, rule, observed, threshold, tx_id, raised_at, window_start)" \
	"  SELECT DISTINCT ON (user_id, rule, window_start)" \
	"         user_id, rule, observed, threshold, tx_id, now(), window_start" \
	"  FROM hits ORDER BY user_id, rule, window_start, tx_id" \
	"  ON CONFLICT (user_id, rule, window_start) DO NOTHING" \
	"  RETURNING alert_id, user_id, rule, observed, threshold, tx_id, raised_at)," \
	" sent AS (" \
	"  SELECT pg_notify('points_alert', row_to_json(raised)::text) FROM raised)" \
	" SELECT (SELECT max(tx_id) FROM n), (SELECT count(*) FROM n)," \
	"        (SELECT count(*) FROM sent)"

/*
 * points_detect_anomalies
 *		points.detect_anomalies(): look at the ledger rows settled since the
 *		last run: raise alerts and bring the daily rollup up to date.
 *		Returns how many alerts it raised.
 */
Datum
points_detect_anomalies(PG_FUNCTION_ARGS)
{
	static const Oid new_types[6] = {INT8OID, INT8OID, INT4OID, INT8OID, INT8OID, INT8OID};
	static const Oid save_types[3] = {INT8OID, INT8OID, TEXTOID};
	static const Oid seq_types[1] = {INT8OID};
	Datum		values[6];
	char		nulls[3] = "   ";
	int64		done;
	int64		pending;
	bool		pending_null;
	bool		settled;
	int64		raised = 0;
	char	   *xmax;

	SPI_connect();

	/* one run at a time: the row lock serializes concurrent callers */
	PointsPlan(&plan_scan_state,
			   "SELECT done_upto, pending_upto,"
			   "       (pending_xmax IS NOT NULL"
			   "        AND pg_snapshot_xmin(pg_current_snapshot()) >= pending_xmax)::int4::int8"
			   " FROM points.scan_state FOR UPDATE",
			   0, NULL);
	PointsExec(plan_scan_state, NULL, NULL, false, 1);
	if (SPI_processed != 1)
		elog(ERROR, "points: points.scan_state is missing its row");
	done = PointsGetInt64(0, 1, NULL);
	pending = PointsGetInt64(0, 2, &pending_null);
	settled = !pending_null && PointsGetInt64(0, 3, NULL) != 0;

	if (settled && pending > done)
	{
		values[0] = Int64GetDatum(done);
		values[1] = Int64GetDatum(pending);
		values[2] = Int32GetDatum(MONITOR_MAX_ROWS);
		values[3] = Int64GetDatum((int64) points_alert_amount);
		values[4] = Int64GetDatum((int64) points_alert_uses_per_minute);
		values[5] = Int64GetDatum((int64) points_alert_cancels_per_hour);
		PointsPlan(&plan_new_rows, NEW_ROWS_SQL, 6, new_types);
		PointsExec(plan_new_rows, values, NULL, false, 0);
		raised = PointsGetInt64(0, 3, NULL);
		/* a full batch may have left rows of the range for the next run */
		if (PointsGetInt64(0, 2, NULL) < MONITOR_MAX_ROWS)
			done = pending;
		else
			done = PointsGetInt64(0, 1, NULL);
	}
	else if (settled)
		done = pending;

	xmax = NULL;
	if (pending_null || done >= pending)
	{
		/* the next range: ids given out so far, settled once older xids end */
		values[0] = Int64GetDatum((int64) points_node_id);
		PointsPlan(&plan_seq,
				   "SELECT ($1 << 40) + CASE WHEN is_called THEN last_value ELSE 0 END"
				   " FROM points.tx_seq",
				   1, seq_types);
		PointsExec(plan_seq, values, NULL, false, 1);
		pending = Max(PointsGetInt64(0, 1, NULL), done);
		/* a later statement, so a later snapshot than the sequence read */
		PointsPlan(&plan_xmax, "SELECT pg_snapshot_xmax(pg_current_snapshot())::text",
				   0, NULL);
		PointsExec(plan_xmax, NULL, NULL, false, 1);
		xmax = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
	}

	values[0] = Int64GetDatum(done);
	values[1] = Int64GetDatum(pending);
	values[2] = xmax ? CStringGetTextDatum(xmax) : (Datum) 0;
	nulls[2] = xmax ? ' ' : 'n';
	PointsPlan(&plan_save_state,
			   "UPDATE points.scan_state SET done_upto = $1, pending_upto = $2,"
			   " pending_xmax = coalesce($3::xid8, pending_xmax), last_run = now()",
			   3, save_types);
	PointsExec(plan_save_state, values, nulls, false, 0);
	SPI_finish();
	PG_RETURN_INT64(raised);
}

/*
 * points_alerts
 *		points.alerts(since): alerts raised within the interval, newest first.
 */
Datum
points_alerts(PG_FUNCTION_ARGS)
{
	static const Oid types[1] = {TIMESTAMPTZOID};
	Datum		values[1];
	Interval   *since;

	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("since must not be NULL"),
				 errhint("Omit it for the default of 1 day.")));
	since = PG_GETARG_INTERVAL_P(0);
	values[0] = TimestampTzGetDatum(PointsTimestampPlusInterval(GetCurrentTimestamp(),
																since, "since", -1));
	SPI_connect();
	PointsPlan(&plan_alerts,
			   "SELECT alert_id, user_id, rule, observed, threshold, tx_id, raised_at"
			   " FROM points.alert WHERE raised_at >= $1"
			   " ORDER BY raised_at DESC, alert_id DESC",
			   1, types);
	PointsExec(plan_alerts, values, NULL, true, 0);
	PointsReturnRows(fcinfo);
	SPI_finish();
	return (Datum) 0;
}

/*
 * points_daily
 *		points.daily(from_day, to_day): per UTC day and kind, from the
 *		rollup; archived rows included, no scan of the ledger.
 */
Datum
points_daily(PG_FUNCTION_ARGS)
{
	static const Oid types[2] = {DATEOID, DATEOID};
	Datum		values[2];

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("%s must not be NULL", PG_ARGISNULL(0) ? "from_day" : "to_day")));
	if (DatumGetDateADT(PG_GETARG_DATUM(0)) > DatumGetDateADT(PG_GETARG_DATUM(1)))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("from_day %s is after to_day %s",
						DatumGetCString(DirectFunctionCall1(date_out, PG_GETARG_DATUM(0))),
						DatumGetCString(DirectFunctionCall1(date_out, PG_GETARG_DATUM(1))))));
	values[0] = PG_GETARG_DATUM(0);
	values[1] = PG_GETARG_DATUM(1);
	SPI_connect();
	PointsPlan(&plan_daily,
			   "SELECT r.day, r.kind, r.transactions, r.points::int8,"
			   "       (SELECT count(*) FROM points.daily_user u"
			   "        WHERE u.day = r.day AND u.kind = r.kind)"
			   " FROM points.daily_rollup r WHERE r.day BETWEEN $1 AND $2"
			   " ORDER BY r.day, r.kind",
			   2, types);
	PointsExec(plan_daily, values, NULL, true, 0);
	PointsReturnRows(fcinfo);
	SPI_finish();
	return (Datum) 0;
}
