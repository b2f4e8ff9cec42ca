"""The scheme-two decision pipeline: one packet in, one verdict (plus side effects) out.

This is the sans-I/O heart of the engine. `Pipeline.process(hook, packet)` implements the
processing model at the three netfilter hooks the engine is attached to:

* INPUT (the kernel has routed and reassembled the packet): ESP/AH → SAD lookup → SA state
  and lifetime → anti-replay → ICV → decrypt → inbound policy check of the inner packet
  (RFC 4301 §5.2 step 4) → transport: hand the inner packet back to the kernel (the
  verdict's new payload); tunnel: re-inject it through the TUN device so the kernel routes
  it (delivered locally or forwarded, the FORWARD rules then apply).
  Not IPsec → inbound SPD: BYPASS accept, PROTECT/DISCARD drop.
* FORWARD: arriving clear traffic is checked against `fwd` policies (it must not match a
  PROTECT one: it should have come protected), then the outbound SPD (`out`) decides:
  PROTECT → encapsulate, re-fragment, send it ourselves (the route of the *outer* packet
  matters, and the kernel does not re-route after FORWARD); BYPASS → accept; DISCARD → drop
  and report with ICMP administratively prohibited (rate limited), a counter and a log line.
* OUTPUT: SPD `out`: PROTECT → encapsulate and hand back to the kernel, which re-routes and
  fragments (or send it ourselves when the outer family differs); BYPASS accept; DISCARD drop.

No sockets here: side effects come back as `Action` objects for the adapter to perform, and
the environment (is an address local? what is the path MTU?) is injected as callables.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import counters as C
from . import packet
from .errors import Drop
from .spd import Action, Direction

if TYPE_CHECKING:
    from .counters import Counters
    from .sa import SecurityAssociation
    from .sad import Sad
    from .spd import Policy, Spd

NF_DROP = 0
NF_ACCEPT = 1

HOOK_INPUT = 1
HOOK_FORWARD = 2
HOOK_OUTPUT = 3
HOOK_NAMES = {HOOK_INPUT: "input", HOOK_FORWARD: "forward", HOOK_OUTPUT: "output"}

PROTO_TCP = 6
PROTO_ESP = 50
PROTO_AH = 51

IPV6_MIN_MTU = 1280
IPV4_MIN_MTU = 68


@dataclass(slots=True)
class SendPacket:
    """Send a complete IP packet (already fragmented to fit) from the engine's raw socket."""

    family: int
    packets: list[bytes]
    dst: bytes


@dataclass(slots=True)
class InjectTunnel:
    """Hand a decrypted tunnel-mode inner packet to the kernel through the TUN device."""

    packet: bytes


@dataclass(slots=True)
class SendIcmp:
    """Send an ICMP/ICMPv6 error message (no IP header) to `dst` (packed address)."""

    family: int
    dst: bytes
    message: bytes


SideEffect = SendPacket | InjectTunnel | SendIcmp


@dataclass(slots=True, frozen=True)
class FlowHint:
    """A decision that every later packet of the same flow would get: the engine's C fast path
    may apply it without asking the pipeline again (until the SPD or SAD change).

    Only made for IPv4 packets without options or fragmentation, of a protocol with ports, so
    that the protocol and header bytes 12..24 (addresses and ports) are the whole flow key.
    Protect (hook FORWARD/OUTPUT): packets of at most `max_len` bytes go through `sa`.
    Decrypt (hook INPUT): ESP with `sa.spi` from/to `outer` (source + destination), whose inner
    packet has this flow, is accepted (tunnel: re-injected; transport: handed back).
    `policies`: whose counters account each such packet.
    """

    hook: int
    proto: int
    flow: bytes
    sa: SecurityAssociation
    policies: tuple[Policy, ...]
    max_len: int = 0xFFFF
    outer: bytes = b""


@dataclass(slots=True)
class Decision:
    verdict: int
    payload: bytes | None = None
    actions: list[SideEffect] = field(default_factory=list)
    reason: str = ""  # why (for drops: the counter's reason)
    policy: str | None = None
    sa: str | None = None
    hint: FlowHint | None = None  # set only when Pipeline.learn is on


_NO_ACTIONS: list[SideEffect] = []  # shared, never mutated: the common accept path allocates nothing
ACCEPT = Decision(NF_ACCEPT, None, _NO_ACTIONS, "bypass")


def _addr_str(family: int, raw: bytes) -> str:
    try:
        return socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)
    except ValueError:
        return raw.hex()


def encapsulated_len(sa: SecurityAssociation, inner_len: int, header_len: int) -> int:
    """Length of the packet `sa` makes of an `inner_len`-byte packet, without making it.

    header_len: the inner packet's IP header with the extension headers that stay in front of
    ESP/AH in transport mode (PacketInfo.header_len).
    """
    t = sa.transform
    if sa.proto == "ah":
        from .ah import header_len as ah_header_len

        ah = ah_header_len(t.icv_len, sa.family, sa.ah_align)
        return inner_len + ah + (0 if sa.mode == "transport" else (20 if sa.family == 4 else 40))
    block = t.block_size
    if sa.mode == "transport":
        payload, outer = inner_len - header_len, header_len
    else:
        payload, outer = max(inner_len, sa.tfc_pad), (20 if sa.family == 4 else 40)
    padded = payload + 2 + (-(payload + 2)) % block
    return outer + t.overhead + padded


def inner_mtu_for(sa: SecurityAssociation, mtu: int, header_len: int) -> int:
    """The largest inner packet whose encapsulation fits `mtu` (what ICMP too-big announces)."""
    lo, hi = IPV4_MIN_MTU, mtu
    if encapsulated_len(sa, lo, min(header_len, lo)) > mtu:
        return lo
    while lo < hi:  # encapsulated_len is monotonic in the inner length
        mid = (lo + hi + 1) // 2
        if encapsulated_len(sa, mid, header_len) <= mtu:
            lo = mid
        else:
            hi = mid - 1
    return lo


AuditLine = str | Callable[[], str]


class AuditLog:
    """Rate-limited audit lines: at most `rate` per second, with a summary of what was held back.

    A line may be given as a callable that builds it: it is only called when the line is
    emitted, so a flood of suppressed lines costs a token-bucket check each, nothing more."""

    def __init__(self, sink: Callable[[str], None] | None, rate: float = 5.0, burst: int = 10,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.sink = sink
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.clock = clock
        self.last = clock()
        self.suppressed = 0

    def __call__(self, line: AuditLine) -> None:
        if self.sink is None:
            return
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens < 1.0:
            self.suppressed += 1
            return
        self.tokens -= 1.0
        if self.suppressed:
            self.sink(f"{self.suppressed} audit lines suppressed (rate limit)")
            self.suppressed = 0
        self.sink(line if isinstance(line, str) else line())


class Pipeline:
    """Decides the fate of each packet at INPUT, FORWARD and OUTPUT (see module docstring)."""

    def __init__(
        self,
        spd: Spd,
        sad: Sad,
        counters: Counters,
        *,
        is_local: Callable[[int, bytes], bool],
        path_mtu: Callable[[int, bytes], int],
        icmp_allow: Callable[[], bool] = lambda: True,
        audit: Callable[[AuditLine], None] | None = None,
    ) -> None:
        self.spd = spd
        self.sad = sad
        self.counters = counters
        self.is_local = is_local
        self.path_mtu = path_mtu
        self.icmp_allow = icmp_allow
        self.audit = audit or (lambda line: None)
        self._ident = 0
        # FORWARD flow cache: bytes 12..24 of an option-less IPv4 header (addresses and ports) -> the
        # (protocol, protect policy) they resolved to. Only clean fwd-allowed, out-PROTECT outcomes of
        # port protocols are cached (those bytes then determine the whole FlowKey); cleared when the
        # SPD changes. Skips parse() and both SPD lookups for a known flow.
        self._fwd_cache: dict[bytes, tuple[int, Policy]] = {}
        self._fwd_gen = -1
        # The engine sets this when it has a fast path to teach: decisions that later packets of
        # the same flow would repeat then carry a FlowHint (see _flow_hint).
        self.learn = False

    # -- entry point -------------------------------------------------------------------------
    def process(self, hook: int, pkt: bytes, from_tunnel: bool = False) -> Decision:
        """Never raises: every failure is a counted DROP."""
        try:
            if hook == HOOK_INPUT:
                d = self._input(pkt)
            elif hook == HOOK_OUTPUT:
                d = self._output(pkt)
            elif hook == HOOK_FORWARD:
                d = self._forward(pkt, from_tunnel)
            else:
                d = ACCEPT
        except Drop as e:
            self.counters.inc(e.counter)
            d = Decision(NF_DROP, None, _NO_ACTIONS, e.reason)
        except Exception as e:  # a bug: fail closed, count, keep the engine alive
            self.counters.inc(C.ENGINE_ERROR)
            self.audit(f"internal error on {HOOK_NAMES.get(hook, hook)} packet: {type(e).__name__}: {e}")
            d = Decision(NF_DROP, None, _NO_ACTIONS, f"internal error: {type(e).__name__}")
        return d

    # -- INPUT -------------------------------------------------------------------------------
    def _input(self, pkt: bytes) -> Decision:
        info = packet.parse(pkt)
        if info.proto == PROTO_ESP or info.proto == PROTO_AH:
            return self._inbound_ipsec(pkt, info)
        policy = self.spd.lookup(Direction.IN, info.flow)
        action = policy.action if policy is not None else self.spd.default_action(Direction.IN)
        name = policy.name if policy is not None else None
        if action is Action.BYPASS:
            if policy is not None:
                policy.counters.account(len(pkt))
            return ACCEPT if policy is None else Decision(NF_ACCEPT, None, _NO_ACTIONS, "bypass", name)
        if action is Action.PROTECT:
            self.counters.inc(C.IN_CLEARTEXT_PROTECTED)
            self.audit(lambda: f"input: cleartext {self._flow_str(info)} matches protect policy {name}: dropped")
            return Decision(NF_DROP, None, _NO_ACTIONS, "cleartext packet matches a protect policy", name)
        self.counters.inc(C.XFRM_IN_POL_BLOCK)
        return Decision(NF_DROP, None, _NO_ACTIONS, "discard policy" if policy else "default discard", name)

    def _inbound_ipsec(self, pkt: bytes, info: packet.PacketInfo) -> Decision:
        sa = self.sad.lookup_inbound(info.proto, info.spi, info.dst, info.src)
        if sa is None:
            self.counters.inc(C.XFRM_IN_NO_STATES)
            self.audit(
                lambda: f"input: no SA for {'ESP' if info.proto == PROTO_ESP else 'AH'} "
                f"spi=0x{info.spi & 0xFFFFFFFF:08x} {_addr_str(info.version, info.src)} -> "
                f"{_addr_str(info.version, info.dst)}: dropped"
            )
            return Decision(NF_DROP, None, _NO_ACTIONS, f"no SA for spi 0x{info.spi & 0xFFFFFFFF:08x}")
        try:
            inner = sa.unprotect(pkt)
        except Drop as e:
            self.counters.inc(e.counter)
            return Decision(NF_DROP, None, _NO_ACTIONS, e.reason, None, sa.name)
        try:
            iinfo = packet.parse(inner)
        except Drop as e:
            self.counters.inc(e.counter)
            return Decision(NF_DROP, None, _NO_ACTIONS, "inner packet: " + e.reason, None, sa.name)
        if sa.mode == "tunnel":
            direction = Direction.IN if self.is_local(iinfo.version, iinfo.dst) else Direction.FWD
        else:
            direction = Direction.IN
        policy = self.spd.lookup(direction, iinfo.flow)
        if policy is None or policy.action is not Action.PROTECT or policy.sa != sa.name:
            self.counters.inc(C.XFRM_IN_TMPL_MISMATCH)
            why = (
                f"inner packet matches no {direction.value} protect policy of SA {sa.name}"
                if policy is None or policy.action is not Action.PROTECT
                else f"inner packet matches policy {policy.name} of SA {policy.sa}, not {sa.name}"
            )
            self.audit(lambda: f"input: {why.replace('inner packet', 'inner packet ' + self._flow_str(iinfo), 1)}: "
                               "dropped")
            return Decision(NF_DROP, None, _NO_ACTIONS, why, policy.name if policy else None, sa.name)
        policy.counters.account(len(inner))
        policies: tuple[Policy, ...] = (policy,)
        if sa.mode == "tunnel" and direction is Direction.FWD:
            # Transit traffic: the outbound SPD decides now, as FORWARD would (the hooks let what we
            # re-inject through the TUN device pass FORWARD unqueued): bypass → hand it to the
            # kernel to forward; protect (e.g. hub and spoke) → re-encrypt; discard → drop + ICMP.
            out = self._forward(inner, True, iinfo)
            if out.verdict != NF_ACCEPT:
                return out
            bypass = self.spd.get(out.policy) if out.policy is not None else None
            if bypass is not None:
                policies = (policy, bypass)
        hint = None
        if self.learn and sa.core is not None and info.header_len == 20 and info.version == 4:
            hint = self._flow_hint(HOOK_INPUT, inner, iinfo, sa, policies, 0xFFFF, pkt[12:20])
        if sa.mode == "tunnel":
            if iinfo.version == 6 and direction is Direction.FWD:
                # IPv6 routers never fragment, and the sender's fragments were reassembled before
                # encryption: restore fragments that fit the next link, or the kernel would answer
                # the (whole) inner packet with Packet Too Big.
                mtu = self.path_mtu(6, iinfo.dst)
                if len(inner) > mtu:
                    frags = self._fragment(inner, 6, mtu)
                    return Decision(NF_DROP, None, [InjectTunnel(f) for f in frags], "decrypted (tunnel)",
                                    policy.name, sa.name)
            return Decision(NF_DROP, None, [InjectTunnel(inner)], "decrypted (tunnel)", policy.name, sa.name, hint)
        return Decision(NF_ACCEPT, inner, _NO_ACTIONS, "decrypted", policy.name, sa.name, hint)

    def _outbound_policy(self, pkt: bytes, info: packet.PacketInfo) -> tuple[Policy | None, Action, Decision | None]:
        """The `out` SPD decision (OUTPUT and FORWARD): (policy, action, the decision if it is bypass)."""
        policy = self.spd.lookup(Direction.OUT, info.flow)
        action = policy.action if policy is not None else self.spd.default_action(Direction.OUT)
        if action is Action.BYPASS:
            if policy is None:
                return None, action, ACCEPT
            policy.counters.account(len(pkt))
            return policy, action, Decision(NF_ACCEPT, None, _NO_ACTIONS, "bypass", policy.name)
        return policy, action, None

    # -- OUTPUT ------------------------------------------------------------------------------
    def _output(self, pkt: bytes) -> Decision:
        info = packet.parse(pkt)
        policy, action, bypass = self._outbound_policy(pkt, info)
        if bypass is not None:
            return bypass
        if action is Action.DISCARD:
            self.counters.inc(C.XFRM_OUT_POL_BLOCK)
            return Decision(NF_DROP, None, _NO_ACTIONS, "discard policy" if policy else "default discard",
                            policy.name if policy else None)
        assert policy is not None
        return self._protect(pkt, info, policy, local=True)

    # -- FORWARD -----------------------------------------------------------------------------
    def _forward(self, pkt: bytes, from_tunnel: bool, parsed: packet.PacketInfo | None = None) -> Decision:
        n = len(pkt)
        if (not from_tunnel and n >= 24 and pkt[0] == 0x45 and not (pkt[6] & 0x3F or pkt[7])
                and (pkt[2] << 8 | pkt[3]) == n):  # a header parse() accepts, no options, not a fragment
            if self._fwd_gen != self.spd.generation:
                self._fwd_cache.clear()
                self._fwd_gen = self.spd.generation
            hit = self._fwd_cache.get(pkt[12:24])
            if hit is not None and hit[0] == pkt[9]:
                d = self._protect_cached(pkt, hit[1])
                if d is not None:
                    return d
        info = parsed if parsed is not None else packet.parse(pkt)
        if not from_tunnel:
            # arriving in clear: the fwd SPD must allow it (RFC 4301 §5.2: inbound checks of transit traffic)
            fpol = self.spd.lookup(Direction.FWD, info.flow)
            faction = fpol.action if fpol is not None else self.spd.default_action(Direction.FWD)
            if faction is Action.PROTECT:
                self.counters.inc(C.IN_CLEARTEXT_PROTECTED)
                self.audit(lambda: f"forward: cleartext {self._flow_str(info)} matches protect policy "
                                   f"{fpol.name if fpol else '?'}: dropped")
                return Decision(NF_DROP, None, _NO_ACTIONS, "cleartext packet matches a fwd protect policy",
                                fpol.name if fpol else None)
            if faction is Action.DISCARD:
                return self._discard_and_report(pkt, info, fpol, "fwd")
        policy, action, bypass = self._outbound_policy(pkt, info)
        if bypass is not None:
            return bypass
        if action is Action.DISCARD:
            return self._discard_and_report(pkt, info, policy, "out")
        assert policy is not None
        if (not from_tunnel and info.version == 4 and info.header_len == 20 and not info.is_fragment
                and info.proto in packet.PORT_PROTOCOLS and len(self._fwd_cache) < 4096):
            self._fwd_cache[pkt[12:24]] = (info.proto, policy)
        return self._protect(pkt, info, policy, local=False, hook=0 if from_tunnel else HOOK_FORWARD)

    def _protect_cached(self, pkt: bytes, policy: Policy) -> Decision | None:
        """`_protect` for a cached flow through a tunnel SA that fits the path MTU; None: full path."""
        sa = self.sad.get(policy.sa) if policy.sa else None
        if sa is None or sa.mode != "tunnel":
            return None
        mtu = self.path_mtu(sa.family, sa.dst_packed)
        if encapsulated_len(sa, len(pkt), 20) > mtu:
            return None  # too big or to be fragmented: _protect decides
        out = sa.protect(pkt)
        policy.counters.account(len(pkt))
        hint = None
        if self.learn and sa.core is not None:
            # the cache only holds option-less, unfragmented IPv4 flows of port protocols: no parse needed
            hint = FlowHint(HOOK_FORWARD, pkt[9], pkt[12:24], sa, (policy,), inner_mtu_for(sa, mtu, 20))
        return Decision(NF_DROP, None, [SendPacket(sa.family, [out], sa.dst_packed)], "protected", policy.name,
                        sa.name, hint)

    def _discard_and_report(self, pkt: bytes, info: packet.PacketInfo, policy: Policy | None, dirname: str) -> Decision:
        from . import icmp

        self.counters.inc(C.FWD_POL_BLOCK)
        name = policy.name if policy is not None else None
        if policy is not None:
            policy.counters.account(len(pkt))
        actions: list[SideEffect] = []
        if self.icmp_allow():
            msg = icmp.icmp_admin_prohibited(pkt)
            if msg is not None:
                actions.append(SendIcmp(info.version, info.src, msg))
        self.audit(
            lambda: f"forward: {self._flow_str(info)} discarded by {dirname} policy {name or '(default)'}"
            + (", ICMP administratively prohibited sent" if actions else "")
        )
        return Decision(NF_DROP, None, actions, f"discarded by {dirname} policy", name)

    # -- protection (OUTPUT and FORWARD) -----------------------------------------------------
    def _protect(self, pkt: bytes, info: packet.PacketInfo, policy: Policy, local: bool, hook: int = HOOK_OUTPUT
                 ) -> Decision:
        """hook: where the packet was seen, for the fast path's hint (0: nowhere it could be learnt)."""
        sa = self.sad.get(policy.sa) if policy.sa else None
        if sa is None:
            self.counters.inc(C.XFRM_OUT_NO_STATES)
            self.audit(f"output: protect policy {policy.name} has no SA {policy.sa!r}: dropped")
            return Decision(NF_DROP, None, _NO_ACTIONS, f"no SA {policy.sa!r}", policy.name)
        if sa.mode == "transport" and sa.family != info.version:
            self.counters.inc(C.XFRM_OUT_STATE_MODE_ERROR)
            return Decision(NF_DROP, None, _NO_ACTIONS, "transport SA of the other address family", policy.name,
                            sa.name)
        # The size check comes first (as in Linux): a packet answered with "too big" must not use a
        # sequence number nor count as sent on the SA.
        mtu = self.path_mtu(sa.family, sa.dst_packed if sa.mode == "tunnel" else info.dst)
        expected = encapsulated_len(sa, len(pkt), info.header_len)
        if expected > mtu:
            too_big = self._too_big(pkt, info, sa, expected, mtu)
            if too_big is not None:
                return too_big
        out = sa.protect(pkt)
        policy.counters.account(len(pkt))
        # Sent from our raw socket, routed by the kernel for the outer destination. Not handed
        # back as the verdict's payload: the kernel would check it against the path-MTU cache of
        # the inner destination (the same host in transport mode), which our own ICMP lowered.
        frags = self._fragment(out, sa.family, mtu)
        hint = None
        if self.learn and hook and sa.core is not None and len(frags) == 1:
            hint = self._flow_hint(hook, pkt, info, sa, (policy,), inner_mtu_for(sa, mtu, info.header_len))
        return Decision(NF_DROP, None, [SendPacket(sa.family, frags, sa.dst_packed)], "protected", policy.name, sa.name,
                        hint)

    @staticmethod
    def _flow_hint(hook: int, pkt: bytes, info: packet.PacketInfo, sa: SecurityAssociation,
                   policies: tuple[Policy, ...], max_len: int, outer: bytes = b"") -> FlowHint | None:
        """The FlowHint for `pkt` (the clear packet), or None if its flow is not one the fast path
        can recognise by protocol and bytes 12..24 alone."""
        if (info.version != 4 or info.header_len != 20 or info.is_fragment or info.proto not in packet.PORT_PROTOCOLS
                or len(pkt) < 24 or pkt[0] != 0x45):
            return None
        return FlowHint(hook, info.proto, pkt[12:24], sa, policies, max_len, outer)

    def _too_big(self, pkt: bytes, info: packet.PacketInfo, sa: SecurityAssociation, out_len: int,
                 mtu: int) -> Decision | None:
        """RFC 4301 §8: DF set (IPv4) or IPv6 that would not have been fragmented → tell the sender.

        Returns None when the encapsulated packet should be fragmented instead. IPv6 senders
        that already exceed the path MTU mean to fragment (UDP/ICMP sockets let the kernel do it);
        TCP never does, so it always gets a Packet Too Big with the MTU left after our overhead.
        """
        from . import icmp

        if info.version == 4:
            if not info.df:
                return None
        elif len(pkt) > mtu and info.proto != PROTO_TCP:
            return None
        inner_mtu = inner_mtu_for(sa, mtu, info.header_len)
        if info.version == 6 and inner_mtu < IPV6_MIN_MTU:
            # IPv6 senders ignore a PTB below 1280: the tunnel fragments the outer packet instead
            # (RFC 2473 §7.1)
            return None
        self.counters.inc(C.OUT_TOO_BIG)
        actions: list[SideEffect] = []
        if self.icmp_allow():
            msg = icmp.icmp_too_big(pkt, inner_mtu)
            if msg is not None:
                actions.append(SendIcmp(info.version, info.src, msg))
        return Decision(NF_DROP, None, actions, f"too big after encapsulation (path MTU {mtu}, inner MTU {inner_mtu})",
                        None, sa.name)

    def _fragment(self, out: bytes, family: int, mtu: int) -> list[bytes]:
        if len(out) <= mtu:
            return [out]
        from . import fragment

        if family == 4:
            try:
                return fragment.fragment_ipv4(out, mtu)
            except ValueError as e:
                raise Drop(C.OUT_FRAG_ERROR, f"cannot fragment: {e}") from None
        self._ident = (self._ident + 1) & 0xFFFFFFFF
        try:
            return fragment.fragment_ipv6(out, max(mtu, IPV6_MIN_MTU), self._ident)
        except ValueError as e:
            raise Drop(C.OUT_FRAG_ERROR, f"cannot fragment: {e}") from None

    # -- tracing -----------------------------------------------------------------------------
    @staticmethod
    def _flow_str(info: packet.PacketInfo) -> str:
        f = info.flow
        s = f"{_addr_str(info.version, info.src)} -> {_addr_str(info.version, info.dst)} proto {f.proto}"
        if f.sport >= 0:
            s += f" sport {f.sport} dport {f.dport}"
        if f.icmp_type >= 0:
            s += f" icmp {f.icmp_type}/{f.icmp_code}"
        return s
