#!/usr/bin/env python3
"""Packets/s through NFQUEUE: NetfilterQueue 1.1.0 vs our binding (nfq_ipsec.nfqueue). Root needed.

    .venv/bin/python bench/nfqueue_bench.py [--packets 200000] [--size 64] [--rounds 1]

Two namespaces (s --veth-- r, documentation addresses). The queue sits on s's OUTPUT for UDP
port 9999; r drops that port in INPUT, its iptables counter tells how many packets made it.

Each case is measured as *drains*: the handler binds but does not read while a blaster in s
sends up to 50,000 small datagrams as fast as it can (the queue holds at most 65,536; queue
length and socket buffers are sized to hold them all), then the handler is told to go and the
time to handle them is measured; repeated until N packets. On a 2-core machine this isolates
the binding's per-packet cost from the blaster's CPU use. The handler's own CPU time (user +
system, so including the kernel's work in its recv/sendto) per packet is printed too: it is
less sensitive than packets/s to other load on the machine.

Cases: NetfilterQueue accept-only, NetfilterQueue rewrite (set_payload), ours accept-only,
ours rewrite ((NF_ACCEPT, new_payload)), and ours again with batch_verdicts=True (one sendto per
process() call). The rewrite zeroes the UDP checksum (valid for IPv4).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import select
import signal
import socket
import subprocess
import sys
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

S_ADDR, R_ADDR, PORT, QUEUE = "198.51.100.1", "198.51.100.2", 9999, 0
CHUNK = 50_000  # packets per fill: the kernel queue holds at most 65536 packets here
CASES = [("netfilterqueue", "accept"), ("netfilterqueue", "rewrite"), ("ours", "accept"), ("ours", "rewrite"),
         ("ours-batch", "accept"), ("ours-batch", "rewrite")]


def emit(**kw: Any) -> None:
    sys.stdout.write(json.dumps(kw) + "\n")
    sys.stdout.flush()


def rewrite(payload: bytes) -> bytes:
    return payload[:26] + b"\0\0" + payload[28:]  # IPv4 (20-byte header) UDP checksum -> 0 (none)


def worker(impl: str, mode: str, n: int) -> None:
    """Runs inside s: bind, then for each "go K" line on stdin handle K queued packets and report the time."""
    rcvbuf = 1 << 30
    if impl.startswith("ours"):
        from nfq_ipsec.nfqueue import NF_ACCEPT, NfQueue

        q = NfQueue(QUEUE, maxlen=n + 1000, rcvbuf=rcvbuf, batch_verdicts=impl == "ours-batch")
        fd = q.fileno()
        if mode == "accept":
            def cb(payload: bytes, hook: int, indev: int, outdev: int, mark: int) -> int | tuple[int, bytes]:
                return NF_ACCEPT
        else:
            def cb(payload: bytes, hook: int, indev: int, outdev: int, mark: int) -> int | tuple[int, bytes]:
                return NF_ACCEPT, rewrite(payload)

        def drain() -> int:
            return q.process(cb, 64)
    else:
        from netfilterqueue import NetfilterQueue

        count = [0]
        if mode == "accept":
            def ncb(pkt: Any) -> None:
                count[0] += 1
                pkt.accept()
        else:
            def ncb(pkt: Any) -> None:
                count[0] += 1
                pkt.set_payload(rewrite(pkt.get_payload()))
                pkt.accept()
        nq = NetfilterQueue()
        nq.bind(QUEUE, ncb, max_len=n + 1000, sock_len=rcvbuf // 2)
        fd = nq.get_fd()

        def drain() -> int:
            before = count[0]
            nq.run(block=False)
            return count[0] - before

    emit(ready=True)
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while (line := sys.stdin.readline().split()) and line[0] == "go":
        want, handled = int(line[1]), 0
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = last = time.perf_counter()
        while handled < want:
            if not poller.poll(500):
                break  # idle: some packets never reached the queue (counted as not handled)
            handled += drain()
            last = time.perf_counter()
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = ru1.ru_utime - ru0.ru_utime + ru1.ru_stime - ru0.ru_stime
        emit(handled=handled, seconds=last - t0, cpu=cpu, stats=q.stats() if impl.startswith("ours") else None)


def blast(n: int, size: int) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    # A queued packet stays charged to its socket's send buffer until its verdict: size it for all n.
    s.setsockopt(socket.SOL_SOCKET, 32, 1 << 30)  # SO_SNDBUFFORCE (root)
    s.connect((R_ADDR, PORT))
    data = b"x" * size
    send = s.send
    for _ in range(n):
        send(data)
    emit(sent=n)


def run(cmd: list[str], **kw: Any) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout


def sink_count(r: Any) -> int:
    out = r.run(["iptables-legacy", "-L", "INPUT", "-v", "-x", "-n", "-Z"]).stdout
    m = re.search(rf"^\s*(\d+)\s+\d+\s+DROP\s+.*dpt:{PORT}", out, re.M)
    return int(m.group(1)) if m else -1


def measure(s: Any, r: Any, impl: str, mode: str, n: int, size: int) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=REPO)
    w = s.popen([sys.executable, __file__, "--worker", impl, mode, str(n)], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, env=env)
    try:
        assert w.stdout is not None and w.stdin is not None
        assert json.loads(w.stdout.readline()).get("ready"), "worker did not start"
        sink_count(r)  # zero the counter
        res: dict[str, Any] = {"handled": 0, "seconds": 0.0, "cpu": 0.0}
        left = n
        while left > 0:
            chunk = min(left, CHUNK)
            left -= chunk
            s.run([sys.executable, __file__, "--blast", str(chunk), str(size)], timeout=600)
            w.stdin.write(b"go %d\n" % chunk)
            w.stdin.flush()
            part = json.loads(w.stdout.readline())
            res["handled"] += part["handled"]
            res["seconds"] += part["seconds"]
            res["cpu"] += part["cpu"]
    finally:
        w.kill()
        w.wait()
    time.sleep(0.2)
    res["delivered"] = sink_count(r)
    res["pps"] = res["handled"] / res["seconds"] if res["seconds"] > 0 else 0.0
    res["cpu_us"] = 1e6 * res["cpu"] / res["handled"] if res["handled"] else 0.0
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--packets", type=int, default=200_000)
    ap.add_argument("--size", type=int, default=64, help="UDP payload bytes")
    ap.add_argument("--rounds", type=int, default=1, help="repeat every case, keep the best")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (namespaces, iptables, NFQUEUE)")
    from nfq_ipsec.netns import Topology

    # SIGTERM (e.g. `timeout`) must still run the Topology cleanup
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    with Topology("nqb") as topo:
        s, r = topo.add("s"), topo.add("r")
        topo.link(s, f"{S_ADDR}/24", r, f"{R_ADDR}/24")
        s.run(["iptables-legacy", "-A", "OUTPUT", "-p", "udp", "--dport", str(PORT), "-j", "NFQUEUE",
               "--queue-num", str(QUEUE)])
        r.run(["iptables-legacy", "-A", "INPUT", "-p", "udp", "--dport", str(PORT), "-j", "DROP"])
        s.run(["ping", "-c1", "-W2", R_ADDR])
        results: dict[tuple[str, str], dict[str, Any]] = {}
        for _ in range(args.rounds):
            for impl, mode in CASES:
                res = measure(s, r, impl, mode, args.packets, args.size)
                best = results.get((impl, mode))
                if best is None or res["pps"] > best["pps"]:
                    results[(impl, mode)] = res

    print(f"{args.packets} packets of {args.size + 28} bytes (IPv4/UDP), drained from a pre-filled queue "
          f"({CHUNK} at a time), best of {args.rounds}\n")
    print(f"{'binding':<16}{'verdict':<10}{'handled':>10}{'seconds':>10}{'packets/s':>12}{'CPU us/pkt':>12}"
          f"{'delivered':>11}")
    for (impl, mode), res in results.items():
        print(f"{impl:<16}{mode:<10}{res['handled']:>10}{res['seconds']:>10.3f}{res['pps']:>12,.0f}"
              f"{res['cpu_us']:>12.2f}{res['delivered']:>11}")
    base = results[("netfilterqueue", "accept")]["pps"]
    print()
    for impl, mode in CASES[1:]:
        print(f"{impl} {mode} / netfilterqueue accept = {results[(impl, mode)]['pps'] / base:.2f}x")
    nrw = results[("netfilterqueue", "rewrite")]["pps"]
    for impl in ("ours", "ours-batch"):
        print(f"{impl} rewrite / netfilterqueue rewrite = {results[(impl, 'rewrite')]['pps'] / nrw:.2f}x")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif len(sys.argv) > 1 and sys.argv[1] == "--blast":
        blast(int(sys.argv[2]), int(sys.argv[3]))
    else:
        main()
