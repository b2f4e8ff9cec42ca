"""`nfq-ipsec demo --peer kernel`, as a user runs it: our engine against the Linux kernel in user-mode-linux.

The demo must pass (traffic both ways, content verified), print both sides' counters and a
decrypted wire sample, and leave neither its namespace nor its UML kernel behind.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nfq_ipsec.umlpeer import uml_missing_reason

NFQ_IPSEC = str(Path(sys.executable).with_name("nfq-ipsec"))


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _processes_mentioning(word: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if word in cmdline:
            found.append(f"{pid}: {cmdline[:200]}")
    return found


def _row(out: str, sa: str) -> list[str]:
    m = re.search(rf"^{sa}\s+0x[0-9a-f]{{8}}\s+(.*)$", out, re.M)
    assert m, f"no counter row for SA {sa}:\n{out}"
    return m.group(1).split()


@pytest.mark.skipif(os.geteuid() != 0 or uml_missing_reason() is not None,
                    reason=f"no Linux kernel IPsec peer: {uml_missing_reason()}")
def test_demo_with_kernel_peer_passes_and_cleans_up() -> None:
    before = _namespaces()
    p = subprocess.run([NFQ_IPSEC, "demo", "--peer", "kernel"], capture_output=True, text=True, timeout=120)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    assert "demo passed" in out, out
    for label in ("ping ours -> kernel", "ping kernel -> ours", "UDP echo ours -> kernel", "UDP echo kernel -> ours",
                  "TCP 1 MB ours -> kernel, content verified", "TCP 1 MB kernel -> ours, content verified"):
        assert f"{label}: ok" in out, out
    # both sides' counters, side by side: packets (ours), bytes (ours), packets (kernel), bytes (kernel), ...
    for sa in ("o2k", "k2o"):
        ours_pkts, ours_bytes, kernel_pkts, kernel_bytes, *rest = _row(out, sa)
        # 1 MB each way crossed both SAs (how many segments and ACKs carried it varies), and both
        # sides counted the same packets
        assert int(ours_bytes) > 1 << 20 and int(kernel_bytes) > 1 << 20, out
        assert int(ours_pkts) == int(kernel_pkts) > 700, out
        assert rest == ["0", "/", "0", "0", "/", "0"], out  # no replay drop, no integrity failure anywhere
    assert "kernel drops/errors (/proc/net/xfrm_stat): none" in out, out
    assert re.search(r"on the wire : .* esp .*SA o2k\)\ndecrypted   : IP / ICMP", out), out
    assert re.search(r"on the wire : .* esp .*SA k2o\)\ndecrypted   : IP / ICMP", out), out
    # nothing left behind: its namespace, any other namespace it made, its UML kernel (tap named after the tag)
    m = re.search(r"namespace (demo(\w+)-o) .* tap (nfqd\w+) ", out)
    assert m, out
    ns, tap = m.group(1), m.group(3)
    after = _namespaces()
    assert ns not in after
    assert not {n for n in after - before if n.startswith("demo")}, after - before
    assert not _processes_mentioning(f"ifname={tap}"), _processes_mentioning(f"ifname={tap}")
    assert not _processes_mentioning(ns)


@pytest.mark.skipif(os.geteuid() != 0, reason="the demo needs root")
def test_demo_kernel_peer_missing_says_how_to_install() -> None:
    env = {**os.environ, "NFQ_INTEROP_UML": "/nonexistent/linux.uml"}
    p = subprocess.run([NFQ_IPSEC, "demo", "--peer", "kernel"], capture_output=True, text=True, timeout=30, env=env)
    assert p.returncode == 1
    assert "apt-get install user-mode-linux" in p.stderr, p.stderr
    assert not p.stdout.strip()  # refused before building anything
