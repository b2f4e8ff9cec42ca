"""Host-to-host ESP (transport and tunnel) between two namespaces, both running the engine.

What must hold: ping, UDP and TCP work both ways over IPv4 and IPv6; a capture of the wire
shows ESP only for the protected flows; large datagrams are fragmented after encryption;
with DF set the sender learns the MTU that accounts for the ESP overhead; forged cleartext
and ESP whose inner packet does not match its SA's policy are dropped and counted.
"""

from __future__ import annotations

import re

import pytest

from nfq_ipsec.netns import Topology

from .conftest import RULES, clear_leaks, esp_count, ping, stats, tcp_transfer, udp_echo

A4, B4, A6, B6 = "192.0.2.1", "192.0.2.2", "2001:db8:1::1", "2001:db8:1::2"
HOSTS = {A4, B4, A6, B6}


def _pair(topo: Topology):  # type: ignore[no-untyped-def]
    a, b = topo.add("a"), topo.add("b")
    ia, ib = topo.link(a, [f"{A4}/24", f"{A6}/64"], b, [f"{B4}/24", f"{B6}/64"])
    return a, b, ia, ib


@pytest.mark.parametrize("kind", ["transport", "tunnel"])
def test_host_to_host_traffic_is_esp_only(topo, engines, capture, kind):  # type: ignore[no-untyped-def]
    a, b, _ia, ib = _pair(topo)
    ea = engines.start(a, RULES / f"host-to-host-{kind}.toml", "a")
    eb = engines.start(b, RULES / f"host-to-host-{kind}-b.toml", "b")
    with capture(b, ib) as cap:
        for ns, dst in ((a, B4), (a, B6), (b, A4), (b, A6)):
            r = ping(ns, dst, count=3)
            assert r.returncode == 0, f"ping {dst} failed:\n{r.stdout}{r.stderr}\n{ea.output()[-2000:]}"
        udp_echo(a, b, B4)
        udp_echo(b, a, A6)
        tcp_transfer(a, b, B4, 1 << 20)
        tcp_transfer(b, a, A6, 1 << 20)
        # large datagrams: fragmented after encryption (v4 DF clear; v6 by the sending host)
        for ns, dst in ((a, B4), (b, A4)):
            r = ping(ns, dst, count=2, size=8000, df=False)
            assert r.returncode == 0, r.stdout + r.stderr
        for ns, dst in ((a, B6), (b, A6)):
            r = ping(ns, dst, count=2, size=8000)
            assert r.returncode == 0, r.stdout + r.stderr
    pkts = cap.packets()
    leaks = clear_leaks(pkts, HOSTS)
    assert not leaks, f"{len(leaks)} cleartext packets on the wire, first: {leaks[0].summary()}"
    assert esp_count(pkts) > 100
    for e in (ea, eb):
        st = stats(e)
        for name, c in st["sas"].items():
            assert c.get("integrity_failures", 0) == 0, (name, c)
            assert c.get("replay_drops", 0) == 0, (name, c)
        assert st["counters"].get("NfqEngineError", 0) == 0, st["counters"]
    # every SA saw traffic, and what A sent on its v4 out-SA is what B received on it
    sa_a, sa_b = stats(ea)["sas"], stats(eb)["sas"]
    shared = set(sa_a) & set(sa_b)
    assert shared, (sa_a.keys(), sa_b.keys())
    for name in shared:
        assert sa_a[name]["packets"] > 0, name


def test_df_set_gets_mtu_accounting_for_esp_overhead(topo, engines):  # type: ignore[no-untyped-def]
    a, b, _ia, _ib = _pair(topo)
    engines.start(a, RULES / "host-to-host-transport.toml", "a")
    engines.start(b, RULES / "host-to-host-transport-b.toml", "b")
    # 1472 bytes of ICMP payload fills a 1500-byte MTU exactly; with ESP it no longer fits
    r = ping(a, B4, count=2, size=1472, df=True, timeout=1)
    out = r.stdout + r.stderr
    m = re.search(r"mtu\s*=\s*(\d+)", out, re.I)
    assert r.returncode != 0 and m, out
    mtu = int(m.group(1))
    assert 1400 <= mtu < 1500, out
    # a datagram that fits the advertised MTU goes through with DF set
    r = ping(a, B4, count=2, size=mtu - 28, df=True)
    assert r.returncode == 0, r.stdout + r.stderr
    # ... and one byte more would not have fit after encryption: the MTU is tight (within padding)
    r = ping(a, B4, count=1, size=mtu - 28 + 16, df=True, timeout=1)
    assert r.returncode != 0


def test_forged_cleartext_to_protected_host_is_dropped_and_counted(topo, engines):  # type: ignore[no-untyped-def]
    a, b, _ia, _ib = _pair(topo)
    ea = engines.start(a, RULES / "host-to-host-transport.toml", "a")
    # b runs no engine: its packets to a arrive in clear and match a's `in` protect policy
    r = ping(b, A4, count=2, timeout=1)
    assert r.returncode != 0, r.stdout
    st = stats(ea)
    assert st["counters"].get("NfqInCleartextProtected", 0) >= 2, st["counters"]


def test_esp_with_inner_packet_outside_policy_is_dropped(topo, engines):  # type: ignore[no-untyped-def]
    """Tunnel-mode ESP, correctly keyed, whose inner source is not the policy's: RFC 4301 §5.2 step 4."""
    from nfq_ipsec.config import load_config
    from nfq_ipsec.spd import Direction

    a, b, _ia, _ib = _pair(topo)
    ea = engines.start(a, RULES / "host-to-host-tunnel.toml", "a")
    cfg_b = load_config(RULES / "host-to-host-tunnel-b.toml")
    out_pol = next(p for p in cfg_b.policies if p.dir is Direction.OUT and p.sa and ":" not in str(p.selector.dst))
    sa = next(s for s in cfg_b.sas if s.name == out_pol.sa)
    from scapy.layers.inet import IP, UDP

    inner = bytes(IP(src="203.0.113.66", dst=A4) / UDP(sport=1111, dport=2222) / b"not from the policy's source")
    pkt = sa.protect(inner)
    script = (
        "import socket,sys; s=socket.socket(socket.AF_INET,socket.SOCK_RAW,socket.IPPROTO_RAW);"
        f"s.sendto(bytes.fromhex('{pkt.hex()}'),('{A4}',0))"
    )
    import sys

    b.run([sys.executable, "-c", script])
    import time

    time.sleep(0.5)
    st = stats(ea)
    assert st["counters"].get("XfrmInTmplMismatch", 0) >= 1, st["counters"]
