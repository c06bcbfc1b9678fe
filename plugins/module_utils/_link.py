# Copyright (c) 2026, kvmhost.usb contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)

"""The encrypted link between KVM hosts that share USB devices: a kernel WireGuard interface carrying USB/IP.

Words: a host's *link address* is its address on the network between the hosts (``usb_link_address``); its *tunnel
address* is its address on the WireGuard interface ``kvmhost-usb``, where its exporter listens and where importers
connect; a *peer* is another host it shares devices with (exports to or imports from). WireGuard's cryptokey routing
makes the tunnel address a proof: a packet that arrives through the tunnel from a peer's tunnel address was sealed
with that peer's key.

The private key is made on the host (``wg genkey``) into /etc/kvmhost-usb/link.key (0600) and never leaves it; its
public key travels through the converge. The link's settings (no secret in them) are kept in
/etc/kvmhost-usb/link.json, so that ``kvmhost-usb link up`` (service ``kvmhost-usb-link``) sets it up again at boot.
An nftables table refuses the USB/IP port to anything that does not come through the tunnel.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import sys

from ansible_collections.kvmhost.usb.plugins.module_utils._errors import LinkError

INTERFACE = "kvmhost-usb"
CONFIG_DIR = "/etc/kvmhost-usb"
KEY_FILE = CONFIG_DIR + "/link.key"
SETTINGS_FILE = CONFIG_DIR + "/link.json"
NFT_TABLE = "kvmhost_usb"
TUNNEL_NETWORK = "10.213.0.0/16"
WIREGUARD_PORT = 51871
# WireGuard's own headers over IPv6 (IPv4 needs 20 bytes less): the tunnel's MTU is the link's less this.
WIREGUARD_OVERHEAD = 80
KEEPALIVE = 25
TOOLS = {
    "wg": "wireguard-tools (Debian/Ubuntu and RHEL family: wireguard-tools)",
    "ip": "iproute2 (Debian/Ubuntu: iproute2, RHEL family: iproute)",
    "nft": "nftables (Debian/Ubuntu and RHEL family: nftables)",
}
KERNEL_MODULE = (
    "the wireguard kernel module is missing: boot a kernel with WireGuard (Linux 5.6 or later; Debian: linux-image-amd64, "
    "RHEL family 8.4 or later: the stock kernel) and check that `modprobe wireguard` works"
)


def tunnel_address(link_address: str, network: str = TUNNEL_NETWORK) -> str:
    """The tunnel address derived from a link address: the tunnel network's prefix with the link address's low bits, so
    hosts whose link addresses differ in those bits (one link network no wider than the tunnel network) never collide."""
    try:
        net = ipaddress.ip_network(network, strict=True)
    except ValueError as error:
        raise LinkError("Cannot derive a tunnel address: usb_link_tunnel_network %s" % error) from None
    try:
        link = ipaddress.ip_address(link_address)
    except ValueError:
        raise LinkError(
            "Cannot derive a tunnel address: link address %r is not an IP address; set usb_link_address (an IP address of"
            " the host on the link), or usb_link_tunnel_address" % link_address
        ) from None
    if net.version != 4:
        raise LinkError("usb_link_tunnel_network %s: the tunnel network is IPv4" % network)
    host_bits = net.max_prefixlen - net.prefixlen
    low = int(link) & ((1 << host_bits) - 1)
    if low in (0, (1 << host_bits) - 1):
        raise LinkError(
            "Cannot derive a tunnel address from link address %s in %s (it would be the network's first or last address); "
            "set usb_link_tunnel_address for this host" % (link_address, network)
        )
    return str(net.network_address + low)


def check_address(value: str, what: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise LinkError("%s %r is not an IP address" % (what, value)) from None


# The host's side: tools, keys, the interface, the firewall table.


def tool(name: str) -> str:
    found = shutil.which(name) or next((path for path in ("/usr/sbin/" + name, "/usr/bin/" + name, "/sbin/" + name) if os.path.exists(path)), None)
    if found is None:
        raise LinkError("%s is not installed on this host: install %s" % (name, TOOLS[name]))
    return found


def check_tools() -> None:
    """LinkError naming the package of the first tool the link needs that this host lacks."""
    for name in TOOLS:
        tool(name)


def run(argv: list, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    process = subprocess.run([tool(argv[0])] + list(argv[1:]), input=input, capture_output=True, text=True, check=False)
    if check and process.returncode != 0:
        raise LinkError("%s failed: %s" % (" ".join(argv[:3]), (process.stderr or process.stdout).strip()))
    return process


def check_kernel() -> None:
    """LinkError naming what to install when this kernel cannot make a WireGuard interface."""
    if os.path.isdir("/sys/module/wireguard"):
        return
    modprobe = shutil.which("modprobe") or "/sbin/modprobe"
    try:
        found = subprocess.run([modprobe, "-n", "-q", "wireguard"], capture_output=True, check=False).returncode == 0
    except OSError:
        found = False
    if not found:
        raise LinkError(KERNEL_MODULE)


def host_interfaces() -> list:
    """``[{"name", "mtu", "addresses": [...]}]`` of this host, from ``ip -json address``."""
    shown = json.loads(run(["ip", "-json", "address", "show"]).stdout or "[]")
    return [
        {"name": item["ifname"], "mtu": item.get("mtu"), "addresses": [entry["local"] for entry in item.get("addr_info", [])]}
        for item in shown
    ]


def link_mtu(link_address: str) -> int:
    """The tunnel's MTU: that of the interface holding the link address, less WireGuard's headers. LinkError when
    the address is not this host's."""
    address = check_address(link_address, "usb_link_address")
    interfaces = host_interfaces()
    for interface in interfaces:
        if interface["name"] != INTERFACE and address in interface["addresses"]:
            return int(interface["mtu"] or 1500) - WIREGUARD_OVERHEAD
    held = [held for interface in interfaces if interface["name"] != "lo" for held in interface["addresses"]]
    raise LinkError("usb_link_address %s is not an address of this host (it has %s)" % (address, ", ".join(held) or "none"))


def public_key(root: str = "") -> str | None:
    """The public key of this host's link key; None when it has none yet."""
    if not os.path.exists(root + KEY_FILE):
        return None
    with open(root + KEY_FILE) as handle:
        return run(["wg", "pubkey"], input=handle.read()).stdout.strip()


def make_key(root: str = "") -> str:
    """A new private key in KEY_FILE (0600, root, written beside it and renamed over it); its public key."""
    private = run(["wg", "genkey"]).stdout
    os.makedirs(root + CONFIG_DIR, mode=0o755, exist_ok=True)
    temporary = root + KEY_FILE + ".new"
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(private)
    os.replace(temporary, root + KEY_FILE)
    return public_key(root)


def settings(address: str, mtu: int, peers: list, listen_port: int = WIREGUARD_PORT, usbip_port: int = 3240) -> dict:
    """The link's settings as link.json keeps them: ``peers`` each ``{name, public_key, endpoint, tunnel_address}``."""
    return {
        "address": address,
        "mtu": int(mtu),
        "listen_port": int(listen_port),
        "usbip_port": int(usbip_port),
        "peers": sorted(({key: peer[key] for key in ("name", "public_key", "endpoint", "tunnel_address")} for peer in peers), key=lambda peer: peer["name"]),
    }


def read_settings(root: str = "") -> dict | None:
    try:
        with open(root + SETTINGS_FILE) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def current() -> dict | None:
    """What the interface holds now, in the shape of ``settings`` (peers by public key, no names); None without it."""
    shown = run(["ip", "-json", "address", "show", "dev", INTERFACE], check=False)
    if shown.returncode != 0:
        return None
    [item] = json.loads(shown.stdout)
    addresses = ["%s/%s" % (entry["local"], entry["prefixlen"]) for entry in item.get("addr_info", [])]
    dump = run(["wg", "show", INTERFACE, "dump"]).stdout.splitlines()
    # The first line: private key, public key, listen port, fwmark; then one line a peer:
    # public key, preshared key, endpoint, allowed ips, latest handshake, rx, tx, keepalive.
    interface = dump[0].split("\t") if dump else ["", "", "0"]
    peers = []
    for line in dump[1:]:
        fields = line.split("\t")
        peers.append({"public_key": fields[0], "endpoint": fields[2], "tunnel_address": fields[3].split("/")[0], "handshake": int(fields[4])})
    return {
        "public_key": interface[1],
        "address": addresses[0] if len(addresses) == 1 else addresses,
        "mtu": item.get("mtu"),
        "up": "UP" in item.get("flags", []),
        "listen_port": int(interface[2]),
        "peers": sorted(peers, key=lambda peer: peer["public_key"]),
        "firewall": firewall_present(),
    }


def status(root: str = "") -> dict | None:
    """What ``kvmhost-usb status`` says of the link: the interface's address and each peer by name, with its tunnel
    address and last handshake (seconds since the epoch, 0 for none); None without a link (or without the tools)."""
    try:
        now = current()
    except LinkError:
        return None
    if now is None:
        return None
    names = dict((peer["public_key"], peer["name"]) for peer in (read_settings(root) or {}).get("peers", []))
    return {
        "interface": INTERFACE,
        "address": now["address"],
        "peers": [
            {"name": names.get(peer["public_key"], "unknown"), "tunnel_address": peer["tunnel_address"], "handshake": peer["handshake"]}
            for peer in now["peers"]
        ],
    }


def handshakes() -> dict:
    """``{public key: latest handshake}`` of the interface's peers (seconds since the epoch, 0 for never), from
    ``wg show kvmhost-usb latest-handshakes``; {} without the interface. LinkError when wg cannot say (not installed, or
    not allowed)."""
    shown = run(["wg", "show", INTERFACE, "latest-handshakes"], check=False)
    if shown.returncode != 0:
        if "No such device" in shown.stderr:
            return {}
        raise LinkError("wg show %s latest-handshakes failed: %s" % (INTERFACE, (shown.stderr or shown.stdout).strip()))
    found = {}
    for line in shown.stdout.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[1].isdigit():
            found[fields[0]] = int(fields[1])
    return found


def differs(wanted: dict, now: dict | None, key: str | None) -> bool:
    """Whether the interface must be set up again to hold ``wanted`` with the private key whose public key is ``key``."""
    if now is None:
        return True
    peers = _compared(wanted["peers"])
    held = _compared(now["peers"])
    return (now["public_key"], now["address"], now["mtu"], now["up"], now["listen_port"], held, now["firewall"]) != (
        key, wanted["address"], wanted["mtu"], True, wanted["listen_port"], peers, True)


def _compared(peers: list) -> list:
    return sorted((peer["public_key"], peer["endpoint"], peer["tunnel_address"]) for peer in peers)


def firewall_present() -> bool:
    return run(["nft", "list", "table", "inet", NFT_TABLE], check=False).returncode == 0


def firewall_rules(usbip_port: int) -> str:
    """The table that refuses the USB/IP port to whatever does not arrive through the tunnel: a connection to the link
    address is reset before the exporter (which listens on the tunnel address only) could read a byte."""
    return (
        "table inet {table}\n"
        "delete table inet {table}\n"
        "table inet {table} {{\n"
        "  chain input {{\n"
        "    type filter hook input priority filter; policy accept;\n"
        "    iifname != \"{interface}\" tcp dport {port} reject with tcp reset\n"
        "  }}\n"
        "}}\n"
    ).format(table=NFT_TABLE, interface=INTERFACE, port=int(usbip_port))


def up(wanted: dict, root: str = "") -> None:
    """Set the interface, its peers (exactly these), its address and MTU, and the firewall table, to ``wanted``."""
    check_kernel()
    if run(["ip", "link", "show", "dev", INTERFACE], check=False).returncode != 0:
        made = run(["ip", "link", "add", "dev", INTERFACE, "type", "wireguard"], check=False)
        if made.returncode != 0:
            raise LinkError("%s (ip link add: %s)" % (KERNEL_MODULE, made.stderr.strip()))
    run(["wg", "set", INTERFACE, "listen-port", str(wanted["listen_port"]), "private-key", root + KEY_FILE])
    keep = set(peer["public_key"] for peer in wanted["peers"])
    for line in run(["wg", "show", INTERFACE, "peers"]).stdout.split():
        if line not in keep:
            run(["wg", "set", INTERFACE, "peer", line, "remove"])
    for peer in wanted["peers"]:
        run([
            "wg", "set", INTERFACE, "peer", peer["public_key"], "endpoint", peer["endpoint"],
            "allowed-ips", peer["tunnel_address"] + "/32", "persistent-keepalive", str(KEEPALIVE),
        ])
    held = json.loads(run(["ip", "-json", "address", "show", "dev", INTERFACE]).stdout)[0].get("addr_info", [])
    for entry in held:
        if "%s/%s" % (entry["local"], entry["prefixlen"]) != wanted["address"]:
            run(["ip", "address", "del", "%s/%s" % (entry["local"], entry["prefixlen"]), "dev", INTERFACE])
    run(["ip", "address", "replace", wanted["address"], "dev", INTERFACE])
    run(["ip", "link", "set", "dev", INTERFACE, "mtu", str(wanted["mtu"]), "up"])
    run(["nft", "-f", "-"], input=firewall_rules(wanted["usbip_port"]))


def is_up() -> bool:
    """Whether the interface or the firewall table is there (False on a host without the tools: it never had them)."""
    try:
        if run(["ip", "link", "show", "dev", INTERFACE], check=False).returncode == 0:
            return True
        return firewall_present()
    except LinkError:
        return False


def down() -> None:
    """Remove the interface and the firewall table (the key and the settings stay)."""
    if run(["ip", "link", "show", "dev", INTERFACE], check=False).returncode == 0:
        run(["ip", "link", "del", "dev", INTERFACE])
    if firewall_present():
        run(["nft", "delete", "table", "inet", NFT_TABLE])


def main(argv: list) -> int:
    """``kvmhost-usb link up|down``: the link as link.json says, at boot and by hand."""
    if argv not in (["up"], ["down"]):
        sys.stderr.write("usage: kvmhost-usb link up|down\n")
        return 2
    try:
        if argv == ["down"]:
            down()
            return 0
        wanted = read_settings()
        if wanted is None:
            sys.stderr.write("kvmhost-usb link up: no settings in %s\n" % SETTINGS_FILE)
            return 1
        up(wanted)
    except LinkError as error:
        sys.stderr.write("kvmhost-usb link %s: %s\n" % (argv[0], error))
        return 1
    return 0
