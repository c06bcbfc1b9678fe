#!/usr/bin/env bash
# The wall time of each tier in build/tier-times (scripts/timed.sh), a failed tier marked, and the run's wall time
# (build/test-started): the two lanes of make test run at once, so the run takes less than the tiers' sum.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -s build/tier-times ] || exit 0
started=$(cat build/test-started 2>/dev/null || echo "")
wall=$(( $(date +%s) - ${started:-$(date +%s)} ))
awk -v wall="$wall" '
    function clock(seconds) { return sprintf("%d:%02d", seconds / 60, seconds % 60) }
    BEGIN { print ""; printf "%-22s %8s\n", "tier", "time" }
    { total += $2; printf "%-22s %8s%s\n", $1, clock($2), $3 == 0 ? "" : "  failed (exit " $3 ")" }
    END { printf "%-22s %8s\n", "sum", clock(total); if (wall > 0) printf "%-22s %8s\n", "wall", clock(wall) }
' build/tier-times
