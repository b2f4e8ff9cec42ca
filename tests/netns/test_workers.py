"""Several worker processes (``[engine] workers = 2``): each SA handled by exactly one worker.

Site to site with two tunnels (one SA per direction each) between two gateways that both run
two workers: hostA — gwA ==ESP== router == gwB — hostB (two addresses, one per tunnel). Traffic
through both tunnels must work, every SA's packets must be counted by its own worker only, no
replay drop or integrity failure anywhere (one sequence-number space per SA), a killed worker is
restarted without reusing sequence numbers, and SIGTERM removes the hooks and stops the workers.
The pure parts (assignment, merging, state carried over a restart) are checked first.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from nfq_ipsec import control
from nfq_ipsec.netns import Namespace, Topology
from nfq_ipsec.sa import SecurityAssociation
from nfq_ipsec.spd import Action, Direction, Policy, Selector
from nfq_ipsec.supervisor import (
    SaSnapshot,
    WorkerOf,
    assign_workers,
    merge_sa_lists,
    merge_stats,
    resume_sa,
    worker_socket,
)

from .conftest import ping, tcp_transfer, udp_echo

HA, HB1, HB2 = "192.0.2.10", "192.0.2.130", "192.0.2.194"
GA_OUT, GB_OUT = "203.0.113.1", "198.51.100.1"


# -- pure parts ------------------------------------------------------------------------------------


def _sa(name: str, spi: int, src: str = GA_OUT, dst: str = GB_OUT) -> SecurityAssociation:
    return SecurityAssociation(name=name, proto="esp", mode="tunnel", src=src, dst=dst, spi=spi,
                               aead="aes-gcm-128", key=bytes(20), replay_window=64)


def _protect(name: str, d: str, sa: str) -> Policy:
    return Policy(name, Direction(d), Selector(), Action.PROTECT, sa)


def test_assignment_spreads_each_direction_and_is_stable() -> None:
    sas = [_sa("out-1", 0x101), _sa("in-1", 0x102, GB_OUT, GA_OUT), _sa("out-2", 0x103),
           _sa("in-2", 0x104, GB_OUT, GA_OUT)]
    pols = [_protect("p1", "out", "out-1"), _protect("p2", "fwd", "in-1"), _protect("p3", "out", "out-2"),
            _protect("p4", "fwd", "in-2")]
    a = assign_workers(sas, pols, 2)
    assert a == {"out-1": 0, "out-2": 1, "in-1": 0, "in-2": 1}
    assert assign_workers(sas, pols, 2) == a
    assert set(assign_workers(sas, pols, 4).values()) == {0, 1}
    assert set(assign_workers(sas, pols, 1).values()) == {0}
    wo = WorkerOf(a, 2)
    assert wo("out-2") == 1
    assert wo("added-later") == wo("added-later") in (0, 1)


def test_worker_sockets_get_distinct_lock_files() -> None:
    socks = [worker_socket("/run/nfq-ipsec/gw.sock", i) for i in range(3)]
    assert socks[0] == "/run/nfq-ipsec/gw.w0.sock"
    locks = {str(Path(s).with_suffix(".lock")) for s in socks} | {"/run/nfq-ipsec/gw.lock"}
    assert len(locks) == 4


def test_merge_takes_each_sa_from_its_owner_and_sums_the_rest() -> None:
    zero = {"packets": 0, "bytes": 0}
    w0 = {"counters": {"A": 1, "B": 2}, "sas": {"s0": {"packets": 5, "bytes": 50}, "s1": zero},
          "policies": {"p": {"packets": 1, "bytes": 10}}, "queues": [{"queue": 0}], "send_errors": 1,
          "events": [{"time": 2.0, "sa": "s0"}]}
    w1 = {"counters": {"A": 10}, "sas": {"s0": zero, "s1": {"packets": 7, "bytes": 70}},
          "policies": {"p": {"packets": 2, "bytes": 20}}, "queues": [{"queue": 1}], "send_errors": 2,
          "events": [{"time": 1.0, "sa": "s1"}]}
    owner = {"s0": 0, "s1": 1}.__getitem__
    m = merge_stats({0: w0, 1: w1}, owner)
    assert m["counters"] == {"A": 11, "B": 2}
    assert m["sas"] == {"s0": {"packets": 5, "bytes": 50}, "s1": {"packets": 7, "bytes": 70}}
    assert m["policies"]["p"] == {"packets": 3, "bytes": 30}
    assert [q["worker"] for q in m["queues"]] == [0, 1] and m["send_errors"] == 3
    assert [e["sa"] for e in m["events"]] == ["s1", "s0"]
    listed = merge_sa_lists({0: [{"name": "s0", "seq": 9}, {"name": "s1", "seq": 0}],
                             1: [{"name": "s0", "seq": 0}, {"name": "s1", "seq": 4}]}, owner)
    assert listed == [{"name": "s0", "seq": 9, "worker": 0}, {"name": "s1", "seq": 4, "worker": 1}]


def test_resume_never_reuses_a_sequence_number_nor_accepts_a_replay() -> None:
    sa = _sa("s", 0x200)
    snap = SaSnapshot(seq=1000, replay_top=500, state="mature", counters={"packets": 1000, "bytes": 9},
                      age=30.0, polled=100.0)
    resume_sa(sa, snap, now=100.5, max_rate=10_000)
    assert sa.next_seq() > 1000 + int(0.5 * 10_000)  # what could have been sent since the poll
    assert sa.counters.packets == 1000 and sa.age >= 30.0
    for seq in (500, 437, 1):
        with pytest.raises(Exception, match=r"replayed|outside"):
            sa.replay.check(seq)
    assert sa.replay.check(501) == 501
    dead = _sa("d", 0x201)
    resume_sa(dead, SaSnapshot(1, 0, "dead", {}, 0.0, 0.0), now=0.0)
    assert dead.state == "dead"
    full = _sa("f", 0x202)
    resume_sa(full, SaSnapshot((1 << 32) - 5, 0, "mature", {}, 0.0, 0.0), now=0.0)
    with pytest.raises(Exception, match="exhausted"):
        full.next_seq()


# -- in namespaces ---------------------------------------------------------------------------------


def _config(side: str, tmp: Path, tag: str) -> Path:
    """Two tunnels: net A <-> 192.0.2.128/26 (SAs *-1) and net A <-> 192.0.2.192/26 (SAs *-2)."""
    local, remote = ("192.0.2.0/25", None) if side == "a" else (None, "192.0.2.0/25")
    text = (f'[engine]\ndefault_policy = "bypass"\nworkers = 2\nqueue_num = 3\n'
            f'tunnel_device = "nfqw{tag}{side}"\n')
    for t, net in ((1, "192.0.2.128/26"), (2, "192.0.2.192/26")):
        for name, src, dst, spi in ((f"a2b-{t}", GA_OUT, GB_OUT, 0x4000 + t), (f"b2a-{t}", GB_OUT, GA_OUT, 0x5000 + t)):
            key = f"{spi:04x}" * 10
            text += (f'\n[[sa]]\nname = "{name}"\nproto = "esp"\nmode = "tunnel"\nsrc = "{src}"\ndst = "{dst}"\n'
                     f'spi = {spi}\naead = "aes-gcm-128"\nkey = "0x{key}"\nreplay_window = 128\n')
        mine, theirs = (local, net) if side == "a" else (net, remote)
        out_sa, in_sa = (f"a2b-{t}", f"b2a-{t}") if side == "a" else (f"b2a-{t}", f"a2b-{t}")
        text += (f'\n[[policy]]\nname = "out-{t}"\ndir = "out"\nsrc = "{mine}"\ndst = "{theirs}"\n'
                 f'action = "protect"\nsa = "{out_sa}"\n')
        text += (f'\n[[policy]]\nname = "fwd-{t}"\ndir = "fwd"\nsrc = "{theirs}"\ndst = "{mine}"\n'
                 f'action = "protect"\nsa = "{in_sa}"\n')
    path = tmp / f"gw-{side}.toml"
    path.write_text(text)
    path.chmod(0o600)
    return path


class Supervised:
    """The multi-worker engine in a namespace (``nfq-ipsec run`` with workers > 1)."""

    def __init__(self, ns: Namespace, config: Path, tmp: Path, name: str) -> None:
        self.ns = ns
        self.socket_path = str(tmp / f"{name}.sock")
        self.log_path = tmp / f"{name}.log"
        self._log = open(self.log_path, "ab")  # closed in stop()
        exe = os.path.join(os.path.dirname(sys.executable), "nfq-ipsec")
        cli = (Path(__file__).resolve().parents[2] / "nfq_ipsec" / "cli.py").read_text()
        # the CLI dispatches to the supervisor once it knows about it; until then, the same code directly
        cmd = ([exe, "run"] if "run_workers" in cli else [sys.executable, "-m", "nfq_ipsec.supervisor"])
        self.proc = ns.popen([*cmd, "-c", str(config), "--socket", self.socket_path], stdout=self._log,
                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def call(self, cmd: str, sock: str | None = None, **kw: Any) -> dict[str, Any]:
        c = control.ControlClient(sock or self.socket_path)
        try:
            return c.call(cmd, **kw)
        finally:
            c.close()

    def wait_ready(self, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.output()
            try:
                info = self.call("ping")
                if all(w["alive"] for w in info["workers"]) and self._hooks_in():
                    return info
            except (control.ControlError, OSError):
                pass
            time.sleep(0.1)
        raise AssertionError("supervisor not ready:\n" + self.output())

    def _hooks_in(self) -> bool:
        return "NFQIPSEC" in self.ns.run(["iptables-legacy", "-S"]).stdout

    def worker_stats(self) -> dict[int, dict[str, Any]]:
        return {w["index"]: self.call("stats", sock=_worker_sock(self.socket_path, w["index"]))["stats"]
                for w in self.call("ping")["workers"]}

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return int(self.proc.returncode)


def _worker_sock(main: str, i: int) -> str:
    return worker_socket(main, i)


@pytest.fixture
def two_tunnels(topo: Topology, tmp_path: Path):  # type: ignore[no-untyped-def]
    ha, ga, r, gb, hb = (topo.add("ha"), topo.add("ga", forwarding=True), topo.add("r", forwarding=True),
                         topo.add("gb", forwarding=True), topo.add("hb"))
    topo.link(ha, f"{HA}/25", ga, "192.0.2.1/25")
    topo.link(ga, f"{GA_OUT}/24", r, "203.0.113.254/24")
    topo.link(r, "198.51.100.254/24", gb, f"{GB_OUT}/24")
    topo.link(gb, "192.0.2.129/25", hb, [f"{HB1}/25", f"{HB2}/25"])
    ha.run("ip route add default via 192.0.2.1")
    hb.run("ip route add default via 192.0.2.129")
    ga.run("ip route add default via 203.0.113.254")
    gb.run("ip route add default via 198.51.100.254")
    tag = topo.tag[:3]
    sups = []
    try:
        for ns, side in ((ga, "a"), (gb, "b")):
            s = Supervised(ns, _config(side, tmp_path, tag), tmp_path, f"gw{side}")
            sups.append(s)
            s.wait_ready()
        yield ha, hb, ga, sups[0], sups[1]
    finally:
        for s in sups:
            s.stop()


def _traffic(ha: Namespace, hb: Namespace) -> None:
    for dst in (HB1, HB2):
        r = ping(ha, dst, count=2)
        assert r.returncode == 0, r.stdout + r.stderr
        udp_echo(ha, hb, dst, count=5)
        tcp_transfer(ha, hb, dst, 1 << 20)


def test_two_workers_each_sa_on_exactly_one_worker(two_tunnels) -> None:  # type: ignore[no-untyped-def]
    ha, hb, ga, sa_, sb = two_tunnels
    _traffic(ha, hb)
    for sup in (sa_, sb):
        info = sup.call("ping")
        owners = {name: w["index"] for w in info["workers"] for name in w["sas"]}
        assert set(owners.values()) == {0, 1}, owners  # both workers own SAs
        per_worker = sup.worker_stats()
        for name, owner in owners.items():
            seen = {i for i, st in per_worker.items() if st["sas"][name]["packets"]}
            assert seen == {owner}, (name, owner, seen)
            for st in per_worker.values():
                c = st["sas"][name]
                assert c["replay_drops"] == 0 and c["integrity_failures"] == 0, (name, c)
        merged = sup.call("stats")["stats"]
        for name, owner in owners.items():
            assert merged["sas"][name] == per_worker[owner]["sas"][name]
            assert merged["sas"][name]["packets"] > 100, (name, merged["sas"][name])
        assert {e["worker"] for e in merged["queues"]} == {0, 1}
        listed = {d["name"]: d for d in sup.call("sa-list")["sas"]}
        assert all(listed[n]["worker"] == w for n, w in owners.items())
    rules = ga.run(["iptables-legacy", "-S"]).stdout
    assert "--queue-num 3" in rules and "--queue-num 4" in rules, rules
    # trace through the main socket relays the workers' events
    tracer = control.ControlClient(sa_.socket_path)
    try:
        assert tracer.call("trace")["workers"] == 2
        for dst in (HB1, HB2):
            ping(ha, dst, count=1)
        tracer.sock.settimeout(5)
        traced: set[str] = set()
        for _ in range(12):  # each ping: out at FORWARD, ESP reply at INPUT, decrypted reply at FORWARD
            ev = json.loads(tracer.file.readline())
            assert "hook" in ev and "verdict" in ev, ev
            traced.add(str(ev.get("sa")))
            if {"a2b-1", "a2b-2"} <= traced:
                break
        assert {"a2b-1", "a2b-2"} <= traced, traced  # events of both workers
    finally:
        tracer.close()


def test_killed_worker_restarts_without_reusing_sequence_numbers(two_tunnels) -> None:  # type: ignore[no-untyped-def]
    ha, hb, ga, sa_, sb = two_tunnels
    _traffic(ha, hb)
    time.sleep(1.5)  # let the supervisor poll the SA state at least once
    before = {d["name"]: d for d in sa_.call("sa-list")["sas"]}
    victim = sa_.call("ping")["workers"][1]
    os.kill(victim["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        w = sa_.call("ping")["workers"][1]
        if w["alive"] and w["pid"] != victim["pid"] and w["restarts"] == 1:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("worker not restarted:\n" + sa_.output())
    assert "NFQIPSEC" in ga.run(["iptables-legacy", "-S"]).stdout  # hooks stayed (fail closed)
    sa_.wait_ready()
    _traffic(ha, hb)
    after = {d["name"]: d for d in sa_.call("sa-list")["sas"]}
    for name in victim["sas"]:
        if name.startswith("a2b"):  # outbound on gwA: the counter jumped forward, never back
            assert after[name]["seq"] > before[name]["seq"] + 1000, (before[name], after[name])
        assert after[name]["counters"]["packets"] > before[name]["counters"]["packets"]
    for name, c in sb.call("stats")["stats"]["sas"].items():
        assert c["replay_drops"] == 0 and c["integrity_failures"] == 0, (name, c)
    assert "worker 1" in sa_.output() and "died" in sa_.output()


def test_sigterm_removes_hooks_and_stops_workers(two_tunnels) -> None:  # type: ignore[no-untyped-def]
    _ha, _hb, ga, sa_, _sb = two_tunnels
    pids = [w["pid"] for w in sa_.call("ping")["workers"]]
    assert sa_.stop() == 0, sa_.output()
    assert "NFQIPSEC" not in ga.run(["iptables-legacy", "-S"]).stdout
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
    out = sa_.output()
    assert "Traceback" not in out, out[-3000:]
    assert "4001" * 10 not in out.lower()  # no key material in the log
