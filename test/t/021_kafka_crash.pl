# 021_kafka_crash.pl
#
# The outbox relay through crashes, mid-flush (setup and helpers:
# 029_kafka_lib.pl; same checks as 020_kafka.pl: consume_check --expect
# against the ledger after each scenario; redeliveries allowed, the first
# deliveries of each user in user_seq order, nothing missing).
#
# A backlog is built with every broker down (load + one bulk transaction,
# ~12000 events of 50 users, more than two batches of the worker), the
# brokers get a round-trip time of 400 ms (the mock appends a request at
# once and answers after the delay), come back up, and as soon as the first
# batch is deleted (events_published moves, backlog left) the next batch is
# in flight, its messages on the broker but not acknowledged:
#
#   1. the worker is killed with kill -9 (pid from worker_status): the
#      postmaster restarts everything, a new worker comes back and drains;
#   2. the server is stopped with -m immediate and started again: the
#      worker comes back and drains;
#   3. the worker is terminated (pg_terminate_backend, SIGTERM): it gives
#      the batch in flight a few seconds, exits, the postmaster starts it
#      again (bgw_restart_time) and it drains;
#   4. a reload (SIGHUP) makes a new producer: what was not acknowledged is
#      sent again by the new one.
#
# Redeliveries (the batch that was in flight) are counted and shown.
use strict;
use warnings;

use FindBin;
use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep time);

require "$FindBin::Bin/029_kafka_lib.pl";
our ($node, $bootstrap, $main_topic, $nparts);

kafka_setup('points.t021');
set_kafka(kafka_brokers => $bootstrap);

# backlog with the brokers down; returns (backlog, events_published)
sub build_backlog
{
	my ($what) = @_;
	broker_cmd('down all');
	my $h = load_start(4, 1000);
	sql(q{SELECT count(points.earn(u, 1, reason => 'bulk'))
		FROM generate_series(1, 180) i, generate_series(1, 50) u});
	load_finish($h, "$what: load while down");
	my ($backlog, $published) =
	  split /\|/, sql('SELECT outbox_backlog, events_published FROM points.worker_status');
	ok($backlog > 10000, "$what: backlog of $backlog events with the brokers down");
	return ($backlog, $published);
}

# brokers up, slow; returns once the first batch was deleted and rows are
# left (or after 60 s)
sub up_until_first_batch
{
	my ($what, $published) = @_;
	broker_cmd('rtt all 400', 'up all');
	my $t0 = time;
	my ($b, $p);
	while (time - $t0 < 60)
	{
		($b, $p) = split /\|/,
		  sql('SELECT outbox_backlog, events_published FROM points.worker_status');
		last if $p > $published;
		usleep(20_000);
	}
	note sprintf('%s: %.1fs after "up all": events_published %d -> %d, backlog %d',
		$what, time - $t0, $published, $p, $b);
	ok($p > $published && $b > 0, "$what: stopped mid-flush (some published, $b left)");
	# the next batch is read and produced at once: give it the time to reach
	# the broker, which answers only 400 ms after it got it
	usleep(200_000);
	return;
}

sub after_crash
{
	my ($topic, $mark, $old_pid, $backlog, $what) = @_;
	broker_cmd('rtt all 0');
	my $t0 = time;
	wait_until(qq{SELECT worker_pid IS NOT NULL AND worker_pid <> $old_pid FROM points.worker_status},
		"$what: a new worker runs");
	note sprintf('%s: a new worker runs %.1fs later', $what, time - $t0);
	wait_drained($what);
	my $secs = time - $t0;
	diag sprintf('%s: the new worker drained the rest in %.1fs (backlog was %d before the brokers came up)',
		$what, $secs, $backlog);
	my $s = check_topic($topic, $mark, $what);
	diag "$what: $s->{redelivered} events delivered twice (the batch in flight at the crash)"
	  if defined $s->{redelivered};
	return;
}

# ---- 1. kill -9 of the worker mid-flush ----

{
	my $topic = 'points.t021.kill9';
	my $mark = use_topic($topic);
	my ($backlog, $published) = build_backlog('kill -9');
	my $pid = sql('SELECT worker_pid FROM points.worker_status');
	up_until_first_batch('kill -9', $published);
	my $offset = -s $node->logfile;
	ok(kill('KILL', $pid), "kill -9 the worker (pid $pid)");
	$node->wait_for_log(qr/terminated by signal 9: Killed/, $offset);
	after_crash($topic, $mark, $pid, $backlog, 'kill -9');
	note_time('scenario kill -9');
}

# ---- 2. stop -m immediate mid-flush, start ----

{
	my $topic = 'points.t021.immediate';
	my $mark = use_topic($topic);
	my ($backlog, $published) = build_backlog('immediate');
	my $pid = sql('SELECT worker_pid FROM points.worker_status');
	up_until_first_batch('immediate', $published);
	$node->stop('immediate');
	$node->start;
	after_crash($topic, $mark, $pid, $backlog, 'immediate stop');
	note_time('scenario stop -m immediate');
}

# ---- 3. the worker terminated (SIGTERM) mid-flush ----

{
	my $topic = 'points.t021.terminate';
	my $mark = use_topic($topic);
	my ($backlog, $published) = build_backlog('terminate');
	my $pid = sql('SELECT worker_pid FROM points.worker_status');
	up_until_first_batch('terminate', $published);
	my $offset = -s $node->logfile;
	is(sql("SELECT pg_terminate_backend($pid)"), 't', "pg_terminate_backend of the worker (pid $pid)");
	$node->wait_for_log(qr/points worker stopping/, $offset);
	after_crash($topic, $mark, $pid, $backlog, 'terminate');
	note_time('scenario terminate');
}

# ---- 4. a reload mid-flush: the producer is made anew ----

{
	my $topic = 'points.t021.reload';
	my $mark = use_topic($topic);
	my ($backlog, $published) = build_backlog('reload');
	my $pid = sql('SELECT worker_pid FROM points.worker_status');
	up_until_first_batch('reload', $published);
	my $offset = -s $node->logfile;
	sql('SELECT pg_reload_conf()');
	$node->wait_for_log(qr/publishing to Kafka topic "\Q$topic\E"/, $offset);
	broker_cmd('rtt all 0');
	wait_drained('reload');
	is(sql('SELECT worker_pid FROM points.worker_status'), $pid, 'reload: same worker');
	my $s = check_topic($topic, $mark, 'reload mid-flush');
	diag "reload: $s->{redelivered} events delivered twice (the batch in flight at the reload)"
	  if defined $s->{redelivered};
	note_time('scenario reload');
}

is(sql('SELECT count(*) FROM points.verify()'), '0', 'verify() empty');
$node->stop('fast');
note_time('done');
done_testing();
