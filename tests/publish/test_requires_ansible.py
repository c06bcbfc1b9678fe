"""What meta/runtime.yml and tests/config.yml promise is what `make test` runs: every ansible-core release
from the requires_ansible floor up to the project venv's runs sanity and the unit tests (`make matrix` for
all but the venv's own, which `make unit` and `make sanity` cover), and the modules compile and import on
the oldest Python they support."""

from __future__ import annotations

import os
import subprocess

import ansible.release
import yaml
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from .conftest import REPO


def makefile_variable(name):
    out = subprocess.run(["make", "-s", "--no-print-directory", "print-" + name], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return out.split()


def test_the_matrix_holds_every_release_requires_ansible_admits_up_to_the_venvs():
    with open(os.path.join(REPO, "meta", "runtime.yml")) as handle:
        admitted = SpecifierSet(yaml.safe_load(handle)["requires_ansible"])
    newest = Version(ansible.release.__version__)
    floor = min(Version(spec.version) for spec in admitted if spec.operator in (">=", ">"))
    releases = ["2.%d" % minor for minor in range(floor.minor, newest.minor + 1) if Version("2.%d.0" % minor) in admitted]
    assert floor.major == newest.major == 2
    assert makefile_variable("CORE_RELEASES") + ["%d.%d" % (newest.major, newest.minor)] == releases


def test_the_matrix_runs_each_modules_unit_tests():
    tests = makefile_variable("MATRIX_TESTS")
    modules = [name[:-3] for name in os.listdir(os.path.join(REPO, "plugins", "modules")) if name.endswith(".py")]
    for module in modules:
        assert "tests/unit/test_%s.py" % module in tests, module
    for path in tests:
        assert os.path.isfile(os.path.join(REPO, path)), path


def test_the_matrix_runs_the_modules_on_their_oldest_python():
    with open(os.path.join(REPO, "tests", "config.yml")) as handle:
        python_requires = SpecifierSet(yaml.safe_load(handle)["modules"]["python_requires"])
    floor = min(Version(spec.version) for spec in python_requires if spec.operator == ">=")
    assert makefile_variable("TARGET_PYTHON") == ["%d.%d" % (floor.major, floor.minor)]
    with open(os.path.join(REPO, "README.md")) as handle:
        assert "Managed hosts: Python %d.%d+" % (floor.major, floor.minor) in handle.read()
