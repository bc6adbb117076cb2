/*-------------------------------------------------------------------------
 *
 * kafka.c
 *	  The outbox relay: the worker publishes points.outbox rows to Kafka with
 *	  librdkafka and deletes each row once the broker acknowledged it.
 *
 * Words:
 *	  batch   - outbox rows read in id order and produced together; the next
 *	            batch is read only when every message of this one has been
 *	            acknowledged or has failed
 *	  acked   - the broker has the message (acks=all); its row may go
 *
 * Ordering: one user's rows have increasing ids (taken under the user lock)
 * and are read in id order; the producer is idempotent, keeps each
 * partition's order through retries, and never gives up on a message by
 * timeout (message.timeout.ms=0), so a user's events reach the partition in
 * user_seq order.  With enable.gapless.guarantee a permanent refusal of one
 * request is a fatal error rather than a gap the later requests would jump
 * over.  Production stops at the first message librdkafka refuses so
 * nothing overtakes it, and a batch with failures is followed by a pause
 * that grows (up to 30 s) before its rows are sent again.  A row that was acked but not yet deleted when
 * the worker died is sent again (at least once); a row is never deleted
 * before its ack, so nothing is lost, and rows of rolled-back transactions
 * never exist.  A fatal producer error purges the producer's queue: the
 * producer is destroyed and made anew, and what was not acked is read from
 * the table again.
 *
 * All of this runs in the worker process, between its other jobs: nothing
 * here blocks for longer than a short poll, and delivery reports wake the
 * worker's wait through a pipe that librdkafka writes to.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <fcntl.h>
#include <unistd.h>

#include <librdkafka/rdkafka.h>

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "access/transam.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "points.h"

/* rows read and produced per batch */
#define KAFKA_BATCH			5000
/* how long shutdown waits for the batch in flight to be acked */
#define KAFKA_SHUTDOWN_MS	5000

typedef enum
{
	MSG_PENDING = 0,
	MSG_ACKED,
	MSG_FAILED
} MsgState;

typedef struct Batch
{
	int			n;				/* rows read */
	int			produced;		/* rows handed to librdkafka */
	int			resolved;		/* acked or failed */
	int			acked;
	int64	   *ids;
	MsgState   *state;
} Batch;

static rd_kafka_t *producer = NULL;
static rd_kafka_topic_t *topic = NULL;
static int	wake_pipe[2] = {-1, -1};
static MemoryContext batch_cxt = NULL;
static Batch *batch = NULL;		/* NULL: none in flight */
static bool fatal_pending = false;
static char fatal_cause[512];
static bool more_rows = false;	/* the last batch was full */
static TimestampTz retry_at = 0;	/* no new producer or batch before this */
static int	failure_backoff_ms = 0;	/* pause after a batch with failures */

/*
 * Where the next read starts.  Published rows are deleted, but their index
 * entries stay until VACUUM: a read from the start of the outbox would walk
 * every one of them, each batch (a busy server leaves hundreds of
 * thousands).  A read may not simply go on after the last id it saw: ids
 * are taken before commit, so a transaction that drew a smaller id may
 * still commit, and one user's later event must never go out before it.
 * So reads start at scan_from, which moves up to the end of what a read saw
 * only once every transaction that had an xid during that read has ended
 * (a later snapshot's xmin is at or past the next xid as of that read):
 * from then on no row below it can appear.  A failure, a new producer, an empty read or every
 * OUTBOX_RESCAN_MS a read starts from the beginning again.
 */
#define OUTBOX_RESCAN_MS	10000
static int64 scan_from = 0;
static int64 pending_from = 0;	/* scan_from once pending_xmax has passed */
static TransactionId pending_xmax = InvalidTransactionId;
static TimestampTz rescan_at = 0;

static void
ScanFromStart(void)
{
	scan_from = 0;
	pending_xmax = InvalidTransactionId;
	rescan_at = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), OUTBOX_RESCAN_MS);
}

/* the last error librdkafka reported, to record in worker_state */
static char last_error[512];
static bool last_error_new = false;

static void
NoteError(const char *fmt,...) pg_attribute_printf(1, 2);

static void
NoteError(const char *fmt,...)
{
	va_list		ap;

	va_start(ap, fmt);
	vsnprintf(last_error, sizeof(last_error), fmt, ap);
	va_end(ap);
	last_error_new = true;
}

/*
 * Delivery report: runs inside rd_kafka_poll in this process.  Only notes
 * the outcome; no PostgreSQL call may happen here.
 */
static void
DeliveryReport(rd_kafka_t *rk, const rd_kafka_message_t *msg, void *opaque)
{
	intptr_t	i = (intptr_t) msg->_private;

	if (batch == NULL || i < 0 || i >= batch->produced ||
		batch->state[i] != MSG_PENDING)
		return;
	if (msg->err == RD_KAFKA_RESP_ERR_NO_ERROR)
	{
		batch->state[i] = MSG_ACKED;
		batch->acked++;
	}
	else
	{
		batch->state[i] = MSG_FAILED;
		NoteError("delivery of event %lld failed: %s",
				  (long long) batch->ids[i], rd_kafka_err2str(msg->err));
	}
	batch->resolved++;
}

static void
ErrorCallback(rd_kafka_t *rk, int err, const char *reason, void *opaque)
{
	if (err == RD_KAFKA_RESP_ERR__FATAL)
	{
		char		cause[400];

		rd_kafka_fatal_error(rk, cause, sizeof(cause));
		snprintf(fatal_cause, sizeof(fatal_cause), "fatal producer error: %s", cause);
		NoteError("%s", fatal_cause);
		fatal_pending = true;
	}
	else
		NoteError("%s: %s", rd_kafka_err2name(err), reason);
}

/*
 * SetOption
 *		Set one librdkafka property; a bad one is an error naming it.
 */
static void
SetOption(rd_kafka_conf_t *conf, const char *name, const char *value)
{
	char		errstr[256];

	if (rd_kafka_conf_set(conf, name, value, errstr, sizeof(errstr)) != RD_KAFKA_CONF_OK)
	{
		rd_kafka_conf_destroy(conf);
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("points: invalid Kafka property \"%s\": %s", name, errstr)));
	}
}

/*
 * ApplyOptions
 *		points.kafka_options: key=value pairs separated by commas.
 */
static void
ApplyOptions(rd_kafka_conf_t *conf, const char *options)
{
	char	   *copy = pstrdup(options);
	char	   *save = NULL;
	char	   *item;

	for (item = strtok_r(copy, ",", &save); item; item = strtok_r(NULL, ",", &save))
	{
		char	   *eq = strchr(item, '=');
		char	   *name = item;
		char	   *value;

		if (eq == NULL)
		{
			rd_kafka_conf_destroy(conf);
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("points: points.kafka_options item \"%s\" is not key=value", item)));
		}
		*eq = '\0';
		value = eq + 1;
		while (*name == ' ')
			name++;
		while (*value == ' ')
			value++;
		for (char *e = name + strlen(name); e > name && e[-1] == ' '; e--)
			e[-1] = '\0';
		for (char *e = value + strlen(value); e > value && e[-1] == ' '; e--)
			e[-1] = '\0';
		SetOption(conf, name, value);
	}
	pfree(copy);
}

static void
DestroyProducer(void)
{
	if (topic)
		rd_kafka_topic_destroy(topic);
	topic = NULL;
	if (producer)
	{
		/* nothing of a destroyed producer may be delivered later */
		rd_kafka_purge(producer, RD_KAFKA_PURGE_F_QUEUE | RD_KAFKA_PURGE_F_INFLIGHT);
		rd_kafka_poll(producer, 0);
		rd_kafka_destroy(producer);
	}
	producer = NULL;
	batch = NULL;
	if (batch_cxt)
		MemoryContextReset(batch_cxt);
	PointsSetRelayActive(false);
	ScanFromStart();
}

/*
 * CreateProducer
 *		A producer as the relay needs it; see the file header for why each
 *		setting is what it is.  Settings of points.kafka_options come last and
 *		may override any of them.
 */
static void
CreateProducer(void)
{
	rd_kafka_conf_t *conf = rd_kafka_conf_new();
	char		errstr[512];

	SetOption(conf, "bootstrap.servers", points_kafka_brokers);
	SetOption(conf, "client.id", "points-worker");
	SetOption(conf, "enable.idempotence", "true");
	SetOption(conf, "acks", "all");
	SetOption(conf, "message.timeout.ms", "0");
	/* a permanent error of one request must not let later ones through */
	SetOption(conf, "enable.gapless.guarantee", "true");
	SetOption(conf, "linger.ms", "5");
	SetOption(conf, "queue.buffering.max.messages", "100000");
	SetOption(conf, "partitioner", "murmur2_random");
	SetOption(conf, "reconnect.backoff.max.ms", "2000");
	ApplyOptions(conf, points_kafka_options);
	rd_kafka_conf_set_dr_msg_cb(conf, DeliveryReport);
	rd_kafka_conf_set_error_cb(conf, ErrorCallback);

	producer = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof(errstr));
	if (producer == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("points: could not create the Kafka producer: %s", errstr)));
	topic = rd_kafka_topic_new(producer, points_kafka_topic, NULL);

	if (wake_pipe[0] < 0)
	{
		if (pipe(wake_pipe) != 0)
			elog(ERROR, "points: could not create a pipe: %m");
		fcntl(wake_pipe[0], F_SETFL, O_NONBLOCK);
		fcntl(wake_pipe[1], F_SETFL, O_NONBLOCK);
	}
	rd_kafka_queue_io_event_enable(rd_kafka_queue_get_main(producer),
								   wake_pipe[1], "1", 1);
	fatal_pending = false;
	ereport(LOG,
			(errmsg("points worker: publishing to Kafka topic \"%s\" at %s",
					points_kafka_topic, points_kafka_brokers)));
}

/* ---- steps run by PointsWorkerTransaction ---- */

static void
StepReadBatch(void *arg)
{
	Batch	   *b;
	static SPIPlanPtr plan_read;
	Oid			types[2] = {INT4OID, INT8OID};
	Datum		values[2];
	MemoryContext old;
	uint64		i;
	bool		isnull;
	Snapshot	snap = GetActiveSnapshot();	/* what the reads below see */
	int64		last_id = 0;

	if (GetCurrentTimestamp() >= rescan_at)
		ScanFromStart();

	values[0] = Int32GetDatum(KAFKA_BATCH);
	values[1] = Int64GetDatum(scan_from);
	/* through outbox_pkey: a table of dead rows must not be scanned whole */
	PointsPlan(&plan_read,
			   "SELECT id, aggregateid, type, payload::text"
			   " FROM points.outbox WHERE id >= $2 ORDER BY id LIMIT $1",
			   2, types);
	if (PointsExecIndexed(plan_read, values, NULL, true, 0) != SPI_OK_SELECT)
		elog(ERROR, "points: could not read points.outbox");
	if (SPI_processed == 0 && scan_from > 0)
	{
		/* nothing past it: look once from the start (see above) */
		ScanFromStart();
		values[1] = Int64GetDatum(scan_from);
		if (PointsExecIndexed(plan_read, values, NULL, true, 0) != SPI_OK_SELECT)
			elog(ERROR, "points: could not read points.outbox");
	}

	if (SPI_processed > 0)
		last_id = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[SPI_processed - 1],
											  SPI_tuptable->tupdesc, 1, &isnull));

	/*
	 * An earlier read ended below pending_from, and the transactions running
	 * then have all ended before this read's snapshot.  This read started
	 * below pending_from and, in id order, got every row they committed
	 * there, if it was not cut short before reaching pending_from: the next
	 * read may start there.
	 */
	if (TransactionIdIsValid(pending_xmax) &&
		TransactionIdPrecedesOrEquals(pending_xmax, snap->xmin) &&
		(SPI_processed < KAFKA_BATCH || last_id >= pending_from))
	{
		scan_from = pending_from;
		pending_xmax = InvalidTransactionId;
	}
	if (SPI_processed > 0 && !TransactionIdIsValid(pending_xmax))
	{
		/*
		 * Not snap->xmax: transactions that got their xid after the last
		 * one to complete are running but not below it.  The next xid, read
		 * after the snapshot, is above every xid assigned before it, and
		 * every id below pending_from was drawn by a transaction that had
		 * its xid by then (PointsNextTxId).
		 */
		pending_from = last_id + 1;
		pending_xmax = ReadNextTransactionId();
	}
	more_rows = SPI_processed == KAFKA_BATCH;
	if (SPI_processed == 0)
		return;

	old = MemoryContextSwitchTo(batch_cxt);
	b = palloc0(sizeof(Batch));
	b->ids = palloc(sizeof(int64) * SPI_processed);
	b->state = palloc0(sizeof(MsgState) * SPI_processed);
	MemoryContextSwitchTo(old);

	/* produce in id order; stop at the first refusal so nothing overtakes it */
	batch = b;
	for (i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		int64		id = DatumGetInt64(SPI_getbinval(tup, desc, 1, &isnull));
		char	   *key = SPI_getvalue(tup, desc, 2);
		char	   *type = SPI_getvalue(tup, desc, 3);
		char	   *value = SPI_getvalue(tup, desc, 4);
		char		idtext[24];
		rd_kafka_resp_err_t err;

		snprintf(idtext, sizeof(idtext), "%lld", (long long) id);
		b->ids[i] = id;
		b->n = i + 1;
		err = rd_kafka_producev(producer,
								RD_KAFKA_V_RKT(topic),
								RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
								RD_KAFKA_V_KEY(key, strlen(key)),
								RD_KAFKA_V_VALUE(value, strlen(value)),
								RD_KAFKA_V_HEADER("event_id", idtext, strlen(idtext)),
								RD_KAFKA_V_HEADER("event_type", type, strlen(type)),
								RD_KAFKA_V_OPAQUE((void *) (intptr_t) i),
								RD_KAFKA_V_END);
		if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
		{
			NoteError("could not produce event %lld: %s", (long long) id,
					  rd_kafka_err2str(err));
			b->n = i;			/* not produced: stays in the outbox */
			more_rows = true;
			ScanFromStart();	/* and the next read must see it */
			break;
		}
		b->produced = i + 1;
	}
}

static void
StepDeleteAcked(void *arg)
{
	Batch	   *b = batch;
	Datum	   *ids;
	int			n = 0;
	int			i;
	Oid			types[1] = {INT8ARRAYOID};
	Datum		values[1];

	ids = palloc(sizeof(Datum) * (b->acked + 1));
	for (i = 0; i < b->produced; i++)
		if (b->state[i] == MSG_ACKED)
			ids[n++] = Int64GetDatum(b->ids[i]);
	values[0] = PointerGetDatum(construct_array(ids, n, INT8OID, 8, true, TYPALIGN_DOUBLE));
	if (SPI_execute_with_args("WITH d AS (DELETE FROM points.outbox WHERE id = ANY($1) RETURNING 1)"
							  " UPDATE points.worker_state"
							  " SET events_published = events_published + (SELECT count(*) FROM d)",
							  1, types, values, NULL, false, 0) < 0)
		elog(ERROR, "points: could not delete published events");
}

static void
StepRecordKafkaError(void *arg)
{
	Oid			types[1] = {TEXTOID};
	Datum		values[1];

	values[0] = CStringGetTextDatum((char *) arg);
	if (SPI_execute_with_args("UPDATE points.worker_state"
							  " SET kafka_last_error = $1, kafka_last_error_at = now()",
							  1, types, values, NULL, false, 0) < 0)
		elog(ERROR, "points: could not record a Kafka error");
}

/*
 * FinishBatch
 *		Delete the acked rows of the batch; the others stay for the next.
 */
static void
FinishBatch(void)
{
	if (batch->acked > 0)
		(void) PointsWorkerTransaction("points: delete published events",
									   StepDeleteAcked, NULL, true);
	if (batch->acked < batch->n)
	{
		/* some failed: send them again, after a pause that grows */
		more_rows = true;
		ScanFromStart();
		failure_backoff_ms = Min(Max(failure_backoff_ms * 2, 100), 30000);
		retry_at = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), failure_backoff_ms);
	}
	else
		failure_backoff_ms = 0;
	batch = NULL;
	MemoryContextReset(batch_cxt);
}

static void
DrainPipe(void)
{
	char		buf[64];

	if (wake_pipe[0] >= 0)
		while (read(wake_pipe[0], buf, sizeof(buf)) > 0)
			;
}

/*
 * PointsKafkaRound
 *		One step of the relay: serve delivery reports, finish the batch in
 *		flight when it is resolved, start the next one.  Never blocks.
 */
void
PointsKafkaRound(void)
{
	if (batch_cxt == NULL)
		batch_cxt = AllocSetContextCreate(TopMemoryContext, "points kafka batch",
										  ALLOCSET_DEFAULT_SIZES);
	if (points_kafka_brokers == NULL || points_kafka_brokers[0] == '\0')
	{
		if (producer)
			DestroyProducer();
		return;
	}

	if (producer == NULL)
	{
		MemoryContext cxt = CurrentMemoryContext;

		if (GetCurrentTimestamp() < retry_at)
			return;
		PG_TRY();
		{
			CreateProducer();
		}
		PG_CATCH();
		{
			/* a bad setting: say so, and try again in a while */
			ErrorData  *edata;

			MemoryContextSwitchTo(cxt);
			edata = CopyErrorData();
			FlushErrorState();
			NoteError("%s", edata->message);
			ereport(LOG, (errmsg("points worker: %s", edata->message)));
			retry_at = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), 10000);
			producer = NULL;
		}
		PG_END_TRY();
		if (producer == NULL)
			goto record;
	}

	DrainPipe();
	rd_kafka_poll(producer, 0);

	if (fatal_pending)
	{
		ereport(LOG, (errmsg("points worker: %s; making a new producer", fatal_cause)));
		if (batch)
			FinishBatch();		/* keep what was acked */
		DestroyProducer();
		/* the cause, not a delivery failure it caused, is what to show */
		NoteError("%s", fatal_cause);
		goto record;
	}

	if (batch && batch->resolved >= batch->produced)
		FinishBatch();
	if (batch == NULL && GetCurrentTimestamp() >= retry_at)
	{
		/*
		 * Commits that write events wake the worker only while it has no
		 * batch in flight: when one is acked, the next read finds what was
		 * committed meanwhile, so waking it for each commit (thousands a
		 * second) would cost a core for nothing.  The flag goes up before
		 * the read takes its snapshot, so a commit the read does not see
		 * finds it up and wakes the worker.
		 */
		PointsSetRelayActive(true);
		pg_memory_barrier();
		(void) PointsWorkerTransaction("points: read outbox", StepReadBatch, NULL, true);
	}
	PointsSetRelayActive(batch == NULL && !more_rows);

record:
	if (last_error_new)
	{
		last_error_new = false;
		(void) PointsWorkerTransaction("points: record Kafka error",
									   StepRecordKafkaError, last_error, false);
	}
}

/*
 * PointsKafkaWaitMs
 *		How long the worker may sleep before the relay needs it again: 0 for
 *		more rows at once, a poll interval while a batch is in flight, -1
 *		when it only needs waking by a commit.
 */
long
PointsKafkaWaitMs(void)
{
	if (producer == NULL)
		return (points_kafka_brokers && points_kafka_brokers[0]) ? 1000 : -1;
	if (batch != NULL)
		return 100;
	if (fatal_pending)
		return 0;
	if (more_rows)
	{
		TimestampTz now = GetCurrentTimestamp();

		return retry_at > now ? (long) ((retry_at - now + 999) / 1000) : 0;
	}
	return 1000;				/* a commit we were not told of (e.g. 2PC) */
}

/*
 * PointsKafkaSocket
 *		The pipe librdkafka writes to when a delivery report is ready, or -1.
 */
int
PointsKafkaSocket(void)
{
	return producer ? wake_pipe[0] : -1;
}

/*
 * PointsKafkaReload
 *		Settings changed: start over with a new producer (what was not acked
 *		is sent again).
 */
void
PointsKafkaReload(void)
{
	if (producer)
	{
		if (batch)
		{
			rd_kafka_poll(producer, 0);
			FinishBatch();
		}
		DestroyProducer();
	}
	retry_at = 0;
}

/*
 * PointsKafkaShutdown
 *		Give the batch in flight a bounded time to be acked, delete what was,
 *		and close the producer.
 */
void
PointsKafkaShutdown(void)
{
	TimestampTz until = TimestampTzPlusMilliseconds(GetCurrentTimestamp(),
													KAFKA_SHUTDOWN_MS);

	if (producer == NULL)
		return;
	while (batch && batch->resolved < batch->produced &&
		   GetCurrentTimestamp() < until)
		rd_kafka_poll(producer, 100);
	if (batch)
		FinishBatch();
	DestroyProducer();
}
