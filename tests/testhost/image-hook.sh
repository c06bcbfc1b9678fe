#!/bin/sh
# mmdebstrap customize hook for the test-host image: $1 is the root directory.
# Nothing here may depend on a run (keys, ports): the image is cached by a hash of its recipe.
set -eu
root="$1"

echo kvmtesthost >"$root/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 kvmtesthost\n' >"$root/etc/hosts"
echo 'LABEL=root / ext4 rw,noatime 0 0' >"$root/etc/fstab"

# QEMU user networking is always 10.0.2.0/24: a static address set as soon as eth0
# exists saves waiting for DHCP or systemd-networkd (seconds under TCG).
cat >"$root/etc/systemd/system/kvmhost-net.service" <<'UNIT'
[Unit]
Description=Static address for QEMU user networking
DefaultDependencies=no
BindsTo=sys-subsystem-net-devices-eth0.device
After=sys-subsystem-net-devices-eth0.device
Before=network.target
[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/sbin/ip link set lo up
ExecStart=/sbin/ip link set eth0 up
ExecStart=/sbin/ip address add 10.0.2.15/24 dev eth0
ExecStart=/sbin/ip route add default via 10.0.2.2
[Install]
WantedBy=sys-subsystem-net-devices-eth0.device
UNIT
chroot "$root" systemctl enable kvmhost-net.service >/dev/null 2>&1
echo 'nameserver 10.0.2.3' >"$root/etc/resolv.conf"

# A second NIC (eth1) links two test hosts over loopback; its address comes on the kernel
# command line (kvmhost.link=10.77.0.N/24), so the image stays the same for every host.
cat >"$root/usr/local/sbin/kvmhost-link" <<'LINK'
#!/bin/sh
set -eu
for word in $(cat /proc/cmdline); do
    case "$word" in
        kvmhost.link=*)
            ip link set eth1 up
            ip address add "${word#kvmhost.link=}" dev eth1
            ;;
    esac
done
LINK
chmod 755 "$root/usr/local/sbin/kvmhost-link"
cat >"$root/etc/systemd/system/kvmhost-link.service" <<'UNIT'
[Unit]
Description=Address of the link between two test hosts
DefaultDependencies=no
BindsTo=sys-subsystem-net-devices-eth1.device
After=sys-subsystem-net-devices-eth1.device
Before=network.target
[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/sbin/kvmhost-link
[Install]
WantedBy=sys-subsystem-net-devices-eth1.device
UNIT
chroot "$root" systemctl enable kvmhost-link.service >/dev/null 2>&1

# The run's public key comes on the kernel command line (kvmhost.ssh_key=<base64>),
# so the cached image holds no key and every run brings its own.
cat >"$root/usr/local/sbin/kvmhost-ssh-key" <<'KEY'
#!/bin/sh
set -eu
for word in $(cat /proc/cmdline); do
    case "$word" in
        kvmhost.ssh_key=*)
            mkdir -p -m 700 /root/.ssh
            echo "${word#kvmhost.ssh_key=}" | base64 -d >/root/.ssh/authorized_keys
            chmod 600 /root/.ssh/authorized_keys
            ;;
    esac
done
KEY
chmod 755 "$root/usr/local/sbin/kvmhost-ssh-key"
cat >"$root/etc/systemd/system/kvmhost-ssh-key.service" <<'UNIT'
[Unit]
Description=Install the test run's SSH key from the kernel command line
DefaultDependencies=no
After=systemd-remount-fs.service
Before=ssh.socket ssh.service sockets.target
[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/sbin/kvmhost-ssh-key
[Install]
WantedBy=sockets.target
UNIT
chroot "$root" systemctl enable kvmhost-ssh-key.service >/dev/null 2>&1

# libvirtd is started by its socket, on the first connection.
chroot "$root" systemctl disable libvirtd.service >/dev/null 2>&1
chroot "$root" systemctl enable virtlogd.socket libvirtd.socket libvirtd-ro.socket libvirtd-admin.socket >/dev/null 2>&1

cat >"$root/etc/ssh/sshd_config.d/kvmhost.conf" <<'SSHD'
PermitRootLogin prohibit-password
PasswordAuthentication no
UseDNS no
# No PAM: no logind session and systemd --user manager per login, seconds each under TCG.
UsePAM no
SSHD

# Under TCG every service costs seconds at boot: drop what a test host never needs.
for unit in apt-daily.timer apt-daily-upgrade.timer man-db.timer e2scrub_all.timer fstrim.timer \
    logrotate.timer dpkg-db-backup.timer remote-fs.target getty@tty1.service \
    libvirt-guests.service; do
    chroot "$root" systemctl disable "$unit" >/dev/null 2>&1 || true
done
chroot "$root" systemctl mask systemd-timesyncd.service systemd-networkd.service \
    modprobe@drm.service modprobe@fuse.service modprobe@loop.service modprobe@dm_mod.service >/dev/null 2>&1 || true
printf 'blacklist %s\n' pcspkr iTCO_wdt iTCO_vendor_support i2c_i801 lpc_ich joydev serio_raw \
    >"$root/etc/modprobe.d/kvmhost-testhost.conf"
rm -f "$root/etc/libvirt/qemu/networks/autostart/default.xml"

# A small initramfs boots faster under TCG: only what finds the root disk.
printf 'MODULES=list\nCOMPRESS=zstd\n' >"$root/etc/initramfs-tools/conf.d/kvmhost"
printf 'virtio_pci\nvirtio_blk\next4\nvirtio_net\n' >"$root/etc/initramfs-tools/modules"
chroot "$root" update-initramfs -u -k all >/dev/null
