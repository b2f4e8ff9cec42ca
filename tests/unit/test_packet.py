"""packet.py: parsing checked against scapy's dissection, the ESP/AH insertion point against
scapy's split_for_transport (which follows Linux), and garbage of every kind -> Drop only."""

from __future__ import annotations

import ipaddress
import socket
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.ipsec import AH, ESP, split_for_transport
from scapy.layers.sctp import SCTP
from scapy.packet import NoPayload, Packet, Raw

from nfq_ipsec import counters
from nfq_ipsec.errors import Drop
from nfq_ipsec.flow import FlowKey
from nfq_ipsec.packet import (
    MAX_EXTENSION_HEADERS,
    find_header,
    ipv4_header,
    ipv6_header,
    parse,
    transport_insertion_point,
)

A4, B4 = "192.0.2.10", "198.51.100.20"
A6, B6 = "2001:db8::10", "2001:db8:1::20"


def i4(a: str) -> int:
    return int(ipaddress.IPv4Address(a))


def i6(a: str) -> int:
    return int(ipaddress.IPv6Address(a))


def raw(p: Packet) -> bytes:
    return bytes(p)


# -- IPv4 ---------------------------------------------------------------------------------------------


def test_ipv4_tcp() -> None:
    pkt = raw(IP(src=A4, dst=B4, flags="DF") / TCP(sport=40000, dport=443) / Raw(b"x" * 10))
    info = parse(pkt)
    assert (info.version, info.header_len, info.proto, info.l4_offset, info.total_len) == (4, 20, 6, 20, 50)
    assert (info.src, info.dst) == (socket.inet_aton(A4), socket.inet_aton(B4))
    assert (info.is_fragment, info.first_fragment, info.df, info.spi) == (False, True, True, -1)
    assert (info.nh_offset, info.l4_nh_offset) == (9, 9)
    assert info.flow == FlowKey(4, i4(A4), i4(B4), 6, 40000, 443, -1, -1)


def test_ipv4_with_options_udp_sctp_icmp() -> None:
    udp = parse(raw(IP(src=A4, dst=B4, options=b"\x94\x04\x00\x00") / UDP(sport=53, dport=5353)))
    assert (udp.header_len, udp.l4_offset, udp.flow.sport, udp.flow.dport) == (24, 24, 53, 5353)
    assert not udp.df
    sctp = parse(raw(IP(src=A4, dst=B4) / SCTP(sport=3868, dport=3869)))
    assert (sctp.proto, sctp.flow.sport, sctp.flow.dport) == (132, 3868, 3869)
    icmp = parse(raw(IP(src=A4, dst=B4) / ICMP(type=3, code=4)))
    assert icmp.flow == FlowKey(4, i4(A4), i4(B4), 1, -1, -1, 3, 4)


def test_ipv4_fragments() -> None:
    ports = Raw(struct.pack("!HH", 1, 2) + bytes(20))
    first = parse(raw(IP(src=A4, dst=B4, flags="MF", frag=0, proto=17) / ports))
    assert (first.is_fragment, first.first_fragment, first.flow.sport, first.flow.dport) == (True, True, 1, 2)
    later = parse(raw(IP(src=A4, dst=B4, frag=3, proto=17) / Raw(b"\x00")))
    assert (later.is_fragment, later.first_fragment, later.proto, later.flow.sport) == (True, False, 17, -1)


def test_ipv4_esp_and_ah_spi() -> None:
    esp = parse(raw(IP(src=A4, dst=B4) / ESP(spi=0xDEADBEEF, seq=7) / Raw(bytes(24))))
    assert (esp.proto, esp.spi, esp.flow.sport) == (50, 0xDEADBEEF, -1)
    ah = parse(raw(IP(src=A4, dst=B4) / AH(spi=0x1234, seq=1, icv=bytes(12), nh=6) / TCP()))
    assert (ah.proto, ah.spi) == (51, 0x1234)


def test_bytes_after_total_length_are_not_the_packet() -> None:
    pkt = raw(IP(src=A4, dst=B4) / UDP(sport=1, dport=2))
    info = parse(pkt + b"link padding")
    assert info.total_len == len(pkt)
    assert parse(memoryview(pkt + b"pad")).flow == parse(pkt).flow


# -- IPv6 ---------------------------------------------------------------------------------------------


def test_ipv6_plain_and_icmpv6() -> None:
    info = parse(raw(IPv6(src=A6, dst=B6) / UDP(sport=5000, dport=6000)))
    assert (info.version, info.header_len, info.proto, info.l4_offset, info.df) == (6, 40, 17, 40, False)
    assert info.flow == FlowKey(6, i6(A6), i6(B6), 17, 5000, 6000, -1, -1)
    assert (info.nh_offset, info.l4_nh_offset) == (6, 6)
    echo = parse(raw(IPv6(src=A6, dst=B6) / ICMPv6EchoRequest()))
    assert (echo.proto, echo.flow.icmp_type, echo.flow.icmp_code) == (58, 128, 0)


def test_ipv6_extension_chain_and_insertion_point() -> None:
    pkt = raw(IPv6(src=A6, dst=B6) / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt()
              / IPv6ExtHdrRouting(addresses=["2001:db8::99"]) / IPv6ExtHdrDestOpt() / TCP(sport=7, dport=8))
    info = parse(pkt)
    # HBH 8 + dest 8 + routing 24 stay before ESP/AH; the dest options after the routing header do not
    assert (info.header_len, info.nh_offset) == (40 + 8 + 8 + 24, 40 + 8 + 8)
    assert (info.l4_offset, info.l4_nh_offset, info.proto) == (40 + 48, 40 + 40, 6)
    assert (info.flow.sport, info.flow.dport) == (7, 8)
    assert transport_insertion_point(pkt, len(pkt)) == (info.header_len, info.nh_offset)


def test_ipv6_esp_after_extension_headers() -> None:
    pkt = raw(IPv6(src=A6, dst=B6) / IPv6ExtHdrHopByHop() / ESP(spi=0xABCDEF01, seq=9) / Raw(bytes(32)))
    info = parse(pkt)
    assert (info.proto, info.spi) == (50, 0xABCDEF01)
    assert (info.l4_offset, info.l4_nh_offset, info.header_len) == (48, 40, 48)
    assert find_header(pkt, len(pkt), 50) == (48, 40)
    ah_header = AH(spi=0x77, icv=bytes(12), nh=50, payloadlen=4)  # (4 + 2) * 4 = 24 bytes
    with_ah = raw(IPv6(src=A6, dst=B6) / ah_header / ESP(spi=0x88, seq=1) / Raw(bytes(8)))
    ah = parse(with_ah)
    assert (ah.proto, ah.spi, ah.l4_offset) == (51, 0x77, 40)
    assert find_header(with_ah, len(with_ah), 50) == (40 + 24, 40)  # AH length rule: (len + 2) * 4


def test_ipv6_fragments() -> None:
    base = IPv6(src=A6, dst=B6)
    first = raw(base / IPv6ExtHdrFragment(m=1, offset=0, id=5, nh=17) / Raw(struct.pack("!HH", 9, 10)))
    info = parse(first)
    assert (info.is_fragment, info.first_fragment, info.proto) == (True, True, 17)
    assert (info.flow.sport, info.flow.dport) == (9, 10)
    assert (info.header_len, info.l4_offset) == (40, 48)  # ESP/AH would go before the fragment header
    later = parse(raw(base / IPv6ExtHdrFragment(m=0, offset=100, id=5, nh=17) / Raw(bytes(16))))
    assert (later.is_fragment, later.first_fragment, later.proto, later.flow.sport, later.l4_offset) == (
        True, False, 17, -1, 48)
    atomic = parse(raw(base / IPv6ExtHdrFragment(m=0, offset=0, nh=17) / UDP(sport=1, dport=2)))
    assert (atomic.is_fragment, atomic.flow.sport) == (False, 1)
    with pytest.raises(Drop, match="fragment"):
        find_header(first, len(first), 50)


# -- malformed ----------------------------------------------------------------------------------------


def assert_malformed(data: bytes) -> None:
    with pytest.raises(Drop) as exc:
        parse(data)
    assert exc.value.counter == counters.IN_MALFORMED


def test_malformed_packets() -> None:
    good4 = raw(IP(src=A4, dst=B4) / TCP())
    good6 = raw(IPv6(src=A6, dst=B6) / IPv6ExtHdrHopByHop() / UDP())
    assert_malformed(b"")
    assert_malformed(b"\x50" + bytes(39))  # version 5
    assert_malformed(b"\x44" + good4[1:])  # IHL 4
    assert_malformed(good4[:2] + struct.pack("!H", 200) + good4[4:])  # longer than the buffer
    assert_malformed(good4[:2] + struct.pack("!H", 19) + good4[4:])  # shorter than its header
    assert_malformed(good4[:23])  # TCP ports cut
    assert_malformed(good6[:4] + struct.pack("!H", 999) + good6[6:])
    assert_malformed(good6[:41] + b"\x40" + good6[42:])  # hop-by-hop length past the end
    assert_malformed(raw(IPv6(src=A6, dst=B6) / IPv6ExtHdrDestOpt() / IPv6ExtHdrHopByHop() / UDP()))
    chain: Packet = IPv6(src=A6, dst=B6)
    for _ in range(MAX_EXTENSION_HEADERS + 1):
        chain = chain / IPv6ExtHdrDestOpt()
    assert_malformed(raw(chain / UDP()))
    assert_malformed(raw(IP(src=A4, dst=B4) / ESP(spi=1, seq=1))[:26])  # ESP header cut
    assert_malformed(raw(IP(src=A4, dst=B4, proto=51) / Raw(bytes(8))))  # AH header cut
    assert_malformed(raw(IP(src=A4, dst=B4, proto=1) / Raw(b"\x08")))  # ICMP cut


@pytest.mark.parametrize("pkt", [
    raw(IP(src=A4, dst=B4, options=b"\x01\x01\x01\x00") / UDP(sport=1, dport=2) / Raw(b"abc")),
    raw(IPv6(src=A6, dst=B6) / IPv6ExtHdrHopByHop() / IPv6ExtHdrRouting(addresses=[B6]) / IPv6ExtHdrDestOpt()
        / IPv6ExtHdrFragment(m=1) / TCP(sport=3, dport=4)),
    raw(IPv6(src=A6, dst=B6) / AH(spi=5, icv=bytes(12), nh=59)),
])
def test_every_truncation_is_dropped_or_parsed(pkt: bytes) -> None:
    for cut in range(len(pkt)):
        try:
            parse(pkt[:cut])
        except Drop as e:
            assert e.counter == counters.IN_MALFORMED


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120), st.sampled_from([b"", b"\x45", b"\x60", b"\x46"]))
def test_random_bytes_raise_only_drop(data: bytes, prefix: bytes) -> None:
    try:
        info = parse(prefix + data)
    except Drop as e:
        assert e.counter == counters.IN_MALFORMED
        return
    assert info.l4_offset <= info.total_len <= len(prefix + data)


# -- against scapy ------------------------------------------------------------------------------------

EXT = st.sampled_from(["hbh", "dst", "rt"])
PROTO_OF: dict[type, int] = {TCP: 6, UDP: 17, ICMP: 1, ICMPv6EchoRequest: 58, ESP: 50, SCTP: 132}
L4 = st.sampled_from(["tcp", "udp", "icmp", "esp", "sctp", "none"])


def build(version: int, exts: list[str], l4: str, sport: int, dport: int) -> Packet:
    if version == 4:
        p: Packet = IP(src=A4, dst=B4, flags=("DF" if sport & 1 else 0), ttl=sport % 200 + 1)
    else:
        p = IPv6(src=A6, dst=B6, hlim=sport % 200 + 1)
        for i, e in enumerate(exts):
            if e == "hbh" and i == 0:
                p = p / IPv6ExtHdrHopByHop()
            elif e == "rt":
                p = p / IPv6ExtHdrRouting(addresses=[B6])
            else:
                p = p / IPv6ExtHdrDestOpt()
    if l4 == "tcp":
        return p / TCP(sport=sport, dport=dport)
    if l4 == "udp":
        return p / UDP(sport=sport, dport=dport) / Raw(b"q" * (sport % 40))
    if l4 == "sctp":
        return p / SCTP(sport=sport, dport=dport)
    if l4 == "icmp":
        return p / (ICMP(type=sport % 256, code=dport % 256) if version == 4 else
                    ICMPv6EchoRequest())
    if l4 == "esp":
        return p / ESP(spi=sport * 65536 + dport | 0x100, seq=1) / Raw(bytes(16))  # spi 0 is not ESP
    return p / Raw(bytes(sport % 5))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([4, 6]), st.lists(EXT, max_size=4), L4, st.integers(0, 65535), st.integers(0, 65535))
def test_parse_agrees_with_scapy(version: int, exts: list[str], l4: str, sport: int, dport: int) -> None:
    pkt = build(version, exts, l4, sport, dport)
    data = raw(pkt)
    info = parse(data)
    dissected = (IP if version == 4 else IPv6)(data)
    assert info.total_len == len(data)
    last: Packet = dissected
    upper = dissected.payload
    while upper.__class__.__name__.startswith("IPv6ExtHdr"):
        last, upper = upper, upper.payload
    assert info.l4_offset == len(data) - len(raw(upper))
    assert info.proto == (last.proto if version == 4 else last.nh)
    if not isinstance(upper, (Raw, NoPayload)):
        assert info.proto == PROTO_OF[type(upper)]
    if l4 in ("tcp", "udp", "sctp"):
        assert (info.flow.sport, info.flow.dport) == (sport, dport)
    elif l4 == "icmp":
        assert (info.flow.icmp_type, info.flow.icmp_code) == (upper.type, upper.code)
    elif l4 == "esp":
        assert info.spi == sport * 65536 + dport | 0x100
    if version == 4:
        assert info.df == bool(sport & 1)
    # the insertion point is where scapy (following Linux) splits for transport-mode ESP/AH
    header, next_header, _ = split_for_transport(dissected, 50)
    assert info.header_len == len(raw(header))
    assert data[info.nh_offset] == next_header


# -- builders -----------------------------------------------------------------------------------------


def test_header_builders_match_scapy() -> None:
    src4, dst4 = socket.inet_aton(A4), socket.inet_aton(B4)
    built = ipv4_header(src4, dst4, 17, 8, ttl=33, tos=0xB8, ident=0x4321, df=True)
    assert built == raw(IP(src=A4, dst=B4, proto=17, ttl=33, tos=0xB8, id=0x4321, flags="DF", len=28))
    with_options = ipv4_header(src4, dst4, 6, 0, options=b"\x01\x01\x01\x00")
    assert with_options == raw(IP(src=A4, dst=B4, proto=6, id=0, options=b"\x01\x01\x01\x00"))
    src6, dst6 = socket.inet_pton(socket.AF_INET6, A6), socket.inet_pton(socket.AF_INET6, B6)
    assert ipv6_header(src6, dst6, 58, 8, hlim=7, tc=0x2E, flow_label=0x12345) == raw(
        IPv6(src=A6, dst=B6, nh=58, hlim=7, tc=0x2E, fl=0x12345, plen=8))
    with pytest.raises(ValueError):
        ipv4_header(src4, dst4, 6, 0xFFFF)
    with pytest.raises(ValueError):
        ipv4_header(src4, dst4, 6, 0, options=b"\x01")
