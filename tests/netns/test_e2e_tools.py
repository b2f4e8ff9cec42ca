"""The operator's tools against a running engine: trace, explain, stats in Prometheus format."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from .conftest import RULES, ping

A4, B4, A6, B6 = "192.0.2.1", "192.0.2.2", "2001:db8:1::1", "2001:db8:1::2"
NFQ = os.path.join(os.path.dirname(sys.executable), "nfq-ipsec")


def _pair(topo):  # type: ignore[no-untyped-def]
    a, b = topo.add("a"), topo.add("b")
    topo.link(a, [f"{A4}/24", f"{A6}/64"], b, [f"{B4}/24", f"{B6}/64"])
    return a, b


def test_trace_streams_per_packet_decisions(topo, engines):  # type: ignore[no-untyped-def]
    a, b = _pair(topo)
    ea = engines.start(a, RULES / "host-to-host-transport.toml", "a")
    engines.start(b, RULES / "host-to-host-transport-b.toml", "b")
    tr = subprocess.Popen([NFQ, "trace", "--socket", ea.socket_path, "--json", "--count", "4", "--host", B4],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    assert ping(a, B4, count=2).returncode == 0
    out, err = tr.communicate(timeout=20)
    assert tr.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert len(events) == 4
    hooks = {e["hook"] for e in events}
    assert hooks == {"output", "input"}, events
    inbound = [e for e in events if e["hook"] == "input"]
    assert all(e["proto"] == 50 and e["spi"].startswith("0x") and e["seq"] >= 1 for e in inbound), inbound
    assert all(e["sa"] and e["policy"] for e in events), events
    assert {e["verdict"] for e in inbound} == {"accept"}
    # keys never appear in what the tools print
    assert "0102030405060708" not in out


def test_trace_shows_the_reason_of_a_drop(topo, engines):  # type: ignore[no-untyped-def]
    a, b = _pair(topo)
    ea = engines.start(a, RULES / "host-to-host-transport.toml", "a")
    tr = subprocess.Popen([NFQ, "trace", "--socket", ea.socket_path, "--count", "1", "--verdict", "drop"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    ping(b, A4, count=1, timeout=1)  # b has no engine: clear packet to a protected host
    out, err = tr.communicate(timeout=20)
    assert tr.returncode == 0, err
    assert "drop" in out and "cleartext" in out and B4 in out, out


def test_explain_and_prometheus_against_the_running_engine(topo, engines):  # type: ignore[no-untyped-def]
    a, b = _pair(topo)
    ea = engines.start(a, RULES / "host-to-host-transport.toml", "a")
    engines.start(b, RULES / "host-to-host-transport-b.toml", "b")
    assert ping(a, B4, count=2).returncode == 0
    r = subprocess.run([NFQ, "explain", "--socket", ea.socket_path, "--src", A4, "--dst", B4, "--proto", "udp",
                        "--dport", "53", "--json"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["out"]["action"] == "protect" and res["out"]["sa"]
    r = subprocess.run([NFQ, "stats", "--socket", ea.socket_path, "--format", "prometheus"], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("nfq_ipsec_sa_packets_total")]
    assert any(not ln.endswith(" 0") for ln in lines), r.stdout
