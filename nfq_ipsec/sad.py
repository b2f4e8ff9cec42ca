"""Security Association Database: SAs by name, and inbound demultiplexing (RFC 4301 §4.1).

Inbound packets are mapped to an SA by the "longest match" of §4.1: SPI + destination +
source first, then SPI + destination (Linux, like most implementations, keys unicast SAs on
(daddr, spi, proto) only, which is what the second lookup does). Both are dict lookups.
(proto, spi, dst) is unique in the database, so the fallback never has to choose.
"""

from __future__ import annotations

import builtins

from .sa import SecurityAssociation


class Sad:
    def __init__(self) -> None:
        self._by_name: dict[str, SecurityAssociation] = {}
        self._by_spi_dst: dict[tuple[int, int, bytes], SecurityAssociation] = {}
        self._by_spi_dst_src: dict[tuple[int, int, bytes, bytes], SecurityAssociation] = {}
        self.generation = 0  # bumped on every change: the engine's fast path forgets its flows

    def add(self, sa: SecurityAssociation) -> None:
        """Add an SA; ValueError if its name or its (proto, SPI, destination) is taken."""
        if sa.name in self._by_name:
            raise ValueError(f"SA {sa.name!r} already exists")
        key = (sa.proto_num, sa.spi, sa.dst_packed)
        other = self._by_spi_dst.get(key)
        if other is not None:
            raise ValueError(
                f"SA {sa.name!r}: {sa.proto} SPI 0x{sa.spi:08x} to {sa.dst} is already used "
                f"by SA {other.name!r}"
            )
        self._by_name[sa.name] = sa
        self._by_spi_dst[key] = sa
        self._by_spi_dst_src[(*key, sa.src_packed)] = sa
        self.generation += 1

    def remove(self, name: str) -> SecurityAssociation:
        sa = self._by_name.pop(name, None)
        if sa is None:
            raise KeyError(f"no SA named {name!r}")
        key = (sa.proto_num, sa.spi, sa.dst_packed)
        del self._by_spi_dst[key]
        del self._by_spi_dst_src[(*key, sa.src_packed)]
        self.generation += 1
        return sa

    def get(self, name: str) -> SecurityAssociation | None:
        return self._by_name.get(name)

    def list(self) -> builtins.list[SecurityAssociation]:
        """SAs in insertion order."""
        return list(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def lookup_inbound(self, proto: int, spi: int, dst: bytes, src: bytes) -> SecurityAssociation | None:
        """The SA for an inbound ESP (50) / AH (51) packet, or None (XfrmInNoStates)."""
        sa = self._by_spi_dst_src.get((proto, spi, dst, src))
        if sa is None:
            sa = self._by_spi_dst.get((proto, spi, dst))
        return sa
