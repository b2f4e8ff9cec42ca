"""Fuzz harness for the C core of ESP AEAD SAs: nfq_ipsec/_espcore.c and _replaywin.c.

    python fuzz/fuzz_espcore.py --random SECONDS [RUNS [SEED]]    # seeded random inputs (no atheris needed)
    python fuzz/fuzz_espcore.py --replay DIR_OR_FILE...           # every input once (a corpus, a crash)
    python fuzz/fuzz_espcore.py --write-seeds DIR                 # a few seeds per target and SA
    python fuzz/fuzz_espcore.py [libFuzzer flags] [DIR...]         # atheris, coverage of the Python side

The C code parses packets from the network, so the main oracle is AddressSanitizer + UBSan, on a build
made out of tree (the in-place .so files stay as they are):

    git archive HEAD | tar -x -C /tmp/asan && cd /tmp/asan
    CFLAGS="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-wrapv -fno-omit-frame-pointer -g" \
        LDFLAGS="-fsanitize=address,undefined" .../python setup.py build_ext --inplace
    LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)" PYTHONMALLOC=malloc \
        ASAN_OPTIONS=detect_leaks=0 .../python fuzz/fuzz_espcore.py --random 300

(PYTHONMALLOC=malloc: Python objects, packets among them, come from malloc, where ASan sees overflows;
-fno-wrapv undoes Python's -fwrapv, which hides signed overflow from UBSan.) With gcc's libasan preloaded
atheris gets no coverage (libasan provides the coverage symbols): grow a corpus with atheris on a normal
build, then --replay it on the sanitizer build.

What Python can see is checked too: every call returns what its contract allows (None, bytes, a
verdict, Drop with a known counter, the documented argument errors); decap agrees with esp.py's general
path, counter changes and window included; decap(encap(p)) gives p back; the replay window agrees with
its reference model (tests/unit/replay_model.py); what the fast path sends and writes to the TUN is whole.

The first byte of an input picks the target; the rest drives it (values run out as zeros):

  0 EspCore.decap of raw bytes (optionally with the IPv4/ESP header fixed up so they reach the ICV)
  1 EspCore.decap of an authentic packet: any plaintext (so any padding, next header and inner
    packet) encrypted with the SA's key, any sequence number, then byte edits
  2 EspCore.encap of any bytes (optionally made to look like IPv4/IPv6) with any seq and IP ID
  3 ReplayWindow: construction with any values, then check/update/seen/infer with any values
  4 FastPath.handle for every hook, with flows learnt for every SA: raw, authentic inbound and clear
    outbound packets with edits, SA limits and on_drop behaviours chosen by the input
  5 FastPath.learn with any arguments, then handle (table collisions, re-learning, bad arguments)
  6 EspCore and FastPath over an AEAD object that raises or returns the wrong type, length or a
    shared bytes object

SAs: every AEAD (AES-GCM-128/192/256, ChaCha20-Poly1305) x transport/tunnel x ESN off/on.
"""

from __future__ import annotations

import os
import random
import re
import socket
import struct
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from fuzz import corpus
from nfq_ipsec import counters as C
from nfq_ipsec import esp
from nfq_ipsec._espcore import KIND_FORWARD, KIND_INNER, KIND_INPUT_SA, KIND_OUTPUT, CounterPair, EspCore, FastPath
from nfq_ipsec.errors import Drop
from nfq_ipsec.replay import ReplayWindow
from nfq_ipsec.sa import SecurityAssociation
from tests.unit.replay_model import ReplayWindow as ModelWindow

M32, M64 = 1 << 32, 1 << 64
AEAD_KEYS = {"aes-gcm-128": 16, "aes-gcm-192": 24, "aes-gcm-256": 32, "chacha20-poly1305": 32}
# (outer) endpoints: transport between two hosts, tunnel between two gateways; documentation addresses
ENDPOINTS = {"transport": ("192.0.2.2", "192.0.2.1"), "tunnel": ("198.51.100.1", "203.0.113.1")}
INNER = ("192.0.2.130", "192.0.2.10")
TUN_IFINDEX = 7
HOOK_INPUT, HOOK_FORWARD, HOOK_OUTPUT = 1, 2, 3
WINDOW = 64
# every counter decap may raise Drop under (anything else is a bug)
DECAP_COUNTERS = {
    C.XFRM_IN_STATE_SEQ_ERROR, C.XFRM_IN_STATE_PROTO_ERROR, C.XFRM_IN_STATE_MODE_ERROR, C.IN_PADDING_ERROR,
    C.IN_DUMMY_PACKET,
}


STATS: Counter[str] = Counter()  # what the inputs reached (printed by --random: is the harness any good?)


class Reader:
    """The input as a stream of values; past its end every value is 0 (libFuzzer shrinks inputs)."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        b = self.data[self.pos : self.pos + n]
        self.pos += len(b)
        return b

    def u8(self) -> int:
        return int.from_bytes(self.take(1), "big")

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "big")

    def u64(self) -> int:
        return int.from_bytes(self.take(8), "big")

    def rest(self) -> bytes:
        return self.take(len(self.data))

    def blob(self) -> bytes:
        """Data of a packet: its length and a fill pattern come from the input, not its bytes (they
        only matter to the AEAD, and the input stays short enough to drive the structure)."""
        n, seed = self.u8(), self.u8()
        size = n if n < 192 else 192 + (n - 192) * 30  # up to 2082 bytes
        return bytes((seed + i * (seed | 1)) & 0xFF for i in range(size))

    def seq(self, limit: int) -> int:
        """A sequence-number-like value: often near an edge, else any up to `limit` (inclusive)."""
        k = self.u8() % 8
        v = self.u64()
        if k == 0:
            return v % 4
        if k == 1:
            return (limit - (v % 4)) & (M64 - 1)
        if k == 2:
            return (M32 + (v % 5) - 2) % (limit + 1)
        return v % (limit + 1)

    def anyint(self) -> Any:
        """Any argument a caller could pass where an integer is expected, mostly integers."""
        k = self.u8() % 16
        v = self.u64()
        if k == 0:
            return -1 - (v % 3)
        if k == 1:
            return M64 + (v % 3)
        if k == 2:
            return M32 + (v % 3) - 1
        if k == 3:
            return (True, False, 1.0, None, "1", b"\x01", 1 << 200)[v % 7]
        return v if k < 10 else v & (M32 - 1)


def csum(b: bytes) -> int:
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ip4(src: bytes, dst: bytes, payload: bytes, proto: int, *, ident: int = 0x4242, df: bool = False) -> bytes:
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, 0x4000 if df else 0, 64, proto, 0, src, dst)
    return hdr[:10] + struct.pack("!H", csum(hdr)) + hdr[12:] + payload


def ip6(payload: bytes, nh: int = 17) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, len(payload), nh, 64, b"\x20\x01\x0d\xb8" + bytes(12),
                       b"\x20\x01\x0d\xb8" + bytes(11) + b"\x01") + payload


def udp(sport: int, dport: int, data: bytes) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data


def trailer(payload: bytes, nh: int) -> bytes:
    pad = bytes(range(1, (2 - len(payload)) % 4 + 1))
    return payload + pad + bytes((len(pad), nh))


class Config:
    """One SA configuration: the receiving SA (with its C core), a twin receiving SA for esp.py's
    general path, the sending SA (C core for encap and fast_protect), and an AEAD object of our own
    that makes authentic packets with any plaintext."""

    def __init__(self, index: int, aead: str, mode: str, esn: bool) -> None:
        self.index, self.aead, self.mode, self.esn = index, aead, mode, esn
        self.spi = 0x1000 + index
        self.tfc_pad = 200 if index % 4 == 3 else 0  # (encap declines shorter packets: the general path pads)
        key = bytes((i * 29 + index * 7 + 1) & 0xFF for i in range(AEAD_KEYS[aead] + 4))
        self.cipher = ChaCha20Poly1305(key[:-4]) if aead.startswith("chacha") else AESGCM(key[:-4])
        self.salt = key[-4:]
        src, dst = ENDPOINTS[mode]
        self.src, self.dst = socket.inet_aton(src), socket.inet_aton(dst)

        def sa(outbound: bool, name: str) -> SecurityAssociation:
            a, b = (dst, src) if outbound else (src, dst)
            return SecurityAssociation(name=name, proto="esp", mode=mode, src=a, dst=b, spi=self.spi, aead=aead,
                                       key=key, esn=esn, replay_window=WINDOW, tfc_pad=self.tfc_pad)

        self.rx, self.ref, self.tx = sa(False, f"rx{index}"), sa(False, f"ref{index}"), sa(True, f"tx{index}")
        assert self.rx.core is not None and self.tx.core is not None
        self.rx_core: EspCore = self.rx.core
        self.tx_core: EspCore = self.tx.core
        self.sport = 1000 + index  # one clear flow per configuration (flow keys must differ)

    def seq_limit(self) -> int:
        return M64 - 1 if self.esn else M32 - 1

    def esp(self, seq: int, plaintext: bytes, seq_hi: int | None = None) -> bytes:
        """An authentic ESP packet from the peer: any plaintext, any sequence number."""
        head = struct.pack("!II", self.spi, seq & (M32 - 1))
        iv = (seq & (M64 - 1)).to_bytes(8, "big")
        hi = (seq >> 32 if seq_hi is None else seq_hi) & (M32 - 1)
        aad = head[:4] + struct.pack("!I", hi) + head[4:] if self.esn else head
        return ip4(self.src, self.dst, head + iv + self.cipher.encrypt(self.salt + iv, plaintext, aad), 50)

    def inner(self, data: bytes) -> bytes:
        """The cleartext the peer protects for the flow the fast path learnt (tunnel: inner packet,
        transport: the transport payload)."""
        if self.mode == "tunnel":
            return ip4(socket.inet_aton(INNER[0]), socket.inet_aton(INNER[1]), udp(self.sport, 53, data), 17)
        return udp(self.sport, 53, data)

    def valid_plaintext(self, data: bytes) -> bytes:
        return trailer(self.inner(data), 4 if self.mode == "tunnel" else 17)

    def clear_out(self, data: bytes) -> bytes:
        """A clear packet of the outbound flow the fast path learnt for this SA."""
        if self.mode == "tunnel":
            return ip4(socket.inet_aton(INNER[1]), socket.inet_aton(INNER[0]), udp(53, self.sport, data), 17, df=True)
        return ip4(self.dst, self.src, udp(53, self.sport, data), 17)

    def fresh_windows(self, initial: int) -> None:
        """The same new window for the C core and the general path's twin."""
        self.rx.replay = ReplayWindow(WINDOW, self.esn, initial)
        self.ref.replay = ReplayWindow(WINDOW, self.esn, initial)


CONFIGS = [Config(i, aead, mode, esn) for i, (aead, mode, esn) in enumerate(
    (a, m, e) for a in AEAD_KEYS for m in ("transport", "tunnel") for e in (False, True))]


def edit(buf: bytearray, r: Reader, max_ops: int = 8) -> None:
    """Byte edits (flip, set, cut, insert, delete, append), as fuzz_inbound.py does."""
    for _ in range(r.u8() % (max_ops + 1)):
        op, pos, value = r.u8(), r.u16() % (len(buf) + 1), r.u8()
        corpus.apply_edit(buf, op, pos, value)


def fix_ip(buf: bytearray, how: int, proto: int | None = None) -> None:
    """Make raw bytes pass the IPv4 checks in front of the interesting code (some of them, per `how`)."""
    if len(buf) < 20:
        return
    if how & 1:
        buf[0] = 0x45
    if how & 2:
        buf[2:4] = (len(buf) & 0xFFFF).to_bytes(2, "big")
    if how & 4:
        buf[6] &= 0xC0
        buf[7] = 0
    if how & 8 and proto is not None:
        buf[9] = proto


def outcome(fn: Callable[[], Any]) -> tuple[Any, ...]:
    try:
        return ("ok", fn())
    except Drop as e:
        return ("drop", e.counter, e.reason)


def window_state(w: ReplayWindow) -> tuple[Any, ...]:
    top = w.top
    return (w.size, w.esn, top, [s for s in range(max(0, top - w.size - 2), min(top + 3, M64)) if w.seen(s)])


# -- targets 0 and 1: decap -----------------------------------------------------------------------


def decap_and_compare(cfg: Config, pkt: bytes) -> None:
    """EspCore.decap (then the general path if it declines, as esp.decapsulate does) against the
    general path alone on the twin SA: same result or Drop, same counter changes, same window."""

    def via_core() -> bytes:
        try:
            out = cfg.rx_core.decap(pkt)
        except Drop as e:
            assert e.counter in DECAP_COUNTERS, e
            raise
        if out is None:
            return esp._decap(cfg.rx, pkt)
        assert isinstance(out, bytes), type(out)
        return out

    rx0, ref0 = cfg.rx.counters.as_dict(), cfg.ref.counters.as_dict()
    got, want = outcome(via_core), outcome(lambda: esp._decap(cfg.ref, pkt))
    assert got == want, (pkt.hex(), got, want)
    STATS["decap " + (got[0] if got[0] == "ok" else re.sub(r"0x[0-9a-f]+|\d+", "N", got[2].split(" (")[0]))] += 1
    rx1, ref1 = cfg.rx.counters.as_dict(), cfg.ref.counters.as_dict()
    assert {k: rx1[k] - rx0[k] for k in rx1} == {k: ref1[k] - ref0[k] for k in ref1}, pkt.hex()
    assert window_state(cfg.rx.replay) == window_state(cfg.ref.replay), pkt.hex()


def target_decap_raw(r: Reader) -> None:
    cfg = CONFIGS[r.u8() % len(CONFIGS)]
    cfg.fresh_windows(r.seq(cfg.seq_limit()))
    how = r.u8()
    buf = bytearray(r.rest())
    fix_ip(buf, how, 50)
    if how & 16 and len(buf) >= 24:
        buf[20:24] = cfg.spi.to_bytes(4, "big")
    decap_and_compare(cfg, bytes(buf))


def plaintext(cfg: Config, r: Reader) -> bytes:
    """An ESP payload: valid, or with any inner packet, padding and next header."""
    k = r.u8() % 6
    nh = (4, 41, 17, 59, 6, 0, r.u8())[r.u8() % 7]
    if k < 2:  # a valid packet of the SA's flow
        return cfg.valid_plaintext(r.blob())
    if k == 2:  # the SA's inner packet (or transport payload) with edits, any next header
        body = bytearray(cfg.inner(r.blob()))
        edit(body, r)
        return trailer(bytes(body), nh)
    if k == 3:  # an IPv6 inner packet with edits, any next header
        body = bytearray(ip6(r.blob()))
        edit(body, r)
        return trailer(bytes(body), nh)
    if k == 4:  # correct padding of any length, any next header
        padlen = r.u8()
        return r.blob() + bytes(range(1, padlen + 1)) + bytes((padlen, nh))
    return r.blob()  # any plaintext at all (padding, pad length, next header)


def target_decap_authentic(r: Reader) -> None:
    cfg = CONFIGS[r.u8() % len(CONFIGS)]
    initial = r.seq(cfg.seq_limit())
    cfg.fresh_windows(initial)
    # mostly a sequence number the window accepts, else any
    seq = (initial + 1 + r.u8() % 8) % (cfg.seq_limit() + 1) if r.u8() & 3 else r.seq(cfg.seq_limit())
    seq_hi = r.u32() if r.u8() % 16 == 0 else None
    buf = bytearray(cfg.esp(seq, plaintext(cfg, r), seq_hi))
    if r.u8() & 3 == 0:
        edit(buf, r)
    decap_and_compare(cfg, bytes(buf))


# -- target 2: encap --------------------------------------------------------------------------------


def target_encap(r: Reader) -> None:
    cfg = CONFIGS[r.u8() % len(CONFIGS)]
    core = cfg.tx_core if r.u8() & 1 else cfg.rx_core  # (the receiving core encaps as well)
    k = r.u8() % 8
    seq: Any = r.anyint() if k == 0 else r.seq(M64 - 1)
    ip_id: Any = r.anyint() if k == 1 else r.u16()
    shape = r.u8() % 4
    data = r.blob()
    if shape == 0:
        pkt = data
    elif shape == 1:  # IPv4-looking, with any length field / flags
        pkt = ip4(cfg.src, cfg.dst, data, r.u8(), ident=r.u16(), df=bool(r.u8() & 1))
    elif shape == 2:
        pkt = ip6(data, r.u8())
    else:  # huge: reach the 65535-byte limit
        pkt = ip4(cfg.src, cfg.dst, bytes(65400 + r.u16() % 116), 17)
    buf = bytearray(pkt)
    edit(buf, r, 4)
    pkt = bytes(buf)
    try:
        out = core.encap(pkt, seq, ip_id)
    except OverflowError:
        assert not (isinstance(seq, int) and 0 <= seq < M64 and isinstance(ip_id, int) and 0 <= ip_id < M64)
        return
    except TypeError:
        assert not (isinstance(seq, int) and isinstance(ip_id, int))
        return
    if out is None:
        return
    assert isinstance(out, bytes) and 56 <= len(out) <= 0xFFFF, len(out)
    assert (out[2] << 8 | out[3]) == len(out) and out[9] == 50 and csum(out[:20]) == 0, out[:20].hex()
    STATS["encap ok"] += 1
    roundtrip(cfg, core, pkt, out, int(seq))  # (a bool passes as 0 or 1)


def roundtrip(cfg: Config, core: EspCore, pkt: bytes, out: bytes, seq: int) -> None:
    """decap(encap(p)) is p (tunnel: the inner packet; transport: the payload under a new header)."""
    tunnel = cfg.mode == "tunnel"
    if cfg.esn and seq == 0:
        return  # sequence number 0 is never accepted with ESN
    saved = cfg.rx_core.replay
    cfg.rx_core.replay = ReplayWindow(WINDOW, True, seq) if cfg.esn else ReplayWindow(0)
    before = cfg.rx.counters.as_dict()
    try:
        res = outcome(lambda: cfg.rx_core.decap(out))
    finally:
        cfg.rx_core.replay = saved
        for name, value in before.items():
            setattr(cfg.rx.counters, name, value)
    total = pkt[2] << 8 | pkt[3] if pkt[0] >> 4 == 4 else 40 + (pkt[4] << 8 | pkt[5])
    if tunnel:
        if pkt[0] >> 4 == 4 and (pkt[0] & 15) * 4 > total:
            assert res[:2] == ("drop", C.XFRM_IN_STATE_MODE_ERROR), res
        else:
            assert res == ("ok", pkt[:total]), (pkt.hex(), res)
    elif pkt[9] == 59:
        assert res[:2] == ("drop", C.IN_DUMMY_PACKET), res
    else:
        assert res[0] == "ok", (pkt.hex(), res)
        got = res[1]
        assert len(got) == total and got[:10] == pkt[:10] and got[12:] == pkt[12:total], (pkt.hex(), got.hex())
        assert csum(got[:20]) == 0


# -- target 3: the replay window ------------------------------------------------------------------


def window_outcome(fn: Callable[[Any], Any], arg: Any) -> tuple[Any, ...]:
    try:
        return ("ok", fn(arg))
    except Drop as e:
        return ("drop", e.counter, e.reason)
    except (ValueError, TypeError, OverflowError) as e:
        return ("error", type(e).__name__)


def target_replay(r: Reader) -> None:
    k = r.u8() % 8
    size: Any = r.anyint() if k == 0 else r.u16() % (65537 + 2)
    esn: Any = (False, True, 0, 1, None, "x")[r.u8() % 6] if k == 1 else bool(r.u8() & 1)
    initial: Any = r.anyint() if k == 2 else r.seq(M64 - 1 if esn else M32 - 1)
    try:
        w = ReplayWindow(size, esn, initial)
    except (ValueError, TypeError, OverflowError):
        return
    assert isinstance(size, int) and not isinstance(size, bool) and 0 <= size <= 65536, size
    model = ModelWindow(size, bool(esn), initial)
    for _ in range(r.u8() % 64):
        op = r.u8() % 5
        d = r.u8()
        arg: Any = (r.anyint() if d < 16 else (w.top + (r.u16() - 0x8000) * (1 + r.u8() % 64)) % M64 if d < 64
                    else (w.top + d - 160) % M64)
        name = ("check", "update", "seen", "infer", "accept")[op]
        if name in ("check", "infer", "accept") and isinstance(arg, int) and not isinstance(arg, bool):
            arg &= M32 - 1 if r.u8() & 3 else M64 - 1
        limit = M64 if name in ("update", "seen") else M32
        valid = isinstance(arg, int) and 0 <= arg < limit  # a bool is 0 or 1, as in Python arithmetic
        if name == "accept":
            got = window_outcome(lambda a: w.update(w.check(a)), arg)
            want = window_outcome(lambda a: model.update(model.check(a)), int(arg)) if valid else got
        else:
            got = window_outcome(getattr(w, name), arg)
            want = window_outcome(getattr(model, name), int(arg)) if valid and name != "seen" else got
        assert got == want, (w, name, arg, got, want)
        if not valid:
            assert got[0] == "error", (name, arg, got)
        assert w.top == model.top, (w, model)
    top = w.top
    for s in range(max(1, top - size + 1), top + 1) if size <= 1024 else ():
        if esn or s < M32:  # (a non-ESN window moved past 2^32 by update() cannot be asked through check())
            assert w.seen(s) == model_seen(model, s), (w, s)


def model_seen(m: ModelWindow, seq: int) -> bool:
    """Whether the model recorded seq, asked through check() (which changes nothing)."""
    low = seq & (M32 - 1)
    if m.esn and m.infer(low) != seq:
        raise AssertionError(f"{seq} is in the window but its low half infers {m.infer(low)}")
    try:
        m.check(low)
    except Drop as e:
        return e.reason == "replayed"
    return False


# -- targets 4 and 5: the fast path ---------------------------------------------------------------


class Wire:
    """The fast path's raw socket (AF_UNIX SOCK_SEQPACKET pair: sendto's address is ignored) and
    TUN device (a non-blocking pipe), drained after every input."""

    def __init__(self) -> None:
        self.raw, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.peer.setblocking(False)
        self.tun_r, self.tun_w = os.pipe()
        os.set_blocking(self.tun_r, False)
        os.set_blocking(self.tun_w, False)

    def drain(self) -> None:
        """Read back everything sent; every ESP packet and every TUN packet must be whole."""
        while True:
            try:
                p = self.peer.recv(70000)
            except BlockingIOError:
                break
            assert len(p) >= 56 and p[0] == 0x45 and (p[2] << 8 | p[3]) == len(p) and p[9] == 50, p[:20].hex()
        data = b""
        while True:
            try:
                chunk = os.read(self.tun_r, 1 << 20)
            except BlockingIOError:
                break
            if not chunk:
                break
            data += chunk
        while data:  # each write() of the fast path is one whole inner packet
            assert len(data) >= 24 and data[0] == 0x45, data[:24].hex()
            n = data[2] << 8 | data[3]
            assert 24 <= n <= len(data), data[:24].hex()
            data = data[n:]


WIRE = Wire()
FAST = FastPath(WIRE.raw.fileno(), WIRE.tun_w, TUN_IFINDEX)
POLICY = CounterPair()
DROPS: list[str] = []


def base_flows() -> list[tuple[Any, ...]]:
    """The flows every SA's traffic takes (learn() arguments): inbound SA, its allowed inner flow,
    outbound forward/output."""
    out: list[tuple[Any, ...]] = []
    for cfg in CONFIGS:
        out.append((KIND_INPUT_SA, 50, cfg.spi, cfg.src + cfg.dst, cfg.rx_core, (), 0))
        if cfg.mode == "tunnel":
            inner_flow = ip4(socket.inet_aton(INNER[0]), socket.inet_aton(INNER[1]), udp(cfg.sport, 53, b""), 17)[12:24]
        else:
            inner_flow = cfg.src + cfg.dst + udp(cfg.sport, 53, b"")[:4]
        out.append((KIND_INNER, 17, cfg.spi, inner_flow, cfg.rx_core, (POLICY,), 0))
        out.append((KIND_FORWARD, 17, 0, cfg.clear_out(b"")[12:24], cfg.tx_core, (POLICY, POLICY), 0xFFFF))
        out.append((KIND_OUTPUT, 17, 0, cfg.clear_out(b"")[12:24], cfg.tx_core, (POLICY, POLICY), 0xFFFF))
    return out


BASE = base_flows()


def learn_base() -> None:
    FAST.clear()
    for args in BASE:
        assert FAST.learn(*args)


learn_base()
BASE_FLOWS = FAST.stats()["flows"]


def on_drop_count(counter: str) -> None:
    DROPS.append(counter)


def on_drop_raise(counter: str) -> None:
    raise RuntimeError("on_drop failed")


def on_drop_clear(counter: str) -> None:
    FAST.clear()  # re-entrancy: the table is emptied while the fast path is in the middle of a packet


ON_DROP: tuple[Any, ...] = (None, on_drop_count, on_drop_raise, on_drop_clear)


def sa_limits(cfg: Config, r: Reader) -> None:
    """SA state that decides whether the fast path may go on (lifetime limits, sequence space)."""
    for c in (cfg.rx.counters, cfg.tx.counters):
        k = r.u8()
        c.fast_ok = not k & 1 or bool(r.u8() & 1)
        c.limit_packets = 0 if k & 2 == 0 else c.packets + r.u8() % 4
        c.limit_bytes = 0 if k & 4 == 0 else c.bytes + r.u16()
        c.deadline = 0.0 if k & 8 == 0 else (-1.0, time.monotonic() + 3600, time.monotonic() - 1)[r.u8() % 3]
    tx = cfg.tx.counters
    tx.seq_max = cfg.seq_limit()
    tx.seq = r.seq(tx.seq_max)


def fast_packet(r: Reader) -> tuple[int, bytes]:
    """(hook, packet) for FastPath.handle."""
    cfg = CONFIGS[r.u8() % len(CONFIGS)]
    k = r.u8() % 6
    if k == 0:  # raw bytes, maybe with the header checks passed
        how = r.u8()
        buf = bytearray(r.take(20 + r.u8()))
        fix_ip(buf, how, (50, 17, 6, 4, 41, 59, 1, r.u8())[how >> 4 & 7])
        if how & 128 and len(buf) >= 24:
            buf[12:20] = cfg.src + cfg.dst
            buf[20:24] = cfg.spi.to_bytes(4, "big")
        hook = HOOK_INPUT
    elif k in (1, 2):  # authentic ESP of the learnt flow (k 2: then edited)
        pt = plaintext(cfg, r)
        seq = 1 + r.u8() % 64 if r.u8() & 3 else r.seq(cfg.seq_limit())  # (windows start at 0 mostly)
        buf = bytearray(cfg.esp(seq, pt))
        if k == 2:
            edit(buf, r, 2)
            fix_ip(buf, r.u8() & 7)
        hook = HOOK_INPUT
    else:  # a clear packet of the learnt outbound flow (maybe edited, maybe up to 65535 bytes)
        buf = bytearray(cfg.clear_out(r.blob() if r.u8() % 16 else bytes(65480 + r.u8() % 28)))
        if k == 4:
            edit(buf, r, 2)
            fix_ip(buf, r.u8() & 7)
        elif k == 5:
            buf[6] |= r.u8() & 0x3F  # fragments
        hook = (HOOK_FORWARD, HOOK_OUTPUT)[r.u8() & 1]
    h = r.u8()
    if h >= 240:  # any hook value
        hook = (0, 4, 5, -1, 2**31 - 1, HOOK_INPUT, HOOK_FORWARD, HOOK_OUTPUT)[h & 7]
    return hook, bytes(buf)


def handle(hook: int, pkt: bytes, indev: int) -> None:
    before = FAST.stats()
    res = FAST.handle(hook, pkt, indev)
    after = FAST.stats()
    what = "punt" if res is None else "payload" if isinstance(res, tuple) else "dropped by on_drop" if (
        after["dropped"] > before["dropped"]) else res
    STATS[f"handle hook {hook}: {what}"] += 1
    if res is None:
        assert after["packets"] == before["packets"] and after["dropped"] == before["dropped"], (before, after)
    elif isinstance(res, tuple):
        verdict, payload = res
        assert verdict == 1 and hook == HOOK_INPUT and isinstance(payload, bytes), res
        assert len(payload) >= 24 and (payload[2] << 8 | payload[3]) == len(payload) and csum(payload[:20]) == 0
    else:
        assert res in (0, 1) and (res == 0 or hook != HOOK_INPUT), res
        assert after["packets"] + after["dropped"] == before["packets"] + before["dropped"] + 1, (before, after)


def target_fast(r: Reader) -> None:
    FAST.on_drop = ON_DROP[r.u8() % len(ON_DROP)]
    FAST.enabled = r.u8() % 16 != 0
    for cfg in CONFIGS:  # every input starts from the same state (reproducible failures)
        cfg.rx.replay = ReplayWindow(WINDOW, cfg.esn, 0)
        for c in (cfg.rx.counters, cfg.tx.counters):
            c.fast_ok, c.limit_packets, c.limit_bytes, c.deadline, c.seq = True, 0, 0, 0.0, 0
    for cfg in (CONFIGS[r.u8() % len(CONFIGS)], CONFIGS[r.u8() % len(CONFIGS)]):
        cfg.rx.replay = ReplayWindow(WINDOW, cfg.esn, r.seq(cfg.seq_limit()) if r.u8() & 1 else 0)
        sa_limits(cfg, r)
    for _ in range(1 + r.u8() % 8):
        hook, pkt = fast_packet(r)
        indev = (0, TUN_IFINDEX, r.u32())[r.u8() % 3]
        handle(hook, pkt, indev)
    WIRE.drain()


def target_learn(r: Reader) -> None:
    FAST.on_drop = on_drop_count
    FAST.enabled = True
    if r.u8() == 255:  # fill the table: learn() says False from TABLE_MAX (8192) flows on
        for i in range(8300):
            FAST.learn(KIND_FORWARD, 6, 0, i.to_bytes(12, "big"), CONFIGS[0].tx_core, (), 1500)
        assert FAST.stats()["table_full"] > 0
    for _ in range(r.u8() % 8):  # re-learn a known flow with another SA's core and policies
        args = list(BASE[r.u8() % len(BASE)])
        cfg = CONFIGS[r.u8() % len(CONFIGS)]
        args[4], args[5], args[6] = (cfg.rx_core, cfg.tx_core)[r.u8() & 1], (POLICY,) * (r.u8() % 3), r.u16()
        assert FAST.learn(*args)
    for _ in range(r.u8() % 16):
        cfg = CONFIGS[r.u8() % len(CONFIGS)]
        core = (cfg.rx_core, cfg.tx_core)[r.u8() & 1]
        kind: Any = r.u8() % 6 if r.u8() % 8 else r.anyint()
        proto: Any = r.u8() if r.u8() % 8 else r.anyint()
        spi: Any = (cfg.spi, r.u32())[r.u8() & 1] if r.u8() % 8 else r.anyint()
        flow = r.take(r.u8() % 16)
        npol = r.u8() % 4
        policies: Any = (POLICY,) * npol if npol < 3 or r.u8() & 1 else (POLICY, 1)
        max_len: Any = r.u16() if r.u8() % 8 else r.anyint()
        try:
            ok = FAST.learn(kind, proto, spi, flow, core, policies, max_len)
        except (ValueError, TypeError, OverflowError):
            continue
        assert ok is True or ok is False
    for _ in range(1 + r.u8() % 4):
        hook, pkt = fast_packet(r)
        if r.u8() & 1 and len(pkt) >= 24:  # a packet of one of the flows just learnt, maybe
            pkt = pkt[:12] + r.take(12).ljust(12, b"\0") + pkt[24:]
        handle(hook, pkt, (0, TUN_IFINDEX)[r.u8() & 1])
    WIRE.drain()
    learn_base()


# -- target 6: an AEAD object that misbehaves ---------------------------------------------------------


class FlakyAead:
    """Wraps an SA's AEAD; `mode` makes encrypt()/decrypt() raise, return the wrong type or length,
    or return a bytes object that is shared (refcount > 1). Not something the cryptography package
    does, but the C core must turn it into an exception or a punt, never into a crash."""

    def __init__(self, real: Any) -> None:
        self.real, self.mode, self.shared = real, 0, [b"\x45" + bytes(63)]

    def _result(self, out: bytes) -> Any:
        m = self.mode
        if m == 1:
            raise ValueError("flaky AEAD")
        if m == 2:
            return out.decode("latin-1")
        if m == 3:
            return out[:1]
        if m == 4:
            self.shared.append(out)
            return self.shared[-1]  # one more reference than a fresh result
        if m == 5:
            return bytearray(out)
        if m == 6:
            return out + b"x"
        return out

    def encrypt(self, nonce: bytes, data: bytes, aad: bytes) -> Any:
        return self._result(self.real.encrypt(nonce, data, aad))

    def decrypt(self, nonce: bytes, data: Any, aad: bytes) -> Any:
        return self._result(self.real.decrypt(nonce, data, aad))


def target_flaky(r: Reader) -> None:
    cfg = CONFIGS[r.u8() % len(CONFIGS)]
    aead = FlakyAead(cfg.cipher)
    aead.mode = r.u8() % 8
    counters = type(cfg.rx.counters)()
    counters.fast_ok, counters.seq_max = True, cfg.seq_limit()
    core = EspCore(aead, cfg.salt, cfg.spi, cfg.esn, cfg.mode == "tunnel", cfg.dst, cfg.src, cfg.tfc_pad, counters,
                   ReplayWindow(WINDOW, cfg.esn, 0))
    pkt = cfg.esp(1 + r.u8() % 8, plaintext(cfg, r))
    try:
        res = core.decap(pkt)
        assert res is None or isinstance(res, bytes)
    except (Drop, ValueError, RuntimeError, SystemError) as e:  # SystemError: _PyBytes_Resize of a shared object
        STATS[f"flaky decap {type(e).__name__}"] += 1
    try:
        res = core.encap(cfg.clear_out(r.blob()), 1 + r.u8(), 0)
        assert res is None or isinstance(res, bytes)
    except (ValueError, RuntimeError) as e:
        STATS[f"flaky encap {type(e).__name__}"] += 1
    FAST.on_drop = ON_DROP[r.u8() % 2]
    for args in BASE:  # this SA's flows through the flaky core
        if args[4] in (cfg.rx_core, cfg.tx_core):
            assert FAST.learn(args[0], args[1], args[2], args[3], core, args[5], args[6])
    for _ in range(1 + r.u8() % 4):
        seq = 1 + r.u8() % 64
        if r.u8() & 1:
            handle(HOOK_INPUT, cfg.esp(seq, plaintext(cfg, r)), 0)
        else:
            handle((HOOK_FORWARD, HOOK_OUTPUT)[r.u8() & 1], cfg.clear_out(r.blob()), 0)
    WIRE.drain()
    learn_base()


TARGETS: tuple[Callable[[Reader], None], ...] = (
    target_decap_raw, target_decap_authentic, target_encap, target_replay, target_fast, target_learn, target_flaky)


def test_one_input(data: bytes) -> None:
    r = Reader(data)
    TARGETS[r.u8() % len(TARGETS)](r)
    if FAST.stats()["flows"] != BASE_FLOWS:  # on_drop_clear emptied it
        learn_base()


# -- drivers ----------------------------------------------------------------------------------------


def seeds() -> list[bytes]:
    """A few inputs per target and SA (valid packets, mostly)."""
    out = []
    for i in range(len(CONFIGS)):
        out.append(bytes((1, i, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 40)))
        out.append(bytes((2, i, 1, 2)) + bytes(8) + bytes((0, 1, 1, 0, 40)) + bytes(40))
        out.append(bytes((4, 1, 1, i, 1, 0, 0, 0, 0, 1, 0, i, 1, 1, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 40)))
        out.append(bytes((4, 1, 1, i, 1, 0, 0, 0, 0, 1, 0, i, 3, 0, 40)))
    out.append(bytes((3, 0, 0, 64, 1)) + bytes(20))
    return out


def write_seeds(directory: str) -> int:
    os.makedirs(directory, exist_ok=True)
    for n, s in enumerate(seeds()):
        with open(os.path.join(directory, f"seed_{n:03d}"), "wb") as f:
            f.write(s)
    return len(seeds())


def mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randrange(1, 9)):
        k = rng.randrange(len(TARGETS))
        pos = rng.randrange(len(buf) + 1)
        if k == 0 and buf and pos < len(buf):
            buf[pos] ^= 1 << rng.randrange(8)
        elif k == 1 and pos < len(buf):
            buf[pos] = rng.choice((0, 1, 0x45, 0x7F, 0x80, 0xFF, rng.randrange(256)))
        elif k == 2:
            buf[pos:pos] = rng.randbytes(rng.randrange(1, 16))
        elif k == 3:
            del buf[pos : pos + rng.randrange(1, 16)]
        elif k == 4 and pos < len(buf):
            buf[0] = rng.randrange(len(TARGETS))  # another target, same data
        else:
            buf[pos:pos] = rng.randbytes(2)
    return bytes(buf)


def random_run(seconds: float, runs: int, seed: int) -> int:
    """Seeded random inputs: fresh ones and mutations of the seeds and of earlier inputs, until
    `seconds` or `runs` (0: no limit). A failing input is written to ./crash-espcore-<n> first."""
    rng = random.Random(seed)
    pool = seeds()
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline and (runs == 0 or n < runs):
        k = rng.randrange(4)
        if k == 0:
            data = bytes((rng.randrange(len(TARGETS)),)) + rng.randbytes(rng.randrange(600))
        else:
            data = mutate(rng, rng.choice(pool))
        try:
            test_one_input(data)
        except Exception:
            name = f"crash-espcore-{seed}-{n}"
            with open(name, "wb") as f:
                f.write(data)
            print(f"failure on input {n} (saved as {name}): {data.hex()}", file=sys.stderr)
            raise
        if len(pool) < 4096 and rng.randrange(8) == 0:
            pool.append(data)
        n += 1
    return n


def replay(paths: list[str]) -> int:
    """Run every input (files, or the files in directories) once; a failure names its file."""
    files = []
    for p in paths:
        files += [os.path.join(p, f) for f in sorted(os.listdir(p))] if os.path.isdir(p) else [p]
    for name in files:
        with open(name, "rb") as f:
            data = f.read()
        try:
            test_one_input(data)
        except Exception:
            print(f"failure on {name}: {data.hex()}", file=sys.stderr)
            raise
    return len(files)


def main() -> None:
    args = sys.argv[1:]
    if len(args) == 2 and args[0] == "--write-seeds":
        print(f"{write_seeds(args[1])} seeds written to {args[1]}")
    elif len(args) >= 2 and args[0] == "--random":
        runs = int(args[2]) if len(args) > 2 else 0
        seed = int(args[3]) if len(args) > 3 else int.from_bytes(os.urandom(4), "big")
        t0 = time.monotonic()
        n = random_run(float(args[1]), runs, seed)
        for what, count in sorted(STATS.items()):
            print(f"{count:9d}  {what}")
        print(f"{n} inputs in {time.monotonic() - t0:.0f} s (seed {seed}): no failure")
    elif args and args[0] == "--replay":
        print(f"{replay(args[1:])} inputs replayed: no failure")
    else:
        try:
            import atheris
        except ImportError:
            sys.exit("atheris is not installed: use --random or --replay, or pip install atheris")
        atheris.instrument_all()  # the harness's own branches are most of the signal (the C code gives none)
        atheris.Setup(sys.argv, test_one_input)
        atheris.Fuzz()


if __name__ == "__main__":
    main()
