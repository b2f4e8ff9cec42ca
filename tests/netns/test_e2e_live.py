"""SAs and policies added and removed while the engine runs, without disturbing other traffic."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

from .conftest import ping, stats

A4, B4, A6, B6 = "192.0.2.1", "192.0.2.2", "2001:db8:1::1", "2001:db8:1::2"
NFQ = os.path.join(os.path.dirname(sys.executable), "nfq-ipsec")


def _sa(name: str, src: str, dst: str, spi: int, key: str) -> str:
    return (f'[[sa]]\nname = "{name}"\nproto = "esp"\nmode = "transport"\nsrc = "{src}"\ndst = "{dst}"\n'
            f'spi = {spi}\naead = "aes-gcm-128"\nkey = "0x{key}"\n\n')


def _pol(name: str, d: str, src: str, dst: str, sa: str, extra: str = "") -> str:
    return (f'[[policy]]\nname = "{name}"\ndir = "{d}"\nsrc = "{src}"\ndst = "{dst}"\naction = "protect"\n'
            f'sa = "{sa}"\npriority = 100\n{extra}\n')


def _bypass_nd(d: str, t: int) -> str:
    return (f'[[policy]]\nname = "nd-{d}-{t}"\ndir = "{d}"\nproto = "ipv6-icmp"\nicmp_type = {t}\n'
            f'action = "bypass"\npriority = 10\n\n')


K1, K2, K3, K4 = ("11" * 20), ("22" * 20), ("33" * 20), ("44" * 20)


def _v4(me: str) -> str:
    a = me == "a"
    return ('[engine]\ndefault_policy = "bypass"\n\n' + _sa("a-b", A4, B4, 0x1001, K1) + _sa("b-a", B4, A4, 0x1002, K2)
            + _pol("out4", "out", f"{A4 if a else B4}/32", f"{B4 if a else A4}/32", "a-b" if a else "b-a")
            + _pol("in4", "in", f"{B4 if a else A4}/32", f"{A4 if a else B4}/32", "b-a" if a else "a-b"))


def _v6_fragment(me: str) -> str:
    a = me == "a"
    nd = "".join(_bypass_nd(d, t) for d in ("in", "out") for t in (135, 136))
    return (_sa("a-b6", A6, B6, 0x2001, K3) + _sa("b-a6", B6, A6, 0x2002, K4) + nd
            + _pol("out6", "out", f"{A6 if a else B6}/128", f"{B6 if a else A6}/128", "a-b6" if a else "b-a6")
            + _pol("in6", "in", f"{B6 if a else A6}/128", f"{A6 if a else B6}/128", "b-a6" if a else "a-b6"))


def _nfq(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([NFQ, *args], capture_output=True, text=True, timeout=30)


def test_add_and_remove_sas_and_policies_while_running(topo, engines, capture, tmp_path):  # type: ignore[no-untyped-def]
    a, b = topo.add("a"), topo.add("b")
    _, ib = topo.link(a, [f"{A4}/24", f"{A6}/64"], b, [f"{B4}/24", f"{B6}/64"])
    paths = {}
    for me in ("a", "b"):
        cfg = tmp_path / f"{me}.toml"
        cfg.write_text(_v4(me))
        cfg.chmod(0o600)
        frag = tmp_path / f"{me}-v6.toml"
        frag.write_text(_v6_fragment(me))
        frag.chmod(0o600)
        paths[me] = (cfg, frag)
    ea = engines.start(a, paths["a"][0], "a")
    eb = engines.start(b, paths["b"][0], "b")

    # a steady protected IPv4 flow runs during every change below: it must lose nothing
    steady: dict[str, subprocess.CompletedProcess[str]] = {}
    t = threading.Thread(target=lambda: steady.setdefault("r", ping(a, B4, count=40, interval=0.05, timeout=2)))
    with capture(b, ib, "live") as cap:
        t.start()
        assert ping(a, B6, count=2).returncode == 0  # no IPv6 policy yet: clear
        for e, me in ((ea, "a"), (eb, "b")):
            r = _nfq("sa", "add", "--socket", e.socket_path, str(paths[me][1]))
            assert r.returncode == 0, r.stderr
            assert "a-b6" in r.stdout and "out6" in r.stdout
        assert ping(a, B6, count=2).returncode == 0  # now protected
        r = _nfq("sa", "list", "--json", "--socket", ea.socket_path)
        assert r.returncode == 0 and "a-b6" in r.stdout and K3 not in r.stdout
        # an SA still used by a policy cannot be removed; bad input changes nothing
        r = _nfq("sa", "remove", "--socket", ea.socket_path, "a-b6")
        assert r.returncode != 0 and "out6" in r.stderr
        bad = tmp_path / "bad.toml"
        bad.write_text(_sa("x", A4, B4, 0x1001, K1))  # duplicate SPI for the same destination
        r = _nfq("sa", "add", "--socket", ea.socket_path, str(bad))
        assert r.returncode != 0 and "spi" in r.stderr.lower(), r.stderr
        for e in (ea, eb):
            for pol in ("out6", "in6"):
                r = _nfq("policy", "remove", "--socket", e.socket_path, pol)
                assert r.returncode == 0, r.stderr
        before = stats(ea)["sas"]["a-b6"]["packets"]
        assert ping(a, B6, count=2).returncode == 0  # clear again: the SA is not used any more
        assert stats(ea)["sas"]["a-b6"]["packets"] == before
        t.join(30)
    res = steady["r"]
    assert " 0% packet loss" in res.stdout, res.stdout
    from scapy.layers.inet6 import IPv6

    v6 = [p for p in cap.packets() if p.haslayer(IPv6)]
    esp6 = [float(p.time) for p in v6 if p[IPv6].nh == 50]
    clear6 = [float(p.time) for p in v6 if p.haslayer("ICMPv6 Echo Request")]
    assert len(esp6) >= 4, "IPv6 pings while the added policies were in place must be ESP"
    assert any(t < min(esp6) for t in clear6), "IPv6 pings before the policies were added must be clear"
