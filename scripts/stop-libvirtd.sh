#!/bin/sh
# Stop the tests' own libvirtd that scripts/start-libvirtd.sh started for DIR (default build/libvirt):
# its guests first, then the daemon, by the PID in DIR/libvirtd.pid and only if that process is the
# libvirtd of DIR. Nothing to stop is not an error.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
dir=${1:-$here/../build/libvirt}
[ -d "$dir" ] || exit 0
dir=$(cd "$dir" && pwd)
pidfile=$dir/libvirtd.pid
[ -s "$pidfile" ] || exit 0
pid=$(cat "$pidfile")
ours() {
    # The pid file may be stale and its number reused: the process must be libvirtd with this pid file.
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "libvirtd --pid-file $pidfile "
}
if ours; then
    uri="qemu+unix:///system?socket=$dir/run/libvirt-sock"
    # Guests of this daemon only; a daemon that no longer answers has none to report here.
    for domain in $(timeout 30 virsh -q -c "$uri" list --name 2>/dev/null || true); do
        timeout 30 virsh -q -c "$uri" destroy "$domain" >/dev/null 2>&1 || true
    done
    kill "$pid" 2>/dev/null || true
    i=0
    while ours; do
        i=$((i + 1))
        if [ "$i" -eq 60 ]; then
            kill -KILL "$pid" 2>/dev/null || true
        fi
        sleep 0.5
    done
fi
rm -f "$pidfile"
