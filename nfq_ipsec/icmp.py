"""ICMP/ICMPv6 error messages the engine sends, the rules for when not to, and a rate limiter.

Builders return the ICMP *message* only (type, code, checksum, 4 bytes, quote): the engine sends
it from a raw socket and the kernel adds the IP header. For ICMPv4 the checksum covers only the
message, so it is always filled. For ICMPv6 it covers a pseudo-header with both addresses; the
kernel computes it on raw ICMPv6 sockets anyway (RFC 3542 §3.1), so it is filled only when the
caller passes `src` (the address the error is sent from; the destination is the quoted packet's
source) and left 0 otherwise.

Every builder returns None when RFC 1122 §3.2.2 / RFC 1812 §4.3.2.7 / RFC 4443 §2.4(e) forbid an
error: about an ICMP error, about a non-first fragment, to a multicast/broadcast destination, or
to a source that is not a single host. Garbage input also yields None: an error about a packet we
cannot parse is not worth sending, and the packet path must not raise.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable

from .checksum import internet_checksum, l4_checksum
from .fragment import (
    IPV4_MIN_MTU,
    IPV4_OFFSET_MASK,
    IPV6_HDR_LEN,
    IPV6_MIN_MTU,
    NH_DEST_OPTS,
    NH_FRAGMENT,
    NH_HOP_BY_HOP,
    NH_ROUTING,
)

IPPROTO_ICMP = 1
IPPROTO_ICMPV6 = 58
ICMP_DEST_UNREACH = 3
ICMP_FRAG_NEEDED = 4  # code: fragmentation needed and DF set (RFC 1191)
ICMP_PKT_FILTERED = 13  # code: communication administratively prohibited (RFC 1812)
ICMPV6_DEST_UNREACH = 1
ICMPV6_ADM_PROHIBITED = 1  # code
ICMPV6_PKT_TOOBIG = 2

# RFC 1812 §4.3.2.3: quote as much as fits in a 576-byte datagram (20-byte IP + 8-byte ICMP header).
IPV4_MAX_QUOTE = 576 - 20 - 8
# RFC 4443 §2.4(c): as much as fits in the IPv6 minimum MTU (40-byte IPv6 + 8-byte ICMPv6 header).
IPV6_MAX_QUOTE = IPV6_MIN_MTU - IPV6_HDR_LEN - 8

# ICMPv4 error types (RFC 792/1812); types above 18 are unknown and, like Linux, treated as errors.
_ICMP_ERROR_TYPES = frozenset({3, 4, 5, 11, 12})
_ICMP_MAX_KNOWN_TYPE = 18
_ICMPV6_REDIRECT = 137  # RFC 4443 §2.4(e.2) lists it with the errors


def _ipv4_source_ok(src: bytes) -> bool:
    """RFC 1122 §3.2.2: the source must name one host: not 0/8, 127/8, multicast or class E/broadcast."""
    first = src[0]
    return first != 0 and first != 127 and first < 224


def _ipv4_destination_ok(dst: bytes) -> bool:
    """No errors about datagrams sent to multicast or limited broadcast (or class E)."""
    return dst[0] < 224


def _ipv6_source_ok(src: bytes) -> bool:
    """RFC 4443 §2.4(e.6): the source must identify a single node: not ::, ::1 or multicast."""
    return src[0] != 0xFF and src not in (bytes(16), bytes(15) + b"\x01")


def _ipv4_error_allowed(orig: bytes | memoryview) -> bool:
    if len(orig) < 20 or orig[0] >> 4 != 4:
        return False
    ihl = (orig[0] & 0x0F) * 4
    if ihl < 20 or len(orig) < ihl:
        return False
    flags_off = struct.unpack_from("!H", orig, 6)[0]
    if flags_off & IPV4_OFFSET_MASK:
        return False
    if not _ipv4_source_ok(bytes(orig[12:16])) or not _ipv4_destination_ok(bytes(orig[16:20])):
        return False
    if orig[9] == IPPROTO_ICMP:
        if len(orig) <= ihl:
            return False  # cannot tell whether it is an error: stay silent
        icmp_type = orig[ihl]
        if icmp_type in _ICMP_ERROR_TYPES or icmp_type > _ICMP_MAX_KNOWN_TYPE:
            return False
    return True


def _ipv6_error_allowed(orig: bytes | memoryview, *, to_multicast: bool) -> bool:
    if len(orig) < IPV6_HDR_LEN or orig[0] >> 4 != 6:
        return False
    if not _ipv6_source_ok(bytes(orig[8:24])):
        return False
    if orig[24] == 0xFF and not to_multicast:
        return False
    nh, pos = orig[6], IPV6_HDR_LEN
    while nh in (NH_HOP_BY_HOP, NH_ROUTING, NH_DEST_OPTS, NH_FRAGMENT):
        if pos + 8 > len(orig):
            return False
        if nh == NH_FRAGMENT:
            if struct.unpack_from("!H", orig, pos + 2)[0] & 0xFFF8:
                return False  # non-first fragment: the upper layer is unknown
            length = 8
        else:
            length = (orig[pos + 1] + 1) * 8
        nh, pos = orig[pos], pos + length
    if nh == IPPROTO_ICMPV6:
        if pos >= len(orig):
            return False
        icmp_type = orig[pos]
        if icmp_type < 128 or icmp_type == _ICMPV6_REDIRECT:
            return False
    return True


def _ipv4_quote(orig: bytes | memoryview) -> bytes:
    total_len = struct.unpack_from("!H", orig, 2)[0]
    end = min(len(orig), IPV4_MAX_QUOTE)
    if total_len >= 20:
        end = min(end, total_len)  # ignore link-layer padding after the datagram
    return bytes(orig[:end])


def _ipv6_quote(orig: bytes | memoryview) -> bytes:
    payload_len = struct.unpack_from("!H", orig, 4)[0]
    end = min(len(orig), IPV6_MAX_QUOTE)
    if payload_len:
        end = min(end, IPV6_HDR_LEN + payload_len)
    return bytes(orig[:end])


def _icmpv4_message(icmp_type: int, code: int, rest: int, orig: bytes | memoryview) -> bytes:
    message = bytearray(struct.pack("!BBHI", icmp_type, code, 0, rest) + _ipv4_quote(orig))
    struct.pack_into("!H", message, 2, internet_checksum(message))
    return bytes(message)


def _icmpv6_message(
    icmp_type: int, code: int, rest: int, orig: bytes | memoryview, src: bytes | None
) -> bytes:
    message = bytearray(struct.pack("!BBHI", icmp_type, code, 0, rest) + _ipv6_quote(orig))
    if src is not None:
        if len(src) != 16:
            raise ValueError(f"ICMPv6 source must be 16 bytes, got {len(src)}")
        checksum = l4_checksum(6, src, bytes(orig[8:24]), IPPROTO_ICMPV6, message)
        struct.pack_into("!H", message, 2, checksum)
    return bytes(message)


def icmp_admin_prohibited(orig: bytes | memoryview, src: bytes | None = None) -> bytes | None:
    """Destination unreachable, administratively prohibited, about `orig` (a whole IP packet).

    IPv4: type 3 code 13 (RFC 1812 §5.2.7.1); IPv6: type 1 code 1 (RFC 4443 §3.1). `src` (16 bytes,
    IPv6 only) is the address the error will be sent from; given it, the ICMPv6 checksum is filled.
    Returns None when no error may be sent (see the module docstring).
    """
    if len(orig) >= 1 and orig[0] >> 4 == 4:
        if not _ipv4_error_allowed(orig):
            return None
        return _icmpv4_message(ICMP_DEST_UNREACH, ICMP_PKT_FILTERED, 0, orig)
    if not _ipv6_error_allowed(orig, to_multicast=False):
        return None
    return _icmpv6_message(ICMPV6_DEST_UNREACH, ICMPV6_ADM_PROHIBITED, 0, orig, src)


def icmp_too_big(orig: bytes | memoryview, mtu: int, src: bytes | None = None) -> bytes | None:
    """Send "packet too big" about `orig`, announcing `mtu`.

    IPv4: type 3 code 4 with the next-hop MTU in bytes 6-7 (RFC 1191 §4).
    IPv6: Packet Too Big, type 2 with a 32-bit MTU (RFC 4443 §3.2); sent even to a multicast
    destination, as RFC 4443 §2.4(e.3) allows, so path MTU discovery works for it.
    An `mtu` below the protocol minimum (68 / 1280) is raised to it: senders ignore smaller values
    (RFC 8201 §4), so a tunnel whose overhead leaves less must fragment the outer packet instead
    (RFC 2473 §7.1). An `mtu` the field cannot hold is the caller's bug: ValueError.
    Returns None when no error may be sent.
    """
    if len(orig) >= 1 and orig[0] >> 4 == 4:
        if mtu > 0xFFFF:
            raise ValueError(f"IPv4 next-hop MTU {mtu} exceeds 65535")
        if not _ipv4_error_allowed(orig):
            return None
        return _icmpv4_message(ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, max(mtu, IPV4_MIN_MTU), orig)
    if mtu > 0xFFFFFFFF:
        raise ValueError(f"IPv6 MTU {mtu} exceeds 2**32-1")
    if not _ipv6_error_allowed(orig, to_multicast=True):
        return None
    return _icmpv6_message(ICMPV6_PKT_TOOBIG, 0, max(mtu, IPV6_MIN_MTU), orig, src)


def build_ipv4_header(
    src: bytes,
    dst: bytes,
    proto: int,
    payload_len: int,
    *,
    ttl: int = 64,
    tos: int = 0,
    ident: int = 0,
    df: bool = False,
    options: bytes = b"",
) -> bytes:
    """A complete IPv4 header (checksum filled) for tests and for sending on a header-included socket.

    `options` must already be padded to a multiple of 4 bytes.
    """
    if len(src) != 4 or len(dst) != 4:
        raise ValueError("IPv4 addresses must be 4 bytes")
    if len(options) % 4 or len(options) > 40:
        raise ValueError(f"IPv4 options must be a multiple of 4 bytes, at most 40 (got {len(options)})")
    hlen = 20 + len(options)
    if hlen + payload_len > 0xFFFF:
        raise ValueError(f"IPv4 total length {hlen + payload_len} exceeds 65535")
    header = bytearray(
        struct.pack(
            "!BBHHHBBH4s4s",
            0x40 | (hlen >> 2),
            tos,
            hlen + payload_len,
            ident,
            0x4000 if df else 0,
            ttl,
            proto,
            0,
            src,
            dst,
        )
        + options
    )
    struct.pack_into("!H", header, 10, internet_checksum(header))
    return bytes(header)


def build_ipv6_header(
    src: bytes,
    dst: bytes,
    next_header: int,
    payload_len: int,
    *,
    hop_limit: int = 64,
    traffic_class: int = 0,
    flow_label: int = 0,
) -> bytes:
    """A fixed 40-byte IPv6 header for tests; `payload_len` counts extension headers too."""
    if len(src) != 16 or len(dst) != 16:
        raise ValueError("IPv6 addresses must be 16 bytes")
    if payload_len > 0xFFFF:
        raise ValueError(f"IPv6 payload length {payload_len} exceeds 65535 (jumbograms unsupported)")
    first_word = (6 << 28) | (traffic_class << 20) | (flow_label & 0xFFFFF)
    return struct.pack("!IHBB16s16s", first_word, payload_len, next_header, hop_limit, src, dst)


class RateLimiter:
    """Token bucket limiting ICMP errors (RFC 4443 §2.4(f), RFC 1812 §4.3.2.8).

    Starts full: `burst` messages may go at once, then `rate` per second. rate=0 sends nothing at
    all (the configuration's "icmp_rate = 0" switch), whatever the burst. Refused calls are counted
    in `suppressed` so the engine can log "N more suppressed" once instead of per packet; use
    `take_suppressed()` to read and reset it.
    """

    __slots__ = ("_clock", "_last", "_tokens", "burst", "rate", "suppressed")

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        if rate < 0 or burst < 0:
            raise ValueError(f"rate ({rate}) and burst ({burst}) must not be negative")
        self.rate = float(rate)
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst) if rate > 0 else 0.0
        self._last = clock()
        self.suppressed = 0

    def allow(self) -> bool:
        """Take a token if one is available; otherwise count a suppression."""
        now = self._clock()
        elapsed = now - self._last
        self._last = now
        if elapsed > 0:
            self._tokens = min(float(self.burst), self._tokens + elapsed * self.rate)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        self.suppressed += 1
        return False

    def take_suppressed(self) -> int:
        """Suppressions since the last call (then reset to 0)."""
        count, self.suppressed = self.suppressed, 0
        return count
