"""Stand-in for the get-pip.py bootstrap script ansible-test downloads from outside the package
registries: it bootstraps pip from Python's own ensurepip, then installs what ansible-test asks
for (pip==<version>) from the package index like any other requirement."""

import subprocess
import sys

IGNORED = ("--no-setuptools", "--no-wheel")

subprocess.check_call([sys.executable, "-m", "ensurepip", "--default-pip"], stdout=subprocess.DEVNULL)
subprocess.check_call([sys.executable, "-m", "pip", "install", "-q"] + [arg for arg in sys.argv[1:] if arg not in IGNORED])
