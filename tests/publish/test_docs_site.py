"""The collection's documentation as antsibull-docs checks and renders it. The HTML site is the one
`make docs-site` builds (build/docs-site/build/html); every page is looked for by what the collection
contains, so that a module, filter, role option or scenario guide added later is covered."""

from __future__ import annotations

import html
import json
import os
import re

import pytest
import yaml

from .conftest import REPO, run_tool

SITE = os.path.join(REPO, "build", "docs-site", "build", "html")


@pytest.fixture(scope="module")
def site():
    if not os.path.isfile(os.path.join(SITE, "index.html")):
        pytest.fail("no docs site at %s: run `make docs-site` first" % SITE)
    return SITE


def page(site, name):
    path = os.path.join(site, name)
    assert os.path.isfile(path), "%s is missing from the docs site" % name
    with open(path) as handle:
        return handle.read()


def option_paths(options, prefix=""):
    for name, spec in (options or {}).items():
        yield prefix + name
        yield from option_paths(spec.get("suboptions") or spec.get("options"), prefix + name + "/")


def return_paths(values, prefix=""):
    for name, spec in (values or {}).items():
        yield prefix + name
        yield from return_paths(spec.get("contains"), prefix + name + "/")


def plugin_docs(kind, names):
    out = run_tool("ansible-doc", "--json", "-t", kind, *["kvmhost.usb." + name for name in names]).stdout
    return {name.split(".")[-1]: doc for name, doc in json.loads(out).items()}


def modules():
    return sorted(name[:-3] for name in os.listdir(os.path.join(REPO, "plugins", "modules")) if name.endswith(".py") and not name.startswith("_"))


def test_lint_collection_docs_finds_nothing():
    collection = os.path.join(REPO, "build", "collections", "ansible_collections", "kvmhost", "usb")
    process = run_tool("antsibull-docs", "lint-collection-docs", "--plugin-docs", collection, check=False)
    assert (process.returncode, process.stdout + process.stderr) == (0, "")


def test_every_module_has_a_page_naming_its_options_and_return_values(site):
    names = modules()
    assert "usb_facts" in names
    index = page(site, "index.html")
    for name, doc in plugin_docs("module", names).items():
        text = page(site, "%s_module.html" % name)
        assert 'href="%s_module.html"' % name in index, name
        assert html.escape(doc["doc"]["short_description"], quote=False) in text, name
        for path in option_paths(doc["doc"]["options"]):
            assert 'id="parameter-%s"' % path in text, "%s: option %s" % (name, path)
        # A facts module's page lists what ansible_facts contains; ansible_facts itself has no entry.
        for path in set(return_paths(doc["return"])) - {"ansible_facts"}:
            assert 'id="return-%s"' % path in text, "%s: return value %s" % (name, path)


def test_every_filter_has_a_page_naming_its_options(site):
    listed = json.loads(run_tool("ansible-doc", "--json", "--list", "-t", "filter", "kvmhost.usb").stdout)
    names = sorted(name.split(".")[-1] for name in listed)
    assert "usb_drift" in names
    for name, doc in plugin_docs("filter", names).items():
        text = page(site, "%s_filter.html" % name)
        for path in option_paths(doc["doc"]["options"]):
            assert 'id="parameter-%s"' % path in text, "%s: option %s" % (name, path)


def test_every_role_has_a_page_naming_each_entry_points_options(site):
    roles = sorted(os.listdir(os.path.join(REPO, "roles")))
    assert roles == ["host", "passthrough"] or len(roles) > 2
    for role in roles:
        with open(os.path.join(REPO, "roles", role, "meta", "argument_specs.yml")) as handle:
            specs = yaml.safe_load(handle)["argument_specs"]
        text = page(site, "%s_role.html" % role)
        for entry, spec in specs.items():
            for path in option_paths(spec["options"]):
                assert 'id="parameter-%s--%s"' % (entry, path) in text, "%s: %s option %s" % (role, entry, path)


def test_every_scenario_guide_is_rendered_and_linked_from_the_index(site):
    with open(os.path.join(REPO, "docs", "docsite", "extra-docs.yml")) as handle:
        sections = yaml.safe_load(handle)["sections"]
    guides = [name for section in sections for name in section["toctree"]]
    assert {"enable_host_guide", "fleet_guide", "replug_guide", "report_guide"} <= set(guides)
    index = page(site, "index.html")
    for name in guides:
        with open(os.path.join(REPO, "docs", "docsite", "rst", name + ".rst")) as handle:
            title = re.search(r"^(\S.*)\n=+\n", handle.read(), re.M).group(1)
        assert "<h1>%s" % html.escape(title, quote=False) in page(site, "docsite/%s.html" % name), name
        assert 'href="docsite/%s.html"' % name in index, name
