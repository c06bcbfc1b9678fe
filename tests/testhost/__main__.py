"""Command line for developers: python -m tests.testhost up|down|status|build|ssh|plug|unplug|replug."""

from __future__ import annotations

import argparse
import os
import sys

from . import image
from .host import TestHost, TestHostError, stop_all


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.testhost", description=__doc__)
    parser.add_argument("--name", default="default", help="test host name (its run directory under build/testhost/run/)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("build", help="build the image (or report the cached one)")
    up = commands.add_parser("up", help="boot the test host; prints the inventory path")
    up.add_argument("--topology", help="topology YAML file (default: topologies/default.yml)")
    up.add_argument("--memory", type=int, default=2048, help="MiB of RAM")
    down = commands.add_parser("down", help="stop the test host")
    down.add_argument("--all", action="store_true", help="stop every test host under build/testhost/run/")
    commands.add_parser("status", help="show whether it runs, and its USB devices")
    ssh = commands.add_parser("ssh", help="run a command on the test host (or open a shell)")
    ssh.add_argument("argv", nargs=argparse.REMAINDER)
    for name in ("plug", "unplug", "replug"):
        sub = commands.add_parser(name, help="%s a topology device through QMP" % name)
        sub.add_argument("device")
        if name != "unplug":
            sub.add_argument("--port", help="QEMU port, e.g. 2 or 3.2 (default: the declared one)")
    args = parser.parse_args(argv)

    try:
        if args.command == "build":
            print(image.build_image().directory)
        elif args.command == "up":
            host = TestHost(args.name, args.topology, memory_mib=args.memory).start()
            print(host.inventory)
        elif args.command == "down":
            if args.all:
                stop_all()
            else:
                TestHost(args.name).stop()
        elif args.command == "status":
            return status(args.name)
        elif args.command == "ssh":
            host = TestHost.running(args.name)
            # The words go to the remote shell as typed, like ssh's own command argument.
            command = host.ssh_command([])
            os.execvp("ssh", command + args.argv if args.argv else command[:-2] + ["-t", "root@127.0.0.1"])
        else:
            host = TestHost.running(args.name)
            if args.command == "unplug":
                host.unplug(args.device)
            else:
                getattr(host, args.command)(args.device, args.port)
    except TestHostError as error:
        print("error: %s" % error, file=sys.stderr)
        return 1
    return 0


def status(name: str) -> int:
    host = TestHost(name)
    if not host.is_running():
        print("test host %r: not running" % name)
        return 3
    host = TestHost.running(name)
    print("test host %r: running, QEMU pid %s, SSH 127.0.0.1:%s, inventory %s" % (name, host.pid(), host.ssh_port, host.inventory))
    for device in host.kernel_usb_devices():
        print("  %-8s %s:%s bus %s dev %s serial %s  %s" % (
            device["port"], device["idVendor"], device["idProduct"], device["busnum"], device["devnum"],
            device["serial"], device["product"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
