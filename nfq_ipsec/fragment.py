"""IPv4 (RFC 791) and IPv6 (RFC 8200 §4.5) fragmentation of packets too big for the path.

The engine needs this after encapsulation grows a packet past the MTU: IPv4 packets without DF
and IPv6 packets we originate (the tunnel's outer header) are fragmented here; reassembly is the
receiving kernel's job. Both functions take and return whole IP packets and raise ValueError for
input they cannot fragment (DF set, MTU too small, malformed header) so the caller can choose
between ICMP "too big" and a drop.
"""

from __future__ import annotations

import struct

from .checksum import internet_checksum

IPV4_MIN_MTU = 68  # RFC 791: every IPv4 module must forward 68-byte datagrams
IPV6_MIN_MTU = 1280  # RFC 8200 §5
IPV4_DF = 0x4000
IPV4_MF = 0x2000
IPV4_OFFSET_MASK = 0x1FFF
IPV6_HDR_LEN = 40
IPV6_FRAG_HDR_LEN = 8
NH_HOP_BY_HOP = 0
NH_ROUTING = 43
NH_FRAGMENT = 44
NH_DEST_OPTS = 60

_IPV4_OPT_EOL = 0
_IPV4_OPT_NOP = 1
_IPV4_OPT_COPIED = 0x80


def _ipv4_copied_options(options: bytes) -> bytes:
    """Options that RFC 791 says go into every fragment (copy flag set), padded to 4 bytes."""
    copied = bytearray()
    i = 0
    while i < len(options):
        kind = options[i]
        if kind == _IPV4_OPT_EOL:
            break
        if kind == _IPV4_OPT_NOP:
            i += 1
            continue
        if i + 1 >= len(options) or options[i + 1] < 2 or i + options[i + 1] > len(options):
            raise ValueError(f"malformed IPv4 option {kind} at option offset {i}")
        length = options[i + 1]
        if kind & _IPV4_OPT_COPIED:
            copied += options[i : i + length]
        i += length
    copied += bytes(-len(copied) % 4)  # EOL padding up to the 32-bit header boundary
    return bytes(copied)


def fragment_ipv4(packet: bytes, mtu: int) -> list[bytes]:
    """Split an IPv4 packet into fragments of at most `mtu` bytes each (RFC 791 §3.2).

    A packet that fits is returned unchanged as the only element. The ID, TOS, TTL and protocol are
    kept; offsets are multiples of 8; all fragments but the last get MF; the first keeps every
    option, the others only options with the copy flag. An already-fragmented packet keeps its
    offset base, and its last piece keeps its original MF (so a middle fragment stays a middle).
    Raises ValueError if DF is set and the packet does not fit, or if `mtu`/the header is unusable.
    """
    if len(packet) < 20 or packet[0] >> 4 != 4:
        raise ValueError("not an IPv4 packet")
    ihl = (packet[0] & 0x0F) * 4
    total_len, flags_off = struct.unpack_from("!H2xH", packet, 2)
    if ihl < 20 or total_len < ihl or total_len > len(packet):
        raise ValueError(f"bad IPv4 lengths: header {ihl}, total {total_len}, buffer {len(packet)}")
    if total_len <= mtu:
        return [packet[:total_len]]
    if flags_off & IPV4_DF:
        raise ValueError(f"DF set and {total_len} bytes exceed MTU {mtu}")
    if mtu < IPV4_MIN_MTU:
        raise ValueError(f"MTU {mtu} below the IPv4 minimum {IPV4_MIN_MTU}")
    if mtu - ihl < 8:
        raise ValueError(f"MTU {mtu} leaves no room for data after a {ihl}-byte header")

    base_offset = (flags_off & IPV4_OFFSET_MASK) * 8
    last_mf = flags_off & IPV4_MF
    keep_flags = flags_off & ~(IPV4_MF | IPV4_OFFSET_MASK) & 0xFFFF  # reserved bit (and DF = 0) carry over
    fixed_header = packet[:20]
    options = packet[20:ihl]  # the first fragment keeps all options
    rest_options = _ipv4_copied_options(options)
    data = memoryview(packet)[ihl:total_len]

    fragments: list[bytes] = []
    pos = 0
    while pos < len(data):
        hlen = 20 + len(options)
        room = (mtu - hlen) & ~7
        chunk = data[pos : pos + room]
        is_last = pos + len(chunk) >= len(data)
        offset = base_offset + pos
        if offset > IPV4_OFFSET_MASK * 8:
            raise ValueError(f"fragment offset {offset} exceeds the 13-bit field")
        flags = keep_flags | (last_mf if is_last else IPV4_MF) | (offset >> 3)
        header = bytearray(fixed_header + options)
        header[0] = 0x40 | (hlen >> 2)
        struct.pack_into("!H", header, 2, hlen + len(chunk))
        struct.pack_into("!H", header, 6, flags)
        struct.pack_into("!H", header, 10, 0)
        struct.pack_into("!H", header, 10, internet_checksum(header))
        fragments.append(bytes(header) + chunk)
        pos += len(chunk)
        options = rest_options
    return fragments


def ipv6_unfragmentable_length(packet: bytes | memoryview) -> tuple[int, int]:
    """Length of the IPv6 unfragmentable part and the offset of the Next Header field that ends it.

    The unfragmentable part (RFC 8200 §4.5) is the IPv6 header plus Hop-by-Hop, Routing and any
    Destination Options that come before a Routing header. Destination Options after the last
    Routing header belong to the fragmentable part, hence the walk remembers the last HbH/Routing.
    Raises ValueError on a truncated chain or a packet that already carries a Fragment header.
    """
    end, nh_field = IPV6_HDR_LEN, 6
    nh, pos = packet[6], IPV6_HDR_LEN
    while nh in (NH_HOP_BY_HOP, NH_ROUTING, NH_DEST_OPTS):
        if pos + 2 > len(packet):
            raise ValueError("truncated IPv6 extension header")
        length = (packet[pos + 1] + 1) * 8
        if pos + length > len(packet):
            raise ValueError("truncated IPv6 extension header")
        if nh != NH_DEST_OPTS:
            end, nh_field = pos + length, pos
        nh, pos = packet[pos], pos + length
    if nh == NH_FRAGMENT:
        raise ValueError("packet is already a fragment")
    return end, nh_field


def fragment_ipv6(packet: bytes, mtu: int, ident: int) -> list[bytes]:
    """Split an IPv6 packet we originate into fragments of at most `mtu` bytes (RFC 8200 §4.5).

    A packet that fits is returned unchanged. Each fragment is the unfragmentable part (its last
    Next Header rewritten to 44), a Fragment header carrying the original Next Header, `ident`
    (32 bits) and an 8-aligned offset, then its slice of the fragmentable part; Payload Length is
    set per fragment. Raises ValueError for MTU < 1280, jumbograms, or a malformed header.
    """
    if len(packet) < IPV6_HDR_LEN or packet[0] >> 4 != 6:
        raise ValueError("not an IPv6 packet")
    if not 0 <= ident <= 0xFFFFFFFF:
        raise ValueError(f"fragment identification {ident} is not 32-bit")
    payload_len = struct.unpack_from("!H", packet, 4)[0]
    if payload_len == 0:
        raise ValueError("jumbogram or empty payload length: not fragmentable")
    total_len = IPV6_HDR_LEN + payload_len
    if total_len > len(packet):
        raise ValueError(f"payload length {payload_len} exceeds the {len(packet)}-byte buffer")
    if total_len <= mtu:
        return [packet[:total_len]]
    if mtu < IPV6_MIN_MTU:
        raise ValueError(f"MTU {mtu} below the IPv6 minimum {IPV6_MIN_MTU}")

    unfrag_len, nh_field = ipv6_unfragmentable_length(packet[:total_len])
    room = (mtu - unfrag_len - IPV6_FRAG_HDR_LEN) & ~7
    if room < 8:
        raise ValueError(f"unfragmentable part of {unfrag_len} bytes leaves no room under MTU {mtu}")
    unfrag = bytearray(packet[:unfrag_len])
    original_nh = unfrag[nh_field]
    unfrag[nh_field] = NH_FRAGMENT
    data = memoryview(packet)[unfrag_len:total_len]

    fragments: list[bytes] = []
    for pos in range(0, len(data), room):
        chunk = data[pos : pos + room]
        more = 1 if pos + room < len(data) else 0
        struct.pack_into("!H", unfrag, 4, unfrag_len - IPV6_HDR_LEN + IPV6_FRAG_HDR_LEN + len(chunk))
        frag_header = struct.pack("!BxHI", original_nh, pos | more, ident)
        fragments.append(bytes(unfrag) + frag_header + chunk)
    return fragments
