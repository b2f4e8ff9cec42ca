"""Anti-replay window (RFC 4303 §3.4.3, RFC 4302 §3.4.3) with ESN inference (RFC 4303 App. A2).

``ReplayWindow`` is implemented in C (nfq_ipsec/_replaywin.c, part of the ``_espcore`` extension):
it is consulted twice for every inbound packet, from esp.py and ah.py and from the C fast path in
_espcore.c, which calls it directly without entering Python. tests/unit/replay_model.py keeps the
former pure-Python implementation as the executable specification; tests/unit/test_replay_c.py
checks the C window against it, result for result and ``Drop`` reason for reason.

API: ``ReplayWindow(size, esn=False, initial=0)``; read-only ``size``, ``esn``, ``top``;
``infer(seq_low)`` (the full value, -1 when impossible), ``check(seq_low)`` (the full value, or
``Drop(XfrmInStateSeqError, "sequence number 0" | "outside window" | "replayed")``), ``update(seq)``,
``seen(seq)``. Arguments out of range (seq_low beyond 32 bits, seq beyond 64) raise ValueError.

One layout for every size, the ring of 64-bit words of RFC 6479: bit ``seq % ring_bits`` says
whether ``seq`` was seen, advancing only clears the words that slide in (a large jump clears the
ring once), so a packet costs O(1) and nothing is allocated per packet. One spare word keeps the
word holding the oldest in-window sequence number from being the one cleared.

Use it in two steps, as RFC 4303 §3.4.3 requires: ``check()`` before the ICV is verified
(cheap rejection of duplicates and stale packets), ``update()`` only once the ICV verified,
so forged packets can never move the window.
"""

from __future__ import annotations

from ._espcore import ReplayWindow

MAX_WINDOW = 65536  # Linux caps at 4096 (XFRMA_REPLAY_ESN_MAX); _replaywin.c has the same value (tested)
# The size up to which the former Python window used a shifted int instead of the ring; the C window has
# one layout, but tests/unit/test_replay.py still probes sizes on both sides of this boundary.
SHIFT_MAX = 256

__all__ = ["MAX_WINDOW", "SHIFT_MAX", "ReplayWindow"]
