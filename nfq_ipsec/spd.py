"""Security Policy Database (RFC 4301 §4.4.1): ordered selectors -> PROTECT / BYPASS / DISCARD.

Selectors are matched against a `FlowKey` of plain ints, so each prefix is precomputed as
(network, mask) ints and a match is a handful of integer comparisons. Policies are kept per
direction in one list ordered by (priority, insertion order) -- lower priority value wins,
as in ``ip xfrm policy`` -- rebuilt on every add/remove so that lookup is a plain loop.

Port and ICMP selectors follow RFC 4301 §4.4.1.1: a flow without ports (a non-initial
fragment: OPAQUE, -1 in the FlowKey) matches only selectors that leave ports as ANY.
"""

from __future__ import annotations

import builtins
import ipaddress
from dataclasses import dataclass, field
from enum import StrEnum

from ._espcore import CounterPair
from .flow import FlowKey

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# family (0 = any), src net, src mask, dst net, dst mask, proto (-1 = any), sport lo/hi, dport lo/hi,
# icmp type lo/hi, icmp code lo/hi
MatchKey = tuple[int, int, int, int, int, int, int, int, int, int, int, int, int, int]

PORT_PROTOCOLS = frozenset({6, 17, 33, 132, 136})  # TCP, UDP, DCCP, SCTP, UDP-Lite
ICMP_PROTOCOLS = frozenset({1, 58})
FULL_PORT_RANGE = (0, 65535)


class Direction(StrEnum):
    IN = "in"
    OUT = "out"
    FWD = "fwd"


class Action(StrEnum):
    PROTECT = "protect"
    BYPASS = "bypass"
    DISCARD = "discard"


_IN, _OUT, _FWD = Direction.IN, Direction.OUT, Direction.FWD


def _network(what: str, value: object) -> IpNetwork | None:
    if value is None or isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return value
    if isinstance(value, str):
        try:
            return ipaddress.ip_network(value)
        except ValueError as e:
            raise ValueError(f"selector {what}: {e}") from None
    raise ValueError(f"selector {what} must be an IP network, got {value!r}")


def _port_range(what: str, value: object) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (
        not isinstance(value, tuple | list)
        or len(value) != 2
        or not all(isinstance(p, int) and not isinstance(p, bool) and 0 <= p <= 65535 for p in value)
        or value[0] > value[1]
    ):
        raise ValueError(f"selector {what} must be a port range (low, high) within 0..65535, got {value!r}")
    return (value[0], value[1])


def _fmt_range(r: tuple[int, int]) -> str:
    return str(r[0]) if r[0] == r[1] else f"{r[0]}-{r[1]}"


def _fmt_addr(family: int, value: int) -> str:
    return str(ipaddress.IPv4Address(value) if family == 4 else ipaddress.IPv6Address(value))


@dataclass(frozen=True, slots=True)
class Selector:
    """Traffic selector; None in a field means ANY. Prefix family restricts the flow family."""

    src: IpNetwork | None = None
    dst: IpNetwork | None = None
    proto: int | None = None
    sport: tuple[int, int] | None = None
    dport: tuple[int, int] | None = None
    icmp_type: int | None = None
    icmp_code: int | None = None
    # precomputed for matching (derived, not part of identity)
    family: int | None = field(default=None, init=False, compare=False, repr=False)
    _src_m: tuple[int, int] | None = field(default=None, init=False, compare=False, repr=False)
    _dst_m: tuple[int, int] | None = field(default=None, init=False, compare=False, repr=False)
    _sport_m: tuple[int, int] | None = field(default=None, init=False, compare=False, repr=False)
    _dport_m: tuple[int, int] | None = field(default=None, init=False, compare=False, repr=False)
    _key: MatchKey = field(default=(), init=False, compare=False, repr=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        put = object.__setattr__
        src = _network("src", self.src)
        dst = _network("dst", self.dst)
        put(self, "src", src)
        put(self, "dst", dst)
        if src is not None and dst is not None and src.version != dst.version:
            raise ValueError(f"selector src {src} and dst {dst} are of different address families")
        put(self, "family", src.version if src is not None else dst.version if dst is not None else None)
        put(self, "_src_m", None if src is None else (int(src.network_address), int(src.netmask)))
        put(self, "_dst_m", None if dst is None else (int(dst.network_address), int(dst.netmask)))
        proto = self.proto
        if proto is not None and (
            isinstance(proto, bool) or not isinstance(proto, int) or not 0 <= proto <= 255
        ):
            raise ValueError(f"selector proto must be a protocol number 0..255, got {proto!r}")
        sport = _port_range("sport", self.sport)
        dport = _port_range("dport", self.dport)
        put(self, "sport", sport)
        put(self, "dport", dport)
        if (sport is not None or dport is not None) and proto not in PORT_PROTOCOLS:
            raise ValueError(
                "selector ports need proto tcp (6), udp (17), dccp (33), sctp (132) or udplite (136), "
                f"got {proto}"
            )
        # a full range is ANY: it must also match flows whose ports are OPAQUE
        put(self, "_sport_m", None if sport == FULL_PORT_RANGE else sport)
        put(self, "_dport_m", None if dport == FULL_PORT_RANGE else dport)
        for what, v in (("icmp_type", self.icmp_type), ("icmp_code", self.icmp_code)):
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 255:
                raise ValueError(f"selector {what} must be 0..255, got {v!r}")
            if proto not in ICMP_PROTOCOLS:
                raise ValueError(f"selector {what} needs proto icmp (1) or ipv6-icmp (58), got {proto}")
        if self.icmp_code is not None and self.icmp_type is None:
            raise ValueError("selector icmp_code needs icmp_type")
        if (proto == 1 and self.family == 6) or (proto == 58 and self.family == 4):
            raise ValueError(f"selector proto {proto} does not fit IPv{self.family} prefixes")
        # ANY as values that always match: mask 0, proto -1, ranges from -1 (OPAQUE) to the maximum
        it, ic = self.icmp_type, self.icmp_code
        put(self, "_key", (
            self.family or 0,
            *(self._src_m or (0, 0)),
            *(self._dst_m or (0, 0)),
            -1 if proto is None else proto,
            *(self._sport_m or (-1, 65535)),
            *(self._dport_m or (-1, 65535)),
            *((-1, 255) if it is None else (it, it)),
            *((-1, 255) if ic is None else (ic, ic)),
        ))

    def matches(self, flow: FlowKey) -> bool:
        # same expression as Spd.lookup, which inlines it
        fam, src, dst, proto, sport, dport, itype, icode = flow
        f, sn, sm, dn, dm, p, splo, sphi, dplo, dphi, tlo, thi, clo, chi = self._key
        return (
            (not f or fam == f) and src & sm == sn and dst & dm == dn and (p < 0 or proto == p)
            and splo <= sport <= sphi and dplo <= dport <= dphi
            and tlo <= itype <= thi and clo <= icode <= chi
        )

    def mismatch(self, flow: FlowKey) -> str | None:
        """Why ``flow`` does not match (None if it does): the first failing field, for `explain`."""
        fam = flow.family
        if self.family is not None and fam != self.family:
            return f"family: flow is IPv{fam}, selector is IPv{self.family}"
        for what, m, net, value in (
            ("src", self._src_m, self.src, flow.src),
            ("dst", self._dst_m, self.dst, flow.dst),
        ):
            if m is not None and value & m[1] != m[0]:
                return f"{what} {_fmt_addr(fam, value)} not in {net}"
        if self.proto is not None and flow.proto != self.proto:
            return f"proto {flow.proto} is not {self.proto}"
        for what, r, port in (("sport", self._sport_m, flow.sport), ("dport", self._dport_m, flow.dport)):
            if r is not None and not r[0] <= port <= r[1]:
                if port < 0:
                    return f"{what} is OPAQUE (non-first fragment), selector wants {_fmt_range(r)}"
                return f"{what} {port} not in {_fmt_range(r)}"
        if self.icmp_type is not None and flow.icmp_type != self.icmp_type:
            return f"icmp type {flow.icmp_type} is not {self.icmp_type}"
        if self.icmp_code is not None and flow.icmp_code != self.icmp_code:
            return f"icmp code {flow.icmp_code} is not {self.icmp_code}"
        return None

    def covers(self, other: Selector) -> bool:
        """Whether every flow ``other`` matches is also matched by this selector."""
        if self.family is not None and other.family != self.family:
            return False
        for mine, theirs in ((self.src, other.src), (self.dst, other.dst)):
            if mine is None:
                continue
            if theirs is None:
                # ANY address is covered only by a /0 (the family check above confines `other` to its family)
                if mine.prefixlen != 0:
                    return False
            elif theirs.version != mine.version or not theirs.subnet_of(mine):  # type: ignore[arg-type]
                return False
        if self.proto is not None and other.proto != self.proto:
            return False
        for mine_r, theirs_r in ((self._sport_m, other._sport_m), (self._dport_m, other._dport_m)):
            if mine_r is None:
                continue
            if theirs_r is None or not mine_r[0] <= theirs_r[0] <= theirs_r[1] <= mine_r[1]:
                return False
        if self.icmp_type is not None and other.icmp_type != self.icmp_type:
            return False
        return self.icmp_code is None or other.icmp_code == self.icmp_code

    def __str__(self) -> str:
        parts = [f"src {self.src or 'any'}", f"dst {self.dst or 'any'}"]
        if self.proto is not None:
            parts.append(f"proto {self.proto}")
        if self.sport is not None:
            parts.append(f"sport {_fmt_range(self.sport)}")
        if self.dport is not None:
            parts.append(f"dport {_fmt_range(self.dport)}")
        if self.icmp_type is not None:
            parts.append(f"type {self.icmp_type}")
        if self.icmp_code is not None:
            parts.append(f"code {self.icmp_code}")
        return " ".join(parts)

    def as_dict(self) -> dict[str, object]:
        return {
            "src": None if self.src is None else str(self.src),
            "dst": None if self.dst is None else str(self.dst),
            "proto": self.proto,
            "sport": None if self.sport is None else list(self.sport),
            "dport": None if self.dport is None else list(self.dport),
            "icmp_type": self.icmp_type,
            "icmp_code": self.icmp_code,
        }


class PolicyCounters(CounterPair):
    """Packets and bytes that matched a policy (updated by the pipeline, and by the engine's C
    fast path, hence the C base: ``packets``, ``bytes`` and ``account(nbytes)``)."""

    __slots__ = ()

    def as_dict(self) -> dict[str, int]:
        return {"packets": self.packets, "bytes": self.bytes}

    def __repr__(self) -> str:
        return f"PolicyCounters(packets={self.packets}, bytes={self.bytes})"


@dataclass(eq=False)
class Policy:
    """One SPD entry. PROTECT names the SA to apply (out) or required to have been applied (in/fwd)."""

    name: str
    dir: Direction
    selector: Selector
    action: Action
    sa: str | None = None
    priority: int = 0
    counters: PolicyCounters = field(default_factory=PolicyCounters, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"policy name must be a non-empty string, got {self.name!r}")
        try:
            self.dir = Direction(self.dir)
        except ValueError:
            raise ValueError(f"policy {self.name}: dir must be in, out or fwd, got {self.dir!r}") from None
        try:
            self.action = Action(self.action)
        except ValueError:
            raise ValueError(
                f"policy {self.name}: action must be protect, bypass or discard, got {self.action!r}"
            ) from None
        if not isinstance(self.selector, Selector):
            raise ValueError(f"policy {self.name}: selector must be a Selector, got {self.selector!r}")
        if self.action is Action.PROTECT and not self.sa:
            raise ValueError(f"policy {self.name}: action protect needs an sa")
        if self.action is not Action.PROTECT and self.sa is not None:
            raise ValueError(f"policy {self.name}: action {self.action.value} takes no sa (got {self.sa!r})")
        prio = self.priority
        if isinstance(prio, bool) or not isinstance(prio, int) or not 0 <= prio < 1 << 32:
            raise ValueError(f"policy {self.name}: priority must be an integer in 0..{(1 << 32) - 1}")

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "dir": self.dir.value,
            "selector": self.selector.as_dict(),
            "action": self.action.value,
            "sa": self.sa,
            "priority": self.priority,
            "counters": self.counters.as_dict(),
        }


class Spd:
    """The ordered policy set with a default action per direction (used when nothing matches)."""

    def __init__(self, default: dict[Direction, Action] | Action = Action.BYPASS) -> None:
        if isinstance(default, dict):
            self._default = {Direction(d): Action.BYPASS for d in Direction}
            for d, a in default.items():
                self._default[Direction(d)] = Action(a)
        else:
            a = Action(default)
            self._default = {d: a for d in Direction}
        for d, a in self._default.items():
            if a is Action.PROTECT:
                raise ValueError(f"default action for {d.value} cannot be protect (it names no SA)")
        self._policies: dict[str, tuple[int, Policy]] = {}  # name -> (insertion number, policy)
        self._serial = 0
        self.generation = 0
        self._ordered: dict[Direction, tuple[Policy, ...]] = {d: () for d in Direction}
        self._match: dict[Direction, tuple[tuple[MatchKey, Policy], ...]] = {d: () for d in Direction}
        self._match_out = self._match_in = self._match_fwd = self._match[Direction.OUT]

    def _rebuild(self) -> None:
        self.generation += 1  # callers caching lookups (the pipeline's flow cache) watch this
        entries = sorted(self._policies.values(), key=lambda e: (e[1].priority, e[0]))
        for d in Direction:
            ordered = tuple(p for _, p in entries if p.dir is d)
            self._ordered[d] = ordered
            self._match[d] = tuple((p.selector._key, p) for p in ordered)
        self._match_out = self._match[Direction.OUT]
        self._match_in = self._match[Direction.IN]
        self._match_fwd = self._match[Direction.FWD]

    def add(self, policy: Policy) -> None:
        if policy.name in self._policies:
            raise ValueError(f"policy {policy.name!r} already exists")
        self._serial += 1
        self._policies[policy.name] = (self._serial, policy)
        self._rebuild()

    def remove(self, name: str) -> Policy:
        entry = self._policies.pop(name, None)
        if entry is None:
            raise KeyError(f"no policy named {name!r}")
        self._rebuild()
        return entry[1]

    def get(self, name: str) -> Policy | None:
        entry = self._policies.get(name)
        return None if entry is None else entry[1]

    def list(self, direction: Direction | None = None) -> builtins.list[Policy]:
        """Policies in evaluation order (all directions interleaved by that order unless one is given)."""
        if direction is not None:
            return list(self._ordered[Direction(direction)])
        return [p for _, p in sorted(self._policies.values(), key=lambda e: (e[1].priority, e[0]))]

    def __len__(self) -> int:
        return len(self._policies)

    def lookup(self, direction: Direction, flow: FlowKey) -> Policy | None:
        """The first matching policy, or None (then the default action applies)."""
        # Selector.matches inlined over precomputed int tuples (about half the cost of a method call per
        # policy); directions compared by identity because hashing an Enum member runs Python code
        if direction is _OUT:
            entries = self._match_out
        elif direction is _IN:
            entries = self._match_in
        elif direction is _FWD:
            entries = self._match_fwd
        else:
            entries = self._match[Direction(direction)]
        fam, src, dst, proto, sport, dport, itype, icode = flow
        for (f, sn, sm, dn, dm, p, splo, sphi, dplo, dphi, tlo, thi, clo, chi), policy in entries:
            if (
                (not f or fam == f) and src & sm == sn and dst & dm == dn and (p < 0 or proto == p)
                and splo <= sport <= sphi and dplo <= dport <= dphi
                and tlo <= itype <= thi and clo <= icode <= chi
            ):
                return policy
        return None

    def default_action(self, direction: Direction) -> Action:
        return self._default[direction]

    def explain(self, direction: Direction, flow: FlowKey) -> builtins.list[tuple[Policy, str | None]]:
        """Every policy of the direction in order, with why it did not match (None = it matched)."""
        return [(p, p.selector.mismatch(flow)) for p in self._ordered[Direction(direction)]]

    def policies_for_sa(self, sa_name: str) -> builtins.list[Policy]:
        return [p for p in self.list() if p.sa == sa_name]

    def shadowed(self, policy: Policy) -> Policy | None:
        """An earlier policy of the same direction covering all of ``policy``'s traffic, if any.

        Such a policy makes ``policy`` unreachable ("can never match"). ``policy`` may be in the
        SPD already or about to be added (then it would go after all policies of its priority).
        """
        entry = self._policies.get(policy.name)
        if entry is not None and entry[1] is policy:
            rank = (policy.priority, entry[0])
        else:
            rank = (policy.priority, self._serial + 1)
        for serial, other in sorted(self._policies.values(), key=lambda e: (e[1].priority, e[0])):
            if (other.priority, serial) >= rank:
                break
            if other.dir is policy.dir and other is not policy and other.selector.covers(policy.selector):
                return other
        return None
