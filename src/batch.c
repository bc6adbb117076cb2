/*-------------------------------------------------------------------------
 *
 * batch.c
 *	  Appending many transactions in one statement, for the jobs that write
 *	  in bulk (expiry, queued earns).
 *
 * The caller takes the user locks and the account rows of a set of users
 * (PointsLockBatchUsers), decides every transaction in memory (user_seq,
 * balance_after), and adds them to a PointsTxBatch in the order they happen; PointsAppendBatch then writes
 * all ledger rows, lots, outbox events and account updates at once.  Ids
 * are taken in batch order, so each user's tx_ids grow with its user_seq,
 * as on the one-call path (ledger.c).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/genam.h"
#include "access/stratnum.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/pg_type.h"
#include "miscadmin.h"
#include "parser/parse_relation.h"
#include "storage/proc.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"

#include "points.h"

static SPIPlanPtr plan_batch;
static SPIPlanPtr plan_final_accounts;
static SPIPlanPtr plan_new_accounts;
static SPIPlanPtr plan_accounts;
static SPIPlanPtr plan_lock_accounts;

/*
 * The user locks of batch jobs last until their transaction ends, so a
 * caller that runs apply_queued or expire_due many times in one
 * transaction (a SELECT over generate_series, a loop in a DO block) would
 * pile them up until the shared lock table is full ("out of shared
 * memory", for every session of the server).  All batches of one
 * transaction lock at most POINTS_BATCH_MAX_USERS users together: later
 * calls do less, then nothing (they return 0) until the caller commits.
 */
static LocalTransactionId budget_lxid = InvalidLocalTransactionId;
static int	budget_used = 0;

static int
CompareAccount(const void *a, const void *b)
{
	int64		x = ((const PointsAccountState *) a)->user_id;
	int64		y = ((const PointsAccountState *) b)->user_id;

	return x < y ? -1 : x > y ? 1 : 0;
}

/*
 * PointsLockBatchUsers
 *		Take the user lock of each of the first max_rows of the ncand users
 *		cand[] that is free now (a busy user is left for a later batch; the
 *		job never waits; got[i] says which, when got is not NULL), within
 *		the transaction's budget (above), then read
 *		their account rows.  With create, a user without an account gets
 *		one in the set (balance 0, is_new), which the append inserts if the
 *		batch writes for it: under the user lock nobody else can make it
 *		meanwhile.  now is a new account's created_at.  Fills set and
 *		returns false when no user was free.
 */
bool
PointsLockBatchUsers(bool create, TimestampTz now, const int64 *cand, uint64 ncand,
					 uint64 max_rows, bool *got, PointsAccountSet *set)
{
	static const Oid types[2] = {INT8ARRAYOID, TIMESTAMPTZOID};
	Datum		values[2];
	Datum	   *locked = palloc(sizeof(Datum) * (ncand + 1));
	int			nlocked = 0;
	int			budget;
	uint64		i;
	SPIPlanPtr	plan;

	if (budget_lxid != MyProc->lxid)
	{
		budget_lxid = MyProc->lxid;
		budget_used = 0;
	}
	budget = POINTS_BATCH_MAX_USERS - budget_used;
	if (got)
		memset(got, 0, sizeof(bool) * Min(ncand, max_rows));
	for (i = 0; i < ncand && i < max_rows && nlocked < budget; i++)
	{
		int64		user_id = cand[i];
		bool		ok = PointsTryLockUser(user_id);

		if (ok)
			locked[nlocked++] = Int64GetDatum(user_id);
		if (got)
			got[i] = ok;
	}
	budget_used += nlocked;
	set->n = 0;
	set->accounts = NULL;
	if (nlocked == 0)
		return false;
	set->users = PointerGetDatum(construct_array(locked, nlocked, INT8OID, 8,
												 true, TYPALIGN_DOUBLE));
	values[0] = set->users;
	values[1] = TimestampTzGetDatum(now);
	if (create && IsolationUsesXactSnapshot())
	{
		/*
		 * A transaction snapshot may predate an account that a caller made
		 * and committed before we got the user's lock: the read below would
		 * not see it and the batch would write user_seq 1 again (23505 from
		 * the ledger).  Inserting first turns that into 40001, as for one
		 * call (PointsLockAccount); under READ COMMITTED the read after the
		 * locks sees every account and the append inserts the new ones.
		 */
		PointsPlanSet(&plan_new_accounts,
				   "INSERT INTO points.account (user_id, balance, last_seq, created_at, updated_at)"
				   " SELECT u, 0, 0, $2, $2 FROM unnest($1) u"
				   " ON CONFLICT (user_id) DO NOTHING",
				   2, types);
		PointsExec(plan_new_accounts, values, NULL, false, 0);
	}
	/* FOR UPDATE only for a transaction snapshot: see PointsLockAccount */
	if (IsolationUsesXactSnapshot())
		plan = PointsPlanSet(&plan_lock_accounts,
						  "SELECT user_id, balance, last_seq, ctid FROM points.account"
						  " WHERE user_id = ANY($1) ORDER BY user_id FOR UPDATE",
						  1, types);
	else
		plan = PointsPlanSet(&plan_accounts,
						  "SELECT user_id, balance, last_seq, ctid FROM points.account"
						  " WHERE user_id = ANY($1) ORDER BY user_id",
						  1, types);
	PointsExec(plan, values, NULL, false, 0);
	set->accounts = palloc(sizeof(PointsAccountState) * (nlocked + 1));
	for (i = 0; i < SPI_processed; i++)
	{
		PointsAccountState *a = &set->accounts[i];
		bool		isnull;

		a->user_id = PointsGetInt64(i, 1, NULL);
		a->balance = PointsGetInt64(i, 2, NULL);
		a->read_seq = a->last_seq = PointsGetInt64(i, 3, NULL);
		a->is_new = false;
		ItemPointerCopy((ItemPointer) DatumGetPointer(SPI_getbinval(SPI_tuptable->vals[i],
																 SPI_tuptable->tupdesc,
																 4, &isnull)),
						&a->tid);
	}
	set->n = (int) SPI_processed;
	if (create && set->n < nlocked)
	{
		int			nold = set->n;

		for (i = 0; i < (uint64) nlocked; i++)
		{
			PointsAccountState key;

			key.user_id = DatumGetInt64(locked[i]);
			if (bsearch(&key, set->accounts, nold, sizeof(PointsAccountState),
						CompareAccount) != NULL)
				continue;
			key.balance = 0;
			key.read_seq = key.last_seq = 0;
			key.is_new = true;
			ItemPointerSetInvalid(&key.tid);
			set->accounts[set->n++] = key;
		}
		qsort(set->accounts, set->n, sizeof(PointsAccountState), CompareAccount);
	}
	return true;
}

/*
 * A batch job's search hint: where its next search for work in an index
 * starts (the entries of work it did stay in the index until vacuum, and
 * walking them all again on every call made a backlog quadratic).  Work
 * can appear before the hint: a transaction that did work and then rolled
 * back (any abort in the backend invalidates every hint), a writer that
 * committed late, points given back to an expired lot.  So a hint is also
 * dropped when a search past it finds nothing, and at least every
 * POINTS_HINT_FULL_MS a search starts from the beginning.
 */
#define POINTS_HINT_FULL_MS		10000

static uint64 abort_epoch = 1;
static bool hint_callbacks = false;

static void
HintXact(XactEvent event, void *arg)
{
	if (event == XACT_EVENT_ABORT || event == XACT_EVENT_PARALLEL_ABORT)
		abort_epoch++;
}

static void
HintSubXact(SubXactEvent event, SubTransactionId mySubid,
			SubTransactionId parentSubid, void *arg)
{
	if (event == SUBXACT_EVENT_ABORT_SUB)
		abort_epoch++;
}

/*
 * PointsHintUse
 *		Whether the search may start at the hint (then *value is it); when
 *		not, the caller searches from the beginning, noted as done now.
 */
bool
PointsHintUse(PointsHint *h, int64 *value)
{
	TimestampTz now = GetCurrentTimestamp();

	if (!hint_callbacks)
	{
		RegisterXactCallback(HintXact, NULL);
		RegisterSubXactCallback(HintSubXact, NULL);
		hint_callbacks = true;
	}
	if (h->set && h->epoch == abort_epoch &&
		now < TimestampTzPlusMilliseconds(h->from_start_at, POINTS_HINT_FULL_MS))
	{
		*value = h->value;
		return true;
	}
	h->set = false;
	h->from_start_at = now;
	return false;
}

/* PointsHintMissed: nothing past the hint; the caller searches from the start */
void
PointsHintMissed(PointsHint *h)
{
	h->set = false;
	h->from_start_at = GetCurrentTimestamp();
}

/* PointsHintSet: the next search may start at value (set) or must not (!set) */
void
PointsHintSet(PointsHint *h, bool set, int64 value)
{
	h->set = set;
	h->value = value;
	h->epoch = abort_epoch;
}


/*
 * PointsLotScanBegin, PointsLotScanUser, PointsLotScanNext, PointsLotScanEnd
 *		A user's lots that hold points, in use order (expires_at, then
 *		lot_id), read directly through lot_user_idx (index, of table lot,
 *		from PointsOpenIndex): those due at now (expires_at <= now) or
 *		those not yet expired.  Under the active snapshot, which the caller
 *		took after the user's lock: the versions read are the latest.
 */
void
PointsLotScanBegin(PointsLotScan *s, Relation lot, Relation index)
{
	s->slot = table_slot_create(lot, NULL);
	s->scan = index_beginscan(lot, index, GetActiveSnapshot(), 2, 0);
	s->a_lot = attnameAttNum(lot, "lot_id", false);
	s->a_user = attnameAttNum(lot, "user_id", false);
	s->a_remaining = attnameAttNum(lot, "remaining", false);
	s->a_expires = attnameAttNum(lot, "expires_at", false);
	if (s->a_lot <= 0 || s->a_user <= 0 || s->a_remaining <= 0 || s->a_expires <= 0)
		elog(ERROR, "points: a column of points.lot is missing");
}

void
PointsLotScanUser(PointsLotScan *s, int64 user_id, TimestampTz now, bool due)
{
	ScanKeyData keys[2];

	s->user_id = user_id;
	s->now = now;
	s->due = due;
	ScanKeyInit(&keys[0], 1, BTEqualStrategyNumber, F_INT8EQ, Int64GetDatum(user_id));
	ScanKeyInit(&keys[1], 2, due ? BTLessEqualStrategyNumber : BTGreaterStrategyNumber,
				due ? F_TIMESTAMPTZ_LE : F_TIMESTAMPTZ_GT, TimestampTzGetDatum(now));
	index_rescan(s->scan, keys, 2, NULL, 0);
}

bool
PointsLotScanNext(PointsLotScan *s, PointsLot *lot)
{
	while (index_getnext_slot(s->scan, ForwardScanDirection, s->slot))
	{
		bool		isnull;
		int64		remaining;
		TimestampTz expires_at;

		CHECK_FOR_INTERRUPTS();
		remaining = DatumGetInt64(slot_getattr(s->slot, s->a_remaining, &isnull));

		/* the index's predicate and range, checked on the version */
		if (isnull || remaining <= 0)
			continue;
		expires_at = DatumGetTimestampTz(slot_getattr(s->slot, s->a_expires, &isnull));
		if (isnull || (s->due ? expires_at > s->now : expires_at <= s->now) ||
			DatumGetInt64(slot_getattr(s->slot, s->a_user, &isnull)) != s->user_id)
			continue;
		lot->user_id = s->user_id;
		lot->lot_id = DatumGetInt64(slot_getattr(s->slot, s->a_lot, &isnull));
		lot->remaining = remaining;
		lot->expires_at = expires_at;
		lot->tid = s->slot->tts_tid;
		return true;
	}
	return false;
}

void
PointsLotScanEnd(PointsLotScan *s)
{
	index_endscan(s->scan);
	ExecDropSingleTupleTableSlot(s->slot);
}

/*
 * FirstUsers
 *		Walk index (of rel) forward within keys[] over the rows that check
 *		accepts (the index's predicate, tested on each version), at most
 *		max_rows of them, and collect their users (column user_att) in the
 *		order of each one's first row, at most max_users; first[i] gets
 *		column key_att (an int8 or a timestamptz) of user i's first row.
 *		Under a snapshot taken now.  *rows gets how many rows were read.
 *		Returns how many users.
 */
static int
FirstUsers(Relation rel, Relation index, ScanKey keys, int nkeys,
		   PointsRowCheck check, void *arg, AttrNumber user_att,
		   AttrNumber key_att, int64 max_rows, int max_users,
		   int64 *users, int64 *first, int64 *rows)
{
	TupleTableSlot *slot = table_slot_create(rel, NULL);
	IndexScanDesc scan;
	HASHCTL		ctl;
	HTAB	   *seen;
	int			n = 0;
	int64		read = 0;

	memset(&ctl, 0, sizeof(ctl));
	ctl.keysize = ctl.entrysize = sizeof(int64);
	ctl.hcxt = CurrentMemoryContext;
	seen = hash_create("points first users", max_users + 1, &ctl,
					   HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
	/* what this transaction wrote so far is seen (as by a statement) */
	CommandCounterIncrement();
	PushActiveSnapshot(GetTransactionSnapshot());
	scan = index_beginscan(rel, index, GetActiveSnapshot(), nkeys, 0);
	index_rescan(scan, keys, nkeys, NULL, 0);
	while (n < max_users && read < max_rows &&
		   index_getnext_slot(scan, ForwardScanDirection, slot))
	{
		bool		isnull;
		bool		found;
		int64		user_id;

		CHECK_FOR_INTERRUPTS();
		if (!check(slot, arg))
			continue;
		read++;
		user_id = DatumGetInt64(slot_getattr(slot, user_att, &isnull));
		(void) hash_search(seen, &user_id, HASH_ENTER, &found);
		if (!found)
		{
			first[n] = DatumGetInt64(slot_getattr(slot, key_att, &isnull));
			users[n++] = user_id;
		}
	}
	index_endscan(scan);
	PopActiveSnapshot();
	ExecDropSingleTupleTableSlot(slot);
	hash_destroy(seen);
	*rows = read;
	return n;
}

/*
 * PointsFirstUsers
 *		A batch job's search for work: FirstUsers from the hint on (rows
 *		whose first key column is at least its value, compared by ge_proc),
 *		or from the beginning when the hint is not usable or nothing lies
 *		past it.  It stops at the last user the batch can take, where a
 *		statement would read max_rows rows to group them.  The caller sets
 *		the hint for the next search.
 */
int
PointsFirstUsers(Relation rel, Relation index, ScanKey keys, int nkeys,
				 RegProcedure ge_proc, PointsHint *hint,
				 PointsRowCheck check, void *arg, AttrNumber user_att,
				 AttrNumber key_att, int64 max_rows, int max_users,
				 int64 *users, int64 *first)
{
	ScanKeyData all[INDEX_MAX_KEYS + 1];
	int64		from = 0;
	bool		use = PointsHintUse(hint, &from);

	Assert(nkeys < INDEX_MAX_KEYS);
	if (nkeys > 0)
		memcpy(all, keys, sizeof(ScanKeyData) * nkeys);
	for (;;)
	{
		int			n;
		int64		rows;

		if (use)
			ScanKeyInit(&all[nkeys], 1, BTGreaterEqualStrategyNumber, ge_proc,
						Int64GetDatum(from));
		n = FirstUsers(rel, index, all, nkeys + (use ? 1 : 0), check, arg, user_att,
					   key_att, max_rows, max_users, users, first, &rows);
		if (rows > 0 || !use)
			return n;
		PointsHintMissed(hint); /* nothing past the hint: from the start */
		use = false;
	}
}

/*
 * PointsFindAccount
 *		The locked account of user_id in the set; an error if it is not there.
 */
PointsAccountState *
PointsFindAccount(PointsAccountSet *set, int64 user_id)
{
	PointsAccountState key;
	PointsAccountState *a;

	key.user_id = user_id;
	a = bsearch(&key, set->accounts, set->n, sizeof(PointsAccountState), CompareAccount);
	if (a == NULL)
		elog(ERROR, "points: account of user %lld is missing", (long long) user_id);
	return a;
}

/*
 * PointsBatchAdd
 *		Append one transaction to the batch.  lot_expires != 0 makes a lot
 *		(an earn); metadata may be (Datum) 0 for NULL.
 */
void
PointsBatchAdd(PointsTxBatch *b, int64 user_id, int64 user_seq,
			   const char *kind, int64 amount, int64 balance_after,
			   text *key, text *reason, Datum metadata,
			   TimestampTz lot_expires)
{
	if (b->n == b->cap)
	{
		int			cap = b->cap ? b->cap * 2 : 64;

#define GROW(f) b->f = b->cap ? repalloc(b->f, sizeof(*b->f) * cap) : palloc(sizeof(*b->f) * cap)
		GROW(user_id);
		GROW(user_seq);
		GROW(kind);
		GROW(amount);
		GROW(balance_after);
		GROW(key);
		GROW(reason);
		GROW(metadata);
		GROW(lot_expires);
#undef GROW
		b->cap = cap;
	}
	b->user_id[b->n] = user_id;
	b->user_seq[b->n] = user_seq;
	b->kind[b->n] = kind;
	b->amount[b->n] = amount;
	b->balance_after[b->n] = balance_after;
	b->key[b->n] = key;
	b->reason[b->n] = reason;
	b->metadata[b->n] = metadata;
	b->lot_expires[b->n] = lot_expires;
	b->n++;
}

/*
 * MakeArray
 *		A one-dimensional array of n elements of elemtype; null where
 *		nulls[i] (nulls may be NULL).
 */
static Datum
MakeArray(Datum *elems, bool *nulls, int n, Oid elemtype)
{
	int16		typlen;
	bool		typbyval;
	char		typalign;
	int			dims[1] = {n};
	int			lbs[1] = {1};

	get_typlenbyvalalign(elemtype, &typlen, &typbyval, &typalign);
	return PointerGetDatum(construct_md_array(elems, nulls, 1, dims, lbs,
											  elemtype, typlen, typbyval, typalign));
}

static Datum
Int64Array(int64 *v, int n)
{
	Datum	   *d = palloc(sizeof(Datum) * (n + 1));

	for (int i = 0; i < n; i++)
		d[i] = Int64GetDatum(v[i]);
	return MakeArray(d, NULL, n, INT8OID);
}

/*
 * Written
 *		The accounts of the set that the batch wrote for (their last_seq
 *		grew), in user_id order, with their final balance and last_seq:
 *		the callers keep each user's state in the set as they add its
 *		transactions.  Returns how many.
 */
static int
Written(PointsAccountSet *set, PointsAccountState **out)
{
	PointsAccountState *w = palloc(sizeof(PointsAccountState) * (set->n + 1));
	int			n = 0;

	for (int i = 0; i < set->n; i++)
		if (set->accounts[i].last_seq != set->accounts[i].read_seq)
			w[n++] = set->accounts[i];
	*out = w;
	return n;
}

/*
 * FinalStates
 *		The written accounts as int8[] triples (user_id, balance, last_seq):
 *		out[0..2] for those that exist, out[3..5] for those the append
 *		makes (is_new).  The update matches its users by primary key
 *		(user_id = ANY), so its plan never scans the whole account table.
 *		The new ones are plain inserts: only the holder of a user's lock
 *		makes its account, and under a transaction snapshot
 *		PointsLockBatchUsers made them already.
 */
static void
FinalStates(PointsAccountState *w, int nw, Datum *out)
{
	int64	   *users[2],
			   *balances[2],
			   *seqs[2];
	int			nu[2] = {0, 0};

	for (int k = 0; k < 2; k++)
	{
		users[k] = palloc(sizeof(int64) * (nw + 1));
		balances[k] = palloc(sizeof(int64) * (nw + 1));
		seqs[k] = palloc(sizeof(int64) * (nw + 1));
	}
	for (int i = 0; i < nw; i++)
	{
		int			k = w[i].is_new ? 1 : 0;

		users[k][nu[k]] = w[i].user_id;
		balances[k][nu[k]] = w[i].balance;
		seqs[k][nu[k]++] = w[i].last_seq;
	}
	for (int k = 0; k < 2; k++)
	{
		out[3 * k] = Int64Array(users[k], nu[k]);
		out[3 * k + 1] = Int64Array(balances[k], nu[k]);
		out[3 * k + 2] = Int64Array(seqs[k], nu[k]);
	}
}

/*
 * BulkRows
 *		The batch's ledger rows, lots and outbox events, written directly
 *		(bulk.c); tables 0, 1, 2 of bulk are ledger, lot, outbox.  An
 *		event's aggregatetype is the column's default, as for one call.
 */
static void
BulkRows(PointsBulk *bulk, PointsTxBatch *b, Datum *payloads, Datum *types,
		 TimestampTz created_at)
{
	Datum		created = TimestampTzGetDatum(created_at);
	AttrNumber	g_tx = PointsBulkAttnum(bulk, 0, "tx_id") - 1,
				g_user = PointsBulkAttnum(bulk, 0, "user_id") - 1,
				g_seq = PointsBulkAttnum(bulk, 0, "user_seq") - 1,
				g_kind = PointsBulkAttnum(bulk, 0, "kind") - 1,
				g_amount = PointsBulkAttnum(bulk, 0, "amount") - 1,
				g_after = PointsBulkAttnum(bulk, 0, "balance_after") - 1,
				g_key = PointsBulkAttnum(bulk, 0, "idempotency_key") - 1,
				g_reason = PointsBulkAttnum(bulk, 0, "reason") - 1,
				g_meta = PointsBulkAttnum(bulk, 0, "metadata") - 1,
				g_cancels = PointsBulkAttnum(bulk, 0, "cancels_tx") - 1,
				g_created = PointsBulkAttnum(bulk, 0, "created_at") - 1;
	AttrNumber	l_lot = PointsBulkAttnum(bulk, 1, "lot_id") - 1,
				l_user = PointsBulkAttnum(bulk, 1, "user_id") - 1,
				l_amount = PointsBulkAttnum(bulk, 1, "amount") - 1,
				l_remaining = PointsBulkAttnum(bulk, 1, "remaining") - 1,
				l_expires = PointsBulkAttnum(bulk, 1, "expires_at") - 1;
	AttrNumber	o_id = PointsBulkAttnum(bulk, 2, "id") - 1,
				o_aggid = PointsBulkAttnum(bulk, 2, "aggregateid") - 1,
				o_type = PointsBulkAttnum(bulk, 2, "type") - 1,
				o_payload = PointsBulkAttnum(bulk, 2, "payload") - 1,
				o_created = PointsBulkAttnum(bulk, 2, "created_at") - 1;
	for (int i = 0; i < b->n; i++)
	{
		TupleTableSlot *s;
		char		user_text[24];

		s = PointsBulkSlot(bulk, 0);
#define SET(col, v) (s->tts_values[col] = (v), s->tts_isnull[col] = false)
#define SETP(col, p) (s->tts_values[col] = PointerGetDatum(p), s->tts_isnull[col] = ((p) == NULL))
		SET(g_tx, Int64GetDatum(b->tx_id[i]));
		SET(g_user, Int64GetDatum(b->user_id[i]));
		SET(g_seq, Int64GetDatum(b->user_seq[i]));
		SET(g_kind, CStringGetTextDatum(b->kind[i]));
		SET(g_amount, Int64GetDatum(b->amount[i]));
		SET(g_after, Int64GetDatum(b->balance_after[i]));
		SETP(g_key, b->key[i]);
		SETP(g_reason, b->reason[i]);
		SETP(g_meta, DatumGetPointer(b->metadata[i]));
		if (b->cancels_tx && b->cancels_tx[i] != 0)
			SET(g_cancels, Int64GetDatum(b->cancels_tx[i]));
		SET(g_created, created);
		PointsBulkAdd(bulk, 0);

		if (b->lot_expires[i] != 0)
		{
			s = PointsBulkSlot(bulk, 1);
			SET(l_lot, Int64GetDatum(b->tx_id[i]));
			SET(l_user, Int64GetDatum(b->user_id[i]));
			SET(l_amount, Int64GetDatum(b->amount[i]));
			SET(l_remaining, Int64GetDatum(b->amount[i]));
			SET(l_expires, TimestampTzGetDatum(b->lot_expires[i]));
			PointsBulkAdd(bulk, 1);
		}

		s = PointsBulkSlot(bulk, 2);
		snprintf(user_text, sizeof(user_text), INT64_FORMAT, b->user_id[i]);
		SET(o_id, Int64GetDatum(b->tx_id[i]));
		SET(o_aggid, CStringGetTextDatum(user_text));
		SET(o_type, types[i]);
		SET(o_payload, payloads[i]);
		SET(o_created, created);
		PointsBulkAdd(bulk, 2);
#undef SET
#undef SETP
	}
}

/*
 * BulkAccounts
 *		Each account's final balance and last_seq (table 3 of bulk): the
 *		version read under the user lock gets its next version, or a new
 *		account is inserted.
 */
static void
BulkAccounts(PointsBulk *bulk, PointsAccountState *accounts, int n,
			 TimestampTz created_at)
{
	static const char *const columns[3] = {"balance", "last_seq", "updated_at"};
	Datum		created = TimestampTzGetDatum(created_at);
	AttrNumber	a_user = PointsBulkAttnum(bulk, 3, "user_id") - 1,
				a_balance = PointsBulkAttnum(bulk, 3, "balance") - 1,
				a_seq = PointsBulkAttnum(bulk, 3, "last_seq") - 1,
				a_created = PointsBulkAttnum(bulk, 3, "created_at") - 1,
				a_updated = PointsBulkAttnum(bulk, 3, "updated_at") - 1;

	for (int i = 0; i < n; i++)
	{
		PointsAccountState *a = &accounts[i];

		if (a->is_new)
		{
			TupleTableSlot *s = PointsBulkSlot(bulk, 3);

#define SET(col, v) (s->tts_values[col] = (v), s->tts_isnull[col] = false)
			SET(a_user, Int64GetDatum(a->user_id));
			SET(a_balance, Int64GetDatum(a->balance));
			SET(a_seq, Int64GetDatum(a->last_seq));
			SET(a_created, created);
			SET(a_updated, created);
#undef SET
			PointsBulkAdd(bulk, 3);
		}
		else
		{
			Datum		values[3];

			values[0] = Int64GetDatum(a->balance);
			values[1] = Int64GetDatum(a->last_seq);
			values[2] = created;
			PointsBulkUpdate(bulk, 3, &a->tid, 3, columns, values, NULL);
		}
	}
}

/*
 * PointsAppendRows
 *		Insert the ledger rows, lots (earns) and events of b directly
 *		(bulk.c), b->tx_id, payloads and types already drawn and built, and
 *		write the final state (balance, last_seq, updated_at created_at) of
 *		the naccounts accounts: an update of the version read (its tid,
 *		which becomes the new version's), or an insert (is_new).  Returns
 *		false, having written nothing, when a table needs what only a
 *		statement does (triggers, rules, generated columns): the caller
 *		then writes it all through SQL.
 */
bool
PointsAppendRows(PointsTxBatch *b, Datum *payloads, Datum *types,
				 TimestampTz created_at, PointsAccountState *accounts,
				 int naccounts)
{
	Oid			relids[4];
	PointsBulk *bulk = palloc(sizeof(PointsBulk));
	bool		usable;

	relids[0] = PointsRelid("ledger");
	relids[1] = PointsRelid("lot");
	relids[2] = PointsRelid("outbox");
	relids[3] = PointsRelid("account");
	PointsBulkBegin(bulk, relids, 4);
	usable = PointsBulkUsable(bulk);
	if (usable)
	{
		BulkRows(bulk, b, payloads, types, created_at);
		BulkAccounts(bulk, accounts, naccounts, created_at);
	}
	PointsBulkEnd(bulk);
	pfree(bulk);
	return usable;
}

/*
 * AppendBatchSQL
 *		PointsAppendRows through SQL, for tables with triggers or rules: one
 *		statement writes the ledger rows, lots and events, one the accounts.
 */
static void
AppendBatchSQL(PointsTxBatch *b, Datum *payloads, Datum *event_types,
			   TimestampTz created_at, PointsAccountState *written_accounts,
			   int nwritten)
{
	static const Oid types[13] = {
		INT8ARRAYOID, INT8ARRAYOID, TEXTARRAYOID, INT8ARRAYOID, INT8ARRAYOID,
		TEXTARRAYOID, TEXTARRAYOID, JSONBARRAYOID, TIMESTAMPTZARRAYOID,
		INT8ARRAYOID, TIMESTAMPTZOID, JSONBARRAYOID, TEXTARRAYOID
	};
	static const Oid account_types[7] = {
		TIMESTAMPTZOID, INT8ARRAYOID, INT8ARRAYOID, INT8ARRAYOID,
		INT8ARRAYOID, INT8ARRAYOID, INT8ARRAYOID
	};
	Datum		values[13];
	Datum		account_values[7];
	Datum	   *d;
	bool	   *nulls;
	int			n = b->n;
	int			i;
	int64		written;
	int64		expected;
	ArrayType  *existing;

	values[10] = TimestampTzGetDatum(created_at);
	d = palloc(sizeof(Datum) * n);
	nulls = palloc(sizeof(bool) * n);
	values[0] = Int64Array(b->user_id, n);
	values[1] = Int64Array(b->user_seq, n);
	for (i = 0; i < n; i++)
		d[i] = CStringGetTextDatum(b->kind[i]);
	values[2] = MakeArray(d, NULL, n, TEXTOID);
	values[3] = Int64Array(b->amount, n);
	values[4] = Int64Array(b->balance_after, n);
	for (i = 0; i < n; i++)
	{
		nulls[i] = b->key[i] == NULL;
		d[i] = PointerGetDatum(b->key[i]);
	}
	values[5] = MakeArray(d, nulls, n, TEXTOID);
	for (i = 0; i < n; i++)
	{
		nulls[i] = b->reason[i] == NULL;
		d[i] = PointerGetDatum(b->reason[i]);
	}
	values[6] = MakeArray(d, nulls, n, TEXTOID);
	for (i = 0; i < n; i++)
	{
		nulls[i] = b->metadata[i] == (Datum) 0;
		d[i] = b->metadata[i];
	}
	values[7] = MakeArray(d, nulls, n, JSONBOID);
	for (i = 0; i < n; i++)
	{
		nulls[i] = b->lot_expires[i] == 0;
		d[i] = TimestampTzGetDatum(b->lot_expires[i]);
	}
	values[8] = MakeArray(d, nulls, n, TIMESTAMPTZOID);
	values[9] = Int64Array(b->tx_id, n);
	values[11] = MakeArray(payloads, NULL, n, JSONBOID);
	values[12] = MakeArray(event_types, NULL, n, TEXTOID);
	PointsPlanSet(&plan_batch,
			   "WITH n AS ("
			   "  SELECT * FROM unnest($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $12, $13)"
			   "    WITH ORDINALITY AS n(user_id, user_seq, kind, amount, balance_after,"
			   "                         key, reason, metadata, lot_expires, tx_id,"
			   "                         payload, type, ord)),"
			   " t AS ("
			   "  INSERT INTO points.ledger (tx_id, user_id, user_seq, kind, amount,"
			   "    balance_after, idempotency_key, cancels_tx, reason, metadata, created_at)"
			   "  SELECT tx_id, user_id, user_seq, kind, amount, balance_after, key, NULL,"
			   "         reason, metadata, $11 FROM n"
			   "  RETURNING 1),"
			   " l AS ("
			   "  INSERT INTO points.lot (lot_id, user_id, amount, remaining, expires_at)"
			   "  SELECT tx_id, user_id, amount, amount, lot_expires FROM n"
			   "  WHERE lot_expires IS NOT NULL),"
			   " o AS ("
			   "  INSERT INTO points.outbox (id, aggregateid, type, payload, created_at)"
			   "  SELECT tx_id, user_id::text, type, payload, $11 FROM n)"
			   " SELECT count(*) FROM t",
			   13, types);
	PointsExecIndexed(plan_batch, values, NULL, false, 1);
	if (PointsGetInt64(0, 1, NULL) != n)
		elog(ERROR, "points: batch append wrote %lld of %d transactions",
			 (long long) PointsGetInt64(0, 1, NULL), n);

	/* each account's final balance and user_seq; the new ones inserted */
	account_values[0] = values[10];
	FinalStates(written_accounts, nwritten, &account_values[1]);
	PointsPlanSet(&plan_final_accounts,
			   "WITH a AS ("
			   "  UPDATE points.account a"
			   "  SET balance = f.balance, last_seq = f.last_seq, updated_at = $1"
			   "  FROM unnest($2, $3, $4) f(user_id, balance, last_seq)"
			   "  WHERE a.user_id = ANY($2) AND a.user_id = f.user_id"
			   "  RETURNING 1),"
			   " c AS ("
			   "  INSERT INTO points.account (user_id, balance, last_seq, created_at, updated_at)"
			   "  SELECT user_id, balance, last_seq, $1, $1"
			   "  FROM unnest($5, $6, $7) f(user_id, balance, last_seq))"
			   " SELECT count(*) FROM a",
			   7, account_types);
	PointsExecIndexed(plan_final_accounts, account_values, NULL, false, 1);
	written = PointsGetInt64(0, 1, NULL);
	existing = DatumGetArrayTypeP(account_values[1]);
	expected = ArrayGetNItems(ARR_NDIM(existing), ARR_DIMS(existing));
	if (written != expected)
		elog(ERROR, "points: batch append updated %lld of %lld accounts",
			 (long long) written, (long long) expected);
}

/*
 * PointsAppendBatch
 *		Write every transaction of the batch, with its lot (earns), its
 *		outbox event, and each account's final balance and user_seq (as the
 *		caller left them in set).  On return b->tx_id[i] is the tx_id of
 *		the i-th transaction.
 *
 * The rows go in directly (bulk.c) unless PointsBulkUsable says a table
 * needs what only a statement does (triggers, rules, generated columns).
 */
void
PointsAppendBatch(PointsTxBatch *b, PointsAccountSet *set, TimestampTz created_at)
{
	Datum	   *payloads;
	Datum	   *event_types;
	int64	   *tx_ids;
	int			n = b->n;
	int			i;
	Oid			seq;
	PointsAccountState *written_accounts;
	int			nwritten;

	if (n == 0)
		return;
	payloads = palloc(sizeof(Datum) * n);
	event_types = palloc(sizeof(Datum) * n);
	tx_ids = b->tx_id = palloc(sizeof(int64) * n);

	/* tx_ids in batch order, so each user's grow with its user_seq */
	seq = PointsRelid("tx_seq");
	for (i = 0; i < n; i++)
		tx_ids[i] = PointsNextTxId(seq);
	for (i = 0; i < n; i++)
	{
		payloads[i] = PointsEventPayload(tx_ids[i], b->user_id[i], b->user_seq[i],
										 b->kind[i], b->amount[i], b->balance_after[i],
										 created_at, b->key[i], 0, b->reason[i],
										 b->metadata[i]);
		event_types[i] = CStringGetTextDatum(PointsEventType(b->kind[i]));
	}
	nwritten = Written(set, &written_accounts);
	if (!PointsAppendRows(b, payloads, event_types, created_at, written_accounts, nwritten))
		AppendBatchSQL(b, payloads, event_types, created_at, written_accounts, nwritten);
	for (i = 0; i < n; i++)
		points_call_points += b->amount[i] < 0 ? -b->amount[i] : b->amount[i];
	PointsNoteEvent();
}
