#!/bin/sh
# edge-vla robot package installer ({{target}}). Run on the robot, as root, from the unpacked package:
#   sudo EDGE_VLA_PKG=/path/robot-pkg.tar.gz sh install.sh   install onto this machine, (re)start the service
#   sh install.sh --setup-venv     make this release's venv from its wheels (the first-boot unit runs it)
# To stage into an L4T rootfs before flashing, use `edge-vla install PKG --rootfs DIR` on the host.
# An older edge-vla than the current release's is refused; EDGE_VLA_INSTALL_ARGS=--allow-downgrade installs it.
#
# Trust: this script, and the installer it runs as root, come from this package as unpacked: the installer
# checks the package's signatures, but by then the package's own code already runs as root. Verify the package
# before running this script: `edge-vla install PKG --host USER@ROBOT --trusted-key KEY.pub` on the workstation
# does (before copying anything), and on a robot with a release installed its edge-vla does:
#   sudo /opt/edge-vla/current/venv/bin/edge-vla install PKG --rootfs / --dry-run
#
# The venv gets exactly the wheels in this package's wheels/ directory, each checked against its
# sha256 in requirements.lock, with no index: no network, nothing by name from anywhere else.
set -eu
# The venv is read by the unprivileged service user: whatever root's umask is, make it readable.
umask 022
HERE=$(cd "$(dirname "$0")" && pwd)
PYTHON=python{{python}}
WANT_PYTHON={{python}}
USER_NAME={{user}}

# pip with only this package's options: no pip.conf (PIP_CONFIG_FILE=/dev/null), no PIP_* variables
# (--isolated), so nothing on the robot can add an index or a find-links directory.
pip_in() {
    venv=$1
    shift
    PIP_CONFIG_FILE=/dev/null "$venv/bin/python" -m pip --isolated --disable-pip-version-check --no-input "$@"
}

# setup_venv DIR: a venv with the locked wheels, unless DIR already has this lock.
setup_venv() {
    venv=$1
    stamp="$venv/.edge-vla-lock.sha256"
    want=$(cat "$HERE/requirements.lock" "$HERE"/requirements.online.txt 2>/dev/null | sha256sum | cut -d' ' -f1)
    if [ -x "$venv/bin/edge-vla" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return 0
    fi
    command -v "$PYTHON" >/dev/null || PYTHON=python3
    have=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    if [ "$have" != "$WANT_PYTHON" ]; then
        echo "install.sh: this package's wheels are for Python $WANT_PYTHON, but $PYTHON is $have;" \
             "repackage with --python $have (x86) or the matching --jetpack" >&2
        exit 1
    fi
    # --system-site-packages: TensorRT's Python bindings come from apt (python3-libnvinfer). pip: the
    # system's, seen through the same door, when it has one (ensurepip takes long on a small board).
    "$PYTHON" -m venv --clear --without-pip --system-site-packages "$venv"
    "$venv/bin/python" -m pip --version >/dev/null 2>&1 || "$venv/bin/python" -m ensurepip --default-pip >/dev/null
    if [ -f "$HERE/requirements.online.txt" ]; then
        echo "install.sh: WARNING: development (--online) package: fetching dependencies from an index," \
             "unpinned and without hash checks" >&2
        pip_in "$venv" install --ignore-installed --only-binary=:all: -r "$HERE/requirements.online.txt"
    fi
    # --require-hashes: a wheel whose sha256 differs from the lock is refused, nothing is installed.
    # --no-deps: the lock is the whole closure, resolved for this target (it names onnxruntime-gpu
    # where edge-vla's metadata says onnxruntime). --ignore-installed: a system (apt) package seen
    # through --system-site-packages cannot stand in for a locked wheel.
    pip_in "$venv" install --no-index --find-links "$HERE/wheels" --require-hashes --no-deps \
        --only-binary=:all: --ignore-installed -r "$HERE/requirements.lock"
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
# The installer runs from its own venv (made from this package's wheels); it verifies the whole
# package (every file and wheel hash, and the signatures with trusted keys) before switching
# `current`, and the release gets its own venv on its first start.
INSTALLER=/var/cache/edge-vla/installer-venv
setup_venv "$INSTALLER"
"$INSTALLER/bin/edge-vla" install "$PKG" --rootfs / ${EDGE_VLA_INSTALL_ARGS:-}
systemctl daemon-reload
udevadm control --reload-rules && udevadm trigger --subsystem-match=tty --subsystem-match=usb-serial || true
systemctl enable edge-vla-firstboot.service edge-vla.service
systemctl restart edge-vla.service
systemctl --no-pager --lines=5 status edge-vla.service || true
