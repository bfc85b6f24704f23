"""Model families on the workstation: one registry, keyed by the bundle manifest's `family`.

A family is a module implementing the `Family` hooks below (python-can's interface registry shape: names map to
module paths, imported only when that family is used, so the reference family never imports transformers).
Adding a family touches this table and its own module; no CLI learns about it. The commands ask the registry:

    family = for_checkpoint(path)        # which family wrote this checkpoint directory
    family.export(args)                  # `edge-vla export`
    family.load_teacher(path, steps)     # `edge-vla distill` / `compare`
    family.torch_policy(path, steps, solver)  # `edge-vla evaluate CHECKPOINT`

Family modules import the shared workstation code (teacher.py, exporter.py ...); nothing shared imports a
family module, so the import graph has no circles (tests/export/test_families.py checks it).
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from edge_vla.errors import EdgeVlaError
from edge_vla.runtime.contract import REFERENCE_FAMILY

if TYPE_CHECKING:
    from edge_vla.runtime.types import Observation

    from .teacher import Teacher

# manifest `family` -> module (relative to this package). The reference family is the fallback: its checkpoints
# (config.json from `edge-vla train`) carry no marker of their own; every other family's `is_checkpoint` is asked
# first, in this order.
_MODULES: dict[str, str] = {
    "pi0": ".pi0.family",
    REFERENCE_FAMILY: ".reference_family",
}


@dataclass
class CheckpointPolicy:
    """A checkpoint run in PyTorch as a sim ChunkPolicy (`act(obs) -> chunk`), with what the sim must render."""

    name: str
    act: Callable[[Observation], np.ndarray]
    reset: Callable[..., None]
    num_cameras: int
    image_size: int | None = None  # None: the policy resizes the sim's own frames itself
    dims: tuple[int, int] | None = None  # (state_dim, action_dim) when the policy fixes them


@dataclass
class ExportReport:
    """What `edge-vla export` prints for any family."""

    result: Any  # exporter.ExportResult or pi0.exporter's: .bundle, .seconds, .numerics, .lint, .sizes
    what: str  # "bundle", "π0 bundle"


class Family(Protocol):
    """The hooks a family module provides (module-level names)."""

    NAME: str

    def is_checkpoint(self, path: str | Path) -> bool: ...

    def check_export_args(self, args: argparse.Namespace) -> None: ...

    def export(self, args: argparse.Namespace) -> ExportReport: ...

    def export_bundle(self, checkpoint: str, out: Path, precision: str, calib: str | None) -> Path: ...

    def load_teacher(self, path: str, steps: int | None = None) -> Teacher: ...

    def torch_policy(self, path: str, steps: int | None, solver: str) -> CheckpointPolicy: ...


def names() -> list[str]:
    return list(_MODULES)


def get(name: str) -> Family:
    """The family a manifest names. Unknown names get one line listing the known ones."""
    try:
        module = _MODULES[name]
    except KeyError:
        raise EdgeVlaError(f"unknown model family {name!r}; this edge-vla knows {', '.join(_MODULES)}") from None
    family: Any = importlib.import_module(module, __package__)
    return family


def for_checkpoint(path: str | Path) -> Family:
    """The family whose checkpoint `path` is (the reference family when no other claims it)."""
    for name in _MODULES:
        if name == REFERENCE_FAMILY:
            continue
        family = get(name)
        if family.is_checkpoint(path):
            return family
    return get(REFERENCE_FAMILY)


def load_teacher(path: str, steps: int | None = None) -> Teacher:
    """Any family's checkpoint as a distillation teacher."""
    return for_checkpoint(path).load_teacher(path, steps)
