#!/usr/bin/env bash
# Install what points needs from Debian packages, then build and install the
# extension.  Safe to run again.  Run as root (or with sudo).
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
    # server and headers from one install, so both are the same minor version
    postgresql-15 postgresql-server-dev-15
    postgresql-15-cron postgresql-15-pgtap
    librdkafka-dev kcat pkg-config
    libipc-run-perl curl valgrind
    build-essential
)

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# a throwaway cluster that pg_virtualenv or the tests start must not find
# Debian's default cluster on its port
export PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
make -s PG_CONFIG=$PG_CONFIG
make -s PG_CONFIG=$PG_CONFIG install >/dev/null
# the Kafka tests need these tools: a build failure must fail here, not skip them
make -s -C test/kafka >/dev/null
echo "setup: points built and installed into $($PG_CONFIG --pkglibdir)"
