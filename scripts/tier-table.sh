#!/usr/bin/env bash
# The wall time of each tier in build/tier-times (scripts/timed.sh), the tier that failed marked, and the total.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -s build/tier-times ] || exit 0
awk '
    function clock(seconds) { return sprintf("%d:%02d", seconds / 60, seconds % 60) }
    BEGIN { print ""; printf "%-12s %8s\n", "tier", "time" }
    { total += $2; printf "%-12s %8s%s\n", $1, clock($2), $3 == 0 ? "" : "  failed (exit " $3 ")" }
    END { printf "%-12s %8s\n", "total", clock(total) }
' build/tier-times
