#!/bin/sh
# Install the xcp-fastpath agent from this bundle (dom0 of XCP-ng 8.2/8.3, as root).
# Needs only /bin/sh, coreutils and Python >= 3.6: no pip, no compiler, no network.
#
#   ./install.sh [--root DIR] [--prefix /opt/fastpath] [--no-start]
#
#   --root DIR   install under DIR (a chroot or image; nothing is started, systemd is not touched)
#   --prefix P   where the agent lives (default /opt/fastpath): P/lib/agent, P/bin, P/docs
#   --no-start   do not enable/restart the service
#
# Installs: P/lib/agent (replaced atomically), P/bin/fastpath-agent, P/bin/fastpath-ensure-cert,
# /etc/xapi.d/plugins/fastpath, /etc/systemd/system/fastpath-agent.service, and
# /etc/fastpath/agent.conf only when absent (an existing config is never overwritten; the new
# default is left next to it as agent.conf.new). When the host has no XAPI certificate
# (/etc/xensource/xapi-ssl.pem), the new config points [tls] cert to /var/lib/fastpath/agent.pem,
# which fastpath-ensure-cert generates with openssl on the service's first start.
set -eu

ROOT=""
PREFIX=/opt/fastpath
START=1
PYTHON=${PYTHON:-/usr/bin/python3}

usage() {
    sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
}

while [ $# -gt 0 ]; do
    case "$1" in
        --root) ROOT=${2:?--root needs a directory}; START=0; shift 2 ;;
        --root=*) ROOT=${1#--root=}; START=0; shift ;;
        --prefix) PREFIX=${2:?--prefix needs a directory}; shift 2 ;;
        --prefix=*) PREFIX=${1#--prefix=}; shift ;;
        --no-start) START=0; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

case "$PREFIX" in
    /*) ;;
    *) echo "install.sh: --prefix must be absolute" >&2; exit 2 ;;
esac

HERE=$(cd "$(dirname "$0")" && pwd)
VERSION=$(cat "$HERE/VERSION")

fail() {
    echo "install.sh: $*" >&2
    exit 1
}

# The bundle must be complete and intact.
if command -v sha256sum >/dev/null 2>&1; then
    (cd "$HERE" && sha256sum -c --quiet SHA256SUMS) || fail "bundle is damaged (SHA256SUMS mismatch)"
fi

# Python 3.6 or newer, when installing on this host.
if [ -z "$ROOT" ]; then
    "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 6) else 1)' 2>/dev/null \
        || fail "$PYTHON is missing or older than 3.6"
fi

DEST="$ROOT$PREFIX"
mkdir -p "$DEST/bin" "$DEST/docs"

# Library: copy next to the old one, then swap, so a running agent never sees a half copy.
rm -rf "$DEST/lib.new" "$DEST/lib.old"
mkdir -p "$DEST/lib.new"
cp -R "$HERE/lib/agent" "$DEST/lib.new/agent"
find "$DEST/lib.new" -type d -exec chmod 0755 {} +
find "$DEST/lib.new" -type f -exec chmod 0644 {} +
if [ -d "$DEST/lib" ]; then
    mv "$DEST/lib" "$DEST/lib.old"
fi
mv "$DEST/lib.new" "$DEST/lib"
rm -rf "$DEST/lib.old"

install_file() { # mode source target
    mkdir -p "$(dirname "$3")"
    cp "$2" "$3.tmp.$$"
    chmod "$1" "$3.tmp.$$"
    mv "$3.tmp.$$" "$3"
}

install_file 0755 "$HERE/bin/fastpath-agent" "$DEST/bin/fastpath-agent"
install_file 0755 "$HERE/bin/fastpath-ensure-cert" "$DEST/bin/fastpath-ensure-cert"
for doc in "$HERE"/docs/*; do
    [ -f "$doc" ] && install_file 0644 "$doc" "$DEST/docs/$(basename "$doc")"
done
echo "$VERSION" > "$DEST/VERSION"

install_file 0755 "$HERE/plugin/fastpath" "$ROOT/etc/xapi.d/plugins/fastpath"

# The unit names /opt/fastpath; follow --prefix.
UNIT="$ROOT/etc/systemd/system/fastpath-agent.service"
mkdir -p "$(dirname "$UNIT")"
sed "s#/opt/fastpath#$PREFIX#g" "$HERE/systemd/fastpath-agent.service" > "$UNIT.tmp.$$"
chmod 0644 "$UNIT.tmp.$$"
mv "$UNIT.tmp.$$" "$UNIT"

mkdir -p "$ROOT/etc/fastpath" "$ROOT/var/lib/fastpath"
chmod 0700 "$ROOT/var/lib/fastpath"
CONF="$ROOT/etc/fastpath/agent.conf"
NEWCONF="$CONF.new"
if [ -e "$ROOT/etc/xensource/xapi-ssl.pem" ]; then
    cp "$HERE/systemd/agent.conf" "$NEWCONF.tmp.$$"
else
    sed -e 's#^cert = /etc/xensource/xapi-ssl.pem#cert = /var/lib/fastpath/agent.pem#' \
        "$HERE/systemd/agent.conf" > "$NEWCONF.tmp.$$"
fi
chmod 0644 "$NEWCONF.tmp.$$"
if [ -e "$CONF" ]; then
    mv "$NEWCONF.tmp.$$" "$NEWCONF"
    echo "install.sh: kept the existing $CONF (the new default is in $NEWCONF)"
else
    mv "$NEWCONF.tmp.$$" "$CONF"
fi

echo "install.sh: xcp-fastpath agent $VERSION installed in $DEST"

if [ "$START" = 1 ] && command -v systemctl >/dev/null 2>&1; then
    systemctl daemon-reload
    systemctl enable fastpath-agent.service
    systemctl restart fastpath-agent.service
    echo "install.sh: fastpath-agent.service enabled and (re)started; journalctl -u fastpath-agent"
fi
