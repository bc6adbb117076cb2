# 020_kafka.pl
#
# The outbox relay against a real Kafka-protocol peer: test/kafka/mock_broker
# (librdkafka's mock cluster, 3 brokers, topics of 8 partitions) runs in a
# process of its own for the whole test; one cluster with
# shared_preload_libraries = 'points' (setup and helpers: 029_kafka_lib.pl).
# Each scenario publishes to a topic of its own, under a pgbench load over 50
# users (earns, uses, 1 in 10 transactions rolled back on purpose, failed
# uses rolled back in a subtransaction); after it: wait until
# worker_status.outbox_backlog = 0, export the scenario's ledger rows
# (user_id, user_seq, tx_id; ledger and archive) and require consume_check
# --expect to pass on the topic: nothing missing, nothing unexpected (no
# event of a rolled-back transaction), each user's first deliveries in
# user_seq order in one partition, key = user id; redeliveries allowed.
#
#   1. no broker configured (points.kafka_brokers = ''): rows wait in the
#      outbox, worker_status.last_error and kafka_last_error stay NULL, the
#      worker keeps running; setting the brokers (ALTER SYSTEM + reload)
#      drains them;
#   2. steady load: everything arrives, the outbox never piles up; the
#      commit-to-ack latency (commit -> outbox row deleted, which happens
#      only after the broker's ack) of 20 single events: median < 1 s and
#      at least 18 of 20 under 1 s;
#   3. all brokers down in the middle of the load: the load goes on, events
#      accumulate (outbox_backlog grows, events_published stands still,
#      kafka_last_error set), then all up: everything drains, in order;
#   4. partition leaders move during the load (every partition, every
#      second, now and then one left without a leader for a second): the old
#      leader refuses with NOT_LEADER_FOR_PARTITION; all delivered, in order;
#   5. a transaction that took 6,000 event ids commits after a load was
#      published around it: its events, and the next of two of its users,
#      all arrive, each user's in order.
#
# Crashes (kill -9, -m immediate) are in 021_kafka_crash.pl; injected
# produce errors, bad settings and fatal producer errors in
# 022_kafka_errors.pl.
use strict;
use warnings;

use FindBin;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep time);

require "$FindBin::Bin/029_kafka_lib.pl";
our ($node, $bootstrap, $main_topic, $nparts);

kafka_setup('points.t020');

# ---- 1. no broker configured: rows wait, nothing errors ----

{
	my $topic = 'points.t020.nobroker';
	my $mark = use_topic($topic);
	my $pid = sql('SELECT worker_pid FROM points.worker_status');
	like($pid, qr/^\d+$/, 'no broker: the worker runs');
	load_finish(load_start(3, 100), 'no broker');
	my $backlog = sql('SELECT count(*) FROM points.outbox');
	ok($backlog > 100, "no broker: $backlog events wait in the outbox");
	sleep 3;
	is(sql('SELECT count(*) FROM points.outbox'), $backlog,
		'no broker: still all there 3 s later');
	is( sql(q{SELECT concat_ws(',', coalesce(last_error, 'NULL'), coalesce(kafka_last_error, 'NULL'),
		events_published) FROM points.worker_status}),
		'NULL,NULL,0',
		'no broker: last_error and kafka_last_error NULL, nothing published');
	is(sql('SELECT worker_pid FROM points.worker_status'), $pid, 'no broker: same worker');
	unlike(slurp_file($node->logfile), qr/points worker: .*failed|ERROR|FATAL/,
		'no broker: no error in the log');

	my $t0 = time;
	set_kafka(kafka_brokers => $bootstrap);
	wait_drained('no broker, then brokers set');
	note sprintf('no broker: %d events drained %.2fs after the reload', $backlog, time - $t0);
	is(sql("SELECT events_published >= $backlog FROM points.worker_status"), 't',
		'no broker: events_published counts them');
	check_topic($topic, $mark, 'no broker, then brokers set');
	note_time('scenario no broker');
}

# ---- 2. steady load; commit-to-ack latency ----

{
	my $topic = 'points.t020.steady';
	my $mark = use_topic($topic);
	my $h = load_start(10, 150);
	my $max_backlog = 0;
	while (load_running($h))
	{
		my $b = sql('SELECT outbox_backlog FROM points.worker_status');
		$max_backlog = $b if $b > $max_backlog;
		usleep(200_000);
	}
	my ($n, $rolled_back) = load_finish($h, 'steady');
	ok($rolled_back > 0, "steady: $rolled_back of $n transactions rolled back on purpose");
	note "steady: highest outbox_backlog seen during the load: $max_backlog";
	ok($max_backlog < 300, "steady: the outbox does not pile up (max backlog $max_backlog)");
	wait_drained('steady');

	# 1 warm-up, then 20 events one at a time
	sql('CALL kafka_test_latency(1, 9000, NULL)');
	my $lat = sql('CALL kafka_test_latency(20, 9000, NULL)');
	my @ms = sort { $a <=> $b } split ' ', $lat;
	my $median = $ms[ int(@ms / 2) ];
	my $under = grep { $_ < 1000 } @ms;
	diag sprintf('commit-to-ack latency (commit -> outbox row deleted after the ack), ms: '
		  . 'min %s median %s max %s; all: %s', $ms[0], $median, $ms[-1], $lat);
	ok($median < 1000, "latency: median $median ms < 1 s");
	ok($under >= 18, "latency: $under of 20 under 1 s");
	check_topic($topic, $mark, 'steady');
	note_time('scenario steady');
}

# ---- 3. all brokers down in the middle of the load, then up ----

{
	my $topic = 'points.t020.down';
	my $mark = use_topic($topic);
	my $h = load_start(16, 100);
	sleep 3;
	my $ts = sql('SELECT now()');
	broker_cmd('down all');
	wait_until(
		qq{SELECT outbox_backlog > 0 AND kafka_last_error IS NOT NULL
		   AND kafka_last_error_at > '$ts' FROM points.worker_status},
		'down: events wait, kafka_last_error set');
	note 'down: kafka_last_error = ' . sql('SELECT kafka_last_error FROM points.worker_status');
	sleep 1;
	my ($b1, $p1) = split /\|/, sql('SELECT outbox_backlog, events_published FROM points.worker_status');
	sleep 4;
	my ($b2, $p2) = split /\|/, sql('SELECT outbox_backlog, events_published FROM points.worker_status');
	ok($b2 > $b1, "down: the backlog grows while the load goes on ($b1 -> $b2)");
	is($p2, $p1, 'down: events_published stands still');
	is(sql('SELECT last_error IS NULL FROM points.worker_status'), 't',
		'down: no worker error (last_error NULL)');

	my $t_up = time;
	broker_cmd('up all');
	# drained: back to the few events of the steady state
	my $backlog = sql('SELECT outbox_backlog FROM points.worker_status');
	wait_until(q{SELECT outbox_backlog < 50 FROM points.worker_status},
		'up: the backlog drains while the load goes on');
	my $secs = time - $t_up;
	diag sprintf('down/up: backlog %d at "up all", drained %.1fs later (reconnect included)',
		$backlog, $secs);
	load_finish($h, 'down');
	wait_drained('down, then up');
	check_topic($topic, $mark, 'down, then up');
	note_time('scenario brokers down');
}

# ---- 4. leaders move during the load ----

{
	my $mark = use_topic($main_topic);
	my $h = load_start(12, 150);
	for my $round (1 .. 10)
	{
		my @cmds = map { "leader $_ " . (($_ + $round) % 3 + 1) } 0 .. $nparts - 1;
		# now and then one partition without a leader for a second
		push @cmds, 'leader ' . ($round % $nparts) . ' -1' if $round % 3 == 0;
		broker_cmd(@cmds);
		sleep 1;
	}
	broker_cmd(map { "leader $_ " . ($_ % 3 + 1) } 0 .. $nparts - 1);
	load_finish($h, 'leaders');
	wait_drained('leaders');
	check_topic($main_topic, $mark, 'leader moves');
	note_time('scenario leader moves');
}

# ---- 5. events whose transaction took its ids early and commits late ----
# The relay reads on from where it may (not from the start of a table of
# dead rows), but never past an id that a running transaction may still
# commit: 6,000 events (more than one read) of a transaction held open
# during a load, and the next event of one of their users, all arrive, each
# user's in order.

{
	my $topic = 'points.t020.late';
	my $mark = use_topic($topic);
	my $late = $node->background_psql('postgres');
	$late->query_safe('BEGIN');
	is($late->query_safe('SELECT count(points.earn(u, 5)) FROM generate_series(900001, 906000) u'),
		'6000', 'late: a transaction took 6000 ids and stays open');
	my $h = load_start(6, 0);
	sleep 1;
	# while the load runs, the backlog comes under 300 (one instant could
	# catch a batch in flight or the anomaly checks' turn)
	my $kept_up = 0;
	for (1 .. 40)
	{
		last unless load_running($h);
		if (sql('SELECT outbox_backlog < 300 FROM points.worker_status') eq 't')
		{
			$kept_up = 1;
			last;
		}
		usleep(100_000);
	}
	ok($kept_up, 'late: the load is published around the open transaction');
	# commit in the middle of the load, so the relay keeps finding newer rows
	$late->query_safe('COMMIT');
	$late->quit;
	sql('SELECT points.earn(900001, 6)');
	sql('SELECT points.earn(906000, 7)');
	load_finish($h, 'late');
	wait_drained('late: the late commit published');
	check_topic($topic, $mark, 'late commit');
	note_time('scenario late commit');
}

is(sql('SELECT count(*) FROM points.verify()'), '0', 'verify() empty');
like(sql('SELECT worker_pid FROM points.worker_status'), qr/^\d+$/, 'the worker still runs');
unlike(slurp_file($node->logfile), qr/terminated by signal|exited with exit code/,
	'no crash or exit of the worker');
$node->stop('fast');
note_time('done');
done_testing();
