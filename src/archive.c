/*-------------------------------------------------------------------------
 *
 * archive.c
 *	  points.archive: move ledger rows older than points.archive_after from
 *	  points.ledger to points.ledger_archive.
 *
 * Ledger rows are immutable and no API call locks them, so moving them
 * takes no user lock and never blocks earn or use.  Each row moves in one
 * statement (DELETE ... RETURNING feeding INSERT), so every reader sees it
 * in exactly one of the two tables; history, verify, cancel and the
 * idempotency check read both.  The rows are not locked first (FOR UPDATE
 * would write a lock record for every row the statement then deletes, a
 * third of archiving's WAL): a second archive call that picked the same
 * rows waits for the first, finds them gone and moves only what it did
 * delete (RETURNING yields nothing else), so no row is moved twice; it may
 * then return less than there is to do, and the next call goes on.
 * Finished queued-earn requests (points.request) older than the same
 * cutoff are deleted too: points.request answers for them that long.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "utils/timestamp.h"

#include "points.h"

PG_FUNCTION_INFO_V1(points_archive);

static SPIPlanPtr plan_archive;
static SPIPlanPtr plan_requests;

/*
 * points_archive
 *		points.archive(max_rows): archive at most max_rows old ledger rows;
 *		returns how many were moved.
 */
static Datum
ArchiveImpl(PG_FUNCTION_ARGS)
{
	int32		max_rows = PointsArgPositiveInt32(fcinfo, 0, "max_rows");
	TimestampTz cutoff = PointsTimestampPlusSeconds(GetCurrentTimestamp(),
													-(int64) points_archive_after);
	static const Oid types[2] = {TIMESTAMPTZOID, INT4OID};
	Datum		values[2];
	uint64		moved;

	values[0] = TimestampTzGetDatum(cutoff);
	values[1] = Int32GetDatum(max_rows);
	SPI_connect();
	PointsPlan(&plan_archive,
			   "WITH m AS ("
			   "  DELETE FROM points.ledger g WHERE g.tx_id IN ("
			   "    SELECT tx_id FROM points.ledger WHERE created_at < $1"
			   "    LIMIT $2)"
			   "  RETURNING g.*)"
			   " INSERT INTO points.ledger_archive"
			   " (tx_id, user_id, user_seq, kind, amount, balance_after,"
			   "  idempotency_key, cancels_tx, reason, metadata, created_at)"
			   " SELECT tx_id, user_id, user_seq, kind, amount, balance_after,"
			   "  idempotency_key, cancels_tx, reason, metadata, created_at FROM m",
			   2, types);
	PointsExec(plan_archive, values, NULL, false, 0);
	moved = SPI_processed;

	/* finished queued-earn requests are kept as long as ledger rows */
	PointsPlan(&plan_requests,
			   "DELETE FROM points.request WHERE request_id IN ("
			   "  SELECT request_id FROM points.request"
			   "  WHERE state <> 'queued' AND applied_at < $1"
			   "  LIMIT $2)",
			   2, types);
	PointsExec(plan_requests, values, NULL, false, 0);
	SPI_finish();
	PG_RETURN_INT64((int64) moved);
}

/*
 * points_archive
 *		The SQL entry point: ArchiveImpl, counted in points.stats().
 */
Datum
points_archive(PG_FUNCTION_ARGS)
{
	return PointsCounted(POINTS_OP_ARCHIVE, ArchiveImpl, fcinfo);
}
