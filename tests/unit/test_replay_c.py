"""The C anti-replay window (nfq_ipsec/_replaywin.c) against its reference model (replay_model.py).

Differential tests: the same random operations on both windows must give the same return values,
the same ``Drop`` counters and reasons, the same ``top`` and ``repr`` after every step, and the same
``seen`` answers over the window at the end. The model uses a shifted int up to 256 bits and a word
ring above, the C window a ring for every size, so agreement is not a tautology. Then what the model
cannot check: argument validation (the C window refuses what it cannot represent instead of
truncating it) and the constants C and Python share.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nfq_ipsec import counters
from nfq_ipsec.errors import Drop
from nfq_ipsec.replay import MAX_WINDOW, ReplayWindow
from tests.unit.replay_model import ReplayWindow as ModelWindow

M32 = 1 << 32
M64 = 1 << 64
SIZES = (0, 1, 2, 32, 63, 64, 65, 128, 256, 257, 1000, 1024, 4096, MAX_WINDOW)
OPS = ("check", "update", "accept", "seen", "infer", "burst")
# where a step's value is taken from, relative to the window as it is when the step runs
ANCHORS = ("top", "bottom", "next_2_32", "this_2_32", "zero")

Outcome = tuple[str, object]


def outcome(fn: Callable[[int], object], arg: int) -> Outcome:
    """A call's result or its Drop, comparable between the two windows."""
    try:
        return ("ok", fn(arg))
    except Drop as e:
        return ("drop", (e.counter, e.reason))


@dataclass
class Step:
    op: str
    anchor: str
    offset: int


steps_st = st.lists(
    st.builds(
        Step,
        st.sampled_from(OPS),
        st.sampled_from(ANCHORS),
        st.one_of(
            st.integers(-70, 70),  # around the anchor: edges of words and of the window
            st.integers(-5000, 5000),
            st.integers(-(1 << 20), 1 << 20),  # far behind / far ahead (ring cleared)
            st.sampled_from((64, -64, 128, 2048 * 64, 2049 * 64, M32, -M32)),
        ),
    ),
    min_size=1,
    max_size=120,
)


@st.composite
def windows(draw: st.DrawFn) -> tuple[int, bool, int]:
    """(size, esn, initial): ESN only with a window; initial values near 0, 2^32 boundaries and 2^64."""
    size = draw(st.sampled_from(SIZES))
    esn = size > 0 and draw(st.booleans())
    limit = M64 - 1 if esn else M32 - 1
    near = [st.integers(0, 300), st.integers(M32 - 5000, M32 - 1), st.integers(0, limit)]
    if esn:
        near += [
            st.integers(M32, M32 + 5000),
            st.integers(M64 - 5000, M64 - 1),
            st.builds(lambda hi, d: min(max(hi * M32 + d, 0), limit), st.integers(0, M32 - 1), st.integers(-70, 70)),
        ]
    return size, esn, draw(st.one_of(*near))


def value_for(step: Step, model: ModelWindow, limit: int) -> int:
    top = model.top
    base = {
        "top": top,
        "bottom": top - model.size + 1,
        "next_2_32": ((top >> 32) + 1) << 32,
        "this_2_32": (top >> 32) << 32,
        "zero": 0,
    }[step.anchor]
    return min(max(base + step.offset, 0), limit)


def assert_same_state(c: ReplayWindow, model: ModelWindow) -> None:
    assert (c.top, c.size, c.esn) == (model.top, model.size, model.esn)
    assert repr(c) == repr(model)


def run_differential(size: int, esn: bool, initial: int, steps: list[Step]) -> None:
    c = ReplayWindow(size, esn=esn, initial=initial)
    model = ModelWindow(size, esn=esn, initial=initial)
    limit = M64 - 1 if esn else M32 - 1
    assert_same_state(c, model)
    for i, step in enumerate(steps):
        value = value_for(step, model, limit)
        low = value & (M32 - 1)
        where = (i, step, value)
        if step.op in ("check", "infer"):
            assert outcome(getattr(c, step.op), low) == outcome(getattr(model, step.op), low), where
        elif step.op == "seen":
            assert c.seen(value) == model.seen(value), where
        elif step.op == "update":  # any value, not only what check() returned: both must still agree
            c.update(value)
            model.update(value)
        else:  # accept one, or a burst of consecutive packets (fills every word of the ring)
            count = 1 if step.op == "accept" else abs(step.offset) % 300 + 1
            for v in range(value, min(value + count, limit + 1)):
                got, want = outcome(c.check, v & (M32 - 1)), outcome(model.check, v & (M32 - 1))
                assert got == want, (*where, v)
                if want[0] == "ok":
                    assert isinstance(want[1], int)
                    c.update(want[1])
                    model.update(want[1])
        assert_same_state(c, model)
    # the whole recorded state: every in-window bit (up to 5000 below the top) and both edges of the window
    top = model.top
    span = min(size, 5000) + 70
    probes = [*range(max(0, top - span), min(top + 3, M64)), *range(max(0, top - size - 70), min(top - size + 70, M64))]
    assert [c.seen(s) for s in probes] == [model.seen(s) for s in probes]


@settings(max_examples=400, deadline=None)
@given(window=windows(), steps=steps_st)
def test_c_window_matches_the_model(window: tuple[int, bool, int], steps: list[Step]) -> None:
    run_differential(*window, steps)


@settings(max_examples=150, deadline=None)
@given(
    size=st.sampled_from((1, 32, 64, 65, 4096, MAX_WINDOW)),
    initial=st.integers(M32 - 300, M32 + 300),
    steps=steps_st,
)
def test_c_window_matches_the_model_across_2_32_with_esn(size: int, initial: int, steps: list[Step]) -> None:
    """ESN around the first wrap of the low half: both cases of RFC 4303 A2.2 and Th - 1 / Th + 1."""
    run_differential(size, True, initial, steps)


@pytest.mark.parametrize("size", SIZES)
def test_dense_traffic_with_growing_jumps_matches_the_model(size: int) -> None:
    """Deterministic: full words, then jumps of 0..ring+2 words, the case where a ring slot is reused."""
    steps = []
    for words in range(0, 2 * (size // 64 + 1) + 3, max(1, (size // 64 + 1) // 16)):
        steps += [Step("burst", "top", 1 + min(size, 299)), Step("accept", "top", words * 64 + 5)]
    steps += [Step("accept", "bottom", d) for d in range(-3, 4)]
    run_differential(size, False, 0, steps)


# -- what only the C window does: validation, shared constants ----------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"size": -1},
        {"size": MAX_WINDOW + 1},
        {"size": 1 << 70},
        {"size": True},
        {"size": 32.0},
        {"size": "32"},
        {"size": None},
        {"size": 0, "esn": True},
        {"size": 32, "initial": M32},
        {"size": 32, "initial": -1},
        {"size": 32, "initial": True},
        {"size": 32, "initial": 1.5},
        {"size": 32, "esn": True, "initial": M64},
        {"size": 32, "esn": True, "initial": -(1 << 80)},
    ],
)
def test_constructor_errors_are_the_models(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError) as want:
        ModelWindow(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError) as got:
        ReplayWindow(**kwargs)
    assert str(got.value) == str(want.value)


def test_max_window_agrees_with_the_c_limit() -> None:
    """_replaywin.c hard-codes MAX_WINDOW: the largest size it accepts must be replay.MAX_WINDOW."""
    assert ReplayWindow(MAX_WINDOW).size == MAX_WINDOW
    with pytest.raises(ValueError, match=f"0..{MAX_WINDOW},"):
        ReplayWindow(MAX_WINDOW + 1)


def test_drop_counter_is_the_python_constant() -> None:
    w = ReplayWindow(32)
    with pytest.raises(Drop) as e:
        w.check(0)
    assert (e.value.counter, e.value.reason) == (counters.XFRM_IN_STATE_SEQ_ERROR, "sequence number 0")
    assert str(e.value) == f"{counters.XFRM_IN_STATE_SEQ_ERROR}: sequence number 0"


@pytest.mark.parametrize(
    ("method", "arg", "message"),
    [
        ("check", -1, "seq_low must be an integer in 0..4294967295, got -1"),
        ("check", M32, "seq_low must be an integer in 0..4294967295, got 4294967296"),
        ("check", M64 + 3, f"seq_low must be an integer in 0..4294967295, got {M64 + 3}"),
        ("infer", M32 + 3, "seq_low must be an integer in 0..4294967295, got 4294967299"),
        ("update", -1, "seq must be an integer in 0..18446744073709551615, got -1"),
        ("update", M64 + 3, f"seq must be an integer in 0..18446744073709551615, got {M64 + 3}"),
        ("seen", M64, f"seq must be an integer in 0..18446744073709551615, got {M64}"),
    ],
)
@pytest.mark.parametrize("esn", [False, True])
def test_out_of_range_arguments_are_refused_not_truncated(method: str, arg: int, message: str, esn: bool) -> None:
    w = ReplayWindow(64, esn=esn, initial=10)
    with pytest.raises(ValueError) as e:
        getattr(w, method)(arg)
    assert str(e.value) == message
    assert w.top == 10 and not w.seen(3) and w.check(3) == 3  # nothing recorded, e.g. M64 + 3 as 3


@pytest.mark.parametrize("method", ["check", "infer", "update", "seen"])
@pytest.mark.parametrize("arg", [3.0, "3", None, b"\x03"])
def test_non_int_arguments_are_type_errors(method: str, arg: object) -> None:
    w = ReplayWindow(64)
    name = "seq_low" if method in ("check", "infer") else "seq"
    with pytest.raises(TypeError, match=f"^{name} must be an int, got {type(arg).__name__}$"):
        getattr(w, method)(arg)


def test_boundaries_of_the_argument_ranges_are_accepted() -> None:
    w = ReplayWindow(64, esn=True, initial=M64 - 2)
    assert w.check(M32 - 1) == M64 - 1
    w.update(M64 - 1)
    assert w.top == M64 - 1 and w.seen(M64 - 1) and not w.seen(M64 - 2)
    assert w.infer(0) == -1  # Th + 1 would exceed 64 bits
    assert w.infer(M32 - 1) == M64 - 1


def test_bools_are_ints_as_in_the_model() -> None:
    c, model = ReplayWindow(8), ModelWindow(8)
    for w in (c, model):
        assert w.check(True) == 1
        w.update(True)
        assert w.seen(True) and not w.seen(False)
    # the model keeps the bool object itself as its top; the C window stores the number
    assert c.top == model.top == 1 and repr(c) == "ReplayWindow(size=8, esn=False, top=1)"


def test_attributes_are_read_only_and_typed() -> None:
    w = ReplayWindow(size=32, esn=True, initial=5)
    assert (w.size, w.esn, w.top) == (32, True, 5) and w.esn is True
    assert ReplayWindow(32, esn=0).esn is False
    for name in ("size", "esn", "top"):
        with pytest.raises(AttributeError):
            setattr(w, name, 1)
    assert not hasattr(w, "__dict__")
