#!/bin/sh
# Start a libvirtd of its own for this checkout's tests, with its socket, configuration and state in
# DIR (default build/libvirt), and wait until it answers. The machine's own libvirtd, if any, is left
# alone: the daemon runs in its own mount namespace in which /etc/libvirt, /run/libvirt,
# /var/lib/libvirt, /var/cache/libvirt and /var/log/libvirt are directories under DIR, so its socket
# is DIR/run/libvirt-sock (URI qemu+unix:///system?socket=DIR/run/libvirt-sock). A daemon left
# running from an earlier run of the same DIR is stopped first. scripts/stop-libvirtd.sh stops it.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
dir=${1:-$here/../build/libvirt}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
socket=$dir/run/libvirt-sock
uri="qemu+unix:///system?socket=$socket"

"$here/stop-libvirtd.sh" "$dir"

mkdir -p "$dir/etc/qemu" "$dir/run" "$dir/lib" "$dir/cache" "$dir/log"
# The stock configuration without its domains, networks and secrets; no cgroups, no virtlogd, and
# (see below) no private /dev for guests.
cp /etc/libvirt/*.conf "$dir/etc/"
cat >>"$dir/etc/qemu.conf" <<'EOF'

# kvmhost.usb tests: a daemon of one test run, beside the machine's own.
namespaces = []
cgroup_controllers = []
stdio_handler = "file"
EOF
# The tests run TCG guests only. Where /dev/kvm exists but cannot run guests, libvirt's capability
# probe through KVM stalls for minutes and, finding KVM unusable yet the device accessible, starts
# over on every define. So in the daemon's namespace /dev/kvm is an inaccessible file (libvirt then
# probes TCG only, once), and qemu.conf gives guests no private /dev (which could not carry that
# mount over).
: >"$dir/no-kvm"
chmod 000 "$dir/no-kvm"
# Mount points of the bind mounts: present wherever libvirt is installed.
mkdir -p /etc/libvirt /run/libvirt /var/lib/libvirt /var/cache/libvirt /var/log/libvirt

# unshare and sh exec: the process started here becomes libvirtd, in a session of its own so that
# it outlives this script (the pid file names it for stop-libvirtd.sh). $DIR expands in the namespace.
# shellcheck disable=SC2016
DIR=$dir setsid unshare --mount --propagation private sh -c '
    mount --bind "$DIR/etc" /etc/libvirt &&
    mount --bind "$DIR/run" /run/libvirt &&
    mount --bind "$DIR/lib" /var/lib/libvirt &&
    mount --bind "$DIR/cache" /var/cache/libvirt &&
    mount --bind "$DIR/log" /var/log/libvirt &&
    if [ -e /dev/kvm ]; then mount --bind "$DIR/no-kvm" /dev/kvm; fi &&
    exec libvirtd --pid-file "$DIR/libvirtd.pid"' </dev/null >"$dir/libvirtd.log" 2>&1 &
started=$!

i=0
until virsh -q -c "$uri" uri >/dev/null 2>&1; do
    i=$((i + 1))
    if ! kill -0 "$started" 2>/dev/null || [ "$i" -gt 120 ]; then
        echo "libvirtd did not answer on $uri within 60 s; its log $dir/libvirtd.log:" >&2
        cat "$dir/libvirtd.log" >&2
        kill "$started" 2>/dev/null || true
        exit 1
    fi
    sleep 0.5
done
echo "$uri"
