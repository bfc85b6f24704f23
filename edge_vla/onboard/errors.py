"""Errors raised by the onboard loop; all derive from edge_vla's one base."""

from __future__ import annotations

from edge_vla.errors import EdgeVlaError


class OnboardError(EdgeVlaError):
    """The onboard loop could not start or had to stop."""


class CameraError(OnboardError):
    """A camera source is missing, unreadable, or stopped delivering frames."""


class StartupError(OnboardError):
    """The control loop did not come up (link, first state or first chunk missing)."""
