#!/usr/bin/env bash
# The collection's HTML documentation (build/docs-site/build/html), as the Ansible docsite would render it:
# antsibull-docs writes a Sphinx site for kvmhost.usb (every plugin, both roles, the scenario guides of
# docs/docsite) and Sphinx builds it with warnings as errors.
set -euo pipefail
cd "$(dirname "$0")/.."
site=$PWD/build/docs-site
rm -rf "$site"
mkdir -p build
mkdir -m 0755 "$site"
antsibull-docs sphinx-init --use-current --squash-hierarchy --fail-on-error --dest-dir "$site" \
    --project kvmhost.usb --copyright "kvmhost.usb contributors" --title kvmhost.usb kvmhost.usb >/dev/null
# No network here: the generated pages link into the Ansible docs through intersphinx, so the few Ansible
# labels they use come from a local inventory (docs/docsite/ansible_devel-objects.txt) instead of
# docs.ansible.com; a page that refers to another one fails the build until it is added there.
sphobjinv convert zlib --quiet docs/docsite/ansible_devel-objects.txt "$site/ansible_devel.inv"
cat >>"$site/conf.py" <<'PY'

intersphinx_mapping = {
    'ansible_devel': ('https://docs.ansible.com/projects/ansible/devel/', '../ansible_devel.inv'),
}
PY
"$site/build.sh"
