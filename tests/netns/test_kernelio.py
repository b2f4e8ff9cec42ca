"""The kernel-facing helpers on their own, in a namespace: the TUN device's sysctls."""

from __future__ import annotations

import json
import sys

from nfq_ipsec.netns import Topology

TUN_PROBE = r"""
import json, logging, sys
from nfq_ipsec.kernelio import TunDevice
warnings = []
class Keep(logging.Handler):
    def emit(self, record):
        warnings.append(record.getMessage())
logging.getLogger("nfq_ipsec").addHandler(Keep())
name = sys.argv[1]
t = TunDevice(name)
with open(f"/proc/sys/net/ipv4/conf/{name}/rp_filter") as f:
    dev = int(f.read())
with open(f"/proc/sys/net/ipv4/conf/{name}/accept_local") as f:
    accept_local = int(f.read())
print(json.dumps({"rp_filter": t.rp_filter, "dev": dev, "accept_local": accept_local, "warnings": warnings}))
t.close()
"""


def _probe(topo: Topology, all_rp_filter: int, name: str) -> dict:  # type: ignore[type-arg]
    ns = topo.add(f"k{all_rp_filter}")
    ns.run(["sysctl", "-qw", f"net.ipv4.conf.all.rp_filter={all_rp_filter}"])
    out = ns.run([sys.executable, "-c", TUN_PROBE, name]).stdout
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_tun_device_with_a_dotted_name_gets_its_sysctls(topo: Topology) -> None:
    # sysctl(8) reads the dots of "tun.1" as separators; the device's own settings must still apply
    r = _probe(topo, 0, "tun.1")
    assert r == {"rp_filter": 0, "dev": 0, "accept_local": 1, "warnings": []}


def test_tun_device_warns_when_rp_filter_would_drop_decrypted_packets(topo: Topology) -> None:
    # the kernel applies max(all, dev): loose mode on "all" drops every decrypted packet here
    r = _probe(topo, 2, "nfqipsec0")
    assert r["dev"] == 0 and r["rp_filter"] == 2
    assert len(r["warnings"]) == 1 and "net.ipv4.conf.all.rp_filter=0" in r["warnings"][0]
