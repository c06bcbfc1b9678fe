#!/usr/bin/env bash
# scripts/timed.sh TIER COMMAND...: run COMMAND, then add "TIER SECONDS EXIT-STATUS" to build/tier-times
# (make test prints them with scripts/tier-table.sh). Exits with COMMAND's status.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
tier=$1
shift
start=$(date +%s)
"$@"
status=$?
mkdir -p build
echo "$tier $(($(date +%s) - start)) $status" >>build/tier-times
exit "$status"
