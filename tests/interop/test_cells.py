"""The cell generator, without any kernel: both renderings agree, and our core agrees with scapy.

Fast and root-free. For every cell of the matrix, the TOML must load with nfq_ipsec.config and
carry the same SPIs and keys as the `ip xfrm` lines; then the SAs our configuration builds must
interoperate with scapy's SecurityAssociation built from the same cell, both ways.
"""

from __future__ import annotations

import random
import re
from typing import Any

import pytest

from nfq_ipsec.config import parse_config
from nfq_ipsec.umlpeer import parse_xfrm_state

from .cells import MATRIX, REFERENCE, Cell, Keyed

CELLS = {c.name: c for c in (*MATRIX, *REFERENCE)}


def _keyed(cell: Cell, seed: int = 4303) -> Keyed:
    return cell.materialize(random.Random(f"{cell.name}/{seed}"))


@pytest.mark.parametrize("name", sorted(CELLS))
def test_toml_and_ip_xfrm_describe_the_same_sas(name: str) -> None:
    keyed = _keyed(CELLS[name])
    cfg = parse_config(keyed.our_toml(control_socket="/run/nfq-interop-test.sock"))
    sas = {sa.name: sa for sa in cfg.sas}
    assert set(sas) == {"o2k", "k2o"}
    assert (sas["o2k"].spi, sas["k2o"].spi) == (keyed.o2k.spi, keyed.k2o.spi)
    states = [line for line in keyed.kernel_batch() if line.startswith("xfrm state add")]
    assert len(states) == 2
    for line, sk, sa in ((states[0], keyed.k2o, sas["k2o"]), (states[1], keyed.o2k, sas["o2k"])):
        assert f"spi 0x{sk.spi:08x} " in line
        assert f"src {sa.src} dst {sa.dst} " in line  # the kernel's out SA is our in SA and vice versa
        for key in (sk.key, sk.auth_key):
            if key:
                assert f"0x{key.hex()}" in line
        assert f"mode {sa.mode} " in line and f"proto {sa.proto} " in line
        assert (" flag esn" in line) == sa.esn
    assert {p.dir.value for p in cfg.policies if p.sa} == {"in", "out", "fwd"}


PAYLOAD = b"interop " * 20


def _echo(keyed: Keyed, src: str, dst: str) -> Any:
    """An echo request (not UDP: scapy's AH misplaces the ICV after a UDP layer)."""
    from scapy.layers.inet import ICMP, IP
    from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6

    if keyed.cell.inner_family == 6:
        return IPv6(bytes(IPv6(src=src, dst=dst) / ICMPv6EchoRequest(id=4303, seq=1) / PAYLOAD))
    return IP(bytes(IP(src=src, dst=dst) / ICMP(type=8, id=4303, seq=1) / PAYLOAD))


def _outer(keyed: Keyed, raw: bytes) -> Any:
    from scapy.layers.inet import IP
    from scapy.layers.inet6 import IPv6

    return (IPv6 if keyed.cell.outer == 6 else IP)(raw)


SCAPY_CAN = sorted(n for n, c in CELLS.items() if c.icv_bytes == 16 or not c.alg.startswith("aes-g"))


@pytest.mark.parametrize("name", SCAPY_CAN)
def test_our_core_and_scapy_interoperate_for_the_cell(name: str) -> None:
    """ours -> scapy and scapy -> ours, with the cell's SAs (scapy always uses 16-byte GCM/GMAC ICVs)."""
    keyed = _keyed(CELLS[name])
    e = keyed.endpoints
    sas = {sa.name: sa for sa in parse_config(keyed.our_toml()).sas}
    # ours protects (o2k), scapy opens it
    wire = sas["o2k"].protect(bytes(_echo(keyed, e.ours_inner, e.uml_inner)))
    opened = keyed.scapy_sa("o2k").decrypt(_outer(keyed, wire))
    assert bytes(opened).endswith(PAYLOAD) and opened.dst == e.uml_inner, opened.summary()
    # scapy protects (k2o: the kernel's direction), ours opens it
    sealed = bytes(keyed.scapy_sa("k2o").encrypt(_echo(keyed, e.uml_inner, e.ours_inner)))
    back = sas["k2o"].unprotect(sealed)
    assert back.endswith(PAYLOAD)
    assert sas["k2o"].counters.packets == 1 and sas["k2o"].counters.integrity_failures == 0


SAMPLE_STATE = """\
src 198.51.100.1 dst 198.51.100.2
\tproto esp spi 0x584334b3(1480799411) reqid 2(0x00000002) mode transport
\treplay-window 32 seq 0x00000000 flag  (0x00000000)
\tanti-replay context: seq 0x41, oseq 0x0, bitmap 0xffffffff
\tlifetime current:
\t  5512(bytes), 65(packets)
\tstats:
\t  replay-window 1 replay 2 failed 3
src 198.51.100.2 dst 198.51.100.1
\tproto esp spi 0x6e46b552(1850127698) reqid 1(0x00000001) mode transport
\treplay-window 0 seq 0x00000000 flag esn (0x10000000)
\tanti-replay esn context:
\t seq-hi 0x0, seq 0x0, oseq-hi 0x1, oseq 0x2f
\t replay_window 64, bitmap-length 2
\tlifetime current:
\t  95(bytes), 2(packets)
\tstats:
\t  replay-window 0 replay 0 failed 0
"""


def test_parse_ip_s_xfrm_state() -> None:
    sas = parse_xfrm_state(SAMPLE_STATE)
    a, b = sas[0x584334B3], sas[0x6E46B552]
    assert (a.src, a.dst, a.packets, a.bytes, a.seq, a.oseq) == ("198.51.100.1", "198.51.100.2", 65, 5512, 0x41, 0)
    assert (a.replay_window_drops, a.replay, a.integrity_failed) == (1, 2, 3)
    assert (b.packets, b.oseq_hi, b.oseq, b.seq_hi) == (2, 1, 0x2F, 0)


def test_keys_never_in_repr() -> None:
    keyed = _keyed(MATRIX[0])
    text = repr(keyed) + repr(keyed.k2o) + repr(keyed.o2k)
    for secret in keyed.secrets():
        assert secret not in text
    assert not re.search(r"[0-9a-f]{32}", text)
