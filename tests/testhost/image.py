"""Build the test-host image: Debian 12 with kernel, udev, libvirt and QEMU, made by mmdebstrap.

The image is cached machine-wide, for every clone, under ``/var/cache/kvmhost-usb/testhost/images/<hash>/``
(``$KVMHOST_TESTHOST_CACHE`` to move it) where the hash covers the whole recipe (this file's RECIPE and the
customize hook), so a re-run or another clone reuses it and a changed recipe builds a new one. A build
writes into a temporary directory and renames it into place only when complete, so an interrupted build
never leaves a half image behind. Builds take turns (one lock for all), and a run that wants the image
being built waits for it (a lock per hash: shared to use, exclusive to build or remove). An image no run
has used for a few days is removed after the next build.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

from .paths import CACHE_DIR, HERE, log

HOOK = os.path.join(HERE, "image-hook.sh")
IMAGES_DIR = os.path.join(CACHE_DIR, "images")
# The packages cache: a rebuild after a recipe change downloads nothing again.
DEBS_DIR = os.path.join(CACHE_DIR, "debs")
# Other clones may still be on an older recipe: its image stays while one of them used it lately.
UNUSED_DAYS = 3

RECIPE = {
    "suite": "bookworm",
    "mirrors": [
        "deb http://deb.debian.org/debian bookworm main",
        "deb http://deb.debian.org/debian bookworm-updates main",
        "deb http://deb.debian.org/debian-security bookworm-security main",
    ],
    "packages": [
        "linux-image-amd64", "initramfs-tools", "zstd", "systemd-sysv", "udev", "dbus", "kmod",
        "iproute2", "openssh-server", "python3", "python3-pyudev", "python3-libvirt",
        "libvirt-daemon-system", "libvirt-clients", "qemu-system-x86", "usbutils",
        # USB/IP between two linked test hosts, through WireGuard: the roles install them, here they are already there
        # (no mirror); tcpdump to look at what crosses the link.
        "usbip", "usb.ids", "wireguard-tools", "nftables", "tcpdump",
    ],
    "dpkg_excludes": [
        "/usr/share/man/*", "/usr/share/doc/*", "/usr/share/info/*", "/usr/share/locale/*",
        "/usr/share/lintian/*",
    ],
    "image_size": "3G",
    "format": 1,
}


@dataclass(frozen=True)
class Image:
    """A built test-host image: an ext4 root filesystem (labelled ``root``), kernel and initrd."""

    directory: str

    @property
    def root(self) -> str:
        return os.path.join(self.directory, "root.img")

    @property
    def kernel(self) -> str:
        return os.path.join(self.directory, "vmlinuz")

    @property
    def initrd(self) -> str:
        return os.path.join(self.directory, "initrd.img")

    @property
    def host_keys(self) -> str:
        """The image's SSH host public keys, for a known_hosts file."""
        return os.path.join(self.directory, "ssh_host_keys.pub")


def recipe_hash() -> str:
    digest = hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode())
    with open(HOOK, "rb") as handle:
        digest.update(handle.read())
    return digest.hexdigest()[:16]


def cached_image() -> Image | None:
    image = Image(os.path.join(IMAGES_DIR, recipe_hash()))
    return image if os.path.exists(image.root) else None


def build_image(force: bool = False) -> Image:
    """The cached image for the current recipe, built first if needed (root only; ~1.5 min)."""
    os.makedirs(IMAGES_DIR, exist_ok=True)
    if not force:
        with _locked(recipe_hash(), fcntl.LOCK_SH, "another run building it"):
            image = _use(cached_image())
        if image:
            log("image %s is cached" % image.directory)
            return image
    with _locked("build", fcntl.LOCK_EX, "another run's image build"), _locked(recipe_hash(), fcntl.LOCK_EX, "runs using it"):
        image = None if force else _use(cached_image())
        if image:
            log("image %s was built meanwhile" % image.directory)
            return image
        image = _use(_build())
        _prune_unused_images(keep=image.directory)
    return image


@contextlib.contextmanager
def _locked(name: str, operation: int, holder: str):
    with open(os.path.join(IMAGES_DIR, name + ".lock"), "w") as lock:
        try:
            fcntl.flock(lock, operation | fcntl.LOCK_NB)
        except BlockingIOError:
            log("waiting for %s (%s)" % (holder, lock.name))
            fcntl.flock(lock, operation)
        yield


def _use(image: Image | None) -> Image | None:
    """The image, marked as used now (it is kept while runs use it)."""
    if image:
        with open(os.path.join(image.directory, "used"), "w"):
            pass
    return image


def _build() -> Image:
    target = os.path.join(IMAGES_DIR, recipe_hash())
    work = target + ".building"
    _remove_build_dir(work)
    os.makedirs(work)
    started = time.monotonic()
    rootdir = os.path.join(work, "rootdir")
    log("building the test-host image (recipe %s) with mmdebstrap; takes about 2 minutes" % recipe_hash())
    _run_mmdebstrap(rootdir)
    log("mmdebstrap done after %.0f s; making the ext4 filesystem" % (time.monotonic() - started))
    _export_boot_files(rootdir, work)
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-L", "root", "-d", rootdir, os.path.join(work, "root.img"), RECIPE["image_size"]],
        check=True,
    )
    _remove_build_dir(rootdir)
    shutil.rmtree(target, ignore_errors=True)
    os.rename(work, target)
    log("image built in %.0f s: %s" % (time.monotonic() - started, target))
    return Image(target)


def _run_mmdebstrap(rootdir: str) -> None:
    os.makedirs(DEBS_DIR, exist_ok=True)
    command = [
        "mmdebstrap", "--mode=root", "--variant=apt", "--format=directory",
        "--include=" + ",".join(RECIPE["packages"]),
        "--aptopt=Acquire::Retries 3",
        "--skip=essential/unlink",
        "--setup-hook=mkdir -p \"$1\"/var/cache/apt/archives/",
        "--setup-hook=sync-in %s /var/cache/apt/archives/" % DEBS_DIR,
        "--customize-hook=sync-out /var/cache/apt/archives %s" % DEBS_DIR,
        "--customize-hook=rm -f \"$1\"/var/cache/apt/archives/*.deb",
        "--customize-hook=%s" % HOOK,
    ]
    for pattern in RECIPE["dpkg_excludes"]:
        command.append("--dpkgopt=path-exclude=%s" % pattern)
    command += [RECIPE["suite"], rootdir] + RECIPE["mirrors"]
    # mmdebstrap prints its own progress ("I: ..." lines) on stderr; pass it through.
    subprocess.run(command, check=True, stdout=sys.stderr)


def _remove_build_dir(path: str) -> None:
    """Remove an (interrupted) build directory, unmounting first whatever a killed mmdebstrap left mounted in it."""
    if not os.path.exists(path):
        return
    prefix = os.path.realpath(path) + "/"
    with open("/proc/self/mounts") as handle:
        mounts = [line.split()[1].replace("\\040", " ") for line in handle]
    for mountpoint in sorted((m for m in mounts if m.startswith(prefix)), reverse=True):
        subprocess.run(["umount", "-l", mountpoint], check=False)
    shutil.rmtree(path, ignore_errors=True)


def _export_boot_files(rootdir: str, work: str) -> None:
    kernels = sorted(glob.glob(os.path.join(rootdir, "boot", "vmlinuz-*")))
    initrds = sorted(glob.glob(os.path.join(rootdir, "boot", "initrd.img-*")))
    if not kernels or not initrds:
        raise RuntimeError("the image has no kernel or initrd under /boot")
    shutil.copy(kernels[-1], os.path.join(work, "vmlinuz"))
    shutil.copy(initrds[-1], os.path.join(work, "initrd.img"))
    with open(os.path.join(work, "ssh_host_keys.pub"), "w") as out:
        for path in sorted(glob.glob(os.path.join(rootdir, "etc", "ssh", "ssh_host_*_key.pub"))):
            with open(path) as handle:
                out.write(handle.read())


def _prune_unused_images(keep: str) -> None:
    """Remove the images of other recipes that no run has used for UNUSED_DAYS, unless one uses it now,
    and what interrupted builds left (no build runs meanwhile)."""
    for path in glob.glob(os.path.join(IMAGES_DIR, "*")):
        if path.endswith(".building"):
            _remove_build_dir(path)
            continue
        if path == keep or not os.path.isdir(path):
            continue
        lock_path = path + ".lock"
        with open(lock_path, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            try:
                used = os.stat(os.path.join(path, "used")).st_mtime
            except FileNotFoundError:
                used = os.stat(path).st_mtime
            if time.time() - used > UNUSED_DAYS * 86400:
                log("removing the image %s, unused for %d days" % (path, (time.time() - used) // 86400))
                shutil.rmtree(path, ignore_errors=True)
                os.unlink(lock_path)
