"""Anti-replay window and ESN inference (RFC 4303 §3.4.3, Appendix A)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nfq_ipsec import counters
from nfq_ipsec.errors import Drop
from nfq_ipsec.replay import MAX_WINDOW, SHIFT_MAX, ReplayWindow

M32 = 1 << 32
SIZES = (1, 32, 64, SHIFT_MAX, SHIFT_MAX + 1, 1000, 4096)  # both bitmap layouts, odd sizes included


def accept(w: ReplayWindow, seq_low: int) -> int:
    seq = w.check(seq_low)
    w.update(seq)
    return seq


def reason(w: ReplayWindow, seq_low: int) -> str:
    with pytest.raises(Drop) as e:
        w.check(seq_low)
    assert e.value.counter == counters.XFRM_IN_STATE_SEQ_ERROR
    return e.value.reason


# -- without ESN --------------------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZES)
def test_in_order_duplicates_and_edges(size: int) -> None:
    w = ReplayWindow(size)
    assert reason(w, 0) == "sequence number 0"
    for s in range(1, 2 * size + 10):
        assert accept(w, s) == s
    top = w.top
    assert top == 2 * size + 9
    assert reason(w, top) == "replayed"
    assert reason(w, top - size + 1) == "replayed"  # oldest in-window, already seen
    assert reason(w, top - size) == "outside window"  # first one outside
    assert reason(w, 1) == "outside window"


@pytest.mark.parametrize("size", SIZES)
def test_late_packets_inside_window_accepted_once(size: int) -> None:
    w = ReplayWindow(size)
    top = 5 * size + 3
    accept(w, top)
    lo = top - size + 1
    # every in-window sequence number (holes) is accepted exactly once, in any order
    for s in [*range(lo, top, 2), *range(lo + 1, top, 2)]:
        assert accept(w, s) == s
        assert reason(w, s) == "replayed"
    assert reason(w, lo - 1) == "outside window"
    assert w.top == top


@pytest.mark.parametrize("size", SIZES)
def test_check_alone_never_moves_the_window(size: int) -> None:
    """A forged packet (ICV fails, so no update) must leave no trace."""
    w = ReplayWindow(size)
    accept(w, 10)
    assert w.check(10**6) == 10**6
    if size == 1:
        return
    assert w.check(9) == 9
    assert w.top == 10
    assert not w.seen(9)
    assert accept(w, 9) == 9  # the genuine packet still gets through
    assert reason(w, 9) == "replayed"


@pytest.mark.parametrize("size", SIZES)
def test_large_jumps(size: int) -> None:
    w = ReplayWindow(size)
    for s in (1, 2, 3):
        accept(w, s)
    accept(w, 10**6)
    assert w.seen(10**6)
    assert not w.seen(3)
    assert reason(w, 3) == "outside window"
    if size > 1:
        assert accept(w, 10**6 - 1) == 10**6 - 1
    # a jump of exactly one window, then one of a few words more
    top = w.top
    accept(w, top + size)
    assert reason(w, top) == "outside window"
    assert accept(w, top + size + 64 * 9 + 5) == top + size + 64 * 9 + 5
    for s in range(w.top - size + 1, w.top):
        assert w.seen(s) == (s == top + size)  # cleared words / shifted-out bits


@pytest.mark.parametrize("size", [SHIFT_MAX + 1, 300, 1000])
def test_ring_reuse_clears_stale_words(size: int) -> None:
    """Dense traffic fills every ring word; jumps of 0..n+1 words must never resurrect old bits."""
    w = ReplayWindow(size)
    accepted: set[int] = set()
    seq = 0
    for _ in range(3 * size):
        seq += 1
        accepted.add(accept(w, seq))
    nwords = 1
    while nwords < (size + 63) // 64 + 1:
        nwords *= 2
    for words in range(nwords + 2):
        for _ in range(size):  # refill densely so every word holds bits again
            seq += 1
            accepted.add(accept(w, seq))
        seq += words * 64 + 5
        accepted.add(accept(w, seq))
        for s in range(seq - size + 1, seq + 1):
            assert w.seen(s) == (s in accepted), (words, s)
            if s not in accepted:
                assert w.check(s) == s


def test_no_esn_window_never_wraps() -> None:
    w = ReplayWindow(64, initial=M32 - 3)
    assert accept(w, M32 - 1) == M32 - 1
    assert reason(w, 1) == "outside window"
    assert reason(w, 0) == "sequence number 0"
    assert accept(w, M32 - 2) == M32 - 2


def test_initial_sets_the_window() -> None:
    w = ReplayWindow(32, initial=1000)
    assert reason(w, 1000 - 32) == "outside window"
    assert accept(w, 1000 - 31) == 969  # empty bitmap: still accepted once (as Linux with a preset seq)
    assert accept(w, 1001) == 1001
    assert reason(w, 1001) == "replayed"


def test_window_zero_accepts_everything() -> None:
    w = ReplayWindow(0)
    for s in (5, 5, 1, 0, 5, M32 - 1, 2):
        assert w.check(s) == s
        w.update(s)
    assert w.top == M32 - 1
    assert not w.seen(2)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"size": -1}, "0..65536"),
        ({"size": MAX_WINDOW + 1}, "0..65536"),
        ({"size": True}, "0..65536"),
        ({"size": 32.0}, "0..65536"),
        ({"size": 0, "esn": True}, "ESN"),
        ({"size": 32, "initial": M32}, "initial"),
        ({"size": 32, "initial": -1}, "initial"),
        ({"size": 32, "esn": True, "initial": 1 << 64}, "initial"),
    ],
)
def test_constructor_validation(kwargs: dict[str, object], fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        ReplayWindow(**kwargs)  # type: ignore[arg-type]


# -- ESN (RFC 4303 Appendix A2) -------------------------------------------------------------------


def test_esn_wrap_of_low_bits_case_a() -> None:
    """Window at 2^32-5 (one subspace): a low seq of 3 means the next subspace (Th + 1)."""
    w = ReplayWindow(32, esn=True, initial=M32 - 5)
    assert w.infer(3) == M32 + 3
    assert accept(w, 3) == M32 + 3
    assert w.top == M32 + 3
    assert accept(w, 0) == M32  # low half 0 is fine once Th > 0
    assert reason(w, 3) == "replayed"


def test_esn_late_packets_from_before_the_wrap_case_b() -> None:
    """Window straddles 2^32 (Tl < W - 1): low seqs above Tl - W + 1 mod 2^32 belong to Th - 1."""
    w = ReplayWindow(32, esn=True, initial=M32 - 5)
    accept(w, 3)  # top = 2^32 + 3, bottom = 2^32 - 28
    assert w.infer(M32 - 10) == M32 - 10  # Th - 1
    assert accept(w, M32 - 10) == M32 - 10
    assert reason(w, M32 - 10) == "replayed"
    assert accept(w, M32 - 28) == M32 - 28  # the oldest in-window number
    # just below the bottom: interpreted as the far future of the *current* subspace (Th), as A2.2 says;
    # only the ICV can tell the difference
    assert w.infer(M32 - 29) == (1 << 32) | (M32 - 29)
    assert w.check(M32 - 29) == (1 << 32) | (M32 - 29)


def test_esn_window_in_first_subspace_rejects_th_minus_one() -> None:
    w = ReplayWindow(32, esn=True)
    assert reason(w, M32 - 1) == "outside window"  # would be Th - 1 = -1
    assert reason(w, 0) == "sequence number 0"  # full value 0
    assert accept(w, 1) == 1


def test_esn_top_of_64_bit_space() -> None:
    top = (1 << 64) - 2
    w = ReplayWindow(64, esn=True, initial=top)
    assert accept(w, M32 - 1) == (1 << 64) - 1
    assert reason(w, 5) == "outside window"  # Th + 1 would exceed 64 bits


def test_esn_window_4096_across_the_boundary() -> None:
    w = ReplayWindow(4096, esn=True, initial=M32 - 100)
    accept(w, 2000)  # top = 2^32 + 2000
    assert accept(w, M32 - 2095) == M32 - 2095  # 4095 below the top
    assert w.infer(M32 - 2096) == (1 << 32) | (M32 - 2096)


@settings(max_examples=300, deadline=None)
@given(
    top=st.one_of(
        st.integers(0, (1 << 64) - 1), st.integers(0, 5000), st.integers(M32 - 5000, M32 + 5000),
        st.just((1 << 64) - 1),
    ),
    size=st.sampled_from((1, 2, 32, 64, 1024, 4096)),
    seq_low=st.one_of(st.integers(0, M32 - 1), st.integers(0, 5000), st.integers(M32 - 5000, M32 - 1)),
)
def test_esn_inference_matches_the_window_arithmetic(top: int, size: int, seq_low: int) -> None:
    """A2.2 restated: the unique value with these low bits in [T - W + 1, T - W + 1 + 2^32)."""
    w = ReplayWindow(size, esn=True, initial=top)
    bottom = top - size + 1
    expected = bottom + ((seq_low - bottom) % M32)
    if expected < 0 or expected >= 1 << 64:
        expected = -1
    assert w.infer(seq_low) == expected


# -- randomized against a reference model -------------------------------------------------------------

ops = st.lists(
    st.tuples(st.integers(-4200, 300), st.booleans(), st.integers(0, 15)), min_size=1, max_size=300
)


def run_against_model(size: int, esn: bool, start: int, steps: list[tuple[int, bool, int]]) -> None:
    w = ReplayWindow(size, esn=esn, initial=start)
    seen: set[int] = set()
    top = start
    for delta, icv_ok, jump in steps:
        seq = max(1, top + delta + (10**6 if jump == 0 else 0))
        if not esn and seq >= M32:
            continue
        if esn and seq <= top - size:
            # below the window: A2.2 reads it as the next subspace (only the ICV can reject it)
            assert w.check(seq % M32) == seq + M32
            continue
        if seq in seen or seq <= top - size:
            expected = "outside window" if seq <= top - size else "replayed"
            assert reason(w, seq % M32) == expected, (seq, top)
            continue
        assert w.check(seq % M32) == seq
        if icv_ok:
            w.update(seq)
            seen.add(seq)
            top = max(top, seq)
        assert w.top == top
    for s in range(max(1, top - size - 3), top + 2):
        assert w.seen(s) == (s in seen and s > top - size)


@settings(max_examples=60, deadline=None)
@given(size=st.sampled_from((32, SHIFT_MAX + 64, 4096)), steps=ops)
def test_random_against_set_model(size: int, steps: list[tuple[int, bool, int]]) -> None:
    run_against_model(size, False, 0, steps)


@settings(max_examples=60, deadline=None)
@given(size=st.sampled_from((64, 4096)), start=st.integers(M32 - 6000, M32 + 10), steps=ops)
def test_random_esn_across_2_32_against_set_model(
    size: int, start: int, steps: list[tuple[int, bool, int]]
) -> None:
    run_against_model(size, True, start, steps)
