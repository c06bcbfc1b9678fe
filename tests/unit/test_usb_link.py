"""usb_link, the first half of an encrypted link: the checks it makes before anything changes, on this machine.

This machine's kernel has no wireguard module, and that is what the first test meets for real (wireguard-tools and
nftables are installed by the project's setup). Making, keeping and rotating a key, and the link itself, are on the
linked test hosts (tests/integration/test_crosshost_testhost.py), whose kernel has the module.
"""

from __future__ import annotations

import os

import pytest

from tests.lib.modrun import failed, run_module

KEY = "etc/kvmhost-usb/link.key"


def link(tmp_path, link_address, **options):
    root = tmp_path / "root"
    root.mkdir(exist_ok=True)
    args = dict({"link_address": link_address}, **options)
    return run_module("usb_link", args, libvirt=False, env={"KVMHOST_USB_RUNTIME_ROOT": str(root)})


def test_a_kernel_without_wireguard_fails_naming_it_and_makes_no_key(tmp_path):
    assert not os.path.isdir("/sys/module/wireguard"), "this machine's kernel has WireGuard: the test needs one without"
    failed(link(tmp_path, "127.0.0.1"), "the wireguard kernel module is missing: boot a kernel with WireGuard (Linux 5.6 or later")
    failed(link(tmp_path, "127.0.0.1", rotate_keys=True), "the wireguard kernel module is missing")
    assert not (tmp_path / "root" / KEY).exists()


@pytest.mark.parametrize(
    "address, message",
    [
        ("192.0.2.99", "usb_link_address 192.0.2.99 is not an address of this host (it has "),
        ("10.0.0.300", "usb_link_address '10.0.0.300' is not an IP address"),
        ("kvm1.example.org", "usb_link_address 'kvm1.example.org' is not an IP address"),
    ],
    ids=["not this host's", "malformed", "a name"],
)
def test_a_link_address_that_is_not_this_hosts_fails_before_the_kernel_is_asked(tmp_path, address, message):
    result = link(tmp_path, address)
    failed(result, message)
    assert "wireguard kernel module" not in result["msg"]
    assert not (tmp_path / "root" / KEY).exists()
