/*-------------------------------------------------------------------------
 *
 * event.c
 *	  The outbox event of a ledger transaction, built in C, and the
 *	  transaction ids it carries.
 *
 * Every ledger write appends one event (SPEC.md, "Events"): a JSON object
 * with event_id (= tx_id), type, user_id, user_seq, tx_id, kind, amount,
 * balance_after, occurred_at (ISO 8601, UTC, microseconds), idempotency_key,
 * cancels_tx, reason and metadata.  Building it here rather than with
 * jsonb_build_object() and to_char() in the append statement saves a
 * per-argument type lookup and a formatting-template parse for every row;
 * for that the tx_id is drawn here too, before the statement runs.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/namespace.h"
#include "commands/sequence.h"
#include "utils/builtins.h"
#include "utils/datetime.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/numeric.h"
#include "utils/timestamp.h"

#include "points.h"

/*
 * PointsRelid
 *		The OID of relation points.<name>, from the catalog caches (it
 *		changes when the extension is made again); an error if it is missing.
 */
Oid
PointsRelid(const char *name)
{
	Oid			relid = get_relname_relid(name, get_namespace_oid("points", false));

	if (!OidIsValid(relid))
		elog(ERROR, "points: relation points.%s is missing", name);
	return relid;
}

/*
 * PointsNextTxId
 *		A new tx_id: the node prefix in the top 23 bits, the sequence below.
 */
int64
PointsNextTxId(Oid seq)
{
	/*
	 * The transaction gets its xid before it draws the id: the relay
	 * (kafka.c) reads on past an id only once every transaction that had an
	 * xid when the id was drawn has ended, which then covers this one.
	 */
	(void) GetTopTransactionId();
	return ((int64) points_node_id << 40) + nextval_internal(seq, true);
}

/*
 * The parse state and the numerics of a built object are garbage once the
 * jsonb is made: build in a context of our own and reset it after each, so
 * that a batch of thousands of events does not grow the caller's memory by
 * megabytes (page faults were a fifth of an expiry batch).
 */
static MemoryContext build_cxt = NULL;

static MemoryContext
BeginBuild(void)
{
	if (build_cxt == NULL)
		build_cxt = AllocSetContextCreate(TopMemoryContext, "points event",
										  ALLOCSET_DEFAULT_SIZES);
	return MemoryContextSwitchTo(build_cxt);
}

static Datum
EndBuild(MemoryContext outer, JsonbValue *res)
{
	Jsonb	   *built = JsonbValueToJsonb(res);

	MemoryContextSwitchTo(outer);
	built = (Jsonb *) pg_detoast_datum_copy((struct varlena *) built);
	MemoryContextReset(build_cxt);
	return JsonbPGetDatum(built);
}

static void
PushKey(JsonbParseState **st, const char *key)
{
	JsonbValue	v;

	v.type = jbvString;
	v.val.string.val = (char *) key;
	v.val.string.len = strlen(key);
	(void) pushJsonbValue(st, WJB_KEY, &v);
}

static void
PushInt(JsonbParseState **st, const char *key, int64 value, bool isnull)
{
	JsonbValue	v;

	PushKey(st, key);
	if (isnull)
		v.type = jbvNull;
	else
	{
		v.type = jbvNumeric;
		v.val.numeric = int64_to_numeric(value);
	}
	(void) pushJsonbValue(st, WJB_VALUE, &v);
}

static void
PushString(JsonbParseState **st, const char *key, const char *s, int len)
{
	JsonbValue	v;

	PushKey(st, key);
	if (s == NULL)
		v.type = jbvNull;
	else
	{
		v.type = jbvString;
		v.val.string.val = (char *) s;
		v.val.string.len = len;
	}
	(void) pushJsonbValue(st, WJB_VALUE, &v);
}

static void
PushText(JsonbParseState **st, const char *key, text *t)
{
	if (t == NULL)
		PushString(st, key, NULL, 0);
	else
	{
		text	   *u = pg_detoast_datum_packed(t);

		PushString(st, key, VARDATA_ANY(u), VARSIZE_ANY_EXHDR(u));
	}
}

/* a jsonb value (object, array or scalar) as the value of key */
static void
PushJsonb(JsonbParseState **st, const char *key, Datum value)
{
	Jsonb	   *jb;
	JsonbValue	v;
	JsonbIterator *it;
	JsonbIteratorToken tok;

	PushKey(st, key);
	if (value == (Datum) 0)
	{
		v.type = jbvNull;
		(void) pushJsonbValue(st, WJB_VALUE, &v);
		return;
	}
	jb = DatumGetJsonbP(value);
	if (JB_ROOT_IS_SCALAR(jb))
	{
		if (!JsonbExtractScalar(&jb->root, &v))
			elog(ERROR, "points: bad scalar jsonb");
		(void) pushJsonbValue(st, WJB_VALUE, &v);
		return;
	}
	it = JsonbIteratorInit(&jb->root);
	while ((tok = JsonbIteratorNext(&it, &v, false)) != WJB_DONE)
	{
		if (tok == WJB_END_ARRAY || tok == WJB_END_OBJECT ||
			tok == WJB_BEGIN_ARRAY || tok == WJB_BEGIN_OBJECT)
			(void) pushJsonbValue(st, tok, NULL);
		else
			(void) pushJsonbValue(st, tok, &v);
	}
}

/*
 * PointsFormatTime
 *		t as 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"' in UTC (what to_char() with
 *		that template gives); buf holds at least 40 bytes.
 */
int
PointsFormatTime(TimestampTz t, char *buf)
{
	struct pg_tm tm;
	fsec_t		fsec;

	if (TIMESTAMP_NOT_FINITE(t) || timestamp2tm(t, NULL, &tm, &fsec, NULL, NULL) != 0)
		ereport(ERROR,
				(errcode(ERRCODE_DATETIME_VALUE_OUT_OF_RANGE),
				 errmsg("timestamp out of range")));
	return snprintf(buf, 40, "%04d-%02d-%02dT%02d:%02d:%02d.%06dZ",
					tm.tm_year > 0 ? tm.tm_year : -(tm.tm_year - 1),
					tm.tm_mon, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
					(int) fsec);
}

/*
 * PointsEventPayload
 *		The event of one ledger transaction, as jsonb.  key, reason: NULL for
 *		none; cancels_tx: 0 for none; metadata: (Datum) 0 for none.
 */
Datum
PointsEventPayload(int64 tx_id, int64 user_id, int64 user_seq,
				   const char *kind, int64 amount, int64 balance_after,
				   TimestampTz occurred_at, text *key, int64 cancels_tx,
				   text *reason, Datum metadata)
{
	JsonbParseState *st = NULL;
	const char *type = PointsEventType(kind);
	char		when[40];
	int			len = PointsFormatTime(occurred_at, when);
	MemoryContext outer = BeginBuild();

	(void) pushJsonbValue(&st, WJB_BEGIN_OBJECT, NULL);
	PushInt(&st, "event_id", tx_id, false);
	PushString(&st, "type", type, strlen(type));
	PushInt(&st, "user_id", user_id, false);
	PushInt(&st, "user_seq", user_seq, false);
	PushInt(&st, "tx_id", tx_id, false);
	PushString(&st, "kind", kind, strlen(kind));
	PushInt(&st, "amount", amount, false);
	PushInt(&st, "balance_after", balance_after, false);
	PushString(&st, "occurred_at", when, len);
	PushText(&st, "idempotency_key", key);
	PushInt(&st, "cancels_tx", cancels_tx, cancels_tx == 0);
	PushText(&st, "reason", reason);
	PushJsonb(&st, "metadata", metadata);
	return EndBuild(outer, pushJsonbValue(&st, WJB_END_OBJECT, NULL));
}

/*
 * PointsLotsMetadata
 *		{"lots": [{"lot_id": N, "amount": n}, ...]}, the metadata of an
 *		expire transaction: the lots it emptied and the points each held.
 */
Datum
PointsLotsMetadata(const int64 *lot_ids, const int64 *amounts, int n)
{
	JsonbParseState *st = NULL;
	MemoryContext outer = BeginBuild();
	int			i;

	(void) pushJsonbValue(&st, WJB_BEGIN_OBJECT, NULL);
	PushKey(&st, "lots");
	(void) pushJsonbValue(&st, WJB_BEGIN_ARRAY, NULL);
	for (i = 0; i < n; i++)
	{
		(void) pushJsonbValue(&st, WJB_BEGIN_OBJECT, NULL);
		PushInt(&st, "lot_id", lot_ids[i], false);
		PushInt(&st, "amount", amounts[i], false);
		(void) pushJsonbValue(&st, WJB_END_OBJECT, NULL);
	}
	(void) pushJsonbValue(&st, WJB_END_ARRAY, NULL);
	return EndBuild(outer, pushJsonbValue(&st, WJB_END_OBJECT, NULL));
}
