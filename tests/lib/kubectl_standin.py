"""A stand-in for kubectl that records its calls: the tests of the host role's kubectl and rollout
strategies cannot meet a real Kubernetes cluster, so this plays one daemonset and its pods.

It keeps its state in $KUBECTL_STANDIN_DIR: ``config.json`` (written by the test), ``state.json``
(the pods, made from the config on the first call) and ``calls.jsonl`` (one argv per line).

config.json: ``nodes`` (one Running pod of the daemonset each), ``pending_polls`` (how many
``get pods`` a replacement pod stays Pending before it is Running; -1 for never), ``rollout_fails``.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys

SELECTOR = {"app": "host", "component": "default-host"}


def pod(node, generation, phase):
    name = "default-host-%s-%d" % (node, generation)
    return {"metadata": {"name": name, "uid": "uid-%s-%d" % (node, generation)}, "spec": {"nodeName": node}, "status": {"phase": phase}}


def main(argv):
    directory = os.environ["KUBECTL_STANDIN_DIR"]
    with open(os.path.join(directory, "lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with open(os.path.join(directory, "calls.jsonl"), "a") as calls:
            calls.write(json.dumps(argv) + "\n")
        with open(os.path.join(directory, "config.json")) as handle:
            config = json.load(handle)
        state_path = os.path.join(directory, "state.json")
        if os.path.exists(state_path):
            with open(state_path) as handle:
                state = json.load(handle)
        else:
            state = {"pods": [pod(node, 1, "Running") for node in config["nodes"]], "polls": {}}
        code = run(argv, config, state)
        with open(state_path, "w") as handle:
            json.dump(state, handle)
    return code


def run(argv, config, state):
    options = dict(arg[2:].split("=", 1) for arg in argv if arg.startswith("--") and "=" in arg)
    words = [arg for arg in argv if not arg.startswith("--")]
    if options.get("namespace") != "onecloud":
        sys.stderr.write("Error from server (NotFound): namespaces %r not found\n" % options.get("namespace"))
        return 1
    if words[:3] == ["get", "daemonset", "default-host"]:
        print(json.dumps({"kind": "DaemonSet", "metadata": {"name": "default-host"}, "spec": {"selector": {"matchLabels": SELECTOR}}}))
        return 0
    if words[:2] == ["get", "pods"]:
        wanted = dict(pair.split("=", 1) for pair in options["selector"].split(","))
        if wanted != SELECTOR:
            print(json.dumps({"kind": "List", "items": []}))
            return 0
        node = options["field-selector"].split("=", 1)[1]
        items = [item for item in state["pods"] if item["spec"]["nodeName"] == node]
        for item in items:
            if item["status"]["phase"] == "Pending":
                polls = state["polls"].get(item["metadata"]["name"], 0) + 1
                state["polls"][item["metadata"]["name"]] = polls
                if config["pending_polls"] >= 0 and polls > config["pending_polls"]:
                    item["status"]["phase"] = "Running"
        print(json.dumps({"kind": "List", "items": items}))
        return 0
    if words[:2] == ["delete", "pod"]:
        for name in words[2:]:
            [gone] = [item for item in state["pods"] if item["metadata"]["name"] == name]
            state["pods"].remove(gone)
            node = gone["spec"]["nodeName"]
            generation = int(name.rsplit("-", 1)[1]) + 1
            state["pods"].append(pod(node, generation, "Pending"))
            print('pod "%s" deleted' % name)
        return 0
    if words[:3] == ["rollout", "restart", "daemonset/default-host"]:
        print("daemonset.apps/default-host restarted")
        return 0
    if words[:3] == ["rollout", "status", "daemonset/default-host"]:
        if config.get("rollout_fails"):
            sys.stderr.write("error: timed out waiting for the condition\n")
            return 1
        print('daemon set "default-host" successfully rolled out')
        return 0
    sys.stderr.write("kubectl stand-in: unexpected call %s\n" % argv)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
