"""Small LeRobot datasets written once per session from the test recording (lerobot_data.py): v3.0 with two
episodes per file (so files hold several episodes, and there are two files) and v2.1."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("pyarrow")
pytest.importorskip("av")

from lerobot_data import FPS, make_recording

from edge_vla.sim.dataset import Dataset


@pytest.fixture(scope="session")
def recording() -> Dataset:
    return make_recording()


@pytest.fixture(scope="session")
def v30(tmp_path_factory: pytest.TempPathFactory, recording: Dataset) -> Path:
    from edge_vla.export.lerobot import write_dataset

    return write_dataset(recording, tmp_path_factory.mktemp("lerobot") / "rec_v30", fps=FPS, version="v3.0",
                         episodes_per_file=2, robot_type="test_arm", state_names=["j0", "j1", "j2"],
                         action_names=["a0", "a1", "a2", "gripper"])


@pytest.fixture(scope="session")
def v21(tmp_path_factory: pytest.TempPathFactory, recording: Dataset) -> Path:
    from edge_vla.export.lerobot import write_dataset

    return write_dataset(recording, tmp_path_factory.mktemp("lerobot") / "rec_v21", fps=FPS, version="v2.1",
                         robot_type="test_arm")
