/*
 * produce_events.c - produce test events shaped like the outbox worker's
 *
 * This file owns the test producer used by selftest.sh (and handy for the
 * demo): it publishes events in the format of SPEC.md "Events (Kafka)", so
 * that consume_check can be proven without PostgreSQL.
 *
 *   produce_events --bootstrap B --topic T [--no-headers]
 *                  [--flush-timeout-ms MS] [-X prop=value ...] < EVENTS
 *
 * EVENTS has one event a line, fields separated by blanks or tabs:
 *
 *   event_id  user_id  user_seq  tx_id  type  [key]
 *
 * The message key is the user id as decimal text, unless the optional sixth
 * field gives another one (to test consume_check's key check).  The value is
 * a JSON object with every field of the spec, including a nested "metadata"
 * object that holds a decoy "user_id" (to test that consume_check only reads
 * top-level fields).  Headers: event_id and event_type (none with
 * --no-headers).  Blank lines and lines starting with '#' are skipped.
 *
 * The producer is idempotent (acks=all, per-partition order); -X passes any
 * other librdkafka property.  It waits until every message is acknowledged
 * or --flush-timeout-ms (default 60000) passes, and exits 0 only if all
 * were delivered.  A summary "produced=N failed=N" goes to stderr.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <librdkafka/rdkafka.h>

static long pe_delivered = 0;
static long pe_failed = 0;

static void
pe_usage(void)
{
	fprintf(stderr,
			"usage: produce_events --bootstrap B --topic T [--no-headers] "
			"[--flush-timeout-ms MS] [-X prop=value ...] < EVENTS\n"
			"EVENTS lines: event_id user_id user_seq tx_id type [key]\n");
	exit(2);
}

/*
 * pe_dr_cb - delivery report: count successes and failures
 */
static void
pe_dr_cb(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque)
{
	(void) rk;
	(void) opaque;
	if (m->err)
	{
		pe_failed++;
		fprintf(stderr, "produce_events: delivery failed: %s\n",
				rd_kafka_err2str(m->err));
	}
	else
		pe_delivered++;
}

static void
pe_conf_set(rd_kafka_conf_t *conf, const char *name, const char *value)
{
	char		errstr[512];

	if (rd_kafka_conf_set(conf, name, value, errstr, sizeof(errstr)) != RD_KAFKA_CONF_OK)
	{
		fprintf(stderr, "produce_events: %s\n", errstr);
		exit(2);
	}
}

/*
 * pe_split - read "event_id user_id user_seq tx_id type [key]" from line
 * (changed in place).  Returns the number of fields (5 or 6), or -1 when the
 * line is not of that shape (a number that is not a whole int64, a field
 * too long, too few or too many fields).
 */
static int
pe_split(char *line, int64_t *event_id, int64_t *user_id, int64_t *user_seq,
		 int64_t *tx_id, char *type, size_t typesz, char *key, size_t keysz)
{
	int64_t    *nums[4] = {event_id, user_id, user_seq, tx_id};
	char	   *save = NULL;
	char	   *tok;
	int			nf = 0;

	for (tok = strtok_r(line, " \t\r\n", &save); tok != NULL;
		 tok = strtok_r(NULL, " \t\r\n", &save), nf++)
	{
		if (nf < 4)
		{
			char	   *end;

			errno = 0;
			*nums[nf] = strtoll(tok, &end, 10);
			if (errno != 0 || *end != '\0')
				return -1;
		}
		else if (nf == 4 || nf == 5)
		{
			char	   *dst = nf == 4 ? type : key;
			size_t		sz = nf == 4 ? typesz : keysz;

			if (strlen(tok) >= sz)
				return -1;
			strcpy(dst, tok);
		}
		else
			return -1;
	}
	return nf == 5 || nf == 6 ? nf : -1;
}

int
main(int argc, char **argv)
{
	const char *bootstrap = NULL;
	const char *topic = NULL;
	int			headers = 1;
	long		flush_timeout_ms = 60000;
	rd_kafka_conf_t *conf = rd_kafka_conf_new();
	rd_kafka_t *rk;
	char		errstr[512];
	char		line[4096];
	long		lineno = 0;
	long		queued = 0;
	int			rc = 0;
	struct timespec start,
				now;

	pe_conf_set(conf, "enable.idempotence", "true");
	pe_conf_set(conf, "linger.ms", "5");

	for (int i = 1; i < argc; i++)
	{
		const char *val = i + 1 < argc ? argv[i + 1] : NULL;

		if (strcmp(argv[i], "--no-headers") == 0)
		{
			headers = 0;
			continue;
		}
		if (val == NULL)
			pe_usage();
		if (strcmp(argv[i], "--bootstrap") == 0)
			bootstrap = val;
		else if (strcmp(argv[i], "--topic") == 0)
			topic = val;
		else if (strcmp(argv[i], "--flush-timeout-ms") == 0)
			flush_timeout_ms = atol(val);
		else if (strcmp(argv[i], "-X") == 0)
		{
			char	   *copy = strdup(val);
			char	   *eq = copy ? strchr(copy, '=') : NULL;

			if (eq == NULL)
				pe_usage();
			*eq = '\0';
			pe_conf_set(conf, copy, eq + 1);
			free(copy);
		}
		else
			pe_usage();
		i++;
	}
	if (bootstrap == NULL || topic == NULL || flush_timeout_ms <= 0)
		pe_usage();

	pe_conf_set(conf, "bootstrap.servers", bootstrap);
	rd_kafka_conf_set_dr_msg_cb(conf, pe_dr_cb);
	rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof(errstr));
	if (rk == NULL)
	{
		fprintf(stderr, "produce_events: rd_kafka_new: %s\n", errstr);
		return 2;
	}

	while (fgets(line, sizeof(line), stdin) != NULL)
	{
		int64_t		event_id,
					user_id,
					user_seq,
					tx_id;
		char		type[128],
					keybuf[128],
					idbuf[32],
					value[1024];
		int			nf;
		rd_kafka_resp_err_t err;
		rd_kafka_headers_t *hdrs = NULL;

		lineno++;
		if (line[strspn(line, " \t\r\n")] == '\0' || line[0] == '#')
			continue;
		nf = pe_split(line, &event_id, &user_id, &user_seq, &tx_id, type,
					  sizeof(type), keybuf, sizeof(keybuf));
		if (nf < 0)
		{
			fprintf(stderr, "produce_events: line %ld: expected "
					"event_id user_id user_seq tx_id type [key]\n", lineno);
			rc = 2;
			break;
		}
		if (nf == 5)
			snprintf(keybuf, sizeof(keybuf), "%" PRId64, user_id);
		snprintf(idbuf, sizeof(idbuf), "%" PRId64, event_id);
		snprintf(value, sizeof(value),
				 "{\"event_id\": %" PRId64 ", \"type\": \"%s\", "
				 "\"user_id\": %" PRId64 ", \"user_seq\": %" PRId64 ", "
				 "\"tx_id\": %" PRId64 ", \"amount\": 100, \"balance_after\": %" PRId64 ", "
				 "\"occurred_at\": \"2024-01-01T00:00:00+00:00\", "
				 "\"idempotency_key\": \"k-%" PRId64 "\", "
				 "\"reason\": \"test \\\"quoted\\\" {reason}\", "
				 "\"metadata\": {\"user_id\": -1, \"list\": [1, {\"tx_id\": -1}], \"ok\": true}}",
				 event_id, type, user_id, user_seq, tx_id, 100 * user_seq, event_id);

		if (headers)
		{
			hdrs = rd_kafka_headers_new(2);
			rd_kafka_header_add(hdrs, "event_id", -1, idbuf, -1);
			rd_kafka_header_add(hdrs, "event_type", -1, type, -1);
		}
		for (;;)
		{
			err = rd_kafka_producev(rk,
									RD_KAFKA_V_TOPIC(topic),
									RD_KAFKA_V_KEY(keybuf, strlen(keybuf)),
									RD_KAFKA_V_VALUE(value, strlen(value)),
									RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
									RD_KAFKA_V_HEADERS(hdrs),
									RD_KAFKA_V_END);
			if (err != RD_KAFKA_RESP_ERR__QUEUE_FULL)
				break;
			rd_kafka_poll(rk, 100);
		}
		if (err)
		{
			/* headers are only taken over on success */
			if (hdrs)
				rd_kafka_headers_destroy(hdrs);
			fprintf(stderr, "produce_events: line %ld: %s\n", lineno,
					rd_kafka_err2str(err));
			rc = 1;
			break;
		}
		queued++;
		rd_kafka_poll(rk, 0);
	}

	/* wait for every delivery report, the brokers may be down meanwhile */
	clock_gettime(CLOCK_MONOTONIC, &start);
	while (rd_kafka_outq_len(rk) > 0)
	{
		long		elapsed;

		rd_kafka_flush(rk, 500);
		clock_gettime(CLOCK_MONOTONIC, &now);
		elapsed = (now.tv_sec - start.tv_sec) * 1000 +
			(now.tv_nsec - start.tv_nsec) / 1000000;
		if (elapsed >= flush_timeout_ms)
		{
			fprintf(stderr, "produce_events: %d messages not acknowledged after %ld ms\n",
					rd_kafka_outq_len(rk), flush_timeout_ms);
			rd_kafka_purge(rk, RD_KAFKA_PURGE_F_QUEUE | RD_KAFKA_PURGE_F_INFLIGHT);
			rd_kafka_poll(rk, 0);	/* the purged messages' reports */
			rc = 1;
			break;
		}
	}

	fprintf(stderr, "produce_events: produced=%ld failed=%ld\n", pe_delivered, pe_failed);
	if (rc == 0 && (pe_failed > 0 || pe_delivered != queued))
		rc = 1;
	rd_kafka_destroy(rk);
	return rc;
}
