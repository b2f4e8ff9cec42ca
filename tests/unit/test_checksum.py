"""Internet checksum: RFC 1071 vector, the negative-zero corner, and cross-checks against scapy."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
from scapy.utils import checksum as scapy_checksum

from nfq_ipsec.checksum import (
    internet_checksum,
    l4_checksum,
    l4_checksum_ok,
    ones_complement_sum,
    pseudo_header_sum,
)

V4_SRC, V4_DST = "192.0.2.1", "198.51.100.7"
V6_SRC, V6_DST = "2001:db8::1", "2001:db8:ffff::2"


def packed(addr: str) -> bytes:
    return ipaddress.ip_address(addr).packed


def reference_checksum(data: bytes) -> int:
    """The textbook loop from RFC 1071 §4.1, to check the big-integer trick against."""
    if len(data) % 2:
        data += b"\0"
    total = 0
    for (word,) in struct.iter_unpack("!H", data):
        total += word
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def test_rfc1071_example() -> None:
    # RFC 1071 §3: bytes 00 01 f2 03 f4 f5 f6 f7 sum to ddf2, so the checksum is 220d.
    data = bytes.fromhex("0001f203f4f5f6f7")
    assert ones_complement_sum(data) == 0xDDF2
    assert internet_checksum(data) == 0x220D


def test_empty_and_zero_buffers() -> None:
    assert internet_checksum(b"") == 0xFFFF
    assert internet_checksum(bytes(20)) == 0xFFFF
    assert ones_complement_sum(bytes(7)) == 0


def test_negative_zero_is_ffff_not_zero() -> None:
    # The words sum to 0xFFFF: the integer-modulo trick sees 0, the one's-complement sum is 0xFFFF.
    for data in (b"\xff\xff", b"\x12\x34\xed\xcb", b"\xff\xff\xff\xff"):
        assert ones_complement_sum(data) == 0xFFFF
        assert internet_checksum(data) == 0
        assert reference_checksum(data) == 0


def test_odd_length_pads_with_zero() -> None:
    assert internet_checksum(b"\xab") == ~0xAB00 & 0xFFFF
    assert internet_checksum(b"\x01\x02\x03") == internet_checksum(b"\x01\x02\x03\x00")


def test_memoryview_accepted() -> None:
    data = bytes(range(200))
    assert internet_checksum(memoryview(data)[3:101]) == internet_checksum(data[3:101])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_matches_rfc1071_loop_and_scapy(data: bytes) -> None:
    expected = reference_checksum(data)
    assert internet_checksum(data) == expected
    assert internet_checksum(data) == scapy_checksum(data)


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=20, max_size=200))
def test_verifies_to_zero_once_filled(data: bytes) -> None:
    header = bytearray(data if len(data) % 2 == 0 else data + b"\0")
    header[10:12] = b"\0\0"
    struct.pack_into("!H", header, 10, internet_checksum(header))
    assert internet_checksum(header) == 0


def test_ipv4_header_checksum_matches_scapy() -> None:
    raw = bytes(IP(src=V4_SRC, dst=V4_DST, ttl=17, id=0x4242, flags="DF") / UDP() / (b"x" * 33))
    header = bytearray(raw[:20])
    stored = struct.unpack_from("!H", header, 10)[0]
    header[10:12] = b"\0\0"
    assert internet_checksum(header) == stored
    assert internet_checksum(raw[:20]) == 0


@pytest.mark.parametrize("payload_len", [0, 1, 17, 1000])
def test_udp_v4_and_v6_match_scapy(payload_len: int) -> None:
    payload = bytes((i * 7) & 0xFF for i in range(payload_len))
    for family, ip_layer, src, dst in (
        (4, IP(src=V4_SRC, dst=V4_DST), V4_SRC, V4_DST),
        (6, IPv6(src=V6_SRC, dst=V6_DST), V6_SRC, V6_DST),
    ):
        raw = bytes(ip_layer / UDP(sport=4500, dport=53) / payload)
        hlen = 20 if family == 4 else 40
        segment = bytearray(raw[hlen:])
        stored = struct.unpack_from("!H", segment, 6)[0]
        assert l4_checksum_ok(family, packed(src), packed(dst), 17, segment)
        segment[6:8] = b"\0\0"
        assert l4_checksum(family, packed(src), packed(dst), 17, segment) == stored


def test_tcp_and_icmpv6_match_scapy() -> None:
    raw = bytes(IPv6(src=V6_SRC, dst=V6_DST) / ICMPv6EchoRequest(id=7, seq=9, data=b"ping" * 11))
    segment = bytearray(raw[40:])
    stored = struct.unpack_from("!H", segment, 2)[0]
    segment[2:4] = b"\0\0"
    assert l4_checksum(6, packed(V6_SRC), packed(V6_DST), 58, segment) == stored

    raw = bytes(IP(src=V4_SRC, dst=V4_DST) / TCP(sport=1234, dport=80, flags="S", seq=99) / b"data")
    segment = bytearray(raw[20:])
    stored = struct.unpack_from("!H", segment, 16)[0]
    segment[16:18] = b"\0\0"
    assert l4_checksum(4, packed(V4_SRC), packed(V4_DST), 6, segment) == stored

    # ICMPv4 has no pseudo-header: plain checksum over the message.
    raw = bytes(IP(src=V4_SRC, dst=V4_DST) / ICMP(id=3, seq=4) / b"abc")
    assert internet_checksum(raw[20:]) == 0


def test_udp_zero_checksum_sent_as_ffff() -> None:
    src, dst = packed(V4_SRC), packed(V4_DST)
    segment = bytearray(struct.pack("!HHHH", 1000, 2000, 10, 0) + b"\0\0")
    # Choose the last two data bytes so the computed checksum comes out as 0.
    partial = internet_checksum(segment, pseudo_header_sum(4, src, dst, 17, len(segment)))
    segment[8:10] = struct.pack("!H", partial)
    assert internet_checksum(segment, pseudo_header_sum(4, src, dst, 17, len(segment))) == 0
    assert l4_checksum(4, src, dst, 17, segment) == 0xFFFF
    segment[6:8] = b"\xff\xff"
    assert l4_checksum_ok(4, src, dst, 17, segment)
    # A TCP segment whose checksum computes to 0 keeps 0: only UDP remaps it.
    proto_sum = pseudo_header_sum(4, src, dst, 6, len(segment))
    segment[6:8] = b"\0\0"
    segment[8:10] = b"\0\0"
    segment[8:10] = struct.pack("!H", internet_checksum(segment, proto_sum))
    assert l4_checksum(4, src, dst, 6, segment) == 0


def test_pseudo_header_rejects_wrong_address_size() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        pseudo_header_sum(6, packed(V4_SRC), packed(V4_DST), 17, 8)
