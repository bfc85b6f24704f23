"""The backend interface: what the sampler needs from an inference engine, and nothing else.

Modelled on Polygraphy's runners: a backend is built from a bundle's graphs, exposes host buffers bound
to graph IO by name, runs the prefix graph once per chunk and the step graph once per ODE evaluation,
and is closed explicitly (idempotent; a context manager; a warning if it is garbage-collected open,
the way python-can's BusABC.shutdown does it). Capabilities are methods, not attribute sniffing.
"""

from __future__ import annotations

import abc
import logging
import os
import warnings
from typing import Any

import numpy as np

from edge_vla.errors import BundleError

log = logging.getLogger(__name__)


class Backend(abc.ABC):
    name: str = "backend"
    _closed: bool = False

    @abc.abstractmethod
    def buffer(self, name: str) -> np.ndarray:
        """The host array bound to graph IO `name` (observation inputs, x_t, velocity); write/read it in place."""

    @abc.abstractmethod
    def set_time_rows(self, name: str, rows: np.ndarray) -> None:
        """The step input `name`'s value for every slot of a schedule (row k = slot k); kept until replaced."""

    @abc.abstractmethod
    def run_prefix(self) -> None:
        """Observation buffers in; the prefix outputs stay where the step graph reads them."""

    @abc.abstractmethod
    def run_step(self, slot: int) -> None:
        """buffer(x_t) and time slot `slot` in; buffer(velocity) out."""

    # --- optional capability: the whole Euler chunk in one device launch (TensorRT + CUDA graph) ---
    def supports_fused_chunk(self) -> bool:
        return False

    def prepare_fused_chunk(self, steps: int, dt: float) -> None:
        raise NotImplementedError(f"the {self.name} backend has no fused chunk")

    def run_fused_chunk(self, noise: np.ndarray) -> np.ndarray:
        raise NotImplementedError(f"the {self.name} backend has no fused chunk")

    # --- lifetime ----------------------------------------------------------------------------------
    def close(self) -> None:
        """Release sessions, device memory, streams and graphs. Safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        self._release()

    @abc.abstractmethod
    def _release(self) -> None:
        """Free what this backend holds (called once, by close())."""

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        if not self._closed and getattr(self, "_opened", False):
            warnings.warn(f"{type(self).__name__} was not closed; call close() or use it as a context manager "
                          "so device memory and streams are released deterministically",
                          ResourceWarning, stacklevel=2)
            try:
                self.close()
            except Exception:  # interpreter shutdown: the libraries may already be gone
                log.debug("close() in __del__ failed", exc_info=True)


class HostBufferBackend(Backend, abc.ABC):
    """A CPU backend whose graph IO lives in host arrays it allocated once (`buf`: name -> array), bound to its
    engine by pointer, so `buffer()` returns the very array the engine reads and writes."""

    buf: dict[str, np.ndarray]

    def buffer(self, name: str) -> np.ndarray:
        if name not in self.buf:
            raise BundleError(f"no graph has an input or output named {name!r}")
        return self.buf[name]

    def _fit_time_rows(self, name: str, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(the input's buffer, the rows contiguous): the rows of a schedule for step input `name`, checked."""
        target = self.buffer(name)
        if rows.shape[1:] != target.shape or rows.dtype != target.dtype:
            raise BundleError(f"time rows {rows.dtype}{list(rows.shape)} do not fit input {name!r} "
                              f"{target.dtype}{list(target.shape)}")
        return target, np.ascontiguousarray(rows)


# The spellings an on/off speed-up switch accepts (EDGE_VLA_ORT_CHUNK, EDGE_VLA_CPU_STEP); "auto" is the default.
_SWITCH_VALUES = {"auto": True, "on": True, "1": True, "off": False, "0": False, "none": False}


def env_switch(value: bool | str | None, env: str, on: str, off: str) -> bool:
    """Whether a speed-up is on: `value` if given, else $`env`, else auto (on). `on`/`off` say what each means, for
    the one-line error a value outside _SWITCH_VALUES gets."""
    if isinstance(value, bool):
        return value
    text = (value if value is not None else os.environ.get(env, "auto")).strip().lower()
    if text not in _SWITCH_VALUES:
        raise BundleError(f"{env} (or the argument) is {text!r}; use 'auto' ({on}) or 'off' ({off})")
    return _SWITCH_VALUES[text]
