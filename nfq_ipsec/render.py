"""Human-readable and Prometheus renderings of engine data."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [["" if v is None else str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_stats(st: dict[str, Any]) -> str:
    out = [f"uptime {st.get('uptime', 0):.0f}s"]
    counters = st.get("counters", {})
    out.append("global counters:" if counters else "global counters: all zero")
    out += [f"  {k:<28} {v}" for k, v in counters.items()]
    sas = st.get("sas", {})
    if sas:
        keys = sorted({k for c in sas.values() for k in c})
        out.append(table(["sa", *keys], [[n, *[c.get(k, 0) for k in keys]] for n, c in sas.items()]))
    pols = st.get("policies", {})
    if pols:
        keys = sorted({k for c in pols.values() for k in c})
        out.append(table(["policy", *keys], [[n, *[c.get(k, 0) for k in keys]] for n, c in pols.items()]))
    for q in st.get("queues", []):
        k = q.get("kernel") or {}
        out.append(
            f"queue {q.get('queue')}: packets {q.get('packets', 0)} (fast path {q.get('fast_path', 0)}), "
            f"truncated {q.get('truncated', 0)}, "
            f"enobufs {q.get('enobufs', 0)}, kernel queue_dropped {k.get('queue_dropped', '?')}, "
            f"user_dropped {k.get('user_dropped', '?')}"
        )
    return "\n".join(out) + "\n"


def _metric_name(s: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", s)


def _label(v: Any) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def prometheus(st: dict[str, Any]) -> str:
    """The counters in the Prometheus text exposition format (version 0.0.4)."""
    lines: list[str] = []

    def family(name: str, help_: str, kind: str = "counter") -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")

    family("nfq_ipsec_uptime_seconds", "Seconds since the engine started.", "gauge")
    lines.append(f"nfq_ipsec_uptime_seconds {st.get('uptime', 0)}")
    family("nfq_ipsec_errors_total", "Global error counters, named like /proc/net/xfrm_stat.")
    for k, v in st.get("counters", {}).items():
        lines.append(f'nfq_ipsec_errors_total{{counter="{_label(k)}"}} {v}')
    sa_fields = sorted({k for c in st.get("sas", {}).values() for k in c})
    for f in sa_fields:
        name = f"nfq_ipsec_sa_{_metric_name(f)}_total"
        family(name, f"Per-SA counter {f}.")
        for sa, c in st.get("sas", {}).items():
            lines.append(f'{name}{{sa="{_label(sa)}"}} {c.get(f, 0)}')
    pol_fields = sorted({k for c in st.get("policies", {}).values() for k in c})
    for f in pol_fields:
        name = f"nfq_ipsec_policy_{_metric_name(f)}_total"
        family(name, f"Per-policy counter {f}.")
        for p, c in st.get("policies", {}).items():
            lines.append(f'{name}{{policy="{_label(p)}"}} {c.get(f, 0)}')
    qf = sorted({k for q in st.get("queues", []) for k, v in q.items() if isinstance(v, int) and k != "queue"})
    for f in qf:
        name = f"nfq_ipsec_queue_{_metric_name(f)}_total"
        family(name, f"NFQUEUE binding counter {f}.")
        for q in st.get("queues", []):
            lines.append(f'{name}{{queue="{q.get("queue")}"}} {q.get(f, 0)}')
    kf = sorted({k for q in st.get("queues", []) for k in (q.get("kernel") or {})})
    for f in kf:
        name = f"nfq_ipsec_kernel_queue_{_metric_name(f)}"
        family(name, f"Kernel-side NFQUEUE value {f} (/proc/net/netfilter/nfnetlink_queue).", "gauge")
        for q in st.get("queues", []):
            lines.append(f'{name}{{queue="{q.get("queue")}"}} {(q.get("kernel") or {}).get(f, 0)}')
    return "\n".join(lines) + "\n"
