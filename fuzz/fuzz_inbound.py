"""atheris (libFuzzer) harness for the whole inbound path; see fuzz/README.md.

    python fuzz/fuzz_inbound.py --write-seeds DIR     # the seed corpus (fuzz/corpus.py seeds())
    python fuzz/fuzz_inbound.py [libFuzzer flags] DIR  # fuzz; fuzz/run.sh bounds it in time

Each input is one of two kinds, chosen by its first byte:

* even: the rest is an IP packet handed to the receiver as is (the seeds are of this kind:
  valid packets of every SA, truncated, bit-flipped, bogus padding, ...);
* odd: structured - byte 1 picks an SA, byte 2 a payload length; the sender then protects a
  fresh packet, and the remaining bytes, four at a time (op, position high/low, value), flip,
  set, cut, insert or delete bytes of it before the receiver sees it. This reaches the ICV,
  decryption, padding and next-header code with packets the fuzzer could not forge.

Replay windows are reset before every input so mutated copies of a seed reach the ICV check.
Any violation of the oracle (`corpus.check`) is raised, which libFuzzer reports as a crash and
saves the input (crash-<sha1>) for replay: ``python fuzz/fuzz_inbound.py crash-<sha1>``.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import atheris

with atheris.instrument_imports(include=["nfq_ipsec"]):
    from nfq_ipsec import ah, esp, packet, pipeline, replay, sa, sad, spd  # noqa: F401

from fuzz import corpus

TEXT, SPECS = corpus.build_config()
RX = corpus.make_receiver(TEXT)
TX = corpus.make_sender(TEXT)


def _structured(data: bytes) -> tuple[bytes, bytes]:
    spec = SPECS[data[1] % len(SPECS)] if len(data) > 1 else SPECS[0]
    size = data[2] if len(data) > 2 else 0
    pkt, inner = corpus.valid(TX[spec.name], spec, bytes(range(size)))
    buf = bytearray(pkt)
    ops = data[3:]
    for i in range(0, len(ops) - 3, 4):
        op, hi, lo, value = ops[i], ops[i + 1], ops[i + 2], ops[i + 3]
        pos = ((hi << 8) | lo) % (len(buf) + 1)
        corpus.apply_edit(buf, op, pos, value)
    return bytes(buf), inner


def test_one_input(data: bytes) -> None:
    RX.reset_replay()
    if data and data[0] & 1:
        pkt, inner = _structured(data)
        before = RX.counters.snapshot()
        corpus.check(RX, before, pkt, RX.process(pkt), None, inner)
    else:
        pkt = data[1:]
        before = RX.counters.snapshot()
        corpus.check(RX, before, pkt, RX.process(pkt), None)


def write_seeds(directory: str) -> int:
    os.makedirs(directory, exist_ok=True)
    n = 0
    for seed in corpus.seeds(SPECS, TX):
        name = seed.name.replace("/", "_")
        with open(os.path.join(directory, name), "wb") as f:
            f.write(b"\x00" + seed.data)
        n += 1
    for i in range(len(SPECS)):  # one structured seed per SA: no edits
        with open(os.path.join(directory, f"structured_{i:03d}"), "wb") as f:
            f.write(bytes((1, i, 40)))
        n += 1
    return n


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--write-seeds":
        print(f"{write_seeds(sys.argv[2])} seeds written to {sys.argv[2]}")
        return
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
