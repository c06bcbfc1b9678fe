#!/bin/sh
# Install the Debian 12 packages the tests and the demo need; only missing ones, so a re-run is quick.
set -eu
# Two checkouts set up at once would meet at apt's lock, and apt-get gives up at once when it is held: wait
# for the other one here, then look again at what is still missing.
exec 9>/var/lock/kvmhost-usb-packages.lock
flock 9
PACKAGES="python3 python3-venv python3-dev gcc pkg-config git make
qemu-system-x86 qemu-utils mmdebstrap e2fsprogs
libvirt-daemon-system libvirt-clients libvirt-dev dnsmasq-base
umockdev usbutils openssh-client sshpass rsync procps ca-certificates shellcheck patchelf
wireguard-tools nftables
chromium openjdk-17-jre-headless"
missing=""
for package in $PACKAGES; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing="$missing $package"
done
if [ -z "$missing" ]; then
    exit 0
fi
echo "Installing Debian packages:$missing"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
# shellcheck disable=SC2086
apt-get install -y -q --no-install-recommends $missing
