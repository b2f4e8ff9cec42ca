#!/bin/sh
# Run the atheris harness for a bounded time (default 60 s): fuzz/run.sh [SECONDS] [extra libFuzzer flags]
# Exit status 0: no oracle violation found; non-zero: libFuzzer saved the input as $FUZZ_OUT/crash-* (default /tmp/nfq-ipsec-fuzz).
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
SECS=${1:-60}
[ $# -gt 0 ] && shift
OUT=${FUZZ_OUT:-/tmp/nfq-ipsec-fuzz}
mkdir -p "$OUT/corpus"
"$PY" -c "import atheris" 2>/dev/null || { echo "atheris is not installed: $PY -m pip install atheris" >&2; exit 2; }
"$PY" fuzz/fuzz_inbound.py --write-seeds "$OUT/seeds" >/dev/null
exec timeout --kill-after=30 $((SECS + 60)) "$PY" fuzz/fuzz_inbound.py \
    -max_total_time="$SECS" -rss_limit_mb=2048 -timeout=10 -max_len=4096 \
    -artifact_prefix="$OUT/" -print_final_stats=1 "$@" "$OUT/corpus" "$OUT/seeds"
