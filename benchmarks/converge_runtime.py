# Copyright (c) 2026, kvmhost.usb contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""What a converge costs on the test host, this checkout against a baseline commit, in one run.

On one booted test host, for each collection (the baseline: by default the commit before the host runtime was one
program, whose role copied the agent's and exporter's code as loose files; then this checkout):

* first: playbooks/converge.yml declaring the demo's two running guests (demo-a: the stick, demo-b: a mouse), the
  agent on, from a host without the agent or the exporter (`make demo` step 5);
* no-op: the same converge again, which must change nothing;
* swap: each guest declared with the other's device (`make demo` step 6).

With ``--pair`` the same for the cross-host converge on the two linked test hosts: B's guest declares A's stick
(A exports it, B imports it), first and no-op.

It prints each run's seconds and task count (ok + skipped from the recap), the ratio of this checkout to the
baseline, and the aims of the host-runtime issue: a converged host at most 12 tasks, a first converge of the two
guests at most 60 s, a cross-host no-op at most 30 s. Speed is reported, never asserted; the exit status says whether
every converge did what it should (the no-op changed nothing).

Usage: .venv/bin/python benchmarks/converge_runtime.py [--baseline REF|none] [--pair] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import yaml  # noqa: E402

from tests.lib.playbook import ansible_playbook, collection_root  # noqa: E402
from tests.testhost import TestHost  # noqa: E402
from tests.testhost.ansible import TESTHOST_ENVIRONMENT  # noqa: E402
from tests.testhost.pair import A_NAME, B_NAME, LinkedPair  # noqa: E402

# The last commit before the host runtime: the role installed the agent and the exporter with ~45 copy tasks.
BASELINE = "cfc4784"
GUESTS = ("demo-a", "demo-b")
STICK = "46f4:0001:KING0001"
MOUSE = "0627:0001:TWIN-A"
PAIR_GUEST = "bench-xhost"
# Both generations of the runtime, removed before each collection's first converge (fixed words, no input).
RESET = (
    "systemctl disable --now kvmhost-usb-agent.service kvmhost-usb-exporter.service 2>/dev/null;"
    " rm -rf /usr/local/lib/kvmhost-usb /usr/lib/kvmhost-usb /usr/local/bin/kvmhost-usb"
    " /etc/systemd/system/kvmhost-usb-agent.service /etc/systemd/system/kvmhost-usb-exporter.service"
    " /etc/modules-load.d/kvmhost-usb-importer.conf /etc/modules-load.d/kvmhost-usb-exporter.conf;"
    " systemctl daemon-reload"
)
AIMS = {"tasks of a no-op converge": 12, "first converge of two guests (s)": 60, "cross-host no-op converge (s)": 30}


def baseline_collections(ref: str, directory: str) -> str:
    """A collections path holding the collection as it was at ``ref``."""
    target = os.path.join(directory, "ansible_collections", "kvmhost", "usb")
    os.makedirs(target)
    archive = subprocess.run(["git", "-C", REPO, "archive", ref], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", target], input=archive, check=True)
    return directory


def converge(inventory: str, collections: str) -> tuple[float, dict, subprocess.CompletedProcess]:
    env = dict(TESTHOST_ENVIRONMENT, ANSIBLE_COLLECTIONS_PATH=collections)
    started = time.monotonic()
    playbook = os.path.join(collections, "ansible_collections", "kvmhost", "usb", "playbooks", "converge.yml")
    process = ansible_playbook(inventory, playbook, env=env)
    seconds = time.monotonic() - started
    if process.returncode != 0:
        raise SystemExit("converge.yml failed:\n%s" % process.stdout[-3000:])
    return seconds, process.recap, process  # type: ignore[attr-defined]


def tasks(recap: dict) -> int:
    return recap["ok"] + recap["skipped"] + recap["failed"]


def declared_inventory(host: TestHost, directory: str, declaration: dict) -> str:
    with open(host.inventory) as handle:
        inventory = yaml.safe_load(handle)
    inventory["all"]["hosts"]["testhost"].update(
        usb_passthrough=dict((name, {"devices": devices}) for name, devices in declaration.items()), usb_passthrough_agent=True
    )
    path = os.path.join(directory, "inventory.yml")
    with open(path, "w") as handle:
        yaml.safe_dump(inventory, handle)
    return path


def one_host(host: TestHost, collections: str, directory: str) -> dict:
    host.ssh("sh", "-c", RESET)
    for name in GUESTS:
        host.remove_guest(name)
        host.create_guest(name)
    figures = {}
    for label, declaration in (("first", {"demo-a": [STICK], "demo-b": [MOUSE]}), ("no-op", {"demo-a": [STICK], "demo-b": [MOUSE]}),
                               ("swap", {"demo-a": [MOUSE], "demo-b": [STICK]})):
        seconds, recap, process = converge(declared_inventory(host, directory, declaration), collections)
        counts = recap["testhost"]
        if label == "no-op" and counts["changed"]:
            raise SystemExit("the no-op converge changed %d tasks:\n%s" % (counts["changed"], process.stdout[-3000:]))
        figures[label] = {"seconds": round(seconds, 1), "tasks": tasks(counts), "changed": counts["changed"]}
        print("    %-6s %6.1f s  %3d tasks  %2d changed" % (label, seconds, tasks(counts), counts["changed"]), flush=True)
    for name in GUESTS:
        host.remove_guest(name)
    return figures


def cross_host(pair: LinkedPair, collections: str, directory: str) -> dict:
    for host in (pair.a, pair.b):
        host.ssh("sh", "-c", RESET)
    pair.b.remove_guest(PAIR_GUEST)
    pair.b.create_guest(PAIR_GUEST, start=False)
    hostvars = {B_NAME: {"usb_passthrough": {PAIR_GUEST: {"devices": [{"host": A_NAME, "id": STICK}]}}}}
    inventory = pair.inventory(directory, hostvars)
    figures = {}
    for label in ("first", "no-op"):
        seconds, recap, process = converge(inventory, collections)
        changed = sum(counts["changed"] for counts in recap.values())
        if label == "no-op" and changed:
            raise SystemExit("the cross-host no-op converge changed %d tasks:\n%s" % (changed, process.stdout[-3000:]))
        figures[label] = {"seconds": round(seconds, 1), "tasks": max(tasks(counts) for counts in recap.values()), "changed": changed}
        print("    %-6s %6.1f s  %3d tasks (most on one host)  %2d changed" % (label, seconds, figures[label]["tasks"], changed), flush=True)
    # Give the stick back to A: an empty declaration ends the export and the import.
    converge(pair.inventory(directory, {B_NAME: {"usb_passthrough": {}}}), collections)
    pair.b.remove_guest(PAIR_GUEST)
    return figures


def ratios(results: dict, part: str) -> None:
    if "baseline" not in results:
        return
    for label in results["current"][part]:
        now, then = results["current"][part][label], results["baseline"][part][label]
        print("  %-6s this checkout / baseline: %.2f in time (%.1f s vs %.1f s), %d vs %d tasks" % (
            label, now["seconds"] / then["seconds"], now["seconds"], then["seconds"], now["tasks"], then["tasks"]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--baseline", default=BASELINE, help="the commit to compare with, or none (default %(default)s)")
    parser.add_argument("--pair", action="store_true", help="also the cross-host converge on the two linked test hosts")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="kvmhost-usb-bench-converge-")
    collections = {"current": collection_root()}
    if args.baseline != "none":
        collections = {"baseline": baseline_collections(args.baseline, os.path.join(work, "baseline")), **collections}
    results: dict = dict((name, {}) for name in collections)
    try:
        host = TestHost("bench-converge").start()
        try:
            for name, path in collections.items():
                print("== one host, %s (%s)" % (name, args.baseline if name == "baseline" else "this checkout"), flush=True)
                directory = tempfile.mkdtemp(dir=work)
                results[name]["host"] = one_host(host, path, directory)
            host.ssh("sh", "-c", RESET)
        finally:
            host.remove()
        if args.pair:
            with LinkedPair("bench-converge") as pair:
                for name, path in collections.items():
                    print("== the linked pair, %s" % name, flush=True)
                    results[name]["pair"] = cross_host(pair, path, tempfile.mkdtemp(dir=work))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print("\n== Ratios")
    ratios(results, "host")
    if args.pair:
        ratios(results, "pair")
    current = results["current"]
    print("\n== Aims of the host-runtime issue (this checkout)")
    reached = {
        "tasks of a no-op converge": current["host"]["no-op"]["tasks"],
        "first converge of two guests (s)": current["host"]["first"]["seconds"],
    }
    if args.pair:
        reached["cross-host no-op converge (s)"] = current["pair"]["no-op"]["seconds"]
    for aim, value in reached.items():
        print("  %-34s %6.1f  (aim <= %d: %s)" % (aim, value, AIMS[aim], "met" if value <= AIMS[aim] else "NOT met"))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
