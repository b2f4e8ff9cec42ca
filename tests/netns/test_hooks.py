"""The iptables hooks in real namespaces: install / remove / status through python-iptables.

Every install runs in a child process inside a namespace the test created (python-iptables
acts on the namespace of its process), and what the kernel holds is read back with
`iptables-legacy-save` / `ip6tables-legacy-save`. The root namespace's firewall is never touched.
"""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from nfq_ipsec import hooks
from nfq_ipsec.hooks import HookPlan, MatchSpec, Rule
from nfq_ipsec.netns import Namespace, Topology, wait_link_ready
from nfq_ipsec.spd import Action, Direction, Policy, Selector, Spd

from .conftest import ROOT, ping

A4, B4, A6, B6 = "192.0.2.1", "192.0.2.2", "2001:db8:1::1", "2001:db8:1::2"


@dataclass(frozen=True)
class Settings:
    queue_num: int = 0
    fail_open: bool = False
    mark: int = 0x4E510000
    mark_mask: int = 0xFFFF0000
    tunnel_device: str | None = "nfqipsec0"
    workers: int = 1
    chain_prefix: str = "NFQIPSEC"
    default_policy: dict[Direction, Action] = field(default_factory=dict)


@dataclass
class Sa:
    name: str
    proto: str
    spi: int
    dst: Any


class FakeSad:
    def __init__(self, *sas: Sa) -> None:
        self.sas = list(sas)

    def list(self) -> list[Sa]:
        return self.sas


def make_plan(*policies: Policy, sad: FakeSad | None = None, default: dict[Direction, Action] | None = None,
              **settings: Any) -> HookPlan:
    spd = Spd(default or {})
    for p in policies:
        spd.add(p)
    multi = settings.get("workers", 1) > 1
    return hooks.plan(Settings(**settings), spd, sad or FakeSad(),
                      lambda sa: int(multi and sa.startswith("in")))


def pol(name: str, direction: str, action: str = "bypass", sa: str | None = None, **sel: Any) -> Policy:
    for k in ("src", "dst"):
        if k in sel:
            sel[k] = ipaddress.ip_network(sel[k])
    return Policy(name, Direction(direction), Selector(**sel), Action(action), sa=sa)


SAMPLE_POLICIES = (
    pol("tcp in", "in", "protect", sa="in-a", src=f"{A4}/32", proto=6, dport=(443, 443)),
    pol("out-a", "out", "protect", sa="out-a", dst=f"{A4}/32", proto=6, sport=(443, 443)),
    pol("icmp6", "fwd", "discard", proto=58, icmp_type=128, icmp_code=0),
    pol("udp-any", "out", proto=17, dport=(500, 4500)),
)
SAMPLE_SAS = FakeSad(Sa("in-a", "esp", 0x1000, ipaddress.ip_address(B4)),
                     Sa("in-6", "ah", 0x2000, ipaddress.ip_address(B6)),
                     Sa("out-a", "esp", 0x1001, ipaddress.ip_address(A4)))


def hooks_cli(ns: Namespace, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return ns.run(["env", f"PYTHONPATH={ROOT}", sys.executable, "-m", "nfq_ipsec.hooks", *args], check=check)


def install(ns: Namespace, plan: HookPlan, tmp: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    f = tmp / f"plan-{ns.name}.json"
    f.write_text(json.dumps(plan.to_dict()))
    return hooks_cli(ns, "install", str(f), check=check)


def status(ns: Namespace) -> dict[str, Any]:
    return json.loads(hooks_cli(ns, "status").stdout)  # type: ignore[no-any-return]


def save(ns: Namespace, family: int) -> list[str]:
    """The filter table as iptables-save prints it, minus comments and chain counters."""
    tool = "iptables-legacy-save" if family == 4 else "ip6tables-legacy-save"
    out = ns.run([tool, "-t", "filter"]).stdout
    return [re.sub(r" \[\d+:\d+\]$", " [0:0]", line) for line in out.splitlines() if not line.startswith("#")]


def ipt(ns: Namespace, family: int, *args: str) -> None:
    ns.run(["iptables-legacy" if family == 4 else "ip6tables-legacy", *args])


def rule_counters(ns: Namespace, family: int, chain: str) -> list[tuple[int, str]]:
    tool = "iptables-legacy" if family == 4 else "ip6tables-legacy"
    out = ns.run([tool, "-t", "filter", "-S", chain, "-v"]).stdout
    rows = []
    for line in out.splitlines():
        m = re.match(r"^(-A \S+.*?) -c (\d+) (\d+)$", line)
        if m:
            rows.append((int(m.group(2)), m.group(1)))
    return rows


def table_names(ns: Namespace) -> tuple[str, str]:
    return (ns.run(["cat", "/proc/net/ip_tables_names"]).stdout.split().__str__(),
            ns.run(["cat", "/proc/net/ip6_tables_names"]).stdout.split().__str__())


def add_user_rules(ns: Namespace) -> None:
    ipt(ns, 4, "-A", "INPUT", "-p", "tcp", "--dport", "22", "-j", "ACCEPT")
    ipt(ns, 4, "-N", "USERCHAIN")
    ipt(ns, 4, "-A", "USERCHAIN", "-s", "198.51.100.0/24", "-j", "DROP")
    ipt(ns, 4, "-A", "INPUT", "-j", "USERCHAIN")
    ipt(ns, 4, "-A", "OUTPUT", "-d", "203.0.113.9", "-j", "REJECT")
    ipt(ns, 6, "-A", "FORWARD", "-p", "udp", "--dport", "53", "-j", "ACCEPT")
    ipt(ns, 6, "-A", "INPUT", "-s", "2001:db8:ffff::/48", "-j", "DROP")


def check_installed(ns: Namespace, plan: HookPlan, user: dict[int, list[str]]) -> None:
    for fam in (4, 6):
        lines = save(ns, fam)
        assert [ln for ln in lines if "NFQIPSEC" in ln] == plan.render(fam)
        assert [ln for ln in lines if "NFQIPSEC" not in ln] == user[fam]  # untouched, in order
        for builtin, ours in plan.jumps:
            first = next(ln for ln in lines if ln.startswith(f"-A {builtin} "))
            assert first == f"-A {builtin} -j {ours}"
            assert sum(ln.startswith(f"-A {builtin} -j NFQIPSEC") for ln in lines) == 1


# --- install / remove / status -----------------------------------------------------------------
def test_install_twice_remove_twice_user_rules_untouched(topo: Topology, tmp_path: Path) -> None:
    ns = topo.add("h")
    add_user_rules(ns)
    user = {fam: save(ns, fam) for fam in (4, 6)}
    plan = make_plan(*SAMPLE_POLICIES, sad=SAMPLE_SAS, workers=2, default={Direction.IN: Action.DISCARD})

    install(ns, plan, tmp_path)
    first = {fam: save(ns, fam) for fam in (4, 6)}
    check_installed(ns, plan, user)
    install(ns, plan, tmp_path)
    assert {fam: save(ns, fam) for fam in (4, 6)} == first  # byte for byte
    assert not any("--queue-bypass" in ln for fam in (4, 6) for ln in first[fam])  # fail closed
    # python-iptables was kept away from the other tables (no nat/mangle/raw instantiated)
    assert table_names(ns) == ("['filter']", "['filter']")

    st = status(ns)
    assert st["installed"] is True
    for fam in (4, 6):
        fst = st["families"][f"ipv{fam}"]
        assert [(j["chain"], j["position"], j["target"]) for j in fst["jumps"]] == [
            ("INPUT", 1, "NFQIPSEC-IN"), ("FORWARD", 1, "NFQIPSEC-FWD"), ("OUTPUT", 1, "NFQIPSEC-OUT")]
        for c in plan.chains[fam]:
            assert [r["rule"] for r in fst["chains"][c]] == [r.render() for r in plan.rules_for(fam, c)]
    in4 = st["families"]["ipv4"]["chains"]["NFQIPSEC-IN"]
    assert [r.get("policy") for r in in4 if "policy" in r] == ["tcp in"]
    assert [r.get("sa") for r in in4 if "sa" in r] == ["in-a"]
    assert [r.get("default") for r in in4 if "default" in r] == ["in"]

    hooks_cli(ns, "remove")
    assert {fam: save(ns, fam) for fam in (4, 6)} == user
    hooks_cli(ns, "remove")
    assert {fam: save(ns, fam) for fam in (4, 6)} == user
    st = status(ns)
    assert st["installed"] is False
    assert all(not f["chains"] and not f["jumps"] for f in st["families"].values())


def test_stale_chains_and_duplicate_jumps_are_replaced(topo: Topology, tmp_path: Path) -> None:
    ns = topo.add("h")
    add_user_rules(ns)
    user = {fam: save(ns, fam) for fam in (4, 6)}
    # what a killed engine of an older version might have left, plus duplicate jumps
    ipt(ns, 4, "-N", "NFQIPSEC-IN")
    ipt(ns, 4, "-N", "NFQIPSEC-OLD")
    ipt(ns, 4, "-A", "NFQIPSEC-OLD", "-p", "udp", "-j", "DROP")
    ipt(ns, 4, "-A", "NFQIPSEC-IN", "-p", "tcp", "-j", "ACCEPT")
    ipt(ns, 4, "-A", "NFQIPSEC-IN", "-j", "NFQIPSEC-OLD")
    ipt(ns, 4, "-I", "INPUT", "-j", "NFQIPSEC-IN")
    ipt(ns, 4, "-A", "INPUT", "-j", "NFQIPSEC-IN")
    ipt(ns, 4, "-I", "FORWARD", "-p", "icmp", "-j", "NFQIPSEC-OLD")
    ipt(ns, 6, "-N", "NFQIPSEC-OUT")
    ipt(ns, 6, "-A", "NFQIPSEC-OUT", "-j", "DROP")
    for _ in range(3):
        ipt(ns, 6, "-A", "OUTPUT", "-j", "NFQIPSEC-OUT")

    plan = make_plan(*SAMPLE_POLICIES, sad=SAMPLE_SAS)
    install(ns, plan, tmp_path)
    check_installed(ns, plan, user)
    install(ns, plan, tmp_path)
    check_installed(ns, plan, user)
    hooks_cli(ns, "remove")
    assert {fam: save(ns, fam) for fam in (4, 6)} == user


def test_failed_install_leaves_previous_state(topo: Topology, tmp_path: Path) -> None:
    ns = topo.add("h")
    add_user_rules(ns)
    user = {fam: save(ns, fam) for fam in (4, 6)}
    good = make_plan(*SAMPLE_POLICIES, sad=SAMPLE_SAS)
    # the kernel refuses this one only at the IPv6 commit (MASQUERADE is nat-only): IPv4 has
    # been committed by then and must be put back
    late = HookPlan((*good.rules, Rule(6, "NFQIPSEC-OUT", target="MASQUERADE")), good.chains, good.jumps)
    # and this one fails while building the IPv4 table, before any commit
    bad_option = Rule(4, "NFQIPSEC-OUT", proto=6, matches=(MatchSpec("tcp", (("nope", "1"),)),),
                      target="RETURN")
    early = HookPlan((*good.rules, bad_option), good.chains, good.jumps)
    for bad in (late, early):
        r = install(ns, bad, tmp_path, check=False)
        assert r.returncode == 1 and "installing the iptables hooks failed" in r.stderr
        assert {fam: save(ns, fam) for fam in (4, 6)} == user  # nothing half-installed
    install(ns, good, tmp_path)
    installed = {fam: save(ns, fam) for fam in (4, 6)}
    for bad in (late, early):
        r = install(ns, bad, tmp_path, check=False)
        assert r.returncode == 1
        assert {fam: save(ns, fam) for fam in (4, 6)} == installed
    hooks_cli(ns, "remove")
    assert {fam: save(ns, fam) for fam in (4, 6)} == user


def test_fail_open_adds_queue_bypass_everywhere(topo: Topology, tmp_path: Path) -> None:
    ns = topo.add("h")
    plan = make_plan(*SAMPLE_POLICIES, sad=SAMPLE_SAS, workers=2, fail_open=True,
                     default={Direction.OUT: Action.DISCARD})
    install(ns, plan, tmp_path)
    for fam in (4, 6):
        queued = [ln for ln in save(ns, fam) if "-j NFQUEUE" in ln]
        assert len(queued) == sum(r.target == "NFQUEUE" for r in plan.rules_for(fam)) > 5
        assert all(ln.endswith("--queue-bypass") for ln in queued)


# --- real packets ----------------------------------------------------------------------------
def _pair(topo: Topology) -> tuple[Namespace, Namespace]:
    a, b = topo.add("a"), topo.add("b")
    topo.link(a, [f"{A4}/24", f"{A6}/64"], b, [f"{B4}/24", f"{B6}/64"])
    return a, b


def _policy_rule(st: dict[str, Any], fam: int, chain: str, name: str) -> dict[str, Any]:
    rules = st["families"][f"ipv{fam}"]["chains"][chain]
    return next(r for r in rules if r.get("policy") == name)  # type: ignore[no-any-return]


def test_matching_packets_are_queued_others_pass(topo: Topology, tmp_path: Path) -> None:
    a, b = _pair(topo)
    assert ping(a, B4, count=1).returncode == 0
    policies = (pol("echo-from-a", "in", "discard", src=f"{A4}/32", proto=1, icmp_type=8),
                pol("v6-udp", "in", "discard", dst=f"{B6}/128", proto=17, dport=(5000, 5001)))
    install(b, make_plan(*policies), tmp_path)
    # fail closed: the echo requests are queued, nobody listens, the kernel drops them
    assert ping(a, B4, count=2, timeout=1).returncode != 0
    assert ping(a, B6, count=2).returncode == 0  # no IPv6 policy matches: passes
    assert ping(b, A4, count=2).returncode == 0  # replies to b's own echo (type 0) pass too
    st = status(b)
    assert _policy_rule(st, 4, "NFQIPSEC-IN", "echo-from-a")["packets"] == 2
    assert _policy_rule(st, 6, "NFQIPSEC-IN", "v6-udp")["packets"] == 0

    # fail open: still queued (counted), but with no listener the kernel lets them through
    install(b, make_plan(*policies, fail_open=True), tmp_path)
    assert ping(a, B4, count=2).returncode == 0
    assert _policy_rule(status(b), 4, "NFQIPSEC-IN", "echo-from-a")["packets"] == 2

    hooks_cli(b, "remove")
    install(b, make_plan(*policies, default={Direction.OUT: Action.DISCARD}), tmp_path)
    res = ping(b, A6, count=1, timeout=1)  # catch-all in OUT: everything queued, so dropped
    assert res.returncode != 0, res.stdout + b.run(["ip6tables-legacy-save", "-c"]).stdout
    assert ping(b, "127.0.0.1", count=1).returncode == 0  # ... except loopback
    hooks_cli(b, "remove")
    assert ping(a, B4, count=1).returncode == 0


def test_loopback_exemption_is_only_lo(topo: Topology, tmp_path: Path) -> None:
    """`-i lo` / `-o lo -j RETURN` must not match an interface whose name only looks like
    "lo" bit by bit: python-iptables gives IPv6 rules a 0x01 interface mask, under which "no"
    is "lo". The interface here is called "no" on purpose, so the test is deterministic."""
    a, b = topo.add("a"), topo.add("b")
    b.run(["ip", "link", "add", "name", "no", "type", "veth", "peer", "name", "on", "netns", a.name])
    for ns, ifname, addrs in ((a, "on", (f"{A4}/24", f"{A6}/64")), (b, "no", (f"{B4}/24", f"{B6}/64"))):
        ns.sysctl(f"net.ipv6.conf.{ifname}.accept_dad", "0")
        for addr in addrs:
            ns.run(["ip", "addr", "add", addr, "dev", ifname, *(["nodad"] if ":" in addr else [])])
        ns.run(["ip", "link", "set", "dev", ifname, "up"])
    for ns, ifname in ((a, "on"), (b, "no")):
        wait_link_ready(ns, ifname)
    assert ping(a, B6, count=1).returncode == 0 and ping(a, B4, count=1).returncode == 0
    install(b, make_plan(default={Direction.IN: Action.DISCARD, Direction.OUT: Action.DISCARD}), tmp_path)
    for ns, dst in ((b, A4), (b, A6), (a, B4), (a, B6)):  # all queued by the catch-alls, none exempt
        assert ping(ns, dst, count=1, timeout=1).returncode != 0, f"{ns.name} -> {dst} was not queued"
    for dst in ("127.0.0.1", "::1"):
        assert ping(b, dst, count=1).returncode == 0  # real loopback is exempt
    st = status(b)
    for fam in (4, 6):
        chains = st["families"][f"ipv{fam}"]["chains"]
        assert next(r for r in chains["NFQIPSEC-OUT"] if r.get("default") == "out")["packets"] >= 1
        assert next(r for r in chains["NFQIPSEC-IN"] if r.get("default") == "in")["packets"] >= 1


def test_forward_sees_reassembled_packets(topo: Topology, tmp_path: Path) -> None:
    """The conntrack no-op rule loads defragmentation: FORWARD then sees whole datagrams, so
    port selectors also catch what arrived as non-first fragments."""
    a, r, b = topo.add("a"), topo.add("r", forwarding=True), topo.add("b")
    topo.link(a, [f"{A4}/24", f"{A6}/64"], r, ["192.0.2.254/24", "2001:db8:1::fe/64"])
    topo.link(r, ["198.51.100.254/24", "2001:db8:2::fe/64"], b, ["198.51.100.1/24", "2001:db8:2::1/64"])
    topo.route(a, "198.51.100.0/24", "192.0.2.254")
    topo.route(a, "2001:db8:2::/64", "2001:db8:1::fe")
    topo.route(b, "192.0.2.0/24", "198.51.100.254")
    topo.route(b, "2001:db8:1::/64", "2001:db8:2::fe")
    for fam in (4, 6):  # counts datagrams of 3000+ bytes crossing FORWARD
        ipt(r, fam, "-A", "FORWARD", "-m", "length", "--length", "3000:65535")

    def big_forwarded() -> dict[int, int]:
        return {fam: rule_counters(r, fam, "FORWARD")[-1][0] for fam in (4, 6)}

    for dst in ("198.51.100.1", "2001:db8:2::1"):
        res = ping(a, dst, count=2, size=4000, df=False if ":" not in dst else None)
        assert res.returncode == 0, res.stdout
    assert big_forwarded() == {4: 0, 6: 0}  # without the hooks: only fragments of <= 1500 bytes

    install(r, make_plan(), tmp_path)
    for dst in ("198.51.100.1", "2001:db8:2::1"):
        res = ping(a, dst, count=2, size=4000, df=False if ":" not in dst else None)
        assert res.returncode == 0, res.stdout
    assert big_forwarded() == {4: 4, 6: 4}  # 2 requests + 2 replies, each reassembled
    hooks_cli(r, "remove")


@pytest.mark.slow
def test_install_time_for_50_policies(topo: Topology, tmp_path: Path) -> None:
    ns = topo.add("h")
    policies = []
    for i in range(50):
        d = ("in", "out", "fwd")[i % 3]
        dst = f"198.51.100.{i}/32" if i % 2 else f"2001:db8:{i:x}::/64"
        policies.append(pol(f"p{i}", d, dst=dst, proto=6, dport=(1000 + i, 1000 + i)))
    plan = make_plan(*policies, default={Direction.IN: Action.DISCARD})
    assert len(plan.rules) > 80
    seconds = json.loads(install(ns, plan, tmp_path).stdout)["seconds"]
    again = json.loads(install(ns, plan, tmp_path).stdout)["seconds"]
    print(f"install of {len(plan.rules)} rules (50 policies): {seconds:.3f} s, reinstall {again:.3f} s")
    assert seconds < 5 and again < 5
