# Copyright (c) 2026, kvmhost.usb contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Two USB devices to each of 10 guests of one host: usb_attach against the loop operators write today.

* ours: a playbook with one ``kvmhost.usb.usb_attach`` task per guest (a loop over the 10 guests,
  each item both of the guest's devices);
* floor: the same playbook shape as ours with ``ansible.builtin.command: true`` in place of
  usb_attach: what Ansible itself costs for ten module runs, which no module can go below;
* loop: a playbook looping ``ansible.builtin.command: virsh attach-device --config`` over the 20
  devices, with the XML files written beforehand (not timed) and the usual ``changed_when`` /
  ``failed_when`` so that a re-run, which virsh answers with "already in the domain
  configuration", is a no-op.

Each is timed on fresh guests (first run) and again right after (the no-op re-run), round after
round, interleaved, and the medians and ratios printed. Aim: our no-op re-run at least 5x faster
than the loop's.

This machine has no USB: the 20 devices are a umockdev tree (both playbooks run under
``umockdev-run``), the guests are defined, stopped, diskless domains of a libvirtd of the
benchmark's own (tests/lib/libvirtd.py, as in the unit tests), and every change is to their
persistent configuration. Hot attach is not measured. Speed is reported, never asserted: the exit status says whether the runs did what
they should (every guest holds its two devices, the re-runs changed nothing).

Usage: .venv/bin/python benchmarks/attach_ten_guests.py [--rounds 3] [--guests 10]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import libvirt  # noqa: E402

from tests.lib import libvirtd, usbtree  # noqa: E402
from tests.lib.domains import URI  # noqa: E402
from tests.lib.modrun import collection_root  # noqa: E402

AIM_NOOP = 5.0
PREFIX = "kvmhost-usb-bench-"
DOMAIN_XML = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices><controller type='usb' index='0' model='qemu-xhci'/><memballoon model='none'/></devices>
</domain>"""

OURS = """- name: Pass two USB devices to each guest
  hosts: localhost
  connection: local
  gather_facts: false
  tasks:
    - name: One usb_attach per guest
      kvmhost.usb.usb_attach:
        domain: "{{ item.domain }}"
        devices: "{{ item.devices }}"
        uri: "{{ uri }}"
      loop: "{{ guests }}"
"""

LOOP = """- name: Pass two USB devices to each guest, the way it is done today
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
"""

FLOOR = """- name: What Ansible alone costs for one task per guest
  hosts: localhost
  connection: local
  gather_facts: false
  tasks:
    - name: One module run per guest that does nothing
      ansible.builtin.command: "true"
      loop: "{{ guests }}"
      changed_when: false
"""

RECAP = re.compile(r"localhost\s+: ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)")


def devices(guests):
    """Per guest a storage stick and a tablet; all sticks, and all tablets, share one vendor:product."""
    tree = [usbtree.root_hub(1), usbtree.root_hub(2, usb3=True)]
    for number in range(1, guests + 1):
        tree.append(
            {
                "port": "2-%d" % number, "vendor_id": "0951", "product_id": "1666", "devnum": number + 1,
                "manufacturer": "Kingston", "product": "DataTraveler 3.0", "serial": "STICK%04d" % number,
                "speed": "5000", "version": " 3.20", "interfaces": [("08", "usb-storage")],
            }
        )
        tree.append(
            {
                "port": "1-%d" % number, "vendor_id": "0627", "product_id": "0001", "devnum": number + 1,
                "manufacturer": "QEMU", "product": "QEMU USB Tablet", "serial": "TABLET%04d" % number,
                "speed": "480", "version": " 2.00", "interfaces": [("03", "usbhid")],
            }
        )
    return tree


def plan(guests, workdir):
    """The variables of both playbooks: the same 20 devices, each to the same guest."""
    ours = []
    attachments = []
    for number in range(1, guests + 1):
        domain = "%s%02d" % (PREFIX, number)
        pair = [("0951", "1666", 2, "STICK%04d" % number), ("0627", "0001", 1, "TABLET%04d" % number)]
        ours.append({"domain": domain, "devices": [{"vendor_id": v, "product_id": p, "serial": s} for v, p, _bus, s in pair]})
        for vendor, product, bus, serial in pair:
            path = os.path.join(workdir, "%s-%s.xml" % (domain, serial))
            with open(path, "w") as handle:
                handle.write(
                    "<hostdev mode='subsystem' type='usb'><source><vendor id='0x%s'/><product id='0x%s'/>"
                    "<address bus='%d' device='%d'/></source></hostdev>\n" % (vendor, product, bus, number + 1)
                )
            attachments.append({"domain": domain, "file": path})
    return {"guests": ours, "attachments": attachments, "uri": URI}


def quiet(ctx, error):
    return None


def fresh_guests(conn, guests):
    for number in range(1, guests + 1):
        name = "%s%02d" % (PREFIX, number)
        remove(conn, name)
        conn.defineXML(DOMAIN_XML.format(name=name))


def remove(conn, name):
    try:
        domain = conn.lookupByName(name)
    except libvirt.libvirtError:
        return
    if domain.isActive():
        domain.destroy()
    domain.undefine()


def remove_all(conn):
    for domain in conn.listAllDomains(0):
        if domain.name().startswith(PREFIX):
            remove(conn, domain.name())


def hostdev_count(conn, guests):
    counts = []
    for number in range(1, guests + 1):
        xml = conn.lookupByName("%s%02d" % (PREFIX, number)).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        counts.append(xml.count("<hostdev "))
    return counts


def run_playbook(playbook, variables, tree):
    env = dict(
        os.environ,
        ANSIBLE_COLLECTIONS_PATH=collection_root(),
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_RETRY_FILES_ENABLED="0",
        ANSIBLE_LOCALHOST_WARNING="0",
        ANSIBLE_INVENTORY_UNPARSED_WARNING="0",
    )
    command = [
        "umockdev-run", "-d", tree, "--",
        os.path.join(os.path.dirname(sys.executable), "ansible-playbook"),
        "-i", "localhost,", playbook,
        "-e", "@" + variables,
        "-e", "ansible_python_interpreter=%s" % sys.executable,
    ]
    started = time.perf_counter()
    process = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800, check=False)
    elapsed = time.perf_counter() - started
    recap = RECAP.search(process.stdout)
    if process.returncode != 0 or not recap:
        raise SystemExit("ansible-playbook %s failed (rc %d):\n%s\n%s" % (playbook, process.returncode, process.stdout[-4000:], process.stderr[-2000:]))
    return elapsed, int(recap.group(2))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--guests", type=int, default=10)
    options = parser.parse_args()

    libvirt.registerErrorHandler(quiet, None)
    conn = libvirt.open(URI)
    times = {"ours": [], "ours no-op": [], "loop": [], "loop no-op": [], "floor": []}
    sound = True
    with tempfile.TemporaryDirectory(prefix="kvmhost-usb-bench-") as workdir:
        tree = os.path.join(workdir, "tree.umockdev")
        with open(tree, "w") as handle:
            handle.write(usbtree.render(devices(options.guests)))
        variables = os.path.join(workdir, "vars.json")
        with open(variables, "w") as handle:
            json.dump(plan(options.guests, workdir), handle)
        playbooks = {}
        for name, text in (("ours", OURS), ("loop", LOOP), ("floor", FLOOR)):
            playbooks[name] = os.path.join(workdir, name + ".yml")
            with open(playbooks[name], "w") as handle:
                handle.write(text)
        try:
            for round_number in range(1, options.rounds + 1):
                for name in ("ours", "loop"):
                    fresh_guests(conn, options.guests)
                    first, changed = run_playbook(playbooks[name], variables, tree)
                    noop, changed_again = run_playbook(playbooks[name], variables, tree)
                    counts = hostdev_count(conn, options.guests)
                    # The recap counts changed tasks, not items: one looped task each.
                    ok = changed == 1 and changed_again == 0 and counts == [2] * options.guests
                    sound = sound and ok
                    times[name].append(first)
                    times[name + " no-op"].append(noop)
                    print(
                        "round %d %-4s first %6.2f s (%d changed), no-op %6.2f s (%d changed), hostdevs per guest %s%s"
                        % (round_number, name, first, changed, noop, changed_again, sorted(set(counts)), "" if ok else "  UNSOUND"),
                        flush=True,
                    )
                floor, _changed = run_playbook(playbooks["floor"], variables, tree)
                times["floor"].append(floor)
                print("round %d floor %6.2f s (%d x command: true)" % (round_number, floor, options.guests), flush=True)
        finally:
            remove_all(conn)
            conn.close()

    median = dict((name, statistics.median(values)) for name, values in times.items())
    print()
    print(
        "%d guests x 2 devices, %d rounds, medians (own libvirtd, persistent config of stopped guests, USB from umockdev):"
        % (options.guests, options.rounds)
    )
    for name in ("ours", "loop", "ours no-op", "loop no-op", "floor"):
        print("  %-11s %6.2f s" % (name, median[name]))
    first_ratio = median["loop"] / median["ours"]
    noop_ratio = median["loop no-op"] / median["ours no-op"]
    print("  first run: loop / ours = %.2fx" % first_ratio)
    print(
        "  no-op re-run: loop / ours = %.2fx (aim: at least %.0fx: %s)" % (noop_ratio, AIM_NOOP, "met" if noop_ratio >= AIM_NOOP else "not met")
    )
    print(
        "  ours no-op / floor = %.2fx (what usb_attach adds to Ansible's own cost of %d module runs)"
        % (median["ours no-op"] / median["floor"], options.guests)
    )
    print(
        "  best no-op ratio any module run once per guest could reach here: loop no-op / floor = %.2fx"
        % (median["loop no-op"] / median["floor"])
    )
    print(
        "QUOTE: %d guests x 2 USB devices: usb_attach %.2f s vs virsh loop %.2f s (%.2fx); no-op re-run %.2f s vs %.2f s (%.2fx)"
        % (options.guests, median["ours"], median["loop"], first_ratio, median["ours no-op"], median["loop no-op"], noop_ratio)
    )
    return 0 if sound else 1


if __name__ == "__main__":
    with libvirtd.running():
        STATUS = main()
    sys.exit(STATUS)
