"""Security Associations: parameters, sequence numbers, lifetimes and per-SA counters.

An SA is created once from validated configuration and then used on the hot path, so all
checks happen in ``__init__`` (raising ValueError naming the bad parameter) and everything
per-packet work needs (the transform with its cipher objects, the replay window, the
encapsulate/decapsulate functions) is built there too.

Lifetimes (RFC 4301 §4.4.2.1) count, like Linux's ``curlft``, packets and bytes processed
successfully. The byte count is the length of the *cleartext* IP packet: what goes into
``protect()`` and what comes out of ``unprotect()``, the same in both directions. In tunnel
mode that is the inner packet, as Linux counts it inbound after decryption (its outbound count
also includes the outer headers already pushed, so it runs a little higher); in transport mode
it includes the IP header. Time limits run from creation on the injected clock. A volume
limit is checked right after the packet that reaches it, so its event fires at that packet;
a hard limit of N lets exactly N packets through.
Soft expiry makes the SA "dying" (still usable, a rekey is due) and fires one "soft-expire"
event; hard expiry makes it "dead" for both directions and fires one "hard-expire" event.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import counters
from ._espcore import EspCore
from ._espcore import SaCounters as _SaCountersBase
from .errors import Drop
from .replay import MAX_WINDOW, ReplayWindow

if TYPE_CHECKING:
    from .algorithms import Transform

log = logging.getLogger(__name__)

PROTO_NUMBERS = {"esp": 50, "ah": 51}
MODES = ("transport", "tunnel")
SEQ_MAX_32 = (1 << 32) - 1
SEQ_MAX_64 = (1 << 64) - 1
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
MAX_TFC_PAD = 65535

MATURE = "mature"
DYING = "dying"
DEAD = "dead"


@dataclass(frozen=True)
class Lifetime:
    """SA lifetime limits; 0 means unlimited. Soft limits must not exceed their hard limit."""

    soft_bytes: int = 0
    hard_bytes: int = 0
    soft_packets: int = 0
    hard_packets: int = 0
    soft_seconds: float = 0
    hard_seconds: float = 0

    def __post_init__(self) -> None:
        for kind in ("bytes", "packets", "seconds"):
            soft = getattr(self, f"soft_{kind}")
            hard = getattr(self, f"hard_{kind}")
            for what, v in ((f"soft_{kind}", soft), (f"hard_{kind}", hard)):
                if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
                    raise ValueError(f"lifetime {what} must be a number >= 0 (0 = unlimited), got {v!r}")
                if kind != "seconds" and not isinstance(v, int):
                    raise ValueError(f"lifetime {what} must be an integer, got {v!r}")
            if soft and hard and soft > hard:
                raise ValueError(f"lifetime soft_{kind} ({soft}) is larger than hard_{kind} ({hard})")

    @property
    def unlimited(self) -> bool:
        return not any(
            (self.soft_bytes, self.hard_bytes, self.soft_packets, self.hard_packets, self.soft_seconds,
             self.hard_seconds)
        )

    def as_dict(self) -> dict[str, float]:
        return {
            "soft_bytes": self.soft_bytes, "hard_bytes": self.hard_bytes,
            "soft_packets": self.soft_packets, "hard_packets": self.hard_packets,
            "soft_seconds": self.soft_seconds, "hard_seconds": self.hard_seconds,
        }


class SaCounters(_SaCountersBase):
    """Per-SA statistics (what `ip -s xfrm state` shows, plus the reasons for drops).

    The fields live in C (`_espcore.SaCounters`) so that the engine's fast path counts in the same
    place as this module; the base type also holds the outbound sequence number (``seq``) and
    the lifetime limits the fast path must stop short of (kept in step by SecurityAssociation).
    """

    __slots__ = ()

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in (
            "packets", "bytes", "replay_drops", "integrity_failures", "format_errors", "expired_drops",
            "seq_exhausted",
        )}

    def __repr__(self) -> str:
        return f"SaCounters({', '.join(f'{k}={v}' for k, v in self.as_dict().items())})"


@dataclass
class SaEvent:
    """Something the control plane must act on (rekey, remove the SA)."""

    kind: str  # "soft-expire" | "hard-expire" | "seq-exhausted"
    sa: str
    reason: str


def _check_int(name: str, value: object, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer in {lo}..{hi}, got {value!r}")
    return value


def _check_key(name: str, value: object) -> bytes:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise ValueError(f"{name} must be bytes, got {type(value).__name__}")
    return bytes(value)


class SecurityAssociation:
    """One unidirectional SA. Keys live only inside ``transform``; nothing here prints them."""

    transform: Transform
    counters: SaCounters

    __slots__ = (
        "_clock",
        "_created",
        "_decap",
        "_encap",
        "_hard_limits",
        "_limited",
        "_replay",
        "_seq_reported",
        "_soft_limits",
        "aead",
        "ah_align",
        "auth",
        "core",
        "counters",
        "dst",
        "dst_packed",
        "enc",
        "esn",
        "family",
        "icv_len",
        "lifetime",
        "mode",
        "name",
        "on_event",
        "proto",
        "proto_num",
        "spi",
        "src",
        "src_packed",
        "state",
        "tfc_pad",
        "transform",
    )

    def __init__(
        self,
        *,
        name: str,
        proto: str,
        mode: str,
        src: str,
        dst: str,
        spi: int,
        aead: str | None = None,
        key: bytes = b"",
        enc: str | None = None,
        enc_key: bytes = b"",
        auth: str | None = None,
        auth_key: bytes = b"",
        icv_len: int | None = None,
        esn: bool = False,
        replay_window: int = 32,
        seq_start: int = 0,
        lifetime: Lifetime = Lifetime(),
        tfc_pad: int = 0,
        ah_align: int = 0,
        on_event: Callable[[SaEvent], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise ValueError(
                f"name must be 1-64 characters of letters, digits, '_', '.', ':', '-' "
                f"(starting with a letter or digit), got {name!r}"
            )
        self.name = name
        if proto not in PROTO_NUMBERS:
            raise ValueError(f"SA {name}: proto must be 'esp' or 'ah', got {proto!r}")
        self.proto = proto
        self.proto_num = PROTO_NUMBERS[proto]
        if mode not in MODES:
            raise ValueError(f"SA {name}: mode must be 'transport' or 'tunnel', got {mode!r}")
        self.mode = mode
        try:
            src_addr = ipaddress.ip_address(src)
        except ValueError:
            raise ValueError(f"SA {name}: src is not an IP address: {src!r}") from None
        try:
            dst_addr = ipaddress.ip_address(dst)
        except ValueError:
            raise ValueError(f"SA {name}: dst is not an IP address: {dst!r}") from None
        if src_addr.version != dst_addr.version:
            raise ValueError(
                f"SA {name}: src {src_addr} and dst {dst_addr} are of different address families "
                f"({mode} endpoints must both be IPv4 or both IPv6)"
            )
        for what, a in (("src", src_addr), ("dst", dst_addr)):
            if a.is_unspecified:
                raise ValueError(f"SA {name}: {what} must not be the unspecified address {a}")
        self.src = src_addr
        self.dst = dst_addr
        self.src_packed = src_addr.packed
        self.dst_packed = dst_addr.packed
        self.family = src_addr.version
        if isinstance(spi, bool) or not isinstance(spi, int) or not 0 <= spi <= SEQ_MAX_32:
            raise ValueError(f"SA {name}: spi must be a 32-bit integer, got {spi!r}")
        if spi == 0:
            raise ValueError(f"SA {name}: spi 0 is invalid (RFC 4303 §2.1)")
        if spi < 256:
            raise ValueError(f"SA {name}: spi {spi} is in the range 1-255 reserved by IANA (RFC 4303 §2.1)")
        self.spi = spi
        if not isinstance(esn, bool):
            raise ValueError(f"SA {name}: esn must be true or false, got {esn!r}")
        self.esn = esn
        if isinstance(replay_window, bool) or not isinstance(replay_window, int) or not (
            0 <= replay_window <= MAX_WINDOW
        ):
            raise ValueError(
                f"SA {name}: replay_window must be an integer in 0..{MAX_WINDOW}, got {replay_window!r}"
            )
        if esn and replay_window == 0:
            raise ValueError(f"SA {name}: esn needs replay_window > 0 (as Linux requires)")
        seq_max = SEQ_MAX_64 if esn else SEQ_MAX_32
        if isinstance(seq_start, bool) or not isinstance(seq_start, int) or not 0 <= seq_start <= seq_max:
            raise ValueError(
                f"SA {name}: seq_start must be an integer in 0..{seq_max} "
                f"({'with' if esn else 'without'} ESN), got {seq_start!r}"
            )
        if not isinstance(lifetime, Lifetime):
            raise ValueError(f"SA {name}: lifetime must be a Lifetime, got {type(lifetime).__name__}")
        self.lifetime = lifetime
        if isinstance(tfc_pad, bool) or not isinstance(tfc_pad, int) or not 0 <= tfc_pad <= MAX_TFC_PAD:
            raise ValueError(f"SA {name}: tfc_pad must be an integer in 0..{MAX_TFC_PAD}, got {tfc_pad!r}")
        if tfc_pad and (proto != "esp" or mode != "tunnel"):
            raise ValueError(f"SA {name}: tfc_pad is only possible with ESP in tunnel mode (RFC 4303 §2.7)")
        self.tfc_pad = tfc_pad
        # AH header alignment: 0 = RFC 4302's minimum (4 bytes for IPv4, 8 for IPv6); 8 makes IPv4 AH
        # 64-bit aligned as stock Linux sends and expects (without its `flag align4`).
        if ah_align not in (0, 4, 8) or isinstance(ah_align, bool):
            raise ValueError(f"SA {name}: ah_align must be 4 or 8, got {ah_align!r}")
        if ah_align and proto != "ah":
            raise ValueError(f"SA {name}: ah_align only applies to AH SAs")
        if ah_align == 4 and self.family == 6:
            raise ValueError(f"SA {name}: IPv6 AH is always 8-byte aligned (RFC 4302 §2.6); ah_align 4 is IPv4 only")
        self.ah_align = ah_align
        if icv_len is not None:
            _check_int(f"SA {name}: icv_len", icv_len, 1, 64)
        key = _check_key(f"SA {name}: key", key)
        enc_key = _check_key(f"SA {name}: enc_key", enc_key)
        auth_key = _check_key(f"SA {name}: auth_key", auth_key)
        for what, alg in (("aead", aead), ("enc", enc), ("auth", auth)):
            if alg is not None and (not isinstance(alg, str) or not alg):
                raise ValueError(f"SA {name}: {what} must be an algorithm name, got {alg!r}")

        from . import algorithms  # lazy: algorithms pulls in the crypto backend

        if proto == "esp":
            if aead is not None:
                if enc is not None or auth is not None:
                    raise ValueError(f"SA {name}: aead {aead!r} excludes enc and auth (an AEAD does both)")
                if enc_key or auth_key:
                    raise ValueError(f"SA {name}: with aead, give the key as 'key', not enc_key/auth_key")
            else:
                if key:
                    raise ValueError(f"SA {name}: 'key' is for aead; give enc_key and auth_key")
                if enc is None and auth is None:
                    raise ValueError(f"SA {name}: ESP needs aead, or enc and auth")
                if enc is None:
                    raise ValueError(
                        f"SA {name}: ESP with auth {auth!r} needs enc (use enc 'null' for integrity only)"
                    )
                if auth is None:
                    raise ValueError(
                        f"SA {name}: ESP enc {enc!r} without auth is not allowed (confidentiality-only ESP, "
                        f"RFC 8221 §5): add auth or use an aead"
                    )
            try:
                self.transform = algorithms.make_transform(
                    aead=aead, key=key, enc=enc, enc_key=enc_key, auth=auth, auth_key=auth_key,
                    icv_len=icv_len,
                )
            except ValueError as e:
                raise ValueError(f"SA {name}: {e}") from None
            from . import esp

            self._encap = esp.encapsulate
            self._decap = esp.decapsulate
        else:
            if aead is not None or enc is not None:
                raise ValueError(f"SA {name}: AH only authenticates: give auth, not aead/enc")
            if key or enc_key:
                raise ValueError(f"SA {name}: AH takes its key as auth_key")
            if auth is None:
                raise ValueError(f"SA {name}: AH needs auth")
            try:
                # integrity only: a Transform whose `.integrity` is the HMAC (what ah.py uses)
                self.transform = algorithms.make_transform(auth=auth, auth_key=auth_key, icv_len=icv_len)
            except ValueError as e:
                raise ValueError(f"SA {name}: {e}") from None
            from . import ah

            self._encap = ah.encapsulate
            self._decap = ah.decapsulate
        self.aead = aead
        self.enc = enc
        self.auth = auth
        self.icv_len = self.transform.icv_len

        self._replay = ReplayWindow(replay_window, esn=esn, initial=seq_start)
        self._seq_reported = False
        self.counters = SaCounters()
        self.counters.seq = seq_start
        self.counters.seq_max = seq_max
        self.state = MATURE
        self.on_event = on_event
        self._clock = clock
        self._created = clock()
        lt = lifetime
        self._limited = not lt.unlimited
        self._soft_limits = (lt.soft_packets, lt.soft_bytes, lt.soft_seconds)
        self._hard_limits = (lt.hard_packets, lt.hard_bytes, lt.hard_seconds)
        # ESP with AES-GCM-16 or ChaCha20-Poly1305 over IPv4: the per-packet work is done in C
        # (_espcore.c) around this SA's own AEAD object; esp.py keeps the general path.
        self.core = self._make_core()
        self._sync_fast()

    def _make_core(self) -> EspCore | None:
        t = self.transform
        if self.proto != "esp" or self.family != 4 or t.cipher is None:
            return None
        return EspCore(t.cipher, t.nonce_salt, self.spi, self.esn, self.mode == "tunnel", self.src_packed,
                       self.dst_packed, self.tfc_pad, self.counters, self._replay)

    @property
    def replay(self) -> ReplayWindow:
        """The inbound anti-replay window."""
        return self._replay

    @replay.setter
    def replay(self, window: ReplayWindow) -> None:
        self._replay = window
        if self.core is not None:
            self.core.replay = window  # the C core checks this one from now on

    def restore(self, *, seq: int, age: float, replay: ReplayWindow | None = None) -> None:
        """Carry state over from an earlier life of this SA (a restarted worker): the last outbound
        sequence number used, the age, and the replay window."""
        self.counters.seq = seq
        self._created = self._clock() - age
        if replay is not None:
            self.replay = replay
        self._sync_fast()

    # -- representation (never keys) ---------------------------------------------------------------

    def __repr__(self) -> str:
        algs = (self.aead or f"{self.enc}+{self.auth}") if self.proto == "esp" else self.auth
        return (
            f"SecurityAssociation(name={self.name!r}, {self.proto}/{self.mode}, {self.src}->{self.dst}, "
            f"spi=0x{self.spi:08x}, {algs}, state={self.state})"
        )

    __str__ = __repr__

    def describe(self) -> dict[str, Any]:
        """Everything an operator may see (for `sa list --json`); keys are never included."""
        return {
            "name": self.name,
            "proto": self.proto,
            "mode": self.mode,
            "src": str(self.src),
            "dst": str(self.dst),
            "family": self.family,
            "spi": f"0x{self.spi:08x}",
            "aead": self.aead,
            "enc": self.enc,
            "auth": self.auth,
            "icv_len": self.icv_len,
            "esn": self.esn,
            "replay_window": self.replay.size,
            "replay_top": self.replay.top,
            "seq": self.counters.seq,
            "tfc_pad": self.tfc_pad,
            "lifetime": self.lifetime.as_dict(),
            "age_seconds": round(self._clock() - self._created, 3),
            "state": self.state,
            "counters": self.counters.as_dict(),
        }

    # -- sequence numbers ---------------------------------------------------------------------------

    @property
    def seq(self) -> int:
        """The last outbound sequence number used (``seq_start`` before the first packet)."""
        return self.counters.seq

    def next_seq(self) -> int:
        """Allocate the next outbound sequence number; never cycles (RFC 4303 §3.3.3)."""
        c = self.counters
        seq = c.seq
        if seq >= c.seq_max:
            self.counters.seq_exhausted += 1
            if not self._seq_reported:
                self._seq_reported = True
                self._emit("seq-exhausted", f"sequence number space exhausted after {seq}; rekey needed")
            raise Drop(counters.XFRM_OUT_STATE_SEQ_ERROR, "sequence number space exhausted")
        seq += 1
        c.seq = seq
        return seq

    # -- packet processing ------------------------------------------------------------------------

    def protect(self, packet: bytes) -> bytes:
        """Apply this SA to a cleartext IP packet; returns the ESP/AH packet or raises Drop."""
        if self.state == DEAD or (self._limited and not self._check_time()):
            self.counters.expired_drops += 1
            raise Drop(counters.XFRM_OUT_STATE_EXPIRED, f"SA {self.name} expired")
        seq = self.next_seq()
        out = self._encap(self, packet, seq)
        c = self.counters
        c.packets += 1
        c.bytes += len(packet)
        if self._limited:
            self._check_volume()
        return out

    def unprotect(self, packet: bytes) -> bytes:
        """Verify and remove ESP/AH; returns the cleartext packet or raises Drop."""
        if self.state == DEAD or (self._limited and not self._check_time()):
            self.counters.expired_drops += 1
            raise Drop(counters.XFRM_IN_STATE_EXPIRED, f"SA {self.name} expired")
        inner = self._decap(self, packet)
        c = self.counters
        c.packets += 1
        c.bytes += len(inner)
        if self._limited:
            self._check_volume()
        return inner

    # -- lifetimes ----------------------------------------------------------------------------------

    @property
    def age(self) -> float:
        return self._clock() - self._created

    def poll_expiry(self) -> str:
        """Apply time limits without traffic (the engine calls this periodically); returns the state."""
        if self._limited and self.state != DEAD:
            self._check_time()
        return self.state

    def expire(self, hard: bool = True, reason: str = "expired by operator") -> None:
        """Force soft or hard expiry (e.g. from the control socket), with the usual single event."""
        if hard:
            self._die(reason)
        else:
            self._dying(reason)

    def _check_time(self) -> bool:
        """Returns False if the SA is (now) hard-expired by time."""
        soft = self._soft_limits[2]
        hard = self._hard_limits[2]
        if not (soft or hard):
            return True
        age = self._clock() - self._created
        if hard and age >= hard:
            self._die(f"hard lifetime of {hard} s reached")
            return False
        if soft and age >= soft and self.state == MATURE:
            self._dying(f"soft lifetime of {soft} s reached")
        return True

    def _check_volume(self) -> None:
        c = self.counters
        hard_packets, hard_bytes, _ = self._hard_limits
        if hard_packets and c.packets >= hard_packets:
            self._die(f"hard lifetime of {hard_packets} packets reached")
            return
        if hard_bytes and c.bytes >= hard_bytes:
            self._die(f"hard lifetime of {hard_bytes} bytes reached")
            return
        if self.state == MATURE:
            soft_packets, soft_bytes, _ = self._soft_limits
            if soft_packets and c.packets >= soft_packets:
                self._dying(f"soft lifetime of {soft_packets} packets reached")
            elif soft_bytes and c.bytes >= soft_bytes:
                self._dying(f"soft lifetime of {soft_bytes} bytes reached")

    def _dying(self, reason: str) -> None:
        if self.state == MATURE:
            self.state = DYING
            self._sync_fast()
            self._emit("soft-expire", reason)

    def _die(self, reason: str) -> None:
        if self.state != DEAD:
            self.state = DEAD
            self._sync_fast()
            self._emit("hard-expire", reason)

    def _sync_fast(self) -> None:
        """Tell the C fast path (counters' limit fields) how far it may go on this SA by itself.

        It must leave to this module every packet that reaches a lifetime limit (that packet
        fires the event) and every packet once the SA is dead; time limits become a deadline on
        CLOCK_MONOTONIC, which only means something if this SA runs on time.monotonic.
        """
        c = self.counters
        c.fast_ok = self.core is not None and self.state != DEAD
        mature = self.state == MATURE
        soft_packets, soft_bytes, soft_seconds = self._soft_limits
        hard_packets, hard_bytes, hard_seconds = self._hard_limits
        c.limit_packets = soft_packets if mature and soft_packets else hard_packets
        c.limit_bytes = soft_bytes if mature and soft_bytes else hard_bytes
        seconds = soft_seconds if mature and soft_seconds else hard_seconds
        if not seconds:
            c.deadline = 0.0
        elif self._clock is time.monotonic:
            c.deadline = self._created + seconds
        else:
            c.deadline = -1.0  # an injected clock (tests): the fast path cannot read it

    def _emit(self, kind: str, reason: str) -> None:
        if self.on_event is None:
            return
        try:
            self.on_event(SaEvent(kind, self.name, reason))
        except Exception:  # a broken listener must not turn into a packet-path exception
            log.exception("SA %s: event listener failed on %s", self.name, kind)


__all__ = ["DEAD", "DYING", "MATURE", "Lifetime", "SaCounters", "SaEvent", "SecurityAssociation"]

