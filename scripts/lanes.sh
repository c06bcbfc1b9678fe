#!/usr/bin/env bash
# scripts/lanes.sh "HOST TIERS" "TESTHOST TIERS": run the two lists of make targets at once, each list in order and
# each tier timed (scripts/timed.sh). The test-host lane prints as it goes; the host lane's output is kept in
# build/lane-host.log and printed when both are done. Fails when either lane failed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
lane() {
    for tier in $1; do
        scripts/timed.sh "$tier" make --no-print-directory "$tier" || return 1
    done
}
mkdir -p build
lane "$1" >build/lane-host.log 2>&1 &
host=$!
lane "$2"
testhost_status=$?
wait "$host"
host_status=$?
echo
echo "== The host lane ($1), from build/lane-host.log"
cat build/lane-host.log
[ "$host_status" -eq 0 ] && [ "$testhost_status" -eq 0 ]
