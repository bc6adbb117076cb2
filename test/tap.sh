#!/bin/bash
#
# test/tap.sh: run the TAP crash tests (test/t/*.pl) with prove.
#
#   test/tap.sh                          every test/t/*.pl
#   test/tap.sh t/001_crash_backend.pl   only the tests named (t/NAME.pl,
#                                        test/t/NAME.pl, NAME.pl or NAME)
#
# The tests use PostgreSQL::Test::Cluster, which refuses to run as root.  Run
# as root, this script copies test/t to a fresh work directory owned by the
# user "postgres" (override with TAP_USER) and runs prove there as that user;
# run as any other user, it runs prove as that user.  The extension must be
# installed first (make install).  Exit status: prove's.
#
# Environment: PG_CONFIG (default pg_config, else PostgreSQL 15's), TAP_USER,
# PROVE_FLAGS (e.g. -v, --timer), PG_TEST_TIMEOUT_DEFAULT (seconds, default
# 180), TAP_KEEP=1 keeps the work directory (logs, data dirs) even on
# success; after a failure it is always kept and its path printed.  prove
# runs with a clean environment: PATH, TESTDIR, PG_REGRESS and the above, and
# every PG_TEST_* and POINTS_* variable of the caller, plus POINTS_TEST_DIR
# (this test/ directory) for tests that need files beside test/t.
#
set -u

here=$(cd "$(dirname "$0")" && pwd)
src="$here/t"

if command -v "${PG_CONFIG:-pg_config}" >/dev/null 2>&1; then
	pg_config=$(command -v "${PG_CONFIG:-pg_config}")
else
	pg_config=/usr/lib/postgresql/15/bin/pg_config
fi
bindir=$("$pg_config" --bindir)
pgxs=$(dirname "$("$pg_config" --pgxs)")/..	# .../lib/pgxs/src/makefiles/..
pgxs=$(cd "$pgxs" && pwd)					# .../lib/pgxs/src
perl_lib="$pgxs/test/perl"
pg_regress="$pgxs/test/regress/pg_regress"

for f in "$perl_lib/PostgreSQL/Test/Cluster.pm" "$pg_regress"; do
	if [ ! -e "$f" ]; then
		echo "tap.sh: $f not found (install postgresql-server-dev / the PGXS test files)" >&2
		exit 2
	fi
done
if ! perl -MIPC::Run -e 1 2>/dev/null; then
	echo "tap.sh: perl module IPC::Run missing (apt-get install libipc-run-perl)" >&2
	exit 2
fi

# the tests to run, as paths relative to the work directory
tests=()
if [ $# -eq 0 ]; then
	for f in "$src"/*.pl; do
		[ -e "$f" ] && tests+=("t/$(basename "$f")")
	done
else
	for a in "$@"; do
		name=$(basename "$a")
		case "$name" in *.pl) ;; *) name="$name.pl" ;; esac
		if [ ! -f "$src/$name" ]; then
			echo "tap.sh: no test $src/$name" >&2
			exit 2
		fi
		tests+=("t/$name")
	done
fi
if [ ${#tests[@]} -eq 0 ]; then
	echo "tap.sh: no tests in $src" >&2
	exit 2
fi

if [ "$(id -u)" -eq 0 ]; then
	run_user=${TAP_USER:-postgres}
	if ! id "$run_user" >/dev/null 2>&1; then
		echo "tap.sh: user $run_user does not exist (set TAP_USER to a non-root user)" >&2
		exit 2
	fi
else
	run_user=
fi

work=$(mktemp -d /tmp/points_tap.XXXXXX)
cp -R "$src" "$work/t"
if [ -n "$run_user" ]; then
	chown -R "$run_user" "$work"
fi
chmod 755 "$work"

# PostgreSQL::Test::Utils puts tmp_check (logs, data dirs, port locks) under
# TESTDIR; Cluster->init runs $PG_REGRESS --config-auth.
env_vars=(
	"PATH=$bindir:/usr/local/bin:/usr/bin:/bin"
	"TESTDIR=$work"
	"PG_REGRESS=$pg_regress"
	"PG_TEST_TIMEOUT_DEFAULT=${PG_TEST_TIMEOUT_DEFAULT:-180}"
	"LANG=C.UTF-8"
	"HOME=$work"
)
# passed through: PG_TEST_* (PG_TEST_NOCLEAN, ...) and POINTS_* (settings of
# individual tests, e.g. POINTS_CRASH_SEED); POINTS_TEST_DIR is this test/
# directory, for tests that need files beside test/t (they run from a copy)
while IFS= read -r var; do
	case "$var" in
		PG_TEST_TIMEOUT_DEFAULT) ;;
		PG_TEST_*|POINTS_*) env_vars+=("$var=${!var}") ;;
	esac
done < <(compgen -e)
[ -z "${POINTS_TEST_DIR:-}" ] && env_vars+=("POINTS_TEST_DIR=$here")

cmd=(env -i "${env_vars[@]}" prove ${PROVE_FLAGS:-} -I "$perl_lib" "${tests[@]}")

echo "tap.sh: running ${tests[*]} in $work${run_user:+ as $run_user}"
if [ -n "$run_user" ]; then
	(cd "$work" && runuser -u "$run_user" -- "${cmd[@]}")
else
	(cd "$work" && "${cmd[@]}")
fi
rc=$?

if [ $rc -ne 0 ] || [ -n "${TAP_KEEP:-}" ]; then
	echo "tap.sh: logs kept in $work/tmp_check/log"
else
	rm -rf "$work"
fi
exit $rc
