#!/bin/bash
# The whole test suite (unit, namespaces, Linux-kernel interop), as root, after ./setup.sh.
set -euo pipefail
cd "$(dirname "$0")"
exec .venv/bin/python -m pytest -q -p no:cacheprovider --timeout=600 "$@" tests
