"""SecurityAssociation: validation, key secrecy, sequence numbers, lifetimes, counters."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from typing import Any

import pytest

from nfq_ipsec import counters
from nfq_ipsec.errors import Drop
from nfq_ipsec.packet import ipv4_header, ipv6_header
from nfq_ipsec.sa import DEAD, DYING, MATURE, Lifetime, SaEvent, SecurityAssociation

M32 = 1 << 32
GCM_KEY = bytes(range(0x10, 0x24))  # 16-byte AES key + 4-byte salt
CBC_KEY = bytes(range(0x40, 0x50))
HMAC_KEY = bytes(range(0x80, 0xA0))  # 32 bytes for hmac-sha256-128
ALL_KEYS = (GCM_KEY, CBC_KEY, HMAC_KEY)

V4 = {"src": "192.0.2.1", "dst": "198.51.100.2"}
V6 = {"src": "2001:db8::1", "dst": "2001:db8:1::2"}


def udp4(payload: bytes = b"x" * 72, src: str = "192.0.2.1", dst: str = "198.51.100.2") -> bytes:
    import ipaddress

    udp = struct.pack("!HHHH", 4000, 5000, 8 + len(payload), 0) + payload
    return ipv4_header(ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed, 17, len(udp)) + udp


def udp6(payload: bytes = b"y" * 50) -> bytes:
    import ipaddress

    udp = struct.pack("!HHHH", 4000, 5000, 8 + len(payload), 0) + payload
    return ipv6_header(ipaddress.ip_address(V6["src"]).packed, ipaddress.ip_address(V6["dst"]).packed, 17,
                       len(udp)) + udp


def make(**kw: Any) -> SecurityAssociation:
    args: dict[str, Any] = {"name": "sa1", "proto": "ah", "mode": "transport", "spi": 0x1001,
                            "auth": "hmac-sha256-128", "auth_key": HMAC_KEY, **V4}
    args.update(kw)
    return SecurityAssociation(**args)


def esp_gcm(**kw: Any) -> SecurityAssociation:
    args: dict[str, Any] = {"proto": "esp", "mode": "tunnel", "aead": "aes-gcm-128", "key": GCM_KEY,
                            "auth": None, "auth_key": b""}
    args.update(kw)
    return make(**args)


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def without_crypto(sa: SecurityAssociation) -> SecurityAssociation:
    """Replace the transform calls by identity so lifetime logic is tested on its own."""
    object.__setattr__(sa, "_encap", lambda _sa, pkt, _seq: b"P" + bytes(pkt))
    object.__setattr__(sa, "_decap", lambda _sa, pkt: bytes(pkt)[1:])
    return sa


# -- validation -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "fragment"),
    [
        ({"name": ""}, "name must be"),
        ({"name": "has space"}, "name must be"),
        ({"name": "x" * 65}, "name must be"),
        ({"proto": "gre"}, "proto must be"),
        ({"mode": "beet"}, "mode must be"),
        ({"src": "192.0.2.300"}, "src is not an IP address"),
        ({"dst": "host.example"}, "dst is not an IP address"),
        ({"dst": "2001:db8::2"}, "different address families"),
        ({"mode": "tunnel", "src": "2001:db8::1"}, "different address families"),
        ({"src": "0.0.0.0"}, "src must not be the unspecified"),
        ({"spi": 0}, "spi 0 is invalid"),
        ({"spi": 1}, "reserved"),
        ({"spi": 255}, "reserved"),
        ({"spi": M32}, "spi must be a 32-bit"),
        ({"spi": -5}, "spi must be a 32-bit"),
        ({"spi": True}, "spi must be a 32-bit"),
        ({"spi": "0x1001"}, "spi must be a 32-bit"),
        ({"esn": 1}, "esn must be"),
        ({"replay_window": -1}, "replay_window must be"),
        ({"replay_window": 65537}, "replay_window must be"),
        ({"esn": True, "replay_window": 0}, "esn needs replay_window > 0"),
        ({"seq_start": M32}, "seq_start must be"),
        ({"seq_start": -1}, "seq_start must be"),
        ({"esn": True, "seq_start": 1 << 64}, "seq_start must be"),
        ({"lifetime": {"hard_packets": 5}}, "lifetime must be a Lifetime"),
        ({"tfc_pad": 100}, "tfc_pad is only possible with ESP in tunnel mode"),
        ({"tfc_pad": -1}, "tfc_pad must be"),
        ({"icv_len": 0}, "icv_len must be"),
        ({"auth_key": "secret"}, "auth_key must be bytes"),
        ({"auth": None}, "AH needs auth"),
        ({"enc": "aes-cbc-128"}, "AH only authenticates"),
        ({"aead": "aes-gcm-128"}, "AH only authenticates"),
        ({"key": GCM_KEY}, "AH takes its key as auth_key"),
        ({"auth": "hmac-md5"}, "hmac-md5"),
        ({"auth_key": HMAC_KEY[:20]}, "SA sa1: "),
        ({"proto": "esp", "auth": None}, "ESP needs aead, or enc and auth"),
        ({"proto": "esp"}, "needs enc"),
        ({"proto": "esp", "enc": "aes-cbc-128", "enc_key": CBC_KEY, "auth": None},
         "without auth is not allowed"),
        ({"proto": "esp", "aead": "aes-gcm-128", "key": GCM_KEY}, "excludes enc and auth"),
        ({"proto": "esp", "aead": "aes-gcm-128", "key": GCM_KEY, "auth": None}, "key as 'key'"),
        ({"proto": "esp", "aead": "aes-gcm-128", "key": GCM_KEY[:16], "auth": None, "auth_key": b""},
         "20-byte"),
        ({"proto": "esp", "enc": "aes-cbc-128", "enc_key": CBC_KEY, "key": GCM_KEY}, "'key' is for aead"),
        ({"proto": "esp", "enc": "des", "enc_key": CBC_KEY}, "des"),
        ({"proto": "esp", "aead": "aes-gcm-128", "key": GCM_KEY, "auth": None, "auth_key": b"",
          "icv_len": 10}, "icv_len"),
    ],
)
def test_validation(kw: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        make(**kw)


@pytest.mark.parametrize(
    ("kw", "fragment"),
    [
        ({"hard_packets": -1}, "hard_packets must be"),
        ({"soft_bytes": 1.5}, "soft_bytes must be an integer"),
        ({"hard_seconds": "10"}, "hard_seconds must be"),
        ({"soft_packets": True}, "soft_packets must be"),
        ({"soft_packets": 10, "hard_packets": 5}, "soft_packets"),
        ({"soft_seconds": 10.5, "hard_seconds": 10}, "larger than hard_seconds"),
    ],
)
def test_lifetime_validation(kw: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        Lifetime(**kw)


def test_attributes() -> None:
    sa = make(mode="tunnel", **V6, spi=0xDEADBEEF, replay_window=128, esn=True, seq_start=7)
    assert sa.family == 6 and sa.proto_num == 51
    assert sa.src_packed == bytes.fromhex("20010db8000000000000000000000001")
    assert sa.dst_packed == bytes.fromhex("20010db8000100000000000000000002")
    assert str(sa.dst) == "2001:db8:1::2"
    assert sa.replay.size == 128 and sa.replay.esn and sa.replay.top == 7
    assert sa.state == MATURE and sa.seq == 7
    assert sa.next_seq() == 8  # the first packet carries seq_start + 1
    assert sa.transform.icv_len == 16 and sa.icv_len == 16


# -- key secrecy -------------------------------------------------------------------------------------


def key_leaks(text: str) -> list[bytes]:
    low = text.lower()
    return [k for k in ALL_KEYS if k.hex() in low or repr(k) in text or k[:8].hex() in low]


def test_ah_sa_never_shows_its_key() -> None:
    sa = make()
    for text in (repr(sa), str(sa), json.dumps(sa.describe()), repr(sa.describe()), repr(sa.transform)):
        assert key_leaks(text) == [], text


def test_esp_sas_never_show_keys() -> None:
    for sa in (
        esp_gcm(),
        make(proto="esp", enc="aes-cbc-128", enc_key=CBC_KEY, mode="tunnel", tfc_pad=200),
    ):
        for text in (repr(sa), str(sa), json.dumps(sa.describe()), repr(sa.transform)):
            assert key_leaks(text) == [], text


def test_describe() -> None:
    clock = FakeClock()
    sa = make(lifetime=Lifetime(soft_packets=10, hard_packets=20), clock=clock, seq_start=41)
    clock.t += 2.5
    d = sa.describe()
    assert d["spi"] == "0x00001001"
    assert d["proto"] == "ah" and d["mode"] == "transport" and d["src"] == "192.0.2.1"
    assert d["auth"] == "hmac-sha256-128" and d["aead"] is None and d["enc"] is None
    assert d["replay_window"] == 32 and d["esn"] is False and d["seq"] == 41
    assert d["lifetime"]["hard_packets"] == 20
    assert d["state"] == "mature" and d["age_seconds"] == 2.5
    assert d["counters"] == {"packets": 0, "bytes": 0, "replay_drops": 0, "integrity_failures": 0,
                             "format_errors": 0, "expired_drops": 0, "seq_exhausted": 0}
    assert "0x00001001" in repr(sa) and "sa1" in repr(sa)


# -- sequence numbers ------------------------------------------------------------------------------


def test_seq_exhaustion_without_esn() -> None:
    events: list[SaEvent] = []
    sa = make(seq_start=M32 - 3, on_event=events.append)
    assert sa.next_seq() == M32 - 2
    assert sa.next_seq() == M32 - 1  # the last valid one is used
    for _ in range(3):
        with pytest.raises(Drop) as e:
            sa.next_seq()
        assert e.value.counter == counters.XFRM_OUT_STATE_SEQ_ERROR
    assert events == [SaEvent("seq-exhausted", "sa1", events[0].reason)]
    assert sa.counters.seq_exhausted == 3
    assert sa.seq == M32 - 1  # never cycles


def test_seq_with_esn_crosses_2_32_and_stops_at_2_64() -> None:
    events: list[SaEvent] = []
    sa = make(esn=True, seq_start=M32 - 2, on_event=events.append)
    assert [sa.next_seq() for _ in range(3)] == [M32 - 1, M32, M32 + 1]
    sa2 = make(esn=True, seq_start=(1 << 64) - 2, on_event=events.append)
    assert sa2.next_seq() == (1 << 64) - 1
    with pytest.raises(Drop):
        sa2.next_seq()
    assert [e.kind for e in events] == ["seq-exhausted"]


def test_protect_refuses_when_exhausted() -> None:
    sa = make(seq_start=M32 - 1)
    with pytest.raises(Drop) as e:
        sa.protect(udp4())
    assert e.value.counter == counters.XFRM_OUT_STATE_SEQ_ERROR
    assert sa.counters.packets == 0


# -- real round trips ------------------------------------------------------------------------------


def pair(
    factory: Callable[..., SecurityAssociation], **kw: Any
) -> tuple[SecurityAssociation, SecurityAssociation]:
    return factory(name="out", **kw), factory(name="in", **kw)


@pytest.mark.parametrize("kind", ["ah-v4", "ah-v6-tunnel", "esp-gcm", "esp-cbc-v6"])
def test_round_trip_counts_cleartext_bytes(kind: str) -> None:
    if kind == "ah-v4":
        out, inn = pair(make)
        pkts = [udp4(b"a" * n) for n in (0, 1, 100)]
    elif kind == "ah-v6-tunnel":
        out, inn = pair(make, mode="tunnel", **V6)
        pkts = [udp6(b"b" * n) for n in (3, 40)] + [udp4()]  # 4-in-6
    elif kind == "esp-gcm":
        out, inn = pair(esp_gcm)
        pkts = [udp4(b"c" * n) for n in (0, 17, 1000)]
    else:
        out, inn = pair(make, proto="esp", enc="aes-cbc-128", enc_key=CBC_KEY, **V6)
        pkts = [udp6(b"d" * n) for n in (0, 15, 16, 300)]
    wire = [out.protect(p) for p in pkts]
    assert [inn.unprotect(w) for w in wire] == pkts
    total = sum(len(p) for p in pkts)
    for sa in (out, inn):
        assert sa.counters.packets == len(pkts)
        assert sa.counters.bytes == total  # the cleartext packet length, both directions
    assert out.seq == len(pkts) and inn.replay.top == len(pkts)
    # replay, tampering and garbage are counted on the SA and raised as Drop
    with pytest.raises(Drop) as e:
        inn.unprotect(wire[1])
    assert e.value.counter == counters.XFRM_IN_STATE_SEQ_ERROR
    assert inn.counters.replay_drops == 1
    fresh = out.protect(pkts[0])
    bad = bytearray(fresh)
    bad[-1] ^= 1
    with pytest.raises(Drop):
        inn.unprotect(bytes(bad))
    assert inn.counters.integrity_failures == 1
    assert inn.unprotect(fresh) == pkts[0]  # the forged copy did not consume its sequence number
    with pytest.raises(Drop):
        inn.unprotect(b"\x45garbage")
    assert inn.counters.packets == len(pkts) + 1


def test_esn_round_trip_across_2_32() -> None:
    out, inn = pair(make, esn=True, seq_start=M32 - 3, replay_window=64)
    wire = [out.protect(udp4(bytes([i]) * 10)) for i in range(6)]
    # late delivery around the boundary
    order = [0, 3, 1, 5, 2, 4]
    for i in order:
        assert inn.unprotect(wire[i]) == udp4(bytes([i]) * 10)
    assert inn.replay.top == M32 + 3 and out.seq == M32 + 3
    # the low 32 bits on the wire wrapped: AH carries 3 in the sequence field of the last packet
    assert struct.unpack_from("!I", wire[5], 20 + 8)[0] == 3
    with pytest.raises(Drop):
        inn.unprotect(wire[2])


def test_esn_mismatch_fails_integrity() -> None:
    out = make(name="out", esn=True, seq_start=M32 + 10)
    inn = make(name="in", esn=True, seq_start=10)  # believes it is still in the first subspace
    with pytest.raises(Drop):
        inn.unprotect(out.protect(udp4()))
    assert inn.counters.integrity_failures == 1
    assert inn.replay.top == 10


# -- lifetimes ---------------------------------------------------------------------------------------


def test_packet_lifetimes() -> None:
    events: list[SaEvent] = []
    sa = without_crypto(make(lifetime=Lifetime(soft_packets=3, hard_packets=5), on_event=events.append))
    for i in range(1, 6):
        assert sa.protect(b"pkt") == b"Ppkt"
        assert sa.state == (MATURE if i < 3 else DYING if i < 5 else DEAD)
    assert [e.kind for e in events] == ["soft-expire", "hard-expire"]
    assert events[0] == SaEvent("soft-expire", "sa1", "soft lifetime of 3 packets reached")
    assert "5 packets" in events[1].reason
    with pytest.raises(Drop) as e:
        sa.protect(b"pkt")
    assert e.value.counter == counters.XFRM_OUT_STATE_EXPIRED
    with pytest.raises(Drop) as e:
        sa.unprotect(b"Ppkt")  # dead for both uses
    assert e.value.counter == counters.XFRM_IN_STATE_EXPIRED
    assert sa.counters.packets == 5 and sa.counters.expired_drops == 2
    assert len(events) == 2


def test_byte_lifetimes_count_both_directions() -> None:
    events: list[SaEvent] = []
    sa = without_crypto(make(lifetime=Lifetime(soft_bytes=250, hard_bytes=400), on_event=events.append))
    sa.protect(b"x" * 100)
    sa.unprotect(b"P" + b"x" * 100)
    assert sa.state == MATURE and sa.counters.bytes == 200
    sa.protect(b"x" * 100)
    assert sa.state == DYING and [e.kind for e in events] == ["soft-expire"]
    sa.protect(b"x" * 99)
    assert sa.state == DYING
    sa.unprotect(b"P" + b"x")
    assert sa.state == DEAD and [e.kind for e in events] == ["soft-expire", "hard-expire"]
    assert "400 bytes" in events[1].reason


def test_hard_limit_alone_and_soft_equal_hard() -> None:
    events: list[SaEvent] = []
    sa = without_crypto(make(lifetime=Lifetime(soft_packets=2, hard_packets=2), on_event=events.append))
    sa.protect(b"a")
    sa.protect(b"b")
    assert sa.state == DEAD and [e.kind for e in events] == ["hard-expire"]  # no soft event once dead


def test_time_lifetimes() -> None:
    clock = FakeClock()
    events: list[SaEvent] = []
    sa = without_crypto(make(lifetime=Lifetime(soft_seconds=10, hard_seconds=20.5), clock=clock,
                             on_event=events.append))
    clock.t += 9.9
    sa.protect(b"a")
    assert sa.poll_expiry() == MATURE and events == []
    clock.t += 0.1
    assert sa.poll_expiry() == DYING  # expiry without traffic
    assert [e.kind for e in events] == ["soft-expire"]
    sa.protect(b"a")  # dying SAs still work
    clock.t += 10.5
    with pytest.raises(Drop) as e:
        sa.unprotect(b"Pa")
    assert e.value.counter == counters.XFRM_IN_STATE_EXPIRED
    assert sa.state == DEAD and [e.kind for e in events] == ["soft-expire", "hard-expire"]
    assert sa.poll_expiry() == DEAD and len(events) == 2
    assert sa.age == pytest.approx(20.5)


def test_hard_time_without_traffic_skips_soft_event() -> None:
    clock = FakeClock()
    events: list[SaEvent] = []
    sa = make(lifetime=Lifetime(soft_seconds=10, hard_seconds=20), clock=clock, on_event=events.append)
    clock.t += 30
    assert sa.poll_expiry() == DEAD
    assert [e.kind for e in events] == ["hard-expire"]


def test_unlimited_sa_never_expires() -> None:
    clock = FakeClock()
    sa = without_crypto(make(clock=clock))
    clock.t += 1e9
    for _ in range(100):
        sa.protect(b"z")
    assert sa.poll_expiry() == MATURE


def test_manual_expiry_and_broken_listener() -> None:
    def boom(_e: SaEvent) -> None:
        raise RuntimeError("listener bug")

    sa = without_crypto(make(on_event=boom))
    sa.expire(hard=False)
    assert sa.state == DYING
    sa.protect(b"q")  # the listener's exception never reaches the packet path
    sa.expire()
    assert sa.state == DEAD
    with pytest.raises(Drop):
        sa.protect(b"q")


def test_each_event_fires_once_and_dead_stays_dead() -> None:
    events: list[SaEvent] = []
    sa = make(on_event=events.append)
    sa.expire(hard=False, reason="rekey now")
    sa.expire(hard=False)
    assert events == [SaEvent("soft-expire", "sa1", "rekey now")]
    sa.expire()
    sa.expire()
    sa.expire(hard=False)  # no resurrection
    assert sa.state == DEAD
    assert [e.kind for e in events] == ["soft-expire", "hard-expire"]
