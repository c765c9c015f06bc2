#!/usr/bin/env bash
# Make exactly two Debian-built modules visible inside the virtualenv: libnbd's (nbd, libnbdmod) and
# libvhdi's (pyvhdi). A .pth file points at a directory of symlinks, so the rest of Debian's
# dist-packages (python3-boto3 & co, pulled in by apt) never shadows the PyPI versions.
set -euo pipefail
venv=${1:?usage: link-debian-modules.sh VENV}
dist=/usr/lib/python3/dist-packages
dir="$(cd "$venv" && pwd)/debian-modules"
rm -rf "$dir"
mkdir -p "$dir"
for m in "$dist"/nbd.py "$dist"/libnbdmod.cpython-*.so "$dist"/pyvhdi.cpython-*.so; do
  [ -e "$m" ] || { echo "link-debian-modules: missing $m (is make setup's apt step done?)" >&2; exit 1; }
  ln -s "$m" "$dir/"
done
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$dir" > "$site/debian-modules.pth"
"$venv/bin/python" -c 'import nbd, pyvhdi' 
