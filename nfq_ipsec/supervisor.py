"""Several engine processes, one NFQUEUE queue each, with every SA pinned to one of them.

One Python process saturates one core; ``[engine] workers = N`` runs N engine processes so
traffic of different SAs is handled on different cores. Each SA must keep *one* sequence-number
space and *one* replay window, so an SA can only ever be handled by one process: the hooks send
each protect policy's traffic to the queue of the worker owning its SA, and each inbound SA's SPI
to its worker's queue (``hooks.plan(..., worker_of)``). Everything else -- bypass and discard
policies, SAD misses, the default catch-alls -- goes to worker 0. ``--queue-balance`` would not
do: it hashes addresses and protocol, so one tunnel (two gateway addresses) lands on one queue,
and two tunnels between the same gateways may land on the same one.

The supervisor (this module's `run_workers`) is the parent process:

* assigns SAs to workers (`assign_workers`: outbound SAs round-robin in configuration order,
  inbound SAs the same, so both directions spread; SAs added later go by a hash of their name);
* forks one worker per queue, each a plain `Engine` that binds only its queue, leaves the
  iptables hooks alone and serves its own control socket ``<socket stem>.w<i><suffix>``;
* installs the hooks once every worker has bound its queue (fail closed: nothing is routed to
  a queue before someone reads it), and removes them on SIGTERM/SIGINT before stopping the
  workers, as a single engine does;
* serves the main control socket by forwarding to the workers and merging their replies
  (``stats``: counters summed, each SA's counters from its worker; ``sa-list``/``policy-list``
  likewise; live ``sa-add``/``policy-add``/``*-remove`` go to every worker, then the hooks are
  re-planned; ``trace`` relays every worker's events);
* restarts a worker that dies. Its queue has no reader meanwhile, so its traffic is dropped by
  the kernel (the hooks stay: fail closed, unless ``fail_open``).

State across a worker restart: the supervisor polls each worker's SAs (``sa-list``) every
`POLL_INTERVAL` seconds and hands the restarted worker, for each of its SAs, the last outbound
sequence number seen plus a margin covering what could have been sent since that poll (at most
`MAX_PACKET_RATE` packets per second), so a sequence number is never used twice under one key;
the inbound replay window restarts at the last top seen, with the whole window marked as seen;
packet/byte counters, lifetime age and a soft/hard expiry carry over. What cannot be recovered:
inbound packets accepted after the last poll could be accepted once more (a replay window of at
most POLL_INTERVAL seconds of traffic), and the outbound sequence numbers jump forward by the
margin (harmless to the peer's window).
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import logging
import os
import selectors
import signal
import socket
import time
import zlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import FrameType
from typing import Any

from . import control, hooks
from .config import Config
from .engine import Engine, EngineError, EngineLock
from .replay import ReplayWindow
from .sa import DEAD, DYING, SaEvent, SecurityAssociation
from .sad import Sad
from .spd import Direction, Policy, Spd

log = logging.getLogger("nfq_ipsec")

POLL_INTERVAL = 1.0  # seconds between SA state polls of each worker
MAX_PACKET_RATE = 1_000_000  # packets/s one worker could possibly send: the sequence-number margin
READY_TIMEOUT = 20.0  # seconds a worker may take to bind its queue and answer on its socket
STOP_TIMEOUT = 10.0  # seconds a worker gets to exit after SIGTERM before SIGKILL
RESTART_BACKOFF = (0.1, 0.5, 1.0, 2.0, 5.0, 10.0)  # after quick successive deaths
STABLE_AFTER = 10.0  # a worker that ran this long resets the backoff
WORKER_CALL_TIMEOUT = 2.0
_SUN_PATH_MAX = 107
_PR_SET_PDEATHSIG = 1


# -- assignment -------------------------------------------------------------------------------------


def assign_workers(sas: Iterable[SecurityAssociation], policies: Iterable[Policy], workers: int) -> dict[str, int]:
    """SA name -> worker index: outbound SAs round-robin in order, then inbound SAs the same way.

    An SA is outbound when an ``out`` policy uses it. Spreading each direction separately keeps
    both encryption and decryption balanced (an outbound SA and its inbound partner need not share
    a worker). Stable: the same configuration always gives the same assignment.
    """
    workers = max(1, workers)
    outbound = {p.sa for p in policies if p.sa and Direction(p.dir) is Direction.OUT}
    names = [sa.name for sa in sas]
    result: dict[str, int] = {}
    for group in ([n for n in names if n in outbound], [n for n in names if n not in outbound]):
        for i, name in enumerate(group):
            result[name] = i % workers
    return result


class WorkerOf:
    """The SA -> worker function the hooks use: the assignment, or a hash for SAs added later."""

    def __init__(self, assignment: Mapping[str, int], workers: int) -> None:
        self.assignment = dict(assignment)
        self.workers = max(1, workers)

    def __call__(self, sa_name: str) -> int:
        w = self.assignment.get(sa_name)
        if w is None:
            w = zlib.crc32(sa_name.encode()) % self.workers
        return w


def worker_socket(main_socket: str, index: int) -> str:
    """``/run/x/nfq.sock`` -> ``/run/x/nfq.w0.sock``: a distinct socket *and* lock file per worker
    (the engine's lock is the socket path with its suffix replaced by ``.lock``)."""
    p = Path(main_socket)
    return str(p.with_name(f"{p.stem}.w{index}{p.suffix}"))


# -- state carried over a worker restart -------------------------------------------------------------


@dataclasses.dataclass
class SaSnapshot:
    """What the supervisor last saw of one SA in its worker (from ``sa-list``)."""

    seq: int
    replay_top: int
    state: str
    counters: dict[str, int]
    age: float
    polled: float  # time.monotonic() of the poll

    @classmethod
    def from_describe(cls, d: Mapping[str, Any], now: float) -> SaSnapshot:
        return cls(int(d.get("seq", 0)), int(d.get("replay_top", 0)), str(d.get("state", "mature")),
                   {k: int(v) for k, v in dict(d.get("counters", {})).items()},
                   float(d.get("age_seconds", 0.0)), now)


def resume_sa(sa: SecurityAssociation, snap: SaSnapshot, now: float, max_rate: int = MAX_PACKET_RATE) -> None:
    """Carry an SA's state into a restarted worker (see the module docstring).

    The outbound counter skips ahead by what could have been sent since the poll, so no sequence
    number is ever reused; the replay window restarts at the last top seen with every number in
    the window marked as received.
    """
    margin = int((now - snap.polled + POLL_INTERVAL) * max_rate) + 1024
    limit = (1 << 64) - 1 if sa.esn else (1 << 32) - 1
    old = sa.replay
    replay = None
    if old.size and snap.replay_top > old.top:
        top = snap.replay_top
        replay = ReplayWindow(old.size, esn=old.esn, initial=top)
        for seq in range(max(1, top - old.size + 1), top + 1):
            replay.update(seq)
    sa.restore(seq=min(max(sa.seq, snap.seq + margin), limit), age=snap.age, replay=replay)
    for name, value in snap.counters.items():
        if hasattr(sa.counters, name):
            setattr(sa.counters, name, value)
    if snap.state == DEAD:
        sa.expire(hard=True, reason="hard-expired before its worker restarted")
    elif snap.state == DYING:
        sa.expire(hard=False, reason="soft-expired before its worker restarted")


# -- merging replies ---------------------------------------------------------------------------------


def _sum_dicts(dicts: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for d in dicts:
        for k, v in d.items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                out[k] = out.get(k, 0) + v
            elif k not in out:
                out[k] = v
    return out


def merge_stats(replies: Mapping[int, Mapping[str, Any]], owner: Callable[[str], int]) -> dict[str, Any]:
    """Merge workers' ``stats`` (index -> stats dict): counters summed, SAs from their owner."""
    merged: dict[str, Any] = {
        "counters": dict(sorted(_sum_dicts(r.get("counters", {}) for r in replies.values()).items())),
        "sas": {},
        "policies": {},
        "queues": [],
        "send_errors": sum(int(r.get("send_errors", 0)) for r in replies.values()),
        "tunnel_drops": sum(int(r.get("tunnel_drops", 0)) for r in replies.values()),
        "fast_path": {**_sum_dicts(r.get("fast_path", {}) for r in replies.values()),
                      "enabled": any(r.get("fast_path", {}).get("enabled") for r in replies.values())},
        "audit_suppressed": sum(int(r.get("audit_suppressed", 0)) for r in replies.values()),
        "events": [],
    }
    names: list[str] = []
    for r in replies.values():
        names += [n for n in r.get("sas", {}) if n not in names]
    for name in names:
        w = owner(name)
        src = replies.get(w)
        if src is not None and name in src.get("sas", {}):
            merged["sas"][name] = src["sas"][name]
    pol_names: list[str] = []
    for r in replies.values():
        pol_names += [n for n in r.get("policies", {}) if n not in pol_names]
    for name in pol_names:
        merged["policies"][name] = _sum_dicts(r["policies"][name] for r in replies.values()
                                              if name in r.get("policies", {}))
    for i in sorted(replies):
        merged["queues"] += [{**q, "worker": i} for q in replies[i].get("queues", [])]
        merged["events"] += [{**e, "worker": i} for e in replies[i].get("events", [])]
    merged["events"].sort(key=lambda e: e.get("time", 0))
    del merged["events"][:-100]
    return merged


def merge_sa_lists(replies: Mapping[int, list[dict[str, Any]]], owner: Callable[[str], int]) -> list[dict[str, Any]]:
    """Each SA as its owning worker describes it (order of the first reply)."""
    order: list[str] = []
    by_worker: dict[int, dict[str, dict[str, Any]]] = {}
    for w, sas in replies.items():
        by_worker[w] = {d["name"]: d for d in sas}
        order += [d["name"] for d in sas if d["name"] not in order]
    out = []
    for name in order:
        d = by_worker.get(owner(name), {}).get(name)
        if d is not None:
            out.append({**d, "worker": owner(name)})
    return out


def merge_policy_lists(replies: Mapping[int, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Policies of the lowest-numbered worker, their counters summed over all workers."""
    if not replies:
        return []
    first = replies[min(replies)]
    out = []
    for p in first:
        counters = _sum_dicts(q["counters"] for pols in replies.values() for q in pols if q["name"] == p["name"])
        out.append({**p, "counters": counters})
    return out


# -- the supervisor ----------------------------------------------------------------------------------


@dataclasses.dataclass
class _Worker:
    index: int
    queue_num: int
    socket_path: str
    pid: int = 0
    started: float = 0.0
    restarts: int = 0
    deaths_in_a_row: int = 0
    restart_at: float | None = None
    last_poll: float = 0.0
    snapshots: dict[str, SaSnapshot] = dataclasses.field(default_factory=dict)

    @property
    def alive(self) -> bool:
        return self.pid > 0


class _Model:
    """The parent's own SAD/SPD: validates live changes and plans the hooks (duck-types the
    parts of `Engine` that `control.handle_command` uses)."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.sad = sup.sad
        self.spd = sup.spd
        self.tracers: list[Any] = []

    def _on_sa_event(self, ev: SaEvent) -> None:  # the parent's SA copies never see traffic
        pass

    def install_hooks(self) -> None:
        self.sup.install_hooks()


class _TraceRelay:
    """One trace client of the main socket and its connections to every worker's trace."""

    def __init__(self, client: control.ClientConn, conns: list[socket.socket]) -> None:
        self.client = client
        self.conns = conns
        self.bufs: dict[int, bytes] = {c.fileno(): b"" for c in conns}


class _SupervisorConn(control.ClientConn):
    def dispatch(self, line: bytes) -> dict[str, Any]:
        sup: Supervisor = self.server.engine  # type: ignore[assignment]
        try:
            req = json.loads(line)
            if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
                raise control.ControlError('a request is a JSON object with a "cmd" string')
            return {"ok": True, **sup.handle(req, self)}
        except (ValueError, UnicodeDecodeError) as e:
            return {"ok": False, "error": f"bad request: {e}"}
        except control.ControlError as e:
            return {"ok": False, "error": str(e)}
        except Exception as e:  # never let a client take the supervisor down
            return {"ok": False, "error": f"internal error: {type(e).__name__}: {e}"}


class _SupervisorServer(control.ControlServer):
    def handle_ready(self, sel: selectors.BaseSelector) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        conn.setblocking(False)
        uid = control._peer_uid(conn)
        if uid != 0:
            try:
                conn.send(control._encode({"ok": False,
                                           "error": f"permission denied: the control socket is root-only (uid {uid})"}))
            except OSError:
                pass
            conn.close()
            return
        c = _SupervisorConn(conn, self)
        self.clients.add(c)
        sel.register(conn, selectors.EVENT_READ, c)


class Supervisor:
    """Parent of the worker engines; see the module docstring. `run()` blocks until SIGTERM/SIGINT."""

    def __init__(self, config: Config, config_path: str | None = None, socket_path: str | None = None) -> None:
        if socket_path:
            config.engine = dataclasses.replace(config.engine, control_socket=socket_path)
        self.config = config
        self.config_path = config_path
        self.settings = config.engine
        self.n = max(1, int(self.settings.workers))
        self.sad = Sad()
        self.spd = Spd(self.settings.default_actions())
        for sa in config.sas:
            self.sad.add(sa)
        for p in config.policies:
            self.spd.add(p)
        self.worker_of = WorkerOf(assign_workers(config.sas, config.policies, self.n), self.n)
        self.model = _Model(self)
        self.tracers: list[Any] = []  # what control.ClientConn.close() looks at
        self.workers = [_Worker(i, int(self.settings.queue_num) + i, worker_socket(self.settings.control_socket, i))
                        for i in range(self.n)]
        for w in self.workers:
            if len(w.socket_path.encode()) > _SUN_PATH_MAX:
                raise EngineError(f"worker control socket {w.socket_path} is longer than a unix socket allows; "
                                  "choose a shorter control_socket")
        self.server: _SupervisorServer | None = None
        self.sel: selectors.BaseSelector | None = None
        self.relays: list[_TraceRelay] = []
        self._lock: EngineLock | None = None
        self._hooks_installed = False
        self._stop = False
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self.started = time.time()

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        """Lock, control socket, workers (each bound to its queue), then the hooks; undone on error."""
        try:
            # the same lock a single engine takes: one of the two per control socket
            self._lock = EngineLock(self.settings.control_socket)
            self.server = _SupervisorServer(self.settings.control_socket, self)  # type: ignore[arg-type]
            for w in self.workers:
                self._spawn(w)
            deadline = time.monotonic() + READY_TIMEOUT
            for w in self.workers:
                self._wait_ready(w, deadline)
            self.install_hooks()
        except BaseException:
            self.shutdown()
            raise

    def install_hooks(self) -> None:
        try:
            hooks.install(hooks.plan(self.settings, self.spd, self.sad, self.worker_of))
        except Exception as e:
            raise EngineError(f"installing the iptables hooks failed: {e}") from None
        self._hooks_installed = True

    def shutdown(self) -> None:
        """Hooks first (as a single engine does), then the workers, the socket and the lock."""
        if self._hooks_installed:
            try:
                hooks.remove(self.settings.chain_prefix)
            except Exception as e:
                log.error("removing iptables hooks failed: %s (run `nfq-ipsec hooks remove`)", e)
            self._hooks_installed = False
        self._stop_workers()
        for relay in list(self.relays):
            self._end_relay(relay)
        if self.server is not None:
            self.server.close()
            self.server = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _stop_workers(self) -> None:
        for w in self.workers:
            if w.alive:
                try:
                    os.kill(w.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + STOP_TIMEOUT
        for w in self.workers:
            while w.alive:
                code = self._reap(w)
                if code is not None:
                    if code != 0:
                        log.warning("worker %d exited with status %d", w.index, code)
                    break
                if time.monotonic() > deadline:
                    log.error("worker %d (pid %d) did not stop: killing it", w.index, w.pid)
                    os.kill(w.pid, signal.SIGKILL)
                    os.waitpid(w.pid, 0)
                    w.pid = 0
                    break
                time.sleep(0.02)

    def request_stop(self, signum: int = 0, frame: FrameType | None = None) -> None:
        self._stop = True

    # -- workers ---------------------------------------------------------------------------------
    def _worker_config(self, w: _Worker) -> Config:
        settings = dataclasses.replace(self.settings, control_socket=w.socket_path)
        return Config(engine=settings, sas=self.sad.list(), policies=self.spd.list(), warnings=[],
                      source=self.config.source)

    def _spawn(self, w: _Worker) -> None:
        cfg = self._worker_config(w)
        pid = os.fork()
        if pid == 0:  # the child never returns from here
            self._child(w, cfg)
        w.pid = pid
        w.started = time.monotonic()
        w.restart_at = None
        log.info("worker %d started (pid %d, queue %d, SAs: %s)", w.index, pid, w.queue_num,
                 ", ".join(sa.name for sa in self.sad.list() if self.worker_of(sa.name) == w.index) or "none")

    def _child(self, w: _Worker, cfg: Config) -> None:
        code = 1
        engine: Engine | None = None
        try:
            for s in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
                signal.signal(s, signal.SIG_DFL)
            signal.set_wakeup_fd(-1)
            try:  # die with the parent (a killed supervisor must not leave orphans reading queues)
                ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
            except (OSError, AttributeError):
                pass
            os.setpgid(0, 0)  # a terminal's Ctrl-C reaches the supervisor only; it stops us in order
            self._close_inherited()
            now = time.monotonic()
            for sa in cfg.sas:
                snap = w.snapshots.get(sa.name)
                if snap is not None:
                    resume_sa(sa, snap, now)
            engine = Engine(cfg, self.config_path, queue_nums=[w.queue_num], manage_hooks=False,
                            worker_of=self.worker_of)
            engine.start()
            engine.run()
            code = 0
        except BaseException as e:  # report, then exit: the supervisor decides what happens next
            log.error("worker %d: %s: %s", w.index, type(e).__name__, e)
        finally:
            try:
                if engine is not None:
                    engine.shutdown()
            finally:
                logging.shutdown()
                os._exit(code)

    def _close_inherited(self) -> None:
        """Close the parent's descriptors in a child (sockets, selector, lock copy)."""
        if self.sel is not None:
            self.sel.close()
        if self.server is not None:
            for c in list(self.server.clients):
                c.sock.close()
            self.server.sock.close()
        for relay in self.relays:
            for s in relay.conns:
                s.close()
        for wake in (self._wake_r, self._wake_w):
            if wake is not None:
                wake.close()
        if self._lock is not None:
            self._lock.close_inherited()  # the parent's copy keeps the lock

    def _wait_ready(self, w: _Worker, deadline: float) -> None:
        while True:
            code = self._reap(w)
            if code is not None:
                raise EngineError(f"worker {w.index} (queue {w.queue_num}) exited with status {code} "
                                  "while starting (see its error above)")
            try:
                self._call(w, "ping", timeout=0.5)
                return
            except (control.ControlError, OSError):
                pass
            if time.monotonic() > deadline:
                raise EngineError(f"worker {w.index} did not become ready within {READY_TIMEOUT:.0f} s")
            time.sleep(0.05)

    def _reap(self, w: _Worker) -> int | None:
        """Exit status if the worker has exited (and forget its pid), else None."""
        if not w.alive:
            return None
        try:
            pid, status = os.waitpid(w.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = w.pid, 0
        if pid == 0:
            return None
        w.pid = 0
        return os.waitstatus_to_exitcode(status)

    def _check_workers(self) -> None:
        now = time.monotonic()
        for w in self.workers:
            code = self._reap(w)
            if code is not None:
                ran = now - w.started
                w.deaths_in_a_row = 0 if ran >= STABLE_AFTER else w.deaths_in_a_row + 1
                delay = RESTART_BACKOFF[min(max(w.deaths_in_a_row - 1, 0), len(RESTART_BACKOFF) - 1)]
                log.error("worker %d (queue %d) died (status %d) after %.1f s; its traffic is dropped until it "
                          "restarts in %.1f s", w.index, w.queue_num, code, ran, delay)
                w.restart_at = now + delay
            if not w.alive and w.restart_at is not None and now >= w.restart_at and not self._stop:
                w.restarts += 1
                self._spawn(w)

    def _poll_state(self) -> None:
        """Remember each worker's SA sequence numbers, windows and counters (for restarts)."""
        now = time.monotonic()
        for w in self.workers:
            if not w.alive or now - w.last_poll < POLL_INTERVAL:
                continue
            w.last_poll = now
            try:
                sas = self._call(w, "sa-list", timeout=0.5)["sas"]
            except (control.ControlError, OSError, KeyError, ValueError):
                continue
            for d in sas:
                if self.worker_of(d["name"]) == w.index:
                    w.snapshots[d["name"]] = SaSnapshot.from_describe(d, now)

    def _call(self, w: _Worker, cmd: str, timeout: float = WORKER_CALL_TIMEOUT, **kw: Any) -> dict[str, Any]:
        c = control.ControlClient(w.socket_path, timeout=timeout)
        try:
            return c.call(cmd, **kw)
        finally:
            c.close()

    def _call_all(self, cmd: str, **kw: Any) -> dict[int, dict[str, Any]]:
        """Replies of every live worker that answers (index -> reply)."""
        out = {}
        for w in self.workers:
            if not w.alive:
                continue
            try:
                out[w.index] = self._call(w, cmd, **kw)
            except (control.ControlError, OSError, ValueError) as e:
                log.warning("worker %d did not answer %s: %s", w.index, cmd, e)
        return out

    # -- main loop -------------------------------------------------------------------------------
    def run(self) -> None:
        assert self.server is not None
        self.sel = sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        sel.register(self.server.fileno(), selectors.EVENT_READ, self.server)
        old = {s: signal.signal(s, self.request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
        old_chld = signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        old_fd = signal.set_wakeup_fd(self._wake_w.fileno())
        try:
            while not self._stop:
                for key, _ in sel.select(timeout=0.25):
                    obj = key.data
                    if obj == "wake":
                        try:
                            while self._wake_r.recv(512):
                                pass
                        except OSError:
                            pass
                    elif obj is self.server:
                        self.server.handle_ready(sel)
                    elif isinstance(obj, _TraceRelay):
                        self._relay_ready(obj, key.fileobj)  # type: ignore[arg-type]
                    elif isinstance(obj, control.ClientConn):
                        obj.handle_ready(sel)
                for relay in [r for r in self.relays if r.client not in self.tracers]:
                    self._end_relay(relay)  # its client went away: stop the workers' tracing
                if not self._stop:
                    self._check_workers()
                    self._poll_state()
        finally:
            signal.set_wakeup_fd(old_fd)
            signal.signal(signal.SIGCHLD, old_chld)
            for s, h in old.items():
                signal.signal(s, h)
            sel.close()
            self.sel = None
            for wake in (self._wake_r, self._wake_w):
                if wake is not None:
                    wake.close()
            self._wake_r = None
            self._wake_w = None

    # -- control socket --------------------------------------------------------------------------
    def handle(self, req: dict[str, Any], client: control.ClientConn) -> dict[str, Any]:
        cmd = req["cmd"]
        if cmd == "ping":
            return {"pid": os.getpid(), "workers": self._worker_info()}
        if cmd == "stats":
            replies = {i: r["stats"] for i, r in self._call_all("stats").items()}
            st = merge_stats(replies, self.worker_of)
            st["uptime"] = round(time.time() - self.started, 3)
            st["workers"] = self._worker_info()
            return {"stats": st}
        if cmd == "sa-list":
            return {"sas": merge_sa_lists({i: r["sas"] for i, r in self._call_all("sa-list").items()},
                                          self.worker_of)}
        if cmd == "policy-list":
            return {"policies": merge_policy_lists({i: r["policies"]
                                                    for i, r in self._call_all("policy-list").items()})}
        if cmd == "explain":
            return {"explain": control.explain(self.spd, req, self.sad)}  # configuration view of the SAs
        if cmd in ("sa-add", "policy-add"):
            return self._add(req)
        if cmd in ("sa-remove", "policy-remove"):
            reply = control.handle_command(self.model, req)  # type: ignore[arg-type]  # validates, re-plans hooks
            for i, r in self._forward_change(req).items():
                if not r.get("ok"):
                    log.error("worker %d refused %s: %s", i, cmd, r.get("error"))
            return reply
        if cmd == "trace":
            return self._start_relay(req, client)
        raise control.ControlError(f"unknown command {cmd!r} (try: stats, sa-list, policy-list, sa-add, sa-remove, "
                                   "policy-add, policy-remove, explain, trace)")

    def _worker_info(self) -> list[dict[str, Any]]:
        return [{"index": w.index, "pid": w.pid, "queue": w.queue_num, "alive": w.alive, "restarts": w.restarts,
                 "sas": [sa.name for sa in self.sad.list() if self.worker_of(sa.name) == w.index]}
                for w in self.workers]

    def _forward_change(self, req: dict[str, Any]) -> dict[int, dict[str, Any]]:
        out = {}
        for w in self.workers:
            if not w.alive:
                continue  # it restarts from the supervisor's model, which has the change
            try:
                out[w.index] = {"ok": True, **self._call(w, req["cmd"], **{k: v for k, v in req.items() if k != "cmd"})}
            except (control.ControlError, OSError) as e:
                out[w.index] = {"ok": False, "error": str(e)}
        return out

    def _add(self, req: dict[str, Any]) -> dict[str, Any]:
        """Workers first (so the traffic the new hooks send them finds its SA), then the model and
        the hooks; undone in the workers if the supervisor's side fails."""
        replies = self._forward_change(req)
        refused = {i: r for i, r in replies.items() if not r.get("ok")}
        try:
            if refused:
                raise control.ControlError(next(iter(refused.values())).get("error", "refused"))
            return control.handle_command(self.model, req)  # type: ignore[arg-type]
        except Exception:
            for w_index, r in replies.items():
                if not r.get("ok"):
                    continue
                for item in reversed(r.get("added", [])):
                    kind, name = item.split(":", 1)
                    try:
                        self._call(self.workers[w_index], "sa-remove" if kind == "sa" else "policy-remove", name=name)
                    except (control.ControlError, OSError) as e:
                        log.error("worker %d: undoing %s failed: %s", w_index, item, e)
            raise

    # -- trace relay -----------------------------------------------------------------------------
    def _start_relay(self, req: dict[str, Any], client: control.ClientConn) -> dict[str, Any]:
        assert self.sel is not None
        conns = []
        for w in self.workers:
            if not w.alive:
                continue
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(WORKER_CALL_TIMEOUT)
                s.connect(w.socket_path)
                s.sendall(control._encode(req))
                first = b""
                while not first.endswith(b"\n"):
                    chunk = s.recv(1)
                    if not chunk:
                        raise OSError("worker closed the connection")
                    first += chunk
                if not json.loads(first).get("ok"):
                    raise control.ControlError(json.loads(first).get("error", "trace refused"))
                s.setblocking(False)
                conns.append(s)
            except (OSError, control.ControlError, ValueError):
                for c in conns:
                    c.close()
                raise
        relay = _TraceRelay(client, conns)
        self.relays.append(relay)
        self.tracers.append(client)  # ClientConn.close() removes it: then the relay ends
        for s in conns:
            self.sel.register(s, selectors.EVENT_READ, relay)
        return {"tracing": True, "workers": len(conns)}

    def _relay_ready(self, relay: _TraceRelay, s: socket.socket) -> None:
        if relay.client not in self.tracers:  # the client went away
            self._end_relay(relay)
            return
        try:
            data = s.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._end_relay(relay)
            return
        buf = relay.bufs[s.fileno()] + data
        *lines, rest = buf.split(b"\n")
        relay.bufs[s.fileno()] = rest
        for line in lines:
            try:
                relay.client.sock.send(line + b"\n")
            except BlockingIOError:
                pass  # a slow reader loses events, as with a single engine
            except OSError:
                self._end_relay(relay)
                return

    def _end_relay(self, relay: _TraceRelay) -> None:
        if relay in self.relays:
            self.relays.remove(relay)
        for s in relay.conns:
            if self.sel is not None:
                try:
                    self.sel.unregister(s)
                except (KeyError, ValueError):
                    pass
            s.close()
        relay.conns = []


def run_workers(config: Config, config_path: str | None = None, socket_path: str | None = None) -> None:
    """Run ``config.engine.workers`` engine processes under a supervisor until SIGTERM/SIGINT.

    Raises EngineError when start-up fails (nothing is left installed then).
    """
    sup = Supervisor(config, config_path, socket_path)
    sup.start()
    log.info("supervisor running: %d workers on queues %d..%d, %d SAs, %d policies, control socket %s", sup.n,
             sup.workers[0].queue_num, sup.workers[-1].queue_num, len(sup.sad), len(sup.spd.list()),
             sup.settings.control_socket)
    try:
        sup.run()
    finally:
        sup.shutdown()
        log.info("supervisor stopped, hooks removed")


def main(argv: list[str] | None = None) -> int:
    """``python -m nfq_ipsec.supervisor -c FILE [--socket PATH]``: what ``nfq-ipsec run`` does for
    ``workers > 1`` (kept for tests and benchmarks; the CLI is the supported entry point)."""
    import argparse
    import sys

    from .config import load_config
    from .errors import ConfigError

    ap = argparse.ArgumentParser(prog="python -m nfq_ipsec.supervisor", description=main.__doc__)
    ap.add_argument("-c", "--config", required=True)
    ap.add_argument("--socket", default=None)
    ap.add_argument("--log-level", default=None, choices=["debug", "info", "warning", "error"])
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config)
    except (ConfigError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    level = (args.log_level or getattr(cfg.engine, "log_level", None) or "info").upper()
    logging.basicConfig(level=level, format="%(asctime)s nfq-ipsec %(levelname)s %(message)s", stream=sys.stderr)
    try:
        run_workers(cfg, args.config, args.socket)
    except EngineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


__all__ = ["Supervisor", "WorkerOf", "assign_workers", "merge_stats", "resume_sa", "run_workers", "worker_socket"]


if __name__ == "__main__":
    raise SystemExit(main())
