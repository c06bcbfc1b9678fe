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
mkdir -p /var/log/libvirt /var/run/libvirt /run/kvmhost-usb
pgrep -x virtlogd >/dev/null || virtlogd -d
if ! pgrep -x libvirtd >/dev/null; then
    if [ -e /dev/kvm ]; then
        # The tests run TCG guests only. Where /dev/kvm exists but cannot run guests, libvirt's
        # capability probe through KVM stalls for minutes and, finding KVM unusable yet the device
        # accessible, starts over on every define. So the libvirtd started here gets its own mount
        # namespace in which /dev/kvm is an inaccessible file (libvirt then probes TCG only, once)
        # and whose qemu.conf gives guests no private /dev (which could not carry that mount over).
        : >/run/kvmhost-usb/no-kvm
        chmod 000 /run/kvmhost-usb/no-kvm
        cp /etc/libvirt/qemu.conf /run/kvmhost-usb/qemu.conf
        echo 'namespaces = []' >>/run/kvmhost-usb/qemu.conf
        unshare --mount --propagation private sh -c '
            mount --bind /run/kvmhost-usb/no-kvm /dev/kvm &&
            mount --bind /run/kvmhost-usb/qemu.conf /etc/libvirt/qemu.conf &&
            exec libvirtd -d'
    else
        libvirtd -d
    fi
fi
i=0
until virsh -c qemu:///system uri >/dev/null 2>&1; do
    i=$((i + 1))
    if [ "$i" -gt 120 ]; then
        echo "libvirtd did not answer on qemu:///system within 60 s" >&2
        exit 1
    fi
    sleep 0.5
done
