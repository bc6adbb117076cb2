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

/*
 * An object's pairs set one by one, in jsonb's key order (shorter keys
 * first, then bytewise): what pushJsonbValue would sort them into, without
 * its parse state, growing arrays and sort.
 */
static void
SetKey(JsonbPair *p, const char *key)
{
	p->key.type = jbvString;
	p->key.val.string.val = (char *) key;
	p->key.val.string.len = strlen(key);
	p->order = 0;
}

static void
SetInt(JsonbPair *p, const char *key, int64 value, bool isnull)
{
	SetKey(p, key);
	if (isnull)
		p->value.type = jbvNull;
	else
	{
		p->value.type = jbvNumeric;
		p->value.val.numeric = int64_to_numeric(value);
	}
}

static void
SetString(JsonbPair *p, const char *key, const char *s, int len)
{
	SetKey(p, key);
	if (s == NULL)
		p->value.type = jbvNull;
	else
	{
		p->value.type = jbvString;
		p->value.val.string.val = (char *) s;
		p->value.val.string.len = len;
	}
}

static void
SetText(JsonbPair *p, const char *key, text *t)
{
	if (t == NULL)
		SetString(p, key, NULL, 0);
	else
	{
		text	   *u = pg_detoast_datum_packed(t);

		SetString(p, key, VARDATA_ANY(u), VARSIZE_ANY_EXHDR(u));
	}
}

static JsonbValue *
MakeObject(JsonbPair *pairs, int n)
{
	JsonbValue *v = palloc(sizeof(JsonbValue));

	v->type = jbvObject;
	v->val.object.nPairs = n;
	v->val.object.pairs = pairs;
	return v;
}

/*
 * TreeOf
 *		The container that the iterator just opened (tok, v: its
 *		WJB_BEGIN_OBJECT or WJB_BEGIN_ARRAY) as a tree of JsonbValues, its
 *		strings and numerics pointing into the jsonb.  The jsonb's keys are
 *		sorted and unique already: no parse state to sort them again.
 */
static void
TreeOf(JsonbIterator **it, JsonbIteratorToken tok, JsonbValue *v)
{
	JsonbValue	x;

	if (tok == WJB_BEGIN_OBJECT)
	{
		int			n = v->val.object.nPairs;
		JsonbPair  *pairs = palloc(sizeof(JsonbPair) * (n + 1));

		for (int i = 0; i < n; i++)
		{
			if (JsonbIteratorNext(it, &pairs[i].key, false) != WJB_KEY)
				elog(ERROR, "points: bad jsonb object");
			pairs[i].order = i;
			tok = JsonbIteratorNext(it, &x, false);
			if (tok == WJB_BEGIN_OBJECT || tok == WJB_BEGIN_ARRAY)
				TreeOf(it, tok, &x);
			pairs[i].value = x;
		}
		v->val.object.pairs = pairs;
	}
	else
	{
		int			n = v->val.array.nElems;
		JsonbValue *elems = palloc(sizeof(JsonbValue) * (n + 1));

		for (int i = 0; i < n; i++)
		{
			tok = JsonbIteratorNext(it, &x, false);
			if (tok == WJB_BEGIN_OBJECT || tok == WJB_BEGIN_ARRAY)
				TreeOf(it, tok, &x);
			elems[i] = x;
		}
		v->val.array.elems = elems;
	}
	tok = JsonbIteratorNext(it, &x, false);	/* its end */
	if (tok != WJB_END_OBJECT && tok != WJB_END_ARRAY)
		elog(ERROR, "points: bad jsonb container");
}

/*
 * Tree
 *		A jsonb value (object, array or scalar; (Datum) 0 for SQL NULL, a
 *		JSON null) as a JsonbValue, to become part of another.
 */
static JsonbValue *
Tree(Datum value)
{
	Jsonb	   *jb;
	JsonbValue *res = palloc(sizeof(JsonbValue));
	JsonbIterator *it;

	if (value == (Datum) 0)
	{
		res->type = jbvNull;
		return res;
	}
	jb = DatumGetJsonbP(value);
	if (JB_ROOT_IS_SCALAR(jb))
	{
		if (!JsonbExtractScalar(&jb->root, res))
			elog(ERROR, "points: bad scalar jsonb");
		return res;
	}
	it = JsonbIteratorInit(&jb->root);
	TreeOf(&it, JsonbIteratorNext(&it, res, false), res);
	return res;
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
	const char *type = PointsEventType(kind);
	char		when[40];
	int			len = PointsFormatTime(occurred_at, when);
	MemoryContext outer = BeginBuild();
	JsonbPair  *p = palloc(sizeof(JsonbPair) * 13);

	SetString(&p[0], "kind", kind, strlen(kind));
	SetString(&p[1], "type", type, strlen(type));
	SetInt(&p[2], "tx_id", tx_id, false);
	SetInt(&p[3], "amount", amount, false);
	SetText(&p[4], "reason", reason);
	SetInt(&p[5], "user_id", user_id, false);
	SetInt(&p[6], "event_id", tx_id, false);
	SetKey(&p[7], "metadata");
	p[7].value = *Tree(metadata);
	SetInt(&p[8], "user_seq", user_seq, false);
	SetInt(&p[9], "cancels_tx", cancels_tx, cancels_tx == 0);
	SetString(&p[10], "occurred_at", when, len);
	SetInt(&p[11], "balance_after", balance_after, false);
	SetText(&p[12], "idempotency_key", key);
	return EndBuild(outer, MakeObject(p, 13));
}

/*
 * PointsLotsMetadata
 *		{"lots": [{"lot_id": N, "amount": n}, ...]}, the metadata of an
 *		expire transaction: the lots it emptied and the points each held.
 */
Datum
PointsLotsMetadata(const int64 *lot_ids, const int64 *amounts, int n)
{
	MemoryContext outer = BeginBuild();
	JsonbValue *lots = palloc(sizeof(JsonbValue));
	JsonbPair  *top = palloc(sizeof(JsonbPair));
	JsonbPair  *p = palloc(sizeof(JsonbPair) * 2 * (n + 1));

	lots->type = jbvArray;
	lots->val.array.nElems = n;
	lots->val.array.rawScalar = false;
	lots->val.array.elems = palloc(sizeof(JsonbValue) * (n + 1));
	for (int i = 0; i < n; i++)
	{
		SetInt(&p[2 * i], "amount", amounts[i], false);
		SetInt(&p[2 * i + 1], "lot_id", lot_ids[i], false);
		lots->val.array.elems[i].type = jbvObject;
		lots->val.array.elems[i].val.object.nPairs = 2;
		lots->val.array.elems[i].val.object.pairs = &p[2 * i];
	}
	SetKey(&top[0], "lots");
	top[0].value = *lots;
	return EndBuild(outer, MakeObject(top, 1));
}
