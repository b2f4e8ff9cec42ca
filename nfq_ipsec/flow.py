"""The flow key: what SPD selectors are matched against.

Addresses are plain ints (fast comparisons against prefix masks); ports and ICMP type/code
are -1 when the packet does not carry them (e.g. non-first fragments: RFC 4301 §4.4.1.3
calls those OPAQUE).
"""

from __future__ import annotations

from typing import NamedTuple

NO_PORT = -1


class FlowKey(NamedTuple):
    family: int  # 4 or 6
    src: int  # address as int
    dst: int
    proto: int  # upper-layer protocol (after IPv6 extension headers)
    sport: int = NO_PORT  # TCP/UDP/SCTP source port, or -1
    dport: int = NO_PORT
    icmp_type: int = NO_PORT  # ICMP/ICMPv6 type, or -1
    icmp_code: int = NO_PORT
