"""The interoperability matrix: which cells the kernel tests run.

The cell description and both renderings (`ip xfrm` lines and our TOML) live in
nfq_ipsec/interop.py, shared with `nfq-ipsec demo --peer kernel`; they are re-exported here.
"""

from __future__ import annotations

from nfq_ipsec.interop import (
    ALGS,
    ND_TYPES,
    OURS_INNER4,
    OURS_INNER6,
    OURS_LINK4,
    OURS_LINK6,
    TRAFFIC_KINDS,
    UML_INNER4,
    UML_INNER6,
    UML_LINK4,
    UML_LINK6,
    Alg,
    Cell,
    Endpoints,
    Keyed,
    SaKeys,
)

__all__ = ["ALGS", "ESN_START", "FULL", "MATRIX", "ND_TYPES", "OURS_INNER4", "OURS_INNER6", "OURS_LINK4",
           "OURS_LINK6", "REFERENCE", "TRAFFIC_KINDS", "UML_INNER4", "UML_INNER6", "UML_LINK4", "UML_LINK6", "Alg",
           "Cell", "Endpoints", "Keyed", "SaKeys"]

# -- the matrix ----------------------------------------------------------------------------------
FULL = frozenset({"ping", "udp", "tcp", "big"})
ESN_START = (1 << 32) - 16  # traffic crosses the 2^32 boundary after 15 packets

MATRIX: tuple[Cell, ...] = (
    # modes and families (AES-GCM-128)
    Cell("esp-transport-v4-gcm128", mode="transport", outer=4, traffic=FULL),
    Cell("esp-transport-v6-gcm128", mode="transport", outer=6, traffic=FULL),
    Cell("esp-tunnel-v4-gcm128", mode="tunnel", outer=4, traffic=FULL),
    Cell("esp-tunnel-v6-gcm128", mode="tunnel", outer=6, traffic=FULL),
    Cell("esp-tunnel-6in4-gcm128", mode="tunnel", outer=4, inner=6, traffic=frozenset({"ping", "udp", "tcp"})),
    # algorithms
    Cell("esp-transport-v4-gcm256", alg="aes-gcm-256", traffic=frozenset({"ping", "udp", "tcp"})),
    Cell("esp-tunnel-v6-gcm256-icv12", alg="aes-gcm-256", mode="tunnel", outer=6, icv_len=12,
         traffic=frozenset({"ping", "udp"})),
    Cell("esp-transport-v4-gcm256-icv12", alg="aes-gcm-256", icv_len=12, traffic=frozenset({"ping", "udp"})),
    Cell("esp-tunnel-v4-chacha20poly1305", alg="chacha20-poly1305", mode="tunnel",
         traffic=frozenset({"ping", "udp", "tcp"})),
    Cell("esp-transport-v6-chacha20poly1305", alg="chacha20-poly1305", outer=6, traffic=frozenset({"ping", "udp"})),
    Cell("esp-transport-v4-gmac128", alg="aes-gmac-128", traffic=frozenset({"ping", "udp"})),
    Cell("esp-transport-v4-cbc128-sha256", alg="aes-cbc-128+hmac-sha256-128",
         traffic=frozenset({"ping", "udp", "tcp"})),
    Cell("esp-tunnel-v6-cbc256-sha512", alg="aes-cbc-256+hmac-sha512-256", mode="tunnel", outer=6,
         traffic=frozenset({"ping", "udp", "tcp"})),
    Cell("esp-transport-v4-null-sha256", alg="null+hmac-sha256-128", traffic=frozenset({"ping", "udp"})),
    # AH
    Cell("ah-transport-v4-sha256", alg="ah-hmac-sha256-128", proto="ah", traffic=FULL),
    Cell("ah-transport-v6-sha256", alg="ah-hmac-sha256-128", proto="ah", outer=6,
         traffic=frozenset({"ping", "udp", "tcp"})),
    # ESN across 2^32
    Cell("esp-transport-v4-esn-wrap", esn=True, seq_start=ESN_START, replay_window=128,
         traffic=frozenset({"ping", "udp", "tcp"})),
    # anti-replay
    Cell("esp-transport-v4-replay32", alg="aes-cbc-128+hmac-sha256-128", replay_window=32,
         traffic=frozenset({"ping", "replay"})),
    Cell("esp-transport-v4-replay1024", replay_window=1024, traffic=frozenset({"ping", "replay"})),
)

# every suite, for checking the generated kernel configuration against scapy (no engine needed)
REFERENCE: tuple[Cell, ...] = (
    *(Cell(f"ref-{name}", alg=name, proto="ah" if name.startswith("ah-") else "esp") for name in ALGS),
    Cell("ref-aes-gcm-256-icv12", alg="aes-gcm-256", icv_len=12),
    Cell("ref-tunnel-v6", mode="tunnel", outer=6),
    Cell("ref-tunnel-6in4", mode="tunnel", outer=4, inner=6),
    Cell("ref-esn", esn=True, seq_start=ESN_START, replay_window=64),
)
