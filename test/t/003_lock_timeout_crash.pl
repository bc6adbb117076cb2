# 003_lock_timeout_crash.pl
#
# A user's lock dies with the session that holds it, also when that session
# is killed -9: after crash recovery the next caller gets the user's lock at
# once (no stale lock) and its earn succeeds.  Before that, the ordinary
# case: a waiter gets the lock as soon as a holder is terminated, without
# sitting out points.lock_timeout.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time);

my $node = PostgreSQL::Test::Cluster->new('lock_crash');
$node->init;
$node->append_conf(
	'postgresql.conf', qq{
shared_preload_libraries = 'points'
restart_after_crash = on
});
$node->start;
$node->safe_psql('postgres', 'CREATE EXTENSION points');
$node->safe_psql('postgres', q{SELECT points.earn(5, 1000, 'seed')});

# The user lock of user $uid as pg_locks shows it (see src/userlock.c).
sub user_lock_holders
{
	my ($uid) = @_;
	return $node->safe_psql(
		'postgres', qq{
		SELECT coalesce(string_agg(pid::text || ':' || granted::text, ',' ORDER BY pid), '')
		FROM pg_locks
		WHERE locktype = 'advisory' AND objsubid = 21588
		  AND classid = (${uid}::int8 >> 32)::oid
		  AND objid = (${uid}::int8 & 4294967295)::oid});
}

# A session that holds the lock of user 5: an earn left uncommitted.
sub hold_user_lock
{
	my ($key) = @_;
	my $s = $node->background_psql('postgres', on_error_stop => 0);
	my $pid = $s->query_safe('SELECT pg_backend_pid()');
	$s->query_safe('BEGIN');
	$s->query_safe(qq{SELECT tx_id FROM points.earn(5, 10, '$key')});
	is(user_lock_holders(5), "$pid:true", "session $pid holds the lock of user 5");
	return ($s, $pid);
}

# Close a psql whose backend is gone.
sub close_dead
{
	my ($s) = @_;
	eval { $s->{run}->kill_kill; };
	return;
}

# --- 1. termination of a holder wakes a waiter at once ---------------------
{
	my ($holder, $pid) = hold_user_lock('held-1');

	my ($rc, $out, $err) = $node->psql(
		'postgres', q{SET points.lock_timeout = '200ms';
		SELECT points.earn(5, 10, 'busy-1')});
	like($err, qr/55P03|is busy/, 'a second caller times out while the lock is held');

	my $waiter = $node->background_psql('postgres', on_error_stop => 0);
	$waiter->query_safe(q{SET points.lock_timeout = '60s'});
	my $waiter_pid = $waiter->query_safe('SELECT pg_backend_pid()');
	$waiter->{stdin} .= qq{SELECT replayed FROM points.earn(5, 10, 'waiter-1');\n\\echo waiter-done\n};
	$waiter->{run}->pump_nb;
	ok( $node->poll_query_until(
			'postgres', qq{SELECT count(*) = 1 FROM pg_locks
			WHERE pid = $waiter_pid AND locktype = 'advisory' AND NOT granted}),
		'the waiter waits for the lock of user 5');

	my $t0 = time;
	$node->safe_psql('postgres', "SELECT pg_terminate_backend($pid, 60000)");
	ok(pump_until($waiter->{run}, $waiter->{timeout}, \$waiter->{stdout}, qr/waiter-done/),
		'the waiter finished');
	my $waited = time - $t0;
	like($waiter->{stdout}, qr/^f$/m, 'the waiter earned');
	cmp_ok($waited, '<', 10, sprintf('... %.2fs after the holder was terminated, not after its 60s timeout', $waited));
	close_dead($holder);
	$waiter->quit;
	is($node->safe_psql('postgres',
		q{SELECT count(*) FROM points.ledger WHERE idempotency_key = 'held-1'}),
		'0', 'the terminated holder left nothing');
}

# --- 2. kill -9 of a holder: no stale lock after crash recovery ------------
{
	my ($holder, $pid) = hold_user_lock('held-2');
	my $balance = $node->safe_psql('postgres', 'SELECT points.balance(5)');

	my $log_offset = -s $node->logfile;
	ok(kill('KILL', $pid), "kill -9 of backend $pid");
	$node->wait_for_log(qr/server process \(PID $pid\) was terminated by signal 9/, $log_offset);
	$node->wait_for_log(qr/all server processes terminated; reinitializing/, $log_offset);
	ok($node->poll_query_until('postgres', 'SELECT true'), 'server is back after crash recovery');
	close_dead($holder);

	# (a background worker of the extension may hold its own)
	is( $node->safe_psql(
			'postgres', q{
			SELECT count(*) FROM pg_locks
			WHERE locktype = 'advisory'
			  AND pid NOT IN (SELECT pid FROM pg_stat_activity
			                  WHERE backend_type <> 'client backend')}),
		'0', 'no advisory lock is left after recovery');
	is(user_lock_holders(5), '', 'nobody holds the lock of user 5');

	my $t0 = time;
	my ($rc, $out, $err) = $node->psql(
		'postgres', q{SET points.lock_timeout = '100ms';
		SELECT kind, amount, replayed FROM points.earn(5, 10, 'held-2')});
	my $took = time - $t0;
	is($rc, 0, 'an earn of user 5 with a 100ms lock timeout succeeds') or diag $err;
	is($out, 'earn|10|f', '... and applies the killed earn\'s key for the first time');
	note(sprintf('earn after recovery took %.3fs', $took));
	is($node->safe_psql('postgres', 'SELECT points.balance(5)'),
		$balance + 10, 'balance grew by the retried earn only');
	is($node->safe_psql('postgres', 'SELECT count(*) FROM points.verify()'),
		'0', 'points.verify() is empty');
}

$node->stop;
done_testing();
