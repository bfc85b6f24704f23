"""The one error type of the LeRobot reader and writer."""

from __future__ import annotations

from edge_vla.errors import EdgeVlaError


class LeRobotDatasetError(EdgeVlaError):
    """A LeRobot dataset is missing, malformed, or lacks what the model needs; the message says what to do."""
