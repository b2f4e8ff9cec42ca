"""The scheme-two decisions of Pipeline.process, hook by hook, without sockets or root."""

from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6

from nfq_ipsec.config import parse_config
from nfq_ipsec.counters import Counters
from nfq_ipsec.pipeline import (
    HOOK_FORWARD,
    HOOK_INPUT,
    HOOK_OUTPUT,
    NF_ACCEPT,
    NF_DROP,
    InjectTunnel,
    Pipeline,
    SendIcmp,
    SendPacket,
)
from nfq_ipsec.sad import Sad
from nfq_ipsec.spd import Spd

# This host: 192.0.2.1 (transport with 192.0.2.2) and gateway 203.0.113.1 for 192.0.2.0/25
# (tunnel to 198.51.100.1 for 192.0.2.128/25).
CONFIG = """
[engine]
default_policy = "bypass"

[[sa]]
name = "a-b"
proto = "esp"
mode = "transport"
src = "192.0.2.1"
dst = "192.0.2.2"
spi = 0x1001
aead = "aes-gcm-128"
key = "0x0102030405060708090a0b0c0d0e0f1011121314"

[[sa]]
name = "b-a"
proto = "esp"
mode = "transport"
src = "192.0.2.2"
dst = "192.0.2.1"
spi = 0x1002
enc = "aes-cbc-128"
enc_key = "0x2122232425262728292a2b2c2d2e2f30"
auth = "hmac-sha256-128"
auth_key = "0x3132333435363738393a3b3c3d3e3f404142434445464748494a4b4c4d4e4f50"

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
aead = "aes-gcm-256"
key = "0x8888888888888888888888888888888888888888888888888888888888888888aabbccdd"

[[policy]]
name = "telnet-discard"
dir = "out"
src = "192.0.2.0/25"
dst = "192.0.2.128/25"
proto = "tcp"
dport = 23
action = "discard"
priority = 10

[[policy]]
name = "out-h"
dir = "out"
src = "192.0.2.1/32"
dst = "192.0.2.2/32"
action = "protect"
sa = "a-b"
priority = 50

[[policy]]
name = "in-h"
dir = "in"
src = "192.0.2.2/32"
dst = "192.0.2.1/32"
action = "protect"
sa = "b-a"
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
name = "fwd-net"
dir = "fwd"
src = "192.0.2.128/25"
dst = "192.0.2.0/25"
action = "protect"
sa = "gw-in"
priority = 100

[[policy]]
name = "in-discard"
dir = "in"
src = "203.0.113.0/24"
proto = "udp"
action = "discard"
"""

LOCAL = {"192.0.2.1", "203.0.113.1"}


def _peer(name: str):  # type: ignore[no-untyped-def]
    """An independent copy of an SA (fresh state), as the peer would hold it."""
    return next(s for s in parse_config(CONFIG).sas if s.name == name)


@pytest.fixture
def env():  # type: ignore[no-untyped-def]
    import ipaddress

    cfg = parse_config(CONFIG)
    spd, sad = Spd(cfg.engine.default_actions()), Sad()
    for sa in cfg.sas:
        sad.add(sa)
    for p in cfg.policies:
        spd.add(p)
    counters = Counters()
    mtu = {"value": 1500}
    pipe = Pipeline(spd, sad, counters,
                    is_local=lambda fam, a: str(ipaddress.ip_address(a)) in LOCAL,
                    path_mtu=lambda fam, dst: mtu["value"])
    return pipe, counters, mtu


def test_output_protect_sends_esp_the_peer_can_open(env) -> None:  # type: ignore[no-untyped-def]
    pipe, _counters, _ = env
    pkt = bytes(IP(src="192.0.2.1", dst="192.0.2.2") / UDP(sport=1, dport=2) / b"hello")
    d = pipe.process(HOOK_OUTPUT, pkt)
    assert d.verdict == NF_DROP and d.policy == "out-h" and d.sa == "a-b"
    (send,) = d.actions
    assert isinstance(send, SendPacket) and len(send.packets) == 1
    assert _peer("a-b").unprotect(send.packets[0]) == pkt


def test_input_esp_is_decrypted_and_handed_back(env) -> None:  # type: ignore[no-untyped-def]
    pipe, counters, _ = env
    inner = bytes(IP(src="192.0.2.2", dst="192.0.2.1") / TCP(sport=5, dport=6) / (b"x" * 100))
    d = pipe.process(HOOK_INPUT, _peer("b-a").protect(inner))
    assert (d.verdict, d.payload, d.policy) == (NF_ACCEPT, inner, "in-h")
    assert counters.snapshot() == {}


def test_input_unknown_spi_and_replay_are_counted(env) -> None:  # type: ignore[no-untyped-def]
    pipe, counters, _ = env
    inner = bytes(IP(src="192.0.2.2", dst="192.0.2.1") / UDP() / b"y")
    peer = _peer("b-a")
    esp = peer.protect(inner)
    assert pipe.process(HOOK_INPUT, esp).verdict == NF_ACCEPT
    assert pipe.process(HOOK_INPUT, esp).verdict == NF_DROP  # replayed
    assert counters.get("XfrmInStateSeqError") == 1
    bogus = bytearray(esp)
    bogus[20:24] = (0x7777).to_bytes(4, "big")
    assert pipe.process(HOOK_INPUT, bytes(bogus)).verdict == NF_DROP
    assert counters.get("XfrmInNoStates") == 1


def test_input_clear_packet_matching_protect_policy_is_dropped(env) -> None:  # type: ignore[no-untyped-def]
    pipe, counters, _ = env
    d = pipe.process(HOOK_INPUT, bytes(IP(src="192.0.2.2", dst="192.0.2.1") / ICMP()))
    assert d.verdict == NF_DROP and counters.get("NfqInCleartextProtected") == 1
    d = pipe.process(HOOK_INPUT, bytes(IP(src="203.0.113.9", dst="192.0.2.1") / UDP()))
    assert d.verdict == NF_DROP and counters.get("XfrmInPolBlock") == 1
    d = pipe.process(HOOK_INPUT, bytes(IP(src="203.0.113.9", dst="192.0.2.1") / TCP()))
    assert d.verdict == NF_ACCEPT


def test_tunnel_input_is_reinjected_after_fwd_policy_check(env) -> None:  # type: ignore[no-untyped-def]
    pipe, counters, _ = env
    peer = _peer("gw-in")
    inner = bytes(IP(src="192.0.2.130", dst="192.0.2.10") / UDP(dport=53) / b"q")
    d = pipe.process(HOOK_INPUT, peer.protect(inner))
    assert d.verdict == NF_DROP and d.policy == "fwd-net"
    assert [type(a) for a in d.actions] == [InjectTunnel] and d.actions[0].packet == inner  # type: ignore[union-attr]
    # correctly keyed, but the inner source is outside the SA's policy: RFC 4301 §5.2 step 4
    spoof = bytes(IP(src="203.0.113.66", dst="192.0.2.10") / UDP() / b"s")
    d = pipe.process(HOOK_INPUT, peer.protect(spoof))
    assert d.verdict == NF_DROP and not d.actions and counters.get("XfrmInTmplMismatch") == 1


def test_forward_protect_fragments_after_encryption(env) -> None:  # type: ignore[no-untyped-def]
    pipe, _counters, mtu = env
    mtu["value"] = 1000
    pkt = bytes(IP(src="192.0.2.10", dst="192.0.2.130", flags=0) / UDP() / (b"z" * 2500))
    d = pipe.process(HOOK_FORWARD, pkt)
    (send,) = d.actions
    assert isinstance(send, SendPacket) and len(send.packets) == 3
    assert all(len(f) <= 1000 for f in send.packets)
    from scapy.layers.inet import defragment

    whole = bytes(defragment([IP(f) for f in send.packets])[0])
    assert _peer("gw-out").unprotect(whole) == pkt


def test_forward_df_too_big_gets_frag_needed_with_esp_mtu(env) -> None:  # type: ignore[no-untyped-def]
    pipe, counters, _ = env
    pkt = bytes(IP(src="192.0.2.10", dst="192.0.2.130", flags="DF") / UDP() / (b"z" * 1472))
    d = pipe.process(HOOK_FORWARD, pkt)
    (icmp,) = d.actions
    assert isinstance(icmp, SendIcmp) and icmp.dst == bytes([192, 0, 2, 10])
    msg = ICMP(icmp.message)
    assert (msg.type, msg.code) == (3, 4)
    assert 1400 < msg.nexthopmtu < 1500
    # a packet of exactly that size fits after encryption
    fits = bytes(IP(src="192.0.2.10", dst="192.0.2.130", flags="DF") / UDP() / (b"z" * (msg.nexthopmtu - 28)))
    (send,) = pipe.process(HOOK_FORWARD, fits).actions
    assert isinstance(send, SendPacket) and len(send.packets) == 1 and len(send.packets[0]) <= 1500
    assert counters.get("NfqOutTooBig") == 1


def test_forward_discard_reports_admin_prohibited(env) -> None:  # type: ignore[no-untyped-def]
    pipe, counters, _ = env
    d = pipe.process(HOOK_FORWARD, bytes(IP(src="192.0.2.10", dst="192.0.2.130") / TCP(dport=23)))
    assert d.verdict == NF_DROP and d.policy == "telnet-discard"
    (icmp,) = d.actions
    msg = ICMP(icmp.message)  # type: ignore[union-attr]
    assert (msg.type, msg.code) == (3, 13)
    assert counters.get("NfqFwdPolBlock") == 1


def test_forward_clear_packet_claiming_to_be_from_the_tunnel_is_dropped(env) -> None:  # type: ignore[no-untyped-def]
    pipe, counters, _ = env
    forged = bytes(IP(src="192.0.2.130", dst="192.0.2.10") / UDP())
    assert pipe.process(HOOK_FORWARD, forged).verdict == NF_DROP
    assert counters.get("NfqInCleartextProtected") == 1
    # the same packet coming out of our own TUN device (already decrypted and checked) passes
    assert pipe.process(HOOK_FORWARD, forged, from_tunnel=True).verdict == NF_ACCEPT


def test_garbage_never_raises(env) -> None:  # type: ignore[no-untyped-def]
    pipe, counters, _ = env
    for hook in (HOOK_INPUT, HOOK_OUTPUT, HOOK_FORWARD):
        for junk in (b"", b"\x45", b"\x60" + b"\x00" * 39, bytes(range(256)), b"\x4f" + b"\x00" * 59):
            assert pipe.process(hook, junk).verdict == NF_DROP
    assert counters.get("NfqInMalformed") == 15
    assert counters.get("NfqEngineError") == 0


def test_ipv6_bypass_by_default(env) -> None:  # type: ignore[no-untyped-def]
    pipe, _, _ = env
    pkt = bytes(IPv6(src="2001:db8::1", dst="2001:db8::2") / UDP())
    for hook in (HOOK_INPUT, HOOK_OUTPUT, HOOK_FORWARD):
        assert pipe.process(hook, pkt).verdict == NF_ACCEPT


@pytest.mark.parametrize("name", ["a-b", "b-a", "gw-out"])
def test_encapsulated_len_predicts_the_real_length(name: str) -> None:
    """The MTU check runs before encryption (no sequence number spent on a packet that is too big)."""
    from nfq_ipsec import packet
    from nfq_ipsec.pipeline import encapsulated_len, inner_mtu_for

    sa = _peer(name)
    src, dst = ("192.0.2.1", "192.0.2.2") if sa.mode == "transport" else ("192.0.2.10", "192.0.2.130")
    for size in (0, 1, 2, 3, 13, 14, 15, 16, 17, 100, 1000, 1399, 1400, 1401, 1402, 1403):
        pkt = bytes(IP(src=src, dst=dst) / UDP() / (b"p" * size))
        hl = packet.parse(pkt).header_len
        assert encapsulated_len(sa, len(pkt), hl) == len(sa.protect(pkt)), size
    m = inner_mtu_for(sa, 1500, 20)
    assert encapsulated_len(sa, m, 20) <= 1500 < encapsulated_len(sa, m + 1, 20)


def test_too_big_spends_no_sequence_number(env) -> None:  # type: ignore[no-untyped-def]
    pipe, _counters, _ = env
    sa = pipe.sad.get("gw-out")
    before = (sa.seq, sa.counters.packets)
    big = bytes(IP(src="192.0.2.10", dst="192.0.2.130", flags="DF") / UDP() / (b"z" * 1472))
    assert pipe.process(HOOK_FORWARD, big).verdict == NF_DROP
    assert (sa.seq, sa.counters.packets) == before


def test_forward_flow_cache_follows_spd_changes(env) -> None:  # type: ignore[no-untyped-def]
    """The per-flow cache of FORWARD decisions must never outlive a policy change."""
    from nfq_ipsec.spd import Action, Direction, Policy, Selector

    pipe, _counters, _ = env
    pkt = bytes(IP(src="192.0.2.10", dst="192.0.2.130") / UDP(sport=4000, dport=5000) / b"data")
    for _ in range(3):
        d = pipe.process(HOOK_FORWARD, pkt)
        assert d.policy == "out-net" and isinstance(d.actions[0], SendPacket)
    import ipaddress

    pipe.spd.add(Policy(name="stop", dir=Direction.OUT, action=Action.DISCARD, priority=1,
                        selector=Selector(src=ipaddress.ip_network("192.0.2.0/25"), proto=17)))
    d = pipe.process(HOOK_FORWARD, pkt)
    assert d.verdict == NF_DROP and d.policy == "stop"
    pipe.spd.remove("stop")
    assert pipe.process(HOOK_FORWARD, pkt).policy == "out-net"
    # a cached flow still goes through the SA: sequence numbers advance, the peer opens every packet
    peer = _peer("gw-out")
    for _ in range(3):
        (send,) = pipe.process(HOOK_FORWARD, pkt).actions
        assert peer.unprotect(send.packets[0]) == pkt  # type: ignore[union-attr]
