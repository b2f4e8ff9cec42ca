#!/usr/bin/env python3
"""Micro-benchmark of the ESP core: encapsulate/decapsulate ops/s against a bare AEAD call.

Not a test: run it by hand (``.venv/bin/python bench/core_bench.py``). For each payload size it
prints ESP encapsulate and decapsulate rates next to a bare ``AESGCM.encrypt`` / ``decrypt`` of
the same size in the same run, and the ratio (our time / bare time). The AES-GCM target is a
ratio under 2 at 1400 bytes. ``--all`` adds tunnel mode and the other algorithms (their ratio
is still against bare AES-GCM, so it shows what the algorithm itself costs).

Decapsulation includes the replay window (check + update): every packet carries a fresh
sequence number, as on the wire. Each figure is the best of many interleaved rounds (ours and
the bare call alternate, so both see the same disturbances from other load on the machine).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from nfq_ipsec import esp, packet
from nfq_ipsec.replay import ReplayWindow
from nfq_ipsec.sa import SecurityAssociation

SRC4 = bytes((192, 0, 2, 1))
DST4 = bytes((192, 0, 2, 2))
SIZES = (64, 512, 1400)
ALGORITHMS: dict[str, dict[str, object]] = {
    "aes-gcm-128": {"aead": "aes-gcm-128", "key": bytes(range(20))},
    "aes-gcm-256/icv8": {"aead": "aes-gcm-256", "key": bytes(range(36)), "icv_len": 8},
    "chacha20-poly1305": {"aead": "chacha20-poly1305", "key": bytes(range(36))},
    "aes-gmac-128": {"aead": "aes-gmac-128", "key": bytes(range(20))},
    "aes-cbc-128+sha256": {"enc": "aes-cbc-128", "enc_key": bytes(16), "auth": "hmac-sha256-128",
                           "auth_key": bytes(32)},
    "null+sha256": {"enc": "null", "auth": "hmac-sha256-128", "auth_key": bytes(32)},
}


def best_rates(fns: dict[str, Callable[[], object]], number: int, rounds: int) -> dict[str, float]:
    """Operations per second of each function, best of `rounds` interleaved runs of `number` calls."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(number):
                fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: number / t for name, t in best.items()}


def make_sa(mode: str, algorithm: dict[str, object]) -> SecurityAssociation:
    return SecurityAssociation(name="bench", proto="esp", mode=mode, src="192.0.2.1", dst="192.0.2.2",
                               spi=0x1000, replay_window=64, **algorithm)  # type: ignore[arg-type]


def bench_size(name: str, mode: str, algorithm: dict[str, object], size: int, number: int,
               rounds: int) -> None:
    aead = AESGCM(bytes(16))
    nonce = bytes(12)
    aad = bytes(8)
    payload = os.urandom(size)
    # a UDP datagram of `size` bytes: the ESP payload (transport mode) is exactly that
    clear = packet.ipv4_header(SRC4, DST4, 17, size) + payload
    out_sa = make_sa(mode, algorithm)
    seq_out = iter(range(1, 1 << 62))
    # a ring of distinct packets (cache-warm, as fresh packets from the kernel are); the
    # receiver's replay window restarts at each lap, so every packet passes the replay check
    ring = [esp.encapsulate(out_sa, clear, s) for s in range(1, number + 1)]
    in_sa = make_sa(mode, algorithm)
    assert esp.decapsulate(make_sa(mode, algorithm), ring[0]) == clear
    pos = 0

    def decap() -> bytes:
        nonlocal pos
        if pos == number:
            in_sa.restore(seq=0, age=0.0, replay=ReplayWindow(in_sa.replay.size))
            pos = 0
        pos += 1
        return esp.decapsulate(in_sa, ring[pos - 1])

    ct = aead.encrypt(nonce, payload, aad)
    rates = best_rates({
        "encap": lambda: esp.encapsulate(out_sa, clear, next(seq_out)),
        "bare_enc": lambda: aead.encrypt(nonce, payload, aad),
        "decap": decap,
        "bare_dec": lambda: aead.decrypt(nonce, ct, aad),
    }, number, rounds)
    print(
        f"{name:<19} {mode:<9} {size:>5} B | encap {rates['encap']:>9,.0f}/s  bare encrypt "
        f"{rates['bare_enc']:>9,.0f}/s  ratio {rates['bare_enc'] / rates['encap']:4.2f} | decap "
        f"{rates['decap']:>9,.0f}/s  bare decrypt {rates['bare_dec']:>9,.0f}/s  "
        f"ratio {rates['bare_dec'] / rates['decap']:4.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--all", action="store_true", help="tunnel mode and every algorithm too")
    parser.add_argument("-n", "--number", type=int, default=250, help="calls per round (default 250)")
    parser.add_argument("-r", "--rounds", type=int, default=300, help="interleaved rounds (default 300)")
    args = parser.parse_args()
    print(f"ratio = our time / bare AESGCM time for the same payload size (target < 2 for aes-gcm-128 "
          f"at 1400 B); {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    runs = [("aes-gcm-128", "transport")]
    if args.all:
        runs.append(("aes-gcm-128", "tunnel"))
        runs += [(name, "transport") for name in ALGORITHMS if name != "aes-gcm-128"]
    for name, mode in runs:
        for size in SIZES:
            bench_size(name, mode, ALGORITHMS[name], size, args.number, args.rounds)


if __name__ == "__main__":
    main()
