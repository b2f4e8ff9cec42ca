"""Read-only views of IPv4/IPv6 packets: what the SPD, the SAD and ESP/AH need to know.

`parse()` runs once per packet on the hot path, so it reads fields with ``struct.unpack_from``
and indexing straight out of the buffer and allocates only its result. It never trusts a
length: every offset is checked against the packet, the IPv6 extension-header walk is bounded
(`MAX_EXTENSION_HEADERS`), and anything inconsistent raises ``Drop(IN_MALFORMED)``.

IPv6 extension headers (RFC 8200 §4): hop-by-hop (0), routing (43), fragment (44) and
destination options (60) are walked with the usual (len + 1) * 8 rule; AH (51) is an extension
header whose length counts 4-byte words minus 2 (RFC 4302 §2.2) but is where the walk stops,
as ESP (50), no-next-header (59) and any upper-layer protocol do. Non-first fragments stop the
walk too: what follows is the middle of some header (RFC 4301 §4.4.1.3: their ports are OPAQUE).

Two offsets matter for IPsec and are reported separately:

* ``l4_offset``: where the header named by ``proto`` starts (the ESP/AH header of an inbound
  packet, the TCP header of a cleartext one);
* ``header_len``: where a transport-mode ESP/AH header is inserted: after hop-by-hop, routing,
  and destination options not preceded by a routing header, before a fragment header and
  everything else (RFC 4303 §3.1.1; the placement of Linux's ip6_find_1stfragopt, which scapy
  follows). For IPv4 it is the IP header length.

``nh_offset`` / ``l4_nh_offset`` are the positions of the next-header bytes naming those two
headers (9, the IPv4 protocol field, for IPv4), which is what ESP/AH rewrite.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from . import counters
from .checksum import internet_checksum
from .errors import Drop
from .flow import NO_PORT, FlowKey

PROTO_HOPOPTS = 0
PROTO_ICMP = 1
PROTO_IPIP = 4
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_DCCP = 33
PROTO_IPV6 = 41
PROTO_ROUTING = 43
PROTO_FRAGMENT = 44
PROTO_ESP = 50
PROTO_AH = 51
PROTO_ICMPV6 = 58
PROTO_NONE = 59
PROTO_DSTOPTS = 60
PROTO_SCTP = 132
PROTO_UDPLITE = 136

# protocols whose first 4 bytes are source and destination port
PORT_PROTOCOLS = frozenset({PROTO_TCP, PROTO_UDP, PROTO_DCCP, PROTO_SCTP, PROTO_UDPLITE})
MAX_EXTENSION_HEADERS = 16  # more than any sane packet carries; bounds the walk

IPV4_DF = 0x4000
IPV4_MF = 0x2000
IPV4_OFFSET_MASK = 0x1FFF

_unpack_H = struct.Struct("!H").unpack_from
_unpack_HH = struct.Struct("!HH").unpack_from
_unpack_I = struct.Struct("!I").unpack_from


class PacketInfo(NamedTuple):
    """The parsed view of one IP packet (offsets are from the start of the buffer)."""

    version: int  # 4 or 6
    header_len: int  # transport-mode ESP/AH insertion point (IPv4: IHL * 4)
    proto: int  # upper-layer protocol after the extension-header chain (50/51 for ESP/AH)
    l4_offset: int  # where the header named by `proto` starts (-> total_len if it is absent)
    total_len: int  # IP total length (bytes past it, e.g. link padding, are not part of the packet)
    src: bytes  # packed, 4 or 16 bytes
    dst: bytes
    is_fragment: bool  # IPv4 MF/offset, or an IPv6 fragment header that is not atomic
    first_fragment: bool  # fragment offset 0 (True for unfragmented packets)
    df: bool  # IPv4 DF bit (False for IPv6)
    flow: FlowKey
    spi: int  # ESP/AH SPI, -1 otherwise (or when not visible: non-first fragments)
    nh_offset: int  # offset of the next-header byte naming the header at `header_len`
    l4_nh_offset: int  # offset of the next-header byte naming the header at `l4_offset`


def _malformed(reason: str) -> Drop:
    return Drop(counters.IN_MALFORMED, reason)


def parse(buf: bytes | bytearray | memoryview) -> PacketInfo:
    """Parse an IPv4 or IPv6 packet; raises Drop(IN_MALFORMED) when it is not a sane one."""
    n = len(buf)
    version = buf[0] >> 4 if n else 0
    sport = dport = itype = icode = spi = NO_PORT
    if version == 4:
        if n < 20:
            raise _malformed(f"IPv4 packet of {n} bytes is shorter than its header")
        vihl, total, frag, proto, src_int, dst_int = _V4_HEAD.unpack_from(buf)
        ihl = (vihl & 0x0F) << 2
        if ihl < 20 or total < ihl or total > n:
            raise _malformed(f"IPv4 lengths inconsistent: IHL {ihl}, total {total}, have {n}")
        offset = frag & IPV4_OFFSET_MASK
        if not offset:
            if proto in PORT_PROTOCOLS:
                if total - ihl < 4:
                    raise _malformed(f"protocol {proto} header truncated ({total - ihl} bytes)")
                sport, dport = _unpack_HH(buf, ihl)
            elif proto in _OTHER_L4:
                itype, icode, spi = _other_l4(buf, proto, ihl, total)
        flow = _new_tuple(FlowKey, (4, src_int, dst_int, proto, sport, dport, itype, icode))
        return _new_tuple(PacketInfo, (
            4, ihl, proto, ihl, total, bytes(buf[12:16]), bytes(buf[16:20]), bool(offset or frag & IPV4_MF),
            not offset, bool(frag & IPV4_DF), flow, spi, 9, 9))
    if version == 6:
        if n < 40:
            raise _malformed(f"IPv6 packet of {n} bytes is shorter than its header")
        total = 40 + _unpack_H(buf, 4)[0]
        if total > n:
            raise _malformed(f"IPv6 payload length {total - 40} exceeds the {n - 40} bytes present")
        src = bytes(buf[8:24])
        dst = bytes(buf[24:40])
        proto = buf[6]
        if proto not in _V6_EXTENSIONS:  # fast path: no extension headers
            header_len = l4 = 40
            nh_offset = l4_nh = 6
            is_fragment = False
            first = True
        else:
            header_len, nh_offset, proto, l4, l4_nh, is_fragment, first = _walk_v6(buf, total)
        if first:
            if proto in PORT_PROTOCOLS:
                if total - l4 < 4:
                    raise _malformed(f"protocol {proto} header truncated ({total - l4} bytes)")
                sport, dport = _unpack_HH(buf, l4)
            elif proto in _OTHER_L4:
                itype, icode, spi = _other_l4(buf, proto, l4, total)
        flow = _new_tuple(FlowKey, (6, int.from_bytes(src, "big"), int.from_bytes(dst, "big"), proto, sport,
                                    dport, itype, icode))
        return _new_tuple(PacketInfo, (6, header_len, proto, l4, total, src, dst, is_fragment, first, False,
                                       flow, spi, nh_offset, l4_nh))
    raise _malformed(f"IP version {version}" if n else "empty packet")


# version/IHL, total length, flags/fragment offset, protocol, source and destination as integers
_V4_HEAD = struct.Struct("!BxHxxHxBxxII")
_V6_EXTENSIONS = frozenset({PROTO_HOPOPTS, PROTO_ROUTING, PROTO_FRAGMENT, PROTO_DSTOPTS})
_OTHER_L4 = frozenset({PROTO_ICMP, PROTO_ICMPV6, PROTO_ESP, PROTO_AH})
# NamedTuple.__new__ parses keyword arguments; tuple.__new__ builds the same object at half the cost
_new_tuple = tuple.__new__


def _other_l4(buf: bytes | bytearray | memoryview, proto: int, l4: int, total: int) -> tuple[int, int, int]:
    """(ICMP type, ICMP code, SPI) for ICMP/ICMPv6/ESP/AH, -1 where absent."""
    avail = total - l4
    if proto == PROTO_ICMP or proto == PROTO_ICMPV6:
        if avail < 2:
            raise _malformed(f"ICMP header truncated ({avail} bytes)")
        return buf[l4], buf[l4 + 1], NO_PORT
    if proto == PROTO_ESP:
        if avail < 8:
            raise _malformed(f"ESP header truncated ({avail} bytes)")
        return NO_PORT, NO_PORT, _unpack_I(buf, l4)[0]
    if avail < 12:
        raise _malformed(f"AH header truncated ({avail} bytes)")
    return NO_PORT, NO_PORT, _unpack_I(buf, l4 + 4)[0]


def _walk_v6(buf: bytes | bytearray | memoryview, total: int) -> tuple[int, int, int, int, int, bool, bool]:
    """Walk the IPv6 extension headers.

    Returns (insertion point, its next-header byte offset, proto, l4 offset, its next-header byte
    offset, is_fragment, first_fragment).
    """
    off = 40
    nh_pos = 6
    nh = buf[6]
    insert = -1
    insert_nh = -1
    routing_seen = False
    is_fragment = False
    first = True
    for _ in range(MAX_EXTENSION_HEADERS):
        if nh == PROTO_FRAGMENT:
            if insert < 0:
                insert, insert_nh = off, nh_pos
            if off + 8 > total:
                raise _malformed("truncated IPv6 fragment header")
            field = _unpack_H(buf, off + 2)[0]
            frag_offset = field & 0xFFF8
            if frag_offset or field & 1:  # atomic fragments (offset 0, M 0) are whole packets
                is_fragment = True
            nh_pos = off
            nh = buf[off]
            off += 8
            if frag_offset:
                first = False
                break
            continue
        if nh not in (PROTO_HOPOPTS, PROTO_ROUTING, PROTO_DSTOPTS):
            break
        if nh == PROTO_HOPOPTS and off != 40:
            raise _malformed("IPv6 hop-by-hop options header not first (RFC 8200 §4.1)")
        if insert < 0:
            if nh == PROTO_ROUTING:
                routing_seen = True
            elif nh == PROTO_DSTOPTS and routing_seen:
                insert, insert_nh = off, nh_pos
        if off + 2 > total:
            raise _malformed("truncated IPv6 extension header")
        nh_pos = off
        nh = buf[off]
        off += (buf[off + 1] + 1) << 3
        if off > total:
            raise _malformed("IPv6 extension header runs past the packet")
    else:
        raise _malformed(f"more than {MAX_EXTENSION_HEADERS} IPv6 extension headers")
    if insert < 0:
        insert, insert_nh = off, nh_pos
    return insert, insert_nh, nh, off, nh_pos, is_fragment, first


def find_header(buf: bytes | bytearray | memoryview, total: int, wanted: int,
                counter: str = counters.IN_MALFORMED) -> tuple[int, int]:
    """Offset of the first IPv6 header of type `wanted` and of the next-header byte naming it.

    Walks hop-by-hop, routing and destination options, and AH (its length counts 4-byte words
    minus 2, RFC 4302 §2.2) when looking past it. An ESP/AH packet must be reassembled before it
    is processed, so a fragment header on the way is an error. Raises Drop(counter).
    """
    off = 40
    nh_pos = 6
    nh = buf[6]
    for _ in range(MAX_EXTENSION_HEADERS):
        if nh == wanted:
            return off, nh_pos
        if nh == PROTO_AH:
            if off + 2 > total:
                raise Drop(counter, "truncated AH")
            nh_pos = off
            nh = buf[off]
            off += (buf[off + 1] + 2) << 2
            if off > total:
                raise Drop(counter, "AH runs past the packet")
            continue
        if nh not in (PROTO_HOPOPTS, PROTO_ROUTING, PROTO_DSTOPTS):
            if nh == PROTO_FRAGMENT:
                raise Drop(counter, "IPv6 fragment where a whole packet is needed")
            raise Drop(counter, f"next header {nh} where {wanted} was expected")
        if off + 2 > total:
            raise Drop(counter, "truncated IPv6 extension header")
        nh_pos = off
        nh = buf[off]
        off += (buf[off + 1] + 1) << 3
        if off > total:
            raise Drop(counter, "IPv6 extension header runs past the packet")
    raise Drop(counter, f"more than {MAX_EXTENSION_HEADERS} IPv6 extension headers")


def transport_insertion_point(buf: bytes | bytearray | memoryview, total: int) -> tuple[int, int]:
    """Where transport-mode ESP/AH goes in an IPv6 packet, and the offset of the next-header byte
    that must name it (see the module docstring). Raises Drop(IN_MALFORMED)."""
    if buf[6] not in _V6_EXTENSIONS:
        return 40, 6
    insert, insert_nh = _walk_v6(buf, total)[:2]
    return insert, insert_nh


# -- builders --------------------------------------------------------------------------------------


def ipv4_header(src: bytes, dst: bytes, proto: int, payload_len: int, *, ttl: int = 64, tos: int = 0,
                ident: int = 0, df: bool = False, options: bytes = b"") -> bytes:
    """An IPv4 header (checksum filled in) for a payload of `payload_len` bytes."""
    if len(options) % 4:
        raise ValueError("IPv4 options must be padded to a multiple of 4 bytes")
    ihl = 20 + len(options)
    total = ihl + payload_len
    if total > 0xFFFF:
        raise ValueError(f"IPv4 packet of {total} bytes exceeds 65535")
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x40 | (ihl >> 2), tos, total, ident & 0xFFFF,
                                IPV4_DF if df else 0, ttl, proto, 0, src, dst))
    hdr += options
    struct.pack_into("!H", hdr, 10, internet_checksum(hdr))
    return bytes(hdr)


def ipv6_header(src: bytes, dst: bytes, nh: int, payload_len: int, *, hlim: int = 64, tc: int = 0,
                flow_label: int = 0) -> bytes:
    """An IPv6 header for a payload (extension headers included) of `payload_len` bytes."""
    if payload_len > 0xFFFF:
        raise ValueError(f"IPv6 payload of {payload_len} bytes needs a jumbogram")
    return struct.pack("!IHBB16s16s", (6 << 28) | (tc << 20) | (flow_label & 0xFFFFF), payload_len, nh,
                       hlim, src, dst)


__all__ = [
    "MAX_EXTENSION_HEADERS",
    "PORT_PROTOCOLS",
    "PacketInfo",
    "find_header",
    "ipv4_header",
    "ipv6_header",
    "parse",
    "transport_insertion_point",
]
