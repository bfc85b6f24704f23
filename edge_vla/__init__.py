"""edge-vla: run a Vision-Language-Action policy on a robot's own computer, standalone and safely."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edge_vla.errors import (
    BundleError,
    CheckpointError,
    ConfigError,
    EdgeVlaError,
    MissingDependencyError,
    ObservationError,
)

__version__ = "0.1.0"

__all__ = [
    "BundleError",
    "CheckpointError",
    "ConfigError",
    "EdgeVlaError",
    "MissingDependencyError",
    "ObservationError",
    "Policy",
    "__version__",
]

if TYPE_CHECKING:
    from edge_vla.runtime.policy import Policy


def __getattr__(name: str) -> Any:
    # Lazy so that `import edge_vla` stays cheap (no onnxruntime session machinery at import).
    if name == "Policy":
        from edge_vla.runtime.policy import Policy

        return Policy
    raise AttributeError(f"module 'edge_vla' has no attribute {name!r}")
