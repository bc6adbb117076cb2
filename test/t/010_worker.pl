# 010_worker.pl
#
# The background worker's lifecycle, with shared_preload_libraries = 'points':
#   1. it starts, shows in pg_stat_activity (backend_type 'points worker');
#      before CREATE EXTENSION it logs "not installed" exactly once and waits
#      (same pid: no crash loop); after CREATE EXTENSION it is the
#      worker_pid of points.worker_status;
#   2. points expire with nobody calling expire_due (expire_interval = 1s in
#      postgresql.conf): expire rows, their outbox events, balance 0,
#      worker_status.expire_total_lots, verify() empty;
#   3. a reload changes the interval: at 1h nothing expires, after
#      ALTER SYSTEM SET points.expire_interval = '1s' + reload it does;
#   4. the worker archives (archive_after = 0, archive_interval = 1s);
#   5. kill -9: with expire_interval = 1h, a backlog of 20000 due lots of
#      5000 users; the worker is killed (the postmaster restarts everything)
#      and the new worker starts a run at once; it is killed again in the
#      middle of that run; the next worker finishes the backlog (still at
#      1h: it resumes at its start, nobody else expires anything); every lot
#      expired exactly once, none skipped, verify() empty, and
#      worker_status.expire_total_lots counts them all across the crashes;
#   6. a new points.database on reload restarts the worker in that database;
#   7. pg_terminate_backend() of the worker: it is started again;
#   8. a long queue run (a 300,000-request campaign) is cut into slices:
#      a lot due meanwhile is expired before the campaign's last batch;
#   9. SIGTERM at shutdown (stop fast) is clean: "points worker stopping",
#      no "terminated by signal", no exit code other than 1.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep time);

my $t_start = time;

my $node = PostgreSQL::Test::Cluster->new('worker');
$node->init;
$node->append_conf(
	'postgresql.conf', qq{
shared_preload_libraries = 'points'
restart_after_crash = on
log_statement = none
points.expire_interval = '1s'
points.archive_interval = '1h'
});
$node->start;

# pid of the points worker connected to $db ('' if none)
sub worker_pid
{
	my ($db) = @_;
	$db //= 'postgres';
	return $node->safe_psql('postgres',
		qq{SELECT coalesce(min(pid)::text, '') FROM pg_stat_activity
		   WHERE backend_type = 'points worker' AND datname = '$db'});
}

# wait until a points worker other than $old runs in $db; return its pid
sub wait_new_worker
{
	my ($old, $db, $what) = @_;
	$db //= 'postgres';
	ok( $node->poll_query_until(
			'postgres', qq{
		SELECT count(*) = 1 FROM pg_stat_activity
		WHERE backend_type = 'points worker' AND datname = '$db'
		  AND pid <> $old}),
		$what);
	return worker_pid($db);
}

# bounded wait, in seconds, for $query to return 't'
sub wait_until
{
	my ($query, $what, $db) = @_;
	$db //= 'postgres';
	ok($node->poll_query_until($db, $query), $what);
	return;
}

sub sql { return $node->safe_psql('postgres', $_[0]); }

sub note_time { note sprintf("%s at %.1fs", $_[0], time - $t_start); return; }

# ---- 1. visible; waits for CREATE EXTENSION, logs once, no crash loop ----

$node->poll_query_until('postgres',
	q{SELECT count(*) = 1 FROM pg_stat_activity WHERE backend_type = 'points worker'})
  or die 'the points worker did not show in pg_stat_activity';
my $pid = worker_pid();
like($pid, qr/^\d+$/, 'worker visible in pg_stat_activity as "points worker"');
is(sql(q{SELECT datname FROM pg_stat_activity WHERE backend_type = 'points worker'}),
	'postgres', 'worker connected to points.database (default postgres)');

my $not_installed =
  qr/points worker: extension "points" is not installed in database "postgres"/;
$node->wait_for_log($not_installed);
# the worker looks again every 5 s: wait long enough for a second look
sleep 7;
my $log = slurp_file($node->logfile);
my $count = () = $log =~ /$not_installed/g;
is($count, 1, '"not installed" logged exactly once');
is(worker_pid(), $pid, 'worker waits without restarting (same pid)');
unlike($log, qr/"points worker" \(PID \d+\) (?:terminated by signal|exited with exit code)/,
	'no worker crash or exit while waiting');
note_time('waited for the extension');

sql('CREATE EXTENSION points');
wait_until(qq{SELECT worker_pid = $pid FROM points.worker_status},
	'worker_status.worker_pid is the worker');

# ---- 2. points expire by themselves ----

my $e1 = sql(q{SELECT tx_id FROM points.earn(1, 100, 'e1',
	expires_at => clock_timestamp() + interval '1 second')});
my $e2 = sql(q{SELECT tx_id FROM points.earn(2, 30, 'e2',
	expires_at => clock_timestamp() + interval '1 second')});
sql(q{SELECT points.earn(2, 50, 'e3', expires_at => 'infinity')});
wait_until(
	q{SELECT count(*) = 2 FROM points.ledger WHERE kind = 'expire'},
	'worker wrote the expire transactions (nobody called expire_due)');
is( sql(qq{SELECT string_agg(user_id || ':' || amount || ':' || (metadata->'lots')::text, ',' ORDER BY user_id)
	FROM points.ledger WHERE kind = 'expire'}),
	qq{1:-100:[{"amount": 100, "lot_id": $e1}],2:-30:[{"amount": 30, "lot_id": $e2}]},
	'expire rows: the lots, their amounts');
is(sql('SELECT points.balance(1) || \',\' || points.balance(2)'), '0,50', 'balances after expiry');
is(sql('SELECT balance FROM points.account WHERE user_id = 1'), '0',
	'account balance 0 (stored, not just computed)');
is(sql(q{SELECT count(*) FROM points.outbox WHERE type = 'points.expired'}), '2',
	'an outbox event per expire transaction');
wait_until(q{SELECT expire_total_lots = 2 AND expire_last_run IS NOT NULL
	FROM points.worker_status}, 'worker_status.expire_total_lots counts them');
is(sql('SELECT count(*) FROM points.verify()'), '0', 'verify() empty');
note_time('expiry');

# ---- 3. a reload changes the interval ----

$node->append_conf('postgresql.conf', "points.expire_interval = '1h'\n");
$node->reload;
sleep 1;    # the worker has taken the reload (SIGHUP sets its latch)
my $e4 = sql(q{SELECT tx_id FROM points.earn(3, 40, 'e4',
	expires_at => clock_timestamp() + interval '1 second')});
sleep 4;
is(sql(q{SELECT count(*) FROM points.ledger WHERE kind = 'expire' AND user_id = 3}), '0',
	'expire_interval = 1h: nothing expired after 4 s');
is(sql(qq{SELECT remaining FROM points.lot WHERE lot_id = $e4}), '40',
	'the due lot still holds its points');
is(sql('SELECT points.balance(3)'), '0', 'but they are not spendable (exact expiry)');
is(sql('SELECT expire_backlog FROM points.worker_status'), '1',
	'worker_status.expire_backlog shows the due lot');

my $t_reload = time;
sql(q{ALTER SYSTEM SET points.expire_interval = '1s'});
sql('SELECT pg_reload_conf()');
wait_until(q{SELECT count(*) = 1 FROM points.ledger WHERE kind = 'expire' AND user_id = 3},
	'after ALTER SYSTEM SET points.expire_interval = 1s and reload, it expires');
note sprintf('expired %.1fs after the reload', time - $t_reload);
ok(time - $t_reload < 10, 'expired within seconds of the reload');
wait_until(q{SELECT expire_backlog = 0 AND expire_total_lots = 3 FROM points.worker_status},
	'worker_status: backlog 0, 3 lots in all');
is(worker_pid(), $pid, 'a reload does not restart the worker');
note_time('reload');

# ---- 4. archiving by the worker ----

my $nrows = sql('SELECT count(*) FROM points.ledger');
is(sql('SELECT archive_total_rows FROM points.worker_status'), '0', 'nothing archived yet');
sql(q{ALTER SYSTEM SET points.archive_after = 0});
sql(q{ALTER SYSTEM SET points.archive_interval = '1s'});
sql('SELECT pg_reload_conf()');
wait_until(qq{SELECT (SELECT count(*) FROM points.ledger) = 0
	AND (SELECT count(*) FROM points.ledger_archive) = $nrows},
	"the worker archived all $nrows ledger rows");
wait_until(qq{SELECT archive_total_rows = $nrows AND archive_last_run IS NOT NULL
	AND archive_backlog = 0 FROM points.worker_status},
	'worker_status: archive_total_rows, archive_backlog 0');
is(sql(q{SELECT string_agg(kind, ',' ORDER BY user_seq) FROM points.history(2)}),
	'earn,earn,expire', 'history reads the archive');
is(sql('SELECT count(*) FROM points.verify()'), '0', 'verify() empty after archiving');
sql(q{ALTER SYSTEM RESET points.archive_after});
sql(q{ALTER SYSTEM SET points.archive_interval = '1h'});
note_time('archive');

# ---- 5. kill -9, twice: resume where it stopped, each lot exactly once ----

sql(q{ALTER SYSTEM SET points.expire_interval = '1h'});
sql('SELECT pg_reload_conf()');
sleep 1;
# enough lots that the new worker's run over them lasts about a second
# (120,000 lots in batches of 1,000 users; 40,000 were once done before the
# test could see the run)
my $nusers = 30000;
my $lots_per_user = 4;
my $nlots = $nusers * $lots_per_user;
# one transaction locks every user it writes: at most 500 users each
for (my $u = 100001; $u <= 100000 + $nusers; $u += 500)
{
	my $last = $u + 499;
	sql(qq{SELECT count(points.earn(u, 10, expires_at => clock_timestamp() + interval '1 second'))
		FROM generate_series($u, $last) u, generate_series(1, $lots_per_user) i});
}
note_time("created $nlots lots of $nusers users");
wait_until(qq{SELECT expire_backlog = $nlots FROM points.worker_status},
	"backlog of $nlots due lots, not expired (interval 1h)");

# kill 1, the idle worker: the next one starts with a run
my $log_offset = -s $node->logfile;
kill 'KILL', $pid;
$node->wait_for_log(qr/terminated by signal 9/, $log_offset);
note_time('kill 1');

# kill 2, in the middle of that run: lots of earlier batches committed, and
# the new worker inside expire_due.  Watched from the moment the first one
# died: the run starts as soon as the new worker does.
my $killed = 0;
my $done_at_kill = 0;
my $pid2 = '';
my $deadline = time + 60;
while (time < $deadline)
{
	# the server restarts after the kill (crash recovery): until it takes
	# connections again, look again
	my ($r, $err) = ('', '');
	my $rc = $node->psql(
		'postgres', qq{
		SELECT (SELECT coalesce(sum(jsonb_array_length(metadata->'lots')), 0)
		        FROM points.ledger WHERE kind = 'expire' AND user_id > 100000)
		    || ',' || coalesce((SELECT min(pid) FROM pg_stat_activity
		                        WHERE backend_type = 'points worker' AND state = 'active'
		                          AND query = 'points: expire_due' AND pid <> $pid)::text, '')},
		stdout => \$r, stderr => \$err);
	if ($rc != 0)
	{
		usleep(20_000);
		next;
	}
	my ($done, $busy) = split /,/, $r, -1;
	if ($done > 0 && $done < $nlots && $busy ne '')
	{
		$pid2 = $busy;
		kill 'KILL', $busy;
		$killed = 1;
		$done_at_kill = $done;
		note "killed worker $busy in expire_due, $done lots already expired";
		last;
	}
	last if $done >= $nlots;
	usleep(5_000);
}
ok($pid2 ne '', 'after kill -9 the worker comes back and starts with a run');
isnt($pid2, $pid, 'with a new pid');
note_time('restart 1');
ok($killed, 'worker killed in the middle of working off the backlog');
my $pid3 = wait_new_worker($pid2 || $pid, 'postgres', 'the worker comes back again');
# the new worker may already be finishing the backlog (its first run
# starts at once): what counts is that nothing committed before the kill
# was lost, and (below) that every lot expired exactly once
my $partial = sql(q{SELECT coalesce(sum(jsonb_array_length(metadata->'lots')), 0)
	FROM points.ledger WHERE kind = 'expire' AND user_id > 100000});
ok($partial >= $done_at_kill,
	"the batches committed before the kill survived it ($partial >= $done_at_kill of $nlots)");
note_time('restart 2');

# still expire_interval = 1h: only the new worker's first run can finish it
wait_until(q{SELECT expire_backlog = 0 FROM points.worker_status},
	'the new worker works off the rest of the backlog at its start');
note_time('backlog worked off');
is( sql(q{SELECT count(*) FROM (
	SELECT x->>'lot_id' FROM points.ledger, jsonb_array_elements(metadata->'lots') x
	WHERE kind = 'expire' GROUP BY 1 HAVING count(*) > 1) d}),
	'0', 'no lot expired twice');
is( sql(qq{SELECT count(*) FROM points.lot l WHERE l.user_id > 100000
	AND (l.remaining <> 0 OR (SELECT count(*) FROM points.ledger g,
	      jsonb_array_elements(g.metadata->'lots') x
	      WHERE g.kind = 'expire' AND g.user_id = l.user_id
	        AND x->>'lot_id' = l.lot_id::text AND (x->>'amount')::bigint = l.amount) <> 1)}),
	'0', 'every lot expired exactly once, with its amount (none skipped)');
is( sql(q{SELECT count(*) FROM points.ledger g WHERE kind = 'expire' AND user_id > 100000
	AND -amount <> (SELECT sum((x->>'amount')::bigint) FROM jsonb_array_elements(metadata->'lots') x)}),
	'0', "each expire transaction's amount is the sum of its lots'");
is(sql(q{SELECT count(*) FROM points.ledger WHERE kind = 'expire' AND user_id > 100000}),
	$nusers, "the lots a user had due together expired together: $nusers transactions for $nlots lots");
is( sql(q{SELECT count(*) FROM points.account WHERE user_id > 100000
	AND (balance <> 0 OR (last_seq, last_seq) <> (SELECT count(*), max(user_seq) FROM points.ledger g
	                                              WHERE g.user_id = account.user_id))}),
	'0', 'every account: balance 0, user_seq gapless over its earns and expires');
is( sql(q{SELECT count(*) FROM points.ledger l WHERE l.user_id > 100000
	AND NOT EXISTS (SELECT FROM points.outbox o WHERE o.id = l.tx_id)}),
	'0', 'an outbox event per ledger row');
is(sql('SELECT count(*) FROM points.verify()'), '0', 'verify() empty');
note 'worker_status after the crashes: '
  . sql(q{SELECT expire_total_lots || ' lots in all, last run ' || expire_last_lots
	FROM points.worker_status});
# totals move in the batch's own transaction, so a killed run loses none
is(sql('SELECT expire_total_lots FROM points.worker_status'),
	sql(q{SELECT sum(jsonb_array_length(metadata->'lots')) FROM (
		SELECT kind, metadata FROM points.ledger UNION ALL
		SELECT kind, metadata FROM points.ledger_archive) g WHERE kind = 'expire'}),
	'worker_status.expire_total_lots counts every expired lot, across crashes');

# ---- 6. a new points.database restarts the worker there ----

sql('CREATE DATABASE db2');
$node->safe_psql('db2', 'CREATE EXTENSION points');
sql(q{ALTER SYSTEM SET points.database = 'db2'});
sql(q{ALTER SYSTEM SET points.expire_interval = '1s'});
$log_offset = -s $node->logfile;
sql('SELECT pg_reload_conf()');
$node->wait_for_log(
	qr/points worker: points.database changed from "postgres" to "db2", restarting/,
	$log_offset);
my $pid4 = wait_new_worker($pid3, 'db2', 'the worker restarts connected to db2');
$node->wait_for_log(qr/points worker started for database "db2"/, $log_offset);
is(worker_pid('postgres'), '', 'no worker left in postgres');
is($node->safe_psql('db2', 'SELECT worker_pid FROM points.worker_status'), $pid4,
	'db2: worker_status.worker_pid');
is(sql('SELECT worker_pid IS NULL FROM points.worker_status'), 't',
	'postgres: worker_status.worker_pid is NULL');
$node->safe_psql('db2', q{SELECT points.earn(9, 70,
	expires_at => clock_timestamp() + interval '1 second')});
wait_until(q{SELECT count(*) = 1 FROM points.ledger WHERE kind = 'expire' AND user_id = 9},
	'the worker expires in db2', 'db2');
ok(!$node->log_contains(qr/terminated by signal/, $log_offset),
	'the switch was a restart, not a crash');
note_time('database switch');

# ---- 7. pg_terminate_backend() of the worker: the postmaster starts it again ----

$log_offset = -s $node->logfile;
$node->safe_psql('db2', 'SELECT pg_terminate_backend(worker_pid) FROM points.worker_status');
my $pid5 = wait_new_worker($pid4, 'db2', 'a terminated worker is started again');
ok(!$node->log_contains(qr/terminated by signal/, $log_offset),
	'a terminated worker exits cleanly, it does not crash');

# ---- 8. a long run is cut into slices: the other jobs go on meanwhile ----

# A campaign of 300,000 queued earns takes the worker several seconds (at
# least 2 s slices); a lot that expires one second after the campaign's
# commit is expired by the worker (expire_interval = 1s) before the last
# request of the campaign is applied.
$node->safe_psql('db2',
	q{SELECT count(points.earn_async(u, 10)) FROM generate_series(100001, 400000) u});
$node->safe_psql('db2', q{SELECT points.earn(8, 70,
	expires_at => clock_timestamp() + interval '1 second')});
wait_until(q{SELECT count(*) = 1 FROM points.ledger WHERE kind = 'expire' AND user_id = 8},
	'the lot expires while the campaign is applied', 'db2');
wait_until(q{SELECT queue_depth = 0 FROM points.worker_status},
	'the campaign is applied', 'db2');
is( $node->safe_psql(
		'db2', q{
	SELECT (SELECT created_at FROM points.ledger WHERE kind = 'expire' AND user_id = 8)
	     < (SELECT max(applied_at) FROM points.request WHERE user_id > 100000)}),
	't', "the expiry ran before the campaign's last batch (the queue run was sliced)");
is($node->safe_psql('db2', 'SELECT count(*) FROM points.verify()'), '0',
	'db2: verify() empty after the campaign');
note_time('slices');

# ---- 9. SIGTERM at shutdown is clean ----

$log_offset = -s $node->logfile;
$node->stop('fast');
my $tail = slurp_file($node->logfile, $log_offset);
like($tail, qr/points worker stopping/, 'the worker logs "points worker stopping"');
unlike($tail, qr/terminated by signal/, 'no process terminated by a signal');
unlike($tail, qr/"points worker" \(PID \d+\) exited with exit code [^1]/,
	'the worker exited with code 1 (restart unless shutting down), nothing else');
like($tail, qr/database system is shut down/, 'the server shut down');
note_time('done');

done_testing();
