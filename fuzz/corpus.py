"""Shared by the hypothesis tests (tests/unit/test_fuzz_inbound.py) and the atheris harness.

A *receiver* is the sans-I/O inbound path exactly as the engine runs it - `Pipeline.process`
at the INPUT hook over a `Sad`/`Spd` built by `config.parse_config` - with one SA per
algorithm x mode x address family (ESP with every AEAD and every cipher+HMAC pair, AH with
every HMAC; transport v4/v6, tunnel 4-in-4, 6-in-6, 4-in-6, 6-in-4; ESN on every other SA).
A *sender* is the same configuration parsed a second time, so its SAs produce genuine packets
the receiver must accept, while the receiver's replay windows stay its own.

`seeds()` yields named packets - valid ones of every SA, then truncated, bit-flipped, bogus
padding, wrong next header, reserved SPIs, zero length, huge IHL, IPv6 extension-header
chains that never end - each with the counters it may be dropped under. `check()` is the
oracle every fuzzer applies to every decision (see its docstring).

Only documentation addresses: local 192.0.2.1 / 2001:db8::1, peers 198.51.100.0/24 and
2001:db8:2::/64, tunnelled sources 203.0.113.0/24 and 2001:db8:3::/64.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from nfq_ipsec import counters as C
from nfq_ipsec import packet
from nfq_ipsec.config import parse_config
from nfq_ipsec.counters import Counters
from nfq_ipsec.errors import Drop
from nfq_ipsec.pipeline import HOOK_INPUT, NF_ACCEPT, NF_DROP, Decision, InjectTunnel, Pipeline
from nfq_ipsec.replay import ReplayWindow
from nfq_ipsec.sa import SecurityAssociation
from nfq_ipsec.sad import Sad
from nfq_ipsec.spd import Spd

LOCAL4, LOCAL6 = "192.0.2.1", "2001:db8::1"
PROTO_UDP, PROTO_ESP, PROTO_AH = 17, 50, 51
SPORT, DPORT = 40000, 4500 + 1

# (proto, aead, icv_len, enc, auth)
ALGORITHMS: tuple[tuple[str, str | None, int | None, str | None, str | None], ...] = (
    ("esp", "aes-gcm-128", 16, None, None),
    ("esp", "aes-gcm-192", 12, None, None),
    ("esp", "aes-gcm-256", 8, None, None),
    ("esp", "chacha20-poly1305", None, None, None),
    ("esp", "aes-gmac-128", None, None, None),
    ("esp", "aes-gmac-192", None, None, None),
    ("esp", "aes-gmac-256", None, None, None),
    ("esp", None, None, "aes-cbc-128", "hmac-sha256-128"),
    ("esp", None, None, "aes-cbc-192", "hmac-sha384-192"),
    ("esp", None, None, "aes-cbc-256", "hmac-sha512-256"),
    ("esp", None, None, "null", "hmac-sha1-96"),
    ("ah", None, None, None, "hmac-sha256-128"),
    ("ah", None, None, None, "hmac-sha384-192"),
    ("ah", None, None, None, "hmac-sha512-256"),
    ("ah", None, None, None, "hmac-sha1-96"),
)
AEAD_KEY = {"aes-gcm-128": 20, "aes-gcm-192": 28, "aes-gcm-256": 36, "chacha20-poly1305": 36,
            "aes-gmac-128": 20, "aes-gmac-192": 28, "aes-gmac-256": 36}
ENC_KEY = {"aes-cbc-128": 16, "aes-cbc-192": 24, "aes-cbc-256": 32, "null": 0}
AUTH_KEY = {"hmac-sha256-128": 32, "hmac-sha384-192": 48, "hmac-sha512-256": 64, "hmac-sha1-96": 20}
# (mode, outer family, inner family)
SHAPES = (("transport", 4, 4), ("transport", 6, 6), ("tunnel", 4, 4), ("tunnel", 6, 6), ("tunnel", 4, 6),
          ("tunnel", 6, 4))


@dataclass(frozen=True)
class SaSpec:
    """What a fuzzer needs to know about one SA to build packets for it."""

    name: str
    proto: str
    mode: str
    outer: int
    inner: int
    peer: str  # outer source (the sending peer)
    inner_src: str  # source of the protected packet (= peer in transport mode)
    local: str  # inner destination (this host)


def _key(n: int, seed: int) -> str:
    return "0x" + bytes((seed * 31 + i * 7 + 1) & 0xFF for i in range(n)).hex()


def build_config() -> tuple[str, list[SaSpec]]:
    """The receiver's configuration text and its SAs, in order."""
    out = ['[engine]\ndefault_policy = "bypass"\n']
    specs: list[SaSpec] = []
    i = 0
    for proto, aead, icv, enc, auth in ALGORITHMS:
        for mode, outer, inner in SHAPES:
            i += 1
            name = f"sa{i:03d}-{proto}-{aead or enc}-{mode}{outer}{inner}"
            peer = f"198.51.100.{i}" if outer == 4 else f"2001:db8:2::{i:x}"
            local = LOCAL4 if inner == 4 else LOCAL6
            if mode == "transport":
                inner_src = peer
            else:
                inner_src = f"203.0.113.{i}" if inner == 4 else f"2001:db8:3::{i:x}"
            sa = [f'name = "{name}"', f'proto = "{proto}"', f'mode = "{mode}"', f'src = "{peer}"',
                  f'dst = "{LOCAL4 if outer == 4 else LOCAL6}"', f"spi = 0x{0x00100000 + i * 0x1000:08x}",
                  "replay_window = 64", f"esn = {'true' if i % 2 else 'false'}"]
            if aead:
                sa += [f'aead = "{aead}"', f"key = \"{_key(AEAD_KEY[aead], i)}\""]
                if icv:
                    sa.append(f"icv_len = {icv}")
            else:
                if enc:
                    sa.append(f'enc = "{enc}"')
                    if ENC_KEY[enc]:
                        sa.append(f"enc_key = \"{_key(ENC_KEY[enc], i)}\"")
                assert auth is not None
                sa += [f'auth = "{auth}"', f"auth_key = \"{_key(AUTH_KEY[auth], i + 100)}\""]
            out.append("[[sa]]\n" + "\n".join(sa) + "\n")
            plen = 32 if inner == 4 else 128
            out.append(
                "[[policy]]\n"
                f'name = "in-{name}"\ndir = "in"\nsrc = "{inner_src}/{plen}"\ndst = "{local}/{plen}"\n'
                f'proto = "udp"\naction = "protect"\nsa = "{name}"\n'
            )
            specs.append(SaSpec(name, proto, mode, outer, inner, peer, inner_src, local))
    return "\n".join(out), specs


@dataclass
class Receiver:
    """The inbound path under test, plus everything the oracle needs to look at."""

    pipeline: Pipeline
    counters: Counters
    sad: Sad
    audit: list[str] = field(default_factory=list)

    def process(self, pkt: bytes) -> Decision:
        return self.pipeline.process(HOOK_INPUT, pkt)

    def reset_replay(self) -> None:
        """Fresh replay windows, so mutated copies of an old packet reach the ICV check again."""
        for sa in self.sad.list():
            sa.replay = ReplayWindow(sa.replay.size, esn=sa.esn)


def make_receiver(text: str | None = None) -> Receiver:
    text = text if text is not None else build_config()[0]
    cfg = parse_config(text, source="<fuzz>")
    spd, sad, ctr = Spd(cfg.engine.default_actions()), Sad(), Counters()
    for sa in cfg.sas:
        sad.add(sa)
    for p in cfg.policies:
        spd.add(p)
    audit: list[str] = []

    def sink(line: str) -> None:
        if len(audit) < 1000:
            audit.append(line)

    pipe = Pipeline(spd, sad, ctr, is_local=lambda family, addr: True, path_mtu=lambda family, dst: 1500,
                    icmp_allow=lambda: False, audit=sink)
    return Receiver(pipe, ctr, sad, audit)


def make_sender(text: str | None = None) -> dict[str, SecurityAssociation]:
    text = text if text is not None else build_config()[0]
    return {sa.name: sa for sa in parse_config(text, source="<fuzz-sender>").sas}


# -- packets -----------------------------------------------------------------------------------


def _packed(addr: str) -> bytes:
    return ipaddress.ip_address(addr).packed


def udp_packet(src: str, dst: str, payload: bytes, sport: int = SPORT, dport: int = DPORT) -> bytes:
    """A plain UDP datagram (checksum left 0: nothing on the inbound path checks it)."""
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    if ":" in src:
        return packet.ipv6_header(_packed(src), _packed(dst), PROTO_UDP, len(udp)) + udp
    return packet.ipv4_header(_packed(src), _packed(dst), PROTO_UDP, len(udp), ident=7) + udp


def inner_for(spec: SaSpec, payload: bytes) -> bytes:
    return udp_packet(spec.inner_src, spec.local, payload)


def valid(sender: SecurityAssociation, spec: SaSpec, payload: bytes) -> tuple[bytes, bytes]:
    """(the protected packet, the inner packet the receiver must deliver)."""
    inner = inner_for(spec, payload)
    return sender.protect(inner), inner


def forge_esp(sender: SecurityAssociation, spec: SaSpec, plaintext: bytes) -> bytes:
    """An ESP packet whose ICV is valid but whose decrypted trailer is whatever `plaintext` ends with."""
    t = sender.transform
    seq = sender.next_seq()
    esp_header = struct.pack("!II", sender.spi, seq & 0xFFFFFFFF)
    seq_hi = struct.pack("!I", seq >> 32) if sender.esn else b""
    length = 8 + t.iv_len + len(plaintext) + t.icv_len
    src, dst = sender.src_packed, sender.dst_packed
    if spec.outer == 4:
        prefix = packet.ipv4_header(src, dst, PROTO_ESP, length)
    else:
        prefix = packet.ipv6_header(src, dst, PROTO_ESP, length)
    return t.seal(prefix, esp_header, seq_hi, None, plaintext, seq)


def _esp_plaintext(body: bytes, block: int, nh: int, corrupt_padding: bool = False) -> bytes:
    """body | padding 1, 2, 3, ... | pad length | next header; `corrupt_padding` breaks one pad byte."""
    n = -(len(body) + 2) % block
    if corrupt_padding and n < 3:
        n += block
    pad = bytearray(range(1, n + 1))
    if corrupt_padding:
        pad[1] = 9
    return body + bytes(pad) + bytes((n, nh))


@dataclass(frozen=True)
class Seed:
    name: str
    data: bytes
    expect: frozenset[str]  # counters it may be dropped under; empty = must be delivered
    inner: bytes = b""  # for valid packets: what must come out


def _v4_raw(proto: int, body: bytes, src: str = "198.51.100.200", dst: str = LOCAL4) -> bytes:
    return packet.ipv4_header(_packed(src), _packed(dst), proto, len(body)) + body


def _v6_raw(nh: int, body: bytes, src: str = "2001:db8:2::ff", dst: str = LOCAL6) -> bytes:
    return packet.ipv6_header(_packed(src), _packed(dst), nh, len(body)) + body


def _ext(nh: int, length_units: int = 0) -> bytes:
    """An IPv6 hop-by-hop/routing/destination-options header of (length_units + 1) * 8 bytes."""
    return bytes((nh, length_units)) + bytes(6 + 8 * length_units)


ICV_FAIL = frozenset({C.XFRM_IN_STATE_PROTO_ERROR})
ANY_INBOUND_DROP = frozenset({
    C.IN_MALFORMED, C.XFRM_IN_NO_STATES, C.XFRM_IN_HDR_ERROR, C.XFRM_IN_STATE_PROTO_ERROR,
    C.XFRM_IN_STATE_SEQ_ERROR, C.XFRM_IN_STATE_MODE_ERROR, C.XFRM_IN_TMPL_MISMATCH, C.IN_PADDING_ERROR,
    C.IN_DUMMY_PACKET, C.XFRM_IN_STATE_EXPIRED, C.XFRM_IN_ERROR, C.XFRM_IN_BUFFER_ERROR,
    C.XFRM_IN_STATE_MISMATCH, C.XFRM_IN_STATE_INVALID, C.XFRM_IN_POL_BLOCK, C.IN_CLEARTEXT_PROTECTED,
})


def seeds(specs: list[SaSpec], sender: dict[str, SecurityAssociation]) -> Iterator[Seed]:
    """The seed corpus (see the module docstring). Uses (and advances) the sender's sequence numbers."""
    malformed = frozenset({C.IN_MALFORMED})
    for spec in specs:
        s = sender[spec.name]
        for size in (0, 1, 61, 300):
            pkt, inner = valid(s, spec, bytes(range(size % 256)) * (size // 256 + 1))
            yield Seed(f"valid/{spec.name}/{size}", pkt, frozenset(), inner)
        pkt, _ = valid(s, spec, b"truncate me" * 9)
        hl = 20 if spec.outer == 4 else 40
        for cut in sorted({0, 1, hl - 1, hl, hl + 4, hl + 8, hl + 12, len(pkt) // 2, len(pkt) - 1}):
            yield Seed(f"truncated/{spec.name}/{cut}", pkt[:cut], ANY_INBOUND_DROP)
            # ... and with the IP length fixed up to match, so the header is consistent
            if cut >= hl:
                fixed = bytearray(pkt[:cut])
                if spec.outer == 4:
                    struct.pack_into("!HH", fixed, 2, cut, 0)
                    struct.pack_into("!H", fixed, 10, 0)
                    from nfq_ipsec.checksum import internet_checksum

                    struct.pack_into("!H", fixed, 10, internet_checksum(bytes(fixed[:20])))
                else:
                    struct.pack_into("!H", fixed, 4, cut - 40)
                yield Seed(f"truncated-fixed/{spec.name}/{cut}", bytes(fixed), ANY_INBOUND_DROP)
        n = len(valid(s, spec, b"flip" * 10)[0])
        for region, offsets in (("spi", (hl, hl + 3)), ("seq", (hl + 4, hl + 7)), ("body", (hl + 16, n // 2)),
                                ("icv", (n - 1,))):
            for off in offsets:
                for bit in (0, 7):
                    flipped = bytearray(valid(s, spec, b"flip" * 10)[0])
                    flipped[off] ^= 1 << bit
                    yield Seed(f"bitflip-{region}/{spec.name}/{off}.{bit}", bytes(flipped), ANY_INBOUND_DROP)
        if spec.proto == "esp":
            block = s.transform.block_size
            body = inner_for(spec, b"padding")
            if spec.mode == "transport":
                body = body[20 if spec.inner == 4 else 40:]
            nh_ok = PROTO_UDP if spec.mode == "transport" else (4 if spec.inner == 4 else 41)
            yield Seed(f"bogus-padding/{spec.name}", forge_esp(s, spec, _esp_plaintext(body, block, nh_ok, True)),
                       frozenset({C.IN_PADDING_ERROR}))
            yield Seed(f"padding-too-long/{spec.name}", forge_esp(s, spec, _pad_too_long(block, nh_ok)),
                       frozenset({C.IN_PADDING_ERROR}))
            yield Seed(f"dummy-nh59/{spec.name}", forge_esp(s, spec, _esp_plaintext(b"", block, 59)),
                       frozenset({C.IN_DUMMY_PACKET}))
            if spec.mode == "tunnel":
                for nh in (6, 17, 200, 41 if spec.inner == 4 else 4):
                    yield Seed(f"wrong-nh-{nh}/{spec.name}",
                               forge_esp(s, spec, _esp_plaintext(body, block, nh)),
                               frozenset({C.XFRM_IN_STATE_MODE_ERROR}))
                # a tunnelled packet whose own length runs past the decrypted data
                bad = bytearray(body)
                if spec.inner == 4:
                    struct.pack_into("!H", bad, 2, len(bad) + 50)
                else:
                    struct.pack_into("!H", bad, 4, len(bad))
                yield Seed(f"inner-length/{spec.name}", forge_esp(s, spec, _esp_plaintext(bytes(bad), block, nh_ok)),
                           frozenset({C.XFRM_IN_STATE_MODE_ERROR}))
            else:
                for nh in (6, 200, 59 + 1):
                    yield Seed(f"wrong-nh-{nh}/{spec.name}",
                               forge_esp(s, spec, _esp_plaintext(body, block, nh)),
                               frozenset({C.XFRM_IN_TMPL_MISMATCH, C.IN_MALFORMED}))
        # the same packet twice: the second is a replay
        pkt, inner = valid(s, spec, b"twice")
        yield Seed(f"replay-first/{spec.name}", pkt, frozenset(), inner)
        yield Seed(f"replay-second/{spec.name}", pkt, frozenset({C.XFRM_IN_STATE_SEQ_ERROR}))
    # reserved and unknown SPIs, for ESP and AH, v4 and v6
    for spi in (0, 1, 2, 127, 255, 256, 0xFFFFFFFF, 0x00100000):
        esp = struct.pack("!II", spi, 1) + bytes(40)
        ah = bytes((PROTO_UDP, 4, 0, 0)) + struct.pack("!II", spi, 1) + bytes(40)
        yield Seed(f"spi-{spi}/esp4", _v4_raw(PROTO_ESP, esp), frozenset({C.XFRM_IN_NO_STATES}))
        yield Seed(f"spi-{spi}/esp6", _v6_raw(PROTO_ESP, esp), frozenset({C.XFRM_IN_NO_STATES}))
        yield Seed(f"spi-{spi}/ah4", _v4_raw(PROTO_AH, ah), frozenset({C.XFRM_IN_NO_STATES}))
        yield Seed(f"spi-{spi}/ah6", _v6_raw(PROTO_AH, ah), frozenset({C.XFRM_IN_NO_STATES}))
    yield Seed("zero-length", b"", malformed)
    for v in range(16):
        yield Seed(f"version-{v}/1-byte", bytes((v << 4 | 5,)), malformed)
    hdr = bytearray(_v4_raw(PROTO_ESP, bytes(8)))
    for ihl in (0, 1, 4, 6, 15):
        h = bytearray(hdr)
        h[0] = 0x40 | ihl
        yield Seed(f"ihl-{ihl}", bytes(h), malformed)
        yield Seed(f"ihl-{ihl}/padded", bytes(h) + bytes(60), malformed)
    for total in (0, 19, 29, 0xFFFF):
        h = bytearray(hdr)
        struct.pack_into("!H", h, 2, total)
        yield Seed(f"v4-total-{total}", bytes(h), malformed)
    for plen in (0, 7, 0xFFFF):
        h = bytearray(_v6_raw(PROTO_ESP, bytes(8)))
        struct.pack_into("!H", h, 4, plen)
        yield Seed(f"v6-plen-{plen}", bytes(h), malformed if plen else frozenset({C.IN_MALFORMED}))
    # IPv6 extension-header chains: too many, pointing at themselves, running past the end
    for kind in (0, 43, 60):
        many = b"".join(_ext(kind if kind else 60) for _ in range(40)) + struct.pack("!II", 0x100000, 1)
        yield Seed(f"v6-ext-loop/{kind}", _v6_raw(kind, many), malformed)
    chain = (_ext(60) + _ext(43)) * 10  # routing, dst-opts, routing, ... never reaching ESP
    yield Seed("v6-ext-alternating", _v6_raw(43, chain + struct.pack("!II", 0x100000, 1) + bytes(16)), malformed)
    yield Seed("v6-ext-past-end", _v6_raw(60, bytes((50, 200)) + bytes(6)), malformed)
    yield Seed("v6-hbh-not-first", _v6_raw(60, _ext(0) + _ext(50) + bytes(16)), malformed)
    yield Seed("v6-ext-truncated", _v6_raw(0, b"\x32"), malformed)
    yield Seed("v6-frag-then-esp", _v6_raw(44, struct.pack("!BBHI", 50, 0, 1, 9) + struct.pack("!II", 0x100000, 1)
                                           + bytes(40)), ANY_INBOUND_DROP)
    yield Seed("v4-fragment-of-esp", _v4_frag_esp(), ANY_INBOUND_DROP)


def _pad_too_long(block: int, nh: int) -> bytes:
    """Pad length 250 in a trailer that has only a block's worth of bytes before it."""
    n = max(block, 4)
    return bytes(n - 2) + bytes((250, nh))


def _v4_frag_esp() -> bytes:
    h = bytearray(_v4_raw(PROTO_ESP, struct.pack("!II", 0x00101000, 1) + bytes(48), src="198.51.100.1"))
    struct.pack_into("!H", h, 6, 0x2000)  # MF
    from nfq_ipsec.checksum import internet_checksum

    struct.pack_into("!H", h, 10, 0)
    struct.pack_into("!H", h, 10, internet_checksum(bytes(h[:20])))
    return bytes(h)


# -- the oracle ----------------------------------------------------------------------------------


class OracleError(AssertionError):
    pass


def check(rx: Receiver, before: dict[str, int], pkt: bytes, d: Decision, expect: frozenset[str] | None = None,
          inner: bytes | None = None) -> str | None:
    """What every decision on an inbound packet must satisfy; returns the counter of a drop.

    * Nothing but `Drop` escapes the packet core: the engine's catch-all (`NfqEngineError`)
      never counts.
    * A drop increments exactly one global counter by one, and that counter is a known name.
    * A delivery (transport: ACCEPT with the decrypted packet; tunnel: an InjectTunnel action)
      comes from an SA and is a well-formed IP packet; when `inner` is given it is exactly it
      (transport mode: the same bytes after the IP header).
    * A plain ACCEPT without payload is only possible for a packet that is not ESP/AH.
    * `expect`: the drop counters allowed (empty: the packet must be delivered).
    """
    after = rx.counters.snapshot()
    delta = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
    if delta.get(C.ENGINE_ERROR):
        raise OracleError(f"exception escaped the packet core: {d.reason}; audit: {rx.audit[-1:]}")
    injected = [a.packet for a in d.actions if isinstance(a, InjectTunnel)]
    delivered = injected[0] if injected else d.payload
    if delivered is not None:
        if delta:
            raise OracleError(f"delivered but counted {delta}")
        if d.sa is None:
            raise OracleError("delivered without an SA")
        try:
            info = packet.parse(delivered)
        except Drop as e:
            raise OracleError(f"delivered a malformed packet: {e}") from None
        if info.proto == PROTO_ESP or info.proto == PROTO_AH:
            raise OracleError("delivered an IPsec packet as decrypted")
        if inner is not None:
            if injected and delivered != inner:
                raise OracleError("tunnel: delivered a different inner packet")
            want = packet.parse(inner)
            if not injected and (delivered[info.l4_offset:info.total_len] != inner[want.l4_offset:]
                                 or info.flow != want.flow):
                raise OracleError("transport: delivered a different packet")
        if expect:
            raise OracleError(f"delivered, but expected a drop under {sorted(expect)}")
        return None
    if d.verdict == NF_ACCEPT:
        if delta:
            raise OracleError(f"accepted but counted {delta}")
        info = packet.parse(pkt)  # an accepted packet must at least parse
        if info.proto in (PROTO_ESP, PROTO_AH):
            raise OracleError("ESP/AH packet accepted without decryption")
        if expect:
            raise OracleError(f"accepted, expected a drop under {sorted(expect)}")
        return None
    if d.verdict != NF_DROP:
        raise OracleError(f"verdict {d.verdict}")
    if len(delta) != 1 or next(iter(delta.values())) != 1:
        raise OracleError(f"a drop must count exactly once, counted {delta} ({d.reason})")
    name = next(iter(delta))
    if name not in C.ALL_NAMES:
        raise OracleError(f"unknown counter {name}")
    if expect is not None:
        if not expect:
            raise OracleError(f"valid packet dropped under {name}: {d.reason}")
        if name not in expect:
            raise OracleError(f"dropped under {name} ({d.reason}), expected one of {sorted(expect)}")
    return name


def apply_edit(buf: bytearray, op: int, pos: int, value: int) -> None:
    """One byte edit of `buf` chosen by `op`: flip a bit, set a byte, cut the tail, insert, delete
    or append bytes; `pos` in 0..len(buf) (the fuzz harnesses' shared mutation language)."""
    kind = op % 6
    if kind == 0 and pos < len(buf):
        buf[pos] ^= 1 << (value & 7)
    elif kind == 1 and pos < len(buf):
        buf[pos] = value
    elif kind == 2:
        del buf[pos:]
    elif kind == 3:
        buf[pos:pos] = bytes((value,)) * (op >> 3 & 15 or 1)
    elif kind == 4:
        del buf[pos : pos + (value & 31 or 1)]
    else:
        buf += bytes((value,)) * (op >> 3 & 31 or 1)
