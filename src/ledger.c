/*-------------------------------------------------------------------------
 *
 * ledger.c
 *	  The write operations of the API: points.earn, points.use and
 *	  points.cancel, and the pieces every ledger write shares.
 *
 * Every write of a user follows one order, which is what makes the
 * extension deadlock-free and its user_seq gapless:
 *
 *	  1. idempotency key lookup (a replay returns without any lock)
 *	  2. the user lock (userlock.c), bounded by points.lock_timeout
 *	  3. the key lookup again, now that no one else can write the user
 *	  4. the account row (created by the user's first earn), FOR UPDATE
 *	     under REPEATABLE READ / SERIALIZABLE (see PointsLockAccount)
 *	  5. lot changes, then one statement that appends the ledger row, its
 *	     outbox event and the account's new balance and user_seq
 *
 * "now" of a call is the clock once the user lock is held: it stamps
 * created_at (so created_at grows with user_seq) and decides which points
 * have expired, also for a call that waited for the lock.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/genam.h"
#include "access/stratnum.h"
#include "access/table.h"
#include "access/xact.h"
#include "catalog/pg_type.h"
#include "common/int.h"
#include "parser/parse_relation.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/jsonb.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "points.h"

PG_FUNCTION_INFO_V1(points_earn);
PG_FUNCTION_INFO_V1(points_use);
PG_FUNCTION_INFO_V1(points_cancel);

#define TX_COLS "tx_id, user_id, user_seq, kind, amount, balance_after, " \
	"idempotency_key, cancels_tx, reason, metadata, created_at"

/* column numbers of TX_COLS in a result row */
#define TXC_TX_ID		1
#define TXC_USER_ID		2
#define TXC_KIND		4
#define TXC_AMOUNT		5
#define TXC_CANCELS		8

static SPIPlanPtr plan_lock_account;
static SPIPlanPtr plan_read_account;
static SPIPlanPtr plan_new_account;
static SPIPlanPtr plan_append;
static SPIPlanPtr plan_key;
static SPIPlanPtr plan_fetch;
static SPIPlanPtr plan_spendable;
static SPIPlanPtr plan_consume;
static SPIPlanPtr plan_lots_in_order;
static SPIPlanPtr plan_cancelled;
static SPIPlanPtr plan_lot;
static SPIPlanPtr plan_lot_take;
static SPIPlanPtr plan_restore;

/*
 * ReadAccount
 *		PointsLockAccount's read under READ COMMITTED, directly through the
 *		primary key, under a snapshot taken now: true when that answered
 *		(the row, or no row and none to make), false to go through SQL (an
 *		account to make, or no valid primary-key index).
 */
static bool
ReadAccount(int64 user_id, bool create, PointsAccount *acct)
{
	static const char *const cols[] = {"user_id", NULL};
	Relation	account = table_open(PointsRelid("account"), AccessShareLock);
	Relation	index = PointsOpenIndex(account, "account_pkey", cols);
	bool		answered = false;

	if (index)
	{
		TupleTableSlot *slot = table_slot_create(account, NULL);
		IndexScanDesc scan;
		ScanKeyData key;

		CommandCounterIncrement();
		PushActiveSnapshot(GetTransactionSnapshot());
		scan = index_beginscan(account, index, GetActiveSnapshot(), 1, 0);
		ScanKeyInit(&key, 1, BTEqualStrategyNumber, F_INT8EQ, Int64GetDatum(user_id));
		index_rescan(scan, &key, 1, NULL, 0);
		if (index_getnext_slot(scan, ForwardScanDirection, slot))
		{
			bool		isnull;

			acct->exists = true;
			acct->balance = DatumGetInt64(slot_getattr(slot, attnameAttNum(account, "balance", false),
													   &isnull));
			acct->last_seq = DatumGetInt64(slot_getattr(slot, attnameAttNum(account, "last_seq", false),
														&isnull));
			acct->tid = slot->tts_tid;	/* the version read, which PointsAppendTx updates */
			answered = true;
		}
		else if (!create)
		{
			acct->exists = false;
			acct->balance = acct->last_seq = 0;
			ItemPointerSetInvalid(&acct->tid);
			answered = true;
		}
		index_endscan(scan);
		PopActiveSnapshot();
		ExecDropSingleTupleTableSlot(slot);
		index_close(index, NoLock);
	}
	table_close(account, NoLock);
	return answered;
}

/*
 * PointsLockAccount
 *		Lock the user's account row (the user lock must be held) and read its
 *		balance and last user_seq.  With create, a missing account is made.
 */
void
PointsLockAccount(int64 user_id, bool create, PointsAccount *acct)
{
	static const Oid types[2] = {INT8OID, TIMESTAMPTZOID};
	Datum		values[2];

	SPIPlanPtr	plan;

	values[0] = Int64GetDatum(user_id);
	values[1] = TimestampTzGetDatum(GetCurrentTimestamp());

	/*
	 * Under READ COMMITTED the user lock is all the exclusion there is to
	 * have: every writer of the account holds it, and each statement here
	 * takes a fresh snapshot after it was granted, so a plain read sees the
	 * last holder's commit and FOR UPDATE would only cost a WAL record.  A
	 * transaction-snapshot caller (REPEATABLE READ, SERIALIZABLE) may have
	 * taken its snapshot before that commit: FOR UPDATE turns it into 40001
	 * instead of a stale balance.  The plain read is direct (ReadAccount).
	 */
	if (!IsolationUsesXactSnapshot() && ReadAccount(user_id, create, acct))
		return;
	if (IsolationUsesXactSnapshot())
		plan = PointsPlanKey(&plan_lock_account,
							 "SELECT a.balance, a.last_seq, a.ctid FROM points.account a"
							 " WHERE a.user_id = $1 FOR UPDATE", 1, types);
	else
		plan = PointsPlanKey(&plan_read_account,
							 "SELECT a.balance, a.last_seq, a.ctid FROM points.account a"
							 " WHERE a.user_id = $1", 1, types);
	PointsExec(plan, values, NULL, false, 1);
	if (SPI_processed == 0 && create)
	{
		/* ON CONFLICT: under REPEATABLE READ a row we cannot see is 40001 */
		PointsPlanKey(&plan_new_account,
					  "INSERT INTO points.account"
					  " (user_id, balance, last_seq, created_at, updated_at)"
					  " VALUES ($1, 0, 0, $2, $2) ON CONFLICT (user_id) DO NOTHING",
					  2, types);
		PointsExec(plan_new_account, values, NULL, false, 0);
		PointsExec(plan, values, NULL, false, 1);
	}
	acct->exists = SPI_processed > 0;
	acct->balance = acct->exists ? PointsGetInt64(0, 1, NULL) : 0;
	acct->last_seq = acct->exists ? PointsGetInt64(0, 2, NULL) : 0;
	ItemPointerSetInvalid(&acct->tid);
	if (acct->exists)
	{
		bool		isnull;
		Datum		tid = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 3,
										&isnull);

		/* the version read, which PointsAppendTx updates */
		ItemPointerCopy((ItemPointer) DatumGetPointer(tid), &acct->tid);
	}
}

/*
 * PointsEventType
 *		The event type of a transaction kind.
 */
const char *
PointsEventType(const char *kind)
{
	if (strcmp(kind, "earn") == 0)
		return "points.earned";
	if (strcmp(kind, "use") == 0)
		return "points.used";
	if (strcmp(kind, "earn_cancel") == 0)
		return "points.earn_cancelled";
	if (strcmp(kind, "use_cancel") == 0)
		return "points.use_cancelled";
	if (strcmp(kind, "expire") == 0)
		return "points.expired";
	elog(ERROR, "points: unknown transaction kind \"%s\"", kind);
	return NULL;				/* keep compiler quiet */
}

/*
 * AppendTxSQL
 *		PointsAppendTx's write as one statement, for tables with triggers or
 *		rules: the ledger row, the lot, the event and the account.
 */
static void
AppendTxSQL(PointsTxRow *row, bool make_lot, TimestampTz lot_expires_at,
			Datum payload, Datum type)
{
	static const Oid types[15] = {
		INT8OID, INT8OID, INT8OID, TEXTOID, INT8OID, INT8OID, TEXTOID,
		INT8OID, TEXTOID, JSONBOID, TIMESTAMPTZOID, TIMESTAMPTZOID, BOOLOID,
		JSONBOID, TEXTOID
	};
	Datum		values[15];
	char		nulls[15];

	for (int i = 0; i < 11; i++)
	{
		values[i] = row->values[i];
		nulls[i] = row->nulls[i] ? 'n' : ' ';
	}
	values[11] = TimestampTzGetDatum(lot_expires_at);
	nulls[11] = ' ';
	values[12] = BoolGetDatum(make_lot);
	nulls[12] = ' ';
	values[13] = payload;
	nulls[13] = ' ';
	values[14] = type;
	nulls[14] = ' ';
	PointsPlanKey(&plan_append,
				  "WITH t AS ("
				  "  INSERT INTO points.ledger (" TX_COLS ")"
				  "  VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
				  "  RETURNING tx_id, user_id),"
				  " l AS ("
				  "  INSERT INTO points.lot (lot_id, user_id, amount, remaining, expires_at)"
				  "  SELECT t.tx_id, t.user_id, $5, $5, $12 FROM t WHERE $13),"
				  " o AS ("
				  "  INSERT INTO points.outbox (id, aggregateid, type, payload, created_at)"
				  "  SELECT t.tx_id, t.user_id::text, $15, $14, $11"
				  "  FROM t),"
				  " a AS ("
				  "  UPDATE points.account SET balance = $6, last_seq = $3, updated_at = $11"
				  "  WHERE user_id = $2 RETURNING 1)"
				  " SELECT (SELECT count(*) FROM t), (SELECT count(*) FROM a)",
				  15, types);
	PointsExec(plan_append, values, nulls, false, 1);
	if (PointsGetInt64(0, 1, NULL) != 1 || PointsGetInt64(0, 2, NULL) != 1)
		elog(ERROR, "points: ledger append of user %lld wrote %lld rows and %lld accounts",
			 (long long) DatumGetInt64(row->values[1]),
			 (long long) PointsGetInt64(0, 1, NULL), (long long) PointsGetInt64(0, 2, NULL));
}

/*
 * PointsAppendTx
 *		Append one transaction of a locked user: the ledger row, the lot of
 *		an earn (make_lot), the outbox event and the account's new balance
 *		and user_seq.  amount is signed.  Raises 22003 when the balance
 *		would overflow.  On return *row is the new transaction as a
 *		points.tx row, and acct is up to date.
 *
 * The three rows go in directly (bulk.c, as the batch jobs write theirs),
 * and the account row read under the user lock gets its next version the
 * same way, all in one executor state.  A statement that did all four (a
 * WITH of three INSERTs and the UPDATE) spent more instructions on
 * setting up its executor nodes and compiling the tables' constraints
 * than on the rows.  If any of the four tables has triggers or rules,
 * that statement writes them all, so that they fire.
 */
void
PointsAppendTx(PointsAccount *acct, int64 user_id, const char *kind,
			   int64 amount, text *key, int64 cancels_tx,
			   text *reason, Datum metadata, bool metadata_null,
			   TimestampTz created_at, TimestampTz lot_expires_at,
			   bool make_lot, PointsTxRow *row)
{
	PointsAccountState account;
	int64		balance_after;
	int64		user_seq = acct->last_seq + 1;
	int64		tx_id;
	Datum		payload;
	Datum		type;
	Datum		kind_text = CStringGetTextDatum(kind);
	PointsTxBatch one = {0};
	Datum		one_metadata = metadata_null ? (Datum) 0 : metadata;
	TimestampTz one_lot = make_lot ? lot_expires_at : 0;

	if (pg_add_s64_overflow(acct->balance, amount, &balance_after))
		ereport(ERROR,
				(errcode(ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE),
				 errmsg("balance of user %lld would overflow: %lld + %lld is out of range for bigint",
						(long long) user_id, (long long) acct->balance,
						(long long) amount)));
	Assert(balance_after >= 0);

	tx_id = PointsNextTxId(PointsRelid("tx_seq"));
	payload = PointsEventPayload(tx_id, user_id, user_seq, kind, amount,
								 balance_after, created_at, key, cancels_tx, reason,
								 metadata_null ? (Datum) 0 : metadata);
	type = CStringGetTextDatum(PointsEventType(kind));

	/* the row, as points.tx: TX_COLS, then replayed */
	memset(row->nulls, false, sizeof(row->nulls));
	row->values[0] = Int64GetDatum(tx_id);
	row->values[1] = Int64GetDatum(user_id);
	row->values[2] = Int64GetDatum(user_seq);
	row->values[3] = kind_text;
	row->values[4] = Int64GetDatum(amount);
	row->values[5] = Int64GetDatum(balance_after);
	row->values[6] = PointerGetDatum(key);
	row->nulls[6] = key == NULL;
	row->values[7] = Int64GetDatum(cancels_tx);
	row->nulls[7] = cancels_tx == 0;
	row->values[8] = PointerGetDatum(reason);
	row->nulls[8] = reason == NULL;
	row->values[9] = metadata;
	row->nulls[9] = metadata_null;
	row->values[10] = TimestampTzGetDatum(created_at);
	row->values[11] = BoolGetDatum(false);

	account.user_id = user_id;
	account.balance = balance_after;
	account.last_seq = user_seq;
	account.read_seq = acct->last_seq;
	account.is_new = false;
	account.tid = acct->tid;

	/* a batch of one for the direct insert */
	one.n = 1;
	one.user_id = &user_id;
	one.user_seq = &user_seq;
	one.kind = &kind;
	one.amount = &amount;
	one.balance_after = &balance_after;
	one.key = &key;
	one.reason = &reason;
	one.metadata = &one_metadata;
	one.lot_expires = &one_lot;
	one.cancels_tx = &cancels_tx;
	one.tx_id = &tx_id;
	/* the account row read under the user lock gets its next version */
	if (ItemPointerIsValid(&acct->tid) &&
		PointsAppendRows(&one, &payload, &type, created_at, &account, 1))
		acct->tid = account.tid;
	else
	{
		AppendTxSQL(row, make_lot, lot_expires_at, payload, type);
		ItemPointerSetInvalid(&acct->tid);
	}

	acct->balance = balance_after;
	acct->last_seq++;
	points_call_points += amount < 0 ? -amount : amount;
	PointsNoteEvent();
}

/*
 * Operation names as the idempotency check compares them: both kinds of
 * cancel are the operation "cancel".
 */
static const char *
KindOperation(const char *kind)
{
	return strncmp(kind, "earn_cancel", 11) == 0 ||
		strncmp(kind, "use_cancel", 10) == 0 ? "cancel" : kind;
}

/*
 * PointsKeyConflict
 *		The message of PT002: key of user_id was used by another transaction.
 */
char *
PointsKeyConflict(text *key, int64 user_id, int64 tx_id, const char *kind,
				  int64 amount)
{
	return psprintf("idempotency key \"%s\" of user %lld was already used by transaction %lld (%s of %lld points)",
					text_to_cstring(key), (long long) user_id, (long long) tx_id,
					kind, (long long) amount);
}

/*
 * LookupKey
 *		If user_id already used key, either return true with *result set to
 *		the original transaction (replayed = true), when it was the same
 *		operation ("earn", "use", "cancel") with the same amount (amount < 0:
 *		any) and target; or raise PT002.  Returns false for an unused key.
 */
static bool
LookupKey(FunctionCallInfo fcinfo, MemoryContext outer, int64 user_id,
		  text *key, const char *op, int64 amount, int64 target,
		  Datum *result)
{
	static const Oid types[2] = {INT8OID, TEXTOID};
	Datum		values[2];
	char	   *kind;
	const char *prev_op;
	int64		prev_amount;
	int64		prev_target;

	values[0] = Int64GetDatum(user_id);
	values[1] = PointerGetDatum(key);
	PointsPlanKey(&plan_key,
				  "SELECT " TX_COLS ", true FROM points.ledger"
				  " WHERE user_id = $1 AND idempotency_key = $2"
				  " UNION ALL "
				  "SELECT " TX_COLS ", true FROM points.ledger_archive"
				  " WHERE user_id = $1 AND idempotency_key = $2",
				  2, types);
	PointsExec(plan_key, values, NULL, false, 1);
	if (SPI_processed == 0)
		return false;

	kind = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, TXC_KIND);
	prev_op = KindOperation(kind);
	prev_amount = PointsGetInt64(0, TXC_AMOUNT, NULL);
	prev_amount = prev_amount < 0 ? -prev_amount : prev_amount;
	prev_target = PointsGetInt64(0, TXC_CANCELS, NULL);

	if (strcmp(prev_op, op) != 0 || (amount >= 0 && amount != prev_amount) ||
		prev_target != target)
	{
		char		what[64] = "";

		if (target != 0)
			snprintf(what, sizeof(what), " of transaction %lld", (long long) target);
		ereport(ERROR,
				(errcode(ERRCODE_POINTS_KEY_MISMATCH),
				 errmsg("%s", PointsKeyConflict(key, user_id,
												PointsGetInt64(0, TXC_TX_ID, NULL),
												kind, prev_amount)),
				 amount >= 0 ?
				 errdetail("This call is %s%s of %lld points.", op, what,
						   (long long) amount) :
				 errdetail("This call is %s%s.", op, what),
				 errhint("Use a new key for a different operation.")));
	}
	*result = PointsRowToComposite(fcinfo, outer, 0);
	return true;
}

/*
 * Checks of the arguments that earn, use and cancel share.
 */
static void
CheckAmount(int64 amount, const char *op, const char *whom, int64 id)
{
	if (amount <= 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("amount must be greater than zero, got %lld for %s of %s %lld",
						(long long) amount, op, whom, (long long) id)));
}

static Datum
ArgMetadata(FunctionCallInfo fcinfo, int argno, bool *isnull)
{
	Jsonb	   *j;

	*isnull = PG_ARGISNULL(argno);
	if (*isnull)
		return (Datum) 0;
	j = PG_GETARG_JSONB_P(argno);
	if (VARSIZE(j) - VARHDRSZ > POINTS_MAX_METADATA_BYTES)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("metadata is %d bytes long, at most %d are allowed",
						(int) (VARSIZE(j) - VARHDRSZ), POINTS_MAX_METADATA_BYTES)));
	return JsonbPGetDatum(j);
}

/*
 * PointsEarnArgs
 *		Read and check the arguments of points.earn, which points.earn_async
 *		shares (same names, positions and SQLSTATEs).  Whether expires_at is
 *		in the future is checked by PointsEarnCheckExpiry, which earn calls
 *		only when the call is not a replay of its idempotency key.
 */
void
PointsEarnArgs(FunctionCallInfo fcinfo, TimestampTz now, PointsEarnRequest *req)
{
	req->user_id = PointsArgInt64(fcinfo, 0, "user_id");
	req->amount = PointsArgInt64(fcinfo, 1, "amount");
	req->key = PointsArgText(fcinfo, 2, "idempotency_key", POINTS_MAX_KEY_BYTES);
	req->reason = PointsArgText(fcinfo, 4, "reason", POINTS_MAX_REASON_BYTES);
	req->metadata = ArgMetadata(fcinfo, 5, &req->metadata_null);
	CheckAmount(req->amount, "earn", "user", req->user_id);
	if (PG_ARGISNULL(3))
		req->expires_at = PointsTimestampPlusSeconds(now, points_default_validity);
	else
		req->expires_at = PG_GETARG_TIMESTAMPTZ(3);
}

/*
 * PointsEarnCheckExpiry
 *		An earn's expires_at must be in the future: 22023 otherwise.
 */
void
PointsEarnCheckExpiry(PointsEarnRequest *req, TimestampTz now)
{
	if (req->expires_at <= now)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("expires_at %s is not in the future, for earn of %lld points by user %lld",
						timestamptz_to_str(req->expires_at), (long long) req->amount,
						(long long) req->user_id),
				 errhint("Pass NULL for points.default_validity, or 'infinity' for points that never expire.")));
}

/*
 * points_earn
 *		points.earn(user_id, amount, idempotency_key, expires_at, reason,
 *		metadata): add a lot of amount points to the user.
 */
static Datum
EarnImpl(PG_FUNCTION_ARGS)
{
	TimestampTz now = GetCurrentTimestamp();
	MemoryContext outer = CurrentMemoryContext;
	PointsEarnRequest req;
	PointsAccount acct;
	PointsTxRow row;
	Datum		result;

	PointsEarnArgs(fcinfo, now, &req);

	SPI_connect();
	if (req.key && LookupKey(fcinfo, outer, req.user_id, req.key, "earn",
							 req.amount, 0, &result))
	{
		SPI_finish();
		PG_RETURN_DATUM(result);
	}
	/* a replay answers even when its expires_at has passed since */
	PointsEarnCheckExpiry(&req, now);
	PointsLockUser(req.user_id);
	if (req.key && LookupKey(fcinfo, outer, req.user_id, req.key, "earn",
							 req.amount, 0, &result))
	{
		SPI_finish();
		PG_RETURN_DATUM(result);
	}
	now = GetCurrentTimestamp();	/* after any wait for the lock */
	if (PG_ARGISNULL(3))
		req.expires_at = PointsTimestampPlusSeconds(now, points_default_validity);
	PointsLockAccount(req.user_id, true, &acct);
	PointsAppendTx(&acct, req.user_id, "earn", req.amount, req.key, 0, req.reason,
				   req.metadata, req.metadata_null, now, req.expires_at, true, &row);
	result = PointsValuesToComposite(fcinfo, outer, row.values, row.nulls, POINTS_TX_NATTS);
	SPI_finish();
	PG_RETURN_DATUM(result);
}

/*
 * points_earn
 *		The SQL entry point: EarnImpl, counted in points.stats().
 */
Datum
points_earn(PG_FUNCTION_ARGS)
{
	return PointsCounted(POINTS_OP_EARN, EarnImpl, fcinfo);
}

/*
 * SumOfColumn1
 *		The sum of the first (bigint) column of the last SPI result.
 */
static int64
SumOfColumn1(void)
{
	int64		sum = 0;

	for (uint64 i = 0; i < SPI_processed; i++)
		sum += PointsGetInt64(i, 1, NULL);
	return sum;
}

/*
 * Spendable
 *		Points of the user's lots that have not expired at "now": the
 *		account's balance less the lots past expires_at still holding points
 *		(few: the expiry job clears them), so the cost does not grow with
 *		the number of lots.  Read directly through lot_user_idx, or through
 *		SQL when that index is not what a direct read needs.
 */
static int64
Spendable(PointsAccount *acct, int64 user_id, TimestampTz now)
{
	static const Oid types[2] = {INT8OID, TIMESTAMPTZOID};
	Datum		values[2];
	Relation	lot = table_open(PointsRelid("lot"), AccessShareLock);
	Relation	index = PointsOpenLotUserIndex(lot);

	if (index)
	{
		PointsLotScan scan;
		PointsLot	l;
		int64		expired = 0;

		/* a snapshot of now, as a statement's: the user is locked */
		CommandCounterIncrement();
		PushActiveSnapshot(GetTransactionSnapshot());
		PointsLotScanBegin(&scan, lot, index);
		PointsLotScanUser(&scan, user_id, now, true);
		while (PointsLotScanNext(&scan, &l))
			expired += l.remaining; /* all lots sum to the balance: no overflow */
		PointsLotScanEnd(&scan);
		PopActiveSnapshot();
		index_close(index, NoLock);
		table_close(lot, NoLock);
		return acct->balance - expired;
	}
	table_close(lot, NoLock);

	values[0] = Int64GetDatum(user_id);
	values[1] = TimestampTzGetDatum(now);
	PointsPlanKey(&plan_spendable,
				  "SELECT coalesce(sum(remaining), 0)::int8 FROM points.lot"
				  " WHERE user_id = $1 AND remaining > 0 AND expires_at <= $2",
				  2, types);
	PointsExec(plan_spendable, values, NULL, false, 1);
	return acct->balance - PointsGetInt64(0, 1, NULL);
}

static void TakeFromLotsSQL(int64 user_id, int64 amount, TimestampTz now, int64 tx_id);

/*
 * TakeFromLots
 *		Take amount points from the user's unexpired lots in use order
 *		(soonest expires_at, then the oldest lot) and record each lot's part
 *		for use tx_id.  The lots are read in that order from the index and
 *		only as far as needed, however many lots the user has: directly
 *		(bulk.c, PointsLotScan), or through SQL when the tables or the
 *		index are not what that needs.
 */
static void
TakeFromLots(int64 user_id, int64 amount, TimestampTz now, int64 tx_id)
{
	static const char *const remaining[1] = {"remaining"};
	Oid			relids[2];
	PointsBulk *bulk = palloc(sizeof(PointsBulk));
	Relation	index;
	bool		direct;

	relids[0] = PointsRelid("lot");
	relids[1] = PointsRelid("use_lot");
	/* this transaction's writes so far are seen, and its writes here not */
	CommandCounterIncrement();
	PointsBulkBegin(bulk, relids, 2);
	index = PointsOpenLotUserIndex(bulk->tables[0].rel);
	direct = index != NULL && PointsBulkUsable(bulk);
	if (direct)
	{
		PointsLotScan scan;
		int			cap = 8;
		int			n = 0;
		PointsLot  *lots = palloc(sizeof(PointsLot) * cap);
		int64		left = amount;
		AttrNumber	u_tx = PointsBulkAttnum(bulk, 1, "use_tx") - 1,
					u_lot = PointsBulkAttnum(bulk, 1, "lot_id") - 1,
					u_taken = PointsBulkAttnum(bulk, 1, "taken") - 1;

		PushActiveSnapshot(GetTransactionSnapshot());
		PointsLotScanBegin(&scan, bulk->tables[0].rel, index);
		PointsLotScanUser(&scan, user_id, now, false);
		while (left > 0)
		{
			if (n == cap)
			{
				cap *= 2;
				lots = repalloc(lots, sizeof(PointsLot) * cap);
			}
			if (!PointsLotScanNext(&scan, &lots[n]))
				break;
			left -= Min(lots[n].remaining, left);
			n++;
		}
		PointsLotScanEnd(&scan);
		if (left != 0)
			elog(ERROR, "points: use %lld of user %lld found %lld points fewer in its lots than spendable",
				 (long long) tx_id, (long long) user_id, (long long) left);

		/* each lot's part taken, and recorded for the use */
		left = amount;
		for (int i = 0; i < n; i++)
		{
			int64		part = Min(lots[i].remaining, left);
			Datum		rest = Int64GetDatum(lots[i].remaining - part);
			TupleTableSlot *slot;

			PointsBulkUpdate(bulk, 0, &lots[i].tid, 1, remaining, &rest, NULL);
			slot = PointsBulkSlot(bulk, 1);
			slot->tts_values[u_tx] = Int64GetDatum(tx_id);
			slot->tts_isnull[u_tx] = false;
			slot->tts_values[u_lot] = Int64GetDatum(lots[i].lot_id);
			slot->tts_isnull[u_lot] = false;
			slot->tts_values[u_taken] = Int64GetDatum(part);
			slot->tts_isnull[u_taken] = false;
			PointsBulkAdd(bulk, 1);
			left -= part;
		}
		PopActiveSnapshot();
	}
	if (index)
		index_close(index, NoLock);
	PointsBulkEnd(bulk);
	pfree(bulk);
	if (!direct)
		TakeFromLotsSQL(user_id, amount, now, tx_id);
}

/*
 * TakeFromLotsSQL
 *		TakeFromLots through SQL, for a lot or use_lot table with triggers
 *		or rules, or without a valid lot_user_idx.
 */
static void
TakeFromLotsSQL(int64 user_id, int64 amount, TimestampTz now, int64 tx_id)
{
	static const Oid lot_types[2] = {INT8OID, TIMESTAMPTZOID};
	static const Oid take_types[3] = {INT8ARRAYOID, INT8ARRAYOID, INT8OID};
	Datum		values[3];
	Portal		portal;
	int64		left = amount;
	int			n = 0;
	int			cap = 16;
	Datum	   *lots = palloc(sizeof(Datum) * cap);
	Datum	   *parts = palloc(sizeof(Datum) * cap);

	values[0] = Int64GetDatum(user_id);
	values[1] = TimestampTzGetDatum(now);
	PointsPlanKey(&plan_lots_in_order,
				  "SELECT lot_id, remaining FROM points.lot"
				  " WHERE user_id = $1 AND remaining > 0 AND expires_at > $2"
				  " ORDER BY expires_at, lot_id",
				  2, lot_types);
	portal = SPI_cursor_open(NULL, plan_lots_in_order, values, NULL, false);
	while (left > 0)
	{
		SPI_cursor_fetch(portal, true, 16);
		if (SPI_processed == 0)
			break;
		for (uint64 i = 0; i < SPI_processed && left > 0; i++)
		{
			int64		remaining = PointsGetInt64(i, 2, NULL);
			int64		part = Min(remaining, left);

			if (n == cap)
			{
				cap *= 2;
				lots = repalloc(lots, sizeof(Datum) * cap);
				parts = repalloc(parts, sizeof(Datum) * cap);
			}
			lots[n] = Int64GetDatum(PointsGetInt64(i, 1, NULL));
			parts[n++] = Int64GetDatum(part);
			left -= part;
		}
	}
	SPI_cursor_close(portal);
	if (left != 0)
		elog(ERROR, "points: use %lld of user %lld found %lld points fewer in its lots than spendable",
			 (long long) tx_id, (long long) user_id, (long long) left);

	values[0] = PointerGetDatum(construct_array(lots, n, INT8OID, 8, true, TYPALIGN_DOUBLE));
	values[1] = PointerGetDatum(construct_array(parts, n, INT8OID, 8, true, TYPALIGN_DOUBLE));
	values[2] = Int64GetDatum(tx_id);
	PointsPlanKey(&plan_consume,
				  "WITH p AS (SELECT * FROM unnest($1, $2) AS p(lot_id, part)),"
				  " u AS ("
				  "  UPDATE points.lot l SET remaining = l.remaining - p.part"
				  "  FROM p WHERE l.lot_id = p.lot_id)"
				  " INSERT INTO points.use_lot (use_tx, lot_id, taken)"
				  " SELECT $3, lot_id, part FROM p",
				  3, take_types);
	PointsExec(plan_consume, values, NULL, false, 0);
}

/*
 * points_use
 *		points.use(user_id, amount, idempotency_key, reason, metadata):
 *		spend amount points, taking them from the lots that expire soonest
 *		(ties: the oldest lot first), and record what came from which lot.
 */
static Datum
UseImpl(PG_FUNCTION_ARGS)
{
	int64		user_id = PointsArgInt64(fcinfo, 0, "user_id");
	int64		amount = PointsArgInt64(fcinfo, 1, "amount");
	text	   *key = PointsArgText(fcinfo, 2, "idempotency_key", POINTS_MAX_KEY_BYTES);
	text	   *reason = PointsArgText(fcinfo, 3, "reason", POINTS_MAX_REASON_BYTES);
	bool		metadata_null;
	Datum		metadata = ArgMetadata(fcinfo, 4, &metadata_null);
	TimestampTz now = GetCurrentTimestamp();
	MemoryContext outer = CurrentMemoryContext;
	PointsAccount acct;
	PointsTxRow row;
	int64		spendable;
	int64		tx_id;
	Datum		result;

	CheckAmount(amount, "use", "user", user_id);

	SPI_connect();
	if (key && LookupKey(fcinfo, outer, user_id, key, "use", amount, 0, &result))
	{
		SPI_finish();
		PG_RETURN_DATUM(result);
	}
	PointsLockUser(user_id);
	if (key && LookupKey(fcinfo, outer, user_id, key, "use", amount, 0, &result))
	{
		SPI_finish();
		PG_RETURN_DATUM(result);
	}
	now = GetCurrentTimestamp();	/* lots may have expired while we waited */
	PointsLockAccount(user_id, false, &acct);
	spendable = acct.exists ? Spendable(&acct, user_id, now) : 0;
	if (spendable < amount)
		ereport(ERROR,
				(errcode(ERRCODE_POINTS_INSUFFICIENT),
				 errmsg("user %lld has %lld spendable points, %lld requested",
						(long long) user_id, (long long) spendable,
						(long long) amount)));

	PointsAppendTx(&acct, user_id, "use", -amount, key, 0, reason,
				   metadata, metadata_null, now, 0, false, &row);
	tx_id = DatumGetInt64(row.values[0]);
	result = PointsValuesToComposite(fcinfo, outer, row.values, row.nulls, POINTS_TX_NATTS);

	/* take from the lots in use order, recording each lot's part */
	TakeFromLots(user_id, amount, now, tx_id);

	SPI_finish();
	PG_RETURN_DATUM(result);
}

/*
 * points_use
 *		The SQL entry point: UseImpl, counted in points.stats().
 */
Datum
points_use(PG_FUNCTION_ARGS)
{
	return PointsCounted(POINTS_OP_USE, UseImpl, fcinfo);
}

/*
 * CancelEarn
 *		Take "part" points back out of the lot of earn tx_id, if the lot still
 *		holds them unexpired.
 */
static void
CancelEarn(int64 user_id, int64 tx_id, int64 part, TimestampTz now)
{
	static const Oid types[3] = {INT8OID, TIMESTAMPTZOID, INT8OID};
	Datum		values[3];
	int64		held;

	values[0] = Int64GetDatum(tx_id);
	values[1] = TimestampTzGetDatum(now);
	values[2] = Int64GetDatum(part);
	PointsPlanKey(&plan_lot,
				  "SELECT CASE WHEN expires_at > $2 THEN remaining ELSE 0 END"
				  " FROM points.lot WHERE lot_id = $1",
				  2, types);
	PointsExec(plan_lot, values, NULL, false, 1);
	held = SPI_processed ? PointsGetInt64(0, 1, NULL) : 0;
	if (held < part)
		ereport(ERROR,
				(errcode(ERRCODE_POINTS_INSUFFICIENT),
				 errmsg("user %lld has %lld spendable points left from transaction %lld, %lld requested to cancel",
						(long long) user_id, (long long) held, (long long) tx_id,
						(long long) part),
				 errdetail("The other points of that earn were used or have expired.")));
	PointsPlanKey(&plan_lot_take,
				  "UPDATE points.lot SET remaining = remaining - $3 WHERE lot_id = $1",
				  3, types);
	PointsExec(plan_lot_take, values, NULL, false, 0);
}

/*
 * CancelUse
 *		Give "part" points of use tx_id back to the lots they came from, the
 *		lots that expire last first (the reverse of the use's order).
 */
static void
CancelUse(int64 user_id, int64 tx_id, int64 part)
{
	static const Oid types[2] = {INT8OID, INT8OID};
	Datum		values[2];
	int64		given;

	values[0] = Int64GetDatum(tx_id);
	values[1] = Int64GetDatum(part);
	PointsPlanKey(&plan_restore,
				  "WITH c AS ("
				  "  SELECT u.lot_id, u.taken - u.restored AS open,"
				  "         sum(u.taken - u.restored)"
				  "           OVER (ORDER BY l.expires_at DESC, u.lot_id DESC) AS upto"
				  "  FROM points.use_lot u JOIN points.lot l ON l.lot_id = u.lot_id"
				  "  WHERE u.use_tx = $1 AND u.taken > u.restored),"
				  " p AS ("
				  "  SELECT lot_id, least(open, $2 - (upto - open))::int8 AS part"
				  "  FROM c WHERE upto - open < $2),"
				  " r AS ("
				  "  UPDATE points.use_lot u SET restored = u.restored + p.part"
				  "  FROM p WHERE u.use_tx = $1 AND u.lot_id = p.lot_id)"
				  " UPDATE points.lot l SET remaining = l.remaining + p.part"
				  " FROM p WHERE l.lot_id = p.lot_id RETURNING p.part",
				  2, types);
	PointsExec(plan_restore, values, NULL, false, 0);
	given = SumOfColumn1();
	if (given != part)
		elog(ERROR, "points: cancel of use %lld of user %lld restored %lld points, expected %lld",
			 (long long) tx_id, (long long) user_id, (long long) given,
			 (long long) part);
}

/*
 * points_cancel
 *		points.cancel(tx_id, amount, idempotency_key, reason): undo all or
 *		part of an earn or a use, as a new transaction of the same user.
 */
static Datum
CancelImpl(PG_FUNCTION_ARGS)
{
	int64		tx_id = PointsArgInt64(fcinfo, 0, "tx_id");
	int64		amount = PG_ARGISNULL(1) ? -1 : PG_GETARG_INT64(1);
	text	   *key = PointsArgText(fcinfo, 2, "idempotency_key", POINTS_MAX_KEY_BYTES);
	text	   *reason = PointsArgText(fcinfo, 3, "reason", POINTS_MAX_REASON_BYTES);
	TimestampTz now = GetCurrentTimestamp();
	MemoryContext outer = CurrentMemoryContext;
	static const Oid types[1] = {INT8OID};
	Datum		values[1];
	PointsAccount acct;
	PointsTxRow row;
	int64		user_id;
	int64		original;
	int64		cancelled;
	int64		left;
	int64		part;
	char	   *kind;
	bool		is_earn;
	Datum		result;

	if (!PG_ARGISNULL(1))
		CheckAmount(amount, "cancel", "transaction", tx_id);

	SPI_connect();
	values[0] = Int64GetDatum(tx_id);
	PointsPlanKey(&plan_fetch,
				  "SELECT " TX_COLS " FROM points.ledger WHERE tx_id = $1"
				  " UNION ALL "
				  "SELECT " TX_COLS " FROM points.ledger_archive WHERE tx_id = $1",
				  1, types);
	PointsExec(plan_fetch, values, NULL, false, 1);
	if (SPI_processed == 0)
		ereport(ERROR,
				(errcode(ERRCODE_NO_DATA_FOUND),
				 errmsg("transaction %lld does not exist", (long long) tx_id)));
	user_id = PointsGetInt64(0, TXC_USER_ID, NULL);
	kind = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, TXC_KIND);
	original = PointsGetInt64(0, TXC_AMOUNT, NULL);
	original = original < 0 ? -original : original;
	is_earn = strcmp(kind, "earn") == 0;

	if (key && LookupKey(fcinfo, outer, user_id, key, "cancel", amount, tx_id, &result))
	{
		SPI_finish();
		PG_RETURN_DATUM(result);
	}
	if (!is_earn && strcmp(kind, "use") != 0)
		ereport(ERROR,
				(errcode(ERRCODE_POINTS_CANCEL_DENIED),
				 errmsg("transaction %lld of user %lld is of kind %s: only earn and use can be cancelled",
						(long long) tx_id, (long long) user_id, kind)));

	PointsLockUser(user_id);
	if (key && LookupKey(fcinfo, outer, user_id, key, "cancel", amount, tx_id, &result))
	{
		SPI_finish();
		PG_RETURN_DATUM(result);
	}
	now = GetCurrentTimestamp();	/* lots may have expired while we waited */
	PointsLockAccount(user_id, false, &acct);
	if (!acct.exists)
		elog(ERROR, "points: account of user %lld is missing", (long long) user_id);

	PointsPlanKey(&plan_cancelled,
				  "SELECT coalesce(sum(-amount), 0)::int8 FROM ("
				  " SELECT amount FROM points.ledger WHERE cancels_tx = $1"
				  " UNION ALL"
				  " SELECT amount FROM points.ledger_archive WHERE cancels_tx = $1) c",
				  1, types);
	PointsExec(plan_cancelled, values, NULL, false, 1);
	cancelled = PointsGetInt64(0, 1, NULL);
	if (!is_earn)
		cancelled = -cancelled; /* use_cancel amounts are positive */
	left = original - cancelled;
	part = amount < 0 ? left : amount;
	if (left == 0)
		ereport(ERROR,
				(errcode(ERRCODE_POINTS_CANCEL_DENIED),
				 errmsg("transaction %lld of user %lld (%s of %lld points) is already fully cancelled",
						(long long) tx_id, (long long) user_id, kind,
						(long long) original)));
	if (part > left)
		ereport(ERROR,
				(errcode(ERRCODE_POINTS_CANCEL_DENIED),
				 errmsg("cannot cancel %lld points of transaction %lld of user %lld: %lld of its %lld points are left to cancel",
						(long long) part, (long long) tx_id, (long long) user_id,
						(long long) left, (long long) original)));

	if (is_earn)
	{
		CancelEarn(user_id, tx_id, part, now);
		PointsAppendTx(&acct, user_id, "earn_cancel", -part, key, tx_id,
					   reason, (Datum) 0, true, now, 0, false, &row);
		result = PointsValuesToComposite(fcinfo, outer, row.values, row.nulls,
										 POINTS_TX_NATTS);
	}
	else
	{
		/* check overflow before touching the lots */
		PointsAppendTx(&acct, user_id, "use_cancel", part, key, tx_id,
					   reason, (Datum) 0, true, now, 0, false, &row);
		result = PointsValuesToComposite(fcinfo, outer, row.values, row.nulls,
										 POINTS_TX_NATTS);
		CancelUse(user_id, tx_id, part);
	}
	SPI_finish();
	PG_RETURN_DATUM(result);
}

/*
 * points_cancel
 *		The SQL entry point: CancelImpl, counted in points.stats().
 */
Datum
points_cancel(PG_FUNCTION_ARGS)
{
	return PointsCounted(POINTS_OP_CANCEL, CancelImpl, fcinfo);
}
