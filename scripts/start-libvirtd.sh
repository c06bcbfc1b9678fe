#!/bin/sh
# Start virtlogd and libvirtd by hand where systemd does not run them (containers, CI),
# and wait until qemu:///system answers. Idempotent: a running daemon is left alone.
set -eu
if virsh -c qemu:///system uri >/dev/null 2>&1; then
    exit 0
fi
if [ -d /run/systemd/system ]; then
    systemctl start virtlogd.socket libvirtd.socket libvirtd.service >/dev/null 2>&1 || true
fi
mkdir -p /var/log/libvirt /var/run/libvirt
pgrep -x virtlogd >/dev/null || virtlogd -d
pgrep -x libvirtd >/dev/null || libvirtd -d
i=0
until virsh -c qemu:///system uri >/dev/null 2>&1; do
    i=$((i + 1))
    if [ "$i" -gt 60 ]; then
        echo "libvirtd did not answer on qemu:///system within 30 s" >&2
        exit 1
    fi
    sleep 0.5
done
