"""Whole-packet NFQUEUE binding (the engine's only way to see and re-inject packets).

`NfQueue` wraps the C extension `nfq_ipsec._nfqueue`, which talks netlink to nfnetlink_queue
directly. Unlike NetfilterQueue 1.1.0 (which copies at most ~4 KB), it copies every packet
whole, because INPUT sees reassembled datagrams and OUTPUT sees datagrams before
fragmentation, up to 64 KB:

* copy mode NFQNL_COPY_PACKET with the largest range netlink can carry, `MAX_PAYLOAD` =
  65531 bytes (an attribute's 16-bit length includes its 4-byte header). A packet of
  65532..65535 bytes therefore cannot be copied whole: like any truncated copy, it is
  dropped by the binding and counted in ``stats()["truncated"]``, never passed to the
  callback nor accepted;
* NFQA_CFG_F_GSO is left clear, so the kernel segments GSO packets and completes
  CHECKSUM_PARTIAL checksums before copying: the callback only sees wire-valid packets;
* NFQA_CFG_F_FAIL_OPEN only with ``fail_open=True`` (then the kernel accepts packets it
  cannot queue -- queue full or socket buffer full -- instead of dropping them).

Usage (the engine's loop)::

    with NfQueue(0) as q:
        poller = select.poll(); poller.register(q.fileno(), select.POLLIN)
        while running:
            if poller.poll(1000):
                q.process(callback)        # never blocks

``callback(payload, hook, indev, outdev, mark)`` returns ``NF_DROP``, ``NF_ACCEPT`` or
``(NF_ACCEPT, new_payload)`` (bytes-like, 20..65531 bytes; the caller must have fixed the IP
header and checksums). `hook` is one of the ``NF_INET_*`` constants, `indev`/`outdev` are
ifindexes (0 = none). If the callback raises or returns something else, that packet is
dropped (fail closed), ``callback_errors`` is incremented and the exception propagates out
of `process()` once the verdicts already decided have been sent; packets still queued are
handled by the next call.

Each verdict is sent as soon as its callback returns, so packets the callback emits itself
(raw socket, TUN) and packets it accepts leave in callback order. ``batch_verdicts=True``
sends the verdicts of one `process()` call in a single netlink datagram at its end instead:
~1.2-1.4x the packets/s (bench/nfqueue_bench.py), but an accepted packet may then leave after
packets sent directly by later callbacks of the same call. The engine uses it: every packet it
protects gets a DROP verdict and its ESP leaves from the raw socket at once, in callback order,
so ESP order never depends on when verdicts go out; only accepted packets (bypass, transport
mode decrypted) wait, for at most ``max_packets`` packets, and only other flows' output can
overtake them. A program whose protected output goes through accept verdicts must not use it.
"""

from __future__ import annotations

import errno
from types import TracebackType

from nfq_ipsec import _nfqueue

NF_DROP = 0
NF_ACCEPT = 1

NF_INET_PRE_ROUTING = 0
NF_INET_LOCAL_IN = 1
NF_INET_FORWARD = 2
NF_INET_LOCAL_OUT = 3
NF_INET_POST_ROUTING = 4

MAX_PAYLOAD: int = _nfqueue.MAX_PAYLOAD
"""Largest packet (bytes) that can be copied to user space or re-injected: 65531."""

PROC_QUEUE_FILE = "/proc/net/netfilter/nfnetlink_queue"

# Columns of /proc/net/netfilter/nfnetlink_queue (kernel net/netfilter/nfnetlink_queue.c, seq_show),
# one line per bound queue in the reading process's network namespace.
_PROC_COLUMNS = (
    "queue_num",     # queue number
    "peer_portid",   # netlink port id of the bound socket
    "queue_total",   # packets waiting for a verdict now
    "copy_mode",     # 0 none, 1 meta, 2 packet
    "copy_range",    # bytes copied per packet (65531 = whole packet for us)
    "queue_dropped",  # dropped because queue_total reached maxlen (not counted when fail-open)
    "user_dropped",  # dropped because the netlink socket buffer was full (the program got ENOBUFS)
    "id_sequence",   # last packet id handed out
)


class NfQueue(_nfqueue.NfQueue):
    """A bound NFQUEUE queue in the current network namespace; see the module docstring.

    `maxlen` is the kernel-side queue length (packets awaiting a verdict; the kernel holds at
    most 65536 whatever is asked), `rcvbuf` the netlink receive buffer in bytes (set with
    SO_RCVBUFFORCE when root; at least 256 KiB, a full-size packet message takes ~64 KiB of
    buffer accounting). `batch_verdicts`: see the module docstring.
    """

    def __init__(self, queue_num: int, *, maxlen: int = 8192, fail_open: bool = False,
                 rcvbuf: int = 8 << 20, batch_verdicts: bool = False) -> None:
        try:
            super().__init__(queue_num, maxlen=maxlen, fail_open=fail_open, rcvbuf=rcvbuf,
                             batch_verdicts=batch_verdicts)
        except OSError as e:
            if e.errno in (errno.EPERM, errno.EBUSY) and kernel_queue_stats(queue_num) is not None:
                msg = f"queue {queue_num} is already in use by another program"
                raise OSError(errno.EBUSY, msg) from None
            if e.errno == errno.EPERM:
                raise OSError(errno.EPERM, f"cannot bind NFQUEUE queue {queue_num}: operation not permitted "
                              "(needs CAP_NET_ADMIN in this network namespace)") from None
            raise

    def __enter__(self) -> NfQueue:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "bound"
        return f"<NfQueue {self.queue_num} {state}>"


def kernel_queue_stats(queue_num: int, path: str = PROC_QUEUE_FILE) -> dict[str, int] | None:
    """Kernel-side counters of one queue in this network namespace, or None if it is not bound.

    Keys: queue_num, peer_portid, queue_total, copy_mode, copy_range, queue_dropped, user_dropped,
    id_sequence (see `_PROC_COLUMNS` for what each one means). The kernel's own drops (queue full,
    socket buffer full) are only visible here, not in `NfQueue.stats()`.
    """
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) < len(_PROC_COLUMNS) or not fields[0].isdigit() or int(fields[0]) != queue_num:
            continue
        return {name: int(value) for name, value in zip(_PROC_COLUMNS, fields, strict=False)}
    return None


__all__ = [
    "MAX_PAYLOAD",
    "NF_ACCEPT",
    "NF_DROP",
    "NF_INET_FORWARD",
    "NF_INET_LOCAL_IN",
    "NF_INET_LOCAL_OUT",
    "NF_INET_POST_ROUTING",
    "NF_INET_PRE_ROUTING",
    "NfQueue",
    "kernel_queue_stats",
]
