#!/bin/sh
# edge-vla robot package installer ({{target}}). Run on the robot, as root, from the unpacked package:
#   sudo sh install.sh                 install this package onto this machine and (re)start the service
#   sudo sh install.sh --setup-venv    only make /opt/edge-vla/venv from requirements.lock (first boot)
# To stage into an L4T rootfs before flashing, use `edge-vla install PKG --rootfs DIR` on the host.
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
VENV=/opt/edge-vla/venv
PYTHON=python{{python}}
USER_NAME={{user}}

setup_venv() {
    stamp="$VENV/.edge-vla-lock.sha256"
    want=$(sha256sum "$HERE/requirements.lock" | cut -d' ' -f1)
    if [ -x "$VENV/bin/edge-vla" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return 0  # this lock is already installed
    fi
    command -v "$PYTHON" >/dev/null || PYTHON=python3
    # --system-site-packages: TensorRT's Python bindings come from apt on Jetson.
    "$PYTHON" -m venv --system-site-packages "$VENV"
    if [ -d "$HERE/wheels" ]; then
        set -- --no-index --find-links "$HERE/wheels"  # offline robots: everything is in the package
    else
        set --
    fi
    "$VENV/bin/pip" install --disable-pip-version-check "$@" -r "$HERE/requirements.lock"
    # --no-deps: the lock already holds the right onnxruntime (-gpu on GPU targets).
    "$VENV/bin/pip" install --disable-pip-version-check --no-deps "$@" "edge-vla=={{edge_vla_version}}"
    echo "$want" > "$stamp"
}

if [ "${1:-}" = "--setup-venv" ]; then
    setup_venv
    exit 0
fi
[ "$(id -u)" -eq 0 ] || { echo "install.sh: run as root (sudo sh install.sh)" >&2; exit 1; }
id "$USER_NAME" >/dev/null 2>&1 || useradd --system --no-create-home --home-dir /var/lib/edge-vla \
    --shell /usr/sbin/nologin --user-group "$USER_NAME"
for g in {{groups}}; do
    getent group "$g" >/dev/null && usermod -a -G "$g" "$USER_NAME"
done
setup_venv
PKG=${EDGE_VLA_PKG:-$HERE.tar.gz}
[ -f "$PKG" ] || { echo "install.sh: set EDGE_VLA_PKG to the package tarball" >&2; exit 1; }
"$VENV/bin/edge-vla" install "$PKG" --rootfs / ${EDGE_VLA_INSTALL_ARGS:-}
systemctl daemon-reload
udevadm control --reload-rules && udevadm trigger --subsystem-match=tty --subsystem-match=usb-serial || true
systemctl enable edge-vla-firstboot.service edge-vla.service
systemctl restart edge-vla.service
systemctl --no-pager --lines=5 status edge-vla.service || true
