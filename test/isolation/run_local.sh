#!/bin/bash
# Run the isolation specs alone, in a throwaway cluster (pg_virtualenv), with
# the library preloaded as in production.  Results go to a temporary
# directory, so this never touches output_iso/ of a concurrent `make
# installcheck`.  Needs the extension installed (make install).
#
#   test/isolation/run_local.sh [--port N] [--keep] [SPEC ...]
#
# Without SPEC names every test/isolation/specs/*.spec runs.  --keep leaves
# the results directory (its path is printed) for a look at results/*.out.
set -euo pipefail
cd "$(dirname "$0")/../.."

port=5471
keep=
specs=()
while [ $# -gt 0 ]; do
	case "$1" in
		--port) port="$2"; shift 2 ;;
		--keep) keep=1; shift ;;
		-h|--help) sed -n '2,12p' "$0"; exit 0 ;;
		*) specs+=("$1"); shift ;;
	esac
done
if [ ${#specs[@]} -eq 0 ]; then
	for f in test/isolation/specs/*.spec; do
		specs+=("$(basename "$f" .spec)")
	done
fi

pgxs=$(dirname "$(pg_config --pgxs)")/..
runner=$pgxs/test/isolation/pg_isolation_regress
out=$(mktemp -d /tmp/points-iso.XXXXXX)
chmod 777 "$out"
[ -n "$keep" ] || trap 'rm -rf "$out"' EXIT

rc=0
pg_virtualenv -o shared_preload_libraries=points -c "-p $port" \
	"$runner" --bindir="$(pg_config --bindir)" --inputdir=test/isolation \
	--outputdir="$out" --load-extension=points "${specs[@]}" || rc=$?
if [ $rc -ne 0 ] && [ -f "$out/regression.diffs" ]; then
	cat "$out/regression.diffs"
fi
[ -z "$keep" ] || echo "results kept in $out"
exit $rc
