# 011_pg_cron.pl
#
# Without the preload (shared_preload_libraries = 'pg_cron' only) the SQL
# API works and pg_cron does the worker's jobs, scheduled as the README
# shows them:
#   - 'points-expire', every minute, SELECT points.expire_due(): due lots
#     get their expire transactions (pg_cron 1.4 ticks once a minute, so
#     this waits up to ~70 s);
#   - 'points-archive', every minute, SELECT points.archive(), with
#     points.archive_after = 0 set by ALTER SYSTEM (after LOAD 'points':
#     without the preload the session must know the library's settings);
#   - 'points-verify', nightly, a DO block that raises when points.verify()
#     returns a row: the command succeeds on a consistent ledger and fails
#     once an account is damaged; a copy scheduled every minute shows it
#     succeed through pg_cron.
use strict;
use warnings;

use PostgreSQL::Test::Cluster;
use PostgreSQL::Test::Utils;
use Test::More;
use Time::HiRes qw(usleep time);

my $t_start = time;

my $node = PostgreSQL::Test::Cluster->new('pg_cron');
$node->init;
# pg_cron's jobs connect with libpq to cron.host: the node's socket directory
my $host = $node->host;
$node->append_conf(
	'postgresql.conf', qq{
shared_preload_libraries = 'pg_cron'
cron.database_name = 'postgres'
cron.host = '$host'
});
$node->start;

sub sql { return $node->safe_psql('postgres', $_[0]); }

sql('CREATE EXTENSION pg_cron');
sql('CREATE EXTENSION points');

is(sql(q{SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'points worker'}),
	'0', 'no points worker without the preload');
is(sql('SELECT worker_pid IS NULL FROM points.worker_status'), 't',
	'worker_status.worker_pid is NULL');

# archive_after is suset: set for every session through the config file.
# (Without the preload, ALTER SYSTEM SET points.* fails with "unrecognized
# configuration parameter" unless the session has loaded the library: LOAD
# 'points' first.)
sql(q{LOAD 'points'; ALTER SYSTEM SET points.archive_after = 0; SELECT pg_reload_conf()});

# lots that expire in a second, and one that never does
my @lots;
foreach my $u (1 .. 3)
{
	push @lots,
	  sql(qq{SELECT tx_id FROM points.earn($u, 10 * $u, 'x$u',
		expires_at => clock_timestamp() + interval '1 second')});
}
sql(q{SELECT points.earn(4, 500, 'keep', expires_at => 'infinity')});

my $expire_job = sql(
	q{SELECT cron.schedule('points-expire', '* * * * *', 'SELECT points.expire_due()')});
my $archive_job = sql(
	q{SELECT cron.schedule('points-archive', '* * * * *', 'SELECT points.archive()')});
my $verify_cmd =
  q{DO $d$ BEGIN IF EXISTS (SELECT FROM points.verify()) THEN RAISE EXCEPTION 'points.verify() found inconsistent accounts'; END IF; END $d$};
# quoted with $job$ as the README shows it (with $$ the string would end at
# the "$$" of "$d$$$", a syntax error)
my $verify_job =
  sql(qq{SELECT cron.schedule('points-verify', '17 3 * * *', \$job\$$verify_cmd\$job\$)});
# the same verify command every minute, to see it succeed through pg_cron
my $verify_now_job =
  sql(qq{SELECT cron.schedule('points-verify-now', '* * * * *', \$job\$$verify_cmd\$job\$)});
like($expire_job, qr/^\d+$/, 'cron.schedule points-expire');
is( sql(q{SELECT string_agg(jobname || ' ' || schedule || ' ' || command, E'\n' ORDER BY jobname)
	FROM cron.job}),
	"points-archive * * * * * SELECT points.archive()\n"
	  . "points-expire * * * * * SELECT points.expire_due()\n"
	  . "points-verify 17 3 * * * $verify_cmd\n"
	  . "points-verify-now * * * * * $verify_cmd",
	'cron.job has the jobs as scheduled');

# the tick is once a minute: wait for a succeeded run that expired the lots
# (up to two ticks, if the first came before the lots were due)
my $expired_sql = q{SELECT (SELECT count(*) FROM points.ledger WHERE kind = 'expire')
	+ (SELECT count(*) FROM points.ledger_archive WHERE kind = 'expire')};
my $deadline = time + 125;
my $ok = 0;
while (time < $deadline)
{
	if (sql(qq{SELECT EXISTS (SELECT FROM cron.job_run_details
		WHERE jobid = $expire_job AND status = 'succeeded')
		AND ($expired_sql) = 3}) eq 't')
	{
		$ok = 1;
		last;
	}
	usleep(500_000);
}
ok($ok, 'pg_cron ran points.expire_due() and the lots expired');
note sprintf('expired by pg_cron after %.1fs', time - $t_start);
like( sql(q{SELECT string_agg(status || ': ' || return_message, ',') FROM cron.job_run_details
	WHERE jobid = } . $expire_job),
	qr/^succeeded: 1 row(,succeeded: 1 row)*$/, 'job_run_details: points-expire succeeded');
is( sql(q{SELECT string_agg(g.user_id || ':' || g.amount || ':' || (g.metadata->'lots')::text, ','
	ORDER BY g.user_id) FROM (SELECT * FROM points.ledger UNION ALL
	SELECT * FROM points.ledger_archive) g WHERE g.kind = 'expire'}),
	qq{1:-10:[{"amount": 10, "lot_id": $lots[0]}],2:-20:[{"amount": 20, "lot_id": $lots[1]}],}
	  . qq{3:-30:[{"amount": 30, "lot_id": $lots[2]}]},
	'one expire transaction per user, with its lot and amount');
is( sql(q{SELECT string_agg(points.balance(u)::text, ',' ORDER BY u) FROM generate_series(1, 4) u}),
	'0,0,0,500', 'balances');
is(sql(q{SELECT count(*) FROM points.lot WHERE remaining > 0 AND expires_at <= now()}),
	'0', 'no due lot left');
is(sql(q{SELECT count(*) FROM points.outbox WHERE type = 'points.expired'}), '3',
	'an outbox event per expired lot');

# the archive job ran in the same tick (before or after the expire job)
ok( $node->poll_query_until(
		'postgres', qq{SELECT EXISTS (SELECT FROM cron.job_run_details
		WHERE jobid = $archive_job AND status = 'succeeded')
		AND (SELECT count(*) FROM points.ledger_archive) > 0}),
	'pg_cron ran points.archive() and it archived rows');
is( sql(q{SELECT string_agg(kind, ',' ORDER BY user_seq) FROM points.history(2)}),
	'earn,expire', 'history across ledger and archive');
is(sql('SELECT count(*) FROM points.verify()'), '0', 'verify() empty');
ok( $node->poll_query_until(
		'postgres', qq{SELECT EXISTS (SELECT FROM cron.job_run_details
		WHERE jobid = $verify_now_job AND status = 'succeeded')}),
	'pg_cron ran the verify command and it succeeded');
is( sql(qq{SELECT count(*) FROM cron.job_run_details
	WHERE jobid IN ($expire_job, $archive_job, $verify_now_job) AND status <> 'succeeded'}),
	'0', 'no failed run');
sql(q{SELECT cron.unschedule('points-verify-now')});

# the nightly verify: run its command as pg_cron would
my ($ret, $stdout, $stderr) = $node->psql('postgres', $verify_cmd);
is($ret, 0, 'verify command succeeds on a consistent ledger');
is($stderr, '', 'and raises nothing');

sql('UPDATE points.account SET balance = balance + 1 WHERE user_id = 4');
is(sql('SELECT user_id FROM points.verify()'), '4', 'damaged account 4');
($ret, $stdout, $stderr) = $node->psql('postgres', $verify_cmd);
isnt($ret, 0, 'verify command fails on a damaged account');
like($stderr, qr/ERROR:  points\.verify\(\) found inconsistent accounts/,
	'with the exception it raises');
sql('UPDATE points.account SET balance = balance - 1 WHERE user_id = 4');
($ret, $stdout, $stderr) = $node->psql('postgres', $verify_cmd);
is($ret, 0, 'and succeeds again once repaired');

is( sql(q{SELECT count(cron.unschedule(jobname)) FROM cron.job
	WHERE jobname IN ('points-expire', 'points-archive', 'points-verify')}),
	'3', 'cron.unschedule');

$node->stop('fast');
note sprintf('done after %.1fs', time - $t_start);

done_testing();
