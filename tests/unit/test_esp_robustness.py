"""ESP under attack and misuse: every bit flip, every truncation, bogus padding with a valid ICV,
dummy packets, replays, garbage. Whatever arrives, decapsulate raises Drop (never anything
else) and counts it in exactly one SA counter; nothing forged moves the replay window.

Both code paths are exercised: the inline fast path (IPv4 without options, transport or tunnel,
AES-GCM-16 / ChaCha20-Poly1305) and the general one (everything else).
"""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrHopByHop, IPv6ExtHdrRouting
from scapy.packet import Packet, Raw

from nfq_ipsec import counters, esp
from nfq_ipsec.errors import Drop
from nfq_ipsec.sa import SecurityAssociation

V4 = ("192.0.2.1", "192.0.2.2")
V6 = ("2001:db8::1", "2001:db8::2")
SPI = 0x01000001


def key(n: int) -> bytes:
    return bytes((0x30 + 11 * i) & 0xFF for i in range(n))


ALGS: dict[str, dict[str, Any]] = {
    "gcm128": {"aead": "aes-gcm-128", "key": key(20)},
    "gcm256-icv8": {"aead": "aes-gcm-256", "key": key(36), "icv_len": 8},
    "gcm192-icv12": {"aead": "aes-gcm-192", "key": key(28), "icv_len": 12},
    "chacha": {"aead": "chacha20-poly1305", "key": key(36)},
    "gmac": {"aead": "aes-gmac-128", "key": key(20)},
    "cbc-sha1": {"enc": "aes-cbc-128", "enc_key": key(16), "auth": "hmac-sha1-96", "auth_key": key(20)},
    "cbc-sha512": {"enc": "aes-cbc-256", "enc_key": key(32), "auth": "hmac-sha512-256", "auth_key": key(64)},
    "null-sha256": {"enc": "null", "auth": "hmac-sha256-128", "auth_key": key(32)},
}
# (mode, SA family, inner family or None, IPv4 options / IPv6 extension headers)
LAYOUTS = {
    "transport4": ("transport", 4, None, False),
    "transport4-options": ("transport", 4, None, True),
    "transport6-ext": ("transport", 6, None, True),
    "tunnel4": ("tunnel", 4, 4, False),
    "tunnel6": ("tunnel", 6, 6, False),
    "tunnel4in6": ("tunnel", 6, 4, False),
    "tunnel6in4": ("tunnel", 4, 6, False),
}


def make_sa(alg: str, layout: str, **kw: Any) -> SecurityAssociation:
    mode, family, _, _ = LAYOUTS[layout]
    src, dst = V4 if family == 4 else V6
    args: dict[str, Any] = {"replay_window": 64, **ALGS[alg], **kw}
    return SecurityAssociation(name="r", proto="esp", mode=mode, src=src, dst=dst, spi=SPI, **args)


def clear_packet(layout: str, payload: bytes = b"hi", *, tos: int = 0, df: bool = False) -> bytes:
    mode, family, inner, extras = LAYOUTS[layout]
    fam = inner or family
    src, dst = (V4 if fam == 4 else V6) if mode == "transport" else (
        ("198.51.100.1", "203.0.113.1") if fam == 4 else ("2001:db8:5::1", "2001:db8:6::1"))
    ip: Packet
    if fam == 4:
        ip = IP(src=src, dst=dst, tos=tos, flags="DF" if df else 0, options=b"\x01\x01\x01\x00" if extras else b"")
    else:
        ip = IPv6(src=src, dst=dst, tc=tos)
        if extras:
            ip = ip / IPv6ExtHdrHopByHop() / IPv6ExtHdrRouting(addresses=[dst]) / IPv6ExtHdrDestOpt()
    return bytes(ip / UDP(sport=1000, dport=2000) / Raw(payload))


def sa_counter_total(sa: SecurityAssociation) -> int:
    c = sa.counters
    return c.replay_drops + c.integrity_failures + c.format_errors


def esp_offset(packet: bytes) -> int:
    if packet[0] >> 4 == 4:
        return (packet[0] & 0x0F) * 4
    off, nh = 40, packet[6]
    while nh != 50:
        nh, off = packet[off], off + (packet[off + 1] + 1) * 8
    return off


CASES = [(a, lay) for a in ALGS for lay in LAYOUTS]
CASE_IDS = [f"{a}-{lay}" for a, lay in CASES]


# -- bit flips and truncations ------------------------------------------------------------------------


@pytest.mark.parametrize("alg,layout", CASES, ids=CASE_IDS)
def test_every_bit_flip_in_the_esp_part_is_rejected(alg: str, layout: str) -> None:
    clear = clear_packet(layout, b"")
    protected = esp.encapsulate(make_sa(alg, layout), clear, 5)
    receiver = make_sa(alg, layout)
    start = esp_offset(protected)
    for bit in range(start * 8, len(protected) * 8):
        flipped = bytearray(protected)
        flipped[bit // 8] ^= 0x80 >> (bit % 8)
        before = sa_counter_total(receiver)
        with pytest.raises(Drop):
            esp.decapsulate(receiver, bytes(flipped))
        assert sa_counter_total(receiver) == before + 1, bit
    assert receiver.replay.top == 0  # nothing forged moved the window
    assert esp.decapsulate(receiver, protected) == clear


@pytest.mark.parametrize("alg,layout", [*CASES[::3], ("gcm128", "transport4"), ("chacha", "tunnel4")],
                         ids=[*CASE_IDS[::3], "gcm128-transport4", "chacha-tunnel4"])
def test_ip_header_bit_flips_never_crash(alg: str, layout: str) -> None:
    protected = esp.encapsulate(make_sa(alg, layout), clear_packet(layout), 9)
    for bit in range(esp_offset(protected) * 8):
        flipped = bytearray(protected)
        flipped[bit // 8] ^= 0x80 >> (bit % 8)
        try:
            out = esp.decapsulate(make_sa(alg, layout), bytes(flipped))
        except Drop:
            continue
        assert isinstance(out, bytes)  # e.g. a flipped TTL or source address is not ESP's business


@pytest.mark.parametrize("alg,layout", CASES, ids=CASE_IDS)
def test_every_truncation_is_rejected(alg: str, layout: str) -> None:
    protected = esp.encapsulate(make_sa(alg, layout), clear_packet(layout, b"abc"), 1)
    receiver = make_sa(alg, layout)
    for cut in range(len(protected)):
        short = bytearray(protected[:cut])
        with pytest.raises(Drop):
            esp.decapsulate(receiver, bytes(short))
        # the same, with the IP length fields made consistent with the cut
        if cut >= 40 or (cut >= 20 and protected[0] >> 4 == 4):
            if protected[0] >> 4 == 4:
                struct.pack_into("!H", short, 2, cut)
            else:
                struct.pack_into("!H", short, 4, cut - 40)
            with pytest.raises(Drop):
                esp.decapsulate(receiver, bytes(short))
    assert receiver.replay.top == 0
    assert receiver.counters.packets == 0 and sa_counter_total(receiver) > 0


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(alg=st.sampled_from(sorted(ALGS)), layout=st.sampled_from(sorted(LAYOUTS)), body=st.binary(max_size=200),
       seq=st.integers(0, 0xFFFFFFFF))
def test_random_esp_bodies_raise_only_drop(alg: str, layout: str, body: bytes, seq: int) -> None:
    sa = make_sa(alg, layout)
    for head in (IP(src=V4[0], dst=V4[1], proto=50), IPv6(src=V6[0], dst=V6[1], nh=50)):
        packet = bytes(head / Raw(struct.pack("!II", SPI, seq) + body))
        with pytest.raises(Drop):
            esp.decapsulate(sa, packet)
        with pytest.raises(Drop):
            esp.decapsulate(sa, body)


# -- crafted packets with a valid ICV -------------------------------------------------------------------


def craft(sa: SecurityAssociation, padded_plaintext: bytes, seq: int) -> bytes:
    """An ESP packet around any plaintext trailer, with a correct ICV (bypassing our padding)."""
    t = sa.transform
    esp_header = struct.pack("!II", sa.spi, seq & 0xFFFFFFFF)
    seq_hi = struct.pack("!I", seq >> 32) if sa.esn else b""
    esp_len = t.overhead + len(padded_plaintext)
    if sa.family == 4:
        prefix = bytes(IP(src=sa.src.compressed, dst=sa.dst.compressed, proto=50, len=20 + esp_len))
    else:
        prefix = bytes(IPv6(src=sa.src.compressed, dst=sa.dst.compressed, nh=50, plen=esp_len))
    return t.seal(prefix, esp_header, seq_hi, None, padded_plaintext, seq)


PAD_CASES = [("gcm128", "transport4"), ("chacha", "tunnel4"), ("gcm128", "transport6-ext"),
             ("gmac", "transport4"), ("cbc-sha1", "transport4"), ("null-sha256", "tunnel6")]


def payload_for(layout: str) -> tuple[bytes, int]:
    """A payload and its next header, as transport/tunnel mode would carry them."""
    if LAYOUTS[layout][0] == "tunnel":
        packet = clear_packet(layout, b"x" * 5)
        return packet, 4 if packet[0] >> 4 == 4 else 41
    return bytes(UDP(sport=1, dport=2) / Raw(b"x" * 5)), 17


def pad_to_block(sa: SecurityAssociation, data: bytes, trailer: bytes) -> bytes:
    block = sa.transform.block_size
    filler = -(len(data) + len(trailer)) % block
    return data + bytes(filler) + trailer if filler and block > 4 else data + trailer


@pytest.mark.parametrize("alg,layout", PAD_CASES)
def test_bogus_padding_with_a_valid_icv_is_a_padding_error(alg: str, layout: str) -> None:
    payload, nh = payload_for(layout)
    block = make_sa(alg, layout).transform.block_size
    for n, bad_padding in enumerate((b"\x01\x03", b"\x00", b"\x02\x01"), start=1):
        sa = make_sa(alg, layout)
        trailer = bad_padding + bytes((len(bad_padding), nh))
        filler = bytes(-(len(payload) + len(trailer)) % block)  # whole cipher blocks, before the padding
        with pytest.raises(Drop) as exc:
            esp.decapsulate(sa, craft(sa, payload + filler + trailer, n))
        assert exc.value.counter == counters.IN_PADDING_ERROR
        assert sa.counters.format_errors == 1 and sa.replay.top == n  # authentic, so the window moved
    # pad length beyond the plaintext
    sa = make_sa(alg, layout)
    with pytest.raises(Drop) as exc:
        esp.decapsulate(sa, craft(sa, pad_to_block(sa, b"", bytes((200, nh))), 1))
    assert exc.value.counter == counters.IN_PADDING_ERROR


@pytest.mark.parametrize("alg,layout", PAD_CASES)
def test_longer_valid_padding_is_accepted(alg: str, layout: str) -> None:
    """RFC 4303 §2.4 allows up to 255 padding bytes (traffic-analysis hiding)."""
    payload, nh = payload_for(layout)
    sa = make_sa(alg, layout)
    block = sa.transform.block_size
    padlen = 0
    while (len(payload) + padlen + 2) % block or padlen < 100:
        padlen += 1
    plaintext = payload + bytes(range(1, padlen + 1)) + bytes((padlen, nh))
    out = esp.decapsulate(sa, craft(sa, plaintext, 3))
    assert out.endswith(payload) if LAYOUTS[layout][0] == "transport" else out == payload


@pytest.mark.parametrize("alg,layout", PAD_CASES)
def test_dummy_packets_are_dropped_and_counted(alg: str, layout: str) -> None:
    sa = make_sa(alg, layout)
    plaintext = pad_to_block(sa, b"random filler", b"\x01\x02\x02\x3b")
    with pytest.raises(Drop) as exc:
        esp.decapsulate(sa, craft(sa, plaintext, 7))
    assert exc.value.counter == counters.IN_DUMMY_PACKET
    assert sa.replay.top == 7 and sa_counter_total(sa) == 0


@pytest.mark.parametrize("alg", ["gcm128", "cbc-sha1"])
def test_tunnel_mode_checks_the_inner_packet(alg: str) -> None:
    sa = make_sa(alg, "tunnel4")
    udp = bytes(UDP(sport=1, dport=2) / Raw(b"not an IP packet"))
    with pytest.raises(Drop) as exc:
        esp.decapsulate(sa, craft(sa, pad_to_block(sa, udp, b"\x01\x02\x02\x11"), 1))
    assert exc.value.counter == counters.XFRM_IN_STATE_MODE_ERROR
    inner = clear_packet("tunnel4")
    lying = inner[:2] + struct.pack("!H", len(inner) + 40) + inner[4:]
    for nh, body in ((4, lying), (41, inner), (4, inner[:10])):
        sa = make_sa(alg, "tunnel4")
        with pytest.raises(Drop) as exc:
            esp.decapsulate(sa, craft(sa, pad_to_block(sa, body, bytes((0, nh))), 1))
        assert exc.value.counter == counters.XFRM_IN_STATE_MODE_ERROR
        assert sa.counters.format_errors == 1


# -- replay, SPI, family ------------------------------------------------------------------------------------


@pytest.mark.parametrize("alg,layout", [("gcm128", "transport4"), ("cbc-sha1", "tunnel6"), ("gmac", "tunnel4")])
def test_replays_and_stale_packets(alg: str, layout: str) -> None:
    sender, receiver = make_sa(alg, layout), make_sa(alg, layout)
    clear = clear_packet(layout)
    packets = [esp.encapsulate(sender, clear, s) for s in range(1, 101)]
    assert esp.decapsulate(receiver, packets[99]) == clear
    for stale in (packets[99], packets[0], packets[20]):
        with pytest.raises(Drop) as exc:
            esp.decapsulate(receiver, stale)
        assert exc.value.counter == counters.XFRM_IN_STATE_SEQ_ERROR
    assert receiver.counters.replay_drops == 3
    assert esp.decapsulate(receiver, packets[50]) == clear  # inside the 64-packet window, unseen
    forged = bytearray(esp.encapsulate(sender, clear, 1000))
    forged[-1] ^= 1
    with pytest.raises(Drop) as exc:
        esp.decapsulate(receiver, bytes(forged))
    assert exc.value.counter == counters.XFRM_IN_STATE_PROTO_ERROR
    assert receiver.replay.top == 100 and receiver.counters.integrity_failures == 1


def test_sequence_number_zero_is_refused() -> None:
    sa = make_sa("gcm128", "transport4")
    with pytest.raises(Drop) as exc:
        esp.decapsulate(sa, esp.encapsulate(make_sa("gcm128", "transport4"), clear_packet("transport4"), 0))
    assert exc.value.counter == counters.XFRM_IN_STATE_SEQ_ERROR


@pytest.mark.parametrize("alg,layout", [("gcm128", "transport4"), ("cbc-sha1", "transport6-ext")])
def test_wrong_spi_and_wrong_family(alg: str, layout: str) -> None:
    packet = esp.encapsulate(make_sa(alg, layout), clear_packet(layout), 1)
    other = make_sa(alg, layout)
    mode, family, _, _ = LAYOUTS[layout]
    src, dst = V4 if family == 4 else V6
    wrong_spi = SecurityAssociation(name="w", proto="esp", mode=mode, src=src, dst=dst, spi=SPI + 1, **ALGS[alg])
    with pytest.raises(Drop) as exc:
        esp.decapsulate(wrong_spi, packet)
    assert exc.value.counter == counters.XFRM_IN_NO_STATES
    other_family = make_sa(alg, "tunnel6" if family == 4 else "tunnel4")
    with pytest.raises(Drop) as exc:
        esp.decapsulate(other_family, packet)
    assert exc.value.counter == counters.XFRM_IN_NO_STATES
    assert esp.decapsulate(other, packet) == clear_packet(layout)


@pytest.mark.parametrize("alg", ["gcm128", "cbc-sha512", "chacha"])
def test_esn_across_the_32_bit_boundary(alg: str) -> None:
    sender = make_sa("gcm128" if alg == "gcm128" else alg, "transport4", esn=True)
    receiver = make_sa(alg, "transport4", esn=True, seq_start=(1 << 32) - 3)
    clear = clear_packet("transport4")
    for seq in ((1 << 32) - 2, (1 << 32) - 1, 1 << 32, (1 << 32) + 1, (1 << 32) + 5):
        packet = esp.encapsulate(sender, clear, seq)
        assert packet[24:28] == struct.pack("!I", seq & 0xFFFFFFFF)  # only the low half travels
        assert esp.decapsulate(receiver, packet) == clear
    assert receiver.replay.top == (1 << 32) + 5
    # the same bytes are rejected by a receiver assuming another high half
    wrong = make_sa(alg, "transport4", esn=True, seq_start=(3 << 32) - 3)
    with pytest.raises(Drop):
        esp.decapsulate(wrong, esp.encapsulate(sender, clear, (1 << 32) + 7))


# -- outbound shapes ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["tunnel4", "tunnel6", "tunnel4in6", "tunnel6in4"])
@pytest.mark.parametrize("df", [False, True])
def test_tunnel_outer_header(layout: str, df: bool) -> None:
    _, family, inner, _ = LAYOUTS[layout]
    clear = clear_packet(layout, b"z" * 33, tos=0xB9, df=df)
    packet = esp.encapsulate(make_sa("gcm128", layout), clear, 3)
    if family == 4:
        outer = IP(packet)
        assert (outer.src, outer.dst, outer.ttl, outer.proto, outer.ihl, outer.len) == (*V4, 64, 50, 5, len(packet))
        assert outer.tos == 0xB9
        assert bool(outer.flags.DF) == (df and inner == 4)  # DF copied from IPv4, clear for IPv6 inner
        assert outer.frag == 0 and not outer.flags.MF
        assert IP(bytes(IP(packet[:20]))).chksum == outer.chksum
        ids = {IP(esp.encapsulate(make_sa("gcm128", layout), clear, 3)).id for _ in range(5)}
        assert len(ids) == 5
    else:
        outer6 = IPv6(packet)
        assert (outer6.src, outer6.dst, outer6.hlim, outer6.nh, outer6.plen) == (*V6, 64, 50, len(packet) - 40)
        assert outer6.tc == 0xB9 and outer6.fl == 0
    assert esp.decapsulate(make_sa("gcm128", layout), packet) == clear


@pytest.mark.parametrize("alg", ["gcm128", "cbc-sha1", "gmac"])
@pytest.mark.parametrize("layout", ["tunnel4", "tunnel6in4"])
def test_tfc_padding_hides_the_length(alg: str, layout: str) -> None:
    small, large = clear_packet(layout, b"a"), clear_packet(layout, b"b" * 1400)
    sender = make_sa(alg, layout, tfc_pad=1000)
    receiver = make_sa(alg, layout, tfc_pad=1000)
    padded = esp.encapsulate(sender, small, 1)
    plain = esp.encapsulate(make_sa(alg, layout), small, 1)
    outer = 20 if LAYOUTS[layout][1] == 4 else 40
    assert len(padded) >= outer + sender.transform.overhead + 1000 > len(plain)
    assert esp.decapsulate(receiver, padded) == small
    assert len(esp.encapsulate(sender, large, 2)) == len(esp.encapsulate(make_sa(alg, layout), large, 2))
    assert esp.decapsulate(receiver, esp.encapsulate(sender, large, 2)) == large


def test_transport_mode_refusals() -> None:
    sa4 = make_sa("gcm128", "transport4")
    with pytest.raises(Drop) as exc:
        esp.encapsulate(sa4, clear_packet("transport6-ext"), 1)
    assert exc.value.counter == counters.XFRM_OUT_STATE_MODE_ERROR
    fragment = bytes(IP(src=V4[0], dst=V4[1], flags="MF", proto=17) / Raw(bytes(16)))
    with pytest.raises(Drop, match="fragment"):
        esp.encapsulate(sa4, fragment, 1)
    with pytest.raises(Drop, match="exceeds 65535"):
        esp.encapsulate(sa4, bytes(IP(src=V4[0], dst=V4[1]) / UDP() / Raw(bytes(65500))), 1)
    for junk in (b"", b"\x45", bytes(IP(src=V4[0], dst=V4[1]))[:19], b"\x45" + bytes(30)):
        with pytest.raises(Drop):
            esp.encapsulate(sa4, junk, 1)
        with pytest.raises(Drop):
            esp.encapsulate(make_sa("cbc-sha1", "tunnel4"), junk, 1)


def test_transport6_esp_goes_after_the_right_extension_headers() -> None:
    clear = clear_packet("transport6-ext")  # hop-by-hop, routing, destination options, UDP
    packet = esp.encapsulate(make_sa("cbc-sha1", "transport6-ext"), clear, 1)
    insert = 40 + 8 + 24  # the destination options header after the routing header goes inside
    assert packet[:4] == clear[:4] and packet[6:48] == clear[6:48]  # IPv6 header, hop-by-hop as they were
    assert struct.unpack("!H", packet[4:6])[0] == len(packet) - 40
    assert packet[48] == 50 and clear[48] == 60  # the routing header now names ESP instead of dest opts
    assert packet[49:insert] == clear[49:insert]
    assert struct.unpack("!I", packet[insert : insert + 4])[0] == SPI
    assert esp.decapsulate(make_sa("cbc-sha1", "transport6-ext"), packet) == clear


def test_fast_and_general_paths_agree() -> None:
    """The inline IPv4 path and the general path produce identical bytes, in both directions."""
    for alg in ("gcm128", "chacha"):
        for layout in ("transport4", "tunnel4"):
            sender = make_sa(alg, layout)
            clear = clear_packet(layout, b"q" * 77, tos=4, df=True)
            fast = esp.encapsulate(sender, clear, 0x1_0000_0042)
            general = esp.encapsulate_with_iv(sender, clear, 0x1_0000_0042, (0x1_0000_0042).to_bytes(8, "big"))
            if layout == "tunnel4":  # a fresh IP ID (and so checksum) each time: compare the rest
                assert fast[:4] + fast[6:10] + fast[12:] == general[:4] + general[6:10] + general[12:]
                assert IP(bytes(IP(fast[:20]))).chksum == IP(fast).chksum
            else:
                assert fast == general
            packet = esp.encapsulate(sender, clear, 9)
            via_fast = esp.decapsulate(make_sa(alg, layout), packet)
            via_general = esp.decapsulate(make_sa(alg, layout), memoryview(packet))  # memoryview: general path
            assert via_fast == via_general == clear
            if layout == "transport4":  # (tunnel mode draws a fresh IP ID each time)
                assert esp.encapsulate(make_sa(alg, layout), memoryview(bytearray(clear)), 9) == packet
