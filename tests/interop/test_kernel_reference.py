"""The generated kernel configuration, checked against a third implementation (scapy), no engine.

For every algorithm suite (and the tunnel, 6-in-4 and ESN variants): the UML kernel pings us,
and the ESP/AH it puts on the wire must decrypt with scapy's SecurityAssociation built from the
same cell; then scapy protects an echo request towards the kernel, which must accept it (its SA
counts it, no integrity failure) and answer with ESP/AH that decrypts again. This proves the
keys, SPIs, ICV lengths and ESN settings of cells.py mean the same thing to Linux as to the
RFCs, independently of nfq-ipsec.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import pytest

from .cells import REFERENCE, Cell, Keyed
from .conftest import Bed


def _ip_of_frame(frame: bytes) -> Any:
    from scapy.layers.l2 import Ether

    eth = Ether(frame)
    return eth.payload if eth.type in (0x0800, 0x86DD) else None


def _protected(keyed: Keyed, frames: list[bytes], spi: int) -> list[Any]:
    from scapy.layers.inet import IP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.ipsec import AH, ESP

    layer = ESP if keyed.cell.proto == "esp" else AH
    out = []
    for f in frames:
        ip = _ip_of_frame(f)
        if ip is None or ip.haslayer("ICMP") or ip.haslayer("ICMPv6DestUnreach") or ip.haslayer("ICMPv6ParamProblem"):
            continue  # the namespace's kernel quotes ESP it cannot handle in ICMP errors
        if ip.haslayer(layer) and ip[layer].spi == spi:
            out.append((IP if ip.version == 4 else IPv6)(bytes(ip)))
    return out


class TruncatedGcmSa:
    """RFC 4106 with an ICV shorter than 16 bytes, transport mode, IPv4 (scapy always uses 16 bytes).

    Encryption: scapy's full-tag ESP with the tag cut (a GCM tag truncates to its prefix,
    RFC 4106 §6 / NIST SP 800-38D); decryption: cryptography's GCM with min_tag_length.
    """

    def __init__(self, keyed: Keyed, direction: str) -> None:
        self.full = keyed.scapy_sa(direction)
        self.sk = keyed.k2o if direction == "k2o" else keyed.o2k
        self.icv = keyed.cell.icv_bytes

    def encrypt(self, plain: Any) -> Any:
        from scapy.layers.inet import IP

        raw = bytes(self.full.encrypt(plain))
        return IP(_ipv4_cut(raw, 16 - self.icv))

    def decrypt(self, pkt: Any) -> Any:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
        from scapy.layers.inet import IP
        from scapy.layers.ipsec import ESP

        esp = bytes(pkt[ESP])
        iv, body, tag = esp[8:16], esp[16:-self.icv], esp[-self.icv:]
        key, salt = self.sk.key[:-4], self.sk.key[-4:]
        dec = Cipher(algorithms.AES(key), modes.GCM(salt + iv, tag, min_tag_length=self.icv)).decryptor()
        dec.authenticate_additional_data(esp[:8])
        plain = dec.update(body) + dec.finalize()
        pad_len, next_header = plain[-2], plain[-1]
        return IP(bytes(IP(src=pkt[IP].src, dst=pkt[IP].dst, proto=next_header) / plain[:-(pad_len + 2)]))


def _ipv4_cut(raw: bytes, n: int) -> bytes:
    from scapy.layers.inet import IP

    ip = IP(raw[:-n])
    ip.len = None
    ip.chksum = None
    return bytes(ip)


def _sa(keyed: Keyed, direction: str) -> Any:
    c = keyed.cell
    if c.alg.startswith("aes-gcm") and c.icv_bytes != 16:
        assert c.mode == "transport" and c.outer == 4, "truncated GCM helper: transport IPv4 only"
        return TruncatedGcmSa(keyed, direction)
    return keyed.scapy_sa(direction)


def _inject(bed: Bed, keyed: Keyed, packet: bytes) -> None:
    """Send a complete IP packet from our namespace (raw socket: the namespace's kernel routes it)."""
    fam = "AF_INET6" if keyed.cell.outer == 6 else "AF_INET"
    dst = keyed.endpoints.uml_outer
    script = (f"import socket; s = socket.socket(socket.{fam}, socket.SOCK_RAW, socket.IPPROTO_RAW); "
              f"s.sendto(bytes.fromhex('{packet.hex()}'), ('{dst}', 0))")
    bed.ns.run([sys.executable, "-c", script])


@pytest.mark.parametrize("cell", REFERENCE, ids=lambda c: c.name)
def test_kernel_esp_decrypts_with_scapy_and_accepts_scapy_esp(bed: Bed, capture, cell: Cell) -> None:  # type: ignore[no-untyped-def]
    from scapy.layers.inet import ICMP, IP
    from scapy.layers.inet6 import ICMPv6EchoReply, ICMPv6EchoRequest, IPv6

    keyed = cell.materialize()
    e = keyed.endpoints
    bed.peer().xfrm_apply(keyed.kernel_batch())
    v6 = cell.inner_family == 6
    ping = "ping -6" if v6 else "ping"
    with capture(f"ref-{cell.name}") as cap:
        bed.uml.run(f"{ping} -n -c 1 -W 1 -p 6e6671 -I {e.uml_inner} {e.ours_inner}", check=False)
        # scapy -> kernel: an echo request the kernel must decrypt, accept and answer
        inner_l3 = IPv6 if v6 else IP
        echo = ICMPv6EchoRequest(id=0x4E51, seq=7) if v6 else ICMP(type=8, id=0x4E51, seq=7)
        plain = inner_l3(bytes(inner_l3(src=e.ours_inner, dst=e.uml_inner) / echo / b"from scapy, via the tap"))
        sa_o2k = _sa(keyed, "o2k")
        _inject(bed, keyed, bytes(sa_o2k.encrypt(plain)))
        time.sleep(0.5)
    frames = cap.frames()
    sa_k2o = _sa(keyed, "k2o")
    inner_l3 = IPv6 if v6 else IP
    from_kernel = [inner_l3(bytes(sa_k2o.decrypt(p))) for p in _protected(keyed, frames, keyed.k2o.spi)]
    kinds = []
    for inner in from_kernel:
        if v6:
            kinds.append("request" if inner.haslayer(ICMPv6EchoRequest) else
                         "reply" if inner.haslayer(ICMPv6EchoReply) else inner.summary())
        else:
            kinds.append({8: "request", 0: "reply"}.get(inner[ICMP].type, inner.summary())
                         if inner.haslayer(ICMP) else inner.summary())
        assert inner.src == e.uml_inner and inner.dst == e.ours_inner, inner.summary()
    assert kinds == ["request", "reply"], (kinds, keyed)
    reply = from_kernel[1]
    assert bytes(reply.lastlayer())[-len(b"from scapy, via the tap"):] == b"from scapy, via the tap"
    k = bed.uml.xfrm_state()
    assert k[keyed.o2k.spi].packets == 1 and k[keyed.k2o.spi].packets == 2, k
    assert k[keyed.o2k.spi].integrity_failed == 0, k
    if cell.esn:  # the kernel counted from seq_start, as scapy did
        assert k[keyed.k2o.spi].oseq == (cell.seq_start + 2) & 0xFFFFFFFF, k
        assert k[keyed.o2k.spi].seq == (cell.seq_start + 1) & 0xFFFFFFFF, k
