/*-------------------------------------------------------------------------
 *
 * catalog.c
 *	  The extension's relations by name, and the indexes its direct reads
 *	  rely on, looked up once a backend and kept until the catalog changes.
 *
 * Every call finds points.account, points.lot, ... by name (the OIDs change
 * when the extension is made again), and each direct read checks that its
 * index is still what it relies on (valid, btree, the leading columns in
 * order).  Done from the catalog caches every time, that was six to nine
 * name lookups and two or three index checks a call, ~15,000 instructions
 * of an earn's ~345,000.  Here the answers are kept in a small per-backend
 * cache, emptied by a relcache callback for any relation it names (DROP,
 * RENAME, ALTER TABLE, CREATE/DROP/REINDEX INDEX: each invalidates the
 * relation's relcache entry, also when rolled back) and by a syscache
 * callback on pg_namespace (a renamed or dropped schema).  Invalidations
 * are taken at transaction start and whenever a lock is acquired, so a
 * cached OID is as fresh as a name lookup made at the same moment.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/genam.h"
#include "access/table.h"
#include "catalog/namespace.h"
#include "catalog/pg_am.h"
#include "parser/parse_relation.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"
#include "utils/syscache.h"

#include "points.h"

typedef struct CachedRel
{
	char		name[NAMEDATALEN];
	Oid			relid;
	/* an index checked by PointsOpenIndex: for which table and columns */
	Oid			table;			/* InvalidOid: not checked */
	const char *const *cols;
	bool		usable;
} CachedRel;

#define CACHED_MAX	16

static CachedRel cached[CACHED_MAX];
static int	ncached = 0;
static Oid	schema = InvalidOid;	/* of points, InvalidOid: not looked up */
static uint64 generation = 0;	/* bumped whenever the cache is emptied */
static bool callbacks = false;

static void
Forget(void)
{
	ncached = 0;
	schema = InvalidOid;
	generation++;
}

static void
RelcacheChanged(Datum arg, Oid relid)
{
	if (relid == InvalidOid)
	{
		Forget();
		return;
	}
	for (int i = 0; i < ncached; i++)
		if (cached[i].relid == relid || cached[i].table == relid)
		{
			Forget();
			return;
		}
}

static void
NamespaceChanged(Datum arg, int cacheid, uint32 hashvalue)
{
	Forget();
}

static CachedRel *
Find(const char *name)
{
	for (int i = 0; i < ncached; i++)
		if (strcmp(cached[i].name, name) == 0)
			return &cached[i];
	return NULL;
}

/*
 * Lookup
 *		The OID of relation points.<name> (InvalidOid if there is none), and
 *		in *entry its cache entry (NULL when the cache is full).
 */
static Oid
Lookup(const char *name, CachedRel **entry)
{
	CachedRel  *c = Find(name);
	uint64		before = generation;
	Oid			nsp;
	Oid			relid;

	*entry = c;
	if (c != NULL)
		return c->relid;
	if (!callbacks)
	{
		CacheRegisterRelcacheCallback(RelcacheChanged, (Datum) 0);
		CacheRegisterSyscacheCallback(NAMESPACEOID, NamespaceChanged, (Datum) 0);
		callbacks = true;
	}
	nsp = OidIsValid(schema) ? schema : get_namespace_oid("points", false);
	relid = get_relname_relid(name, nsp);
	/* kept only if no invalidation came meanwhile (a catalog read on a
	 * cache miss takes them): the answers may predate it */
	if (generation != before)
		return relid;
	schema = nsp;
	if (OidIsValid(relid) && ncached < CACHED_MAX && strlen(name) < NAMEDATALEN)
	{
		c = &cached[ncached++];
		strlcpy(c->name, name, NAMEDATALEN);
		c->relid = relid;
		c->table = InvalidOid;
		c->cols = NULL;
		c->usable = false;
		*entry = c;
	}
	return relid;
}

/*
 * PointsRelid
 *		The OID of relation points.<name>; an error if it is missing.
 */
Oid
PointsRelid(const char *name)
{
	CachedRel  *c;
	Oid			relid = Lookup(name, &c);

	if (!OidIsValid(relid))
		elog(ERROR, "points: relation points.%s is missing", name);
	return relid;
}

/*
 * CheckIndex
 *		Whether open index index of open table rel is a valid btree whose
 *		leading key columns are cols[], each ascending, usable by any
 *		snapshot.
 */
static bool
CheckIndex(Relation rel, Relation index, const char *const *cols)
{
	Form_pg_index form = index->rd_index;
	bool		ok;

	ok = form->indrelid == RelationGetRelid(rel) && form->indisvalid &&
		!form->indcheckxmin && index->rd_rel->relam == BTREE_AM_OID;
	for (int c = 0; ok && cols[c] != NULL; c++)
		ok = c < form->indnkeyatts &&
			form->indkey.values[c] == attnameAttNum(rel, cols[c], false) &&
			index->rd_indoption[c] == 0;
	return ok;
}

/*
 * PointsOpenIndex
 *		Index points.<name> of the open table points.<table> rel, open, if
 *		it is a valid btree whose leading key columns are cols[]
 *		(NULL-terminated, a static array: its address names the check in
 *		the cache), each ascending, and usable by any snapshot: what a
 *		direct read in its order needs.  NULL otherwise (missing, being
 *		built or dropped, changed by hand): the caller reads through SQL.
 */
Relation
PointsOpenIndex(Relation rel, const char *name, const char *const *cols)
{
	uint64		before = generation;
	CachedRel  *c;
	Oid			id = Lookup(name, &c);
	bool		known;
	bool		ok;
	Relation	index;

	if (!OidIsValid(id))
		return NULL;
	known = c != NULL && c->table == RelationGetRelid(rel) && c->cols == cols;
	if (known && !c->usable)
		return NULL;
	index = index_open(id, AccessShareLock);
	if (generation != before)
		ok = CheckIndex(rel, index, cols);	/* the catalog changed meanwhile */
	else if (known)
		ok = true;
	else
	{
		ok = CheckIndex(rel, index, cols);
		if (c != NULL)
		{
			c->table = RelationGetRelid(rel);
			c->cols = cols;
			c->usable = ok;
		}
	}
	if (ok)
		return index;
	index_close(index, AccessShareLock);
	return NULL;
}

/*
 * PointsOpenLotUserIndex
 *		lot_user_idx of table lot: (user_id, expires_at, lot_id), a user's
 *		lots in use order.
 */
Relation
PointsOpenLotUserIndex(Relation lot)
{
	static const char *const cols[] = {"user_id", "expires_at", "lot_id", NULL};

	return PointsOpenIndex(lot, "lot_user_idx", cols);
}
