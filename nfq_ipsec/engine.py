"""The running engine: NFQUEUE in, pipeline decisions, verdicts and side effects out.

One process, one thread, one `selectors` loop over the queue socket(s) and the control
socket. Start-up order matters for fail-closed operation: the queue is bound and every
resource is ready *before* the iptables hooks are installed, and on any start-up error
whatever was installed is removed again. On SIGTERM/SIGINT the hooks are removed, then the
queue and the control socket are closed.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import selectors
import signal
import time
from pathlib import Path
from types import FrameType
from typing import Any

from . import control, hooks
from ._espcore import KIND_INNER, KIND_INPUT_SA, FastPath
from .config import Config
from .counters import Counters
from .icmp import RateLimiter
from .kernelio import LocalAddresses, PathMtu, RawSender, TunDevice
from .pipeline import HOOK_INPUT, AuditLog, FlowHint, InjectTunnel, Pipeline, SendIcmp, SendPacket
from .sa import SaEvent
from .sad import Sad
from .spd import Spd

log = logging.getLogger("nfq_ipsec")

BATCH = 64
LOOP_BUDGET = 0.05  # seconds spent on one queue before looking at the other file descriptors again
POLL_INTERVAL = 0.5  # seconds between lifetime polls; the fast path relearns its flows as often


class EngineError(Exception):
    """Start-up failed; the message says why and what to do."""


class EngineLock:
    """One engine (or supervisor of workers) per control socket: an flock on `<socket>.lock`,
    which also records the holder's pid for the refusal message."""

    def __init__(self, control_socket: str) -> None:
        sock = Path(control_socket)
        sock.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = sock.with_suffix(".lock")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            other = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise EngineError(
                    f"another nfq-ipsec engine (pid {other}) is already running with control socket {sock}; "
                    "stop it first (or give this one another [engine] control_socket)"
                ) from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def close_inherited(self) -> None:
        """In a forked child: drop our copy of the descriptor; the parent keeps the lock."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def release(self) -> None:
        if self.fd >= 0:
            try:
                os.unlink(self.path)
            except OSError:
                pass
            os.close(self.fd)
            self.fd = -1


class Engine:
    def __init__(self, config: Config, config_path: str | None = None, *, queue_nums: list[int] | None = None,
                 manage_hooks: bool = True, worker_of: Any = None) -> None:
        """queue_nums: the NFQUEUE numbers this process binds (default: all workers' queues).
        manage_hooks: install/remove the iptables hooks (a supervisor of several worker
        processes does it once for all of them). worker_of: SA name → worker index, used
        to pin each SA's traffic to one queue (one sequence-number space per SA)."""
        self.queue_nums = queue_nums
        self.manage_hooks = manage_hooks
        self.worker_of = worker_of
        self.config = config
        self.settings = config.engine
        self.config_path = config_path
        self.counters = Counters()
        self.sad = Sad()
        self.spd = Spd(self._default_actions())
        for sa in config.sas:
            sa.on_event = self._on_sa_event
            self.sad.add(sa)
        for pol in config.policies:
            self.spd.add(pol)
        self.audit = AuditLog(lambda line: log.warning("%s", line), rate=float(self.settings.audit_rate),
                              burst=int(self.settings.audit_burst))
        self._icmp_limiter = RateLimiter(float(self.settings.icmp_rate), int(self.settings.icmp_burst))
        self.path_mtu = PathMtu()
        self.local = LocalAddresses()
        self.tracers: list[Any] = []
        self.pipeline = Pipeline(
            self.spd,
            self.sad,
            self.counters,
            is_local=self.local,
            path_mtu=self.path_mtu,
            icmp_allow=self._icmp_limiter.allow,
            audit=self.audit,
        )
        self.queues: list[Any] = []
        self.tun: TunDevice | None = None
        self.raw: RawSender | None = None
        self.fast: FastPath | None = None
        self._fast_state: tuple[int, int, bool] = (-1, -1, False)
        self.tun_ifindex = -1
        self.control: control.ControlServer | None = None
        self._lock: EngineLock | None = None
        self._stop = False
        self._hooks_installed = False
        self.started = time.time()
        self.events: list[dict[str, Any]] = []

    def _default_actions(self) -> Any:
        return self.settings.default_actions()

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        try:
            self._lock = EngineLock(self.settings.control_socket)
            self.raw = RawSender(self.settings.mark)
            self.tun = TunDevice(self.settings.tunnel_device)
            self.tun_ifindex = self.tun.ifindex
            from .nfqueue import NfQueue

            nums = self.queue_nums
            if nums is None:
                nums = [self.settings.queue_num + w for w in range(max(1, int(self.settings.workers)))]
            for qn in nums:
                try:
                    # one verdict sendto() per batch: safe, as every protected packet gets a DROP verdict and
                    # its ESP leaves through the raw socket at once, so ESP order never depends on verdicts
                    self.queues.append(NfQueue(qn, fail_open=self.settings.fail_open, batch_verdicts=True))
                except OSError as e:
                    raise EngineError(f"cannot bind NFQUEUE {qn}: {e}") from None
            if self.settings.fast_path:
                # flows the pipeline has decided once are handled in C from then on (see _learn)
                self.fast = FastPath(self.raw.ip4.fileno(), self.tun.fd, self.tun_ifindex)
                self.fast.on_drop = self.counters.inc  # replays and forgeries it drops count as in Python
                for q in self.queues:
                    q.fastpath = self.fast
                self.pipeline.learn = True
            self.control = control.ControlServer(self.settings.control_socket, self)
            if self.manage_hooks:
                self.install_hooks()
        except BaseException:
            self.shutdown()
            raise

    def install_hooks(self) -> None:
        if not self.manage_hooks:
            return
        plan = hooks.plan(self.settings, self.spd, self.sad, self.worker_of or (lambda sa: 0))
        hooks.install(plan)
        self._hooks_installed = True

    def shutdown(self) -> None:
        """Undo everything start() did, in reverse order; safe to call more than once."""
        if self._hooks_installed:
            try:
                hooks.remove(self.settings.chain_prefix)
            except Exception as e:  # report, keep tearing down
                log.error("removing iptables hooks failed: %s (run `nfq-ipsec hooks remove`)", e)
            self._hooks_installed = False
        for q in self.queues:
            try:
                q.close()
            except Exception:
                pass
        self.queues = []
        if self.fast is not None:
            self.fast.clear()
            self.fast = None
            self.pipeline.learn = False
        if self.control is not None:
            self.control.close()
            self.control = None
        if self.tun is not None:
            self.tun.close()
            self.tun = None
        if self.raw is not None:
            self.raw.close()
            self.raw = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def request_stop(self, signum: int = 0, frame: FrameType | None = None) -> None:
        self._stop = True

    # -- main loop ---------------------------------------------------------------------------
    def run(self) -> None:
        """Process packets until SIGTERM/SIGINT (or request_stop)."""
        sel = selectors.DefaultSelector()
        for q in self.queues:
            sel.register(q.fileno(), selectors.EVENT_READ, q)
        if self.control is not None:
            sel.register(self.control.fileno(), selectors.EVENT_READ, self.control)
        old = {s: signal.signal(s, self.request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
        cb = self._on_packet
        next_poll = 0.0
        try:
            while not self._stop:
                now = time.monotonic()
                if now >= next_poll:
                    # time-based lifetimes expire even when no packet uses the SA
                    for sa in self.sad.list():
                        sa.poll_expiry()
                    next_poll = now + POLL_INTERVAL
                    self._fast_sync(relearn=True)
                for key, _ in sel.select(timeout=POLL_INTERVAL):
                    obj = key.data
                    if obj is self.control:
                        self.control.handle_ready(sel)
                        self._fast_sync()
                    elif isinstance(obj, control.ClientConn):
                        obj.handle_ready(sel)
                        self._fast_sync()
                    else:
                        try:
                            # bounded: under sustained overload the queue never runs dry, and the
                            # control socket, signals and lifetime polling must still get their turn
                            budget = time.monotonic() + LOOP_BUDGET
                            while (obj.process(cb, BATCH) == BATCH and not self._stop
                                   and time.monotonic() < budget):
                                pass
                        except Exception as e:  # the binding already dropped that packet (fail closed)
                            self.counters.inc("NfqEngineError")
                            self.audit(f"packet handler error: {type(e).__name__}: {e}")
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            sel.close()

    def _on_packet(self, payload: bytes, hook: int, indev: int, outdev: int, mark: int) -> int | tuple[int, bytes]:
        d = self.pipeline.process(hook, payload, indev == self.tun_ifindex)
        if d.actions:
            self._execute(d.actions)
        if d.hint is not None:
            self._learn(d.hint)
        if self.tracers:
            control.publish_trace(self, hook, payload, d)
        if d.payload is not None:
            return (d.verdict, d.payload)
        return d.verdict

    def _execute(self, actions: list[Any]) -> None:
        raw, tun = self.raw, self.tun
        for a in actions:
            kind = type(a)
            if kind is SendPacket:
                if raw is not None:
                    for p in a.packets:
                        raw.send_ip(a.family, p, a.dst)
            elif kind is InjectTunnel:
                if tun is not None:
                    tun.write(a.packet)
            elif isinstance(a, SendIcmp) and raw is not None:
                raw.send_icmp(a.family, a.dst, a.message)

    def _learn(self, h: FlowHint) -> None:
        """Teach the fast path a decision (only after the pipeline has carried it out once)."""
        fast, core = self.fast, h.sa.core
        if fast is None or core is None:
            return
        counters = tuple(p.counters for p in h.policies)
        if h.hook == HOOK_INPUT:
            fast.learn(KIND_INPUT_SA, 50, h.sa.spi, h.outer, core, (), 0)
            fast.learn(KIND_INNER, h.proto, h.sa.spi, h.flow, core, counters, 0)
        else:
            fast.learn(h.hook, h.proto, 0, h.flow, core, counters, h.max_len)

    def _fast_sync(self, relearn: bool = False) -> None:
        """Keep the fast path's flows true: forget them when the SPD or the SAD changed (control
        socket), and every POLL_INTERVAL anyway (path MTU, local addresses, time lifetimes move
        without telling us); off while packets are being traced (tracing sees every packet)."""
        fast = self.fast
        if fast is None:
            return
        state = (self.spd.generation, self.sad.generation, bool(self.tracers))
        if relearn or state != self._fast_state:
            fast.clear()
            self._fast_state = state
        fast.enabled = not self.tracers

    def _on_sa_event(self, ev: SaEvent) -> None:
        log.warning("SA %s: %s (%s)", ev.sa, ev.kind, ev.reason)
        self.events.append({"time": time.time(), "sa": ev.sa, "kind": ev.kind, "reason": ev.reason})
        del self.events[:-100]

    # -- introspection (control socket) ------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        from .nfqueue import kernel_queue_stats

        queues = []
        for q in self.queues:
            entry: dict[str, Any] = {"queue": q.queue_num, **q.stats()}
            k = kernel_queue_stats(q.queue_num)
            if k is not None:
                entry["kernel"] = k
            queues.append(entry)
        fast = self.fast.stats() if self.fast is not None else {}
        return {
            "uptime": round(time.time() - self.started, 3),
            "counters": self.counters.snapshot(),
            "sas": {sa.name: sa.counters.as_dict() for sa in self.sad.list()},
            "policies": {p.name: p.counters.as_dict() for p in self.spd.list()},
            "queues": queues,
            "send_errors": (self.raw.errors if self.raw else 0) + fast.get("send_errors", 0),
            "tunnel_drops": (self.tun.drops if self.tun else 0) + fast.get("tun_errors", 0),
            "fast_path": {"enabled": self.fast is not None, "packets": fast.get("packets", 0),
                          "dropped": fast.get("dropped", 0), "flows": fast.get("flows", 0)},
            "audit_suppressed": self.audit.suppressed,
            "events": list(self.events),
        }
