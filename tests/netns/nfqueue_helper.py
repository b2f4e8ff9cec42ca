"""Processes run inside test namespaces by test_nfqueue.py (a netlink socket belongs to its netns).

    handler QUEUE MODE [--fail-open] [--maxlen N] [--rcvbuf N] [--batch]
                                                     bind NfQueue, report each packet as a JSON line
    udp-sink PORT...                                 report each datagram received (v4 and v6)
    udp-send DST PORT SIZE SEED [TAG]                send one datagram of pattern(SIZE, SEED) (DF clear)
    tcp-sink PORT / tcp-send DST PORT SIZE           one TCP connection, report length + sha256

Every process writes JSON lines on stdout; `handler` also answers "stats" lines on stdin.
Handler modes: accept, drop, raise (RAISE-tagged packets raise, RET:<kind> ones return something
malformed, CLOSE closes the queue from the callback), mangle (MANGLE:<len> tag -> payload
pattern(len, 7), checksums fixed), stall (bind and read nothing until a "drain" line, then accept).
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import socket
import struct
import sys
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)


def emit(**kw: Any) -> None:
    sys.stdout.write(json.dumps(kw) + "\n")
    sys.stdout.flush()


def pattern(size: int, seed: int) -> bytes:
    block = bytes((i * 7 + seed) & 0xFF for i in range(256))
    return (block * (size // 256 + 1))[:size]


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def pseudo_header(pkt: bytes, l4_len: int, proto: int) -> bytes:
    if pkt[0] >> 4 == 4:
        return pkt[12:20] + struct.pack("!BBH", 0, proto, l4_len)
    return pkt[8:40] + struct.pack("!IxxxB", l4_len, proto)


def l4_info(pkt: bytes) -> tuple[int, int]:
    """(proto, l4 offset) for unfragmented packets without IPv6 extension headers; (-1, -1) otherwise."""
    if pkt[0] >> 4 == 4:
        if struct.unpack("!H", pkt[6:8])[0] & 0x3FFF:  # MF or offset: a fragment
            return -1, -1
        return pkt[9], (pkt[0] & 0xF) * 4
    return pkt[6], 40


def l4_checksum_ok(pkt: bytes) -> bool | None:
    proto, off = l4_info(pkt)
    if proto not in (6, 17):
        return None
    seg = pkt[off:]
    if proto == 17 and pkt[0] >> 4 == 4 and seg[6:8] == b"\0\0":
        return True  # IPv4 UDP without checksum
    return checksum(pseudo_header(pkt, len(seg), proto) + seg) == 0


def rebuild_udp(pkt: bytes, new_data: bytes) -> bytes:
    """Same IP/UDP headers, new UDP payload, lengths and checksums fixed."""
    proto, off = l4_info(pkt)
    assert proto == 17
    udp_len = 8 + len(new_data)
    udp = bytearray(pkt[off:off + 8] + new_data)
    struct.pack_into("!HH", udp, 4, udp_len, 0)
    if pkt[0] >> 4 == 4:
        ip = bytearray(pkt[:off])
        struct.pack_into("!H", ip, 2, off + udp_len)
        struct.pack_into("!H", ip, 10, 0)
        struct.pack_into("!H", ip, 10, checksum(bytes(ip)))
    else:
        ip = bytearray(pkt[:40])
        struct.pack_into("!H", ip, 4, udp_len)
    csum = checksum(pseudo_header(bytes(ip), udp_len, 17) + bytes(udp)) or 0xFFFF
    struct.pack_into("!H", udp, 6, csum)
    return bytes(ip) + bytes(udp)


def handler(queue_num: int, mode: str, fail_open: bool, maxlen: int, rcvbuf: int, batch: bool) -> None:
    from nfq_ipsec.nfqueue import NF_ACCEPT, NF_DROP, NfQueue, kernel_queue_stats

    def report_stats() -> None:
        emit(stats=q.stats(), kernel=kernel_queue_stats(queue_num))

    def callback(payload: bytes, hook: int, indev: int, outdev: int, mark: int) -> int | tuple[int, bytes]:
        proto, off = l4_info(payload)
        data = payload[off + 8:] if proto == 17 else b""
        emit(len=len(payload), hook=hook, indev=indev, outdev=outdev, proto=proto,
             csum_ok=l4_checksum_ok(payload), tag=data[:16].decode("latin-1"),
             sha=hashlib.sha256(data).hexdigest() if proto == 17 else None)
        if mode == "drop":
            return NF_DROP
        if mode == "raise" and data.startswith(b"RAISE"):
            raise RuntimeError("callback failure on purpose")
        if mode == "raise" and data.startswith(b"RET:"):  # malformed results: the binding must fail closed
            kind = data[4:data.index(b";")].decode()
            malformed: dict[str, Any] = {
                "type": "accept",
                "verdict": 7,
                "tuple3": (NF_ACCEPT, payload, 0),
                "short": (NF_ACCEPT, payload[:10]),
                "toolong": (NF_ACCEPT, payload + bytes(65536 - len(payload))),
                "notbytes": (NF_ACCEPT, 12),
            }
            return malformed[kind]  # type: ignore[no-any-return]
        if mode == "raise" and data.startswith(b"CLOSE;"):
            q.close()  # from inside the callback: takes effect when process() returns
            return NF_ACCEPT
        if mode == "mangle" and data.startswith(b"MANGLE:"):
            new_len = int(data[7:data.index(b";")])
            return NF_ACCEPT, rebuild_udp(payload, pattern(new_len, 7))
        return NF_ACCEPT

    q = NfQueue(queue_num, fail_open=fail_open, maxlen=maxlen, rcvbuf=rcvbuf, batch_verdicts=batch)
    emit(ready=True)
    poller = select.poll()
    if mode != "stall":
        poller.register(q.fileno(), select.POLLIN)
    poller.register(sys.stdin.fileno(), select.POLLIN)
    while True:
        for fd, _ in poller.poll(1000):
            if fd == sys.stdin.fileno():
                line = sys.stdin.readline()
                if not line:
                    q.close()
                    return
                if line.strip() == "stats":
                    report_stats()
                elif line.strip() == "drain":
                    mode = "accept"
                    poller.register(q.fileno(), select.POLLIN)
                continue
            try:
                q.process(callback)
            except (RuntimeError, TypeError, ValueError) as e:
                emit(exception=f"{type(e).__name__}: {e}")
            if q.closed:
                emit(closed=True, stats=q.stats())
                return


def udp_sink(ports: list[int]) -> None:
    socks = []
    for port in ports:
        for fam, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
            s = socket.socket(fam, socket.SOCK_DGRAM)
            if fam == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            s.bind((addr, port))
            socks.append((s, port))
    emit(ready=True)
    while True:
        readable, _, _ = select.select([s for s, _ in socks], [], [])
        for s in readable:
            data = s.recv(65535)
            emit(port=s.getsockname()[1], len=len(data), tag=data[:16].decode("latin-1"),
                 sha=hashlib.sha256(data).hexdigest(), family=6 if s.family == socket.AF_INET6 else 4)


def udp_send(dst: str, port: int, size: int, seed: int, tag: str) -> None:
    fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_DGRAM)
    if fam == socket.AF_INET:
        s.setsockopt(socket.IPPROTO_IP, 10, 0)  # IP_MTU_DISCOVER = IP_PMTUDISC_DONT: DF clear
    else:
        s.setsockopt(socket.IPPROTO_IPV6, 23, 0)  # IPV6_MTU_DISCOVER = IPV6_PMTUDISC_DONT
    tagb = tag.encode()
    data = tagb + pattern(size - len(tagb), seed)
    s.sendto(data, (dst, port))
    emit(sent=len(data), sha=hashlib.sha256(data).hexdigest())


def tcp_sink(port: int) -> None:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(1)
    emit(ready=True)
    conn, _ = srv.accept()
    h, n = hashlib.sha256(), 0
    while chunk := conn.recv(1 << 16):
        h.update(chunk)
        n += len(chunk)
    emit(len=n, sha=h.hexdigest())


def tcp_send(dst: str, port: int, size: int) -> None:
    data = pattern(size, 3)
    s = socket.create_connection((dst, port), timeout=20)
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)
    s.recv(1)
    s.close()
    emit(sent=len(data), sha=hashlib.sha256(data).hexdigest())


def main(argv: list[str]) -> None:
    cmd = argv[0]
    if cmd == "handler":
        fail_open = "--fail-open" in argv
        maxlen = int(argv[argv.index("--maxlen") + 1]) if "--maxlen" in argv else 8192
        rcvbuf = int(argv[argv.index("--rcvbuf") + 1]) if "--rcvbuf" in argv else 8 << 20
        handler(int(argv[1]), argv[2], fail_open, maxlen, rcvbuf, "--batch" in argv)
    elif cmd == "udp-sink":
        udp_sink([int(p) for p in argv[1:]])
    elif cmd == "udp-send":
        udp_send(argv[1], int(argv[2]), int(argv[3]), int(argv[4]), argv[5] if len(argv) > 5 else "")
    elif cmd == "tcp-sink":
        tcp_sink(int(argv[1]))
    elif cmd == "tcp-send":
        tcp_send(argv[1], int(argv[2]), int(argv[3]))
    else:
        raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except KeyboardInterrupt:
        time.sleep(0)
