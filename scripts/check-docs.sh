#!/usr/bin/env bash
# Every module's documentation renders with ansible-doc, and the built collection installs and runs.
set -euo pipefail
cd "$(dirname "$0")/.."
for module in plugins/modules/*.py; do
    name=$(basename "$module" .py)
    out=$(ansible-doc "kvmhost.usb.$name")
    grep -q "kvmhost.usb.$name" <<<"$out" || { echo "ansible-doc kvmhost.usb.$name did not render" >&2; exit 1; }
    echo "ansible-doc kvmhost.usb.$name: ok"
done
dist=$(mktemp -d)
trap 'rm -rf "$dist"' EXIT
ansible-galaxy collection build --force --output-path "$dist" . >/dev/null
ANSIBLE_COLLECTIONS_PATH="$dist/installed" ansible-galaxy collection install -p "$dist/installed" "$dist"/kvmhost-usb-*.tar.gz >/dev/null
ANSIBLE_COLLECTIONS_PATH="$dist/installed" ansible localhost -c local -m kvmhost.usb.usb_facts -e ansible_python_interpreter="$(command -v python)" >"$dist/out.txt" \
    || { cat "$dist/out.txt"; exit 1; }
grep -q '"usb_devices"' "$dist/out.txt" || { cat "$dist/out.txt"; exit 1; }
echo "built collection installs and kvmhost.usb.usb_facts runs from it: ok"
