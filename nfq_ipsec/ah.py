"""IP Authentication Header (RFC 4302) in transport and tunnel mode, IPv4 and IPv6.

AH authenticates the payload *and* the parts of the IP header that survive the trip, so the ICV
is computed over a copy of the packet in which every field a router may legitimately change is
zeroed (RFC 4302 §3.3.3.1):

* IPv4: TOS (DSCP+ECN), flags, fragment offset, TTL, header checksum; options classified as
  mutable in Appendix A1 are zeroed entirely (type and length too). With loose/strict source
  routing the destination address is "mutable but predictable": while the route is not
  exhausted (pointer <= length, i.e. at the sender) the last address of the option is the final
  destination and is used instead, as Linux's ah4 does on output; on arrival the pointer is past
  the end and the destination already is the final one.
* IPv6: traffic class, flow label, hop limit; in hop-by-hop and destination options headers
  the data of every option whose "may change en route" bit (0x20 of the type) is set; a routing
  header of type 0 or 2 with segments left is rearranged into what the receiver will see (final
  destination in the IPv6 header, segments left 0, addresses rotated), exactly as Linux's ah6
  does. Other routing types are only accepted once they are spent (segments left 0); the
  Home Address option (Mobile IPv6, RFC 6275), whose address is swapped en route, is refused.
* The AH's own ICV field is zeroed; its alignment padding is included as carried.

With ESN (RFC 4302 §3.3.3.2 / RFC 4304) the high 32 bits of the sequence number are appended
after the packet for the ICV computation only; they are never transmitted.

The AH is padded to a multiple of 4 bytes under IPv4 and 8 bytes under IPv6 (§2.6), i.e. for
hmac-sha256-128 28 and 32 bytes; like Linux the receiver insists on exactly that length.

In IPv6 transport mode the AH goes where packet.transport_insertion_point() says: after
hop-by-hop, routing, and destination options not preceded by a routing header, before a fragment
header (Linux's ip6_find_1stfragopt, which scapy follows). Inbound, packet.find_header() locates it.

Inbound order (§3.4): parse -> replay check -> ICV (constant-time compare) -> replay update ->
strip. Every failure raises `Drop` with a global counter and bumps the SA's own counter; nothing
else escapes, whatever the bytes (every offset is checked before it is used).
"""

from __future__ import annotations

import itertools
import os
import struct
from typing import TYPE_CHECKING

from . import counters
from .algorithms import HmacIntegrity
from .checksum import internet_checksum
from .errors import Drop
from .packet import (
    PROTO_AH,
    PROTO_DSTOPTS,
    PROTO_HOPOPTS,
    PROTO_IPIP,
    PROTO_IPV6,
    PROTO_NONE,
    PROTO_ROUTING,
    find_header,
    ipv4_header,
    ipv6_header,
    transport_insertion_point,
)

if TYPE_CHECKING:
    from .sa import SecurityAssociation

AH_FIXED_LEN = 12  # next header, payload length, reserved, SPI, sequence number

# RFC 4302 Appendix A1: the only IPv4 options included in the ICV as they are (full type octets)
_IMMUTABLE_V4_OPTIONS = frozenset({
    0,  # end of option list
    1,  # no operation
    130,  # security (RFC 1108)
    133,  # extended security (RFC 1108)
    134,  # commercial security (CIPSO)
    148,  # router alert (RFC 2113)
    149,  # sender directed multi-destination delivery (RFC 1770)
})
_LSRR = 131
_SSRR = 137
_V6_OPT_MAY_CHANGE = 0x20
_V6_OPT_PAD1 = 0
_V6_OPT_HOME_ADDRESS = 201
_V4_MF_OFFSET_MASK = 0x3FFF
OUTER_TTL = 64
_MAX_V4_LEN = 0xFFFF

_AH_FIXED = struct.Struct("!BBHII")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_ip_ids = itertools.count(int.from_bytes(os.urandom(2), "big"))


def header_len(icv_len: int, family: int, align: int = 0) -> int:
    """Length of the AH (fixed part + ICV + alignment padding) carried by an IPv4/IPv6 header.

    align: 0 for RFC 4302's minimum (4 bytes for IPv4, 8 for IPv6), or 8 (Linux's IPv4 default)."""
    align = align or (8 if family == 6 else 4)
    return (AH_FIXED_LEN + icv_len + align - 1) // align * align


def _accepted_lengths(icv_len: int, family: int) -> tuple[int, ...]:
    """AH lengths a receiver accepts: 4-byte (RFC 4302) and 8-byte (Linux default) aligned IPv4 AH."""
    if family == 6:
        return (header_len(icv_len, 6),)
    return tuple(sorted({header_len(icv_len, 4, 4), header_len(icv_len, 4, 8)}))


def _integrity(sa: SecurityAssociation) -> HmacIntegrity:
    """The SA's keyed HMAC: sa.py stores make_integrity()'s object, or a null+HMAC Transform when an
    explicit icv_len was configured."""
    transform: object = sa.transform
    if isinstance(transform, HmacIntegrity):
        return transform
    integrity = getattr(transform, "integrity", None)
    if not isinstance(integrity, HmacIntegrity):  # sa.py refuses AH without auth; never on the hot path
        raise Drop(counters.XFRM_IN_STATE_INVALID, f"SA {sa.name} has no integrity algorithm for AH")
    return integrity


# -- outbound -----------------------------------------------------------------------------------


def encapsulate(sa: SecurityAssociation, packet: bytes | memoryview, seq: int) -> bytes:
    """Protect a full IP packet with AH under sequence number `seq` (64-bit); returns the new packet."""
    integ = _integrity(sa)
    icv_len = integ.icv_len
    if sa.mode == "tunnel":
        inner = _inner_packet(packet)
        ah_len = header_len(icv_len, sa.family, getattr(sa, "ah_align", 0))
        out = bytearray(_tunnel_header(sa, inner, ah_len + len(inner)))
        ah_off = len(out)
        out += _ah_header(PROTO_IPIP if inner[0] >> 4 == 4 else PROTO_IPV6, ah_len, sa.spi, seq)
        out += inner
    else:
        buf = memoryview(packet)
        version = buf[0] >> 4 if len(buf) else 0
        if version != sa.family:
            raise Drop(counters.XFRM_OUT_STATE_MODE_ERROR,
                       f"IPv{version} packet on an IPv{sa.family} transport SA")
        ah_len = header_len(icv_len, version, getattr(sa, "ah_align", 0))
        if version == 4:
            total, ah_off = _v4_bounds(buf, counters.XFRM_OUT_ERROR)
            if _U16.unpack_from(buf, 6)[0] & _V4_MF_OFFSET_MASK:
                raise Drop(counters.XFRM_OUT_ERROR, "transport mode cannot protect an IPv4 fragment")
            payload_nh = buf[9]
            out = bytearray(buf[:ah_off])
            out[9] = PROTO_AH
        else:
            total = _v6_total(buf, counters.XFRM_OUT_ERROR)
            ah_off, nh_pos = transport_insertion_point(buf, total)
            out = bytearray(buf[:ah_off])
            payload_nh = out[nh_pos]
            out[nh_pos] = PROTO_AH
        out += _ah_header(payload_nh, ah_len, sa.spi, seq)
        out += buf[ah_off:total]
        _set_lengths(out, version, ah_off)
    icv_input = bytearray(out)
    _zero_mutable(icv_input, ah_off, icv_len, counters.XFRM_OUT_ERROR)
    seq_hi = _U32.pack(seq >> 32 & 0xFFFFFFFF) if sa.esn else b""
    icv_at = ah_off + AH_FIXED_LEN
    out[icv_at:icv_at + icv_len] = integ.compute(icv_input, seq_hi)
    return bytes(out)


def _ah_header(next_header: int, ah_len: int, spi: int, seq: int) -> bytearray:
    """AH with a zeroed ICV and zero padding (RFC 4302 §2: payload length = 32-bit words - 2)."""
    ah = bytearray(ah_len)
    _AH_FIXED.pack_into(ah, 0, next_header, ah_len // 4 - 2, 0, spi, seq & 0xFFFFFFFF)
    return ah


def _set_lengths(out: bytearray, family: int, header_end: int) -> None:
    """Fill the total/payload length (and the IPv4 checksum) of the header at the start of `out`."""
    if family == 4:
        if len(out) > _MAX_V4_LEN:
            raise Drop(counters.XFRM_OUT_ERROR, f"AH packet of {len(out)} bytes exceeds the IPv4 maximum")
        _U16.pack_into(out, 2, len(out))
        out[10] = out[11] = 0
        _U16.pack_into(out, 10, internet_checksum(memoryview(out)[:header_end]))
    else:
        if len(out) - 40 > 0xFFFF:
            raise Drop(counters.XFRM_OUT_ERROR, f"AH packet of {len(out)} bytes needs a jumbogram")
        _U16.pack_into(out, 4, len(out) - 40)


def _inner_packet(packet: bytes | memoryview) -> memoryview:
    """The packet to tunnel, trimmed to its own length field (validated enough to read TOS/DF)."""
    buf = memoryview(packet)
    version = buf[0] >> 4 if len(buf) else 0
    if version == 4:
        total, _ = _v4_bounds(buf, counters.XFRM_OUT_ERROR)
    elif version == 6:
        total = _v6_total(buf, counters.XFRM_OUT_ERROR)
    else:
        raise Drop(counters.XFRM_OUT_ERROR, f"not an IP packet (version {version})")
    return buf[:total]


def _tunnel_header(sa: SecurityAssociation, inner: memoryview, payload_len: int) -> bytes:
    """Outer header for tunnel mode (RFC 4301 §5.1.2, same choices as esp.py): TTL/hop limit 64,
    TOS/TC copied, DF copied from an IPv4 inner packet, a fresh IPv4 ID, flow label 0."""
    if inner[0] >> 4 == 4:
        tos = inner[1]
        df = bool(inner[6] & 0x40)
    else:
        tos = (inner[0] & 0x0F) << 4 | inner[1] >> 4
        df = False
    if sa.family == 4:
        if 20 + payload_len > _MAX_V4_LEN:
            raise Drop(counters.XFRM_OUT_ERROR, f"AH packet of {20 + payload_len} bytes exceeds 65535")
        return ipv4_header(sa.src_packed, sa.dst_packed, PROTO_AH, payload_len, ttl=OUTER_TTL, tos=tos,
                           ident=next(_ip_ids), df=df)
    if payload_len > 0xFFFF:
        raise Drop(counters.XFRM_OUT_ERROR, f"AH payload of {payload_len} bytes needs a jumbogram")
    return ipv6_header(sa.src_packed, sa.dst_packed, PROTO_AH, payload_len, hlim=OUTER_TTL, tc=tos)


# -- inbound ------------------------------------------------------------------------------------


def decapsulate(sa: SecurityAssociation, packet: bytes | memoryview) -> bytes:
    """Verify and remove the AH of an inbound packet; returns the cleartext packet or raises Drop."""
    buf = memoryview(packet)
    c = sa.counters
    version = buf[0] >> 4 if len(buf) else 0
    if version != sa.family:
        c.format_errors += 1
        raise Drop(counters.XFRM_IN_NO_STATES, f"IPv{version} packet for an IPv{sa.family} SA")
    try:
        if version == 4:
            total, ah_off = _v4_bounds(buf, counters.IN_MALFORMED)
            if _U16.unpack_from(buf, 6)[0] & _V4_MF_OFFSET_MASK:
                raise Drop(counters.IN_MALFORMED, "IPv4 fragment (AH needs the reassembled packet)")
            if buf[9] != PROTO_AH:
                raise Drop(counters.IN_MALFORMED, f"protocol {buf[9]} where AH was expected")
            nh_pos = 9
        else:
            total = _v6_total(buf, counters.IN_MALFORMED)
            ah_off, nh_pos = find_header(buf, total, PROTO_AH)
        integ = _integrity(sa)
        icv_len = integ.icv_len
        if ah_off + AH_FIXED_LEN > total:
            raise Drop(counters.XFRM_IN_STATE_PROTO_ERROR, "truncated AH")
        next_header, payload_len, _reserved, spi, seq_low = _AH_FIXED.unpack_from(buf, ah_off)
        ah_len = (payload_len + 2) * 4
        if ah_len not in _accepted_lengths(icv_len, version):
            raise Drop(counters.XFRM_IN_STATE_PROTO_ERROR,
                       f"AH length {ah_len} is not valid for a {icv_len}-byte ICV "
                       f"(expected {' or '.join(map(str, _accepted_lengths(icv_len, version)))})")
        if ah_off + ah_len > total:
            raise Drop(counters.XFRM_IN_STATE_PROTO_ERROR, "truncated AH")
        if spi != sa.spi:
            raise Drop(counters.XFRM_IN_NO_STATES, f"SPI 0x{spi:08x} is not this SA's")
        if sa.mode == "tunnel" and next_header not in (PROTO_IPIP, PROTO_IPV6):
            raise Drop(counters.XFRM_IN_STATE_MODE_ERROR, f"tunnel mode AH carries protocol {next_header}")
        icv_input = bytearray(buf[:total])
        _zero_mutable(icv_input, ah_off, icv_len, counters.XFRM_IN_HDR_ERROR)
    except Drop:
        c.format_errors += 1
        raise
    try:
        seq = sa.replay.check(seq_low)
    except Drop:
        c.replay_drops += 1
        raise
    icv_at = ah_off + AH_FIXED_LEN
    seq_hi = _U32.pack(seq >> 32) if sa.esn else b""
    if not integ.verify(icv_input, buf[icv_at:icv_at + icv_len], seq_hi):
        c.integrity_failures += 1
        raise Drop(counters.XFRM_IN_STATE_PROTO_ERROR, "AH ICV mismatch")
    sa.replay.update(seq)
    if next_header == PROTO_NONE:
        raise Drop(counters.IN_DUMMY_PACKET, "AH next header 59 (no next header)")
    payload = buf[ah_off + ah_len:total]
    if sa.mode == "tunnel":
        return _tunnelled_packet(sa, payload, next_header)
    out = bytearray(buf[:ah_off])
    out[nh_pos] = next_header
    out += payload
    if version == 4:
        _U16.pack_into(out, 2, len(out))
        out[10] = out[11] = 0
        _U16.pack_into(out, 10, internet_checksum(memoryview(out)[:ah_off]))
    else:
        _U16.pack_into(out, 4, len(out) - 40)
    return bytes(out)


def _tunnelled_packet(sa: SecurityAssociation, payload: memoryview, next_header: int) -> bytes:
    """The inner packet, checked against the next header and trimmed to its own length (like esp.py)."""
    version = payload[0] >> 4 if len(payload) else 0
    if (next_header, version) == (PROTO_IPIP, 4) and len(payload) >= 20:
        total = _U16.unpack_from(payload, 2)[0]
        ok = 20 <= total <= len(payload)
    elif (next_header, version) == (PROTO_IPV6, 6) and len(payload) >= 40:
        total = 40 + _U16.unpack_from(payload, 4)[0]
        ok = total <= len(payload)
    else:
        total, ok = 0, False
    if not ok:
        sa.counters.format_errors += 1
        raise Drop(counters.XFRM_IN_STATE_MODE_ERROR,
                   f"inner packet (IP version {version}, {len(payload)} bytes) does not match next header "
                   f"{next_header}")
    return bytes(payload[:total])


# -- shared header walking ----------------------------------------------------------------------


def _v4_bounds(buf: memoryview, counter: str) -> tuple[int, int]:
    """(total length, header length) of an IPv4 packet, checked against the buffer."""
    if len(buf) < 20 or buf[0] >> 4 != 4:
        raise Drop(counter, "truncated IPv4 header")
    hl = (buf[0] & 0x0F) * 4
    total = _U16.unpack_from(buf, 2)[0]
    if hl < 20 or total < hl or total > len(buf):
        raise Drop(counter, f"bad IPv4 lengths (header {hl}, total {total}, have {len(buf)})")
    return total, hl


def _v6_total(buf: memoryview, counter: str) -> int:
    """Total length of an IPv6 packet (header + payload length), checked against the buffer."""
    if len(buf) < 40 or buf[0] >> 4 != 6:
        raise Drop(counter, "truncated IPv6 header")
    payload_len = _U16.unpack_from(buf, 4)[0]
    if payload_len == 0:
        raise Drop(counter, "IPv6 jumbograms are not supported")
    total = 40 + payload_len
    if total > len(buf):
        raise Drop(counter, f"IPv6 payload length {payload_len} exceeds the {len(buf) - 40} bytes present")
    return total


def _zero_mutable(pkt: bytearray, header_end: int, icv_len: int, counter: str) -> None:
    """Zero, in place, what RFC 4302 §3.3.3.1 excludes from the ICV: the mutable fields of the headers
    before the AH at `header_end`, and the AH's ICV (its alignment padding stays, as Linux does)."""
    icv_at = header_end + AH_FIXED_LEN
    pkt[icv_at:icv_at + icv_len] = bytes(icv_len)
    if pkt[0] >> 4 == 4:
        _zero_mutable_v4(pkt, header_end, counter)
    else:
        _zero_mutable_v6(pkt, header_end, counter)


def _zero_mutable_v4(pkt: bytearray, header_end: int, counter: str) -> None:
    pkt[1] = 0  # DSCP + ECN
    pkt[6] = pkt[7] = 0  # flags + fragment offset
    pkt[8] = 0  # TTL
    pkt[10] = pkt[11] = 0  # header checksum
    i = 20
    while i < header_end:
        opt = pkt[i]
        if opt == 0:  # end of option list: the rest is padding, included as is
            break
        if opt == 1:
            i += 1
            continue
        if i + 1 >= header_end:
            raise Drop(counter, f"truncated IPv4 option {opt}")
        opt_len = pkt[i + 1]
        if opt_len < 2 or i + opt_len > header_end:
            raise Drop(counter, f"bad length {opt_len} of IPv4 option {opt}")
        if opt not in _IMMUTABLE_V4_OPTIONS:
            if opt in (_LSRR, _SSRR):
                if opt_len < 7:
                    raise Drop(counter, f"source route option of length {opt_len} has no address")
                if pkt[i + 2] <= opt_len:  # route not yet exhausted: the last address is the destination
                    pkt[16:20] = pkt[i + opt_len - 4:i + opt_len]
            pkt[i:i + opt_len] = bytes(opt_len)
        i += opt_len


def _zero_mutable_v6(pkt: bytearray, header_end: int, counter: str) -> None:
    pkt[0] = 0x60  # version kept; traffic class and flow label zeroed
    pkt[1] = pkt[2] = pkt[3] = 0
    pkt[7] = 0  # hop limit
    nh = pkt[6]
    off = 40
    while off < header_end:
        ext_len = (pkt[off + 1] + 1) * 8
        if nh in (PROTO_HOPOPTS, PROTO_DSTOPTS):
            _zero_mutable_v6_options(pkt, off, off + ext_len, counter)
        elif nh == PROTO_ROUTING:
            _predict_routing_header(pkt, off, ext_len, counter)
        nh = pkt[off]
        off += ext_len


def _zero_mutable_v6_options(pkt: bytearray, start: int, end: int, counter: str) -> None:
    """Zero the data of the options marked "may change en route" in a hop-by-hop/destination header."""
    i = start + 2
    while i < end:
        opt = pkt[i]
        if opt == _V6_OPT_PAD1:
            i += 1
            continue
        if i + 2 > end:
            raise Drop(counter, f"truncated IPv6 option {opt}")
        data_end = i + 2 + pkt[i + 1]
        if data_end > end:
            raise Drop(counter, f"IPv6 option {opt} overruns its header")
        if opt == _V6_OPT_HOME_ADDRESS:
            raise Drop(counter, "Mobile IPv6 home address option is not supported with AH")
        if opt & _V6_OPT_MAY_CHANGE:
            pkt[i + 2:data_end] = bytes(data_end - i - 2)
        i = data_end


def _predict_routing_header(pkt: bytearray, off: int, ext_len: int, counter: str) -> None:
    """Rewrite a routing header and the destination into their state at the final destination.

    Type 0 (RFC 2460, deprecated) and type 2 (RFC 6275) carry plain address lists; a packet still
    having segments left is rotated as Linux's ipv6_rearrange_rthdr does: the current destination
    takes the first unvisited slot, the final address becomes the destination, segments left 0.
    """
    segments_left = pkt[off + 3]
    if segments_left == 0:
        return
    routing_type = pkt[off + 2]
    if routing_type not in (0, 2):
        raise Drop(counter, f"routing header type {routing_type} with segments left is not supported with AH")
    hdr_ext_len = pkt[off + 1]
    segments = hdr_ext_len >> 1
    if hdr_ext_len & 1 or segments_left > segments or ext_len < 8 + 16 * segments:
        raise Drop(counter, f"malformed routing header (length {hdr_ext_len}, segments left {segments_left})")
    pkt[off + 3] = 0
    addrs = off + 8
    first = addrs + 16 * (segments - segments_left)
    last = addrs + 16 * (segments - 1)
    final = pkt[last:last + 16]
    pkt[first + 16:last + 16] = pkt[first:last]
    pkt[first:first + 16] = pkt[24:40]
    pkt[24:40] = final
