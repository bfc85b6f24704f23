"""One exception base for the runtime; every message says what was wrong and what to do."""

from __future__ import annotations


class EdgeVlaError(Exception):
    """Base of every error raised by edge_vla."""


class MissingDependencyError(EdgeVlaError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


class BundleError(EdgeVlaError):
    """A bundle is missing, corrupt, tampered with, or of an unsupported schema."""


class CheckpointError(EdgeVlaError):
    """A checkpoint is missing, corrupt, or disagrees with its config."""


class ObservationError(EdgeVlaError, ValueError):
    """An observation does not match what the policy expects."""


class PolicyOutputError(EdgeVlaError):
    """The policy produced an action that must not reach the robot (NaN or Inf)."""


class ConfigError(EdgeVlaError, ValueError):
    """A configuration value is invalid."""
