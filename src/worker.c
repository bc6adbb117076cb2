/*-------------------------------------------------------------------------
 *
 * worker.c
 *	  The background worker: expires due lots and archives old ledger rows
 *	  on their schedules, applies queued earns (woken by the commit that
 *	  queued them, or every points.queue_interval), in bounded batches, one
 *	  transaction per batch, and between them relays the outbox to Kafka
 *	  (kafka.c).
 *
 * It is registered by _PG_init when the library is preloaded, connects to
 * points.database, and sleeps on its latch between rounds.  Every database
 * round trip goes through WorkerTransaction, which reports the activity,
 * runs one step in its own transaction, and turns an error into a log line
 * and a row in points.worker_state (last_error) instead of a crash; the
 * round is then retried at its next turn.  SIGHUP reloads the settings (a
 * new points.database restarts the worker); SIGTERM stops it at the next
 * batch boundary; after a crash the postmaster starts it again and, as every
 * batch is one transaction, it resumes where it stopped.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#ifdef __GLIBC__
#include <malloc.h>
#endif

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "commands/extension.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/proc.h"
#include "tcop/tcopprot.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"
#include "utils/wait_event.h"

#include "points.h"

/* how often to look again for the extension when it is not installed */
#define WORKER_NOT_INSTALLED_MS	5000
/* how often to check that it is still installed */
#define WORKER_CHECK_MS			1000

static MemoryContext worker_cxt = NULL;
static TimestampTz worker_started_at = 0;
static TimestampTz last_queue = 0;	/* start of the last queue run */

static void WorkerRecordError(void *arg);

/*
 * PointsRegisterWorker
 *		Register the worker; called by _PG_init while preloading.
 */
void
PointsRegisterWorker(void)
{
	BackgroundWorker worker;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = 5;
	snprintf(worker.bgw_library_name, BGW_MAXLEN, "points");
	snprintf(worker.bgw_function_name, BGW_MAXLEN, "points_worker_main");
	snprintf(worker.bgw_name, BGW_MAXLEN, "points worker");
	snprintf(worker.bgw_type, BGW_MAXLEN, "points worker");
	RegisterBackgroundWorker(&worker);
}

/*
 * WorkerTransaction
 *		Run step(arg) in a transaction of its own, with SPI connected and a
 *		snapshot set.  On error: log it, roll back, record it in
 *		points.worker_state (when record_error), and return false.
 */
bool
PointsWorkerTransaction(const char *activity, PointsWorkerStep step, void *arg,
						bool record_error)
{
	MemoryContext cxt = CurrentMemoryContext;
	ErrorData  *volatile edata = NULL;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	PG_TRY();
	{
		SPI_connect();
		PushActiveSnapshot(GetTransactionSnapshot());
		pgstat_report_activity(STATE_RUNNING, activity);
		step(arg);
		SPI_finish();
		PopActiveSnapshot();
		CommitTransactionCommand();
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(cxt);
		edata = CopyErrorData();
		FlushErrorState();
		AbortCurrentTransaction();
	}
	PG_END_TRY();
	/* commit and abort leave TopMemoryContext current: what follows is ours */
	MemoryContextSwitchTo(cxt);
	pgstat_report_stat(false);
	pgstat_report_activity(STATE_IDLE, NULL);

	if (edata == NULL)
		return true;

	ereport(LOG,
			(errmsg("points worker: %s failed: %s", activity, edata->message)));
	if (record_error)
	{
		char	   *message = psprintf("%s: %s", activity, edata->message);

		(void) PointsWorkerTransaction("points: record error", WorkerRecordError,
								 message, false);
	}
	FreeErrorData(edata);
	return false;
}

/* ---- steps: each runs inside WorkerTransaction ---- */

static void
WorkerRecordError(void *arg)
{
	Oid			types[1] = {TEXTOID};
	Datum		values[1];

	values[0] = CStringGetTextDatum((char *) arg);
	if (SPI_execute_with_args("UPDATE points.worker_state"
							  " SET last_error = $1, last_error_at = now()",
							  1, types, values, NULL, false, 0) < 0)
		elog(ERROR, "points worker: could not record the error");
}

static void
StepCheckInstalled(void *arg)
{
	*(bool *) arg = OidIsValid(get_extension_oid("points", true));
}

/* the jobs the worker runs in batches */
typedef enum WorkerJob
{
	JOB_EXPIRE,
	JOB_ARCHIVE,
	JOB_QUEUE,
	JOB_MONITOR
} WorkerJob;

static const struct
{
	const char *activity;
	const char *sql;			/* one batch: $1 is the batch size */
	int			batch;
	const char *count;			/* in the batch's transaction: $1 = its count */
	const char *record;			/* after the run: $1 = count, $2 = started_at */
} worker_jobs[] = {
	{"points: expire_due", "SELECT points.expire_due($1)", 10000,
		"UPDATE points.worker_state SET expire_total_lots = expire_total_lots + $1",
		"UPDATE points.worker_state SET expire_last_run = now(), expire_last_lots = $1,"
	" started_at = $2"},
	{"points: archive", "SELECT points.archive($1)", 2000,
		"UPDATE points.worker_state SET archive_total_rows = archive_total_rows + $1",
		"UPDATE points.worker_state SET archive_last_run = now(), archive_last_rows = $1,"
	" started_at = $2"},
	{"points: apply_queued", "SELECT points.apply_queued($1)", 2000,
		NULL,
		"UPDATE points.worker_state SET queue_last_run = now(), queue_last_requests = $1,"
	" started_at = $2"},
	/* once a run; $1 unused; the function exists from version 0.2 on */
	{"points: detect_anomalies",
		"SELECT points.detect_anomalies() WHERE $1 > 0", 1,
		"UPDATE points.worker_state SET alerts_raised = alerts_raised + $1",
		"UPDATE points.worker_state SET monitor_last_run = now(), started_at = $2"},
};

/* how often the worker looks for anomalies and updates the daily rollup */
#define WORKER_MONITOR_MS	5000

typedef struct JobStep
{
	WorkerJob	job;
	int64		count;			/* out: what the batch did */
} JobStep;

/* the jobs' statements, prepared once per worker (the plan cache re-plans
 * them if the extension is dropped and created again) */
static SPIPlanPtr job_plans[lengthof(worker_jobs)];
static SPIPlanPtr count_plans[lengthof(worker_jobs)];
static SPIPlanPtr record_plans[lengthof(worker_jobs)];

/* runs cut into slices (RunBatches) */
static bool job_more[lengthof(worker_jobs)];	/* a run is unfinished */
static int64 job_count[lengthof(worker_jobs)];	/* what it did so far */

static void
StepBatch(void *arg)
{
	JobStep    *j = (JobStep *) arg;
	Oid			types[1] = {INT4OID};
	Datum		values[1];
	bool		isnull;

	values[0] = Int32GetDatum(worker_jobs[j->job].batch);
	PointsPlan(&job_plans[j->job], worker_jobs[j->job].sql, 1, types);
	if (PointsExec(job_plans[j->job], values, NULL, false, 1) != SPI_OK_SELECT)
		elog(ERROR, "points worker: %s failed", worker_jobs[j->job].activity);
	j->count = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0],
										   SPI_tuptable->tupdesc, 1, &isnull));

	/* totals move with the batch, so a crash cannot lose a committed one */
	if (j->count > 0 && worker_jobs[j->job].count != NULL)
	{
		Oid			ctypes[1] = {INT8OID};
		Datum		cvalues[1];

		cvalues[0] = Int64GetDatum(j->count);
		PointsPlan(&count_plans[j->job], worker_jobs[j->job].count, 1, ctypes);
		(void) PointsExec(count_plans[j->job], cvalues, NULL, false, 0);
	}
}

static void
StepRecordRun(void *arg)
{
	JobStep    *j = (JobStep *) arg;
	Oid			types[2] = {INT8OID, TIMESTAMPTZOID};
	Datum		values[2];

	values[0] = Int64GetDatum(j->count);
	values[1] = TimestampTzGetDatum(worker_started_at);
	PointsPlan(&record_plans[j->job], worker_jobs[j->job].record, 2, types);
	(void) PointsExec(record_plans[j->job], values, NULL, false, 0);
}

static void RunBatches(WorkerJob job);

static TimestampTz
AddMs(TimestampTz t, int64 ms)
{
	return t + ms * 1000;
}

/*
 * RunJobIfDue
 *		Start a run of job if its interval (ms) has passed since *last, or
 *		continue an unfinished one.
 */
static void
RunJobIfDue(WorkerJob job, TimestampTz *last, int64 interval_ms)
{
	TimestampTz now = GetCurrentTimestamp();

	if (ShutdownRequestPending)
		return;
	if (!job_more[job])
	{
		if (now < AddMs(*last, interval_ms))
			return;
		*last = now;
	}
	RunBatches(job);
}

/*
 * RunQueueIfDue
 *		Apply queued earns if a commit queued some since the last look, or
 *		points.queue_interval has passed (which also retries what a run left:
 *		a busy user, a failed batch, a prepared transaction's requests).
 */
static void
RunQueueIfDue(void)
{
	/* a commit that queued requests makes the queue due at once */
	if (!job_more[JOB_QUEUE] && PointsTakeQueuePending())
		last_queue = 0;
	RunJobIfDue(JOB_QUEUE, &last_queue, points_queue_interval);
}

/*
 * WorkerPause
 *		Let ms pass between two batches of a paced job, relaying events and
 *		applying queued earns when a commit wakes the worker meanwhile.
 */
static void
WorkerPause(long ms)
{
	TimestampTz until = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), ms);

	PointsKafkaRound();
	while (!ShutdownRequestPending)
	{
		TimestampTz now = GetCurrentTimestamp();
		long		wait = now < until ? (long) ((until - now + 999) / 1000) : 0;
		long		kafka_wait = PointsKafkaWaitMs();
		int			sock = PointsKafkaSocket();
		int			events = WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH;

		if (wait <= 0)
			break;
		if (kafka_wait >= 0 && kafka_wait < wait)
			wait = kafka_wait;
		if (sock >= 0)
			events |= WL_SOCKET_READABLE;
		(void) WaitLatchOrSocket(MyLatch, events, sock, Max(wait, 1),
								 PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
		RunQueueIfDue();
		PointsKafkaRound();
	}
}

/*
 * RunBatches
 *		Run a job's batches until one does nothing (or fails, or shutdown is
 *		asked for), then record the run.  The queue records only runs that
 *		did something: it runs every points.queue_interval.  Archiving is
 *		paced: after each batch the worker rests twice as long as the batch
 *		took, so moving a backlog of old rows takes at most a third of what
 *		the disk and a core give, and the calls running meanwhile keep the
 *		rest (resting as long as the batch, W1 kept 0.69x of its speed on two
 *		cores once the old rows were vacuumed; resting twice as long, 0.92x).
 *
 * A run over a long backlog (a campaign of a million queued earns, a day of
 * due lots, years of history to archive) goes on for minutes; it is cut
 * into slices of WORKER_SLICE_MS.  After a slice the worker goes back to
 * its loop, which reloads the configuration, runs the other jobs that are
 * due and relays events, and then continues the run (job_more).
 */
#define WORKER_SLICE_MS		2000

/* archiving rests ARCHIVE_REST times as long as each batch took */
#define ARCHIVE_REST		2

static void
RunBatches(WorkerJob job)
{
	TimestampTz slice_end = AddMs(GetCurrentTimestamp(), WORKER_SLICE_MS);
	JobStep		total = {job, 0};

	job_more[job] = false;
	for (;;)
	{
		JobStep		step = {job, 0};
		TimestampTz started = GetCurrentTimestamp();

		if (!PointsWorkerTransaction(worker_jobs[job].activity, StepBatch, &step, true))
			break;
		job_count[job] += step.count;
		if (step.count == 0 || ShutdownRequestPending || job == JOB_MONITOR)
			break;
		if (job == JOB_ARCHIVE)
			WorkerPause((long) (ARCHIVE_REST * (GetCurrentTimestamp() - started) / 1000));
		if (ShutdownRequestPending)
			break;
		if (GetCurrentTimestamp() >= slice_end)
		{
			job_more[job] = true;	/* the worker's loop relays events */
			return;
		}
		/* a long backlog must not hold up the events */
		if (job != JOB_ARCHIVE &&
			(job != JOB_QUEUE || step.count >= worker_jobs[job].batch))
			PointsKafkaRound();
		CHECK_FOR_INTERRUPTS();
	}
	total.count = job_count[job];
	job_count[job] = 0;
	if (job != JOB_QUEUE || total.count > 0)
		(void) PointsWorkerTransaction("points: record run", StepRecordRun, &total, true);
}

static void
StepHasMonitor(void *arg)
{
	bool		isnull;

	if (SPI_execute("SELECT to_regprocedure('points.detect_anomalies()') IS NOT NULL",
					true, 1) != SPI_OK_SELECT)
		elog(ERROR, "points worker: could not look up points.detect_anomalies");
	*(bool *) arg = DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0],
											   SPI_tuptable->tupdesc, 1, &isnull));
}

static void
WorkerDetachLatch(int code, Datum arg)
{
	if (points_shared != NULL)
		points_shared->worker_latch = NULL;
}

/*
 * WorkerKeepHeap
 *		Let this process keep the memory its batches free.  A batch (queued
 *		earns, expiry, a relay round) allocates a few megabytes and frees
 *		them at its end; glibc hands freed memory at the top of the heap
 *		back to the kernel (trim), or maps and unmaps big blocks, so every
 *		batch faulted the same pages in again: 15% of a queued-earn batch's
 *		time went to page faults, and a batch took 46 ms instead of 36 ms
 *		(1,000 earns, dev cluster, medians of 30).  Blocks up to 4 MB come
 *		from the heap and up to 32 MB of free heap stay mapped.  Only the
 *		worker does this: callers' backends keep glibc's defaults.
 */
static void
WorkerKeepHeap(void)
{
#ifdef __GLIBC__
	mallopt(M_MMAP_THRESHOLD, 4 * 1024 * 1024);
	mallopt(M_TRIM_THRESHOLD, 32 * 1024 * 1024);
#endif
}

/*
 * points_worker_main
 *		The worker's entry point.
 */
void
points_worker_main(Datum main_arg)
{
	char	   *database;
	bool		installed = false;
	bool		warned = false;
	TimestampTz last_expire = 0;
	TimestampTz last_archive = 0;
	TimestampTz last_monitor = 0;
	TimestampTz last_check = 0;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, SignalHandlerForShutdownRequest);
	BackgroundWorkerUnblockSignals();

	worker_started_at = GetCurrentTimestamp();
	WorkerKeepHeap();
	database = MemoryContextStrdup(TopMemoryContext, points_database);
	BackgroundWorkerInitializeConnection(database, NULL, 0);

	worker_cxt = AllocSetContextCreate(TopMemoryContext, "points worker",
									   ALLOCSET_DEFAULT_SIZES);
	if (points_shared != NULL)
	{
		points_shared->worker_latch = MyLatch;
		before_shmem_exit(WorkerDetachLatch, (Datum) 0);
	}
	ereport(LOG, (errmsg("points worker started for database \"%s\"", database)));

	while (!ShutdownRequestPending)
	{
		TimestampTz now;
		TimestampTz next;
		long		timeout;
		long		kafka_wait;

		MemoryContextReset(worker_cxt);
		MemoryContextSwitchTo(worker_cxt);

		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
			PointsKafkaReload();
			if (strcmp(database, points_database) != 0)
			{
				ereport(LOG,
						(errmsg("points worker: points.database changed from \"%s\" to \"%s\", restarting",
								database, points_database)));
				proc_exit(1);
			}
		}

		if (!installed)
		{
			(void) PointsWorkerTransaction("points: check extension", StepCheckInstalled,
									 &installed, false);
			if (!installed)
			{
				if (!warned)
					ereport(LOG,
							(errmsg("points worker: extension \"points\" is not installed in database \"%s\", waiting for it",
									database),
							 errhint("Run CREATE EXTENSION points in database \"%s\", or set points.database.",
									 database)));
				warned = true;
				(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
								 WORKER_NOT_INSTALLED_MS, PG_WAIT_EXTENSION);
				ResetLatch(MyLatch);
				CHECK_FOR_INTERRUPTS();
				continue;
			}
			warned = false;
			last_check = GetCurrentTimestamp();
		}

		RunJobIfDue(JOB_EXPIRE, &last_expire, (int64) points_expire_interval * 1000);
		RunJobIfDue(JOB_ARCHIVE, &last_archive, (int64) points_archive_interval * 1000);
		RunQueueIfDue();
		now = GetCurrentTimestamp();
		if (!ShutdownRequestPending && now >= AddMs(last_monitor, WORKER_MONITOR_MS))
		{
			bool		has_monitor = false;

			last_monitor = now;
			(void) PointsWorkerTransaction("points: check version", StepHasMonitor,
										   &has_monitor, false);
			if (has_monitor)
				RunBatches(JOB_MONITOR);
		}

		PointsKafkaRound();

		/* extension dropped meanwhile? look again, once a second at most */
		if (GetCurrentTimestamp() >= AddMs(last_check, WORKER_CHECK_MS))
		{
			last_check = GetCurrentTimestamp();
			(void) PointsWorkerTransaction("points: check extension", StepCheckInstalled,
										   &installed, false);
		}

		next = Min(AddMs(last_expire, (int64) points_expire_interval * 1000),
				   AddMs(last_archive, (int64) points_archive_interval * 1000));
		next = Min(next, AddMs(last_queue, points_queue_interval));
		next = Min(next, AddMs(last_monitor, WORKER_MONITOR_MS));
		now = GetCurrentTimestamp();
		timeout = next > now ? (long) ((next - now + 999) / 1000) : 0;
		kafka_wait = PointsKafkaWaitMs();
		if (kafka_wait >= 0 && kafka_wait < timeout)
			timeout = kafka_wait;
		if (job_more[JOB_EXPIRE] || job_more[JOB_ARCHIVE] || job_more[JOB_QUEUE])
			timeout = 0;		/* a run to continue */
		if (timeout > 0)
		{
			int			events = WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH;
			int			sock = PointsKafkaSocket();

			if (sock >= 0)
				events |= WL_SOCKET_READABLE;
			(void) WaitLatchOrSocket(MyLatch, events, sock, timeout,
									 PG_WAIT_EXTENSION);
		}
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
	}

	ereport(LOG, (errmsg("points worker stopping")));
	PointsKafkaShutdown();

	/*
	 * Exit code 1: the postmaster starts the worker again after
	 * bgw_restart_time unless the server itself is shutting down, so a
	 * pg_terminate_backend() of the worker does not stop the jobs for good.
	 */
	proc_exit(1);
}
