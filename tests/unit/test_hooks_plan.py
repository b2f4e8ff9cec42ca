"""plan(): which iptables rules a configuration yields (pure, no root needed).

The expected rules are written out in iptables-save syntax, as `iptables-legacy-save` prints
them (the netns tests check that the kernel agrees). The property test at the end checks the
one thing that must never break: every flow a policy selector matches is queued by some rule
(over-queuing is fine, under-queuing would let protected traffic pass in clear).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nfq_ipsec import hooks
from nfq_ipsec.config import EngineSettings
from nfq_ipsec.flow import FlowKey
from nfq_ipsec.hooks import HookPlan, MatchSpec, Rule
from nfq_ipsec.spd import Action, Direction, Policy, Selector, Spd

MARK = "-m mark --mark 0x4e510000/0xffff0000 -j RETURN"


@dataclass(frozen=True)
class FakeSettings:
    """Just the attributes hooks.plan() reads (config.EngineSettings has them all)."""

    queue_num: int = 0
    fail_open: bool = False
    mark: int = 0x4E510000
    mark_mask: int = 0xFFFF0000
    tunnel_device: str | None = "nfqipsec0"
    workers: int = 1
    chain_prefix: str = "NFQIPSEC"
    default_policy: dict[Direction, Action] = field(default_factory=dict)


@dataclass
class FakeSa:
    name: str
    proto: str
    spi: int
    dst: Any

    def __post_init__(self) -> None:
        self.dst = ipaddress.ip_address(self.dst)


class FakeSad:
    def __init__(self, *sas: FakeSa) -> None:
        self.sas = list(sas)

    def list(self) -> list[FakeSa]:
        return self.sas


def net(s: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(s)


def make_spd(*policies: Policy, default: dict[Direction, Action] | None = None) -> Spd:
    spd = Spd(default or {})
    for p in policies:
        spd.add(p)
    return spd


def pol(name: str, direction: str, action: str = "bypass", sa: str | None = None, priority: int = 0,
        **sel: Any) -> Policy:
    for k in ("src", "dst"):
        if isinstance(sel.get(k), str):
            sel[k] = net(sel[k])
    return Policy(name, Direction(direction), Selector(**sel), Action(action), sa=sa, priority=priority)


def chain(p: HookPlan, family: int, name: str) -> list[str]:
    """The chain's rules in iptables-save syntax, without the `-A CHAIN ` prefix."""
    prefix = f"-A {p.prefix}-{name} "
    out = []
    for r in p.rules_for(family, f"{p.prefix}-{name}"):
        line = r.render()
        assert line.startswith(prefix)
        out.append(line[len(prefix):])
    return out


def policy_lines(p: HookPlan, family: int, name: str) -> list[str]:
    return [line for line in chain(p, family, name) if "nfq-ipsec:" in line]


# --- the skeleton ------------------------------------------------------------------------------
def test_empty_config_all_bypass_exact_rules() -> None:
    p = hooks.plan(EngineSettings(), make_spd(), FakeSad())
    for fam in (4, 6):
        assert chain(p, fam, "IN") == [MARK, "-i lo -j RETURN", "-i nfqipsec0 -j RETURN",
                                       "-p esp -j NFQUEUE --queue-num 0", "-p ah -j NFQUEUE --queue-num 0"]
        assert chain(p, fam, "OUT") == [MARK, "-o lo -j RETURN"]
        assert chain(p, fam, "FWD") == [MARK, "-i nfqipsec0 -j RETURN", "-m conntrack --ctstate INVALID -j RETURN"]
    assert p.chains == {4: ("NFQIPSEC-IN", "NFQIPSEC-OUT", "NFQIPSEC-FWD"),
                        6: ("NFQIPSEC-IN", "NFQIPSEC-OUT", "NFQIPSEC-FWD")}
    assert p.jumps == (("INPUT", "NFQIPSEC-IN"), ("OUTPUT", "NFQIPSEC-OUT"), ("FORWARD", "NFQIPSEC-FWD"))
    # our part of iptables-save -t filter, in save order (chains sorted, builtins in table order)
    assert p.render(4)[:6] == [":NFQIPSEC-FWD - [0:0]", ":NFQIPSEC-IN - [0:0]", ":NFQIPSEC-OUT - [0:0]",
                               "-A INPUT -j NFQIPSEC-IN", "-A FORWARD -j NFQIPSEC-FWD",
                               "-A OUTPUT -j NFQIPSEC-OUT"]
    assert p.render(4)[6] == f"-A NFQIPSEC-FWD {MARK}"


def test_chain_prefix_queue_num_and_full_mask() -> None:
    s = FakeSettings(chain_prefix="VPN", queue_num=7, mark=0x10, mark_mask=0xFFFFFFFF, tunnel_device=None)
    p = hooks.plan(s, make_spd(default={Direction.OUT: Action.DISCARD}), FakeSad())
    assert set(p.chains[4]) == {"VPN-IN", "VPN-OUT", "VPN-FWD"}
    assert chain(p, 4, "IN") == ["-m mark --mark 0x10 -j RETURN", "-i lo -j RETURN",
                                 "-p esp -j NFQUEUE --queue-num 7", "-p ah -j NFQUEUE --queue-num 7"]
    assert chain(p, 6, "OUT")[-1] == '-m comment --comment "nfq-ipsec-default:out" -j NFQUEUE --queue-num 7'


@pytest.mark.parametrize("kw, message", [
    ({"mark": 0}, "bit set inside the mask"),
    ({"mark": 0x10000, "mark_mask": 0xFF}, "bit set inside the mask"),
    ({"mark": 0x1FF, "mark_mask": 0xFF}, "outside mask"),
    ({"mark_mask": 0}, "mask non-zero"),
    ({"queue_num": 65535, "workers": 2}, "0..65535"),
    ({"queue_num": -1}, "0..65535"),
    ({"tunnel_device": "a b"}, "interface name"),
    ({"tunnel_device": "x" * 16}, "interface name"),
    ({"chain_prefix": "NFQ-IPSEC"}, "chain prefix"),
    ({"chain_prefix": "X" * 25}, "chain prefix"),
])
def test_unsafe_settings_are_refused(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        hooks.plan(FakeSettings(**kw), make_spd(), FakeSad())


def test_empty_tunnel_device_means_none() -> None:
    p = hooks.plan(FakeSettings(tunnel_device=""), make_spd(), FakeSad())
    assert not any("-i " in line and "lo" not in line for line in chain(p, 4, "IN"))


# --- selectors -> matches --------------------------------------------------------------------
@pytest.mark.parametrize("sel, v4, v6", [
    (dict(src="192.0.2.0/24"), ["-s 192.0.2.0/24"], []),
    (dict(dst="192.0.2.7/32"), ["-d 192.0.2.7/32"], []),
    (dict(src="2001:db8::/32", dst="2001:db8:1::9/128"), [], ["-s 2001:db8::/32 -d 2001:db8:1::9/128"]),
    (dict(dst="0.0.0.0/0"), [""], []),  # any IPv4: no -d, but still IPv4 only
    (dict(src="::/0", proto=17), [], ["-p udp"]),
    (dict(), [""], [""]),  # no addresses: both families
    (dict(proto=6), ["-p tcp"], ["-p tcp"]),
    (dict(proto=6, sport=(1000, 2000)), ["-p tcp -m tcp --sport 1000:2000"],
     ["-p tcp -m tcp --sport 1000:2000"]),
    (dict(proto=17, dport=(53, 53)), ["-p udp -m udp --dport 53"], ["-p udp -m udp --dport 53"]),
    (dict(proto=17, sport=(0, 65535), dport=(0, 1023)), ["-p udp -m udp --dport 0:1023"],
     ["-p udp -m udp --dport 0:1023"]),
    (dict(proto=6, sport=(0, 65535)), ["-p tcp"], ["-p tcp"]),  # full range = ANY
    (dict(proto=132, sport=(5, 5), dport=(9, 10)), ["-p sctp -m sctp --sport 5 --dport 9:10"],
     ["-p sctp -m sctp --sport 5 --dport 9:10"]),
    (dict(proto=33, dport=(5000, 65535)), ["-p dccp -m dccp --dport 5000:65535"],
     ["-p dccp -m dccp --dport 5000:65535"]),
    (dict(proto=136, dport=(7, 7)), ["-p udplite"], ["-p udplite"]),  # no UDP-Lite port match: wider rule
    (dict(proto=1, icmp_type=8), ["-p icmp -m icmp --icmp-type 8"], ["-p icmp"]),
    (dict(proto=1, icmp_type=3, icmp_code=4, dst="198.51.100.0/24"),
     ["-d 198.51.100.0/24 -p icmp -m icmp --icmp-type 3/4"], []),
    (dict(proto=58, icmp_type=128, icmp_code=0), ["-p ipv6-icmp"],
     ["-p ipv6-icmp -m icmp6 --icmpv6-type 128/0"]),
    (dict(proto=58, icmp_type=2, src="2001:db8::/48"), [],
     ["-s 2001:db8::/48 -p ipv6-icmp -m icmp6 --icmpv6-type 2"]),
    (dict(proto=50), ["-p esp"], ["-p esp"]),
    (dict(proto=4, src="203.0.113.0/24"), ["-s 203.0.113.0/24 -p ipencap"], []),
    (dict(proto=0), [""], [""]),  # 0 = any
])
def test_selector_forms(sel: dict[str, Any], v4: list[str], v6: list[str]) -> None:
    p = hooks.plan(FakeSettings(), make_spd(pol("p1", "in", **sel)), FakeSad())
    comment = '-m comment --comment "nfq-ipsec:p1" -j NFQUEUE --queue-num 0'
    for fam, want in ((4, v4), (6, v6)):
        assert policy_lines(p, fam, "IN") == [f"{w} {comment}".lstrip() for w in want]


def test_policy_rule_order_follows_spd_and_directions() -> None:
    spd = make_spd(
        pol("late-in", "in", priority=10, proto=6),
        pol("early-in", "in", priority=1, proto=17),
        pol("out-1", "out", dst="192.0.2.9/32"),
        pol("fwd-1", "fwd", src="198.51.100.0/24"),
        pol("out-2", "out", proto=58),
    )
    p = hooks.plan(FakeSettings(), spd, FakeSad())
    names = [line.split('"')[1] for line in policy_lines(p, 4, "IN")]
    assert names == ["nfq-ipsec:early-in", "nfq-ipsec:late-in"]
    assert [line.split('"')[1] for line in policy_lines(p, 4, "OUT")] == [
        "nfq-ipsec:out-1", "nfq-ipsec:out-2"]
    # forwarded traffic: fwd policies (arrival) then out policies (departure)
    assert [line.split('"')[1] for line in policy_lines(p, 4, "FWD")] == [
        "nfq-ipsec:fwd-1", "nfq-ipsec:out-1", "nfq-ipsec:out-2"]
    assert [line.split('"')[1] for line in policy_lines(p, 6, "FWD")] == ["nfq-ipsec:out-2"]
    # mark first everywhere, conntrack last in FWD
    for fam in (4, 6):
        for c in ("IN", "OUT", "FWD"):
            assert chain(p, fam, c)[0] == MARK
        assert chain(p, fam, "FWD")[-1] == "-m conntrack --ctstate INVALID -j RETURN"


# --- defaults -----------------------------------------------------------------------------------
@pytest.mark.parametrize("defaults, expect", [
    ({}, set()),
    ({Direction.IN: Action.DISCARD}, {"IN"}),
    ({Direction.OUT: Action.DISCARD}, {"OUT", "FWD"}),  # forwarded traffic also leaves through out
    ({Direction.FWD: Action.DISCARD}, {"FWD"}),
    ({Direction.IN: Action.DISCARD, Direction.OUT: Action.DISCARD, Direction.FWD: Action.DISCARD},
     {"IN", "OUT", "FWD"}),
])
def test_catch_all_only_where_default_is_not_bypass(defaults: dict[Direction, Action],
                                                    expect: set[str]) -> None:
    p = hooks.plan(FakeSettings(), make_spd(default=defaults), FakeSad())
    for fam in (4, 6):
        got = set()
        for c in ("IN", "OUT", "FWD"):
            catch = [i for i, line in enumerate(chain(p, fam, c)) if "nfq-ipsec-default:" in line]
            if catch:
                got.add(c)
                rules = chain(p, fam, c)
                assert rules[catch[0]] == (f'-m comment --comment "nfq-ipsec-default:{c.lower()}" '
                                           "-j NFQUEUE --queue-num 0")
                # after every policy rule; in FWD only the conntrack no-op follows
                assert catch[0] == len(rules) - (2 if c == "FWD" else 1)
        assert got == expect


def test_settings_default_policy_also_counts() -> None:
    """An SPD built with other defaults than the settings: either saying discard queues."""
    s = FakeSettings(default_policy={Direction.IN: Action.DISCARD})
    p = hooks.plan(s, make_spd(), FakeSad())
    assert any("nfq-ipsec-default:in" in line for line in chain(p, 4, "IN"))


# --- workers and SPIs ----------------------------------------------------------------------------
SAS = FakeSad(
    FakeSa("in-a", "esp", 0x1000, "192.0.2.2"),
    FakeSa("out-a", "esp", 0x1001, "192.0.2.1"),
    FakeSa("in-6", "ah", 0x2000, "2001:db8::2"),
    FakeSa("lonely", "esp", 0xFFFFFFFF, "2001:db8::2"),  # no policy: treated as inbound
)
SA_POLICIES = (
    pol("p-in", "in", "protect", sa="in-a", src="192.0.2.1/32"),
    pol("p-out", "out", "protect", sa="out-a", dst="192.0.2.1/32"),
    pol("p-in6", "in", "protect", sa="in-6", src="2001:db8::1/128"),
)
WORKER = {"in-a": 1, "out-a": 2, "in-6": 3, "lonely": 0}


def test_workers_one_rule_per_inbound_spi() -> None:
    p = hooks.plan(FakeSettings(workers=4, queue_num=10), make_spd(*SA_POLICIES), SAS, WORKER.__getitem__)
    assert chain(p, 4, "IN")[3:6] == [
        '-d 192.0.2.2/32 -p esp -m esp --espspi 4096 -m comment --comment "nfq-ipsec-sa:in-a" '
        "-j NFQUEUE --queue-num 11",
        "-p esp -j NFQUEUE --queue-num 10",
        "-p ah -j NFQUEUE --queue-num 10",
    ]
    assert chain(p, 6, "IN")[3:7] == [
        '-d 2001:db8::2/128 -p esp -m esp --espspi 4294967295 -m comment --comment "nfq-ipsec-sa:lonely" '
        "-j NFQUEUE --queue-num 10",
        "-p esp -j NFQUEUE --queue-num 10",
        '-d 2001:db8::2/128 -p ah -m ah --ahspi 8192 -m comment --comment "nfq-ipsec-sa:in-6" '
        "-j NFQUEUE --queue-num 13",
        "-p ah -j NFQUEUE --queue-num 10",
    ]
    # the outbound SA's SPI never appears; policies go to their SA's worker
    assert not any("out-a" in r.render() and "-sa:" in r.render() for r in p.rules)
    assert policy_lines(p, 4, "OUT") == [
        '-d 192.0.2.1/32 -m comment --comment "nfq-ipsec:p-out" -j NFQUEUE --queue-num 12']
    assert policy_lines(p, 4, "IN")[0].endswith("--queue-num 11")
    assert policy_lines(p, 6, "IN")[0].endswith("--queue-num 13")


def test_single_worker_has_no_spi_rules() -> None:
    p = hooks.plan(FakeSettings(workers=1, queue_num=4), make_spd(*SA_POLICIES), SAS)
    assert not any("spi" in r.render() for r in p.rules)
    assert all(r.render().endswith("--queue-num 4") for r in p.rules if r.target == "NFQUEUE")


def test_worker_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="worker 5"):
        hooks.plan(FakeSettings(workers=2), make_spd(*SA_POLICIES), SAS, lambda _sa: 5)


def test_real_security_associations() -> None:
    pytest.importorskip("nfq_ipsec.esp")
    from nfq_ipsec.sa import SecurityAssociation
    from nfq_ipsec.sad import Sad

    sad = Sad()
    sad.add(SecurityAssociation(name="in-a", proto="esp", mode="transport", src="192.0.2.1", dst="192.0.2.2",
                                spi=0x1000, aead="aes-gcm-128", key=bytes(20)))
    p = hooks.plan(FakeSettings(workers=2), make_spd(), sad, lambda _sa: 1)
    assert chain(p, 4, "IN")[3].startswith("-d 192.0.2.2/32 -p esp -m esp --espspi 4096 ")
    assert chain(p, 4, "IN")[3].endswith("--queue-num 1")


# --- fail open / closed -------------------------------------------------------------------------
def test_queue_bypass_only_when_fail_open() -> None:
    spd = make_spd(*SA_POLICIES, default={Direction.OUT: Action.DISCARD})
    closed = hooks.plan(FakeSettings(workers=2), spd, SAS, lambda _sa: 1)
    opened = hooks.plan(FakeSettings(workers=2, fail_open=True), spd, SAS, lambda _sa: 1)
    queued_closed = [r.render() for r in closed.rules if r.target == "NFQUEUE"]
    queued_open = [r.render() for r in opened.rules if r.target == "NFQUEUE"]
    assert len(queued_closed) == len(queued_open) > 10
    assert not any("--queue-bypass" in line for line in queued_closed)
    assert all(line.endswith(" --queue-bypass") for line in queued_open)
    assert [line.removesuffix(" --queue-bypass") for line in queued_open] == queued_closed


# --- rendering details -------------------------------------------------------------------------
@pytest.mark.parametrize("text, saved", [
    ("plain-name_1", "plain-name_1"),
    ("nfq-ipsec:p", '"nfq-ipsec:p"'),
    ("with space", '"with space"'),
    ('q"u\\o\'te', '"q\\"u\\\\o\\\'te"'),
])
def test_comment_quoting_like_xtables_save_string(text: str, saved: str) -> None:
    r = Rule(4, "X", matches=(MatchSpec("comment", (("comment", text),)),), target="RETURN")
    assert r.render() == f"-A X -m comment --comment {saved} -j RETURN"


def test_long_policy_name_is_cut_to_the_kernel_limit() -> None:
    name = "é" * 200  # 400 bytes
    p = hooks.plan(FakeSettings(), make_spd(pol(name, "in", proto=6)), FakeSad())
    comment = next(r.comment for r in p.rules_for(4, "NFQIPSEC-IN") if r.comment and "é" in r.comment)
    assert comment is not None
    assert len(comment.encode()) <= 255 and comment.startswith("nfq-ipsec:é")


def test_negated_and_flag_rendering() -> None:
    r = Rule(6, "C", src="2001:db8::/32", in_iface="eth0", proto=6,
             matches=(MatchSpec("tcp", (("!dport", "22"),)),), target="NFQUEUE",
             target_options=(("queue-num", "3"), ("queue-bypass", "")), negated=frozenset({"src", "in"}))
    assert r.render() == ("-A C ! -s 2001:db8::/32 ! -i eth0 -p tcp -m tcp ! --dport 22 "
                          "-j NFQUEUE --queue-num 3 --queue-bypass")
    assert Rule(4, "C", proto=6).render() == "-A C -p tcp"
    assert hooks.protocol_name(58) == "ipv6-icmp" and hooks.protocol_name(50) == "esp"


def test_plan_dict_roundtrip() -> None:
    p = hooks.plan(FakeSettings(workers=3, fail_open=True), make_spd(*SA_POLICIES), SAS, lambda _sa: 2)
    again = HookPlan.from_dict(p.to_dict())
    assert again == p
    assert [r.render() for r in again.rules] == [r.render() for r in p.rules]


def test_status_formatting() -> None:
    st = {"prefix": "NFQIPSEC", "installed": False, "families": {
        "ipv4": {"chains": {"NFQIPSEC-IN": [{"rule": "-A NFQIPSEC-IN -p esp -j NFQUEUE --queue-num 0",
                                             "packets": 5, "bytes": 600}]},
                 "jumps": [{"chain": "INPUT", "position": 1, "target": "NFQIPSEC-IN",
                            "packets": 9, "bytes": 9}]},
        "ipv6": {"error": "can't initialize filter"}}}
    text = hooks.format_status(st)
    assert "NOT (fully) installed" in text
    assert "INPUT #1 -> NFQIPSEC-IN" in text and "600  -A NFQIPSEC-IN -p esp" in text
    assert "error: can't initialize filter" in text


# --- the safety property: no flow a selector matches escapes the rules ----------------------------
def _rule_matches(rule: Rule, flow: FlowKey) -> bool:
    """iptables semantics of the rule subset plan() emits (no interface rules for policies)."""
    if rule.family != flow.family:
        return False
    for spec, addr in ((rule.src, flow.src), (rule.dst, flow.dst)):
        if spec is not None:
            n = ipaddress.ip_network(spec)
            if addr & int(n.netmask) != int(n.network_address):
                return False
    if rule.proto is not None and rule.proto != flow.proto:
        return False
    for m in rule.matches:
        opts = dict(m.options)
        if m.name in ("tcp", "udp", "sctp", "dccp"):
            for key, port in (("sport", flow.sport), ("dport", flow.dport)):
                if key in opts:
                    lo, _, hi = opts[key].partition(":")
                    if not int(lo) <= port <= int(hi or lo):
                        return False
        elif m.name in ("icmp", "icmp6"):
            t, _, c = next(iter(opts.values())).partition("/")
            if flow.icmp_type != int(t) or (c and flow.icmp_code != int(c)):
                return False
        elif m.name != "comment":
            raise AssertionError(f"unexpected match {m.name}")
    return True


V4_NETS = st.builds(lambda a, p: ipaddress.IPv4Network((a & ~((1 << (32 - p)) - 1) & 0xFFFFFFFF, p)),
                    st.integers(0, 2**32 - 1), st.integers(0, 32))
V6_NETS = st.builds(lambda a, p: ipaddress.IPv6Network((a & ~((1 << (128 - p)) - 1), p)),
                    st.integers(0, 2**128 - 1), st.integers(0, 128))
PORTS = st.one_of(st.none(),
                  st.tuples(st.integers(0, 65535), st.integers(0, 65535)).map(lambda t: (min(t), max(t))))


@st.composite
def selectors(draw: st.DrawFn) -> Selector:
    fam = draw(st.sampled_from([None, 4, 6]))
    nets = {None: st.none(), 4: st.one_of(st.none(), V4_NETS), 6: st.one_of(st.none(), V6_NETS)}[fam]
    proto = draw(st.sampled_from([None, 0, 1, 6, 17, 33, 58, 132, 136, 50, 47]))
    if (proto == 1 and fam == 6) or (proto == 58 and fam == 4):
        proto = None
    kw: dict[str, Any] = {"src": draw(nets), "dst": draw(nets), "proto": proto}
    if proto in (6, 17, 33, 132, 136):
        kw["sport"], kw["dport"] = draw(PORTS), draw(PORTS)
    if proto in (1, 58) and draw(st.booleans()):
        kw["icmp_type"] = draw(st.integers(0, 255))
        if draw(st.booleans()):
            kw["icmp_code"] = draw(st.integers(0, 255))
    return Selector(**kw)


def _flow_inside(sel: Selector, data: st.DataObject) -> FlowKey:
    fam = sel.family or data.draw(st.sampled_from([4, 6]))
    bits = 32 if fam == 4 else 128

    def addr(n: Any) -> int:
        if n is None:
            return data.draw(st.integers(0, 2**bits - 1))
        return int(n.network_address) | data.draw(st.integers(0, 2 ** (bits - n.prefixlen) - 1))

    def port(r: tuple[int, int] | None) -> int:
        return data.draw(st.integers(*(r or (-1, 65535))))

    proto = sel.proto if sel.proto is not None else data.draw(st.integers(0, 255))
    itype = sel.icmp_type if sel.icmp_type is not None else data.draw(st.integers(-1, 255))
    icode = sel.icmp_code if sel.icmp_code is not None else data.draw(st.integers(-1, 255))
    return FlowKey(fam, addr(sel.src), addr(sel.dst), proto, port(sel.sport), port(sel.dport), itype, icode)


@settings(max_examples=300, deadline=None)
@given(sel=selectors(), direction=st.sampled_from(["in", "out", "fwd"]), data=st.data())
def test_every_matching_flow_is_queued(sel: Selector, direction: str, data: st.DataObject) -> None:
    p = hooks.plan(FakeSettings(), make_spd(Policy("p", Direction(direction), sel, Action.BYPASS)), FakeSad())
    flow = _flow_inside(sel, data)
    if not sel.matches(flow):  # e.g. OPAQUE ports drawn for a port selector: not this policy's flow
        return
    chains = {"in": ["IN"], "out": ["OUT", "FWD"], "fwd": ["FWD"]}[direction]
    for c in chains:
        rules = [r for r in p.rules_for(flow.family, f"NFQIPSEC-{c}")
                 if (r.comment or "").startswith("nfq-ipsec:")]
        assert any(_rule_matches(r, flow) for r in rules), (c, sel, flow, [r.render() for r in rules])
    # and the rule never leaks into the wrong family
    assert all(r.family in ((sel.family,) if sel.family else (4, 6)) for r in p.rules
               if (r.comment or "").startswith("nfq-ipsec:"))


def test_engine_settings_replace_still_plans() -> None:
    s = replace(EngineSettings(), workers=2, queue_num=3, fail_open=True)
    p = hooks.plan(s, make_spd(), FakeSad())
    assert chain(p, 4, "IN")[3] == "-p esp -j NFQUEUE --queue-num 3 --queue-bypass"


def test_install_refuses_rules_outside_its_own_chains() -> None:
    """Checked before python-iptables is even loaded: nothing is written."""
    p = hooks.plan(FakeSettings(), make_spd(), FakeSad())
    for stray in (Rule(4, "INPUT", target="ACCEPT"), Rule(6, "USERCHAIN", target="RETURN")):
        with pytest.raises(hooks.HookError, match="not in the plan's own chains"):
            hooks.install(HookPlan((*p.rules, stray), p.chains, p.jumps, p.prefix))


@pytest.mark.parametrize("family", [4, 6])
def test_interface_masks_cover_the_whole_name(family: int) -> None:
    """python-iptables' Rule6 sets 0x01 interface masks (only bit 0 of each character is
    compared: `-i lo` would match "no", "vX..." ...); _to_iptc must produce iptables' 0xff."""
    pytest.importorskip("iptc")
    ipt = hooks._iptc()  # building a rule in memory needs no root and touches no table
    r = hooks._to_iptc(ipt, Rule(family, "X", in_iface="lo", out_iface="ppp+", target="RETURN"))
    ip = r.get_ip()
    assert bytes(ip.iniface_mask) == b"\xff" * 3  # "lo" and its NUL (trailing zeros not shown)
    assert bytes(ip.outiface_mask) == b"\xff" * 3  # "ppp", no NUL: wildcard
    assert (r.in_interface, r.out_interface) == ("lo", "ppp+")
