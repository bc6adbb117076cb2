/*
 * bench/lat.h - what the benchmark's C clients (probe.c, w8.c) share: a
 * monotonic clock, latency samples with percentiles, a libpq connection.
 */
#ifndef BENCH_LAT_H
#define BENCH_LAT_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <libpq-fe.h>

typedef struct
{
	double	   *v;				/* ms */
	long		n;
	long		cap;
} Lat;

static inline double
now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static inline void
lat_add(Lat *l, double ms)
{
	if (l->n == l->cap)
	{
		l->cap = l->cap ? l->cap * 2 : 16384;
		l->v = realloc(l->v, sizeof(double) * l->cap);
		if (!l->v)
		{
			perror("realloc");
			exit(1);
		}
	}
	l->v[l->n++] = ms;
}

/* append every sample of from to to */
static inline void
lat_merge(Lat *to, const Lat *from)
{
	for (long i = 0; i < from->n; i++)
		lat_add(to, from->v[i]);
}

static inline int
lat_cmp(const void *a, const void *b)
{
	double		x = *(const double *) a;
	double		y = *(const double *) b;

	return x < y ? -1 : x > y;
}

static inline void
lat_sort(Lat *l)
{
	qsort(l->v, l->n, sizeof(double), lat_cmp);
}

/* the p-quantile of sorted samples (0 if none) */
static inline double
lat_pct(const Lat *l, double p)
{
	return l->n ? l->v[(long) (p * (l->n - 1) + 0.5)] : 0;
}

static inline double
lat_max(const Lat *l)
{
	return l->n ? l->v[l->n - 1] : 0;
}

/* a connection from the PG* environment, or exit with prog's message */
static inline PGconn *
pg_connect_or_exit(const char *prog)
{
	PGconn	   *c = PQconnectdb("");

	if (PQstatus(c) != CONNECTION_OK)
	{
		fprintf(stderr, "%s: cannot connect to PostgreSQL: %s", prog, PQerrorMessage(c));
		exit(1);
	}
	return c;
}

#endif
