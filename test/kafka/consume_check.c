/*
 * consume_check.c - read a topic back and check it against the ledger
 *
 * This file owns the end-to-end check of the outbox publisher: what reached
 * Kafka is compared with what PostgreSQL committed.
 *
 *   consume_check --bootstrap B --topic T --expect FILE
 *                 [--timeout-ms MS] [--max-ms MS] [--out FILE]
 *
 * FILE holds the expected events, one a line: user_id<TAB>user_seq<TAB>tx_id
 * (any blanks separate fields; blank lines are skipped).
 *
 * Every partition of T (as found in metadata) is read from the beginning with
 * the simple consumer (rd_kafka_assign, no group, no commits) until every
 * expected event has been seen and every partition is at its end, or until
 * --timeout-ms (default 10000) passes with nothing new, or --max-ms (default
 * 600000) in all.
 *
 * Each message must carry: key = user id as decimal text; value = a JSON
 * object with top-level integer fields event_id, user_id, user_seq, tx_id and
 * a string field type (other fields are skipped, nested ones included);
 * headers event_id and event_type equal to the value's event_id and type.
 *
 * Words used here:
 *   event          one (user_id, user_seq); its first delivery is the first
 *                  message that carries it, later ones are redeliveries;
 *   missing        an expected event with no delivery of the same tx_id;
 *   unexpected     a delivered event absent from FILE, or with another tx_id
 *                  (something published for rolled-back work);
 *   order error    a user's first deliveries not in the order of that user's
 *                  expected user_seqs (sorted), or a user's events found in
 *                  more than one partition;
 *   format error   bad JSON or missing field, key or header not matching the
 *                  value, a redelivery that differs from the first delivery,
 *                  a line of FILE that is malformed or repeated.
 *
 * Each failure is printed on its own line starting "FAIL:" (at most
 * CC_MAX_FAIL_LINES per kind, then a count of the rest), then the summary
 *
 *   consumed=N distinct=N redelivered=N missing=N unexpected=N order_errors=N format_errors=N
 *
 * Exit status: 0 when nothing failed, 1 on a failed check, 2 on bad usage or
 * a file that cannot be read.  --out FILE writes every consumed message as
 * partition<TAB>offset<TAB>key<TAB>value (tabs and newlines in key and value
 * replaced by blanks).  librdkafka's own log lines go to stderr.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <librdkafka/rdkafka.h>

#define CC_MAX_FAIL_LINES	50
#define CC_TYPE_MAX			64
#define CC_JSON_DEPTH		64

/* kinds of failure, each with its own counter of printed lines */
typedef enum
{
	CC_MISSING,
	CC_UNEXPECTED,
	CC_ORDER,
	CC_FORMAT,
	CC_OTHER,
	CC_NKINDS
} cc_kind;

static const char *const cc_kind_names[CC_NKINDS] = {
	"missing", "unexpected", "order", "format", "other"
};

/* one line of the expected file */
typedef struct
{
	int64_t		user_id;
	int64_t		user_seq;
	int64_t		tx_id;
	bool		delivered;		/* a message carried this very triple */
} cc_expected;

/* one delivered event (user_id, user_seq), as its first delivery had it */
typedef struct
{
	int64_t		user_id;
	int64_t		user_seq;
	int64_t		tx_id;
	int64_t		event_id;
	char		type[CC_TYPE_MAX];
	int32_t		partition;
	int64_t		offset;
} cc_event;

/* one user seen in the topic */
typedef struct
{
	int64_t		user_id;
	int32_t		partition;		/* partition of its first message */
	size_t		exp_lo;			/* its expected events: [exp_lo, exp_hi) */
	size_t		exp_hi;
	size_t		exp_next;		/* index of the next expected first delivery */
} cc_user;

/* fields read from a message value */
typedef struct
{
	int64_t		event_id;
	int64_t		user_id;
	int64_t		user_seq;
	int64_t		tx_id;
	char		type[CC_TYPE_MAX];
	unsigned	have;			/* CC_F_* bits */
} cc_fields;

#define CC_F_EVENT_ID	0x01
#define CC_F_USER_ID	0x02
#define CC_F_USER_SEQ	0x04
#define CC_F_TX_ID		0x08
#define CC_F_TYPE		0x10
#define CC_F_ALL		0x1f

/*
 * A small open-addressing hash map from a pair of int64 to an index into an
 * array.  Used for events (user_id, user_seq) and users (user_id, 0).
 */
typedef struct
{
	int64_t		a;
	int64_t		b;
	size_t		idx;			/* index + 1; 0 means an empty slot */
} cc_slot;

typedef struct
{
	cc_slot    *slots;
	size_t		cap;			/* a power of 2 */
	size_t		count;
} cc_map;

static long cc_fail_lines[CC_NKINDS];
static long cc_fail_count[CC_NKINDS];

/* what the checks know (the program has one thread) */
static cc_expected *cc_exp;		/* expected events, sorted */
static size_t cc_nexp;
static size_t cc_ndelivered;	/* expected events delivered so far */
static cc_event *cc_events;		/* delivered events, in first-delivery order */
static size_t cc_nevents,
			cc_capevents;
static cc_user *cc_users;
static size_t cc_nusers,
			cc_capusers;
static cc_map cc_event_map;		/* (user_id, user_seq) -> cc_events index */
static cc_map cc_user_map;		/* (user_id, 0) -> cc_users index */
static long cc_consumed,
			cc_redelivered;
static FILE *cc_out;			/* --out, or NULL */

static void *
cc_xrealloc(void *p, size_t n)
{
	void	   *q = realloc(p, n);

	if (q == NULL && n > 0)
	{
		fprintf(stderr, "consume_check: out of memory\n");
		exit(2);
	}
	return q;
}

/*
 * cc_fail - count one failure of a kind and print it as "FAIL: ..." unless
 * that kind already printed CC_MAX_FAIL_LINES lines
 */
static void
cc_fail(cc_kind kind, const char *fmt,...)
{
	va_list		ap;

	cc_fail_count[kind]++;
	if (cc_fail_lines[kind]++ >= CC_MAX_FAIL_LINES)
		return;
	fputs("FAIL: ", stdout);
	va_start(ap, fmt);
	vfprintf(stdout, fmt, ap);
	va_end(ap);
	fputc('\n', stdout);
}

static uint64_t
cc_hash(int64_t a, int64_t b)
{
	uint64_t	h = (uint64_t) a * 0x9E3779B97F4A7C15ULL ^ (uint64_t) b * 0xC2B2AE3D27D4EB4FULL;

	h ^= h >> 31;
	h *= 0x94D049BB133111EBULL;
	h ^= h >> 29;
	return h;
}

/* cc_map_find - the slot of (a, b), or the empty slot where it would go */
static cc_slot *
cc_map_find(cc_map *m, int64_t a, int64_t b)
{
	size_t		i = (size_t) cc_hash(a, b) & (m->cap - 1);

	for (;;)
	{
		cc_slot    *s = &m->slots[i];

		if (s->idx == 0 || (s->a == a && s->b == b))
			return s;
		i = (i + 1) & (m->cap - 1);
	}
}

static void
cc_map_init(cc_map *m)
{
	m->cap = 1024;
	m->count = 0;
	m->slots = cc_xrealloc(NULL, m->cap * sizeof(cc_slot));
	memset(m->slots, 0, m->cap * sizeof(cc_slot));
}

/* cc_map_get - index stored for (a, b), or -1 */
static long
cc_map_get(cc_map *m, int64_t a, int64_t b)
{
	cc_slot    *s = cc_map_find(m, a, b);

	return s->idx == 0 ? -1 : (long) (s->idx - 1);
}

/* cc_map_put - store idx for a key that is not in the map yet */
static void
cc_map_put(cc_map *m, int64_t a, int64_t b, size_t idx)
{
	cc_slot    *s;

	if ((m->count + 1) * 2 > m->cap)
	{
		cc_slot    *old = m->slots;
		size_t		oldcap = m->cap;

		m->cap *= 2;
		m->slots = cc_xrealloc(NULL, m->cap * sizeof(cc_slot));
		memset(m->slots, 0, m->cap * sizeof(cc_slot));
		for (size_t i = 0; i < oldcap; i++)
			if (old[i].idx != 0)
				*cc_map_find(m, old[i].a, old[i].b) = old[i];
		free(old);
	}
	s = cc_map_find(m, a, b);
	s->a = a;
	s->b = b;
	s->idx = idx + 1;
	m->count++;
}

/* ---------------------------------------------------------------------
 * Minimal JSON reading: the top-level members of one object.  Strings are
 * decoded for member names and "type"; everything else is skipped with a
 * syntax check.
 * --------------------------------------------------------------------- */

typedef struct
{
	const char *p;
	const char *end;
} cc_json;

static void
cc_json_ws(cc_json *j)
{
	while (j->p < j->end && (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r'))
		j->p++;
}

/*
 * cc_json_string - read a string at j->p into out (truncated to outsz - 1
 * bytes, NUL-terminated; out may be NULL to skip).  \uXXXX escapes become
 * UTF-8 (surrogates as-is).  Returns false on a syntax error.
 */
static bool
cc_json_string(cc_json *j, char *out, size_t outsz)
{
	size_t		n = 0;

#define CC_PUT(c) do { if (out && n + 1 < outsz) out[n++] = (char) (c); } while (0)

	if (j->p >= j->end || *j->p != '"')
		return false;
	j->p++;
	while (j->p < j->end && *j->p != '"')
	{
		unsigned char c = (unsigned char) *j->p++;

		if (c < 0x20)
			return false;
		if (c != '\\')
		{
			CC_PUT(c);
			continue;
		}
		if (j->p >= j->end)
			return false;
		c = (unsigned char) *j->p++;
		switch (c)
		{
			case '"':
			case '\\':
			case '/':
				CC_PUT(c);
				break;
			case 'b':
				CC_PUT('\b');
				break;
			case 'f':
				CC_PUT('\f');
				break;
			case 'n':
				CC_PUT('\n');
				break;
			case 'r':
				CC_PUT('\r');
				break;
			case 't':
				CC_PUT('\t');
				break;
			case 'u':
				{
					unsigned	cp = 0;

					for (int k = 0; k < 4; k++)
					{
						char		h;

						if (j->p >= j->end)
							return false;
						h = *j->p++;
						cp <<= 4;
						if (h >= '0' && h <= '9')
							cp |= (unsigned) (h - '0');
						else if (h >= 'a' && h <= 'f')
							cp |= (unsigned) (h - 'a' + 10);
						else if (h >= 'A' && h <= 'F')
							cp |= (unsigned) (h - 'A' + 10);
						else
							return false;
					}
					if (cp < 0x80)
						CC_PUT(cp);
					else if (cp < 0x800)
					{
						CC_PUT(0xC0 | (cp >> 6));
						CC_PUT(0x80 | (cp & 0x3F));
					}
					else
					{
						CC_PUT(0xE0 | (cp >> 12));
						CC_PUT(0x80 | ((cp >> 6) & 0x3F));
						CC_PUT(0x80 | (cp & 0x3F));
					}
					break;
				}
			default:
				return false;
		}
	}
#undef CC_PUT
	if (j->p >= j->end)
		return false;
	j->p++;						/* closing quote */
	if (out && outsz > 0)
		out[n] = '\0';
	return true;
}

/*
 * cc_json_number - read a JSON number; *is_int tells whether it is a plain
 * integer that fits int64 (then in *val)
 */
static bool
cc_json_number(cc_json *j, int64_t *val, bool *is_int)
{
	const char *start = j->p;
	char		buf[64];
	char	   *endp;
	size_t		len;

	*is_int = true;
	if (j->p < j->end && *j->p == '-')
		j->p++;
	if (j->p >= j->end || *j->p < '0' || *j->p > '9')
		return false;
	while (j->p < j->end && *j->p >= '0' && *j->p <= '9')
		j->p++;
	if (j->p < j->end && *j->p == '.')
	{
		*is_int = false;
		j->p++;
		if (j->p >= j->end || *j->p < '0' || *j->p > '9')
			return false;
		while (j->p < j->end && *j->p >= '0' && *j->p <= '9')
			j->p++;
	}
	if (j->p < j->end && (*j->p == 'e' || *j->p == 'E'))
	{
		*is_int = false;
		j->p++;
		if (j->p < j->end && (*j->p == '+' || *j->p == '-'))
			j->p++;
		if (j->p >= j->end || *j->p < '0' || *j->p > '9')
			return false;
		while (j->p < j->end && *j->p >= '0' && *j->p <= '9')
			j->p++;
	}
	if (!*is_int)
		return true;
	len = (size_t) (j->p - start);
	if (len >= sizeof(buf))
	{
		*is_int = false;
		return true;
	}
	memcpy(buf, start, len);
	buf[len] = '\0';
	errno = 0;
	*val = strtoll(buf, &endp, 10);
	if (errno != 0)
		*is_int = false;
	return true;
}

/* cc_json_literal - read the literal word at j->p */
static bool
cc_json_literal(cc_json *j, const char *word)
{
	size_t		len = strlen(word);

	if ((size_t) (j->end - j->p) < len || memcmp(j->p, word, len) != 0)
		return false;
	j->p += len;
	return true;
}

/* cc_json_skip - skip any JSON value, checking its syntax */
static bool
cc_json_skip(cc_json *j, int depth)
{
	int64_t		v;
	bool		is_int;

	if (depth > CC_JSON_DEPTH)
		return false;
	cc_json_ws(j);
	if (j->p >= j->end)
		return false;
	switch (*j->p)
	{
		case '"':
			return cc_json_string(j, NULL, 0);
		case 't':
			return cc_json_literal(j, "true");
		case 'f':
			return cc_json_literal(j, "false");
		case 'n':
			return cc_json_literal(j, "null");
		case '{':
		case '[':
			{
				char		close = *j->p == '{' ? '}' : ']';
				bool		object = close == '}';

				j->p++;
				cc_json_ws(j);
				if (j->p < j->end && *j->p == close)
				{
					j->p++;
					return true;
				}
				for (;;)
				{
					if (object)
					{
						cc_json_ws(j);
						if (!cc_json_string(j, NULL, 0))
							return false;
						cc_json_ws(j);
						if (j->p >= j->end || *j->p != ':')
							return false;
						j->p++;
					}
					if (!cc_json_skip(j, depth + 1))
						return false;
					cc_json_ws(j);
					if (j->p >= j->end)
						return false;
					if (*j->p == close)
					{
						j->p++;
						return true;
					}
					if (*j->p != ',')
						return false;
					j->p++;
				}
			}
		default:
			return cc_json_number(j, &v, &is_int);
	}
}

/*
 * cc_parse_value - read the fields we check from a message value.  Returns
 * NULL, or the reason the value is not usable.
 */
static const char *
cc_parse_value(const char *buf, size_t len, cc_fields *f)
{
	static const struct
	{
		const char *name;
		unsigned	bit;
		size_t		off;
	}			ints[] = {
		{"event_id", CC_F_EVENT_ID, offsetof(cc_fields, event_id)},
		{"user_id", CC_F_USER_ID, offsetof(cc_fields, user_id)},
		{"user_seq", CC_F_USER_SEQ, offsetof(cc_fields, user_seq)},
		{"tx_id", CC_F_TX_ID, offsetof(cc_fields, tx_id)},
	};
	cc_json		j = {buf, buf + len};

	memset(f, 0, sizeof(*f));
	if (buf == NULL)
		return "no value";
	cc_json_ws(&j);
	if (j.p >= j.end || *j.p != '{')
		return "value is not a JSON object";
	j.p++;
	cc_json_ws(&j);
	if (j.p < j.end && *j.p == '}')
		j.p++;
	else
		for (;;)
		{
			char		name[64];
			bool		done = false;

			cc_json_ws(&j);
			if (!cc_json_string(&j, name, sizeof(name)))
				return "bad JSON: member name expected";
			cc_json_ws(&j);
			if (j.p >= j.end || *j.p != ':')
				return "bad JSON: ':' expected";
			j.p++;
			cc_json_ws(&j);

			for (size_t k = 0; k < sizeof(ints) / sizeof(ints[0]); k++)
			{
				int64_t		v;
				bool		is_int;

				if (strcmp(name, ints[k].name) != 0)
					continue;
				if (!cc_json_number(&j, &v, &is_int) || !is_int)
					return "a field of event_id, user_id, user_seq, tx_id is not an integer";
				*(int64_t *) ((char *) f + ints[k].off) = v;
				f->have |= ints[k].bit;
				done = true;
			}
			if (!done && strcmp(name, "type") == 0)
			{
				if (!cc_json_string(&j, f->type, sizeof(f->type)))
					return "field type is not a string";
				f->have |= CC_F_TYPE;
				done = true;
			}
			if (!done && !cc_json_skip(&j, 1))
				return "bad JSON";
			cc_json_ws(&j);
			if (j.p >= j.end)
				return "bad JSON: unterminated object";
			if (*j.p == '}')
			{
				j.p++;
				break;
			}
			if (*j.p != ',')
				return "bad JSON: ',' or '}' expected";
			j.p++;
		}
	cc_json_ws(&j);
	if (j.p != j.end)
		return "bad JSON: text after the object";
	if ((f->have & CC_F_ALL) != CC_F_ALL)
		return "one of event_id, type, user_id, user_seq, tx_id is missing";
	return NULL;
}

/* ---------------------------------------------------------------------
 * Expected file
 * --------------------------------------------------------------------- */

static int
cc_expected_cmp(const void *a, const void *b)
{
	const cc_expected *x = a,
			   *y = b;

	if (x->user_id != y->user_id)
		return x->user_id < y->user_id ? -1 : 1;
	if (x->user_seq != y->user_seq)
		return x->user_seq < y->user_seq ? -1 : 1;
	return 0;
}

/*
 * cc_read_expected - load and sort FILE; repeated (user_id, user_seq) are
 * format errors and only the first one is kept
 */
static cc_expected *
cc_read_expected(const char *path, size_t *count)
{
	FILE	   *f = fopen(path, "r");
	cc_expected *rows = NULL;
	size_t		n = 0,
				cap = 0,
				kept = 0;
	char		line[1024];
	long		lineno = 0;

	if (f == NULL)
	{
		fprintf(stderr, "consume_check: cannot open %s: %s\n", path, strerror(errno));
		exit(2);
	}
	while (fgets(line, sizeof(line), f) != NULL)
	{
		cc_expected r = {0};
		char		extra;

		lineno++;
		if (line[strspn(line, " \t\r\n")] == '\0')
			continue;
		if (sscanf(line, "%" SCNd64 " %" SCNd64 " %" SCNd64 " %c",
				   &r.user_id, &r.user_seq, &r.tx_id, &extra) != 3)
		{
			cc_fail(CC_FORMAT, "%s line %ld: expected user_id<TAB>user_seq<TAB>tx_id",
					path, lineno);
			continue;
		}
		if (n == cap)
		{
			cap = cap ? cap * 2 : 1024;
			rows = cc_xrealloc(rows, cap * sizeof(*rows));
		}
		rows[n++] = r;
	}
	fclose(f);

	if (n > 0)
		qsort(rows, n, sizeof(*rows), cc_expected_cmp);
	for (size_t i = 0; i < n; i++)
	{
		if (kept > 0 && cc_expected_cmp(&rows[kept - 1], &rows[i]) == 0)
		{
			cc_fail(CC_FORMAT, "%s lists user %" PRId64 " seq %" PRId64 " twice",
					path, rows[i].user_id, rows[i].user_seq);
			continue;
		}
		rows[kept++] = rows[i];
	}
	*count = kept;
	return rows;
}

/* cc_expected_find - index of (user_id, user_seq) in the sorted rows, or -1 */
static long
cc_expected_find(const cc_expected *rows, size_t n, int64_t user_id, int64_t user_seq)
{
	cc_expected key = {.user_id = user_id,.user_seq = user_seq};
	const cc_expected *hit = bsearch(&key, rows, n, sizeof(*rows), cc_expected_cmp);

	return hit ? (long) (hit - rows) : -1;
}

/* cc_expected_lower - first index whose user_id >= user_id */
static size_t
cc_expected_lower(const cc_expected *rows, size_t n, int64_t user_id)
{
	size_t		lo = 0,
				hi = n;

	while (lo < hi)
	{
		size_t		mid = lo + (hi - lo) / 2;

		if (rows[mid].user_id < user_id)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo;
}

/* ---------------------------------------------------------------------
 * Consuming
 * --------------------------------------------------------------------- */

static long
cc_now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (long) ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void
cc_usage(void)
{
	fprintf(stderr,
			"usage: consume_check --bootstrap B --topic T --expect FILE "
			"[--timeout-ms MS] [--max-ms MS] [--out FILE]\n");
	exit(2);
}

static void
cc_conf_set(rd_kafka_conf_t *conf, const char *name, const char *value)
{
	char		errstr[512];

	if (rd_kafka_conf_set(conf, name, value, errstr, sizeof(errstr)) != RD_KAFKA_CONF_OK)
	{
		fprintf(stderr, "consume_check: %s\n", errstr);
		exit(2);
	}
}

/* cc_out_field - write key or value for --out, tabs and newlines as blanks */
static void
cc_out_field(FILE *out, const void *p, size_t len)
{
	const char *s = p;

	for (size_t i = 0; s != NULL && i < len; i++)
		fputc(s[i] == '\t' || s[i] == '\n' || s[i] == '\r' ? ' ' : s[i], out);
}

/*
 * cc_header_equals - whether header name is present with exactly text
 */
static bool
cc_header_equals(rd_kafka_headers_t *hdrs, const char *name, const char *text,
				 bool *present)
{
	const void *val;
	size_t		size;

	*present = hdrs != NULL &&
		rd_kafka_header_get_last(hdrs, name, &val, &size) == RD_KAFKA_RESP_ERR_NO_ERROR &&
		val != NULL;
	return *present && size == strlen(text) && memcmp(val, text, size) == 0;
}

/*
 * cc_topic_partitions - partition count of topic from metadata, retried
 * until deadline; 0 if it could not be found.  Metadata of all topics is
 * asked for: a request naming the topic makes the mock cluster (and brokers
 * with auto.create.topics.enable) create it, hiding a wrong topic name.
 */
static int
cc_topic_partitions(rd_kafka_t *rk, const char *topic, long deadline)
{
	int			cnt = 0;

	for (;;)
	{
		const struct rd_kafka_metadata *md;
		rd_kafka_resp_err_t err = rd_kafka_metadata(rk, 1, NULL, &md, 2000);
		const char *why = rd_kafka_err2str(err);

		if (err == RD_KAFKA_RESP_ERR_NO_ERROR)
		{
			why = "topic not in metadata";
			for (int t = 0; t < md->topic_cnt; t++)
			{
				if (strcmp(md->topics[t].topic, topic) != 0)
					continue;
				if (md->topics[t].err != RD_KAFKA_RESP_ERR_NO_ERROR)
					why = rd_kafka_err2str(md->topics[t].err);
				else if ((cnt = md->topics[t].partition_cnt) == 0)
					why = "no partitions";
			}
			rd_kafka_metadata_destroy(md);
		}
		if (cnt > 0 || cc_now_ms() >= deadline)
			break;
		fprintf(stderr, "consume_check: metadata for %s: %s, retrying\n", topic, why);
		rd_kafka_poll(rk, 500);
	}
	return cnt;
}

/*
 * cc_check_message - check one consumed message and record its event
 */
static void
cc_check_message(const rd_kafka_message_t *m)
{
	cc_fields	f;
	const char *why;
	char		keytext[32],
				idtext[32];
	int32_t		part = m->partition;
	int64_t		off = m->offset;
	rd_kafka_headers_t *hdrs = NULL;
	bool		present;
	long		ei,
				ui,
				xi;
	cc_user    *u;

	cc_consumed++;
	if (cc_out)
	{
		fprintf(cc_out, "%" PRId32 "\t%" PRId64 "\t", part, off);
		cc_out_field(cc_out, m->key, m->key_len);
		fputc('\t', cc_out);
		cc_out_field(cc_out, m->payload, m->len);
		fputc('\n', cc_out);
	}

	why = cc_parse_value(m->payload, m->len, &f);
	if (why != NULL)
	{
		cc_fail(CC_FORMAT, "partition %" PRId32 " offset %" PRId64 ": %s",
				part, off, why);
		return;
	}

	/* key and headers against the value */
	snprintf(keytext, sizeof(keytext), "%" PRId64, f.user_id);
	if (m->key == NULL || m->key_len != strlen(keytext) ||
		memcmp(m->key, keytext, m->key_len) != 0)
		cc_fail(CC_FORMAT, "partition %" PRId32 " offset %" PRId64
				": key '%.*s' is not user_id %s", part, off,
				m->key ? (int) m->key_len : 6, m->key ? (const char *) m->key : "(null)",
				keytext);
	(void) rd_kafka_message_headers(m, &hdrs);
	snprintf(idtext, sizeof(idtext), "%" PRId64, f.event_id);
	if (!cc_header_equals(hdrs, "event_id", idtext, &present))
		cc_fail(CC_FORMAT, "partition %" PRId32 " offset %" PRId64
				": header event_id %s (event_id %s)", part, off,
				present ? "differs" : "missing", idtext);
	if (!cc_header_equals(hdrs, "event_type", f.type, &present))
		cc_fail(CC_FORMAT, "partition %" PRId32 " offset %" PRId64
				": header event_type %s (type %s)", part, off,
				present ? "differs" : "missing", f.type);

	/* the user: one partition for all its events */
	ui = cc_map_get(&cc_user_map, f.user_id, 0);
	if (ui < 0)
	{
		size_t		lo = cc_expected_lower(cc_exp, cc_nexp, f.user_id);
		size_t		hi = lo;

		while (hi < cc_nexp && cc_exp[hi].user_id == f.user_id)
			hi++;
		if (cc_nusers == cc_capusers)
		{
			cc_capusers = cc_capusers ? cc_capusers * 2 : 1024;
			cc_users = cc_xrealloc(cc_users, cc_capusers * sizeof(*cc_users));
		}
		cc_users[cc_nusers] = (cc_user) {
			.user_id = f.user_id,.partition = part,
			.exp_lo = lo,.exp_hi = hi,.exp_next = lo
		};
		cc_map_put(&cc_user_map, f.user_id, 0, cc_nusers);
		ui = (long) cc_nusers++;
	}
	u = &cc_users[ui];
	if (u->partition != part)
		cc_fail(CC_ORDER, "user %" PRId64 " seq %" PRId64 " in partition %" PRId32
				" offset %" PRId64 ", its first event was in partition %" PRId32,
				f.user_id, f.user_seq, part, off, u->partition);

	/* a redelivery: must repeat its first delivery */
	ei = cc_map_get(&cc_event_map, f.user_id, f.user_seq);
	if (ei >= 0)
	{
		cc_event   *e = &cc_events[ei];

		cc_redelivered++;
		if (e->tx_id != f.tx_id || e->event_id != f.event_id ||
			strcmp(e->type, f.type) != 0)
			cc_fail(CC_FORMAT, "user %" PRId64 " seq %" PRId64 " at partition %" PRId32
					" offset %" PRId64 " (tx %" PRId64 ", event %" PRId64 ", %s) differs "
					"from its first delivery at partition %" PRId32 " offset %" PRId64
					" (tx %" PRId64 ", event %" PRId64 ", %s)",
					f.user_id, f.user_seq, part, off, f.tx_id, f.event_id, f.type,
					e->partition, e->offset, e->tx_id, e->event_id, e->type);
		return;
	}

	/* a first delivery */
	if (cc_nevents == cc_capevents)
	{
		cc_capevents = cc_capevents ? cc_capevents * 2 : 4096;
		cc_events = cc_xrealloc(cc_events, cc_capevents * sizeof(*cc_events));
	}
	cc_events[cc_nevents] = (cc_event) {
		.user_id = f.user_id,.user_seq = f.user_seq,.tx_id = f.tx_id,
		.event_id = f.event_id,.partition = part,.offset = off
	};
	memcpy(cc_events[cc_nevents].type, f.type, sizeof(f.type));
	cc_map_put(&cc_event_map, f.user_id, f.user_seq, cc_nevents);
	cc_nevents++;

	xi = cc_expected_find(cc_exp, cc_nexp, f.user_id, f.user_seq);
	if (xi < 0 || cc_exp[xi].tx_id != f.tx_id)
	{
		if (xi < 0)
			cc_fail(CC_UNEXPECTED, "user %" PRId64 " seq %" PRId64 " tx %" PRId64
					" (partition %" PRId32 " offset %" PRId64 ") is not expected",
					f.user_id, f.user_seq, f.tx_id, part, off);
		else
			cc_fail(CC_UNEXPECTED, "user %" PRId64 " seq %" PRId64 " has tx %" PRId64
					" (partition %" PRId32 " offset %" PRId64 "), expected tx %" PRId64,
					f.user_id, f.user_seq, f.tx_id, part, off, cc_exp[xi].tx_id);
		return;
	}
	cc_exp[xi].delivered = true;
	cc_ndelivered++;

	/* first deliveries follow the user's sorted expected seqs */
	if ((size_t) xi == u->exp_next)
		u->exp_next++;
	else if ((size_t) xi > u->exp_next)
	{
		cc_fail(CC_ORDER, "user %" PRId64 ": seq %" PRId64 " first delivered "
				"(partition %" PRId32 " offset %" PRId64 ") before seq %" PRId64,
				f.user_id, f.user_seq, part, off, cc_exp[u->exp_next].user_seq);
		u->exp_next = (size_t) xi + 1;
	}
	else
		cc_fail(CC_ORDER, "user %" PRId64 ": seq %" PRId64 " first delivered "
				"(partition %" PRId32 " offset %" PRId64 ") after seq %" PRId64,
				f.user_id, f.user_seq, part, off, cc_exp[u->exp_next - 1].user_seq);
}

int
main(int argc, char **argv)
{
	const char *bootstrap = NULL,
			   *topic = NULL,
			   *expect_path = NULL,
			   *out_path = NULL;
	long		timeout_ms = 10000,
				max_ms = 600000;
	rd_kafka_conf_t *conf;
	rd_kafka_t *rk;
	rd_kafka_topic_partition_list_t *parts;
	char		errstr[512];
	int			npart;
	bool	   *at_eof;
	long		start,
				last_progress;
	const char *stop_reason;
	bool		failed;

	for (int i = 1; i < argc; i++)
	{
		const char *val = i + 1 < argc ? argv[i + 1] : NULL;

		if (val == NULL)
			cc_usage();
		if (strcmp(argv[i], "--bootstrap") == 0)
			bootstrap = val;
		else if (strcmp(argv[i], "--topic") == 0)
			topic = val;
		else if (strcmp(argv[i], "--expect") == 0)
			expect_path = val;
		else if (strcmp(argv[i], "--out") == 0)
			out_path = val;
		else if (strcmp(argv[i], "--timeout-ms") == 0)
			timeout_ms = atol(val);
		else if (strcmp(argv[i], "--max-ms") == 0)
			max_ms = atol(val);
		else
			cc_usage();
		i++;
	}
	if (bootstrap == NULL || topic == NULL || expect_path == NULL ||
		timeout_ms <= 0 || max_ms <= 0)
		cc_usage();

	cc_exp = cc_read_expected(expect_path, &cc_nexp);
	if (out_path != NULL && (cc_out = fopen(out_path, "w")) == NULL)
	{
		fprintf(stderr, "consume_check: cannot open %s: %s\n", out_path, strerror(errno));
		return 2;
	}
	cc_map_init(&cc_event_map);
	cc_map_init(&cc_user_map);

	conf = rd_kafka_conf_new();
	cc_conf_set(conf, "bootstrap.servers", bootstrap);
	cc_conf_set(conf, "group.id", "consume_check");
	cc_conf_set(conf, "enable.auto.commit", "false");
	cc_conf_set(conf, "enable.auto.offset.store", "false");
	cc_conf_set(conf, "enable.partition.eof", "true");
	cc_conf_set(conf, "auto.offset.reset", "earliest");
	rk = rd_kafka_new(RD_KAFKA_CONSUMER, conf, errstr, sizeof(errstr));
	if (rk == NULL)
	{
		fprintf(stderr, "consume_check: rd_kafka_new: %s\n", errstr);
		return 2;
	}
	rd_kafka_poll_set_consumer(rk);

	start = cc_now_ms();
	npart = cc_topic_partitions(rk, topic, start + timeout_ms);
	if (npart <= 0)
	{
		cc_fail(CC_OTHER, "topic %s not found within %ld ms", topic, timeout_ms);
		npart = 0;
	}
	fprintf(stderr, "consume_check: topic %s, %d partitions, %zu expected events\n",
			topic, npart, cc_nexp);

	parts = rd_kafka_topic_partition_list_new(npart > 0 ? npart : 1);
	for (int p = 0; p < npart; p++)
		rd_kafka_topic_partition_list_add(parts, topic, p)->offset = RD_KAFKA_OFFSET_BEGINNING;
	if (npart > 0 && rd_kafka_assign(rk, parts) != RD_KAFKA_RESP_ERR_NO_ERROR)
	{
		cc_fail(CC_OTHER, "cannot assign the partitions of %s", topic);
		npart = 0;
	}
	rd_kafka_topic_partition_list_destroy(parts);
	at_eof = cc_xrealloc(NULL, (size_t) (npart > 0 ? npart : 1) * sizeof(bool));
	memset(at_eof, 0, (size_t) (npart > 0 ? npart : 1) * sizeof(bool));

	last_progress = cc_now_ms();
	stop_reason = npart == 0 ? "no partitions" : NULL;
	while (stop_reason == NULL)
	{
		rd_kafka_message_t *m = rd_kafka_consumer_poll(rk, 200);
		long		now = cc_now_ms();
		bool		all_eof = true;

		for (int p = 0; p < npart; p++)
			all_eof = all_eof && at_eof[p];
		if (cc_ndelivered == cc_nexp && all_eof)
			stop_reason = "every expected event seen, every partition at its end";
		else if (now - last_progress >= timeout_ms)
			stop_reason = "nothing new within --timeout-ms";
		else if (now - start >= max_ms)
			stop_reason = "--max-ms reached";

		if (m == NULL)
			continue;
		if (m->err == RD_KAFKA_RESP_ERR__PARTITION_EOF)
		{
			if (m->partition >= 0 && m->partition < npart && !at_eof[m->partition])
			{
				at_eof[m->partition] = true;
				last_progress = now;
			}
			rd_kafka_message_destroy(m);
			continue;
		}
		if (m->err)
		{
			/* transient (broker down...): the idle timeout bounds it */
			fprintf(stderr, "consume_check: consumer: %s\n", rd_kafka_message_errstr(m));
			rd_kafka_message_destroy(m);
			continue;
		}

		/* a message */
		last_progress = now;
		if (m->partition >= 0 && m->partition < npart)
			at_eof[m->partition] = false;
		cc_check_message(m);
		rd_kafka_message_destroy(m);
	}
	fprintf(stderr, "consume_check: stopped after %ld ms: %s\n",
			cc_now_ms() - start, stop_reason);

	for (size_t i = 0; i < cc_nexp; i++)
		if (!cc_exp[i].delivered)
			cc_fail(CC_MISSING, "user %" PRId64 " seq %" PRId64 " tx %" PRId64
					" was never delivered", cc_exp[i].user_id, cc_exp[i].user_seq, cc_exp[i].tx_id);

	for (int k = 0; k < CC_NKINDS; k++)
		if (cc_fail_lines[k] > CC_MAX_FAIL_LINES)
			printf("FAIL: ... and %ld more %s failures not shown\n",
				   cc_fail_lines[k] - CC_MAX_FAIL_LINES, cc_kind_names[k]);

	printf("consumed=%ld distinct=%zu redelivered=%ld missing=%ld unexpected=%ld "
		   "order_errors=%ld format_errors=%ld\n",
		   cc_consumed, cc_nevents, cc_redelivered, cc_fail_count[CC_MISSING],
		   cc_fail_count[CC_UNEXPECTED], cc_fail_count[CC_ORDER],
		   cc_fail_count[CC_FORMAT]);

	failed = false;
	for (int k = 0; k < CC_NKINDS; k++)
		failed = failed || cc_fail_count[k] > 0;

	rd_kafka_consumer_close(rk);
	rd_kafka_destroy(rk);
	if (cc_out)
		fclose(cc_out);
	free(at_eof);
	free(cc_events);
	free(cc_users);
	free(cc_exp);
	free(cc_event_map.slots);
	free(cc_user_map.slots);
	return failed ? 1 : 0;
}
