/*-------------------------------------------------------------------------
 *
 * shmem.c
 *	  The extension's shared memory (only when preloaded): the counters of
 *	  points.stats() (stats.c), and where the worker publishes its latch, so
 *	  that a commit that wrote outbox events or queued earns can wake it at
 *	  once instead of waiting for its next round.
 *
 * A backend notes that its transaction wrote an event (PointsNoteEvent);
 * a transaction callback sets the worker's latch when that transaction
 * commits.  Without the preload there is no shared memory and no worker,
 * and noting an event costs nothing.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"
#include "utils/timestamp.h"

#include "points.h"

PointsSharedState *points_shared = NULL;

static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;
static bool event_written = false;
static bool queue_written = false;
static bool callback_registered = false;

static void
PointsShmemRequest(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	RequestAddinShmemSpace(MAXALIGN(sizeof(PointsSharedState)));
}

static void
PointsShmemStartup(void)
{
	bool		found;

	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	points_shared = ShmemInitStruct("points", sizeof(PointsSharedState), &found);
	if (!found)
	{
		memset(points_shared, 0, sizeof(PointsSharedState));
		pg_atomic_init_u64(&points_shared->stats_reset, (uint64) GetCurrentTimestamp());
		pg_atomic_init_u32(&points_shared->queue_pending, 0);
		pg_atomic_init_u32(&points_shared->relay_active, 0);
		for (int i = 0; i < POINTS_OP_COUNT; i++)
		{
			PointsOpStats *s = &points_shared->ops[i];

			pg_atomic_init_u64(&s->calls, 0);
			pg_atomic_init_u64(&s->failures, 0);
			pg_atomic_init_u64(&s->lock_timeouts, 0);
			pg_atomic_init_u64(&s->points, 0);
			pg_atomic_init_u64(&s->total_us, 0);
			pg_atomic_init_u64(&s->max_us, 0);
			pg_atomic_init_u64(&s->lock_wait_us, 0);
		}
	}
	LWLockRelease(AddinShmemInitLock);
}

/*
 * PointsShmemInit
 *		Called from _PG_init while preloading: ask for and attach the
 *		shared state.
 */
void
PointsShmemInit(void)
{
	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = PointsShmemRequest;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = PointsShmemStartup;
}

/*
 * PointsWakeWorker
 *		Set the worker's latch, if a worker is running.
 */
void
PointsWakeWorker(void)
{
	Latch	   *latch;

	if (points_shared == NULL)
		return;
	latch = points_shared->worker_latch;
	if (latch != NULL)
		SetLatch(latch);
}

static void
PointsXactCallback(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_COMMIT:
		case XACT_EVENT_PARALLEL_COMMIT:
			if (queue_written)
			{
				pg_atomic_write_u32(&points_shared->queue_pending, 1);
				PointsWakeWorker();
			}
			else if (event_written &&
					 pg_atomic_read_u32(&points_shared->relay_active) != 0)
				PointsWakeWorker();
			event_written = false;
			queue_written = false;
			break;
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PARALLEL_ABORT:
		case XACT_EVENT_PREPARE:
			/*
			 * A prepared transaction's events and requests wait for the
			 * worker's next round (points.queue_interval at the latest).
			 */
			event_written = false;
			queue_written = false;
			break;
		default:
			break;
	}
}

static void
RegisterCallback(void)
{
	if (!callback_registered)
	{
		RegisterXactCallback(PointsXactCallback, NULL);
		callback_registered = true;
	}
}

/*
 * PointsNoteEvent
 *		The current transaction wrote an outbox event: wake the worker when
 *		it commits, if the relay waits for events (brokers are set and no
 *		batch is in flight: see kafka.c).
 */
void
PointsNoteEvent(void)
{
	if (points_shared == NULL)
		return;
	RegisterCallback();
	event_written = true;
}

/*
 * PointsNoteQueued
 *		The current transaction queued an earn: when it commits, tell the
 *		worker there is queue work and wake it.
 */
void
PointsNoteQueued(void)
{
	if (points_shared == NULL)
		return;
	RegisterCallback();
	queue_written = true;
}

/*
 * PointsTakeQueuePending
 *		The worker: did a commit queue earns since the last call?  Clears the
 *		flag first, so a commit during the apply that follows sets it again
 *		and is not missed.
 */
bool
PointsTakeQueuePending(void)
{
	if (points_shared == NULL)
		return true;
	return pg_atomic_exchange_u32(&points_shared->queue_pending, 0) != 0;
}

/*
 * PointsSetRelayActive
 *		The relay (kafka.c): whether commits that wrote events should wake
 *		the worker.
 */
void
PointsSetRelayActive(bool active)
{
	if (points_shared != NULL)
		pg_atomic_write_u32(&points_shared->relay_active, active ? 1 : 0);
}
