"""An execution environment gets everything the collection needs: ansible-builder reads the collection's
meta/execution-environment.yml, requirements.txt and bindep.txt, from the checkout and from the tarball."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import subprocess
import sys

import yaml
from bindep.depends import Depends
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from .conftest import REPO, run_tool

DEBIAN = ["platform:dpkg", "platform:debian"]
RHEL = ["platform:rpm", "platform:redhat", "platform:rhel"]
BUILD_DEPENDS = {
    "debian": {"gcc", "pkg-config", "python3-dev", "libvirt-dev"},
    "rhel": {"gcc", "pkgconf-pkg-config", "python3-devel", "libvirt-devel"},
}
RUN_DEPENDS = {
    "debian": {"libvirt0", "libudev1", "usbutils"},
    "rhel": {"libvirt-libs", "systemd-libs", "usbutils"},
}


def read(path):
    with open(os.path.join(REPO, path)) as handle:
        return handle.read()


def requirement_names(text):
    return {canonicalize_name(Requirement(line.split("#")[0]).name) for line in text.splitlines() if line.split("#")[0].strip()}


def third_party_imports():
    """Top-level names the plugins import that are neither the standard library, Ansible nor this collection."""
    names = set()
    for folder, _dirs, files in os.walk(os.path.join(REPO, "plugins")):
        for name in files:
            if not name.endswith(".py"):
                continue
            with open(os.path.join(folder, name)) as handle:
                tree = ast.parse(handle.read())
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return {name for name in names if name not in sys.stdlib_module_names and name not in ("ansible", "ansible_collections", "__future__")}


def packages(bindep_text, platform, profile):
    return {rule[0] for rule in Depends(bindep_text).active_rules([profile] + platform)}


def test_meta_points_at_the_dependency_files():
    meta = yaml.safe_load(read("meta/execution-environment.yml"))
    assert meta["dependencies"] == {"python": "requirements.txt", "system": "bindep.txt"}


def test_requirements_name_every_package_the_plugins_import():
    imported = third_party_imports()
    assert {"libvirt", "pyudev"} <= imported
    distributions = importlib.metadata.packages_distributions()
    needed = {canonicalize_name(distributions[name][0]) for name in imported}
    assert needed <= requirement_names(read("requirements.txt")), "add %s to requirements.txt" % sorted(needed)


def test_bindep_names_the_build_and_run_packages_of_debian_and_rhel():
    text = read("bindep.txt")
    for family, platform in (("debian", DEBIAN), ("rhel", RHEL)):
        run = packages(text, platform, "default")
        build = packages(text, platform, "compile")
        assert run == RUN_DEPENDS[family]
        assert build - run == BUILD_DEPENDS[family]


def test_the_debian_build_packages_are_those_libvirt_python_was_built_with_here():
    """This machine's venv built libvirt-python from source with the Debian packages make setup installs:
    bindep's names are real Debian packages, and libvirt's pkg-config file comes from them."""
    for package in packages(read("bindep.txt"), DEBIAN, "compile"):
        status = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True, check=False).stdout
        assert status == "install ok installed", "%s is not a Debian package installed here" % package
    owner = subprocess.run(["dpkg", "-S", "/usr/lib/x86_64-linux-gnu/pkgconfig/libvirt.pc"], capture_output=True, text=True, check=False).stdout
    assert owner.startswith("libvirt-dev:"), owner


def test_introspection_of_the_installed_tarball_names_every_dependency(installed):
    """What ansible-builder runs inside the image after installing the collection from Galaxy."""
    out = run_tool("ansible-builder", "introspect", "--sanitize", str(installed)).stdout
    found = yaml.safe_load(out.split("---", 1)[1])
    origin = "  # from collection kvmhost.usb"
    assert all(line.endswith(origin) for line in found["python"] + found["system"]), found
    assert requirement_names("\n".join(line[: -len(origin)] for line in found["python"])) == requirement_names(read("requirements.txt"))
    listed = [line[: -len(origin)] for line in found["system"]]
    assert listed == [line for line in read("bindep.txt").splitlines() if line and not line.startswith("#")]


def test_ansible_builder_create_makes_a_context_naming_every_dependency(tmp_path):
    context = tmp_path / "context"
    run_tool("ansible-builder", "create", "--file", "tests/publish/execution-environment.yml", "--context", str(context),
             "--output-filename", "Containerfile")
    build = context / "_build"
    assert requirement_names((build / "requirements.txt").read_text()) == {"pyudev", "libvirt-python"}
    bindep = (build / "bindep.txt").read_text()
    for family, platform in (("debian", DEBIAN), ("rhel", RHEL)):
        assert packages(bindep, platform, "compile") == BUILD_DEPENDS[family] | RUN_DEPENDS[family]
    galaxy = yaml.safe_load((build / "requirements.yml").read_text())
    assert {"name": "kvmhost.usb"} in galaxy["collections"]
    containerfile = (context / "Containerfile").read_text()
    for step in ("COPY _build/requirements.txt", "COPY _build/bindep.txt", "ansible-galaxy collection install", "introspect --user-pip=requirements.txt"):
        assert step in containerfile, step
