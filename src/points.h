/*-------------------------------------------------------------------------
 *
 * points.h
 *	  Declarations shared by the files of the points extension.
 *
 * Words used throughout:
 *	  user      - an account holder, identified by a bigint user_id
 *	  lot       - the points of one earn; lot_id is the earn's tx_id
 *	  tx        - one immutable ledger row (earn, use, earn_cancel,
 *	              use_cancel, expire), identified by tx_id
 *	  user lock - the transaction-scoped advisory lock that serializes all
 *	              writes of one user (see userlock.c)
 *	  outbox    - points.outbox, one row per tx, published by the worker
 *
 *-------------------------------------------------------------------------
 */
#ifndef POINTS_H
#define POINTS_H

#include "postgres.h"

#include "access/skey.h"
#include "executor/spi.h"
#include "nodes/execnodes.h"
#include "fmgr.h"
#include "port/atomics.h"
#include "storage/latch.h"
#include "utils/timestamp.h"

/* SQLSTATEs of the contract that PostgreSQL does not define */
#define ERRCODE_POINTS_INSUFFICIENT		MAKE_SQLSTATE('P','T','0','0','1')
#define ERRCODE_POINTS_KEY_MISMATCH		MAKE_SQLSTATE('P','T','0','0','2')
#define ERRCODE_POINTS_CANCEL_DENIED	MAKE_SQLSTATE('P','T','0','0','3')

/* Limits on caller-supplied text, so that every event fits a Kafka message */
#define POINTS_MAX_KEY_BYTES		255
#define POINTS_MAX_REASON_BYTES		4096
#define POINTS_MAX_METADATA_BYTES	65536

/* Most distinct users a batch job locks in one transaction */
#define POINTS_BATCH_MAX_USERS		1000
/* lots listed in one expire transaction at most (its event stays a few kB) */
#define POINTS_EXPIRE_MAX_LOTS		100

/* tx_id and request_id are node_id * 2^40 + n */
#define POINTS_NODE_SHIFT			40

/* settings (points.c) */
extern int	points_lock_timeout;
extern int	points_default_validity;
extern int	points_archive_after;
extern int	points_node_id;
extern bool points_track_stats;
extern char *points_database;
extern int	points_expire_interval;
extern int	points_archive_interval;
extern char *points_kafka_brokers;
extern char *points_kafka_topic;
extern char *points_kafka_options;
extern int	points_queue_interval;

/* the operations points.stats() counts */
typedef enum PointsOp
{
	POINTS_OP_EARN,
	POINTS_OP_USE,
	POINTS_OP_CANCEL,
	POINTS_OP_EARN_ASYNC,
	POINTS_OP_EXPIRE,
	POINTS_OP_ARCHIVE,
	POINTS_OP_COUNT
} PointsOp;

typedef struct PointsOpStats
{
	pg_atomic_uint64 calls;
	pg_atomic_uint64 failures;
	pg_atomic_uint64 lock_timeouts;
	pg_atomic_uint64 points;
	pg_atomic_uint64 total_us;
	pg_atomic_uint64 max_us;
	pg_atomic_uint64 lock_wait_us;
} PointsOpStats;

/* shmem.c: state shared by all backends, only when preloaded */
typedef struct PointsSharedState
{
	Latch	   *worker_latch;	/* set to wake the worker; NULL if none */
	pg_atomic_uint32 queue_pending; /* a commit queued earns since the
									 * worker last looked */
	pg_atomic_uint32 relay_active;	/* the relay waits for events (brokers
									 * set, no batch in flight): wake it */
	pg_atomic_uint64 stats_reset;	/* TimestampTz of the last reset */
	PointsOpStats ops[POINTS_OP_COUNT];
} PointsSharedState;

extern PointsSharedState *points_shared;
extern void PointsShmemInit(void);
extern void PointsWakeWorker(void);
extern void PointsNoteEvent(void);
extern void PointsNoteQueued(void);
extern bool PointsTakeQueuePending(void);
extern void PointsSetRelayActive(bool active);

/* catalog.c: the extension's relations, looked up once a backend */
extern Oid	PointsRelid(const char *name);
extern Relation PointsOpenIndex(Relation rel, const char *name, const char *const *cols);
extern Relation PointsOpenLotUserIndex(Relation lot);

/* event.c: the outbox event of a ledger transaction */
extern int64 PointsNextTxId(Oid seq);
extern int	PointsFormatTime(TimestampTz t, char *buf);
extern Datum PointsEventPayload(int64 tx_id, int64 user_id, int64 user_seq,
								const char *kind, int64 amount,
								int64 balance_after, TimestampTz occurred_at,
								text *key, int64 cancels_tx, text *reason,
								Datum metadata);
extern Datum PointsLotsMetadata(const int64 *lot_ids, const int64 *amounts, int n);

/* stats.c: per-operation counters in shared memory */
extern int64 points_call_points;	/* points the current call moved */
extern int64 points_call_lock_wait_us;	/* time it waited for the user lock */
extern Datum PointsCounted(PointsOp op, PGFunction impl, FunctionCallInfo fcinfo);

/* worker.c */
typedef void (*PointsWorkerStep) (void *arg);
extern void PointsRegisterWorker(void);
extern bool PointsWorkerTransaction(const char *activity, PointsWorkerStep step,
									void *arg, bool record_error);

/* kafka.c: the outbox relay, run by the worker */
extern void PointsKafkaRound(void);
extern long PointsKafkaWaitMs(void);
extern int	PointsKafkaSocket(void);
extern void PointsKafkaReload(void);
extern void PointsKafkaShutdown(void);
extern PGDLLEXPORT void points_worker_main(Datum main_arg);

/* userlock.c */
extern void PointsLockUser(int64 user_id);
extern bool PointsTryLockUser(int64 user_id);

/* util.c */
extern SPIPlanPtr PointsPlan(SPIPlanPtr *slot, const char *sql,
							 int nargs, const Oid *argtypes);
extern SPIPlanPtr PointsPlanSet(SPIPlanPtr *slot, const char *sql, int nargs,
								const Oid *argtypes);
extern SPIPlanPtr PointsPlanKey(SPIPlanPtr *slot, const char *sql, int nargs,
							   const Oid *argtypes);
extern int	PointsExec(SPIPlanPtr plan, Datum *values, const char *nulls,
					   bool read_only, long count);
extern int	PointsExecIndexed(SPIPlanPtr plan, Datum *values, const char *nulls,
							  bool read_only, long count);
extern int	PointsExecPerKey(SPIPlanPtr plan, Datum *values, const char *nulls,
							 bool read_only, long count);
extern int64 PointsGetInt64(int row, int col, bool *isnull);
extern int64 PointsGetInt64Of(SPITupleTable *tab, uint64 row, int col, bool *isnull);
extern int64 PointsArgInt64(FunctionCallInfo fcinfo, int argno, const char *name);
extern int32 PointsArgPositiveInt32(FunctionCallInfo fcinfo, int argno, const char *name);
extern text *PointsArgText(FunctionCallInfo fcinfo, int argno, const char *name,
						   int max_bytes);
extern Datum PointsValuesToComposite(FunctionCallInfo fcinfo, MemoryContext outer,
									 Datum *values, bool *nulls, int natts);
extern Datum PointsRowToComposite(FunctionCallInfo fcinfo, MemoryContext outer,
								  int row);
extern void PointsReturnRows(FunctionCallInfo fcinfo);
extern TimestampTz PointsTimestampPlusSeconds(TimestampTz t, int64 seconds);
extern TimestampTz PointsTimestampPlusInterval(TimestampTz t, Interval *iv,
											   const char *name, int sign);

/* ledger.c: shared by the operations and the jobs */
typedef struct PointsAccount
{
	bool		exists;
	int64		balance;		/* sum of lot remaining, expired or not */
	int64		last_seq;		/* user_seq of the user's newest tx */
	ItemPointerData tid;		/* where its row is (the version read) */
} PointsAccount;

/* the checked arguments of earn and earn_async */
typedef struct PointsEarnRequest
{
	int64		user_id;
	int64		amount;
	text	   *key;
	TimestampTz expires_at;
	text	   *reason;
	Datum		metadata;
	bool		metadata_null;
} PointsEarnRequest;

extern void PointsEarnArgs(FunctionCallInfo fcinfo, TimestampTz now,
						   PointsEarnRequest *req);
extern void PointsEarnCheckExpiry(PointsEarnRequest *req, TimestampTz now);
extern const char *PointsEventType(const char *kind);
extern char *PointsKeyConflict(text *key, int64 user_id, int64 tx_id,
							   const char *kind, int64 amount);
extern void PointsLockAccount(int64 user_id, bool create, PointsAccount *acct);
/* a transaction as a points.tx row: TX_COLS, then replayed */
#define POINTS_TX_NATTS 12
typedef struct PointsTxRow
{
	Datum		values[POINTS_TX_NATTS];
	bool		nulls[POINTS_TX_NATTS];
} PointsTxRow;

extern void PointsAppendTx(PointsAccount *acct, int64 user_id, const char *kind,
						   int64 amount, text *key, int64 cancels_tx,
						   text *reason, Datum metadata, bool metadata_null,
						   TimestampTz created_at, TimestampTz lot_expires_at,
						   bool make_lot, PointsTxRow *row);

/* batch.c: many transactions in one statement */
typedef struct PointsTxBatch
{
	int			n;
	int			cap;
	int64	   *user_id;
	int64	   *user_seq;
	const char **kind;
	int64	   *amount;
	int64	   *balance_after;
	text	  **key;
	text	  **reason;
	Datum	   *metadata;		/* (Datum) 0: NULL */
	TimestampTz *lot_expires;	/* 0: no lot */
	int64	   *cancels_tx;		/* NULL: none cancels (the batch jobs) */
	int64	   *tx_id;			/* set by PointsAppendBatch */
} PointsTxBatch;

/* the locked accounts of a batch's users, sorted by user_id */
typedef struct PointsAccountState
{
	int64		user_id;
	int64		balance;
	int64		last_seq;
	int64		read_seq;		/* last_seq as read: the batch wrote if it grew */
	bool		is_new;			/* no account row yet: the append makes it */
	ItemPointerData tid;		/* where its row is (the version read) */
} PointsAccountState;

typedef struct PointsAccountSet
{
	Datum		users;			/* int8[] of the locked users */
	int			n;
	PointsAccountState *accounts;
} PointsAccountSet;

extern bool PointsLockBatchUsers(bool create, TimestampTz now, const int64 *cand,
								 uint64 ncand, uint64 max_rows, bool *got,
								 PointsAccountSet *set);
extern PointsAccountState *PointsFindAccount(PointsAccountSet *set, int64 user_id);

typedef struct PointsHint
{
	bool		set;
	int64		value;
	uint64		epoch;			/* of the aborts seen when it was set */
	TimestampTz from_start_at;	/* the last search from the beginning */
} PointsHint;

extern bool PointsHintUse(PointsHint *h, int64 *value);
extern void PointsHintMissed(PointsHint *h);
extern void PointsHintSet(PointsHint *h, bool set, int64 value);
typedef bool (*PointsRowCheck) (TupleTableSlot *slot, void *arg);

/* a lot holding points, as a direct read finds it */
typedef struct PointsLot
{
	int64		user_id;
	int64		lot_id;
	int64		remaining;
	TimestampTz expires_at;
	ItemPointerData tid;		/* the version read */
} PointsLot;

typedef struct PointsLotScan
{
	struct IndexScanDescData *scan;
	TupleTableSlot *slot;
	AttrNumber	a_lot,
				a_user,
				a_remaining,
				a_expires;
	int64		user_id;
	TimestampTz now;
	bool		due;
} PointsLotScan;

extern void PointsLotScanBegin(PointsLotScan *s, Relation lot, Relation index);
extern void PointsLotScanUser(PointsLotScan *s, int64 user_id, TimestampTz now, bool due);
extern bool PointsLotScanNext(PointsLotScan *s, PointsLot *lot);
extern void PointsLotScanEnd(PointsLotScan *s);
extern int	PointsFirstUsers(Relation rel, Relation index, ScanKey keys, int nkeys,
							 RegProcedure ge_proc, PointsHint *hint,
							 PointsRowCheck check, void *arg, AttrNumber user_att,
							 AttrNumber key_att, int64 max_rows, int max_users,
							 int64 *users, int64 *first);
extern void PointsBatchAdd(PointsTxBatch *b, int64 user_id, int64 user_seq,
						   const char *kind, int64 amount, int64 balance_after,
						   text *key, text *reason, Datum metadata,
						   TimestampTz lot_expires);
extern void PointsAppendBatch(PointsTxBatch *b, PointsAccountSet *set,
							  TimestampTz created_at);
extern bool PointsAppendRows(PointsTxBatch *b, Datum *payloads, Datum *types,
							 TimestampTz created_at, PointsAccountState *accounts,
							 int naccounts);

/* bulk.c: many rows into the extension's tables, without the executor */
#define POINTS_BULK_MAX_TABLES		4
#define POINTS_BULK_CHUNK			100		/* rows buffered per table */

typedef struct PointsBulkTable
{
	Relation	rel;
	ResultRelInfo *rri;
	TupleDesc	desc;			/* of its slots */
	int			ndefaults;		/* columns with a default ... */
	int		   *default_attno;	/* ... (0-based) */
	ExprState **defaults;		/* ... and their values */
	struct Compiled *compiled;	/* where they come from, if cached */
	int			n;				/* buffered rows */
	TupleTableSlot *slots[POINTS_BULK_CHUNK];
	TupleTableSlot *old_version;	/* PointsBulkUpdate's, made on first use */
	TupleTableSlot *new_version;
} PointsBulkTable;

typedef struct PointsBulk
{
	EState	   *estate;
	MemoryContext flush_cxt;
	int			ntables;
	PointsBulkTable tables[POINTS_BULK_MAX_TABLES];
} PointsBulk;

extern MemoryContext PointsArenaEnter(void);
extern void PointsArenaLeave(MemoryContext outer);
extern void PointsBulkBegin(PointsBulk *bulk, const Oid *relids, int n);
extern bool PointsBulkUsable(PointsBulk *bulk);
extern AttrNumber PointsBulkAttnum(PointsBulk *bulk, int i, const char *name);
extern TupleTableSlot *PointsBulkSlot(PointsBulk *bulk, int i);
extern void PointsBulkAdd(PointsBulk *bulk, int i);
extern void PointsBulkEnd(PointsBulk *bulk);
extern void PointsBulkUpdate(PointsBulk *bulk, int i, ItemPointer tid, int n,
							 const char *const *columns, const Datum *values,
							 const bool *nulls);

#endif							/* POINTS_H */
