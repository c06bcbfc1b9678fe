"""Run one planner operation (usb_attach, usb_detach or usb_passthrough's converge) with a pause in it, so that a
test can change the host between the plan and its steps. Run as a script on the host the planner works on, with
the collection's module_utils importable (the unit tier: under umockdev-run; the test host: a copy over SSH).

    python3 midchange_driver.py '{"operation": "attach", "args": {...}, "uri": ..., "pause": "execute"}'

``pause`` is ``"execute"`` (after the plan, before any step and its checks) or ``"step N"`` (just before
the N-th libvirt call of the steps, 0 first, after the planner's own checks for it). At the pause the driver
prints one line ``paused {"steps": [...], "umockdev_dir": ...}`` and waits for a line on stdin; at the end
it prints ``result {...}`` (the operation's result) or ``failed {"msg": ...}``. Nothing else is changed: the
planner, libvirt and udev are the real ones, the pause only waits.
"""

from __future__ import annotations

import json
import os
import sys

from ansible_collections.kvmhost.usb.plugins.module_utils import _declaration, _libvirt, _passthrough, _usb


def say(word, data):
    sys.stdout.write("%s %s\n" % (word, json.dumps(data, sort_keys=True)))
    sys.stdout.flush()


def pause(planner):
    say("paused", {"steps": [step.describe() for step in planner.ordered_steps()], "umockdev_dir": os.environ.get("UMOCKDEV_DIR")})
    sys.stdin.readline()


def paused_before_execute(planner):
    execute = planner.execute

    def paused():
        pause(planner)
        return execute()

    planner.execute = paused


def paused_before_step(planner, number):
    carry_out = _passthrough._carry_out
    calls = []

    def paused(step, undo=False):
        if not undo and len(calls) == number:
            pause(planner)
        calls.append(step)
        return carry_out(step, undo)

    _passthrough._carry_out = paused


def main():
    request = json.loads(sys.argv[1])
    conn = _libvirt.connect(request.get("uri", "qemu:///system"))
    planner = _passthrough.Planner(conn, request.get("uri", "qemu:///system"), False)
    where = request.get("pause", "execute")
    if where == "execute":
        paused_before_execute(planner)
    else:
        paused_before_step(planner, int(where.split()[1]))
    args = request["args"]
    try:
        if request["operation"] == "attach":
            result = planner.attach(args["domain"], _declaration.normalize_selectors(args["devices"]), **args.get("options", {}))
        elif request["operation"] == "detach":
            result = planner.detach(args.get("domain"), _declaration.normalize_selectors(args["devices"]))
        else:
            result = planner.converge(args["domains"], **args.get("options", {}))
    except (_passthrough.PassthroughError, _usb.SelectorError) as error:
        say("failed", {"msg": str(error)})
        return 1
    finally:
        conn.close()
    result.pop("diff", None)
    say("result", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
