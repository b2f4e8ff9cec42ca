"""The C core of ESP AEAD IPv4 SAs and the engine's C fast path (nfq_ipsec/_espcore.c), rootless.

esp.py's general path (``_encapsulate`` / ``_decap``) is the specification: ``EspCore.encap`` must
produce its bytes exactly, ``EspCore.decap`` its output or its ``Drop`` (counter and reason), its
SaCounters and its replay window, for valid packets and for everything an attacker can send (bit
flips, truncations, crafted plaintexts encrypted here with an AEAD object of our own). Whatever
the core does not handle it must decline *before changing anything*.

The fast path (``FastPath``) short-cuts the pipeline for flows it was taught: it must do what the
pipeline would (same ESP bytes but the outer IP ID, same counters) and hand to Python ("punt")
every packet it cannot treat exactly like that, changing nothing. Its raw socket is an AF_UNIX
SOCK_SEQPACKET socket pair (Linux ignores sendto's address on it, so every ESP packet arrives whole
at the other end) and its TUN device a pipe: no privileges needed.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from unittest import mock

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nfq_ipsec import _espcore, esp
from nfq_ipsec import counters as C
from nfq_ipsec._espcore import KIND_FORWARD, KIND_INNER, KIND_INPUT_SA, KIND_OUTPUT, CounterPair, FastPath
from nfq_ipsec.config import parse_config
from nfq_ipsec.counters import Counters
from nfq_ipsec.engine import Engine
from nfq_ipsec.errors import Drop
from nfq_ipsec.pipeline import (
    HOOK_FORWARD,
    HOOK_INPUT,
    HOOK_OUTPUT,
    NF_ACCEPT,
    NF_DROP,
    Decision,
    FlowHint,
    InjectTunnel,
    Pipeline,
    SendIcmp,
    SendPacket,
    inner_mtu_for,
)
from nfq_ipsec.replay import ReplayWindow
from nfq_ipsec.sa import DEAD, DYING, MATURE, Lifetime, SaCounters, SecurityAssociation
from nfq_ipsec.sad import Sad
from nfq_ipsec.spd import Action, Direction, Policy, PolicyCounters, Selector, Spd

M32 = 1 << 32
M64 = 1 << 64
AEAD_KEYS = {"aes-gcm-128": 16, "aes-gcm-192": 24, "aes-gcm-256": 32, "chacha20-poly1305": 32}
AEADS = tuple(AEAD_KEYS)
SPI = 0x0C0FFEE0
# transport: between two hosts; tunnel: between two gateways (documentation addresses only)
ENDPOINTS = {"transport": ("192.0.2.2", "192.0.2.1"), "tunnel": ("198.51.100.1", "203.0.113.1")}
INNER = ("192.0.2.130", "192.0.2.10")
TUN_IFINDEX = 7

Outcome = tuple[Any, ...]


# -- packets, built here without the code under test ------------------------------------------------


def _csum(b: bytes) -> int:
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ip4(src: str, dst: str, payload: bytes, *, proto: int = 17, tos: int = 0, df: bool = False, mf: bool = False,
        offset: int = 0, ident: int = 0x4242, options: bytes = b"", total: int | None = None) -> bytes:
    """An IPv4 packet with a correct checksum; `total` overrides the length field."""
    hl = 20 + len(options)
    assert hl % 4 == 0
    flags = (0x4000 if df else 0) | (0x2000 if mf else 0) | offset
    hdr = struct.pack("!BBHHHBBH4s4s", 0x40 | hl >> 2, tos, hl + len(payload) if total is None else total, ident,
                      flags, 64, proto, 0, socket.inet_aton(src), socket.inet_aton(dst)) + options
    return hdr[:10] + struct.pack("!H", _csum(hdr)) + hdr[12:] + payload


def ip6(src: str, dst: str, payload: bytes, *, nh: int = 17, tc: int = 0) -> bytes:
    return struct.pack("!IHBB16s16s", (6 << 28) | (tc << 20), len(payload), nh, 64,
                       socket.inet_pton(socket.AF_INET6, src), socket.inet_pton(socket.AF_INET6, dst)) + payload


def udp(sport: int, dport: int, data: bytes = b"") -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data


def tcp(sport: int, dport: int, data: bytes = b"") -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 0x50, 0x18, 8192, 0, 0) + data


def trailer(payload: bytes, nh: int, pad: bytes | None = None, padlen: int | None = None) -> bytes:
    """payload | padding | pad length | next header; RFC 4303's padding unless told otherwise."""
    if pad is None:
        pad = bytes(range(1, (2 - len(payload)) % 4 + 1))
    return payload + pad + bytes((len(pad) if padlen is None else padlen, nh))


def key_for(aead: str) -> bytes:
    return bytes((i * 29 + len(aead) * 3 + 1) & 0xFF for i in range(AEAD_KEYS[aead] + 4))


class Crafter:
    """ESP packets for an SA's key made by hand, with an AEAD object of our own: any plaintext,
    sequence number, SPI or ESN high half, correctly encrypted and authenticated."""

    def __init__(self, aead: str, mode: str, *, esn: bool = False, spi: int = SPI) -> None:
        key = key_for(aead)
        self.cipher = ChaCha20Poly1305(key[:-4]) if aead.startswith("chacha") else AESGCM(key[:-4])
        self.salt = key[-4:]
        self.mode, self.esn, self.spi = mode, esn, spi
        self.src, self.dst = ENDPOINTS[mode]

    def esp(self, seq: int, plaintext: bytes, *, spi: int | None = None, seq_hi: int | None = None,
            **ip: Any) -> bytes:
        head = struct.pack("!II", self.spi if spi is None else spi, seq & 0xFFFFFFFF)
        iv = seq.to_bytes(8, "big")
        hi = seq >> 32 if seq_hi is None else seq_hi
        aad = head[:4] + struct.pack("!I", hi) + head[4:] if self.esn else head
        return ip4(self.src, self.dst, head + iv + self.cipher.encrypt(self.salt + iv, plaintext, aad), proto=50,
                   **ip)

    def valid(self, seq: int, size: int = 40, sport: int = 1000) -> tuple[bytes, bytes]:
        """(ESP packet, the cleartext packet the receiver must return)."""
        data = bytes((seq + i) & 0xFF for i in range(size))
        if self.mode == "tunnel":
            inner = ip4(*INNER, udp(sport, 53, data))
            return self.esp(seq, trailer(inner, 4)), inner
        clear = ip4(self.src, self.dst, udp(sport, 53, data))
        return self.esp(seq, trailer(clear[20:], 17)), clear


# -- SAs ----------------------------------------------------------------------------------------------


def make_sa(aead: str = "aes-gcm-128", mode: str = "tunnel", *, outbound: bool = False, esn: bool = False,
            window: int = 64, **kw: Any) -> SecurityAssociation:
    """An IPv4 ESP AEAD SA keyed like Crafter; inbound (peer -> us) unless `outbound`."""
    src, dst = ENDPOINTS[mode]
    if outbound:
        src, dst = dst, src
    return SecurityAssociation(name=kw.pop("name", "sa"), proto="esp", mode=mode, src=src, dst=dst,
                               spi=kw.pop("spi", SPI), aead=aead, key=key_for(aead), esn=esn, replay_window=window,
                               **kw)


def core_of(sa: SecurityAssociation) -> _espcore.EspCore:
    assert sa.core is not None, f"{sa} has no C core"
    return sa.core


def outcome(fn: Callable[[], bytes]) -> Outcome:
    """A call's result or its Drop, comparable; any other exception fails the test."""
    try:
        return ("ok", fn())
    except Drop as e:
        return ("drop", e.counter, e.reason)


def window_state(w: ReplayWindow) -> tuple[Any, ...]:
    top = w.top
    lo, hi = max(0, top - w.size - 2), min(top + 3, M64)
    return (w.size, w.esn, top, [s for s in range(lo, hi) if w.seen(s)])


def sa_state(sa: SecurityAssociation) -> tuple[Any, ...]:
    c = sa.counters
    return (c.as_dict(), c.seq, sa.state, window_state(sa.replay))


class Twins:
    """Two receivers of one SA: `fast` through its C core (then the general path when the core
    declines, as esp.decapsulate does), `ref` through the general path only. `feed` checks that
    both give the same output or Drop and end up in the same state."""

    def __init__(self, aead: str, mode: str, *, esn: bool = False, window: int = 64, seq_start: int = 0) -> None:
        self.fast = make_sa(aead, mode, esn=esn, window=window, seq_start=seq_start)
        self.ref = make_sa(aead, mode, esn=esn, window=window, seq_start=seq_start)
        self.declined = 0

    def _via_core(self, pkt: bytes) -> bytes:
        out = core_of(self.fast).decap(pkt)
        if out is None:
            self.declined += 1
            return esp._decap(self.fast, pkt)
        return out

    def feed(self, pkt: bytes) -> Outcome:
        got = outcome(lambda: self._via_core(pkt))
        want = outcome(lambda: esp._decap(self.ref, pkt))
        assert got == want, pkt.hex()
        assert self.fast.counters.as_dict() == self.ref.counters.as_dict(), pkt.hex()
        assert window_state(self.fast.replay) == window_state(self.ref.replay), pkt.hex()
        return got


# == 1. byte-for-byte: EspCore.encap against esp._encapsulate =========================================


@st.composite
def encap_cases(draw: st.DrawFn) -> tuple[SecurityAssociation, bytes, int, int, bool]:
    """(SA, packet, seq, outer IP ID, whether the core must handle it)."""
    aead = draw(st.sampled_from(AEADS))
    esn = draw(st.booleans())
    mode = draw(st.sampled_from(("transport", "tunnel")))
    size = draw(st.integers(0, 9000))
    data = draw(st.randoms(use_true_random=False)).randbytes(size)
    tos = draw(st.integers(0, 255))
    df = draw(st.booleans())
    junk = draw(st.sampled_from((b"", b"\0", b"\xff\xee\xdd")))  # bytes past the IP length: not encrypted
    handled = True
    tfc_pad = 0
    if mode == "transport":
        src, dst = ENDPOINTS["transport"][::-1]
        shape = draw(st.sampled_from(("plain", "plain", "plain", "options", "mf", "offset", "ipv6", "short")))
        if shape == "ipv6":
            pkt = ip6("2001:db8::1", "2001:db8::2", udp(1, 2, data), tc=tos)
        elif shape == "short":
            pkt = ip4(src, dst, udp(1, 2, data))[:19]
        else:
            pkt = ip4(src, dst, udp(1, 2, data), tos=tos, df=df, mf=shape == "mf", offset=185 * (shape == "offset"),
                      options=b"\x01\x01\x01\x00" if shape == "options" else b"")
        handled = shape == "plain"
    else:
        shape = draw(st.sampled_from(("ipv4", "ipv4", "ipv4-options", "ipv6", "ipv6", "garbage", "badlen")))
        if shape.startswith("ipv4"):
            pkt = ip4(*INNER, tcp(80, 8080, data), proto=6, tos=tos, df=df,
                      options=b"\x01\x01\x01\x00" * 2 if shape == "ipv4-options" else b"")
        elif shape == "ipv6":
            pkt = ip6("2001:db8:1::1", "2001:db8:2::2", tcp(80, 8080, data), nh=6, tc=tos)
        elif shape == "garbage":
            pkt = bytes((0x55,)) + data[:50]
        else:
            pkt = ip4(*INNER, udp(1, 2, data), total=20 + 8 + size + 1)  # one byte beyond the packet
            junk = b""
        handled = shape not in ("garbage", "badlen")
        if draw(st.booleans()):
            if draw(st.booleans()):
                tfc_pad = draw(st.integers(len(pkt) + 1, 65535))  # padded: the general path's business
                handled = False
            else:
                tfc_pad = draw(st.integers(1, len(pkt)))  # no padding needed: the core's
    pkt += junk
    seq_max = M64 - 1 if esn else M32 - 1
    seq = draw(st.one_of(
        st.integers(1, 100),
        st.integers(M32 - 4, M32 - 1),
        st.integers(1, seq_max),
        *((st.integers(M32, M32 + 4), st.integers(M64 - 4, M64 - 1)) if esn else ()),
    ))
    ip_id = draw(st.integers(0, 0xFFFF))
    sa = make_sa(aead, mode, outbound=True, esn=esn, tfc_pad=tfc_pad)
    return sa, pkt, seq, ip_id, handled


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(encap_cases())
def test_encap_is_the_general_path_byte_for_byte(case: tuple[SecurityAssociation, bytes, int, int, bool]) -> None:
    sa, pkt, seq, ip_id, handled = case
    before = sa_state(sa)
    out = core_of(sa).encap(pkt, seq, ip_id)
    assert sa_state(sa) == before  # encap() only frames: the SA's state is the caller's business
    with mock.patch.object(esp, "_ip_ids", itertools.repeat(ip_id)):
        want = outcome(lambda: esp._encapsulate(sa, pkt, seq, None))
        public = outcome(lambda: esp.encapsulate(sa, pkt, seq))  # core first, then the general path
    assert public == want
    if handled:
        assert want[0] == "ok"
        assert out == want[1]
    else:
        assert out is None


@pytest.mark.parametrize("mode", ["transport", "tunnel"])
def test_encap_declines_what_exceeds_65535_bytes(mode: str) -> None:
    """The largest packet that still fits, and one byte more (the general path drops it)."""
    sa = make_sa("aes-gcm-128", mode, outbound=True)
    src, dst = ENDPOINTS["transport"][::-1] if mode == "transport" else INNER

    def out_len(total: int) -> int:  # RFC 4303 framing of a `total`-byte packet, padded to 4
        body = total if mode == "tunnel" else total - 20
        return 20 + 8 + 8 + body + (2 - total) % 4 + 2 + 16

    fits = next(size for size in range(0xFFFF - 28, 0, -1) if out_len(28 + size) <= 0xFFFF)
    for size, ok in ((fits, True), (fits + 1, False)):
        pkt = ip4(src, dst, udp(1, 2, bytes(size)))
        out = core_of(sa).encap(pkt, 1, 0)
        with mock.patch.object(esp, "_ip_ids", itertools.repeat(0)):
            want = outcome(lambda p=pkt: esp._encapsulate(sa, p, 1, None))  # type: ignore[misc]
        if ok:
            assert want[0] == "ok" and len(want[1]) <= 0xFFFF and out == want[1]
        else:
            assert want[:2] == ("drop", C.XFRM_OUT_ERROR) and out is None


def test_encap_argument_errors() -> None:
    core = core_of(make_sa(outbound=True))
    pkt = ip4(*INNER, udp(1, 2))
    with pytest.raises(OverflowError):
        core.encap(pkt, -1, 0)
    with pytest.raises(OverflowError):
        core.encap(pkt, M64, 0)
    with pytest.raises(TypeError):
        core.encap(pkt, 1.0, 0)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        core.encap("not bytes", 1, 0)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        core.encap(pkt, 1)  # type: ignore[call-arg]
    assert core.encap(memoryview(pkt), 1, 0) == core.encap(bytearray(pkt), 1, 0) == core.encap(pkt, 1, 0)


# == 1. decap: two twin receivers, C core against the general path ====================================

CONFIGS = [(a, m, e) for a in AEADS for m in ("transport", "tunnel") for e in (False, True)]
CONFIG_IDS = [f"{a}-{m}{'-esn' if e else ''}" for a, m, e in CONFIGS]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    config=st.sampled_from(CONFIGS),
    window=st.sampled_from((0, 1, 32, 64, 200)),
    base=st.sampled_from((0, 100, M32 - 40)),
    offsets=st.lists(st.one_of(st.integers(-70, 70), st.integers(-300, 300)), min_size=1, max_size=40),
    sizes=st.randoms(use_true_random=False),
)
def test_decap_valid_replayed_and_stale_packets(config: tuple[str, str, bool], window: int, base: int,
                                                offsets: list[int], sizes: Any) -> None:
    """Valid packets in any order: accepted, replayed, too old, sequence number 0, ESN high half
    inferred across 2^32 (or not: ICV mismatch), on windows of every kind."""
    aead, mode, esn = config
    if esn and window == 0:
        window = 32  # ESN needs a window
    twins = Twins(aead, mode, esn=esn, window=window, seq_start=base)
    tx = Crafter(aead, mode, esn=esn)
    seq_max = M64 - 1 if esn else M32 - 1
    for off in offsets:
        seq = min(max(base + off, 0), seq_max)
        pkt, clear = tx.valid(seq, sizes.randint(0, 300 if sizes.random() < 0.8 else 9000))
        got = twins.feed(pkt)
        if got[0] == "ok":
            assert got[1] == clear
    assert twins.declined == 0  # every one of them is the core's case


def _flip_sample(aead: str, mode: str, esn: bool) -> tuple[bytes, int]:
    """A small valid packet and the receiver's seq_start, near 2^32 with ESN (flips in the sequence
    number then cross into other high halves)."""
    start = M32 - 3 if esn else 100
    pkt, _ = Crafter(aead, mode, esn=esn).valid(start + 2, size=5)
    return pkt, start


@pytest.mark.parametrize(("aead", "mode", "esn"), CONFIGS, ids=CONFIG_IDS)
def test_decap_every_single_bit_flip(aead: str, mode: str, esn: bool) -> None:
    pkt, start = _flip_sample(aead, mode, esn)
    outcomes: set[Any] = set()
    for bit in range(len(pkt) * 8):
        bad = bytearray(pkt)
        bad[bit >> 3] ^= 0x80 >> (bit & 7)
        twins = Twins(aead, mode, esn=esn, seq_start=start)
        outcomes.add(twins.feed(bytes(bad))[:2])
    # the checks that must have fired (header bits the receiver ignores still decrypt)
    assert ("drop", C.XFRM_IN_STATE_PROTO_ERROR) in outcomes
    assert ("drop", C.XFRM_IN_NO_STATES) in outcomes
    assert ("drop", C.XFRM_IN_HDR_ERROR) in outcomes
    assert any(o[0] == "ok" for o in outcomes)


@pytest.mark.parametrize(("aead", "mode", "esn"), CONFIGS, ids=CONFIG_IDS)
def test_decap_truncations(aead: str, mode: str, esn: bool) -> None:
    pkt, start = _flip_sample(aead, mode, esn)
    twins = Twins(aead, mode, esn=esn, seq_start=start)
    for n in range(len(pkt)):
        assert twins.feed(pkt[:n])[0] == "drop"  # the length field now lies
        if n >= 20:
            fixed = pkt[:2] + struct.pack("!H", n) + pkt[4:10] + b"\0\0" + pkt[12:n]
            assert twins.feed(fixed)[0] == "drop"  # consistent, but the ICV is gone or cut
    assert twins.feed(pkt)[0] == "ok"  # nothing above moved the window
    assert twins.feed(pkt + b"\0" * 5)[:2] == ("drop", C.XFRM_IN_STATE_SEQ_ERROR)


def _crafted(mode: str) -> list[tuple[str, bytes, str | None]]:
    """(name, plaintext, the expected Drop counter or None for success)."""
    inner4 = ip4(*INNER, udp(7, 8, b"inner"))
    inner6 = ip6("2001:db8:1::1", "2001:db8:2::2", udp(7, 8, b"inner6"))
    payload = udp(5, 6, b"transport payload") if mode == "transport" else inner4
    nh = 17 if mode == "transport" else 4
    cases: list[tuple[str, bytes, str | None]] = [
        ("valid", trailer(payload, nh), None),
        ("valid-long-padding", trailer(payload, nh, bytes(range(1, 200))), None),
        ("bad-padding-first", trailer(payload, nh, b"\x02\x02\x03"), C.IN_PADDING_ERROR),
        ("bad-padding-last", trailer(payload, nh, b"\x01\x02\x04"), C.IN_PADDING_ERROR),
        ("bad-padding-zeros", trailer(payload, nh, b"\0" * 7), C.IN_PADDING_ERROR),
        ("padlen-beyond-payload", trailer(b"", nh, b"", padlen=200), C.IN_PADDING_ERROR),
        ("padlen-255", trailer(payload, nh, b"", padlen=255), C.IN_PADDING_ERROR),
        ("dummy", trailer(b"", 59), C.IN_DUMMY_PACKET),
        ("dummy-with-data", trailer(payload, 59), C.IN_DUMMY_PACKET),
        ("dummy-bad-padding", trailer(payload, 59, b"\x09"), C.IN_PADDING_ERROR),
        ("empty", trailer(b"", nh, b""), None if mode == "transport" else C.XFRM_IN_STATE_MODE_ERROR),
    ]
    if mode == "transport":
        cases += [
            ("any-next-header", trailer(payload, 200), None),
            ("next-header-4", trailer(inner4, 4), None),
        ]
    else:
        short = ip4(*INNER, b"")
        cases += [
            ("ipv6-inner", trailer(inner6, 41), None),
            ("tfc-padded", trailer(inner4 + bytes(300), 4), None),
            ("tfc-padded-ipv6", trailer(inner6 + bytes(77), 41), None),
            ("minimal-inner", trailer(short, 4), None),
            ("inner-ipv6-says-4", trailer(inner6, 4), C.XFRM_IN_STATE_MODE_ERROR),
            ("inner-ipv4-says-41", trailer(inner4 + bytes(40), 41), C.XFRM_IN_STATE_MODE_ERROR),
            ("inner-too-short-4", trailer(inner4[:19], 4), C.XFRM_IN_STATE_MODE_ERROR),
            ("inner-too-short-6", trailer(inner6[:39], 41), C.XFRM_IN_STATE_MODE_ERROR),
            ("inner-length-beyond", trailer(inner4[:2] + struct.pack("!H", len(inner4) + 1) + inner4[4:], 4),
             C.XFRM_IN_STATE_MODE_ERROR),
            ("inner-length-below-20", trailer(inner4[:2] + b"\0\x13" + inner4[4:], 4), C.XFRM_IN_STATE_MODE_ERROR),
            ("inner-length-below-ihl", trailer(b"\x46" + inner4[1:2] + b"\0\x16" + inner4[4:], 4),
             C.XFRM_IN_STATE_MODE_ERROR),
            ("inner-ihl-15", trailer(b"\x4f" + inner4[1:], 4), C.XFRM_IN_STATE_MODE_ERROR),
            ("inner6-length-beyond", trailer(inner6[:4] + struct.pack("!H", len(inner6) - 39) + inner6[6:], 41),
             C.XFRM_IN_STATE_MODE_ERROR),
            ("inner-trailing-bytes", trailer(inner4[:2] + struct.pack("!H", 20) + inner4[4:], 4), None),
            ("tunnel-carries-udp", trailer(payload, 17), C.XFRM_IN_STATE_MODE_ERROR),
            ("tunnel-carries-0", trailer(payload, 0), C.XFRM_IN_STATE_MODE_ERROR),
        ]
    return cases


@pytest.mark.parametrize(("aead", "mode", "esn"), CONFIGS, ids=CONFIG_IDS)
def test_decap_crafted_plaintexts(aead: str, mode: str, esn: bool) -> None:
    """Authentic packets whose content is wrong: each is dropped for its own reason (or accepted)
    by both paths, and every one of them moves the window (it was authentic)."""
    twins = Twins(aead, mode, esn=esn, seq_start=M32 - 5 if esn else 0)
    tx = Crafter(aead, mode, esn=esn)
    seq = twins.fast.replay.top
    for name, plaintext, counter in _crafted(mode):
        seq += 1
        got = twins.feed(tx.esp(seq, plaintext))
        assert got[0] == ("ok" if counter is None else "drop"), (name, got)
        if counter is not None:
            assert got[1] == counter, (name, got)
        assert twins.fast.replay.seen(seq), name
    assert twins.declined == 0


@pytest.mark.parametrize(("aead", "mode", "esn"), CONFIGS, ids=CONFIG_IDS)
def test_decap_outer_headers(aead: str, mode: str, esn: bool) -> None:
    """What the core leaves to the general path, and what it must treat like it."""
    twins = Twins(aead, mode, esn=esn, seq_start=10)
    tx = Crafter(aead, mode, esn=esn)
    plaintext = trailer(udp(5, 6, b"p") if mode == "transport" else ip4(*INNER, udp(5, 6)), 17 if mode ==
                        "transport" else 4)
    cases = [
        ("wrong-spi", tx.esp(11, plaintext, spi=SPI + 1), ("drop", C.XFRM_IN_NO_STATES)),
        ("wrong-esn-half", tx.esp(12, plaintext, seq_hi=1), ("drop", C.XFRM_IN_STATE_PROTO_ERROR) if esn else "ok"),
        ("seq-0", tx.esp(0, plaintext), ("drop", C.XFRM_IN_STATE_SEQ_ERROR)),
        ("fragment", tx.esp(13, plaintext, mf=True), ("drop", C.XFRM_IN_HDR_ERROR)),
        ("fragment-offset", tx.esp(14, plaintext, offset=3), ("drop", C.XFRM_IN_HDR_ERROR)),
        ("options", tx.esp(15, plaintext, options=b"\x01\x01\x01\x00"), "ok"),  # the general path's
        ("df-set", tx.esp(16, plaintext, df=True), "ok"),
        ("tos", tx.esp(17, plaintext, tos=0xB8), "ok"),
        ("trailing-bytes", tx.esp(18, plaintext) + b"\xee" * 9, "ok"),
        ("not-esp", ip4(tx.src, tx.dst, tx.esp(19, plaintext)[20:], proto=51), ("drop", C.XFRM_IN_HDR_ERROR)),
        ("ipv6", ip6("2001:db8::1", "2001:db8::2", tx.esp(20, plaintext)[20:], nh=50),
         ("drop", C.XFRM_IN_NO_STATES)),
        ("short-ihl", b"\x44" + tx.esp(21, plaintext)[1:], ("drop", C.XFRM_IN_HDR_ERROR)),
        ("empty", b"", ("drop", C.XFRM_IN_NO_STATES)),
    ]
    for name, pkt, expected in cases:
        got = twins.feed(pkt)
        assert (got[0] if expected == "ok" else got[:2]) == expected, (name, got)
        if mode == "transport" and got[0] == "ok":
            out = got[1]
            hl = (pkt[0] & 15) * 4
            assert out[:2] == pkt[:2] and out[4:9] == pkt[4:9] and out[12:hl] == pkt[12:hl], name
            assert _csum(out[:hl]) == 0, name


@st.composite
def authentic_plaintexts(draw: st.DrawFn) -> bytes:
    """Anything an SA's key holder can encrypt: random payloads, IP headers with random lengths,
    valid or broken padding, any next header."""
    body = draw(st.binary(max_size=120))
    kind = draw(st.sampled_from(("raw", "ipv4", "ipv6")))
    if kind == "ipv4":
        ihl = draw(st.sampled_from((5, 5, 4, 6, 15)))
        body = bytes((0x40 | ihl, 0)) + struct.pack("!H", draw(st.integers(0, 200))) + bytes(16) + body
    elif kind == "ipv6":
        body = b"\x60" + bytes(3) + struct.pack("!H", draw(st.integers(0, 160))) + bytes(34) + body
    if draw(st.booleans()):
        pad = bytes(range(1, draw(st.integers(0, 255)) + 1))
    else:
        pad = draw(st.binary(max_size=20))
    padlen = draw(st.one_of(st.just(len(pad)), st.integers(0, 255)))
    nh = draw(st.sampled_from((4, 41, 17, 6, 59, 0, 255)))
    return trailer(body, nh, pad, padlen)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=st.sampled_from(CONFIGS), plaintexts=st.lists(authentic_plaintexts(), min_size=1, max_size=5))
def test_decap_random_authentic_plaintexts(config: tuple[str, str, bool], plaintexts: list[bytes]) -> None:
    aead, mode, esn = config
    twins = Twins(aead, mode, esn=esn, seq_start=M32 - 2 if esn else 7)
    tx = Crafter(aead, mode, esn=esn)
    seq = twins.fast.replay.top
    for plaintext in plaintexts:
        seq += 1
        twins.feed(tx.esp(seq, plaintext))
    assert twins.declined == 0


def test_decap_accepts_any_buffer_and_rejects_non_buffers() -> None:
    twins = Twins("aes-gcm-128", "tunnel")
    tx = Crafter("aes-gcm-128", "tunnel")
    core = core_of(twins.fast)
    pkt, inner = tx.valid(1)
    assert core.decap(memoryview(pkt)) == inner
    pkt, inner = tx.valid(2)
    assert core.decap(bytearray(pkt)) == inner
    with pytest.raises(TypeError):
        core.decap("text")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        core.decap(None)  # type: ignore[arg-type]


def test_decap_of_an_sa_with_anti_replay_off() -> None:
    """Window 0: every authentic packet is accepted, duplicates too, by both paths."""
    twins = Twins("chacha20-poly1305", "tunnel", window=0)
    tx = Crafter("chacha20-poly1305", "tunnel")
    for seq in (5, 5, 1, 0, 1000, 3):
        pkt, inner = tx.valid(seq)
        assert twins.feed(pkt) == ("ok", inner)
    assert twins.declined == 0


# == 2. constants shared by C and Python =============================================================


def test_counter_names_are_counters_py_values() -> None:
    assert _espcore.C_IN_STATE_SEQ_ERROR == C.XFRM_IN_STATE_SEQ_ERROR
    assert _espcore.C_IN_STATE_PROTO_ERROR == C.XFRM_IN_STATE_PROTO_ERROR
    assert _espcore.C_IN_STATE_MODE_ERROR == C.XFRM_IN_STATE_MODE_ERROR
    assert _espcore.C_IN_PADDING_ERROR == C.IN_PADDING_ERROR
    assert _espcore.C_IN_DUMMY_PACKET == C.IN_DUMMY_PACKET
    names = [n for n in dir(_espcore) if n.startswith("C_IN_")]
    assert len(names) == 5 and all(getattr(_espcore, n) in C.ALL_NAMES for n in names)


def test_kinds_are_the_pipeline_hooks() -> None:
    """FastPath.learn takes the FORWARD/OUTPUT hook numbers as kinds (Engine._learn passes h.hook)."""
    assert (KIND_FORWARD, KIND_OUTPUT) == (HOOK_FORWARD, HOOK_OUTPUT)
    assert len({KIND_INPUT_SA, KIND_FORWARD, KIND_OUTPUT, KIND_INNER}) == 4


# == 3. SaCounters, CounterPair, the SA's fast-path limits ============================================

SA_FIELDS = ("packets", "bytes", "replay_drops", "integrity_failures", "format_errors", "expired_drops",
             "seq_exhausted")


def test_sa_counters_python_subclass() -> None:
    c = SaCounters()
    assert isinstance(c, _espcore.SaCounters)
    assert c.as_dict() == dict.fromkeys(SA_FIELDS, 0)
    c.packets += 1
    c.bytes += 1500
    c.bytes += 1
    c.replay_drops = 7
    c.seq_max = M64 - 1
    assert c.as_dict()["packets"] == 1 and c.as_dict()["bytes"] == 1501 and c.replay_drops == 7
    assert c.seq_max == M64 - 1
    assert repr(c) == ("SaCounters(packets=1, bytes=1501, replay_drops=7, integrity_failures=0, format_errors=0, "
                       "expired_drops=0, seq_exhausted=0)")
    assert "seq" not in c.as_dict() and "limit_packets" not in c.as_dict()  # state, not statistics
    with pytest.raises(AttributeError):
        c.typo = 1  # type: ignore[attr-defined]
    with pytest.raises(AttributeError):
        del c.packets
    with pytest.raises(TypeError):
        c.fast_ok = 1  # type: ignore[assignment]
    c.deadline = 12.5
    assert c.deadline == 12.5


def test_counter_pair_python_subclass() -> None:
    p = PolicyCounters()
    assert isinstance(p, CounterPair)
    p.account(100)
    p.account(0)
    p.packets += 1
    assert (p.packets, p.bytes) == (3, 100)
    assert p.as_dict() == {"packets": 3, "bytes": 100}
    assert repr(p) == "PolicyCounters(packets=3, bytes=100)"
    for bad in (-1, M64, 1.5, "1", None):
        with pytest.raises((OverflowError, TypeError)):
            p.account(bad)  # type: ignore[arg-type]
    assert (p.packets, p.bytes) == (3, 100)


@pytest.mark.parametrize("obj", [SaCounters, PolicyCounters], ids=["SaCounters", "PolicyCounters"])
@pytest.mark.parametrize("bad", [-1, M64, 1.5, "3", None], ids=["negative", "2^64", "float", "str", "None"])
def test_counter_assignment_is_rejected(obj: Callable[[], Any], bad: object) -> None:
    c = obj()
    with pytest.raises((OverflowError, TypeError)):
        c.packets = bad


@pytest.mark.parametrize("obj", [SaCounters, PolicyCounters], ids=["SaCounters", "PolicyCounters"])
@pytest.mark.parametrize("bad", [-1, M64, 1.5, "3", None], ids=["negative", "2^64", "float", "str", "None"])
def test_rejected_counter_assignment_keeps_the_value(obj: Callable[[], Any], bad: object) -> None:
    c = obj()
    c.packets = 5
    with pytest.raises((OverflowError, TypeError)):
        c.packets = bad
    assert c.packets == 5


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_sync_fast_volume_limits_follow_the_state() -> None:
    sa = make_sa(outbound=True, lifetime=Lifetime(soft_packets=5, hard_packets=9, soft_bytes=5000, hard_bytes=9000))
    c = sa.counters
    assert (c.fast_ok, c.limit_packets, c.limit_bytes, c.deadline) == (True, 5, 5000, 0.0)
    sa.expire(hard=False)
    assert sa.state == DYING and (c.fast_ok, c.limit_packets, c.limit_bytes) == (True, 9, 9000)
    sa.expire(hard=True)
    assert sa.state == DEAD and not c.fast_ok
    only_hard = make_sa(lifetime=Lifetime(hard_packets=3, soft_bytes=100))
    assert (only_hard.counters.limit_packets, only_hard.counters.limit_bytes) == (3, 100)
    unlimited = make_sa()
    assert (unlimited.counters.limit_packets, unlimited.counters.limit_bytes, unlimited.counters.deadline) == (0, 0, 0)


def test_sync_fast_soft_expiry_by_traffic_moves_the_limit() -> None:
    tx = make_sa(outbound=True, lifetime=Lifetime(soft_packets=2, hard_packets=4))
    pkt = ip4(*INNER, udp(1, 2))
    tx.protect(pkt)
    assert (tx.state, tx.counters.limit_packets) == (MATURE, 2)
    tx.protect(pkt)
    assert (tx.state, tx.counters.limit_packets, tx.counters.fast_ok) == (DYING, 4, True)
    tx.protect(pkt)
    tx.protect(pkt)
    assert tx.state == DEAD and not tx.counters.fast_ok


def test_sync_fast_time_limits() -> None:
    sa = make_sa(outbound=True, lifetime=Lifetime(soft_seconds=50, hard_seconds=80))
    created = time.monotonic() - sa.age
    assert abs(sa.counters.deadline - (created + 50)) < 1.0
    sa.expire(hard=False)
    assert abs(sa.counters.deadline - (created + 80)) < 1.0
    hard_only = make_sa(lifetime=Lifetime(hard_seconds=30, soft_packets=3))
    assert abs(hard_only.counters.deadline - (time.monotonic() - hard_only.age + 30)) < 1.0
    # an injected clock cannot be read from C: the fast path never takes such an SA
    clock = Clock()
    injected = make_sa(lifetime=Lifetime(soft_seconds=50, hard_seconds=80), clock=clock)
    assert injected.counters.deadline == -1.0 and injected.counters.fast_ok
    no_time = make_sa(lifetime=Lifetime(hard_packets=3), clock=clock)
    assert no_time.counters.deadline == 0.0
    clock.now += 60
    assert injected.poll_expiry() == DYING and injected.counters.deadline == -1.0
    clock.now += 30
    assert injected.poll_expiry() == DEAD and not injected.counters.fast_ok


def test_sas_without_core_are_never_fast() -> None:
    cbc = SecurityAssociation(name="cbc", proto="esp", mode="tunnel", src="203.0.113.1", dst="198.51.100.1",
                              spi=0x500, enc="aes-cbc-128", enc_key=bytes(16), auth="hmac-sha256-128",
                              auth_key=bytes(32))
    ah = SecurityAssociation(name="ah", proto="ah", mode="transport", src="192.0.2.1", dst="192.0.2.2", spi=0x501,
                             auth="hmac-sha256-128", auth_key=bytes(32))
    v6 = SecurityAssociation(name="v6", proto="esp", mode="tunnel", src="2001:db8::1", dst="2001:db8::2", spi=0x502,
                             aead="aes-gcm-128", key=bytes(20))
    short_icv = SecurityAssociation(name="gcm8", proto="esp", mode="tunnel", src="203.0.113.1",
                                    dst="198.51.100.1", spi=0x503, aead="aes-gcm-128", key=bytes(20), icv_len=8)
    gmac = SecurityAssociation(name="gmac", proto="esp", mode="tunnel", src="203.0.113.1", dst="198.51.100.1",
                               spi=0x504, aead="aes-gmac-128", key=bytes(20))
    for sa in (cbc, ah, v6, short_icv, gmac):
        assert sa.core is None and not sa.counters.fast_ok, sa


def test_restore_and_replay_setter_swap_the_cores_window() -> None:
    rx = make_sa("aes-gcm-256", "tunnel")
    tx = Crafter("aes-gcm-256", "tunnel")
    old_core = core_of(rx)
    pkt5, _ = tx.valid(5)
    new = ReplayWindow(32, initial=1000)
    rx.replay = new
    # the same core (flows the fast path learnt stay valid) now checks the new window
    assert rx.core is old_core and old_core.replay is new
    with pytest.raises(Drop) as e:
        core_of(rx).decap(pkt5)
    assert (e.value.counter, e.value.reason) == (C.XFRM_IN_STATE_SEQ_ERROR, "outside window")
    assert rx.counters.replay_drops == 1
    with pytest.raises(TypeError):
        old_core.replay = None  # type: ignore[assignment]
    pkt1001, inner1001 = tx.valid(1001)
    assert esp.decapsulate(rx, pkt1001) == inner1001
    assert rx.replay.top == 1001 and rx.replay.seen(1001)

    w = ReplayWindow(64, initial=2000)
    for s in range(1990, 2001):
        w.update(s)
    rx.restore(seq=77, age=5.0, replay=w)
    assert rx.replay is w and rx.seq == 77 and rx.counters.seq == 77
    with pytest.raises(Drop) as e:
        core_of(rx).decap(tx.valid(1995)[0])
    assert e.value.reason == "replayed"
    pkt, inner = tx.valid(1980)
    assert core_of(rx).decap(pkt) == inner and w.seen(1980)

    # restore without a window keeps the core; the outbound sequence number continues from `seq`
    out = make_sa("aes-gcm-256", "tunnel", outbound=True)
    core = out.core
    out.restore(seq=M32 - 2, age=0.0)
    assert out.core is core
    out.protect(ip4(*INNER, udp(1, 2)))
    assert out.seq == M32 - 1
    with pytest.raises(Drop):
        out.protect(ip4(*INNER, udp(1, 2)))


def test_restore_moves_the_deadline() -> None:
    sa = make_sa(outbound=True, lifetime=Lifetime(hard_seconds=100))
    sa.restore(seq=0, age=40.0)
    assert abs(sa.counters.deadline - (time.monotonic() + 60)) < 1.0
    clock = Clock()
    injected = make_sa(outbound=True, lifetime=Lifetime(hard_seconds=100), clock=clock)
    injected.restore(seq=0, age=40.0)
    assert injected.counters.deadline == -1.0


# == 4. FastPath ======================================================================================


@dataclass
class Wire:
    """The fast path's raw socket (an AF_UNIX SOCK_SEQPACKET pair: sendto's address is ignored)
    and TUN device (a pipe), read back from the other ends."""

    raw: socket.socket
    peer: socket.socket
    tun_r: int
    tun_w: int

    def sent(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.peer.recv(70000))
            except BlockingIOError:
                return out

    def tun(self) -> list[bytes]:
        """The packets written to the TUN pipe, split by their IP length (an extra byte breaks it)."""
        data = b""
        while True:
            try:
                chunk = os.read(self.tun_r, 1 << 20)
            except BlockingIOError:
                break
            if not chunk:
                break
            data += chunk
        out = []
        while data:
            n = (data[2] << 8 | data[3]) if data[0] >> 4 == 4 else 40 + (data[4] << 8 | data[5])
            assert 20 <= n <= len(data), data.hex()
            out.append(data[:n])
            data = data[n:]
        return out

    def fast(self) -> FastPath:
        return FastPath(self.raw.fileno(), self.tun_w, TUN_IFINDEX)


@pytest.fixture
def wire() -> Iterator[Wire]:
    raw, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    peer.setblocking(False)
    r, w = os.pipe()
    os.set_blocking(r, False)
    os.set_blocking(w, False)
    yield Wire(raw, peer, r, w)
    raw.close()
    peer.close()
    os.close(r)
    os.close(w)


CLEAR = ip4(*INNER[::-1], udp(4000, 5000, b"q" * 200), df=True)  # 192.0.2.10 -> 192.0.2.130


def _out_sa(**kw: Any) -> SecurityAssociation:
    return make_sa("aes-gcm-256", "tunnel", outbound=True, **kw)


def _decrypt_all(sent: list[bytes], aead: str = "aes-gcm-256", mode: str = "tunnel") -> list[bytes]:
    rx = make_sa(aead, mode, window=1024)
    return [rx.unprotect(p) for p in sent]


def test_fast_protect_of_a_learnt_flow(wire: Wire) -> None:
    sa = _out_sa()
    pol = PolicyCounters()
    fp = wire.fast()
    assert fp.learn(KIND_FORWARD, 17, 0, CLEAR[12:24], core_of(sa), (pol,), len(CLEAR))
    assert fp.stats()["flows"] == 1
    for _ in range(3):
        assert fp.handle(HOOK_FORWARD, CLEAR) == NF_DROP
    assert (sa.seq, sa.counters.packets, sa.counters.bytes) == (3, 3, 3 * len(CLEAR))
    assert (pol.packets, pol.bytes) == (3, 3 * len(CLEAR))
    sent = wire.sent()
    assert len(sent) == 3
    assert _decrypt_all(sent) == [CLEAR] * 3
    assert [int.from_bytes(p[24:28], "big") for p in sent] == [1, 2, 3]
    for p in sent:
        assert p[12:20] == socket.inet_aton("203.0.113.1") + socket.inet_aton("198.51.100.1")
        assert p[6] & 0x40  # DF copied
        assert _csum(p[:20]) == 0
    # the same bytes as the general path, but the outer IP ID (the fast path has its own counter)
    ref = _out_sa()
    with mock.patch.object(esp, "_ip_ids", itertools.repeat(int.from_bytes(sent[0][4:6], "big"))):
        assert ref.protect(CLEAR) == sent[0]
    assert fp.stats() == {**fp.stats(), "packets": 3, "send_errors": 0, "tun_errors": 0, "flows": 1}
    assert wire.tun() == []


def test_fast_protect_output_transport(wire: Wire) -> None:
    sa = make_sa("chacha20-poly1305", "transport", outbound=True, esn=True, seq_start=M32 - 2)
    pkt = ip4("192.0.2.1", "192.0.2.2", tcp(22, 40000, b"ssh" * 30), proto=6)
    fp = wire.fast()
    assert fp.learn(KIND_OUTPUT, 6, 0, pkt[12:24], core_of(sa), (), 1500)
    assert fp.handle(HOOK_FORWARD, pkt) is None  # learnt for OUTPUT only
    for _ in range(4):
        assert fp.handle(HOOK_OUTPUT, pkt) == NF_DROP
    assert sa.seq == M32 + 2
    sent = wire.sent()
    rx = make_sa("chacha20-poly1305", "transport", esn=True, seq_start=M32 - 2)
    assert [rx.unprotect(p) for p in sent] == [pkt] * 4
    ref = make_sa("chacha20-poly1305", "transport", outbound=True, esn=True, seq_start=M32 - 2)
    assert [ref.protect(pkt) for _ in range(4)] == sent  # transport: no IP ID of our own, identical


def test_fast_protect_counts_send_errors(wire: Wire) -> None:
    """The raw socket fails (here: not a socket at all): the packet is still consumed, as the
    Python path's RawSender does it (counted, not retried)."""
    sa = _out_sa()
    fp = FastPath(wire.tun_w, wire.tun_w, TUN_IFINDEX)
    fp.learn(KIND_FORWARD, 17, 0, CLEAR[12:24], core_of(sa), (), 1500)
    assert fp.handle(HOOK_FORWARD, CLEAR) == NF_DROP
    assert fp.stats()["send_errors"] == 1 and sa.seq == 1
    assert wire.tun() == []  # nothing reached the pipe through sendto


def _with_options(pkt: bytes) -> bytes:
    """`pkt` with 4 bytes of IPv4 options equal to its ports: bytes 12..24 (the flow key) unchanged."""
    return ip4(*INNER[::-1], pkt[20:], options=pkt[20:24], df=True)


PUNTS: dict[str, Callable[[FastPath, SecurityAssociation], bytes]] = {
    "unknown-flow": lambda fp, sa: ip4(*INNER[::-1], udp(4000, 5001, b"q" * 200), df=True),
    "other-protocol": lambda fp, sa: CLEAR[:9] + b"\x06" + CLEAR[10:],
    "disabled": lambda fp, sa: (setattr(fp, "enabled", False), CLEAR)[1],
    "too-long": lambda fp, sa: ip4(*INNER[::-1], udp(4000, 5000, b"q" * 201), df=True),
    "options": lambda fp, sa: _with_options(CLEAR),
    "fragment-mf": lambda fp, sa: ip4(*INNER[::-1], udp(4000, 5000, b"q" * 200), mf=True),
    "fragment-offset": lambda fp, sa: ip4(*INNER[::-1], CLEAR[20:], offset=1),
    "length-above": lambda fp, sa: CLEAR[:2] + struct.pack("!H", len(CLEAR) + 1) + CLEAR[4:],
    "length-below": lambda fp, sa: CLEAR[:2] + struct.pack("!H", len(CLEAR) - 1) + CLEAR[4:],
    "trailing-byte": lambda fp, sa: CLEAR + b"\0",
    "ipv6": lambda fp, sa: ip6("2001:db8::1", "2001:db8::2", CLEAR[20:]),
    "short": lambda fp, sa: CLEAR[:23],
    "dead": lambda fp, sa: (sa.expire(hard=True), CLEAR)[1],
    "seq-max": lambda fp, sa: (sa.restore(seq=M32 - 1, age=0), CLEAR)[1],
    "deadline-passed": lambda fp, sa: (setattr(sa.counters, "deadline", time.monotonic() - 1), CLEAR)[1],
    "injected-clock": lambda fp, sa: (setattr(sa.counters, "deadline", -1.0), CLEAR)[1],
    "packet-limit": lambda fp, sa: (setattr(sa.counters, "limit_packets", 1), CLEAR)[1],
    "byte-limit": lambda fp, sa: (setattr(sa.counters, "limit_bytes", len(CLEAR)), CLEAR)[1],
    "from-tun": lambda fp, sa: CLEAR,  # handled below: indev is the TUN device
}


@pytest.mark.parametrize("case", list(PUNTS))
def test_fast_protect_punts_and_changes_nothing(wire: Wire, case: str) -> None:
    sa = _out_sa()
    pol = PolicyCounters()
    fp = wire.fast()
    assert fp.learn(KIND_FORWARD, 17, 0, CLEAR[12:24], core_of(sa), (pol,), len(CLEAR))
    pkt = PUNTS[case](fp, sa)
    before = (sa_state(sa), pol.as_dict(), fp.stats())
    assert fp.handle(HOOK_FORWARD, pkt, TUN_IFINDEX if case == "from-tun" else 3) is None
    assert (sa_state(sa), pol.as_dict(), fp.stats()) == before
    assert wire.sent() == []


def test_fast_protect_boundaries(wire: Wire) -> None:
    """The last packet before each limit is the fast path's; the one that reaches it is Python's."""
    fp = wire.fast()
    sa = _out_sa(lifetime=Lifetime(hard_packets=3))
    fp.learn(KIND_FORWARD, 17, 0, CLEAR[12:24], core_of(sa), (), len(CLEAR))
    assert [fp.handle(HOOK_FORWARD, CLEAR) for _ in range(3)] == [NF_DROP, NF_DROP, None]
    sa.protect(CLEAR)  # what the pipeline does with the punted packet: the event fires there
    assert sa.state == DEAD and fp.handle(HOOK_FORWARD, CLEAR) is None

    fp.clear()
    sa = _out_sa(lifetime=Lifetime(soft_bytes=3 * len(CLEAR), hard_bytes=5 * len(CLEAR)))
    fp.learn(KIND_FORWARD, 17, 0, CLEAR[12:24], core_of(sa), (), len(CLEAR))
    assert [fp.handle(HOOK_FORWARD, CLEAR) for _ in range(3)] == [NF_DROP, NF_DROP, None]
    sa.protect(CLEAR)
    assert sa.state == DYING
    assert [fp.handle(HOOK_FORWARD, CLEAR) for _ in range(2)] == [NF_DROP, None]
    assert sa.counters.packets == 4

    fp.clear()
    sa = _out_sa(seq_start=M32 - 3)
    fp.learn(KIND_FORWARD, 17, 0, CLEAR[12:24], core_of(sa), (), len(CLEAR))
    assert [fp.handle(HOOK_FORWARD, CLEAR) for _ in range(3)] == [NF_DROP, NF_DROP, None]
    assert sa.seq == M32 - 1
    assert int.from_bytes(wire.sent()[-1][24:28], "big") == M32 - 1

    fp.clear()
    sa = _out_sa(lifetime=Lifetime(hard_seconds=1000))
    fp.learn(KIND_FORWARD, 17, 0, CLEAR[12:24], core_of(sa), (), len(CLEAR))
    assert fp.handle(HOOK_FORWARD, CLEAR) == NF_DROP
    sa.restore(seq=sa.seq, age=1000.5)  # as if 1000.5 s had passed
    assert fp.handle(HOOK_FORWARD, CLEAR) is None


@dataclass
class Inbound:
    rx: SecurityAssociation
    ref: SecurityAssociation
    tx: Crafter
    pol: PolicyCounters
    fp: FastPath


def _inbound(wire: Wire, mode: str, aead: str = "aes-gcm-128", **kw: Any) -> Inbound:
    rx, ref = make_sa(aead, mode, **kw), make_sa(aead, mode, **kw)
    tx = Crafter(aead, mode, esn=kw.get("esn", False))
    pol = PolicyCounters()
    fp = wire.fast()
    esp_pkt, clear = tx.valid(1)
    inner_flow = clear[12:24]
    assert fp.learn(KIND_INPUT_SA, 50, SPI, esp_pkt[12:20], core_of(rx), (), 0)
    assert fp.learn(KIND_INNER, 17, SPI, inner_flow, core_of(rx), (pol,), 0)
    return Inbound(rx, ref, tx, pol, fp)


@pytest.mark.parametrize("aead", AEADS)
def test_fast_unprotect_tunnel_writes_the_inner_packet_to_the_tun(wire: Wire, aead: str) -> None:
    t = _inbound(wire, "tunnel", aead, esn=True, seq_start=M32 - 2)
    for seq in (M32 - 1, M32, M32 + 5, M32 + 3):
        pkt, inner = t.tx.valid(seq)
        assert t.fp.handle(HOOK_INPUT, pkt) == NF_DROP
        assert wire.tun() == [inner]
        assert t.ref.unprotect(pkt) == inner
        assert sa_state(t.rx) == sa_state(t.ref)
    assert (t.pol.packets, t.pol.bytes) == (4, 4 * len(inner))
    assert t.fp.stats()["packets"] == 4 and wire.sent() == []


def test_fast_unprotect_tunnel_drops_tfc_padding(wire: Wire) -> None:
    t = _inbound(wire, "tunnel")
    _, inner = t.tx.valid(1)
    padded = t.tx.esp(1, trailer(inner + bytes(333), 4))
    assert t.fp.handle(HOOK_INPUT, padded) == NF_DROP
    assert wire.tun() == [inner]
    assert t.rx.counters.bytes == len(inner)


def test_fast_unprotect_transport_hands_back_the_cleartext(wire: Wire) -> None:
    t = _inbound(wire, "transport", "chacha20-poly1305")
    for seq in (1, 3, 2):
        pkt, clear = t.tx.valid(seq)
        got = t.fp.handle(HOOK_INPUT, pkt)
        assert got == (NF_ACCEPT, t.ref.unprotect(pkt)) == (NF_ACCEPT, clear)
        assert sa_state(t.rx) == sa_state(t.ref)
    assert wire.tun() == [] and wire.sent() == []
    assert (t.pol.packets, t.pol.bytes) == (3, 3 * len(clear))


INBOUND_PUNTS = ("replay", "bad-icv", "unknown-inner-flow", "wrong-inner-sa", "unknown-spi", "other-outer-src",
                 "ipv6-inner", "inner-options", "inner-fragment", "bad-padding", "dummy", "short-payload", "dead",
                 "packet-limit", "byte-limit", "disabled", "outer-options", "forward-hook")


@pytest.mark.parametrize("mode", ["tunnel", "transport"])
@pytest.mark.parametrize("case", INBOUND_PUNTS)
def test_fast_unprotect_punts_and_changes_nothing(wire: Wire, mode: str, case: str) -> None:
    t = _inbound(wire, mode)
    first, _ = t.tx.valid(1)
    assert t.fp.handle(HOOK_INPUT, first) is not None  # seq 1 accepted: now a replay
    wire.tun()
    tx = t.tx
    hook = HOOK_INPUT
    pkt, clear = tx.valid(2)
    if case == "replay":
        pkt = first
    elif case == "bad-icv":
        pkt = pkt[:-1] + bytes((pkt[-1] ^ 1,))
    elif case == "unknown-inner-flow":
        pkt, _ = tx.valid(2, sport=1001)
    elif case == "wrong-inner-sa":
        other = make_sa("aes-gcm-128", mode, spi=SPI + 1)
        t.fp.learn(KIND_INNER, 17, SPI, clear[12:24], core_of(other), (t.pol,), 0)
    elif case == "unknown-spi":
        pkt = Crafter("aes-gcm-128", mode, spi=SPI + 1).valid(2)[0]
    elif case == "other-outer-src":
        pkt = ip4("198.51.100.99", tx.dst, pkt[20:], proto=50)
    elif case == "ipv6-inner" and mode == "tunnel":
        pkt = tx.esp(2, trailer(ip6("2001:db8:1::1", "2001:db8:2::2", udp(1000, 53)), 41))
    elif case == "inner-options" and mode == "tunnel":
        pkt = tx.esp(2, trailer(ip4(*INNER, clear[20:], options=clear[20:24]), 4))
    elif case == "inner-fragment" and mode == "tunnel":
        pkt = tx.esp(2, trailer(ip4(*INNER, clear[20:], mf=True), 4))
    elif case == "bad-padding":
        pkt = tx.esp(2, trailer(clear if mode == "tunnel" else clear[20:], 4 if mode == "tunnel" else 17, b"\x02"))
    elif case == "dummy":
        pkt = tx.esp(2, trailer(b"", 59))
    elif case == "short-payload":
        pkt = tx.esp(2, trailer(b"\x0f\xa0", 17) if mode == "transport" else trailer(ip4(*INNER, b"1234"), 4))
    elif case == "dead":
        t.rx.expire(hard=True)
    elif case == "packet-limit":
        t.rx.counters.limit_packets = 2  # the next packet reaches it
    elif case == "byte-limit":
        t.rx.counters.limit_bytes = t.rx.counters.bytes + len(clear)
    elif case == "disabled":
        t.fp.enabled = False
    elif case == "outer-options":
        pkt = ip4(tx.src, tx.dst, pkt[20:], proto=50, options=b"\x01\x01\x01\x00")
    elif case == "forward-hook":
        hook = HOOK_FORWARD
    else:
        pytest.skip("tunnel mode only")
    before = (sa_state(t.rx), t.pol.as_dict(), t.fp.stats())
    assert t.fp.handle(hook, pkt) is None
    assert (sa_state(t.rx), t.pol.as_dict(), t.fp.stats()) == before
    assert wire.tun() == [] and wire.sent() == []


@pytest.mark.parametrize("mode", ["tunnel", "transport"])
def test_fast_unprotect_drops_replays_and_forgeries_with_on_drop(wire: Wire, mode: str) -> None:
    """With on_drop (the engine's counters.inc), replays and ICV failures are dropped in C and
    counted exactly as the Python path counts them; other failures are still punted."""
    t = _inbound(wire, mode)
    seen: list[str] = []
    t.fp.on_drop = seen.append
    pipe_counters = Counters()
    first, _ = t.tx.valid(1)
    assert t.fp.handle(HOOK_INPUT, first) is not None
    t.ref.unprotect(first)
    good, _ = t.tx.valid(2)
    forged = good[:-1] + bytes((good[-1] ^ 0x80,))
    for pkt in (first, forged, first):
        assert t.fp.handle(HOOK_INPUT, pkt) == NF_DROP
        with pytest.raises(Drop) as e:
            t.ref.unprotect(pkt)
        pipe_counters.inc(e.value.counter)
        assert sa_state(t.rx) == sa_state(t.ref)
    assert seen == [C.XFRM_IN_STATE_SEQ_ERROR, C.XFRM_IN_STATE_PROTO_ERROR, C.XFRM_IN_STATE_SEQ_ERROR]
    assert pipe_counters.snapshot() == {
        C.XFRM_IN_STATE_SEQ_ERROR: 2, C.XFRM_IN_STATE_PROTO_ERROR: 1}
    assert t.fp.stats()["dropped"] == 3
    assert t.fp.handle(HOOK_INPUT, good) is not None  # the forgery did not burn seq 2
    # a padding error is not one of those: Python's to count
    assert t.fp.handle(HOOK_INPUT, t.tx.esp(3, trailer(b"", 17, b"\x05"))) is None
    assert len(seen) == 3
    # a broken callback must not leave an exception behind
    t.fp.on_drop = lambda counter: 1 / 0
    assert t.fp.handle(HOOK_INPUT, first) == NF_DROP
    t.fp.on_drop = None
    assert t.fp.handle(HOOK_INPUT, first) is None


def test_fast_unprotect_counts_tun_errors(wire: Wire) -> None:
    rx = make_sa()
    tx = Crafter("aes-gcm-128", "tunnel")
    fp = FastPath(wire.raw.fileno(), wire.tun_r, TUN_IFINDEX)  # the pipe's read end: write() fails
    pkt, inner = tx.valid(1)
    fp.learn(KIND_INPUT_SA, 50, SPI, pkt[12:20], core_of(rx), (), 0)
    fp.learn(KIND_INNER, 17, SPI, inner[12:24], core_of(rx), (), 0)
    assert fp.handle(HOOK_INPUT, pkt) == NF_DROP
    assert fp.stats()["tun_errors"] == 1 and rx.counters.packets == 1


def test_nfqueue_takes_a_fast_path() -> None:
    """The binding's attribute (no queue is bound: the object is never initialised)."""
    from nfq_ipsec._nfqueue import NfQueue

    q = NfQueue.__new__(NfQueue)
    r, w = os.pipe()
    try:
        fp = FastPath(w, w, TUN_IFINDEX)
        refs = sys.getrefcount(fp)
        assert q.fastpath is None
        q.fastpath = fp
        assert sys.getrefcount(fp) == refs + 1
        assert q.fastpath is fp
        for bad in (object(), 0, CounterPair()):
            with pytest.raises(TypeError):
                q.fastpath = bad
        assert q.fastpath is fp
        q.fastpath = None
        assert sys.getrefcount(fp) == refs
        assert q.fastpath is None
    finally:
        os.close(r)
        os.close(w)


def test_learn_validates_and_clear_forgets(wire: Wire) -> None:
    fp = wire.fast()
    core = core_of(_out_sa())
    flow = CLEAR[12:24]
    for args in ((0, 17, 0, flow), (5, 17, 0, flow), (KIND_FORWARD, 256, 0, flow), (KIND_FORWARD, -1, 0, flow),
                 (KIND_FORWARD, 17, M32, flow), (KIND_FORWARD, 17, 0, flow[:11]), (KIND_INNER, 17, 0, flow + b"\0"),
                 (KIND_INPUT_SA, 50, 1, bytes(13))):
        with pytest.raises((ValueError, OverflowError)):
            fp.learn(*args, core, (), 1500)
    with pytest.raises(ValueError):
        fp.learn(KIND_FORWARD, 17, 0, flow, core, (PolicyCounters(),) * 3, 1500)
    with pytest.raises(TypeError):
        fp.learn(KIND_FORWARD, 17, 0, flow, core, (object(),), 1500)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        fp.learn(KIND_FORWARD, 17, 0, flow, object(), (), 1500)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        fp.learn(KIND_FORWARD, 17, 0, flow, core, [], 1500)  # type: ignore[arg-type]
    assert fp.stats()["flows"] == 0
    # references: one per entry, none left after clear(), none leaked by re-learning a key
    pol = PolicyCounters()
    refs = sys.getrefcount(core), sys.getrefcount(pol)
    assert fp.learn(KIND_FORWARD, 17, 0, flow, core, (pol, pol), 1500)
    assert fp.learn(KIND_FORWARD, 17, 0, flow, core, (pol,), 1500)
    assert fp.learn(KIND_OUTPUT, 17, 0, flow, core, (), 1500)
    assert fp.stats()["flows"] == 2
    assert (sys.getrefcount(core), sys.getrefcount(pol)) == (refs[0] + 2, refs[1] + 1)
    assert fp.handle(HOOK_FORWARD, CLEAR) == NF_DROP and pol.packets == 1  # the second learn() won
    fp.clear()
    assert (sys.getrefcount(core), sys.getrefcount(pol)) == refs
    assert fp.stats()["flows"] == 0
    assert fp.handle(HOOK_FORWARD, CLEAR) is None and fp.handle(HOOK_OUTPUT, CLEAR) is None
    assert fp.learn(KIND_OUTPUT, 17, 0, flow, core, (), 1500)
    assert fp.handle(HOOK_OUTPUT, CLEAR) == NF_DROP


def test_table_capacity(wire: Wire) -> None:
    fp = wire.fast()
    core = core_of(_out_sa())
    n = 0
    while fp.learn(KIND_FORWARD, 17, 0, struct.pack("!II", 0xC0000200, 0xC6336400) + struct.pack("!I", n), core,
                   (), 1500):
        n += 1
        assert n <= 1 << 20, "the table never fills up"
    assert fp.stats()["flows"] == n and fp.stats()["table_full"] == 1
    assert n >= 1024
    assert not fp.learn(KIND_OUTPUT, 17, 0, CLEAR[12:24], core, (), 1500)
    assert fp.stats()["table_full"] == 2
    # known keys are still updated, and found
    assert fp.learn(KIND_FORWARD, 17, 0, struct.pack("!III", 0xC0000200, 0xC6336400, n - 1), core, (), 1500)
    last = ip4("192.0.2.0", "198.51.100.0", struct.pack("!I", n - 1) + b"\0\x08\0\0")
    assert fp.handle(HOOK_FORWARD, last) == NF_DROP
    fp.clear()
    assert fp.stats()["flows"] == 0 and fp.learn(KIND_OUTPUT, 17, 0, CLEAR[12:24], core, (), 1500)


def test_handle_never_raises_on_junk(wire: Wire) -> None:
    rx, out = make_sa(), _out_sa()
    fp = wire.fast()
    pkt, inner = Crafter("aes-gcm-128", "tunnel").valid(1)
    fp.learn(KIND_INPUT_SA, 50, SPI, pkt[12:20], core_of(rx), (), 0)
    fp.learn(KIND_INNER, 17, SPI, inner[12:24], core_of(rx), (), 0)
    fp.learn(KIND_FORWARD, 17, 0, CLEAR[12:24], core_of(out), (), 1500)
    import random

    rnd = random.Random(7)
    for _ in range(3000):
        base = rnd.choice((pkt, CLEAR))
        junk = bytearray(base[: rnd.randint(0, len(base))])
        for _ in range(rnd.randint(0, 4)):
            if junk:
                junk[rnd.randrange(len(junk))] = rnd.randrange(256)
        if len(junk) >= 4 and rnd.random() < 0.5:
            junk[2:4] = struct.pack("!H", len(junk))
        for hook in (HOOK_INPUT, HOOK_FORWARD, HOOK_OUTPUT, 0, 99):
            v = fp.handle(hook, bytes(junk))
            assert v is None or v == NF_DROP or (isinstance(v, tuple) and v[0] == NF_ACCEPT)
    with pytest.raises(TypeError):
        fp.handle(HOOK_INPUT, "text")  # type: ignore[arg-type]


# == 5. pipeline hints ================================================================================

PIPE_CONFIG = """
[engine]
default_policy = "bypass"

[[sa]]
name = "t-out"
proto = "esp"
mode = "transport"
src = "192.0.2.1"
dst = "192.0.2.2"
spi = 0x1001
aead = "aes-gcm-128"
key = "0x0102030405060708090a0b0c0d0e0f1011121314"

[[sa]]
name = "t-in"
proto = "esp"
mode = "transport"
src = "192.0.2.2"
dst = "192.0.2.1"
spi = 0x1002
aead = "chacha20-poly1305"
key = "0x2122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f4041424344"

[[sa]]
name = "gw-out"
proto = "esp"
mode = "tunnel"
src = "203.0.113.1"
dst = "198.51.100.1"
spi = 0x2001
aead = "aes-gcm-256"
key = "0x9999999999999999999999999999999999999999999999999999999999999999aabbccdd"

[[sa]]
name = "gw-in"
proto = "esp"
mode = "tunnel"
src = "198.51.100.1"
dst = "203.0.113.1"
spi = 0x2002
aead = "aes-gcm-192"
key = "0x888888888888888888888888888888888888888888888888aabbccdd"

[[sa]]
name = "cbc-out"
proto = "esp"
mode = "tunnel"
src = "203.0.113.1"
dst = "198.51.100.2"
spi = 0x3001
enc = "aes-cbc-128"
enc_key = "0x2122232425262728292a2b2c2d2e2f30"
auth = "hmac-sha256-128"
auth_key = "0x3132333435363738393a3b3c3d3e3f404142434445464748494a4b4c4d4e4f50"

[[sa]]
name = "cbc-in"
proto = "esp"
mode = "tunnel"
src = "198.51.100.2"
dst = "203.0.113.1"
spi = 0x3002
enc = "aes-cbc-128"
enc_key = "0x5122232425262728292a2b2c2d2e2f30"
auth = "hmac-sha256-128"
auth_key = "0x6132333435363738393a3b3c3d3e3f404142434445464748494a4b4c4d4e4f50"

[[sa]]
name = "ah-out"
proto = "ah"
mode = "transport"
src = "192.0.2.1"
dst = "192.0.2.3"
spi = 0x4001
auth = "hmac-sha256-128"
auth_key = "0x7132333435363738393a3b3c3d3e3f404142434445464748494a4b4c4d4e4f50"

[[policy]]
name = "out-cbc"
dir = "out"
src = "192.0.2.0/25"
dst = "192.0.2.200/32"
action = "protect"
sa = "cbc-out"
priority = 10

[[policy]]
name = "fwd-cbc"
dir = "fwd"
src = "192.0.2.200/32"
dst = "192.0.2.0/25"
action = "protect"
sa = "cbc-in"
priority = 10

[[policy]]
name = "out-t"
dir = "out"
src = "192.0.2.1/32"
dst = "192.0.2.2/32"
action = "protect"
sa = "t-out"
priority = 50

[[policy]]
name = "in-t"
dir = "in"
src = "192.0.2.2/32"
dst = "192.0.2.1/32"
action = "protect"
sa = "t-in"
priority = 50

[[policy]]
name = "out-ah"
dir = "out"
src = "192.0.2.1/32"
dst = "192.0.2.3/32"
action = "protect"
sa = "ah-out"
priority = 50

[[policy]]
name = "out-net"
dir = "out"
src = "192.0.2.0/25"
dst = "192.0.2.128/25"
action = "protect"
sa = "gw-out"
priority = 100

[[policy]]
name = "out-net6"
dir = "out"
src = "2001:db8:1::/64"
dst = "2001:db8:2::/64"
action = "protect"
sa = "gw-out"
priority = 100

[[policy]]
name = "in-net"
dir = "in"
src = "192.0.2.128/25"
dst = "192.0.2.1/32"
action = "protect"
sa = "gw-in"
priority = 100

[[policy]]
name = "fwd-net"
dir = "fwd"
src = "192.0.2.128/25"
dst = "192.0.2.0/25"
action = "protect"
sa = "gw-in"
priority = 100

[[policy]]
name = "fwd-net6"
dir = "fwd"
src = "2001:db8:2::/64"
dst = "2001:db8:1::/64"
action = "protect"
sa = "gw-in"
priority = 100

[[policy]]
name = "out-back"
dir = "out"
src = "192.0.2.128/25"
dst = "192.0.2.64/26"
action = "bypass"
priority = 100
"""

LOCAL = {"192.0.2.1", "203.0.113.1"}


def peer(name: str) -> SecurityAssociation:
    """An independent copy of an SA (fresh state), as the other end holds it."""
    return next(s for s in parse_config(PIPE_CONFIG).sas if s.name == name)


@dataclass
class World:
    pipe: Pipeline
    mtu: dict[str, int]


def world(learn: bool = True, mtu: int = 1400) -> World:
    cfg = parse_config(PIPE_CONFIG)
    spd, sad = Spd(cfg.engine.default_actions()), Sad()
    for sa in cfg.sas:
        sad.add(sa)
    for p in cfg.policies:
        spd.add(p)
    box = {"mtu": mtu}
    pipe = Pipeline(spd, sad, Counters(), is_local=lambda fam, a: str(ipaddress.ip_address(a)) in LOCAL,
                    path_mtu=lambda fam, dst: box["mtu"])
    pipe.learn = learn
    return World(pipe, box)


def _hint(w: World, d: Decision, hook: int, pkt: bytes, sa: str, policies: tuple[str, ...], *, max_len: int = 0xFFFF,
          outer: bytes = b"") -> None:
    spd, sad = w.pipe.spd, w.pipe.sad
    assert d.hint == FlowHint(hook, pkt[9], pkt[12:24], sad.get(sa), tuple(spd.get(p) for p in policies), max_len,
                              outer)


def test_hint_for_protected_output_and_forward() -> None:
    w = world(mtu=1400)
    sad = w.pipe.sad
    pkt = ip4("192.0.2.1", "192.0.2.2", udp(1, 2, b"x" * 100))
    d = w.pipe.process(HOOK_OUTPUT, pkt)
    assert d.verdict == NF_DROP and d.sa == "t-out"
    _hint(w, d, HOOK_OUTPUT, pkt, "t-out", ("out-t",), max_len=inner_mtu_for(sad.get("t-out"), 1400, 20))
    fwd = ip4("192.0.2.10", "192.0.2.130", tcp(1234, 80, b"y" * 300), proto=6, df=True)
    for _ in range(2):  # the first decision, then the pipeline's own FORWARD flow cache
        d = w.pipe.process(HOOK_FORWARD, fwd)
        assert isinstance(d.actions[0], SendPacket)
        _hint(w, d, HOOK_FORWARD, fwd, "gw-out", ("out-net",), max_len=inner_mtu_for(sad.get("gw-out"), 1400, 20))
    w.mtu["mtu"] = 1000
    d = w.pipe.process(HOOK_FORWARD, fwd)
    _hint(w, d, HOOK_FORWARD, fwd, "gw-out", ("out-net",), max_len=inner_mtu_for(sad.get("gw-out"), 1000, 20))
    assert d.hint is not None and d.hint.max_len < 1000
    # output through the tunnel SA
    local = ip4("192.0.2.1", "192.0.2.131", udp(7, 9))
    d = w.pipe.process(HOOK_OUTPUT, local)
    _hint(w, d, HOOK_OUTPUT, local, "gw-out", ("out-net",), max_len=inner_mtu_for(sad.get("gw-out"), 1000, 20))


NO_HINT_OUT = {
    "icmp": (HOOK_OUTPUT, ip4("192.0.2.1", "192.0.2.2", b"\x08\0\0\0\0\0\0\0", proto=1), False),
    "ipv6": (HOOK_OUTPUT, ip6("2001:db8:1::1", "2001:db8:2::1", udp(1, 2)), False),
    "options": (HOOK_OUTPUT, ip4("192.0.2.1", "192.0.2.2", udp(1, 2), options=b"\x01\x01\x01\x00"), False),
    "fragment": (HOOK_FORWARD, ip4("192.0.2.10", "192.0.2.130", udp(1, 2, b"f" * 64), mf=True), False),
    "fragment-offset": (HOOK_FORWARD, ip4("192.0.2.10", "192.0.2.130", b"f" * 64, offset=10), False),
    "from-tun": (HOOK_FORWARD, ip4("192.0.2.10", "192.0.2.130", udp(1, 2)), True),
    "ah": (HOOK_OUTPUT, ip4("192.0.2.1", "192.0.2.3", udp(1, 2)), False),
    "cbc": (HOOK_FORWARD, ip4("192.0.2.10", "192.0.2.200", udp(1, 2)), False),
    "needs-fragmenting": (HOOK_FORWARD, ip4("192.0.2.10", "192.0.2.130", udp(1, 2, bytes(1450))), False),
    "bypass": (HOOK_OUTPUT, ip4("192.0.2.1", "192.0.2.77", udp(1, 2)), False),
}


@pytest.mark.parametrize("case", list(NO_HINT_OUT))
def test_no_hint_outbound(case: str) -> None:
    hook, pkt, from_tun = NO_HINT_OUT[case]
    w = world()
    for _ in range(2):
        d = w.pipe.process(hook, pkt, from_tun)
        assert d.hint is None
    assert d.verdict == (NF_ACCEPT if case == "bypass" else NF_DROP)
    if case != "bypass":
        assert any(isinstance(a, SendPacket) for a in d.actions), d  # protected all the same


def test_no_hint_when_learn_is_off() -> None:
    w = world(learn=False)
    t_in = peer("t-in")
    for hook, pkt in ((HOOK_OUTPUT, ip4("192.0.2.1", "192.0.2.2", udp(1, 2))),
                      (HOOK_FORWARD, ip4("192.0.2.10", "192.0.2.130", udp(1, 2))),
                      (HOOK_INPUT, t_in.protect(ip4("192.0.2.2", "192.0.2.1", udp(1, 2))))):
        d = w.pipe.process(hook, pkt)
        assert d.verdict in (NF_DROP, NF_ACCEPT) and d.sa is not None and d.hint is None


def test_hint_for_inbound_decryption() -> None:
    w = world()
    gw_in, t_in, cbc_in = peer("gw-in"), peer("t-in"), peer("cbc-in")
    # tunnel, inner packet for this host: the IN policy
    inner = ip4("192.0.2.130", "192.0.2.1", udp(53, 5353, b"answer"))
    esp_pkt = gw_in.protect(inner)
    d = w.pipe.process(HOOK_INPUT, esp_pkt)
    assert isinstance(d.actions[0], InjectTunnel) and d.actions[0].packet == inner
    _hint(w, d, HOOK_INPUT, inner, "gw-in", ("in-net",), outer=esp_pkt[12:20])
    # tunnel, forwarded: the fwd policy, and the out bypass policy that let it through
    inner = ip4("192.0.2.130", "192.0.2.70", tcp(443, 40000, b"page"), proto=6)
    esp_pkt = gw_in.protect(inner)
    d = w.pipe.process(HOOK_INPUT, esp_pkt)
    _hint(w, d, HOOK_INPUT, inner, "gw-in", ("fwd-net", "out-back"), outer=esp_pkt[12:20])
    # ... or the default bypass (no policy to count)
    inner = ip4("192.0.2.130", "192.0.2.10", tcp(443, 40000, b"page"), proto=6)
    esp_pkt = gw_in.protect(inner)
    d = w.pipe.process(HOOK_INPUT, esp_pkt)
    _hint(w, d, HOOK_INPUT, inner, "gw-in", ("fwd-net",), outer=esp_pkt[12:20])
    # transport: the flow of the cleartext packet handed back
    clear = ip4("192.0.2.2", "192.0.2.1", udp(9, 10, b"t"))
    esp_pkt = t_in.protect(clear)
    d = w.pipe.process(HOOK_INPUT, esp_pkt)
    assert (d.verdict, d.payload) == (NF_ACCEPT, clear)
    _hint(w, d, HOOK_INPUT, clear, "t-in", ("in-t",), outer=esp_pkt[12:20])
    # no hint: ICMP inside, IPv6 inside, inner options, outer options, an SA without core, a drop
    for pkt in (gw_in.protect(ip4("192.0.2.130", "192.0.2.1", b"\x08\0\0\0\0\0\0\0", proto=1)),
                gw_in.protect(ip6("2001:db8:2::1", "2001:db8:1::1", udp(1, 2))),
                gw_in.protect(ip4("192.0.2.130", "192.0.2.1", udp(1, 2), options=b"\x01\x01\x01\x00")),
                ip4("198.51.100.1", "203.0.113.1", gw_in.protect(ip4("192.0.2.130", "192.0.2.1", udp(1, 2)))[20:],
                    proto=50, options=b"\x01\x01\x01\x00"),
                cbc_in.protect(ip4("192.0.2.200", "192.0.2.10", udp(1, 2))),
                esp_pkt):
        d = w.pipe.process(HOOK_INPUT, pkt)
        assert d.hint is None and d.sa is not None, d
        assert d.reason != "" and (d.verdict == NF_DROP or d.payload is not None)


# == 6. fast == slow: the same traffic through Pipeline + FastPath and through the pipeline alone =====


class MiniEngine:
    """What Engine._on_packet does around the pipeline, with Engine's own _learn and _fast_sync:
    a FastPath first (if any), else the pipeline, its side effects recorded, its hints learnt."""

    _learn = Engine._learn
    _fast_sync = Engine._fast_sync

    def __init__(self, w: World, wire: Wire | None) -> None:
        self.pipeline = w.pipe
        self.spd, self.sad, self.counters = w.pipe.spd, w.pipe.sad, w.pipe.counters
        self.wire = wire
        self.fast = wire.fast() if wire is not None else None
        if self.fast is not None:
            self.fast.on_drop = self.counters.inc  # as Engine.start
        self.tracers: list[Any] = []
        self._fast_state = (-1, -1, False)

    def packet(self, hook: int, pkt: bytes, indev: int = 3) -> Result:
        if self.fast is not None:
            assert self.wire is not None
            v = self.fast.handle(hook, pkt, indev)
            if v is not None:
                verdict, payload = (v, None) if isinstance(v, int) else v
                return Result(verdict, payload, self.wire.sent(), self.wire.tun(), [], True)
        d = self.pipeline.process(hook, pkt, indev == TUN_IFINDEX)
        r = Result(d.verdict, d.payload, [], [], [], False)
        for a in d.actions:
            if isinstance(a, SendPacket):
                r.sent += a.packets
            elif isinstance(a, InjectTunnel):
                r.tun.append(a.packet)
            else:
                assert isinstance(a, SendIcmp)
                r.icmp.append(a.message)
        if d.hint is not None:
            self._learn(d.hint)
        return r


@dataclass
class Result:
    verdict: int
    payload: bytes | None
    sent: list[bytes]  # from the raw socket
    tun: list[bytes]  # written to the TUN device
    icmp: list[bytes]
    fast: bool  # handled in C


def _mask_ip_id(pkt: bytes) -> bytes:
    """Without the outer IP ID and checksum: the fast path and esp.py number packets separately."""
    return pkt[:4] + b"\0\0" + pkt[6:10] + b"\0\0" + pkt[12:]


def _same_outcome(i: int, got: Result, want: Result, rx_by_spi: dict[int, tuple[SecurityAssociation, ...]],
                  pkt: bytes) -> None:
    assert (got.verdict, got.payload, got.tun, got.icmp) == (want.verdict, want.payload, want.tun, want.icmp), i
    assert [_mask_ip_id(p) for p in got.sent] == [_mask_ip_id(p) for p in want.sent], i
    for a, b in zip(got.sent, want.sent, strict=True):
        assert a[20:28] == b[20:28], i  # SPI and sequence number (ESP follows a 20-byte header here)
        if not (a[6] & 0x3F or a[7]):  # (fragments: compared above, decrypted by nobody)
            rx_f, rx_s = rx_by_spi[int.from_bytes(a[20:24], "big")]
            assert rx_f.unprotect(a) == rx_s.unprotect(b) == pkt, i


def _traffic() -> list[tuple[int, bytes, int]]:
    """(hook, packet, indev): several flows both ways, with what must leave the fast path."""
    gw_in, t_in = peer("gw-in"), peer("t-in")
    seq: list[tuple[int, bytes, int]] = []
    sizes = itertools.cycle((0, 1, 100, 555, 1200, 77, 1300, 3))
    for i in range(12):
        n = next(sizes)
        seq.append((HOOK_OUTPUT, ip4("192.0.2.1", "192.0.2.2", udp(5000, 53, bytes(n)), df=True), 0))
        seq.append((HOOK_OUTPUT, ip4("192.0.2.1", "192.0.2.2", tcp(22, 40000 + i % 2, b"s" * n), proto=6, df=True), 0))
        seq.append((HOOK_FORWARD, ip4("192.0.2.10", "192.0.2.130", udp(4000, 4001, b"f" * n), df=True), 3))
        seq.append((HOOK_FORWARD, ip4("192.0.2.11", "192.0.2.131", tcp(80, 5000, b"g" * n), proto=6, df=i % 3 == 0), 3))
        seq.append((HOOK_INPUT, gw_in.protect(ip4("192.0.2.130", "192.0.2.1", udp(53, 5353, b"a" * n))), 2))
        seq.append((HOOK_INPUT, gw_in.protect(ip4("192.0.2.130", "192.0.2.70", tcp(443, 4000, b"b" * n), proto=6)), 2))
        seq.append((HOOK_INPUT, gw_in.protect(ip4("192.0.2.131", "192.0.2.10", tcp(443, 4001, b"c" * n), proto=6)), 2))
        seq.append((HOOK_INPUT, t_in.protect(ip4("192.0.2.2", "192.0.2.1", udp(53, 5000, b"d" * n))), 2))
        if i % 4 == 3:
            seq.append(seq[-1])  # a replay
            forged = bytearray(gw_in.protect(ip4("192.0.2.130", "192.0.2.1", udp(53, 5353, b"a" * n))))
            forged[-5] ^= 4
            seq.append((HOOK_INPUT, bytes(forged), 2))  # not authentic
            # the inner source is outside the SA's policies
            seq.append((HOOK_INPUT, gw_in.protect(ip4("203.0.113.66", "192.0.2.10", udp(1, 2))), 2))
            # a decrypted packet coming back out of the TUN device: FORWARD again, never learnt
            seq.append((HOOK_FORWARD, ip4("192.0.2.10", "192.0.2.130", udp(4000, 4001, b"f" * n)), TUN_IFINDEX))
            seq.append((HOOK_OUTPUT, ip4("192.0.2.1", "192.0.2.2", b"\x08\0\0\0\0\0\0\0", proto=1), 0))
            # beyond the path MTU after encapsulation: ICMP "too big" (DF) or fragments
            seq.append((HOOK_FORWARD, ip4("192.0.2.10", "192.0.2.130", udp(4000, 4001, bytes(1380)), df=True), 3))
            seq.append((HOOK_FORWARD, ip4("192.0.2.10", "192.0.2.130", udp(4000, 4001, bytes(1380))), 3))
    return seq


def test_fast_path_equals_the_pipeline(wire: Wire) -> None:
    fast, slow = MiniEngine(world(mtu=1400), wire), MiniEngine(world(learn=False, mtu=1400), None)
    # receivers of what both send, one per world (a sequence number opens once)
    rx_by_spi = {0x1001: (peer("t-out"), peer("t-out")), 0x2001: (peer("gw-out"), peer("gw-out"))}
    traffic = _traffic()
    handled = 0
    for i, (hook, pkt, indev) in enumerate(traffic):
        if i == len(traffic) // 2:
            # the SPD changes (control socket): a discard policy for a learnt flow; the engine
            # forgets its flows on the next _fast_sync
            for eng in (fast, slow):
                eng.spd.add(Policy(name="stop", dir=Direction.OUT, action=Action.DISCARD, priority=1,
                                   selector=Selector(src=ipaddress.ip_network("192.0.2.10/32"), proto=17)))
                eng._fast_sync()
        got, want = fast.packet(hook, pkt, indev), slow.packet(hook, pkt, indev)
        handled += got.fast
        _same_outcome(i, got, want, rx_by_spi, pkt)
    assert handled >= len(traffic) // 3, f"the fast path took only {handled} of {len(traffic)} packets"
    for name in ("t-out", "t-in", "gw-out", "gw-in"):
        assert sa_state(fast.sad.get(name)) == sa_state(slow.sad.get(name)), name
    for p in fast.spd.list():
        assert p.counters.as_dict() == slow.spd.get(p.name).counters.as_dict(), p.name
    assert fast.counters.snapshot() == slow.counters.snapshot()
    for name in (C.XFRM_IN_STATE_SEQ_ERROR, C.XFRM_IN_STATE_PROTO_ERROR, C.XFRM_IN_TMPL_MISMATCH, C.OUT_TOO_BIG,
                 C.FWD_POL_BLOCK):
        assert fast.counters.get(name), name
    assert fast.spd.get("stop").counters.packets > 0


def test_fast_path_equals_the_pipeline_across_lifetimes(wire: Wire) -> None:
    """Volume limits on learnt SAs: the packets that reach them take the Python path, whose events
    and state changes must be those of the pipeline alone, and so must every packet after."""
    cfg = PIPE_CONFIG
    for key, lifetime in (("9999aabbccdd", "soft_packets = 5\nhard_packets = 9"),
                          ("4041424344", "soft_bytes = 2000\nhard_bytes = 4000")):
        line = next(x for x in cfg.splitlines() if x.startswith("key =") and x.endswith(key + '"'))
        cfg = cfg.replace(line + "\n", f"{line}\n[sa.lifetime]\n{lifetime}\n")
    engines = []
    for learn in (True, False):
        parsed = parse_config(cfg)
        spd, sad = Spd(parsed.engine.default_actions()), Sad()
        for sa in parsed.sas:
            sad.add(sa)
        for p in parsed.policies:
            spd.add(p)
        pipe = Pipeline(spd, sad, Counters(), is_local=lambda fam, a: str(ipaddress.ip_address(a)) in LOCAL,
                        path_mtu=lambda fam, dst: 1500)
        pipe.learn = learn
        engines.append(MiniEngine(World(pipe, {"mtu": 1500}), wire if learn else None))
    fast, slow = engines
    assert fast.sad.get("gw-out").counters.limit_packets == 5 and fast.sad.get("t-in").counters.limit_bytes == 2000
    t_in = peer("t-in")  # the sender, without limits
    rx_by_spi = {0x2001: (peer("gw-out"), peer("gw-out"))}
    handled = 0
    for i in range(14):
        fwd = ip4("192.0.2.10", "192.0.2.130", udp(4000, 4001, b"f" * (100 + i)), df=True)
        esp_in = t_in.protect(ip4("192.0.2.2", "192.0.2.1", udp(53, 5000, b"d" * 300)))
        for hook, pkt in ((HOOK_FORWARD, fwd), (HOOK_INPUT, esp_in)):
            got, want = fast.packet(hook, pkt), slow.packet(hook, pkt)
            handled += got.fast
            _same_outcome(i, got, want, rx_by_spi, pkt)
            for name in ("gw-out", "t-in"):
                assert sa_state(fast.sad.get(name)) == sa_state(slow.sad.get(name)), (i, name)
    assert handled >= 10
    assert fast.sad.get("gw-out").state == DEAD and fast.sad.get("t-in").state == DEAD
    assert fast.counters.snapshot() == slow.counters.snapshot()
    assert fast.counters.get(C.XFRM_OUT_STATE_EXPIRED) and fast.counters.get(C.XFRM_IN_STATE_EXPIRED)


# -- misuse of the C types and re-entrant AEADs (found under ASan+UBSan with fuzz/fuzz_espcore.py) ----------


def test_uninitialised_objects_raise_instead_of_crashing(wire: Wire) -> None:
    pkt, _ = Crafter("aes-gcm-128", "tunnel").valid(1)
    bare = _espcore.EspCore.__new__(_espcore.EspCore)
    with pytest.raises(ValueError, match="not initialised"):
        bare.decap(pkt)
    with pytest.raises(ValueError, match="not initialised"):
        bare.encap(CLEAR, 1, 1)
    fp = FastPath.__new__(FastPath)
    with pytest.raises(ValueError, match="not initialised"):
        fp.learn(KIND_INPUT_SA, 50, SPI, pkt[12:20], core_of(make_sa()), (), 0)
    with pytest.raises(ValueError, match="not initialised"):
        fp.handle(HOOK_INPUT, pkt)
    with pytest.raises(ValueError, match="not initialised"):
        wire.fast().learn(KIND_INPUT_SA, 50, SPI, pkt[12:20], bare, (), 0)


def test_a_failed_reinit_leaves_the_core_working() -> None:
    sa = make_sa("aes-gcm-128", "tunnel")
    core = core_of(sa)
    with pytest.raises(AttributeError):
        core.__init__(object(), bytes(4), SPI, False, True, bytes(4), bytes(4), 0, sa.counters,  # type: ignore[misc]
                      sa.replay)
    pkt, inner = Crafter("aes-gcm-128", "tunnel").valid(1)
    assert core.decap(pkt) == inner


@pytest.mark.parametrize("bad", [{"spi": 2**64 + 5}, {"spi": 2**32}, {"tfc_pad": 2**32 + 1}, {"spi": -1}])
def test_out_of_range_integers_are_refused_not_wrapped(bad: dict[str, int]) -> None:
    sa = make_sa()
    args: dict[str, Any] = {"aead": AESGCM(bytes(16)), "salt": bytes(4), "spi": SPI, "esn": False, "tunnel": True,
                            "src": bytes(4), "dst": bytes(4), "tfc_pad": 0, "counters": sa.counters,
                            "replay": sa.replay, **bad}
    with pytest.raises((OverflowError, ValueError)):
        _espcore.EspCore(**args)


def test_learn_and_handle_refuse_out_of_range_integers(wire: Wire) -> None:
    fp, core = wire.fast(), core_of(make_sa())
    for spi, max_len in ((2**32, 0), (2**64, 0), (0, 2**64), (-1, 0)):
        with pytest.raises((OverflowError, ValueError)):
            fp.learn(KIND_INPUT_SA, 50, spi, bytes(8), core, (), max_len)
    with pytest.raises((OverflowError, ValueError)):
        fp.handle(HOOK_FORWARD, CLEAR, 2**32)
    assert fp.stats()["flows"] == 0


class ClearingAead:
    """An AEAD whose encrypt/decrypt empty the fast path's table mid-packet (cryptography's never
    call back into Python, but a wrapper could): the fast path must hold its own references."""

    def __init__(self, inner: Any, fp: FastPath) -> None:
        self.inner, self.fp = inner, fp

    def encrypt(self, *a: Any) -> bytes:
        self.fp.clear()
        return self.inner.encrypt(*a)  # type: ignore[no-any-return]

    def decrypt(self, *a: Any) -> bytes:
        self.fp.clear()
        return self.inner.decrypt(*a)  # type: ignore[no-any-return]


def test_an_aead_that_empties_the_table_mid_packet(wire: Wire) -> None:
    fp = wire.fast()
    # outbound: the table held the core's only reference; the packet still goes out, counted
    sa = _out_sa()
    core = _espcore.EspCore(ClearingAead(sa.transform.cipher, fp), sa.transform.nonce_salt, SPI, False, True,
                            sa.src_packed, sa.dst_packed, 0, sa.counters, sa.replay)
    assert fp.learn(KIND_FORWARD, 17, 0, CLEAR[12:24], core, (), len(CLEAR))
    del core
    assert fp.handle(HOOK_FORWARD, CLEAR) == NF_DROP
    assert fp.stats()["flows"] == 0 and sa.counters.packets == 1
    assert _decrypt_all(wire.sent()) == [CLEAR]
    # inbound: the inner flow is forgotten during decrypt(): punted, nothing committed
    rx = make_sa("aes-gcm-128", "tunnel")
    pkt, _ = Crafter("aes-gcm-128", "tunnel").valid(1)
    core = _espcore.EspCore(ClearingAead(rx.transform.cipher, fp), rx.transform.nonce_salt, SPI, False, True,
                            rx.src_packed, rx.dst_packed, 0, rx.counters, rx.replay)
    assert fp.learn(KIND_INPUT_SA, 50, SPI, pkt[12:20], core, (), 0)
    assert fp.learn(KIND_INNER, 17, SPI, Crafter("aes-gcm-128", "tunnel").valid(1)[1][12:24], core, (), 0)
    del core
    assert fp.handle(HOOK_INPUT, pkt) is None
    assert rx.replay.top == 0 and rx.counters.packets == 0 and wire.tun() == []
