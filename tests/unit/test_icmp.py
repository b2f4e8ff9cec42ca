"""ICMP errors: parsed back by scapy, checksums verified by scapy, the never-send rules, the rate limiter."""

from __future__ import annotations

import ipaddress
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, UDP, IPerror, UDPerror
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoRequest,
    ICMPv6PacketTooBig,
    IPerror6,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
)
from scapy.packet import Raw

from nfq_ipsec.checksum import internet_checksum
from nfq_ipsec.fragment import fragment_ipv4
from nfq_ipsec.icmp import (
    IPV4_MAX_QUOTE,
    IPV6_MAX_QUOTE,
    RateLimiter,
    build_ipv4_header,
    build_ipv6_header,
    icmp_admin_prohibited,
    icmp_too_big,
)

V4_HOST, V4_PEER, V4_GW = "192.0.2.10", "198.51.100.20", "203.0.113.1"
V6_HOST, V6_PEER, V6_GW = "2001:db8:1::10", "2001:db8:2::20", "2001:db8:ffff::1"
V4_MCAST = "233.252.0.1"  # MCAST-TEST-NET (RFC 5771)
V6_MCAST = "ff0e::db8:0:1"  # documentation multicast (RFC 6676)


def packed(addr: str) -> bytes:
    return ipaddress.ip_address(addr).packed


def udp4(size: int = 100, src: str = V4_HOST, dst: str = V4_PEER, **ip_fields: Any) -> bytes:
    return bytes(IP(src=src, dst=dst, id=99, **ip_fields) / UDP(sport=1111, dport=2222) / bytes(size))


def udp6(size: int = 100, src: str = V6_HOST, dst: str = V6_PEER) -> bytes:
    return bytes(IPv6(src=src, dst=dst) / UDP(sport=1111, dport=2222) / bytes(size))


def scapy_v6_checksum_ok(message: bytes, src: str, dst: str) -> bool:
    """Let scapy recompute the ICMPv6 checksum inside a real IPv6 packet and compare."""
    pkt = IPv6(bytes(IPv6(src=src, dst=dst, nh=58) / Raw(message)))
    icmp = pkt.payload
    stored = icmp.cksum
    icmp.cksum = None
    recomputed = IPv6(bytes(pkt)).payload.cksum
    return bool(stored == recomputed and stored != 0)


# ---------------------------------------------------------------- IPv4


def test_v4_admin_prohibited_parses_and_quotes() -> None:
    orig = udp4(50)
    msg = icmp_admin_prohibited(orig)
    assert msg is not None
    icmp = ICMP(msg)
    assert (icmp.type, icmp.code) == (3, 13)
    assert msg[4:8] == b"\0\0\0\0"
    assert internet_checksum(msg) == 0
    icmp.chksum = None
    assert bytes(icmp) == msg  # scapy computes the same checksum
    quoted = ICMP(msg)[IPerror]
    assert (quoted.src, quoted.dst, quoted.id) == (V4_HOST, V4_PEER, 99)
    assert ICMP(msg)[UDPerror].dport == 2222
    assert msg[8:] == orig  # small packet: quoted whole


def test_v4_too_big_carries_next_hop_mtu() -> None:
    orig = udp4(1400, flags="DF")
    msg = icmp_too_big(orig, 1380)
    assert msg is not None
    icmp = ICMP(msg)
    assert (icmp.type, icmp.code, icmp.nexthopmtu) == (3, 4, 1380)
    assert struct.unpack_from("!H", msg, 6)[0] == 1380
    assert internet_checksum(msg) == 0
    # RFC 1812 §4.3.2.3: the error datagram stays within 576 bytes.
    assert len(msg) == 8 + IPV4_MAX_QUOTE == 576 - 20
    assert msg[8:] == orig[:IPV4_MAX_QUOTE]


def test_v4_quote_ignores_trailing_link_padding_and_minimum_quote() -> None:
    orig = udp4(0)  # 28 bytes: IP header + 8 bytes, the RFC 792 minimum
    msg = icmp_admin_prohibited(orig + bytes(18))
    assert msg is not None and msg[8:] == orig


def test_v4_header_with_options_quoted_with_eight_more_bytes() -> None:
    orig = bytes(IP(src=V4_HOST, dst=V4_PEER, options=[Raw(bytes([130, 11]) + bytes(9) + b"\0")]) / UDP())
    msg = icmp_admin_prohibited(orig)
    assert msg is not None and msg[8:] == orig and len(orig) == 32 + 8


def test_v4_mtu_clamped_to_minimum_and_bounded() -> None:
    for mtu in (0, 40, 67):
        msg = icmp_too_big(udp4(), mtu)
        assert msg is not None and ICMP(msg).nexthopmtu == 68
    with pytest.raises(ValueError, match="MTU"):
        icmp_too_big(udp4(), 65536)


@pytest.mark.parametrize(
    "orig",
    [
        pytest.param(
            bytes(IP(src=V4_HOST, dst=V4_PEER) / ICMP(type=3, code=1) / bytes(28)), id="dest-unreach"
        ),
        pytest.param(bytes(IP(src=V4_HOST, dst=V4_PEER) / ICMP(type=11) / bytes(28)), id="time-exceeded"),
        pytest.param(bytes(IP(src=V4_HOST, dst=V4_PEER) / ICMP(type=12) / bytes(28)), id="param-problem"),
        pytest.param(bytes(IP(src=V4_HOST, dst=V4_PEER) / ICMP(type=5) / bytes(28)), id="redirect"),
        pytest.param(bytes(IP(src=V4_HOST, dst=V4_PEER) / ICMP(type=4) / bytes(28)), id="source-quench"),
        pytest.param(bytes(IP(src=V4_HOST, dst=V4_PEER) / ICMP(type=42)), id="unknown-type"),
        pytest.param(bytes(IP(src=V4_HOST, dst=V4_PEER, proto=1)), id="icmp-without-type"),
        pytest.param(udp4(dst=V4_MCAST), id="multicast-dst"),
        pytest.param(udp4(dst="255.255.255.255"), id="broadcast-dst"),
        pytest.param(udp4(src="0.0.0.0"), id="unspecified-src"),
        pytest.param(udp4(src="127.0.0.1"), id="loopback-src"),
        pytest.param(udp4(src=V4_MCAST), id="multicast-src"),
        pytest.param(udp4(src="240.0.0.1"), id="class-e-src"),
        pytest.param(fragment_ipv4(udp4(1000), 576)[1], id="non-first-fragment"),
        pytest.param(b"", id="empty"),
        pytest.param(b"\x45\x00", id="truncated"),
        pytest.param(b"\x4f" + bytes(30), id="ihl-past-end"),
    ],
)
def test_v4_no_error_about(orig: bytes) -> None:
    assert icmp_admin_prohibited(orig) is None
    assert icmp_too_big(orig, 1280) is None


@pytest.mark.parametrize("icmp_type", [0, 8, 13, 14, 17, 18])
def test_v4_errors_about_queries_are_allowed(icmp_type: int) -> None:
    orig = bytes(IP(src=V4_HOST, dst=V4_PEER) / ICMP(type=icmp_type) / b"ping")
    msg = icmp_admin_prohibited(orig)
    assert msg is not None and ICMP(msg)[IPerror].proto == 1


def test_v4_first_fragment_gets_an_error() -> None:
    first = fragment_ipv4(udp4(1000), 576)[0]
    msg = icmp_too_big(first, 576)
    assert msg is not None and msg[8:] == first[:IPV4_MAX_QUOTE]


# ---------------------------------------------------------------- IPv6


def test_v6_admin_prohibited_with_checksum() -> None:
    orig = udp6(60)
    msg = icmp_admin_prohibited(orig, src=packed(V6_GW))
    assert msg is not None
    icmp = ICMPv6DestUnreach(msg)
    assert (icmp.type, icmp.code) == (1, 1)
    assert msg[4:8] == b"\0\0\0\0"
    assert msg[8:] == orig
    assert icmp[IPerror6].src == V6_HOST
    assert icmp[IPerror6].payload.dport == 2222
    assert scapy_v6_checksum_ok(msg, V6_GW, V6_HOST)


def test_v6_checksum_left_to_kernel_without_src() -> None:
    msg = icmp_admin_prohibited(udp6())
    assert msg is not None and msg[2:4] == b"\0\0"
    with pytest.raises(ValueError, match="16 bytes"):
        icmp_admin_prohibited(udp6(), src=packed(V4_GW))


def test_v6_packet_too_big() -> None:
    orig = udp6(1452)
    msg = icmp_too_big(orig, 1400, src=packed(V6_GW))
    assert msg is not None
    icmp = ICMPv6PacketTooBig(msg)
    assert (icmp.type, icmp.code, icmp.mtu) == (2, 0, 1400)
    assert struct.unpack_from("!I", msg, 4)[0] == 1400
    # RFC 4443 §2.4(c): the error packet must not exceed the minimum IPv6 MTU.
    assert len(msg) == 8 + IPV6_MAX_QUOTE == 1280 - 40
    assert msg[8:] == orig[:IPV6_MAX_QUOTE]
    assert scapy_v6_checksum_ok(msg, V6_GW, V6_HOST)
    assert icmp_too_big(orig, 70000, src=packed(V6_GW)) is not None  # jumbo-capable links: 32-bit field


def test_v6_mtu_clamped_to_1280_and_bounded() -> None:
    # RFC 8201 §4: a PTB below 1280 is ignored by senders, so never announce one.
    for mtu in (0, 1204, 1279):
        msg = icmp_too_big(udp6(), mtu)
        assert msg is not None and ICMPv6PacketTooBig(msg).mtu == 1280
    with pytest.raises(ValueError, match="MTU"):
        icmp_too_big(udp6(), 1 << 32)


def test_v6_too_big_is_sent_even_to_multicast() -> None:
    orig = udp6(1400, dst=V6_MCAST)
    assert icmp_admin_prohibited(orig) is None
    msg = icmp_too_big(orig, 1280)
    assert msg is not None and ICMPv6PacketTooBig(msg).mtu == 1280


def ipv6_with(*layers: object, src: str = V6_HOST, dst: str = V6_PEER) -> bytes:
    pkt = IPv6(src=src, dst=dst)
    for layer in layers:
        pkt = pkt / layer
    return bytes(pkt)


@pytest.mark.parametrize(
    "orig",
    [
        pytest.param(ipv6_with(ICMPv6DestUnreach() / udp6()), id="dest-unreach"),
        pytest.param(ipv6_with(ICMPv6PacketTooBig() / udp6()), id="too-big"),
        pytest.param(
            ipv6_with(IPv6ExtHdrHopByHop(), IPv6ExtHdrDestOpt(), ICMPv6DestUnreach()), id="error-behind-ext"
        ),
        pytest.param(
            ipv6_with(IPv6ExtHdrFragment(offset=0, m=1), ICMPv6DestUnreach()), id="error-in-first-frag"
        ),
        pytest.param(
            bytes(IPv6(src=V6_HOST, dst=V6_PEER, nh=58) / Raw(bytes([137]) + bytes(39))), id="redirect"
        ),
        pytest.param(
            ipv6_with(IPv6ExtHdrFragment(offset=100, nh=17), Raw(bytes(64))), id="non-first-fragment"
        ),
        pytest.param(udp6(src="::"), id="unspecified-src"),
        pytest.param(udp6(src="::1"), id="loopback-src"),
        pytest.param(udp6(src=V6_MCAST), id="multicast-src"),
        pytest.param(ipv6_with(IPv6ExtHdrHopByHop())[:44], id="truncated-ext"),
        pytest.param(b"\x60" + bytes(10), id="truncated"),
        pytest.param(b"\x70" + bytes(60), id="version-7"),
    ],
)
def test_v6_no_error_about(orig: bytes) -> None:
    assert icmp_admin_prohibited(orig) is None
    assert icmp_too_big(orig, 1280) is None


def test_v6_raw_payload_is_not_mistaken_for_icmp() -> None:
    # Next header 59 ("no next header") followed by bytes that look like an ICMPv6 error type.
    orig = ipv6_with(Raw(b"\x01\x00\x00\x00"))
    assert orig[6] == 59
    assert icmp_admin_prohibited(orig) is not None


@pytest.mark.parametrize(
    "orig",
    [
        pytest.param(ipv6_with(ICMPv6EchoRequest(data=b"hi")), id="echo-request"),
        pytest.param(ipv6_with(IPv6ExtHdrFragment(offset=0, m=1, nh=17), UDP()), id="first-fragment"),
        pytest.param(ipv6_with(IPv6ExtHdrHopByHop(), IPv6ExtHdrDestOpt(), UDP()), id="ext-then-udp"),
    ],
)
def test_v6_errors_allowed(orig: bytes) -> None:
    msg = icmp_admin_prohibited(orig, src=packed(V6_GW))
    assert msg is not None and msg[8:] == orig
    assert scapy_v6_checksum_ok(msg, V6_GW, V6_HOST)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.sampled_from([0x45, 0x46, 0x60, 0x00]))
def test_garbage_never_raises(tail: bytes, first: int) -> None:
    orig = bytes([first]) + tail
    for msg in (icmp_admin_prohibited(orig), icmp_too_big(orig, 1280)):
        if msg is not None:
            assert msg[8:] == orig[: len(msg) - 8]


# ---------------------------------------------------------------- header builders


def test_build_ipv4_header_matches_scapy() -> None:
    options = bytes([130, 11]) + bytes(9) + b"\0"
    header = build_ipv4_header(
        packed(V4_HOST), packed(V4_PEER), 17, 8, ttl=3, tos=0x10, ident=0xBEEF, df=True, options=options
    )
    reference = IP(
        src=V4_HOST, dst=V4_PEER, proto=17, ttl=3, tos=0x10, id=0xBEEF, flags="DF", options=[Raw(options)]
    )
    assert header == bytes(reference / Raw(bytes(8)))[:32]
    parsed = IP(header + bytes(8))
    assert (parsed.ihl, parsed.len, parsed.ttl, parsed.id, parsed.flags) == (8, 40, 3, 0xBEEF, 2)
    assert internet_checksum(header) == 0
    parsed.chksum = None
    assert bytes(parsed)[:32] == header


def test_build_ipv6_header_matches_scapy() -> None:
    header = build_ipv6_header(
        packed(V6_HOST), packed(V6_PEER), 58, 1234, hop_limit=9, traffic_class=0xB8, flow_label=0x12345
    )
    reference = IPv6(src=V6_HOST, dst=V6_PEER, nh=58, plen=1234, hlim=9, tc=0xB8, fl=0x12345)
    assert header == bytes(reference)


def test_builders_validate() -> None:
    with pytest.raises(ValueError, match="4 bytes"):
        build_ipv4_header(packed(V6_HOST), packed(V4_PEER), 17, 0)
    with pytest.raises(ValueError, match="multiple of 4"):
        build_ipv4_header(packed(V4_HOST), packed(V4_PEER), 17, 0, options=b"\x01")
    with pytest.raises(ValueError, match="65535"):
        build_ipv4_header(packed(V4_HOST), packed(V4_PEER), 17, 65516)
    with pytest.raises(ValueError, match="16 bytes"):
        build_ipv6_header(packed(V4_HOST), packed(V6_PEER), 17, 0)
    with pytest.raises(ValueError, match="jumbograms"):
        build_ipv6_header(packed(V6_HOST), packed(V6_PEER), 17, 65536)


# ---------------------------------------------------------------- rate limiter


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rate_limiter_burst_then_rate() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=2.0, burst=3, clock=clock)
    assert [limiter.allow() for _ in range(5)] == [True, True, True, False, False]
    assert limiter.suppressed == 2
    clock.now += 0.25  # half a token
    assert not limiter.allow()
    clock.now += 0.25  # now a whole token
    assert limiter.allow()
    assert not limiter.allow()
    assert limiter.take_suppressed() == 4
    assert limiter.suppressed == 0
    clock.now += 3600  # long idle: capped at burst, not 7200 tokens
    assert [limiter.allow() for _ in range(4)] == [True, True, True, False]
    assert limiter.take_suppressed() == 1


def test_rate_limiter_clock_going_backwards_adds_nothing() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=1.0, burst=1, clock=clock)
    assert limiter.allow()
    clock.now -= 50
    assert not limiter.allow()
    clock.now += 0.5
    assert not limiter.allow()
    clock.now += 0.5
    assert limiter.allow()


def test_rate_limiter_disabled_and_validation() -> None:
    clock = FakeClock()
    for burst in (0, 20):  # rate 0 means "send none", even with a burst configured
        limiter = RateLimiter(rate=0, burst=burst, clock=clock)
        clock.now += 100
        assert [limiter.allow() for _ in range(3)] == [False, False, False]
        assert limiter.suppressed == 3
    assert not RateLimiter(rate=5, burst=0, clock=clock).allow()
    with pytest.raises(ValueError):
        RateLimiter(rate=-1, burst=1)
    with pytest.raises(ValueError):
        RateLimiter(rate=1, burst=-1)


def test_rate_limiter_steady_rate_over_time() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=10.0, burst=5, clock=clock)
    allowed = 0
    for _ in range(10_000):  # 10 s at 1 kHz of offered errors
        clock.now += 0.001
        allowed += limiter.allow()
    assert 100 <= allowed <= 106  # 5 burst + 10/s for 10 s
    assert limiter.suppressed == 10_000 - allowed
