"""SPD: selector matching on FlowKey ints, ordering, defaults, explain, shadowing."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nfq_ipsec.flow import FlowKey
from nfq_ipsec.spd import Action, Direction, Policy, Selector, Spd


def flow(
    src: str, dst: str, proto: int = 6, sport: int = -1, dport: int = -1, itype: int = -1, icode: int = -1
) -> FlowKey:
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    return FlowKey(s.version, int(s), int(d), proto, sport, dport, itype, icode)


def sel(**kw: object) -> Selector:
    return Selector(**kw)  # type: ignore[arg-type]


def pol(name: str, selector: Selector, action: Action = Action.BYPASS, *, dir: Direction = Direction.OUT,
        sa: str | None = None, priority: int = 0) -> Policy:
    return Policy(name, dir, selector, action, sa=sa, priority=priority)


TCP_V4 = flow("192.0.2.10", "198.51.100.20", 6, 40000, 443)
TCP_V6 = flow("2001:db8::10", "2001:db8:1::20", 6, 40000, 443)


# -- Selector ----------------------------------------------------------------------------------


def test_empty_selector_matches_both_families() -> None:
    s = Selector()
    assert s.matches(TCP_V4) and s.matches(TCP_V6)
    assert s.mismatch(TCP_V4) is None


def test_prefixes_and_family() -> None:
    s = sel(src="192.0.2.0/24", dst="198.51.100.16/28")
    assert s.matches(TCP_V4)
    assert not s.matches(flow("192.0.2.10", "198.51.100.32"))
    assert not s.matches(flow("192.0.3.10", "198.51.100.20"))
    assert s.mismatch(flow("192.0.3.10", "198.51.100.20")) == "src 192.0.3.10 not in 192.0.2.0/24"
    assert s.mismatch(flow("192.0.2.10", "198.51.100.32")) == "dst 198.51.100.32 not in 198.51.100.16/28"
    any4 = sel(dst="0.0.0.0/0")
    assert any4.matches(TCP_V4)
    assert not any4.matches(TCP_V6)  # a v4 prefix never matches a v6 flow, even /0
    # the v6 int of ::c000:20a has the same low 32 bits as 192.0.2.10: must still not match
    assert not sel(src="192.0.2.0/24").matches(flow("::c000:20a", "::1"))
    assert sel(src="192.0.2.0/24").mismatch(TCP_V6) == "family: flow is IPv6, selector is IPv4"
    v6 = sel(src="2001:db8::/64", dst="2001:db8:1::/48")
    assert v6.matches(TCP_V6) and not v6.matches(TCP_V4)
    assert not v6.matches(flow("2001:db8:0:1::10", "2001:db8:1::20"))
    assert sel(dst="2001:db8:1::20/128").matches(TCP_V6)


def test_proto_and_ports() -> None:
    s = sel(proto=6, dport=(443, 443))
    assert s.matches(TCP_V4) and s.matches(TCP_V6)
    assert not s.matches(flow("192.0.2.10", "198.51.100.20", 17, 40000, 443))
    assert s.mismatch(flow("192.0.2.10", "198.51.100.20", 17, 40000, 443)) == "proto 17 is not 6"
    r = sel(proto=17, sport=(1000, 2000))
    for port, ok in ((999, False), (1000, True), (1500, True), (2000, True), (2001, False)):
        assert r.matches(flow("192.0.2.1", "192.0.2.2", 17, port, 53)) is ok
    assert r.mismatch(flow("192.0.2.1", "192.0.2.2", 17, 2001, 53)) == "sport 2001 not in 1000-2000"
    # non-first fragment: ports OPAQUE (-1) only match ANY (RFC 4301 §4.4.1.1)
    frag = flow("192.0.2.1", "192.0.2.2", 17)
    assert not r.matches(frag)
    assert "OPAQUE" in (r.mismatch(frag) or "")
    assert sel(proto=17).matches(frag)
    assert sel(proto=17, sport=(0, 65535)).matches(frag)  # the full range is ANY
    assert sel(proto=6, dport=22).dport == (22, 22)


def test_icmp_type_and_code() -> None:
    echo = flow("192.0.2.1", "192.0.2.2", 1, itype=8, icode=0)
    assert sel(proto=1, icmp_type=8).matches(echo)
    assert sel(proto=1, icmp_type=8, icmp_code=0).matches(echo)
    assert not sel(proto=1, icmp_type=8, icmp_code=1).matches(echo)
    assert not sel(proto=1, icmp_type=0).matches(echo)
    assert sel(proto=1, icmp_type=0).mismatch(echo) == "icmp type 8 is not 0"
    ptb = flow("2001:db8::1", "2001:db8::2", 58, itype=2, icode=0)
    assert sel(proto=58, icmp_type=2).matches(ptb)
    assert not sel(proto=1, icmp_type=2).matches(ptb)


@pytest.mark.parametrize(
    ("kw", "fragment"),
    [
        ({"src": "192.0.2.0/24", "dst": "2001:db8::/32"}, "different address families"),
        ({"src": "192.0.2.1/24"}, "host bits"),
        ({"src": "nonsense"}, "selector src"),
        ({"src": 5}, "selector src"),
        ({"proto": 256}, "0..255"),
        ({"proto": -1}, "0..255"),
        ({"sport": (80, 90)}, "ports need proto"),
        ({"proto": 1, "dport": (80, 90)}, "ports need proto"),
        ({"proto": 6, "dport": (90, 80)}, "port range"),
        ({"proto": 6, "dport": (0, 65536)}, "port range"),
        ({"proto": 6, "dport": (1, 2, 3)}, "port range"),
        ({"proto": 6, "icmp_type": 8}, "icmp_type needs proto"),
        ({"proto": 1, "icmp_type": 256}, "0..255"),
        ({"proto": 1, "icmp_code": 0}, "icmp_code needs icmp_type"),
        ({"proto": 58, "src": "192.0.2.0/24"}, "does not fit IPv4"),
        ({"proto": 1, "dst": "2001:db8::/32"}, "does not fit IPv6"),
    ],
)
def test_selector_validation(kw: dict[str, object], fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        sel(**kw)


def test_selector_equality_and_str() -> None:
    a = sel(src="192.0.2.0/24", proto=6, dport=(443, 443))
    assert a == sel(src=ipaddress.ip_network("192.0.2.0/24"), proto=6, dport=443)
    assert str(a) == "src 192.0.2.0/24 dst any proto 6 dport 443"
    assert a.as_dict()["dport"] == [443, 443]


# reference: the same semantics written with ipaddress objects
nets4 = st.builds(
    lambda a, p: ipaddress.IPv4Network((a, p), strict=False), st.integers(0, 2**32 - 1), st.integers(0, 32)
)
nets6 = st.builds(
    lambda a, p: ipaddress.IPv6Network((a, p), strict=False), st.integers(0, 2**128 - 1), st.integers(0, 128)
)


@settings(max_examples=250, deadline=None)
@given(
    data=st.data(),
    v6=st.booleans(),
    proto=st.sampled_from([None, 6, 17, 1]),
    use_src=st.booleans(),
    use_dst=st.booleans(),
)
def test_matches_agrees_with_ipaddress_reference(data: st.DataObject, v6: bool, proto: int | None,
                                                  use_src: bool, use_dst: bool) -> None:
    nets: st.SearchStrategy[ipaddress.IPv4Network | ipaddress.IPv6Network] = nets6 if v6 else nets4
    src = data.draw(nets) if use_src else None
    dst = data.draw(nets) if use_dst else None
    if proto == 1 and v6:
        proto = 58
    ports = None
    if proto in (6, 17):
        ports = data.draw(st.one_of(st.none(), st.tuples(st.integers(0, 100), st.integers(100, 200))))
    s = Selector(src=src, dst=dst, proto=proto, dport=ports)
    # flows: near the prefixes (inside or just outside) or anywhere, either family
    fam6 = data.draw(st.booleans())
    width = 128 if fam6 else 32

    def addr(net: ipaddress.IPv4Network | ipaddress.IPv6Network | None) -> int:
        if net is not None and net.version == (6 if fam6 else 4) and data.draw(st.booleans()):
            return (int(net.network_address) + data.draw(st.integers(-1, net.num_addresses))) % (1 << width)
        return data.draw(st.integers(0, (1 << width) - 1))

    f = FlowKey(6 if fam6 else 4, addr(src), addr(dst), data.draw(st.sampled_from([6, 17, 1, 58])),
                data.draw(st.integers(-1, 300)), data.draw(st.integers(-1, 300)), -1, -1)
    ip = ipaddress.IPv6Address if fam6 else ipaddress.IPv4Address
    expected = (
        (src is None or (src.version == f.family and ip(f.src) in src))
        and (dst is None or (dst.version == f.family and ip(f.dst) in dst))
        and (proto is None or f.proto == proto)
        and (ports is None or ports[0] <= f.dport <= ports[1])
    )
    assert s.matches(f) is expected
    assert (s.mismatch(f) is None) is expected


# -- Policy and Spd ------------------------------------------------------------------------------


def test_policy_validation() -> None:
    with pytest.raises(ValueError, match="protect needs an sa"):
        pol("p", Selector(), Action.PROTECT)
    with pytest.raises(ValueError, match="takes no sa"):
        pol("p", Selector(), Action.BYPASS, sa="x")
    with pytest.raises(ValueError, match="dir must be"):
        Policy("p", "sideways", Selector(), Action.BYPASS)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="action must be"):
        Policy("p", Direction.IN, Selector(), "allow")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="priority"):
        pol("p", Selector(), priority=-1)
    with pytest.raises(ValueError, match="name"):
        pol("", Selector())
    p = Policy("p", "in", Selector(), "discard")  # type: ignore[arg-type]
    assert p.dir is Direction.IN and p.action is Action.DISCARD


def test_order_is_priority_then_insertion() -> None:
    spd = Spd()
    broad = pol("broad", sel(dst="198.51.100.0/24"), Action.DISCARD, priority=10)
    narrow = pol("narrow", sel(dst="198.51.100.0/24", proto=6, dport=443), Action.PROTECT, sa="sa1",
                 priority=10)
    urgent = pol("urgent", sel(proto=6), Action.BYPASS, priority=5)
    spd.add(broad)
    spd.add(narrow)
    assert spd.lookup(Direction.OUT, TCP_V4) is broad  # same priority: configuration order
    spd.add(urgent)
    assert spd.lookup(Direction.OUT, TCP_V4) is urgent  # lower value wins
    assert [p.name for p in spd.list()] == ["urgent", "broad", "narrow"]
    assert spd.remove("urgent") is urgent
    spd.remove("broad")
    assert spd.lookup(Direction.OUT, TCP_V4) is narrow
    assert spd.lookup(Direction.IN, TCP_V4) is None  # per direction
    assert spd.lookup(Direction.OUT, TCP_V6) is None
    spd.add(broad)  # re-added: now after narrow
    assert [p.name for p in spd.list(Direction.OUT)] == ["narrow", "broad"]
    assert len(spd) == 2 and spd.get("narrow") is narrow and spd.get("nope") is None


def test_add_remove_errors() -> None:
    spd = Spd()
    spd.add(pol("a", Selector()))
    with pytest.raises(ValueError, match="already exists"):
        spd.add(pol("a", Selector(), dir=Direction.IN))
    with pytest.raises(KeyError):
        spd.remove("b")


def test_defaults() -> None:
    assert Spd().default_action(Direction.FWD) is Action.BYPASS
    spd = Spd({Direction.IN: Action.DISCARD, Direction.OUT: Action.BYPASS})
    assert spd.default_action(Direction.IN) is Action.DISCARD
    assert spd.default_action(Direction.OUT) is Action.BYPASS
    assert spd.default_action(Direction.FWD) is Action.BYPASS
    assert Spd(Action.DISCARD).default_action(Direction.OUT) is Action.DISCARD
    assert Spd({"fwd": "discard"}).default_action(Direction.FWD) is Action.DISCARD  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="cannot be protect"):
        Spd(Action.PROTECT)


def test_explain_and_policies_for_sa() -> None:
    spd = Spd()
    a = pol("v6-only", sel(src="2001:db8::/32"), Action.DISCARD)
    b = pol("web", sel(proto=6, dport=(80, 80)), Action.PROTECT, sa="s1")
    c = pol("tcp", sel(proto=6), Action.PROTECT, sa="s1")
    d = pol("in-tcp", sel(proto=6), Action.PROTECT, sa="s2", dir=Direction.IN)
    for p in (a, b, c, d):
        spd.add(p)
    assert spd.explain(Direction.OUT, TCP_V4) == [
        (a, "family: flow is IPv4, selector is IPv6"),
        (b, "dport 443 not in 80"),
        (c, None),
    ]
    assert spd.explain(Direction.IN, TCP_V4) == [(d, None)]
    assert spd.policies_for_sa("s1") == [b, c]
    assert spd.policies_for_sa("s3") == []


def test_counters_account() -> None:
    p = pol("p", Selector())
    p.counters.account(100)
    p.counters.account(60)
    assert p.counters.as_dict() == {"packets": 2, "bytes": 160}
    assert p.describe()["counters"] == {"packets": 2, "bytes": 160}


@pytest.mark.parametrize(
    ("earlier", "later", "shadowed"),
    [
        (Selector(), sel(src="192.0.2.0/24"), True),
        (sel(src="192.0.2.0/24"), sel(src="192.0.2.128/25", proto=6), True),
        (sel(src="192.0.2.128/25"), sel(src="192.0.2.0/24"), False),
        (sel(src="192.0.2.0/24"), Selector(), False),
        (sel(src="192.0.2.0/24"), sel(dst="198.51.100.0/24"), False),
        (sel(src="0.0.0.0/0"), sel(dst="198.51.100.0/24"), True),  # /0 covers "any" of its family
        (sel(src="0.0.0.0/0"), sel(dst="2001:db8::/32"), False),
        (sel(src="0.0.0.0/0"), sel(proto=6), False),  # the later one matches v6 too
        (sel(src="192.0.2.0/24"), sel(src="2001:db8::/32"), False),
        (sel(proto=6), sel(proto=6, dport=(1, 100)), True),
        (sel(proto=6, dport=(1, 100)), sel(proto=6, dport=(10, 20)), True),
        (sel(proto=6, dport=(1, 100)), sel(proto=6, dport=(10, 200)), False),
        (sel(proto=6, dport=(1, 100)), sel(proto=6), False),  # later also matches OPAQUE and other ports
        (sel(proto=6, dport=(0, 65535)), sel(proto=6), True),
        (sel(proto=17), sel(proto=6, dport=(1, 2)), False),
        (sel(proto=1), sel(proto=1, icmp_type=8, icmp_code=0), True),
        (sel(proto=1, icmp_type=8), sel(proto=1, icmp_type=8, icmp_code=3), True),
        (sel(proto=1, icmp_type=8, icmp_code=0), sel(proto=1, icmp_type=8), False),
    ],
)
def test_shadowed(earlier: Selector, later: Selector, shadowed: bool) -> None:
    spd = Spd()
    first = pol("first", earlier)
    spd.add(first)
    candidate = pol("second", later, Action.DISCARD)
    assert spd.shadowed(candidate) is (first if shadowed else None)  # before it is added
    spd.add(candidate)
    assert spd.shadowed(candidate) is (first if shadowed else None)
    assert spd.shadowed(first) is None


def test_shadowed_respects_priority_and_direction() -> None:
    spd = Spd()
    everything = pol("everything", Selector(), priority=100)
    spd.add(everything)
    assert spd.shadowed(pol("high", sel(proto=6), priority=1)) is None  # evaluated first
    assert spd.shadowed(pol("low", sel(proto=6), priority=100)) is everything
    assert spd.shadowed(pol("other-dir", sel(proto=6), dir=Direction.IN, priority=200)) is None
