#!/bin/sh
# edge-vla robot package installer ({{target}}). Run on the robot, as root, from the unpacked package:
#   sudo EDGE_VLA_PKG=/path/robot-pkg.tar.gz sh install.sh   install onto this machine, (re)start the service
#   sh install.sh --setup-venv     make this release's venv from requirements.lock (the first-boot unit runs it)
# To stage into an L4T rootfs before flashing, use `edge-vla install PKG --rootfs DIR` on the host.
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
PYTHON=python{{python}}
USER_NAME={{user}}

# setup_venv DIR: a venv with the locked requirements and edge-vla, unless DIR already has this lock.
setup_venv() {
    venv=$1
    stamp="$venv/.edge-vla-lock.sha256"
    want=$(sha256sum "$HERE/requirements.lock" | cut -d' ' -f1)
    if [ -x "$venv/bin/edge-vla" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return 0
    fi
    command -v "$PYTHON" >/dev/null || PYTHON=python3
    # --system-site-packages: TensorRT's Python bindings come from apt on Jetson.
    "$PYTHON" -m venv --clear --system-site-packages "$venv"
    if [ -d "$HERE/wheels" ]; then
        set -- --no-index --find-links "$HERE/wheels"  # offline robots: everything is in the package
    else
        set --
    fi
    "$venv/bin/pip" install --disable-pip-version-check "$@" -r "$HERE/requirements.lock"
    # --no-deps: the lock already holds the right onnxruntime (-gpu on GPU targets).
    "$venv/bin/pip" install --disable-pip-version-check --no-deps "$@" "edge-vla=={{edge_vla_version}}"
    echo "$want" > "$stamp"
}

if [ "${1:-}" = "--setup-venv" ]; then
    setup_venv "$HERE/venv"
    exit 0
fi
[ "$(id -u)" -eq 0 ] || { echo "install.sh: run as root (sudo sh install.sh)" >&2; exit 1; }
PKG=${EDGE_VLA_PKG:-$HERE.tar.gz}
[ -f "$PKG" ] || { echo "install.sh: set EDGE_VLA_PKG to the package tarball" >&2; exit 1; }
id "$USER_NAME" >/dev/null 2>&1 || useradd --system --no-create-home --home-dir /var/lib/edge-vla \
    --shell /usr/sbin/nologin --user-group "$USER_NAME"
for g in {{groups}}; do
    getent group "$g" >/dev/null && usermod -a -G "$g" "$USER_NAME"
done
# The installer runs from its own venv; the release gets its venv on its first start.
INSTALLER=/var/cache/edge-vla/installer-venv
setup_venv "$INSTALLER"
"$INSTALLER/bin/edge-vla" install "$PKG" --rootfs / ${EDGE_VLA_INSTALL_ARGS:-}
systemctl daemon-reload
udevadm control --reload-rules && udevadm trigger --subsystem-match=tty --subsystem-match=usb-serial || true
systemctl enable edge-vla-firstboot.service edge-vla.service
systemctl restart edge-vla.service
systemctl --no-pager --lines=5 status edge-vla.service || true
