# 012_queue_crash.pl
#
# Queued earns survive a kill -9 of the worker in the middle of applying
# them: a backlog of 12000 requests (some replaying an idempotency key, some
# rejected) is queued in one transaction; the worker, woken by the commit,
# applies it in batches and is killed while doing so (the postmaster
# restarts every backend); the next worker finishes the queue.  Then every
# request is applied (or rejected) exactly once: one ledger earn per applied
# request that did not replay a key, each with the request's user and
# amount, no earn without its request, and the same for a server crash
# (stop -m immediate) in the middle of a second backlog.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep time);

my $node = PostgreSQL::Test::Cluster->new('queue');
$node->init;
$node->append_conf(
	'postgresql.conf', qq{
shared_preload_libraries = 'points'
restart_after_crash = on
points.expire_interval = '1h'
points.queue_interval = '50ms'
});
$node->start;
$node->safe_psql('postgres', 'CREATE EXTENSION points');

sub sql { return $node->safe_psql('postgres', $_[0]); }

sub worker_pid
{
	return sql(q{SELECT coalesce(min(pid)::text, '') FROM pg_stat_activity
		WHERE backend_type = 'points worker'});
}

# queue $n requests of users $first.. in one transaction: every 10th replays
# an earlier key of its user with the same amount (applied as a replay),
# every 97th reuses it with another amount (rejected, PT002)
sub queue_backlog
{
	my ($first, $n, $tag) = @_;
	sql(qq{
		BEGIN;
		SELECT count(points.earn_async($first + g, 10 + g % 7,
			idempotency_key => '$tag-' || g)) FROM generate_series(0, $n - 1) g;
		SELECT count(points.earn_async($first + g, 10 + g % 7,
			idempotency_key => '$tag-' || g)) FROM generate_series(0, $n - 1, 10) g;
		SELECT count(points.earn_async($first + g, 1000 + g,
			idempotency_key => '$tag-' || g)) FROM generate_series(0, $n - 1, 97) g;
		COMMIT;});
}

# every request of users $first.. resolved exactly once
sub check_exactly_once
{
	my ($first, $n, $what) = @_;
	my $last = $first + $n - 1;
	is(sql(qq{SELECT count(*) FROM points.request
		WHERE user_id BETWEEN $first AND $last AND state = 'queued'}),
		'0', "$what: nothing left queued");
	is(sql(qq{SELECT state, count(*) FROM points.request
		WHERE user_id BETWEEN $first AND $last GROUP BY state ORDER BY state}),
		"applied|" . ($n + int(($n + 9) / 10)) . "\nrejected|" . int(($n + 96) / 97),
		"$what: applied and rejected as their keys say");
	is(sql(qq{SELECT count(*) FROM points.ledger
		WHERE user_id BETWEEN $first AND $last AND kind = 'earn'}),
		$n, "$what: one earn per key, none twice");
	is(sql(qq{SELECT count(*) FROM points.request r
		LEFT JOIN points.ledger g ON g.tx_id = r.tx_id
		WHERE r.user_id BETWEEN $first AND $last AND r.state = 'applied'
		AND (g.tx_id IS NULL OR g.user_id <> r.user_id OR g.amount <> r.amount)}),
		'0', "$what: each applied request points at its earn (user, amount)");
	is(sql(qq{SELECT count(*) FROM points.ledger g
		WHERE g.user_id BETWEEN $first AND $last AND g.kind = 'earn'
		AND NOT EXISTS (SELECT FROM points.request r WHERE r.tx_id = g.tx_id)}),
		'0', "$what: no earn without its request");
	is(sql(qq{SELECT count(*) FROM points.ledger g
		WHERE g.user_id BETWEEN $first AND $last
		AND NOT EXISTS (SELECT FROM points.outbox o WHERE o.id = g.tx_id)}),
		'0', "$what: an event per earn");
	is(sql('SELECT count(*) FROM points.verify()'), '0', "$what: verify() empty");
}

# ---- 1. kill -9 of the worker mid-batch ----

my $pid = worker_pid();
ok($pid ne '', 'the worker runs');
queue_backlog(100000, 12000, 'k');
ok( $node->poll_query_until('postgres',
		q{SELECT count(*) > 0 FROM points.request WHERE state <> 'queued'}),
	'the worker started applying');
my $log_offset = -s $node->logfile;
kill 'KILL', $pid;
$node->wait_for_log(qr/terminated by signal 9/, $log_offset);
ok($node->poll_query_until('postgres',
		q{SELECT count(*) = 0 FROM points.request WHERE state = 'queued'}),
	'the next worker finishes the queue');
isnt(worker_pid(), $pid, 'it is a new worker');
check_exactly_once(100000, 12000, 'after kill -9');

# ---- 2. a server crash (stop -m immediate) mid-batch ----

queue_backlog(200000, 12000, 'm');
ok( $node->poll_query_until('postgres',
		q{SELECT count(*) > 0 FROM points.request
		  WHERE user_id >= 200000 AND state <> 'queued'}),
	'the worker started applying the second backlog');
$node->stop('immediate');
$node->start;
ok($node->poll_query_until('postgres',
		q{SELECT count(*) = 0 FROM points.request WHERE state = 'queued'}),
	'after the crash the worker finishes the queue');
check_exactly_once(200000, 12000, 'after a server crash');

# a campaign queued again changes nothing
queue_backlog(100000, 12000, 'k');
ok($node->poll_query_until('postgres',
		q{SELECT count(*) = 0 FROM points.request WHERE state = 'queued'}),
	'the same backlog queued again is resolved');
is(sql(q{SELECT count(*) FROM points.ledger WHERE user_id BETWEEN 100000 AND 111999
	AND kind = 'earn'}), '12000', 'and applied no earn twice');

done_testing();
