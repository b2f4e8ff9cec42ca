"""Small traffic tools for the demo, the tests and the benchmarks (run inside namespaces).

    python -m nfq_ipsec.traffic udp-echo-server ADDR PORT [--count N] [--timeout S]
    python -m nfq_ipsec.traffic udp-echo ADDR PORT [--size N] [--count N] [--timeout S]
    python -m nfq_ipsec.traffic tcp-sink ADDR PORT [--timeout S]          # prints "<bytes> <sha256>"
    python -m nfq_ipsec.traffic tcp-send ADDR PORT --bytes N [--seed S]   # prints "<bytes> <sha256>"

Every loop is bounded in count and time; exit status 0 means the exchange completed.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import sys
import time


def _family(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def udp_echo_server(addr: str, port: int, count: int, timeout: float) -> int:
    with socket.socket(_family(addr), socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((addr, port))
        s.settimeout(timeout)
        print("ready", flush=True)
        served = 0
        deadline = time.monotonic() + timeout
        while served < count and time.monotonic() < deadline:
            try:
                data, peer = s.recvfrom(65535)
            except TimeoutError:
                break
            s.sendto(data, peer)
            served += 1
        print(f"served {served}", flush=True)
    return 0


def udp_echo(addr: str, port: int, size: int, count: int, timeout: float) -> int:
    ok = 0
    with socket.socket(_family(addr), socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        for i in range(count):
            payload = (f"{i:08d}".encode() + os.urandom(max(0, size - 8)))[:size] if size >= 8 else os.urandom(size)
            for _attempt in range(3):
                s.sendto(payload, (addr, port))
                try:
                    data, _ = s.recvfrom(65535)
                except TimeoutError:
                    continue
                if data == payload:
                    ok += 1
                    break
    print(f"echoed {ok}/{count}", flush=True)
    return 0 if ok == count else 1


def tcp_sink(addr: str, port: int, timeout: float) -> int:
    with socket.socket(_family(addr), socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((addr, port))
        s.listen(1)
        s.settimeout(timeout)
        print("ready", flush=True)
        conn, _ = s.accept()
        h = hashlib.sha256()
        n = 0
        deadline = time.monotonic() + timeout
        with conn:
            conn.settimeout(timeout)
            while time.monotonic() < deadline:
                data = conn.recv(262144)
                if not data:
                    break
                h.update(data)
                n += len(data)
    print(f"{n} {h.hexdigest()}", flush=True)
    return 0


def tcp_send(addr: str, port: int, nbytes: int, seed: int, timeout: float) -> int:
    import random

    rnd = random.Random(seed)
    h = hashlib.sha256()
    with socket.create_connection((addr, port), timeout=timeout) as s:
        left = nbytes
        while left:
            chunk = rnd.randbytes(min(65536, left))
            s.sendall(chunk)
            h.update(chunk)
            left -= len(chunk)
        s.shutdown(socket.SHUT_WR)
        s.settimeout(timeout)
        while s.recv(4096):
            pass
    print(f"{nbytes} {h.hexdigest()}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nfq_ipsec.traffic")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("udp-echo-server", "udp-echo", "tcp-sink", "tcp-send"):
        p = sub.add_parser(name)
        p.add_argument("addr")
        p.add_argument("port", type=int)
        p.add_argument("--timeout", type=float, default=10.0)
        p.add_argument("--count", type=int, default=5)
        p.add_argument("--size", type=int, default=64)
        p.add_argument("--bytes", type=int, default=1 << 20)
        p.add_argument("--seed", type=int, default=1)
    a = ap.parse_args(argv)
    if a.cmd == "udp-echo-server":
        return udp_echo_server(a.addr, a.port, a.count, a.timeout)
    if a.cmd == "udp-echo":
        return udp_echo(a.addr, a.port, a.size, a.count, a.timeout)
    if a.cmd == "tcp-sink":
        return tcp_sink(a.addr, a.port, a.timeout)
    return tcp_send(a.addr, a.port, a.bytes, a.seed, a.timeout)


if __name__ == "__main__":
    sys.exit(main())
