"""Boot, reach and stop the test host: a Debian VM under QEMU (TCG) with emulated USB devices.

    with TestHost("mytest") as host:          # builds the image if needed, boots, waits for SSH
        host.ssh("lsusb")
        host.kernel_usb_devices()             # what the test host's kernel enumerated
        host.replug("stick")                  # QMP on the outer QEMU
        host.inventory                        # an Ansible inventory file for the test host

Each test host has a name and its own run directory ``build/testhost/run/<name>/``
(overlay disk, QMP socket, serial log, SSH key, inventory, pidfile). Only the QEMU process
recorded in that pidfile is ever stopped, and only after checking that its command line
names this run directory; a crashed run's leftovers are cleaned by the next start.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from typing import Any, Callable

import yaml

from . import guest, image, qmp, topology
from .paths import BUILD_DIR, log

RUN_ROOT = os.path.join(BUILD_DIR, "run")
# The test hosts of a pytest session are named pytest-<PID of the session>[-name]: sessions running side by side
# (two developers, or a developer and CI) never share or stop each other's test host.
PYTEST_PREFIX = "pytest"

# Run by the test host's python3: the kernel's own view of its USB devices (JSON on stdout).
KERNEL_USB_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernel_usb.py")


class TestHostError(RuntimeError):
    """The test host could not be built, booted or reached."""


@dataclasses.dataclass
class Link:
    """A second NIC (eth1 inside, address ``address``/24) on a private link between two test hosts, carried
    over loopback by a QEMU socket netdev: one end listens on 127.0.0.1:``port``, the other connects to it."""

    address: str
    mac: str
    port: int
    listen: bool

    NETDEV = "link"

    def qemu_arguments(self) -> list[str]:
        mode = "listen" if self.listen else "connect"
        return [
            "-netdev", "socket,id=%s,%s=127.0.0.1:%d" % (self.NETDEV, mode, self.port),
            "-device", "virtio-net-pci,netdev=%s,id=%s-nic,mac=%s" % (self.NETDEV, self.NETDEV, self.mac),
        ]


class TestHost:
    """A named test host. ``start()`` boots it (stopping a stale one of the same name first)."""

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        name: str = "default",
        topology_file: str | None = None,
        memory_mib: int = 2048,
        cpus: int = 2,
        link: Link | None = None,
        stick_files: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.topology_file = topology_file or topology.DEFAULT
        self.topology = topology.load(self.topology_file)
        self.memory_mib = memory_mib
        self.cpus = cpus
        self.link = link
        # Files written into every storage device's filesystem on the outer side, before boot.
        self.stick_files = stick_files or {}
        self.run_dir = os.path.join(RUN_ROOT, name)
        self.ssh_port: int | None = None
        self._read_state()

    # Files of the run.
    def _path(self, name: str) -> str:
        return os.path.join(self.run_dir, name)

    @property
    def pidfile(self) -> str:
        return self._path("qemu.pid")

    @property
    def qmp_socket(self) -> str:
        return self._path("qmp.sock")

    @property
    def serial_log(self) -> str:
        return self._path("serial.log")

    @property
    def ssh_key(self) -> str:
        return self._path("id_ed25519")

    @property
    def known_hosts(self) -> str:
        return self._path("known_hosts")

    @property
    def inventory(self) -> str:
        """An Ansible inventory with the one host ``testhost`` (written at start)."""
        return self._path("inventory.yml")

    def __enter__(self) -> TestHost:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # Lifecycle.
    def start(self, timeout: float = 480.0) -> TestHost:
        """Build the image if needed, boot the test host and wait until SSH answers and every
        declared device is enumerated. A failed start stops the QEMU it started."""
        built = image.build_image()
        self.stop()
        shutil.rmtree(self.run_dir, ignore_errors=True)
        os.makedirs(self.run_dir)
        started = time.monotonic()
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-b", built.root, "-F", "raw", self._path("overlay.qcow2")],
            check=True,
        )
        for device in self.topology.devices:
            if device.kind == "storage":
                _make_stick(qmp.storage_image(device, self.run_dir), device.size_mib, self.stick_files)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "kvmhost-testhost", "-f", self.ssh_key], check=True)
        for attempt in range(3):
            self.ssh_port = _free_port()
            try:
                subprocess.run(self._qemu_command(built), check=True, capture_output=True, text=True)
                break
            except subprocess.CalledProcessError as error:
                if "hostfwd" not in error.stderr or attempt == 2:
                    raise TestHostError("QEMU did not start: %s" % error.stderr.strip()) from None
        try:
            self._write_state()
            self._write_known_hosts(built)
            self._write_inventory()
            log("test host %r booting (QEMU pid %s, SSH on 127.0.0.1:%s)" % (self.name, self.pid(), self.ssh_port))
            self._wait_for_ssh(started + timeout)
            log("SSH answers after %.0f s; waiting for the USB devices" % (time.monotonic() - started))
            plugged = len([device for device in self.topology.devices if device.plugged])
            self.wait_usb(lambda devices: len([d for d in devices if not d["port"].startswith("usb")]) >= plugged, timeout=120)
        except BaseException:
            self.stop()
            raise
        log("test host %r up after %.0f s" % (self.name, time.monotonic() - started))
        return self

    def stop(self) -> None:
        """Stop this test host's QEMU (and SSH master) if running; harmless when nothing runs."""
        if self.ssh_port and os.path.exists(self._path("ssh-control")):
            subprocess.run(self._ssh_base() + ["-O", "exit", "root@127.0.0.1"], capture_output=True, timeout=10, check=False)
        pid = self.pid()
        if pid is None:
            return
        log("stopping test host %r (QEMU pid %d)" % (self.name, pid))
        try:
            with qmp.QMP(self.qmp_socket, timeout=5) as connection:
                connection.execute("quit")
        except (OSError, qmp.QMPError, ValueError):
            os.kill(pid, signal.SIGTERM)
        if not _wait_gone(pid, 15):
            os.kill(pid, signal.SIGKILL)
            _wait_gone(pid, 10)
        # QEMU removes its pidfile when it exits cleanly; a killed one leaves it.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.pidfile)

    def remove(self) -> None:
        """Stop the test host and delete its run directory."""
        self.stop()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def pid(self) -> int | None:
        """The PID of this run's QEMU if it is alive; the pidfile of a dead one is removed."""
        try:
            with open(self.pidfile) as handle:
                pid = int(handle.read().strip())
            with open("/proc/%d/cmdline" % pid, "rb") as handle:
                cmdline = handle.read()
        except (OSError, ValueError):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.pidfile)
            return None
        # A recycled PID belongs to someone else: ours names our QMP socket.
        if self.qmp_socket.encode() not in cmdline:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.pidfile)
            return None
        return pid

    def is_running(self) -> bool:
        return self.pid() is not None

    def _qemu_command(self, built: image.Image) -> list[str]:
        with open(self.ssh_key + ".pub", "rb") as handle:
            key = base64.b64encode(handle.read().strip()).decode()
        command = [
            "qemu-system-x86_64", "-accel", "tcg", "-machine", "q35", "-cpu", "max",
            "-smp", str(self.cpus), "-m", str(self.memory_mib),
            "-name", "kvmhost-testhost-" + self.name,
            "-display", "none", "-nodefaults", "-daemonize", "-pidfile", self.pidfile,
            "-serial", "file:" + self.serial_log, "-monitor", "none",
            "-qmp", "unix:%s,server=on,wait=off" % self.qmp_socket,
            "-kernel", built.kernel, "-initrd", built.initrd,
            "-append", "console=ttyS0 root=/dev/vda rw net.ifnames=0 fsck.mode=skip quiet mitigations=off kvmhost.ssh_key=" + key,
            "-drive", "file=%s,if=virtio,format=qcow2,cache=unsafe" % self._path("overlay.qcow2"),
            "-netdev", "user,id=net0,hostfwd=tcp:127.0.0.1:%d-:22" % self.ssh_port,
            "-device", "virtio-net-pci,netdev=net0",
        ]
        if self.link:
            # The connecting end is linked from its first instant: its address is set at boot. The listening end
            # gets its address over SSH once its peer has connected (LinkedPair.wait_link), as in the recipe
            # verified on this machine: its NIC sends nothing into a socket that has no peer yet.
            if not self.link.listen:
                command[command.index("-append") + 1] += " kvmhost.link=%s/24" % self.link.address
            command += self.link.qemu_arguments()
        command += [
            "-device", "qemu-xhci,id=%s,p2=%d,p3=%d" % (topology.CONTROLLER_ID, self.topology.ports, self.topology.ports),
        ]
        for device in self.topology.devices:
            if device.kind == "storage":
                command += ["-blockdev", json.dumps(qmp.storage_backend(device, self.run_dir))]
            elif device.kind == "serial":
                command += ["-chardev", "ringbuf,id=%s" % device.backend]
            if device.plugged:
                command += ["-device", json.dumps(device.qemu_properties())]
        return command

    def _wait_for_ssh(self, deadline: float) -> None:
        while True:
            if not self.is_running():
                raise TestHostError("the test host's QEMU exited while booting; see %s" % self.serial_log)
            remaining = max(1, int(deadline - time.monotonic()))
            command = self.ssh_command(["true"], connect_timeout=min(30, remaining))
            result = subprocess.run(command, capture_output=True, text=True, check=False)
            if result.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise TestHostError(
                    "the test host did not answer on SSH in time (%s); last lines of %s:\n%s"
                    % (result.stderr.strip(), self.serial_log, _tail(self.serial_log))
                )
            time.sleep(1)

    # State shared by the processes that use one test host (CLI, molecule, pytest).
    def _write_state(self) -> None:
        state = {
            "ssh_port": self.ssh_port, "topology": self.topology_file, "memory_mib": self.memory_mib, "cpus": self.cpus,
            "link": dataclasses.asdict(self.link) if self.link else None,
        }
        with open(self._path("state.json"), "w") as handle:
            json.dump(state, handle)

    def _read_state(self) -> None:
        try:
            with open(self._path("state.json")) as handle:
                state = json.load(handle)
        except (OSError, ValueError):
            return
        self.ssh_port = state["ssh_port"]

    @classmethod
    def running(cls, name: str = "default") -> TestHost:
        """The already running test host ``name`` (started by another process), with its topology."""
        try:
            with open(os.path.join(RUN_ROOT, name, "state.json")) as handle:
                state = json.load(handle)
        except OSError:
            raise TestHostError("no test host %r has been started" % name) from None
        link = Link(**state["link"]) if state.get("link") else None
        return cls(name, state["topology"], state["memory_mib"], state["cpus"], link)

    def _write_known_hosts(self, built: image.Image) -> None:
        with open(built.host_keys) as source, open(self.known_hosts, "w") as out:
            for line in source:
                if line.strip():
                    key_type, key = line.split()[:2]
                    out.write("[127.0.0.1]:%d %s %s\n" % (self.ssh_port, key_type, key))

    def _write_inventory(self) -> None:
        with open(self.inventory, "w") as handle:
            yaml.safe_dump({"all": {"hosts": {"testhost": self.connection_vars()}}}, handle, default_flow_style=False)

    def connection_vars(self) -> dict[str, Any]:
        """The Ansible host variables that reach this test host over SSH."""
        return {
            "ansible_host": "127.0.0.1",
            "ansible_port": self.ssh_port,
            "ansible_user": "root",
            "ansible_ssh_private_key_file": self.ssh_key,
            "ansible_ssh_common_args": "-o UserKnownHostsFile=%s -o StrictHostKeyChecking=yes" % self.known_hosts,
            "ansible_python_interpreter": "/usr/bin/python3",
        }

    # SSH.
    def _ssh_base(self) -> list[str]:
        return [
            "ssh", "-i", self.ssh_key, "-p", str(self.ssh_port),
            "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
            "-o", "UserKnownHostsFile=" + self.known_hosts, "-o", "StrictHostKeyChecking=yes",
            "-o", "ControlPath=" + self._path("ssh-control"),
        ]

    def ssh_command(self, argv: list[str], connect_timeout: int = 10) -> list[str]:
        """The ssh command line running ``argv`` on the test host as root (arguments quoted for its shell)."""
        return self._ssh_base() + [
            "-o", "ConnectTimeout=%d" % connect_timeout,
            "-o", "ControlMaster=auto", "-o", "ControlPersist=120",
            "root@127.0.0.1", "--",
        ] + [_quote(arg) for arg in argv]

    def ssh(self, *argv: str, input: str | None = None, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run a command on the test host; returns the CompletedProcess (text), raising on failure if ``check``."""
        if self.ssh_port is None:
            raise TestHostError("test host %r is not started" % self.name)
        result = subprocess.run(
            self.ssh_command(list(argv)),
            input=input, capture_output=True, text=True, timeout=timeout,
            stdin=None if input is not None else subprocess.DEVNULL, check=False,
        )
        if check and result.returncode != 0:
            raise TestHostError("on the test host, %s failed (rc %d): %s" % (" ".join(argv), result.returncode, result.stderr.strip()))
        return result

    # USB, as the test host's kernel sees it.
    def kernel_usb_devices(self) -> list[dict[str, Any]]:
        """Every USB device in the test host's /sys/bus/usb/devices (root hubs included).

        Each is a dict with ``port`` (the sysfs name, ``usbN`` for root hubs) and the raw
        sysfs attributes ``idVendor idProduct serial busnum devnum product manufacturer
        bDeviceClass speed`` (strings, None when absent).
        """
        with open(KERNEL_USB_SCRIPT) as handle:
            script = handle.read()
        return json.loads(self.ssh("python3", "-", input=script).stdout)

    def wait_usb(self, predicate: Callable[[list[dict[str, Any]]], bool], timeout: float = 30.0) -> list[dict[str, Any]]:
        """Poll kernel_usb_devices() until ``predicate(devices)`` holds (udev settled); return the devices."""
        deadline = time.monotonic() + timeout
        while True:
            self.ssh("udevadm", "settle")
            devices = self.kernel_usb_devices()
            if predicate(devices):
                return devices
            if time.monotonic() > deadline:
                raise TimeoutError("the test host's USB devices did not reach the expected state: %s" % devices)
            time.sleep(0.5)

    def kernel_device(self, serial: str | None = None, port: str | None = None) -> dict[str, Any] | None:
        """The kernel's entry for the device with this serial or at this port path, or None."""
        for device in self.kernel_usb_devices():
            if (serial is None or device["serial"] == serial) and (port is None or device["port"] == port):
                return device
        return None

    # Plugging, through QMP on the outer QEMU.
    def qmp(self) -> qmp.QMP:
        """A new QMP connection to this test host's QEMU (use it as a context manager)."""
        return qmp.QMP(self.qmp_socket)

    def plug(self, device_id: str, port: str | None = None) -> None:
        """Plug a topology device in (at its declared port or ``port``, a QEMU port such as ``"2"`` or ``"3.2"``)."""
        device = self.topology.device(device_id)
        with self.qmp() as connection:
            connection.ensure_backend(device, self.run_dir)
            connection.plug(device, port)

    def unplug(self, device_id: str) -> None:
        """Pull a device out; returns once QEMU has deleted it."""
        with self.qmp() as connection:
            connection.unplug(device_id)

    def replug(self, device_id: str, port: str | None = None) -> None:
        """Pull a device out and put it back (into ``port`` if given): the kernel gives it a new device number."""
        device = self.topology.device(device_id)
        with self.qmp() as connection:
            connection.unplug(device_id)
            connection.ensure_backend(device, self.run_dir)
            time.sleep(0.5)
            connection.plug(device, port)

    # Nested libvirt guests inside the test host.
    def create_guest(self, name: str, memory_mib: int = guest.DEFAULT_MEMORY_MIB, start: bool = True) -> None:
        """Define (and start) a diskless TCG guest with an xHCI controller inside the test host."""
        guest.create(self, name, memory_mib=memory_mib, start=start)

    def guest_usb(self, name: str) -> list[dict[str, Any]]:
        """The USB devices a running guest sees: its QEMU monitor's ``info usb``, parsed."""
        return guest.usb(self, name)

    def remove_guest(self, name: str) -> None:
        """Destroy and undefine a guest (no error if it does not exist)."""
        guest.remove(self, name)

    @contextlib.contextmanager
    def running_guest(self, name: str) -> Iterator[str]:
        """A fresh running guest named ``name`` (one left by an earlier run is replaced), removed afterwards."""
        self.remove_guest(name)
        self.create_guest(name)
        try:
            yield name
        finally:
            self.remove_guest(name)


def stop_all(prefix: str = "") -> None:
    """Stop every test host whose name starts with ``prefix``."""
    if not os.path.isdir(RUN_ROOT):
        return
    for name in sorted(os.listdir(RUN_ROOT)):
        if name.startswith(prefix) and os.path.isdir(os.path.join(RUN_ROOT, name)):
            TestHost(name).stop()


def owned_name(prefix: str, suffix: str = "") -> str:
    """A test host name owned by this process (``prefix-PID[-suffix]``), see remove_orphans()."""
    return "%s-%d%s" % (prefix, os.getpid(), "-" + suffix if suffix else "")


def remove_orphans(prefix: str) -> None:
    """Stop and remove the test hosts named by owned_name(prefix) whose owner process is gone:
    what a crashed or killed test session left. Hosts of live sessions are left alone."""
    if not os.path.isdir(RUN_ROOT):
        return
    pattern = re.compile(r"^%s-(\d+)(?:-.*)?$" % re.escape(prefix))
    for name in sorted(os.listdir(RUN_ROOT)):
        match = pattern.match(name)
        if match and not os.path.exists("/proc/%s" % match.group(1)):
            TestHost(name).remove()


def _make_stick(path: str, size_mib: int, files: dict[str, str] | None = None) -> None:
    with open(path, "wb") as handle:
        handle.truncate(size_mib * 1024 * 1024)
    # A filesystem on it, so that a test can mount it like a real stick; with ``files`` in it if given.
    with tempfile.TemporaryDirectory(prefix="kvmhost-stick-") as content:
        for name, text in (files or {}).items():
            with open(os.path.join(content, name), "w") as handle:
                handle.write(text)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "STICK", "-d", content, path], check=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open("/proc/%d/stat" % pid) as handle:
                # A zombie is gone for us (where PID 1 does not reap promptly).
                if handle.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except OSError:
            return True
        time.sleep(0.1)
    return False


def _quote(arg: str) -> str:
    return shlex.quote(arg)


def _tail(path: str, lines: int = 30) -> str:
    try:
        with open(path, errors="replace") as handle:
            return "".join(handle.readlines()[-lines:])
    except OSError:
        return "(no serial log)"
