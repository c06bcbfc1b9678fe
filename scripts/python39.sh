#!/usr/bin/env bash
# build/python3.9: CPython 3.9, the oldest Python the modules support on a managed host (tests/config.yml),
# for ansible-test's sanity tests that run on the target's Python (compile, import). Debian 12 has no 3.9,
# so it comes from Debian 11's packages: downloaded with an apt state of its own under build/ (the machine's
# apt sources stay as they are), unpacked, and told where its libraries and ensurepip's wheels now live.
# Prints the directory holding python3.9. Idempotent: a working unpacked interpreter is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=$PWD/build/python3.9
if "$dest/usr/bin/python3.9" -c 'import ssl, ctypes, decimal, ensurepip' 2>/dev/null; then
    echo "$dest/usr/bin"
    exit 0
fi
state=$PWD/build/apt-bullseye
mkdir -p "$state/lists/partial" "$state/cache/archives/partial" "$state/debs"
cat >"$state/sources.list" <<'LIST'
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bullseye main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian-security bullseye-security main
LIST
apt_options=(-o "Dir::State::Lists=$state/lists" -o "Dir::Etc::SourceList=$state/sources.list" -o Dir::Etc::SourceParts=/dev/null
    -o "Dir::Cache=$state/cache" -o Dir::State::status=/dev/null -o APT::Architecture=amd64 -o APT::Sandbox::User=root -q)
apt-get "${apt_options[@]}" update >&2
rm -rf "$state/debs" "$dest"
mkdir -p "$state/debs" "$dest"
# The interpreter, its standard library, venv with ensurepip's wheels, and the libraries Debian 12 lacks.
(cd "$state/debs" && apt-get "${apt_options[@]}" download python3.9-minimal libpython3.9-minimal libpython3.9-stdlib python3.9 \
    python3.9-venv python-pip-whl python3-distutils python3-lib2to3 libssl1.1 libffi7 libmpdec3 >&2)
for deb in "$state/debs"/*.deb; do
    dpkg-deb -x "$deb" "$dest"
done
# The libraries are found beside the interpreter (DT_RPATH also serves the extension modules it loads),
# and ensurepip looks for its wheels under the interpreter's prefix instead of /usr/share.
# shellcheck disable=SC2016  # $ORIGIN is for the dynamic loader, not the shell
patchelf --force-rpath --set-rpath '$ORIGIN/../lib/x86_64-linux-gnu' "$dest/usr/bin/python3.9"
sed -i "s|'/usr/share/python-wheels|sys.base_prefix + '/share/python-wheels|g" "$dest/usr/lib/python3.9/ensurepip/__init__.py"
"$dest/usr/bin/python3.9" -c 'import ssl, ctypes, decimal, ensurepip' >&2
echo "$dest/usr/bin"
