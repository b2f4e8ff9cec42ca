#!/bin/bash
# One-command set-up on Debian 12 (as root): system packages, a venv in .venv, the project
# (with its C extension) installed into it. `./setup.sh demo` then runs the demo.
set -euo pipefail
cd "$(dirname "$0")"

APT_PACKAGES=(
  python3 python3-venv python3-dev gcc pkg-config         # the venv and the C extension
  libnetfilter-queue-dev libnfnetlink-dev libmnl-dev       # our NFQUEUE binding
  iptables iproute2 iputils-ping kmod tcpdump              # hooks (iptables-legacy), namespaces, captures
  user-mode-linux                                          # the Linux-kernel IPsec peer (interop tests)
  tshark                                                   # an independent ESP dissector (tests, `keys --wireshark`)
)

if [ "$(id -u)" != 0 ]; then
  echo "setup.sh: run as root (it installs Debian packages; the engine needs root anyway)" >&2
  exit 1
fi

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup.sh: installing ${missing[*]}"
  apt-get update -qq
  # tshark: do not ask whether non-root users may capture (keep the default: no)
  echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[test,dev]'
.venv/bin/python -c "import nfq_ipsec._nfqueue" || { echo "setup.sh: the NFQUEUE extension did not build" >&2; exit 1; }
echo "setup.sh: ready. Run the demo with: .venv/bin/nfq-ipsec demo   (tests: ./run-tests.sh)"

if [ "${1:-}" = demo ]; then
  exec .venv/bin/nfq-ipsec demo
fi
