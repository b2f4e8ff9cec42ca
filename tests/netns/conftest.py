"""Fixtures for tests on real packets in real network namespaces (root needed)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from nfq_ipsec.netns import Capture, EngineProcess, Namespace, Topology

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "rules"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/netns" in str(item.fspath):
            item.add_marker(pytest.mark.netns)


@pytest.fixture(autouse=True)
def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, iptables, NFQUEUE)")
    if shutil.which("iptables-legacy") is None:
        pytest.skip("iptables-legacy missing (apt-get install iptables)")


@pytest.fixture
def topo() -> Iterator[Topology]:
    t = Topology("nt")
    try:
        yield t
    finally:
        t.destroy()


def config_keys(path: str | Path) -> list[str]:
    """Every key of a configuration, as hex strings, to check that none is ever printed."""
    data = tomllib.loads(Path(path).read_text())
    keys = []
    for sa in data.get("sa", []):
        for k, v in sa.items():
            if k in ("key", "enc_key", "auth_key") and isinstance(v, str):
                h = v.lower().removeprefix("0x")
                if len(h) >= 8:
                    keys.append(h)
    return keys


class Engines:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[EngineProcess] = []

    def start(self, ns: Namespace, config: str | Path, name: str | None = None) -> EngineProcess:
        name = name or ns.name
        e = EngineProcess(ns, str(config), str(self.tmp / f"{name}.sock"), str(self.tmp / f"{name}.log"))
        self.procs.append(e)
        e.wait_ready()
        return e

    def stop_all(self) -> None:
        for e in self.procs:
            rc = e.stop()
            out = e.output()
            assert rc == 0, f"engine in {e.ns.name} exited {rc}:\n{out[-3000:]}"
            for k in config_keys(e.config):
                assert k not in out.lower(), "key material in engine output"
            assert "Traceback" not in out, out[-3000:]
        self.procs = []


@pytest.fixture
def engines(tmp_path: Path) -> Iterator[Engines]:
    e = Engines(tmp_path)
    try:
        yield e
    finally:
        e.stop_all()


@pytest.fixture
def capture(tmp_path: Path):  # type: ignore[no-untyped-def]
    def make(ns: Namespace, ifname: str, name: str = "cap") -> Capture:
        return Capture(ns, ifname, tmp_path / f"{name}.pcap")

    return make


# -- traffic helpers ---------------------------------------------------------------------------
def ping(ns: Namespace, dst: str, count: int = 3, size: int = 56, df: bool | None = None, timeout: float = 2,
         interval: float = 0.2) -> subprocess.CompletedProcess[str]:
    cmd = ["ping", "-n", "-c", str(count), "-i", str(interval), "-W", str(timeout), "-s", str(size)]
    if df is True:
        cmd += ["-M", "do"]
    elif df is False:
        cmd += ["-M", "dont"]
    cmd.append(dst)
    return ns.run(cmd, check=False, timeout=count * (interval + timeout) + 10)


def traffic(ns: Namespace, *args: str, timeout: float = 30) -> subprocess.Popen[str]:
    return subprocess.Popen(ns.cmd(sys.executable, "-m", "nfq_ipsec.traffic", *args), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_ready(p: subprocess.Popen[str]) -> None:
    assert p.stdout is not None
    line = p.stdout.readline()
    assert line.strip() == "ready", line


def udp_echo(client: Namespace, server: Namespace, server_addr: str, port: int = 7777, size: int = 200,
             count: int = 5) -> str:
    srv = traffic(server, "udp-echo-server", server_addr, str(port), "--count", str(count * 3), "--timeout", "10")
    wait_ready(srv)
    cli = traffic(client, "udp-echo", server_addr, str(port), "--size", str(size), "--count", str(count),
                  "--timeout", "2")
    out, _ = cli.communicate(timeout=60)
    srv.terminate()
    srv.wait(5)
    assert cli.returncode == 0, out
    return out


def tcp_transfer(client: Namespace, server: Namespace, server_addr: str, nbytes: int, port: int = 7778,
                 timeout: float = 60) -> None:
    srv = traffic(server, "tcp-sink", server_addr, str(port), "--timeout", str(timeout))
    wait_ready(srv)
    cli = traffic(client, "tcp-send", server_addr, str(port), "--bytes", str(nbytes), "--timeout", str(timeout))
    cout, _ = cli.communicate(timeout=timeout + 10)
    sout, _ = srv.communicate(timeout=timeout + 10)
    assert cli.returncode == 0, cout
    sent = cout.strip().splitlines()[-1]
    got = sout.strip().splitlines()[-1]
    assert sent == got, f"sent {sent}, received {got}"


def stats(engine: EngineProcess) -> dict:  # type: ignore[type-arg]
    import json

    p = subprocess.run([os.path.join(os.path.dirname(sys.executable), "nfq-ipsec"), "stats", "--json", "--socket",
                        engine.socket_path], capture_output=True, text=True, timeout=10)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)  # type: ignore[no-any-return]


def clear_leaks(pkts: list, hosts: set[str], protos: tuple[int, ...] = (1, 6, 17, 58)) -> list:  # type: ignore[type-arg]
    """Packets between `hosts` carried in clear (not ESP/AH), ignoring IPv6 neighbour discovery."""
    from scapy.layers.inet import IP
    from scapy.layers.inet6 import IPv6

    leaks = []
    for p in pkts:
        ip = p.getlayer(IP) or p.getlayer(IPv6)
        if ip is None or ip.src not in hosts or ip.dst not in hosts:
            continue
        proto = ip.proto if ip.version == 4 else _v6_upper(ip)
        if proto in protos:
            if proto == 58 and _is_nd(ip):
                continue
            leaks.append(p)
    return leaks


def _v6_upper(ip) -> int:  # type: ignore[no-untyped-def]
    layer = ip.payload
    nh = ip.nh
    while nh in (0, 43, 44, 60) and layer is not None and hasattr(layer, "nh"):
        nh = layer.nh
        layer = layer.payload
    return int(nh)


def _is_nd(ip) -> bool:  # type: ignore[no-untyped-def]
    from scapy.layers.inet6 import ICMPv6ND_NA, ICMPv6ND_NS, ICMPv6ND_RA, ICMPv6ND_RS

    return any(ip.haslayer(c) for c in (ICMPv6ND_NS, ICMPv6ND_NA, ICMPv6ND_RS, ICMPv6ND_RA))


def esp_count(pkts: list) -> int:  # type: ignore[type-arg]
    from scapy.layers.inet import IP
    from scapy.layers.inet6 import IPv6

    n = 0
    for p in pkts:
        ip = p.getlayer(IP) or p.getlayer(IPv6)
        if ip is None:
            continue
        if (ip.version == 4 and ip.proto == 50) or (ip.version == 6 and _v6_upper(ip) == 50):
            n += 1
    return n


