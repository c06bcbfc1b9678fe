"""A planner operation paused between its plan and its steps (tests/lib/midchange_driver.py), driven from a test:
start it, wait for the pause, change the host, release it, read its result."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from . import usbtree
from .domains import URI
from .modrun import collection_root

DRIVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "midchange_driver.py")


def request(operation: str, args: dict, pause: str = "execute", uri: str | None = None) -> str:
    """The driver's argument: ``operation`` attach, detach or converge; ``args`` as the planner takes them."""
    return json.dumps({"operation": operation, "args": args, "pause": pause, "uri": uri or URI})


class PausedRun:
    """A running driver process (its command given), stopped at its pause once ``paused`` returned."""

    def __init__(self, command: list[str], env: dict | None = None) -> None:
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: list[str] = []

    def _line(self, *words: str) -> tuple[str, dict]:
        for line in self.process.stdout:
            self.lines.append(line)
            word, _space, data = line.rstrip("\n").partition(" ")
            if word in words:
                return word, json.loads(data)
        self.process.wait(60)
        output = "".join(self.lines) + self.process.stderr.read()
        raise AssertionError("the driver ended without %s (rc %s):\n%s" % (" or ".join(words), self.process.returncode, output))

    def paused(self) -> dict:
        """Wait for the pause: ``{"steps": [the planned steps], "umockdev_dir": ...}``."""
        return self._line("paused")[1]

    def release(self) -> tuple[bool, dict]:
        """Let it go on; ``(True, result)`` or ``(False, {"msg": error})``."""
        self.process.stdin.write("go\n")
        self.process.stdin.flush()
        word, data = self._line("result", "failed")
        self.process.wait(60)
        return word == "result", data

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)


def local(argument: str, devices: list, tmp: str) -> PausedRun:
    """The driver on this machine under umockdev-run with the described USB tree, on the run's own libvirtd."""
    tree = os.path.join(tmp, "tree.umockdev")
    with open(tree, "w") as handle:
        handle.write(usbtree.render(devices))
    env = dict(os.environ, PYTHONPATH=collection_root(), KVMHOST_USB_LOCK=os.path.join(tmp, "lock"))
    return PausedRun(["umockdev-run", "-d", tree, "--", sys.executable, DRIVER, argument], env=env)
