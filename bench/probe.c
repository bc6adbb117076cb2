/*
 * probe.c - latency probes for the benchmarks (libpq, pthreads)
 *
 *   probe load --seconds S [--threads N] [--rate R] [--lo A --hi B]
 *              [--sql SQL] [--stop-file F]
 *       N threads, one connection each, run SQL (a statement with one
 *       parameter $1, the user id, drawn uniformly from A..B) until S
 *       seconds have passed or F exists.  With --rate R the calls are
 *       scheduled open-loop at R per second in all, and a call's latency
 *       counts from its scheduled start (a stall is not hidden by the
 *       calls it delays).  Default SQL: SELECT points.earn($1, 10).
 *
 *   probe lag --seconds S [--lo A --hi B] [--interval-ms I] [--poll-ms P]
 *       Commit-to-ack lag of the outbox relay, sampled: an earn of a user
 *       drawn from A..B commits (autocommit); from the moment the commit
 *       returns, its outbox row (id = tx_id) is polled every P ms until it
 *       is gone.  The worker deletes a row only after the broker acked it,
 *       in a transaction of its own, so the sample is an upper bound of the
 *       commit-to-ack lag (by at most P ms plus the delete's commit).  One
 *       sample at a time, I ms apart; a sample gives up after 30 s.
 *
 * Both print one line of key=value pairs: calls, errors, tps, p50_ms,
 * p99_ms, max_ms and the SQLSTATEs of the errors (errcodes=55P03:2,...).
 * Connection parameters come from the environment (PGHOST, PGPORT, ...).
 * Every loop is bounded by S seconds.
 */
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <libpq-fe.h>

#include "lat.h"

#define MAX_THREADS	256
#define MAX_CODES	16

typedef struct
{
	char		code[6];
	long		n;
} ErrCode;

typedef struct
{
	int			id;
	PGconn	   *conn;
	Lat			lat;
	long		calls;
	long		errors;
	ErrCode		codes[MAX_CODES];
	int			ncodes;
	unsigned int seed;
} Thread;

static int	opt_threads = 1;
static double opt_seconds = 10;
static double opt_rate = 0;
static long opt_lo = 1;
static long opt_hi = 100000;
static const char *opt_sql = "SELECT points.earn($1, 10)";
static const char *opt_stop = NULL;
static int	opt_interval_ms = 20;
static int	opt_poll_ms = 2;

static volatile int stop_flag = 0;
static double t_start;

static void
sleep_until(double t)
{
	double		d = t - now_s();
	struct timespec ts;

	if (d <= 0)
		return;
	ts.tv_sec = (time_t) d;
	ts.tv_nsec = (long) ((d - ts.tv_sec) * 1e9);
	nanosleep(&ts, NULL);
}

static void
add_error(Thread *t, PGresult *res, PGconn *conn)
{
	const char *code = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
	int			i;

	t->errors++;
	if (code == NULL)
		code = "conn";
	for (i = 0; i < t->ncodes; i++)
		if (strcmp(t->codes[i].code, code) == 0)
		{
			t->codes[i].n++;
			return;
		}
	if (t->ncodes < MAX_CODES)
	{
		snprintf(t->codes[t->ncodes].code, sizeof(t->codes[0].code), "%s", code);
		t->codes[t->ncodes++].n = 1;
	}
	if (t->errors <= 3)
		fprintf(stderr, "probe: thread %d: %s", t->id,
				res ? PQresultErrorMessage(res) : PQerrorMessage(conn));
}

static long
pick_user(Thread *t)
{
	return opt_lo + (long) (rand_r(&t->seed) % (unsigned long) (opt_hi - opt_lo + 1));
}

static void *
load_thread(void *arg)
{
	Thread	   *t = arg;
	double		period = opt_rate > 0 ? opt_threads / opt_rate : 0;
	double		next = t_start + (period > 0 ? period * t->id / opt_threads : 0);
	double		end = t_start + opt_seconds;
	Oid			types[1] = {20};	/* int8 */
	PGresult   *res;

	res = PQprepare(t->conn, "q", opt_sql, 1, types);
	if (PQresultStatus(res) != PGRES_COMMAND_OK)
	{
		fprintf(stderr, "probe: prepare failed: %s", PQresultErrorMessage(res));
		exit(1);
	}
	PQclear(res);

	while (!stop_flag)
	{
		char		ubuf[24];
		const char *params[1] = {ubuf};
		double		begin;
		ExecStatusType st;

		if (period > 0)
		{
			if (next >= end)
				break;
			sleep_until(next);
			begin = next;
			next += period;
		}
		else
			begin = now_s();
		if (now_s() >= end || stop_flag)
			break;
		snprintf(ubuf, sizeof(ubuf), "%ld", pick_user(t));
		res = PQexecPrepared(t->conn, "q", 1, params, NULL, NULL, 0);
		st = PQresultStatus(res);
		t->calls++;
		if (st != PGRES_TUPLES_OK && st != PGRES_COMMAND_OK)
		{
			add_error(t, res, t->conn);
			if (PQstatus(t->conn) != CONNECTION_OK)
			{
				PQclear(res);
				break;
			}
		}
		lat_add(&t->lat, (now_s() - begin) * 1000.0);
		PQclear(res);
	}
	return NULL;
}

static void *
lag_thread(void *arg)
{
	Thread	   *t = arg;
	double		end = t_start + opt_seconds;
	Oid			types[1] = {20};
	PGresult   *res;

	res = PQprepare(t->conn, "earn",
					"SELECT (points.earn($1, 1, reason => 'bench lag probe')).tx_id", 1, types);
	if (PQresultStatus(res) != PGRES_COMMAND_OK)
	{
		fprintf(stderr, "probe: prepare failed: %s", PQresultErrorMessage(res));
		exit(1);
	}
	PQclear(res);
	res = PQprepare(t->conn, "poll", "SELECT 1 FROM points.outbox WHERE id = $1", 1, types);
	if (PQresultStatus(res) != PGRES_COMMAND_OK)
	{
		fprintf(stderr, "probe: prepare failed: %s", PQresultErrorMessage(res));
		exit(1);
	}
	PQclear(res);

	while (!stop_flag && now_s() < end)
	{
		char		ubuf[24];
		char		txbuf[32];
		const char *params[1] = {ubuf};
		const char *pparams[1] = {txbuf};
		double		committed;
		double		give_up;
		int			gone = 0;

		snprintf(ubuf, sizeof(ubuf), "%ld", pick_user(t));
		res = PQexecPrepared(t->conn, "earn", 1, params, NULL, NULL, 0);
		t->calls++;
		if (PQresultStatus(res) != PGRES_TUPLES_OK)
		{
			add_error(t, res, t->conn);
			PQclear(res);
			sleep_until(now_s() + opt_interval_ms / 1000.0);
			continue;
		}
		committed = now_s();
		snprintf(txbuf, sizeof(txbuf), "%s", PQgetvalue(res, 0, 0));
		PQclear(res);
		give_up = committed + 30.0;
		while (now_s() < give_up)
		{
			res = PQexecPrepared(t->conn, "poll", 1, pparams, NULL, NULL, 0);
			if (PQresultStatus(res) != PGRES_TUPLES_OK)
			{
				add_error(t, res, t->conn);
				PQclear(res);
				break;
			}
			gone = PQntuples(res) == 0;
			PQclear(res);
			if (gone)
				break;
			sleep_until(now_s() + opt_poll_ms / 1000.0);
		}
		if (gone)
			lat_add(&t->lat, (now_s() - committed) * 1000.0);
		else
			t->errors++;		/* a timeout: not acked within 30 s */
		sleep_until(now_s() + opt_interval_ms / 1000.0);
	}
	return NULL;
}

static void
usage(void)
{
	fprintf(stderr, "usage: probe load|lag --seconds S [--threads N] [--rate R] [--lo A --hi B]\n"
			"             [--sql SQL] [--stop-file F] [--interval-ms I] [--poll-ms P]\n");
	exit(2);
}

int
main(int argc, char **argv)
{
	const char *mode;
	Thread	   *threads;
	pthread_t	tids[MAX_THREADS];
	double		elapsed;
	long		calls = 0,
				errors = 0;
	Lat			all = {0};
	ErrCode		codes[MAX_CODES];
	int			ncodes = 0;
	int			i,
				j,
				k;

	if (argc < 2)
		usage();
	mode = argv[1];
	for (i = 2; i < argc; i++)
	{
		const char *a = argv[i];
		const char *v = i + 1 < argc ? argv[i + 1] : NULL;

		if (v == NULL)
			usage();
		if (strcmp(a, "--threads") == 0)
			opt_threads = atoi(v);
		else if (strcmp(a, "--seconds") == 0)
			opt_seconds = atof(v);
		else if (strcmp(a, "--rate") == 0)
			opt_rate = atof(v);
		else if (strcmp(a, "--lo") == 0)
			opt_lo = atol(v);
		else if (strcmp(a, "--hi") == 0)
			opt_hi = atol(v);
		else if (strcmp(a, "--sql") == 0)
			opt_sql = v;
		else if (strcmp(a, "--stop-file") == 0)
			opt_stop = v;
		else if (strcmp(a, "--interval-ms") == 0)
			opt_interval_ms = atoi(v);
		else if (strcmp(a, "--poll-ms") == 0)
			opt_poll_ms = atoi(v);
		else
			usage();
		i++;
	}
	if (strcmp(mode, "lag") == 0)
		opt_threads = 1;
	else if (strcmp(mode, "load") != 0)
		usage();
	if (opt_threads < 1 || opt_threads > MAX_THREADS || opt_seconds <= 0 ||
		opt_seconds > 3600 || opt_hi < opt_lo)
		usage();

	threads = calloc(opt_threads, sizeof(Thread));
	for (i = 0; i < opt_threads; i++)
	{
		threads[i].id = i;
		threads[i].seed = (unsigned int) (time(NULL) ^ (getpid() << 8) ^ (i * 7919));
		threads[i].conn = pg_connect_or_exit("probe");
	}
	t_start = now_s();
	for (i = 0; i < opt_threads; i++)
		pthread_create(&tids[i], NULL,
					   strcmp(mode, "lag") == 0 ? lag_thread : load_thread, &threads[i]);
	/* the stop file and the time limit */
	while (now_s() < t_start + opt_seconds + 0.05)
	{
		if (opt_stop && access(opt_stop, F_OK) == 0)
		{
			stop_flag = 1;
			break;
		}
		usleep(50000);
	}
	stop_flag = 1;
	for (i = 0; i < opt_threads; i++)
		pthread_join(tids[i], NULL);
	elapsed = now_s() - t_start;
	if (elapsed > opt_seconds)
		elapsed = opt_seconds;

	for (i = 0; i < opt_threads; i++)
	{
		Thread	   *t = &threads[i];

		lat_merge(&all, &t->lat);
		calls += t->calls;
		errors += t->errors;
		for (j = 0; j < t->ncodes; j++)
		{
			for (k = 0; k < ncodes; k++)
				if (strcmp(codes[k].code, t->codes[j].code) == 0)
					break;
			if (k == ncodes)
			{
				if (ncodes == MAX_CODES)
					continue;
				codes[ncodes] = t->codes[j];
				codes[ncodes++].n = 0;
			}
			codes[k].n += t->codes[j].n;
		}
		PQfinish(t->conn);
	}
	lat_sort(&all);
	printf("calls=%ld errors=%ld tps=%.1f p50_ms=%.3f p99_ms=%.3f max_ms=%.3f samples=%ld errcodes=",
		   calls, errors, calls / elapsed, lat_pct(&all, 0.50), lat_pct(&all, 0.99),
		   lat_max(&all), all.n);
	for (k = 0; k < ncodes; k++)
		printf("%s%s:%ld", k ? "," : "", codes[k].code, codes[k].n);
	printf("%s\n", ncodes ? "" : "-");
	return 0;
}
