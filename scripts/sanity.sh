#!/usr/bin/env bash
# ansible-test sanity on a copy of the collection at ansible_collections/kvmhost/usb, as it requires.
# The sanity tools run from a venv of their own (build/sanity-venv), with the versions ansible-test
# pins (--requirements), so they do not disturb the project's venv. (ansible-test's --venv mode would
# fetch a pip bootstrap script from outside the package registries.)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$PWD/build/sanity-venv
core=$(.venv/bin/python -c 'import ansible.release; print(ansible.release.__version__)')
if [ ! -x "$venv/bin/ansible-test" ] || [ "$("$venv/bin/python" -c 'import ansible.release; print(ansible.release.__version__)')" != "$core" ]; then
    /usr/bin/python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q "ansible-core==$core" pyyaml
fi
export PATH=$venv/bin:$PATH
# ansible-test bootstraps pip in each of its sanity venvs with a script it would download; give it ours.
pip_version=$(python -c 'import inspect, re, ansible_test._internal.python_requirements as r; print(re.search(r"pip=.([0-9.]+).", inspect.getsource(r.get_venv_packages)).group(1))')
mkdir -p ~/.ansible/test/cache
cp scripts/get-pip-from-ensurepip.py ~/.ansible/test/cache/"get_pip_${pip_version//./_}.py"
# Outside the checkout: inside it, ansible-test would ask this repository's git for the file list.
# The copy is kept between runs so that ansible-test's virtual environments (tests/output) are reused;
# one per checkout, so that two checkouts' runs never sync over each other.
checkout=$(printf '%s' "$PWD" | md5sum | cut -c1-12)
root=${KVMHOST_USB_SANITY_DIR:-/var/tmp/kvmhost-usb-sanity/$checkout}/ansible_collections/kvmhost/usb
mkdir -p "$root"
git ls-files -co --exclude-standard -z | rsync -a --delete --exclude=/tests/output --from0 --files-from=- ./ "$root"/
cd "$root"
ansible-test sanity --local --requirements --python 3.11 --color no "$@"
