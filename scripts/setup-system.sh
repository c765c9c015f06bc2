#!/usr/bin/env bash
# Install the Debian packages xcp-fastpath's tests and demo use. Idempotent: apt runs only when a
# package is missing. Debian 12 as root (or with sudo). Called by `make setup`.
set -euo pipefail

PKGS=(
  qemu-utils          # qemu-img, qemu-nbd, qemu-io: independent VHD/NBD oracles
  libnbd-bin          # nbdinfo, nbdcopy, nbdsh
  nbdkit              # an NBD server we did not write
  python3-libnbd      # libnbd's Python bindings (for the system python3 only)
  libvhdi-utils       # vhdiinfo, vhdimount
  python3-libvhdi     # pyvhdi: reads differencing chains (set_parent)
  python3-venv python3-dev gcc make
  openssl             # test certificates
  e2fsprogs           # mkfs.ext4 -d: realistic disk contents for demo and benchmarks
  systemd             # systemd-analyze verify for the unit files
  time curl           # /usr/bin/time (bench peak RSS); curl: an HTTPS client we did not write
)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
echo "setup-system: installing ${missing[*]}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
