# 002_crash_postmaster.pl
#
# kill -9 of the whole server under load, then restart (crash recovery).
#
# Load: $nclients psql clients, each running its own script of single-call
# autocommit statements (earns, uses, partial cancels of its own earlier
# calls, and repeats of its own earlier calls) on a few hot users and many
# cold ones, every call with a unique idempotency key "c<client>-<n>".  Each
# call prints "key|tx_id|replayed"; psql prints a result only after the
# server's CommandComplete, which the server sends after the commit, so a line
# in a client's output file is a call the client saw acknowledged.
#
# Crash: the postmaster and all its children are frozen (SIGSTOP) and then
# killed (SIGKILL), as a power cut would stop them, without any process
# getting the chance to notice the others dying.  The server is restarted
# and runs crash recovery.  Then:
#   - every acknowledged call is in the ledger, with the tx_id the client got;
#   - invariants hold: points.verify() is empty, user_seq is gapless per user
#     and account.last_seq is the last one, one outbox row per ledger row
#     (payload user_seq matches), each key applied at most once;
#   - no advisory lock is left over;
#   - the call each client had in flight, retried twice, is applied at most
#     once (the second retry replays it);
#   - every acknowledged call, retried, replays with the same tx_id;
#   - new earns and uses succeed.
#
# fsync is on, as in production, although SIGKILL does not lose what the
# server wrote to the operating system: this tests the server's own state
# (WAL, shared memory, locks), not the disk.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(time usleep);
use IPC::Run;
use Config;
use POSIX qw(WNOHANG);

my $nclients = 8;
my $ncalls = 4000;		# per client: more than it gets through before the crash
my $load_secs = 3;
my @hot = (1, 2, 3);
my @cold = (100 .. 299);
my $seed = $ENV{POINTS_CRASH_SEED} // int(time()) % 100000;
note "seed $seed (set POINTS_CRASH_SEED to repeat)";
srand($seed);

# Become the reaper of orphans below this process (prctl
# PR_SET_CHILD_SUBREAPER), so that the postmaster and, once it is dead, its
# children are our children: PID 1 of a container may never reap them, and a
# zombie postmaster still answers kill(pid, 0), which the next postmaster
# takes for a live one.  Without it we fall back to removing the lock files.
my $subreaper = eval {
	my $nr = eval { require 'syscall.ph'; main::SYS_prctl() }
	  // ($Config{archname} =~ /^x86_64/ ? 157
		: $Config{archname} =~ /^aarch64/ ? 167
		: undef);
	defined $nr && syscall($nr, 36, 1, 0, 0, 0) == 0;
};
note $subreaper ? 'this test reaps the killed server processes' : 'cannot become a subreaper';

my $node = PostgreSQL::Test::Cluster->new('crash_postmaster');
$node->init;
$node->append_conf(
	'postgresql.conf', qq{
shared_preload_libraries = 'points'
fsync = on
log_statement = none
max_connections = 40
});
$node->start;
$node->safe_psql('postgres', 'CREATE EXTENSION points');
foreach my $u (@hot)
{
	$node->safe_psql('postgres', "SELECT points.earn($u, 1000000, 'seed-$u')");
}

# ---- the clients' scripts -------------------------------------------------
my $dir = PostgreSQL::Test::Utils::tempdir('load');
my @calls;		# $calls[$c][$i] = { sql, key, user, op }
foreach my $c (1 .. $nclients)
{
	open my $fh, '>', "$dir/c$c.sql" or die $!;
	print $fh "\\set VERBOSITY sqlstate\n";
	my @mine;
	my @done;	# its earns and uses, which it may cancel
	foreach my $i (1 .. $ncalls)
	{
		my $key = "c$c-$i";
		my $r = rand();
		my $user = rand() < 0.6 ? $hot[ rand @hot ] : $cold[ rand @cold ];
		my ($call, $op);
		if ($r < 0.45 || !@done)
		{
			$op = 'earn';
			$call = sprintf("points.earn(%d, %d, '%s')", $user, 1 + int(rand(50)), $key);
		}
		elsif ($r < 0.75)
		{
			$op = 'use';
			$call = sprintf("points.use(%d, %d, '%s')", $user, 1 + int(rand(20)), $key);
		}
		elsif ($r < 0.90)
		{
			# a partial cancel of one of this client's own earns or uses
			my $t = $done[ rand @done ];
			$op = 'cancel';
			$user = $t->{user};
			$call = sprintf(
				"points.cancel((SELECT tx_id FROM points.ledger WHERE user_id = %d AND idempotency_key = '%s'), %d, '%s')",
				$user, $t->{key}, 1 + int(rand(3)), $key);
		}
		else
		{
			# a repeat of an earlier call (a client retrying): same key
			my $t = $mine[ rand @mine ];
			push @mine, { %$t, repeat => 1 };
			print $fh $t->{sql}, "\n";
			next;
		}
		my $sql = "SELECT idempotency_key, tx_id, replayed FROM $call;";
		push @mine, { sql => $sql, key => $key, user => $user, op => $op };
		push @done, $mine[-1] if $op ne 'cancel';
		print $fh "$sql\n";
	}
	close $fh;
	$calls[$c] = \@mine;
}

# ---- load ------------------------------------------------------------------
my @clients;
foreach my $c (1 .. $nclients)
{
	my $h = IPC::Run::start(
		[
			'psql', '-X', '-A', '-t', '-q', '-d', $node->connstr('postgres'),
			'-f', "$dir/c$c.sql"
		],
		'<', '/dev/null', '>', "$dir/c$c.out", '2>', "$dir/c$c.err",
		IPC::Run::timeout($PostgreSQL::Test::Utils::timeout_default));
	push @clients, $h;
}

my $t0 = time;
my $deadline = $t0 + $PostgreSQL::Test::Utils::timeout_default;
my $rows = 0;
while (time < $deadline)
{
	$rows = $node->safe_psql('postgres', 'SELECT count(*) FROM points.ledger');
	last if $rows >= 20 * $nclients && time - $t0 >= $load_secs;
	usleep(200_000);
}
note sprintf('%d ledger rows after %.1fs of load', $rows, time - $t0);

# ---- crash -----------------------------------------------------------------
sub pid_state
{
	my ($pid) = @_;
	open my $fh, '<', "/proc/$pid/stat" or return undef;
	my $stat = <$fh>;
	close $fh;
	return undef unless defined $stat && $stat =~ /^\d+ \(.*\) (\S) (\d+)/s;
	return ($1, $2);
}

sub children_of
{
	my ($parent) = @_;
	my @kids;
	opendir my $d, '/proc' or die $!;
	foreach my $pid (grep { /^\d+$/ } readdir $d)
	{
		my ($state, $ppid) = pid_state($pid);
		push @kids, $pid if defined $ppid && $ppid == $parent && $state ne 'Z';
	}
	closedir $d;
	return @kids;
}

open my $pidfile, '<', $node->data_dir . '/postmaster.pid' or die $!;
my $pm = <$pidfile>;
chomp $pm;
close $pidfile;

my $log_offset = -s $node->logfile;
kill 'STOP', $pm or die "cannot stop postmaster $pm: $!";
my %frozen;
for (my $round = 0; $round < 100; $round++)
{
	my @new = grep { !$frozen{$_} } children_of($pm);
	last unless @new;
	kill 'STOP', @new;
	$frozen{$_} = 1 foreach @new;
}
my @kids = sort { $a <=> $b } keys %frozen;
note 'killing postmaster ' . $pm . ' and its children ' . join(' ', @kids);
cmp_ok(scalar(@kids), '>', $nclients, "the server had a backend for each client, and more children");
$node->kill9;
kill 'KILL', @kids;

# wait until they are all gone
waitpid($_, 0) foreach ($pm, @kids);	# only reaps our own children
my $gone = 0;
my @zombies;
while (time < $deadline)
{
	waitpid($_, WNOHANG) foreach @kids;	# orphans that came to us
	my @left = grep {
		my ($s) = pid_state($_);
		defined $s && $s ne 'Z'
	} ($pm, @kids);
	@zombies = grep { defined((pid_state($_))[0]) } ($pm, @kids);
	$gone = !@left;
	last if $gone;
	usleep(50_000);
}
ok($gone, 'the postmaster and its children are dead');

# A real crash leaves no process at all; a zombie postmaster, as a PID 1 that
# does not reap leaves it, answers kill(pid, 0) like a live one.
if (grep { $_ == $pm } @zombies)
{
	note "postmaster $pm is a zombie: removing its lock files";
	unlink $node->data_dir . '/postmaster.pid';
	unlink $node->host . '/.s.PGSQL.' . $node->port . '.lock';
}

my %acked;		# key => tx_id, from the clients' outputs
my %in_flight;	# client => the index of the call it was cut off in
my %sqlstates;
foreach my $c (1 .. $nclients)
{
	my $h = $clients[ $c - 1 ];
	eval { $h->finish; };
	my $out = slurp_file("$dir/c$c.out");
	my $err = slurp_file("$dir/c$c.err");
	my $n_acked = 0;
	foreach my $line (split /\n/, $out)
	{
		my ($key, $tx, $replayed) = split /\|/, $line;
		next unless defined $replayed;
		if (defined $acked{$key} && $acked{$key} ne $tx)
		{
			fail("key $key was acknowledged with tx $acked{$key} and with tx $tx");
		}
		$acked{$key} = $tx;
		$n_acked++;
	}
	# psql:FILE:LINE: ... -- line 1 is \set, call i is on line i + 1
	foreach my $line (split /\n/, $err)
	{
		$sqlstates{$2}++ if $line =~ /^psql:[^:]*:(\d+): ERROR:\s+(\w{5})\s*$/;
		$in_flight{$c} = $1 - 1
		  if $line =~ /^psql:[^:]*:(\d+): .*connection to server was lost/;
	}
	ok(defined $in_flight{$c},
		"client $c was cut off by the crash ($n_acked calls acknowledged)")
	  or diag "client $c stderr:\n$err";
}
note 'errors of the calls before the crash: '
  . join(', ', map { "$_ x $sqlstates{$_}" } sort keys %sqlstates);
my @unexpected = grep { !/^(PT001|PT003|22004|55P03)$/ } keys %sqlstates;
is(join(',', sort @unexpected), '',
	'calls failed only with expected errors (PT001, PT003, 22004 for a cancel of a failed call, 55P03)');
cmp_ok(scalar(keys %acked), '>', 0, scalar(keys %acked) . ' calls were acknowledged before the crash');

# ---- restart, crash recovery -------------------------------------------------
$node->start;
$node->wait_for_log(qr/database system was not properly shut down; automatic recovery in progress/,
	$log_offset);
pass('the server restarted with crash recovery');
ok($node->poll_query_until('postgres', 'SELECT true'), 'the server accepts connections');

is( $node->safe_psql(
		'postgres', q{
		SELECT count(*) FROM pg_locks l
		WHERE l.locktype = 'advisory'
		  AND l.pid NOT IN (SELECT pid FROM pg_stat_activity
		                    WHERE backend_type <> 'client backend')}),
	'0',
	'no advisory lock is left over');
is($node->safe_psql('postgres', 'SELECT count(*) FROM pg_prepared_xacts'),
	'0', 'no prepared transaction');

# every acknowledged call is in the ledger, with the tx_id its client got
my $values = join(",\n", map { "('$_', $acked{$_})" } sort keys %acked);
is( $node->safe_psql(
		'postgres', qq{
		SELECT coalesce(string_agg(a.k || ' ' || a.tx, ', '), '')
		FROM (VALUES $values) a(k, tx)
		WHERE NOT EXISTS (SELECT 1 FROM points.ledger l
		                  WHERE l.idempotency_key = a.k AND l.tx_id = a.tx)
		  AND NOT EXISTS (SELECT 1 FROM points.ledger_archive l
		                  WHERE l.idempotency_key = a.k AND l.tx_id = a.tx)}),
	'',
	'every acknowledged call is in the ledger with its tx_id');

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
	'one outbox row per ledger row, with its user_seq' => q{
		SELECT (SELECT count(*) FROM points.ledger l
		        WHERE NOT EXISTS (SELECT 1 FROM points.outbox o
		                          WHERE o.id = l.tx_id
		                            AND (o.payload->>'user_seq')::int8 = l.user_seq))
		     + (SELECT count(*) FROM points.outbox o
		        WHERE NOT EXISTS (SELECT 1 FROM points.ledger l WHERE l.tx_id = o.id)
		          AND NOT EXISTS (SELECT 1 FROM points.ledger_archive l WHERE l.tx_id = o.id))},
	'the last ledger row of each account has its balance' => q{
		SELECT count(*) FROM points.account a
		WHERE a.balance <> coalesce((SELECT l.balance_after FROM points.ledger l
		                             WHERE l.user_id = a.user_id
		                             ORDER BY l.user_seq DESC LIMIT 1), a.balance)},
	'each key is applied at most once' => q{
		SELECT count(*) - count(DISTINCT (user_id, idempotency_key))
		FROM (SELECT user_id, idempotency_key FROM points.ledger
		      UNION ALL SELECT user_id, idempotency_key FROM points.ledger_archive) k
		WHERE idempotency_key IS NOT NULL},
	'use_lot agrees with the ledger' => q{
		SELECT count(*) FROM points.ledger l
		WHERE l.kind = 'use'
		  AND -l.amount - coalesce((SELECT sum(c.amount) FROM points.ledger c
		                            WHERE c.cancels_tx = l.tx_id), 0)
		      <> coalesce((SELECT sum(u.taken - u.restored) FROM points.use_lot u
		                   WHERE u.use_tx = l.tx_id), 0)},
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
check_invariants('after recovery');

# the call each client had in flight: retried twice, applied at most once
my ($applied, $replayed, $failed) = (0, 0, 0);
foreach my $c (1 .. $nclients)
{
	my $i = $in_flight{$c} or next;
	my $call = $calls[$c][ $i - 1 ] or next;
	my ($rc, $out, $err) =
	  $node->psql('postgres', "\\set VERBOSITY sqlstate\n$call->{sql}");
	if ($rc != 0)
	{
		like($err, qr/ERROR:\s+(PT001|PT003|22004)\s*$/,
			"client $c: its in-flight call $call->{key} fails on retry for a business reason");
		is( $node->safe_psql(
				'postgres', qq{SELECT count(*) FROM points.ledger
				WHERE user_id = $call->{user} AND idempotency_key = '$call->{key}'}),
			'0',
			"client $c: ... and it had not committed before the crash");
		$failed++;
		next;
	}
	my ($key, $tx, $rep) = split /\|/, $out;
	$rep eq 't' ? $replayed++ : $applied++;
	is($node->safe_psql('postgres', $call->{sql}),
		"$key|$tx|t", "client $c: its in-flight call $call->{key} replays on a second retry");
}
note "in-flight calls on retry: $applied applied now, $replayed had committed, $failed failed";

# every acknowledged call, retried, replays with the same tx_id
my $retry_sql = '';
my %want;
foreach my $c (1 .. $nclients)
{
	foreach my $call (@{ $calls[$c] })
	{
		next if $call->{repeat} || !defined $acked{ $call->{key} };
		$retry_sql .= $call->{sql} . "\n";
		$want{ $call->{key} } = "$call->{key}|$acked{ $call->{key} }|t";
	}
}
my $got = $node->safe_psql('postgres', $retry_sql);
my @wrong = grep { ($want{ (split /\|/)[0] } // '') ne $_ } split /\n/, $got;
my @got = split /\n/, $got;
is(scalar(@got), scalar(keys %want),
	'every acknowledged call answers its retry');
is(join("\n", @wrong), '', 'every acknowledged call replays with its tx_id');

# the server keeps working
foreach my $u (@hot, 999)
{
	is( $node->safe_psql(
			'postgres', qq{SET points.lock_timeout = '1s';
			SELECT kind, replayed FROM points.earn($u, 5, 'after-crash-$u')}),
		'earn|f',
		"a new earn of user $u succeeds");
}
is( $node->safe_psql(
		'postgres', q{SELECT kind, amount, replayed FROM points.use(1, 3, 'after-crash-use')}),
	'use|-3|f',
	'a new use succeeds');
check_invariants('at the end');

$node->stop;
done_testing();
