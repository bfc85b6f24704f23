"""Fixtures for the onboard tests that run the real control process against the emulator on a pty."""

from __future__ import annotations

import multiprocessing as mp

import pytest
from onboard_helpers import start_emulator


@pytest.fixture
def emulator():
    with start_emulator() as emu:
        yield emu


@pytest.fixture(autouse=True)
def _no_leftover_children():
    yield
    for child in mp.active_children():
        child.join(timeout=5)
        assert not child.is_alive(), f"leftover process {child.name}"
