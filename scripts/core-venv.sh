#!/usr/bin/env bash
# build/venv-X.Y: a venv with the newest ansible-core X.Y and what the unit tier imports, for running the
# unit tier and ansible-test sanity against one ansible-core release (`make matrix`). Prints its path.
# Idempotent: an existing venv whose recorded requirements are the same is left as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
release=$1
venv=$PWD/build/venv-$release
# Kept in step with requirements-dev.txt: what tests/unit needs besides ansible-core.
requirements="ansible-core==$release.* pyudev>=0.24 libvirt-python jinja2 pytest pyyaml"
if [ "$(cat "$venv/.requirements" 2>/dev/null)" != "$requirements" ]; then
    rm -rf "$venv"
    /usr/bin/python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip >&2
    # shellcheck disable=SC2086
    "$venv/bin/python" -m pip install -q $requirements >&2
    echo "$requirements" >"$venv/.requirements"
fi
echo "$venv"
