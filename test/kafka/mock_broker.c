/*
 * mock_broker.c - a librdkafka mock cluster as a long-lived test broker
 *
 * This file owns the Kafka broker used by the tests and the demo.  It runs
 * librdkafka's in-process mock cluster (<librdkafka/rdkafka_mock.h>) in a
 * process of its own, so that the broker, and the messages it holds in
 * memory, outlive every PostgreSQL restart of a test.
 *
 *   mock_broker --brokers N --topic T --partitions P --bootstrap-file FILE
 *               [--control FIFO_OR_FILE]
 *
 * Start-up: create the cluster (broker ids 1..N), create topic T with P
 * partitions, open the control channel, and only then write the cluster's
 * bootstrap servers to FILE, atomically (FILE.tmp.PID + rename): once FILE
 * exists the broker serves and accepts commands.  It serves until SIGTERM or
 * SIGINT (or the command "quit"), then removes FILE.
 *
 * Control channel: newline-separated commands read from FIFO_OR_FILE.  A path
 * that does not exist is created as a FIFO.  A FIFO is kept open for writing
 * by this process as well, so writers come and go without an EOF; should an
 * EOF happen all the same it is reopened.  A regular file is followed like
 * "tail -f".  Commands ("all" means every broker, ID is 1..N):
 *
 *   down ID|all                 rd_kafka_mock_broker_set_down
 *   up ID|all                   rd_kafka_mock_broker_set_up
 *   produce_errors N ERRCODE    rd_kafka_mock_push_request_errors(Produce),
 *                               N times the numeric Kafka error code
 *                               (6 NOT_LEADER_FOR_PARTITION, 7 REQUEST_TIMED_OUT)
 *   clear_errors                rd_kafka_mock_clear_request_errors(Produce)
 *   leader PARTITION BROKER_ID  rd_kafka_mock_partition_set_leader (of T;
 *                               BROKER_ID -1 leaves it without a leader)
 *   rtt ID|all MS               rd_kafka_mock_broker_set_rtt
 *   topic NAME PARTITIONS       rd_kafka_mock_topic_create (another topic)
 *   quit                        stop serving
 *
 * Blank lines and lines starting with '#' are ignored.  After each command a
 * line "ok <command>" or "error <command>: <why>" is appended to
 * FIFO_OR_FILE.ack (truncated at start-up), so that a script can wait for it
 * (see brokerctl.sh).  Log lines go to stderr.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>

/* Kafka protocol API key of ProduceRequest (rdkafka_protocol.h is not installed) */
#define MB_APIKEY_PRODUCE	0

/* longest command line accepted; longer lines are discarded with an error */
#define MB_LINE_MAX		1024

/* how long one wait for a command lasts before signals are checked again */
#define MB_POLL_MS		500

/* most errors one produce_errors command may push */
#define MB_MAX_ERRORS	100000

static volatile sig_atomic_t mb_stop = 0;

static rd_kafka_mock_cluster_t *mb_cluster;
static const char *mb_topic;
static int	mb_brokers;
static char *mb_ack_path;

/* control channel state */
static const char *mb_control_path;
static int	mb_control_fd = -1;
static int	mb_control_keep_fd = -1;	/* our own writer end of the FIFO */
static int	mb_control_is_fifo;
static char mb_line[MB_LINE_MAX + 1];
static size_t mb_line_len;
static int	mb_line_overflow;

/*
 * mb_log - one timestamped line on stderr
 */
static void
mb_log(const char *fmt,...)
{
	va_list		ap;
	struct timespec ts;
	struct tm	tm;
	char		stamp[32];

	clock_gettime(CLOCK_REALTIME, &ts);
	localtime_r(&ts.tv_sec, &tm);
	strftime(stamp, sizeof(stamp), "%H:%M:%S", &tm);
	fprintf(stderr, "mock_broker[%d] %s.%03ld: ", (int) getpid(), stamp,
			ts.tv_nsec / 1000000);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
}

static void
mb_usage(void)
{
	fprintf(stderr,
			"usage: mock_broker --brokers N --topic T --partitions P "
			"--bootstrap-file FILE [--control FIFO_OR_FILE]\n");
	exit(2);
}

static void
mb_on_signal(int signo)
{
	(void) signo;
	mb_stop = 1;
}

/*
 * mb_parse_int - parse a whole decimal integer within [lo, hi]
 *
 * Returns 0 on success, -1 when s is not such a number.
 */
static int
mb_parse_int(const char *s, long lo, long hi, long *out)
{
	char	   *end;
	long		v;

	if (s == NULL || *s == '\0')
		return -1;
	errno = 0;
	v = strtol(s, &end, 10);
	if (errno != 0 || *end != '\0' || v < lo || v > hi)
		return -1;
	*out = v;
	return 0;
}

/*
 * mb_write_file_atomic - write text + '\n' to path through a temporary file
 * and rename(), so that a reader never sees a partial file
 */
static int
mb_write_file_atomic(const char *path, const char *text)
{
	char		tmp[PATH_MAX];
	FILE	   *f;

	if (snprintf(tmp, sizeof(tmp), "%s.tmp.%d", path, (int) getpid()) >= (int) sizeof(tmp))
		return -1;
	f = fopen(tmp, "w");
	if (f == NULL)
		return -1;
	if (fprintf(f, "%s\n", text) < 0 || fflush(f) != 0 || fsync(fileno(f)) != 0)
	{
		fclose(f);
		unlink(tmp);
		return -1;
	}
	if (fclose(f) != 0 || rename(tmp, path) != 0)
	{
		unlink(tmp);
		return -1;
	}
	return 0;
}

/*
 * mb_ack - append one acknowledgement line to the ack file
 *
 * The line is written with a single write() on an O_APPEND descriptor, so a
 * reader sees it whole.
 */
static void
mb_ack(const char *fmt,...)
{
	char		buf[MB_LINE_MAX + 256];
	va_list		ap;
	int			len;
	int			fd;

	va_start(ap, fmt);
	len = vsnprintf(buf, sizeof(buf) - 1, fmt, ap);
	va_end(ap);
	if (len < 0)
		return;
	if (len > (int) sizeof(buf) - 2)
		len = (int) sizeof(buf) - 2;
	buf[len++] = '\n';

	mb_log("%.*s", len - 1, buf);
	if (mb_ack_path == NULL)
		return;
	fd = open(mb_ack_path, O_WRONLY | O_CREAT | O_APPEND, 0644);
	if (fd < 0)
	{
		mb_log("cannot open %s: %s", mb_ack_path, strerror(errno));
		return;
	}
	if (write(fd, buf, (size_t) len) != len)
		mb_log("cannot write %s: %s", mb_ack_path, strerror(errno));
	close(fd);
}

/*
 * mb_broker_arg - parse "all" (returns -1 in *id) or a broker id 1..N
 */
static int
mb_broker_arg(const char *s, int32_t *id)
{
	long		v;

	if (s != NULL && strcmp(s, "all") == 0)
	{
		*id = -1;
		return 0;
	}
	if (mb_parse_int(s, 1, mb_brokers, &v) != 0)
		return -1;
	*id = (int32_t) v;
	return 0;
}

/*
 * mb_each_broker - apply a set_down/set_up style call to one broker or, for
 * id -1, to each broker in turn (so "all" does not depend on the mock
 * accepting -1)
 */
static rd_kafka_resp_err_t
mb_each_broker(rd_kafka_resp_err_t (*fn) (rd_kafka_mock_cluster_t *, int32_t),
			   int32_t id)
{
	rd_kafka_resp_err_t err;

	if (id != -1)
		return fn(mb_cluster, id);
	for (int32_t b = 1; b <= mb_brokers; b++)
		if ((err = fn(mb_cluster, b)) != RD_KAFKA_RESP_ERR_NO_ERROR)
			return err;
	return RD_KAFKA_RESP_ERR_NO_ERROR;
}

/*
 * mb_command - run one command line; returns an error text, or NULL on
 * success.  Sets mb_stop for "quit".
 */
static const char *
mb_command(char *line)
{
	static char why[256];
	char	   *argv[4];
	int			argc = 0;
	char	   *save = NULL;
	char	   *tok;
	rd_kafka_resp_err_t err = RD_KAFKA_RESP_ERR_NO_ERROR;
	int32_t		id;
	long		a,
				b;

	for (tok = strtok_r(line, " \t", &save); tok != NULL;
		 tok = strtok_r(NULL, " \t", &save))
	{
		if (argc == 4)
			return "too many arguments";
		argv[argc++] = tok;
	}
	if (argc == 0)
		return "empty command";

	if ((strcmp(argv[0], "down") == 0 || strcmp(argv[0], "up") == 0) && argc == 2)
	{
		if (mb_broker_arg(argv[1], &id) != 0)
			return "broker must be 'all' or an id from 1 to the number of brokers";
		err = mb_each_broker(argv[0][0] == 'd' ? rd_kafka_mock_broker_set_down
							 : rd_kafka_mock_broker_set_up, id);
	}
	else if (strcmp(argv[0], "produce_errors") == 0 && argc == 3)
	{
		rd_kafka_resp_err_t *errs;

		if (mb_parse_int(argv[1], 1, MB_MAX_ERRORS, &a) != 0)
			return "count must be an integer from 1 to 100000";
		if (mb_parse_int(argv[2], INT_MIN, INT_MAX, &b) != 0)
			return "error code must be an integer";
		errs = malloc(sizeof(*errs) * (size_t) a);
		if (errs == NULL)
			return "out of memory";
		for (long i = 0; i < a; i++)
			errs[i] = (rd_kafka_resp_err_t) b;
		rd_kafka_mock_push_request_errors_array(mb_cluster, MB_APIKEY_PRODUCE,
												(size_t) a, errs);
		free(errs);
	}
	else if (strcmp(argv[0], "clear_errors") == 0 && argc == 1)
		rd_kafka_mock_clear_request_errors(mb_cluster, MB_APIKEY_PRODUCE);
	else if (strcmp(argv[0], "leader") == 0 && argc == 3)
	{
		if (mb_parse_int(argv[1], 0, INT32_MAX, &a) != 0)
			return "partition must be a non-negative integer";
		if (mb_parse_int(argv[2], -1, mb_brokers, &b) != 0 || b == 0)
			return "broker must be -1 or an id from 1 to the number of brokers";
		err = rd_kafka_mock_partition_set_leader(mb_cluster, mb_topic,
												 (int32_t) a, (int32_t) b);
	}
	else if (strcmp(argv[0], "rtt") == 0 && argc == 3)
	{
		if (mb_broker_arg(argv[1], &id) != 0)
			return "broker must be 'all' or an id from 1 to the number of brokers";
		if (mb_parse_int(argv[2], 0, 3600000, &a) != 0)
			return "rtt must be milliseconds from 0 to 3600000";
		if (id == -1)
		{
			for (int32_t br = 1; br <= mb_brokers && !err; br++)
				err = rd_kafka_mock_broker_set_rtt(mb_cluster, br, (int) a);
		}
		else
			err = rd_kafka_mock_broker_set_rtt(mb_cluster, id, (int) a);
	}
	else if (strcmp(argv[0], "topic") == 0 && argc == 3)
	{
		if (mb_parse_int(argv[2], 1, 100000, &a) != 0)
			return "partitions must be an integer from 1 to 100000";
		err = rd_kafka_mock_topic_create(mb_cluster, argv[1], (int) a,
										 mb_brokers < 3 ? mb_brokers : 3);
	}
	else if (strcmp(argv[0], "quit") == 0 && argc == 1)
		mb_stop = 1;
	else
		return "unknown command or wrong number of arguments";

	if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
	{
		snprintf(why, sizeof(why), "%s", rd_kafka_err2str(err));
		return why;
	}
	return NULL;
}

/*
 * mb_handle_line - trim one received line, run it and acknowledge it
 */
static void
mb_handle_line(char *line)
{
	char		copy[MB_LINE_MAX + 1];
	const char *why;
	size_t		len = strlen(line);

	while (len > 0 && (line[len - 1] == '\r' || line[len - 1] == ' ' ||
					   line[len - 1] == '\t'))
		line[--len] = '\0';
	while (*line == ' ' || *line == '\t')
		line++;
	if (*line == '\0' || *line == '#')
		return;

	snprintf(copy, sizeof(copy), "%s", line);
	why = mb_command(line);
	if (why == NULL)
		mb_ack("ok %s", copy);
	else
		mb_ack("error %s: %s", copy, why);
}

/*
 * mb_feed - split received bytes into lines and handle each complete one;
 * an over-long line is dropped (with an error ack) up to its newline
 */
static void
mb_feed(const char *buf, size_t n)
{
	for (size_t i = 0; i < n; i++)
	{
		if (buf[i] == '\n')
		{
			mb_line[mb_line_len] = '\0';
			if (mb_line_overflow)
				mb_ack("error line longer than %d bytes ignored", MB_LINE_MAX);
			else
				mb_handle_line(mb_line);
			mb_line_len = 0;
			mb_line_overflow = 0;
			if (mb_stop)
				return;
		}
		else if (mb_line_len < MB_LINE_MAX)
			mb_line[mb_line_len++] = buf[i];
		else
			mb_line_overflow = 1;
	}
}

/*
 * mb_control_open - create the FIFO if needed and open the control channel
 */
static int
mb_control_open(void)
{
	struct stat st;

	if (stat(mb_control_path, &st) != 0)
	{
		if (errno != ENOENT || mkfifo(mb_control_path, 0600) != 0 ||
			stat(mb_control_path, &st) != 0)
		{
			mb_log("cannot create FIFO %s: %s", mb_control_path, strerror(errno));
			return -1;
		}
	}
	mb_control_is_fifo = S_ISFIFO(st.st_mode);
	if (!mb_control_is_fifo && !S_ISREG(st.st_mode))
	{
		mb_log("%s is neither a FIFO nor a regular file", mb_control_path);
		return -1;
	}

	mb_control_fd = open(mb_control_path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
	if (mb_control_fd < 0)
	{
		mb_log("cannot open %s: %s", mb_control_path, strerror(errno));
		return -1;
	}
	if (mb_control_is_fifo)
	{
		/* hold a writer ourselves: no EOF, no POLLHUP when a writer leaves */
		if (mb_control_keep_fd < 0)
			mb_control_keep_fd = open(mb_control_path, O_WRONLY | O_NONBLOCK | O_CLOEXEC);
	}
	else
	{
		/* a regular file: only commands appended from now on count */
		if (lseek(mb_control_fd, 0, SEEK_END) < 0)
			mb_log("cannot seek %s: %s", mb_control_path, strerror(errno));
	}
	return 0;
}

/*
 * mb_control_wait - wait up to MB_POLL_MS for commands and run those that
 * arrived.  Without a control channel this only sleeps.
 */
static void
mb_control_wait(void)
{
	char		buf[4096];
	ssize_t		n;

	if (mb_control_fd < 0)
	{
		poll(NULL, 0, MB_POLL_MS);
		return;
	}

	if (mb_control_is_fifo)
	{
		struct pollfd pfd = {.fd = mb_control_fd,.events = POLLIN};
		int			rc = poll(&pfd, 1, MB_POLL_MS);

		if (rc <= 0)
			return;				/* timeout, or EINTR from a signal */
	}

	for (;;)
	{
		n = read(mb_control_fd, buf, sizeof(buf));
		if (n > 0)
		{
			mb_feed(buf, (size_t) n);
			if (mb_stop)
				return;
			continue;
		}
		if (n < 0 && errno == EINTR)
			return;
		if (n < 0 && errno != EAGAIN)
			mb_log("read %s: %s", mb_control_path, strerror(errno));
		break;
	}

	if (n == 0 && mb_control_is_fifo)
	{
		/* EOF: every writer left (should not happen while we hold one) */
		close(mb_control_fd);
		mb_control_fd = -1;
		if (mb_control_open() != 0)
			poll(NULL, 0, MB_POLL_MS);	/* retried on the next pass */
	}
	else if (!mb_control_is_fifo)
		poll(NULL, 0, MB_POLL_MS / 2);	/* regular file: poll() cannot wait */
}

int
main(int argc, char **argv)
{
	const char *bootstrap_file = NULL;
	long		brokers = 0,
				partitions = 0;
	char		errstr[512];
	rd_kafka_conf_t *conf;
	rd_kafka_t *rk;
	rd_kafka_resp_err_t err;
	struct sigaction sa;
	const char *bootstraps;

	for (int i = 1; i < argc; i++)
	{
		const char *opt = argv[i];
		const char *val = i + 1 < argc ? argv[i + 1] : NULL;

		if (val == NULL)
			mb_usage();
		if (strcmp(opt, "--brokers") == 0)
		{
			if (mb_parse_int(val, 1, 64, &brokers) != 0)
				mb_usage();
		}
		else if (strcmp(opt, "--partitions") == 0)
		{
			if (mb_parse_int(val, 1, 100000, &partitions) != 0)
				mb_usage();
		}
		else if (strcmp(opt, "--topic") == 0)
			mb_topic = val;
		else if (strcmp(opt, "--bootstrap-file") == 0)
			bootstrap_file = val;
		else if (strcmp(opt, "--control") == 0)
			mb_control_path = val;
		else
			mb_usage();
		i++;
	}
	if (brokers == 0 || partitions == 0 || mb_topic == NULL || *mb_topic == '\0' ||
		bootstrap_file == NULL)
		mb_usage();
	mb_brokers = (int) brokers;

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = mb_on_signal;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);

	/* the handle the mock cluster hangs off; it never produces anything */
	conf = rd_kafka_conf_new();
	if (rd_kafka_conf_set(conf, "client.id", "mock_broker", errstr, sizeof(errstr)) != RD_KAFKA_CONF_OK)
	{
		mb_log("%s", errstr);
		return 1;
	}
	rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof(errstr));
	if (rk == NULL)
	{
		mb_log("rd_kafka_new: %s", errstr);
		return 1;
	}
	mb_cluster = rd_kafka_mock_cluster_new(rk, mb_brokers);
	if (mb_cluster == NULL)
	{
		mb_log("rd_kafka_mock_cluster_new failed");
		rd_kafka_destroy(rk);
		return 1;
	}
	err = rd_kafka_mock_topic_create(mb_cluster, mb_topic, (int) partitions,
									 mb_brokers < 3 ? mb_brokers : 3);
	if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
	{
		mb_log("cannot create topic %s: %s", mb_topic, rd_kafka_err2str(err));
		goto fail;
	}

	if (mb_control_path != NULL)
	{
		size_t		len = strlen(mb_control_path) + sizeof(".ack");

		mb_ack_path = malloc(len);
		if (mb_ack_path == NULL)
			goto fail;
		snprintf(mb_ack_path, len, "%s.ack", mb_control_path);
		if (truncate(mb_ack_path, 0) != 0 && errno != ENOENT)
			mb_log("cannot truncate %s: %s", mb_ack_path, strerror(errno));
		if (mb_control_open() != 0)
			goto fail;
	}

	bootstraps = rd_kafka_mock_cluster_bootstraps(mb_cluster);
	if (mb_write_file_atomic(bootstrap_file, bootstraps) != 0)
	{
		mb_log("cannot write %s: %s", bootstrap_file, strerror(errno));
		goto fail;
	}
	mb_log("serving %d brokers at %s, topic %s with %ld partitions%s%s",
		   mb_brokers, bootstraps, mb_topic, partitions,
		   mb_control_path ? ", control " : "",
		   mb_control_path ? mb_control_path : "");

	while (!mb_stop)
	{
		mb_control_wait();
		rd_kafka_poll(rk, 0);	/* serve the handle's own events, if any */
	}

	mb_log("stopping");
	unlink(bootstrap_file);
	if (mb_control_fd >= 0)
		close(mb_control_fd);
	if (mb_control_keep_fd >= 0)
		close(mb_control_keep_fd);
	rd_kafka_mock_cluster_destroy(mb_cluster);
	rd_kafka_destroy(rk);
	free(mb_ack_path);
	return 0;

fail:
	rd_kafka_mock_cluster_destroy(mb_cluster);
	rd_kafka_destroy(rk);
	free(mb_ack_path);
	return 1;
}
