#!/usr/bin/env python3
"""End-to-end throughput and latency of nfq-ipsec through NFQUEUE, in namespaces. Root needed.

    .venv/bin/python bench/throughput.py [--sizes 64,512,1400] [--packets 20000] [--rounds 3]
                                         [--workers 1,2,4] [--json results.json] [--cases abcdef]

Not a test: run it by hand on a quiet machine (see docs/performance.md for a real run).

Topology (documentation addresses; deleted at exit)::

    H 192.0.2.10 --veth-- G 192.0.2.1 | 203.0.113.1 --veth-- P 203.0.113.2 (+ 192.0.2.130/.162/.194/.226)

G is the gateway under test; P plays the peer gateway and the remote hosts. Cases, all with UDP
payloads of each size, in one run on the same namespaces:

  a  no queue: G forwards H -> P in the kernel (sender-limited: the rate a Python sender reaches)
  b  an NFQUEUE handler on G's FORWARD that only accepts (our binding; the ceiling)
  c  nfq-ipsec on G, ESP aes-gcm-128 tunnel, encrypting side (H -> P becomes ESP G -> P)
  d  the same engine, decrypting side: P sends ESP to G, G decrypts at INPUT and re-injects the
     inner packet through its TUN device, the kernel forwards it to H (one queue pass; an engine
     whose hooks also queue the TUN's packets at FORWARD makes two, still counted once)
  e  as c with aes-cbc-128 + hmac-sha256-128
  f  a naive handler on G's FORWARD built on scapy's SecurityAssociation (same SA as c)
  scaling: the engine with 1, 2 and 4 workers (supervisor layout: one queue per worker, each SA
     pinned to one worker) on four tunnels, traffic spread over the four SAs; ratio to 1 worker.

Throughput is measured as a *drain*, like bench/nfqueue_bench.py: the handler (or every worker)
binds its queue but does not read while a sender fills the kernel queue with N packets (queue
length and socket buffer sized to hold them), then it is told to go and the time to handle all N
is measured. On a 2-core machine this isolates the handler's per-packet cost from the sender's
CPU use; the kernel work the verdicts and sends trigger (forwarding to P, TUN re-injection) is
included. The engine handler is the real `Engine` (configuration, pipeline, side effects, the
same callback and batch size as `Engine.run`), only its queue is bigger. packets/s counts user
packets (for d, decrypted packets: the ESP packets queued, however many queue passes each makes;
a drain that delivers fewer than it sent is reported on stderr). All handlers of a, b, c, d, f
stay bound and one iptables rule selects which sees the traffic, so their rounds interleave and
the host's noise hits them alike (best of --rounds kept); drains run SCHED_FIFO (--no-rt: not) so
other jobs do not take the handlers' cores. The scaling table also shows "machine x": what the machine
gave as many CPU-bound processes at that time, the bound on any scaling.

Latency is measured at light load (one packet per `--latency-interval`, default 1 ms): the sender
stamps each packet (CLOCK_REALTIME, just before send()), the receiver takes the kernel's receive
timestamp on the far interface (AF_PACKET + SO_TIMESTAMPNS, before any iptables). "added" is the
percentile minus the same percentile of case a (the kernel path without a queue).

CPU per packet ("cpu µs/pkt", cases b to f and scaling): each drain also measures the handler's
CPU time (getrusage(RUSAGE_SELF): user + system time of all its threads; the total is exact, the
user/system split is sampled at the tick) from "drain" to the end of the drain, divided by the
packets counted for packets/s (summed over workers). Best (lowest) of --rounds, kept apart from
the best packets/s; "by CPU" ratios (x/b = b's CPU per packet / x's) stand next to the packets/s
ones. It leaves out time the handler is not running: waiting for a CPU (--no-rt, more workers
than CPUs) and time the hypervisor reports as stolen (PARAVIRT_TIME_ACCOUNTING). It does not see
a slower vCPU: on the 2-vCPU KVM guest of docs/performance.md the SCHED_FIFO handler runs for the
whole drain (CPU time = wall time within 1 %), almost no steal is reported and there is no PMU to
count instructions, so the host's 1.5x swings show in cpu µs/pkt exactly as in packets/s; there,
only many interleaved rounds help. Included, as that kernel has no IRQ_TIME_ACCOUNTING: the kernel
work of the handler's syscalls and the softirqs they run on return (local_bh_enable): netlink
recv, the verdicts (nf_reinject carries an accepted packet through FORWARD to the veth), raw
sendto() and TUN write() with their route lookups, OUTPUT hooks and transmission, the veth's
receive side in the peer namespace (its stack and sink rule), and interrupts that land while it
runs. Missed: softirq work run on the other CPU or deferred to ksoftirqd (in the JSON as
ksoftirqd_us_per_pkt, all ksoftirqd threads during the drain), the queueing of the packets (the
sender's, during the fill), kworkers and RCU callbacks.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import platform
import re
import resource
import select
import socket
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# NFQ_BENCH_SRC: measure another copy of the package (e.g. a patched one) with the same harness
SRC = Path(os.environ.get("NFQ_BENCH_SRC", str(REPO)))
sys.path.insert(0, str(SRC))

CONFIGS = REPO / "bench" / "configs"
GCM_CONFIG = CONFIGS / "gw-aes-gcm-128.toml"
CBC_CONFIG = CONFIGS / "gw-aes-cbc-128-sha256.toml"
SCALE_CONFIG = CONFIGS / "gw-4-tunnels.toml"

H_ADDR, G_IN, G_OUT, P_ADDR = "192.0.2.10", "192.0.2.1", "203.0.113.1", "203.0.113.2"
REMOTE = ("192.0.2.130", "192.0.2.162", "192.0.2.194", "192.0.2.226")  # one per /27 tunnel of SCALE_CONFIG
PORT, LAT_PORT, SPORT = 9000, 9001, 40000
QUEUE = 0
ETH_P_IP = 0x0800
PACKET_OUTGOING = 4
SO_TIMESTAMPNS = 35
SO_MARK = 36
IDLE_MS = 300  # a drain ends after this long without packets
CASES = "abcdef"


def cpu_seconds() -> tuple[float, float]:
    """This process's user and system CPU time so far, all threads (see the module docstring)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime, ru.ru_stime


def ksoftirqd_ns() -> int:
    """CPU time of all ksoftirqd threads so far (ns, /proc/<pid>/schedstat): softirq work the
    handler's CPU time misses because the kernel deferred it to them."""
    total = 0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if not (d / "comm").read_text().startswith("ksoftirqd/"):
                continue
            total += int((d / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total


def emit(**kw: Any) -> None:
    sys.stdout.write(json.dumps(kw) + "\n")
    sys.stdout.flush()


def udp_packet(src: str, dst: str, size: int, index: int, dport: int = PORT) -> bytes:
    """An IPv4/UDP packet with a `size`-byte payload starting with a 64-bit index (checksum 0: none)."""
    from nfq_ipsec import packet

    payload = index.to_bytes(8, "big") + bytes(max(0, size - 8))
    udp = struct.pack("!HHHH", SPORT, dport, 8 + len(payload), 0) + payload
    return packet.ipv4_header(socket.inet_aton(src), socket.inet_aton(dst), 17, len(udp), ttl=64) + udp


def load_sa(config: Path, name: str) -> Any:
    from nfq_ipsec.config import load_config

    for sa in load_config(str(config)).sas:
        if sa.name == name:
            return sa
    raise SystemExit(f"{config}: no SA {name}")


# -- roles running inside the namespaces -----------------------------------------------------------


def role_handler(args: argparse.Namespace) -> None:
    """In G: an accept-only handler, the engine (one worker of W) or the scapy handler.

    Commands on stdin (one per line), replies as JSON lines: drain, live (until "pause"), seq,
    qstat, quit.
    """
    from nfq_ipsec import nfqueue

    maxlen, rcvbuf = args.maxlen, 1 << 30
    engine = None
    seq_of: Any = lambda: {}  # noqa: E731
    if args.kind == "engine":
        from nfq_ipsec import engine as engine_mod
        from nfq_ipsec import supervisor
        from nfq_ipsec.config import load_config

        # Engine.start binds with the binding's default queue length: make room for a whole drain
        nfqueue.NfQueue = functools.partial(nfqueue.NfQueue, maxlen=maxlen, rcvbuf=rcvbuf)  # type: ignore[misc,assignment]
        cfg = load_config(args.config)
        cfg.engine = dataclasses.replace(cfg.engine, workers=args.workers, control_socket=args.socket,
                                         queue_num=args.queue)
        wo = supervisor.WorkerOf(supervisor.assign_workers(cfg.sas, cfg.policies, args.workers), args.workers)
        engine = engine_mod.Engine(cfg, args.config, queue_nums=[args.queue + args.index],
                                   manage_hooks=args.index == 0, worker_of=wo)
        engine.start()
        queues = list(engine.queues)
        cb = engine._on_packet
        batch = engine_mod.BATCH

        def seq_of() -> dict[str, int]:
            assert engine is not None
            return {sa.name: sa.seq + 1 for sa in engine.sad.list()}  # the next sequence number
    else:
        batch = 64
        queues = [nfqueue.NfQueue(args.queue + args.index, maxlen=maxlen, rcvbuf=rcvbuf)]
        if args.kind == "accept":
            def cb(payload: bytes, hook: int, indev: int, outdev: int, mark: int) -> int:
                return nfqueue.NF_ACCEPT
        else:
            cb, seq_of = _scapy_handler(args)
    by_fd = {q.fileno(): q for q in queues}
    poller = select.poll()
    for fd in by_fd:
        poller.register(fd, select.POLLIN)

    def handle_ready(events: list[tuple[int, int]]) -> int:
        n = 0
        for fd, _ in events:
            q = by_fd.get(fd)
            if q is None:
                continue
            while True:  # as Engine.run: batches until the socket is empty
                k = q.process(cb, batch)
                n += k
                if k < batch:
                    break
        return n

    emit(ready=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "drain":
            handled = 0
            u0, s0 = cpu_seconds()
            t0 = last = time.monotonic_ns()
            while True:
                events = poller.poll(IDLE_MS)
                if not events:
                    break
                handled += handle_ready(events)
                last = time.monotonic_ns()
            u1, s1 = cpu_seconds()  # the idle poll that ends the drain costs (almost) no CPU
            emit(handled=handled, t0=t0, t_last=last, cpu_user=u1 - u0, cpu_sys=s1 - s0)
        elif cmd == "live":
            poller.register(sys.stdin.fileno(), select.POLLIN)
            handled = 0
            emit(live=True)
            while True:
                events = poller.poll(1000)
                if any(fd == sys.stdin.fileno() for fd, _ in events):
                    sys.stdin.readline()  # "pause"
                    break
                handled += handle_ready(events)
            poller.unregister(sys.stdin.fileno())
            emit(handled=handled)
        elif cmd == "seq":
            emit(seq=seq_of())
        elif cmd == "qstat":
            emit(queued=sum((nfqueue.kernel_queue_stats(q.queue_num) or {}).get("queue_total", 0) for q in queues),
                 stats=[q.stats() for q in queues])
        elif cmd == "quit":
            break
    if engine is not None:
        engine.shutdown()
    for q in queues:
        q.close()


def _scapy_handler(args: argparse.Namespace) -> tuple[Any, Any]:
    """The naive way: dissect with scapy, SecurityAssociation.encrypt, send; no hoisting at all."""
    import tomllib

    from scapy.layers.inet import IP
    from scapy.layers.ipsec import ESP, SecurityAssociation

    from nfq_ipsec import nfqueue

    ours = load_sa(Path(args.config), "g-to-p")
    spec = next(s for s in tomllib.loads(Path(args.config).read_text())["sa"] if s["name"] == "g-to-p")
    key = bytes.fromhex(spec["key"].removeprefix("0x"))  # key | salt, as ip xfrm and scapy take it
    sa = SecurityAssociation(ESP, spi=ours.spi, crypt_algo="AES-GCM", crypt_key=key,
                             tunnel_header=IP(src=str(ours.src), dst=str(ours.dst)), seq_num=1)
    out = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)

    def cb(payload: bytes, hook: int, indev: int, outdev: int, mark: int) -> int:
        pkt = IP(payload)
        esp = sa.encrypt(pkt)
        out.sendto(bytes(esp), (str(ours.dst), 0))
        return nfqueue.NF_DROP

    return cb, lambda: {"g-to-p": sa.seq_num}


def role_blast(args: argparse.Namespace) -> None:
    """Send `count` packets as fast as possible: UDP (to each --dst in turn) or pre-built ESP."""
    dsts = args.dst.split(",")
    if args.esp_config:
        sa = load_sa(Path(args.esp_config), args.esp_sa)
        from nfq_ipsec import esp

        pkts = [esp.encapsulate(sa, udp_packet(REMOTE[0], H_ADDR, args.size, i, args.dport), args.seq_base + 1 + i)
                for i in range(args.count)]
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
        target = (str(sa.dst), 0)
        t0 = time.perf_counter()
        for p in pkts:
            while True:
                try:
                    s.sendto(p, target)
                    break
                except BlockingIOError:
                    time.sleep(0.0001)
        emit(sent=len(pkts), seconds=time.perf_counter() - t0)
        return
    socks = []
    for d in dsts:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", 0))
        s.connect((d, args.dport))
        socks.append(s.send)
    data = bytes(args.size)
    k = len(socks)
    t0 = time.perf_counter()
    for i in range(args.count):
        while True:
            try:
                socks[i % k](data)
                break
            except OSError:  # ENOBUFS: the queue filled faster than the kernel drained the device
                time.sleep(0.0001)
    emit(sent=args.count, seconds=time.perf_counter() - t0)


def role_latency_send(args: argparse.Namespace) -> None:
    """Send `count` packets `interval` apart, each carrying its index; report the send times."""
    times = []
    interval = args.interval / 1e6
    if args.esp_config:
        sa = load_sa(Path(args.esp_config), args.esp_sa)
        from nfq_ipsec import esp

        pkts = [esp.encapsulate(sa, udp_packet(REMOTE[0], H_ADDR, args.size, i, LAT_PORT), args.seq_base + 1 + i)
                for i in range(args.count)]
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        target = (str(sa.dst), 0)

        def send(i: int) -> None:
            s.sendto(pkts[i], target)
    else:
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.connect((args.dst, LAT_PORT))
        bodies = [i.to_bytes(8, "big") + bytes(max(0, args.size - 8)) for i in range(args.count)]

        def send(i: int) -> None:
            u.send(bodies[i])
    next_t = time.perf_counter()
    for i in range(args.count):
        next_t += interval
        times.append(time.time_ns())
        send(i)
        delay = next_t - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
    emit(sent=times)


def role_latency_recv(args: argparse.Namespace) -> None:
    """Kernel receive timestamps of the test packets on `iface` (index -> ns, CLOCK_REALTIME)."""
    s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_IP))
    s.bind((args.iface, ETH_P_IP))
    s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    s.settimeout(0.2)
    got: dict[int, int] = {}
    emit(ready=True)
    deadline = time.monotonic() + args.timeout
    first_seq = args.first_seq
    while len(got) < args.count and time.monotonic() < deadline:
        try:
            data, anc, _flags, addr = s.recvmsg(2048, 64)
        except TimeoutError:
            continue
        if addr[2] == PACKET_OUTGOING or len(data) < 28:
            continue
        ts = time.time_ns()
        for level, kind, value in anc:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                sec, nsec = struct.unpack("qq", value[:16])
                ts = sec * 1_000_000_000 + nsec
        ihl = (data[0] & 0x0F) * 4
        proto = data[9]
        if args.match == "udp" and proto == 17 and struct.unpack_from("!H", data, ihl + 2)[0] == LAT_PORT:
            index = int.from_bytes(data[ihl + 8: ihl + 16], "big")
        elif args.match == "esp" and proto == 50:
            spi, seq = struct.unpack_from("!II", data, ihl)
            if spi != args.spi:
                continue
            index = seq - first_seq
        else:
            continue
        if 0 <= index < args.count:
            got.setdefault(index, ts)
    emit(received={str(k): v for k, v in got.items()})


# -- the orchestrator (root namespace) -------------------------------------------------------------


class Proc:
    """A role process in a namespace, talking JSON lines."""

    def __init__(self, ns: Any, *argv: str, realtime: bool = False) -> None:
        env = dict(os.environ, PYTHONPATH=str(SRC))
        prefix = ["chrt", "-f", "20"] if realtime else []
        self.p = ns.popen([*prefix, sys.executable, str(Path(__file__).resolve()), *argv], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, env=env)

    def read(self, timeout: float = 120) -> dict[str, Any]:
        assert self.p.stdout is not None
        r, _, _ = select.select([self.p.stdout], [], [], timeout)
        if not r:
            raise RuntimeError("role process did not answer")
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"role process exited ({self.p.wait()})")
        return json.loads(line)  # type: ignore[no-any-return]

    def send(self, cmd: str) -> None:
        assert self.p.stdin is not None
        self.p.stdin.write(cmd.encode() + b"\n")
        self.p.stdin.flush()

    def ask(self, cmd: str, timeout: float = 120) -> dict[str, Any]:
        self.send(cmd)
        return self.read(timeout)

    def close(self) -> None:
        if self.p.poll() is None:
            try:
                self.send("quit")
                self.p.wait(15)
            except (OSError, subprocess.TimeoutExpired):
                self.p.kill()
                self.p.wait()


def ipt(ns: Any, *args: str) -> str:
    return str(ns.run(["iptables-legacy", *args]).stdout)


def counter(ns: Any, pattern: str) -> int:
    """Packets of the INPUT rule whose line matches `pattern` (and zero all INPUT counters)."""
    out = ipt(ns, "-L", "INPUT", "-v", "-x", "-n", "-Z")
    for line in out.splitlines():
        if re.search(pattern, line):
            return int(line.split()[0])
    return -1


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        from nfq_ipsec.netns import Topology

        self.args = args
        self.topo = Topology("nfqb")
        self.tmp = Path(f"/tmp/nfq-bench-{os.getpid()}")
        self.tmp.mkdir(mode=0o700, exist_ok=True)
        self.results: dict[str, Any] = {"cases": {}, "scaling": {}}
        self.profile_tag = ""  # set while a drain worth sampling with --py-spy/--perf runs
        self.p2g_seq = 0  # the last sequence number P used towards G (the engine's inbound SA window)

    # -- setup ---------------------------------------------------------------------------------
    def setup(self) -> None:
        t = self.topo
        self.h, self.g, self.p = t.add("h"), t.add("g", forwarding=True), t.add("p")
        self.h_if, self.g_in_if = t.link(self.h, f"{H_ADDR}/25", self.g, f"{G_IN}/25")
        self.g_out_if, self.p_if = t.link(self.g, f"{G_OUT}/24", self.p, f"{P_ADDR}/24")
        self.h.run(f"ip route add default via {G_IN}")
        self.g.run(f"ip route add 192.0.2.128/25 via {P_ADDR}")
        for a in REMOTE:
            self.p.run(f"ip addr add {a}/32 dev lo")
        self.p.run(f"ip route add 192.0.2.0/25 via {G_OUT}")
        for ns in (self.h, self.g, self.p):
            ns.sysctl("net.ipv4.conf.all.rp_filter", "0")
            ns.sysctl("net.ipv4.conf.default.rp_filter", "0")
        for port in (PORT, LAT_PORT):  # the sinks: counted, then dropped (AF_PACKET sees them before)
            ipt(self.p, "-A", "INPUT", "-p", "udp", "--dport", str(port), "-j", "DROP")
            ipt(self.h, "-A", "INPUT", "-p", "udp", "--dport", str(port), "-j", "DROP")
        ipt(self.p, "-A", "INPUT", "-p", "esp", "-j", "DROP")
        # neighbours resolved before anything is timed
        self.h.run(["ping", "-c", "1", "-W", "2", G_IN], check=False)
        self.g.run(["ping", "-c", "1", "-W", "2", P_ADDR], check=False)

    def delivered_p(self, esp: bool) -> int:
        return counter(self.p, r"\besp\b|\b50\b" if esp else rf"dpt:{PORT}\b")

    def delivered_h(self) -> int:
        return counter(self.h, rf"dpt:{PORT}\b")

    # -- measurement primitives ----------------------------------------------------------------
    def blast(self, ns: Any, n: int, size: int, dsts: tuple[str, ...] = (REMOTE[0],), esp_config: Path | None = None,
              seq_base: int = 0, realtime: bool = False) -> dict[str, Any]:
        argv = ["--role", "blast", "--dst", ",".join(dsts), "--count", str(n), "--size", str(size)]
        if esp_config is not None:
            argv += ["--esp-config", str(esp_config), "--esp-sa", "p-to-g", "--seq-base", str(seq_base)]
        b = Proc(ns, *argv, realtime=realtime)
        res = b.read(600)
        b.p.wait()
        return res

    def udp_fill(self, size: int, dsts: tuple[str, ...] = (REMOTE[0],)) -> Any:
        return lambda n: self.blast(self.h, n, size, dsts)

    def esp_fill(self, size: int, config: Path) -> Any:
        def fill(n: int) -> dict[str, Any]:
            r = self.blast(self.p, n, size, esp_config=config, seq_base=self.p2g_seq)
            self.p2g_seq += n
            return r
        return fill

    def drain(self, handlers: list[Proc], n: int, fill: Any, delivered: Any, count_queued: bool = False
              ) -> dict[str, Any]:
        """Warm up, fill the paused queue(s) with `fill(n)`, then time the handlers emptying them.

        pps counts queue passes, or with `count_queued` the packets the fill queued (decrypting side:
        the ESP packets, i.e. the decrypted ones, whether or not the engine queues each inner packet
        once more at FORWARD; a fixed divisor would halve the rate of a one-pass engine). The handlers'
        CPU time (summed over workers) is divided by the same count.
        """
        fill(200)
        for h in handlers:
            h.ask("drain")
        self.delivered_p(esp=True), self.delivered_p(esp=False), self.delivered_h()  # zero the counters
        sent = fill(n)
        time.sleep(0.2)
        queued = sum(h.ask("qstat")["queued"] for h in handlers)
        self._realtime(handlers, True)
        spy = None
        if self.profile_tag and (self.args.py_spy or self.args.perf):
            spy = self._py_spy(handlers[0]) if self.args.py_spy else self._perf(handlers[0])
        k0 = ksoftirqd_ns()
        for h in handlers:
            h.send("drain")
        replies = [h.read(600) for h in handlers]
        k1 = ksoftirqd_ns()
        self._realtime(handlers, False)
        if spy is not None:
            spy.send_signal(2)
            spy.wait(30)
        handled = sum(r["handled"] for r in replies)
        seconds = (max(r["t_last"] for r in replies) - min(r["t0"] for r in replies)) / 1e9
        time.sleep(0.1)
        got = delivered()
        if got < sent["sent"]:  # e.g. rp_filter on G dropping the decrypted packets: the rate means nothing
            print(f"  warning: drain delivered {got} of {sent['sent']} packets", file=sys.stderr, flush=True)
        counted = min(handled, queued) if count_queued else handled
        res = {"sent": sent["sent"], "queued": queued, "handled": handled, "seconds": seconds,
               "delivered": got, "pps": counted / seconds if seconds > 0 else 0.0}
        if counted > 0:  # CPU per counted packet, the same unit as pps (for d: per decrypted packet)
            user, sys_ = sum(r.get("cpu_user", 0.0) for r in replies), sum(r.get("cpu_sys", 0.0) for r in replies)
            res.update(cpu_us_per_pkt=(user + sys_) * 1e6 / counted, cpu_user_us_per_pkt=user * 1e6 / counted,
                       cpu_sys_us_per_pkt=sys_ * 1e6 / counted, ksoftirqd_us_per_pkt=(k1 - k0) / 1e3 / counted)
        return res

    def _realtime(self, handlers: list[Proc], on: bool) -> None:
        """Drains run the handlers SCHED_FIFO (--no-rt: not), so other jobs on the machine do not
        take their cores; latency is measured at normal priority."""
        if self.args.no_rt:
            return
        for h in handlers:
            subprocess.run(["chrt", "-f", "-p", "20", str(h.p.pid)] if on else ["chrt", "-o", "-p", "0", str(h.p.pid)],
                           check=True, capture_output=True)

    def kernel_only(self, n: int, size: int) -> dict[str, Any]:
        """Case a: the sender's rate through G without any queue (the FORWARD ACCEPT rule is on)."""
        self.delivered_p(esp=False)
        r = self.blast(self.h, n, size, realtime=not self.args.no_rt)
        time.sleep(0.2)
        delivered = self.delivered_p(esp=False)
        return {"sent": r["sent"], "delivered": delivered, "seconds": r["seconds"], "pps": delivered / r["seconds"]}

    def latency(self, sender_ns: Any, receiver_ns: Any, iface: str, size: int, match: str, *,
                dst: str = REMOTE[0], spi: int = 0, first_seq: int = 0, esp_config: Path | None = None,
                seq_base: int = 0, count: int | None = None, interval: int | None = None) -> dict[str, float]:
        count = count or self.args.latency_packets
        interval = interval or self.args.latency_interval
        rx = Proc(receiver_ns, "--role", "latency-recv", "--iface", iface, "--count", str(count), "--match", match,
                  "--spi", str(spi), "--first-seq", str(first_seq),
                  "--timeout", str(count * interval / 1e6 + 10))
        rx.read()
        argv = ["--role", "latency-send", "--dst", dst, "--count", str(count), "--size", str(size),
                "--interval", str(interval)]
        if esp_config is not None:
            argv += ["--esp-config", str(esp_config), "--esp-sa", "p-to-g", "--seq-base", str(seq_base)]
        tx = Proc(sender_ns, *argv)
        sent = tx.read(count * interval / 1e6 + 60)["sent"]
        tx.p.wait()
        got = rx.read(count * interval / 1e6 + 60)["received"]
        rx.p.wait()
        lat = sorted((ts - sent[int(i)]) / 1000 for i, ts in got.items())
        if not lat:
            return {"lat_p50_us": float("nan"), "lat_p99_us": float("nan"), "lat_received": 0}
        return {"lat_p50_us": percentile(lat, 50), "lat_p99_us": percentile(lat, 99), "lat_received": len(lat),
                "lat_sent": count}

    def _py_spy(self, handler: Proc) -> subprocess.Popen[bytes]:
        """Sample the handler while it drains (--py-spy DIR: collapsed stacks per case and size)."""
        out = Path(self.args.py_spy) / f"{self.profile_tag}.txt"
        exe = Path(sys.executable).parent / "py-spy"
        cmd = [str(exe), "record", "--pid", str(handler.p.pid), "--rate", "2000", "--format", "raw", "--nonblocking",
               "-o", str(out), *self.args.py_spy_extra.split()]
        spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # attach before the drain starts
        return spy

    def _perf(self, handler: Proc) -> subprocess.Popen[bytes]:
        """`perf record` of the handler while it drains (--perf DIR): the kernel's share, by symbol."""
        out = Path(self.args.perf) / f"{self.profile_tag}.data"
        spy = subprocess.Popen(["perf", "record", "-e", "cpu-clock", "-F", "4000", "-g", "-p", str(handler.p.pid),
                                "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)
        return spy

    def record(self, case: str, size: int, res: dict[str, Any]) -> None:
        self.results["cases"].setdefault(case, {})[str(size)] = res
        keep = {k: (round(v, 2) if isinstance(v, float) else [round(x, 2) for x in v] if isinstance(v, list) else v)
                for k, v in res.items()}
        print(f"  {case} {size:>5} B: {json.dumps(keep)}", file=sys.stderr, flush=True)

    # -- handlers and the rules that select one ------------------------------------------------
    def _handlers(self, kind: str, config: Path, workers: int = 1, queue: int = QUEUE) -> list[Proc]:
        hs = []
        for i in range(workers):
            hs.append(Proc(self.g, "--role", "handler", "--kind", kind, "--config", str(config), "--index", str(i),
                           "--workers", str(workers), "--queue", str(queue),
                           "--maxlen", str(self.args.packets * 2 + 2000), "--socket", str(self.tmp / f"w{i}.sock")))
        for h in hs:
            assert h.read(60).get("ready")
        return hs

    def _select(self, target: list[str] | None) -> None:
        """Put one rule for the test traffic first in G's FORWARD (ahead of the engine's hooks), or none."""
        spec = ["FORWARD", "-s", "192.0.2.0/25", "-p", "udp", "--dport", f"{PORT}:{LAT_PORT}"]
        if self._selected is not None:
            ipt(self.g, "-D", *spec, "-j", *self._selected)
            self._selected = None
        if target is not None:
            ipt(self.g, "-I", *spec, "-j", *target)
            self._selected = target

    _selected: list[str] | None = None

    # -- phases ----------------------------------------------------------------------------------
    def phase_main(self) -> None:
        """Cases a, b, c, d, f: every handler alive at once, one rule selects which one sees the traffic;
        the rounds of all cases are interleaved, so a slow spell of the machine hits them alike."""
        cases, sizes, rounds = self.args.cases, self.args.sizes, self.args.rounds
        q_accept, q_scapy = QUEUE + 8, QUEUE + 9
        accept = self._handlers("accept", GCM_CONFIG, queue=q_accept) if "b" in cases else []
        scapy = self._handlers("scapy", GCM_CONFIG, queue=q_scapy) if "f" in cases else []
        engine = self._handlers("engine", GCM_CONFIG) if ("c" in cases or "d" in cases) else []
        if engine and self.args.exp_tun_return:
            # experiment: decrypted packets from the TUN device skip the second queue pass at FORWARD
            ipt(self.g, "-I", "NFQIPSEC-FWD", "1", "-i", "nfqbench0", "-j", "RETURN")
        n, n_f = self.args.packets, min(self.args.packets, self.args.scapy_packets)
        queue_to = {"b": ["NFQUEUE", "--queue-num", str(q_accept)], "f": ["NFQUEUE", "--queue-num", str(q_scapy)]}
        try:
            for size in sizes:
                runs: dict[str, list[dict[str, Any]]] = {}
                for _ in range(rounds):
                    for case in [c for c in "abcdf" if c in cases]:
                        self._select(["ACCEPT"] if case == "a" else queue_to.get(case))
                        self.profile_tag = f"{case}-{size}" if case in "cd" else ""
                        if case == "a":
                            r = self.kernel_only(n, size)
                        elif case == "d":
                            r = self.drain(engine, n, self.esp_fill(size, GCM_CONFIG), self.delivered_h,
                                           count_queued=True)
                        else:
                            hs = {"b": accept, "c": engine, "f": scapy}[case]
                            esp = case != "b"
                            r = self.drain(hs, n_f if case == "f" else n, self.udp_fill(size),
                                           functools.partial(self.delivered_p, esp))
                        self.profile_tag = ""
                        runs.setdefault(case, []).append(r)
                self._select(None)
                for case, rs in runs.items():
                    r = best_of(rs)
                    r["mbps"] = r["pps"] * size * 8 / 1e6
                    r.update(self._latency_of(case, size, accept, scapy, engine, queue_to))
                    self.record(case, size, r)
        finally:
            self._select(None)
            for h in accept + scapy + engine:
                h.close()

    def _latency_of(self, case: str, size: int, accept: list[Proc], scapy: list[Proc], engine: list[Proc],
                    queue_to: dict[str, list[str]]) -> dict[str, float]:
        """Light-load latency of one case (its handler live, its rule selected)."""
        self._select(["ACCEPT"] if case == "a" else queue_to.get(case))
        try:
            if case == "a":
                return self.latency(self.h, self.p, self.p_if, size, "udp")
            h = {"b": accept, "c": engine, "d": engine, "f": scapy}[case][0]
            first = h.ask("seq")["seq"].get("g-to-p", 0)  # paused: the next sequence number is stable
            h.ask("live")
            try:
                if case == "b":
                    return self.latency(self.h, self.p, self.p_if, size, "udp")
                if case == "c":
                    return self.latency(self.h, self.p, self.p_if, size, "esp", spi=0x1001, first_seq=first)
                if case == "f":
                    return self.latency(self.h, self.p, self.p_if, size, "esp", spi=0x1001, first_seq=first,
                                        count=max(20, self.args.latency_packets // 5),
                                        interval=self.args.latency_interval * 5)
                r = self.latency(self.p, self.h, self.h_if, size, "udp", esp_config=GCM_CONFIG, seq_base=self.p2g_seq)
                self.p2g_seq += self.args.latency_packets
                return r
            finally:
                h.ask("pause")
        finally:
            self._select(None)

    def phase_e(self) -> None:
        """Case e (aes-cbc-128 + hmac-sha256-128): its own engine, rounds as for the others."""
        hs = self._handlers("engine", CBC_CONFIG)
        try:
            for size in self.args.sizes:
                best = best_of([self.drain(hs, self.args.packets, self.udp_fill(size), lambda: self.delivered_p(True))
                                for _ in range(self.args.rounds)])
                best["mbps"] = best["pps"] * size * 8 / 1e6
                first = hs[0].ask("seq")["seq"]["g-to-p"]
                hs[0].ask("live")
                best.update(self.latency(self.h, self.p, self.p_if, size, "esp", spi=0x1001, first_seq=first))
                hs[0].ask("pause")
                self.record("e", size, best)
        finally:
            for h in hs:
                h.close()

    def cpu_rate(self, procs: int) -> float:
        """What the machine gives `procs` CPU-bound processes right now: loop iterations per second in
        total (SCHED_FIFO like the drains). The engine's scaling is bounded by this machine ratio."""
        n = 2_000_000
        pids = []
        t0 = time.perf_counter()
        for _ in range(procs):
            pid = os.fork()
            if pid == 0:  # pragma: no cover - child
                try:
                    if not self.args.no_rt:
                        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(20))
                    x = 0
                    for i in range(n):
                        x += i
                finally:
                    os._exit(0)
            pids.append(pid)
        for pid in pids:
            os.waitpid(pid, 0)
        return procs * n / (time.perf_counter() - t0)

    def scaling(self) -> None:
        """1, 2, 4 workers on four tunnels; rounds interleave the worker counts (restarted each time)."""
        runs: dict[tuple[int, int], list[dict[str, Any]]] = {}
        cpu: dict[int, float] = {}
        for _ in range(self.args.rounds):
            for workers in self.args.workers:
                cpu[workers] = max(cpu.get(workers, 0.0), self.cpu_rate(workers))
                hs = self._handlers("engine", SCALE_CONFIG, workers)
                try:
                    for size in self.args.sizes:
                        r = self.drain(hs, self.args.packets, self.udp_fill(size, REMOTE),
                                       lambda: self.delivered_p(True))
                        runs.setdefault((size, workers), []).append(r)
                finally:
                    for h in hs:
                        h.close()
        base = min(self.args.workers)
        for (size, workers), rs in sorted(runs.items()):
            r = best_of(rs)
            r["machine_ratio"] = cpu[workers] / cpu[min(cpu)]
            # rounds interleave the worker counts: each round's ratio to the same round's smallest count
            # is paired (both saw the host in about the same state); the median of those is steadier
            # than the ratio of best rounds on a host whose speed swings (docs/performance.md)
            ones = runs[(size, base)]
            paired = [x["pps"] / o["pps"] for x, o in zip(rs, ones, strict=True) if o["pps"] > 0]
            r["paired_ratio_median"] = statistics.median(paired) if paired else 0.0
            self.results["scaling"].setdefault(str(size), {})[str(workers)] = r
            print(f"  scaling {workers} workers {size:>5} B: {r['pps']:,.0f} pps, {r.get('cpu_us_per_pkt', 0):.2f} CPU "
                  f"µs/pkt (handled {r['handled']}/{r['sent']}, "
                  f"delivered {r['delivered']})", file=sys.stderr, flush=True)

    def run(self) -> None:
        self.setup()
        if set(self.args.cases) & set("abcdf"):
            self.phase_main()
        if "e" in self.args.cases:
            self.phase_e()
        if self.args.workers:
            self.scaling()

    def close(self) -> None:
        self.topo.destroy()
        for f in self.tmp.glob("*"):
            f.unlink()
        self.tmp.rmdir()


def best_of(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the most packets/s, with the lowest CPU per packet of any round (each metric
    keeps its own best: noise only ever lowers the rate and raises the CPU time) and every round's
    values of both, for their spread."""
    best = dict(max(rounds, key=lambda r: r["pps"]))
    best["pps_rounds"] = [r["pps"] for r in rounds]
    with_cpu = [r for r in rounds if "cpu_us_per_pkt" in r]
    if with_cpu:
        low = min(with_cpu, key=lambda r: r["cpu_us_per_pkt"])
        for k in ("cpu_us_per_pkt", "cpu_user_us_per_pkt", "cpu_sys_us_per_pkt", "ksoftirqd_us_per_pkt"):
            best[k] = low[k]
        best["cpu_rounds"] = [r["cpu_us_per_pkt"] for r in with_cpu]
    return best


def percentile(sorted_values: list[float], pct: float) -> float:
    if len(sorted_values) == 1:
        return sorted_values[0]
    return statistics.quantiles(sorted_values, n=100, method="inclusive")[int(pct) - 1]


# -- report ------------------------------------------------------------------------------------------


def summarize(results: dict[str, Any], sizes: list[int]) -> None:
    cases = results["cases"]
    base = cases.get("a", {})
    for case in cases.values():
        for size, r in case.items():
            b = base.get(size)
            if b and "lat_p50_us" in r:
                r["added_p50_us"] = r["lat_p50_us"] - b["lat_p50_us"]
                r["added_p99_us"] = r["lat_p99_us"] - b["lat_p99_us"]
    ratios: dict[str, dict[str, float]] = {}
    ratios_cpu: dict[str, dict[str, float]] = {}  # x/b by CPU: b's CPU per packet / x's (higher: x cheaper)
    for size in map(str, sizes):
        def val(c: str, key: str, size: str = size) -> float | None:
            v = cases.get(c, {}).get(size)
            return v.get(key) if v else None
        entry, entry_cpu = {}, {}
        for name, num, den in (("c/b", "c", "b"), ("d/b", "d", "b"), ("e/b", "e", "b"), ("c/f", "c", "f")):
            n_, d_ = val(num, "pps"), val(den, "pps")
            if n_ and d_:
                entry[name] = n_ / d_
            n_, d_ = val(num, "cpu_us_per_pkt"), val(den, "cpu_us_per_pkt")
            if n_ and d_:
                entry_cpu[name] = d_ / n_
        ratios[size] = entry
        ratios_cpu[size] = entry_cpu
    results["ratios"] = ratios
    results["ratios_cpu"] = ratios_cpu
    for per in results["scaling"].values():
        one = per.get("1", {}).get("pps")
        for r in per.values():
            if one:
                r["ratio"] = r["pps"] / one


def table(results: dict[str, Any], sizes: list[int]) -> str:
    names = {"a": "a no queue (kernel only)", "b": "b NFQUEUE accept-only", "c": "c nfq-ipsec gcm-128 encrypt",
             "d": "d nfq-ipsec gcm-128 decrypt", "e": "e nfq-ipsec cbc+sha256 encrypt", "f": "f scapy SA handler"}
    lines = [f"{'case':<32}{'size':>6}{'packets/s':>12}{'Mbit/s':>9}{'cpu µs/pkt':>12}{'lat p50':>9}{'p99':>8}"
             f"{'added p50':>11}{'p99':>8}  handled/sent", "-" * 117]
    for case in CASES:
        for size in map(str, sizes):
            r = results["cases"].get(case, {}).get(size)
            if not r:
                continue
            handled = r.get("handled", r.get("delivered"))
            cpu = f"{r['cpu_us_per_pkt']:.2f}" if "cpu_us_per_pkt" in r else "-"
            lines.append(
                f"{names[case]:<32}{size:>6}{r['pps']:>12,.0f}{r['mbps']:>9,.0f}{cpu:>12}{r.get('lat_p50_us', 0):>9.0f}"
                f"{r.get('lat_p99_us', 0):>8.0f}{r.get('added_p50_us', 0):>11.0f}{r.get('added_p99_us', 0):>8.0f}"
                f"  {handled}/{r['sent']}")
    lines.append("")
    lines.append("ratios (same run): " + "; ".join(
        f"{size} B: " + ", ".join(f"{k} {v:.2f}" for k, v in r.items()) for size, r in results["ratios"].items()))
    if any(results.get("ratios_cpu", {}).values()):
        lines.append("ratios by CPU (b's cpu µs/pkt / c's, ...): " + "; ".join(
            f"{size} B: " + ", ".join(f"{k} {v:.2f}" for k, v in r.items())
            for size, r in results["ratios_cpu"].items() if r))
    if results["scaling"]:
        lines.append("")
        lines.append(f"{'scaling (4 tunnels, encrypt)':<32}{'size':>6}{'workers':>9}{'packets/s':>12}"
                     f"{'x 1 worker':>12}{'paired x':>10}{'machine x':>11}{'cpu µs/pkt':>12}")
        for size, per in results["scaling"].items():
            for w, r in per.items():
                lines.append(f"{'':<32}{size:>6}{w:>9}{r['pps']:>12,.0f}{r.get('ratio', 0):>12.2f}"
                             f"{r.get('paired_ratio_median', 0):>10.2f}{r.get('machine_ratio', 0):>11.2f}"
                             f"{r.get('cpu_us_per_pkt', 0):>12.2f}")
        lines.append("(x 1 worker: best rounds; paired x: median over rounds of the ratio to the same round's "
                     "1 worker; machine x: what the machine gave as many CPU-bound processes at the same time, vs one)")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from cryptography import __version__ as crypto_version

    return {"cpus": os.cpu_count(), "cpu": cpu, "kernel": platform.release(), "python": platform.python_version(),
            "cryptography": crypto_version, "load_average_at_start": os.getloadavg()[0],
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--role", default="main", help=argparse.SUPPRESS)
    # orchestrator
    ap.add_argument("--sizes", default="64,512,1400", help="UDP payload sizes (default 64,512,1400)")
    ap.add_argument("--packets", type=int, default=20000, help="packets per drain (default 20000)")
    ap.add_argument("--scapy-packets", type=int, default=1500, help="packets per drain for case f (default 1500)")
    ap.add_argument("--rounds", type=int, default=3, help="drains per measurement, best kept (default 3)")
    ap.add_argument("--cases", default=CASES, help="which of abcdef to run (default all)")
    ap.add_argument("--workers", default="1,2,4", help="worker counts for the scaling run ('' to skip)")
    ap.add_argument("--latency-packets", type=int, default=500)
    ap.add_argument("--latency-interval", type=int, default=1000, help="microseconds between latency packets")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    ap.add_argument("--py-spy", default="", help="sample the engine's drains with py-spy into this directory")
    ap.add_argument("--exp-tun-return", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--no-rt", action="store_true",
                    help="do not run the handlers SCHED_FIFO during drains (then other jobs skew the results)")
    ap.add_argument("--perf", default="", help="record the engine's drains with perf into this directory")
    ap.add_argument("--py-spy-extra", default="", help="more py-spy record options (e.g. --native)")
    # roles
    for opt in ("--kind", "--config", "--socket", "--dst", "--esp-config", "--esp-sa", "--iface", "--match"):
        ap.add_argument(opt, default="", help=argparse.SUPPRESS)
    for opt in ("--index", "--queue", "--maxlen", "--count", "--size", "--seq-base", "--interval", "--spi",
                "--first-seq"):
        ap.add_argument(opt, type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--dport", type=int, default=PORT, help=argparse.SUPPRESS)
    ap.add_argument("--timeout", type=float, default=30.0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    roles = {"handler": role_handler, "blast": role_blast, "latency-send": role_latency_send,
             "latency-recv": role_latency_recv}
    if args.role in roles:
        if args.role == "handler":
            args.workers = int(args.workers)
        roles[args.role](args)
        return
    if os.geteuid() != 0:
        raise SystemExit("needs root (namespaces, iptables, NFQUEUE)")
    args.sizes = [int(s) for s in args.sizes.split(",") if s]
    args.workers = [int(w) for w in args.workers.split(",") if w]
    info = machine()
    print(f"nfq-ipsec throughput: {info['cpus']} CPUs ({info['cpu']}), kernel {info['kernel']}, Python "
          f"{info['python']}, load average {info['load_average_at_start']:.2f}, {info['date']}", file=sys.stderr)
    bench = Bench(args)
    try:
        bench.run()
    finally:
        bench.close()
    results = {"machine": info, "params": {k: v for k, v in vars(args).items() if k in (
        "sizes", "packets", "scapy_packets", "rounds", "cases", "workers", "latency_packets", "latency_interval")},
        **bench.results}
    results["machine"]["load_average_at_end"] = os.getloadavg()[0]
    summarize(results, args.sizes)
    print(table(results, args.sizes))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
