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
    if n < 1:
        raise _malformed("empty packet")
    version = buf[0] >> 4
    if version == 4:
        if n < 20:
            raise _malformed(f"IPv4 packet of {n} bytes is shorter than its header")
        ihl = (buf[0] & 0x0F) << 2
        total = _unpack_H(buf, 2)[0]
        if ihl < 20 or total < ihl or total > n:
            raise _malformed(f"IPv4 lengths inconsistent: IHL {ihl}, total {total}, have {n}")
        frag = _unpack_H(buf, 6)[0]
        offset = frag & IPV4_OFFSET_MASK
        is_fragment = bool(offset or frag & IPV4_MF)
        first = offset == 0
        proto = buf[9]
        src = bytes(buf[12:16])
        dst = bytes(buf[16:20])
        return _finish(buf, 4, ihl, proto, ihl, total, src, dst, is_fragment, first,
                       bool(frag & IPV4_DF), 9, 9)
    if version == 6:
        if n < 40:
            raise _malformed(f"IPv6 packet of {n} bytes is shorter than its header")
        total = 40 + _unpack_H(buf, 4)[0]
        if total > n:
            raise _malformed(f"IPv6 payload length {total - 40} exceeds the {n - 40} bytes present")
        src = bytes(buf[8:24])
        dst = bytes(buf[24:40])
        nh = buf[6]
        if nh not in _V6_EXTENSIONS:  # fast path: no extension headers
            return _finish(buf, 6, 40, nh, 40, total, src, dst, False, True, False, 6, 6)
        header_len, nh_offset, proto, l4, l4_nh, is_fragment, first = _walk_v6(buf, total)
        return _finish(buf, 6, header_len, proto, l4, total, src, dst, is_fragment, first, False,
                       nh_offset, l4_nh)
    raise _malformed(f"IP version {version}")


_V6_EXTENSIONS = frozenset({PROTO_HOPOPTS, PROTO_ROUTING, PROTO_FRAGMENT, PROTO_DSTOPTS})


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


def _finish(buf: bytes | bytearray | memoryview, version: int, header_len: int, proto: int, l4: int,
            total: int, src: bytes, dst: bytes, is_fragment: bool, first: bool, df: bool,
            nh_offset: int, l4_nh_offset: int) -> PacketInfo:
    """Read ports / ICMP type and code / SPI at `l4` and build the result."""
    sport = dport = itype = icode = NO_PORT
    spi = -1
    if first:
        avail = total - l4
        if proto in PORT_PROTOCOLS:
            if avail < 4:
                raise _malformed(f"protocol {proto} header truncated ({avail} bytes)")
            sport, dport = _unpack_HH(buf, l4)
        elif proto == PROTO_ICMP or proto == PROTO_ICMPV6:
            if avail < 2:
                raise _malformed(f"ICMP header truncated ({avail} bytes)")
            itype = buf[l4]
            icode = buf[l4 + 1]
        elif proto == PROTO_ESP:
            if avail < 8:
                raise _malformed(f"ESP header truncated ({avail} bytes)")
            spi = _unpack_I(buf, l4)[0]
        elif proto == PROTO_AH:
            if avail < 12:
                raise _malformed(f"AH header truncated ({avail} bytes)")
            spi = _unpack_I(buf, l4 + 4)[0]
    flow = FlowKey(version, int.from_bytes(src, "big"), int.from_bytes(dst, "big"), proto,
                   sport, dport, itype, icode)
    return PacketInfo(version, header_len, proto, l4, total, src, dst, is_fragment, first, df, flow, spi,
                      nh_offset, l4_nh_offset)


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
