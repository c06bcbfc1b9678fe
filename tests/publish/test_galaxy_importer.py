"""Galaxy's own importer accepts the built tarball with no error and no warning."""

from __future__ import annotations

import json
import os
import sys

import pytest

from .conftest import REPO, galaxy_metadata, run_tool, tool_env

CONFIG = os.path.join(REPO, "tests", "publish", "galaxy-importer.cfg")
PROJECT = "https://github.com/kvmhost/kvmhost.usb"


@pytest.fixture(scope="module")
def imported(tarball, tmp_path_factory):
    """galaxy-importer's log and result. It runs ansible-lint, which installs the collection into the user's
    ~/.ansible: HOME points into the run's own directory so that nothing outside it changes."""
    work = tmp_path_factory.mktemp("importer")
    (work / "home").mkdir()
    env = tool_env(GALAXY_IMPORTER_CONFIG=CONFIG, HOME=str(work / "home"))
    env.pop("ANSIBLE_COLLECTIONS_PATH")
    process = run_tool(sys.executable, "-m", "galaxy_importer.main", str(tarball), cwd=str(work), env=env, check=False)
    log = process.stdout + process.stderr
    assert process.returncode == 0, log
    with open(work / "importer_result.json") as handle:
        return log, json.load(handle)


def names(folder, suffix=""):
    return sorted(name[: -len(suffix)] if suffix else name for name in os.listdir(os.path.join(REPO, folder))
                  if name.endswith(suffix) and not name.startswith("__"))


def test_import_succeeds_without_a_warning(imported):
    log, _result = imported
    assert "Importer processing completed successfully" in log
    complaints = [line for line in log.splitlines() if line.startswith(("WARNING", "ERROR"))]
    assert complaints == [], "\n".join(complaints)


def test_the_configured_checks_ran(imported):
    log, _result = imported
    assert "Getting doc strings via ansible-doc" in log
    assert "...ansible-lint run complete" in log
    assert "via flake8" in log


def test_every_module_role_and_playbook_is_found_and_documented(imported):
    _log, result = imported
    found = {(item["content_type"], item["name"]) for item in result["contents"]}
    expected = {("module", name) for name in names("plugins/modules", ".py")}
    expected |= {("role", name) for name in names("roles")}
    expected |= {("playbook", name + ".yml") for name in names("playbooks", ".yml")}
    assert expected <= found, expected - found
    docs = {(item["content_type"], item["content_name"]): item for item in result["docs_blob"]["contents"]}
    for kind, name in expected:
        if kind == "module":
            assert docs[(kind, name)]["doc_strings"]["doc"]["options"], name
        elif kind == "role":
            assert docs[(kind, name)]["readme_file"] == "README.md", name
    assert result["docs_blob"]["collection_readme"]["html"]


def test_the_metadata_points_at_the_projects_own_pages(imported):
    _log, result = imported
    metadata = galaxy_metadata()
    for field in ("repository", "documentation", "homepage", "issues", "tags", "license"):
        assert result["metadata"][field] == metadata[field], field
    assert metadata["repository"] == metadata["homepage"] == PROJECT
    assert metadata["issues"] == PROJECT + "/issues"
    assert result["requires_ansible"] == ">=2.16.0"
