/*-------------------------------------------------------------------------
 *
 * queue.c
 *	  Queued earns: points.earn_async records a request without locking
 *	  the user; points.apply_queued (the worker, or pg_cron) applies queued
 *	  requests in set-based batches; points.request tells a request's fate.
 *
 * Words:
 *	  request - a row of points.request: 'queued', then 'applied' (with the
 *	            tx_id of its earn) or 'rejected' (with the error's message)
 *	  batch   - one apply_queued call: one transaction, at most
 *	            POINTS_BATCH_MAX_USERS users, at most max_requests requests
 *
 * A batch takes each user's lock only if it is free (a busy user's requests
 * wait for a later batch), so it never waits for a caller.  Under the locks
 * it reads the users' queued requests in request_id order with a fresh
 * snapshot, decides each one in memory (idempotency key, expiry, overflow),
 * writes every earn with one statement (batch.c) and marks the requests
 * with one more.  Only the holder of a user's lock applies that user's
 * requests, and the marking only touches rows still 'queued', so a request
 * is applied at most once even with concurrent batches or after a crash
 * (a batch is one transaction: all of it, or nothing).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/genam.h"
#include "access/htup_details.h"
#include "access/stratnum.h"
#include "access/table.h"
#include "access/xact.h"
#include "catalog/index.h"
#include "catalog/namespace.h"
#include "catalog/pg_class.h"
#include "catalog/pg_type.h"
#include "common/int.h"
#include "parser/parse_relation.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/hsearch.h"
#include "utils/lsyscache.h"
#include "storage/lmgr.h"
#include "utils/memutils.h"
#include "utils/syscache.h"
#include "utils/timestamp.h"

#include "points.h"

PG_FUNCTION_INFO_V1(points_earn_async);
PG_FUNCTION_INFO_V1(points_request);
PG_FUNCTION_INFO_V1(points_apply_queued);

static SPIPlanPtr plan_enqueue;
static SPIPlanPtr plan_request;
static SPIPlanPtr plan_queued_users;
static SPIPlanPtr plan_requests;
static SPIPlanPtr plan_keys;
static SPIPlanPtr plan_mark;

/*
 * Where this backend's next batch starts looking for queued requests (see
 * PointsHint): the requests a batch marks stay in request_queued_idx as
 * dead entries until vacuum.  A lower request_id still queued (a user that
 * was busy, a caller that committed late, a batch that rolled back) is
 * found by the next search from the beginning.
 */
static PointsHint queue_hint;

/*
 * points_earn_async
 *		points.earn_async(...): queue an earn; returns its request_id.
 *		Checks its arguments like points.earn and takes no lock.
 */
static Datum
EarnAsyncImpl(PG_FUNCTION_ARGS)
{
	TimestampTz now = GetCurrentTimestamp();
	PointsEarnRequest req;
	static const Oid types[8] = {
		INT8OID, INT8OID, INT8OID, TEXTOID, TIMESTAMPTZOID, TEXTOID, JSONBOID,
		TIMESTAMPTZOID
	};
	Datum		values[8];
	char		nulls[8] = "        ";
	int64		request_id;

	PointsEarnArgs(fcinfo, now, &req);
	PointsEarnCheckExpiry(&req, now);

	values[0] = Int64GetDatum((int64) points_node_id);
	values[1] = Int64GetDatum(req.user_id);
	values[2] = Int64GetDatum(req.amount);
	values[3] = PointerGetDatum(req.key);
	nulls[3] = req.key ? ' ' : 'n';
	values[4] = TimestampTzGetDatum(req.expires_at);
	values[5] = PointerGetDatum(req.reason);
	nulls[5] = req.reason ? ' ' : 'n';
	values[6] = req.metadata;
	nulls[6] = req.metadata_null ? 'n' : ' ';
	values[7] = TimestampTzGetDatum(now);

	SPI_connect();
	PointsPlanKey(&plan_enqueue,
				  "INSERT INTO points.request (request_id, user_id, amount,"
				  "  idempotency_key, expires_at, reason, metadata, queued_at)"
				  " VALUES (($1 << 40) + nextval('points.request_seq'::regclass),"
				  "         $2, $3, $4, $5, $6, $7, $8)"
				  " RETURNING request_id",
				  8, types);
	PointsExec(plan_enqueue, values, nulls, false, 1);
	request_id = PointsGetInt64(0, 1, NULL);
	SPI_finish();
	points_call_points = req.amount;
	PointsNoteQueued();			/* wake the worker when this commits */
	PG_RETURN_INT64(request_id);
}

/*
 * points_earn_async
 *		The SQL entry point: EarnAsyncImpl, counted in points.stats().
 */
Datum
points_earn_async(PG_FUNCTION_ARGS)
{
	return PointsCounted(POINTS_OP_EARN_ASYNC, EarnAsyncImpl, fcinfo);
}

/*
 * points_request
 *		points.request(request_id): the request's state; no row if unknown.
 */
Datum
points_request(PG_FUNCTION_ARGS)
{
	static const Oid types[1] = {INT8OID};
	Datum		values[1];

	values[0] = Int64GetDatum(PointsArgInt64(fcinfo, 0, "request_id"));
	SPI_connect();
	PointsPlanKey(&plan_request,
				  "SELECT request_id, user_id, state, tx_id, error, queued_at, applied_at"
				  " FROM points.request WHERE request_id = $1",
				  1, types);
	PointsExec(plan_request, values, NULL, true, 0);
	PointsReturnRows(fcinfo);
	SPI_finish();
	return (Datum) 0;
}

/* an idempotency key seen in this batch or before: what it resolves to */
typedef struct KeyEntry
{
	int64		user_id;		/* hash key: user_id + key text */
	char		key[POINTS_MAX_KEY_BYTES + 1];
	int64		tx_id;			/* the transaction, or 0 while in the batch */
	int			batch_ord;		/* 1-based position in the batch, or 0 */
	bool		is_earn;
	int64		amount;
	char		kind[16];
} KeyEntry;

static KeyEntry *
KeyLookup(HTAB *keys, int64 user_id, text *key, bool *found)
{
	KeyEntry	probe;
	int			len = VARSIZE_ANY_EXHDR(key);

	memset(&probe, 0, offsetof(KeyEntry, tx_id));
	probe.user_id = user_id;
	memcpy(probe.key, VARDATA_ANY(key), Min(len, POINTS_MAX_KEY_BYTES));
	return hash_search(keys, &probe, HASH_ENTER, found);
}

/*
 * Statistics taken while the queue was (nearly) empty make the planner
 * believe request_queued_idx holds no entries: the per-user fetch then
 * walks the whole queue once per user through it, 7 s a batch with a
 * campaign of a million queued, until autovacuum's next ANALYZE (up to a
 * minute, autovacuum_naptime, later).  A batch that sees at least
 * QUEUE_STALE_MIN_USERS users while the index is believed to hold fewer
 * entries than that analyzes points.request first (a sample, ~0.1 s), at
 * most once per QUEUE_ANALYZE_EVERY_MS in a session.
 */
#define QUEUE_STALE_MIN_USERS	100
#define QUEUE_ANALYZE_EVERY_MS	10000

static TimestampTz queue_analyzed_at = 0;

static bool
RequestStatsStale(double users_seen)
{
	Oid			idx = PointsRelid("request_queued_idx");
	HeapTuple	tup;
	float4		reltuples;
	TimestampTz now = GetCurrentTimestamp();

	/*
	 * Not in a caller's transaction block (it would hold the ANALYZE's lock
	 * until its commit, and the worker's next ANALYZE would wait for it).
	 */
	if (IsTransactionBlock() ||
		now < TimestampTzPlusMilliseconds(queue_analyzed_at, QUEUE_ANALYZE_EVERY_MS))
		return false;
	tup = SearchSysCache1(RELOID, ObjectIdGetDatum(idx));
	if (!HeapTupleIsValid(tup))
		return false;
	reltuples = ((Form_pg_class) GETSTRUCT(tup))->reltuples;
	ReleaseSysCache(tup);
	if (reltuples < 0 || reltuples >= users_seen)
		return false;			/* never analyzed (planner guesses), or fine */
	queue_analyzed_at = now;

	/* never wait for another ANALYZE or VACUUM of the table: skip instead */
	return ConditionalLockRelationOid(IndexGetRelation(idx, false),
									  ShareUpdateExclusiveLock);
}

/* the predicate of request_queued_idx (state = 'queued'), on a version */
static bool
RequestQueued(TupleTableSlot *slot, void *arg)
{
	bool		isnull;
	Datum		state = slot_getattr(slot, *(AttrNumber *) arg, &isnull);
	text	   *t;

	if (isnull)
		return false;
	t = DatumGetTextPP(state);
	return VARSIZE_ANY_EXHDR(t) == 6 && memcmp(VARDATA_ANY(t), "queued", 6) == 0;
}

/*
 * FindQueuedUsers
 *		The users of the oldest queued requests from the hint on (below), in
 *		the order of their oldest, at most POINTS_BATCH_MAX_USERS + 1 of
 *		them among the first max_requests requests; *min_id gets each one's
 *		oldest request_id.  Read directly from request_queued_idx where it
 *		is valid: the search stops at the last user it needs.  Returns how
 *		many.
 */
static uint64
FindQueuedUsers(int32 max_requests, int64 **users, int64 **min_id)
{
	static const Oid t_users[3] = {INT4OID, INT4OID, INT8OID};
	static const char *const cols[] = {"request_id", NULL};
	Oid			relid = PointsRelid("request");
	Relation	request = table_open(relid, AccessShareLock);
	Relation	index = PointsOpenIndex(request, "request_queued_idx", cols);
	int			max_users = POINTS_BATCH_MAX_USERS + 1;
	uint64		n = 0;

	*users = palloc(sizeof(int64) * (max_users + 1));
	*min_id = palloc(sizeof(int64) * (max_users + 1));
	if (index)
	{
		AttrNumber	a_state = attnameAttNum(request, "state", false);

		n = PointsFirstUsers(request, index, NULL, 0, F_INT8GE, &queue_hint,
							 RequestQueued, &a_state,
							 attnameAttNum(request, "user_id", false),
							 attnameAttNum(request, "request_id", false),
							 max_requests, max_users, *users, *min_id);
		index_close(index, NoLock);
	}
	else
	{
		Datum		values[3];
		int64		from = 0;

		if (!PointsHintUse(&queue_hint, &from))
			from = 0;
		values[0] = Int32GetDatum(max_requests);
		values[1] = Int32GetDatum(max_users);
		values[2] = Int64GetDatum(from);
		PointsPlan(&plan_queued_users,
				   "SELECT user_id, min(request_id) FROM ("
				   "  SELECT user_id, request_id FROM points.request"
				   "  WHERE state = 'queued' AND request_id >= $3"
				   "  ORDER BY request_id LIMIT $1) q"
				   " GROUP BY user_id ORDER BY min(request_id) LIMIT $2",
				   3, t_users);
		PointsExec(plan_queued_users, values, NULL, false, 0);
		if (SPI_processed == 0 && from > 0)
		{
			/* past the hint nothing: look once from the start */
			PointsHintMissed(&queue_hint);
			values[2] = Int64GetDatum(0);
			PointsExec(plan_queued_users, values, NULL, false, 0);
		}
		for (n = 0; n < SPI_processed; n++)
		{
			(*users)[n] = PointsGetInt64(n, 1, NULL);
			(*min_id)[n] = PointsGetInt64(n, 2, NULL);
		}
	}
	table_close(request, NoLock);
	return n;
}

/*
 * MarkRequests
 *		Record each of the n requests read (at tid[i], under its user's
 *		lock) as applied with its tx_id or rejected with its error.
 *		Directly (bulk.c) unless the request table has triggers or rules;
 *		then by one UPDATE by primary key.
 */
static void
MarkRequests(int n, int64 *id, ItemPointerData *tid, Datum *state, int64 *tx,
			 bool *tx_null, Datum *error, bool *error_null, TimestampTz now)
{
	static const char *const columns[4] = {"state", "tx_id", "error", "applied_at"};
	static const Oid t_mark[5] = {INT8ARRAYOID, TEXTARRAYOID, INT8ARRAYOID,
	TEXTARRAYOID, TIMESTAMPTZOID};
	Oid			relid = PointsRelid("request");
	PointsBulk *bulk = palloc(sizeof(PointsBulk));
	Datum		values[5];
	Datum	   *d;
	int			dims[1] = {n};
	int			lbs[1] = {1};
	bool		usable;

	PointsBulkBegin(bulk, &relid, 1);
	usable = PointsBulkUsable(bulk);
	if (usable)
		for (int r = 0; r < n; r++)
		{
			Datum		v[4];
			bool		nulls[4] = {false, tx_null[r], error_null[r], false};

			v[0] = state[r];
			v[1] = Int64GetDatum(tx[r]);
			v[2] = error[r];
			v[3] = TimestampTzGetDatum(now);
			PointsBulkUpdate(bulk, 0, &tid[r], 4, columns, v, nulls);
		}
	PointsBulkEnd(bulk);
	pfree(bulk);
	if (usable)
		return;

	d = palloc(sizeof(Datum) * n);
	for (int r = 0; r < n; r++)
		d[r] = Int64GetDatum(id[r]);
	values[0] = PointerGetDatum(construct_array(d, n, INT8OID, 8, true, TYPALIGN_DOUBLE));
	values[1] = PointerGetDatum(construct_array(state, n, TEXTOID, -1, false, TYPALIGN_INT));
	d = palloc(sizeof(Datum) * n);
	for (int r = 0; r < n; r++)
		d[r] = Int64GetDatum(tx[r]);
	values[2] = PointerGetDatum(construct_md_array(d, tx_null, 1, dims, lbs,
												   INT8OID, 8, true, TYPALIGN_DOUBLE));
	values[3] = PointerGetDatum(construct_md_array(error, error_null, 1, dims, lbs,
												   TEXTOID, -1, false, TYPALIGN_INT));
	values[4] = TimestampTzGetDatum(now);

	/*
	 * By primary key.  "Still queued" is asked as applied_at IS NULL (set
	 * by this statement only, with the state): a test of state itself
	 * would match the partial indexes' predicate and let the planner walk
	 * the whole queue through one of them.
	 */
	PointsPlanSet(&plan_mark,
			   "UPDATE points.request r"
			   " SET state = x.state, tx_id = x.tx_id, error = x.error, applied_at = $5"
			   " FROM unnest($1, $2, $3, $4) x(request_id, state, tx_id, error)"
			   " WHERE r.request_id = ANY($1) AND r.request_id = x.request_id"
			   "   AND r.applied_at IS NULL",
			   5, t_mark);
	PointsExecIndexed(plan_mark, values, NULL, false, 0);
	if (SPI_processed != (uint64) n)
		elog(ERROR, "points: %llu of %d queued requests could be marked",
			 (unsigned long long) SPI_processed, n);
}

/*
 * points_apply_queued
 *		points.apply_queued(max_requests): apply or reject at most
 *		max_requests queued requests now; returns how many.
 */
Datum
points_apply_queued(PG_FUNCTION_ARGS)
{
	int32		max_requests = PointsArgPositiveInt32(fcinfo, 0, "max_requests");
	TimestampTz now = GetCurrentTimestamp();
	static const Oid t_reqs[2] = {INT8ARRAYOID, INT4OID};
	static const Oid t_keys[2] = {INT8ARRAYOID, TEXTARRAYOID};
	Datum		values[3];
	PointsAccountSet set;
	uint64		ncand;
	int64	   *cand_user;
	int64	   *cand_min;
	bool	   *cand_got;
	int64		next_from = PG_INT64_MAX;
	int			nreq;
	int64	   *req_id;
	int64	   *req_user;
	Datum	   *req_state;
	int64	   *req_tx;
	int		   *req_ord;
	int		   *req_conflict;	/* PT002 against this batch position */
	text	  **req_key;
	Datum	   *req_error;
	bool	   *req_error_null;
	bool	   *req_tx_null;
	ItemPointerData *req_tid;	/* the version read */
	MemoryContext outer = NULL;
	PointsTxBatch batch = {0};
	HASHCTL		hctl;
	HTAB	   *keys;
	uint64		i;
	int			r;

	SPI_connect();

	/* the users of the oldest queued requests; take those that are free */
	ncand = FindQueuedUsers(max_requests, &cand_user, &cand_min);
	if (ncand >= QUEUE_STALE_MIN_USERS && RequestStatsStale((double) ncand))
	{
		/* plan the rest of this batch (and the next ones) on fresh numbers */
		if (SPI_execute("ANALYZE points.request", false, 0) < 0)
			elog(ERROR, "points: could not analyze points.request");
	}
	cand_got = palloc(sizeof(bool) * (ncand + 1));	/* set by PointsLockBatchUsers */
	if (!PointsLockBatchUsers(true, now, cand_user, ncand, POINTS_BATCH_MAX_USERS,
							  cand_got, &set))
	{
		SPI_finish();
		PG_RETURN_INT64(0);
	}

	/* their queued requests, oldest first, read now that we hold the users */
	values[0] = set.users;
	values[1] = Int32GetDatum(max_requests);
	PointsPlanSet(&plan_requests,
			   "SELECT r.request_id, r.user_id, r.amount, r.idempotency_key,"
			   "       r.expires_at, r.reason, r.metadata, r.tid"
			   " FROM unnest($1) u(user_id),"
			   "      LATERAL (SELECT r.*, r.ctid AS tid FROM points.request r"
			   "               WHERE r.user_id = u.user_id AND r.state = 'queued'"
			   "               ORDER BY r.user_id, r.request_id LIMIT $2) r"
			   " ORDER BY r.request_id LIMIT $2",
			   2, t_reqs);
	PointsExec(plan_requests, values, NULL, false, 0);
	nreq = (int) SPI_processed;
	if (nreq == 0)
	{
		SPI_finish();
		PG_RETURN_INT64(0);
	}

	{
		SPITupleTable *reqs = SPI_tuptable;
		Datum	   *kuser = palloc(sizeof(Datum) * nreq);
		Datum	   *kkey = palloc(sizeof(Datum) * nreq);
		int			nkeys = 0;

		req_id = palloc(sizeof(int64) * nreq);
		req_user = palloc(sizeof(int64) * nreq);
		req_state = palloc(sizeof(Datum) * nreq);
		req_tx = palloc0(sizeof(int64) * nreq);
		req_ord = palloc0(sizeof(int) * nreq);
		req_conflict = palloc0(sizeof(int) * nreq);
		req_key = palloc0(sizeof(text *) * nreq);
		req_error = palloc(sizeof(Datum) * nreq);
		req_error_null = palloc(sizeof(bool) * nreq);
		req_tx_null = palloc(sizeof(bool) * nreq);
		req_tid = palloc(sizeof(ItemPointerData) * nreq);

		/* the keys these requests use, as the ledger already has them */
		for (r = 0; r < nreq; r++)
		{
			bool		isnull;
			Datum		k = SPI_getbinval(reqs->vals[r], reqs->tupdesc, 4, &isnull);

			if (!isnull)
			{
				kuser[nkeys] = SPI_getbinval(reqs->vals[r], reqs->tupdesc, 2, &isnull);
				kkey[nkeys++] = k;
			}
		}
		memset(&hctl, 0, sizeof(hctl));
		hctl.keysize = offsetof(KeyEntry, tx_id);
		hctl.entrysize = sizeof(KeyEntry);
		hctl.hcxt = CurrentMemoryContext;
		keys = hash_create("points queued keys", Max(nkeys, 16), &hctl,
						   HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
		if (nkeys > 0)
		{
			Datum		kv[2];

			kv[0] = PointerGetDatum(construct_array(kuser, nkeys, INT8OID, 8, true, TYPALIGN_DOUBLE));
			kv[1] = PointerGetDatum(construct_array(kkey, nkeys, TEXTOID, -1, false, TYPALIGN_INT));
			/*
			 * One index probe per key (two when it is not in the ledger):
			 * a join would let stale statistics of a growing ledger pick a
			 * sort of the whole table (30 ms a batch at 33,000 rows).
			 */
			PointsPlanSet(&plan_keys,
					   "SELECT k.user_id, k.key, g.tx_id, g.kind, abs(g.amount)"
					   " FROM unnest($1, $2) k(user_id, key),"
					   "  LATERAL (SELECT tx_id, kind, amount FROM points.ledger g"
					   "           WHERE g.user_id = k.user_id AND g.idempotency_key = k.key"
					   "           UNION ALL"
					   "           SELECT tx_id, kind, amount FROM points.ledger_archive g"
					   "           WHERE g.user_id = k.user_id AND g.idempotency_key = k.key"
					   "           LIMIT 1) g",
					   2, t_keys);
			PointsExecIndexed(plan_keys, kv, NULL, false, 0);
			for (i = 0; i < SPI_processed; i++)
			{
				bool		found;
				bool		isnull;
				text	   *key = DatumGetTextPP(SPI_getbinval(SPI_tuptable->vals[i],
															   SPI_tuptable->tupdesc, 2, &isnull));
				KeyEntry   *e = KeyLookup(keys, PointsGetInt64(i, 1, NULL), key, &found);
				char	   *kind = SPI_getvalue(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 4);

				e->tx_id = PointsGetInt64(i, 3, NULL);
				e->batch_ord = 0;
				e->is_earn = strcmp(kind, "earn") == 0;
				e->amount = PointsGetInt64(i, 5, NULL);
				strlcpy(e->kind, kind, sizeof(e->kind));
			}
		}

		/* decide each request, in request_id order (its memory: see bulk.c) */
		outer = PointsArenaEnter();
		for (r = 0; r < nreq; r++)
		{
			HeapTuple	tup = reqs->vals[r];
			TupleDesc	desc = reqs->tupdesc;
			bool		isnull;
			int64		user_id = DatumGetInt64(SPI_getbinval(tup, desc, 2, &isnull));
			int64		amount = DatumGetInt64(SPI_getbinval(tup, desc, 3, &isnull));
			Datum		keyd = SPI_getbinval(tup, desc, 4, &isnull);
			text	   *key = isnull ? NULL : DatumGetTextPP(keyd);
			TimestampTz expires_at = DatumGetTimestampTz(SPI_getbinval(tup, desc, 5, &isnull));
			Datum		reasond = SPI_getbinval(tup, desc, 6, &isnull);
			text	   *reason = isnull ? NULL : DatumGetTextPP(reasond);
			Datum		metadata = SPI_getbinval(tup, desc, 7, &isnull);
			PointsAccountState *a = PointsFindAccount(&set, user_id);
			KeyEntry   *e = NULL;
			bool		found = false;
			int64		balance = 0;
			char	   *error = NULL;

			if (isnull)
				metadata = (Datum) 0;
			req_id[r] = DatumGetInt64(SPI_getbinval(tup, desc, 1, &isnull));
			ItemPointerCopy((ItemPointer) DatumGetPointer(SPI_getbinval(tup, desc, 8, &isnull)),
							&req_tid[r]);
			req_user[r] = user_id;

			if (key)
				e = KeyLookup(keys, user_id, key, &found);
			if (found && (!e->is_earn || e->amount != amount))
			{
				if (e->tx_id == 0)
				{
					/* the key's earn is in this batch: message once it has its tx_id */
					req_state[r] = CStringGetTextDatum("rejected");
					req_conflict[r] = e->batch_ord;
					req_error_null[r] = false;
					req_key[r] = key;
					continue;
				}
				error = PointsKeyConflict(key, user_id, e->tx_id, e->kind, e->amount);
			}
			else if (found)
			{
				/* a replay: resolves to that earn */
				req_state[r] = CStringGetTextDatum("applied");
				req_tx[r] = e->tx_id;
				req_ord[r] = e->batch_ord;
				req_error_null[r] = true;
				continue;
			}
			else if (expires_at <= now)
				error = psprintf("expires_at %s had passed when the request was applied, for earn of %lld points by user %lld",
								 timestamptz_to_str(expires_at), (long long) amount,
								 (long long) user_id);
			else if (pg_add_s64_overflow(a->balance, amount, &balance))
				error = psprintf("balance of user %lld would overflow: %lld + %lld is out of range for bigint",
								 (long long) user_id, (long long) a->balance,
								 (long long) amount);

			if (error)
			{
				if (e && !found)
					hash_search(keys, e, HASH_REMOVE, NULL);	/* key stays free */
				req_state[r] = CStringGetTextDatum("rejected");
				req_error[r] = CStringGetTextDatum(error);
				req_error_null[r] = false;
				continue;
			}

			a->balance = balance;
			a->last_seq++;
			PointsBatchAdd(&batch, user_id, a->last_seq, "earn", amount, balance,
						   key, reason, metadata, expires_at);
			req_state[r] = CStringGetTextDatum("applied");
			req_ord[r] = batch.n;
			req_error_null[r] = true;
			if (e)
			{
				e->tx_id = 0;
				e->batch_ord = batch.n;
				e->is_earn = true;
				e->amount = amount;
				strlcpy(e->kind, "earn", sizeof(e->kind));
			}
		}
	}

	/* write the earns, then give each request its tx_id */
	if (batch.n > 0)
	{
		PointsAppendBatch(&batch, &set, now);
		for (r = 0; r < nreq; r++)
		{
			if (req_ord[r] > 0)
				req_tx[r] = batch.tx_id[req_ord[r] - 1];
			if (req_conflict[r] > 0)
				req_error[r] = CStringGetTextDatum(
					PointsKeyConflict(req_key[r], req_user[r],
									  batch.tx_id[req_conflict[r] - 1], "earn",
									  batch.amount[req_conflict[r] - 1]));
		}
	}
	for (r = 0; r < nreq; r++)
	{
		req_tx_null[r] = req_tx[r] == 0;
		if (req_error_null[r])
			req_error[r] = (Datum) 0;
	}
	MarkRequests(nreq, req_id, req_tid, req_state, req_tx, req_tx_null,
				 req_error, req_error_null, now);
	PointsArenaLeave(outer);

	/*
	 * The next batch starts at the oldest request it may still have to see:
	 * that of a user this batch skipped (busy, or past the user cap), else
	 * the one after the newest request this batch took.  A full batch may
	 * have left requests of the users it took: after each one's last.
	 */
	for (i = 0; i < ncand; i++)
		if (i >= POINTS_BATCH_MAX_USERS || !cand_got[i])
			next_from = Min(next_from, cand_min[i]);
	if (nreq < max_requests)
	{
		/* every taken user's queue was read whole: go on after the newest */
		int64		newest = 0;

		for (r = 0; r < nreq; r++)
			newest = Max(newest, req_id[r]);
		next_from = Min(next_from, newest + 1);
	}
	else
	{
		/* a full batch may have left requests of its users: after each one's last */
		HASHCTL		uctl;
		HTAB	   *last;
		HASH_SEQ_STATUS seq;
		int64	   *e;

		memset(&uctl, 0, sizeof(uctl));
		uctl.keysize = sizeof(int64);
		uctl.entrysize = 2 * sizeof(int64);
		uctl.hcxt = CurrentMemoryContext;
		last = hash_create("points queue users", 64, &uctl,
						   HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
		for (r = 0; r < nreq; r++)
		{
			e = hash_search(last, &req_user[r], HASH_ENTER, NULL);
			e[1] = req_id[r];	/* rows come in request_id order */
		}
		hash_seq_init(&seq, last);
		while ((e = hash_seq_search(&seq)) != NULL)
			next_from = Min(next_from, e[1] + 1);
	}
	PointsHintSet(&queue_hint, next_from != PG_INT64_MAX, next_from);
	SPI_finish();
	PG_RETURN_INT64(nreq);
}
