"""The collection as it is published: the tarball `ansible-galaxy collection build` makes, and that tarball installed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)


def tool_env(**extra):
    """The environment the publishing tools run in: this venv's tools first, only this checkout's collection."""
    env = dict(os.environ, PATH=os.pathsep.join([BIN, os.environ.get("PATH", "")]))
    env["ANSIBLE_COLLECTIONS_PATH"] = os.path.join(REPO, "build", "collections")
    env.update(extra)
    return env


def run_tool(*command, cwd=REPO, env=None, check=True):
    """Run a publishing tool from this venv; the completed process, its output as text."""
    process = subprocess.run(list(command), cwd=cwd, env=env or tool_env(), capture_output=True, text=True, check=False)
    if check and process.returncode != 0:
        raise AssertionError("%s exited %s:\n%s\n%s" % (" ".join(command), process.returncode, process.stdout, process.stderr))
    return process


def galaxy_metadata():
    with open(os.path.join(REPO, "galaxy.yml")) as handle:
        return yaml.safe_load(handle)


@pytest.fixture(scope="session")
def tarball(tmp_path_factory):
    dist = tmp_path_factory.mktemp("dist")
    run_tool("ansible-galaxy", "collection", "build", "--output-path", str(dist), REPO)
    metadata = galaxy_metadata()
    path = dist / ("%s-%s-%s.tar.gz" % (metadata["namespace"], metadata["name"], metadata["version"]))
    assert path.is_file(), sorted(os.listdir(dist))
    return path


@pytest.fixture(scope="session")
def installed(tarball, tmp_path_factory):
    """A collections path holding only the tarball's collection, installed as a user would."""
    root = tmp_path_factory.mktemp("installed")
    run_tool("ansible-galaxy", "collection", "install", "--offline", "-p", str(root), str(tarball), env=tool_env(ANSIBLE_COLLECTIONS_PATH=str(root)))
    assert (root / "ansible_collections" / "kvmhost" / "usb" / "MANIFEST.json").is_file()
    return root
