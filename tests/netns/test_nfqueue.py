"""Real packets through nfq_ipsec.nfqueue in network namespaces (root, iptables-legacy).

Topology: a (192.0.2.1, 2001:db8::1) --veth mtu 1500-- b (192.0.2.2, 2001:db8::2).
a: OUTPUT udp/9000 and tcp/9002 -> queue 0;  b: INPUT udp/9001 -> queue 1.
The handlers, senders and sinks run as child processes inside the namespaces (a netlink
socket belongs to its namespace): see nfqueue_helper.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from nfq_ipsec.netns import Namespace, Topology

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("iptables-legacy") is None
                       or shutil.which("ip6tables-legacy") is None,
                       reason="needs root, network namespaces and iptables-legacy"),
]

HELPER = Path(__file__).with_name("nfqueue_helper.py")
REPO = HELPER.parents[2]
A4, B4, A6, B6 = "192.0.2.1", "192.0.2.2", "2001:db8::1", "2001:db8::2"
NF_INET_LOCAL_IN, NF_INET_LOCAL_OUT = 1, 3


def pattern(size: int, seed: int) -> bytes:
    block = bytes((i * 7 + seed) & 0xFF for i in range(256))
    return (block * (size // 256 + 1))[:size]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Proc:
    """A helper process in a namespace whose JSON stdout lines are collected by a thread."""

    def __init__(self, ns: Namespace, *args: str) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
        self.popen = ns.popen([sys.executable, str(HELPER), *args], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, env=env)
        self.lines: list[dict[str, Any]] = []
        self._new: queue.Queue[dict[str, Any]] = queue.Queue()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for raw in self.popen.stdout:
            msg = json.loads(raw)
            self.lines.append(msg)
            self._new.put(msg)

    def wait_for(self, pred: Callable[[dict[str, Any]], bool],
                 timeout: float = 10.0) -> dict[str, Any] | None:
        """The first line (already seen or new) matching pred, or None after timeout."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for msg in self.lines[seen:]:
                if pred(msg):
                    return msg
            seen = len(self.lines)
            left = deadline - time.monotonic()
            if left <= 0 or (self.popen.poll() is not None and self._new.empty()):
                return None
            with contextlib.suppress(queue.Empty):
                self._new.get(timeout=min(left, 0.2))

    def ready(self) -> None:
        assert self.wait_for(lambda m: m.get("ready") is True), f"helper did not start: {self.popen.args!r}"

    def stats(self) -> dict[str, Any]:
        """Binding and kernel counters of a running handler."""
        assert self.popen.stdin is not None
        n = sum(1 for m in self.lines if "stats" in m)
        self.popen.stdin.write(b"stats\n")
        self.popen.stdin.flush()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            got = [m for m in self.lines if "stats" in m]
            if len(got) > n:
                return got[-1]
            time.sleep(0.02)
        raise AssertionError("handler did not report stats")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(timeout=10)
        self._thread.join(timeout=5)


@contextlib.contextmanager
def running(ns: Namespace, *args: str) -> Iterator[Proc]:
    proc = Proc(ns, *args)
    try:
        proc.ready()
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def net() -> Iterator[tuple[Namespace, Namespace, Proc]]:
    with Topology("nq") as topo:
        a, b = topo.add("a"), topo.add("b")
        topo.link(a, [f"{A4}/24", f"{A6}/64"], b, [f"{B4}/24", f"{B6}/64"])
        for ipt in ("iptables-legacy", "ip6tables-legacy"):
            a.run([ipt, "-A", "OUTPUT", "-p", "udp", "--dport", "9000", "-j", "NFQUEUE", "--queue-num", "0"])
            a.run([ipt, "-A", "OUTPUT", "-p", "tcp", "--dport", "9002", "-j", "NFQUEUE", "--queue-num", "0"])
        b.run(["iptables-legacy", "-A", "INPUT", "-p", "udp", "--dport", "9001", "-j", "NFQUEUE",
               "--queue-num", "1"])
        # IPv6 reassembles *after* LOCAL_IN unless conntrack's defrag (PRE_ROUTING -400) is enabled in the
        # netns; a rule using conntrack enables it, and then INPUT sees the whole datagram, as for IPv4.
        b.run(["ip6tables-legacy", "-A", "INPUT", "-p", "udp", "--dport", "9001", "-m", "conntrack",
               "--ctstate", "NEW,ESTABLISHED", "-j", "NFQUEUE", "--queue-num", "1"])
        sink = Proc(b, "udp-sink", "9000", "9001")
        try:
            sink.ready()
            # neighbour discovery before the timed parts
            a.run(["ping", "-c1", "-W2", B4])
            a.run(["ping", "-c1", "-W2", B6])
            yield a, b, sink
        finally:
            sink.stop()


def send(ns: Namespace, dst: str, port: int, size: int, tag: str, seed: int = 1) -> str:
    """Send one UDP datagram (DF clear) of `size` bytes starting with `tag`; returns its sha256."""
    data = tag.encode() + pattern(size - len(tag), seed)
    out = ns.run([sys.executable, str(HELPER), "udp-send", dst, str(port), str(size), str(seed), tag])
    assert json.loads(out.stdout)["sha"] == sha(data)
    return sha(data)


def received(sink: Proc, digest: str, timeout: float = 5.0) -> dict[str, Any] | None:
    return sink.wait_for(lambda m: m.get("sha") == digest, timeout)


def seen(handler: Proc, tag: str, timeout: float = 5.0) -> dict[str, Any] | None:
    return handler.wait_for(lambda m: str(m.get("tag", "")).startswith(tag), timeout)


@pytest.mark.parametrize(("dst", "total"), [(B4, 60028), (B6, 60048)])
def test_output_sees_whole_60k_datagram(net: tuple[Namespace, Namespace, Proc], dst: str,
                                        total: int) -> None:
    a, _, sink = net
    tag = f"OUT{total};"
    with running(a, "handler", "0", "accept") as h:
        digest = send(a, dst, 9000, 60000, tag)
        pkt = seen(h, tag)
        assert pkt is not None, "callback never saw the datagram"
        assert pkt["len"] == total and pkt["hook"] == NF_INET_LOCAL_OUT
        assert pkt["sha"] == digest and pkt["csum_ok"] is True
        assert pkt["indev"] == 0 and pkt["outdev"] > 0
        got = received(sink, digest)
        assert got is not None and got["len"] == 60000
        st = h.stats()
        assert st["stats"]["truncated"] == 0 and st["stats"]["accepted"] >= 1
        assert st["kernel"]["copy_mode"] == 2 and st["kernel"]["copy_range"] == 65531


def test_input_sees_reassembled_datagram(net: tuple[Namespace, Namespace, Proc]) -> None:
    a, _b, sink = net
    with running(net[1], "handler", "1", "accept") as h:
        for dst, total in ((B4, 60028), (B6, 60048)):
            tag = f"IN{total};"
            digest = send(a, dst, 9001, 60000, tag)
            pkt = seen(h, tag)
            assert pkt is not None, f"INPUT callback never saw the {dst} datagram"
            assert pkt["len"] == total and pkt["hook"] == NF_INET_LOCAL_IN and pkt["indev"] > 0
            assert pkt["sha"] == digest
            assert received(sink, digest) is not None


def test_largest_copyable_packet_passes_and_larger_is_dropped_not_truncated(
        net: tuple[Namespace, Namespace, Proc]) -> None:
    a, _, sink = net
    with running(a, "handler", "0", "accept") as h:
        fits = send(a, B4, 9000, 65531 - 28, "FITS;")       # IP total length 65531 = MAX_PAYLOAD
        pkt = seen(h, "FITS;")
        assert pkt is not None and pkt["len"] == 65531 and pkt["sha"] == fits
        assert received(sink, fits) is not None
        too_big = send(a, B4, 9000, 65535 - 28, "TOOBIG;")  # 65535: the copy would be truncated
        deadline = time.monotonic() + 5
        while h.stats()["stats"]["truncated"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        st = h.stats()["stats"]
        assert st["truncated"] == 1 and st["dropped"] == 1
        assert seen(h, "TOOBIG;", timeout=0.2) is None, "a truncated copy reached the callback"
        assert received(sink, too_big, timeout=0.5) is None, "a truncated copy was accepted"


@pytest.mark.parametrize(("dst", "batch"), [(B4, False), (B6, False), (B4, True)])
def test_mangle_longer_and_shorter(net: tuple[Namespace, Namespace, Proc], dst: str, batch: bool) -> None:
    a, _, sink = net
    with running(a, "handler", "0", "mangle", *(["--batch"] if batch else [])) as h:
        for new_len in (61000, 1000, 3):
            send(a, dst, 9000, 60000, f"MANGLE:{new_len};")
            got = received(sink, sha(pattern(new_len, 7)))
            assert got is not None, f"rewritten {new_len}-byte datagram not received"
            assert got["len"] == new_len
        st = h.stats()["stats"]
        assert st["mangled"] == 3 and st["accepted"] == 3 and st["callback_errors"] == 0


def test_drop_verdict_and_callback_exception_fail_closed(net: tuple[Namespace, Namespace, Proc]) -> None:
    a, _, sink = net
    with running(a, "handler", "0", "drop") as h:
        digest = send(a, B4, 9000, 2000, "DROP;")
        assert seen(h, "DROP;") is not None
        assert received(sink, digest, timeout=0.5) is None
        assert h.stats()["stats"]["dropped"] == 1
    with running(a, "handler", "0", "raise") as h:
        raised = send(a, B4, 9000, 30000, "RAISE;")
        assert h.wait_for(lambda m: "exception" in m) is not None, "exception did not leave process()"
        after = send(a, B4, 9000, 30000, "AFTER;")
        assert received(sink, after) is not None, "handler stopped after a callback exception"
        assert received(sink, raised, timeout=0.3) is None, "packet whose callback raised was not dropped"
        st = h.stats()["stats"]
        assert st["callback_errors"] == 1 and st["dropped"] == 1 and st["accepted"] == 1


def test_second_binding_fails_with_clear_message(net: tuple[Namespace, Namespace, Proc]) -> None:
    a, _, _ = net
    code = (
        "import errno\nfrom nfq_ipsec.nfqueue import NfQueue\n"
        "try:\n    NfQueue(0)\nexcept OSError as e:\n"
        "    assert e.errno == errno.EBUSY, e.errno\n    print(e.strerror)\n"
        "else:\n    print('bound twice')\n"
    )
    with running(a, "handler", "0", "accept"):
        out = subprocess.run(a.cmd(sys.executable, "-c", code), capture_output=True, text=True, timeout=20,
                             env=dict(os.environ, PYTHONPATH=str(REPO)))
        assert out.stdout.strip() == "queue 0 is already in use by another program", out.stderr
    # once the handler is gone the queue is free again
    rebind = "from nfq_ipsec.nfqueue import NfQueue; NfQueue(0).close()"
    out = subprocess.run(a.cmd(sys.executable, "-c", rebind), capture_output=True, text=True, timeout=20,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert out.returncode == 0, out.stderr


def test_fail_closed_without_listener_and_fail_open_when_queue_full(
        net: tuple[Namespace, Namespace, Proc]) -> None:
    a, _, sink = net
    digest = send(a, B4, 9000, 1000, "NOLISTENER;")
    assert received(sink, digest, timeout=0.5) is None, "packet passed an NFQUEUE rule with nobody bound"

    # queue of one that is never read: the first packet waits, the rest overflow the queue
    with running(a, "handler", "0", "stall", "--maxlen", "1") as h:
        digests = [send(a, B4, 9000, 1000, f"CLOSED{i};") for i in range(3)]
        time.sleep(0.3)
        assert all(received(sink, d, timeout=0.1) is None for d in digests), "queue-full packet passed"
        k = h.stats()["kernel"]
        assert k["queue_total"] == 1 and k["queue_dropped"] == 2
    with running(a, "handler", "0", "stall", "--maxlen", "1", "--fail-open") as h:
        digests = [send(a, B4, 9000, 1000, f"OPEN{i};") for i in range(3)]
        assert received(sink, digests[1]) is not None and received(sink, digests[2]) is not None
        assert received(sink, digests[0], timeout=0.2) is None  # still queued
        k = h.stats()["kernel"]
        assert k["queue_total"] == 1 and k["queue_dropped"] == 0


@pytest.mark.parametrize("batch", [False, True])
def test_output_tcp_segments_have_complete_checksums(net: tuple[Namespace, Namespace, Proc],
                                                     batch: bool) -> None:
    """F_GSO stays clear: the kernel segments TSO skbs and completes CHECKSUM_PARTIAL before copying.
    (With batch_verdicts, many verdicts share one netlink datagram here.)"""
    a, b, _ = net
    size = 2 << 20
    args = ["handler", "0", "accept", *(["--batch"] if batch else [])]
    with running(a, *args) as h, running(b, "tcp-sink", "9002") as tsink:
        out = a.run([sys.executable, str(HELPER), "tcp-send", B4, "9002", str(size)], timeout=60)
        assert json.loads(out.stdout)["sent"] == size
        got = tsink.wait_for(lambda m: "len" in m)
        assert got is not None and got["len"] == size and got["sha"] == sha(pattern(size, 3))
        tcp = [m for m in h.lines if m.get("proto") == 6]
        assert len(tcp) > size // 1500
        assert all(m["csum_ok"] is True for m in tcp), "a TCP segment reached the callback without checksum"
        assert max(m["len"] for m in tcp) <= 1500, "a GSO super-packet reached the callback"


def test_malformed_callback_results_fail_closed(net: tuple[Namespace, Namespace, Proc]) -> None:
    a, _, sink = net
    kinds = ["type", "verdict", "tuple3", "short", "toolong", "notbytes"]
    with running(a, "handler", "0", "raise") as h:
        digests = []
        for kind in kinds:
            digests.append(send(a, B4, 9000, 2000, f"RET:{kind};"))
            assert seen(h, f"RET:{kind};") is not None, kind
        deadline = time.monotonic() + 5
        while sum("exception" in m for m in h.lines) < len(kinds) and time.monotonic() < deadline:
            time.sleep(0.02)
        ok = send(a, B4, 9000, 2000, "AFTER;")
        assert received(sink, ok) is not None
        assert all(received(sink, d, timeout=0.1) is None for d in digests)
        errors = [m["exception"] for m in h.lines if "exception" in m]
        assert [e.split(":")[0] for e in errors] == ["TypeError", "ValueError", "TypeError", "ValueError",
                                                    "ValueError", "TypeError"], errors
        st = h.stats()["stats"]
        assert st["callback_errors"] == len(kinds) and st["dropped"] == len(kinds) and st["accepted"] == 1
        # close() from inside the callback: that packet's verdict is still sent, then the queue closes
        last = send(a, B4, 9000, 2000, "CLOSE;")
        closed = h.wait_for(lambda m: m.get("closed") is True)
        assert closed is not None and closed["stats"]["accepted"] == 2
        assert received(sink, last) is not None


def test_socket_overrun_is_counted_not_swallowed(net: tuple[Namespace, Namespace, Proc]) -> None:
    """Full-size packets overflow a small receive buffer: the kernel drops them (user_dropped), we count
    the ENOBUFS it reports instead of swallowing it."""
    a, _, sink = net
    with running(a, "handler", "0", "stall", "--rcvbuf", "262144") as h:
        digests = [send(a, B4, 9000, 60000, f"FLOOD{i};") for i in range(20)]
        k = h.stats()["kernel"]
        assert k["user_dropped"] > 0 and k["queue_total"] + k["user_dropped"] == 20, k
        assert h.popen.stdin is not None
        h.popen.stdin.write(b"drain\n")
        h.popen.stdin.flush()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            got = [d for d in digests if received(sink, d, timeout=0) is not None]
            if len(got) >= k["queue_total"]:
                break
            time.sleep(0.05)
        time.sleep(0.2)
        got = [d for d in digests if received(sink, d, timeout=0) is not None]
        assert len(got) == k["queue_total"]
        st = h.stats()["stats"]
        assert st["enobufs"] == 1 and st["accepted"] == k["queue_total"] and st["truncated"] == 0


def test_kernel_queue_stats_parses_proc_columns(tmp_path: Path) -> None:
    from nfq_ipsec.nfqueue import kernel_queue_stats

    f = tmp_path / "nfnetlink_queue"
    f.write_text("    0  12345     3 2 65531     7     9      100  1\n"
                 "    5 4294963200     0 2 65531     0     0        0  1\n")
    assert kernel_queue_stats(0, str(f)) == {"queue_num": 0, "peer_portid": 12345, "queue_total": 3,
                                             "copy_mode": 2, "copy_range": 65531, "queue_dropped": 7,
                                             "user_dropped": 9, "id_sequence": 100}
    five = kernel_queue_stats(5, str(f))
    assert five is not None and five["peer_portid"] == 4294963200
    assert kernel_queue_stats(1, str(f)) is None
    assert kernel_queue_stats(0, str(tmp_path / "missing")) is None
