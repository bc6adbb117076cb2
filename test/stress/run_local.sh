#!/bin/bash
# Run test/stress/run.sh standalone, in a throwaway cluster made by
# pg_virtualenv (Debian postgresql-common; works as root too), with the
# library preloaded as in production.  Needs the extension installed
# (make install).
#
#   test/stress/run_local.sh [PORT | --port PORT] [run.sh arguments: --seconds N --clients N]
#
# PORT (default 5475) is the port of the throwaway cluster.
#
# The cluster gets max_connections and lock table room for the clients, and
# is dropped afterwards whatever the outcome; the exit status is run.sh's.
set -euo pipefail
dir=$(cd "$(dirname "$0")" && pwd)

port=5475
args=()
while [ $# -gt 0 ]; do
	case "$1" in
		--port) port="$2"; shift 2 ;;
		--port=*) port="${1#*=}"; shift ;;
		-h|--help) sed -n '2,12p' "$0"; exit 0 ;;
		--seconds|--clients) args+=("$1" "${2:-}"); shift; [ $# -eq 0 ] || shift ;;
		[0-9]*) port="$1"; shift ;;
		*) args+=("$1"); shift ;;
	esac
done

# pg_virtualenv runs the command as the invoking user with PG* set to the
# new cluster (as root: the cluster belongs to postgres, the command runs as
# root and connects as postgres, a superuser)
exec pg_virtualenv -o shared_preload_libraries=points -o max_connections=60 \
	-o max_locks_per_transaction=256 -o fsync=off -c "-p $port" \
	"$dir/run.sh" ${args[@]+"${args[@]}"}
