#!/usr/bin/env python3
"""Soak: N UDP datagrams through an ESP tunnel between two namespaces, every one accounted for.

    .venv/bin/python bench/soak.py [--packets 1000000] [--checkpoint 50000] [--rate 10000] [--size 200]

Root needed; not part of the default test run (tests/netns/test_overload.py runs a short
variant). Host A (192.0.2.1) and host B (192.0.2.2) run the engine with the shipped
rules/host-to-host-tunnel*.toml (ESP tunnel mode, ChaCha20-Poly1305). A paced sender in A
numbers its datagrams; a sink in B records each number once. At the end:

* the counters add up exactly: sent = received + counted drops, where the counted drops are
  both engines' global counters, their kernel queue drops (queue_dropped, user_dropped), the
  binding's truncated packets, the raw sender's errors and B's UDP receive-buffer errors; and
  no datagram arrives twice;
* A's outbound SA protected as many packets as B's inbound SA decrypted (plus B's drops on it
  and B's kernel queue drops);
* the resident memory of each engine at the end is within 10% of what it was after the first
  `--checkpoint` packets.

Exit status 0 when all of that holds; the summary (JSON with --json) says what was measured.
Every loop is bounded in count and time; the namespaces are deleted whatever happens.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

A4, B4, PORT = "192.0.2.1", "192.0.2.2", 5555
RULES = REPO / "rules"
MEMORY_TOLERANCE = 0.10


# -- the two traffic ends (run inside the namespaces) -----------------------------------------------


def sender(dst: str, port: int, first: int, count: int, rate: float, size: int, deadline_s: float) -> int:
    """Send datagrams numbered first..first+count-1 at `rate`/s (blocking socket: back-pressure, no loss)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        pad = bytes(max(0, size - 8))
        pack = struct.Struct("!Q").pack
        t0 = time.monotonic()
        deadline = t0 + deadline_s
        sent = errors = 0
        for i in range(first, first + count):
            try:
                s.sendto(pack(i) + pad, (dst, port))
                sent += 1
            except OSError:
                errors += 1
            if sent % 64 == 0:
                ahead = sent / rate - (time.monotonic() - t0)
                if ahead > 0:
                    time.sleep(ahead)
                if time.monotonic() > deadline:
                    break
    print(json.dumps({"sent": sent, "errors": errors}), flush=True)
    return 0


def sink(addr: str, port: int, total: int, status: str, deadline_s: float) -> int:
    """Count datagrams by number (each once); write {"received", "duplicates", "foreign"} to `status`."""
    seen = bytearray(total)
    received = duplicates = foreign = 0
    unpack = struct.Struct("!Q").unpack_from
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        s.bind((addr, port))
        s.settimeout(0.2)
        deadline = time.monotonic() + deadline_s
        last_write = 0.0

        def write() -> None:
            tmp = status + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"received": received, "duplicates": duplicates, "foreign": foreign}, f)
            os.replace(tmp, status)

        write()
        print("ready", flush=True)
        while time.monotonic() < deadline:
            try:
                data = s.recv(65535)
            except TimeoutError:
                data = b""
            if len(data) >= 8:
                n = unpack(data)[0]
                if n < total:
                    if seen[n]:
                        duplicates += 1
                    else:
                        seen[n] = 1
                        received += 1
                else:
                    foreign += 1
            now = time.monotonic()
            if now - last_write > 0.1:
                write()
                last_write = now
                if os.path.exists(status + ".stop"):
                    break
        write()
    return 0


# -- the driver -----------------------------------------------------------------------------------


@dataclass
class SoakResult:
    packets: int
    sent: int = 0
    send_errors: int = 0
    received: int = 0
    duplicates: int = 0
    drops: dict[str, int] = field(default_factory=dict)
    sa_out: int = 0  # packets A's a-to-b SA protected
    sa_in: int = 0  # packets B's a-to-b SA decrypted
    sa_in_drops: int = 0
    rss_checkpoint: dict[str, int] = field(default_factory=dict)  # KiB
    rss_end: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def counted_drops(self) -> int:
        return sum(self.drops.values())


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def _stats(socket_path: str) -> dict[str, Any]:
    from nfq_ipsec.control import ControlClient

    c = ControlClient(socket_path, timeout=20)
    try:
        return c.call("stats")["stats"]  # type: ignore[no-any-return]
    finally:
        c.close()


def _engine_drops(name: str, st: dict[str, Any]) -> dict[str, int]:
    out = {f"{name}:{k}": int(v) for k, v in st.get("counters", {}).items()}
    for q in st.get("queues", []):
        k = q.get("kernel") or {}
        out[f"{name}:queue_dropped"] = int(k.get("queue_dropped", 0))
        out[f"{name}:user_dropped"] = int(k.get("user_dropped", 0))
        out[f"{name}:truncated"] = int(q.get("truncated", 0))
    out[f"{name}:send_errors"] = int(st.get("send_errors", 0))
    return out


def _udp_rcvbuf_errors(ns: Any) -> int:
    for line in ns.run(["cat", "/proc/net/snmp"]).stdout.splitlines():
        if line.startswith("Udp:") and "RcvbufErrors" in line:
            header = line.split()
        elif line.startswith("Udp:"):
            values = line.split()
    return int(values[header.index("RcvbufErrors")])


def _wait_received(status: Path, target: int, quiet: float, timeout: float) -> dict[str, int]:
    """Until `target` datagrams arrived, or nothing new arrived for `quiet` seconds."""
    deadline = time.monotonic() + timeout
    last, last_change = -1, time.monotonic()
    st: dict[str, int] = {}
    while time.monotonic() < deadline:
        try:
            st = json.loads(status.read_text())
        except (OSError, ValueError):
            time.sleep(0.05)
            continue
        if st["received"] >= target:
            return st
        if st["received"] != last:
            last, last_change = st["received"], time.monotonic()
        elif time.monotonic() - last_change > quiet:
            return st
        time.sleep(0.05)
    return st


def run_soak(packets: int = 1_000_000, checkpoint: int = 50_000, rate: float = 10000.0, size: int = 200,
             workdir: str | None = None, log: Any = print) -> SoakResult:
    import tempfile

    from nfq_ipsec.netns import EngineProcess, Topology

    checkpoint = min(checkpoint, packets)
    res = SoakResult(packets=packets)
    work = Path(workdir or tempfile.mkdtemp(prefix="nfq-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    status = work / "sink.json"
    budget = packets / rate * 3 + 120  # generous, but bounded
    t_start = time.monotonic()
    with Topology("soak") as topo:
        a, b = topo.add("a"), topo.add("b")
        topo.link(a, [f"{A4}/24"], b, [f"{B4}/24"])
        engines = {
            "a": EngineProcess(a, str(RULES / "host-to-host-tunnel.toml"), str(work / "a.sock"), str(work / "a.log")),
            "b": EngineProcess(b, str(RULES / "host-to-host-tunnel-b.toml"), str(work / "b.sock"), str(work / "b.log")),
        }
        sink_proc = None
        try:
            for e in engines.values():
                e.wait_ready()
            # resolve neighbours first, outside the numbered flow
            a.run(["ping", "-c", "1", "-W", "2", B4], check=False)
            sink_proc = b.popen([sys.executable, __file__, "_sink", B4, str(PORT), str(packets), str(status),
                                 str(budget)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            assert sink_proc.stdout is not None
            if sink_proc.stdout.readline().strip() != b"ready":
                raise RuntimeError("sink did not start")
            base_drops = {n: _engine_drops(n, _stats(e.socket_path)) for n, e in engines.items()}
            base_rcvbuf = _udp_rcvbuf_errors(b)
            first = 0
            for phase, count in (("checkpoint", checkpoint), ("rest", packets - checkpoint)):
                if count <= 0:
                    continue
                p = subprocess.run(a.cmd(sys.executable, __file__, "_send", B4, str(PORT), str(first), str(count),
                                         str(rate), str(size), str(budget)), capture_output=True, text=True,
                                   timeout=budget + 30)
                out = json.loads(p.stdout.strip().splitlines()[-1])
                res.sent += out["sent"]
                res.send_errors += out["errors"]
                first += count
                got = _wait_received(status, res.sent, quiet=3.0, timeout=120)
                rss = {n: _rss_kib(e.proc.pid) for n, e in engines.items()}
                if phase == "checkpoint":
                    res.rss_checkpoint = rss
                else:
                    res.rss_end = rss
                log(f"{phase}: sent {res.sent}, received {got.get('received')}, rss {rss} KiB, "
                    f"{time.monotonic() - t_start:.0f} s")
            if not res.rss_end:
                res.rss_end = {n: _rss_kib(e.proc.pid) for n, e in engines.items()}
            status.with_name(status.name + ".stop").write_text("")
            sink_proc.wait(30)
            final = json.loads(status.read_text())
            res.received, res.duplicates = final["received"], final["duplicates"]
            stats = {n: _stats(e.socket_path) for n, e in engines.items()}
            for n, st in stats.items():
                for k, v in _engine_drops(n, st).items():
                    delta = v - base_drops[n].get(k, 0)
                    if delta:
                        res.drops[k] = delta
            rcvbuf = _udp_rcvbuf_errors(b) - base_rcvbuf
            if rcvbuf:
                res.drops["b:UdpRcvbufErrors"] = rcvbuf
            res.sa_out = int(stats["a"]["sas"]["a-to-b"]["packets"])
            sa_in = stats["b"]["sas"]["a-to-b"]
            res.sa_in = int(sa_in["packets"])
            res.sa_in_drops = sum(int(sa_in.get(k, 0)) for k in ("replay_drops", "integrity_failures",
                                                                   "format_errors", "expired_drops"))
        finally:
            if sink_proc is not None and sink_proc.poll() is None:
                sink_proc.kill()
                sink_proc.wait(5)
            for n, e in engines.items():
                rc = e.stop()
                if rc != 0:
                    res.problems.append(f"engine {n} exited {rc}")
    res.seconds = round(time.monotonic() - t_start, 1)
    res.problems += check(res)
    if workdir is None:
        if res.problems:
            log(f"engine logs kept in {work}")
        else:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    return res


def check(res: SoakResult) -> list[str]:
    problems = []
    if res.sent != res.received + res.counted_drops:
        problems.append(f"counters do not add up: sent {res.sent} != received {res.received} + counted drops "
                        f"{res.counted_drops} {res.drops}")
    if res.duplicates:
        problems.append(f"{res.duplicates} datagrams arrived twice")
    # what A protected reached B's SA, or was dropped by B's kernel queue before B's engine saw it
    # (+1: the neighbour-resolving ping before the numbered flow)
    b_kernel = sum(v for k, v in res.drops.items() if k in ("b:queue_dropped", "b:user_dropped", "b:truncated"))
    if res.sa_out - (res.sa_in + res.sa_in_drops + b_kernel) not in (0, 1):
        problems.append(f"A protected {res.sa_out} packets, B decrypted {res.sa_in} and dropped {res.sa_in_drops} "
                        f"(+{b_kernel} dropped by B's kernel queue)")
    for n, end in res.rss_end.items():
        start = res.rss_checkpoint.get(n, 0)
        if start and abs(end - start) > MEMORY_TOLERANCE * start:
            problems.append(f"engine {n}: resident memory {start} KiB after the checkpoint, {end} KiB at the end "
                            f"(more than {MEMORY_TOLERANCE:.0%} apart)")
    return problems


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_send":
        d, port, first, count, rate, size, deadline = argv[1:8]
        return sender(d, int(port), int(first), int(count), float(rate), int(size), float(deadline))
    if argv and argv[0] == "_sink":
        addr, port, total, status, deadline = argv[1:6]
        return sink(addr, int(port), int(total), status, float(deadline))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--packets", type=int, default=1_000_000)
    ap.add_argument("--checkpoint", type=int, default=50_000, help="memory baseline after this many packets")
    ap.add_argument("--rate", type=float, default=10000.0, help="datagrams per second offered")
    ap.add_argument("--size", type=int, default=200, help="UDP payload bytes")
    ap.add_argument("--workdir", default=None,
                    help="sockets and engine logs (default: a temporary directory, removed unless the soak failed)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (network namespaces, iptables, NFQUEUE)", file=sys.stderr)
        return 2
    res = run_soak(a.packets, a.checkpoint, a.rate, a.size, a.workdir,
                   log=(lambda s: print(s, file=sys.stderr, flush=True)))
    if a.json:
        print(json.dumps({**asdict(res), "counted_drops": res.counted_drops}, indent=2))
    else:
        print(f"{res.packets} packets in {res.seconds} s: sent {res.sent}, received {res.received}, "
              f"counted drops {res.counted_drops} {res.drops}, duplicates {res.duplicates}")
        print(f"SA a-to-b: A protected {res.sa_out}, B decrypted {res.sa_in} (dropped {res.sa_in_drops})")
        print(f"resident memory (KiB) after {min(a.checkpoint, a.packets)} packets: {res.rss_checkpoint}, "
              f"at the end: {res.rss_end}")
        print("OK" if not res.problems else "FAILED:\n  " + "\n  ".join(res.problems))
    return 0 if not res.problems else 1


if __name__ == "__main__":
    sys.exit(main())
