"""Prometheus text exposition and the human tables."""

from __future__ import annotations

import re

from nfq_ipsec.render import format_stats, prometheus, table

STATS = {
    "uptime": 12.5,
    "counters": {"XfrmInNoStates": 3, "NfqInCleartextProtected": 1},
    "sas": {"a-to-b": {"packets": 10, "bytes": 1000, "replay_drops": 0}, 'we"ird\\name': {"packets": 1, "bytes": 2}},
    "policies": {"out-v4": {"packets": 10, "bytes": 1000}},
    "queues": [{"queue": 0, "packets": 11, "enobufs": 0, "truncated": 0,
                "kernel": {"queue_dropped": 4, "user_dropped": 1}}],
}

LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="([^"\\\n]|\\\\|\\"|\\n)*",?'
SAMPLE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*(\{(" + LABEL + r")*\})? -?[0-9.e+]+$")


def test_prometheus_format_is_valid_and_complete() -> None:
    text = prometheus(STATS)
    assert text.endswith("\n")
    families: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            assert kind in ("counter", "gauge")
            assert name not in families, f"family {name} declared twice"
            families[name] = kind
            continue
        assert SAMPLE.match(line), line
        assert line.split("{")[0].split(" ")[0] in families, line
    assert 'nfq_ipsec_errors_total{counter="XfrmInNoStates"} 3' in text
    assert 'nfq_ipsec_sa_packets_total{sa="a-to-b"} 10' in text
    assert 'nfq_ipsec_sa_packets_total{sa="we\\"ird\\\\name"} 1' in text
    assert 'nfq_ipsec_kernel_queue_queue_dropped{queue="0"} 4' in text
    assert 'nfq_ipsec_policy_bytes_total{policy="out-v4"} 1000' in text


def test_counter_names_are_prometheus_counters() -> None:
    for line in prometheus(STATS).splitlines():
        if line.startswith("# TYPE ") and line.endswith(" counter"):
            assert line.split()[2].endswith("_total")


def test_format_stats_mentions_everything() -> None:
    out = format_stats(STATS)
    for word in ("XfrmInNoStates", "a-to-b", "out-v4", "queue_dropped 4", "enobufs 0"):
        assert word in out


def test_table_aligns_columns() -> None:
    t = table(["a", "long header"], [[1, 2], ["wide cell", None]]).splitlines()
    assert t[0].index("long header") == t[2].index("2")
    assert t[1].startswith("---------")
