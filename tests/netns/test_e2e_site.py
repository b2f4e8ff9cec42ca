"""Site to site: hostA — gwA ==ESP== router == gwB — hostB, engines on both gateways.

The router's links are the wire: protected flows must be ESP only there, the bypass flow
(UDP 9999) clear, the discard flow (TCP 23) answered with ICMP administratively prohibited
by the gateway, large packets fragmented after encryption or answered with the right MTU.
"""

from __future__ import annotations

import sys
import time

import pytest

from nfq_ipsec.netns import Namespace, Topology

from .conftest import RULES, clear_leaks, esp_count, ping, stats, tcp_transfer, udp_echo

HA4, HB4, HA6, HB6 = "192.0.2.10", "192.0.2.130", "2001:db8:a::10", "2001:db8:b::10"


class Site:
    def __init__(self, topo: Topology) -> None:
        self.ha, self.ga, self.r, self.gb, self.hb = (
            topo.add("ha"), topo.add("ga", forwarding=True), topo.add("r", forwarding=True),
            topo.add("gb", forwarding=True), topo.add("hb"))
        topo.link(self.ha, [f"{HA4}/25", f"{HA6}/64"], self.ga, ["192.0.2.1/25", "2001:db8:a::1/64"])
        _, self.r_a = topo.link(self.ga, ["203.0.113.1/24", "2001:db8:ff01::1/64"],
                                self.r, ["203.0.113.254/24", "2001:db8:ff01::fe/64"])
        self.r_b, _ = topo.link(self.r, ["198.51.100.254/24", "2001:db8:ff02::fe/64"],
                                self.gb, ["198.51.100.1/24", "2001:db8:ff02::1/64"])
        topo.link(self.gb, ["192.0.2.129/25", "2001:db8:b::1/64"], self.hb, [f"{HB4}/25", f"{HB6}/64"])
        for ns, v4, v6 in ((self.ha, "192.0.2.1", "2001:db8:a::1"), (self.hb, "192.0.2.129", "2001:db8:b::1")):
            ns.run(["ip", "route", "add", "default", "via", v4])
            ns.run(["ip", "-6", "route", "add", "default", "via", v6])
        for ns, v4, v6 in ((self.ga, "203.0.113.254", "2001:db8:ff01::fe"),
                           (self.gb, "198.51.100.254", "2001:db8:ff02::fe")):
            ns.run(["ip", "route", "add", "default", "via", v4])
            ns.run(["ip", "-6", "route", "add", "default", "via", v6])
        # the router knows the inner nets too, so bypassed (clear) traffic can cross it
        for net, via in (("192.0.2.0/25", "203.0.113.1"), ("192.0.2.128/25", "198.51.100.1"),
                         ("2001:db8:a::/64", "2001:db8:ff01::1"), ("2001:db8:b::/64", "2001:db8:ff02::1")):
            topo.route(self.r, net, via)
        # resolve IPv6 neighbours hop by hop before the engines start (no first-packet loss)
        for ns, addr in ((self.ha, "2001:db8:a::1"), (self.ga, "2001:db8:ff01::fe"),
                         (self.r, "2001:db8:ff02::1"), (self.gb, "2001:db8:b::10")):
            ns.run(["ping", "-c", "1", "-W", "2", addr], check=False)


@pytest.fixture
def site(topo, engines):  # type: ignore[no-untyped-def]
    s = Site(topo)
    s.ea = engines.start(s.ga, RULES / "site-to-site-gw-a.toml", "gwa")  # type: ignore[attr-defined]
    s.eb = engines.start(s.gb, RULES / "site-to-site-gw-b.toml", "gwb")  # type: ignore[attr-defined]
    return s


def _connect_errno(ns: Namespace, dst: str, port: int) -> str:
    code = (
        "import socket,sys\n"
        f"s=socket.socket(socket.AF_INET6 if ':' in '{dst}' else socket.AF_INET)\n"
        "s.settimeout(4)\n"
        "try:\n"
        f"    s.connect(('{dst}',{port})); print('connected')\n"
        "except OSError as e:\n"
        "    print(type(e).__name__, e.errno)\n"
    )
    return ns.run([sys.executable, "-c", code], check=False).stdout.strip()


def test_site_to_site_protects_bypasses_and_discards(site, capture):  # type: ignore[no-untyped-def]
    with capture(site.r, site.r_a, "router") as cap:
        # the bypass policy: UDP 9999 crosses in clear
        udp_echo(site.ha, site.hb, HB4, port=9999, count=2)
        for ns, dst in ((site.ha, HB4), (site.hb, HA4), (site.ha, HB6), (site.hb, HA6)):
            r = ping(ns, dst, count=3)
            assert r.returncode == 0, f"ping {dst}: {r.stdout}{r.stderr}\n{site.ea.output()[-2000:]}"
        udp_echo(site.ha, site.hb, HB4)
        udp_echo(site.hb, site.ha, HA6)
        tcp_transfer(site.ha, site.hb, HB4, 5 << 20)
        tcp_transfer(site.hb, site.ha, HA6, 1 << 20)
        for ns, dst in ((site.ha, HB4), (site.hb, HA4)):
            r = ping(ns, dst, count=2, size=8000, df=False)
            assert r.returncode == 0, r.stdout + r.stderr
        for ns, dst in ((site.ha, HB6), (site.hb, HA6)):
            r = ping(ns, dst, count=2, size=8000)
            assert r.returncode == 0, r.stdout + r.stderr
    pkts = cap.packets()
    hosts = {HA4, HB4, HA6, HB6}
    leaks = clear_leaks(pkts, hosts)
    clear_bypass = [p for p in leaks if p.haslayer("UDP") and 9999 in (p["UDP"].sport, p["UDP"].dport)]
    other = [p for p in leaks if p not in clear_bypass]
    assert not other, f"{len(other)} protected packets in clear, first: {other[0].summary()}"
    assert clear_bypass, f"the bypass flow should be visible in clear: {stats(site.ea)['policies']}"
    assert esp_count(pkts) > 100
    for e in (site.ea, site.eb):
        st = stats(e)
        for name, c in st["sas"].items():
            assert c.get("integrity_failures", 0) == 0 and c.get("replay_drops", 0) == 0, (name, c)
        # the IPv4 TCP transfer (data one way, ACKs the other) went mostly through the C fast
        # path, on both sides: encrypting at one gateway, decrypting at the other
        fast = st["fast_path"]
        assert fast["enabled"] and fast["packets"] > 2000, fast
        assert sum(q["fast_path"] for q in st["queues"]) == fast["packets"] + fast.get("dropped", 0)


def test_discard_on_gateway_reports_admin_prohibited(site):  # type: ignore[no-untyped-def]
    # ICMP type 3 code 13 → EHOSTUNREACH (113) for TCP; ICMPv6 type 1 code 1 → EACCES (13)
    out4 = _connect_errno(site.ha, HB4, 23)
    assert out4.endswith(" 113"), out4
    out6 = _connect_errno(site.ha, HB6, 23)
    assert out6.endswith(" 13"), out6
    st = stats(site.ea)
    assert st["counters"].get("NfqFwdPolBlock", 0) >= 2, st["counters"]


def test_df_set_through_tunnel_gets_frag_needed_with_esp_mtu(site):  # type: ignore[no-untyped-def]
    r = ping(site.ha, HB4, count=2, size=1472, df=True, timeout=1)
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "mtu" in out.lower(), out
    import re

    mtu = int(re.search(r"mtu\s*=\s*(\d+)", out, re.I).group(1))  # type: ignore[union-attr]
    assert 1400 <= mtu < 1500, out
    r = ping(site.ha, HB4, count=2, size=mtu - 28, df=True)
    assert r.returncode == 0, r.stdout + r.stderr
    # IPv6: a full-size packet from the host gets a Packet Too Big from the gateway
    r = ping(site.ha, HB6, count=2, size=1452, df=True, timeout=1)
    out = r.stdout + r.stderr
    assert "mtu" in out.lower(), out


def test_forged_cleartext_from_remote_net_is_dropped(site):  # type: ignore[no-untyped-def]
    """A clear packet claiming to come from net B, injected at the router, must not reach host A."""
    script = (
        "from scapy.all import IP, UDP, send\n"
        f"send(IP(src='{HB4}', dst='{HA4}')/UDP(sport=5555, dport=6666)/b'forged', verbose=False, count=3)\n"
    )
    site.r.run([sys.executable, "-c", script])
    time.sleep(0.5)
    st = stats(site.ea)
    assert st["counters"].get("NfqInCleartextProtected", 0) >= 3, st["counters"]
