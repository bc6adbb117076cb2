# 022_kafka_errors.pl
#
# The outbox relay when the broker refuses or the producer cannot work
# (setup and helpers: 029_kafka_lib.pl; same checks as 020_kafka.pl:
# consume_check --expect against the ledger after each scenario).
#
#   1. retriable produce errors injected during the load (the mock's
#      produce_errors: NOT_LEADER_FOR_PARTITION, REQUEST_TIMED_OUT,
#      NOT_ENOUGH_REPLICAS, NOT_ENOUGH_REPLICAS_AFTER_APPEND), with
#      max.in.flight = 1 through points.kafka_options: the mock does not
#      check sequence numbers, so with several requests in flight it writes
#      the request after a refused one and the retry lands behind it, a
#      reorder a real broker would refuse (KAFKA.md); with one in flight
#      nothing overtakes a refusal.  All delivered, in order;
#   2. a bad points.kafka_options (no.such.property=1): the worker records
#      the error in worker_status.kafka_last_error, keeps running, events
#      wait in the outbox; resetting the setting drains them;
#   3. a fatal producer error: an OUT_OF_ORDER_SEQUENCE_NUMBER (45) answer
#      to the only request in flight is a sequence desynchronization that
#      librdkafka's idempotent producer treats as fatal; the worker logs it,
#      makes a new producer and delivers the event; the same with
#      enable.gapless.guarantee=true and a permanent error (CORRUPT_MESSAGE)
#      (fatal GAPLESS_GUARANTEE);
#   4. a permanent (not retriable, not fatal) produce error while a backlog
#      drains: 6000 events of 50 users on a topic of 1 partition, so that
#      the worker's first batch needs several Produce requests; the first
#      one is refused with CORRUPT_MESSAGE (2); max.in.flight=1, so the mock
#      cannot write a later request before the refusal.  Without
#      enable.gapless.guarantee librdkafka would fail the refused request's
#      messages and deliver the later ones (epoch bump), and re-sending the
#      failed rows would put them after later events of the same users; the
#      worker sets it, so the refusal is a fatal error, nothing behind it is
#      delivered, and the new producer re-sends from the table: in order;
#   5. the same with enable.gapless.guarantee=true given explicitly in
#      points.kafka_options.
use strict;
use warnings;

use FindBin;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep time);

require "$FindBin::Bin/029_kafka_lib.pl";
our ($node, $bootstrap, $main_topic, $nparts, $wdir);

kafka_setup('points.t022');
set_kafka(kafka_brokers => $bootstrap);

# ---- 1. retriable produce errors, one request in flight ----

{
	my $topic = 'points.t022.retriable';
	set_kafka(kafka_options => 'max.in.flight=1');
	my $mark = use_topic($topic);
	my $h = load_start(10, 150);
	for my $code (6, 7, 19, 20)
	{
		sleep 2;
		broker_cmd("produce_errors 10 $code");
	}
	load_finish($h, 'retriable');
	wait_drained('retriable');
	check_topic($topic, $mark, 'retriable produce errors');
	set_kafka(kafka_options => undef);
	note_time('scenario retriable errors');
}

# ---- 2. a bad points.kafka_options ----

{
	my $topic = 'points.t022.badopt';
	my $mark = use_topic($topic);
	my $pid = sql('SELECT worker_pid FROM points.worker_status');
	set_kafka(kafka_options => 'no.such.property=1', -wait => 0);
	wait_until(q{SELECT kafka_last_error LIKE '%no.such.property%' FROM points.worker_status},
		'bad option: the error is in worker_status.kafka_last_error');
	note 'bad option: kafka_last_error = ' . sql('SELECT kafka_last_error FROM points.worker_status');
	load_finish(load_start(3, 100), 'bad option');
	my $backlog = sql('SELECT outbox_backlog FROM points.worker_status');
	ok($backlog > 100, "bad option: $backlog events wait in the outbox");
	sleep 3;
	is(sql('SELECT outbox_backlog FROM points.worker_status'), $backlog,
		'bad option: still waiting 3 s later');
	is(sql('SELECT worker_pid FROM points.worker_status'), $pid,
		'bad option: the worker keeps running (same pid)');
	set_kafka(kafka_options => undef);
	wait_drained('bad option reset');
	check_topic($topic, $mark, 'bad option, then reset');
	note_time('scenario bad option');
}

# ---- 3. fatal producer errors ----

sub fatal_case
{
	my ($topic, $code, $cause, $what) = @_;
	my $mark = use_topic($topic);
	my $pid = sql('SELECT worker_pid FROM points.worker_status');
	my $offset = -s $node->logfile;
	# warm up: the producer has its producer id and sends one at a time
	sql('SELECT points.earn(1, 1)');
	wait_drained("$what: warm-up");
	broker_cmd("produce_errors 1 $code");
	sql('SELECT points.earn(2, 1)');
	$node->wait_for_log(qr/points worker: .*; making a new producer/, $offset);
	my $log = slurp_file($node->logfile, $offset);
	like($log, qr/Fatal error: .*$cause/, "$what: librdkafka raised a fatal error");
	ok(1, "$what: the worker makes a new producer");
	note "$what: $1" if $log =~ /(points worker: .*; making a new producer)/;
	# the error recorded is the fatal error or its message's failed delivery
	# (whichever callback ran last)
	like(sql('SELECT kafka_last_error FROM points.worker_status'), $cause,
		"$what: worker_status.kafka_last_error shows the cause");
	wait_drained("$what: new producer");
	is(sql('SELECT worker_pid FROM points.worker_status'), $pid,
		"$what: the same worker (no restart)");
	load_finish(load_start(2, 100), "$what: after");
	wait_drained("$what: after");
	check_topic($topic, $mark, $what);
	return;
}

fatal_case('points.t022.fatal45', 45, qr/sequence desynchronization|out of order sequence/,
	'fatal (OUT_OF_ORDER_SEQUENCE_NUMBER)');
set_kafka(kafka_options => 'enable.gapless.guarantee=true');
fatal_case('points.t022.gapless', 2, qr/gap-less|Invalid message/,
	'fatal (gapless guarantee, CORRUPT_MESSAGE)');
set_kafka(kafka_options => undef);
note_time('scenario fatal');

# ---- 4. a permanent produce error while a backlog drains ----

# a backlog of 6000 events of 50 users on a topic of 1 partition: the first
# batch (5000 rows, ~2 MB) needs several Produce requests; the first one is
# refused with CORRUPT_MESSAGE (2), which librdkafka treats as permanent:
# its messages fail, the later ones are delivered.  max.in.flight=1 keeps
# the mock honest (the next request leaves only after the refusal, as a
# real broker would have it).  Returns consume_check's summary.
sub permanent_case
{
	my ($topic, $options, $what, $todo) = @_;
	set_kafka(kafka_brokers => '', kafka_options => $options);
	my $mark = use_topic($topic, 1);
	sql(q{SELECT count(points.earn(u, 1, reason => 'bulk'))
		FROM generate_series(1, 120) i, generate_series(1, 50) u});
	my $backlog = sql('SELECT outbox_backlog FROM points.worker_status');
	note "$what: backlog $backlog";
	broker_cmd('produce_errors 1 2');
	set_kafka(kafka_brokers => $bootstrap);
	wait_drained($what);
	note "$what: kafka_last_error = " . sql('SELECT kafka_last_error FROM points.worker_status');
	my $s = check_topic($topic, $mark, $what, $todo);
	set_kafka(kafka_options => undef);
	return $s;
}

permanent_case('points.t022.permanent', 'max.in.flight=1',
	'permanent error, default settings');
note_time('scenario permanent error');

# the same with enable.gapless.guarantee=true: the refusal is a fatal error,
# nothing after it is delivered, the worker makes a new producer and re-sends
# from the table, in order
permanent_case('points.t022.permanent.gapless',
	'max.in.flight=1,enable.gapless.guarantee=true',
	'permanent error, gapless guarantee');
note_time('scenario permanent error, gapless');

is(sql('SELECT count(*) FROM points.verify()'), '0', 'verify() empty');
$node->stop('fast');
note_time('done');
done_testing();
