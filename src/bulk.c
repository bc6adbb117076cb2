/*-------------------------------------------------------------------------
 *
 * bulk.c
 *	  Inserting many rows into one of the extension's tables directly: the
 *	  rows of a page go to the heap in one multi-insert (one WAL record a
 *	  page), then into each index, as COPY does.
 *
 * The batch jobs (expiry, queued earns) write thousands of ledger rows,
 * lots and outbox events a call.  Through SQL they were arrays unnested
 * into a materialized CTE and inserted row by row: a quarter of a batch's
 * time went to tuplestores and executor overhead.  Here a batch's rows are
 * slots filled by the caller.  What SQL would do besides is done too: a
 * column the caller leaves out gets its default, the table's NOT NULL and
 * CHECK constraints are checked (an error names the row), unique indexes
 * are enforced, statistics are counted.  Triggers, rules and generated
 * columns are not run: PointsBulkUsable says when a table has any (or is
 * not a plain table), and the caller then writes through SQL instead.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/genam.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/index.h"
#include "executor/executor.h"
#include "nodes/makefuncs.h"
#include "parser/parse_relation.h"
#include "rewrite/rewriteHandler.h"
#include "utils/inval.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"

#include "points.h"

/*
 * A table's CHECK constraints, column defaults and indexes (their
 * IndexInfo, partial indexes' predicates compiled), made once and kept
 * across calls.  An INSERT reads them back from the catalog and compiles
 * them for every statement: for an earn, one row a table, that was a third
 * of the direct insert's instructions (the indexes another ~20,000 of a
 * W1 call's ~340,000).  An entry is dropped when the relcache entry of the
 * table or of one of its indexes is invalidated (ALTER TABLE, a new or
 * dropped constraint, default or index, an index made valid or ready,
 * DROP EXTENSION; also a rolled-back one), which happens at the latest
 * when PointsBulkBegin opens the table, as ExecOpenIndices reads the
 * index list after the table's lock.  An entry
 * in use (a constraint whose function writes points again) is not shared:
 * the nested insert compiles its own.
 */
#define COMPILED_ATTNUMS	32

typedef struct Compiled
{
	Oid			relid;			/* InvalidOid: a free slot */
	bool		valid;
	bool		stale;			/* invalidated since its build began */
	bool		in_use;			/* also while being built */
	EState	   *estate;			/* owns what follows */
	ExprState **checks;			/* as ResultRelInfo.ri_ConstraintExprs */
	int			ndefaults;
	int		   *default_attno;
	ExprState **defaults;
	/* its indexes, as ExecOpenIndices finds them, predicates compiled */
	int			nindexes;
	Oid		   *index_oids;
	IndexInfo **index_info;
	/* columns looked up by PointsBulkAttnum: the callers' names (where
	 * they were, and a copy), their numbers */
	int			nattnums;
	const char *attptrs[COMPILED_ATTNUMS];
	char		attnames[COMPILED_ATTNUMS][NAMEDATALEN];
	AttrNumber	attnums[COMPILED_ATTNUMS];
} Compiled;

#define COMPILED_MAX	8

static Compiled compiled[COMPILED_MAX];
static bool compiled_callbacks = false;

static void
CompiledInvalidate(Datum arg, Oid relid)
{
	for (int i = 0; i < COMPILED_MAX; i++)
	{
		bool		hit = relid == InvalidOid || compiled[i].relid == relid;

		for (int x = 0; x < compiled[i].nindexes && !hit; x++)
			hit = compiled[i].index_oids[x] == relid;
		if (hit)
		{
			compiled[i].valid = false;
			compiled[i].stale = true;
		}
	}
}

static void CompiledRelease(XactEvent event, void *arg);
static void CompileIndexes(Relation rel, Compiled *c);

/* once a backend: the relcache and transaction-end callbacks */
static void
RegisterCallbacks(void)
{
	if (!compiled_callbacks)
	{
		CacheRegisterRelcacheCallback(CompiledInvalidate, (Datum) 0);
		RegisterXactCallback(CompiledRelease, NULL);
		compiled_callbacks = true;
	}
}

/*
 * A batch job's working memory (its transactions, events, metadata): a
 * context kept across calls whose first POINTS_ARENA_SIZE bytes stay
 * allocated.  Freed and allocated anew each call, those megabytes came
 * from the kernel again every time (glibc gives the top of its heap back
 * once a large block is freed): page faults were an eighth of an expiry.
 * A batch job within a batch job (a trigger's) allocates as usual.
 */
#define POINTS_ARENA_SIZE	(4 * 1024 * 1024)

static MemoryContext arena = NULL;
static bool arena_in_use = false;

/* nothing is in use once a transaction has ended; an error between
 * PointsBulkBegin and PointsBulkEnd (or in an arena) left its marks */
static void
CompiledRelease(XactEvent event, void *arg)
{
	for (int i = 0; i < COMPILED_MAX; i++)
		compiled[i].in_use = false;
	if (arena_in_use)
	{
		MemoryContextReset(arena);
		arena_in_use = false;
	}
}

/*
 * PointsArenaEnter
 *		Make the arena the current memory context, empty; returns the
 *		context to give PointsArenaLeave (NULL when the arena is in use:
 *		nothing changes).  What the caller allocates until then must not be
 *		used after.
 */
MemoryContext
PointsArenaEnter(void)
{
	if (arena_in_use)
		return NULL;
	RegisterCallbacks();
	if (arena == NULL)
		arena = AllocSetContextCreate(TopMemoryContext, "points batch arena",
									  POINTS_ARENA_SIZE, POINTS_ARENA_SIZE,
									  ALLOCSET_DEFAULT_MAXSIZE);
	arena_in_use = true;
	return MemoryContextSwitchTo(arena);
}

/*
 * PointsArenaLeave
 *		Switch back to outer (from PointsArenaEnter) and empty the arena.
 */
void
PointsArenaLeave(MemoryContext outer)
{
	if (outer == NULL)
		return;
	MemoryContextSwitchTo(outer);
	MemoryContextReset(arena);
	arena_in_use = false;
}

/*
 * CompileDefaults
 *		The column defaults of rel, compiled in estate: returns how many
 *		columns have one, *attno their numbers (0-based) and *defaults the
 *		expressions.  The relation's own descriptor: a copy has none.
 */
static int
CompileDefaults(Relation rel, EState *estate, int **attno, ExprState ***defaults)
{
	TupleDesc	desc = RelationGetDescr(rel);
	int			n = 0;

	*attno = palloc(sizeof(int) * desc->natts);
	*defaults = palloc(sizeof(ExprState *) * desc->natts);
	for (int a = 0; a < desc->natts; a++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, a);
		Expr	   *def;

		if (att->attisdropped || att->attgenerated || !att->atthasdef)
			continue;
		def = (Expr *) build_column_default(rel, a + 1);
		if (def == NULL)
			continue;
		(*attno)[n] = a;
		(*defaults)[n++] = ExecPrepareExpr(def, estate);
	}
	return n;
}

/*
 * GetCompiled
 *		The compiled constraints, defaults and indexes of open table rel,
 *		marked in use; NULL when they are in use already (the caller
 *		compiles its own).
 */
static Compiled *
GetCompiled(Relation rel)
{
	Oid			relid = RelationGetRelid(rel);
	TupleConstr *constr = RelationGetDescr(rel)->constr;
	int			ncheck = constr ? constr->num_check : 0;
	Compiled   *c = NULL;
	MemoryContext outer;

	RegisterCallbacks();
	for (int i = 0; i < COMPILED_MAX && c == NULL; i++)
		if (compiled[i].relid == relid)
			c = &compiled[i];
	for (int i = 0; i < COMPILED_MAX && c == NULL; i++)
		if (compiled[i].relid == InvalidOid || !compiled[i].valid)
			c = &compiled[i];
	if (c == NULL)
		c = &compiled[relid % COMPILED_MAX];	/* full: take one over */
	if (c->relid == relid && c->valid)
	{
		if (c->in_use)
			return NULL;
		c->in_use = true;
		return c;
	}
	if (c->in_use)
		return NULL;

	/*
	 * (Re)build it in an executor state of its own, under the cache.  In use
	 * and not valid meanwhile: an error leaves it so until the transaction
	 * ends (then the next call builds it again), and a nested call (a
	 * function folded while compiling that writes points) builds its own.
	 */
	c->in_use = true;
	c->valid = false;
	c->stale = false;
	c->nindexes = 0;
	if (c->estate)
		FreeExecutorState(c->estate);
	c->estate = NULL;
	c->relid = relid;
	outer = MemoryContextSwitchTo(CacheMemoryContext);
	c->estate = CreateExecutorState();
	MemoryContextSwitchTo(c->estate->es_query_cxt);
	/* as ExecRelCheck builds them for a statement */
	c->checks = palloc0(sizeof(ExprState *) * (ncheck + 1));
	for (int i = 0; i < ncheck; i++)
		c->checks[i] = ExecPrepareExpr((Expr *) stringToNode(constr->check[i].ccbin),
									   c->estate);
	c->ndefaults = CompileDefaults(rel, c->estate, &c->default_attno, &c->defaults);
	c->nattnums = 0;
	c->nindexes = 0;
	CompileIndexes(rel, c);
	MemoryContextSwitchTo(outer);
	/* a change seen while building: this call uses it, the next rebuilds */
	c->valid = !c->stale;
	return c;
}

/*
 * CompileIndexes
 *		The indexes of rel and their IndexInfo, as ExecOpenIndices builds
 *		them for each statement, with predicates and expressions compiled
 *		(ExecInsertIndexTuples would compile them for every statement).  In
 *		the current memory context, c's.
 */
static void
CompileIndexes(Relation rel, Compiled *c)
{
	List	   *list = RelationGetIndexList(rel);
	int			n = 0;
	ListCell   *lc;

	c->index_oids = palloc(sizeof(Oid) * (list_length(list) + 1));
	c->index_info = palloc0(sizeof(IndexInfo *) * (list_length(list) + 1));
	foreach(lc, list)
		c->index_oids[n++] = lfirst_oid(lc);
	list_free(list);
	/* from here on a change to any of them makes c stale */
	c->nindexes = n;
	for (int x = 0; x < n; x++)
	{
		Relation	index = index_open(c->index_oids[x], RowExclusiveLock);
		IndexInfo  *ii = BuildIndexInfo(index);

		if (ii->ii_Predicate != NIL)
			ii->ii_PredicateState = ExecPrepareQual(ii->ii_Predicate, c->estate);
		if (ii->ii_Expressions != NIL)
			ii->ii_ExpressionsState = ExecPrepareExprList(ii->ii_Expressions, c->estate);
		c->index_info[x] = ii;
		index_close(index, RowExclusiveLock);
	}
}

/*
 * OpenIndexes
 *		ExecOpenIndices for rri, from c's cached list and IndexInfo.
 */
static void
OpenIndexes(ResultRelInfo *rri, Compiled *c)
{
	rri->ri_NumIndices = c->nindexes;
	if (c->nindexes == 0)
		return;
	rri->ri_IndexRelationDescs = palloc(sizeof(Relation) * c->nindexes);
	rri->ri_IndexRelationInfo = c->index_info;
	for (int x = 0; x < c->nindexes; x++)
	{
		rri->ri_IndexRelationDescs[x] = index_open(c->index_oids[x], RowExclusiveLock);
		/* decided again by each statement's first update (its hint) */
		c->index_info[x]->ii_CheckedUnchanged = false;
	}
}

/*
 * PointsBulkBegin
 *		Open the n tables relids[] (RowExclusiveLock, as an INSERT takes)
 *		and their indexes, in an executor state of their own.
 */
void
PointsBulkBegin(PointsBulk *bulk, const Oid *relids, int n)
{
	List	   *rtable = NIL;

	Assert(n <= POINTS_BULK_MAX_TABLES);
	bulk->estate = CreateExecutorState();
	bulk->estate->es_output_cid = GetCurrentCommandId(true);
	for (int i = 0; i < n; i++)
	{
		RangeTblEntry *rte = makeNode(RangeTblEntry);

		rte->rtekind = RTE_RELATION;
		rte->relid = relids[i];
		rte->relkind = RELKIND_RELATION;
		rte->rellockmode = RowExclusiveLock;
		rtable = lappend(rtable, rte);
	}
	/* constraint errors look up the inserted columns in the range table */
	ExecInitRangeTable(bulk->estate, rtable);
	bulk->ntables = n;
	/* what a flush allocates (the heap tuples, toasted copies) */
	bulk->flush_cxt = AllocSetContextCreate(CurrentMemoryContext, "points bulk flush",
											ALLOCSET_DEFAULT_SIZES);
	for (int i = 0; i < n; i++)
	{
		PointsBulkTable *t = &bulk->tables[i];

		t->rel = table_open(relids[i], RowExclusiveLock);
		t->rri = makeNode(ResultRelInfo);
		InitResultRelInfo(t->rri, t->rel, i + 1, NULL, 0);
		/* a copy that is not reference-counted: slots need not pin it */
		t->desc = CreateTupleDescCopy(RelationGetDescr(t->rel));
		t->n = 0;
		/* its indexes, constraints and each column's default, compiled */
		t->compiled = GetCompiled(t->rel);
		if (t->compiled)
			OpenIndexes(t->rri, t->compiled);
		else
			ExecOpenIndices(t->rri, false);
		if (t->compiled)
		{
			t->rri->ri_ConstraintExprs = t->compiled->checks;
			t->ndefaults = t->compiled->ndefaults;
			t->default_attno = t->compiled->default_attno;
			t->defaults = t->compiled->defaults;
		}
		else
			t->ndefaults = CompileDefaults(t->rel, bulk->estate, &t->default_attno,
										   &t->defaults);
		memset(t->slots, 0, sizeof(t->slots));
		t->old_version = t->new_version = NULL;
	}
}

/*
 * PointsBulkUsable
 *		Whether every table is a plain table without triggers, rules or
 *		generated columns, which a direct insert would skip.
 */
bool
PointsBulkUsable(PointsBulk *bulk)
{
	for (int i = 0; i < bulk->ntables; i++)
	{
		Relation	rel = bulk->tables[i].rel;
		TupleConstr *constr = RelationGetDescr(rel)->constr;

		if (rel->rd_rel->relkind != RELKIND_RELATION ||
			rel->trigdesc != NULL || rel->rd_rel->relhasrules ||
			(constr != NULL && constr->has_generated_stored))
			return false;
	}
	return true;
}

/*
 * PointsBulkAttnum
 *		The attribute number of column name of table i (an error if there
 *		is none): callers look them up once, then fill slots by number.
 */
AttrNumber
PointsBulkAttnum(PointsBulk *bulk, int i, const char *name)
{
	Compiled   *c = bulk->tables[i].compiled;
	int			attnum;

	/* the callers' names are literals: found by address, checked by text */
	if (c != NULL)
		for (int a = 0; a < c->nattnums; a++)
			if (c->attptrs[a] == name && strcmp(c->attnames[a], name) == 0)
				return c->attnums[a];
	attnum = attnameAttNum(bulk->tables[i].rel, name, false);
	if (attnum <= 0)
		elog(ERROR, "points: column \"%s\" of %s is missing", name,
			 RelationGetRelationName(bulk->tables[i].rel));
	if (c != NULL && c->nattnums < COMPILED_ATTNUMS && strlen(name) < NAMEDATALEN)
	{
		c->attptrs[c->nattnums] = name;
		strlcpy(c->attnames[c->nattnums], name, NAMEDATALEN);
		c->attnums[c->nattnums++] = (AttrNumber) attnum;
	}
	return (AttrNumber) attnum;
}

/*
 * Flush
 *		Insert the buffered rows of table t: constraints, heap, indexes.
 */
static void
Flush(PointsBulk *bulk, PointsBulkTable *t)
{
	EState	   *estate = bulk->estate;
	MemoryContext outer;

	if (t->n == 0)
		return;
	outer = MemoryContextSwitchTo(bulk->flush_cxt);
	if (t->rel->rd_att->constr)
		for (int i = 0; i < t->n; i++)
			ExecConstraints(t->rri, t->slots[i], estate);
	table_multi_insert(t->rel, t->slots, t->n, estate->es_output_cid, 0, NULL);
	for (int i = 0; i < t->n; i++)
	{
		List	   *recheck;

		recheck = ExecInsertIndexTuples(t->rri, t->slots[i], estate,
										false, false, NULL, NIL);
		Assert(recheck == NIL);	/* no deferrable constraints */
		list_free(recheck);
		ResetPerTupleExprContext(estate);
	}
	MemoryContextSwitchTo(outer);
	MemoryContextReset(bulk->flush_cxt);
	t->n = 0;
}

/*
 * PointsBulkSlot
 *		A new row for table i, every column NULL or its default: set
 *		tts_values and tts_isnull of the columns, then PointsBulkAdd.  The
 *		caller's values must stay valid until PointsBulkEnd.
 */
TupleTableSlot *
PointsBulkSlot(PointsBulk *bulk, int i)
{
	PointsBulkTable *t = &bulk->tables[i];
	TupleTableSlot *slot;

	if (t->n == POINTS_BULK_CHUNK)
		Flush(bulk, t);
	if (t->slots[t->n] == NULL)
		t->slots[t->n] = MakeSingleTupleTableSlot(t->desc, table_slot_callbacks(t->rel));
	slot = t->slots[t->n];
	ExecClearTuple(slot);
	memset(slot->tts_isnull, true, sizeof(bool) * slot->tts_tupleDescriptor->natts);
	if (t->ndefaults > 0)
	{
		ExprContext *econtext = GetPerTupleExprContext(bulk->estate);
		/* in the flush's context: they last until the flush that writes them */
		MemoryContext outer = MemoryContextSwitchTo(bulk->flush_cxt);

		for (int d = 0; d < t->ndefaults; d++)
		{
			int			a = t->default_attno[d];

			slot->tts_values[a] = ExecEvalExpr(t->defaults[d], econtext,
											   &slot->tts_isnull[a]);
		}
		MemoryContextSwitchTo(outer);
	}
	return slot;
}

/*
 * PointsBulkAdd
 *		The row of the last PointsBulkSlot of table i is complete.
 */
void
PointsBulkAdd(PointsBulk *bulk, int i)
{
	PointsBulkTable *t = &bulk->tables[i];

	ExecStoreVirtualTuple(t->slots[t->n]);
	t->n++;
}

/*
 * PointsBulkEnd
 *		Insert what is buffered, close everything, and make the rows
 *		visible to the transaction's next statements.
 */
void
PointsBulkEnd(PointsBulk *bulk)
{
	for (int i = 0; i < bulk->ntables; i++)
	{
		PointsBulkTable *t = &bulk->tables[i];

		Flush(bulk, t);
		for (int j = 0; j < POINTS_BULK_CHUNK && t->slots[j]; j++)
			ExecDropSingleTupleTableSlot(t->slots[j]);
		if (t->old_version)
		{
			ExecDropSingleTupleTableSlot(t->old_version);
			ExecDropSingleTupleTableSlot(t->new_version);
		}
		ExecCloseIndices(t->rri);
		if (t->compiled)
			t->compiled->in_use = false;
		table_close(t->rel, NoLock);
	}
	FreeExecutorState(bulk->estate);
	MemoryContextDelete(bulk->flush_cxt);
	CommandCounterIncrement();
}

/*
 * PointsBulkUpdate
 *		Set the n columns named columns[] of the row at *tid of table i to
 *		values[] (NULL where nulls[c]; nulls may be NULL), directly: the table's constraints checked, its
 *		index entries made unless the update is HOT, statistics counted;
 *		*tid becomes the new version's.  The row must be its latest version,
 *		read by this transaction under the lock that every writer of that
 *		row holds (a user's account): another writer is an error, not a
 *		wait.  The caller checked PointsBulkUsable.
 */
void
PointsBulkUpdate(PointsBulk *bulk, int i, ItemPointer tid, int n,
				 const char *const *columns, const Datum *values,
				 const bool *nulls)
{
	PointsBulkTable *t = &bulk->tables[i];
	TupleTableSlot *old;
	TupleTableSlot *new;
	TM_FailureData tmfd;
	TM_Result	result;
	LockTupleMode lockmode;
	bool		update_indexes;

	if (t->old_version == NULL)
	{
		t->old_version = table_slot_create(t->rel, NULL);
		t->new_version = MakeSingleTupleTableSlot(t->desc, &TTSOpsVirtual);
	}
	old = t->old_version;
	new = t->new_version;
	if (!table_tuple_fetch_row_version(t->rel, tid, SnapshotAny, old))
		elog(ERROR, "points: row (%u,%u) of %s is missing",
			 ItemPointerGetBlockNumber(tid), ItemPointerGetOffsetNumber(tid),
			 RelationGetRelationName(t->rel));
	slot_getallattrs(old);
	ExecClearTuple(new);
	memcpy(new->tts_values, old->tts_values, sizeof(Datum) * t->desc->natts);
	memcpy(new->tts_isnull, old->tts_isnull, sizeof(bool) * t->desc->natts);
	for (int c = 0; c < n; c++)
	{
		AttrNumber	a = PointsBulkAttnum(bulk, i, columns[c]) - 1;

		new->tts_values[a] = values[c];
		new->tts_isnull[a] = nulls != NULL && nulls[c];
	}
	ExecStoreVirtualTuple(new);
	if (t->rel->rd_att->constr)
		ExecConstraints(t->rri, new, bulk->estate);
	result = table_tuple_update(t->rel, tid, new, bulk->estate->es_output_cid,
								GetActiveSnapshot(), InvalidSnapshot, true,
								&tmfd, &lockmode, &update_indexes);
	if (result != TM_Ok)
	{
		/*
		 * Under a transaction snapshot the version read can predate a
		 * writer that committed since, as an UPDATE statement would find.
		 */
		if (IsolationUsesXactSnapshot() &&
			(result == TM_Updated || result == TM_Deleted))
			ereport(ERROR,
					(errcode(ERRCODE_T_R_SERIALIZATION_FAILURE),
					 errmsg("could not serialize access due to concurrent update")));
		elog(ERROR, "points: row (%u,%u) of %s was changed by another transaction",
			 ItemPointerGetBlockNumber(tid), ItemPointerGetOffsetNumber(tid),
			 RelationGetRelationName(t->rel));
	}
	if (update_indexes)
		list_free(ExecInsertIndexTuples(t->rri, new, bulk->estate, true, false, NULL, NIL));
	*tid = new->tts_tid;		/* the new version's */
	ExecClearTuple(old);
	ResetPerTupleExprContext(bulk->estate);
}
