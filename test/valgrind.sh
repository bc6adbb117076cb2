#!/bin/bash
#
# test/valgrind.sh: the pg_regress files (sql/*.sql) against a server run
# under valgrind's memcheck, with the worker preloaded.  Fails when valgrind
# reports an error in the extension's code (an invalid read or write, a jump
# on an uninitialised value, a bad free, uninitialised bytes it passes on):
# one whose first frames, or those of the uninitialised value's origin, are
# in src/*.c.  Errors of the server alone (it writes uninitialised padding
# to WAL and files, which its own suppression file hides) are counted but
# not judged.
#
#   bash test/valgrind.sh               every regress file (4-5 minutes here)
#   bash test/valgrind.sh earn queue    only these
#
# The worker runs in the regress database (points.database), its jobs every
# second or so, so its code is checked too.  test/all.sh runs this as the
# suite "valgrind".  Debian's PostgreSQL is not built with USE_VALGRIND: an
# overrun inside a palloc'd block, or a read of a recycled palloc chunk, is
# not seen; what is: errors at malloc level, and uninitialised values in
# memory fresh from malloc or the stack.  pg_regress's verdict on the
# outputs is printed, not judged (the busy worker changes some of them);
# a server that does not start, or a pg_regress that cannot run, fails.  Needs the extension installed
# (make install) and valgrind, both from scripts/setup.sh; runs as root,
# the server as user postgres.  VG_PORT (5470) moves the port; VG_KEEP=1
# keeps the logs.
#
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
port=${VG_PORT:-5470}
# PostgreSQL 15's pg_config, not whatever pg_config is first on PATH
pg_config=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
bin=$("$pg_config" --bindir)
dir=$(mktemp -d /tmp/points_vg.XXXXXX)
chown postgres "$dir"
tests=("$@")
[ ${#tests[@]} -gt 0 ] || tests=($(sed -n 's/^REGRESS *= *//p' "$here/Makefile"))

su postgres -c "$bin/initdb -D $dir/data -A trust" >/dev/null
cat >>"$dir/data/postgresql.conf" <<EOF
shared_preload_libraries = 'points'
port = $port
unix_socket_directories = '$dir'
listen_addresses = ''
max_connections = 20
jit = off
points.database = 'contrib_regression'
points.expire_interval = '1s'
points.archive_interval = '10s'
EOF

su postgres -c "valgrind --quiet --trace-children=yes --track-origins=yes \
    --error-limit=no --num-callers=40 --fullpath-after= --log-file=$dir/vg.%p.log \
    $bin/postgres -D $dir/data" >"$dir/server.log" 2>&1 &
up=0
for _ in $(seq 180); do
    "$bin/pg_isready" -q -h "$dir" -p "$port" && { up=1; break; }
    sleep 1
done
if [ "$up" != 1 ]; then
    echo "valgrind: the server did not start under valgrind; see $dir/server.log"
    tail -20 "$dir/server.log"
    exit 1
fi

# pg_regress in a copy of the tree owned by postgres (it writes results/)
cp -r "$here" "$dir/src"
chown -R postgres "$dir/src"
status=0
regress=$(dirname "$("$pg_config" --pgxs)")/../test/regress/pg_regress
su postgres -c "cd $dir/src && $regress \
    --inputdir=. --load-extension=points --host=$dir --port=$port \
    --dbname=contrib_regression ${tests[*]}" || status=$?
# exit 1: some outputs differ (not judged, see above); 2 or more: it could
# not run (no server, no database): a failure
if [ "$status" -ge 2 ]; then
    echo "valgrind: pg_regress could not run (exit $status)"
    exit 1
fi

su postgres -c "$bin/pg_ctl -D $dir/data stop -m fast" >/dev/null || true
sleep 2

# An error is ours when one of the first frames of its stack, or of the
# stack that made an uninitialised value, is in this extension's sources
# (the server's own, e.g. padding it writes to WAL, pass through the
# worker's start-up deep down and are not judged).
ours=$(ls "$here"/src/*.c | xargs -n1 basename | paste -sd'|')
logs=("$dir"/vg.*.log)
[ -f "${logs[0]}" ] || { echo "valgrind: no valgrind log in $dir"; exit 1; }
cat "${logs[@]}" | perl -e '
    my $re = qr{/src/(?:'"$ours"'):\d+\)};
    my (@blocks, $b);
    while (<STDIN>) {
        if (/^==\d+== *$/) { push @blocks, $b if defined $b; undef $b; next }
        $b .= $_;
    }
    push @blocks, $b if defined $b;
    my ($all, $n) = (0, 0);
    for my $blk (@blocks) {
        next unless $blk =~ /^==\d+== [A-Z]/m;
        $all++;
        my $hit = 0;
        for my $part (split /(?=^==\d+==\s+Uninitialised value was created)/m, $blk) {
            my @frames = grep { /^==\d+==\s+(?:at|by) 0x/ } split /\n/, $part;
            $hit = 1 if grep { $_ =~ $re } @frames[0 .. ($#frames < 3 ? $#frames : 3)];
        }
        if ($hit) { $n++; print STDERR $blk, "\n" }
    }
    print "$all $n\n";' >"$dir/counts" 2>"$dir/ours.txt"
read -r all n <"$dir/counts"
echo "valgrind: $all error(s), $n in points' code; pg_regress exit $status; logs in $dir"
if [ "$n" -gt 0 ]; then
    head -300 "$dir/ours.txt"
    exit 1
fi
[ "${VG_KEEP:-0}" = 1 ] || rm -rf "$dir"
exit 0
