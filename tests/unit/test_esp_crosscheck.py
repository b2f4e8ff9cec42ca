"""Interoperability with an independent ESP implementation: scapy.layers.ipsec.

For every algorithm both implementations share (scapy 2.8: AES-GCM with a 16-byte ICV,
ChaCha20-Poly1305, AES-NULL-GMAC, AES-CBC and NULL with HMAC-SHA1-96 / SHA2-256-128 /
SHA2-384-192 / SHA2-512-256), hypothesis draws the mode (transport, tunnel with any inner/outer
family pairing), the families, IPv6 extension headers, ESN with a random high half, the
sequence number and a payload of 0..9000 bytes; each example must survive both directions:
ours -> scapy decrypts to the original packet, scapy -> ours decapsulates to the original packet.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrHopByHop
from scapy.layers.ipsec import ESP
from scapy.layers.ipsec import SecurityAssociation as ScapySA
from scapy.packet import Packet, Raw

from nfq_ipsec import esp
from nfq_ipsec.sa import SecurityAssociation

ENDPOINTS = {4: ("192.0.2.1", "192.0.2.2"), 6: ("2001:db8::1", "2001:db8::2")}
INNER = {4: ("198.51.100.7", "203.0.113.9"), 6: ("2001:db8:aa::7", "2001:db8:bb::9")}
SPI = 0x0BADCAFE


def k(n: int, seed: int) -> bytes:
    return bytes((seed * 7 + i * 13) & 0xFF for i in range(n))


# ours -> (scapy crypt_algo, crypt_key, scapy auth_algo, auth_key)
ALGORITHMS: list[tuple[dict[str, Any], tuple[str, bytes | None, str | None, bytes | None]]] = []
for bits, seed in ((128, 1), (192, 2), (256, 3)):
    key = k(bits // 8 + 4, seed)
    ALGORITHMS.append(({"aead": f"aes-gcm-{bits}", "key": key}, ("AES-GCM", key, None, None)))
ALGORITHMS.append(({"aead": "chacha20-poly1305", "key": k(36, 4)}, ("CHACHA20-POLY1305", k(36, 4), None, None)))
for bits, seed in ((128, 5), (256, 6)):
    key = k(bits // 8 + 4, seed)
    ALGORITHMS.append(({"aead": f"aes-gmac-{bits}", "key": key}, ("AES-NULL-GMAC", key, None, None)))
AUTHS = [("hmac-sha1-96", "HMAC-SHA1-96", 20), ("hmac-sha256-128", "SHA2-256-128", 32),
         ("hmac-sha384-192", "SHA2-384-192", 48), ("hmac-sha512-256", "SHA2-512-256", 64)]
for (auth, scapy_auth, auth_len), bits in zip(AUTHS, (128, 192, 256, 128), strict=True):
    enc_key, auth_key = k(bits // 8, 7), k(auth_len, 8)
    ALGORITHMS.append(({"enc": f"aes-cbc-{bits}", "enc_key": enc_key, "auth": auth, "auth_key": auth_key},
                       ("AES-CBC", enc_key, scapy_auth, auth_key)))
for auth, scapy_auth, auth_len in AUTHS[::3]:
    ALGORITHMS.append(({"enc": "null", "auth": auth, "auth_key": k(auth_len, 9)},
                       ("NULL", None, scapy_auth, k(auth_len, 9))))
IDS = [a[0].get("aead") or f"{a[0]['enc']}+{a[0]['auth']}" for a in ALGORITHMS]


def clear_packet(family: int, src: str, dst: str, payload: bytes, tos: int, df: bool, exts: int) -> bytes:
    if family == 4:
        ip: Packet = IP(src=src, dst=dst, tos=tos, flags="DF" if df else 0, id=len(payload))
    else:
        ip = IPv6(src=src, dst=dst, tc=tos, fl=len(payload) & 0xFFFFF)
        if exts & 1:
            ip = ip / IPv6ExtHdrHopByHop()
        if exts & 2:
            ip = ip / IPv6ExtHdrDestOpt()
    return bytes(ip / UDP(sport=4500 + exts, dport=len(payload) & 0xFFFF) / Raw(payload))


def scapy_sa(scapy_algs: tuple[str, bytes | None, str | None, bytes | None], mode: str, outer: int,
             esn: bool, seq_hi: int) -> ScapySA:
    crypt, crypt_key, auth, auth_key = scapy_algs
    tunnel = None
    if mode == "tunnel":
        src, dst = ENDPOINTS[outer]
        tunnel = IP(src=src, dst=dst) if outer == 4 else IPv6(src=src, dst=dst)
    return ScapySA(ESP, spi=SPI, crypt_algo=crypt, crypt_key=crypt_key, auth_algo=auth, auth_key=auth_key,
                   tunnel_header=tunnel, esn_en=esn, esn=seq_hi)


def dissect(data: bytes) -> Packet:
    return IP(data) if data[0] >> 4 == 4 else IPv6(data)


@pytest.mark.parametrize("algorithm", ALGORITHMS, ids=IDS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    mode=st.sampled_from(["transport", "tunnel"]),
    outer=st.sampled_from([4, 6]),
    inner=st.sampled_from([4, 6]),
    size=st.one_of(st.integers(0, 64), st.integers(0, 9000)),
    esn=st.booleans(),
    seq=st.integers(1, 0xFFFFFFFF),
    seq_hi=st.integers(0, 0xFFFFFFFF),
    tos=st.integers(0, 255),
    df=st.booleans(),
    exts=st.integers(0, 3),
)
def test_both_directions_with_scapy(algorithm: tuple[dict[str, Any], Any], mode: str, outer: int, inner: int,
                                    size: int, esn: bool, seq: int, seq_hi: int, tos: int, df: bool,
                                    exts: int) -> None:
    ours_algs, scapy_algs = algorithm
    if mode == "transport":
        inner = outer
    if not esn:
        seq_hi = 0
    full_seq = (seq_hi << 32) | seq
    src, dst = ENDPOINTS[outer] if mode == "transport" else INNER[inner]
    clear = clear_packet(inner, src, dst, os.urandom(size), tos, df, exts)

    def ours(start: int) -> SecurityAssociation:
        return SecurityAssociation(name="x", proto="esp", mode=mode, src=ENDPOINTS[outer][0],
                                   dst=ENDPOINTS[outer][1], spi=SPI, esn=esn, seq_start=start, **ours_algs)

    # ours -> scapy
    protected = esp.encapsulate(ours(0), clear, full_seq)
    theirs = scapy_sa(scapy_algs, mode, outer, esn, seq_hi)
    decrypted = theirs.decrypt(dissect(protected))
    assert bytes(decrypted) == clear

    # scapy -> ours (a receiver whose window sits just below the packet, for ESN inference)
    from_scapy = bytes(theirs.encrypt(dissect(clear), seq_num=seq, esn_en=esn, esn=seq_hi))
    receiver = ours(full_seq - 1)
    assert esp.decapsulate(receiver, from_scapy) == clear
    assert receiver.replay.top == full_seq
    assert receiver.counters.as_dict()["integrity_failures"] == 0
