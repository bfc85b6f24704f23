"""Numerical agreement between two outputs, and the per-precision limits a bundle is held to.

Used by the export numerics gate (graphs vs PyTorch) and by `edge-vla build-engines` (TensorRT engines
vs the bundle's ONNX graphs, on the robot, where torch is absent): numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Per precision: (max relative L2 error, min cosine similarity) of the normalized action chunk / graph outputs.
THRESHOLDS: dict[str, tuple[float, float]] = {
    "fp32": (1e-4, 0.99999),
    "fp16": (1e-2, 0.9995),
    "int8": (8e-2, 0.995),
}


@dataclass
class Metrics:
    max_abs: float
    rel_l2: float
    cosine: float

    @classmethod
    def of(cls, ref: np.ndarray, got: np.ndarray) -> Metrics:
        ref64, got64 = np.asarray(ref, np.float64).ravel(), np.asarray(got, np.float64).ravel()
        if ref64.shape != got64.shape or not np.all(np.isfinite(got64)):
            return cls(float("inf"), float("inf"), -1.0)
        diff = got64 - ref64
        denom = max(np.linalg.norm(ref64), 1e-12)
        cos = float(ref64 @ got64 / max(np.linalg.norm(ref64) * np.linalg.norm(got64), 1e-12))
        return cls(float(np.abs(diff).max()) if diff.size else 0.0, float(np.linalg.norm(diff) / denom), cos)

    def worst(self, other: Metrics) -> Metrics:
        return Metrics(max(self.max_abs, other.max_abs), max(self.rel_l2, other.rel_l2), min(self.cosine, other.cosine))

    def within(self, precision: str) -> bool:
        rel_max, cos_min = THRESHOLDS[precision]
        return self.rel_l2 <= rel_max and self.cosine >= cos_min
