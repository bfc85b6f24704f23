"""Fixtures for the motor-device tests: emulated Dynamixel buses on real ptys."""

from __future__ import annotations

import pytest

pytest.importorskip("dynamixel_sdk", reason="dynamixel-sdk is not installed (pip install 'edge-vla[dynamixel]')")
