"""`nfq-ipsec demo`: see it work in a minute, on namespaces it builds and removes itself.

Two scenarios, both with the shipped example configurations from rules/:
host-to-host (ESP transport between two hosts) and site-to-site (two gateways tunnel two
networks through a router). The demo sends ping, UDP and TCP traffic, captures the wire,
then shows per-SA and per-policy counters and one captured ESP packet next to the same
packet decrypted. Everything is removed at the end, also on Ctrl-C.

With `--peer kernel` the other host of the host-to-host scenario is not another nfq-ipsec but
the Linux kernel's own IPsec (XFRM), running in user-mode-linux (umlpeer.py): both sides are
configured from one description with fresh random keys (interop.py), which is the point of
the exercise: an implementation nobody here wrote agrees with ours on every packet.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .netns import Capture, EngineProcess, Namespace, Topology
from .render import table

if TYPE_CHECKING:
    from .interop import Keyed
    from .umlpeer import Job, KernelSa, UmlPeer

RULES_DIRS = (Path(__file__).resolve().parent.parent / "rules", Path(__file__).resolve().parent / "data")


def rules_path(name: str) -> Path:
    for d in RULES_DIRS:
        if (d / name).exists():
            return d / name
    raise click.ClickException(f"example configuration {name} not found in {', '.join(map(str, RULES_DIRS))}")


class Step:
    def __init__(self, echo: Callable[[str], None]) -> None:
        self.echo = echo
        self.n = 0

    def __call__(self, text: str) -> None:
        self.n += 1
        self.echo(click.style(f"[{self.n:2d}] ", fg="cyan") + text)


def _ok(ok: bool) -> str:
    return click.style("ok", fg="green") if ok else click.style("FAILED", fg="red")


def _traffic(ns: Namespace, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(ns.cmd(sys.executable, "-m", "nfq_ipsec.traffic", *args), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _ping(ns: Namespace, dst: str, size: int = 56) -> bool:
    return ns.run(["ping", "-n", "-c", "3", "-i", "0.2", "-W", "2", "-s", str(size), dst], check=False).returncode == 0


def _udp(client: Namespace, server: Namespace, addr: str, port: int) -> bool:
    srv = _traffic(server, "udp-echo-server", addr, str(port), "--count", "15", "--timeout", "8")
    assert srv.stdout is not None
    srv.stdout.readline()
    cli = _traffic(client, "udp-echo", addr, str(port), "--count", "5", "--size", "300", "--timeout", "2")
    cli.communicate(timeout=30)
    srv.terminate()
    srv.wait(5)
    return cli.returncode == 0


def _tcp(client: Namespace, server: Namespace, addr: str, nbytes: int, port: int = 7070) -> bool:
    srv = _traffic(server, "tcp-sink", addr, str(port), "--timeout", "30")
    assert srv.stdout is not None
    srv.stdout.readline()
    cli = _traffic(client, "tcp-send", addr, str(port), "--bytes", str(nbytes), "--timeout", "30")
    cout, _ = cli.communicate(timeout=40)
    sout, _ = srv.communicate(timeout=40)
    return cli.returncode == 0 and cout.strip().splitlines()[-1:] == sout.strip().splitlines()[-1:]


def _stats(engine: EngineProcess) -> dict[str, Any]:
    from .control import ControlClient

    c = ControlClient(engine.socket_path)
    try:
        return c.call("stats")["stats"]  # type: ignore[no-any-return]
    finally:
        c.close()


def _wire_sample(pcap: Path, config: Path, max_sas: int = 1) -> list[str]:
    """The first captured ESP packet of (up to max_sas) SAs, each next to the same packet decrypted."""
    import scapy.all  # noqa: F401
    from scapy.layers.inet import IP
    from scapy.layers.inet6 import IPv6
    from scapy.utils import rdpcap

    from .config import load_config
    from .errors import Drop

    cfg = load_config(config)
    lines: list[str] = []
    seen: set[int] = set()
    for p in rdpcap(str(pcap)):
        ip = p.getlayer(IP) or p.getlayer(IPv6)
        if ip is None or ip.haslayer("ESP") is False or (ip.version == 4 and ip.proto != 50):
            continue
        raw = bytes(ip)
        spi = int.from_bytes(raw[(ip.ihl * 4 if ip.version == 4 else 40):][:4], "big")
        if spi in seen:
            continue
        for sa in cfg.sas:
            if sa.spi == spi:
                try:
                    inner = sa.unprotect(raw)
                except Drop:
                    continue
                dec = IP(inner) if inner[0] >> 4 == 4 else IPv6(inner)
                lines += [f"on the wire : {ip.summary()}  ({len(raw)} bytes, SA {sa.name})",
                          f"decrypted   : {dec.summary()}  ({len(inner)} bytes)"]
                seen.add(spi)
                break
        if len(seen) >= max_sas:
            break
    return lines or ["(no ESP packet captured)"]


def _summary(engine: EngineProcess, title: str, kernel: dict[str, KernelSa] | None = None) -> list[str]:
    """Our engine's per-SA and per-policy counters; with `kernel` (SA name -> the kernel's view of the
    same SA, from `ip -s xfrm state`), the kernel's counters next to ours."""
    st = _stats(engine)
    lines = [click.style(title, bold=True)]
    if kernel is None:
        lines.append(table(["SA", "packets", "bytes", "replay drops", "integrity failures"],
                           [[n, c.get("packets", 0), c.get("bytes", 0), c.get("replay_drops", 0),
                             c.get("integrity_failures", 0)] for n, c in st["sas"].items()]))
    else:
        rows = []
        for n, c in st["sas"].items():
            k = kernel.get(n)
            rows.append([n, f"0x{k.spi:08x}" if k else "", c.get("packets", 0), c.get("bytes", 0),
                         k.packets if k else "-", k.bytes if k else "-",
                         f"{c.get('replay_drops', 0)} / {k.replay + k.replay_window_drops if k else '-'}",
                         f"{c.get('integrity_failures', 0)} / {k.integrity_failed if k else '-'}"])
        lines.append(table(["SA", "SPI", "packets (ours)", "bytes (ours)", "packets (kernel)", "bytes (kernel)",
                            "replay drops (ours / kernel)", "integrity failures (ours / kernel)"], rows))
        lines.append("(the kernel's byte counts leave out the IP header of each packet; ours include it)")
    pol = [[n, c.get("packets", 0), c.get("bytes", 0)] for n, c in st["policies"].items() if c.get("packets")]
    if pol:
        lines.append(table(["policy", "packets", "bytes"], pol))
    errors = {k: v for k, v in st["counters"].items() if v}
    lines.append("drops/errors: " + (", ".join(f"{k}={v}" for k, v in errors.items()) or "none"))
    return lines


def _exercise(step: Step, engines: tuple[EngineProcess, EngineProcess], what: str,
              wire: tuple[Namespace, str, Path], checks: list[tuple[str, Callable[[], bool]]],
              title: str, peer_config: Path, results: list[str]) -> bool:
    """Start both engines, capture the wire, run the checks, then collect counters and a sample."""
    ea, eb = engines
    ok_all = True
    try:
        ea.wait_ready()
        eb.wait_ready()
        step(what)
        ns, ifname, pcap = wire
        with Capture(ns, ifname, pcap):
            for label, fn in checks:
                ok = fn()
                ok_all &= ok
                step(f"{label}: {_ok(ok)}")
        results += _summary(ea, title)
        results += _wire_sample(pcap, peer_config)
    finally:
        ea.stop()
        eb.stop()
    return ok_all


def host_to_host(step: Step, tmp: Path, results: list[str]) -> bool:
    with Topology("demo") as t:
        a, b = t.add("a"), t.add("b")
        _, ib = t.link(a, ["192.0.2.1/24", "2001:db8:1::1/64"], b, ["192.0.2.2/24", "2001:db8:1::2/64"])
        step("host-to-host: namespaces a (192.0.2.1) and b (192.0.2.2) joined by a veth link")
        engines = (
            EngineProcess(a, str(rules_path("host-to-host-transport.toml")), str(tmp / "a.sock"), str(tmp / "a.log")),
            EngineProcess(b, str(rules_path("host-to-host-transport-b.toml")), str(tmp / "b.sock"),
                          str(tmp / "b.log")),
        )
        checks = [
            ("ping a -> b (IPv4)", lambda: _ping(a, "192.0.2.2")),
            ("ping b -> a (IPv6)", lambda: _ping(b, "2001:db8:1::1")),
            ("UDP echo a -> b", lambda: _udp(a, b, "192.0.2.2", 7001)),
            ("TCP 1 MB a -> b, content verified", lambda: _tcp(a, b, "192.0.2.2", 1 << 20)),
            ("ping 8000 bytes (fragmented after encryption)", lambda: _ping(a, "192.0.2.2", 8000)),
        ]
        return _exercise(step, engines, "engines running on both hosts (ESP transport, AES-GCM-128)",
                         (b, ib, tmp / "h2h.pcap"), checks, "host a",
                         rules_path("host-to-host-transport-b.toml"), results)


def site_to_site(step: Step, tmp: Path, results: list[str]) -> bool:
    with Topology("demo") as t:
        ha, ga, r, gb, hb = t.add("ha"), t.add("ga", True), t.add("r", True), t.add("gb", True), t.add("hb")
        t.link(ha, ["192.0.2.10/25"], ga, ["192.0.2.1/25"])
        _, r_a = t.link(ga, ["203.0.113.1/24"], r, ["203.0.113.254/24"])
        t.link(r, ["198.51.100.254/24"], gb, ["198.51.100.1/24"])
        t.link(gb, ["192.0.2.129/25"], hb, ["192.0.2.130/25"])
        ha.run("ip route add default via 192.0.2.1")
        hb.run("ip route add default via 192.0.2.129")
        ga.run("ip route add default via 203.0.113.254")
        gb.run("ip route add default via 198.51.100.254")
        step("site-to-site: hostA — gwA == router == gwB — hostB (nets 192.0.2.0/25 and 192.0.2.128/25)")
        engines = (
            EngineProcess(ga, str(rules_path("site-to-site-gw-a.toml")), str(tmp / "ga.sock"), str(tmp / "ga.log")),
            EngineProcess(gb, str(rules_path("site-to-site-gw-b.toml")), str(tmp / "gb.sock"), str(tmp / "gb.log")),
        )
        checks = [
            ("ping hostA -> hostB", lambda: _ping(ha, "192.0.2.130")),
            ("UDP echo hostB -> hostA", lambda: _udp(hb, ha, "192.0.2.10", 7002)),
            ("TCP 2 MB hostA -> hostB, content verified", lambda: _tcp(ha, hb, "192.0.2.130", 2 << 20)),
        ]
        return _exercise(step, engines, "engines running on both gateways (ESP tunnel, AES-GCM-256)",
                         (r, r_a, tmp / "s2s.pcap"), checks, "gateway A", rules_path("site-to-site-gw-b.toml"),
                         results)


# -- the Linux kernel as the other host -----------------------------------------------------------
def _uml_traffic(uml: UmlPeer, *args: str, timeout: float = 60.0) -> Job:
    return uml.python("-m", "nfq_ipsec.traffic", *args, timeout=timeout)


def _udp_to_kernel(ns: Namespace, uml: UmlPeer, addr: str, port: int) -> bool:
    srv = _uml_traffic(uml, "udp-echo-server", addr, str(port), "--count", "15", "--timeout", "20", timeout=40)
    if not uml.wait_listening("udp", port):
        srv.kill()
        return False
    cli = _traffic(ns, "udp-echo", addr, str(port), "--count", "5", "--size", "300", "--timeout", "2")
    cli.communicate(timeout=30)
    srv.kill()
    return cli.returncode == 0


def _udp_from_kernel(ns: Namespace, uml: UmlPeer, addr: str, port: int) -> bool:
    srv = _traffic(ns, "udp-echo-server", addr, str(port), "--count", "15", "--timeout", "20")
    try:
        assert srv.stdout is not None
        srv.stdout.readline()
        res = _uml_traffic(uml, "udp-echo", addr, str(port), "--count", "5", "--size", "300", "--timeout", "2",
                           timeout=40).wait()
        return res.ok
    finally:
        srv.terminate()
        srv.communicate(timeout=5)


def _tcp_to_kernel(ns: Namespace, uml: UmlPeer, addr: str, nbytes: int, port: int) -> bool:
    sink = _uml_traffic(uml, "tcp-sink", addr, str(port), "--timeout", "40", timeout=60)
    if not uml.wait_listening("tcp", port):
        sink.kill()
        return False
    cli = _traffic(ns, "tcp-send", addr, str(port), "--bytes", str(nbytes), "--seed", "21", "--timeout", "40")
    cout, _ = cli.communicate(timeout=60)
    got = sink.wait()
    want = cout.strip().splitlines()[-1:]
    return cli.returncode == 0 and got.ok and want == got.out.strip().splitlines()[-1:] and bool(want)


def _tcp_from_kernel(ns: Namespace, uml: UmlPeer, addr: str, nbytes: int, port: int) -> bool:
    srv = _traffic(ns, "tcp-sink", addr, str(port), "--timeout", "40")
    try:
        assert srv.stdout is not None
        srv.stdout.readline()
        sent = _uml_traffic(uml, "tcp-send", addr, str(port), "--bytes", str(nbytes), "--seed", "22", "--timeout",
                            "40", timeout=60).wait()
        sout, _ = srv.communicate(timeout=60)
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.communicate(timeout=5)
    want = sent.out.strip().splitlines()[-1:]
    return sent.ok and srv.returncode == 0 and bool(want) and want == sout.strip().splitlines()[-1:]


def _kernel_summary(engine: EngineProcess, uml: UmlPeer, keyed: Keyed) -> list[str]:
    states = uml.xfrm_state()
    kernel = {name: states[sk.spi] for name, sk in (("o2k", keyed.o2k), ("k2o", keyed.k2o)) if sk.spi in states}
    lines = _summary(engine, "our engine (namespace) and the Linux kernel (ip -s xfrm state)", kernel)
    errors = uml.xfrm_stat()  # /proc/net/xfrm_stat holds error counters only
    lines.append("kernel drops/errors (/proc/net/xfrm_stat): "
                 + (", ".join(f"{k}={v}" for k, v in errors.items()) or "none"))
    return lines


def host_to_kernel(step: Step, tmp: Path, results: list[str]) -> bool:
    """Our engine in a namespace, the Linux kernel (user-mode-linux) as the other host: ESP transport."""
    from .interop import Cell
    from .umlpeer import UmlError, UmlPeer, prepare_namespace

    keyed = Cell("demo-host-to-kernel", alg="aes-gcm-128", mode="transport", outer=4).materialize()
    e = keyed.endpoints
    ok_all = True
    with Topology("demo") as t:
        ns = t.add("o")
        tap = f"nfqd{t.tag}"
        prepare_namespace(ns, tap)
        step(f"host-to-host with the Linux kernel: namespace {ns.name} ({e.ours_outer}), tap {tap} to the kernel "
             f"({e.uml_outer})")
        uml = UmlPeer(ns, tap, tmp / "uml")
        engine: EngineProcess | None = None
        try:
            uml.start()
            release = uml.run("uname -r", timeout=10).out.strip()
            step(f"Linux {release} booted in user-mode-linux ({uml.boot_seconds:.1f} s)")
            uml.xfrm_apply(keyed.kernel_batch())
            step(f"kernel: ip xfrm SAs and policies, ESP transport AES-GCM-128, fresh random keys "
                 f"(SPI ours->kernel 0x{keyed.o2k.spi:08x}, kernel->ours 0x{keyed.k2o.spi:08x})")
            conf = tmp / "ours.toml"
            conf.write_text(keyed.our_toml())
            conf.chmod(0o600)
            engine = EngineProcess(ns, str(conf), str(tmp / "o.sock"), str(tmp / "o.log"))
            engine.wait_ready()
            step("our engine running in the namespace with the mirror configuration (same description, same keys)")
            pcap = tmp / "kernel.pcap"
            ours, theirs = e.ours_inner, e.uml_inner
            checks: tuple[tuple[str, Callable[[], bool]], ...] = (
                ("ping ours -> kernel", lambda: _ping(ns, theirs)),
                ("ping kernel -> ours", lambda: uml.run(f"ping -n -c 3 -i 0.2 -W 2 {ours}", check=False).ok),
                ("UDP echo ours -> kernel", lambda: _udp_to_kernel(ns, uml, theirs, 7011)),
                ("UDP echo kernel -> ours", lambda: _udp_from_kernel(ns, uml, ours, 7012)),
                ("TCP 1 MB ours -> kernel, content verified", lambda: _tcp_to_kernel(ns, uml, theirs, 1 << 20, 7013)),
                ("TCP 1 MB kernel -> ours, content verified",
                 lambda: _tcp_from_kernel(ns, uml, ours, 1 << 20, 7014)),
            )
            with Capture(ns, tap, pcap):
                for label, fn in checks:
                    try:
                        ok = fn()
                    except (UmlError, subprocess.TimeoutExpired) as err:
                        ok = False
                        step(f"{label}: {str(err).splitlines()[0]}")
                    ok_all &= ok
                    step(f"{label}: {_ok(ok)}")
            results += _kernel_summary(engine, uml, keyed)
            results += _wire_sample(pcap, conf, max_sas=2)
        except UmlError as err:
            step(f"the Linux kernel peer failed: {err}")
            ok_all = False
        finally:
            if engine is not None:
                engine.stop()
            uml.stop()
    return ok_all


def run_demo(scenario: str, echo: Callable[[str], None] = click.echo, peer: str = "nfq-ipsec") -> bool:
    import os

    if os.geteuid() != 0:
        raise click.ClickException("the demo builds network namespaces: run it as root")
    for tool in ("ip", "iptables-legacy", "tcpdump", "ping"):
        if shutil.which(tool) is None:
            raise click.ClickException(f"{tool} is missing: run ./setup.sh first")
    if peer == "kernel":
        from .umlpeer import uml_missing_reason

        if scenario == "site":
            raise click.UsageError("--peer kernel runs the host-to-host scenario (--scenario host or all)")
        reason = uml_missing_reason()
        if reason:
            raise click.ClickException(f"the Linux kernel peer cannot run: {reason}")
    step = Step(echo)
    results: list[str] = []
    ok = True
    old = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        with tempfile.TemporaryDirectory(prefix="nfq-ipsec-demo-") as d:
            if peer == "kernel":
                ok &= host_to_kernel(step, Path(d), results)
            if peer != "kernel" and scenario in ("host", "all"):
                ok &= host_to_host(step, Path(d), results)
            if peer != "kernel" and scenario in ("site", "all"):
                ok &= site_to_site(step, Path(d), results)
    except KeyboardInterrupt:
        echo("interrupted: namespaces, engines and peers it started have been removed")
        return False
    finally:
        signal.signal(signal.SIGTERM, old)
    echo("")
    for line in results:
        echo(line)
    echo("")
    echo(click.style("demo passed" if ok else "demo had failures", fg="green" if ok else "red", bold=True)
         + " — everything it created has been removed")
    return ok
