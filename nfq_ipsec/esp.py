"""ESP (RFC 4303) encapsulation and decapsulation, transport and tunnel mode, IPv4 and IPv6.

Wire layout after the (outer) IP header::

    SPI | seq_lo | IV | E( payload | [TFC padding] | padding 1,2,3.. | pad length | next header ) | ICV

* Padding (§2.4) makes (payload + 2) a multiple of the transform's block (4 for AEADs and NULL,
  16 for AES-CBC); the receiver checks the bytes are 1, 2, 3, ... (``IN_PADDING_ERROR``).
* ESN (RFC 4304): only the low 32 bits travel; the high half enters the ICV (the AEAD AAD,
  or appended to the HMAC input) and the replay window infers it on receipt.
* Tunnel mode: the outer header comes from the SA (its family may differ from the inner one:
  4-in-6 and 6-in-4); next header 4/41. IPv4 outer: TTL 64, TOS copied, DF copied from an IPv4
  inner packet (clear for IPv6), fresh IP ID. IPv6 outer: hop limit 64, traffic class copied.
  Optional TFC padding (§2.7, ``sa.tfc_pad``) pads the inner packet with zeros up to that size;
  the receiver trims using the inner IP length.
* Transport mode: the SA family must be the packet's; ESP goes after the IPv6 extension headers
  that precede it (see packet.py) and the next-header byte before it is rewritten.

Inbound order (§3.4): parse -> SPI -> replay check (before the ICV, cheap) -> ICV + decrypt ->
replay update -> padding -> next header (59: dummy packet, dropped and counted). Every failure
raises ``Drop(<global counter>, reason)`` after bumping the SA's own counter (``replay_drops``,
``integrity_failures``, ``format_errors``); nothing else escapes, whatever the bytes.

Hot path (see bench/core_bench.py): the common cases - AES-GCM-16 or ChaCha20-Poly1305 with an
IPv4 SA, transport mode without IP options, tunnel mode without TFC padding - are handled by the
SA's C core (``sa.core``, _espcore.c) around the SA's own AEAD object; it declines anything else
before changing state, and everything else takes the general path here, which is the reference:
the tests check that both produce the same bytes, counters and Drop reasons.
"""

from __future__ import annotations

import itertools
import os
import struct
from typing import TYPE_CHECKING

from . import counters
from .checksum import internet_checksum
from .errors import Drop
from .packet import find_header, transport_insertion_point

if TYPE_CHECKING:
    from .sa import SecurityAssociation

PROTO_IPIP = 4
PROTO_IPV6 = 41
PROTO_FRAGMENT = 44
PROTO_ESP = 50
NO_NEXT_HEADER = 59
OUTER_TTL = 64

_pack_II = struct.Struct("!II").pack
_pack_I = struct.Struct("!I").pack
_unpack_II = struct.Struct("!II").unpack_from
_V4_HEADER = struct.Struct("!BBHHHBBH4s4s")
_V6_HEADER = struct.Struct("!IHBB16s16s")
# IPv4 header as: version/IHL/TOS, total length, ID/flags/offset, TTL, protocol, checksum, src, dst.
# Its checksum is the sum of these fields modulo 0xFFFF (2**16 = 1 mod 0xFFFF), so a 20-byte header
# is rebuilt with one unpack and one pack; the sum of a header (never all zeros) is 0xFFFF, not 0,
# when it is 0 modulo 0xFFFF, hence "0xFFFF - s if s else 0".
_V4_FIELDS = struct.Struct("!HHIBBHII")

# padding bytes 1, 2, 3, ... (RFC 4303 §2.4) for every pad length
_PADS = tuple(bytes(range(1, n + 1)) for n in range(256))
_trailers: dict[int, bytes] = {}
# padding | pad length | next header, for pad lengths below 16 (all that blocks of 4 or 16 need)
_TRAILERS = tuple(tuple(_PADS[p] + bytes((p, nh)) for nh in range(256)) for p in range(16))
_ip_ids = itertools.count(int.from_bytes(os.urandom(2), "big"))


def _trailer(padlen: int, nh: int) -> bytes:
    """Padding | pad length | next header."""
    if padlen < 16:
        return _TRAILERS[padlen][nh]
    key = (padlen << 8) | nh
    trailer = _trailers.get(key)
    if trailer is None:
        trailer = _trailers[key] = _PADS[padlen] + bytes((padlen, nh))
    return trailer


# -- outbound --------------------------------------------------------------------------------------


def encapsulate(sa: SecurityAssociation, packet: bytes | memoryview, seq: int) -> bytes:
    """Protect a full IP packet with ESP under the 64-bit sequence number `seq`.

    Returns the full outbound IP packet. Raises Drop (XFRM_OUT_STATE_MODE_ERROR on a family
    mismatch, XFRM_OUT_ERROR otherwise).
    """
    try:
        if type(packet) is not bytes:
            packet = bytes(packet)
        core = sa.core
        if core is not None:
            out = core.encap(packet, seq, next(_ip_ids) & 0xFFFF)
            if out is not None:
                return out
        return _encapsulate(sa, packet, seq, None)
    except Drop:
        raise
    except (IndexError, ValueError, TypeError, OverflowError, struct.error) as e:
        raise Drop(counters.XFRM_OUT_ERROR, f"cannot encapsulate: {e}") from None


def encapsulate_with_iv(sa: SecurityAssociation, packet: bytes | memoryview, seq: int, iv: bytes) -> bytes:
    """`encapsulate` with a chosen IV: for known-answer tests only (a reused IV breaks AEADs)."""
    if len(iv) != sa.transform.iv_len:
        raise ValueError(f"{sa.transform.name} takes a {sa.transform.iv_len}-byte IV, got {len(iv)}")
    return _encapsulate(sa, bytes(packet), seq, bytes(iv))


def _encapsulate(sa: SecurityAssociation, packet: bytes, seq: int, iv: bytes | None) -> bytes:
    if sa.mode == "tunnel":
        return _encap_tunnel(sa, packet, seq, iv)
    return _encap_transport(sa, packet, seq, iv)


def _encap_transport(sa: SecurityAssociation, packet: bytes, seq: int, iv: bytes | None) -> bytes:
    n = len(packet)
    version = packet[0] >> 4 if n else 0
    if version != sa.family:
        raise Drop(counters.XFRM_OUT_STATE_MODE_ERROR,
                   f"transport mode SA is IPv{sa.family}, packet is IPv{version}")
    t = sa.transform
    esp_header = _pack_II(sa.spi, seq & 0xFFFFFFFF)
    seq_hi = _pack_I(seq >> 32) if sa.esn else b""
    if version == 4:
        hl = (packet[0] & 0x0F) << 2
        total = (packet[2] << 8) | packet[3]
        if hl < 20 or total < hl or total > n:
            raise Drop(counters.XFRM_OUT_ERROR, "malformed IPv4 header")
        if packet[6] & 0x3F or packet[7]:
            raise Drop(counters.XFRM_OUT_ERROR, "transport mode cannot protect a fragment (RFC 4301 §7)")
        padlen = -(total - hl + 2) % t.block_size
        plaintext = packet[hl:total] + _trailer(padlen, packet[9])
        new_total = total + padlen + 2 + t.overhead
        if new_total > 0xFFFF:
            raise Drop(counters.XFRM_OUT_ERROR, f"ESP packet of {new_total} bytes exceeds 65535")
        return t.seal(_v4_header(packet, hl, new_total, PROTO_ESP), esp_header, seq_hi, iv, plaintext, seq)
    if n < 40:
        raise Drop(counters.XFRM_OUT_ERROR, "malformed IPv6 header")
    total = 40 + ((packet[4] << 8) | packet[5])
    if total > n:
        raise Drop(counters.XFRM_OUT_ERROR, "IPv6 payload length exceeds the packet")
    try:
        hl, nh_pos = transport_insertion_point(packet, total)
    except Drop as e:
        raise Drop(counters.XFRM_OUT_ERROR, e.reason) from None
    nh = packet[nh_pos]
    if nh == PROTO_FRAGMENT:
        raise Drop(counters.XFRM_OUT_ERROR, "transport mode cannot protect a fragment (RFC 4301 §7)")
    padlen = -(total - hl + 2) % t.block_size
    plaintext = packet[hl:total] + _trailer(padlen, nh)
    payload_len = total - 40 + padlen + 2 + t.overhead
    if payload_len > 0xFFFF:
        raise Drop(counters.XFRM_OUT_ERROR, f"ESP payload of {payload_len} bytes exceeds 65535")
    hdr = bytearray(packet[:hl])
    hdr[nh_pos] = PROTO_ESP
    hdr[4] = payload_len >> 8
    hdr[5] = payload_len & 0xFF
    return t.seal(hdr, esp_header, seq_hi, iv, plaintext, seq)


def _v4_header(packet: bytes | memoryview, hl: int, new_total: int, proto: int) -> bytes | bytearray:
    """`packet`'s IPv4 header with a new total length and protocol, checksum recomputed."""
    if hl == 20:
        first, _, middle, ttl, _, _, src, dst = _V4_FIELDS.unpack_from(packet)
        s = (first + new_total + middle + (ttl << 8) + proto + src + dst) % 0xFFFF
        return _V4_FIELDS.pack(first, new_total, middle, ttl, proto, 0xFFFF - s if s else 0, src, dst)
    hdr = bytearray(packet[:hl])
    hdr[2] = new_total >> 8
    hdr[3] = new_total & 0xFF
    hdr[9] = proto
    hdr[10] = hdr[11] = 0
    csum = internet_checksum(hdr)
    hdr[10] = csum >> 8
    hdr[11] = csum & 0xFF
    return hdr


def _encap_tunnel(sa: SecurityAssociation, packet: bytes, seq: int, iv: bytes | None) -> bytes:
    n = len(packet)
    version = packet[0] >> 4 if n else 0
    if version == 4:
        total = (packet[2] << 8) | packet[3] if n >= 20 else 0
        if total < 20 or total > n:
            raise Drop(counters.XFRM_OUT_ERROR, "malformed inner IPv4 packet")
        tos = packet[1]
        flags = 0x4000 if packet[6] & 0x40 else 0  # DF copied from the inner header (RFC 4301 §8.1)
        nh = PROTO_IPIP
    elif version == 6:
        total = 40 + ((packet[4] << 8) | packet[5]) if n >= 40 else 0
        if not total or total > n:
            raise Drop(counters.XFRM_OUT_ERROR, "malformed inner IPv6 packet")
        tos = ((packet[0] & 0x0F) << 4) | (packet[1] >> 4)
        flags = 0
        nh = PROTO_IPV6
    else:
        raise Drop(counters.XFRM_OUT_ERROR, f"inner packet has IP version {version}")
    t = sa.transform
    inner = packet if total == n else packet[:total]
    tfc = sa.tfc_pad - total
    if tfc > 0:
        padlen = -(total + tfc + 2) % t.block_size
        plaintext = b"".join((inner, bytes(tfc), _trailer(padlen, nh)))
    else:
        padlen = -(total + 2) % t.block_size
        plaintext = inner + _trailer(padlen, nh)
    esp_len = len(plaintext) + t.overhead
    esp_header = _pack_II(sa.spi, seq & 0xFFFFFFFF)
    seq_hi = _pack_I(seq >> 32) if sa.esn else b""
    if sa.family == 4:
        out_total = 20 + esp_len
        if out_total > 0xFFFF:
            raise Drop(counters.XFRM_OUT_ERROR, f"ESP packet of {out_total} bytes exceeds 65535")
        hdr = bytearray(_V4_HEADER.pack(0x45, tos, out_total, next(_ip_ids) & 0xFFFF, flags, OUTER_TTL,
                                        PROTO_ESP, 0, sa.src_packed, sa.dst_packed))
        csum = internet_checksum(hdr)
        hdr[10] = csum >> 8
        hdr[11] = csum & 0xFF
        return t.seal(hdr, esp_header, seq_hi, iv, plaintext, seq)
    if esp_len > 0xFFFF:
        raise Drop(counters.XFRM_OUT_ERROR, f"ESP payload of {esp_len} bytes exceeds 65535")
    hdr6 = _V6_HEADER.pack((6 << 28) | (tos << 20), esp_len, PROTO_ESP, OUTER_TTL, sa.src_packed,
                           sa.dst_packed)
    return t.seal(hdr6, esp_header, seq_hi, iv, plaintext, seq)


# -- inbound ---------------------------------------------------------------------------------------


def decapsulate(sa: SecurityAssociation, packet: bytes | memoryview) -> bytes:
    """Verify and remove ESP; returns the cleartext IP packet (tunnel: the inner packet).

    Raises only Drop, having counted the failure in ``sa.counters``.
    """
    try:
        core = sa.core
        if core is not None:
            out = core.decap(packet)  # the same checks, counters and reasons as _decap, in C
            if out is not None:
                return out
        return _decap(sa, packet)
    except Drop:
        raise
    except Exception as e:  # last line of defence: whatever the bytes, only Drop leaves
        sa.counters.format_errors += 1
        raise Drop(counters.XFRM_IN_HDR_ERROR, f"malformed ESP packet ({type(e).__name__}: {e})") from None


def _format_error(sa: SecurityAssociation, counter: str, reason: str) -> Drop:
    sa.counters.format_errors += 1
    return Drop(counter, reason)


def _trailer_check(sa: SecurityAssociation, plaintext: bytes) -> tuple[int, int]:
    """(end of the payload, next header) of a decrypted ESP payload, after RFC 4303 §2.4's checks:
    padding bytes 1, 2, 3, ... and no dummy packet (next header 59)."""
    padlen = plaintext[-2]
    nh = plaintext[-1]
    end = len(plaintext) - 2 - padlen
    if end < 0 or plaintext[end : end + padlen] != _PADS[padlen]:
        raise _format_error(sa, counters.IN_PADDING_ERROR, f"bad ESP padding (pad length {padlen})")
    if nh == NO_NEXT_HEADER:
        raise Drop(counters.IN_DUMMY_PACKET, "ESP dummy packet (next header 59)")
    return end, nh


def _decap(sa: SecurityAssociation, packet: bytes | memoryview) -> bytes:
    n = len(packet)
    version = packet[0] >> 4 if n else 0
    if version != sa.family:
        raise _format_error(sa, counters.XFRM_IN_NO_STATES, f"IPv{version} packet for an IPv{sa.family} SA")
    if version == 4:
        hl = (packet[0] & 0x0F) << 2 if n >= 20 else 0
        total = (packet[2] << 8) | packet[3] if hl else 0
        if hl < 20 or total < hl or total > n:
            raise _format_error(sa, counters.XFRM_IN_HDR_ERROR, "malformed IPv4 header")
        if packet[9] != PROTO_ESP:
            raise _format_error(sa, counters.XFRM_IN_HDR_ERROR, f"IP protocol {packet[9]} is not ESP")
        if packet[6] & 0x3F or packet[7]:
            raise _format_error(sa, counters.XFRM_IN_HDR_ERROR, "ESP fragment (reassemble first)")
        esp_off = hl
        nh_pos = 9
    else:
        total = 40 + ((packet[4] << 8) | packet[5]) if n >= 40 else 0
        if not total or total > n:
            raise _format_error(sa, counters.XFRM_IN_HDR_ERROR, "malformed IPv6 header")
        if packet[6] == PROTO_ESP:
            esp_off = 40
            nh_pos = 6
        else:
            try:
                esp_off, nh_pos = find_header(packet, total, PROTO_ESP, counters.XFRM_IN_HDR_ERROR)
            except Drop:
                sa.counters.format_errors += 1
                raise
    t = sa.transform
    esp_len = total - esp_off
    if esp_len < t.min_len:
        raise _format_error(sa, counters.XFRM_IN_HDR_ERROR, f"ESP packet of {esp_len} bytes is too short")
    if t.block_size > 4 and (esp_len - 8 - t.iv_len - t.icv_len) % t.block_size:
        raise _format_error(sa, counters.XFRM_IN_HDR_ERROR, "ESP ciphertext is not whole cipher blocks")
    spi, seq_low = _unpack_II(packet, esp_off)
    if spi != sa.spi:
        raise _format_error(sa, counters.XFRM_IN_NO_STATES, f"SPI 0x{spi:08x} is not this SA's")
    replay = sa.replay
    try:
        seq = replay.check(seq_low)
    except Drop:
        sa.counters.replay_drops += 1
        raise
    mv = memoryview(packet)
    plaintext = t.open(mv[esp_off:total], _pack_I(seq >> 32) if sa.esn else b"")
    if plaintext is None:
        sa.counters.integrity_failures += 1
        raise Drop(counters.XFRM_IN_STATE_PROTO_ERROR, "ICV mismatch")
    replay.update(seq)
    end, nh = _trailer_check(sa, plaintext)
    if sa.mode == "tunnel":
        return _inner_packet(sa, plaintext, end, nh)
    if version == 4:
        return bytes(_v4_header(packet, esp_off, esp_off + end, nh)) + plaintext[:end]
    hdr = bytearray(packet[:esp_off])
    hdr[nh_pos] = nh
    hdr[4] = (esp_off - 40 + end) >> 8
    hdr[5] = (esp_off - 40 + end) & 0xFF
    return bytes(hdr) + plaintext[:end]


def _inner_packet(sa: SecurityAssociation, plaintext: bytes, end: int, nh: int) -> bytes:
    """The tunnelled packet, trimmed to its own IP length (drops TFC padding)."""
    if nh == PROTO_IPIP:
        if end < 20 or plaintext[0] >> 4 != 4:
            raise _format_error(sa, counters.XFRM_IN_STATE_MODE_ERROR, "inner packet is not IPv4")
        total = (plaintext[2] << 8) | plaintext[3]
        if total < ((plaintext[0] & 0x0F) << 2) or total < 20 or total > end:
            raise _format_error(sa, counters.XFRM_IN_STATE_MODE_ERROR, "inner IPv4 length is inconsistent")
    elif nh == PROTO_IPV6:
        if end < 40 or plaintext[0] >> 4 != 6:
            raise _format_error(sa, counters.XFRM_IN_STATE_MODE_ERROR, "inner packet is not IPv6")
        total = 40 + ((plaintext[4] << 8) | plaintext[5])
        if total > end:
            raise _format_error(sa, counters.XFRM_IN_STATE_MODE_ERROR, "inner IPv6 length is inconsistent")
    else:
        raise _format_error(sa, counters.XFRM_IN_STATE_MODE_ERROR, f"tunnel mode SA carries protocol {nh}")
    return plaintext[:total]


__all__ = ["decapsulate", "encapsulate", "encapsulate_with_iv"]
