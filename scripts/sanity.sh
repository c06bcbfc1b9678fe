#!/usr/bin/env bash
# ansible-test sanity on a copy of the collection at ansible_collections/kvmhost/usb, as it requires.
# KVMHOST_USB_CORE=X.Y picks the ansible-core release (default: the project venv's). ansible-test runs from
# that release's venv, build/venv-X.Y (scripts/core-venv.sh), with the versions it pins (--requirements),
# so the sanity tools do not disturb the project's venv. (ansible-test's --venv mode would fetch a pip
# bootstrap script from outside the package registries.)
set -euo pipefail
cd "$(dirname "$0")/.."
release=${KVMHOST_USB_CORE:-$(.venv/bin/python -c 'import ansible.release as r; print(".".join(r.__version__.split(".")[:2]))')}
venv=$(scripts/core-venv.sh "$release")
export PATH=$venv/bin:$PATH
# KVMHOST_USB_PYTHON=3.9 runs the tests that use the target's Python (compile, import) on that Python.
python=${KVMHOST_USB_PYTHON:-3.11}
if [ "$python" = 3.9 ]; then
    PATH=$(scripts/python39.sh):$PATH
fi
# ansible-test keeps its sanity venvs in ~/.ansible/test, shared by every checkout on the machine: two runs that
# create the same venv at once break it (pip half-installed), so one sanity run at a time, the venvs reused.
mkdir -p ~/.ansible/test/cache
exec 9>~/.ansible/test/kvmhost-usb-sanity.lock
flock 9
# ansible-test bootstraps pip in each of its sanity venvs with a script it would download; give it ours.
pip_version=$(python -c 'import inspect, re, ansible_test._internal.python_requirements as r; print(re.search(r"pip=.([0-9.]+).", inspect.getsource(r.get_venv_packages)).group(1))')
cp scripts/get-pip-from-ensurepip.py ~/.ansible/test/cache/"get_pip_${pip_version//./_}.py"
# Outside the checkout: inside it, ansible-test would ask this repository's git for the file list.
# The copy is kept between runs so that ansible-test's virtual environments (tests/output) are reused;
# one per checkout and release, so that two checkouts' or two releases' runs never sync over each other.
checkout=$(printf '%s' "$PWD" | md5sum | cut -c1-12)
root=${KVMHOST_USB_SANITY_DIR:-/var/tmp/kvmhost-usb-sanity/$checkout}-$release/ansible_collections/kvmhost/usb
mkdir -p "$root"
git ls-files -co --exclude-standard -z | rsync -a --delete --exclude=/tests/output --from0 --files-from=- ./ "$root"/
cd "$root"
ansible-test sanity --local --requirements --python "$python" --color no "$@"
