"""The root-only control socket: list SAs and policies, counters, live changes, trace.

Protocol: newline-delimited JSON over a Unix stream socket. A request is one object
`{"cmd": ..., ...}` (at most 64 KiB); the reply is one object `{"ok": true, ...}` or
`{"ok": false, "error": "..."}`. `trace` turns the connection into a stream of events.
The socket file is mode 0600 in a 0700 directory, and the peer's credentials are checked
(SO_PEERCRED): only root may talk to the engine. Nothing sent back ever contains keys.

The engine is single-threaded, so no client may stall it: sockets never block; replies are
queued per connection and a client's further requests wait while its socket is full or
`BACKPRESSURE` bytes are queued (a client that lets more than `MAX_OUTBUF` pile up is
dropped); at most `MAX_REQUESTS_PER_EVENT` requests are served per wake-up; at most
`MAX_CLIENTS` connections are open; a line longer than `MAX_REQUEST` is refused. A bad
request gets one error reply and changes nothing (live changes are all or nothing, hooks
included); trace filters are validated when given, so a bad one can never fail the packet
path; error messages never echo long hex strings of the request (key material).
"""

from __future__ import annotations

import json
import os
import re
import selectors
import socket
import stat
import struct
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .engine import Engine
    from .pipeline import Decision

MAX_REQUEST = 64 * 1024
MAX_OUTBUF = 4 * 1024 * 1024
MAX_CLIENTS = 32
MAX_REQUESTS_PER_EVENT = 16
BACKPRESSURE = 256 * 1024  # queued reply bytes above which a client's further requests wait
TRACE_KEYS = {"hook", "verdict", "sa", "policy", "spi", "host", "proto", "port", "rate"}


class ControlError(Exception):
    pass


class ControlServer:
    def __init__(self, path: str, engine: Engine) -> None:
        self.path = Path(path)
        self.engine = engine
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            pass
        else:
            if not (stat.S_ISSOCK(st.st_mode) or stat.S_ISLNK(st.st_mode)):
                from .engine import EngineError

                raise EngineError(f"control socket path {self.path} exists and is not a socket; "
                                  "refusing to replace it (check [engine] control_socket)")
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
        try:
            uid = _peer_uid(conn)
        except OSError:
            uid = -1
        error = None
        if uid != 0:
            error = f"permission denied: the control socket is root-only (uid {uid})"
        elif len(self.clients) >= MAX_CLIENTS:
            error = f"too many control connections (limit {MAX_CLIENTS}); try again later"
        if error is not None:
            try:
                conn.send(_encode({"ok": False, "error": error}))
            except OSError:
                pass
            conn.close()
            return
        c = ClientConn(conn, self, sel)
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
    """One root client: buffered input, a bounded queue of replies, never blocking the engine."""

    def __init__(self, sock: socket.socket, server: ControlServer, sel: selectors.BaseSelector | None = None) -> None:
        self.sock = sock
        self.server = server
        self.sel = sel
        self.buf = b""
        self.outbuf = bytearray()
        self.closed = False
        self.closing = False  # close once the queued replies are sent
        self.events = selectors.EVENT_READ
        self.trace_filter: dict[str, Any] | None = None
        self.trace_sent = 0
        self.trace_dropped = 0
        self.trace_window = (0.0, 0)

    def handle_ready(self, sel: selectors.BaseSelector) -> None:
        """Called by the engine loop when the socket is readable (or writable, while replies wait)."""
        self.sel = sel
        self._flush()
        if self.closed:
            return
        if not self.closing and b"\n" not in self.buf and len(self.outbuf) < BACKPRESSURE:
            try:
                data = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError:
                data = b""
            if data == b"":
                self._unregister(sel)
                return
            if data:
                self.buf += data
        served = 0
        while (not self.closing and served < MAX_REQUESTS_PER_EVENT and len(self.outbuf) < BACKPRESSURE
               and b"\n" in self.buf):
            line, self.buf = self.buf.split(b"\n", 1)
            if not line.strip():
                continue
            served += 1
            if len(line) > MAX_REQUEST:
                self.send({"ok": False, "error": f"request too large (limit {MAX_REQUEST} bytes)"})
                continue
            self.send(self.dispatch(line))
        if len(self.buf) > MAX_REQUEST and b"\n" not in self.buf:
            self.send({"ok": False, "error": f"request too large (limit {MAX_REQUEST} bytes)"})
            self.buf = b""
            self.closing = True
        self._update(sel)

    def dispatch(self, line: bytes) -> dict[str, Any]:
        req: Any = None
        try:
            req = json.loads(line)
            if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
                raise ControlError('a request is a JSON object with a "cmd" string')
            return {"ok": True, **handle_command(self.server.engine, req, self)}
        except ControlError as e:
            return {"ok": False, "error": _redact(str(e), req)}
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            return {"ok": False, "error": _redact(f"bad request: {e}", req)}
        except Exception as e:  # never let a client take the engine down
            return {"ok": False, "error": _redact(f"internal error: {type(e).__name__}: {e}", req)}

    def send(self, obj: Any) -> None:
        """Queue a reply (sent as the socket accepts it); a client that stops reading is dropped."""
        if self.closed:
            return
        data = _encode(obj)
        if self.outbuf and len(self.outbuf) + len(data) > MAX_OUTBUF:  # one large reply alone is fine
            self._drop()
            return
        self.outbuf += data
        self._flush()

    def send_nowait(self, obj: Any) -> bool:
        """A trace event: sent now or not at all (counted by the caller), never queued behind replies."""
        if self.closed or self.outbuf:
            return False
        data = _encode(obj)
        try:
            n = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            self._drop()
            return False
        if n < len(data):  # keep the stream line-aligned: the rest goes out before anything else
            self.outbuf += data[n:]
            self._update(self.sel)
        return True

    def _flush(self) -> None:
        while self.outbuf and not self.closed:
            try:
                n = self.sock.send(self.outbuf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._drop()
                return
            del self.outbuf[:n]
        if self.closing and not self.outbuf and not self.closed:
            self._drop()

    def _update(self, sel: selectors.BaseSelector | None) -> None:
        """Readable: wanted unless replies or unserved requests are waiting. Writable: while they are
        (a writable socket is also what wakes us to serve the requests still buffered)."""
        if self.closed or sel is None:
            return
        pending = bool(self.outbuf) or (b"\n" in self.buf and not self.closing)
        events = selectors.EVENT_WRITE if pending else selectors.EVENT_READ
        if events != self.events:
            try:
                sel.modify(self.sock, events, self)
                self.events = events
            except (KeyError, ValueError, OSError):
                pass

    def _drop(self) -> None:
        if self.sel is not None:
            self._unregister(self.sel)
        else:
            self.close()

    def _unregister(self, sel: selectors.BaseSelector) -> None:
        try:
            sel.unregister(self.sock)
        except (KeyError, ValueError, OSError):
            pass
        self.close()

    def close(self) -> None:
        self.closed = True
        self.server.clients.discard(self)
        while self in self.server.engine.tracers:
            self.server.engine.tracers.remove(self)
        try:
            self.sock.close()
        except OSError:
            pass


_HEX_RUN = re.compile(r"(?:0x)?([0-9a-fA-F]{16,})")


def _redact(message: str, req: Any) -> str:
    """Defence in depth: no long hex string of the request (key material) is ever echoed back."""
    if not isinstance(req, dict):
        return message
    for v in req.values():
        if isinstance(v, str):
            for m in _HEX_RUN.finditer(v):
                h = m.group(1)
                message = message.replace(h, "<redacted>").replace(h.lower(), "<redacted>")
                if len(h) % 2 == 0:
                    message = message.replace(repr(bytes.fromhex(h))[2:-1], "<redacted>")
    return message


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
        sas = engine.sad.list()
        try:
            engine.sad.remove(name)
        except KeyError:
            raise ControlError(f"no SA named {name!r}") from None
        _reinstall_hooks(engine, lambda: _restore(engine.sad, sas))
        return {"removed": name}
    if cmd == "policy-remove":
        name = _str_arg(req, "name")
        policies = engine.spd.list()
        try:
            engine.spd.remove(name)
        except KeyError:
            raise ControlError(f"no policy named {name!r}") from None
        _reinstall_hooks(engine, lambda: _restore(engine.spd, policies))
        return {"removed": name}
    if cmd in ("sa-add", "policy-add"):
        return _add(engine, cmd, _str_arg(req, "toml"), str(req.get("source") or "<control>"), req.get("base_dir"))
    if cmd == "explain":
        return {"explain": explain(engine.spd, req, engine.sad)}
    if cmd == "trace":
        if client is None:
            raise ControlError("trace needs a connection")
        client.trace_filter = _trace_filter(req)
        if client not in engine.tracers:
            engine.tracers.append(client)
        return {"tracing": True}
    raise ControlError(f"unknown command {cmd!r} (try: stats, sa-list, policy-list, sa-add, sa-remove, "
                       "policy-add, policy-remove, explain, trace)")


def _reinstall_hooks(engine: Engine, undo: Any) -> None:
    """Update the hooks after a change; if that fails, undo the change (hooks.install rolls back its own)."""
    try:
        engine.install_hooks()
    except Exception as e:
        undo()
        raise ControlError(f"updating the iptables hooks failed, nothing changed: {e}") from None


def _restore(table: Any, order: list[Any]) -> None:
    """Put the SAD or SPD back exactly as it was, order included (ties in the SPD go by insertion)."""
    for item in table.list():
        table.remove(item.name)
    for item in order:
        table.add(item)


def _trace_filter(req: dict[str, Any]) -> dict[str, Any]:
    """Check a trace filter now, so matching it per packet cannot fail."""
    flt = {k: v for k, v in req.items() if k != "cmd" and v is not None}
    unknown = sorted(set(flt) - TRACE_KEYS)
    if unknown:
        raise ControlError(f"trace: unknown filter {', '.join(map(repr, unknown))} "
                           f"(known: {', '.join(sorted(TRACE_KEYS))})")
    for key in ("port", "rate"):
        if key in flt:
            v = flt[key]
            lo, hi = (0, 65535) if key == "port" else (1, 100_000)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise ControlError(f"trace: {key} must be an integer in {lo}..{hi}, got {v!r}")
    for key in ("hook", "verdict", "sa", "policy", "spi", "host"):
        if key in flt and not isinstance(flt[key], str):
            raise ControlError(f"trace: {key} must be a string, got {type(flt[key]).__name__}")
    if "proto" in flt:
        from .explain import parse_proto

        v = flt["proto"]
        if isinstance(v, bool) or not isinstance(v, (str, int)):
            raise ControlError(f"trace: proto must be a name or number, got {type(v).__name__}")
        try:
            parse_proto(v)
        except ValueError as e:
            raise ControlError(f"trace: {e}") from None
    return flt


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
    except Exception as e:  # all or nothing (a failed hooks.install rolled its own change back)
        for item in reversed(added):
            kind, name = item.split(":", 1)
            (engine.sad if kind == "sa" else engine.spd).remove(name)
        if isinstance(e, (ValueError, KeyError)):
            raise ControlError(str(e).strip("'\"")) from None
        raise ControlError(f"updating the iptables hooks failed, nothing changed: {e}") from None
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


def explain(spd: Any, req: dict[str, Any], sad: Any = None) -> dict[str, Any]:
    """Which policy a described packet matches, in which direction, and why earlier ones did not."""
    from .explain import explain_flow

    return explain_flow(spd, req, sad)


def publish_trace(engine: Engine, hook: int, payload: bytes, d: Decision) -> None:
    from .explain import trace_event, trace_matches

    ev = trace_event(hook, payload, d)
    now = time.monotonic()
    for c in list(engine.tracers):
        try:
            if c.trace_filter and not trace_matches(ev, c.trace_filter):
                continue
        except Exception:  # filters are validated by _trace_filter; never fail the packet path
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
            raise ControlError(f"no engine is running with control socket {path} "
                               "(is `nfq-ipsec run` started?)") from None
        except PermissionError:
            raise ControlError(f"permission denied on {path}: the control socket is root-only") from None
        except ConnectionRefusedError:
            raise ControlError(f"control socket {path} exists but no engine answers "
                               "(stale; the engine died?)") from None
        self.file = self.sock.makefile("rb")

    def call(self, cmd: str, **kw: Any) -> dict[str, Any]:
        try:
            self.sock.sendall(_encode({"cmd": cmd, **kw}))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the engine refused the connection at once: its reason is waiting to be read
        try:
            line = self.file.readline()
        except ConnectionResetError:
            line = b""
        except TimeoutError:
            raise ControlError(f"the engine did not answer {cmd!r} in time") from None
        if not line:
            raise ControlError("the engine closed the connection")
        try:
            reply = json.loads(line)
        except ValueError:
            raise ControlError("the engine sent a reply that is not JSON") from None
        if not isinstance(reply, dict):
            raise ControlError("the engine sent a reply that is not a JSON object")
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
