"""Solver names and costs (the definitions live in edge_vla.runtime.flow; the loop in .sampler)."""

from __future__ import annotations

from edge_vla.runtime.flow import EVALS_PER_STEP, SOLVERS, TABLEAUS
from edge_vla.runtime.sampler import Sampler

__all__ = ["EVALS_PER_STEP", "SOLVERS", "TABLEAUS", "Sampler"]
