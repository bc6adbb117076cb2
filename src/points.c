/*-------------------------------------------------------------------------
 *
 * points.c
 *	  Module entry point: the settings (GUCs) of the extension, and with
 *	  the preload, its shared memory and background worker.
 *
 * Every setting of the contract is defined here, with units and ranges,
 * whether or not the library was preloaded, so that a session that only
 * calls the SQL API sees and checks them too.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <limits.h>

#include "miscadmin.h"
#include "utils/guc.h"

#include "points.h"

PG_MODULE_MAGIC;

int			points_lock_timeout = 2000;
int			points_default_validity = 365 * 86400;
int			points_archive_after = 365 * 86400;
int			points_node_id = 0;
bool		points_track_stats = true;

char	   *points_database = NULL;
int			points_expire_interval = 60;
int			points_archive_interval = 3600;
char	   *points_kafka_brokers = NULL;
char	   *points_kafka_topic = NULL;
char	   *points_kafka_options = NULL;
int			points_queue_interval = 100;
int			points_alert_amount = 0;
int			points_alert_uses_per_minute = 0;
int			points_alert_cancels_per_hour = 0;

void		_PG_init(void);

/*
 * _PG_init
 *		Define the settings.
 */
void
_PG_init(void)
{
	/* nothing of ours may run while pg_upgrade moves the catalogs */
	if (IsBinaryUpgrade)
		return;

	DefineCustomIntVariable("points.lock_timeout",
							"Longest wait for a user's lock; 0 waits without limit.",
							NULL,
							&points_lock_timeout,
							2000, 0, INT_MAX,
							PGC_USERSET, GUC_UNIT_MS,
							NULL, NULL, NULL);

	DefineCustomIntVariable("points.default_validity",
							"Lifetime of earned points when expires_at is NULL.",
							NULL,
							&points_default_validity,
							365 * 86400, 1, INT_MAX,
							PGC_SUSET, GUC_UNIT_S,
							NULL, NULL, NULL);

	DefineCustomIntVariable("points.archive_after",
							"Ledger rows older than this move to the archive.",
							NULL,
							&points_archive_after,
							365 * 86400, 0, INT_MAX,
							PGC_SUSET, GUC_UNIT_S,
							NULL, NULL, NULL);

	DefineCustomIntVariable("points.node_id",
							"This database's number among the databases that share users (0-8191).",
							"Every tx_id and request_id is node_id * 2^40 + n. Set it before the first transaction.",
							&points_node_id,
							0, 0, 8191,
							PGC_SUSET, 0,
							NULL, NULL, NULL);

	DefineCustomBoolVariable("points.track_stats",
							 "Count calls in points.stats().",
							 "Off skips the counting, e.g. to measure what it costs.",
							 &points_track_stats,
							 true,
							 PGC_SUSET, 0,
							 NULL, NULL, NULL);

	DefineCustomStringVariable("points.database",
							   "Database the background worker connects to.",
							   NULL,
							   &points_database,
							   "postgres",
							   PGC_SIGHUP, 0,
							   NULL, NULL, NULL);

	DefineCustomIntVariable("points.expire_interval",
							"How often the background worker expires due lots.",
							NULL,
							&points_expire_interval,
							60, 1, INT_MAX,
							PGC_SIGHUP, GUC_UNIT_S,
							NULL, NULL, NULL);

	DefineCustomIntVariable("points.archive_interval",
							"How often the background worker archives old ledger rows.",
							NULL,
							&points_archive_interval,
							3600, 1, INT_MAX,
							PGC_SIGHUP, GUC_UNIT_S,
							NULL, NULL, NULL);

	DefineCustomStringVariable("points.kafka_brokers",
							   "Kafka bootstrap servers; empty keeps events in the outbox.",
							   NULL,
							   &points_kafka_brokers,
							   "",
							   PGC_SIGHUP, 0,
							   NULL, NULL, NULL);

	DefineCustomStringVariable("points.kafka_topic",
							   "Kafka topic for the ledger's events.",
							   NULL,
							   &points_kafka_topic,
							   "points.events",
							   PGC_SIGHUP, 0,
							   NULL, NULL, NULL);

	DefineCustomStringVariable("points.kafka_options",
							   "Extra librdkafka properties, key=value pairs separated by commas.",
							   NULL,
							   &points_kafka_options,
							   "",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY,
							   NULL, NULL, NULL);

	DefineCustomIntVariable("points.queue_interval",
							"Longest time a queued earn waits for the worker when no commit wakes it.",
							NULL,
							&points_queue_interval,
							100, 1, INT_MAX,
							PGC_SIGHUP, GUC_UNIT_MS,
							NULL, NULL, NULL);

	DefineCustomIntVariable("points.alert_amount",
							"Raise a large_amount alert for one earn or use of at least this many points; 0 is off.",
							NULL,
							&points_alert_amount,
							0, 0, INT_MAX,
							PGC_SIGHUP, 0,
							NULL, NULL, NULL);

	DefineCustomIntVariable("points.alert_uses_per_minute",
							"Raise a use_burst alert for more uses than this by one user within a minute; 0 is off.",
							NULL,
							&points_alert_uses_per_minute,
							0, 0, INT_MAX,
							PGC_SIGHUP, 0,
							NULL, NULL, NULL);

	DefineCustomIntVariable("points.alert_cancels_per_hour",
							"Raise a cancel_burst alert for more cancels of one user's transactions than this within an hour; 0 is off.",
							NULL,
							&points_alert_cancels_per_hour,
							0, 0, INT_MAX,
							PGC_SIGHUP, 0,
							NULL, NULL, NULL);

	MarkGUCPrefixReserved("points");

	/* the worker and shared memory exist only with the preload */
	if (process_shared_preload_libraries_in_progress && !IsBinaryUpgrade)
	{
		PointsShmemInit();
		PointsRegisterWorker();
	}
}
