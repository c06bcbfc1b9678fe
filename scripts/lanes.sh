#!/usr/bin/env bash
# scripts/lanes.sh "FIRST LANE" "SECOND LANE": run two lists of make targets at once, each list in order and each
# tier timed (scripts/timed.sh). The first lane prints as it goes; the second lane's output is kept in
# build/lane-second.log and printed when both are done. Fails when either lane failed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
lane() {
    for tier in $1; do
        scripts/timed.sh "$tier" make --no-print-directory "$tier" || return 1
    done
}
mkdir -p build
lane "$2" >build/lane-second.log 2>&1 &
second=$!
lane "$1"
first_status=$?
wait "$second"
second_status=$?
echo
echo "== The second lane ($2), from build/lane-second.log"
cat build/lane-second.log
[ "$first_status" -eq 0 ] && [ "$second_status" -eq 0 ]
