"""The control socket under bad input: garbage, oversized, flooding and non-reading clients,
bad live changes, bad trace filters, non-root peers. Each gets one clear error, nothing that
is running changes, the engine loop never blocks, and no key material is ever sent back.

The server runs over a real `Engine` object (not started: no queues, no hooks) driven by the
same dispatch as `Engine.run`, in this process; clients are real Unix sockets.
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nfq_ipsec import control
from nfq_ipsec.config import parse_config
from nfq_ipsec.engine import Engine, EngineError
from nfq_ipsec.pipeline import Decision

KEY_A = "4f1c9e2b7a5d3c8e6f0a1b2c3d4e5f60718293a4"  # aes-gcm-128: 16 + 4 salt
KEY_B = "a0b1c2d3e4f5061728394a5b6c7d8e9f0a1b2c3d"
CONFIG = f"""
[engine]
default_policy = "bypass"

[[sa]]
name = "out-sa"
proto = "esp"
mode = "transport"
src = "192.0.2.1"
dst = "192.0.2.2"
spi = 0x00001001
aead = "aes-gcm-128"
key = "0x{KEY_A}"

[[sa]]
name = "in-sa"
proto = "esp"
mode = "transport"
src = "192.0.2.2"
dst = "192.0.2.1"
spi = 0x00001002
aead = "aes-gcm-128"
key = "0x{KEY_B}"

[[policy]]
name = "out-pol"
dir = "out"
src = "192.0.2.1/32"
dst = "192.0.2.2/32"
action = "protect"
sa = "out-sa"

[[policy]]
name = "in-pol"
dir = "in"
src = "192.0.2.2/32"
dst = "192.0.2.1/32"
action = "protect"
sa = "in-sa"

[[policy]]
name = "last"
dir = "out"
dst = "198.51.100.0/24"
action = "discard"
"""
NEW_KEY = "c3a5e7f9" * 4 + "1b2d3f41"


class Harness:
    """A ControlServer over an unstarted Engine, pumped like Engine.run pumps it."""

    def __init__(self, tmp: Path) -> None:
        os.chmod(tmp, 0o711)  # traversable, so a non-root client reaches the socket's own checks
        self.dir = tmp / "run"
        self.path = str(self.dir / "ctl.sock")
        self.engine = Engine(parse_config(CONFIG, source="<test>"), manage_hooks=False)
        self.hook_installs = 0
        self.engine.install_hooks = self._install_hooks  # type: ignore[method-assign]
        self.server = control.ControlServer(self.path, self.engine)
        self.engine.control = self.server
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.server.fileno(), selectors.EVENT_READ, self.server)
        self.slowest = 0.0
        self.fail_hooks = False

    def _install_hooks(self) -> None:
        if self.fail_hooks:
            raise RuntimeError("iptables: simulated failure")
        self.hook_installs += 1

    def pump(self, seconds: float = 0.05, until: Any = None) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for key, _ in self.sel.select(timeout=0.005):
                t0 = time.monotonic()
                obj = key.data
                if obj is self.server:
                    self.server.handle_ready(self.sel)
                elif isinstance(obj, control.ClientConn):
                    obj.handle_ready(self.sel)
                self.slowest = max(self.slowest, time.monotonic() - t0)
            if until is not None and until():
                return

    def connect(self) -> socket.socket:
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(self.path)
        c.setblocking(False)
        self.pump(0.02)
        return c

    def call(self, c: socket.socket, raw: bytes, seconds: float = 2.0) -> list[dict[str, Any]]:
        """Send raw bytes, pump until at least one whole reply line arrived; returns the replies."""
        c.sendall(raw) if c.gettimeout() != 0.0 else _send_all_nonblocking(c, raw, self)
        got = b""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.pump(0.01)
            try:
                chunk = c.recv(1 << 20)
            except BlockingIOError:
                continue
            if not chunk:
                break
            got += chunk
            if got.endswith(b"\n"):
                break
        return [json.loads(line) for line in got.splitlines() if line.strip()]

    def state(self) -> tuple[list[str], list[str]]:
        return [s.name for s in self.engine.sad.list()], [p.name for p in self.engine.spd.list()]

    def close(self) -> None:
        self.server.close()
        self.sel.close()


def _send_all_nonblocking(c: socket.socket, data: bytes, h: Harness) -> None:
    view = memoryview(data)
    deadline = time.monotonic() + 10
    while view and time.monotonic() < deadline:
        try:
            n = c.send(view)
            view = view[n:]
        except BlockingIOError:
            h.pump(0.005)


@pytest.fixture
def h() -> Iterator[Harness]:
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="nfqctl-"))  # directly under /tmp: reachable by other users
    harness = Harness(base)
    try:
        yield harness
    finally:
        harness.close()
        shutil.rmtree(base, ignore_errors=True)


def _no_keys(blob: str) -> None:
    low = blob.lower()
    for k in (KEY_A, KEY_B, NEW_KEY):
        assert k not in low and k[:16] not in low, "key material sent back"


def test_socket_is_root_only_on_disk(h: Harness) -> None:
    assert os.stat(h.path).st_mode & 0o777 == 0o600
    assert os.stat(h.dir).st_mode & 0o777 == 0o700


def test_listing_and_stats_never_contain_keys(h: Harness) -> None:
    c = h.connect()
    out = []
    for cmd in ("ping", "stats", "sa-list", "policy-list"):
        (reply,) = h.call(c, json.dumps({"cmd": cmd}).encode() + b"\n")
        assert reply["ok"], reply
        out.append(json.dumps(reply))
    _no_keys("\n".join(out))
    assert {s["name"] for s in json.loads(out[2])["sas"]} == {"out-sa", "in-sa"}


GARBAGE = [
    b"not json at all",
    b"\xff\xfe\x00garbage\x80\x81",
    b"[1, 2, 3]",
    b'"just a string"',
    b'{"cmd": 5}',
    b'{"no_cmd": "stats"}',
    b'{"cmd": "format-disk"}',
    b'{"cmd": "sa-remove"}',
    b'{"cmd": "sa-remove", "name": ["x"]}',
    b'{"cmd": "sa-remove", "name": "no-such-sa"}',
    b'{"cmd": "policy-remove", "name": "no-such-policy"}',
    b'{"cmd": "sa-add", "toml": 42}',
    b'{"cmd": "explain", "src": "not-an-ip", "dst": "192.0.2.1"}',
    b'{"cmd": "explain", "src": "192.0.2.1", "dst": "2001:db8::1"}',
    b'{"cmd": "explain", "src": "192.0.2.1", "dst": "192.0.2.2", "sport": "eighty", "proto": "tcp"}',
    b'{"cmd": "explain", "src": "192.0.2.1", "dst": "192.0.2.2", "dir": "sideways"}',
    b"[" * 30000 + b"]" * 30000,  # nesting deep enough to exhaust the JSON parser's recursion
    b'{"cmd": "' + b"A" * 60000 + b'"}',
]


@pytest.mark.parametrize("line", GARBAGE, ids=range(len(GARBAGE)))
def test_garbage_gets_one_error_and_changes_nothing(h: Harness, line: bytes) -> None:
    before = h.state()
    c = h.connect()
    replies = h.call(c, line + b"\n")
    assert len(replies) == 1, replies
    assert replies[0]["ok"] is False and replies[0]["error"], replies
    assert "internal error" not in replies[0]["error"], replies
    assert h.state() == before
    assert h.hook_installs == 0
    # the connection is still usable
    (pong,) = h.call(c, b'{"cmd": "ping"}\n')
    assert pong["ok"] and pong["pid"] == os.getpid()
    assert h.slowest < 0.5


def test_oversized_request_without_newline_is_refused_and_the_client_dropped(h: Harness) -> None:
    c = h.connect()
    other = h.connect()
    replies = h.call(c, b"x" * (control.MAX_REQUEST * 3))
    assert replies and "too large" in replies[0]["error"]
    h.pump(0.05)
    c.setblocking(True)
    c.settimeout(1)
    try:  # closed by the engine (reset: it did not read the rest)
        assert c.recv(100) == b""
    except ConnectionResetError:
        pass
    assert len(h.server.clients) == 1
    (pong,) = h.call(other, b'{"cmd": "ping"}\n')  # others unaffected
    assert pong["ok"]


def test_oversized_line_with_newline_is_refused(h: Harness) -> None:
    c = h.connect()
    replies = h.call(c, b'{"cmd": "sa-add", "toml": "' + b"#" * (control.MAX_REQUEST + 10) + b'"}\n')
    assert replies and "too large" in replies[0]["error"]
    assert h.state()[0] == ["out-sa", "in-sa"]


def test_client_that_never_reads_cannot_stall_the_engine(h: Harness) -> None:
    """Thousands of pipelined requests whose replies are never read: every wake-up stays short,
    the client's queued replies stay bounded (it is held back, not served without end), and
    another client is served at once meanwhile."""
    greedy = h.connect()
    greedy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    polite = h.connect()
    req = b'{"cmd": "stats"}\n' * 3000 + b'{"cmd": "policy-list"}\n' * 3000
    _send_all_nonblocking(greedy, req, h)
    h.pump(0.5)
    (held,) = [c for c in h.server.clients if c.buf]
    before = (len(held.buf), len(held.outbuf))
    h.pump(0.3)
    # held back: its socket is full, so no more of its requests are served and nothing piles up
    assert (len(held.buf), len(held.outbuf)) == before
    assert b"\n" in held.buf and len(held.outbuf) <= control.BACKPRESSURE + control.MAX_REQUESTS_PER_EVENT * 65536
    t0 = time.monotonic()
    (pong,) = h.call(polite, b'{"cmd": "ping"}\n')
    assert pong["ok"] and time.monotonic() - t0 < 2.0  # generous: it must not wait for the held client
    assert h.slowest < 1.0, h.slowest
    # once it reads, it is served again: all 6,000 replies arrive
    lines = 0
    deadline = time.monotonic() + 20
    while lines < 6000 and time.monotonic() < deadline:
        h.pump(0.002)
        try:
            lines += greedy.recv(1 << 20).count(b"\n")
        except BlockingIOError:
            pass
    assert lines == 6000
    assert h.slowest < 0.25, h.slowest


def test_replies_piling_up_past_the_limit_drop_the_client(h: Harness) -> None:
    c = h.connect()
    (conn,) = h.server.clients
    big = {"ok": True, "blob": "x" * (1 << 20)}
    conn.send(big)  # a single large reply is fine even if it exceeds the limit on its own
    assert not conn.closed
    for _ in range(8):
        conn.send(big)
    assert conn.closed and conn not in h.server.clients
    assert len(conn.outbuf) <= control.MAX_OUTBUF
    c.close()


def test_connection_limit(h: Harness) -> None:
    conns = [h.connect() for _ in range(control.MAX_CLIENTS)]
    extra = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    extra.connect(h.path)
    extra.settimeout(2)
    h.pump(0.1)
    reply = json.loads(extra.recv(4096))
    assert reply["ok"] is False and "too many" in reply["error"]
    for c in conns[:5]:
        c.close()
    h.pump(0.1)
    again = h.connect()
    (pong,) = h.call(again, b'{"cmd": "ping"}\n')
    assert pong["ok"]


def _toml_sa(**over: Any) -> str:
    fields = {"name": '"new-sa"', "proto": '"esp"', "mode": '"transport"', "src": '"192.0.2.1"',
              "dst": '"192.0.2.3"', "spi": "0x00002001", "aead": '"aes-gcm-128"', "key": f'"0x{NEW_KEY}"'}
    fields.update(over)
    return "[[sa]]\n" + "\n".join(f"{k} = {v}" for k, v in fields.items() if v is not None) + "\n"


BAD_ADDS = {
    "malformed TOML": ("[[sa]\nname = ", "invalid TOML"),
    "unknown key": (_toml_sa(colour='"blue"'), "colour"),
    "unknown algorithm": (_toml_sa(aead='"aes-gcm-129"'), "aes-gcm-129"),
    "wrong key length": (_toml_sa(key=f'"0x{NEW_KEY[:-2]}"'), "19 bytes"),
    "odd-length hex": (_toml_sa(key=f'"0x{NEW_KEY[:-1]}"'), "key"),
    "duplicate SPI for the same destination": (_toml_sa(dst='"192.0.2.2"', spi="0x00001001"), "0x00001001"),
    "duplicate name": (_toml_sa(name='"out-sa"'), "out-sa"),
    "policy naming a missing SA": ('[[policy]]\nname = "p"\ndir = "out"\naction = "protect"\nsa = "ghost"\n', "ghost"),
    "address of the wrong family": (_toml_sa(dst='"2001:db8::3"'), "2001:db8::3"),
    "engine settings at run time": ("[engine]\nqueue_num = 3\n", "engine"),
    "reserved SPI": (_toml_sa(spi="7"), "reserved"),
    "policy with mixed families": ('[[policy]]\nname = "p"\ndir = "out"\nsrc = "192.0.2.0/24"\n'
                                   'dst = "2001:db8::/32"\naction = "bypass"\n', "IPv"),
}


@pytest.mark.parametrize("case", list(BAD_ADDS), ids=list(BAD_ADDS))
def test_bad_live_change_gets_a_clear_error_and_changes_nothing(h: Harness, case: str) -> None:
    text, needle = BAD_ADDS[case]
    before = h.state()
    c = h.connect()
    cmd = "policy-add" if text.startswith("[[policy") else "sa-add"
    (reply,) = h.call(c, json.dumps({"cmd": cmd, "toml": text, "source": "live.toml"}).encode() + b"\n")
    assert reply["ok"] is False, reply
    assert needle in reply["error"], reply["error"]
    assert "internal error" not in reply["error"]
    _no_keys(reply["error"])
    assert h.state() == before
    assert h.hook_installs == 0


def test_good_live_change_then_hook_failure_rolls_back(h: Harness) -> None:
    c = h.connect()
    pol = '[[policy]]\nname = "new-pol"\ndir = "out"\ndst = "192.0.2.3/32"\naction = "protect"\nsa = "new-sa"\n'
    h.fail_hooks = True
    before = h.state()
    (reply,) = h.call(c, json.dumps({"cmd": "sa-add", "toml": _toml_sa() + pol}).encode() + b"\n")
    assert reply["ok"] is False and "hooks failed, nothing changed" in reply["error"], reply
    _no_keys(reply["error"])
    assert h.state() == before
    for cmd, name in (("policy-remove", "in-pol"), ("sa-remove", "out-sa")):
        if cmd == "sa-remove":  # an SA in use cannot go; free it first (hooks working)
            h.fail_hooks = False
            (r,) = h.call(c, b'{"cmd": "policy-remove", "name": "out-pol"}\n')
            assert r["ok"], r
            h.fail_hooks = True
            before = h.state()
        (r,) = h.call(c, json.dumps({"cmd": cmd, "name": name}).encode() + b"\n")
        assert r["ok"] is False and "nothing changed" in r["error"], r
        assert h.state() == before, cmd  # back, in the same order
    h.fail_hooks = False
    (reply,) = h.call(c, json.dumps({"cmd": "sa-add", "toml": _toml_sa() + pol}).encode() + b"\n")
    assert reply["ok"], reply
    assert "new-sa" in h.state()[0] and "new-pol" in h.state()[1]


def test_internal_error_messages_never_echo_key_material(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    import nfq_ipsec.config as config

    def broken(text: str, **kw: Any) -> Any:
        raise RuntimeError(f"unexpected: {text!r} / {bytes.fromhex(NEW_KEY)!r}")

    monkeypatch.setattr(config, "parse_fragment", broken)
    c = h.connect()
    (reply,) = h.call(c, json.dumps({"cmd": "sa-add", "toml": _toml_sa()}).encode() + b"\n")
    assert reply["ok"] is False and "internal error" in reply["error"]
    assert "<redacted>" in reply["error"]
    _no_keys(reply["error"])
    assert repr(bytes.fromhex(NEW_KEY))[2:-1] not in reply["error"]


BAD_TRACE = [
    {"port": "http"}, {"port": 70000}, {"rate": "fast"}, {"rate": 0}, {"rate": True}, {"colour": "red"},
    {"proto": "tcpp"}, {"proto": [6]}, {"host": 5}, {"spi": {"x": 1}},
]


@pytest.mark.parametrize("flt", BAD_TRACE, ids=[json.dumps(f) for f in BAD_TRACE])
def test_bad_trace_filter_refused_so_the_packet_path_cannot_fail(h: Harness, flt: dict[str, Any]) -> None:
    c = h.connect()
    (reply,) = h.call(c, json.dumps({"cmd": "trace", **flt}).encode() + b"\n")
    assert reply["ok"] is False and "trace" in reply["error"], reply
    assert h.engine.tracers == []
    _publish(h, 5)  # would raise in the packet callback with the filter accepted


def _publish(h: Harness, n: int) -> None:
    from nfq_ipsec.packet import ipv4_header

    pkt = ipv4_header(bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2]), 17, 12) + b"\x00\x35\x00\x35\x00\x0c\x00\x00abcd"
    for _ in range(n):
        control.publish_trace(h.engine, 3, pkt, Decision(1, None, [], "bypass"))


def test_trace_stream_to_a_client_that_stops_reading_never_blocks(h: Harness) -> None:
    c = h.connect()
    c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    (reply,) = h.call(c, b'{"cmd": "trace", "rate": 100000, "port": 53}\n')
    assert reply["ok"]
    (reply,) = h.call(c, b'{"cmd": "trace", "rate": 100000, "port": 53}\n')  # twice: still one tracer
    assert len(h.engine.tracers) == 1
    t0 = time.monotonic()
    _publish(h, 20000)
    assert time.monotonic() - t0 < 5
    client = h.engine.tracers[0]
    assert client.trace_dropped > 0  # the socket filled up: events counted as dropped, not queued
    assert len(client.outbuf) < 4096
    # what did arrive is whole JSON lines
    data = b""
    try:
        while True:
            chunk = c.recv(1 << 16)
            if not chunk:
                break
            data += chunk
    except BlockingIOError:
        pass
    lines = data.split(b"\n")
    for line in lines[:-1]:
        json.loads(line)
    c.close()
    h.pump(0.05)
    assert h.engine.tracers == []


def test_control_socket_path_that_is_not_a_socket_is_never_replaced(tmp_path: Path) -> None:
    victim = tmp_path / "important.conf"
    victim.write_text("keep me\n")
    engine = Engine(parse_config(CONFIG, source="<test>"), manage_hooks=False)
    with pytest.raises(EngineError, match="not a socket"):
        control.ControlServer(str(victim), engine)
    assert victim.read_text() == "keep me\n"


def test_stale_socket_of_a_dead_engine_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "run" / "x.sock"
    path.parent.mkdir()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    engine = Engine(parse_config(CONFIG, source="<test>"), manage_hooks=False)
    server = control.ControlServer(str(path), engine)
    try:
        assert os.stat(path).st_mode & 0o777 == 0o600
    finally:
        server.close()
    assert not path.exists()


def _as_nobody(args: list[str]) -> subprocess.Popen[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "nfq-ipsec")
    return subprocess.Popen(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", exe, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/usr/bin/setpriv"), reason="needs root and setpriv")
def test_non_root_client_is_refused_with_a_clear_message(h: Harness) -> None:
    # as installed (0600 socket in a 0700 directory): the file system already says no
    p = _as_nobody(["stats", "--socket", h.path])
    out, err = p.communicate(timeout=30)
    assert p.returncode != 0
    assert "permission denied" in err and "root-only" in err, err
    assert "Traceback" not in err
    # even if an administrator loosens the modes, the engine checks the peer's credentials
    os.chmod(h.dir, 0o755)
    os.chmod(h.path, 0o666)
    p = _as_nobody(["sa", "list", "--socket", h.path])
    deadline = time.monotonic() + 30
    while p.poll() is None and time.monotonic() < deadline:
        h.pump(0.02)
    out, err = p.communicate(timeout=5)
    assert p.returncode != 0
    assert "permission denied: the control socket is root-only (uid 65534)" in err, (p.returncode, out, err)
    assert "Traceback" not in err
    assert h.server.clients == set()


class _EndlessQueue:
    """A queue that always has a full batch waiting (sustained overload) for `busy` seconds."""

    def __init__(self, busy: float) -> None:
        self.rfd, self.wfd = os.pipe()
        os.write(self.wfd, b"x")  # always readable
        self.until = time.monotonic() + busy
        self.queue_num = 0
        self.calls = 0

    def fileno(self) -> int:
        return self.rfd

    def process(self, cb: Any, max_packets: int = 64) -> int:
        self.calls += 1
        time.sleep(0.0002)  # the work of a batch
        return max_packets if time.monotonic() < self.until else 0

    def stats(self) -> dict[str, int]:
        return {}

    def close(self) -> None:
        os.close(self.rfd)
        os.close(self.wfd)


def test_engine_loop_keeps_serving_control_and_stop_under_sustained_overload(tmp_path: Path) -> None:
    import threading

    engine = Engine(parse_config(CONFIG, source="<test>"), manage_hooks=False)
    q = _EndlessQueue(busy=12.0)  # far longer than the bounds below, so the bug cannot pass them
    engine.queues = [q]
    engine.control = control.ControlServer(str(tmp_path / "run" / "e.sock"), engine)
    answered: list[float] = []

    def client() -> None:
        time.sleep(0.2)
        t0 = time.monotonic()
        c = control.ControlClient(engine.control.path.as_posix(), timeout=10)  # type: ignore[union-attr]
        c.call("ping")
        answered.append(time.monotonic() - t0)
        c.close()
        time.sleep(0.1)
        engine.request_stop()

    t = threading.Thread(target=client, daemon=True)
    t0 = time.monotonic()
    t.start()
    try:
        engine.run()
    finally:
        ran = time.monotonic() - t0
        t.join(10)
        engine.shutdown()
    assert answered and answered[0] < 4.0, answered
    assert ran < 6.0, ran  # stopped soon after request_stop, not when the load ended
