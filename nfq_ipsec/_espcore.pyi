"""Type stub for the C extension (see nfq_ipsec/_espcore.c, _replaywin.c and _espcore.h)."""

from collections.abc import Callable
from typing import Any

from typing_extensions import Buffer

KIND_INPUT_SA: int
KIND_FORWARD: int
KIND_OUTPUT: int
KIND_INNER: int
C_IN_STATE_SEQ_ERROR: str
C_IN_STATE_PROTO_ERROR: str
C_IN_STATE_MODE_ERROR: str
C_IN_PADDING_ERROR: str
C_IN_DUMMY_PACKET: str

class SaCounters:
    packets: int
    bytes: int
    replay_drops: int
    integrity_failures: int
    format_errors: int
    expired_drops: int
    seq_exhausted: int
    seq: int
    seq_max: int
    limit_packets: int
    limit_bytes: int
    deadline: float
    fast_ok: bool

class CounterPair:
    packets: int
    bytes: int
    def account(self, nbytes: int, /) -> None: ...

class ReplayWindow:
    @property
    def size(self) -> int: ...
    @property
    def esn(self) -> bool: ...
    @property
    def top(self) -> int: ...
    def __init__(self, size: int, esn: bool = False, initial: int = 0) -> None: ...
    def infer(self, seq_low: int, /) -> int: ...
    def check(self, seq_low: int, /) -> int: ...
    def update(self, seq: int, /) -> None: ...
    def seen(self, seq: int, /) -> bool: ...

class EspCore:
    replay: ReplayWindow
    def __init__(self, aead: Any, salt: bytes, spi: int, esn: bool, tunnel: bool, src: bytes, dst: bytes,
                 tfc_pad: int, counters: SaCounters, replay: ReplayWindow) -> None: ...
    def encap(self, packet: Buffer, seq: int, ip_id: int, /) -> bytes | None: ...
    def decap(self, packet: Buffer, /) -> bytes | None: ...

class FastPath:
    enabled: bool
    on_drop: Callable[[str], object] | None
    def __init__(self, raw_fd: int, tun_fd: int, tun_ifindex: int) -> None: ...
    def learn(self, kind: int, proto: int, spi: int, flow: bytes, core: EspCore,
              policies: tuple[CounterPair, ...], max_len: int, /) -> bool: ...
    def clear(self) -> None: ...
    def handle(self, hook: int, packet: Buffer, indev: int = 0, /) -> int | tuple[int, bytes] | None: ...
    def stats(self) -> dict[str, int]: ...
