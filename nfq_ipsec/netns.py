"""Network-namespace topologies for the demo, the tests and the benchmarks.

Only documentation addresses are allowed (RFC 5737 / RFC 3849), every namespace created is
remembered and deleted by `Topology.destroy()` (also used as a context manager), and nothing
in the root namespace is touched except the veth pairs, which move into their namespaces
right away.
"""

from __future__ import annotations

import ipaddress
import os
import shlex
import signal
import subprocess
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

DOC_NETS = tuple(
    ipaddress.ip_network(n)
    for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32")
)


def is_documentation_address(addr: str) -> bool:
    a = ipaddress.ip_interface(addr).ip
    return any(a.version == n.version and a in n for n in DOC_NETS)


def run(cmd: Sequence[str] | str, check: bool = True, timeout: float = 60,
        **kw: object) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing text output; raise with the output on failure."""
    args = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
    p = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload]
    if check and p.returncode != 0:
        raise RuntimeError(f"command failed ({p.returncode}): {' '.join(args)}\n{p.stdout}{p.stderr}")
    return p  # type: ignore[no-any-return]


@dataclass
class Namespace:
    name: str

    def cmd(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *args]

    def run(self, cmd: Sequence[str] | str, check: bool = True,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        args = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
        return run(self.cmd(*args), check=check, timeout=timeout)

    def popen(self, cmd: Sequence[str] | str, **kw: object) -> subprocess.Popen[bytes]:
        args = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
        return subprocess.Popen(self.cmd(*args), **kw)  # type: ignore[call-overload]

    def sysctl(self, key: str, value: str) -> None:
        self.run(["sysctl", "-qw", f"{key}={value}"])


def wait_link_ready(ns: Namespace, ifname: str, timeout: float = 5.0) -> None:
    """Wait until the link is up and no IPv6 address on it is still tentative.

    veth carrier changes go through the kernel's linkwatch (up to ~1 s), and IPv6 neighbour
    discovery needs a usable link-local address: without this the first IPv6 packets of a
    test would be delayed by a second or lost.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        p = ns.run(["ip", "-o", "addr", "show", "dev", ifname], check=False)
        state = ns.run(["cat", f"/sys/class/net/{ifname}/operstate"], check=False).stdout.strip()
        if state == "up" and "tentative" not in p.stdout and " inet6 fe80" in p.stdout:
            return
        time.sleep(0.05)


@dataclass
class Topology:
    """A set of namespaces joined by veth links.

    >>> with Topology("t") as topo:
    ...     a, b = topo.add("a"), topo.add("b")
    ...     topo.link(a, "192.0.2.1/24", b, "192.0.2.2/24")
    """

    prefix: str = "nfq"
    namespaces: dict[str, Namespace] = field(default_factory=dict)
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:5])
    _links: int = 0

    def add(self, short: str, forwarding: bool = False) -> Namespace:
        name = f"{self.prefix}{self.tag}-{short}"
        if name in self.namespaces:
            raise ValueError(f"namespace {name} exists")
        run(["ip", "netns", "add", name])
        ns = Namespace(name)
        self.namespaces[short] = ns
        ns.run("ip link set lo up")
        ns.sysctl("net.ipv6.conf.all.accept_dad", "0")
        ns.sysctl("net.ipv6.conf.default.accept_dad", "0")
        ns.sysctl("net.ipv6.conf.all.disable_ipv6", "0")
        if forwarding:
            ns.sysctl("net.ipv4.ip_forward", "1")
            ns.sysctl("net.ipv6.conf.all.forwarding", "1")
        return ns

    def link(self, a: Namespace, a_addrs: str | Sequence[str], b: Namespace, b_addrs: str | Sequence[str],
             mtu: int = 1500) -> tuple[str, str]:
        """Join a and b with a veth pair; returns the interface names (in a, in b)."""
        self._links += 1
        ia, ib = f"v{self.tag}{self._links}a", f"v{self.tag}{self._links}b"
        run(["ip", "link", "add", ia, "mtu", str(mtu), "netns", a.name, "type", "veth", "peer", "name", ib,
             "mtu", str(mtu), "netns", b.name])
        for ns, ifn, addrs in ((a, ia, a_addrs), (b, ib, b_addrs)):
            ns.sysctl(f"net.ipv6.conf.{ifn}.accept_dad", "0")
            for addr in [addrs] if isinstance(addrs, str) else addrs:
                if not is_documentation_address(addr):
                    raise ValueError(f"{addr} is not a documentation address")
                fam = "-6" if ":" in addr else "-4"
                extra = ["nodad"] if fam == "-6" else []
                ns.run(["ip", fam, "addr", "add", addr, "dev", ifn, *extra])
            ns.run(["ip", "link", "set", ifn, "up"])
        for ns, ifn in ((a, ia), (b, ib)):
            wait_link_ready(ns, ifn)
        return ia, ib

    def route(self, ns: Namespace, prefix: str, via: str) -> None:
        fam = "-6" if ":" in prefix else "-4"
        ns.run(["ip", fam, "route", "add", prefix, "via", via])

    def destroy(self) -> None:
        for ns in self.namespaces.values():
            # kill anything still running inside, then delete
            pids = run(["ip", "netns", "pids", ns.name], check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            run(["ip", "netns", "del", ns.name], check=False)
        self.namespaces.clear()

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.destroy()


class EngineProcess:
    """An `nfq-ipsec run` engine inside a namespace, started and stopped cleanly.

    stderr goes to a file so tests can grep everything the engine printed (e.g. for keys).
    """

    def __init__(self, ns: Namespace, config: str, socket_path: str, log_path: str,
                 extra_args: Sequence[str] = ()) -> None:
        import sys

        self.ns = ns
        self.config = config
        self.socket_path = socket_path
        self.log_path = log_path
        exe = os.path.join(os.path.dirname(sys.executable), "nfq-ipsec")
        self._log = open(log_path, "ab")
        self.proc = ns.popen([exe, "run", "-c", config, "--socket", socket_path, *extra_args],
                             stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def wait_ready(self, timeout: float = 15.0) -> None:
        import socket as _s

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"engine exited with {self.proc.returncode}:\n{self.output()}")
            if os.path.exists(self.socket_path):
                try:
                    with _s.socket(_s.AF_UNIX, _s.SOCK_STREAM) as c:
                        c.settimeout(1)
                        c.connect(self.socket_path)
                        c.sendall(b'{"cmd": "ping"}\n')
                        if c.recv(4096):
                            return
                except OSError:
                    pass
            time.sleep(0.05)
        raise RuntimeError(f"engine not ready after {timeout}s:\n{self.output()}")

    def output(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return int(self.proc.returncode)

    def kill(self) -> None:
        """SIGKILL: no clean-up at all (to test fail-closed behaviour)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self._log.close()


class Capture:
    """tcpdump on one interface of a namespace, for the duration of a `with` block.

    --immediate-mode: without it libpcap hands packets over in blocks and the last ones are lost
    when tcpdump is stopped -- a leak at the very end of a test would go unseen.
    """

    def __init__(self, ns: Namespace, ifname: str, path: str | os.PathLike[str]) -> None:
        self.ns, self.ifname, self.path = ns, ifname, os.fspath(path)

    def __enter__(self) -> Capture:
        self._err = open(self.path + ".err", "w+b")
        self.proc = self.ns.popen(["tcpdump", "-i", self.ifname, "-n", "-U", "--immediate-mode", "-s", "0",
                                   "-w", self.path], stdout=subprocess.DEVNULL, stderr=self._err)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            self._err.seek(0)
            if b"listening on" in self._err.read():
                break
            time.sleep(0.05)
        time.sleep(0.2)  # "listening" is printed a moment before the socket sees packets
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.2)
        self.proc.send_signal(signal.SIGINT)  # tcpdump flushes and exits
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self._err.close()

    def frames(self) -> list[bytes]:
        """The captured frames as raw bytes (link layer included)."""
        from scapy.utils import RawPcapReader

        if not os.path.exists(self.path) or os.path.getsize(self.path) == 0:
            return []
        return [bytes(data) for data, _meta in RawPcapReader(self.path)]

    def packets(self) -> list[Any]:
        """The captured frames dissected by scapy."""
        import scapy.all  # noqa: F401  (registers the Ethernet/IP dissectors)
        from scapy.utils import rdpcap

        pkts = list(rdpcap(self.path))
        assert all(p.name != "Raw" for p in pkts[:5]), "capture not dissected"
        return pkts
