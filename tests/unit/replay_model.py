"""Reference model of the anti-replay window: the executable specification of nfq_ipsec/_replaywin.c.

This is the pure-Python ``ReplayWindow`` that nfq_ipsec.replay used before the window moved to C
(it is consulted twice per inbound packet, also from the C fast path). It is kept, unchanged in
behaviour, only so that tests/unit/test_replay_c.py can run the C window and this model side by side
on random operations and require the same results, the same ``Drop`` counters and reasons, and the
same error messages. Do not import it from nfq_ipsec.

Two bitmap layouts, chosen by window size because CPython favours each in its range:

* up to SHIFT_MAX bits, one int where bit d means "top - d seen", shifted on each advance;
* above that, a ring of 64-bit words in the style of RFC 6479: bit ``seq % ring_bits`` says
  whether ``seq`` was seen, advancing only clears the words that slide in. One spare word keeps
  the word holding the oldest in-window sequence number from being the one cleared.

The C window uses the ring for every size; the two layouts here are independent of each other and
of the C code, which makes the comparison stronger, not weaker.

Use it in two steps, as RFC 4303 §3.4.3 requires: ``check()`` before the ICV is verified,
``update()`` only once the ICV verified, so forged packets can never move the window.
"""

from __future__ import annotations

from nfq_ipsec import counters
from nfq_ipsec.errors import Drop
from nfq_ipsec.replay import MAX_WINDOW

SHIFT_MAX = 256  # up to this size one shifted int is faster than the word ring (measured, CPython 3.11)
_SEQ32 = 1 << 32
_SEQ64 = 1 << 64
_MASK32 = _SEQ32 - 1


class ReplayWindow:
    """Sliding window of accepted sequence numbers for one inbound SA.

    ``size`` 0 disables replay protection (every packet is accepted, duplicates and 0 included:
    RFC 4303 §3.4.3 "no inbound checks", as ``replay-window 0`` does in Linux). ESN needs a
    window (Linux refuses ESN without one, and A2.2 infers the high bits relative to it).
    ``initial`` is the starting top: sequence numbers in (initial - size, initial] are still
    accepted once (the bitmap starts empty, as in Linux when the state is installed with a
    given ``seq``), the peer's first packet is expected to carry ``initial + 1``.
    """

    __slots__ = ("_ring", "_ring_mask", "_shift", "_shift_mask", "esn", "size", "top")

    def __init__(self, size: int, esn: bool = False, initial: int = 0) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_WINDOW:
            raise ValueError(f"replay window size must be an integer in 0..{MAX_WINDOW}, got {size!r}")
        if esn and size == 0:
            raise ValueError("replay window size must be > 0 with ESN (as Linux requires)")
        limit = _SEQ64 if esn else _SEQ32
        if isinstance(initial, bool) or not isinstance(initial, int) or not 0 <= initial < limit:
            raise ValueError(f"initial sequence number must be in 0..{limit - 1}, got {initial!r}")
        self.size = size
        self.esn = esn
        self.top = initial
        self._shift = 0
        self._shift_mask = (1 << size) - 1 if size <= SHIFT_MAX else 0
        self._ring: list[int] | None = None
        self._ring_mask = 0
        if size > SHIFT_MAX:
            nwords = 1
            while nwords < (size + 63) // 64 + 1:
                nwords <<= 1
            self._ring_mask = nwords - 1
            self._ring = [0] * nwords

    def __repr__(self) -> str:
        return f"ReplayWindow(size={self.size}, esn={self.esn}, top={self.top})"

    def infer(self, seq_low: int) -> int:
        """The full 64-bit sequence number for a received low half (RFC 4303 App. A2.2).

        Returns -1 when the inferred value is impossible (below 1 or above 2^64-1).
        Without ESN the received value is the sequence number itself.
        """
        if not self.esn:
            return seq_low
        top = self.top
        tl = top & _MASK32
        th = top >> 32
        w = self.size
        if tl >= w - 1:
            # case A: the window lies within one 2^32 subspace
            if seq_low < tl - w + 1:
                th += 1
        # case B: the window straddles a 2^32 boundary
        elif seq_low >= ((tl - w + 1) & _MASK32):
            th -= 1
        if th < 0 or th > _MASK32:
            return -1
        return (th << 32) | seq_low

    def check(self, seq_low: int) -> int:
        """Reject duplicates and too-old packets before the ICV; return the full sequence number."""
        if not self.size:
            return seq_low  # anti-replay off: "no inbound checks are performed" (RFC 4303 §3.4.3)
        seq = self.infer(seq_low) if self.esn else seq_low
        if seq <= 0:
            raise Drop(counters.XFRM_IN_STATE_SEQ_ERROR, "outside window" if seq else "sequence number 0")
        top = self.top
        if seq > top:
            return seq
        if seq + self.size <= top:
            raise Drop(counters.XFRM_IN_STATE_SEQ_ERROR, "outside window")
        if self._ring is None:
            if (self._shift >> (top - seq)) & 1:
                raise Drop(counters.XFRM_IN_STATE_SEQ_ERROR, "replayed")
        elif (self._ring[(seq >> 6) & self._ring_mask] >> (seq & 63)) & 1:
            raise Drop(counters.XFRM_IN_STATE_SEQ_ERROR, "replayed")
        return seq

    def update(self, seq: int) -> None:
        """Record ``seq`` (the value ``check()`` returned) once its ICV verified."""
        top = self.top
        size = self.size
        ring = self._ring
        if seq > top:
            self.top = seq
            if ring is None:
                # bit d of the shifted int is top - d; shifts are capped so a jump allocates nothing big
                diff = seq - top
                self._shift = ((self._shift << diff) | 1) & self._shift_mask if diff < size else 1
                return
            mask = self._ring_mask
            word = seq >> 6
            steps = word - (top >> 6)
            if steps:
                # the words sliding into the window start empty (one spare word keeps the oldest intact)
                if steps > mask:
                    ring[:] = [0] * (mask + 1)
                else:
                    for w in range(word - steps + 1, word):
                        ring[w & mask] = 0
                ring[word & mask] = 1 << (seq & 63)
            else:
                ring[word & mask] |= 1 << (seq & 63)
        elif seq + size > top:
            if ring is None:
                self._shift |= 1 << (top - seq)
            else:
                ring[(seq >> 6) & self._ring_mask] |= 1 << (seq & 63)
        # else: disabled window, or fell out of the window meanwhile: nothing to remember

    def seen(self, seq: int) -> bool:
        """Whether ``seq`` (full value) is recorded in the window (for tests and diagnostics)."""
        top = self.top
        if self.size == 0 or seq > top or seq + self.size <= top:
            return False
        if self._ring is None:
            return bool((self._shift >> (top - seq)) & 1)
        return bool((self._ring[(seq >> 6) & self._ring_mask] >> (seq & 63)) & 1)
