"""The changelog as antsibull-changelog keeps it: clean fragments, and a release that writes CHANGELOG.md.
The release runs in a copy of the checkout, so that the repository itself stays unreleased."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
import yaml
from packaging.version import Version

from .conftest import REPO, galaxy_metadata, run_tool

FRAGMENTS = os.path.join(REPO, "changelogs", "fragments")


def changelog_yaml(root=REPO):
    with open(os.path.join(root, "changelogs", "changelog.yaml")) as handle:
        return yaml.safe_load(handle)


def fragments():
    return sorted(name for name in os.listdir(FRAGMENTS) if name.endswith((".yml", ".yaml")))


def markdown_text(path):
    """The text of a Markdown file antsibull-changelog wrote, without its escapes."""
    return path.read_text().replace("\\", "")


def words(text):
    """The words of a text, without the markup that the Markdown changelog writes differently from the fragment."""
    return re.findall(r"[A-Za-z0-9]+", re.sub(r"<[^>]+>", " ", text))


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A copy of the checkout (the files git would commit) after `antsibull-changelog release`."""
    root = tmp_path_factory.mktemp("release") / "ansible_collections" / "kvmhost" / "usb"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    for name in filter(None, files.split("\0")):
        if os.path.isfile(os.path.join(REPO, name)):
            os.makedirs(root / os.path.dirname(name), exist_ok=True)
            shutil.copy2(os.path.join(REPO, name), root / name)
    run_tool("antsibull-changelog", "release", cwd=str(root))
    return root


def test_lint_finds_nothing():
    for command in (["antsibull-changelog", "lint"], ["antsibull-changelog", "lint-changelog-yaml", "changelogs/changelog.yaml"]):
        process = run_tool(*command)
        assert process.stdout + process.stderr == "", command


def test_galaxy_version_is_the_latest_release_or_the_next_one():
    version = Version(galaxy_metadata()["version"])
    releases = sorted(Version(release) for release in changelog_yaml()["releases"] or {})
    if releases and releases[-1] == version:
        assert fragments() == [], "%s is released: its fragments belong to the next version" % version
    else:
        assert all(release < version for release in releases), (version, releases)
        assert fragments(), "galaxy.yml names an unreleased %s but no changelog fragment says what it brings" % version


def test_release_writes_changelog_md_for_the_galaxy_version(released):
    version = galaxy_metadata()["version"]
    assert Version(version) in {Version(release) for release in changelog_yaml(released)["releases"]}
    changelog = markdown_text(released / "CHANGELOG.md")
    assert re.search(r"^## v%s$" % re.escape(version), changelog, re.M), changelog[:500]
    assert not (released / "CHANGELOG.rst").exists()
    assert os.listdir(released / "changelogs" / "fragments") == []
    # Fragments are reStructuredText: Ansible's C(...) markup would be printed as it is.
    assert not re.search(r"\b[CMVO]\(", changelog), re.findall(r".{30}\b[CMVO]\(.{30}", changelog)


def test_release_carries_every_fragment_and_lists_the_new_modules(released):
    changelog = " ".join(words(markdown_text(released / "CHANGELOG.md")))
    for name in fragments():
        with open(os.path.join(FRAGMENTS, name)) as handle:
            for section, entries in yaml.safe_load(handle).items():
                if section == "trivial":
                    continue
                for entry in entries if isinstance(entries, list) else [entries]:
                    assert " ".join(words(entry)[:8]) in changelog, "%s: %s" % (name, section)
    version = galaxy_metadata()["version"]
    new_modules = changelog.split("New Modules", 1)[1]
    for module, added in versions_added("modules").items():
        if added == Version(version):
            assert " ".join(words("kvmhost.usb." + module)) in new_modules, module


def versions_added(kind):
    """Each plugin of a kind with the version_added of its documentation."""
    found = {}
    for name in os.listdir(os.path.join(REPO, "plugins", kind)):
        if name.endswith(".py") and not name.startswith("_"):
            with open(os.path.join(REPO, "plugins", kind, name)) as handle:
                added = re.search(r"^version_added: ['\"]?([0-9.]+)", handle.read(), re.M)
            if added:
                found[name[:-3]] = Version(added.group(1))
    return found


def test_no_plugin_is_added_in_a_version_after_galaxys():
    """A plugin whose version_added is past galaxy.yml's version would ship in this release unannounced."""
    version = Version(galaxy_metadata()["version"])
    for kind in ("modules", "filter"):
        later = {name: str(added) for name, added in versions_added(kind).items() if added > version}
        assert later == {}, "version_added after galaxy.yml's %s" % version
