# Copyright (c) 2026, kvmhost.usb contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Two USB devices to each of 10, 50 and 100 guests of one host: the converge, three ways, in one run.

* passthrough: a playbook with ONE ``kvmhost.usb.usb_passthrough`` task declaring every guest;
* attach: a playbook with one ``kvmhost.usb.usb_attach`` run per guest (a looped task, both of the
  guest's devices per item), as the passthrough role converged before usb_passthrough;
* virsh: the baseline, a playbook looping ``ansible.builtin.command: virsh attach-device --config``
  over the devices, with the XML files written beforehand (not timed) and the usual
  ``changed_when`` / ``failed_when`` so that a re-run, which virsh answers with "already in the
  domain configuration", is a no-op.

Each is timed on fresh guests (first converge) and right after on the same guests (the no-op
re-run); beside them two floors, what Ansible alone costs for one task and for one module run per
guest (``ansible.builtin.command: true``). It prints the medians, the ratios against the virsh
loop (and attach / passthrough), the most any module run in one task could reach against the
loop (virsh / the one-task floor), how each time grows with the guests (time per guest, the
slope, the ratio of the largest to the smallest size), the load average during each size, and
the aims of issue 10: no-op re-run at least 5x faster than the virsh loop at 10 guests and 20x
at 100, first converge at least 3x at 10.

This machine has no USB: the devices are a umockdev tree of hubs and 200 leaves
(tests/lib/bigtree.py), each with a serial of its own. The script runs itself again under
``umockdev-run`` with that tree, so the testbed is set up once (several seconds for 200 devices,
no part of any figure) and every playbook run sees it. The guests are defined, stopped, diskless
domains of a libvirtd of the benchmark's own (tests/lib/libvirtd.py, as in the unit tests); every
change is to their persistent configuration (hot attach is not measured). The modules take a lock
file of their own (KVMHOST_USB_LOCK), so other checkouts' tests holding the host lock do not stall
them. Speed is reported, never asserted: the exit status says whether the runs did what they
should (every guest holds exactly its two devices, the re-runs changed nothing).

Usage: .venv/bin/python benchmarks/converge_guests.py [--guests 10,50,100] [--first-runs 1]
       [--noop-runs 3] [--floor-runs 1] [--methods passthrough,attach,virsh] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tests.lib.modrun import collection_root  # noqa: E402

sys.path.insert(0, collection_root())

import libvirt  # noqa: E402

from ansible_collections.kvmhost.usb.plugins.module_utils import _usb  # noqa: E402
from tests.lib import bigtree, domains, libvirtd, usbtree  # noqa: E402
from tests.lib.playbook import ansible_playbook  # noqa: E402

PREFIX = "kvmhost-usb-bench-"
DEVICES_PER_GUEST = 2
# The host has as many devices whatever the number of guests, so that the sizes compare.
TREE_LEAVES = 200
# The kinds of bigtree leaves whose every device has a serial of its own.
KINDS = ("kingston", "ftdi", "arduino", "webcam", "ups", "dongle", "t7", "kingston3", "sandisk")
METHODS = ("passthrough", "attach", "virsh")
LABELS = {
    "passthrough": "(a) usb_passthrough, one task",
    "attach": "(b) usb_attach, one run per guest",
    "virsh": "(c) virsh attach-device --config loop",
    "floor 1": "Ansible floor, one task",
    "floor N": "Ansible floor, one task run per guest",
}
# (phase, guests, virsh / passthrough at least)
AIMS = (("no-op", 10, 5.0), ("no-op", 100, 20.0), ("first", 10, 3.0))

PLAYBOOKS = {
    "passthrough": """- name: The declared USB state of every guest, in one task
  hosts: localhost
  connection: local
  gather_facts: false
  tasks:
    - name: One usb_passthrough for the whole host
      kvmhost.usb.usb_passthrough:
        uri: "{{ uri }}"
        domains: "{{ declaration }}"
""",
    "attach": """- name: The declared USB state, one usb_attach per guest
  hosts: localhost
  connection: local
  gather_facts: false
  tasks:
    - name: One usb_attach per guest
      kvmhost.usb.usb_attach:
        uri: "{{ uri }}"
        domain: "{{ item.key }}"
        devices: "{{ item.value.devices }}"
      loop: "{{ declaration | dict2items }}"
""",
    "virsh": """- name: Pass two USB devices to each guest, the way it is done today
  hosts: localhost
  connection: local
  gather_facts: false
  tasks:
    - name: One virsh attach-device per device
      ansible.builtin.command: virsh -c {{ uri | quote }} attach-device {{ item.domain }} {{ item.file }} --config
      loop: "{{ attachments }}"
      register: attached
      changed_when: attached.rc == 0
      failed_when: attached.rc != 0 and 'already in the domain configuration' not in attached.stderr
""",
    "floor 1": """- name: What Ansible alone costs for one task
  hosts: localhost
  connection: local
  gather_facts: false
  tasks:
    - name: One module run that does nothing
      ansible.builtin.command: "true"
      changed_when: false
""",
    "floor N": """- name: What Ansible alone costs for one task run per guest
  hosts: localhost
  connection: local
  gather_facts: false
  tasks:
    - name: One module run per guest that does nothing
      ansible.builtin.command: "true"
      loop: "{{ declaration | dict2items }}"
      changed_when: false
""",
}


def host_devices(leaves):
    """The smallest bigtree host of KINDS with at least ``leaves`` devices that are not hubs."""
    count = leaves
    while True:
        tree = bigtree.fleet_host(count, kinds=KINDS)
        if len([device for device in tree if device.get("device_class") != "09"]) >= leaves:
            return tree
        count += 1


def guest_name(number):
    return "%s%03d" % (PREFIX, number)


def plan(guests, candidates, workdir):
    """The variables of the playbooks for the first ``guests`` guests: each guest's two devices by
    the id usb_facts reports (for the modules) and by vendor, product and address (for virsh)."""
    declaration = {}
    attachments = []
    expected = {}
    for number in range(1, guests + 1):
        name = guest_name(number)
        pair = candidates[(number - 1) * DEVICES_PER_GUEST:number * DEVICES_PER_GUEST]
        declaration[name] = {"devices": [device["id"] for device in pair]}
        expected[name] = sorted((device["bus"], device["device"]) for device in pair)
        for device in pair:
            path = os.path.join(workdir, "%s-%d-%d.xml" % (name, device["bus"], device["device"]))
            with open(path, "w") as handle:
                handle.write(
                    "<hostdev mode='subsystem' type='usb'><source><vendor id='0x%s'/><product id='0x%s'/>"
                    "<address bus='%d' device='%d'/></source></hostdev>\n" % (device["vendor_id"], device["product_id"], device["bus"], device["device"])
                )
            attachments.append({"domain": name, "file": path})
    return {"declaration": declaration, "attachments": attachments, "uri": domains.URI}, expected


def remove_all(conn):
    for domain in conn.listAllDomains(0):
        if domain.name().startswith(PREFIX):
            domains.undefine(conn, domain.name())


def fresh_guests(conn, guests):
    remove_all(conn)
    for number in range(1, guests + 1):
        conn.defineXML(domains.DOMAIN_XML.format(name=guest_name(number), devices=""))


def holdings(conn, expected):
    """The guests whose persistent configuration does not hold exactly their two devices (by address)."""
    wrong = []
    for name, addresses in expected.items():
        root = ET.fromstring(conn.lookupByName(name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        held = sorted(
            (int(address.get("bus")), int(address.get("device")))
            for address in root.findall("./devices/hostdev[@type='usb']/source/address")
        )
        if held != addresses or len(root.findall("./devices/hostdev[@type='usb']")) != len(addresses):
            wrong.append(name)
    return wrong


def run_playbook(playbook, variables, lock):
    options = ["-e", "@" + variables, "-e", "ansible_python_interpreter=%s" % sys.executable]
    started = time.perf_counter()
    process = ansible_playbook("localhost,", playbook, *options, env={"KVMHOST_USB_LOCK": lock})
    elapsed = time.perf_counter() - started
    recap = process.recap.get("localhost")
    if process.returncode != 0 or not recap:
        raise SystemExit("ansible-playbook %s failed (rc %d):\n%s\n%s" % (playbook, process.returncode, process.stdout[-4000:], process.stderr[-2000:]))
    return elapsed, recap["changed"]


def load():
    return "load %.2f %.2f %.2f" % os.getloadavg()


def measure(conn, guests, methods, options, files):
    """{(method, phase): [seconds]} for one number of guests; False in ``sound`` when a run did not do what it should."""
    variables, expected = files["plans"][guests]
    times = {}
    sound = True
    for method in methods:
        for _run in range(options.first_runs):
            fresh_guests(conn, guests)
            seconds, changed = run_playbook(files[method], variables, files["lock"])
            wrong = holdings(conn, expected)
            ok = changed == 1 and not wrong
            sound = sound and ok
            times.setdefault((method, "first"), []).append(seconds)
            print("%3d guests  %-11s first  %7.2f s  changed %d%s" % (guests, method, seconds, changed, report(ok, wrong)), flush=True)
        for _run in range(options.noop_runs):
            seconds, changed = run_playbook(files[method], variables, files["lock"])
            wrong = holdings(conn, expected)
            ok = changed == 0 and not wrong
            sound = sound and ok
            times.setdefault((method, "no-op"), []).append(seconds)
            print("%3d guests  %-11s no-op  %7.2f s  changed %d%s" % (guests, method, seconds, changed, report(ok, wrong)), flush=True)
    for floor in ("floor 1", "floor N"):
        for _run in range(options.floor_runs):
            seconds, _changed = run_playbook(files[floor], variables, files["lock"])
            times.setdefault((floor, "floor"), []).append(seconds)
            print("%3d guests  %-11s        %7.2f s" % (guests, floor, seconds), flush=True)
    return times, sound


def report(ok, wrong):
    if ok:
        return ""
    return "  UNSOUND%s" % (" (wrong devices: %s)" % ", ".join(wrong[:5]) if wrong else "")


def ratio(numerator, denominator):
    if numerator is None or denominator is None:
        return None
    return numerator / denominator


def table(title, sizes, rows, fmt):
    """Rows of (label, {guests: value or None}) under one column per number of guests."""
    print()
    print(title)
    print("  %-46s" % "" + "".join("%12s" % ("%d guests" % guests) for guests in sizes))
    for label, values in rows:
        print("  %-46s" % label + "".join("%12s" % ("-" if values.get(guests) is None else fmt % values[guests]) for guests in sizes))


def summarize(medians, sizes, methods, loads, options):
    runs = [(method, phase) for method in methods for phase in ("first", "no-op")] + [("floor 1", "floor"), ("floor N", "floor")]

    def label(method, phase):
        return LABELS[method] if phase == "floor" else "%s, %s" % (LABELS[method], phase)

    def values(method, phase):
        return dict((guests, medians.get((guests, method, phase))) for guests in sizes)

    table(
        "Seconds (first converge on fresh guests: %d run(s), median; no-op re-run: median of %d; floors: %d run(s)); "
        "own libvirtd, persistent config of stopped diskless guests, 2 USB devices per guest from umockdev:"
        % (options.first_runs, options.noop_runs, options.floor_runs),
        sizes,
        [(label(method, phase), values(method, phase)) for method, phase in runs],
        "%.2f",
    )
    pairs = [pair for pair in (("virsh", "passthrough"), ("virsh", "attach"), ("attach", "passthrough")) if pair[0] in methods and pair[1] in methods]
    table(
        "How many times faster (ratio of the medians):",
        sizes,
        [
            ("%s / %s, %s" % (slow, fast, phase), dict((g, ratio(medians.get((g, slow, phase)), medians.get((g, fast, phase)))) for g in sizes))
            for slow, fast in pairs
            for phase in ("first", "no-op")
        ],
        "%.2fx",
    )
    if "virsh" in methods:
        table(
            "The most any module run in one task could reach against the virsh loop (virsh / Ansible floor, one task):",
            sizes,
            [
                ("virsh / floor 1, %s" % phase, dict((g, ratio(medians.get((g, "virsh", phase)), medians.get((g, "floor 1", "floor")))) for g in sizes))
                for phase in ("first", "no-op")
            ],
            "%.2fx",
        )
    table(
        "Seconds per guest:",
        sizes,
        [(label(method, phase), dict((g, None if v is None else v / g) for g, v in values(method, phase).items())) for method, phase in runs],
        "%.3f",
    )
    small, large = sizes[0], sizes[-1]
    if large != small:
        print()
        print("Growth from %d to %d guests (%.0fx the guests): seconds added per guest, and the ratio of the times" % (small, large, large / small))
        for method, phase in runs:
            first, last = medians.get((small, method, phase)), medians.get((large, method, phase))
            if first is not None and last is not None:
                print("  %-46s %7.3f s/guest  %6.2fx" % (label(method, phase), (last - first) / (large - small), last / first))
    print()
    print("Load average (1 min) before and after each size: %s" % "; ".join("%d guests %s" % (guests, loads[guests]) for guests in sizes))
    print()
    print("Aims of issue 10 (virsh loop / usb_passthrough):")
    for phase, guests, aim in AIMS:
        value = ratio(medians.get((guests, "virsh", phase)), medians.get((guests, "passthrough", phase)))
        if value is None:
            print("  %s at %d guests >= %.0fx: not measured" % (phase, guests, aim))
        else:
            print("  %s at %d guests >= %.0fx: %.2fx, %s" % (phase, guests, aim, value, "met" if value >= aim else "not met"))
    if "passthrough" in methods and "virsh" in methods:

        def ratios(phase):
            return ", ".join("%.1fx" % ratio(medians[(g, "virsh", phase)], medians[(g, "passthrough", phase)]) for g in sizes)

        print(
            "QUOTE: %s guests x 2 USB devices, usb_passthrough vs a virsh attach-device loop: first converge %s faster; no-op re-run %s faster"
            % ("/".join(str(guests) for guests in sizes), ratios("first"), ratios("no-op"))
        )


def inner(options, sizes, methods):
    """Under umockdev-run, set up once for every playbook run (its cost is no part of any figure)."""
    conn = libvirt.open(domains.URI)
    print("%s, start: %s" % (time.strftime("%Y-%m-%d %H:%M:%S"), load()), flush=True)
    all_times = {}
    loads = {}
    sound = True
    devices = _usb.enumerate_devices()
    candidates = _usb.passthrough_candidates(devices)
    if len(candidates) < sizes[-1] * DEVICES_PER_GUEST or len(set(device["id"] for device in candidates)) != len(candidates):
        raise SystemExit("the umockdev tree has %d devices to pass through, not %d with ids of their own" % (len(candidates), sizes[-1] * DEVICES_PER_GUEST))
    with tempfile.TemporaryDirectory(prefix="kvmhost-usb-bench-") as workdir:
        files = {"lock": os.path.join(workdir, "kvmhost-usb.lock"), "plans": {}}
        for guests in sizes:
            variables, expected = plan(guests, candidates, workdir)
            files["plans"][guests] = (os.path.join(workdir, "vars-%d.json" % guests), expected)
            with open(files["plans"][guests][0], "w") as handle:
                json.dump(variables, handle)
        for name, playbook in PLAYBOOKS.items():
            files[name] = os.path.join(workdir, name.replace(" ", "-") + ".yml")
            with open(files[name], "w") as handle:
                handle.write(playbook)
        print(
            "%d USB devices in the umockdev tree (%d of them hubs and root hubs), %d passed through at most"
            % (len(devices), len(devices) - len(candidates), sizes[-1] * DEVICES_PER_GUEST),
            flush=True,
        )
        try:
            for guests in sizes:
                before = os.getloadavg()[0]
                times, ok = measure(conn, guests, methods, options, files)
                loads[guests] = "%.2f -> %.2f" % (before, os.getloadavg()[0])
                sound = sound and ok
                for (method, phase), values in times.items():
                    all_times[(guests, method, phase)] = values
        finally:
            remove_all(conn)
            conn.close()

    medians = dict((key, statistics.median(values)) for key, values in all_times.items())
    summarize(medians, sizes, methods, loads, options)
    print("%s, end: %s" % (time.strftime("%Y-%m-%d %H:%M:%S"), load()))
    if options.json:
        with open(options.json, "w") as handle:
            json.dump(
                {"times": [{"guests": g, "method": m, "phase": p, "seconds": v} for (g, m, p), v in sorted(all_times.items())], "load": loads},
                handle,
                indent=1,
            )
    return 0 if sound else 1


def outer(sizes):
    """Start the benchmark's libvirtd (outside the testbed), write the tree and run this script again under umockdev-run with it."""
    if shutil.which("umockdev-run") is None:
        print("umockdev-run is not installed (Debian: umockdev); cannot benchmark", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="kvmhost-usb-bench-") as workdir:
        tree = os.path.join(workdir, "tree.umockdev")
        with open(tree, "w") as handle:
            handle.write(usbtree.render(host_devices(max(TREE_LEAVES, sizes[-1] * DEVICES_PER_GUEST))))
        command = ["umockdev-run", "-d", tree, "--", sys.executable, os.path.abspath(__file__), "--inner"] + sys.argv[1:]
        with libvirtd.running():
            return subprocess.run(command, check=False).returncode


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--guests", default="10,50,100", help="numbers of guests, comma-separated")
    parser.add_argument("--first-runs", type=int, default=1)
    parser.add_argument("--noop-runs", type=int, default=3)
    parser.add_argument("--floor-runs", type=int, default=1)
    parser.add_argument("--methods", default=",".join(METHODS), help="some of %s" % ", ".join(METHODS))
    parser.add_argument("--json", help="also write the times to this file")
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args()
    sizes = sorted(int(guests) for guests in options.guests.split(","))
    methods = [method for method in METHODS if method in options.methods.split(",")]
    if options.json:
        options.json = os.path.abspath(options.json)
    return inner(options, sizes, methods) if options.inner else outer(sizes)


if __name__ == "__main__":
    sys.exit(main())
