"""Type stub for the C extension (see nfq_ipsec/_nfqueue.c and nfq_ipsec/nfqueue.py)."""

from collections.abc import Callable
from typing import Any

from typing_extensions import Buffer

NF_DROP: int
NF_ACCEPT: int
MAX_PAYLOAD: int

Callback = Callable[[bytes, int, int, int, int], int | tuple[int, Buffer]]

class NfQueue:
    def __init__(self, queue_num: int, *, maxlen: int = 8192, fail_open: bool = False,
                 rcvbuf: int = 8 << 20, batch_verdicts: bool = False) -> None: ...
    def process(self, callback: Callback, max_packets: int = 64) -> int: ...
    def fileno(self) -> int: ...
    def close(self) -> None: ...
    def stats(self) -> dict[str, int]: ...
    fastpath: Any
    @property
    def closed(self) -> bool: ...
    @property
    def queue_num(self) -> int: ...
