"""`edge-vla ARGS...` whose camera a test can unplug mid-run: `python camera_unplug_run.py TRIGGER MODE ARGS...`.

The whole `edge-vla run` process is the real one (argument checks, model or expert, control process, link, operator
socket, exit status); only the camera `run` opens is wrapped. Once the file TRIGGER exists, its reads fail as an
unplugged USB camera's do:

    raise   read raises OSError ENODEV, what V4L2 / librealsense report for a device that is gone
    none    read returns None (a driver that answers with no frame)
    shape   read returns a Frame whose image is not HxWx3 (a truncated buffer)
    ok      nothing fails (the control case)
"""

from __future__ import annotations

import errno
import os
import sys
import time
from typing import Any

import numpy as np

from edge_vla import cli
from edge_vla.onboard import cli as run_cli
from edge_vla.onboard.cameras import Frame

MODES = ("raise", "none", "shape", "ok")


class UnpluggableCamera:
    """The camera `run` opened, until TRIGGER exists; from then on, its reads fail the MODE way."""

    def __init__(self, inner: Any, trigger: str, mode: str) -> None:
        self.inner, self.trigger, self.mode = inner, trigger, mode

    def read(self) -> Any:
        if self.mode == "ok" or not os.path.exists(self.trigger):
            return self.inner.read()
        if self.mode == "raise":
            raise OSError(errno.ENODEV, os.strerror(errno.ENODEV))
        if self.mode == "none":
            return None
        return Frame(images=[np.zeros((7,), np.uint8)], timestamp=time.monotonic())

    def close(self) -> None:
        self.inner.close()


def main() -> int:
    trigger, mode, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    if mode not in MODES:
        sys.exit(f"mode {mode!r}: one of {', '.join(MODES)}")
    real = run_cli.open_camera
    run_cli.open_camera = lambda *a, **k: UnpluggableCamera(real(*a, **k), trigger, mode)
    return cli.main(args)


if __name__ == "__main__":
    raise SystemExit(main())
