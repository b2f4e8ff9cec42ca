"""Global error and event counters.

Names follow Linux's /proc/net/xfrm_stat where one maps, so operators can compare the two
side by side; project-specific counters use the same CamelCase style.
"""

from __future__ import annotations

from collections import Counter

# Linux xfrm_stat names (Documentation/networking/xfrm_proc.rst)
XFRM_IN_ERROR = "XfrmInError"
XFRM_IN_BUFFER_ERROR = "XfrmInBufferError"
XFRM_IN_HDR_ERROR = "XfrmInHdrError"
XFRM_IN_NO_STATES = "XfrmInNoStates"
XFRM_IN_STATE_PROTO_ERROR = "XfrmInStateProtoError"
XFRM_IN_STATE_MODE_ERROR = "XfrmInStateModeError"
XFRM_IN_STATE_SEQ_ERROR = "XfrmInStateSeqError"
XFRM_IN_STATE_EXPIRED = "XfrmInStateExpired"
XFRM_IN_STATE_MISMATCH = "XfrmInStateMismatch"
XFRM_IN_STATE_INVALID = "XfrmInStateInvalid"
XFRM_IN_TMPL_MISMATCH = "XfrmInTmplMismatch"
XFRM_IN_NO_POLS = "XfrmInNoPols"
XFRM_IN_POL_BLOCK = "XfrmInPolBlock"
XFRM_IN_POL_ERROR = "XfrmInPolError"
XFRM_OUT_ERROR = "XfrmOutError"
XFRM_OUT_BUNDLE_GEN_ERROR = "XfrmOutBundleGenError"
XFRM_OUT_NO_STATES = "XfrmOutNoStates"
XFRM_OUT_STATE_PROTO_ERROR = "XfrmOutStateProtoError"
XFRM_OUT_STATE_MODE_ERROR = "XfrmOutStateModeError"
XFRM_OUT_STATE_SEQ_ERROR = "XfrmOutStateSeqError"
XFRM_OUT_STATE_EXPIRED = "XfrmOutStateExpired"
XFRM_OUT_POL_BLOCK = "XfrmOutPolBlock"
XFRM_OUT_POL_ERROR = "XfrmOutPolError"
XFRM_FWD_HDR_ERROR = "XfrmFwdHdrError"
XFRM_OUT_STATE_INVALID = "XfrmOutStateInvalid"
# project-specific
IN_PADDING_ERROR = "NfqInPaddingError"  # ESP padding bytes not 1, 2, 3, ... (RFC 4303 §2.4)
IN_DUMMY_PACKET = "NfqInDummyPacket"  # next header 59: TFC dummy, discarded by design
IN_MALFORMED = "NfqInMalformed"  # unparseable IP packet
IN_CLEARTEXT_PROTECTED = "NfqInCleartextProtected"  # clear packet matched a PROTECT policy
OUT_TOO_BIG = "NfqOutTooBig"  # did not fit after encapsulation, DF set / IPv6: ICMP sent
OUT_FRAG_ERROR = "NfqOutFragError"
FWD_POL_BLOCK = "NfqFwdPolBlock"
ENGINE_ERROR = "NfqEngineError"  # unexpected exception caught at the adapter boundary

ALL_NAMES = tuple(v for k, v in sorted(globals().items()) if k.isupper() and isinstance(v, str) and k != "ALL_NAMES")


class Counters:
    """A bag of named monotonically increasing integers."""

    __slots__ = ("_c",)

    def __init__(self) -> None:
        self._c: Counter[str] = Counter()

    def inc(self, name: str, n: int = 1) -> None:
        self._c[name] += n

    def get(self, name: str) -> int:
        return self._c[name]

    def snapshot(self) -> dict[str, int]:
        return dict(sorted(self._c.items()))
