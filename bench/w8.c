/*
 * w8.c - W8: the Redis-lock application design against points.earn, with
 *        the same threads and the same connections (libhiredis + libpq)
 *
 *   w8 --threads N --users U --runs R --seconds S [--redis-port P]
 *
 * N threads, each with one PostgreSQL connection (PGHOST, PGPORT, ... from
 * the environment) and one Redis connection (127.0.0.1:P), plus one Redis
 * connection that listens for unlock messages.  Each thread earns 10 points
 * for a user drawn uniformly from 1..U (U = 1: one hot user), in runs of S
 * seconds that alternate the two designs: A, B, A, B, ... (R runs of each).
 *
 * Design A (the baseline: what this extension replaces), one call:
 *   1. lock: SET lock:U token NX PX 3000 (pipelined with PTTL lock:U, one
 *      round trip).  If taken, wait as Redisson's RLock.tryLock(2 s, 3 s)
 *      does: register as a waiter of U, try again, then sleep until the
 *      holder's unlock message wakes one waiter (or the lock's TTL, or the
 *      2 s deadline passes), and try again.  After 2 s the call fails.
 *      Unlock messages come on one channel (w8:unlock, payload = user id),
 *      read by one listener thread that wakes one waiter of that user, as
 *      Redisson's LockPubSub releases one permit of the lock's semaphore.
 *   2. PostgreSQL, plain tables, prepared statements, libpq pipeline mode:
 *      [BEGIN; SELECT balance] then [UPDATE balance; INSERT history row;
 *      COMMIT]: two round trips, one WAL flush.
 *   3. Redis, one round trip: RPUSH history:U entry, then the unlock:
 *      EVALSHA of the usual compare-and-delete script, which also
 *      PUBLISHes the unlock message (as Redisson's unlock script does).
 *   Redis runs without persistence (the fastest it can be).
 *
 * Design B (ours): SELECT points.earn(U, 10), prepared, one round trip.
 *
 * At the end A is checked: every user's balance equals 10 x its
 * acknowledged earns (calls that returned success), the history table has
 * one row per acknowledged earn, and so have the Redis lists; unlocks that
 * found the lock gone (expired under its holder) are counted as "lost".
 * B is checked the same way on points.account (the sum of the balances of
 * users 1..U grew by 10 x its acknowledged earns).
 *
 * Output, one line each: W8RUN design=A|B run=K ok= fail= tps= p50_ms=
 * p99_ms= ...; W8POOL design=A|B p50_ms= p99_ms= (all runs of a design);
 * W8CHECK ... ok=1|0.
 */
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <hiredis/hiredis.h>
#include <libpq-fe.h>

#include "lat.h"

#define MAX_THREADS	128
#define LOCK_TTL_MS	3000
#define LOCK_WAIT_S	2.0
#define CHANNEL		"w8:unlock"

static const char *UNLOCK_LUA =
"if redis.call('get', KEYS[1]) == ARGV[1] then "
"  redis.call('del', KEYS[1]); "
"  redis.call('publish', KEYS[2], ARGV[2]); "
"  return 1 "
"else return 0 end";

typedef struct
{
	pthread_mutex_t m;
	pthread_cond_t c;
	int			waiters;
	int			permits;
} UserWait;

typedef struct
{
	int			id;
	PGconn	   *pg;
	redisContext *rc;
	unsigned int seed;
	long		seq;
	/* per run */
	long		ok;
	long		fail;
	long		lost;
	Lat			lat;
} Thread;

static int	opt_threads = 8;
static long opt_users = 100000;
static int	opt_runs = 3;
static double opt_seconds = 10;
static int	opt_redis_port = 6379;

static UserWait *uw;
static long *acked_a;
static long acked_b_total;
static char unlock_sha[64];
static pthread_barrier_t barrier;
static volatile int cur_design;	/* 'A' or 'B' */
static volatile double run_end;
static volatile int quit_threads;
static Lat pool[2];

static void
die(const char *what, const char *why)
{
	fprintf(stderr, "w8: %s: %s\n", what, why);
	exit(1);
}

static redisContext *
redis_connect(void)
{
	redisContext *c = redisConnect("127.0.0.1", opt_redis_port);

	if (c == NULL || c->err)
		die("cannot connect to redis", c ? c->errstr : "out of memory");
	return c;
}

static void
pg_exec(PGconn *c, const char *sql)
{
	PGresult   *r = PQexec(c, sql);

	if (PQresultStatus(r) != PGRES_COMMAND_OK && PQresultStatus(r) != PGRES_TUPLES_OK)
		die(sql, PQresultErrorMessage(r));
	PQclear(r);
}

static void
pg_prepare(PGconn *c, const char *name, const char *sql, int n)
{
	Oid			types[3] = {20, 20, 20};
	PGresult   *r = PQprepare(c, name, sql, n, types);

	if (PQresultStatus(r) != PGRES_COMMAND_OK)
		die(sql, PQresultErrorMessage(r));
	PQclear(r);
}

/* ---- the unlock listener: wakes one waiter of the user ---- */

static void *
listener(void *arg)
{
	redisContext *c = redis_connect();
	redisReply *r = redisCommand(c, "SUBSCRIBE %s", CHANNEL);

	if (r == NULL)
		die("subscribe", c->errstr);
	freeReplyObject(r);
	*(volatile int *) arg = 1;
	for (;;)
	{
		long		u;

		if (redisGetReply(c, (void **) &r) != REDIS_OK)
			die("listener", c->errstr);
		if (r->type == REDIS_REPLY_ARRAY && r->elements == 3 &&
			r->element[2]->type == REDIS_REPLY_STRING)
		{
			if (strcmp(r->element[2]->str, "quit") == 0)
			{
				freeReplyObject(r);
				break;
			}
			u = atol(r->element[2]->str);
			if (u >= 1 && u <= opt_users)
			{
				pthread_mutex_lock(&uw[u].m);
				if (uw[u].waiters > uw[u].permits)
				{
					uw[u].permits++;
					pthread_cond_signal(&uw[u].c);
				}
				pthread_mutex_unlock(&uw[u].m);
			}
		}
		freeReplyObject(r);
	}
	redisFree(c);
	return NULL;
}

/* SET NX PX + PTTL in one round trip: 1 if taken, else *pttl_ms */
static int
try_lock(Thread *t, const char *key, const char *token, long *pttl_ms)
{
	redisReply *r1,
			   *r2;
	int			got;

	redisAppendCommand(t->rc, "SET %s %s NX PX %d", key, token, LOCK_TTL_MS);
	redisAppendCommand(t->rc, "PTTL %s", key);
	if (redisGetReply(t->rc, (void **) &r1) != REDIS_OK ||
		redisGetReply(t->rc, (void **) &r2) != REDIS_OK)
		die("redis", t->rc->errstr);
	got = r1->type == REDIS_REPLY_STATUS;
	*pttl_ms = r2->type == REDIS_REPLY_INTEGER ? r2->integer : -1;
	freeReplyObject(r1);
	freeReplyObject(r2);
	return got;
}

static void
wait_permit(long u, double secs)
{
	struct timespec ts;
	double		until;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	until = ts.tv_sec + ts.tv_nsec / 1e9 + secs;
	ts.tv_sec = (time_t) until;
	ts.tv_nsec = (long) ((until - ts.tv_sec) * 1e9);
	pthread_mutex_lock(&uw[u].m);
	while (uw[u].permits == 0)
		if (pthread_cond_timedwait(&uw[u].c, &uw[u].m, &ts) == ETIMEDOUT)
			break;
	if (uw[u].permits > 0)
		uw[u].permits--;
	pthread_mutex_unlock(&uw[u].m);
}

static void
waiter(long u, int delta)
{
	pthread_mutex_lock(&uw[u].m);
	uw[u].waiters += delta;
	if (uw[u].permits > uw[u].waiters)
		uw[u].permits = uw[u].waiters;
	pthread_mutex_unlock(&uw[u].m);
}

/*
 * Read the results of nq pipelined queries and the sync.  Returns 1 if all
 * succeeded; the first query's first row/col goes to *val when val.
 */
static int
pipe_results(Thread *t, int nq, long *val)
{
	int			ok = 1;
	int			i;
	PGresult   *r;

	for (i = 0; i < nq; i++)
	{
		ExecStatusType st;

		r = PQgetResult(t->pg);
		if (r == NULL)
			die("pipeline", "missing result");
		st = PQresultStatus(r);
		if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK)
		{
			if (ok && st != PGRES_PIPELINE_ABORTED)
				fprintf(stderr, "w8: thread %d: %s", t->id, PQresultErrorMessage(r));
			ok = 0;
		}
		else if (val && i == 1 && PQntuples(r) > 0)
			*val = atol(PQgetvalue(r, 0, 0));
		PQclear(r);
		while ((r = PQgetResult(t->pg)) != NULL)
			PQclear(r);
	}
	r = PQgetResult(t->pg);
	if (r == NULL || PQresultStatus(r) != PGRES_PIPELINE_SYNC)
		die("pipeline", "no sync");
	PQclear(r);
	return ok;
}

static void
rollback(Thread *t)
{
	PQsendQueryParams(t->pg, "ROLLBACK", 0, NULL, NULL, NULL, NULL, 0);
	PQpipelineSync(t->pg);
	(void) pipe_results(t, 1, NULL);
}

static int
call_a(Thread *t, long u)
{
	char		key[48],
				hkey[48],
				token[48],
				ubuf[24],
				bbuf[24],
				entry[128];
	const char *p1[1] = {ubuf};
	const char *p2[2] = {ubuf, bbuf};
	const char *p3[3] = {ubuf, "10", bbuf};
	double		deadline = now_s() + LOCK_WAIT_S;
	long		pttl;
	long		balance = -1;
	int			got;
	int			done;
	redisReply *r1,
			   *r2;

	snprintf(key, sizeof(key), "lock:%ld", u);
	snprintf(hkey, sizeof(hkey), "history:%ld", u);
	snprintf(token, sizeof(token), "t%d-%ld", t->id, ++t->seq);
	snprintf(ubuf, sizeof(ubuf), "%ld", u);

	got = try_lock(t, key, token, &pttl);
	if (!got)
	{
		waiter(u, 1);
		for (;;)
		{
			double		rem;

			got = try_lock(t, key, token, &pttl);
			if (got)
				break;
			rem = deadline - now_s();
			if (rem <= 0)
				break;
			if (pttl >= 0 && pttl / 1000.0 < rem)
				rem = pttl / 1000.0;
			wait_permit(u, rem);
		}
		waiter(u, -1);
	}
	if (!got)
		return 0;

	/* [BEGIN; SELECT] [UPDATE; INSERT; COMMIT] */
	PQsendQueryParams(t->pg, "BEGIN", 0, NULL, NULL, NULL, NULL, 0);
	PQsendQueryPrepared(t->pg, "a_sel", 1, p1, NULL, NULL, 0);
	PQpipelineSync(t->pg);
	done = pipe_results(t, 2, &balance) && balance >= 0;
	if (done)
	{
		snprintf(bbuf, sizeof(bbuf), "%ld", balance + 10);
		PQsendQueryPrepared(t->pg, "a_upd", 2, p2, NULL, NULL, 0);
		PQsendQueryPrepared(t->pg, "a_ins", 3, p3, NULL, NULL, 0);
		PQsendQueryParams(t->pg, "COMMIT", 0, NULL, NULL, NULL, NULL, 0);
		PQpipelineSync(t->pg);
		done = pipe_results(t, 3, NULL);
	}
	if (!done && PQtransactionStatus(t->pg) != PQTRANS_IDLE)
		rollback(t);

	/* history entry and unlock (compare-and-delete + PUBLISH) */
	snprintf(entry, sizeof(entry), "{\"amount\":10,\"balance_after\":%ld,\"token\":\"%s\"}",
			 balance + 10, token);
	if (done)
		redisAppendCommand(t->rc, "RPUSH %s %s", hkey, entry);
	redisAppendCommand(t->rc, "EVALSHA %s 2 %s %s %s %s", unlock_sha, key, CHANNEL,
					   token, ubuf);
	if (done)
	{
		if (redisGetReply(t->rc, (void **) &r1) != REDIS_OK)
			die("redis", t->rc->errstr);
		freeReplyObject(r1);
	}
	if (redisGetReply(t->rc, (void **) &r2) != REDIS_OK)
		die("redis", t->rc->errstr);
	if (r2->type != REDIS_REPLY_INTEGER || r2->integer != 1)
		t->lost++;
	freeReplyObject(r2);
	if (done)
		__atomic_fetch_add(&acked_a[u], 1, __ATOMIC_RELAXED);
	return done;
}

static int
call_b(Thread *t, long u)
{
	char		ubuf[24];
	const char *p1[1] = {ubuf};

	snprintf(ubuf, sizeof(ubuf), "%ld", u);
	PQsendQueryPrepared(t->pg, "b_earn", 1, p1, NULL, NULL, 0);
	PQpipelineSync(t->pg);
	return pipe_results(t, 1, NULL);
}

static void *
worker(void *arg)
{
	Thread	   *t = arg;

	for (;;)
	{
		pthread_barrier_wait(&barrier);	/* start of a run */
		if (quit_threads)
			break;
		t->ok = t->fail = t->lost = 0;
		t->lat.n = 0;
		while (now_s() < run_end)
		{
			long		u = opt_users == 1 ? 1 :
			1 + (long) (rand_r(&t->seed) % (unsigned long) opt_users);
			double		t0 = now_s();
			int			ok = cur_design == 'A' ? call_a(t, u) : call_b(t, u);

			lat_add(&t->lat, (now_s() - t0) * 1000.0);
			if (ok)
				t->ok++;
			else
				t->fail++;
		}
		pthread_barrier_wait(&barrier);	/* end of a run */
	}
	return NULL;
}

static long
b_balance_sum(PGconn *c)
{
	char		sql[160];
	PGresult   *r;
	long		v;

	snprintf(sql, sizeof(sql),
			 "SELECT coalesce(sum(balance), 0) FROM points.account WHERE user_id BETWEEN 1 AND %ld",
			 opt_users);
	r = PQexec(c, sql);
	if (PQresultStatus(r) != PGRES_TUPLES_OK)
		die(sql, PQresultErrorMessage(r));
	v = atol(PQgetvalue(r, 0, 0));
	PQclear(r);
	return v;
}

static void
usage(void)
{
	fprintf(stderr, "usage: w8 --threads N --users U --runs R --seconds S [--redis-port P]\n");
	exit(2);
}

int
main(int argc, char **argv)
{
	Thread	   *th;
	pthread_t	tids[MAX_THREADS];
	pthread_t	ltid;
	volatile int listening = 0;
	PGconn	   *admin;
	redisContext *rc;
	redisReply *r;
	char		sql[512];
	long		b_before,
				b_after;
	long		total_a = 0,
				bad_users = 0,
				hist_rows,
				redis_bad = 0,
				lost_total = 0;
	int			i,
				run,
				d;

	for (i = 1; i < argc; i++)
	{
		const char *a = argv[i];
		const char *v = i + 1 < argc ? argv[i + 1] : NULL;

		if (v == NULL)
			usage();
		if (strcmp(a, "--threads") == 0)
			opt_threads = atoi(v);
		else if (strcmp(a, "--users") == 0)
			opt_users = atol(v);
		else if (strcmp(a, "--runs") == 0)
			opt_runs = atoi(v);
		else if (strcmp(a, "--seconds") == 0)
			opt_seconds = atof(v);
		else if (strcmp(a, "--redis-port") == 0)
			opt_redis_port = atoi(v);
		else
			usage();
		i++;
	}
	if (opt_threads < 1 || opt_threads > MAX_THREADS || opt_users < 1 ||
		opt_users > 10000000 || opt_runs < 1 || opt_runs > 20 ||
		opt_seconds <= 0 || opt_seconds > 600)
		usage();

	uw = calloc(opt_users + 1, sizeof(UserWait));
	acked_a = calloc(opt_users + 1, sizeof(long));
	for (i = 0; i <= opt_users; i++)
	{
		pthread_condattr_t ca;

		pthread_condattr_init(&ca);
		pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
		pthread_mutex_init(&uw[i].m, NULL);
		pthread_cond_init(&uw[i].c, &ca);
	}

	/* fresh tables for design A, and a clean Redis */
	admin = pg_connect_or_exit("w8");
	pg_exec(admin, "DROP TABLE IF EXISTS w8_history, w8_account");
	pg_exec(admin, "CREATE TABLE w8_account (user_id bigint PRIMARY KEY,"
			" balance bigint NOT NULL CHECK (balance >= 0),"
			" updated_at timestamptz NOT NULL DEFAULT now())");
	pg_exec(admin, "CREATE TABLE w8_history (id bigserial PRIMARY KEY,"
			" user_id bigint NOT NULL, amount bigint NOT NULL,"
			" balance_after bigint NOT NULL,"
			" created_at timestamptz NOT NULL DEFAULT now())");
	pg_exec(admin, "CREATE INDEX ON w8_history (user_id, id)");
	snprintf(sql, sizeof(sql),
			 "INSERT INTO w8_account (user_id, balance) SELECT g, 0 FROM generate_series(1, %ld) g",
			 opt_users);
	pg_exec(admin, sql);
	pg_exec(admin, "ANALYZE w8_account");
	rc = redis_connect();
	r = redisCommand(rc, "FLUSHDB");
	freeReplyObject(r);
	r = redisCommand(rc, "SCRIPT LOAD %s", UNLOCK_LUA);
	if (r == NULL || r->type != REDIS_REPLY_STRING)
		die("SCRIPT LOAD", rc->errstr);
	snprintf(unlock_sha, sizeof(unlock_sha), "%s", r->str);
	freeReplyObject(r);

	pthread_create(&ltid, NULL, listener, (void *) &listening);
	while (!listening)
		usleep(1000);

	th = calloc(opt_threads, sizeof(Thread));
	for (i = 0; i < opt_threads; i++)
	{
		th[i].id = i;
		th[i].seed = (unsigned int) (time(NULL) ^ (getpid() << 8) ^ (i * 7919));
		th[i].pg = pg_connect_or_exit("w8");
		pg_prepare(th[i].pg, "a_sel", "SELECT balance FROM w8_account WHERE user_id = $1", 1);
		pg_prepare(th[i].pg, "a_upd",
				   "UPDATE w8_account SET balance = $2, updated_at = now() WHERE user_id = $1", 2);
		pg_prepare(th[i].pg, "a_ins",
				   "INSERT INTO w8_history (user_id, amount, balance_after) VALUES ($1, $2, $3)", 3);
		pg_prepare(th[i].pg, "b_earn", "SELECT points.earn($1, 10)", 1);
		if (PQenterPipelineMode(th[i].pg) != 1)
			die("pipeline mode", PQerrorMessage(th[i].pg));
		th[i].rc = redis_connect();
	}
	pthread_barrier_init(&barrier, NULL, opt_threads + 1);
	for (i = 0; i < opt_threads; i++)
		pthread_create(&tids[i], NULL, worker, &th[i]);

	b_before = b_balance_sum(admin);
	for (run = 1; run <= opt_runs; run++)
		for (d = 0; d < 2; d++)
		{
			double		t0;
			double		elapsed;
			long		ok = 0,
						fail = 0,
						lost = 0;
			Lat			lat = {0};

			cur_design = d == 0 ? 'A' : 'B';
			t0 = now_s();
			run_end = t0 + opt_seconds;
			pthread_barrier_wait(&barrier);
			pthread_barrier_wait(&barrier);
			elapsed = now_s() - t0;
			for (i = 0; i < opt_threads; i++)
			{
				ok += th[i].ok;
				fail += th[i].fail;
				lost += th[i].lost;
				lat_merge(&lat, &th[i].lat);
				lat_merge(&pool[d], &th[i].lat);
			}
			lost_total += lost;
			if (d == 1)
				acked_b_total += ok;
			lat_sort(&lat);
			printf("W8RUN design=%c run=%d ok=%ld fail=%ld lost=%ld tps=%.1f p50_ms=%.3f p99_ms=%.3f max_ms=%.3f\n",
				   cur_design, run, ok, fail, lost, ok / elapsed, lat_pct(&lat, 0.5),
				   lat_pct(&lat, 0.99), lat_max(&lat));
			fflush(stdout);
			free(lat.v);
		}
	quit_threads = 1;
	pthread_barrier_wait(&barrier);
	for (i = 0; i < opt_threads; i++)
		pthread_join(tids[i], NULL);
	r = redisCommand(rc, "PUBLISH %s quit", CHANNEL);
	freeReplyObject(r);
	pthread_join(ltid, NULL);

	for (d = 0; d < 2; d++)
	{
		lat_sort(&pool[d]);
		printf("W8POOL design=%c calls=%ld p50_ms=%.3f p99_ms=%.3f\n", d ? 'B' : 'A',
			   pool[d].n, lat_pct(&pool[d], 0.5), lat_pct(&pool[d], 0.99));
	}

	/* check A: balances, history rows, Redis lists */
	{
		PGresult   *res = PQexec(admin, "SELECT user_id, balance FROM w8_account WHERE balance <> 0");
		long	   *bal = calloc(opt_users + 1, sizeof(long));
		long		u,
					k;

		if (PQresultStatus(res) != PGRES_TUPLES_OK)
			die("check", PQresultErrorMessage(res));
		for (k = 0; k < PQntuples(res); k++)
		{
			u = atol(PQgetvalue(res, k, 0));
			if (u >= 1 && u <= opt_users)
				bal[u] = atol(PQgetvalue(res, k, 1));
		}
		PQclear(res);
		for (u = 1; u <= opt_users; u++)
		{
			total_a += acked_a[u];
			if (bal[u] != 10 * acked_a[u])
				bad_users++;
		}
		res = PQexec(admin, "SELECT count(*) FROM w8_history");
		hist_rows = atol(PQgetvalue(res, 0, 0));
		PQclear(res);
		/* Redis list lengths, pipelined in chunks of 1000 users */
		u = 1;
		while (u <= opt_users)
		{
			long		batch[1000];
			long		nb = 0,
						p;

			for (; u <= opt_users && nb < 1000; u++)
				if (acked_a[u] > 0)
				{
					redisAppendCommand(rc, "LLEN history:%ld", u);
					batch[nb++] = u;
				}
			for (p = 0; p < nb; p++)
			{
				redisReply *x;

				if (redisGetReply(rc, (void **) &x) != REDIS_OK)
					die("redis", rc->errstr);
				if (x->type != REDIS_REPLY_INTEGER || x->integer != acked_a[batch[p]])
					redis_bad++;
				freeReplyObject(x);
			}
		}
		free(bal);
	}
	b_after = b_balance_sum(admin);
	printf("W8CHECK a_acked=%ld a_bad_users=%ld a_history_rows=%ld a_redis_bad=%ld a_lost_locks=%ld"
		   " b_acked=%ld b_balance_delta=%ld ok=%d\n",
		   total_a, bad_users, hist_rows, redis_bad, lost_total, acked_b_total,
		   b_after - b_before,
		   bad_users == 0 && hist_rows == total_a && redis_bad == 0 &&
		   b_after - b_before == 10 * acked_b_total);
	PQfinish(admin);
	redisFree(rc);
	return 0;
}
