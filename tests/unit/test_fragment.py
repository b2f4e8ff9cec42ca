"""Fragmentation: scapy's defragment()/defragment6() must rebuild the original, plus field-level checks."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP, defragment
from scapy.layers.inet6 import (
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
    defragment6,
)
from scapy.packet import Raw

from nfq_ipsec.checksum import internet_checksum
from nfq_ipsec.fragment import fragment_ipv4, fragment_ipv6, ipv6_unfragmentable_length

V4_SRC, V4_DST = "192.0.2.10", "203.0.113.20"
V6_SRC, V6_DST = "2001:db8:1::10", "2001:db8:2::20"

# IPv4 options: Security (130, copy flag set, 11 bytes) and Record Route (7, not copied, 11 bytes).
OPT_SECURITY = bytes([130, 11]) + bytes(range(1, 10))
OPT_RECORD_ROUTE = bytes([7, 11, 4]) + bytes(8)


def payload(n: int) -> bytes:
    return bytes((i * 31 + 7) & 0xFF for i in range(n))


def ipv4_packet(n: int, *, options: bytes = b"", flags: str = "", ident: int = 0x1234) -> bytes:
    pkt = IP(src=V4_SRC, dst=V4_DST, id=ident, ttl=33, tos=0xB8, flags=flags)
    if options:
        pkt.options = [Raw(options)]  # type: ignore[assignment]
    return bytes(pkt / UDP(sport=4500, dport=4500) / payload(n))


def manual_reassemble_v4(fragments: list[bytes]) -> tuple[bytes, bytes]:
    """Header of the offset-0 fragment and the payload rebuilt from offsets (independent of scapy)."""
    data = bytearray()
    first_header = b""
    for frag in sorted(fragments, key=lambda f: struct.unpack_from("!H", f, 6)[0] & 0x1FFF):
        ihl = (frag[0] & 0x0F) * 4
        offset = (struct.unpack_from("!H", frag, 6)[0] & 0x1FFF) * 8
        if offset == 0:
            first_header = frag[:ihl]
        assert offset == len(data), "gap or overlap"
        data += frag[ihl:]
    return first_header, bytes(data)


def check_v4_fragments(orig: bytes, fragments: list[bytes], mtu: int) -> None:
    ihl = (orig[0] & 0x0F) * 4
    orig_flags = struct.unpack_from("!H", orig, 6)[0]
    for i, frag in enumerate(fragments):
        fihl = (frag[0] & 0x0F) * 4
        total_len, ident, flags_off = struct.unpack_from("!HHH", frag, 2)
        assert len(frag) <= mtu
        assert total_len == len(frag)
        assert ident == struct.unpack_from("!H", orig, 4)[0]
        assert frag[1] == orig[1] and frag[8:10] == orig[8:10]  # TOS, TTL, protocol
        assert frag[12:20] == orig[12:20]
        assert internet_checksum(frag[:fihl]) == 0
        last = i == len(fragments) - 1
        if not last:
            assert flags_off & 0x2000, "MF missing on a non-last fragment"
            assert (len(frag) - fihl) % 8 == 0
        else:
            assert flags_off & 0x2000 == orig_flags & 0x2000
        assert not flags_off & 0x4000
    header, data = manual_reassemble_v4(fragments)
    assert header[20:] == orig[20:ihl]
    assert data == orig[ihl:]


@pytest.mark.parametrize("mtu", [68, 100, 576, 1000, 1280, 1500])
def test_ipv4_udp_reassembles_with_scapy(mtu: int) -> None:
    orig = ipv4_packet(3000)
    fragments = fragment_ipv4(orig, mtu)
    assert len(fragments) > 1
    check_v4_fragments(orig, fragments, mtu)
    rebuilt = defragment([IP(f) for f in fragments])
    assert len(rebuilt) == 1
    assert bytes(rebuilt[0]) == orig


@settings(max_examples=60, deadline=None)
@given(size=st.integers(min_value=0, max_value=6000), mtu=st.integers(min_value=68, max_value=2000))
def test_ipv4_any_size_and_mtu(size: int, mtu: int) -> None:
    orig = ipv4_packet(size)
    fragments = fragment_ipv4(orig, mtu)
    if len(orig) <= mtu:
        assert fragments == [orig]
        return
    check_v4_fragments(orig, fragments, mtu)
    assert bytes(defragment([IP(f) for f in fragments])[0]) == orig


def test_ipv4_options_copied_only_when_copy_flag_set() -> None:
    options = OPT_RECORD_ROUTE + OPT_SECURITY + b"\x00\x00"  # 24 bytes: ihl 11
    orig = ipv4_packet(1200, options=options)
    assert (orig[0] & 0x0F) == 11
    fragments = fragment_ipv4(orig, 500)
    check_v4_fragments(orig, fragments, 500)
    assert fragments[0][20:44] == options
    for frag in fragments[1:]:
        assert (frag[0] & 0x0F) * 4 == 32  # 20 + 11 copied bytes padded to 12
        assert frag[20:32] == OPT_SECURITY + b"\x00"
    assert bytes(defragment([IP(f) for f in fragments])[0]) == orig


def test_ipv4_nop_and_eol_handled() -> None:
    options = b"\x01" + OPT_SECURITY + b"\x00" + b"\x07\x07\x04\x00\x00\x00"  # junk after EOL is ignored
    orig = ipv4_packet(800, options=options[:20])
    fragments = fragment_ipv4(orig, 300)
    for frag in fragments[1:]:
        assert frag[20 : (frag[0] & 0x0F) * 4] == OPT_SECURITY + b"\x00"


def test_ipv4_malformed_option_rejected() -> None:
    orig = bytearray(ipv4_packet(800, options=OPT_SECURITY + b"\x00"))
    orig[21] = 40  # option length runs past the header
    with pytest.raises(ValueError, match="malformed IPv4 option"):
        fragment_ipv4(bytes(orig), 300)


def test_ipv4_df_refused_only_when_too_big() -> None:
    orig = ipv4_packet(1400, flags="DF")
    with pytest.raises(ValueError, match="DF"):
        fragment_ipv4(orig, 1280)
    assert fragment_ipv4(orig, 1500) == [orig]


def test_ipv4_fits_unchanged_and_trailing_bytes_ignored() -> None:
    orig = ipv4_packet(100)
    assert fragment_ipv4(orig, len(orig)) == [orig]
    assert fragment_ipv4(orig + b"\0\0\0\0", 1500) == [orig]


def test_ipv4_refragmenting_a_middle_fragment_keeps_offset_base_and_mf() -> None:
    orig = ipv4_packet(4000)
    big = fragment_ipv4(orig, 1500)
    assert len(big) == 3
    middle = big[1]
    base = struct.unpack_from("!H", middle, 6)[0] & 0x1FFF
    small = fragment_ipv4(middle, 576)
    assert struct.unpack_from("!H", small[0], 6)[0] & 0x1FFF == base
    assert all(struct.unpack_from("!H", f, 6)[0] & 0x2000 for f in small)  # still "more follow"
    last_small = fragment_ipv4(big[2], 300)
    assert not struct.unpack_from("!H", last_small[-1], 6)[0] & 0x2000
    everything = [big[0], *small, *last_small]
    _header, data = manual_reassemble_v4(everything)
    assert data == orig[20:]
    assert bytes(defragment([IP(f) for f in everything])[0]) == orig


@pytest.mark.parametrize(
    ("packet", "mtu", "match"),
    [
        (b"\x45" + bytes(10), 68, "not an IPv4"),
        (b"\x60" + bytes(39), 68, "not an IPv4"),
        (bytes.fromhex("4500ffff") + bytes(16), 68, "bad IPv4 lengths"),
        (bytes.fromhex("4f000020") + bytes(28), 68, "bad IPv4 lengths"),
    ],
)
def test_ipv4_bad_input(packet: bytes, mtu: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fragment_ipv4(packet, mtu)


def test_ipv4_mtu_too_small() -> None:
    with pytest.raises(ValueError, match="below the IPv4 minimum"):
        fragment_ipv4(ipv4_packet(200), 60)
    # 60-byte header at MTU 68: exactly 8 data bytes per first fragment still works
    orig = ipv4_packet(100, options=OPT_RECORD_ROUTE * 3 + b"\x00\x00\x00\x00\x00\x00\x00")
    assert (orig[0] & 0x0F) == 15
    fragments = fragment_ipv4(orig, 68)
    assert len(fragments[0]) == 68
    assert bytes(defragment([IP(f) for f in fragments])[0]) == orig


def test_ipv4_tcp_payload() -> None:
    orig = bytes(IP(src=V4_SRC, dst=V4_DST, id=9) / TCP(sport=80, dport=1024) / payload(2500))
    fragments = fragment_ipv4(orig, 1006)
    check_v4_fragments(orig, fragments, 1006)
    assert [len(f) for f in fragments] == [1004, 1004, 572]


# ---------------------------------------------------------------- IPv6


def ipv6_packet(n: int, *layers: object) -> bytes:
    pkt = IPv6(src=V6_SRC, dst=V6_DST, tc=0x28, fl=0xABCDE, hlim=7)
    for layer in layers:
        pkt = pkt / layer
    return bytes(pkt / UDP(sport=500, dport=500) / payload(n))


def check_v6_fragments(orig: bytes, fragments: list[bytes], mtu: int, ident: int) -> None:
    unfrag_len, nh_field = ipv6_unfragmentable_length(orig)
    original_nh = orig[nh_field]
    data = bytearray()
    for i, frag in enumerate(fragments):
        assert len(frag) <= mtu
        assert struct.unpack_from("!H", frag, 4)[0] == len(frag) - 40
        expected_unfrag = bytearray(orig[:unfrag_len])
        expected_unfrag[4:6] = frag[4:6]  # payload length, checked above
        expected_unfrag[nh_field] = 44
        assert frag[:unfrag_len] == expected_unfrag
        nh, reserved, off_m, frag_id = struct.unpack_from("!BBHI", frag, unfrag_len)
        assert (nh, reserved, frag_id) == (original_nh, 0, ident)
        assert off_m & 0xFFF8 == len(data)
        assert off_m & 6 == 0
        last = i == len(fragments) - 1
        assert (off_m & 1) == (0 if last else 1)
        chunk = frag[unfrag_len + 8 :]
        if not last:
            assert len(chunk) % 8 == 0
        data += chunk
    assert bytes(data) == orig[unfrag_len:]


def assert_defragment6(orig: bytes, fragments: list[bytes]) -> None:
    rebuilt = defragment6([IPv6(f) for f in fragments])
    assert bytes(rebuilt) == orig


@pytest.mark.parametrize("mtu", [1280, 1281, 1500, 9000])
def test_ipv6_plain_udp(mtu: int) -> None:
    orig = ipv6_packet(12000)
    fragments = fragment_ipv6(orig, mtu, 0xDEADBEEF)
    check_v6_fragments(orig, fragments, mtu, 0xDEADBEEF)
    assert fragments[0][6] == 44
    assert_defragment6(orig, fragments)


def test_ipv6_ext_headers_split_per_rfc8200() -> None:
    # HbH, DestOpts, Routing stay unfragmentable; the DestOpts after Routing travels fragmented.
    orig = ipv6_packet(
        3000,
        IPv6ExtHdrHopByHop(),
        IPv6ExtHdrDestOpt(),
        IPv6ExtHdrRouting(addresses=["2001:db8:3::1"]),
        IPv6ExtHdrDestOpt(),
    )
    unfrag_len, nh_field = ipv6_unfragmentable_length(orig)
    assert (unfrag_len, nh_field) == (40 + 8 + 8 + 24, 56)
    fragments = fragment_ipv6(orig, 1280, 7)
    check_v6_fragments(orig, fragments, 1280, 7)
    first = IPv6(fragments[0])
    assert first.nh == 0 and first[IPv6ExtHdrRouting].nh == 44
    assert first[IPv6ExtHdrFragment].nh == 60
    later = IPv6(fragments[1])
    assert later[IPv6ExtHdrRouting].nh == 44 and later[IPv6ExtHdrFragment].offset > 0
    assert_defragment6(orig, fragments)


def test_ipv6_dest_opts_without_routing_are_fragmentable() -> None:
    orig = ipv6_packet(2000, IPv6ExtHdrHopByHop(), IPv6ExtHdrDestOpt())
    assert ipv6_unfragmentable_length(orig) == (48, 40)
    fragments = fragment_ipv6(orig, 1280, 1)
    check_v6_fragments(orig, fragments, 1280, 1)
    assert IPv6(fragments[0])[IPv6ExtHdrFragment].nh == 60
    assert_defragment6(orig, fragments)
    only_dest = ipv6_packet(2000, IPv6ExtHdrDestOpt())
    assert ipv6_unfragmentable_length(only_dest) == (40, 6)


def test_ipv6_esp_payload() -> None:
    esp = struct.pack("!II", 0x1000, 1) + payload(1500)
    orig = bytes(IPv6(src=V6_SRC, dst=V6_DST, nh=50) / Raw(esp))
    fragments = fragment_ipv6(orig, 1280, 0xFFFFFFFF)
    check_v6_fragments(orig, fragments, 1280, 0xFFFFFFFF)
    assert [len(f) for f in fragments] == [1280, 1548 - 40 - 1232 + 48]


@settings(max_examples=40, deadline=None)
@given(size=st.integers(min_value=0, max_value=5000), mtu=st.integers(min_value=1280, max_value=3000))
def test_ipv6_any_size_and_mtu(size: int, mtu: int) -> None:
    orig = ipv6_packet(size, IPv6ExtHdrHopByHop())
    fragments = fragment_ipv6(orig, mtu, size)
    if len(orig) <= mtu:
        assert fragments == [orig]
        return
    check_v6_fragments(orig, fragments, mtu, size)
    assert_defragment6(orig, fragments)


def test_ipv6_refusals() -> None:
    orig = ipv6_packet(3000)
    with pytest.raises(ValueError, match="IPv6 minimum"):
        fragment_ipv6(orig, 1279, 1)
    with pytest.raises(ValueError, match="32-bit"):
        fragment_ipv6(orig, 1280, 1 << 32)
    already = bytes(IPv6(src=V6_SRC, dst=V6_DST) / IPv6ExtHdrFragment(id=5, m=1) / Raw(payload(1400)))
    with pytest.raises(ValueError, match="already a fragment"):
        fragment_ipv6(already, 1280, 1)
    jumbo = bytearray(orig)
    jumbo[4:6] = b"\0\0"
    with pytest.raises(ValueError, match="jumbogram"):
        fragment_ipv6(bytes(jumbo), 1280, 1)
    with pytest.raises(ValueError, match="exceeds"):
        fragment_ipv6(orig[:2000], 1280, 1)
    with pytest.raises(ValueError, match="not an IPv6"):
        fragment_ipv6(ipv4_packet(2000), 1280, 1)
    truncated_chain = bytes(IPv6(src=V6_SRC, dst=V6_DST, nh=0, plen=1400)) + b"\x11\xff" + bytes(1398)
    with pytest.raises(ValueError, match="truncated"):
        fragment_ipv6(truncated_chain, 1280, 1)


def test_ipv6_fits_unchanged() -> None:
    orig = ipv6_packet(1000)
    assert fragment_ipv6(orig, 1280, 1) == [orig]
    assert fragment_ipv6(orig + b"pad", 1280, 1) == [orig]
