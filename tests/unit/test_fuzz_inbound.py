"""Fuzzing the whole inbound path: parse → SAD → replay → ICV → decrypt → padding → next header →
inner policy check, through `Pipeline.process` exactly as the engine calls it.

The receiver (fuzz/corpus.py) has one SA per algorithm x mode x family (90 SAs, ESN on half).
Every decision goes through one oracle (`corpus.check`): nothing but `Drop` escapes the core
(the engine's catch-all counter stays 0), every drop counts exactly one named counter, and
whatever is delivered is exactly what the sender protected. After each bad packet a good one
must still be delivered. The atheris harness (fuzz/fuzz_inbound.py) uses the same oracle.
"""

from __future__ import annotations

import itertools
import random
import struct
from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz import corpus
from nfq_ipsec import counters as C
from nfq_ipsec.checksum import internet_checksum
from nfq_ipsec.pipeline import NF_ACCEPT, NF_DROP, AuditLog
from nfq_ipsec.sa import SecurityAssociation

TEXT, SPECS = corpus.build_config()
RX = corpus.make_receiver(TEXT)
TX = corpus.make_sender(TEXT)
_rng = random.Random(5)


def _good_packet_still_delivered() -> None:
    spec = _rng.choice(SPECS)
    pkt, inner = corpus.valid(TX[spec.name], spec, b"good packet in between")
    before = RX.counters.snapshot()
    d = RX.process(pkt)
    assert corpus.check(RX, before, pkt, d, frozenset(), inner) is None


def test_configuration_covers_every_algorithm_mode_and_family() -> None:
    sas = RX.sad.list()
    assert len(sas) == len(corpus.ALGORITHMS) * len(corpus.SHAPES) == 90
    assert {(sa.aead or sa.enc, sa.auth) for sa in sas if sa.proto == "esp"} >= {
        ("aes-gcm-128", None), ("aes-gcm-192", None), ("aes-gcm-256", None), ("chacha20-poly1305", None),
        ("aes-gmac-128", None), ("aes-gmac-192", None), ("aes-gmac-256", None), ("aes-cbc-128", "hmac-sha256-128"),
        ("aes-cbc-192", "hmac-sha384-192"), ("aes-cbc-256", "hmac-sha512-256"), ("null", "hmac-sha1-96")}
    assert {sa.icv_len for sa in sas if sa.aead and sa.aead.startswith("aes-gcm")} == {8, 12, 16}
    assert {(sa.mode, sa.family) for sa in sas} == {("transport", 4), ("transport", 6), ("tunnel", 4), ("tunnel", 6)}
    assert any(sa.esn for sa in sas) and not all(sa.esn for sa in sas)


def test_seed_corpus_every_packet_dropped_under_its_counter_good_traffic_unaffected() -> None:
    seen: Counter[str | None] = Counter()
    n = 0
    for seed in corpus.seeds(SPECS, TX):
        before = RX.counters.snapshot()
        d = RX.process(seed.data)
        try:
            seen[corpus.check(RX, before, seed.data, d, seed.expect, seed.inner or None)] += 1
        except AssertionError as e:
            raise AssertionError(f"seed {seed.name}: {e}") from None
        if seed.expect:
            _good_packet_still_delivered()
        n += 1
    assert n > 3000
    # every stage of the inbound path rejected something: the seeds reach all of them
    for name in (C.IN_MALFORMED, C.XFRM_IN_NO_STATES, C.XFRM_IN_HDR_ERROR, C.XFRM_IN_STATE_SEQ_ERROR,
                 C.XFRM_IN_STATE_PROTO_ERROR, C.IN_PADDING_ERROR, C.IN_DUMMY_PACKET, C.XFRM_IN_STATE_MODE_ERROR,
                 C.XFRM_IN_TMPL_MISMATCH):
        assert seen[name] > 0, (name, seen)
    assert seen[None] >= 90 * 5  # the valid packets of every SA were delivered
    assert RX.counters.get(C.ENGINE_ERROR) == 0
    # per-SA counters saw the same failures
    assert sum(sa.counters.integrity_failures for sa in RX.sad.list()) >= seen[C.XFRM_IN_STATE_PROTO_ERROR] // 2
    assert sum(sa.counters.replay_drops for sa in RX.sad.list()) >= 90


def _fix_lengths(buf: bytearray) -> None:
    """Make the IP length fields (and the IPv4 header checksum) agree with the buffer."""
    if len(buf) >= 20 and buf[0] >> 4 == 4:
        struct.pack_into("!H", buf, 2, min(len(buf), 0xFFFF))
        ihl = (buf[0] & 0x0F) * 4
        if 20 <= ihl <= len(buf):
            struct.pack_into("!H", buf, 10, 0)
            struct.pack_into("!H", buf, 10, internet_checksum(bytes(buf[:ihl])))
    elif len(buf) >= 40 and buf[0] >> 4 == 6:
        struct.pack_into("!H", buf, 4, min(len(buf) - 40, 0xFFFF))


_op = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 4095), st.integers(0, 7)),
    st.tuples(st.just("set"), st.integers(0, 4095), st.integers(0, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 4095)),
    st.tuples(st.just("extend"), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("insert"), st.integers(0, 4095), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), st.integers(0, 4095), st.integers(1, 16)),
    st.tuples(st.just("fixlen")),
)


def _mutate(pkt: bytes, ops: list[tuple]) -> bytes:  # type: ignore[type-arg]
    buf = bytearray(pkt)
    for op in ops:
        kind = op[0]
        if kind == "flip" and buf:
            buf[op[1] % len(buf)] ^= 1 << op[2]
        elif kind == "set" and buf:
            buf[op[1] % len(buf)] = op[2]
        elif kind == "truncate":
            del buf[op[1] % (len(buf) + 1):]
        elif kind == "extend":
            buf += op[1]
        elif kind == "insert":
            pos = op[1] % (len(buf) + 1)
            buf[pos:pos] = op[2]
        elif kind == "delete" and buf:
            pos = op[1] % len(buf)
            del buf[pos : pos + op[2]]
        elif kind == "fixlen":
            _fix_lengths(buf)
    return bytes(buf)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sa=st.integers(0, len(SPECS) - 1), payload=st.binary(max_size=200),
       ops=st.lists(_op, min_size=1, max_size=6))
def test_mutated_valid_packets(sa: int, payload: bytes, ops: list[tuple]) -> None:  # type: ignore[type-arg]
    """Every algorithm and mode: a genuine packet, then flipped/overwritten/cut/grown/shifted."""
    spec = SPECS[sa]
    pkt, inner = corpus.valid(TX[spec.name], spec, payload)
    bad = _mutate(pkt, ops)
    before = RX.counters.snapshot()
    d = RX.process(bad)
    corpus.check(RX, before, bad, d, None if bad != pkt else frozenset(), inner)
    _good_packet_still_delivered()


_spis = st.sampled_from([sa.spi for sa in RX.sad.list()] + [0, 1, 255, 256, 0xFFFFFFFF])
_v4_addr = st.sampled_from([b"\xc0\x00\x02\x01", b"\xc6\x33\x64\x01", b"\xc6\x33\x64\x2d", b"\xcb\x00\x71\x07"])
_v6_addr = st.sampled_from([bytes.fromhex("20010db8" + "0" * 23 + "1"), bytes.fromhex("20010db80002" + "0" * 19 + "1"),
                            bytes.fromhex("20010db80002" + "0" * 18 + "2d")])


@st.composite
def _ipsec_garbage(draw: st.DrawFn) -> bytes:
    """An IPv4/IPv6 header that parses, naming ESP/AH (maybe via extension headers), then junk."""
    proto = draw(st.sampled_from([50, 51]))
    spi = draw(_spis)
    seq = draw(st.integers(0, 0xFFFFFFFF))
    if proto == 50:
        body = struct.pack("!II", spi, seq)
    else:
        body = bytes((draw(st.integers(0, 255)), draw(st.integers(0, 255)), 0, 0)) + struct.pack("!II", spi, seq)
    body += draw(st.binary(max_size=300))
    if draw(st.booleans()):
        src, dst = draw(_v4_addr), draw(_v4_addr)
        from nfq_ipsec.packet import ipv4_header

        return ipv4_header(src, dst, proto, len(body), df=draw(st.booleans())) + body
    from nfq_ipsec.packet import ipv6_header

    exts = draw(st.lists(st.sampled_from([0, 43, 60, 44]), max_size=4))
    chain = b""
    nhs = [*exts[1:], proto]
    for kind, nh in zip(exts, nhs, strict=False):
        chain += struct.pack("!BBHI", nh, 0, 0, 0) if kind == 44 else bytes((nh, 0)) + bytes(6)
    first = exts[0] if exts else proto
    return ipv6_header(draw(_v6_addr), draw(_v6_addr), first, len(chain) + len(body)) + chain + body


@settings(max_examples=300, deadline=None)
@given(data=st.one_of(st.binary(max_size=120), _ipsec_garbage()))
def test_garbage_never_escapes(data: bytes) -> None:
    before = RX.counters.snapshot()
    d = RX.process(data)
    corpus.check(RX, before, data, d, None)
    _good_packet_still_delivered()


def test_packet_of_one_sa_under_anothers_spi_fails_its_icv() -> None:
    """Every pair of same-shape SAs: the receiver finds the other SA, whose key cannot verify it."""
    by_shape: dict[tuple[str, str, int, int], list[corpus.SaSpec]] = {}
    for s in SPECS:
        by_shape.setdefault((s.proto, s.mode, s.outer, s.inner), []).append(s)
    RX.reset_replay()  # so that no packet is stopped by the other SA's replay window before its ICV
    checked = total = 0
    for group in by_shape.values():
        for a, b in itertools.pairwise(group):
            pkt, _ = corpus.valid(TX[a.name], a, b"cross")
            buf = bytearray(pkt)
            rx_b = RX.sad.get(b.name)
            assert rx_b is not None
            # point the packet at b: b's SPI, and b's peer as source (SAD lookup is SPI + dst + src)
            hl = 20 if a.outer == 4 else 40
            off = hl if a.proto == "esp" else hl + 4
            struct.pack_into("!I", buf, off, rx_b.spi)
            if a.outer == 4:
                buf[12:16] = rx_b.src_packed
                _fix_lengths(buf)
            else:
                buf[8:24] = rx_b.src_packed
            before = RX.counters.snapshot()
            c = rx_b.counters
            fails = c.integrity_failures + c.format_errors
            d = RX.process(bytes(buf))
            name = corpus.check(RX, before, bytes(buf), d, frozenset({C.XFRM_IN_STATE_PROTO_ERROR,
                                                                      C.XFRM_IN_HDR_ERROR}))
            total += 1
            if name == C.XFRM_IN_STATE_PROTO_ERROR:  # ICV mismatch (AH: or an ICV of the wrong length)
                assert c.integrity_failures + c.format_errors == fails + 1
                checked += 1
    assert total == sum(len(g) - 1 for g in by_shape.values()) == 78
    assert checked >= 60  # the rest: a length that cannot be the other SA's (XfrmInHdrError)


def test_audit_lines_rate_limited_and_summarised_under_flood() -> None:
    """10,000 unknown-SPI packets in one (fake) second: a handful of lines, then a summary."""
    now = [1000.0]
    lines: list[str] = []
    audit = AuditLog(lines.append, rate=5.0, burst=10, clock=lambda: now[0])
    rx = corpus.make_receiver(TEXT)
    rx.pipeline.audit = audit
    from nfq_ipsec.packet import ipv4_header

    body = struct.pack("!II", 0xDEAD0000, 1) + bytes(40)
    pkt = ipv4_header(b"\xc6\x33\x64\x63", b"\xc0\x00\x02\x01", 50, len(body)) + body
    for _ in range(10_000):
        rx.process(pkt)
    assert rx.counters.get(C.XFRM_IN_NO_STATES) == 10_000
    assert len(lines) == 10, lines[:3]
    assert audit.suppressed == 9_990
    now[0] += 1.0  # a second later the next line says how many were held back
    rx.process(pkt)
    assert lines[10] == "9990 audit lines suppressed (rate limit)"
    assert "spi=0xdead0000" in lines[11]


@pytest.mark.parametrize("shape", [0])  # aes-gcm-128 transport v4
def test_rejecting_bad_packets_costs_no_more_than_accepting_good_ones(shape: int,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A flood of unknown-SPI or bad-ICV packets slows good ones by no more than their rejection
    costs. Counted, not timed (timings on shared machines are noise; bench/ measures speed): an
    unknown SPI never reaches the crypto, a bad ICV costs exactly one AEAD check (as a good packet
    does), nothing is logged per packet, and good packets interleaved with the flood all pass."""
    text, specs = corpus.build_config()
    spec = specs[shape]
    rx = corpus.make_receiver(text)
    lines: list[str] = []
    now = [1000.0]
    rx.pipeline.audit = AuditLog(lines.append, clock=lambda: now[0])  # the engine's limiter: 5/s, burst 10
    tx = corpus.make_sender(text)[spec.name]
    rx_sa = rx.sad.get(spec.name)
    assert rx_sa is not None
    t = rx_sa.transform
    calls = {"aead": 0}
    real_open = type(t).open

    class CountingAead:  # the SA's AEAD object as its C core calls it
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def encrypt(self, *a: Any) -> bytes:
            return self.inner.encrypt(*a)  # type: ignore[no-any-return]

        def decrypt(self, *a: Any) -> bytes:
            calls["aead"] += 1
            return self.inner.decrypt(*a)  # type: ignore[no-any-return]

    def counting_open(*a, **kw):  # type: ignore[no-untyped-def]
        calls["aead"] += 1
        return real_open(*a, **kw)

    if t.cipher is not None:
        monkeypatch.setattr(t, "cipher", CountingAead(t.cipher))
        rx_sa.core = rx_sa._make_core()
        assert rx_sa.core is not None
    monkeypatch.setattr(type(t), "open", counting_open)
    good = [corpus.valid(tx, spec, bytes(500))[0] for _ in range(300)]
    bad_icv, unknown = [], []
    for p in good:
        b = bytearray(p)
        b[-1] ^= 1
        bad_icv.append(bytes(b))
        b = bytearray(p)
        struct.pack_into("!I", b, 20, 0xDEAD0000)
        unknown.append(bytes(b))
    for p in unknown:
        assert rx.process(p).verdict == NF_DROP
    assert calls["aead"] == 0, "an unknown SPI must be rejected before any cryptography"
    for p in bad_icv:
        assert rx.process(p).verdict == NF_DROP
    assert calls["aead"] == len(bad_icv), "a bad ICV costs exactly one AEAD check"
    # good packets interleaved with the flood (each good packet is new: the replay window is on)
    accepted = 0
    for g, b, u in zip(good, bad_icv, unknown, strict=True):
        accepted += rx.process(b).verdict == NF_ACCEPT
        accepted += rx.process(g).verdict == NF_ACCEPT
        accepted += rx.process(u).verdict == NF_ACCEPT
    assert accepted == len(good)
    # 1,200 rejections within one (frozen) second: the burst of 10 lines, nothing per packet
    assert len(lines) <= 10, len(lines)


def test_suppressed_audit_lines_are_not_even_formatted(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rate-limited audit lines must cost nothing when suppressed: count the address formatting."""
    from nfq_ipsec import pipeline as P
    from nfq_ipsec.packet import ipv4_header

    calls = 0
    real = P._addr_str

    def counting(family: int, raw: bytes) -> str:
        nonlocal calls
        calls += 1
        return real(family, raw)

    monkeypatch.setattr(P, "_addr_str", counting)
    now = [0.0]
    lines: list[str] = []
    rx = corpus.make_receiver(TEXT)
    rx.pipeline.audit = AuditLog(lines.append, rate=5.0, burst=10, clock=lambda: now[0])
    tx = corpus.make_sender(TEXT)
    spec = SPECS[2]  # tunnel 4-in-4: decrypts fine, inner packet outside the policy below
    body = struct.pack("!II", 0xDEAD0000, 1) + bytes(40)
    unknown_spi = ipv4_header(b"\xc6\x33\x64\x63", b"\xc0\x00\x02\x01", 50, len(body)) + body
    cleartext = corpus.udp_packet(SPECS[0].peer, SPECS[0].local, b"clear")  # matches an in protect policy
    for _ in range(1000):
        rx.process(unknown_spi)
        rx.process(cleartext)
        rx.process(_outside_policy(tx, spec))
    assert rx.counters.get(C.XFRM_IN_NO_STATES) == 1000
    assert rx.counters.get(C.IN_CLEARTEXT_PROTECTED) == 1000
    assert rx.counters.get(C.XFRM_IN_TMPL_MISMATCH) == 1000
    assert len(lines) == 10
    assert calls <= 2 * 2 * len(lines), f"{calls} addresses formatted for {len(lines)} audit lines"


def _outside_policy(tx: dict[str, SecurityAssociation], spec: corpus.SaSpec) -> bytes:
    """A genuine tunnel packet of `spec`'s SA whose inner source is outside its policy."""
    inner = corpus.udp_packet("203.0.113.250", spec.local, b"outside the policy")
    return tx[spec.name].protect(inner)
