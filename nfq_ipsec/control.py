"""The root-only control socket: list SAs and policies, counters, live changes, trace.

Protocol: newline-delimited JSON over a Unix stream socket. A request is one object
`{"cmd": ..., ...}` (at most 64 KiB); the reply is one object `{"ok": true, ...}` or
`{"ok": false, "error": "..."}`. `trace` turns the connection into a stream of events.
The socket file is mode 0600 in a 0700 directory, and the peer's credentials are checked
(SO_PEERCRED): only root may talk to the engine. Nothing sent back ever contains keys.
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import struct
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .engine import Engine
    from .pipeline import Decision

MAX_REQUEST = 64 * 1024
MAX_OUTBUF = 4 * 1024 * 1024


class ControlError(Exception):
    pass


class ControlServer:
    def __init__(self, path: str, engine: Engine) -> None:
        self.path = Path(path)
        self.engine = engine
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.path.exists() or self.path.is_symlink():
            self.path.unlink()  # stale socket of a dead engine (the engine lock guarantees it is not live)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            self.sock.bind(str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        self.sock.listen(16)
        self.sock.setblocking(False)
        self.clients: set[ClientConn] = set()

    def fileno(self) -> int:
        return self.sock.fileno()

    def handle_ready(self, sel: selectors.BaseSelector) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        conn.setblocking(False)
        uid = _peer_uid(conn)
        if uid != 0:
            try:
                conn.send(_encode({"ok": False, "error": f"permission denied: the control socket is root-only (uid {uid})"}))
            except OSError:
                pass
            conn.close()
            return
        c = ClientConn(conn, self)
        self.clients.add(c)
        sel.register(conn, selectors.EVENT_READ, c)

    def close(self) -> None:
        for c in list(self.clients):
            c.close()
        self.sock.close()
        try:
            self.path.unlink()
        except OSError:
            pass


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def _encode(obj: Any) -> bytes:
    return (json.dumps(obj, default=str) + "\n").encode()


class ClientConn:
    def __init__(self, sock: socket.socket, server: ControlServer) -> None:
        self.sock = sock
        self.server = server
        self.buf = b""
        self.trace_filter: dict[str, Any] | None = None
        self.trace_sent = 0
        self.trace_dropped = 0
        self.trace_window = (0.0, 0)

    def handle_ready(self, sel: selectors.BaseSelector) -> None:
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._unregister(sel)
            return
        self.buf += data
        if len(self.buf) > MAX_REQUEST and b"\n" not in self.buf:
            self.send({"ok": False, "error": f"request too large (limit {MAX_REQUEST} bytes)"})
            self._unregister(sel)
            return
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            if not line.strip():
                continue
            self.send(self.dispatch(line))

    def dispatch(self, line: bytes) -> dict[str, Any]:
        try:
            req = json.loads(line)
            if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
                raise ControlError('a request is a JSON object with a "cmd" string')
            return {"ok": True, **handle_command(self.server.engine, req, self)}
        except (ValueError, UnicodeDecodeError) as e:
            return {"ok": False, "error": f"bad request: {e}"}
        except ControlError as e:
            return {"ok": False, "error": str(e)}
        except Exception as e:  # never let a client take the engine down
            return {"ok": False, "error": f"internal error: {type(e).__name__}: {e}"}

    def send(self, obj: Any) -> None:
        data = _encode(obj)
        try:
            self.sock.setblocking(True)
            self.sock.settimeout(1.0)
            self.sock.sendall(data)
        except OSError:
            pass
        finally:
            try:
                self.sock.setblocking(False)
            except OSError:
                pass

    def send_nowait(self, obj: Any) -> bool:
        try:
            self.sock.send(_encode(obj))
            return True
        except OSError:
            return False

    def _unregister(self, sel: selectors.BaseSelector) -> None:
        try:
            sel.unregister(self.sock)
        except (KeyError, ValueError):
            pass
        self.close()

    def close(self) -> None:
        self.server.clients.discard(self)
        if self in self.server.engine.tracers:
            self.server.engine.tracers.remove(self)
        try:
            self.sock.close()
        except OSError:
            pass


def handle_command(engine: Engine, req: dict[str, Any], client: ClientConn | None = None) -> dict[str, Any]:
    cmd = req["cmd"]
    if cmd == "ping":
        return {"pid": os.getpid()}
    if cmd == "stats":
        return {"stats": engine.stats()}
    if cmd == "sa-list":
        return {"sas": [sa.describe() for sa in engine.sad.list()]}
    if cmd == "policy-list":
        return {"policies": [_policy_dict(p) for p in engine.spd.list()]}
    if cmd == "sa-remove":
        name = _str_arg(req, "name")
        users = [p.name for p in engine.spd.policies_for_sa(name)]
        if users:
            raise ControlError(f"SA {name!r} is used by policies {', '.join(users)}; remove them first")
        try:
            engine.sad.remove(name)
        except KeyError:
            raise ControlError(f"no SA named {name!r}") from None
        engine.install_hooks()
        return {"removed": name}
    if cmd == "policy-remove":
        name = _str_arg(req, "name")
        try:
            engine.spd.remove(name)
        except KeyError:
            raise ControlError(f"no policy named {name!r}") from None
        engine.install_hooks()
        return {"removed": name}
    if cmd in ("sa-add", "policy-add"):
        return _add(engine, cmd, _str_arg(req, "toml"), str(req.get("source") or "<control>"), req.get("base_dir"))
    if cmd == "explain":
        return {"explain": explain(engine.spd, req)}
    if cmd == "trace":
        if client is None:
            raise ControlError("trace needs a connection")
        client.trace_filter = {k: v for k, v in req.items() if k != "cmd"}
        engine.tracers.append(client)
        return {"tracing": True}
    raise ControlError(f"unknown command {cmd!r} (try: stats, sa-list, policy-list, sa-add, sa-remove, "
                       "policy-add, policy-remove, explain, trace)")


def _str_arg(req: dict[str, Any], key: str) -> str:
    v = req.get(key)
    if not isinstance(v, str) or not v:
        raise ControlError(f"{req['cmd']} needs a {key!r} string")
    return v


def _add(engine: Engine, cmd: str, text: str, source: str = "<control>", base_dir: Any = None) -> dict[str, Any]:
    from .config import parse_fragment
    from .errors import ConfigError

    try:
        sas, policies = parse_fragment(text, known_sas={sa.name: sa for sa in engine.sad.list()}, source=source,
                                       known_policies={p.name for p in engine.spd.list()},
                                       base_dir=base_dir if isinstance(base_dir, str) else None)
    except ConfigError as e:
        raise ControlError(str(e)) from None
    added: list[str] = []
    try:
        for sa in sas:
            sa.on_event = engine._on_sa_event
            engine.sad.add(sa)
            added.append("sa:" + sa.name)
        for p in policies:
            if p.sa is not None and engine.sad.get(p.sa) is None:
                raise ValueError(f"policy {p.name} names SA {p.sa!r}, which does not exist")
            engine.spd.add(p)
            added.append("policy:" + p.name)
        engine.install_hooks()
    except (ValueError, KeyError) as e:
        for item in reversed(added):  # all or nothing
            kind, name = item.split(":", 1)
            (engine.sad if kind == "sa" else engine.spd).remove(name)
        raise ControlError(str(e)) from None
    return {"added": added}


def _policy_dict(p: Any) -> dict[str, Any]:
    sel = p.selector
    return {
        "name": p.name,
        "dir": p.dir.value,
        "action": p.action.value,
        "sa": p.sa,
        "priority": p.priority,
        "src": str(sel.src) if sel.src is not None else "any",
        "dst": str(sel.dst) if sel.dst is not None else "any",
        "proto": sel.proto if sel.proto is not None else "any",
        "sport": list(sel.sport) if sel.sport else None,
        "dport": list(sel.dport) if sel.dport else None,
        "icmp_type": sel.icmp_type,
        "icmp_code": sel.icmp_code,
        "counters": p.counters.as_dict(),
    }


def explain(spd: Any, req: dict[str, Any]) -> dict[str, Any]:
    """Which policy a described packet matches, in which direction, and why earlier ones did not."""
    from .explain import explain_flow

    return explain_flow(spd, req)


def publish_trace(engine: Engine, hook: int, payload: bytes, d: Decision) -> None:
    from .explain import trace_event, trace_matches

    ev = trace_event(hook, payload, d)
    now = time.monotonic()
    for c in list(engine.tracers):
        if c.trace_filter and not trace_matches(ev, c.trace_filter):
            continue
        start, n = c.trace_window
        if now - start >= 1.0:
            if c.trace_dropped:
                c.send_nowait({"suppressed": c.trace_dropped})
                c.trace_dropped = 0
            c.trace_window = (now, 0)
            start, n = now, 0
        rate = int(c.trace_filter.get("rate", 100)) if c.trace_filter else 100
        if n >= rate:
            c.trace_dropped += 1
            continue
        c.trace_window = (start, n + 1)
        if not c.send_nowait(ev):
            c.trace_dropped += 1


class ControlClient:
    """Talks to a running engine (used by the CLI)."""

    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except FileNotFoundError:
            raise ControlError(f"no engine is running with control socket {path} (is `nfq-ipsec run` started?)") from None
        except PermissionError:
            raise ControlError(f"permission denied on {path}: the control socket is root-only") from None
        except ConnectionRefusedError:
            raise ControlError(f"control socket {path} exists but no engine answers (stale; the engine died?)") from None
        self.file = self.sock.makefile("rb")

    def call(self, cmd: str, **kw: Any) -> dict[str, Any]:
        self.sock.sendall(_encode({"cmd": cmd, **kw}))
        line = self.file.readline()
        if not line:
            raise ControlError("the engine closed the connection")
        reply: dict[str, Any] = json.loads(line)
        if not reply.get("ok"):
            raise ControlError(str(reply.get("error", "unknown error")))
        return reply

    def stream(self) -> Any:
        self.sock.settimeout(None)
        for line in self.file:
            yield json.loads(line)

    def close(self) -> None:
        self.file.close()
        self.sock.close()
