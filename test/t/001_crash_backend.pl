# 001_crash_backend.pl
#
# kill -9 of a backend in the middle of an earn, a use and a cancel.
#
# The victim session makes the call and is then held before it commits: in
# an open transaction block, by waiting for advisory lock 42, which the test
# holds from another session ("after its writes, before commit"); or, for
# the "inside" cases, inside the call itself, by a test trigger on one of the
# tables the call writes last.  The test checks from a third session that the
# victim holds the user's lock and that none of its writes are visible, then
# kills the victim with SIGKILL.  The postmaster answers by restarting every
# backend and running crash recovery.  Afterwards:
#   - the points tables are exactly as they were before the call (no ledger
#     row, no lot, no lot change, no outbox row, no use_lot row, the account
#     unchanged), points.verify() is empty;
#   - retrying the call with the same idempotency key applies it once
#     (replayed = false), and a second retry replays it (replayed = true,
#     same tx_id), moving the balance by the call's amount only;
#   - invariants hold: user_seq gapless, one outbox row per ledger row.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;

my $node = PostgreSQL::Test::Cluster->new('crash_backend');
$node->init;
$node->append_conf(
	'postgresql.conf', qq{
shared_preload_libraries = 'points'
restart_after_crash = on
});
$node->start;
$node->safe_psql('postgres', 'CREATE EXTENSION points');

my $uid = 7;

# committed history that the cancels refer to
my $earn_tx = $node->safe_psql('postgres',
	qq{SELECT tx_id FROM points.earn($uid, 1000, 'seed-earn')});
my $use_tx = $node->safe_psql('postgres',
	qq{SELECT tx_id FROM points.use($uid, 200, 'seed-use')});

# Test triggers that hold a call inside itself, in sessions that SET
# crashtest.hold = 'on' only: BEFORE INSERT on the outbox (an earn has
# written its ledger row and lot) and on use_lot (a use has written its
# ledger row, outbox row and account, and is taking points from its lots).
$node->safe_psql(
	'postgres', q{
CREATE SCHEMA crashtest;
CREATE FUNCTION crashtest.hold() RETURNS trigger LANGUAGE plpgsql AS
$$BEGIN PERFORM pg_advisory_lock(42); RETURN NEW; END$$;
CREATE TRIGGER crashtest_hold BEFORE INSERT ON points.outbox FOR EACH ROW
  WHEN (current_setting('crashtest.hold', true) = 'on')
  EXECUTE FUNCTION crashtest.hold();
CREATE TRIGGER crashtest_hold BEFORE INSERT ON points.use_lot FOR EACH ROW
  WHEN (current_setting('crashtest.hold', true) = 'on')
  EXECUTE FUNCTION crashtest.hold();
});

# Every row of the points tables, as text: the state a killed call must not
# have changed.  (points.tx_seq is left out: sequences are not transactional.)
my $snapshot_sql = q{
SELECT string_agg(t || ' ' || r, E'\n' ORDER BY t, r) FROM (
  SELECT 'account' AS t, x::text AS r FROM points.account x
  UNION ALL SELECT 'lot', x::text FROM points.lot x
  UNION ALL SELECT 'use_lot', x::text FROM points.use_lot x
  UNION ALL SELECT 'ledger', x::text FROM points.ledger x
  UNION ALL SELECT 'ledger_archive', x::text FROM points.ledger_archive x
  UNION ALL SELECT 'outbox', x::text FROM points.outbox x) s};

# The invariants, each query returning 0 when it holds.
my %invariants = (
	'points.verify() is empty' => 'SELECT count(*) FROM points.verify()',
	'user_seq is gapless and account.last_seq is the last one' => q{
		SELECT count(*) FROM points.account a
		LEFT JOIN (SELECT user_id, count(*) AS n, min(user_seq) AS lo, max(user_seq) AS hi
		           FROM (SELECT user_id, user_seq FROM points.ledger
		                 UNION ALL SELECT user_id, user_seq FROM points.ledger_archive) l
		           GROUP BY user_id) s USING (user_id)
		WHERE NOT (coalesce(s.lo, 1) = 1 AND coalesce(s.hi, 0) = coalesce(s.n, 0)
		           AND a.last_seq = coalesce(s.hi, 0))},
	'one outbox row per ledger row' => q{
		SELECT (SELECT count(*) FROM points.ledger l
		        WHERE NOT EXISTS (SELECT 1 FROM points.outbox o WHERE o.id = l.tx_id))
		     + (SELECT count(*) FROM points.outbox o
		        WHERE NOT EXISTS (SELECT 1 FROM points.ledger l WHERE l.tx_id = o.id)
		          AND NOT EXISTS (SELECT 1 FROM points.ledger_archive l WHERE l.tx_id = o.id))},
	'use_lot agrees with the ledger' => q{
		SELECT count(*) FROM points.ledger l
		WHERE l.kind = 'use'
		  AND -l.amount - coalesce((SELECT sum(c.amount) FROM points.ledger c
		                            WHERE c.cancels_tx = l.tx_id), 0)
		      <> coalesce((SELECT sum(u.taken - u.restored) FROM points.use_lot u
		                   WHERE u.use_tx = l.tx_id), 0)},
	'the last ledger row of each account has its balance' => q{
		SELECT count(*) FROM points.account a
		WHERE a.balance <> coalesce((SELECT l.balance_after FROM points.ledger l
		                             WHERE l.user_id = a.user_id
		                             ORDER BY l.user_seq DESC LIMIT 1), a.balance)},
);

# all of them in one round trip
sub check_invariants
{
	my ($when) = @_;
	my @names = sort keys %invariants;
	my $sql = join("\nUNION ALL ",
		map { "SELECT $_, ($invariants{$names[$_]})" } 0 .. $#names);
	my %got = map { split /\|/ } split /\n/, $node->safe_psql('postgres', $sql);
	foreach my $i (0 .. $#names)
	{
		is($got{$i}, '0', "$when: $names[$i]");
	}
	return;
}

sub user_lock_holder
{
	my ($u) = @_;
	return $node->safe_psql(
		'postgres', qq{
		SELECT coalesce(string_agg(pid::text, ','), '') FROM pg_locks
		WHERE locktype = 'advisory' AND objsubid = 21588 AND granted
		  AND classid = (${u}::int8 >> 32)::oid AND objid = (${u}::int8 & 4294967295)::oid});
}

# Close a psql whose backend is gone.
sub close_dead
{
	my ($s) = @_;
	eval { $s->{run}->kill_kill; };
	return;
}

# crash_case(name, call, key, delta, inside)
#   call:   the API call, e.g. "points.earn(7, 100, 'key-1')"
#   key:    its idempotency key
#   delta:  how it changes the balance of $uid
#   inside: hold the victim inside the call (test trigger), not after it
sub crash_case
{
	my ($name, $call, $key, $delta, $inside) = @_;

	my $before = $node->safe_psql('postgres', $snapshot_sql);
	my $balance = $node->safe_psql('postgres', "SELECT points.balance($uid)");

	my $holder = $node->background_psql('postgres');
	$holder->query_safe('SELECT pg_advisory_lock(42)');

	my $victim = $node->background_psql('postgres', on_error_stop => 0);
	my $pid = $victim->query_safe('SELECT pg_backend_pid()');
	if ($inside)
	{
		$victim->query_safe(q{SET crashtest.hold = 'on'});
		# autocommit: the call is killed in the middle of its statement
		$victim->{stdin} .= "SELECT tx_id FROM $call;\n";
	}
	else
	{
		$victim->query_safe('BEGIN');
		my $tx = $victim->query_safe("SELECT tx_id FROM $call");
		like($tx, qr/^\d+$/, "$name: the victim's call returned tx $tx (not committed)");
		$victim->{stdin} .= "SELECT pg_advisory_lock(42);\n";
	}
	$victim->{run}->pump_nb;
	ok( $node->poll_query_until(
			'postgres', qq{SELECT count(*) = 1 FROM pg_locks
			WHERE pid = $pid AND locktype = 'advisory' AND NOT granted}),
		"$name: the victim (pid $pid) is held before commit");
	is(user_lock_holder($uid), $pid, "$name: the victim holds the lock of user $uid");
	is( $node->safe_psql(
			'postgres',
			"SELECT backend_xid IS NOT NULL FROM pg_stat_activity WHERE pid = $pid"),
		't',
		"$name: the victim has written (it has a transaction id)");
	is($node->safe_psql('postgres', $snapshot_sql),
		$before, "$name: none of the victim's writes are visible to others");

	my $log_offset = -s $node->logfile;
	ok(kill('KILL', $pid), "$name: kill -9 $pid");
	ok( pump_until(
			$victim->{run}, $victim->{timeout}, \$victim->{stderr},
			qr/server closed the connection unexpectedly|connection to server was lost/
		),
		"$name: the victim's connection is gone");
	$node->wait_for_log(qr/server process \(PID $pid\) was terminated by signal 9/,
		$log_offset);
	$node->wait_for_log(qr/all server processes terminated; reinitializing/,
		$log_offset);
	ok($node->poll_query_until('postgres', 'SELECT true'),
		"$name: the server is back after crash recovery");
	close_dead($victim);
	close_dead($holder);

	is($node->safe_psql('postgres', $snapshot_sql),
		$before, "$name: after recovery the points tables are as before the call");
	is( $node->safe_psql(
			'postgres', qq{SELECT count(*) FROM points.ledger
			WHERE user_id = $uid AND idempotency_key = '$key'}),
		'0',
		"$name: the key $key is unused");
	is($node->safe_psql('postgres', "SELECT points.balance($uid)"),
		$balance, "$name: the balance is unchanged");
	# (a background worker of the extension may hold its own)
	is( $node->safe_psql(
			'postgres', q{
			SELECT count(*) FROM pg_locks
			WHERE locktype = 'advisory'
			  AND pid NOT IN (SELECT pid FROM pg_stat_activity
			                  WHERE backend_type <> 'client backend')}),
		'0', "$name: no advisory lock is left");
	check_invariants("$name, after recovery");

	my $first = $node->safe_psql('postgres', "SELECT replayed, tx_id FROM $call");
	like($first, qr/^f\|\d+$/, "$name: the retry applies the call (replayed = false)");
	my ($tx) = $first =~ /\|(\d+)$/;
	is($node->safe_psql('postgres', "SELECT replayed, tx_id FROM $call"),
		"t|$tx", "$name: a second retry replays it (replayed = true, same tx)");
	is( $node->safe_psql(
			'postgres', qq{SELECT count(*) FROM points.ledger
			WHERE user_id = $uid AND idempotency_key = '$key'}),
		'1',
		"$name: the key $key is applied once");
	is($node->safe_psql('postgres', "SELECT points.balance($uid)"),
		$balance + $delta, "$name: the balance moved by $delta once");
	check_invariants("$name, after the retries");
	return;
}

crash_case('earn', "points.earn($uid, 100, 'key-1')", 'key-1', 100, 0);
crash_case('use', "points.use($uid, 30, 'key-use-1')", 'key-use-1', -30, 0);
crash_case('cancel of a use', "points.cancel($use_tx, 50, 'key-cancel-use-1')",
	'key-cancel-use-1', 50, 0);
crash_case('cancel of an earn', "points.cancel($earn_tx, 100, 'key-cancel-earn-1')",
	'key-cancel-earn-1', -100, 0);
crash_case('inside an earn', "points.earn($uid, 40, 'key-in-earn-1')",
	'key-in-earn-1', 40, 1);
crash_case('inside a use', "points.use($uid, 25, 'key-in-use-1')",
	'key-in-use-1', -25, 1);

# the use_lot rows of the retried use and cancel add up
is( $node->safe_psql(
		'postgres', qq{SELECT sum(taken), sum(restored) FROM points.use_lot
		WHERE use_tx = $use_tx}),
	'200|50',
	'the use that was partly cancelled took 200 and got 50 back, once');

$node->safe_psql('postgres', 'DROP SCHEMA crashtest CASCADE');
check_invariants('at the end');
$node->stop;
done_testing();
